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

sys.path.insert(0, str(Path(__file__).parent))
import ft_guest

from replay.ft import wire
from replay.ft.backup import JoinState, LiveReplica, _Feed
from replay.ft.console import ConsoleServer
from replay.ft.primary import LinkSink, Primary
from replay.session import record
from vmm.machine import StopReason

pytestmark = pytest.mark.skipif(not ft_guest.have_nasm(), reason="nasm builds the FT test guest")

LINES, ASK, MEM = 100, 20, 4 << 20


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


def _run_primary(guest: Path, vcpus: int = 1, join_at: int | None = None):
    """The primary's run: (image, output, typed, messages).  With ``join_at``, its backup is
    lost at that input poll (it goes on alone), a backup joins at the next one, and the
    messages are the joined link's."""
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
        _typist(console.out[:console.released], typed)
        with console.lock:
            console._inbuf += typed[fed[0]:]
            console.in_received += len(typed) - fed[0]
        fed[0] = len(typed)
        return console.poll_input()

    def setup(m) -> None:
        ref["m"] = m
        p.setup(m)

    res, m = record(str(guest), image, LinkSink(p), mem_size=MEM, boot_kind="flat", live_input=source,
                    input_kind="ft", serial=console, setup=setup, on_writer=p.on_writer, vcpus=vcpus)
    assert res.reason is StopReason.EXIT and res.status == 0
    m.close()
    console.mark(p.last_tick)              # as Primary.finish: the output after the last horizon
    if join_at is not None:
        assert p.joins == 1 and p.link is ref["joined"]
        link = p.link
    link.send(wire.HORIZON, wire.u64(wire.END_OF_LOG))
    return image, bytes(console.out), bytes(typed), link.msgs


def _take_over_at(k: int, image: bytes, primary_out: bytes, msgs) -> tuple[bytes, bytes] | None:
    """The backup given the messages up to k (the primary died after sending message k):
    (what it served in all, what the consumer typed), or None if the pair had not formed."""
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
    rp = LiveReplica(feed, image, console, lambda now: None, join)
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
    rp.m.close()
    assert res.reason is StopReason.EXIT and res.status == 0
    out = bytes(console.out)
    assert out[:seen] == primary_out[:seen], f"kill point {k}: the output forked"
    return out, bytes(typed)


def test_every_kill_point_of_a_guest_that_reads_input():
    image, out, typed, msgs = _run_primary(ft_guest.build(lines=LINES, ask=ASK, delay=2000))
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
    image, out, _typed, msgs = _run_primary(ft_guest.build(lines=120, smp=True, delay=20000), vcpus=2)
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
    image, out, _typed, msgs = _run_primary(ft_guest.build(lines=2 * LINES, ask=ASK, delay=2000), join_at=2)
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
    image, out, _typed, msgs = _run_primary(ft_guest.build(lines=240, smp=True, delay=20000), vcpus=2, join_at=2)
    assert len({line.split()[1] for line in out.splitlines()}) > 10    # the AP's counter moves
    points = 0
    for k in range(len(msgs)):
        r = _take_over_at(k, image, out, msgs)
        if r is not None:
            assert r[0] == out, f"kill point {k}"
            points += 1
    assert points > 40, points
