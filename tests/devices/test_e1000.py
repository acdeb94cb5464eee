"""The 82540EM (devices/net/e1000.py) driven as Linux's e1000 driver drives it, with no guest.

Packets are built and parsed with dpkt, not by hand.  ``rigs_e1000`` has the
fake RAM and the ring set-up the conformance suite uses too.
"""
from __future__ import annotations

import struct
import zlib

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.base import DmaError
from devices.clock import VirtualClock
from devices.net import e1000 as e
from devices.net.port import NetInput, decode_net_frame, encode_net_frame
from devices.pci.function import BAR0, STATUS
from tests.devices.rigs_e1000 import (
    MAC,
    RX_BUFS,
    RX_RING,
    TX_BUFS,
    TX_RING,
    FakeRam,
    Recorder,
    frame_for,
    make_nic,
    program_rings,
    queue_tx,
)
from tests.machine_helpers import ClockMachine

PEER = bytes.fromhex("525400000002")


def icr(nic) -> int:
    return nic.mmio_read(e.ICR, 4)


# -- identity, EEPROM, PHY ------------------------------------------------------------------------

def test_pci_identity_and_bars():
    nic, _, _ = make_nic()
    assert nic.config_read(0, 4) == 0x100E8086
    assert nic.config_read(0x08, 4) >> 8 == 0x020000 and nic.config_read(0x08, 1) == 0x03
    assert nic.config_read(0x2C, 4) == 0x11001AF4
    assert nic.config_read(0x3D, 1) == 1                       # INTA#
    nic.config_write(BAR0, 4, 0xFFFF_FFFF)
    assert nic.config_read(BAR0, 4) == 0xFFFE_0000             # 128 KiB memory
    nic.config_write(BAR0 + 4, 4, 0xFFFF_FFFF)
    assert nic.config_read(BAR0 + 4, 4) == 0xFFFF_FFC1         # 64 bytes of I/O


def eeprom_read_microwire(nic, word: int) -> int:
    """e1000_read_eeprom for the 82540: REQ/GNT, CS, opcode 110 and 6 address bits, 16 data bits."""
    w = lambda v: nic.mmio_write(e.EECD, 4, v)
    eecd = nic.mmio_read(e.EECD, 4) | e.EECD_REQ
    w(eecd)
    assert nic.mmio_read(e.EECD, 4) & e.EECD_GNT
    eecd &= ~(e.EECD_DI | e.EECD_SK)
    w(eecd | e.EECD_CS)
    eecd |= e.EECD_CS
    for bit in [1, 1, 0] + [(word >> i) & 1 for i in range(5, -1, -1)]:
        eecd = (eecd | e.EECD_DI) if bit else (eecd & ~e.EECD_DI)
        w(eecd)
        w(eecd | e.EECD_SK)
        w(eecd)
    value = 0
    for _ in range(16):
        w(eecd | e.EECD_SK)
        value = value << 1 | (1 if nic.mmio_read(e.EECD, 4) & e.EECD_DO else 0)
        w(eecd)
    w(eecd & ~(e.EECD_CS | e.EECD_REQ))
    return value


def test_eeprom_over_microwire_holds_the_mac_and_its_checksum():
    nic, _, _ = make_nic(mac=bytes.fromhex("0a1b2c3d4e5f"))
    words = [eeprom_read_microwire(nic, i) for i in range(64)]
    assert words[:3] == [0x1B0A, 0x3D2C, 0x5F4E]
    assert sum(words) & 0xFFFF == 0xBABA
    assert words[0x0D] == 0x100E and words[0x0E] == 0x8086
    # EERD gives the same words at once
    nic.mmio_write(e.EERD, 4, 2 << 8 | e.EERD_START)
    v = nic.mmio_read(e.EERD, 4)
    assert v & e.EERD_DONE and v >> 16 == 0x5F4E
    # the receive address filter starts with the EEPROM's address
    assert nic.mmio_read(e.RA, 4) == 0x3D2C1B0A and nic.mmio_read(e.RA + 4, 4) == 0x8000_5F4E


def mdic(nic, reg: int, write: int | None = None, phy: int = 1, int_en: bool = False) -> int:
    op = e.MDIC_OP_READ if write is None else e.MDIC_OP_WRITE | write
    nic.mmio_write(e.MDIC, 4, op | phy << 21 | reg << 16 | (e.MDIC_INT_EN if int_en else 0))
    v = nic.mmio_read(e.MDIC, 4)
    assert v & e.MDIC_READY
    return v


