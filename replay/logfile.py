"""The replay log file: a header readable on its own, then framed, checksummed,
zlib-compressed chunks of events (DESIGN.md "Record, replay, reverse").

On-disk layout, format version 3 (all integers little-endian)::

    header
      8 bytes   magic b"VMMRLOG\\x00"
      u16       format version (replay.events.FORMAT_VERSION)
      u32       J, length of the JSON text
      J bytes   UTF-8 JSON object {"config": {...}, "initial_digest": "<hex>"}
                (compact, keys sorted, so equal configs give equal headers)
      u32       CRC32 of every header byte before it (magic to JSON): H
    chunk, repeated until the end of the file
      u32       P, length of the compressed payload
      u32       sequence number: 0 for the first chunk, then 1, 2, ...
      u64       icount of the chunk's first event
      u32       N, number of events in the chunk
      u32       CRC32 of the payload
      u32       CRC32 of the 24 bytes above, seeded with H (the chunk head's own check)
      P bytes   zlib of the events, each encoded as
                  varint kind, varint icount delta, varint vCPU id,
                  varint payload length, payload
                where a varint is unsigned LEB128 (at most 10 bytes) and the
                delta is from the previous event of the same chunk; the first
                event's "delta" is from 0, i.e. its absolute icount, which
                must equal the chunk head's first icount (a cross-check:
                each chunk decodes on its own, so a reader can seek by icount).

Icounts never decrease, within a chunk and across chunks.  The END event is
the log's last event: a log is *complete* when its last chunk ends with END
and nothing follows it.  A reader tells three cases apart:

- **damage** (LogFormatError): a chunk head whose CRC fails (so a flipped
  length byte is damage, never a truncation), a sequence number out of turn
  (a chunk dropped, repeated or moved), a payload whose CRC fails, contents
  that do not decode (structured payloads included), events after the END,
  bytes after the END, or a chunk that declares more events than its size
  allows (see the caps below);
- **truncation** (``truncated``): the file ends inside a chunk whose head is
  whole and checks, or inside a chunk head.  The writer writes each chunk
  with one write, so a recorder killed at any moment leaves this, and the
  whole chunks before it replay;
- **incomplete** (``complete`` False): no damage, but the log does not end
  with its END: truncated, or the recorder stopped (or the tail was lost)
  between two chunks.  ``incomplete_note`` says so; a replay of such a log
  ends early and must say so.

Versions 1 and 2 (still read) frame a chunk as u32 P, u32 CRC32 of (the two
fields below and the payload), u64 first icount, u32 N, then the payload;
version 1 events have no vCPU id (all vCPU 0).  Without a head CRC, a length
that runs past the end of the file is taken for damage when the bytes after
the head hold a whole zlib stream whose CRC matches (the payload is all there:
only the length is wrong), and for truncation otherwise.  Without sequence
numbers, a dropped or repeated chunk is seen only through icount order, the
END and the replay's digests.

Limits are checked before work: the header JSON is at most 1 MiB; a chunk's
payload at most 64 MiB compressed and inflated; a chunk holds 1 to
MAX_CHUNK_EVENTS events and at most MAX_EVENTS_PER_BYTE events per byte of
its compressed payload (the writer stores a chunk uncompressed rather than
break this, so the count of events a log may declare is bounded by its size,
checked from the chunk heads before anything is inflated); an event payload
is at most MAX_EVENT_PAYLOAD.  The version is checked before anything else
after the magic (Firecracker issue 4676: a version buried in the body makes
old files unreadable).
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Self

from replay.events import (
    FORMAT_VERSION,
    MAX_EVENT_PAYLOAD,
    MIN_FORMAT_VERSION,
    U64_MAX,
    Event,
    EventKind,
    LogFormatError,
    check_payload,
    decode_end,
    decode_end_icounts,
    summarize,
)
from vmm.firmware.imagefile import open_regular   # a log path must be a regular file (a FIFO would block)

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CHUNK_BYTES",
    "MAX_CHUNK_EVENTS",
    "MAX_EVENTS_PER_BYTE",
    "MAX_HEADER_BYTES",
    "ChunkInfo",
    "LogFormatError",
    "LogHeader",
    "LogReader",
    "LogStats",
    "LogWriter",
    "StreamLogReader",
    "VerifyReport",
    "describe",
    "read_header",
    "verify",
]

MAGIC = b"VMMRLOG\x00"
MAX_HEADER_BYTES = 1 << 20      # the JSON text of the header
MAX_CHUNK_BYTES = 64 << 20      # a chunk payload, compressed and uncompressed
MAX_WRITER_CHUNK_BYTES = 32 << 20  # the largest chunk_bytes a writer accepts
MAX_CHUNK_EVENTS = 1 << 16      # events in one chunk
MAX_EVENTS_PER_BYTE = 8         # events per byte of a chunk's compressed payload

_HEAD = struct.Struct("<8sHI")     # magic, version, JSON length
_CRC = struct.Struct("<I")
_CHUNK = struct.Struct("<IIQIII")  # length, sequence, first icount, count, payload CRC, head CRC
_CHUNK_FIELDS = struct.Struct("<IIQII")  # what the head CRC covers
_CHUNK_V2 = struct.Struct("<IIQI")     # versions 1 and 2: length, CRC32, first icount, count
_CHUNK_V2_COVERED = struct.Struct("<QI")  # the head fields their CRC covers, before the payload
_KINDS = {int(k): k for k in EventKind}


def _mib(n: int) -> str:
    return f"{n >> 20} MiB"


# -- varints -------------------------------------------------------------------

def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


class _Garbage(Exception):
    """Raised inside chunk decoding; turned into a LogFormatError naming the chunk."""


def _read_varint(buf: bytes, off: int) -> tuple[int, int]:
    v = shift = 0
    end = min(len(buf), off + 10)
    while off < end:
        b = buf[off]
        off += 1
        v |= (b & 0x7F) << shift
        if not b & 0x80:
            if v > U64_MAX:
                raise _Garbage("varint overflows 64 bits")
            return v, off
        shift += 7
    raise _Garbage("varint runs past the end of the chunk" if end == len(buf) else "varint too long")


# -- header --------------------------------------------------------------------

@dataclass(frozen=True)
class LogHeader:
    version: int
    config: dict[str, Any]
    initial_digest: str
    size: int     # bytes, from the magic to the header CRC inclusive
    crc: int = 0  # the header CRC (version 3 chunk heads are checked against it)


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in s)


def encode_header(config: dict[str, Any], initial_digest: str) -> bytes:
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, not {type(config).__name__}")
    if not isinstance(initial_digest, str) or not _is_hex(initial_digest):
        raise ValueError(f"initial digest must be a hex string: {initial_digest!r}")
    text = json.dumps({"config": config, "initial_digest": initial_digest},
                      sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(f"log header too large ({len(text)} bytes, at most {_mib(MAX_HEADER_BYTES)})")
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, len(text)) + text
    return head + _CRC.pack(zlib.crc32(head))


def _read_header(f) -> LogHeader:
    first = f.read(_HEAD.size)
    if not first:
        raise LogFormatError("not a vmm replay log (the file is empty)")
    if first[:len(MAGIC)] != MAGIC[:len(first)]:
        raise LogFormatError("not a vmm replay log (bad magic)")
    if len(first) < _HEAD.size:
        raise LogFormatError(f"log truncated at byte {len(first)} inside the header")
    _, version, length = _HEAD.unpack(first)
    if not MIN_FORMAT_VERSION <= version <= FORMAT_VERSION:
        raise LogFormatError(f"unsupported log format version {version} "
                             f"(this vmm reads versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION})")
    if length > MAX_HEADER_BYTES:
        raise LogFormatError(f"corrupt log header (length {length} exceeds the "
                             f"{_mib(MAX_HEADER_BYTES)} cap)")
    rest = f.read(length + _CRC.size)
    if len(rest) < length + _CRC.size:
        raise LogFormatError(f"log truncated at byte {_HEAD.size + len(rest)} inside the header "
                             f"(which is {_HEAD.size + length + _CRC.size} bytes)")
    text = rest[:length]
    (crc,) = _CRC.unpack_from(rest, length)
    if zlib.crc32(first + text) != crc:
        raise LogFormatError("corrupt log header (checksum mismatch)")
    try:
        obj = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError):
        raise LogFormatError("corrupt log header (not valid JSON)") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("config"), dict) \
            or not isinstance(obj.get("initial_digest"), str) or not _is_hex(obj["initial_digest"]):
        raise LogFormatError("corrupt log header (expected a JSON object with config and initial_digest)")
    return LogHeader(version, obj["config"], obj["initial_digest"], _HEAD.size + length + _CRC.size, crc)


def read_header(path: str | os.PathLike) -> LogHeader:
    """Only the header (cheap: the chunks are not read)."""
    with open_regular(path) as f:
        return _read_header(f)


# -- chunks --------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkInfo:
    index: int
    offset: int        # file offset of the chunk head
    length: int        # compressed payload bytes
    crc: int           # version 3: the payload's CRC32; versions 1-2: the chunk's
    first_icount: int
    event_count: int
    head_size: int = _CHUNK.size

    @property
    def end(self) -> int:
        return self.offset + self.head_size + self.length


def _head_size(version: int) -> int:
    return _CHUNK.size if version >= 3 else _CHUNK_V2.size


def _v2_crc(first_icount: int, count: int, payload: bytes) -> int:
    # the icount and count are covered too: a damaged one must not shift or cut a chunk unnoticed
    return zlib.crc32(payload, zlib.crc32(_CHUNK_V2_COVERED.pack(first_icount, count)))


def _payload_ok(c: ChunkInfo, payload: bytes) -> bool:
    if c.head_size == _CHUNK.size:
        return zlib.crc32(payload) == c.crc
    return _v2_crc(c.first_icount, c.event_count, payload) == c.crc


def _encode_chunk(seq: int, first_icount: int, count: int, raw: bytes, header_crc: int) -> bytes:
    payload = zlib.compress(raw, 6)
    if count > MAX_EVENTS_PER_BYTE * len(payload):
        payload = zlib.compress(raw, 0)  # stored: at least 4 bytes an event, inside the density cap
    fields = _CHUNK_FIELDS.pack(len(payload), seq, first_icount, count, zlib.crc32(payload))
    return fields + _CRC.pack(zlib.crc32(fields, header_crc)) + payload


def _corrupt(c: ChunkInfo | int, offset: int | None, why: str) -> LogFormatError:
    idx = c.index if isinstance(c, ChunkInfo) else c
    off = c.offset if isinstance(c, ChunkInfo) else offset
    return LogFormatError(f"corrupt chunk {idx} at byte {off} ({why})")


def _parse_head(head: bytes, header: LogHeader, idx: int, off: int | None,
                prev_first: int) -> tuple[int, int, int, int]:
    """(length, crc, first icount, count) of a whole chunk head, every field that
    can be checked before its payload is read checked (LogFormatError if not)."""
    if header.version >= 3:
        length, seq, first, count, crc, head_crc = _CHUNK.unpack(head)
        if zlib.crc32(head[:_CHUNK_FIELDS.size], header.crc) != head_crc:
            raise _corrupt(idx, off, "chunk head checksum mismatch")
        if seq != idx:
            raise _corrupt(idx, off, f"sequence number {seq} where {idx} belongs: "
                                     f"a chunk is missing, repeated or out of place")
    else:
        length, crc, first, count = _CHUNK_V2.unpack(head)
    if length > MAX_CHUNK_BYTES:
        raise _corrupt(idx, off, f"payload length {length} exceeds the {_mib(MAX_CHUNK_BYTES)} cap")
    if header.version >= 3:
        _check_counts(idx, off, length, first, count, prev_first)
    return length, crc, first, count


def _check_counts(idx: int, off: int | None, length: int, first: int, count: int, prev_first: int) -> None:
    if count == 0:
        raise _corrupt(idx, off, "no events")
    if count > MAX_CHUNK_EVENTS:
        raise _corrupt(idx, off, f"declares {count} events, more than the {MAX_CHUNK_EVENTS} a chunk may hold")
    if count > MAX_EVENTS_PER_BYTE * length:
        raise _corrupt(idx, off, f"declares {count} events in a {length}-byte payload, more than "
                                 f"{MAX_EVENTS_PER_BYTE} events a byte")
    if first < prev_first:
        raise _corrupt(idx, off, f"first icount {first} is before the previous chunk's first {prev_first}")


def _legacy_payload_is_whole(data: bytes, first: int, count: int, crc: int) -> bool:
    """For a version 1-2 chunk whose length runs past the end of the file: do the
    bytes after its head begin with a whole zlib stream whose CRC matches?  Then
    the payload is all there and only the length field is wrong (damage); a
    truncated payload never holds a whole stream."""
    d = zlib.decompressobj()
    inflated = 0
    buf = data
    try:
        while not d.eof:
            out = d.decompress(buf, 1 << 20)  # in steps: only where the stream ends matters
            inflated += len(out)
            if inflated > MAX_CHUNK_BYTES:
                return False
            buf = d.unconsumed_tail
            if not out and not buf:  # all input taken and nothing pending: the stream is cut
                break
    except zlib.error:
        return False
    if not d.eof:
        return False
    used = len(data) - len(d.unused_data)
    return _v2_crc(first, count, data[:used]) == crc


def _decode_chunk(c: ChunkInfo, payload: bytes, version: int = FORMAT_VERSION) -> tuple[list[Event], int]:
    """The events of a chunk whose CRC matched, and its uncompressed size."""
    d = zlib.decompressobj()
    try:
        raw = d.decompress(payload, MAX_CHUNK_BYTES + 1)
    except zlib.error:
        raise _corrupt(c, None, "payload does not decompress") from None
    if len(raw) > MAX_CHUNK_BYTES:
        raise _corrupt(c, None, f"payload inflates past the {_mib(MAX_CHUNK_BYTES)} cap")
    if not d.eof or d.unused_data:
        raise _corrupt(c, None, "payload is not one whole zlib stream")
    events: list[Event] = []
    off = 0
    icount = 0
    ended = False
    try:
        while off < len(raw):
            if len(events) >= c.event_count:
                raise _Garbage(f"more events than the {c.event_count} the chunk head says")
            kind, off = _read_varint(raw, off)
            delta, off = _read_varint(raw, off)
            vcpu = 0
            if version >= 2:
                vcpu, off = _read_varint(raw, off)
                if vcpu >= 1 << 16:
                    raise _Garbage(f"vCPU id {vcpu} out of range")
            size, off = _read_varint(raw, off)
            if kind not in _KINDS:
                raise _Garbage(f"unknown event kind {kind}")
            icount += delta
            if icount > U64_MAX:
                raise _Garbage("icount overflows 64 bits")
            if size > MAX_EVENT_PAYLOAD:
                raise _Garbage(f"event payload of {size} bytes exceeds the {_mib(MAX_EVENT_PAYLOAD)} limit")
            if off + size > len(raw):
                raise _Garbage(f"event payload of {size} bytes runs past the end of the chunk")
            if ended:
                raise _Garbage(f"{_KINDS[kind].name} event at icount {icount} after the END")
            e = Event(_KINDS[kind], icount, raw[off:off + size], vcpu)
            try:
                check_payload(e.kind, e.payload)
            except LogFormatError as err:
                raise _Garbage(f"event {len(events)} at icount {icount}: {err}") from None
            events.append(e)
            ended = e.kind is EventKind.END
            off += size
        if events and events[0].icount != c.first_icount:
            raise _Garbage(f"first event at icount {events[0].icount}, "
                           f"the chunk header says {c.first_icount}")
    except _Garbage as e:
        raise _corrupt(c, None, str(e)) from None
    if len(events) != c.event_count:
        raise _corrupt(c, None, f"{len(events)} events, the chunk header says {c.event_count}")
    return events, len(raw)


class _Sequence:
    """What must hold across chunks, for every reader: icount order, and nothing after the END."""

    def __init__(self) -> None:
        self.last_icount: int | None = None
        self.ended = False

    def check(self, c: ChunkInfo, events: list[Event]) -> None:
        if self.ended:
            raise _corrupt(c, None, f"{events[0].kind.name} event at icount {events[0].icount} after the END")
        if self.last_icount is not None and events[0].icount < self.last_icount:
            raise _corrupt(c, None, f"first icount {events[0].icount} is before the "
                                    f"previous chunk's last {self.last_icount}")
        self.last_icount = events[-1].icount
        self.ended = events[-1].kind is EventKind.END


@dataclass
class _Scan:
    chunks: list[ChunkInfo]
    end_offset: int
    file_size: int
    truncated: bool
    error: LogFormatError | None  # a corrupt chunk: the chunks before it are good


def _scan(f, header: LogHeader, size: int) -> _Scan:
    """Walk the chunk heads, checking caps, order, sequence and every payload CRC."""
    chunks: list[ChunkInfo] = []
    off = header.size
    prev_first = 0
    hs = _head_size(header.version)
    while off < size:
        idx = len(chunks)
        f.seek(off)
        head = f.read(hs)
        if len(head) < hs:
            return _Scan(chunks, off, size, True, None)
        try:
            length, crc, first, count = _parse_head(head, header, idx, off, prev_first)
        except LogFormatError as e:
            return _Scan(chunks, off, size, False, e)
        if off + hs + length > size:
            if header.version < 3 and _legacy_payload_is_whole(f.read(min(size - off - hs, MAX_CHUNK_BYTES)),
                                                               first, count, crc):
                return _Scan(chunks, off, size, False, _corrupt(
                    idx, off, f"payload length {length} runs past the end of the file, but the payload "
                              f"before it is whole: a damaged length"))
            return _Scan(chunks, off, size, True, None)
        payload = f.read(length)
        if len(payload) < length:  # the file shrank under us
            return _Scan(chunks, off, size, True, None)
        c = ChunkInfo(idx, off, length, crc, first, count, hs)
        if not _payload_ok(c, payload):
            return _Scan(chunks, off, size, False, _corrupt(idx, off, "checksum mismatch"))
        if header.version < 3:
            try:
                _check_counts(idx, off, length, first, count, prev_first)
            except LogFormatError as e:
                return _Scan(chunks, off, size, False, e)
        chunks.append(c)
        prev_first = first
        off += hs + length
    return _Scan(chunks, off, size, False, None)


def _truncation_note(scan: _Scan, last_icount: int | None) -> str:
    k = len(scan.chunks)
    upto = f"up to icount {last_icount}" if last_icount is not None else "no events"
    return (f"log truncated at byte {scan.file_size} inside chunk {k}: "
            f"replaying the first {k} chunks ({upto})")


def _no_end_note(last_icount: int | None) -> str:
    upto = f"its events end at icount {last_icount}" if last_icount is not None else "it holds no events"
    return (f"the log has no END event ({upto}): the recording did not finish, "
            f"or the log lost its last chunks")


# -- stats ---------------------------------------------------------------------

@dataclass
class LogStats:
    chunks: int = 0
    events: int = 0
    events_per_kind: dict[str, int] = field(default_factory=dict)  # kind name -> count, enum order
    header_bytes: int = 0
    compressed_bytes: int = 0    # chunk payloads as stored
    uncompressed_bytes: int = 0  # chunk payloads inflated (encoded events)
    file_bytes: int = 0          # the whole file, including any truncated tail
    first_icount: int | None = None
    last_icount: int | None = None
    end: Event | None = None     # the END event, if any


# -- reader --------------------------------------------------------------------

class LogReader:
    """Reads a log: ``.header``, iteration over its events in order, and where
    it ends.  Opening checks the header, the framing and CRC of every chunk and
    the contents of the last one (raising LogFormatError); the other chunks'
    contents are checked as iteration reaches them (LogFormatError then).

    A log that ends inside a chunk is not an error: ``.truncated`` is set and
    ``.truncation_note`` says what will be replayed.  ``.complete`` is True
    when the log ends with its END event; otherwise ``.incomplete_note`` is
    one line saying why (a truncation, or no END), for a replay that ends
    early to report.  The file is reopened for each iteration; nothing stays
    open."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open_regular(self.path) as f:
            self.header = _read_header(f)
            size = os.fstat(f.fileno()).st_size
            scan = _scan(f, self.header, size)
            if scan.error:
                raise scan.error
            self.chunks: tuple[ChunkInfo, ...] = tuple(scan.chunks)
            self.last_icount: int | None = None
            ended = False
            if scan.chunks:
                last = scan.chunks[-1]
                events, _ = _decode_chunk(last, self._payload(f, last), self.header.version)
                self.last_icount = events[-1].icount
                ended = events[-1].kind is EventKind.END
            if ended and scan.truncated:
                raise _corrupt(len(scan.chunks), scan.end_offset,
                               f"{size - scan.end_offset} stray bytes after the END")
        self.truncated: bool = scan.truncated
        self.complete: bool = ended and not scan.truncated
        self.end_offset: int = scan.end_offset  # where the whole chunks end
        self.file_size: int = scan.file_size
        self.truncation_note: str | None = (_truncation_note(scan, self.last_icount)
                                            if scan.truncated else None)
        self.incomplete_note: str | None = (None if self.complete else
                                            self.truncation_note or _no_end_note(self.last_icount))
        self._stats: LogStats | None = None

    @property
    def first_icount(self) -> int | None:
        return self.chunks[0].first_icount if self.chunks else None

    @staticmethod
    def _payload(f, c: ChunkInfo) -> bytes:
        f.seek(c.offset + c.head_size)
        payload = f.read(c.length)
        if len(payload) != c.length or not _payload_ok(c, payload):
            raise _corrupt(c, None, "changed since the log was opened")
        return payload

    def _chunk_events(self, start_chunk: int = 0) -> Iterator[tuple[ChunkInfo, list[Event], int]]:
        seq = _Sequence()
        with open_regular(self.path) as f:
            for c in self.chunks[start_chunk:]:
                events, raw_size = _decode_chunk(c, self._payload(f, c), self.header.version)
                seq.check(c, events)
                yield c, events, raw_size

    def events(self, start_icount: int = 0) -> Iterator[Event]:
        """The events with icount >= start_icount, in order (whole chunks that
        end before start_icount are skipped without being read)."""
        start = 0
        while start + 1 < len(self.chunks) and self.chunks[start + 1].first_icount < start_icount:
            start += 1
        for _, events, _ in self._chunk_events(start):
            for e in events:
                if e.icount >= start_icount:
                    yield e

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def stats(self) -> LogStats:
        """Counts over the whole log (reads and decodes every chunk once)."""
        if self._stats is None:
            s = LogStats(chunks=len(self.chunks), header_bytes=self.header.size,
                         file_bytes=self.file_size)
            per = {k: 0 for k in EventKind}
            for c, events, raw_size in self._chunk_events():
                s.compressed_bytes += c.length
                s.uncompressed_bytes += raw_size
                s.events += len(events)
                for e in events:
                    per[e.kind] += 1
                    if e.kind is EventKind.END:
                        s.end = e
            s.events_per_kind = {k.name: n for k, n in per.items() if n}
            s.first_icount, s.last_icount = self.first_icount, self.last_icount
            self._stats = s
        return self._stats


