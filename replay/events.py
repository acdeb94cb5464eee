"""The events of a replay log: what crosses the determinism boundary, and the
digests that prove a replay stayed on the recorded path.

``EventKind`` is the one list of event kinds (after QEMU's replay folder, whose
single enum of events is versioned with the log).  An ``Event`` is a kind, the
retired-instruction count at which it happens, and an opaque payload; the
structured payloads have encode/decode helpers here, and every decoder checks
sizes and raises ``LogFormatError`` (never another exception) on garbage.

All integers in payloads are little-endian.  Payload layouts:

==============  ==============================================================
kind            payload
==============  ==============================================================
CONSOLE_INPUT   the bytes typed into the console (raw)
KEYBOARD_INPUT  the scancode bytes (raw)
RTC_EPOCH       i64 seconds since 1970-01-01 00:00:00 UTC
RANDOM          the bytes of host randomness (raw; reserved)
NET_FRAME       one Ethernet frame (raw; reserved)
DISK_IMAGE      u16 name length, UTF-8 name, 32-byte SHA-256 of the image
REG_DIGEST      ``len(REG_NAMES)`` x u64, in ``REG_NAMES`` order
MEM_DIGEST      u32 page count N, then N x u32 page hash
OUTPUT_DIGEST   u16 name length, UTF-8 stream name, u64 total bytes so far,
                32-byte SHA-256 of the stream so far
END             i64 exit status, u16 reason length, UTF-8 stop reason,
                u16 message length, UTF-8 message; then (version 4) u16 vCPU
                count N and N x u64: the instructions each vCPU retired
==============  ==============================================================
"""
from __future__ import annotations

import datetime
import enum
import struct
import zlib
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

# Changing EventKind (adding, removing or renumbering a kind), REG_NAMES or any
# payload layout above changes what a log means: bump FORMAT_VERSION with it.
# Version 2 stamps every event with the vCPU it belongs to (REG_DIGEST: whose
# registers; an input: the vCPU running when it entered) and its icount is the
# machine's (all vCPUs together).  Version 1 logs (one vCPU) read as vCPU 0.
# Version 3 changes only the chunk framing (replay/logfile.py): chunk heads
# carry a sequence number and a CRC of their own, so a dropped, repeated or
# damaged chunk is told from a truncation; the events and payloads are those
# of version 2.  Version 4 adds to END the instructions each vCPU retired
# (``vmm log show`` prints them); a version 1-3 END has none.
FORMAT_VERSION = 4
MIN_FORMAT_VERSION = 1

U64_MAX = (1 << 64) - 1
MAX_EVENT_PAYLOAD = 16 << 20  # a payload larger than this is refused by the writer


class LogFormatError(ValueError):
    """A replay log (or an event payload in it) that cannot be used; the
    message is one line that names the problem for a user."""


class EventKind(enum.IntEnum):
    CONSOLE_INPUT = 1   # bytes typed into the console, delivered at an icount
    KEYBOARD_INPUT = 2  # scancodes from the host keyboard
    RTC_EPOCH = 3       # the wall-clock time at power-on (once, at icount 0)
    RANDOM = 4          # bytes of host randomness given to the guest (reserved)
    NET_FRAME = 5       # a frame from the host network (reserved)
    DISK_IMAGE = 6      # name and SHA-256 of an input image (once per image)
    REG_DIGEST = 7      # the registers at an icount, in full
    MEM_DIGEST = 8      # one 32-bit hash per 4 KiB page of guest RAM
    OUTPUT_DIGEST = 9   # an output stream's length and SHA-256 so far
    END = 10            # the run ended: final icount, stop reason, exit status


# The registers of a REG_DIGEST, in payload order (the same list as
# vmm.digest.REG_NAMES; selectors and cpl are stored zero-extended to 64 bits).
REG_NAMES: tuple[str, ...] = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
    "r13", "r14", "r15", "rip", "rflags", "es", "cs", "ss", "ds", "fs", "gs",
    "cr0", "cr2", "cr3", "cr4", "cpl",
)


