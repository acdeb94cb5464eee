"""Issue 16: unbounded inputs and plain user errors.

Every file vmm reads an image from must be a regular file of a size that fits,
checked before a byte is read (`vmm run /dev/zero` once grew by 1 GB/s, a FIFO
blocked forever, a log naming /dev/zero as its image hung replay).  Every
plain user error is one line on stderr and exit status 2, never a traceback;
every numeric flag is range-checked.
"""
from __future__ import annotations

import copy
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tools.cli import main

ROOT = Path(__file__).resolve().parent.parent
USAGE = 2


def _one_line_error(capsys, status: int, want: int = USAGE) -> str:
    err = capsys.readouterr().err
    assert status == want, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("vmm: "), lines
    return lines[0]


def _vmm(*args, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """The CLI in a child, with a bound: a hang fails the test instead of the suite."""
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=ROOT, capture_output=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL, **kw)


def _flat(tmp_path, code: bytes = b"\xfa\xf4", name: str = "flat.bin") -> Path:
    p = tmp_path / name
    p.write_bytes(code)
    return p


# -- files that are not regular files ---------------------------------------------------------

@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null"])
def test_run_refuses_a_device_as_its_image(capsys, path):
    line = _one_line_error(capsys, main(["run", path, "--serial", "none"]))
    assert "not a regular file" in line and path in line


def test_run_refuses_a_directory_as_its_image(tmp_path, capsys):
    line = _one_line_error(capsys, main(["run", str(tmp_path), "--serial", "none"]))
    assert "not a regular file" in line


def test_run_refuses_a_fifo_as_its_image_without_blocking(tmp_path):
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    proc = _vmm("run", str(fifo), "--serial", "none", timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == USAGE and "not a regular file (a FIFO)" in err and "Traceback" not in err, err


def test_initrd_and_replay_image_are_checked_too(tmp_path, capsys):
    kernel = _flat(tmp_path)
    line = _one_line_error(capsys, main(["run", str(kernel), "--boot", "flat", "--initrd", "/dev/zero",
                                         "--serial", "none"]))
    assert "not a regular file" in line
    log = tmp_path / "r.vmlog"
    assert main(["record", str(kernel), "--boot", "flat", "--serial", "none", "-o", str(log)]) == 0
    capsys.readouterr()
    line = _one_line_error(capsys, main(["replay", str(log), "--image", "/dev/zero", "--serial", "none"]))
    assert "not a regular file" in line


@pytest.mark.parametrize("argv", [["log", "verify"], ["log", "show"], ["replay"]])
def test_a_fifo_or_device_as_the_log_is_refused_without_blocking(tmp_path, argv):
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        proc = _vmm(*argv, path, timeout=60)
        err = proc.stderr.decode()
        assert proc.returncode == USAGE and "not a regular file" in err and "Traceback" not in err, (path, err)


def test_a_log_whose_recorded_image_is_dev_zero_is_refused_at_once(tmp_path):
    from tests.fuzz.harness import hello_recording, write_log

    _data, cfg, events, digest = hello_recording()
    cfg = copy.deepcopy(cfg)
    cfg["image"]["path"] = "/dev/zero"
    cfg["image"]["bundled"] = None
    log = tmp_path / "zero.vmlog"
    log.write_bytes(write_log(events, cfg, digest))
    proc = _vmm("replay", str(log), "--serial", "none", timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == USAGE and "/dev/zero" in err and "not a regular file" in err, err
    assert "Traceback" not in err


def test_an_image_larger_than_any_image_is_refused_before_it_is_read(tmp_path, capsys):
    from vmm.firmware.imagefile import MAX_IMAGE

    big = tmp_path / "sparse.img"
    with open(big, "wb") as f:
        f.truncate(MAX_IMAGE + 512)    # sparse: no disk space, and it must not be read
    line = _one_line_error(capsys, main(["run", str(big), "--serial", "none"]))
    assert "more than" in line


def test_a_flat_binary_larger_than_ram_is_refused(tmp_path, capsys):
    p = _flat(tmp_path, bytes(3 << 20))
    line = _one_line_error(capsys, main(["run", str(p), "--boot", "flat", "--mem", "2M", "--serial", "none"]))
    assert "does not fit" in line


# -- plain user errors ------------------------------------------------------------------------

def test_serial_tcp_port_out_of_range(capsys):
    for spec in ("tcp:99999", "tcp:-1", "tcp:127.0.0.1:65536", "tcp:x"):
        line = _one_line_error(capsys, main(["run", "demo", "--serial", spec, "--max-instructions", "10"]))
        assert "tcp" in line


def test_cmdline_that_is_not_utf8(tmp_path):
    """A command line with bytes that are not UTF-8 (Python's argv holds them as surrogates)."""
    kernel = _flat(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "tools.cli", "run", str(kernel), "--boot", "flat",
                           "--serial", "none", b"--cmdline", b"abc\xff\xfe"], cwd=ROOT, capture_output=True,
                          timeout=60, check=False)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == USAGE and "--cmdline" in err and "UTF-8" in err and "Traceback" not in err, err


def test_serial_output_to_a_full_device(capsys):
    status = main(["run", "demo", "--serial", "/dev/full", "--max-instructions", "5000000"])
    line = _one_line_error(capsys, status)
    assert "/dev/full" in line


def test_replay_image_that_is_not_bootable(tmp_path, capsys):
    kernel = _flat(tmp_path)
    log = tmp_path / "r.vmlog"
    assert main(["record", "hello", "--serial", "none", "-o", str(log)]) == 0
    capsys.readouterr()
    line = _one_line_error(capsys, main(["replay", str(log), "--image", str(kernel), "--serial", "none"]))
    assert "boot" in line


def _elf(segments: list[tuple[int, int, int]], body: bytes = b"\xf4" * 64) -> bytes:
    """A 32-bit i386 ELF with a Multiboot header; segments are (paddr, filesz, memsz)."""
    phoff, n = 52, len(segments)
    data_off = phoff + 32 * n + 12
    eh = b"\x7fELF\x01\x01\x01" + bytes(9) + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, segments[0][0], phoff, 0, 0,
                                                         52, 32, n, 0, 0, 0)
    ph = b"".join(struct.pack("<IIIIIIII", 1, data_off, pa, pa, fs, ms, 5, 0x1000) for pa, fs, ms in segments)
    mb = struct.pack("<III", 0x1BADB002, 0, (-0x1BADB002) & 0xFFFFFFFF)
    return eh + ph + mb + body.ljust(max(fs for _, fs, _ in segments), b"\0")


