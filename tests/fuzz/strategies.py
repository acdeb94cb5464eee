"""Hypothesis strategies for hostile logs and snapshots: valid files taken
apart and put back together wrongly, with valid checksums (so the readers'
content checks are reached, not only their CRCs), then byte mutations."""
from __future__ import annotations

import copy
import json
import struct
import zlib

from hypothesis import strategies as st

from replay import events as ev
from replay.events import Event, EventKind
from tests.fuzz.harness import (
    ROOT,
    base_snapshot,
    chunk_bytes,
    crash_recording,
    encode_events,
    header_bytes,
    hello_recording,
)

BASE_LOGS = {"hello": hello_recording, "crash": crash_recording}

U64 = (1 << 64) - 1
EDGE_INTS = [0, 1, -1, 2, 7, 255, 256, 4096, 1 << 20, 2 << 20, 32 << 20, 3 << 30, (3 << 30) + 4096,
             1 << 31, 1 << 32, (1 << 32) - 1, 1 << 40, 1 << 63, U64, 1 << 64, -(1 << 63), 1 << 100]

json_scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(EDGE_INTS), st.integers(),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
    st.sampled_from(["", "\ud800", "a\0b", "shadow", "nested", "auto", "flat", "disk", "hello", "0" * 64]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=8)

# plausible values per field: what gets a replay past the config check and into the machine
PLAUSIBLE = {
    "mem_size": [2 << 20, 4 << 20, 32 << 20, 64 << 20],
    "rtc_epoch": [0, -1, 1 << 40, -(1 << 63), (1 << 63) - 1],
    "boot": ["auto", "disk", "floppy", "multiboot", "flat", "linux"],
    "booted": ["disk", "floppy", "multiboot", "flat", "linux"],
    "cmdline": ["", "x" * 5000, "console=ttyS0"],
    "load_addr": [0, 0x500, 0x7C00, 0x100000, (32 << 20) - 512, (1 << 32) - 1],
    "digest_ticks": [1000, 1001, 50_000, 1 << 40],
    "mem_digest_every": [1, 2, 1 << 20],
    "mmu": ["shadow", "nested"],
    "vcpus": [1, 2, 3, 64],
    "quantum": [None, 1, 2, 1000, 1 << 32],
    "entries": [[], [[1, 0x7C00]], [[1, 0]], [[1, (1 << 32) - 1]]],
    "input": ["none", "file", "terminal", ""],
    "image.bundled": [None, "hello", "demo", "crash", "t_pic"],
    "image.sha256": ["00" * 32],
    "image.name": ["x", ""],
    "platform": ["pc-1", "pc-2", "pc-3"],
    "debug_exit": [[0x501, 2], [0xF4, 4], [0x3F8, 1], [0xFFFF, 1], [0, 1]],
    "initrd": [None, {"name": "i", "path": "/nonexistent/initrd", "sha256": "00" * 32}],
}
SAFE_PATHS = [str(ROOT / "README.md"), "/nonexistent/image", str(ROOT / "guests"), "", "a\0b", "\udcff"]
CONFIG_KEYS = sorted(set(PLAUSIBLE) | {"image.path", "image", "snapshot", "vmm_version", "extra"})


def _apply(cfg: dict, key: str, value, delete: bool) -> None:
    *path, last = key.split(".")
    d = cfg
    for k in path:
        if not isinstance(d.get(k), dict):
            return
        d = d[k]
    if delete:
        d.pop(last, None)
    else:
        d[last] = value


@st.composite
def configs(draw, base: dict, hostile: bool = True) -> dict:
    """``base`` with 0-3 fields deleted or set to plausible or (``hostile``) arbitrary values."""
    cfg = copy.deepcopy(base)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(CONFIG_KEYS))
        choices = [st.sampled_from(PLAUSIBLE.get(key, [None]))]
        if key == "image.path":
            choices = [st.sampled_from(SAFE_PATHS)]
        if key == "snapshot":
            choices.append(st.fixed_dictionaries({"path": st.sampled_from(SAFE_PATHS),
                                                  "sha256": st.sampled_from(["00" * 32, "zz"])}))
        if hostile and key != "image.path":
            choices.append(json_values)
        _apply(cfg, key, draw(st.one_of(*choices)), delete=hostile and draw(st.integers(0, 5)) == 0)
    return cfg


