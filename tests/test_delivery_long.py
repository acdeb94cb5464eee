"""IA-32e (64-bit) mode interrupt and exception delivery, Intel SDM vol. 3A 6.14.

* 16-byte gates (6.14.1): only 64-bit interrupt and trap gates; anything else
  is #GP(vector*16+2+EXT); the target must be a 64-bit code segment.
* The frame (6.14.2) is always SS, RSP, RFLAGS, CS, RIP [, error code], each
  8 bytes, pushed after RSP is aligned down to 16, with or without a
  privilege change.
* A privilege change loads RSP from TSS.RSPn and SS with the NULL selector
  (RPL = new CPL) (6.14.4); a non-zero gate IST selects TSS.ISTn always
  (6.14.5).
* IRETQ pops all five slots and returns to ring 3 with SS:RSP restored.
"""
from __future__ import annotations

import struct

import pytest

from tools import guestkit
from tools.guestkit import (
    CODE,
    KCODE32,
    KCODE64,
    KDATA32,
    PT,
    STACK0,
    STACK3,
    STACK_IST,
    TSS,
    UCODE64,
    UDATA32,
    USER,
    asm,
)
from vmm.cpu.vcpu import CS, SS

EXIT = "mov dx, 0x501\nout dx, al\n"
SCR = 0x60000
EF_IF, EF_IOPL3 = 1 << 9, 3 << 12
PD = PT + 0x2000  # the page directory: entry 0 maps 0-2 MiB, entry 1 2-4 MiB (2 MiB pages)

# copies 7 qwords at the handler's entry RSP to SCR..SCR+0x30, then entry RSP,
# SS, CS, RFLAGS to SCR+0x38..0x50, and counts entries at SCR+0x58
RECORD = f"""
push rax
mov rax, [rsp+8]
mov [{SCR:#x}], rax
mov rax, [rsp+16]
mov [{SCR + 0x8:#x}], rax
mov rax, [rsp+24]
mov [{SCR + 0x10:#x}], rax
mov rax, [rsp+32]
mov [{SCR + 0x18:#x}], rax
mov rax, [rsp+40]
mov [{SCR + 0x20:#x}], rax
mov rax, [rsp+48]
mov [{SCR + 0x28:#x}], rax
mov rax, [rsp+56]
mov [{SCR + 0x30:#x}], rax
lea rax, [rsp+8]
mov [{SCR + 0x38:#x}], rax
xor eax, eax
mov ax, ss
mov [{SCR + 0x40:#x}], rax
mov ax, cs
mov [{SCR + 0x48:#x}], rax
pushfq
pop rax
mov [{SCR + 0x50:#x}], rax
inc qword ptr [{SCR + 0x58:#x}]
pop rax
"""

AFTER = f"""
mov [{SCR + 0x80:#x}], rsp
xor eax, eax
mov ax, ss
mov [{SCR + 0x88:#x}], rax
mov ax, cs
mov [{SCR + 0x90:#x}], rax
pushfq
pop rax
mov [{SCR + 0x98:#x}], rax
mov qword ptr [{SCR + 0xA0:#x}], 0x600d
"""


def _check(src: str, bits: int) -> None:
    assert asm(src, bits), f"keystone could not assemble:\n{src}"


