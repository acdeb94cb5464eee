"""Conformance tests for devices.apic.ioapic, from the 82093AA datasheet and
QEMU's hw/intc/ioapic.c: registers through IOREGSEL/IOWIN on an MmioBus at
0xFEC00000, inputs through IrqLines, deliveries observed at the local APICs
and CpuPins of a two-vCPU board."""
from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.apic import ioapic as IO
from devices.apic import lapic as L
from devices.apic.apicbus import DM_EXTINT, DM_INIT, DM_LOWEST, DM_NMI, DM_SMI
from devices.base import DeviceStateError
from tests.devices.rigs_apic import ApicSystem

BASE = IO.IOAPIC_BASE


def board(version: int = 0x11, pic: bool = False) -> ApicSystem:
    sy = ApicSystem(2, pic=pic, ioapic=True, ioapic_version=version)
    sy.enable()
    return sy


def remote_irr(sy: ApicSystem, pin: int) -> bool:
    return bool(sy.io_read(0x10 + 2 * pin) & IO.RTE_REMOTE_IRR)


# ---------------------------------------------------------------------------
# Registers (datasheet 3.0-3.2)

def test_power_up_registers():
    sy = board()
    assert sy.mmio.read(BASE + IO.IOREGSEL, 4) == 0
    assert sy.io_read(IO.REG_ID) == 0
    assert sy.io_read(IO.REG_VERSION) == 0x0017_0011
    assert sy.io_read(IO.REG_ARB) == 0
    for pin in range(24):
        assert sy.io_read(0x10 + 2 * pin) == 0x0001_0000     # masked
        assert sy.io_read(0x11 + 2 * pin) == 0
    assert board(0x20).io_read(IO.REG_VERSION) == 0x0017_0020


def test_id_is_four_bits_and_arbitration_id_follows_it():
    sy = board()
    sy.io_write(IO.REG_ID, 0xFFFF_FFFF)
    assert sy.io_read(IO.REG_ID) == 0x0F00_0000
    assert sy.io_read(IO.REG_ARB) == 0x0F00_0000
    sy.io_write(IO.REG_VERSION, 0)                               # read-only
    sy.io_write(IO.REG_ARB, 0)
    assert sy.io_read(IO.REG_VERSION) == 0x0017_0011
    assert sy.io_read(IO.REG_ARB) == 0x0F00_0000
    assert sy.ioapic is not None
    sy.ioapic.reset()
    assert sy.io_read(IO.REG_ID) == 0


def test_ioregsel_is_eight_bits_and_undefined_registers_read_zero():
    sy = board()
    sy.mmio.write(BASE + IO.IOREGSEL, 4, 0x1234_5603)
    assert sy.mmio.read(BASE + IO.IOREGSEL, 4) == 0x03
    assert sy.mmio.read(BASE + IO.IOWIN, 4) == 0
    for index in (0x03, 0x0F, 0x40, 0xFF):
        sy.io_write(index, 0xFFFF_FFFF)
        assert sy.io_read(index) == 0
    assert sy.mmio.read(BASE + 0x20, 4) == 0 and sy.mmio.read(BASE + 0x40, 4) == 0


def test_byte_access_to_ioregsel_and_the_window_repeats_every_256_bytes():
    sy = board()
    sy.mmio.write(BASE + IO.IOREGSEL, 1, 0x01)
    assert sy.mmio.read(BASE + IO.IOWIN + 2, 1) == 0x17
    sy.mmio.write(BASE + 0x300 + IO.IOREGSEL, 4, 0x00)
    assert sy.mmio.read(BASE + 0x300 + IO.IOWIN, 4) == sy.io_read(IO.REG_ID)
    assert sy.mmio.read(BASE + 0x300, 4) == 0x00


def test_redirection_entry_writable_and_read_only_bits():
    sy = board()
    sy.io_write(0x10, 0xFFFF_FFFF)
    sy.io_write(0x11, 0xFFFF_FFFF)
    assert sy.io_read(0x10) == 0x0001_AFFF    # delivery status (12) and remote IRR (14) stay 0
    assert sy.io_read(0x11) == 0xFF00_0000
    sy.io_write(0x3F, 0x0300_0000)            # entry 23, high half
    assert sy.io_read(0x3F) == 0x0300_0000 and sy.io_read(0x3E) == 0x0001_0000


