"""The CPU core: one Unicorn engine under an exact instruction clock, shared
by a machine's vCPUs.  This is the only module of the project that imports
Unicorn.

One engine, switched between vCPUs.  A machine's vCPUs take turns (the
scheduler in vmm/machine.py); the one that runs is *loaded* in the engine,
the others are Unicorn CPU contexts (plain copies of QEMU's CPUX86State).
Switching saves one context and restores the other, and flushes the TLB (the
next vCPU has its own CR3 and mode); translated code stays, shared by all
vCPUs, so code one vCPU rewrites is invalidated for all of them by QEMU's
own self-modifying-code detection, and a kernel's text is translated once
for every CPU.  The alternative, one engine per vCPU sharing RAM through
``mem_map_ptr``, translates the same code once per vCPU and never sees
another engine's stores into code (benchmarks/smp.py measures both).

A vCPU that is not loaded keeps working as a register file: its registers
are read and written in a second, hook-less engine (``scratch``) into which
its context is restored on demand, so reading another CPU's registers (gdb,
digests, snapshots) never causes a context switch, and therefore never a TLB
flush the guest could notice.

The clock.  ``icount`` counts retired instructions of the loaded vCPU (an
instruction that faults does not retire; a trap such as INT n does; each
iteration of a REP string instruction counts once, as single-stepping with TF
sees it).  The C block hook adds a whole block's count when the block
starts; every exit then corrects by decoding the block up to where it really
stopped.  ``run(until)`` stops exactly at ``until``: the block hook stops
before the block that would pass it, and the remainder runs with Unicorn's
``until`` address set to the k-th instruction of that straight-line block.

CPU state Unicorn does not expose through registers (segment caches, CPL,
hflags, the pending exception's error code) is read and written in its
CPUX86State directly, at offsets checked when the engine is created.

MMIO.  Guest-physical pages that the MMIO bus claims are Unicorn MMIO
regions at the same (Unicorn-physical) address; in shadow mode the EPT maps
those GPAs there.  Accesses reach the bus through C callbacks
(vmm/cpu/native/core.c), which also give MMIO the exact stop port I/O has.
"""
from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import capstone
import numpy as np
import unicorn
import unicorn.unicorn_py3.unicorn as _ucmod
from unicorn import x86_const as X

from vmm.cpu import native
from vmm.exits import ExitReason, VmExit
from vmm.memory.ept import MMIO, PAGE, Ept, Violation
from vmm.memory.mmu import CWalk, mmu_view
from vmm.memory.ram import GuestMemory

if TYPE_CHECKING:
    from vmm.cpu.vcpu import Vcpu

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
ENV_CC_SRC = 152
ENV_CC_OP = 168
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
ENV_TSC_AUX = 4896   # IA32_TSC_AUX, set by the guest's WRMSR, read by RDTSCP (core.c)
MSR_TSC_AUX = 0xC000_0103
ENV_SPAN = 0x2000

CS = 1
HF_CS32 = 1 << 4
HF_CS64 = 1 << 15
MSR_EFER = 0xC000_0080

MMU_MODES = ("shadow", "nested")
_RETRY = object()  # an EPT violation a handler fixed: enter the guest again
_WATCH = object()  # a watched linear page maps elsewhere now: its hooks moved, enter again
_SMC = object()    # a block cut by its own store was accounted for: enter again
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
    "fpcw": X.UC_X86_REG_FPCW, "fpsw": X.UC_X86_REG_FPSW, "fptag": X.UC_X86_REG_FPTAG,
    "fip": X.UC_X86_REG_FIP, "fcs": X.UC_X86_REG_FCS, "fdp": X.UC_X86_REG_FDP,
    "fds": X.UC_X86_REG_FDS, "fop": X.UC_X86_REG_FOP, "mxcsr": X.UC_X86_REG_MXCSR,
    **{f"st{i}": getattr(X, f"UC_X86_REG_ST{i}") for i in range(8)},
    **{f"xmm{i}": getattr(X, f"UC_X86_REG_XMM{i}") for i in range(16)},
    **{f"ymm{i}": getattr(X, f"UC_X86_REG_YMM{i}") for i in range(16)},
}
_GDTR, _IDTR = X.UC_X86_REG_GDTR, X.UC_X86_REG_IDTR
WATCH_READ, WATCH_WRITE = 1, 2
ACCESS_WRITE = unicorn.UC_MEM_WRITE


class VcpuError(RuntimeError):
    """The CPU core could not be set up (an unsupported Unicorn build)."""


def _uc_fn(name: str) -> int:
    try:
        return ctypes.cast(getattr(_ucmod.uclib, name), ctypes.c_void_p).value or 0
    except AttributeError:
        return 0


_rdmsr_installed = False


def _install_rdmsr() -> int:
    """Put msr.c's RDMSR in front of Unicorn's helper (once per process); 0 on success.

    The helper's first whole instructions covering the 12-byte jump are copied
    into a trampoline, so they must not depend on where they run: no branch,
    call or RIP-relative operand (capstone says)."""
    global _rdmsr_installed
    if _rdmsr_installed:
        return 0
    addr = _uc_fn("helper_rdmsr_x86_64")
    if not addr:
        return -1
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    length = 0
    for insn in md.disasm(ctypes.string_at(addr, 64), addr):
        if insn.group(capstone.CS_GRP_JUMP) or insn.group(capstone.CS_GRP_CALL) \
                or insn.group(capstone.CS_GRP_RET) or "rip" in insn.op_str:
            return -3
        length += insn.size
        if length >= 12:
            rc = lib.vmm_msr_install(addr, length)
            _rdmsr_installed = rc == 0
            return rc
    return -3


def _new_uc(tcg_buffer: int) -> unicorn.Uc:
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    # Sandy Bridge: LM and NX, but RDRAND/RDSEED raise #UD (UNICORN.md 5)
    uc.ctl_set_cpu_model(X.UC_CPU_X86_SANDYBRIDGE)
    # Unicorn reserves 1 GiB of code buffer per engine by default; test runs
    # and time travel keep many machines alive, and guest code is small
    uc.ctl_set_tcg_buffer_size(tcg_buffer)
    return uc


def copy_context(dst, src) -> None:
    """Copy one CPU context into another of the same engine kind."""
    if dst.size != src.size:
        raise VcpuError("CPU contexts of different sizes")
    ctypes.memmove(dst.context, src.context, dst.size)


def context_bytes(ctx) -> bytes:
    return bytes(ctx)


def _attach(uc: unicorn.Uc) -> object:
    core = lib.vmm_core_new()
    if core == ffi.NULL:
        raise MemoryError("cannot allocate the vCPU core")
    rc = lib.vmm_core_attach(core, ffi.cast("void *", uc._uch.value), _uc_fn("reg_read_x86_64"),
                             _uc_fn("cpu_loop_exit_x86_64"))
    if rc != 0:
        lib.vmm_core_free(core)
        raise VcpuError(f"cannot locate the CPU state inside this Unicorn build (code {rc}); Unicorn 2.1.4 is required")
    return core


