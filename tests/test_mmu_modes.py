"""The shadow MMU (C TLB fill: guest tables + EPT) against the nested MMU
(Unicorn's own walk): the same guest-visible behaviour, the same clock.

* every guest of the project gives the same serial output, exit status and
  final instruction count under both (and t_paging passes);
* the exact instruction clock treats a page fault as a fault (the
  instruction does not retire) in both: random programs with page faults
  (not present, read-only, fetch from a missing page) hold the C clock to
  the reference clock, and ``run(until)`` still stops exactly;
* implicit supervisor accesses made at CPL 3 (descriptor loads, IRET, a
  call gate and its TSS stack switch) work with the GDT and TSS on
  supervisor-only pages;
* code rewritten in place, or the same linear address mapped to other code,
  is counted right by the shadow MMU (W^X tracking invalidates the block
  count cache); the nested MMU cannot see such writes;
* a CR3 outside RAM (or at a hole) gives the architectural fault, not a
  host crash.
"""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.legacy.debugports import DebugExit
from tools.guestkit import CODE, KCODE32, PT, UCODE32, UDATA32, USER, Guest, asm, gate32
from vmm.firmware.boot import boot
from vmm.machine import Machine, StopReason
from vmm.platform.pc import PcConfig, PcMachine

BUILD = Path(__file__).resolve().parent.parent / "guests" / "build"
IMAGES = sorted(p.name for p in BUILD.iterdir() if p.suffix in (".img", ".elf", ".bin")) if BUILD.is_dir() else []
MODES = ("shadow", "nested")


def guest(mmu: str, mem: int = 4 << 20) -> Guest:
    """guestkit's Guest on a Machine with the given MMU."""
    g = Guest.__new__(Guest)
    g.m = Machine(mem, mmu=mmu)
    g.exit_status = None
    g.m.add_device(DebugExit(g._exit))
    g.cpu = g.m.vcpu
    g.gdt = {}
    return g


# -- every guest, both MMUs ----------------------------------------------------------------
def run_image(name: str, mmu: str):
    m = PcMachine(PcConfig(mmu=mmu))
    data = (BUILD / name).read_bytes()
    boot(m, data, name=name, cmdline=name)
    r = m.run(30_000_000)
    return r, bytes(m.serial_out), bytes(m.debugcon_out)


@pytest.mark.parametrize("name", IMAGES)
def test_guest_behaves_the_same_under_shadow_and_nested(name):
    rs, out_s, con_s = run_image(name, "shadow")
    rn, out_n, con_n = run_image(name, "nested")
    assert out_s == out_n
    assert con_s == con_n
    assert (rs.reason, rs.status, rs.icount) == (rn.reason, rn.status, rn.icount)


@pytest.mark.parametrize("mmu", MODES)
def test_t_paging_passes(mmu):
    if not (BUILD / "t_paging.elf").is_file():
        pytest.skip("guests/build/t_paging.elf not built")
    r, out, con = run_image("t_paging.elf", mmu)
    assert r.reason is StopReason.EXIT and r.status == 0, out.decode(errors="replace")
    assert b"t_paging: all checks passed" in out
    # the exact error codes of the three reserved-bit faults (P=1, SDM 4.7)
    assert con == bytes([0x09, 0x09, 0x19])


# -- the clock with page faults ------------------------------------------------------------------
TVA = 0x200000            # test pages, inside guestkit's identity-mapped 4 MiB
NP, RO, RW, EXEC, NPX = (TVA + i * 0x1000 for i in range(5))
FAULT_COUNT = 0x50000

ALU = ["add eax, ebx", "sub ebx, 7", "xor edx, eax", "inc esi", "nop", "lea esi, [esi+eax*2]"]
ACCESS = [f"mov eax, dword ptr [{NP:#x}]", f"mov dword ptr [{NP + 0x10:#x}], eax",
          f"mov dword ptr [{RO + 8:#x}], eax", f"mov eax, dword ptr [{RO:#x}]",
          f"mov dword ptr [{RW + 4:#x}], eax", f"call {EXEC:#x}", f"call {NPX:#x}", "out 0x80, al"]