def test_phy_through_mdic_and_autonegotiation():
    clock = VirtualClock()
    nic, _, _ = make_nic(clock)
    assert mdic(nic, e.PHYID1) & 0xFFFF == 0x0141 and mdic(nic, e.PHYID2) & 0xFFFF == 0x0C20
    assert mdic(nic, e.BMSR) & e.BMSR_LINK_ST and nic.mmio_read(e.STATUS, 4) & e.ST_LU
    assert mdic(nic, 7) & e.MDIC_ERROR                           # a register this PHY lacks
    assert mdic(nic, e.BMSR, phy=2) & e.MDIC_ERROR               # no PHY at address 2
    nic.mmio_write(e.IMS, 4, e.ICR_LSC | e.ICR_MDAC)
    mdic(nic, e.ANAR, int_en=True)
    assert icr(nic) == e.ICR_MDAC
    mdic(nic, e.BMCR, write=e.BMCR_AUTOEN | e.BMCR_ANRESTART | e.BMCR_FD | e.BMCR_SPEED1000)
    assert not nic.mmio_read(e.STATUS, 4) & e.ST_LU and not mdic(nic, e.BMSR) & e.BMSR_LINK_ST
    assert not mdic(nic, e.BMCR) & e.BMCR_ANRESTART              # self-clearing
    clock.advance(e.AUTONEG_TICKS - 1)
    assert not nic.irq_level
    clock.advance(1)
    assert nic.irq_level and icr(nic) == e.ICR_LSC and not nic.irq_level
    bmsr = mdic(nic, e.BMSR)
    assert bmsr & e.BMSR_LINK_ST and bmsr & e.BMSR_AN_COMP and nic.mmio_read(e.STATUS, 4) & e.ST_LU
    assert mdic(nic, e.ANLPAR) & e.ANLPAR_ACK


# -- interrupts -------------------------------------------------------------------------------------

def test_interrupt_cause_mask_and_read_to_clear():
    clock = VirtualClock()
    nic, _, _ = make_nic(clock)
    nic.mmio_write(e.ICS, 4, e.ICR_RXT0 | e.ICR_TXDW)
    assert not nic.irq_level                                     # masked
    assert nic.mmio_read(e.ICS, 4) == e.ICR_RXT0 | e.ICR_TXDW    # ICS reads as ICR, without clearing
    nic.mmio_write(e.IMS, 4, e.ICR_RXT0)
    assert nic.irq_level and nic.mmio_read(e.IMS, 4) == e.ICR_RXT0
    nic.mmio_write(e.IMC, 4, e.ICR_RXT0)
    assert not nic.irq_level and nic.mmio_read(e.IMS, 4) == 0
    window = e.MIT_FLOOR * e.MIT_UNIT_NS // 10            # QEMU's throttling floor, 128 us
    nic.mmio_write(e.IMS, 4, 0xFFFF)
    assert not nic.irq_level                              # a new edge inside the window waits
    clock.advance(window)
    assert nic.irq_level
    nic.mmio_write(e.ICR, 4, e.ICR_TXDW)                         # write 1 to clear one cause
    assert nic.mmio_read(e.ICS, 4) == e.ICR_RXT0 and nic.irq_level
    assert icr(nic) == e.ICR_RXT0 and not nic.irq_level and icr(nic) == 0
    # throttling (QEMU's model): the next edge waits for the end of the 128 us window
    nic.mmio_write(e.ICS, 4, e.ICR_RXT0)
    assert not nic.irq_level
    clock.advance(window - 1)
    assert not nic.irq_level
    clock.advance(1)
    assert nic.irq_level and icr(nic) == e.ICR_RXT0
    # ITR above the floor lengthens the window
    nic.mmio_write(e.ITR, 4, 1000)
    clock.advance(window)
    nic.mmio_write(e.ICS, 4, e.ICR_RXT0)
    assert nic.irq_level
    nic.mmio_read(e.ICR, 4)
    nic.mmio_write(e.ICS, 4, e.ICR_RXT0)
    clock.advance(window)
    assert not nic.irq_level
    clock.advance(1000 * 256 // 10 - window)
    assert nic.irq_level


# -- transmit ---------------------------------------------------------------------------------------

def test_transmit_legacy_descriptors_to_the_wire():
    nic, ram, wire = make_nic()
    program_rings(nic, ram)
    nic.mmio_write(e.IMS, 4, e.ICR_TXDW)
    icr(nic)
    arp = bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=MAC, type=dpkt.ethernet.ETH_TYPE_ARP,
                                       data=dpkt.arp.ARP(sha=MAC, tha=bytes(6))))
    queue_tx(nic, ram, arp)
    assert wire.frames == [arp.ljust(60, b"\0")]                 # TCTL.PSP pads to 60 bytes
    assert ram.mem[TX_RING + 12] & e.TXD_STAT_DD and nic.reg(e.TDH) == 1
    assert nic.irq_level and icr(nic) & e.ICR_TXDW
    # one frame in two descriptors (EOP on the second), no RS: no write-back
    big = bytes(dpkt.ethernet.Ethernet(dst=PEER, src=MAC, data=dpkt.ip.IP(
        src=b"\x0a\0\0\1", dst=b"\x0a\0\0\2", p=17, data=dpkt.udp.UDP(sport=1, dport=2, data=b"x" * 700))))
    queue_tx(nic, ram, big[:500], cmd=e.TXD_CMD_IFCS, ring_doorbell=False)
    nic.mmio_write(e.TDT, 4, 2)
    queue_tx(nic, ram, big[500:], cmd=e.TXD_CMD_IFCS | e.TXD_CMD_EOP)
    assert wire.frames[1] == big and nic.reg(e.TDH) == 3
    assert not ram.mem[TX_RING + 16 + 12] & e.TXD_STAT_DD
    assert nic.mmio_read(e.GPTC, 4) == 2 and nic.mmio_read(e.GPTC, 4) == 0     # clear on read
    assert nic.mmio_read(e.BPTC, 4) == 1
    assert nic.mmio_read(e.GOTCL, 4) == 64 + len(big) + 4 and nic.mmio_read(e.GOTCH, 4) == 0
    assert nic.mmio_read(e.GOTCL, 4) == 0                        # the high half cleared the pair