class StreamLogReader:
    """Reads a log from a stream (a socket, a pipe) as it arrives: ``.header``
    at once, then the events chunk by chunk, each checked as the file reader
    checks it.  Iteration blocks until the next chunk is there and ends at the
    end of the stream; a stream that ends inside a chunk leaves ``truncated``
    set.  ``received`` holds every event read so far.  Once the stream has
    ended, ``complete`` says whether it ended with the END (and nothing after
    it); ``incomplete_note`` says why not."""

    def __init__(self, stream: BinaryIO):
        self._f = stream
        self.path = getattr(stream, "name", "<stream>")
        self.header = _read_header(stream)
        self.truncated = False
        self.truncation_note: str | None = None
        self.last_icount: int | None = None
        self.chunks_read = 0
        self._prev_first = 0
        self._seq = _Sequence()
        self._done = False

    @property
    def complete(self) -> bool:
        return self._done and self._seq.ended and not self.truncated

    @property
    def incomplete_note(self) -> str | None:
        if self.complete:
            return None
        if not self._done:
            return "the log stream has not ended yet"
        return self.truncation_note or _no_end_note(self.last_icount)

    def _next_chunk(self) -> list[Event] | None:
        hs = _head_size(self.header.version)
        head = _read_full(self._f, hs)
        idx = self.chunks_read
        if head and self._seq.ended:
            raise _corrupt(idx, None, "stray bytes after the END")
        if not head:
            return None
        if len(head) < hs:
            return self._truncated()
        length, crc, first, count = _parse_head(head, self.header, idx, None, self._prev_first)
        payload = _read_full(self._f, length)
        if len(payload) < length:
            if self.header.version < 3 and _legacy_payload_is_whole(payload, first, count, crc):
                raise _corrupt(idx, None, f"payload length {length} runs past the end of the stream, but the "
                                          f"payload before it is whole: a damaged length")
            return self._truncated()
        c = ChunkInfo(idx, -1, length, crc, first, count, hs)
        if not _payload_ok(c, payload):
            raise _corrupt(idx, None, "checksum mismatch")
        if self.header.version < 3:
            _check_counts(idx, None, length, first, count, self._prev_first)
        events, _ = _decode_chunk(c, payload, self.header.version)
        self._seq.check(c, events)
        self._prev_first = first
        self.chunks_read += 1
        self.last_icount = events[-1].icount
        return events

    def _truncated(self) -> None:
        self.truncated = True
        self.truncation_note = (f"log stream ended inside chunk {self.chunks_read}: replaying what came "
                                f"before it (up to icount {self.last_icount})")

    def __iter__(self) -> Iterator[Event]:
        while not self._done:
            events = self._next_chunk()
            if events is None:
                self._done = True
                return
            yield from events


