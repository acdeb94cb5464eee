"""Bootable GRUB images, built at test time from Debian's GRUB packages, with no root and no loop device.

Two kinds, both holding the files a test gives (a Multiboot kernel, usually)
and a ``grub.cfg`` that boots it:

* ``disk_image``: a hard disk image with an MBR partition table, one ext2
  partition from sector 2048 (1 MiB) to the end, and GRUB's i386-pc boot code
  installed the way ``grub-bios-setup`` installs it on an MBR disk, done here
  by hand on the image file so that nothing needs a device node:

  - ``core.img`` from ``grub-mkimage -O i386-pc`` with the prefix
    ``(hd0,msdos1)/boot/grub`` and the modules that read the partition and
    load a Multiboot kernel.  It goes into the "MBR gap" from sector 1.  Its
    first sector (diskboot.img) holds a block list, at its end, naming the
    sectors of the rest; grub-mkimage fills it in for exactly this place
    (start sector 2, length = the rest of the image, segment 0x820), so it is
    written unchanged.
  - ``boot.img`` in sector 0, with the partition table (0x1B8-0x1FD) of the
    image kept, and the two bytes at 0x66 (a jump that skips the boot-drive
    check) replaced by NOPs, as grub-bios-setup does for a hard disk.  Its
    kernel-sector field (0x5C) already says 1 and its boot-drive byte (0x64)
    0xFF ("use DL"), which is what grub-bios-setup would write.
    (GRUB's include/grub/i386/pc/boot.h names these offsets, and
    util/setup.c does the same steps.)
  - the file system made by ``mke2fs -d`` straight into the image at the
    partition's offset (``-E offset=``), with a fixed UUID, hash seed and
    time, so the same inputs make the same bytes.

* ``rescue_iso``: an El Torito CD image from ``grub-mkrescue`` (which runs
  ``xorriso``), for i386-pc only.  It is also a hybrid disk: its MBR holds
  GRUB's boot_hybrid.img, so a BIOS that boots it as a hard disk boots it too.

The tools come from Debian packages unpacked by tools/debian.py
(``grub-pc-bin`` for the i386-pc modules and images, ``grub-common`` for
grub-mkimage and grub-mkrescue, ``xorriso``, and the shared libraries they
need that a plain system lacks), run with ``LD_LIBRARY_PATH`` pointing into
the unpacked packages.  Where they cannot be had, ``DebianUnavailable`` says
why in one line; tests turn that into a skip.
"""
from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tools import debian

SECTOR = 512
PART_START = 2048                     # the first partition's LBA (1 MiB), as fdisk places it
PART_TYPE_LINUX = 0x83
MBR_KEEP = slice(0x1B8, 0x1FE)        # NT disk signature, and the partition table, kept from the image
DRIVE_CHECK = 0x66                    # boot.img: a 2-byte jmp over the boot-drive check
KERNEL_SECTOR = 0x5C                  # boot.img: LBA of core.img's first sector (u64)
BOOT_DRIVE = 0x64                     # boot.img: 0xFF = the drive the BIOS passed in DL
BLOCKLIST = SECTOR - 12               # diskboot.img: {u64 start, u16 len, u16 segment}, last in the sector
FIXED_UUID = "2a1a4a8e-6b1f-4d8c-9e57-0c0de5eab105"
FIXED_TIME = 1_767_225_600            # 2026-01-01T00:00:00Z, the machine's default RTC epoch too
DISK_MODULES = ("biosdisk", "part_msdos", "ext2", "multiboot", "normal", "configfile", "echo")
TOOL_TIMEOUT = 300

GRUB_PC_BIN = "grub-pc-bin"
GRUB_COMMON = "grub-common"
XORRISO = "xorriso"
# shared libraries of grub-common's and xorriso's binaries that a system without them lacks
GRUB_LIBS = ("libefiboot1", "libefivar1")
XORRISO_LIBS = ("libisoburn1", "libburn4", "libisofs6", "libjte2")


class GrubImageError(RuntimeError):
    """A GRUB tool failed, or its output is not what a boot needs."""


@dataclass(frozen=True)
class GrubTools:
    platform: Path          # /usr/lib/grub/i386-pc of grub-pc-bin: modules, boot.img, ...
    mkimage: Path
    mkrescue: Path
    libs: tuple[Path, ...]  # LD_LIBRARY_PATH for the binaries

    def env(self) -> dict[str, str]:
        path = ":".join(str(p) for p in self.libs)
        old = os.environ.get("LD_LIBRARY_PATH")
        return {**os.environ, "LC_ALL": "C", "LD_LIBRARY_PATH": f"{path}:{old}" if old else path}


def _libdirs(packages: tuple[str, ...]) -> tuple[Path, ...]:
    out = []
    for name in packages:
        root = debian.package(name)
        out += [p for p in (root / "usr" / "lib" / "x86_64-linux-gnu", root / "lib" / "x86_64-linux-gnu")
                if p.is_dir()]
    return tuple(out)


