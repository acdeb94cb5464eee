"""Build tiny test guests directly in a Machine: descriptor tables, paging,
and CPU state for real, protected and long mode, with code assembled by
keystone.  Used by the conformance tests and benchmarks; a guest built this
way runs on the real vCPU through the real run loop.

Layout (guest-physical, identity mapped when paging is on):
  0x1000 GDT   0x2000 IDT   0x3000 TSS   0x4000 page tables (0x4000-0x9FFF)
  0x10000 code   0x20000 ring-0 handlers   0x30000 user code
  0x70000 ring-0 stack top   0x80000 ring-3 stack top   0x90000 IST stack top
"""
from __future__ import annotations

import struct

from keystone import KS_ARCH_X86, KS_MODE_16, KS_MODE_32, KS_MODE_64, Ks

from devices.legacy.debugports import DebugExit
from vmm.machine import Machine
from vmm.cpu.vcpu import CS, DS, ES, FS, GS, SS

GDT, IDT, TSS, PT = 0x1000, 0x2000, 0x3000, 0x4000
CODE, HANDLERS, USER = 0x10000, 0x20000, 0x30000
STACK0, STACK3, STACK_IST = 0x70000, 0x80000, 0x90000

# selectors of the standard GDT
KCODE32, KDATA32, UCODE32, UDATA32, KCODE64, UCODE64, KCODE16, KDATA16, TSS_SEL = (
    0x08, 0x10, 0x1B, 0x23, 0x28, 0x33, 0x38, 0x40, 0x48)

_KS = {16: Ks(KS_ARCH_X86, KS_MODE_16), 32: Ks(KS_ARCH_X86, KS_MODE_32), 64: Ks(KS_ARCH_X86, KS_MODE_64)}


class AsmError(ValueError):
    """Keystone could not assemble the source (it would otherwise give empty bytes)."""


def asm(src: str, bits: int = 32, addr: int = 0) -> bytes:
    enc, _count = _KS[bits].asm(src, addr)
    if not enc and src.strip():
        raise AsmError(f"keystone assembled nothing from: {src[:80]!r}")
    return bytes(enc or b"")


def seg_desc(base: int, limit: int, access: int, flags: int) -> int:
    """access: P|DPL|S|type byte; flags: G|D/B|L|AVL nibble."""
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40)
            | (((limit >> 16) & 0xF) << 48) | (flags << 52) | (((base >> 24) & 0xFF) << 56))


def gate32(selector: int, offset: int, gtype: int, dpl: int, present: bool = True) -> int:
    return ((offset & 0xFFFF) | (selector << 16) | ((gtype | (dpl << 5) | (0x80 if present else 0)) << 40)
            | ((offset >> 16) << 48))


def gate64(selector: int, offset: int, gtype: int, dpl: int, ist: int = 0, present: bool = True) -> bytes:
    lo = ((offset & 0xFFFF) | (selector << 16) | (ist << 32)
          | ((gtype | (dpl << 5) | (0x80 if present else 0)) << 40) | (((offset >> 16) & 0xFFFF) << 48))
    return struct.pack("<QQ", lo, offset >> 32)


def flags_of(desc: int) -> int:
    return (desc >> 32) & 0x00F0FF00


