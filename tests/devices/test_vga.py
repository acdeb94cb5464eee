"""The VGA (devices/display/vga.py) through an IoBus with no guest, and its terminal renderer.

Expected register values come from IBM's VGA technical reference / FreeVGA
and SeaBIOS's mode 3 table; raster timing from the mode's own numbers:
28.322 MHz, 9-dot characters, 100 characters x 449 lines a frame, vertical
retrace on lines 412-413, display on lines 0-399 and characters 0-79.
"""
from __future__ import annotations

import io
import time

import pytest

from devices.base import DeviceStateError
from devices.bus import IoBus
from devices.clock import VirtualClock
from devices.display.vga import CP437, MODE3_ATTR, MODE3_CRTC, MODE3_GC, MODE3_SEQ, Vga
from host.display import NullDisplay, TextDisplay, make_display, plain_text
from tests.devices.rigs_vga import VideoRam

TEXT = 0xB8000
MONO = 0xB0000


class Board:
    """A VGA on a port bus, its video RAM and a manual clock."""

    def __init__(self) -> None:
        self.clock = VirtualClock()
        self.ram = VideoRam()
        self.vga = Vga(self.clock, self.ram)
        self.bus = IoBus()
        for base, n in self.vga.io_ranges:
            self.bus.register(self.vga, base, n)

    def outb(self, port: int, v: int) -> None:
        self.bus.write(port, 1, v)

    def outw(self, port: int, v: int) -> None:
        self.bus.write(port, 2, v)

    def inb(self, port: int) -> int:
        return self.bus.read(port, 1)

    def crtc(self, index: int, value: int | None = None, base: int = 0x3D4) -> int:
        self.outb(base, index)
        if value is not None:
            self.outb(base + 1, value)
        return self.inb(base + 1)

    def attr_write(self, index: int, value: int) -> None:
        self.inb(0x3DA)
        self.outb(0x3C0, index)
        self.outb(0x3C0, value)
        self.outb(0x3C0, 0x20)  # index with PAS set again: display on

    def attr_read(self, index: int) -> int:
        self.inb(0x3DA)
        self.outb(0x3C0, index | 0x20)
        return self.inb(0x3C1)

    def poke_text(self, offset: int, data: bytes) -> None:
        self.ram.write(TEXT + offset, data)

    def unprotect(self) -> None:
        self.crtc(0x11, self.crtc(0x11) & 0x7F)

    def small_screen(self, cols: int, rows: int) -> None:
        """Program the CRTC for cols x rows of 16-line characters."""
        self.unprotect()
        self.crtc(0x01, cols - 1)
        self.crtc(0x13, cols // 2)
        vde = rows * 16 - 1
        self.crtc(0x12, vde & 0xFF)
        ov = self.crtc(0x07) & ~0x42
        self.crtc(0x07, ov | (vde >> 8 & 1) << 1 | (vde >> 9 & 1) << 6)


@pytest.fixture
def b() -> Board:
    return Board()


# ---------------------------------------------------------------------------
# Reset: the registers a BIOS leaves in mode 3

def test_reset_is_bios_mode_3(b):
    assert b.inb(0x3CC) == 0x67
    assert [b.crtc(i) for i in range(25)] == list(MODE3_CRTC)
    seq = []
    for i in range(5):
        b.outb(0x3C4, i)
        seq.append(b.inb(0x3C5))
    assert seq == list(MODE3_SEQ)
    gc = []
    for i in range(9):
        b.outb(0x3CE, i)
        gc.append(b.inb(0x3CF))
    assert gc == list(MODE3_GC)
    assert [b.attr_read(i) for i in range(21)] == list(MODE3_ATTR)
    assert b.inb(0x3C6) == 0xFF
    assert b.vga.geometry() == (80, 25) and b.vga.text_mode and not b.vga.blanked
    assert b.vga.window() == (TEXT, 0x8000)


def test_reset_restores_after_changes(b):
    b.outb(0x3C2, 0x66)
    b.outw(0x3B4, 0x200E)
    b.vga.reset()
    assert b.inb(0x3CC) == 0x67 and b.crtc(0x0E) == 0


# ---------------------------------------------------------------------------
# Index/data pairs

def test_16bit_out_is_index_then_data(b):
    b.outw(0x3D4, 0x120E)         # out dx, ax: AL=0x0E index, AH=0x12 data
    b.outw(0x3D4, 0x340F)
    assert b.vga.cursor_location() == 0x1234
    assert b.inb(0x3D4) == 0x0F
    assert b.bus.read(0x3D4, 2) == 0x340F
    b.outw(0x3C4, 0x0F02)         # sequencer map mask
    b.outb(0x3C4, 2)
    assert b.inb(0x3C5) == 0x0F
    b.outw(0x3CE, 0x0805)         # graphics mode register
    b.outb(0x3CE, 5)
    assert b.inb(0x3CF) == 0x08


def test_index_widths_and_register_masks(b):
    b.outb(0x3C4, 0xFA)
    assert b.inb(0x3C4) == 0x02                       # 3-bit sequencer index (QEMU)
    b.outb(0x3C5, 0xFF)
    assert b.inb(0x3C5) == 0x0F                       # SR02 keeps bits 0-3
    b.outb(0x3C4, 0x06)
    b.outb(0x3C5, 0x55)
    assert b.inb(0x3C5) == 0                          # no SR06 on a VGA
    b.outb(0x3CE, 0x1B)
    assert b.inb(0x3CE) == 0x0B
    assert b.inb(0x3CF) == 0
    b.outb(0x3CE, 5)
    b.outb(0x3CF, 0xFF)
    assert b.inb(0x3CF) == 0x7B
    b.outb(0x3D4, 0x38)                               # an SVGA probe: no CR18 alias
    b.outb(0x3D5, 0x48)
    assert b.inb(0x3D4) == 0x38 and b.inb(0x3D5) == 0
    assert b.crtc(0x18) == 0xFF
    b.outb(0x3C2, 0xFF)
    assert b.inb(0x3CC) == 0xEF                       # misc bit 4 is reserved


# ---------------------------------------------------------------------------
# Attribute controller

def test_attribute_flip_flop(b):
    b.inb(0x3DA)
    b.outb(0x3C0, 0x31)           # index 0x11 (overscan) with PAS
    assert b.inb(0x3C0) == 0x31
    b.outb(0x3C0, 0x2A)           # data
    assert b.inb(0x3C1) == 0x2A
    b.outb(0x3C0, 0x32)           # the flip-flop is back at index
    assert b.inb(0x3C0) == 0x32
    b.outb(0x3C0, 0x05)           # data for 0x12
    assert b.vga.attr[0x12] == 0x05
    b.outb(0x3C0, 0x30)           # index 0x10 ...
    b.inb(0x3DA)                  # ... reading input status resets to index
    b.outb(0x3C0, 0x33)           # so this is an index, not data for 0x10
    assert b.inb(0x3C0) == 0x33 and b.vga.attr[0x10] == MODE3_ATTR[0x10]


def test_attribute_masks_and_pas(b):
    b.attr_write(0x00, 0xFF)
    assert b.attr_read(0x00) == 0x3F
    b.attr_write(0x10, 0xFF)
    assert b.attr_read(0x10) == 0xEF
    b.attr_write(0x14, 0xFF)
    assert b.attr_read(0x14) == 0x0F
    b.attr_write(0x15, 0x12)
    assert b.attr_read(0x15) == 0
    b.inb(0x3DA)
    b.outb(0x3C0, 0x01)           # PAS clear: the palette is being loaded, the screen is blank
    assert b.vga.blanked
    b.outb(0x3C1, 0x99)           # 0x3C1 is read-only ...
    b.outb(0x3C0, 0x21)           # ... so this is the data for palette 1
    assert b.vga.attr[1] == 0x21 and b.vga.blanked
    b.outb(0x3C0, 0x20)
    assert not b.vga.blanked


# ---------------------------------------------------------------------------
# CRTC

def test_crtc_protect_bit(b):
    assert b.crtc(0x11) & 0x80                        # the BIOS leaves CR0-7 protected
    for i in range(7):
        b.crtc(i, 0x33)
        assert b.crtc(i) == MODE3_CRTC[i]
    b.crtc(0x07, 0x00)
    assert b.crtc(0x07) == MODE3_CRTC[7] & ~0x10      # only the line compare bit 8 changes
    b.crtc(0x07, 0xFF)
    assert b.crtc(0x07) == MODE3_CRTC[7] | 0x10
    assert b.crtc(0x08, 0x05) == 0x05                 # CR08 and up are not protected
    b.unprotect()
    assert b.crtc(0x00, 0x33) == 0x33
    assert b.crtc(0x07, 0x00) == 0x00
    b.crtc(0x11, 0x80)
    assert b.crtc(0x06, 0x44) == MODE3_CRTC[6]


def test_cursor_and_start_registers(b):
    b.crtc(0x0C, 0x01)
    b.crtc(0x0D, 0x40)            # start address 0x140 = row 4 of the buffer
    b.crtc(0x0E, 0x01)
    b.crtc(0x0F, 0x95)            # cursor at 0x195 = start + 85 = row 1, col 5
    assert b.vga.start_address() == 0x140
    assert b.vga.cursor_position() == (1, 5)
    assert b.vga.cursor() == (1, 5)
    b.crtc(0x0A, 0x2D)            # cursor disable
    assert b.vga.cursor_position() is None
    b.crtc(0x0A, 0x0F)            # start 15 > end 14: no cursor on a VGA
    assert b.vga.cursor_position() is None
    b.crtc(0x0A, 0x06)
    b.crtc(0x0B, 0x07)
    assert b.vga.cursor_shape() == (6, 7) and b.vga.cursor_position() == (1, 5)
    b.crtc(0x0E, 0x20)            # far below the screen
    assert b.vga.cursor_position() is None


def test_misc_output_moves_the_crtc_and_status_ports(b):
    assert b.crtc(0x0E, 0x07) == 0x07
    assert b.inb(0x3B4) == 0xFF and b.inb(0x3B5) == 0xFF and b.inb(0x3BA) == 0xFF
    b.outb(0x3B4, 0x0E)
    b.outb(0x3B5, 0x99)           # mono ports are dead in colour mode
    assert b.crtc(0x0E) == 0x07
    b.outb(0x3C2, 0x66)           # I/O address select = 0: mono
    assert b.inb(0x3D4) == 0xFF and b.inb(0x3D5) == 0xFF and b.inb(0x3DA) == 0xFF
    assert b.crtc(0x0E, base=0x3B4) == 0x07
    assert b.crtc(0x0F, 0x42, base=0x3B4) == 0x42
    b.outb(0x3D5, 0x11)
    assert b.crtc(0x0F, base=0x3B4) == 0x42
    # the flip-flop follows the live input status port only
    b.inb(0x3BA)
    b.outb(0x3C0, 0x31)
    b.inb(0x3DA)                  # dead port: no reset
    b.outb(0x3C0, 0x09)
    assert b.vga.attr[0x11] == 0x09
    # feature control: written at the live status port, read at 0x3CA
    b.outb(0x3DA, 0x0B)
    assert b.inb(0x3CA) == 0
    b.outb(0x3BA, 0xFF)
    assert b.inb(0x3CA) == 0x0B
    b.outb(0x3C2, 0x67)
    assert b.crtc(0x0F) == 0x42


# ---------------------------------------------------------------------------
# DAC

def test_dac_write_and_read_sequencing(b):
    b.outb(0x3C8, 0x05)
    assert b.inb(0x3C7) == 0      # write mode
    for v in (0x3F, 0x40 | 0x21, 0x07, 0x01, 0x02, 0x03):
        b.outb(0x3C9, v)          # two entries: 5 and 6; values keep 6 bits
    assert b.inb(0x3C8) == 0x07
    b.outb(0x3C7, 0x05)
    assert b.inb(0x3C7) == 3      # read mode
    assert [b.inb(0x3C9) for _ in range(6)] == [0x3F, 0x21, 0x07, 0x01, 0x02, 0x03]
    assert b.vga.dac_read_index == 7
    # a new index abandons a partial triple
    b.outb(0x3C8, 0x09)
    b.outb(0x3C9, 0x11)
    b.outb(0x3C8, 0x0A)
    b.outb(0x3C9, 0x01)
    b.outb(0x3C9, 0x02)
    b.outb(0x3C9, 0x03)
    assert b.vga.dac_rgb(0x09) == (0, 0, 0xFF) and b.vga.dac[30:33] == bytes((1, 2, 3))
    # the index wraps at 255
    b.outb(0x3C8, 0xFF)
    for v in (1, 2, 3, 4, 5, 6):
        b.outb(0x3C9, v)
    assert b.vga.dac[765:768] == bytes((1, 2, 3)) and b.vga.dac[0:3] == bytes((4, 5, 6))


def test_dac_reset_palette_and_pixel_mask(b):
    b.outb(0x3C7, 0x14)           # palette entry 6 (brown) points here
    assert [b.inb(0x3C9) for _ in range(3)] == [0x2A, 0x15, 0x00]
    b.outb(0x3C7, 0x3F)
    assert [b.inb(0x3C9) for _ in range(3)] == [0x3F, 0x3F, 0x3F]
    b.outb(0x3C7, 0x40)
    assert [b.inb(0x3C9) for _ in range(3)] == [0, 0, 0]
    b.outb(0x3C6, 0x0F)
    assert b.inb(0x3C6) == 0x0F
    assert b.vga.attribute_rgb(0x0F)[0] == b.vga.dac_rgb(0x0F)  # 0x3F masked to 0x0F


def test_text_colours(b):
    fg, bg, blink = b.vga.attribute_rgb(0x1E)
    assert (fg, bg, blink) == ((255, 255, 85), (0, 0, 170), False)
    assert b.vga.attribute_rgb(0x9E) == ((255, 255, 85), (0, 0, 170), True)
    b.attr_write(0x10, 0x04)      # blink off: bit 7 is a bright background
    assert b.vga.attribute_rgb(0x9E) == ((255, 255, 85), (85, 85, 255), False)
    b.outb(0x3C8, 0x01)           # palette 1 -> DAC 1: make it orange
    for v in (0x3F, 0x20, 0x00):
        b.outb(0x3C9, v)
    assert b.vga.attribute_rgb(0x01)[0] == (255, 130, 0)
    b.attr_write(0x12, 0x00)      # no colour planes: everything is colour 0
    assert b.vga.attribute_rgb(0x1F)[:2] == ((0, 0, 0), (0, 0, 0))


# ---------------------------------------------------------------------------
# Input status #1 on virtual time

CLOCK_HZ, CHAR_DOTS, TICK_HZ = 28_322_000, 9, 100_000_000


def tick_of_char(n: int) -> int:
    """First tick at which the CRT has reached character n (counted from tick 0)."""
    return -(-n * TICK_HZ * CHAR_DOTS // CLOCK_HZ)


def test_retrace_window_on_virtual_time(b):
    frame = 100 * 449
    start, end = tick_of_char(412 * 100), tick_of_char(414 * 100)
    b.clock.advance_to(start - 1)
    assert not b.inb(0x3DA) & 0x08
    b.clock.advance_to(start)
    assert b.inb(0x3DA) & 0x09 == 0x09
    b.clock.advance_to(end - 1)
    assert b.inb(0x3DA) & 0x08
    b.clock.advance_to(end)
    assert not b.inb(0x3DA) & 0x08
    assert b.inb(0x3DA) & 0x01          # still below the displayed lines
    b.clock.advance_to(tick_of_char(frame + 412 * 100))
    assert b.inb(0x3DA) & 0x08          # next frame
    assert end - start == pytest.approx(63.55e-6 * TICK_HZ, rel=1e-3)
    assert TICK_HZ / b.vga.frame_ticks() == pytest.approx(70.087, abs=0.001)


def test_display_enable_toggles_within_a_line(b):
    line = 10
    b.clock.advance_to(tick_of_char(line * 100 + 79))
    assert b.inb(0x3DA) == 0            # last displayed character
    b.clock.advance_to(tick_of_char(line * 100 + 80))
    assert b.inb(0x3DA) == 0x01         # horizontal blanking
    b.clock.advance_to(tick_of_char((line + 1) * 100))
    assert b.inb(0x3DA) == 0


def test_polling_loop_sees_one_retrace_per_frame(b):
    rises, last = [], 0
    while b.clock.now() < 4 * 1_430_000:
        v = b.inb(0x3DA) & 0x08
        if v and not last:
            rises.append(b.clock.now())
        last = v
        b.clock.advance(97)               # a few instructions per poll
    gaps = [y - x for x, y in zip(rises, rises[1:], strict=False)]
    assert len(rises) == 4 and all(abs(g - b.vga.frame_ticks()) < 100 for g in gaps)


def test_timing_follows_the_programmed_registers(b):
    b.outb(0x3C2, 0x63)                 # clock select 0: 25.175 MHz
    assert TICK_HZ / b.vga.frame_ticks() == pytest.approx(25_175_000 / 9 / 44900, rel=1e-9)
    b.outb(0x3C4, 1)
    b.outb(0x3C5, 0x01)                 # 8-dot characters
    assert TICK_HZ / b.vga.frame_ticks() == pytest.approx(25_175_000 / 8 / 44900, rel=1e-9)
    b.unprotect()
    b.crtc(0x06, 0x00)                  # vertical total 0 + 256 + 2 = 258 lines
    assert TICK_HZ / b.vga.frame_ticks() == pytest.approx(25_175_000 / 8 / (100 * 258), rel=1e-9)
    b.crtc(0x10, 0xFF)                  # retrace start past the total: never in retrace
    seen = 0
    for t in range(0, 2_000_000, 500):
        b.clock.advance_to(t)
        seen |= b.inb(0x3DA)
    assert seen == 0x01


def test_status_never_reads_the_host_clock(b, monkeypatch):
    def boom(*_a):
        raise AssertionError("host clock read")

    for name in ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns", "perf_counter_ns"):
        monkeypatch.setattr(time, name, boom)
    b.clock.advance_to(tick_of_char(412 * 100))
    assert b.inb(0x3DA) & 0x08


def test_same_ticks_same_bits_after_restore(b):
    b.clock.advance(123_457)
    b.outb(0x3C2, 0x63)
    state = b.vga.save_state()
    other = Board()
    other.clock.advance_to(b.clock.now())
    other.vga.load_state(state)
    for _ in range(300):
        assert other.inb(0x3DA) == b.inb(0x3DA)
        b.clock.advance(1_009)
        other.clock.advance(1_009)


# ---------------------------------------------------------------------------
# Text from the memory image

def test_text_screen_decodes_cp437(b):
    b.poke_text(0, b"H\x07i\x07\x01\x07\xb0\x07\xdb\x07\x00\x07\x7f\x07")
    b.poke_text(160 * 24 + 158, b"Z\x4f")
    lines = b.vga.text_screen()
    assert len(lines) == 25 and all(len(line) == 80 for line in lines)
    assert lines[0].startswith("Hi☺░█ ⌂")
    assert lines[24][79] == "Z"
    assert b.vga.cells()[24][79] == (ord("Z"), 0x4F)
    assert b.vga.cells()[0][:2] == [(ord("H"), 7), (ord("i"), 7)]
    assert CP437[0xE1] == "ß" and CP437[0x0D] == "♪" and len(set(CP437)) == 255  # 00h and 20h are both blank


def test_text_screen_honours_the_start_address(b):
    for row in range(30):
        b.poke_text(row * 160, f"row {row}".encode().replace(b"", b"\x07")[1:])
    assert b.vga.text_screen()[0].startswith("row 0")
    b.crtc(0x0C, 0)
    b.crtc(0x0D, 80 * 3)
    assert b.vga.text_screen()[0].startswith("row 3")
    assert b.vga.text_screen()[24].startswith("row 27")
    b.crtc(0x0C, 0x3F)                  # near the top of the 32 KiB window: rows wrap to its start
    b.crtc(0x0D, 0xF0)                  # 0x3FF0 cells = 0x7FE0 bytes: 16 cells before the end
    b.ram.write(TEXT + 0x7FE0, b"E\x07")
    first = b.vga.text_screen()[0]
    assert first[0] == "E" and first[16:21] == "row 0"


def test_mono_window_and_graphics_mode(b):
    b.ram.write(MONO, b"M\x07")
    b.outb(0x3CE, 6)
    b.outb(0x3CF, 0x0A)                 # memory map 2: B0000h
    assert b.vga.text_screen()[0][0] == "M"
    b.outb(0x3CF, 0x05)                 # A0000h, graphics
    assert not b.vga.text_mode


def test_geometry_follows_the_crtc(b):
    b.crtc(0x09, 0x47)                  # 8-line characters: 80x50
    assert b.vga.geometry() == (80, 50)
    b.crtc(0x09, 0x4F)
    b.unprotect()
    b.crtc(0x01, 0x27)
    b.crtc(0x13, 0x14)                  # 40 columns
    b.poke_text(0, b"A\x07" * 40 + b"B\x07")
    assert b.vga.geometry() == (40, 25)
    assert b.vga.text_screen()[1][0] == "B"


def test_split_screen_restarts_at_address_zero(b):
    for row in range(25):
        b.poke_text(row * 160, bytes((ord("a") + row, 7)))
    b.crtc(0x0D, 160)                   # start at row 2
    b.crtc(0x18, 127)                   # line compare 127 (bits 8, 9 cleared below)
    b.crtc(0x07, b.crtc(0x07) & ~0x10)
    b.crtc(0x09, b.crtc(0x09) & ~0x40)
    first = [line[0] for line in b.vga.text_screen()]
    assert first[:8] == list("cdefghij") and first[8:10] == ["a", "b"]


# ---------------------------------------------------------------------------
# BIOS helpers

def test_teletype_cr_lf_bs_bel_tab(b):
    v = b.vga
    v.clear()
    for ch in b"Hello\r\nab\x08c\x07!\tX":
        v.put_char(ch)
    lines = v.text_screen()
    assert lines[0].rstrip() == "Hello"
    assert lines[1].rstrip() == "ac!     X"
    assert v.cursor() == (1, 9)
    b.outb(0x3D4, 0x0E)                 # the guest sees the cursor in the CRTC
    hi = b.inb(0x3D5)
    b.outb(0x3D4, 0x0F)
    assert (hi << 8 | b.inb(0x3D5)) == 80 + 9
    v.set_cursor(1, 0)
    v.put_char(0x08)
    assert v.cursor() == (1, 0)         # BS stops at column 0


def test_teletype_keeps_or_sets_the_attribute(b):
    v = b.vga
    v.clear(0x1F)
    v.put_char(ord("a"))
    v.put_char(ord("b"), 0x4E)
    assert v.read_cell(0, 0) == (ord("a"), 0x1F) and v.read_cell(0, 1) == (ord("b"), 0x4E)


def test_teletype_wraps_and_scrolls(b):
    v = b.vga
    v.clear()
    v.write_cell(0, 0, ord("T"), 0x2A)
    v.set_cursor(24, 78)
    v.put_char(ord("y"), 0x1E)
    v.put_char(ord("z"), 0x1E)          # column 79: wraps, and row 25 scrolls
    lines = v.text_screen()
    assert lines[0][0] == " " and lines[23][78:] == "yz"
    assert lines[24] == " " * 80
    assert v.cells()[24][0] == (0x20, 0x07)
    assert v.cursor() == (24, 0) and v.cursor_position() == (24, 0)
    v.put_char(ord("\n"))
    assert v.text_screen()[22][78:] == "yz"


def test_scroll_window_up_and_down(b):
    v = b.vga
    for row in range(25):
        for col in range(80):
            v.write_cell(row, col, ord("A") + row % 26, 0x07)
    v.scroll_up(2, 0x70, (5, 10, 9, 19))
    lines = v.text_screen()
    assert lines[5][10:20] == "H" * 10 and lines[7][10:20] == "J" * 10
    assert lines[8][10:20] == " " * 10 and lines[9][10:20] == " " * 10
    assert lines[5][9] == "F" and lines[5][20] == "F"      # outside the window untouched
    assert v.cells()[9][10] == (0x20, 0x70)
    v.scroll_down(1, 0x07, (5, 10, 9, 19))
    lines = v.text_screen()
    assert lines[5][10:20] == " " * 10 and lines[6][10:20] == "H" * 10 and lines[9][10:20] == " " * 10
    v.scroll_up(0, 0x17, (0, 0, 99, 199))                    # 0 lines: clear (window clipped)
    assert all(c == (0x20, 0x17) for row in v.cells() for c in row)


def test_helpers_write_the_displayed_page(b):
    v = b.vga
    v.set_start_address(0x800)          # page 1 of 4 KiB pages
    v.set_cursor(0, 0)
    v.put_char(ord("P"), 0x07)
    assert b.ram.read(TEXT + 0x1000, 2) == b"P\x07"
    assert v.cursor_location() == 0x801 and v.cursor() == (0, 1)
    assert v.text_screen()[0][0] == "P"
    v.set_cursor_shape(0x20, 0x0E)
    assert v.cursor_position() is None


# ---------------------------------------------------------------------------
# State

def test_state_round_trip_and_refusals(b):
    b.outw(0x3D4, 0x120E)
    b.outb(0x3C8, 3)
    b.outb(0x3C9, 9)                    # a partial DAC triple
    b.inb(0x3DA)
    b.outb(0x3C0, 0x11)                 # flip-flop now at data, PAS clear
    s = b.vga.save_state()
    other = Board()
    other.vga.load_state(s)
    assert other.vga.save_state() == s
    other.outb(0x3C9, 8)
    other.outb(0x3C9, 7)
    assert other.vga.dac[9:12] == bytes((9, 8, 7))
    other.outb(0x3C0, 0x05)
    assert other.vga.attr[0x11] == 0x05
    for bad in ({**s, "seq": s["seq"][:4]}, {**s, "dac_state": 1}, {**s, "attr_flipflop": 1},
                {**s, "misc": 0x10}, {**s, "crtc_index": 256}, {**s, "attr": b"\xff" * 21},
                {**s, "version": 2}, {**s, "kind": "uart16550"}):
        before = other.vga.save_state()
        with pytest.raises(DeviceStateError):
            other.vga.load_state(bad)
        assert other.vga.save_state() == before


# ---------------------------------------------------------------------------
# The terminal renderer

def small(b: Board, cols: int = 12, rows: int = 3) -> Board:
    b.small_screen(cols, rows)
    assert b.vga.geometry() == (cols, rows)
    b.vga.clear()
    return b


def test_plain_dump_when_not_a_terminal(b):
    small(b)
    for ch in b"Hi there\r\nok":
        b.vga.put_char(ch)
    out = io.StringIO()
    d = TextDisplay(b.vga, out)
    assert not d.tty
    d.start()
    assert not d.frame(force=True) and out.getvalue() == ""
    d.stop()
    assert out.getvalue() == "Hi there\nok\n"
    d.stop()
    assert out.getvalue() == "Hi there\nok\n"


def test_terminal_first_frame_colours_and_cursor(b):
    small(b)
    b.vga.write_cell(0, 0, ord("A"), 0x1E)
    b.vga.write_cell(0, 1, ord("b"), 0x07)
    b.vga.write_cell(1, 0, 0x01, 0x8C)
    b.vga.set_cursor(2, 3)
    out = io.StringIO()
    d = TextDisplay(b.vga, out, tty=True, size=(80, 24), clock=lambda: 0.0)
    d.start()
    text = out.getvalue()
    assert text.startswith("\x1b[?1049h\x1b[?25l")
    assert "\x1b[1;1H\x1b[0;93;44mA\x1b[0;37;40mb" in text
    assert "\x1b[2;1H\x1b[0;91;40;5m☺" in text          # bright red on black, blinking
    assert text.endswith("\x1b[3;4H\x1b[?25h")
    assert "\x1b[4;" not in text                          # only the VGA's 3 rows are drawn


def test_terminal_redraws_only_what_changed(b):
    small(b)
    now = [0.0]
    out = io.StringIO()
    d = TextDisplay(b.vga, out, tty=True, size=(80, 24), fps=4, clock=lambda: now[0])
    d.start()
    out.seek(0)
    out.truncate()
    b.vga.write_cell(1, 7, ord("Q"), 0x07)
    assert not d.frame()                                  # 0.25 s not yet passed
    now[0] = 0.25
    assert d.frame()
    assert out.getvalue() == "\x1b[2;8H\x1b[0;37;40mQ\x1b[1;1H\x1b[?25h"
    out.seek(0)
    out.truncate()
    now[0] = 0.5
    assert not d.frame() and out.getvalue() == ""        # nothing changed
    b.vga.set_cursor(0, 5)
    now[0] = 0.75
    assert d.frame()
    assert out.getvalue() == "\x1b[1;6H\x1b[?25h"
    out.seek(0)
    out.truncate()
    b.vga.write_cell(0, 2, ord("x"), 0x07)
    b.vga.write_cell(0, 4, ord("y"), 0x07)                # close together: one run
    b.vga.write_cell(0, 11, ord("z"), 0x07)               # far: a second move
    now[0] = 1.0
    d.frame()
    assert out.getvalue() == "\x1b[1;3H\x1b[0;37;40mx y\x1b[1;12Hz\x1b[1;6H\x1b[?25h"


def test_terminal_colours_blanking_graphics_and_stop(b):
    small(b)
    b.outb(0x3C8, 0x07)                                   # colour 7 -> DAC 7: an off-palette grey
    for v in (0x18, 0x18, 0x18):
        b.outb(0x3C9, v)
    b.vga.write_cell(0, 0, ord("g"), 0x07)
    out = io.StringIO()
    d = TextDisplay(b.vga, out, tty=True, size=(80, 24), clock=lambda: 0.0)
    d.start()
    assert "\x1b[0;38;2;97;97;97;40mg" in out.getvalue()
    out16 = io.StringIO()
    TextDisplay(b.vga, out16, tty=True, size=(80, 24), colors="16", clock=lambda: 0.0).start()
    assert "\x1b[0;90;40mg" in out16.getvalue()          # nearest: dark grey
    out.seek(0)
    out.truncate()
    b.inb(0x3DA)
    b.outb(0x3C0, 0x00)                                   # PAS clear: blank screen, no cursor
    d.frame(force=True)
    assert "g" not in out.getvalue() and out.getvalue().endswith("\x1b[?25l")
    b.outb(0x3C0, 0x00)
    b.outb(0x3C0, 0x20)
    b.outb(0x3CE, 6)
    b.outb(0x3CF, 0x05)                                   # graphics mode
    d.frame(force=True)
    assert "\x1b[1;1H\x1b[0m[the VGA is" in out.getvalue()   # the notice, clipped to 12 columns
    b.outb(0x3CF, 0x0E)
    out.seek(0)
    out.truncate()
    d.stop()
    assert out.getvalue() == "\x1b[0m\x1b[?25h\x1b[?1049lg\n"


def test_terminal_clips_to_a_small_terminal_and_never_touches_the_guest(b):
    for col in range(80):
        b.vga.write_cell(0, col, ord("0") + col % 10, 0x07)
    b.vga.set_cursor(0, 70)
    clock_before, state_before = b.clock.now(), b.vga.save_state()
    ram_before = bytes(b.ram.mem)
    out = io.StringIO()
    d = TextDisplay(b.vga, out, tty=True, size=(20, 5), clock=lambda: 0.0)
    d.start()
    d.stop()
    text = out.getvalue()
    assert "01234567890123456789" in text and "\x1b[6;" not in text
    assert "\x1b[?25l" in text                            # the cursor is off the visible part
    assert b.clock.now() == clock_before and b.vga.save_state() == state_before
    assert bytes(b.ram.mem) == ram_before


def test_glyphs_the_terminal_cannot_encode_become_question_marks(b):
    small(b)
    b.vga.write_cell(0, 0, 0x01, 0x07)
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    d = TextDisplay(b.vga, out, tty=True, size=(80, 24), clock=lambda: 0.0)
    d.start()
    out.flush()
    assert b"?" in out.buffer.getvalue()


def test_make_display_and_null_display(b):
    assert isinstance(make_display("none", None), NullDisplay)
    nd = make_display("none", b.vga)
    nd.start()
    assert nd.frame(force=True) is False
    nd.stop()
    assert isinstance(make_display("text", b.vga, io.StringIO()), TextDisplay)
    with pytest.raises(ValueError):
        make_display("sdl", b.vga)
    with pytest.raises(ValueError):
        make_display("text", None)
    with pytest.raises(ValueError):
        TextDisplay(b.vga, io.StringIO(), colors="256")
    assert plain_text(b.vga.text_frame()) == ""