class G(guestkit.Guest):
    def long_mode(self, code: str, ring: int = 0, at: int | None = None) -> None:
        _check(code, 64)
        super().long_mode(code, ring, at)
        self.cpu.rflags = self.cpu.rflags | EF_IOPL3  # ring-3 code may use the exit port

    def idt64(self, vector: int, handler: str | None = None, **kw) -> int:
        if handler is not None:
            _check(handler, 64)
        return super().idt64(vector, handler, **kw)

    def q(self, i: int) -> int:
        return self.u64(SCR + 8 * i)

    def frame(self, n: int = 7) -> list[int]:
        return [self.q(i) for i in range(n)]

    h_rsp = property(lambda self: self.q(7))
    h_ss = property(lambda self: self.q(8))
    h_cs = property(lambda self: self.q(9))
    h_rflags = property(lambda self: self.q(10))
    entries = property(lambda self: self.q(11))
    a_rsp = property(lambda self: self.u64(SCR + 0x80))
    a_ss = property(lambda self: self.u64(SCR + 0x88))
    a_cs = property(lambda self: self.u64(SCR + 0x90))
    a_rflags = property(lambda self: self.u64(SCR + 0x98))
    a_done = property(lambda self: self.u64(SCR + 0xA0))

    def set_tss64(self, off: int, value: int) -> None:
        self.put(TSS + off, struct.pack("<Q", value))

    def run_exit(self, limit: int = 200_000):
        r = self.run(limit)
        assert r.reason.value == "exit", str(r)
        return r


def addr_after(code: str, nlines: int, base: int) -> int:
    lines = [ln for ln in code.strip().splitlines() if ln.strip()]
    return base + len(asm("\n".join(lines[:nlines]), 64, base))


RSP0, RSP_IST1 = 0x4, 0x24  # TSS offsets


# ---------------------------------------------------------------------------
# frames and stacks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("misalign", [0, 8])
def test_ring0_frame_is_ss_rsp_rflags_cs_rip_after_16_byte_alignment(misalign):
    code = f"""
sub rsp, {misalign}
mov rbx, 0x11
int 0x40
mov rbx, 0x22
""" + AFTER + EXIT
    g = G()
    g.long_mode(code)
    g.idt64(0x40, RECORD + "mov rcx, rbx\niretq")
    g.run_exit()
    rip, cs, rflags, rsp, ss = g.frame(5)
    old = STACK0 - misalign
    assert rip == addr_after(code, 3, CODE)
    assert cs == KCODE64
    assert rflags & 2 and rflags & EF_IOPL3 == EF_IOPL3
    assert rsp == old  # the unaligned RSP at the INT
    assert ss == KDATA32  # SS:RSP pushed even without a privilege change
    assert g.h_rsp == (old & ~0xF) - 40
    assert g.h_ss == KDATA32 and g.h_cs == KCODE64
    assert g.cpu.gpr(1) == 0x11
    assert g.cpu.gpr(3) == 0x22
    assert g.a_rsp == old  # IRETQ restored the unaligned RSP
    assert g.entries == 1


@pytest.mark.parametrize("gtype", [0xE, 0xF])
def test_interrupt_gate_clears_if_trap_gate_does_not(gtype):
    code = "sti\nint 0x40\n" + AFTER + EXIT
    g = G()
    g.long_mode(code)
    g.idt64(0x40, RECORD + "iretq", gtype=gtype)
    g.run_exit()
    assert g.frame(3)[2] & EF_IF
    assert bool(g.h_rflags & EF_IF) == (gtype == 0xF)
    assert g.a_rflags & EF_IF


@pytest.mark.parametrize("rsp0", [STACK0, STACK0 - 8])
def test_ring3_to_ring0_uses_rsp0_null_ss_and_iretq_returns_to_ring3(rsp0):
    code = """
push 0x1234
mov rbx, 0x11
int 0x40
mov rbx, 0x22
""" + AFTER + EXIT
    g = G()
    g.long_mode(code, ring=3)
    g.set_tss64(RSP0, rsp0)
    g.idt64(0x40, RECORD + "iretq", dpl=3)
    g.run_exit()
    rip, cs, rflags, rsp, ss = g.frame(5)
    assert rip == addr_after(code, 3, USER)
    assert cs == UCODE64
    assert rflags & EF_IOPL3 == EF_IOPL3 and rflags & 2
    assert rsp == STACK3 - 8
    assert ss == UDATA32
    assert g.h_rsp == (rsp0 & ~0xF) - 40
    assert g.h_ss == 0  # NULL selector, RPL = new CPL 0
    assert g.h_cs == KCODE64  # CPL 0
    # back in ring 3
    assert g.a_cs == UCODE64
    assert g.a_ss == UDATA32
    assert g.a_rsp == STACK3 - 8
    assert g.cpu.cpl == 3
    assert g.cpu.gpr(3) == 0x22


