"""What every fuzz target shares: the run size, the time bound, the checks one
input goes through, and the valid files that generated inputs start from.

A check takes the bytes of one file and runs everything a user can point at
it; only the documented one-line errors may come out, within a time bound.
The hypothesis targets (test_fuzz_*.py), the regression corpus
(test_corpus.py) and the coverage-guided atheris entry (atheris_main.py)
call the same checks.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import io
import json
import os
import signal
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from hypothesis import HealthCheck, settings

from replay.events import FORMAT_VERSION, Event, LogFormatError
from replay.logfile import LogReader, LogWriter, StreamLogReader, describe, verify

ROOT = Path(__file__).resolve().parents[2]
CRASH_LOG = ROOT / "guests" / "recordings" / "crash.vmlog"
CORPUS = Path(__file__).resolve().parent / "corpus"

# One example's time bound (seconds): a check that runs longer is a hang.  Replays are cut
# at REPLAY_INSTRUCTIONS instructions, as `vmm replay --until` would.
BOUND = float(os.environ.get("FUZZ_BOUND", "20"))
REPLAY_INSTRUCTIONS = 200_000


def fuzz_settings(ci_examples: int) -> settings:
    """CI: ``ci_examples`` examples, derandomized (the same inputs every run).
    FUZZ_EXAMPLES=N: N examples, random (the long run, tests/fuzz/README.md)."""
    n = os.environ.get("FUZZ_EXAMPLES")
    return settings(max_examples=int(n) if n else ci_examples, derandomize=not n, deadline=None,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example,
                                           HealthCheck.function_scoped_fixture])


# target name -> outcome -> examples (printed at the end of a run by tests/fuzz/conftest.py)
TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def tally(target: str, outcome: str) -> None:
    TALLY[target][outcome] += 1


class Hang(Exception):
    """A check ran past BOUND seconds."""


@contextlib.contextmanager
def bounded(seconds: float = BOUND) -> Iterator[None]:
    """Raise Hang in the code under test if it runs longer than ``seconds``."""
    def alarm(_sig, _frame):
        raise Hang(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def one_line(e: BaseException) -> None:
    msg = str(e)
    assert msg and "\n" not in msg, f"{type(e).__name__} message is not one line: {msg!r}"


@functools.cache
def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="vmm-fuzz-"))


# -- framing, written from the documented format (replay/logfile.py) -----------------------

def varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    return bytes(out + bytes([v]))


def header_bytes(config, version: int = FORMAT_VERSION, digest: str = "00", raw_json: bytes | None = None) -> bytes:
    text = raw_json if raw_json is not None else json.dumps(
        {"config": config, "initial_digest": digest}, sort_keys=True, separators=(",", ":")).encode()
    head = b"VMMRLOG\0" + struct.pack("<HI", version, len(text)) + text
    return head + struct.pack("<I", zlib.crc32(head))


def encode_events(events: list[Event], version: int) -> bytes:
    out = bytearray()
    prev = 0
    for i, e in enumerate(events):
        delta = e.icount if i == 0 else e.icount - prev
        prev = e.icount
        out += varint(int(e.kind)) + varint(max(delta, 0))
        if version >= 2:
            out += varint(e.vcpu)
        out += varint(len(e.payload)) + e.payload
    return bytes(out)


def chunk_bytes(header: bytes, version: int, seq: int, first: int, count: int, payload: bytes) -> bytes:
    """One chunk with valid checksums around whatever fields and payload it is given."""
    if version >= 3:
        (seed,) = struct.unpack_from("<I", header, len(header) - 4)
        fields = struct.pack("<IIQII", len(payload), seq, first, count, zlib.crc32(payload))
        return fields + struct.pack("<I", zlib.crc32(fields, seed)) + payload
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<QI", first, count)))
    return struct.pack("<IIQI", len(payload), crc, first, count) + payload


# -- the valid files generated inputs start from ----------------------------------------------

@functools.cache
def hello_recording() -> tuple[bytes, dict, list[Event], str]:
    """(log bytes, config, events, initial digest) of a recording of the bundled hello guest,
    two events a chunk (so chunk-level mutations have several chunks to work on)."""
    from guests.build import guest_path
    from replay.session import record

    p = str(guest_path("hello"))
    log = scratch() / "hello.vmlog"
    with open(p, "rb") as f:
        record(p, f.read(), str(log), chunk_events=2)
    r = LogReader(log)
    return log.read_bytes(), r.header.config, list(r), r.header.initial_digest


@functools.cache
def crash_recording() -> tuple[bytes, dict, list[Event], str]:
    """The committed version-1 recording."""
    r = LogReader(CRASH_LOG)
    return CRASH_LOG.read_bytes(), r.header.config, list(r), r.header.initial_digest


def write_log(events: list[Event], config: dict, digest: str = "00", chunk_events: int = 3) -> bytes:
    buf = io.BytesIO()
    buf.close = lambda: None  # keep the bytes after the writer closes
    w = LogWriter(buf, config, digest, chunk_events=chunk_events)
    w.extend(events)
    w.close()
    return buf.getvalue()


@functools.cache
def base_snapshot() -> bytes:
    """A snapshot of the demo guest a few thousand instructions in."""
    from guests.build import guest_path
    from host.serial import NullBackend
    from replay.session import build_machine, machine_config, save_snapshot

    p = str(guest_path("demo"))
    with open(p, "rb") as f:
        image = f.read()
    cfg = machine_config(32 << 20, 0, p, image, "auto", "", 0x100000, "none")
    m = build_machine(cfg, image, NullBackend())
    m.run(5000)
    path = scratch() / "demo.snap"
    save_snapshot(m, cfg, str(path))
    return path.read_bytes()


# -- the checks -------------------------------------------------------------------------------------

def check_log_bytes(data: bytes) -> str:
    """Point every log reader at ``data``: only one-line LogFormatErrors, and the
    file reader, the stream reader, describe and verify agree.  Returns a word
    for the outcome (for the long run's tally)."""
    from replay.config import check_config

    path = scratch() / "fuzz.vmlog"
    path.write_bytes(data)
    with bounded():
        file_ok, reader, events = False, None, None
        try:
            reader = LogReader(path)
            events = list(reader)
            reader.stats()
            if events:
                mid = events[len(events) // 2].icount
                assert next(iter(reader.events(mid))).icount == mid
            file_ok = True
        except LogFormatError as e:
            one_line(e)
        stream_ok, stream = False, None
        try:
            stream = StreamLogReader(io.BytesIO(data))
            stream_events = list(stream)
            stream_ok = True
        except LogFormatError as e:
            one_line(e)
        assert file_ok == stream_ok, ("file and stream readers disagree", file_ok, stream_ok)
        if file_ok:
            assert stream_events == events
            assert (stream.complete, stream.truncated) == (reader.complete, reader.truncated)
            assert reader.complete == (reader.incomplete_note is None)
        try:
            describe(path, events=True, limit=30)
            assert file_ok, "describe read a log the reader refused"
        except LogFormatError as e:
            one_line(e)
            assert not file_ok, f"describe refused a log the reader read: {e}"
        rep = verify(path)
        for line in rep.problems + rep.warnings:
            assert line and "\n" not in line, line
        config_ok = False
        if reader is not None:
            try:
                check_config(reader.header.config)
                config_ok = True
            except LogFormatError as e:
                one_line(e)
        replayable = file_ok and reader.complete and config_ok
        assert rep.ok == replayable, ("verify and the readers disagree", rep.problems, file_ok, config_ok)
    return rep.verdict


def replay_errors() -> tuple[type[BaseException], ...]:
    """What a Replayer may raise on a hostile log: each is one message the CLI reports."""
    from replay.session import Divergence, ReplayError
    from vmm.state import SnapshotError

    return LogFormatError, ReplayError, Divergence, SnapshotError


def open_findings() -> list[tuple[type[BaseException], str, str]]:
    """Exceptions the replayer still lets out, found by these fuzzers, whose fix
    is in replay/session.py (not covered here): (type, the function of
    replay/session.py they come through, what is wrong).  Besides these, any
    exception on a log whose config replay.config.check_config refuses is the
    one open finding "session.py does not apply check_config" (an entries,
    initrd, debug_exit, snapshot or bundled-guest field of the wrong shape).
    They are tallied as "open finding ..." instead of failing, until the fix
    lands.  Their reproducers are tests/fuzz/corpus/replay/open-*, which
    test_corpus.py runs strictly as xfail: once fixed they XPASS, and the entry
    here goes."""
    return []  # none open: session.py checks configs and turns boot and bus errors into ReplayError


def _open_finding(e: BaseException, path: Path) -> str | None:
    import traceback

    from replay.config import check_config

    funcs = {f.name for f in traceback.extract_tb(e.__traceback__) if f.filename.endswith("session.py")}
    if any(isinstance(e, t) and func in funcs for t, func, _ in open_findings()):
        return type(e).__name__
    if not session_checks_config():
        try:
            check_config(LogReader(path).header.config)
        except LogFormatError:
            return f"{type(e).__name__} (config not checked)"
    return None


def session_checks_config() -> bool:
    """Whether replay/session.py applies replay.config.check_config (the lead's change
    for issue 16); from then on replay and verify must agree on every log."""
    import replay.session
    from replay.config import check_config

    return getattr(replay.session, "check_config", None) is check_config


@contextlib.contextmanager
def closing_machines() -> Iterator[None]:
    """Close every machine replay.session builds in the block when it ends: a
    Machine frees its engine's native memory only in close() (about 3 MB each,
    not at garbage collection), and a Replayer that fails to construct leaves
    its machine to the collector."""
    import replay.session

    built = []
    real = replay.session.PcMachine

    def pc_machine(*a, **kw):
        m = real(*a, **kw)
        built.append(m)
        return m
    replay.session.PcMachine = pc_machine
    try:
        yield
    finally:
        replay.session.PcMachine = real
        for m in built:
            m.close()


def check_replay_bytes(data: bytes, instructions: int = REPLAY_INSTRUCTIONS, strict: bool = False) -> str:
    """Construct a Replayer on ``data`` and replay at most ``instructions``:
    only the replay errors may come out (and, unless ``strict``, the open
    findings), within the time bound.  Once the session checks configs as
    verify does, a log verify calls damaged must not replay, and one it calls
    incomplete must leave the reader saying so."""
    from replay.session import Divergence, Replayer

    allowed = replay_errors()
    path = scratch() / "fuzz-replay.vmlog"
    path.write_bytes(data)
    with closing_machines(), bounded():
        verdict = verify(path).verdict if session_checks_config() else None
        stage = "refused"
        try:
            rp = Replayer(str(path))
            stage = "stopped"
            rp.run(instructions)
        except allowed as e:
            if isinstance(e, Divergence):
                return "diverged"
            one_line(e)
            return stage
        except Exception as e:
            finding = None if strict else _open_finding(e, path)
            if finding is None:
                raise
            return f"open finding {finding}"
    assert verdict != "damaged", "replayed a log verify calls damaged"
    if verdict == "incomplete":
        assert not rp.reader.complete and rp.reader.incomplete_note
    return "replayed"


def check_snapshot_bytes(data: bytes) -> str:
    """read_snapshot on ``data``: only a one-line SnapshotError, within the time bound."""
    from vmm.state import SnapshotError, read_snapshot

    path = scratch() / "fuzz.snap"
    path.write_bytes(data)
    with bounded():
        try:
            read_snapshot(path)
        except SnapshotError as e:
            one_line(e)
            return "refused"
    return "read"


def check_state_bytes(data: bytes) -> str:
    """decode on ``data``: plain data back (that encodes to the same bytes) or one StateError line."""
    from vmm.state import StateError, decode, encode

    with bounded():
        try:
            obj = decode(data)
        except StateError as e:
            one_line(e)
            return "refused"
        again = encode(obj)
        assert decode(again) == obj
    return "decoded"


CHECKS = {"log": check_log_bytes, "replay": check_replay_bytes, "snapshot": check_snapshot_bytes,
          "state": check_state_bytes}
