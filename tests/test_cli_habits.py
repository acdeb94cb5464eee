"""The `vmm` command line as people used to QEMU meet it (issue 15).

* QEMU's spellings (-m, -smp, -kernel, -initrd, -append, -serial, -s, -S,
  -nographic, -no-reboot) are accepted beside the long options and mean the
  same; `vmm run --help` and the README carry one table of them against QEMU's.
* `vmm --version`; a bad option prints the subcommand's usage.
* A bundled guest is found by bare name only: a path that does not exist is
  an error (one line, exit 2), never a silent boot of the bundled guest.
* Console input from a pipe and from `--input -`; typed input goes to COM1
  with -serial stdio / -nographic (QEMU's rule), else where the boot kind
  says (the keyboard for boot sectors); --input-to chooses.  Piped input is
  recorded through the boundary: the replay, with no stdin, ends the same.
* --trace prints an invalid opcode and goes on (no hang); --stats counts
  port I/O.
"""
from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tools import cli

ROOT = Path(__file__).resolve().parents[1]


def vmm(*args: str, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                          timeout=timeout, check=False)


def status(v: int) -> int:
    """The process status of a guest that writes v to the debug-exit port."""
    try:
        from tools.exitstatus import guest_status
    except ImportError:
        return v
    return guest_status(v)


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


# ---- guests --------------------------------------------------------------------------------

# mov dx, 0x3fd ; poll: in al, dx ; test al, 1 ; jz poll ; mov dx, 0x3f8 ; in al, dx
# mov dx, 0x501 ; out dx, al ; hlt  -- exits with the first byte COM1 receives
COM1_POLL_16 = b"\xba\xfd\x03\xec\xa8\x01\x74\xfb\xba\xf8\x03\xec\xba\x01\x05\xee\xf4"
COM1_POLL_32 = (b"\x66\xba\xfd\x03\xec\xa8\x01\x74\xfb\x66\xba\xf8\x03\xec\x66\xba\x01\x05\xee\xf4")
# xor ah, ah ; int 16h ; mov dx, 0x501 ; out dx, al ; hlt -- exits with the first key's ASCII
KBD_READ_16 = b"\x30\xe4\xcd\x16\xba\x01\x05\xee\xf4"


def boot_sector(code: bytes, path: Path) -> Path:
    s = bytearray(512)
    s[:len(code)] = code
    s[510:] = b"\x55\xaa"
    path.write_bytes(bytes(s))
    return path


@pytest.fixture
def com1_disk(tmp_path):
    return boot_sector(COM1_POLL_16, tmp_path / "com1.img")


@pytest.fixture
def kbd_disk(tmp_path):
    return boot_sector(KBD_READ_16, tmp_path / "kbd.img")


@pytest.fixture
def com1_flat(tmp_path):
    p = tmp_path / "k.bin"
    p.write_bytes(COM1_POLL_32 + bytes(8))
    return p


LIMIT = ["--max-instructions", "3000000"]   # a guest that never gets its byte stops here (exit 0)


# ---- QEMU's spellings ------------------------------------------------------------------------

QEMU_FORMS = [
    (["-m", "64"], {"mem": 64 << 20}),
    (["-m", "128M"], {"mem": 128 << 20}),
    (["-smp", "2"], {"smp": 2}),
    (["-kernel", "bz"], {"kernel": "bz"}),
    (["-initrd", "rd"], {"initrd": "rd"}),
    (["-append", "console=ttyS0"], {"cmdline": "console=ttyS0"}),
    (["-serial", "none"], {"serial": "none"}),
]


