"""Protected-mode (32-bit) interrupt and exception delivery, Intel SDM vol. 3A
chapter 6 (6.10-6.13), vol. 2A "INT n/INTO/INT3/INT1" pseudocode, and the task
switch through a task gate (7.3).

Every guest here records what its handler saw (the stack frame words, its own
ESP/SS/CS/EFLAGS) into a scratch area and the tests compare that to what the
SDM defines; IRET(D) must then resume exactly where the SDM says (the faulting
instruction for faults, whose cause the handler repairs; the next instruction
for traps).
"""
from __future__ import annotations

import struct

import pytest

from devices.legacy.pic import Pic8259Pair
from tools import guestkit
from tools.guestkit import (
    CODE,
    GDT,
    HANDLERS,
    IDT,
    KCODE32,
    KDATA32,
    PT,
    STACK0,
    STACK3,
    TSS,
    TSS_SEL,
    UCODE32,
    UDATA32,
    USER,
    Guest,
    asm,
    seg_desc,
)
from vmm.cpu.vcpu import DS, ES, SS

EXIT = "mov dx, 0x501\nout dx, al\n"
SCR = 0x60000  # scratch area written by the guests

EF_IF, EF_TF, EF_NT, EF_IOPL3 = 1 << 9, 1 << 8, 1 << 14, 3 << 12

# Copies the 6 dwords at the handler's entry ESP to SCR+0..0x14, then entry ESP,
# SS, CS and EFLAGS to SCR+0x18..0x24, and counts entries at SCR+0x28.
RECORD = f"""
push eax
mov eax, [esp+4]
mov [{SCR:#x}], eax
mov eax, [esp+8]
mov [{SCR + 4:#x}], eax
mov eax, [esp+12]
mov [{SCR + 8:#x}], eax
mov eax, [esp+16]
mov [{SCR + 12:#x}], eax
mov eax, [esp+20]
mov [{SCR + 16:#x}], eax
mov eax, [esp+24]
mov [{SCR + 20:#x}], eax
lea eax, [esp+4]
mov [{SCR + 0x18:#x}], eax
xor eax, eax
mov ax, ss
mov [{SCR + 0x1C:#x}], eax
mov ax, cs
mov [{SCR + 0x20:#x}], eax
pushfd
pop eax
mov [{SCR + 0x24:#x}], eax
inc dword ptr [{SCR + 0x28:#x}]
pop eax
"""

# what ring-3 (or ring-0) code records after the handler returned
AFTER = f"""
mov [{SCR + 0x40:#x}], esp
xor eax, eax
mov ax, ss
mov [{SCR + 0x44:#x}], eax
mov ax, cs
mov [{SCR + 0x48:#x}], eax
pushfd
pop eax
mov [{SCR + 0x4C:#x}], eax
mov dword ptr [{SCR + 0x50:#x}], 0x600d
"""


def _check(src: str, bits: int) -> None:
    # keystone returns nothing at all for a source it cannot assemble
    assert asm(src, bits), f"keystone could not assemble:\n{src}"


class G(Guest):
    """Guest with assembly checks and 32-bit helpers."""

    def protected_mode(self, code: str, ring: int = 0, paging: bool = False, at: int | None = None,
                       iopl3: bool = True) -> None:
        _check(code, 32)
        super().protected_mode(code, ring, paging, at)
        if iopl3:  # lets ring-3 code reach the debug-exit port
            self.cpu.rflags = self.cpu.rflags | EF_IOPL3

    def idt32(self, vector: int, handler: str | None = None, **kw) -> int:
        if handler is not None:
            _check(handler, 32)
        return super().idt32(vector, handler, **kw)

    def frame(self, n: int = 6) -> list[int]:
        return [self.u32(SCR + 4 * i) for i in range(n)]

    @property
    def h_esp(self) -> int:
        return self.u32(SCR + 0x18)

    @property
    def h_ss(self) -> int:
        return self.u32(SCR + 0x1C)

    @property
    def h_cs(self) -> int:
        return self.u32(SCR + 0x20)

    @property
    def h_eflags(self) -> int:
        return self.u32(SCR + 0x24)

    @property
    def entries(self) -> int:
        return self.u32(SCR + 0x28)

    def add_gdt(self, sel: int, desc: int) -> None:
        self.put(GDT + (sel & ~7), struct.pack("<Q", desc))
        self.gdt[sel & ~7] = desc
        _base, limit = self.cpu.gdtr
        if (sel & ~7) + 7 > limit:
            self.cpu.set_gdtr(GDT, (sel & ~7) + 7)

    def run(self, max_instructions: int = 200_000):
        # a run loop that keeps exiting without retiring anything would never
        # reach the instruction limit: fail instead of hanging
        exits = [0]

        def watchdog(x):
            exits[0] += 1
            if exits[0] > 5_000:
                raise RuntimeError(f"run loop livelock: 5000 exits, last {x}")
        self.m.trace = watchdog
        try:
            return super().run(max_instructions)
        finally:
            self.m.trace = None

    def run_exit(self, limit: int = 200_000):
        r = self.run(limit)
        assert r.reason.value == "exit", str(r)
        return r


def addr_after(code: str, nlines: int, base: int) -> int:
    """Address just past the first ``nlines`` non-empty lines of ``code`` at ``base``."""
    lines = [ln for ln in code.strip().splitlines() if ln.strip()]
    return base + len(asm("\n".join(lines[:nlines]), 32, base))


# ---------------------------------------------------------------------------
# gate types, same-privilege and inter-privilege frames (SDM 6.12.1)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("gtype", [0xE, 0xF])
def test_interrupt_gate_clears_if_trap_gate_does_not(gtype):
    code = """
sti
int 0x40
""" + AFTER + EXIT
    g = G()
    g.protected_mode(code)
    g.idt32(0x40, RECORD + "iretd", gtype=gtype)
    g.run_exit()
    assert g.frame()[2] & EF_IF  # pushed EFLAGS: IF was 1
    if gtype == 0xE:
        assert not g.h_eflags & EF_IF
    else:
        assert g.h_eflags & EF_IF
    assert g.u32(SCR + 0x4C) & EF_IF  # restored by IRETD


