"""Raw disk images, and a copy-on-write overlay kept in memory.

``RawImage`` is the file itself, byte for byte.  Like QEMU, a file whose
length is not a whole number of sectors is seen as a disk rounded up to the
next sector, the tail reading as zeros.

``MemoryOverlay(base)`` puts any image behind a copy-on-write layer held in
memory, as devices/storage/disk.py did: the guest writes, the base file is
never touched, and a run can be repeated from the same base.

``open_cow(path, overlay)`` is the one call for both kinds of layer: in
memory, or in a qcow2 file whose backing file is ``path`` (a linked clone,
which survives the process and can be reopened).
"""
from __future__ import annotations

import os

from . import qcow2
from .base import DEFAULT_LIMITS, SECTOR, BlockImage, ImageError, Limits, open_image

_ZERO_CHUNK = bytes(1 << 20)


class RawImage(BlockImage):
    format = "raw"

    def __init__(self, fd: int, path: str, writable: bool, limits: Limits = DEFAULT_LIMITS):
        self.path = path
        self.writable = writable
        file_size = os.fstat(fd).st_size
        if file_size > limits.max_size:
            raise ImageError(f"{path}: {file_size} bytes is larger than the {limits.max_size}-byte "
                             f"cap on disk images")
        self.size = -(-file_size // SECTOR) * SECTOR
        self._fd = fd
        self._dirty = False

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        data = os.pread(self._fd, length, offset)
        if len(data) < length:        # the sector-padding tail, or a file shrunk under us
            data += bytes(length - len(data))
        return data

    def write(self, offset: int, data: bytes) -> None:
        self._check_writable()
        self._check_range(offset, len(data))
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n
        self._dirty = True

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        while length:
            n = min(length, len(_ZERO_CHUNK))
            self.write(offset, _ZERO_CHUNK[:n])
            offset += n
            length -= n

    def flush(self) -> None:
        if self._dirty and self._fd >= 0:
            os.fsync(self._fd)
            self._dirty = False

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.flush()
            finally:
                os.close(self._fd)
                self._fd = -1


class MemoryOverlay(BlockImage):
    """Copy-on-write in memory over any image, at ``block``-byte granularity.

    The overlay is writable whatever the base; ``flush`` has nothing to make
    durable (the overlay dies with the process, by design).  ``discard``
    makes blocks read as zeros.  The memory held is capped by
    ``Limits.max_overlay_bytes``: a write beyond it raises ``ImageError``."""

    format = "overlay"

    def __init__(self, base: BlockImage, block: int = 4096, limits: Limits = DEFAULT_LIMITS):
        if block <= 0 or block % SECTOR or block & (block - 1):
            raise ValueError("overlay block must be a power-of-two multiple of 512")
        self.base = base
        self.path = base.path
        self.size = base.size
        self.writable = True
        self.block = block
        self._max_blocks = limits.max_overlay_bytes // block
        self._blocks: dict[int, bytes] = {}
        self._zero_block = bytes(block)

    @property
    def overlay_bytes(self) -> int:
        return len(self._blocks) * self.block

    def _block_content(self, index: int) -> bytes:
        got = self._blocks.get(index)
        if got is not None:
            return got
        start = index * self.block
        data = self.base.read(start, min(self.block, self.size - start))
        return data + bytes(self.block - len(data))

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        if not self._blocks:
            return self.base.read(offset, length)
        out = bytearray()
        end = offset + length
        pos = offset
        while pos < end:
            index, inner = divmod(pos, self.block)
            n = min(self.block - inner, end - pos)
            got = self._blocks.get(index)
            if got is None:
                # Read the base in one go up to the next overlaid block.
                stop = pos + n
                while stop < end and (stop // self.block) not in self._blocks:
                    stop = min(end, (stop // self.block + 1) * self.block)
                out += self.base.read(pos, stop - pos)
                pos = stop
                continue
            out += got[inner:inner + n]
            pos += n
        return bytes(out)

    def _store(self, index: int, content: bytes) -> None:
        if index not in self._blocks and len(self._blocks) >= self._max_blocks:
            raise ImageError(f"{self.path}: the in-memory overlay is full "
                             f"({self._max_blocks * self.block} bytes)")
        self._blocks[index] = content

    def write(self, offset: int, data: bytes) -> None:
        self._check_range(offset, len(data))
        pos, end, src = offset, offset + len(data), 0
        while pos < end:
            index, inner = divmod(pos, self.block)
            n = min(self.block - inner, end - pos)
            if n == self.block:
                self._store(index, bytes(data[src:src + n]))
            else:
                block = bytearray(self._block_content(index))
                block[inner:inner + n] = data[src:src + n]
                self._store(index, bytes(block))
            pos += n
            src += n

    def discard(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        pos, end = offset, offset + length
        while pos < end:
            index, inner = divmod(pos, self.block)
            n = min(self.block - inner, end - pos)
            if n == self.block:
                self._store(index, self._zero_block)
            else:
                self.write(pos, bytes(n))
            pos += n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._blocks.clear()
        self.base.close()


def open_cow(path: str | os.PathLike[str], overlay: str | os.PathLike[str] | None = None, *,
             fmt: str | None = None, limits: Limits = DEFAULT_LIMITS) -> BlockImage:
    """The image at ``path``, opened read-only behind a copy-on-write layer:
    in memory if ``overlay`` is None, else the qcow2 file ``overlay`` (made
    with ``path`` as its backing file if it does not exist yet)."""
    if overlay is None:
        return MemoryOverlay(open_image(path, False, fmt, limits=limits), limits=limits)
    overlay = os.fspath(overlay)
    if not os.path.exists(overlay):
        qcow2.create(overlay, backing=os.path.abspath(path), backing_fmt=fmt, limits=limits)
    return open_image(overlay, True, "qcow2", limits=limits)
