"""Conformance tests for devices.apic.lapic, from the Intel SDM vol. 3A chapter 10.

Every access goes through an MmioBus at 0xFEE00000 carrying the vCPU id, time
is a manual VirtualClock, and what reaches each CPU is read from its CpuPins.
"""
from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.apic import lapic as L
from devices.apic.apicbus import DM_EXTINT, DM_NMI, ApicMessage
from devices.base import DeviceStateError
from tests.devices.rigs_apic import ApicSystem

LVT_REGS = (L.REG_LVT_CMCI, L.REG_LVT_TIMER, L.REG_LVT_THERMAL, L.REG_LVT_PERF, L.REG_LVT_LINT0,
            L.REG_LVT_LINT1, L.REG_LVT_ERROR)


def fixed(sy: ApicSystem, cpu: int, vector: int, level: bool = False) -> None:
    """A fixed message from outside (an I/O APIC) to physical APIC ``cpu``."""
    sy.bus.send(ApicMessage(vector=vector, dest=cpu, level_triggered=level))


class EoiRecorder:
    """Stands in for an I/O APIC on the bus: records EOI broadcasts."""

    def __init__(self) -> None:
        self.vectors: list[int] = []

    def eoi(self, vector: int) -> None:
        self.vectors.append(vector)


# ---------------------------------------------------------------------------
# 10.4.7.1: the register file after power-up

def test_power_up_register_values():
    sy = ApicSystem(2)
    for cpu in (0, 1):
        assert sy.read(cpu, L.REG_ID) == cpu << 24
        assert sy.read(cpu, L.REG_VERSION) == 0x0005_0014
        for reg in (L.REG_TPR, L.REG_APR, L.REG_PPR, L.REG_EOI, L.REG_RRD, L.REG_LDR, L.REG_ESR,
                    L.REG_ICR_LO, L.REG_ICR_HI, L.REG_TMICT, L.REG_TMCCT, L.REG_TDCR):
            assert sy.read(cpu, reg) == 0, hex(reg)
        assert sy.read(cpu, L.REG_DFR) == 0xFFFF_FFFF
        assert sy.read(cpu, L.REG_SVR) == 0xFF
        assert sy.irr(cpu) == sy.isr(cpu) == sy.tmr(cpu) == []
        for reg in LVT_REGS:
            expect = 0x700 if (cpu, reg) == (0, L.REG_LVT_LINT0) else 0x1_0000
            assert sy.read(cpu, reg) == expect, (cpu, hex(reg))
    assert sy.lapics[0].msr_read(L.MSR_APIC_BASE) == 0xFEE0_0900   # BSP, enabled
    assert sy.lapics[1].msr_read(L.MSR_APIC_BASE) == 0xFEE0_0800
    assert not any(p.intr or p.pending_event for p in sy.pins)


def test_each_vcpu_sees_its_own_apic_at_the_same_address():
    sy = ApicSystem(3, pic=False)
    assert [sy.read(cpu, L.REG_ID) >> 24 for cpu in range(3)] == [0, 1, 2]
    sy.write(2, L.REG_TPR, 0x40)
    assert [sy.read(cpu, L.REG_TPR) for cpu in range(3)] == [0, 0, 0x40]
    assert sy.read(7, L.REG_ID) == 0xFFFF_FFFF   # no APIC for that vCPU: unclaimed


def test_read_only_registers_ignore_writes_without_error():
    sy = ApicSystem(1)
    sy.enable()
    fixed(sy, 0, 0x42)
    for reg in (L.REG_VERSION, L.REG_APR, L.REG_PPR, L.REG_RRD, L.REG_TMCCT,
                L.REG_ISR, L.REG_TMR + 0x20, L.REG_IRR + 0x20):
        before = sy.read(0, reg)
        sy.write(0, reg, 0xFFFF_FFFF)
        assert sy.read(0, reg) == before, hex(reg)
    assert sy.irr(0) == [0x42]
    assert sy.esr(0) == 0


@pytest.mark.parametrize("reg, written, read", [
    (L.REG_TPR, 0xFFFF_FFFF, 0xFF),
    (L.REG_LDR, 0xFFFF_FFFF, 0xFF00_0000),
    (L.REG_DFR, 0x0000_0000, 0x0FFF_FFFF),        # bits 27:0 read as ones
    (L.REG_DFR, 0x1234_5678, 0x1FFF_FFFF),
    (L.REG_SVR, 0xFFFF_FFFF, 0x1FF),
    (L.REG_ICR_HI, 0xFFFF_FFFF, 0xFF00_0000),
    (L.REG_TDCR, 0xFFFF_FFFF, 0xB),
    (L.REG_ID, 0xFFFF_FFFF, 0xFF00_0000),
])
def test_writable_bits(reg, written, read):
    sy = ApicSystem(1)
    sy.write(0, reg, written)
    assert sy.read(0, reg) == read


