"""The C delivery (vmm/cpu/native/deliver.c) against the Python reference
(vmm/cpu/delivery.py).

Every guest here runs twice from the same start: once with exceptions
delivered in the CPU core's hooks (the default), once with
``Machine.fast_delivery = False`` (every exception an exit, delivered by
Python).  The two must end in the same state: registers, segment caches,
hflags, control registers, the instruction count, every byte of RAM, and
the exit counts (an exception delivered in C counts as an exception exit).
The guests cover every vector through INT n in real, protected and IA-32e
mode, at ring 0 and from ring 3, and the faults a guest commonly takes
(#DE, #BP, #OF, #BR, #UD, #GP with its error code) in the middle of a block
as well as at its start; the cases C leaves to Python (task gates, 16-bit
gates, a gate DPL violation, a not-present gate) must agree too.  External
interrupts, which the run loop takes between two runs, are delivered in C
too (vmm_core_deliver_irq) and compared the same way.
"""
from __future__ import annotations

import hashlib
import struct

import pytest

from devices.legacy.pic import Pic8259Pair
from tools.guestkit import (
    GDT,
    IDT,
    KCODE16,
    KCODE32,
    STACK0,
    Guest,
    asm,
    gate32,
    seg_desc,
)

EXIT = "mov dx, 0x501\nout dx, al\n"
EF_IOPL3 = 3 << 12
EF_IF = 1 << 9   # on in every guest (no interrupt source): interrupt gates clear it, trap gates not
COUNT = 0x60000  # per-vector entry counters written by the handlers


def state(g: Guest) -> dict:
    cpu = g.cpu
    regs = cpu.snapshot_regs()
    segs = [repr(cpu.seg(i)) for i in range(6)]
    return {
        "regs": regs, "segs": segs, "hflags": cpu.hflags, "icount": g.m.icount, "efer": cpu.efer,
        "tr": repr(cpu.tr), "ram": hashlib.sha256(g.m.memory.read(0, g.m.memory.size)).hexdigest(),
        "exits": {k: v for k, v in g.m.exit_counts.items() if v and k != "io"},
    }


def both(build, limit: int = 400_000) -> tuple[dict, dict, int]:
    """(state with C delivery, state with Python delivery, exceptions delivered in C)."""
    out = []
    for fast in (True, False):
        g = Guest()
        build(g)
        g.m.fast_delivery = fast
        r = g.run(limit)
        assert r.reason.value == "exit", str(r)
        out.append((state(g), g.m.engine.fast_delivered))
    (a, n_fast), (b, n_ref) = out
    assert n_ref == 0
    return a, b, n_fast


def counting_handler(vector: int, bits: int, skip: int = 0, pop_ec: bool = False) -> str:
    """Count entries; record what the handler sees (its EFLAGS, stack pointer, SS, CS
    and the frame words at entry) in a per-vector slot, so a delivery that differs
    shows in RAM; then step the saved IP over a faulting instruction and return."""
    if bits == 16:
        slot = 0x800 + 16 * vector
        body = f"""
            inc word ptr [{0x600 + 2 * vector:#x}]
            push bp
            mov bp, sp
            push ax
            pushf
            pop ax
            mov [{slot:#x}], ax
            mov [{slot + 2:#x}], bp
            mov [{slot + 4:#x}], ss
            mov [{slot + 6:#x}], cs
            mov ax, [bp+2]
            mov [{slot + 8:#x}], ax
            mov ax, [bp+4]
            mov [{slot + 10:#x}], ax
            mov ax, [bp+6]
            mov [{slot + 12:#x}], ax
            pop ax
        """
        if skip:
            body += f"add word ptr [bp+2], {skip}\n"
        return body + "pop bp\niret\n"
    a, sp, w = ("rax", "rsp", 8) if bits == 64 else ("eax", "esp", 4)
    slot = COUNT + 0x400 + 0x40 * vector
    body = f"inc dword ptr [{COUNT + 4 * vector:#x}]\npush {a}\n"
    body += "pushfq\n" if bits == 64 else "pushfd\n"
    body += f"pop {a}\nmov [{slot:#x}], {a}\nmov {a}, {sp}\nmov [{slot + w:#x}], {a}\n"
    body += f"xor eax, eax\nmov ax, ss\nmov [{slot + 2 * w:#x}], {a}\nmov ax, cs\nmov [{slot + 3 * w:#x}], {a}\n"
    for k in range(4):
        body += f"mov {a}, [{sp} + {w * (k + 1)}]\nmov [{slot + (4 + k) * w:#x}], {a}\n"
    body += f"pop {a}\n"
    if pop_ec:
        body += f"add {sp}, {w}\n"
    if skip:
        body += f"add {'qword' if bits == 64 else 'dword'} ptr [{sp}], {skip}\n"
    return body + ("iretq\n" if bits == 64 else "iretd\n")


