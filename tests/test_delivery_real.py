"""Real-address-mode interrupt and exception delivery (Intel SDM vol. 3A 20.1.4,
"Interrupt and Exception Handling" in real-address mode; vol. 2A INT n).

The processor indexes the IVT at IDTR.base (4 bytes per vector: IP then CS),
pushes FLAGS, CS and IP (in that order, so [SP] = IP, [SP+2] = CS,
[SP+4] = FLAGS), clears IF, TF, AC and RF, and jumps to the vector.  A fault
(#DE) pushes the address of the faulting instruction; a trap (INT n, INT3,
INTO) pushes the address of the next instruction.  IRET pops IP, CS, FLAGS.
"""
from __future__ import annotations

import struct

import pytest

from devices.legacy.pic import Pic8259Pair
from tools import guestkit
from tools.guestkit import asm
from vmm.cpu.vcpu import CS, SS

EXIT = "mov dx, 0x501\nout dx, al\n"
SCRATCH = 0x600
ORG = 0x7C00

# handler prologue: copy the 3-word frame at SS:SP and the handler's own view
# (SP, FLAGS) to SCRATCH; all accesses through DS=0
RECORD = """
push bp
mov bp, sp
push ax
mov ax, [bp+2]
mov [0x600], ax
mov ax, [bp+4]
mov [0x602], ax
mov ax, [bp+6]
mov [0x604], ax
lea ax, [bp+2]
mov [0x606], ax
pushf
pop ax
mov [0x608], ax
mov ax, ss
mov [0x60a], ax
mov ax, cs
mov [0x60c], ax
pop ax
pop bp
"""


class Guest(guestkit.Guest):
    """The guest kit's Guest, refusing code keystone silently failed to assemble."""

    def real_mode(self, code: str, at: int = ORG) -> None:
        assert asm(code, 16, at), f"keystone could not assemble:\n{code}"
        super().real_mode(code, at)

    def ivt(self, vector: int, handler: str, seg: int = 0, off: int | None = None) -> int:
        assert asm(handler, 16), f"keystone could not assemble:\n{handler}"
        if off is None:  # 0x80 bytes per handler, clear of the scratch area and the code
            off = 0x8000 + vector * 0x80
        return super().ivt(vector, handler, seg, off)


def u16(g: Guest, addr: int) -> int:
    return g.u32(addr) & 0xFFFF


def frame(g: Guest) -> tuple[int, int, int]:
    """(IP, CS, FLAGS) as the handler found them on its stack."""
    return u16(g, SCRATCH), u16(g, SCRATCH + 2), u16(g, SCRATCH + 4)


def offset_of(code: str, marker_lines: int) -> int:
    """Address of the instruction after the first ``marker_lines`` lines of ``code``."""
    lines = [ln for ln in code.strip().splitlines()]
    return ORG + len(asm("\n".join(lines[:marker_lines]), 16, ORG))


def run_exit(g: Guest, status: int | None = None):
    r = g.run(100_000)
    assert r.reason.value == "exit", str(r)
    if status is not None:
        assert g.exit_status == status
    return r


def test_divide_error_is_a_fault_pushing_the_div_address_and_iret_restarts_it():
    code = """
xor ax, ax
mov ds, ax
xor bx, bx
xor dx, dx
mov ax, 100
div bx
mov si, 0x1234
""" + EXIT
    g = Guest()
    g.real_mode(code)
    # the handler fixes the divisor: IRET re-executes the DIV
    g.ivt(0, RECORD + "mov bx, 4\ninc word ptr [0x620]\niret")
    run_exit(g)
    ip, cs, fl = frame(g)
    assert ip == offset_of(code, 5)  # the DIV itself
    assert cs == 0
    assert fl & 2  # reserved bit 1 always set
    assert u16(g, 0x620) == 1  # exactly one #DE
    assert g.cpu.gpr(0) & 0xFFFF == 25  # 100 / 4 after the restart
    assert g.cpu.gpr(6) & 0xFFFF == 0x1234


def test_int_n_is_a_trap_frame_order_and_handler_cs_ip_from_the_ivt():
    code = """
xor ax, ax
mov ds, ax
mov ax, 0x8d7
push ax
popf
int 0x42
mov si, 0x1234
""" + EXIT
    g = Guest()
    g.real_mode(code)
    sp0 = 0x7000
    g.ivt(0x42, RECORD + "mov di, 0x5678\niret", seg=0x1000, off=0x0100)
    run_exit(g)
    ip, cs, fl = frame(g)
    assert ip == offset_of(code, 6)  # the instruction after INT 0x42
    assert cs == 0
    # FLAGS pushed as they were (0x8d7 with bit 1 forced; IOPL/NT bits 12-15 read as written on 386+)
    assert fl == 0x8D7 | 2
    # the handler runs at the IVT's CS:IP, with SP lowered by exactly 3 words
    assert u16(g, SCRATCH + 0xC) == 0x1000
    assert u16(g, SCRATCH + 6) == sp0 - 6
    assert u16(g, SCRATCH + 0xA) == 0  # SS unchanged
    # IRET returned to the next instruction, FLAGS and SP restored
    assert g.cpu.gpr(7) & 0xFFFF == 0x5678
    assert g.cpu.gpr(6) & 0xFFFF == 0x1234
    assert g.cpu.rsp & 0xFFFF == sp0
    assert g.cpu.rflags & 0xFFF == 0x8D7 | 2
    assert g.cpu.seg(CS).selector == 0


