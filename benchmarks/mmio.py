"""MMIO exits per second, side by side with port I/O and raw Unicorn, measured
in the same run; each figure is the best of --repeat runs (the machine is
shared).

1. A guest loop of loads, and one of stores, to a trivial MMIO device (reads
   return 0, writes are dropped) through the VMM: the C MMIO callbacks, the
   MMIO bus, the device; in both MMU modes.  Issue 9 aims at >= 500,000
   exits/s.
2. The same loop with port I/O (IN / OUT to the same device on a port).
3. Raw Unicorn's mmio_map with Python callbacks doing nothing, and its OUT/IN
   hook: the floor any Python device model pays.
4. The exact-stop path: the device asks for a stop on every write
   (``engine.request_stop()``, what a device does through an IRQ line when
   it raises an interrupt), so the vCPU stops right after the store and the
   run loop sees every access.
5. Where the time of one MMIO access goes: each Python layer of the dispatch
   timed alone, and (--profile) cProfile of the plain and exact-stop loops.

    python benchmarks/mmio.py [--scale S] [--repeat N] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import unicorn
from smp import TcgStats, interleaved
from unicorn import x86_const as X

from devices.legacy.debugports import DebugExit
from tools.guestkit import Guest, asm
from vmm.cpu.engine import TCG_BUFFER, ffi
from vmm.machine import Machine

BASE = 0xFEB0_0000       # above RAM: a claim inside RAM is not routed (RAM wins)
PORT = 0xE0
AIM = 500_000


class NullDevice:
    """A device that does nothing, on an MMIO page and a port."""

    name = "null"

    def __init__(self, engine=None):
        self.io_ranges = [(PORT, 4)]
        self.stop_engine = engine    # set: ask for a stop after every write (the exact-stop path)
        self.writes = 0

    def mmio_read(self, offset: int, size: int) -> int:
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if self.stop_engine is not None:
            self.writes += 1
            self.stop_engine.request_stop()

    def io_read(self, port: int, size: int) -> int:
        return 0

    def io_write(self, port: int, size: int, value: int) -> None:
        pass

    def reset(self) -> None:
        pass


class MmuGuest(Guest):
    """guestkit's Guest with the MMU mode chosen."""

    def __init__(self, mmu: str, mem: int = 4 << 20):
        self.m = Machine(mem, mmu=mmu)
        self.exit_status = None
        self.m.add_device(DebugExit(self._exit))
        self.cpu = self.m.vcpu
        self.gdt = {}


LOOPS = {
    "load": f"mov eax, dword ptr [{BASE:#x}]",
    "store": f"mov dword ptr [{BASE:#x}], eax",
    "in": f"in eax, {PORT:#x}",
    "out": f"out {PORT:#x}, eax",
}


def build(kind: str, n: int, mmu: str = "shadow", exact: bool = False) -> tuple[MmuGuest, NullDevice]:
    g = MmuGuest(mmu)
    dev = NullDevice(g.m.engine if exact else None)
    g.m.add_device(dev)
    g.m.mmio.register(dev, BASE, 0x1000)
    g.protected_mode(f"mov ecx, {n}; L: {LOOPS[kind]}; dec ecx; jnz L; mov dx, 0x501; out dx, al")
    return g, dev


def vmm_rate(kind: str, n: int, mmu: str = "shadow", exact: bool = False) -> tuple[float, dict]:
    g, _ = build(kind, n, mmu, exact)
    e = g.m.engine
    tcg = TcgStats(e.uc, TCG_BUFFER)
    inv0, code0 = tcg.invalidations(), tcg.code_bytes()
    t = time.perf_counter()
    r = g.m.run()
    dt = time.perf_counter() - t
    if r.reason.value != "exit":
        raise RuntimeError(f"the {kind} loop stopped early: {r}")
    if kind in ("load", "store") and e.mmio_accesses != n:
        raise RuntimeError(f"{e.mmio_accesses} MMIO accesses reached the device, not {n}")
    return dt, {"rate": n / dt, "entries": e.exits, "exact_stops": e.mmio_exact_stops,
                "io_exits": r.counts.get("io", 0),
                "tb_invalidations": None if inv0 is None else tcg.invalidations() - inv0,
                "code_bytes": None if code0 is None else tcg.code_bytes() - code0}


