"""The gdb stub's targets: a replay (`ReplayTarget`, with reverse execution,
backed by `TimeTravel`) and a live machine (`LiveTarget`, forward only).

Reads never disturb the guest: guest-virtual reads walk the guest's page
tables without setting accessed/dirty bits.  On a replay, writes to registers
or memory are refused (they would make the replay diverge from its
recording); on a live run they are allowed.

Both targets show every vCPU of the machine as a thread (`VcpuThreads` in
replay/target.py): registers, guest-virtual memory and single steps are those
of the selected vCPU, and a stop names the vCPU that hit the breakpoint or
made the watched access.
"""
from __future__ import annotations

from collections.abc import Callable

from replay.target import (
    BP_HARDWARE,
    BP_SOFTWARE,
    WATCH_ACCESS,
    WATCH_READ,
    WATCH_WRITE,
    StopEvent,
    TargetMemoryError,
)
from replay.timetravel import Schedule, Stop, TimeTravel
from vmm.cpu.vcpu import CS, DS, ES, FS, GS, SS
from vmm.memory.paging import PageFault
from vmm.memory.ram import GuestMemoryError

I386_GPRS = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
X64_GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


_RUN_STATES = {"running": "running", "halted": "halted", "wait-for-sipi": "wait-for-SIPI"}


class _Inspect:
    """Register and memory reads, and the vCPU threads, shared by both targets
    (``self.m`` is the machine)."""

    arch: str
    m: object
    selected: int = 0

    # -- vCPUs as threads -----------------------------------------------------------
    @property
    def cpu(self):
        return self.m.vcpus[self.selected]

    def threads(self) -> list[int]:
        return list(range(len(self.m.vcpus)))

    def select(self, vcpu: int) -> None:
        if not 0 <= vcpu < len(self.m.vcpus):
            raise ValueError(f"no vCPU {vcpu}")
        self.selected = vcpu

    def thread_info(self, vcpu: int) -> str:
        state = _RUN_STATES.get(self.m.state[vcpu], self.m.state[vcpu])
        return f"vCPU {vcpu}, {state}"

    def _vcpu_lines(self) -> str:
        return "".join(f"  vCPU {v.id}: {v.icount} instructions, {_RUN_STATES.get(s, s)}\n"
                       for v, s in zip(self.m.vcpus, self.m.state))

    def read_registers(self) -> dict[str, int]:
        cpu = self.cpu
        r: dict[str, int] = {}
        if self.arch == "i386":
            for i, n in enumerate(I386_GPRS):
                r[n] = cpu.gpr(i) & 0xFFFF_FFFF
            r["eip"] = cpu.rip & 0xFFFF_FFFF
        else:
            for i, n in enumerate(X64_GPRS):
                r[n] = cpu.gpr(i)
            r["rip"] = cpu.rip
            r["fs_base"] = cpu.seg(FS).base
            r["gs_base"] = cpu.seg(GS).base
            r["efer"] = cpu.efer
            r["cr8"] = 0
        r["eflags"] = cpu.rflags & 0xFFFF_FFFF
        for name, seg in (("cs", CS), ("ss", SS), ("ds", DS), ("es", ES), ("fs", FS), ("gs", GS)):
            r[name] = cpu.seg(seg).selector
        r["cr0"], r["cr2"], r["cr3"], r["cr4"] = cpu.cr0, cpu.cr2, cpu.cr3, cpu.cr4
        return r

    def read_memory(self, addr: int, length: int, physical: bool = False) -> bytes:
        m = self.m
        cpu = self.cpu
        out = bytearray()
        a = addr
        end = addr + length
        while a < end:
            n = min(end - a, 0x1000 - (a & 0xFFF))
            try:
                pa = a if physical else cpu.translate(a, "r", user=False, set_ad=False)
                out += m.memory.read(pa, n)
            except (PageFault, GuestMemoryError):
                raise TargetMemoryError(f"{'physical' if physical else 'virtual'} address {a:#x} is not mapped") from None
            a += n
        return bytes(out)


