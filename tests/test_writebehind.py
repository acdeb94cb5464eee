"""host/images/writebehind.py: a disk whose writes a host thread puts in the file.

The guest must not be able to tell: every read sees every write made before
it, errors of the request itself (range, read-only) come at once, ``flush``
returns only once the data is in the file and synced (base.py's durability
point), a host write error surfaces at the next flush, and the queue is
bounded.  The SIGKILL tests in test_qcow2.py also run behind it.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host.images import ImageError, create, open_image
from host.images.base import BlockImage
from host.images.writebehind import WriteBehind

SIZE = 256 << 10


def _raw(d: str, size: int = SIZE) -> str:
    path = os.path.join(d, "disk.raw")
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 9000), st.integers(0, 255)),
    st.tuples(st.just("read"), st.integers(0, SIZE - 1), st.integers(1, 9000)),
    st.tuples(st.just("discard"), st.integers(0, SIZE // 512 - 1), st.integers(1, 16)),
    st.tuples(st.just("flush"),),
), max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, fmt=st.sampled_from(["raw", "qcow2"]), batch=st.sampled_from([1, 4096, 65536]))
def test_every_read_sees_every_earlier_write(ops, fmt, batch):
    model = bytearray(SIZE)
    with tempfile.TemporaryDirectory() as d:
        if fmt == "raw":
            path = _raw(d)
        else:
            path = os.path.join(d, "disk.qcow2")
            create(path, SIZE, cluster_size=4096)
        im = WriteBehind(open_image(path, True), max_pending=32 << 10, batch=batch)
        for op in ops:
            if op[0] == "write":
                _, off, n, v = op
                n = min(n, SIZE - off)
                data = bytearray([v]) * n
                im.write(off, data)
                data[:] = b"\xAA" * n        # the caller reuses its buffer: the queued copy is not it
                model[off:off + n] = bytes([v]) * n
            elif op[0] == "read":
                _, off, n = op
                n = min(n, SIZE - off)
                assert im.read(off, n) == bytes(model[off:off + n])
            elif op[0] == "discard":
                _, sec, k = op
                off, n = sec * 512, min(k * 512, SIZE - sec * 512)
                im.discard(off, n)
                model[off:off + n] = bytes(n)
            else:
                im.flush()
        assert im.sha256() == open_image_sha(bytes(model))
        im.close()
        with open_image(path) as again:
            assert again.read(0, SIZE) == bytes(model)


def open_image_sha(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def test_flush_puts_every_write_in_the_file_before_it_returns():
    with tempfile.TemporaryDirectory() as d:
        path = _raw(d)
        im = WriteBehind(open_image(path, True), batch=1 << 30)   # the thread is never woken by size
        for i in range(16):
            im.write(i * 4096, bytes([i + 1]) * 4096)
        im.flush()
        assert _file(path)[:16 * 4096] == b"".join(bytes([i + 1]) * 4096 for i in range(16))
        im.close()


def test_writes_reach_the_file_without_a_flush_once_the_guest_stops_writing():
    with tempfile.TemporaryDirectory() as d:
        path = _raw(d)
        im = WriteBehind(open_image(path, True), batch=1 << 30)
        im.write(8192, b"\x5a" * 512)
        deadline = time.monotonic() + 10
        while _file(path)[8192:8704] != b"\x5a" * 512:
            assert time.monotonic() < deadline, "a queued write never reached the file"
            time.sleep(0.01)
        assert im.deferred == 1
        im.close()


def test_request_errors_come_at_once_and_nothing_is_queued():
    with tempfile.TemporaryDirectory() as d:
        path = _raw(d)
        im = WriteBehind(open_image(path, True))
        with pytest.raises(ImageError, match="outside"):
            im.write(SIZE - 100, b"x" * 200)
        im.close()
        ro = WriteBehind(open_image(path, False))
        with pytest.raises(ImageError, match="read-only"):
            ro.write(0, b"x")
        ro.close()
        assert _file(path) == bytes(SIZE)


class _Failing(BlockImage):
    """A disk whose host write fails at one offset (a full file system)."""
    format = "raw"

    def __init__(self, bad: int):
        self.path, self.size, self.writable, self.bad = "full.img", SIZE, True, bad
        self.data = bytearray(SIZE)
        self.flushes = 0

    def read(self, offset, length):
        return bytes(self.data[offset:offset + length])

    def write(self, offset, data):
        if offset <= self.bad < offset + len(data):
            raise OSError(28, "No space left on device")
        self.data[offset:offset + len(data)] = data

    def flush(self):
        self.flushes += 1

    def discard(self, offset, length):
        self.data[offset:offset + length] = bytes(length)

    def close(self):
        pass


def test_a_host_write_error_is_reported_by_the_next_flush_and_only_once():
    inner = _Failing(bad=4096)
    im = WriteBehind(inner, batch=1)
    im.write(0, b"a" * 512)
    im.write(4096, b"b" * 512)       # accepted: the host finds out later
    with pytest.raises(ImageError, match="No space left on device"):
        im.flush()
    assert inner.flushes == 0        # not synced as if it had worked
    im.flush()                       # reported once; the disk goes on
    assert inner.flushes == 1
    assert im.read(0, 1) == b"a"
    im.close()


def test_a_host_write_error_is_reported_by_close():
    im = WriteBehind(_Failing(bad=0), batch=1 << 30)
    im.write(0, b"c" * 512)
    with pytest.raises(ImageError, match="No space left on device"):
        im.close()


class _Slow(_Failing):
    def __init__(self):
        super().__init__(bad=-1)
        self.gate = threading.Event()

    def write(self, offset, data):
        self.gate.wait(10)
        super().write(offset, data)


def test_queued_bytes_are_capped():
    inner = _Slow()
    im = WriteBehind(inner, max_pending=16 << 10, batch=1)
    for i in range(4):
        im.write(i * 4096, b"q" * 4096)          # 16 KiB: at the cap, none waited
    blocked = threading.Thread(target=im.write, args=(65536, b"r" * 4096))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive(), "a write past the cap did not wait for the thread"
    assert im._pending <= 16 << 10
    inner.gate.set()
    blocked.join(10)
    assert not blocked.is_alive()
    assert im.read(65536, 4096) == b"r" * 4096
    im.close()
