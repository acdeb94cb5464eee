"""The console endpoint of a fault-tolerant pair, and a client for it.

COM1 of the guest is served on one TCP address, by the primary and, after a
failover, by the backup at the same address.  Both directions carry stream
positions, so a client that reconnects after a failover loses nothing and
repeats nothing.  The protocol (ASCII heads, raw bytes after them):

  client -> server   ``STATUS\\n``                 instead of HELLO: one JSON line of the side's
                                                   state (`vmm ft status`), then the server closes
                     ``JOIN\\n``                   instead of HELLO: a backup joining this primary
                                                   (`vmm ft backup --join`); the connection becomes
                                                   the pair's link (replay/ft/wire.py)
                     ``HELLO <have>\\n``           the output bytes it already holds
                     ``IN <pos> <n>\\n`` + n bytes  console input at input position pos
  server -> client   ``WELCOME <role> <inpos>\\n``  input bytes the machine holds (resend from there)
                     ``OUT <pos> <n>\\n`` + n bytes output at output position pos
                     ``END <status>\\n``            the guest ended; every output was sent

The server keeps the whole output stream.  Output is *released* by the output
rule (the primary: once the backup holds the log up to the instruction that
produced it; a side alone: at once) and only released bytes are sent.  Input
bytes already received (by position) are ignored when a client sends them
again.
"""
from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Callable


