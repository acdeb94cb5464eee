"""Debian's Linux on virtio-blk (issue 12): a busybox guest mounts ext4 images made at test time
with Debian's mke2fs, writes and syncs files and powers off; on the host e2fsck -fn finds the
file systems clean and debugfs reads the files back.  One disk is a raw image, one a qcow2
linked clone whose base must stay byte-identical; a second boot drives the device through the
legacy interface (virtio_pci force_legacy=1).

Packages come from tools/debian.py; without them the tests skip and say why.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from host.images import create as qcow2_create
from host.images import open_image
from host.serial import NullBackend
from tests.realguests import _available, debian_kernel, debian_modules  # noqa: F401  (fixtures)
from tools import debian

MODULES = ["virtio_pci", "virtio_blk", "ext4", "crc32c_generic"]
CMDLINE = "console=ttyS0 panic=-1"
LIMIT = 40_000_000_000          # instructions: far more than a boot, a few file writes and a sync take
UUID = "6f7e2d1c-9a4b-4e55-8c3d-2b1a0f9e8d7c"
NUMBERS = "".join(f"{i}\n" for i in range(1, 20001)).encode()
BASE_TEXT = b"this file lives in the base image\n"


@pytest.fixture(scope="module")
def e2fsprogs() -> Path:
    """Debian's e2fsprogs (mke2fs, e2fsck, debugfs), unpacked."""
    return _available(debian.package, "e2fsprogs") / "sbin"


def make_ext4(tools: Path, path: Path, size_mb: int, content: Path | None = None) -> None:
    """An ext4 image with fixed UUID and times, its inode tables written now (no lazy init)."""
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    cmd = [str(tools / "mke2fs"), "-q", "-F", "-t", "ext4", "-b", "4096", "-U", UUID,
           "-E", f"lazy_itable_init=0,lazy_journal_init=0,hash_seed={UUID}"]
    if content is not None:
        cmd += ["-d", str(content)]
    env = dict(os.environ, E2FSPROGS_FAKE_TIME="1767225600")
    subprocess.run(cmd + [str(path)], check=True, capture_output=True, env=env, timeout=60)


