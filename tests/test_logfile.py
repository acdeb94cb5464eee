"""The replay log file format: round trips, chunking, truncation, corruption,
foreign files, and a fuzz that nothing but LogFormatError ever escapes.
(tests/test_log_hostile.py holds issue 16's hostile logs; tests/fuzz/ the fuzzers.)"""
from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay import events as ev
from replay.events import Event, EventKind, LogFormatError
from replay.logfile import (
    MAGIC,
    MAX_CHUNK_BYTES,
    LogReader,
    LogWriter,
    describe,
    encode_header,
    read_header,
    verify,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {"mem_size": 32 << 20, "boot": "multiboot", "rtc_epoch": 1767225600, "cmdline": "demo",
          "load_addr": 0x100000, "digest_ticks": 1_000_000, "mem_digest_every": 50,
          "image": {"name": "demo.elf", "path": "/nonexistent/demo.elf", "sha256": "ab" * 32},
          "vmm_version": "0.1.0"}
DIGEST = "0123456789abcdef" * 4
CHUNK_HEAD = 28


def regs(seed: int = 0) -> dict[str, int]:
    return {n: (seed * 0x9E3779B97F4A7C15 + i * 0x1234567) & ((1 << 64) - 1) for i, n in enumerate(ev.REG_NAMES)}


def one_of_each(base: int = 0) -> list[Event]:
    return [
        Event(EventKind.RTC_EPOCH, base, ev.encode_rtc_epoch(1767225600)),
        Event(EventKind.DISK_IMAGE, base, ev.encode_disk_image("disk.img", "cd" * 32)),
        Event(EventKind.CONSOLE_INPUT, base + 10, b"hello\r"),
        Event(EventKind.KEYBOARD_INPUT, base + 10, b"\x1c\x9c"),
        Event(EventKind.RANDOM, base + 11, bytes(range(16))),
        Event(EventKind.NET_FRAME, base + 12, b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x56" + b"\x08\x00" + b"x" * 50),
        Event(EventKind.REG_DIGEST, base + 1000, ev.encode_regs(regs(1))),
        Event(EventKind.MEM_DIGEST, base + 1000, ev.encode_page_hashes([i * 2654435761 % (1 << 32)
                                                                        for i in range(8192)])),
        Event(EventKind.OUTPUT_DIGEST, base + 1000, ev.encode_output_digest("serial", 12345, "ef" * 32)),
        Event(EventKind.END, base + 2000, ev.encode_end("exit", 3, "guest wrote 3 to port 0x501")),
    ]


def write_log(path, events, **kw) -> LogWriter:
    w = LogWriter(path, CONFIG, DIGEST, **kw)
    for e in events:
        w.append(e)
    w.close()
    return w


def many_events(n: int, seed: int = 1) -> list[Event]:
    rng = random.Random(seed)
    out, ic = [], 0
    for _ in range(n):
        ic += rng.choice((0, 1, 7, 300, 100_000, 1 << 33))
        kind = rng.choice((EventKind.CONSOLE_INPUT, EventKind.KEYBOARD_INPUT, EventKind.RANDOM,
                           EventKind.OUTPUT_DIGEST))
        if kind is EventKind.OUTPUT_DIGEST:
            payload = ev.encode_output_digest("serial", ic % 100_000, rng.randbytes(32))
        else:
            payload = rng.randbytes(rng.choice((0, 1, 5, 40)))
        out.append(Event(kind, ic, payload))
    return out


@pytest.fixture(scope="module")
def small_log(tmp_path_factory):
    """A few-chunk log, with its bytes and the byte offsets where each chunk ends."""
    path = tmp_path_factory.mktemp("small") / "small.log"
    events = one_of_each()[:6] + many_events(14, seed=5)
    events = sorted(events, key=lambda e: e.icount)
    write_log(path, events, chunk_events=5)
    r = LogReader(path)
    assert len(r.chunks) == 4
    data = path.read_bytes()
    return data, events, r


def assert_one_line(err: Exception) -> None:
    msg = str(err)
    assert msg and "\n" not in msg, msg


# -- round trips ---------------------------------------------------------------

def test_every_kind_round_trips(tmp_path):
    events = one_of_each()
    assert {e.kind for e in events} == set(EventKind)
    p = tmp_path / "a.log"
    write_log(p, events)
    r = LogReader(p)
    assert list(r) == events
    assert list(r) == events  # iterating twice reads the file twice
    assert r.header.version == ev.FORMAT_VERSION
    assert r.header.config == CONFIG
    assert r.header.initial_digest == DIGEST
    assert read_header(p) == r.header
    assert not r.truncated and r.truncation_note is None
    assert r.complete and r.incomplete_note is None
    assert r.end_offset == r.file_size == os.path.getsize(p)
    assert (r.first_icount, r.last_icount) == (0, 2000)
    s = r.stats()
    assert s.chunks == 1 and s.events == len(events)
    assert s.events_per_kind == {k.name: 1 for k in EventKind}
    assert s.compressed_bytes + s.header_bytes + CHUNK_HEAD == s.file_bytes
    assert s.end == events[-1]
    rep = verify(p)
    assert rep.ok and not rep.problems and not rep.warnings, rep


def test_payload_helpers_round_trip():
    assert ev.decode_rtc_epoch(ev.encode_rtc_epoch(-86400)) == -86400
    assert ev.decode_disk_image(ev.encode_disk_image("flöppy.img", bytes(range(32)))) == \
        ("flöppy.img", bytes(range(32)).hex())
    r = regs(7)
    assert ev.decode_regs(ev.encode_regs(r)) == r
    assert list(ev.decode_regs(ev.encode_regs(r))) == list(ev.REG_NAMES)
    hashes = [0, 1, 0xFFFF_FFFF, 12345]
    assert list(ev.decode_page_hashes(ev.encode_page_hashes(hashes))) == hashes
    assert list(ev.decode_page_hashes(ev.encode_page_hashes([]))) == []
    od = ev.decode_output_digest(ev.encode_output_digest("debugcon", 1 << 40, "aa" * 32))
    assert od == ("debugcon", 1 << 40, "aa" * 32) and od.total == 1 << 40
    reason, status, message = ev.decode_end(ev.encode_end("exit", -1, "m"))
    assert (reason, status, message) == ("exit", -1, "m")
    assert ev.decode_end(ev.encode_end("halted", 0xFFFF_FFFF)) == ("halted", 0xFFFF_FFFF, "")


def test_page_hashes_from_numpy_and_page_diff():
    np = pytest.importorskip("numpy")
    a = np.arange(5000, dtype=np.uint32) * np.uint32(2654435761)
    payload = ev.encode_page_hashes(a)
    assert payload == ev.encode_page_hashes([int(x) for x in a])
    back = ev.decode_page_hashes(payload)
    assert np.array_equal(np.frombuffer(back, dtype=np.uint32), a)
    b = a.copy()
    b[[3, 4000]] += 1
    assert ev.page_diff(ev.decode_page_hashes(ev.encode_page_hashes(b)), back) == [3, 4000]
    assert ev.page_diff([1, 2], [1, 2, 3, 4]) == [2, 3]


def test_reg_diff():
    a, b = regs(1), regs(1)
    b["rip"] += 2
    b["cr3"] = 0x7000
    assert [n for n, _, _ in ev.reg_diff(a, b)] == ["rip", "cr3"]
    assert "rip" in ev.format_reg_diff(a, b) and "rax" not in ev.format_reg_diff(a, b)


def test_reg_names_match_the_vmm_digest():
    digest = pytest.importorskip("vmm.digest")
    assert tuple(digest.REG_NAMES) == ev.REG_NAMES


def test_payload_encoders_refuse_bad_values():
    r = regs()
    del r["rip"]
    with pytest.raises(ValueError, match="rip"):
        ev.encode_regs(r)
    with pytest.raises(ValueError, match="dr7"):
        ev.encode_regs({**regs(), "dr7": 0})
    with pytest.raises(ValueError):
        ev.encode_regs({**regs(), "rax": 1 << 64})
    with pytest.raises(ValueError):
        ev.encode_page_hashes([1 << 32])
    with pytest.raises(ValueError):
        ev.encode_disk_image("x", "not hex")
    with pytest.raises(ValueError):
        ev.encode_output_digest("serial", 1, b"short")
    with pytest.raises(ValueError):
        Event(99, 0, b"")
    with pytest.raises(ValueError):
        Event(EventKind.RANDOM, -1, b"")
    with pytest.raises(TypeError):
        Event(EventKind.RANDOM, 0, "text")
    assert Event(1, 5, bytearray(b"ab")) == Event(EventKind.CONSOLE_INPUT, 5, b"ab")


@pytest.mark.parametrize("kind", sorted(ev.DECODERS))
def test_payload_decoders_refuse_wrong_sizes(kind):
    good = next(e.payload for e in one_of_each() if e.kind is kind)
    for bad in (b"", good[:-1], good + b"\0", good[:1]):
        with pytest.raises(LogFormatError, match=kind.name) as ei:
            ev.DECODERS[kind](bad)
        assert_one_line(ei.value)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(ev.DECODERS)), data=st.binary(max_size=300))
