"""Live-run speed with a gdb watchpoint set (`vmm run --gdb`, then `watch`).

The demo guest runs to its end on a live debug target (replay/debugtarget.py
LiveTarget, what `vmm run --gdb` serves) three times: with no watchpoint, with
one on a word the guest never touches, and with one on the kernel's tick
counter (written on every timer interrupt: the run stops at each write and
goes on, as gdb's `continue` does).  A watchpoint is a memory hook on the frame
the watched linear page maps to, plus a check before every instruction in C
(vmm/cpu/native/watch.c) that stops right after a hit.

    python benchmarks/watch.py
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def demo_target():
    from guests.build import guest_path
    from replay.debugtarget import LiveTarget
    from vmm.firmware.boot import boot
    from vmm.platform.pc import PcConfig, PcMachine

    path = str(guest_path("demo"))
    m = PcMachine(PcConfig())
    with open(path, "rb") as f:
        boot(m, f.read(), name=path, cmdline="demo")
    return m, LiveTarget(m)


def tick_counter() -> int:
    """The demo's `ticks` word, from its symbol file (guests/symbols.py)."""
    import struct

    from guests.build import guest_path, symbols_path

    data = symbols_path(guest_path("demo")).read_bytes()
    shoff, = struct.unpack_from("<I", data, 32)
    shnum, = struct.unpack_from("<H", data, 48)
    sections = [struct.unpack_from("<10I", data, shoff + 40 * i) for i in range(shnum)]
    symtab = next(s for s in sections if s[1] == 2)
    strtab = sections[symtab[6]]
    for off in range(symtab[4], symtab[4] + symtab[5], 16):
        name, value = struct.unpack_from("<II", data, off)
        end = data.index(b"\0", strtab[4] + name)
        if data[strtab[4] + name:end] == b"ticks":
            return value
    raise LookupError("no `ticks` in demo.sym")


def run(watch: int | None) -> tuple[float, int, int]:
    """(CPU seconds, instructions, watchpoint stops) of one demo run to its end."""
    from replay.target import WATCH_WRITE

    m, target = demo_target()
    if watch is not None:
        target.add_breakpoint(WATCH_WRITE, watch, 4)
    stops = 0
    c0 = time.process_time()
    while True:
        ev = target.resume(lambda: False)
        if ev.reason != "watchpoint":
            break
        stops += 1
    return time.process_time() - c0, m.icount, stops


def main() -> None:
    print("demo to its end on a live debug target (CPU seconds of this process)")
    for label, watch in (("no watchpoint", None), ("watch on an untouched word", 0x7F_F000),
                         ("watch on the tick counter", tick_counter())):
        cpu, insns, stops = run(watch)
        print(f"  {label:<28}: {insns / cpu / 1e6:6.2f} MIPS  ({insns:,} instructions, {cpu:.2f} s, "
              f"{stops} watchpoint stops)")


if __name__ == "__main__":
    main()