@pytest.mark.parametrize("reg, mask", [
    (L.REG_LVT_CMCI, 0x107FF), (L.REG_LVT_TIMER, 0x700FF), (L.REG_LVT_THERMAL, 0x107FF),
    (L.REG_LVT_PERF, 0x107FF), (L.REG_LVT_LINT0, 0x1A7FF), (L.REG_LVT_LINT1, 0x1A7FF),
    (L.REG_LVT_ERROR, 0x100FF),
])
def test_lvt_writable_bits_and_read_only_status(reg, mask):
    sy = ApicSystem(1)
    sy.enable()
    sy.write(0, reg, 0xFFFF_FFFF)
    assert sy.read(0, reg) == mask        # delivery status (12) and remote IRR (14) stay 0
    sy.write(0, reg, 0x0000_0031)
    assert sy.read(0, reg) == 0x31


def test_icr_low_reads_back_with_delivery_status_idle():
    sy = ApicSystem(2, pic=False)
    sy.enable()
    sy.ipi(0, 0x0000_4030, dest=1)      # fixed, physical, level assert
    assert sy.read(0, L.REG_ICR_LO) == 0x4030   # bit 12 clear: already delivered
    assert sy.read(0, L.REG_ICR_HI) == 0x0100_0000
    assert sy.irr(1) == [0x30]
    sy.write(0, L.REG_ICR_LO, 0xFFFF_FFFF)     # mode 111 is reserved in the ICR: nothing sent
    assert sy.read(0, L.REG_ICR_LO) == 0x000C_CFFF
    assert sy.irr(0) == [] and sy.irr(1) == [0x30]


def test_byte_and_misaligned_accesses():
    sy = ApicSystem(1)
    assert sy.read(0, L.REG_VERSION + 2, size=1) == 0x05      # max LVT entry byte
    sy.write(0, L.REG_TPR, 0x37, size=1)
    assert sy.read(0, L.REG_TPR) == 0x37
    assert sy.read(0, L.REG_TPR, size=8) == 0x37               # dword at +4 is not a register
    assert sy.read(0, L.REG_ID + 4) == 0 and sy.read(0, L.REG_ID + 8) == 0
    sy.write(0, L.REG_TPR + 4, 0xFF)
    assert sy.read(0, L.REG_TPR) == 0x37
    assert sy.esr(0) == 0


# ---------------------------------------------------------------------------
# 10.5.3: errors, and the ESR's write-to-update semantics

@pytest.mark.parametrize("reg", [0x000, 0x010, 0x040, 0x070, 0x290, 0x2E0, 0x3A0, 0x3D0, 0x3F0, 0x400, 0xFF0])
def test_reserved_register_sets_illegal_register_address(reg):
    sy = ApicSystem(1)
    assert sy.read(0, reg) == 0
    assert sy.read(0, L.REG_ESR) == 0          # logged, but not visible before an ESR write
    sy.write(0, L.REG_ESR, 0)
    assert sy.read(0, L.REG_ESR) == L.ESR_ILLEGAL_REGISTER
    sy.write(0, L.REG_ESR, 0)                  # the next write shows what came since: nothing
    assert sy.read(0, L.REG_ESR) == 0
    sy.write(0, reg, 0x1234)
    assert sy.esr(0) == L.ESR_ILLEGAL_REGISTER


def test_error_lvt_interrupt_on_illegal_vectors():
    sy = ApicSystem(2, pic=False)
    sy.enable()
    sy.write(0, L.REG_LVT_ERROR, 0xE3)
    fixed(sy, 0, 0x05)                         # vectors 0-15 are illegal
    assert sy.irr(0) == [0xE3]
    assert sy.esr(0) == L.ESR_RECEIVE_ILLEGAL_VECTOR
    assert sy.inta(0) == 0xE3
    sy.eoi(0)
    sy.ipi(0, 0x0000_400F, dest=1)             # sending one is an error of the sender
    assert sy.irr(1) == []
    assert sy.esr(0) == L.ESR_SEND_ILLEGAL_VECTOR
    assert sy.irr(0) == [0xE3]
    assert sy.esr(1) == 0


def test_error_lvt_with_an_illegal_vector_does_not_loop():
    sy = ApicSystem(1)
    sy.enable()
    sy.write(0, L.REG_LVT_ERROR, 0x03)
    sy.read(0, 0x3F0)
    assert sy.irr(0) == []
    assert sy.esr(0) == L.ESR_ILLEGAL_REGISTER | L.ESR_RECEIVE_ILLEGAL_VECTOR


# ---------------------------------------------------------------------------
# 10.4.7.2: software enable and disable through the SVR

