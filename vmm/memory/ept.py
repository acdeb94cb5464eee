"""The EPT: the VMM's second-level translation, GPA page -> (host frame, R/W/X).

It is the only path from a guest to host memory.  The guest's page tables
map linear addresses to guest-physical ones (vmm/memory/paging.py, and its C port
in vmm/cpu/mmu_native.py); this table maps each guest-physical page to a host
frame with permissions, and an access the EPT does not allow is an *EPT
violation*: it exits to the VMM with the GPA and the kind of access (read,
write or fetch), and the handlers registered in ``Ept.handlers`` may fix
the mapping and let the guest retry the instruction.  Dirty logging,
copy-on-write, page sharing and lazy allocation are a few lines each on
top of that (tests/test_ept.py shows each).

Representation (readable from C, used by the shadow MMU's TLB fill):

* ``entries``: numpy uint64 per GPA page: ``host_frame << 12 | flags`` with
  R=1, W=2, X=4, LOG=8 (W withheld for dirty logging: the first write marks
  the page dirty and gives W back, in C, without an exit), VALID=16 (the VMM
  owns the page).  An entry that is not VALID is a hole: nothing answers
  there (it reads zeros, as unassigned space in QEMU: the guest's page
  tables, and a guest access above RAM, which is routed to the MMIO bus; a
  guest access to a hole inside RAM stops the run).  A VALID entry without the
  right permission is a violation.
* ``dirty``: numpy uint8 per GPA page.
* ``MMIO``=32: the page belongs to the MMIO bus (a device claims it); the
  entry is VALID|MMIO|R|W with the GPA's own frame number, where the vCPU
  maps a Unicorn MMIO region.  The guest's accesses reach the device; DMA
  treats it as no memory (refused), the page walk reads zeros there.
* host frames: Unicorn physical pages.  Frames [0, ram_frames) are the
  guest RAM buffer (``GuestMemory``), identity-mapped at boot; an optional
  pool of spare frames (``add_pool``) starts at ``POOL_FIRST``.

How the EPT takes effect depends on the MMU (``Vcpu(mmu=...)``): with the
shadow MMU every TLB fill consults ``entries`` in C, so a change only needs a
TLB flush; with the nested MMU (Unicorn walks the guest tables itself) the
EPT is realised as Unicorn's memory map, page by page (slow for many pages:
UNICORN.md 6), and dirty logging is not available.
"""
from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vmm.memory.ram import GuestMemory, GuestMemoryError

PAGE = 4096
R, W, X = 1, 2, 4
RWX = R | W | X
LOG = 8
VALID = 16
MMIO = 32     # routed to the MMIO bus: the frame number is the GPA's own (a Unicorn MMIO region)
FLAG_MASK = 0xFFF

POOL_FIRST = 1 << 26          # host frame number of the first pool frame (256 GiB in Unicorn's space)
DEFAULT_SPACE = 4 << 30       # guest-physical space the table covers (RAM beyond it extends it)

ACCESS_NAMES = {0: "read", 1: "write", 2: "fetch"}
_ACCESS_BITS = {"r": R, "w": W, "x": X}


class EptError(ValueError):
    """A bad EPT request from the VMM (outside the table, no such frame...)."""


@dataclass(frozen=True)
class Violation:
    """An access the EPT refused: ``access`` is "r", "w" or "x"."""

    gpa: int
    access: str
    lin: int = field(default=0, compare=False)   # the guest-linear address, when known (shadow MMU)
    walk: bool = False      # made by the guest's page walk (a paging-structure access)
    hole: bool = False      # no memory at all there (not a VMM-owned page)

    @property
    def page(self) -> int:
        return self.gpa & ~(PAGE - 1)

    def __str__(self) -> str:
        what = {"r": "read", "w": "write", "x": "fetch"}[self.access]
        return (f"EPT violation: {what} of GPA {self.gpa:#x}" + (" (page walk)" if self.walk else "")
                + (" where nothing is mapped" if self.hole else ""))


