"""Guest physical memory: RAM backed by one host buffer.

The buffer is a page-aligned numpy array that the vCPU maps into Unicorn with
``mem_map_ptr``, so the guest and the VMM see the same bytes without copies.
Accesses outside RAM raise ``GuestMemoryError`` (a VMM bug or a bad image,
never a host crash: every index is bounds-checked here).

Host writes do not invalidate Unicorn's translated code (UNICORN.md section
6), so every write that may land on guest code goes through ``write`` and
notifies ``on_host_write`` (the vCPU drops cached translations there).
"""
from __future__ import annotations

import mmap
from collections.abc import Callable

import numpy as np

PAGE = 4096


class GuestMemoryError(ValueError):
    """A guest-physical access outside RAM."""


class GuestMemory:
    def __init__(self, size: int):
        if size <= 0 or size % PAGE:
            raise GuestMemoryError(f"RAM size must be a positive multiple of 4 KiB, not {size}")
        self.size = size
        # anonymous mmap: page aligned and zero filled, as Unicorn requires
        self._mmap = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.ram = np.frombuffer(self._mmap, dtype=np.uint8)
        self._address = self.ram.ctypes.data       # the mapping never moves; asking numpy costs ~us
        self.on_host_write: Callable[[int, int], None] | None = None

    # -- raw byte access ------------------------------------------------------
    def _check(self, pa: int, n: int) -> None:
        if pa < 0 or n < 0 or pa + n > self.size:
            raise GuestMemoryError(f"guest-physical access {pa:#x}+{n} is outside RAM (size {self.size:#x})")

    def read(self, pa: int, n: int) -> bytes:
        self._check(pa, n)
        return self._mmap[pa : pa + n]        # the mapping's own slice: a quarter of numpy's cost

    def write(self, pa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        self._check(pa, n)
        self._mmap[pa : pa + n] = data if not isinstance(data, memoryview) else data.cast("B")
        if self.on_host_write is not None:
            self.on_host_write(pa, n)

    def fill(self, pa: int, n: int, value: int = 0) -> None:
        self._check(pa, n)
        self.ram[pa : pa + n] = value
        if self.on_host_write is not None:
            self.on_host_write(pa, n)

    # -- little-endian scalars (the page walker's PhysMem protocol) -----------
    def read_u8(self, pa: int) -> int:
        self._check(pa, 1)
        return int(self.ram[pa])

    def read_u16(self, pa: int) -> int:
        return int.from_bytes(self.read(pa, 2), "little")

    def read_u32(self, pa: int) -> int:
        return int.from_bytes(self.read(pa, 4), "little")

    def read_u64(self, pa: int) -> int:
        return int.from_bytes(self.read(pa, 8), "little")

    def write_u8(self, pa: int, v: int) -> None:
        self._check(pa, 1)
        self.ram[pa] = v & 0xFF
        if self.on_host_write is not None:
            self.on_host_write(pa, 1)

    def write_u16(self, pa: int, v: int) -> None:
        self._check(pa, 2)
        self.ram[pa : pa + 2] = np.frombuffer((v & 0xFFFF).to_bytes(2, "little"), dtype=np.uint8)
        if self.on_host_write is not None:
            self.on_host_write(pa, 2)

    def write_u32(self, pa: int, v: int) -> None:
        self._check(pa, 4)
        self.ram[pa : pa + 4] = np.frombuffer((v & 0xFFFF_FFFF).to_bytes(4, "little"), dtype=np.uint8)
        if self.on_host_write is not None:
            self.on_host_write(pa, 4)

    def write_u64(self, pa: int, v: int) -> None:
        self._check(pa, 8)
        self.ram[pa : pa + 8] = np.frombuffer(
            (v & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"), dtype=np.uint8
        )
        if self.on_host_write is not None:
            self.on_host_write(pa, 8)

    # -- saved state -------------------------------------------------------------
    def save_state(self) -> dict:
        """Every page that is not all zeros (guest RAM is mostly untouched)."""
        used = np.flatnonzero(self.ram.view(np.uint64).reshape(-1, PAGE // 8).any(axis=1)).astype("<u4")
        data = self.ram.reshape(-1, PAGE)[used].tobytes()
        return {"kind": "ram", "version": 1, "size": self.size, "pages": used.tobytes(), "data": data}

    def load_state(self, st: dict) -> None:
        from devices.base import DeviceStateError

        if not isinstance(st, dict) or st.get("kind") != "ram" or st.get("version") != 1:
            raise DeviceStateError("ram: not a RAM state of version 1")
        if st.get("size") != self.size:
            raise DeviceStateError(f"ram: saved RAM is {st.get('size')} bytes, this machine has {self.size}")
        pages, data = st.get("pages"), st.get("data")
        if not isinstance(pages, bytes) or not isinstance(data, bytes) or len(pages) % 4 \
                or len(data) != len(pages) // 4 * PAGE:
            raise DeviceStateError("ram: page list and page data do not agree")
        idx = np.frombuffer(pages, dtype="<u4").astype(np.int64)
        if idx.size and (idx.max() >= self.size // PAGE):
            raise DeviceStateError("ram: a saved page lies beyond the end of RAM")
        self.ram[:] = 0
        if idx.size:
            self.ram.reshape(-1, PAGE)[idx] = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE)
        if self.on_host_write is not None:
            self.on_host_write(0, self.size)

    def address(self) -> int:
        """Host address of the buffer, for mapping into the CPU core."""
        return self._address
