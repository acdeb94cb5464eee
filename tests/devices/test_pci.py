"""PCI: configuration mechanism #1, the type 0 header, BARs, INTx routing.

Expectations come from the PCI Local Bus Specification 3.0 (3.2.2.3.2
mechanism #1; 6.1-6.2 the header; 6.2.5 BARs; 6.7 capabilities), the 82441FX
and 82371SB (PIIX3) datasheets, and QEMU's pc machine where guests rely on it
(the PIRQ wiring).  Every access goes through an IoBus/MmioBus, as a guest's
IN/OUT and loads/stores do.
"""
from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.base import DeviceStateError, IrqLine
from devices.bus import IoBus, MmioBus
from devices.pci.config import ConfigMechanism1, PciBus
from devices.pci.function import PciFunction
from devices.pci.i440fx import I440fx
from devices.pci.piix3 import Piix3, pirq_of
from tests.devices.rigs_pci import RegisterFile, ResetControlProbe, ToyFunction

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


class Pc:
    """An IoBus/MmioBus with mechanism #1, the i440FX, the PIIX3 and ISA IRQ lines."""

    def __init__(self) -> None:
        self.io = IoBus()
        self.mmio = MmioBus()
        self.edges: list[tuple[int, bool]] = []
        self.isa: list[IrqLine] = []
        for n in range(16):
            line = IrqLine(f"isa{n}")
            line.connect(lambda level, n=n: self.edges.append((n, level)))
            self.isa.append(line)
        self.pci = PciBus()
        self.rcr = ResetControlProbe()
        self.conf = ConfigMechanism1(self.pci, narrow=self.rcr)
        for base, length in self.conf.io_ranges:
            self.io.register(self.conf, base, length)
        self.host = self.pci.attach(I440fx(), 0)
        self.piix3 = Piix3(lambda n: self.isa[n])
        self.pci.attach(self.piix3, 1)
        self.pci.set_intx_router(self.piix3)

    def toy(self, slot: int, fn: int = 0, **kw) -> ToyFunction:
        return self.pci.attach(ToyFunction(self.io, self.mmio, f"toy{slot}.{fn}", **kw), slot, fn)

    def select(self, slot: int, fn: int, reg: int, bus: int = 0) -> None:
        self.io.write(0xCF8, 4, 0x8000_0000 | bus << 16 | slot << 11 | fn << 8 | (reg & 0xFC))

    def cfg_read(self, slot: int, fn: int, reg: int, size: int = 4) -> int:
        self.select(slot, fn, reg)
        return self.io.read(0xCFC + (reg & 3), size)

    def cfg_write(self, slot: int, fn: int, reg: int, size: int, value: int) -> None:
        self.select(slot, fn, reg)
        self.io.write(0xCFC + (reg & 3), size, value)

    def levels(self) -> list[int]:
        return [n for n, line in enumerate(self.isa) if line.level]


# ---------------------------------------------------------------------------
# Configuration mechanism #1 (PCI LB 3.0, 3.2.2.3.2)

def test_config_address_is_a_dword_register_with_reserved_bits_zero():
    pc = Pc()
    pc.io.write(0xCF8, 4, 0xFFFF_FFFF)
    assert pc.io.read(0xCF8, 4) == 0x80FF_FFFC      # 30:24 reserved, 1:0 fixed 00
    pc.io.write(0xCF8, 4, 0x8000_0000)
    assert pc.io.read(0xCF8, 4) == 0x8000_0000      # Linux's pci_check_type1 probe


def test_byte_and_word_accesses_to_cf8_do_not_latch_and_pass_through():
    pc = Pc()
    pc.io.write(0xCF8, 4, 0x8000_0800)
    pc.io.write(0xCF8, 1, 0x00)
    pc.io.write(0xCF8, 2, 0x0000)
    pc.io.write(0xCFA, 2, 0x0000)
    pc.io.write(0xCFB, 1, 0x01)                     # Linux: outb(0x01, 0xCFB) before probing
    assert pc.io.read(0xCF8, 4) == 0x8000_0800
    # narrow reads: 0xCF9 is the reset control register, the other bytes open bus
    assert pc.io.read(0xCF8, 1) == 0xFF
    assert pc.io.read(0xCF9, 1) == 0x02
    assert pc.io.read(0xCF8, 2) == 0x02FF
    assert pc.io.read(0xCFA, 2) == 0xFFFF
    assert pc.rcr.writes == [0x00]                  # only the word write's second byte reached it
    pc.io.write(0xCF9, 1, 0x06)
    assert pc.rcr.writes == [0x00, 0x06]


def test_dword_writes_to_cf8_never_reach_the_reset_control_register():
    pc = Pc()
    for fn in range(8):
        pc.select(5, fn, 0)                         # byte 1 = device/function: bit 2 set for fn 4-7
    assert pc.rcr.writes == []


