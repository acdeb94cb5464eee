"""`vmm run` in a terminal (a pseudo-terminal, as a user's shell gives it):

* the demo's output reaches the terminal and the terminal is as it was after;
* Ctrl-A x quits a guest that would run forever, and the terminal is restored;
* `--gdb` waits for gdb with the terminal left cooked, so Ctrl-C ends the wait
  cleanly (status 130, one line, no traceback);
* keys typed while waiting never reach the guest; keys typed once gdb has let
  it run do; the port is closed once the guest has ended;
* the progress line on stderr never shares a line with the guest's output.
"""
from __future__ import annotations

import os
import pty
import re
import select
import signal
import socket
import sys
import termios
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class Term:
    """A child process on a pseudo-terminal: its stdin, stdout and stderr, and its controlling tty."""

    def __init__(self, *args: str, env: dict | None = None):
        full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        pid, fd = pty.fork()
        if pid == 0:  # the child: exec at once
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-m", "tools.cli", *args], full_env)
        self.pid, self.fd = pid, fd
        self.out = bytearray()
        self.status: int | None = None

    def attrs(self):
        return termios.tcgetattr(self.fd)

    def raw(self) -> bool:
        return not self.attrs()[3] & termios.ICANON

    def read_until(self, pattern: bytes, timeout: float = 60) -> bytes:
        end = time.monotonic() + timeout
        while pattern not in self.out:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen; got {bytes(self.out[-2000:])!r}")
            r, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if r:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError(f"{pattern!r} not seen before EOF; got {bytes(self.out[-2000:])!r}")
                self.out += data
        return bytes(self.out)

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 60) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r, _, _ = select.select([self.fd], [], [], 0.1)
            if r:
                try:
                    data = os.read(self.fd, 65536)
                    self.out += data
                except OSError:
                    pass
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(st)
                return self.status
        raise AssertionError(f"still running after {timeout}s; output {bytes(self.out[-2000:])!r}")

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except OSError:
                pass
        os.close(self.fd)


@pytest.fixture
def term():
    made: list[Term] = []

    def spawn(*args: str, env: dict | None = None) -> Term:
        t = Term(*args, env=env)
        made.append(t)
        return t
    yield spawn
    for t in made:
        t.close()


def _flat(tmp_path: Path, name: str, code: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(code + bytes(8))
    return str(p)


# mov dx, 0x3f8 ; mov al, 'R' ; out dx, al ; jmp $   -- says it runs, then spins forever
SPIN = b"\x66\xba\xf8\x03\xb0R\xee\xeb\xfe"
# poll COM1's LSR for a byte, then exit through 0x501 with it
COM1_POLL = b"\x66\xba\xfd\x03\xec\xa8\x01\x74\xfb\x66\xba\xf8\x03\xec\x66\xba\x01\x05\xee\xf4"


def status(v: int) -> int:
    try:
        from tools.exitstatus import guest_status
    except ImportError:
        return v
    return guest_status(v)


def test_the_demo_in_a_terminal_and_the_terminal_after(term):
    t = term("run")
    before = t.attrs()
    assert t.wait() == 0
    text = t.out.decode(errors="replace")
    assert "[demo] all tasks done, exiting with status 0" in text
    assert "Traceback" not in text
    assert t.attrs() == before


def test_ctrl_a_x_quits_and_restores_the_terminal(term, tmp_path):
    t = term("run", _flat(tmp_path, "spin.bin", SPIN), "--boot", "flat")
    cooked = t.attrs()
    t.read_until(b"R")
    assert t.raw()                        # the guest has the terminal
    t.write(b"\x01x")
    assert t.wait(30) == 0
    assert "Traceback" not in t.out.decode(errors="replace")
    assert t.attrs() == cooked and not t.raw()


def test_gdb_wait_leaves_the_terminal_cooked_and_ctrl_c_ends_it(term):
    t = term("run", "demo", "--gdb", "127.0.0.1:0")
    t.read_until(b"waiting for gdb")
    assert not t.raw()                    # Ctrl-C is a signal while nobody has connected
    t.write(b"\x03")
    assert t.wait(30) == 130
    text = t.out.decode(errors="replace")
    assert "Traceback" not in text
    assert text.rstrip().splitlines()[-1].endswith("vmm: interrupted")
    assert not t.raw()


def _rsp(sock: socket.socket, payload: str) -> None:
    body = payload.encode()
    sock.sendall(b"$" + body + b"#" + f"{sum(body) & 0xFF:02x}".encode())


def _reply(sock: socket.socket, timeout: float = 30) -> str:
    sock.settimeout(timeout)
    buf = b""
    while True:
        m = re.search(rb"\$([^#]*)#[0-9a-f]{2}", buf)
        if m:
            sock.sendall(b"+")
            return m.group(1).decode()
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"connection closed; got {buf!r}")
        buf += chunk


