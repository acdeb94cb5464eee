"""vmm's exit statuses: one scheme in which a script can always tell the guest's
own status from vmm's, and never mistake either for a signal.

A process status is 8 bits, and a shell reports a child killed by signal n
as 128 + n, so 129..255 belong to signals (130 is Ctrl-C).  vmm keeps
0..127 and splits it:

- 0: success: the guest wrote 0 to the debug-exit port, halted for good, or
  ran to --max-instructions / --until;
- 1: never chosen by vmm (Python's status for an unhandled error: a bug);
- 2..15: vmm's own (the table below; 9..15 kept for later);
- 16..127: the guest's: a value v written to the debug-exit port is
  16 + v for 1 <= v <= 110, and 127 for any larger v (the exact value is
  printed on stderr then, the port being up to 32 bits wide).

``--exit-code qemu`` gives QEMU's isa-debug-exit status instead, (v << 1) | 1,
for scripts written for QEMU; it keeps within 0..127 too (a v of 63 or more
gives 127), but QEMU's odd statuses overlap vmm's own 3, 5 and 7: the default
scheme is the one that tells them apart.
"""
from __future__ import annotations

OK = 0
USAGE = 2            # a usage error, or an input file vmm cannot use (one line names it)
SHUTDOWN = 3         # the guest triple-faulted (processor shutdown)
CPU_ERROR = 4        # the CPU core stopped on an error (e.g. executing outside RAM)
DIVERGED = 5         # the replay departed from the recording (a report says where)
BAD_LOG = 6          # the log is unreadable or damaged
BAD_SNAPSHOT = 7     # the snapshot file cannot be restored
INCOMPLETE = 8       # the replay ended early: the log ends before the recording did
INTERRUPTED = 130    # Ctrl-C: the shell's own status for SIGINT

GUEST_BASE = 16
GUEST_MAX = 127
QEMU_MAX = 127

VMM_STATUSES = {
    USAGE: "usage error or an unusable input file",
    SHUTDOWN: "triple fault (processor shutdown)",
    CPU_ERROR: "CPU core error (e.g. executing outside RAM)",
    DIVERGED: "replay diverged from the recording",
    BAD_LOG: "unreadable or damaged replay log",
    BAD_SNAPSHOT: "unusable snapshot file",
    INCOMPLETE: "replay ended early: the log ends before the recording did",
}


def guest_status(value: int) -> int:
    """The process status for a guest that wrote ``value`` to the debug-exit port."""
    if value == 0:
        return OK
    return min(GUEST_BASE + value, GUEST_MAX)


def qemu_status(value: int) -> int:
    """QEMU's isa-debug-exit status, (v << 1) | 1, kept below the signal range."""
    return min((value << 1) | 1, QEMU_MAX)


def guest_value(status: int) -> int | None:
    """For a script: the guest's value a status stands for (None if it is not the guest's;
    127 means 111 or more)."""
    if status == OK:
        return 0
    if GUEST_BASE < status <= GUEST_MAX:
        return status - GUEST_BASE
    return None


EPILOG = f"""\
exit status (run, record, replay; log verify: 0 or 6):
  0         success: the guest wrote 0 to the debug-exit port 0x501, halted
            for good, or ran to --max-instructions / --until
  1         never chosen by vmm (a Python traceback: a bug, please report it)
{chr(10).join(f"  {k:<9} {v}" for k, v in VMM_STATUSES.items())}
  9-15      reserved for vmm
  16+v      the guest wrote v (1 to 110) to the debug-exit port
  127       the guest wrote 111 or more (the value is printed on stderr)
  130       interrupted (Ctrl-C); vmm never exits 128+n otherwise
  --exit-code qemu: (v << 1) | 1 as QEMU's isa-debug-exit (at most 127),
  which overlaps 3, 5 and 7: use the default to tell vmm's status from the guest's
"""