def test_enable_bit_clear_makes_config_data_an_unclaimed_port():
    pc = Pc()
    pc.io.write(0xCF8, 4, 0x0000_0000)              # bus 0, device 0, register 0, disabled
    assert pc.io.read(0xCFC, 4) == 0xFFFF_FFFF
    pc.io.write(0xCF8, 4, 0x0000_0000 | 0x3C)
    pc.io.write(0xCFC, 1, 0x0B)
    assert pc.host.config[0x3C] == 0


def test_ids_of_the_host_bridge_and_the_isa_bridge():
    pc = Pc()
    assert pc.cfg_read(0, 0, 0x00) == 0x1237_8086
    assert pc.cfg_read(0, 0, 0x08) == 0x0600_0002   # class 060000, revision 02
    assert pc.cfg_read(0, 0, 0x0C) & 0x00FF_0000 == 0
    assert pc.cfg_read(0, 0, 0x2C) == 0x1100_1AF4   # QEMU's subsystem ids
    assert pc.cfg_read(1, 0, 0x00) == 0x7000_8086
    assert pc.cfg_read(1, 0, 0x08) == 0x0601_0000
    assert pc.cfg_read(1, 0, 0x0C) >> 16 & 0xFF == 0x80   # header type: multi-function
    assert pc.cfg_read(1, 0, 0x2C) == 0x1100_1AF4


def test_linux_probe_and_scan_find_the_host_and_isa_bridges():
    """arch/x86/pci/direct.c pci_check_type1 + pci_sanity_check, then a scan of bus 0
    that follows the header type bit, printed as busybox ``lspci`` prints it."""
    pc = Pc()
    pc.toy(1, 1)                                     # a second function of the PIIX3's slot
    pc.io.write(0xCFB, 1, 0x01)
    saved = pc.io.read(0xCF8, 4)
    pc.io.write(0xCF8, 4, 0x8000_0000)
    assert pc.io.read(0xCF8, 4) == 0x8000_0000
    pc.io.write(0xCF8, 4, saved)
    # mechanism #2's probe must fail: CF8/CFA byte writes do not stick
    pc.io.write(0xCFB, 1, 0x00)
    pc.io.write(0xCF8, 1, 0x00)
    pc.io.write(0xCFA, 1, 0x00)
    assert (pc.io.read(0xCF8, 1), pc.io.read(0xCFA, 1)) != (0, 0)
    lines = []
    for slot in range(32):
        for fn in range(8):
            ids = pc.cfg_read(slot, fn, 0x00)
            if ids == 0xFFFF_FFFF:
                if fn == 0:
                    break
                continue
            cls = pc.cfg_read(slot, fn, 0x08) >> 16
            lines.append(f"00:{slot:02x}.{fn} Class {cls:04x}: {ids & 0xFFFF:04x}:{ids >> 16:04x}")
            if fn == 0 and not pc.cfg_read(slot, fn, 0x0C) >> 23 & 1:
                break
    assert lines == ["00:00.0 Class 0600: 8086:1237", "00:01.0 Class 0601: 8086:7000",
                     "00:01.1 Class ff00: 1234:0001"]


def test_data_accesses_of_every_width_at_every_offset_agree():
    pc = Pc()
    toy = pc.toy(3)
    toy.config[0x40:0x100] = bytes(range(0x40, 0x100))      # a recognisable pattern
    for slot in (0, 1, 3):
        space = b"".join(pc.cfg_read(slot, 0, reg).to_bytes(4, "little") for reg in range(0, 256, 4))
        for reg in range(256):
            for size in (1, 2, 4):
                if (reg & 3) + size > 4:
                    continue                          # does not fit in CONFIG_DATA
                want = int.from_bytes(space[reg:reg + size], "little")
                assert pc.cfg_read(slot, 0, reg, size) == want, (slot, hex(reg), size)


def test_data_writes_of_every_width_land_on_their_bytes():
    pc = Pc()
    for reg in range(0x60, 0x64):
        pc.cfg_write(1, 0, reg, 1, reg - 0x60 + 5)
    assert pc.cfg_read(1, 0, 0x60) == 0x0807_0605
    pc.cfg_write(1, 0, 0x62, 2, 0x0B0A)
    assert pc.cfg_read(1, 0, 0x60) == 0x0B0A_0605
    pc.cfg_write(1, 0, 0x60, 4, 0x8F0F_0E0D)
    assert pc.cfg_read(1, 0, 0x60) == 0x8F0F_0E0D
    pc.cfg_write(1, 0, 0x61, 2, 0x0403)             # unaligned word inside the dword
    assert pc.cfg_read(1, 0, 0x60) == 0x8F04_030D


def test_absent_devices_functions_and_buses_read_all_ones():
    pc = Pc()
    assert pc.cfg_read(2, 0, 0x00) == 0xFFFF_FFFF
    assert pc.cfg_read(31, 7, 0x3C, 1) == 0xFF
    assert pc.cfg_read(0, 1, 0x00) == 0xFFFF_FFFF   # the host bridge is single-function
    pc.select(0, 0, 0, bus=1)
    assert pc.io.read(0xCFC, 2) == 0xFFFF           # no PCI-to-PCI bridge: master abort
    pc.cfg_write(2, 0, 0x3C, 1, 5)                  # dropped, no error