# ---------------------------------------------------------------------------
# Edge-triggered inputs

def test_edge_input_sends_once_per_rising_edge():
    sy = board()
    assert sy.ioapic is not None
    sy.rte(4, 0x34, dest=1)
    line = sy.ioapic.irq_line(4)
    line.raise_()
    assert sy.irr(1) == [0x34] and sy.tmr(1) == []
    assert sy.inta(1) == 0x34
    sy.eoi(1)
    line.raise_()                             # still high: no edge
    line.lower()
    assert sy.irr(1) == []
    line.pulse()                              # up and down: one edge, one message
    assert sy.irr(1) == [0x34]
    assert not remote_irr(sy, 4)


def test_masked_edge_is_ignored_not_held():
    sy = board()
    assert sy.ioapic is not None
    sy.rte(5, 0x35, masked=True)
    sy.ioapic.irq_line(5).pulse()
    sy.rte(5, 0x35)
    assert sy.irr(0) == [] and not sy.pins[0].intr


# ---------------------------------------------------------------------------
# Level-triggered inputs: IOAPIC -> LAPIC -> EOI -> remote IRR clear -> again

def test_level_round_trip_redelivers_while_asserted():
    sy = board()
    assert sy.ioapic is not None
    sy.rte(9, 0x49, level=True)
    line = sy.ioapic.irq_line(9)
    line.raise_()
    assert sy.irr(0) == [0x49] and sy.tmr(0) == [0x49]
    assert remote_irr(sy, 9)
    assert sy.inta(0) == 0x49
    line.lower()
    line.raise_()                             # remote IRR set: nothing more is sent
    assert sy.irr(0) == []
    sy.eoi(0)                                 # EOI broadcast clears remote IRR; still asserted
    assert sy.irr(0) == [0x49] and remote_irr(sy, 9)
    assert sy.inta(0) == 0x49
    line.lower()
    sy.eoi(0)
    assert not remote_irr(sy, 9)
    assert sy.irr(0) == [] and not sy.pins[0].intr
    line.raise_()
    assert sy.irr(0) == [0x49]


def test_level_input_asserted_while_masked_is_sent_when_unmasked():
    sy = board()
    assert sy.ioapic is not None
    sy.rte(10, 0x4A, level=True, masked=True)
    sy.ioapic.set_irq(10, True)
    assert sy.irr(0) == [] and not remote_irr(sy, 10)
    sy.rte(10, 0x4A, level=True)
    assert sy.irr(0) == [0x4A] and remote_irr(sy, 10)


def test_eoi_of_another_vector_or_an_edge_entry_leaves_remote_irr():
    sy = board()
    assert sy.ioapic is not None
    sy.rte(11, 0x4B, level=True)
    sy.ioapic.set_irq(11, True)
    sy.ioapic.eoi(0x4C)
    assert remote_irr(sy, 11)
    sy.ioapic.eoi(0x4B)
    assert remote_irr(sy, 11)                 # sent again at once: still asserted
    sy.ioapic.set_irq(11, False)
    sy.ioapic.eoi(0x4B)
    assert not remote_irr(sy, 11)


def test_switching_to_edge_clears_remote_irr_as_linux_expects():
    sy = board()
    assert sy.ioapic is not None
    sy.rte(12, 0x4C, level=True)
    sy.ioapic.set_irq(12, True)
    assert remote_irr(sy, 12)
    sy.rte(12, 0x4C, masked=True)             # Linux's __eoi_ioapic_pin without an EOI register
    assert not remote_irr(sy, 12)
    sy.ioapic.set_irq(12, False)
    sy.rte(12, 0x4C, level=True)
    assert not remote_irr(sy, 12)


def test_eoi_register_only_on_version_0x20():
    for version, cleared in ((0x11, False), (0x20, True)):
        sy = board(version)
        assert sy.ioapic is not None
        sy.rte(13, 0x4D, level=True)
        sy.ioapic.set_irq(13, True)
        sy.ioapic.set_irq(13, False)
        sy.mmio.write(BASE + IO.IOEOI, 4, 0x4D)
        assert remote_irr(sy, 13) is not cleared


