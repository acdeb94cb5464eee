"""The instruction clock: exact, whatever the program does.

Random programs (straight-line code, loops, memory traffic, port I/O, REP
strings, and faults and traps that handlers resume from) run on the real
vCPU with the C clock and, at the same time, the Python reference clock (a
code hook on every instruction, one taken back per fault).  They must agree
at every exit, and ``run(until_icount=N)`` must stop at exactly N.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tools.guestkit import Guest, asm

DATA = 0x50000

ALU = [
    "add eax, ebx", "sub ebx, 7", "xor edx, eax", "inc esi", "dec edi", "imul eax, ebx, 3",
    "shl ebx, 1", "or eax, 0x55", "lea esi, [esi+eax*2]", "nop", "mov edx, esi", "neg eax",
]
MEM = ["mov [0x50000], eax", "add [0x50004], ebx", "mov ebx, [0x50008]", "push eax", "pop ebx",
       "inc dword ptr [0x50010]"]
IO = ["out 0x80, al", "in al, 0x71", "out 0xe9, al"]
FAULTS = ["ud2", "int3", "int 0x40", "div ecx"]  # div: ecx is zero where this is emitted


def _item():
    return st.one_of(
        st.sampled_from(ALU),
        st.sampled_from(MEM),
        st.sampled_from(IO),
        st.sampled_from(FAULTS),
        st.tuples(st.integers(1, 6), st.lists(st.sampled_from(ALU + MEM + IO), min_size=1, max_size=6)),
        st.integers(0, 5).map(lambda n: f"REP {n}"),
    )


def render(items) -> str:
    out = []
    label = 0
    for it in items:
        if isinstance(it, tuple):
            n, body = it
            label += 1
            out.append(f"push ecx; mov ecx, {n}; L{label}: " + "; ".join(body) + f"; dec ecx; jnz L{label}; pop ecx")
        elif it.startswith("REP"):
            n = int(it.split()[1])
            out.append(f"push ecx; push edi; mov edi, {DATA + 0x100}; mov ecx, {n}; rep stosb; pop edi; pop ecx")
        elif it == "div ecx":
            out.append("push ecx; xor ecx, ecx; div ecx; pop ecx")
        else:
            out.append(it)
    return "; ".join(out)


def make_guest(program: str) -> Guest:
    g = Guest()
    g.protected_mode("mov eax, 1; mov ebx, 2; xor esi, esi; xor edi, edi; xor ecx, ecx; "
                     + program + "; mov dx, 0x501; mov al, 0; out dx, al; hlt")
    # faults resume after the faulting instruction; traps already point past it
    g.idt32(6, "add dword ptr [esp], 2; iretd")          # ud2 is 2 bytes
    g.idt32(0, "add dword ptr [esp], 2; iretd")          # div ecx is 2 bytes
    g.idt32(3, "iretd")
    g.idt32(0x40, "iretd")
    g.put(DATA, struct.pack("<IIII", 0, 0, 0, 0))
    return g


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_item(), min_size=1, max_size=25))
def test_icount_matches_reference(items):
    g = make_guest(render(items))
    g.cpu.enable_reference_clock()
    r = g.run(200_000)
    assert r.reason.value == "exit", r
    assert g.cpu.icount == g.cpu.ref_icount


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_item(), min_size=1, max_size=25), st.data())
def test_run_until_stops_exactly(items, data):
    program = render(items)
    g = make_guest(program)
    total = g.run(200_000).icount
    n = data.draw(st.integers(0, total))
    g2 = make_guest(program)
    g2.cpu.enable_reference_clock()
    r = g2.m.run(max_instructions=n)
    assert g2.cpu.icount == n == g2.cpu.ref_icount
    assert r.reason.value in ("limit", "exit")
    if r.reason.value == "exit":  # the limit fell on the exit instruction itself
        assert n == total
        return
    # continuing from the stop point reaches the same end as the straight run
    r2 = g2.m.run(max_instructions=200_000)
    assert r2.reason.value == "exit" and g2.cpu.icount == total == g2.cpu.ref_icount


def test_loop_count_is_exact():
    # 1 setup + 1000 * 3 + exit sequence (mov, mov, out) = known by construction
    g = Guest()
    g.protected_mode("mov ecx, 1000; L: add eax, 1; dec ecx; jnz L; mov dx, 0x501; mov al, 0; out dx, al; hlt")
    r = g.run()
    assert r.reason.value == "exit"
    assert g.cpu.icount == 1 + 1000 * 3 + 3


def test_faulting_instruction_does_not_retire_trap_does():
    g = Guest()
    g.protected_mode("ud2; int 0x40; mov dx, 0x501; mov al, 0; out dx, al")
    g.idt32(6, "add dword ptr [esp], 2; iretd")
    g.idt32(0x40, "iretd")
    r = g.run()
    assert r.reason.value == "exit"
    # ud2 faults (0), its handler: add, iretd (2); int 0x40 retires (1), handler iretd (1); exit 3
    assert g.cpu.icount == 0 + 2 + 1 + 1 + 3


def test_stop_at_every_count_of_a_block():
    # a long straight-line block; every stop point inside it is reachable exactly
    body = "; ".join(["add eax, 1"] * 30)
    for n in range(0, 32, 3):
        g = Guest()
        g.protected_mode(body + "; mov dx, 0x501; out dx, al")
        r = g.m.run(max_instructions=n)
        assert g.cpu.icount == n, (n, r)
        assert g.cpu.gpr(0) == min(n, 30)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_item(), min_size=1, max_size=8))
def test_single_stepping_counts_the_same(items):
    """Single-stepping (one instruction per run) reaches the straight run's end in exactly icount steps."""
    program = render(items)
    straight = make_guest(program)
    r = straight.run(50_000)
    assert r.reason.value == "exit"
    total = straight.cpu.icount
    stepped = make_guest(program)
    stepped.cpu.invalidate_code()
    steps = 0
    while True:
        before = stepped.cpu.icount
        res = stepped.m.run(max_instructions=before + 1)
        steps += 1
        assert stepped.cpu.icount == before + 1, (steps, res)
        if res.reason.value == "exit":
            break
        assert steps <= total
    assert steps == total
    assert stepped.cpu.snapshot_regs() == straight.cpu.snapshot_regs()