def test_multi_function_discovery_uses_header_type_bit_7():
    pc = Pc()
    f1 = pc.toy(1, 1)                               # PIIX3 is multi-function: 00:01.1 is reachable
    assert pc.cfg_read(1, 1, 0x00) == 0x0001_1234
    assert pc.pci.function_at(1, 1) is f1
    single = pc.toy(5)
    assert not single.multifunction
    with pytest.raises(ValueError):
        pc.toy(5, 1)
    with pytest.raises(ValueError):
        pc.toy(6, 2)                                # no function 0 yet
    multi = pc.toy(6, multifunction=True)
    pc.toy(6, 3)
    assert pc.cfg_read(6, 0, 0x0C) >> 23 & 1 == 1
    assert pc.cfg_read(6, 3, 0x00) == 0x0001_1234
    assert pc.cfg_read(6, 2, 0x00) == 0xFFFF_FFFF
    with pytest.raises(ValueError):
        pc.pci.attach(multi, 7)                     # already on a bus
    with pytest.raises(ValueError):
        pc.toy(6, 3)                                # taken


# ---------------------------------------------------------------------------
# The type 0 header (6.2)

def test_read_only_header_fields_keep_their_values():
    pc = Pc()
    toy = pc.toy(3)
    before = bytes(toy.config)
    for reg in range(0, 0x40, 4):
        pc.cfg_write(3, 0, reg, 4, 0xFFFF_FFFF)
    for reg in range(0, 0x40, 4):
        pc.cfg_write(3, 0, reg, 4, 0)
    after = bytes(toy.config)
    for o in list(range(0x00, 0x04)) + list(range(0x08, 0x0C)) + [0x0D, 0x0E, 0x0F] \
            + list(range(0x28, 0x30)) + list(range(0x34, 0x3C)) + [0x3D, 0x3E, 0x3F]:
        assert after[o] == before[o], hex(o)
    assert pc.cfg_read(3, 0, 0x00) == 0x0001_1234
    assert pc.cfg_read(3, 0, 0x2C) == 0x5678_1234
    assert pc.cfg_read(3, 0, 0x3C) == 0x0000_0100    # pin INTA# read-only, line written back to 0


def test_command_register_writable_bits():
    pc = Pc()
    pc.toy(3)
    pc.cfg_write(3, 0, 0x04, 2, 0xFFFF)
    assert pc.cfg_read(3, 0, 0x04, 2) == 0x0507     # I/O, memory, master, SERR#, interrupt disable
    pc.cfg_write(3, 0, 0x04, 2, 0)
    assert pc.cfg_read(3, 0, 0x04, 2) == 0


def test_status_error_bits_are_write_one_to_clear_and_the_rest_read_only():
    pc = Pc()
    toy = pc.toy(3)
    assert pc.cfg_read(3, 0, 0x06, 2) == 0x0010     # capabilities list
    toy.config[0x07] |= 0x30                        # the function reported two aborts
    pc.cfg_write(3, 0, 0x06, 2, 0x1000 | 0x0010 | 0x0008)
    assert pc.cfg_read(3, 0, 0x06, 2) == 0x2010     # only the written 1 cleared; bits 3, 4 unchanged
    pc.cfg_write(3, 0, 0x04, 4, 0xFFFF_0000)        # a dword write with status all ones clears all
    assert pc.cfg_read(3, 0, 0x06, 2) == 0x0010


def test_cache_line_size_and_interrupt_line_are_storage():
    pc = Pc()
    pc.toy(3)
    pc.cfg_write(3, 0, 0x0C, 1, 0x10)
    pc.cfg_write(3, 0, 0x0D, 1, 0x40)               # latency timer: hardwired 0 (as QEMU)
    pc.cfg_write(3, 0, 0x3C, 1, 0x0B)
    assert pc.cfg_read(3, 0, 0x0C) == 0x0000_0010
    assert pc.cfg_read(3, 0, 0x3C, 2) == 0x010B


def test_capabilities_list():
    pc = Pc()
    toy = pc.toy(3)
    second = toy.add_capability(0x05, 8, data=b"\x80\x00", wmask=b"\x01")
    assert pc.cfg_read(3, 0, 0x34, 1) == toy.cap == 0x40
    assert pc.cfg_read(3, 0, toy.cap, 2) == second << 8 | 0x09
    assert pc.cfg_read(3, 0, second, 2) == 0x05      # last: next = 0
    assert toy.capabilities() == [(0x09, 0x40), (0x05, second)]
    pc.cfg_write(3, 0, toy.cap, 4, 0xFFFF_FFFF)       # id, next, length: read-only; byte 3 writable
    assert pc.cfg_read(3, 0, toy.cap) == 0xFF04_0000 | second << 8 | 0x09
    pc.cfg_write(3, 0, second + 2, 2, 0xFFFF)
    assert pc.cfg_read(3, 0, second + 2, 2) == 0x0081
    with pytest.raises(ValueError):
        toy.add_capability(0x05, 4, offset=0x42)
    with pytest.raises(ValueError):
        toy.add_capability(0x05, 4, offset=toy.cap)