def _read_full(f: BinaryIO, n: int) -> bytes:
    """Up to n bytes, fewer only at the end of the stream."""
    out = bytearray()
    while len(out) < n:
        b = f.read(n - len(out))
        if not b:
            break
        out += b
    return bytes(out)


# -- writer --------------------------------------------------------------------

class LogWriter:
    """Writes a log.  The header goes to the file at once; events collect into
    a chunk that is compressed, written and flushed to the OS when it holds
    ``chunk_events`` events or ``chunk_bytes`` encoded bytes, on ``flush()``
    and on ``close()``.  Event icounts must never decrease, and the END event
    is the last: nothing may be appended after it."""

    def __init__(self, path: str | os.PathLike | BinaryIO, config: dict[str, Any], initial_digest: str,
                 chunk_events: int = 256, chunk_bytes: int = 64 << 10):
        if not 1 <= chunk_events <= MAX_CHUNK_EVENTS:
            raise ValueError(f"chunk_events must be in [1, {MAX_CHUNK_EVENTS}]: {chunk_events}")
        if not 1 <= chunk_bytes <= MAX_WRITER_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in [1, {MAX_WRITER_CHUNK_BYTES}]: {chunk_bytes}")
        header = encode_header(config, initial_digest)
        (self._header_crc,) = _CRC.unpack_from(header, len(header) - _CRC.size)
        self.chunk_events = chunk_events
        self.chunk_bytes = chunk_bytes
        if hasattr(path, "write"):
            # a stream (a socket's file, a pipe): the same bytes a file would get
            self.path = getattr(path, "name", "<stream>")
            self._f = path
        else:
            self.path = os.fspath(path)
            self._f = open(self.path, "wb")  # noqa: SIM115 - held until close()
        self._f.write(header)
        self._f.flush()
        self._buf = bytearray()
        self._count = 0
        self._first = 0
        self._prev: int | None = None        # icount of the previous event in the chunk
        self.last_icount: int | None = None  # icount of the last event appended
        self.ended = False                   # the END event was appended
        self.chunks_written = 0
        self.events_written = 0              # events in chunks already written
        self.bytes_written = len(header)

    @property
    def closed(self) -> bool:
        return self._f.closed

    def restart(self, config: dict[str, Any], initial_digest: str) -> None:
        """Write what is pending, then begin a new log on the same stream: a new header,
        chunks numbered from 0 (lockstep FT: a backup that joins a running primary gets
        a log that starts from the machine's state now, replay/ft/primary.py)."""
        self.flush()
        header = encode_header(config, initial_digest)
        (self._header_crc,) = _CRC.unpack_from(header, len(header) - _CRC.size)
        self._f.write(header)
        self._f.flush()
        self.chunks_written = 0
        self.events_written = 0
        self.bytes_written = len(header)

    def append(self, event: Event) -> None:
        if self._f.closed:
            raise ValueError("append to a closed log")
        if not isinstance(event, Event):
            raise TypeError(f"expected an Event, got {type(event).__name__}")
        if self.ended:
            raise ValueError(f"{event.kind.name} event after the END event: the END is the log's last")
        if self.last_icount is not None and event.icount < self.last_icount:
            raise ValueError(f"{event.kind.name} event at icount {event.icount} comes after one at "
                             f"{self.last_icount}: icounts must be non-decreasing")
        if len(event.payload) > MAX_EVENT_PAYLOAD:
            raise ValueError(f"{event.kind.name} payload of {len(event.payload)} bytes exceeds "
                             f"the {_mib(MAX_EVENT_PAYLOAD)} limit")
        if self._count == 0:
            self._first = event.icount
            delta = event.icount
        else:
            delta = event.icount - self._prev
        self._buf += _varint(event.kind) + _varint(delta) + _varint(event.vcpu) + _varint(len(event.payload))
        self._buf += event.payload
        self._count += 1
        self._prev = self.last_icount = event.icount
        self.ended = event.kind is EventKind.END
        if self._count >= self.chunk_events or len(self._buf) >= self.chunk_bytes:
            self._write_chunk()

    def extend(self, events) -> None:
        for e in events:
            self.append(e)

    def _write_chunk(self) -> None:
        data = _encode_chunk(self.chunks_written, self._first, self._count, bytes(self._buf), self._header_crc)
        self._f.write(data)  # one write per chunk, then to the OS: a kill loses only this chunk
        self._f.flush()
        self.chunks_written += 1
        self.events_written += self._count
        self.bytes_written += len(data)
        self._buf.clear()
        self._count = 0
        self._prev = None

    def flush(self) -> None:
        """Write the events appended so far as a (possibly short) chunk."""
        if self._f.closed:
            return
        if self._count:
            self._write_chunk()
        self._f.flush()

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            self.flush()
        finally:
            self._f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- verify and describe ---------------------------------------------------------