def test_software_disabled_apic_keeps_lvts_masked():
    sy = ApicSystem(1)
    sy.write(0, L.REG_LVT_TIMER, 0x30)
    assert sy.read(0, L.REG_LVT_TIMER) == 0x1_0030
    sy.enable()
    sy.write(0, L.REG_LVT_TIMER, 0x30)
    sy.write(0, L.REG_LVT_LINT1, 0x400)
    assert sy.read(0, L.REG_LVT_TIMER) == 0x30
    sy.write(0, L.REG_SVR, 0xFF)               # enabled -> disabled masks every entry
    for reg in LVT_REGS:
        assert sy.read(0, reg) & L.LVT_MASKED, hex(reg)
    assert sy.read(0, L.REG_LVT_LINT1) == 0x1_0400


def test_software_disabled_apic_drops_fixed_but_takes_nmi_init_sipi():
    sy = ApicSystem(1)
    sy.bus.send(ApicMessage(vector=0x40, dest=0))
    assert sy.irr(0) == [] and not sy.pins[0].intr
    sy.bus.send(ApicMessage(vector=0, delivery_mode=DM_NMI, dest=0))
    sy.bus.send(ApicMessage(vector=0, delivery_mode=5, dest=0))
    sy.bus.send(ApicMessage(vector=0x9A, delivery_mode=6, dest=0))
    assert sy.pins[0].nmi and sy.pins[0].init and sy.pins[0].sipi == 0x9A


def test_irr_held_while_disabled_is_delivered_after_enable():
    sy = ApicSystem(1, pic=False)
    sy.enable()
    fixed(sy, 0, 0x50)
    sy.write(0, L.REG_SVR, 0xFF)
    assert not sy.pins[0].intr and sy.irr(0) == [0x50]
    sy.enable()
    assert sy.inta(0) == 0x50


# ---------------------------------------------------------------------------
# 10.8: acceptance, priorities, EOI, spurious interrupts

def test_highest_priority_first_and_nesting_by_class():
    sy = ApicSystem(1, pic=False)
    sy.enable()
    fixed(sy, 0, 0x35)
    fixed(sy, 0, 0x61)
    assert sy.irr(0) == [0x35, 0x61]
    assert sy.inta(0) == 0x61
    assert sy.isr(0) == [0x61] and sy.irr(0) == [0x35]
    assert sy.read(0, L.REG_PPR) == 0x60
    assert not sy.pins[0].intr                  # class 3 waits behind class 6
    fixed(sy, 0, 0x65)
    assert not sy.pins[0].intr                  # same class as the one in service
    fixed(sy, 0, 0x71)
    assert sy.inta(0) == 0x71                   # a higher class nests
    assert sy.isr(0) == [0x61, 0x71]
    sy.eoi(0)                                   # EOI ends the highest in service
    assert sy.isr(0) == [0x61]
    sy.eoi(0)
    assert sy.inta(0) == 0x65
    sy.eoi(0)
    assert sy.inta(0) == 0x35
    sy.eoi(0)
    assert sy.isr(0) == [] and not sy.pins[0].intr
    sy.eoi(0)                                   # EOI with nothing in service: ignored
    assert sy.read(0, L.REG_PPR) == 0


def test_tpr_masks_by_class_and_ppr_follows_tpr_and_isr():
    sy = ApicSystem(1, pic=False)
    sy.enable()
    sy.write(0, L.REG_TPR, 0x5A)
    assert sy.read(0, L.REG_PPR) == 0x5A        # TPR class >= ISR class: PPR = TPR
    fixed(sy, 0, 0x5F)
    assert not sy.pins[0].intr
    fixed(sy, 0, 0x60)
    assert sy.inta(0) == 0x60
    assert sy.read(0, L.REG_PPR) == 0x60        # ISR class above: PPR = ISRV[7:4], low nibble 0
    sy.eoi(0)
    sy.write(0, L.REG_TPR, 0x40)
    assert sy.inta(0) == 0x5F


def test_cr8_is_the_tpr_priority_class():
    sy = ApicSystem(1, pic=False)
    sy.enable()
    a = sy.lapics[0]
    sy.write(0, L.REG_TPR, 0x5A)
    assert a.cr8 == 5
    fixed(sy, 0, 0x65)
    a.write_cr8(0x16)                           # only bits 3:0 count
    assert sy.read(0, L.REG_TPR) == 0x60
    assert not sy.pins[0].intr
    a.write_cr8(5)
    assert sy.pins[0].intr and sy.kicks == [0, 0, 0]


def test_arbitration_priority_register():
    sy = ApicSystem(1, pic=False)
    sy.enable()
    sy.write(0, L.REG_TPR, 0x32)
    assert sy.read(0, L.REG_APR) == 0x32        # TPR >= IRRV and TPR > ISRV
    fixed(sy, 0, 0x47)
    assert sy.read(0, L.REG_APR) == 0x40        # max(TPR, ISRV, IRRV) class, low nibble 0
    assert sy.inta(0) == 0x47
    assert sy.read(0, L.REG_APR) == 0x40
    sy.write(0, L.REG_TPR, 0x4C)
    assert sy.read(0, L.REG_APR) == 0x40        # TPR class not above ISRV class
    sy.write(0, L.REG_TPR, 0x5C)
    assert sy.read(0, L.REG_APR) == 0x5C


