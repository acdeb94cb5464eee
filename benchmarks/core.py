"""Core figures, each side by side with a baseline measured in the same run.

1. Guest MIPS under the VMM (exact clock, all hooks) against raw Unicorn (no
   hooks at all) on the same loop of 5-instruction blocks; and on a loop of
   21-instruction blocks.
2. Port-I/O exits per second through the VMM's port bus (OUT to the POST
   code port, a real device), against raw Unicorn with the Python binding's
   own OUT hook doing nothing.

    python benchmarks/core.py [--seconds S]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import unicorn
from unicorn import x86_const as X

from devices.legacy.debugports import PostCode
from tools.guestkit import Guest, asm

LOOP5 = "L: add eax, 1; add ebx, 2; xor esi, eax; dec ecx; jnz L"
LOOP21 = "L: " + "; ".join((["add eax, 1", "add ebx, eax", "xor esi, ebx", "add edi, 3"] * 5)[:19]) + "; dec ecx; jnz L"
IO_LOOP = "L: out 0x80, al; dec ecx; jnz L"


def raw_unicorn(body: str, iters: int, insns_per_iter: int, io_hook: bool = False) -> tuple[float, float]:
    code = asm(f"mov ecx, {iters}; " + body + "; hlt", 32, 0x10000)
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    uc.mem_map(0, 4 << 20)
    uc.mem_write(0x10000, code)
    uc.reg_write(X.UC_X86_REG_ESP, 0x70000)
    if io_hook:
        uc.hook_add(unicorn.UC_HOOK_INSN, lambda uc, port, size, value, ud: None, None, 1, 0, X.UC_X86_INS_OUT)
    t0 = time.perf_counter()
    uc.emu_start(0x10000, 0x10000 + len(code) - 1)
    dt = time.perf_counter() - t0
    return iters * insns_per_iter / dt, dt


def vmm(body: str, iters: int, insns_per_iter: int) -> tuple[float, float, int]:
    g = Guest()
    g.m.add_device(PostCode())
    g.protected_mode(f"mov ecx, {iters}; " + body + "; mov dx, 0x501; out dx, al")
    g.cpu.invalidate_code()
    t0 = time.perf_counter()
    r = g.m.run()
    dt = time.perf_counter() - t0
    assert r.reason.value == "exit", r
    return iters * insns_per_iter / dt, dt, g.cpu.icount


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the iteration counts")
    a = ap.parse_args()
    n5 = int(20_000_000 * a.scale)
    n21 = int(5_000_000 * a.scale)
    nio = int(300_000 * a.scale)
    print(f"{'workload':34} {'raw Unicorn':>14} {'vmm':>14} {'ratio':>7}")
    raw, _ = raw_unicorn(LOOP5, n5, 5)
    ours, _, _ = vmm(LOOP5, n5, 5)
    print(f"{'5-insn blocks (MIPS)':34} {raw / 1e6:14.1f} {ours / 1e6:14.1f} {ours / raw:7.2f}")
    raw, _ = raw_unicorn(LOOP21, n21, 21)
    ours, _, _ = vmm(LOOP21, n21, 21)
    print(f"{'21-insn blocks (MIPS)':34} {raw / 1e6:14.1f} {ours / 1e6:14.1f} {ours / raw:7.2f}")
    raw, _ = raw_unicorn(IO_LOOP, nio, 1, io_hook=True)
    ours, _, _ = vmm(IO_LOOP, nio, 1)
    print(f"{'port I/O exits per second':34} {raw:14,.0f} {ours:14,.0f} {ours / raw:7.2f}")
    print("(raw Unicorn: no hooks for MIPS; the Python binding's no-op OUT hook for I/O."
          " vmm: exact icount, every hook, the port bus and the POST-code device.)")


if __name__ == "__main__":
    main()
