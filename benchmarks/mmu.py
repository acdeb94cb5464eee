"""MMU figures, each side by side with its baseline measured in the same run.

1. Page walks per second: the C walk (vmm/cpu/mmu_native.py, what the shadow
   MMU's TLB fill runs) against the Python reference walk (vmm/memory/paging.py),
   on the same inputs: 4-level tables mapping 4096 random 4 KiB pages, and
   random reads, writes and fetches at CPL 0 and 3 (A/D updates on).  The C
   walk is timed both in one batch call and called once per walk from
   Python.
2. Shadow MMU against nested MMU (Unicorn's own walk) on
   a. a store-heavy guest: a loop of stores over a 64 KiB buffer with paging
      on (the shadow MMU never makes a data page executable in the TLB, so
      Unicorn's fast store path applies; UNICORN.md 6);
   b. a page-table-switch-heavy guest: two address spaces, each reload of
      CR3 flushes the TLB and the loop then touches 16 pages, so almost all
      the work is TLB fills (the shadow MMU's C fill against QEMU's walk).
   Both report guest MIPS, the ratio shadow/nested, and the shadow MMU's
   TLB fills per second in the engine.

    python benchmarks/mmu.py [--scale S]
"""
from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from devices.legacy.debugports import DebugExit
from tools.guestkit import PT, Guest
from vmm.memory.ept import Ept
from vmm.machine import Machine
from vmm.memory.ram import GuestMemory
from vmm.memory.mmu import CWalk
from vmm.memory.paging import PageFault, translate

PE, WP, PG, PAE, LME, LMA, NXE = 1, 1 << 16, 1 << 31, 1 << 5, 1 << 8, 1 << 10, 1 << 11


# -- 1. walks per second ----------------------------------------------------------------------
def build_4level(mem: GuestMemory, pages: int, rng: random.Random) -> tuple[int, list[int]]:
    """4-level tables mapping `pages` random 4 KiB pages; returns (cr3, linear addresses)."""
    nxt = [0x10_0000]

    def alloc() -> int:
        a = nxt[0]
        nxt[0] += 4096
        return a

    cr3 = alloc()
    lins = []
    for _ in range(pages):
        lin = rng.randrange(0, 1 << 47) & ~0xFFF
        table = cr3
        for shift in (39, 30, 21):
            addr = table + ((lin >> shift) & 0x1FF) * 8
            e = mem.read_u64(addr)
            if not e & 1:
                e = alloc() | 7
                mem.write_u64(addr, e)
            table = e & 0xFF_FFFF_F000
        mem.write_u64(table + ((lin >> 12) & 0x1FF) * 8, (rng.randrange(0, 1 << 28) << 12) | 7)
        lins.append(lin)
    return cr3, lins


def bench_walks(n: int) -> dict[str, float]:
    rng = random.Random(1)
    mem = GuestMemory(64 << 20)
    cr3, lins = build_4level(mem, 4096, rng)
    inputs = [(rng.choice(lins) | rng.randrange(4096), rng.choice("rwx"), rng.random() < 0.5) for _ in range(n)]
    regs = (PE | PG | WP, cr3, PAE, LME | LMA | NXE)
    ept = Ept(mem)
    phys = ept.phys
    t0 = time.perf_counter()
    for lin, acc, user in inputs:
        try:
            translate(phys, lin, acc, user, *regs)
        except PageFault:
            pass
    py = n / (time.perf_counter() - t0)
    cw = CWalk(ept)
    t0 = time.perf_counter()
    for lin, acc, user in inputs:
        try:
            cw.translate(lin, acc, user, *regs)
        except PageFault:
            pass
    c_calls = n / (time.perf_counter() - t0)
    lins_, accs, users = zip(*inputs)
    reps = 50
    t0 = time.perf_counter()
    for _ in range(reps):
        cw.walk_many(lins_, accs, users, *regs)
    c_batch = n * reps / (time.perf_counter() - t0)
    return {"python": py, "c_calls": c_calls, "c_batch": c_batch}


