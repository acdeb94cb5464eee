"""Port-I/O and MMIO buses.

A bus maps address ranges to devices and refuses overlapping claims.  A
port nobody claims reads as all ones, memory nobody claims as zeros (QEMU's
unassigned I/O and memory, tests/test_hostile_mmu.py), and writes to either
are dropped; both are
counted (``unclaimed_reads``/``unclaimed_writes``, and per port in
``unclaimed_ports``), never raised: a guest probing for hardware that is not
there is normal (Bochs and Firecracker behave the same way).

Access widths are handled here, once, not in each device (QEMU's
MemoryRegionOps ``impl`` sizes, Bochs's per-handler width masks).  A device
declares the widths it implements (``io_sizes`` / ``mmio_sizes``, default:
every width, the device sorts it out itself).  The bus then

* splits an access at the edge of a claim: each piece goes to the claim (or
  the unclaimed space) it falls in, and read pieces are combined little-endian;
* inside a claim, issues naturally aligned accesses of the widest implemented
  size that fits, so a 16-bit OUT to a byte-wide port is two byte writes to
  port and port+1, as on the ISA bus, and a misaligned 32-bit MMIO read of a
  dword-only register file is two dword reads with the bytes picked out;
* for an access narrower than every implemented width, reads the containing
  aligned unit and picks out the bytes (reads); for writes, reads the unit,
  merges the bytes and writes it back.  Devices with a minimum width above a
  byte are register files whose reads have no side effects (APIC, I/O APIC,
  HPET), where this is what the hardware's byte enables amount to.

Every access carries the id of the vCPU that made it (crosvm's
BusAccessInfo).  Devices that need it (the local APIC, whose registers are
per-CPU at one address) set ``wants_vcpu = True`` and get it as a last
argument; others keep the short signatures.

Port dispatch is a flat 64K table of callables built at registration, so an
access to a device that implements every width costs one list index and one
call.  MMIO claims are a sorted list searched with bisect; they can be added,
removed and moved while the machine runs (PCI BARs move them), and the bus
tells its listeners (the vCPU's memory map) when the claimed space changes.
"""
from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devices.base import SIZE_MASK

ALL_IO_SIZES = (1, 2, 4)
ALL_MMIO_SIZES = (1, 2, 4, 8)


class BusError(ValueError):
    """A device registration the bus refuses (overlap, bad range)."""


@dataclass(frozen=True)
class Claim:
    base: int
    length: int
    device: Any
    name: str
    sizes: tuple[int, ...] = ALL_MMIO_SIZES

    @property
    def end(self) -> int:
        return self.base + self.length


def _sizes(device: Any, attr: str, default: tuple[int, ...]) -> tuple[int, ...]:
    s = getattr(device, attr, None)
    if s is None:
        return default
    s = tuple(sorted(set(int(x) for x in s)))
    if not s or any(x not in default for x in s):
        raise BusError(f"{getattr(device, 'name', device)}: {attr} {s} must be a non-empty subset of {default}")
    return s