@pytest.mark.parametrize("argv,want", QEMU_FORMS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_qemu_spellings_mean_the_long_options(argv, want):
    for cmd in ("run", "record"):
        extra = ["-o", "x.vmlog"] if cmd == "record" else []
        args = parse(cmd, *argv, *extra)
        for k, v in want.items():
            assert getattr(args, k) == v, (cmd, k)


def test_dash_s_is_gdb_on_1234_and_dash_S_waits():
    from tools import cli_habits

    args = cli_habits.apply(parse("run", "-s"))
    assert args.gdb == "127.0.0.1:1234" and not args.gdb_wait
    args = cli_habits.apply(parse("run", "-s", "-S"))
    assert args.gdb == "127.0.0.1:1234" and args.gdb_wait
    args = cli_habits.apply(parse("run", "--gdb", ":4321"))
    assert args.gdb == ":4321" and args.gdb_wait       # --gdb has always waited for gdb
    args = cli_habits.apply(parse("run", "-gdb", "tcp::4321"))
    assert args.gdb == ":4321" and not args.gdb_wait   # QEMU's -gdb: -s with another port
    args = cli_habits.apply(parse("run", "-gdb", "tcp::4321", "-S"))
    assert args.gdb == ":4321" and args.gdb_wait


@pytest.mark.parametrize("argv,msg", [(["-S"], "-S waits for gdb"), (["-gdb", "udp::1"], "-gdb wants tcp:")])
def test_gdb_spellings_that_make_no_sense_are_usage_errors(argv, msg):
    proc = vmm("run", *argv)
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmm run: error: ") and msg in lines[0], lines


def test_nographic_puts_com1_on_stdio_and_input_on_it():
    from tools import cli_habits

    args = cli_habits.apply(parse("run", "-nographic"))
    assert args.serial == "stdio" and args.input_to == "serial"
    args = cli_habits.apply(parse("run"))
    assert args.serial == "stdio" and args.input_to is None        # the boot kind decides
    args = cli_habits.apply(parse("run", "-serial", "mon:stdio"))
    assert args.serial == "stdio" and args.input_to == "serial"


def test_no_reboot_is_accepted_and_a_reset_ends_the_run(tmp_path):
    # out 0x64, 0xFE: pulse the reset line through the 8042
    path = tmp_path / "reset.bin"
    path.write_bytes(b"\xb0\xfe\xe6\x64\xf4" + bytes(8))
    proc = vmm("run", str(path), "--boot", "flat", "-serial", "none", "-no-reboot")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "system reset" in proc.stderr.decode()


def test_qemu_spellings_boot_the_demo():
    proc = vmm("run", "demo", "-m", "64", "-serial", "stdio", "-append", "hi there")
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert '[demo] command line: "hi there"' in out
    assert "upper 64512 KiB" in out                    # 64 MiB of RAM reached the guest


def test_the_table_against_qemu_is_in_help_and_readme():
    from tools.cli_habits import QEMU_TABLE

    proc = vmm("run", "--help")
    assert proc.returncode == 0
    help_text = re.sub(r"\s+", " ", proc.stdout.decode())
    readme = (ROOT / "README.md").read_text()
    for qemu, ours, _meaning in QEMU_TABLE:
        assert qemu in help_text, qemu
        row = next((ln for ln in readme.splitlines() if ln.startswith(f"| `{qemu}`")), None)
        assert row is not None, f"README has no row for {qemu}"
        assert ours.split()[0] in row, (qemu, row)
    names = {q.split()[0] for q, _, _ in QEMU_TABLE}
    assert {"-m", "-smp", "-kernel", "-initrd", "-append", "-hda", "-cdrom", "-drive", "-serial", "-s",
            "-S", "-nographic", "-no-reboot"} <= names


def test_version():
    from replay.session import VMM_VERSION

    proc = vmm("--version")
    assert proc.returncode == 0
    assert proc.stdout.decode().strip() == f"vmm {VMM_VERSION}"


@pytest.mark.parametrize("argv,usage", [
    (["run", "--frobnicate"], "usage: vmm run"),
    (["record", "-o", "x.vmlog", "--frobnicate"], "usage: vmm record"),
    (["replay", "x.vmlog", "--frobnicate"], "usage: vmm replay"),
    (["log", "show", "x.vmlog", "--frobnicate"], "usage: vmm log show"),
])
def test_a_bad_option_prints_the_subcommands_usage(argv, usage):
    proc = vmm(*argv)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert err.startswith(usage), err
    assert "unrecognized arguments: --frobnicate" in err.splitlines()[-1]
    assert "Traceback" not in err


# ---- image resolution ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["/nonexistent/hello.img", "./demo.qcow2", "nosuch/demo", "hello.img",
                                  "demo.elf"])
