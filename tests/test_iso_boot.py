"""A CD-ROM image boots (issue 12): El Torito no-emulation boot from the IDE CD-ROM
(vmm/firmware/eltorito.py), with the built-in BIOS and with SeaBIOS.

* A hand-made El Torito disc whose boot image asks INT 13h AX=4B01h for the
  specification packet, reads a 2048-byte sector through AH=42h and prints
  what it got on COM1: the BIOS's side of the El Torito spec, checked byte
  for byte, in a few thousand instructions.
* An ISO made by Debian's grub-mkrescue (tools/grubimage.py) holding the
  Multiboot demo kernel: GRUB boots from the CD, reads its modules and
  grub.cfg from the ISO 9660 file system through INT 13h in 2048-byte
  sectors, and loads the kernel from the CD, whose serial output is the
  demo's.  Once with the built-in BIOS (``-cdrom`` and QEMU's
  ``--drive ...,media=cdrom``), once under SeaBIOS (``--bios``).

GRUB's BIOS-call trampoline rewrites four immediates of its own real-mode
code before each call; the shadow MMU used to run the block of the last three
stale (tests/test_shadow_smc.py), so the GRUB runs are made under both MMU modes.

Discs that cannot be booted (no El Torito record, an emulation-mode image)
are one line and exit status 2.
"""
from __future__ import annotations

import struct

import pytest

from guests.build import guest_path
from tests.realguests import _available, debian_seabios  # noqa: F401  (a fixture)
from tools import cli, debian, grubimage
from vmm.firmware import eltorito

DEMO_DONE = b"[demo] all tasks done, exiting with status 0"
CD = 2048
CATALOG, BOOT, DATA = 19, 20, 30
MARKER = b"EL-TORITO-DATA!\n"


def _boot_code() -> bytes:
    """Real mode at 07C0:0000.  4B01h into 07C0:0200, AH=42h (DAP at 07C0:0300) of sector
    DATA into 07C0:0400, then COM1 gets the sector's first 16 bytes and the packet's first
    19; a failed call prints 'F' and AH.  Then cli; hlt."""
    code = bytearray()
    code += b"\x8c\xc8\x8e\xd8\x8e\xc0"              # mov ax,cs; mov ds,ax; mov es,ax
    code += b"\x88\x16\xf0\x01"                      # mov [1F0h],dl
    code += b"\xbe\x00\x02\xb8\x01\x4b\xcd\x13"      # mov si,200h; mov ax,4B01h; int 13h
    jc1 = len(code)
    code += b"\x72\x00"                              # jc fail
    code += b"\x8a\x16\xf0\x01"                      # mov dl,[1F0h]
    code += b"\xbe\x00\x03\xb4\x42\xcd\x13"          # mov si,300h; mov ah,42h; int 13h
    jc2 = len(code)
    code += b"\x72\x00"                              # jc fail
    code += b"\xba\xf8\x03"                          # mov dx,3F8h
    code += b"\xbe\x00\x04\xb9\x10\x00"              # mov si,400h; mov cx,16
    code += b"\xac\xee\xe2\xfc"                      # lodsb; out dx,al; loop
    code += b"\xbe\x00\x02\xb9\x13\x00"              # mov si,200h; mov cx,13h
    code += b"\xac\xee\xe2\xfc"                      # lodsb; out dx,al; loop
    code += b"\xfa\xf4"                              # cli; hlt
    fail = len(code)
    code += b"\x88\xe3\xba\xf8\x03\xb0\x46\xee\x88\xd8\xee\xfa\xf4"  # mov bl,ah; 'F'; out; mov al,bl; out; cli; hlt
    for at in (jc1, jc2):
        code[at + 1] = fail - (at + 2)
    image = bytearray(CD)
    image[:len(code)] = code
    image[0x300:0x310] = struct.pack("<BBHHHQ", 16, 0, 1, 0x400, 0x07C0, DATA)
    return bytes(image)


def _validation_entry(platform: int = 0) -> bytes:
    e = bytearray(struct.pack("<BBH24sHBB", 1, platform, 0, b"vmm test".ljust(24, b"\0"), 0, 0x55, 0xAA))
    struct.pack_into("<H", e, 28, -sum(struct.unpack("<16H", bytes(e))) & 0xFFFF)
    return bytes(e)