# #PF: count it; a data fault skips its 5-byte instruction (A1/A3 moffs32), a
# fetch fault (CR2 = EIP) returns to the caller as the missing code's RET would
PF_HANDLER = f"""
    add esp, 4
    push eax
    inc dword ptr [{FAULT_COUNT:#x}]
    mov eax, cr2
    cmp eax, [esp+4]
    jne data
    mov eax, [esp+16]
    mov [{FAULT_COUNT + 4:#x}], eax
    mov eax, [esp+12]
    mov [esp+16], eax
    mov eax, [esp+8]
    mov [esp+12], eax
    mov eax, [{FAULT_COUNT + 4:#x}]
    mov [esp+8], eax
    pop eax
    add esp, 4
    iretd
data:
    add dword ptr [esp+4], 5
    pop eax
    iretd
"""


def paging_program(program: str) -> str:
    """The whole code of a paging guest: set-up, the random program, the exit."""
    return "mov eax, 1; mov ebx, 2; xor esi, esi; " + program + "; mov dx, 0x501; mov al, 0; out dx, al; hlt"


def paging_guest(mmu: str, program: str) -> Guest:
    g = guest(mmu)
    g.protected_mode(paging_program(program), paging=True)
    g.idt32(14, PF_HANDLER)
    pt = PT + 0x1000
    for va, flags in ((NP, 0), (RO, 5), (RW, 7), (EXEC, 5), (NPX, 0)):
        g.put(pt + 4 * (va >> 12), struct.pack("<I", (va if flags else 0) | flags))
    g.put(EXEC, b"\xc3")
    g.put(FAULT_COUNT, bytes(8))
    return g


# self-modifying code: a store into the immediate of an instruction of the same block (QEMU
# cuts the block at the store and runs the store again alone); {k} becomes a unique label
SMC_ITEMS = ["mov byte ptr [S{k}+1], cl; add eax, ebx; S{k}: mov bl, 0",
             "mov byte ptr [S{k}+1], al; S{k}: mov dl, 0; add esi, edx"]


def programs(simple: list[str], counter: str = "ecx"):
    """Random programs: items of ``simple`` and short loops of them (``counter`` counts
    the loop); ``{k}`` in an item becomes a label of its own."""
    item = st.one_of(st.sampled_from(simple),
                     st.tuples(st.integers(1, 4), st.lists(st.sampled_from(simple), min_size=1, max_size=4)))

    def render(items):
        out, label = [], 0

        def one(text):
            nonlocal label
            label += 1
            return text.replace("{k}", str(label))

        for it in items:
            if isinstance(it, tuple):
                n, body = it
                label += 1
                top = label
                out.append(f"push {counter}; mov {counter}, {n}; L{top}: " + "; ".join(one(b) for b in body)
                           + f"; dec {counter}; jnz L{top}; pop {counter}")
            else:
                out.append(one(it))
        return "; ".join(out)

    return st.lists(item, min_size=1, max_size=20).map(render)


def _program():
    return programs(ALU + ACCESS + SMC_ITEMS)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_program())
def test_page_faults_do_not_retire_in_either_mmu(program):
    ends = {}
    for mmu in MODES:
        g = paging_guest(mmu, program)
        g.cpu.enable_reference_clock()
        r = g.run(100_000)
        assert r.reason is StopReason.EXIT, r
        assert g.cpu.icount == g.cpu.ref_icount, mmu
        ends[mmu] = (g.cpu.icount, g.u32(FAULT_COUNT))
    assert ends["shadow"] == ends["nested"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_program(), st.data())
