"""Acceptance tests of DMA (issue 9): a test device that copies guest memory
through the machine's ``DmaView`` when the guest writes a port.

* A descriptor-described copy lands in guest memory, and the guest then runs
  code the device wrote over code that already ran (translated code is
  invalidated: on both MMUs, in every vCPU, and inside the very block that
  made the request).
* A transfer that runs past the end of RAM, one aimed at a hole, one aimed
  at an MMIO page and one that touches a page the EPT keeps read-only each
  raise ``DmaError`` before any byte moves; the device reports an error
  status that the guest reads.
* DMA writes mark their pages dirty in the EPT's dirty log; refused ones do not.
"""
from __future__ import annotations

import struct

import pytest

from devices.base import DmaError
from tests.machine_helpers import (
    EXIT0,
    LOAD,
    SHARED,
    MmuGuest,
    StatelessDevice,
    caller_ap,
    flat_machine,
    two_cpu_image,
)
from tools.guestkit import CODE, asm
from vmm.machine import StopReason

PORT = 0x530                 # out: GPA of a descriptor -> run it; in PORT+4: status
OK, ERROR = 0x1, 0x80
MEM = 4 << 20
SCR = 0x60000                # results the guest stores
DESC = 0x61000               # descriptors, 16 bytes each: u64 source, u32 destination... see below
SRC = 0x62000                # source buffers
DST = 0x64000                # a destination the guest never writes itself
FN = 0x40000                 # a function the guest calls, then has rewritten by DMA
OLD_FN = "mov eax, 0x1111\nret\n"
NEW_FN = "mov eax, 0x2222\nret\n"


class CopyEngine(StatelessDevice):
    """A one-channel DMA copier.  A descriptor in guest memory is
    ``u64 source, u64 destination, u32 length, u32 reserved``; writing its
    address to PORT copies the bytes, reading PORT+4 gives the status (OK,
    or ERROR when the DMA view refused the transfer: nothing was copied)."""

    name = "copyengine"
    io_ranges = ((PORT, 8),)

    def __init__(self, dma):
        self.dma = dma
        self.status = 0
        self.errors: list[DmaError] = []
        self.copies = 0

    def io_read(self, port: int, size: int) -> int:
        return self.status if port == PORT + 4 else 0

    def io_write(self, port: int, size: int, value: int) -> None:
        if port != PORT:
            return
        try:
            src, dst, n, _ = struct.unpack("<QQII", self.dma.read(value, 24))
            self.dma.write(dst, self.dma.read(src, n))
        except DmaError as e:
            self.errors.append(e)
            self.status = ERROR
            return
        self.copies += 1
        self.status = OK


def descriptor(src: int, dst: int, n: int) -> bytes:
    return struct.pack("<QQII", src, dst, n, 0)


def copy_guest(code: str, mmu: str = "shadow"):
    g = MmuGuest(MEM, mmu=mmu)
    dev = g.m.add_device(CopyEngine(g.m.dma))
    g.protected_mode(code)
    return g, dev


def kick(i: int, slot: int) -> str:
    """Run descriptor ``i``; store the status at SCR + 4*slot."""
    return (f"mov eax, {DESC + 32 * i:#x}\nmov dx, {PORT:#x}\nout dx, eax\n"
            f"mov dx, {PORT + 4:#x}\nin eax, dx\nmov [{SCR + 4 * slot:#x}], eax\n")


# ---- copies and code ------------------------------------------------------------------------

def test_a_descriptor_described_copy_lands_in_guest_memory():
    data = bytes((7 * i + 1) & 0xFF for i in range(0x1800))      # spans two destination pages
    g, dev = copy_guest(kick(0, 0) + f"mov eax, [{DST + 0x17FC:#x}]\nmov [{SCR + 4:#x}], eax\n" + EXIT0)
    g.put(SRC, data)
    g.put(DESC, descriptor(SRC, DST, len(data)))
    assert g.run(1000).reason is StopReason.EXIT
    assert g.u32(SCR) == OK and dev.copies == 1
    assert g.m.memory.read(DST, len(data)) == data
    assert g.u32(SCR + 4) == int.from_bytes(data[-4:], "little")    # the guest sees it too


@pytest.mark.parametrize("mmu", ["shadow", "nested"])
def test_the_guest_runs_code_the_device_wrote_over_code_that_already_ran(mmu):
    code = (f"call {FN:#x}\nmov [{SCR + 4:#x}], eax\n" + kick(0, 0)
            + f"call {FN:#x}\nmov [{SCR + 8:#x}], eax\n" + EXIT0)
    g, dev = copy_guest(code, mmu)
    g.put(FN, asm(OLD_FN, 32, FN))
    new = asm(NEW_FN, 32, FN)
    g.put(SRC, new)
    g.put(DESC, descriptor(SRC, FN, len(new)))
    assert g.run(1000).reason is StopReason.EXIT
    assert g.u32(SCR) == OK and dev.copies == 1
    assert g.u32(SCR + 4) == 0x1111          # the old code ran (and was translated)
    assert g.u32(SCR + 8) == 0x2222          # then the code the device wrote


