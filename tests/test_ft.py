"""Lockstep fault tolerance (replay/ft/) with real processes: `vmm ft primary`,
`vmm ft backup`, and a console consumer that follows the pair by output and
input position.  Each test checks what a user of the console sees: the
transcript of a run with a failure equals that of a run without one, byte
for byte (nothing lost, nothing repeated), and a partition never leaves two
sides producing output.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import ft_guest

from replay.ft.arbiter import Arbiter
from replay.ft.console import ConsoleClient, query_status

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not ft_guest.have_nasm(), reason="nasm builds the FT test guest")

LINES, ASK = 1200, 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vmm(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", "import sys; from tools.cli import main; sys.exit(main())", *args],
                            cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def finish(p: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    try:
        _out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        _out, err = p.communicate()
        raise AssertionError(f"vmm did not end in {timeout} s: {err.decode(errors='replace')}") from None
    return p.returncode, err.decode(errors="replace")


class Pair:
    """A backup, a primary and the ports between them (the primary may talk through a proxy)."""

    def __init__(self, tmp: Path, guest: Path, smp: int = 1, arbiter: tuple[str, str] | None = None,
                 backup_console: bool = False, via=None, heartbeat: str = "100ms",
                 primary_args: tuple[str, ...] = (), backup_args: tuple[str, ...] = ()):
        self.listen = free_port()
        self.console = free_port()
        self.backup_console = free_port() if backup_console else self.console
        arb_p = arb_b = str(tmp / "arbiter.lock")
        if arbiter:
            arb_p, arb_b = arbiter
        battrs = ["--console", f"127.0.0.1:{self.backup_console}"] if backup_console else []
        self.backup = vmm("ft", "backup", "--listen", f"127.0.0.1:{self.listen}", "--arbiter", arb_b,
                          "--linger", "5", "--heartbeat", heartbeat, *battrs, *backup_args)
        target = via(self.listen) if via else self.listen
        self.primary = vmm("ft", "primary", str(guest), "--boot", "flat", "--smp", str(smp),
                           "--backup", f"127.0.0.1:{target}", "--console", f"127.0.0.1:{self.console}",
                           "--arbiter", arb_p, "--linger", "5", "--heartbeat", heartbeat, *primary_args)

    def close(self) -> None:
        for p in (self.primary, self.backup):
            if p.poll() is None:
                p.kill()
            p.communicate()

    def run_unharmed(self, on_output) -> tuple[ConsoleClient, str, str]:
        """A console client to the end of a run without faults: (client, primary's stderr,
        backup's); both sides ended with status 0, the backup's replay as the primary ended."""
        try:
            c = ConsoleClient([("127.0.0.1", self.console)], on_output)
            assert c.run(timeout=120) == 0
            rc_p, err_p = finish(self.primary)
            rc_b, err_b = finish(self.backup)
        finally:
            self.close()
        assert rc_p == 0, err_p
        assert rc_b == 0, err_b
        assert "the primary finished; the replay ended the same way" in err_b
        return c, err_p, err_b


def typist(c: ConsoleClient) -> None:
    """Answer each "?" prompt with the next letter, once."""
    asked = c.transcript.count(b"?\n")
    while len(c.typed) < asked:
        c.type(bytes([ord("a") + len(c.typed) % 26]))


def reference(guest: Path, smp: int, typed: bytes, tmp: Path) -> bytes:
    """The transcript of a plain `vmm run` with the same input."""
    inp = tmp / "typed"
    inp.write_bytes(typed)
    out = tmp / "plain.serial"
    p = vmm("run", str(guest), "--boot", "flat", "--smp", str(smp), "--serial", str(out), "--input", str(inp))
    rc, err = finish(p)
    assert rc == 0, err
    return out.read_bytes()


@pytest.fixture(scope="module")
def ask_guest() -> Path:
    return ft_guest.build(lines=LINES, ask=ASK)


@pytest.fixture(scope="module")
def smp_guest() -> Path:
    return ft_guest.build(lines=600, smp=True)


def test_pair_without_faults_prints_what_a_plain_run_prints(ask_guest, tmp_path):
    pair = Pair(tmp_path, ask_guest)
    status: list[tuple[int, str]] = []

    def on_output(c: ConsoleClient) -> None:
        typist(c)
        if not status and len(c.transcript) > 2000:
            p = subprocess.run([sys.executable, "-c", "import sys; from tools.cli import main; sys.exit(main())",
                                "ft", "status", f"127.0.0.1:{pair.console}"], cwd=ROOT, capture_output=True,
                               env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False, timeout=60)
            status.append((p.returncode, p.stdout.decode()))

    c, _err_p, _err_b = pair.run_unharmed(on_output)
    want = ft_guest.expected(LINES, ASK, bytes(c.typed))
    assert bytes(c.transcript) == want
    assert want == reference(ask_guest, 1, bytes(c.typed), tmp_path)
    assert c.served_by == ["primary"]
    assert not (tmp_path / "arbiter.lock").exists()
    rc, shown_text = status[0]
    shown = dict(line.split(": ", 1) for line in shown_text.splitlines())
    assert rc == 0 and shown["role"] == "primary" and shown["state"] == "paired"
    assert int(shown["acked_horizon"]) > 0 and int(shown["log_bytes"]) > 0 and float(shown["lag_ms"]) >= 0
    # the last acknowledged point as an instruction count too: the guest's icount at that horizon
    assert 0 < int(shown["acked_icount"]) <= int(shown["icount"])
    assert int(shown["log_bytes_per_guest_s"]) > 0


def _kill_primary_run(guest: Path, tmp: Path, at: float, delay: float, smp: int, want_of,
                      primary_args: tuple[str, ...] = ()) -> None:
    pair = Pair(tmp, guest, smp=smp, primary_args=primary_args)
    killed = threading.Event()
    total = len(want_of(b"a" * 100))

    def on_output(c: ConsoleClient) -> None:
        typist(c)
        if not killed.is_set() and len(c.transcript) >= at * total:
            killed.set()
            threading.Timer(delay, pair.primary.send_signal, (signal.SIGKILL,)).start()

    try:
        c = ConsoleClient([("127.0.0.1", pair.console)], on_output)
        assert c.run(timeout=120, reconnect_for=30) == 0
        rc_b, err_b = finish(pair.backup)
        rc_p, _ = finish(pair.primary)
    finally:
        pair.close()
    assert rc_b == 0, err_b
    assert bytes(c.transcript) == want_of(bytes(c.typed))
    if rc_p == -signal.SIGKILL and "the primary finished" not in err_b:
        # the backup went live where the primary's log ended and served the rest at the same address
        assert "live from tick" in err_b, err_b
        assert c.served_by[0] == "primary" and c.served_by[-1] == "backup"
        assert '"role": "backup"' in (tmp / "arbiter.lock").read_text()


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(at=st.floats(0.0, 0.85), delay=st.floats(0.0, 0.3))
def test_kill_primary_the_consumer_sees_an_uninterrupted_run(ask_guest, tmp_path_factory, at, delay):
    tmp = tmp_path_factory.mktemp("kill")
    _kill_primary_run(ask_guest, tmp, at, delay, 1, lambda typed: ft_guest.expected(LINES, ASK, typed))


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(at=st.floats(0.0, 0.85), delay=st.floats(0.0, 0.3))
def test_kill_primary_with_two_vcpus(smp_guest, tmp_path_factory, at, delay):
    tmp = tmp_path_factory.mktemp("kill-smp")
    want = reference(smp_guest, 2, b"", tmp)
    assert len({line.split()[1] for line in want.splitlines()}) > 10   # the AP's counter moves
    _kill_primary_run(smp_guest, tmp, at, delay, 2, lambda typed: want)


def test_a_guest_shorter_than_a_horizon(tmp_path):
    """The whole run fits before the first horizon: the backup, which may not replay past the
    point it starts from before the log is known whole beyond it, waits for the END's horizon
    and ends as the primary did."""
    guest = ft_guest.build(lines=12, delay=500)
    c, _err_p, err_b = Pair(tmp_path, guest).run_unharmed(None)
    assert bytes(c.transcript) == ft_guest.expected(12, 0, b"")
    assert "at icount 7,385" in err_b


DISK_SECTORS = 32


def _disk(tmp: Path, seed: int = 3) -> tuple[Path, bytes]:
    """A raw disk image of 64 KiB with a pattern of its own (the guest writes its first sectors)."""
    data = bytes((i * 7 + seed) & 0xFF for i in range(64 << 10))
    path = tmp / f"disk-{seed}.img"
    path.write_bytes(data)
    return path, data


@pytest.fixture(scope="module")
def disk_guest() -> Path:
    return ft_guest.build(lines=LINES, ask=ASK, disk=DISK_SECTORS)


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(at=st.floats(0.0, 0.85), delay=st.floats(0.0, 0.3))
def test_kill_primary_with_a_disk_the_backup_holds_what_the_guest_wrote(disk_guest, tmp_path_factory, at, delay):
    """A guest that writes a sector of an IDE disk after every line and, at its end, reads
    them back and prints a hash of them: killing the primary, the backup's disk holds every
    write the primary's guest made before (its replay made them again) and the transcript,
    the hash included, is an uninterrupted run's; the image file is left as it was."""
    tmp = tmp_path_factory.mktemp("kill-disk")
    path, data = _disk(tmp)
    _kill_primary_run(disk_guest, tmp, at, delay, 1,
                      lambda typed: ft_guest.expected(LINES, ASK, typed, data, DISK_SECTORS),
                      primary_args=("-hda", str(path)))
    assert path.read_bytes() == data


def test_a_pair_with_a_disk_prints_what_a_plain_run_prints(disk_guest, tmp_path):
    path, data = _disk(tmp_path)
    c, _err_p, _err_b = Pair(tmp_path, disk_guest, primary_args=("-hda", str(path))).run_unharmed(typist)
    assert bytes(c.transcript) == ft_guest.expected(LINES, ASK, bytes(c.typed), data, DISK_SECTORS)
    assert path.read_bytes() == data


@pytest.mark.parametrize("case", ["differs", "missing", "unknown-name"])
def test_handshake_refuses_a_backup_without_the_same_disk(disk_guest, tmp_path, case):
    """The backup checks its copy of each of the primary's disks (size and SHA-256) before
    the first instruction: another content, no file, or a --drive-file for a drive the
    primary does not have is refused in one line, and neither side runs the guest."""
    path, _ = _disk(tmp_path)
    other, _ = _disk(tmp_path, seed=4)
    given = {"differs": f"ide0.0={other}", "missing": f"ide0.0={tmp_path / 'none.img'}",
             "unknown-name": f"virtio3={other}"}[case]
    port = free_port()
    backup = vmm("ft", "backup", "--listen", f"127.0.0.1:{port}", "--drive-file", given)
    primary = vmm("ft", "primary", str(disk_guest), "--boot", "flat", "--backup", f"127.0.0.1:{port}",
                  "-hda", str(path))
    rc_p, err_p = finish(primary)
    rc_b, err_b = finish(backup)
    assert rc_p == 10 and rc_b == 10, err_p + err_b
    line = [x for x in err_p.splitlines() if "error" in x]
    want = {"differs": "the disk ide0.0 differs", "missing": "this backup cannot open the disk ide0.0",
            "unknown-name": "--drive-file virtio3: the primary's machine has no drive of that name"}[case]
    assert len(line) == 1 and f"the backup refused: {want}" in line[0], err_p
    assert "Traceback" not in err_p + err_b
    assert "000001" not in err_p


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(at=st.floats(0.0, 0.85))
def test_kill_backup_the_primary_goes_on_alone(ask_guest, tmp_path_factory, at):
    tmp = tmp_path_factory.mktemp("kill-backup")
    pair = Pair(tmp, ask_guest)
    killed = threading.Event()
    total = len(ft_guest.expected(LINES, ASK, b"a" * 100))

    def on_output(c: ConsoleClient) -> None:
        typist(c)
        if not killed.is_set() and len(c.transcript) >= at * total:
            killed.set()
            pair.backup.send_signal(signal.SIGKILL)

    try:
        c = ConsoleClient([("127.0.0.1", pair.console)], on_output)
        assert c.run(timeout=120) == 0
        rc_p, err_p = finish(pair.primary)
    finally:
        pair.close()
    assert rc_p == 0, err_p
    assert bytes(c.transcript) == ft_guest.expected(LINES, ASK, bytes(c.typed))
    if "going on alone" in err_p:
        assert '"role": "primary"' in (tmp / "arbiter.lock").read_text()
    assert c.served_by == ["primary"]


class Proxy:
    """A TCP relay between the primary and the backup that can be cut: both
    connections stay open, and nothing gets through either way (a partition)."""

    def __init__(self):
        self.cut = threading.Event()
        self.hold_answers = threading.Event()   # the backup's messages wait (TCP holds them) while set
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(1)
        self.port = self.srv.getsockname()[1]

    def to(self, backend: int) -> int:
        threading.Thread(target=self._serve, args=(backend,), daemon=True).start()
        return self.port

    def _serve(self, backend: int) -> None:
        a, _ = self.srv.accept()
        end = time.monotonic() + 30
        while True:   # the backup may not listen yet
            try:
                b = socket.create_connection(("127.0.0.1", backend))
                break
            except OSError:
                if time.monotonic() > end:
                    a.close()
                    return
                time.sleep(0.05)
        for x, y in ((a, b), (b, a)):
            threading.Thread(target=self._pump, args=(x, y, x is b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool = False) -> None:
        while True:
            while answers and self.hold_answers.is_set():
                time.sleep(0.01)
            try:
                data = src.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            if not self.cut.is_set():
                try:
                    dst.sendall(data)
                except OSError:
                    return


class FileViews:
    """The arbiter as a lock file on shared storage; each side reaches it through its own
    mount (a symlink), which a test can take away and give back."""

    def __init__(self, tmp: Path):
        self.shared = tmp / "shared"
        self.shared.mkdir()
        self.views = {"primary": tmp / "view-p", "backup": tmp / "view-b"}
        for v in self.views.values():
            v.symlink_to(self.shared)

    def spec(self, side: str) -> str:
        return str(self.views[side] / "lock")

    def cut(self, side: str) -> None:
        self.views[side].unlink()

    def heal(self) -> None:
        for v in self.views.values():
            if not v.exists():
                v.symlink_to(self.shared)

    def holder(self) -> str:
        return (self.shared / "lock").read_text()

    def close(self) -> None:
        pass


class TcpViews:
    """The arbiter as a `vmm ft arbiter` process; each side reaches it through its own relay,
    which a test can cut (connections are closed unanswered) and heal."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.proc = vmm("ft", "arbiter", "--listen", f"127.0.0.1:{self.port}", "--state", str(tmp / "journal"))
        self.cut_sides: set[str] = set()
        self.relays = {}
        for side in ("primary", "backup"):
            srv = socket.socket()
            srv.bind(("127.0.0.1", 0))
            srv.listen(16)
            self.relays[side] = srv
            threading.Thread(target=self._accept, args=(side, srv), daemon=True).start()
        end = time.monotonic() + 30
        while Arbiter(self.spec("primary")).check_free() is not None and time.monotonic() < end:
            time.sleep(0.05)

    def _accept(self, side: str, srv: socket.socket) -> None:
        while True:
            try:
                a, _ = srv.accept()
            except OSError:
                return
            if side in self.cut_sides:
                a.close()
                continue
            try:
                b = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            except OSError:
                a.close()
                continue
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(4096):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def spec(self, side: str) -> str:
        return f"tcp:127.0.0.1:{self.relays[side].getsockname()[1]}/pair"

    def cut(self, side: str) -> None:
        self.cut_sides.add(side)

    def heal(self) -> None:
        self.cut_sides.clear()

    def holder(self) -> str:
        return Arbiter(f"tcp:127.0.0.1:{self.port}/pair").holder() or ""

    def close(self) -> None:
        for srv in self.relays.values():
            srv.close()
        self.proc.kill()
        self.proc.communicate()


@pytest.mark.parametrize("kind", ["file", "tcp"])
@pytest.mark.parametrize("reach", ["both", "backup-first", "primary-first"])
def test_partition_never_two_live_sides(ask_guest, tmp_path, reach, kind):
    """The link is cut while both sides live.  The arbiter (a lock file, or an arbiter process)
    is reachable by both, or first by one side only and then by both: exactly one side goes
    on, the other stops, the output never forks."""
    views = FileViews(tmp_path) if kind == "file" else TcpViews(tmp_path)
    proxy = Proxy()
    pair = Pair(tmp_path, ask_guest, arbiter=(views.spec("primary"), views.spec("backup")),
                backup_console=True, via=proxy.to)
    cut_done = threading.Event()
    total = len(ft_guest.expected(LINES, ASK, b"a" * 100))

    def on_output(c: ConsoleClient) -> None:
        typist(c)
        if not cut_done.is_set() and len(c.transcript) >= total // 3:
            cut_done.set()
            if reach == "backup-first":
                views.cut("primary")
            elif reach == "primary-first":
                views.cut("backup")
            proxy.cut.set()

    primary_view: list[bytes] = []
    watcher = ConsoleClient([("127.0.0.1", pair.backup_console)], None)
    try:
        c = ConsoleClient([("127.0.0.1", pair.console), ("127.0.0.1", pair.backup_console)], on_output)
        t = threading.Thread(target=lambda: primary_view.append(_follow_once(pair.console)), daemon=True)
        t.start()
        if reach != "both":
            def heal() -> None:
                cut_done.wait()
                time.sleep(1.0)   # one side alone can reach the arbiter for a second, then both
                views.heal()
            threading.Thread(target=heal, daemon=True).start()
        assert c.run(timeout=120, reconnect_for=30) == 0
        rc_p, err_p = finish(pair.primary)
        rc_b, err_b = finish(pair.backup)
        t.join(10)
        holder = views.holder()
    finally:
        pair.close()
        views.close()
        watcher.status = 0
    want = ft_guest.expected(LINES, ASK, bytes(c.typed))
    assert bytes(c.transcript) == want
    codes = sorted([rc_p, rc_b])
    assert codes == [0, 11], (rc_p, err_p, rc_b, err_b)       # one finished the guest, one was fenced
    if rc_p == 0:
        assert '"role": "primary"' in holder and "going on alone" in err_p
        assert "holds the arbiter" in err_b
    else:
        assert '"role": "backup"' in holder and "live from tick" in err_b
        assert "holds the arbiter" in err_p
    if reach == "both":
        assert rc_p == 0          # the backup still heard the primary on the second path: left it the lease
        assert "answers on the second path" in err_b, err_b
    if reach == "backup-first":
        assert rc_b == 0          # the primary could not reach the arbiter: it held its output
    if reach == "primary-first":
        assert rc_p == 0
    # what a client of the primary's own address saw is a prefix of the one true transcript
    assert primary_view and want.startswith(primary_view[0])


def _follow_once(port: int) -> bytes:
    """Read one console connection to its end (no reconnection): what that side released."""
    c = ConsoleClient([("127.0.0.1", port)], typist_passive)
    try:
        c.run(timeout=60, reconnect_for=0)
    except (TimeoutError, OSError):
        pass
    return bytes(c.transcript)


def typist_passive(c: ConsoleClient) -> None:
    pass


def test_handshake_refuses_another_image(ask_guest, tmp_path):
    other = tmp_path / "other.bin"
    data = bytearray(ask_guest.read_bytes())
    data[-1] ^= 0xFF
    other.write_bytes(bytes(data))
    port = free_port()
    backup = vmm("ft", "backup", "--listen", f"127.0.0.1:{port}", "--image", str(other))
    primary = vmm("ft", "primary", str(ask_guest), "--boot", "flat", "--backup", f"127.0.0.1:{port}")
    rc_p, err_p = finish(primary)
    rc_b, err_b = finish(backup)
    assert rc_p == 10 and rc_b == 10
    line = [x for x in err_p.splitlines() if "error" in x]
    assert len(line) == 1 and "the backup refused: the image differs" in line[0], err_p
    assert "Traceback" not in err_p + err_b


def test_a_held_arbiter_refuses_a_new_pair(ask_guest, tmp_path):
    lock = tmp_path / "lock"
    lock.write_text('{"role": "backup"}\n')
    p = vmm("ft", "primary", str(ask_guest), "--boot", "flat", "--backup", "127.0.0.1:1", "--arbiter", str(lock))
    rc, err = finish(p)
    assert rc == 10
    assert "already held" in err and "Traceback" not in err


def test_usage_errors_are_one_line(tmp_path):
    for args in (["ft", "primary", "hello", "--backup", "nohost"],
                 ["ft", "primary", "hello", "--backup", ":1", "--max-lag", "1us"],
                 ["ft", "backup", "--listen", "x:y"], ["ft", "backup"],
                 ["ft", "backup", "--listen", "1", "--join", "127.0.0.1:2"], ["ft", "backup", "--join", "h:x"],
                 ["ft", "primary", "hello", "--backup", "127.0.0.1:1", "-hda", str(tmp_path / "disk.img")]):
        rc, err = finish(vmm(*args))
        assert rc == 2, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def _netns_pair(tag: str):
    """Two network namespaces joined by a veth pair, as two hosts: (ns_p, ip_p, ns_b, ip_b), or None."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        return None
    ns_p, ns_b = f"ftp{tag}", f"ftb{tag}"
    cmds = [["ip", "netns", "add", ns_p], ["ip", "netns", "add", ns_b],
            ["ip", "link", "add", f"vp{tag}", "type", "veth", "peer", "name", f"vb{tag}"],
            ["ip", "link", "set", f"vp{tag}", "netns", ns_p], ["ip", "link", "set", f"vb{tag}", "netns", ns_b],
            ["ip", "-n", ns_p, "addr", "add", "10.231.0.1/24", "dev", f"vp{tag}"],
            ["ip", "-n", ns_b, "addr", "add", "10.231.0.2/24", "dev", f"vb{tag}"],
            ["ip", "-n", ns_p, "link", "set", f"vp{tag}", "up"], ["ip", "-n", ns_b, "link", "set", f"vb{tag}", "up"],
            ["ip", "-n", ns_p, "link", "set", "lo", "up"], ["ip", "-n", ns_b, "link", "set", "lo", "up"]]
    for c in cmds:
        if subprocess.run(c, check=False, capture_output=True).returncode != 0:
            _netns_drop(ns_p, ns_b)
            return None
    return ns_p, "10.231.0.1", ns_b, "10.231.0.2"


def _netns_drop(*names: str) -> None:
    for n in names:
        subprocess.run(["ip", "netns", "del", n], check=False, capture_output=True)


def test_across_network_namespaces_the_backup_takes_over(tmp_path):
    """The two processes on two "hosts" (network namespaces joined by a veth pair); the
    console client on the primary's host follows the output to the backup's address."""
    net = _netns_pair(str(os.getpid() % 10000))
    if net is None:
        pytest.skip("needs root and `ip netns` to build two network namespaces")
    ns_p, ip_p, ns_b, ip_b = net
    guest = ft_guest.build(lines=1500)
    want = reference(guest, 1, b"", tmp_path)
    arb = str(tmp_path / "lock")          # the filesystem is shared storage for both "hosts"
    out = tmp_path / "console.out"

    def in_ns(ns: str, *args: str, **kw) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                                 "import sys; from tools.cli import main; sys.exit(main())", *args],
                                cwd=ROOT, env=env, stderr=subprocess.PIPE, **kw)

    procs = []
    try:
        backup = in_ns(ns_b, "ft", "backup", "--listen", f"{ip_b}:7000", "--arbiter", arb,
                       "--console", f"{ip_b}:7001", "--linger", "5", stdout=subprocess.DEVNULL)
        primary = in_ns(ns_p, "ft", "primary", str(guest), "--boot", "flat", "--backup", f"{ip_b}:7000",
                        "--console", f"{ip_p}:7001", "--arbiter", arb, "--linger", "5",
                        stdout=subprocess.DEVNULL)
        with open(out, "wb") as f:
            client = in_ns(ns_p, "ft", "console", f"{ip_p}:7001", f"{ip_b}:7001", stdout=f,
                           stdin=subprocess.DEVNULL)
            procs = [backup, primary, client]
            end = time.monotonic() + 60
            while out.stat().st_size < len(want) // 3 and time.monotonic() < end:
                time.sleep(0.01)
            primary.send_signal(signal.SIGKILL)
            rc_c, err_c = finish(client, 120)
        rc_b, err_b = finish(backup)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        _netns_drop(ns_p, ns_b)
    assert rc_c == 0, err_c
    assert rc_b == 0, err_b
    assert "live from tick" in err_b, err_b
    assert out.read_bytes() == want