def test_ivt_is_found_through_idtr_base():
    # LIDT in real mode moves the IVT (SDM 20.1.4: "the IDTR ... base address")
    code = """
xor ax, ax
mov ds, ax
lidt [0x6f0]
int 0x21
mov si, 0x1234
""" + EXIT
    g = Guest()
    g.real_mode(code)
    g.put(0x6F0, struct.pack("<HI", 0x3FF, 0x5000))
    g.put(0x5000 + 0x21 * 4, struct.pack("<HH", 0x0900, 0))
    g.put(0x900, asm("mov di, 0x77\niret", 16, 0x900))
    g.ivt(0x21, "mov di, 0x66\niret")  # the IVT at 0: must not be used
    run_exit(g)
    assert g.cpu.gpr(7) & 0xFFFF == 0x77
    assert g.cpu.gpr(6) & 0xFFFF == 0x1234


def test_int3_pushes_the_address_after_the_one_byte_cc():
    code = """
xor ax, ax
mov ds, ax
int3
mov si, 0x1234
""" + EXIT
    g = Guest()
    g.real_mode(code)
    g.ivt(3, RECORD + "iret")
    run_exit(g)
    ip, cs, _ = frame(g)
    assert ip == offset_of(code, 3) == ORG + 4 + 1
    assert cs == 0
    assert g.cpu.gpr(6) & 0xFFFF == 0x1234


def test_into_traps_only_when_of_is_set():
    code = """
xor ax, ax
mov ds, ax
mov al, 1
add al, 1
into
mov al, 0x7f
add al, 1
into
mov si, 0x1234
""" + EXIT
    g = Guest()
    g.real_mode(code)
    g.ivt(4, RECORD + "inc word ptr [0x620]\niret")
    run_exit(g)
    assert u16(g, 0x620) == 1  # the first INTO (OF=0) did nothing
    ip, _, fl = frame(g)
    assert ip == offset_of(code, 8)  # after the second INTO
    assert fl & (1 << 11)  # OF was set in the pushed FLAGS
    assert g.cpu.gpr(6) & 0xFFFF == 0x1234


def test_if_cleared_in_the_handler_and_restored_by_iret():
    code = """
xor ax, ax
mov ds, ax
sti
int 0x30
pushf
pop word ptr [0x640]
""" + EXIT
    g = Guest()
    g.real_mode(code)
    g.ivt(0x30, RECORD + "iret")
    run_exit(g)
    _, _, pushed = frame(g)
    assert pushed & 0x200  # IF=1 when INT executed
    assert not u16(g, 0x608) & 0x200  # IF=0 inside the handler
    assert u16(g, 0x640) & 0x200  # IF=1 again after IRET


def test_tf_cleared_in_the_handler_restored_by_iret():
    # With TF=1 every instruction ends with a single-step #DB (vector 1).  The
    # INT 0x30 handler must run with TF=0 (no #DB inside it), and IRET restores
    # TF=1 so the instructions after it are single-stepped again.
    code = """
xor ax, ax
mov ds, ax
pushf
pop ax
or ax, 0x100
push ax
popf
nop
int 0x30
nop
nop
pushf
pop ax
and ax, 0xfeff
push ax
popf
mov si, 0x1234
""" + EXIT
    g = Guest()
    g.real_mode(code)
    # the #DB handler logs each trapping IP at [0x700 + 2*n], n at [0x6fe]
    g.ivt(1, """
push bp
mov bp, sp
push ax
push bx
mov bx, [0x6fe]
mov ax, [bp+2]
mov [bx+0x700], ax
add word ptr [0x6fe], 2
pop bx
pop ax
pop bp
iret
""")
    g.ivt(0x30, RECORD + "nop\nnop\niret")
    run_exit(g)
    _, _, pushed = frame(g)
    assert pushed & 0x100  # TF=1 when INT executed
    assert not u16(g, 0x608) & 0x100  # TF=0 inside the handler
    n = u16(g, 0x6FE) // 2
    ips = [u16(g, 0x700 + 2 * i) for i in range(n)]
    handler_lo, handler_hi = 0x8000 + 0x30 * 0x80, 0x8000 + 0x31 * 0x80
    assert not any(handler_lo <= ip < handler_hi for ip in ips), [hex(i) for i in ips]
    # SDM 17.3.1.4: the trap follows each instruction that began with TF=1:
    # first after the NOP that follows the POPF which set TF, none after the INT
    # (delivery cleared TF) nor inside the handler, none after IRET itself but
    # after the instruction following it, and last after the POPF clearing TF
    assert ips == [offset_of(code, k) for k in (8, 10, 11, 12, 13, 14, 15, 16)], [hex(i) for i in ips]
    assert g.cpu.gpr(6) & 0xFFFF == 0x1234


