"""Real gdb against a replay: the crash walkthrough of the README, run in batch mode.

The crash guest loses a race on some boots (it depends on the RTC at boot):
a timer interrupt retires a buffer between the worker's load of the shared
pointer and its store through it, and the next tick dereferences the cleared
pointer.  gdb runs to the crash, watches the retired buffer's `next` field and
reverse-continues: it must land on the worker's racy store.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from guests.build import guest_path
from replay.debugtarget import ReplayTarget
from replay.gdbstub import start_gdbstub_thread
from replay.session import record
from replay.timetravel import TimeTravel

CRASHING_EPOCH = 1_767_225_600   # 2026-01-01 00:00:00: this boot loses the race
SURVIVING_EPOCH = 1_767_226_000
PF_HANDLER = 0x1000FF            # crash.asm pf_isr
RACY_STORE = 0x1000A9            # crash.asm worker: mov dword [esi + 4], 0
RETIRE_STORE = 0x1000E7          # crash.asm timer_isr: mov dword [eax + 4], stats_block
RETIRED_PTR = 0x100384           # crash.asm bss: retired

GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed (apt-get install gdb)")


def record_crash(tmp_path, epoch):
    path = str(guest_path("crash"))
    log = str(tmp_path / f"crash-{epoch}.vmlog")
    res, _ = record(path, open(path, "rb").read(), log, epoch=epoch)
    return log, res


def test_the_crash_depends_on_the_boot_time(tmp_path):
    _, crashed = record_crash(tmp_path, CRASHING_EPOCH)
    _, survived = record_crash(tmp_path, SURVIVING_EPOCH)
    assert crashed.reason.value == "exit" and crashed.status == 1
    assert survived.reason.value == "exit" and survived.status == 0


def run_gdb(port: int, commands: list[str]) -> str:
    args = [GDB, "-nx", "-batch", "-ex", "set architecture i386", "-ex", "set pagination off",
            "-ex", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        args += ["-ex", c]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    return p.stdout + p.stderr


def pcs(out: str) -> list[int]:
    return [int(x, 16) for x in re.findall(r"PC=(0x[0-9a-f]+|0)\b", out)]


@needs_gdb
def test_reverse_continue_lands_on_the_racy_store(tmp_path):
    log, res = record_crash(tmp_path, CRASHING_EPOCH)
    assert res.status == 1
    tt = TimeTravel(log, interval=1_000_000)
    stub = start_gdbstub_thread(ReplayTarget(tt))
    try:
        out = run_gdb(stub.port, [
            f"break *{PF_HANDLER:#x}",
            "continue",
            'printf "PC=%#x\\n", $pc',
            # the retired buffer's next pointer, which the ISR just dereferenced
            f"python gdb.execute('watch *(int*)%d' % (int(gdb.parse_and_eval('*(int*){RETIRED_PTR:#x}')) + 4))",
            "reverse-continue",
            'printf "PC=%#x\\n", $pc',
            "monitor icount",
            "reverse-continue",
            'printf "PC=%#x\\n", $pc',
            "stepi",
            'printf "PC=%#x\\n", $pc',
            "reverse-stepi",
            'printf "PC=%#x\\n", $pc',
        ])
    finally:
        stub.close()
    got = pcs(out)
    assert got[:2] == [PF_HANDLER, RACY_STORE], out
    assert got[2] == RETIRE_STORE, out       # before that: the ISR retiring the buffer
    assert got[4] == got[2], out             # stepi then reverse-stepi comes back exactly
    assert "icount" in out


@needs_gdb
def test_gdb_registers_and_memory_match_the_replay(tmp_path):
    log, _ = record_crash(tmp_path, CRASHING_EPOCH)
    tt = TimeTravel(log, interval=1_000_000)
    target = ReplayTarget(tt)
    tt.seek(200_000)
    regs = target.read_registers()
    stub = start_gdbstub_thread(target)
    try:
        out = run_gdb(stub.port, ['printf "EAX=%#x ESP=%#x PC=%#x\\n", $eax, $esp, $pc',
                                  "x/4xb 0x100000", "x/xw 0", "monitor icount"])
    finally:
        stub.close()
    m = re.search(r"EAX=(0x[0-9a-f]+|0) ESP=(0x[0-9a-f]+|0) PC=(0x[0-9a-f]+|0)", out)
    assert m, out
    assert int(m.group(1), 16) == regs["eax"] and int(m.group(2), 16) == regs["esp"]
    assert int(m.group(3), 16) == regs["eip"]
    assert "0x02\t0xb0\t0xad\t0x1b" in out.replace("  ", "\t")  # the Multiboot magic, little-endian
    assert "Cannot access memory at address 0x0" in out          # page 0 is unmapped: E14, the stub goes on
    assert "icount 200000" in out


# ---- a 64-bit guest ---------------------------------------------------------------
LM_ENTRY64 = 0x100200
LM_COUNTER = 0x300000


def long_mode_guest() -> bytes:
    """32-bit entry that builds page tables, enters long mode and runs a 64-bit store loop."""
    from tools.guestkit import asm

    gdt_at = 0x100100
    stub = asm(f"""
        mov esp, 0x90000
        mov edi, 0x70000
        mov ecx, 0xC00
        xor eax, eax
        rep stosd
        mov dword ptr [0x70000], 0x71003
        mov dword ptr [0x71000], 0x72003
        mov dword ptr [0x72000], 0x000083
        mov dword ptr [0x72008], 0x200083
        mov dword ptr [0x72010], 0x400083
        mov dword ptr [0x72018], 0x600083
        mov eax, 0x70000
        mov cr3, eax
        mov eax, cr4
        or eax, 0x20
        mov cr4, eax
        mov ecx, 0xC0000080
        rdmsr
        or eax, 0x100
        wrmsr
        lgdt [{gdt_at + 24:#x}]
        mov eax, cr0
        or eax, 0x80000000
        mov cr0, eax
        .byte 0xEA
        .long {LM_ENTRY64:#x}
        .word 0x08
    """, 32, 0x100000)  # keystone's `ljmp sel:off` is the 16-bit form: encode the 32-bit one
    gdt = bytes.fromhex("0000000000000000" "00000000009a2000" "0000000000920000")
    gdtr = (23).to_bytes(2, "little") + gdt_at.to_bytes(4, "little")
    code64 = asm(f"""
        mov ax, 0x10
        mov ds, ax
        mov ss, ax
        mov es, ax
        mov rsp, 0x90000
        mov rbx, {LM_COUNTER:#x}
        mov rcx, 20000
    top:
        mov rax, rcx
        imul rax, rax, 3
        mov [rbx], rax
        add qword ptr [rbx + 8], 1
        dec rcx
        jnz top
        mov dx, 0x501
        mov al, 0
        out dx, al
        hlt
    """, 64, LM_ENTRY64)
    image = bytearray(stub.ljust(0x100, b"\x90"))
    image += gdt + gdtr
    image = image.ljust(0x200, b"\0") + code64
    return bytes(image)


def record_long(tmp_path):
    img = tmp_path / "lm.bin"
    image = long_mode_guest()
    img.write_bytes(image)
    log = str(tmp_path / "lm.vmlog")
    res, m = record(str(img), image, log, boot_kind="flat")
    assert res.reason.value == "exit" and res.status == 0, res
    assert m.vcpu.long_mode
    return log, res


@needs_gdb
def test_gdb_reverse_in_a_64bit_guest(tmp_path):
    log, res = record_long(tmp_path)
    tt = TimeTravel(log, interval=20_000)
    target = ReplayTarget(tt, arch="x86-64")
    mid = res.icount // 2
    tt.seek(mid - 1)
    before = target.read_registers()
    tt.seek(mid)
    stub = start_gdbstub_thread(target)
    try:
        args = [GDB, "-nx", "-batch", "-ex", "set architecture i386:x86-64", "-ex", "set pagination off",
                "-ex", f"target remote 127.0.0.1:{stub.port}",
                "-ex", "reverse-stepi",
                "-ex", 'printf "RIP=%#lx RAX=%#lx RCX=%#lx\\n", $rip, $rax, $rcx',
                "-ex", f"watch *(long*){LM_COUNTER:#x}",
                "-ex", "reverse-continue",
                "-ex", 'printf "PC=%#lx\\n", $pc',
                "-ex", "x/i $pc"]
        out = subprocess.run(args, capture_output=True, text=True, timeout=120)
        out = out.stdout + out.stderr
    finally:
        stub.close()
    m = re.search(r"RIP=(0x[0-9a-f]+|0) RAX=(0x[0-9a-f]+|0) RCX=(0x[0-9a-f]+|0)", out)
    assert m, out
    assert int(m.group(1), 16) == before["rip"]
    assert int(m.group(2), 16) == before["rax"] and int(m.group(3), 16) == before["rcx"]
    pc = pcs(out)
    assert pc, out
    # the store `mov [rbx], rax` is the third instruction of the loop body
    assert "mov" in out and "(%rbx)" in out, out


@needs_gdb
def test_gdb_on_a_live_run(tmp_path):
    """`vmm run --gdb`: break, step, read and write registers, continue to the guest's exit."""
    from replay.debugtarget import LiveTarget
    from vmm.firmware.boot import boot
    from vmm.platform.pc import PcMachine

    path = str(guest_path("demo"))
    m = PcMachine()
    boot(m, open(path, "rb").read(), name=path, cmdline="demo")
    target = LiveTarget(m)
    stub = start_gdbstub_thread(target)
    try:
        out = run_gdb(stub.port, ["break *0x100070", "continue", 'printf "PC=%#x\\n", $pc', "stepi",
                                  'printf "PC=%#x\\n", $pc', "monitor icount", "delete", "continue"])
    finally:
        stub.close()
    assert pcs(out)[:2] == [0x100070, 0x100072], out
    assert "exited normally" in out or "exited with code 00" in out, out
    assert target.exited is not None and target.exited.status == 0


def test_committed_crash_recording_replays():
    """guests/recordings/crash.vmlog (the README walkthrough's) replays bit-exact from any clone."""
    from pathlib import Path

    from replay.session import Replayer

    log = Path(__file__).resolve().parent.parent / "guests" / "recordings" / "crash.vmlog"
    rp = Replayer(str(log))
    res = rp.run()
    assert res.reason.value == "exit" and res.status == 1
    assert b"CRASH: page fault at CR2=0x00000000" in bytes(rp.m.serial_out)
