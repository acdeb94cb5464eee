"""SYSENTER/SYSEXIT and SYSCALL/SYSRET, Intel SDM vol. 2B.

SYSENTER (emulated by the VMM): CS = IA32_SYSENTER_CS (0x174) & 0xFFFC,
SS = CS + 8, flat 4-GiB segments, CPL 0, ESP = IA32_SYSENTER_ESP (0x175),
EIP = IA32_SYSENTER_EIP (0x176), EFLAGS.VM/IF/RF cleared; #GP(0) if the CS
MSR is 0 or CR0.PE = 0.  SYSEXIT: CS = SYSENTER_CS + 16 | 3,
SS = SYSENTER_CS + 24 | 3, EIP = EDX, ESP = ECX.

SYSCALL (emulated by the VMM): #UD unless IA32_EFER.SCE = 1, IA32_EFER.LMA = 1
and CS.L = 1; RCX = next RIP, R11 = RFLAGS, RIP = IA32_LSTAR, CS =
STAR[47:32] & 0xFFFC, SS = STAR[47:32] + 8, CPL 0, RFLAGS &= ~IA32_FMASK.
SYSRET (REX.W): RIP = RCX, RFLAGS = R11, CS = STAR[63:48] + 16 | 3,
SS = STAR[63:48] + 8 | 3.

Each of SYSENTER and SYSCALL retires as exactly one instruction.
"""
from __future__ import annotations

import pytest

from tools import guestkit
from tools.guestkit import (
    CODE,
    HANDLERS,
    KCODE32,
    KCODE64,
    STACK3,
    UCODE32,
    UCODE64,
    UDATA32,
    USER,
    asm,
)
from vmm.cpu.vcpu import CS, DS, SS

EXIT = "mov dx, 0x501\nout dx, al\n"
SCR = 0x60000
SYSENTER_CS, SYSENTER_ESP, SYSENTER_EIP = 0x174, 0x175, 0x176
EFER, STAR, LSTAR, FMASK = 0xC000_0080, 0xC000_0081, 0xC000_0082, 0xC000_0084
EF_TF, EF_IF, EF_DF, EF_IOPL3, EF_AC = 1 << 8, 1 << 9, 1 << 10, 3 << 12, 1 << 18
ENTRY = HANDLERS + 0x100
KSTACK = 0x6F000


class G(guestkit.Guest):
    def protected_mode(self, code: str, ring: int = 0, paging: bool = False, at: int | None = None) -> None:
        assert asm(code, 32), code
        super().protected_mode(code, ring, paging, at)
        self.cpu.rflags = self.cpu.rflags | EF_IOPL3

    def long_mode(self, code: str, ring: int = 0, at: int | None = None) -> None:
        assert asm(code, 64), code
        super().long_mode(code, ring, at)
        self.cpu.rflags = self.cpu.rflags | EF_IOPL3

    def code_at(self, at: int, src: str, bits: int) -> None:
        b = asm(src, bits, at)
        assert b, src
        self.put(at, b)

    def d(self, i: int) -> int:
        return self.u32(SCR + 4 * i)

    def q(self, i: int) -> int:
        return self.u64(SCR + 8 * i)

    def run_exit(self, limit: int = 100_000):
        r = self.run(limit)
        assert r.reason.value == "exit", str(r)
        return r


# ---------------------------------------------------------------------------
# SYSENTER / SYSEXIT
# ---------------------------------------------------------------------------

REC_SYSENTER = f"""
mov [{SCR:#x}], esp
xor eax, eax
mov ax, cs
mov [{SCR + 4:#x}], eax
mov ax, ss
mov [{SCR + 8:#x}], eax
pushfd
pop eax
mov [{SCR + 12:#x}], eax
mov [{SCR + 16:#x}], ebx
"""

REC_AFTER32 = f"""
mov [{SCR + 0x20:#x}], esp
xor eax, eax
mov ax, cs
mov [{SCR + 0x24:#x}], eax
mov ax, ss
mov [{SCR + 0x28:#x}], eax
mov [{SCR + 0x2C:#x}], ebx
"""


def sysenter_guest(user: str, handler: str, cs: int = KCODE32, ring: int = 3) -> G:
    g = G()
    g.protected_mode(user, ring=ring)
    g.cpu.set_msr(SYSENTER_CS, cs)
    g.cpu.set_msr(SYSENTER_ESP, KSTACK)
    g.cpu.set_msr(SYSENTER_EIP, ENTRY)
    g.code_at(ENTRY, handler, 32)
    return g