def split_access(off: int, size: int, sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """Naturally aligned (offset, width) pieces, of implemented widths, covering [off, off+size).

    A piece may be wider than what it covers (when the access is narrower
    than the narrowest width): the caller picks the bytes out.
    """
    out: list[tuple[int, int]] = []
    end = off + size
    a = off
    smallest = sizes[0]
    while a < end:
        for w in reversed(sizes):
            if a % w == 0 and a + w <= end:
                out.append((a, w))
                a += w
                break
        else:
            unit = a - a % smallest
            out.append((unit, smallest))
            a = unit + smallest
    return out


def _adjusted_read(read: Callable[[int, int], int], off: int, size: int, sizes: tuple[int, ...]) -> int:
    value = 0
    for a, w in split_access(off, size, sizes):
        v = read(a, w) & SIZE_MASK[w]
        lo = max(a, off)
        hi = min(a + w, off + size)
        v = (v >> (8 * (lo - a))) & ((1 << (8 * (hi - lo))) - 1)
        value |= v << (8 * (lo - off))
    return value


def _adjusted_write(read: Callable[[int, int], int], write: Callable[[int, int, int], None],
                    off: int, size: int, value: int, sizes: tuple[int, ...]) -> None:
    for a, w in split_access(off, size, sizes):
        lo = max(a, off)
        hi = min(a + w, off + size)
        part = (value >> (8 * (lo - off))) & ((1 << (8 * (hi - lo))) - 1)
        if lo == a and hi == a + w:
            write(a, w, part)
            continue
        mask = ((1 << (8 * (hi - lo))) - 1) << (8 * (lo - a))
        cur = read(a, w) & SIZE_MASK[w]
        write(a, w, (cur & ~mask) | (part << (8 * (lo - a))))


def _io_handlers(device: Any, sizes: tuple[int, ...]) -> tuple[Callable[[int, int, int], int],
                                                               Callable[[int, int, int, int], None]]:
    """(read(port, size, vcpu), write(port, size, value, vcpu)) for a port device."""
    r, w = device.io_read, device.io_write
    if getattr(device, "wants_vcpu", False):
        rd, wr = r, w
    else:
        def rd(port: int, size: int, vcpu: int) -> int:
            return r(port, size)

        def wr(port: int, size: int, value: int, vcpu: int) -> None:
            w(port, size, value)
    return rd, wr


class IoBus:
    """x86 port space: 65536 byte-addressed ports."""

    SIZE = 0x10000

    def __init__(self) -> None:
        self.claims: list[Claim] = []
        self._read: list[Callable[[int, int, int], int] | None] = [None] * self.SIZE
        self._write: list[Callable[[int, int, int, int], None] | None] = [None] * self.SIZE
        self._claim_at: list[Claim | None] = [None] * self.SIZE
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0
        self.unclaimed_ports: Counter[int] = Counter()
        self.accesses = 0

    def register(self, device: Any, base: int, length: int = 1, name: str | None = None) -> None:
        if length <= 0 or base < 0 or base + length > self.SIZE:
            raise BusError(f"port range {base:#x}+{length} is outside 0..0xffff")
        for c in self.claims:
            if base < c.end and c.base < base + length:
                raise BusError(
                    f"ports {base:#x}-{base + length - 1:#x} ({name or device.name}) overlap "
                    f"{c.base:#x}-{c.end - 1:#x} ({c.name})"
                )
        sizes = _sizes(device, "io_sizes", ALL_IO_SIZES)
        claim = Claim(base, length, device, name or getattr(device, "name", type(device).__name__), sizes)
        self.claims.append(claim)
        self.claims.sort(key=lambda c: c.base)
        rd, wr = _io_handlers(device, sizes)
        if sizes != ALL_IO_SIZES:
            rd, wr = self._adjusting(claim, rd, wr)
        for p in range(base, base + length):
            self._read[p] = rd
            self._write[p] = wr
            self._claim_at[p] = claim

    def unregister(self, device: Any) -> None:
        """Release every port range of ``device`` (a PCI I/O BAR that moves)."""
        for c in [c for c in self.claims if c.device is device]:
            self.claims.remove(c)
            for p in range(c.base, c.end):
                self._read[p] = self._write[p] = None
                self._claim_at[p] = None

    def _adjusting(self, claim: Claim, rd, wr):
        """Handlers that split accesses the device's widths do not cover (within its claim)."""
        sizes = claim.sizes

        def read(port: int, size: int, vcpu: int) -> int:
            if size in sizes and port % size == 0 and port + size <= claim.end:
                return rd(port, size, vcpu)
            return _adjusted_read(lambda a, w: self._read_one(a, w, vcpu), port, size, sizes)

        def write(port: int, size: int, value: int, vcpu: int) -> None:
            if size in sizes and port % size == 0 and port + size <= claim.end:
                wr(port, size, value, vcpu)
                return
            _adjusted_write(lambda a, w: self._read_one(a, w, vcpu),
                            lambda a, w, v: self._write_one(a, w, v, vcpu), port, size, value, sizes)
        return read, write

    def _read_one(self, port: int, size: int, vcpu: int) -> int:
        """One access of a width the device implements, or pieces of the unclaimed space."""
        c = self._claim_at[port & 0xFFFF]
        if c is None:
            self.unclaimed_reads += 1
            self.unclaimed_ports[port & 0xFFFF] += 1
            return SIZE_MASK[size]
        rd, _ = _io_handlers(c.device, c.sizes)
        return rd(port, size, vcpu)

    def _write_one(self, port: int, size: int, value: int, vcpu: int) -> None:
        c = self._claim_at[port & 0xFFFF]
        if c is None:
            self.unclaimed_writes += 1
            self.unclaimed_ports[port & 0xFFFF] += 1
            return
        _, wr = _io_handlers(c.device, c.sizes)
        wr(port, size, value & SIZE_MASK[size], vcpu)

    def device_at(self, port: int) -> Any | None:
        c = self._claim_at[port & 0xFFFF]
        return None if c is None else c.device

    def _crosses(self, port: int, size: int) -> bool:
        c = self._claim_at[port]
        return size > 1 and port + size <= self.SIZE and self._claim_at[port + size - 1] is not c

    def read(self, port: int, size: int, vcpu: int = 0) -> int:
        self.accesses += 1
        port &= 0xFFFF
        fn = self._read[port]
        if size > 1 and self._crosses(port, size):
            return self._read_split(port, size, vcpu)
        if fn is None:
            self.unclaimed_reads += 1
            self.unclaimed_ports[port] += 1
            return SIZE_MASK[size]
        return fn(port, size, vcpu) & SIZE_MASK[size]

    def write(self, port: int, size: int, value: int, vcpu: int = 0) -> None:
        self.accesses += 1
        port &= 0xFFFF
        if size > 1 and self._crosses(port, size):
            self._write_split(port, size, value, vcpu)
            return
        fn = self._write[port]
        if fn is None:
            self.unclaimed_writes += 1
            self.unclaimed_ports[port] += 1
            return
        fn(port, size, value & SIZE_MASK[size], vcpu)

    def _pieces(self, port: int, size: int) -> list[tuple[int, int]]:
        out = []
        a, end = port, port + size
        while a < end:
            c = self._claim_at[a]
            b = a + 1
            while b < end and self._claim_at[b] is c:
                b += 1
            out.append((a, b - a))
            a = b
        return out

    def _read_split(self, port: int, size: int, vcpu: int) -> int:
        value = 0
        for a, n in self._pieces(port, size):
            width = n if n in (1, 2, 4) else 1
            for b in range(a, a + n, width):
                value |= self.read(b, width, vcpu) << (8 * (b - port))
        return value

    def _write_split(self, port: int, size: int, value: int, vcpu: int) -> None:
        for a, n in self._pieces(port, size):
            width = n if n in (1, 2, 4) else 1
            for b in range(a, a + n, width):
                self.write(b, width, (value >> (8 * (b - port))) & SIZE_MASK[width], vcpu)


class MmioBus:
    """Guest-physical MMIO regions, each handing offsets to its device.

    ``listeners`` are told ``(base, length, added)`` when a claim appears or
    goes away, so the CPU side can route those pages to the bus.
    """

    def __init__(self) -> None:
        self.claims: list[Claim] = []
        self._bases: list[int] = []
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0
        self.accesses = 0
        self.listeners: list[Callable[[int, int, bool], None]] = []
        # page -> (base, end, sizes, read, write, wants_vcpu) of the claim the last access of that
        # page found: the fast path of ``access``; dropped whenever a claim appears, goes or moves
        self._fast: dict[int, tuple] = {}

    def register(self, device: Any, base: int, length: int, name: str | None = None) -> Claim:
        if length <= 0 or base < 0 or base + length > 1 << 52:
            raise BusError(f"MMIO range {base:#x}+{length} is invalid")
        for c in self.claims:
            if base < c.end and c.base < base + length:
                raise BusError(
                    f"MMIO {base:#x}-{base + length - 1:#x} ({name or device.name}) overlaps "
                    f"{c.base:#x}-{c.end - 1:#x} ({c.name})"
                )
        sizes = _sizes(device, "mmio_sizes", ALL_MMIO_SIZES)
        claim = Claim(base, length, device, name or getattr(device, "name", type(device).__name__), sizes)
        self.claims.append(claim)
        self.claims.sort(key=lambda c: c.base)
        self._bases = [c.base for c in self.claims]
        self._fast.clear()
        for fn in self.listeners:
            fn(base, length, True)
        return claim

    def unregister(self, device: Any, base: int | None = None) -> None:
        """Remove ``device``'s claim at ``base`` (every claim of it if None)."""
        gone = [c for c in self.claims if c.device is device and (base is None or c.base == base)]
        if not gone:
            raise BusError(f"{getattr(device, 'name', device)} has no MMIO claim"
                           + (f" at {base:#x}" if base is not None else ""))
        for c in gone:
            self.claims.remove(c)
        self._bases = [c.base for c in self.claims]
        self._fast.clear()
        for c in gone:
            for fn in self.listeners:
                fn(c.base, c.length, False)

    def move(self, device: Any, old_base: int, new_base: int) -> Claim:
        """Move a claim (a PCI BAR the guest reprogrammed); refused if it would overlap."""
        c = next((c for c in self.claims if c.device is device and c.base == old_base), None)
        if c is None:
            raise BusError(f"{getattr(device, 'name', device)} has no MMIO claim at {old_base:#x}")
        self.unregister(device, old_base)
        try:
            return self.register(device, new_base, c.length, c.name)
        except BusError:
            self.register(device, old_base, c.length, c.name)
            raise

    def find(self, addr: int) -> Claim | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            c = self.claims[i]
            if addr < c.end:
                return c
        return None

    def claimed(self, addr: int) -> bool:
        return self.find(addr) is not None

    # -- dispatch ------------------------------------------------------------------
    @staticmethod
    def _dev_read(c: Claim, off: int, size: int, vcpu: int) -> int:
        d = c.device
        if getattr(d, "wants_vcpu", False):
            return d.mmio_read(off, size, vcpu)
        return d.mmio_read(off, size)

    @staticmethod
    def _dev_write(c: Claim, off: int, size: int, value: int, vcpu: int) -> None:
        d = c.device
        if getattr(d, "wants_vcpu", False):
            d.mmio_write(off, size, value, vcpu)
        else:
            d.mmio_write(off, size, value)

    def _claim_read(self, c: Claim, off: int, size: int, vcpu: int) -> int:
        """``size`` bytes at ``off`` of a claim (any length: pieces at a claim's edge may be 3 bytes)."""
        if size in c.sizes and off % size == 0:
            return self._dev_read(c, off, size, vcpu) & SIZE_MASK[size]
        return _adjusted_read(lambda a, w: self._dev_read(c, a, w, vcpu), off, size, c.sizes)

    def _claim_write(self, c: Claim, off: int, size: int, value: int, vcpu: int) -> None:
        if size in c.sizes and off % size == 0:
            self._dev_write(c, off, size, value & SIZE_MASK[size], vcpu)
            return
        _adjusted_write(lambda a, w: self._dev_read(c, a, w, vcpu),
                        lambda a, w, v: self._dev_write(c, a, w, v & SIZE_MASK[w], vcpu),
                        off, size, value, c.sizes)

    def _pieces(self, addr: int, size: int) -> list[tuple[int, int, Claim | None]]:
        """(address, length, claim or None) covering [addr, addr+size), split at claim edges."""
        out = []
        a, end = addr, addr + size
        while a < end:
            c = self.find(a)
            if c is not None:
                b = min(end, c.end)
            else:
                i = bisect.bisect_right(self._bases, a)
                b = min(end, self._bases[i]) if i < len(self._bases) else end
            out.append((a, b - a, c))
            a = b
        return out

    def read(self, addr: int, size: int, vcpu: int = 0) -> int:
        self.accesses += 1
        c = self.find(addr)
        if c is not None and addr + size <= c.end:
            return self._claim_read(c, addr - c.base, size, vcpu)
        value = 0
        for a, n, c in self._pieces(addr, size):
            if c is None:
                self.unclaimed_reads += 1   # unassigned memory reads zeros, as under QEMU
                continue
            value |= self._claim_read(c, a - c.base, n, vcpu) << (8 * (a - addr))
        return value

    def access(self, is_write: int, addr: int, size: int, value: int, vcpu: int) -> int:
        """One guest access, as the CPU side makes it (``engine.mmio_handler``): the value
        read (0 for a write).  The same as ``read``/``write``, with a fast path for the
        common case, an access that falls inside one claim at a width and alignment its
        device takes: the claim is remembered per page and its device called directly."""
        hit = self._fast.get(addr >> 12)
        if hit is None:
            c = self.find(addr)
            if c is None:
                return self._slow(is_write, addr, size, value, vcpu)
            d = c.device
            hit = self._fast[addr >> 12] = (c.base, c.end, c.sizes, d.mmio_read, d.mmio_write,
                                            bool(getattr(d, "wants_vcpu", False)))
        base, end, sizes, rd, wr, wants = hit
        off = addr - base
        if off < 0 or addr + size > end or size not in sizes or off & (size - 1):   # widths are powers of 2
            return self._slow(is_write, addr, size, value, vcpu)
        self.accesses += 1
        mask = SIZE_MASK[size]
        if is_write:
            if wants:
                wr(off, size, value & mask, vcpu)
            else:
                wr(off, size, value & mask)
            return 0
        return (rd(off, size, vcpu) if wants else rd(off, size)) & mask

    def _slow(self, is_write: int, addr: int, size: int, value: int, vcpu: int) -> int:
        if is_write:
            self.write(addr, size, value, vcpu)
            return 0
        return self.read(addr, size, vcpu)

    def write(self, addr: int, size: int, value: int, vcpu: int = 0) -> None:
        self.accesses += 1
        value &= SIZE_MASK[size]
        c = self.find(addr)
        if c is not None and addr + size <= c.end:
            self._claim_write(c, addr - c.base, size, value, vcpu)
            return
        for a, n, c in self._pieces(addr, size):
            part = (value >> (8 * (a - addr))) & ((1 << (8 * n)) - 1)
            if c is None:
                self.unclaimed_writes += 1
            else:
                self._claim_write(c, a - c.base, n, part, vcpu)
