"""SYSCALL and SYSENTER done in the CPU core's hook (vmm/cpu/native/deliver.c,
fast_sysinsn) against the Python reference (vmm/cpu/delivery.py syscall and
sysenter).

Each guest runs twice from the same start: with the C path (the default) and
with ``Machine.fast_delivery = False``, where every SYSCALL and SYSENTER is an
exit emulated in Python.  Both must end in the same state: registers, segment
caches, hflags, the instruction count, every byte of RAM and the exit counts
(one done in C counts as a syscall/sysenter exit).  The guests loop through
the instruction from ring 3 and return with SYSRET/SYSEXIT, with the flags
FMASK clears and keeps, in runs cut into pieces of many lengths so that
budget stops fall before, on and after the instruction; the cases C leaves to
Python (an interrupt shadow, EFER.SCE clear, compatibility mode) are in the
same guests.  An introspector asking for system calls still sees every one.
"""
from __future__ import annotations

import hashlib

import pytest

from tools.guestkit import HANDLERS, KCODE32, KCODE64, USER, Guest, asm
from vmm.introspect import Introspector

EXIT = "mov dx, 0x501\nout dx, al\n"
SCR = 0x60000
EFER, STAR, LSTAR, FMASK = 0xC000_0080, 0xC000_0081, 0xC000_0082, 0xC000_0084
SYSENTER_CS, SYSENTER_ESP, SYSENTER_EIP = 0x174, 0x175, 0x176
EF_IF, EF_DF, EF_AC, EF_IOPL3 = 1 << 9, 1 << 10, 1 << 18, 3 << 12
ENTRY = HANDLERS + 0x100
KSTACK = 0x6F000
ROUNDS = 40

# ring 3: ROUNDS system calls with changing arguments and flags; one in four right
# after STI (its shadow: left to Python)
USER64 = f"""
mov r12, {ROUNDS}
again:
mov rax, r12
mov rdi, r12
shl rdi, 3
test r12, 1
jz even
std
jmp go
even:
cld
go:
test r12, 3
jnz plain
sti
syscall
jmp back
plain:
nop
syscall
back:
add [{SCR + 0x100:#x}], rax
add [{SCR + 0x108:#x}], rcx
add [{SCR + 0x110:#x}], r11
dec r12
jnz again
""" + EXIT

# CPL 0: count, fold what the handler sees (RFLAGS, RCX, R11, RDI, CS, SS) into one
# sum in RAM, return with SYSRET (REX.W: 64-bit)
HANDLER64 = f"""
inc qword ptr [{SCR:#x}]
pushfq
pop rdx
imul rdx, rdx, 3
add rdx, rcx
imul rdx, rdx, 5
add rdx, r11
add rdx, rdi
xor r8d, r8d
mov r8w, cs
shl r8, 16
mov r8w, ss
xor rdx, r8
add [{SCR + 8:#x}], rdx
lea rax, [rax + rax*2 + 1]
sysret
"""


def user_sysenter(bits: int) -> str:
    """ROUNDS SYSENTERs from ring 3, SYSEXIT back to `after` (EDX/RDX) on the same stack."""
    r = "r" if bits == 64 else "e"
    target = "lea rdx, [rip + after]" if bits == 64 else "mov edx, after"
    return f"""
mov esi, {ROUNDS}
again:
mov eax, esi
{target}
mov {r}cx, {r}sp
test esi, 3
jnz plain
sti
sysenter
plain:
nop
sysenter
after:
add [{SCR + 0x100:#x}], eax
dec esi
jnz again
""" + EXIT


def handler_sysexit(bits: int) -> str:
    r = "r" if bits == 64 else "e"
    w = "qword" if bits == 64 else "dword"
    return f"""
inc {w} ptr [{SCR:#x}]
mov [{SCR + 8:#x}], {r}sp
pushf{"q" if bits == 64 else "d"}
pop {r}bx
add [{SCR + 0x10:#x}], {r}bx
xor ebx, ebx
mov bx, cs
add [{SCR + 0x18:#x}], {r}bx
lea eax, [eax + eax*2 + 1]
sysexit
"""


