"""The vCPU: one Unicorn engine under an exact instruction clock.

This is the only module of the project that imports Unicorn.  The engine is
created in UC_MODE_64 (whatever mode the guest is in, see UNICORN.md decision
1) with a CPU model that has no RDRAND/RDSEED, and is put into the
architectural reset state by loading the context of a fresh 16-bit engine.

The clock.  ``icount`` counts retired instructions (an instruction that
faults does not retire; a trap such as INT n does; each iteration of a REP
string instruction counts once, as single-stepping with TF sees it).  The C
block hook adds a whole block's count when the block starts; every exit then
corrects by decoding the block up to where it really stopped.  ``run(until)``
stops exactly at ``until``: the block hook stops before the block that would
pass it, and the remainder runs with Unicorn's ``until`` address set to the
k-th instruction of that straight-line block.

CPU state Unicorn does not expose through registers (segment caches, CPL,
hflags, the pending exception's error code) is read and written in its
CPUX86State directly, at offsets checked when the vCPU is created.
"""
from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from dataclasses import dataclass

import capstone
import numpy as np
import unicorn
import unicorn.unicorn_py3.unicorn as _ucmod
from unicorn import x86_const as X

from vmm.cpu import native
from vmm.memory.ept import Ept, Violation
from vmm.exits import ExitReason, VmExit
from vmm.memory.ram import GuestMemory
from vmm.memory.paging import translate

_fast = native.load()
ffi = _fast.ffi
lib = _fast.lib

NO_UNTIL = 0xFFFF_FFFF_FFFF_FFFF
TCG_BUFFER = 128 << 20
U64 = 0xFFFF_FFFF_FFFF_FFFF

# CPUX86State layout (QEMU 5 in Unicorn 2.1.4)
ENV_REGS = 0
ENV_EIP = 128
ENV_EFLAGS = 136
ENV_HFLAGS = 176
ENV_HFLAGS2 = 180
ENV_SEGS = 184
SEG_SIZE = 24
ENV_LDT = ENV_SEGS + 6 * SEG_SIZE
ENV_TR = ENV_LDT + SEG_SIZE
ENV_GDT = ENV_TR + SEG_SIZE
ENV_IDT = ENV_GDT + SEG_SIZE
ENV_CR = ENV_IDT + SEG_SIZE
ENV_A20 = ENV_CR + 9 * 8
ENV_EFER = ENV_A20 + 8 + 4 * 16 + 16 + 8   # after a20_mask: bnd_regs[4], bndcs_regs, msr_bndcfgs
ENV_ERROR_CODE = 5384
ENV_OLD_EXC = 5496
ENV_SPAN = 0x2000

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

DESC_B = 1 << 22
DESC_L = 1 << 21

EFLAGS_IF = 1 << 9
EFLAGS_VM = 1 << 17

MSR_EFER = 0xC000_0080

MMU_MODES = ("shadow", "nested")
_RETRY = object()  # an EPT violation a handler fixed: enter the guest again
# the error Unicorn reports in nested mode for each (access, hole) violation
_VIOLATION_ERR = {
    (0, True): unicorn.UC_ERR_READ_UNMAPPED, (1, True): unicorn.UC_ERR_WRITE_UNMAPPED,
    (2, True): unicorn.UC_ERR_FETCH_UNMAPPED, (0, False): unicorn.UC_ERR_READ_PROT,
    (1, False): unicorn.UC_ERR_WRITE_PROT, (2, False): unicorn.UC_ERR_FETCH_PROT,
}
_NESTED_VIOLATIONS = frozenset(_VIOLATION_ERR.values())

REG_IDS = {
    "rax": X.UC_X86_REG_RAX, "rbx": X.UC_X86_REG_RBX, "rcx": X.UC_X86_REG_RCX,
    "rdx": X.UC_X86_REG_RDX, "rsi": X.UC_X86_REG_RSI, "rdi": X.UC_X86_REG_RDI,
    "rbp": X.UC_X86_REG_RBP, "rsp": X.UC_X86_REG_RSP, "r8": X.UC_X86_REG_R8,
    "r9": X.UC_X86_REG_R9, "r10": X.UC_X86_REG_R10, "r11": X.UC_X86_REG_R11,
    "r12": X.UC_X86_REG_R12, "r13": X.UC_X86_REG_R13, "r14": X.UC_X86_REG_R14,
    "r15": X.UC_X86_REG_R15, "rip": X.UC_X86_REG_RIP, "rflags": X.UC_X86_REG_RFLAGS,
    "cr0": X.UC_X86_REG_CR0, "cr2": X.UC_X86_REG_CR2, "cr3": X.UC_X86_REG_CR3,
    "cr4": X.UC_X86_REG_CR4, "cr8": X.UC_X86_REG_CR8,
    "dr0": X.UC_X86_REG_DR0, "dr1": X.UC_X86_REG_DR1, "dr2": X.UC_X86_REG_DR2,
    "dr3": X.UC_X86_REG_DR3, "dr6": X.UC_X86_REG_DR6, "dr7": X.UC_X86_REG_DR7,
}
GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


