"""ACPI tables for the PC (i440FX + PIIX3/PIIX4 layout), as bytes, two ways to install them.

Tables (ACPI Specification 6.4, chapter 5; layouts checked against the
tables of QEMU's hw/i386/acpi-build.c, which Linux and SeaBIOS are tested
against every day; the code is our own):

* RSDP (5.2.5.3): revision 2, 36 bytes, RSDT and XSDT addresses, the
  checksum of the first 20 bytes and the extended checksum of all 36.
* RSDT (5.2.7, 32-bit entries) and XSDT (5.2.8, 64-bit entries): FACP,
  APIC and, with an HPET, HPET.
* FADT "FACP" (5.2.9): revision 6 (ACPI 6.0, 276 bytes; Linux takes every
  revision, and the 64-bit X_ fields and the reset register need at least
  3).  PM1a event/control blocks, PM timer, GPE0 block (as 32-bit port
  numbers and as System I/O generic addresses with the same widths), SCI
  interrupt, SMI_CMD with ACPI_ENABLE/ACPI_DISABLE, the RTC century index,
  IAPC_BOOT_ARCH "legacy devices" and "8042" (Linux takes a revision 2+
  FADT without the 8042 bit to mean there is no keyboard controller), the
  reset register (System I/O 0xCF9, value 6) with RESET_REG_SUP, and the
  flags QEMU sets (WBINVD, PROC_C1, SLP_BUTTON: no fixed sleep button,
  RTC_S4, USE_PLATFORM_CLOCK; PWR_BUTTON clear: the power button is the
  fixed-feature one; FORCE_APIC_CLUSTER_MODEL above 8 CPUs).  FIRMWARE_CTRL
  and DSDT point at the FACS and DSDT, X_DSDT holds the DSDT's address too,
  X_FIRMWARE_CTRL is 0 (the spec allows only one of the FACS fields to be
  set; Linux lists the FACS twice otherwise).
* FACS (5.2.10): 64 bytes, version 2, 64-byte aligned (first in the blob).
* MADT "APIC" (5.2.12, revision 4 = ACPI 6.0): local APIC address
  0xFEE00000, PCAT_COMPAT; one Processor Local APIC per CPU (UID = APIC ID
  = index, enabled); one I/O APIC (0xFEC00000, GSI base 0); interrupt
  source overrides ISA IRQ0 -> GSI 2 (bus-conforming) and, as QEMU does,
  the PCI link IRQs and the SCI (5, 9, 10, 11) level/active-high; a Local
  APIC NMI for all processors on LINT1.
* HPET (IA-PC HPET Specification 1.0a, 3.2.4): event timer block ID (the
  low half of the HPET's capabilities register), base 0xFED00000.
* DSDT (5.2.11.1), written with vmm/firmware/aml.py: ``\\_S5``;
  ``\\_SB.PCI0`` (PNP0A03, _ADR, _UID, _BBN, _CRS with bus numbers 0-255,
  the config ports, I/O 0-0xCF7 and 0xD00-0xFFFF, the VGA window and the
  32-bit PCI hole below the I/O APIC, optionally a 64-bit hole) and its
  _PRT: every slot's INTA-D to the link devices LNKA-LNKD by the board's
  wiring (devices/pci/piix3.py ``pirq_of``: PIRQ (slot + pin - 2) mod 4 for
  pin 1-4), slot 1 INTA to LNKS, the SCI link, as QEMU does;
  LNKA-LNKD (PNP0C0F) whose _STA/_CRS/_DIS/_SRS read and write the PIIX3
  PIRQ route registers (PCI config 00:01.0 offsets 0x60-0x63: bit 7
  disables, bits 0-3 the IRQ) through a PCI_Config OperationRegion; the
  ISA devices under ``\\_SB.PCI0.ISA`` (RTC PNP0B00, keyboard PNP0303, PS/2
  mouse PNP0F13, COM ports PNP0501, HPET PNP0103 with its memory); the
  fw_cfg node (QEMU0002) Linux's qemu_fw_cfg driver binds to; and one
  processor device (ACPI0007) per CPU with the MADT's UID.

Two ways to install them (``AcpiTables``):

* ``fw_cfg_files()``: "etc/acpi/tables", "etc/acpi/rsdp" and the
  "etc/table-loader" script of QEMU's BIOSLinker commands (ALLOCATE,
  ADD_POINTER, ADD_CHECKSUM; 128-byte little-endian entries as SeaBIOS's
  src/fw/romfile_loader.h defines them), with which SeaBIOS allocates,
  links and checksums the very same tables in guest memory;
* ``place(tables_addr, rsdp_addr)``: the blobs with every pointer and
  checksum filled in for fixed addresses, for our own HLE BIOS and direct
  Linux boot: the RSDP in the BIOS area 0xE0000-0xFFFFF on a 16-byte
  boundary (where the OS searches, 5.2.5.1), the tables in a region the
  caller reserves in its E820 map.

The power-management ports, the reset register and S5's SLP_TYP default to
the constants of devices/timers/acpi_pm.py (QEMU's PIIX4 layout: PM1a_EVT
0x600/4, PM1a_CNT 0x604/2, PM_TMR 0x608/4, GPE0 0xAFE0/4, SMI_CMD 0xB2 with
enable 0xF1 and disable 0xF0, SCI IRQ 9, S5 SLP_TYP 0, reset 0xCF9 = 6),
the HPET's to devices/timers/hpet.py's; ``AcpiConfig`` takes every one of
them as a field.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from devices.pci import piix3
from devices.timers import acpi_pm, hpet
from vmm.firmware import aml

TABLES_FILE = "etc/acpi/tables"
RSDP_FILE = "etc/acpi/rsdp"
LOADER_FILE = "etc/table-loader"

# BIOSLinker commands (SeaBIOS src/fw/romfile_loader.h, QEMU hw/acpi/bios-linker-loader.c)
LOADER_ENTRY_SIZE = 128
LOADER_FILESZ = 56
CMD_ALLOCATE = 1
CMD_ADD_POINTER = 2
CMD_ADD_CHECKSUM = 3
ZONE_HIGH = 1
ZONE_FSEG = 2

RSDP_AREA = (0xE0000, 0x100000)   # where the OS looks for the RSDP on a PC (5.2.5.1)

LAPIC_ADDR = 0xFEE0_0000
IOAPIC_ADDR = 0xFEC0_0000
HPET_ADDR = hpet.HPET_BASE
HPET_LEN = hpet.HPET_WINDOW
HPET_BLOCK_ID = hpet.CAPABILITIES & 0xFFFF_FFFF   # the event timer block ID is GCAP_ID's low half
PCI_HOLE_END = IOAPIC_ADDR - 1

# FADT flags (5.2.9, Table 5.10)
F_WBINVD = 1 << 0
F_PROC_C1 = 1 << 2
F_PWR_BUTTON = 1 << 4
F_SLP_BUTTON = 1 << 5
F_RTC_S4 = 1 << 7
F_TMR_VAL_EXT = 1 << 8
F_RESET_REG_SUP = 1 << 10
F_USE_PLATFORM_CLOCK = 1 << 15
F_FORCE_APIC_CLUSTER_MODEL = 1 << 18
# IAPC_BOOT_ARCH (Table 5.11)
BOOT_LEGACY_DEVICES = 1 << 0
BOOT_8042 = 1 << 1

GAS_SYSTEM_MEMORY = 0
GAS_SYSTEM_IO = 1

FADT_REVISION = 6
FADT_LENGTH = 276
MADT_REVISION = 4
FACS_VERSION = 2
FACS_LENGTH = 64
DSDT_REVISION = 2                 # 64-bit integers
HEADER_LEN = 36

PIRQ_LINKS = ("LNKA", "LNKB", "LNKC", "LNKD")
SCI_LINK = "LNKS"


@dataclass(frozen=True)
class AcpiConfig:
    """What the tables describe.  Defaults: QEMU's PC (i440FX, PIIX4 PM at 0x600)."""

    cpus: int = 1
    # power management: devices/timers/acpi_pm.py's ports (QEMU's PIIX4 layout)
    pm1a_evt_blk: int = acpi_pm.PM1A_EVT_BLK
    pm1_evt_len: int = acpi_pm.PM1_EVT_LEN
    pm1a_cnt_blk: int = acpi_pm.PM1A_CNT_BLK
    pm1_cnt_len: int = acpi_pm.PM1_CNT_LEN
    pm_tmr_blk: int = acpi_pm.PM_TMR_BLK
    pm_tmr_len: int = acpi_pm.PM_TMR_LEN
    pm_timer_32bit: bool = acpi_pm.PM_TMR_VAL_EXT
    gpe0_blk: int = acpi_pm.GPE0_BLK
    gpe0_blk_len: int = acpi_pm.GPE0_BLK_LEN
    smi_cmd: int = acpi_pm.SMI_CMD
    acpi_enable: int = acpi_pm.ACPI_ENABLE
    acpi_disable: int = acpi_pm.ACPI_DISABLE
    sci_irq: int = acpi_pm.SCI_IRQ
    s5_slp_typ: int = acpi_pm.S5_SLP_TYP
    power_button: bool = True         # a fixed-feature power button in PM1 (PWR_BUTTON flag clear)
    reset_port: int = acpi_pm.RESET_CONTROL_PORT
    reset_value: int = acpi_pm.RESET_VALUE
    rtc_century: int = 0x32
    # interrupt controllers
    lapic_addr: int = LAPIC_ADDR
    ioapic_addr: int = IOAPIC_ADDR
    ioapic_id: int = 0
    ioapic_gsi_base: int = 0
    link_irqs: tuple[int, ...] = (5, 10, 11)   # what LNKA-LNKD may be routed to (QEMU's choice)
    # HPET
    hpet: bool = True
    hpet_addr: int = HPET_ADDR
    hpet_block_id: int = HPET_BLOCK_ID
    # PCI windows: [start, end] inclusive
    pci_hole: tuple[int, int] = (0xE000_0000, PCI_HOLE_END)
    pci_hole64: tuple[int, int] | None = None
    # ISA devices
    serial_ports: tuple[tuple[int, int], ...] = ((0x3F8, 4),)
    ps2_mouse: bool = True
    fw_cfg_port: int | None = 0x510   # None: no fw_cfg node
    fw_cfg_dma: bool = True
    # identification
    oem_id: str = "PYVMM "
    oem_table_id: str = "PYVM"        # each table's OEM table ID is this + its signature (8 at most)
    creator_id: str = "PYVM"
    extra_tables: tuple[bytes, ...] = field(default=())   # finished tables to list in RSDT/XSDT too

    def __post_init__(self) -> None:
        if not 1 <= self.cpus <= 255:
            raise ValueError("the MADT's xAPIC entries describe 1-255 CPUs")
        if len(self.oem_id) > 6 or len(self.oem_table_id) > 8 or len(self.creator_id) > 4:
            raise ValueError("OEM ID is 6 characters, OEM table ID 8, creator ID 4")
        start, end = self.pci_hole
        if not 0 < start <= end < 1 << 32:
            raise ValueError(f"32-bit PCI hole {start:#x}-{end:#x} is not below 4 GiB")
        if any(not 0 <= n <= 15 for n in (*self.link_irqs, self.sci_irq)):
            raise ValueError("link IRQs and the SCI are ISA IRQs 0-15")


