"""Interrupt and exception delivery, done by the VMM as the SDM defines it.

Unicorn never vectors anything: it reports an exception, INT n or INT3 and
stops.  This module performs the delivery the processor would have done
(Intel SDM vol. 3A chapter 6, "Interrupt and Exception Handling"):

* real mode: the IVT at IDTR.base, FLAGS/CS/IP pushed, IF/TF/AC cleared
  (6.? and vol. 3B 20.1.4);
* protected mode (6.10-6.12): interrupt, trap and task gates; the gate DPL
  check for software interrupts; the target code segment checks; the
  inter-privilege stack switch through the TSS with SS:ESP pushed; 16- and
  32-bit gates; the error code for vectors 8, 10-14 and 17; IF cleared by
  interrupt gates, TF/NT/VM/RF by all; task gates switch tasks (7.3);
* IA-32e mode (6.14): 16-byte gates, IST stacks, the 16-byte stack alignment,
  SS:RSP always pushed, the NULL SS on a privilege change;
* double faults and shutdown (6.15, table 6-5): a contributory fault while
  delivering a contributory fault, or a contributory fault or #PF while
  delivering a #PF, becomes #DF; a fault while delivering #DF shuts down.

SYSCALL and SYSENTER are emulated here too (vol. 2B), since Unicorn's own
versions only call hooks.
"""
from __future__ import annotations

from vmm.memory.paging import PageFault
from vmm.cpu.vcpu import CS, DS, ES, FS, GS, SS, Vcpu

CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})
# fault-class exceptions (SDM table 6-1): the EFLAGS image they push has RF=1
# (vol. 3B 17.3.1.1, "Instruction-Breakpoint Exception Condition"); #DB is left
# out (its instruction-breakpoint form pushes RF as it was; its other forms are traps)
FAULT_CLASS = frozenset({0, 5, 6, 7, 10, 11, 12, 13, 14, 16, 17, 19, 20, 21})
HAS_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17})

EF_TF = 1 << 8
EF_IF = 1 << 9
EF_NT = 1 << 14
EF_RF = 1 << 16
EF_VM = 1 << 17
EF_AC = 1 << 18

DESC_S = 1 << 12
DESC_CODE = 1 << 11
DESC_CONFORMING = 1 << 10
DESC_WRITE = 1 << 9  # data: writable; code: readable
DESC_P = 1 << 15
DESC_L = 1 << 21
DESC_B = 1 << 22
DESC_G = 1 << 23
DESC_ACCESSED = 1 << 8


class GuestFault(Exception):
    """A fault raised while the VMM acts for the processor (delivery, emulation)."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None):
        super().__init__(f"vector {vector} error {error_code}")
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


class TripleFault(Exception):
    """A fault while delivering #DF: the processor shuts down (SDM 6.15, interrupt 8)."""


def _classify(vector: int) -> str:
    if vector == 14:
        return "pf"
    if vector in CONTRIBUTORY:
        return "contributory"
    if vector == 8:
        return "df"
    return "benign"


def double_fault_outcome(first: int, second: int) -> str:
    """SDM table 6-5: 'serial', 'df' or 'shutdown' for a fault during delivery."""
    a, b = _classify(first), _classify(second)
    if a == "df" and b in ("contributory", "pf"):
        return "shutdown"
    if a == "contributory" and b == "contributory":
        return "df"
    if a == "pf" and b in ("contributory", "pf"):
        return "df"
    return "serial"


def descriptor_fields(lo: int, hi: int) -> tuple[int, int, int]:
    """(base, expanded limit, QEMU-style flags) of a legacy 8-byte descriptor."""
    base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF00_0000)
    limit = (lo & 0xFFFF) | (hi & 0xF_0000)
    if hi & DESC_G:
        limit = (limit << 12) | 0xFFF
    return base, limit, hi & 0x00F0_FF00


