"""Disk images with a copy-on-write overlay.

A guest's writes never touch the base image: written sectors live in an
overlay (in memory), so a run is repeatable and the image is an input that
can be named by its content hash.
"""
from __future__ import annotations

import hashlib
import os

SECTOR = 512


class DiskImageError(ValueError):
    """An image file that cannot be used as a disk."""


class DiskImage:
    def __init__(self, data: bytes, name: str = "disk"):
        if not data:
            raise DiskImageError(f"{name}: the image is empty")
        pad = (-len(data)) % SECTOR
        self._base = bytes(data) + b"\0" * pad
        self.name = name
        self.overlay: dict[int, bytes] = {}
        self.reads = 0
        self.writes = 0

    @classmethod
    def open(cls, path: str) -> DiskImage:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise DiskImageError(f"cannot read disk image {path}: {e.strerror}") from None
        return cls(data, os.path.basename(path))

    @property
    def sectors(self) -> int:
        return len(self._base) // SECTOR

    @property
    def size(self) -> int:
        return len(self._base)

    def sha256(self) -> str:
        return hashlib.sha256(self._base).hexdigest()

    def read(self, lba: int, count: int) -> bytes | None:
        """``count`` sectors from ``lba``, or None if the range is outside the disk."""
        if lba < 0 or count < 0 or lba + count > self.sectors:
            return None
        self.reads += count
        out = bytearray()
        for s in range(lba, lba + count):
            o = self.overlay.get(s)
            out += o if o is not None else self._base[s * SECTOR:(s + 1) * SECTOR]
        return bytes(out)

    def write(self, lba: int, data: bytes) -> bool:
        count = len(data) // SECTOR
        if lba < 0 or lba + count > self.sectors or len(data) % SECTOR:
            return False
        self.writes += count
        for i in range(count):
            self.overlay[lba + i] = bytes(data[i * SECTOR:(i + 1) * SECTOR])
        return True
