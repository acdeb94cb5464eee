"""Writes handed to a host thread, as QEMU hands them to its thread pool.

``WriteBehind(image)`` is the same disk as ``image``: a write is checked
(range, read-only) at once, its bytes are copied, and a host thread puts them
in the file while the vCPU runs on.  Under QEMU the vCPU thread likewise only
queues a guest's write (``aio=threads``, the default) and a worker thread
makes the ``pwrite``; on a machine with a second core the kernel's share of a
write (page cache allocation, the copy) then costs the guest no time.

Nothing the guest can see depends on the thread: a device completes a
request when it decides to (devices/virtio/blk.py, devices/storage), not when
the host file has it, and every other operation (read, flush, discard, the
hash, close) first waits until the queue is empty, so it sees every write
made before it, in order, and never runs beside the thread.  Only one
thread touches the wrapped image at a time, so it needs no locking of its own.

Durability is the image's (base.py): ``flush`` returns once every earlier
write is in the file and the file is synced.  A queued write that fails on
the host (a full file system) cannot fail its request any more; like a disk
with a volatile write cache, the error is reported by the next ``flush``
(a guest's FLUSH gets an I/O error) and by ``close``, and the first one is
kept until then.  Queued bytes are capped (``max_pending``): a write that
would pass the cap waits for the thread, so memory stays bounded.
"""
from __future__ import annotations

import atexit
import threading
from collections import deque

from .base import BlockImage, ImageError

DEFAULT_MAX_PENDING = 16 << 20
DEFAULT_BATCH = 256 << 10       # the thread is woken once this much is queued ...
STALE_SECONDS = 0.05            # ... or once the oldest queued write is this old


def _runs(items: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """The writes in order, each run of writes that continue one another joined into one."""
    out: list[tuple[int, bytes]] = []
    parts: list[bytes] = []
    start = end = -1
    for offset, data in items:
        if offset != end:
            if parts:
                out.append((start, b"".join(parts)))
            parts, start = [], offset
        parts.append(data)
        end = offset + len(data)
    if parts:
        out.append((start, b"".join(parts)))
    return out


class WriteBehind(BlockImage):
    def __init__(self, image: BlockImage, max_pending: int = DEFAULT_MAX_PENDING, batch: int = DEFAULT_BATCH):
        self.image = image
        self.path = image.path
        self.format = image.format
        self.size = image.size
        self.writable = image.writable
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, bytes]] = deque()
        self._pending = 0            # bytes queued or being written
        self._taken = 0              # ... of which the thread is writing now
        self._wanted = False         # someone waits for the queue to empty
        self.batch = batch
        self._error: ImageError | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.deferred = 0            # writes the thread made (statistics and tests)

    # -- the queue ------------------------------------------------------------------------
    def write(self, offset: int, data: bytes) -> None:
        self._check_writable()
        self._check_range(offset, len(data))
        if not data:
            return
        data = bytes(data)           # the caller's buffer may be guest memory, which moves on
        n = len(data)
        with self._cond:
            if self._thread is None:
                if self._stopping:
                    raise ImageError(f"{self.path}: the image is closed")
                self._thread = threading.Thread(target=self._work, name=f"write-behind {self.path}",
                                                daemon=True)
                self._thread.start()
                atexit.register(self.drain)       # a script that never closes its disk loses nothing
            while self._pending and self._pending + n > self.max_pending:
                self._wanted = True
                self._cond.notify_all()
                self._cond.wait()
            self._queue.append((offset, data))
            self._pending += n
            if self._pending - self._taken >= self.batch:
                self._cond.notify_all()       # waking the thread costs a context switch: not per write

    def _work(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while True:
                    queued = self._pending - self._taken
                    if queued and (queued >= self.batch or self._wanted or self._stopping):
                        break
                    if not queued and self._stopping:
                        return
                    if not cond.wait(STALE_SECONDS if queued else None) and self._queue:
                        break                 # the guest stopped writing: put what it wrote in the file
                items = list(self._queue)
                self._queue.clear()
                self._taken += sum(len(d) for _, d in items)
            for offset, data in _runs(items):
                try:
                    self.image.write(offset, data)
                except (ImageError, OSError) as e:
                    if self._error is None:
                        self._error = e if isinstance(e, ImageError) else ImageError(
                            f"{self.path}: write at {offset:#x} failed: {e.strerror or e}")
            with cond:
                done = sum(len(d) for _, d in items)
                self._pending -= done
                self._taken -= done
                self.deferred += len(items)
                if not self._pending:
                    self._wanted = False
                cond.notify_all()

    def drain(self) -> None:
        """Wait until every queued write is in the image."""
        with self._cond:
            while self._pending:
                self._wanted = True
                self._cond.notify_all()
                self._cond.wait()

    def _take_error(self) -> None:
        err, self._error = self._error, None
        if err is not None:
            raise err

    # -- everything else waits for the queue ----------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        if self._pending:
            self.drain()
        return self.image.read(offset, length)

    def flush(self) -> None:
        self.drain()
        self._take_error()
        self.image.flush()

    def discard(self, offset: int, length: int) -> None:
        self.drain()
        self.image.discard(offset, length)

    def zero_ranges(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self.drain()
        return self.image.zero_ranges(offset, length)

    def sha256(self) -> str:
        self.drain()
        return self.image.sha256()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
            atexit.unregister(self.drain)
        try:
            self._take_error()
        finally:
            self.image.close()

    def __getattr__(self, name: str):
        # what a format offers beyond BlockImage (qcow2's check, a raw file's descriptor ...),
        # once the queue is empty
        if name.startswith("_") or name == "image":
            raise AttributeError(name)
        self.drain()
        return getattr(self.image, name)
