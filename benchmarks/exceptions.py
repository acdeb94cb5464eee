"""Exceptions delivered per second, and `--trace` speed.

1. A flat 32-bit guest takes #UD (ud2) and #BP (int3) in a loop, each through
   its own IDT gate to a handler that returns with IRETD (the #UD handler
   steps EIP over the ud2).  Under the VMM the CPU core delivers them per the
   SDM in C inside Unicorn's hooks, without leaving the guest
   (vmm/cpu/native/deliver.c); the second vmm line turns that off
   (Machine.fast_delivery = False), so every exception is a VM exit delivered
   in Python (vmm/cpu/delivery.py), the reference.  A second guest takes a
   #PF per pass (paging on, a load from a not-present page), which the shadow
   MMU's fill raises: C delivers it between two entries into the guest
   (vmm_core_run).  The baseline is raw
   Unicorn on the same image with the Python binding's own hooks doing the
   least a VMM must (UC_HOOK_INSN_INVALID steps over ud2, UC_HOOK_INTR returns
   at once): no gate, no handler, no IRET, so it bounds what any delivery
   through Unicorn's hooks can reach.  The issue's aim: 200,000 per second.
2. `vmm run --trace` (one line per instruction on stderr, discarded here) on
   a straight loop and on the exception loop, against the same runs without
   --trace; a run that does not finish within --timeout is reported as such.

    python benchmarks/exceptions.py [--iters N] [--trace-iters N] [--timeout S]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import unicorn
from unicorn import x86_const as X

from tools.guestkit import asm

LOAD = 0x100000


# the end of a guest's loop, then exit 0 through the debug-exit port
LOOP_END = """
        dec ecx
        jnz top
        xor eax, eax
        mov dx, 0x501
        out dx, al
        hlt