def test_spurious_vector_when_nothing_is_deliverable_at_inta():
    sy = ApicSystem(1, pic=False)
    sy.enable(svr=0x1EF)
    fixed(sy, 0, 0x80)
    assert sy.pins[0].intr
    sy.write(0, L.REG_TPR, 0x90)                # the request is masked before INTA
    assert sy.pins[0].acknowledge() == 0xEF
    assert sy.isr(0) == [] and sy.irr(0) == [0x80]
    sy.write(0, L.REG_TPR, 0)
    assert sy.inta(0) == 0x80


def test_tmr_records_trigger_mode_and_eoi_broadcasts_level_vectors_only():
    sy = ApicSystem(1, pic=False)
    rec = EoiRecorder()
    sy.bus.attach_ioapic(rec)
    sy.enable()
    fixed(sy, 0, 0x70, level=True)
    fixed(sy, 0, 0x60)
    assert sy.tmr(0) == [0x70]
    assert sy.inta(0) == 0x70
    sy.eoi(0)
    assert rec.vectors == [0x70]
    assert sy.inta(0) == 0x60
    sy.eoi(0)
    assert rec.vectors == [0x70]                # edge vector: no broadcast
    fixed(sy, 0, 0x70)                          # accepted edge-triggered: TMR bit cleared
    assert sy.tmr(0) == []


def test_kicks_on_intr_changes():
    sy = ApicSystem(2, pic=False)
    sy.enable()
    fixed(sy, 1, 0x40)
    assert sy.kicks == [1]
    fixed(sy, 1, 0x41)                          # INTR already up
    assert sy.kicks == [1]
    sy.write(1, L.REG_TPR, 0xF0)                # INTR drops
    assert sy.kicks == [1, 1]
    sy.bus.send(ApicMessage(vector=0, delivery_mode=DM_NMI, dest=0))
    assert sy.kicks == [1, 1, 0]


# ---------------------------------------------------------------------------
# A model of 10.8.3.1-10.8.5: random traffic, the APIC and the model agree

class PriorityModel:
    def __init__(self) -> None:
        self.irr: set[int] = set()
        self.isr: set[int] = set()
        self.tpr = 0

    def ppr(self) -> int:
        isrv = max(self.isr, default=0)
        return self.tpr if self.tpr >> 4 >= isrv >> 4 else isrv & 0xF0

    def pending(self) -> int | None:
        v = max(self.irr, default=None)
        return v if v is not None and v >> 4 > self.ppr() >> 4 else None


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.one_of(
    st.tuples(st.just("irq"), st.integers(16, 255)),
    st.tuples(st.just("tpr"), st.integers(0, 255)),
    st.tuples(st.just("inta"), st.just(0)),
    st.tuples(st.just("eoi"), st.just(0)),
), max_size=60))
def test_priority_logic_matches_the_sdm_model(ops):
    sy = ApicSystem(1, pic=False)
    sy.enable(svr=0x1FF)
    m = PriorityModel()
    for op, arg in ops:
        if op == "irq":
            fixed(sy, 0, arg)
            m.irr.add(arg)
        elif op == "tpr":
            sy.write(0, L.REG_TPR, arg)
            m.tpr = arg
        elif op == "inta":
            want = m.pending()
            got = sy.pins[0].acknowledge()
            if want is None:
                assert got == 0xFF
            else:
                assert got == want
                m.irr.discard(want)
                m.isr.add(want)
        else:
            sy.eoi(0)
            if m.isr:
                m.isr.discard(max(m.isr))
        assert sy.read(0, L.REG_PPR) == m.ppr()
        assert sy.pins[0].intr == (m.pending() is not None)
        assert sy.irr(0) == sorted(m.irr) and sy.isr(0) == sorted(m.isr)


# ---------------------------------------------------------------------------
# LINT0 / LINT1 and the 8259 (10.5.1, virtual wire)

def test_lint0_extint_passes_the_8259_through_on_the_bsp_after_reset():
    sy = ApicSystem(2)
    assert sy.pic is not None
    sy.pic.set_irq(1, True)
    assert sy.pins[0].intr and not sy.pins[1].intr      # only the BSP's LINT0 is ExtINT
    assert 0 in sy.kicks
    assert sy.inta(0) == 0x09
    assert sy.isr(0) == []                              # an ExtINT bypasses IRR/ISR
    sy.pic.io_write(0x20, 1, 0x20)
    assert not sy.pins[0].intr


