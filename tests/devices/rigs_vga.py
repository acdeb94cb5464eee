"""Conformance rig for the VGA (devices/display/vga.py), loaded by test_conformance.py.

The VGA reads (and its BIOS helpers write) guest RAM, so the rig gives it a
small RAM over the legacy video window that is saved and restored with it as
a peer; host operations drive the BIOS helpers and log what a renderer would
see (the text, the cursor), so a restored VGA must also render identically.
"""
from __future__ import annotations

import pathlib
import sys
from typing import Any

from devices.base import DeviceStateError, DmaError
from devices.clock import VirtualClock
from devices.display.vga import Vga

VIDEO_BASE = 0xA0000
VIDEO_SIZE = 0x20000


class VideoRam:
    """Guest RAM at 0xA0000-0xBFFFF behind the ``Dma`` protocol; anything else is a DMA error."""

    name = "video-ram"

    def __init__(self) -> None:
        self.mem = bytearray(VIDEO_SIZE)

    def _off(self, gpa: int, n: int) -> int:
        if gpa < VIDEO_BASE or gpa + n > VIDEO_BASE + VIDEO_SIZE:
            raise DmaError(gpa, n, "outside the rig's RAM")
        return gpa - VIDEO_BASE

    def read(self, gpa: int, n: int) -> bytes:
        o = self._off(gpa, n)
        return bytes(self.mem[o:o + n])

    def write(self, gpa: int, data: bytes) -> None:
        o = self._off(gpa, len(data))
        self.mem[o:o + len(data)] = data

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def write_u32(self, gpa: int, v: int) -> None:
        self.write(gpa, v.to_bytes(4, "little"))

    def reset(self) -> None:
        self.mem[:] = bytes(VIDEO_SIZE)

    def save_state(self) -> dict[str, Any]:
        return {"kind": "video-ram", "version": 1, "mem": bytes(self.mem)}

    def load_state(self, state: dict[str, Any]) -> None:
        mem = state.get("mem") if isinstance(state, dict) else None
        if not isinstance(mem, bytes) or len(mem) != VIDEO_SIZE:
            raise DeviceStateError("video-ram: mem must be 128 KiB")
        self.mem[:] = mem


def _rig_class() -> type:
    """The suite's Rig class, from the test_conformance module that loads this file.

    It imports this module while it is itself still being initialised, and
    pytest names it after its file (not ``tests.devices.test_conformance``),
    so importing it here would run the whole suite a second time.
    """
    here = pathlib.Path(__file__).with_name("test_conformance.py")
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and pathlib.Path(f) == here and hasattr(mod, "Rig"):
            return mod.Rig
    from tests.devices.test_conformance import Rig

    return Rig


def rig_vga(clock: VirtualClock) -> Any:
    ram = VideoRam()
    vga = Vga(clock, ram)
    r = _rig_class()(clock, vga, peers=[ram])

    def screen(*_: int) -> None:
        r.log.append((clock.now(), "screen", tuple(vga.text_screen()), vga.cursor_position(),
                      vga.blanked, vga.text_mode, vga.attribute_rgb(0x9E)))

    def scroll(n: int, b: int) -> None:
        window = (b % 30, n % 85, (b >> 3) % 30, (n * 3) % 85)
        (vga.scroll_up if n & 1 else vga.scroll_down)(n % 27, b, window)

    r.host_ops = {
        "put_char": lambda n, b: vga.put_char(b, None if n & 1 else b ^ n),
        "cursor": lambda n, b: vga.set_cursor(n % 30, b % 90),
        "scroll": scroll,
        "poke": lambda n, b: ram.write(0xB8000 + (b * 131 + n * 7) % 0x8000, bytes((b,))),
        "screen": screen,
    }
    return r


RIGS = {"vga": rig_vga}
CLASS_OF = {"vga": Vga}
