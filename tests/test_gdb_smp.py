"""Real gdb on a 2-vCPU recording (issue 11): the vCPUs are threads, and
reverse execution crosses from one vCPU to the other.

The race guest: two vCPUs increment one counter without a lock, taking turns
of 97 instructions.  gdb starts just before vCPU 1 stores the counter for the
first time in one of its turns, so the last store before that point was made
by vCPU 0.  With thread 2 (vCPU 1) selected, `reverse-continue` on a `watch`
of the counter must stop on vCPU 0's store and switch to thread 1; a
`reverse-stepi` of thread 2 from there goes back to vCPU 1's previous
instruction, thread 1 then as it was at that moment.  Every expected value
comes from a brute-force walk of the recording (tests/test_smp_debug.py).
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from replay.debugtarget import ReplayTarget
from replay.gdbstub import start_gdbstub_thread
from replay.timetravel import TimeTravel
from tests.machine_helpers import SHARED, race_image
from tests.test_smp_debug import record_flat, walk

GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed (apt-get install gdb)")


def run_gdb(port: int, commands: list[str]) -> str:
    args = [GDB, "-nx", "-batch", "-ex", "set architecture i386", "-ex", "set pagination off",
            "-ex", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        args += ["-ex", c]
    p = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    return p.stdout + p.stderr


def thread_pcs(out: str) -> list[dict[int, int]]:
    """The `thread apply all` PC lines, grouped per command."""
    groups = []
    for block in out.split("----\n")[1:]:
        groups.append({int(t): int(pc, 16) for t, pc in re.findall(r"^T(\d) PC=(0x[0-9a-f]+)", block, re.MULTILINE)})
    return groups


ALL_PCS = ['printf "----\\n"', 'thread apply all printf "T%d PC=%#x\\n", $_thread, $pc']


@needs_gdb
def test_gdb_threads_and_reverse_continue_to_the_other_vcpus_store(tmp_path):
    w = walk(record_flat(tmp_path, "race", race_image(400, 300)))
    stores = w.stores()
    # vCPU 1 is about to make its first store of a turn; the store before was vCPU 0's
    here = next(q for i, q in enumerate(stores)
                if w.who(q) == 1 and w.who(stores[i - 1]) == 0 and w.counts[stores[i - 1]][1] > 0)
    p = max(q for q in stores if q < here)
    back = max(r for r in range(p) if w.who(r) == 1)        # vCPU 1's last instruction before p
    tt = TimeTravel(w.log, interval=1500)
    tt.seek(here)
    stub = start_gdbstub_thread(ReplayTarget(tt))
    try:
        out = run_gdb(stub.port, [
            "info threads",
            "thread 2",
            f"watch *(int*){SHARED:#x}",
            "reverse-continue",
            "info threads",
            "monitor icount",
            *ALL_PCS,
            "thread 2",
            "reverse-stepi",
            *ALL_PCS,
            "monitor icount",
        ])
    finally:
        stub.close()
    threads = re.findall(r"^\*?\s+(\d)\s+Thread (\d) \(vCPU (\d), (\w[\w-]*)\)", out, re.MULTILINE)
    assert [t[:3] for t in threads[:2]] == [("1", "1", "0"), ("2", "2", "1")], out
    assert "[Switching to thread 2 (Thread 2)]" in out, out
    # the stop names the thread that made the store, and gdb switched to it
    assert re.search(r"\[Switching to Thread 1\]\s+Thread 1 hit Hardware watchpoint 1", out), out
    assert re.search(r"^\*\s+1\s+Thread 1 \(vCPU 0", out, re.MULTILINE), out
    assert f"icount {p} of {w.end}" in out, out
    assert f"vCPU 0: {w.counts[p][0]} instructions" in out and f"vCPU 1: {w.counts[p][1]} instructions" in out
    at_store, after_back = thread_pcs(out)
    assert at_store == {1: w.pcs[p][0], 2: w.pcs[p][1]}, out          # thread 1 on its store
    # reverse-stepi of thread 2: vCPU 1's previous instruction, vCPU 0 as it was then
    assert after_back == {1: w.pcs[back][0], 2: w.pcs[back][1]}, out
    assert f"icount {back} of {w.end}" in out, out
