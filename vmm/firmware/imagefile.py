"""Reading the files a machine is built from (images, kernels, initrds), with
the limits checked before any byte is read.

Every image is read whole into host memory, so the file must be a regular
file of a size that fits: ``vmm run /dev/zero`` would grow without end, a
FIFO would block forever, and a directory or a device is no image.  The file
is opened without blocking (a FIFO's open waits for a writer otherwise) and
its type and size come from that open file (fstat), so nothing can swap it in
between.  A refusal is an ``OSError`` whose ``strerror`` is one line, so the
callers' existing "cannot read X: <strerror>" messages cover it.
"""
from __future__ import annotations

import errno
import os
import stat

MAX_IMAGE = 4 << 30      # the largest image read into memory (a boot disk; RAM itself is at most 3 GiB)

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path):
    """``path`` opened for binary reading, if it is a regular file (OSError otherwise, with a
    one-line strerror).  Opened without blocking, so a FIFO is refused, not waited on."""
    if isinstance(path, str) and "\0" in path:
        raise OSError(errno.EINVAL, "the path holds a NUL byte", path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file ({_kind(st.st_mode)})", path)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return f


READ_CHUNK = 1 << 20


def read_file(path: str, max_size: int = MAX_IMAGE, what: str = "an image") -> bytes:
    """The bytes of the regular file ``path``, at most ``max_size`` of them; OSError
    (one-line strerror) for anything else, before reading.  ``what`` names the file in
    the size refusal ("an image", "a BIOS image", ...)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_size:
            raise OSError(errno.EFBIG, f"{size:,} bytes, more than the {max_size:,} {what} may have", path)
        # read by pieces: f.read(max_size + 1) would reserve max_size bytes up front (4 GiB,
        # a MemoryError under a memory limit) whatever the file's size
        parts, total = [], 0
        while total <= max_size:
            part = f.read(min(READ_CHUNK, max_size + 1 - total))
            if not part:
                break
            parts.append(part)
            total += len(part)
    if total > max_size:  # it grew while being read
        raise OSError(errno.EFBIG, f"more than the {max_size:,} bytes {what} may have", path)
    return b"".join(parts)
