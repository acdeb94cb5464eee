"""The link between a primary and its backup: framed messages on one TCP
connection, written by the thread that sends them when the socket takes them
at once (the primary's run loop at each horizon: no thread handoff), else by a
sender thread that batches them and fills silences with heartbeats; and a
receiver thread that declares the peer lost after ``MISSED_BEATS`` heartbeat
intervals of silence or when the connection ends.

A frame is one type byte, a u32 payload length and the payload.  The receiver
hands a message on only once it is whole, so a peer that dies mid-frame
leaves nothing half-read behind.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

PROTOCOL = 1
MISSED_BEATS = 3

HELLO = b"H"      # primary -> backup: FT parameters (JSON)
ACCEPT = b"A"     # backup -> primary: the handshake passed (JSON)
REFUSE = b"R"     # backup -> primary: one line saying why not
LOG = b"L"        # primary -> backup: bytes of the event log (header, whole chunks)
HORIZON = b"T"    # primary -> backup: u64 tick: every event before it has been sent
                  #   [+ u64: every NIC frame produced before this tick left the primary]
ACK = b"K"        # backup -> primary: u64 tick: the log up to this horizon is held
                  #   [+ u64: the tick the replay has reached, as a PROGRESS says]
PROGRESS = b"P"   # backup -> primary: u64 tick the replay has reached
BEAT = b"B"       # either way: still here
BYE = b"E"        # primary -> backup: the run ended and every output was released
# a backup joining a running primary (vmm ft backup --join): after HELLO, before the log
JOIN = b"J"       # primary -> backup: the join point (JSON: generation, icount, digests, console positions)
SNAP = b"S"       # primary -> backup: bytes of the machine's snapshot file at the join point
OUTPUT = b"O"     # primary -> backup: bytes of the console output before the join point

_FRAME = struct.Struct("<cI")
_U64 = struct.Struct("<Q")
MAX_FRAME = 64 << 20
END_OF_LOG = (1 << 63) - 1   # the horizon after the END: the whole log


def u64(v: int) -> bytes:
    return _U64.pack(v)


def read_u64(payload: bytes, index: int = 0) -> int:
    """The index-th u64 of a payload (a HORIZON carries two: the tick, and the point before
    which the primary has sent every frame its NICs produced)."""
    return _U64.unpack_from(payload, 8 * index)[0]


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    """One message as it goes on the connection (for a socket that has no Link yet)."""
    return _FRAME.pack(kind, len(payload)) + payload


def connect(addr: tuple[str, int], timeout: float, what: str) -> socket.socket:
    """A TCP connection to ``addr``, retried for ``timeout`` seconds (the peer may not listen
    yet); OSError with one line naming ``what`` when it never answers."""
    end = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(addr, timeout=1.0)
        except OSError as e:
            if time.monotonic() > end:
                raise OSError(f"cannot reach the {what} at {addr[0]}:{addr[1]}: {e.strerror or e}") from None
            time.sleep(0.05)


def pack_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def parse_hostport(text: str, what: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'[HOST:]PORT' -> (host, port); ValueError with one line if it is not that."""
    host, _, port = text.rpartition(":")
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"{what} wants [HOST:]PORT, not {text!r}") from None
    if not 0 <= p < 65536:
        raise ValueError(f"{what}: port {p} is out of range")
    return host or default_host, p


