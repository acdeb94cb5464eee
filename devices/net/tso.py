"""TCP segmentation offload for IPv4: one large TCP packet cut into wire-sized ones.

A driver that negotiated segmentation (virtio-net's VIRTIO_NET_F_HOST_TSO4) hands
the device one Ethernet frame carrying an IPv4 TCP packet of up to 64 KiB and the
segment size (``gso_size``, the MSS); the device sends what a NIC with TSO puts on
the wire, as the Linux stack would have sent it without offload:

* every segment carries the Ethernet header, the IPv4 header (options included)
  and the TCP header (options included) of the large packet, then the next
  ``mss`` bytes of its payload (the last segment the rest);
* IPv4 total length per segment, the identification incremented per segment
  (as Linux's own GSO and NICs do), the header checksum recomputed;
* TCP sequence number advanced by the payload before the segment; FIN and PSH
  only on the last segment, CWR only on the first; the checksum computed in full
  over the pseudo-header (addresses, protocol, TCP length), header and payload:
  whatever partial sum the driver left in the field is not used.

The headers are parsed from the frame itself (IHL, data offset), not taken from
the driver's ``hdr_len``.  A packet that is not IPv4/TCP, whose headers run past
its end or past its IPv4 total length, or whose ``mss`` would cut it into more
than MAX_SEGMENTS segments is refused (None): the device drops it, so a hostile
header costs bounded work.
"""
from __future__ import annotations

import struct

from devices.net import ETH_HEADER, fold, ones_sum

MAX_SEGMENTS = 1024
ETHERTYPE_IPV4 = 0x0800
PROTO_TCP = 6
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def segment_tcp4(frame: bytes, mss: int) -> list[bytes] | None:
    """The segments of ``frame`` (see the module docstring), or None if it cannot be cut."""
    if mss <= 0 or len(frame) < ETH_HEADER + 20 or _U16.unpack_from(frame, 12)[0] != ETHERTYPE_IPV4:
        return None
    ip = ETH_HEADER
    vihl = frame[ip]
    ihl = (vihl & 0xF) * 4
    if vihl >> 4 != 4 or ihl < 20 or frame[ip + 9] != PROTO_TCP:
        return None
    tcp = ip + ihl
    if len(frame) < tcp + 20:
        return None
    thl = (frame[tcp + 12] >> 4) * 4
    end = ip + _U16.unpack_from(frame, ip + 2)[0]     # the IPv4 total length (Ethernet padding after it)
    data = tcp + thl
    if thl < 20 or data > end or end > len(frame):
        return None
    payload = memoryview(frame)[data:end]
    count = max(1, -(-len(payload) // mss))
    if count > MAX_SEGMENTS:
        return None
    head = bytearray(frame[:data])
    ident = _U16.unpack_from(head, ip + 4)[0]
    seq = _U32.unpack_from(head, tcp + 4)[0]
    flags = head[tcp + 13]
    # the pseudo-header's constant part: source and destination address, protocol
    pseudo = ones_sum(bytes(head[ip + 12:ip + 20])) + PROTO_TCP
    out = []
    for i in range(count):
        chunk = payload[i * mss:(i + 1) * mss]
        seg = bytearray(head)
        _U16.pack_into(seg, ip + 2, ihl + thl + len(chunk))
        _U16.pack_into(seg, ip + 4, (ident + i) & 0xFFFF)
        _U16.pack_into(seg, ip + 10, 0)
        _U16.pack_into(seg, ip + 10, ~ones_sum(bytes(seg[ip:tcp])) & 0xFFFF)
        _U32.pack_into(seg, tcp + 4, (seq + i * mss) & 0xFFFF_FFFF)
        f = flags
        if i < count - 1:
            f &= ~(TCP_FIN | TCP_PSH)
        if i > 0:
            f &= ~TCP_CWR
        seg[tcp + 13] = f
        _U16.pack_into(seg, tcp + 16, 0)
        seg += chunk
        s = fold(pseudo + thl + len(chunk) + ones_sum(bytes(seg[tcp:])))
        _U16.pack_into(seg, tcp + 16, ~s & 0xFFFF)
        out.append(bytes(seg))
    return out