def test_max_lag_slows_the_primary_never_the_backup(tmp_path):
    """A backup that stops replaying (SIGSTOP, shorter than the heartbeat timeout): the primary
    runs at most --max-lag of virtual time ahead of it, then waits; it goes on once the backup does."""
    guest = ft_guest.build(lines=20000, delay=20000)
    listen, console = free_port(), free_port()
    backup = vmm("ft", "backup", "--listen", f"127.0.0.1:{listen}", "--heartbeat", "2s", "--linger", "1")
    primary = vmm("ft", "primary", str(guest), "--boot", "flat", "--backup", f"127.0.0.1:{listen}",
                  "--console", f"127.0.0.1:{console}", "--heartbeat", "2s", "--max-lag", "20ms",
                  "--linger", "1")

    def tick() -> int:
        end = time.monotonic() + 30
        while True:
            try:
                return int(query_status("127.0.0.1", console)["tick"])
            except (OSError, ValueError, KeyError):
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)

    try:
        start = tick()
        while tick() - start < 20_000_000:          # the pair runs: 0.2 s of virtual time
            time.sleep(0.05)
        backup.send_signal(signal.SIGSTOP)
        time.sleep(0.3)
        held = tick()
        time.sleep(1.0)
        still = tick()
        backup.send_signal(signal.SIGCONT)
        time.sleep(1.0)
        moved = tick()
    finally:
        backup.send_signal(signal.SIGCONT)
        for p in (primary, backup):
            p.kill()
            p.communicate()
    assert still - held <= 100_000, (held, still)   # waiting: at most one horizon further in a second
    assert moved - still > 5_000_000, (still, moved)  # the backup caught up, the primary went on


