"""The shadow MMU's page walk, callable from Python (tests, benchmarks, tools).

The walk itself is C (vmm/cpu/native/mmu.c, inside vmm.cpu._native); the vCPU
calls it from Unicorn's TLB fill.  ``CWalk`` runs the very same function over
an EPT and its host frames, with the signature of vmm/memory/paging.py's
``translate``, so the two can be held against each other on the same
inputs.  No Unicorn here.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vmm.cpu import native
from vmm.memory.ept import Ept, EptViolation, Violation
from vmm.memory.paging import PageFault, Translation

_fast = native.load()
ffi = _fast.ffi
lib = _fast.lib

_ACCESS = {"r": 0, "w": 1, "x": 2}


def _a20(mask: int) -> int:
    mask &= 0xFFFF_FFFF
    return mask - (1 << 32) if mask & 0x8000_0000 else mask


def mmu_view(ept: Ept):
    """The C view of an EPT and its host frames (a ``vmm_mmu``), as the walk and the
    shadow MMU read it.  Keep the returned object alive as long as C uses it."""
    m = ffi.new("vmm_mmu *")
    m.ept = ffi.cast("uint64_t *", ept.entries.ctypes.data)
    m.ept_pages = ept.npages
    m.dirty = ffi.cast("uint8_t *", ept.dirty.ctypes.data)
    m.ram = ffi.cast("uint8_t *", ept.memory.address())
    m.ram_frames = ept.ram_frames
    if ept.pool is not None:
        m.pool = ffi.cast("uint8_t *", ept.pool.ctypes.data)
        m.pool_first = ept.pool_first
        m.pool_frames = ept.pool_frames
    return m


class CWalk:
    """The C page walk over ``ept`` (GPA -> host frames), as a Python call."""

    def __init__(self, ept: Ept, view=None):
        self.ept = ept
        self._m = mmu_view(ept) if view is None else view
        self._r = ffi.new("vmm_walk_result *")

    def translate(self, lin: int, access: str, user: bool, cr0: int, cr3: int, cr4: int, efer: int,
                  set_ad: bool = True, a20_mask: int = -1) -> Translation:
        """Same contract as vmm.memory.paging.translate (raises PageFault or EptViolation)."""
        r = self._r
        rc = lib.vmm_walk(self._m, lin & 0xFFFF_FFFF_FFFF_FFFF, _ACCESS[access], 1 if user else 0,
                          cr0, cr3, cr4, efer, _a20(a20_mask), 1 if set_ad else 0, r)
        if rc == lib.VMM_WALK_PF:
            cr2 = lin & 0xFFFF_FFFF if (efer >> 10) & 1 == 0 else lin
            raise PageFault(cr2, r.error_code)
        if rc == lib.VMM_WALK_EPT:
            m = self._m
            raise EptViolation(Violation(int(m.viol_gpa), "rwx"[m.viol_access], int(m.viol_lin), True,
                                         bool(m.viol_hole)))
        return Translation(int(r.gpa), int(r.page_size), bool(r.prot & 2), bool(r.prot & 1), bool(r.prot & 4))

    def walk_many(self, lins: Sequence[int], accesses: Sequence[str], users: Sequence[bool], cr0: int, cr3: int,
                  cr4: int, efer: int, set_ad: bool = True, a20_mask: int = -1) -> int:
        """Walk a batch in one C call (benchmarks); returns how many faulted."""
        n = len(lins)
        la = np.asarray(lins, dtype=np.uint64)
        aa = np.asarray([_ACCESS[a] for a in accesses], dtype=np.int32)
        ua = np.asarray([1 if u else 0 for u in users], dtype=np.int32)
        return lib.vmm_walk_bench(self._m, ffi.cast("uint64_t *", la.ctypes.data),
                                  ffi.cast("int *", aa.ctypes.data), ffi.cast("int *", ua.ctypes.data), n,
                                  cr0, cr3, cr4, efer, _a20(a20_mask), 1 if set_ad else 0)
