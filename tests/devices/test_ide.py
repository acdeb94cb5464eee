"""The PIIX3 IDE controller at register level: ATA disks, the ATAPI CD-ROM, bus-master DMA.

Everything goes through an IoBus as a guest driver would (the legacy ports and
BAR4), with bytearray-backed disks and a small RAM behind the ``Dma``
protocol; time moves only when a test advances the clock.
"""
from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.base import DmaError, IrqLine
from devices.bus import IoBus
from devices.clock import VirtualClock
from devices.pci.function import COMMAND
from devices.storage.ata import CMD_TICKS, SECTOR_TICKS
from devices.storage.ide import RESET_TICKS, IdeFunction
from tests.devices.rigs_ide import RamDisk

RAM = 1 << 20
BM = 0xC000
P = 0x1F0           # primary command block
CTL = 0x3F6
S = 0x170
BSY, DRDY, DRQ, ERR = 0x80, 0x40, 0x08, 0x01
ABRT, IDNF, UNC = 0x04, 0x10, 0x40
HYP = settings(max_examples=60, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Ram:
    """Guest RAM at [0, size) that records every access; anything outside raises DmaError
    before a byte moves, as the machine's DmaView does.  ``check`` is offered like
    DmaView's unless ``checks`` is False."""

    def __init__(self, size: int = RAM, checks: bool = True) -> None:
        self.mem = bytearray(size)
        self.writes: list[tuple[int, int]] = []
        self.refused = 0
        if checks:
            self.check = self._check

    def _check(self, gpa: int, n: int, write: bool = False) -> bool:
        return 0 <= gpa and n >= 0 and gpa + n <= len(self.mem)

    def _ok(self, gpa: int, n: int) -> None:
        if not self._check(gpa, n):
            self.refused += 1
            raise DmaError(gpa, n, "outside RAM")

    def read(self, gpa: int, n: int) -> bytes:
        self._ok(gpa, n)
        return bytes(self.mem[gpa:gpa + n])

    def write(self, gpa: int, data: bytes) -> None:
        self._ok(gpa, len(data))
        self.writes.append((gpa, len(data)))
        self.mem[gpa:gpa + len(data)] = data

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def write_u32(self, gpa: int, v: int) -> None:
        self.write(gpa, v.to_bytes(4, "little"))


class SectorDisk:
    """A huge disk without the bytes: sector n reads as n (8 bytes LE) repeated; writes
    are kept by sector."""

    def __init__(self, sectors: int) -> None:
        self.size = sectors * 512
        self.written: dict[int, bytes] = {}

    def read(self, offset: int, n: int) -> bytes:
        assert offset % 512 == 0 and n % 512 == 0 and offset + n <= self.size
        return b"".join(self.written.get(s, s.to_bytes(8, "little") * 64)
                        for s in range(offset // 512, (offset + n) // 512))

    def write(self, offset: int, data: bytes) -> None:
        for i in range(len(data) // 512):
            self.written[offset // 512 + i] = data[512 * i:512 * i + 512]

    def flush(self) -> None:
        pass


class FailingDisk(RamDisk):
    def flush(self) -> None:
        raise OSError("disk gone")

    def read(self, offset: int, n: int) -> bytes:
        if offset >= 512 * 8:
            raise OSError("bad sector")
        return super().read(offset, n)


class Ide:
    """A controller on its own bus with a disk and a CD on the primary channel and a disk
    on the secondary, set up as firmware leaves it."""

    def __init__(self, drives: dict | None = None, ram: Ram | None = None) -> None:
        self.clock = VirtualClock()
        self.io = IoBus()
        self.ram = ram or Ram()
        self.disk = RamDisk(1024 * 512, 1)
        self.cd = RamDisk(16 * 2048, 2, writable=False)
        self.disk2 = RamDisk(64 * 512, 3)
        if drives is None:
            drives = {(0, 0): ("disk", self.disk), (0, 1): ("cdrom", self.cd), (1, 0): ("disk", self.disk2)}
        self.irq = (IrqLine("irq14"), IrqLine("irq15"))
        self.dev = IdeFunction(self.clock, self.ram, self.irq, drives, self.io)
        for base, n in self.dev.io_ranges:
            self.io.register(self.dev, base, n)
        self.dev.program_like_firmware(BM)

    # port access
    def outb(self, port: int, v: int) -> None:
        self.io.write(port, 1, v)

    def inb(self, port: int) -> int:
        return self.io.read(port, 1)

    def status(self, base: int = P) -> int:
        return self.inb(base + 7)

    def alt(self, base: int = P) -> int:
        return self.inb(CTL if base == P else 0x376)

    def wait(self, base: int = P, limit: int = 10_000_000) -> int:
        """Advance the clock until BSY clears (as a driver polls the alternate status)."""
        end = self.clock.now() + limit
        while self.alt(base) & BSY:
            nd = self.clock.next_deadline()
            assert nd is not None and nd <= end, "the drive stays busy"
            self.clock.advance_to(nd)
        return self.alt(base)

    def regs(self, base: int = P, dev: int = 0xE0, count: int = 1, lba: int = 0, feature: int = 0) -> None:
        self.outb(base + 6, dev | (lba >> 24 & 0x0F if dev & 0x40 else 0))
        self.outb(base + 1, feature)
        self.outb(base + 2, count & 0xFF)
        self.outb(base + 3, lba & 0xFF)
        self.outb(base + 4, lba >> 8 & 0xFF)
        self.outb(base + 5, lba >> 16 & 0xFF)

    def regs48(self, base: int = P, dev: int = 0x40, count: int = 1, lba: int = 0) -> None:
        self.outb(base + 6, dev)
        for reg, v in ((2, count >> 8), (3, lba >> 24), (4, lba >> 32), (5, lba >> 40),
                       (2, count), (3, lba), (4, lba >> 8), (5, lba >> 16)):
            self.outb(base + reg, v & 0xFF)

    def cmd(self, op: int, base: int = P) -> None:
        self.outb(base + 7, op)

    def read_data(self, n: int, base: int = P, width: int = 2) -> bytes:
        return b"".join(self.io.read(base, width).to_bytes(width, "little") for _ in range(n // width))

    def write_data(self, data: bytes, base: int = P, width: int = 2) -> None:
        for i in range(0, len(data), width):
            self.io.write(base, width, int.from_bytes(data[i:i + width], "little"))

    def pio_in(self, blocks: list[int], base: int = P) -> bytes:
        """Read blocks of the given sizes, each after its interrupt."""
        out = b""
        for size in blocks:
            edges = self.irq[base != P].edges
            st_ = self.wait(base)
            assert st_ & DRQ, f"status {st_:#x}: no data"
            assert self.irq[base != P].edges == edges + 1, "one interrupt per DRQ block"
            self.status(base)
            out += self.read_data(size, base, 4 if size % 4 == 0 else 2)
        return out

    def identify(self, base: int = P, dev: int = 0xA0, op: int = 0xEC) -> list[int]:
        self.outb(base + 6, dev)
        self.cmd(op, base)
        assert self.wait(base) & DRQ
        self.status(base)
        data = self.read_data(512, base)
        return [int.from_bytes(data[2 * i:2 * i + 2], "little") for i in range(256)]

    def prd(self, table: int, entries: list[tuple[int, int, bool]], channel: int = 0) -> None:
        for i, (addr, size, eot) in enumerate(entries):
            self.ram.write_u32(table + 8 * i, addr)
            self.ram.write_u32(table + 8 * i + 4, (size & 0xFFFF) | (0x8000_0000 if eot else 0))
        self.io.write(BM + 8 * channel + 4, 4, table)

    def bm_status(self, channel: int = 0) -> int:
        return self.inb(BM + 8 * channel + 2)

    def bm_start(self, to_memory: bool, channel: int = 0) -> None:
        base = BM + 8 * channel
        self.outb(base + 2, 0x06)                       # clear interrupt and error
        self.outb(base, 0x08 if to_memory else 0)
        self.outb(base, 0x09 if to_memory else 0x01)

    def bm_stop(self, channel: int = 0) -> None:
        self.outb(BM + 8 * channel, 0)


def _advance_all(h: Ide) -> None:
    while h.clock.next_deadline() is not None:
        h.clock.advance_to(h.clock.next_deadline())


def ident_string(words: list[int], first: int, n: int) -> str:
    return b"".join(w.to_bytes(2, "big") for w in words[first:first + n // 2]).decode().rstrip()


def sector_bytes(disk: RamDisk, lba: int, n: int = 1, size: int = 512) -> bytes:
    return bytes(disk.data[lba * size:(lba + n) * size])


# ---------------------------------------------------------------------------------------------
# identity, IDENTIFY

def test_pci_identity_and_firmware_setup():
    h = Ide()
    f = h.dev
    assert f.config_read(0, 4) == 0x7010_8086
    assert f.config_read(0x08, 4) == 0x0101_8000          # class 01 01 80, revision 0
    assert f.config_read(0x3D, 1) == 0                     # no interrupt pin: legacy IRQs
    assert f.config_read(0x40, 2) == 0x8000 and f.config_read(0x42, 2) == 0x8000
    assert f.bar_address(4) == BM
    f.config_write(0x20, 4, 0xFFFF_FFFF)
    assert f.config_read(0x20, 4) == 0xFFFF_FFF1           # 16 bytes of I/O
    f.reset()
    assert f.config_read(COMMAND, 2) == 0 and f.config_read(0x40, 2) == 0


def test_identify_device_fields():
    h = Ide()
    w = h.identify()
    assert w[0] == 0x0040
    assert ident_string(w, 27, 40) == "VMM HARDDISK"
    assert ident_string(w, 10, 20) == "VMM00"
    assert ident_string(w, 23, 8) == "1.0"
    assert w[47] == 0x8010 and w[59] == 0x0110             # READ/WRITE MULTIPLE up to 16, on
    assert w[49] & 0x0300 == 0x0300                         # LBA and DMA
    assert w[60] | w[61] << 16 == 1024                      # LBA28 capacity
    assert w[83] & (1 << 10) and w[86] & (1 << 10)          # 48-bit addressing
    assert w[83] & (1 << 13) and w[83] & (1 << 12)          # FLUSH CACHE (EXT)
    assert w[100] | w[101] << 16 | w[102] << 32 | w[103] << 48 == 1024
    assert w[1] == 1 and w[3] == 16 and w[6] == 63          # default translation
    assert w[63] == 0x0007 and w[85] & (1 << 5)
    data = b"".join(x.to_bytes(2, "little") for x in w)
    assert data[510] == 0xA5 and sum(data) % 256 == 0       # integrity word
    assert h.status() == DRDY | 0x10                        # the block is gone: DRQ clear


def test_identify_capacity_above_lba28():
    big = SectorDisk((1 << 28) + 5)
    h = Ide({(0, 0): ("disk", big)})
    w = h.identify()
    assert w[60] | w[61] << 16 == 0x0FFF_FFFF
    assert w[100] | w[101] << 16 | w[102] << 32 == (1 << 28) + 5
    assert w[1] == 16383                                    # cylinders capped


# ---------------------------------------------------------------------------------------------
# PIO

def test_pio_read_lba28_and_interrupt_per_sector():
    h = Ide()
    h.regs(count=3, lba=5)
    edges = h.irq[0].edges
    h.cmd(0x20)
    assert h.alt() & BSY
    data = h.pio_in([512, 512, 512])
    assert data == sector_bytes(h.disk, 5, 3)
    assert h.irq[0].edges == edges + 3
    assert h.status() == DRDY | 0x10
    assert h.inb(P + 3) == 8                                # the address registers moved on


def test_pio_read_count_zero_means_256():
    h = Ide()
    h.regs(count=0, lba=10)
    h.cmd(0x20)
    data = h.pio_in([512] * 256)
    assert data == sector_bytes(h.disk, 10, 256)
    assert not h.alt() & DRQ


def test_pio_read_at_the_end_of_the_disk():
    h = Ide()
    h.regs(count=1, lba=1023)
    h.cmd(0x20)
    assert h.pio_in([512]) == sector_bytes(h.disk, 1023)
    h.regs(count=2, lba=1023)
    h.cmd(0x20)
    assert h.wait() == DRDY | ERR
    assert h.inb(P + 1) == IDNF


def test_lba28_top_sector_and_lba48_above_it():
    big = SectorDisk((1 << 28) + 5)
    h = Ide({(0, 0): ("disk", big)})
    h.regs(count=1, lba=0x0FFF_FFFF)
    h.cmd(0x20)
    assert h.pio_in([512])[:8] == (0x0FFF_FFFF).to_bytes(8, "little")
    h.regs48(count=2, lba=1 << 28)
    h.cmd(0x24)                                              # READ SECTORS EXT
    data = h.pio_in([512, 512])
    assert data[:8] == (1 << 28).to_bytes(8, "little") and data[512:520] == ((1 << 28) + 1).to_bytes(8, "little")
    h.regs48(count=2, lba=(1 << 28) + 4)                     # the last sector and one past it
    h.cmd(0x24)
    assert h.wait() & ERR and h.inb(P + 1) == IDNF


def test_lba48_count_zero_is_65536_and_hob_reads_back():
    big = SectorDisk(1 << 20)
    h = Ide({(0, 0): ("disk", big)})
    h.regs48(count=0, lba=(1 << 20) - 0x10000)
    h.cmd(0x42)                                              # READ VERIFY EXT: 65536 sectors fit exactly
    assert h.wait() == DRDY | 0x10
    h.regs48(count=0, lba=(1 << 20) - 0xFFFF)
    h.cmd(0x42)
    assert h.wait() & ERR and h.inb(P + 1) == IDNF
    h.regs48(count=0x1234, lba=0x0000_5566_7788)
    h.outb(CTL, 0x80)                                        # HOB: the previous contents
    assert [h.inb(P + r) for r in (2, 3, 4, 5)] == [0x12, 0x55, 0x00, 0x00]
    h.outb(CTL, 0x00)
    assert [h.inb(P + r) for r in (2, 3, 4, 5)] == [0x34, 0x88, 0x77, 0x66]


def test_pio_write_and_read_back_lba48():
    h = Ide()
    payload = bytes(range(256)) * 4
    h.regs48(count=2, lba=700)
    h.cmd(0x34)                                              # WRITE SECTORS EXT: DRQ at once
    assert h.alt() & DRQ and not h.alt() & BSY
    h.write_data(payload[:512], width=4)
    assert h.alt() & BSY
    assert h.wait() & DRQ
    h.write_data(payload[512:])
    assert h.wait() == DRDY | 0x10
    assert sector_bytes(h.disk, 700, 2) == payload
    h.regs48(count=2, lba=700)
    h.cmd(0x24)
    assert h.pio_in([512, 512]) == payload


def test_write_past_the_end_and_to_a_read_only_disk_abort():
    h = Ide()
    h.regs(count=2, lba=1023)
    h.cmd(0x30)
    h.write_data(bytes(512))                                 # the last sector: written
    assert h.wait() & DRQ
    h.write_data(bytes(512))                                 # one past it: checked as it arrives (QEMU)
    assert h.wait() & ERR and h.inb(P + 1) == IDNF
    assert sector_bytes(h.disk, 1023) == bytes(512) and len(h.disk.data) == 1024 * 512
    ro = RamDisk(64 * 512, writable=False)
    h = Ide({(0, 0): ("disk", ro)})
    h.regs(count=1, lba=0)
    h.cmd(0xCA)                                              # WRITE DMA
    assert h.wait() & ERR and h.inb(P + 1) == ABRT


def test_chs_addressing_and_initialize_device_parameters():
    h = Ide()
    h.regs(dev=0xA1, count=1, lba=0)                         # CHS 0/1/1 with 16 heads x 63
    h.outb(P + 3, 1)
    h.cmd(0x20)
    assert h.pio_in([512]) == sector_bytes(h.disk, 63)
    h.regs(dev=0xA3, count=17)                               # 4 heads, 17 sectors per track
    h.cmd(0x91)
    assert h.wait() == DRDY | 0x10
    h.regs(dev=0xA1, count=1)
    h.outb(P + 3, 2)                                         # C/H/S 0/1/2 = 17 + 1
    h.cmd(0x20)
    assert h.pio_in([512]) == sector_bytes(h.disk, 18)
    w = h.identify()
    assert (w[54], w[55], w[56]) == (1024 // 68, 4, 17)
    h.regs(dev=0xA0, count=1)
    h.outb(P + 3, 0)                                         # sector 0 does not exist
    h.cmd(0x20)
    assert h.wait() & ERR and h.inb(P + 1) == IDNF


def test_read_and_write_multiple():
    h = Ide()
    h.regs(count=4)
    h.cmd(0xC6)                                              # SET MULTIPLE 4
    assert h.wait() == DRDY | 0x10
    assert h.identify()[59] == 0x0104
    h.regs(count=10, lba=3)
    edges = h.irq[0].edges
    h.cmd(0xC4)
    assert h.pio_in([2048, 2048, 1024]) == sector_bytes(h.disk, 3, 10)
    assert h.irq[0].edges == edges + 3
    payload = bytes((i * 13) & 0xFF for i in range(9 * 512))
    h.regs(count=9, lba=40)
    h.cmd(0xC5)
    for size in (2048, 2048, 512):
        assert h.wait() & DRQ
        h.write_data(payload[:size])
        payload_done = payload[:size]
        payload = payload[size:]
        assert payload_done
    assert h.wait() == DRDY | 0x10
    assert sector_bytes(h.disk, 40, 9) == bytes((i * 13) & 0xFF for i in range(9 * 512))
    for bad in (3, 32):
        h.regs(count=bad)
        h.cmd(0xC6)
        assert h.wait() & ERR and h.inb(P + 1) == ABRT
    h.regs(count=0)
    h.cmd(0xC6)                                              # multiple mode off
    assert h.wait() == DRDY | 0x10
    h.regs(count=2)
    h.cmd(0xC4)
    assert h.wait() & ERR and h.inb(P + 1) == ABRT


def test_odd_width_accesses_pad_and_split():
    h = Ide()
    h.outb(P + 6, 0xB0)
    h.cmd(0xA0)                                              # PACKET: INQUIRY with 5 bytes allowed
    h.write_data(bytes((0x12, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0)), width=4)
    h.wait()
    h.status()
    assert h.inb(P + 4) == 5
    data = h.read_data(8, width=4)                           # the last read is padded
    assert data[:5] == bytes((0x05, 0x80, 0x00, 0x21, 31)) and data[5:] == bytes(3)
    assert h.wait() == DRDY | 0x10
    assert h.io.read(P + 2, 2) == h.inb(P + 2) | h.inb(P + 3) << 8
    assert h.inb(P) == 0xFF                                  # a byte of the data port


# ---------------------------------------------------------------------------------------------
# other commands

def test_unknown_command_aborts_with_an_interrupt():
    h = Ide()
    edges = h.irq[0].edges
    h.cmd(0x55)
    assert h.wait() == DRDY | ERR
    assert h.inb(P + 1) == ABRT and h.irq[0].edges == edges + 1
    h.outb(P + 6, 0xA0)
    h.cmd(0xA0)                                              # PACKET to a disk
    assert h.wait() & ERR


def test_flush_set_features_power_and_diagnostics():
    h = Ide()
    h.cmd(0xE7)
    assert h.wait() == DRDY | 0x10 and h.disk.flushes == 1
    h.cmd(0xEA)
    h.wait()
    assert h.disk.flushes == 2
    h.regs(dev=0xA0, count=0x22, feature=0x03)               # multiword DMA 2
    h.cmd(0xEF)
    assert h.wait() == DRDY | 0x10
    w = h.identify()
    assert w[63] == 0x0407 and w[88] == 0x003F
    h.regs(dev=0xA0, count=0x30, feature=0x03)               # no such mode class
    h.cmd(0xEF)
    assert h.wait() & ERR
    h.regs(dev=0xA0, feature=0x82)                           # write cache off: flushed, word 85
    h.cmd(0xEF)
    assert h.wait() == DRDY | 0x10 and h.disk.flushes == 3
    assert not h.identify()[85] & (1 << 5)
    for op in (0xE0, 0xE1, 0xE2, 0xE3):
        h.cmd(op)
        assert h.wait() == DRDY | 0x10
    h.cmd(0xE5)
    assert h.wait() == DRDY | 0x10 and h.inb(P + 2) == 0xFF
    h.outb(P + 2, 0x77)
    h.cmd(0x90)
    assert h.wait() == DRDY | 0x10
    assert h.inb(P + 1) == 0x01
    assert [h.inb(P + r) for r in (2, 3, 4, 5)] == [1, 1, 0, 0]


def test_flush_and_read_failures_of_the_image_are_errors():
    bad = FailingDisk(64 * 512)
    h = Ide({(0, 0): ("disk", bad)})
    h.cmd(0xE7)
    assert h.wait() & ERR and h.inb(P + 1) == ABRT
    h.regs(count=1, lba=9)
    h.cmd(0x20)
    assert h.wait() & ERR and h.inb(P + 1) == UNC


def test_srst_resets_both_devices_without_an_interrupt():
    h = Ide()
    h.regs(count=4, lba=0)
    h.cmd(0x20)
    h.wait()
    h.status()                                               # mid-transfer
    edges = h.irq[0].edges
    h.outb(CTL, 0x04)
    assert h.alt() == BSY
    h.clock.advance(10 * RESET_TICKS)
    assert h.alt() == BSY                                    # held while SRST is set
    h.outb(CTL, 0x00)
    h.clock.advance(RESET_TICKS)
    assert h.alt() == DRDY | 0x10
    assert h.inb(P + 1) == 0x01
    assert [h.inb(P + r) for r in (2, 3, 4, 5, 6)] == [1, 1, 0, 0, 0xA0]
    assert h.irq[0].edges == edges and not h.irq[0].level
    assert h.io.read(P, 2) == 0                              # the transfer is gone
    h.outb(P + 6, 0xB0)                                      # the CD: packet signature, status 0
    assert h.alt() == 0 and (h.inb(P + 4), h.inb(P + 5)) == (0x14, 0xEB)


def test_nien_masks_the_line_but_keeps_the_interrupt_pending():
    h = Ide()
    h.outb(CTL, 0x02)
    h.cmd(0xE7)
    h.clock.advance(CMD_TICKS)
    assert not h.irq[0].level and not h.bm_status() & 0x04
    h.outb(CTL, 0x00)                                        # released: the pending interrupt shows
    assert h.irq[0].level and h.bm_status() & 0x04
    h.alt()
    assert h.irq[0].level                                    # alternate status leaves it
    h.status()
    assert not h.irq[0].level
    h.outb(CTL, 0x02)
    h.cmd(0xE7)
    h.clock.advance(CMD_TICKS)
    h.status()                                               # read while masked: no interrupt later
    h.outb(CTL, 0x00)
    assert not h.irq[0].level


def test_absent_slave_and_empty_channel():
    h = Ide({(0, 0): ("disk", RamDisk(64 * 512))})
    h.outb(P + 6, 0xB0)
    h.outb(P + 2, 0x55)
    h.outb(P + 3, 0xAA)
    assert (h.inb(P + 2), h.inb(P + 3)) == (0x55, 0xAA)      # the registers latch (ata_devchk)
    assert h.status() == 0 and h.inb(P + 1) == 0             # QEMU's reads for an absent device 1
    h.cmd(0xEC)
    assert h.alt() == 0 and h.clock.next_deadline() is None  # commands are ignored
    assert [h.inb(S + r) for r in range(1, 8)] == [0] * 7    # the secondary cable has nothing


# ---------------------------------------------------------------------------------------------
# bus-master DMA

def test_dma_read_through_two_regions():
    h = Ide()
    h.prd(0x1000, [(0x20000, 1024, False), (0x30000, 1024, True)])
    h.regs(count=4, lba=100)
    h.cmd(0xC8)
    h.bm_start(True)
    assert h.bm_status() & 0x01
    edges = h.irq[0].edges
    h.clock.advance(CMD_TICKS)                               # the command is decoded: DRQ, waiting
    assert h.alt() == DRDY | 0x10 | DRQ
    h.clock.advance(CMD_TICKS + 4 * SECTOR_TICKS)
    assert h.irq[0].edges == edges + 1
    assert h.bm_status() == 0x04                             # interrupt, no longer active
    assert h.status() == DRDY | 0x10
    assert bytes(h.ram.mem[0x20000:0x20400]) + bytes(h.ram.mem[0x30000:0x30400]) == sector_bytes(h.disk, 100, 4)
    h.bm_stop()
    h.outb(BM + 2, 0x04)
    assert h.bm_status() == 0


def test_dma_write_and_command_after_start():
    h = Ide()
    payload = bytes((i * 5) & 0xFF for i in range(3 * 512))
    h.ram.mem[0x40000:0x40000 + len(payload)] = payload
    h.prd(0x1000, [(0x40000, len(payload), True)])
    h.bm_start(False)                                        # the bus master first, then the command
    h.regs(count=3, lba=200)
    h.cmd(0xCA)
    _advance_all(h)
    assert h.alt() == DRDY | 0x10
    assert sector_bytes(h.disk, 200, 3) == payload
    assert h.bm_status() == 0x04


def test_dma_prd_longer_keeps_active_shorter_moves_nothing():
    h = Ide()
    h.prd(0x1000, [(0x20000, 4096, True)])
    h.regs(count=2, lba=0)
    h.cmd(0xC8)
    h.bm_start(True)
    _advance_all(h)
    assert h.bm_status() == 0x05                             # interrupt and still active
    h.bm_stop()
    h.ram.mem[0x20000:0x30000] = bytes(0x10000)
    h.prd(0x1000, [(0x20000, 512, True)])                    # one sector of room for two
    h.ram.writes.clear()
    h.regs(count=2, lba=0)
    h.cmd(0xC8)
    edges = h.irq[0].edges
    h.bm_start(True)
    h.clock.advance(10 * CMD_TICKS)
    assert h.irq[0].edges == edges and h.bm_status() == 0x00  # no interrupt, not active: the guest times out
    assert not h.ram.writes
    assert h.alt() == DRDY | 0x10


@pytest.mark.parametrize("checks", [True, False])
def test_dma_region_outside_ram_sets_the_error_bit(checks):
    h = Ide(ram=Ram(checks=checks))
    h.prd(0x1000, [(0x20000, 512, False), (RAM - 256, 512, True)])   # the second crosses the end of RAM
    h.ram.writes.clear()
    h.regs(count=2, lba=0)
    h.cmd(0xC8)
    h.bm_start(True)
    edges = h.irq[0].edges
    h.clock.advance(10 * CMD_TICKS)
    assert h.irq[0].edges == edges + 1
    assert h.bm_status() == 0x06                             # error and interrupt, not active
    assert h.status() == DRDY | ERR and h.inb(P + 1) == ABRT
    assert all(a + n <= RAM for a, n in h.ram.writes)
    if checks:
        assert not h.ram.writes                              # checked before anything moved


def test_dma_prd_table_outside_ram_and_bus_master_off():
    h = Ide()
    h.io.write(BM + 4, 4, 0xFFFF_F000)
    h.regs(count=1, lba=0)
    h.cmd(0xC8)
    h.bm_start(True)
    h.clock.advance(10 * CMD_TICKS)
    assert h.bm_status() == 0x06 and h.alt() & ERR
    h.bm_stop()
    h.dev.config_write(COMMAND, 2, 0x0001)                   # I/O on, bus mastering off
    h.prd(0x1000, [(0x20000, 512, True)])
    h.regs(count=1, lba=0)
    h.cmd(0xC8)
    h.bm_start(True)
    h.clock.advance(10 * CMD_TICKS)
    assert h.bm_status() == 0x06 and h.ram.writes[-1:] != [(0x20000, 512)]


def test_dma_stop_before_completion_then_restart():
    h = Ide()
    h.prd(0x1000, [(0x20000, 1024, True)])
    h.regs(count=2, lba=50)
    h.cmd(0xC8)
    h.bm_start(True)
    h.bm_stop()
    h.clock.advance(10 * CMD_TICKS)
    assert h.alt() & DRQ and not bytes(h.ram.mem[0x20000:0x20400]).strip(b"\0")
    h.outb(BM, 0x09)
    h.clock.advance(10 * CMD_TICKS)
    assert h.alt() == DRDY | 0x10
    assert bytes(h.ram.mem[0x20000:0x20400]) == sector_bytes(h.disk, 50, 2)


def test_dma_on_the_secondary_channel_uses_its_own_bus_master():
    h = Ide()
    h.prd(0x2000, [(0x50000, 512, True)], channel=1)
    h.regs(S, count=1, lba=7)
    h.cmd(0xC8, S)
    h.bm_start(True, channel=1)
    _advance_all(h)
    assert h.alt(S) == DRDY | 0x10
    assert bytes(h.ram.mem[0x50000:0x50200]) == sector_bytes(h.disk2, 7)
    assert h.bm_status(1) == 0x04 and h.bm_status(0) == 0 and h.irq[1].level and not h.irq[0].level


# ---------------------------------------------------------------------------------------------
# ATAPI

def packet(h: Ide, pkt: bytes, bcl: int = 0xFFFF, dma: bool = False) -> None:
    h.outb(P + 6, 0xB0)
    h.outb(P + 1, 1 if dma else 0)
    h.outb(P + 4, bcl & 0xFF)
    h.outb(P + 5, bcl >> 8)
    h.cmd(0xA0)
    assert h.alt() & DRQ and h.inb(P + 2) & 3 == 1           # CoD: the packet is wanted
    h.write_data(pkt.ljust(12, b"\0"))


def packet_in(h: Ide, pkt: bytes, bcl: int = 0xFFFF) -> tuple[bytes, list[int]]:
    """Send a packet and read the reply; return the data and the DRQ block sizes."""
    packet(h, pkt, bcl)
    out, sizes = b"", []
    while True:
        st_ = h.wait()
        h.status()
        if not st_ & DRQ:
            return out, sizes
        assert h.inb(P + 2) & 3 == 2                         # IO, data to the host
        n = h.inb(P + 4) | h.inb(P + 5) << 8
        sizes.append(n)
        out += h.read_data(n + (n & 1))[:n]


def request_sense(h: Ide) -> tuple[int, int, int]:
    data, _ = packet_in(h, bytes((0x03, 0, 0, 0, 18)))
    assert data[0] == 0x70 and data[7] == 10
    return data[2], data[12], data[13]


def test_identify_packet_device_and_ata_commands_to_the_cd():
    h = Ide()
    w = h.identify(dev=0xB0, op=0xA1)
    assert w[0] == 0x85C0
    assert ident_string(w, 27, 40) == "VMM DVD-ROM"
    assert w[49] & 0x0300 == 0x0300
    h.outb(P + 6, 0xB0)
    h.cmd(0xEC)                                              # IDENTIFY DEVICE: abort with the signature
    assert h.wait() & ERR
    assert (h.inb(P + 4), h.inb(P + 5)) == (0x14, 0xEB)
    h.cmd(0x20)
    assert h.wait() & ERR


def test_atapi_inquiry_and_read_capacity():
    h = Ide()
    data, _ = packet_in(h, bytes((0x12, 0, 0, 0, 36)))
    assert data[0] == 0x05 and data[1] == 0x80 and len(data) == 36
    assert data[8:16] == b"VMM     " and data[16:32].rstrip() == b"VMM DVD-ROM"
    assert h.inb(P + 2) & 3 == 3                             # command complete
    data, _ = packet_in(h, bytes((0x25,)))
    assert data == (15).to_bytes(4, "big") + (2048).to_bytes(4, "big")


def test_atapi_read10_in_blocks_of_the_byte_count_limit():
    h = Ide()
    edges = h.irq[0].edges
    data, sizes = packet_in(h, bytes((0x28, 0, 0, 0, 0, 3, 0, 0, 3)), bcl=2048)
    assert data == sector_bytes(h.cd, 3, 3, 2048)
    assert sizes == [2048, 2048, 2048]
    assert h.irq[0].edges == edges + 4                       # one per block and the completion
    data, sizes = packet_in(h, bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 5)), bcl=0x1001)   # odd: rounded down
    assert data == sector_bytes(h.cd, 0, 5, 2048) and set(sizes[:-1]) == {0x1000}
    data, sizes = packet_in(h, bytes((0xA8, 0, 0, 0, 0, 14, 0, 0, 0, 2)), bcl=0)  # READ(12), limit 0
    assert data == sector_bytes(h.cd, 14, 2, 2048) and sizes == [4096]


def test_atapi_errors_and_sense_data():
    h = Ide()
    data, _ = packet_in(h, bytes((0x28, 0, 0, 0, 0, 15, 0, 0, 2)))   # past the end
    assert data == b""
    assert h.alt() == DRDY | ERR and h.inb(P + 1) == 0x50 and h.inb(P + 2) & 3 == 3
    assert request_sense(h) == (5, 0x21, 0)
    assert request_sense(h) == (0, 0, 0)                     # reported once
    packet_in(h, bytes((0xEE,)))
    assert request_sense(h) == (5, 0x20, 0)
    packet_in(h, bytes((0x12, 1, 0, 0, 36)))                 # no VPD pages
    assert request_sense(h) == (5, 0x24, 0)
    packet_in(h, bytes((0x00,)))
    assert h.alt() == DRDY | 0x10 and request_sense(h) == (0, 0, 0)


def test_atapi_empty_drive_tray_and_unit_attention():
    h = Ide({(0, 1): ("cdrom", None), (0, 0): ("disk", RamDisk(64 * 512))})
    packet_in(h, bytes((0x00,)))
    assert h.alt() & ERR and request_sense(h) == (2, 0x3A, 1)
    h = Ide()
    packet_in(h, bytes((0x1E, 0, 0, 0, 1)))                  # lock
    packet_in(h, bytes((0x1B, 0, 0, 0, 2)))                  # eject: refused
    assert request_sense(h) == (5, 0x53, 2)
    packet_in(h, bytes((0x1E, 0, 0, 0, 0)))
    packet_in(h, bytes((0x1B, 0, 0, 0, 2)))                  # eject
    assert h.alt() == DRDY | 0x10
    packet_in(h, bytes((0x25,)))
    assert request_sense(h) == (2, 0x3A, 2)                  # tray open
    packet_in(h, bytes((0x1B, 0, 0, 0, 3)))                  # load
    data, _ = packet_in(h, bytes((0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8)))
    assert data[4:6] == bytes((2, 2))                        # new media, medium present
    packet_in(h, bytes((0x25,)))
    assert h.alt() & ERR and request_sense(h) == (6, 0x28, 0)
    data, _ = packet_in(h, bytes((0x25,)))
    assert len(data) == 8


def test_atapi_toc_configuration_and_mode_sense():
    h = Ide()
    data, _ = packet_in(h, bytes((0x43, 0, 0, 0, 0, 0, 0, 0, 20)))
    assert data[:4] == bytes((0, 18, 1, 1))
    assert data[4:12] == bytes((0, 0x14, 1, 0, 0, 0, 0, 0))
    assert data[12:20] == bytes((0, 0x14, 0xAA, 0)) + (16).to_bytes(4, "big")
    data, _ = packet_in(h, bytes((0x43, 2, 0, 0, 0, 0, 0, 0, 20)))       # MSF
    assert data[8:12] == bytes((0, 0, 2, 0))
    data, _ = packet_in(h, bytes((0x46, 0, 0, 0, 0, 0, 0, 0, 64)))
    assert int.from_bytes(data[6:8], "big") == 0x0008                    # CD-ROM profile current
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    data, _ = packet_in(h, bytes((0x5A, 0, 0x2A, 0, 0, 0, 0, 0, 64)))
    assert data[8] == 0x2A and int.from_bytes(data[:2], "big") == len(data) - 2
    packet_in(h, bytes((0x5A, 0, 0xC0 | 0x2A, 0, 0, 0, 0, 0, 64)))        # saved values
    assert request_sense(h) == (5, 0x39, 0)


def test_atapi_read_by_dma():
    h = Ide()
    h.prd(0x1000, [(0x60000, 4096, True)])
    packet(h, bytes((0x28, 0, 0, 0, 0, 9, 0, 0, 2)), dma=True)
    h.bm_start(True)
    _advance_all(h)
    assert h.alt() == DRDY | 0x10
    assert h.inb(P + 2) & 3 == 3 and h.bm_status() == 0x04
    assert bytes(h.ram.mem[0x60000:0x61000]) == sector_bytes(h.cd, 9, 2, 2048)


# ---------------------------------------------------------------------------------------------
# state

def test_save_and_restore_in_the_middle_of_commands():
    def scenario() -> Ide:
        h = Ide()
        h.regs(count=3, lba=20)
        h.cmd(0x20)                                          # primary: a PIO read, one block read
        h.wait()
        h.status()
        h.read_data(512)
        h.prd(0x1000, [(0x20000, 1024, True)], channel=1)
        h.regs(S, count=2, lba=1)
        h.cmd(0xC8, S)
        h.bm_start(True, channel=1)                          # secondary: a DMA under way
        return h

    a = scenario()
    state = a.dev.save_state()
    b = Ide()
    b.clock.load_state(a.clock.save_state())
    b.ram.mem[:] = a.ram.mem
    b.dev.load_state(copy.deepcopy(state))
    assert b.dev.save_state() == state
    assert [t.name for t in sorted(b.clock._heap) if t.active] == [t.name for t in sorted(a.clock._heap) if t.active]
    blocks = {}
    for h in (a, b):
        _advance_all(h)
        blocks[h] = h.read_data(512)
        _advance_all(h)
        blocks[h] += h.read_data(512)
    assert blocks[a] == blocks[b] == sector_bytes(a.disk, 21, 2)
    assert bytes(b.ram.mem) == bytes(a.ram.mem)
    assert b.dev.save_state() == a.dev.save_state()


def test_state_names_no_sectors_but_the_images_hash():
    h = Ide()
    state = h.dev.save_state()
    assert bytes(h.disk.data[:4096]) not in repr(state).encode()
    assert h.dev.image_sha256() == {"ide0.0": h.disk.sha256(), "ide0.1": h.cd.sha256(), "ide1.0": h.disk2.sha256()}


def test_constructor_refuses_bad_drive_maps():
    clock, io = VirtualClock(), IoBus()
    lines = (IrqLine(), IrqLine())
    for drives in ({(2, 0): ("disk", RamDisk(512))}, {(0, 0): ("tape", RamDisk(512))}, {(0, 0): ("disk", None)}):
        with pytest.raises(ValueError):
            IdeFunction(clock, Ram(), lines, drives, io)


# ---------------------------------------------------------------------------------------------
# hostile input

PRD_ENTRY = st.tuples(
    st.one_of(st.integers(0, RAM - 1), st.integers(RAM - 0x2000, RAM + 0x2000), st.integers(0, 0xFFFF_FFFF)),
    st.integers(0, 0xFFFF_FFFF))


@HYP
@given(entries=st.lists(PRD_ENTRY, max_size=12), table=st.one_of(st.integers(0, RAM - 1), st.integers(0, 0xFFFF_FFFF)),
       op=st.sampled_from([0xC8, 0xCA, 0x25, 0x35, 0xA0]), count=st.integers(0, 255), lba=st.integers(0, 1100),
       checks=st.booleans(), master=st.booleans())
def test_hostile_prd_tables_never_raise_or_touch_memory_outside_ram(entries, table, op, count, lba, checks, master):
    ram = Ram(checks=checks)
    h = Ide(ram=ram)
    if not master:
        h.dev.config_write(COMMAND, 2, 0x0001)
    table &= ~3
    for i, (addr, ctl) in enumerate(entries):
        if 0 <= table + 8 * i and table + 8 * i + 8 <= RAM:
            ram.write_u32(table + 8 * i, addr)
            ram.write_u32(table + 8 * i + 4, ctl)
    ram.writes.clear()
    h.io.write(BM + 4, 4, table)
    if op == 0xA0:
        packet(h, bytes((0x28, 0, 0, 0, 0, lba & 0xF, 0, 0, count & 7)), dma=True)
    else:
        h.regs(count=count, lba=lba)
        h.cmd(op)
    h.bm_start(op in (0xC8, 0x25, 0xA0))
    _advance_all(h)
    assert all(0 <= a and a + n <= RAM for a, n in ram.writes)
    st_ = h.alt()
    assert not st_ & BSY
    if h.bm_status() & 0x02:
        assert st_ & ERR
    h.dev.load_state(h.dev.save_state())


PORTS = [*range(0x1F0, 0x1F8), 0x3F6, *range(0x170, 0x178), 0x376, *range(BM, BM + 16)]
OPS = st.lists(st.one_of(
    st.tuples(st.just("r"), st.sampled_from(PORTS), st.sampled_from([1, 2, 4])),
    st.tuples(st.just("w"), st.sampled_from(PORTS), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFF_FFFF)),
    st.tuples(st.just("cmd"), st.sampled_from([0x1F7, 0x177]),
              st.sampled_from([0x20, 0x24, 0x30, 0x34, 0xC4, 0xC5, 0xC6, 0xC8, 0xCA, 0x25, 0x35, 0xA0, 0xA1, 0xEC,
                               0xEF, 0xE7, 0x90, 0x91, 0x08, 0xF8, 0x27, 0x40, 0x00, 0xFF])),
    st.tuples(st.just("adv"), st.integers(0, 50_000)),
    st.tuples(st.just("save"),),
), max_size=60)


@HYP
@given(ops=OPS)
def test_random_register_traffic_never_raises_and_restores_exactly(ops):
    h = Ide()
    for op in ops:
        if op[0] == "r":
            v = h.io.read(op[1], op[2])
            assert 0 <= v < 1 << (8 * op[2])
        elif op[0] == "w":
            h.io.write(op[1], op[2], op[3] & ((1 << (8 * op[2])) - 1))
        elif op[0] == "cmd":
            h.outb(op[1], op[2])
        elif op[0] == "adv":
            h.clock.advance(op[1])
        else:
            state = h.dev.save_state()
            h.dev.load_state(copy.deepcopy(state))
            assert h.dev.save_state() == state
    assert all(0 <= a and a + n <= RAM for a, n in h.ram.writes)