def _wait_status(port: int, want, timeout: float = 60.0) -> dict:
    """Poll `vmm ft status`'s answer on a console address until ``want(status)`` holds."""
    end = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < end:
        try:
            last = query_status("127.0.0.1", port)
            if want(last):
                return last
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"the status on port {port} never got there: {last}")


@pytest.mark.parametrize("joins, kill_after", [(1, 0.0), (1, 0.4), (2, 0.2)])
def test_a_joined_backup_restores_redundancy(ask_guest, tmp_path, joins, kill_after):
    """The backup dies, the primary goes on alone; `vmm ft backup --join` gets the running
    machine's state from it and follows it in lockstep (with joins=2 that one dies too and a
    third joins); then the primary dies, and the last joined backup takes over at the same
    console address: the consumer's transcript equals an uninterrupted run's, nothing lost,
    nothing repeated, and each pairing's lease went to the side that went on."""
    pair = Pair(tmp_path, ask_guest)
    lock = tmp_path / "arbiter.lock"
    # prompts answered only once a step is done: the guest waits (its virtual time goes on)
    gates = {2 + 3 * r: threading.Event() for r in range(joins + 1)}
    typing = threading.Lock()
    backups: list[subprocess.Popen] = [pair.backup]
    total = len(ft_guest.expected(LINES, ASK, b"a" * 100))
    kill_at: list[int | None] = [None]

    def answer(c: ConsoleClient) -> None:
        with typing:
            asked = c.transcript.count(b"?\n")
            while len(c.typed) < asked:
                gate = gates.get(len(c.typed) + 1)
                if gate is not None and not gate.is_set():
                    return
                c.type(bytes([ord("a") + len(c.typed) % 26]))
            if kill_at[0] is not None and len(c.transcript) >= kill_at[0] and pair.primary.poll() is None:
                kill_at[0] = None
                pair.primary.send_signal(signal.SIGKILL)

    def steps(c: ConsoleClient) -> None:
        _wait_status(pair.console, lambda s: s.get("state") == "paired" and int(s.get("acked_horizon", 0)) > 0)
        for r in range(joins):
            while c.transcript.count(b"?\n") < 2 + 3 * r:
                time.sleep(0.02)
            backups[-1].send_signal(signal.SIGKILL)
            _wait_status(pair.console, lambda s: s.get("state") == "alone")
            gates[2 + 3 * r].set()
            answer(c)
            backups.append(vmm("ft", "backup", "--join", f"127.0.0.1:{pair.console}", "--arbiter", str(lock),
                               "--linger", "5", "--heartbeat", "100ms"))
            st = _wait_status(pair.console, lambda s, r=r: s.get("state") == "paired" and s.get("joins") == r + 1
                              and int(s.get("acked_horizon", 0)) > 0)
            assert st["lease_generation"] == r + 1
        # the pair runs in lockstep again: kill the primary at a point of the output still to come
        kill_at[0] = len(c.transcript) + int(kill_after * (total - len(c.transcript)))
        gates[2 + 3 * joins].set()
        answer(c)

    c = ConsoleClient([("127.0.0.1", pair.console)], answer)
    t = threading.Thread(target=steps, args=(c,), daemon=True)
    t.start()
    try:
        assert c.run(timeout=180, reconnect_for=30) == 0
        t.join(5)
        rc_j, err_j = finish(backups[-1])
        rc_p, err_p = finish(pair.primary)
    finally:
        if sys.exc_info()[0] is not None:      # what each side said, for the failure report
            for p in (*backups, pair.primary):
                if p.poll() is None:
                    p.kill()
                print(p.args[4:6], p.communicate()[1].decode(errors="replace"))
        pair.close()
        for p in backups:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert bytes(c.transcript) == ft_guest.expected(LINES, ASK, bytes(c.typed))
    assert rc_p == -signal.SIGKILL, err_p
    assert "a backup joins" in err_p and f"lockstep again (lease generation {joins})" in err_p, err_p
    assert rc_j == 0, err_j
    assert "joined the primary" in err_j and "live from tick" in err_j, err_j
    assert c.served_by[0] == "primary" and c.served_by[-1] == "backup"
    leases = [lock] + [Path(f"{lock}.{g}") for g in range(1, joins + 1)]
    assert all('"role": "primary"' in x.read_text() for x in leases[:-1])   # the primary went on alone
    assert '"role": "backup"' in leases[-1].read_text()                      # the last backup took over