def test_run_until_is_exact_with_page_faults(program, data):
    total = paging_guest("shadow", program).run(100_000).icount
    n = data.draw(st.integers(0, total))
    for mmu in MODES:
        g = paging_guest(mmu, program)
        g.cpu.enable_reference_clock()
        r = g.m.run(max_instructions=n)
        assert g.cpu.icount == n == g.cpu.ref_icount, mmu
        if r.reason is StopReason.EXIT:  # the limit fell on the exit instruction itself
            assert n == total
            continue
        r = g.m.run(max_instructions=100_000)
        assert r.reason is StopReason.EXIT and g.cpu.icount == total == g.cpu.ref_icount


@pytest.mark.parametrize("mmu", MODES)
def test_page_fault_exit_carries_cr2_and_error_code(mmu):
    g = paging_guest(mmu, f"mov eax, dword ptr [{NP + 0x123:#x}]")
    x = g.cpu.run(10_000)
    while x.reason.value != "exception":
        x = g.cpu.run(10_000)
    assert (x.vector, x.error_code, g.cpu.cr2) == (14, 0, NP + 0x123)
    assert x.rip == CODE + 12  # mov eax,1 (5) + mov ebx,2 (5) + xor esi,esi (2): the faulting one
    assert g.cpu.icount == 3


# -- implicit supervisor accesses at CPL 3 ----------------------------------------------------------
@pytest.mark.parametrize("mmu", MODES)
def test_ring3_descriptor_iret_and_call_gate_with_supervisor_gdt_and_tss(mmu):
    # ring 3: a data-segment load, an IRET to ring 3, a far call through a
    # DPL-3 call gate to ring 0 (GDT read, TSS read for SS0:ESP0, pushes on
    # the ring-0 stack) and the far return to ring 3: every descriptor access
    # is an implicit supervisor access to a supervisor-only page
    g = guest(mmu)
    after_iret = USER + 0x100
    user = f"mov ax, 0x23; mov ds, ax; mov es, ax; pushfd; push 0x1b; push {after_iret:#x}; iretd"
    g.protected_mode(user, ring=3, paging=True)
    g.put(after_iret, asm(".byte 0x9a, 0, 0, 0, 0, 0x53, 0; mov eax, [0x50000]; mov dx, 0x501; out dx, al",
                          32, after_iret))
    kernel = 0x21000
    g.put(kernel, asm("mov dword ptr [0x50000], 0x42; retf", 32, kernel))
    g.put(0x1000 + 0x50, struct.pack("<Q", gate32(KCODE32, kernel, 0xC, 3)))  # 32-bit call gate, DPL 3
    pt = PT + 0x1000
    for page in (0x1000, 0x2000, 0x3000, 0x21000, 0x70000 - 0x1000):  # GDT, IDT, TSS, ring-0 code and stack
        g.put(pt + 4 * (page >> 12), struct.pack("<I", page | 3))  # supervisor only
    g.put(0x50000, bytes(4))
    g.cpu.rflags = g.cpu.rflags | 0x3000  # IOPL 3: ring 3 may OUT to the exit port
    # QEMU keeps TR's cached type as loaded by LTR (9, available) and aborts the
    # process on a call gate's stack switch if it is anything else; guestkit
    # caches it busy (11), so set it as LTR would
    tr = g.cpu.tr
    g.cpu.set_sys_seg("tr", tr.selector, tr.base, tr.limit, tr.flags & ~(2 << 8))
    r = g.run(10_000)
    assert r.reason is StopReason.EXIT and g.exit_status == 0x42, r
    assert g.cpu.seg(1).selector == UCODE32 and g.cpu.seg(3).selector == UDATA32


# -- the block-count cache and rewritten code ----------------------------------------------------------
SMC = """
    mov ecx, 50
L:
    call 0x40000
    mov dword ptr [0x40000], 0x90669066
    call 0x40000
    mov dword ptr [0x40000], 0x90909090
    dec ecx
    jnz L
    mov dx, 0x501
    mov al, 0
    out dx, al
"""