# ---------------------------------------------------------------------------
# BARs (6.2.5)

def test_bar_sizing_io_mem32_mem64_and_rom():
    pc = Pc()
    pc.toy(3)
    for reg in (0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x30):
        pc.cfg_write(3, 0, reg, 4, 0xFFFF_FFFF)
    assert pc.cfg_read(3, 0, 0x10) == 0xFFFF_FFE1   # 32 bytes of I/O
    assert pc.cfg_read(3, 0, 0x14) == 0xFFFF_F000   # 4 KiB, 32-bit, not prefetchable
    assert pc.cfg_read(3, 0, 0x18) == 0xFFFF_C00C   # 16 KiB, 64-bit, prefetchable
    assert pc.cfg_read(3, 0, 0x1C) == 0xFFFF_FFFF   # upper half
    assert pc.cfg_read(3, 0, 0x20) == 0             # absent BARs
    assert pc.cfg_read(3, 0, 0x24) == 0
    assert pc.cfg_read(3, 0, 0x30) == 0xFFFF_F801   # 2 KiB ROM, enable bit
    # the host bridge has no BARs and no ROM
    for reg in (0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x30):
        pc.cfg_write(0, 0, reg, 4, 0xFFFF_FFFF)
        assert pc.cfg_read(0, 0, reg) == 0


def _program(pc: Pc, slot: int, io: int = 0xC000, mem: int = 0xFEB0_0000, mem64: int = 0x1_0000_0000,
             rom: int = 0xFEB8_0000, command: int = 0x0003) -> None:
    pc.cfg_write(slot, 0, 0x10, 4, io)
    pc.cfg_write(slot, 0, 0x14, 4, mem)
    pc.cfg_write(slot, 0, 0x18, 4, mem64 & 0xFFFF_FFFF)
    pc.cfg_write(slot, 0, 0x1C, 4, mem64 >> 32)
    pc.cfg_write(slot, 0, 0x30, 4, rom | 1)
    pc.cfg_write(slot, 0, 0x04, 2, command)


def test_regions_appear_only_while_decode_is_enabled():
    pc = Pc()
    toy = pc.toy(3)
    _program(pc, 3, command=0)
    assert pc.io.device_at(0xC000) is None and not pc.mmio.claimed(0xFEB0_0000)
    pc.cfg_write(3, 0, 0x04, 2, 0x0001)             # I/O only
    assert pc.io.device_at(0xC000) is not None and not pc.mmio.claimed(0xFEB0_0000)
    pc.io.write(0xC004, 4, 0xCAFE_F00D)
    assert toy.io_regs.mem[4:8] == bytes.fromhex("0df0feca")
    assert pc.io.read(0xC006, 2) == 0xCAFE           # offsets from the BAR's base
    pc.cfg_write(3, 0, 0x04, 2, 0x0002)             # memory only
    assert pc.io.read(0xC004, 4) == 0xFFFF_FFFF
    pc.mmio.write(0xFEB0_0010, 8, 0x1122_3344_5566_7788)
    assert pc.mmio.read(0xFEB0_0014, 4) == 0x1122_3344
    pc.mmio.write(0x1_0000_3FF8, 4, 0xA5A5_A5A5)
    assert toy.mem64_regs.mem[0x3FF8:0x3FFC] == b"\xa5" * 4
    assert pc.mmio.read(0xFEB8_0000, 2) == 0xAA55    # the ROM
    assert [toy.bar_address(i) for i in range(7)] == [None, 0xFEB0_0000, 0x1_0000_0000, None, None, None,
                                                      0xFEB8_0000]
    pc.cfg_write(3, 0, 0x30, 4, 0xFEB8_0000)         # ROM enable bit off
    assert not pc.mmio.claimed(0xFEB8_0000)
    pc.cfg_write(3, 0, 0x04, 2, 0)
    assert pc.mmio.claims == [] and pc.io.device_at(0xC000) is None


def test_bar_servers_get_widths_they_declare_and_the_vcpu_id():
    class DwordRegs:
        io_sizes = (4,)
        mmio_sizes = (4,)
        wants_vcpu = True

        def __init__(self) -> None:
            self.log: list[tuple] = []

        def io_read(self, offset: int, size: int, vcpu: int) -> int:
            self.log.append(("io", offset, size, vcpu))
            return 0x4433_2211

        def io_write(self, offset: int, size: int, value: int, vcpu: int) -> None:
            self.log.append(("iow", offset, size, value, vcpu))

        mmio_read = io_read
        mmio_write = io_write

    io, mmio = IoBus(), MmioBus()
    regs = DwordRegs()
    f = PciFunction(name="f", vendor_id=0x1234, device_id=1, class_code=0, io_bus=io, mmio_bus=mmio)
    f.add_bar(0, 16, regs, io=True)
    f.config_write(0x10, 4, 0xE000)
    f.config_write(0x04, 2, 0x0001)
    assert io.read(0xE006, 1, vcpu=3) == 0x33
    io.write(0xE008, 4, 0x55, vcpu=1)
    assert regs.log == [("io", 4, 4, 3), ("iow", 8, 4, 0x55, 1)]


