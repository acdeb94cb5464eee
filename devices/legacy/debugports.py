"""Debug ports a guest can talk to without any driver.

* ``DebugExit``: QEMU's ``isa-debug-exit`` device (docs: "QEMU System
  Emulation, isa-debug-exit"; properties ``iobase`` default 0x501, ``iosize``
  default 2).  Any write of value v ends the run; QEMU itself exits the
  process with status ``(v << 1) | 1``, so a guest can never produce status 0
  and test harnesses map "guest wrote 0x10" to 33.  Reads return all ones.
* ``DebugConsole``: the Bochs "port E9 hack" (Bochs user manual, "port e9
  hack"), also QEMU's ``isa-debugcon``: every byte written to port 0xE9 is
  printed; reading the port returns 0xE9 so that a guest can detect it.
* ``PostCode``: the IBM PC/AT manufacturing/POST checkpoint port 0x80 (a POST
  card latches each byte written; BIOS writers document their checkpoint
  codes).  We latch the last code and count writes; reads return the latch.

A wider-than-byte access to the byte-wide ports 0xE9 and 0x80 uses only the
low byte of a write (the other bytes belong to the next ports, which nobody
decodes here) and reads the upper bytes as open bus (all ones).
"""
from __future__ import annotations

from collections.abc import Callable

from devices.base import SIZE_MASK, DeviceStateError, State, check_state


def _get_count(state: dict, key: str, hi: int | None = None) -> int:
    try:
        v = state[key]
    except KeyError:
        raise DeviceStateError(f"state lacks {key!r}") from None
    if type(v) is not int or v < 0 or (hi is not None and v > hi):
        raise DeviceStateError(f"{key}: {v!r} is out of range")
    return v


class DebugExit:
    """isa-debug-exit: a write of v calls ``on_exit(v)``."""

    kind = "debug_exit"
    VERSION = 1

    def __init__(self, on_exit: Callable[[int], None], port: int = 0x501, size: int = 2,
                 name: str = "debug_exit") -> None:
        if size not in (1, 2, 4):
            raise ValueError(f"debug-exit iosize must be 1, 2 or 4, not {size}")
        self.name = name
        self.port = port
        self.size = size
        self.io_ranges: list[tuple[int, int]] = [(port, size)]
        self._on_exit = on_exit
        self.writes = 0
        self.last: int | None = None

    @staticmethod
    def qemu_status(v: int) -> int:
        """The process exit status QEMU reports for a guest write of ``v``."""
        return (v << 1) | 1

    def reset(self) -> None:
        self.writes = 0
        self.last = None

    def io_read(self, port: int, size: int) -> int:
        return SIZE_MASK.get(size, 0xFF)

    def io_write(self, port: int, size: int, value: int) -> None:
        # QEMU ignores the offset inside the range: any write is an exit.
        self.writes += 1
        self.last = value
        self._on_exit(value)

    def save_state(self) -> State:
        return {"kind": self.kind, "version": self.VERSION, "writes": self.writes, "last": self.last}

    def load_state(self, state: State) -> None:
        check_state(state, self.kind, self.VERSION)
        writes = _get_count(state, "writes")
        if "last" not in state:
            raise DeviceStateError("debug_exit: state lacks 'last'")
        last = state["last"]
        if last is not None:
            last = _get_count(state, "last", 0xFFFF_FFFF)
        self.writes, self.last = writes, last


class DebugConsole:
    """Port 0xE9 console: bytes written go to ``sink``; reads return 0xE9."""

    kind = "debugcon"
    VERSION = 1
    DETECT = 0xE9

    def __init__(self, sink: Callable[[bytes], None], port: int = 0xE9, name: str = "debugcon") -> None:
        self.name = name
        self.port = port
        self.io_ranges: list[tuple[int, int]] = [(port, 1)]
        self._sink = sink
        self.bytes_written = 0

    def reset(self) -> None:
        self.bytes_written = 0

    def io_read(self, port: int, size: int) -> int:
        return self.DETECT | (SIZE_MASK.get(size, 0xFF) & ~0xFF)

    def io_write(self, port: int, size: int, value: int) -> None:
        self.bytes_written += 1
        self._sink(bytes((value & 0xFF,)))

    def save_state(self) -> State:
        return {"kind": self.kind, "version": self.VERSION, "bytes_written": self.bytes_written}

    def load_state(self, state: State) -> None:
        check_state(state, self.kind, self.VERSION)
        self.bytes_written = _get_count(state, "bytes_written")


class PostCode:
    """Port 0x80 POST checkpoint latch."""

    kind = "postcode"
    VERSION = 1

    def __init__(self, on_code: Callable[[int], None] | None = None, name: str = "postcode") -> None:
        self.name = name
        self.io_ranges: list[tuple[int, int]] = [(0x80, 1)]
        self.on_code = on_code
        self.last = 0
        self.writes = 0

    def reset(self) -> None:
        self.last = 0
        self.writes = 0

    def io_read(self, port: int, size: int) -> int:
        return self.last | (SIZE_MASK.get(size, 0xFF) & ~0xFF)

    def io_write(self, port: int, size: int, value: int) -> None:
        v = value & 0xFF
        self.last = v
        self.writes += 1
        if self.on_code is not None:
            self.on_code(v)

    def save_state(self) -> State:
        return {"kind": self.kind, "version": self.VERSION, "last": self.last, "writes": self.writes}

    def load_state(self, state: State) -> None:
        check_state(state, self.kind, self.VERSION)
        last = _get_count(state, "last", 0xFF)
        self.writes = _get_count(state, "writes")
        self.last = last