def test_delivery_clears_nt_and_iret_restores_it():
    # SDM 6.12.1.3: TF, VM, RF and NT are cleared on entry; NT=0 in the handler
    # also makes its IRET an ordinary return rather than a task return
    code = f"""
pushfd
or dword ptr [esp], {EF_NT:#x}
popfd
int 0x40
""" + AFTER + EXIT
    g = G()
    g.protected_mode(code)
    g.idt32(0x40, RECORD + "iretd")
    g.run_exit()
    assert g.frame()[2] & EF_NT
    assert not g.h_eflags & EF_NT
    assert g.u32(SCR + 0x4C) & EF_NT
    assert g.u32(SCR + 0x50) == 0x600D


def test_same_privilege_frame_eflags_cs_eip_and_return():
    code = """
mov ebx, 0x11
int 0x40
mov ebx, 0x22
""" + AFTER + EXIT
    g = G()
    g.protected_mode(code)
    g.idt32(0x40, RECORD + "mov ecx, ebx\niretd")
    g.run_exit()
    eip, cs, eflags = g.frame(3)
    assert eip == addr_after(code, 2, CODE)  # INT n is a trap: the next instruction
    assert cs == KCODE32
    assert eflags & 2 and eflags & EF_IOPL3 == EF_IOPL3
    assert g.h_esp == STACK0 - 12  # no stack switch, 3 dwords
    assert g.h_ss == KDATA32
    assert g.h_cs == KCODE32
    assert g.cpu.gpr(1) == 0x11  # the handler ran before the next instruction
    assert g.cpu.gpr(3) == 0x22
    assert g.u32(SCR + 0x40) == STACK0  # ESP restored by IRETD
    assert g.entries == 1


def test_ring3_to_ring0_switches_to_the_tss_stack_and_iret_returns_to_ring3():
    esp0 = 0x6F000
    code = """
push 0x1234
int 0x40
""" + AFTER + EXIT
    g = G()
    g.protected_mode(code, ring=3)
    g.put(TSS + 4, struct.pack("<I", esp0))  # TSS.ESP0 (SS0 = KDATA32)
    g.idt32(0x40, RECORD + "iretd", dpl=3)
    g.run_exit()
    eip, cs, eflags, esp, ss = g.frame(5)
    assert eip == addr_after(code, 2, USER)
    assert cs == UCODE32
    assert eflags & EF_IOPL3 == EF_IOPL3
    assert esp == STACK3 - 4  # the ring-3 ESP at the INT
    assert ss == UDATA32
    assert g.h_esp == esp0 - 20  # SS:ESP from TSS.SS0:ESP0, 5 dwords
    assert g.h_ss == KDATA32
    assert g.h_cs == KCODE32  # CPL 0 in the handler (RPL of CS)
    # back in ring 3 with the ring-3 stack
    assert g.u32(SCR + 0x48) == UCODE32
    assert g.u32(SCR + 0x44) == UDATA32
    assert g.u32(SCR + 0x40) == STACK3 - 4
    assert g.cpu.cpl == 3


def test_ring3_interrupt_with_ss0_from_the_tss():
    # TSS.SS0 chooses the stack segment: a second flat data segment at 0x58
    code = "int 0x40\n" + AFTER + EXIT
    g = G()
    g.protected_mode(code, ring=3)
    g.add_gdt(0x58, seg_desc(0, 0xFFFFF, 0x93, 0xC))
    g.put(TSS + 8, struct.pack("<H", 0x58))
    g.idt32(0x40, RECORD + "iretd", dpl=3)
    g.run_exit()
    assert g.h_ss == 0x58
    assert g.u32(SCR + 0x44) == UDATA32


# ---------------------------------------------------------------------------
# error codes (SDM 6.13, 6.15)
# ---------------------------------------------------------------------------

def test_gp_from_a_bad_selector_load_pushes_the_selector_and_restarts():
    code = """
mov ax, 0x7fb
mov ds, ax
mov ebx, 0x22
""" + AFTER + EXIT
    g = G()
    g.protected_mode(code)
    # the handler repairs AX; IRETD re-executes MOV DS, AX
    g.idt32(13, RECORD + f"mov ax, {KDATA32}\nadd esp, 4\niretd")
    g.run_exit()
    ec, eip, cs, eflags = g.frame(4)
    assert ec == 0x7F8  # selector index, TI=0, EXT=0 (RPL bits are not part of it)
    assert eflags & 2
    assert eip == addr_after(code, 1, CODE)  # the MOV DS itself
    assert cs == KCODE32
    assert g.h_esp == STACK0 - 16  # error code on top
    assert g.entries == 1
    assert g.cpu.seg(DS).selector == KDATA32
    assert g.cpu.gpr(3) == 0x22


def test_np_from_a_not_present_segment_pushes_the_selector():
    code = """
mov ax, 0x50
mov es, ax
mov ebx, 0x22
""" + EXIT
    g = G()
    g.protected_mode(code)
    g.add_gdt(0x50, seg_desc(0, 0xFFFFF, 0x13, 0xC))  # data, P=0
    # the handler sets P and returns to retry the load
    g.idt32(11, RECORD + f"or byte ptr [{GDT + 0x50 + 5:#x}], 0x80\nadd esp, 4\niretd")
    g.run_exit()
    ec, eip = g.frame(2)
    assert ec == 0x50
    assert eip == addr_after(code, 1, CODE)
    assert g.entries == 1
    assert g.cpu.seg(ES).selector == 0x50
    assert g.cpu.gpr(3) == 0x22


def test_ss_from_a_not_present_stack_segment_pushes_the_selector():
    code = """
mov ax, 0x58
mov ss, ax
mov ebx, 0x22
""" + EXIT
    g = G()
    g.protected_mode(code)
    g.add_gdt(0x58, seg_desc(0, 0xFFFFF, 0x13, 0xC))
    g.idt32(12, RECORD + f"or byte ptr [{GDT + 0x58 + 5:#x}], 0x80\nadd esp, 4\niretd")
    g.run_exit()
    ec, eip = g.frame(2)
    assert ec == 0x58
    assert eip == addr_after(code, 1, CODE)
    assert g.entries == 1
    assert g.cpu.seg(SS).selector == 0x58


def _pte_addr(lin: int) -> int:
    return PT + 0x1000 + 4 * (lin >> 12)


