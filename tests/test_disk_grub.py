"""GRUB from a disk (issue 12): an image with GRUB installed at test time from Debian's
grub-pc-bin (tools/grubimage.py), attached as the IDE primary master (-hda) and as a
virtio-blk disk, boots through SeaBIOS (--bios) into the Multiboot demo kernel, whose
serial output is the same as from a direct Multiboot boot.

The packages come from tools/debian.py; without them the test skips and says why.
"""
from __future__ import annotations

import pytest

from guests.build import guest_path
from tests.realguests import _available, debian_seabios  # noqa: F401  (a fixture)
from tools import cli, debian, grubimage

DEMO_DONE = b"[demo] all tasks done, exiting with status 0"


@pytest.fixture(scope="module")
def grub_disk(tmp_path_factory):
    out = tmp_path_factory.mktemp("grub") / "grub.img"
    kernel = guest_path("demo").read_bytes()
    try:
        return grubimage.disk_image(out, {"boot/demo.elf": kernel}, grubimage.multiboot_cfg("/boot/demo.elf"))
    except debian.DebianUnavailable as e:
        pytest.skip(f"Debian packages unavailable: {e}")


def test_the_image_is_grub_on_an_mbr_disk(grub_disk):
    data = grub_disk.read_bytes()
    assert data[510:512] == b"\x55\xaa" and b"GRUB" in data[:512]
    assert data[0x1BE + 4] == grubimage.PART_TYPE_LINUX
    assert int.from_bytes(data[0x1BE + 8:0x1BE + 12], "little") == grubimage.PART_START
    assert data[grubimage.PART_START * 512 + 1024 + 56:][:2] == b"\x53\xef"     # the ext2 superblock's magic


@pytest.mark.parametrize("drive", ["-hda {}", "--drive=file={},if=virtio"])
def test_seabios_boots_grub_from_the_disk_into_a_multiboot_kernel(grub_disk, debian_seabios, drive,  # noqa: F811
                                                                   tmp_path):
    serial = tmp_path / "serial.txt"
    status = cli.main(["run", "--bios", str(debian_seabios), *drive.format(grub_disk).split(), "--mem", "128M",
                       "--serial", str(serial), "--max-instructions", "2000000000"])
    out = serial.read_bytes()
    assert b"Booting from Hard Disk" in out and b"Welcome to GRUB" in out, out[-1500:]
    assert DEMO_DONE in out, out[-1500:]
    assert status == 0
    # the guest wrote nothing it should not have: the image is as GRUB's installer left it
    assert b"GRUB" in grub_disk.read_bytes()[:512]