# -- helpers -----------------------------------------------------------------------------------

def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with that byte 0) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _gas(space: int, bit_width: int, address: int, bit_offset: int = 0, access_size: int = 0) -> bytes:
    """A Generic Address Structure (5.2.3.2)."""
    return struct.pack("<BBBBQ", space, bit_width, bit_offset, access_size, address)


def _pad(text: str, n: int) -> bytes:
    return text.encode("ascii").ljust(n, b" ")[:n]


class _Linker:
    """Files of table data plus the pointer and checksum fixups between them (QEMU's BIOSLinker)."""

    def __init__(self) -> None:
        self.files: dict[str, bytearray] = {}
        self.commands: list[tuple] = []

    def allocate(self, name: str, align: int, zone: int) -> bytearray:
        blob = self.files[name] = bytearray()
        self.commands.append((CMD_ALLOCATE, name, align, zone))
        return blob

    def pointer(self, dest: str, offset: int, size: int, src: str, src_offset: int) -> None:
        """Field ``dest[offset:offset+size]`` holds ``src_offset``; installing adds ``src``'s address."""
        self.files[dest][offset:offset + size] = src_offset.to_bytes(size, "little")
        self.commands.append((CMD_ADD_POINTER, dest, src, offset, size))

    def checksum(self, name: str, start: int, length: int, at: int) -> None:
        blob = self.files[name]
        blob[at] = 0
        blob[at] = checksum(blob[start:start + length])
        self.commands.append((CMD_ADD_CHECKSUM, name, at, start, length))

    def loader(self) -> bytes:
        out = bytearray()
        for cmd in self.commands:
            if cmd[0] == CMD_ALLOCATE:
                _, name, align, zone = cmd
                body = struct.pack(f"<{LOADER_FILESZ}sIB", name.encode(), align, zone)
            elif cmd[0] == CMD_ADD_POINTER:
                _, dest, src, offset, size = cmd
                body = struct.pack(f"<{LOADER_FILESZ}s{LOADER_FILESZ}sIB", dest.encode(), src.encode(),
                                   offset, size)
            else:
                _, name, at, start, length = cmd
                body = struct.pack(f"<{LOADER_FILESZ}sIII", name.encode(), at, start, length)
            out += struct.pack("<I", cmd[0]) + body.ljust(LOADER_ENTRY_SIZE - 4, b"\0")
        return bytes(out)

    def link(self, bases: dict[str, int]) -> dict[str, bytes]:
        """Run the commands as SeaBIOS's romfile_loader does, with files at ``bases``."""
        files = {n: bytearray(b) for n, b in self.files.items()}
        for cmd in self.commands:
            if cmd[0] == CMD_ADD_POINTER:
                _, dest, src, offset, size = cmd
                value = int.from_bytes(files[dest][offset:offset + size], "little") + bases[src]
                if value >= 1 << (8 * size):
                    raise ValueError(f"{src} at {bases[src]:#x} does not fit a {size}-byte pointer in {dest}")
                files[dest][offset:offset + size] = value.to_bytes(size, "little")
            elif cmd[0] == CMD_ADD_CHECKSUM:
                _, name, at, start, length = cmd
                blob = files[name]
                blob[at] = (blob[at] - sum(blob[start:start + length])) & 0xFF
        return {n: bytes(b) for n, b in files.items()}


