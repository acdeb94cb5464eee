"""Time travel over a recording: seek to any icount, step and continue backwards.

Forward execution is a replay of the log (inputs from the log, digests
checked).  While replaying forward, a checkpoint is taken every ``interval``
instructions, so going to any earlier point costs one checkpoint restore plus
at most ``interval`` instructions of forward replay.

Positions are *machine positions*: the instructions retired by all vCPUs
together (``Machine.icount``).  Every vCPU's state at a position is exact,
so seeking to a position puts every vCPU where it was at that moment.

Reverse execution is built on exact seeking, as gdb defines it:
* reverse-stepi lands on icount - 1 with the registers a forward run had there;
* reverse-continue lands on the last breakpoint or watchpoint hit before the
  current point, or at icount 0.  Going backwards, a breakpoint stops with PC
  at its address (the starting PC itself is never reported), and a watchpoint
  stops in the state *before* the accessing instruction, PC on it: the store
  that wrote the watched location.  (Forward, a watchpoint stops after it.)
To find that hit, each checkpoint interval before the current point is
replayed forward with the breakpoints and watchpoints recording their hits
(without stopping), latest interval first; then the replay seeks to the hit.

Several vCPUs (issue 11).  They take turns on one engine, so between two
machine positions exactly one vCPU retires an instruction.  Stepping is per
vCPU, as gdb steps one thread: ``step(vcpu=k)`` runs the machine until vCPU
k retired one more instruction of its own (the others run in between as the
schedule says), ``reverse_step(vcpu=k)`` goes to the machine position just
before vCPU k retired its previous instruction, every other vCPU in the state
it had then.  Breakpoints and watchpoints are machine-wide (one engine); a
hit carries the vCPU that made it, forward and backward.

The map between a vCPU's own icount and the machine position is a
`Schedule`: the start of every turn (machine position, vCPU, that vCPU's
icount), learnt by watching each vCPU's runs as the replay goes forward.  The
schedule is a pure function of the recording, so what was learnt once stays
true across checkpoint restores and is never learnt twice; the map always
covers the positions from the start of the replay to the furthest point the
replay ever reached (the *frontier*).  A step past the frontier runs the
machine with the stepped vCPU's runs cut to one instruction, which is where
the machine stops (the same place a run to that machine position stops: an
instruction limit never changes the schedule).

Breakpoints never modify guest memory (they are code hooks), and watchpoints
are memory hooks, so neither changes what the guest computes.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from replay.checkpoint import Checkpoints
from replay.session import Replayer
from vmm.machine import RunResult, StopReason

DEFAULT_INTERVAL = 2_000_000
MAX_INTERVAL = 20_000_000        # ~0.2 s of forward replay: the most any reverse step costs
TARGET_CHECKPOINTS = 256
U64 = (1 << 64) - 1


def adaptive_interval(length: int | None) -> int:
    """Checkpoint spacing for a recording of ``length`` instructions.

    Short recordings get a checkpoint every DEFAULT_INTERVAL instructions;
    long ones spread about TARGET_CHECKPOINTS over their length, so checkpoint
    memory stays bounded, but never more than MAX_INTERVAL apart, so a reverse
    step never replays more than that.
    """
    if not length:
        return DEFAULT_INTERVAL
    return max(DEFAULT_INTERVAL, min(MAX_INTERVAL, length // TARGET_CHECKPOINTS))

SW, HW, WRITE, READ, ACCESS = 0, 1, 2, 3, 4


@dataclass
class Hit:
    icount: int      # the machine position at which to stop for this hit
    kind: int        # SW/HW (breakpoint) or WRITE/READ/ACCESS (watchpoint)
    addr: int        # the breakpoint address, or the data address accessed
    vcpu: int = 0    # the vCPU that reached the breakpoint or made the access


@dataclass
class Stop:
    reason: str      # "breakpoint", "watchpoint", "step", "end", "start", "limit", "interrupted"
    icount: int
    hit: Hit | None = None
    result: RunResult | None = None
    vcpu: int | None = None   # the vCPU the stop is about (None: no particular one)


def pc_of(v) -> int:
    """A vCPU's linear instruction address (CS base + rIP)."""
    return v.seg(1).base + v.rip