def raw_rate(kind: str, n: int) -> tuple[float, dict]:
    body = LOOPS[kind].replace(hex(BASE), hex(0x100000))
    code = asm(f"mov ecx, {n}; L: {body}; dec ecx; jnz L; hlt", 32, 0x10000)
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    uc.mem_map(0, 1 << 20)
    uc.mem_write(0x10000, code)
    uc.mmio_map(0x100000, 0x1000, lambda uc, off, size, ud: 0, None,
                lambda uc, off, size, value, ud: None, None)
    if kind == "out":
        uc.hook_add(unicorn.UC_HOOK_INSN, lambda uc, port, size, value, ud: None, None, 1, 0,
                    X.UC_X86_INS_OUT)
    elif kind == "in":
        uc.hook_add(unicorn.UC_HOOK_INSN, lambda uc, port, size, ud: 0, None, 1, 0, X.UC_X86_INS_IN)
    t = time.perf_counter()
    uc.emu_start(0x10000, 0x10000 + len(code) - 1)
    dt = time.perf_counter() - t
    return dt, {"rate": n / dt}


def layers(repeat: int, n: int = 100_000) -> list[tuple[str, float]]:
    """Microseconds per write of each Python layer of the VMM's MMIO dispatch, timed
    alone (outermost first; each includes the ones below it; the cost of the
    timing loop itself is subtracted; best of ``repeat`` rounds, the layers
    taking turns)."""
    g, dev = build("store", 1)
    m, e = g.m, g.m.engine
    res = ffi.new("uint64_t *")
    if e.loaded is None:
        e.loaded = m.vcpus[0]    # as during a run: the vCPU whose accesses these are
    fns = {
        "empty": lambda: None,
        "Engine._on_mmio (what the C callback calls, via cffi)": lambda: e._on_mmio(1, BASE, 4, 0, res),
        "MmioBus.access (the page's claim, width check, call)": lambda: m.mmio.access(1, BASE, 4, 0, 0),
        "the device's mmio_write": lambda: dev.mmio_write(0, 4, 0),
    }

    def timer(fn):
        def once():
            t = time.perf_counter()
            for _ in range(n):
                fn()
            return time.perf_counter() - t, None
        return once

    got = interleaved({k: timer(fn) for k, fn in fns.items()}, repeat)
    us = {k: v[0] / n * 1e6 for k, v in got.items()}
    return [(k, us[k] - us["empty"]) for k in fns if k != "empty"]