# -- the tables --------------------------------------------------------------------------------

class AcpiTables:
    """The ACPI tables of one machine, with the fixups that install them anywhere.

    ``offsets`` maps each table signature to its offset in "etc/acpi/tables".
    """

    def __init__(self, cfg: AcpiConfig | None = None) -> None:
        self.cfg = cfg = cfg or AcpiConfig()
        self._l = _Linker()
        self.offsets: dict[str, int] = {}
        blob = self._l.allocate(TABLES_FILE, 64, ZONE_HIGH)
        # FACS first: it is the one table with an alignment requirement (64 bytes).
        facs = self._add("FACS", self._facs(), checksummed=False)
        dsdt = self._add("DSDT", self._header("DSDT", DSDT_REVISION) + build_dsdt(cfg))
        # FIRMWARE_CTRL, DSDT, X_DSDT.  X_FIRMWARE_CTRL stays 0: "If the FIRMWARE_CTRL field
        # contains a non zero value then this field must be zero" (the FACS is below 4 GiB).
        fadt_pointers = [(36, 4, facs), (40, 4, dsdt), (140, 8, dsdt)]
        listed = [self._add("FACP", self._fadt(), pointers=fadt_pointers)]
        listed.append(self._add("APIC", self._header("APIC", MADT_REVISION) + madt_body(cfg)))
        if cfg.hpet:
            listed.append(self._add("HPET", self._header("HPET", 1) + hpet_body(cfg)))
        for extra in cfg.extra_tables:
            listed.append(self._add(extra[:4].decode("ascii"), bytearray(extra)))
        rsdt = self._add("RSDT", self._header("RSDT", 1) + bytes(4 * len(listed)),
                         pointers=[(HEADER_LEN + 4 * i, 4, off) for i, off in enumerate(listed)])
        xsdt = self._add("XSDT", self._header("XSDT", 1) + bytes(8 * len(listed)),
                         pointers=[(HEADER_LEN + 8 * i, 8, off) for i, off in enumerate(listed)])
        assert len(blob) == self.offsets["XSDT"] + len(self.table("XSDT"))
        rsdp = self._l.allocate(RSDP_FILE, 16, ZONE_FSEG)
        rsdp += struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, _pad(cfg.oem_id, 6), 2, 0, 36, 0, 0, b"\0\0\0")
        self._l.pointer(RSDP_FILE, 16, 4, TABLES_FILE, rsdt)
        self._l.pointer(RSDP_FILE, 24, 8, TABLES_FILE, xsdt)
        self._l.checksum(RSDP_FILE, 0, 20, 8)
        self._l.checksum(RSDP_FILE, 0, 36, 32)

    def _header(self, sig: str, revision: int) -> bytearray:
        """The 36-byte description header (5.2.6); length and checksum are filled in by _add."""
        c = self.cfg
        return bytearray(struct.pack("<4sIBB6s8sI4sI", sig.encode(), 0, revision, 0, _pad(c.oem_id, 6),
                                     _pad((c.oem_table_id + sig)[:8], 8),
                                     1, _pad(c.creator_id, 4), 1))

    def _add(self, sig: str, table: bytearray | bytes, pointers: list[tuple[int, int, int]] = (),
             checksummed: bool = True) -> int:
        blob = self._l.files[TABLES_FILE]
        while len(blob) % 8:
            blob.append(0)
        off = len(blob)
        table = bytearray(table)
        if checksummed:
            struct.pack_into("<I", table, 4, len(table))
        blob += table
        for at, size, target in pointers:
            self._l.pointer(TABLES_FILE, off + at, size, TABLES_FILE, target)
        if checksummed:
            self._l.checksum(TABLES_FILE, off, len(table), off + 9)
        self.offsets[sig] = off
        return off

    def table(self, sig: str) -> bytes:
        """A table as it stands in "etc/acpi/tables" (pointers hold offsets in that file)."""
        blob = self._l.files[TABLES_FILE]
        off = self.offsets[sig]
        (length,) = struct.unpack_from("<I", blob, off + 4)
        return bytes(blob[off:off + length])

    # -- the tables themselves ---------------------------------------------------------------------
    def _facs(self) -> bytearray:
        """FACS (5.2.10): signature, length 64, hardware signature 0, waking vectors 0, version 2."""
        facs = bytearray(FACS_LENGTH)
        struct.pack_into("<4sIIIII", facs, 0, b"FACS", FACS_LENGTH, 0, 0, 0, 0)
        struct.pack_into("<QB", facs, 24, 0, FACS_VERSION)
        return facs

    def _fadt(self) -> bytearray:
        """FADT (5.2.9, Table 5.9) revision 6; FACS/DSDT fields are filled by the pointer fixups."""
        c = self.cfg
        f = self._header("FACP", FADT_REVISION) + bytearray(FADT_LENGTH - HEADER_LEN)
        flags = F_WBINVD | F_PROC_C1 | F_SLP_BUTTON | F_RTC_S4 | F_RESET_REG_SUP | F_USE_PLATFORM_CLOCK
        if not c.power_button:
            flags |= F_PWR_BUTTON
        if c.pm_timer_32bit:
            flags |= F_TMR_VAL_EXT
        if c.cpus > 8:
            flags |= F_FORCE_APIC_CLUSTER_MODEL
        struct.pack_into("<BBHIBBBB", f, 44, 0, 0, c.sci_irq, c.smi_cmd, c.acpi_enable, c.acpi_disable, 0, 0)
        struct.pack_into("<IIIIIIII", f, 56, c.pm1a_evt_blk, 0, c.pm1a_cnt_blk, 0, 0, c.pm_tmr_blk,
                         c.gpe0_blk, 0)
        struct.pack_into("<BBBBBBBB", f, 88, c.pm1_evt_len, c.pm1_cnt_len, 0, c.pm_tmr_len, c.gpe0_blk_len,
                         0, 0, 0)
        struct.pack_into("<HHHHBBBBBHB", f, 96, 0xFFF, 0xFFF, 0, 0, 0, 0, 0, 0, c.rtc_century,
                         BOOT_LEGACY_DEVICES | BOOT_8042, 0)
        struct.pack_into("<I", f, 112, flags)
        f[116:128] = _gas(GAS_SYSTEM_IO, 8, c.reset_port)
        struct.pack_into("<BHB", f, 128, c.reset_value, 0, 0)      # reset value, ARM boot arch, minor 0
        f[148:160] = _gas(GAS_SYSTEM_IO, 8 * c.pm1_evt_len, c.pm1a_evt_blk)
        f[172:184] = _gas(GAS_SYSTEM_IO, 8 * c.pm1_cnt_len, c.pm1a_cnt_blk)
        f[208:220] = _gas(GAS_SYSTEM_IO, 8 * c.pm_tmr_len, c.pm_tmr_blk)
        f[220:232] = _gas(GAS_SYSTEM_IO, 8 * c.gpe0_blk_len, c.gpe0_blk)
        return f

    # -- installing them ---------------------------------------------------------------------------
    def fw_cfg_files(self) -> dict[str, bytes]:
        """The three fw_cfg files SeaBIOS installs the tables from (QEMU's names)."""
        return {TABLES_FILE: bytes(self._l.files[TABLES_FILE]), RSDP_FILE: bytes(self._l.files[RSDP_FILE]),
                LOADER_FILE: self._l.loader()}

    @property
    def size(self) -> int:
        """Bytes the tables take (what ``place`` writes at ``tables_addr``)."""
        return len(self._l.files[TABLES_FILE])

    def place(self, tables_addr: int, rsdp_addr: int) -> list[tuple[int, bytes]]:
        """The tables linked for fixed addresses: ``[(tables_addr, tables), (rsdp_addr, rsdp)]``.

        ``rsdp_addr`` must be 16-byte aligned inside 0xE0000-0xFFFFF; ``tables_addr`` 64-byte
        aligned (the FACS comes first) with the tables below 4 GiB (the RSDT and the FADT's
        32-bit fields hold their addresses).
        """
        if rsdp_addr % 16 or not RSDP_AREA[0] <= rsdp_addr <= RSDP_AREA[1] - 36:
            raise ValueError(f"the RSDP at {rsdp_addr:#x} must be 16-byte aligned in 0xE0000-0xFFFFF")
        if tables_addr % 64 or tables_addr < 0 or tables_addr + self.size > 1 << 32:
            raise ValueError(f"ACPI tables at {tables_addr:#x} must be 64-byte aligned and below 4 GiB")
        if tables_addr < rsdp_addr + 36 and rsdp_addr < tables_addr + self.size:
            raise ValueError("the RSDP and the tables overlap")
        linked = self._l.link({TABLES_FILE: tables_addr, RSDP_FILE: rsdp_addr})
        return [(tables_addr, linked[TABLES_FILE]), (rsdp_addr, linked[RSDP_FILE])]


