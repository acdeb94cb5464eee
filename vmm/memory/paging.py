"""The guest page-table walk (GVA -> GPA), in Python: the reference walk.

Implements Intel SDM vol. 3A chapter 4: paging off, 32-bit paging (4 KiB and,
with CR4.PSE, 4 MiB pages), PAE paging and 4-level paging, with the access
rights of section 4.6 (U/S, R/W, CR0.WP, NX with EFER.NXE), reserved-bit
checks (4.3-4.5 tables), accessed and dirty flags as the processor sets them
(4.8: A on every paging-structure entry used to reach the next level as the
walk goes, A and D on the entry that maps the page only for accesses that do
not fault) and the page-fault error code of 4.7 (P, W/R, U/S, RSVD, I/D).
Paging-structure reads where nothing answers see zeros, as QEMU's walk does
(measured on QEMU 7.2, pc and q35: tests/test_hostile_mmu.py), so a CR3 or an
entry pointing there finds a non-present entry: #PF.

The VMM uses it for its own guest-linear accesses (delivery pushes frames,
reads the IDT, GDT and TSS, decodes instructions); the shadow MMU's C walk
(vmm/cpu/mmu_native.py) is a line-by-line port of it, held equal to it by
tests/test_paging.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vmm.memory.ram import GuestMemoryError

PFEC_P = 1
PFEC_W = 2
PFEC_U = 4
PFEC_RSVD = 8
PFEC_I = 16

CR0_PE = 1 << 0
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

PHYS_BITS = 40  # what QEMU's TCG x86-64 CPU reports and checks against
PHYS_MASK = (1 << PHYS_BITS) - 1
ADDR_4K = PHYS_MASK & ~0xFFF
NX = 1 << 63

ACCESS_READ = "r"
ACCESS_WRITE = "w"
ACCESS_FETCH = "x"


class PageFault(Exception):
    """A #PF the guest must see: ``cr2`` and ``error_code`` per SDM 4.7."""

    def __init__(self, cr2: int, error_code: int):
        super().__init__(f"#PF at {cr2:#x} error {error_code:#x}")
        self.cr2 = cr2
        self.error_code = error_code


class PhysMem(Protocol):
    def read_u32(self, pa: int) -> int: ...

    def read_u64(self, pa: int) -> int: ...

    def write_u32(self, pa: int, value: int) -> None: ...

    def write_u64(self, pa: int, value: int) -> None: ...


@dataclass(frozen=True)
class Translation:
    phys: int
    page_size: int
    writable: bool
    user: bool
    executable: bool


def paging_mode(cr0: int, cr4: int, efer: int) -> str:
    if not (cr0 & CR0_PG) or not (cr0 & CR0_PE):
        return "off"
    if efer & EFER_LMA:
        return "long"
    if cr4 & CR4_PAE:
        return "pae"
    return "32"


