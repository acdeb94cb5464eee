"""The debug-target interface the gdb stub (`replay.gdbstub`) drives.

The stub speaks the GDB Remote Serial Protocol; everything it knows about the
machine goes through `DebugTarget`. A target is *halted* whenever the stub is
not inside `step`, `resume`, `reverse_step` or `reverse_resume`: register and
memory accesses, breakpoint changes and monitor commands only ever happen on a
halted target, from the thread that serves the connection.

Stop semantics (what gdb expects, as gdbserver, rr and gdb's own record-full
target behave):

* Breakpoints (kinds 0 and 1) are reported *before* the instruction at their
  address executes: the PC in the stop is the breakpoint address. `resume`
  checks breakpoints before every instruction including the first one, like
  INT3 and debug registers do; gdb itself steps off a breakpoint at the
  current PC (removes it, single-steps, re-inserts) before continuing.
* Watchpoints (kinds 2-4) are traps in forward execution: the access
  completes and the stop happens after the instruction, PC at the next one.
  `addr` is the data address that was accessed (inside the watched range).
* `step` executes exactly one instruction (an interrupt or exception
  delivered instead counts as that instruction, PC then at the handler).
  It returns reason "step", or "watchpoint" if that instruction accessed a
  watched location; it does not look at breakpoints.
* `reverse_step` un-executes exactly one instruction: afterwards the machine
  state is the one it had just before that instruction ran. At the start of
  the recording it does nothing and returns reason "replay-start". Like
  `step` it returns "watchpoint" if the un-executed instruction accessed a
  watched location, else "step".
* `reverse_resume` un-executes instructions one at a time and stops at the
  first of these, in this order of priority:
    - a watched location (kind 2 write, 3 read, 4 either) was accessed by the
      instruction just un-executed: stop in the state *before* it, i.e. PC at
      that instruction; reason "watchpoint", `kind`/`addr` as forward;
    - the PC after un-executing has a breakpoint (kinds 0/1): reason
      "breakpoint". The starting PC itself is never reported (going backwards
      the first thing that happens is un-executing the previous instruction;
      gdb does not step over breakpoints in reverse);
    - the start of the recording was reached: reason "replay-start";
    - `should_stop()` returned True: reason "signal", signal 2.
* Forward execution that reaches the end of what is recorded, when the target
  cannot (or will not) go live, returns reason "replay-end" (gdb prints "No
  more reverse-execution history." and the session goes on).
* "exited" ends the inferior for gdb: it mourns it and drops the connection,
  and the stub answers any later run request with the same W reply. A replay
  target that wants the user to be able to reverse from the guest's exit
  should stop there with "replay-end" (or a breakpoint) instead.

Several vCPUs (optional, `VcpuThreads`): gdb sees each vCPU as a thread
(thread id = vCPU id + 1, all-stop mode). The stub selects one vCPU with
`select`; register and memory accesses (guest-virtual addresses go through
that vCPU's page tables), `step` and `reverse_step` then apply to it:
* `step` runs until the selected vCPU retired one instruction of its own; the
  other vCPUs run in between as the machine's schedule says;
* `reverse_step` un-executes the selected vCPU's last instruction: the whole
  machine goes back to the moment just before that instruction retired, every
  other vCPU in the state it had then;
* `resume` and `reverse_resume` stop at a hit by any vCPU.
A stop names the vCPU it is about in `StopEvent.vcpu` (the one that hit the
breakpoint or made the watched access, or the stepped one); the stub then
selects it and reports it as the stop's thread. A target without `threads`
is one vCPU, thread 1.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

SIGINT = 2
SIGTRAP = 5

# Z/z packet kinds
BP_SOFTWARE = 0
BP_HARDWARE = 1
WATCH_WRITE = 2
WATCH_READ = 3
WATCH_ACCESS = 4

StopReason = Literal[
    "breakpoint", "watchpoint", "step", "signal", "exited", "replay-start", "replay-end"
]


class TargetMemoryError(Exception):
    """An access to guest memory that is unmapped (page not present in the guest
    page tables, or outside guest RAM/the physical address space)."""


@dataclass
class StopEvent:
    """Why the target stopped.

    reason      one of StopReason
    signal      signal number reported to gdb; None means SIGINT for reason
                "signal" (a stop `should_stop()` asked for) and SIGTRAP for
                everything else; ignored for "exited"
    kind        for "breakpoint": BP_SOFTWARE (default) or BP_HARDWARE;
                for "watchpoint": WATCH_WRITE / WATCH_READ / WATCH_ACCESS
    addr        for "watchpoint": the data address accessed
    exit_status for "exited": the guest's exit status (low 8 bits sent)
    vcpu        the vCPU the stop is about (None: the selected one)
    """

    reason: StopReason
    signal: int | None = None
    kind: int | None = None
    addr: int | None = None
    exit_status: int = 0
    vcpu: int | None = None


@runtime_checkable
class DebugTarget(Protocol):
    """One vCPU of a halted machine, as gdb sees it.

    Register names are gdb's (features org.gnu.gdb.i386.core/.sse/.segments):
      i386:   eax ecx edx ebx esp ebp esi edi eip eflags cs ss ds es fs gs,
              system: cr0 cr2 cr3 cr4
      x86-64: rax rbx rcx rdx rsi rdi rbp rsp r8..r15 rip eflags
              cs ss ds es fs gs fs_base gs_base,
              system: cr0 cr2 cr3 cr4 cr8 efer k_gs_base
      both, optional: st0..st7 fctrl fstat ftag fiseg fioff foseg fooff fop,
              xmm0..xmm7 (xmm0..xmm15 on x86-64) mxcsr
    `read_registers` may leave out any of them (the stub then reports a
    neutral value: 0, fctrl 0x37f, ftag 0xffff, mxcsr 0x1f80). Values are
    unsigned ints; the stub masks them to the register width. The segment
    registers hold selectors.
    """

    arch: str                # "i386" or "x86-64", fixed for a connection
    supports_reverse: bool

    def read_registers(self) -> dict[str, int]: ...

    def write_register(self, name: str, value: int) -> None:
        """Raise KeyError for a register the target does not have."""

    def read_memory(self, addr: int, length: int, physical: bool = False) -> bytes:
        """Guest-virtual (or physical) read; raise TargetMemoryError if any
        byte of the range is unmapped."""

    def write_memory(self, addr: int, data: bytes, physical: bool = False) -> None:
        """Raise TargetMemoryError if any byte of the range is unmapped."""

    def step(self) -> StopEvent: ...

    def resume(self, should_stop: Callable[[], bool]) -> StopEvent:
        """Run until a breakpoint, watchpoint, exit or end of replay. Call
        `should_stop()` every so often (it is cheap; it polls the debugger's
        socket at most every few ms) and, once it returned True, stop at an
        instruction boundary and return StopEvent("signal") (sent as T02)."""

    def reverse_step(self) -> StopEvent: ...

    def reverse_resume(self, should_stop: Callable[[], bool]) -> StopEvent: ...

    def add_breakpoint(self, kind: int, addr: int, length: int) -> bool:
        """kind: 0 sw, 1 hw, 2 write watch, 3 read watch, 4 access watch.
        False: could not insert (the stub replies E01). Raise
        NotImplementedError for a kind the target never supports (the stub
        replies empty and gdb stops using that kind: for watchpoints it falls
        back to single-stepping, for kind 0 to writing INT3 into guest
        memory, so a replay target must support kind 0)."""

    def remove_breakpoint(self, kind: int, addr: int, length: int) -> bool: ...

    def monitor(self, command: str) -> str:
        """A `monitor ...` command; the returned text is shown to the user."""

    def detach(self) -> None:
        """The debugger detached; the target may run freely again."""

    def kill(self) -> None:
        """The debugger asked to kill the guest."""


@runtime_checkable
class VcpuThreads(Protocol):
    """What a target with several vCPUs adds, so that gdb sees them as threads."""

    selected: int            # the vCPU that register/memory accesses and steps apply to

    def threads(self) -> list[int]:
        """The vCPU ids (gdb's thread ids are these + 1)."""

    def select(self, vcpu: int) -> None:
        """Make ``vcpu`` the selected one; raise ValueError for one that does not exist."""

    def thread_info(self, vcpu: int) -> str:
        """One line for gdb's `info threads`, e.g. "vCPU 1, halted"."""
