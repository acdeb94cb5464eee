"""Fuzz the CPU with random programs (issue 16): random 32-bit protected-mode
code under paging -- ALU instructions, loads and stores to not-present,
read-only and writable pages, calls into executable and not-present pages,
port output, loops, and stores into the immediates of their own block
(self-modifying code) -- with a #PF handler that counts the faults and goes
on (tests/test_mmu_modes.py builds the guest).

Each program runs under both MMU modes with the per-instruction reference
clock on: it must end at its exit, the C clock must equal the reference clock,
and both modes must agree on the icount, the number of page faults and the
final registers, within the time bound."""
from __future__ import annotations

from hypothesis import given

from tests.fuzz.harness import bounded, fuzz_settings, tally


def _modes():
    from tests import test_mmu_modes as t

    return t


def _program():
    return _modes()._program()


def check_program(program: str) -> str:
    from vmm.machine import StopReason

    t = _modes()
    ends = {}
    with bounded():
        for mmu in t.MODES:
            g = t.paging_guest(mmu, program)
            g.cpu.enable_reference_clock()
            try:
                r = g.run(100_000)
                assert r.reason is StopReason.EXIT, (mmu, r)
                assert g.cpu.icount == g.cpu.ref_icount, (mmu, g.cpu.icount, g.cpu.ref_icount)
                ends[mmu] = (g.cpu.icount, g.u32(t.FAULT_COUNT), g.cpu.snapshot_regs())
            finally:
                g.m.close()
    assert ends["shadow"] == ends["nested"], "the MMU modes disagree"
    return "faulted" if ends["shadow"][1] else "no fault"


@fuzz_settings(30)
@given(program=_program())
def test_random_programs_in_both_mmu_modes_against_the_reference_clock(program):
    tally("random_programs", check_program(program))