@dataclass
class VerifyReport:
    ok: bool
    problems: list[str] = field(default_factory=list)   # damage, an unusable config, an incomplete log
    warnings: list[str] = field(default_factory=list)   # usable but odd, e.g. two RTC_EPOCH events
    header: LogHeader | None = None
    stats: LogStats | None = None                       # over the readable part
    truncated: bool = False
    complete: bool = False                              # the log ends with its END event
    incomplete_note: str | None = None                  # why not, for a log with no damage

    @property
    def verdict(self) -> str:
        """"ok"; "incomplete" (sound, but it ends before its END: replay would stop early); "damaged"."""
        if self.ok:
            return "ok"
        return "incomplete" if self.problems == [self.incomplete_note] else "damaged"

    def __str__(self) -> str:
        lines = [self.verdict]
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def verify(path: str | os.PathLike) -> VerifyReport:
    """Check everything a replay relies on: the header and its machine config
    (replay.config.check_config), the framing, every chunk's checksums and
    contents (structured payloads included), icount order, and that the log
    ends with its END.  ``ok`` only for a log that replays in full.  Never
    raises LogFormatError: the problems are in the report (OSError, e.g. a
    missing file, propagates)."""
    from replay.config import check_config

    rep = VerifyReport(ok=False)
    with open_regular(path) as f:
        try:
            rep.header = _read_header(f)
        except LogFormatError as e:
            rep.problems.append(str(e))
            return rep
        try:
            check_config(rep.header.config)
        except LogFormatError as e:
            rep.problems.append(str(e))
        size = os.fstat(f.fileno()).st_size
        scan = _scan(f, rep.header, size)
        s = rep.stats = LogStats(header_bytes=rep.header.size, file_bytes=size)
        per = {k: 0 for k in EventKind}
        seq = _Sequence()
        rtc = 0
        damaged = False
        try:
            for c in scan.chunks:
                events, raw_size = _decode_chunk(c, LogReader._payload(f, c), rep.header.version)
                seq.check(c, events)
                s.chunks += 1
                s.events += len(events)
                s.compressed_bytes += c.length
                s.uncompressed_bytes += raw_size
                if s.first_icount is None:
                    s.first_icount = events[0].icount
                s.last_icount = seq.last_icount
                for e in events:
                    per[e.kind] += 1
                    if e.kind is EventKind.END:
                        s.end = e
                    elif e.kind is EventKind.RTC_EPOCH:
                        rtc += 1
        except LogFormatError as e:
            rep.problems.append(str(e))
            damaged = True
        s.events_per_kind = {k.name: n for k, n in per.items() if n}
    if scan.error:
        rep.problems.append(str(scan.error))
    elif not damaged and seq.ended and scan.truncated:
        rep.problems.append(str(_corrupt(len(scan.chunks), scan.end_offset,
                                         f"{size - scan.end_offset} stray bytes after the END")))
    elif not damaged:
        rep.truncated = scan.truncated
        rep.complete = seq.ended and not scan.truncated
        if not rep.complete:
            rep.incomplete_note = (_truncation_note(scan, s.last_icount) if scan.truncated
                                   else _no_end_note(s.last_icount))
            rep.problems.append(rep.incomplete_note)
    if rtc > 1:
        rep.warnings.append(f"{rtc} RTC_EPOCH events (expected one)")
    rep.ok = not rep.problems
    return rep