class ConsoleServer:
    """The machine side is a serial backend (``write``, ``poll_input``, ``close``)."""

    def __init__(self, role: str):
        self.role = role
        self.status: Callable[[], dict] | None = None    # what a STATUS request is answered
        self.on_join: Callable[[socket.socket], None] | None = None   # a backup joining (its connection)
        self.lock = threading.Lock()
        self.out = bytearray()
        self.released = 0
        self.held = True                      # output waits for release_through()
        # (end position, stamp): the output up to there was produced after the horizon ``stamp``
        self._pending: deque[tuple[int, int]] = deque()
        self._inbuf = bytearray()
        self.in_received = 0                  # input position: bytes accepted from clients
        self.finished: int | None = None      # the guest's exit status once it ended
        self._clients: list[_Client] = []
        self._sock: socket.socket | None = None
        self.address: tuple[str, int] | None = None
        self.first_release: float | None = None   # host time of the first byte sent after go_alone()
        self.on_first_release: Callable[[float], None] | None = None   # called once, with that time
        self._alone_at: float | None = None
        self.ends_sent = 0

    # -- the machine's side (the run loop's thread) --------------------------------
    def write(self, data: bytes) -> None:
        with self.lock:
            self.out += data
            if self.held:
                return          # held: mark() says, at the next horizon, after which one it came
            self.released = len(self.out)
        self._push()

    def poll_input(self) -> bytes:
        with self.lock:
            data = bytes(self._inbuf)
            self._inbuf.clear()
        return data

    def close(self) -> None:
        pass

    # -- the output rule -----------------------------------------------------------
    def mark(self, stamp: int) -> None:
        """The run loop's thread, at a horizon (and at the end): the output held since the
        previous mark was produced after the horizon ``stamp`` (and before this one)."""
        with self.lock:
            if not self.held:
                return
            end = self._pending[-1][0] if self._pending else self.released
            if len(self.out) > end:
                self._pending.append((len(self.out), stamp))

    def release_through(self, tick: int) -> None:
        """Release the output produced before virtual time ``tick``."""
        with self.lock:
            pend = self._pending
            rel = self.released
            while pend and pend[0][1] < tick:
                rel = pend.popleft()[0]
            if rel == self.released:
                return
            self.released = rel
        self._push()

    def go_alone(self, in_position: int | None = None) -> None:
        """No output rule from now on: release everything held and what comes later.
        ``in_position`` resets the input position (a backup going live: what its log held)."""
        with self.lock:
            self.held = False
            self._pending.clear()
            self.released = len(self.out)
            if in_position is not None:
                self.in_received = in_position
                self._inbuf.clear()
            self._alone_at = time.monotonic()
        self._push()

    def rejoin(self) -> tuple[bytes, int]:
        """A backup joins this side, which ran alone: the output rule holds again from
        here.  Returns the output so far and the input bytes the machine took (the
        joining backup's console starts from these positions).  The run loop's thread."""
        with self.lock:
            self.held = True
            self._pending.clear()
            self.released = len(self.out)
            self._alone_at = None
            return bytes(self.out), self.in_received - len(self._inbuf)

    def preload(self, out: bytes) -> None:
        """A joining backup's console: the output the primary produced before the join."""
        with self.lock:
            self.out[:0] = out

    def drop_held(self) -> None:
        """This side lost the lease: what it held is never released."""
        with self.lock:
            self._pending.clear()

    def finish(self, status: int) -> None:
        with self.lock:
            self.finished = status
        self._push()

    def ever_ended(self) -> bool:
        """Some client received the END."""
        return self.ends_sent > 0

    def all_sent(self) -> bool:
        with self.lock:
            return all(c.closed or (c.sent >= len(self.out) and c.ended) for c in self._clients)

    # -- the network side -----------------------------------------------------------
    def listen(self, host: str, port: int) -> tuple[str, int]:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(8)
        self._sock = s
        self.address = s.getsockname()[:2]
        threading.Thread(target=self._accept_loop, name="ft-console", daemon=True).start()
        return self.address

    def stop(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with self.lock:
            clients = list(self._clients)
        for c in clients:
            c.close()

    def _accept_loop(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = _Client(conn)
            threading.Thread(target=self._serve, args=(c,), name="ft-console-client", daemon=True).start()

    def _serve(self, c: _Client) -> None:
        r = _Reader(c.sock)
        try:
            head = r.line()
            parts = head.split()
            if parts == [b"STATUS"]:
                import json

                st = dict(self.status() if self.status else {}, role=self.role, output_bytes=len(self.out),
                          released=self.released, input_bytes=self.in_received)
                c.send(json.dumps(st, sort_keys=True).encode() + b"\n")
                c.close()
                return
            if parts == [b"JOIN"]:
                if self.on_join is None or r.buf:   # the joining side speaks only once answered
                    c.close()
                else:
                    self.on_join(c.sock)
                return
            if len(parts) != 2 or parts[0] != b"HELLO" or not parts[1].isdigit():
                c.close()
                return
            with self.lock:
                c.sent = min(int(parts[1]), len(self.out))
                c.send(b"WELCOME %s %d\n" % (self.role.encode(), self.in_received))
                self._clients.append(c)
            self._push()
            while True:
                parts = r.line().split()
                if len(parts) != 3 or parts[0] != b"IN" or not parts[1].isdigit() or not parts[2].isdigit():
                    break
                pos, n = int(parts[1]), int(parts[2])
                data = r.exact(n)
                with self.lock:
                    skip = self.in_received - pos
                    if 0 <= skip < n:
                        self._inbuf += data[skip:]
                        self.in_received += n - skip
        except (OSError, EOFError):
            pass
        c.close()

    def _push(self) -> None:
        first = None
        with self.lock:
            for c in self._clients:
                if c.closed:
                    continue
                if c.sent < self.released:
                    c.send(b"OUT %d %d\n" % (c.sent, self.released - c.sent) + bytes(self.out[c.sent:self.released]))
                    c.sent = self.released
                    if self._alone_at is not None and self.first_release is None and not c.closed:
                        first = self.first_release = time.monotonic()
                if self.finished is not None and not c.ended and c.sent >= len(self.out) \
                        and self.released >= len(self.out):
                    c.send(b"END %d\n" % self.finished)
                    c.ended = True
                    self.ends_sent += 1
            self._clients = [c for c in self._clients if not c.closed]
        if first is not None and self.on_first_release is not None:
            self.on_first_release(first)


class _Client:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sent = 0
        self.ended = False
        self.closed = False

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass


class _Reader:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def _more(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise EOFError
        self.buf += data

    def line(self, limit: int = 256) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > limit:
                raise EOFError
            self._more()
        i = self.buf.index(b"\n")
        out = bytes(self.buf[:i])
        del self.buf[:i + 1]
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


class ConsoleClient:
    """A consumer of the console: keeps the transcript (by position, so a
    reconnection after a failover neither loses nor repeats a byte) and the
    input it typed (resent from the position the server says it holds).

    ``addresses`` are tried in turn until one answers; ``on_output(transcript)``
    runs after each new piece of output, and may call ``type()``.
    """

    def __init__(self, addresses: list[tuple[str, int]], on_output: Callable[[ConsoleClient], None] | None = None):
        self.addresses = addresses
        self.on_output = on_output
        self.transcript = bytearray()
        self.typed = bytearray()
        self.status: int | None = None
        self.connections = 0
        self.served_by: list[str] = []
        self.overlaps = 0           # bytes a server sent again after a reconnection (skipped by position)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.last_gap: tuple[float, float] | None = None   # (disconnected at, first new output at)
        self._gap_start: float | None = None

    def type(self, data: bytes) -> None:
        with self._lock:
            pos = len(self.typed)
            self.typed += data
            s = self._sock
        if s is not None:
            try:
                s.sendall(b"IN %d %d\n" % (pos, len(data)) + data)
            except OSError:
                pass

    def drop(self) -> None:
        """Close the current connection (the client reconnects, by position)."""
        with self._lock:
            s = self._sock
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _connect(self, deadline: float) -> socket.socket:
        while True:
            for host, port in self.addresses:
                try:
                    return socket.create_connection((host, port), timeout=0.2)
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError("no console server answered")
            time.sleep(0.002)     # a failover's new side listens within milliseconds

    def run(self, timeout: float = 120.0, reconnect_for: float = 30.0) -> int:
        """Read until the guest ends (its status) or ``timeout`` seconds pass (TimeoutError)."""
        end = time.monotonic() + timeout
        while self.status is None:
            s = self._connect(min(end, time.monotonic() + reconnect_for))
            s.settimeout(None)
            self.connections += 1
            r = _Reader(s)
            try:
                s.sendall(b"HELLO %d\n" % len(self.transcript))
                head = r.line().split()
                if len(head) != 3 or head[0] != b"WELCOME":
                    raise EOFError
                self.served_by.append(head[1].decode())
                inpos = int(head[2])
                with self._lock:
                    self._sock = s
                    again = bytes(self.typed[inpos:])
                if again:
                    s.sendall(b"IN %d %d\n" % (inpos, len(again)) + again)
                while self.status is None:
                    parts = r.line().split()
                    if parts[0] == b"END":
                        self.status = int(parts[1])
                        break
                    pos, n = int(parts[1]), int(parts[2])
                    data = r.exact(n)
                    have = len(self.transcript)
                    if pos > have:
                        raise RuntimeError(f"the console skipped output: got position {pos}, held {have}")
                    self.overlaps += min(n, have - pos)
                    new = data[have - pos:]
                    if new:
                        if self._gap_start is not None:
                            self.last_gap = (self._gap_start, time.monotonic())
                            self._gap_start = None
                        self.transcript += new
                        if self.on_output is not None:
                            self.on_output(self)
            except (OSError, EOFError):
                if self._gap_start is None:
                    self._gap_start = time.monotonic()
            finally:
                with self._lock:
                    self._sock = None
                s.close()
            if time.monotonic() > end:
                raise TimeoutError("the guest did not end in time")
        return self.status


def query_status(host: str, port: int, timeout: float = 5.0) -> dict:
    """The state a live side of a pair reports on its console address (OSError, ValueError)."""
    import json

    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"STATUS\n")
        return json.loads(_Reader(s).line(1 << 16))