def test_moving_a_bar_moves_its_region():
    pc = Pc()
    toy = pc.toy(3)
    _program(pc, 3)
    pc.cfg_write(3, 0, 0x10, 4, 0xD040)
    pc.cfg_write(3, 0, 0x14, 4, 0xFEA0_0000)
    pc.cfg_write(3, 0, 0x1C, 4, 0x2)                 # upper half only: 0x2_0000_0000
    assert pc.io.device_at(0xC000) is None
    assert pc.io.read(0xC000, 1) == 0xFF
    pc.io.write(0xD041, 1, 0x77)
    assert toy.io_regs.mem[1] == 0x77
    assert not pc.mmio.claimed(0xFEB0_0000) and pc.mmio.read(0xFEB0_0000, 4) == 0   # unassigned: zeros
    pc.mmio.write(0xFEA0_0FFC, 4, 0x0BAD_CAFE)
    assert toy.mem_regs.mem[0xFFC:] == bytes.fromhex("fecaad0b")
    assert not pc.mmio.claimed(0x1_0000_0000) and pc.mmio.claimed(0x2_0000_0000)
    assert toy.bar_address(2) == 0x2_0000_0000


def test_sizing_with_decode_on_unmaps_until_the_address_comes_back():
    pc = Pc()
    pc.toy(3)
    _program(pc, 3)
    for reg, space in ((0x10, "io"), (0x14, "mem")):
        orig = pc.cfg_read(3, 0, reg)
        pc.cfg_write(3, 0, reg, 4, 0xFFFF_FFFF)
        assert pc.io.device_at(0xC000) is None if space == "io" else not pc.mmio.claimed(0xFEB0_0000)
        pc.cfg_write(3, 0, reg, 4, orig)
    assert pc.io.device_at(0xC000) is not None and pc.mmio.claimed(0xFEB0_0000)
    pc.cfg_write(3, 0, 0x10, 4, 0)                   # address 0 does not decode
    assert pc.io.device_at(0) is None


def test_io_bar_outside_the_64k_port_space_is_not_mapped():
    pc = Pc()
    toy = pc.toy(3)
    _program(pc, 3, io=0x1_0000)
    assert pc.cfg_read(3, 0, 0x10) == 0x0001_0001    # upper 16 bits writable, as QEMU
    assert toy.bar_address(0) is None


def test_overlapping_bars_lower_devfn_wins_and_the_other_appears_when_it_moves():
    pc = Pc()
    a, b = pc.toy(3), pc.toy(4)
    _program(pc, 4)
    assert b.bar_address(1) == 0xFEB0_0000
    _program(pc, 3)                                  # same addresses: slot 3 comes first on the bus
    assert a.bar_address(1) == 0xFEB0_0000 and b.bar_address(1) is None and b.bar_address(0) is None
    pc.mmio.write(0xFEB0_0100, 1, 0x42)
    assert a.mem_regs.mem[0x100] == 0x42 and b.mem_regs.mem[0x100] == 0
    pc.cfg_write(3, 0, 0x14, 4, 0xFE00_0000)
    assert b.bar_address(1) == 0xFEB0_0000 and a.bar_address(1) == 0xFE00_0000
    pc.cfg_write(3, 0, 0x04, 2, 0)
    assert b.bar_address(0) == 0xC000


def test_bar_over_a_fixed_device_is_refused_and_counted():
    pc = Pc()
    toy = pc.toy(3)
    pc.mmio.register(RegisterFile(0x1000), 0xFEC0_0000, 0x1000, "ioapic")
    _program(pc, 3, mem=0xFEC0_0000)
    assert toy.bar_address(1) is None and toy.map_refusals >= 1
    assert pc.mmio.find(0xFEC0_0000).name == "ioapic"
    pc.cfg_write(3, 0, 0x14, 4, 0xFEB0_0000)
    assert toy.bar_address(1) == 0xFEB0_0000


def test_bar_declarations_are_checked():
    io, mmio = IoBus(), MmioBus()
    f = PciFunction(name="f", vendor_id=0x1234, device_id=1, class_code=0, io_bus=io, mmio_bus=mmio)
    regs = RegisterFile(64)
    for bad in (dict(index=6, size=16), dict(index=0, size=24), dict(index=0, size=512, io=True),
                dict(index=0, size=8), dict(index=5, size=16, mem64=True),
                dict(index=0, size=16, io=True, prefetchable=True)):
        with pytest.raises(ValueError):
            f.add_bar(server=regs, **bad)
    f.add_bar(0, 16, regs, mem64=True)
    with pytest.raises(ValueError):
        f.add_bar(1, 16, regs)                       # upper half of BAR 0
    with pytest.raises(ValueError):
        f.add_bar(2, 16, object())
    with pytest.raises(ValueError):
        PciFunction(name="g", vendor_id=0x1234, device_id=1, class_code=0).add_bar(0, 16, regs, io=True)