def make_disc(path, media: int = 0, boot_record: bool = True) -> None:
    """A 32-sector ISO 9660 skeleton with an El Torito catalog booting _boot_code."""
    disc = bytearray(32 * CD)
    disc[16 * CD:16 * CD + 7] = b"\x01CD001\x01"                  # primary volume descriptor (its head)
    if boot_record:
        brvd = b"\x00CD001\x01" + b"EL TORITO SPECIFICATION".ljust(32, b"\0")
        disc[17 * CD:17 * CD + len(brvd)] = brvd
        struct.pack_into("<I", disc, 17 * CD + 0x47, CATALOG)
    disc[18 * CD:18 * CD + 7] = b"\xffCD001\x01"                  # descriptor set terminator
    catalog = _validation_entry() + struct.pack("<BBHBBHI20x", 0x88, media, 0, 0, 0, 4, BOOT)
    disc[CATALOG * CD:CATALOG * CD + len(catalog)] = catalog
    disc[BOOT * CD:(BOOT + 1) * CD] = _boot_code()
    disc[DATA * CD:DATA * CD + len(MARKER)] = MARKER
    path.write_bytes(bytes(disc))


class _Medium:
    """An AtapiCdrom stand-in for eltorito.CdDrive: a disc held in bytes."""

    def __init__(self, data: bytes) -> None:
        self.data, self.medium, self.sectors = data, True, len(data) // CD

    def read_media(self, offset: int, n: int) -> bytes:
        return self.data[offset:offset + n]


def test_the_catalog_names_the_boot_image(tmp_path):
    make_disc(tmp_path / "t.iso")
    cd = eltorito.CdDrive(_Medium((tmp_path / "t.iso").read_bytes()))
    entry = eltorito.boot_entry(cd)
    assert entry == eltorito.BootEntry(0, 0x07C0, 4, BOOT)
    assert eltorito.load_boot_image(cd, entry, 1 << 20) == _boot_code()
    assert eltorito.spec_packet(0xE0, entry) == (b"\x13\x00\xe0\x00" + struct.pack("<I", BOOT) + bytes(4)
                                                 + b"\xc0\x07\x04\x00" + bytes(3))
    assert cd.read(DATA, 1)[:len(MARKER)] == MARKER and cd.read(31, 2) is None


@pytest.mark.parametrize("drive", ["-cdrom {}", "--drive file={},media=cdrom"])
def test_the_bios_boots_the_disc_and_serves_it_in_2048_byte_sectors(tmp_path, drive, capsys):
    iso = tmp_path / "t.iso"
    make_disc(iso)
    serial = tmp_path / "serial.bin"
    status = cli.main(["run", *drive.format(iso).split(), "--serial", str(serial), "--max-instructions", "200000"])
    out = serial.read_bytes()
    assert status == 0, capsys.readouterr().err
    assert out[:16] == MARKER, out                     # AH=42h read CD sector DATA, not 512-byte sector DATA
    assert out[16:] == eltorito.spec_packet(0xE0, eltorito.BootEntry(0, 0x07C0, 4, BOOT)), out.hex()


@pytest.mark.parametrize("case,words", [
    ("no boot record", "no El Torito boot record"),
    ("floppy emulation", "1.44M floppy emulation"),
])
def test_a_disc_that_cannot_boot_is_one_line_and_status_2(tmp_path, case, words, capsys):
    iso = tmp_path / "t.iso"
    make_disc(iso, media=2 if case == "floppy emulation" else 0, boot_record=case != "no boot record")
    status = cli.main(["run", "-cdrom", str(iso), "--serial", "none", "--max-instructions", "100000"])
    err = capsys.readouterr().err
    assert status == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_a_hard_disk_boots_before_the_cd_unless_boot_cdrom(tmp_path, capsys):
    """QEMU's order: -hda first; --boot cdrom picks the CD."""
    iso, disk = tmp_path / "t.iso", tmp_path / "d.img"
    make_disc(iso)
    sector = bytearray(512)
    sector[:6] = b"\xb0\x48\xe6\x00\xfa\xf4"         # mov al,'H'; out 0,al (nothing there); cli; hlt
    sector[510:] = b"\x55\xaa"
    disk.write_bytes(bytes(sector) * 8)
    for extra, first in (([], b""), (["--boot", "cdrom"], MARKER)):
        serial = tmp_path / "s.bin"
        status = cli.main(["run", "-hda", str(disk), "-cdrom", str(iso), *extra, "--serial", str(serial),
                           "--max-instructions", "200000"])
        assert status == 0, capsys.readouterr().err
        assert serial.read_bytes()[:16] == first