PF_FIX = f"""
mov eax, cr2
mov [{SCR + 0x30:#x}], eax
shr eax, 12
or dword ptr [{PT + 0x1000:#x} + eax*4], 7
mov eax, cr2
invlpg [eax]
"""


@pytest.mark.parametrize("ring,pte,access,expect", [
    (0, 0, "read", 0b000),          # not present, read, supervisor
    (0, 0, "write", 0b010),         # not present, write
    (0, 5, "write", 0b011),         # present read-only, CR0.WP=1
    (3, 0, "read", 0b100),          # not present, user
    (3, 5, "write", 0b111),         # read-only user page: P|W|U
    (3, 3, "read", 0b101),          # supervisor page read from ring 3: P|U
])
def test_page_fault_cr2_and_error_code(ring, pte, access, expect):
    target = 0x50010
    insn = f"mov edi, [{target:#x}]" if access == "read" else f"mov dword ptr [{target:#x}], 0x5a5a"
    code = f"""
mov ebx, 0x11
{insn}
mov ebx, 0x22
""" + AFTER + EXIT
    g = G()
    g.protected_mode(code, ring=ring, paging=True)
    g.put(target, struct.pack("<I", 0xBEEF))
    g.put(_pte_addr(target), struct.pack("<I", (target & ~0xFFF) | pte))
    g.idt32(14, RECORD + PF_FIX + "add esp, 4\niretd")
    g.run_exit()
    base = USER if ring == 3 else CODE
    ec, eip, cs = g.frame(3)
    assert g.u32(SCR + 0x30) == target  # CR2
    assert ec == expect
    assert eip == addr_after(code, 1, base)  # the faulting access
    assert cs == (UCODE32 if ring == 3 else KCODE32)
    assert g.h_esp == STACK0 - (24 if ring == 3 else 16)
    assert g.entries == 1
    assert g.cpu.gpr(3) == 0x22  # retried and went on
    if access == "read":
        assert g.cpu.gpr(7) == 0xBEEF
    else:
        assert g.u32(target) == 0x5A5A


def test_divide_error_no_error_code_fault_address():
    code = """
xor edx, edx
mov eax, 100
xor ecx, ecx
div ecx
mov ebx, 0x22
""" + EXIT
    g = G()
    g.protected_mode(code)
    g.idt32(0, RECORD + "mov ecx, 5\niretd")
    g.run_exit()
    eip, cs, eflags = g.frame(3)
    assert eip == addr_after(code, 3, CODE)
    assert cs == KCODE32 and eflags & 2
    assert g.h_esp == STACK0 - 12  # no error code
    assert g.cpu.gpr(0) == 20  # DIV re-executed with ECX = 5
    assert g.entries == 1


def test_ud2_no_error_code_fault_address():
    code = """
mov ebx, 0x11
ud2
mov ebx, 0x22
""" + EXIT
    g = G()
    g.protected_mode(code)
    g.idt32(6, RECORD + "add dword ptr [esp], 2\niretd")
    g.run_exit()
    eip, cs = g.frame(2)
    assert eip == addr_after(code, 1, CODE)
    assert cs == KCODE32
    assert g.h_esp == STACK0 - 12
    assert g.cpu.gpr(3) == 0x22


def test_int3_is_a_trap_with_no_error_code():
    code = """
mov ebx, 0x11
int3
mov ebx, 0x22
""" + EXIT
    g = G()
    g.protected_mode(code)
    g.idt32(3, RECORD + "iretd")
    g.run_exit()
    eip, cs = g.frame(2)
    assert eip == addr_after(code, 2, CODE) == CODE + 6
    assert cs == KCODE32
    assert g.h_esp == STACK0 - 12
    assert g.cpu.gpr(3) == 0x22


def test_into_traps_to_vector_4_when_of_set():
    code = """
mov al, 0x7f
add al, 1
into
mov ebx, 0x22
""" + EXIT
    g = G()
    g.protected_mode(code)
    g.idt32(4, RECORD + "iretd")
    g.run_exit()
    assert g.frame(1)[0] == addr_after(code, 3, CODE)
    assert g.cpu.gpr(3) == 0x22


@pytest.mark.parametrize("vector", [8, 10, 11, 12, 13, 14, 17])
def test_int_n_to_an_error_code_vector_pushes_no_error_code(vector):
    # SDM 6.13: "the error code is not pushed ... for INT n"
    code = f"""
int {vector}
mov ebx, 0x22
""" + EXIT
    g = G()
    g.protected_mode(code)
    g.idt32(vector, RECORD + "iretd")
    g.run_exit()
    eip, cs = g.frame(2)
    assert g.h_esp == STACK0 - 12
    assert eip == CODE + 2
    assert cs == KCODE32
    assert g.cpu.gpr(3) == 0x22


# ---------------------------------------------------------------------------
# checks made by delivery (INT n pseudocode, SDM 6.12.1.1)
# ---------------------------------------------------------------------------

SKIP_INSN_GP = """
add esp, 4
add dword ptr [esp], {n}
iretd
"""


@pytest.mark.parametrize("insn,vector,length", [("int 0x40", 0x40, 2), ("int3", 3, 1), ("into", 4, 1)])
def test_software_interrupt_through_a_dpl0_gate_from_ring3_is_gp(insn, vector, length):
    code = f"""
mov al, 0x7f
add al, 1
{insn}
mov ebx, 0x22
""" + AFTER + EXIT
    g = G()
    g.protected_mode(code, ring=3)
    g.idt32(vector, "mov ebx, 0xbad\niretd", dpl=0)
    g.idt32(13, RECORD + SKIP_INSN_GP.format(n=length))
    g.run_exit()
    ec, eip, cs, eflags, esp, ss = g.frame(6)
    assert ec == vector * 8 + 2  # IDT bit set, EXT clear (a software interrupt)
    assert eflags & EF_IOPL3 == EF_IOPL3
    assert eip == addr_after(code, 2, USER)  # a fault: the INT instruction
    assert cs == UCODE32 and ss == UDATA32 and esp == STACK3
    assert g.h_esp == STACK0 - 24
    assert g.entries == 1
    assert g.cpu.gpr(3) == 0x22
    assert g.u32(SCR + 0x48) == UCODE32


