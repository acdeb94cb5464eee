"""Intel MultiProcessor Specification 1.4 tables: the floating pointer and the configuration table.

From the MP Specification, version 1.4 (Intel order 242016-006, May 1997),
chapter 4 "MP Configuration Table":

* 4.1 MP Floating Pointer Structure (Table 4-1, 16 bytes): "_MP_", the
  configuration table's physical address, length 1 (in 16-byte units),
  spec revision 4, checksum, feature bytes 1-5 (feature 1 = 0: a
  configuration table is present; feature 2 bit 7 IMCRP = 0: virtual-wire
  mode, no IMCR).  The OS searches for it (section 4) in the first KB of the
  EBDA, else the last KB of base memory, else the BIOS ROM 0xF0000-0xFFFFF,
  on 16-byte boundaries: the caller gives an address in one of those.
* 4.2 MP Configuration Table Header (Table 4-2, 44 bytes): "PCMP", base
  table length, revision 4, checksum, OEM ID (8), product ID (12), no OEM
  table, entry count, the local APIC address, no extended entries.
* Base entries, in the order the spec requires (Table 4-3): processors
  (Table 4-4/4-5, 20 bytes: APIC ID, APIC version, EN and BP flags, CPU
  signature from CPUID.1 EAX, feature flags from CPUID.1 EDX), buses
  (Table 4-7, 8 bytes: "PCI" 0, "ISA" 1), the I/O APIC (Table 4-8, 8 bytes,
  EN), I/O interrupt assignments (Table 4-9/4-10, 8 bytes: type INT/NMI/SMI/
  ExtINT, polarity and trigger flags, source bus and IRQ, destination I/O
  APIC and INTIN#; a PCI source IRQ is device << 2 | pin), then local
  interrupt assignments (Table 4-11, 8 bytes; ExtINT on LINT0 of the BSP,
  NMI on LINT1 of every processor: destination 0xFF).

What is listed follows SeaBIOS's src/fw/mptable.c, which Linux sees under
QEMU: ISA IRQ 0 to INTIN 2 (the timer override, the same one the MADT
declares) and no entry for ISA IRQ 2; the other ISA IRQs identity-mapped and
bus-conforming, except those the PCI interrupt links use (5, 9, 10, 11 by
default), which are left to the PCI entries; one entry per PCI device and
INTx pin, level-triggered active-high (the polarity QEMU's I/O APIC sees,
SeaBIOS writes the same), to the IRQ its PIIX3 link routes to.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from devices.pci.piix3 import pirq_of
from vmm.firmware.acpi import IOAPIC_ADDR, LAPIC_ADDR

FLOATING_LEN = 16
HEADER_LEN = 44
SPEC_REV = 4

# entry types (Table 4-3)
ENTRY_PROCESSOR = 0
ENTRY_BUS = 1
ENTRY_IOAPIC = 2
ENTRY_IO_INTERRUPT = 3
ENTRY_LOCAL_INTERRUPT = 4

# interrupt types (Table 4-10)
INT_INT = 0
INT_NMI = 1
INT_SMI = 2
INT_EXTINT = 3

# flags (Table 4-10): polarity bits 0-1, trigger bits 2-3; 0 = conforms to the bus
POLARITY_HIGH = 1
POLARITY_LOW = 3
TRIGGER_EDGE = 1 << 2
TRIGGER_LEVEL = 3 << 2

CPU_EN = 1
CPU_BP = 2

PCI_BUS = 0
ISA_BUS = 1

# Where the OS looks for the floating pointer (section 4).
BIOS_AREA = (0xF0000, 0x100000)


@dataclass(frozen=True)
class PciInterrupt:
    """A PCI function that raises INTx: its device (slot) and pin 1-4 (INTA-INTD)."""

    device: int
    pin: int


@dataclass(frozen=True)
class MpConfig:
    cpus: int = 1
    cpu_signature: int = 0x600            # CPUID.1 EAX (stepping, model, family); SeaBIOS's fallback
    cpu_features: int = 0x201             # CPUID.1 EDX (FPU, APIC)
    lapic_version: int = 0x14             # an integrated xAPIC (QEMU's)
    lapic_addr: int = LAPIC_ADDR
    ioapic_id: int = 0
    ioapic_version: int = 0x11            # 82093AA
    ioapic_addr: int = IOAPIC_ADDR
    pci_irqs: tuple[int, ...] = (5, 9, 10, 11)      # ISA IRQs given to PCI (and the SCI): no ISA entries
    pirq_routes: tuple[int, int, int, int] = (10, 10, 11, 11)   # PIRQA-D -> ISA IRQ (SeaBIOS's choice)
    pci_devices: tuple[PciInterrupt, ...] = ()
    oem_id: str = "PYVMM"
    product_id: str = "PC"

    def __post_init__(self) -> None:
        if not 1 <= self.cpus <= 255:
            raise ValueError("the MP table's processor entries describe 1-255 CPUs")
        for d in self.pci_devices:
            if not 0 <= d.device < 32 or not 1 <= d.pin <= 4:
                raise ValueError(f"PCI device {d.device} pin {d.pin}: device 0-31, pin 1-4")


def _checksum(data: bytes | bytearray) -> int:
    return -sum(data) & 0xFF


def io_interrupt(kind: int, flags: int, bus: int, bus_irq: int, apic_id: int, intin: int) -> bytes:
    """An I/O interrupt assignment entry (Table 4-9)."""
    return struct.pack("<BBHBBBB", ENTRY_IO_INTERRUPT, kind, flags, bus, bus_irq, apic_id, intin)


def local_interrupt(kind: int, flags: int, bus: int, bus_irq: int, apic_id: int, lintin: int) -> bytes:
    """A local interrupt assignment entry (Table 4-11)."""
    return struct.pack("<BBHBBBB", ENTRY_LOCAL_INTERRUPT, kind, flags, bus, bus_irq, apic_id, lintin)


def config_table(cfg: MpConfig) -> bytes:
    """The MP configuration table (header and base entries), checksummed."""
    entries: list[bytes] = []
    for i in range(cfg.cpus):
        flags = CPU_EN | (CPU_BP if i == 0 else 0)
        entries.append(struct.pack("<BBBBII8x", ENTRY_PROCESSOR, i, cfg.lapic_version, flags,
                                   cfg.cpu_signature, cfg.cpu_features))
    entries.append(struct.pack("<BB6s", ENTRY_BUS, PCI_BUS, b"PCI   "))
    entries.append(struct.pack("<BB6s", ENTRY_BUS, ISA_BUS, b"ISA   "))
    entries.append(struct.pack("<BBBBI", ENTRY_IOAPIC, cfg.ioapic_id, cfg.ioapic_version, 1, cfg.ioapic_addr))
    seen: set[tuple[int, int]] = set()
    for d in cfg.pci_devices:
        if (d.device, d.pin) in seen:
            continue                       # one entry per device and pin, whatever the function
        seen.add((d.device, d.pin))
        irq = cfg.pirq_routes[pirq_of(d.device, d.pin)]
        entries.append(io_interrupt(INT_INT, POLARITY_HIGH | TRIGGER_LEVEL, PCI_BUS,
                                    d.device << 2 | (d.pin - 1), cfg.ioapic_id, irq))
    for irq in range(16):
        if irq in cfg.pci_irqs or irq == 2:
            continue                       # PCI's, or the cascade: INTIN 2 is IRQ 0's
        entries.append(io_interrupt(INT_INT, 0, ISA_BUS, irq, cfg.ioapic_id, 2 if irq == 0 else irq))
    entries.append(local_interrupt(INT_EXTINT, 0, ISA_BUS, 0, 0, 0))       # 8259 INTR -> BSP LINT0
    entries.append(local_interrupt(INT_NMI, 0, ISA_BUS, 0, 0xFF, 1))       # NMI -> every LINT1
    body = b"".join(entries)
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", HEADER_LEN + len(body), SPEC_REV, 0,
                                   cfg.oem_id.encode("ascii").ljust(8)[:8],
                                   cfg.product_id.encode("ascii").ljust(12)[:12], 0, 0, len(entries),
                                   cfg.lapic_addr, 0, 0, 0))
    table = header + body
    table[7] = _checksum(table)
    return bytes(table)


def floating_pointer(config_addr: int) -> bytes:
    """The 16-byte MP floating pointer structure (Table 4-1) for a table at ``config_addr``."""
    fp = bytearray(struct.pack("<4sIBBBB4s", b"_MP_", config_addr, 1, SPEC_REV, 0, 0, bytes(4)))
    fp[10] = _checksum(fp)
    return bytes(fp)


def search_areas(base_memory_kib: int = 640, ebda: int | None = None) -> list[tuple[int, int]]:
    """The ranges the spec's OS search covers: the EBDA's first KB (if there is one), the last KB
    of base memory, and the BIOS ROM."""
    areas = []
    if ebda is not None:
        areas.append((ebda, ebda + 0x400))
    top = base_memory_kib * 1024
    areas.append((top - 0x400, top))
    areas.append(BIOS_AREA)
    return areas


def mptable(floating_addr: int, config_addr: int | None = None, cfg: MpConfig | None = None, *,
            areas: Iterable[tuple[int, int]] | None = None) -> list[tuple[int, bytes]]:
    """``[(floating_addr, pointer), (config_addr, table)]`` for the caller to write.

    The pointer must be 16-byte aligned inside one of ``areas`` (by default the spec's: the
    last KB of 640 KiB of base memory and the BIOS ROM; pass ``search_areas(ebda=...)`` for
    an EBDA).  The table goes at ``config_addr``, by default right after the pointer.
    """
    cfg = cfg or MpConfig()
    areas = list(search_areas() if areas is None else areas)
    if floating_addr % 16 or not any(lo <= floating_addr and floating_addr + FLOATING_LEN <= hi
                                     for lo, hi in areas):
        raise ValueError(f"the MP floating pointer at {floating_addr:#x} must be 16-byte aligned "
                         "in a search area")
    if config_addr is None:
        config_addr = floating_addr + FLOATING_LEN
    table = config_table(cfg)
    if config_addr < floating_addr + FLOATING_LEN and floating_addr < config_addr + len(table):
        raise ValueError("the MP configuration table overlaps the floating pointer")
    if not 0 <= config_addr < 1 << 32:
        raise ValueError("the MP configuration table must be below 4 GiB")
    return [(floating_addr, floating_pointer(config_addr)), (config_addr, table)]