class Link:
    """One end of the connection.  ``on_message(kind, payload)`` runs on the
    receiver thread; ``on_lost(reason)`` runs once, when the peer is gone."""

    def __init__(self, sock: socket.socket, heartbeat: float,
                 on_message: Callable[[bytes, bytes], None], on_lost: Callable[[str], None]):
        self.sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # timeout mode: the receiver wakes to count missed heartbeats, and the descriptor is
        # non-blocking at the OS level (socket module docs), so send() can write to it directly
        sock.settimeout(min(heartbeat, 0.05))
        self._fd = sock.fileno()
        self.heartbeat = heartbeat
        self.on_message = on_message
        self.on_lost = on_lost
        self._out: list[bytes] = []
        self._sending = False       # a batch is between the queue and the socket
        # when the connection was last written to: a BEAT goes after a heartbeat of silence, the
        # first one not at once (a joining backup says nothing after JOIN until it is answered)
        self._written = time.monotonic()
        self._cv = threading.Condition()
        self.lost: str | None = None
        self.closing = False
        self.last_heard = time.monotonic()
        # silence allowed before the peer is declared lost; while a pair forms (the backup
        # builds its machine, the primary waits for its answer) the ``patience`` is longer
        self.patience: float | None = None
        self.silent = False      # lost to silence (a network problem?) rather than a closed connection
        self.on_batch: Callable[[], None] | None = None   # after the messages of one read (to coalesce answers)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._threads = [threading.Thread(target=self._send_loop, name="ft-send", daemon=True),
                         threading.Thread(target=self._recv_loop, name="ft-recv", daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        """Queue one message; when nothing is queued before it, write it at once from this
        thread (a non-blocking write: the sender thread only takes what the socket would
        not, and reports a failed write by failing the same write itself)."""
        frame = _FRAME.pack(kind, len(payload)) + payload
        with self._cv:
            if self.lost is not None or self.closing:
                return
            if self._out or self._sending:
                self._out.append(frame)       # behind a batch: in order, by the sender thread
                self._cv.notify()
                return
            try:
                n = os.write(self._fd, frame)
            except BlockingIOError:
                n = 0
            except OSError:
                n = 0                         # the sender thread's write fails the same way: it loses the link
            self.bytes_sent += n
            self._written = time.monotonic()
            if n < len(frame):
                self._out.append(frame[n:])
                self._cv.notify()

    def close(self, drain: float = 1.0) -> None:
        """Send what is queued (for up to ``drain`` seconds), then close."""
        end = time.monotonic() + drain
        with self._cv:
            while (self._out or self._sending) and self.lost is None and time.monotonic() < end:
                self._cv.wait(0.01)
            self.closing = True
            self._cv.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _lose(self, reason: str) -> None:
        with self._cv:
            if self.lost is not None or self.closing:
                return
            self.lost = reason
            self._out.clear()
            self._cv.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.on_lost(reason)

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                if not self._out and self.lost is None and not self.closing:
                    # a heartbeat once the connection was silent for an interval (send() writes too)
                    self._cv.wait(max(0.001, self._written + self.heartbeat - time.monotonic()))
                if self.lost is not None or self.closing:
                    return
                if not self._out and time.monotonic() - self._written < self.heartbeat:
                    continue
                batch = b"".join(self._out) or _FRAME.pack(BEAT, 0)
                self._out.clear()
                self._sending = True
            try:
                self._write_all(batch)
                self._written = time.monotonic()
            except OSError as e:
                self._lose(f"sending failed: {e.strerror or e}")
                return
            finally:
                with self._cv:
                    self._sending = False
                    self._cv.notify_all()

    def _write_all(self, data: bytes) -> None:
        """The sender thread: write all of ``data``, waiting while the socket is full; fail
        (OSError) only when the peer takes nothing for as long as the receiver allows
        silence (a backlog, such as a joining backup's snapshot on a slow network, is
        not a failure)."""
        view = memoryview(data)
        stalled = time.monotonic()
        while view:
            try:
                n = self.sock.send(view)     # timeout mode: waits up to 50 ms for room
            except TimeoutError:
                n = 0
            if n:
                view = view[n:]
                self.bytes_sent += n
                stalled = time.monotonic()
                continue
            if self.lost is not None or self.closing:
                return
            limit = self.patience or self.heartbeat * MISSED_BEATS
            if time.monotonic() - stalled > limit:
                raise TimeoutError(f"the peer took nothing for {limit:.3g} s")

    def _recv_loop(self) -> None:
        buf = bytearray()
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                limit = self.patience or self.heartbeat * MISSED_BEATS
                if time.monotonic() - self.last_heard > limit:
                    self.silent = True
                    self._lose(f"no heartbeat for {limit:.3g} s")
                    return
                continue
            except OSError as e:
                self._lose(f"the connection failed: {e.strerror or e}")
                return
            if self.closing:
                return
            if not data:
                self._lose("the connection closed")
                return
            self.last_heard = time.monotonic()
            self.bytes_received += len(data)
            buf += data
            while len(buf) >= _FRAME.size:
                kind, n = _FRAME.unpack_from(buf)
                if n > MAX_FRAME:
                    self._lose(f"a frame of {n} bytes (the limit is {MAX_FRAME})")
                    return
                if len(buf) < _FRAME.size + n:
                    break
                payload = bytes(buf[_FRAME.size:_FRAME.size + n])
                del buf[:_FRAME.size + n]
                if kind != BEAT:
                    self.on_message(kind, payload)
            if self.on_batch is not None:
                self.on_batch()


class SidePath:
    """The second heartbeat path: UDP datagrams between the two hosts, apart from the
    log's TCP connection.  It decides nothing by itself; when the link fails it tells
    "the peer is dead" from "only the link failed" (the backup then leaves the lease to
    a primary that still answers, rather than take over from a healthy one)."""

    def __init__(self, host: str, heartbeat: float):
        self.heartbeat = heartbeat
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(min(heartbeat, 0.05))
        self.port = self.sock.getsockname()[1]
        self.peer: tuple[str, int] | None = None
        self.last_heard: float | None = None
        self.closed = False

    def start(self) -> None:
        threading.Thread(target=self._loop, name="ft-side", daemon=True).start()

    def alive(self) -> bool:
        """The peer was heard on this path within MISSED_BEATS heartbeats."""
        t = self.last_heard
        return t is not None and time.monotonic() - t <= self.heartbeat * MISSED_BEATS

    def close(self) -> None:
        self.closed = True

    def _loop(self) -> None:
        next_beat = 0.0
        while not self.closed:
            now = time.monotonic()
            if self.peer is not None and now >= next_beat:
                try:
                    self.sock.sendto(b"FTHB", self.peer)
                except OSError:
                    pass
                next_beat = now + self.heartbeat
            try:
                data, _ = self.sock.recvfrom(64)
            except (TimeoutError, OSError):
                continue
            if data == b"FTHB":
                self.last_heard = time.monotonic()
        self.sock.close()
