"""Coverage-guided fuzzing (atheris, libFuzzer) of the same checks the
hypothesis targets run; tests/fuzz/README.md has the commands.

    .venv/bin/python tests/fuzz/atheris_main.py TARGET [libFuzzer options] [CORPUS_DIR ...]

TARGET is log, replay, snapshot or state.  Without a corpus directory the run
starts from the valid files (a fresh recording, the committed version-1 log, a
snapshot) and the committed regression corpus.  A custom mutator re-signs the
checksums after libFuzzer's byte mutation half of the time, so mutated inputs
reach the content checks behind the CRCs.  A crash is any exception the
target does not allow, or a check running past its time bound.
"""
from __future__ import annotations

import json
import os
import random
import struct
import sys
import tempfile
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import atheris

with atheris.instrument_imports(include=["replay", "vmm.state"]):
    import replay.config
    import replay.events
    import replay.logfile  # noqa: F401
    import vmm.state  # noqa: F401
from tests.fuzz import harness


def resign_log(data: bytes) -> bytes:
    """``data`` with the header CRC and every chunk's CRCs made valid, as far as its framing goes."""
    buf = bytearray(data)
    if len(buf) < 14 or buf[:8] != b"VMMRLOG\0":
        return data
    version, jlen = struct.unpack_from("<HI", buf, 8)
    hend = 14 + jlen
    if hend + 4 > len(buf):
        return data
    hcrc = zlib.crc32(bytes(buf[:hend]))
    struct.pack_into("<I", buf, hend, hcrc)
    off = hend + 4
    head = 28 if version >= 3 else 20
    while off + head <= len(buf):
        (length,) = struct.unpack_from("<I", buf, off)
        pend = off + head + length
        if pend > len(buf):
            break
        payload = bytes(buf[off + head:pend])
        if version >= 3:
            struct.pack_into("<I", buf, off + 20, zlib.crc32(payload))
            struct.pack_into("<I", buf, off + 24, zlib.crc32(bytes(buf[off:off + 24]), hcrc))
        else:
            first, count = struct.unpack_from("<QI", buf, off + 8)
            struct.pack_into("<I", buf, off + 4, zlib.crc32(payload, zlib.crc32(struct.pack("<QI", first, count))))
        off = pend
    return bytes(buf)


def resign_snapshot(data: bytes) -> bytes:
    """``data`` with the section sizes and CRCs in its header, and the header CRC, made valid."""
    if len(data) < 14 or data[:8] != b"VMMSNAP\0":
        return data
    (hlen,) = struct.unpack_from("<I", data, 10)
    try:
        header = json.loads(data[14:14 + hlen])
        sections = header["sections"]
        off, fixed = 14 + hlen + 4, []
        for s in sections:
            (n,) = struct.unpack_from("<I", data, off)
            sid = data[off + 4:off + 4 + n]
            (size,) = struct.unpack_from("<I", data, off + 4 + n)
            payload = data[off + 12 + n:off + 12 + n + size]
            s["size"], s["crc32"] = len(payload), zlib.crc32(payload)
            fixed.append(struct.pack("<I", n) + sid + struct.pack("<II", len(payload), s["crc32"]) + payload)
            off += 12 + n + size
        text = json.dumps(header).encode()
    except Exception:  # noqa: BLE001 - anything unparsable is left as libFuzzer made it
        return data
    out = data[:10] + struct.pack("<I", len(text)) + text
    return out + struct.pack("<I", zlib.crc32(out)) + b"".join(fixed) + data[off:]


RESIGN = {"log": resign_log, "replay": resign_log, "snapshot": resign_snapshot, "state": lambda d: d}


def seeds(target: str) -> list[bytes]:
    if target == "snapshot":
        out = [harness.base_snapshot()]
    elif target == "state":
        from vmm.state import encode

        out = [encode({"kind": "x", "version": 1, "a": [1, -2, "s", b"b", None, True, {"k": False}]})]
    else:
        out = [harness.hello_recording()[0], harness.crash_recording()[0]]
    kind = "replay" if target == "replay" else target
    d = harness.CORPUS / kind
    if d.is_dir():
        out += [p.read_bytes() for p in sorted(d.iterdir()) if p.stat().st_size < 64 << 10]
    return out


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in harness.CHECKS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(harness.CHECKS)}}} [libFuzzer options] [CORPUS_DIR ...]")
    target = sys.argv.pop(1)
    check = harness.CHECKS[target]
    resign = RESIGN[target]
    if not any(not a.startswith("-") for a in sys.argv[1:]):
        corpus = tempfile.mkdtemp(prefix=f"vmm-atheris-{target}-")
        for i, s in enumerate(seeds(target)):
            with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
                f.write(s)
        sys.argv.append(corpus)

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        out = atheris.Mutate(data, max_size)
        return resign(out) if random.Random(seed).random() < 0.5 else out

    def one(data: bytes) -> None:
        harness.tally(target, check(data))
        outcomes = harness.TALLY[target]
        n = sum(outcomes.values())
        if n % 10_000 == 0:  # libFuzzer ends the process with exit(): no atexit report
            detail = ", ".join(f"{k} {v}" for k, v in outcomes.most_common())
            print(f"fuzz outcomes: {target}: {n} examples: {detail}", file=sys.stderr, flush=True)

    atheris.Setup(sys.argv, one, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
