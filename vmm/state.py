"""Saved state: the plain-data encoding every part's state is written in, and
the snapshot file.

Every stateful part of a machine (each vCPU, the clock, RAM, the EPT, every
device, the firmware, the platform's own bookkeeping) saves itself as plain
data: ``None``, bools, ints, strings, bytes, lists and dicts with string
keys, with ``"kind"`` and ``"version"`` keys in its top dict (Firecracker's
Persist, QEMU's VMState).  A machine's state is a dict of such parts keyed by
stable ids ("vcpu0", "clock", "dev:pit", ...), never by list position, so a
part that is added later does not shift the others.

The encoding (``encode``/``decode``) is a small tagged binary format of this
project's own, so that a snapshot file holds no pickled objects (loading one
runs no code) and every length is checked against what remains of the input
before anything is allocated.  Decoding is bounded: nesting by MAX_DEPTH,
integers by 4096 bits, the number of items (every value, list element and
dict entry) by a budget shared by all of a file's sections (MAX_ITEMS), and
each section's inflated size by a cap (RAM by the configured memory size,
other parts MAX_PART_BYTES) - so a hostile file costs bounded time and
memory, and anything wrong with it is one SnapshotError line.

Snapshot file layout (all integers little-endian)::

    8 bytes   magic b"VMMSNAP\\0"
    u16       format version (SNAPSHOT_VERSION; readers accept MIN_READ_VERSION..)
    u32       H, length of the header
    H bytes   UTF-8 JSON object: {"config": {...}, "icount": N, "created_by": ...,
              "sections": [{"id": ..., "size": ..., "crc32": ...}, ...]}
    u32       CRC32 of everything before it
    sections, in the order the header lists them, each
      u32     length of the id, then the id (UTF-8)
      u32     P, length of the payload
      u32     CRC32 of the payload
      P bytes zlib of encode(part state)

The header is readable on its own (Firecracker's lesson: a version buried
in the body makes old files unreadable), and it names every section with its
size and checksum, so a truncated file is recognised before any section is
trusted.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from typing import Any, BinaryIO

SNAPSHOT_MAGIC = b"VMMSNAP\x00"
SNAPSHOT_VERSION = 1
MIN_READ_VERSION = 1
MAX_HEADER = 1 << 20
MAX_SECTION = 4 << 30          # a section's compressed size (RAM of a large guest)
MAX_DEPTH = 64
MAX_ITEMS = 1 << 20            # decoded items in one file (a machine saves a few thousand)
MAX_PART_BYTES = 64 << 20      # a section other than RAM and the EPT, inflated
MAX_SECTION_ID = 256           # bytes of a section id
MIN_MEM, MAX_MEM = 2 << 20, 3 << 30  # the memory sizes a machine may have (as the CLI's --mem)

_T_NONE, _T_FALSE, _T_TRUE, _T_INT, _T_NEGINT, _T_STR, _T_BYTES, _T_LIST, _T_DICT = range(9)


class StateError(ValueError):
    """Saved state that cannot be encoded or decoded; one line naming the problem."""


class SnapshotError(ValueError):
    """A snapshot file that cannot be used (corrupt, truncated, wrong version)."""


# -- the encoding ------------------------------------------------------------------------

def _uvarint(v: int, out: bytearray) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def encode(obj: Any) -> bytes:
    """Plain data -> bytes (raises StateError for anything that is not plain data)."""
    out = bytearray()
    _enc(obj, out, 0)
    return bytes(out)


def _enc(obj: Any, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise StateError("state nests too deeply")
    if obj is None:
        out.append(_T_NONE)
    elif obj is False:
        out.append(_T_FALSE)
    elif obj is True:
        out.append(_T_TRUE)
    elif type(obj) is int:
        if obj >= 0:
            out.append(_T_INT)
            _uvarint(obj, out)
        else:
            out.append(_T_NEGINT)
            _uvarint(-obj, out)
    elif type(obj) is str:
        raw = obj.encode("utf-8")
        out.append(_T_STR)
        _uvarint(len(raw), out)
        out += raw
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        raw = bytes(obj)
        out.append(_T_BYTES)
        _uvarint(len(raw), out)
        out += raw
    elif isinstance(obj, (list, tuple)):
        out.append(_T_LIST)
        _uvarint(len(obj), out)
        for x in obj:
            _enc(x, out, depth + 1)
    elif isinstance(obj, dict):
        out.append(_T_DICT)
        _uvarint(len(obj), out)
        for k, v in obj.items():
            if type(k) is not str:
                raise StateError(f"state dict key {k!r} is not a string")
            raw = k.encode("utf-8")
            _uvarint(len(raw), out)
            out += raw
            _enc(v, out, depth + 1)
    else:
        raise StateError(f"{type(obj).__name__} is not plain data: {obj!r:.60}")


class _Reader:
    __slots__ = ("buf", "items", "pos")

    def __init__(self, buf: bytes, items: int):
        self.buf = buf
        self.pos = 0
        self.items = items  # how many more items may be decoded

    def spend(self, n: int) -> None:
        if n > self.items:
            raise StateError(f"saved state holds more than the {MAX_ITEMS} items a snapshot may hold")
        self.items -= n

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise StateError("saved state ends early")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def uvarint(self, limit_bits: int = 4096) -> int:
        v = shift = 0
        while True:
            b = self.byte()
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                return v
            shift += 7
            if shift > limit_bits:
                raise StateError("an integer in the saved state is too long")

    def take(self, n: int) -> bytes:
        if n > len(self.buf) - self.pos:
            raise StateError(f"saved state claims {n} bytes where {len(self.buf) - self.pos} remain")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b


def decode(buf: bytes, max_items: int = MAX_ITEMS) -> Any:
    """bytes -> plain data; StateError for anything malformed (never another
    exception), or holding more than ``max_items`` items."""
    return _decode(buf, max_items)[0]


def _decode(buf: bytes, max_items: int) -> tuple[Any, int]:
    """(plain data, the items it holds)."""
    r = _Reader(buf, max_items)
    obj = _dec(r, 0)
    if r.pos != len(buf):
        raise StateError(f"{len(buf) - r.pos} stray bytes after the saved state")
    return obj, max_items - r.items


def _dec(r: _Reader, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise StateError("saved state nests too deeply")
    r.spend(1)
    t = r.byte()
    if t == _T_NONE:
        return None
    if t == _T_FALSE:
        return False
    if t == _T_TRUE:
        return True
    if t == _T_INT:
        return r.uvarint()
    if t == _T_NEGINT:
        return -r.uvarint()
    if t in (_T_STR, _T_BYTES):
        raw = r.take(r.uvarint(64))
        if t == _T_BYTES:
            return raw
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise StateError("a string in the saved state is not UTF-8") from None
    if t == _T_LIST:
        n = r.uvarint(64)
        if n > len(r.buf) - r.pos:
            raise StateError(f"a list of {n} items cannot fit in what remains")
        if n > r.items:
            r.spend(n)
        return [_dec(r, depth + 1) for _ in range(n)]
    if t == _T_DICT:
        n = r.uvarint(64)
        if n > len(r.buf) - r.pos:
            raise StateError(f"a dict of {n} items cannot fit in what remains")
        if n > r.items:
            r.spend(n)
        d = {}
        for _ in range(n):
            k = r.take(r.uvarint(64))
            try:
                key = k.decode("utf-8")
            except UnicodeDecodeError:
                raise StateError("a key in the saved state is not UTF-8") from None
            d[key] = _dec(r, depth + 1)
        return d
    raise StateError(f"unknown tag {t} in the saved state")


# -- the snapshot file ------------------------------------------------------------------

_HEAD = struct.Struct("<8sHI")
_U32 = struct.Struct("<I")


def write_snapshot(path: str | os.PathLike, config: dict, icount: int, parts: dict[str, Any]) -> int:
    """Write ``parts`` (id -> plain data) as a snapshot file; returns its size.

    Written to a temporary name and renamed, so a crash never leaves half a
    snapshot under the name the user gave.
    """
    sections = []
    blobs = []
    for sid, st in parts.items():
        payload = zlib.compress(encode(st), 6)
        blobs.append((sid, payload))
        sections.append({"id": sid, "size": len(payload), "crc32": zlib.crc32(payload)})
    head = json.dumps({"config": config, "icount": icount, "created_by": "vmm", "sections": sections},
                      sort_keys=True, separators=(",", ":")).encode("utf-8")
    if len(head) > MAX_HEADER:
        raise SnapshotError("the snapshot header is too large")
    out = bytearray(_HEAD.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, len(head)))
    out += head
    out += _U32.pack(zlib.crc32(bytes(out)))
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(out)
        for sid, payload in blobs:
            raw = sid.encode("utf-8")
            f.write(_U32.pack(len(raw)) + raw + _U32.pack(len(payload)) + _U32.pack(zlib.crc32(payload)))
            f.write(payload)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    return size


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise SnapshotError(f"truncated: the file ends inside {what}")
    return b


def read_snapshot_header(f: BinaryIO) -> dict:
    head = f.read(_HEAD.size)
    if len(head) < _HEAD.size or head[:8] != SNAPSHOT_MAGIC:
        raise SnapshotError("not a vmm snapshot (bad magic)")
    _magic, version, hlen = _HEAD.unpack(head)
    if not MIN_READ_VERSION <= version <= SNAPSHOT_VERSION:
        raise SnapshotError(f"snapshot format version {version} is not supported "
                            f"(this vmm reads {MIN_READ_VERSION} to {SNAPSHOT_VERSION})")
    if hlen > MAX_HEADER:
        raise SnapshotError(f"header length {hlen} is over the {MAX_HEADER}-byte limit")
    text = _read_exact(f, hlen, "the header")
    (crc,) = _U32.unpack(_read_exact(f, 4, "the header checksum"))
    if zlib.crc32(head + text) != crc:
        raise SnapshotError("the header checksum does not match (corrupt file)")
    try:
        header = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise SnapshotError("the header is not valid JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("sections"), list) \
            or not isinstance(header.get("config"), dict) or type(header.get("icount")) is not int:
        raise SnapshotError("the header lacks its config, icount or section list")
    if not 0 <= header["icount"] < 1 << 64:
        raise SnapshotError(f"the header's icount {str(header['icount'])[:40]} is out of range")
    seen = set()
    for s in header["sections"]:
        if not (isinstance(s, dict) and _is_section_id(s.get("id")) and type(s.get("size")) is int
                and type(s.get("crc32")) is int and 0 <= s["size"] <= MAX_SECTION):
            raise SnapshotError("a section entry of the header is malformed")
        if s["id"] in seen:
            raise SnapshotError(f"the header lists section {s['id']!r} twice")
        seen.add(s["id"])
    header["version"] = version
    return header


def _is_section_id(sid: Any) -> bool:
    if not isinstance(sid, str):
        return False
    try:
        return 0 < len(sid.encode("utf-8")) <= MAX_SECTION_ID
    except UnicodeEncodeError:  # a lone surrogate, which JSON can carry
        return False


def _raw_cap(header: dict, sid: str) -> int:
    """How large a section may decode to: RAM by the configured memory size, the rest 256 MiB."""
    if sid in ("ram", "ept"):
        mem = header["config"].get("mem_size", 0)
        if type(mem) is not int or not MIN_MEM <= mem <= MAX_MEM:
            raise SnapshotError("the header's config has no valid mem_size")
        return 2 * mem + (16 << 20)
    return MAX_PART_BYTES


def read_snapshot(path: str | os.PathLike) -> tuple[dict, dict[str, Any]]:
    """(header, parts) of a snapshot file; SnapshotError for anything wrong with it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SnapshotError(f"cannot read {os.fspath(path)}: {e.strerror}") from None
    import stat as _stat

    if not _stat.S_ISREG(st.st_mode):
        raise SnapshotError(f"{os.fspath(path)} is not a regular file")
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise SnapshotError(f"cannot read {os.fspath(path)}: {e.strerror}") from None
    with f:
        header = read_snapshot_header(f)
        total = f.tell() + sum(8 + len(s["id"].encode()) + 4 + s["size"] for s in header["sections"])
        if total > st.st_size:
            raise SnapshotError(f"truncated: the header describes {total} bytes, the file has {st.st_size}")
        parts: dict[str, Any] = {}
        items = MAX_ITEMS  # shared by all sections: many small bombs cost no more than one
        for s in header["sections"]:
            (n,) = _U32.unpack(_read_exact(f, 4, f"section {s['id']!r}"))
            sid = _read_exact(f, n, f"section {s['id']!r}").decode("utf-8", "replace")
            if sid != s["id"]:
                raise SnapshotError(f"section {sid!r} found where the header lists {s['id']!r}")
            size, crc = struct.unpack("<II", _read_exact(f, 8, f"section {sid!r}"))
            if size != s["size"] or crc != s["crc32"]:
                raise SnapshotError(f"section {sid!r} does not match the header (corrupt file)")
            payload = _read_exact(f, size, f"section {sid!r}")
            if zlib.crc32(payload) != crc:
                raise SnapshotError(f"section {sid!r}: checksum mismatch (corrupt file)")
            cap = _raw_cap(header, sid)
            try:
                d = zlib.decompressobj()
                raw = d.decompress(payload, cap)
                if d.unconsumed_tail or not d.eof:
                    raise SnapshotError(f"section {sid!r} expands past its {cap}-byte limit or is cut short")
                parts[sid], used = _decode(raw, items)
                items -= used
            except (zlib.error, StateError) as e:
                raise SnapshotError(f"section {sid!r}: {e}") from None
        if f.read(1):
            raise SnapshotError("stray bytes after the last section")
    return header, parts
