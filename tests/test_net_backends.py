"""The networks outside a machine (host/net/): the learning switch, stream links framed as
QEMU's -netdev stream, pcap capture read back by dpkt and tshark, and a TAP device inside a
network namespace the test creates, answered by the host kernel's own ARP and ICMP."""
from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dpkt
import pytest

from host.net import NetBackendError
from host.net.pcap import PcapWriter
from host.net.stream import MAX_STREAM_FRAME, StreamLink
from host.net.switch import Switch

A, B, C = (bytes.fromhex(f"5254000000{i:02x}") for i in (1, 2, 3))
BCAST = b"\xff" * 6


def frame(dst: bytes, src: bytes, n: int = 46, fill: int = 0) -> bytes:
    return dst + src + b"\x88\xb5" + bytes([fill]) * n


class Sink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def deliver(self, f: bytes) -> None:
        self.frames.append(f)


def switch_with(n: int, **kw):
    sw = Switch(**kw)
    ports, sinks = [], []
    for _ in range(n):
        p, s = sw.port(), Sink()
        p.connect(s)
        ports.append(p)
        sinks.append(s)
    return sw, ports, sinks


# -- the switch -------------------------------------------------------------------------------

def test_switch_floods_unknown_then_forwards_learned():
    sw, (p0, p1, _p2), (s0, s1, s2) = switch_with(3)
    f = frame(B, A)
    p0.send(f)                                      # B unknown: flooded to every other port
    assert s1.frames == [f] and s2.frames == [f] and s0.frames == []
    g = frame(A, B, fill=1)
    p1.send(g)                                      # A was learned at port 0: only there
    assert s0.frames == [g] and s2.frames == [f]
    h = frame(B, A, fill=2)
    p0.send(h)                                      # and B at port 1 now
    assert s1.frames == [f, h] and s2.frames == [f]
    p0.send(frame(BCAST, A, fill=3))                # broadcast: everywhere else
    assert len(s1.frames) == 3 and len(s2.frames) == 2
    p0.send(frame(A, C))                            # for the port it came in on: filtered
    assert sw.filtered == 1 and len(s0.frames) == 1


def test_switch_relearns_a_moved_station_and_bounds_its_table():
    sw, (p0, p1, p2), (s0, s1, _s2) = switch_with(3, max_macs=2)
    p0.send(frame(BCAST, A))
    p1.send(frame(BCAST, A))                        # A moved to port 1
    p2.send(frame(A, C))
    assert s1.frames[-1] == frame(A, C) and s0.frames == [frame(BCAST, A)]
    p2.send(frame(BCAST, B))                        # a third address: the oldest (A) is forgotten
    assert sw.evictions == 1 and sw.lookup(A) is None and len(sw.table) == 2


def test_switch_drops_runts_and_giants_and_ignores_group_sources():
    sw, (p0, _p1), (_, s1) = switch_with(2)
    p0.send(b"\x01" * 13)
    p0.send(bytes(70000))
    assert sw.runts == 1 and sw.giants == 1 and s1.frames == []
    p0.send(frame(B, BCAST))                        # a group source address is never learned
    assert sw.lookup(BCAST) is None


def test_switch_reentry_is_queued_not_recursive():
    sw = Switch()
    p0, p1 = sw.port(), sw.port()
    got = []

    class Echo:
        def __init__(self, port):
            self.port = port

        def deliver(self, f):
            got.append(f)
            if len(got) < 3000:
                self.port.send(f[6:12] + f[:6] + f[12:])   # answers at once, from inside the switch

    p0.connect(Echo(p0))
    p1.connect(Echo(p1))
    p0.send(frame(B, A))
    assert len(got) == 3000 and sys.getrecursionlimit() < 3000 * 3


# -- stream links --------------------------------------------------------------------------