def every_int_n(skips: dict) -> str:
    """INT n for every vector whose handler does not step over a fault (its own test)."""
    return "".join(f"int {v}\n" for v in range(256) if v not in skips)


# -- real mode ----------------------------------------------------------------------------
def build_real(g: Guest) -> None:
    skips = {0: 2, 6: 2}
    for v in range(256):
        g.ivt(v, counting_handler(v, 16, skips.get(v, 0)), seg=0x1000, off=v * 0x60)
    code = "mov cx, 10\nxor bx, bx\ntop:\n" + every_int_n(skips) + """
        xor dx, dx
        mov ax, 1
        div bx
        mov ax, 2
        ud2
        dec cx
        jnz top
    """ + EXIT
    g.real_mode(code)
    g.cpu.rflags = g.cpu.rflags | EF_IF


def test_real_mode_every_vector_and_faults_agree():
    a, b, n = both(build_real)
    assert a == b
    assert n > 9 * 256


# -- protected mode -----------------------------------------------------------------------
FAULTS32 = """
        xor edx, edx
        mov eax, 1
        div ebx
        int3
        mov eax, 0x7fffffff
        add eax, eax
        into
        mov eax, 5
        bound eax, [{bnd:#x}]
        nop
        ud2
        mov ax, 0x7ff8
        mov ds, ax
"""


def build_protected(ring: int, paging: bool, gtype_of=lambda v: 0xE if v % 2 else 0xF):
    def build(g: Guest) -> None:
        bnd = 0x61000
        skips = {0: 2, 5: 6, 6: 2, 13: 3}
        code = "mov ecx, 10\nxor ebx, ebx\ntop:\n" + every_int_n(skips) + FAULTS32.format(bnd=bnd) + \
            "dec ecx\njnz top\n" + EXIT
        g.protected_mode(code, ring=ring, paging=paging)
        g.cpu.rflags = g.cpu.rflags | EF_IOPL3 | EF_IF
        g.put(bnd, struct.pack("<ii", 10, 20))
        for v in range(256):
            g.idt32(v, counting_handler(v, 32, skips.get(v, 0), pop_ec=v == 13), gtype=gtype_of(v), dpl=3)
    return build


@pytest.mark.parametrize("ring,paging", [(0, False), (3, False), (0, True), (3, True)])
def test_protected_mode_every_vector_and_faults_agree(ring, paging):
    a, b, n = both(build_protected(ring, paging))
    assert a == b
    assert n > 9 * 250


# -- IA-32e mode ------------------------------------------------------------------------------
FAULTS64 = """
        xor edx, edx
        mov eax, 1
        div ebx
        int3
        nop
        ud2
        mov ax, 0x7ff8
        mov ds, ax
"""


def build_long(ring: int, ist_vectors=()):
    def build(g: Guest) -> None:
        skips = {0: 2, 6: 2, 13: 3}
        code = "mov ecx, 10\nxor ebx, ebx\ntop:\n" + every_int_n(skips) + FAULTS64 + "dec ecx\njnz top\n" + EXIT
        g.long_mode(code, ring=ring)
        g.cpu.rflags = g.cpu.rflags | EF_IOPL3 | EF_IF
        for v in range(256):
            g.idt64(v, counting_handler(v, 64, skips.get(v, 0), pop_ec=v == 13),
                    gtype=0xE if v % 2 else 0xF, dpl=3, ist=1 if v in ist_vectors else 0)
    return build


@pytest.mark.parametrize("ring", [0, 3])
@pytest.mark.parametrize("ist", [(), (3, 6, 13, 0x80)])
def test_long_mode_every_vector_and_faults_agree(ring, ist):
    a, b, n = both(build_long(ring, ist))
    assert a == b
    assert n > 9 * 250


# -- external interrupts ---------------------------------------------------------------------
# Machine._turn_of takes an interrupt between two runs; the CPU core delivers it in C
# (vmm_core_deliver_irq) unless fast_delivery is off.  IRQ 0 of an 8259 in auto-EOI
# mode, vector 0x20, pulsed every PERIOD ticks: it lands in the INT n loop, in the
# fault handlers' returns and, with interrupt gates, waits for their IRET.
PERIOD = 1009
IRQ_VECTOR = 0x20