def test_ist_stack_used_without_a_privilege_change():
    code = "mov rbx, 0x11\nint 0x40\n" + AFTER + EXIT
    g = G()
    g.long_mode(code)
    g.idt64(0x40, RECORD + "iretq", ist=1)
    g.run_exit()
    rip, cs, rflags, rsp, ss = g.frame(5)
    assert g.h_rsp == STACK_IST - 40
    assert cs == KCODE64 and rflags & 2
    assert rsp == STACK0 and ss == KDATA32
    assert rip == addr_after(code, 2, CODE)
    assert g.a_rsp == STACK0


def test_ist_wins_over_rsp0_on_a_privilege_change_and_is_aligned():
    code = "int 0x40\n" + AFTER + EXIT
    g = G()
    g.long_mode(code, ring=3)
    g.set_tss64(RSP_IST1, STACK_IST - 0x18)
    g.idt64(0x40, RECORD + "iretq", ist=1, dpl=3)
    g.run_exit()
    assert g.h_rsp == STACK_IST - 0x20 - 40
    assert g.h_ss == 0
    assert g.frame(5)[3:] == [STACK3, UDATA32]
    assert g.a_cs == UCODE64 and g.a_rsp == STACK3


def test_exception_in_compatibility_mode_pushes_a_64bit_frame():
    # a 32-bit code segment (L=0, D=1) under IA-32e is compatibility mode;
    # delivery still goes through the 64-bit IDT with an 8-byte frame
    compat = CODE + 0x800
    code = f"""
push {KCODE32}
push {compat:#x}
retfq
"""
    g = G()
    g.long_mode(code)
    c32 = "mov ebx, 0x11\nint 0x40\nmov ebx, 0x22\n" + EXIT
    g.put(compat, asm(c32, 32, compat))
    g.idt64(0x40, RECORD + "iretq")
    g.run_exit()
    rip, cs, rflags, rsp, ss = g.frame(5)
    assert rip == compat + 7
    assert rflags & 2 and rflags >> 32 == 0
    assert cs == KCODE32
    assert rsp == STACK0 and ss == KDATA32
    assert g.h_cs == KCODE64
    assert g.h_rsp == STACK0 - 40
    assert g.cpu.gpr(3) == 0x22
    assert g.cpu.seg(CS).selector == KCODE32  # IRETQ went back to compatibility mode


# ---------------------------------------------------------------------------
# error codes, #PF
# ---------------------------------------------------------------------------

def test_gp_error_code_on_an_8_byte_slot_and_restart():
    code = """
mov ax, 0x7f8
mov ds, ax
mov rbx, 0x22
""" + EXIT
    g = G()
    g.long_mode(code)
    g.cpu.rsp = STACK0 - 8
    g.idt64(13, RECORD + f"mov ax, {KDATA32}\nadd rsp, 8\niretq")
    g.run_exit()
    ec, rip, cs, rflags, rsp, ss = g.frame(6)
    assert ec == 0x7F8
    assert rflags & 2 and rflags & (1 << 16)  # RF=1 pushed for a fault (vol. 3B 17.3.1.1)
    assert rip == CODE + 4  # the MOV DS
    assert cs == KCODE64 and rsp == STACK0 - 8 and ss == KDATA32
    assert g.h_rsp == STACK0 - 16 - 48
    assert g.entries == 1
    assert g.cpu.gpr(3) == 0x22