def test_a_closed_vcpu_releases_its_engine_once():
    import gc

    g = Guest()
    g.protected_mode("mov ecx, 100; L: dec ecx; jnz L; mov dx, 0x501; out dx, al")
    assert g.run().reason.value == "exit"
    g.cpu.close()
    g.cpu.close()  # idempotent
    del g
    gc.collect()  # the binding's finalizer must not close the engine a second time


# -- self-modifying code: a store into the block that is running ---------------------------
# QEMU (and so Unicorn) stops a translated block whose own code a store of it rewrites: the
# instructions before the store retired, the store is run again alone, and translation starts
# afresh after it.  The clock counts what retired, nothing twice.

SMC_LOOP = ("mov ecx, {n}; L: mov byte ptr [P+1], cl; add eax, ebx; P: mov bl, 0; dec ecx; jnz L; "
            "mov dx, 0x501; mov al, 0; out dx, al; hlt")


@pytest.mark.parametrize("mmu", ["shadow", "nested"])
@pytest.mark.parametrize("n", [1, 7, 300])
def test_a_store_into_the_running_block_is_counted_once(mmu, n):
    g = Guest(mmu=mmu)
    g.protected_mode(SMC_LOOP.format(n=n))
    g.cpu.enable_reference_clock()
    r = g.run(1_000_000)
    assert r.reason.value == "exit", r
    # 1 setup, n iterations of 5, the exit's mov, mov, out
    assert g.cpu.icount == g.cpu.ref_icount == 1 + 5 * n + 3


@pytest.mark.parametrize("stop", [1, 2, 3, 4, 5, 6, 11, 12, 13, 500, 1498])
def test_stops_inside_a_self_modifying_loop_are_exact(stop):
    g = Guest()
    g.protected_mode(SMC_LOOP.format(n=300))
    g.cpu.enable_reference_clock()
    g.m.run(max_instructions=stop)
    assert g.cpu.icount == stop == g.cpu.ref_icount
    r = g.m.run(max_instructions=1_000_000)
    assert r.reason.value == "exit" and g.cpu.icount == 1 + 5 * 300 + 3 == g.cpu.ref_icount


def _tsc_delta(target: str) -> int:
    g = Guest()
    g.protected_mode("rdtsc; mov esi, eax; mov ecx, 100; L: mov byte ptr [" + target + "], cl; add eax, ebx; "
                     "P: mov bl, 0; nop; dec ecx; jnz L; rdtsc; sub eax, esi; mov [0x50000], eax; "
                     "mov dx, 0x501; mov al, 0; out dx, al; hlt")
    assert g.run(1_000_000).reason.value == "exit"
    return g.u32(0x50000)


def test_rdtsc_in_a_self_modifying_loop_reads_the_instruction_clock():
    # the TSC follows the instruction clock: the loop that rewrites its own immediate takes as
    # many ticks as the same loop storing to data
    assert _tsc_delta("P+1") == _tsc_delta("0x50010") > 0


