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
import unicorn
import unicorn.unicorn_py3.unicorn as _ucmod
from unicorn import x86_const as X

from vmm import native
from vmm.exits import ExitReason, VmExit
from vmm.memory import GuestMemory
from vmm.paging import translate

_fast = native.load()
ffi = _fast.ffi
lib = _fast.lib

NO_UNTIL = 0xFFFF_FFFF_FFFF_FFFF
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
    """

    def __init__(self, memory: GuestMemory):
        self.memory = memory
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        # Sandy Bridge: LM and NX, but RDRAND/RDSEED raise #UD (UNICORN.md 5)
        uc.ctl_set_cpu_model(X.UC_CPU_X86_SANDYBRIDGE)
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
        self.reset()

    # -- set-up ---------------------------------------------------------------
    @staticmethod
    def _make_reset_context():
        u16 = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_16)
        u16.ctl_set_cpu_model(X.UC_CPU_X86_SANDYBRIDGE)
        ctx = u16.context_save()
        return ctx, u16

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
        if not ok:
            raise VcpuError("this Unicorn build's CPU state layout is not the one vmm was written for (need 2.1.4)")

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
        """Drop every cached translation (after the VMM changed paging state or the A20 gate)."""
        self.uc.ctl(unicorn.UC_CTL_TLB_FLUSH, unicorn.UC_CTL_IO_WRITE)

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
        t = translate(self.memory, lin, access, user, self.cr0, self.cr3, self.cr4, self.efer,
                      set_ad=set_ad, a20_mask=self.a20_mask)
        return t.phys

    def read_linear(self, lin: int, n: int, access: str = "r", user: bool = False) -> bytes:
        out = bytearray()
        while n > 0:
            chunk = min(n, 0x1000 - (lin & 0xFFF))
            pa = self.translate(lin, access, user)
            out += self.memory.read(pa, chunk)
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
            self.memory.write(pa, data[off:off + chunk])

    def _host_wrote(self, pa: int, n: int) -> None:
        self._code_dirty = True

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
        """One emu_start; returns the exit, or None for a budget/until stop."""
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
        cur = c.cur
        if cur != ffi.NULL:
            tb_start, tb_icount = cur.pc, cur.icount
            end = tb_start + cur.size
            if flags & (lib.VMM_STOP_EXC | lib.VMM_STOP_UD) and c.exc_vector == 14 and self._is_fetch_fault(lin):
                retired = tb_icount
            elif err != 0 and err in (unicorn.UC_ERR_FETCH_UNMAPPED, unicorn.UC_ERR_FETCH_PROT):
                retired = tb_icount
            elif lin == end and until == NO_UNTIL:
                retired = tb_icount
            elif tb_start <= lin <= end:
                retired = self.count_insns(tb_start, lin)
            else:
                retired = tb_icount
            c.icount += retired - tb_icount
            c.cur = ffi.NULL
        icount = c.icount
        if err != 0:
            return VmExit(ExitReason.ERROR, self.rip, icount, detail=unicorn.UcError(err).__str__())
        if flags & (lib.VMM_STOP_EXC | lib.VMM_STOP_UD):
            vec = c.exc_vector
            sw = bool(flags & lib.VMM_STOP_EXC and c.exc_is_int)
            ec = c.exc_error if vec in (8, 10, 11, 12, 13, 14, 17) and not sw else None
            if self._ref_hook is not None and not sw and not self._is_trap(vec):
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
        if self._core != ffi.NULL:
            self.uc.release_handle() if hasattr(self.uc, "release_handle") else None
            lib.vmm_core_free(self._core)
            self._core = ffi.NULL


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