def test_payload_decoders_raise_only_log_format_error(kind, data):
    try:
        ev.DECODERS[kind](data)
        ev.summarize(Event(kind, 0, data))
    except LogFormatError as e:
        assert_one_line(e)


# -- writer rules and chunking ---------------------------------------------------

def test_big_log_spans_many_chunks(tmp_path):
    events = many_events(20_000)
    p = tmp_path / "big.log"
    w = write_log(p, events, chunk_events=100)
    assert w.chunks_written == 200 and w.events_written == 20_000
    r = LogReader(p)
    assert len(r.chunks) == 200
    assert list(r) == events
    s = r.stats()
    assert s.events == 20_000 and sum(s.events_per_kind.values()) == 20_000
    assert s.uncompressed_bytes > s.compressed_bytes
    assert (s.first_icount, s.last_icount) == (events[0].icount, events[-1].icount)
    # seeking by icount: the same events as filtering, from a chunk near the target
    target = events[12_345].icount
    assert list(r.events(target)) == [e for e in events if e.icount >= target]
    assert list(r.events(events[-1].icount + 1)) == []
    rep = verify(p)  # sound, but without an END
    assert rep.verdict == "incomplete" and rep.stats.events == 20_000 and rep.stats.chunks == 200


def test_chunk_bytes_limit(tmp_path):
    events = [Event(EventKind.NET_FRAME, i, os.urandom(1500)) for i in range(100)]
    p = tmp_path / "b.log"
    w = write_log(p, events, chunk_bytes=16 << 10)
    assert 9 <= w.chunks_written <= 11
    assert list(LogReader(p)) == events