def _tcp_packet(payload: bytes) -> dpkt.ethernet.Ethernet:
    tcp = dpkt.tcp.TCP(sport=40000, dport=1234, seq=1000, ack=1, flags=dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH,
                       win=500, data=payload)
    ip = dpkt.ip.IP(src=b"\x0a\0\0\1", dst=b"\x0a\0\0\2", p=6, id=77, data=tcp)
    return dpkt.ethernet.Ethernet(dst=PEER, src=MAC, data=ip)


def _context(ram, slot: int, *, ipcss, ipcso, ipcse, tucss, tucso, tucse, cmd, hdr_len=0, mss=0) -> None:
    ram.write(TX_RING + 16 * slot, struct.pack("<BBHBBHIBBH", ipcss, ipcso, ipcse, tucss, tucso, tucse,
                                               cmd | e.TXD_CMD_DEXT | e.TXD_CMD_RS, 0, hdr_len, mss))


def _data(ram, slot: int, buf: int, data: bytes, cmd: int, popts: int) -> None:
    ram.write(buf, data)
    ram.write(TX_RING + 16 * slot, struct.pack("<QII", buf, len(data) | cmd | e.TXD_CMD_DEXT | e.TXD_DTYP_D,
                                               popts << 8))


def _l4_ok(ip: dpkt.ip.IP) -> bool:
    raw = bytes(ip.data)
    pseudo = ip.src + ip.dst + struct.pack(">BBH", 0, ip.p, len(raw))
    return dpkt.in_cksum(pseudo + raw) == 0


