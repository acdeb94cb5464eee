"""The pc-2 board's disks: drives described as plain data, opened, and attached.

A drive is described by a dict (the ``drives`` list of a machine config, so
a recording or snapshot header names them), made by ``describe``::

    {"name": "ide0.0" | "virtio0", "if": "ide" | "virtio", "index": N,
     "media": "disk" | "cdrom", "format": "raw" | "qcow2", "file": as given,
     "path": absolute path, "readonly": bool, "snapshot": bool,
     "size": guest-visible bytes, "sha256": content hash or None}

Slots follow QEMU's ``-drive``: IDE index N is channel N // 2, unit N % 2
(``-hda`` 0, ``-hdb`` 1, ``-cdrom`` 2: the secondary master); virtio index N
is PCI slot ``VIRTIO_SLOT0 + N`` (00:01.1 is the PIIX3 IDE function).  The
IDE function exists only when an IDE drive is given.

How an image is opened depends on who runs the machine (``attach_drives``'s
``mode``):

* ``run``: as the user asked: read-write unless ``readonly`` (a CD-ROM is
  always read-only), or behind an in-memory copy-on-write overlay with
  ``snapshot=on`` (QEMU's meaning: the guest writes, the file stays).  A
  read-write file is behind a write-behind queue (host/images/writebehind.py):
  a host thread makes the writes, joined into runs, while the vCPU runs on,
  as QEMU's thread pool makes its guests' writes;
* ``record``: always behind an in-memory overlay, so the image stays what
  the log's hash names and the recording can be replayed from it; the hash
  is that of the guest-visible content before the run;
* ``replay``: the same overlay, after checking the image's hash against the
  recording; a changed image is refused before anything runs.

An overlay's blocks are machine state (a part ``dev:disk-<name>``), so
checkpoints, time travel and snapshot files carry what the guest wrote.  A
write-through drive keeps its data in the file only; snapshots of a machine
with one are refused (``writes_through``).

Requests complete on the devices' own virtual-time timers (devices/storage,
devices/virtio/blk.py), so a disk adds no event to a replay log: the same
image and the same guest give the same completions at the same icounts.
"""
from __future__ import annotations

import os
from typing import Any

from devices.base import DeviceStateError
from host.images import ImageError, MemoryOverlay, open_image
from host.images.writebehind import WriteBehind

INTERFACES = ("ide", "virtio")
MEDIA = ("disk", "cdrom")
FORMATS = ("raw", "qcow2")
IDE_SLOTS = 4
VIRTIO_SLOT0 = 4
VIRTIO_MAX = 8


class DriveError(ValueError):
    """A drive that cannot be attached; one line naming it."""


def slot_name(interface: str, index: int) -> str:
    return f"ide{index // 2}.{index % 2}" if interface == "ide" else f"virtio{index}"


def assign_indexes(specs: list[dict]) -> list[dict]:
    """Give each spec (dicts with "if", and "index" or None) a free index of its
    interface, in order, as QEMU does; two drives on one slot are refused."""
    taken: dict[str, set[int]] = {i: set() for i in INTERFACES}
    for s in specs:
        if s.get("index") is not None:
            limit = IDE_SLOTS if s["if"] == "ide" else VIRTIO_MAX
            if not 0 <= s["index"] < limit:
                raise DriveError(f"{s['file']}: {s['if']} index {s['index']} is out of range (0-{limit - 1})")
            if s["index"] in taken[s["if"]]:
                raise DriveError(f"{s['file']}: two drives on {slot_name(s['if'], s['index'])}")
            taken[s["if"]].add(s["index"])
    out = []
    for s in specs:
        s = dict(s)
        if s.get("index") is None:
            limit = IDE_SLOTS if s["if"] == "ide" else VIRTIO_MAX
            free = [i for i in range(limit) if i not in taken[s["if"]]]
            if not free:
                raise DriveError(f"{s['file']}: no free {s['if']} slot (at most {limit} drives)")
            s["index"] = free[0]
            taken[s["if"]].add(free[0])
        out.append(s)
    return out


def describe(specs: list[dict], with_hash: bool = False) -> list[dict]:
    """Check and describe drives given as dicts of "file", "if", "media", "format"
    (None: detect), "readonly", "snapshot", "index" (None: the next free one).
    Opens each image read-only (which checks its header and backing chain);
    ``with_hash`` adds the SHA-256 of its content.  Raises DriveError."""
    out = []
    for s in assign_indexes(specs):
        iface, media, fmt = s["if"], s.get("media", "disk"), s.get("format")
        if iface not in INTERFACES:
            raise DriveError(f"{s['file']}: unknown interface {iface!r} (ide or virtio)")
        if media not in MEDIA:
            raise DriveError(f"{s['file']}: unknown media {media!r} (disk or cdrom)")
        if fmt not in (None, *FORMATS):
            raise DriveError(f"{s['file']}: unknown format {fmt!r} (raw or qcow2)")
        if media == "cdrom" and iface != "ide":
            raise DriveError(f"{s['file']}: a CD-ROM needs if=ide")
        try:
            with open_image(s["file"], False, fmt) as img:
                d = {"name": slot_name(iface, s["index"]), "if": iface, "index": s["index"], "media": media,
                     "format": img.format, "file": s["file"], "path": os.path.abspath(s["file"]),
                     "readonly": bool(s.get("readonly")) or media == "cdrom", "snapshot": bool(s.get("snapshot")),
                     "size": img.size, "sha256": img.sha256() if with_hash else None}
        except ImageError as e:
            raise DriveError(str(e)) from None
        out.append(d)
    return out


