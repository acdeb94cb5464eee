"""Record/replay figures on one guest, in one run, side by side with QEMU's own.

    python benchmarks/replay.py [--guest demo|long] [--repeat 3]

vmm: plain run time, record time, replay time (best of --repeat each, each
from machine construction to the guest's exit), the
record overhead (record / run; aim <= 1.10), replay speed (replay / record;
aim <= 1.0) and log bytes per million instructions.

QEMU (qemu-system-i386, TCG): the same image with -icount shift=auto, plain
and with rr=record,rrfile=..., then rr=replay: its overhead and log size.
QEMU's timings include its own start-up (a process per run); vmm's are
in-process from boot to exit.  Skipped with a note if QEMU is not installed.

`--guest long` runs the time-travel benchmark's flat guest for 10^8
instructions (a loop under a 1 kHz timer): fixed costs (hashing RAM for the
initial and final digests) are then spread over a longer run.  QEMU cannot
boot that flat binary, so its column stays empty there.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guests.build import guest_path  # noqa: E402
from replay.session import Replayer, record  # noqa: E402
from vmm.firmware.boot import boot  # noqa: E402
from vmm.platform.pc import PcConfig, PcMachine  # noqa: E402

MEM = 32 << 20


KIND = "auto"
LIMIT = None


def plain(image: bytes, name: str) -> tuple[float, int]:
    # timed like record(): machine construction and boot included
    t = time.perf_counter()
    m = PcMachine(PcConfig(mem_size=MEM))
    boot(m, image, KIND, name=name, cmdline=name)
    r = m.run(LIMIT)
    return time.perf_counter() - t, r.icount


def rec(image: bytes, name: str, log: str) -> tuple[float, int]:
    t = time.perf_counter()
    r, _ = record(name, image, log, mem_size=MEM, cmdline=name, boot_kind=KIND, max_instructions=LIMIT)
    return time.perf_counter() - t, r.icount


def rep(log: str) -> float:
    t = time.perf_counter()
    rp = Replayer(log)
    rp.run()
    return time.perf_counter() - t


def qemu(image_path: str, kind: str, tmp: str) -> dict | None:
    exe = shutil.which("qemu-system-i386")
    if exe is None:
        return None
    base = [exe, "-display", "none", "-serial", "null", "-monitor", "none", "-no-reboot", "-m", str(MEM >> 20),
            "-device", "isa-debug-exit,iobase=0x501,iosize=2", "-rtc", "base=2026-01-01T00:00:00,clock=vm"]
    base += ["-kernel", image_path] if kind == "multiboot" else ["-drive", f"format=raw,file={image_path}"]
    rr = os.path.join(tmp, "qemu.rr")
    out = {}
    for label, extra in (("plain", ["-icount", "shift=auto"]),
                         ("record", ["-icount", f"shift=auto,rr=record,rrfile={rr}"]),
                         ("replay", ["-icount", f"shift=auto,rr=replay,rrfile={rr}"])):
        t = time.perf_counter()
        p = subprocess.run(base + extra, capture_output=True, timeout=300)
        out[label] = time.perf_counter() - t
        out[label + "_rc"] = p.returncode
    out["log_bytes"] = os.path.getsize(rr) if os.path.exists(rr) else 0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", default="demo")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    global KIND, LIMIT
    with tempfile.TemporaryDirectory() as tmp:
        if a.guest == "long":
            from benchmarks.timetravel import long_guest

            path = os.path.join(tmp, "long.bin")
            with open(path, "wb") as f:
                f.write(long_guest())
            KIND, LIMIT, kind = "flat", 100_000_000, None
        else:
            path = str(guest_path(a.guest))
            kind = "multiboot" if path.endswith(".elf") else "disk"
        image = open(path, "rb").read()
        name = path
        log = os.path.join(tmp, "run.vmlog")
        t_run = min(plain(image, name)[0] for _ in range(a.repeat))
        recs = [rec(image, name, log) for _ in range(a.repeat)]
        t_rec = min(t for t, _ in recs)
        icount = recs[0][1]
        t_rep = min(rep(log) for _ in range(a.repeat))
        size = os.path.getsize(log)
        q = qemu(path, kind, tmp) if kind is not None else None
    print(f"guest {a.guest}: {icount:,} instructions; best of {a.repeat}")
    print(f"{'':28} {'vmm':>12} {'QEMU TCG rr':>14}")
    qv = (lambda k: f"{q[k]:12.3f} s") if q else (lambda k: f"{'n/a':>14}")
    print(f"{'plain run':28} {t_run:10.3f} s {qv('plain'):>14}")
    print(f"{'record':28} {t_rec:10.3f} s {qv('record'):>14}")
    print(f"{'replay':28} {t_rep:10.3f} s {qv('replay'):>14}")
    qo = f"{q['record'] / q['plain']:14.2f}" if q else f"{'n/a':>14}"
    print(f"{'record overhead (rec/run)':28} {t_rec / t_run:12.2f} {qo}")
    qr = f"{q['replay'] / q['record']:14.2f}" if q else f"{'n/a':>14}"
    print(f"{'replay speed (replay/rec)':28} {t_rep / t_rec:12.2f} {qr}")
    ql = f"{q['log_bytes']:>14,}" if q else f"{'n/a':>14}"
    print(f"{'log bytes':28} {size:12,} {ql}")
    per_m = size / (icount / 1e6)
    qpm = f"{q['log_bytes'] / (icount / 1e6):14,.0f}" if q else f"{'n/a':>14}"
    print(f"{'log bytes / M instructions':28} {per_m:12,.0f} {qpm}")
    if q is None:
        print("QEMU column: " + ("QEMU cannot boot this flat guest" if a.guest == "long"
                                 else "qemu-system-i386 not installed"))
    else:
        print(f"QEMU exit codes: plain {q['plain_rc']}, record {q['record_rc']}, replay {q['replay_rc']} "
              "(1 = the guest's status 0 via isa-debug-exit); QEMU times include process start-up;"
              " its bytes/M uses vmm's instruction count")


if __name__ == "__main__":
    main()