def test_extint_goes_before_apic_vectors_and_masking_lint0_cuts_the_wire():
    sy = ApicSystem(1)
    assert sy.pic is not None
    sy.enable()
    fixed(sy, 0, 0xF0)
    sy.pic.set_irq(0, True)
    assert sy.inta(0) == 0x08                           # ExtINT ignores priorities
    assert sy.inta(0) == 0xF0
    sy.pic.io_write(0x20, 1, 0x20)
    sy.eoi(0)
    sy.pic.set_irq(0, False)
    sy.write(0, L.REG_LVT_LINT0, 0x1_0700)
    sy.pic.set_irq(0, True)
    assert sy.pic.intr and not sy.pins[0].intr
    sy.write(0, L.REG_LVT_LINT0, 0x0700)
    assert sy.pins[0].intr and sy.inta(0) == 0x08


def test_extint_message_makes_the_cpu_ask_the_8259():
    sy = ApicSystem(2)
    assert sy.pic is not None
    sy.enable()
    sy.pic.set_irq(4, True)
    sy.bus.send(ApicMessage(vector=0, delivery_mode=DM_EXTINT, dest=1))
    assert sy.inta(1) == 0x0C
    assert not sy.pins[1].intr


def test_lint0_fixed_level_round_trip_with_remote_irr():
    sy = ApicSystem(1)
    rec = EoiRecorder()
    sy.bus.attach_ioapic(rec)
    sy.enable()
    a = sy.lapics[0]
    sy.write(0, L.REG_LVT_LINT0, 0x8000 | 0x44)         # fixed, level
    a.set_lint(0, True)
    assert sy.irr(0) == [0x44] and sy.tmr(0) == [0x44]
    assert sy.read(0, L.REG_LVT_LINT0) & L.LVT_REMOTE_IRR
    assert sy.inta(0) == 0x44
    sy.eoi(0)                                           # still asserted: taken again
    assert sy.irr(0) == [0x44]
    assert rec.vectors == [0x44]
    a.set_lint(0, False)                                # withdrawn before INTA
    assert sy.irr(0) == [] and not sy.read(0, L.REG_LVT_LINT0) & L.LVT_REMOTE_IRR
    assert not sy.pins[0].intr
    a.set_lint(0, True)
    assert sy.inta(0) == 0x44
    a.set_lint(0, False)                                # falls while in service
    sy.eoi(0)
    assert sy.irr(0) == [] and not sy.read(0, L.REG_LVT_LINT0) & L.LVT_REMOTE_IRR


def test_lint0_level_request_taken_when_unmasked():
    sy = ApicSystem(1, pic=False)
    sy.enable()
    a = sy.lapics[0]
    sy.write(0, L.REG_LVT_LINT0, 0x1_8000 | 0x44)
    a.set_lint(0, True)
    assert sy.irr(0) == []
    sy.write(0, L.REG_LVT_LINT0, 0x8000 | 0x44)
    assert sy.irr(0) == [0x44]


def test_lint1_nmi_on_rising_edges_only_and_masked_lint1():
    sy = ApicSystem(1, pic=False)
    sy.enable()
    a, pins = sy.lapics[0], sy.pins[0]
    sy.write(0, L.REG_LVT_LINT1, 0x400)
    a.set_lint(1, True)
    assert pins.take_nmi()
    a.set_lint(1, True)                                 # no edge
    assert not pins.nmi
    a.set_lint(1, False)
    sy.write(0, L.REG_LVT_LINT1, 0x1_0400)
    a.set_lint(1, True)
    assert not pins.nmi
    a.set_lint(1, False)
    sy.write(0, L.REG_LVT_LINT1, 0x0031)                # fixed mode: edge-triggered vector
    a.set_lint(1, True)
    assert sy.irr(0) == [0x31] and sy.tmr(0) == []


@pytest.mark.parametrize("lvt, what", [(0x200, "smi"), (0x500, "init")])
def test_lint_smi_and_init_modes(lvt, what):
    sy = ApicSystem(1, pic=False)
    sy.enable()
    sy.write(0, L.REG_LVT_LINT1, lvt)
    sy.lapics[0].set_lint(1, True)
    assert getattr(sy.pins[0], what)


# ---------------------------------------------------------------------------
# 10.4.3, 10.4.4: the APIC base MSR