def test_checksum_offload_with_context_and_data_descriptors():
    nic, ram, wire = make_nic()
    program_rings(nic, ram)
    pkt = bytes(_tcp_packet(b"hello offload" * 10))
    # as Linux's e1000_tx_csum leaves it: the pseudo-header sum in the TCP checksum field
    raw = bytearray(pkt)
    ip = dpkt.ip.IP(pkt[14:])
    pseudo = ip.src + ip.dst + struct.pack(">BBH", 0, 6, len(ip.data))
    raw[14 + 20 + 16:14 + 20 + 18] = struct.pack(">H", (~dpkt.in_cksum(pseudo)) & 0xFFFF)
    raw[14 + 10:14 + 12] = b"\0\0"
    _context(ram, 0, ipcss=14, ipcso=24, ipcse=33, tucss=34, tucso=50, tucse=0, cmd=e.TXD_CMD_TCP | e.TXD_CMD_IP)
    _data(ram, 1, TX_BUFS, bytes(raw), e.TXD_CMD_EOP | e.TXD_CMD_RS, e.TXD_POPTS_TXSM | e.TXD_POPTS_IXSM)
    nic.mmio_write(e.TDT, 4, 2)
    assert len(wire.frames) == 1
    out = dpkt.ethernet.Ethernet(wire.frames[0])
    assert dpkt.in_cksum(bytes(out.data)[:20]) == 0 and _l4_ok(out.data)
    assert out.data.data.data == b"hello offload" * 10


def test_tcp_segmentation_offload():
    nic, ram, wire = make_nic()
    program_rings(nic, ram)
    payload = bytes(range(256)) * 16                      # 4096 bytes
    pkt = _tcp_packet(payload)
    raw = bytearray(bytes(pkt))
    # Linux's e1000_tso: IP total length and checksum 0, TCP checksum = pseudo-header without length
    raw[14 + 2:14 + 4] = b"\0\0"
    raw[14 + 10:14 + 12] = b"\0\0"
    ip = pkt.data
    pseudo = ip.src + ip.dst + struct.pack(">BBH", 0, 6, 0)
    raw[14 + 20 + 16:14 + 20 + 18] = struct.pack(">H", (~dpkt.in_cksum(pseudo)) & 0xFFFF)
    hdr, body = bytes(raw[:54]), bytes(raw[54:])
    mss = 1000
    _context(ram, 0, ipcss=14, ipcso=24, ipcse=33, tucss=34, tucso=50, tucse=0, hdr_len=54, mss=mss,
             cmd=e.TXD_CMD_TCP | e.TXD_CMD_IP | e.TXD_CMD_TSE | len(body))
    popts = e.TXD_POPTS_TXSM | e.TXD_POPTS_IXSM
    _data(ram, 1, TX_BUFS, hdr, e.TXD_CMD_TSE, popts)
    _data(ram, 2, TX_BUFS + 0x100, body[:2500], e.TXD_CMD_TSE, popts)
    _data(ram, 3, TX_BUFS + 0x1000, body[2500:], e.TXD_CMD_TSE | e.TXD_CMD_EOP | e.TXD_CMD_RS, popts)
    nic.mmio_write(e.TDT, 4, 4)
    segs = [dpkt.ethernet.Ethernet(f) for f in wire.frames]
    assert [len(s.data.data.data) for s in segs] == [1000, 1000, 1000, 1000, 96]
    got = b""
    for k, s in enumerate(segs):
        ip, tcp = s.data, s.data.data
        assert ip.len == 20 + 20 + len(tcp.data) and ip.id == 77 + k
        assert dpkt.in_cksum(bytes(ip)[:20]) == 0 and _l4_ok(ip)
        assert tcp.seq == 1000 + k * mss
        last = k == len(segs) - 1
        assert bool(tcp.flags & dpkt.tcp.TH_PUSH) == last
        got += tcp.data
    assert got == payload
    assert nic.mmio_read(e.TSCTC, 4) == 1


# -- receive ----------------------------------------------------------------------------------------

def rx_desc(ram, i: int) -> tuple[int, int, int, int, int]:
    """(length, csum, status, errors, special) of receive descriptor i."""
    return struct.unpack("<HHBBH", ram.read(RX_RING + 16 * i + 8, 8))


