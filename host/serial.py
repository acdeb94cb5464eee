"""Host ends of an emulated serial line: where UART output goes, where input comes from.

A backend is outside the determinism boundary.  The UART writes every
transmitted byte to its backend at once; input is *never* pushed into the
device by a backend.  The machine polls ``poll_input()``, records what it got
in the replay EventLog (stamped with the instruction count) and delivers it
with ``Uart16550.receive()`` when the log says so; on replay the log, not
the backend, supplies the input.

Backends:

* ``NullBackend``: discards output, never has input.
* ``FileBackend(path)``: appends output to a file, never has input.
* ``BufferBackend``: output collects in ``.output``; input is queued with
  ``feed()`` (tests, the replay layer, the qtest harness).
* ``StdioBackend``: the user's terminal.  A TTY on stdin is put in raw mode
  (no echo, no line editing, no signals by default, output post-processing
  kept so a lone LF still starts a new line) and restored by ``close()`` and,
  should the program end without closing it, by an ``atexit`` hook.
  Ctrl-A x sets ``quit_requested``; Ctrl-A Ctrl-A sends one Ctrl-A; Ctrl-A
  followed by anything else sends both bytes.
* ``SocketBackend(host, port)``: a TCP server on 127.0.0.1 by default,
  serving one client at a time (others wait in the listen backlog); output
  produced while nobody is connected is dropped and counted in ``dropped``.

All I/O is non-blocking: ``poll_input()`` returns b"" when nothing is there.
Host I/O errors (a closed terminal, a vanished client) are absorbed by the
backend, never raised into the device.
"""
from __future__ import annotations

import atexit
import os
import select
import socket
import termios
from typing import Protocol, Self, runtime_checkable

CTRL_A = 0x01
_READ_CHUNK = 4096
_MAX_POLL = 64 * 1024


@runtime_checkable
class SerialBackend(Protocol):
    def write(self, data: bytes) -> None: ...

    def poll_input(self) -> bytes: ...

    def close(self) -> None: ...


class _Closing:
    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullBackend(_Closing):
    """A line to nowhere."""

    def write(self, data: bytes) -> None:
        pass

    def poll_input(self) -> bytes:
        return b""


