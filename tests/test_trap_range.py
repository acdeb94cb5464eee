"""The firmware trap range: a block that starts in it stops before it runs.

The block hook's common case sees the range only through a mark its block-count
cache entries carry from when they were filled, so setting, lifting and moving
the range while the blocks in it are cached must move the marks too (the HLE
BIOS lifts its range for one tick and puts it back).  A subroutine at S is
called in a loop until its block is cached, then the range changes under it.
"""
from __future__ import annotations

import pytest

from tools.guestkit import Guest, asm

S = 0x11000
MAIN = "mov ecx, 1000; L: mov ebx, 0x11000; call ebx; dec ecx; jnz L; mov dx, 0x501; mov al, 0; out dx, al; hlt"
PER_CALL = 6  # mov ebx, call, add, ret, dec, jnz


def _guest(mmu: str) -> Guest:
    g = Guest(mmu=mmu)
    g.put(S, asm("add esi, 1; ret", 32, S))
    g.protected_mode(MAIN)
    g.cpu.enable_reference_clock()
    g.cpu.invalidate_code()
    return g


def _stops_at_s(g: Guest) -> None:
    r = g.m.run(max_instructions=1_000_000)
    assert r.reason.value == "error" and f"trap range at {S:#x}" in r.message, r
    calls = g.cpu.reg("rsi")
    assert g.cpu.rip == S
    # the setup, every finished call, then mov ebx and the call that reached S
    assert g.cpu.icount == g.cpu.ref_icount == 1 + PER_CALL * calls + 2


@pytest.mark.parametrize("mmu", ["shadow", "nested"])
@pytest.mark.parametrize("length", [1, 0x100, 0x20000])
def test_the_range_follows_changes_while_its_blocks_are_cached(mmu, length):
    g = _guest(mmu)
    g.m.run(max_instructions=500)            # S's block is cached, unmarked
    g.cpu.set_trap_range(S, length)
    _stops_at_s(g)
    g.cpu.set_trap_range(0, 0)               # lifted: S runs
    g.m.run(max_instructions=g.cpu.icount + 300)
    assert g.cpu.icount == g.cpu.ref_icount
    g.cpu.set_trap_range(S + 1, length)      # moved past S's start: S still runs
    g.m.run(max_instructions=g.cpu.icount + 300)
    assert g.cpu.icount == g.cpu.ref_icount
    g.cpu.set_trap_range(S - min(length - 1, 0x800), length)   # moved back over S (not over MAIN)
    _stops_at_s(g)
    g.cpu.set_trap_range(0, 0)
    r = g.m.run(max_instructions=1_000_000)
    assert r.reason.value == "exit" and g.cpu.reg("rsi") == 1000, r
    assert g.cpu.icount == g.cpu.ref_icount == 1 + PER_CALL * 1000 + 3
