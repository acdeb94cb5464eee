"""The VGA on a whole PcMachine: a boot sector programs the CRTC with 16-bit OUTs,
writes the text buffer as memory, uses INT 10h and polls the retrace bit, and
the display shows it, through a ``DmaView`` over the machine's EPT.

INT 10h moves the CRTC's cursor to the BIOS's, as a real BIOS does: the guest
set it to row 1 column 2, and after the BIOS printed 'B' at its own cursor
(row 0, column 0) the hardware cursor is at row 0, column 1.
"""
from __future__ import annotations

import io

from devices.display.vga import Vga
from host.display import TextDisplay
from tools.guestkit import asm
from vmm.firmware.boot import boot
from vmm.machine import StopReason
from vmm.platform.pc import PcConfig, PcMachine

# CR11 = 0 (lift the CR0-7 protection); cursor at 0x0052 (row 1, column 2);
# "OK" in yellow on blue at row 1; INT 10h teletype 'B' at the BIOS's cursor;
# wait for the end of a vertical retrace and the start of the next; read CR0F
# back and exit with it.  (Keystone reads ';' as a statement separator, so the
# comments live here.)
GUEST = """
    mov dx, 0x3d4
    mov ax, 0x0011
    out dx, ax
    mov ax, 0x000e
    out dx, ax
    mov ax, 0x520f
    out dx, ax
    mov ax, 0xb800
    mov es, ax
    mov word ptr es:[0xa0], 0x1e4f
    mov word ptr es:[0xa2], 0x1e4b
    mov ax, 0x0e42
    int 0x10
    mov dx, 0x3da
w1: in al, dx
    test al, 8
    jnz w1
w2: in al, dx
    test al, 8
    jz w2
    mov dx, 0x3d4
    mov al, 0x0f
    out dx, al
    inc dx
    in al, dx
    mov dx, 0x501
    out dx, al
    hlt
"""


def boot_sector() -> bytes:
    code = asm(GUEST, 16, 0x7C00)
    return code + bytes(510 - len(code)) + b"\x55\xaa"


def run() -> tuple[PcMachine, Vga, object]:
    m = PcMachine(PcConfig(mem_size=4 << 20))
    vga = m.vga
    boot(m, boot_sector(), "disk", name="vga-test")
    return m, vga, m.run(20_000_000)


def test_a_guest_programs_the_vga_and_the_display_shows_it():
    m, vga, res = run()
    assert res.reason is StopReason.EXIT and res.status == 0x01
    lines = vga.text_screen()
    assert lines[0][0] == "B" and lines[1].startswith("OK")
    assert vga.cells()[1][0] == (ord("O"), 0x1E)
    assert vga.cursor_position() == (0, 1)
    assert vga.crtc[0x11] == 0x00
    line, _char = vga.raster_position()
    assert 412 <= line < 414          # the guest stopped inside the retrace it waited for
    out = io.StringIO()
    d = TextDisplay(vga, out, tty=True, size=(80, 25), clock=lambda: 0.0)
    d.start()
    assert "\x1b[2;1H\x1b[0;93;44mOK" in out.getvalue()
    assert out.getvalue().endswith("\x1b[1;2H\x1b[?25h")
    d.stop()
    assert out.getvalue().endswith("B\nOK\n")


def test_the_run_is_deterministic():
    m1, vga1, r1 = run()
    m2, vga2, r2 = run()
    assert (r1.icount, r1.status) == (r2.icount, r2.status)
    assert vga1.save_state() == vga2.save_state() and m1.clock.now() == m2.clock.now()