"""


def gate(vector: int, label: str) -> str:
    """Code that writes a 32-bit interrupt gate (selector 0x10: the flat boot's code) at IDT 0x1000."""
    at = 0x1000 + vector * 8
    return f"""
        mov eax, {label}
        mov word ptr [{at:#x}], ax
        mov word ptr [{at + 2:#x}], 0x10
        mov word ptr [{at + 4:#x}], 0x8E00
        shr eax, 16
        mov word ptr [{at + 6:#x}], ax
    """


def exception_image(iters: int) -> bytes:
    return asm(f"""
        mov esp, 0x90000
        {gate(3, "on_bp")}
        {gate(6, "on_ud")}
        lidt [idtr]
        mov ecx, {iters}
    top:
        ud2
        int3
        {LOOP_END}
    on_ud:
        add dword ptr [esp], 2
        iretd
    on_bp:
        iretd
    idtr:
        .word 0x7ff
        .long 0x1000
    """, 32, LOAD)


def page_fault_image(iters: int) -> bytes:
    """Paging on (0-4 MiB identity mapped through one page table); the loop reads
    0x500000, whose page directory entry is not present: a #PF each pass, whose
    handler steps EIP over the 5-byte load."""
    return asm(f"""
        mov esp, 0x90000
        {gate(14, "on_pf")}
        lidt [idtr]
        mov edi, 0x81000
        mov eax, 3
        mov ecx, 1024
    fill:
        mov [edi], eax
        add eax, 0x1000
        add edi, 4
        dec ecx
        jnz fill
        mov dword ptr [0x80000], 0x81003
        mov eax, 0x80000
        mov cr3, eax
        mov eax, cr0
        or eax, 0x80000000
        mov cr0, eax
        mov ecx, {iters}
    top:
        mov eax, dword ptr [0x500000]
        {LOOP_END}
    on_pf:
        add esp, 4
        add dword ptr [esp], 5
        iretd
    idtr:
        .word 0x7ff
        .long 0x1000
    """, 32, LOAD)


def loop_image(iters: int) -> bytes:
    return asm(f"""
        mov ecx, {iters}
    top:
        add eax, ecx
        xor ebx, eax
        dec ecx
        jnz top
        xor eax, eax
        mov dx, 0x501
        out dx, al
    """, 32, LOAD)


def vmm_exceptions(iters: int, fast: bool = True, image_of=None, per_pass: int = 2) -> tuple[float, float, int, float]:
    """(exceptions per second, seconds, instructions, exceptions per CPU second) under the VMM."""
    from host.serial import NullBackend
    from replay.session import build_machine, machine_config

    image = (image_of or exception_image)(iters)
    cfg = machine_config(32 << 20, 1_767_225_600, "exceptions.bin", image, "flat", "", LOAD, "none")
    m = build_machine(cfg, image, NullBackend())
    m.fast_delivery = fast
    c0, t0 = time.process_time(), time.perf_counter()
    r = m.run()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert r.reason.value == "exit" and r.status == 0, r
    taken = m.exit_counts.get("exception", 0)
    assert taken >= per_pass * iters, (taken, iters)
    return per_pass * iters / dt, dt, r.icount, per_pass * iters / cpu


def raw_exceptions(iters: int) -> tuple[float, float, float]:
    """(exceptions per second, seconds, per CPU second) for raw Unicorn with minimal hooks on the same image."""
    image = exception_image(iters)
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    uc.mem_map(0, 4 << 20)
    uc.mem_write(LOAD, image)
    uc.reg_write(X.UC_X86_REG_ESP, 0x90000)
    seen = [0]

    def on_invalid(uc, _):
        uc.reg_write(X.UC_X86_REG_EIP, uc.reg_read(X.UC_X86_REG_EIP) + 2)
        seen[0] += 1
        return True

    def on_intr(uc, intno, _):
        seen[0] += 1

    uc.hook_add(unicorn.UC_HOOK_INSN_INVALID, on_invalid)
    uc.hook_add(unicorn.UC_HOOK_INTR, on_intr)
    uc.hook_add(unicorn.UC_HOOK_INSN, lambda uc, port, size, value, _: uc.emu_stop(), None, 1, 0, X.UC_X86_INS_OUT)
    c0, t0 = time.process_time(), time.perf_counter()
    uc.emu_start(LOAD, LOAD + len(image))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert seen[0] == 2 * iters, (seen[0], iters)
    return 2 * iters / dt, dt, 2 * iters / cpu


def cli_run(image: bytes, trace: bool, timeout: float) -> tuple[float | None, int]:
    """(seconds, stderr lines) for `vmm run IMAGE --boot flat` (None: it did not finish in time)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "guest.bin")
        with open(path, "wb") as f:
            f.write(image)
        cmd = [sys.executable, "-m", "tools.cli", "run", path, "--boot", "flat", "--serial", "none"]
        if trace:
            cmd.append("--trace")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        lines = 0
        try:
            deadline = t0 + timeout
            assert p.stderr is not None
            for _ in p.stderr:
                lines += 1
                if time.perf_counter() > deadline:
                    raise subprocess.TimeoutExpired(cmd, timeout)
            p.wait(max(0.1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            return None, lines
        return time.perf_counter() - t0, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20_000, help="loop passes (two exceptions each)")
    ap.add_argument("--trace-iters", type=int, default=20_000, help="loop passes for the --trace runs")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds a --trace run may take")
    args = ap.parse_args()

    raw, raw_dt, raw_cpu = raw_exceptions(args.iters)
    rate, dt, icount, cpu_rate = vmm_exceptions(args.iters)
    py_iters = max(1, args.iters // 10)
    py_rate, py_dt, py_icount, py_cpu = vmm_exceptions(py_iters, fast=False)
    print(f"exceptions delivered per second ({2 * args.iters:,} exceptions: #UD and #BP through IDT gates;")
    print("  per wall-clock second, and per second of this process's CPU time, which a busy machine skews less)")
    print(f"  raw Unicorn, minimal Python hooks, no delivery : {raw:>12,.0f} /s  ({raw_dt:.2f} s; "
          f"{raw_cpu:,.0f} /CPU s)")
    print(f"  vmm, SDM delivery in C in the hooks (default)  : {rate:>12,.0f} /s  ({dt:.2f} s; {cpu_rate:,.0f} /CPU s; "
          f"{icount:,} instructions)")
    print(f"  vmm, VM exit + SDM delivery in Python          : {py_rate:>12,.0f} /s  ({py_dt:.2f} s; "
          f"{py_cpu:,.0f} /CPU s; {2 * py_iters:,} exceptions)")
    print(f"  vmm / raw: {rate / raw:.2f}; the issue's aim is 200,000 /s: {'met' if rate >= 200_000 else 'not met'}")
    pf_rate, pf_dt, _, pf_cpu = vmm_exceptions(args.iters, image_of=page_fault_image, per_pass=1)
    pp_rate, pp_dt, _, pp_cpu = vmm_exceptions(py_iters, fast=False, image_of=page_fault_image, per_pass=1)
    print(f"page faults ({args.iters:,}: a load from a page whose directory entry is not present, the shadow MMU)")
    print(f"  vmm, #PF delivered in C between two entries : {pf_rate:>12,.0f} /s  ({pf_dt:.2f} s; {pf_cpu:,.0f} /CPU s)")
    print(f"  vmm, VM exit + SDM delivery in Python        : {pp_rate:>12,.0f} /s  ({pp_dt:.2f} s; {pp_cpu:,.0f} /CPU s; "
          f"{py_iters:,} faults)")

    print(f"\n`vmm run --trace` ({args.trace_iters:,} loop passes, process start included, stderr discarded)")
    for name, image, insns in (("straight loop", loop_image(args.trace_iters), 4 * args.trace_iters + 5),
                               ("#UD/#BP loop", exception_image(args.trace_iters), 6 * args.trace_iters + 30)):
        plain, _ = cli_run(image, False, args.timeout)
        traced, lines = cli_run(image, True, args.timeout)
        p = f"{plain:.2f} s" if plain is not None else f"did not finish in {args.timeout:.0f} s"
        if traced is None:
            t = f"did not finish in {args.timeout:.0f} s ({lines:,} lines by then)"
        else:
            t = f"{traced:.2f} s, {lines:,} lines, {lines / traced:,.0f} lines/s"
        print(f"  {name:<14} (~{insns:,} instructions): without --trace {p}; with --trace {t}")


if __name__ == "__main__":
    main()