def profile(kind: str, n: int, exact: bool, top: int = 14) -> str:
    g, _ = build(kind, n, exact=exact)
    pr = cProfile.Profile()
    pr.enable()
    g.m.run()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return "\n".join(lines[:1] + lines[start:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the access counts")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs per figure (default 3)")
    ap.add_argument("--profile", action="store_true",
                    help="also print cProfile of the plain and exact-stop loops")
    a = ap.parse_args()
    n = int(200_000 * a.scale)
    n_exact = int(20_000 * a.scale)
    rep = max(1, a.repeat)

    print(f"{'exits per second (best of ' + str(rep) + ')':44} {'vmm shadow':>12} {'vmm nested':>12} "
          f"{'raw Unicorn':>12} {'vmm/raw':>8}")
    fns = {}
    for kind in ("load", "store"):
        fns[kind, "shadow"] = lambda kind=kind: vmm_rate(kind, n, "shadow")
        fns[kind, "nested"] = lambda kind=kind: vmm_rate(kind, n, "nested")
    for kind in ("in", "out"):
        fns[kind, "shadow"] = lambda kind=kind: vmm_rate(kind, n, "shadow")
    for kind in ("load", "store", "in", "out"):
        fns[kind, "raw"] = lambda kind=kind: raw_rate(kind, n)
    for mmu in ("shadow", "nested"):
        fns["exact", mmu] = lambda mmu=mmu: vmm_rate("store", n_exact, mmu, exact=True)
    got = interleaved(fns, rep)
    r = {k: v[1]["rate"] for k, v in got.items()}
    rates = {k: (r[k, "shadow"], r.get((k, "nested")), r[k, "raw"]) for k in ("load", "store", "in", "out")}
    for kind, label in (("load", "MMIO load  (mov eax, [mmio])"), ("store", "MMIO store (mov [mmio], eax)"),
                        ("in", "port IN  (in eax, port)"), ("out", "port OUT (out port, eax)")):
        sh, ne, raw = rates[kind]
        print(f"{label:44} {sh:12,.0f} {'' if ne is None else f'{ne:,.0f}':>12} {raw:12,.0f} {sh / raw:8.2f}")
    ex = {mmu: (r["exact", mmu], got["exact", mmu][1]) for mmu in ("shadow", "nested")}
    info = ex["shadow"][1]
    print(f"{'MMIO store, exact stop after every write':44} {ex['shadow'][0]:12,.0f} "
          f"{ex['nested'][0]:12,.0f} "
          f"{'':>12} {'':>8}")
    inv, cb = info["tb_invalidations"], info["code_bytes"]
    inv_w = "n/a" if inv is None else f"{inv / n_exact:.1f}"
    cb_w = "n/a" if cb is None else f"{cb / n_exact:,.0f}"
    print(f"(exact stop: {info['entries'] / n_exact:.1f} engine entries, "
          f"{info['exact_stops'] / n_exact:.1f} re-executed instructions, {inv_w} blocks invalidated and "
          f"{cb_w} bytes of host code translated per write; {1e6 / ex['shadow'][0]:.1f} us per write "
          f"against {1e6 / rates['store'][0]:.2f} us without the stop)")
    print("(raw Unicorn: the Python binding's mmio_map callbacks / IN-OUT hooks doing nothing; "
          "vmm: C callbacks, cffi, Engine, MmioBus or IoBus, the device)")

    print("\nwhere one MMIO write's time goes (each layer timed alone, includes those below it):")
    lay = layers(max(rep, 5))
    full = 1e6 / rates["store"][0]
    print(f"  {full:6.3f} us  the whole exit, guest loop to device and back")
    for name, us in lay:
        print(f"  {us:6.3f} us  {name}")
    print(f"  (so {full - lay[0][1]:.2f} us in Unicorn's MMIO dispatch, the C callback, the cffi call "
          f"and the loop's 3 instructions; {lay[0][1] - lay[-1][1]:.2f} us in the Python layers "
          "above the device)")

    if a.profile:
        print("\ncProfile, plain MMIO stores:")
        print(profile("store", n, False))
        print("\ncProfile, MMIO stores with an exact stop after each:")
        print(profile("store", n_exact, True))

    low = min(rates["load"][0], rates["store"][0])
    print(f"\nVERDICT: MMIO exits {'meet' if low >= AIM else 'fall short of'} the {AIM:,}/s aim: "
          f"{rates['load'][0]:,.0f} loads/s and {rates['store'][0]:,.0f} stores/s (shadow), "
          f"{rates['load'][1]:,.0f} / {rates['store'][1]:,.0f} (nested); port I/O "
          f"{rates['out'][0]:,.0f} OUT/s; raw Unicorn's Python callback floor {rates['store'][2]:,.0f}/s.  "
          f"An MMIO write that stops the vCPU exactly costs {1e6 / ex['shadow'][0]:.0f} us "
          f"({ex['shadow'][0]:,.0f}/s).")

if __name__ == "__main__":
    main()