# -- 2. guests ------------------------------------------------------------------------------------
def guest(mmu: str) -> Guest:
    g = Guest.__new__(Guest)
    g.m = Machine(8 << 20, mmu=mmu)
    g.exit_status = None
    g.m.add_device(DebugExit(g._exit))
    g.cpu = g.m.vcpu
    g.gdt = {}
    return g


def store_heavy(mmu: str, iters: int) -> tuple[float, int]:
    g = guest(mmu)
    body = """
        mov edi, 0x100000
        mov eax, 0x12345678
    L:  mov [edi], eax
        mov [edi+4], eax
        mov [edi+8], eax
        mov [edi+12], eax
        add edi, 16
        and edi, 0x10FFFF
        dec ecx
        jnz L
        mov dx, 0x501
        out dx, al
    """
    g.protected_mode(f"mov ecx, {iters}; " + body, paging=True)
    return run(g, iters * 8)


def cr3_heavy(mmu: str, iters: int) -> tuple[float, int]:
    g = guest(mmu)
    touches = "; ".join(f"mov eax, [{0x200000 + i * 0x1000:#x}]" for i in range(16))
    body = f"""
    L:  mov eax, 0x8000
        mov cr3, eax
        {touches}
        mov eax, 0x4000
        mov cr3, eax
        {touches}
        dec ecx
        jnz L
        mov dx, 0x501
        out dx, al
    """
    g.protected_mode(f"mov ecx, {iters}; " + body, paging=True)
    # a second address space: a copy of guestkit's PD/PT with the data pages elsewhere
    pd = bytearray(g.m.memory.read(PT, 4096))
    pt = bytearray(g.m.memory.read(PT + 0x1000, 4096))
    struct.pack_into("<I", pd, 0, 0x9000 | 7)
    for i in range(16):
        struct.pack_into("<I", pt, 4 * (0x200 + i), (0x300000 + i * 0x1000) | 7)
    g.put(0x8000, bytes(pd))
    g.put(0x9000, bytes(pt))
    return run(g, iters * (2 * (2 + 16) + 2))


def run(g: Guest, insns: int) -> tuple[float, int]:
    g.cpu.invalidate_code()
    t0 = time.perf_counter()
    r = g.m.run()
    dt = time.perf_counter() - t0
    assert r.reason.value == "exit", r
    return dt, g.cpu.mmu_stats().get("fills", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the iteration counts")
    args = ap.parse_args()
    n = int(20000 * args.scale)
    w = bench_walks(n)
    print(f"{'page walks per second':38} {'Python':>14} {'C':>14}  ratio")
    print(f"{'  one call from Python per walk':38} {w['python']:14,.0f} {w['c_calls']:14,.0f} {w['c_calls'] / w['python']:6.1f}")
    print(f"{'  C walks in one batch':38} {w['python']:14,.0f} {w['c_batch']:14,.0f} {w['c_batch'] / w['python']:6.0f}")
    print()
    print(f"{'guest (MIPS)':38} {'nested':>14} {'shadow':>14}  ratio  shadow fills/s")
    for name, fn, iters, insns_per in (
        ("store-heavy loop (paging on)", store_heavy, int(2_000_000 * args.scale), 8),
        ("CR3 switch every 17 instructions", cr3_heavy, int(20_000 * args.scale), 2 * (2 + 16) + 2),
    ):
        res = {}
        for mmu in ("nested", "shadow"):
            fn(mmu, max(1, iters // 20))  # warm up (code generation, page cache)
            res[mmu] = fn(mmu, iters)
        insns = iters * insns_per
        mips = {m: insns / res[m][0] / 1e6 for m in res}
        fills = res["shadow"][1] / res["shadow"][0]
        print(f"{name:38} {mips['nested']:14.1f} {mips['shadow']:14.1f} {mips['shadow'] / mips['nested']:6.2f}"
              f"  {fills:14,.0f}")
    print("(ratio: shadow / nested, from this one run; fills/s: the shadow MMU's TLB fills over the run's time)")


if __name__ == "__main__":
    main()