def test_chunk_events_one(tmp_path):
    events = one_of_each()
    p = tmp_path / "c.log"
    write_log(p, events, chunk_events=1)
    r = LogReader(p)
    assert len(r.chunks) == len(events) and list(r) == events


def test_identical_inputs_give_identical_files(tmp_path):
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    write_log(a, one_of_each(), chunk_events=3)
    write_log(b, one_of_each(), chunk_events=3)
    assert a.read_bytes() == b.read_bytes()


def test_icounts_must_not_decrease(tmp_path):
    w = LogWriter(tmp_path / "d.log", CONFIG, DIGEST, chunk_events=2)
    w.append(Event(EventKind.CONSOLE_INPUT, 100, b"a"))
    w.append(Event(EventKind.CONSOLE_INPUT, 100, b"b"))  # equal is fine; this fills a chunk
    with pytest.raises(ValueError, match="non-decreasing"):
        w.append(Event(EventKind.CONSOLE_INPUT, 99, b"c"))  # also across a chunk boundary
    w.append(Event(EventKind.CONSOLE_INPUT, 101, b"d"))
    w.flush()
    with pytest.raises(ValueError, match="non-decreasing"):
        w.append(Event(EventKind.CONSOLE_INPUT, 0, b"e"))
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.append(Event(EventKind.CONSOLE_INPUT, 200, b"f"))
    assert [e.payload for e in LogReader(tmp_path / "d.log")] == [b"a", b"b", b"d"]


def test_writer_refuses_bad_arguments(tmp_path):
    p = tmp_path / "e.log"
    with pytest.raises(TypeError):
        LogWriter(p, {"f": object()}, DIGEST)
    with pytest.raises(TypeError):
        LogWriter(p, ["not", "a", "dict"], DIGEST)
    with pytest.raises(ValueError):
        LogWriter(p, CONFIG, "xyz")
    with pytest.raises(ValueError, match="too large"):
        LogWriter(p, {"blob": "x" * (1 << 20)}, DIGEST)
    with pytest.raises(ValueError):
        LogWriter(p, CONFIG, DIGEST, chunk_events=0)
    with pytest.raises(ValueError):
        LogWriter(p, CONFIG, DIGEST, chunk_bytes=MAX_CHUNK_BYTES)
    with LogWriter(p, CONFIG, DIGEST) as w:
        with pytest.raises(ValueError, match="limit"):
            w.append(Event(EventKind.RANDOM, 0, bytes(ev.MAX_EVENT_PAYLOAD + 1)))
        with pytest.raises(TypeError):
            w.append((EventKind.RANDOM, 0, b""))


