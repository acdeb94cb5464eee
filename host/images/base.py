"""The block-device interface every disk image format implements, and format detection.

A ``BlockImage`` is a flat array of ``size`` bytes as the guest sees it:

* ``read(offset, length)`` and ``write(offset, data)`` at any byte offset
  and length inside ``[0, size)``; device models work in sectors, the
  image does not care.
* ``flush()`` is the durability point: once it returns, every write made
  before it survives the process being killed (SIGKILL) and, since it ends
  with ``fsync``, the host losing power.  Writes not yet flushed may or may
  not have landed, but the image is consistent either way.
* ``discard(offset, length)`` makes the range read as zeros and lets the
  format give the space back.  (Devices may promise less to a guest; the
  image promises zeros so that replay stays deterministic.)
* ``sha256()`` names the guest-visible content (the same for a raw file and
  its qcow2 conversion), so the event log can name an image by what a guest
  reads from it.  It reads the whole virtual disk, so it costs time in
  proportion to ``size``; unallocated qcow2 ranges are hashed without I/O.

``open_image(path, writable, fmt=None)`` picks the format: the qcow2 magic
``QFI\\xfb`` means qcow2, anything else is raw (a raw image that starts with
those bytes is read as qcow2 unless ``fmt="raw"`` is given; QEMU has the same
trap and the same answer).  Everything that is wrong with a file is an
``ImageError`` whose message is one line naming the file.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Self

SECTOR = 512
QCOW2_MAGIC = b"QFI\xfb"
_HASH_CHUNK = 1 << 20
_ZEROS = bytes(_HASH_CHUNK)


class ImageError(Exception):
    """An image that cannot be used, or a request it cannot serve; one line of text."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class Limits:
    """Caps checked before any work is done, so a hostile image cannot make us
    allocate without bound.  The defaults follow QEMU's own implementation
    limits where it has them (32 MiB L1 table, 8 MiB refcount table)."""

    max_size: int = 2 << 40              # largest virtual disk accepted (2 TiB)
    max_l1_bytes: int = 32 << 20
    max_refcount_table_bytes: int = 8 << 20
    cache_bytes: int = 16 << 20          # L2 tables + refcount blocks kept in memory
    max_backing_depth: int = 16
    max_overlay_bytes: int = 1 << 30     # an in-memory copy-on-write overlay


DEFAULT_LIMITS = Limits()


class BlockImage(ABC):
    """A disk image as the guest sees it: ``size`` bytes, read and written by byte range."""

    path: str
    format: str
    size: int
    writable: bool

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes: ...

    @abstractmethod
    def write(self, offset: int, data: bytes) -> None: ...

    @abstractmethod
    def flush(self) -> None: ...

    @abstractmethod
    def discard(self, offset: int, length: int) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def zero_ranges(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Split ``[offset, offset+length)`` into runs ``(start, length, known_zero)``.

        A format that knows where its holes are says so, and ``sha256`` hashes
        those runs without reading them.  The default knows nothing."""
        return [(offset, length, False)]

    def sha256(self) -> str:
        h = hashlib.sha256()
        pos = 0
        while pos < self.size:
            n = min(_HASH_CHUNK, self.size - pos)
            for start, length, zero in self.zero_ranges(pos, n):
                h.update(_ZEROS[:length] if zero else self.read(start, length))
            pos += n
        return h.hexdigest()

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(f"{self.path}: access [{offset:#x}, +{length:#x}) outside the "
                             f"{self.size:#x}-byte disk")

    def _check_writable(self) -> None:
        if not self.writable:
            raise ImageError(f"{self.path}: the image is open read-only")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular_file(path: str, writable: bool) -> int:
    """Open ``path`` as an image file: a regular file, non-empty, locked.

    The file is opened non-blocking and checked with ``fstat`` on the open
    descriptor, so a FIFO never blocks us and a file swapped for something
    else between a ``stat`` and the ``open`` is still caught.  A writable open
    takes an exclusive ``flock`` and a read-only one a shared lock, so two of
    our processes never write one image, and a base image in use by an
    overlay cannot be opened for writing."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path}: {_kind(st.st_mode)}, not a regular file")
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{path}: {_kind(st.st_mode)}, not a regular file")
        if st.st_size == 0:
            raise ImageError(f"{path}: the file is empty")
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ImageError(f"{path}: the image is in use by another process") from None
            raise
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def detect_format(fd: int) -> str:
    return "qcow2" if os.pread(fd, 4, 0) == QCOW2_MAGIC else "raw"


def open_image(path: str | os.PathLike[str], writable: bool = False, fmt: str | None = None, *,
               limits: Limits = DEFAULT_LIMITS) -> BlockImage:
    """Open a disk image, detecting its format unless ``fmt`` ('raw' or 'qcow2') is given."""
    return _open_chain(os.fspath(path), writable, fmt, limits, ())


def _open_chain(path: str, writable: bool, fmt: str | None, limits: Limits,
                chain: tuple[str, ...]) -> BlockImage:
    """Open one link of a backing chain; ``chain`` holds the real paths of the
    images that (transitively) use this one as their backing file."""
    from . import qcow2, raw

    if fmt not in (None, "raw", "qcow2"):
        raise ImageError(f"{path}: unknown image format {fmt!r} (raw or qcow2)")
    real = os.path.realpath(path)
    if real in chain:
        raise ImageError(f"{path}: loop in the backing chain ({' -> '.join(chain + (real,))})")
    if len(chain) > limits.max_backing_depth:
        raise ImageError(f"{path}: backing chain deeper than {limits.max_backing_depth}")
    fd = open_regular_file(path, writable)
    try:
        kind = fmt or detect_format(fd)
        if kind == "qcow2":
            return qcow2.Qcow2Image(fd, path, writable, limits,
                                    lambda p, f: _open_chain(p, False, f, limits, chain + (real,)))
        return raw.RawImage(fd, path, writable, limits)
    except BaseException:
        os.close(fd)
        raise
