#!/usr/bin/env python3
"""Disk throughput inside a Linux guest: IDE PIO, IDE DMA and virtio-blk, side by side with QEMU TCG
and a host file-read baseline in the same run.

    python benchmarks/disk.py [--seq-mib N] [--random-ops N] [--append ARGS]
                              [--only ide-pio,ide-dma,virtio-raw,virtio-qcow2,
                                      qemu-ide-pio,qemu-ide-dma,qemu-virtio]

The guest is Debian's kernel with a busybox initramfs (tools/debian.py): for
the IDE columns ata_piix and sd_mod (``ide-pio`` loads libata with dma=0,
so every sector crosses the data port; ``ide-dma`` uses the bus master), for
virtio virtio_pci and virtio_blk.  The disk is a fresh 64 MiB image, raw
(and a qcow2 image for ``virtio-qcow2``: qcow2 against raw).  Its /init runs,
on the disk with busybox dd and O_DIRECT (so every block is a request to the
device, not the page cache):

* seq-write: ``dd if=/dev/zero of=/dev/vda bs=4k count=N oflag=direct``
* seq-read:  ``dd if=/dev/vda of=/dev/null bs=4k count=N iflag=direct``
* rand-read / rand-write: one ``dd ... bs=4k count=1 skip|seek=K`` per block
  at the same pseudo-random offsets in both emulators;
* spawn: the same loop of one-block dd runs without the disk (/dev/zero to
  /dev/null): the cost of starting a dd in the guest, which the random
  figures include.

Each phase is bracketed by marker lines on the serial console, time-stamped
by the host as they arrive, so the figures are host wall-clock time (in vmm
guest time is virtual: an idle guest costs no host time, so the guest's own
dd figures mean nothing here).  The vmm columns run the machine in this
process; QEMU is ``qemu-system-x86_64 -nographic ... -drive
file=IMG,if=virtio|ide,format=raw`` (TCG; the qemu-* columns, the same guest
scripts), read through a pipe the same way.  The ratios are each vmm column's
throughput over QEMU's on the same interface (issue 12 aims at >= 0.5 for
virtio-blk), and qcow2's over raw's.
Both kernels run without page table isolation: vmm's default machine type,
pc-3, reports IA32_ARCH_CAPABILITIES with RDCL_NO, and QEMU's default CPU
(qemu64) is AMD, which Linux does not isolate.  (On pc-2, vmm's earlier CPU,
Linux isolated them: two CR3 writes, each a full TLB flush, per system call
and interrupt from user mode.)  ``--append ARGS`` gives both kernels more
arguments, e.g. ``mitigations=off``.
The machine is shared with other work, so figures move from run to run; a
second table divides by the CPU time each emulator's process used between
the same markers (this process's ``process_time`` for vmm, /proc/PID/stat for
QEMU, all its threads), which moves less under load.  For the vmm columns
the exits, MSI-X messages, notifications and ISR reads per request of the
sequential phases are printed too.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools import debian

PHASES = ("seq-write", "seq-read", "rand-read", "rand-write", "spawn")
# column -> (interface, image format, module list, libata parameters)
COLUMNS = {
    "ide-pio": ("ide", "raw", ["ata_piix", "sd_mod"], "dma=0"),
    "ide-dma": ("ide", "raw", ["ata_piix", "sd_mod"], ""),
    "virtio-raw": ("virtio", "raw", ["virtio_pci", "virtio_blk"], ""),
    "virtio-qcow2": ("virtio", "qcow2", ["virtio_pci", "virtio_blk"], ""),
    "qemu-ide-pio": ("ide", "raw", ["ata_piix", "sd_mod"], "dma=0"),
    "qemu-ide-dma": ("ide", "raw", ["ata_piix", "sd_mod"], ""),
    "qemu-virtio": ("virtio", "raw", ["virtio_pci", "virtio_blk"], ""),
}
# the ratios printed: (column, the column it is divided by)
RATIOS = [("ide-pio", "qemu-ide-pio"), ("ide-dma", "qemu-ide-dma"), ("virtio-raw", "qemu-virtio"),
          ("virtio-qcow2", "qemu-virtio"), ("virtio-qcow2", "virtio-raw")]
CMDLINE = "console=ttyS0 panic=-1 quiet"
DISK_MIB = 64
BLOCK = 4096


def offsets(n: int, blocks: int) -> list[int]:
    """n block numbers in [0, blocks), from a fixed LCG: the same in every run and emulator."""
    x, out = 12345, []
    for _ in range(n):
        x = (x * 1103515245 + 12345) & 0x7FFF_FFFF
        out.append(x % blocks)
    return out


def guest_script(seq_blocks: int, dev: str = "/dev/vda", libata: str = "") -> str:
    one = f"dd if={dev} of=/dev/null bs=4k count=1 skip=$o iflag=direct 2>/dev/null"
    wr = f"dd if=/dev/zero of={dev} bs=4k count=1 seek=$o oflag=direct conv=notrunc 2>/dev/null"
    spawn = "dd if=/dev/zero of=/dev/null bs=4k count=1 2>/dev/null"
    body = {
        "seq-write": f"dd if=/dev/zero of={dev} bs=4k count={seq_blocks} oflag=direct conv=notrunc 2>/dev/null",
        "seq-read": f"dd if={dev} of=/dev/null bs=4k count={seq_blocks} iflag=direct 2>/dev/null",
        "rand-read": f"for o in $(cat /offsets); do {one}; done",
        "rand-write": f"for o in $(cat /offsets); do {wr}; done",
        "spawn": f"for o in $(cat /offsets); do {spawn}; done",
    }
    load = debian.LOAD_MODULES
    if libata:   # busybox's insmod does not read module parameters from the kernel command line
        load = load.replace("insmod /lib/modules/$m.ko", f'insmod /lib/modules/$m.ko $([ "$m" = libata ] && echo {libata})')
    wait = f"i=0; while [ ! -b {dev} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n"
    lines = [debian.INIT_HEADER, load, wait, "echo BENCH-READY\n"]
    for p in PHASES:
        lines.append(f"echo BENCH-BEGIN {p}\n{body[p]}\necho BENCH-END {p}\n")
    lines.append("echo BENCH-DONE\npoweroff -f\n")
    return "".join(lines)


class Marks:
    """Host time stamps of the BENCH-BEGIN/END lines as the serial output arrives."""

    def __init__(self, probe: Callable[[], dict[str, int]] | None = None,
                 cpu: Callable[[], float] = time.process_time) -> None:
        self.buf = b""
        self.t: dict[str, float] = {}
        self.cpu = cpu                      # CPU seconds the emulator has used so far
        self.c: dict[str, float] = {}
        self.text = bytearray()
        self.probe = probe                  # counters to read at each marker (vmm: exits, requests)
        self.counts: dict[str, dict[str, int]] = {}

    def feed(self, data: bytes) -> None:
        now = time.perf_counter()
        self.text += data
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            s = line.decode(errors="replace").strip()
            if s.startswith("BENCH-"):
                self.t[s] = now
                self.c[s] = self.cpu()
                if self.probe is not None:
                    self.counts[s] = self.probe()

    # the SerialBackend protocol (host/serial.py)
    def write(self, data: bytes) -> None:
        self.feed(data)

    def poll_input(self) -> bytes:
        return b""

    def close(self) -> None:
        pass

    def seconds(self, phase: str) -> float | None:
        a, b = self.t.get(f"BENCH-BEGIN {phase}"), self.t.get(f"BENCH-END {phase}")
        return None if a is None or b is None else b - a

    def cpu_seconds(self, phase: str) -> float | None:
        a, b = self.c.get(f"BENCH-BEGIN {phase}"), self.c.get(f"BENCH-END {phase}")
        return None if a is None or b is None else b - a

    def delta(self, phase: str) -> dict[str, int]:
        """How much each probed counter moved during ``phase``."""
        a, b = self.counts.get(f"BENCH-BEGIN {phase}"), self.counts.get(f"BENCH-END {phase}")
        return {} if a is None or b is None else {k: b[k] - a.get(k, 0) for k in b if b[k] != a.get(k, 0)}


def run_vmm(kernel: Path, initrd: Path, image: Path, interface: str, cmdline: str = CMDLINE) -> tuple[Marks, dict]:
    from replay.session import build_machine, machine_config
    from vmm.platform.pc import DEFAULT_EPOCH
    from vmm.platform.storage import attach_drives, close_drives, describe

    box: list = []

    def probe() -> dict[str, int]:
        m = box[0]
        out = {f"exit:{k}": v for k, v in m.exit_counts.items()}
        for d in m.devices:
            dev = getattr(d, "device", None)
            if getattr(dev, "completed", None) is not None:
                out["requests"] = dev.completed
            msix = getattr(d, "msix", None)
            if msix is not None:
                out["msi-x messages"] = msix.sent
            if hasattr(d, "isr_reads"):
                out["isr reads"] = d.isr_reads
            if hasattr(d, "notifies"):
                out["notifies"] = d.notifies
        return out

    marks = Marks(probe)
    data = kernel.read_bytes()
    cfg = machine_config(256 << 20, DEFAULT_EPOCH, str(kernel), data, "linux", cmdline, 0x100000, "none",
                         initrd=(str(initrd), initrd.read_bytes()))
    m = build_machine(cfg, data, marks)
    box.append(m)
    try:
        attach_drives(m, describe([{"file": str(image), "if": interface}]), "run")
        t0 = time.perf_counter()
        res = m.run(200_000_000_000)
        info = {"result": f"{res.reason.name.lower()} after {time.perf_counter() - t0:.0f} s", "icount": m.icount}
        if interface == "ide":
            bm = m.ide.channels[0].bm
            info["bus-master transfers"] = bm.transfers
        else:
            fn = next(d for d in m.devices if getattr(d, "kind", "").startswith("virtio"))
            info["requests"] = getattr(getattr(fn, "device", None), "completed", None)
    finally:
        m.close()
        close_drives(m)
    return marks, info


def host_baseline(image: Path, seq_blocks: int, offs: list[int]) -> dict[str, float]:
    """Seconds per phase for the same reads and writes done by this process straight on
    the image file (4 KiB pread/pwrite, through the page cache): the host's own cost."""
    fd = os.open(image, os.O_RDWR)
    rates = {}
    try:
        block = bytes(BLOCK)
        t0 = time.perf_counter()
        for i in range(seq_blocks):
            os.pwrite(fd, block, i * BLOCK)
        rates["seq-write"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(seq_blocks):
            os.pread(fd, BLOCK, i * BLOCK)
        rates["seq-read"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for o in offs:
            os.pread(fd, BLOCK, o * BLOCK)
        rates["rand-read"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for o in offs:
            os.pwrite(fd, block, o * BLOCK)
        rates["rand-write"] = time.perf_counter() - t0
    finally:
        os.close(fd)
    return rates


def run_qemu(qemu: str, kernel: Path, initrd: Path, image: Path, fmt: str = "raw",
             cmdline: str = CMDLINE, interface: str = "virtio") -> tuple[Marks, dict]:
    marks = Marks(cpu=lambda: process_cpu(proc.pid))
    cmd = [qemu, "-nographic", "-no-reboot", "-accel", "tcg", "-m", "256M", "-kernel", str(kernel),
           "-initrd", str(initrd), "-append", cmdline, "-drive", f"file={image},if={interface},format={fmt}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    process_cpu(proc.pid)
    assert proc.stdout is not None
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        marks.feed(chunk)
    proc.wait(timeout=60)
    return marks, {"result": f"exit {proc.returncode} after {time.perf_counter() - t0:.0f} s"}


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used: /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_image(path: Path, fmt: str) -> None:
    if fmt == "qcow2":
        from host.images import create
        create(path, DISK_MIB << 20)
    else:
        with open(path, "wb") as f:
            f.truncate(DISK_MIB << 20)


def print_table(seconds: dict[str, dict[str, float]], seq_mib: int, random_ops: int) -> None:
    names = list(seconds)
    ratios = [(a, b) for a, b in RATIOS if a in seconds and b in seconds]
    header = f"{'phase':<12}" + "".join(f"{c:>14}" for c in names)
    header += "".join(f"{a + '/' + b:>{max(14, len(a) + len(b) + 3)}}" for a, b in ratios)
    print(header)
    for p in PHASES:
        row = f"{p:<12}"
        rates = {}
        for c in names:
            t = seconds[c].get(p)
            if t is None or t <= 0:
                row += f"{'-':>14}"
                continue
            rates[c] = (seq_mib / t) if p.startswith("seq") else (random_ops / t)
            row += f"{rates[c]:>8.2f} " + ("MiB/s" if p.startswith("seq") else "ops/s")
        for a, b in ratios:
            w = max(14, len(a) + len(b) + 3)
            row += f"{rates[a] / rates[b]:>{w - 1}.2f}x" if a in rates and b in rates else f"{'-':>{w}}"
        print(row)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-mib", type=int, default=8, help="MiB moved by each sequential phase (default 8)")
    ap.add_argument("--random-ops", type=int, default=200, help="blocks per random phase (default 200)")
    ap.add_argument("--only", default=",".join(COLUMNS), help="columns to run (default: all)")
    ap.add_argument("--append", default="", help="more kernel arguments, for every column (e.g. mitigations=off)")
    a = ap.parse_args()
    columns = [c for c in a.only.split(",") if c]
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        print(f"disk: unknown column {unknown[0]!r} (known: {', '.join(COLUMNS)})")
        return 2
    cmdline = f"{CMDLINE} {a.append}".strip()
    seq_blocks = (a.seq_mib << 20) // BLOCK
    offs = offsets(a.random_ops, seq_blocks)
    try:
        kernel = debian.kernel()
        initrds = {}
        for col in columns:
            iface, _fmt, modules, libata = COLUMNS[col]
            dev = "/dev/sda" if iface == "ide" else "/dev/vda"
            initrds[col] = debian.initramfs(guest_script(seq_blocks, dev, libata), modules,
                                            {"offsets": "".join(f"{o}\n" for o in offs)})
    except debian.DebianUnavailable as e:
        print(f"disk: Debian packages unavailable ({e}); nothing measured")
        return 0
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        columns = [c for c in columns if not c.startswith("qemu")]
        print("disk: qemu-system-x86_64 is not installed, so the QEMU column is skipped")
    seconds: dict[str, dict[str, float]] = {}
    cpu: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "host.raw"
        make_image(base, "raw")
        seconds["host-file"] = host_baseline(base, seq_blocks, offs)
        for col in columns:
            iface, fmt, _modules, _libata = COLUMNS[col]
            image = Path(tmp) / f"{col}.{fmt}"
            make_image(image, fmt)
            if col.startswith("qemu"):
                marks, info = run_qemu(qemu, kernel, initrds[col], image, fmt, cmdline, iface)
            else:
                marks, info = run_vmm(kernel, initrds[col], image, iface, cmdline)
            seconds[col] = {p: t for p in PHASES if (t := marks.seconds(p)) is not None}
            cpu[col] = {p: t for p in PHASES if (t := marks.cpu_seconds(p)) is not None}
            done = "BENCH-DONE" in marks.t
            print(f"{col}: {info['result']}" + ("" if done else " -- the guest did not finish:")
                  + "".join(f", {k} {v}" for k, v in info.items() if k != "result" and v is not None))
            if not done:
                print(marks.text.decode(errors="replace")[-2000:])
            seq = [marks.delta(p) for p in ("seq-write", "seq-read")]
            reqs = sum(d.get("requests", 0) for d in seq)
            if reqs:
                keys = sorted({k for d in seq for k in d if k != "requests"})
                per = ", ".join(f"{k} {sum(d.get(k, 0) for d in seq) / reqs:.2f}" for k in keys)
                print(f"  per request in the sequential phases ({reqs} requests): {per}")

    print(f"\nDebian kernel {kernel.name} ({cmdline}), busybox dd, 4 KiB blocks, O_DIRECT; {a.seq_mib} MiB sequential, "
          f"{a.random_ops} random blocks; host wall-clock time between the guest's markers; host-file is "
          f"this process's pread/pwrite on a raw file")
    print_table(seconds, a.seq_mib, a.random_ops)
    print("\nThe same per CPU second the emulator's process used between the markers (user + system, all "
          "threads; on a shared machine this moves less than wall-clock time)")
    print_table(cpu, a.seq_mib, a.random_ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
