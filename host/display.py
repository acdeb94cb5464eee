"""Showing the guest's VGA text display on the host: ``--display text`` and ``--display none``.

Outside the determinism boundary: a display only *reads* the VGA (its
registers and, through the VGA's memory view, the text buffer) and never
changes anything the guest can see.  How often it draws is paced by the host
clock (``fps``), which is why it lives in host/ and not in devices/.

``TextDisplay`` on a terminal draws the screen with ANSI escape codes on the
alternate screen: colours from the attribute bytes through the VGA's palette
and DAC (the sixteen standard colours become the terminal's own sixteen,
anything else a 24-bit colour, or the nearest of the sixteen with
``colors="16"``), blinking as the terminal's blink attribute, and the
terminal's cursor where the VGA draws its cursor.  Each frame rewrites only
the cells that changed since the previous one.  ``stop()`` leaves the
alternate screen and prints the last screen as plain text, so it stays in
the scrollback.  Anything but a terminal (a pipe, a file, a StringIO) gets
just that plain text dump, at ``stop()``.

``NullDisplay`` (``--display none``) draws nothing.  ``make_display(kind,
vga, out)`` returns the one the CLI option names.
"""
from __future__ import annotations

import atexit
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Protocol

from devices.display.vga import CP437, TextFrame, Vga

ESC = "\x1b["
ENTER = ESC + "?1049h" + ESC + "?25l"
LEAVE = ESC + "0m" + ESC + "?25h" + ESC + "?1049l"
SHOW_CURSOR = ESC + "?25h"
HIDE_CURSOR = ESC + "?25l"
CLEAR = ESC + "0m" + ESC + "2J"
GAP = 4  # unchanged cells between two changed ones that are rewritten rather than skipped with a move

GRAPHICS_NOTICE = "[the VGA is in a graphics mode: not shown]"


class Display(Protocol):
    def start(self) -> None: ...

    def frame(self, force: bool = False) -> bool: ...

    def stop(self) -> None: ...


def standard_colors() -> list[tuple[int, int, int]]:
    """The sixteen text colours of the BIOS's palette (CGA order: bit 0 blue, 1 green,
    2 red, 3 intensity), as 8-bit RGB: 0xAA per colour bit, 0x55 more when bright,
    and colour 6 brown rather than dark yellow."""
    out = []
    for i in range(16):
        bright = 0x55 * (i >> 3 & 1)
        r, g, b = (0xAA * (i >> 2 & 1) + bright, 0xAA * (i >> 1 & 1) + bright, 0xAA * (i & 1) + bright)
        if i == 6:
            g = 0x55
        out.append((r, g, b))
    return out


STANDARD = standard_colors()
_STANDARD_INDEX = {rgb: i for i, rgb in enumerate(STANDARD)}


def _ansi(i: int, background: bool) -> str:
    """SGR code of CGA colour ``i`` (blue is bit 0 there, red bit 0 in ANSI)."""
    code = (i & 1) << 2 | (i & 2) | (i >> 2 & 1)
    base = (100 if background else 90) if i & 8 else (40 if background else 30)
    return str(base + code)


def _nearest(rgb: tuple[int, int, int]) -> int:
    return min(range(16), key=lambda i: sum((a - b) ** 2 for a, b in zip(rgb, STANDARD[i], strict=True)))


def color_code(rgb: tuple[int, int, int], background: bool, colors: str) -> str:
    i = _STANDARD_INDEX.get(rgb)
    if i is None and colors == "16":
        i = _nearest(rgb)
    if i is not None:
        return _ansi(i, background)
    return f"{48 if background else 38};2;{rgb[0]};{rgb[1]};{rgb[2]}"


def plain_text(frame: TextFrame) -> str:
    """The screen as plain text: rows without trailing blanks, no trailing empty rows."""
    if not frame.text_mode:
        return GRAPHICS_NOTICE + "\n"
    width = 2 * frame.cols
    rows = ["".join(CP437[b] for b in frame.data[r:r + width:2]).replace("\xa0", " ").rstrip()
            for r in range(0, len(frame.data), width)]
    while rows and not rows[-1]:
        rows.pop()
    return "".join(row + "\n" for row in rows)


class NullDisplay:
    """``--display none``: the guest's screen goes nowhere."""

    def start(self) -> None:
        pass

    def frame(self, force: bool = False) -> bool:
        return False

    def stop(self) -> None:
        pass


