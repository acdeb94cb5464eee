"""virtio-net (devices/virtio/net.py) on the virtio PCI transport, driven as Linux's virtio_net
drives it through tests/devices/rigs_virtio.py's ``Driver``: the configuration space,
transmit with checksum completion, receive into one chain or mergeable buffers with
DATA_VALID, frames held back while the driver has no buffers, and hostile rings."""
from __future__ import annotations

import struct

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.base import DeviceStateError
from devices.bus import IoBus, MmioBus
from devices.clock import VirtualClock
from devices.net import l4_checksum_ok
from devices.virtio import net as vn
from devices.virtio.device import F_VERSION_1, NEEDS_RESET, bit
from devices.virtio.pci import VirtioPciFunction
from devices.virtio.queue import DESC_F_NEXT, DESC_F_WRITE
from tests.devices.rigs_virtio import Driver, Ram

MAC = bytes.fromhex("525400abcdef")
PEER = bytes.fromhex("525400000002")
HDR = struct.Struct("<BBHHHHH")


class Wire:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)


def make(accept: int = ~0, legacy: bool = False, ram: Ram | None = None, **opts):
    ram = ram or Ram(0x40000)
    io, mmio, clock = IoBus(), MmioBus(), VirtualClock()
    wire = Wire()
    dev = vn.VirtioNet(wire, MAC, **opts)
    fn = VirtioPciFunction(dev, io_bus=io, mmio_bus=mmio, dma=ram, clock=clock)
    drv = Driver(fn, io, mmio, ram, legacy=legacy)
    drv.init(accept)
    if legacy:                          # the rig's legacy init sets up queue 0 only
        drv.setup_queue(1)
    return dev, fn, drv, ram, wire


def udp_frame(payload: bytes, dst: bytes = MAC, csum: bool = True) -> bytes:
    u = dpkt.udp.UDP(sport=1000, dport=2000, data=payload)
    ip = dpkt.ip.IP(src=bytes([10, 0, 0, 1]), dst=bytes([10, 0, 0, 2]), p=17, data=u)
    eth = bytes(dpkt.ethernet.Ethernet(dst=dst, src=PEER, type=0x0800, data=ip))
    if not csum:
        eth = eth[:40] + b"\x12\x34" + eth[42:]             # a wrong UDP checksum
    return eth


def transmit(drv: Driver, frame: bytes, hdr: bytes | None = None, split: bool = True) -> int:
    hdr = hdr if hdr is not None else bytes(12)
    h = drv.alloc(len(hdr))
    drv.ram.mem[h:h + len(hdr)] = hdr
    b = drv.alloc(len(frame))
    drv.ram.mem[b:b + len(frame)] = frame
    bufs = [(h, len(hdr), False), (b, len(frame), False)] if split else None
    if not split:
        b = drv.alloc(len(hdr) + len(frame))
        drv.ram.mem[b:b + len(hdr) + len(frame)] = hdr + frame
        bufs = [(b, len(hdr) + len(frame), False)]
    return drv.submit(vn.TX, bufs)


def post_rx(drv: Driver, n: int, size: int) -> list[int]:
    addrs = []
    for _ in range(n):
        a = drv.alloc(size)
        drv.submit(vn.RX, [(a, size, True)], kick=False)
        addrs.append(a)
    drv.kick(vn.RX)
    return addrs


def test_identity_and_configuration_space():
    _dev, fn, drv, _, _ = make()
    assert fn.config_read(0, 4) == 0x1000_1AF4               # transitional virtio-net
    assert fn.config_read(0x08, 4) >> 8 == 0x020000          # Ethernet controller
    assert bytes(drv.config_read(i, 1) for i in range(6)) == MAC
    assert drv.config_read(6, 2) == vn.S_LINK_UP
    for f in (vn.F_MAC, vn.F_STATUS, vn.F_MRG_RXBUF, vn.F_CSUM, vn.F_GUEST_CSUM):
        assert drv.features & bit(f)


@pytest.mark.parametrize("split", [True, False])
def test_transmit_strips_the_header(split):
    _dev, _fn, drv, _, wire = make()
    frame = udp_frame(b"hello virtio")
    head = transmit(drv, frame, split=split)
    assert wire.frames == [frame]
    assert drv.used(vn.TX) == [(head, 0)]