class Schedule:
    """Which vCPU retired each instruction of a multi-vCPU machine, learnt as it runs.

    A *turn* here is a stretch of machine positions in which one vCPU alone
    retires instructions.  ``pos[i]`` is where turn i starts, ``who[i]`` its
    vCPU and ``base[i]`` that vCPU's icount there; turn i ends where turn i+1
    starts, the last one at ``frontier``.  Everything in [``origin``,
    ``frontier``) is known; ``origin`` is where the replay started (0, or a
    snapshot's position).

    The learning hooks each vCPU's ``run`` (the one way a vCPU executes; the
    machine itself only counts SYSCALL/SYSENTER, which it emulates, after
    that vCPU's run, and those are caught up at the next observation).  A
    hook can also *cut* one vCPU's runs so that the machine stops right after
    that vCPU retired a given count (``arm``): the budget the machine gives
    the run is lowered, as an instruction limit would, and the machine is
    asked to stop at its next turn boundary check.
    """

    def __init__(self, machine, learn: bool = True) -> None:
        self.m = machine
        self.learn = learn   # False: only cut runs (a live machine needs no map)
        self.origin = self.frontier = machine.icount
        self.origin_counts = [v.icount for v in machine.vcpus]
        self._count = list(self.origin_counts)    # each vCPU's icount at the frontier
        self.pos: list[int] = []
        self.who: list[int] = []
        self.base: list[int] = []
        # per vCPU: its turns' indexes and its icount at their starts (ascending)
        self._turns: list[list[int]] = [[] for _ in machine.vcpus]
        self._bases: list[list[int]] = [[] for _ in machine.vcpus]
        self._arm: tuple[int, int] | None = None
        self.fired = False
        for v in machine.vcpus:
            v.run = self._observe(v, v.run)

    # -- learning ------------------------------------------------------------------
    def _observe(self, v, run):
        m = self.m

        def observed(until_icount: int | None = None):
            arm = self._arm
            if not self.learn:
                if arm is None or arm[0] != v.id:
                    return run(until_icount)
                pos = before = 0
            else:
                pos = m.icount
                if pos > self.frontier:
                    self._catch_up()
                before = v.icount
            if arm is not None and arm[0] == v.id:
                until_icount = arm[1] if until_icount is None else min(until_icount, arm[1])
            try:
                return run(until_icount)
            finally:
                after = v.icount
                if self.learn and pos + after - before > self.frontier and pos <= self.frontier and after >= before:
                    self._extend(v.id, pos + after - before)
                if arm is not None and arm[0] == v.id and after >= arm[1]:
                    self._arm = None
                    self.fired = True
                    m.request_host_stop("a debugger step of one vCPU")
        return observed

    def _extend(self, vid: int, end: int) -> None:
        """Positions [frontier, end) were retired by ``vid``."""
        if not self.who or self.who[-1] != vid:
            self._turns[vid].append(len(self.pos))
            self._bases[vid].append(self._count[vid])
            self.pos.append(self.frontier)
            self.who.append(vid)
            self.base.append(self._count[vid])
        self._count[vid] += end - self.frontier
        self.frontier = end

    def _catch_up(self) -> None:
        """Instructions the machine counted outside a run (an emulated SYSCALL)."""
        for v in self.m.vcpus:
            n = v.icount - self._count[v.id]
            if n > 0:
                self._extend(v.id, self.frontier + n)

    def sync(self) -> None:
        if self.m.icount > self.frontier:
            self._catch_up()

    def arm(self, vid: int, count: int) -> None:
        """Stop the machine right after vCPU ``vid`` reached ``count`` retired instructions."""
        self._arm = (vid, count)
        self.fired = False

    def disarm(self) -> None:
        self._arm = None

    # -- questions -------------------------------------------------------------------
    def _end(self, i: int) -> int:
        return self.pos[i + 1] if i + 1 < len(self.pos) else self.frontier

    def vcpu_at(self, position: int) -> int | None:
        """The vCPU that retired the instruction taking the machine from ``position`` to
        ``position + 1`` (None if not known yet)."""
        self.sync()
        if not self.origin <= position < self.frontier:
            return None
        return self.who[bisect_right(self.pos, position) - 1]

    def before_insn(self, vid: int, n: int) -> int | None:
        """The machine position just before vCPU ``vid`` retired its ``n``-th instruction
        (the one taking its icount from n - 1 to n); None if not known yet."""
        self.sync()
        bases = self._bases[vid]
        j = bisect_right(bases, n - 1) - 1
        if j < 0 or n < 1:
            return None
        i = self._turns[vid][j]
        at = self.pos[i] + (n - 1 - bases[j])
        return at if at < self._end(i) else None

    def turns(self, lo: int, hi: int) -> list[tuple[int, int, int, int]]:
        """(position, vCPU, its icount, length) of the turns overlapping [lo, hi)."""
        self.sync()
        first = max(bisect_right(self.pos, lo) - 1, 0)
        out = []
        for i in range(first, len(self.pos)):
            if self.pos[i] >= hi:
                break
            out.append((self.pos[i], self.who[i], self.base[i], self._end(i) - self.pos[i]))
        return out