def test_keys_typed_while_waiting_never_reach_the_guest(term, tmp_path):
    t = term("run", _flat(tmp_path, "poll.bin", COM1_POLL), "--boot", "flat", "--gdb", "127.0.0.1:0")
    out = t.read_until(b"waiting for gdb").decode()
    port = int(re.search(r"target remote [\d.]+:(\d+)", out).group(1))
    t.write(b"5")                          # typed while waiting: discarded
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", port)) as s:
        _rsp(s, "?")
        assert _reply(s).startswith("T")
        deadline = time.monotonic() + 10
        while not t.raw() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert t.raw()                     # the guest has the terminal while gdb is there
        _rsp(s, "c")
        time.sleep(0.5)
        t.write(b"6")                      # typed while the guest runs: its input
        stop = _reply(s)
    assert stop.startswith("W"), stop
    assert t.wait(30) == status(ord("6"))
    with pytest.raises(OSError):           # the guest has ended: nobody listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert not t.raw()


def test_progress_never_shares_a_line_with_guest_output(term, tmp_path):
    log = tmp_path / "demo.vmlog"
    t = term("record", "demo", "-o", str(log), env={"VMM_PROGRESS_INTERVAL": "0"})
    assert t.wait() == 0
    text = t.out.decode(errors="replace")
    shown = list(re.finditer(r"vmm: recording [^\r\n\x1b]*", text))
    assert shown, text[-1500:]
    for m in shown:
        after = text[m.end():m.end() + 4]
        assert after.startswith(("\r\x1b[K", "\r\n")), (m.group(0), after)
    # every line the demo printed is whole once the erased progress lines are taken out
    clean = re.sub(r"\r\x1b\[K(vmm: recording [^\r\n\x1b]*)?", "", text)
    from guests import build as gb

    for line in gb.expected_serial("demo").decode().splitlines():
        if line.startswith("[demo] tick") or "memory:" in line or "command line" in line:
            continue
        assert line in clean, line
    t = term("replay", str(log), env={"VMM_PROGRESS_INTERVAL": "0"})
    assert t.wait() == 0
    text = t.out.decode(errors="replace")
    assert re.search(r"vmm: replaying [\d,]+ of [\d,]+ instructions \(\d+\.\d%\)", text), text[-1500:]


def test_qemu_gdb_option_runs_the_guest_until_gdb_attaches_and_on_after_it_detaches(term, tmp_path):
    """-s / -gdb tcp::PORT without -S, as QEMU: the guest runs at once; gdb attaching stops it;
    detaching lets it run on (here: to read the key typed next and exit with it)."""
    t = term("run", _flat(tmp_path, "poll.bin", COM1_POLL), "--boot", "flat", "-gdb", "tcp:127.0.0.1:0")
    out = t.read_until(b"gdb may attach at any time").decode()
    t.read_until(b"\n", timeout=5)
    port = int(re.search(r"target remote [\d.]+:(\d+)", t.out.decode()).group(1))
    deadline = time.monotonic() + 10
    while not t.raw() and time.monotonic() < deadline:   # the guest runs, and has the terminal
        time.sleep(0.05)
    assert t.raw(), out
    with socket.create_connection(("127.0.0.1", port)) as s:
        _rsp(s, "?")
        assert _reply(s).startswith("T")
        _rsp(s, "g")
        regs = _reply(s)
        eip = int.from_bytes(bytes.fromhex(regs[8 * 8:8 * 9]), "little")
        assert 0x100000 <= eip < 0x100000 + len(COM1_POLL)       # stopped inside the polling loop
        _rsp(s, "D")
        assert _reply(s) == "OK"
    time.sleep(0.3)
    t.write(b"7")
    assert t.wait(30) == status(ord("7"))
    assert not t.raw()


def test_run_progress_and_the_closing_message_on_a_line_of_its_own(term, tmp_path):
    t = term("run", _flat(tmp_path, "spin.bin", SPIN), "--boot", "flat", "--max-instructions", "30000000",
             env={"VMM_PROGRESS_INTERVAL": "0"})
    assert t.wait() == 0
    text = t.out.decode(errors="replace")
    assert re.search(r"vmm: running [\d,]+ of 30,000,000 instructions \(\d+\.\d%\)", text), text[-1500:]
    i = text.index("vmm: stopped after 30000000 instructions")
    assert text[:i].endswith("\r\x1b[K") or text[:i].endswith("\n"), repr(text[i - 80:i + 40])
