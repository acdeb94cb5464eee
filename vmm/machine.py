"""The Machine: memory, vCPU, buses, clock and devices, and the run loop.

One object owns everything; there is no module-level state, so any number of
machines run side by side in one process.  The run loop is the one of
DESIGN.md: run the vCPU to the next deadline, dispatch the exit, inject a
pending interrupt at the next instruction boundary that allows it.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devices.bus import IoBus, MmioBus
from devices.clock import TICK_HZ, VirtualClock
from vmm.cpu.cpuid import cpuid as fixed_cpuid
from vmm.cpu.delivery import Delivery, GuestFault, TripleFault
from vmm.memory.ept import Ept
from vmm.exits import ExitReason, VmExit
from vmm.memory.ram import GuestMemory
from vmm.cpu.vcpu import Vcpu

U64 = 0xFFFF_FFFF_FFFF_FFFF


class StopReason(enum.Enum):
    EXIT = "exit"                # the guest wrote the debug-exit port
    LIMIT = "limit"              # --max-instructions reached
    SHUTDOWN = "shutdown"        # triple fault
    HALTED = "halted"            # HLT with nothing that could ever wake it
    ERROR = "error"              # the CPU core gave up (e.g. executing outside RAM)
    HOST = "host"                # the host asked to stop (Ctrl-A x, a debugger)
    RESET = "reset"              # the guest requested a system reset (8042 / port 0x92)
    BREAKPOINT = "breakpoint"    # a debugger breakpoint address was reached (before it executes)


@dataclass
class RunResult:
    reason: StopReason
    icount: int
    status: int = 0
    message: str = ""
    exit: VmExit | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.reason.value} after {self.icount} instructions" + (f": {self.message}" if self.message else "")


class InterruptController:
    """What the machine needs of the chip that talks to the CPU's INTR pin."""

    intr: bool
    on_intr_change: Callable[[bool], None] | None

    def acknowledge(self) -> int: ...