def test_sysenter_from_ring3_and_sysexit_back():
    ret = USER + 0x200
    g = sysenter_guest("sti\nmov ebx, 0x11\nsysenter\nmov ebx, 0xbad\n" + EXIT,
                       REC_SYSENTER + f"mov ebx, 0x22\nmov edx, {ret:#x}\nmov ecx, {STACK3 - 0x40:#x}\nsysexit")
    g.code_at(ret, REC_AFTER32 + EXIT, 32)
    g.run_exit()
    esp, cs, ss, eflags, ebx = (g.d(i) for i in range(5))
    assert esp == KSTACK
    assert cs == KCODE32  # CPL 0
    assert ss == KCODE32 + 8
    assert not eflags & EF_IF
    assert ebx == 0x11
    # SYSEXIT: EIP = EDX, ESP = ECX, CS = SYSENTER_CS + 16 | 3, SS = + 24 | 3
    assert g.d(8) == STACK3 - 0x40
    assert g.d(9) == KCODE32 + 16 | 3 == UCODE32
    assert g.d(10) == KCODE32 + 24 | 3 == UDATA32
    assert g.d(11) == 0x22
    assert g.cpu.cpl == 3


def test_sysenter_loads_flat_cpl0_segments_from_the_msr():
    # SYSENTER_CS = 0x50: CS/SS come from the MSR alone, no descriptor is read
    g = sysenter_guest("mov ebx, 0x11\nsysenter\n", EXIT, cs=0x53)
    g.cpu.set_msr(SYSENTER_ESP, KSTACK + 0x123)
    g.run_exit()
    cpu = g.cpu
    assert cpu.cpl == 0
    assert cpu.seg(CS).selector == 0x50  # RPL forced to 0
    assert cpu.seg(SS).selector == 0x58
    for s in (CS, SS):
        assert cpu.seg(s).base == 0 and cpu.seg(s).limit == 0xFFFF_FFFF
        assert (cpu.seg(s).flags >> 13) & 3 == 0
    assert cpu.seg(CS).flags & (1 << 22)  # 32-bit code
    assert cpu.seg(SS).flags & (1 << 22)
    assert cpu.rsp & 0xFFFF_FFFF == KSTACK + 0x123
    assert cpu.rip == ENTRY + len(asm(EXIT, 32))
    assert cpu.seg(DS).selector == UDATA32  # other segments untouched


def test_sysenter_clears_if_and_keeps_other_flags():
    g = sysenter_guest("sti\nstd\nsysenter\n", "pushfd\npop eax\n" + f"mov [{SCR:#x}], eax\n" + EXIT)
    g.run_exit()
    fl = g.d(0)
    assert not fl & EF_IF
    assert fl & EF_DF and fl & EF_IOPL3 == EF_IOPL3


def test_sysenter_with_a_null_cs_msr_is_gp0():
    g = sysenter_guest("mov ebx, 0x11\nsysenter\n" + EXIT, EXIT, cs=0)
    g.idt32(13, f"""
mov eax, [esp]
mov [{SCR:#x}], eax
mov eax, [esp+4]
mov [{SCR + 4:#x}], eax
mov eax, [esp+8]
mov [{SCR + 8:#x}], eax
mov ebx, 0x77
""" + EXIT)
    g.run_exit()
    assert g.d(0) == 0  # error code 0
    assert g.d(1) == USER + 5  # the SYSENTER faulted
    assert g.d(2) == UCODE32
    assert g.cpu.gpr(3) == 0x77


def test_sysenter_in_real_mode_is_gp():
    g = G()
    g.real_mode("mov bx, 0x11\nsysenter\nmov bx, 0xbad\n" + EXIT)
    g.cpu.set_msr(SYSENTER_CS, KCODE32)
    g.cpu.set_msr(SYSENTER_EIP, ENTRY)
    g.ivt(13, "mov bp, sp\nmov ax, [bp]\nmov [0x600], ax\nmov bx, 0x77\n" + EXIT)
    g.run_exit()
    assert g.u32(0x600) & 0xFFFF == 0x7C00 + 3  # IP of SYSENTER, no error code in real mode
    assert g.cpu.gpr(3) & 0xFFFF == 0x77


