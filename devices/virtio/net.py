"""virtio-net: an Ethernet NIC on a virtio transport.

Implements OASIS VIRTIO 1.2, 5.1 "Network Device" (device id 1) with one
receive queue (0) and one transmit queue (1), 256 entries each:

* features offered: MAC (the address in the configuration space), STATUS
  (link status, always up), MRG_RXBUF (mergeable receive buffers), CSUM
  (the device completes partial checksums of transmitted packets) and
  GUEST_CSUM (the device tells the driver which received packets it
  verified).  No control queue, segmentation offload or multiqueue: the
  driver then cannot change receive filters, and the device receives every
  frame, as QEMU's does after reset (promiscuous).
* configuration space (5.1.4): ``mac`` (6 bytes), ``status`` (VIRTIO_NET_S_
  LINK_UP), ``max_virtqueue_pairs`` (1): 10 bytes.
* every packet is preceded by ``struct virtio_net_hdr`` (5.1.6): flags,
  gso_type, hdr_len, gso_size, csum_start, csum_offset and, with VERSION_1
  or MRG_RXBUF, num_buffers: 12 bytes, else 10 (the legacy header).

Transmit (5.1.6.2): when the driver notifies queue 1 every available chain
is taken at once, in order: its readable part is the header then the frame.
With NEEDS_CSUM (and CSUM negotiated) the device stores the one's complement
checksum of bytes csum_start..end at csum_start + csum_offset, as 5.1.6.2
tells a device to.  The chain goes back to the driver with length 0.

Receive (5.1.6.3/4): a frame the machine's ``NetInput`` hands over
(``deliver``) is written, after a header, into the writable part of the next
available chain of queue 0; with MRG_RXBUF into as many chains as it needs,
``num_buffers`` saying how many.  With GUEST_CSUM the header's flags carry
DATA_VALID for an IPv4 TCP/UDP packet whose checksums the device checked.
``can_receive(size)`` says whether a frame of ``size`` bytes fits in the
chains available now, so a driver that is slow to post buffers holds frames
back in the host instead of losing them (QEMU's virtio_net_can_receive and
has_buffers).

Hostile input, each handled as QEMU's virtio-net does (``device_error``:
DEVICE_NEEDS_RESET and no more processing until reset) or by dropping one
packet:

* a transmit chain shorter than the header, a receive chain with readable
  buffers or whose writable part cannot hold the header: device error
  ("virtio-net header incorrect", "receive queue contains no in buffers");
* a buffer outside RAM (a ``DmaError``): device error;
* a transmit frame shorter than an Ethernet header or longer than
  MAX_FRAME (64 KiB), a gso_type other than NONE (no segmentation was
  offered), a csum_start/csum_offset outside the frame: the packet is
  dropped (counted in ``tx_dropped``) and its chain returned;
* a received frame that does not fit the chains available (without
  MRG_RXBUF: one chain) is dropped (``rx_dropped``) and the chains given back;
* the ring itself (loops, indices, indirect tables) is checked by
  devices/virtio/queue.py.

The device keeps no host state and no state of its own between calls: the
wire it sends to and the frames it is handed belong to its ``NicPort``
(devices/net/port.py), which also counts, digests and captures them.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from devices.base import DmaError
from devices.net import ETH_HEADER, MAX_FRAME, l4_checksum_ok, ones_sum, parse_mac
from devices.pci.function import CMD_MASTER
from devices.virtio.device import DRIVER_OK, F_VERSION_1, ID_NET, VirtioDevice, bit
from devices.virtio.queue import Chain, VirtqError

# feature bits (5.1.3)
F_CSUM = 0
F_GUEST_CSUM = 1
F_MTU = 3
F_MAC = 5
F_GUEST_TSO4 = 7
F_HOST_TSO4 = 11
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17
F_MQ = 22

S_LINK_UP = 1
HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
GSO_NONE = 0

RX, TX = 0, 1
QUEUE_SIZE = 256
HDR_LEN = 12                    # struct virtio_net_hdr_v1 / with num_buffers
LEGACY_HDR_LEN = 10             # struct virtio_net_hdr, legacy without MRG_RXBUF
_HDR = struct.Struct("<BBHHHHH")


class VirtioNet(VirtioDevice):
    """virtio-net (see the module docstring); ``port`` is its ``NicPort`` (``send(frame)``)."""

    device_id = ID_NET
    pci_class = 0x020000                    # network controller, Ethernet
    kind = "virtio_net"
    VERSION = 1
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, port: Any, mac: bytes | str, name: str = "virtio-net0") -> None:
        super().__init__(name)
        self.port = port
        self.mac = parse_mac(mac)
        self.features = bit(F_MAC) | bit(F_STATUS) | bit(F_MRG_RXBUF) | bit(F_CSUM) | bit(F_GUEST_CSUM)
        self._config = self.mac + struct.pack("<HH", S_LINK_UP, 1)
        self.on_rx_ready: Callable[[], None] | None = None
        self.tx_packets = self.rx_packets = 0
        self.tx_dropped = self.rx_dropped = 0

    def config(self) -> bytes:
        return self._config

    # -- the header -----------------------------------------------------------------------------
    @property
    def hdr_len(self) -> int:
        t = self.transport
        return HDR_LEN if t.has_feature(F_VERSION_1) or t.has_feature(F_MRG_RXBUF) else LEGACY_HDR_LEN

    def _live(self) -> bool:
        """May the device use its queues now (DRIVER_OK or a legacy driver, bus master, not broken)?"""
        t = self.transport
        return (t is not None and not t.broken and bool(t.device_status & DRIVER_OK or t.legacy)
                and bool(t.command & CMD_MASTER))

    # -- transmit ---------------------------------------------------------------------------------
    def queue_notify(self, index: int) -> None:
        if index == TX:
            self._transmit()
        elif index == RX and self.on_rx_ready is not None:
            self.on_rx_ready()

    def _transmit(self) -> None:
        t = self.transport
        done = False
        for chain in t.pop(TX):
            frame = self._tx_frame(chain)
            if t.broken:
                return
            if frame is not None:
                self.tx_packets += 1
                self.port.send(frame)
            t.push(TX, chain.head, 0)
            done = True
        if done:
            t.notify_used(TX)

    def _tx_frame(self, chain: Chain) -> bytes | None:
        """The frame a transmit chain carries (checksum completed), or None to drop it."""
        t = self.transport
        hl = self.hdr_len
        total = chain.out_len
        if total < hl:
            t.device_error(f"{self.name}: transmit chain {chain.head} of {total} bytes has no "
                           f"{hl}-byte header (virtio-net header incorrect)")
            return None
        if total - hl > MAX_FRAME or total - hl < ETH_HEADER:
            self.tx_dropped += 1
            return None
        try:
            data = chain.read(t.dma)
        except DmaError as e:
            t.device_error(f"{self.name}: transmit buffer is not RAM ({e})")
            return None
        flags, gso, _, _, start, offset, _ = _HDR.unpack_from(data.ljust(HDR_LEN, b"\0"))
        frame = bytearray(data[hl:])
        if gso != GSO_NONE:
            self.tx_dropped += 1               # no segmentation offload was offered
            return None
        if flags & HDR_F_NEEDS_CSUM and t.has_feature(F_CSUM):
            at = start + offset
            if start >= len(frame) or at + 2 > len(frame):
                self.tx_dropped += 1
                return None
            # 5.1.6.2: the checksum field holds the pseudo-header sum; fold it into the rest
            s = ~ones_sum(frame[start:]) & 0xFFFF
            frame[at:at + 2] = s.to_bytes(2, "big")
        return bytes(frame)

    # -- receive ----------------------------------------------------------------------------------
    def _take_rx(self, size: int) -> list[Chain] | None:
        """Receive chains enough for a frame of ``size`` bytes (one chain without MRG_RXBUF), taken
        from the ring; None (every chain given back) when they are not there, or after a device
        error."""
        t = self.transport
        hl = self.hdr_len
        need = hl + size
        mergeable = t.has_feature(F_MRG_RXBUF)
        chains: list[Chain] = []
        room = 0
        while room < need:
            got = t.pop(RX, 1)
            if t.broken:
                return None
            if not got:
                break
            c = got[0]
            chains.append(c)
            if c.out or c.in_len < (hl if len(chains) == 1 else 1):
                t.device_error(f"{self.name}: receive chain {c.head} has readable buffers or no room "
                               f"for the {hl}-byte header (virtio-net receive queue contains no in buffers)")
                return None
            room += c.in_len
            if not mergeable:
                break
        if room < need:
            t.queues[RX].unpop(len(chains))
            return None
        return chains

    def can_receive(self, size: int = 0) -> bool:
        """Would a frame of ``size`` bytes fit the receive chains the driver made available now?
        (Without MRG_RXBUF, or for ``size`` 0: is there a chain at all; one too small for the
        frame drops it.)

        Only reads guest memory: a live run asks this before it takes a frame in, which a
        replay never does, so it must change nothing (no avail_event, no device error).  A ring it
        cannot read answers True, and ``deliver`` then meets the error, in the replay too."""
        if not self._live() or not self.transport.queues[RX].ready:
            return False
        t = self.transport
        q = t.queues[RX]
        dma = t.dma
        try:
            n = q.pending(dma)
            if not n or not t.has_feature(F_MRG_RXBUF) or size <= 0:
                return n > 0
            need = self.hdr_len + size
            ring = dma.read(q.avail + 4, 2 * q.size)
            table = dma.read(q.desc, 16 * q.size)
            room = 0
            for k in range(n):
                head = int.from_bytes(ring[2 * ((q.last_avail + k) % q.size):][:2], "little")
                room += q._walk(dma, table, head).in_len
                if room >= need:
                    return True
            return False
        except (VirtqError, DmaError):
            return True

    def deliver(self, frame: bytes) -> None:
        """A frame from the wire (destination address first, no FCS) into the receive queue."""
        if not self._live() or not self.transport.queues[RX].ready or len(frame) > MAX_FRAME:
            self.rx_dropped += 1
            return
        t = self.transport
        chains = self._take_rx(len(frame))
        if chains is None:
            if not t.broken:
                self.rx_dropped += 1
            return
        flags = HDR_F_DATA_VALID if t.has_feature(F_GUEST_CSUM) and l4_checksum_ok(frame) else 0
        data = _HDR.pack(flags, GSO_NONE, 0, 0, 0, 0, len(chains))[:self.hdr_len] + bytes(frame)
        pos = 0
        try:
            for c in chains:
                n = c.write(t.dma, 0, data[pos:pos + c.in_len])
                t.push(RX, c.head, n)
                pos += n
        except DmaError as e:
            t.device_error(f"{self.name}: receive buffer is not RAM ({e})")
            return
        self.rx_packets += 1
        t.notify_used(RX)