@functools.cache
def grub_tools() -> GrubTools:
    """GRUB's i386-pc files and tools, fetched on first use."""
    platform = debian.package(GRUB_PC_BIN) / "usr" / "lib" / "grub" / "i386-pc"
    common = debian.package(GRUB_COMMON) / "usr" / "bin"
    tools = GrubTools(platform, common / "grub-mkimage", common / "grub-mkrescue", _libdirs(GRUB_LIBS))
    for p in (platform / "boot.img", platform / "kernel.img", tools.mkimage, tools.mkrescue):
        if not p.exists():
            raise debian.DebianUnavailable(f"the GRUB packages hold no {p.name}")
    return tools


@functools.cache
def xorriso() -> tuple[Path, tuple[Path, ...]]:
    """The xorriso binary and the library directories it needs."""
    path = debian.package(XORRISO) / "usr" / "bin" / "xorriso"
    if not path.exists():
        raise debian.DebianUnavailable(f"{XORRISO} holds no /usr/bin/xorriso")
    return path, _libdirs(XORRISO_LIBS)


def mke2fs() -> Path:
    """mke2fs: the system's, else the one of Debian's e2fsprogs."""
    found = shutil.which("mke2fs") or shutil.which("mke2fs", path="/usr/sbin:/sbin")
    if found:
        return Path(found)
    path = debian.package("e2fsprogs") / "sbin" / "mke2fs"
    if not path.exists():
        raise debian.DebianUnavailable("neither the system nor e2fsprogs has mke2fs")
    return path


