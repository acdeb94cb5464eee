"""Disks on the command line: QEMU's drive options for `vmm run|record`, and `vmm disk`.

Drive options (repeatable, in QEMU's syntax; a comma inside a file name is
written twice, as QEMU wants)::

    --drive file=PATH[,if=ide|virtio][,media=disk|cdrom][,format=raw|qcow2]
            [,index=N][,readonly=on|off][,snapshot=on|off]
    -hda FILE, -hdb FILE   IDE disks 0 and 1 (primary master and slave); also --hda, --hdb
    -cdrom FILE            an IDE CD-ROM at index 2 (secondary master); also --cdrom

``if`` defaults to ide, ``media`` to disk, ``format`` to what the file
holds.  With no IMAGE (nor --kernel, --bios), the built-in BIOS boots the
first hard disk (-hda), which must then be raw, or with no hard disk (or with
``--boot cdrom``) the first IDE CD-ROM, the El Torito way.  ``readonly=on`` opens the file read-only (the guest's writes fail);
``snapshot=on`` keeps the guest's writes in memory and leaves the file as it
was.  A recording always runs its disks that way (vmm/platform/storage.py).

`vmm disk` works on image files without qemu-img::

    vmm disk create FILE SIZE [--format qcow2|raw] [--cluster-size N]
    vmm disk clone BASE FILE            a qcow2 linked clone: FILE reads BASE until written
    vmm disk info FILE [--json]
    vmm disk check FILE [--repair]      exit 0 clean, 1 leaked clusters only, 3 corrupt
    vmm disk convert SRC DST [--format qcow2|raw]

Any problem with an option or an image is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

DRIVE_KEYS = ("file", "if", "media", "format", "index", "readonly", "snapshot")
EXIT_LEAKS = 1
EXIT_CORRUPT = 3


def _usage(msg: str) -> Exception:
    from tools.cli import UsageError

    return UsageError(msg)


def _split_commas(text: str) -> list[str]:
    """QEMU's option syntax: ',' separates, ',,' is a literal comma."""
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    return parts


def _on_off(key: str, value: str) -> bool:
    v = value.lower()
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"--drive {key}= wants on or off, not {value!r}")


def parse_drive(text: str) -> dict:
    """One --drive value as a spec dict (storage.describe's input)."""
    spec: dict[str, Any] = {"file": None, "if": "ide", "media": "disk", "format": None, "index": None,
                            "readonly": False, "snapshot": False}
    seen = set()
    for part in _split_commas(text):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--drive: {part!r} is not KEY=VALUE")
        if key not in DRIVE_KEYS:
            raise argparse.ArgumentTypeError(f"--drive: unknown key {key!r} (known: {', '.join(DRIVE_KEYS)})")
        if key in seen:
            raise argparse.ArgumentTypeError(f"--drive: {key}= given twice")
        seen.add(key)
        if key in ("readonly", "snapshot"):
            spec[key] = _on_off(key, value)
        elif key == "index":
            try:
                spec["index"] = int(value, 10)
            except ValueError:
                raise argparse.ArgumentTypeError(f"--drive index= wants a number, not {value!r}") from None
        elif key == "if" and value not in ("ide", "virtio"):
            raise argparse.ArgumentTypeError(f"--drive if= wants ide or virtio, not {value!r}")
        elif key == "media" and value not in ("disk", "cdrom"):
            raise argparse.ArgumentTypeError(f"--drive media= wants disk or cdrom, not {value!r}")
        elif key == "format" and value not in ("raw", "qcow2"):
            raise argparse.ArgumentTypeError(f"--drive format= wants raw or qcow2, not {value!r}")
        elif key == "file" and not value:
            raise argparse.ArgumentTypeError("--drive file= is empty")
        else:
            spec[key] = value
    if not spec["file"]:
        raise argparse.ArgumentTypeError(f"--drive {text!r} names no file= (file=PATH is required)")
    return spec


def add_drive_options(r: argparse.ArgumentParser) -> None:
    r.add_argument("--drive", "-drive", dest="drives", action="append", default=None,
                   metavar="file=PATH[,if=ide|virtio][,media=disk|cdrom][,format=raw|qcow2][,readonly=on]",
                   help="attach a disk or CD-ROM image (repeatable; QEMU's syntax, see `vmm disk --help`)")
    for flag, index, media in (("hda", 0, "disk"), ("hdb", 1, "disk"), ("cdrom", 2, "cdrom")):
        r.add_argument(f"-{flag}", f"--{flag}", dest=f"drive_{flag}", default=None, metavar="FILE",
                       help=f"IDE {'CD-ROM' if media == 'cdrom' else 'disk'} at index {index} (as QEMU's -{flag})")


