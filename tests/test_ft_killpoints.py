"""Many kill points, in one process: the primary's side of the pair runs once
(replay/ft/primary.py with a link that records every message and an instant
backup), then, at every message boundary of the run (every point at which a
killed primary can leave its backup), a backup is given exactly the messages
sent up to there, takes over at its last horizon, and runs the guest live to
its end.  Whatever the point, what the
console had released before it is a prefix of what the backup serves
(output never forks), and the whole transcript equals an uninterrupted run's
with the bytes the consumer typed (nothing lost, nothing repeated).

tests/test_ft.py does the same with real processes and SIGKILL, at fewer points.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import ft_guest

from replay.ft import wire
from replay.ft.backup import JoinState, LiveReplica, _Feed
from replay.ft.console import ConsoleServer
from replay.ft.primary import LinkSink, Primary
from replay.session import record
from vmm.machine import StopReason
from vmm.platform.storage import describe

pytestmark = pytest.mark.skipif(not ft_guest.have_nasm(), reason="nasm builds the FT test guest")

LINES, ASK, MEM = 120, 20, 4 << 20


class _Recorder:
    """The primary's link: keeps each message with what the console had released after it;
    a HORIZON is acknowledged at once (a backup that keeps up)."""

    lost = None

    def __init__(self, p: Primary):
        self.p = p
        self.msgs: list[tuple[bytes, bytes, int]] = []
        self.patience = None
        self.sock = self

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        if kind == wire.HORIZON:
            self.p._on_message(wire.ACK, payload[:8])
            if wire.read_u64(payload) != wire.END_OF_LOG:
                self.p._on_message(wire.PROGRESS, payload[:8])
        self.msgs.append((kind, payload, self.p.console.released))

    def getpeername(self):
        return ("127.0.0.1", 0)


def _typist(out: bytearray, typed: bytearray) -> None:
    while out.count(b"?\n") > len(typed):
        typed.append(ord("a") + len(typed) % 26)


def _disk_drives(path: Path | None) -> list[dict] | None:
    """The drives of a run with ``path`` as its IDE disk (hashed, as vmm ft primary describes them)."""
    if path is None:
        return None
    return describe([{"file": str(path), "if": "ide", "media": "disk", "format": "raw", "index": 0,
                      "readonly": False, "snapshot": False}], with_hash=True)


def _disk_blocks(m) -> list | None:
    """What the guest wrote to its disk (the overlay's blocks), None without one."""
    images = getattr(m, "drive_images", None) or {}
    return images["ide0.0"].save_blocks() if "ide0.0" in images else None


def _run_primary(guest: Path, vcpus: int = 1, join_at: int | None = None, disk: Path | None = None,
                 type_every: int = 1, mem: int = MEM):
    """The primary's run: (image, output, typed, messages, the disk's written blocks).  With ``join_at``, its backup is
    lost at that input poll (it goes on alone), a backup joins at the next one, and the
    messages are the joined link's.  With ``disk``, the IDE disk image.  The consumer answers a prompt at an input poll whose
    number ``type_every`` divides (a slower or faster consumer: input at other points)."""
    image = guest.read_bytes()
    ref: dict = {}
    console = ConsoleServer("primary")
    p = Primary(("127.0.0.1", 0), console)
    link = p.link = _Recorder(p)
    p.handshake = "accepted"
    typed = bytearray()
    fed = [0]
    polls = [0]

    def source() -> bytes:
        polls[0] += 1
        if join_at is not None and polls[0] == join_at:
            p.alone = True                      # the backup died: the primary goes on alone
            console.go_alone()
        elif join_at is not None and polls[0] == join_at + 1:
            p.joining = (_Recorder(p), None)    # a backup joins: the state goes at the next horizon
            ref["joined"] = p.joining[0]
        # the consumer types when it sees a prompt among the released output; its bytes reach
        # the machine through the console, as a client's do (the console counts them)
        if polls[0] % type_every == 0:
            _typist(console.out[:console.released], typed)
        with console.lock:
            console._inbuf += typed[fed[0]:]
            console.in_received += len(typed) - fed[0]
        fed[0] = len(typed)
        return console.poll_input()

    def setup(m) -> None:
        ref["m"] = m
        p.setup(m)

    res, m = record(str(guest), image, LinkSink(p), mem_size=mem, boot_kind="flat", live_input=source,
                    input_kind="ft", serial=console, setup=setup, on_writer=p.on_writer, vcpus=vcpus,
                    drives=_disk_drives(disk))
    assert res.reason is StopReason.EXIT and res.status == 0
    disk_blocks = _disk_blocks(m)
    m.close()
    console.mark(p.last_tick)              # as Primary.finish: the output after the last horizon
    if join_at is not None:
        assert p.joins == 1 and p.link is ref["joined"]
        link = p.link
    link.send(wire.HORIZON, wire.u64(wire.END_OF_LOG))
    return image, bytes(console.out), bytes(typed), link.msgs, disk_blocks


def _take_over_at(k: int, image: bytes, primary_out: bytes, msgs, disk: list | None = None) -> tuple[bytes, bytes] | None:
    """The backup given the messages up to k (the primary died after sending message k):
    (what it served in all, what the consumer typed), or None if the pair had not formed.
    With ``disk`` (the blocks the primary's guest wrote in the whole run), the backup's disk
    holds the same at the end: what its replay wrote again, then what it wrote live."""
    seen = msgs[k][2]                       # what the consumer had when the primary died
    feed = _Feed()
    horizon = -1
    meta, snap, output = None, bytearray(), bytearray()
    for kind, payload, _ in msgs[:k + 1]:
        if kind == wire.LOG:
            feed.put(payload)
        elif kind == wire.HORIZON:
            horizon = wire.read_u64(payload)
        elif kind == wire.JOIN:
            meta = json.loads(payload)
        elif kind == wire.SNAP:
            snap += payload
        elif kind == wire.OUTPUT:
            output += payload
    feed.end()
    if horizon < 0:
        return None                          # died before the pair formed: no instruction ran
    console = ConsoleServer("backup")
    join = None
    if meta is not None:                     # a joined backup: the machine from the primary's state
        join = JoinState(meta["generation"], meta["icount"], meta["digests"], meta["input"], bytes(snap))
        console.preload(bytes(output))
    # the gate: the log is all here, and its last horizon is the latest heard of
    rp = LiveReplica(feed, image, console, lambda now: horizon, join)
    rp.stop_at = horizon
    if join is None:
        rp.start_ticks()
    res = rp.replay()
    typed = bytearray()
    _typist(bytearray(primary_out[:seen]), typed)   # what the consumer had typed so far
    if res.reason is StopReason.HOST:
        rp.go_live(console)
        fed = [rp.input_position()]          # the client resends from the position the server holds
        console.go_alone(fed[0])
        assert fed[0] <= len(typed)

        def source() -> bytes:
            _typist(console.out, typed)
            data = bytes(typed[fed[0]:])
            fed[0] = len(typed)
            return data

        rp.m.boundary.attach("console", source)
        res = rp.m.run(None)
    blocks = _disk_blocks(rp.m)
    rp.m.close()
    assert res.reason is StopReason.EXIT and res.status == 0
    assert blocks == disk, f"kill point {k}: the backup's disk differs from the primary's"
    out = bytes(console.out)
    assert out[:seen] == primary_out[:seen], f"kill point {k}: the output forked"
    return out, bytes(typed)


def test_every_kill_point_of_a_guest_that_reads_input():
    image, out, typed, msgs, _disk = _run_primary(ft_guest.build(lines=LINES, ask=ASK, delay=2000))
    assert out == ft_guest.expected(LINES, ASK, typed)
    assert sum(1 for kind, _, _ in msgs if kind == wire.HORIZON) > 30
    assert msgs[-1][2] == len(out)          # in the end everything was released
    points = 0
    for k in range(len(msgs)):
        r = _take_over_at(k, image, out, msgs)
        if r is not None:
            served, typed_k = r
            assert served == ft_guest.expected(LINES, ASK, typed_k), f"kill point {k}"
            points += 1
    assert points > 50


def test_every_kill_point_with_two_vcpus():
    image, out, _typed, msgs, _disk = _run_primary(ft_guest.build(lines=120, smp=True, delay=20000), vcpus=2)
    assert len({line.split()[1] for line in out.splitlines()}) > 10    # the AP's counter moves
    points = 0
    for k in range(len(msgs)):
        r = _take_over_at(k, image, out, msgs)
        if r is not None:
            assert r[0] == out, f"kill point {k}"
            points += 1
    assert points > 20


def test_every_kill_point_after_a_backup_joined():
    """The primary's backup dies, the primary goes on alone, a new backup joins (the
    machine's saved state, the console's positions, a log from there); at every message
    boundary of the joined link the joined backup takes over: nothing lost, nothing repeated."""
    image, out, _typed, msgs, _disk = _run_primary(ft_guest.build(lines=2 * LINES, ask=ASK, delay=2000), join_at=2)
    kinds = [kind for kind, _, _ in msgs]
    assert kinds[0] == wire.JOIN and wire.SNAP in kinds and wire.OUTPUT in kinds
    joined_at = next(released for kind, _, released in msgs if kind == wire.LOG)
    assert 0 < joined_at < len(out)          # output before the join, and after it
    assert msgs[-1][2] == len(out)
    points = 0
    for k in range(len(msgs)):
        r = _take_over_at(k, image, out, msgs)
        if r is not None:
            served, typed_k = r
            assert served == ft_guest.expected(2 * LINES, ASK, typed_k), f"kill point {k}"
            points += 1
    assert points > 50, points


def test_every_kill_point_after_a_backup_joined_with_two_vcpus():
    """As above with 2 vCPUs: the joined backup's machine holds both vCPUs' saved state and
    the schedule goes on from there exactly (the AP's counter in every line shows it)."""
    image, out, _typed, msgs, _disk = _run_primary(ft_guest.build(lines=240, smp=True, delay=20000), vcpus=2, join_at=2)
    assert len({line.split()[1] for line in out.splitlines()}) > 10    # the AP's counter moves
    points = 0
    for k in range(len(msgs)):
        r = _take_over_at(k, image, out, msgs)
        if r is not None:
            assert r[0] == out, f"kill point {k}"
            points += 1
    assert points > 40, points


def test_every_kill_point_of_a_guest_that_ends_before_the_first_horizon():
    """A guest whose whole run is shorter than one horizon interval: the log holds HORIZON 0
    and then the END.  A backup that holds only HORIZON 0 must not replay past it (the
    primary may have taken input there that never reached the backup): it goes live at
    tick 0 and runs the guest from its first instruction."""
    image, out, _typed, msgs, _disk = _run_primary(ft_guest.build(lines=12, delay=500))
    assert [wire.read_u64(p) for kind, p, _ in msgs if kind == wire.HORIZON] == [0, wire.END_OF_LOG]
    points = 0
    for k in range(len(msgs)):
        r = _take_over_at(k, image, out, msgs)
        if r is not None:
            assert r[0] == out == ft_guest.expected(12, 0, b""), f"kill point {k}"
            points += 1
    assert points >= 2, points


DISK_SECTORS = 16


def _disk_image(tmp: Path) -> tuple[Path, bytes]:
    data = bytes((i * 7 + 3) & 0xFF for i in range(32 << 10))
    path = tmp / "disk.img"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("join_at", [None, 2])
def test_every_kill_point_with_a_disk(tmp_path, join_at):
    """A guest that writes a sector after every line and prints a hash of what it reads back
    at its end: at every kill point (and after a backup joined, whose machine's state holds
    the disk's overlay) the backup's disk holds exactly what the primary's guest wrote, and
    the transcript, that hash included, is an uninterrupted run's."""
    path, data = _disk_image(tmp_path)
    lines = 80 if join_at is None else 160
    image, out, _typed, msgs, disk = _run_primary(ft_guest.build(lines=lines, ask=ASK, delay=2000, disk=DISK_SECTORS),
                                                  join_at=join_at, disk=path)
    assert disk                              # the guest wrote its disk (to the recording's overlay)
    points = 0
    for k in range(len(msgs)):
        r = _take_over_at(k, image, out, msgs, disk)
        if r is not None:
            served, typed_k = r
            assert served == ft_guest.expected(lines, ASK, typed_k, data, DISK_SECTORS), f"kill point {k}"
            points += 1
    assert points > 40, points
    assert path.read_bytes() == data         # neither side wrote the image file


def test_every_kill_point_of_drawn_runs(tmp_path_factory):
    """Hypothesis draws 30 runs (the guest's length and pace, how often it asks for input,
    how quickly the consumer answers, 1 or 2 vCPUs, a disk or none) and the primary is
    killed at every message boundary of it: each takeover serves an uninterrupted run's
    transcript (and the same disk).  With the tests above, over a thousand kill points."""
    counted: list[int] = []

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)   # the same 30 runs every time: the kill-point count is the suite's floor
    @given(lines=st.integers(45, 75), ask=st.sampled_from([0, 12, 25]), delay=st.sampled_from([10000, 20000]),
           type_every=st.integers(1, 3), smp=st.booleans(), disk=st.booleans())
    def one(lines, ask, delay, type_every, smp, disk):
        tmp = tmp_path_factory.mktemp("drawn")
        path, data = _disk_image(tmp) if disk else (None, None)
        ask = 0 if smp else ask
        guest = ft_guest.build(lines=lines, ask=ask, delay=delay, smp=smp, disk=DISK_SECTORS if disk else 0)
        image, out, _typed, msgs, blocks = _run_primary(guest, vcpus=2 if smp else 1, disk=path,
                                                        type_every=type_every)
        points = 0
        for k in range(len(msgs)):
            r = _take_over_at(k, image, out, msgs, blocks)
            if r is None:
                continue
            served, typed_k = r
            if smp:
                assert served == out, f"kill point {k}"
            else:
                assert served == ft_guest.expected(lines, ask, typed_k, data, DISK_SECTORS), f"kill point {k}"
            points += 1
        assert points >= 6, points
        counted.append(points)

    one()
    print(f"kill points: {sum(counted)} over {len(counted)} drawn runs")
    assert len(counted) == 30 and sum(counted) >= 650, counted
