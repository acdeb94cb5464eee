"""Booting from a CD-ROM: the El Torito boot catalog, and the CD drive as INT 13h sees it.

Sources: "El Torito" Bootable CD-ROM Format Specification 1.0 (Phoenix/IBM,
1995): section 2.0 (the Boot Record Volume Descriptor at sector 17 of the ISO
9660 volume: type 0, "CD001", version 1, "EL TORITO SPECIFICATION", and the
boot catalog's sector as a little-endian dword at offset 47h), 2.1-2.3 (the
catalog's 32-byte entries: a validation entry whose words sum to zero and
that ends in 55h AAh, then the initial/default entry: boot indicator 88h,
media type, load segment (0 means 07C0h), sector count in 512-byte virtual
sectors, load RBA in 2048-byte CD sectors), 2.4-2.5 (section headers 90h/91h
and their entries, for platforms other than the default), and 5.0 (INT 13h
AX=4B00h/4B01h return the 13h-byte specification packet at DS:SI).

Only the no-emulation mode is offered: the boot image is loaded and run at
load_segment:0 with DL = the CD's drive number, and INT 13h reaches the
whole medium through the EDD functions in 2048-byte sectors (what GRUB's
cdboot.img and biosdisk module, ISOLINUX and Windows' etfsboot rely on).
Floppy and hard-disk emulation (media types 1-4) are refused with a line
saying so; images made with xorriso, genisoimage or grub-mkrescue for BIOS
boot use no emulation.

The drive reads through the ATAPI device's own medium (``AtapiCdrom.read_media``),
so the BIOS and a guest's ATAPI driver see one disc, and an open tray is no
disc for either.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

CD_SECTOR = 2048
VIRTUAL_SECTOR = 512
FIRST_CD_DRIVE = 0xE0              # the drive number BIOSes (Bochs', SeaBIOS) give the first CD
BOOT_RECORD_LBA = 17
EL_TORITO_ID = b"EL TORITO SPECIFICATION"
DEFAULT_LOAD_SEGMENT = 0x07C0
NO_EMULATION = 0
PLATFORM_X86 = 0
BOOTABLE = 0x88
SECTION_HEADER, LAST_SECTION_HEADER = 0x90, 0x91
SPEC_PACKET_SIZE = 0x13
MEDIA_NAMES = {1: "1.2M floppy", 2: "1.44M floppy", 3: "2.88M floppy", 4: "hard disk"}
CATALOG_SECTORS = 4                # entries looked at: 4 sectors of 64 (a boot menu longer than that is not read)


class ElToritoError(ValueError):
    """A disc that cannot be booted the El Torito way; one line saying why."""


@dataclass(frozen=True)
class BootEntry:
    """The catalog entry a BIOS boots (El Torito 2.2)."""
    media: int
    load_segment: int
    sector_count: int              # 512-byte virtual sectors
    load_rba: int                  # 2048-byte CD sectors

    @property
    def image_bytes(self) -> int:
        return self.sector_count * VIRTUAL_SECTOR


class CdDrive:
    """An ATAPI CD-ROM as the BIOS reads it: ``read`` in 2048-byte sectors, None when the
    range is off the disc, there is no disc, or the medium fails."""

    def __init__(self, device: Any) -> None:
        self.device = device

    @property
    def present(self) -> bool:
        return bool(self.device.medium)

    @property
    def sectors(self) -> int:
        return int(self.device.sectors) if self.present else 0

    def read(self, lba: int, count: int) -> bytes | None:
        if not self.present or lba < 0 or count < 0 or lba + count > self.sectors:
            return None
        if count == 0:
            return b""
        try:
            return self.device.read_media(lba * CD_SECTOR, count * CD_SECTOR)
        except Exception:  # noqa: BLE001  (the device's MediaError: the image layer failed)
            return None


def cd_drives(machine: Any) -> dict[int, CdDrive]:
    """The machine's IDE CD-ROM drives, numbered from E0h in channel/unit order."""
    ide = getattr(machine, "ide", None)
    out: dict[int, CdDrive] = {}
    if ide is None:
        return out
    for ch in ide.channels:
        for dev in ch.drives:
            if getattr(dev, "kind", None) == "cdrom":
                out[FIRST_CD_DRIVE + len(out)] = CdDrive(dev)
    return out