def test_receive_into_the_ring_with_wraparound_and_overrun():
    nic, ram, _ = make_nic()
    program_rings(nic, ram, rx_free=3)                    # descriptors 0-2 are the NIC's
    nic.mmio_write(e.RCTL, 4, e.RCTL_EN | e.RCTL_BAM)     # keep the CRC: the buffer gets it
    nic.mmio_write(e.IMS, 4, e.ICR_RXT0 | e.ICR_RXO)
    icr(nic)
    frames = [frame_for(MAC, 100 + i, i) for i in range(5)]
    for f in frames:
        nic.deliver(f)
    assert nic.reg(e.RDH) == 3
    for i in range(3):
        length, _, status, errors, _ = rx_desc(ram, i)
        assert length == len(frames[i]) + 4 and status & (e.RXD_STAT_DD | e.RXD_STAT_EOP) == 3 and not errors
        data = ram.read(RX_BUFS + 0x800 * i, length)
        assert data[:-4] == frames[i] and data[-4:] == zlib.crc32(frames[i]).to_bytes(4, "little")
    assert icr(nic) == e.ICR_RXT0 | e.ICR_RXO | e.ICR_RXDMT0
    assert nic.mmio_read(e.MPC, 4) == 2 and nic.mmio_read(e.RNBC, 4) == 2 and nic.mmio_read(e.GPRC, 4) == 3
    # the driver hands back 0-2 and the tail wraps: 3..7 then 0..1 are the NIC's
    nic.mmio_write(e.RDT, 4, 2)
    for i in range(7):
        nic.deliver(frame_for(MAC, 64, 0x40 + i))
    assert nic.reg(e.RDH) == 2 and nic.mmio_read(e.MPC, 4) == 0
    assert ram.read(RX_BUFS + 0x800 * 1, 20)[14:] == b"\x46" * 6         # the 7th frame, in slot 1
    nic.deliver(frame_for(MAC, 64))                                     # head == tail: no room
    assert nic.mmio_read(e.MPC, 4) == 1


def test_receive_pads_short_frames_and_drops_runts_and_giants():
    nic, ram, _ = make_nic()
    program_rings(nic, ram)
    nic.deliver(MAC + PEER + b"\x08\x06")                 # 14 bytes: padded to 60
    assert rx_desc(ram, 0)[0] == 60
    nic.deliver(b"")
    nic.deliver(MAC[:5])
    assert nic.mmio_read(e.RUC, 4) == 2
    nic.deliver(frame_for(MAC, 1519))                     # over 1518 without LPE
    assert nic.mmio_read(e.ROC, 4) == 1
    nic.mmio_write(e.RCTL, 4, nic.reg(e.RCTL) | e.RCTL_LPE | 3 << e.RCTL_BSIZE_SHIFT)   # 256-byte buffers
    nic.deliver(frame_for(MAC, 1000))                      # spans 4 buffers
    lengths = [rx_desc(ram, i)[0] for i in range(1, 5)]
    assert lengths == [256, 256, 256, 232] and rx_desc(ram, 4)[2] & e.RXD_STAT_EOP
    assert not rx_desc(ram, 1)[2] & e.RXD_STAT_EOP


@pytest.mark.parametrize("dest, rctl, accepted", [
    (MAC, 0, True),
    (PEER, 0, False),
    (PEER, e.RCTL_UPE, True),
    (b"\xff" * 6, 0, False),
    (b"\xff" * 6, e.RCTL_BAM, True),
    (b"\x01\x00\x5e\x00\x00\x01", 0, False),
    (b"\x01\x00\x5e\x00\x00\x01", e.RCTL_MPE, True),
])
def test_receive_address_filters(dest, rctl, accepted):
    nic, ram, _ = make_nic()
    program_rings(nic, ram)
    nic.mmio_write(e.RCTL, 4, e.RCTL_EN | e.RCTL_SECRC | rctl)
    nic.deliver(frame_for(dest, 80))
    assert (nic.reg(e.RDH) == 1) is accepted


def test_multicast_table_and_second_exact_address():
    nic, ram, _ = make_nic()
    program_rings(nic, ram)
    group = bytes.fromhex("01005e7f0001")
    bit = ((group[5] << 8 | group[4]) >> 4) & 0xFFF         # MO = 0: address bits 47:36
    nic.mmio_write(e.MTA + 4 * (bit >> 5), 4, 1 << (bit & 31))
    nic.deliver(frame_for(group, 80))
    assert nic.reg(e.RDH) == 1
    nic.mmio_write(e.RA + 8, 4, int.from_bytes(PEER[:4], "little"))
    nic.mmio_write(e.RA + 12, 4, e.RAH_AV | int.from_bytes(PEER[4:], "little"))
    nic.deliver(frame_for(PEER, 80))
    assert nic.reg(e.RDH) == 2