def test_apic_base_msr_moves_the_page_and_reports_it():
    sy = ApicSystem(1)
    a = sy.lapics[0]
    moves: list[tuple[int, int]] = []
    a.on_base_change = lambda old, new: moves.append((old, new))
    assert a.msr_write(L.MSR_APIC_BASE, 0xFED0_0800)     # BSP bit written 0: read-only
    assert a.msr_read(L.MSR_APIC_BASE) == 0xFED0_0900
    assert moves == [(0xFEE0_0000, 0xFED0_0000)]
    assert a.msr_write(L.MSR_APIC_BASE, 0xFED0_0900)
    assert moves == [(0xFEE0_0000, 0xFED0_0000)]         # same base: no news
    assert a.msr_write(L.MSR_APIC_BASE, 0xAB_FED0_0900)  # 40 physical address bits
    for bad in (0xFEE0_0901, 0xFEE0_0A00, 0xFEE0_0D00, 1 << 40 | 0xFEE0_0900):
        assert not a.msr_write(L.MSR_APIC_BASE, bad), hex(bad)
    assert a.msr_read(L.MSR_APIC_BASE) == 0xAB_FED0_0900
    a.reset()                                            # power-up puts the page back, and says so
    assert moves[-1] == (0xAB_FED0_0000, 0xFEE0_0000)
    assert a.msr_read(L.MSR_APIC_BASE) == 0xFEE0_0900


def test_msrs_it_does_not_own_and_the_bank_forwards_by_vcpu():
    sy = ApicSystem(2)
    a = sy.lapics[0]
    assert a.msr_read(0x10) is None and a.msr_read(0x6E1) is None
    assert a.msr_write(0x10, 0) is False
    assert sy.bank.msr_read(L.MSR_APIC_BASE, 1) == 0xFEE0_0800
    assert sy.bank.msr_read(L.MSR_APIC_BASE, 5) is None
    assert sy.bank.msr_write(L.MSR_APIC_BASE, 0xFEE0_0000, 1)
    assert not sy.bank.msr_write(L.MSR_APIC_BASE, 0xFEE0_0000, 5)
    assert not sy.lapics[1].hw_enabled and sy.lapics[0].hw_enabled


def test_globally_disabled_apic_is_absent_and_the_8259_reaches_the_cpu():
    sy = ApicSystem(2)
    assert sy.pic is not None
    a, pins = sy.lapics[1], sy.pins[1]
    sy.enable()
    sy.write(1, L.REG_TPR, 0x20)
    sy.write(1, L.REG_LVT_LINT1, 0x1_0400)            # masked: would block NMIs if enabled
    assert a.msr_write(L.MSR_APIC_BASE, 0xFEE0_0000)
    assert sy.read(1, L.REG_ID) == 0xFFFF_FFFF        # registers gone
    sy.write(1, L.REG_TPR, 0x10)
    sy.ipi(0, 0x4040, dest=1)                         # not on the bus
    assert not pins.intr
    sy.pic.set_irq(3, True)                           # LINT0 is the CPU's INTR
    assert pins.intr and pins.acknowledge() == 0x0B
    a.set_lint(1, True)                               # LINT1 is the CPU's NMI
    assert pins.nmi
    assert a.msr_write(L.MSR_APIC_BASE, 0xFEE0_0800)  # back: software-disabled, reset state
    assert sy.read(1, L.REG_ID) == 0x0100_0000
    assert sy.read(1, L.REG_TPR) == 0 and sy.read(1, L.REG_SVR) == 0xFF
    assert sy.read(1, L.REG_LVT_LINT0) == 0x1_0000


def test_init_reset_keeps_id_and_base_but_masks_lint0():
    sy = ApicSystem(1)
    a = sy.lapics[0]
    sy.enable()
    sy.write(0, L.REG_ID, 0x0700_0000)
    sy.write(0, L.REG_TPR, 0x30)
    sy.write(0, L.REG_LDR, 0x0100_0000)
    a.msr_write(L.MSR_APIC_BASE, 0xFED0_0900)
    a.init_reset()
    assert a.msr_read(L.MSR_APIC_BASE) == 0xFED0_0900
    assert a.read_register(L.REG_ID) == 0x0700_0000
    assert a.read_register(L.REG_TPR) == 0 and a.read_register(L.REG_LDR) == 0
    assert a.read_register(L.REG_SVR) == 0xFF
    assert a.read_register(L.REG_LVT_LINT0) == 0x1_0000
    a.reset()
    assert a.read_register(L.REG_ID) == 0 and a.read_register(L.REG_LVT_LINT0) == 0x700
    assert a.msr_read(L.MSR_APIC_BASE) == 0xFEE0_0900


# ---------------------------------------------------------------------------
# 10.5.4: the timer, on the 100 MHz bus clock

DIVIDE = [(0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32), (0x9, 64), (0xA, 128), (0xB, 1)]


def timer_system(lvt: int, tdcr: int = 0xB) -> ApicSystem:
    sy = ApicSystem(1, pic=False)
    sy.enable()
    sy.write(0, L.REG_TDCR, tdcr)
    sy.write(0, L.REG_LVT_TIMER, lvt)
    return sy


