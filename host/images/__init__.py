"""Disk image formats: the host side of the guest's disks (outside the
determinism boundary).  ``open_image`` detects raw or qcow2; see base.py for
the block-device interface, raw.py and qcow2.py for the formats."""
from .base import DEFAULT_LIMITS, SECTOR, BlockImage, ImageError, Limits, detect_format, open_image
from .qcow2 import CheckResult, Qcow2Image, create
from .raw import MemoryOverlay, RawImage, open_cow

__all__ = [
    "DEFAULT_LIMITS", "SECTOR", "BlockImage", "CheckResult", "ImageError", "Limits", "MemoryOverlay",
    "Qcow2Image", "RawImage", "create", "detect_format", "open_cow", "open_image",
]
