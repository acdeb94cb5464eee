"""Shared pieces of the machine-model acceptance tests (issue 9): flat
multi-vCPU guests started by the test-harness entry convention, guestkit
guests on either MMU, and the final-state fingerprints the tests compare.

The flat layout: the image is loaded at LOAD (1 MiB) and the BSP starts there
in flat 32-bit protected mode; vCPU k starts at ``entries`` in the same state.
SHARED is a page of shared variables, above the image.
"""
from __future__ import annotations

import hashlib

from devices.legacy.debugports import DebugExit
from host.serial import NullBackend
from replay.session import build_machine, machine_config, state_digest
from tools import guestkit
from tools.guestkit import asm
from vmm.machine import Machine

LOAD = 0x100000
AP_CODE = LOAD + 0x1000          # where the second vCPU starts
SHARED = 0x200000                # unlocked counter +0, locked counter +4, flags from +0x10
UNLOCKED, LOCKED = SHARED, SHARED + 4
DONE0, DONE1 = SHARED + 0x10, SHARED + 0x11
EPOCH = 1_767_225_600
EXIT0 = "mov dx, 0x501\nmov al, 0\nout dx, al\n"


def two_cpu_image(bsp: str, ap: str) -> bytes:
    """A flat image: ``bsp`` at LOAD, ``ap`` at AP_CODE (32-bit code)."""
    b = asm(bsp, 32, LOAD)
    a = asm(ap, 32, AP_CODE)
    assert len(b) <= AP_CODE - LOAD, "the BSP code overlaps the AP's"
    return b.ljust(AP_CODE - LOAD, b"\x90") + a


def race_image(n0: int, n1: int) -> bytes:
    """Two vCPUs each add n_k to an unlocked and to a locked counter; the BSP
    waits for the AP's done flag and exits with status 0; the AP halts with IF=0."""
    def counting(k: int, n: int, esp: int) -> str:
        return f"""
        mov esp, {esp:#x}
        mov ecx, {n}
    l{k}: mov eax, [{UNLOCKED:#x}]
        inc eax
        mov [{UNLOCKED:#x}], eax
        lock inc dword ptr [{LOCKED:#x}]
        dec ecx
        jnz l{k}
        mov byte ptr [{DONE0 + k:#x}], 1
        """
    bsp = counting(0, n0, 0x90000) + f"w0: cmp byte ptr [{DONE1:#x}], 1\njne w0\n" + EXIT0
    ap = counting(1, n1, 0x80000) + "cli\nh1: hlt\njmp h1\n"
    return two_cpu_image(bsp, ap)


def caller_ap(fn: int, old: int, ran: int, flag: int, after: int, done: int) -> str:
    """AP code that keeps calling ``fn``, counting the calls that return ``old`` at ``ran``,
    until the byte at ``flag`` is 1 or a call returns something else; it stores that other
    result, or what one more call returns once the flag is set, at ``after``; then it sets
    ``done`` and halts with IF=0.  (Code another agent rewrote is seen at ``after``; a stale
    translation would store ``old`` there.)"""
    return f"""
        mov esp, 0x80000
        xor edi, edi
    l1: call {fn:#x}
        cmp eax, {old:#x}
        jne fin
        inc edi
        mov [{ran:#x}], edi
        cmp byte ptr [{flag:#x}], 1
        jne l1
        call {fn:#x}
    fin:
        mov [{after:#x}], eax
        mov byte ptr [{done:#x}], 1
        cli
    h1: hlt
        jmp h1
    """


def flat_config(image: bytes, name: str = "smp.bin", vcpus: int = 2, quantum: int | None = None,
                mmu: str = "shadow", entries=((1, AP_CODE),)) -> dict:
    return machine_config(32 << 20, EPOCH, name, image, "flat", name, LOAD, "none", vcpus=vcpus,
                          quantum=quantum, mmu=mmu, entries=[tuple(e) for e in entries] if vcpus > 1 else [])


def flat_machine(image: bytes, **kw):
    """A PcMachine booted from a flat image with the harness's vCPU entries."""
    return build_machine(flat_config(image, **kw), image, NullBackend())


def fingerprint(m) -> tuple:
    """Everything a run's end is compared on: per-vCPU icounts and registers,
    a hash of all RAM, the digest replay checks, and the console output."""
    regs = tuple((v.icount, tuple(sorted(v.snapshot_regs().items()))) for v in m.vcpus)
    ram = hashlib.sha256(m.memory.read(0, m.memory.size)).hexdigest()
    return regs, ram, state_digest(m), bytes(getattr(m, "serial_out", b""))


def counters(m) -> tuple[int, int]:
    return m.memory.read_u32(UNLOCKED), m.memory.read_u32(LOCKED)


class MmuGuest(guestkit.Guest):
    """guestkit's Guest on either MMU (``mmu="shadow"|"nested"``)."""

    def __init__(self, mem: int = 4 << 20, mmu: str = "shadow"):
        self.m = Machine(mem, mmu=mmu)
        self.exit_status = None
        self.m.add_device(DebugExit(self._exit))
        self.cpu = self.m.vcpu
        self.gdt = {}


class StatelessDevice:
    """A device-protocol base for the test devices: no state worth saving."""

    VERSION = 1

    def reset(self) -> None:
        pass

    def save_state(self) -> dict:
        return {"kind": self.name, "version": 1}

    def load_state(self, st: dict) -> None:
        pass


class ClockMachine:
    """What a boundary binds to, for a device test with no CPU: vCPU 0 current, and the
    icount the clock's tick."""

    def __init__(self, clock):
        self.clock = clock
        self.current = type("V", (), {"id": 0})()

    @property
    def icount(self):
        return self.clock.now()
