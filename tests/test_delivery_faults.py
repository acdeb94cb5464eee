"""Faults during delivery: double fault, shutdown and serial handling
(Intel SDM vol. 3A 6.15, "Interrupt 8 -- Double Fault Exception", table 6-4
classes and table 6-5 conditions), CR2 on nested page faults ("Interrupt 14"),
the EXT bit (6.13) and the instruction count of an INT that faults.

Table 6-5 (first exception -> second exception while delivering it):
    benign        -> anything                 : handle serially
    contributory  -> benign or page fault     : handle serially
    contributory  -> contributory             : #DF
    page fault    -> benign                   : handle serially
    page fault    -> contributory or #PF      : #DF
    double fault  -> contributory or #PF      : shutdown
Contributory: #DE(0), #TS(10), #NP(11), #SS(12), #GP(13).  INT n and
external interrupts are not exceptions: a fault in their delivery is
delivered serially.
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
    TSS,
    TSS_SEL,
    asm,
    gate32,
    seg_desc,
)

EXIT = "mov dx, 0x501\nout dx, al\n"
SCR = 0x60000
PD64 = PT + 0x2000

# 32-bit: record 4 dwords of the frame, the entry ESP and CS, count entries
REC32 = f"""
push eax
mov eax, [esp+4]
mov [{SCR:#x}], eax
mov eax, [esp+8]
mov [{SCR + 4:#x}], eax
mov eax, [esp+12]
mov [{SCR + 8:#x}], eax
mov eax, [esp+16]
mov [{SCR + 12:#x}], eax
lea eax, [esp+4]
mov [{SCR + 0x10:#x}], eax
{{cr2}}
inc dword ptr [{SCR + 0x18:#x}]
pop eax
"""
CR2_32 = f"mov eax, cr2\nmov [{SCR + 0x14:#x}], eax"
REC32_CPL3 = REC32.format(cr2="")  # MOV from CR2 is privileged
REC32 = REC32.format(cr2=CR2_32)

# 64-bit: the same with qwords
REC64 = f"""
push rax
mov rax, [rsp+8]
mov [{SCR:#x}], rax
mov rax, [rsp+16]
mov [{SCR + 8:#x}], rax
mov rax, [rsp+24]
mov [{SCR + 0x10:#x}], rax
lea rax, [rsp+8]
mov [{SCR + 0x20:#x}], rax
mov rax, cr2
mov [{SCR + 0x28:#x}], rax
inc qword ptr [{SCR + 0x30:#x}]
pop rax
"""


class G(guestkit.Guest):
    def protected_mode(self, code: str, ring: int = 0, paging: bool = False, at: int | None = None) -> None:
        assert asm(code, 32), code
        super().protected_mode(code, ring, paging, at)
        self.cpu.rflags = self.cpu.rflags | (3 << 12)

    def long_mode(self, code: str, ring: int = 0, at: int | None = None) -> None:
        assert asm(code, 64), code
        super().long_mode(code, ring, at)
        self.cpu.rflags = self.cpu.rflags | (3 << 12)

    def idt32(self, vector: int, handler: str | None = None, **kw) -> int:
        assert handler is None or asm(handler, 32), handler
        return super().idt32(vector, handler, **kw)

    def idt64(self, vector: int, handler: str | None = None, **kw) -> int:
        assert handler is None or asm(handler, 64), handler
        return super().idt64(vector, handler, **kw)

    def d(self, i: int) -> int:
        return self.u32(SCR + 4 * i)

    def add_gdt(self, sel: int, desc: int) -> None:
        self.put(GDT + (sel & ~7), struct.pack("<Q", desc))
        self.gdt[sel & ~7] = desc

    def run_to(self, reason: str, limit: int = 200_000):
        r = self.run(limit)
        assert r.reason.value == reason, str(r)
        return r


BAD = "mov ebx, 0xbad\n" + EXIT
BAD64 = "mov rbx, 0xbad\n" + EXIT
GP_BAD_SEL = "mov ax, 0x7f8\nmov ds, ax\n"


def not_present_pte(g: G, lin: int, flags: int = 6) -> None:
    g.put(PT + 0x1000 + 4 * (lin >> 12), struct.pack("<I", (lin & ~0xFFF) | flags))


# ---------------------------------------------------------------------------
# contributory + contributory -> #DF
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["gate-not-present", "bad-handler-selector", "handler-cs-not-present"])
def test_gp_while_delivering_gp_is_a_double_fault_with_error_code_0(how):
    g = G()
    g.protected_mode(GP_BAD_SEL + BAD)
    if how == "gate-not-present":
        g.idt32(13, BAD, present=False)               # -> #NP(13*8+2+1)
    elif how == "bad-handler-selector":
        g.idt32(13, BAD, selector=0x7F8)              # -> #GP(0x7F8+1)
    else:
        g.add_gdt(0x50, seg_desc(0, 0xFFFFF, 0x1B, 0xC))
        g.idt32(13, BAD, selector=0x50)               # -> #NP(0x50+1)
    g.idt32(8, REC32 + EXIT)
    g.run_to("exit")
    assert g.d(6) == 1  # one #DF
    assert g.d(0) == 0  # error code 0
    assert g.d(2) == KCODE32
    assert g.d(4) == STACK0 - 16  # EFLAGS, CS, EIP, error code
    assert g.cpu.gpr(3) != 0xBAD


def test_divide_error_with_a_not_present_gate_is_a_double_fault():
    g = G()
    g.protected_mode("xor ecx, ecx\ndiv ecx\n" + BAD)
    g.idt32(0, BAD, present=False)
    g.idt32(11, BAD)
    g.idt32(8, REC32 + EXIT)
    g.run_to("exit")
    assert g.d(6) == 1 and g.d(0) == 0


def test_ts_from_a_bad_ss0_while_delivering_gp_is_a_double_fault():
    # ring 3 #GP needs the ring-0 stack; TSS.SS0 = a code segment -> #TS(sel+EXT)
    # (contributory); the #DF goes through a conforming handler so that it needs no stack switch
    g = G()
    g.protected_mode(GP_BAD_SEL + BAD, ring=3)
    g.put(TSS + 8, struct.pack("<H", KCODE32))
    g.add_gdt(0x50, seg_desc(0, 0xFFFFF, 0x9F, 0xC))  # conforming code, DPL 0
    g.idt32(13, BAD)
    g.idt32(10, BAD)
    g.idt32(8, REC32_CPL3 + EXIT, selector=0x50)
    g.run_to("exit")
    assert g.d(6) == 1 and g.d(0) == 0
    assert g.d(2) == guestkit.UCODE32
    assert g.d(4) == guestkit.STACK3 - 16  # on the ring-3 stack, error code on top


def test_fault_while_delivering_the_double_fault_shuts_down():
    g = G()
    g.protected_mode(GP_BAD_SEL + BAD)
    g.idt32(13, BAD, present=False)
    g.idt32(11, BAD)
    g.idt32(8, BAD, present=False)
    r = g.run_to("shutdown")
    assert g.cpu.gpr(3) != 0xBAD
    assert r.icount == 1  # only the MOV AX retired


def test_double_fault_gate_with_a_bad_selector_shuts_down_in_long_mode():
    g = G()
    g.long_mode(GP_BAD_SEL + BAD64)
    g.idt64(13, BAD64, present=False)
    g.idt64(8, BAD64, selector=KCODE32)  # not a 64-bit code segment -> #GP
    g.run_to("shutdown")


# ---------------------------------------------------------------------------
# page faults
# ---------------------------------------------------------------------------

TASK_STACK = 0x68000
TSS2, TSS2_SEL = 0x3800, 0x58


def df_task(g: G, handler: str) -> None:
    """#DF through a task gate (the classic way to survive a broken stack)."""
    g.add_gdt(TSS_SEL, seg_desc(TSS, 0x67, 0x8B, 0x0))
    g.add_gdt(TSS2_SEL, seg_desc(TSS2, 0x67, 0x89, 0x0))
    entry = HANDLERS + 0x800
    g.put(entry, asm(handler, 32, entry))
    tss = bytearray(0x68)
    struct.pack_into("<III", tss, 0x1C, g.cpu.cr3, entry, 2)
    struct.pack_into("<I", tss, 0x38, TASK_STACK)
    struct.pack_into("<6I", tss, 0x48, KDATA32, KCODE32, KDATA32, KDATA32, KDATA32, KDATA32)
    g.put(TSS2, bytes(tss))
    g.put(IDT + 8 * 8, struct.pack("<Q", gate32(TSS2_SEL, 0, 5, 0)))


DF_TASK_HANDLER = f"""
mov eax, [esp]
mov [{SCR:#x}], eax
mov [{SCR + 0x10:#x}], esp
mov eax, cr2
mov [{SCR + 0x14:#x}], eax
inc dword ptr [{SCR + 0x18:#x}]
mov eax, [{TSS2:#x}]
mov [{SCR + 0x1C:#x}], eax
""" + EXIT


def test_page_fault_while_delivering_a_page_fault_is_a_double_fault():
    # ring 3 touches a not-present page; the #PF frame goes to TSS.ESP0 whose
    # page is not present either: #PF during #PF -> #DF (handled by a task)
    g = G()
    g.protected_mode("mov eax, [0x50000]\n" + BAD, ring=3, paging=True)
    not_present_pte(g, 0x50000)
    not_present_pte(g, STACK0 - 4)
    g.idt32(14, BAD)
    df_task(g, DF_TASK_HANDLER)
    g.run_to("exit")
    assert g.d(6) == 1
    assert g.d(0) == 0  # error code 0 on the #DF task's stack
    assert g.d(4) == TASK_STACK - 4
    # CR2 holds the address of the second page fault (SDM 6.15, interrupt 14:
    # "these updates to CR2 occur even if the page fault results in a double fault")
    assert STACK0 - 20 <= g.d(5) < STACK0
    assert g.d(7) & 0xFFFF == TSS_SEL  # nested task: back link


def test_page_fault_while_delivering_the_double_fault_shuts_down_and_sets_cr2():
    g = G()
    g.protected_mode("mov eax, [0x50000]\n" + BAD, ring=3, paging=True)
    not_present_pte(g, 0x50000)
    not_present_pte(g, STACK0 - 4)
    g.idt32(14, BAD)
    g.idt32(8, BAD)  # needs the same broken ring-0 stack
    g.run_to("shutdown")
    assert STACK0 - 20 <= g.cpu.cr2 < STACK0


def test_idt_limit_excluding_the_pf_vector_makes_pf_a_double_fault():
    # #PF, then #GP(14*8+2+1) reading its gate: page fault -> contributory = #DF
    g = G()
    g.protected_mode("mov eax, [0x50000]\n" + BAD, paging=True)
    not_present_pte(g, 0x50000)
    g.set_idt(14 * 8 - 1)
    g.idt32(13, BAD)
    g.idt32(8, REC32 + EXIT)
    g.run_to("exit")
    assert g.d(6) == 1 and g.d(0) == 0
    assert g.d(5) == 0x50000  # CR2 of the first fault


def test_page_fault_on_the_ist_stack_while_delivering_pf_is_a_double_fault_long_mode():
    g = G()
    g.long_mode("mov rsi, 0x280000\nmov rax, [rsi]\n" + BAD64)
    g.put(PD64 + 8, struct.pack("<Q", 0x200000 | 0x82))  # 2-4 MiB not present
    g.put(TSS + 0x24, struct.pack("<Q", 0x300000))      # IST1 inside it
    g.idt64(14, BAD64, ist=1)
    g.idt64(8, REC64 + EXIT, ist=0)
    g.run_to("exit")
    assert g.u64(SCR + 0x30) == 1
    assert g.u64(SCR) == 0  # error code
    assert g.u64(SCR + 0x20) == STACK0 - 48
    assert 0x300000 - 48 <= g.u64(SCR + 0x28) < 0x300000  # CR2 = the IST push


PF_MAP = f"""
push rax
or qword ptr [{PD64 + 8:#x}], 1
mov rax, cr2
invlpg [rax]
pop rax
add rsp, 8
iretq
"""


def test_contributory_then_page_fault_is_handled_serially():
    # #GP whose IST stack is not present: #PF is delivered (on the normal
    # stack), its handler maps the page, IRETQ restarts the MOV DS, and the
    # #GP is then delivered on the IST stack
    g = G()
    g.long_mode(GP_BAD_SEL + "mov rbx, 0x22\n" + EXIT)
    g.put(PD64 + 8, struct.pack("<Q", 0x200000 | 0x82))
    g.put(TSS + 0x24, struct.pack("<Q", 0x300000))
    g.idt64(14, REC64 + PF_MAP)
    g.idt64(13, f"""
mov [{SCR + 0x40:#x}], rsp
mov rax, [rsp]
mov [{SCR + 0x48:#x}], rax
mov ax, {KDATA32}
add rsp, 8
iretq
""", ist=1)
    g.run_to("exit")
    assert g.u64(SCR + 0x30) == 1  # one #PF
    assert g.u64(SCR) == 0b10  # supervisor write, not present
    assert g.u64(SCR + 8) == CODE + 4  # the #PF frame points at the MOV DS
    assert 0x300000 - 48 <= g.u64(SCR + 0x28) < 0x300000
    assert g.u64(SCR + 0x40) == 0x300000 - 48  # then #GP on IST1
    assert g.u64(SCR + 0x48) == 0x7F8
    assert g.cpu.gpr(3) == 0x22


def test_benign_then_page_fault_is_handled_serially():
    g = G()
    g.long_mode("ud2\nmov rbx, 0x22\n" + EXIT)
    g.put(PD64 + 8, struct.pack("<Q", 0x200000 | 0x82))
    g.put(TSS + 0x24, struct.pack("<Q", 0x300000))
    g.idt64(14, REC64 + PF_MAP)
    g.idt64(6, f"mov [{SCR + 0x40:#x}], rsp\nadd qword ptr [rsp], 2\niretq", ist=1)
    g.run_to("exit")
    assert g.u64(SCR + 0x30) == 1
    assert g.u64(SCR + 8) == CODE
    assert g.u64(SCR + 0x40) == 0x300000 - 40
    assert g.cpu.gpr(3) == 0x22


# ---------------------------------------------------------------------------
# benign first events: serial
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("insn,vector,ext", [("int3", 3, 0), ("ud2", 6, 1), ("int 0x0d", 13, 0), ("int 8", 8, 0)])
def test_not_present_gate_for_benign_or_software_event_gives_np_not_df(insn, vector, ext):
    g = G()
    g.protected_mode(insn + "\nmov ebx, 0x22\n" + EXIT)
    g.idt32(vector, BAD, present=False)
    g.idt32(11, REC32 + EXIT)
    if vector != 8:
        g.idt32(8, BAD)
    g.run_to("exit")
    assert g.d(6) == 1
    assert g.d(0) == vector * 8 + 2 + ext
    assert g.d(1) == CODE  # the faulting event's instruction


# ---------------------------------------------------------------------------
# external interrupts are not exceptions, whatever their vector
# ---------------------------------------------------------------------------

class IrqPoke:
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


def with_pic(g: G) -> Pic8259Pair:
    pic = Pic8259Pair()
    pic.program_like_pc_bios()
    g.m.add_device(pic)
    g.m.set_interrupt_controller(pic)
    g.m.add_device(IrqPoke(pic))
    return pic


RAISE = "sti\nmov al, {irq}\nmov dx, 0x510\nout dx, al\nmov ebx, 0x22\n" + EXIT


@pytest.mark.parametrize("irq", [0, 3])
def test_external_interrupt_on_an_exception_vector_pushes_no_error_code(irq):
    # under the BIOS programming IRQ0 -> vector 8 (#DF), IRQ3 -> vector 11 (#NP)
    g = G()
    g.protected_mode(RAISE.format(irq=irq))
    with_pic(g)
    g.idt32(8 + irq, REC32 + "push eax\nmov al, 0x20\nout 0x20, al\npop eax\niretd")
    g.run_to("exit")
    assert g.d(6) == 1
    assert g.d(4) == STACK0 - 12  # EFLAGS, CS, EIP only
    assert g.d(0) == CODE + 8  # right after the OUT
    assert g.cpu.gpr(3) == 0x22


@pytest.mark.parametrize("irq", [0, 4, 5, 10])
def test_external_interrupt_through_a_not_present_gate_is_np_with_ext_serially(irq):
    # vectors 8 (#DF), 12 (#SS), 13 (#GP) and 0x72: an interrupt is benign, so
    # the #NP is delivered, never a #DF or a shutdown
    vector = 8 + irq if irq < 8 else 0x70 + irq - 8
    g = G()
    g.protected_mode(RAISE.format(irq=irq))
    with_pic(g)
    g.idt32(vector, BAD, present=False)
    g.idt32(11, REC32 + EXIT)
    if vector != 8:
        g.idt32(8, BAD)
    g.run_to("exit")
    assert g.d(6) == 1
    assert g.d(0) == vector * 8 + 2 + 1  # IDT | EXT
    assert g.d(1) == CODE + 8


# ---------------------------------------------------------------------------
# INT n that faults does not retire
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dpl,expect", [(3, 3), (0, 2)])
def test_int_n_counts_as_retired_only_when_delivered(dpl, expect):
    # INT n is a trap and retires; an INT n whose delivery faults (#GP from
    # the DPL check) is a fault: it did not complete, so it does not count
    g = G()
    g.protected_mode("int 0x40\n" + BAD, ring=3)
    g.idt32(0x40, EXIT, dpl=dpl)
    g.idt32(13, EXIT)
    r = g.run_to("exit")
    assert r.icount == expect
