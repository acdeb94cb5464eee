"""Debian's Linux on user-mode networking (issue 13): `vmm record --nic model=...,net=user,hostfwd=...`.

The guest (Debian's kernel, its e1000 or virtio-net modules, a busybox initramfs) asks
libslirp's DHCP server for an address with busybox udhcpc and gets 10.0.2.15 with 10.0.2.2 as
its router and 10.0.2.3 as its DNS server; it fetches a page with busybox wget from a Python
HTTP server this test runs on the host's loopback (10.0.2.2 from the guest); then it serves a
page with busybox httpd, which the test fetches from the host through a forwarded port
(hostfwd=tcp:127.0.0.1:HOSTPORT-:80), and waits for the test's goodbye on a second forwarded
port.  The card's pcap holds that traffic as dpkt reads it.  The log then replays with `vmm
replay` in a process where libslirp cannot even be imported: every frame came from the log,
and the serial output is the same byte for byte.

Packages come from tools/debian.py; without them the tests skip and say why; without
libslirp (Debian's libslirp0) they skip too.
"""
from __future__ import annotations

import hashlib
import http.server
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import dpkt
import pytest

from host.net import NetBackendError
from tests.realguests import _available, debian_kernel, debian_modules  # noqa: F401  (fixtures)
from tests.test_linux_net import CMDLINE, LIMIT, MODULES
from tests.test_linux_net_stream import free_port
from tools import debian

ROOT = Path(__file__).resolve().parents[1]
PAGE = random.Random(1313).randbytes(150_000)          # the host's page, fetched by the guest
GUEST_PAGE = random.Random(1314).randbytes(120_000)    # the guest's page, fetched by the host
HOST_TIMEOUT = 900                                     # host seconds for the whole guest run

UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    echo "LEASE ip=$ip router=$router dns=$dns" ;;
esac
"""

SCRIPT = """ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -s /udhcpc.sh -n -q -t 10 -T 2; echo UDHCPC-RC=$?
ip -4 addr show dev eth0 | grep inet
ip route | grep default
cat /etc/resolv.conf
P=$(sed -n 's/.*hostport=\\([0-9]*\\).*/\\1/p' /proc/cmdline)
wget -q -O /tmp/page http://10.0.2.2:$P/page.bin; echo WGET-RC=$?
md5sum /tmp/page
httpd -p 80 -h /www; echo HTTPD-RC=$?
echo ack > /tmp/ack
nc -l -p 7777 < /tmp/ack > /tmp/bye; echo BYE=$(cat /tmp/bye)
poweroff -f
"""


def _slirp_or_skip() -> None:
    from host.net.user import version

    try:
        version()
    except NetBackendError as e:
        pytest.skip(str(e))


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/page.bin":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args) -> None:
        pass


def _host_side(web: int, bye: int, result: dict, stop: threading.Event) -> None:
    """Fetch the guest's page through the forwarded port, then say goodbye on the other one;
    each is tried again until the guest answers (it starts listening when it gets there)."""
    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web}/index.html", timeout=10) as r:
                result["page"] = r.read()
                break
        except OSError:
            time.sleep(0.5)
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", bye), timeout=10) as s:
                s.sendall(b"bye-from-host\n")
                s.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := s.recv(4096):
                    got += chunk
            if b"ack" in got:
                result["ack"] = got
                return
        except OSError:
            pass
        time.sleep(0.5)


@pytest.mark.parametrize("model", ["e1000", "virtio"])
def test_guest_on_user_networking_dhcp_fetch_hostfwd_pcap_replay(model, debian_kernel, debian_modules,  # noqa: F811
                                                                  tmp_path):
    _slirp_or_skip()
    initrd = _available(debian.initramfs, debian.INIT_HEADER + debian.LOAD_MODULES + SCRIPT, MODULES[model],
                        {"udhcpc.sh": UDHCPC_SCRIPT, "www/index.html": GUEST_PAGE})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    web, bye = free_port(), free_port()
    result: dict = {}
    stop = threading.Event()
    host = threading.Thread(target=_host_side, args=(web, bye, result, stop), daemon=True)
    host.start()
    log, pcap, serial = tmp_path / "run.vmlog", tmp_path / "eth0.pcap", tmp_path / "serial.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    nic = f"model={model},net=user,hostfwd=tcp:127.0.0.1:{web}-:80,hostfwd=tcp:127.0.0.1:{bye}-:7777,pcap={pcap}"
    try:
        r = subprocess.run([sys.executable, "-m", "tools.cli", "record", "--kernel", str(debian_kernel),
                            "--initrd", str(initrd), "--mem", "256M",
                            "--append", f"{CMDLINE} hostport={server.server_address[1]}",
                            "--serial", str(serial), "--max-instructions", str(LIMIT), "--nic", nic, "-o", str(log)],
                           cwd=ROOT, env=env, capture_output=True, timeout=HOST_TIMEOUT, check=False)
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
    out = serial.read_text(errors="replace") if serial.exists() else ""
    assert r.returncode == 0, (r.stderr.decode(errors="replace")[-3000:], out[-3000:])

    # DHCP: libslirp's server leased the first address, with its router and DNS server
    assert "UDHCPC-RC=0" in out and "LEASE ip=10.0.2.15 router=10.0.2.2 dns=10.0.2.3" in out, out[-3000:]
    assert "inet 10.0.2.15/24" in out and "default via 10.0.2.2" in out and "nameserver 10.0.2.3" in out
    # the guest reached the host's HTTP server through NAT, and got the page whole
    assert "WGET-RC=0" in out and f"{hashlib.md5(PAGE).hexdigest()}  /tmp/page" in out, out[-3000:]
    # the host reached the guest's httpd and nc through the forwarded ports
    assert result.get("page") == GUEST_PAGE, len(result.get("page", b""))
    assert b"ack" in result.get("ack", b"") and "BYE=bye-from-host" in out, out[-2000:]

    # the capture, as dpkt reads it: the DHCP lease, the guest's connection to the host's server,
    # the forwarded connections into the guest's port 80
    with open(pcap, "rb") as f:
        frames = [dpkt.ethernet.Ethernet(buf) for _, buf in dpkt.pcap.Reader(f)]
    ips = [e.data for e in frames if isinstance(e.data, dpkt.ip.IP)]
    acks = [dpkt.dhcp.DHCP(ip.data.data) for ip in ips if isinstance(ip.data, dpkt.udp.UDP) and ip.data.sport == 67]
    assert any(d.yiaddr == 0x0A00020F and (dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes([dpkt.dhcp.DHCPACK])) in d.opts
               for d in acks), acks
    tcp = [ip for ip in ips if isinstance(ip.data, dpkt.tcp.TCP)]
    assert any(ip.src == socket.inet_aton("10.0.2.15") and ip.dst == socket.inet_aton("10.0.2.2")
               and ip.data.dport == server.server_address[1] and ip.data.flags & dpkt.tcp.TH_SYN for ip in tcp)
    assert any(ip.dst == socket.inet_aton("10.0.2.15") and ip.data.dport == 80
               and ip.data.flags & dpkt.tcp.TH_SYN for ip in tcp)
    assert sum(len(ip.data.data) for ip in tcp if ip.src == socket.inet_aton("10.0.2.15")
               and ip.data.sport == 80) >= len(GUEST_PAGE)

    # the replay: libslirp cannot be imported, no port is open, and the guest does it all again
    code = ("import sys; sys.modules['host.net.user'] = None; from tools.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    rp = subprocess.run([sys.executable, "-c", code, "replay", str(log), "--serial", str(tmp_path / "replay.txt")],
                        cwd=ROOT, env=env, capture_output=True, timeout=HOST_TIMEOUT, check=False)
    assert rp.returncode == 0, rp.stderr.decode(errors="replace")[-3000:]
    assert b"every digest matched" in rp.stderr           # net:net0, the frames the card sent, among them
    assert (tmp_path / "replay.txt").read_bytes() == serial.read_bytes()
