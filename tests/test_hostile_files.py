"""Issue 16, unbounded inputs: every flag that names a file vmm reads whole.

`vmm run --bios /dev/zero` and `vmm run --input /dev/zero` read until memory
ran out, a FIFO there blocked forever, and a file of many GiB was read whole
before anyone looked at its size.  Each such flag now takes a regular file
of a bounded size, checked before a byte is read (vmm/firmware/imagefile.py),
and refuses anything else in one line with exit status 2:

| flag | at most |
|---|---|
| IMAGE, --kernel, --initrd, `replay --image` | 4 GiB (tests/test_hostile_inputs.py) |
| --bios | 16 MiB (the largest BIOS image, vmm/firmware/rom.py) |
| --input | 16 MiB (recorded as one console event, whose payload the log format bounds) |
| `ft backup --image` | 4 GiB, as IMAGE |
| -hda/-hdb/-cdrom/--drive | a regular file (vmm/platform/storage.py; not read whole) |
| --restore | a regular file (exit 7, an unusable snapshot) |
| `regress LIST` | 16 MiB |

Each case runs the CLI in a child with a 2 GiB address-space limit and a
time bound, so the old behaviour fails the test (a MemoryError traceback or
a timeout) instead of taking the machine's memory.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
USAGE = 2
AS_LIMIT = 2 << 30


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def _vmm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=ROOT, capture_output=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL, preexec_fn=_limit)


def _refused(proc: subprocess.CompletedProcess, *words: str, status: int = USAGE) -> str:
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    assert proc.returncode == status, (proc.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vmm: "), lines
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def files(tmp_path):
    """Things that are no input file: a device that never ends, a FIFO nobody writes, a
    directory, and a sparse regular file far above every limit (no disk space, never read)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.sparse"
    with open(big, "wb") as f:
        f.truncate(5 << 30)
    flat = tmp_path / "flat.bin"
    flat.write_bytes(b"\xfa\xf4")                      # cli; hlt
    return {"/dev/zero": ("/dev/zero", "not a regular file (a character device)"),
            "fifo": (str(fifo), "not a regular file (a FIFO)"),
            "directory": (str(tmp_path), "not a regular file (a directory)"),
            "5 GiB": (str(big), "more than"),
            "flat": str(flat)}


NOT_FILES = ["/dev/zero", "fifo", "directory", "5 GiB"]


@pytest.mark.parametrize("command", ["run", "record"])
@pytest.mark.parametrize("kind", NOT_FILES)
def test_bios_must_be_a_regular_file_of_bios_size(files, tmp_path, command, kind):
    path, why = files[kind]
    extra = ["-o", str(tmp_path / "r.vmlog")] if command == "record" else []
    _refused(_vmm(command, "--bios", path, "--serial", "none", *extra), path, why)


@pytest.mark.parametrize("command", ["run", "record"])
@pytest.mark.parametrize("kind", NOT_FILES)
def test_input_must_be_a_regular_file_of_bounded_size(files, tmp_path, command, kind):
    path, why = files[kind]
    extra = ["-o", str(tmp_path / "r.vmlog")] if command == "record" else []
    _refused(_vmm(command, files["flat"], "--boot", "flat", "--serial", "none", "--input", path, *extra),
             path, why)


def test_bios_and_input_just_above_their_limits_are_refused(files, tmp_path):
    from replay.logfile import MAX_EVENT_PAYLOAD
    from vmm.firmware.rom import ROM_MAX

    rom = tmp_path / "rom.bin"
    with open(rom, "wb") as f:
        f.truncate(ROM_MAX + (64 << 10))
    _refused(_vmm("run", "--bios", str(rom), "--serial", "none"), str(rom), "more than", "BIOS")
    text = tmp_path / "typed.txt"
    with open(text, "wb") as f:
        f.truncate(MAX_EVENT_PAYLOAD + 1)
    _refused(_vmm("run", files["flat"], "--boot", "flat", "--serial", "none", "--input", str(text)),
             str(text), "more than", "input")


def test_an_input_file_within_its_limit_still_reaches_the_guest(tmp_path):
    """The limit takes nothing from a real --input: a kernel polling COM1 exits with the byte."""
    from tests.test_cli_habits import COM1_POLL_32, LIMIT, status

    kernel = tmp_path / "k.bin"
    kernel.write_bytes(COM1_POLL_32 + bytes(8))
    typed = tmp_path / "typed.txt"
    typed.write_bytes(b"7")
    proc = _vmm("run", str(kernel), "--boot", "flat", "--serial", "none", "--input", str(typed), *LIMIT)
    assert proc.returncode == status(ord("7")), proc.stderr.decode()


@pytest.mark.parametrize("kind", NOT_FILES)
def test_ft_backup_image_is_checked_before_it_is_read(files, kind):
    path, why = files[kind]
    _refused(_vmm("ft", "backup", "--join", "127.0.0.1:9", "--image", path), path, why)


@pytest.mark.parametrize("flag", ["-hda", "-cdrom"])
@pytest.mark.parametrize("kind", ["/dev/zero", "fifo"])
def test_a_disk_that_is_no_regular_file_is_one_line_under_python_m_too(files, flag, kind):
    """`python -m tools.cli` once ran a second copy of tools/cli.py as __main__, whose main()
    did not catch the UsageError the disk options raise (a traceback, exit 1)."""
    path, _why = files[kind]
    _refused(_vmm("run", files["flat"], "--boot", "flat", "--serial", "none", flag, path), path,
             "not a regular file")


def test_a_regress_list_is_checked_before_it_is_read(files):
    path, why = files["5 GiB"]
    _refused(_vmm("regress", path), path, why, "list")
