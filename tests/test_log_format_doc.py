"""docs/log-format.md is enough to read a log: a reader written from the page alone
(nothing from replay/ or vmm/) decodes the bundled recording (format 1) and a
fresh one (format 4) completely, every CRC checked as the page says, every
payload decoded by the page's tables, and agrees event for event with the
reference reader (replay.logfile.LogReader).  The page's own example runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "log-format.md"
BUNDLED = ROOT / "guests" / "recordings" / "crash.vmlog"

# ---- the independent reader (from docs/log-format.md only) ----------------------------------

REGS = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
        "r14", "r15", "rip", "rflags", "es", "cs", "ss", "ds", "fs", "gs", "cr0", "cr2", "cr3", "cr4", "cpl"]
REASONS = {"exit", "limit", "shutdown", "halted", "error", "host", "reset", "breakpoint", "poweroff"}


def _varint(buf: bytes, off: int) -> tuple[int, int]:
    v = shift = 0
    for i in range(10):
        b = buf[off]
        off += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            assert v < 1 << 64
            return v, off
    raise AssertionError("varint longer than 10 bytes")


def _name(p: bytes, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<H", p, off)
    return p[off + 2:off + 2 + n].decode("utf-8"), off + 2 + n


def decode(kind: int, p: bytes):
    if kind in (1, 2, 4, 5):
        return p
    if kind == 3:
        assert len(p) == 8
        return struct.unpack("<q", p)[0]
    if kind == 6:
        name, off = _name(p, 0)
        assert len(p) == off + 32
        return name, p[off:].hex()
    if kind == 7:
        assert len(p) == 8 * len(REGS)
        return dict(zip(REGS, struct.unpack(f"<{len(REGS)}Q", p)))
    if kind == 8:
        (n,) = struct.unpack_from("<I", p)
        assert len(p) == 4 + 4 * n
        return list(struct.unpack_from(f"<{n}I", p, 4))
    if kind == 9:
        stream, off = _name(p, 0)
        assert len(p) == off + 40
        return stream, struct.unpack_from("<Q", p, off)[0], p[off + 8:].hex()
    if kind == 10:
        (status,) = struct.unpack_from("<q", p)
        reason, off = _name(p, 8)
        message, off = _name(p, off)
        if off == len(p):
            return reason, status, message
        (n,) = struct.unpack_from("<H", p, off)
        assert n >= 1 and len(p) == off + 2 + 8 * n
        return reason, status, message, list(struct.unpack_from(f"<{n}Q", p, off + 2))
    raise AssertionError(f"unknown kind {kind}")


def read_log(data: bytes):
    assert data[:8] == b"VMMRLOG\0"
    version, j = struct.unpack_from("<HI", data, 8)
    assert 1 <= version <= 4
    text = data[14:14 + j]
    (h,) = struct.unpack_from("<I", data, 14 + j)
    assert zlib.crc32(data[:14 + j]) == h, "header CRC"
    header = json.loads(text)
    off = 18 + j
    events = []
    seq = 0
    while off < len(data):
        if version >= 3:
            p, s, first, n, pcrc, hcrc = struct.unpack_from("<IIQIII", data, off)
            assert zlib.crc32(data[off:off + 24], h) == hcrc, "chunk head CRC"
            assert s == seq, "sequence number"
            off += 28
            payload = data[off:off + p]
            assert zlib.crc32(payload) == pcrc, "payload CRC"
        else:
            p, crc, first, n = struct.unpack_from("<IIQI", data, off)
            off += 20
            payload = data[off:off + p]
            assert zlib.crc32(struct.pack("<QI", first, n) + payload) == crc, "chunk CRC"
        assert len(payload) == p, "truncated"
        off += p
        raw = zlib.decompress(payload)
        pos = icount = 0
        chunk = []
        for _ in range(n):
            kind, pos = _varint(raw, pos)
            delta, pos = _varint(raw, pos)
            icount += delta
            vcpu = 0
            if version >= 2:
                vcpu, pos = _varint(raw, pos)
            size, pos = _varint(raw, pos)
            body = raw[pos:pos + size]
            assert len(body) == size
            pos += size
            chunk.append((kind, icount, vcpu, body))
        assert pos == len(raw), "bytes after the chunk's last event"
        assert chunk[0][1] == first, "first icount"
        events += chunk
        seq += 1
    return version, header, events


def page_hash(page: bytes) -> int:
    x = 0x9E3779B97F4A7C15
    acc = 0
    for (w,) in struct.iter_unpack("<Q", page):
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        acc = (acc + w * (x | 1)) % (1 << 64)
    return ((acc >> 32) ^ acc) % (1 << 32)


# ---- the checks ---------------------------------------------------------------------------------

def check_log(path: Path, want_version: int) -> list:
    data = path.read_bytes()
    version, header, events = read_log(data)
    assert version == want_version
    cfg = header["config"]
    assert re.fullmatch(r"[0-9a-f]{64}", header["initial_digest"])
    for key in ("mem_size", "rtc_epoch", "boot", "cmdline", "load_addr", "image", "digest_ticks",
                "mem_digest_every"):
        assert key in cfg, key
    decoded = [(k, ic, vc, decode(k, p)) for k, ic, vc, p in events]
    # the first event names the image by its SHA-256; the last is END; icounts never decrease
    assert decoded[0][0] == 6 and decoded[0][3][1] == cfg["image"]["sha256"]
    assert decoded[-1][0] == 10 and decoded[-1][3][0] in REASONS
    assert [e[1] for e in decoded] == sorted(e[1] for e in decoded)
    pages = cfg["mem_size"] // 4096
    mem = [d for k, _, _, d in decoded if k == 8]
    assert mem and all(len(h) == pages for h in mem)
    assert any(k == 7 for k, *_ in decoded) and any(k == 9 for k, *_ in decoded)
    # the reference reader sees the same events
    from replay.logfile import LogReader

    ref = [(int(e.kind), e.icount, e.vcpu, e.payload) for e in LogReader(str(path))]
    assert ref == events
    return decoded


def test_the_bundled_recording_decodes_by_the_doc():
    decoded = check_log(BUNDLED, 1)
    reason, status, _ = decoded[-1][3]
    assert (reason, status) == ("exit", 1)      # the recorded crash
    # the image the first event names is the bundled crash guest
    _name, sha = decoded[0][3]
    assert hashlib.sha256((ROOT / "guests" / "build" / "crash.bin").read_bytes()).hexdigest() == sha


def test_a_fresh_recording_decodes_by_the_doc(tmp_path):
    log = tmp_path / "hello.vmlog"
    proc = subprocess.run([sys.executable, "-m", "tools.cli", "record", "hello", "--serial", "none",
                           "-o", str(log)], cwd=ROOT, capture_output=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr.decode()
    decoded = check_log(log, 4)
    # END ends with the instructions of each vCPU (one here): the whole run
    assert decoded[-1][3][3] == [decoded[-1][1]]
    # the page hash as the doc defines it: the hash of an all-zero page, and the recorder's hashes
    # of the first page of RAM change as the BIOS fills the IVT, so compare a known page: zeros
    assert page_hash(bytes(4096)) == 0
    import numpy as np

    from vmm.digest import page_hashes

    page = bytes(range(256)) * 16
    assert page_hash(page) == int(page_hashes(np.frombuffer(page, dtype=np.uint8).copy())[0])
    outputs = {d[0]: d for k, _, _, d in decoded if k == 9}
    assert set(outputs) <= {"com1", "debugcon"}


def test_the_docs_example_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    text = DOC.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {"__name__": "doc_example"})  # noqa: S102 - the doc's own example
    lines = out.getvalue().splitlines()
    _, _, events = read_log(BUNDLED.read_bytes())
    assert len(lines) == len(events)
    assert lines[0].startswith("0 6 0 ")


@pytest.mark.parametrize("kind,name", [(1, "CONSOLE_INPUT"), (2, "KEYBOARD_INPUT"), (3, "RTC_EPOCH"),
                                       (4, "RANDOM"), (5, "NET_FRAME"), (6, "DISK_IMAGE"), (7, "REG_DIGEST"),
                                       (8, "MEM_DIGEST"), (9, "OUTPUT_DIGEST"), (10, "END")])
def test_the_doc_lists_every_event_kind(kind, name):
    from replay.events import EventKind

    assert EventKind[name] == kind
    assert f"| {kind} | `{name}` |" in DOC.read_text()
    assert len(EventKind) == 10