@dataclass(frozen=True)
class Event:
    kind: EventKind
    icount: int
    payload: bytes = b""
    vcpu: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.kind, EventKind):
            object.__setattr__(self, "kind", EventKind(self.kind))
        if isinstance(self.icount, bool) or not isinstance(self.icount, int) \
                or not 0 <= self.icount <= U64_MAX:
            raise ValueError(f"event icount must be an integer in [0, 2**64): {self.icount!r}")
        if not isinstance(self.payload, bytes):
            if not isinstance(self.payload, (bytearray, memoryview)):
                raise TypeError(f"event payload must be bytes, not {type(self.payload).__name__}")
            object.__setattr__(self, "payload", bytes(self.payload))
        if isinstance(self.vcpu, bool) or not isinstance(self.vcpu, int) or not 0 <= self.vcpu < 1 << 16:
            raise ValueError(f"event vcpu must be an integer in [0, 65536): {self.vcpu!r}")


def _bad(kind: EventKind, why: str) -> LogFormatError:
    return LogFormatError(f"bad {kind.name} payload ({why})")


def _sha256_bytes(sha256: str | bytes) -> bytes:
    if isinstance(sha256, (bytes, bytearray)):
        raw = bytes(sha256)
    else:
        try:
            raw = bytes.fromhex(sha256)
        except (ValueError, TypeError):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}") from None
    if len(raw) != 32:
        raise ValueError(f"a SHA-256 digest is 32 bytes, got {len(raw)}")
    return raw


def _name_bytes(name: str, what: str) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError(f"{what} is too long ({len(raw)} bytes, at most 65535)")
    return struct.pack("<H", len(raw)) + raw


def _take_name(kind: EventKind, payload: bytes, off: int) -> tuple[str, int]:
    if len(payload) < off + 2:
        raise _bad(kind, f"{len(payload)} bytes, too short for a name")
    (n,) = struct.unpack_from("<H", payload, off)
    off += 2
    if len(payload) < off + n:
        raise _bad(kind, f"name of {n} bytes overruns the {len(payload)}-byte payload")
    try:
        name = payload[off:off + n].decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(kind, "name is not UTF-8") from None
    return name, off + n


# -- RTC_EPOCH ---------------------------------------------------------------

def encode_rtc_epoch(seconds: int) -> bytes:
    return struct.pack("<q", seconds)


def decode_rtc_epoch(payload: bytes) -> int:
    if len(payload) != 8:
        raise _bad(EventKind.RTC_EPOCH, f"{len(payload)} bytes, expected 8")
    return struct.unpack("<q", payload)[0]


# -- DISK_IMAGE --------------------------------------------------------------

class DiskImageRecord(NamedTuple):
    name: str
    sha256: str  # hex


def encode_disk_image(name: str, sha256: str | bytes) -> bytes:
    return _name_bytes(name, "image name") + _sha256_bytes(sha256)


def decode_disk_image(payload: bytes) -> DiskImageRecord:
    kind = EventKind.DISK_IMAGE
    name, off = _take_name(kind, payload, 0)
    if len(payload) != off + 32:
        raise _bad(kind, f"{len(payload)} bytes, expected {off + 32}")
    return DiskImageRecord(name, payload[off:].hex())


# -- REG_DIGEST --------------------------------------------------------------

_REGS = struct.Struct(f"<{len(REG_NAMES)}Q")


def encode_regs(regs: Mapping[str, int]) -> bytes:
    """The registers of ``REG_NAMES`` (all of them, and no others) as a payload."""
    missing = [n for n in REG_NAMES if n not in regs]
    extra = sorted(set(regs) - set(REG_NAMES))
    if missing or extra:
        raise ValueError(f"REG_DIGEST needs exactly REG_NAMES: missing {missing}, unknown {extra}")
    values = [regs[n] for n in REG_NAMES]
    for n, v in zip(REG_NAMES, values):
        if not 0 <= v <= U64_MAX:
            raise ValueError(f"register {n} = {v} does not fit in 64 bits")
    return _REGS.pack(*values)


def decode_regs(payload: bytes) -> dict[str, int]:
    if len(payload) != _REGS.size:
        raise _bad(EventKind.REG_DIGEST, f"{len(payload)} bytes, expected {_REGS.size}")
    return dict(zip(REG_NAMES, _REGS.unpack(payload)))


def reg_diff(expected: Mapping[str, int], actual: Mapping[str, int]) -> list[tuple[str, int, int]]:
    """(name, expected, actual) for each register of REG_NAMES that differs."""
    return [(n, expected.get(n, 0), actual.get(n, 0)) for n in REG_NAMES
            if expected.get(n, 0) != actual.get(n, 0)]