def translate(
    mem: PhysMem,
    lin: int,
    access: str,
    user: bool,
    cr0: int,
    cr3: int,
    cr4: int,
    efer: int,
    set_ad: bool = True,
    a20_mask: int = -1,
) -> Translation:
    """Translate one guest-linear address or raise PageFault.

    ``user`` is true for accesses made at CPL 3 (implicit supervisor accesses
    such as descriptor-table reads pass False).  ``access`` is "r", "w" or "x".

    Accessed flags (SDM 4.8: "whenever the processor uses a paging-structure
    entry as part of linear-address translation") are set on each entry that
    references a further paging structure as soon as the walk has used it,
    i.e. once it passed its present and reserved-bit checks, even if a later
    level then faults; the entry that maps the page gets its accessed flag,
    and for a write its dirty flag, only when the access is allowed.  This is
    also the order of QEMU's walk (target/i386/excp_helper.c), which the
    nested MMU uses, so both MMUs leave the same A/D bits.

    Paging-structure reads that hit nothing (a CR3 or an entry pointing past
    RAM or into a hole) see zeros and writes there are dropped: the entry is
    not present, a #PF.  A PC's bus would answer all ones (a master abort),
    but QEMU reads unassigned space as zeros, in its walk as everywhere, and
    Unicorn's walker (the nested MMU) is QEMU's: we behave like QEMU.  A page
    routed to the MMIO bus reads zeros too, what the bus answers where no device
    claims it (``mem`` decides: vmm/memory/ept.py's ``EptPhys``).
    """
    mode = paging_mode(cr0, cr4, efer)
    if mode == "off":
        return Translation(lin & 0xFFFF_FFFF & a20_mask, 1 << 32, True, True, True)
    write = access == ACCESS_WRITE
    fetch = access == ACCESS_FETCH
    nxe = bool(efer & EFER_NXE)
    wp = bool(cr0 & CR0_WP)
    ecode = (PFEC_W if write else 0) | (PFEC_U if user else 0)
    if fetch and nxe and mode != "32":
        ecode |= PFEC_I

    if mode == "32":
        lin &= 0xFFFF_FFFF
        pde_addr = ((cr3 & 0xFFFF_F000) | ((lin >> 20) & 0xFFC)) & a20_mask
        pde = _load(mem, pde_addr, 4)
        if not pde & 1:
            raise PageFault(lin, ecode)
        if (pde & 0x80) and (cr4 & CR4_PSE):
            # PSE-36: bits 13..(13+PHYS_BITS-33) hold PA bits 32+; bit 21 and above reserved
            rsvd = (pde >> 13) & ~((1 << (PHYS_BITS - 32)) - 1) & 0x1FF
            if rsvd:
                raise PageFault(lin, ecode | PFEC_P | PFEC_RSVD)
            base = (pde & 0xFFC0_0000) | (((pde >> 13) & 0xFF) << 32)
            flags_rw = pde & 2
            flags_us = pde & 4
            phys = base | (lin & 0x3F_FFFF)
            size = 4 << 20
            leaf = (pde_addr, pde, 4)
        else:
            if set_ad and not pde & 0x20:
                _store(mem, pde_addr, pde | 0x20, 4)
            pte_addr = ((pde & 0xFFFF_F000) | ((lin >> 10) & 0xFFC)) & a20_mask
            pte = _load(mem, pte_addr, 4)
            if not pte & 1:
                raise PageFault(lin, ecode)
            flags_rw = pde & pte & 2
            flags_us = pde & pte & 4
            phys = (pte & 0xFFFF_F000) | (lin & 0xFFF)
            size = 4096
            leaf = (pte_addr, pte, 4)
        nx = False
    else:
        if mode == "pae":
            lin &= 0xFFFF_FFFF
            pdpte_addr = ((cr3 & 0xFFFF_FFE0) | ((lin >> 27) & 0x18)) & a20_mask
            pdpte = _load(mem, pdpte_addr, 8)
            if not pdpte & 1:
                raise PageFault(lin, ecode)
            # PDPTE: bits 1-2, 5-8 and 63 and above MAXPHYADDR are reserved (SDM table 4-8)
            if pdpte & (0x1E6 | ~PHYS_MASK & ~0xFFF & ((1 << 63) - 1) | NX):
                raise PageFault(lin, ecode | PFEC_P | PFEC_RSVD)
            table = pdpte & ADDR_4K
            levels = [(21, "pd"), (12, "pt")]
            # PAE paging: bits 62:MAXPHYADDR of a PDE or PTE are reserved (SDM tables 4-9 to 4-11)
            hi_rsvd = ~PHYS_MASK & ((1 << 63) - 1) & ~0xFFF
        else:
            # canonical check is the caller's business (#GP, not #PF)
            table = cr3 & ADDR_4K
            levels = [(39, "pml4"), (30, "pdpt"), (21, "pd"), (12, "pt")]
            # 4-level paging: bits 51:MAXPHYADDR reserved, 62:52 ignored (SDM tables 4-14 to 4-20)
            hi_rsvd = ~PHYS_MASK & ((1 << 52) - 1) & ~0xFFF
        flags_rw = 2
        flags_us = 4
        nx = False
        phys = size = 0
        leaf = None
        for shift, name in levels:
            addr = (table | (((lin >> shift) & 0x1FF) << 3)) & a20_mask
            e = _load(mem, addr, 8)
            if not e & 1:
                raise PageFault(lin, ecode)
            rsvd = e & hi_rsvd
            if not nxe and e & NX:
                rsvd |= 1
            if name == "pml4" and e & 0x80:
                rsvd |= 1
            big = name in ("pdpt", "pd") and bool(e & 0x80)
            if big:
                page = 1 << shift
                # bits 12..shift-1 except PAT (bit 12) are reserved in a large-page entry
                rsvd |= e & (page - 1) & ~0x1FFF
            if rsvd:
                raise PageFault(lin, ecode | PFEC_P | PFEC_RSVD)
            flags_rw &= e & 2
            flags_us &= e & 4
            nx = nx or bool(e & NX and nxe)
            if big or name == "pt":
                page = 1 << shift
                phys = (e & PHYS_MASK & ~(page - 1)) | (lin & (page - 1))
                size = page
                leaf = (addr, e, 8)
                break
            if set_ad and not e & 0x20:
                _store(mem, addr, e | 0x20, 8)
            table = e & ADDR_4K
        assert leaf is not None

    # access rights (SDM 4.6)
    if user and not flags_us:
        raise PageFault(lin, ecode | PFEC_P)
    if write and not flags_rw and (user or wp):
        raise PageFault(lin, ecode | PFEC_P)
    if fetch and nx:
        raise PageFault(lin, ecode | PFEC_P)

    if set_ad:
        laddr, lval, width = leaf
        new = lval | 0x20 | (0x40 if write else 0)
        if new != lval:
            _store(mem, laddr, new, width)
    return Translation(phys & a20_mask, size, bool(flags_rw), bool(flags_us), not nx)


def _load(mem: PhysMem, addr: int, width: int) -> int:
    """A paging-structure read: zeros where nothing answers, as QEMU's walk reads it."""
    try:
        return mem.read_u64(addr) if width == 8 else mem.read_u32(addr)
    except GuestMemoryError:
        return 0


def _store(mem: PhysMem, addr: int, value: int, width: int) -> None:
    """A/D update; dropped where no memory answers."""
    try:
        if width == 8:
            mem.write_u64(addr, value)
        else:
            mem.write_u32(addr, value & 0xFFFF_FFFF)
    except GuestMemoryError:
        pass