class EptViolation(Exception):
    """A VMM-side access through the EPT that no handler resolved."""

    def __init__(self, v: Violation):
        super().__init__(str(v))
        self.violation = v


def _perm_bits(perms: str | int) -> int:
    if isinstance(perms, int):
        if perms & ~RWX:
            raise EptError(f"bad permission bits {perms:#x}")
        return perms
    bits = 0
    for ch in perms:
        if ch not in _ACCESS_BITS:
            raise EptError(f"bad permission {perms!r}: use a combination of r, w, x")
        bits |= _ACCESS_BITS[ch]
    return bits


class Ept:
    """GPA page -> (host frame, permissions), with violation handlers and a dirty log."""

    def __init__(self, memory: GuestMemory, space: int = DEFAULT_SPACE):
        self.memory = memory
        self.ram_frames = memory.size // PAGE
        self.npages = max(space, memory.size) // PAGE
        self.entries = np.zeros(self.npages, dtype=np.uint64)
        self.dirty = np.zeros(self.npages, dtype=np.uint8)
        gpn = np.arange(self.ram_frames, dtype=np.uint64)
        self.entries[: self.ram_frames] = (gpn << np.uint64(12)) | np.uint64(VALID | RWX)
        self.pool_first = POOL_FIRST
        self.touched = False   # changed since made (a vCPU attached later realises the difference)
        self.pool: np.ndarray | None = None
        self._pool_mmap: mmap.mmap | None = None
        self.pool_frames = 0
        self._free: list[int] = []
        self.handlers: list[Callable[[Violation], bool]] = []
        self.logging = False
        # set by the vCPU: called with the GPA pages whose entries changed (old values)
        self.on_change: Callable[[np.ndarray, np.ndarray], None] | None = None
        self.on_pool: Callable[[int, int, int], None] | None = None
        self.on_code_write: Callable[[int, int], None] | None = None
        self.mmu_mode = "shadow"
        self.violations = 0

    def boot_entries(self) -> np.ndarray:
        """The table as made: RAM identity-mapped with all rights, holes elsewhere."""
        boot = np.zeros(self.npages, dtype=np.uint64)
        gpn = np.arange(self.ram_frames, dtype=np.uint64)
        boot[: self.ram_frames] = (gpn << np.uint64(12)) | np.uint64(VALID | RWX)
        return boot

    # -- host frames ---------------------------------------------------------------
    def add_pool(self, frames: int) -> None:
        """Spare host frames for copy-on-write, sharing and lazy allocation (once)."""
        if self.pool is not None:
            raise EptError("the frame pool exists already")
        if frames <= 0:
            raise EptError("a pool needs at least one frame")
        self._pool_mmap = mmap.mmap(-1, frames * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.pool = np.frombuffer(self._pool_mmap, dtype=np.uint8)
        self.pool_frames = frames
        self._free = list(range(POOL_FIRST + frames - 1, POOL_FIRST - 1, -1))
        if self.on_pool is not None:
            self.on_pool(POOL_FIRST, frames, self.pool.ctypes.data)

    def alloc_frame(self) -> int:
        """A free pool frame (zero filled)."""
        if not self._free:
            raise EptError("the frame pool is exhausted" if self.pool is not None else "no frame pool (add_pool)")
        hfn = self._free.pop()
        self.frame(hfn)[:] = 0
        return hfn

    def free_frame(self, hfn: int) -> None:
        if not POOL_FIRST <= hfn < POOL_FIRST + self.pool_frames or hfn in self._free:
            raise EptError(f"host frame {hfn:#x} is not an allocated pool frame")
        self._free.append(hfn)

    def frame(self, hfn: int) -> np.ndarray:
        """The 4096 bytes of a host frame (a numpy view: writes go to the frame)."""
        if 0 <= hfn < self.ram_frames:
            return self.memory.ram[hfn * PAGE:(hfn + 1) * PAGE]
        if self.pool is not None and POOL_FIRST <= hfn < POOL_FIRST + self.pool_frames:
            off = (hfn - POOL_FIRST) * PAGE
            return self.pool[off:off + PAGE]
        raise EptError(f"no host frame {hfn:#x}")

    def frame_address(self, hfn: int) -> int:
        """Host virtual address of a frame."""
        return self.frame(hfn).ctypes.data

    # -- the table -------------------------------------------------------------------
    def _gpn(self, gpa: int, npages: int = 1) -> int:
        if gpa % PAGE:
            raise EptError(f"GPA {gpa:#x} is not page aligned")
        gpn = gpa // PAGE
        if gpn < 0 or npages < 1 or gpn + npages > self.npages:
            raise EptError(f"GPA {gpa:#x}+{npages} pages is outside the EPT ({self.npages * PAGE:#x} bytes)")
        return gpn

    def _set(self, gpn: int, n: int, values: np.ndarray | int) -> None:
        self.touched = True
        old = self.entries[gpn:gpn + n].copy()
        self.entries[gpn:gpn + n] = values
        if self.on_change is not None:
            changed = np.flatnonzero(old != self.entries[gpn:gpn + n])
            if changed.size:
                self.on_change(changed + gpn, old[changed])

    def entry(self, gpa: int) -> int:
        return int(self.entries[self._gpn(gpa & ~(PAGE - 1))])

    def map(self, gpa: int, hfn: int | None = None, perms: str | int = "rwx", npages: int = 1) -> None:
        """Map ``npages`` pages from ``gpa`` to consecutive host frames from ``hfn``
        (default: the RAM frame of the same number, i.e. identity)."""
        gpn = self._gpn(gpa, npages)
        hfn = gpn if hfn is None else hfn
        for f in (hfn, hfn + npages - 1):
            self.frame(f)  # raises for a frame that does not exist
        if hfn < self.ram_frames <= hfn + npages - 1:
            raise EptError("a mapping may not run from RAM frames into the pool")
        bits = _perm_bits(perms)
        frames = np.arange(hfn, hfn + npages, dtype=np.uint64) << np.uint64(12)
        if self.logging and bits & W:
            bits = (bits & ~W) | LOG
        self._set(gpn, npages, frames | np.uint64(VALID | bits))

    def set_mmio(self, gpa: int, on: bool) -> None:
        """Route the page at ``gpa`` to the MMIO bus (or make it a hole again)."""
        gpn = self._gpn(gpa)
        if gpn < self.ram_frames:
            raise EptError(f"GPA {gpa:#x} is RAM; MMIO there is not routed")
        self._set(gpn, 1, (gpn << 12) | VALID | MMIO | R | W if on else 0)

    def unmap(self, gpa: int, npages: int = 1, trap: bool = True) -> None:
        """Take pages away from the guest.  ``trap``: every access is a violation
        the handlers see (lazy allocation, emulated MMIO); else a hole."""
        gpn = self._gpn(gpa, npages)
        self._set(gpn, npages, VALID if trap else 0)

    def protect(self, gpa: int, perms: str | int, npages: int = 1) -> None:
        """Change the permissions of mapped pages, keeping their frames."""
        gpn = self._gpn(gpa, npages)
        cur = self.entries[gpn:gpn + npages]
        if np.any((cur & np.uint64(VALID)) == 0):
            raise EptError(f"protect: a page in {gpa:#x}+{npages} pages is not mapped")
        bits = _perm_bits(perms)
        if self.logging and bits & W:
            bits = (bits & ~W) | LOG
        new = (cur & ~np.uint64(FLAG_MASK)) | np.uint64(VALID | bits)
        self._set(gpn, npages, new)

    def translate(self, gpa: int, access: str = "r") -> int:
        """Host physical (Unicorn) address of ``gpa`` for ``access``, or raise EptViolation
        (the page's permissions are checked; a logged write counts as allowed)."""
        gpn = gpa // PAGE
        e = int(self.entries[gpn]) if 0 <= gpn < self.npages else 0
        need = _ACCESS_BITS[access]
        if not e & VALID or not (e & need or (need == W and e & LOG)):
            raise EptViolation(Violation(gpa, access, hole=not e & VALID))
        return (e >> 12) * PAGE + (gpa & (PAGE - 1))

    def perms(self, gpa: int) -> str:
        e = self.entry(gpa)
        if not e & VALID:
            return ""
        return "".join(c for c, b in (("r", R), ("w", W), ("x", X)) if e & b or (b == W and e & LOG))

    # -- saved state --------------------------------------------------------------------
    def save_state(self) -> dict:
        """The entries that differ from the boot table (MMIO pages excepted: the devices'
        claims put those back), the dirty log, and the pool frames in use."""
        boot = self.boot_entries()
        diff = np.flatnonzero((self.entries != boot) & ((self.entries & np.uint64(MMIO)) == 0))
        pool: dict = {}
        if self.pool is not None:
            free = set(self._free)
            used = [f for f in range(POOL_FIRST, POOL_FIRST + self.pool_frames) if f not in free]
            pool = {"frames": self.pool_frames, "free": list(self._free),
                    "used": used, "data": b"".join(self.frame(f).tobytes() for f in used)}
        return {"kind": "ept", "version": 1, "gpns": diff.astype("<u8").tobytes(),
                "entries": self.entries[diff].astype("<u8").tobytes(), "logging": self.logging,
                "dirty": np.flatnonzero(self.dirty).astype("<u8").tobytes(), "pool": pool}

    def load_state(self, st: dict) -> None:
        from devices.base import DeviceStateError

        if not isinstance(st, dict) or st.get("kind") != "ept" or st.get("version") != 1:
            raise DeviceStateError("ept: not an EPT state of version 1")
        try:
            gpns = np.frombuffer(st["gpns"], dtype="<u8").astype(np.int64)
            vals = np.frombuffer(st["entries"], dtype="<u8").astype(np.uint64)
            dirty = np.frombuffer(st["dirty"], dtype="<u8").astype(np.int64)
        except (KeyError, TypeError, ValueError) as e:
            raise DeviceStateError(f"ept: malformed state ({e})") from None
        if gpns.size != vals.size or (gpns.size and gpns.max() >= self.npages) or \
                (dirty.size and dirty.max() >= self.npages):
            raise DeviceStateError("ept: entries outside the table")
        pool = st.get("pool") or {}
        if pool:
            if self.pool is None:
                self.add_pool(int(pool["frames"]))
            if int(pool["frames"]) != self.pool_frames:
                raise DeviceStateError("ept: the saved frame pool has another size")
            used = [int(f) for f in pool["used"]]
            data = pool["data"]
            if len(data) != len(used) * PAGE:
                raise DeviceStateError("ept: pool frame data does not match the frame list")
            for i, f in enumerate(used):
                self.frame(f)[:] = np.frombuffer(data[i * PAGE:(i + 1) * PAGE], dtype=np.uint8)
            self._free = [int(f) for f in pool["free"]]
        if self.touched or gpns.size:
            mmio = (self.entries & np.uint64(MMIO)) != 0
            new = self.boot_entries()
            new[mmio] = self.entries[mmio]
            new[gpns] = vals
            changed = np.flatnonzero(new != self.entries)
            if changed.size:
                self._set_many(changed, new[changed])
        # else: never changed since made (no MMIO claim either), so already the boot table
        # the state asks for: skip building and comparing two whole tables
        self.logging = bool(st.get("logging", False))
        self.dirty[:] = 0
        self.dirty[dirty] = 1

    def _set_many(self, gpns: np.ndarray, values: np.ndarray) -> None:
        self.touched = True
        old = self.entries[gpns].copy()
        self.entries[gpns] = values
        if self.on_change is not None:
            self.on_change(gpns, old)

    # -- violations -------------------------------------------------------------------
    def handle_violation(self, v: Violation) -> bool:
        """Offer a violation to the handlers; True if one of them fixed the mapping."""
        self.violations += 1
        for h in self.handlers:
            if h(v):
                return True
        return False

    # -- dirty logging -----------------------------------------------------------------
    def start_dirty_log(self) -> None:
        """Write-protect every writable page; its first write marks it dirty."""
        if self.mmu_mode == "nested":
            raise EptError("dirty logging needs the shadow MMU (--mmu shadow): in nested mode it would "
                           "split Unicorn's RAM region into one region per page")
        self.logging = True
        self.dirty[:] = 0
        self._arm(np.flatnonzero(self.entries & np.uint64(W)))

    def _arm(self, gpns: np.ndarray) -> None:
        if gpns.size == 0:
            return
        cur = self.entries[gpns]
        writable = (cur & np.uint64(W)) != 0
        gpns = gpns[writable]
        if gpns.size == 0:
            return
        self.touched = True
        old = self.entries[gpns].copy()
        self.entries[gpns] = (old & ~np.uint64(W)) | np.uint64(LOG)
        if self.on_change is not None:
            self.on_change(gpns, old)

    def collect_dirty(self) -> list[int]:
        """GPAs (page aligned, sorted) of the pages written since the last collection,
        and re-arm them."""
        if not self.logging:
            raise EptError("dirty logging is not on (start_dirty_log)")
        gpns = np.flatnonzero(self.dirty)
        self.dirty[gpns] = 0
        self._arm(gpns)
        return [int(g) * PAGE for g in gpns]

    def stop_dirty_log(self) -> None:
        if not self.logging:
            return
        self.logging = False
        gpns = np.flatnonzero(self.entries & np.uint64(LOG))
        if gpns.size:
            old = self.entries[gpns].copy()
            self.entries[gpns] = (old & ~np.uint64(LOG)) | np.uint64(W)
            if self.on_change is not None:
                self.on_change(gpns, old)

    def note_host_write(self, gpa: int, n: int) -> None:
        """The VMM wrote guest RAM directly (GuestMemory.write): log it too."""
        if not self.logging or n <= 0:
            return
        lo, hi = gpa // PAGE, (gpa + n - 1) // PAGE + 1
        hi = min(hi, self.npages)
        if lo >= hi:
            return
        span = self.entries[lo:hi]
        logged = np.flatnonzero(span & np.uint64(LOG)) + lo
        self.dirty[lo:hi] |= ((span & np.uint64(W | LOG)) != 0).astype(np.uint8)
        if logged.size:
            old = self.entries[logged].copy()
            self.entries[logged] = (old & ~np.uint64(LOG)) | np.uint64(W)
            if self.on_change is not None:
                self.on_change(logged, old)

    # -- the VMM's own guest-physical accesses -------------------------------------------
    def _host_range(self, gpa: int, access: str) -> tuple[np.ndarray | None, int]:
        """(frame array or None for a hole, offset) for one access, resolving violations."""
        for _ in range(4):
            gpn = gpa // PAGE
            e = int(self.entries[gpn]) if 0 <= gpn < self.npages else 0
            if not e & VALID or e & MMIO:
                return None, 0   # nothing there, or a device's page: the VMM's own accesses see no memory
            need = _ACCESS_BITS[access]
            if e & need or (need == W and e & LOG):
                if need == W and e & LOG:
                    self.dirty[gpn] = 1
                    self._set(gpn, 1, (e & ~LOG) | W)
                return self.frame(e >> 12), gpa & (PAGE - 1)
            if not self.handle_violation(Violation(gpa, access)):
                break
        raise EptViolation(Violation(gpa, access))

    def read(self, gpa: int, n: int) -> bytes:
        """Guest-physical read through the EPT; holes (and device pages) read as zeros, as the
        guest reads unassigned space (devices/bus.py)."""
        out = bytearray()
        while n > 0:
            chunk = min(n, PAGE - (gpa & (PAGE - 1)))
            fr, off = self._host_range(gpa, "r")
            out += bytes(chunk) if fr is None else fr[off:off + chunk].tobytes()
            gpa += chunk
            n -= chunk
        return bytes(out)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Guest-physical write through the EPT; writes to holes are dropped."""
        data = bytes(data)
        pos = 0
        while pos < len(data):
            chunk = min(len(data) - pos, PAGE - (gpa & (PAGE - 1)))
            fr, off = self._host_range(gpa, "w")
            if fr is not None:
                e = int(self.entries[gpa // PAGE])
                # (e is RAM or a pool frame here: holes and MMIO came back as None)
                hfn = e >> 12
                if hfn == gpa // PAGE:
                    self.memory.write(gpa, data[pos:pos + chunk])   # notifies code and dirty log
                else:
                    fr[off:off + chunk] = np.frombuffer(data[pos:pos + chunk], dtype=np.uint8)
                    if self.on_code_write is not None:
                        self.on_code_write(hfn * PAGE + off, chunk)
            gpa += chunk
            pos += chunk

    @property
    def phys(self) -> EptPhys:
        """The guest-physical view the page walk reads its tables through."""
        return EptPhys(self)


class EptPhys:
    """PhysMem for vmm/memory/paging.py: paging-structure accesses through the EPT.

    A hole raises GuestMemoryError, which the walk turns into zeros (writes
    dropped); a page of the MMIO bus reads as zeros and drops writes, as the
    nested MMU's walker (Unicorn's own, through the bus) sees an unclaimed page
    there; a trapping page, or an A/D write to a page the EPT keeps read-only,
    raises EptViolation after the handlers had their chance.
    """

    def __init__(self, ept: Ept):
        self.ept = ept
        self._ram_frames = ept.ram_frames
        self._entries = ept.entries
        self._mem = ept.memory

    def _loc(self, pa: int, access: str) -> tuple[int, np.ndarray | None, int]:
        gpn = pa >> 12
        if 0 <= gpn < self.ept.npages:
            e = int(self._entries[gpn])
            # fast path: identity-mapped RAM with the right
            if e >> 12 == gpn and gpn < self._ram_frames and e & _ACCESS_BITS[access]:
                return pa, None, 0
        try:
            fr, off = self.ept._host_range(pa, access)
        except EptViolation as ev:
            raise EptViolation(Violation(pa, access, walk=True)) from ev
        if fr is None:
            raise GuestMemoryError(f"no memory at GPA {pa:#x}")
        e = int(self._entries[gpn])
        if (e >> 12) < self._ram_frames:
            return (e >> 12) * PAGE + off, None, 0
        return -1, fr, off

    def _bus_page(self, pa: int) -> bool:
        gpn = pa >> 12
        return 0 <= gpn < self.ept.npages and int(self._entries[gpn]) & (VALID | MMIO) == VALID | MMIO

    def _read(self, pa: int, n: int) -> int:
        if self._bus_page(pa):
            return 0          # what the bus answers where nothing claims (the C walk: the same)
        hpa, fr, off = self._loc(pa, "r")
        if fr is None:
            return int.from_bytes(self._mem.read(hpa, n), "little")
        return int.from_bytes(fr[off:off + n].tobytes(), "little")

    def _write(self, pa: int, n: int, v: int) -> None:
        if self._bus_page(pa):
            return
        hpa, fr, off = self._loc(pa, "w")
        data = (v & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
        if fr is None:
            self._mem.ram[hpa:hpa + n] = np.frombuffer(data, dtype=np.uint8)
        else:
            fr[off:off + n] = np.frombuffer(data, dtype=np.uint8)

    def read_u32(self, pa: int) -> int:
        return self._read(pa, 4)

    def read_u64(self, pa: int) -> int:
        return self._read(pa, 8)

    def write_u32(self, pa: int, value: int) -> None:
        self._write(pa, 4, value)

    def write_u64(self, pa: int, value: int) -> None:
        self._write(pa, 8, value)