def pump(*links, until=lambda: False, seconds: float = 5.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not until():
        for link in links:
            link.poll()
        time.sleep(0.001)


def test_stream_frames_have_a_four_byte_big_endian_length():
    srv = StreamLink.listen("127.0.0.1", 0)
    raw = socket.create_connection(srv.address)
    sink = Sink()
    srv.connect(sink)
    pump(srv, until=lambda: srv.connected)
    f1, f2 = frame(A, B, 100), frame(B, A, 1400)
    raw.sendall(struct.pack(">I", len(f1)) + f1 + struct.pack(">I", len(f2)) + f2[:700])
    pump(srv, until=lambda: len(sink.frames) == 1)
    raw.sendall(f2[700:])                           # a frame split across reads
    pump(srv, until=lambda: len(sink.frames) == 2)
    assert sink.frames == [f1, f2]
    srv.send(f1)
    raw.settimeout(5)
    data = b""
    while len(data) < 4 + len(f1):
        data += raw.recv(4096)
    assert data == struct.pack(">I", len(f1)) + f1
    raw.close()
    srv.close()


def test_stream_between_two_links_and_a_switch():
    srv = StreamLink.listen("127.0.0.1", 0)
    cli = StreamLink.connect_to(*srv.address)
    sw, (p0,), (s0,) = switch_with(1)
    up = sw.plug(srv)
    far = Sink()
    cli.connect(far)
    for i in range(50):
        cli.send(frame(A, B, 60, i))
    pump(srv, cli, until=lambda: len(s0.frames) == 50)
    assert s0.frames == [frame(A, B, 60, i) for i in range(50)] and up.frames_in == 50
    p0.send(frame(B, A))                            # B was learned behind the stream port
    pump(srv, cli, until=lambda: len(far.frames) == 1)
    assert far.frames == [frame(B, A)]
    srv.close()
    cli.close()


def test_stream_length_beyond_the_limit_ends_the_connection():
    srv = StreamLink.listen("127.0.0.1", 0)
    raw = socket.create_connection(srv.address)
    srv.connect(Sink())
    pump(srv, until=lambda: srv.connected)
    raw.sendall(struct.pack(">I", MAX_STREAM_FRAME + 1) + bytes(16))
    pump(srv, until=lambda: srv.protocol_errors == 1)
    assert srv.protocol_errors == 1 and not srv.connected
    raw.close()
    srv.close()


def test_stream_port_in_use_and_refused_connection_are_one_line():
    srv = StreamLink.listen("127.0.0.1", 0)
    host, port = srv.address
    with pytest.raises(NetBackendError) as e:
        StreamLink.listen(host, port)
    assert "in use" in str(e.value) and "\n" not in str(e.value)
    srv.close()
    with pytest.raises(NetBackendError) as e:
        StreamLink.connect_to(host, port, timeout=2)
    assert "cannot connect" in str(e.value) and "\n" not in str(e.value)


# -- pcap ----------------------------------------------------------------------------------------

def test_pcap_is_read_by_dpkt_and_tshark(tmp_path: Path):
    path = tmp_path / "cap.pcap"
    udp = dpkt.udp.UDP(sport=7, dport=7, data=b"echo")
    ip = dpkt.ip.IP(src=bytes([10, 0, 0, 1]), dst=bytes([10, 0, 0, 2]), p=17, data=udp)
    pkt = bytes(dpkt.ethernet.Ethernet(dst=B, src=A, type=0x0800, data=ip))
    with PcapWriter(path, epoch=1_767_225_600) as w:
        w.write(pkt, 1_500_000_123)
        w.write(frame(BCAST, A), 2_000_000_000)
    with open(path, "rb") as f:
        r = dpkt.pcap.Reader(f)
        assert r.datalink() == dpkt.pcap.DLT_EN10MB
        got = list(r)
    assert [bytes(b) for _, b in got] == [pkt, frame(BCAST, A)]
    assert abs(float(got[0][0]) - (1_767_225_600 + 1.500000123)) < 1e-6
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark is not installed (apt-get install tshark)")
    out = subprocess.run([tshark, "-r", str(path), "-T", "fields", "-e", "frame.time_epoch", "-e", "udp.dstport",
                          "-e", "eth.src"], capture_output=True, text=True, timeout=120, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[0].split("\t")[1:] == ["7", "52:54:00:00:00:01"]
    assert lines[0].split("\t")[0].startswith("1767225601.500000123")


# -- TAP in a network namespace ----------------------------------------------------------------

TAP_CHILD = textwrap.dedent("""
    import struct, subprocess, sys, time
    sys.path.insert(0, sys.argv[1])
    from host.net.tap import TapLink
    t = TapLink("vmmtap0")
    subprocess.run(["ip", "addr", "add", "10.9.0.1/24", "dev", "vmmtap0"], check=True)
    subprocess.run(["ip", "link", "set", "vmmtap0", "up"], check=True)
    got = []
    class R:
        def deliver(self, f): got.append(f)
    t.connect(R())
    mac = bytes.fromhex("525400aabbcc")
    arp = (b"\\xff" * 6 + mac + b"\\x08\\x06" + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1) + mac
           + bytes([10, 9, 0, 2]) + bytes(6) + bytes([10, 9, 0, 1]))
    t.send(arp)
    for _ in range(500):
        t.poll()
        if any(f[12:14] == b"\\x08\\x06" and f[20:22] == b"\\x00\\x02" for f in got):
            break
        time.sleep(0.01)
    reply = [f for f in got if f[12:14] == b"\\x08\\x06" and f[20:22] == b"\\x00\\x02"]
    print(reply[0].hex() if reply else "none")
""")


def test_tap_in_a_network_namespace_answers_arp():
    if not Path("/dev/net/tun").exists():
        pytest.skip("no /dev/net/tun (no tun/tap driver here)")
    unshare = shutil.which("unshare")
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
    if unshare is None or ip is None:
        pytest.skip("unshare and ip (util-linux, iproute2) are needed for a network namespace")
    for flags in (["-n"], ["-Urn"]):
        if subprocess.run([unshare, *flags, "true"], capture_output=True, check=False).returncode == 0:
            break
    else:
        pytest.skip("cannot create a network namespace here (needs root or unprivileged user namespaces)")
    root = str(Path(__file__).resolve().parent.parent)
    r = subprocess.run([unshare, *flags, sys.executable, "-c", TAP_CHILD, root], capture_output=True, text=True,
                       timeout=60, check=False, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    if r.returncode != 0 and "TAP needs root or CAP_NET_ADMIN" in r.stderr:
        pytest.skip("no CAP_NET_ADMIN for a TAP device here")
    assert r.returncode == 0, r.stderr
    reply = bytes.fromhex(r.stdout.strip())
    # an ARP reply from the kernel: to our MAC, "10.9.0.1 is at <the TAP's MAC>"
    assert reply[:6] == bytes.fromhex("525400aabbcc") and reply[28:32] == bytes([10, 9, 0, 1])
    assert reply[38:42] == bytes([10, 9, 0, 2])


def test_tap_errors_are_one_line():
    from host.net.tap import TapLink

    with pytest.raises(NetBackendError) as e:
        TapLink("x" * 20)
    assert "interface name" in str(e.value) and "\n" not in str(e.value)
