"""The `vmm` command line (tools/cli.py): what a user sees.

* `vmm run` boots the demo and exits 0 with the demo's lines on the terminal
  (a subprocess, stdout captured) or in --serial FILE; `vmm run hello` prints
  the boot sector's line.
* --max-instructions N stops at exactly N retired instructions (--stats and
  the machine itself agree), and what was printed up to then is a prefix of
  the full run's output.
* Bad arguments and unusable images give exit status 2 and either one line
  "vmm: error: ..." or argparse's usage message, never a traceback.
* A triple-faulting guest exits 3 with one line; --exit-code qemu turns a
  guest status v into (v << 1) | 1.
* `vmm --help` and `vmm run --help` document every option (taken from the
  parser itself, so new options are held to it too) and the exit statuses.
"""
from __future__ import annotations

import argparse
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from guests import build as gb
from tools import cli
from vmm.firmware.boot import boot
from vmm.machine import StopReason
from vmm.platform.pc import PcConfig, PcMachine

ROOT = Path(__file__).resolve().parents[1]
DEMO_EXPECTED = gb.expected_serial("demo").decode()
# The lines of the demo's output that depend on how it was started: the
# Multiboot memory size (RAM size and QEMU's reservations at the top) and the
# command line (QEMU passes the -kernel path; vmm passes the IMAGE argument).
VARIABLE = re.compile(r"^\[demo\] (memory: lower \d+ KiB, upper \d+ KiB|command line: \".*\")\r?$")


def vmm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, check=False)


