"""Range checks of the `vmm` command line, before anything is built (issue 16).

Every numeric flag has a documented range; a value outside it, a command line
that is not UTF-8, or a `--serial tcp:` port that is no port is a one-line
usage error (exit status 2), never a traceback or a run that cannot end.
``check_args`` sees the parsed arguments of any subcommand and checks the
flags that subcommand has.
"""
from __future__ import annotations

import argparse
import math

from host.serial import FileBackend

MIN_MEM, MAX_MEM = 2 << 20, 3 << 30
MAX_COUNT = (1 << 63) - 1                 # instruction counts (--max-instructions, --until, --save-at)
MAX_EPOCH = 253_402_300_799               # 9999-12-31 23:59:59 UTC: the last second an RTC can show
MIN_CHECKPOINT_INTERVAL = 1_000
MAX_CHECKPOINT_INTERVAL = 1 << 40
MAX_CHECKPOINTS = 1024                    # checkpoints a replay under gdb may take (each holds RAM pages)


class ArgError(ValueError):
    """A flag's value out of its range (one line)."""


def _count(name: str, v: int | None) -> None:
    if v is not None and not 0 <= v <= MAX_COUNT:
        raise ArgError(f"{name} takes 0 to 2^63-1 instructions, not {v}")


def check_args(args: argparse.Namespace) -> None:
    """Raise ArgError for the first flag of ``args`` outside its range."""
    get = lambda name: getattr(args, name, None)  # noqa: E731
    mem = get("mem")
    if mem is not None and not (MIN_MEM <= mem <= MAX_MEM and mem % 4096 == 0):
        raise ArgError(f"--mem must be between 2M and 3G in whole 4K pages, not {mem:,} bytes")
    _count("--max-instructions", get("max_instructions"))
    _count("--until", get("until"))
    for at, _path in get("save_at") or []:
        _count("--save-at", at)
    addr = get("load_addr")
    if addr is not None and not 0 <= addr < 1 << 32:
        raise ArgError(f"--load-addr must be a 32-bit physical address, not {addr:#x}")
    epoch = get("rtc_epoch")
    if epoch is not None and not 0 <= epoch <= MAX_EPOCH:
        raise ArgError(f"--rtc-epoch takes 0 (1970) to {MAX_EPOCH} (9999-12-31) seconds, not {epoch}")
    interval = get("checkpoint_interval")
    if interval is not None and not MIN_CHECKPOINT_INTERVAL <= interval <= MAX_CHECKPOINT_INTERVAL:
        raise ArgError(f"--checkpoint-interval takes {MIN_CHECKPOINT_INTERVAL:,} to 2^40 instructions, "
                       f"not {interval}")
    cmdline = get("cmdline")
    if isinstance(cmdline, str):
        try:
            cmdline.encode("utf-8")
        except UnicodeEncodeError:
            raise ArgError("--cmdline is not UTF-8 text") from None
    serial = get("serial")
    if isinstance(serial, str) and serial.startswith("tcp:"):
        host, _, port = serial[4:].rpartition(":")
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ArgError(f"--serial tcp: wants tcp:[HOST:]PORT with PORT 0 to 65535, not {serial!r}")


def check_checkpoints(interval: int | None, length: int | None) -> None:
    """--checkpoint-interval against the recording's length: at most MAX_CHECKPOINTS."""
    if interval is None or not length:
        return
    if length // interval > MAX_CHECKPOINTS:
        least = math.ceil(length / MAX_CHECKPOINTS)
        raise ArgError(f"--checkpoint-interval {interval} would take {length // interval:,} checkpoints over "
                       f"{length:,} instructions; at most {MAX_CHECKPOINTS} (use {least:,} or more)")


class SerialFile(FileBackend):
    """A --serial FILE whose write errors (a full disk, /dev/full) name the file in one line."""

    def write(self, data: bytes) -> None:
        try:
            super().write(data)
        except OSError as e:
            raise OSError(e.errno, f"cannot write the serial output {self.path}: {e.strerror}") from None