def format_reg_diff(expected: Mapping[str, int], actual: Mapping[str, int]) -> str:
    return "\n".join(f"{n:>6}: recorded {e:#018x}  replayed {a:#018x}"
                     for n, e, a in reg_diff(expected, actual))


# -- MEM_DIGEST --------------------------------------------------------------

def encode_page_hashes(hashes: Sequence[int] | Any) -> bytes:
    """Per-page 32-bit hashes (a sequence of ints, or a numpy uint32 array as
    vmm.digest.page_hashes returns) as a payload."""
    dtype = getattr(hashes, "dtype", None)
    if dtype is not None and dtype.kind == "u" and dtype.itemsize == 4:
        body = hashes.astype("<u4", copy=False).tobytes()  # no Python loop over pages
        n = len(body) // 4
    else:
        n = len(hashes)
        try:
            body = struct.pack(f"<{n}I", *hashes)
        except struct.error:
            raise ValueError("page hashes must be integers in [0, 2**32)") from None
    if n > 0xFFFF_FFFF:
        raise ValueError("too many pages")
    return struct.pack("<I", n) + body


def decode_page_hashes(payload: bytes) -> array:
    """The page hashes as an ``array('I')`` (indexable, comparable, numpy-viewable)."""
    kind = EventKind.MEM_DIGEST
    if len(payload) < 4:
        raise _bad(kind, f"{len(payload)} bytes, too short for a page count")
    (n,) = struct.unpack_from("<I", payload)
    if len(payload) != 4 + 4 * n:
        raise _bad(kind, f"{n} pages need {4 + 4 * n} bytes, got {len(payload)}")
    return array("I", struct.unpack_from(f"<{n}I", payload, 4))


def page_diff(expected: Sequence[int], actual: Sequence[int]) -> list[int]:
    """Indices of the pages whose hashes differ (a page present in only one
    of the two counts as different)."""
    common = min(len(expected), len(actual))
    out = [i for i in range(common) if expected[i] != actual[i]]
    out.extend(range(common, max(len(expected), len(actual))))
    return out


# -- OUTPUT_DIGEST -----------------------------------------------------------

class OutputDigest(NamedTuple):
    stream: str
    total: int   # bytes the guest has written to the stream so far
    sha256: str  # hex, of those bytes


def encode_output_digest(stream: str, total: int, sha256: str | bytes) -> bytes:
    if not 0 <= total <= U64_MAX:
        raise ValueError(f"output byte count out of range: {total}")
    return _name_bytes(stream, "stream name") + struct.pack("<Q", total) + _sha256_bytes(sha256)


def decode_output_digest(payload: bytes) -> OutputDigest:
    kind = EventKind.OUTPUT_DIGEST
    stream, off = _take_name(kind, payload, 0)
    if len(payload) != off + 8 + 32:
        raise _bad(kind, f"{len(payload)} bytes, expected {off + 40}")
    (total,) = struct.unpack_from("<Q", payload, off)
    return OutputDigest(stream, total, payload[off + 8:].hex())


# -- END ---------------------------------------------------------------------

class EndRecord(NamedTuple):
    reason: str       # why the run stopped (StopReason.value: "exit", "limit", "halted", ...)
    exit_status: int  # the guest's exit status
    message: str = ""  # the run's closing message, if any


def encode_end(reason: str, exit_status: int, message: str = "",
               vcpu_icounts: Sequence[int] | None = None) -> bytes:
    """The END payload; ``vcpu_icounts``: the instructions each vCPU retired, by id."""
    if not -(1 << 63) <= exit_status < (1 << 63):
        raise ValueError(f"exit status out of range: {exit_status}")
    msg = message.encode("utf-8")
    if len(msg) > 0xFFFF:  # informational only: cut rather than fail at the very end of a recording
        message = msg[:0xFFFF].decode("utf-8", "ignore")
    out = struct.pack("<q", exit_status) + _name_bytes(reason, "stop reason") + _name_bytes(message, "message")
    if vcpu_icounts is not None:
        if not 1 <= len(vcpu_icounts) <= 0xFFFF or not all(0 <= n <= U64_MAX for n in vcpu_icounts):
            raise ValueError(f"per-vCPU instruction counts out of range: {list(vcpu_icounts)!r}")
        out += struct.pack(f"<H{len(vcpu_icounts)}Q", len(vcpu_icounts), *vcpu_icounts)
    return out