def test_transmit_completes_a_partial_checksum():
    _dev, _fn, drv, _, wire = make()
    frame = bytearray(udp_frame(b"checksum me" * 9))
    # what Linux hands a CSUM device: the pseudo-header sum in the checksum field
    ip = dpkt.ethernet.Ethernet(bytes(frame)).data
    pseudo = ip.src + ip.dst + bytes((0, 17)) + len(ip.data).to_bytes(2, "big")
    s = sum(struct.unpack(">6H", pseudo))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    frame[40:42] = s.to_bytes(2, "big")
    hdr = HDR.pack(vn.HDR_F_NEEDS_CSUM, vn.GSO_NONE, 0, 0, 34, 6, 0)
    transmit(drv, bytes(frame), hdr)
    assert len(wire.frames) == 1 and l4_checksum_ok(wire.frames[0])
    assert wire.frames[0][:40] == frame[:40] and wire.frames[0][42:] == frame[42:]


def test_transmit_drops_what_it_cannot_send_and_goes_on():
    dev, fn, drv, _, wire = make()
    transmit(drv, udp_frame(b"x"), HDR.pack(0, 1, 0, 0, 0, 0, 0))          # TSO4 was not offered
    transmit(drv, b"\x01" * 10)                                            # shorter than an Ethernet header
    transmit(drv, udp_frame(b"y"), HDR.pack(vn.HDR_F_NEEDS_CSUM, 0, 0, 0, 500, 6, 0))   # outside the frame
    good = udp_frame(b"z")
    transmit(drv, good)
    assert wire.frames == [good] and dev.tx_dropped == 3 and not fn.broken
    assert len(drv.used(vn.TX)) == 4


def test_receive_into_mergeable_buffers():
    dev, fn, drv, ram, _ = make()
    addrs = post_rx(drv, 4, 512)
    frame = udp_frame(bytes(range(256)) * 4)                 # 1066 bytes: header + frame need 3 buffers
    assert dev.can_receive(len(frame)) and not dev.can_receive(4 * 512)
    dev.deliver(frame)
    used = drv.used(vn.RX)
    assert [n for _, n in used] == [512, 512, 12 + len(frame) - 1024]
    data = b"".join(bytes(ram.mem[a:a + n]) for a, (_, n) in zip(addrs, used))
    flags, gso, _, _, _, _, nbuf = HDR.unpack(data[:12])
    assert nbuf == 3 and gso == 0 and flags == vn.HDR_F_DATA_VALID
    assert data[12:] == frame
    assert fn.isr & 1                                        # the used buffer notification


def test_receive_without_mergeable_buffers_one_chain_per_frame():
    dev, _fn, drv, ram, _ = make(accept=~bit(vn.F_MRG_RXBUF))
    [a, _b] = post_rx(drv, 2, 600)
    dev.deliver(udp_frame(bytes(1000)))                      # does not fit one chain: dropped
    assert dev.rx_dropped == 1 and drv.used(vn.RX) == []
    small = udp_frame(b"small", csum=False)
    dev.deliver(small)
    [(_, n)] = drv.used(vn.RX)
    assert n == 12 + len(small) and bytes(ram.mem[a + 12:a + n]) == small
    assert HDR.unpack_from(ram.mem, a)[0] == 0 and HDR.unpack_from(ram.mem, a)[6] == 1   # not DATA_VALID


def test_legacy_driver_gets_the_ten_byte_header():
    dev, _fn, drv, ram, wire = make(accept=~(bit(vn.F_MRG_RXBUF) | bit(F_VERSION_1)), legacy=True)
    [a] = post_rx(drv, 1, 2048)
    frame = udp_frame(b"legacy")
    dev.deliver(frame)
    [(_, n)] = drv.used(vn.RX)
    assert n == 10 + len(frame) and bytes(ram.mem[a + 10:a + n]) == frame
    transmit(drv, frame, bytes(10))
    assert wire.frames == [frame]


def test_no_buffers_holds_frames_back():
    dev, _fn, drv, _, _ = make()
    assert not dev.can_receive(60)
    post_rx(drv, 1, 2048)
    assert dev.can_receive(60) and dev.can_receive(1514) and not dev.can_receive(3000)
    assert drv.used(vn.RX) == []                             # asking took nothing


def test_rx_notify_tells_the_machine_it_may_poll():
    dev, _fn, drv, _, _ = make()
    calls = []
    dev.on_rx_ready = lambda: calls.append(1)
    post_rx(drv, 2, 2048)
    assert calls


# -- hostile rings ---------------------------------------------------------------------------------

def test_readable_receive_buffer_needs_reset():
    dev, fn, drv, _, _ = make()
    a = drv.alloc(2048)
    drv.submit(vn.RX, [(a, 2048, False)])
    dev.deliver(udp_frame(b"x"))
    assert fn.broken and fn.device_status & NEEDS_RESET and "no in buffers" in fn.error