def test_dpl3_gate_lets_ring3_int_through():
    code = "int 0x40\nmov ebx, 0x22\n" + EXIT
    g = G()
    g.protected_mode(code, ring=3)
    g.idt32(0x40, RECORD + "iretd", dpl=3)
    g.idt32(13, "mov ebx, 0xbad\n" + EXIT)
    g.run_exit()
    assert g.entries == 1 and g.cpu.gpr(3) == 0x22


def test_hardware_exception_ignores_gate_dpl():
    # SDM 6.12.1.1: the gate DPL check applies only to INT n/INT3/INTO
    code = "ud2\n" + EXIT
    g = G()
    g.protected_mode(code, ring=3)
    g.idt32(6, RECORD + EXIT, dpl=0)
    g.run_exit()
    assert g.entries == 1
    assert g.frame(2) == [USER, UCODE32]


def test_software_int_to_a_not_present_gate_is_np_without_ext():
    code = "int 0x40\nmov ebx, 0x22\n" + EXIT
    g = G()
    g.protected_mode(code)
    g.idt32(0x40, "mov ebx, 0xbad\niretd", present=False)
    g.idt32(11, RECORD + SKIP_INSN_GP.format(n=2))
    g.run_exit()
    ec, eip = g.frame(2)
    assert ec == 0x40 * 8 + 2
    assert eip == CODE
    assert g.cpu.gpr(3) == 0x22


@pytest.mark.parametrize("pre,insn,vector,length", [
    ("", "ud2", 6, 2),                                          # #UD
    ("mov eax, cr0\nor eax, 8\nmov cr0, eax", "fninit", 7, 2),  # #NM (CR0.TS)
])
def test_exception_through_a_not_present_gate_is_np_with_ext(pre, insn, vector, length):
    # SDM 6.13: EXT is set when the fault happened while delivering an event
    # external to the program -- an interrupt or an earlier exception.  Both
    # are benign exceptions, so the #NP is handled serially (table 6-5).
    code = f"{pre}\n{insn}\nmov ebx, 0x22\n" + EXIT
    g = G()
    g.protected_mode(code)
    g.idt32(vector, "mov ebx, 0xbad\niretd", present=False)
    g.idt32(11, RECORD + "clts\n" + SKIP_INSN_GP.format(n=length))
    g.run_exit()
    ec, eip = g.frame(2)
    assert ec == vector * 8 + 2 + 1
    assert eip == CODE + len(asm(pre, 32, CODE))
    assert g.entries == 1  # benign/contributory then #NP: handled serially, no #DF
    assert g.cpu.gpr(3) == 0x22


@pytest.mark.parametrize("limit", [0x40 * 8 - 1, 0x40 * 8 + 6])
def test_vector_beyond_the_idt_limit_is_gp(limit):
    code = "int 0x40\nmov ebx, 0x22\n" + EXIT
    g = G()
    g.protected_mode(code)
    g.set_idt(limit)
    g.idt32(0x40, "mov ebx, 0xbad\niretd")
    g.idt32(13, RECORD + SKIP_INSN_GP.format(n=2))
    g.run_exit()
    ec, eip = g.frame(2)
    assert ec == 0x40 * 8 + 2
    assert eip == CODE
    assert g.cpu.gpr(3) == 0x22


@pytest.mark.parametrize("gtype", [0x0, 0x9, 0xC, 0x4])
def test_gate_of_a_wrong_type_is_gp(gtype):
    code = "int 0x40\nmov ebx, 0x22\n" + EXIT
    g = G()
    g.protected_mode(code)
    g.idt32(0x40, "mov ebx, 0xbad\niretd", gtype=gtype)
    g.idt32(13, RECORD + SKIP_INSN_GP.format(n=2))
    g.run_exit()
    assert g.frame(1) == [0x40 * 8 + 2]
    assert g.cpu.gpr(3) == 0x22


@pytest.mark.parametrize("selector,desc,vector,expect", [
    (0x00, None, 13, 0x00),                                        # null selector: #GP(0)
    (0x03, None, 13, 0x00),                                        # null with RPL: still #GP(0)
    (KDATA32, None, 13, KDATA32),                                  # not a code segment
    (UCODE32, None, 13, UCODE32 & ~3),                             # DPL 3 > CPL 0
    (0x7F8, None, 13, 0x7F8),                                      # beyond the GDT limit
    (0x50, seg_desc(0, 0xFFFFF, 0x1B, 0xC), 11, 0x50),             # code, not present
])
def test_bad_gate_target_code_segment(selector, desc, vector, expect):
    code = "int 0x40\nmov ebx, 0x22\n" + EXIT
    g = G()
    g.protected_mode(code)
    if desc is not None:
        g.add_gdt(selector, desc)
    g.idt32(0x40, "mov ebx, 0xbad\niretd", selector=selector)
    g.idt32(vector, RECORD + SKIP_INSN_GP.format(n=2))
    g.run_exit()
    assert g.frame(2) == [expect, CODE]
    assert g.entries == 1
    assert g.cpu.gpr(3) == 0x22


# ---------------------------------------------------------------------------
# 16-bit gates, conforming code (SDM 6.12.1, 6.12.1.2)
# ---------------------------------------------------------------------------

def test_16bit_interrupt_gate_pushes_16bit_values():
    at, handler = 0xA000, 0xE000
    code = "mov ebx, 0x11\nint 0x40\nmov ebx, 0x22\n" + AFTER + EXIT
    g = G()
    g.protected_mode(code, at=at)
    h = f"""
push eax
movzx eax, word ptr [esp+4]
mov [{SCR:#x}], eax
movzx eax, word ptr [esp+6]
mov [{SCR + 4:#x}], eax
movzx eax, word ptr [esp+8]
mov [{SCR + 8:#x}], eax
lea eax, [esp+4]
mov [{SCR + 0x18:#x}], eax
pushfd
pop eax
mov [{SCR + 0x24:#x}], eax
pop eax
iret
"""
    assert asm("iret", 32) == b"\x66\xcf"  # keystone: 16-bit IRET in 32-bit code
    g.idt32(0x40, h, gtype=6, at=handler)
    g.cpu.rsp = STACK0 - 0x100
    g.run_exit()
    ip, cs, flags = g.frame(3)
    assert ip == addr_after(code, 2, at)
    assert cs == KCODE32
    assert flags == EF_IOPL3 | 2  # the 16-bit FLAGS image at the INT
    assert g.h_esp == STACK0 - 0x100 - 6
    assert not g.h_eflags & EF_IF
    assert g.cpu.gpr(3) == 0x22
    assert g.u32(SCR + 0x40) == STACK0 - 0x100


