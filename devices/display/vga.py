"""The IBM VGA's register set, and its alphanumeric (text) mode read out of guest RAM.

Sources: IBM "VGA and XGA Technical Reference Manual", Video Subsystem
chapter, section "Registers" (General Registers, Sequencer, CRT Controller,
Graphics Controller, Attribute Controller, Video DAC); FreeVGA ("VGA/SVGA
Video Programming", J. Neal): "General (External) Registers", "Sequencer
Registers", "CRT Controller Registers", "Graphics Registers", "Attribute
Controller Registers", "DAC Operation" and "VGA Text Mode Operation".
Where QEMU's hw/display/vga.c (the card guests are usually written against)
departs from those pages, the choice is named below.

Ports (all byte-wide, ``io_sizes = (1,)``: the bus splits ``out dx, ax`` to
0x3D4 into an index write and a data write, which is how guests program the
CRTC).  The claims are those QEMU makes, so 0x3BC (a parallel port) stays free:

* 0x3C2 write / 0x3CC read: Miscellaneous Output.  Bit 0 (I/O Address Select)
  puts the CRTC and Input Status #1 at 0x3D4/0x3D5/0x3DA (colour, 1) or
  0x3B4/0x3B5/0x3BA (mono, 0); the other block then reads 0xFF and ignores
  writes, as QEMU's ``vga_ioport_invalid`` does.  Bit 4 is reserved (reads 0).
* 0x3C2 read: Input Status #0, 0 (no vertical-retrace interrupt, switch sense
  0, as QEMU).  0x3BA/0x3DA write / 0x3CA read: Feature Control (bits 0, 1, 3).
* 0x3BA/0x3DA read: Input Status #1.  Bit 3 (Vertical Retrace) and bit 0
  (Display Disabled: horizontal or vertical blanking) follow the raster
  position, derived from the machine's virtual clock and the programmed
  timing, never the host clock (below).  Reading it resets the attribute
  controller's flip-flop to "index".
* 0x3C4/0x3C5: Sequencer index (3 bits, as QEMU) and registers 0-4.
* 0x3CE/0x3CF: Graphics Controller index (4 bits) and registers 0-8.
* 0x3B4/0x3D4, 0x3B5/0x3D5: CRTC index (8 bits: an SVGA probe of CR38 must not
  land on CR18, as it does not in QEMU) and registers 0x00-0x18; others read
  0 and ignore writes.  CR11 bit 7 (Protect) makes CR00-CR07 read-only except
  CR07 bit 4 (line compare bit 8), as FreeVGA's "Vertical Retrace End
  Register" says.
* 0x3C0: Attribute Controller index/data through one flip-flop: the first
  write is the index (bits 0-4, bit 5 Palette Address Source), the next the
  data, and so on; reading Input Status #1 makes the next write an index.
  0x3C0 reads back the index with PAS whatever the flip-flop (FreeVGA, Bochs;
  QEMU reads 0 in the data phase), 0x3C1 reads the data; writes to 0x3C1 are
  ignored (IBM VGA and QEMU).  Registers 0x00-0x14 keep only their defined
  bits (``ATTR_MASK``: palette and colour plane enable 6 bits, mode control
  without its reserved bit 4, panning and colour select 4 bits), as QEMU.
* 0x3C6: DAC pixel mask (FreeVGA "DAC Operation"; QEMU leaves it out).
  0x3C7 write: read index (DAC state 3); 0x3C7 read: DAC state (0 after a
  write-index load, 3 after a read-index load).  0x3C8: write index.
  0x3C9: colour data in red, green, blue order, three accesses per entry,
  the index advancing after the third; reads and writes share the
  component counter, as in QEMU.  Entries hold 6 bits per component (IBM
  DAC); a written value keeps its low 6 bits.

Raster timing (Input Status #1).  Dot clock from Misc bits 2-3 (25.175 MHz,
or 28.322 MHz for clock 1; 2 and 3 are external clocks and count as 25.175
as in QEMU), halved by SR01 bit 3; 8 or 9 dots per character (SR01 bit 0);
horizontal total CR00+5 characters, display end CR01+1; vertical total CR06
(+ CR07 bits 0, 5) + 2 lines, display end CR12 (+ CR07 bits 1, 6) + 1,
retrace from CR10 (+ CR07 bits 2, 7) until the line counter's low four bits
equal CR11 bits 0-3; CR17 bit 2 makes each line count two scan lines.  The
BIOS's mode 3 gives 900 dots x 449 lines at 28.322 MHz: a 70.09 Hz frame
whose vertical retrace lasts two lines (63.6 us, 6 355 ticks).  The raster
position is ``now * dot_clock`` counted from tick 0, so the same ticks give
the same bits in every run and after a restore.

Text mode (FreeVGA "VGA Text Mode Operation").  The frame buffer is guest
RAM: the window selected by GR06 bits 2-3 (0xB8000 for colour text, 0xB0000
for mono, 0xA0000 otherwise); this device does not trap it.  It reads it
through the ``Dma`` view it was given only when asked (``text_screen``,
``cells``, ``screen_bytes``).  The CRTC counts in word mode, as every BIOS
text mode programs it: cell k of the display is the (character, attribute)
byte pair at window offset 2 * (start address + k) modulo the window size;
a row is CR01+1 cells wide, rows start CR13 * 2 cells apart, and there are
(vertical display end) / (character height, CR09 bits 0-4 plus one, doubled
by CR09 bit 7) of them: 80 x 25 after reset.  Rows whose first scan line lies
past the line compare value (CR18 + CR07 bit 4 + CR09 bit 6) start again at
address 0 (the split screen, at character-row granularity).  The cursor is
the cell whose address equals CR0E:CR0F; it is hidden by CR0A bit 5, by a
start scan line past the end (CR0A > CR0B) or past the character height.

BIOS helpers (``put_char``, ``set_cursor``, ``scroll_up``/``scroll_down``,
``write_cell``, ``read_cell``, ``set_cursor_shape``, ``set_start_address``):
what an INT 10h implementation does through the ports and the frame buffer,
done directly, so the guest reads back what the BIOS wrote (in the buffer and
in CR0A-CR0F).  Teletype follows SeaBIOS's vgabios (what guests under QEMU
see): BEL does nothing here, BS stops at column 0, CR, LF, TAB to the next
multiple of eight columns, wrap at the end of the row, and scrolling the
whole screen up with blank cells of attribute 07h.  The helpers write guest
RAM through the same ``Dma`` view, which must therefore allow writes.

Reset is the state a VGA BIOS leaves after setting mode 3 (80x25 colour text):
the register values of SeaBIOS's mode table for mode 3, the first 64 DAC
entries loaded with the EGA-compatible palette (primary bits 0x2A, secondary
bits 0x15), the rest black, PAS set (display on).

Left out, on purpose: the planar frame buffer, latches, write modes and
graphics modes (memory is plain guest RAM; ``text_mode`` says when the
programmed mode is not text); fonts (characters are decoded as code page
437); the vertical retrace interrupt (CR11 bits 4-5: no IRQ is raised, as in
QEMU); panning (CR08, AR13) and the cursor skew; underline of the
monochrome attribute mode; the video subsystem enable port 0x3C3.
"""
from __future__ import annotations

