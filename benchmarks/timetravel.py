"""Reverse-execution latency and checkpoint cost, deep into a long recording.

    python benchmarks/timetravel.py [--depth 1e9] [--interval 2000000]

Records a guest that runs a long busy computation under a 1 kHz timer
(writing a spread of pages), then, with time travel over that recording:
latency of reverse-stepi at 10^7, 10^8 and 10^9 instructions, and of a seek
back to a point between two checkpoints just before each (aim: under 0.5 s), and the checkpoint RAM cost per 10^8
instructions.  The forward replay that builds the checkpoints is reported
too, as the baseline the latencies compare with.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from replay.session import record  # noqa: E402
from replay.timetravel import TimeTravel  # noqa: E402
from tools.guestkit import asm  # noqa: E402

LOAD = 0x100000


def long_guest() -> bytes:
    """Forever: a loop that writes one of 256 pages per iteration; a 1 kHz timer counts ticks."""
    return asm("""
        mov esp, 0x90000
        mov edi, 0x5000
        mov ecx, 512
        xor eax, eax
        rep stosd
        mov eax, isr
        mov [0x5000 + 0x20*8], ax
        mov word ptr [0x5000 + 0x20*8 + 2], 0x10
        mov word ptr [0x5000 + 0x20*8 + 4], 0x8E00
        shr eax, 16
        mov [0x5000 + 0x20*8 + 6], ax
        lidt [idtr]
        mov al, 0x11
        out 0x20, al
        mov al, 0x20
        out 0x21, al
        mov al, 4
        out 0x21, al
        mov al, 1
        out 0x21, al
        mov al, 0xFE
        out 0x21, al
        mov al, 0x34
        out 0x43, al
        mov al, 0xA9
        out 0x40, al
        mov al, 0x04
        out 0x40, al
        sti
        xor ebx, ebx
    top:
        mov ecx, 200
    inner:
        add eax, ecx
        xor eax, ebx
        dec ecx
        jnz inner
        inc ebx
        mov edx, ebx
        and edx, 0xFF
        shl edx, 12
        mov [0x400000 + edx], eax
        jmp top
    isr:
        inc dword ptr [0x6000]
        push eax
        mov al, 0x20
        out 0x20, al
        pop eax
        iretd
    idtr:
        .word 0x7ff
        .long 0x5000
    """, 32, LOAD)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=float, default=1e9, help="deepest point measured (default 1e9)")
    ap.add_argument("--interval", type=int, default=2_000_000, help="checkpoint interval (instructions)")
    a = ap.parse_args()
    depth = int(a.depth)
    points = [p for p in (10**7, 10**8, 10**9) if p <= depth]
    with tempfile.TemporaryDirectory() as tmp:
        img = os.path.join(tmp, "long.bin")
        image = long_guest()
        open(img, "wb").write(image)
        log = os.path.join(tmp, "long.vmlog")
        t = time.perf_counter()
        res, _ = record(img, image, log, boot_kind="flat", mem_size=8 << 20, max_instructions=depth + 10)
        t_rec = time.perf_counter() - t
        print(f"recorded {res.icount:,} instructions in {t_rec:.1f} s ({res.icount / t_rec / 1e6:.0f} MIPS), "
              f"log {os.path.getsize(log):,} bytes")
        tt = TimeTravel(log, interval=a.interval)
        print(f"{'point':>14} {'forward replay':>15} {'reverse-stepi':>14} {'seek back':>16} "
              f"{'checkpoints':>12} {'ckpt RAM':>10}")
        for p in points:
            t = time.perf_counter()
            tt.seek(p)
            t_fwd = time.perf_counter() - t
            t = time.perf_counter()
            tt.reverse_step()
            t_rs = time.perf_counter() - t
            assert tt.icount == p - 1
            back = p - a.interval // 3  # between two checkpoints: restore + forward replay
            t = time.perf_counter()
            tt.seek(back)
            t_seek = time.perf_counter() - t
            assert tt.icount == back
            print(f"{p:>14,} {t_fwd:13.2f} s {t_rs * 1e3:11.1f} ms {t_seek * 1e3:13.1f} ms "
                  f"{len(tt.cps.list):>12} {tt.cps.bytes / 1e6:8.1f} MB")
        per_1e8 = tt.cps.bytes / (tt.icount / 1e8)
        print(f"checkpoint RAM cost: {per_1e8 / 1e6:.1f} MB per 10^8 instructions "
              f"(interval {a.interval:,}, guest RAM 8 MiB, 256 pages written in rotation)")


if __name__ == "__main__":
    main()
