"""Fuzz the CPU with random programs (issue 16) in real, protected and long mode.

* protected mode: random 32-bit code under paging -- ALU instructions, loads
  and stores to not-present, read-only and writable pages, calls into
  executable and not-present pages, port output, loops, and stores into the
  immediates of their own block (self-modifying code) -- with a #PF handler
  that counts the faults and goes on (tests/test_mmu_modes.py builds the guest);
* long mode: the same in 64-bit code, the test pages mapped by a 4 KiB page
  table under guestkit's 2 MiB identity map, a 64-bit #PF handler;
* real mode: 16-bit code with 32-bit operands too, loads and stores, segment
  loads, near calls, software interrupts, REP STOSB, DIV with whatever divisor
  the program left (a #DE when it does not fit, or by zero: a handler counts
  it and skips the DIV) and self-modifying code.

Each program runs under both MMU modes with the per-instruction reference
clock on: it must end at its exit, the C clock must equal the reference clock,
and both modes must agree on the icount, the number of faults and the final
registers, within the time bound.

Building a machine costs more than running a program (two engines, their EPT
and reference-clock hooks: ~30 ms of the ~70 an example took), so each process
builds one guest per mode and MMU and puts it back before each program with
``Machine.load_state`` (the restore time travel and snapshots use), then writes
the program.  One example in eight also runs on freshly built machines, which
must end exactly as the restored ones did.
"""
from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from tests import test_mmu_modes
from tests.fuzz.harness import bounded, fuzz_settings, tally

KINDS = ("real", "protected", "long")


def _modes():
    return test_mmu_modes


# -- the programs ---------------------------------------------------------------------------
REAL_FAULTS = 0x5000      # the real-mode handlers count here (#DE) and at +4 (INT 40h)
REAL_DATA = 0x6000
REAL_SUB = 0x8000         # a RET
REAL_ITEMS = ["add ax, bx", "sub bx, 7", "xor dx, ax", "inc si", "nop", "lea si, [bx+si+3]", "add eax, ebx",
              "shl ax, 1", f"mov ax, word ptr [{REAL_DATA:#x}]", f"mov word ptr [{REAL_DATA + 4:#x}], ax",
              f"push ds; push {REAL_DATA >> 4:#x}; pop ds; mov word ptr [0x10], ax; pop ds",
              f"push bx; mov bx, {REAL_SUB:#x}; call bx; pop bx", "out 0x80, al", "int 0x40",
              "div bl", "push bx; xor bl, bl; div bl; pop bx",
              f"push cx; push di; mov cx, 3; mov di, {REAL_DATA + 0x100:#x}; rep stosb; pop di; pop cx",
              "mov byte ptr [S{k}+1], cl; add ax, bx; S{k}: mov bl, 0",
              "mov byte ptr [S{k}+1], al; S{k}: mov dl, 0; add si, dx"]
# #DE pushes the DIV's own IP: count, skip the 2-byte DIV r/m8 (F6 /6, register form)
REAL_DE = f"push bp; mov bp, sp; add word ptr [bp+2], 2; inc word ptr [{REAL_FAULTS:#x}]; pop bp; iret"
REAL_INT40 = f"inc word ptr [{REAL_FAULTS + 4:#x}]; iret"


def _long_items() -> list[str]:
    t = _modes()
    # every data access is MOV EAX, moffs64 (A1/A3, 9 bytes): the #PF handler skips 9
    return ["add rax, rbx", "sub rbx, 7", "xor rdx, rax", "inc rsi", "nop", "lea rsi, [rsi+rax*2]",
            "add eax, ebx", "imul rdx, rbx",
            f"mov eax, dword ptr [{t.NP:#x}]", f"mov dword ptr [{t.NP + 0x10:#x}], eax",
            f"mov dword ptr [{t.RO + 8:#x}], eax", f"mov eax, dword ptr [{t.RO:#x}]",
            f"mov dword ptr [{t.RW + 4:#x}], eax", f"call {t.EXEC:#x}", f"call {t.NPX:#x}", "out 0x80, al",
            "mov byte ptr [S{k}+1], cl; add rax, rbx; S{k}: mov bl, 0",
            "mov byte ptr [S{k}+1], al; S{k}: mov dl, 0; add rsi, rdx"]


def _long_pf() -> str:
    t = _modes()
    # frame: [rsp] saved RAX, +8 error code, +16 RIP, +24 CS, +32 RFLAGS, +40 RSP, +48 SS.
    # A fetch fault (CR2 = RIP) returns to the caller as the missing RET would.
    return f"""
        push rax
        inc dword ptr [{t.FAULT_COUNT:#x}]
        mov rax, cr2
        cmp rax, [rsp+16]
        jne data
        mov rax, [rsp+40]
        mov rax, [rax]
        mov [rsp+16], rax
        add qword ptr [rsp+40], 8
        pop rax
        add rsp, 8
        iretq
    data:
        add qword ptr [rsp+16], 9
        pop rax
        add rsp, 8
        iretq
    """


