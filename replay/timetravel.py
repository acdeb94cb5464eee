"""Time travel over a recording: seek to any icount, step and continue backwards.

Forward execution is a replay of the log (inputs from the log, digests
checked).  While replaying forward, a checkpoint is taken every ``interval``
instructions, so going to any earlier point costs one checkpoint restore plus
at most ``interval`` instructions of forward replay.

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

Breakpoints never modify guest memory (they use Unicorn's exit set), and
watchpoints are memory hooks, so neither changes what the guest computes.
"""
from __future__ import annotations

from dataclasses import dataclass

from replay.checkpoint import Checkpoints
from replay.session import Replayer
from vmm.machine import RunResult, StopReason

DEFAULT_INTERVAL = 2_000_000
MAX_INTERVAL = 20_000_000        # ~0.2 s of forward replay: the most any reverse step costs
TARGET_CHECKPOINTS = 256


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


@dataclass
class Stop:
    reason: str      # "breakpoint", "watchpoint", "step", "end", "start", "limit"
    icount: int
    hit: Hit | None = None
    result: RunResult | None = None


class TimeTravel:
    def __init__(self, log_path: str, image: bytes | None = None, interval: int | None = None,
                 serial=None):
        self.rp = Replayer(log_path, image=image, serial=serial)
        self.m = self.rp.m
        # None: adapt to the recording's length (see adaptive_interval)
        self.interval = interval if interval is not None else adaptive_interval(self.rp.end_icount)
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

    def _run_plain(self, target: int) -> RunResult:
        """Forward to ``target`` (or the end), checkpointing on the way."""
        m = self.m
        while m.icount < target:
            last = self.cps.list[-1].icount
            nxt = min(target, last + self.interval) if last + self.interval > m.icount else target
            res = m.run(nxt)
            if res.reason is StopReason.BREAKPOINT:
                return res
            if res.reason is not StopReason.LIMIT:
                self.finished = res
                return res
            if m.icount >= last + self.interval:
                self.cps.take()
        return RunResult(StopReason.LIMIT, m.icount)

    def seek(self, target: int) -> int:
        """Put the machine at exactly ``target`` retired instructions (or the end)."""
        target = max(target, 0)
        if self.end_icount is not None:
            target = min(target, self.end_icount)
        cur = self.icount
        cp = self.cps.latest_at_or_before(target)
        if target < cur or (cp is not None and cp.icount > cur):
            self.cps.restore(cp)
            self.finished = None
        self._without_exits(lambda: self._run_plain(target))  # a seek passes breakpoints by
        return self.icount

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

        def hook(access, address, size, value):
            if kind == WRITE and access == vcpu.ACCESS_WRITE and self._unchanged(address, size, value):
                return  # gdb's `watch` reports a write only when it changes the value
            # record the instruction now executing; the stop point is just after it
            self._watch_hits.append(Hit(self.m.clock.now() - self.m.clock.idle + 1, kind, address))

        self.watchpoints[(kind, addr, length)] = vcpu.add_watch_hook(kinds, addr, addr + length - 1, hook)

    def _unchanged(self, address: int, size: int, value: int) -> bool:
        """Does this store write the bytes memory already holds? (Called before the store.)"""
        vcpu = self.m.vcpu
        try:
            pa = vcpu.translate(address, "r", user=False, set_ad=False)
            if (pa & 0xFFF) + size > 0x1000:
                return False
            old = self.m.memory.read(pa, size)
        except Exception:  # noqa: BLE001 - unmapped: the store itself will fault; report it
            return False
        return old == (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def remove_watchpoint(self, kind: int, addr: int, length: int) -> None:
        h = self.watchpoints.pop((kind, addr, length), None)
        if h is not None:
            self.m.vcpu.remove_hook(h)

    # -- forward ------------------------------------------------------------------------
    def step(self) -> Stop:
        if self.end_icount is not None and self.icount >= self.end_icount:
            return Stop("end", self.icount, result=self.finished)
        self._without_exits(lambda: self.seek(self.icount + 1))
        return Stop("step", self.icount)

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

    def cont(self, limit: int | None = None, should_stop=None) -> Stop:
        """Run forward to the next breakpoint/watchpoint hit, the end, or ``limit``."""
        m = self.m
        start = self.icount
        end = self.end_icount if self.end_icount is not None else (1 << 62)
        target = end if limit is None else min(limit, end)
        first = True
        while self.icount < target:
            if should_stop is not None and should_stop():
                return Stop("interrupted", self.icount)
            lin = m.vcpu.seg(1).base + m.vcpu.rip
            if first and lin in self.breakpoints:
                self._without_exits(lambda: self.seek(self.icount + 1))  # step off the breakpoint
                first = False
                continue
            first = False
            self._watch_hits.clear()
            chunk_end = min(target, self.icount + self.interval)
            before = self.icount
            res = self._run_plain(chunk_end)
            hits = [h for h in self._watch_hits if h.icount > before]
            if hits:
                h = hits[0]
                self.seek(h.icount)
                return Stop("watchpoint", self.icount, h)
            lin = m.vcpu.seg(1).base + m.vcpu.rip
            if res.reason is StopReason.BREAKPOINT:
                return Stop("breakpoint", self.icount, Hit(self.icount, SW, lin))
            if res.reason is not StopReason.LIMIT:
                return Stop("end", self.icount, result=res)
        del start
        return Stop("end" if self.icount >= end else "limit", self.icount, result=self.finished)

    # -- backward -------------------------------------------------------------------------
    def reverse_step(self) -> Stop:
        if self.icount == 0:
            return Stop("start", 0)
        self._without_exits(lambda: self.seek(self.icount - 1))
        return Stop("step", self.icount)

    def _hits_between(self, lo: int, hi: int) -> list[Hit]:
        """Every breakpoint/watchpoint hit at positions in (lo, hi), by replaying [lo, hi)."""
        self.seek(lo)
        hits: list[Hit] = []
        m = self.m
        self._watch_hits.clear()
        while self.icount < hi:
            lin = m.vcpu.seg(1).base + m.vcpu.rip
            if lin in self.breakpoints and self.icount > lo:
                hits.append(Hit(self.icount, SW, lin))
            if lin in self.breakpoints:
                self._without_exits(lambda: self._run_plain(self.icount + 1))
                continue
            res = self._run_plain(hi)
            if res.reason not in (StopReason.LIMIT, StopReason.BREAKPOINT):
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
        while hi > 0:
            if should_stop is not None and should_stop():
                self.seek(here)
                return Stop("interrupted", self.icount)
            cp = self.cps.latest_at_or_before(hi - 1)
            lo = cp.icount if cp is not None else 0
            hits = self._hits_between(lo, hi) if (self.breakpoints or self.watchpoints) else []
            if lo == 0 and (self.breakpoints or self.watchpoints):
                # a breakpoint exactly at the start counts too
                self.seek(0)
                lin = self.m.vcpu.seg(1).base + self.m.vcpu.rip
                if lin in self.breakpoints and not hits and hi > 0:
                    hits = [Hit(0, SW, lin)]
            if hits:
                h = hits[-1]
                if h.kind >= WRITE:
                    self.seek(h.icount - 1)  # before the access, PC on the accessing instruction
                    return Stop("watchpoint", self.icount, h)
                self.seek(h.icount)
                return Stop("breakpoint", self.icount, h)
            hi = lo
        self.seek(0)
        return Stop("start", 0)
