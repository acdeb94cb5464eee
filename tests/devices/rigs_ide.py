"""Conformance rig for the PIIX3 IDE controller (devices/storage/ide.py), loaded by test_conformance.py.

The controller gets a small RAM behind the ``Dma`` protocol and bytearray
disks, saved and restored with it as peers (a disk's contents are the
image's, not the device's).  Primary channel: a 64-sector disk and a CD-ROM
of eight 2048-byte sectors; secondary: a 40-sector disk and no device 1.
The rig's own I/O bus carries BAR4, programmed as firmware leaves it.

Host operations do what a guest needs many port writes for: issue a whole
command with its registers ("cmd"), send a packet ("packet"), lay out a PRD
table, some of it outside RAM ("prd"), start or stop a bus master ("bm"),
and flip bus mastering in the PCI command register ("master").
"""
from __future__ import annotations

from typing import Any

from devices.base import DeviceStateError
from devices.bus import IoBus
from devices.clock import VirtualClock
from devices.pci.function import COMMAND
from devices.storage.ide import IdeFunction
from tests.devices.rigs_fw_cfg import FakeRam
from tests.devices.rigs_pci import _rig_class

RAM_SIZE = 0x10000
BMDMA = 0xC000


class RamDisk:
    """A block object over a bytearray: the duck type the drives take (read, write, flush,
    size), refusing accesses outside it as the image layer does."""

    def __init__(self, size: int, seed: int = 0, writable: bool = True) -> None:
        self.data = bytearray((seed + i * 7) & 0xFF for i in range(size))
        self.size = size
        self.writable = writable
        self.flushes = 0

    def _check(self, offset: int, n: int) -> None:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise ValueError(f"access {offset:#x}+{n:#x} outside the {self.size:#x}-byte disk")

    def read(self, offset: int, n: int) -> bytes:
        self._check(offset, n)
        return bytes(self.data[offset:offset + n])

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        if not self.writable:
            raise ValueError("read-only disk")
        self.data[offset:offset + len(data)] = data

    def flush(self) -> None:
        self.flushes += 1

    def sha256(self) -> str:
        import hashlib
        return hashlib.sha256(self.data).hexdigest()

    def save_state(self) -> dict[str, Any]:
        return {"kind": "ram-disk", "version": 1, "data": bytes(self.data), "flushes": self.flushes}

    def load_state(self, state: dict[str, Any]) -> None:
        data = state.get("data") if isinstance(state, dict) else None
        if not isinstance(data, bytes) or len(data) != self.size:
            raise DeviceStateError("ram-disk: wrong size")
        self.data[:] = data
        self.flushes = state["flushes"]


# commands the "cmd" operation issues: (command, device register, count, lba, features)
COMMANDS = (
    (0xEC, 0xA0, 0, 0, 0), (0xA1, 0xB0, 0, 0, 0), (0x20, 0xE0, 3, 5, 0), (0x24, 0x40, 2, 60, 0),
    (0x30, 0xE0, 2, 9, 0), (0xC4, 0xE0, 20, 1, 0), (0xC5, 0xE0, 17, 0, 0), (0xC8, 0xE0, 4, 2, 0),
    (0xCA, 0xE0, 2, 30, 0), (0x25, 0x40, 1, 63, 0), (0xE7, 0xA0, 0, 0, 0), (0xEF, 0xA0, 0x22, 0, 3),
    (0xC6, 0xA0, 4, 0, 0), (0x91, 0xA3, 17, 0, 0), (0x90, 0xA0, 0, 0, 0), (0xA0, 0xB0, 0, 0x0800, 0),
    (0xA0, 0xB0, 0, 0x0200, 1), (0x20, 0xA0, 2, 0x0101, 0), (0xE5, 0xA0, 0, 0, 0), (0x08, 0xB0, 0, 0, 0),
    (0x20, 0xE0, 1, 70, 0), (0x55, 0xA0, 0, 0, 0),
)
# packets the "packet" operation sends (after a PACKET command)
PACKETS = (
    bytes((0x12, 0, 0, 0, 36, 0, 0, 0, 0, 0, 0, 0)), bytes((0x25,) + (0,) * 11),
    bytes((0x28, 0, 0, 0, 0, 2, 0, 0, 3, 0, 0, 0)), bytes((0x03, 0, 0, 0, 18, 0, 0, 0, 0, 0, 0, 0)),
    bytes((0x28, 0, 0, 0, 0, 7, 0, 0, 9, 0, 0, 0)), bytes((0x43, 2, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0)),
    bytes((0x46, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0, 0)), bytes((0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8, 0, 0, 0)),
    bytes((0x5A, 0, 0x3F, 0, 0, 0, 0, 0, 96, 0, 0, 0)), bytes((0x1B, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0)),
    bytes((0x1B, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0)), bytes((0x1E, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0)),
    bytes((0x00,) * 12), bytes((0xFF,) * 12),
)


