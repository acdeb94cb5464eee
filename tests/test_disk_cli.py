"""Disks from the command line (issue 12): the drive options of `vmm run` and `vmm disk`.

Bad drive options and unusable images are one line and exit status 2, with
nothing written; drives land on the slots QEMU would give them and a guest
sees them through the PIIX3 IDE function and virtio-blk; `vmm disk create |
clone | info | check | convert` make and read images that Debian's qemu-img
(qemu-utils) agrees with: `qemu-img info` reads the same format, size and
backing file, `qemu-img check` finds them clean, `qemu-img compare` finds a
conversion equal to its source.  The qemu-img half skips without qemu-img.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from host.images import create, open_image
from tools import cli
from tools.cli_disk import parse_drive

ROOT = Path(__file__).resolve().parents[1]
QEMU_IMG = shutil.which("qemu-img")
need_qemu_img = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img (Debian's qemu-utils) is not installed")


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    status = cli.main(args)
    out = capsys.readouterr()
    return status, out.out, out.err


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IMG, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def raw(tmp_path):
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(1 << 20)
    return p


# -- drive options ----------------------------------------------------------------------------
def test_parse_drive_takes_qemus_syntax():
    d = parse_drive("file=a,,b.img,if=virtio,format=qcow2,readonly=on,index=3,snapshot=off")
    assert d == {"file": "a,b.img", "if": "virtio", "media": "disk", "format": "qcow2", "index": 3,
                 "readonly": True, "snapshot": False}
    assert parse_drive("file=x.iso,media=cdrom")["if"] == "ide"


@pytest.mark.parametrize("spec, words", [
    ("if=ide", "file="), ("file=X,if=scsi", "ide or virtio"), ("file=X,media=tape", "disk or cdrom"),
    ("file=X,format=vmdk", "raw or qcow2"), ("file=X,readonly=maybe", "on or off"), ("file=X,colour=red", "unknown key"),
    ("file=X,index=two", "a number"), ("file=X,file=Y", "twice"), ("file=X,junk", "KEY=VALUE"),
])
def test_bad_drive_options_are_one_line_and_status_2(spec, words, raw, capsys):
    status, _, err = run_cli(["run", "hello", "--serial", "none", "--drive", spec.replace("X", str(raw))], capsys)
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and words in err, err


def test_unusable_images_are_refused_in_one_line_and_left_alone(tmp_path, raw, capsys):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(60))
    before = bad.read_bytes()
    cases = [
        (["-hda", str(tmp_path / "missing.img")], "missing.img"),
        (["-hda", str(bad)], "bad.qcow2"),
        (["--drive", f"file={raw},format=qcow2"], "disk.img"),
        (["-hda", str(raw), "--drive", f"file={raw},index=0"], "two drives on ide0.0"),
        (["--drive", f"file={raw},if=virtio,media=cdrom"], "CD-ROM needs if=ide"),
        (["--drive", f"file={raw},index=4"], "out of range"),
    ]
    for extra, words in cases:
        status, _, err = run_cli(["run", "hello", "--serial", "none", *extra], capsys)
        assert status == 2 and len(err.strip().splitlines()) == 1 and words in err, (extra, err)
    assert bad.read_bytes() == before
    assert raw.read_bytes() == bytes(1 << 20)


def test_drives_land_on_qemus_slots_and_reach_the_guests_buses(tmp_path, raw, capsys):
    """-hda, -hdb and -cdrom are IDE indexes 0, 1 and 2; virtio drives take PCI slots from 4.
    The machine's IDE function (00:01.1) holds the disk on the primary channel and the CD
    on the secondary; the virtio disk's PCI function is at slot 4."""
    from replay.session import build_machine, machine_config
    from tools.cli_disk import drives_from_args

    iso = tmp_path / "cd.iso"
    iso.write_bytes(bytes(range(256)) * 64)
    vd = tmp_path / "v.qcow2"
    create(vd, 1 << 20)
    args = cli.build_parser().parse_args(["run", "hello", "-hda", str(raw), "-cdrom", str(iso),
                                          "--drive", f"file={vd},if=virtio"])
    drives = drives_from_args(args)
    assert [(d["name"], d["media"], d["format"], d["readonly"]) for d in drives] == [
        ("ide0.0", "disk", "raw", False), ("ide1.0", "cdrom", "raw", True), ("virtio0", "disk", "qcow2", False)]
    from guests.build import guest_path

    data = guest_path("hello").read_bytes()
    cfg = machine_config(32 << 20, 0, "hello", data, "auto", "", 0x100000, "none")
    cfg["platform"] = "pc-2"
    cfg["drives"] = drives
    m = build_machine(cfg, data, None, drive_mode="run")
    try:
        io = m.io
        disk, cd = m.ide.drive(0, 0), m.ide.drive(1, 0)
        assert (disk.kind, cd.kind, m.ide.drive(0, 1).kind) == ("disk", "cdrom", "none")
        words = [int.from_bytes(disk.identify_data()[i:i + 2], "little") for i in range(0, 512, 2)]
        assert words[60] | words[61] << 16 == 2048           # 1 MiB of 512-byte sectors
        assert cd.identify_data()[1] == 0x85                  # ATAPI, CD-ROM
        assert (io.read(0x1F4, 1), io.read(0x1F5, 1)) == (0x00, 0x00)      # an ATA signature
        assert (io.read(0x174, 1), io.read(0x175, 1)) == (0x14, 0xEB)      # a packet device's
        io.write(0xCF8, 4, 0x8000_0000 | 1 << 11 | 1 << 8)
        assert io.read(0xCFC, 4) == 0x7010_8086              # PIIX3 IDE at 00:01.1
        io.write(0xCF8, 4, 0x8000_0000 | 4 << 11)
        assert io.read(0xCFC, 4) == 0x1001_1AF4             # transitional virtio-blk at 00:04.0
    finally:
        m.close()
        from vmm.platform.storage import close_drives

        close_drives(m)


