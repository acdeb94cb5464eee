"""Why the vCPU stopped: the VM-exit vocabulary of the run loop."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class ExitReason(enum.Enum):
    DEADLINE = "deadline"          # the requested instruction count was reached exactly
    IO = "io"                      # a device asked to stop right after an I/O or MMIO instruction
    MMIO = "mmio"                  # (inside the vCPU) an MMIO access asked to stop; its instruction runs again
    HLT = "hlt"                    # HLT retired; the vCPU waits for an interrupt
    EXCEPTION = "exception"        # a fault, trap or INT n the VMM must deliver
    INTERRUPT_WINDOW = "irq-window"  # IF became 1 while an interrupt was waiting
    TRAP = "trap"                  # execution reached the firmware trap range (HLE BIOS)
    SYSCALL = "syscall"            # stopped at SYSCALL, to be emulated from the MSRs
    SYSENTER = "sysenter"          # stopped at SYSENTER, to be emulated from the MSRs
    BREAKPOINT = "breakpoint"      # a debugger breakpoint address was reached
    STOP = "stop"                  # the host asked to stop (guest exit port, user quit)
    SHUTDOWN = "shutdown"          # triple fault: the processor entered shutdown
    HALTED = "halted"              # HLT with interrupts disabled and nothing pending
    ERROR = "error"                # the CPU core refused to go on (e.g. fetch outside memory)


@dataclass
class VmExit:
    reason: ExitReason
    rip: int
    icount: int
    vector: int = -1
    error_code: int | None = None
    software: bool = False
    detail: str = ""

    def __str__(self) -> str:
        s = f"{self.reason.value} at rip={self.rip:#x} icount={self.icount}"
        if self.vector >= 0:
            s += f" vector={self.vector}"
        if self.error_code is not None:
            s += f" error={self.error_code:#x}"
        if self.detail:
            s += f": {self.detail}"
        return s