def test_join_is_refused_by_a_primary_that_has_a_backup(ask_guest, tmp_path):
    """Only a primary that runs alone takes a joining backup; the refused one says why in one line."""
    pair = Pair(tmp_path, ask_guest)
    try:
        _wait_status(pair.console, lambda s: s.get("state") == "paired")
        rc, err = finish(vmm("ft", "backup", "--join", f"127.0.0.1:{pair.console}", "--arbiter",
                             str(tmp_path / "arbiter.lock")))
        st = query_status("127.0.0.1", pair.console)
    finally:
        pair.close()
    assert rc == 10, err
    lines = [x for x in err.splitlines() if "error" in x]
    assert lines == ["vmm ft backup: error: the primary refused: this primary has a backup"], err
    assert st["state"] == "paired" and st["joins"] == 0


class FramePeer:
    """The far end of a NIC's stream backend (QEMU's framing: a 4-byte big-endian length,
    then the frame): collects the line numbers the FT guest's frames carry, in arrival order."""

    def __init__(self):
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(2)
        self.port = self.srv.getsockname()[1]
        self.numbers: list[int] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            buf = bytearray()
            while True:
                try:
                    data = conn.recv(1 << 16)
                except OSError:
                    break
                if not data:
                    break
                buf += data
                while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                    n = int.from_bytes(buf[:4], "big")
                    frame = bytes(buf[4:4 + n])
                    del buf[:4 + n]
                    if frame[12:14] == b"\x88\xb5":
                        self.numbers.append(int.from_bytes(frame[14:18], "little"))
            conn.close()

    def close(self) -> None:
        self.srv.close()