def main(argv: list[str]) -> int:
    """tools.cli.main in process; argparse's exits become return values."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def fixed_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if not VARIABLE.match(line)]


# ---- booting the bundled guests --------------------------------------------------------

def test_run_without_image_boots_the_demo():
    proc = vmm("run")
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert fixed_lines(out) == fixed_lines(DEMO_EXPECTED)
    assert '[demo] command line: "demo"\r\n' in out
    assert "[demo] memory: lower 639 KiB, upper 31744 KiB\r\n" in out  # 32 MiB by default
    assert out.endswith("[demo] all tasks done, exiting with status 0\r\n")
    assert b"Traceback" not in proc.stderr


def test_run_demo_serial_to_a_file(tmp_path, capsys):
    serial = tmp_path / "com1.txt"
    assert main(["run", "--serial", str(serial)]) == 0
    out = serial.read_bytes().decode()
    assert fixed_lines(out) == fixed_lines(DEMO_EXPECTED)
    assert out.endswith("[demo] all tasks done, exiting with status 0\r\n")
    assert capsys.readouterr().out == ""  # nothing on the terminal


def test_run_hello_prints_its_line():
    proc = vmm("run", "hello")
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"Hello from the boot sector!" in proc.stdout


# ---- --max-instructions ----------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 1000, 123_457, 2_000_003])
def test_max_instructions_stops_exactly(n, tmp_path, capsys):
    serial = tmp_path / "com1.txt"
    assert main(["run", "demo", "--max-instructions", str(n), "--stats", "--serial", str(serial)]) == 0
    err = capsys.readouterr().err
    assert re.search(rf"^vmm: {n} instructions in ", err, re.MULTILINE), err
    assert re.search(rf"^vmm: stopped after {n} instructions\b", err, re.MULTILINE), err
    assert DEMO_EXPECTED.replace('"guests/build/demo.elf"', '"demo"').startswith(
        serial.read_bytes().decode().replace("upper 31744 KiB", "upper 129920 KiB"))

    m = PcMachine(PcConfig(mem_size=32 << 20))
    boot(m, gb.guest_path("demo").read_bytes(), name="demo", cmdline="demo")
    res = m.run(n)
    assert (res.reason, res.icount) == (StopReason.LIMIT, n)
    assert bytes(m.serial_out) == serial.read_bytes()


def test_max_instructions_accepts_underscores_and_hex(capsys):
    assert main(["run", "demo", "--serial", "none", "--max-instructions", "0x1_000", "--stats"]) == 0
    assert "vmm: 4096 instructions in " in capsys.readouterr().err


# ---- bad arguments ----------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    (tmp_path / "junk.bin").write_bytes(bytes(range(256)) * 3)
    (tmp_path / "empty.img").write_bytes(b"")
    (tmp_path / "adir").mkdir()
    return tmp_path


BAD = {
    "unknown flag": (["run", "--frobnicate"], "usage"),
    "unknown command": (["frobnicate"], "usage"),
    "bad --mem text": (["run", "--mem", "lots"], "usage"),
    "--mem too small": (["run", "--mem", "1M"], "vmm: error: --mem must be between"),
    "--mem too big": (["run", "--mem", "5000M"], "vmm: error: --mem must be between"),
    "missing image": (["run", "{d}/nosuch.img"], "vmm: error: image not found: "),
    "unreadable image": (["run", "{d}/adir"], "vmm: error: cannot read image "),
    "not bootable": (["run", "{d}/junk.bin"], "vmm: error: not a bootable image"),
    "empty image": (["run", "{d}/empty.img"], "vmm: error: image {d}/empty.img is empty"),
    "not a disk": (["run", "{d}/junk.bin", "--boot", "disk"], "vmm: error: "),
    "not multiboot": (["run", "hello", "--boot", "multiboot"], "vmm: error: hello: no Multiboot header"),
    "flat does not fit": (["run", "{d}/junk.bin", "--boot", "flat", "--load-addr", "0x10"], "vmm: error: "),
    "bad --boot": (["run", "--boot", "tape"], "usage"),
    "--boot cdrom without a CD": (["run", "--boot", "cdrom"], "vmm: error: --boot cdrom needs a CD-ROM drive"),
    "bad --exit-code": (["run", "--exit-code", "shell"], "usage"),
    "bad --max-instructions": (["run", "--max-instructions", "many"], "usage"),
    "serial file is a directory": (["run", "--serial", "{d}/adir"],
                                   "vmm: error: cannot open serial output file"),
    "missing --input": (["run", "--input", "{d}/nosuch.txt", "--serial", "none"],
                        "vmm: error: cannot read input file"),
}


def check_usage_error(code: int, err: str, expect: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if expect == "usage":
        assert lines[0].startswith("usage: vmm")
        assert re.match(r"^vmm( run)?: error: ", lines[-1]), lines[-1]
    else:
        assert len(lines) == 1, lines
        assert lines[0].startswith(expect), lines[0]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_give_status_2_and_one_line(case, files, capsys):
    argv, expect = BAD[case]
    argv = [a.format(d=files) for a in argv]
    code = main(argv)
    check_usage_error(code, capsys.readouterr().err, expect.format(d=files))


@pytest.mark.parametrize("case", ["unknown flag", "not bootable", "empty image", "unreadable image"])
def test_bad_arguments_in_a_subprocess(case, files):
    argv, expect = BAD[case]
    proc = vmm(*[a.format(d=files) for a in argv])
    check_usage_error(proc.returncode, proc.stderr.decode(), expect.format(d=files))
    assert proc.stdout == b""


def test_negative_max_instructions_is_a_usage_error(capsys):
    code = main(["run", "--max-instructions", "-5", "--serial", "none"])
    check_usage_error(code, capsys.readouterr().err, "usage")


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: vmm" in capsys.readouterr().out


# ---- guests that end badly, and exit codes ---------------------------------------------------

def _flat(code: bytes, path: Path) -> Path:
    path.write_bytes(code)
    return path


def test_triple_fault_in_protected_mode_exits_3(tmp_path, capsys):
    # lidt [0x100009] (limit 0) ; ud2 -> #UD, #GP, #DF all beyond the IDT limit: shutdown
    code = b"\x0f\x01\x1d" + struct.pack("<I", 0x100009) + b"\x0f\x0b" + bytes(6)
    path = _flat(code, tmp_path / "tf.bin")
    assert main(["run", str(path), "--boot", "flat", "--serial", "none"]) == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmm: the guest triple-faulted"), lines


def test_triple_fault_in_a_boot_sector_exits_3(tmp_path):
    sector = bytearray(512)
    code = b"\xfa\x0f\x01\x1e" + struct.pack("<H", 0x7C00 + 16) + b"\x0f\x0b"  # cli; lidt [desc]; ud2
    sector[:len(code)] = code                                                  # desc: limit 0, base 0
    sector[510:] = b"\x55\xaa"
    path = tmp_path / "tf.img"
    path.write_bytes(bytes(sector))
    proc = vmm("run", str(path), "--serial", "none")
    assert proc.returncode == 3
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmm: the guest triple-faulted"), lines


@pytest.mark.parametrize("status", [0, 1, 5, 42, 127])
def test_exit_code_guest_and_qemu(status, tmp_path, capsys):
    # mov dx, 0x501 ; mov al, status ; out dx, al ; hlt
    code = b"\x66\xba\x01\x05\xb0" + bytes([status]) + b"\xee\xf4"
    path = _flat(code, tmp_path / "exit.bin")
    # the guest's v is 16 + v (tools/exitstatus.py), 127 from 111 on; QEMU's (v << 1) | 1 stops at 127
    assert main(["run", str(path), "--boot", "flat", "--serial", "none"]) == (min(16 + status, 127) if status else 0)
    qemu_style = main(["run", str(path), "--boot", "flat", "--serial", "none", "--exit-code", "qemu"])
    assert qemu_style == min((status << 1) | 1, 127)
    assert "Traceback" not in capsys.readouterr().err


def test_halt_with_interrupts_off_exits_0_with_a_message(tmp_path, capsys):
    path = _flat(b"\xfa\xf4", tmp_path / "halt.bin")  # cli ; hlt
    assert main(["run", str(path), "--boot", "flat", "--serial", "none"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "halted" in err[0]


# ---- help ------------------------------------------------------------------------------------

def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text)


EXIT_STATUS_TEXT = ["exit status (run, record, replay", "debug-exit port 0x501", "(v << 1) | 1",
                    "halted for good", "2 usage error", "3 triple fault", "4 CPU core error", "16+v"]


def test_top_level_help_lists_every_command_and_the_exit_statuses():
    proc = vmm("--help")
    assert proc.returncode == 0
    text = _normalise(proc.stdout.decode())
    for name in _subparsers(cli.build_parser()):
        assert f" {name} " in text, name
    for phrase in EXIT_STATUS_TEXT:
        assert _normalise(phrase) in text, phrase


def test_run_help_documents_every_option_and_the_exit_statuses():
    proc = vmm("run", "--help")
    assert proc.returncode == 0
    text = _normalise(proc.stdout.decode())
    run = _subparsers(cli.build_parser())["run"]
    for action in run._actions:
        names = action.option_strings or [action.dest]
        assert action.help and action.help != argparse.SUPPRESS, f"{names} has no help text"
        for name in names:
            assert name in text, name
        assert _normalise(action.help.split("%")[0])[:30] in text, names
    for phrase in EXIT_STATUS_TEXT:
        assert _normalise(phrase) in text, phrase
    for option in ("--mem", "--max-instructions", "--serial", "--boot", "--load-addr", "--cmdline",
                   "--input", "--rtc-epoch", "--exit-code", "--stats", "--trace"):
        assert option in text


def test_trace_disassembles_every_instruction_with_its_icount(capsys):
    """--trace prints each executed instruction (read through the guest's page tables) with its icount."""
    from tools.cli import main

    assert main(["run", "demo", "--serial", "none", "--trace", "--max-instructions", "30000"]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and ln.strip()[0].isdigit()]
    counts = [int(ln.split()[0]) for ln in lines]
    steps = [b - a for a, b in zip(counts, counts[1:])]
    # an instruction that faults is shown but does not retire: the handler's first
    # instruction has the same icount, once per exception exit
    faults = err.count("exit: exception") - err.count("software")
    assert set(steps) <= {0, 1} and steps.count(0) == faults and counts[-1] == 29999
    assert not any(ln.endswith("??") for ln in lines)
    assert any(": mov cr0," in ln for ln in lines)  # the demo switches paging on within these


def test_serial_on_a_tcp_socket(tmp_path):
    """--serial tcp:127.0.0.1:PORT waits for a client, then the guest's COM1 reaches it."""
    import socket
    import threading

    from tools.cli import main

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    got = bytearray()

    def client():
        for _ in range(200):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                import time
                time.sleep(0.05)
        else:
            return
        with s:
            while True:
                try:
                    d = s.recv(4096)
                except OSError:
                    break
                if not d:
                    break
                got.extend(d)

    t = threading.Thread(target=client, daemon=True)
    t.start()
    assert main(["run", "demo", "--serial", f"tcp:127.0.0.1:{port}"]) == 0
    t.join(timeout=10)
    assert b"[demo] all tasks done, exiting with status 0" in bytes(got)
