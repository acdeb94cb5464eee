"""ASCII <-> PC scan code set 1 (what a PC's 8042 delivers with translation on).

Console input is typed text; a PC keyboard sends make/break scan codes.  Only
the US layout's printable keys, Enter, Backspace, Tab and Escape are mapped;
Shift and Ctrl are pressed around characters that need them.
"""
from __future__ import annotations

_ROWS = {
    0x02: "1!", 0x03: "2@", 0x04: "3#", 0x05: "4$", 0x06: "5%", 0x07: "6^", 0x08: "7&", 0x09: "8*",
    0x0A: "9(", 0x0B: "0)", 0x0C: "-_", 0x0D: "=+", 0x10: "qQ", 0x11: "wW", 0x12: "eE", 0x13: "rR",
    0x14: "tT", 0x15: "yY", 0x16: "uU", 0x17: "iI", 0x18: "oO", 0x19: "pP", 0x1A: "[{", 0x1B: "]}",
    0x1E: "aA", 0x1F: "sS", 0x20: "dD", 0x21: "fF", 0x22: "gG", 0x23: "hH", 0x24: "jJ", 0x25: "kK",
    0x26: "lL", 0x27: ";:", 0x28: "'\"", 0x29: "`~", 0x2B: "\\|", 0x2C: "zZ", 0x2D: "xX", 0x2E: "cC",
    0x2F: "vV", 0x30: "bB", 0x31: "nN", 0x32: "mM", 0x33: ",<", 0x34: ".>", 0x35: "/?", 0x39: "  ",
}
SHIFT, CTRL = 0x2A, 0x1D

TO_SCAN: dict[int, tuple[int, bool]] = {}      # ascii -> (scan code, shifted)
for _code, _pair in _ROWS.items():
    TO_SCAN.setdefault(ord(_pair[0]), (_code, False))
    TO_SCAN.setdefault(ord(_pair[1]), (_code, True))
TO_SCAN.update({0x0D: (0x1C, False), 0x0A: (0x1C, False), 0x08: (0x0E, False), 0x7F: (0x0E, False),
                0x09: (0x0F, False), 0x1B: (0x01, False)})

# scan code -> (unshifted ascii, shifted ascii) for the BIOS keyboard handler
FROM_SCAN: dict[int, tuple[int, int]] = {c: (ord(p[0]), ord(p[1])) for c, p in _ROWS.items()}
FROM_SCAN.update({0x1C: (0x0D, 0x0D), 0x0E: (0x08, 0x08), 0x0F: (0x09, 0x09), 0x01: (0x1B, 0x1B)})


def ascii_to_set1(data: bytes) -> bytes:
    out = bytearray()
    for ch in data:
        if 1 <= ch <= 26 and ch not in (0x08, 0x09, 0x0A, 0x0D):  # Ctrl-letter
            code = _ROWS_INV[ch + 0x60]
            out += bytes((CTRL, code, code | 0x80, CTRL | 0x80))
            continue
        hit = TO_SCAN.get(ch)
        if hit is None:
            continue
        code, shifted = hit
        if shifted:
            out += bytes((SHIFT, code, code | 0x80, SHIFT | 0x80))
        else:
            out += bytes((code, code | 0x80))
    return bytes(out)


_ROWS_INV = {ord(p[0]): c for c, p in _ROWS.items()}
