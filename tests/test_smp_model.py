"""Acceptance tests of the N-vCPU machine model (issue 9).

Two vCPUs of one flat guest, started by the test-harness convention (the AP
starts at its entry in the BSP's boot state), take turns in quanta of
retired instructions.  What is checked here:

* the schedule is deterministic: racing unlocked read-modify-write
  increments lose updates (so the interleaving matters), locked ones never
  do, the same quantum gives the same machine at the end on every run and
  however the run is sliced by instruction limits, and a recording replays
  it with every digest matching;
* the schedule is a function of the quantum: different quanta give
  different interleavings (different unlocked totals);
* code one vCPU writes is what another then executes (one shared
  translation cache, invalidated by the store), on both MMUs;
* virtual time is machine-wide: RDTSC on one vCPU counts the instructions
  every vCPU retired;
* each vCPU halts on its own; the machine stops only when every vCPU is
  halted with IF=0, and says so.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay.logfile import LogReader
from replay.session import Replayer, record
from tests.machine_helpers import (
    AP_CODE,
    DONE1,
    EXIT0,
    LOAD,
    SHARED,
    caller_ap,
    counters,
    fingerprint,
    flat_machine,
    race_image,
    two_cpu_image,
)
from tools.guestkit import asm
from vmm.machine import HALTED, StopReason

N = 20_000                      # iterations per vCPU of the race
LIMIT = 50_000_000


def run_race(quantum: int, n0: int = N, n1: int = N, mmu: str = "shadow"):
    m = flat_machine(race_image(n0, n1), quantum=quantum, mmu=mmu)
    res = m.run(LIMIT)
    assert res.reason is StopReason.EXIT and res.status == 0, res
    return m, res


# ---- the race -----------------------------------------------------------------------------

@pytest.mark.parametrize("quantum", [333, 1000, 2048])
def test_locked_increments_are_exact_and_unlocked_ones_lose_updates(quantum):
    m, _ = run_race(quantum)
    unlocked, locked = counters(m)
    assert locked == 2 * N
    assert unlocked < 2 * N, "no update was lost: the vCPUs did not interleave inside the read-modify-write"
    assert unlocked >= N
    assert m.engine.switches >= 2 * N * 6 // quantum - 2   # they took turns all along
    assert m.vcpus[0].icount > 6 * N and m.vcpus[1].icount > 6 * N


@pytest.mark.parametrize("quantum", [50, 1000])
def test_the_same_quantum_gives_the_same_machine_on_every_run(quantum):
    first, r1 = run_race(quantum)
    second, r2 = run_race(quantum)
    assert (r1.reason, r1.status, r1.icount) == (r2.reason, r2.status, r2.icount)
    assert fingerprint(first) == fingerprint(second)
    assert counters(first) == counters(second)


def test_different_quanta_give_different_interleavings():
    quanta = [97, 333, 1000, 1543, 3001]
    results = {q: counters(run_race(q)[0])[0] for q in quanta}
    assert len(set(results.values())) >= 3, results


def test_two_machines_side_by_side_in_one_process_do_not_disturb_each_other():
    ref = fingerprint(run_race(777)[0])
    a = flat_machine(race_image(N, N), quantum=777)
    b = flat_machine(race_image(N, N), quantum=777)
    ra = rb = None
    while ra is None or rb is None:   # interleave the two machines' runs in slices
        if ra is None:
            r = a.run(a.icount + 7_001)
            ra = r if r.reason is not StopReason.LIMIT else None
        if rb is None:
            r = b.run(b.icount + 12_345)
            rb = r if r.reason is not StopReason.LIMIT else None
    assert fingerprint(a) == fingerprint(b) == ref


def record_and_replay(tmp_path, image: bytes, quantum: int, mmu: str = "shadow", name: str = "smp.bin"):
    img = tmp_path / name
    img.write_bytes(image)
    log = str(tmp_path / f"{name}.vmlog")
    res, m = record(str(img), image, log, boot_kind="flat", vcpus=2, quantum=quantum, mmu=mmu,
                    entries=[(1, AP_CODE)], max_instructions=LIMIT)
    rp = Replayer(log)
    r2 = rp.run()
    assert (r2.reason, r2.status, r2.icount) == (res.reason, res.status, res.icount)
    assert rp.events_used == sum(1 for _ in LogReader(log))   # every event was consumed, the END included
    return res, m, rp


def test_a_recorded_race_replays_exactly(tmp_path):
    res, m, rp = record_and_replay(tmp_path, race_image(N, N), quantum=1000)
    assert res.reason is StopReason.EXIT
    assert fingerprint(rp.m) == fingerprint(m)
    assert counters(rp.m) == counters(m)
    assert rp.m.engine.switches == m.engine.switches


def test_replay_catches_a_recording_made_with_another_quantum(tmp_path):
    """The quantum is part of the recorded machine: a replay forced to another one diverges."""
    from replay.logfile import LogWriter
    from replay.session import Divergence

    _, _, _ = record_and_replay(tmp_path, race_image(N, N), quantum=1000)
    log = str(tmp_path / "smp.bin.vmlog")
    reader = LogReader(log)
    cfg = dict(reader.header.config, quantum=1001)
    bad = str(tmp_path / "other-quantum.vmlog")
    w = LogWriter(bad, cfg, reader.header.initial_digest)
    for e in reader:
        w.append(e)
    w.close()
    with pytest.raises(Divergence):
        Replayer(bad).run()


# ---- hypothesis: every recording replays -----------------------------------------------------

@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(quantum=st.integers(5, 5000), n0=st.integers(1, 4000), n1=st.integers(1, 4000),
       mmu=st.sampled_from(["shadow", "nested"]))
def test_every_recording_replays_exactly(tmp_path, quantum, n0, n1, mmu):
    res, m, rp = record_and_replay(tmp_path, race_image(n0, n1), quantum=quantum, mmu=mmu)
    assert res.reason is StopReason.EXIT
    assert counters(m)[1] == n0 + n1
    assert fingerprint(rp.m) == fingerprint(m)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(quantum=st.integers(10, 3000), slices=st.lists(st.integers(1, 20_000), min_size=1, max_size=30))
def test_instruction_limits_do_not_change_the_schedule(quantum, slices):
    """Stopping and resuming the machine (gdb, checkpoints, --max-instructions) leaves the
    interleaving alone: which vCPU runs next is machine state, not run-call state."""
    n = 3000
    ref, _ = run_race(quantum, n, n)
    m = flat_machine(race_image(n, n), quantum=quantum)
    for s in slices:
        r = m.run(m.icount + s)
        if r.reason is not StopReason.LIMIT:
            break
    else:
        r = m.run(LIMIT)
    assert r.reason is StopReason.EXIT
    assert fingerprint(m) == fingerprint(ref)


# ---- cross-modifying code -----------------------------------------------------------------------

FN = LOAD + 0x2000           # the function vCPU 1 calls and vCPU 0 rewrites
RAN_OLD = SHARED + 0x20      # how many times vCPU 1 saw the old function's result
REWRITTEN = SHARED + 0x12    # vCPU 0's hand-over flag
AFTER = SHARED + 0x24        # the function's result after the hand-over
OLD_FN = "mov eax, 0x1111\nret\n"
NEW_FN = "mov eax, 0x2222\nret\n"


def xmc_image() -> bytes:
    new = asm(NEW_FN, 32, FN)
    assert len(new) == 6 and len(asm(OLD_FN, 32, FN)) == 6
    lo, hi = int.from_bytes(new[:4], "little"), int.from_bytes(new[4:], "little")
    bsp = f"""
        mov esp, 0x90000
    w0: cmp dword ptr [{RAN_OLD:#x}], 50
        jb w0
        mov dword ptr [{FN:#x}], {lo:#x}
        mov word ptr [{FN + 4:#x}], {hi:#x}
        mov byte ptr [{REWRITTEN:#x}], 1
    w1: cmp byte ptr [{DONE1:#x}], 1
        jne w1
    """ + EXIT0
    ap = caller_ap(FN, 0x1111, RAN_OLD, REWRITTEN, AFTER, DONE1)
    image = bytearray(two_cpu_image(bsp, ap).ljust(FN - LOAD, b"\x90"))
    image += asm(OLD_FN, 32, FN)
    return bytes(image)


@pytest.mark.parametrize("mmu", ["shadow", "nested"])
@pytest.mark.parametrize("quantum", [100, 5000])
def test_code_rewritten_by_one_vcpu_is_what_the_other_runs(mmu, quantum):
    m = flat_machine(xmc_image(), quantum=quantum, mmu=mmu)
    res = m.run(LIMIT)
    assert res.reason is StopReason.EXIT, res
    assert m.memory.read_u32(RAN_OLD) >= 50          # vCPU 1 ran (and so translated) the old code
    assert m.memory.read_u32(AFTER) == 0x2222        # and then the new code, not a stale translation
    assert m.memory.read(FN, 6) == asm(NEW_FN, 32, FN)


def test_cross_modifying_code_replays(tmp_path):
    res, m, rp = record_and_replay(tmp_path, xmc_image(), quantum=100, name="xmc.bin")
    assert res.reason is StopReason.EXIT
    assert rp.m.memory.read_u32(AFTER) == 0x2222
    assert fingerprint(rp.m) == fingerprint(m)


# ---- machine-wide virtual time ------------------------------------------------------------------

T0, T1, FLAG = SHARED + 0x40, SHARED + 0x48, SHARED + 0x50
K = 20_000


def tsc_image() -> bytes:
    bsp = f"""
        mov ecx, {K}
    l0: dec ecx
        jnz l0
        rdtsc
        mov [{T0:#x}], eax
        mov [{T0 + 4:#x}], edx
        mov byte ptr [{FLAG:#x}], 1
        cli
    h0: hlt
        jmp h0
    """
    ap = f"""
    w1: cmp byte ptr [{FLAG:#x}], 1
        jne w1
        rdtsc
        mov [{T1:#x}], eax
        mov [{T1 + 4:#x}], edx
    """ + EXIT0
    return two_cpu_image(bsp, ap)


@pytest.mark.parametrize("quantum", [1000, 4321])
def test_rdtsc_counts_the_instructions_of_every_vcpu(quantum):
    m = flat_machine(tsc_image(), quantum=quantum)
    res = m.run(LIMIT)
    assert res.reason is StopReason.EXIT, res
    t0, t1 = m.memory.read_u64(T0), m.memory.read_u64(T1)
    bsp, ap = m.vcpus
    bsp_before_rdtsc = 1 + 2 * K             # mov ecx, then the loop
    bsp_at_flag = bsp_before_rdtsc + 4       # rdtsc, two stores, the flag store
    ap_before_rdtsc = ap.icount - 6          # rdtsc, two stores, mov dx, mov al, out
    # vCPU 0's TSC includes the instructions vCPU 1 spun meanwhile (a per-vCPU
    # count would read exactly bsp_before_rdtsc)
    assert t0 >= bsp_before_rdtsc + quantum
    assert t0 - bsp_before_rdtsc <= ap_before_rdtsc
    # vCPU 1's TSC, read after it saw vCPU 0's flag, includes vCPU 0's K-loop
    assert bsp_at_flag <= t1 - ap_before_rdtsc <= bsp.icount
    assert t1 > t0                           # monotonic across vCPUs
    assert m.clock.now() == bsp.icount + ap.icount == m.icount


# ---- halting ---------------------------------------------------------------------------------

RESULT = SHARED + 0x60


def halting_image(first_halts: int, work: int) -> bytes:
    """vCPU ``first_halts`` halts at once with IF=0; the other counts to ``work``,
    stores it, and halts with IF=0 too."""
    halt = "cli\nhx: hlt\njmp hx\n"
    worker = f"""
        xor eax, eax
        mov ecx, {work}
    lw: inc eax
        dec ecx
        jnz lw
        mov [{RESULT:#x}], eax
        cli
    hw: hlt
        jmp hw
    """
    return two_cpu_image(halt, worker) if first_halts == 0 else two_cpu_image(worker, halt)


@pytest.mark.parametrize("first_halts", [0, 1])
def test_one_vcpu_halts_while_the_other_runs_on(first_halts):
    work = 30_000
    m = flat_machine(halting_image(first_halts, work), quantum=500)
    res = m.run(LIMIT)
    assert res.reason is StopReason.HALTED, res
    assert "IF=0" in res.message
    assert m.memory.read_u32(RESULT) == work       # the other vCPU finished its work first
    assert m.state == [HALTED, HALTED]
    worker = m.vcpus[1 - first_halts]
    assert worker.icount >= 3 * work
    assert m.vcpus[first_halts].icount <= 3     # cli, hlt (and nothing after)


def test_a_halted_machine_replays_to_its_halt(tmp_path):
    res, m, rp = record_and_replay(tmp_path, halting_image(0, 30_000), quantum=500, name="halt.bin")
    assert res.reason is StopReason.HALTED
    assert fingerprint(rp.m) == fingerprint(m)


def test_the_machine_does_not_stop_while_a_vcpu_can_run():
    """A limit reached while one vCPU is halted and the other works is a LIMIT, not a halt."""
    m = flat_machine(halting_image(0, 30_000), quantum=500)
    r = m.run(10_000)
    assert r.reason is StopReason.LIMIT and m.icount == 10_000
    assert m.state[0] == HALTED and m.state[1] != HALTED
    assert m.run(LIMIT).reason is StopReason.HALTED