def program(kind: str):
    if kind == "protected":
        return _modes()._program()
    if kind == "long":
        return _modes().programs(_long_items(), "rcx")
    return _modes().programs(REAL_ITEMS, "cx")


def code_of(kind: str, prog: str) -> tuple[bytes, int]:
    """The guest's whole code (set-up, program, exit) and where it goes."""
    from tools.guestkit import CODE, asm

    t = _modes()
    exit_ = "mov dx, 0x501; mov al, 0; out dx, al; hlt"
    if kind == "protected":
        return asm(t.paging_program(prog), 32, CODE), CODE
    if kind == "long":
        return asm(f"mov eax, 1; mov ebx, 2; xor esi, esi; {prog}; {exit_}", 64, CODE), CODE
    return asm(f"mov ax, 1; mov bx, 2; xor si, si; {prog}; {exit_}", 16, 0x7C00), 0x7C00


def build(kind: str, mmu: str):
    """A guest of the kind with its handlers and pages, no program yet (a HLT)."""
    from tools.guestkit import PT

    t = _modes()
    if kind == "protected":
        return t.paging_guest(mmu, "")
    g = t.guest(mmu)
    if kind == "long":
        g.long_mode("hlt")
        # the 2 MiB page at 0x200000 becomes a 4 KiB page table, with the test pages in it
        pt = bytearray(struct.pack("<512Q", *((0x200000 + (i << 12)) | 7 for i in range(512))))
        for va, flags in ((t.NP, 0), (t.RO, 5), (t.RW, 7), (t.EXEC, 5), (t.NPX, 0)):
            struct.pack_into("<Q", pt, 8 * ((va - 0x200000) >> 12), (va if flags else 0) | flags)
        g.put(PT + 0x3000, bytes(pt))
        g.put(PT + 0x2000 + 8, struct.pack("<Q", (PT + 0x3000) | 7))
        g.idt64(14, _long_pf())
        g.put(t.EXEC, b"\xc3")
        g.put(t.FAULT_COUNT, bytes(8))
    else:
        g.real_mode("hlt")
        g.ivt(0, REAL_DE)
        g.ivt(0x40, REAL_INT40)
        g.put(REAL_SUB, b"\xc3")
        g.put(REAL_FAULTS, bytes(8))
    return g


def faults_of(kind: str, g) -> int:
    if kind == "real":
        return g.u32(REAL_FAULTS) | g.u32(REAL_FAULTS + 4) << 32
    return g.u32(_modes().FAULT_COUNT)


# one guest per (kind, MMU) in this process, and its state before any program
_BASES: dict[tuple[str, str], tuple] = {}


def _restored(kind: str, mmu: str):
    if (kind, mmu) not in _BASES:
        g = build(kind, mmu)
        g.cpu.enable_reference_clock()
        _BASES[kind, mmu] = (g, g.m.save_state())
    g, state = _BASES[kind, mmu]
    g.m.load_state(state)
    g.exit_status = None
    return g


def _fresh(kind: str, mmu: str):
    g = build(kind, mmu)
    g.cpu.enable_reference_clock()
    return g


def _end(kind: str, mmu: str, g, code: bytes, at: int) -> tuple:
    from vmm.machine import StopReason

    g.put(at, code)
    g.cpu.ref_icount = g.cpu.icount
    r = g.run(100_000)
    assert r.reason is StopReason.EXIT and g.exit_status == 0, (kind, mmu, r)
    assert g.cpu.icount == g.cpu.ref_icount, (kind, mmu, g.cpu.icount, g.cpu.ref_icount)
    return g.cpu.icount, faults_of(kind, g), g.cpu.snapshot_regs()


def check_program(kind: str, prog: str, fresh: bool = False) -> str:
    t = _modes()
    code, at = code_of(kind, prog)
    ends = {}
    with bounded():
        for mmu in t.MODES:
            ends[mmu] = _end(kind, mmu, _restored(kind, mmu), code, at)
            if fresh:
                g = _fresh(kind, mmu)
                try:
                    assert _end(kind, mmu, g, code, at) == ends[mmu], (kind, mmu, "a restored machine ran it otherwise")
                finally:
                    g.m.close()
    assert ends["shadow"] == ends["nested"], (kind, "the MMU modes disagree")
    return f"{kind}: {'faulted' if ends['shadow'][1] else 'no fault'}"


@st.composite
def _examples(draw):
    kind = draw(st.sampled_from(KINDS))
    return kind, draw(program(kind)), draw(st.integers(0, 7)) == 0


@fuzz_settings(45)
@given(example=_examples())
def test_random_programs_in_both_mmu_modes_against_the_reference_clock(example):
    kind, prog, fresh = example
    tally("random_programs", check_program(kind, prog, fresh))
