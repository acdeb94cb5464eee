"""Debian's Linux across two `vmm` processes (issue 13): each `vmm record` has a virtio-net card
on a stream backend (--nic ...,net=stream:HOST:PORT, one with server=on), as two QEMUs with
-netdev stream would; the guests ping each other and one sends the other a file with busybox
nc, and each log then replays with `vmm replay` alone, no network present.

Packages come from tools/debian.py; without them the tests skip and say why.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from tests.realguests import _available, debian_kernel, debian_modules  # noqa: F401  (fixtures)
from tests.test_linux_net import CMDLINE, COMMON, LIMIT, MD5, MODULES, PAYLOAD
from tools import debian

# The two processes start at different times and keep their own virtual clocks, so each side
# tries until the other is up (each try is short) instead of assuming when that is.
PING = """for i in $(seq 1 40); do ping -c 1 -W 1 {peer} >/dev/null && break; done
ping -c 3 -W 3 {peer}; echo PING-RC=$?
"""
SERVER = COMMON.format(ip="10.0.2.15") + """(nc -l -p 1234 < /payload; echo SEND-DONE) &
""" + PING.format(peer="10.0.2.16") + """wait
echo A-DONE
poweroff -f
"""
CLIENT = COMMON.format(ip="10.0.2.16") + PING.format(peer="10.0.2.15") + """for i in $(seq 1 20); do
  nc 10.0.2.15 1234 > /tmp/recv && [ -s /tmp/recv ] && break; sleep 1; done; echo NC-RC=$?
md5sum /tmp/recv
sleep 3
echo B-DONE
poweroff -f
"""


def test_two_vmm_processes_over_a_stream_recorded_and_replayed(debian_kernel, debian_modules,  # noqa: F811
                                                                tmp_path):
    """Two `vmm record` processes joined by --nic ...,net=stream:HOST:PORT (one with server=on),
    as two QEMUs with -netdev stream would be; each log then replays with `vmm replay` alone."""
    import os
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    port = free_port()
    procs = {}
    for name, script, mac, extra, server in (("a", SERVER, "52:54:00:12:34:56", {"payload": PAYLOAD}, True),
                                             ("b", CLIENT, "52:54:00:12:34:57", None, False)):
        initrd = _available(debian.initramfs, debian.INIT_HEADER + debian.LOAD_MODULES + script, MODULES["virtio"],
                            extra or {})
        nic = f"model=virtio,net=stream:127.0.0.1:{port},mac={mac}" + (",server=on" if server else "")
        cmd = [sys.executable, "-m", "tools.cli", "record", "--kernel", str(debian_kernel), "--initrd", str(initrd),
               "--mem", "256M", "--append", CMDLINE, "--serial", str(tmp_path / f"{name}.txt"),
               "--max-instructions", str(LIMIT), "--nic", nic, "-o", str(tmp_path / f"{name}.vmlog")]
        procs[name] = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       stdin=subprocess.DEVNULL)
        if server:                      # the listener is bound once the guest prints its first line
            for _ in range(600):
                if (tmp_path / "a.txt").exists() and (tmp_path / "a.txt").stat().st_size:
                    break
                assert procs["a"].poll() is None, procs["a"].communicate()[1]
                time.sleep(0.1)
    errs = {k: p.communicate(timeout=1200)[1].decode(errors="replace") for k, p in procs.items()}
    out = {k: (tmp_path / f"{k}.txt").read_text(errors="replace") for k in procs}
    assert all(p.returncode == 0 for p in procs.values()), (errs, out["a"][-2000:], out["b"][-2000:])
    assert "PING-RC=0" in out["a"] and "PING-RC=0" in out["b"], (out["a"][-2000:], out["b"][-2000:])
    assert f"{MD5}  /tmp/recv" in out["b"], out["b"][-2000:]
    for k in procs:
        r = subprocess.run([sys.executable, "-m", "tools.cli", "replay", str(tmp_path / f"{k}.vmlog"), "--serial",
                            str(tmp_path / f"{k}.replay.txt")], cwd=root, env=env, capture_output=True, timeout=1200,
                           check=False)
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
        assert (tmp_path / f"{k}.replay.txt").read_bytes() == (tmp_path / f"{k}.txt").read_bytes()


def free_port() -> int:
    """A TCP port nobody listens on now (bound and released)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