def specs_from_args(args) -> list[dict]:
    specs = []
    for flag, index, media in (("hda", 0, "disk"), ("hdb", 1, "disk"), ("cdrom", 2, "cdrom")):
        f = getattr(args, f"drive_{flag}", None)
        if f is not None:
            specs.append({"file": f, "if": "ide", "media": media, "format": None, "index": index,
                          "readonly": media == "cdrom", "snapshot": False})
    for text in getattr(args, "drives", None) or []:
        try:
            specs.append(parse_drive(text))
        except argparse.ArgumentTypeError as e:
            raise _usage(str(e)) from None
    return specs


def drives_from_args(args, with_hash: bool = False, recording: bool = False) -> list[dict] | None:
    """The described drives the arguments ask for (None if none); a usage error otherwise.
    Outside a recording (whose disks are overlays) a snapshot (--save-at) needs every
    writable disk to keep its writes in memory."""
    from vmm.platform.storage import DriveError, describe

    specs = specs_from_args(args)
    if not specs:
        return None
    try:
        drives = describe(specs, with_hash=with_hash)
    except DriveError as e:
        raise _usage(str(e)) from None
    if getattr(args, "save_at", None) and not recording:
        through = [d["name"] for d in drives if not d["readonly"] and not d["snapshot"]]
        if through:
            raise _usage(f"--save-at: the disk {through[0]} is written in place, so a snapshot could not hold "
                         f"its content; give it snapshot=on or readonly=on")
    return drives


