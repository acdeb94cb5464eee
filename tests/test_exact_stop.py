"""The exact stop inside a translation block, both ways the engine makes it.

A turn of the SMP schedule, a timer deadline or `--max-instructions` often
ends k instructions into a block.  The engine asks TCG for a block of exactly
those k instructions (CPUState::cflags_next_tb, vmm/cpu/native/core.c); a
Unicorn build whose CPU state the core does not recognise falls back to
cutting the block at an exit (Engine._finish_budget).  Either way, a program
run in many pieces of random length must stop at exactly each count, agree
with the reference clock, and end with the registers of the run that never
stopped.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_icount import _item, make_guest, render


def test_this_unicorn_build_gets_the_k_instruction_block():
    g = make_guest("nop")
    assert g.cpu.engine._core.cflags_off != 0   # else every exact stop takes the slower fallback


@pytest.mark.parametrize("how", ["cut block", "exit"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(_item(), min_size=1, max_size=20), pieces=st.lists(st.integers(1, 40), min_size=1,
                                                                          max_size=30))
def test_a_run_in_pieces_stops_exactly_and_ends_as_the_straight_run(how, items, pieces):
    program = render(items)
    straight = make_guest(program)
    assert straight.run(200_000).reason.value == "exit"
    g = make_guest(program)
    if how == "exit":
        g.cpu.engine._core.cflags_off = 0
    g.cpu.enable_reference_clock()
    for n in pieces * 50:
        before = g.cpu.icount
        r = g.m.run(max_instructions=before + n)
        if r.reason.value == "exit":
            break
        assert r.reason.value == "limit", r
        assert g.cpu.icount == before + n == g.cpu.ref_icount
    else:
        r = g.m.run(max_instructions=200_000)
    assert r.reason.value == "exit"
    assert g.cpu.icount == straight.cpu.icount == g.cpu.ref_icount
    assert g.cpu.snapshot_regs() == straight.cpu.snapshot_regs()
