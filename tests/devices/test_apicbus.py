"""Conformance tests for devices.apic.apicbus: addressing and delivery modes of
interrupt messages (Intel SDM vol. 3A 10.6), driven by ICR writes through the
MMIO bus and observed on each vCPU's CpuPins."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.apic import lapic as L
from devices.apic.apicbus import (
    DM_EXTINT,
    DM_INIT,
    DM_LOWEST,
    DM_NMI,
    DM_SMI,
    DM_STARTUP,
    ApicBus,
    ApicMessage,
    logical_match,
)
from tests.devices.rigs_apic import ApicSystem

# ICR low words (10.6.1): delivery mode in bits 10:8, logical 11, level 14, trigger 15, shorthand 19:18.
LOGICAL = 0x800
ASSERT = 0x4000
LEVEL_TRIG = 0x8000
SELF, ALL, OTHERS = 1 << 18, 2 << 18, 3 << 18


def receivers(sy: ApicSystem, vector: int) -> list[int]:
    """Which vCPUs have ``vector`` in their IRR (and clear it for the next check)."""
    got = [cpu for cpu in range(len(sy.lapics)) if vector in sy.irr(cpu)]
    for cpu in got:
        sy.lapics[cpu].irr &= ~(1 << vector)
    return got


def board(n: int = 4) -> ApicSystem:
    sy = ApicSystem(n, pic=False)
    sy.enable()
    return sy


# ---------------------------------------------------------------------------
# 10.6.2.1 physical destinations

def test_physical_destination_and_broadcast():
    sy = board()
    sy.ipi(0, ASSERT | 0x40, dest=2)
    assert receivers(sy, 0x40) == [2]
    sy.ipi(3, ASSERT | 0x41, dest=0xFF)
    assert receivers(sy, 0x41) == [0, 1, 2, 3]          # 0xFF: everyone, sender included
    sy.ipi(0, ASSERT | 0x42, dest=9)
    assert receivers(sy, 0x42) == []                    # nobody has that ID


def test_physical_destination_follows_a_rewritten_apic_id():
    sy = board(2)
    sy.write(1, L.REG_ID, 0x2000_0000)
    sy.ipi(0, ASSERT | 0x43, dest=1)
    assert receivers(sy, 0x43) == []
    sy.ipi(0, ASSERT | 0x43, dest=0x20)
    assert receivers(sy, 0x43) == [1]


# ---------------------------------------------------------------------------
# 10.6.2.2 logical destinations, flat and cluster models

def test_logical_flat_model():
    sy = board()
    for cpu in range(4):
        sy.write(cpu, L.REG_LDR, 1 << (24 + cpu))
    sy.ipi(0, ASSERT | LOGICAL | 0x50, dest=0x05)
    assert receivers(sy, 0x50) == [0, 2]
    sy.ipi(0, ASSERT | LOGICAL | 0x51, dest=0xF0)
    assert receivers(sy, 0x51) == []
    sy.ipi(1, ASSERT | LOGICAL | 0x52, dest=0xFF)
    assert receivers(sy, 0x52) == [0, 1, 2, 3]


def test_logical_cluster_model():
    sy = board()
    ldr = [0x11, 0x12, 0x14, 0x21]                      # clusters 1, 1, 1, 2
    for cpu in range(4):
        sy.write(cpu, L.REG_DFR, 0x0FFF_FFFF)
        sy.write(cpu, L.REG_LDR, ldr[cpu] << 24)
    sy.ipi(0, ASSERT | LOGICAL | 0x60, dest=0x13)
    assert receivers(sy, 0x60) == [0, 1]
    sy.ipi(0, ASSERT | LOGICAL | 0x61, dest=0x21)
    assert receivers(sy, 0x61) == [3]
    sy.ipi(0, ASSERT | LOGICAL | 0x62, dest=0x31)
    assert receivers(sy, 0x62) == []
    sy.ipi(0, ASSERT | LOGICAL | 0x63, dest=0xFF)        # broadcast in either model
    assert receivers(sy, 0x63) == [0, 1, 2, 3]


def test_each_receiver_matches_with_its_own_dfr():
    sy = board(2)
    sy.write(0, L.REG_LDR, 0x1100_0000)                  # flat: bits 0 and 4
    sy.write(1, L.REG_DFR, 0x0FFF_FFFF)
    sy.write(1, L.REG_LDR, 0x1100_0000)                  # cluster 1, member bit 0
    sy.ipi(0, ASSERT | LOGICAL | 0x64, dest=0x10)
    assert receivers(sy, 0x64) == [0]
    sy.ipi(0, ASSERT | LOGICAL | 0x65, dest=0x11)
    assert receivers(sy, 0x65) == [0, 1]


@pytest.mark.parametrize("dest, ldr, model, hit", [
    (0x01, 0x01, 0xF, True), (0x02, 0x01, 0xF, False), (0x81, 0x80, 0xF, True),
    (0x13, 0x12, 0x0, True), (0x13, 0x22, 0x0, False), (0x10, 0x11, 0x0, False),
    (0x01, 0x01, 0x7, False),                                # reserved model selects nothing
])
def test_logical_match(dest, ldr, model, hit):
    assert logical_match(dest, ldr, model) is hit


# ---------------------------------------------------------------------------
# Shorthands (10.6.1): the destination field is ignored

@pytest.mark.parametrize("shorthand, expect", [(SELF, [1]), (ALL, [0, 1, 2, 3]), (OTHERS, [0, 2, 3])])
def test_shorthands(shorthand, expect):
    sy = board()
    sy.ipi(1, shorthand | ASSERT | 0x70, dest=3)
    assert receivers(sy, 0x70) == expect


# ---------------------------------------------------------------------------
# Delivery modes (10.6.1)

def test_nmi_smi_init_sipi_go_to_the_pins():
    sy = board()
    sy.ipi(0, ASSERT | DM_NMI << 8, dest=1)
    sy.ipi(0, ASSERT | DM_SMI << 8, dest=2)
    sy.ipi(0, OTHERS | LEVEL_TRIG | ASSERT | DM_INIT << 8)
    assert [(p.nmi, p.smi, p.init) for p in sy.pins] == [
        (False, False, False), (True, False, True), (False, True, True), (False, False, True)]
    assert all(sy.irr(cpu) == [] for cpu in range(4))    # none of them touches IRR
    sy.ipi(0, OTHERS | ASSERT | DM_STARTUP << 8 | 0x9F)
    assert [p.sipi for p in sy.pins] == [None, 0x9F, 0x9F, 0x9F]
    assert sy.kicks.count(1) == 3


def test_init_level_deassert_reaches_nobody():
    sy = board()
    sy.ipi(0, ALL | LEVEL_TRIG | DM_INIT << 8)           # level 0, trigger 1: de-assert
    assert not any(p.init for p in sy.pins)
    sy.ipi(0, ALL | DM_INIT << 8)                        # edge INIT: an INIT whatever the level bit
    assert all(p.init for p in sy.pins)


def test_ipis_are_edge_triggered_whatever_the_trigger_bit():
    sy = board(2)
    sy.ipi(0, LEVEL_TRIG | ASSERT | 0x71, dest=1)
    assert sy.irr(1) == [0x71] and sy.tmr(1) == []


@pytest.mark.parametrize("mode", [3, 7])
def test_reserved_icr_delivery_modes_send_nothing(mode):
    sy = board(2)
    sy.ipi(0, ALL | ASSERT | mode << 8 | 0x72)
    assert not any(p.intr or p.pending_event for p in sy.pins)
    assert sy.esr(0) == 0


def test_extint_message_from_the_bus():
    sy = ApicSystem(2)
    assert sy.pic is not None
    sy.enable()
    sy.pic.set_irq(6, True)
    sy.bus.send(ApicMessage(vector=0, delivery_mode=DM_EXTINT, dest=1))
    assert sy.pins[1].acknowledge() == 0x0E


def test_globally_disabled_apic_is_not_a_target():
    sy = board(3)
    assert sy.lapics[1].msr_write(L.MSR_APIC_BASE, 0xFEE0_0000)
    sy.ipi(0, ALL | ASSERT | DM_NMI << 8)
    assert [p.nmi for p in sy.pins] == [True, False, True]
    assert sy.bus.targets(0xFF, False) == [sy.lapics[0], sy.lapics[2]]


# ---------------------------------------------------------------------------
# 10.6.2.4 lowest priority: lowest APR, ties to the lowest APIC ID

def test_lowest_priority_picks_the_lowest_task_priority():
    sy = board()
    for cpu, tpr in enumerate([0x40, 0x20, 0x30, 0x20]):
        sy.write(cpu, L.REG_TPR, tpr)
    sy.ipi(0, OTHERS | ASSERT | DM_LOWEST << 8 | 0x80)
    assert receivers(sy, 0x80) == [1]                    # 1 and 3 tie at 0x20: lowest ID
    sy.write(1, L.REG_TPR, 0x50)
    sy.ipi(0, ALL | ASSERT | DM_LOWEST << 8 | 0x81)
    assert receivers(sy, 0x81) == [3]


def test_lowest_priority_counts_in_service_and_pending_vectors():
    sy = board(2)
    sy.bus.send(ApicMessage(vector=0x90, dest=0))
    assert sy.inta(0) == 0x90                            # CPU 0 is busy at class 9
    sy.ipi(1, ALL | ASSERT | DM_LOWEST << 8 | 0x82)
    assert receivers(sy, 0x82) == [1]
    sy.eoi(0)
    sy.bus.send(ApicMessage(vector=0xA0, dest=0))        # pending at class 10 (APR 0xA0)
    sy.bus.send(ApicMessage(vector=0x83, delivery_mode=DM_LOWEST, dest=0xFF))
    assert receivers(sy, 0x83) == [1]


def test_lowest_priority_skips_software_disabled_apics_and_logical_set():
    sy = board(3)
    for cpu in range(3):
        sy.write(cpu, L.REG_LDR, 1 << (24 + cpu))
    sy.write(0, L.REG_SVR, 0xFF)
    sy.ipi(2, LOGICAL | ASSERT | DM_LOWEST << 8 | 0x84, dest=0x03)
    assert receivers(sy, 0x84) == [1]
    sy.write(1, L.REG_SVR, 0xFF)
    sy.ipi(2, LOGICAL | ASSERT | DM_LOWEST << 8 | 0x85, dest=0x03)
    assert receivers(sy, 0x85) == []                     # nobody able to take it


@settings(max_examples=100, deadline=None, derandomize=True)
@given(tprs=st.lists(st.integers(0, 255), min_size=1, max_size=6),
       pending=st.lists(st.tuples(st.integers(0, 5), st.integers(16, 0xEF)), max_size=6),
       ids=st.permutations(list(range(6))))
def test_lowest_priority_is_the_argmin_of_apr_then_id(tprs, pending, ids):
    n = len(tprs)
    sy = board(n)
    for cpu, tpr in enumerate(tprs):
        sy.write(cpu, L.REG_ID, ids[cpu] << 24)
        sy.write(cpu, L.REG_TPR, tpr)
    for cpu, vector in pending:
        if cpu < n:
            sy.lapics[cpu].receive(0, vector)
    want = min((sy.read(cpu, L.REG_APR), ids[cpu], cpu) for cpu in range(n))[2]
    sy.bus.send(ApicMessage(vector=0xF0, delivery_mode=DM_LOWEST, dest=0xFF))
    assert [cpu for cpu in range(n) if 0xF0 in sy.irr(cpu)] == [want]


# ---------------------------------------------------------------------------
# EOI broadcast and MSI

def test_eoi_broadcast_reaches_every_io_apic():
    bus = ApicBus()
    seen: list[tuple[str, int]] = []

    class Io:
        def __init__(self, name: str) -> None:
            self.name = name

        def eoi(self, vector: int) -> None:
            seen.append((self.name, vector))

    a, b = Io("a"), Io("b")
    bus.attach_ioapic(a)
    bus.attach_ioapic(b)
    with pytest.raises(ValueError):
        bus.attach_ioapic(a)
    bus.eoi(0x33)
    assert seen == [("a", 0x33), ("b", 0x33)]
    assert bus.ioapics == (a, b)


def test_msi_writes_decode_to_messages():
    sy = board()
    for cpu in range(4):
        sy.write(cpu, L.REG_LDR, 1 << (24 + cpu))
    assert sy.bus.send_msi(0xFEE0_2000, 0x0000_0045) == [sy.lapics[2]]
    assert receivers(sy, 0x45) == [2]
    sy.bus.send_msi(0xFEE0_C004, 0x0000_4046)             # logical 0x0C, level-assert edge
    assert receivers(sy, 0x46) == [2, 3]
    sy.bus.send_msi(0xFEE0_1000, 0x0000_C047)             # level-triggered: TMR set
    assert sy.tmr(1) == [0x47]
    sy.bus.send_msi(0xFEE0_1000, 0x0000_0400)             # NMI
    assert sy.pins[1].nmi
    assert sy.bus.send_msi(0xFED0_0000, 0x48) == []       # not an APIC address


def test_attaching_twice_is_refused():
    sy = board(1)
    with pytest.raises(ValueError):
        sy.bus.attach_lapic(sy.lapics[0])
    assert sy.bus.lapics == (sy.lapics[0],)