def test_eoi_storm_is_slowed_down_in_virtual_time():
    sy = board()
    io = sy.ioapic
    assert io is not None
    sy.rte(14, 0x4E, level=True)
    io.set_irq(14, True)
    sent = 1
    for _ in range(IO.STORM_EOIS - 1):
        assert sy.inta(0) == 0x4E
        sy.eoi(0)
        sent += 1
    assert sy.inta(0) == 0x4E
    sy.eoi(0)                                 # the 10,000th re-assertion in a row waits
    assert not sy.pins[0].intr and not remote_irr(sy, 14)
    t = sy.clock.now()
    assert sy.clock.next_deadline() == t + IO.STORM_DELAY
    sy.clock.advance(IO.STORM_DELAY - 1)
    assert not sy.pins[0].intr
    sy.clock.advance(1)
    assert sy.inta(0) == 0x4E
    assert sent == IO.STORM_EOIS


# ---------------------------------------------------------------------------
# Delivery modes and destinations from redirection entries

def test_destinations_physical_and_logical():
    sy = board()
    assert sy.ioapic is not None
    sy.write(0, L.REG_LDR, 0x0100_0000)
    sy.write(1, L.REG_LDR, 0x0200_0000)
    sy.rte(1, 0x51, dest=1)
    sy.rte(2, 0x52, logical=True, dest=0x03)
    sy.rte(3, 0x53, dest=0xFF)
    for pin in (1, 2, 3):
        sy.ioapic.set_irq(pin, True)
    assert sy.irr(0) == [0x52, 0x53]
    assert sy.irr(1) == [0x51, 0x52, 0x53]


def test_lowest_priority_entry_goes_to_the_idlest_cpu():
    sy = board()
    assert sy.ioapic is not None
    sy.write(0, L.REG_TPR, 0x80)
    sy.rte(6, 0x56, mode=DM_LOWEST, level=True, dest=0xFF)
    sy.ioapic.set_irq(6, True)
    assert sy.irr(0) == [] and sy.irr(1) == [0x56] and sy.tmr(1) == [0x56]


@pytest.mark.parametrize("mode, attr", [(DM_NMI, "nmi"), (DM_SMI, "smi"), (DM_INIT, "init")])
def test_nmi_smi_init_entries_are_edge_whatever_the_trigger_bit(mode, attr):
    sy = board()
    assert sy.ioapic is not None
    sy.rte(7, 0, mode=mode, level=True, dest=1)
    sy.ioapic.set_irq(7, True)
    assert getattr(sy.pins[1], attr)
    assert not remote_irr(sy, 7)
    setattr(sy.pins[1], attr, False)
    sy.ioapic.set_irq(7, True)
    assert not getattr(sy.pins[1], attr)      # no new edge
    sy.ioapic.set_irq(7, False)
    sy.ioapic.set_irq(7, True)
    assert getattr(sy.pins[1], attr)


def test_extint_entry_hands_the_inta_to_the_8259():
    sy = board(pic=True)
    assert sy.ioapic is not None and sy.pic is not None
    sy.write(0, L.REG_LVT_LINT0, 0x1_0700)    # the virtual wire goes through the I/O APIC instead
    sy.rte(0, 0, mode=DM_EXTINT, dest=0)
    sy.pic.on_intr_change = lambda level: sy.ioapic.set_irq(0, level)   # type: ignore[union-attr]
    sy.pic.set_irq(0, True)
    assert sy.inta(0) == 0x08
    assert sy.isr(0) == []


def test_illegal_vector_is_the_receivers_error():
    sy = board()
    assert sy.ioapic is not None
    sy.rte(8, 0x05, dest=0)
    sy.ioapic.set_irq(8, True)
    assert sy.irr(0) == []
    assert sy.esr(0) == L.ESR_RECEIVE_ILLEGAL_VECTOR