def test_empty_log_and_log_without_end(tmp_path):
    p = tmp_path / "f.log"
    LogWriter(p, {}, "").close()
    r = LogReader(p)
    assert list(r) == [] and r.chunks == () and r.last_icount is None and not r.truncated
    assert r.header.config == {} and r.header.initial_digest == ""
    assert not r.complete and "no END" in r.incomplete_note
    assert "no events" in describe(p)
    rep = verify(p)  # an empty config and no END: not a log a replay can use
    assert not rep.ok and not rep.complete and rep.verdict == "damaged"
    p2 = tmp_path / "f2.log"
    write_log(p2, [Event(EventKind.CONSOLE_INPUT, 5, b"x")])
    rep = verify(p2)
    assert not rep.ok and rep.verdict == "incomplete" and rep.problems == [rep.incomplete_note]
    assert "no END" in rep.incomplete_note and str(rep).startswith("incomplete\n")


# -- a killed recorder -----------------------------------------------------------

def test_writer_never_closed_leaves_whole_chunks(tmp_path):
    p = tmp_path / "g.log"
    events = many_events(57)
    w = LogWriter(p, CONFIG, DIGEST, chunk_events=10)
    for e in events:
        w.append(e)
    # no close(): the 7 events of the open chunk are lost, the 5 whole chunks are there
    r = LogReader(p)
    assert list(r) == events[:50] and not r.truncated and not r.complete
    w.close()
    assert list(LogReader(p)) == events


def test_killed_writer_process_leaves_readable_log(tmp_path):
    p = tmp_path / "h.log"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        from replay.logfile import LogWriter
        from replay.events import Event, EventKind
        w = LogWriter({str(p)!r}, {{"mem_size": 1}}, "00", chunk_events=8)
        for i in range(45):
            w.append(Event(EventKind.CONSOLE_INPUT, i * 10, bytes([i])))
        os._exit(9)
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert proc.returncode == 9
    r = LogReader(p)
    assert [e.payload for e in r] == [bytes([i]) for i in range(40)]
    assert not r.truncated and r.last_icount == 390 and not r.complete
    rep = verify(p)
    assert not rep.complete and not rep.truncated and "no END" in rep.incomplete_note


# -- truncation and corruption ---------------------------------------------------

def test_truncation_at_every_byte(tmp_path, small_log):
    data, events, full = small_log
    header_size = full.header.size
    ends = [c.end for c in full.chunks]
    p = tmp_path / "t.log"
    for cut in range(len(data) + 1):
        p.write_bytes(data[:cut])
        if cut < header_size:
            with pytest.raises(LogFormatError) as ei:
                LogReader(p)
            assert_one_line(ei.value)
            assert not verify(p).ok
            continue
        r = LogReader(p)
        whole = sum(1 for e in ends if e <= cut)
        n = sum(c.event_count for c in full.chunks[:whole])
        got = list(r)
        assert got == events[:n], cut
        boundary = cut == header_size or cut in ends
        assert r.truncated is not boundary, cut
        assert r.end_offset == (ends[whole - 1] if whole else header_size)
        assert r.last_icount == (events[n - 1].icount if n else None)
        assert not r.complete  # the small log has no END
        if r.truncated:
            note = r.truncation_note
            assert note == (f"log truncated at byte {cut} inside chunk {whole}: replaying the first "
                            f"{whole} chunks ({f'up to icount {r.last_icount}' if n else 'no events'})")
            rep = verify(p)
            assert not rep.ok and rep.truncated and rep.problems == [note]
            assert note in describe(p)
        else:
            assert r.truncation_note is None


