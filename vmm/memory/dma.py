"""DMA: a device's view of guest-physical memory.

Devices never get a host pointer or the RAM buffer.  They read and write
guest memory through a ``DmaView``, which goes through the EPT (the only path
from a guest address to host memory) and checks every byte first:

* a transfer that touches anything but RAM the EPT maps (a hole, MMIO, an
  address past the end of the guest-physical space) raises ``DmaError``
  before a single byte moves; the device then does what its datasheet says
  (an ATA bus-master sets its error bit, virtio marks the device broken, a NIC
  drops the frame), never a host access.  DMA aimed at MMIO is refused rather
  than routed to the device (QEMU's lesson: a DMA into a device's own MMIO
  re-entered its handler);
* writes mark the pages dirty (the EPT's dirty log) and invalidate translated
  code in every vCPU (through the memory's host-write notification), so a
  guest that runs code a device just wrote runs the new code.

``read``/``write`` move bytes; the ``*_u16/u32/u64`` helpers read and write
little-endian scalars, as descriptor rings need.
"""
from __future__ import annotations

import struct

import numpy as np

from devices.base import DmaError
from vmm.memory.ept import LOG, MMIO, PAGE, POOL_FIRST, VALID, Ept, EptViolation, R, Violation, W

MAX_TRANSFER = 64 << 20

__all__ = ["DmaError", "DmaView", "MAX_TRANSFER"]


class DmaView:
    """Bounds-checked guest-physical access for one device (or one bus of them)."""

    def __init__(self, ept: Ept, name: str = "dma"):
        self.ept = ept
        self.name = name
        self.reads = 0
        self.writes = 0
        self.bytes_read = 0
        self.bytes_written = 0

    def _check(self, gpa: int, n: int, access: int) -> None:
        """Raise DmaError unless the whole transfer may happen; ``access`` 0 read, 1 write,
        2 the question ``check`` asks about a write (no violation handler runs)."""
        if gpa < 0 or n < 0 or n > MAX_TRANSFER:
            raise DmaError(gpa, n, "of an impossible length")
        if n == 0:
            return
        entries = self.ept.entries
        first, last = gpa // PAGE, (gpa + n - 1) // PAGE
        if last >= len(entries):
            raise DmaError(gpa, n, "past the end of guest-physical memory")
        if first == last:
            # one page (ring entries, headers, status bytes, a 4 KiB block): the same test on
            # one int, without numpy's per-call cost; anything it does not pass takes the
            # full path below, which names the reason
            e = int(entries[first])
            f = e >> 12
            ept = self.ept
            ram = f < ept.ram_frames or (ept.pool is not None and POOL_FIRST <= f < POOL_FIRST + ept.pool_frames)
            if e & VALID and ram and e & (R if access == 0 else (W | LOG)):
                return
        span = entries[first:last + 1]
        ok = (span & VALID) != 0
        if not ok.all():
            raise DmaError(gpa, n, "into a hole (no RAM there)")
        frames = span >> 12
        ram = frames < self.ept.ram_frames
        if self.ept.pool is not None:
            ram |= (frames >= POOL_FIRST) & (frames < POOL_FIRST + self.ept.pool_frames)
        if not ram.all():
            raise DmaError(gpa, n, "into a region that is not RAM")
        if access == 0 and not ((span & R) != 0).all():
            raise DmaError(gpa, n, "from memory the EPT does not let the guest read")
        if access != 0:
            self._check_writable(gpa, n, first, span, resolve=access == 1)

    def _check_writable(self, gpa: int, n: int, first: int, span, resolve: bool) -> None:
        """Every page of a write must take it (W, or LOG: the dirty log lets the first write
        through).  A page that does not is offered to the EPT's violation handlers first, as a
        CPU store would be (copy-on-write fixes it), so that a page nobody fixes is found
        before a single byte moves, not after the pages before it were written.  Without
        ``resolve`` (``check``) such a page counts as refused: no handler runs."""
        ept = self.ept
        for gpn in np.flatnonzero((span & (W | LOG)) == 0).tolist():
            gpn += first
            at = max(gpa, gpn * PAGE)
            fixed = resolve and ept.handle_violation(Violation(at, "w"))
            if not (fixed and int(ept.entries[gpn]) & (W | LOG)):
                raise DmaError(gpa, n, f"refused by the EPT (no write access to GPA {at:#x})")

    def check(self, gpa: int, n: int, write: bool = False) -> bool:
        """True if a transfer of ``n`` bytes at ``gpa`` would be allowed."""
        try:
            self._check(gpa, n, 2 if write else 0)
        except DmaError:
            return False
        return True

    def _direct(self, gpa: int, n: int, need: int) -> bool:
        """Is [gpa, gpa+n) inside one page of RAM the EPT maps to its own frame with ``need``
        already granted?  Then a transfer is a plain copy (the common case: ring entries,
        headers, status bytes, a 4 KiB block), done without the general path's per-page
        resolution; anything else (holes, MMIO, remapped or pool frames, a first write a
        dirty log must see, violations) takes that path."""
        if n <= 0 or gpa < 0 or (gpa & (PAGE - 1)) + n > PAGE:
            return False
        gpn = gpa >> 12
        ept = self.ept
        if gpn >= ept.ram_frames:
            return False
        e = int(ept.entries[gpn])
        return e >> 12 == gpn and e & (VALID | MMIO | need) == VALID | need

    def read(self, gpa: int, n: int) -> bytes:
        if self._direct(gpa, n, R):
            self.reads += 1
            self.bytes_read += n
            return self.ept.memory.read(gpa, n)
        self._check(gpa, n, 0)
        self.reads += 1
        self.bytes_read += n
        return self.ept.read(gpa, n)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if self._direct(gpa, n, W):
            # what Ept.write ends in for such a page: the bytes, then the host-write
            # notification that drops translated code and logs the page dirty
            self.writes += 1
            self.bytes_written += n
            self.ept.memory.write(gpa, data)
            return
        data = bytes(data)
        self._check(gpa, len(data), 1)
        self.writes += 1
        self.bytes_written += len(data)
        try:
            self.ept.write(gpa, data)
        except EptViolation as e:   # a page the VMM keeps read-only (and no handler fixed)
            raise DmaError(gpa, len(data), f"refused by the EPT ({e})") from None

    def read_u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack("<I", self.read(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]

    def write_u16(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<H", v & 0xFFFF))

    def write_u32(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<I", v & 0xFFFF_FFFF))

    def write_u64(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<Q", v & 0xFFFF_FFFF_FFFF_FFFF))
