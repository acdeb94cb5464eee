"""Network devices and the frame path into a machine.

* ``e1000``: the Intel 82540EM gigabit controller (PCI 8086:100E, QEMU's
  default ``e1000``), a ``PciFunction`` with its register and I/O BARs.
* ``port``: the receive side of a machine's NICs at the determinism boundary
  (``NetInput``, one per machine), a NIC's connection to its wire
  (``NicPort``), and ``attach_e1000``, which puts an e1000 on a machine's PCI
  bus.

Wires.  A NIC is given a *wire*: an object with ``send(frame)``, which takes
an Ethernet frame (destination address first, no preamble, no FCS) out of the
NIC, and ``connect(receiver)``, which names the object whose
``deliver(frame)`` the wire calls with each frame coming the other way.  A
wire may also have ``poll()``: a chance, on the machine's own schedule, to
pull frames that wait outside the process (a socket, a TAP device).  Switch
ports, stream sockets and TAP devices (host/net/) are wires; so is a NIC's
``NicPort`` seen from the machine's side.

Frames are ``bytes``; nothing here trusts their length or contents.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

ETH_HEADER = 14          # destination, source, EtherType
ETH_ZLEN = 60            # the shortest frame on the wire, without its FCS
ETH_FCS = 4
MAX_FRAME = 65536        # the longest frame anything here carries (QEMU's net layer carries up to 64 KiB + 4 KiB)
BROADCAST = b"\xff" * 6


class FrameReceiver(Protocol):
    def deliver(self, frame: bytes) -> None: ...


@runtime_checkable
class Wire(Protocol):
    """One end of a link: ``send`` frames into it, ``connect`` the receiver of what comes out."""

    def send(self, frame: bytes) -> None: ...

    def connect(self, receiver: FrameReceiver | None) -> None: ...


def parse_mac(text: str | bytes) -> bytes:
    """Six bytes from "52:54:00:12:34:56" (or "-" separated, or 6 raw bytes); ValueError otherwise."""
    if isinstance(text, (bytes, bytearray)):
        if len(text) != 6:
            raise ValueError(f"a MAC address is 6 bytes, not {len(text)}")
        return bytes(text)
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"bad MAC address {text!r} (expected six hex bytes, e.g. 52:54:00:12:34:56)")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"bad MAC address {text!r} (expected six hex bytes, e.g. 52:54:00:12:34:56)") from None


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def is_multicast(mac: bytes) -> bool:
    """Group address (I/G bit set): broadcast included."""
    return bool(mac[0] & 1)


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit one's complement sum (RFC 1071) of ``data`` as big-endian words (odd: zero padded)."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    n = int.from_bytes(data, "big")
    s = n % 0xFFFF                    # 2**16 = 1 (mod 0xFFFF): the sum with end-around carry
    return 0xFFFF if s == 0 and n else s


def fold(s: int) -> int:
    """A sum of 16-bit sums folded to 16 bits with end-around carry."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def l4_checksum_ok(frame: bytes) -> bool:
    """True when ``frame`` is an untagged, unfragmented IPv4 TCP or UDP packet whose IP header
    and TCP/UDP checksums (pseudo-header included) are correct; False for anything else."""
    if len(frame) < ETH_HEADER + 20 or frame[12:14] != b"\x08\x00":
        return False
    ip = ETH_HEADER
    ihl = (frame[ip] & 0x0F) * 4
    total = int.from_bytes(frame[ip + 2:ip + 4], "big")
    if frame[ip] >> 4 != 4 or ihl < 20 or total < ihl or ip + total > len(frame):
        return False
    if ones_sum(frame[ip:ip + ihl]) != 0xFFFF:
        return False
    proto = frame[ip + 9]
    if proto not in (6, 17) or int.from_bytes(frame[ip + 6:ip + 8], "big") & 0x3FFF:
        return False
    l4 = frame[ip + ihl:ip + total]
    if len(l4) < (20 if proto == 6 else 8):
        return False
    if proto == 17 and l4[6:8] == b"\0\0":
        return True                      # UDP without a checksum
    pseudo = frame[ip + 12:ip + 20] + bytes((0, proto)) + len(l4).to_bytes(2, "big")
    return fold(ones_sum(pseudo) + ones_sum(l4)) == 0xFFFF