@pytest.fixture(scope="module")
def grub_iso(tmp_path_factory):
    out = tmp_path_factory.mktemp("iso") / "grub.iso"
    try:
        return grubimage.rescue_iso(out, {"boot/demo.elf": guest_path("demo").read_bytes()},
                                    grubimage.multiboot_cfg("/boot/demo.elf"))
    except debian.DebianUnavailable as e:
        pytest.skip(f"Debian packages unavailable: {e}")


def test_grub_mkrescue_made_an_el_torito_no_emulation_disc(grub_iso):
    cd = eltorito.CdDrive(_Medium(grub_iso.read_bytes()))
    entry = eltorito.boot_entry(cd)
    assert entry.media == eltorito.NO_EMULATION and entry.load_segment == 0x07C0
    assert entry.sector_count == 4                     # GRUB's cdboot.img: one CD sector that loads the rest


@pytest.mark.parametrize("how,mmu", [("-cdrom {}", "shadow"), ("--drive file={},media=cdrom,if=ide,index=2", "nested")])
def test_the_builtin_bios_boots_grub_from_the_cd_into_a_multiboot_kernel(grub_iso, how, mmu, tmp_path):
    serial = tmp_path / "serial.txt"
    status = cli.main(["run", *how.format(grub_iso).split(), "--mmu", mmu, "--mem", "128M",
                       "--serial", str(serial), "--max-instructions", "400000000"])
    out = serial.read_bytes()
    assert DEMO_DONE in out, out[-1500:]
    assert status == 0


def test_seabios_boots_grub_from_the_cd_into_a_multiboot_kernel(grub_iso, debian_seabios, tmp_path):  # noqa: F811
    serial = tmp_path / "serial.txt"
    status = cli.main(["run", "--bios", str(debian_seabios), "-cdrom", str(grub_iso),
                       "--mem", "128M", "--serial", str(serial), "--max-instructions", "400000000"])
    out = serial.read_bytes()
    assert b"Booting from DVD/CD" in out and b"Welcome to GRUB" in out, out[-1500:]
    assert DEMO_DONE in out, out[-1500:]
    assert status == 0


def test_a_cd_boot_records_and_replays(tmp_path, capsys):
    iso, log = tmp_path / "t.iso", tmp_path / "t.log"
    make_disc(iso)
    rec, rep = tmp_path / "rec.bin", tmp_path / "rep.bin"
    assert cli.main(["record", "-cdrom", str(iso), "--serial", str(rec), "--max-instructions", "200000",
                     "-o", str(log)]) == 0, capsys.readouterr().err
    assert cli.main(["replay", str(log), "--serial", str(rep)]) == 0, capsys.readouterr().err
    assert rec.read_bytes()[:16] == MARKER and rep.read_bytes() == rec.read_bytes()


def test_a_snapshot_of_a_cd_booted_run_restores(tmp_path, capsys):
    """The CD is read-only, and a snapshot taken mid-run restores with it (it used to lack the
    drive's overlay part and was refused)."""
    iso, snap = tmp_path / "t.iso", tmp_path / "s.snap"
    make_disc(iso)
    first, rest = tmp_path / "a.bin", tmp_path / "b.bin"
    assert cli.main(["run", "-cdrom", str(iso), "--serial", str(first), "--save-at", f"20:{snap}",
                     "--max-instructions", "200000"]) == 0, capsys.readouterr().err
    assert cli.main(["run", "--restore", str(snap), "--serial", str(rest), "--max-instructions", "200000"]) == 0, \
        capsys.readouterr().err
    whole = first.read_bytes()
    assert whole[:16] == MARKER and len(rest.read_bytes()) > 0 and whole.endswith(rest.read_bytes())