class Delivery:
    def __init__(self, vcpu: Vcpu):
        self.cpu = vcpu
        self.delivered = 0

    # -- guest-linear helpers (implicit supervisor accesses) --------------------
    def _read(self, lin: int, n: int, user: bool = False) -> bytes:
        try:
            return self.cpu.read_linear(lin, n, "r", user)
        except PageFault as pf:
            raise GuestFault(14, pf.error_code, pf.cr2) from None

    def _write(self, lin: int, data: bytes, user: bool = False) -> None:
        try:
            self.cpu.write_linear(lin, data, user)
        except PageFault as pf:
            raise GuestFault(14, pf.error_code, pf.cr2) from None

    def _u16(self, lin: int) -> int:
        return int.from_bytes(self._read(lin, 2), "little")

    def _u32(self, lin: int) -> int:
        return int.from_bytes(self._read(lin, 4), "little")

    def _u64(self, lin: int) -> int:
        return int.from_bytes(self._read(lin, 8), "little")

    def read_descriptor(self, selector: int, ext: int) -> tuple[int, int]:
        """The 8 bytes of a GDT/LDT descriptor, #GP(selector) if outside the table."""
        cpu = self.cpu
        if selector & 4:
            ldt = cpu.ldtr
            base, limit = ldt.base, ldt.limit
        else:
            base, limit = cpu.gdtr
        index = selector & ~7
        if index + 7 > limit:
            raise GuestFault(13, (selector & 0xFFFC) | ext)
        raw = self._read(base + index, 8)
        return int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:], "little")

    # -- the entry point ------------------------------------------------------
    def deliver_interrupt(self, vector: int, fast: bool = True) -> None:
        """An external interrupt: ``deliver(vector, external=True)``, done in C by the
        CPU core when ``fast`` and it can (vmm/cpu/native/deliver.c; this module
        stays the reference that tests/test_delivery_fast.py compares it to)."""
        cpu = self.cpu
        if fast and cpu.loaded and cpu.engine.deliver_interrupt(vector):
            self.delivered += 1
            return
        self.deliver(vector, external=True)

    def deliver(self, vector: int, error_code: int | None = None, software: bool = False,
                external: bool = False, cr2: int | None = None) -> None:
        """Deliver one event, applying the double-fault and shutdown rules.

        ``software``: INT n / INT3 / INTO (gate DPL checked, no EXT bit).
        ``external``: a hardware interrupt (EXT bit set in delivery faults).
        Raises TripleFault when the processor would shut down.
        """
        first = vector
        ec, sw, c2 = error_code, software, cr2
        # EXT (SDM 6.13): the event being delivered is external to the program --
        # an interrupt or an earlier exception; clear only for INT n/INT3/INTO
        ext = external or not software
        # table 6-5 classifies exceptions only: a fault while delivering INT n or
        # an external interrupt (whatever its vector) is handled serially
        exc = not (software or external)
        while True:
            try:
                self._deliver_once(vector, ec, sw, ext, c2, fault=exc and vector in FAULT_CLASS)
                self.cpu.clear_exception_state()
                self.delivered += 1
                return
            except GuestFault as f:
                if f.vector == 14 and f.cr2 is not None:
                    # SDM 6.15 interrupt 14: CR2 is updated whenever a page fault
                    # is detected, even one that becomes #DF or shuts down
                    self.cpu.set_cr2(f.cr2)
                outcome = double_fault_outcome(first, f.vector) if exc else "serial"
                if exc and first == 8 and outcome != "serial":
                    raise TripleFault(f"fault {f.vector} while delivering #DF") from None
                if sw:
                    # the INT n/INT3/INTO did not complete: the fault's saved
                    # CS:EIP is the instruction itself, and it did not retire
                    self._rewind_software_int(vector)
                exc = True
                if outcome == "df":
                    vector, ec, sw, ext, c2 = 8, 0, False, True, None
                    first = 8
                else:
                    vector, ec, c2 = f.vector, f.error_code, f.cr2
                    first = vector
                    sw = False
                    ext = True

    def _rewind_software_int(self, vector: int) -> None:
        """Move RIP back from after an INT n/INT3/INTO (where Unicorn leaves it) to its start."""
        cpu = self.cpu
        lin = cpu.seg(CS).base + cpu.rip
        try:
            last = cpu.read_linear(lin - 1, 1)[0]
            if (vector == 3 and last == 0xCC) or (vector == 4 and last == 0xCE):
                n = 1  # INT3, INTO (INT 3 / INT 4 end in 03 / 04)
            elif last == vector and cpu.read_linear(lin - 2, 1)[0] == 0xCD:
                n = 2
            else:
                return
        except PageFault:
            return
        cpu.rip = cpu.rip - n
        if cpu.icount:
            cpu.icount = cpu.icount - 1

    def _deliver_once(self, vector: int, ec: int | None, sw: bool, ext: bool, cr2: int | None,
                      fault: bool = False) -> None:
        cpu = self.cpu
        if cr2 is not None:
            cpu.set_cr2(cr2)
        if fault:
            cpu.rflags = cpu.rflags | EF_RF  # pushed as 1 for fault-class exceptions
        extbit = 1 if ext else 0
        if not cpu.cr0 & 1:
            self._real(vector)
        elif cpu.long_mode:
            self._long(vector, ec if vector in HAS_ERROR_CODE and not sw else None, sw, extbit)
        else:
            self._protected(vector, ec if vector in HAS_ERROR_CODE and not sw else None, sw, extbit)
        cpu.hflags = cpu.hflags & ~(1 << 3)  # delivery ends an STI/MOV SS shadow

    # -- real mode ----------------------------------------------------------------
    def _real(self, vector: int) -> None:
        cpu = self.cpu
        idt_base, idt_limit = cpu.idtr
        if vector * 4 + 3 > idt_limit:
            raise GuestFault(13, vector * 8 + 2)
        entry = self._read(idt_base + vector * 4, 4)
        ip = int.from_bytes(entry[:2], "little")
        cs = int.from_bytes(entry[2:], "little")
        ss = cpu.seg(SS)
        sp = cpu.rsp & 0xFFFF
        flags = cpu.rflags
        frame = [flags & 0xFFFF, cpu.seg(CS).selector, cpu.rip & 0xFFFF]
        for v in frame:
            sp = (sp - 2) & 0xFFFF
            self._write(ss.base + sp, v.to_bytes(2, "little"))
        cpu.rsp = (cpu.rsp & ~0xFFFF) | sp
        cpu.load_seg(CS, cs, cs << 4, 0xFFFF, cpu.seg(CS).flags)
        cpu.rip = ip
        cpu.rflags = flags & ~(EF_IF | EF_TF | EF_AC | EF_RF)

    # -- protected mode ------------------------------------------------------------
    def _protected(self, vector: int, ec: int | None, sw: bool, ext: int) -> None:
        cpu = self.cpu
        idt_base, idt_limit = cpu.idtr
        gate_err = vector * 8 + 2 + ext
        if vector * 8 + 7 > idt_limit:
            raise GuestFault(13, gate_err)
        raw = self._read(idt_base + vector * 8, 8)
        lo = int.from_bytes(raw[:4], "little")
        hi = int.from_bytes(raw[4:], "little")
        gtype = (hi >> 8) & 0x1F
        if gtype not in (5, 6, 7, 0xE, 0xF):
            raise GuestFault(13, gate_err)
        dpl = (hi >> 13) & 3
        cpl = cpu.cpl
        if sw and dpl < cpl:
            raise GuestFault(13, vector * 8 + 2)
        if not hi & DESC_P:
            raise GuestFault(11, gate_err)
        if gtype == 5:
            self.task_switch(lo >> 16, ext, nested=True, error_code=ec)
            return
        is32 = bool(gtype & 8)
        selector = lo >> 16
        offset = (hi & 0xFFFF_0000) | (lo & 0xFFFF)
        if not is32:
            offset &= 0xFFFF
        e1, e2, sel_err = self._handler_code_segment(selector, cpl, ext)
        cs_dpl = (e2 >> 13) & 3
        flags = cpu.rflags
        vm86 = bool(flags & EF_VM)
        conforming = bool(e2 & DESC_CONFORMING)
        if not conforming and cs_dpl < cpl:
            new_cpl = cs_dpl
            ss_sel, esp = self._tss_stack(new_cpl, ext)
            ss_err = (ss_sel & 0xFFFC) | ext
            if ss_sel & 0xFFFC == 0:
                raise GuestFault(10, ext)
            if ss_sel & 3 != new_cpl:
                raise GuestFault(10, ss_err)
            s1, s2 = self.read_descriptor(ss_sel, ext)
            if (s2 >> 13) & 3 != new_cpl or not (s2 & DESC_S) or (s2 & DESC_CODE) or not (s2 & DESC_WRITE):
                raise GuestFault(10, ss_err)
            if not s2 & DESC_P:
                raise GuestFault(12, ss_err)
            ss_base, ss_limit, ss_flags = descriptor_fields(s1, s2)
            new_stack = True
        else:
            if vm86:
                raise GuestFault(13, sel_err)
            new_cpl = cpl
            ss = cpu.seg(SS)
            ss_sel, ss_base, ss_limit, ss_flags = ss.selector, ss.base, ss.limit, ss.flags
            esp = cpu.rsp
            new_stack = False
        if vm86 and new_cpl != 0:
            raise GuestFault(13, sel_err)
        mask = 0xFFFF_FFFF if ss_flags & DESC_B else 0xFFFF
        size = 4 if is32 else 2
        old_ss = cpu.seg(SS)
        frame: list[int] = []
        if new_stack:
            if vm86:
                frame += [cpu.seg(GS).selector, cpu.seg(FS).selector, cpu.seg(DS).selector, cpu.seg(ES).selector]
            frame += [old_ss.selector, cpu.rsp & 0xFFFF_FFFF]
        frame += [flags & 0xFFFF_FFFF, cpu.seg(CS).selector, cpu.rip & 0xFFFF_FFFF]
        if ec is not None:
            frame.append(ec)
        sp = esp & mask
        user = new_cpl == 3
        for v in frame:
            sp = (sp - size) & mask
            self._write(ss_base + sp, (v & ((1 << (8 * size)) - 1)).to_bytes(size, "little"), user)
        # commit: nothing below can fault
        if new_stack:
            if vm86:
                for seg in (ES, DS, FS, GS):
                    cpu.load_seg(seg, 0, 0, 0, 0)
            cpu.load_seg(SS, (ss_sel & 0xFFFC) | new_cpl, ss_base, ss_limit, ss_flags)
        cpu.rsp = (esp & ~mask) | sp if mask != 0xFFFF_FFFF else sp
        base, limit, cs_flags = descriptor_fields(e1, e2)
        if new_stack:
            cpu.set_cpl(new_cpl)
        cpu.load_seg(CS, (selector & 0xFFFC) | new_cpl, base, limit, cs_flags)
        cpu.set_cpl(new_cpl)
        cpu.rip = offset
        newflags = flags & ~(EF_TF | EF_VM | EF_RF | EF_NT)
        if not gtype & 1:
            newflags &= ~EF_IF
        cpu.rflags = newflags

    def _handler_code_segment(self, selector: int, cpl: int, ext: int) -> tuple[int, int, int]:
        """The gate's target code segment, checked as SDM 6.12.1.1 says: (lo, hi, error code).

        NULL -> #GP(EXT); not a code segment or DPL > CPL -> #GP(selector);
        not present -> #NP(selector).
        """
        if selector & 0xFFFC == 0:
            raise GuestFault(13, ext)
        lo, hi = self.read_descriptor(selector, ext)
        sel_err = (selector & 0xFFFC) | ext
        if not (hi & DESC_S) or not (hi & DESC_CODE):
            raise GuestFault(13, sel_err)
        if (hi >> 13) & 3 > cpl:
            raise GuestFault(13, sel_err)
        if not hi & DESC_P:
            raise GuestFault(11, sel_err)
        return lo, hi, sel_err

    def _tss_stack(self, dpl: int, ext: int) -> tuple[int, int]:
        """SS:ESP for privilege ``dpl`` from the current TSS (SDM 7.2.1, 6.12.1)."""
        cpu = self.cpu
        tr = cpu.tr
        if not tr.flags & DESC_P:
            raise GuestFault(10, (tr.selector & 0xFFFC) | ext)
        ttype = (tr.flags >> 8) & 0xF
        shift = ttype >> 3
        index = (dpl * 4 + 2) << shift
        if index + (4 << shift) - 1 > tr.limit:
            raise GuestFault(10, (tr.selector & 0xFFFC) | ext)
        if shift == 0:
            return self._u16(tr.base + index + 2), self._u16(tr.base + index)
        return self._u16(tr.base + index + 4), self._u32(tr.base + index)

    # -- IA-32e mode --------------------------------------------------------------
    def _long(self, vector: int, ec: int | None, sw: bool, ext: int) -> None:
        cpu = self.cpu
        idt_base, idt_limit = cpu.idtr
        gate_err = vector * 16 + 2 + ext
        if vector * 16 + 15 > idt_limit:
            raise GuestFault(13, gate_err)
        raw = self._read(idt_base + vector * 16, 16)
        e1 = int.from_bytes(raw[0:4], "little")
        e2 = int.from_bytes(raw[4:8], "little")
        e3 = int.from_bytes(raw[8:12], "little")
        gtype = (e2 >> 8) & 0x1F
        if gtype not in (0xE, 0xF):
            raise GuestFault(13, gate_err)
        dpl = (e2 >> 13) & 3
        cpl = cpu.cpl
        if sw and dpl < cpl:
            raise GuestFault(13, vector * 16 + 2)
        if not e2 & DESC_P:
            raise GuestFault(11, gate_err)
        selector = e1 >> 16
        offset = (e2 & 0xFFFF_0000) | (e1 & 0xFFFF) | (e3 << 32)
        ist = e2 & 7
        d1, d2, sel_err = self._handler_code_segment(selector, cpl, ext)
        cs_dpl = (d2 >> 13) & 3
        if not (d2 & DESC_L) or (d2 & DESC_B):
            raise GuestFault(13, sel_err)
        conforming = bool(d2 & DESC_CONFORMING)
        if not conforming and cs_dpl < cpl:
            new_cpl = cs_dpl
            priv_change = True
        else:
            new_cpl = cpl
            priv_change = False
        if ist:
            rsp = self._tss64_rsp(ist + 3, ext)
        elif priv_change:
            rsp = self._tss64_rsp(new_cpl, ext)
        else:
            rsp = cpu.rsp
        rsp &= ~0xF
        flags = cpu.rflags
        old_ss = cpu.seg(SS).selector
        frame = [old_ss, cpu.rsp, flags, cpu.seg(CS).selector, cpu.rip]
        if ec is not None:
            frame.append(ec)
        user = new_cpl == 3
        sp = rsp
        for v in frame:
            sp = (sp - 8) & 0xFFFF_FFFF_FFFF_FFFF
            self._write(sp, (v & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"), user)
        if priv_change:
            cpu.set_cpl(new_cpl)
            cpu.load_seg(SS, new_cpl, 0, 0, new_cpl << 13)
        cpu.rsp = sp
        base, limit, cs_flags = descriptor_fields(d1, d2)
        cpu.load_seg(CS, (selector & 0xFFFC) | new_cpl, base, limit, cs_flags)
        cpu.set_cpl(new_cpl)
        cpu.rip = offset
        newflags = flags & ~(EF_TF | EF_VM | EF_RF | EF_NT)
        if not gtype & 1:
            newflags &= ~EF_IF
        cpu.rflags = newflags

    def _tss64_rsp(self, level: int, ext: int) -> int:
        cpu = self.cpu
        tr = cpu.tr
        index = 8 * level + 4
        if index + 7 > tr.limit:
            raise GuestFault(10, (tr.selector & 0xFFFC) | ext)
        return self._u64(tr.base + index)

    # -- task switch through a task gate (SDM 7.3) ----------------------------------
    def task_switch(self, tss_sel: int, ext: int, nested: bool, error_code: int | None) -> None:
        cpu = self.cpu
        sel_err = (tss_sel & 0xFFFC) | ext
        if tss_sel & 4:
            raise GuestFault(13, sel_err)  # INT n pseudocode, TASK-GATE: a local TSS selector is #GP
        lo, hi = self.read_descriptor(tss_sel, ext)
        ttype = (hi >> 8) & 0x1F
        if ttype not in (1, 9):  # available 16/32-bit TSS (busy would be 3/11)
            raise GuestFault(13, sel_err)
        if not hi & DESC_P:
            raise GuestFault(11, sel_err)
        new_base, new_limit, new_flags = descriptor_fields(lo, hi)
        is32 = ttype == 9
        if new_limit < (0x67 if is32 else 0x2B):
            raise GuestFault(10, sel_err)
        if not is32:
            raise GuestFault(10, sel_err)  # 16-bit task gates: not supported by this VMM
        old = cpu.tr
        flags = cpu.rflags
        # 1. save the outgoing task's dynamic state
        if old.limit >= 0x5F and old.flags & DESC_P:
            gpr = [cpu.gpr(i) & 0xFFFF_FFFF for i in range(8)]
            blob = b"".join(v.to_bytes(4, "little") for v in [cpu.rip & 0xFFFF_FFFF, flags & 0xFFFF_FFFF] + gpr)
            self._write(old.base + 0x20, blob)
            segs = b"".join(cpu.seg(i).selector.to_bytes(4, "little") for i in range(6))
            self._write(old.base + 0x48, segs)
        # 2. read the incoming task's state
        st = self._read(new_base, 0x68)

        def d(off: int) -> int:
            return int.from_bytes(st[off:off + 4], "little")

        new_cr3, new_eip, new_eflags = d(0x1C), d(0x20), d(0x24)
        new_gpr = [d(0x28 + 4 * i) for i in range(8)]
        new_segs = [d(0x48 + 4 * i) & 0xFFFF for i in range(6)]
        new_ldt = d(0x60) & 0xFFFF
        # 3. link and mark busy (the old task stays busy: this is a nested call)
        if nested:
            self._write(new_base, (old.selector & 0xFFFF).to_bytes(2, "little"))
            new_eflags |= EF_NT
        gdt_base, _ = cpu.gdtr
        self._write(gdt_base + (tss_sel & ~7) + 4, (hi | (2 << 8)).to_bytes(4, "little"))
        # the descriptor in memory is marked busy; the cached TR keeps the type LTR
        # leaves in QEMU (available, 9): its TSS stack lookup for a ring-3 call
        # gate aborts the whole process on any other cached type
        cpu.set_sys_seg("tr", tss_sel, new_base, new_limit, new_flags & ~(2 << 8))
        # 4. load the incoming state
        if cpu.cr0 & (1 << 31):
            cpu.set_reg("cr3", new_cr3)
        cpu.set_reg("cr0", cpu.cr0 | (1 << 3))  # CR0.TS
        for i, v in enumerate(new_gpr):
            cpu.set_reg(("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")[i], v)
        cpu.rflags = new_eflags | 2
        cpu.rip = new_eip
        if new_ldt & 0xFFFC:
            l1, l2 = self.read_descriptor(new_ldt, ext)
            b, lim, fl = descriptor_fields(l1, l2)
            cpu.set_sys_seg("ldt", new_ldt, b, lim, fl)
        else:
            cpu.set_sys_seg("ldt", 0, 0, 0, 0)
        new_cpl = new_segs[CS] & 3
        cpu.set_cpl(new_cpl)
        for seg in (SS, CS, ES, DS, FS, GS):
            sel = new_segs[seg]
            if sel & 0xFFFC == 0:
                if seg in (SS, CS):
                    raise GuestFault(10, (sel & 0xFFFC) | ext)
                cpu.load_seg(seg, sel, 0, 0, 0)
                continue
            s1, s2 = self.read_descriptor(sel, ext)
            if not s2 & DESC_P:
                raise GuestFault(12 if seg == SS else 11, (sel & 0xFFFC) | ext)
            b, lim, fl = descriptor_fields(s1, s2)
            cpu.load_seg(seg, sel, b, lim, fl)
        cpu.set_cpl(new_cpl)
        if error_code is not None:
            ss = cpu.seg(SS)
            mask = 0xFFFF_FFFF if ss.flags & DESC_B else 0xFFFF
            sp = (cpu.rsp - 4) & mask
            self._write(ss.base + sp, error_code.to_bytes(4, "little"), new_cpl == 3)
            cpu.rsp = sp

    # -- SYSENTER / SYSCALL (SDM vol. 2B) --------------------------------------------
    def sysenter(self) -> None:
        """Emulate SYSENTER at the current RIP (the instruction retires here)."""
        cpu = self.cpu
        if not cpu.cr0 & 1:
            raise GuestFault(13, 0)
        cs_sel = cpu.msr(0x174) & 0xFFFF
        if cs_sel & 0xFFFC == 0:
            raise GuestFault(13, 0)
        lma = cpu.long_mode
        cpu.rflags = cpu.rflags & ~(EF_VM | EF_IF | EF_RF)
        cpu.set_cpl(0)
        cs_flags = DESC_G | DESC_P | DESC_S | DESC_CODE | DESC_WRITE | DESC_ACCESSED
        cs_flags |= DESC_L if lma else DESC_B
        cpu.load_seg(CS, cs_sel & 0xFFFC, 0, 0xFFFF_FFFF, cs_flags)
        ss_flags = DESC_G | DESC_P | DESC_S | DESC_WRITE | DESC_ACCESSED | DESC_B
        cpu.load_seg(SS, (cs_sel + 8) & 0xFFFC, 0, 0xFFFF_FFFF, ss_flags)
        cpu.set_cpl(0)
        esp, eip = cpu.msr(0x175), cpu.msr(0x176)
        if not lma:
            esp &= 0xFFFF_FFFF
            eip &= 0xFFFF_FFFF
        cpu.rsp = esp
        cpu.rip = eip

    def syscall(self, length: int = 2) -> None:
        """Emulate SYSCALL at the current RIP (Intel: 64-bit mode only)."""
        cpu = self.cpu
        efer = cpu.efer
        if not (efer & 1) or not cpu.long_mode or cpu.code_bits != 64:
            raise GuestFault(6)
        star = cpu.msr(0xC000_0081)
        lstar = cpu.msr(0xC000_0082)
        fmask = cpu.msr(0xC000_0084)
        flags = cpu.rflags
        cpu.set_reg("rcx", cpu.rip + length)
        cpu.set_reg("r11", flags & ~EF_RF)
        cs_sel = (star >> 32) & 0xFFFF
        cpu.set_cpl(0)
        cpu.load_seg(CS, cs_sel & 0xFFFC, 0, 0xFFFF_FFFF,
                     DESC_G | DESC_P | DESC_S | DESC_CODE | DESC_WRITE | DESC_ACCESSED | DESC_L)
        cpu.load_seg(SS, (cs_sel + 8) & 0xFFFC, 0, 0xFFFF_FFFF,
                     DESC_G | DESC_B | DESC_P | DESC_S | DESC_WRITE | DESC_ACCESSED)
        cpu.set_cpl(0)
        cpu.rflags = flags & ~fmask & ~EF_RF
        cpu.rip = lstar