class RegFile:
    """One engine's CPU state as the VMM reads and writes it: Unicorn's
    register API and the raw CPUX86State bytes."""

    __slots__ = ("core", "env", "uc")

    def __init__(self, uc: unicorn.Uc, core) -> None:
        self.uc = uc
        self.core = core
        self.env = ffi.buffer(core.env, ENV_SPAN)

    def reg_read(self, name: str) -> int:
        return self.uc.reg_read(REG_IDS[name])

    def reg_write(self, name: str, value: int) -> None:
        self.uc.reg_write(REG_IDS[name], value)

    def msr_read(self, index: int) -> int:
        return self.uc.reg_read(X.UC_X86_REG_MSR, index)

    def msr_write(self, index: int, value: int) -> None:
        self.uc.reg_write(X.UC_X86_REG_MSR, (index, value & U64))

    def set_gdtr(self, base: int, limit: int) -> None:
        self.uc.reg_write(_GDTR, (0, base, limit, 0))

    def set_idtr(self, base: int, limit: int) -> None:
        self.uc.reg_write(_IDTR, (0, base, limit, 0))


class Engine:
    """The Unicorn engine of one machine, run by one vCPU at a time.

    ``mmu`` chooses how guest memory is reached (DESIGN.md, "Memory: two-level
    translation"): "shadow" (default) puts Unicorn in UC_TLB_VIRTUAL mode and
    fills its TLB from C by walking the guest's page tables and then the EPT
    (vmm/cpu/native/mmu.c); "nested" lets Unicorn walk the guest's tables
    itself, the EPT being realised as Unicorn's memory map.  Guests see the
    same in both.
    """

    def __init__(self, memory: GuestMemory, mmu: str = "shadow", ept: Ept | None = None):
        if mmu not in MMU_MODES:
            raise ValueError(f"mmu must be one of {', '.join(MMU_MODES)}, not {mmu!r}")
        self.memory = memory
        self.mmu_mode = mmu
        self.ept = ept if ept is not None else Ept(memory)
        if self.ept.memory is not memory:
            raise ValueError("the EPT belongs to another guest memory")
        uc = _new_uc(TCG_BUFFER)
        self.uc = uc
        uc.mem_map_ptr(0, memory.size, unicorn.UC_PROT_ALL, memory.address())
        self._core = _attach(uc)
        lib.vmm_core_set_unicorn_fns(self._core, _uc_fn("cpu_restore_state_x86_64"),
                                     _uc_fn("tb_invalidate_phys_range_x86_64"),
                                     _uc_fn("qemu_ram_addr_from_host_x86_64"),
                                     _uc_fn("tcg_tb_phys_invalidate_count_x86_64"), TCG_BUFFER)
        rc = lib.vmm_fix_cmpxchg(self._core, _uc_fn("helper_cmpxchg8b_unlocked_x86_64"),
                                 _uc_fn("helper_cmpxchg16b_unlocked_x86_64"), _uc_fn("cpu_cc_compute_all_x86_64"),
                                 _uc_fn("cpu_ldq_data_ra_x86_64"), _uc_fn("cpu_stq_data_ra_x86_64"),
                                 _uc_fn("raise_exception_ra_x86_64"))
        if rc != 0:
            raise VcpuError(f"cannot install the CMPXCHG8B/16B flags fix in this Unicorn build (code {rc})")
        self.main = RegFile(uc, self._core)
        self._env = self.main.env
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
        self._nth_cache: dict[tuple[int, bytes, int], int] = {}
        memory.on_host_write = self._host_wrote
        self._stop_requested = False
        self._pending_error: BaseException | None = None
        self._ref_hook = None
        self._breakpoints: set[int] = set()
        self._bp_hooks: dict[int, int] = {}
        self._bp_hit = False
        self.exits = 0
        self.switches = 0
        # deliver common exceptions in C without leaving the guest (deliver.c); the
        # machine turns it off where Python must see every exception (--trace, introspection)
        self.fast_delivery = True
        self._lwatch: dict[int, tuple] = {}    # linear watches: handle -> (kinds, begin, end, callback, hooks)
        self._lwatch_next = 1
        self.loaded: Vcpu | None = None
        self._parked: Vcpu | None = None
        self.vcpus: list[Vcpu] = []
        self._mmio_pages: dict[int, int] = {}          # page -> number of bus claims on it
        self._background: set[int] = set()             # pages above RAM nobody claims, answering zeros
        self._in_emu = False                           # inside emu_start (a device callback is running)
        self._deferred: list[tuple[int, int, bool]] = []   # MMIO claim changes made during a run
        self._mmio_regions: dict[int, tuple[int, object]] = {}   # first page -> (pages, C region)
        # (is_write, gpa, size, value, vCPU id) -> the value read (0 for a write): MmioBus.access
        self.mmio_handler: Callable[[int, int, int, int, int], int] | None = None
        # a tick counter read in C (core.c, ctr_answer): its address and the device's
        # view (Hpet.counter_view)
        self._ctr: tuple[int, Callable[[], tuple[int, int, int, bool]]] | None = None
        self._cmp: tuple[object, Callable[[], tuple[int, int]]] | None = None   # its comparators
        self.fast_counter = True      # False: every read goes to the device (the reference)
        # Exit points come from an explicit set (empty except for exact stops):
        # with a plain `until`, Unicorn invalidates code at until-1 after every
        # run, and that lookup of an unmapped address clobbers the guest's CR2.
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self.reset_context = self._make_reset_context()
        self._check_layout()
        self._shadow = ffi.NULL
        self._setup_mmu()
        # the register file of vCPUs that are not loaded
        self._scratch_uc = _new_uc(1 << 20)
        self._scratch_core = _attach(self._scratch_uc)
        self.scratch = RegFile(self._scratch_uc, self._scratch_core)

    # -- set-up ---------------------------------------------------------------
    @staticmethod
    def _make_reset_context():
        """The CPU state of a fresh 16-bit engine (the engine itself is released)."""
        u16 = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_16)
        u16.ctl_set_cpu_model(X.UC_CPU_X86_SANDYBRIDGE)
        u16.ctl_set_tcg_buffer_size(1 << 20)
        return u16.context_save()

    def new_context(self):
        """A context holding the architectural reset state (for a new vCPU)."""
        ctx = self.uc.context_save()
        copy_context(ctx, self._reset_ctx64)
        return ctx

    def _u64(self, off: int) -> int:
        return struct.unpack_from("<Q", self._env, off)[0]

    def _u32(self, off: int) -> int:
        return struct.unpack_from("<I", self._env, off)[0]

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
        aux = uc.reg_read(X.UC_X86_REG_MSR, MSR_TSC_AUX)
        uc.reg_write(X.UC_X86_REG_MSR, (MSR_TSC_AUX, 0x5A5A_1234))
        ok = ok and self._u64(ENV_TSC_AUX) == 0x5A5A_1234 and lib.VMM_ENV_TSC_AUX == ENV_TSC_AUX
        uc.reg_write(X.UC_X86_REG_MSR, (MSR_TSC_AUX, aux))
        # SYSCALL and SYSENTER in C (deliver.c fast_sysinsn) read their MSRs here
        for msr, off in ((0x174, lib.VMM_ENV_SYSENTER_CS), (0xC000_0081, lib.VMM_ENV_STAR),
                         (0xC000_0082, lib.VMM_ENV_LSTAR), (0xC000_0084, lib.VMM_ENV_FMASK)):
            old = uc.reg_read(X.UC_X86_REG_MSR, msr)
            uc.reg_write(X.UC_X86_REG_MSR, (msr, 0x5A5A))
            ok = ok and self._u64(off) == 0x5A5A
            uc.reg_write(X.UC_X86_REG_MSR, (msr, old))
        # the C walk reads CR0-4, A20 and EFER at these offsets too
        ok = ok and (lib.VMM_ENV_CR, lib.VMM_ENV_A20, lib.VMM_ENV_EFER) == (ENV_CR, ENV_A20, ENV_EFER)
        if not ok:
            raise VcpuError("this Unicorn build's CPU state layout is not the one vmm was written for (need 2.1.4)")
        uc.context_restore(self.reset_context)
        self._reset_ctx64 = uc.context_save()

    def _setup_mmu(self) -> None:
        """The EPT's C view, and the shadow MMU's TLB fill or the nested MMU's hooks."""
        ept = self.ept
        m = mmu_view(ept)
        m.pool = ffi.NULL
        m.pool_frames = 0
        self._mmu = m
        ept.mmu_mode = self.mmu_mode
        ept.on_change = self._ept_changed
        ept.on_pool = self._ept_pool
        ept.on_code_write = self._frame_wrote
        self.walk_phys = ept.phys
        # the VMM's own walks (delivery, the BIOS, the debugger): the C walk over the view the
        # shadow MMU uses (its pool frames included); vmm/memory/paging.py is its reference
        self.walk = CWalk(ept, m).translate
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
            rc = lib.vmm_shadow_install(s, _uc_fn("unicorn_fill_tlb_x86_64"), _uc_fn("x86_cpu_tlb_fill_x86_64"),
                                        _uc_fn("tlb_flush_x86_64"), _uc_fn("tlb_flush_page_by_mmuidx_x86_64"),
                                        _uc_fn("tlb_set_page_x86_64"))
            if rc != 0:
                raise VcpuError(f"cannot install the shadow MMU in this Unicorn build (code {rc}); "
                                "Unicorn 2.1.4 is required (or use --mmu nested)")
        if ept.pool is not None:
            self._ept_pool(ept.pool_first, ept.pool_frames, ept.pool.ctypes.data)
        # an EPT changed before this engine was attached: realise what differs from boot
        if ept.touched:
            boot = ept.boot_entries()
            gpns = np.flatnonzero(ept.entries != boot)
            if gpns.size:
                self._ept_changed(gpns, boot[gpns])

    # -- vCPUs: which one is loaded --------------------------------------------------
    def load(self, vcpu: Vcpu) -> None:
        """Make ``vcpu`` the one that runs (a context switch if another is loaded)."""
        cur = self.loaded
        if cur is vcpu:
            return
        c = self._core
        if cur is not None:
            self.uc.context_update(cur._ctx)
            cur._icount = c.icount
            cur._where = "ctx"
        if self._parked is vcpu:
            self._scratch_uc.context_update(vcpu._ctx)
            self._parked = None
        self.uc.context_restore(vcpu._ctx)
        vcpu._where = "engine"
        self.loaded = vcpu
        c.icount = vcpu._icount
        c.cur = ffi.NULL
        c.irq_pending = lib.VMM_IRQ_WAITING if vcpu._irq_pending else 0
        lib.vmm_mmio_replay_clear(c)
        if cur is not None:
            self.switches += 1
            lib.vmm_core_flush_tlb(c)   # another CR3, another mode; translated code stays

    def regfile(self, vcpu: Vcpu) -> RegFile:
        """Where ``vcpu``'s registers are now: the engine, or the scratch register file."""
        if vcpu._where == "engine":
            return self.main
        if self._parked is not vcpu:
            p = self._parked
            if p is not None:
                self._scratch_uc.context_update(p._ctx)
                p._where = "ctx"
            self._scratch_uc.context_restore(vcpu._ctx)
            self._parked = vcpu
            vcpu._where = "scratch"
        return self.scratch

    def sync_context(self, vcpu: Vcpu) -> None:
        """Bring ``vcpu``'s context object up to date (before copying it)."""
        if vcpu._where == "engine":
            self.uc.context_update(vcpu._ctx)
        elif vcpu._where == "scratch":
            self._scratch_uc.context_update(vcpu._ctx)

    def forget(self, vcpu: Vcpu) -> None:
        """``vcpu``'s context object was replaced wholesale: reload it where it lives."""
        if vcpu._where == "engine":
            self.uc.context_restore(vcpu._ctx)
            self._core.cur = ffi.NULL
            lib.vmm_core_flush_tlb(self._core)
        elif vcpu._where == "scratch":
            self._scratch_uc.context_restore(vcpu._ctx)

    def flush_tlb(self) -> None:
        """Drop every cached translation (after the VMM changed paging state, the A20 gate,
        the guest's page tables behind the CPU's back, or the EPT)."""
        lib.vmm_core_flush_tlb(self._core)  # also forgets the shadow MMU's W^X grants

    # -- host writes to guest memory ---------------------------------------------------
    def _host_wrote(self, pa: int, n: int) -> None:
        """The VMM wrote guest RAM at ``pa`` (delivery, firmware, DMA): drop translated
        code of exactly those bytes, and log the pages dirty."""
        if n > 0 and lib.vmm_core_host_write(self._core, ffi.cast("uint8_t *", self.memory.address() + pa), n) \
                and self._in_emu:
            # a device wrote over translated code during the run (DMA from an OUT):
            # end the block after this instruction, so the rest of it is the new code
            self.request_stop()
        self.ept.note_host_write(pa, n)

    def _frame_wrote(self, host_pa: int, n: int) -> None:
        """A write through the EPT into a pool frame (copy-on-write, sharing)."""
        ept = self.ept
        hfn = host_pa // PAGE
        if ept.pool is not None and ept.pool_first <= hfn < ept.pool_first + ept.pool_frames:
            addr = ept.frame_address(hfn) + host_pa % PAGE
            lib.vmm_core_host_write(self._core, ffi.cast("uint8_t *", addr), n)
        else:
            self._host_wrote(host_pa, n)

    def remove_code(self, lin: int, n: int) -> None:
        """Drop translated code at linear [lin, lin+n) of the loaded vCPU."""
        if lib.vmm_core_invalidate_linear(self._core, lin, n) != 0:
            self.uc.ctl_remove_cache(lin, lin + n)

    def invalidate_code(self) -> None:
        """Drop all translated code (hooks added or removed change every block)."""
        self.uc.ctl_flush_tb()
        lib.vmm_core_flush_tbc(self._core)

    @property
    def fast_delivered(self) -> int:
        """Exceptions and INT n delivered in C (deliver.c), not exits."""
        return int(self._core.fast_delivered)

    @property
    def fast_sysinsns(self) -> tuple[int, int]:
        """SYSCALLs and SYSENTERs done in C (deliver.c), not exits."""
        c = self._core
        return int(c.fast_syscalls), int(c.fast_sysenters)

    def deliver_interrupt(self, vector: int) -> bool:
        """Deliver an external interrupt to the loaded vCPU in C (deliver.c), between
        runs; False: nothing done, delivery.py must (it stays the reference)."""
        if self._ref_hook is not None:
            return False
        c = self._core
        return lib.vmm_core_deliver_irq(c, vector, lib.FD_ON | (lib.FD_LOG if self.ept.logging else 0)) == 1

    @property
    def code_invalidations(self) -> int:
        return int(self._core.code_invalidations)

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
            if (o | n) & MMIO:
                continue   # MMIO pages are Unicorn MMIO regions, mapped by map_mmio
            gpa = g * PAGE
            was = bool(o & 0x10) and bool(o & 7)
            now = bool(n & 0x10) and bool(n & 7)
            if was and now and (o >> 12) == (n >> 12):
                uc.mem_protect(gpa, PAGE, n & 7)
                continue
            if was:
                uc.mem_unmap(gpa, PAGE)
            if now:
                uc.mem_map_ptr(gpa, PAGE, n & 7, ept.frame_address(n >> 12))

    def _ept_pool(self, first: int, frames: int, address: int) -> None:
        m = self._mmu
        m.pool = ffi.cast("uint8_t *", address)
        m.pool_first = first
        m.pool_frames = frames
        if self._shadow != ffi.NULL:
            # host frames live in Unicorn's physical space; only the EPT leads there
            self.uc.mem_map_ptr(first * PAGE, frames * PAGE, unicorn.UC_PROT_ALL, address)
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

    # -- MMIO regions ------------------------------------------------------------------
    def mmio_claims_changed(self, base: int, length: int, added: bool) -> None:
        """The MMIO bus gained or lost a claim: route its pages to the bus, or stop.

        Pages are shared by claims (a 1 KiB HPET and a neighbour); a page is an
        MMIO page while any claim covers it.  Claims inside RAM are not routed:
        RAM wins, as a chipset decodes DRAM below the top of memory first.  A
        change made while the vCPU runs (a device moving a BAR from inside an
        access) takes effect once it has stopped, right after that instruction:
        Unicorn's memory map must not change under the code it is running.
        """
        if self._in_emu:
            self._deferred.append((base, length, added))
            self.request_stop()
            return
        first, last = base // PAGE, (base + length - 1) // PAGE
        changed = []
        for p in range(first, last + 1):
            if p < self.ept.ram_frames:
                continue
            n = self._mmio_pages.get(p, 0) + (1 if added else -1)
            if n > 0:
                self._mmio_pages[p] = n
                if n == 1 and added:
                    changed.append(p)
            else:
                self._mmio_pages.pop(p, None)
                if not added:
                    changed.append(p)
        for p in changed:
            if added:
                self._map_mmio_page(p)
            else:
                self._unmap_mmio_page(p)

    def _map_mmio_page(self, page: int) -> None:
        if page in self._background:
            self._background.discard(page)   # already routed to the bus; now a claim covers it
            return
        if page >= self.ept.npages:
            raise VcpuError(f"MMIO at {page * PAGE:#x} is beyond the guest-physical space")
        r = lib.vmm_mmio_map(self._core, page * PAGE, PAGE)
        if r == ffi.NULL:
            raise VcpuError(f"cannot map MMIO at {page * PAGE:#x}")
        self._mmio_regions[page] = (1, r)
        self.ept.set_mmio(page * PAGE, True)

    def _unmap_mmio_page(self, page: int) -> None:
        if page in self._background:
            self._background.discard(page)
        _, r = self._mmio_regions.pop(page)
        self.ept.set_mmio(page * PAGE, False)
        rc = lib.vmm_mmio_unmap(self._core, r)
        if rc != 0:
            raise VcpuError(f"cannot unmap MMIO at {page * PAGE:#x} (uc_err {rc})")
        lib.vmm_core_flush_tlb(self._core)

    def _apply_deferred(self) -> None:
        pending, self._deferred = self._deferred, []
        for base, length, added in pending:
            self.mmio_claims_changed(base, length, added)

    MAX_BACKGROUND = 4096

    def _background_page(self, v: Violation) -> bool:
        """A guest access to guest-physical space above RAM that nothing claims: it
        reads zeros and writes go nowhere, as QEMU's unassigned memory (a PC bus would
        answer all ones, a master abort: tests/test_hostile_mmu.py).  The page is
        routed to the MMIO bus, which answers so for unclaimed addresses, and the
        instruction is retried."""
        page = v.gpa // PAGE
        if not v.hole or page < self.ept.ram_frames or page >= self.ept.npages or page in self._mmio_regions:
            return False
        if len(self._background) >= self.MAX_BACKGROUND:
            return False
        r = lib.vmm_mmio_map(self._core, page * PAGE, PAGE)
        if r == ffi.NULL:
            return False
        self._mmio_regions[page] = (1, r)
        self._background.add(page)
        self.ept.set_mmio(page * PAGE, True)
        return True

    @property
    def mmio_accesses(self) -> int:
        return int(self._core.mmio_count)

    @property
    def mmio_exact_stops(self) -> int:
        """MMIO accesses that stopped the vCPU right after their instruction: by running it
        again (mmio_abort) or, for a plain MOV store, at once (core.c mmio_store_stop)."""
        return int(self._core.mmio_aborts) + int(self._core.mmio_store_stops)

    @property
    def mmio_store_stops(self) -> int:
        return int(self._core.mmio_store_stops)

    @property
    def mmio_store_stop(self) -> bool:
        """False: every MMIO stop runs its instruction again (the reference for tests)."""
        return not self._core.mmio_store_stop_off

    @mmio_store_stop.setter
    def mmio_store_stop(self, on: bool) -> None:
        self._core.mmio_store_stop_off = 0 if on else 1

    # -- instruction bytes ------------------------------------------------------------
    @property
    def code_bits(self) -> int:
        hf = self._u32(ENV_HFLAGS)
        return 64 if hf & HF_CS64 else 32 if hf & HF_CS32 else 16

    def cs_base(self) -> int:
        return struct.unpack_from("<Q", self._env, ENV_SEGS + CS * SEG_SIZE + 8)[0]

    def rip(self) -> int:
        return self._u64(ENV_EIP)

    def code_bytes(self, lin: int, n: int) -> bytes | None:
        """Guest code at linear ``lin`` as the loaded vCPU fetches it (None if unreadable)."""
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
        code = self.code_bytes(start, n)
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

    def nth_insn_address(self, start: int, k: int, size: int | None = None) -> int:
        """Linear address of the k-th instruction after ``start`` on a straight line.

        ``size``: the length of the block that starts there, if known (its
        bytes hold the k instructions; the offset is cached by those bytes)."""
        bits = self.code_bits
        if size is not None:
            code = self.code_bytes(start, size)
            if code is not None:
                key = (bits, code, k)
                hit = self._nth_cache.get(key)
                if hit is None:
                    hit, whole = self._nth_offset(code, start, k, bits)
                    if not whole:     # not k instructions in those bytes after all
                        return self.nth_insn_address(start, k)
                    if len(self._nth_cache) > 65536:
                        self._nth_cache.clear()
                    self._nth_cache[key] = hit
                return start + hit
        code = self.code_bytes(start, 16 * k + 16) or b""
        return start + self._nth_offset(code, start, k, bits)[0]

    def _nth_offset(self, code: bytes, start: int, k: int, bits: int) -> tuple[int, bool]:
        """(offset of the k-th instruction in ``code``, whether ``code`` holds k whole
        instructions; if not, the offset is the end of the ones it holds)."""
        pos = 0
        i = 0
        for _a, size, _m, _o in self._disasm[bits].disasm_lite(code, start):
            if i == k:
                break
            pos += size
            i += 1
        return pos, i == k

    def disassemble(self, lin: int, n: int = 1) -> list[tuple[int, str]]:
        """(address, text) of up to ``n`` instructions at linear ``lin`` of the loaded vCPU."""
        code = self.code_bytes(lin, 15 * n) or b""
        out = []
        for i in self._disasm[self.code_bits].disasm(code, lin, n):
            out.append((i.address, f"{i.mnemonic} {i.op_str}".strip()))
        return out

    def unicorn_translate(self, lin: int, access: str) -> tuple[bool, int]:
        """(True, physical) or (False, 0) from Unicorn's own walk for the loaded vCPU
        (tests hold the VMM's walks against it; a failure leaves CR2 and the error
        code in the CPU state, as a #PF would)."""
        out = ctypes.c_uint64(0)
        prot = {"r": 1, "w": 2, "x": 4}[access]
        err = _ucmod.uclib.uc_vmem_translate(self.uc._uch, ctypes.c_uint64(lin), prot, ctypes.byref(out))
        return err == 0, out.value

    # -- observation hooks (debugger, tracer): never change what the guest computes ----
    def add_watch_hook(self, kinds: int, begin: int, end: int, callback) -> int:
        """Call ``callback(access, address, size, value)`` for guest data accesses to
        linear [begin, end]; ``kinds`` is WATCH_READ | WATCH_WRITE.  Returns a handle."""
        types = (unicorn.UC_HOOK_MEM_READ if kinds & WATCH_READ else 0) | (
            unicorn.UC_HOOK_MEM_WRITE if kinds & WATCH_WRITE else 0)
        h = self.uc.hook_add(types, lambda uc, access, address, size, value, _: callback(access, address, size, value),
                             None, begin, end)
        self.invalidate_code()
        return h

    def add_linear_watch(self, kinds: int, begin: int, end: int, callback) -> int:
        """Call ``callback(access, address, size, value)`` for guest data accesses to
        linear [begin, end] of the loaded vCPU's address space, ``address`` linear.

        Unicorn's memory hooks see physical addresses (the frames behind the EPT),
        so each watched page is hooked at the frame it maps to now, and follows it:
        the shadow MMU refuses a fill that maps a watched page elsewhere (a CR3
        switch, a changed PTE once flushed), the hooks move, the instruction runs
        again (watch.c).  Under the nested MMU the pages are looked up again at
        every exit.  Returns a handle for remove_linear_watch."""
        pages = set(range(begin & ~0xFFF, end + 1, PAGE))
        for _kinds, b, e, _cb, _hooks in self._lwatch.values():
            pages.update(range(b & ~0xFFF, e + 1, PAGE))
        if end < begin or len(pages) > lib.VMM_WATCH_PAGES:
            raise ValueError(f"watchpoints cover at most {lib.VMM_WATCH_PAGES} pages together")
        h = self._lwatch_next
        self._lwatch_next += 1
        self._lwatch[h] = (kinds, begin, end, callback, {})
        self.flush_tlb()   # every access to the page fills again, through the check
        self._watch_follow()
        return h

    def remove_linear_watch(self, handle: int) -> None:
        w = self._lwatch.pop(handle, None)
        if w is None:
            return
        for _phys, hook in w[4].values():
            if hook is not None:
                self.uc.hook_del(hook)
        self._watch_follow()
        self.invalidate_code()

    def _watch_phys(self, page: int) -> int | None:
        """The Unicorn-physical page linear ``page`` maps to now (None: not mapped).  An
        MMIO page is the bus's region at its own address: the frame the fill sees too."""
        v = self.loaded if self.loaded is not None else self.vcpus[0]
        try:
            gpa = v.translate(page, "r", set_ad=False)
        except Exception:  # noqa: BLE001 - not mapped (a #PF), or no memory there
            return None
        if self.mmu_mode == "nested":
            return gpa & ~0xFFF
        gpn = gpa >> 12
        e = int(self.ept.entries[gpn]) if gpn < self.ept.npages else 0
        if not e & lib.VMM_EPT_VALID:
            return None
        return (e >> 12) << 12

    def _watch_follow(self) -> None:
        """Hook every watched page at the frame it maps to now; list them for the fill's check."""
        table: dict[int, int | None] = {}
        changed = False
        for kinds, begin, end, callback, hooks in self._lwatch.values():
            types = (unicorn.UC_HOOK_MEM_READ if kinds & WATCH_READ else 0) | (
                unicorn.UC_HOOK_MEM_WRITE if kinds & WATCH_WRITE else 0)
            for page in range(begin & ~0xFFF, end + 1, PAGE):
                phys = table[page] if page in table else self._watch_phys(page)
                table[page] = phys
                old = hooks.get(page)
                if old is not None and old[0] == phys:
                    continue
                if old is not None and old[1] is not None:
                    self.uc.hook_del(old[1])
                hook = None
                if phys is not None:
                    shift = phys - page
                    hook = self.uc.hook_add(
                        types, lambda uc, access, address, size, value, _, d=shift, cb=callback:
                        cb(access, address - d, size, value), None, max(begin, page) + shift,
                        min(end, page + PAGE - 1) + shift)
                hooks[page] = (phys, hook)
                changed = True
        c = self._core
        c.watch_n = 0
        for i, page in enumerate(sorted(table)):
            c.watch_lin[i] = page
            c.watch_phys[i] = U64 if table[page] is None else table[page]
        c.watch_n = len(table)
        if changed:
            self.invalidate_code()

    def watch_stops(self, on: bool) -> None:
        """While on, stop_after_access() stops the vCPU right after the instruction
        making the access (a C check before each instruction)."""
        rc = lib.vmm_core_watch_stops(self._core, 1 if on else 0)
        if rc != 0:
            raise VcpuError(f"the watchpoint stop hook failed (uc_err {rc})")
        self.invalidate_code()

    def stop_after_access(self) -> None:
        """From a watch callback: stop before the next instruction (a BREAKPOINT exit)."""
        self._core.stop_next = 1

    def add_code_hook(self, callback, begin: int = 1, end: int = 0) -> int:
        """Call ``callback(address, size)`` before each instruction in [begin, end] (all when begin > end)."""
        h = self.uc.hook_add(unicorn.UC_HOOK_CODE, lambda uc, address, size, _: callback(address, size),
                             None, begin, end)
        self.invalidate_code()
        return h

    def remove_hook(self, handle: int) -> None:
        self.uc.hook_del(handle)
        self.invalidate_code()

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
        for a in sorted(self._breakpoints - new):
            self.uc.hook_del(self._bp_hooks.pop(a))
        for a in sorted(new - self._breakpoints):
            self._bp_hooks[a] = self.uc.hook_add(unicorn.UC_HOOK_CODE, self._on_breakpoint, None, a, a)
        self._breakpoints = new
        self.invalidate_code()

    def _on_breakpoint(self, uc, address, size, _):
        self._bp_hit = True
        uc.emu_stop()

    def enable_reference_clock(self) -> None:
        """Count instructions the slow, obvious way, to check the C clock against.

        A Python code hook counts every instruction that starts (for the loaded
        vCPU); an instruction that faults started but did not retire, so
        exception exits that are faults take one back.  Costs ~1 us per
        instruction: tests only.
        """
        for v in self.vcpus:
            v.ref_icount = v.icount

        def on_code(uc, address, size, user_data):
            self.loaded.ref_icount += 1

        self._ref_hook = self.uc.hook_add(unicorn.UC_HOOK_CODE, on_code)
        self.invalidate_code()

    # -- callbacks from C ------------------------------------------------------------
    def request_stop(self) -> None:
        """Stop the loaded vCPU right after the instruction now executing (from a hook)."""
        self._stop_requested = True

    def set_trap_range(self, lo: int, length: int) -> None:
        """Blocks starting in [lo, lo+length) stop with a TRAP exit (the HLE firmware's entry points)."""
        lib.vmm_core_set_trap_range(self._core, lo, length)

    def set_irq_pending(self, pending: bool) -> None:
        c = self._core
        c.irq_pending = lib.VMM_IRQ_WAITING if pending else 0

    def _on_io(self, is_write: int, port: int, size: int, value: int, result) -> int:
        v = self.loaded
        if is_write:
            v.io_handler(1, port, size, value)
        else:
            result[0] = v.io_handler(0, port, size, 0) & 0xFFFF_FFFF
        if self._stop_requested:
            self._stop_requested = False
            return 1
        return 0

    def set_arch_capabilities(self, value: int | None) -> None:
        """What RDMSR of IA32_ARCH_CAPABILITIES (0x10A) reads on this engine's
        vCPUs (msr.c); None: Unicorn's own answer, 0."""
        if value is not None:
            rc = _install_rdmsr()
            if rc != 0:
                raise VcpuError(f"cannot answer RDMSR of IA32_ARCH_CAPABILITIES in this Unicorn build (code {rc})")
        if lib.vmm_core_set_arch_cap(self._core, value is not None, (value or 0) & 0xFFFF_FFFF_FFFF_FFFF) != 0:
            raise VcpuError("the RDMSR replacement is not installed")

    def set_tick_counter(self, gpa: int, view: Callable[[], tuple[int, int, int, bool]],
                         comparators: tuple[int, int, object, Callable[[], tuple[int, int]]] | None = None) -> None:
        """Answer reads of the 64-bit counter at ``gpa`` in C, from ``view()`` (see
        Hpet.counter_view); the device calls ``tick_counter_changed`` when its view changes.

        ``comparators`` (gpa of the first, stride, the device's uint64 array, and a
        function giving the (inert, 32-bit) timer bitmasks; see Hpet.comparator_sink):
        writes to an inert timer's comparator are stored there in C on the same terms."""
        self._ctr = (gpa, view)
        self._cmp = None
        c = self._core
        c.cmp_gpa = 0
        if comparators is not None:
            first, stride, array, masks = comparators
            buf = ffi.from_buffer("uint64_t[]", array)
            self._cmp = (buf, masks)      # keeps the buffer alive while C points into it
            c.cmp_val, c.cmp_stride, c.cmp_n = buf, stride, len(array)
            c.cmp_gpa = first
        self.tick_counter_changed()

    def tick_counter_changed(self) -> None:
        c = self._core
        counter, sync, limit, running = self._ctr[1]()
        c.ctr_base, c.ctr_sync, c.ctr_limit, c.ctr_frozen = counter & U64, sync & U64, limit & U64, not running
        if self._cmp is not None:
            c.cmp_inert, c.cmp_mode32 = self._cmp[1]()

    def _learn_count_here(self) -> None:
        """Record in the running block's cache entry how many of its instructions retire
        before the current EIP, so that the C hooks (RDTSC, the tick counter: core.c's
        fd_retired) answer a read at this EIP themselves the next time."""
        core = self._core
        cur = core.cur
        if core.tsc_fast and cur != ffi.NULL and not core.smc_pending:
            lin = self.cs_base() + self.rip()
            if 0 < lin - cur.pc < cur.size:
                cur.xoff = lin - cur.pc + 1
                cur.xn = self.count_insns(cur.pc, lin)

    def _on_mmio(self, is_write: int, gpa: int, size: int, value: int, result) -> int:
        h = self.mmio_handler
        if h is None:
            result[0] = 0             # no bus: unassigned memory, zeros
        elif is_write:
            h(1, gpa, size, value, self.loaded.id)
        else:
            result[0] = h(0, gpa, size, 0, self.loaded.id) & ((1 << (8 * size)) - 1)
        ctr = self._ctr
        if ctr is not None and gpa - ctr[0] in (0, 4):
            self._learn_count_here()       # for the C answer of the counter next time
        if self._stop_requested:
            self._stop_requested = False
            return 1
        return 0

    def _on_event(self, kind: int) -> int:
        v = self.loaded
        env = self._env
        if kind == lib.VMM_EV_CPUID:
            leaf = self._u64(ENV_REGS + 0) & 0xFFFF_FFFF
            sub = self._u64(ENV_REGS + 8) & 0xFFFF_FFFF
            a, b, c, d = v.cpuid(leaf, sub)
            struct.pack_into("<Q", env, ENV_REGS + 0, a & 0xFFFF_FFFF)
            struct.pack_into("<Q", env, ENV_REGS + 24, b & 0xFFFF_FFFF)
            struct.pack_into("<Q", env, ENV_REGS + 8, c & 0xFFFF_FFFF)
            struct.pack_into("<Q", env, ENV_REGS + 16, d & 0xFFFF_FFFF)
            return 1
        if kind in (lib.VMM_EV_RDTSC, lib.VMM_EV_RDTSCP):
            tsc = v.rdtsc() & U64
            self._learn_count_here()           # for the C answer next time (core.c)
            struct.pack_into("<Q", env, ENV_REGS + 0, tsc & 0xFFFF_FFFF)
            struct.pack_into("<Q", env, ENV_REGS + 16, tsc >> 32)
            if kind == lib.VMM_EV_RDTSCP:
                struct.pack_into("<Q", env, ENV_REGS + 8, v.tsc_aux)   # the MSR, as Unicorn reads it
            return 1
        return 0

    # -- running ------------------------------------------------------------------------
    @property
    def icount(self) -> int:
        return self._core.icount

    @icount.setter
    def icount(self, v: int) -> None:
        self._core.icount = v
        self._core.cur = ffi.NULL

    def current_icount(self) -> int:
        """Exact retired count of the loaded vCPU at the instruction now executing (valid inside hooks)."""
        c = self._core
        cur = c.cur
        if cur == ffi.NULL:
            return c.icount
        lin = self.cs_base() + self.rip()
        return c.icount - cur.icount + self.count_insns(cur.pc, lin)

    def run(self, until_icount: int | None = None) -> VmExit:
        """Run the loaded vCPU until an exit; never past ``until_icount`` retired instructions."""
        c = self._core
        if until_icount is not None and c.icount >= until_icount:
            return VmExit(ExitReason.DEADLINE, self.rip(), c.icount)
        budget = U64 if until_icount is None else until_icount
        x = self._enter(budget, NO_UNTIL)
        if x is None:
            x = self._finish_budget()
        if x.reason is ExitReason.MMIO:
            x = self._complete_mmio(x)
        return x

    def _finish_budget(self) -> VmExit:
        """Stopped before a block that would pass the deadline (which a timer armed
        during the run may have brought forward): run its first k instructions.

        TCG translates a block of exactly those k instructions (the core asks
        for it through cflags_next_tb; the whole block stays translated for the
        next pass), and the block hook stops before the next one.  A Unicorn
        build whose CPU state the core does not recognise cuts the block at an
        exit instead: decode to the k-th instruction, translate the block again
        up to there, and drop that cut block after."""
        c = self._core
        for _ in range(8):
            k = c.budget - c.icount
            if k <= 0:
                return VmExit(ExitReason.DEADLINE, self.rip(), c.icount)
            if lib.vmm_core_force_block(c, k) != 0:
                break
            x = self._enter(c.budget, NO_UNTIL)
            if x is not None:
                return x
            # stopped before a block again (a retried EPT violation ran a whole block): go on
        k = c.budget - c.icount
        if k <= 0:
            return VmExit(ExitReason.DEADLINE, self.rip(), c.icount)
        start = self.cs_base() + self.rip()
        # the block the budget refused starts here: its bytes are all the decoding needs
        target = self.nth_insn_address(start, k, c.budget_size if c.budget_pc == start else None)
        # the block through target-1 is translated again, stopping at target (then dropped again)
        self._exact_stop(target, True)
        try:
            x = self._enter(U64, target)
        finally:
            self._exact_stop(target, False)
        if x is not None:
            return x
        return VmExit(ExitReason.DEADLINE, self.rip(), c.icount)

    def _exact_stop(self, target: int, arm: bool) -> None:
        if lib.vmm_core_exact_stop(self._core, target, 1 if arm else 0) != 0:
            self.uc.ctl_remove_cache(target - 1, target)

    def _complete_mmio(self, x: VmExit) -> VmExit:
        """An MMIO access asked for a stop; the vCPU stopped *at* its instruction.
        Run exactly that instruction again, its accesses answered from the ones
        already made, so the stop lands right after it."""
        c = self._core
        target = c.icount + 1
        pending = bool(c.irq_pending)
        self.set_irq_pending(False)   # the instruction finishes before any interrupt is taken
        try:
            return self._rerun_mmio(x, target)
        finally:
            self.set_irq_pending(pending)

    def _rerun_mmio(self, x: VmExit, target: int) -> VmExit:
        c = self._core
        y = x
        for _ in range(64):
            c.budget = target
            y = self._enter(target, NO_UNTIL)
            if y is None:
                y = self._finish_budget()
            if y.reason is not ExitReason.MMIO:
                break
        lib.vmm_mmio_replay_clear(c)
        if y.reason is ExitReason.DEADLINE and c.icount == target:
            return VmExit(ExitReason.IO, self.rip(), c.icount, detail="mmio")
        return y

    def _enter(self, budget: int, until: int) -> VmExit | None:
        """Enter the guest; returns the exit, or None for a budget/until stop.

        An EPT violation that a handler fixed re-enters at once (the faulting
        instruction is retried); the same violation again at the same count
        means the handler did not fix it, and ends the run.
        """
        last = None
        moves = 0
        while True:
            x = self._enter_once(budget, until)
            if x is _SMC:
                budget = min(budget, self._core.budget)
                continue
            if x is _WATCH:
                moves += 1
                if moves > 64:
                    return VmExit(ExitReason.ERROR, self.rip(), self._core.icount,
                                  detail="a watched page's translation would not settle")
                budget = min(budget, self._core.budget)
                continue
            if x is not _RETRY:
                return x
            v = self._last_violation
            key = (v.gpa >> 12, v.access, self._core.icount)
            if key == last:
                return VmExit(ExitReason.ERROR, self.rip(), self._core.icount,
                              detail=f"{v}: the violation handler did not fix it")
            last = key
            # a timer the handler armed lowered the core's budget (Machine._new_deadline): the
            # retry must stop there too, not run on to the budget this entry started with
            budget = min(budget, self._core.budget)

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
        x = self._enter_once_inner(budget, until)
        if self._lwatch and self.mmu_mode == "nested":
            self._watch_follow()   # no fills to tell: look again at every exit
        if self._deferred:
            # after the exit is accounted for: a memory-map change may drop translated code
            # and the block-count cache the accounting reads
            self._apply_deferred()
        return x

    def _enter_once_inner(self, budget: int, until: int):
        c = self._core
        c.budget = budget
        # exceptions delivered in the hooks (deliver.c), except in an exact stop's last
        # block (cut by Unicorn's `until`, its count is not the block's) or under the
        # test-only reference clock
        if self.fast_delivery and until == NO_UNTIL and self._ref_hook is None:
            c.fast = lib.FD_ON | (lib.FD_LOG if self.ept.logging else 0)
        else:
            c.fast = 0
        # RDTSC answered in the hook (core.c, tsc_answer) on the same terms
        v = self.loaded
        off = v.tsc_offset() if v.tsc_offset is not None and until == NO_UNTIL and self._ref_hook is None else None
        if off is None:
            c.tsc_fast = 0
        else:
            c.tsc_fast = 1
            c.tsc_offset = off & U64
            if self._ctr is not None and self.fast_counter:
                c.ctr_gpa = self._ctr[0]
            else:
                c.ctr_gpa = 0
        self._stop_requested = False
        self._bp_hit = False
        self._in_emu = True
        try:
            err = lib.vmm_core_run(c, self.rip(), 0)
        finally:
            self._in_emu = False
        self.exits += 1
        if self._pending_error is not None:
            e, self._pending_error = self._pending_error, None
            raise e
        flags = c.stop_flags
        if c.smc_pending:
            # a store rewrote the block that ran it: QEMU cut the block at the store and
            # ran the store again alone; the core took the block back, here its part
            # before the store retires (the store's own block is counted already)
            c.smc_pending = 0
            c.slow &= ~lib.VMM_SLOW_SMC
            c.icount += self.count_insns(c.smc_pc, c.smc_cut)
            if self._ref_hook is not None:
                self.loaded.ref_icount -= 1   # the reference clock saw the store start twice
        if flags == lib.VMM_STOP_BUDGET and err == 0 and c.cur == ffi.NULL:
            # the common exit, a stop before a block past the budget (every turn
            # and deadline ends so): nothing ran since the last block that counted
            icount = c.icount
            return VmExit(ExitReason.DEADLINE, self.rip(), icount) if icount >= budget else None
        lin = self.cs_base() + self.rip()
        # a guest #PF from the shadow MMU's fill, or an EPT violation: the access
        # did not happen and the instruction did not retire
        sh = self._shadow
        pf = sh != ffi.NULL and err == unicorn.UC_ERR_EXCEPTION and sh.pending in (lib.VMM_PEND_PF, lib.VMM_PEND_GP)
        # a fill that would move a watched page's frame (watch.c): nothing happened yet
        moved = sh != ffi.NULL and err == unicorn.UC_ERR_EXCEPTION and sh.pending == lib.VMM_PEND_WATCH
        viol = None if err == 0 or pf or moved else self._violation(err)
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
                if (pf or flags & (lib.VMM_STOP_EXC | lib.VMM_STOP_UD)) and lin < end:
                    # the C delivery's count for this EIP of this block, next time (deliver.c)
                    cur.xoff = lin - tb_start + 1
                    cur.xn = retired
            else:
                retired = tb_icount
            c.icount += retired - tb_icount
            c.cur = ffi.NULL
        icount = c.icount
        v = self.loaded
        rip = self.rip()
        if moved:
            if self._ref_hook is not None:
                v.ref_icount -= 1   # the instruction started, and will run again
            self._watch_follow()
            return _WATCH
        if pf:
            vec = 14 if sh.pending == lib.VMM_PEND_PF else 13
            if vec == 14:
                struct.pack_into("<Q", self._env, ENV_CR + 16, sh.pf_addr & U64)
            c.exc_vector = vec
            c.exc_error = sh.pf_error
            c.exc_is_int = 0
            if self._ref_hook is not None and not fetch_fault:
                v.ref_icount -= 1  # the reference clock counted the faulting instruction
            return VmExit(ExitReason.EXCEPTION, rip, icount, vector=vec, error_code=int(sh.pf_error))
        if viol is not None:
            if self._ref_hook is not None and not fetch_fault:
                v.ref_icount -= 1
            self._last_violation = viol
            if self._background_page(viol) or self.on_ept_violation(viol):
                return _RETRY
            code = _VIOLATION_ERR[("rwx".index(viol.access), viol.hole)]
            return VmExit(ExitReason.ERROR, rip, icount, detail=f"{unicorn.UcError(code)} ({viol})")
        if err != 0:
            return VmExit(ExitReason.ERROR, rip, icount, detail=unicorn.UcError(err).__str__())
        if flags & (lib.VMM_STOP_EXC | lib.VMM_STOP_UD):
            vec = c.exc_vector
            sw = bool(flags & lib.VMM_STOP_EXC and c.exc_is_int)
            ec = c.exc_error if vec in (8, 10, 11, 12, 13, 14, 17) and not sw else None
            if self._ref_hook is not None and not sw and not self._is_trap(vec) and not fetch_fault:
                v.ref_icount -= 1
            return VmExit(ExitReason.EXCEPTION, rip, icount, vector=vec, error_code=ec, software=bool(sw))
        if flags & lib.VMM_STOP_MMIO:
            if self._ref_hook is not None:
                v.ref_icount -= 1   # the instruction started, and will run again
            return VmExit(ExitReason.MMIO, rip, icount)
        if flags & lib.VMM_STOP_INSN:
            reason = ExitReason.SYSCALL if c.trap_kind == lib.VMM_INSN_SYSCALL else ExitReason.SYSENTER
            return VmExit(reason, rip, icount)
        if flags & lib.VMM_STOP_IO or flags & lib.VMM_STOP_IO_LATE:
            return VmExit(ExitReason.IO, rip, icount)
        if flags & lib.VMM_STOP_TRAP:
            return VmExit(ExitReason.TRAP, rip, icount)
        if flags & lib.VMM_STOP_IRQWIN:
            return VmExit(ExitReason.INTERRUPT_WINDOW, rip, icount)
        if flags & lib.VMM_STOP_SMC:
            # the stop after a block its own store cut: an accounting stop, not an exit
            if icount >= budget:
                return VmExit(ExitReason.DEADLINE, rip, icount)
            if until != NO_UNTIL and lin == until:
                return None
            return _SMC
        if flags & lib.VMM_STOP_BUDGET:
            if icount >= budget:
                return VmExit(ExitReason.DEADLINE, rip, icount)
            return None
        if until != NO_UNTIL and lin == until:
            return None
        if self._bp_hit or flags & lib.VMM_STOP_WATCH:
            self._bp_hit = False
            return VmExit(ExitReason.BREAKPOINT, rip, icount)
        # emu_start returned by itself: HLT (it ends its block, EIP is past it)
        if self.code_bytes(lin - 1, 1) == b"\xf4":
            return VmExit(ExitReason.HLT, rip, icount)
        return VmExit(ExitReason.ERROR, rip, icount, detail="the CPU core stopped for no known reason")

    def _is_trap(self, vector: int) -> bool:
        # #DB from single-step or a data breakpoint is reported after the instruction
        return vector == 1 and bool(self.uc.reg_read(X.UC_X86_REG_DR6) & 0x4000_000F)

    def _is_fetch_fault(self, lin: int) -> bool:
        ec = self._core.exc_error
        cr2 = self._u64(ENV_CR + 16)
        return not (ec & 2) and 0 <= (cr2 - lin) < 16

    def close(self) -> None:
        """Release the engines and the C state now rather than at garbage collection.

        The engine goes first (through the binding's own finalizer, which runs
        once), so no hook can run on freed state.  Unusable after.
        """
        if self._core == ffi.NULL:
            return
        for uc in (self.uc, self._scratch_uc):
            finalizer = getattr(uc, "_Uc__finalizer", None)
            if finalizer is not None:
                finalizer()
        lib.vmm_core_free(self._core)
        lib.vmm_core_free(self._scratch_core)
        self._core = ffi.NULL
        self._scratch_core = ffi.NULL
        if self._shadow != ffi.NULL:
            lib.vmm_shadow_free(self._shadow)
            self._shadow = ffi.NULL
        self._mmio_regions.clear()


@ffi.def_extern()
def vmm_py_io(handle, is_write, port, size, value, result):
    eng = ffi.from_handle(handle)
    try:
        return eng._on_io(is_write, port, size, value, result)
    except BaseException as e:  # noqa: BLE001 - never unwind through C: stop, re-raise after the run
        eng._pending_error = e
        eng._stop_requested = False
        return 1


@ffi.def_extern()
def vmm_py_mmio(handle, is_write, gpa, size, value, result):
    eng = ffi.from_handle(handle)
    try:
        return eng._on_mmio(is_write, gpa, size, value, result)
    except BaseException as e:  # noqa: BLE001 - never unwind through C
        eng._pending_error = e
        eng._stop_requested = False
        return 1


@ffi.def_extern()
def vmm_py_event(handle, kind):
    eng = ffi.from_handle(handle)
    try:
        return eng._on_event(kind)
    except BaseException as e:  # noqa: BLE001 - never unwind through C
        eng._pending_error = e
        return 0