def _decode_end(payload: bytes) -> tuple[EndRecord, list[int] | None]:
    kind = EventKind.END
    if len(payload) < 8:
        raise _bad(kind, f"{len(payload)} bytes, too short")
    (status,) = struct.unpack_from("<q", payload)
    reason, off = _take_name(kind, payload, 8)
    message, off = _take_name(kind, payload, off)
    counts = None
    if off != len(payload):
        n = struct.unpack_from("<H", payload, off)[0] if len(payload) >= off + 2 else 0
        if n == 0 or len(payload) != off + 2 + 8 * n:
            raise _bad(kind, f"{len(payload) - off} stray bytes after the message")
        counts = list(struct.unpack_from(f"<{n}Q", payload, off + 2))
    return EndRecord(reason, status, message), counts


def decode_end(payload: bytes) -> EndRecord:
    return _decode_end(payload)[0]


def decode_end_icounts(payload: bytes) -> list[int] | None:
    """The instructions each vCPU retired, by id, from an END payload (None: not
    recorded, a log older than version 4)."""
    return _decode_end(payload)[1]


# -- for tools ---------------------------------------------------------------

DECODERS: dict[EventKind, Callable[[bytes], Any]] = {
    EventKind.RTC_EPOCH: decode_rtc_epoch,
    EventKind.DISK_IMAGE: decode_disk_image,
    EventKind.REG_DIGEST: decode_regs,
    EventKind.MEM_DIGEST: decode_page_hashes,
    EventKind.OUTPUT_DIGEST: decode_output_digest,
    EventKind.END: decode_end,
}


def _check_page_hashes(payload: bytes) -> None:
    # the size alone: decoding a large RAM's hashes for a check would cost a Python int per page
    if len(payload) < 4 or len(payload) != 4 + 4 * struct.unpack_from("<I", payload)[0]:
        decode_page_hashes(payload)  # raises with the message


_CHECKERS: dict[EventKind, Callable[[bytes], Any]] = {**DECODERS, EventKind.MEM_DIGEST: _check_page_hashes}


def check_payload(kind: EventKind, payload: bytes) -> None:
    """Raise LogFormatError unless a structured payload decodes (cheaply: no
    page-hash array is built); raw payloads always pass.  Readers call this
    on every event, so a replay never meets a payload it cannot decode."""
    chk = _CHECKERS.get(kind)
    if chk is not None:
        chk(payload)


def decode_payload(event: Event) -> Any:
    """The decoded payload of a structured event, or the raw bytes of another."""
    dec = DECODERS.get(event.kind)
    return dec(event.payload) if dec else event.payload


def _short_bytes(b: bytes, limit: int = 48) -> str:
    r = repr(b[:limit])
    return r + (f"... ({len(b)} bytes)" if len(b) > limit else "")


def summarize(event: Event) -> str:
    """One line describing an event's payload (raises LogFormatError if it is garbage)."""
    k, p = event.kind, event.payload
    if k is EventKind.RTC_EPOCH:
        s = decode_rtc_epoch(p)
        try:
            when = datetime.datetime.fromtimestamp(s, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        except (OverflowError, OSError, ValueError):
            when = "out of calendar range"
        return f"{s} ({when})"
    if k is EventKind.DISK_IMAGE:
        d = decode_disk_image(p)
        return f"{d.name!r} sha256 {d.sha256}"
    if k is EventKind.REG_DIGEST:
        r = decode_regs(p)
        return f"rip={r['rip']:#x} rsp={r['rsp']:#x} rflags={r['rflags']:#x} cr3={r['cr3']:#x} cpl={r['cpl']}"
    if k is EventKind.MEM_DIGEST:
        h = decode_page_hashes(p)
        return f"{len(h)} pages, crc32 of the hashes {zlib.crc32(p[4:]):08x}"
    if k is EventKind.OUTPUT_DIGEST:
        o = decode_output_digest(p)
        return f"{o.stream!r} {o.total} bytes sha256 {o.sha256[:16]}..."
    if k is EventKind.END:
        e, counts = _decode_end(p)
        per = f" (per vCPU: {', '.join(f'{n:,}' for n in counts)})" if counts and len(counts) > 1 else ""
        return f"reason {e.reason!r}, exit status {e.exit_status}" + (f": {e.message}" if e.message else "") + per
    return _short_bytes(p)