def check_config(drives: Any) -> list[dict]:
    """A header's ``drives`` list, checked field by field (ValueError, one line)."""
    if drives is None:
        return []
    if not isinstance(drives, list) or len(drives) > IDE_SLOTS + VIRTIO_MAX:
        raise ValueError("the drives are not a list of at most 12")
    seen = set()
    for d in drives:
        ok = (isinstance(d, dict) and d.get("if") in INTERFACES and d.get("media") in MEDIA
              and d.get("format") in FORMATS and isinstance(d.get("path"), str) and isinstance(d.get("file"), str)
              and type(d.get("index")) is int and isinstance(d.get("readonly"), bool)
              and isinstance(d.get("snapshot"), bool) and type(d.get("size")) is int
              and (d.get("sha256") is None or isinstance(d.get("sha256"), str)))
        if ok:
            ok = 0 <= d["index"] < (IDE_SLOTS if d["if"] == "ide" else VIRTIO_MAX) \
                and d.get("name") == slot_name(d["if"], d["index"]) and (d["media"] == "disk" or d["if"] == "ide")
        if not ok or d["name"] in seen:
            raise ValueError(f"a drive is described badly: {str(d)[:120]}")
        seen.add(d["name"])
    return drives


class ReplayOverlay(MemoryOverlay):
    """An in-memory copy-on-write overlay whose blocks are machine state."""

    def __init__(self, base: Any, writable: bool) -> None:
        super().__init__(base)
        self.writable = writable

    def save_blocks(self) -> list:
        return [[i, b] for i, b in sorted(self._blocks.items())]

    def load_blocks(self, blocks: list) -> None:
        for i, b in blocks:
            if len(b) != self.block:
                raise DeviceStateError(f"{self.path}: an overlay block of {len(b)} bytes")
        self._blocks = {i: b for i, b in blocks}


class OverlayState:
    """The machine-state part of one overlaid drive (no ports, no timers)."""

    VERSION = 1

    def __init__(self, name: str, overlay: ReplayOverlay) -> None:
        self.name = f"disk-{name}"
        self.overlay = overlay

    def reset(self) -> None:
        """A machine reset is not a new disk: what the guest wrote stays."""

    def save_state(self) -> dict:
        return {"kind": "disk-overlay", "version": self.VERSION, "blocks": self.overlay.save_blocks()}

    def load_state(self, state: dict) -> None:
        blocks = state.get("blocks") if isinstance(state, dict) else None
        if (not isinstance(state, dict) or state.get("kind") != "disk-overlay" or state.get("version") != self.VERSION
                or not isinstance(blocks, list)
                or any(not isinstance(e, list) or len(e) != 2 or type(e[0]) is not int or not isinstance(e[1], bytes)
                       or not 0 <= e[0] * self.overlay.block < self.overlay.size for e in blocks)):
            raise DeviceStateError(f"{self.name}: not a disk overlay state of version {self.VERSION}")
        self.overlay.load_blocks(blocks)


def open_drive(d: dict, mode: str) -> Any:
    """The block object for one described drive (see the module docstring for ``mode``)."""
    path, fmt = d["path"], d["format"]
    try:
        if mode == "run" and not d["snapshot"] and not d["readonly"]:
            return WriteBehind(open_image(path, True, fmt))
        # a read-only drive (a CD-ROM) sits behind an overlay that takes no writes in every
        # mode, so a snapshot of a run holds its (empty) part and restores as it was saved
        img = ReplayOverlay(open_image(path, False, fmt), writable=not d["readonly"])
        if mode == "replay" and d.get("sha256") is not None \
                and (img.size != d["size"] or img.sha256() != d["sha256"]):
            img.close()
            raise DriveError(f"the disk image {path} ({d['name']}) is not the one recorded (sha256)")
        return img
    except ImageError as e:
        raise DriveError(str(e)) from None


def attach_drives(machine: Any, drives: list[dict], mode: str) -> list[Any]:
    """Open and attach every described drive to a pc-2 machine; returns the block objects
    (also kept as ``machine.drive_images``, name -> block, for ``close_drives``)."""
    from devices.storage.ide import attach_ide
    from vmm.platform.virtio import attach_virtio_blk

    if not drives:
        return []
    if getattr(machine, "pci", None) is None:
        raise DriveError("disks need the pc-2 board (PCI)")
    images: dict[str, Any] = {}
    machine.drive_images = images
    try:
        for d in drives:
            images[d["name"]] = open_drive(d, mode)
    except BaseException:
        close_drives(machine)
        raise
    ide = {(d["index"] // 2, d["index"] % 2): (d["media"], images[d["name"]]) for d in drives if d["if"] == "ide"}
    if ide:
        machine.ide = attach_ide(machine, ide)
    for d in drives:
        if d["if"] == "virtio":
            attach_virtio_blk(machine, images[d["name"]], VIRTIO_SLOT0 + d["index"], name=f"virtio-blk{d['index']}",
                              serial=f"vmm-{d['name']}", read_only=d["readonly"])
    for d in drives:
        img = images[d["name"]]
        if isinstance(img, ReplayOverlay):
            machine.add_device(OverlayState(d["name"], img), io=False)
    return [images[d["name"]] for d in drives]


def writes_through(machine: Any) -> list[str]:
    """The drives whose writes go to their files (their content is not in a snapshot)."""
    return [n for n, img in getattr(machine, "drive_images", {}).items()
            if not isinstance(img, ReplayOverlay) and getattr(img, "writable", False)]


def close_drives(machine: Any) -> None:
    """Flush and close every image of the machine (a qcow2 image's metadata is only
    complete once closed or flushed)."""
    images = getattr(machine, "drive_images", None) or {}
    errors = []
    for name, img in list(images.items()):
        try:
            img.close()
        except (OSError, ImageError) as e:
            errors.append(f"{name}: {e}")
    images.clear()
    if errors:
        raise DriveError("; ".join(errors))
