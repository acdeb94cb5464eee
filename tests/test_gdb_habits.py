"""Real gdb (13) against vmm, as a user drives it (issue 15):

* watchpoints on a live run (`vmm run --gdb`): gdb inserts them (no "Could not
  insert hardware watchpoint") and stops right after the store, at the same
  instruction and icount as a replay of the same run stops with the same
  watchpoint;
* the shipped gdb script (tools/vmm.gdb): `vmm-seek N` lands on icount N and
  gdb shows the registers there; with the script sourced a bare `monitor seek`
  refreshes gdb too (without it gdb shows the registers it cached before);
  `vmm-icount` says where the machine is.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from guests.build import guest_path
from replay.gdbstub import start_gdbstub_thread
from tests.test_gdb_replay import run_gdb as gdb_batch

ROOT = Path(__file__).resolve().parents[1]
GDB = shutil.which("gdb")
SCRIPT = ROOT / "tools" / "vmm.gdb"
EPOCH = 1767225600          # the boot time at which crash.asm loses its race (README)
WATCHED = 0x200004          # the `next` field the worker and the ISR both store to

needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb not installed (apt-get install gdb)")


def run_gdb(port: int, commands: list[str]) -> str:
    return gdb_batch(port, [f"source {SCRIPT}", *commands])


def pcs(out: str) -> list[int]:
    return [int(x, 16) for x in re.findall(r"PC=(0x[0-9a-f]+)", out)]


def icounts(out: str) -> list[int]:
    return [int(x) for x in re.findall(r"(?:^|\n)(?:icount|at icount) (\d+)", out)]


def crash_machine():
    from vmm.firmware.boot import boot
    from vmm.platform.pc import PcConfig, PcMachine

    path = str(guest_path("crash"))
    m = PcMachine(PcConfig(start_epoch=EPOCH))
    with open(path, "rb") as f:
        boot(m, f.read(), name=path, cmdline="crash")
    return m


def record_crash(tmp_path) -> Path:
    log = tmp_path / "crash.vmlog"
    proc = subprocess.run([sys.executable, "-m", "tools.cli", "record", "crash", "--rtc-epoch", str(EPOCH),
                           "--serial", "none", "-o", str(log)], cwd=ROOT, capture_output=True, timeout=120,
                          stdin=subprocess.DEVNULL, check=False)
    assert log.exists(), proc.stderr.decode()
    return log


@needs_gdb
def test_live_watchpoint_stops_after_the_store_like_a_replay(tmp_path):
    from replay.debugtarget import LiveTarget
    from replay.target import WATCH_WRITE
    from replay.timetravel import TimeTravel

    target = LiveTarget(crash_machine())
    stub = start_gdbstub_thread(target)
    try:
        out = run_gdb(stub.port, [f"watch *(int*){WATCHED:#x}", "continue", 'printf "PC=%#x\\n", $pc',
                                  "monitor icount", "continue", 'printf "PC=%#x\\n", $pc', "monitor icount"])
    finally:
        stub.close()
    assert "Could not insert" not in out, out
    assert out.count("Hardware watchpoint 1: *(int*)0x200004") >= 2, out
    assert "Old value = 0" in out and "New value = " in out, out
    live_pcs, live_icounts = pcs(out), icounts(out)
    assert len(live_pcs) == 2 and len(live_icounts) == 2, out

    # the same run, recorded and replayed with the same watchpoint: the same two stops
    tt = TimeTravel(str(record_crash(tmp_path)))
    tt.add_watchpoint(WATCH_WRITE, WATCHED, 4)
    want = []
    for _ in range(2):
        s = tt.cont()
        assert s.reason == "watchpoint"
        want.append((tt.m.vcpu.rip, tt.icount))
    assert list(zip(live_pcs, live_icounts)) == want


@needs_gdb
def test_live_watchpoint_removed_lets_the_guest_run_to_its_end():
    from replay.debugtarget import LiveTarget

    target = LiveTarget(crash_machine())
    stub = start_gdbstub_thread(target)
    try:
        out = run_gdb(stub.port, [f"watch *(int*){WATCHED:#x}", "continue", "delete", "continue"])
    finally:
        stub.close()
    assert "Hardware watchpoint 1" in out, out
    assert "exited with code 01" in out, out          # the crash guest's status when it loses the race
    assert target._stop_hook is None and not target.watchpoints


@needs_gdb
def test_the_gdb_script_seeks_and_refreshes(tmp_path):
    from replay.debugtarget import ReplayTarget
    from replay.timetravel import TimeTravel

    log = record_crash(tmp_path)
    tt = TimeTravel(str(log))
    # the state at two points, from the replay itself
    tt.seek(5000)
    pc_5000 = tt.m.vcpu.rip
    tt.seek(1_000_000)
    pc_1m = tt.m.vcpu.rip
    assert pc_5000 != pc_1m
    tt.seek(0)
    stub = start_gdbstub_thread(ReplayTarget(tt))
    try:
        out = run_gdb(stub.port, [
            "vmm-seek 1000000", 'printf "PC=%#x\\n", $pc', "vmm-icount",
            "monitor seek 5000", 'printf "PC=%#x\\n", $pc',          # the script's hook refreshes
            "vmm-refresh", 'printf "PC=%#x\\n", $pc',
            "vmm-seek", "vmm-checkpoints"])
        # without the script, gdb keeps showing the registers it cached before the seek
        bare = gdb_batch(stub.port, ["monitor seek 1000000", 'printf "PC=%#x\\n", $pc',
                                     "monitor seek 5000", 'printf "PC=%#x\\n", $pc'])
    finally:
        stub.close()
    assert pcs(bare) == [pc_5000, pc_5000], bare
    got = pcs(out)
    assert got == [pc_1m, pc_5000, pc_5000], out
    assert "icount 1000000 of " in out, out
    assert "usage: vmm-seek ICOUNT" in out, out
    assert "checkpoints, " in out, out


def test_the_gdb_script_is_shipped_with_the_package():
    """The package's data files (vmm_packaging.py, used by setup.py) include tools/vmm.gdb."""
    from fnmatch import fnmatch

    sys.path.insert(0, str(ROOT))
    from vmm_packaging import DATA

    assert any(fnmatch("vmm.gdb", p) for p in DATA.get("tools", [])), DATA
    assert SCRIPT.is_file()
