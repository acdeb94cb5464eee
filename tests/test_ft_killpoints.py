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

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import ft_guest

from replay.ft import wire
from replay.ft.backup import LiveReplica, _Feed
from replay.ft.console import ConsoleServer
from replay.ft.primary import LinkSink, Primary
from replay.session import record
from vmm.machine import StopReason

pytestmark = pytest.mark.skipif(not ft_guest.have_nasm(), reason="nasm builds the FT test guest")

LINES, ASK, MEM = 100, 20, 4 << 20


class _Recorder:
    """The primary's link: keeps each message with what the console had released after it;
    a HORIZON is acknowledged at once (a backup that keeps up)."""

    def __init__(self, p: Primary):
        self.p = p
        self.msgs: list[tuple[bytes, bytes, int]] = []
        self.patience = None

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        if kind == wire.HORIZON:
            self.p._on_message(wire.ACK, payload)
        self.msgs.append((kind, payload, self.p.console.released))


def _typist(out: bytearray, typed: bytearray) -> None:
    while out.count(b"?\n") > len(typed):
        typed.append(ord("a") + len(typed) % 26)


def _run_primary(guest: Path, vcpus: int = 1):
    image = guest.read_bytes()
    ref: dict = {}
    console = ConsoleServer("primary")
    p = Primary(("127.0.0.1", 0), console)
    link = p.link = _Recorder(p)
    p.handshake = "accepted"
    typed = bytearray()
    fed = [0]

    def source() -> bytes:
        # the consumer types when it sees a prompt among the released output
        _typist(console.out[:console.released], typed)
        data = bytes(typed[fed[0]:])
        fed[0] = len(typed)
        return data

    def setup(m) -> None:
        ref["m"] = m
        p.setup(m)

    res, m = record(str(guest), image, LinkSink(p), mem_size=MEM, boot_kind="flat", live_input=source,
                    input_kind="ft", serial=console, setup=setup, on_writer=p.on_writer, vcpus=vcpus)
    assert res.reason is StopReason.EXIT and res.status == 0
    m.close()
    console.mark(p.last_tick)              # as Primary.finish: the output after the last horizon
    link.send(wire.HORIZON, wire.u64(wire.END_OF_LOG))
    return image, bytes(console.out), bytes(typed), link.msgs


def _take_over_at(k: int, image: bytes, primary_out: bytes, msgs) -> tuple[bytes, bytes] | None:
    """The backup given the messages up to k (the primary died after sending message k):
    (what it served in all, what the consumer typed), or None if the pair had not formed."""
    seen = msgs[k][2]                       # what the consumer had when the primary died
    feed = _Feed()
    horizon = -1
    for kind, payload, _ in msgs[:k + 1]:
        if kind == wire.LOG:
            feed.put(payload)
        elif kind == wire.HORIZON:
            horizon = wire.read_u64(payload)
    feed.end()
    if horizon < 0:
        return None                          # died before the pair formed: no instruction ran
    console = ConsoleServer("backup")
    rp = LiveReplica(feed, image, console, lambda now: None)
    rp.stop_at = horizon
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