def payloads(kind: EventKind) -> st.SearchStrategy[bytes]:
    valid = {
        EventKind.RTC_EPOCH: st.integers(-(1 << 63), (1 << 63) - 1).map(ev.encode_rtc_epoch),
        EventKind.DISK_IMAGE: st.builds(ev.encode_disk_image, st.text(max_size=8), st.binary(min_size=32, max_size=32)),
        EventKind.REG_DIGEST: st.lists(st.integers(0, U64), min_size=len(ev.REG_NAMES), max_size=len(ev.REG_NAMES))
        .map(lambda v: ev.encode_regs(dict(zip(ev.REG_NAMES, v)))),
        EventKind.MEM_DIGEST: st.lists(st.integers(0, (1 << 32) - 1), max_size=40).map(ev.encode_page_hashes),
        EventKind.OUTPUT_DIGEST: st.builds(ev.encode_output_digest, st.sampled_from(["com1", "debugcon", "x"]),
                                           st.integers(0, U64), st.binary(min_size=32, max_size=32)),
        EventKind.END: st.builds(ev.encode_end, st.sampled_from(["exit", "limit", "halted", "host", ""]),
                                 st.integers(-(1 << 63), (1 << 63) - 1), st.text(max_size=10)),
    }.get(kind, st.binary(max_size=24))
    return st.one_of(valid, valid, st.binary(max_size=40))


@st.composite
def random_events(draw, max_size: int = 20) -> list[Event]:
    out, icount = [], 0
    for _ in range(draw(st.integers(0, max_size))):
        icount = min(U64, icount + draw(st.sampled_from([0, 0, 1, 7, 1000, 1_000_000, 1 << 33])))
        kind = draw(st.sampled_from(list(EventKind)))
        out.append(Event(kind, icount, draw(payloads(kind)), draw(st.sampled_from([0, 0, 0, 1, 65535]))))
    return out


@st.composite
def mutated_events(draw, base: list[Event]) -> list[Event]:
    """``base`` with 0-4 event-level edits: drop, duplicate, swap, replace a payload,
    move an icount, change a vCPU, insert a random event, cut the tail."""
    out = list(base)
    for _ in range(draw(st.integers(0, 4))):
        if not out:
            break
        i = draw(st.integers(0, len(out) - 1))
        e = out[i]
        op = draw(st.sampled_from(["drop", "dup", "swap", "payload", "icount", "vcpu", "insert", "cut"]))
        if op == "drop":
            del out[i]
        elif op == "dup":
            out.insert(i, e)
        elif op == "swap" and i + 1 < len(out):
            out[i], out[i + 1] = out[i + 1], out[i]
        elif op == "payload":
            out[i] = Event(e.kind, e.icount, draw(payloads(e.kind)), e.vcpu)
        elif op == "icount":
            out[i] = Event(e.kind, max(0, min(U64, e.icount + draw(st.sampled_from([-1, 1, 1000, -1000, 1 << 40])))),
                           e.payload, e.vcpu)
        elif op == "vcpu":
            out[i] = Event(e.kind, e.icount, e.payload, draw(st.sampled_from([1, 2, 63, 65535])))
        elif op == "insert":
            kind = draw(st.sampled_from(list(EventKind)))
            out.insert(i, Event(kind, e.icount, draw(payloads(kind)), 0))
        elif op == "cut":
            del out[i:]
    return out