def _size(n: int) -> str:
    if n < 10 << 10:
        return f"{n} B"
    if n < 10 << 20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1 << 20):.1f} MiB"


def describe(path: str | os.PathLike, events: bool = False, limit: int | None = None) -> str:
    """A human-readable summary of a log (``vmm log show``); with ``events``,
    one line per event (the first ``limit`` of them).  Raises LogFormatError
    with a one-line message if the log is damaged (a truncated log is shown,
    with a note)."""
    r = LogReader(path)
    s = r.stats()
    h = r.header
    out = [f"vmm replay log {os.fspath(path)}",
           f"  format version   {h.version}",
           f"  header           {h.size} bytes",
           f"  initial digest   {h.initial_digest or '(none)'}"]
    if h.config:
        out.append("  config")
        width = max(len(str(k)) for k in h.config)
        for k in sorted(h.config, key=str):
            v = h.config[k]
            text = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
            out.append(f"    {k!s:<{width}}  {text}")
    else:
        out.append("  config           (empty)")
    ratio = f" ({s.uncompressed_bytes / s.compressed_bytes:.1f}x)" if s.compressed_bytes else ""
    out += [f"  chunks           {s.chunks}",
            f"  events           {s.events}",
            f"  icounts          {s.first_icount} .. {s.last_icount}" if s.events else
            "  icounts          (no events)",
            (f"  sizes            file {_size(s.file_bytes)}, events {_size(s.uncompressed_bytes)} "
             f"compressed to {_size(s.compressed_bytes)}{ratio}")]
    for name, n in s.events_per_kind.items():
        out.append(f"    {name:<15}  {n}")
    if s.end is not None:
        end = decode_end(s.end.payload)
        out.append(f"  end              icount {s.end.icount}, reason {end.reason!r}, "
                   f"exit status {end.exit_status}" + (f": {end.message}" if end.message else ""))
        counts = decode_end_icounts(s.end.payload)
        if counts is None:
            out.append(f"  per vCPU         (not recorded: a version {h.version} log)")
        for vid, n in enumerate(counts or ()):
            out.append(f"  {'vCPU ' + str(vid):<15}  {n:,} instructions")
    else:
        out.append("  end              (no END event: the recorder did not finish)")
    if r.incomplete_note:
        out.append(f"  note: {r.incomplete_note}")
    if events:
        out.append("  events")
        for i, e in enumerate(r):
            if limit is not None and i >= limit:
                out.append(f"    ... {s.events - limit} more")
                break
            out.append(f"    {e.icount:>14}  {e.kind.name:<14}  {summarize(e)}")
    return "\n".join(out)