def test_corrupt_byte_in_a_chunk_names_the_chunk(tmp_path, small_log):
    data, _, full = small_log
    p = tmp_path / "x.log"
    for c in full.chunks:
        for off in range(c.offset, c.end):
            bad = bytearray(data)
            bad[off] ^= 0x55
            p.write_bytes(bytes(bad))
            in_head = off < c.offset + CHUNK_HEAD
            try:
                r = LogReader(p)
                got = list(r)
            except LogFormatError as e:
                assert_one_line(e)
                assert f"corrupt chunk {c.index} at byte {c.offset} (" in str(e), (off, str(e))
                # the head has a checksum of its own: a flipped length is damage, never a truncation
                assert str(e).endswith("(chunk head checksum mismatch)" if in_head else "(checksum mismatch)")
                rep = verify(p)
                assert not rep.ok and any(f"chunk {c.index}" in q for q in rep.problems)
                continue
            pytest.fail(f"a flipped byte at {off} went unnoticed ({r.truncated=}, {len(got)} events)")


def test_corrupt_payload_reports_chunk_and_byte(tmp_path):
    p = tmp_path / "y.log"
    write_log(p, many_events(300), chunk_events=20)
    r = LogReader(p)
    c = r.chunks[12]
    data = bytearray(p.read_bytes())
    data[c.offset + CHUNK_HEAD + 3] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(LogFormatError) as ei:
        LogReader(p)
    assert str(ei.value) == f"corrupt chunk 12 at byte {c.offset} (checksum mismatch)"
    rep = verify(p)
    assert not rep.ok and rep.problems == [str(ei.value)]
    assert rep.stats.chunks == 12  # the readable part was still checked and counted
    with pytest.raises(LogFormatError, match="chunk 12"):
        describe(p)


HEADER = encode_header(CONFIG, DIGEST)
HEADER_CRC = struct.unpack_from("<I", HEADER, len(HEADER) - 4)[0]


def _head(length: int, seq: int, first: int, count: int, payload_crc: int) -> bytes:
    """A version-3 chunk head with a valid head CRC (the format as documented)."""
    fields = struct.pack("<IIQII", length, seq, first, count, payload_crc)
    return fields + struct.pack("<I", zlib.crc32(fields, HEADER_CRC))


def _chunk(first: int, count: int, raw: bytes, compressed: bytes | None = None, seq: int = 0) -> bytes:
    payload = zlib.compress(raw, 6) if compressed is None else compressed
    return _head(len(payload), seq, first, count, zlib.crc32(payload)) + payload


def _enc(kind: int, delta: int, payload: bytes) -> bytes:
    def varint(v):
        out = bytearray()
        while v >= 0x80:
            out.append(v & 0x7F | 0x80)
            v >>= 7
        return bytes(out + bytes([v]))
    return varint(kind) + varint(delta) + varint(0) + varint(len(payload)) + payload  # version 2: vCPU 0


@pytest.mark.parametrize("chunk, why", [
    (_chunk(5, 1, _enc(1, 5, b"a"), compressed=b"not zlib", seq=1), "does not decompress"),
    (_chunk(5, 1, _enc(1, 5, b"a"), compressed=zlib.compress(_enc(1, 5, b"a")) + b"x", seq=1), "one whole zlib"),
    (_chunk(5, 2, _enc(1, 5, b"a"), seq=1), "1 events, the chunk header says 2"),
    (_chunk(5, 1, _enc(1, 5, b"a") * 2, seq=1), "more events than the 1 the chunk head says"),
    (_chunk(6, 1, _enc(1, 5, b"a"), seq=1), "first event at icount 5, the chunk header says 6"),
    (_chunk(5, 1, _enc(99, 5, b"a"), seq=1), "unknown event kind 99"),
    (_chunk(5, 1, _enc(1, 5, b"abc")[:-1], seq=1), "runs past the end"),
    (_chunk(5, 1, b"\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01\x00", seq=1), "varint"),
    (_chunk(5, 0, b"", seq=1), "no events"),
    (_head(0xFFFF_FFFF, 1, 0, 1, 0), "exceeds the 64 MiB cap"),
    (_chunk(0, 1 << 30, _enc(1, 0, b""), seq=1), "more than the 65536 a chunk may hold"),
    (_chunk(0, 1000, _enc(1, 0, b"") * 1000, seq=1), "events a byte"),
    (_chunk(5, 1, _enc(1, 5, b"a"), seq=0), "sequence number 0 where 1 belongs"),
    (_chunk(5, 1, _enc(1, 5, b"a"), seq=7), "sequence number 7 where 1 belongs"),
    (_chunk(5, 1, _enc(1, 5, b"a"), seq=1)[:-1] + b"!", "checksum mismatch"),
])
def test_crafted_chunks_with_valid_checksums(tmp_path, chunk, why):
    p = tmp_path / "z.log"
    first = _chunk(0, 1, _enc(1, 0, b"ok"))
    p.write_bytes(HEADER + first + chunk)
    with pytest.raises(LogFormatError) as ei:
        LogReader(p)
    assert str(ei.value).startswith(f"corrupt chunk 1 at byte {len(HEADER) + len(first)} (")
    assert why in str(ei.value)
    rep = verify(p)
    assert not rep.ok and why in rep.problems[-1]