def test_snapshot_on_keeps_the_file_and_save_at_needs_it(raw, tmp_path, capsys):
    status, _, err = run_cli(["run", "hello", "--serial", "none", "-hda", str(raw), "--save-at",
                              f"100:{tmp_path / 's.snap'}"], capsys)
    assert status == 2 and "snapshot=on" in err
    status, _, err = run_cli(["run", "hello", "--serial", "none", "--drive", f"file={raw},snapshot=on",
                              "--save-at", f"100:{tmp_path / 's.snap'}"], capsys)
    assert status == 0 and (tmp_path / "s.snap").exists(), err
    status, _, err = run_cli(["run", "--restore", str(tmp_path / "s.snap"), "--serial", "none",
                              "--max-instructions", "200000"], capsys)
    assert status == 0, err


# -- vmm disk -----------------------------------------------------------------------------------
def test_disk_create_clone_and_info(tmp_path, capsys):
    base = tmp_path / "base.qcow2"
    assert run_cli(["disk", "create", str(base), "64M"], capsys)[0] == 0
    with open_image(base, True) as img:
        img.write(5 << 20, b"base data" * 100)
    clone = tmp_path / "clone.qcow2"
    assert run_cli(["disk", "clone", str(base), str(clone)], capsys)[0] == 0
    status, out, _ = run_cli(["disk", "info", str(clone), "--json"], capsys)
    info = json.loads(out)
    assert status == 0 and info["format"] == "qcow2" and info["virtual_size"] == 64 << 20
    assert info["backing_file"] == str(base) and info["backing_format"] == "qcow2"
    assert os.path.getsize(clone) < 1 << 20                    # thin
    with open_image(clone) as img:
        assert img.read(5 << 20, 900) == b"base data" * 100
    status, out, _ = run_cli(["disk", "info", str(clone)], capsys)
    assert "file format: qcow2" in out and "virtual size: 67,108,864 bytes" in out and str(base) in out


def test_disk_errors_are_one_line(tmp_path, capsys):
    existing = tmp_path / "x.img"
    existing.write_bytes(b"keep")
    for args, words in ((["disk", "create", str(existing), "1M"], "already exists"),
                        (["disk", "create", str(tmp_path / "y.img"), "lots"], "not a size"),
                        (["disk", "info", str(tmp_path / "none.img")], "none.img"),
                        (["disk", "clone", str(tmp_path / "none.img"), str(tmp_path / "c.qcow2")], "none.img"),
                        (["disk"], "subcommand")):
        status, _, err = run_cli(args, capsys)
        assert status == 2 and len(err.strip().splitlines()) == 1 and words in err, (args, err)
    assert existing.read_bytes() == b"keep" and not (tmp_path / "c.qcow2").exists()