@pytest.mark.parametrize("tdcr, divisor", DIVIDE)
def test_one_shot_expires_at_the_exact_tick_for_every_divisor(tdcr, divisor):
    sy = timer_system(0x31, tdcr)
    sy.clock.advance(123)
    sy.write(0, L.REG_TMICT, 1000)
    start = sy.clock.now()
    assert sy.read(0, L.REG_TMCCT) == 1000
    sy.clock.advance_to(start + 400 * divisor + divisor - 1)
    assert sy.read(0, L.REG_TMCCT) == 600
    sy.clock.advance_to(start + 1000 * divisor - 1)
    assert sy.read(0, L.REG_TMCCT) == 1 and sy.irr(0) == []
    sy.clock.advance(1)
    assert sy.irr(0) == [0x31] and sy.read(0, L.REG_TMCCT) == 0
    assert sy.inta(0) == 0x31
    sy.eoi(0)
    sy.clock.advance(10 * 1000 * divisor)
    assert sy.irr(0) == [] and sy.read(0, L.REG_TMCCT) == 0   # one shot only
    assert sy.read(0, L.REG_TMICT) == 1000


def test_periodic_reloads_and_fires_every_period():
    sy = timer_system(0x2_0032, tdcr=0x3)                     # periodic, divide by 16
    sy.write(0, L.REG_TMICT, 10_000)
    start = sy.clock.now()
    fired = []
    for _ in range(5):
        sy.clock.advance_to(sy.clock.next_deadline())
        fired.append(sy.clock.now() - start)
        assert sy.inta(0) == 0x32
        sy.eoi(0)
    assert fired == [160_000 * k for k in range(1, 6)]
    sy.clock.advance(16 * 2500)
    assert sy.read(0, L.REG_TMCCT) == 7500


def test_masked_periodic_timer_keeps_counting_and_resumes_on_its_grid():
    sy = timer_system(0x2_0033)                               # periodic, divide by 1
    sy.write(0, L.REG_TMICT, 50_000)
    start = sy.clock.now()
    sy.write(0, L.REG_LVT_TIMER, 0x3_0033)                    # masked
    assert sy.clock.next_deadline() is None                   # nothing on the clock while masked
    sy.clock.advance(175_000)
    assert sy.irr(0) == []
    assert sy.read(0, L.REG_TMCCT) == 25_000
    sy.write(0, L.REG_LVT_TIMER, 0x2_0033)
    assert sy.clock.next_deadline() == start + 200_000
    sy.clock.advance_to(start + 199_999)
    assert sy.irr(0) == []
    sy.clock.advance(1)
    assert sy.irr(0) == [0x33]


def test_masked_one_shot_expires_silently():
    sy = timer_system(0x1_0034)
    sy.write(0, L.REG_TMICT, 100)
    sy.clock.advance(100)
    assert sy.irr(0) == [] and sy.read(0, L.REG_TMCCT) == 0
    sy.write(0, L.REG_LVT_TIMER, 0x0034)
    sy.clock.advance(1000)
    assert sy.irr(0) == []


def test_initial_count_zero_stops_and_a_new_count_restarts():
    sy = timer_system(0x2_0035)
    sy.write(0, L.REG_TMICT, 20_000)
    sy.clock.advance(5_000)
    sy.write(0, L.REG_TMICT, 0)
    assert sy.read(0, L.REG_TMCCT) == 0 and sy.clock.next_deadline() is None
    sy.clock.advance(100_000)
    assert sy.irr(0) == []
    sy.write(0, L.REG_TMICT, 30_000)
    t = sy.clock.now()
    sy.clock.advance(10_000)
    sy.write(0, L.REG_TMICT, 30_000)                          # rewriting restarts the count
    assert sy.clock.next_deadline() == t + 40_000


def test_changing_the_timer_mode_disarms():
    sy = timer_system(0x0036)
    sy.write(0, L.REG_TMICT, 20_000)
    sy.write(0, L.REG_LVT_TIMER, 0x2_0036)
    assert sy.read(0, L.REG_TMICT) == 0 and sy.read(0, L.REG_TMCCT) == 0
    sy.clock.advance(100_000)
    assert sy.irr(0) == []
    sy.write(0, L.REG_TMICT, 20_000)
    sy.write(0, L.REG_LVT_TIMER, 0x1_2_0036)                  # masking keeps the mode: still armed
    assert sy.read(0, L.REG_TMICT) == 20_000


def test_divide_change_mid_count_continues_from_the_current_count():
    sy = timer_system(0x0037, tdcr=0x0)                       # divide by 2
    sy.write(0, L.REG_TMICT, 1000)
    start = sy.clock.now()
    sy.clock.advance(600)                                     # 300 counts done
    sy.write(0, L.REG_TDCR, 0x1)                              # divide by 4
    assert sy.read(0, L.REG_TMCCT) == 700
    assert sy.clock.next_deadline() == start + 600 + 700 * 4
    sy.clock.advance(700 * 4)
    assert sy.irr(0) == [0x37]