def build_syscall(fmask: int, sce: bool = True):
    def build(g: Guest) -> None:
        g.long_mode(USER64, ring=3)
        cpu = g.cpu
        cpu.rflags = cpu.rflags | EF_IOPL3 | EF_IF
        cpu.set_msr(STAR, (0x20 << 48) | (KCODE64 << 32))
        cpu.set_msr(LSTAR, ENTRY)
        cpu.set_msr(FMASK, fmask)
        if not sce:
            cpu.set_msr(EFER, cpu.efer & ~1)
            # #UD: the handler steps over the 2-byte SYSCALL
            g.idt64(6, f"inc qword ptr [{SCR + 0x200:#x}]\nadd qword ptr [rsp], 2\niretq")
        g.put(ENTRY, asm(HANDLER64, 64, ENTRY))
    return build


def build_sysenter(bits: int):
    def build(g: Guest) -> None:
        if bits == 64:
            g.long_mode(user_sysenter(64), ring=3)   # SYSEXIT with REX.W: back to 64-bit code
        else:
            g.protected_mode(user_sysenter(32), ring=3)
        cpu = g.cpu
        cpu.rflags = cpu.rflags | EF_IOPL3 | EF_IF
        cpu.set_msr(SYSENTER_CS, KCODE64 if bits == 64 else KCODE32)
        cpu.set_msr(SYSENTER_ESP, KSTACK)
        cpu.set_msr(SYSENTER_EIP, ENTRY)
        g.put(ENTRY, asm(handler_sysexit(bits), bits, ENTRY))
    return build


def state(g: Guest) -> dict:
    cpu = g.cpu
    return {
        "regs": cpu.snapshot_regs(), "segs": [repr(cpu.seg(i)) for i in range(6)], "hflags": cpu.hflags,
        "icount": g.m.icount, "ram": hashlib.sha256(g.m.memory.read(0, g.m.memory.size)).hexdigest(),
        "exits": {k: v for k, v in g.m.exit_counts.items() if v and k not in ("io", "deadline")},
        "calls": g.u64(SCR), "uds": g.u64(SCR + 0x200),
    }


def both(build, pieces: int = 0) -> tuple[dict, dict, tuple[int, int]]:
    """(state with SYSCALL/SYSENTER in C, state with the Python path, how many C did).
    pieces: run in slices of 1, 2, ... pieces instructions, so that runs stop all
    around the instructions; 0: one run."""
    out = []
    for fast in (True, False):
        g = Guest()
        build(g)
        g.m.fast_delivery = fast
        g.cpu.invalidate_code()
        n = 0
        while True:
            n = n % pieces + 1 if pieces else 1_000_000
            r = g.m.run(g.m.icount + n)
            if r.reason.value != "limit":
                break
        assert r.reason.value == "exit", str(r)
        out.append((state(g), g.m.engine.fast_sysinsns))
    (a, n_fast), (b, n_ref) = out
    assert n_ref == (0, 0)
    return a, b, n_fast


@pytest.mark.parametrize("pieces", [0, 7, 23])
@pytest.mark.parametrize("fmask", [EF_IF | EF_DF | EF_AC, 0])
def test_syscall_in_c_matches_python(fmask, pieces):
    a, b, (sc, se) = both(build_syscall(fmask), pieces)
    assert a == b
    assert a["exits"]["syscall"] == ROUNDS == a["calls"]
    # in one run, every SYSCALL but those in an STI shadow
    assert se == 0 and (sc == ROUNDS - ROUNDS // 4 if not pieces else sc > 0)


def test_syscall_with_sce_clear_is_ud_either_way():
    a, b, (sc, _) = both(build_syscall(EF_IF, sce=False))
    assert a == b and sc == 0
    assert a["uds"] == ROUNDS and a["calls"] == 0


@pytest.mark.parametrize("pieces", [0, 11])
@pytest.mark.parametrize("bits", [32, 64])
def test_sysenter_in_c_matches_python(bits, pieces):
    a, b, (sc, se) = both(build_sysenter(bits), pieces)
    assert a == b
    assert a["exits"]["sysenter"] == ROUNDS == a["calls"]
    assert sc == 0 and se > 0


def test_introspection_sees_every_syscall():
    g = Guest()
    build_syscall(EF_IF)(g)
    seen = []
    spy = Introspector(g.m)
    spy.on_syscall(lambda call: seen.append((call.mechanism, call.number)))
    r = g.run()
    assert r.reason.value == "exit", str(r)
    assert seen == [("syscall", n) for n in range(ROUNDS, 0, -1)]
    assert g.m.engine.fast_sysinsns == (0, 0)