def test_16bit_trap_gate_from_ring3_pushes_16bit_ss_sp_and_error_code():
    at, handler = 0xA000, 0xE000
    code = "mov ax, 0x7f8\nmov ds, ax\n" + EXIT
    g = G()
    g.protected_mode(code, ring=3, at=at)
    g.cpu.rsp = 0xBFF0
    h = f"""
mov ecx, 6
xor esi, esi
again:
movzx eax, word ptr [esp+esi*2]
mov [{SCR:#x}+esi*4], eax
inc esi
loop again
mov [{SCR + 0x18:#x}], esp
""" + EXIT
    g.idt32(13, h, gtype=7, at=handler)
    g.run_exit()
    ec, ip, cs, flags, sp, ss = g.frame(6)
    assert (ec, ip, cs, sp, ss) == (0x7F8, at + 4, UCODE32, 0xBFF0, UDATA32)
    assert flags & EF_IOPL3
    assert g.h_esp == STACK0 - 12  # five words and the 16-bit error code


def test_conforming_code_segment_keeps_cpl_and_stack():
    code = "push 0x77\nint 0x40\n" + AFTER + EXIT
    g = G()
    g.protected_mode(code, ring=3)
    g.add_gdt(0x50, seg_desc(0, 0xFFFFF, 0x9F, 0xC))  # conforming code, DPL 0
    g.idt32(0x40, RECORD + "iretd", dpl=3, selector=0x50)
    g.run_exit()
    eip, cs, eflags = g.frame(3)
    assert eip == addr_after(code, 2, USER)
    assert cs == UCODE32
    assert eflags & EF_IOPL3 == EF_IOPL3
    assert g.h_cs == 0x53  # CS RPL = CPL 3 stays
    assert g.h_ss == UDATA32  # no stack switch
    assert g.h_esp == STACK3 - 4 - 12
    assert g.u32(SCR + 0x48) == UCODE32
    assert g.u32(SCR + 0x40) == STACK3 - 4


# ---------------------------------------------------------------------------
# task gates (SDM 6.12.2, 7.3)
# ---------------------------------------------------------------------------

TSS2, TSS2_SEL = 0x3800, 0x58
TASK_STACK = 0x68000


def _task_setup(g: G, entry: int, eflags: int = 2) -> None:
    # LTR marks the current TSS busy in the GDT; the guest kit only loads TR
    g.add_gdt(TSS_SEL, seg_desc(TSS, 0x67, 0x8B, 0x0))
    g.add_gdt(TSS2_SEL, seg_desc(TSS2, 0x67, 0x89, 0x0))
    tss = bytearray(0x68)
    struct.pack_into("<I", tss, 0x1C, 0)  # CR3 (paging off)
    struct.pack_into("<II", tss, 0x20, entry, eflags)
    struct.pack_into("<8I", tss, 0x28, 0xA0, 0xA1, 0xA2, 0xA3, TASK_STACK, 0xA5, 0xA6, 0xA7)
    struct.pack_into("<6I", tss, 0x48, KDATA32, KCODE32, KDATA32, KDATA32, KDATA32, KDATA32)
    struct.pack_into("<H", tss, 0x66, 0x68)
    g.put(TSS2, bytes(tss))


TASK_HANDLER = f"""
mov [{SCR + 0x80:#x}], eax
mov [{SCR + 0x84:#x}], esp
pushfd
pop eax
mov [{SCR + 0x88:#x}], eax
str ax
movzx eax, ax
mov [{SCR + 0x8C:#x}], eax
mov eax, [{TSS2:#x}]
mov [{SCR + 0x90:#x}], eax
mov eax, [esp]
mov [{SCR + 0x94:#x}], eax
mov eax, cr0
mov [{SCR + 0x98:#x}], eax
mov eax, [{GDT + TSS2_SEL + 4:#x}]
mov [{SCR + 0x9C:#x}], eax
mov eax, [{GDT + TSS_SEL + 4:#x}]
mov [{SCR + 0xA0:#x}], eax
mov ax, cs
mov [{SCR + 0xA4:#x}], eax
"""


def test_task_gate_switches_tasks_and_iret_returns():
    code = """
mov eax, 0x11111111
mov ecx, 0x22222222
mov esi, 0x66666666
mov ebp, 0x55555555
push 0x99
int 0x41
mov ebx, 0x12345678
""" + AFTER + EXIT
    g = G()
    g.protected_mode(code)
    entry = HANDLERS + 0x4100
    g.put(entry, asm(TASK_HANDLER + "iretd", 32, entry))
    _task_setup(g, entry)
    g.put(IDT + 0x41 * 8, struct.pack("<Q", guestkit.gate32(TSS2_SEL, 0, 5, 0)))
    g.run_exit()
    # the new task: its registers and stack from TSS2, EFLAGS.NT set
    assert g.u32(SCR + 0x80) == 0xA0
    assert g.u32(SCR + 0x84) == TASK_STACK
    assert g.u32(SCR + 0x88) & EF_NT
    assert g.u32(SCR + 0x8C) == TSS2_SEL  # TR
    assert g.u32(SCR + 0x90) & 0xFFFF == TSS_SEL  # back link = previous TSS
    assert g.u32(SCR + 0x98) & 8  # CR0.TS set by the task switch
    assert (g.u32(SCR + 0x9C) >> 8) & 0xF == 0xB  # new TSS busy
    assert (g.u32(SCR + 0xA0) >> 8) & 0xF == 0xB  # old TSS stays busy (nesting)
    assert g.u32(SCR + 0xA4) == KCODE32
    # the old task's state saved in the old TSS
    ret = addr_after(code, 6, CODE)
    assert g.u32(TSS + 0x20) == ret  # EIP: the instruction after INT
    assert g.u32(TSS + 0x28) == 0x11111111  # EAX
    assert g.u32(TSS + 0x2C) == 0x22222222  # ECX
    assert g.u32(TSS + 0x38) == STACK0 - 4  # ESP
    assert g.u32(TSS + 0x3C) == 0x55555555  # EBP
    assert g.u32(TSS + 0x40) == 0x66666666  # ESI
    assert g.u32(TSS + 0x4C) & 0xFFFF == KCODE32  # CS
    assert g.u32(TSS + 0x50) & 0xFFFF == KDATA32  # SS
    assert not g.u32(TSS + 0x24) & EF_NT
    # IRETD with NT=1 went back to the old task, after the INT
    assert g.cpu.gpr(3) == 0x12345678
    assert g.cpu.gpr(1) == 0x22222222
    assert g.u32(SCR + 0x40) == STACK0 - 4
    assert g.cpu.tr.selector == TSS_SEL
    assert (g.u32(GDT + TSS2_SEL + 4) >> 8) & 0xF == 0x9  # IRET cleared its busy bit