class Machine:
    def __init__(self, mem_size: int = 32 << 20, mmu: str = "shadow"):
        self.memory = GuestMemory(mem_size)
        self.ept = Ept(self.memory)  # GPA -> host frame; see vmm/memory/ept.py
        self.vcpu = Vcpu(self.memory, mmu=mmu, ept=self.ept)
        self.io = IoBus()
        self.mmio = MmioBus()
        self.clock = VirtualClock(self.vcpu.current_icount)
        self.clock_hz = TICK_HZ
        self.clock.on_new_deadline = self._new_deadline
        self.delivery = Delivery(self.vcpu)
        self.devices: list[Any] = []
        self.intc: Any | None = None
        self.halted = False
        self.firmware: Any | None = None
        self.exit_counts: dict[str, int] = {r.value: 0 for r in ExitReason}
        self._stop: tuple[StopReason, int, str] | None = None
        self._in_run = False
        self.trace: Callable[[VmExit], None] | None = None
        self.vcpu.io_handler = self._io
        self.vcpu.cpuid = fixed_cpuid
        self.vcpu.rdtsc = self.clock.now

    # -- wiring -------------------------------------------------------------------
    def add_device(self, device: Any) -> Any:
        """Register a device's port ranges (``io_ranges``) and keep it for reset/state."""
        for base, length in getattr(device, "io_ranges", ()):
            self.io.register(device, base, length)
        self.devices.append(device)
        return device

    def set_interrupt_controller(self, intc: Any) -> None:
        self.intc = intc
        intc.on_intr_change = self._intr_changed

    def _intr_changed(self, level: bool) -> None:
        if level:
            self.vcpu.set_irq_pending(True)
            if self._in_run:
                # raised by an I/O access: take it right after this instruction
                self.vcpu.request_stop()
        else:
            self.vcpu.set_irq_pending(False)

    def _new_deadline(self, tick: int) -> None:
        # a device armed a timer during an I/O access: the running block budget
        # must not carry the vCPU past it
        if not self._in_run:
            return
        icount = self.clock.ticks_to_icount(tick)
        core = self.vcpu._core
        if icount < core.budget:
            core.budget = icount
            if icount < core.icount:
                # due inside the block now executing: stop right after this instruction
                self.vcpu.request_stop()

    def _io(self, is_write: int, port: int, size: int, value: int) -> int:
        if is_write:
            self.io.write(port, size, value)
            return 0
        return self.io.read(port, size)

    # -- stopping -----------------------------------------------------------------------
    def request_exit(self, status: int) -> None:
        """The guest asked to end the run with ``status`` (debug-exit port)."""
        self._stop = (StopReason.EXIT, status, "")
        self.vcpu.request_stop()

    def request_reset(self) -> None:
        self._stop = (StopReason.RESET, 0, "the guest requested a system reset")
        self.vcpu.request_stop()

    def request_host_stop(self, message: str = "stopped by the host") -> None:
        self._stop = (StopReason.HOST, 0, message)
        self.vcpu.request_stop()

    # -- the run loop -------------------------------------------------------------------
    def run(self, max_instructions: int | None = None) -> RunResult:
        vcpu = self.vcpu
        clock = self.clock
        self._stop = None
        limit = U64 if max_instructions is None else max_instructions
        while True:
            if self._stop is not None:
                reason, status, msg = self._stop
                return self._result(reason, status, msg)
            if vcpu.icount >= limit:
                return self._result(StopReason.LIMIT, 0, f"instruction limit {limit} reached")
            intc = self.intc
            if intc is not None and intc.intr:
                if vcpu.interruptible():
                    self.halted = False
                    vector = intc.acknowledge()
                    try:
                        self.delivery.deliver(vector, external=True)
                    except TripleFault as e:
                        return self._result(StopReason.SHUTDOWN, 0, f"triple fault: {e}")
                    vcpu.set_irq_pending(bool(intc.intr))
                    continue
                if vcpu.if_flag and not self.halted:
                    # STI / MOV SS shadow: one more instruction first (with the
                    # block hook's interrupt-window stop off, or it would stop
                    # before that instruction forever)
                    vcpu.set_irq_pending(False)
                    x = vcpu.step()
                    if x.reason is not ExitReason.DEADLINE:
                        r = self._dispatch(x)
                        if r is not None:
                            return r
                    continue
                vcpu.set_irq_pending(True)
            deadline = clock.next_deadline()
            if self.halted:
                if not vcpu.if_flag:
                    return self._result(StopReason.HALTED, 0, "the guest halted with interrupts disabled (HLT with IF=0)")
                if deadline is None:
                    return self._result(StopReason.HALTED, 0, "the guest halted and no timer or input can wake it")
                clock.skip_idle_to(deadline)
                clock.fire_due()
                continue
            budget = limit
            if deadline is not None:
                budget = min(budget, max(vcpu.icount, clock.ticks_to_icount(deadline)))
            self._in_run = True
            try:
                x = vcpu.run(budget)
            finally:
                self._in_run = False
            r = self._dispatch(x)
            if r is not None:
                return r

    def _dispatch(self, x: VmExit) -> RunResult | None:
        self.exit_counts[x.reason.value] += 1
        if self.trace is not None:
            self.trace(x)
        reason = x.reason
        if reason is ExitReason.DEADLINE:
            self.clock.fire_due()
        elif reason is ExitReason.EXCEPTION:
            try:
                self.delivery.deliver(x.vector, x.error_code, software=x.software)
            except TripleFault as e:
                return self._result(StopReason.SHUTDOWN, 0, f"triple fault: {e}", x)
        elif reason is ExitReason.HLT:
            self.halted = True
        elif reason in (ExitReason.SYSCALL, ExitReason.SYSENTER):
            try:
                if reason is ExitReason.SYSCALL:
                    self.delivery.syscall()
                else:
                    self.delivery.sysenter()
                self.vcpu.icount = self.vcpu.icount + 1
            except GuestFault as f:
                try:
                    self.delivery.deliver(f.vector, f.error_code, cr2=f.cr2)
                except TripleFault as e:
                    return self._result(StopReason.SHUTDOWN, 0, f"triple fault: {e}", x)
        elif reason is ExitReason.TRAP:
            if self.firmware is None:
                return self._result(StopReason.ERROR, 0, f"execution reached the firmware trap range at {x.rip:#x} with no firmware", x)
            self.firmware.trap(self, x)
        elif reason is ExitReason.BREAKPOINT:
            return self._result(StopReason.BREAKPOINT, 0, f"breakpoint at rip={x.rip:#x}", x)
        elif reason is ExitReason.ERROR:
            return self._result(StopReason.ERROR, 0, f"the CPU stopped at rip={x.rip:#x}: {x.detail}", x)
        return None

    def _result(self, reason: StopReason, status: int, message: str, x: VmExit | None = None) -> RunResult:
        return RunResult(reason, self.vcpu.icount, status, message, x,
                         {k: v for k, v in self.exit_counts.items() if v})