@pytest.mark.parametrize("paging", [False, True])
def test_rewritten_block_of_same_address_and_size_is_counted_right(paging):
    # at 0x40000: 90 90 90 90 C3 (nop x4; ret: 5 instructions), rewritten to
    # 66 90 66 90 C3 (xchg ax,ax x2; ret: 3 instructions) and back: one
    # translation block of 5 bytes at the same address every time
    g = guest("shadow")
    g.protected_mode(SMC, paging=paging)
    g.put(0x40000, bytes([0x90, 0x90, 0x90, 0x90, 0xC3]))
    g.cpu.enable_reference_clock()
    r = g.run(100_000)
    assert r.reason is StopReason.EXIT
    # mov ecx; 50 x (call, 5, mov, call, 3, mov, dec, jnz); the exit's mov, mov, out
    assert g.cpu.icount == g.cpu.ref_icount == 1 + 50 * 14 + 3


@pytest.mark.parametrize("paging", [False, True])
def test_nested_mmu_sees_code_rewritten_in_place(paging):
    # no fills under the nested MMU: the clock learns of the rewrite from QEMU's count of
    # invalidated blocks, not from (address, size, mode), which stay the same
    g = guest("nested")
    g.protected_mode(SMC, paging=paging)
    g.put(0x40000, bytes([0x90, 0x90, 0x90, 0x90, 0xC3]))
    g.cpu.enable_reference_clock()
    r = g.run(100_000)
    assert r.reason is StopReason.EXIT
    assert g.cpu.icount == g.cpu.ref_icount == 1 + 50 * 14 + 3


def test_code_rewritten_through_an_alias_page_is_counted_right():
    # the code page at 0x40000 is also mapped at 0x300000; writes go through the alias
    g = guest("shadow")
    g.protected_mode(SMC.replace("dword ptr [0x40000]", "dword ptr [0x300000]"), paging=True)
    g.put(PT + 0x1000 + 4 * 0x300, struct.pack("<I", 0x40000 | 7))
    g.put(0x40000, bytes([0x90, 0x90, 0x90, 0x90, 0xC3]))
    g.cpu.enable_reference_clock()
    r = g.run(100_000)
    assert r.reason is StopReason.EXIT
    assert g.cpu.icount == g.cpu.ref_icount


def test_same_address_other_code_after_cr3_switch_is_counted_right():
    # two address spaces map linear 0x200000 to different code of the same size
    g = guest("shadow")
    prog = """
        mov ecx, 20
    L:
        call 0x200000
        mov eax, 0x8000
        mov cr3, eax
        call 0x200000
        mov eax, 0x4000
        mov cr3, eax
        dec ecx
        jnz L
        mov dx, 0x501
        mov al, 0
        out dx, al
    """
    g.protected_mode(prog, paging=True)
    # second address space: a copy of the first PD/PT, with 0x200000 -> 0x41000
    pd, pt = bytearray(g.m.memory.read(PT, 4096)), bytearray(g.m.memory.read(PT + 0x1000, 4096))
    struct.pack_into("<I", pd, 0, 0x9000 | 7)
    struct.pack_into("<I", pt, 4 * 0x200, 0x41000 | 7)
    g.put(0x8000, bytes(pd))
    g.put(0x9000, bytes(pt))
    g.put(PT + 0x1000 + 4 * 0x200, struct.pack("<I", 0x40000 | 7))
    g.put(0x40000, bytes([0x90, 0x90, 0x90, 0x90, 0xC3]))
    g.put(0x41000, bytes([0x66, 0x90, 0x66, 0x90, 0xC3]))
    g.cpu.enable_reference_clock()
    r = g.run(100_000)
    assert r.reason is StopReason.EXIT
    assert g.cpu.icount == g.cpu.ref_icount