def test_a_missing_path_is_an_error_not_a_bundled_guest(name, tmp_path):
    proc = vmm("run", name, "--serial", "none")
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vmm: error: image not found: {name}"), lines
    assert proc.stdout == b""


def test_a_bare_bundled_name_still_boots_it():
    proc = vmm("run", "hello")
    assert proc.returncode == 0
    assert b"hello" in proc.stdout.lower()


# ---- console input ---------------------------------------------------------------------------

def test_piped_stdin_reaches_a_kernel_on_com1(com1_flat):
    proc = vmm("run", str(com1_flat), "--boot", "flat", *LIMIT, stdin=b"1")
    assert proc.returncode == status(ord("1")), proc.stderr.decode()


def test_input_dash_reads_stdin(com1_flat):
    proc = vmm("run", str(com1_flat), "--boot", "flat", "--serial", "none", "--input", "-", *LIMIT,
               stdin=b"2")
    assert proc.returncode == status(ord("2")), proc.stderr.decode()


def test_serial_stdio_feeds_com1_of_a_boot_sector(com1_disk):
    """QEMU's rule: with -serial stdio (or -nographic) the console's input is COM1's."""
    for flags in (["-serial", "stdio"], ["-nographic"], ["--serial", "stdio"]):
        proc = vmm("run", str(com1_disk), *flags, *LIMIT, stdin=b"3")
        assert proc.returncode == status(ord("3")), (flags, proc.stderr.decode())


def test_a_boot_sector_gets_keys_by_default_and_not_com1(com1_disk, kbd_disk):
    assert vmm("run", str(kbd_disk), *LIMIT, stdin=b"4").returncode == status(ord("4"))
    assert vmm("run", str(com1_disk), *LIMIT, stdin=b"4").returncode == 0   # COM1 never got it


def test_input_to_chooses(com1_disk, kbd_disk, com1_flat):
    assert vmm("run", str(com1_disk), "--input-to", "serial", *LIMIT, stdin=b"5").returncode == status(ord("5"))
    assert vmm("run", str(kbd_disk), "-serial", "stdio", "--input-to", "keyboard", *LIMIT,
               stdin=b"6").returncode == status(ord("6"))
    assert vmm("run", str(com1_flat), "--boot", "flat", "--input-to", "keyboard", *LIMIT,
               stdin=b"1").returncode == 0


def test_piped_input_is_recorded_and_replays_without_stdin(com1_disk, tmp_path):
    log = tmp_path / "in.vmlog"
    rec = vmm("record", str(com1_disk), "-serial", "stdio", "-o", str(log), *LIMIT, stdin=b"7")
    assert rec.returncode == status(ord("7")), rec.stderr.decode()
    rp = vmm("replay", str(log))
    assert rp.returncode == status(ord("7")), rp.stderr.decode()
    assert "every digest matched" in rp.stderr.decode()


# ---- trace and stats ---------------------------------------------------------------------------

