"""Real gdb against a replay: the crash walkthrough of the README, run in batch mode.

The crash guest loses a race on some boots (it depends on the RTC at boot):
a timer interrupt retires a buffer between the worker's load of the shared
pointer and its store through it, and the next tick dereferences the cleared
pointer.  gdb runs to the crash, watches the retired buffer's `next` field and
reverse-continues: it must land on the worker's racy store.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from guests.build import guest_path
from replay.debugtarget import ReplayTarget
from replay.gdbstub import start_gdbstub_thread
from replay.session import record
from replay.timetravel import TimeTravel

CRASHING_EPOCH = 1_767_225_600   # 2026-01-01 00:00:00: this boot loses the race
SURVIVING_EPOCH = 1_767_226_000
PF_HANDLER = 0x1000FF            # crash.asm pf_isr
RACY_STORE = 0x1000A9            # crash.asm worker: mov dword [esi + 4], 0
RETIRE_STORE = 0x1000E7          # crash.asm timer_isr: mov dword [eax + 4], stats_block
RETIRED_PTR = 0x100384           # crash.asm bss: retired

GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed (apt-get install gdb)")


def record_crash(tmp_path, epoch):
    path = str(guest_path("crash"))
    log = str(tmp_path / f"crash-{epoch}.vmlog")
    res, _ = record(path, open(path, "rb").read(), log, epoch=epoch)
    return log, res


def test_the_crash_depends_on_the_boot_time(tmp_path):
    _, crashed = record_crash(tmp_path, CRASHING_EPOCH)
    _, survived = record_crash(tmp_path, SURVIVING_EPOCH)
    assert crashed.reason.value == "exit" and crashed.status == 1
    assert survived.reason.value == "exit" and survived.status == 0


def run_gdb(port: int, commands: list[str]) -> str:
    args = [GDB, "-nx", "-batch", "-ex", "set architecture i386", "-ex", "set pagination off",
            "-ex", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        args += ["-ex", c]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    return p.stdout + p.stderr


def pcs(out: str) -> list[int]:
    return [int(x, 16) for x in re.findall(r"PC=(0x[0-9a-f]+|0)\b", out)]


@needs_gdb
def test_reverse_continue_lands_on_the_racy_store(tmp_path):
    log, res = record_crash(tmp_path, CRASHING_EPOCH)
    assert res.status == 1
    tt = TimeTravel(log, interval=1_000_000)
    stub = start_gdbstub_thread(ReplayTarget(tt))
    try:
        out = run_gdb(stub.port, [
            f"break *{PF_HANDLER:#x}",
            "continue",
            'printf "PC=%#x\\n", $pc',
            # the retired buffer's next pointer, which the ISR just dereferenced
            f"python gdb.execute('watch *(int*)%d' % (int(gdb.parse_and_eval('*(int*){RETIRED_PTR:#x}')) + 4))",
            "reverse-continue",
            'printf "PC=%#x\\n", $pc',
            "monitor icount",
            "reverse-continue",
            'printf "PC=%#x\\n", $pc',
            "stepi",
            'printf "PC=%#x\\n", $pc',
            "reverse-stepi",
            'printf "PC=%#x\\n", $pc',
        ])
    finally:
        stub.close()
    got = pcs(out)
    assert got[:2] == [PF_HANDLER, RACY_STORE], out
    assert got[2] == RETIRE_STORE, out       # before that: the ISR retiring the buffer
    assert got[4] == got[2], out             # stepi then reverse-stepi comes back exactly
    assert "icount" in out


@needs_gdb
def test_gdb_registers_and_memory_match_the_replay(tmp_path):
    log, _ = record_crash(tmp_path, CRASHING_EPOCH)
    tt = TimeTravel(log, interval=1_000_000)
    target = ReplayTarget(tt)
    tt.seek(200_000)
    regs = target.read_registers()
    stub = start_gdbstub_thread(target)
    try:
        out = run_gdb(stub.port, ['printf "EAX=%#x ESP=%#x PC=%#x\\n", $eax, $esp, $pc',
                                  "x/4xb 0x100000", "x/xw 0", "monitor icount"])
    finally:
        stub.close()
    m = re.search(r"EAX=(0x[0-9a-f]+|0) ESP=(0x[0-9a-f]+|0) PC=(0x[0-9a-f]+|0)", out)
    assert m, out
    assert int(m.group(1), 16) == regs["eax"] and int(m.group(2), 16) == regs["esp"]
    assert int(m.group(3), 16) == regs["eip"]
    assert "0x02\t0xb0\t0xad\t0x1b" in out.replace("  ", "\t")  # the Multiboot magic, little-endian
    assert "Cannot access memory at address 0x0" in out          # page 0 is unmapped: E14, the stub goes on
    assert "icount 200000" in out