def test_chunks_going_back_in_time(tmp_path):
    p = tmp_path / "back.log"
    p.write_bytes(HEADER + _chunk(100, 2, _enc(1, 100, b"") + _enc(1, 50, b""))
                  + _chunk(120, 1, _enc(1, 120, b""), seq=1))
    with pytest.raises(LogFormatError, match=r"chunk 1 .*before the previous chunk's last 150"):
        list(LogReader(p))
    p.write_bytes(HEADER + _chunk(100, 1, _enc(1, 100, b"")) + _chunk(50, 1, _enc(1, 50, b""), seq=1))
    with pytest.raises(LogFormatError, match=r"chunk 1 .*before the previous"):
        LogReader(p)


def test_zip_bomb_is_capped(tmp_path):
    p = tmp_path / "bomb.log"
    bomb = zlib.compress(bytes(MAX_CHUNK_BYTES + 1), 1)
    p.write_bytes(HEADER + _chunk(0, 1, b"", compressed=bomb))
    with pytest.raises(LogFormatError, match="inflates past the 64 MiB cap"):
        LogReader(p)


def test_bad_structured_payload_is_damage(tmp_path):
    p = tmp_path / "bp.log"
    write_log(p, [Event(EventKind.CONSOLE_INPUT, 5, b"x"), Event(EventKind.REG_DIGEST, 7, b"\1\2\3"),
                  Event(EventKind.END, 9, ev.encode_end("exit", 0))])
    want = (f"corrupt chunk 0 at byte {len(HEADER)} (event 1 at icount 7: "
            f"bad REG_DIGEST payload (3 bytes, expected 232))")
    with pytest.raises(LogFormatError) as ei:
        LogReader(p)  # the last chunk is decoded on opening
    assert str(ei.value) == want
    rep = verify(p)
    assert not rep.ok and rep.problems == [want] and rep.verdict == "damaged"
    with pytest.raises(LogFormatError, match="bad REG_DIGEST payload"):
        describe(p, events=True)


# -- header and foreign files -----------------------------------------------------

def test_header_errors(tmp_path):
    p = tmp_path / "h.log"
    good = HEADER + _chunk(0, 1, _enc(1, 0, b""))

    def err(data: bytes) -> str:
        p.write_bytes(data)
        with pytest.raises(LogFormatError) as ei:
            LogReader(p)
        with pytest.raises(LogFormatError):
            read_header(p)
        with pytest.raises(LogFormatError):
            describe(p)
        rep = verify(p)
        assert not rep.ok and rep.problems == [str(ei.value)] and rep.stats is None
        assert_one_line(ei.value)
        return str(ei.value)

    assert err(b"XMMRLOG\0" + good[8:]) == "not a vmm replay log (bad magic)"
    assert err(good[:8] + struct.pack("<H", 7) + good[10:]) == \
        f"unsupported log format version 7 (this vmm reads versions {ev.MIN_FORMAT_VERSION} to {ev.FORMAT_VERSION})"
    flipped = bytearray(good)
    flipped[20] ^= 1
    assert err(bytes(flipped)) == "corrupt log header (checksum mismatch)"
    assert err(good[:10] + struct.pack("<I", 0x7FFF_FFFF) + good[14:]) == \
        "corrupt log header (length 2147483647 exceeds the 1 MiB cap)"
    assert err(b"") == "not a vmm replay log (the file is empty)"
    assert err(b"VMM") == "log truncated at byte 3 inside the header"
    assert err(HEADER[:40]) == f"log truncated at byte 40 inside the header (which is {len(HEADER)} bytes)"
    # a header with a valid checksum around something that is not the expected JSON
    for text in (b"[1, 2]", b"{\"config\": 1, \"initial_digest\": \"\"}", b"\xff\xfe", b"[" * 100_000):
        head = MAGIC + struct.pack("<HI", ev.FORMAT_VERSION, len(text)) + text
        assert err(head + struct.pack("<I", zlib.crc32(head))).startswith("corrupt log header (")