def test_frames_leave_the_primary_only_once_the_backup_holds_their_log(tmp_path):
    """A NIC on a stream backend whose peer is a test socket.  While the backup's answers are
    held up on their way (a relay between the two; the log still reaches the backup), the
    primary goes on producing lines and frames, and no frame reaches the peer; once the
    acknowledgements come through, they all arrive, each once, in order."""
    lines = 1500
    guest = ft_guest.build(lines=lines, net=True)
    peer = FramePeer()
    proxy = Proxy()
    listen, console = free_port(), free_port()
    nic = f"model=e1000,net=stream:127.0.0.1:{peer.port}"
    backup = vmm("ft", "backup", "--listen", f"127.0.0.1:{listen}", "--heartbeat", "2s", "--linger", "1")
    primary = vmm("ft", "primary", str(guest), "--boot", "flat", "--backup", f"127.0.0.1:{proxy.to(listen)}",
                  "--console", f"127.0.0.1:{console}", "--heartbeat", "2s", "--max-lag", "2s",
                  "--linger", "1", "--nic", nic)
    try:
        c = ConsoleClient([("127.0.0.1", console)], None)
        t = threading.Thread(target=c.run, kwargs={"timeout": 120}, daemon=True)
        t.start()
        end = time.monotonic() + 60
        while len(peer.numbers) < 50 and time.monotonic() < end:
            time.sleep(0.02)
        proxy.hold_answers.set()
        time.sleep(0.3)                    # what was acknowledged before arrives
        before = len(peer.numbers)
        time.sleep(1.0)
        during = len(peer.numbers)
        produced = query_status("127.0.0.1", console)["output_bytes"] // 7    # "NNNNNN\n" per line
        proxy.hold_answers.clear()
        t.join(120)
        rc_p, err_p = finish(primary)
        rc_b, err_b = finish(backup)
    finally:
        proxy.hold_answers.clear()
        for p in (primary, backup):
            if p.poll() is None:
                p.kill()
                p.communicate()
        peer.close()
    assert rc_p == 0 and rc_b == 0, (err_p, err_b)
    assert c.status == 0 and bytes(c.transcript) == ft_guest.expected(lines, 0, b"")
    assert during == before, (before, during)          # nothing left the primary without its acknowledgement
    assert produced > during + 100, (produced, during)  # though the guest had sent many more
    assert peer.numbers == list(range(1, lines + 1))


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(at=st.floats(0.1, 0.8))
def test_kill_primary_the_frames_go_on_from_the_backup(tmp_path_factory, at):
    """The primary and its backup both name the peer (--nic ...,net=stream:HOST:PORT); the
    primary is killed; the backup goes live, connects its card to the peer and sends again
    the frames the primary may not have sent.  The peer sees every frame, in order, none
    missing: a frame is repeated only across the failover (as Ethernet allows; the console,
    with its positions, is exactly-once)."""
    tmp = tmp_path_factory.mktemp("kill-net")
    lines = 1500
    guest = ft_guest.build(lines=lines, net=True)
    peer = FramePeer()
    nic = f"model=e1000,net=stream:127.0.0.1:{peer.port}"
    listen, console = free_port(), free_port()
    lock = str(tmp / "lock")
    backup = vmm("ft", "backup", "--listen", f"127.0.0.1:{listen}", "--arbiter", lock, "--heartbeat", "100ms",
                 "--linger", "3", "--nic", nic)
    primary = vmm("ft", "primary", str(guest), "--boot", "flat", "--backup", f"127.0.0.1:{listen}",
                  "--console", f"127.0.0.1:{console}", "--arbiter", lock, "--heartbeat", "100ms",
                  "--linger", "3", "--nic", nic)
    total = len(ft_guest.expected(lines, 0, b""))

    def on_output(c: ConsoleClient) -> None:
        if len(c.transcript) >= at * total and primary.poll() is None:
            primary.send_signal(signal.SIGKILL)

    try:
        c = ConsoleClient([("127.0.0.1", console)], on_output)
        assert c.run(timeout=120, reconnect_for=30) == 0
        rc_b, err_b = finish(backup)
        rc_p, _ = finish(primary)
        end = time.monotonic() + 10
        while len(set(peer.numbers)) < lines and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        for p in (primary, backup):
            if p.poll() is None:
                p.kill()
                p.communicate()
        peer.close()
    assert rc_b == 0, err_b
    assert bytes(c.transcript) == ft_guest.expected(lines, 0, b"")
    nums = peer.numbers
    if rc_p == -signal.SIGKILL and "the primary finished" not in err_b:
        assert "live from tick" in err_b and "network cards live" in err_b, err_b
        # one rewind at most, at the failover: 1..k from the primary, then j..N from the backup, j <= k + 1
        cut = next((i for i in range(1, len(nums)) if nums[i] <= nums[i - 1]), len(nums))
        first, second = nums[:cut], nums[cut:]
        assert first == list(range(1, len(first) + 1)), first[-20:]
        if second:
            assert second == list(range(second[0], lines + 1)) and second[0] <= len(first) + 1, (len(first), second[:5])
        else:
            assert first == list(range(1, lines + 1))
    else:
        assert nums == list(range(1, lines + 1))