from dataclasses import dataclass

from devices.base import Dma, DmaError, DeviceStateError, State, check_state
from devices.clock import TICK_HZ, VirtualClock

KIND = "vga"
VERSION = 1

IO_RANGES = ((0x3B4, 2), (0x3BA, 1), (0x3C0, 16), (0x3D4, 2), (0x3DA, 1))

# Miscellaneous Output
MISC_COLOR = 0x01
MISC_RESERVED = 0x10
# Input Status #1
IS1_DISPLAY_DISABLED = 0x01
IS1_VRETRACE = 0x08
FEATURE_MASK = 0x0B
# Attribute controller index register
ATTR_PAS = 0x20

N_SEQ = 5
N_GC = 9
N_CRTC = 25
N_ATTR = 21
DAC_ENTRIES = 256

SEQ_MASK = bytes((0x03, 0x3D, 0x0F, 0x3F, 0x0E))
GC_MASK = bytes((0x0F, 0x0F, 0x0F, 0x1F, 0x03, 0x7B, 0x0F, 0x0F, 0xFF))
ATTR_MASK = bytes([0x3F] * 16 + [0xEF, 0xFF, 0x3F, 0x0F, 0x0F])

# CRTC register numbers
CR_HTOTAL, CR_HDISP_END, CR_VTOTAL, CR_OVERFLOW = 0x00, 0x01, 0x06, 0x07
CR_MAX_SCAN, CR_CURSOR_START, CR_CURSOR_END = 0x09, 0x0A, 0x0B
CR_START_HI, CR_START_LO, CR_CURSOR_HI, CR_CURSOR_LO = 0x0C, 0x0D, 0x0E, 0x0F
CR_VRETRACE_START, CR_VRETRACE_END, CR_VDISP_END, CR_OFFSET = 0x10, 0x11, 0x12, 0x13
CR_MODE, CR_LINE_COMPARE = 0x17, 0x18
CR11_PROTECT = 0x80
CR07_LINE_COMPARE_8 = 0x10