def test_task_gate_for_an_exception_pushes_the_error_code_on_the_new_stack():
    code = "mov ax, 0x7f8\nmov ds, ax\n" + EXIT
    g = G()
    g.protected_mode(code)
    entry = HANDLERS + 0x4100
    g.put(entry, asm(TASK_HANDLER + EXIT, 32, entry))
    _task_setup(g, entry)
    g.put(IDT + 13 * 8, struct.pack("<Q", guestkit.gate32(TSS2_SEL, 0, 5, 0)))
    g.run_exit()
    assert g.u32(SCR + 0x84) == TASK_STACK - 4
    assert g.u32(SCR + 0x94) == 0x7F8  # error code on the new task's stack
    assert g.u32(TSS + 0x20) == CODE + 4  # the faulting MOV DS is the saved EIP
    assert g.u32(SCR + 0x90) & 0xFFFF == TSS_SEL


def test_task_gate_to_a_tss_with_too_small_a_limit_is_ts():
    code = "int 0x41\nmov ebx, 0x22\n" + EXIT
    g = G()
    g.protected_mode(code)
    entry = HANDLERS + 0x4100
    g.put(entry, asm("mov ebx, 0xbad\n" + EXIT, 32, entry))
    _task_setup(g, entry)
    g.add_gdt(TSS2_SEL, seg_desc(TSS2, 0x20, 0x89, 0x0))
    g.put(IDT + 0x41 * 8, struct.pack("<Q", guestkit.gate32(TSS2_SEL, 0, 5, 0)))
    g.idt32(10, RECORD + SKIP_INSN_GP.format(n=2))
    g.run_exit()
    assert g.frame(2) == [TSS2_SEL, CODE]
    assert g.cpu.gpr(3) == 0x22
    assert g.cpu.tr.selector == TSS_SEL


# ---------------------------------------------------------------------------
# external interrupts from the 8259 pair (SDM 6.8.1, 6.8.3, vol. 2B STI, MOV)
# ---------------------------------------------------------------------------

POKE = 0x510  # an unused port: a write pulses IRQ ``value`` (edge: latched by the PIC)


class IrqPoke:
    """A tiny device: OUT POKE, n pulses IRQ line n of the PIC."""

    name = "irqpoke"
    def __init__(self, pic: Pic8259Pair):
        self.io_ranges = [(POKE, 1)]
        self.pic = pic
        self.writes = 0

    def io_read(self, port: int, size: int) -> int:
        return 0xFF

    def io_write(self, port: int, size: int, value: int) -> None:
        self.writes += 1
        self.pic.irq_line(value & 0xF).pulse()

    def reset(self) -> None:
        self.writes = 0

    def save_state(self) -> dict:
        return {"kind": "irqpoke", "version": 1, "writes": self.writes}

    def load_state(self, state: dict) -> None:
        self.writes = state["writes"]


def with_pic(g: G) -> Pic8259Pair:
    pic = Pic8259Pair()
    pic.program_like_pc_bios()
    g.m.add_device(pic)
    g.m.set_interrupt_controller(pic)
    g.m.add_device(IrqPoke(pic))
    return pic


def poke(irq: int) -> str:
    return f"mov al, {irq}\nmov dx, {POKE:#x}\nout dx, al\n"


EOI_MASTER = "push eax\nmov al, 0x20\nout 0x20, al\npop eax\n"
IRQ_RECORD = RECORD + f"""
mov [{SCR + 0x60:#x}], ebx
mov [{SCR + 0x64:#x}], esi
mov [{SCR + 0x68:#x}], edi
"""


def test_irq_is_delivered_at_the_boundary_after_the_out_that_raised_it():
    code = "mov ebx, 0x11\nsti\n" + poke(3) + "mov ebx, 0x22\n" + AFTER + EXIT
    g = G()
    g.protected_mode(code)
    with_pic(g)
    g.idt32(0x0B, IRQ_RECORD + EOI_MASTER + "iretd")  # IRQ3 -> 0x08 + 3 under the BIOS programming
    g.idt32(0x08 + 4, "mov ebx, 0xbad\n" + EXIT)
    g.run_exit()
    eip, cs, eflags = g.frame(3)
    assert g.entries == 1
    assert eip == addr_after(code, 5, CODE)  # the instruction after OUT
    assert g.u32(SCR + 0x60) == 0x11  # it had not executed yet
    assert cs == KCODE32 and eflags & EF_IF
    assert g.h_esp == STACK0 - 12  # vector 11, but an interrupt pushes no error code
    assert not g.h_eflags & EF_IF  # interrupt gate
    assert g.cpu.gpr(3) == 0x22
    assert g.u32(SCR + 0x4C) & EF_IF


def test_irq_on_the_slave_uses_vector_0x70_plus():
    code = "sti\n" + poke(10) + "mov ebx, 0x22\n" + EXIT
    g = G()
    g.protected_mode(code)
    with_pic(g)
    g.idt32(0x72, IRQ_RECORD + "mov al, 0x20\nout 0xa0, al\n" + EOI_MASTER + "iretd")
    g.run_exit()
    assert g.entries == 1
    assert g.frame(1) == [addr_after(code, 4, CODE)]
    assert g.cpu.gpr(3) == 0x22