def madt_body(cfg: AcpiConfig) -> bytes:
    """MADT (5.2.12) after the header: local APIC address, flags, then the entries."""
    out = struct.pack("<II", cfg.lapic_addr, 1)                      # PCAT_COMPAT: 8259s present
    for i in range(cfg.cpus):
        out += struct.pack("<BBBBI", 0, 8, i, i, 1)                  # Processor Local APIC, enabled
    out += struct.pack("<BBBBII", 1, 12, cfg.ioapic_id, 0, cfg.ioapic_addr, cfg.ioapic_gsi_base)
    out += struct.pack("<BBBBIH", 2, 10, 0, 0, cfg.ioapic_gsi_base + 2, 0)   # IRQ0 -> GSI 2
    for irq in sorted({*cfg.link_irqs, cfg.sci_irq}):
        # PCI-routed ISA IRQs and the SCI: level-triggered, active high (flags 0b1101), as QEMU
        out += struct.pack("<BBBBIH", 2, 10, 0, irq, cfg.ioapic_gsi_base + irq, 0x000D)
    out += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)                   # Local APIC NMI: all CPUs, LINT1
    return out


def hpet_body(cfg: AcpiConfig) -> bytes:
    """HPET description table after the header (IA-PC HPET 1.0a, 3.2.4, Table 3)."""
    return (struct.pack("<I", cfg.hpet_block_id & 0xFFFF_FFFF) + _gas(GAS_SYSTEM_MEMORY, 0, cfg.hpet_addr)
            + struct.pack("<BHB", 0, 0, 0))