def rig_ide(clock: VirtualClock) -> Any:
    r = _rig_class()(clock, None)
    io = IoBus()
    ram = FakeRam(RAM_SIZE)
    disks = [RamDisk(64 * 512, 1), RamDisk(8 * 2048, 2, writable=False), RamDisk(40 * 512, 3)]
    drives = {(0, 0): ("disk", disks[0]), (0, 1): ("cdrom", disks[1]), (1, 0): ("disk", disks[2])}
    ide = IdeFunction(clock, ram, (r.line("irq14"), r.line("irq15")), drives, io)
    ide.program_like_firmware(BMDMA)
    r.dev = ide
    r.peers = [ram, *disks]
    ports = ((0x1F0, 0x3F6), (0x170, 0x376))

    def cmd(n: int, b: int) -> None:
        ch = n & 1
        base, _ = ports[ch]
        op, dev, count, lba, feature = COMMANDS[(n >> 1) % len(COMMANDS)]
        ide.io_write(base + 6, 1, dev)
        ide.io_write(base + 1, 1, feature)
        for reg, v in ((2, count >> 8), (3, lba >> 24), (4, 0), (5, 0), (2, count), (3, lba),
                       (4, lba >> 8), (5, lba >> 16)):
            ide.io_write(base + reg, 1, v & 0xFF)
        ide.io_write(base + 7, 1, op)
        r.log.append((clock.now(), "status", ch, ide.io_read(base + 7, 1)))

    def packet(n: int, b: int) -> None:
        p = PACKETS[n % len(PACKETS)]
        for i in range(0, 12, 2):
            ide.io_write(0x1F0, 2, int.from_bytes(p[i:i + 2], "little"))

    def drain(n: int, b: int) -> None:
        """Read (or write ``b``) the data port the way a driver moves a block."""
        base = ports[n & 1][0]
        words = 4 << (n >> 1 & 7)
        for _ in range(words):
            if n & 16:
                ide.io_write(base, 2, b * 0x0101)
            else:
                r.log.append((clock.now(), "data", ide.io_read(base, 4)))

    def prd(n: int, b: int) -> None:
        """A PRD table at 0x100 * (n % 8) for channel n >> 3 & 1: regions at 0x4000 * (b % 4)
        (the last one reaching outside RAM when b & 0x80), EOT unless b & 0x40."""
        table = 0x100 * (n % 8)
        count = 1 + (b >> 2 & 3)
        for i in range(count):
            addr = 0x4000 * ((b + i) % 4) + (0x10000 if b & 0x80 and i == count - 1 else 0)
            size = (0x200 << (b >> 4 & 3)) & 0xFFFE
            last = i == count - 1 and not b & 0x40
            ram.write_u32(table + 8 * i, addr)
            ram.write_u32(table + 8 * i + 4, size | (0x8000_0000 if last else 0))
        io.write(BMDMA + 8 * (n >> 3 & 1) + 4, 4, table)

    def bm(n: int, b: int) -> None:
        io.write(BMDMA + 8 * (n & 1) + (0 if n & 2 else 2), 1, b)
        r.log.append((clock.now(), "bm", n & 1, io.read(BMDMA + 8 * (n & 1), 4)))

    def master(n: int, b: int) -> None:
        ide.config_write(COMMAND, 2, 0x0001 | (0x0004 if b & 1 else 0))

    r.host_ops = {"cmd": cmd, "packet": packet, "drain": drain, "prd": prd, "bm": bm, "master": master}
    return r


RIGS = {"ide": rig_ide}
CLASS_OF = {"ide": IdeFunction}