# Mode 3 as a VGA BIOS leaves it (SeaBIOS vgasrc/stdvgamodes.c, mode 03h).
MODE3_MISC = 0x67
MODE3_SEQ = bytes((0x03, 0x00, 0x03, 0x00, 0x02))
MODE3_GC = bytes((0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x0E, 0x0F, 0xFF))
MODE3_CRTC = bytes((0x5F, 0x4F, 0x50, 0x82, 0x55, 0x81, 0xBF, 0x1F,
                    0x00, 0x4F, 0x0D, 0x0E, 0x00, 0x00, 0x00, 0x00,
                    0x9C, 0x8E, 0x8F, 0x28, 0x1F, 0x96, 0xB9, 0xA3,
                    0xFF))
MODE3_ATTR = bytes((0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x14, 0x07,
                    0x38, 0x39, 0x3A, 0x3B, 0x3C, 0x3D, 0x3E, 0x3F,
                    0x0C, 0x00, 0x0F, 0x08, 0x00))

DOT_CLOCKS = (25_175_000, 28_322_000, 25_175_000, 25_175_000)
MAX_ROWS = 128
WINDOWS = ((0xA0000, 0x20000), (0xA0000, 0x10000), (0xB0000, 0x8000), (0xB8000, 0x8000))


def ega_dac() -> bytes:
    """The 768-byte DAC image of the EGA-compatible palette in entries 0-63.

    Palette value bits 0-2 are the primary blue, green, red (2/3 intensity,
    0x2A) and bits 3-5 the secondary ones (1/3, 0x15), per component.
    """
    out = bytearray(DAC_ENTRIES * 3)
    for i in range(64):
        for c, shift in enumerate((2, 1, 0)):  # red, green, blue
            out[i * 3 + c] = 0x2A * ((i >> shift) & 1) + 0x15 * ((i >> (shift + 3)) & 1)
    return bytes(out)


_EGA_DAC = ega_dac()

# Code page 437 as the VGA's ROM font draws it: 00h blank, 01h-1Fh and 7Fh graphic.
_LOW_GLYPHS = "☺☻♥♦♣♠•◘○◙♂♀♪♫☼►◄↕‼¶§▬↨↑↓→←∟↔▲▼"
CP437: tuple[str, ...] = tuple(
    " " if b == 0 else _LOW_GLYPHS[b - 1] if b < 0x20 else "⌂" if b == 0x7F else bytes((b,)).decode("cp437")
    for b in range(256)
)


@dataclass(frozen=True)
class TextFrame:
    """One look at the text display: what a renderer needs, all plain values.

    ``data`` holds rows * cols (character, attribute) byte pairs, row after
    row; ``cursor`` is (row, col) or None when no cursor is drawn.
    """

    cols: int
    rows: int
    data: bytes
    cursor: tuple[int, int] | None
    text_mode: bool
    blanked: bool
    palette_key: bytes