# -- the DSDT ------------------------------------------------------------------------------------

def _pci0_crs(cfg: AcpiConfig) -> bytes:
    start, end = cfg.pci_hole
    descs = [
        aml.word_bus_number(0, 0xFF),
        aml.io(0x0CF8, 0x0CF8, 1, 8),                         # the config ports themselves
        aml.word_io(0x0000, 0x0CF7),
        aml.word_io(0x0D00, 0xFFFF),
        aml.dword_memory(0xA0000, 0xBFFFF, cacheable=aml.CACHE_CACHEABLE),   # VGA / legacy window
        aml.dword_memory(start, end),                          # 32-bit PCI hole below the I/O APIC
    ]
    if cfg.pci_hole64 is not None:
        lo, hi = cfg.pci_hole64
        descs.append(aml.qword_memory(lo, hi, cacheable=aml.CACHE_CACHEABLE))
    return aml.resource_template(*descs)


def _prt(sci_link: bool = True) -> bytes:
    """_PRT (6.2.13): every slot's INTA-D; Address = slot << 16 | 0xFFFF (any function)."""
    entries = []
    for slot in range(32):
        for pin in range(4):
            if sci_link and (slot, pin) == (1, 0):
                link = SCI_LINK
            else:
                link = PIRQ_LINKS[piix3.pirq_of(slot, pin + 1)]
            entries.append(aml.package((slot << 16) | 0xFFFF, pin, aml.name_ref(link), 0))
    return aml.name("_PRT", aml.package(*entries))


