"""The EPT (vmm/memory/ept.py): map, unmap, protect, translate; EPT violations exit
to the VMM with the GPA and the kind of access, and a handler that fixes the
mapping lets the guest retry; on top of that lazy allocation, copy-on-write
and page sharing are a few lines each; dirty logging collects exactly the
pages written.  The guest-facing parts run under both MMUs (dirty logging
only under the shadow MMU, which refuses nothing else)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.legacy.debugports import DebugExit
from tools.guestkit import Guest
from vmm.memory.ept import LOG, MMIO, POOL_FIRST, RWX, VALID, Ept, EptError, EptViolation, Violation, W
from vmm.machine import Machine, StopReason
from vmm.memory.ram import GuestMemory

MODES = ("shadow", "nested")
PAGE = 4096
DATA = 0x100000          # the guest's data pages start here (identity RAM, paging off)


def guest(mmu: str, code: str, mem: int = 4 << 20) -> Guest:
    g = Guest.__new__(Guest)
    g.m = Machine(mem, mmu=mmu)
    g.exit_status = None
    g.m.add_device(DebugExit(g._exit))
    g.cpu = g.m.vcpu
    g.gdt = {}
    g.protected_mode(code + "; mov dx, 0x501; mov al, 0; out dx, al; hlt")
    return g


# -- the table itself -------------------------------------------------------------------------
def test_saved_table_restores_into_a_fresh_or_a_changed_table():
    # a fresh table (never changed) takes a saved state as it is; a changed one goes back
    mem = GuestMemory(1 << 20)
    changed = Ept(mem)
    changed.unmap(0x3000)
    changed.protect(0x5000, "r")
    changed.set_mmio(0x200000, True)
    changed.start_dirty_log()
    changed.write(0x9000, b"x")
    saved, boot = changed.save_state(), Ept(mem).save_state()
    fresh = Ept(mem)
    fresh.load_state(saved)
    assert (fresh.perms(0x3000), fresh.perms(0x5000), fresh.perms(0x6000)) == ("", "r", "rwx")
    assert np.flatnonzero(fresh.dirty).tolist() == [9]
    fresh.load_state(boot)
    assert np.array_equal(fresh.entries, fresh.boot_entries()) and not fresh.dirty.any()
    changed.load_state(boot)         # the MMIO claim stays (its device puts it back), the rest is undone
    assert (changed.perms(0x3000), changed.perms(0x5000), changed.perms(0x9000)) == ("rwx", "rwx", "rwx")
    assert changed.entry(0x200000) & MMIO and not changed.dirty.any()
    untouched = Ept(mem)
    untouched.load_state(boot)
    assert np.array_equal(untouched.entries, untouched.boot_entries()) and not untouched.touched


def test_map_unmap_protect_translate():
    mem = GuestMemory(1 << 20)
    ept = Ept(mem)
    assert ept.translate(0x5123, "w") == 0x5123          # RAM starts identity mapped, all rights
    assert ept.perms(0x5000) == "rwx"
    ept.protect(0x5000, "rx")
    assert ept.perms(0x5000) == "rx"
    assert ept.translate(0x5010, "x") == 0x5010
    with pytest.raises(EptViolation) as ev:
        ept.translate(0x5010, "w")
    assert ev.value.violation == Violation(0x5010, "w")
    ept.map(0x5000, 0x9, "r")                             # GPA page 5 -> RAM frame 9
    assert ept.translate(0x5004, "r") == 0x9004
    ept.unmap(0x5000)                                     # trapping: a violation, not a hole
    with pytest.raises(EptViolation) as ev:
        ept.translate(0x5000, "r")
    assert not ev.value.violation.hole
    ept.unmap(0x6000, trap=False)
    with pytest.raises(EptViolation) as ev:
        ept.translate(0x6000, "r")
    assert ev.value.violation.hole
    with pytest.raises(EptViolation):                     # beyond RAM: a hole
        ept.translate(0x20_0000, "r")
    with pytest.raises(EptError):
        ept.map(0x5001, 0)                                # not aligned
    with pytest.raises(EptError):
        ept.map(0x5000, 1 << 20)                          # no such frame
    with pytest.raises(EptError):
        ept.protect(0x5000, "rq")
    ept.add_pool(4)
    f = ept.alloc_frame()
    assert f == POOL_FIRST
    ept.map(0x7000, f, "rw")
    ept.write(0x7008, b"pool")
    assert ept.read(0x7008, 4) == b"pool" and bytes(ept.frame(f)[8:12]) == b"pool"
    assert mem.read(0x7008, 4) == b"\0" * 4               # not the RAM frame of that number
    assert ept.read(0x30_0000, 4) == b"\0" * 4            # a hole reads as zeros (unassigned space)


def test_the_entries_are_what_the_c_fill_reads():
    ept = Ept(GuestMemory(1 << 20))
    ept.map(0x3000, 7, "rx")
    assert int(ept.entries[3]) == (7 << 12) | VALID | 5
    ept.start_dirty_log()
    assert int(ept.entries[4]) == (4 << 12) | VALID | (RWX & ~W) | LOG   # W withheld, not lost
    assert ept.perms(0x4000) == "rwx"
    ept.stop_dirty_log()
    assert int(ept.entries[4]) == (4 << 12) | VALID | RWX


# -- violations exit to the VMM ----------------------------------------------------------------
@pytest.mark.parametrize("mmu", MODES)
def test_write_to_a_read_only_page_exits_with_gpa_and_kind(mmu):
    g = guest(mmu, f"mov eax, 7; mov dword ptr [{DATA + 0x20:#x}], eax")
    g.m.ept.protect(DATA, "r")
    seen = []
    g.m.ept.handlers.append(lambda v: seen.append(v) or False)
    g.cpu.enable_reference_clock()
    r = g.run(1000)
    assert r.reason is StopReason.ERROR and f"{DATA + 0x20:#x}" in r.message
    assert seen == [Violation(DATA + 0x20, "w")]
    assert g.cpu.icount == g.cpu.ref_icount == 1          # the store did not retire
    assert g.u32(DATA + 0x20) == 0


@pytest.mark.parametrize("mmu", MODES)
def test_fetch_from_a_page_without_x_exits_then_retries(mmu):
    g = guest(mmu, "call 0x120000")
    g.put(0x120000, bytes([0x90, 0x90, 0xC3]))
    ept = g.m.ept
    ept.protect(0x120000, "rw")
    seen = []

    def allow(v):
        seen.append(v)
        ept.protect(v.page, "rwx")
        return True

    ept.handlers.append(allow)
    g.cpu.enable_reference_clock()
    r = g.run(1000)
    assert r.reason is StopReason.EXIT
    assert seen == [Violation(0x120000, "x")]
    assert g.cpu.icount == g.cpu.ref_icount == 1 + 3 + 3


@pytest.mark.parametrize("mmu", MODES)
def test_lazy_allocation(mmu):
    # the guest's pages at DATA.. have no frame until first touched
    n = 6
    code = "; ".join(f"mov dword ptr [{DATA + i * PAGE + 4 * i:#x}], {0x100 + i}" for i in range(n))
    g = guest(mmu, code + f"; mov esi, dword ptr [{DATA + PAGE:#x} + 4]")
    ept = g.m.ept
    ept.add_pool(16)
    ept.unmap(DATA, npages=n)
    touched = []

    def allocate(v: Violation) -> bool:
        if not DATA <= v.gpa < DATA + n * PAGE:
            return False
        touched.append(v.page)
        ept.map(v.page, ept.alloc_frame(), "rw")
        return True

    ept.handlers.append(allocate)
    r = g.run(10_000)
    assert r.reason is StopReason.EXIT
    assert touched == [DATA + i * PAGE for i in range(n)]
    for i in range(n):
        assert ept.read(DATA + i * PAGE + 4 * i, 4) == (0x100 + i).to_bytes(4, "little")
        assert g.u32(DATA + i * PAGE + 4 * i) == 0        # the RAM frames were never used
    assert g.cpu.gpr(6) == 0x101


@pytest.mark.parametrize("mmu", MODES)
def test_copy_on_write_and_sharing(mmu):
    # two GPA pages share one frame read-only; the first write gets a private copy
    g = guest(mmu, f"mov esi, dword ptr [{DATA + 0x10:#x}]; mov ebx, dword ptr [{DATA + PAGE + 0x10:#x}]; "
                   f"mov dword ptr [{DATA + PAGE + 0x10:#x}], 0x55; "
                   f"mov edi, dword ptr [{DATA + 0x10:#x}]; mov ebp, dword ptr [{DATA + PAGE + 0x10:#x}]")
    ept = g.m.ept
    ept.add_pool(4)
    shared = ept.alloc_frame()
    ept.frame(shared)[0x10:0x14] = np.frombuffer((0x1234).to_bytes(4, "little"), dtype=np.uint8)
    ept.map(DATA, shared, "r")
    ept.map(DATA + PAGE, shared, "r")
    copies = []

    def cow(v: Violation) -> bool:
        if v.access != "w" or ept.perms(v.page) != "r":
            return False
        frame = ept.alloc_frame()
        ept.frame(frame)[:] = ept.frame(ept.entry(v.page) >> 12)
        ept.map(v.page, frame, "rw")
        copies.append(v.page)
        return True

    ept.handlers.append(cow)
    r = g.run(1000)
    assert r.reason is StopReason.EXIT
    regs = [g.cpu.gpr(i) for i in (6, 3, 7, 5)]       # esi ebx edi ebp
    assert regs == [0x1234, 0x1234, 0x1234, 0x55]
    assert copies == [DATA + PAGE]
    assert ept.read(DATA + 0x10, 4) == (0x1234).to_bytes(4, "little")


@pytest.mark.parametrize("mmu", MODES)
def test_a_handler_that_fixes_nothing_ends_the_run(mmu):
    g = guest(mmu, f"mov dword ptr [{DATA:#x}], 1")
    g.m.ept.protect(DATA, "r")
    g.m.ept.handlers.append(lambda v: True)               # claims to, but does not
    r = g.run(1000)
    assert r.reason is StopReason.ERROR and "did not fix" in r.message


# -- dirty logging -------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.integers(0, 63), max_size=12), min_size=1, max_size=3),
       st.lists(st.integers(64, 80), max_size=3))
def test_dirty_log_collects_exactly_the_written_pages(rounds, vmm_writes):
    g = guest("shadow", "")
    ept = g.m.ept
    ept.start_dirty_log()
    for pages in rounds:
        code = "; ".join(f"mov dword ptr [{DATA + p * PAGE + (p % 7) * 8:#x}], {p}" for p in pages) or "nop"
        g.cpu.reset(0, 0)
        g.protected_mode(code + "; mov dx, 0x501; mov al, 0; out dx, al; hlt")
        ept.collect_dirty()   # the VMM's own set-up writes (code, GDT...) are not the guest's
        for p in vmm_writes:
            ept.write(DATA + p * PAGE, b"v")
        r = g.run(10_000)
        assert r.reason is StopReason.EXIT
        expect = sorted({DATA + p * PAGE for p in pages} | {DATA + p * PAGE for p in vmm_writes})
        assert ept.collect_dirty() == expect
        for p in pages:
            assert g.u32(DATA + p * PAGE + (p % 7) * 8) == p
    assert ept.collect_dirty() == []
    ept.stop_dirty_log()


def test_dirty_log_sees_page_table_a_d_updates_and_re_arms():
    g = guest("shadow", "")
    g.protected_mode(f"mov dword ptr [{0x300000 + 8:#x}], 1; mov dx, 0x501; mov al, 0; out dx, al; hlt",
                     paging=True)
    ept = g.m.ept
    ept.start_dirty_log()
    r = g.run(1000)
    assert r.reason is StopReason.EXIT
    dirty = ept.collect_dirty()
    # the page written, and the page table whose PTE got A/D set on the way
    assert 0x300000 in dirty and 0x5000 in dirty
    assert ept.collect_dirty() == []                      # re-armed: nothing new since
    assert ept.perms(0x300000) == "rwx" and int(ept.entries[0x300]) & LOG


def test_dirty_log_needs_the_shadow_mmu():
    m = Machine(1 << 20, mmu="nested")
    with pytest.raises(EptError):
        m.ept.start_dirty_log()