@pytest.mark.parametrize("bits", [32, 64])
def test_sysenter_and_syscall_retire_as_one_instruction(bits):
    insn = "sysenter" if bits == 32 else "syscall"
    counts = []
    for variant in (insn, "nop"):
        g = G()
        code = f"mov eax, 1\n{variant}\n" + ("" if variant != "nop" else EXIT)
        if bits == 32:
            g.protected_mode(code, ring=0)
            g.cpu.set_msr(SYSENTER_CS, KCODE32)
            g.cpu.set_msr(SYSENTER_ESP, KSTACK)
            g.cpu.set_msr(SYSENTER_EIP, ENTRY)
        else:
            g.long_mode(code, ring=0)
            g.cpu.set_msr(STAR, KCODE64 << 32)
            g.cpu.set_msr(LSTAR, ENTRY)
        g.code_at(ENTRY, EXIT, bits)
        counts.append(g.run_exit().icount)
    assert counts[0] == counts[1] == 4


# ---------------------------------------------------------------------------
# SYSCALL / SYSRET
# ---------------------------------------------------------------------------

STAR_VALUE = (0x20 << 48) | (KCODE64 << 32)  # SYSRET: CS 0x33, SS 0x2B; SYSCALL: CS 0x28, SS 0x30

REC_SYSCALL = f"""
mov [{SCR:#x}], rcx
mov [{SCR + 8:#x}], r11
mov [{SCR + 0x10:#x}], rsp
pushfq
pop rax
mov [{SCR + 0x28:#x}], rax
xor eax, eax
mov ax, cs
mov [{SCR + 0x18:#x}], rax
mov ax, ss
mov [{SCR + 0x20:#x}], rax
mov [{SCR + 0x30:#x}], rbx
"""

USER_SYSCALL = f"""
sti
std
push 0x5
pushfq
pop rax
mov [{SCR + 0x38:#x}], rax
mov rbx, 0x11
syscall
mov [{SCR + 0x40:#x}], rbx
pushfq
pop rax
mov [{SCR + 0x48:#x}], rax
xor eax, eax
mov ax, cs
mov [{SCR + 0x50:#x}], rax
mov ax, ss
mov [{SCR + 0x58:#x}], rax
mov [{SCR + 0x60:#x}], rsp
""" + EXIT


def syscall_guest(user: str, handler: str, ring: int = 3, fmask: int = EF_IF | EF_DF | EF_AC) -> G:
    g = G()
    g.long_mode(user, ring=ring)
    g.cpu.set_msr(STAR, STAR_VALUE)
    g.cpu.set_msr(LSTAR, ENTRY)
    g.cpu.set_msr(FMASK, fmask)
    g.code_at(ENTRY, handler, 64)
    return g


def test_syscall_from_ring3_and_sysret_back():
    g = syscall_guest(USER_SYSCALL, REC_SYSCALL + "mov rbx, 0x22\nsysret")
    g.run_exit()
    lines = [ln for ln in USER_SYSCALL.strip().splitlines()]
    next_rip = USER + len(asm("\n".join(lines[:lines.index("syscall") + 1]), 64, USER))
    user_flags = g.q(7)
    assert user_flags & EF_IF and user_flags & EF_DF
    rcx, r11, rsp, cs, ss, rflags, rbx = (g.q(i) for i in range(7))
    assert rcx == next_rip
    assert r11 == user_flags
    assert rsp == STACK3 - 8  # SYSCALL does not switch stacks
    assert cs == KCODE64  # STAR[47:32], CPL 0
    assert ss == KCODE64 + 8
    assert rflags == user_flags & ~(EF_IF | EF_DF | EF_AC)  # masked by IA32_FMASK
    assert rbx == 0x11
    # SYSRET: back at RCX with RFLAGS = R11, CS = STAR[63:48] + 16 | 3, SS = + 8 | 3
    assert g.q(8) == 0x22
    assert g.q(9) == user_flags
    assert g.q(10) == (0x20 + 16) | 3 == UCODE64
    assert g.q(11) == (0x20 + 8) | 3
    assert g.q(12) == STACK3 - 8
    assert g.cpu.cpl == 3