def _tsc_reads(answer_in_c: bool) -> tuple[bytes, int, int]:
    # RDTSC at a block's start and in the middle of one, and RDTSCP in the middle of
    # another (the core keeps one decoded offset per block), after an inner loop of
    # varying length
    g = Guest()
    g.protected_mode("mov edi, 0x50000; mov esi, 200; L: rdtsc; mov [edi], eax; mov [edi+4], edx; "
                     "mov ebx, esi; M: dec ebx; jnz M; add eax, esi; rdtsc; mov [edi+8], eax; jmp N; "
                     "N: nop; rdtscp; mov [edi+12], eax; mov [edi+16], ecx; add edi, 20; dec esi; jnz L; "
                     "mov dx, 0x501; mov al, 0; out dx, al; hlt")
    if not answer_in_c:
        g.cpu.tsc_offset = None
    g.cpu.tsc_aux = 7
    assert g.run(1_000_000).reason.value == "exit"
    core = g.m.engine._core
    return g.m.memory.read(0x50000, 200 * 20), g.cpu.icount, int(core.tsc_hits)


def test_rdtsc_answered_in_c_reads_what_the_python_reference_reads():
    fast, n_fast, hits = _tsc_reads(True)
    ref, n_ref, hits_ref = _tsc_reads(False)
    assert fast == ref and n_fast == n_ref
    assert hits_ref == 0 and hits == 3 * 200 - 3   # each of the three in Python once, the first time
    assert struct.unpack_from("<5I", fast, 20)[4] == 7   # RDTSCP's ECX: TSC_AUX


def _tsc_aux_reads(answer_in_c: bool) -> tuple[bytes, dict]:
    # the guest writes IA32_TSC_AUX (Linux writes its CPU and node number there for getcpu)
    # and reads it back with RDTSCP, at a block's start and in the middle of one, and RDMSR
    g = Guest()
    g.protected_mode("mov edi, 0x50000; mov esi, 50; L: mov ecx, 0xC0000103; imul eax, esi, 0x10001; "
                     "xor edx, edx; wrmsr; jmp N; N: rdtscp; mov [edi], ecx; nop; rdtscp; mov [edi+4], ecx; "
                     "mov ecx, 0xC0000103; rdmsr; mov [edi+8], eax; add edi, 12; dec esi; jnz L; "
                     "mov dx, 0x501; mov al, 0; out dx, al; hlt")
    if not answer_in_c:
        g.cpu.tsc_offset = None
    assert g.run(1_000_000).reason.value == "exit"
    return g.m.memory.read(0x50000, 50 * 12), g.cpu.save_state()


@pytest.mark.parametrize("answer_in_c", [True, False])
def test_rdtscp_returns_what_the_guest_wrote_to_tsc_aux(answer_in_c):
    # as QEMU, whose WRMSR sets the env->tsc_aux that its RDTSCP reads
    data, state = _tsc_aux_reads(answer_in_c)
    for i in range(50):
        want = (50 - i) * 0x10001
        assert struct.unpack_from("<3I", data, 12 * i) == (want, want, want)
    assert state["tsc_aux"] == 0x10001


def test_tsc_aux_is_saved_and_restored():
    _, state = _tsc_aux_reads(True)
    g = Guest()
    g.cpu.load_state(state)
    assert g.cpu.tsc_aux == 0x10001
    assert g.cpu.msr(0xC000_0103) == 0x10001


# A one-instruction block that stores into its own bytes: a CALL whose push writes the
# byte after its rel32 (and beyond) with what is there already.  QEMU runs it again as a
# one-instruction block of the same address, size and mode as the cut one, so it finds
# the cut block's cached count: the clock must still see the restart (the count of
# invalidated blocks moved) and count the CALL once.
L1 = 0x110FB            # the CALL's return address is 0x11100: its low byte is the rel32's top byte
T1 = 0x11200


@pytest.mark.parametrize("mmu", ["shadow", "nested"])
@pytest.mark.parametrize("n", [1, 2, 50])
def test_a_one_instruction_block_that_stores_into_itself_is_counted_once(mmu, n):
    g = Guest(mmu=mmu)
    g.put(L1, asm(f"call {T1:#x}", 32, L1))
    top = 0x10000 + len(asm(f"mov ecx, {n}", 32, 0x10000))
    g.put(T1, asm(f"dec ecx; jnz {top:#x}; mov dx, 0x501; mov al, 0; out dx, al; hlt", 32, T1))
    g.protected_mode(f"mov ecx, {n}; mov esp, {L1 + 8:#x}; jmp {L1:#x}")
    g.cpu.enable_reference_clock()
    r = g.run(1_000_000)
    assert r.reason.value == "exit", r
    # 1 setup, n iterations of mov esp, jmp, call, dec, jnz, the exit's mov, mov, out
    assert g.cpu.icount == g.cpu.ref_icount == 1 + 5 * n + 3
