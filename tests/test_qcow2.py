"""Disk images: qcow2 against a raw-image model (a bytearray), with QEMU's
own tools as the referee where they are installed (Debian's qemu-utils).

* Property tests: random writes, discards, flushes and reopens, on images of
  several cluster sizes, refcount widths and versions, and on linked clones;
  afterwards the image reads as the model, our own check and ``qemu-img
  check`` find it clean, and ``qemu-img convert -O raw`` gives the model.
* Images made by QEMU (plain, compressed, v2, overlays written by qemu-io)
  read back what QEMU wrote.
* Broken images are refused with one line each.
* Crash consistency: a child process writing and flushing is killed with
  SIGKILL at a chosen I/O call (every point reachable; a write may be cut
  between pages first, as a fatal signal cuts it) or at a random moment;
  the image stays consistent and every flushed write reads back.

QCOW2_LONG=1 runs many more examples (minutes instead of seconds).
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from host.images import (
    DEFAULT_LIMITS,
    ImageError,
    Limits,
    MemoryOverlay,
    RawImage,
    create,
    open_cow,
    open_image,
)

LONG = os.environ.get("QCOW2_LONG", "") not in ("", "0")
QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
NO_QEMU = "qemu-img/qemu-io not installed (apt-get install qemu-utils)"


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


KILL_SIZE = 1 << 20


def kill_ops(seed: int, count: int, cluster: int) -> list[tuple]:
    r = random.Random(seed)
    ops: list[tuple] = []
    for _ in range(count):
        x = r.random()
        off = r.randrange(KILL_SIZE)
        if r.random() < 0.5:
            off = off // cluster * cluster
        n = min(KILL_SIZE - off, r.randrange(1, 3 * cluster))
        if x < 0.6:
            ops.append(("write", off, n, r.randrange(1 << 30)))
        elif x < 0.75:
            ops.append(("discard", off, n))
        else:
            ops.append(("flush",))
    ops.append(("flush",))
    return ops


def run_kill_ops(path: str, seed: int, count: int, cluster: int, small_cache: bool, note,
                 behind: bool = False) -> None:
    """Open the image and run the ops for ``seed``, calling ``note`` with
    ``F i`` once the flush that is op ``i`` has returned and ``O i`` after
    any other op.  With ``behind`` the image is behind a write-behind queue
    (host/images/writebehind.py, as ``vmm run`` opens a writable disk), whose
    thread makes the writes, a few at a time."""
    im = open_image(path, True, limits=Limits(cache_bytes=1) if small_cache else Limits())
    if behind:
        from host.images.writebehind import WriteBehind
        im = WriteBehind(im, batch=3 * 4096)
    note("READY")
    for i, op in enumerate(kill_ops(seed, count, cluster)):
        if op[0] == "write":
            im.write(op[1], pattern(op[3], op[2]))
        elif op[0] == "discard":
            im.discard(op[1], op[2])
        else:
            im.flush()
            note(f"F {i}")
            continue
        note(f"O {i}")
    im.close()


def _child(path: str, seed: int, count: int, cluster: int, kill_at: int, small_cache: int,
           torn: int = 0, behind: int = 0) -> None:
    """Run in a child process: the ops for ``seed``, printing ``F i`` once the
    flush that is op ``i`` has returned; with ``kill_at`` > 0, SIGKILL itself
    just before its ``kill_at``-th write, truncate or fsync.  A small cache
    makes metadata reach the file between flushes too (evictions).  With
    ``torn``, a write that crosses a page boundary is cut at the middle one
    of its boundaries before the kill: a fatal signal ends a write to a
    regular file between pages, keeping those already copied."""
    if kill_at > 0:
        calls = [0]
        real_pwrite, page = os.pwrite, os.sysconf("SC_PAGESIZE")

        def counted(fn):
            def wrapper(*args):
                calls[0] += 1
                if calls[0] == kill_at:
                    if torn and fn is real_pwrite:
                        fd, data, offset = args
                        bounds = range(offset // page * page + page, offset + len(data), page)
                        if bounds:
                            fn(fd, memoryview(data)[:bounds[len(bounds) // 2] - offset], offset)
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*args)
            return wrapper

        os.pwrite = counted(os.pwrite)
        os.fsync = counted(os.fsync)
        os.ftruncate = counted(os.ftruncate)
    run_kill_ops(path, seed, count, cluster, small_cache, lambda mark: print(mark, flush=True), bool(behind))
    print("DONE", flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    # The crash tests' child process: run before pytest and hypothesis are
    # imported, so that it starts in a tenth of a second.
    _child(sys.argv[2], *(int(x) for x in sys.argv[3:]))
    sys.exit(0)

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def _examples(short: int, long: int) -> int:
    return long if LONG else short


# -- helpers -----------------------------------------------------------------------------


def qemu_check(path: str, allow_leaks: bool = False) -> None:
    """``qemu-img check`` must find no corruption (and no leaks unless allowed).
    Without qemu-img the assertion is skipped; test_qemu_tools_present says so."""
    if QEMU_IMG is None:
        return
    p = subprocess.run([QEMU_IMG, "check", "-f", "qcow2", path], check=False, capture_output=True, text=True)
    ok = {0, 3} if allow_leaks else {0}
    assert p.returncode in ok, f"qemu-img check rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    assert "ERROR" not in p.stdout and "corruptions" not in p.stdout, p.stdout


def qemu_raw(path: str) -> bytes | None:
    if QEMU_IMG is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.raw")
        subprocess.run([QEMU_IMG, "convert", "-O", "raw", path, out], check=True, capture_output=True)
        with open(out, "rb") as f:
            return f.read()


def qemu(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True)


def apply_ops(im, model: bytearray, ops, path: str, reopen=None):
    for op in ops:
        kind = op[0]
        if kind == "write":
            _, off, n, seed = op
            data = pattern(seed, n)
            im.write(off, data)
            model[off:off + n] = data
        elif kind == "discard":
            _, off, n = op
            im.discard(off, n)
            model[off:off + n] = bytes(n)
        elif kind == "flush":
            im.flush()
        elif kind == "reopen":
            im.close()
            im = reopen() if reopen else open_image(path, True)
        elif kind == "read":
            _, off, n = op
            assert im.read(off, n) == bytes(model[off:off + n])
    return im


def assert_consistent(path: str, model: bytes) -> None:
    with open_image(path) as im:
        assert im.read(0, im.size) == model
        result = im.check()
        assert result.clean, result
    qemu_check(path)
    got = qemu_raw(path)
    if got is not None:
        assert got == model


# -- strategies --------------------------------------------------------------------------

SETTINGS = {"deadline": None, "database": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


@st.composite
def geometry(draw):
    cluster_bits = draw(st.sampled_from([9, 12, 16]))
    version = draw(st.sampled_from([2, 3]))
    refcount_bits = 16 if version == 2 else draw(st.sampled_from([1, 4, 16, 64]))
    clusters = draw(st.integers(1, 48 if cluster_bits == 16 else 160))
    tail = draw(st.integers(0, (1 << cluster_bits) // 512 - 1))   # a last cluster that is partial
    size = max(512, (clusters << cluster_bits) - tail * 512)
    return cluster_bits, version, refcount_bits, size


@st.composite
def op_list(draw, size: int, cluster: int, reopen: bool = True):
    def extent():
        if draw(st.booleans()):     # near a cluster boundary
            off = draw(st.integers(0, (size - 1) // cluster)) * cluster
            off = min(size - 1, max(0, off + draw(st.integers(-600, 600))))
        else:
            off = draw(st.integers(0, size - 1))
        n = draw(st.integers(1, min(size - off, 3 * cluster + 1000)))
        return off, n

    ops = []
    kinds = ["write"] * 6 + ["discard"] * 2 + ["flush", "read"] + (["reopen"] if reopen else [])
    for _ in range(draw(st.integers(1, 14))):
        kind = draw(st.sampled_from(kinds))
        if kind == "write":
            ops.append(("write", *extent(), draw(st.integers(0, 1 << 30))))
        elif kind in ("discard", "read"):
            ops.append((kind, *extent()))
        else:
            ops.append((kind,))
    return ops


# -- property tests ----------------------------------------------------------------------


@settings(max_examples=_examples(40, 600), **SETTINGS)
@given(st.data())
def test_random_operations_match_a_raw_model(data):
    cluster_bits, version, refcount_bits, size = data.draw(geometry())
    small_cache = data.draw(st.booleans())
    ops = data.draw(op_list(size, 1 << cluster_bits))
    limits = Limits(cache_bytes=1) if small_cache else Limits()   # 4 tables: evictions everywhere
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.qcow2")
        create(path, size, cluster_size=1 << cluster_bits, version=version, refcount_bits=refcount_bits)
        model = bytearray(size)
        im = open_image(path, True, limits=limits)
        im = apply_ops(im, model, ops, path, lambda: open_image(path, True, limits=limits))
        assert im.read(0, size) == model
        im.close()
        assert_consistent(path, bytes(model))


@settings(max_examples=_examples(25, 300), **SETTINGS)
@given(st.data())
def test_linked_clone_reads_through_and_leaves_base_alone(data):
    cluster_bits = data.draw(st.sampled_from([9, 12, 16]))
    base_qcow2 = data.draw(st.booleans())
    version = data.draw(st.sampled_from([2, 3]))
    base_size = data.draw(st.integers(1, 300)) * 512
    size = data.draw(st.sampled_from([base_size, base_size + data.draw(st.integers(1, 200)) * 512]))
    ops = data.draw(op_list(size, 1 << cluster_bits))
    with tempfile.TemporaryDirectory() as d:
        base = os.path.join(d, "base.qcow2" if base_qcow2 else "base.raw")
        content = pattern(base_size, base_size)
        if base_qcow2:
            create(base, base_size, cluster_size=4096)
            with open_image(base, True) as b:
                b.write(0, content)
        else:
            with open(base, "wb") as f:
                f.write(content)
        with open(base, "rb") as f:
            base_file = hashlib.sha256(f.read()).hexdigest()
        path = os.path.join(d, "clone.qcow2")
        create(path, size, backing=os.path.basename(base), cluster_size=1 << cluster_bits, version=version)
        model = bytearray(content) + bytearray(size - base_size)
        im = apply_ops(open_image(path, True), model, ops, path)
        assert im.read(0, size) == model
        assert im.sha256() == hashlib.sha256(model).hexdigest()
        im.close()
        with open(base, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == base_file, "the base image changed"
        assert_consistent(path, bytes(model))


def test_refcount_table_grows_past_one_cluster():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "g.qcow2")
        # 512-byte clusters and 64-bit refcounts: a one-cluster refcount
        # table covers 64 blocks of 64 clusters, 2 MiB of file.
        create(path, 4 << 20, cluster_size=512, refcount_bits=64)
        data = pattern(7, 4 << 20)
        with open_image(path, True) as im:
            assert im.header.refcount_table_clusters == 1
            for off in range(0, 4 << 20, 192 * 1024):
                im.write(off, data[off:off + 192 * 1024])
            assert im.header.refcount_table_clusters > 1
        assert_consistent(path, data)


def test_overwrite_in_place_and_reuse_of_freed_clusters():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "r.qcow2")
        create(path, 1 << 20)
        with open_image(path, True) as im:
            im.write(0, pattern(1, 1 << 20))
            im.flush()
            end = os.path.getsize(path)
            im.discard(0, 1 << 20)
            im.flush()
            im.write(0, pattern(2, 1 << 20))
            im.flush()
            assert os.path.getsize(path) == end, "freed clusters were not reused"
        assert_consistent(path, pattern(2, 1 << 20))


def test_empty_disk_and_explicit_formats():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "z.qcow2")
        create(path, 0)
        with open_image(path, True) as im:
            assert im.size == 0 and im.read(0, 0) == b"" and im.check().clean
            assert im.sha256() == hashlib.sha256(b"").hexdigest()
        qemu_check(path)
        with open_image(path, fmt="raw") as im:        # the file itself, header and all
            assert im.read(0, 4) == b"QFI\xfb"
        with pytest.raises(ImageError, match="unknown image format"):
            open_image(path, fmt="vmdk")
        with pytest.raises(ImageError, match="exists"):
            create(path, 1 << 20)


# -- images made by QEMU ----------------------------------------------------------------

needs_qemu = pytest.mark.skipif(QEMU_IMG is None or QEMU_IO is None, reason=NO_QEMU)


def test_qemu_tools_present():
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.skip(NO_QEMU + "; every qemu-img check/convert assertion in this file was skipped")


def _known_raw(path: str, size: int) -> bytes:
    """Random, text-like (compressible) and zero stretches."""
    r = random.Random(size)
    out = bytearray()
    while len(out) < size:
        kind = r.randrange(3)
        n = r.randrange(1, 200_000)
        out += r.randbytes(n) if kind == 0 else bytes(n) if kind == 1 else (b"qcow2 %d " % n * n)[:n]
    out = bytes(out[:size])
    with open(path, "wb") as f:
        f.write(out)
    return out


@needs_qemu
@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 << 20])
@pytest.mark.parametrize("options", [[], ["-c"], ["-o", "compat=0.10"], ["-o", "refcount_bits=1"]])
def test_images_converted_by_qemu_read_back(cluster_size, options):
    with tempfile.TemporaryDirectory() as d:
        raw = os.path.join(d, "src.raw")
        content = _known_raw(raw, 3 * 1024 * 1024 + 4096)
        path = os.path.join(d, "q.qcow2")
        opts = list(options)
        if "-o" in opts:
            opts[opts.index("-o") + 1] += f",cluster_size={cluster_size}"
        else:
            opts += ["-o", f"cluster_size={cluster_size}"]
        qemu(QEMU_IMG, "convert", "-O", "qcow2", *opts, raw, path)
        with open_image(path) as im:
            assert im.format == "qcow2"
            assert im.read(0, im.size) == content
            assert im.sha256() == hashlib.sha256(content).hexdigest()
        # Our writes on top (over compressed clusters too) keep it clean.
        model = bytearray(content)
        with open_image(path, True) as im:
            apply_ops(im, model, [("write", 1000, 70_000, 1), ("discard", 300_000, 200_000),
                                  ("write", 2_500_000, 5000, 2), ("discard", 0, 4096)], path)
        assert_consistent(path, bytes(model))


@needs_qemu
@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("backing", [True, False], ids=["overlay", "plain"])
def test_images_written_by_qemu_io(cluster_size, compat, backing):
    with tempfile.TemporaryDirectory() as d:
        base = os.path.join(d, "base.raw")
        _known_raw(base, 2 * 1024 * 1024)
        path = os.path.join(d, "ov.qcow2")
        link = ["-b", base, "-F", "raw"] if backing else []
        qemu(QEMU_IMG, "create", "-f", "qcow2", *link, "-o", f"cluster_size={cluster_size},compat={compat}",
             path, str(2 * 1024 * 1024))
        qemu(QEMU_IO, "-c", "write -P 0x5a 100k 70k", "-c", "write -z 256k 128k",
             "-c", "discard 512k 128k", "-c", "write -P 0x11 1900k 148k", path)
        expected = qemu_raw(path)
        with open_image(path) as im:
            assert im.read(0, im.size) == expected
        model = bytearray(expected)
        with open_image(path, True) as im:
            apply_ops(im, model, [("write", 250_000, 20_000, 3), ("write", 300_000, 1, 4),
                                  ("discard", 100 * 1024, 64 * 1024), ("write", 1_000_000, 65536, 5)], path)
        assert_consistent(path, bytes(model))


@needs_qemu
def test_qemu_reads_our_images_and_backing_chain():
    with tempfile.TemporaryDirectory() as d:
        base = os.path.join(d, "base.qcow2")
        create(base, 1 << 20, cluster_size=4096)
        with open_image(base, True) as im:
            im.write(0, pattern(1, 1 << 20))
        mid = os.path.join(d, "mid.qcow2")
        create(mid, backing="base.qcow2")
        with open_image(mid, True) as im:
            im.write(4096, b"m" * 10000)
        top = os.path.join(d, "top.qcow2")
        create(top, 2 << 20, backing=mid)
        with open_image(top, True) as im:
            im.write(8000, b"t" * 3000)
            im.discard(20000, 100_000)
            expected = im.read(0, im.size)
        info = subprocess.run([QEMU_IMG, "info", "--backing-chain", top], check=False, capture_output=True,
                              text=True)
        assert info.returncode == 0 and "backing file format: qcow2" in info.stdout
        assert qemu_raw(top) == expected
        for p in (base, mid, top):
            qemu_check(p)


@needs_qemu
def test_internal_snapshots_read_only():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.qcow2")
        create(path, 1 << 20)
        with open_image(path, True) as im:
            im.write(0, b"before" * 100)
        qemu(QEMU_IMG, "snapshot", "-c", "s1", path)
        qemu(QEMU_IO, "-c", "write -P 0x33 0 4k", path)
        with open_image(path) as im:
            assert im.read(0, 4096) == b"\x33" * 4096
        with pytest.raises(ImageError, match="snapshots"):
            open_image(path, True)


# -- crash recovery and feature bits ------------------------------------------------------


def _set_field(path: str, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def test_dirty_image_gets_its_refcounts_rebuilt():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "dirty.qcow2")
        create(path, 4 << 20)
        data = pattern(3, 4 << 20)
        with open_image(path, True) as im:
            im.write(0, data)
            rb = im._rt[0]
        # Lazy refcounts as QEMU leaves them after a crash: the refcounts on
        # disk lag (here: all zero), the dirty bit says so.
        with open(path, "r+b") as f:
            f.seek(rb)
            f.write(bytes(65536))
        _set_field(path, 72, ">Q", 1)
        with open_image(path) as im:            # read-only: refcounts are not needed
            assert im.read(0, 4 << 20) == data
        with open_image(path, True) as im:
            assert not im.header.incompatible_features & 1
            im.write(100, b"after")
        model = bytearray(data)
        model[100:105] = b"after"
        assert_consistent(path, bytes(model))


def test_corrupt_bit_allows_read_only():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.qcow2")
        create(path, 1 << 20)
        _set_field(path, 72, ">Q", 2)
        with open_image(path) as im:
            assert im.read(0, 512) == bytes(512)
        with pytest.raises(ImageError, match="corrupt"):
            open_image(path, True)


def test_unknown_autoclear_bits_cleared_by_writer_and_lazy_refcounts_accepted():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.qcow2")
        create(path, 1 << 20)
        _set_field(path, 80, ">Q", 1)            # lazy refcounts (compatible)
        _set_field(path, 88, ">Q", 1 << 40)      # an autoclear bit we do not know
        with open_image(path, True) as im:
            im.write(0, b"x")
        with open(path, "rb") as f:
            f.seek(80)
            compat, autoclear = struct.unpack(">QQ", f.read(16))
        assert compat == 1 and autoclear == 0
        qemu_check(path)


def test_leaks_are_repaired():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "l.qcow2")
        create(path, 1 << 20)
        with open_image(path, True) as im:
            im.write(0, pattern(1, 300_000))
            # A cluster with refcount 1 that nothing points at: a leak.
            im._alloc_cluster()
            im.flush()
            found = im.check()
            assert found.leaks == 1 and not found.corruptions
            im.repair()
            assert im.check().clean
        assert_consistent(path, pattern(1, 300_000) + bytes((1 << 20) - 300_000))


# -- broken images ------------------------------------------------------------------------


def _good_image(d: str, **kw) -> str:
    path = os.path.join(d, "img.qcow2")
    create(path, kw.pop("size", 1 << 20), **kw)
    with open_image(path, True) as im:
        im.write(0, pattern(9, 200_000))
    return path


def _expect_one_line(path: str, match: str, writable: bool = False, limits: Limits = DEFAULT_LIMITS,
                     read_all: bool = False) -> None:
    with pytest.raises(ImageError) as exc:
        im = open_image(path, writable, limits=limits)
        try:
            if read_all:
                im.read(0, im.size)
        finally:
            im.close()
    text = str(exc.value)
    assert "\n" not in text and match in text, text


HEADER_BREAKAGES = [
    # (name, field offset, struct format, value, message fragment)
    ("version 1", 4, ">I", 1, "unsupported qcow2 version 1"),
    ("version 4", 4, ">I", 4, "unsupported qcow2 version 4"),
    ("cluster bits 8", 20, ">I", 8, "cluster size"),
    ("cluster bits 22", 20, ">I", 22, "cluster size"),
    ("encryption", 32, ">I", 1, "encrypted"),
    ("L1 too large", 36, ">I", 0x7FFFFFFF, "L1 table"),
    ("L1 too small", 36, ">I", 0, "too small"),
    ("L1 outside the file", 40, ">Q", 1 << 40, "L1 table"),
    ("L1 misaligned", 40, ">Q", 0x10008, "L1 table"),
    ("refcount table outside", 48, ">Q", 1 << 40, "refcount table"),
    ("refcount table empty", 56, ">I", 0, "refcount table"),
    ("refcount table huge", 56, ">I", 1 << 20, "refcount table"),
    ("snapshots outside", 60, ">I", 1, "snapshot table"),
    ("unknown incompatible bit", 72, ">Q", 1 << 5, "unsupported incompatible feature: bit 5"),
    ("extended L2", 72, ">Q", 1 << 4, "extended L2"),
    ("external data file", 72, ">Q", 1 << 2, "external data file"),
    ("refcount order 7", 96, ">I", 7, "refcount order"),
    ("header length short", 100, ">I", 20, "header length"),
    ("header length odd", 100, ">I", 105, "header length"),
    ("backing name too long", 16, ">I", 5000, "backing file name"),
    ("size beyond the L1", 24, ">Q", 1 << 40, "too small for the virtual size"),
]


@pytest.mark.parametrize("name,offset,fmt,value,message", HEADER_BREAKAGES,
                         ids=[b[0] for b in HEADER_BREAKAGES])
def test_broken_headers_refused_with_one_line(name, offset, fmt, value, message):
    with tempfile.TemporaryDirectory() as d:
        path = _good_image(d)
        if name == "snapshots outside":
            _set_field(path, 64, ">Q", 1 << 40)
        if name == "backing name too long":
            _set_field(path, 8, ">Q", 0x200)
        _set_field(path, offset, fmt, value)
        _expect_one_line(path, message)


def test_broken_files_refused_with_one_line():
    with tempfile.TemporaryDirectory() as d:
        path = _good_image(d)
        with open(path, "rb") as f:
            data = f.read()

        def variant(name: str, content: bytes) -> str:
            p = os.path.join(d, name)
            with open(p, "wb") as f:
                f.write(content)
            return p

        _expect_one_line(variant("empty", b""), "empty")
        _expect_one_line(variant("short", data[:50]), "truncated")
        _expect_one_line(variant("short3", data[:100]), "truncated")
        _expect_one_line(variant("noL1", data[:0x10004]), "L1 table")
        _expect_one_line(variant("noL2", data[:0x30000]), "L1 entry 0")
        _expect_one_line(os.path.join(d, "missing"), "No such file")
        _expect_one_line(d, "directory")
        _expect_one_line("/dev/zero", "character device")
        fifo = os.path.join(d, "fifo")
        os.mkfifo(fifo)
        _expect_one_line(fifo, "FIFO")
        _expect_one_line(path, "cap", limits=Limits(max_size=1 << 19))
        raw = variant("big.raw", bytes(1 << 20))
        _expect_one_line(raw, "cap", limits=Limits(max_size=1 << 19))

        with open_image(path) as im:
            l1_0 = im._l1[0]
            l2_offset = l1_0 & 0x00FFFFFFFFFFFE00
            first = im._l2_table(l2_offset)[0]
        # An L1 entry pointing outside the file: refused at open.
        bad = bytearray(data)
        bad[0x10000:0x10008] = struct.pack(">Q", (1 << 50) | (1 << 63))
        _expect_one_line(variant("l1out", bytes(bad)), "L1 entry 0")
        # An L2 entry pointing outside the file: refused when read.
        bad = bytearray(data)
        bad[l2_offset:l2_offset + 8] = struct.pack(">Q", (1 << 50) | (1 << 63))
        _expect_one_line(variant("l2out", bytes(bad)), "corrupt L2 entry", read_all=True)
        # A compressed cluster that does not inflate.
        bad = bytearray(data)
        host = first & 0x00FFFFFFFFFFFE00
        entry = (1 << 62) | host | (3 << 54)
        bad[l2_offset:l2_offset + 8] = struct.pack(">Q", entry)
        _expect_one_line(variant("zbad", bytes(bad)), "compressed cluster", read_all=True)


_FUZZ_BASE: dict[str, bytes] = {}


def _fuzz_base() -> bytes:
    """A small image with data, zero, unallocated and (with qemu-img)
    compressed clusters, 4 KiB clusters so its metadata is dense."""
    if "img" not in _FUZZ_BASE:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "f.qcow2")
            if QEMU_IMG is not None:
                raw = os.path.join(d, "f.raw")
                _known_raw(raw, 256 * 1024)
                qemu(QEMU_IMG, "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", raw, path)
            else:
                create(path, 256 * 1024, cluster_size=4096)
            with open_image(path, True) as im:
                im.write(10_000, pattern(1, 50_000))
                im.discard(100_000, 30_000)
            with open(path, "rb") as f:
                _FUZZ_BASE["img"] = f.read()
    return _FUZZ_BASE["img"]


@settings(max_examples=_examples(150, 3000), **SETTINGS)
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=8),
       metadata_only=st.booleans(), writable=st.booleans(), cut=st.none() | st.integers(0, 1 << 30))
def test_hostile_images_raise_image_error_only(flips, metadata_only, writable, cut):
    """Random damage to a valid image: opening, reading the whole disk,
    writing and flushing either work or raise ImageError, nothing else."""
    data = bytearray(_fuzz_base())
    for where, value in flips:
        # Most of a qcow2's metadata is in its first clusters; aim there half the time.
        where %= 5 * 4096 if metadata_only else len(data)
        data[where] = value
    if cut is not None:
        del data[cut % len(data):]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "h.qcow2")
        with open(path, "wb") as f:
            f.write(data)
        try:
            with open_image(path, writable, limits=Limits(max_size=1 << 30)) as im:
                im.read(0, min(im.size, 1 << 20))
                if writable:
                    im.write(5000, b"w" * 9000)
                    im.discard(0, min(im.size, 20_000))
                    im.flush()
        except ImageError as e:
            assert "\n" not in str(e)


def test_backing_chain_errors_one_line():
    with tempfile.TemporaryDirectory() as d:
        def at(name: str) -> str:
            return os.path.join(d, name)

        create(at("x.qcow2"), 65536)
        for name in ("a.qcow2", "b.qcow2", "c.qcow2"):
            create(at(name), backing="x.qcow2")
        with open(at("gone.raw"), "wb") as f:
            f.write(bytes(512))
        create(at("m.qcow2"), backing="gone.raw")
        os.unlink(at("gone.raw"))
        _expect_one_line(at("m.qcow2"), "backing file")
        # Rename the backing files in place (same length): a -> b -> a, c -> c.
        for me, other in (("a.qcow2", "b.qcow2"), ("b.qcow2", "a.qcow2"), ("c.qcow2", "c.qcow2")):
            with open(at(me), "r+b") as f:
                off, n = struct.unpack_from(">QI", f.read(32), 8)
                f.seek(off)
                assert f.read(n) == b"x.qcow2"
                f.seek(off)
                f.write(other.encode())
        _expect_one_line(at("a.qcow2"), "loop in the backing chain")
        _expect_one_line(at("b.qcow2"), "loop in the backing chain")
        _expect_one_line(at("c.qcow2"), "loop in the backing chain")


def test_two_writers_are_refused():
    with tempfile.TemporaryDirectory() as d:
        path = _good_image(d)
        with open_image(path, True):
            _expect_one_line(path, "in use", writable=True)


# -- raw and in-memory overlays -----------------------------------------------------------


def test_raw_image_and_memory_overlay():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "disk.raw")
        content = pattern(5, 100_000)        # not a whole number of sectors
        with open(path, "wb") as f:
            f.write(content)
        with open_image(path) as im:
            assert isinstance(im, RawImage) and im.size == 100_352
            assert im.read(99_990, 362) == content[99_990:] + bytes(352)
            with pytest.raises(ImageError, match="read-only"):
                im.write(0, b"x")
            with pytest.raises(ImageError, match="outside"):
                im.read(100_000, 1000)
        ov = MemoryOverlay(open_image(path))
        model = bytearray(content + bytes(352))
        apply_ops(ov, model, [("write", 4000, 9000, 1), ("discard", 8192, 8192), ("write", 1, 1, 2),
                              ("discard", 10, 30_000), ("read", 0, 100_352)], path)
        assert ov.read(0, ov.size) == model
        assert ov.sha256() == hashlib.sha256(model).hexdigest()
        ov.close()
        with open(path, "rb") as f:
            assert f.read() == content, "the overlay wrote to its base"
        with open_image(path, True) as im:
            im.write(99_999, b"ab")
            im.discard(0, 10)
        with open(path, "rb") as f:
            got = f.read()
        assert got[:10] == bytes(10) and got[99_999:100_001] == b"ab"
        small = MemoryOverlay(open_image(path), limits=Limits(max_overlay_bytes=8192))
        small.write(0, bytes(8192))
        with pytest.raises(ImageError, match="full"):
            small.write(50_000, b"x")
        small.close()


def test_open_cow_in_memory_and_in_a_file():
    with tempfile.TemporaryDirectory() as d:
        base = os.path.join(d, "base.raw")
        content = pattern(4, 300 * 512)
        with open(base, "wb") as f:
            f.write(content)
        clone = os.path.join(d, "clone.qcow2")
        # In memory, then a new file, then that file again: only the file keeps the write.
        for overlay, before in ((None, content[:512]), (clone, content[:512]), (clone, b"w" * 512)):
            with open_cow(base, overlay) as im:
                assert im.read(0, 512) == before
                im.write(0, b"w" * 512)
        with open(base, "rb") as f:
            assert f.read() == content
        assert_consistent(clone, b"w" * 512 + content[512:])


def test_sha256_is_the_guest_view_whatever_the_format():
    with tempfile.TemporaryDirectory() as d:
        raw = os.path.join(d, "a.raw")
        content = pattern(11, 3 << 20)[:1 << 20] + bytes(2 << 20)
        with open(raw, "wb") as f:
            f.write(content)
        q = os.path.join(d, "a.qcow2")
        create(q, len(content))
        with open_image(q, True) as im:
            im.write(0, content[:1 << 20])
        want = hashlib.sha256(content).hexdigest()
        with open_image(raw) as r, open_image(q) as c:
            assert r.sha256() == c.sha256() == want


# -- SIGKILL at any point -----------------------------------------------------------------

def _verify_after_kill(path: str, seed: int, count: int, cluster: int, lines: list[str]) -> None:
    import numpy as np

    ops = kill_ops(seed, count, cluster)
    flushed = max([int(x.split()[1]) for x in lines if x.startswith("F ")], default=-1)
    done = max([int(x.split()[1]) for x in lines if x[:2] in ("F ", "O ")], default=-1)
    # Model states after each op: up to the last acknowledged flush the
    # content is fixed; after it, every byte holds some value it had since,
    # up to the op that was under way when the child died.
    model = bytearray(KILL_SIZE)
    states = []
    for i, op in enumerate(ops[:done + 2]):
        if op[0] == "write":
            model[op[1]:op[1] + op[2]] = pattern(op[3], op[2])
        elif op[0] == "discard":
            model[op[1]:op[1] + op[2]] = bytes(op[2])
        if i >= flushed:
            states.append(np.frombuffer(bytes(model), dtype=np.uint8))
    if flushed < 0:
        states.insert(0, np.zeros(KILL_SIZE, dtype=np.uint8))
    qemu_check(path, allow_leaks=True)
    with open_image(path, True) as im:
        got = np.frombuffer(im.read(0, KILL_SIZE), dtype=np.uint8)
        result = im.check()
        assert not result.corruptions, result
        if flushed >= 0:
            stable = np.ones(KILL_SIZE, dtype=bool)
            for s in states[1:]:
                stable &= s == states[0]
            assert np.array_equal(got[stable], states[0][stable]), "a flushed write was lost"
        ok = np.zeros(KILL_SIZE, dtype=bool)
        for s in states:
            ok |= got == s
        assert ok.all(), f"bytes never written: first at {int(np.argmin(ok)):#x}"
        im.repair()
    qemu_check(path)        # and after repair, no leaks either


def _spawn(path: str, seed: int, count: int, cluster: int, kill_at: int,
           small_cache: bool = False, torn: bool = False, behind: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "child", path, str(seed),
                             str(count), str(cluster), str(kill_at), str(int(small_cache)),
                             str(int(torn)), str(int(behind))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@settings(max_examples=_examples(25, 400), **SETTINGS)
@given(seed=st.integers(0, 1 << 30), kill_at=st.integers(1, 110),
       cluster=st.sampled_from([512, 4096, 65536]), small_cache=st.booleans(), torn=st.booleans(),
       behind=st.booleans())
def test_sigkill_at_any_io_call_keeps_flushed_writes(seed, kill_at, cluster, small_cache, torn, behind):
    # 30 operations make 50 to 130 write/truncate/fsync calls.
    count = 30
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.qcow2")
        create(path, KILL_SIZE, cluster_size=cluster)
        p = _spawn(path, seed, count, cluster, kill_at, small_cache, torn, behind)
        out, err = p.communicate(timeout=60)
        assert p.returncode in (0, -signal.SIGKILL), err
        _verify_after_kill(path, seed, count, cluster, out.split("\n"))


@settings(max_examples=_examples(8, 100), **SETTINGS)
@given(seed=st.integers(0, 1 << 30), delay=st.floats(0, 0.25), behind=st.booleans())
def test_sigkill_at_a_random_moment_keeps_flushed_writes(seed, delay, behind):
    count, cluster = 400, 4096
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.qcow2")
        create(path, KILL_SIZE, cluster_size=cluster)
        p = _spawn(path, seed, count, cluster, 0, behind=behind)
        _verify_after_kill(path, seed, count, cluster, _kill_after_ready(p, delay))


def _kill_after_ready(p: subprocess.Popen, delay: float) -> list[str]:
    """Wait for the child's READY, SIGKILL it ``delay`` seconds later and
    return every line it printed.  All of them are read through
    ``p.stdout``: the readline that waits for READY takes whatever the pipe
    holds into that object's buffer, and a parent scheduled late (a loaded
    machine) finds many of the child's lines there, or all of them;
    communicate() reads the raw descriptor and would never see those."""
    first = p.stdout.readline()
    assert first.strip() == "READY", first
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    rest = p.stdout.read()          # to EOF: the child is dead
    p.communicate(timeout=60)
    return (first + rest).split("\n")


def test_sigkill_check_reads_every_line_a_late_parent_finds_waiting():
    # The random-moment test's CI failure (seed 61000, delay 0.21): the
    # parent ran only after the child had finished, its readline took READY
    # and every later line, and the check, seeing no op done, reported the
    # final image as "bytes never written: first at 0x0".  Here the parent
    # is late on purpose: it waits for the child to exit before reading.
    seed, count, cluster = 61000, 400, 4096
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.qcow2")
        create(path, KILL_SIZE, cluster_size=cluster)
        p = _spawn(path, seed, count, cluster, 0)
        p.wait(timeout=60)
        lines = _kill_after_ready(p, 0)
        assert "DONE" in lines
        _verify_after_kill(path, seed, count, cluster, lines)


# -- power loss: any subset of the writes since the last fsync -----------------------------


class _IoLog:
    """Records every write, truncate and fsync the image layer makes (and the
    test's own markers), so a power failure can be replayed afterwards."""

    def __init__(self):
        self.records: list[tuple] = []
        self._saved = (os.pwrite, os.fsync, os.ftruncate)

    def __enter__(self):
        real_pwrite, real_fsync, real_ftruncate = self._saved

        def pwrite(fd, data, offset):
            self.records.append(("w", offset, bytes(data)))
            return real_pwrite(fd, data, offset)

        def fsync(fd):
            self.records.append(("s",))
            return real_fsync(fd)

        def ftruncate(fd, length):
            self.records.append(("t", length))
            return real_ftruncate(fd, length)

        os.pwrite, os.fsync, os.ftruncate = pwrite, fsync, ftruncate
        return self

    def __exit__(self, *exc):
        os.pwrite, os.fsync, os.ftruncate = self._saved


def _file_after_power_loss(initial: bytes, records: list[tuple], cut: int, keep: random.Random) -> bytes:
    """The file as the disk may hold it if power failed at record ``cut``:
    everything before the last fsync, and any subset of what came after."""
    last_sync = max((i for i, r in enumerate(records[:cut]) if r[0] == "s"), default=-1)
    image = bytearray(initial)
    for i, r in enumerate(records[:cut]):
        if r[0] not in ("w", "t") or (i > last_sync and keep.random() < 0.5):
            continue
        if r[0] == "t":
            if r[1] > len(image):
                image.extend(bytes(r[1] - len(image)))
            continue
        _, offset, data = r
        if offset + len(data) > len(image):
            image.extend(bytes(offset + len(data) - len(image)))
        image[offset:offset + len(data)] = data
    return bytes(image)


@settings(max_examples=_examples(30, 500), **SETTINGS)
@given(seed=st.integers(0, 1 << 30), cluster=st.sampled_from([512, 4096, 65536]),
       small_cache=st.booleans(), where=st.floats(0, 1), at_fsync=st.booleans(),
       keep_seed=st.integers(0, 1 << 30))
def test_power_loss_between_fsyncs_keeps_image_consistent(seed, cluster, small_cache, where, at_fsync,
                                                          keep_seed):
    count = 30
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "p.qcow2")
        create(path, KILL_SIZE, cluster_size=cluster)
        with open(path, "rb") as f:
            initial = f.read()
        with _IoLog() as log:
            run_kill_ops(path, seed, count, cluster, small_cache, lambda mark: log.records.append((mark,)))
        cut = int(where * len(log.records))
        if at_fsync:
            # Just before an fsync: where the most writes are in flight.
            syncs = [i for i, r in enumerate(log.records) if r[0] == "s"]
            cut = syncs[min(int(where * len(syncs)), len(syncs) - 1)] if syncs else cut
        crashed = os.path.join(d, "crashed.qcow2")
        with open(crashed, "wb") as f:
            f.write(_file_after_power_loss(initial, log.records, cut, random.Random(keep_seed)))
        lines = [r[0] for r in log.records[:cut] if r[0][:2] in ("F ", "O ")]
        _verify_after_kill(crashed, seed, count, cluster, lines)

