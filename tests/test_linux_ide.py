"""Debian's Linux on the PIIX3 IDE controller (issue 12): ata_piix drives a disk made at test
time with Debian's mke2fs; the guest mounts it, writes and syncs files, mounts it again to read
them back from the disk, and powers off; on the host e2fsck -fn finds the file system clean and
debugfs reads the files back.  Once with PIO only (libata dma=0) and a CD-ROM on the secondary channel, once with bus-master DMA and a
CD-ROM beside the disk (sr_mod over ATAPI, DMA for the reads, an ISO 9660 image made by xorriso), once on a qcow2 linked clone
whose base stays byte-identical.

Packages come from tools/debian.py; without them the tests skip and say why.  The ext4 helpers
are the virtio-blk test's.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from devices.storage.ide import attach_ide
from host.images import create as qcow2_create
from host.images import open_image
from host.serial import NullBackend
from tests.realguests import _available, debian_kernel, debian_modules  # noqa: F401  (fixtures)
from tests.test_linux_virtio_blk import (  # noqa: F401  (e2fsprogs is a fixture)
    BASE_TEXT,
    NUMBERS,
    debugfs_cat,
    e2fsprogs,
    fsck_clean,
    make_ext4,
)
from tools import debian

MODULES = ["ata_piix", "sd_mod", "sr_mod", "isofs", "ext4", "crc32c_generic"]
CMDLINE = "console=ttyS0 panic=-1"
LIMIT = 40_000_000_000
CD_TEXT = b"read from the CD-ROM over ATAPI\n"

GUEST = """echo IDE-TEST-START
i=0; while [ ! -b /dev/sda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "xfer $(cat /sys/class/ata_device/dev1.0/xfer_mode)"
mkdir -p /mnt/a /mnt/cd
mount -t ext4 /dev/sda /mnt/a && echo MOUNTED
cat /mnt/a/base.txt 2>/dev/null
echo "written by the guest over IDE" > /mnt/a/hello.txt
seq 1 20000 > /mnt/a/numbers.txt
mkdir /mnt/a/dir
for i in $(seq 1 40); do echo "file $i" > /mnt/a/dir/f$i; done
rm -f /mnt/a/gone.txt
sync
umount /mnt/a && echo UNMOUNTED
mount -t ext4 -o ro /dev/sda /mnt/a && echo "again $(md5sum < /mnt/a/numbers.txt)" && umount /mnt/a
if [ -b /dev/sr0 ]; then mount -t iso9660 -o ro /dev/sr0 /mnt/cd && cat /mnt/cd/cd.txt && umount /mnt/cd; fi
echo IDE-TEST-DONE
poweroff -f
"""


def boot(kernel: Path, drives: dict, libata: str = ""):
    """Boot Debian's kernel on the pc-2 board with the IDE controller holding ``drives``
    (``libata``: parameters for libata's insmod); returns (run result, serial text, the
    controller)."""
    from replay.session import build_machine, machine_config
    from vmm.platform.pc import DEFAULT_EPOCH

    load = debian.LOAD_MODULES
    if libata:
        # busybox's insmod does not read module parameters from the kernel command line
        load = load.replace("insmod /lib/modules/$m.ko", f'insmod /lib/modules/$m.ko $([ "$m" = libata ] && echo "{libata}")')
    initrd = _available(debian.initramfs, debian.INIT_HEADER + load + GUEST, MODULES)
    data = kernel.read_bytes()
    cfg = machine_config(256 << 20, DEFAULT_EPOCH, str(kernel), data, "linux", CMDLINE, 0x100000, "none",
                         initrd=(str(initrd), initrd.read_bytes()))
    m = build_machine(cfg, data, NullBackend())
    try:
        ide = attach_ide(m, drives)
        res = m.run(LIMIT)
    finally:
        m.close()
    return res, bytes(m.serial_out).decode(errors="replace").replace("\r", ""), ide


def check_guest(out: str, res, xfer: str) -> None:
    tail = out[-4000:]
    assert "IDE-TEST-DONE" in out, tail
    assert res.reason.name == "POWEROFF", (res, tail)
    assert f"xfer {xfer}" in out, tail
    for marker in ("MOUNTED", "UNMOUNTED", f"again {hashlib.md5(NUMBERS).hexdigest()}"):
        assert marker in out, tail


def make_iso(out: Path, content: Path) -> None:
    """An ISO 9660 image (Rock Ridge) of ``content`` made by Debian's xorriso."""
    from tools import grubimage

    xo, libs = _available(grubimage.xorriso)
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(str(p) for p in libs), SOURCE_DATE_EPOCH="1767225600")
    subprocess.run([str(xo), "-as", "mkisofs", "-o", str(out), "-V", "VMMCD", "-R", str(content)], check=True,
                   capture_output=True, env=env, timeout=120)