@pytest.mark.parametrize("insn,vector,rip_off", [("ud2", 6, 0), ("int3", 3, 1), ("div rcx", 0, 0)])
def test_exceptions_without_error_code(insn, vector, rip_off):
    code = f"xor ecx, ecx\nmov eax, 100\nxor edx, edx\n{insn}\nmov rbx, 0x22\n" + EXIT
    g = G()
    g.long_mode(code)
    fix = {6: "add qword ptr [rsp], 2\n", 3: "", 0: "mov ecx, 4\n"}[vector]
    g.idt64(vector, RECORD + fix + "iretq")
    g.run_exit()
    rip, cs, rflags, rsp, ss = g.frame(5)
    assert rip == addr_after(code, 3, CODE) + rip_off
    assert rflags & 2
    assert (cs, rsp, ss) == (KCODE64, STACK0, KDATA32)
    assert g.h_rsp == STACK0 - 40
    assert g.cpu.gpr(3) == 0x22
    if vector == 0:
        assert g.cpu.gpr(0) == 25


PF_FIX = f"""
mov rax, cr2
mov [{SCR + 0x60:#x}], rax
or qword ptr [{PD + 8:#x}], 7
btr qword ptr [{PD + 8:#x}], 63
invlpg [rax]
"""


@pytest.mark.parametrize("ring,pde,access,expect", [
    (0, 0x80, "read", 0b00000),
    (0, 0x80, "write", 0b00010),
    (0, 0x81, "write", 0b00011),     # read-only, CR0.WP=1
    (3, 0x80, "write", 0b00110),
    (3, 0x85, "write", 0b00111),     # read-only user page
    (3, 0x83, "read", 0b00101),      # supervisor page
    (0, 0x83 | 1 << 63, "fetch", 0b10001),  # NX page, instruction fetch: I/D | P
])
def test_page_fault_cr2_and_error_code(ring, pde, access, expect):
    target = 0x2000F8
    # (keystone mis-encodes `mov reg, [abs]` as RIP-relative: use a base register)
    insn = {"read": "mov rdi, [rsi]",
            "write": "mov qword ptr [rsi], 0x5a5a",
            "fetch": "call rsi"}[access]
    code = f"mov rsi, {target:#x}\nmov rbx, 0x11\n{insn}\nmov rbx, 0x22\n" + AFTER + EXIT
    g = G()
    g.long_mode(code, ring=ring)
    g.put(target, struct.pack("<Q", 0xBEEF) if access != "fetch" else asm("mov rdi, 0xBEEF\nret", 64))
    g.put(PD + 8, struct.pack("<Q", 0x200000 | pde))
    g.idt64(14, RECORD + PF_FIX + "add rsp, 8\niretq")
    g.run_exit()
    base = USER if ring == 3 else CODE
    ec, rip, cs = g.frame(3)
    assert g.u64(SCR + 0x60) == target  # CR2
    assert ec == expect
    if access == "fetch":
        assert rip == target  # the fetch faulted at the target itself
    else:
        assert rip == addr_after(code, 2, base)
    assert cs == (UCODE64 if ring == 3 else KCODE64)
    assert g.entries == 1
    assert g.cpu.gpr(3) == 0x22
    if access == "write":
        assert g.u64(target) == 0x5A5A
    else:
        assert g.cpu.gpr(7) == 0xBEEF


# ---------------------------------------------------------------------------
# delivery checks: gate DPL, presence, IDT limit, gate type, target segment
# ---------------------------------------------------------------------------

SKIP_GP = """
add rsp, 8
add qword ptr [rsp], {n}
iretq
"""


@pytest.mark.parametrize("insn,vector,length", [("int 0x40", 0x40, 2), ("int3", 3, 1), ("int 0x80", 0x80, 2)])
def test_software_interrupt_through_a_dpl0_gate_from_ring3_is_gp(insn, vector, length):
    code = f"mov rbx, 0x11\n{insn}\nmov rbx, 0x22\n" + AFTER + EXIT
    g = G()
    g.long_mode(code, ring=3)
    g.idt64(vector, "mov rbx, 0xbad\niretq", dpl=0)
    g.idt64(13, RECORD + SKIP_GP.format(n=length))
    g.run_exit()
    ec, rip, cs, rflags, rsp, ss = g.frame(6)
    assert ec == vector * 16 + 2  # IDT bit, no EXT
    assert rflags & EF_IOPL3 == EF_IOPL3
    assert rip == addr_after(code, 1, USER)  # the INT instruction
    assert (cs, rsp, ss) == (UCODE64, STACK3, UDATA32)
    assert g.h_rsp == STACK0 - 48
    assert g.h_ss == 0
    assert g.cpu.gpr(3) == 0x22
    assert g.a_cs == UCODE64 and g.cpu.cpl == 3