# ---------------------------------------------------------------------------
# INTx and the PIIX3's PIRQ routing

def test_pirq_wiring_is_qemus_pc_board():
    # slot 1's INTA# is PIRQA (QEMU pc_pci_slot_get_pirq, SeaBIOS piix_pci_slot_get_irq)
    assert [pirq_of(1, pin) for pin in (1, 2, 3, 4)] == [0, 1, 2, 3]
    assert [pirq_of(slot, 1) for slot in (0, 1, 2, 3, 4, 5)] == [3, 0, 1, 2, 3, 0]
    assert pirq_of(3, 4) == pirq_of(4, 3) == pirq_of(5, 2) == pirq_of(6, 1)


@pytest.mark.parametrize("slot", [2, 3, 4, 5, 10, 31])
@pytest.mark.parametrize("pin", [1, 2, 3, 4])
def test_each_slot_and_pin_reaches_its_pirq_and_isa_irq(slot, pin):
    pc = Pc()
    toy = pc.toy(slot, pin=pin)
    for p, irq in enumerate((5, 9, 10, 11)):
        pc.cfg_write(1, 0, 0x60 + p, 1, irq)
    toy.set_irq(True)
    assert pc.levels() == [(5, 9, 10, 11)[pirq_of(slot, pin)]]
    toy.set_irq(False)
    assert pc.levels() == []


def test_routing_disable_bit_and_rerouting_while_asserted():
    pc = Pc()
    toy = pc.toy(3)                                  # INTA# of slot 3: PIRQC
    toy.set_irq(True)
    assert pc.levels() == []                         # PIRQRC resets to 80h: not routed
    pc.cfg_write(1, 0, 0x62, 1, 0x0B)
    assert pc.levels() == [11]
    pc.cfg_write(1, 0, 0x62, 1, 0x0A)
    assert pc.levels() == [10] and (11, False) in pc.edges
    pc.cfg_write(1, 0, 0x62, 1, 0x8A)
    assert pc.levels() == []
    assert pc.cfg_read(1, 0, 0x60) == 0x808A_8080
    pc.cfg_write(1, 0, 0x62, 1, 0x7A)               # bits 6:4 reserved
    assert pc.cfg_read(1, 0, 0x62, 1) == 0x0A and pc.levels() == [10]


def test_wired_or_sharing_of_a_pirq_and_of_an_isa_irq():
    pc = Pc()
    a = pc.toy(3, pin=1)                             # PIRQC
    b = pc.toy(4, pin=4)                             # PIRQC too
    c = pc.toy(5, pin=1)                             # PIRQA
    pc.cfg_write(1, 0, 0x60, 4, 0x8009_800B)         # A -> 11, B off, C -> 9, D off
    a.set_irq(True)
    b.set_irq(True)
    a.set_irq(False)
    assert pc.levels() == [9]                        # b still holds PIRQC
    b.set_irq(False)
    assert pc.levels() == [] and pc.edges == [(9, True), (9, False)]
    pc.cfg_write(1, 0, 0x60, 1, 0x09)                # PIRQA also onto IRQ 9
    a.set_irq(True)
    c.set_irq(True)
    a.set_irq(False)
    assert pc.levels() == [9]
    c.set_irq(False)
    assert pc.levels() == []
    assert pc.piix3.save_state()["pirq_sources"] == [[], [], [], []]


def test_interrupt_disable_bit_and_status_interrupt_bit():
    pc = Pc()
    toy = pc.toy(3)
    pc.cfg_write(1, 0, 0x62, 1, 0x0B)
    pc.cfg_write(3, 0, 0x04, 2, 0x0400)              # interrupt disable
    toy.set_irq(True)
    assert pc.levels() == [] and not toy.intx.level
    assert pc.cfg_read(3, 0, 0x06, 2) & 0x0008       # status shows the function's own state
    pc.cfg_write(3, 0, 0x04, 2, 0x0000)
    assert pc.levels() == [11]
    pc.cfg_write(3, 0, 0x04, 2, 0x0400)
    assert pc.levels() == []
    toy.set_irq(False)
    assert not pc.cfg_read(3, 0, 0x06, 2) & 0x0008
    pc.cfg_write(3, 0, 0x04, 2, 0x0000)
    assert pc.levels() == [] and pc.edges == [(11, True), (11, False)]


def test_doorbell_through_a_bar_raises_intx():
    pc = Pc()
    toy = pc.toy(3)
    _program(pc, 3)
    pc.cfg_write(1, 0, 0x62, 1, 0x0A)
    pc.io.write(0xC000, 1, 1)
    assert toy.irq_level and pc.levels() == [10]
    pc.io.write(0xC000, 1, 0)
    assert pc.levels() == []


def test_router_attached_late_learns_asserted_lines():
    io, mmio = IoBus(), MmioBus()
    pci = PciBus()
    toy = pci.attach(ToyFunction(io, mmio), 2)
    toy.set_irq(True)
    lines = [IrqLine() for _ in range(16)]
    piix3 = pci.attach(Piix3(lambda n: lines[n]), 1)
    pci.set_intx_router(piix3)
    piix3.config_write(0x60 + pirq_of(2, 1), 1, 5)
    assert lines[5].level


