#!/usr/bin/env python3
"""Build the guest images from their assembly sources with nasm.

    python3 guests/build.py [--out DIR] [--check] [-q]

Every guest is one nasm source in this directory assembled with ``-f bin`` into
``guests/build/`` (or ``--out DIR``).  The output is byte-for-byte
reproducible: the flat binary format has no timestamps, nasm runs with this
directory as its working directory and relative file names, and no
date/time/file-name macros are used by the sources.  The built images are kept
in the repository so that the VMM runs without nasm.

``--check`` rebuilds into a temporary directory and compares the result with
``guests/build/``; it exits 1 naming the files that differ (or are missing).

From Python (the VMM's CLI uses these)::

    from guests.build import build_all, guest_path
    build_all(out_dir)         # {name: Path} of freshly built images
    guest_path("demo")         # guests/build/demo.elf, built first if missing

Next to each image the build writes a gdb symbol file (``demo.elf`` ->
``demo.sym``, guests/symbols.py): ``symbol-file guests/build/demo.sym`` in gdb.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

GUESTS_DIR = Path(__file__).resolve().parent
BUILD_DIR = GUESTS_DIR / "build"

NASM_MISSING = "nasm not found: apt-get install nasm"


@dataclass(frozen=True)
class Guest:
    name: str
    source: str  # file name in guests/
    output: str  # file name in the build directory
    description: str
    qemu_args: tuple[str, ...] = ()  # extra QEMU options for the reference run (e.g. a CPU model)


GUESTS: dict[str, Guest] = {
    g.name: g
    for g in (
        Guest("hello", "hello.asm", "hello.img",
              "512-byte BIOS boot sector: prints a line via int 10h, exits via port 0x501"),
        Guest("demo", "demo.asm", "demo.elf",
              "Multiboot v1 ELF32 kernel: GDT/IDT/paging/PIC/PIT/RTC, two ring-3 tasks (int 0x80, sysenter)"),
        Guest("crash", "crash.asm", "crash.bin",
              "Multiboot (a.out kludge) kernel with a timer/worker race on a shared pointer: crashes on some "
              "boots (depends on the RTC), for the reverse-debugging walkthrough"),
        # Device test guests (t_*.asm, sharing the frame in t_common.asm): each
        # prints "<name> ok: ..." per check on COM1 and exits through port 0x501
        # with 0, or with the number of the failing check (99: unexpected exception).
        Guest("t_pit", "t_pit.asm", "t_pit.elf",
              "test: 8254 modes 0/2, IRQ0 rate against counter 2, latch and read-back, port 0x61 calibration"),
        Guest("t_rtc", "t_rtc.asm", "t_rtc.elf",
              "test: MC146818 time in BCD and binary, periodic IRQ8 against PIT ticks, register C, SET"),
        Guest("t_uart", "t_uart.asm", "t_uart.elf",
              "test: 16550A scratch, divisor latch, loopback probe, FIFO, THRE interrupts on IRQ4"),
        Guest("t_pic", "t_pic.asm", "t_pic.elf",
              "test: 8259A EOI kinds, masking, poll, priority, AEOI, spurious IRQ7 protocol, cascade via RTC"),
        Guest("t_kbd", "t_kbd.asm", "t_kbd.elf",
              "test: 8042 self test, keyboard commands, A20 via 8042 and port 0x92 by aliasing at 1 MiB"),
        Guest("t_bios", "t_bios.asm", "t_bios.img",
              "test: boot disk exercising INT 13h CHS/LBA, INT 15h E820, INT 12h, INT 1Ah, INT 10h cursor"),
        Guest("t_paging", "t_paging.asm", "t_paging.elf",
              "test: #PF kinds (not present, R/O with CR0.WP=0/1, U/S, NX, reserved bits), A/D flags, "
              "4 MiB / 2 MiB pages, INVLPG and CR3 flushes, 32-bit and PAE paging",
              qemu_args=("-cpu", "qemu32,+nx")),
    )
}


class BuildError(RuntimeError):
    """A guest could not be built (the message is one line, fit for a CLI)."""


class NasmNotFound(BuildError):
    def __init__(self) -> None:
        super().__init__(NASM_MISSING)


def find_nasm() -> str:
    nasm = shutil.which("nasm")
    if nasm is None:
        raise NasmNotFound()
    return nasm


def _lookup(name: str) -> Guest:
    try:
        return GUESTS[name]
    except KeyError:
        raise BuildError(f"unknown guest {name!r} (known: {', '.join(sorted(GUESTS))})") from None


def build_one(name: str, out_dir: os.PathLike | str = BUILD_DIR) -> Path:
    """Assemble one guest into ``out_dir`` and return the image's path."""
    guest = _lookup(name)
    nasm = find_nasm()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / guest.output
    # Assemble to a temporary name in the same directory, then rename: a
    # failed or interrupted build never leaves a half-written image behind.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{guest.output}.", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    symmap = tmp.with_name(tmp.name + ".map")   # nasm's symbol map, for the gdb symbol file
    try:
        # Relative source name, cwd = guests/: nothing about where the
        # checkout lives can leak into the output or into error messages.
        env = {k: v for k, v in os.environ.items() if not k.startswith("NASM")}
        env["SOURCE_DATE_EPOCH"] = "0"
        proc = subprocess.run(
            [nasm, "-f", "bin", "--before", f"[map symbols {symmap}]", "-o", str(tmp), guest.source],
            cwd=GUESTS_DIR, env=env, capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            detail = " | ".join((proc.stderr or proc.stdout).strip().splitlines())
            raise BuildError(f"nasm failed on {guest.source}: {detail or f'exit {proc.returncode}'}")
        if proc.stderr.strip():
            print(proc.stderr.rstrip(), file=sys.stderr)
        problem = validate(name, tmp.read_bytes())
        if problem:
            raise BuildError(f"{guest.output}: {problem}")
        write_symbols(symmap.read_text(), (GUESTS_DIR / guest.source).read_text(), symbols_path(target))
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        for t in (tmp, symmap):
            if t.exists():
                t.unlink()
    return target


def symbols_path(image: Path) -> Path:
    """The gdb symbol file built next to a guest image (demo.elf -> demo.sym; guests/symbols.py)."""
    return image.with_suffix(".sym")


def write_symbols(map_text: str, source: str, path: Path) -> None:
    from guests.symbols import symbols_from_map

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(symbols_from_map(map_text, source))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def build_all(out_dir: os.PathLike | str = BUILD_DIR) -> dict[str, Path]:
    """Build every guest into ``out_dir``; returns {name: path of the image}."""
    find_nasm()  # fail early with the one-line message
    return {name: build_one(name, out_dir) for name in GUESTS}


def guest_path(name: str) -> Path:
    """Path of a built guest image in guests/build/, building it if missing."""
    guest = _lookup(name)
    path = BUILD_DIR / guest.output
    if not path.is_file():
        build_one(name, BUILD_DIR)
    return path


def check(build_dir: os.PathLike | str = BUILD_DIR) -> list[str]:
    """Rebuild into a temporary directory; return the names of the image files
    in ``build_dir`` that are missing or differ (empty list: all identical)."""
    build_dir = Path(build_dir)
    with tempfile.TemporaryDirectory(prefix="guests-check-") as tmp:
        fresh = build_all(tmp)
        bad = []
        for name in sorted(fresh):
            for built in (fresh[name], symbols_path(fresh[name])):
                committed = build_dir / built.name
                if not committed.is_file() or not filecmp.cmp(built, committed, shallow=False):
                    bad.append(built.name)
        return bad


# ---------------------------------------------------------------------------
# Structural checks of the images (also used by the tests).

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_SEARCH_BYTES = 8192


def validate(name: str, data: bytes) -> str | None:
    """Return a description of what is wrong with a built image, or None."""
    if name == "hello":
        return check_boot_sector(data)
    if name == "demo":
        return check_elf32_i386(data) or check_multiboot_header(data)
    if name.startswith("t_"):
        if GUESTS[name].output.endswith(".img"):
            return check_disk_image(data)
        return check_elf32_i386(data) or check_multiboot_header(data)
    return None


def check_disk_image(data: bytes) -> str | None:
    """A hard-disk image: whole 512-byte sectors, a boot signature in the first."""
    if len(data) < 512 or len(data) % 512:
        return f"disk image is {len(data)} bytes, not a whole number of 512-byte sectors"
    if data[510:512] != b"\x55\xaa":
        return "boot sector does not end with 55 AA"
    return None


def check_boot_sector(data: bytes) -> str | None:
    if len(data) != 512:
        return f"boot sector is {len(data)} bytes, not 512"
    if data[510:512] != b"\x55\xaa":
        return "boot sector does not end with 55 AA"
    return None


def find_multiboot_header(data: bytes) -> int | None:
    """Offset of a valid Multiboot v1 header (magic + checksum) in the first
    8 KiB at 4-byte alignment, or None."""
    limit = min(len(data), MULTIBOOT_SEARCH_BYTES) - 12
    for off in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MULTIBOOT_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off
    return None


def check_multiboot_header(data: bytes) -> str | None:
    if find_multiboot_header(data) is None:
        return "no valid Multiboot v1 header in the first 8 KiB"
    return None


def check_elf32_i386(data: bytes) -> str | None:
    if len(data) < 52 or data[:4] != b"\x7fELF":
        return "not an ELF file"
    if data[4] != 1 or data[5] != 1:
        return "not ELF32 little-endian"
    e_type, e_machine, _version, e_entry, e_phoff = struct.unpack_from("<HHIII", data, 16)
    if e_type != 2 or e_machine != 3:
        return f"not an i386 executable (e_type={e_type}, e_machine={e_machine})"
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 42)
    if e_phnum == 0 or e_phentsize < 32 or e_phoff + e_phnum * e_phentsize > len(data):
        return "bad program header table"
    entry_ok = False
    for i in range(e_phnum):
        p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIIIII", data, e_phoff + i * e_phentsize)
        if p_type != 1:  # PT_LOAD
            continue
        if p_offset + p_filesz > len(data) or p_memsz < p_filesz:
            return f"PT_LOAD segment {i} does not fit the file"
        if p_paddr < 0x100000:
            return f"PT_LOAD segment {i} loads below 1 MiB"
        if p_vaddr <= e_entry < p_vaddr + p_filesz:
            entry_ok = True
    if not entry_ok:
        return f"entry point {e_entry:#x} is not inside a loaded segment"
    return None


