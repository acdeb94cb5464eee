"""The machine config in a replay log's header (and a snapshot's): the one
check of what replay relies on before anything is built from it.

A log's header holds the recipe of the recorded machine (replay.session's
``machine_config``).  A log with valid checksums can still carry a recipe
that no machine can be built from: a field missing or of the wrong type, an
unknown MMU mode, a memory size of 0, a bundled guest that does not exist.
``check_config`` refuses each with a one-line ``LogFormatError`` naming the
field, and ``vmm log verify`` applies the same check, so verify and replay
agree on which logs they accept.

Fields written by older recorders may be missing (version 1 logs have no
``mmu``, ``vcpus``, ``quantum``, ``entries``, ``booted``, ``platform``,
``debug_exit`` or ``initrd``); a missing optional field means its default.  Fields replay does not read
(``vmm_version``, ``image.size``) are not checked.
"""
from __future__ import annotations

from typing import Any

from replay.events import LogFormatError

__all__ = [
    "BOOTED_KINDS",
    "BOOT_KINDS",
    "MAX_MEM",
    "MAX_VCPUS",
    "MIN_MEM",
    "MMU_MODES",
    "PLATFORMS",
    "check_config",
]

# The same lists as vmm.firmware.boot.KINDS, vmm.machine.MAX_VCPUS, vmm.platform.pc.PLATFORMS and the
# CLI's --mem and --debug-exit ranges (a test holds them together); spelled out here so that checking
# a log needs neither Unicorn nor a machine.
BOOT_KINDS = ("auto", "linux", "disk", "floppy", "multiboot", "flat", "bios", "cdrom")
BOOTED_KINDS = ("linux", "disk", "floppy", "multiboot", "flat", "bios", "cdrom")
MMU_MODES = ("shadow", "nested")
PLATFORMS = ("pc-4", "pc-3", "pc-2", "pc-1")
DEBUG_EXIT_SIZES = (1, 2, 4)
MIN_MEM = 2 << 20
MAX_MEM = 3 << 30
MAX_VCPUS = 64
MAX_QUANTUM = 1 << 32
_I64 = 1 << 63
_HEX = frozenset("0123456789abcdef")


def _is_int(v: Any) -> bool:
    return type(v) is int  # not bool, not float


def _is_text(v: Any) -> bool:
    """A str that encodes as UTF-8 (JSON can carry lone surrogates, which do not)."""
    if not isinstance(v, str):
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_path(v: Any) -> bool:
    return _is_text(v) and v != "" and "\0" not in v


def _is_sha256(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and set(v) <= _HEX


def _is_file_ref(v: Any) -> bool:
    """An image or initrd named by path and SHA-256 (replay reads the path and checks the hash)."""
    return isinstance(v, dict) and _is_text(v.get("name")) and _is_path(v.get("path")) \
        and _is_sha256(v.get("sha256"))


def _is_debug_exit(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and _is_int(v[0]) and v[1] in DEBUG_EXIT_SIZES \
        and _is_int(v[1]) and 0 <= v[0] <= 0x10000 - v[1]


def _known_guest(v: Any) -> bool:
    from guests.build import GUESTS

    return isinstance(v, str) and v in GUESTS


def check_config(cfg: Any, where: str = "the log header") -> None:
    """Raise LogFormatError (one line naming the field) unless ``cfg`` is a machine
    config replay can build a machine from.  ``where`` names the file's part in
    the message (a snapshot passes "the snapshot header")."""

    def bad(key: str, v: Any) -> LogFormatError:
        return LogFormatError(f"{where}'s config has a bad {key!r}: {v!r:.80}")

    if not isinstance(cfg, dict):
        raise LogFormatError(f"{where}'s config is not a JSON object")

    def need(key: str, ok, optional: bool = False) -> Any:
        if optional and key not in cfg:
            return None
        v = cfg.get(key)
        if not ok(v):
            raise bad(key, v)
        return v

    need("mem_size", lambda v: _is_int(v) and MIN_MEM <= v <= MAX_MEM and v % 4096 == 0)
    need("rtc_epoch", lambda v: _is_int(v) and -_I64 <= v < _I64)
    need("boot", lambda v: v in BOOT_KINDS if isinstance(v, str) else False)
    need("cmdline", _is_text)
    need("load_addr", lambda v: _is_int(v) and 0 <= v < 1 << 32)
    need("digest_ticks", lambda v: _is_int(v) and 1000 <= v <= 1 << 40)
    need("mem_digest_every", lambda v: _is_int(v) and 1 <= v <= 1 << 20)
    need("mmu", lambda v: isinstance(v, str) and v in MMU_MODES, optional=True)
    vcpus = need("vcpus", lambda v: _is_int(v) and 1 <= v <= MAX_VCPUS, optional=True) or 1
    need("quantum", lambda v: v is None or _is_int(v) and 1 <= v <= MAX_QUANTUM, optional=True)
    need("input", _is_text, optional=True)
    need("input_to", lambda v: v in ("serial", "keyboard"), optional=True)   # where console input goes
    need("booted", lambda v: isinstance(v, str) and v in BOOTED_KINDS, optional=True)
    need("platform", lambda v: isinstance(v, str) and v in PLATFORMS, optional=True)
    need("debug_exit", _is_debug_exit, optional=True)
    need("initrd", lambda v: v is None or _is_file_ref(v), optional=True)
    entries = need("entries", lambda v: v is None or isinstance(v, list), optional=True) or []
    seen = set()
    for item in entries:
        if not (isinstance(item, list) and len(item) == 2 and _is_int(item[0]) and _is_int(item[1])
                and 0 < item[0] < vcpus and 0 <= item[1] < 1 << 32 and item[0] not in seen):
            raise bad("entries", item)
        seen.add(item[0])
    img = cfg.get("image")
    if not isinstance(img, dict):
        raise LogFormatError(f"{where}'s config does not describe the image")
    for key, ok in (("name", _is_text), ("path", _is_path), ("sha256", _is_sha256)):
        if not ok(img.get(key)):
            raise bad(f"image.{key}", img.get(key))
    if img.get("bundled") is not None and not _known_guest(img["bundled"]):
        raise LogFormatError(f"{where}'s config names an unknown bundled guest in 'image.bundled': "
                             f"{img['bundled']!r:.80}")
    snap = cfg.get("snapshot")
    if snap is not None and not (isinstance(snap, dict) and _is_path(snap.get("path"))
                                 and _is_sha256(snap.get("sha256"))):
        raise bad("snapshot", snap)
