"""gdb symbols for the bundled guests (issue 15): the build writes an ELF symbol
file next to each image (guests/symbols.py), and real gdb loads it.

* against a live `vmm run`-style target on the demo: `symbol-file
  guests/build/demo.sym`, `break task_a` (the first ring-3 task), `continue`:
  gdb stops in task_a, names $pc with it and disassembles with <label+off>;
* every bundled guest's symbol file loads, and gdb names the guest's entry
  label at the address the guest's code has there (the boot sector's first
  bytes at 0x7C00, the Multiboot kernels' _start at their ELF entry);
* guests/build.py --check covers the symbol files (a rebuild writes the same).
"""
from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from guests.build import BUILD_DIR, GUESTS, guest_path, symbols_path
from guests.symbols import parse_constants, parse_map, relocate
from replay.gdbstub import start_gdbstub_thread
from tests.test_gdb_replay import run_gdb

GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed (apt-get install gdb)")


def gdb_offline(commands: list[str]) -> str:
    args = [GDB, "-nx", "-batch", "-ex", "set architecture i386"]
    for c in commands:
        args += ["-ex", c]
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    return p.stdout + p.stderr


def demo_machine():
    from vmm.firmware.boot import boot
    from vmm.platform.pc import PcConfig, PcMachine

    path = str(guest_path("demo"))
    m = PcMachine(PcConfig())
    with open(path, "rb") as f:
        boot(m, f.read(), name=path, cmdline="demo")
    return m


@needs_gdb
def test_gdb_breaks_on_a_demo_label_and_names_the_code():
    from replay.debugtarget import LiveTarget

    sym = symbols_path(guest_path("demo"))
    stub = start_gdbstub_thread(LiveTarget(demo_machine()))
    try:
        out = run_gdb(stub.port, [f"symbol-file {sym}", "break task_a", "continue", 'printf "PC=%#x\\n", $pc',
                                  "info symbol $pc", "x/2i $pc", "info symbol syscall_dispatch"])
    finally:
        stub.close()
    assert "No symbol table is loaded" not in out, out
    assert re.search(r"Breakpoint 1 at 0x[0-9a-f]+", out), out
    assert "task_a in section .user" in out, out
    assert re.search(r"=> 0x[0-9a-f]+ <task_a>:", out), out
    assert "syscall_dispatch in section .text" in out, out
    # where the CPU runs it: the ring-3 tasks are loaded after .data but mapped at USER_VA
    # (demo.asm says so to the symbol writer), so the breakpoint is hit there
    pc = int(re.search(r"PC=(0x[0-9a-f]+)", out).group(1), 16)
    assert pc == 0x4000_0000


def _entry(name: str, image: bytes) -> int:
    if image[:4] == b"\x7fELF":
        return struct.unpack_from("<I", image, 24)[0]
    if GUESTS[name].output.endswith(".img"):
        return 0x7C00           # a boot sector: the BIOS jumps to its first byte
    # the a.out kludge of the Multiboot header: entry_addr is its last field
    magic = image.find(struct.pack("<I", 0x1BADB002))
    return struct.unpack_from("<I", image, magic + 28)[0]


@needs_gdb
@pytest.mark.parametrize("name", sorted(GUESTS))
def test_every_bundled_guest_has_symbols_gdb_loads(name):
    image_path = guest_path(name)
    sym = symbols_path(image_path)
    assert sym.is_file(), f"{sym} missing: python guests/build.py"
    entry = _entry(name, image_path.read_bytes())
    out = gdb_offline([f"symbol-file {sym}", f"info symbol {entry:#x}"])
    assert "No symbol matches" not in out and "not in executable format" not in out, out
    assert re.search(r"^\w+ in section \.text$", out, re.M), out


def test_the_symbol_map_parser_keeps_section_labels_and_drops_constants():
    text = """
-- Symbols --------------------------------------------------------------------

---- No Section ---------------------------------------------------------------

Value     Name
000003F8  COM1

---- Section .text ------------------------------------------------------------

Real              Virtual           Name
          100000            100000  _start
          100010            100010  _start.loop

---- Section .bss -------------------------------------------------------------

Real              Virtual           Name
          103000            103000  stack
"""
    assert parse_map(text) == {".text": [(0x100000, "_start"), (0x100010, "_start.loop")],
                               ".bss": [(0x103000, "stack")]}
    assert parse_constants(text) == {"COM1": 0x3F8}
    moved = relocate(parse_map(text), "; gdb symbols: section .text runs at 0x40000000\n", {})
    assert moved[".text"] == [(0x40000000, "_start"), (0x40000010, "_start.loop")]
    with pytest.raises(ValueError):
        relocate(parse_map(text), "; gdb symbols: section .text runs at NOWHERE\n", {})


def test_the_committed_symbol_files_match_a_fresh_build():
    if shutil.which("nasm") is None:
        pytest.skip("nasm is not installed (apt-get install nasm)")
    from guests.build import check

    assert check(BUILD_DIR) == []


@needs_gdb
def test_vmm_run_demo_gdb_names_the_symbol_file_and_gdb_loads_it():
    """`vmm run demo --gdb`: the waiting message says which symbol file to load; gdb loads
    it, breaks on task_a, and the guest runs to its end once gdb has gone."""
    import os
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "run", "demo", "--serial", "none",
                             "--gdb", "127.0.0.1:0"], cwd=root, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = sym = None
        while port is None or sym is None:
            line = proc.stderr.readline()
            assert line, "vmm ended before naming the gdb port and the symbol file"
            if m := re.search(r"target remote [\d.]+:(\d+)", line):
                port = int(m.group(1))
            if m := re.search(r"symbol-file (\S+)", line):
                sym = m.group(1)
        assert Path(sym) == symbols_path(guest_path("demo")).resolve()
        out = run_gdb(port, [f"symbol-file {sym}", "break task_a", "continue", "info symbol $pc"])
        assert "task_a in section .user" in out, out
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()
