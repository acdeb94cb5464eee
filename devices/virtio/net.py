"""virtio-net: an Ethernet NIC on a virtio transport.

Implements OASIS VIRTIO 1.2, 5.1 "Network Device" (device id 1) with one
receive queue (0) and one transmit queue (1), 256 entries each:

* features offered: MAC (the address in the configuration space), STATUS
  (link status, always up), MRG_RXBUF (mergeable receive buffers), CSUM
  (the device completes partial checksums of transmitted packets) and
  GUEST_CSUM (the device tells the driver which received packets it
  verified); with ``tso``, HOST_TSO4 (the device cuts IPv4 TCP packets of up
  to 64 KiB into segments: devices/net/tso.py).  No control queue, receive
  segmentation offload or multiqueue: the driver then cannot change receive
  filters, and the device receives every frame, as QEMU's does after reset
  (promiscuous).
* configuration space (5.1.4): ``mac`` (6 bytes), ``status`` (VIRTIO_NET_S_
  LINK_UP), ``max_virtqueue_pairs`` (1): 10 bytes.
* every packet is preceded by ``struct virtio_net_hdr`` (5.1.6): flags,
  gso_type, hdr_len, gso_size, csum_start, csum_offset and, with VERSION_1
  or MRG_RXBUF, num_buffers: 12 bytes, else 10 (the legacy header).

Transmit (5.1.6.2): when the driver notifies queue 1 every available chain
is taken at once, in order: its readable part is the header then the frame.
With ``tx_batch`` (ticks of virtual time) a notify that comes less than
``tx_batch`` after the last transmit does not transmit at once: a timer
(``"<name>.tx"``) takes everything then available ``tx_batch`` after the
last one, as QEMU's ``tx=timer`` mode flushes its queue 150 us after a kick.
The first packet after a pause goes at once, so a ping pays nothing; a
stream's packets wait for the timer, and Linux meanwhile (its transmitted
buffers not yet returned, TCP autocorking) joins small writes into large
segments, which ``tso`` lets it hand over whole: fewer, larger packets
and far fewer exits per byte.
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
  MAX_FRAME (64 KiB; a TSO packet may carry an Ethernet header more), a
  gso_type other than NONE (TCPV4 with HOST_TSO4 negotiated: a packet
  devices/net/tso.py cannot cut), a csum_start/csum_offset outside the
  frame: the packet is dropped (counted in ``tx_dropped``) and its chain
  returned;
* a received frame that does not fit the chains available (without
  MRG_RXBUF: one chain) is dropped (``rx_dropped``) and the chains given back;
* the ring itself (loops, indices, indirect tables) is checked by
  devices/virtio/queue.py.

The device keeps no host state: the wire it sends to and the frames it is
handed belong to its ``NicPort`` (devices/net/port.py), which also counts,
digests and captures them.  Its own state is the batching's: when it last
transmitted and whether its timer is armed (state version 2; a version 1
state, saved before batching existed, loads as "nothing pending").
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from devices.base import DeviceStateError, DmaError, State
from devices.net import ETH_HEADER, MAX_FRAME, l4_checksum_ok, ones_sum, parse_mac
from devices.net.tso import segment_tcp4
from devices.pci.function import CMD_MASTER
from devices.virtio.device import DRIVER_OK, F_VERSION_1, ID_NET, VirtioDevice, bit, state_bool, state_int
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
GSO_TCPV4 = 1
NEVER = -(1 << 62)              # "no transmit yet" for the batching's last-transmit time

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
    VERSION = 2
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, port: Any, mac: bytes | str, name: str = "virtio-net0", *, tso: bool = False,
                 tx_batch: int = 0) -> None:
        super().__init__(name)
        self.port = port
        self.mac = parse_mac(mac)
        self.features = bit(F_MAC) | bit(F_STATUS) | bit(F_MRG_RXBUF) | bit(F_CSUM) | bit(F_GUEST_CSUM)
        if tso:
            self.features |= bit(F_HOST_TSO4)
        if tx_batch < 0:
            raise ValueError("tx_batch is a number of ticks, 0 or more")
        self.tx_batch = tx_batch
        self._last_tx = NEVER
        self._tx_timer = None
        self.tso_packets = 0
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
            if not self.tx_batch:
                self._transmit()
            elif self._tx_timer is None:
                now = self.transport.clock.now()
                if now - self._last_tx >= self.tx_batch:
                    if self._transmit():
                        self._last_tx = now
                else:
                    self._arm_tx(self._last_tx + self.tx_batch)
        elif index == RX and self.on_rx_ready is not None:
            self.on_rx_ready()

    def _arm_tx(self, deadline: int) -> None:
        self._tx_timer = self.transport.clock.schedule(deadline, self._tx_due, f"{self.name}.tx")

    def _tx_due(self, now: int) -> None:
        self._tx_timer = None
        self._last_tx = now
        if self._live() and self.transport.queues[TX].ready:
            self._transmit()

    def _transmit(self) -> bool:
        """Send every available chain's frames; True if there was any."""
        t = self.transport
        done = False
        for chain in t.pop(TX):
            frames = self._tx_frame(chain)
            if t.broken:
                return done
            for frame in frames:
                self.tx_packets += 1
                self.port.send(frame)
            t.push(TX, chain.head, 0)
            done = True
        if done:
            t.notify_used(TX)
        return done

    def _tx_frame(self, chain: Chain) -> list[bytes]:
        """The frames a transmit chain carries (checksum completed; a TSO packet cut into
        segments); none if the packet is dropped."""
        t = self.transport
        hl = self.hdr_len
        total = chain.out_len
        if total < hl:
            t.device_error(f"{self.name}: transmit chain {chain.head} of {total} bytes has no "
                           f"{hl}-byte header (virtio-net header incorrect)")
            return []
        tso = t.has_feature(F_HOST_TSO4)
        if total - hl > MAX_FRAME + (ETH_HEADER if tso else 0) or total - hl < ETH_HEADER:
            self.tx_dropped += 1
            return []
        try:
            data = chain.read(t.dma)
        except DmaError as e:
            t.device_error(f"{self.name}: transmit buffer is not RAM ({e})")
            return []
        flags, gso, _, gso_size, start, offset, _ = _HDR.unpack_from(data.ljust(HDR_LEN, b"\0"))
        frame = bytearray(data[hl:])
        if gso != GSO_NONE:
            segments = segment_tcp4(bytes(frame), gso_size) if gso == GSO_TCPV4 and tso else None
            if segments is None:
                self.tx_dropped += 1           # segmentation not offered, or a packet it cannot cut
                return []
            self.tso_packets += 1
            return segments
        if len(frame) > MAX_FRAME:
            self.tx_dropped += 1
            return []
        if flags & HDR_F_NEEDS_CSUM and t.has_feature(F_CSUM):
            at = start + offset
            if start >= len(frame) or at + 2 > len(frame):
                self.tx_dropped += 1
                return []
            # 5.1.6.2: the checksum field holds the pseudo-header sum; fold it into the rest
            s = ~ones_sum(frame[start:]) & 0xFFFF
            frame[at:at + 2] = s.to_bytes(2, "big")
        return [bytes(frame)]

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

    # -- the batching's state -----------------------------------------------------------------
    def reset(self) -> None:
        if self._tx_timer is not None:
            self._tx_timer.cancel()
            self._tx_timer = None
        self._last_tx = NEVER

    def save_state(self) -> State:
        pending = self._tx_timer is not None
        return {"kind": self.kind, "version": self.VERSION, "last_tx": self._last_tx, "tx_pending": pending}

    def check_state(self, state: Any) -> Any:
        w = self.kind
        if isinstance(state, dict) and state.get("kind") == self.kind and state.get("version") == 1 \
                and set(state) == {"kind", "version"}:
            return NEVER, False                  # saved before batching: nothing pending
        if not isinstance(state, dict) or state.get("kind") != self.kind or state.get("version") != self.VERSION:
            raise DeviceStateError(f"{w}: not a {w} state of version {self.VERSION}")
        last = state_int(state, "last_tx", NEVER, (1 << 63) - 1, w)
        pending = state_bool(state, "tx_pending", w)
        if pending and (not self.tx_batch or last == NEVER):
            raise DeviceStateError(f"{w}: a transmit timer pending without batching or a last transmit")
        return last, pending

    def apply_state(self, checked: Any) -> None:
        last, pending = checked
        self.reset()
        self._last_tx = last
        if pending:
            self._arm_tx(last + self.tx_batch)