def _link_methods(cfg: AcpiConfig) -> list[bytes]:
    """IQST(reg) and IQCR(reg): _STA and _CRS of a link from its PIIX3 route register."""
    iqst = aml.method("IQST", 1,
                      aml.if_(aml.and_(0x80, aml.arg(0)), aml.ret(0x09)),   # routing disabled: present, off
                      aml.ret(0x0B))
    iqcr = aml.method("IQCR", 1,
                      aml.name("PRR0", aml.resource_template(aml.interrupt(0, shared=True))),
                      aml.create_dword_field(aml.name_ref("PRR0"), 5, "PRRI"),
                      aml.if_(aml.lless(aml.arg(0), 0x80), aml.store(aml.arg(0), aml.name_ref("PRRI"))),
                      aml.ret(aml.name_ref("PRR0")),
                      serialized=True)
    return [iqst, iqcr]


def _link_device(name: str, uid: int, reg: str, cfg: AcpiConfig) -> bytes:
    """A PCI interrupt link (PNP0C0F, 6.2.13) over one PIIX3 PIRQ route register."""
    r = aml.name_ref(reg)
    return aml.device(
        name,
        aml.name("_HID", aml.eisa_id("PNP0C0F")),
        aml.name("_UID", uid),
        aml.name("_PRS", aml.resource_template(aml.interrupt(*cfg.link_irqs, shared=True))),
        aml.method("_STA", 0, aml.ret(aml.call("IQST", r))),
        aml.method("_DIS", 0, aml.or_(r, 0x80, r)),
        aml.method("_CRS", 0, aml.ret(aml.call("IQCR", r))),
        aml.method("_SRS", 1, aml.create_dword_field(aml.arg(0), 5, "PRRI"),
                   aml.store(aml.name_ref("PRRI"), r)),
    )