def test_polarity_bit_is_stored_but_the_input_is_its_asserted_state():
    sy = board()
    assert sy.ioapic is not None
    sy.io_write(0x11 + 2 * 16, 0)
    sy.io_write(0x10 + 2 * 16, 0x2000 | 0x8000 | 0x60)   # active low, level
    assert sy.io_read(0x10 + 2 * 16) & IO.RTE_POLARITY
    assert sy.irr(0) == []                               # an idle (low) input is not asserted
    sy.ioapic.irq_line(16).raise_()
    assert sy.irr(0) == [0x60]


def test_input_pins_and_bad_arguments():
    sy = board()
    io = sy.ioapic
    assert io is not None
    assert io.irq_line(23) is io.irq_line(23)
    with pytest.raises(ValueError):
        io.irq_line(24)
    with pytest.raises(ValueError):
        io.set_irq(-1, True)
    with pytest.raises(ValueError):
        IO.IoApic(sy.clock, sy.bus, version=0x12)
    with pytest.raises(ValueError):
        IO.IoApic(sy.clock, sy.bus, apic_id=16)


# ---------------------------------------------------------------------------
# Random traffic against a model of one level pin's remote IRR

@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(["up", "down", "inta", "eoi", "mask", "unmask"]), max_size=50))
def test_level_pin_never_sends_while_remote_irr_is_set(ops):
    sy = board()
    io = sy.ioapic
    assert io is not None
    sent: list[int] = []
    orig = io._send

    def send(pin: int) -> None:
        assert not io.redir[pin] & IO.RTE_REMOTE_IRR
        sent.append(pin)
        orig(pin)

    io._send = send  # type: ignore[method-assign]
    masked = False
    sy.rte(3, 0x63, level=True)
    for op in ops:
        if op in ("up", "down"):
            io.set_irq(3, op == "up")
        elif op == "inta" and sy.pins[0].intr:
            sy.pins[0].acknowledge()
        elif op == "eoi":
            sy.eoi(0)
        elif op in ("mask", "unmask"):
            masked = op == "mask"
            sy.rte(3, 0x63, level=True, masked=masked)
        # The invariant: asserted, unmasked and not awaiting EOI is never a resting state.
        asserted = bool(io.lines >> 3 & 1)
        assert not (asserted and not masked and not remote_irr(sy, 3))


# ---------------------------------------------------------------------------
# State

def test_save_restore_keeps_remote_irr_lines_and_the_storm_timer():
    sy = board()
    io = sy.ioapic
    assert io is not None
    sy.rte(9, 0x49, level=True)
    io.set_irq(9, True)
    io.set_irq(2, True)
    io.storm_deadline = None
    io._defer_service(sy.clock.now() + 500)
    state = copy.deepcopy(io.save_state())
    other = board()
    assert other.ioapic is not None
    other.ioapic.load_state(state)
    assert other.ioapic.save_state() == state
    assert other.irr(0) == []                              # loading sends nothing
    assert other.ioapic.irq_line(9).level and other.ioapic.irq_line(2).level
    assert remote_irr(other, 9)
    assert other.clock.next_deadline() == 500
    assert other.ioapic.lines == (1 << 9) | (1 << 2)


@pytest.mark.parametrize("key, bad", [
    ("id", 16), ("ioregsel", 256), ("lines", 1 << 24), ("redir", [0] * 23), ("redir", [1 << 17] + [0] * 23),
    ("redir", [1 << 12] + [0] * 23), ("eoi_counts", [IO.STORM_EOIS] + [0] * 23), ("storm_deadline", "x"),
])
def test_load_state_refuses_malformed_fields(key, bad):
    sy = board()
    assert sy.ioapic is not None
    good = sy.ioapic.save_state()
    with pytest.raises(DeviceStateError):
        sy.ioapic.load_state({**good, key: bad})
    assert sy.ioapic.save_state() == good


def test_reset_masks_every_entry_and_keeps_input_levels():
    sy = board()
    io = sy.ioapic
    assert io is not None
    sy.rte(1, 0x41)
    io.set_irq(1, True)
    io.reset()
    assert sy.io_read(0x12) == 0x0001_0000
    assert io.irq_line(1).level