class VcpuError(RuntimeError):
    """The CPU core could not be set up (an unsupported Unicorn build)."""


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
    """One virtual CPU bound to guest memory.

    ``io_handler(is_write, port, size, value) -> int`` services IN/OUT inline
    (return the value for IN); setting ``request_stop()`` inside it ends the
    run exactly after the I/O instruction.  ``rdtsc`` returns the TSC value,
    ``cpuid(leaf, subleaf)`` the four registers.

    ``mmu`` chooses how guest memory is reached (DESIGN.md, "Memory: two-level
    translation"): "shadow" (default) puts Unicorn in UC_TLB_VIRTUAL mode and
    fills its TLB from C by walking the guest's page tables and then the EPT
    (vmm/cpu/mmu_native.py); "nested" lets Unicorn walk the guest's tables itself,
    the EPT being realised as Unicorn's memory map.  Guests see the same in
    both.  ``ept`` is the second-level table (one is made if not given);
    ``on_ept_violation(Violation) -> bool`` may fix an access the EPT refused
    (the instruction is then retried), else the run stops with an ERROR exit.
    """

    def __init__(self, memory: GuestMemory, mmu: str = "shadow", ept: Ept | None = None):
        if mmu not in MMU_MODES:
            raise ValueError(f"mmu must be one of {', '.join(MMU_MODES)}, not {mmu!r}")
        self.memory = memory
        self.mmu_mode = mmu
        self.ept = ept if ept is not None else Ept(memory)
        if self.ept.memory is not memory:
            raise ValueError("the EPT belongs to another guest memory")
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        # Sandy Bridge: LM and NX, but RDRAND/RDSEED raise #UD (UNICORN.md 5)
        uc.ctl_set_cpu_model(X.UC_CPU_X86_SANDYBRIDGE)
        # Unicorn reserves 1 GiB of code buffer per engine by default; test runs
        # and time travel keep many machines alive, and guest code is small
        uc.ctl_set_tcg_buffer_size(TCG_BUFFER)
        self.uc = uc
        uc.mem_map_ptr(0, memory.size, unicorn.UC_PROT_ALL, memory.address())
        self._core = lib.vmm_core_new()
        if self._core == ffi.NULL:
            raise MemoryError("cannot allocate the vCPU core")
        uclib = _ucmod.uclib
        reg_read_fn = ctypes.cast(uclib.reg_read_x86_64, ctypes.c_void_p).value
        loop_exit_fn = ctypes.cast(uclib.cpu_loop_exit_x86_64, ctypes.c_void_p).value
        rc = lib.vmm_core_attach(self._core, ffi.cast("void *", uc._uch.value), reg_read_fn, loop_exit_fn)
        if rc != 0:
            raise VcpuError(f"cannot locate the CPU state inside this Unicorn build (code {rc}); Unicorn 2.1.4 is required")
        self._env = ffi.buffer(self._core.env, ENV_SPAN)
        self._handle = ffi.new_handle(self)
        self._core.handle = self._handle
        rc = lib.vmm_core_install_hooks(self._core)
        if rc != 0:
            raise VcpuError(f"installing the vCPU hooks failed (uc_err {rc})")
        self._disasm = {
            16: capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_16),
            32: capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32),
            64: capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64),
        }
        self._count_cache: dict[tuple[int, bytes], int] = {}
        self._code_dirty = False
        memory.on_host_write = self._host_wrote
        self.io_handler: Callable[[int, int, int, int], int] = lambda w, p, s, v: 0xFFFF_FFFF
        self.rdtsc: Callable[[], int] = lambda: self.icount
        self.cpuid: Callable[[int, int], tuple[int, int, int, int]] = lambda leaf, sub: (0, 0, 0, 0)
        self.tsc_aux = 0
        self._stop_requested = False
        self._pending_error: BaseException | None = None
        self._ref_hook = None
        self.ref_icount = 0
        self._breakpoints: set[int] = set()
        self._bp_hooks: dict[int, int] = {}
        self._bp_hit = False
        self.exits = 0
        # Exit points come from an explicit set (empty except for exact stops):
        # with a plain `until`, Unicorn invalidates code at until-1 after every
        # run, and that lookup of an unmapped address clobbers the guest's CR2.
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self._reset_context = self._make_reset_context()
        self._check_layout()
        self._shadow = ffi.NULL
        self._setup_mmu()
        self.reset()

    # -- set-up ---------------------------------------------------------------
    @staticmethod
    def _make_reset_context():
        """The CPU state of a fresh 16-bit engine (the engine itself is released)."""
        u16 = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_16)
        u16.ctl_set_cpu_model(X.UC_CPU_X86_SANDYBRIDGE)
        u16.ctl_set_tcg_buffer_size(1 << 20)
        ctx = u16.context_save()
        return ctx, None

    def _check_layout(self) -> None:
        """Fail loudly if the CPUX86State offsets do not match this Unicorn."""
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_RIP, 0x1234_5678)
        uc.reg_write(X.UC_X86_REG_CR3, 0x7000)
        uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x0ABC_D000, 0x37, 0))
        ok = (
            self._u64(ENV_EIP) == 0x1234_5678
            and self._u64(ENV_CR + 3 * 8) == 0x7000
            and self._u64(ENV_GDT + 8) == 0x0ABC_D000
            and self._u32(ENV_GDT + 16) == 0x37
        )
        efer = uc.reg_read(X.UC_X86_REG_MSR, MSR_EFER)
        uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, efer ^ 0x801))   # toggle NXE and SCE
        ok = ok and self._u64(ENV_EFER) == efer ^ 0x801
        uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, efer))
        ok = ok and self._u64(ENV_EFER) == efer
        # the C walk reads CR0-4, A20 and EFER at these offsets too
        ok = ok and (lib.VMM_ENV_CR, lib.VMM_ENV_A20, lib.VMM_ENV_EFER) == (ENV_CR, ENV_A20, ENV_EFER)
        if not ok:
            raise VcpuError("this Unicorn build's CPU state layout is not the one vmm was written for (need 2.1.4)")

    def _setup_mmu(self) -> None:
        """The EPT's C view, and the shadow MMU's TLB fill or the nested MMU's hooks."""
        ept = self.ept
        m = ffi.new("vmm_mmu *")
        m.ept = ffi.cast("uint64_t *", ept.entries.ctypes.data)
        m.ept_pages = ept.npages
        m.dirty = ffi.cast("uint8_t *", ept.dirty.ctypes.data)
        m.ram = ffi.cast("uint8_t *", self.memory.address())
        m.ram_frames = ept.ram_frames
        self._mmu = m
        ept.mmu_mode = self.mmu_mode
        ept.on_change = self._ept_changed
        ept.on_pool = self._ept_pool
        ept.on_code_write = self._host_wrote
        self._walk_phys = ept.phys
        self.on_ept_violation: Callable[[Violation], bool] = ept.handle_violation
        if self.mmu_mode == "nested":
            rc = lib.vmm_mmu_install_nested(self._core, m)
            if rc != 0:
                raise VcpuError(f"installing the nested MMU hook failed (uc_err {rc})")
        else:
            s = lib.vmm_shadow_new(self._core, m)
            if s == ffi.NULL:
                raise MemoryError("cannot allocate the shadow MMU")
            self._shadow = s
            uclib = _ucmod.uclib

            def fn(name: str) -> int:
                try:
                    return ctypes.cast(getattr(uclib, name), ctypes.c_void_p).value or 0
                except AttributeError:
                    return 0

            rc = lib.vmm_shadow_install(s, fn("unicorn_fill_tlb_x86_64"), fn("x86_cpu_tlb_fill_x86_64"),
                                        fn("tlb_flush_x86_64"), fn("tlb_flush_page_by_mmuidx_x86_64"),
                                        fn("tlb_set_page_x86_64"))
            if rc != 0:
                raise VcpuError(f"cannot install the shadow MMU in this Unicorn build (code {rc}); "
                                "Unicorn 2.1.4 is required (or use --mmu nested)")
        if ept.pool is not None:
            self._ept_pool(ept.pool_first, ept.pool_frames, ept.pool.ctypes.data)
        # an EPT changed before this vCPU was attached: realise what differs from boot
        if ept.touched:
            boot = ept.boot_entries()
            gpns = np.flatnonzero(ept.entries != boot)
            if gpns.size:
                self._ept_changed(gpns, boot[gpns])

    def reset(self, cs: int = 0xF000, ip: int = 0xFFF0) -> None:
        """Architectural reset (SDM vol. 3 9.1): real mode, CS:IP as given."""
        ctx, _ = self._reset_context
        self.uc.context_restore(ctx)
        self.load_seg(CS, cs, cs << 4, 0xFFFF, 0x9B00)
        self.set_u64(ENV_EIP, ip)
        # SDM vol. 3A table 9-1: IDTR and GDTR base 0, limit 0xFFFF after reset
        self.set_sys_seg("idt", 0, 0, 0xFFFF, 0)
        self.set_sys_seg("gdt", 0, 0, 0xFFFF, 0)
        self.uc.ctl_flush_tb()
        lib.vmm_core_flush_tbc(self._core)
        lib.vmm_core_flush_tlb(self._core)
        self._core.icount = 0
        self._core.cur = ffi.NULL
        self.set_irq_pending(False)

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
        """Drop every cached translation (after the VMM changed paging state, the A20 gate,
        the guest's page tables behind the CPU's back, or the EPT)."""
        lib.vmm_core_flush_tlb(self._core)  # also forgets the shadow MMU's W^X grants

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
        return self.uc.reg_read(REG_IDS[name])

    def set_reg(self, name: str, value: int) -> None:
        if name == "rip":
            self.set_u64(ENV_EIP, value)
            return
        self.uc.reg_write(REG_IDS[name], value & U64)

    def gpr(self, i: int) -> int:
        return self._u64(ENV_REGS + 8 * i)

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
        return self.uc.reg_read(X.UC_X86_REG_RFLAGS)

    @rflags.setter
    def rflags(self, v: int) -> None:
        self.uc.reg_write(X.UC_X86_REG_RFLAGS, v & U64)

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
        return self.uc.reg_read(X.UC_X86_REG_MSR, index)

    def set_msr(self, index: int, value: int) -> None:
        self.uc.reg_write(X.UC_X86_REG_MSR, (index, value & U64))

    @property
    def efer(self) -> int:
        return self.msr(MSR_EFER)

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

    def snapshot_regs(self) -> dict[str, int]:
        d = {n: self.gpr(i) for i, n in enumerate(GPR_ORDER)}
        d["rip"] = self.rip
        d["rflags"] = self.rflags
        for i, n in enumerate(SEG_NAMES):
            d[n] = self.seg(i).selector
        d["cr0"], d["cr2"], d["cr3"], d["cr4"] = self.cr0, self.cr2, self.cr3, self.cr4
        d["cpl"] = self.cpl
        return d

    # -- guest-linear memory (the VMM's own accesses) ---------------------------
    def translate(self, lin: int, access: str = "r", user: bool = False, set_ad: bool = True) -> int:
        t = translate(self._walk_phys, lin, access, user, self.cr0, self.cr3, self.cr4, self.efer,
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

    def _host_wrote(self, pa: int, n: int) -> None:
        self._code_dirty = True
        self.ept.note_host_write(pa, n)

    # -- the MMU ----------------------------------------------------------------------
    def _ept_changed(self, gpns: np.ndarray, old: np.ndarray) -> None:
        if self.mmu_mode == "nested":
            self._realise_nested(gpns, old)
            self.invalidate_code()
        lib.vmm_core_flush_tlb(self._core)

    def _realise_nested(self, gpns: np.ndarray, old: np.ndarray) -> None:
        """Nested MMU: the EPT is Unicorn's memory map (a page mapped with its rights or absent)."""
        ept, uc = self.ept, self.uc
        for g, o in zip(gpns.tolist(), old.tolist()):
            n = int(ept.entries[g])
            gpa = g * 4096
            was = bool(o & 0x10) and bool(o & 7)
            now = bool(n & 0x10) and bool(n & 7)
            if was and now and (o >> 12) == (n >> 12):
                uc.mem_protect(gpa, 4096, n & 7)
                continue
            if was:
                uc.mem_unmap(gpa, 4096)
            if now:
                uc.mem_map_ptr(gpa, 4096, n & 7, ept.frame_address(n >> 12))

    def _ept_pool(self, first: int, frames: int, address: int) -> None:
        m = self._mmu
        m.pool = ffi.cast("uint8_t *", address)
        m.pool_first = first
        m.pool_frames = frames
        if self._shadow != ffi.NULL:
            # host frames live in Unicorn's physical space; only the EPT leads there
            self.uc.mem_map_ptr(first * 4096, frames * 4096, unicorn.UC_PROT_ALL, address)
            if lib.vmm_shadow_set_frames(self._shadow) != 0:
                raise MemoryError("cannot grow the shadow MMU's frame tables")
            lib.vmm_core_flush_tbc(self._core)
            lib.vmm_core_flush_tlb(self._core)

    def mmu_stats(self) -> dict[str, int]:
        """Counters of the shadow MMU (empty in nested mode)."""
        s = self._shadow
        if s == ffi.NULL:
            return {}
        return {k: int(getattr(s, k)) for k in (
            "fills", "fills_write", "fills_fetch", "faults", "violations", "probes", "revokes_page",
            "revokes_all", "tbc_invalidations", "wrapper_misses")}

    def invalidate_code(self) -> None:
        """Drop all translated code (after the VMM wrote guest memory)."""
        self.uc.ctl_flush_tb()
        lib.vmm_core_flush_tbc(self._core)
        self._code_dirty = False

    # -- the clock ----------------------------------------------------------------
    @property
    def icount(self) -> int:
        return self._core.icount

    @icount.setter
    def icount(self, v: int) -> None:
        self._core.icount = v
        self._core.cur = ffi.NULL

    def current_icount(self) -> int:
        """Exact retired count at the instruction now executing (valid inside hooks)."""
        c = self._core
        cur = c.cur
        if cur == ffi.NULL:
            return c.icount
        lin = self.seg(CS).base + self.rip
        return c.icount - cur.icount + self.count_insns(cur.pc, lin)

    def _code_bytes(self, lin: int, n: int) -> bytes | None:
        buf = ffi.new("uint8_t[]", n)
        if lib.vmm_vmem_read(self._core, lin, buf, n) != 0:
            # the block may end right before an unreadable page: read what exists
            got = bytearray()
            for i in range(n):
                one = ffi.new("uint8_t[1]")
                if lib.vmm_vmem_read(self._core, lin + i, one, 1) != 0:
                    break
                got.append(one[0])
            return bytes(got) if got else None
        return ffi.buffer(buf, n)[:]

    def count_insns(self, start: int, end: int) -> int:
        """Number of instructions from linear ``start`` up to (not including) ``end``."""
        if end <= start:
            return 0
        n = end - start
        code = self._code_bytes(start, n)
        if code is None:
            return 0
        bits = self.code_bits
        key = (bits, code)
        hit = self._count_cache.get(key)
        if hit is not None:
            return hit
        count = 0
        pos = 0
        for _addr, size, _m, _o in self._disasm[bits].disasm_lite(code, start):
            pos += size
            count += 1
            if pos >= n:
                break
        if len(self._count_cache) > 65536:
            self._count_cache.clear()
        self._count_cache[key] = count
        return count

    def nth_insn_address(self, start: int, k: int) -> int:
        """Linear address of the k-th instruction after ``start`` on a straight line."""
        code = self._code_bytes(start, 16 * k + 16) or b""
        pos = 0
        for i, (_a, size, _m, _o) in enumerate(self._disasm[self.code_bits].disasm_lite(code, start)):
            if i == k:
                break
            pos += size
        return start + pos

    # -- observation hooks (debugger, tracer): never change what the guest computes ----
    WATCH_READ, WATCH_WRITE = 1, 2
    ACCESS_WRITE = unicorn.UC_MEM_WRITE

    def add_watch_hook(self, kinds: int, begin: int, end: int, callback) -> int:
        """Call ``callback(access, address, size, value)`` for guest data accesses to
        linear [begin, end]; ``kinds`` is WATCH_READ | WATCH_WRITE.  Returns a handle."""
        types = (unicorn.UC_HOOK_MEM_READ if kinds & self.WATCH_READ else 0) | (
            unicorn.UC_HOOK_MEM_WRITE if kinds & self.WATCH_WRITE else 0)
        h = self.uc.hook_add(types, lambda uc, access, address, size, value, _: callback(access, address, size, value),
                             None, begin, end)
        self.invalidate_code()
        return h

    def add_code_hook(self, callback, begin: int = 1, end: int = 0) -> int:
        """Call ``callback(address, size)`` before each instruction in [begin, end] (all when begin > end)."""
        h = self.uc.hook_add(unicorn.UC_HOOK_CODE, lambda uc, address, size, _: callback(address, size),
                             None, begin, end)
        self.invalidate_code()
        return h

    def remove_hook(self, handle: int) -> None:
        self.uc.hook_del(handle)
        self.invalidate_code()

    # -- breakpoints ------------------------------------------------------------------
    @property
    def breakpoints(self) -> frozenset[int]:
        return frozenset(self._breakpoints)

    def set_breakpoints(self, addrs) -> None:
        """Stop (BREAKPOINT exit) before executing any instruction at these linear addresses.

        Each is a code hook bounded to its one address: Unicorn stops before
        the instruction, other code pays nothing, and guest memory is never
        patched, so a debugger cannot change what a replay computes.  (Not
        Unicorn exit points: after every run Unicorn looks up each exit's
        address - 1, and from ring 3 that lookup of a supervisor page
        clobbers the guest's CR2.)
        """
        new = {int(a) for a in addrs}
        if new == self._breakpoints:
            return
        for a in self._breakpoints - new:
            self.uc.hook_del(self._bp_hooks.pop(a))
        for a in new - self._breakpoints:
            self._bp_hooks[a] = self.uc.hook_add(unicorn.UC_HOOK_CODE, self._on_breakpoint, None, a, a)
        self._breakpoints = new
        self.invalidate_code()

    def _on_breakpoint(self, uc, address, size, _):
        self._bp_hit = True
        uc.emu_stop()

    # -- the reference clock ------------------------------------------------------
    def enable_reference_clock(self) -> None:
        """Count instructions the slow, obvious way, to check the C clock against.

        A Python code hook counts every instruction that starts; an instruction
        that faults started but did not retire, so exception exits that are
        faults take one back.  Costs ~1 us per instruction: tests only.
        """
        self.ref_icount = self.icount

        def on_code(uc, address, size, user_data):
            self.ref_icount += 1

        self._ref_hook = self.uc.hook_add(unicorn.UC_HOOK_CODE, on_code)
        self.invalidate_code()

    # -- callbacks from C ------------------------------------------------------------
    def request_stop(self) -> None:
        """Stop the vCPU right after the instruction now executing (from a hook)."""
        self._stop_requested = True

    def set_irq_pending(self, pending: bool) -> None:
        """Tell the block hook an interrupt waits for IF=1 (or stop no longer needed)."""
        c = self._core
        c.irq_pending = 1 if pending else 0
        c.slow = (c.slow & ~lib.VMM_SLOW_IRQ) | (lib.VMM_SLOW_IRQ if pending else 0)

    def set_trap_range(self, lo: int, length: int) -> None:
        """Blocks starting in [lo, lo+length) stop with a TRAP exit (the HLE firmware's entry points)."""
        c = self._core
        c.trap_lo = lo
        c.trap_len = length
        c.slow = (c.slow & ~lib.VMM_SLOW_TRAP) | (lib.VMM_SLOW_TRAP if length else 0)

    def _on_io(self, is_write: int, port: int, size: int, value: int, result) -> int:
        if is_write:
            self.io_handler(1, port, size, value)
        else:
            result[0] = self.io_handler(0, port, size, 0) & 0xFFFF_FFFF
        if self._stop_requested:
            self._stop_requested = False
            return 1
        return 0

    def _on_event(self, kind: int) -> int:
        if kind == lib.VMM_EV_CPUID:
            leaf = self.gpr(0) & 0xFFFF_FFFF
            sub = self.gpr(1) & 0xFFFF_FFFF
            a, b, c, d = self.cpuid(leaf, sub)
            self.set_u64(ENV_REGS + 0, a & 0xFFFF_FFFF)
            self.set_u64(ENV_REGS + 24, b & 0xFFFF_FFFF)
            self.set_u64(ENV_REGS + 8, c & 0xFFFF_FFFF)
            self.set_u64(ENV_REGS + 16, d & 0xFFFF_FFFF)
            return 1
        if kind in (lib.VMM_EV_RDTSC, lib.VMM_EV_RDTSCP):
            tsc = self.rdtsc() & U64
            self.set_u64(ENV_REGS + 0, tsc & 0xFFFF_FFFF)
            self.set_u64(ENV_REGS + 16, tsc >> 32)
            if kind == lib.VMM_EV_RDTSCP:
                self.set_u64(ENV_REGS + 8, self.tsc_aux & 0xFFFF_FFFF)
            return 1
        return 0

    # -- running ------------------------------------------------------------------------
    def run(self, until_icount: int | None = None) -> VmExit:
        """Run guest code until an exit; never past ``until_icount`` retired instructions."""
        c = self._core
        if until_icount is not None and c.icount >= until_icount:
            return VmExit(ExitReason.DEADLINE, self.rip, c.icount)
        budget = U64 if until_icount is None else until_icount
        x = self._enter(budget, NO_UNTIL)
        if x is not None:
            return x
        # stopped before a block that would pass the deadline (which a timer armed
        # during the run may have brought forward): run its first k instructions
        k = c.budget - c.icount
        if k <= 0:
            return VmExit(ExitReason.DEADLINE, self.rip, c.icount)
        start = self.seg(CS).base + self.rip
        target = self.nth_insn_address(start, k)
        self.uc.ctl_remove_cache(target - 1, target)
        self.uc.ctl_set_exits([target])
        try:
            x = self._enter(U64, target)
        finally:
            self.uc.ctl_set_exits([])
        if x is not None:
            return x
        return VmExit(ExitReason.DEADLINE, self.rip, c.icount)

    def step(self) -> VmExit:
        """Execute exactly one instruction (or stop earlier at an exit)."""
        return self.run(self.icount + 1)

    def _enter(self, budget: int, until: int) -> VmExit | None:
        """Enter the guest; returns the exit, or None for a budget/until stop.

        An EPT violation that a handler fixed re-enters at once (the faulting
        instruction is retried); the same violation again at the same count
        means the handler did not fix it, and ends the run.
        """
        last = None
        while True:
            x = self._enter_once(budget, until)
            if x is not _RETRY:
                return x
            v = self._last_violation
            key = (v.gpa >> 12, v.access, self._core.icount)
            if key == last:
                return VmExit(ExitReason.ERROR, self.rip, self._core.icount,
                              detail=f"{v}: the violation handler did not fix it")
            last = key

    def _violation(self, err: int) -> Violation | None:
        """The EPT violation behind a failed run, if that is what stopped it."""
        m = self._mmu
        if self._shadow != ffi.NULL:
            if err != unicorn.UC_ERR_EXCEPTION or self._shadow.pending != lib.VMM_PEND_EPT:
                return None
        elif err not in _NESTED_VIOLATIONS or not m.viol_valid:
            return None
        return Violation(int(m.viol_gpa), "rwx"[m.viol_access], int(m.viol_lin), bool(m.viol_walk),
                         bool(m.viol_hole))

    def _enter_once(self, budget: int, until: int):
        c = self._core
        if self._code_dirty:
            self.invalidate_code()
        c.budget = budget
        self._stop_requested = False
        self._bp_hit = False
        err = lib.vmm_core_run(c, self.rip, 0)
        self.exits += 1
        if self._pending_error is not None:
            e, self._pending_error = self._pending_error, None
            raise e
        flags = c.stop_flags
        cs_base = self.seg(CS).base
        lin = cs_base + self.rip
        # a guest #PF from the shadow MMU's fill, or an EPT violation: the access
        # did not happen and the instruction did not retire
        sh = self._shadow
        pf = sh != ffi.NULL and err == unicorn.UC_ERR_EXCEPTION and sh.pending in (lib.VMM_PEND_PF, lib.VMM_PEND_GP)
        viol = None if err == 0 or pf else self._violation(err)
        fetch_fault = (pf and sh.pend_access == 2) or (viol is not None and viol.access == "x") or bool(
            flags & (lib.VMM_STOP_EXC | lib.VMM_STOP_UD) and c.exc_vector == 14 and self._is_fetch_fault(lin))
        cur = c.cur
        if cur != ffi.NULL:
            tb_start, tb_icount = cur.pc, cur.icount
            end = tb_start + cur.size
            if fetch_fault:
                # the next block could not be fetched: the one that ran retired whole
                retired = tb_icount
            elif err != 0 and err in (unicorn.UC_ERR_FETCH_UNMAPPED, unicorn.UC_ERR_FETCH_PROT) or lin == end and until == NO_UNTIL:
                retired = tb_icount
            elif tb_start <= lin <= end:
                retired = self.count_insns(tb_start, lin)
            else:
                retired = tb_icount
            c.icount += retired - tb_icount
            c.cur = ffi.NULL
        icount = c.icount
        if pf:
            vec = 14 if sh.pending == lib.VMM_PEND_PF else 13
            if vec == 14:
                self.set_cr2(sh.pf_addr)
            c.exc_vector = vec
            c.exc_error = sh.pf_error
            c.exc_is_int = 0
            if self._ref_hook is not None and not fetch_fault:
                self.ref_icount -= 1  # the reference clock counted the faulting instruction
            return VmExit(ExitReason.EXCEPTION, self.rip, icount, vector=vec, error_code=int(sh.pf_error))
        if viol is not None:
            if self._ref_hook is not None and not fetch_fault:
                self.ref_icount -= 1
            self._last_violation = viol
            if self.on_ept_violation(viol):
                return _RETRY
            code = _VIOLATION_ERR[("rwx".index(viol.access), viol.hole)]
            return VmExit(ExitReason.ERROR, self.rip, icount, detail=f"{unicorn.UcError(code)} ({viol})")
        if err != 0:
            return VmExit(ExitReason.ERROR, self.rip, icount, detail=unicorn.UcError(err).__str__())
        if flags & (lib.VMM_STOP_EXC | lib.VMM_STOP_UD):
            vec = c.exc_vector
            sw = bool(flags & lib.VMM_STOP_EXC and c.exc_is_int)
            ec = c.exc_error if vec in (8, 10, 11, 12, 13, 14, 17) and not sw else None
            if self._ref_hook is not None and not sw and not self._is_trap(vec) and not fetch_fault:
                self.ref_icount -= 1
            return VmExit(ExitReason.EXCEPTION, self.rip, icount, vector=vec, error_code=ec, software=bool(sw))
        if flags & lib.VMM_STOP_INSN:
            reason = ExitReason.SYSCALL if c.trap_kind == lib.VMM_INSN_SYSCALL else ExitReason.SYSENTER
            return VmExit(reason, self.rip, icount)
        if flags & lib.VMM_STOP_IO or flags & lib.VMM_STOP_IO_LATE:
            return VmExit(ExitReason.IO, self.rip, icount)
        if flags & lib.VMM_STOP_TRAP:
            return VmExit(ExitReason.TRAP, self.rip, icount)
        if flags & lib.VMM_STOP_IRQWIN:
            return VmExit(ExitReason.INTERRUPT_WINDOW, self.rip, icount)
        if flags & lib.VMM_STOP_BUDGET:
            if icount >= budget:
                return VmExit(ExitReason.DEADLINE, self.rip, icount)
            return None
        if until != NO_UNTIL and lin == until:
            return None
        if self._bp_hit:
            self._bp_hit = False
            return VmExit(ExitReason.BREAKPOINT, self.rip, icount)
        # emu_start returned by itself: HLT (it ends its block, EIP is past it)
        if self._code_bytes(lin - 1, 1) == b"\xf4":
            return VmExit(ExitReason.HLT, self.rip, icount)
        return VmExit(ExitReason.ERROR, self.rip, icount, detail="the CPU core stopped for no known reason")

    def _is_trap(self, vector: int) -> bool:
        # #DB from single-step or a data breakpoint is reported after the instruction
        return vector == 1 and bool(self.reg("dr6") & 0x4000_000F)

    def _is_fetch_fault(self, lin: int) -> bool:
        ec = self._core.exc_error
        cr2 = self.cr2
        return not (ec & 2) and 0 <= (cr2 - lin) < 16

    # -- exception bookkeeping for delivery ------------------------------------------
    def clear_exception_state(self) -> None:
        struct.pack_into("<i", self._env, ENV_OLD_EXC, -1)

    def close(self) -> None:
        """Release the engine and the C state now rather than at garbage collection.

        The engine goes first (through the binding's own finalizer, which runs
        once), so no hook can run on freed state.  The vCPU is unusable after.
        """
        if self._core == ffi.NULL:
            return
        finalizer = getattr(self.uc, "_Uc__finalizer", None)
        if finalizer is not None:
            finalizer()
        lib.vmm_core_free(self._core)
        self._core = ffi.NULL
        if self._shadow != ffi.NULL:
            lib.vmm_shadow_free(self._shadow)
            self._shadow = ffi.NULL


@ffi.def_extern()
def vmm_py_io(handle, is_write, port, size, value, result):
    vcpu = ffi.from_handle(handle)
    try:
        return vcpu._on_io(is_write, port, size, value, result)
    except BaseException as e:  # noqa: BLE001 - never unwind through C: stop, re-raise after the run
        vcpu._pending_error = e
        vcpu._stop_requested = False
        return 1


@ffi.def_extern()
def vmm_py_event(handle, kind):
    vcpu = ffi.from_handle(handle)
    try:
        return vcpu._on_event(kind)
    except BaseException as e:  # noqa: BLE001 - never unwind through C
        vcpu._pending_error = e
        return 0