def test_the_engine_counts_the_code_a_dma_write_invalidated():
    """On every fresh engine: the C core finds Unicorn's own TCG context, whose count of
    invalidated blocks moves, and not a stale copy an earlier engine left in freed memory
    (which 2% of engines found before: core.c find_tcg_ctx)."""
    code = f"call {FN:#x}\n" + kick(0, 0) + f"call {FN:#x}\nmov [{SCR + 8:#x}], eax\n" + EXIT0
    for _ in range(300):
        g, dev = copy_guest(code)
        g.put(FN, asm(OLD_FN, 32, FN))
        g.put(SRC, asm(NEW_FN, 32, FN))
        g.put(DESC, descriptor(SRC, FN, 6))
        assert g.run(1000).reason is StopReason.EXIT and g.u32(SCR + 8) == 0x2222 and dev.copies == 1
        assert g.m.engine.code_invalidations > 0
        g.m.close()


def test_a_transfer_over_the_rest_of_the_requesting_block_takes_effect_after_a_serializing_insn():
    """The device rewrites the instructions right after the OUT (and a CPUID) that started it,
    in the block being executed: after the serializing CPUID the CPU must execute the new ones."""
    head = f"mov eax, {DESC:#x}\nmov dx, {PORT:#x}\nout dx, eax\ncpuid\n"
    code = head + f"mov ebx, 0x1111\nmov [{SCR + 4:#x}], ebx\n" + EXIT0
    g, dev = copy_guest(code)
    at = CODE + len(asm(head, 32, CODE))
    new = asm("mov ebx, 0x2222", 32, at)
    assert len(new) == len(asm("mov ebx, 0x1111", 32, at))
    g.put(SRC, new)
    g.put(DESC, descriptor(SRC, at, len(new)))
    assert g.run(1000).reason is StopReason.EXIT
    assert dev.copies == 1
    assert g.u32(SCR + 4) == 0x2222


def test_a_transfer_over_code_after_a_jump_takes_effect():
    """The same, with a jump to the rewritten code (a new block), as a loader does."""
    head = f"mov eax, {DESC:#x}\nmov dx, {PORT:#x}\nout dx, eax\njmp next\nnext:\n"
    code = head + f"mov ebx, 0x1111\nmov [{SCR + 4:#x}], ebx\n" + EXIT0
    g, dev = copy_guest(code)
    at = CODE + len(asm(head, 32, CODE))
    new = asm("mov ebx, 0x2222", 32, at)
    g.put(SRC, new)
    g.put(DESC, descriptor(SRC, at, len(new)))
    assert g.run(1000).reason is StopReason.EXIT
    assert dev.copies == 1 and g.u32(SCR + 4) == 0x2222


def test_code_written_by_dma_is_invalidated_for_every_vcpu():
    """vCPU 1 keeps calling a function; vCPU 0 has the device rewrite it; vCPU 1 then runs the new one."""
    fn = LOAD + 0x3000
    desc, src = SHARED + 0x100, SHARED + 0x200
    ran, flag, after, done = SHARED + 0x20, SHARED + 0x12, SHARED + 0x24, SHARED + 0x11
    bsp = f"""
    w0: cmp dword ptr [{ran:#x}], 20
        jb w0
        mov eax, {desc:#x}
        mov dx, {PORT:#x}
        out dx, eax
        mov byte ptr [{flag:#x}], 1
    w1: cmp byte ptr [{done:#x}], 1
        jne w1
    """ + EXIT0
    ap = caller_ap(fn, 0x1111, ran, flag, after, done)
    image = two_cpu_image(bsp, ap).ljust(fn - LOAD, b"\x90") + asm(OLD_FN, 32, fn)
    m = flat_machine(image, quantum=200)
    dev = CopyEngine(m.dma)
    m.add_device(dev)
    new = asm(NEW_FN, 32, fn)
    m.memory.write(src, new)
    m.memory.write(desc, descriptor(src, fn, len(new)))
    r = m.run(10_000_000)
    assert r.reason is StopReason.EXIT, r
    assert dev.copies == 1
    assert m.memory.read_u32(ran) >= 20
    assert m.memory.read_u32(after) == 0x2222


# ---- refused transfers -------------------------------------------------------------------------

HOLE = 0x300000              # a RAM page the EPT takes away (no memory there)
RO = 0x302000                # a RAM page the EPT maps read-only
MMIO_PAGE = 0xD000_0000


class Regs(StatelessDevice):
    name = "regs"

    def __init__(self):
        self.accesses = 0

    def mmio_read(self, off: int, size: int) -> int:
        self.accesses += 1
        return 0

    def mmio_write(self, off: int, size: int, value: int) -> None:
        self.accesses += 1