def boot_from_drive(args) -> None:
    """QEMU's habit: with no IMAGE (nor --kernel, --bios or --restore) the machine boots its
    first hard disk, IDE index 0 (-hda) if there is one, else the first disk given.  The
    built-in BIOS reads the file's bytes, so the disk must be a raw image."""
    from tools.cli_bios import DEFAULT_IMAGE

    if (args.image is not DEFAULT_IMAGE or getattr(args, "kernel", None) or getattr(args, "bios", None)
            or getattr(args, "restore", None)):
        return
    specs = specs_from_args(args)
    disks = [s for s in specs if s["media"] == "disk"]
    cds = [s for s in specs if s["media"] == "cdrom" and s["if"] == "ide"]
    boot = getattr(args, "boot", "auto")
    if cds and (boot == "cdrom" or (not disks and boot == "auto")):
        args.image, args.boot = min(cds, key=lambda s: s["index"])["file"], "cdrom"     # QEMU's order c, then d; vmm/firmware/eltorito.py
        return
    if not disks:
        return
    first = next((s for s in disks if s["if"] == "ide" and s["index"] == 0), disks[0])
    try:
        with open(first["file"], "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise _usage(f"{first['file']}: {e.strerror}") from None
    if first["format"] == "qcow2" or (first["format"] is None and magic == b"QFI\xfb"):
        raise _usage(f"{first['file']}: the built-in BIOS boots raw disks only; boot this qcow2 disk with "
                     f"--bios FILE (SeaBIOS) or give a boot IMAGE")
    args.image = first["file"]


def close(m) -> None:
    """Close a machine's disk images (their writes complete), reporting a failure in one line."""
    from vmm.platform.storage import DriveError, close_drives

    try:
        close_drives(m)
    except DriveError as e:
        print(f"vmm: warning: closing the disks: {e}", file=sys.stderr)


# -- vmm disk ---------------------------------------------------------------------------------
def add_disk_parser(sub) -> None:
    d = sub.add_parser("disk", help="create, clone, inspect, check or convert disk images",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ds = d.add_subparsers(dest="disk_command", metavar="SUBCOMMAND")
    c = ds.add_parser("create", help="a new empty image (thin: qcow2 grows as the guest writes)")
    c.add_argument("file")
    c.add_argument("size", help="virtual size, e.g. 64M, 10G (bytes without a suffix)")
    c.add_argument("--format", "-f", choices=["qcow2", "raw"], default="qcow2")
    c.add_argument("--cluster-size", default="64K", help="qcow2 cluster size (default 64K)")
    cl = ds.add_parser("clone", help="a qcow2 linked clone of BASE (BASE is only read)")
    cl.add_argument("base")
    cl.add_argument("file")
    i = ds.add_parser("info", help="format, sizes, backing file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="as JSON")
    ck = ds.add_parser("check", help="check a qcow2 image's metadata (refcounts against references)")
    ck.add_argument("file")
    ck.add_argument("--repair", action="store_true", help="rebuild the refcounts if they disagree")
    cv = ds.add_parser("convert", help="copy an image's content into a new raw or qcow2 image")
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.add_argument("--format", "-O", choices=["qcow2", "raw"], default="qcow2")


def parse_bytes(text: str) -> int:
    """'512', '64K', '10M', '2G', '1T' (binary units; bytes without a suffix, as qemu-img)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    shift = {"K": 10, "M": 20, "G": 30, "T": 40}.get(t[-1:], 0)
    num = t[:-1] if shift else t
    try:
        v = int(num, 10)
    except ValueError:
        raise _usage(f"not a size: {text!r} (e.g. 64M, 10G)") from None
    if v < 0:
        raise _usage(f"not a size: {text!r}")
    return v << shift


def _exclusive_new(path: str) -> None:
    if os.path.lexists(path):
        raise _usage(f"{path}: already exists (remove it first)")


def cmd_disk(args) -> int:
    from host.images import ImageError

    if args.disk_command is None:
        raise _usage("disk needs a subcommand: create, clone, info, check or convert")
    try:
        return {"create": _create, "clone": _clone, "info": _info, "check": _check,
                "convert": _convert}[args.disk_command](args)
    except ImageError as e:
        raise _usage(str(e)) from None


def _create(args) -> int:
    from host.images import create

    size = parse_bytes(args.size)
    if size == 0:
        raise _usage("a disk needs a size above 0")
    _exclusive_new(args.file)
    if args.format == "qcow2":
        create(args.file, size, cluster_size=parse_bytes(args.cluster_size))
    else:
        try:
            fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.ftruncate(fd, -(-size // 512) * 512)
            finally:
                os.close(fd)
        except OSError as e:
            raise _usage(f"{args.file}: {e.strerror}") from None
    print(f"created {args.file}: {args.format}, {size:,} bytes")
    return 0


def _clone(args) -> int:
    from host.images import create, open_image

    _exclusive_new(args.file)
    with open_image(args.base) as base:
        fmt = base.format
    create(args.file, backing=os.path.abspath(args.base), backing_fmt=fmt)
    print(f"created {args.file}: qcow2 linked clone of {args.base} ({fmt})")
    return 0


def _info(args) -> int:
    from host.images import open_image

    with open_image(args.file) as img:
        info = dict(img.info()) if hasattr(img, "info") else {"format": img.format, "virtual_size": img.size}
        info.setdefault("file_size", os.path.getsize(args.file))
        info["file"] = args.file
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"image: {args.file}")
    print(f"file format: {info['format']}")
    print(f"virtual size: {info['virtual_size']:,} bytes")
    print(f"disk size: {os.stat(args.file).st_blocks * 512:,} bytes allocated, file {info['file_size']:,} bytes")
    for key in ("cluster_size", "version", "refcount_bits", "backing_file", "backing_format", "dirty", "corrupt"):
        if info.get(key) not in (None, False):
            print(f"{key.replace('_', ' ')}: {info[key]}")
    return 0


def _check(args) -> int:
    from host.images import open_image

    with open_image(args.file, writable=args.repair) as img:
        if img.format != "qcow2":
            print(f"{args.file}: a raw image has no metadata to check")
            return 0
        found = img.repair() if args.repair else img.check()
        after = img.check() if args.repair else found
    for line in found.corruptions[:20]:
        print(f"ERROR {line}")
    if len(found.corruptions) > 20:
        print(f"... and {len(found.corruptions) - 20} more")
    if found.leaks:
        print(f"{found.leaks} leaked clusters")
    if args.repair and not found.clean:
        print("the refcounts were rebuilt" + ("; the image is now clean" if after.clean else "; problems remain"))
    print(f"{found.allocated_clusters} allocated clusters; "
          + ("no errors were found on the image." if found.clean else
             f"{len(found.corruptions)} errors, {found.leaks} leaks"))
    if after.corruptions:
        return EXIT_CORRUPT
    return EXIT_LEAKS if after.leaks else 0


def _convert(args) -> int:
    from host.images import ImageError, create, open_image

    _exclusive_new(args.dst)
    chunk = 1 << 20
    with open_image(args.src) as src:
        size = src.size
        try:
            if args.format == "qcow2":
                create(args.dst, size)
                dst = open_image(args.dst, True, "qcow2")
            else:
                fd = os.open(args.dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.ftruncate(fd, size)
                os.close(fd)
                dst = open_image(args.dst, True, "raw")
        except OSError as e:
            raise _usage(f"{args.dst}: {e.strerror}") from None
        try:
            with dst:
                pos = 0
                while pos < size:
                    n = min(chunk, size - pos)
                    runs = src.zero_ranges(pos, n)
                    for start, length, zero in runs:
                        if zero:
                            continue
                        data = src.read(start, length)
                        if data.count(0) != len(data):     # thin: all-zero runs stay unallocated
                            dst.write(start, data)
                    pos += n
                dst.flush()
        except (ImageError, OSError):
            os.unlink(args.dst)
            raise
    print(f"converted {args.src} ({src.format}) -> {args.dst} ({args.format}), {size:,} bytes")
    return 0