# ---------------------------------------------------------------------------
# Reference runs under QEMU (for differential tests against the VMM).

EXPECTED_DIR = GUESTS_DIR / "expected"

# -rtc pins the date the demo prints; isa-debug-exit at 0x501 makes QEMU exit
# with status (v << 1) | 1 when the guest writes v there.
QEMU_COMMON_ARGS = [
    "-display", "none", "-serial", "stdio",
    "-device", "isa-debug-exit,iobase=0x501,iosize=2",
    "-rtc", "base=2026-01-01T00:00:00,clock=vm",
    "-no-reboot",
]


def qemu_command(name: str, image: str | None = None, qemu: str = "qemu-system-i386") -> list[str]:
    """The QEMU command line that produced guests/expected/<name>.serial when
    run from the repository root.  ``image`` defaults to the relative path
    guests/build/<file>; the demo prints it (QEMU passes the -kernel file name
    as the Multiboot command line)."""
    guest = _lookup(name)
    image = image or f"guests/build/{guest.output}"
    if guest.output.endswith(".img"):
        return [qemu, *QEMU_COMMON_ARGS, *guest.qemu_args, "-drive", f"format=raw,file={image}"]
    return [qemu, *QEMU_COMMON_ARGS, *guest.qemu_args, "-kernel", image]


def expected_serial(name: str) -> bytes:
    """The serial output QEMU gives for a guest (see qemu_command)."""
    return (EXPECTED_DIR / f"{_lookup(name).name}.serial").read_bytes()


# ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Assemble the guest images with nasm.")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help=f"output directory (default: {BUILD_DIR.relative_to(GUESTS_DIR.parent)})")
    parser.add_argument("--check", action="store_true",
                        help="rebuild into a temporary directory and compare with guests/build/ "
                             "(or --out DIR); exit 1 if any file differs")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    try:
        if args.check:
            target = Path(args.out) if args.out else BUILD_DIR
            bad = check(target)
            if bad:
                print(f"guest images differ from a fresh build: {' '.join(bad)}", file=sys.stderr)
                return 1
            if not args.quiet:
                print(f"guest images in {target} match a fresh build")
            return 0
        built = build_all(args.out or BUILD_DIR)
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not args.quiet:
        for name, path in built.items():
            print(f"{name:6} {path.stat().st_size:6} bytes  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