def test_trace_shows_an_invalid_opcode_and_goes_on(tmp_path):
    # ud2 in a boot sector: the BIOS's #UD handler returns to it, forever; --trace must keep printing
    disk = boot_sector(b"\x0f\x0b\xf4", tmp_path / "ud.img")
    proc = vmm("run", str(disk), "--serial", "none", "--trace", "--max-instructions", "200", timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    err = proc.stderr.decode()
    ud = [ln for ln in err.splitlines() if "0x00007c00:" in ln]
    assert len(ud) >= 2 and all(ln.rstrip().endswith("ud2") for ln in ud), ud[:3]
    assert "stopped after 200 instructions" in err


def test_stats_count_port_io(tmp_path):
    # 1000 x (out 0x80, al) then exit through 0x501
    code = b"\xb9" + struct.pack("<I", 1000) + b"\xe6\x80\xe2\xfc" + b"\x66\xba\x01\x05\xb0\x00\xee\xf4"
    path = tmp_path / "io.bin"
    path.write_bytes(code + bytes(8))
    proc = vmm("run", str(path), "--boot", "flat", "--serial", "none", "--stats")
    assert proc.returncode == 0
    m = re.search(r"port I/O (\d+)", proc.stderr.decode())
    assert m, proc.stderr.decode()
    assert int(m.group(1)) == 1001


# ---- make demo --------------------------------------------------------------------------------

def test_make_demo_install_step_prints_no_setuptools_warnings(tmp_path):
    """`make demo`'s editable install (Makefile's pip line) prints nothing: no setuptools warnings.

    Done on a copy of the tree (an editable install builds the C fast path in place), into a
    venv that borrows this one's packages; pip --isolated ignores this machine's pip config."""
    import shutil
    import venv

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "tests",
                                                              "benchmarks", "__pycache__", "*.so"))
    shutil.copytree(ROOT / "guests" / "build", src / "guests" / "build", dirs_exist_ok=True)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    import sysconfig
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "--isolated", "install", "-q",
                           "--no-build-isolation", "--no-deps", "-e", ".[test]"],
                          cwd=src, capture_output=True, timeout=600, check=False)
    text = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, text[-3000:]
    assert text.strip() == "", text[-3000:]


def test_gdb_with_the_console_on_a_socket(com1_flat):
    """--serial tcp: and --gdb together: the socket client types, gdb runs the guest."""
    import socket

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "run", str(com1_flat), "--boot", "flat",
                             "--serial", "tcp:127.0.0.1:0", "--gdb", "127.0.0.1:0"], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stderr.readline().decode()
        com1 = socket.create_connection(("127.0.0.1", int(re.search(r"tcp [\d.]+:(\d+)", line).group(1))))
        line = proc.stderr.readline().decode()
        gdb = socket.create_connection(("127.0.0.1", int(re.search(r"remote [\d.]+:(\d+)", line).group(1))))
        gdb.sendall(b"$c#63")
        com1.sendall(b"8")
        gdb.settimeout(30)
        reply = b""
        while b"#" not in reply.lstrip(b"+")[1:]:
            chunk = gdb.recv(100)
            assert chunk, reply
            reply += chunk
        assert reply.lstrip(b"+").startswith(b"$W"), reply
        gdb.close()                           # as gdb does after the inferior exited
        com1.close()
        assert proc.wait(30) == status(ord("8"))
        assert b"Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


class _Tty:
    """A stream that says it is a terminal, and keeps what was written."""

    def __init__(self):
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("trace", [False, True])
def test_progress_stays_out_of_a_trace(trace, monkeypatch):
    """--trace's lines on stderr are its progress: no progress line is drawn among them."""
    from tools.cli_habits import Progress
    from vmm.firmware.boot import boot
    from vmm.platform.pc import PcMachine

    monkeypatch.setenv("VMM_PROGRESS_INTERVAL", "0")
    m = PcMachine()
    boot(m, b"\xeb\xfe" + bytes(14), "flat", name="spin.bin")       # jmp $
    if trace:
        m.trace = lambda exit_: None
    err = _Tty()
    Progress(m, "running", 5_000_000, stream=err)
    m.run(5_000_000)
    if trace:
        assert err.text == ""
    else:
        assert "vmm: running 1,000,000 of 5,000,000 instructions (20.0%)" in err.text, err.text[:300]
        assert err.text.endswith("\r\x1b[K")                        # erased when the run returned
