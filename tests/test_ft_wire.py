"""The FT link (replay/ft/wire.py) by itself: a message is written by the thread that
sends it when the socket takes it at once, else (in part) by the sender thread; either
way the peer gets every message whole and in order, and heartbeats fill the silences."""
from __future__ import annotations

import os
import socket
import time

from replay.ft import wire


def _pair(heartbeat: float = 0.05, bufsize: int | None = None):
    """Two Links on a loopback TCP connection: (a, b, messages b received, reasons b was lost)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    sa = socket.create_connection(srv.getsockname())
    sb, _ = srv.accept()
    srv.close()
    if bufsize is not None:
        sa.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
    got: list[tuple[bytes, bytes]] = []
    lost_b: list[str] = []
    lost_a: list[str] = []
    a = wire.Link(sa, heartbeat, lambda k, p: None, lost_a.append)
    b = wire.Link(sb, heartbeat, lambda k, p: got.append((k, p)), lost_b.append)
    return a, b, got, lost_a, lost_b


def _until(cond, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def test_messages_larger_than_the_socket_takes_arrive_whole_and_in_order(monkeypatch):
    # a small send buffer: send()'s own write of a large message is partial, the sender
    # thread writes the rest, and the messages sent meanwhile queue behind it
    partial = []
    write = os.write

    def counting_write(fd: int, data) -> int:
        n = write(fd, data)
        if n < len(data):
            partial.append(n)
        return n

    monkeypatch.setattr(wire.os, "write", counting_write)
    a, b, got, lost_a, lost_b = _pair(bufsize=32 << 10)
    a.start()
    b.start()
    sent = []
    for i in range(30):
        kind, payload = (wire.LOG, os.urandom(100_000 + 4_099 * i)) if i % 3 else (wire.HORIZON, wire.u64(i))
        a.send(kind, payload)
        sent.append((kind, payload))
    assert _until(lambda: len(got) >= len(sent) or lost_a or lost_b), (lost_a, lost_b)
    assert not lost_a and not lost_b
    assert got == sent
    assert partial, "every write was whole: the sender thread's path was not exercised"
    assert not lost_a and not lost_b
    a.close()
    b.close()


def test_heartbeats_fill_silences_and_direct_writes():
    # one side sends every 10 ms (written by send() itself), the other nothing at all:
    # neither is declared lost over many heartbeat intervals
    a, b, got, lost_a, lost_b = _pair(heartbeat=0.05)
    a.start()
    b.start()
    end = time.monotonic() + 0.6
    n = 0
    while time.monotonic() < end:
        a.send(wire.HORIZON, wire.u64(n))
        n += 1
        time.sleep(0.01)
    time.sleep(0.4)        # then silence on both sides: only BEATs
    assert not lost_a and not lost_b
    assert [wire.read_u64(p) for k, p in got] == list(range(n))
    a.close()
    b.close()