def test_disk_check_finds_leaks_and_corruption_and_repairs(tmp_path, capsys):
    img_path = tmp_path / "c.qcow2"
    create(img_path, 4 << 20, cluster_size=4096)
    with open_image(img_path, True) as img:
        img.write(0, b"x" * 8192)
    status, out, _ = run_cli(["disk", "check", str(img_path)], capsys)
    assert status == 0 and "no errors were found" in out
    # a cluster counted but referenced by nobody (what a crash between the two writes leaves): a leak;
    # the file gets one more cluster, which the first refcount block counts (16-bit entries)
    data = bytearray(img_path.read_bytes())
    table = int.from_bytes(data[48:56], "big")
    block = int.from_bytes(data[table:table + 8], "big")
    spare = len(data) // 4096
    data += bytes(4096)
    assert data[block + 2 * spare:block + 2 * spare + 2] == b"\0\0"
    data[block + 2 * spare + 1] = 1
    img_path.write_bytes(bytes(data))
    status, out, _ = run_cli(["disk", "check", str(img_path)], capsys)
    assert status == 1 and "leaked clusters" in out
    status, out, _ = run_cli(["disk", "check", str(img_path), "--repair"], capsys)
    assert status == 0 and "now clean" in out
    assert run_cli(["disk", "check", str(img_path)], capsys)[0] == 0


@need_qemu_img
def test_qemu_img_agrees_with_vmm_disk(tmp_path, capsys):
    raw = tmp_path / "src.img"
    with open(raw, "wb") as f:
        f.truncate(8 << 20)
        for i in range(0, 8 << 20, 1 << 20):
            f.seek(i + 512 * (i >> 20))
            f.write(f"block {i}".encode() * 50)
    q = tmp_path / "conv.qcow2"
    assert run_cli(["disk", "convert", str(raw), str(q)], capsys)[0] == 0
    info = json.loads(qemu_img("info", "--output=json", str(q)).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 8 << 20
    assert qemu_img("check", str(q)).returncode == 0
    assert qemu_img("compare", str(raw), str(q)).returncode == 0
    back = tmp_path / "back.img"
    assert run_cli(["disk", "convert", str(q), str(back), "--format", "raw"], capsys)[0] == 0
    assert back.read_bytes() == raw.read_bytes()
    fresh = tmp_path / "new.qcow2"
    assert run_cli(["disk", "create", str(fresh), "10G"], capsys)[0] == 0
    info = json.loads(qemu_img("info", "--output=json", str(fresh)).stdout)
    assert info["virtual-size"] == 10 << 30 and info["actual-size"] < 1 << 20
    assert qemu_img("check", str(fresh)).returncode == 0
    clone = tmp_path / "clone.qcow2"
    assert run_cli(["disk", "clone", str(q), str(clone)], capsys)[0] == 0
    info = json.loads(qemu_img("info", "--output=json", str(clone)).stdout)
    assert info["backing-filename"] == str(q) and info["backing-filename-format"] == "qcow2"
    assert qemu_img("check", str(clone)).returncode == 0
    assert qemu_img("compare", str(raw), str(clone)).returncode == 0
    # and the other way: what qemu-img makes, vmm disk reads
    theirs = tmp_path / "theirs.qcow2"
    assert qemu_img("convert", "-O", "qcow2", str(raw), str(theirs)).returncode == 0
    status, out, _ = run_cli(["disk", "check", str(theirs)], capsys)
    assert status == 0 and "no errors" in out
    mine = tmp_path / "mine.img"
    assert run_cli(["disk", "convert", str(theirs), str(mine), "-O", "raw"], capsys)[0] == 0
    assert mine.read_bytes() == raw.read_bytes()


def test_with_no_image_the_first_hard_disk_boots(tmp_path, capsys):
    """As QEMU's -hda: the built-in BIOS boots the raw disk; a qcow2 one needs --bios."""
    from guests.build import guest_path

    disk = tmp_path / "boot.img"
    disk.write_bytes(guest_path("hello").read_bytes().ljust(64 << 10, b"\0"))
    proc = subprocess.run([sys.executable, "-m", "tools.cli", "run", "-hda", str(disk)], capture_output=True,
                          timeout=120, check=False, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"Hello from the boot sector!" in proc.stdout        # through INT 10h, on the terminal
    q = tmp_path / "boot.qcow2"
    create(q, 1 << 20)
    status, _, err = run_cli(["run", "-hda", str(q), "--serial", "none"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "--bios" in err, err