def test_stack_pointer_wraps_at_zero():
    code = """
xor ax, ax
mov ds, ax
mov ax, 0x5000
mov ss, ax
xor sp, sp
int 0x31
mov [0x650], sp
mov ax, ss
mov [0x652], ax
xor ax, ax
mov ss, ax
mov sp, 0x7000
""" + EXIT
    g = Guest()
    g.real_mode(code)
    g.ivt(0x31, RECORD + "iret")
    run_exit(g)
    # the frame went to 0x5000:FFFA..FFFF (SP wrapped 0 -> FFFE)
    assert u16(g, 0x606) == 0xFFFA
    assert u16(g, 0x60A) == 0x5000
    assert u16(g, 0x5FFFA) == offset_of(code, 6)  # IP
    assert u16(g, 0x5FFFC) == 0  # CS
    assert u16(g, 0x5FFFE) & 2  # FLAGS
    # nothing was written below the segment (linear 0x4FFFE..0x4FFFF)
    assert u16(g, 0x4FFFE) == 0
    # IRET wrapped SP back to 0
    assert u16(g, 0x650) == 0
    assert u16(g, 0x652) == 0x5000


@pytest.mark.parametrize("vector", [0x00, 0x13, 0xFF])
def test_handler_entered_at_ivt_segment_offset(vector):
    code = """
xor ax, ax
mov ds, ax
""" + ("div ax\n" if vector == 0 else f"int {vector:#x}\n") + EXIT
    g = Guest()
    g.real_mode(code)
    g.ivt(vector, "mov ax, cs\nmov [0x660], ax\ncall next\nnext: pop ax\nmov [0x662], ax\n" + EXIT,
          seg=0x2000, off=0x40)
    run_exit(g)
    assert u16(g, 0x660) == 0x2000
    assert u16(g, 0x662) == 0x40 + len(asm("mov ax, cs\nmov [0x660], ax\ncall next\nnext:", 16, 0x40))
    assert g.cpu.seg(CS).base == 0x20000
    assert g.cpu.seg(SS).selector == 0


class IrqPoke:
    """OUT 0x510, n pulses IRQ n of the PIC (a minimal port device)."""

    name = "irqpoke"
    def __init__(self, pic: Pic8259Pair):
        self.io_ranges = [(0x510, 1)]
        self.pic = pic

    def io_read(self, port: int, size: int) -> int:
        return 0xFF

    def io_write(self, port: int, size: int, value: int) -> None:
        self.pic.irq_line(value & 0xF).pulse()

    def reset(self) -> None:
        pass

    def save_state(self) -> dict:
        return {"kind": "irqpoke", "version": 1}

    def load_state(self, state: dict) -> None:
        pass


@pytest.mark.parametrize("irq,vector", [(3, 0x0B), (0, 0x08), (12, 0x74)])
def test_hardware_interrupt_vectors_through_the_ivt_after_the_out(irq, vector):
    code = f"""
xor ax, ax
mov ds, ax
sti
mov al, {irq}
mov dx, 0x510
out dx, al
mov si, 0x1234
""" + EXIT
    g = Guest()
    g.real_mode(code)
    pic = Pic8259Pair()
    pic.program_like_pc_bios()
    g.m.add_device(pic)
    g.m.set_interrupt_controller(pic)
    g.m.add_device(IrqPoke(pic))
    eoi = "mov al, 0x20\nout 0xa0, al\nout 0x20, al\n" if irq >= 8 else "mov al, 0x20\nout 0x20, al\n"
    g.ivt(vector, RECORD + "mov [0x670], si\ninc word ptr [0x620]\n" + eoi + "iret")
    run_exit(g)
    assert u16(g, 0x620) == 1
    ip, cs, fl = frame(g)
    assert ip == offset_of(code, 6)  # right after OUT
    assert cs == 0
    assert fl & 0x200
    assert not u16(g, 0x608) & 0x200
    assert u16(g, 0x670) == 0  # MOV SI had not run
    assert g.cpu.gpr(6) & 0xFFFF == 0x1234
    assert not pic.intr