BAD = {
    # name: (source, destination, length, what the error says)
    "past the end of RAM": (SRC, MEM - 0x10, 0x40, "hole"),
    "far past the end of guest-physical space": (SRC, 1 << 40, 0x10, "past the end"),
    "into a hole": (SRC, HOLE - 0x10, 0x20, "hole"),
    "from a hole": (HOLE + 0x800, DST, 0x20, "hole"),
    "into an MMIO page": (SRC, MMIO_PAGE, 0x10, "not RAM"),
    "from an MMIO page": (MMIO_PAGE, DST, 0x10, "not RAM"),
    "into a read-only page": (SRC, RO - 0x10, 0x20, "EPT"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_refused_transfer_moves_no_byte_and_the_guest_reads_an_error_status(case):
    src, dst, n, why = BAD[case]
    code = kick(0, 0) + kick(1, 1) + EXIT0
    g, dev = copy_guest(code)
    regs = Regs()
    g.m.mmio.register(regs, MMIO_PAGE, 0x1000)
    g.m.ept.unmap(HOLE, trap=False)
    g.m.ept.protect(RO, "r")
    g.put(SRC, bytes(range(1, 0x41)))
    g.put(DESC, descriptor(src, dst, n))
    g.put(DESC + 32, descriptor(SRC, DST + 0x1000, 8))        # a good one after it
    watch = [(a, a + 0x80) for a in (MEM - 0x80, HOLE - 0x80, RO - 0x80, DST)]
    before = [g.m.memory.read(lo, hi - lo) for lo, hi in watch]
    assert g.run(1000).reason is StopReason.EXIT
    assert g.u32(SCR) == ERROR, f"the guest read status {g.u32(SCR):#x}"
    assert len(dev.errors) == 1 and why in str(dev.errors[0])
    assert regs.accesses == 0                                 # DMA never reaches a device
    after = [g.m.memory.read(lo, hi - lo) for lo, hi in watch]
    assert after == before, "bytes moved before the DMA was refused"
    assert g.u32(SCR + 4) == OK                               # the device still works
    assert g.m.memory.read(DST + 0x1000, 8) == bytes(range(1, 9))


def test_a_dma_view_refuses_before_it_writes_a_single_page():
    """The view's own contract, without a guest: a write spanning a good page and a refused one
    leaves the good page untouched, whatever refuses the second."""
    g = MmuGuest(MEM)
    g.m.ept.unmap(HOLE, trap=False)
    g.m.ept.protect(RO, "r")
    for start in (HOLE - 0x10, RO - 0x10, MEM - 0x10):
        before = g.m.memory.read(start, 0x10)
        with pytest.raises(DmaError):
            g.m.dma.write(start, b"\xAA" * 0x20)
        assert g.m.memory.read(start, 0x10) == before
        assert not g.m.dma.check(start, 0x20, write=True)


def test_a_write_into_a_copy_on_write_page_is_resolved_first_and_allowed():
    """A page the EPT keeps read-only *with* a violation handler that fixes it (copy-on-write)
    is writable by DMA, as by the CPU."""
    g = MmuGuest(MEM)
    ept = g.m.ept
    ept.protect(RO, "r")
    fixed = []

    def cow(v) -> bool:
        if v.page == RO and v.access == "w":
            ept.protect(RO, "rwx")
            fixed.append(v.gpa)
            return True
        return False
    ept.handlers.append(cow)
    g.m.dma.write(RO - 0x10, b"\x55" * 0x20)
    assert fixed and g.m.memory.read(RO - 0x10, 0x20) == b"\x55" * 0x20


# ---- dirty logging ------------------------------------------------------------------------------

def test_dma_writes_mark_pages_dirty_in_the_ept_dirty_log():
    span = 0x1800
    code = kick(0, 0) + kick(1, 1) + EXIT0
    g, dev = copy_guest(code)
    g.put(SRC, bytes(span))
    g.put(DESC, descriptor(SRC, DST + 0x800, span))           # touches DST and DST + 0x1000
    g.put(DESC + 32, descriptor(SRC, MEM - 0x10, 0x20))       # refused: marks nothing
    ept = g.m.ept
    ept.start_dirty_log()
    assert ept.collect_dirty() == []
    assert g.run(1000).reason is StopReason.EXIT
    assert (g.u32(SCR), g.u32(SCR + 4)) == (OK, ERROR)
    dirty = set(ept.collect_dirty())
    assert {DST, DST + 0x1000} <= dirty
    assert SCR in dirty                                      # the guest's own stores are logged too
    assert not {p for p in dirty if p >= MEM - 0x1000}
    assert DST + 0x2000 not in dirty and SRC not in dirty    # read, not written
    # collected pages are re-armed: the next DMA write is logged again
    dev.io_write(PORT, 4, DESC)
    assert set(ept.collect_dirty()) == {DST, DST + 0x1000}