def _sci_link(cfg: AcpiConfig) -> bytes:
    """LNKS: the SCI's fixed link (PIIX4 PM function 00:01.3 INTA), always cfg.sci_irq."""
    return aml.device(
        SCI_LINK,
        aml.name("_HID", aml.eisa_id("PNP0C0F")),
        aml.name("_UID", 4),
        aml.name("_PRS", aml.resource_template(aml.interrupt(cfg.sci_irq, shared=True))),
        aml.method("_STA", 0, aml.ret(0x0B)),
        aml.method("_DIS", 0),
        aml.method("_CRS", 0, aml.ret(aml.name_ref("_PRS"))),
        aml.method("_SRS", 1),
    )


def _isa_devices(cfg: AcpiConfig) -> list[bytes]:
    devs = [
        aml.device("RTC", aml.name("_HID", aml.eisa_id("PNP0B00")),
                   aml.name("_CRS", aml.resource_template(aml.io(0x70, 0x70, 1, 8), aml.irq_no_flags(8)))),
        aml.device("KBD", aml.name("_HID", aml.eisa_id("PNP0303")),
                   aml.name("_CRS", aml.resource_template(aml.io(0x60, 0x60, 1, 1), aml.io(0x64, 0x64, 1, 1),
                                                          aml.irq_no_flags(1)))),
    ]
    if cfg.ps2_mouse:
        devs.append(aml.device("MOU", aml.name("_HID", aml.eisa_id("PNP0F13")),
                               aml.name("_CRS", aml.resource_template(aml.irq_no_flags(12)))))
    for i, (port, irq) in enumerate(cfg.serial_ports):
        devs.append(aml.device(f"COM{i + 1}", aml.name("_HID", aml.eisa_id("PNP0501")),
                               aml.name("_UID", i + 1),
                               aml.name("_CRS", aml.resource_template(aml.io(port, port, 1, 8),
                                                                      aml.irq_no_flags(irq)))))
    if cfg.hpet:
        devs.append(aml.device("HPET", aml.name("_HID", aml.eisa_id("PNP0103")), aml.name("_UID", 0),
                               aml.name("_CRS", aml.resource_template(
                                   aml.memory32_fixed(cfg.hpet_addr, HPET_LEN, writable=False)))))
    return devs


