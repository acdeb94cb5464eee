"""A virtual CPU: its architectural state, its interrupt inputs, its clock.

A machine has one or more vCPUs sharing one engine (vmm/cpu/engine.py, the
only module that touches Unicorn).  The vCPU that runs is loaded in the
engine; the others keep their state in a CPU context and are read and
written through the engine's scratch register file, so every accessor here
works on any vCPU at any time, and none of them ever switches the running
vCPU (a switch flushes the TLB, which a guest could notice).

State Unicorn does not expose through registers (segment caches, CPL,
hflags) is read and written in CPUX86State directly; ``save_state`` gives
the whole architectural state as plain, versioned data (never a Unicorn
context), which ``load_state`` puts back, in this or any other process.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devices.base import DeviceStateError
from devices.irqchip import CpuPins
from vmm.cpu.engine import (
    ACCESS_WRITE,
    ENV_A20,
    ENV_CC_OP,
    ENV_CC_SRC,
    ENV_CR,
    ENV_EFER,
    ENV_EFLAGS,
    ENV_EIP,
    ENV_GDT,
    ENV_HFLAGS,
    ENV_HFLAGS2,
    ENV_IDT,
    ENV_LDT,
    ENV_OLD_EXC,
    ENV_REGS,
    ENV_SEGS,
    ENV_TR,
    MSR_TSC_AUX,
    SEG_SIZE,
    U64,
    WATCH_READ,
    WATCH_WRITE,
    Engine,
    VcpuError,
)
from vmm.exits import VmExit

__all__ = ["CS", "DS", "ES", "FS", "GS", "SS", "Segment", "Vcpu", "VcpuError"]

ES, CS, SS, DS, FS, GS = range(6)
SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")

HF_CPL_MASK = 3
HF_INHIBIT_IRQ = 1 << 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
HF2_NMI_MASK = 1 << 2

DESC_B = 1 << 22
DESC_L = 1 << 21

EFLAGS_IF = 1 << 9
EFLAGS_VM = 1 << 17
CC_OP_EFLAGS = 1

MSR_EFER = 0xC000_0080

GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

# The MSRs a vCPU's saved state carries (the rest are fixed or the devices' own)
SAVED_MSRS = (
    0x10,                                   # TSC is the machine's clock: kept for the CPU's own copy
    0x174, 0x175, 0x176,                    # SYSENTER_CS/ESP/EIP
    0x1A0,                                  # MISC_ENABLE
    0x277,                                  # PAT
    0x2FF, 0x250, 0x258, 0x259, *range(0x268, 0x270),   # MTRRs: default type, fixed ranges
    *range(0x200, 0x210),                   # MTRRs: variable ranges
    0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084,  # STAR, LSTAR, CSTAR, SFMASK
    0xC000_0102,                            # KERNEL_GS_BASE
)
STATE_VERSION = 1


XMM_MASK = (1 << 128) - 1


@dataclass(frozen=True)
class Segment:
    selector: int
    base: int
    limit: int
    flags: int

    @property
    def dpl(self) -> int:
        return (self.flags >> 13) & 3


class Vcpu:
    """One virtual CPU of a machine (``id`` 0 is the bootstrap processor).

    ``io_handler(is_write, port, size, value) -> int`` services IN/OUT inline
    (return the value for IN); ``rdtsc`` returns the TSC value,
    ``cpuid(leaf, subleaf)`` the four registers.  ``tsc_offset``, when set,
    returns for a run about to start the value that makes ``rdtsc() ==
    tsc_offset() + current_icount()`` all through it (or None: not so for this
    run), so the CPU core answers RDTSC in C; ``rdtsc`` stays the reference.  ``pins`` are its interrupt
    inputs (devices/irqchip.py).
    """

    WATCH_READ, WATCH_WRITE = WATCH_READ, WATCH_WRITE
    ACCESS_WRITE = ACCESS_WRITE

    def __init__(self, engine: Engine, vcpu_id: int = 0):
        self.engine = engine
        self.id = vcpu_id
        self.memory = engine.memory
        self.ept = engine.ept
        self.mmu_mode = engine.mmu_mode
        self._ctx = engine.new_context()
        self._where = "ctx"          # "engine", "scratch" or "ctx": where the live state is
        self._icount = 0
        self._irq_pending = False
        self.ref_icount = 0
        self.pins = CpuPins(vcpu_id)
        self.io_handler: Callable[[int, int, int, int], int] = lambda w, p, s, v: 0xFFFF_FFFF
        self.rdtsc: Callable[[], int] = lambda: self.icount
        self.tsc_offset: Callable[[], int | None] | None = None
        self.cpuid: Callable[[int, int], tuple[int, int, int, int]] = lambda leaf, sub: (0, 0, 0, 0)
        engine.vcpus.append(self)
        self.reset()

    # -- where the state is ---------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._where == "engine"

    @property
    def _rf(self):
        return self.engine.regfile(self)

    @property
    def _env(self):
        return self.engine.regfile(self).env

    def reset(self, cs: int = 0xF000, ip: int = 0xFFF0) -> None:
        """Architectural reset (SDM vol. 3 9.1): real mode, CS:IP as given."""
        rf = self._rf
        rf.uc.context_restore(self.engine.reset_context)
        self.load_seg(CS, cs, cs << 4, 0xFFFF, 0x9B00)
        self.set_u64(ENV_EIP, ip)
        # SDM vol. 3A table 9-1: IDTR and GDTR base 0, limit 0xFFFF after reset
        self.set_sys_seg("idt", 0, 0, 0xFFFF, 0)
        self.set_sys_seg("gdt", 0, 0, 0xFFFF, 0)
        self.icount = 0
        self.set_irq_pending(False)
        if self.loaded:
            self.engine.flush_tlb()

    # -- raw CPU state ----------------------------------------------------------
    def _u64(self, off: int) -> int:
        return struct.unpack_from("<Q", self._env, off)[0]

    def _u32(self, off: int) -> int:
        return struct.unpack_from("<I", self._env, off)[0]

    def set_u64(self, off: int, v: int) -> None:
        struct.pack_into("<Q", self._env, off, v & U64)

    def set_u32(self, off: int, v: int) -> None:
        struct.pack_into("<I", self._env, off, v & 0xFFFF_FFFF)

    @property
    def hflags(self) -> int:
        return self._u32(ENV_HFLAGS)

    @hflags.setter
    def hflags(self, v: int) -> None:
        self.set_u32(ENV_HFLAGS, v)

    @property
    def hflags2(self) -> int:
        return self._u32(ENV_HFLAGS2)

    @hflags2.setter
    def hflags2(self, v: int) -> None:
        self.set_u32(ENV_HFLAGS2, v)

    @property
    def cpl(self) -> int:
        return self.hflags & HF_CPL_MASK

    @property
    def a20_mask(self) -> int:
        return struct.unpack_from("<i", self._env, ENV_A20)[0]

    @a20_mask.setter
    def a20_mask(self, v: int) -> None:
        struct.pack_into("<i", self._env, ENV_A20, v)
        self.flush_tlb()

    def flush_tlb(self) -> None:
        """Drop cached translations (after the VMM changed paging state, the A20 gate,
        or the guest's page tables behind the CPU's back).  A vCPU that is not loaded
        has none: it starts with an empty TLB when it is loaded."""
        if self.loaded:
            self.engine.flush_tlb()

    def seg(self, i: int) -> Segment:
        off = ENV_SEGS + i * SEG_SIZE
        sel, base, limit, flags = struct.unpack_from("<IxxxxQII", self._env, off)
        return Segment(sel & 0xFFFF, base, limit, flags)

    def _sys_seg(self, off: int) -> Segment:
        sel, base, limit, flags = struct.unpack_from("<IxxxxQII", self._env, off)
        return Segment(sel & 0xFFFF, base, limit, flags)

    @property
    def tr(self) -> Segment:
        return self._sys_seg(ENV_TR)

    @property
    def ldtr(self) -> Segment:
        return self._sys_seg(ENV_LDT)

    @property
    def gdtr(self) -> tuple[int, int]:
        s = self._sys_seg(ENV_GDT)
        return s.base, s.limit

    @property
    def idtr(self) -> tuple[int, int]:
        s = self._sys_seg(ENV_IDT)
        return s.base, s.limit

    def set_sys_seg(self, which: str, selector: int, base: int, limit: int, flags: int) -> None:
        off = {"ldt": ENV_LDT, "tr": ENV_TR, "gdt": ENV_GDT, "idt": ENV_IDT}[which]
        struct.pack_into("<IxxxxQII", self._env, off, selector, base & U64, limit, flags)

    def set_gdtr(self, base: int, limit: int) -> None:
        self._rf.set_gdtr(base, limit)

    def set_idtr(self, base: int, limit: int) -> None:
        self._rf.set_idtr(base, limit)

    def load_seg(self, i: int, selector: int, base: int, limit: int, flags: int) -> None:
        """Load a segment cache and keep hflags in step (QEMU cpu_x86_load_seg_cache)."""
        struct.pack_into("<IxxxxQII", self._env, ENV_SEGS + i * SEG_SIZE, selector & 0xFFFF, base & U64,
                         limit & 0xFFFF_FFFF, flags & 0xFFFF_FFFF)
        hf = self.hflags
        if i == CS:
            if (hf & HF_LMA) and (flags & DESC_L):
                hf |= HF_CS32 | HF_SS32 | HF_CS64
                hf &= ~HF_ADDSEG
            else:
                hf = (hf & ~(HF_CS32 | HF_CS64)) | ((flags & DESC_B) >> (22 - 4))
        if i == SS:
            cpl = (flags >> 13) & 3
            hf = (hf & ~HF_CPL_MASK) | cpl
        hf = (hf & ~HF_SS32) | ((self.seg(SS).flags & DESC_B) >> (22 - 5))
        if hf & HF_CS64:
            pass
        elif not (self.cr0 & 1) or (self._u64(ENV_EFLAGS) & EFLAGS_VM) or not (hf & HF_CS32):
            hf |= HF_ADDSEG
        else:
            nz = self.seg(DS).base | self.seg(ES).base | self.seg(SS).base
            hf = (hf & ~HF_ADDSEG) | (HF_ADDSEG if nz else 0)
        self.hflags = hf

    def set_cpl(self, cpl: int) -> None:
        self.hflags = (self.hflags & ~HF_CPL_MASK) | (cpl & 3)

    # -- registers --------------------------------------------------------------
    def reg(self, name: str) -> int:
        if name == "rip":
            return self._u64(ENV_EIP)
        return self._rf.reg_read(name)

    def set_reg(self, name: str, value: int) -> None:
        if name == "rip":
            self.set_u64(ENV_EIP, value)
            return
        self._rf.reg_write(name, value & ((1 << 256) - 1) if name.startswith(("xmm", "ymm", "st")) else value & U64)

    def gpr(self, i: int) -> int:
        return self._u64(ENV_REGS + 8 * i)

    def set_gpr(self, i: int, v: int) -> None:
        self.set_u64(ENV_REGS + 8 * i, v)

    @property
    def rip(self) -> int:
        return self._u64(ENV_EIP)

    @rip.setter
    def rip(self, v: int) -> None:
        self.set_u64(ENV_EIP, v)

    @property
    def rsp(self) -> int:
        return self._u64(ENV_REGS + 8 * 4)

    @rsp.setter
    def rsp(self, v: int) -> None:
        self.set_u64(ENV_REGS + 8 * 4, v)

    @property
    def rflags(self) -> int:
        return self._rf.reg_read("rflags")

    @rflags.setter
    def rflags(self, v: int) -> None:
        self._rf.reg_write("rflags", v & U64)

    @property
    def if_flag(self) -> bool:
        return bool(self._u64(ENV_EFLAGS) & EFLAGS_IF)

    @property
    def cr0(self) -> int:
        return self._u64(ENV_CR)

    @property
    def cr2(self) -> int:
        return self._u64(ENV_CR + 16)

    @property
    def cr3(self) -> int:
        return self._u64(ENV_CR + 24)

    @property
    def cr4(self) -> int:
        return self._u64(ENV_CR + 32)

    def set_cr2(self, v: int) -> None:
        self.set_u64(ENV_CR + 16, v)

    def msr(self, index: int) -> int:
        return self._rf.msr_read(index)

    @property
    def tsc_aux(self) -> int:
        """IA32_TSC_AUX, what RDTSCP returns in ECX: the guest sets it with WRMSR (as on
        QEMU, whose env->tsc_aux it is; Linux keeps its CPU number there for getcpu)."""
        return self._rf.msr_read(MSR_TSC_AUX) & 0xFFFF_FFFF

    @tsc_aux.setter
    def tsc_aux(self, value: int) -> None:
        self._rf.msr_write(MSR_TSC_AUX, value & 0xFFFF_FFFF)

    def set_msr(self, index: int, value: int) -> None:
        self._rf.msr_write(index, value)

    @property
    def efer(self) -> int:
        return self._u64(ENV_EFER)

    @property
    def long_mode(self) -> bool:
        return bool(self.hflags & HF_LMA)

    @property
    def code_bits(self) -> int:
        hf = self.hflags
        return 64 if hf & HF_CS64 else 32 if hf & HF_CS32 else 16

    @property
    def interrupt_shadow(self) -> bool:
        return bool(self.hflags & HF_INHIBIT_IRQ)

    def interruptible(self) -> bool:
        """Can a maskable interrupt be taken at this instruction boundary?"""
        return self.if_flag and not self.interrupt_shadow

    @property
    def nmi_blocked(self) -> bool:
        """NMIs are blocked from an NMI's delivery until the next IRET (SDM 6.7.1)."""
        return bool(self.hflags2 & HF2_NMI_MASK)

    def snapshot_regs(self) -> dict[str, int]:
        # every periodic digest reads these of every vCPU: the CPU state is found once
        env = self._env
        d = dict(zip(GPR_ORDER, struct.unpack_from("<16Q", env, ENV_REGS), strict=True))
        d["rip"] = struct.unpack_from("<Q", env, ENV_EIP)[0]
        d["rflags"] = self.rflags
        for i, n in enumerate(SEG_NAMES):
            d[n] = struct.unpack_from("<I", env, ENV_SEGS + i * SEG_SIZE)[0] & 0xFFFF
        cr0, _cr1, cr2, cr3, cr4 = struct.unpack_from("<5Q", env, ENV_CR)
        d["cr0"], d["cr2"], d["cr3"], d["cr4"] = cr0, cr2, cr3, cr4
        d["cpl"] = struct.unpack_from("<I", env, ENV_HFLAGS)[0] & HF_CPL_MASK
        return d

    # -- guest-linear memory (the VMM's own accesses) ---------------------------
    def translate(self, lin: int, access: str = "r", user: bool = False, set_ad: bool = True) -> int:
        t = self.engine.walk(lin, access, user, self.cr0, self.cr3, self.cr4, self.efer,
                             set_ad=set_ad, a20_mask=self.a20_mask)
        return t.phys

    def read_linear(self, lin: int, n: int, access: str = "r", user: bool = False) -> bytes:
        out = bytearray()
        while n > 0:
            chunk = min(n, 0x1000 - (lin & 0xFFF))
            pa = self.translate(lin, access, user)
            out += self.ept.read(pa, chunk)
            lin += chunk
            n -= chunk
        return bytes(out)

    def write_linear(self, lin: int, data: bytes, user: bool = False) -> None:
        # translate every page first, so a fault leaves memory untouched
        pas = []
        off, n, a = 0, len(data), lin
        while n > 0:
            chunk = min(n, 0x1000 - (a & 0xFFF))
            pas.append((self.translate(a, "w", user), off, chunk))
            a += chunk
            off += chunk
            n -= chunk
        for pa, off, chunk in pas:
            self.ept.write(pa, data[off:off + chunk])

    # -- the clock ----------------------------------------------------------------
    @property
    def icount(self) -> int:
        # read several times per scheduler turn: no property chain
        return self.engine._core.icount if self._where == "engine" else self._icount

    @icount.setter
    def icount(self, v: int) -> None:
        if self.loaded:
            self.engine.icount = v
        else:
            self._icount = v

    def current_icount(self) -> int:
        """Exact retired count at the instruction now executing (valid inside hooks)."""
        return self.engine.current_icount() if self.loaded else self._icount

    def set_irq_pending(self, pending: bool) -> None:
        """Tell the block hook an interrupt waits for IF=1 (or stop no longer needed)."""
        self._irq_pending = bool(pending)
        if self.loaded:
            self.engine.set_irq_pending(pending)

    # -- running --------------------------------------------------------------------
    def run(self, until_icount: int | None = None) -> VmExit:
        """Run this vCPU (loading it) until an exit; never past ``until_icount``."""
        self.engine.load(self)
        return self.engine.run(until_icount)

    def step(self) -> VmExit:
        """Execute exactly one instruction (or stop earlier at an exit)."""
        return self.run(self.icount + 1)

    def request_stop(self) -> None:
        """Stop right after the instruction now executing (from a device access)."""
        if self.loaded:
            self.engine.request_stop()

    def clear_exception_state(self) -> None:
        struct.pack_into("<i", self._env, ENV_OLD_EXC, -1)

    # -- the engine's tools, for whoever drives this vCPU (debuggers, tracers) -------
    def code_bytes(self, lin: int, n: int) -> bytes | None:
        """Code bytes at linear ``lin`` through this vCPU's page tables (no A/D updates)."""
        if self.loaded:
            return self.engine.code_bytes(lin, n)
        try:
            return b"".join(self.read_code_page(lin + o, min(n - o, 0x1000 - ((lin + o) & 0xFFF)))
                            for o in _page_offsets(lin, n))
        except Exception:  # noqa: BLE001 - unreadable code is reported as None
            return None

    def read_code_page(self, lin: int, n: int) -> bytes:
        t = self.engine.walk(lin, "r", False, self.cr0, self.cr3, self.cr4, self.efer,
                             set_ad=False, a20_mask=self.a20_mask)
        return self.ept.read(t.phys, n)

    _code_bytes = code_bytes

    def add_watch_hook(self, kinds: int, begin: int, end: int, callback) -> int:
        return self.engine.add_watch_hook(kinds, begin, end, callback)

    def add_linear_watch(self, kinds: int, begin: int, end: int, callback) -> int:
        """Watch linear [begin, end] wherever it maps (Engine.add_linear_watch)."""
        return self.engine.add_linear_watch(kinds, begin, end, callback)

    def remove_linear_watch(self, handle: int) -> None:
        self.engine.remove_linear_watch(handle)

    def add_code_hook(self, callback, begin: int = 1, end: int = 0) -> int:
        return self.engine.add_code_hook(callback, begin, end)

    def remove_hook(self, handle: int) -> None:
        self.engine.remove_hook(handle)

    @property
    def breakpoints(self) -> frozenset[int]:
        return self.engine.breakpoints

    def set_breakpoints(self, addrs) -> None:
        self.engine.set_breakpoints(addrs)

    def set_trap_range(self, lo: int, length: int) -> None:
        self.engine.set_trap_range(lo, length)

    def enable_reference_clock(self) -> None:
        self.engine.enable_reference_clock()

    def invalidate_code(self) -> None:
        self.engine.invalidate_code()

    def mmu_stats(self) -> dict[str, int]:
        return self.engine.mmu_stats()

    @property
    def exits(self) -> int:
        return self.engine.exits

    def close(self) -> None:
        self.engine.close()

    # -- saved state: plain data, never a Unicorn context ------------------------------
    def save_state(self) -> dict[str, Any]:
        """The architectural state as plain data (SDM vol. 3 register set, plus what the
        VMM keeps for the vCPU: its clock and pending-interrupt flag)."""
        rf = self._rf
        env = rf.env
        segs = [list(struct.unpack_from("<IxxxxQII", env, ENV_SEGS + i * SEG_SIZE)) for i in range(6)]
        sys = {k: list(struct.unpack_from("<IxxxxQII", env, off))
               for k, off in (("ldt", ENV_LDT), ("tr", ENV_TR), ("gdt", ENV_GDT), ("idt", ENV_IDT))}
        st: dict[str, Any] = {
            "kind": "vcpu", "version": STATE_VERSION, "id": self.id,
            "gpr": [self.gpr(i) for i in range(16)], "rip": self.rip, "rflags": self.rflags,
            "segs": segs, "sys": sys,
            "cr": [self.cr0, self.cr2, self.cr3, self.cr4, rf.reg_read("cr8")],
            "dr": [rf.reg_read(f"dr{i}") for i in (0, 1, 2, 3, 6, 7)],
            "efer": self.efer,
            "msrs": {str(i): rf.msr_read(i) for i in SAVED_MSRS},
            "hflags": self.hflags, "hflags2": self.hflags2, "a20": self.a20_mask,
            "fpu": {k: rf.reg_read(k) for k in ("fpcw", "fpsw", "fptag", "fip", "fcs", "fdp", "fds", "fop", "mxcsr")},
            "st": [rf.reg_read(f"st{i}") for i in range(8)],
            # the XMM halves: the CPU offers no AVX (vmm/cpu/cpuid.py), and Unicorn's YMM
            # read returns whatever its upper-half storage holds (host pointers were seen)
            "ymm": [rf.reg_read(f"xmm{i}") & XMM_MASK for i in range(16)],
            "icount": self.icount, "irq_pending": self._irq_pending, "tsc_aux": self.tsc_aux,
            "pins": self.pins.save_state(),
        }
        return st

    def load_state(self, st: dict[str, Any]) -> None:
        try:
            self._load_state(st)
        except DeviceStateError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, OverflowError, struct.error) as e:
            raise DeviceStateError(f"vcpu: malformed state ({type(e).__name__}: {e})") from None

    def _load_state(self, st: dict[str, Any]) -> None:
        if not isinstance(st, dict) or st.get("kind") != "vcpu":
            raise DeviceStateError("vcpu: not a vCPU state")
        if st.get("version") != STATE_VERSION:
            raise DeviceStateError(f"vcpu: state version {st.get('version')!r} is not supported")
        rf = self._rf
        rf.uc.context_restore(self.engine.reset_context)
        cr0, cr2, cr3, cr4, cr8 = (int(x) for x in st["cr"])
        # control registers first (they decide how the rest is interpreted), then EFER
        rf.reg_write("cr0", cr0)
        rf.reg_write("cr4", cr4)
        rf.msr_write(MSR_EFER, int(st["efer"]))
        rf.reg_write("cr3", cr3)
        rf.reg_write("cr2", cr2)
        rf.reg_write("cr8", cr8)
        for name, v in zip(("dr0", "dr1", "dr2", "dr3", "dr6", "dr7"), st["dr"]):
            rf.reg_write(name, int(v))
        for k, v in dict(st["msrs"]).items():
            rf.msr_write(int(k), int(v))
        for k, v in dict(st["fpu"]).items():
            if k not in ("fpcw", "fpsw", "fptag", "fip", "fcs", "fdp", "fds", "fop", "mxcsr"):
                raise DeviceStateError(f"vcpu: unknown FPU register {k!r}")
            rf.reg_write(k, int(v))
        for i, v in enumerate(st["st"][:8]):
            rf.reg_write(f"st{i}", int(v))
        for i, v in enumerate(st["ymm"][:16]):
            rf.reg_write(f"xmm{i}", int(v) & XMM_MASK)
        gpr = [int(x) for x in st["gpr"]]
        if len(gpr) != 16:
            raise DeviceStateError("vcpu: 16 general registers expected")
        for i, v in enumerate(gpr):
            self.set_gpr(i, v)
        env = rf.env
        for i, (sel, base, limit, flags) in enumerate(st["segs"]):
            struct.pack_into("<IxxxxQII", env, ENV_SEGS + i * SEG_SIZE, int(sel) & 0xFFFF, int(base) & U64,
                             int(limit) & 0xFFFF_FFFF, int(flags) & 0xFFFF_FFFF)
        for k, off in (("ldt", ENV_LDT), ("tr", ENV_TR), ("gdt", ENV_GDT), ("idt", ENV_IDT)):
            sel, base, limit, flags = st["sys"][k]
            struct.pack_into("<IxxxxQII", env, off, int(sel) & 0xFFFF, int(base) & U64,
                             int(limit) & 0xFFFF_FFFF, int(flags) & 0xFFFF_FFFF)
        rflags = int(st["rflags"])
        self.set_u64(ENV_EFLAGS, rflags)
        self.set_u64(ENV_CC_SRC, rflags & 0x8D5)
        self.set_u32(ENV_CC_OP, CC_OP_EFLAGS)
        self.rip = int(st["rip"])
        # exact values last: WRMSR cannot set EFER.LMA (CR0.PG does, from LME), and
        # the register writes above derived hflags from a partial state
        self.set_u64(ENV_EFER, int(st["efer"]))
        for i, v in ((0, cr0), (2, cr2), (3, cr3), (4, cr4)):
            self.set_u64(ENV_CR + 8 * i, v)
        self.hflags = int(st["hflags"])
        self.hflags2 = int(st["hflags2"])
        struct.pack_into("<i", env, ENV_A20, int(st["a20"]))
        self.clear_exception_state()
        self.icount = int(st["icount"])
        self.set_irq_pending(bool(st["irq_pending"]))
        self.tsc_aux = int(st["tsc_aux"])
        self.pins.load_state(st["pins"])
        self.flush_tlb()


def _page_offsets(lin: int, n: int) -> list[int]:
    out, o = [], 0
    while o < n:
        out.append(o)
        o += min(n - o, 0x1000 - ((lin + o) & 0xFFF))
    return out