# -- bad CR3 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mmu", MODES)
@pytest.mark.parametrize("cr3", [0x7FFF_F000, 0xFFFF_F000])
def test_cr3_outside_ram_faults_and_never_crashes_the_host(mmu, cr3):
    g = guest(mmu)
    g.protected_mode(f"mov eax, {cr3:#x}; mov cr3, eax; nop; nop", paging=True)
    # PAE paging, 0-2 MiB identity mapped by one 2 MiB page: PDPT at 0x7000, PD at 0x8000
    g.put(0x7000, struct.pack("<QQQQ", 0x8000 | 1, 0, 0, 0))
    g.put(0x8000, struct.pack("<Q", 0x83).ljust(4096, b"\0"))
    g.cpu.set_reg("cr0", g.cpu.cr0 & ~(1 << 31))
    g.cpu.set_reg("cr4", g.cpu.cr4 | 0x20)
    g.cpu.set_reg("cr3", 0x7000)
    g.cpu.set_reg("cr0", g.cpu.cr0 | (1 << 31))
    x = g.cpu.run(100)
    assert x.reason.value == "exception" and x.vector == 14
    assert g.cpu.cr2 == CODE + 8            # the fetch of the NOP after MOV CR3 (which ends its block)
    assert x.error_code == 0                # the PDPTE reads zero, as under QEMU: not present
    r = g.m.run(1000)                       # delivery faults too: #DF, then shutdown
    assert r.reason is StopReason.SHUTDOWN


@pytest.mark.parametrize("mmu", MODES)
def test_page_tables_in_a_hole_read_zeros(mmu):
    g = guest(mmu)
    g.protected_mode("mov eax, [0x1234]; hlt", paging=True)
    g.m.ept.unmap(PT + 0x1000, trap=False)   # the page table's frame: nothing there any more
    g.cpu.flush_tlb()
    x = g.cpu.run(100)
    # 32-bit paging: the code page's PTE reads zero, as QEMU reads unassigned space: not
    # present, so the first fetch is a #PF (error 0), in both MMUs
    assert x.reason.value == "exception" and x.vector == 14 and x.error_code == 0, x
    assert g.cpu.cr2 == CODE


@pytest.mark.parametrize("mmu", MODES)
def test_invlpg_anywhere_in_a_large_page_drops_all_of_it(mmu):
    # a 4 MiB page at 0x800000 -> 0; two of its 4 KiB pieces are used (and cached);
    # the PDE moves to 0x400000 and INVLPG names one piece: the other must move too
    g = guest(mmu, mem=8 << 20)
    prog = """
        mov eax, [0x801000]
        mov ebx, [0x802000]
        mov dword ptr [0x4008], 0x400083
        invlpg [0x801000]
        mov ecx, [0x802000]
        mov edx, [0x801000]
        mov esi, 0x501
        xchg edx, esi
        out dx, al
    """
    g.protected_mode(prog, paging=True)
    g.cpu.set_reg("cr4", g.cpu.cr4 | 0x10)          # CR4.PSE
    g.put(0x4008, struct.pack("<I", 0x000083))      # PDE 2: 4 MiB page at 0
    for pa, v in ((0x1000, 0x11), (0x2000, 0x22), (0x401000, 0x33), (0x402000, 0x44)):
        g.put(pa, struct.pack("<I", v))
    r = g.run(1000)
    assert r.reason is StopReason.EXIT
    assert [g.cpu.gpr(i) for i in (0, 3, 1, 6)] == [0x11, 0x22, 0x44, 0x33]


@pytest.mark.parametrize("mmu", MODES)
def test_cli_mmu_option(mmu, capsys):
    from tools import cli

    if not (BUILD / "t_paging.elf").is_file():
        pytest.skip("guests/build/t_paging.elf not built")
    assert cli.main(["run", str(BUILD / "t_paging.elf"), "--serial", "none", "--mmu", mmu]) == 0


@pytest.mark.parametrize("access", ["mov rax, [rbx]", "mov [rbx], rax", "jmp rbx"])
def test_non_canonical_address_in_long_mode_is_gp_not_pf(access):
    seen = []
    for mmu in MODES:
        g = guest(mmu)
        g.long_mode(f"mov rbx, 0x0000800000001000; {access}")
        x = g.cpu.run(100)
        seen.append((x.reason.value, x.vector, x.error_code, x.rip, x.icount))
    assert seen[0] == seen[1]
    assert seen[0][:3] == ("exception", 13, 0)