@st.composite
def framed(draw, header: bytes, version: int, events: list[Event], tweaks: bool = True) -> bytes:
    """``events`` cut into chunks and framed with valid checksums, each chunk
    (with ``tweaks``) perhaps with a field or payload made wrong, chunks perhaps
    dropped, repeated or swapped."""
    chunks, i, seq = [], 0, 0
    while i < len(events):
        n = draw(st.integers(1, 5))
        part = events[i:i + n]
        i += n
        raw = encode_events(part, version)
        first, count, s = part[0].icount, len(part), seq
        seq += 1
        level = 6
        tweak = draw(st.sampled_from(["none"] * 8 + ["seq", "count", "first", "raw", "payload", "level0"])) \
            if tweaks else "none"
        payload = None
        if tweak == "seq":
            s = draw(st.sampled_from([s + 1, max(s - 1, 0), 1 << 31]))
        elif tweak == "count":
            count = draw(st.sampled_from([0, count + 1, max(count - 1, 0), 1 << 16, (1 << 32) - 1]))
        elif tweak == "first":
            first = draw(st.sampled_from([0, first + 1, U64]))
        elif tweak == "raw":
            raw = draw(st.sampled_from([raw[:-1], raw + b"\x01", raw[1:], draw(st.binary(max_size=30))]))
        elif tweak == "payload":
            payload = draw(st.binary(max_size=30))
        elif tweak == "level0":
            level = 0
        if payload is None:
            payload = zlib.compress(raw, level)
        chunks.append(chunk_bytes(header, version, s, first, count, payload))
    op = draw(st.sampled_from(["none"] * 6 + ["drop", "dup", "swap"])) if tweaks else "none"
    if chunks and op != "none":
        k = draw(st.integers(0, len(chunks) - 1))
        if op == "drop":
            del chunks[k]
        elif op == "dup":
            chunks.insert(k, chunks[k])
        elif op == "swap" and k + 1 < len(chunks):
            chunks[k], chunks[k + 1] = chunks[k + 1], chunks[k]
    return header + b"".join(chunks)


@st.composite
def byte_mutations(draw, data: bytes | str, max_ops: int = 4) -> bytes:
    """0-``max_ops`` byte edits (flip a bit, set a byte, insert, delete, cut, append)
    of ``data``, or of the named valid file ("hello", "crash", "snapshot")."""
    if isinstance(data, str):
        data = base_snapshot() if data == "snapshot" else BASE_LOGS[data]()[0]
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, max_ops))):
        pos = draw(st.integers(0, max(len(buf), 1) - 1)) if buf else 0
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut", "append"]))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del buf[pos:pos + draw(st.integers(1, 8))]
        elif op == "cut":
            del buf[pos:]
        elif op == "append":
            buf += draw(st.binary(min_size=1, max_size=40))
    return bytes(buf)


@st.composite
def hostile_logs(draw, base: str = "hello", versions=(1, 2, 3), hostile_config: float = 0.5,
                 framing: float = 0.5, bytewise: float = 0.5) -> bytes:
    """A log built from a valid one (BASE_LOGS[base]): its config and events edited,
    reframed (in any version it may have), with valid checksums, then perhaps
    byte-mutated.  The floats are how often the config takes arbitrary values (not
    only plausible ones), chunks are tweaked, and bytes are mutated."""
    _data, config, events, digest = BASE_LOGS[base]()
    version = draw(st.sampled_from(versions))

    def sometimes(p: float) -> bool:
        # hypothesis draws small integers most often: let them mean "no"
        return draw(st.integers(0, 99)) >= 100 - p * 100

    cfg = draw(configs(config, hostile=sometimes(hostile_config)))
    evs = draw(st.one_of(mutated_events(events), random_events()))
    if version == 1:
        evs = [Event(e.kind, e.icount, e.payload, 0) for e in evs]
    if sometimes(hostile_config / 5):
        raw_json = draw(st.sampled_from([b"{}", b"[]", b"null", b'{"config":{},"initial_digest":"zz"}',
                                         json.dumps({"config": cfg, "initial_digest": digest}).encode()[:-1]]))
        header = header_bytes(cfg, version, digest, raw_json=raw_json)
    else:
        header = header_bytes(cfg, version, digest)
    data = draw(framed(header, version, evs, tweaks=sometimes(framing)))
    return draw(byte_mutations(data, max_ops=draw(st.sampled_from([1, 3])))) if sometimes(bytewise) else data