def _sector(cd: CdDrive, lba: int, what: str) -> bytes:
    data = cd.read(lba, 1)
    if data is None:
        raise ElToritoError(f"the disc has no {what} (sector {lba} cannot be read)")
    return data


def boot_entry(cd: CdDrive) -> BootEntry:
    """The entry to boot: the initial/default entry if it is bootable, else the first
    bootable x86 entry of a section (El Torito 2.4)."""
    if not cd.present:
        raise ElToritoError("the CD-ROM drive holds no disc")
    brvd = _sector(cd, BOOT_RECORD_LBA, "boot record")
    if brvd[0] != 0 or brvd[1:6] != b"CD001" or brvd[6] != 1 or brvd[7:7 + 32].rstrip(b"\0 ") != EL_TORITO_ID:
        raise ElToritoError("the disc is not bootable: sector 17 is no El Torito boot record")
    (catalog_lba,) = struct.unpack_from("<I", brvd, 0x47)
    catalog = b"".join(cd.read(catalog_lba + i, 1) or b"" for i in range(CATALOG_SECTORS))
    if len(catalog) < CD_SECTOR:
        raise ElToritoError(f"the disc's boot catalog (sector {catalog_lba}) cannot be read")
    validation = catalog[:32]
    if (validation[0] != 1 or validation[30:32] != b"\x55\xaa"
            or sum(struct.unpack("<16H", validation)) & 0xFFFF != 0):
        raise ElToritoError("the disc's boot catalog has no valid validation entry")
    entries = [catalog[i:i + 32] for i in range(32, len(catalog), 32)]
    candidates = []
    if validation[1] == PLATFORM_X86:
        candidates.append(entries[0])
    platform, i = None, 1
    while i < len(entries):
        e = entries[i]
        i += 1
        if e[0] in (SECTION_HEADER, LAST_SECTION_HEADER):
            platform = e[1]
            n = struct.unpack_from("<H", e, 2)[0]
            if platform == PLATFORM_X86:
                candidates += [x for x in entries[i:i + n]]
            i += n
            if e[0] == LAST_SECTION_HEADER:
                break
    for e in candidates:
        if e[0] != BOOTABLE:
            continue
        media = e[1] & 0x0F
        if media != NO_EMULATION:
            raise ElToritoError(f"the disc boots in {MEDIA_NAMES.get(media, f'media type {media}')} emulation, "
                                f"which this BIOS does not offer (no-emulation images only)")
        seg, count, rba = struct.unpack_from("<H", e, 2)[0], struct.unpack_from("<H", e, 6)[0], \
            struct.unpack_from("<I", e, 8)[0]
        return BootEntry(NO_EMULATION, seg or DEFAULT_LOAD_SEGMENT, count or 4, rba)
    raise ElToritoError("the disc's boot catalog has no bootable x86 entry")


def load_boot_image(cd: CdDrive, entry: BootEntry, memory_size: int) -> bytes:
    """The boot image's bytes (sector_count virtual sectors from load_rba)."""
    start = entry.load_segment << 4
    if start < 0x500 or start + entry.image_bytes > min(memory_size, 0xA0000):
        raise ElToritoError(f"the boot image ({entry.image_bytes} bytes at {entry.load_segment:04x}:0000) "
                            f"does not fit in conventional memory")
    whole = -(-entry.image_bytes // CD_SECTOR)
    data = cd.read(entry.load_rba, whole)
    if data is None:
        raise ElToritoError(f"the boot image (sector {entry.load_rba}, {whole} sectors) cannot be read")
    return data[:entry.image_bytes]


def spec_packet(drive: int, entry: BootEntry) -> bytes:
    """INT 13h AX=4B01h's specification packet (El Torito table 13) for a no-emulation boot."""
    return struct.pack("<BBBBIHHHHBBB", SPEC_PACKET_SIZE, entry.media, drive, 0, entry.load_rba, 0, 0,
                       entry.load_segment, entry.sector_count, 0, 0, 0)
