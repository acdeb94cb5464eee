"""Ethernet frames over a TCP stream, as QEMU's ``-netdev stream`` and ``-netdev socket`` carry them.

Each frame travels as a 4-byte big-endian length followed by that many bytes
of frame (destination address first, no FCS), so a ``StreamLink`` talks to
another ``vmm`` process, or to a QEMU started with ``-netdev
stream,addr.type=inet,...`` or ``-netdev socket,connect=...``/``listen=...``.

A ``StreamLink`` is a wire (devices/net/__init__.py): ``send(frame)`` queues
the frame for the peer, ``connect(receiver)`` names who gets the peer's
frames, and ``poll()`` moves bytes both ways without ever blocking.  It is
meant to be polled on a machine's schedule (a NIC's ``NetInput`` does, or a
switch it is plugged into); frames reach the receiver only from ``poll()``.

* ``StreamLink.connect(host, port)``: a client; the connection is made at
  once (``NetBackendError`` with one line if it cannot be).
* ``StreamLink.listen(host, port)``: a server for one peer at a time (QEMU's
  ``server=on``); the port is bound at once (``NetBackendError`` if it is in
  use), a peer is accepted by ``poll()``, and when it goes away the next one
  may connect.

Bounds: a frame longer than MAX_STREAM_FRAME (QEMU's NET_BUFSIZE, 4 KiB +
64 KiB) is a framing error that ends the connection (``protocol_errors``),
since nothing after it can be trusted; output waiting for a slow peer is
kept up to MAX_PENDING_OUTPUT bytes, and frames beyond that are dropped and
counted in ``drops``, as are frames sent while no peer is connected.
"""
from __future__ import annotations

import errno
import socket
import struct
from typing import Any

from host.net import NetBackendError

MAX_STREAM_FRAME = 4096 + 65536
MAX_PENDING_OUTPUT = 4 << 20
READ_CHUNK = 256 << 10
_LEN = struct.Struct(">I")


class StreamLink:
    """One end of a framed TCP stream (module doc)."""

    def __init__(self, sock: socket.socket | None = None, listener: socket.socket | None = None,
                 name: str = "stream") -> None:
        self.name = name
        self.sock: socket.socket | None = None
        self.listener = listener
        self.receiver: Any = None
        self._in = bytearray()
        self._out = bytearray()
        self.frames_in = self.frames_out = 0
        self.drops = 0
        self.protocol_errors = 0
        self.disconnects = 0
        if listener is not None:
            listener.setblocking(False)
        if sock is not None:
            self._adopt(sock)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def connect_to(cls, host: str, port: int, timeout: float = 5.0, name: str | None = None) -> StreamLink:
        """A client connected to ``host``:``port`` (NetBackendError if that fails)."""
        label = name or f"stream:{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise NetBackendError(f"{label}: cannot connect: {e.strerror or e}") from None
        return cls(sock, name=label)

    @classmethod
    def listen(cls, host: str, port: int, name: str | None = None) -> StreamLink:
        """A server bound to ``host``:``port`` (0: any free port; see ``address``)."""
        label = name or f"stream:{host}:{port}"
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            ls = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            raise NetBackendError(f"{label}: cannot listen: {e.strerror or e}") from None
        try:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(addr)
            ls.listen(1)
        except OSError as e:
            ls.close()
            why = "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise NetBackendError(f"{label}: cannot listen: {why}") from None
        return cls(listener=ls, name=label)

    @property
    def address(self) -> tuple[str, int] | None:
        """Where a server listens (host, port)."""
        if self.listener is None:
            return None
        return self.listener.getsockname()[:2]

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def _adopt(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.sock = sock
        self._in.clear()
        self._out.clear()

    def _drop_connection(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self.disconnects += 1
        self._in.clear()
        self._out.clear()

    # -- the wire ------------------------------------------------------------------------------
    def connect(self, receiver: Any) -> None:
        self.receiver = receiver

    def send(self, frame: bytes) -> None:
        if self.sock is None or len(frame) > MAX_STREAM_FRAME \
                or len(self._out) + 4 + len(frame) > MAX_PENDING_OUTPUT:
            self.drops += 1
            return
        self._out += _LEN.pack(len(frame))
        self._out += frame
        self.frames_out += 1
        self._flush()

    def poll(self) -> int:
        """Accept a peer, send what waits, deliver every whole frame received; returns frames delivered."""
        if self.sock is None and self.listener is not None:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return 0
            except OSError:
                return 0
            self._adopt(sock)
        if self.sock is None:
            return 0
        self._flush()
        if self.sock is None:
            return 0
        while True:
            try:
                chunk = self.sock.recv(READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop_connection()
                return 0
            if not chunk:
                self._drop_connection()
                break
            self._in += chunk
            if len(self._in) >= READ_CHUNK:
                break
        return self._deliver_frames()

    def _deliver_frames(self) -> int:
        n = 0
        buf = self._in
        pos = 0
        while len(buf) - pos >= 4:
            (length,) = _LEN.unpack_from(buf, pos)
            if length > MAX_STREAM_FRAME:
                self.protocol_errors += 1
                self._drop_connection()
                return n
            if len(buf) - pos - 4 < length:
                break
            frame = bytes(buf[pos + 4:pos + 4 + length])
            pos += 4 + length
            self.frames_in += 1
            n += 1
            if self.receiver is not None:
                self.receiver.deliver(frame)
        del buf[:pos]
        return n

    def _flush(self) -> None:
        while self._out and self.sock is not None:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop_connection()
                return
            del self._out[:sent]

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.setblocking(True)
                self.sock.settimeout(1.0)
                if self._out:
                    self.sock.sendall(self._out)
            except OSError:
                pass
            self.sock.close()
            self.sock = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