def test_arbiter_process_gives_each_lease_to_exactly_one_contender(tmp_path):
    """Many sides ask for one lease at once: one wins, every other loses and is told who
    holds it; the winner asking again (its answer lost) wins again; a restarted arbiter
    with its journal still knows the holder; an arbiter nobody answers at is unreachable."""
    from replay.ft.arbiter import LOST, UNREACHABLE, WON, ArbiterServer

    journal = str(tmp_path / "journal")
    srv = ArbiterServer("127.0.0.1", 0, state=journal)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    spec = f"tcp:127.0.0.1:{srv.address[1]}/pair"
    sides = [Arbiter(spec) for _ in range(24)]
    results: list[tuple[int, str, str]] = []
    go = threading.Barrier(len(sides))

    def contend(i: int) -> None:
        go.wait()
        results.append((i, *sides[i].try_acquire(f"side{i}")))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(sides))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    won = [i for i, outcome, _ in results if outcome == WON]
    assert len(results) == len(sides) and len(won) == 1
    assert all(outcome == LOST and f'"role": "side{won[0]}"' in detail for i, outcome, detail in results if i != won[0])
    assert sides[won[0]].try_acquire(f"side{won[0]}")[0] == WON          # idempotent for its holder
    assert Arbiter(spec, generation=1).try_acquire("x")[0] == WON        # the next pairing's lease is another
    assert "already held" in Arbiter(spec).check_free()
    srv.close()
    again = ArbiterServer("127.0.0.1", 0, state=journal)
    try:
        assert f'"role": "side{won[0]}"' in again.answer("GET pair")
        assert again.answer("TAS pair {\"role\": \"late\"}").startswith("LOST ")
        assert again.answer("nonsense").startswith("ERR ")
    finally:
        again.close()
    assert Arbiter(f"tcp:127.0.0.1:{free_port()}").try_acquire("backup")[0] == UNREACHABLE


def test_arbiter_usage_errors_are_one_line(tmp_path):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    try:
        for args in (["ft", "arbiter", "--listen", f"127.0.0.1:{held.getsockname()[1]}"],
                     ["ft", "arbiter", "--listen", "x:y"],
                     ["ft", "primary", "hello", "--backup", "127.0.0.1:1", "--arbiter", "tcp:nohost"],
                     ["ft", "backup", "--listen", "1", "--arbiter", "tcp:h:1/bad name"]):
            rc, err = finish(vmm(*args))
            assert rc == 2, (args, err)
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    finally:
        held.close()