def test_irq_held_while_if_clear_and_taken_after_the_sti_shadow():
    code = ("cli\n" + poke(3) + "mov ebx, 0x11\nnop\nnop\n"
            f"mov eax, [{SCR + 0x28:#x}]\nmov [{SCR + 0x70:#x}], eax\n"
            "sti\nmov esi, 0x33\nmov edi, 0x44\n" + EXIT)
    g = G()
    g.protected_mode(code)
    with_pic(g)
    g.idt32(0x0B, IRQ_RECORD + EOI_MASTER + "iretd")
    g.run_exit()
    assert g.u32(SCR + 0x70) == 0  # not delivered while IF=0
    assert g.entries == 1
    # STI shadow: the instruction after STI executes first
    assert g.frame(1) == [addr_after(code, 11, CODE)]
    assert g.u32(SCR + 0x64) == 0x33
    assert g.u32(SCR + 0x68) == 0
    assert g.cpu.gpr(7) == 0x44


def test_irq_never_taken_with_if_clear():
    code = "cli\n" + poke(3) + "mov ebx, 0x22\nnop\nnop\n" + EXIT
    g = G()
    g.protected_mode(code)
    pic = with_pic(g)
    g.idt32(0x0B, IRQ_RECORD + EOI_MASTER + "iretd")
    g.run_exit()
    assert g.entries == 0
    assert pic.intr  # still requested


def test_sti_hlt_wakes_with_the_interrupt_after_hlt():
    code = "cli\n" + poke(3) + "sti\nhlt\nmov ebx, 0x22\n" + EXIT
    g = G()
    g.protected_mode(code)
    with_pic(g)
    g.idt32(0x0B, IRQ_RECORD + EOI_MASTER + "iretd")
    g.run_exit()
    assert g.entries == 1
    assert g.frame(1) == [addr_after(code, 6, CODE)]
    assert g.cpu.gpr(3) == 0x22


@pytest.mark.parametrize("shadow", [True, False])
def test_mov_ss_shadow_delays_the_interrupt_one_instruction(shadow):
    code = f"""
sti
mov ax, {KDATA32}
mov ss, ax
mov esi, 0x33
mov edi, 0x44
""" + EXIT
    g = G()
    g.protected_mode(code)
    pic = with_pic(g)
    g.idt32(0x0B, IRQ_RECORD + EOI_MASTER + "iretd")
    # stop right after MOV SS (or after the MOV AX before it) and raise IRQ3 there
    n = 3 if shadow else 2
    r = g.run(n)
    assert r.reason.value == "limit" and g.cpu.icount == n
    assert g.cpu.rip == addr_after(code, n, CODE)
    pic.irq_line(3).pulse()
    g.run_exit()
    assert g.entries == 1
    if shadow:
        assert g.frame(1) == [addr_after(code, 4, CODE)]  # MOV ESI ran first
        assert g.u32(SCR + 0x64) == 0x33
    else:
        assert g.frame(1) == [addr_after(code, 2, CODE)]  # at MOV SS
        assert g.u32(SCR + 0x64) == 0
    assert g.u32(SCR + 0x68) == 0


def test_eoi_lets_the_next_irq_of_the_same_level_in():
    # without an EOI the in-service IRQ3 blocks a second IRQ3; the EOI written
    # by the main code lets it in right after that OUT
    code = ("sti\n" + poke(3) + "mov ebx, 0x11\n" + poke(3) + "mov ebx, 0x22\nnop\n"
            f"mov eax, [{SCR + 0x28:#x}]\nmov [{SCR + 0x70:#x}], eax\n"
            + EOI_MASTER + "mov ebx, 0x33\n" + EOI_MASTER + EXIT)
    g = G()
    g.protected_mode(code)
    with_pic(g)
    g.idt32(0x0B, IRQ_RECORD + "iretd")  # no EOI
    g.run_exit()
    assert g.u32(SCR + 0x70) == 1
    assert g.entries == 2
    assert g.frame(1) == [addr_after(code, 15, CODE)]  # right after the first EOI's OUT
    assert g.u32(SCR + 0x60) == 0x22


def test_eoi_in_the_handler_allows_each_irq():
    code = "sti\n" + poke(3) + poke(3) + poke(3) + "mov ebx, 0x22\n" + EXIT
    g = G()
    g.protected_mode(code)
    with_pic(g)
    g.idt32(0x0B, IRQ_RECORD + EOI_MASTER + "iretd")
    g.run_exit()
    assert g.entries == 3
    assert g.frame(1) == [addr_after(code, 10, CODE)]


@pytest.mark.parametrize("case,vector,expect", [
    ("busy", 13, TSS_SEL),       # the gate names the running (busy) TSS
    ("local", 13, 0x5C),         # TI=1: a TSS must be in the GDT
    ("not-present", 11, TSS2_SEL),
    ("not-a-tss", 13, TSS2_SEL),
])
def test_task_gate_checks(case, vector, expect):
    # INT n pseudocode, TASK-GATE: #GP for a local or busy TSS, #NP if not present
    code = "int 0x41\nmov ebx, 0x22\n" + EXIT
    g = G()
    g.protected_mode(code)
    entry = HANDLERS + 0x4100
    g.put(entry, asm("mov ebx, 0xbad\n" + EXIT, 32, entry))
    _task_setup(g, entry)
    sel = {"busy": TSS_SEL, "local": 0x5C}.get(case, TSS2_SEL)
    if case == "not-present":
        g.add_gdt(TSS2_SEL, seg_desc(TSS2, 0x67, 0x09, 0x0))
    elif case == "not-a-tss":
        g.add_gdt(TSS2_SEL, seg_desc(TSS2, 0x67, 0x93, 0x0))
    g.put(IDT + 0x41 * 8, struct.pack("<Q", guestkit.gate32(sel, 0, 5, 0)))
    g.idt32(vector, RECORD + SKIP_INSN_GP.format(n=2))
    g.run_exit()
    assert g.frame(2) == [expect, CODE]
    assert g.entries == 1
    assert g.cpu.gpr(3) == 0x22
    assert g.cpu.tr.selector == TSS_SEL


# ---------------------------------------------------------------------------
# the error-code table, driven through Delivery directly (#AC cannot be raised
# by the CPU core: Unicorn does not implement alignment checking)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("vector", list(range(22)))
def test_error_code_pushed_exactly_for_8_10_to_14_and_17(vector):
    g = G()
    g.protected_mode("mov ebx, 0x22\n" + EXIT, ring=3)
    g.idt32(vector, RECORD + EXIT)
    g.m.delivery.deliver(vector, error_code=0x5A58)  # as for a hardware exception
    g.run_exit()
    has = vector in (8, 10, 11, 12, 13, 14, 17)
    f = g.frame(6)
    assert g.h_esp == STACK0 - (24 if has else 20)
    if has:
        f = f[1:]
        assert g.frame(1) == [0x5A58]
    assert f[:2] == [USER, UCODE32]
    assert f[3:5] == [STACK3, UDATA32]


