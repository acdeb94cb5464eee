"""Conformance rig for the e1000 (devices/net/e1000.py), loaded by tests/devices/test_conformance.py.

Guest memory is a small fake RAM that is also a peer (saved and restored with
the device), so what the rings wrote is part of what a restored rig must
reproduce.  Host operations play the guest driver and the wire: program the
rings as Linux's e1000 driver does, queue a transmit descriptor and ring the
doorbell, hand the NIC a frame, touch the PHY through MDIC; every frame the
NIC sends is logged with its tick.

``Rig`` comes from the conformance module, which imports this file while it is
itself being imported, so it is looked up when a rig is built.
"""
from __future__ import annotations

import struct
from typing import Any

from devices.bus import IoBus, MmioBus
from devices.clock import VirtualClock
from devices.net import e1000 as e
from devices.net.e1000 import E1000
from devices.pci.function import COMMAND
from tests.devices.rigs_fw_cfg import FakeRam as _FwCfgRam
from tests.devices.rigs_timers import _rig

RAM_SIZE = 0x8000
RX_RING, TX_RING = 0x0000, 0x0100      # 8 descriptors each
RX_BUFS, TX_BUFS = 0x1000, 0x5000      # 2 KiB per receive buffer, 1 KiB per transmit buffer
RING = 8
MAC = bytes.fromhex("525400abcdef")


class FakeRam(_FwCfgRam):
    """Guest RAM at 0..size behind the ``Dma`` protocol (fw_cfg's rig RAM): anything else raises
    DmaError before a byte moves; counts the refusals.  A peer of the rig."""

    def __init__(self, size: int = RAM_SIZE) -> None:
        super().__init__(size)
        self.refused = 0

    def _check(self, gpa: int, n: int) -> None:
        if gpa < 0 or n < 0 or gpa + n > len(self.mem):
            self.refused += 1
        super()._check(gpa, n)


class Recorder:
    """A wire that keeps what the NIC sends."""

    def __init__(self, log: Any = None) -> None:
        self.frames: list[bytes] = []
        self.log = log

    def send(self, frame: bytes) -> None:
        self.frames.append(bytes(frame))
        if self.log is not None:
            self.log(frame)


def make_nic(clock: VirtualClock | None = None, ram: FakeRam | None = None, wire: Any = None,
             mac: bytes = MAC) -> tuple[E1000, FakeRam, Any]:
    """A NIC on its own buses with bus mastering on (as a driver leaves it)."""
    clock = clock or VirtualClock()
    ram = ram or FakeRam()
    wire = wire if wire is not None else Recorder()
    nic = E1000(clock, ram, wire, mac, io_bus=IoBus(), mmio_bus=MmioBus())
    nic.config_write(COMMAND, 2, 0x0007)
    return nic, ram, wire


def program_rings(nic: E1000, ram: FakeRam, rx_free: int = RING - 1) -> None:
    """What Linux's e1000_configure_rx/tx and e1000_alloc_rx_buffers leave."""
    w = nic.mmio_write
    for i in range(RING):
        ram.write(RX_RING + 16 * i, struct.pack("<QQ", RX_BUFS + 0x800 * i, 0))
    w(e.RDBAL, 4, RX_RING)
    w(e.RDBAH, 4, 0)
    w(e.RDLEN, 4, 16 * RING)
    w(e.RDH, 4, 0)
    w(e.RDT, 4, rx_free)
    w(e.TDBAL, 4, TX_RING)
    w(e.TDBAH, 4, 0)
    w(e.TDLEN, 4, 16 * RING)
    w(e.TDH, 4, 0)
    w(e.TDT, 4, 0)
    w(e.RCTL, 4, e.RCTL_EN | e.RCTL_BAM | e.RCTL_SECRC)
    w(e.TCTL, 4, e.TCTL_EN | e.TCTL_PSP)
    w(e.IMS, 4, e.ICR_TXDW | e.ICR_RXT0 | e.ICR_LSC | e.ICR_RXO | e.ICR_RXDMT0)


def queue_tx(nic: E1000, ram: FakeRam, frame: bytes, cmd: int = e.TXD_CMD_EOP | e.TXD_CMD_RS | e.TXD_CMD_IFCS,
             ring_doorbell: bool = True) -> None:
    """A legacy descriptor for ``frame`` at the tail, then the doorbell (TDT)."""
    tail = nic.reg(e.TDT)
    buf = TX_BUFS + 0x400 * (tail % RING)
    frame = frame[:0x400]
    ram.write(buf, frame)
    ram.write(TX_RING + 16 * (tail % RING), struct.pack("<QII", buf, len(frame) | cmd, 0))
    if ring_doorbell:
        nic.mmio_write(e.TDT, 4, (tail + 1) % RING)


def frame_for(dest: bytes, n: int, fill: int = 0x5A) -> bytes:
    return dest + MAC + b"\x08\x00" + bytes([fill & 0xFF]) * max(0, n - 14)


def rig_e1000(clock: VirtualClock) -> Any:
    r = _rig(clock, mmio=e.MMIO_SIZE)
    log = r.record("tx")
    ram = FakeRam()
    nic, _, _ = make_nic(clock, ram, Recorder(lambda f: log(f.hex())))
    r.dev = nic
    r.peers = [ram]
    r.lines["intx"] = nic.intx
    nic.intx.connect(lambda level: r.log.append((clock.now(), "intx", level)))
    program_rings(nic, ram)

    def rx(n: int, b: int) -> None:
        dest = (MAC, b"\xff" * 6, b"\x01\x00\x5e\x00\x00\x01", b"\x02" * 6)[n % 4]
        nic.deliver(frame_for(dest, (b * 7) % 1600, b))

    def tx(n: int, b: int) -> None:
        queue_tx(nic, ram, frame_for(b"\xff" * 6, 14 + b * 5, n), ring_doorbell=bool(n & 1))
        if not n & 1:
            nic.mmio_write(e.TDT, 4, (nic.reg(e.TDT) + 1) % RING)

    def refill(n: int, b: int) -> None:
        nic.mmio_write(e.RDT, 4, (nic.reg(e.RDH) + RING - 1 - n % 3) % RING)

    def mdic(n: int, b: int) -> None:
        reg = (e.BMCR, e.BMSR, e.PHYID1, e.ANAR, 7)[n % 5]
        op = e.MDIC_OP_WRITE if b & 1 else e.MDIC_OP_READ
        data = e.BMCR_AUTOEN | e.BMCR_ANRESTART if reg == e.BMCR else b
        nic.mmio_write(e.MDIC, 4, op | e.PHY_ADDRESS << 21 | reg << 16 | data | (e.MDIC_INT_EN if n & 8 else 0))

    def ack(n: int, b: int) -> None:
        r.log.append((clock.now(), "icr", nic.mmio_read(e.ICR, 4)))

    r.host_ops = {"rx": rx, "tx": tx, "refill": refill, "mdic": mdic, "ack": ack}
    r.log.clear()
    return r


RIGS = {"e1000": rig_e1000}
CLASS_OF = {"e1000": E1000}