def _run(cmd: list, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
    try:
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                           env=dict(env) if env is not None else None, cwd=cwd, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GrubImageError(f"{Path(str(cmd[0])).name}: {e}") from None
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        raise GrubImageError(f"{Path(str(cmd[0])).name} failed: {lines[-1] if lines else f'status {r.returncode}'}")


# -- grub.cfg -------------------------------------------------------------------------------------
def multiboot_cfg(kernel: str, cmdline: str = "", title: str = "vmm multiboot kernel",
                  banner: str = "vmm-grub: booting") -> str:
    """A grub.cfg that prints ``banner`` and boots the Multiboot kernel at ``kernel`` (a path
    on GRUB's root device) with no menu delay."""
    args = f" {cmdline}" if cmdline else ""
    return (f"set timeout=0\nset default=0\necho '{banner} {kernel}'\n"
            f"menuentry '{title}' {{\n    multiboot {kernel}{args}\n    boot\n}}\n")


def _tree(root: Path, files: Mapping[str, bytes], cfg: str) -> None:
    """Lay out ``files`` (path in the image -> bytes) and /boot/grub/grub.cfg under ``root``,
    every time stamp FIXED_TIME."""
    entries = dict(files)
    entries["boot/grub/grub.cfg"] = cfg.encode()
    for rel, data in sorted(entries.items()):
        rel = rel.lstrip("/")
        if not rel or ".." in Path(rel).parts:
            raise ValueError(f"bad path in the image: {rel!r}")
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for p in sorted(root.rglob("*"), reverse=True):
        os.utime(p, (FIXED_TIME, FIXED_TIME))
    os.utime(root, (FIXED_TIME, FIXED_TIME))


# -- the hard disk ------------------------------------------------------------------------------
def _chs(lba: int, heads: int = 255, sectors: int = 63) -> bytes:
    """The 3-byte CHS field of a partition entry (1023/254/63 past what CHS can address)."""
    c, rem = divmod(lba, heads * sectors)
    if c > 1023:
        return bytes((254, 0xFF, 0xFF))
    h, s = divmod(rem, sectors)
    return bytes((h, ((c >> 2) & 0xC0) | (s + 1), c & 0xFF))


def mbr_partition_table(total_sectors: int, start: int = PART_START, kind: int = PART_TYPE_LINUX) -> bytes:
    """The 64-byte partition table of a disk with one partition from ``start`` to the end."""
    n = total_sectors - start
    entry = bytes((0x80,)) + _chs(start) + bytes((kind,)) + _chs(total_sectors - 1) + struct.pack("<II", start, n)
    return entry + bytes(48)


def core_image(prefix: str = "(hd0,msdos1)/boot/grub", modules: tuple[str, ...] = DISK_MODULES) -> bytes:
    """grub-mkimage's i386-pc core.img (diskboot.img + the compressed kernel and modules)."""
    t = grub_tools()
    with tempfile.TemporaryDirectory(prefix="vmm-grub-") as tmp:
        out = Path(tmp) / "core.img"
        _run([t.mkimage, "-O", "i386-pc", "-d", t.platform, "-o", out, "-p", prefix, *modules], t.env())
        return out.read_bytes()


def install_mbr(disk: bytearray, boot_img: bytes, core_img: bytes) -> None:
    """Put GRUB's boot.img in sector 0 (keeping the partition table) and core.img from sector 1,
    as grub-bios-setup embeds them in the MBR gap."""
    if len(boot_img) != SECTOR or boot_img[510:512] != b"\x55\xaa":
        raise GrubImageError("boot.img is not a 512-byte boot sector")
    start, length, segment = struct.unpack_from("<QHH", core_img, BLOCKLIST)
    sectors = -(-len(core_img) // SECTOR)
    if (start, length, segment) != (2, sectors - 1, 0x820):
        raise GrubImageError(f"core.img's block list ({start}, {length}, {segment:#x}) does not describe "
                             f"an image of {sectors} sectors at sector 1")
    first_partition = min((struct.unpack_from("<I", disk, 0x1BE + 16 * i + 8)[0] for i in range(4)
                           if disk[0x1BE + 16 * i + 4]), default=len(disk) // SECTOR)
    if 1 + sectors > first_partition:
        raise GrubImageError(f"core.img ({sectors} sectors) does not fit before the first partition")
    boot = bytearray(boot_img)
    boot[MBR_KEEP] = disk[MBR_KEEP]
    boot[DRIVE_CHECK:DRIVE_CHECK + 2] = b"\x90\x90"
    if struct.unpack_from("<Q", boot, KERNEL_SECTOR)[0] != 1 or boot[BOOT_DRIVE] != 0xFF:
        raise GrubImageError("boot.img does not load its core from sector 1 of the boot drive")
    disk[0:SECTOR] = boot
    disk[SECTOR:SECTOR + len(core_img)] = core_img


def disk_image(out: Path | str, files: Mapping[str, bytes], cfg: str, size_mib: int = 8) -> Path:
    """A raw hard disk image at ``out`` that GRUB boots: one ext2 partition holding
    ``files`` and /boot/grub/grub.cfg = ``cfg``, GRUB in the MBR and the gap after it."""
    out = Path(out)
    total = size_mib * (1 << 20) // SECTOR
    if total <= PART_START + 2048:
        raise ValueError("a GRUB disk image needs more than 2 MiB")
    t = grub_tools()
    mkfs = mke2fs()
    disk = bytearray(total * SECTOR)
    disk[0x1BE:0x1FE] = mbr_partition_table(total)
    disk[0x1FE:0x200] = b"\x55\xaa"
    install_mbr(disk, (t.platform / "boot.img").read_bytes(), core_image())
    with tempfile.TemporaryDirectory(prefix="vmm-grub-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        _tree(root, files, cfg)
        img = Path(tmp) / "disk.img"
        img.write_bytes(disk)
        fs_kib = (total - PART_START) * SECTOR // 1024
        env = {**os.environ, "LC_ALL": "C", "E2FSPROGS_FAKE_TIME": str(FIXED_TIME),
               "SOURCE_DATE_EPOCH": str(FIXED_TIME), "MKE2FS_CONFIG": "/dev/null"}
        _run([mkfs, "-q", "-F", "-t", "ext2", "-b", "1024", "-L", "vmmgrub", "-U", FIXED_UUID,
              "-E", f"offset={PART_START * SECTOR},hash_seed={FIXED_UUID},root_owner=0:0",
              "-d", root, img, f"{fs_kib}k"], env)
        data = img.read_bytes()
    if len(data) != total * SECTOR or data[:SECTOR] != disk[:SECTOR]:
        raise GrubImageError("mke2fs wrote outside its partition")
    out.write_bytes(data)
    return out


# -- the CD -----------------------------------------------------------------------------------------
def rescue_iso(out: Path | str, files: Mapping[str, bytes], cfg: str) -> Path:
    """An i386-pc El Torito (and hybrid disk) ISO at ``out`` made by grub-mkrescue, holding
    ``files`` and /boot/grub/grub.cfg = ``cfg``."""
    out = Path(out)
    t = grub_tools()
    xo, xo_libs = xorriso()
    with tempfile.TemporaryDirectory(prefix="vmm-grub-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        _tree(root, files, cfg)
        # grub-mkrescue finds xorriso through --xorriso; the libraries of both go on one path
        env = t.env()
        env["LD_LIBRARY_PATH"] = ":".join(str(p) for p in xo_libs) + ":" + env["LD_LIBRARY_PATH"]
        env["SOURCE_DATE_EPOCH"] = str(FIXED_TIME)
        iso = Path(tmp) / "out.iso"
        _run([t.mkrescue, f"--xorriso={xo}", "-d", t.platform, "-o", iso, root], env, cwd=Path(tmp))
        data = iso.read_bytes()
    if len(data) < 0x8800 or data[0x8001:0x8006] != b"CD001":
        raise GrubImageError("grub-mkrescue made no ISO 9660 image")
    out.write_bytes(data)
    return out