class Vga:
    """The VGA's registers at 0x3B4-0x3DA and its text display, read from guest RAM.

    ``memory`` is a guest-physical view (``devices.base.Dma``): read when
    rendering, written only by the BIOS helpers.  ``clock`` gives the
    raster position for Input Status #1.
    """

    kind = KIND
    io_sizes = (1,)

    def __init__(self, clock: VirtualClock, memory: Dma, name: str = "vga"):
        self.name = name
        self.clock = clock
        self.memory = memory
        self.io_ranges: list[tuple[int, int]] = [(base, n) for base, n in IO_RANGES]
        self.reset()

    # -- reset and state ----------------------------------------------------------
    def reset(self) -> None:
        self.misc = MODE3_MISC
        self.feature = 0
        self.seq_index = 0
        self.seq = bytearray(MODE3_SEQ)
        self.gc_index = 0
        self.gc = bytearray(MODE3_GC)
        self.crtc_index = 0
        self.crtc = bytearray(MODE3_CRTC)
        self.attr_index = ATTR_PAS
        self.attr_flipflop = False  # False: the next 0x3C0 write is an index
        self.attr = bytearray(MODE3_ATTR)
        self.pel_mask = 0xFF
        self.dac = bytearray(_EGA_DAC)
        self.dac_read_index = 0
        self.dac_write_index = 0
        self.dac_sub = 0
        self.dac_state = 0
        self.dac_latch = bytearray(3)
        self._timing: tuple[int, ...] | None = None

    def save_state(self) -> State:
        return {
            "kind": KIND,
            "version": VERSION,
            "misc": self.misc,
            "feature": self.feature,
            "seq_index": self.seq_index,
            "seq": bytes(self.seq),
            "gc_index": self.gc_index,
            "gc": bytes(self.gc),
            "crtc_index": self.crtc_index,
            "crtc": bytes(self.crtc),
            "attr_index": self.attr_index,
            "attr_flipflop": self.attr_flipflop,
            "attr": bytes(self.attr),
            "pel_mask": self.pel_mask,
            "dac": bytes(self.dac),
            "dac_read_index": self.dac_read_index,
            "dac_write_index": self.dac_write_index,
            "dac_sub": self.dac_sub,
            "dac_state": self.dac_state,
            "dac_latch": bytes(self.dac_latch),
        }

    def load_state(self, state: State) -> None:
        check_state(state, KIND, VERSION)

        def integer(key: str, hi: int, reserved: int = 0) -> int:
            v = state.get(key)
            if not isinstance(v, int) or isinstance(v, bool):
                raise DeviceStateError(f"{KIND}: {key} must be an int, not {type(v).__name__}")
            if not 0 <= v <= hi or v & reserved:
                raise DeviceStateError(f"{KIND}: {key}={v:#x} is out of range")
            return v

        def regs(key: str, masks: bytes | int, n: int) -> bytearray:
            v = state.get(key)
            if not isinstance(v, (bytes, bytearray)) or len(v) != n:
                raise DeviceStateError(f"{KIND}: {key} must be {n} bytes")
            for i, b in enumerate(v):
                m = masks if isinstance(masks, int) else masks[i]
                if b & ~m:
                    raise DeviceStateError(f"{KIND}: {key}[{i}]={b:#x} sets bits outside {m:#x}")
            return bytearray(v)

        misc = integer("misc", 0xFF, MISC_RESERVED)
        feature = integer("feature", 0xFF, ~FEATURE_MASK & 0xFF)
        seq_index = integer("seq_index", 7)
        seq = regs("seq", SEQ_MASK, N_SEQ)
        gc_index = integer("gc_index", 0x0F)
        gc = regs("gc", GC_MASK, N_GC)
        crtc_index = integer("crtc_index", 0xFF)
        crtc = regs("crtc", 0xFF, N_CRTC)
        attr_index = integer("attr_index", 0x3F)
        flipflop = state.get("attr_flipflop")
        if not isinstance(flipflop, bool):
            raise DeviceStateError(f"{KIND}: attr_flipflop must be a bool")
        attr = regs("attr", ATTR_MASK, N_ATTR)
        pel_mask = integer("pel_mask", 0xFF)
        dac = regs("dac", 0x3F, DAC_ENTRIES * 3)
        dac_read_index = integer("dac_read_index", 0xFF)
        dac_write_index = integer("dac_write_index", 0xFF)
        dac_sub = integer("dac_sub", 2)
        dac_state = integer("dac_state", 3)
        if dac_state not in (0, 3):
            raise DeviceStateError(f"{KIND}: dac_state must be 0 or 3")
        dac_latch = regs("dac_latch", 0x3F, 3)

        self.misc, self.feature = misc, feature
        self.seq_index, self.seq = seq_index, seq
        self.gc_index, self.gc = gc_index, gc
        self.crtc_index, self.crtc = crtc_index, crtc
        self.attr_index, self.attr_flipflop, self.attr = attr_index, flipflop, attr
        self.pel_mask, self.dac = pel_mask, dac
        self.dac_read_index, self.dac_write_index = dac_read_index, dac_write_index
        self.dac_sub, self.dac_state, self.dac_latch = dac_sub, dac_state, dac_latch
        self._timing = None

    # -- port I/O -----------------------------------------------------------------
    def io_read(self, port: int, size: int) -> int:
        if size == 1:
            return self._read_byte(port)
        v = 0
        for i in range(size if size in (2, 4) else 1):
            v |= self._read_byte(port + i) << (8 * i)
        return v

    def io_write(self, port: int, size: int, value: int) -> None:
        if size == 1:
            self._write_byte(port, value & 0xFF)
            return
        for i in range(size if size in (2, 4) else 1):
            self._write_byte(port + i, (value >> (8 * i)) & 0xFF)

    def _inactive(self, port: int) -> bool:
        """A port of the CRTC block the I/O Address Select bit does not select (or none of ours)."""
        if 0x3B0 <= port <= 0x3BF:
            return bool(self.misc & MISC_COLOR) or port not in (0x3B4, 0x3B5, 0x3BA)
        if 0x3D0 <= port <= 0x3DF:
            return not self.misc & MISC_COLOR or port not in (0x3D4, 0x3D5, 0x3DA)
        return not 0x3C0 <= port <= 0x3CF

    def _read_byte(self, port: int) -> int:
        if self._inactive(port):
            return 0xFF
        low = port & 0x0F
        if port >= 0x3D0 or port < 0x3C0:  # the CRTC block
            if low == 0x4:
                return self.crtc_index
            if low == 0x5:
                return self.crtc[self.crtc_index] if self.crtc_index < N_CRTC else 0
            self.attr_flipflop = False
            return self.input_status_1()
        if low == 0x0:
            return self.attr_index
        if low == 0x1:
            i = self.attr_index & 0x1F
            return self.attr[i] if i < N_ATTR else 0
        if low == 0x2:
            return 0  # Input Status #0
        if low == 0x4:
            return self.seq_index
        if low == 0x5:
            return self.seq[self.seq_index] if self.seq_index < N_SEQ else 0
        if low == 0x6:
            return self.pel_mask
        if low == 0x7:
            return self.dac_state
        if low == 0x8:
            return self.dac_write_index
        if low == 0x9:
            v = self.dac[self.dac_read_index * 3 + self.dac_sub]
            self.dac_sub += 1
            if self.dac_sub == 3:
                self.dac_sub = 0
                self.dac_read_index = (self.dac_read_index + 1) & 0xFF
            return v
        if low == 0xA:
            return self.feature
        if low == 0xC:
            return self.misc
        if low == 0xE:
            return self.gc_index
        if low == 0xF:
            return self.gc[self.gc_index] if self.gc_index < N_GC else 0
        return 0  # 0x3C3, 0x3CB, 0x3CD: nothing there (QEMU reads 0)

    def _write_byte(self, port: int, v: int) -> None:
        if self._inactive(port):
            return
        low = port & 0x0F
        if port >= 0x3D0 or port < 0x3C0:
            if low == 0x4:
                self.crtc_index = v
            elif low == 0x5:
                self._write_crtc(self.crtc_index, v)
            else:
                self.feature = v & FEATURE_MASK
            return
        if low == 0x0:
            if not self.attr_flipflop:
                self.attr_index = v & 0x3F
            else:
                i = self.attr_index & 0x1F
                if i < N_ATTR:
                    self.attr[i] = v & ATTR_MASK[i]
            self.attr_flipflop = not self.attr_flipflop
        elif low == 0x2:
            self.misc = v & ~MISC_RESERVED & 0xFF
            self._timing = None
        elif low == 0x4:
            self.seq_index = v & 0x07
        elif low == 0x5:
            if self.seq_index < N_SEQ:
                self.seq[self.seq_index] = v & SEQ_MASK[self.seq_index]
                self._timing = None
        elif low == 0x6:
            self.pel_mask = v
        elif low == 0x7:
            self.dac_read_index = v
            self.dac_sub = 0
            self.dac_state = 3
        elif low == 0x8:
            self.dac_write_index = v
            self.dac_sub = 0
            self.dac_state = 0
        elif low == 0x9:
            self.dac_latch[self.dac_sub] = v & 0x3F
            self.dac_sub += 1
            if self.dac_sub == 3:
                i = self.dac_write_index * 3
                self.dac[i:i + 3] = self.dac_latch
                self.dac_sub = 0
                self.dac_write_index = (self.dac_write_index + 1) & 0xFF
        elif low == 0xE:
            self.gc_index = v & 0x0F
        elif low == 0xF:
            if self.gc_index < N_GC:
                self.gc[self.gc_index] = v & GC_MASK[self.gc_index]
        # 0x3C1 (attribute data is written through 0x3C0), 0x3C3, 0x3CA-0x3CD: ignored

    def _write_crtc(self, index: int, v: int) -> None:
        if index >= N_CRTC:
            return
        if index <= CR_OVERFLOW and self.crtc[CR_VRETRACE_END] & CR11_PROTECT:
            if index == CR_OVERFLOW:
                keep = self.crtc[CR_OVERFLOW] & ~CR07_LINE_COMPARE_8
                self.crtc[CR_OVERFLOW] = keep | (v & CR07_LINE_COMPARE_8)
            return
        self.crtc[index] = v
        self._timing = None

    # -- raster timing --------------------------------------------------------------
    def _compute_timing(self) -> tuple[int, ...]:
        c = self.crtc
        ov = c[CR_OVERFLOW]
        dot_clock = DOT_CLOCKS[(self.misc >> 2) & 3]
        char_dots = 8 if self.seq[1] & 0x01 else 9
        halve = 2 if self.seq[1] & 0x08 else 1
        htotal = c[CR_HTOTAL] + 5
        hdisp = c[CR_HDISP_END] + 1
        vtotal = (c[CR_VTOTAL] | (ov & 1) << 8 | (ov >> 5 & 1) << 9) + 2
        vdisp = (c[CR_VDISP_END] | (ov >> 1 & 1) << 8 | (ov >> 6 & 1) << 9) + 1
        vrs = c[CR_VRETRACE_START] | (ov >> 2 & 1) << 8 | (ov >> 7 & 1) << 9
        vlen = ((c[CR_VRETRACE_END] - vrs) & 0x0F) or 16
        line_chars = htotal * (2 if c[CR_MODE] & 0x04 else 1)
        frame_chars = line_chars * vtotal
        t = (dot_clock, TICK_HZ * char_dots * halve, htotal, hdisp, line_chars, vdisp, vrs,
             min(vrs + vlen, vtotal), frame_chars)
        self._timing = t
        return t

    def raster_position(self, tick: int | None = None) -> tuple[int, int]:
        """(line, character) the CRT is at, at ``tick`` (default: now)."""
        num, den, htotal, _hdisp, line_chars, _vdisp, _vrs, _vend, frame = (
            self._timing or self._compute_timing())
        pos = (self.clock.now() if tick is None else tick) * num // den % frame
        return pos // line_chars, pos % htotal

    def frame_ticks(self) -> float:
        """Length of one frame in clock ticks (1 / refresh rate), for tests and statistics."""
        num, den, *_rest, frame = self._timing or self._compute_timing()
        return frame * den / num

    def input_status_1(self) -> int:
        """Input Status #1 as the guest reads it now (without the flip-flop side effect)."""
        num, den, htotal, hdisp, line_chars, vdisp, vrs, vend, frame = self._timing or self._compute_timing()
        pos = self.clock.now() * num // den % frame
        line = pos // line_chars
        v = 0
        if vrs <= line < vend:
            v = IS1_VRETRACE | IS1_DISPLAY_DISABLED
        elif line >= vdisp or pos % htotal >= hdisp:
            v = IS1_DISPLAY_DISABLED
        return v

    # -- text display -----------------------------------------------------------------
    @property
    def text_mode(self) -> bool:
        """False when GR06 bit 0 or AR10 bit 0 selects a graphics mode."""
        return not (self.gc[6] & 0x01 or self.attr[0x10] & 0x01)

    @property
    def blanked(self) -> bool:
        """The screen shows nothing: SR01 bit 5 (Screen Off) or PAS clear in the attribute index."""
        return bool(self.seq[1] & 0x20) or not self.attr_index & ATTR_PAS

    @property
    def blink_enabled(self) -> bool:
        """AR10 bit 3: attribute bit 7 blinks (else it selects a bright background)."""
        return bool(self.attr[0x10] & 0x08)

    def start_address(self) -> int:
        return self.crtc[CR_START_HI] << 8 | self.crtc[CR_START_LO]

    def cursor_location(self) -> int:
        return self.crtc[CR_CURSOR_HI] << 8 | self.crtc[CR_CURSOR_LO]

    def char_height(self) -> int:
        h = (self.crtc[CR_MAX_SCAN] & 0x1F) + 1
        return h * 2 if self.crtc[CR_MAX_SCAN] & 0x80 else h

    def geometry(self) -> tuple[int, int]:
        """(columns, rows) of the text display as the CRTC is programmed (80, 25 after reset)."""
        c = self.crtc
        ov = c[CR_OVERFLOW]
        vdisp = (c[CR_VDISP_END] | (ov >> 1 & 1) << 8 | (ov >> 6 & 1) << 9) + 1
        return c[CR_HDISP_END] + 1, max(1, min(MAX_ROWS, vdisp // self.char_height()))

    def pitch(self) -> int:
        """Cells from the start of one row to the next (CR13 * 2, word mode)."""
        return self.crtc[CR_OFFSET] * 2

    def window(self) -> tuple[int, int]:
        """(guest-physical base, size) of the memory map GR06 bits 2-3 select."""
        return WINDOWS[(self.gc[6] >> 2) & 3]

    def _row_starts(self, rows: int) -> list[int]:
        c = self.crtc
        start, pitch, height = self.start_address(), self.pitch(), self.char_height()
        compare = c[CR_LINE_COMPARE] | (c[CR_OVERFLOW] >> 4 & 1) << 8 | (c[CR_MAX_SCAN] >> 6 & 1) << 9
        out = []
        split = None
        for r in range(rows):
            if split is None and r * height > compare:
                split = r
            out.append((start + r * pitch if split is None else (r - split) * pitch) & 0xFFFF)
        return out

    def _read_window(self) -> bytes:
        base, size = self.window()
        try:
            return self.memory.read(base, size)
        except DmaError:
            return bytes(size)  # no RAM behind the window: nothing to show

    def screen_bytes(self) -> bytes:
        """The displayed cells as (character, attribute) byte pairs, row after row."""
        cols, rows = self.geometry()
        mem = self._read_window()
        size = len(mem)
        out = bytearray()
        for rs in self._row_starts(rows):
            off = rs * 2 % size
            end = off + cols * 2
            out += mem[off:end] if end <= size else mem[off:] + mem[:end - size]
        return bytes(out)

    def cells(self) -> list[list[tuple[int, int]]]:
        """Rows of (character code, attribute) pairs."""
        cols, _rows = self.geometry()
        data = self.screen_bytes()
        return [list(zip(data[r:r + 2 * cols:2], data[r + 1:r + 2 * cols:2], strict=True))
                for r in range(0, len(data), 2 * cols)]

    def text_screen(self) -> list[str]:
        """The display as text, one string per row, code page 437 decoded to Unicode."""
        cols, _rows = self.geometry()
        data = self.screen_bytes()
        return ["".join(CP437[b] for b in data[r:r + 2 * cols:2]) for r in range(0, len(data), 2 * cols)]

    def cursor_position(self) -> tuple[int, int] | None:
        """(row, col) of the cell the CRTC draws the cursor in, or None if it draws none."""
        c = self.crtc
        first, last = c[CR_CURSOR_START], c[CR_CURSOR_END] & 0x1F
        if first & 0x20 or (first & 0x1F) > last or (first & 0x1F) > (c[CR_MAX_SCAN] & 0x1F):
            return None
        cols, rows = self.geometry()
        loc = self.cursor_location()
        for r, rs in enumerate(self._row_starts(rows)):
            col = (loc - rs) & 0xFFFF
            if col < cols:
                return r, col
        return None

    def cursor_shape(self) -> tuple[int, int]:
        """(first, last) scan line of the cursor inside the character cell (CR0A, CR0B bits 0-4)."""
        return self.crtc[CR_CURSOR_START] & 0x1F, self.crtc[CR_CURSOR_END] & 0x1F

    def text_frame(self) -> TextFrame:
        """Everything a renderer draws, read at one moment."""
        cols, rows = self.geometry()
        return TextFrame(cols, rows, self.screen_bytes(), self.cursor_position(), self.text_mode,
                         self.blanked, self.palette_key())

    # -- colours --------------------------------------------------------------------
    def palette_key(self) -> bytes:
        """Every register a text colour depends on; equal keys mean equal colours."""
        return bytes(self.attr) + bytes((self.pel_mask,)) + bytes(self.dac)

    def dac_rgb(self, index: int) -> tuple[int, int, int]:
        """DAC entry ``index`` as 8-bit red, green, blue (6-bit values widened)."""
        i = (index & 0xFF) * 3
        r, g, b = self.dac[i:i + 3]
        return (r << 2 | r >> 4, g << 2 | g >> 4, b << 2 | b >> 4)

    def color_rgb(self, color: int) -> tuple[int, int, int]:
        """A 4-bit text colour through the colour plane enable, the palette, the colour
        select (AR14, with AR10 bit 7) and the pixel mask, to the DAC's RGB."""
        a = self.attr
        p = a[color & a[0x12] & 0x0F]
        if a[0x10] & 0x80:
            index = (a[0x14] & 0x0F) << 4 | (p & 0x0F)
        else:
            index = (a[0x14] & 0x0C) << 4 | p
        return self.dac_rgb(index & self.pel_mask)

    def attribute_rgb(self, attr: int) -> tuple[tuple[int, int, int], tuple[int, int, int], bool]:
        """(foreground RGB, background RGB, blinks) of a text attribute byte."""
        bg = attr >> 4 & 0x0F
        blink = False
        if self.blink_enabled:
            blink = bool(bg & 0x08)
            bg &= 0x07
        return self.color_rgb(attr & 0x0F), self.color_rgb(bg), blink

    # -- BIOS helpers (INT 10h) ---------------------------------------------------------
    def _row_len(self) -> int:
        return self.pitch() or self.geometry()[0]

    def _cell_gpa(self, row: int, col: int) -> int:
        base, size = self.window()
        return base + ((self.start_address() + row * self._row_len() + col) & 0xFFFF) * 2 % size

    def _write_span(self, row: int, col: int, data: bytes) -> None:
        """Cells from (row, col) on, splitting where the address wraps round the window."""
        base, size = self.window()
        gpa = self._cell_gpa(row, col)
        first = min(len(data), base + size - gpa)
        self.memory.write(gpa, data[:first])
        if first < len(data):
            self.memory.write(base, data[first:])

    def _read_span(self, row: int, col: int, n: int) -> bytes:
        base, size = self.window()
        gpa = self._cell_gpa(row, col)
        first = min(n, base + size - gpa)
        out = self.memory.read(gpa, first)
        return out + self.memory.read(base, n - first) if first < n else out

    def cursor(self) -> tuple[int, int]:
        """(row, col) of CR0E:CR0F relative to the start address, as INT 10h AH=03h reports it."""
        return divmod((self.cursor_location() - self.start_address()) & 0xFFFF, self._row_len())

    def set_cursor(self, row: int, col: int) -> None:
        """Move the hardware cursor (CR0E:CR0F) to (row, col) of the displayed page."""
        loc = (self.start_address() + row * self._row_len() + col) & 0xFFFF
        self.crtc[CR_CURSOR_HI] = loc >> 8
        self.crtc[CR_CURSOR_LO] = loc & 0xFF

    def set_cursor_shape(self, first: int, last: int) -> None:
        """CR0A/CR0B as INT 10h AH=01h sets them (CH bit 5 hides the cursor)."""
        self.crtc[CR_CURSOR_START] = first & 0x3F
        self.crtc[CR_CURSOR_END] = last & 0x1F

    def set_start_address(self, address: int) -> None:
        """CR0C:CR0D: the cell shown top left (INT 10h AH=05h: page * page size / 2)."""
        self.crtc[CR_START_HI] = address >> 8 & 0xFF
        self.crtc[CR_START_LO] = address & 0xFF

    def write_cell(self, row: int, col: int, ch: int, attr: int | None = None) -> None:
        """Store a character (and its attribute, unless None) at (row, col)."""
        if attr is None:
            self.memory.write(self._cell_gpa(row, col), bytes((ch & 0xFF,)))
        else:
            self._write_span(row, col, bytes((ch & 0xFF, attr & 0xFF)))

    def read_cell(self, row: int, col: int) -> tuple[int, int]:
        """(character, attribute) at (row, col), as INT 10h AH=08h returns them."""
        ch, attr = self._read_span(row, col, 2)
        return ch, attr

    def put_char(self, ch: int, attr: int | None = None) -> None:
        """INT 10h AH=0Eh teletype output at the cursor (SeaBIOS's ``write_teletype``).

        ``attr`` None keeps each cell's attribute, as AH=0Eh does in text
        modes; a value stores it too (AH=13h with attributes).
        """
        cols, rows = self.geometry()
        row, col = self.cursor()
        row, col = min(row, rows - 1), min(col, cols - 1)
        ch &= 0xFF
        if ch == 0x07:
            pass
        elif ch == 0x08:
            col = max(0, col - 1)
        elif ch == 0x0D:
            col = 0
        elif ch == 0x0A:
            row += 1
        elif ch == 0x09:
            while True:
                self.write_cell(row, col, 0x20, attr)
                col += 1
                if col >= cols or col % 8 == 0:
                    break
        else:
            self.write_cell(row, col, ch, attr)
            col += 1
        if col >= cols:
            col = 0
            row += 1
        if row >= rows:
            self.scroll_up(1, 0x07)
            row = rows - 1
        self.set_cursor(row, col)

    def _clip(self, window: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        cols, rows = self.geometry()
        top, left, bottom, right = window if window is not None else (0, 0, rows - 1, cols - 1)
        bottom, right = min(bottom, rows - 1), min(right, cols - 1)
        if top > bottom or left > right or top < 0 or left < 0:
            return None
        return top, left, bottom, right

    def scroll_up(self, lines: int, attr: int = 0x07,
                  window: tuple[int, int, int, int] | None = None) -> None:
        """INT 10h AH=06h: move the window's rows up ``lines`` rows, blank the rows uncovered
        with spaces of ``attr``; ``lines`` 0 (or more than the window) blanks it all.
        ``window`` is (top, left, bottom, right), inclusive; None is the whole screen."""
        self._scroll(lines, attr, window, up=True)

    def scroll_down(self, lines: int, attr: int = 0x07,
                    window: tuple[int, int, int, int] | None = None) -> None:
        """INT 10h AH=07h: as ``scroll_up``, downwards."""
        self._scroll(lines, attr, window, up=False)

    def _scroll(self, lines: int, attr: int, window: tuple[int, int, int, int] | None, up: bool) -> None:
        box = self._clip(window)
        if box is None:
            return
        top, left, bottom, right = box
        height, width = bottom - top + 1, right - left + 1
        if lines <= 0 or lines > height:
            lines = height
        order = range(top, bottom - lines + 1) if up else range(bottom, top + lines - 1, -1)
        for row in order:
            self._write_span(row, left, self._read_span(row + lines if up else row - lines, left, width * 2))
        blank = bytes((0x20, attr & 0xFF)) * width
        fill = range(bottom - lines + 1, bottom + 1) if up else range(top, top + lines)
        for row in fill:
            self._write_span(row, left, blank)

    def clear(self, attr: int = 0x07) -> None:
        """Blank the displayed page with spaces of ``attr`` and home the cursor."""
        self.scroll_up(0, attr)
        self.set_cursor(0, 0)