def test_receive_checksum_offload_reports_good_and_bad():
    nic, ram, _ = make_nic()
    program_rings(nic, ram)
    nic.mmio_write(e.RXCSUM, 4, e.RXCSUM_TUOFL | e.RXCSUM_IPOFL)
    good = bytes(_tcp_packet(b"checked"))
    good = MAC + good[6:]
    nic.deliver(good)
    _, _, status, errors, _ = rx_desc(ram, 0)
    assert status & (e.RXD_STAT_TCPCS | e.RXD_STAT_IPCS) and not status & e.RXD_STAT_IXSM and not errors
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    nic.deliver(bytes(bad))
    assert rx_desc(ram, 1)[3] == e.RXD_ERR_TCPE
    nic.mmio_write(e.RXCSUM, 4, 0)
    nic.deliver(good)
    assert rx_desc(ram, 2)[2] & e.RXD_STAT_IXSM


def test_vlan_tag_stripped_and_inserted():
    nic, ram, wire = make_nic()
    program_rings(nic, ram)
    nic.mmio_write(e.CTRL, 4, nic.reg(e.CTRL) | e.CTRL_VME)
    tagged = MAC + PEER + b"\x81\x00\x20\x05" + b"\x08\x00" + b"z" * 60
    nic.deliver(tagged)
    length, _, status, _, special = rx_desc(ram, 0)
    assert status & e.RXD_STAT_VP and special == 0x2005 and length == len(tagged) - 4
    frame = PEER + MAC + b"\x08\x00" + b"y" * 50
    ram.write(TX_BUFS, frame)
    ram.write(TX_RING, struct.pack("<QII", TX_BUFS, len(frame) | e.TXD_CMD_EOP | e.TXD_CMD_VLE, 0x0123 << 16))
    nic.mmio_write(e.TDT, 4, 1)
    assert wire.frames[0] == PEER + MAC + b"\x81\x00\x01\x23" + frame[12:]


def test_io_bar_reaches_registers():
    nic, _, _ = make_nic()
    io = nic.io_window
    io.io_write(0, 4, e.STATUS)
    assert io.io_read(0, 4) == e.STATUS
    assert io.io_read(4, 4) == nic.mmio_read(e.STATUS, 4)
    io.io_write(0, 4, e.IMS)
    io.io_write(4, 4, e.ICR_LSC)
    assert nic.mmio_read(e.IMS, 4) == e.ICR_LSC
    assert io.io_read(8, 4) == 0


def test_ctrl_rst_resets_the_mac_not_the_phy():
    nic, ram, _ = make_nic()
    program_rings(nic, ram)
    nic.mmio_write(e.ICS, 4, e.ICR_RXT0)
    assert nic.irq_level
    nic.mmio_write(e.CTRL, 4, nic.reg(e.CTRL) | e.CTRL_RST)
    assert not nic.irq_level and nic.reg(e.RCTL) == 0 and nic.reg(e.IMS) == 0 and nic.reg(e.RDT) == 0
    assert not nic.reg(e.CTRL) & e.CTRL_RST and nic.reg(e.STATUS) & e.ST_LU
    assert nic.reg(e.RA + 4) & e.RAH_AV


# -- hostile rings -----------------------------------------------------------------------------------