class ReplayTarget(_Inspect):
    supports_reverse = True

    def __init__(self, tt: TimeTravel, arch: str | None = None):
        self.tt = tt
        self.m = tt.m
        cpu = tt.m.vcpu
        self.arch = arch or ("x86-64" if cpu.long_mode else "i386")
        self.selected = 0

    def write_register(self, name: str, value: int) -> None:
        raise KeyError(f"{name}: registers are read-only while replaying (a write would diverge from the recording)")

    def write_memory(self, addr: int, data: bytes, physical: bool = False) -> None:
        raise TargetMemoryError("guest memory is read-only while replaying (a write would diverge)")

    # -- execution ---------------------------------------------------------------
    @property
    def _stepped(self) -> int | None:
        """The vCPU a single step applies to (None: the one vCPU of the machine)."""
        return self.selected if len(self.m.vcpus) > 1 else None

    def _event(self, s: Stop) -> StopEvent:
        if s.reason == "breakpoint":
            return StopEvent("breakpoint", kind=BP_SOFTWARE, vcpu=s.vcpu)
        if s.reason == "watchpoint" and s.hit is not None:
            return StopEvent("watchpoint", kind=s.hit.kind, addr=s.hit.addr, vcpu=s.hit.vcpu)
        if s.reason == "start":
            return StopEvent("replay-start")
        if s.reason == "end":
            return StopEvent("replay-end")
        if s.reason == "interrupted":
            return StopEvent("signal", signal=2)
        return StopEvent("step", vcpu=s.vcpu)

    def step(self) -> StopEvent:
        tt = self.tt
        k = self._stepped
        tt._watch_hits.clear()
        s = tt.step(vcpu=k)
        if s.reason == "end":
            return StopEvent("replay-end")
        hits = [h for h in tt._watch_hits if h.icount == tt.icount and (k is None or h.vcpu == k)]
        if hits:
            return StopEvent("watchpoint", kind=hits[0].kind, addr=hits[0].addr, vcpu=hits[0].vcpu)
        return StopEvent("step", vcpu=k)

    def resume(self, should_stop: Callable[[], bool]) -> StopEvent:
        return self._event(self.tt.cont(should_stop=should_stop))

    def reverse_step(self) -> StopEvent:
        tt = self.tt
        k = self._stepped
        target = tt.before_last_insn(k)
        if target is None:
            return StopEvent("replay-start")
        if tt.watchpoints:
            hits = [h for h in tt._hits_between(target, target + 1) if h.kind >= WATCH_WRITE]
            tt.seek(target)
            if hits:
                return StopEvent("watchpoint", kind=hits[0].kind, addr=hits[0].addr, vcpu=hits[0].vcpu)
            return StopEvent("step", vcpu=k)
        tt.reverse_step(vcpu=k)
        return StopEvent("step", vcpu=k)

    def reverse_resume(self, should_stop: Callable[[], bool]) -> StopEvent:
        return self._event(self.tt.reverse_cont(should_stop=should_stop))

    def add_breakpoint(self, kind: int, addr: int, length: int) -> bool:
        if kind in (BP_SOFTWARE, BP_HARDWARE):
            self.tt.add_breakpoint(addr)
            return True
        if kind in (WATCH_WRITE, WATCH_READ, WATCH_ACCESS):
            self.tt.add_watchpoint(kind, addr, max(1, length))
            return True
        raise NotImplementedError(kind)

    def remove_breakpoint(self, kind: int, addr: int, length: int) -> bool:
        if kind in (BP_SOFTWARE, BP_HARDWARE):
            self.tt.remove_breakpoint(addr)
            return True
        if kind in (WATCH_WRITE, WATCH_READ, WATCH_ACCESS):
            self.tt.remove_watchpoint(kind, addr, max(1, length))
            return True
        raise NotImplementedError(kind)

    # -- monitor commands ------------------------------------------------------------
    def monitor(self, command: str) -> str:
        tt = self.tt
        words = command.split()
        smp = len(self.m.vcpus) > 1
        if not words or words[0] == "help":
            return ("monitor commands: icount | seek ICOUNT | checkpoints | info exits | "
                    "phys ADDR LEN (read guest-physical memory)"
                    + (" | seek vcpu N ICOUNT (where vCPU N has retired ICOUNT instructions) | "
                       "schedule [TURNS] (the vCPUs' turns up to here)" if smp else "") + "\n")
        if words[0] == "icount":
            end = tt.end_icount
            line = f"icount {tt.icount}" + (f" of {end}" if end is not None else "")
            if not smp:
                return line + "\n"
            return line + " (machine position: all vCPUs together)\n" + self._vcpu_lines()
        if words[0] == "seek" and len(words) == 2:
            try:
                n = int(words[1].replace("_", ""), 0)
            except ValueError:
                return f"seek: not a number: {words[1]}\n"
            tt.seek(n)
            return f"at icount {tt.icount}\n"
        if words[:2] == ["seek", "vcpu"] and len(words) == 4:
            try:
                vid, n = int(words[2], 0), int(words[3].replace("_", ""), 0)
            except ValueError:
                return "seek vcpu: want a vCPU number and an icount\n"
            if not 0 <= vid < len(self.m.vcpus):
                return f"seek vcpu: no vCPU {vid}\n"
            tt.seek_vcpu(vid, n)
            return (f"at icount {tt.icount}: vCPU {vid} has retired "
                    f"{self.m.vcpus[vid].icount} instructions\n")
        if words[0] == "schedule" and smp:
            try:
                count = int(words[1]) if len(words) > 1 else 10
            except ValueError:
                return f"schedule: not a number: {words[1]}\n"
            turns = tt.sched.turns(tt.sched.origin, tt.icount + 1)[-count:]
            return "".join(f"  at {pos}: vCPU {vid} from its icount {base}, {n} instructions\n"
                           for pos, vid, base, n in turns) or "no turns yet\n"
        if words[0] == "checkpoints":
            lines = [(f"{len(tt.cps.list)} checkpoints, {tt.cps.bytes / 1e6:.1f} MB of RAM pages, "
                     f"every {tt.interval} instructions")]
            lines += [f"  #{c.index}: icount {c.icount}" + (" (keyframe)" if c.keyframe is not None else
                                                           f" ({len(c.diff)} pages)") for c in tt.cps.list[:50]]
            return "\n".join(lines) + "\n"
        if words[:2] == ["info", "exits"]:
            counts = tt.m.exit_counts
            return "".join(f"{k:>12} {v}\n" for k, v in counts.items() if v) or "no exits yet\n"
        if words[0] == "phys" and len(words) == 3:
            try:
                a, n = int(words[1], 0), min(int(words[2], 0), 4096)
                data = self.read_memory(a, n, physical=True)
            except (ValueError, TargetMemoryError) as e:
                return f"phys: {e}\n"
            return "".join(f"{a + i:#010x}: {data[i:i + 16].hex(' ')}\n" for i in range(0, len(data), 16))
        return f"unknown monitor command: {command} (try: monitor help)\n"

    def detach(self) -> None:
        pass

    def kill(self) -> None:
        pass