def test_transmit_chain_shorter_than_the_header_needs_reset():
    _dev, fn, drv, _, wire = make()
    a = drv.alloc(8)
    drv.submit(vn.TX, [(a, 8, False)])
    assert fn.broken and "header" in fn.error and wire.frames == []


@pytest.mark.parametrize("queue", [vn.RX, vn.TX])
def test_buffers_outside_ram_need_reset(queue):
    dev, fn, drv, _, wire = make()
    drv.submit(queue, [(0x10_0000_0000, 2048, queue == vn.RX)])
    dev.deliver(udp_frame(b"x"))
    assert fn.broken and "not RAM" in fn.error and wire.frames == []


def test_oversized_and_empty_frames_from_the_wire():
    dev, fn, drv, _, _ = make()
    post_rx(drv, 4, 4096)
    dev.deliver(bytes(70000))
    assert dev.rx_dropped == 1 and drv.used(vn.RX) == [] and not fn.broken
    dev.deliver(b"")
    [(_, n)] = drv.used(vn.RX)
    assert n == 12                                           # the virtio spec has no minimum frame


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(table=st.binary(min_size=0, max_size=16 * 16), ring=st.binary(max_size=32),
       avail_idx=st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
       frames=st.lists(st.integers(0, 3000), max_size=6), kicks=st.integers(0, 3), tso=st.booleans())
def test_random_rings_never_escape_the_device(table, ring, avail_idx, frames, kicks, tso):
    """Random descriptors in both queues: nothing raises, nothing outside RAM is touched
    (the rig's RAM raises before a byte moves), work per frame and kick is bounded, and the
    device works on or stops with NEEDS_RESET."""
    ram = Ram(0x8000)
    dev, fn, drv, _, wire = make(ram=ram, tso=tso)     # with TSO offered, random headers reach tso.py
    mem = ram.mem
    for qi in (vn.RX, vn.TX):
        q = drv.queues[qi]
        size = q["size"]
        tbl = bytearray(table.ljust(16 * 16, b"\0"))
        for i in range(16):
            addr = struct.unpack_from("<Q", tbl, 16 * i)[0] % 0x9000
            struct.pack_into("<Q", tbl, 16 * i, addr)
            flags = tbl[16 * i + 12] & (DESC_F_NEXT | DESC_F_WRITE)
            tbl[16 * i + 12:16 * i + 16] = struct.pack("<HH", flags, tbl[16 * i + 14] % size)
        mem[q["desc"]:q["desc"] + len(tbl)] = tbl
        r = ring.ljust(32, b"\0")
        for k in range(16):
            struct.pack_into("<H", mem, q["avail"] + 4 + 2 * k, r[2 * k] % 16)
        struct.pack_into("<H", mem, q["avail"] + 2, avail_idx[qi] % 0x20)
    before = ram.reads + ram.writes
    for _ in range(kicks):
        drv.kick(vn.TX)
    for n in frames:
        if dev.can_receive(n):
            dev.deliver(udp_frame(bytes(n)))
    work = ram.reads + ram.writes - before
    assert work <= (kicks + 2 * len(frames)) * (256 * 8 + 16) + 16
    assert all(len(f) <= vn.MAX_FRAME for f in wire.frames)
    assert len(wire.frames) <= (kicks + 1) * 16 * (1 if not tso else 1024)
    assert fn.broken == bool(fn.device_status & NEEDS_RESET)


def test_asking_whether_a_frame_fits_changes_no_guest_memory():
    """A live run asks before it takes a frame in, a replay never asks: the question must leave
    guest memory and the device as they were (with EVENT_IDX, taking a chain writes avail_event)."""
    dev, fn, drv, ram, _ = make()
    post_rx(drv, 3, 512)
    before = bytes(ram.mem)
    assert dev.can_receive(1000) and not dev.can_receive(2000)
    assert bytes(ram.mem) == before and fn.queues[vn.RX].last_avail == 0
    struct.pack_into("<H", ram.mem, drv.queues[vn.RX]["avail"] + 2, 999)      # a broken ring
    assert dev.can_receive(60) and not fn.broken                               # deliver finds out
    dev.deliver(udp_frame(b"x"))
    assert fn.broken


