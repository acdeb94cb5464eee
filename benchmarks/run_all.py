"""Run every benchmark script in this folder in turn and print their output
(``make bench``).  Each runs in its own process with its default arguments
(each takes from about a second to half a minute), one at a time so that
they do not load the machine for each other.  A script that fails is
reported and the others still run; the exit status is 1 if any failed.

    python benchmarks/run_all.py [NAME ...] [--skip NAME ...]

NAME is a script's name without .py (core, smp, mmio, ...); without any,
all of them run, core first.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIRST = ("core",)


def scripts() -> list[str]:
    names = sorted(f[:-3] for f in os.listdir(HERE)
                   if f.endswith(".py") and not f.startswith("_") and f != os.path.basename(__file__))
    return [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="scripts to run (default: all)")
    ap.add_argument("--skip", nargs="*", default=[], help="scripts not to run")
    a = ap.parse_args()
    known = scripts()
    unknown = [n for n in a.names + a.skip if n not in known]
    if unknown:
        print(f"run_all: no benchmark named {', '.join(unknown)} (have: {', '.join(known)})", file=sys.stderr)
        return 2
    todo = [n for n in (a.names or known) if n not in a.skip]
    failed = []
    t_all = time.perf_counter()
    for name in todo:
        print(f"===== {name} " + "=" * max(0, 60 - len(name)), flush=True)
        t = time.perf_counter()
        rc = subprocess.call([sys.executable, os.path.join(HERE, name + ".py")], cwd=os.path.dirname(HERE))
        dt = time.perf_counter() - t
        if rc != 0:
            failed.append(name)
        status = "ok" if rc == 0 else f"FAILED (exit status {rc})"
        print(f"----- {name}: {status} in {dt:.1f} s\n", flush=True)
    print(f"{len(todo) - len(failed)} of {len(todo)} benchmarks ran in {time.perf_counter() - t_all:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
