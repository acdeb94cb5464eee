"""`vmm log show LOG` prints how many instructions each vCPU retired (issue 11).

A 2-vCPU guest (tests/ft_guest.py: the BSP starts the AP through the LAPIC
and prints the AP's counter on every line) is recorded with `vmm record
--smp 2`; `vmm log show` must name both vCPUs with counts that add up to
the recording's last icount and equal what `vmm replay` reports for the
same log.  A one-vCPU log shows its one count, the whole run.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ft_guest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not ft_guest.have_nasm(), reason="nasm builds the SMP test guest")

PER_VCPU = re.compile(r"^  vCPU (\d+) +([\d,]+) instructions", re.MULTILINE)


def vmm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300, check=False)


def record(tmp_path: Path, smp: int) -> Path:
    guest = ft_guest.build(lines=30, smp=smp > 1, delay=2000)
    log = tmp_path / f"smp{smp}.vmlog"
    r = vmm("record", str(guest), "--boot", "flat", "--smp", str(smp), "--serial", str(tmp_path / "out"),
            "-o", str(log))
    assert r.returncode == 0, r.stderr
    return log


def shown(log: Path) -> tuple[dict[int, int], int]:
    r = vmm("log", "show", str(log))
    assert r.returncode == 0, r.stderr
    end = re.search(r"^  end +icount (\d+),", r.stdout, re.MULTILINE)
    assert end, r.stdout
    return {int(v): int(n.replace(",", "")) for v, n in PER_VCPU.findall(r.stdout)}, int(end.group(1))


def test_log_show_counts_each_vcpu_as_the_replay_does(tmp_path):
    log = record(tmp_path, 2)
    counts, total = shown(log)
    assert sorted(counts) == [0, 1]
    assert sum(counts.values()) == total
    assert min(counts.values()) > 0          # the AP ran: its counter is on every line
    rp = vmm("replay", str(log), "--serial", str(tmp_path / "replayed"))
    assert rp.returncode == 0, rp.stderr
    line = re.search(r"instructions per vCPU: (.*)", rp.stderr)
    assert line, rp.stderr
    replayed = {int(v): int(n.replace(",", "")) for v, n in re.findall(r"vCPU (\d+): ([\d,]+)", line.group(1))}
    assert replayed == counts


def test_log_show_one_vcpu_has_the_whole_run(tmp_path):
    counts, total = shown(record(tmp_path, 1))
    assert counts == {0: total}


def test_log_show_help_says_it():
    r = vmm("log", "show", "--help")
    assert r.returncode == 0
    assert "per vCPU" in " ".join(r.stdout.split())