class CountingRam(FakeRam):
    """Counts DMA calls; anything outside RAM is refused (DmaError) before a byte moves."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def read(self, gpa, n):
        self.calls += 1
        return super().read(gpa, n)

    def write(self, gpa, data):
        self.calls += 1
        before = bytes(self.mem)
        try:
            super().write(gpa, data)
        except DmaError:
            assert bytes(self.mem) == before
            raise


REGS = [e.RDBAL, e.RDBAH, e.RDLEN, e.RDH, e.RDT, e.TDBAL, e.TDBAH, e.TDLEN, e.TDH, e.TDT, e.RCTL, e.TCTL,
        e.IMS, e.ICS, e.ITR, e.RXCSUM, e.CTRL]
addresses = st.one_of(st.integers(0, 0x8000), st.integers(0, 0xFFFF_FFFF), st.sampled_from([0x7FF0, 0x7FFF, 0]))
ops = st.one_of(
    st.tuples(st.just("reg"), st.sampled_from(REGS), st.one_of(st.integers(0, 0xFFFF_FFFF), st.integers(0, 64),
                                                              addresses)),
    st.tuples(st.just("ram"), st.integers(0, 0x7FF0), st.binary(min_size=16, max_size=16)),
    st.tuples(st.just("desc"), st.integers(0, 15), addresses, st.integers(0, 0xFFFF_FFFF), st.integers(0, 0xFFFF_FFFF)),
    st.tuples(st.just("rx"), st.integers(0, 3000), st.sampled_from([MAC, b"\xff" * 6, PEER])),
    st.tuples(st.just("adv"), st.integers(0, 200_000)),
)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=40))
def test_hostile_rings_never_raise_or_run_away(program):
    clock = VirtualClock()
    ram = CountingRam()
    nic, _, wire = make_nic(clock, ram)
    program_rings(nic, ram)
    for op in program:
        ram.calls = 0
        if op[0] == "reg":
            nic.mmio_write(op[1], 4, op[2] & 0xFFFF_FFFF)
        elif op[0] == "ram":
            ram.mem[op[1]:op[1] + 16] = op[2]
        elif op[0] == "desc":
            base = (TX_RING if op[1] < 8 else RX_RING) + 16 * (op[1] % 8)
            ram.mem[base:base + 16] = struct.pack("<QII", op[2] & (2**64 - 1), op[3], op[4])
        elif op[0] == "rx":
            nic.deliver(op[2] + MAC + b"\x08\x00" + bytes(op[1]))
        else:
            clock.advance(op[1])
        # bounded work: one trip round a ring (at most 65536 descriptors, here far fewer
        # are readable) per doorbell or frame, never more DMA calls than that allows
        assert ram.calls <= 4 * 65536 + 16
    assert all(len(f) <= e.TX_BUFFER + 4 for f in wire.frames)
    nic.save_state()


def test_tso_with_one_byte_segments_yields_to_virtual_time():
    clock = VirtualClock()
    ram = FakeRam(0x40000)
    nic, _, wire = make_nic(clock, ram)
    program_rings(nic, ram)
    body = bytes(0x8000)
    _context(ram, 0, ipcss=14, ipcso=24, ipcse=33, tucss=34, tucso=50, tucse=0, hdr_len=54, mss=1,
             cmd=e.TXD_CMD_TCP | e.TXD_CMD_IP | e.TXD_CMD_TSE | len(body))
    _data(ram, 1, 0x10000, bytes(54) + body, e.TXD_CMD_TSE | e.TXD_CMD_EOP | e.TXD_CMD_RS, 0)
    nic.mmio_write(e.TDT, 4, 2)
    assert len(wire.frames) == 0x8000                     # one descriptor is finished...
    assert nic.reg(e.TDH) == 2
    _data(ram, 2, 0x20000, bytes(54) + body, e.TXD_CMD_TSE | e.TXD_CMD_EOP | e.TXD_CMD_RS, 0)
    _context(ram, 3, ipcss=14, ipcso=24, ipcse=33, tucss=34, tucso=50, tucse=0, hdr_len=54, mss=1,
             cmd=e.TXD_CMD_TCP | e.TXD_CMD_IP | e.TXD_CMD_TSE | len(body))
    _data(ram, 4, 0x20000, bytes(54) + body, e.TXD_CMD_TSE | e.TXD_CMD_EOP | e.TXD_CMD_RS, 0)
    nic.mmio_write(e.TDT, 4, 5)
    assert nic.reg(e.TDH) == 3                            # ...then the budget ran out: the rest waits
    clock.advance(e.TX_RESUME_TICKS)
    assert nic.reg(e.TDH) == 5


def test_dma_outside_ram_is_a_master_abort_not_a_crash():
    nic, ram, wire = make_nic()
    program_rings(nic, ram)
    ram.write(RX_RING, struct.pack("<Q", 0xFFFF_0000))    # a receive buffer outside RAM
    nic.deliver(frame_for(MAC, 100))
    assert rx_desc(ram, 0)[3] == e.RXD_ERR_RXE and nic.config_read(STATUS, 2) & 0x2000
    nic.config_write(STATUS, 2, 0x2000)                   # write 1 to clear
    assert not nic.config_read(STATUS, 2) & 0x2000
    nic.mmio_write(e.TDBAL, 4, 0xFFFF_F000)                # a transmit ring outside RAM
    nic.mmio_write(e.TDT, 4, 1)
    assert wire.frames == [] and nic.reg(e.TDH) == 0 and nic.dma_errors == 2


# -- the boundary: frames enter through the machine's input channel -----------------------------

def test_frames_cross_the_boundary_and_replay_without_a_wire():
    from replay.boundary import RecordingBoundary, ReplayBoundary

    def build(boundary):
        clock = VirtualClock()
        m = ClockMachine(clock)
        boundary.bind(m)
        hub = NetInput(clock, lambda: boundary)
        boundary.attach("net", hub.source)
        wire = Recorder()
        port = hub.add_port("e1000.3", wire)
        nic, ram, _ = make_nic(clock, wire=port)
        port.nic = nic
        program_rings(nic, ram)
        return clock, hub, port, nic, ram

    events = []
    clock, _hub, port, nic, ram = build(RecordingBoundary(events.append))
    frames = [frame_for(MAC, 60 + i, i) for i in range(12)]
    for f in frames[:4]:
        port.deliver(f)                                   # the wire delivers at host time...
    assert nic.reg(e.RDH) == 0
    clock.advance(2_000_000)
    for f in frames[4:]:
        port.deliver(f)
    clock.advance(2_000_000)
    # ...and the NIC takes them at virtual time, as many as it has descriptors for (7)
    assert nic.reg(e.RDH) == 7 and len(port.queue) == 5
    assert [decode_net_frame(ev.payload)[::2] for ev in events] == [("e1000.3", f) for f in frames[:7]]
    recorded_ram = bytes(ram.mem)

    pos = [0]

    def peek():
        return events[pos[0]] if pos[0] < len(events) else None

    def take():
        pos[0] += 1
        return events[pos[0] - 1]
    clock2, _hub2, _port2, nic2, ram2 = build(ReplayBoundary(peek, take))
    clock2.advance(4_000_000)
    assert pos[0] == len(events) and bytes(ram2.mem) == recorded_ram and nic2.reg(e.RDH) == 7


class HaltedMachine(ClockMachine):
    """A guest that retires no instructions: every poll happens at one icount."""

    @property
    def icount(self):
        return 5


def test_a_halted_guest_gets_its_frame_at_the_recorded_time_not_the_first_poll():
    """Polls of an idle guest share an icount; the replay must not hand over a frame at the
    first of them when it arrived at a later one (the payload's time tells them apart)."""
    from replay.boundary import RecordingBoundary, ReplayBoundary

    def build(boundary):
        clock = VirtualClock()
        boundary.bind(HaltedMachine(clock))
        hub = NetInput(clock, lambda: boundary)
        boundary.attach("net", hub.source)
        port = hub.add_port("e1000.3", Recorder())
        nic, ram, _ = make_nic(clock, wire=port)
        port.nic = nic
        program_rings(nic, ram)
        seen = []
        nic.deliver = lambda f, d=nic.deliver: (seen.append(clock.now()), d(f))
        return clock, port, seen

    events = []
    clock, port, seen = build(RecordingBoundary(events.append))
    clock.advance(5_000_000)                              # five idle polls find nothing
    port.deliver(frame_for(MAC, 80))
    clock.advance(2_000_000)
    assert len(seen) == 1 and seen[0] > 5_000_000 and events[0].icount == 5
    pos = [0]
    clock2, _, seen2 = build(ReplayBoundary(lambda: events[pos[0]] if pos[0] < len(events) else None,
                                            lambda: (pos.__setitem__(0, pos[0] + 1), events[pos[0] - 1])[1]))
    clock2.advance(7_000_000)
    assert seen2 == seen


def test_host_queue_is_bounded_and_counts_drops():
    clock = VirtualClock()
    hub = NetInput(clock, lambda: None)
    port = hub.add_port("nic", None)
    for _ in range(port.max_frames + 10):
        port.deliver(b"\0" * 100)
    assert len(port.queue) == port.max_frames and port.host_drops == 10
    port.deliver(b"\0" * (1 << 17))
    assert port.host_drops == 11
    assert hub.source() == b""                            # no NIC can take it: nothing crosses


def test_net_frame_payload_layout():
    payload = b"\x07\x00e1000.3" + (0x1234).to_bytes(8, "little") + b"\x01\x02"
    assert encode_net_frame("e1000.3", b"\x01\x02", 0x1234) == payload
    assert decode_net_frame(payload) == ("e1000.3", 0x1234, b"\x01\x02")
    for bad in (b"", b"\x01", b"\x09\x00abc", b"\x02\x00\xff\xfe" + bytes(8), b"\x01\x00a" + bytes(7)):
        with pytest.raises(ValueError):
            decode_net_frame(bad)