def with_ticks(build, vector: int = IRQ_VECTOR):
    def b(g: Guest) -> None:
        build(g)
        pic = Pic8259Pair()
        for port, value in ((0x20, 0x11), (0x21, vector), (0x21, 0x04), (0x21, 0x03),
                            (0xA0, 0x11), (0xA1, 0x28), (0xA1, 0x02), (0xA1, 0x01), (0x21, 0xFE), (0xA1, 0xFF)):
            pic.io_write(port, 1, value)
        g.m.add_device(pic)
        g.m.set_interrupt_controller(pic)
        line = pic.irq_line(0)

        def tick(_now: int) -> None:
            line.pulse()
            g.m.clock.schedule_in(PERIOD, tick, "tick")
        g.m.clock.schedule_in(PERIOD, tick, "tick")
    return b


def both_irq(build, taken_at) -> tuple[dict, dict, int]:
    """(state with C delivery, with Python delivery, interrupts delivered in C); both
    runs took the same number (> 50) of interrupts, read from the handler's counter."""
    out = []
    for fast in (True, False):
        g = Guest()
        build(g)
        g.m.fast_delivery = fast
        r = g.run(400_000)
        assert r.reason.value == "exit", str(r)
        out.append((state(g), int(g.m.engine._core.irq_delivered), taken_at(g)))
    (a, n_fast, taken), (b, n_ref, taken_ref) = out
    assert n_ref == 0 and taken == taken_ref > 50
    return a, b, n_fast


def test_external_interrupts_in_real_mode_agree():
    a, b, n = both_irq(with_ticks(build_real), lambda g: g.m.memory.read_u16(0x600 + 2 * IRQ_VECTOR))
    assert a == b
    assert n > 50


@pytest.mark.parametrize("ring,paging", [(0, False), (3, True)])
def test_external_interrupts_in_protected_mode_agree(ring, paging):
    a, b, n = both_irq(with_ticks(build_protected(ring, paging)), lambda g: g.u32(COUNT + 4 * IRQ_VECTOR))
    assert a == b
    assert n > 50


@pytest.mark.parametrize("ring", [0, 3])
@pytest.mark.parametrize("vector", [IRQ_VECTOR, 8])
def test_external_interrupts_in_long_mode_agree(ring, vector):
    # vector 8 (where an 8259 programmed as a PC BIOS leaves IRQ 0) from the controller
    # is no #DF: no error code is pushed, the counting handler pops none; the interrupt
    # takes an IST stack
    a, b, n = both_irq(with_ticks(build_long(ring, (vector,)), vector), lambda g: g.u32(COUNT + 4 * vector))
    assert a == b
    assert n > 50


# -- what C leaves to Python -----------------------------------------------------------------
def test_gate_dpl_violation_from_ring3_agrees_and_is_a_gp():
    def build(g: Guest) -> None:
        g.protected_mode("mov ecx, 20\ntop:\nint 0x40\ndec ecx\njnz top\n" + EXIT, ring=3)
        g.cpu.rflags = g.cpu.rflags | EF_IOPL3 | EF_IF
        g.idt32(0x40, counting_handler(0x40, 32), dpl=0)
        # the #GP(0x40*8+2) handler steps over the 2-byte INT n
        g.idt32(13, counting_handler(13, 32, skip=2, pop_ec=True), dpl=0)
    a, b, n = both(build)
    assert a == b
    g = Guest()
    build(g)
    g.run()
    assert g.u32(COUNT + 4 * 13) == 20 and g.u32(COUNT + 4 * 0x40) == 0