def test_syscall_sets_cpl0_flat_segments():
    g = syscall_guest("mov rbx, 0x11\nsyscall\n", EXIT, fmask=0)
    g.run_exit()
    cpu = g.cpu
    assert cpu.cpl == 0
    assert cpu.code_bits == 64
    assert cpu.seg(CS).selector == KCODE64 and cpu.seg(SS).selector == KCODE64 + 8
    assert cpu.seg(CS).flags & (1 << 21)  # L
    assert cpu.gpr(1) == USER + 9  # RCX = after SYSCALL (mov rbx, imm32 is 7 bytes)
    assert cpu.rip == ENTRY + len(asm(EXIT, 64))


@pytest.mark.parametrize("ring", [0, 3])
def test_syscall_with_efer_sce_clear_is_ud(ring):
    g = syscall_guest("mov rbx, 0x11\nsyscall\nmov rbx, 0xbad\n" + EXIT, "mov rbx, 0xbad\n" + EXIT, ring=ring)
    g.cpu.set_msr(EFER, g.cpu.efer & ~1)
    g.idt64(6, f"""
mov rax, [rsp]
mov [{SCR:#x}], rax
mov rax, [rsp+8]
mov [{SCR + 8:#x}], rax
lea rax, [rsp]
mov [{SCR + 0x10:#x}], rax
mov rbx, 0x77
""" + EXIT)
    g.run_exit()
    base = USER if ring == 3 else CODE
    assert g.q(0) == base + 7  # RIP of the SYSCALL: a fault
    assert g.q(1) == (UCODE64 if ring == 3 else KCODE64)
    assert g.q(2) == guestkit.STACK0 - 40  # no error code
    assert g.cpu.gpr(3) == 0x77


def test_syscall_in_compatibility_mode_is_ud():
    # Intel: #UD unless CS.L = 1 (64-bit mode)
    compat = CODE + 0x800
    g = syscall_guest(f"push {KCODE32}\npush {compat:#x}\nretfq\n", "mov ebx, 0xbad\n" + EXIT, ring=0)
    g.code_at(compat, "mov ebx, 0x11\nsyscall\n" + EXIT, 32)
    g.idt64(6, f"mov rax, [rsp]\nmov [{SCR:#x}], rax\nmov rax, [rsp+8]\nmov [{SCR + 8:#x}], rax\n"
               "mov rbx, 0x77\n" + EXIT)
    g.run_exit()
    assert g.q(0) == compat + 5
    assert g.q(1) == KCODE32
    assert g.cpu.gpr(3) == 0x77


def test_sysenter_and_sysexit_in_64bit_mode():
    # IA-32e: SYSENTER loads a 64-bit CS (L=1) and the full 64-bit RSP/RIP MSRs;
    # SYSEXIT with REX.W returns to 64-bit code: CS = SYSENTER_CS + 32 | 3,
    # SS = SYSENTER_CS + 40 | 3, RIP = RDX, RSP = RCX
    ret = USER + 0x200
    g = G()
    g.long_mode("mov rbx, 0x11\nsysenter\nmov rbx, 0xbad\n" + EXIT, ring=3)
    g.cpu.set_msr(SYSENTER_CS, KCODE64)
    g.cpu.set_msr(SYSENTER_ESP, KSTACK + 0x10)
    g.cpu.set_msr(SYSENTER_EIP, ENTRY)
    g.code_at(ENTRY, f"""
mov [{SCR:#x}], rsp
xor eax, eax
mov ax, cs
mov [{SCR + 8:#x}], rax
mov ax, ss
mov [{SCR + 0x10:#x}], rax
mov rdx, {ret:#x}
mov rcx, {STACK3 - 0x40:#x}
sysexit
""", 64)
    assert asm("sysexit", 64) == b"\x48\x0f\x35"  # keystone emits the REX.W form in 64-bit code
    g.code_at(ret, f"""
mov [{SCR + 0x18:#x}], rsp
xor eax, eax
mov ax, cs
mov [{SCR + 0x20:#x}], rax
mov ax, ss
mov [{SCR + 0x28:#x}], rax
""" + EXIT, 64)
    g.run_exit()
    assert g.q(0) == KSTACK + 0x10
    assert g.q(1) == KCODE64
    assert g.q(2) == KCODE64 + 8
    assert g.q(3) == STACK3 - 0x40
    assert g.q(4) == (KCODE64 + 32) | 3
    assert g.q(5) == (KCODE64 + 40) | 3
    assert g.cpu.cpl == 3 and g.cpu.code_bits == 64