def _stores_same(m, cpu, address: int, size: int, value: int) -> bool:
    """Does this store write the bytes memory already holds? (Called before the store.)"""
    try:
        pa = cpu.translate(address, "r", user=False, set_ad=False)
        if (pa & 0xFFF) + size > 0x1000:
            return False
        old = m.memory.read(pa, size)
    except (PageFault, GuestMemoryError):
        return False   # unmapped: the store itself will fault; report it
    return old == (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


class LiveTarget(_Inspect):
    """gdb on a live run: forward execution, breakpoints, register and memory writes.

    Data watchpoints (Z2/Z3/Z4) are memory hooks, never page protection: a hit
    is noted during the access and the run stops right after the accessing
    instruction (a code hook on every instruction, present only while a
    watchpoint is set: the guest then runs under 1 MIPS); reverse execution
    needs a recording (`vmm replay --gdb`).
    With several vCPUs a single step runs the machine until the selected vCPU
    retired one instruction (`Schedule.arm` cuts its run there).
    """

    supports_reverse = False
    CHUNK = 1_000_000  # instructions between checks for Ctrl-C
    STEP_LIMIT = 50_000_000   # a step of a vCPU that does not run for this long stops anyway (SIGINT)

    def __init__(self, machine, arch: str | None = None):
        self.m = machine
        self.arch = arch or ("x86-64" if machine.vcpu.long_mode else "i386")
        self.breakpoints: set[int] = set()
        self.exited = None
        self.selected = 0
        self.sched = Schedule(machine, learn=False) if len(machine.vcpus) > 1 else None
        self.watchpoints: dict[tuple[int, int, int], object] = {}   # (kind, addr, len) -> hook handle
        self._watch_hit: tuple[int, int, int] | None = None          # (kind, address, vCPU) of a hit
        self._stop_hook = None

    def write_register(self, name: str, value: int) -> None:
        cpu = self.cpu
        names = dict(zip(I386_GPRS, X64_GPRS[:8])) | {n: n for n in X64_GPRS}
        if name in names:
            reg = names[name]
            old = cpu.reg(reg)
            cpu.set_reg(reg, (old & ~0xFFFF_FFFF) | (value & 0xFFFF_FFFF) if name in I386_GPRS else value)
        elif name in ("eip", "rip"):
            cpu.rip = value
        elif name == "eflags":
            cpu.rflags = value
        else:
            raise KeyError(f"{name}: not writable from gdb")
        cpu.invalidate_code()

    def write_memory(self, addr: int, data: bytes, physical: bool = False) -> None:
        m = self.m
        cpu = self.cpu
        off = 0
        while off < len(data):
            a = addr + off
            n = min(len(data) - off, 0x1000 - (a & 0xFFF))
            try:
                pa = a if physical else cpu.translate(a, "w", user=False, set_ad=False)
                m.memory.write(pa, data[off:off + n])
            except (PageFault, GuestMemoryError):
                raise TargetMemoryError(f"address {a:#x} is not mapped") from None
            off += n

    def _run(self, limit: int | None, bps: bool) -> StopEvent | None:
        m = self.m
        m.vcpu.set_breakpoints(self.breakpoints if bps else ())
        res = m.run(limit)
        reason = res.reason.value
        hit, self._watch_hit = self._watch_hit, None
        if hit is not None and reason in ("limit", "breakpoint"):   # stopped right after the access
            return StopEvent("watchpoint", kind=hit[0], addr=hit[1], vcpu=hit[2])
        if reason == "limit":
            return None
        if reason == "breakpoint":
            return StopEvent("breakpoint", kind=BP_SOFTWARE, vcpu=res.vcpu)
        if reason == "host" and self.sched is not None and self.sched.fired:
            self.sched.fired = False
            return StopEvent("step", vcpu=self.selected)
        self.exited = res
        return StopEvent("exited", exit_status=res.status if reason == "exit" else 0)

    def step(self) -> StopEvent:
        if self.exited is not None:
            return StopEvent("exited", exit_status=self.exited.status)
        if self.sched is None:
            ev = self._run(self.m.icount + 1, bps=False)
            return ev or StopEvent("step")
        self.sched.arm(self.selected, self.cpu.icount + 1)
        try:
            ev = self._run(self.m.icount + self.STEP_LIMIT, bps=False)
        finally:
            self.sched.disarm()
        return ev or StopEvent("signal", signal=2, vcpu=self.selected)

    def resume(self, should_stop: Callable[[], bool]) -> StopEvent:
        if self.exited is not None:
            return StopEvent("exited", exit_status=self.exited.status)
        while True:
            if should_stop():
                return StopEvent("signal", signal=2)
            ev = self._run(self.m.icount + self.CHUNK, bps=True)
            if ev is not None:
                return ev

    def reverse_step(self) -> StopEvent:
        raise NotImplementedError("reverse execution needs a recording: vmm replay LOG --gdb")

    def reverse_resume(self, should_stop: Callable[[], bool]) -> StopEvent:
        raise NotImplementedError("reverse execution needs a recording: vmm replay LOG --gdb")

    def add_breakpoint(self, kind: int, addr: int, length: int) -> bool:
        if kind in (BP_SOFTWARE, BP_HARDWARE):
            self.breakpoints.add(addr)
            return True
        if kind in (WATCH_WRITE, WATCH_READ, WATCH_ACCESS):
            self._add_watchpoint(kind, addr, max(1, length))
            return True
        raise NotImplementedError(kind)

    def remove_breakpoint(self, kind: int, addr: int, length: int) -> bool:
        if kind in (BP_SOFTWARE, BP_HARDWARE):
            self.breakpoints.discard(addr)
            return True
        if kind in (WATCH_WRITE, WATCH_READ, WATCH_ACCESS):
            h = self.watchpoints.pop((kind, addr, max(1, length)), None)
            if h is not None:
                self.m.vcpu.remove_linear_watch(h)
            if not self.watchpoints and self._stop_hook is not None:
                self.m.vcpu.engine.watch_stops(False)
                self._stop_hook = None
            return True
        raise NotImplementedError(kind)

    def _add_watchpoint(self, kind: int, addr: int, length: int) -> None:
        m = self.m
        vcpu = m.vcpu
        kinds = {WATCH_WRITE: vcpu.WATCH_WRITE, WATCH_READ: vcpu.WATCH_READ,
                 WATCH_ACCESS: vcpu.WATCH_READ | vcpu.WATCH_WRITE}[kind]

        def on_access(access, address, size, value):
            if self._watch_hit is not None:
                return
            who = m.current
            if kind == WATCH_WRITE and access == vcpu.ACCESS_WRITE and _stores_same(m, who, address, size, value):
                return  # gdb's `watch` reports a write only when it changes the value
            self._watch_hit = (kind, address, who.id)
            # stop before the next instruction (a BREAKPOINT exit; the C check in watch.c)
            vcpu.engine.stop_after_access()

        key = (kind, addr, length)
        if key in self.watchpoints:
            return
        # gdb's addresses are linear: the watch follows them to whatever frame they map to
        self.watchpoints[key] = vcpu.add_linear_watch(kinds, addr, addr + length - 1, on_access)
        if self._stop_hook is None:
            vcpu.engine.watch_stops(True)
            self._stop_hook = True

    def monitor(self, command: str) -> str:
        words = command.split()
        if words[:1] == ["icount"]:
            if len(self.m.vcpus) == 1:
                return f"icount {self.m.icount}\n"
            return f"icount {self.m.icount} (all vCPUs together)\n" + self._vcpu_lines()
        if words[:2] == ["info", "exits"]:
            return "".join(f"{k:>12} {v}\n" for k, v in self.m.exit_counts.items() if v) or "no exits yet\n"
        return "monitor commands on a live run: icount | info exits (record and replay for time travel)\n"

    def detach(self) -> None:
        pass

    def kill(self) -> None:
        pass
