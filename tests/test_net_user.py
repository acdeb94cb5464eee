"""User-mode networking (host/net/user.py, libslirp) as a wire, with frames built by dpkt: the
DHCP server leases 10.0.2.15 with QEMU's router and DNS addresses, 10.0.2.2 answers ARP, 10.0.2.3
answers DNS from the host's resolver (where the host resolves), a
guest's TCP connection to 10.0.2.2 becomes a connection to the host's loopback, a forwarded
host port becomes a SYN to the guest's port; and on the command line, a bad hostfwd rule, a
forwarded port in use and a host without libslirp are each one line and exit status 2.

Without libslirp (Debian's libslirp0) the tests that need it skip and say why."""
from __future__ import annotations

import socket
import time

import dpkt
import pytest

from host.net import NetBackendError
from host.net import user as usernet
from host.net.user import Hostfwd, UserNet, parse_hostfwd
from tools import cli

GUEST_MAC = bytes.fromhex("525400123456")
BCAST = b"\xff" * 6
GUEST_IP, HOST_IP = socket.inet_aton("10.0.2.15"), socket.inet_aton("10.0.2.2")


def main(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


@pytest.fixture
def slirp():
    try:
        usernet.version()
    except NetBackendError as e:
        pytest.skip(str(e))
    made = []

    def make(*rules: str) -> tuple[UserNet, list[bytes]]:
        u = UserNet([parse_hostfwd(r) for r in rules])
        got: list[bytes] = []

        class Sink:
            def deliver(self, f: bytes) -> None:
                got.append(f)
        u.connect(Sink())
        made.append(u)
        return u, got
    yield make
    for u in made:
        u.close()


def eth(payload: dpkt.Packet, dst: bytes = BCAST, kind: int = dpkt.ethernet.ETH_TYPE_IP) -> bytes:
    return bytes(dpkt.ethernet.Ethernet(dst=dst, src=GUEST_MAC, type=kind, data=payload))


def dhcp_discover(xid: int = 0x1234) -> bytes:
    d = dpkt.dhcp.DHCP(op=dpkt.dhcp.DHCP_OP_REQUEST, xid=xid, chaddr=GUEST_MAC,
                       opts=[(dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes([dpkt.dhcp.DHCPDISCOVER]))])
    u = dpkt.udp.UDP(sport=68, dport=67, data=bytes(d))
    u.ulen = len(u)
    ip = dpkt.ip.IP(src=b"\0\0\0\0", dst=b"\xff\xff\xff\xff", p=dpkt.ip.IP_PROTO_UDP, data=u, ttl=64)
    return eth(ip)


def arp_request(target: bytes) -> bytes:
    a = dpkt.arp.ARP(op=dpkt.arp.ARP_OP_REQUEST, sha=GUEST_MAC, spa=GUEST_IP, tha=b"\0" * 6, tpa=target)
    return eth(a, kind=dpkt.ethernet.ETH_TYPE_ARP)


def ip_frames(got: list[bytes]) -> list[dpkt.ip.IP]:
    return [e.data for e in map(dpkt.ethernet.Ethernet, got) if isinstance(e.data, dpkt.ip.IP)]


def poll_until(u: UserNet, cond, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        u.poll()
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_dhcp_offers_qemus_addresses(slirp):
    u, got = slirp()
    u.send(dhcp_discover())
    offers = [dpkt.dhcp.DHCP(ip.data.data) for ip in ip_frames(got)
              if isinstance(ip.data, dpkt.udp.UDP) and ip.data.sport == 67]
    assert offers, got
    d = offers[0]
    opts = dict(d.opts)
    assert d.xid == 0x1234 and d.yiaddr == int.from_bytes(GUEST_IP, "big")
    assert opts[dpkt.dhcp.DHCP_OPT_MSGTYPE] == bytes([dpkt.dhcp.DHCPOFFER])
    assert opts[dpkt.dhcp.DHCP_OPT_ROUTER] == HOST_IP
    assert opts[dpkt.dhcp.DHCP_OPT_DNS_SVRS] == socket.inet_aton("10.0.2.3")
    assert opts[dpkt.dhcp.DHCP_OPT_NETMASK] == socket.inet_aton("255.255.255.0")


def test_the_host_answers_arp(slirp):
    u, got = slirp()
    u.send(arp_request(HOST_IP))
    replies = [e.data for e in map(dpkt.ethernet.Ethernet, got) if isinstance(e.data, dpkt.arp.ARP)]
    assert replies and replies[0].op == dpkt.arp.ARP_OP_REPLY and replies[0].spa == HOST_IP
    assert replies[0].tha == GUEST_MAC and dpkt.ethernet.Ethernet(got[0]).dst == GUEST_MAC


def test_a_guest_connection_to_10_0_2_2_reaches_the_hosts_loopback(slirp):
    u, got = slirp()
    u.send(arp_request(HOST_IP))
    host_mac = dpkt.ethernet.Ethernet(got[0]).src
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        syn = dpkt.tcp.TCP(sport=40000, dport=port, seq=1000, flags=dpkt.tcp.TH_SYN, win=65535)
        ip = dpkt.ip.IP(src=GUEST_IP, dst=HOST_IP, p=dpkt.ip.IP_PROTO_TCP, data=syn, ttl=64)
        ip.len = len(ip)
        u.send(eth(ip, dst=host_mac))
        accepted = []

        def synack_and_accepted() -> bool:
            try:
                accepted.append(listener.accept()[0])
            except BlockingIOError:
                pass
            return bool(accepted) and any(isinstance(i.data, dpkt.tcp.TCP) and i.data.flags & dpkt.tcp.TH_SYN
                                          and i.data.flags & dpkt.tcp.TH_ACK for i in ip_frames(got))
        assert poll_until(u, synack_and_accepted), got
        sa = next(i for i in ip_frames(got) if isinstance(i.data, dpkt.tcp.TCP))
        assert sa.src == HOST_IP and sa.dst == GUEST_IP and sa.data.sport == port and sa.data.dport == 40000
        assert sa.data.ack == 1001
        assert accepted[0].getpeername()[0] == "127.0.0.1"
        accepted[0].close()
    finally:
        listener.close()


def test_a_forwarded_host_port_becomes_a_syn_to_the_guest(slirp):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    u, got = slirp(f"tcp:127.0.0.1:{port}-:80")
    u.send(arp_request(HOST_IP))            # slirp learns the guest's MAC from its ARP request
    got.clear()
    c = socket.socket()
    c.setblocking(False)
    assert c.connect_ex(("127.0.0.1", port)) in (0, 115)        # EINPROGRESS
    try:
        assert poll_until(u, lambda: any(isinstance(i.data, dpkt.tcp.TCP) for i in ip_frames(got))), got
        syn = next(i for i in ip_frames(got) if isinstance(i.data, dpkt.tcp.TCP))
        assert syn.dst == GUEST_IP and syn.data.dport == 80 and syn.data.flags == dpkt.tcp.TH_SYN
        assert dpkt.ethernet.Ethernet(got[-1]).dst == GUEST_MAC
    finally:
        c.close()


def test_parse_hostfwd_in_qemus_manner():
    assert parse_hostfwd("tcp::8080-:80") == Hostfwd("tcp", "", 8080, "", 80)
    assert parse_hostfwd("::2222-10.0.2.15:22") == Hostfwd("tcp", "", 2222, "10.0.2.15", 22)
    assert parse_hostfwd("udp:127.0.0.1:5353-:53") == Hostfwd("udp", "127.0.0.1", 5353, "", 53)
    for bad in ("tcp::8080", "sctp::1-:2", "tcp::0-:80", "tcp::80-:70000", "tcp:localhost:80-:80",
                "tcp::80-192.168.1.5:80", "tcp::80-:80-:81"):
        with pytest.raises(ValueError):
            parse_hostfwd(bad)


@pytest.mark.parametrize("rule, words", [
    ("tcp::8080", "is not [tcp|udp]"),
    ("tcp::99999-:80", "port must be 1-65535"),
    ("tcp:myhost:8080-:80", "not an IPv4 address"),
    ("tcp::8080-10.0.3.1:80", "outside the user network"),
])
def test_a_bad_hostfwd_is_one_line_and_exit_2(rule, words, capsys):
    assert main(["run", "hello", "--serial", "none", "--nic", f"model=e1000,net=user,hostfwd={rule}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and words in err and "Traceback" not in err, err


def test_a_forwarded_port_in_use_is_one_line_and_exit_2(slirp, capsys):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    port = held.getsockname()[1]
    try:
        assert main(["run", "hello", "--serial", "none", "--nic",
                     f"model=virtio,net=user,hostfwd=tcp:127.0.0.1:{port}-:80"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "in use" in err and str(port) in err and "Traceback" not in err, err
    finally:
        held.close()


def test_no_libslirp_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(usernet, "LIBRARY", "libslirp-that-is-not-here.so.0")
    usernet._library.cache_clear()
    try:
        assert main(["run", "hello", "--serial", "none", "--nic", "net=user"]) == 2
    finally:
        usernet._library.cache_clear()
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "libslirp" in err and "Traceback" not in err, err


def test_a_recording_on_user_networking_replays_without_it(slirp, tmp_path, capsys):
    log = tmp_path / "run.vmlog"
    assert main(["record", "hello", "-o", str(log), "--serial", "none", "--max-instructions", "300000",
                 "--nic", "model=e1000,net=user"]) == 0
    capsys.readouterr()
    assert main(["replay", str(log), "--serial", "none"]) == 0


def test_dns_at_10_0_2_3_is_answered_by_the_hosts_resolver(slirp):
    name = "deb.debian.org"
    try:
        socket.getaddrinfo(name, 80, socket.AF_INET)
    except OSError as e:
        pytest.skip(f"this host cannot resolve {name} itself: {e}")
    u, got = slirp()
    u.send(arp_request(HOST_IP))
    host_mac = dpkt.ethernet.Ethernet(got[0]).src
    q = dpkt.dns.DNS(id=0x4242, qd=[dpkt.dns.DNS.Q(name=name, type=dpkt.dns.DNS_A)])
    udp = dpkt.udp.UDP(sport=33333, dport=53, data=bytes(q))
    udp.ulen = len(udp)
    ip = dpkt.ip.IP(src=GUEST_IP, dst=socket.inet_aton("10.0.2.3"), p=dpkt.ip.IP_PROTO_UDP, data=udp, ttl=64)
    ip.len = len(ip)
    u.send(eth(ip, dst=host_mac))

    def answers() -> list:
        return [dpkt.dns.DNS(i.data.data) for i in ip_frames(got)
                if isinstance(i.data, dpkt.udp.UDP) and i.data.sport == 53 and i.data.dport == 33333]
    assert poll_until(u, answers, 10.0), "no DNS answer through 10.0.2.3"
    a = answers()[0]
    assert a.id == 0x4242 and a.qr == dpkt.dns.DNS_R and a.rcode == dpkt.dns.DNS_RCODE_NOERR
    assert any(rr.type == dpkt.dns.DNS_A for rr in a.an), a.an


def test_libslirps_timer_runs_on_host_time_and_sends_router_advertisements(slirp, monkeypatch):
    """The IPv6 router advertisement timer (libslirp arms it for minutes ahead): nothing until
    the host clock passes its deadline, then an RA to all nodes and the timer armed again."""
    u, got = slirp()
    armed = [t[0] for t in u._timers.values() if t[0] is not None]
    assert len(armed) == 1
    u.poll()
    assert not got
    monkeypatch.setattr(usernet, "_host_ns", lambda: (armed[0] + 1) * 1_000_000)   # the deadline (ms) passed
    u.poll()
    ra = [e for e in map(dpkt.ethernet.Ethernet, got) if isinstance(e.data, dpkt.ip6.IP6)
          and isinstance(e.data.data, dpkt.icmp6.ICMP6) and e.data.data.type == 134]
    assert ra and ra[0].dst == bytes.fromhex("333300000001"), got
    again = [t[0] for t in u._timers.values() if t[0] is not None]
    assert len(again) == 1 and again[0] > armed[0]