class TextDisplay:
    """``--display text``: the VGA text screen in a terminal, or as text at the end.

    Call ``start()`` once, ``frame()`` as often as convenient (it draws at most
    ``fps`` times a second of host time and returns whether it drew), and
    ``stop()`` at the end (it is safe to call twice, and runs at exit if
    forgotten).  ``tty`` overrides the terminal check, ``size`` the
    terminal's (columns, rows), ``clock`` the host clock (tests).
    """

    def __init__(self, vga: Vga, out: IO[str] | None = None, *, fps: float = 30.0, colors: str = "auto",
                 tty: bool | None = None, size: tuple[int, int] | None = None,
                 clock: Callable[[], float] = time.monotonic, dump_on_stop: bool = True):
        if colors not in ("auto", "16", "none"):
            raise ValueError(f"colors must be auto, 16 or none, not {colors!r}")
        self.vga = vga
        self.out: IO[str] = out if out is not None else sys.stdout
        if tty is None:
            isatty = getattr(self.out, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self.interval = 1.0 / fps if fps > 0 else 0.0
        self.colors = colors
        self.size = size
        self.clock = clock
        self.dump_on_stop = dump_on_stop
        self.frames = 0          # frames drawn
        self.bytes_written = 0
        self._started = False
        self._last_time: float | None = None
        self._last: TextFrame | None = None
        self._shown: list[list[tuple[str, str]]] = []   # what the terminal shows: (glyph, SGR) per cell
        self._layout: tuple | None = None
        self._styles: list[str] = []
        self._palette: bytes | None = None
        self._cursor: tuple[int, int] | None = None
        self._glyphs = self._encodable_glyphs()

    def _encodable_glyphs(self) -> list[str]:
        enc = getattr(self.out, "encoding", None) or "utf-8"
        out = []
        for g in CP437:
            g = " " if g == "\xa0" else g
            try:
                g.encode(enc)
            except (UnicodeEncodeError, LookupError):
                g = "?"
            out.append(g)
        return out

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        if self.tty:
            self._write(ENTER)
            atexit.register(self.stop)
            self.frame(force=True)

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        frame = self.vga.text_frame()
        if self.tty:
            atexit.unregister(self.stop)
            self._write(LEAVE)
        if self.dump_on_stop:
            self._write(plain_text(frame))

    # -- drawing ----------------------------------------------------------------------
    def frame(self, force: bool = False) -> bool:
        """Draw what changed, if a frame is due (or ``force``); True if it drew."""
        if not self.tty or not self._started:
            return False
        now = self.clock()
        if not force and self._last_time is not None and now - self._last_time < self.interval:
            return False
        self._last_time = now
        f = self.vga.text_frame()
        if not force and f == self._last and self._layout is not None \
                and self._terminal_size() == self._layout[2:]:
            return False
        self._last = f
        self._write(self.render(f))
        self.frames += 1
        return True

    def _terminal_size(self) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        try:
            ts = os.get_terminal_size(self.out.fileno())
            return ts.columns, ts.lines
        except (OSError, ValueError, AttributeError):
            return 80, 25

    def _style_table(self, f: TextFrame) -> list[str]:
        if f.palette_key != self._palette:
            self._palette = f.palette_key
            styles = []
            for attr in range(256):
                fg, bg, blink = self.vga.attribute_rgb(attr)
                if self.colors == "none":
                    styles.append(ESC + "0m")
                    continue
                sgr = f"0;{color_code(fg, False, self.colors)};{color_code(bg, True, self.colors)}"
                styles.append(f"{ESC}{sgr}{';5' if blink else ''}m")
            self._styles = styles
        return self._styles

    def _cells(self, f: TextFrame, cols: int, rows: int) -> list[list[tuple[str, str]]]:
        styles = self._style_table(f)
        blank = (" ", ESC + "0m")
        if not f.text_mode or f.blanked:
            grid = [[blank] * cols for _ in range(rows)]
            if not f.text_mode and rows:
                notice = GRAPHICS_NOTICE[:cols]
                grid[0] = [(c, ESC + "0m") for c in notice] + [blank] * (cols - len(notice))
            return grid
        glyphs = self._glyphs
        width = 2 * f.cols
        data = f.data
        return [[(glyphs[data[r * width + 2 * c]], styles[data[r * width + 2 * c + 1]]) for c in range(cols)]
                for r in range(rows)]

    def render(self, f: TextFrame) -> str:
        """The escape sequences that turn the terminal's last frame into ``f``."""
        term_cols, term_rows = self._terminal_size()
        cols, rows = min(f.cols, term_cols), min(f.rows, term_rows)
        grid = self._cells(f, cols, rows)
        parts: list[str] = []
        layout = (cols, rows, term_cols, term_rows)
        if layout != self._layout:
            self._layout = layout
            self._shown = []
            parts.append(CLEAR)
        shown = self._shown
        current = None
        for r, row in enumerate(grid):
            old = shown[r] if r < len(shown) else None
            if old == row:
                continue
            changed = [c for c in range(cols) if old is None or old[c] != row[c]]
            runs: list[list[int]] = []
            for c in changed:
                if runs and c - runs[-1][1] <= GAP:
                    runs[-1][1] = c
                else:
                    runs.append([c, c])
            for first, last in runs:
                parts.append(f"{ESC}{r + 1};{first + 1}H")
                for glyph, style in row[first:last + 1]:
                    if style != current:
                        parts.append(style)
                        current = style
                    parts.append(glyph)
            if r < len(shown):
                shown[r] = row
            else:
                shown.append(row)
        cursor = f.cursor if f.text_mode and not f.blanked else None
        if cursor is not None and (cursor[0] >= rows or cursor[1] >= cols):
            cursor = None
        if parts or cursor != self._cursor:
            if cursor is None:
                parts.append(HIDE_CURSOR)
            else:
                parts.append(f"{ESC}{cursor[0] + 1};{cursor[1] + 1}H{SHOW_CURSOR}")
            self._cursor = cursor
        return "".join(parts)

    def _write(self, text: str) -> None:
        if not text:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):
            return  # a closed terminal or pipe: the guest runs on regardless
        self.bytes_written += len(text)


def make_display(kind: str, vga: Vga | None, out: IO[str] | None = None, **options) -> Display:
    """The display ``--display KIND`` names: "text" (needs the machine's VGA) or "none"."""
    if kind == "none":
        return NullDisplay()
    if kind == "text":
        if vga is None:
            raise ValueError("--display text needs a machine with a VGA")
        return TextDisplay(vga, out, **options)
    raise ValueError(f"unknown display {kind!r} (text or none)")
