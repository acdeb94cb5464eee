"""The Machine: memory, vCPUs, buses, clock and devices, and the run loop.

One object owns everything; there is no module-level state, so any number of
machines run side by side in one process.  The run loop is the one of
DESIGN.md: run a vCPU to the next deadline, dispatch the exit, inject a
pending interrupt at the next instruction boundary that allows it.

N vCPUs, one deterministic schedule.  The vCPUs share one engine and take
turns in quanta of retired instructions: the vCPU whose turn it is runs until
it has retired ``quantum`` instructions in this turn, halts, or wakes another
vCPU that was idle (an IPI to a halted CPU, so the sender need not spin for a
whole quantum); then the next runnable vCPU in id order takes its turn.
Which vCPU runs, and for how long, is therefore a function of the machine's
state only, and a recording replays with the same interleaving.

Virtual time is machine-wide: the clock counts the instructions retired by
all vCPUs (plus idle time skipped while every vCPU is halted), as QEMU's
icount does in round-robin mode.  Every bus access carries the id of the
vCPU that made it.  Interrupts reach a vCPU only through its ``CpuPins``
(devices/irqchip.py): INTR with an InterruptSource behind it, and latched NMI,
INIT and SIPI.  A vCPU halts, wakes and takes interrupts on its own.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devices.bus import IoBus, MmioBus
from devices.clock import TICK_HZ, VirtualClock
from devices.irqchip import LegacyIrqChip
from vmm.cpu.cpuid import cpuid as fixed_cpuid
from vmm.cpu.delivery import Delivery, GuestFault, TripleFault
from vmm.cpu.engine import Engine
from vmm.cpu.vcpu import HF2_NMI_MASK, Vcpu
from vmm.exits import ExitReason, VmExit
from vmm.memory.dma import DmaView
from vmm.memory.ept import Ept
from vmm.memory.ram import GuestMemory

U64 = 0xFFFF_FFFF_FFFF_FFFF
DEFAULT_QUANTUM = 100_000      # instructions a vCPU retires before the next one takes its turn
MAX_VCPUS = 64

# vCPU run states
RUNNING = "running"    # executing (or ready to)
HALTED = "halted"      # HLT: waits for an interrupt, NMI, INIT or SIPI
WAIT_SIPI = "wait-for-sipi"   # an application processor after INIT: waits for a start-up IPI


class StopReason(enum.Enum):
    EXIT = "exit"                # the guest wrote the debug-exit port
    LIMIT = "limit"              # --max-instructions reached
    SHUTDOWN = "shutdown"        # triple fault
    HALTED = "halted"            # HLT with nothing that could ever wake it
    ERROR = "error"              # the CPU core gave up (e.g. executing outside RAM)
    HOST = "host"                # the host asked to stop (Ctrl-A x, a debugger)
    RESET = "reset"              # the guest requested a system reset (8042 / port 0x92)
    BREAKPOINT = "breakpoint"    # a debugger breakpoint address was reached (before it executes)
    POWEROFF = "poweroff"        # the guest powered the machine off (ACPI S5)


@dataclass
class RunResult:
    reason: StopReason
    icount: int
    status: int = 0
    message: str = ""
    exit: VmExit | None = None
    counts: dict[str, int] = field(default_factory=dict)
    vcpu: int = 0

    def __str__(self) -> str:
        return f"{self.reason.value} after {self.icount} instructions" + (f": {self.message}" if self.message else "")


class Machine:
    def __init__(self, mem_size: int = 32 << 20, mmu: str = "shadow", vcpus: int = 1,
                 quantum: int = DEFAULT_QUANTUM):
        if not 1 <= vcpus <= MAX_VCPUS:
            raise ValueError(f"a machine has 1 to {MAX_VCPUS} vCPUs, not {vcpus}")
        if quantum < 1:
            raise ValueError(f"the scheduling quantum must be at least 1 instruction, not {quantum}")
        self.memory = GuestMemory(mem_size)
        self.ept = Ept(self.memory)  # GPA -> host frame; see vmm/memory/ept.py
        self.engine = Engine(self.memory, mmu=mmu, ept=self.ept)
        self.vcpus = [Vcpu(self.engine, i) for i in range(vcpus)]
        self.vcpu = self.vcpus[0]          # the bootstrap processor
        self.state = [RUNNING] + [WAIT_SIPI] * (vcpus - 1)
        self.quantum = quantum
        self.io = IoBus()
        self.mmio = MmioBus()
        self.mmio.listeners.append(self.engine.mmio_claims_changed)
        self.engine.mmio_handler = self.mmio.access
        self.dma = DmaView(self.ept)
        self.clock = VirtualClock(self._total_now)
        self.clock_hz = TICK_HZ
        self.clock.on_new_deadline = self._new_deadline
        self.deliveries = [Delivery(v) for v in self.vcpus]
        self.delivery = self.deliveries[0]
        self.devices: list[Any] = []
        self.intc: Any | None = None
        self.firmware: Any | None = None
        self.exit_counts: dict[str, int] = {r.value: 0 for r in ExitReason}
        self._stop: tuple[StopReason, int, str] | None = None
        self._in_run = False
        self._running: Vcpu | None = None
        self._others = 0           # instructions retired by the vCPUs not running now
        self._turn = 0             # whose turn it is
        self._turn_end = U64 if vcpus == 1 else quantum   # the running vCPU's icount at which its turn ends
        self._preempt = False
        # (vCPU id, its icount, rip) of the last breakpoint stop: the next run steps over it
        self._over_bp: tuple[int, int, int] | None = None
        self.trace: Callable[[VmExit], None] | None = None
        # common exceptions delivered by the CPU core in C (deliver.c); False: every one
        # is an exit delivered by vmm/cpu/delivery.py (the reference)
        self.fast_delivery = True
        self.on_init: Callable[[Vcpu], None] | None = None   # the platform resets per-CPU devices (LAPIC)
        for v in self.vcpus:
            v.io_handler = self._io_for(v.id)
            v.cpuid = fixed_cpuid
            v.rdtsc = self.clock.now
            v.tsc_offset = self._tsc_offset_of(v)
            v.pins.connect(self._kick)

    # -- time ---------------------------------------------------------------------
    def _tsc_offset_of(self, v: Vcpu) -> Callable[[], int | None]:
        # clock.now() while v runs: the others' count and the idle ticks, which no
        # hook changes, plus v's exact count
        def offset() -> int | None:
            return self._others + self.clock.idle if self._running is v else None
        return offset

    def _total_now(self) -> int:
        r = self._running
        if r is None:
            return sum(v.icount for v in self.vcpus)
        return self._others + r.current_icount()

    @property
    def icount(self) -> int:
        """Instructions retired by all vCPUs together."""
        n = 0
        for v in self.vcpus:
            n += v.icount
        return n

    @property
    def current(self) -> Vcpu:
        """The vCPU running now (or whose turn it is)."""
        return self._running or self.vcpus[self._turn]

    # -- wiring -------------------------------------------------------------------
    def add_device(self, device: Any, io: bool = True) -> Any:
        """Keep a device for reset and saved state, and register its port ranges
        (``io_ranges``) unless ``io`` is False (a device reached through another)."""
        if io:
            for base, length in getattr(device, "io_ranges", ()):
                self.io.register(device, base, length)
        self.devices.append(device)
        return device

    def set_interrupt_controller(self, intc: Any) -> None:
        """A PC without APICs: the 8259 pair drives the BSP's INTR pin."""
        self.intc = intc
        self._legacy_chip = LegacyIrqChip(intc, self.vcpu.pins)

    def start(self, vcpu_id: int) -> None:
        """Let a vCPU run from its current state (a test harness starting an AP directly)."""
        self.state[vcpu_id] = RUNNING

    def _kick(self, vid: int) -> None:
        """A vCPU's interrupt inputs changed (called from a device access or a timer)."""
        v = self.vcpus[vid]
        pins = v.pins
        v.set_irq_pending(pins.intr)
        if not self._in_run:
            return
        if v is self._running:
            if pins.pending_event or (pins.intr and v.if_flag):
                # raised by a device access: take it right after this instruction.  An
                # interrupt raised with IF=0 (an EOI in a handler unmasking the next one)
                # cannot be taken there: the block hook stops at the first block with IF=1,
                # where the stop after this instruction would have led as well
                v.request_stop()
        elif self.state[vid] != RUNNING and self._wakeable(v):
            # an idle vCPU woke up: end the sender's turn so it need not spin
            self._preempt = True
            if self._running is not None:
                self._running.request_stop()

    def _new_deadline(self, tick: int) -> None:
        # a device armed a timer during an I/O access: the running block budget
        # must not carry the vCPU past it
        r = self._running
        if not self._in_run or r is None:
            return
        target = self.clock.ticks_to_icount(tick) - self._others
        core = self.engine._core
        if target < core.budget:
            core.budget = max(target, 0)
            if target < core.icount:
                # due inside the block now executing: stop right after this instruction
                r.request_stop()

    def _io_for(self, vid: int):
        io = self.io

        def handler(is_write: int, port: int, size: int, value: int) -> int:
            if is_write:
                io.write(port, size, value, vid)
                return 0
            return io.read(port, size, vid)
        return handler

    # -- stopping -----------------------------------------------------------------------
    def _request(self, stop: tuple[StopReason, int, str]) -> None:
        self._stop = stop
        if self._running is not None:
            self._running.request_stop()

    def request_exit(self, status: int) -> None:
        """The guest asked to end the run with ``status`` (debug-exit port)."""
        self._request((StopReason.EXIT, status, ""))

    def request_reset(self) -> None:
        self._request((StopReason.RESET, 0, "the guest requested a system reset"))

    def request_poweroff(self) -> None:
        self._request((StopReason.POWEROFF, 0, "the guest powered off (ACPI S5)"))

    def request_host_stop(self, message: str = "stopped by the host") -> None:
        self._request((StopReason.HOST, 0, message))

    # -- scheduling ------------------------------------------------------------------
    @property
    def halted(self) -> bool:
        """Every vCPU is idle (halted or waiting for a start-up IPI)."""
        return all(s != RUNNING for s in self.state)

    def wake(self, vid: int) -> None:
        """End a vCPU's HLT without an interrupt (the firmware's timed wait)."""
        if self.state[vid] == HALTED:
            self.state[vid] = RUNNING

    def _wakeable(self, v: Vcpu) -> bool:
        pins = v.pins
        s = self.state[v.id]
        if s == WAIT_SIPI:
            return pins.init or pins.sipi is not None
        return pins.init or pins.sipi is not None or (pins.nmi and not v.nmi_blocked) or (
            pins.intr and v.if_flag)

    def _stuck(self, v: Vcpu) -> bool:
        """Idle with nothing that could wake it but another CPU (HLT with IF=0, or no SIPI)."""
        s = self.state[v.id]
        return s == WAIT_SIPI or (s == HALTED and not v.if_flag)

    def _ready(self, v: Vcpu) -> bool:
        return self.state[v.id] == RUNNING or self._wakeable(v)

    def _pick(self) -> Vcpu | None:
        """The vCPU to run now, by the round-robin rule; None if all are idle.

        A vCPU that is idle but has something to wake it (an interrupt, an
        NMI, an INIT or a start-up IPI) is ready; its turn deals with it."""
        n = len(self.vcpus)
        cur = self.vcpus[self._turn]
        if self._ready(cur) and (cur.icount < self._turn_end or n == 1) and not self._preempt:
            return cur
        self._preempt = False
        for k in range(1, n + 1):
            v = self.vcpus[(self._turn + k) % n]
            if self._ready(v):
                self._turn = v.id
                self._turn_end = U64 if n == 1 else v.icount + self.quantum
                return v
        return None

    # -- the run loop -------------------------------------------------------------------
    def run(self, max_instructions: int | None = None) -> RunResult:
        """Run until the guest stops, or until the vCPUs together retired ``max_instructions``."""
        self._stop = None
        limit = U64 if max_instructions is None else max_instructions
        clock = self.clock
        while True:
            if self._stop is not None:
                reason, status, msg = self._stop
                return self._result(reason, status, msg)
            total = self.icount
            if total >= limit:
                return self._result(StopReason.LIMIT, 0, f"instruction limit {limit} reached")
            clock.fire_soft_due()      # between turns: the timers with slack
            v = self._pick()
            if v is None:
                if all(self._stuck(x) for x in self.vcpus):
                    if self.state[0] == HALTED:
                        return self._result(StopReason.HALTED, 0,
                                            "the guest halted with interrupts disabled (HLT with IF=0)")
                    return self._result(StopReason.HALTED, 0, "every vCPU is halted with nothing to wake it")
                deadline = clock.next_deadline()
                if deadline is None:
                    return self._result(StopReason.HALTED, 0, "the guest halted and no timer or input can wake it")
                clock.skip_idle_to(deadline)
                clock.fire_due()
                continue
            r = self._turn_of(v, limit - total)
            if r is not None:
                return r

    def _turn_of(self, v: Vcpu, room: int) -> RunResult | None:
        """Let ``v`` run until its next exit (at most ``room`` instructions)."""
        pins = v.pins
        dl = self.deliveries[v.id]
        if pins.init or pins.sipi is not None:
            self._start_events(v)
        if self.state[v.id] == HALTED and self._wakeable(v):
            self.state[v.id] = RUNNING
        if self.state[v.id] != RUNNING:
            return None
        if pins.nmi and not v.nmi_blocked:
            pins.take_nmi()
            try:
                dl.deliver(2, external=True)
            except TripleFault as e:
                return self._result(StopReason.SHUTDOWN, 0, f"triple fault: {e}", vcpu=v.id)
            v.hflags2 = v.hflags2 | HF2_NMI_MASK
            return None
        if pins.intr:
            if v.interruptible():
                vector = pins.acknowledge()
                try:
                    dl.deliver_interrupt(vector, fast=self.fast_delivery and self.trace is None)
                except TripleFault as e:
                    return self._result(StopReason.SHUTDOWN, 0, f"triple fault: {e}", vcpu=v.id)
                v.set_irq_pending(pins.intr)
                return None
            if v.if_flag:
                # STI / MOV SS shadow: one more instruction first (with the
                # block hook's interrupt-window stop off, or it would stop
                # before that instruction forever)
                v.set_irq_pending(False)
                if self._over_bp == (v.id, v.icount, v.rip):
                    self._over_bp = None
                    x = self._lifting_breakpoint(v, lambda: v.step(), fast=False)
                else:
                    # no delivery in C: a fault here is delivered before the interrupt is taken
                    x = self._enter(v, lambda: v.step(), fast=False)
                if x.reason is not ExitReason.DEADLINE:
                    return self._dispatch(v, x)
                return None
            v.set_irq_pending(True)
        deadline = self.clock.next_deadline()
        budget = v.icount + room
        if len(self.vcpus) > 1:
            budget = min(budget, self._turn_end)
        if deadline is not None:
            budget = min(budget, max(v.icount, self.clock.ticks_to_icount(deadline) - (self.icount - v.icount)))
        over = self._over_bp
        if over is not None and over[0] == v.id:
            if over == (v.id, v.icount, v.rip) and budget > v.icount:
                self._over_bp = None
                return self._step_over_breakpoint(v)
            if over != (v.id, v.icount, v.rip):
                self._over_bp = None    # it moved (an interrupt, a register write): a new arrival stops
        x = self._enter(v, lambda: v.run(budget))
        return self._dispatch(v, x)

    def _step_over_breakpoint(self, v: Vcpu) -> RunResult | None:
        """Resume from a breakpoint stop as gdb's `continue` does: execute the
        instruction under the breakpoint with that breakpoint lifted, then put it back."""
        return self._dispatch(v, self._lifting_breakpoint(v, lambda: v.run(v.icount + 1)))

    def _lifting_breakpoint(self, v: Vcpu, go: Callable[[], VmExit], fast: bool = True) -> VmExit:
        bps = v.breakpoints
        here = v.seg(1).base + v.rip
        if here in bps:
            v.set_breakpoints(bps - {here})
        try:
            return self._enter(v, go, fast)
        finally:
            if here in bps:
                v.set_breakpoints(bps)

    def _enter(self, v: Vcpu, go: Callable[[], VmExit], fast: bool = True) -> VmExit:
        self._others = self.icount - v.icount
        self._running = v
        self._in_run = True
        eng = self.engine
        # exceptions the CPU core delivers in C (vmm/cpu/native/deliver.c) count as
        # exception exits, SYSCALL and SYSENTER done there as theirs; with a tracer or
        # introspection each one is a real exit
        eng.fast_delivery = fast and self.fast_delivery and self.trace is None
        before = eng.fast_delivered
        sys_before = eng.fast_sysinsns
        try:
            return go()
        finally:
            counts = self.exit_counts
            counts["exception"] += eng.fast_delivered - before
            sys_after = eng.fast_sysinsns
            counts["syscall"] += sys_after[0] - sys_before[0]
            counts["sysenter"] += sys_after[1] - sys_before[1]
            self._in_run = False
            self._running = None
            if self._preempt:
                self._turn_end = v.icount   # its turn ends here; _pick moves on

    def _start_events(self, v: Vcpu) -> None:
        """INIT and start-up IPIs (SDM vol. 3 8.4 and 10.6.1; MP spec B.4)."""
        pins = v.pins
        if pins.take_init():
            v.reset()
            if self.on_init is not None:
                self.on_init(v)
            # an application processor waits for a SIPI; the BSP starts at the reset vector
            self.state[v.id] = WAIT_SIPI if v.id != 0 else RUNNING
        vec = pins.take_sipi()
        if vec is not None and self.state[v.id] == WAIT_SIPI:
            v.reset(cs=vec << 8, ip=0)
            self.state[v.id] = RUNNING

    def _dispatch(self, v: Vcpu, x: VmExit) -> RunResult | None:
        self.exit_counts[x.reason.value] += 1
        if self.trace is not None:
            self.trace(x)
        reason = x.reason
        dl = self.deliveries[v.id]
        if reason is ExitReason.DEADLINE:
            self.clock.fire_due()
        elif reason is ExitReason.EXCEPTION:
            try:
                dl.deliver(x.vector, x.error_code, software=x.software)
            except TripleFault as e:
                return self._result(StopReason.SHUTDOWN, 0, f"triple fault: {e}", x, vcpu=v.id)
        elif reason is ExitReason.HLT:
            self.state[v.id] = HALTED
        elif reason in (ExitReason.SYSCALL, ExitReason.SYSENTER):
            try:
                if reason is ExitReason.SYSCALL:
                    dl.syscall()
                else:
                    dl.sysenter()
                v.icount = v.icount + 1
            except GuestFault as f:
                try:
                    dl.deliver(f.vector, f.error_code, cr2=f.cr2)
                except TripleFault as e:
                    return self._result(StopReason.SHUTDOWN, 0, f"triple fault: {e}", x, vcpu=v.id)
        elif reason is ExitReason.TRAP:
            if self.firmware is None:
                return self._result(StopReason.ERROR, 0,
                                    f"execution reached the firmware trap range at {x.rip:#x} with no firmware",
                                    x, vcpu=v.id)
            self.firmware.trap(self, x)
        elif reason is ExitReason.BREAKPOINT:
            self._over_bp = (v.id, v.icount, v.rip)
            return self._result(StopReason.BREAKPOINT, 0, f"breakpoint at rip={x.rip:#x}", x, vcpu=v.id)
        elif reason is ExitReason.ERROR:
            return self._result(StopReason.ERROR, 0, f"the CPU stopped at rip={x.rip:#x}: {x.detail}", x,
                                vcpu=v.id)
        return None

    def _result(self, reason: StopReason, status: int, message: str, x: VmExit | None = None,
                vcpu: int = 0) -> RunResult:
        return RunResult(reason, self.icount, status, message, x,
                         {k: v for k, v in self.exit_counts.items() if v}, vcpu)

    def close(self) -> None:
        """Release the CPU engine now (it holds the translation cache)."""
        self.engine.close()

    # -- saved state ---------------------------------------------------------------------
    def device_id(self, device: Any) -> str:
        """The stable id a device's state is saved under."""
        return "dev:" + getattr(device, "name", type(device).__name__)

    def timer_restorers(self) -> dict[str, Callable[[int], None]]:
        """Timers of the machine's own (not a device's) by name, for restoring the clock."""
        return {}

    def save_state(self, ram: bool = True) -> dict[str, Any]:
        """Every part's state as plain data, keyed by stable ids (vmm/state.py).

        ``ram=False`` leaves guest RAM out (checkpoints keep it as page diffs).
        """
        parts: dict[str, Any] = {
            "machine": {"kind": "machine", "version": 1, "vcpus": len(self.vcpus), "state": list(self.state),
                        "turn": self._turn, "turn_end": self._turn_end, "quantum": self.quantum,
                        "mem_size": self.memory.size, "mmu": self.engine.mmu_mode,
                        "exit_counts": dict(self.exit_counts)},
            "clock": self.clock.save_state(),
            "ept": self.ept.save_state(),
        }
        for v in self.vcpus:
            parts[f"vcpu{v.id}"] = v.save_state()
        seen = set()
        for d in self.devices:
            did = self.device_id(d)
            if did in seen:
                raise ValueError(f"two devices save their state under the id {did!r}")
            seen.add(did)
            parts[did] = d.save_state()
        if self.firmware is not None and hasattr(self.firmware, "save_state"):
            parts["firmware"] = self.firmware.save_state()
        if ram:
            parts["ram"] = self.memory.save_state()
        return parts

    def load_state(self, parts: dict[str, Any], extra_restorers: dict | None = None) -> list[str]:
        """Put every part back (the machine must be built the same way: same devices,
        memory size, vCPUs).  ``extra_restorers`` re-create timers of owners outside
        the machine (a replay's digest timer).  Returns the names of saved timers
        nobody re-armed."""
        from devices.base import DeviceStateError

        def part(key: str) -> Any:
            if key not in parts:
                raise DeviceStateError(f"the saved state has no {key!r} part")
            return parts[key]

        ms = part("machine")
        if not isinstance(ms, dict) or ms.get("kind") != "machine" or ms.get("version") != 1:
            raise DeviceStateError("machine: not a machine state of version 1")
        if ms["vcpus"] != len(self.vcpus) or ms["mem_size"] != self.memory.size:
            raise DeviceStateError(f"the saved machine has {ms['vcpus']} vCPUs and {ms['mem_size']} bytes of RAM; "
                                   f"this one {len(self.vcpus)} and {self.memory.size}")
        if "ram" in parts:
            self.memory.load_state(parts["ram"])
        self.ept.load_state(part("ept"))
        for v in self.vcpus:
            v.load_state(part(f"vcpu{v.id}"))
        self.state = [str(s) for s in ms["state"]]
        if len(self.state) != len(self.vcpus) or any(s not in (RUNNING, HALTED, WAIT_SIPI) for s in self.state):
            raise DeviceStateError("machine: bad vCPU run states")
        self._over_bp = None
        self._turn = int(ms["turn"]) % len(self.vcpus)
        self._turn_end = int(ms["turn_end"])
        self.quantum = int(ms["quantum"])
        self.exit_counts.update({str(k): int(n) for k, n in dict(ms.get("exit_counts", {})).items()})
        try:
            self.clock.load_state(part("clock"))
        except (ValueError, TypeError, KeyError) as e:
            raise DeviceStateError(f"clock: {e}") from None
        for d in self.devices:
            d.load_state(part(self.device_id(d)))
        if self.firmware is not None and hasattr(self.firmware, "load_state"):
            self.firmware.load_state(part("firmware"))
        self.engine.invalidate_code()
        restorers = dict(self.timer_restorers())
        if self.firmware is not None and hasattr(self.firmware, "timer_restorers"):
            restorers.update(self.firmware.timer_restorers())
        restorers.update(extra_restorers or {})
        return self.clock.finish_restore(restorers)