# -- TCP segmentation offload and transmit batching (machine type pc-4) ---------------------------
def tcp_packet(payload: bytes, seq: int = 1000) -> bytes:
    tcp = dpkt.tcp.TCP(sport=40000, dport=1234, seq=seq, ack=1, flags=dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH,
                       win=500, data=payload)
    ip = dpkt.ip.IP(src=bytes([10, 0, 2, 15]), dst=bytes([10, 0, 2, 2]), p=6, id=77, data=tcp)
    return bytes(dpkt.ethernet.Ethernet(dst=PEER, src=MAC, type=0x0800, data=ip))


def test_tso_packets_leave_as_segments_with_their_checksums():
    dev, fn, drv, _, wire = make(tso=True)
    assert fn.has_feature(vn.F_HOST_TSO4)
    payload = bytes(range(256)) * 40                      # 10240 bytes: 8 segments of 1448, one of 104
    big = tcp_packet(payload)
    hdr = HDR.pack(vn.HDR_F_NEEDS_CSUM, vn.GSO_TCPV4, 54, 1448, 34, 16, 0)
    transmit(drv, big, hdr)
    assert dev.tso_packets == 1 and dev.tx_dropped == 0
    assert [len(f) - 54 for f in wire.frames] == [1448] * 7 + [104]
    got = b""
    for f in wire.frames:
        assert l4_checksum_ok(f)
        tcp = dpkt.ethernet.Ethernet(f).data.data
        assert tcp.seq == 1000 + len(got)
        got += tcp.data
    assert got == payload
    assert len(drv.used(vn.TX)) == 1                     # one chain, returned once


def test_tso_is_offered_only_when_asked_and_a_packet_too_large_for_it_is_dropped():
    dev, fn, drv, _, wire = make()
    assert not fn.has_feature(vn.F_HOST_TSO4)
    dev, fn, drv, _, wire = make(tso=True, ram=Ram(0x80000))
    too_big = b"\0" * (vn.MAX_FRAME + vn.ETH_HEADER + 1)
    transmit(drv, too_big, HDR.pack(0, vn.GSO_TCPV4, 54, 1448, 34, 16, 0), split=False)
    transmit(drv, udp_frame(b"u"), HDR.pack(0, vn.GSO_TCPV4, 42, 1448, 34, 6, 0))   # not TCP
    assert wire.frames == [] and dev.tx_dropped == 2 and not fn.broken


def test_a_transmit_soon_after_the_last_waits_for_the_batch():
    dev, fn, drv, _, wire = make(tx_batch=1000)
    clock = fn.clock
    a, b, c = udp_frame(b"a"), udp_frame(b"b"), udp_frame(b"c")
    transmit(drv, a)                                      # the first after a pause goes at once
    assert wire.frames == [a]
    clock.advance(300)
    transmit(drv, b)
    transmit(drv, c)                                      # both wait: the last transmit was 300 ticks ago
    assert wire.frames == [a] and len(drv.used(vn.TX)) == 1
    clock.advance(699)
    assert wire.frames == [a]
    clock.advance(1)                                      # 1000 ticks after the first: the batch goes
    assert wire.frames == [a, b, c] and len(drv.used(vn.TX)) == 2   # the two returned now
    clock.advance(5000)
    d = udp_frame(b"d")
    transmit(drv, d)                                      # a pause again: at once
    assert wire.frames[-1] == d


def test_a_pending_batch_survives_save_and_load():
    dev, fn, drv, _, wire = make(tx_batch=1000)
    clock = fn.clock
    transmit(drv, udp_frame(b"a"))
    clock.advance(10)
    transmit(drv, udp_frame(b"b"))
    st = dev.save_state()
    assert st["tx_pending"] is True and st["version"] == 2
    dev.reset()                                            # the timer goes
    clock.advance(2000)
    assert len(wire.frames) == 1
    dev.load_state(st)                                     # armed again at last + batch (already past)
    clock.advance(1)
    assert len(wire.frames) == 2


def test_a_version_1_state_loads_as_nothing_pending_and_bad_states_are_refused():
    dev, fn, drv, _, wire = make(tx_batch=1000)
    dev.load_state({"kind": dev.kind, "version": 1})
    assert dev.save_state()["tx_pending"] is False
    for bad in ({"kind": dev.kind, "version": 2, "last_tx": 0},
                {"kind": dev.kind, "version": 2, "last_tx": "0", "tx_pending": False},
                {"kind": dev.kind, "version": 3, "last_tx": 0, "tx_pending": False}):
        with pytest.raises(DeviceStateError):
            dev.load_state(bad)
    plain, *_ = make()
    with pytest.raises(DeviceStateError):
        plain.load_state({"kind": plain.kind, "version": 2, "last_tx": 5, "tx_pending": True})