def build_dsdt(cfg: AcpiConfig) -> bytes:
    """The DSDT's AML (the definition block after the header)."""
    isa = aml.device(
        "ISA",
        aml.name("_ADR", 0x0001_0000),                                 # 00:01.0, the PIIX3 PCI-ISA bridge
        aml.op_region("P40C", aml.PCI_CONFIG, piix3.PIRQRC, piix3.PIRQ_COUNT),
        aml.field("P40C", [("PRQ0", 8), ("PRQ1", 8), ("PRQ2", 8), ("PRQ3", 8)], aml.BYTE_ACC),
        *_isa_devices(cfg),
    )
    pci0 = [
        aml.name("_HID", aml.eisa_id("PNP0A03")),
        aml.name("_ADR", 0),
        aml.name("_UID", 0),
        aml.name("_BBN", 0),
        aml.name("_CRS", _pci0_crs(cfg)),
        _prt(),
        isa,
    ]
    if cfg.fw_cfg_port is not None:
        span = 4 + 8 if cfg.fw_cfg_dma else 2
        pci0.append(aml.device("FWCF", aml.name("_HID", aml.string("QEMU0002")), aml.name("_STA", 0x0B),
                               aml.name("_CRS", aml.resource_template(
                                   aml.io(cfg.fw_cfg_port, cfg.fw_cfg_port, 1, span)))))
    sb = [aml.device("PCI0", *pci0), *_link_methods(cfg)]
    sb += [_link_device(n, i, f"\\_SB.PCI0.ISA.PRQ{i}", cfg) for i, n in enumerate(PIRQ_LINKS)]
    sb.append(_sci_link(cfg))
    sb += [aml.device(f"C{i:03X}", aml.name("_HID", aml.string("ACPI0007")), aml.name("_UID", i))
           for i in range(cfg.cpus)]
    s5 = aml.name("_S5", aml.package(cfg.s5_slp_typ, cfg.s5_slp_typ, 0, 0))
    return aml.scope("\\_SB", *sb) + aml.scope("\\", s5)
