"""Port-I/O and MMIO buses.

A bus maps address ranges to devices and refuses overlapping claims.  An
access nobody claims reads as all ones and writes are dropped; both are
counted (``unclaimed_reads``/``unclaimed_writes``, and per port in
``unclaimed_ports``), never raised: a guest probing for hardware that is not
there is normal (Bochs and Firecracker behave the same way).

Port dispatch is a flat 64K table of bound methods, built at registration, so
an access costs one list index and one call.
"""
from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devices.base import SIZE_MASK


class BusError(ValueError):
    """A device registration the bus refuses (overlap, bad range)."""


@dataclass(frozen=True)
class Claim:
    base: int
    length: int
    device: Any
    name: str

    @property
    def end(self) -> int:
        return self.base + self.length


class IoBus:
    """x86 port space: 65536 byte-addressed ports."""

    SIZE = 0x10000

    def __init__(self) -> None:
        self.claims: list[Claim] = []
        self._read: list[Callable[[int, int], int] | None] = [None] * self.SIZE
        self._write: list[Callable[[int, int, int], None] | None] = [None] * self.SIZE
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
        claim = Claim(base, length, device, name or getattr(device, "name", type(device).__name__))
        self.claims.append(claim)
        self.claims.sort(key=lambda c: c.base)
        for p in range(base, base + length):
            self._read[p] = device.io_read
            self._write[p] = device.io_write

    def device_at(self, port: int) -> Any | None:
        for c in self.claims:
            if c.base <= port < c.end:
                return c.device
        return None

    def read(self, port: int, size: int) -> int:
        self.accesses += 1
        fn = self._read[port & 0xFFFF]
        if fn is None:
            self.unclaimed_reads += 1
            self.unclaimed_ports[port & 0xFFFF] += 1
            return SIZE_MASK[size]
        return fn(port, size) & SIZE_MASK[size]

    def write(self, port: int, size: int, value: int) -> None:
        self.accesses += 1
        fn = self._write[port & 0xFFFF]
        if fn is None:
            self.unclaimed_writes += 1
            self.unclaimed_ports[port & 0xFFFF] += 1
            return
        fn(port, size, value & SIZE_MASK[size])


class MmioBus:
    """Guest-physical MMIO regions, each handing offsets to its device."""

    def __init__(self) -> None:
        self.claims: list[Claim] = []
        self._bases: list[int] = []
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0

    def register(self, device: Any, base: int, length: int, name: str | None = None) -> None:
        if length <= 0 or base < 0:
            raise BusError(f"MMIO range {base:#x}+{length} is invalid")
        for c in self.claims:
            if base < c.end and c.base < base + length:
                raise BusError(
                    f"MMIO {base:#x}-{base + length - 1:#x} ({name or device.name}) overlaps "
                    f"{c.base:#x}-{c.end - 1:#x} ({c.name})"
                )
        claim = Claim(base, length, device, name or getattr(device, "name", type(device).__name__))
        self.claims.append(claim)
        self.claims.sort(key=lambda c: c.base)
        self._bases = [c.base for c in self.claims]

    def find(self, addr: int) -> Claim | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            c = self.claims[i]
            if addr < c.end:
                return c
        return None

    def read(self, addr: int, size: int) -> int:
        c = self.find(addr)
        if c is None:
            self.unclaimed_reads += 1
            return SIZE_MASK[size]
        return c.device.mmio_read(addr - c.base, size) & SIZE_MASK[size]

    def write(self, addr: int, size: int, value: int) -> None:
        c = self.find(addr)
        if c is None:
            self.unclaimed_writes += 1
            return
        c.device.mmio_write(addr - c.base, size, value & SIZE_MASK[size])