def test_not_present_gate_task_gate_and_16bit_gate_agree():
    def build(g: Guest) -> None:
        code = "mov ecx, 10\ntop:\nint 0x41\nint 0x42\ndec ecx\njnz top\nud2\n" + EXIT
        g.protected_mode(code, at=0xA000)   # a 16-bit gate saves IP only: code below 64 KiB
        g.idt32(0x41, counting_handler(0x41, 32), present=False)
        g.idt32(11, counting_handler(11, 32, skip=2, pop_ec=True))        # #NP(0x41*8+2)
        # a 16-bit interrupt gate to a 16-bit code segment: IRET (16-bit) returns
        at = 0x2F000
        g.put(at, asm(f"inc dword ptr [{COUNT + 4 * 0x42:#x}]\niret\n", 16, at - 0x20000))
        code16 = seg_desc(0x20000, 0xFFFF, 0x9B, 0x0)
        g.put(GDT + KCODE16, struct.pack("<Q", code16))
        g.put(IDT + 0x42 * 8, struct.pack("<Q", gate32(KCODE16, at - 0x20000, 0x6, 0)))
        # #UD through a task gate to a task that counts and exits the guest
        task_code = 0x2E000
        g.put(task_code, asm(f"inc dword ptr [{COUNT + 4 * 6:#x}]\n" + EXIT, 32, task_code))
        tss2 = 0x5F000
        t = bytearray(0x68)
        struct.pack_into("<I", t, 0x1C, 0)
        struct.pack_into("<II", t, 0x20, task_code, 2)
        struct.pack_into("<I", t, 0x38, STACK0 - 0x1000)
        for i, sel in enumerate((0x10, KCODE32, 0x10, 0x10, 0x10, 0x10)):
            struct.pack_into("<I", t, 0x48 + 4 * i, sel)
        g.put(tss2, bytes(t))
        g.put(GDT + 0x50, struct.pack("<Q", seg_desc(tss2, 0x67, 0x89, 0x0)))
        g.cpu.set_gdtr(GDT, 0x57)
        g.put(IDT + 6 * 8, struct.pack("<Q", gate32(0x50, 0, 0x5, 0)))
    a, b, _ = both(build)
    assert a == b


def test_a_stack_that_wraps_its_16bit_segment_agrees():
    def build(g: Guest) -> None:
        g.real_mode("mov cx, 5\ntop:\nint 0x30\ndec cx\njnz top\n" + EXIT)
        g.ivt(0x30, counting_handler(0x30, 16), off=0x1000)
        g.cpu.rsp = 0x0002    # the 6-byte frame wraps to the top of the segment
    a, b, n = both(build)
    assert a == b


# -- page faults (the shadow MMU's, delivered between two entries into the guest) ------------------
def pf_handler(bits: int, length: int) -> str:
    """#PF: record the error code and CR2; step over a data access of `length` bytes, or
    return from a fetch fault (EIP == CR2, ring 0) to the CALL's return address."""
    a, sp, w = ("rax", "rsp", 8) if bits == 64 else ("eax", "esp", 4)
    slot = COUNT + 0x400 + 0x40 * 14
    # the CALL's return address: above the 32-bit frame; in IA-32e mode at the saved RSP
    fetch_return = f"mov rax, [rsp + 40]\nmov rax, [rax]" if bits == 64 else f"mov eax, [esp + {5 * w}]"
    return f"""
        inc dword ptr [{COUNT + 4 * 14:#x}]
        push {a}
        mov {a}, [{sp} + {w}]
        mov [{slot:#x}], {a}
        mov {a}, cr2
        mov [{slot + w:#x}], {a}
        cmp {a}, [{sp} + {2 * w}]
        jne data
        {fetch_return}
        mov [{sp} + {2 * w}], {a}
        jmp done
    data:
        add {'qword' if bits == 64 else 'dword'} ptr [{sp} + {2 * w}], {length}
    done:
        pop {a}
        add {sp}, {w}
        {'iretq' if bits == 64 else 'iretd'}
    """


def build_page_faults(bits: int, ring: int):
    def build(g: Guest) -> None:
        length = len(asm("mov eax, dword ptr [0x500000]", bits, 0x10000))
        body = "mov eax, dword ptr [0x500000]\nmov dword ptr [0x500000], eax\n"
        if ring == 0:
            body += f"call 0x500000\nadd {'rsp, 8' if bits == 64 else 'esp, 4'}\n"
        else:
            body += "mov eax, dword ptr [0x5000]\n"   # a supervisor page (below)
        code = "mov ecx, 10\ntop:\n" + body + "dec ecx\njnz top\n" + EXIT
        if bits == 32:
            g.protected_mode(code, ring=ring, paging=True)
            g.idt32(14, pf_handler(32, length), dpl=0)
            pte = 0x4000 + 0x1000 + 4 * 5          # 0x5000: U/S=0
            g.put(pte, struct.pack("<I", 0x5000 | 3))
        else:
            g.long_mode(code, ring=ring)
            g.idt64(14, pf_handler(64, length), dpl=0)
            # 0x5000 supervisor-only: the first 2 MiB through a page table instead
            pt = 0x9000
            g.put(pt, b"".join(struct.pack("<Q", (i << 12) | (3 if i == 5 else 7)) for i in range(512)))
            g.put(0x4000 + 0x2000, struct.pack("<Q", pt | 7))
        g.cpu.rflags = g.cpu.rflags | EF_IOPL3 | EF_IF
    return build


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("ring", [0, 3])
def test_page_faults_agree(bits, ring):
    a, b, n = both(build_page_faults(bits, ring))
    assert a == b
    assert n >= 2 * 9