def test_elf_segment_with_filesz_above_memsz_at_the_top_of_ram(tmp_path, capsys):
    mem = 4 << 20
    p = tmp_path / "k.elf"
    p.write_bytes(_elf([(mem - 0x100, 0x1000, 0x100)]))
    line = _one_line_error(capsys, main(["run", str(p), "--mem", "4M", "--serial", "none"]))
    assert "segment" in line


@pytest.mark.parametrize("argv", [
    ["run", "hello", "--mem", "0"],
    ["run", "hello", "--mem", "64G"],
    ["run", "hello", "--mem", "2049K"],
    ["run", "hello", "--max-instructions", str(1 << 64)],
    ["run", "hello", "--load-addr", str(1 << 32)],
    ["run", "hello", "--load-addr", "-5"],
    ["run", "hello", "--rtc-epoch", str(1 << 64)],
    ["run", "hello", "--save-at", f"{1 << 64}:x.snap"],
    ["replay", "x.vmlog", "--until", str(1 << 64)],
    ["replay", "x.vmlog", "--gdb", ":0", "--checkpoint-interval", "0"],
    ["replay", "x.vmlog", "--gdb", ":0", "--checkpoint-interval", "1"],
    ["replay", "x.vmlog", "--gdb", ":0", "--checkpoint-interval", str(1 << 64)],
])
def test_numeric_flags_out_of_range_are_usage_errors(argv, capsys):
    try:
        status = main([*argv, "--serial", "none"])
    except SystemExit as e:     # argparse's own refusal: one usage line and status 2
        status = e.code
    err = capsys.readouterr().err
    assert status == USAGE and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(("vmm: ", "usage:")) or "error:" in err, err


def test_checkpoint_interval_that_would_take_too_many_checkpoints(tmp_path, capsys):
    log = tmp_path / "r.vmlog"
    assert main(["record", "demo", "--serial", "none", "--max-instructions", "3000000", "-o", str(log)]) == 0
    capsys.readouterr()
    line = _one_line_error(capsys, main(["replay", str(log), "--gdb", "127.0.0.1:0", "--serial", "none",
                                         "--checkpoint-interval", "1000"]))
    assert "--checkpoint-interval" in line
