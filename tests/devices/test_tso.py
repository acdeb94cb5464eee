"""devices/net/tso.py: one large IPv4 TCP packet cut as a NIC with TSO cuts it.

Every segment must be a packet dpkt parses with correct IPv4 and TCP checksums (checked
independently of the code under test), at most MSS bytes of payload, sequence numbers that
continue one another, FIN/PSH only on the last and CWR only on the first, and the payloads
together must be the original payload.  Hostile input (not TCP, headers past the end, a
tiny MSS) is refused, never raises.
"""
from __future__ import annotations

import struct

import dpkt
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.net.tso import MAX_SEGMENTS, segment_tcp4

SRC, DST = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2])


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def big_packet(payload: bytes, flags: int, seq: int, ident: int, tcp_opts: bytes = b"", ip_opts: bytes = b"") -> bytes:
    tcp = dpkt.tcp.TCP(sport=40000, dport=1234, seq=seq, ack=7, flags=flags, win=502, opts=tcp_opts, data=payload)
    tcp.off = (20 + len(tcp_opts)) // 4
    ip = dpkt.ip.IP(src=SRC, dst=DST, p=6, id=ident, opts=ip_opts, data=tcp)
    ip.df = 1
    ip.hl = (20 + len(ip_opts)) // 4
    ip.len = 20 + len(ip_opts) + len(bytes(tcp))
    ip.sum = 0
    raw_ip = bytearray(bytes(ip))
    # what a driver leaves: a checksum field that is not the packet's (here: garbage)
    tcp_at = 20 + len(ip_opts)
    raw_ip[tcp_at + 16:tcp_at + 18] = b"\xde\xad"
    eth = b"\x52\x54\x00\x12\x35\x02" + b"\x52\x54\x00\x12\x34\x56" + b"\x08\x00"
    return eth + bytes(raw_ip)


def check_segment(seg: bytes) -> dpkt.tcp.TCP:
    ip_raw = seg[14:]
    ihl = (ip_raw[0] & 0xF) * 4
    assert csum(ip_raw[:ihl]) == 0xFFFF, "IPv4 header checksum"
    total = struct.unpack_from("!H", ip_raw, 2)[0]
    assert total == len(ip_raw)
    tcp_raw = ip_raw[ihl:total]
    pseudo = ip_raw[12:20] + bytes((0, 6)) + len(tcp_raw).to_bytes(2, "big")
    assert csum(pseudo + tcp_raw) == 0xFFFF, "TCP checksum"
    ip = dpkt.ip.IP(ip_raw)
    return ip.data


@settings(max_examples=150, deadline=None)
@given(size=st.integers(0, 65535 - 40 - 40 - 40), mss=st.integers(64, 9000), flags=st.integers(0, 0xFF),
       seq=st.integers(0, 0xFFFF_FFFF), ident=st.integers(0, 0xFFFF),
       tcp_opts=st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)]), ip_opts=st.sampled_from([b"", b"\x01" * 4]))
def test_segments_are_what_the_stack_would_have_sent(size, mss, flags, seq, ident, tcp_opts, ip_opts):
    payload = bytes((i * 7 + 3) & 0xFF for i in range(size))
    frame = big_packet(payload, flags, seq, ident, tcp_opts, ip_opts)
    segs = segment_tcp4(frame, mss)
    assert segs is not None
    assert len(segs) == max(1, -(-size // mss))
    got = b""
    for i, seg in enumerate(segs):
        assert seg[:14] == frame[:14]
        tcp = check_segment(seg)
        ip = dpkt.ip.IP(seg[14:])
        assert ip.id == (ident + i) & 0xFFFF and ip.df == 1 and bytes(ip.opts) == ip_opts
        assert len(tcp.data) <= mss
        assert tcp.seq == (seq + len(got)) & 0xFFFF_FFFF
        assert bytes(tcp.opts) == tcp_opts and tcp.ack == 7 and tcp.win == 502
        last, first = i == len(segs) - 1, i == 0
        want = flags
        if not last:
            want &= ~(dpkt.tcp.TH_FIN | dpkt.tcp.TH_PUSH)
        if not first:
            want &= ~dpkt.tcp.TH_CWR
        assert tcp.flags == want
        got += tcp.data
    assert got == payload


def test_ethernet_padding_after_the_ip_packet_is_not_payload():
    frame = big_packet(b"abc", dpkt.tcp.TH_ACK, 1, 1) + bytes(20)
    segs = segment_tcp4(frame, 1448)
    assert len(segs) == 1 and check_segment(segs[0]).data == b"abc"


@settings(max_examples=300, deadline=None)
@given(frame=st.binary(max_size=300), mss=st.integers(-5, 3000))
def test_hostile_packets_are_refused_or_cut_never_raise(frame, mss):
    segs = segment_tcp4(frame, mss)
    assert segs is None or (1 <= len(segs) <= MAX_SEGMENTS and all(len(s) <= len(frame) + 60 for s in segs))


def test_refusals():
    good = big_packet(b"x" * 3000, dpkt.tcp.TH_ACK, 0, 0)
    assert segment_tcp4(good, 1448) is not None
    assert segment_tcp4(good, 0) is None                               # no MSS
    assert segment_tcp4(good, 2) is None                               # more than MAX_SEGMENTS segments
    udp = bytearray(good)
    udp[14 + 9] = 17
    assert segment_tcp4(bytes(udp), 1448) is None                      # not TCP
    v6 = bytearray(good)
    v6[12:14] = b"\x86\xdd"
    assert segment_tcp4(bytes(v6), 1448) is None                       # not IPv4
    long = bytearray(good)
    struct.pack_into("!H", long, 16, 60000)
    assert segment_tcp4(bytes(long), 1448) is None                     # total length past the frame
    assert segment_tcp4(good[:40], 1448) is None                       # TCP header cut off
