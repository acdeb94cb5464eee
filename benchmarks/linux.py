#!/usr/bin/env python3
"""Debian's Linux booted to the end of /init, side by side with QEMU TCG in the same run.

    python benchmarks/linux.py [--runs N] [--smp 1,2] [--no-qemu] [--no-record] [--profile]

The guest: Debian's kernel (linux-image-amd64) with a busybox initramfs whose
/init prints a marker and powers off (`poweroff -f`), so a run ends by itself;
both fetched from Debian's archive at run time (tools/debian.py).

Figures, each the best of N runs (default 1: a boot is ~15 s here):

* vmm run: `python -m tools.cli run --kernel K --initrd I --mem 256M`, wall
  time to exit (the guest powers off through ACPI), with the instruction
  count and MIPS vmm reports;
* vmm record / replay: the same boot recorded (`vmm record`) and replayed;
  the record overhead is record / run;
* QEMU TCG: `qemu-system-x86_64 -accel tcg -kernel K -initrd I -m 256
  -no-reboot -nographic` (`-smp N` too), wall time to exit.

The issue aims at vmm <= 2.0x QEMU's wall time for the boot, and a record
overhead <= 1.15.  --smp 1,2 also shows instructions per vCPU (from `vmm
replay`'s per-vCPU counts) and the 2-vCPU boot against the 1-vCPU one.
--profile runs one in-process boot under cProfile and prints where the time
goes.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo VMM-BENCH-INIT
poweroff -f
"""
APPEND = "console=ttyS0 panic=-1"


def timed(cmd: list[str], timeout: float = 900) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0, p


def vmm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tools.cli", *args]


def best(n: int, fn):
    results = [fn() for _ in range(n)]
    return min(results, key=lambda r: r[0])


def mips(stderr: str) -> tuple[int, float]:
    m = re.search(r"([\d,]+) instructions .*?\(([\d.]+) MIPS\)", stderr)
    return (int(m.group(1).replace(",", "")), float(m.group(2))) if m else (0, 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--smp", default="1", help="comma-separated vCPU counts (default 1)")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    from tools import debian

    try:
        kernel = debian.kernel()
        initrd = debian.initramfs(INIT)
    except debian.DebianUnavailable as e:
        print(f"skipped: Debian packages unavailable ({e})")
        return 0
    print(f"kernel {kernel.name}, initramfs {initrd.stat().st_size:,} bytes, {args.runs} run(s) each, best shown")
    qemu = shutil.which("qemu-system-x86_64")
    base = ["--kernel", str(kernel), "--initrd", str(initrd), "--append", APPEND, "--mem", "256M", "--serial", "none"]
    rows = []
    for n in [int(x) for x in args.smp.split(",")]:
        smp = ["--smp", str(n)]
        t_run, p = best(args.runs, lambda: timed(vmm_cmd("run", *base, *smp, "--stats")))
        if p.returncode != 0 or "powered off" not in p.stderr:
            print(f"vmm run --smp {n} failed: {p.stderr[-800:]}")
            return 1
        icount, run_mips = mips(p.stderr)
        row = {"smp": n, "run": t_run, "icount": icount, "mips": run_mips}
        if not args.no_record:
            with tempfile.TemporaryDirectory() as d:
                log = str(Path(d) / "l.vmlog")
                t_rec, pr = best(args.runs, lambda: timed(vmm_cmd("record", *base, *smp, "-o", log)))
                t_rep, pp = best(args.runs, lambda: timed(vmm_cmd("replay", log, "--serial", "none")))
                row.update(record=t_rec, replay=t_rep, replay_ok="every digest matched" in pp.stderr,
                           per_vcpu=re.findall(r"vCPU (\d+): (\d[\d,]*\d|\d)", pp.stderr))
        if qemu and not args.no_qemu:
            t_q, pq = best(args.runs, lambda: timed([qemu, "-accel", "tcg", "-m", "256", "-smp", str(n), "-kernel",
                                                     str(kernel), "-initrd", str(initrd), "-append", APPEND,
                                                     "-no-reboot", "-nographic", "-monitor", "none"]))
            row["qemu"] = t_q if "VMM-BENCH-INIT" in pq.stdout else None
            if row["qemu"] is None:
                print(f"QEMU --smp {n} did not reach the init marker (rc {pq.returncode}): {pq.stdout[-300:]!r}")
        rows.append(row)
    print(f"\n{'vCPUs':>5} {'vmm run s':>10} {'MIPS':>7} {'QEMU s':>8} {'vmm/QEMU':>9} {'record s':>9} "
          f"{'rec/run':>8} {'replay s':>9}")
    for r in rows:
        q = r.get("qemu")
        ratio = f"{r['run'] / q:9.2f}" if q else f"{'-':>9}"
        rec = f"{r['record']:9.1f} {r['record'] / r['run']:8.2f} {r['replay']:9.1f}" if "record" in r else ""
        qs = f"{q:8.1f}" if q else f"{'-':>8}"
        print(f"{r['smp']:>5} {r['run']:10.1f} {r['mips']:7.1f} {qs} {ratio} {rec}")
        if "replay_ok" in r and not r["replay_ok"]:
            print(f"  --smp {r['smp']}: the replay did not report every digest matched")
    for r in rows:
        if r.get("per_vcpu"):
            print(f"  --smp {r['smp']}: instructions per vCPU " +
                  ", ".join(f"vCPU {v}: {c}" for v, c in r["per_vcpu"]))
    if len(rows) > 1:
        print(f"  --smp {rows[1]['smp']} / --smp {rows[0]['smp']} wall time: {rows[1]['run'] / rows[0]['run']:.2f}")
    print("\naims: vmm/QEMU <= 2.0 (issue 10), record/run <= 1.15 (issue 11)")
    if args.profile:
        profile(kernel, initrd)
    return 0


def profile(kernel: Path, initrd: Path) -> None:
    import cProfile
    import pstats

    from host.serial import NullBackend
    from replay.session import build_machine, machine_config

    k, i = kernel.read_bytes(), initrd.read_bytes()
    cfg = machine_config(256 << 20, 1_767_225_600, str(kernel), k, "auto", APPEND, 0x100000, "none",
                         initrd=(str(initrd), i))
    m = build_machine(cfg, k, NullBackend())
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    res = m.run()
    prof.disable()
    print(f"\nprofile of one in-process boot ({res}, {time.perf_counter() - t0:.1f} s):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    sys.exit(main())