def fsck_clean(tools: Path, path: Path) -> None:
    r = subprocess.run([str(tools / "e2fsck"), "-fn", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def debugfs_cat(tools: Path, path: Path, name: str) -> bytes:
    r = subprocess.run([str(tools / "debugfs"), "-R", f"cat {name}", str(path)], capture_output=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


def boot_with_disks(kernel: Path, init: str, disks: list, insmod_args: dict[str, str] | None = None):
    """Boot Debian's kernel on the pc-2 board with a virtio-blk disk per ``disks`` entry
    (slots 4, 5, ...); returns (machine, run result, serial text, the disks' PCI functions)."""
    from replay.session import build_machine, machine_config
    from vmm.platform.pc import DEFAULT_EPOCH
    from vmm.platform.virtio import attach_virtio_blk

    load = debian.LOAD_MODULES
    for mod, args in (insmod_args or {}).items():
        load = load.replace("insmod /lib/modules/$m.ko",
                            f'insmod /lib/modules/$m.ko $([ "$m" = {mod} ] && echo "{args}")')
    script = debian.INIT_HEADER + load + init
    initrd = _available(debian.initramfs, script, MODULES)
    data = kernel.read_bytes()
    cfg = machine_config(256 << 20, DEFAULT_EPOCH, str(kernel), data, "linux", CMDLINE, 0x100000, "none",
                         initrd=(str(initrd), initrd.read_bytes()))
    m = build_machine(cfg, data, NullBackend())
    fns = [attach_virtio_blk(m, disk, 4 + i, serial=f"vmm-disk-{i}") for i, disk in enumerate(disks)]
    res = m.run(LIMIT)
    return m, res, bytes(m.serial_out).decode(errors="replace"), fns


GUEST = """echo VIRTIO-TEST-START
cat /sys/block/vda/serial; echo
cat /sys/block/vdb/serial; echo
mkdir -p /mnt/a /mnt/b
mount -t ext4 /dev/vda /mnt/a && echo MOUNTED-A
mount -t ext4 /dev/vdb /mnt/b && echo MOUNTED-B
echo "written by the guest on vda" > /mnt/a/hello.txt
seq 1 20000 > /mnt/a/numbers.txt
mkdir /mnt/a/dir
for i in $(seq 1 40); do echo "file $i" > /mnt/a/dir/f$i; done
cat /mnt/b/base.txt
echo "written on the clone" > /mnt/b/clone.txt
seq 1 20000 > /mnt/b/numbers.txt
rm /mnt/b/gone.txt
sync
umount /mnt/a && umount /mnt/b && echo UNMOUNTED
echo VIRTIO-TEST-DONE
poweroff -f
"""


def test_linux_mounts_writes_and_syncs_on_raw_and_qcow2_clone(debian_kernel, debian_modules, e2fsprogs,  # noqa: F811
                                                               tmp_path):
    raw = tmp_path / "disk.img"
    make_ext4(e2fsprogs, raw, 64)
    content = tmp_path / "base-content"
    content.mkdir()
    (content / "base.txt").write_bytes(BASE_TEXT)
    (content / "gone.txt").write_bytes(b"the guest deletes this one\n")
    base = tmp_path / "base.img"
    make_ext4(e2fsprogs, base, 48, content)
    base_hash = hashlib.sha256(base.read_bytes()).hexdigest()
    clone = tmp_path / "clone.qcow2"
    qcow2_create(clone, backing=str(base), backing_fmt="raw")

    disk_a = open_image(raw, writable=True)
    disk_b = open_image(clone, writable=True)
    try:
        m, res, out, fns = boot_with_disks(debian_kernel, GUEST, [disk_a, disk_b])
        m.close()
    finally:
        disk_a.close()
        disk_b.close()
    tail = out[-4000:]
    assert "VIRTIO-TEST-DONE" in out, tail
    assert res.reason.name == "POWEROFF", (res, tail)
    assert "vmm-disk-0\nvmm-disk-1" in out.replace("\r", "")          # GET_ID, through sysfs
    for marker in ("MOUNTED-A", "MOUNTED-B", "UNMOUNTED", BASE_TEXT.decode().strip()):
        assert marker in out, tail
    for fn in fns:
        assert not fn.broken, fn.error
        assert fn.device.io_errors == 0 and fn.device.completed > 10

    fsck_clean(e2fsprogs, raw)
    assert debugfs_cat(e2fsprogs, raw, "/hello.txt") == b"written by the guest on vda\n"
    assert debugfs_cat(e2fsprogs, raw, "/numbers.txt") == NUMBERS
    assert debugfs_cat(e2fsprogs, raw, "/dir/f40") == b"file 40\n"

    # the clone, flattened to raw through host/images; the base is untouched
    assert hashlib.sha256(base.read_bytes()).hexdigest() == base_hash
    flat = tmp_path / "clone-flat.img"
    with open_image(clone) as img, open(flat, "wb") as f:
        f.writelines(img.read(off, min(1 << 20, img.size - off)) for off in range(0, img.size, 1 << 20))
    fsck_clean(e2fsprogs, flat)
    assert debugfs_cat(e2fsprogs, flat, "/clone.txt") == b"written on the clone\n"
    assert debugfs_cat(e2fsprogs, flat, "/numbers.txt") == NUMBERS
    assert debugfs_cat(e2fsprogs, flat, "/base.txt") == BASE_TEXT
    r = subprocess.run([str(e2fsprogs / "debugfs"), "-R", "stat /gone.txt", str(flat)], capture_output=True,
                       text=True, timeout=60, check=False)
    assert "not found" in r.stdout + r.stderr


LEGACY_GUEST = """echo VIRTIO-TEST-START
dmesg | grep -i "virtio"
mkdir -p /mnt/a
mount -t ext4 /dev/vda /mnt/a && echo MOUNTED-A
cat /mnt/a/base.txt
echo "legacy interface" > /mnt/a/legacy.txt
sync
umount /mnt/a && echo UNMOUNTED
echo VIRTIO-TEST-DONE
poweroff -f
"""


def test_linux_drives_the_legacy_interface(debian_kernel, debian_modules, e2fsprogs, tmp_path):  # noqa: F811
    content = tmp_path / "content"
    content.mkdir()
    (content / "base.txt").write_bytes(BASE_TEXT)
    raw = tmp_path / "disk.img"
    make_ext4(e2fsprogs, raw, 32, content)
    disk = open_image(raw, writable=True)
    try:
        m, _, out, fns = boot_with_disks(debian_kernel, LEGACY_GUEST, [disk],
                                           insmod_args={"virtio_pci": "force_legacy=1"})
        m.close()
    finally:
        disk.close()
    tail = out[-4000:]
    assert "VIRTIO-TEST-DONE" in out and "MOUNTED-A" in out and "UNMOUNTED" in out, tail
    assert BASE_TEXT.decode().strip() in out
    assert fns[0].legacy and not fns[0].broken, fns[0].error
    fsck_clean(e2fsprogs, raw)
    assert debugfs_cat(e2fsprogs, raw, "/legacy.txt") == b"legacy interface\n"