def test_16bit_stack_segment_wraps_sp_and_keeps_the_upper_esp_bits():
    # SS with B=0: pushes use SP and wrap inside the segment; ESP[31:16] is kept
    code = f"""
mov ax, {guestkit.KDATA16}
mov ss, ax
mov esp, 0x00a00004
int 0x40
mov [{SCR + 0x40:#x}], esp
mov ax, {KDATA32}
mov ss, ax
mov esp, {STACK0:#x}
""" + EXIT
    g = G()
    g.protected_mode(code)
    g.idt32(0x40, f"mov [{SCR + 0x18:#x}], esp\n" + "iretd")
    g.run_exit()
    assert g.h_esp == 0x00A0FFF8  # 0x0004 - 12 wrapped to 0xFFF8
    assert g.u32(0xFFF8) == addr_after(code, 4, CODE)  # EIP at SS.base + 0xFFF8
    assert g.u32(0xFFFC) == KCODE32
    assert g.u32(0x0000) & 2  # EFLAGS at offset 0
    assert g.u32(SCR + 0x40) == 0x00A00004


# ---------------------------------------------------------------------------
# EFLAGS.RF in the pushed image (vol. 3B 17.3.1.1): 1 for fault-class
# exceptions, as it was (0) for traps, software and hardware interrupts
# ---------------------------------------------------------------------------

EF_RF = 1 << 16


@pytest.mark.parametrize("insn,vector,fix,rf", [
    ("ud2", 6, "add dword ptr [esp], 2", True),
    ("div ecx", 0, "mov ecx, 1", True),
    ("mov ax, 0x7f8\nmov ds, ax", 13, f"mov ax, {KDATA32}\nadd esp, 4", True),
    ("int3", 3, "", False),
    ("int 0x40", 0x40, "", False),
    ("mov al, 0x7f\nadd al, 1\ninto", 4, "", False),
])
def test_rf_in_the_pushed_eflags(insn, vector, fix, rf):
    code = f"xor ecx, ecx\n{insn}\nmov ebx, 0x22\n" + AFTER + EXIT
    g = G()
    g.protected_mode(code)
    g.idt32(vector, RECORD + fix + "\niretd")
    g.run_exit()
    eflags = g.frame(4)[3 if vector == 13 else 2]
    assert bool(eflags & EF_RF) == rf
    assert not g.h_eflags & EF_RF  # cleared in the handler
    assert g.cpu.gpr(3) == 0x22  # IRETD with RF=1 resumed normally


def test_rf_pushed_for_a_fault_raised_while_delivering_a_software_interrupt():
    code = "int 0x40\nmov ebx, 0x22\n" + EXIT
    g = G()
    g.protected_mode(code, ring=3)
    g.idt32(0x40, "mov ebx, 0xbad\niretd", dpl=0)
    g.idt32(13, RECORD + SKIP_INSN_GP.format(n=2))
    g.run_exit()
    assert g.frame(4)[3] & EF_RF
    assert g.cpu.gpr(3) == 0x22


def test_rf_not_pushed_for_an_external_interrupt():
    code = "sti\n" + poke(3) + "mov ebx, 0x22\n" + EXIT
    g = G()
    g.protected_mode(code)
    with_pic(g)
    g.idt32(0x0B, IRQ_RECORD + EOI_MASTER + "iretd")
    g.run_exit()
    assert g.entries == 1
    assert not g.frame(3)[2] & EF_RF


def test_delivery_from_ring3_uses_supervisor_accesses():
    # the IDT, GDT, TSS and ring-0 stack pages are supervisor-only: the
    # processor reads and writes them with implicit supervisor accesses (SDM
    # 4.6, "implicit supervisor-mode accesses") even though CPL was 3
    code = "mov ebx, 0x11\nint 0x40\nmov ebx, 0x22\n" + AFTER + EXIT
    g = G()
    g.protected_mode(code, ring=3, paging=True)
    for page in (GDT, IDT, TSS, STACK0 - 4, HANDLERS + 0x4000):
        g.put(_pte_addr(page), struct.pack("<I", (page & ~0xFFF) | 3))
    g.idt32(0x40, RECORD + "iretd", dpl=3)
    g.idt32(14, "mov ebx, 0xbad\n" + EXIT)
    g.run_exit()
    assert g.entries == 1
    assert g.h_esp == STACK0 - 20
    assert g.cpu.gpr(3) == 0x22
    assert g.u32(SCR + 0x48) == UCODE32


def test_tf_cleared_by_delivery_and_restored_by_iretd():
    # single-step #DB (a trap, vector 1) follows every instruction started with
    # TF=1; delivery clears TF, so nothing inside the INT 0x40 handler traps,
    # and IRETD restores TF (the trap resumes after the instruction after IRETD)
    code = f"""
pushfd
or dword ptr [esp], {EF_TF:#x}
popfd
nop
int 0x40
nop
nop
pushfd
and dword ptr [esp], {~EF_TF & 0xFFFFFFFF:#x}
popfd
mov ebx, 0x22
""" + EXIT
    g = G()
    g.protected_mode(code)
    log = SCR + 0x200
    g.idt32(1, f"""
push eax
push ebx
mov ebx, [{log:#x}]
mov eax, [esp+8]
mov [{log + 4:#x}+ebx*4], eax
inc dword ptr [{log:#x}]
pop ebx
pop eax
iretd
""")
    g.idt32(0x40, RECORD + "nop\nnop\niretd")
    g.run_exit()
    assert g.frame(3)[2] & EF_TF
    assert not g.h_eflags & EF_TF
    n = g.u32(log)
    eips = [g.u32(log + 4 + 4 * i) for i in range(n)]
    expect = [addr_after(code, k, CODE) for k in (4, 6, 7, 8, 9, 10)]
    assert eips == expect, [hex(e) for e in eips]
    assert g.cpu.gpr(3) == 0x22