class FileBackend(_Closing):
    """Appends output to ``path`` (unbuffered, so it is on disk as it is sent)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        # Held open for the backend's lifetime; close() releases it.
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115

    def write(self, data: bytes) -> None:
        if not self._file.closed:
            self._file.write(data)

    def poll_input(self) -> bytes:
        return b""

    def close(self) -> None:
        self._file.close()


class BufferBackend(_Closing):
    """Output in memory (``.output``), input from ``feed()``."""

    def __init__(self, initial_input: bytes = b""):
        self.output = bytearray()
        self._input = bytearray(initial_input)

    def write(self, data: bytes) -> None:
        self.output += data

    def feed(self, data: bytes) -> None:
        self._input += data

    def poll_input(self) -> bytes:
        data = bytes(self._input)
        self._input.clear()
        return data

    def take_output(self) -> bytes:
        """Return the output so far and forget it."""
        data = bytes(self.output)
        self.output.clear()
        return data


class StdioBackend(_Closing):
    """The controlling terminal (or whatever fds 0 and 1 are).

    ``in_fd``/``out_fd`` default to stdin/stdout; tests pass a pty.  The
    backend does not own the fds and never closes them.  ``escape`` (default:
    on when the input is a TTY) enables the Ctrl-A commands; ``allow_signals``
    keeps ISIG so that Ctrl-C interrupts the emulator instead of reaching
    the guest.
    """

    def __init__(
        self,
        in_fd: int = 0,
        out_fd: int = 1,
        *,
        escape: bool | None = None,
        allow_signals: bool = False,
    ):
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.quit_requested = False
        self.eof = False
        self.output_broken = False
        self.closed = False
        self._escape_pending = False
        self._saved_attrs: list | None = None
        try:
            self.is_tty = os.isatty(in_fd)
        except OSError:
            self.is_tty = False
        self.escape = self.is_tty if escape is None else escape
        if self.is_tty:
            self._enter_raw(allow_signals)

    def _enter_raw(self, allow_signals: bool) -> None:
        try:
            saved = termios.tcgetattr(self.in_fd)
        except termios.error:
            self.is_tty = False
            return
        iflag, oflag, cflag, lflag, ispeed, ospeed, cc = saved
        # Input arrives byte by byte, unaltered; the guest does its own echo.
        iflag &= ~(termios.BRKINT | termios.ICRNL | termios.INLCR | termios.IGNCR
                   | termios.ISTRIP | termios.IXON | termios.PARMRK | termios.INPCK)
        cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
        lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN)
        if not allow_signals:
            lflag &= ~termios.ISIG
        cc = list(cc)
        cc[termios.VMIN] = 1
        cc[termios.VTIME] = 0
        # Register the restore before changing anything, so no exit path
        # can leave the terminal raw.
        self._saved_attrs = saved
        atexit.register(self.restore_terminal)
        termios.tcsetattr(self.in_fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])

    def restore_terminal(self) -> None:
        """Put the terminal back as it was; safe to call any number of times."""
        saved, self._saved_attrs = self._saved_attrs, None
        if saved is None:
            return
        try:
            termios.tcsetattr(self.in_fd, termios.TCSADRAIN, saved)
        except (termios.error, OSError):
            pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.restore_terminal()
        atexit.unregister(self.restore_terminal)

    def write(self, data: bytes) -> None:
        if self.output_broken or not data:
            return
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.out_fd, view)
            except (BlockingIOError, InterruptedError):
                try:
                    _, writable, _ = select.select([], [self.out_fd], [], 1.0)
                except (OSError, ValueError):
                    writable = []
                if not writable:
                    return  # a stalled terminal loses output rather than the VM
                continue
            except OSError:
                self.output_broken = True
                return
            view = view[n:]

    def poll_input(self) -> bytes:
        if self.closed or self.eof:
            return b""
        chunks: list[bytes] = []
        total = 0
        while total < _MAX_POLL:
            try:
                ready, _, _ = select.select([self.in_fd], [], [], 0)
            except (OSError, ValueError):
                self.eof = True
                break
            if not ready:
                break
            try:
                data = os.read(self.in_fd, _READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # EIO: the terminal is gone (pty master closed).
                self.eof = True
                break
            if not data:
                self.eof = True
                break
            chunks.append(data)
            total += len(data)
        data = b"".join(chunks)
        if self.escape and data:
            data = self._filter_escapes(data)
        return data

    def _filter_escapes(self, data: bytes) -> bytes:
        if not self._escape_pending and CTRL_A not in data:
            return data
        out = bytearray()
        for b in data:
            if self._escape_pending:
                self._escape_pending = False
                if b in (0x78, 0x58):  # x, X
                    self.quit_requested = True
                elif b == CTRL_A:
                    out.append(CTRL_A)
                else:
                    out.append(CTRL_A)
                    out.append(b)
            elif b == CTRL_A:
                self._escape_pending = True
            else:
                out.append(b)
        return bytes(out)


class SocketBackend(_Closing):
    """A TCP server for one client at a time; bound to loopback unless told otherwise.

    ``port=0`` picks a free port, readable afterwards as ``.port``.  Output
    the client is too slow to take is queued up to ``max_pending`` bytes and
    dropped beyond (counted in ``dropped``), so the VM never blocks on a
    socket.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, max_pending: int = 1 << 20):
        self.max_pending = max_pending
        self.dropped = 0
        self.connections = 0
        self._client: socket.socket | None = None
        self._pending = bytearray()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(1)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self.address = self._listener.getsockname()
        self.host = self.address[0]
        self.port = self.address[1]

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _accept(self) -> None:
        if self._client is not None or self._listener.fileno() < 0:
            return
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        conn.setblocking(False)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self._client = conn
        self.connections += 1

    def _drop_client(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except OSError:
                pass
        self._client = None
        self.dropped += len(self._pending)
        self._pending.clear()

    def _flush(self) -> None:
        client = self._client
        while client is not None and self._pending:
            try:
                n = client.send(self._pending)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop_client()
                return
            del self._pending[:n]

    def write(self, data: bytes) -> None:
        self._accept()
        if self._client is None:
            self.dropped += len(data)
            return
        room = self.max_pending - len(self._pending)
        if len(data) > room:
            self.dropped += len(data) - max(room, 0)
            data = data[: max(room, 0)]
        self._pending += data
        self._flush()

    def poll_input(self) -> bytes:
        self._accept()
        if self._client is None:
            return b""
        self._flush()
        chunks: list[bytes] = []
        total = 0
        while self._client is not None and total < _MAX_POLL:
            try:
                data = self._client.recv(_READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop_client()
                break
            if not data:
                self._drop_client()
                break
            chunks.append(data)
            total += len(data)
        return b"".join(chunks)

    def close(self) -> None:
        self._drop_client()
        self._listener.close()

