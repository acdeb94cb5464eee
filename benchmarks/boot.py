#!/usr/bin/env python3
"""Boot time of a guest under vmm, side by side with QEMU TCG, measured in the same run.

    python benchmarks/boot.py [--runs N] [--image NAME|PATH] [--mem MIB]

Two figures per emulator, each the median of N runs (default 5):

* first serial line: from starting the emulator until the guest's first
  complete line ("\\n") arrives on COM1;
* whole run: until the emulator has exited (the guest ends through the
  debug-exit port).

Columns:

* vmm (process): ``python -m tools.cli run IMAGE --serial stdio``, stdout read
  through a pipe as it comes -- what a user waits for, Python start-up and
  imports included;
* vmm (in-process): a PcMachine built and booted in this process with a
  serial backend that timestamps the first line; no interpreter start-up;
* QEMU TCG: ``qemu-system-i386 -serial stdio ... -kernel IMAGE`` (or -drive for
  a disk image) with the same RAM size, read through a pipe the same way.
  Skipped, with a note, when qemu-system-i386 is not installed.

The ratio column is vmm (process) / QEMU.  Guest time is virtual in vmm (an
idle guest costs no host time) and real in QEMU (its timers follow the host
clock), so for a guest that waits on timers the two measure different things;
the demo spends ~0.16 s of virtual time, most of it halted.
"""
from __future__ import annotations

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QEMU_ARGS = ["-display", "none", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0x501,iosize=2",
             "-rtc", "base=2026-01-01T00:00:00,clock=vm", "-no-reboot"]


def timed_pipe(cmd: list[str], timeout: float = 120.0) -> tuple[float, float, bytes, int]:
    """Run cmd; return (seconds to the first newline on stdout, seconds to exit, stdout, status)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    fd = proc.stdout.fileno()
    out = bytearray()
    first = None
    deadline = t0 + timeout
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            proc.kill()
            raise RuntimeError(f"{cmd[0]} did not finish within {timeout} s")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
        if first is None and b"\n" in chunk:
            first = time.perf_counter() - t0
    status = proc.wait()
    total = time.perf_counter() - t0
    proc.stdout.close()
    return (first if first is not None else float("nan")), total, bytes(out), status


def vmm_process(image: str, mem: int) -> tuple[float, float, bytes, int]:
    return timed_pipe([sys.executable, "-m", "tools.cli", "run", image, "--serial", "stdio",
                       "--mem", f"{mem}M"])


def vmm_in_process(image: str, mem: int) -> tuple[float, float, bytes, int]:
    from vmm.firmware.boot import boot
    from vmm.machine import StopReason
    from vmm.platform.pc import PcConfig, PcMachine

    class Stamp:
        def __init__(self) -> None:
            self.out = bytearray()
            self.first: float | None = None

        def write(self, data: bytes) -> None:
            self.out += data
            if self.first is None and b"\n" in data:
                self.first = time.perf_counter()

        def poll_input(self) -> bytes:
            return b""

        def close(self) -> None:
            pass

    path = resolve(image)
    data = Path(path).read_bytes()
    backend = Stamp()
    t0 = time.perf_counter()
    m = PcMachine(PcConfig(mem_size=mem << 20, serial=backend))
    boot(m, data, name=image, cmdline=image)
    res = m.run()
    total = time.perf_counter() - t0
    first = backend.first - t0 if backend.first is not None else float("nan")
    status = res.status if res.reason is StopReason.EXIT else -1
    return first, total, bytes(backend.out), status


def qemu(image: str, mem: int, qemu_bin: str) -> tuple[float, float, bytes, int]:
    path = resolve(image)
    boot = ["-drive", f"format=raw,file={path}"] if path.endswith(".img") else ["-kernel", path]
    first, total, out, status = timed_pipe([qemu_bin, *QEMU_ARGS, "-m", str(mem), *boot])
    return first, total, out, (status >> 1 if status & 1 else -1)


def resolve(image: str) -> str:
    if os.path.exists(image):
        return os.path.relpath(image, ROOT)
    from guests.build import GUESTS, guest_path

    return os.path.relpath(guest_path(image), ROOT) if image in GUESTS else image


def median(runs: list[tuple], i: int) -> float:
    return statistics.median(r[i] for r in runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs per emulator (default 5); medians are shown")
    p.add_argument("--image", default="demo", help="bundled guest name or image path (default: demo)")
    p.add_argument("--mem", type=int, default=32, metavar="MIB",
                   help="guest RAM in MiB for both (default 32)")
    args = p.parse_args(argv)
    image = resolve(args.image)

    qemu_bin = shutil.which("qemu-system-i386")
    columns: dict[str, list[tuple]] = {"vmm (process)": [], "vmm (in-process)": []}
    if qemu_bin:
        columns["QEMU TCG"] = []
    for _ in range(args.runs):  # interleaved, so host noise spreads over every column
        columns["vmm (process)"].append(vmm_process(image, args.mem))
        columns["vmm (in-process)"].append(vmm_in_process(image, args.mem))
        if qemu_bin:
            columns["QEMU TCG"].append(qemu(image, args.mem, qemu_bin))

    for name, runs in columns.items():
        bad = {r[3] for r in runs if r[3] != 0}
        if bad:
            print(f"warning: {name} exited with guest status {sorted(bad)} (expected 0)", file=sys.stderr)
    print(f"boot benchmark: {image}, {args.mem} MiB, median of {args.runs} runs, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    if qemu_bin:
        ver = subprocess.run([qemu_bin, "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[0]
        print(f"QEMU: {ver} (TCG)")
    else:
        print("QEMU: qemu-system-i386 is not installed, so the QEMU column is skipped "
              "(apt-get install qemu-system-x86)")
    print()
    names = list(columns)
    header = f"{'seconds':<22}" + "".join(f"{n:>18}" for n in names)
    if qemu_bin:
        header += f"{'ratio vmm/QEMU':>18}"
    print(header)
    for label, i in (("first serial line", 0), ("whole run", 1)):
        row = f"{label:<22}" + "".join(f"{median(columns[n], i):>18.3f}" for n in names)
        if qemu_bin:
            row += f"{median(columns['vmm (process)'], i) / median(columns['QEMU TCG'], i):>18.2f}"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