def test_periodic_period_has_a_floor():
    sy = timer_system(0x2_0038)
    sy.write(0, L.REG_TMICT, 10)                              # 10 ticks asked
    start = sy.clock.now()
    assert sy.clock.next_deadline() == start + L.MIN_PERIOD
    sy.clock.advance(L.MIN_PERIOD * 3)
    assert sy.irr(0) == [0x38]
    assert sy.clock.next_deadline() == start + 4 * L.MIN_PERIOD


def test_tsc_deadline_mode():
    sy = timer_system(0x4_0039)
    a = sy.lapics[0]
    sy.clock.advance(1_000)
    sy.write(0, L.REG_TMICT, 5)                               # ignored in this mode
    assert sy.read(0, L.REG_TMICT) == 0 and sy.read(0, L.REG_TMCCT) == 0
    assert a.msr_write(L.MSR_TSC_DEADLINE, 50_000)
    assert a.msr_read(L.MSR_TSC_DEADLINE) == 50_000
    sy.clock.advance_to(49_999)
    assert sy.irr(0) == []
    sy.clock.advance(1)
    assert sy.irr(0) == [0x39]
    assert a.msr_read(L.MSR_TSC_DEADLINE) == 0                # disarmed and cleared
    assert sy.inta(0) == 0x39
    sy.eoi(0)
    a.msr_write(L.MSR_TSC_DEADLINE, 80_000)
    a.msr_write(L.MSR_TSC_DEADLINE, 0)                        # zero disarms
    sy.clock.advance(100_000)
    assert sy.irr(0) == []
    a.msr_write(L.MSR_TSC_DEADLINE, 10)                       # already past: at once
    assert sy.irr(0) == [0x39] and a.msr_read(L.MSR_TSC_DEADLINE) == 0


def test_tsc_deadline_msr_is_inert_in_the_other_modes():
    sy = timer_system(0x003A)
    a = sy.lapics[0]
    assert a.msr_write(L.MSR_TSC_DEADLINE, 5_000)
    assert a.msr_read(L.MSR_TSC_DEADLINE) == 0
    sy.clock.advance(10_000)
    assert sy.irr(0) == []


# ---------------------------------------------------------------------------
# State

def test_save_restore_mid_count_fires_at_the_same_tick():
    sy = timer_system(0x2_003B, tdcr=0x1)
    sy.write(0, L.REG_TMICT, 12_345)
    fixed(sy, 0, 0x90, level=True)
    assert sy.inta(0) == 0x90
    sy.clock.advance(20_000)
    state = copy.deepcopy(sy.bank.save_state())
    other = ApicSystem(1, pic=False)
    other.clock.load_state(sy.clock.save_state())
    other.bank.load_state(state)
    assert other.bank.save_state() == state
    assert other.kicks == []                                  # loading raises nothing
    assert other.isr(0) == [0x90] and other.tmr(0) == [0x90]
    assert other.read(0, L.REG_TMCCT) == sy.read(0, L.REG_TMCCT)
    for s in (sy, other):
        s.clock.advance_to(s.clock.next_deadline())
    assert sy.clock.now() == other.clock.now() == 12_345 * 4
    assert other.irr(0) == sy.irr(0) == [0x3B]


@pytest.mark.parametrize("key, bad", [
    ("tpr", 256), ("svr", 0x200), ("irr", [1] + [0] * 7), ("irr", [0] * 7), ("lvt", [0] * 6),
    ("lvt", [1 << 17] + [0] * 6), ("apic_base", 0xFEE0_0001), ("timer_next", 1.5), ("lint", [1, 0]),
    ("extint_pending", 0), ("tdcr", 4), ("esr", 1), ("id", -1),
])
def test_load_state_refuses_malformed_fields(key, bad):
    sy = ApicSystem(1)
    good = sy.lapics[0].save_state()
    with pytest.raises(DeviceStateError):
        sy.lapics[0].load_state({**good, key: bad})
    assert sy.lapics[0].save_state() == good


def test_bank_load_is_all_or_nothing():
    sy = ApicSystem(2)
    good = sy.bank.save_state()
    bad = copy.deepcopy(good)
    bad["lapics"][0]["tpr"] = 0x20
    bad["lapics"][1]["tpr"] = 999
    with pytest.raises(DeviceStateError):
        sy.bank.load_state(bad)
    assert sy.bank.save_state() == good
    with pytest.raises(DeviceStateError):
        sy.bank.load_state({**good, "lapics": good["lapics"][:1]})


def test_construction_checks():
    sy = ApicSystem(1)
    with pytest.raises(ValueError):
        L.LocalApic(sy.clock, sy.bus, sy.pins[0], apic_id=256)
    with pytest.raises(ValueError):
        L.LocalApicBank([])
    with pytest.raises(ValueError):
        L.LocalApicBank([sy.lapics[0], sy.lapics[0]])
    with pytest.raises(ValueError):
        sy.lapics[0].set_lint(2, True)
    assert sy.bank.lapic(0) is sy.lapics[0]