def test_software_int_to_a_not_present_gate_is_np():
    code = "int 0x40\nmov rbx, 0x22\n" + EXIT
    g = G()
    g.long_mode(code)
    g.idt64(0x40, "mov rbx, 0xbad\niretq", present=False)
    g.idt64(11, RECORD + SKIP_GP.format(n=2))
    g.run_exit()
    assert g.frame(2) == [0x40 * 16 + 2, CODE]
    assert g.cpu.gpr(3) == 0x22


def test_exception_to_a_not_present_gate_is_np_with_ext():
    code = "ud2\nmov rbx, 0x22\n" + EXIT
    g = G()
    g.long_mode(code)
    g.idt64(6, "mov rbx, 0xbad\niretq", present=False)
    g.idt64(11, RECORD + SKIP_GP.format(n=2))
    g.run_exit()
    assert g.frame(2) == [6 * 16 + 3, CODE]
    assert g.cpu.gpr(3) == 0x22


@pytest.mark.parametrize("limit", [0x40 * 16 - 1, 0x40 * 16 + 14])
def test_vector_beyond_the_idt_limit_is_gp(limit):
    code = "int 0x40\nmov rbx, 0x22\n" + EXIT
    g = G()
    g.long_mode(code)
    g.set_idt(limit)
    g.idt64(0x40, "mov rbx, 0xbad\niretq")
    g.idt64(13, RECORD + SKIP_GP.format(n=2))
    g.run_exit()
    assert g.frame(2) == [0x40 * 16 + 2, CODE]
    assert g.cpu.gpr(3) == 0x22


@pytest.mark.parametrize("gtype", [0x5, 0x6, 0x7, 0xC, 0x9])
def test_legacy_gate_types_are_gp_in_ia32e_mode(gtype):
    code = "int 0x40\nmov rbx, 0x22\n" + EXIT
    g = G()
    g.long_mode(code)
    g.idt64(0x40, "mov rbx, 0xbad\niretq", gtype=gtype)
    g.idt64(13, RECORD + SKIP_GP.format(n=2))
    g.run_exit()
    assert g.frame(2) == [0x40 * 16 + 2, CODE]
    assert g.cpu.gpr(3) == 0x22


@pytest.mark.parametrize("selector,expect", [(KCODE32, KCODE32), (0, 0), (KDATA32, KDATA32)])
def test_gate_target_must_be_a_64bit_code_segment(selector, expect):
    code = "int 0x40\nmov rbx, 0x22\n" + EXIT
    g = G()
    g.long_mode(code)
    g.idt64(0x40, "mov rbx, 0xbad\niretq", selector=selector)
    g.idt64(13, RECORD + SKIP_GP.format(n=2))
    g.run_exit()
    assert g.frame(2) == [expect, CODE]
    assert g.cpu.gpr(3) == 0x22


def test_hardware_exception_from_ring3_ignores_gate_dpl_and_switches_stack():
    code = "push 0x77\nud2\n" + EXIT
    g = G()
    g.long_mode(code, ring=3)
    g.idt64(6, RECORD + EXIT, dpl=0)
    g.run_exit()
    assert g.frame(5) == [USER + 2, UCODE64, g.frame(3)[2], STACK3 - 8, UDATA32]
    assert g.h_rsp == STACK0 - 40
    assert g.h_ss == 0
    assert g.cpu.seg(SS).selector == 0
