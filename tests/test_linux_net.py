"""Debian's Linux on the network (issue 13): two guests in one process, each with an e1000 or
a virtio-net card (the modules from Debian's kernel package, in a busybox initramfs), on one
in-process switch.  They set addresses, ping each other, and one sends a file to the other
with busybox nc, which arrives with the same checksum; a pcap of one card shows tshark the
ICMP exchange.  Both are recorded together (replay/group.py), and each log then replays on
its own with no network at all, every digest (the cards' frame digests included) matching.

Packages come from tools/debian.py; without them the tests skip and say why.
"""
from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
from pathlib import Path

import dpkt
import pytest

from replay.group import GroupRecording
from replay.session import Replayer, machine_config
from tests.realguests import _available, debian_kernel, debian_modules  # noqa: F401  (fixtures)
from tools import debian
from vmm.machine import StopReason
from vmm.platform.net import connect_backend, describe_nics
from vmm.platform.pc import DEFAULT_EPOCH

CMDLINE = "console=ttyS0 panic=-1"
LIMIT = 30_000_000_000
MODULES = {"e1000": ["e1000"], "virtio": ["virtio_pci", "virtio_net"]}
PAYLOAD = random.Random(13).randbytes(300_000)
MD5 = hashlib.md5(PAYLOAD).hexdigest()

COMMON = """ip link set lo up
ip link set eth0 up
ip addr add {ip}/24 dev eth0
echo NIC-UP $(cat /sys/class/net/eth0/address)
"""
SERVER = COMMON.format(ip="10.0.2.15") + """(nc -l -p 1234 < /payload; echo SEND-DONE) &
sleep 2
ping -c 3 -W 5 10.0.2.16; echo PING-RC=$?
wait
echo A-DONE
poweroff -f
"""
CLIENT = COMMON.format(ip="10.0.2.16") + """sleep 2
ping -c 3 -W 5 10.0.2.15; echo PING-RC=$?
sleep 1
nc 10.0.2.15 1234 > /tmp/recv; echo NC-RC=$?
md5sum /tmp/recv
echo B-DONE
poweroff -f
"""


def guest_config(kernel: Path, script: str, model: str, mac: str, extra: dict | None = None) -> tuple[dict, bytes]:
    initrd = _available(debian.initramfs, debian.INIT_HEADER + debian.LOAD_MODULES + script, MODULES[model],
                        extra or {})
    data = kernel.read_bytes()
    cfg = machine_config(256 << 20, DEFAULT_EPOCH, str(kernel), data, "linux", CMDLINE, 0x100000, "none",
                         initrd=(str(initrd), initrd.read_bytes()))
    cfg["nics"] = describe_nics([{"model": model, "mac": mac}])
    return cfg, data


@pytest.mark.parametrize("model", ["e1000", "virtio"])
def test_two_guests_ping_and_copy_a_file_recorded_and_replayed(model, debian_kernel, debian_modules,  # noqa: F811
                                                                tmp_path):
    # Both models in one process record and replay (a second pair once did not: registers
    # differed during boot at the same icount every time; not reproducible since b7138b6, where
    # e1000, virtio, virtio pairs in one process each replayed, the two virtio pairs with equal logs).
    two_guests(model, debian_kernel, tmp_path)


def two_guests(model: str, kernel: Path, tmp_path: Path) -> None:
    """The two-guest scenario."""
    switch = f"test-{model}"
    group = GroupRecording()
    machines = {}
    for name, script, mac, extra in (("a", SERVER, "52:54:00:12:34:56", {"payload": PAYLOAD}),
                                     ("b", CLIENT, "52:54:00:12:34:57", None)):
        cfg, data = guest_config(kernel, script, model, mac, extra)
        m = group.add(name, cfg, data, tmp_path / f"{name}.vmlog")
        connect_backend(m, "net0", f"switch:{switch}", pcap=str(tmp_path / f"{name}.pcap") if name == "a" else None,
                        epoch=DEFAULT_EPOCH)
        machines[name] = m
    results = group.run(LIMIT)
    machines["a"].net_input.ports["net0"].capture.close()
    out = {k: bytes(m.serial_out).decode(errors="replace") for k, m in machines.items()}
    for k in "ab":
        assert results[k].reason is StopReason.POWEROFF, (k, results[k], out[k][-3000:])
    assert "PING-RC=0" in out["a"] and "A-DONE" in out["a"], out["a"][-3000:]
    assert "PING-RC=0" in out["b"] and "NC-RC=0" in out["b"], out["b"][-3000:]
    assert f"{MD5}  /tmp/recv" in out["b"], out["b"][-3000:]

    # the capture: dpkt reads every frame; tshark shows the echo requests and replies both ways
    with open(tmp_path / "a.pcap", "rb") as f:
        frames = [(ts, dpkt.ethernet.Ethernet(buf)) for ts, buf in dpkt.pcap.Reader(f)]
    icmp = [e.data.data for _, e in frames if isinstance(e.data, dpkt.ip.IP) and e.data.p == 1]
    assert sum(1 for i in icmp if i.type == 8) >= 6 and sum(1 for i in icmp if i.type == 0) >= 6
    assert all(ts >= DEFAULT_EPOCH for ts, _ in frames)
    tshark = shutil.which("tshark")
    if tshark:
        r = subprocess.run([tshark, "-r", str(tmp_path / "a.pcap"), "-Y", "icmp"], capture_output=True, text=True,
                           timeout=120, check=False)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("Echo (ping) request") >= 6 and r.stdout.count("Echo (ping) reply") >= 6, r.stdout

    # each log replays alone: no switch, no other machine; the digests (net:net0 among the
    # outputs) prove the same frames went out
    for k in "ab":
        rp = Replayer(str(tmp_path / f"{k}.vmlog"))
        assert rp.m.net_input.ports["net0"].wire is None
        res = rp.run()
        assert res.reason is results[k].reason and res.icount == results[k].icount
        assert bytes(rp.m.serial_out) == bytes(machines[k].serial_out)
        sent = rp.m.outputs["net:net0"]
        assert sent.frames > 0 and sent.digest() == machines[k].outputs["net:net0"].digest()
        rp.m.close()
    for m in machines.values():
        m.close()