# -- snapshots --------------------------------------------------------------------------------------

plain_state = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(EDGE_INTS), st.text(max_size=10),
              st.binary(max_size=40)),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=6), inner, max_size=5)),
    max_leaves=20)


def _snapshot_sections(data: bytes) -> tuple[dict, list[tuple[str, bytes]]] | None:
    """(header, [(id, payload)]) of a well-formed snapshot file."""
    (hlen,) = struct.unpack_from("<I", data, 10)
    header = json.loads(data[14:14 + hlen])
    off, out = 14 + hlen + 4, []
    for s in header["sections"]:
        (n,) = struct.unpack_from("<I", data, off)
        off += 4 + n
        size, _crc = struct.unpack_from("<II", data, off)
        off += 8
        out.append((s["id"], data[off:off + size]))
        off += size
    return header, out


def snapshot_file(header: dict, sections: list[tuple[str, bytes]], raw_json: bytes | None = None) -> bytes:
    text = raw_json if raw_json is not None else json.dumps(header).encode()
    out = b"VMMSNAP\0" + struct.pack("<HI", 1, len(text)) + text
    out += struct.pack("<I", zlib.crc32(out))
    for sid, payload in sections:
        raw = sid.encode("utf-8", "surrogatepass")
        out += struct.pack("<I", len(raw)) + raw + struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
    return out


@st.composite
def hostile_snapshots(draw) -> bytes:
    """A snapshot built from a valid one: sections replaced by crafted state or
    bytes, dropped, repeated; header fields edited; checksums made valid; then
    perhaps byte-mutated."""
    header, sections = _snapshot_sections(base_snapshot())
    sections = list(sections)
    for _ in range(draw(st.integers(0, 3))):
        k = draw(st.integers(0, len(sections) - 1))
        op = draw(st.sampled_from(["state", "bytes", "raw", "drop", "dup", "rename"]))
        sid, payload = sections[k]
        if op == "state":
            from vmm.state import encode

            sections[k] = (sid, zlib.compress(encode(draw(plain_state))))
        elif op == "bytes":
            sections[k] = (sid, draw(st.binary(max_size=60)))
        elif op == "raw":
            sections[k] = (sid, zlib.compress(draw(st.binary(max_size=60))))
        elif op == "drop":
            del sections[k]
        elif op == "dup":
            sections.insert(k, sections[k])
        elif op == "rename":
            sections[k] = (draw(st.sampled_from(["ram", "ept", "x", "", "\ud800", "vcpu0"])), payload)
        if not sections:
            break
    h = copy.deepcopy(header)
    h["sections"] = [{"id": sid, "size": len(p), "crc32": zlib.crc32(p)} for sid, p in sections]
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(["icount", "config", "sections", "mem_size", "created_by"]))
        value = draw(st.one_of(json_values, st.sampled_from(EDGE_INTS)))
        if key == "mem_size":
            if isinstance(h.get("config"), dict):
                h["config"]["mem_size"] = value
        else:
            h[key] = value
    try:
        raw_json = json.dumps(h).encode()
    except (ValueError, TypeError):
        raw_json = b"{}"
    if draw(st.integers(0, 9)) == 0:
        raw_json = draw(st.sampled_from([b"[" * 5000 + b"]" * 5000, b"{}", raw_json[:-1], b'{"icount":NaN}']))
    data = snapshot_file(h, sections, raw_json)
    return draw(byte_mutations(data, max_ops=draw(st.sampled_from([0, 0, 1, 3]))))