class Guest:
    """A machine with the standard test layout and a debug-exit port."""

    def __init__(self, mem: int = 4 << 20, mmu: str = "shadow"):
        self.m = Machine(mem, mmu=mmu)
        self.exit_status: int | None = None
        self.m.add_device(DebugExit(self._exit))
        self.cpu = self.m.vcpu
        self.gdt: dict[int, int] = {}

    def _exit(self, v: int) -> None:
        self.exit_status = v
        self.m.request_exit(v)

    # -- memory helpers ---------------------------------------------------
    def put(self, addr: int, data: bytes) -> None:
        self.m.memory.write(addr, data)

    def u32(self, addr: int) -> int:
        return self.m.memory.read_u32(addr)

    def u64(self, addr: int) -> int:
        return self.m.memory.read_u64(addr)

    # -- descriptor tables ------------------------------------------------
    def standard_gdt(self, tss_limit: int = 0x67) -> None:
        g = {
            KCODE32: seg_desc(0, 0xFFFFF, 0x9B, 0xC),
            KDATA32: seg_desc(0, 0xFFFFF, 0x93, 0xC),
            UCODE32 & ~3: seg_desc(0, 0xFFFFF, 0xFB, 0xC),
            UDATA32 & ~3: seg_desc(0, 0xFFFFF, 0xF3, 0xC),
            TSS_SEL: seg_desc(TSS, tss_limit, 0x89, 0x0),
            KCODE64: seg_desc(0, 0xFFFFF, 0x9B, 0xA),
            UCODE64 & ~3: seg_desc(0, 0xFFFFF, 0xFB, 0xA),
            KCODE16: seg_desc(0, 0xFFFF, 0x9B, 0x0),
            KDATA16: seg_desc(0, 0xFFFF, 0x93, 0x0),
        }
        self.gdt = g
        for sel, d in g.items():
            self.put(GDT + sel, struct.pack("<Q", d))
        self.m.vcpu.set_gdtr(GDT, 0x7F)

    def set_idt(self, limit: int) -> None:
        self.m.vcpu.set_idtr(IDT, limit)

    def load(self, seg: int, sel: int) -> None:
        d = self.gdt[sel & ~3]
        base = ((d >> 16) & 0xFFFFFF) | (((d >> 56) & 0xFF) << 24)
        limit = (d & 0xFFFF) | (((d >> 48) & 0xF) << 16)
        if (d >> 55) & 1:
            limit = (limit << 12) | 0xFFF
        self.cpu.load_seg(seg, sel, base, limit, flags_of(d))

    def load_tr(self) -> None:
        d = self.gdt[TSS_SEL]
        # as LTR leaves it in QEMU: busy in the GDT, available (9) in the cache
        self.put(GDT + TSS_SEL + 5, bytes([0x8B]))
        self.cpu.set_sys_seg("tr", TSS_SEL, TSS, d & 0xFFFF, flags_of(d))

    # -- modes ---------------------------------------------------------------
    def real_mode(self, code: str, at: int = 0x7C00) -> None:
        self.cpu.reset(0, at)
        self.put(at, asm(code, 16, at))
        self.cpu.rsp = 0x7000

    def protected_mode(self, code: str, ring: int = 0, paging: bool = False, at: int | None = None) -> None:
        cpu = self.cpu
        cpu.reset(0, 0)
        self.standard_gdt()
        self.set_idt(256 * 8 - 1)
        if paging:
            self._paging32()
        cpu.set_reg("cr0", cpu.cr0 | 1 | (0x8000_0000 if paging else 0) | (1 << 16))
        self.load(CS, KCODE32)
        for s in (SS, DS, ES, FS, GS):
            self.load(s, KDATA32)
        # TSS: ESP0/SS0
        tss = bytearray(0x68)
        struct.pack_into("<IIH", tss, 4, STACK0, KDATA32, 0)
        struct.pack_into("<H", tss, 0x66, 0x68)
        self.put(TSS, bytes(tss))
        self.load_tr()
        at = (USER if ring == 3 else CODE) if at is None else at
        self.put(at, asm(code, 32, at))
        cpu.rip = at
        if ring == 3:
            self.load(CS, UCODE32)
            for s in (SS, DS, ES, FS, GS):
                self.load(s, UDATA32)
            cpu.rsp = STACK3
        else:
            cpu.rsp = STACK0
        cpu.invalidate_code()

    def _paging32(self) -> None:
        # identity map 0-4 MiB with 4 KiB pages, user accessible and writable
        pd = bytearray(4096)
        struct.pack_into("<I", pd, 0, (PT + 0x1000) | 7)
        pt = bytearray(4096)
        for i in range(1024):
            struct.pack_into("<I", pt, 4 * i, (i << 12) | 7)
        self.put(PT, bytes(pd))
        self.put(PT + 0x1000, bytes(pt))
        self.cpu.set_reg("cr3", PT)

    def long_mode(self, code: str, ring: int = 0, at: int | None = None) -> None:
        cpu = self.cpu
        cpu.reset(0, 0)
        self.standard_gdt()
        self.set_idt(256 * 16 - 1)
        # identity map the first 4 MiB with 2 MiB pages, user accessible
        pml4 = struct.pack("<Q", (PT + 0x1000) | 7).ljust(4096, b"\0")
        pdpt = struct.pack("<Q", (PT + 0x2000) | 7).ljust(4096, b"\0")
        pd = struct.pack("<QQ", 0x0 | 0x87, 0x200000 | 0x87).ljust(4096, b"\0")
        self.put(PT, pml4)
        self.put(PT + 0x1000, pdpt)
        self.put(PT + 0x2000, pd)
        cpu.set_reg("cr3", PT)
        cpu.set_reg("cr4", cpu.cr4 | (1 << 5))
        cpu.set_msr(0xC000_0080, (1 << 8) | (1 << 0) | (1 << 11))  # LME, SCE, NXE
        cpu.set_reg("cr0", cpu.cr0 | 1 | (1 << 31) | (1 << 16))
        self.load(CS, KCODE64)
        for s in (SS, DS, ES, FS, GS):
            self.load(s, KDATA32)
        tss = bytearray(0x68)
        struct.pack_into("<Q", tss, 4, STACK0)  # RSP0
        struct.pack_into("<Q", tss, 0x24, STACK_IST)  # IST1
        struct.pack_into("<H", tss, 0x66, 0x68)
        self.put(TSS, bytes(tss))
        self.put(GDT + TSS_SEL + 8, b"\0" * 8)  # upper half of the 16-byte TSS descriptor
        self.load_tr()
        at = (USER if ring == 3 else CODE) if at is None else at
        self.put(at, asm(code, 64, at))
        cpu.rip = at
        if ring == 3:
            self.load(CS, UCODE64)
            self.load(SS, UDATA32)
            cpu.rsp = STACK3
        else:
            cpu.rsp = STACK0
        cpu.invalidate_code()

    # -- IDT entries --------------------------------------------------------------
    def idt32(self, vector: int, handler: str | None = None, gtype: int = 0xE, dpl: int = 0,
              selector: int = KCODE32, present: bool = True, at: int | None = None) -> int:
        at = HANDLERS + vector * 0x100 if at is None else at
        if handler is not None:
            self.put(at, asm(handler, 32, at))
        self.put(IDT + vector * 8, struct.pack("<Q", gate32(selector, at, gtype, dpl, present)))
        return at

    def idt64(self, vector: int, handler: str | None = None, gtype: int = 0xE, dpl: int = 0, ist: int = 0,
              selector: int = KCODE64, present: bool = True, at: int | None = None) -> int:
        at = HANDLERS + vector * 0x100 if at is None else at
        if handler is not None:
            self.put(at, asm(handler, 64, at))
        self.put(IDT + vector * 16, gate64(selector, at, gtype, dpl, ist, present))
        return at

    def ivt(self, vector: int, handler: str, seg: int = 0, off: int | None = None) -> int:
        off = 0x500 + vector * 0x20 if off is None else off
        self.put(seg * 16 + off, asm(handler, 16, off))
        self.put(vector * 4, struct.pack("<HH", off, seg))
        return off

    def run(self, max_instructions: int = 1_000_000):
        self.cpu.invalidate_code()
        return self.m.run(max_instructions)
