"""The guest images in guests/build/ are reproducible from source and well formed.

Rebuilding needs nasm (skipped without it); the structural checks read the
committed images; the reference runs need qemu-system-i386 (skipped without).
"""
from __future__ import annotations

import shutil
import struct
import subprocess
import sys

import pytest

from guests import build as gb

HAVE_NASM = shutil.which("nasm") is not None
HAVE_QEMU = shutil.which("qemu-system-i386") is not None
needs_nasm = pytest.mark.skipif(not HAVE_NASM, reason="nasm not installed (apt-get install nasm)")
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-system-i386 not installed")

BUILD_SCRIPT = gb.GUESTS_DIR / "build.py"
ROOT = gb.GUESTS_DIR.parent


def committed(name: str) -> bytes:
    path = gb.BUILD_DIR / gb.GUESTS[name].output
    if not path.is_file():
        pytest.fail(f"{path} is missing: run python3 guests/build.py and commit the result")
    return path.read_bytes()


# ---- reproducibility ----------------------------------------------------------

@needs_nasm
def test_rebuild_matches_committed_images(tmp_path):
    built = gb.build_all(tmp_path)
    assert set(built) == set(gb.GUESTS)
    for name, path in built.items():
        assert path == tmp_path / gb.GUESTS[name].output
        assert path.read_bytes() == committed(name), f"{path.name} is stale: rebuild guests/build/ and commit"


@needs_nasm
def test_two_builds_are_identical_and_path_free(tmp_path):
    first = gb.build_all(tmp_path / "one")
    second = gb.build_all(tmp_path / "two")
    for name in gb.GUESTS:
        data = first[name].read_bytes()
        assert data == second[name].read_bytes()
        for leak in (str(tmp_path), str(gb.GUESTS_DIR), str(ROOT)):
            assert leak.encode() not in data, f"{name} embeds the path {leak}"


@needs_nasm
def test_check_cli_passes_on_committed_images():
    proc = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--check"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


@needs_nasm
def test_check_names_the_differing_files(tmp_path):
    stale = tmp_path / "stale"
    shutil.copytree(gb.BUILD_DIR, stale)
    hello = stale / "hello.img"
    data = bytearray(hello.read_bytes())
    data[3] ^= 0xFF
    hello.write_bytes(bytes(data))
    (stale / "demo.elf").unlink()
    assert gb.check(stale) == ["demo.elf", "hello.img"]

    proc = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--check", "--out", str(stale)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert "hello.img" in proc.stderr and "demo.elf" in proc.stderr


def test_missing_nasm_gives_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(gb.shutil, "which", lambda _name: None)
    with pytest.raises(gb.NasmNotFound) as err:
        gb.build_all(tmp_path)
    assert str(err.value) == "nasm not found: apt-get install nasm"

    proc = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--out", str(tmp_path)],
                          capture_output=True, text=True, env={"PATH": str(tmp_path)},
                          timeout=60, check=False)
    assert proc.returncode != 0
    assert proc.stderr == "nasm not found: apt-get install nasm\n"
    assert not any(tmp_path.iterdir())


def test_guest_path_points_into_build_dir():
    for name, guest in gb.GUESTS.items():
        if not HAVE_NASM and not (gb.BUILD_DIR / guest.output).is_file():
            pytest.skip("image missing and nasm not installed")
        path = gb.guest_path(name)
        assert path == gb.BUILD_DIR / guest.output
        assert path.is_file()
    with pytest.raises(gb.BuildError):
        gb.guest_path("no-such-guest")


# ---- structure of the images --------------------------------------------------

def test_hello_is_a_boot_sector():
    data = committed("hello")
    assert len(data) == 512
    assert data[510:] == b"\x55\xaa"
    assert b"Hello from the boot sector!\r\n" in data


def test_demo_has_a_multiboot_header():
    data = committed("demo")
    offset = gb.find_multiboot_header(data)
    assert offset is not None and offset % 4 == 0 and offset + 12 <= 8192
    magic, flags, checksum = struct.unpack_from("<III", data, offset)
    assert magic == 0x1BADB002
    assert (magic + flags + checksum) % (1 << 32) == 0
    assert flags & (1 << 1), "asks for the memory information"
    assert not flags & (1 << 16), "no a.out kludge: the loader must use the ELF program headers"


def test_demo_is_an_elf32_i386_executable():
    data = committed("demo")
    assert gb.check_elf32_i386(data) is None
    assert data[:4] == b"\x7fELF"
    assert data[4] == 1 and data[5] == 1  # ELFCLASS32, little-endian
    e_type, e_machine, e_version, e_entry, e_phoff = struct.unpack_from("<HHIII", data, 16)
    assert (e_type, e_machine, e_version) == (2, 3, 1)  # ET_EXEC, EM_386
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 42)
    assert e_phentsize == 32 and e_phnum >= 1
    loads = []
    for i in range(e_phnum):
        fields = struct.unpack_from("<8I", data, e_phoff + i * e_phentsize)
        if fields[0] == 1:
            loads.append(fields)
    assert loads
    for _type, offset, vaddr, paddr, filesz, memsz, _flags, _align in loads:
        assert paddr >= 0x100000 and vaddr == paddr
        assert offset + filesz <= len(data) and memsz >= filesz
        assert paddr + memsz <= 8 << 20  # the demo's identity map covers 0-8 MiB
    assert any(vaddr <= e_entry < vaddr + filesz for _t, _o, vaddr, _p, filesz, *_ in loads)


def test_validate_rejects_broken_images():
    assert gb.check_boot_sector(b"\0" * 512) is not None
    assert gb.check_boot_sector(b"\0" * 510 + b"\x55\xaa") is None
    assert gb.check_multiboot_header(b"\0" * 8192) is not None
    assert gb.check_elf32_i386(b"\x7fELF" + b"\0" * 60) is not None


# ---- reference runs under QEMU -------------------------------------------------

# `crash` is left out: whether it loses its race depends on timing, and QEMU's
# timers follow the host clock (that guest is about replaying one such run)
@needs_qemu
@pytest.mark.parametrize("name", sorted(n for n in gb.GUESTS if n != "crash"))
def test_qemu_reference_output(name):
    committed(name)
    proc = subprocess.run(gb.qemu_command(name), cwd=ROOT, capture_output=True, stdin=subprocess.DEVNULL,
                          timeout=60, check=False)
    assert proc.returncode == 1, f"expected debug-exit status 0 -> QEMU exit 1, got {proc.returncode}"
    assert proc.stdout == gb.expected_serial(name)