class TimeTravel:
    def __init__(self, log_path: str, image: bytes | None = None, interval: int | None = None,
                 serial=None):
        self.rp = Replayer(log_path, image=image, serial=serial)
        self.m = self.rp.m
        # None: adapt to the recording's length (see adaptive_interval)
        self.interval = interval if interval is not None else adaptive_interval(self.rp.end_icount)
        self.origin = self.m.icount     # where the recording starts (0, or a snapshot's position)
        self.sched = Schedule(self.m) if len(self.m.vcpus) > 1 else None
        self.cps = Checkpoints(self.m, self.rp.save_position, self.rp.load_position, self.rp.timer_restorers)
        self.cps.take()
        self.end_icount = self.rp.end_icount
        self.breakpoints: set[int] = set()          # linear addresses (SW and HW alike)
        self.watchpoints: dict[tuple[int, int, int], object] = {}  # (kind, addr, len) -> hook handle
        self._watch_hits: list[Hit] = []
        self.finished: RunResult | None = None       # how the guest ended, once reached

    # -- position ----------------------------------------------------------------
    @property
    def icount(self) -> int:
        return self.m.icount

    def vcpu_icounts(self) -> list[int]:
        """Each vCPU's own retired-instruction count at the current position."""
        return [v.icount for v in self.m.vcpus]

    def _run_plain(self, target: int) -> RunResult:
        """Forward to ``target`` (or the end), checkpointing on the way."""
        m = self.m
        while m.icount < target:
            last = self.cps.list[-1].icount
            nxt = min(target, last + self.interval) if last + self.interval > m.icount else target
            res = m.run(nxt)
            if res.reason is StopReason.BREAKPOINT:
                return res
            if res.reason is StopReason.HOST and self.sched is not None and self.sched.fired:
                return res   # a one-vCPU step is done (Schedule.arm)
            if res.reason is not StopReason.LIMIT:
                self.finished = res
                return res
            if m.icount >= last + self.interval:
                self.cps.take()
        return RunResult(StopReason.LIMIT, m.icount)

    def seek(self, target: int) -> int:
        """Put the machine at exactly ``target`` retired instructions (or the end)."""
        target = max(target, self.origin)
        if self.end_icount is not None:
            target = min(target, self.end_icount)
        cur = self.icount
        cp = self.cps.latest_at_or_before(target)
        if target < cur or (cp is not None and cp.icount > cur):
            self.cps.restore(cp)
            self.finished = None
        self._without_exits(lambda: self._run_plain(target))  # a seek passes breakpoints by
        return self.icount

    def seek_vcpu(self, vcpu: int, n: int) -> int:
        """Put the machine at the position where vCPU ``vcpu`` has just retired its
        ``n``-th instruction (``n`` 0, or before the replay's start: just before its first
        instruction the replay holds; past its last: the end of the recording)."""
        if self.sched is None:
            return self.seek(n)
        v = self.m.vcpus[vcpu]
        at = self.sched.before_insn(vcpu, n) if n > 0 else None
        if at is not None:
            return self.seek(at + 1)
        if n > v.icount:
            self._without_exits(lambda: self._run_vcpu_to(vcpu, n))
            return self.icount
        first = self.sched.before_insn(vcpu, self.sched.origin_counts[vcpu] + 1)
        return self.seek(first if first is not None else self.origin)

    def _run_vcpu_to(self, vcpu: int, n: int) -> None:
        """Forward until vCPU ``vcpu`` retired ``n`` instructions (or the end)."""
        sched = self.sched
        sched.arm(vcpu, n)
        try:
            end = self.end_icount if self.end_icount is not None else 1 << 62
            self._run_plain(end)
        finally:
            sched.disarm()
            sched.fired = False

    # -- breakpoints and watchpoints -------------------------------------------------
    def add_breakpoint(self, addr: int) -> None:
        self.breakpoints.add(addr)
        self.m.vcpu.set_breakpoints(self.breakpoints)

    def remove_breakpoint(self, addr: int) -> None:
        self.breakpoints.discard(addr)
        self.m.vcpu.set_breakpoints(self.breakpoints)

    def add_watchpoint(self, kind: int, addr: int, length: int) -> None:
        vcpu = self.m.vcpu
        kinds = {WRITE: vcpu.WATCH_WRITE, READ: vcpu.WATCH_READ, ACCESS: vcpu.WATCH_READ | vcpu.WATCH_WRITE}[kind]
        m = self.m

        def hook(access, address, size, value):
            who = m.current   # the hook is engine-wide: the vCPU running now made the access
            if kind == WRITE and access == vcpu.ACCESS_WRITE and self._unchanged(who, address, size, value):
                return  # gdb's `watch` reports a write only when it changes the value
            # record the instruction now executing; the stop point is just after it
            self._watch_hits.append(Hit(m.clock.now() - m.clock.idle + 1, kind, address, who.id))

        # gdb's addresses are linear: the watch follows them to whatever frame they map to
        self.watchpoints[(kind, addr, length)] = vcpu.add_linear_watch(kinds, addr, addr + length - 1, hook)

    def _unchanged(self, cpu, address: int, size: int, value: int) -> bool:
        """Does this store write the bytes memory already holds? (Called before the store.)"""
        try:
            pa = cpu.translate(address, "r", user=False, set_ad=False)
            if (pa & 0xFFF) + size > 0x1000:
                return False
            old = self.m.memory.read(pa, size)
        except Exception:  # noqa: BLE001 - unmapped: the store itself will fault; report it
            return False
        return old == (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def remove_watchpoint(self, kind: int, addr: int, length: int) -> None:
        h = self.watchpoints.pop((kind, addr, length), None)
        if h is not None:
            self.m.vcpu.remove_linear_watch(h)

    # -- forward ------------------------------------------------------------------------
    def step(self, vcpu: int | None = None) -> Stop:
        """One instruction forward: of the machine (``vcpu`` None), or of vCPU ``vcpu``
        (the others run in between as the schedule says)."""
        if self.end_icount is not None and self.icount >= self.end_icount:
            return Stop("end", self.icount, result=self.finished, vcpu=vcpu)
        if vcpu is None or self.sched is None:
            before = self.icount
            self._without_exits(lambda: self.seek(self.icount + 1))
            who = self.sched.vcpu_at(before) if self.sched is not None else 0
            return Stop("step", self.icount, vcpu=who if vcpu is None else vcpu)
        n = self.m.vcpus[vcpu].icount + 1
        self.seek_vcpu(vcpu, n)
        if self.m.vcpus[vcpu].icount < n:
            return Stop("end", self.icount, result=self.finished, vcpu=vcpu)
        return Stop("step", self.icount, vcpu=vcpu)

    def _without_exits(self, fn) -> None:
        vcpu = self.m.vcpu
        if not self.breakpoints:
            fn()
            return
        vcpu.set_breakpoints(())
        try:
            fn()
        finally:
            vcpu.set_breakpoints(self.breakpoints)

    def _land_on_breakpoint(self, position: int) -> None:
        """Seek to a breakpoint hit found at ``position`` and stop where the hit happens:
        an interrupt delivered at that position comes before the breakpoint in its handler."""
        self.seek(position)
        if self.breakpoints:
            self.m.run(position + 1)   # stops at the breakpoint, before the instruction retires

    def cont(self, limit: int | None = None, should_stop=None) -> Stop:
        """Run forward to the next breakpoint/watchpoint hit, the end, or ``limit``."""
        m = self.m
        start = self.icount
        end = self.end_icount if self.end_icount is not None else (1 << 62)
        target = end if limit is None else min(limit, end)
        # a vCPU that stands on a breakpoint now steps off it, as INT3 with RF would
        standing = {v.id: pc_of(v) for v in m.vcpus} if self.breakpoints else {}
        first = True
        while self.icount < target:
            if should_stop is not None and should_stop():
                return Stop("interrupted", self.icount)
            self._watch_hits.clear()
            chunk_end = min(target, self.icount + self.interval)
            before = self.icount
            res = self._run_plain(chunk_end)
            hits = [h for h in self._watch_hits if h.icount > before]
            if hits:
                h = hits[0]
                self.seek(h.icount)
                return Stop("watchpoint", self.icount, h, vcpu=h.vcpu)
            if res.reason is StopReason.BREAKPOINT:
                lin = pc_of(m.vcpus[res.vcpu])
                if first and self.icount == start and standing.get(res.vcpu) == lin:
                    self._without_exits(lambda: self._run_plain(self.icount + 1))  # step off the breakpoint
                    first = False
                    continue
                return Stop("breakpoint", self.icount, Hit(self.icount, SW, lin, res.vcpu), vcpu=res.vcpu)
            first = False
            if res.reason is not StopReason.LIMIT:
                return Stop("end", self.icount, result=res)
        return Stop("end" if self.icount >= end else "limit", self.icount, result=self.finished)

    # -- backward -------------------------------------------------------------------------
    def before_last_insn(self, vcpu: int | None = None) -> int | None:
        """The machine position just before the last instruction retired (of the machine,
        or of vCPU ``vcpu``); None if there is none in the recording."""
        if vcpu is None or self.sched is None:
            return self.icount - 1 if self.icount > self.origin else None
        return self.sched.before_insn(vcpu, self.m.vcpus[vcpu].icount)

    def reverse_step(self, vcpu: int | None = None) -> Stop:
        """Un-execute one instruction: the machine's last (``vcpu`` None), or vCPU
        ``vcpu``'s last, with every other vCPU as it was at that moment."""
        at = self.before_last_insn(vcpu)
        if at is None:
            return Stop("start", self.icount, vcpu=vcpu)
        self._without_exits(lambda: self.seek(at))
        who = vcpu if vcpu is not None else (self.sched.vcpu_at(at) if self.sched is not None else 0)
        return Stop("step", self.icount, vcpu=who)

    def _hits_between(self, lo: int, hi: int) -> list[Hit]:
        """Every breakpoint hit at positions in [lo, hi) and every watched access made by
        the instructions retired there, by replaying [lo, hi), in position order."""
        self.seek(lo)
        hits: list[Hit] = []
        m = self.m
        self._watch_hits.clear()
        while self.icount < hi:
            res = self._run_plain(hi)
            if res.reason is StopReason.BREAKPOINT:
                hits.append(Hit(self.icount, SW, pc_of(m.vcpus[res.vcpu]), res.vcpu))
                self._without_exits(lambda: self._run_plain(self.icount + 1))
                continue
            if res.reason is not StopReason.LIMIT:
                break
        # a watch hit's icount is the position after the access: the access itself
        # lies in [lo, hi) when lo < icount <= hi
        hits += [h for h in self._watch_hits if lo < h.icount <= hi]
        hits.sort(key=lambda h: (h.icount - 1 if h.kind >= WRITE else h.icount))
        return hits

    def reverse_cont(self, should_stop=None) -> Stop:
        """Back to the last hit strictly before the current point, or to icount 0."""
        here = self.icount
        hi = here
        while hi > self.origin:
            if should_stop is not None and should_stop():
                self.seek(here)
                return Stop("interrupted", self.icount)
            cp = self.cps.latest_at_or_before(hi - 1)
            lo = cp.icount if cp is not None else self.origin
            hits = self._hits_between(lo, hi) if (self.breakpoints or self.watchpoints) else []
            if hits:
                h = hits[-1]
                if h.kind >= WRITE:
                    self.seek(h.icount - 1)  # before the access, PC on the accessing instruction
                    return Stop("watchpoint", self.icount, h, vcpu=h.vcpu)
                self._land_on_breakpoint(h.icount)
                return Stop("breakpoint", self.icount, h, vcpu=h.vcpu)
            hi = lo
        self.seek(self.origin)
        return Stop("start", self.icount)