# ---------------------------------------------------------------------------
# Chipset registers

def test_piix3_registers_reset_to_the_datasheet_values():
    pc = Pc()
    expect = {0x04: 0x07, 0x05: 0x00, 0x06: 0x00, 0x07: 0x02, 0x4C: 0x4D, 0x4E: 0x03, 0x4F: 0x00,
              0x60: 0x80, 0x61: 0x80, 0x62: 0x80, 0x63: 0x80, 0x69: 0x02, 0x70: 0x80, 0x76: 0x0C,
              0x77: 0x0C, 0x78: 0x02, 0x79: 0x00, 0x80: 0x00, 0x82: 0x00, 0xA0: 0x08, 0xA8: 0x0F}
    for reg, value in expect.items():
        assert pc.cfg_read(1, 0, reg, 1) == value, hex(reg)
    pc.cfg_write(1, 0, 0x04, 2, 0x0000)              # I/O, memory, master: hardwired on
    assert pc.cfg_read(1, 0, 0x04, 2) == 0x0007
    for reg in (0x4C, 0x69, 0x80, 0xA0, 0xA4, 0xA7, 0xAE):
        pc.cfg_write(1, 0, reg, 1, 0x5A)
        assert pc.cfg_read(1, 0, reg, 1) == 0x5A, hex(reg)
    pc.cfg_write(1, 0, 0x90, 1, 0x5A)                # not a PIIX3 register: reserved, reads 0
    assert pc.cfg_read(1, 0, 0x90, 1) == 0
    pc.piix3.reset()
    for reg, value in expect.items():
        assert pc.cfg_read(1, 0, reg, 1) == value, hex(reg)


def test_i440fx_pam_and_smram():
    pc = Pc()
    assert pc.cfg_read(0, 0, 0x04) == 0x0280_0006
    for reg in range(0x59, 0x60):
        assert pc.cfg_read(0, 0, reg, 1) == 0
        pc.cfg_write(0, 0, reg, 1, 0xFF)
    assert pc.cfg_read(0, 0, 0x59, 1) == 0x30        # PAM0's low nibble is reserved
    assert [pc.cfg_read(0, 0, r, 1) for r in range(0x5A, 0x60)] == [0x33] * 6
    assert pc.host.pam(3) == 0x33
    assert pc.cfg_read(0, 0, 0x72, 1) == 0x02
    pc.cfg_write(0, 0, 0x72, 1, 0xFF)
    assert pc.cfg_read(0, 0, 0x72, 1) == 0x3A        # D_LCK set: D_OPEN cleared
    pc.cfg_write(0, 0, 0x72, 1, 0x42)                # locked: only D_CLS may change
    assert pc.cfg_read(0, 0, 0x72, 1) == 0x1A
    pc.host.reset()
    assert pc.cfg_read(0, 0, 0x72, 1) == 0x02 and pc.host.pam(3) == 0
    pc.cfg_write(0, 0, 0x72, 1, 0x4A)                # unlocked again: D_OPEN | G_SMRAME
    assert pc.host.smram == 0x4A


# ---------------------------------------------------------------------------
# Reset

def test_reset_clears_bars_command_and_intx():
    pc = Pc()
    toy = pc.toy(3)
    _program(pc, 3)
    pc.cfg_write(3, 0, 0x3C, 1, 11)
    pc.cfg_write(1, 0, 0x62, 1, 0x0B)
    toy.set_irq(True)
    assert pc.levels() == [11]
    toy.reset()
    assert pc.levels() == [] and not toy.irq_level
    assert pc.cfg_read(3, 0, 0x04) == 0x0010_0000    # command 0, status: capabilities only
    assert pc.cfg_read(3, 0, 0x10) == 0x0000_0001 and pc.cfg_read(3, 0, 0x18) == 0x0000_000C
    assert pc.cfg_read(3, 0, 0x30) == 0 and pc.cfg_read(3, 0, 0x3C, 1) == 0
    assert pc.mmio.claims == [] and pc.io.device_at(0xC000) is None
    pc.conf.reset()
    assert pc.io.read(0xCF8, 4) == 0


def test_piix3_reset_disables_routing_but_keeps_the_pirq_inputs():
    pc = Pc()
    toy = pc.toy(3)
    pc.cfg_write(1, 0, 0x62, 1, 0x0B)
    toy.set_irq(True)
    pc.piix3.reset()
    assert pc.levels() == [] and pc.piix3.pirq_level(2)
    pc.cfg_write(1, 0, 0x62, 1, 0x0B)
    assert pc.levels() == [11]


# ---------------------------------------------------------------------------
# Save and restore

def _machine_state(pc: Pc, *functions: PciFunction) -> list[dict]:
    return [pc.conf.save_state(), pc.host.save_state(), pc.piix3.save_state()] + \
        [f.save_state() for f in functions]


