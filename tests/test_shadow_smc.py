"""Self-modifying code that rewrites two blocks with two stores in a row, under both MMU modes.

QEMU checks only the first store through a new write entry of the shadow MMU for
translated code it overwrites (vmm/cpu/native/mmu.c, wx_drop_code); the second
store's block used to run stale.  GRUB's BIOS-call trampoline does exactly this
(it patches the ES, DS, FLAGS and EAX immediates of its real-mode code before each
call), and a CD boot read its sectors with the first call's DS (tests/test_iso_boot.py).
"""
from __future__ import annotations

import pytest

from tools.guestkit import Guest

# each pass patches U's immediate, then T's, then runs T and U: BX gains 2 * CX
TWO_STORES = ("xor bx, bx; mov cx, {n}; L: mov word ptr [U+1], cx; mov word ptr [T+1], cx; jmp T; "
              "T: mov ax, 0x1234; jmp U; U: mov si, 0x1234; add bx, ax; add bx, si; "
              "loop L; mov ax, bx; mov dx, 0x501; out dx, al; hlt")


@pytest.mark.parametrize("mmu", ["shadow", "nested"])
@pytest.mark.parametrize("n", [2, 5, 9])
def test_a_block_patched_by_the_second_store_runs_the_new_code(mmu, n):
    g = Guest(mmu=mmu)
    g.real_mode(TWO_STORES.format(n=n))
    g.cpu.enable_reference_clock()
    r = g.run(100_000)
    assert r.reason.value == "exit", r
    assert g.exit_status == (n * (n + 1)) & 0xFF           # 2 * (n + ... + 1), the low byte (OUT of AL)
    assert g.cpu.icount == g.cpu.ref_icount == 2 + 9 * n + 3      # setup, 9 a pass, the exit