def check_disk(tools: Path, image: Path) -> None:
    fsck_clean(tools, image)
    assert debugfs_cat(tools, image, "/hello.txt") == b"written by the guest over IDE\n"
    assert debugfs_cat(tools, image, "/numbers.txt") == NUMBERS
    assert debugfs_cat(tools, image, "/dir/f40") == b"file 40\n"


def test_linux_on_ide_pio_with_a_cdrom_on_the_secondary(debian_kernel, debian_modules, e2fsprogs,  # noqa: F811
                                                         tmp_path):
    raw = tmp_path / "disk.img"
    make_ext4(e2fsprogs, raw, 32)
    content = tmp_path / "cd-content"
    content.mkdir()
    (content / "cd.txt").write_bytes(CD_TEXT)
    media = tmp_path / "cd.iso"
    make_iso(media, content)
    with open_image(raw, writable=True) as disk, open_image(media) as cd:
        res, out, ide = boot(debian_kernel, {(0, 0): ("disk", disk), (1, 0): ("cdrom", cd)}, libata="dma=0")
    check_guest(out, res, "XFER_PIO_4")
    assert CD_TEXT.decode().strip() in out                  # ATAPI PIO: the reply in DRQ blocks
    assert ide.channels[0].bm.transfers == 0 and ide.channels[1].bm.transfers == 0
    check_disk(e2fsprogs, raw)


def test_linux_on_ide_dma_with_a_cdrom(debian_kernel, debian_modules, e2fsprogs, tmp_path):  # noqa: F811
    raw = tmp_path / "disk.img"
    make_ext4(e2fsprogs, raw, 32)
    content = tmp_path / "cd-content"
    content.mkdir()
    (content / "cd.txt").write_bytes(CD_TEXT)
    media = tmp_path / "cd.iso"
    make_iso(media, content)
    media_hash = hashlib.sha256(media.read_bytes()).hexdigest()
    with open_image(raw, writable=True) as disk, open_image(media) as cd:
        res, out, ide = boot(debian_kernel, {(0, 0): ("disk", disk), (0, 1): ("cdrom", cd)})
        assert ide.image_sha256()["ide0.1"] == media_hash
    check_guest(out, res, "XFER_MW_DMA_2")
    assert CD_TEXT.decode().strip() in out
    assert "ATAPI: VMM DVD-ROM" in out and "[sr0] scsi3-mmc drive" in out
    assert ide.channels[0].bm.transfers > 20
    check_disk(e2fsprogs, raw)


def test_linux_on_ide_qcow2_linked_clone(debian_kernel, debian_modules, e2fsprogs, tmp_path):  # noqa: F811
    content = tmp_path / "base-content"
    content.mkdir()
    (content / "base.txt").write_bytes(BASE_TEXT)
    (content / "gone.txt").write_bytes(b"the guest deletes this one\n")
    base = tmp_path / "base.img"
    make_ext4(e2fsprogs, base, 32, content)
    base_hash = hashlib.sha256(base.read_bytes()).hexdigest()
    clone = tmp_path / "clone.qcow2"
    qcow2_create(clone, backing=str(base), backing_fmt="raw")
    with open_image(clone, writable=True) as disk:
        res, out, _ = boot(debian_kernel, {(0, 0): ("disk", disk)})
    check_guest(out, res, "XFER_MW_DMA_2")
    assert BASE_TEXT.decode().strip() in out
    assert hashlib.sha256(base.read_bytes()).hexdigest() == base_hash
    with open_image(clone) as img:
        assert img.check().clean
        flat = tmp_path / "clone-flat.img"
        with open(flat, "wb") as f:
            f.writelines(img.read(off, min(1 << 20, img.size - off)) for off in range(0, img.size, 1 << 20))
    check_disk(e2fsprogs, flat)
    assert debugfs_cat(e2fsprogs, flat, "/base.txt") == BASE_TEXT