def test_restore_into_a_fresh_machine_rebuilds_mappings_and_levels():
    pc = Pc()
    a, b = pc.toy(3), pc.toy(4, pin=4)
    _program(pc, 3)
    _program(pc, 4, io=0xC100, mem=0xFE00_0000, mem64=0x8000_0000, rom=0xFEB9_0000)
    pc.cfg_write(1, 0, 0x62, 1, 0x0B)
    a.set_irq(True)
    pc.mmio.write(0xFE00_0010, 4, 0x1234_5678)
    saved = copy.deepcopy(_machine_state(pc, a, b))

    new = Pc()
    a2, b2 = new.toy(3), new.toy(4, pin=4)
    for target, state in zip([new.conf, new.host, new.piix3, b2, a2], saved[:3] + [saved[4], saved[3]]):
        target.load_state(state)
    assert new.edges == []                            # restore raises no interrupt
    assert new.levels() == [11] and a2.intx.level
    assert _machine_state(new, a2, b2) == saved
    assert new.mmio.read(0xFE00_0010, 4) == 0x1234_5678
    assert [c.base for c in new.mmio.claims] == [c.base for c in pc.mmio.claims]
    a2.set_irq(False)
    assert new.levels() == []


@SETTINGS
@given(order=st.permutations([0, 1, 2]))
def test_restore_order_does_not_matter_even_over_stale_mappings(order):
    # the live machine has the three functions' BARs where the saved one had them swapped around
    pc = Pc()
    toys = [pc.toy(3), pc.toy(4), pc.toy(5)]
    layouts = [(0xC000, 0xFEB0_0000), (0xC100, 0xFEB1_0000), (0xC200, 0xFEB2_0000)]
    for slot, (io, mem) in zip((3, 4, 5), layouts):
        _program(pc, slot, io=io, mem=mem, mem64=0, rom=mem + 0x8000)
    saved = [t.save_state() for t in toys]
    for slot, (io, mem) in zip((3, 4, 5), layouts[1:] + layouts[:1]):
        _program(pc, slot, io=io, mem=mem, mem64=0, rom=mem + 0x8000)
    pc.cfg_write(5, 0, 0x14, 4, 0xFEB1_0000)          # and a live overlap
    for i in order:
        toys[i].load_state(copy.deepcopy(saved[i]))
    for t, (io, mem) in zip(toys, layouts):
        assert (t.bar_address(0), t.bar_address(1), t.bar_address(6)) == (io, mem, mem + 0x8000)
    assert len(pc.mmio.claims) == 6


def test_a_refused_state_changes_nothing():
    pc = Pc()
    toy = pc.toy(3)
    _program(pc, 3)
    before = toy.save_state()
    claims = list(pc.mmio.claims)
    other = pc.piix3.save_state()
    bad = [None, {}, {**before, "kind": "piix3"}, {**before, "version": 2}, {**before, "intx": 1},
           {**before, "config": b"\0" * 255},
           {**before, "config": bytes(256)},                 # vendor id 0: another device
           {**before, "io": b""}, {k: v for k, v in before.items() if k != "mem64"},
           {**other, "kind": "toy_pci"}]
    for state in bad:
        with pytest.raises(DeviceStateError):
            toy.load_state(state)
        assert toy.save_state() == before and pc.mmio.claims == claims
    with pytest.raises(DeviceStateError):
        pc.host.load_state({**pc.host.save_state(), "config": bytes(pc.piix3.config)})
    with pytest.raises(DeviceStateError):
        pc.piix3.load_state({**other, "pirq_sources": [[3, 1], [], [], []]})
    with pytest.raises(DeviceStateError):
        pc.conf.load_state({**pc.conf.save_state(), "address": 0x8000_0001})


@SETTINGS
@given(data=st.data())
def test_garbage_function_states_raise_or_load_a_working_function(data):
    pc = Pc()
    toy = pc.toy(3)
    _program(pc, 3)
    good = toy.save_state()
    state = dict(good)
    key = data.draw(st.sampled_from(sorted(good)))
    if key == "config":
        cfg = bytearray(good["config"])
        for _ in range(data.draw(st.integers(1, 8))):
            cfg[data.draw(st.integers(0, 255))] = data.draw(st.integers(0, 255))
        state[key] = bytes(cfg)
    else:
        state[key] = data.draw(st.one_of(st.none(), st.booleans(), st.integers(-5, 300),
                                         st.binary(max_size=300)))
    before = toy.save_state()
    try:
        toy.load_state(state)
    except DeviceStateError:
        assert toy.save_state() == before
        return
    for reg in range(0, 0x40, 4):
        pc.cfg_read(3, 0, reg)
    for i in range(7):
        if toy.bar_address(i) is not None:
            bus = pc.io if i == 0 else pc.mmio
            bus.read(toy.bar_address(i), 1)


def test_conf_state_round_trip():
    pc = Pc()
    pc.select(1, 0, 0x60)
    state = pc.conf.save_state()
    pc.conf.reset()
    pc.conf.load_state(state)
    assert pc.io.read(0xCFC, 4) == 0x8080_8080