@pytest.mark.parametrize("data", [
    b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(200),
    b"\x7fELF\x02\x01\x01" + bytes(300),
    b"#!/bin/sh\necho hello\n",
    b"\0" * 4096,
    b"V",
    random.Random(3).randbytes(10_000),
], ids=["png", "elf", "text", "zeros", "one-byte", "random"])
def test_foreign_files(tmp_path, data):
    p = tmp_path / "foreign"
    p.write_bytes(data)
    with pytest.raises(LogFormatError) as ei:
        LogReader(p)
    assert_one_line(ei.value)
    assert str(ei.value).startswith(("not a vmm replay log", "log truncated at byte 1 inside the header"))
    assert not verify(p).ok


def test_every_header_byte_flip_is_a_clean_error(tmp_path, small_log):
    data, _, full = small_log
    p = tmp_path / "hf.log"
    for off in range(full.header.size):
        bad = bytearray(data)
        bad[off] ^= 0x80
        p.write_bytes(bytes(bad))
        with pytest.raises(LogFormatError) as ei:
            LogReader(p)
        assert_one_line(ei.value)


# -- describe ------------------------------------------------------------------------

def test_describe(tmp_path):
    p = tmp_path / "s.log"
    write_log(p, one_of_each(5), chunk_events=4)
    text = describe(p)
    for needle in (f"format version   {ev.FORMAT_VERSION}", f"initial digest   {DIGEST}", "mem_size", "33554432",
                   "chunks           3", "events           10", "icounts          5 .. 2005",
                   "REG_DIGEST       1", "end              icount 2005, reason 'exit', exit status 3"):
        assert needle in text, needle
    assert "CONSOLE_INPUT   b'hello\\r'" not in text
    listing = describe(p, events=True)
    assert "CONSOLE_INPUT   b'hello\\r'" in listing
    assert "RTC_EPOCH       1767225600 (2026-01-01 00:00:00 UTC)" in listing
    assert "8192 pages" in listing and "rip=" in listing
    assert "... 7 more" in describe(p, events=True, limit=3)


# -- fuzz: nothing but LogFormatError ----------------------------------------------------

def _exercise(path) -> None:
    """Everything a user can point at a file; only LogFormatError may escape."""
    for fn in (lambda: list(LogReader(path)), lambda: LogReader(path).stats(),
               lambda: describe(path, events=True), lambda: read_header(path)):
        try:
            fn()
        except LogFormatError as e:
            assert_one_line(e)
    rep = verify(path)
    for line in rep.problems + rep.warnings:
        assert "\n" not in line


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(tmp_path, data):
    p = tmp_path / "fz"
    p.write_bytes(data)
    _exercise(p)
    p.write_bytes(MAGIC + data)
    _exercise(p)
    p.write_bytes(HEADER + data)
    _exercise(p)


@FUZZ
@given(raw=st.binary(max_size=200), first=st.integers(0, (1 << 64) - 1), count=st.integers(0, 70))
def test_fuzz_chunk_contents_with_valid_checksums(tmp_path, raw, first, count):
    p = tmp_path / "fc"
    p.write_bytes(HEADER + _chunk(first, count, raw))
    _exercise(p)


@st.composite
def mutations(draw):
    n = draw(st.integers(1, 6))
    return [(draw(st.integers(0, 10_000)), draw(st.sampled_from(("flip", "set", "insert", "delete", "cut"))),
             draw(st.integers(0, 255))) for _ in range(n)]


@FUZZ
@given(muts=mutations())
def test_fuzz_mutated_valid_log(tmp_path, small_log, muts):
    data = bytearray(small_log[0])
    for pos, op, b in muts:
        pos %= len(data) + 1
        if op == "flip" and pos < len(data):
            data[pos] ^= 1 << (b % 8)
        elif op == "set" and pos < len(data):
            data[pos] = b
        elif op == "insert":
            data[pos:pos] = bytes([b]) * (b % 5 + 1)
        elif op == "delete":
            del data[pos:pos + b % 5 + 1]
        elif op == "cut":
            del data[pos:]
        if not data:
            break
    p = tmp_path / "fm"
    p.write_bytes(bytes(data))
    _exercise(p)
