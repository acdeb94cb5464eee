"""Tests for devices.legacy.pic: the 8259A pair and ELCR, driven through their ports."""
from __future__ import annotations

import copy
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.base import DeviceStateError, IrqLine
from devices.legacy.pic import Pic8259Pair

M_CMD, M_DATA, S_CMD, S_DATA, ELCR1, ELCR2 = 0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1
READ_IRR, READ_ISR, POLL = 0x0A, 0x0B, 0x0C
EOI = 0x20


def out(pic: Pic8259Pair, port: int, value: int) -> None:
    pic.io_write(port, 1, value)


def inb(pic: Pic8259Pair, port: int) -> int:
    return pic.io_read(port, 1)


def init(pic: Pic8259Pair, mbase: int = 0x08, sbase: int = 0x70, m_icw4: int = 0x01,
         s_icw4: int = 0x01, ltim: bool = False, m_icw3: int = 0x04, s_icw3: int = 0x02) -> None:
    icw1 = 0x11 | (0x08 if ltim else 0)
    for port, value in ((M_CMD, icw1), (M_DATA, mbase), (M_DATA, m_icw3), (M_DATA, m_icw4),
                        (S_CMD, icw1), (S_DATA, sbase), (S_DATA, s_icw3), (S_DATA, s_icw4)):
        out(pic, port, value)


def irr(pic: Pic8259Pair, cmd: int = M_CMD) -> int:
    out(pic, cmd, READ_IRR)
    return inb(pic, cmd)


def isr(pic: Pic8259Pair, cmd: int = M_CMD) -> int:
    out(pic, cmd, READ_ISR)
    return inb(pic, cmd)


@pytest.fixture
def pic() -> Pic8259Pair:
    p = Pic8259Pair()
    init(p)
    return p


# -- power-on state and initialisation ---------------------------------------

def test_ranges_and_power_on_state():
    p = Pic8259Pair()
    assert p.io_ranges == [(0x20, 2), (0xA0, 2), (0x4D0, 2)]
    assert inb(p, M_DATA) == 0 and inb(p, S_DATA) == 0
    assert inb(p, M_CMD) == 0  # IRR
    assert not p.intr
    p.set_irq(3, True)
    assert p.intr
    assert p.acknowledge() == 0x03  # vector base 0 until the BIOS programs it


def test_icw2_low_bits_ignored_and_imr_after_sequence():
    p = Pic8259Pair()
    init(p, mbase=0x0F, sbase=0x77)
    out(p, M_DATA, 0x5A)  # the sequence is over: this is OCW1
    assert inb(p, M_DATA) == 0x5A
    out(p, M_DATA, 0x00)
    p.set_irq(1, True)
    assert p.acknowledge() == 0x09
    p.set_irq(11, True)
    out(p, M_CMD, EOI)
    assert p.acknowledge() == 0x73


def test_icw1_single_without_icw4_takes_only_icw2():
    p = Pic8259Pair()
    out(p, M_CMD, 0x12)  # SNGL, no IC4
    out(p, M_DATA, 0x40)
    out(p, M_DATA, 0xF7)  # already OCW1
    assert inb(p, M_DATA) == 0xF7
    p.set_irq(3, True)
    assert p.acknowledge() == 0x43
    # single mode: IR2 is an ordinary input, the slave is never asked
    out(p, M_CMD, EOI)
    out(p, M_DATA, 0x00)
    p.set_irq(8, True)
    assert p.acknowledge() == 0x42


def test_icw1_single_with_icw4_skips_icw3():
    p = Pic8259Pair()
    out(p, M_CMD, 0x13)
    out(p, M_DATA, 0x20)
    out(p, M_DATA, 0x03)  # ICW4: 8086 + AEOI
    out(p, M_DATA, 0x11)  # OCW1
    assert inb(p, M_DATA) == 0x11
    p.set_irq(1, True)
    assert p.acknowledge() == 0x21
    assert isr(p) == 0  # AEOI came from ICW4, so ICW3 was skipped


def test_icw1_without_ic4_clears_icw4_functions():
    p = Pic8259Pair()
    init(p, m_icw4=0x03)  # AEOI
    out(p, M_CMD, 0x10)  # cascade, no IC4
    out(p, M_DATA, 0x08)
    out(p, M_DATA, 0x04)
    p.set_irq(4, True)
    assert p.acknowledge() == 0x0C
    assert isr(p) == 0x10  # AEOI is off again


def test_icw1_resets_imr_isr_priority_smm_and_edge_latches(pic):
    out(pic, M_DATA, 0xFF)
    out(pic, M_CMD, 0xC2)  # set priority: IR3 highest
    pic.set_irq(3, True)
    assert irr(pic) == 0x08
    out(pic, M_DATA, 0x00)
    assert pic.acknowledge() == 0x0B
    out(pic, M_CMD, 0x68)  # special mask mode on
    out(pic, M_CMD, READ_ISR)
    pic.set_irq(5, True)
    init(pic)
    assert inb(pic, M_DATA) == 0
    assert inb(pic, M_CMD) == 0  # status read back to IRR, and the latches are empty
    assert isr(pic) == 0
    assert not pic.intr  # lines 3 and 5 are high but need a fresh rising edge
    pic.set_irq(5, False)
    pic.set_irq(5, True)
    pic.set_irq(0, True)
    pic.set_irq(7, True)
    # IR7 lowest again, and no special mask mode
    assert pic.acknowledge() == 0x08
    out(pic, M_DATA, 0x01)
    assert not pic.intr  # SMM was cleared, so masked in-service IR0 still blocks 5 and 7
    out(pic, M_CMD, EOI)
    assert pic.acknowledge() == 0x0D


def test_no_interrupt_while_initialising(pic):
    pic.set_irq(4, True)
    assert pic.intr
    out(pic, M_CMD, 0x19)  # ICW1 with LTIM: line 4 is high and counts at once...
    assert not pic.intr  # ...but not before the sequence ends
    out(pic, M_DATA, 0x30)
    out(pic, M_DATA, 0x04)
    assert not pic.intr
    out(pic, M_DATA, 0x01)
    assert pic.intr
    assert pic.acknowledge() == 0x34


# -- OCW1 / OCW3 status ------------------------------------------------------

def test_imr_masks_without_losing_requests(pic):
    out(pic, M_DATA, 0x20)
    pic.irq_line(5).pulse()
    assert irr(pic) == 0x20
    assert not pic.intr
    out(pic, M_DATA, 0x00)
    assert pic.intr
    assert pic.acknowledge() == 0x0D
    assert irr(pic) == 0 and isr(pic) == 0x20


def test_read_register_selection_persists(pic):
    pic.set_irq(6, True)
    pic.set_irq(1, True)
    pic.acknowledge()
    out(pic, M_CMD, READ_ISR)
    assert inb(pic, M_CMD) == 0x02
    assert inb(pic, M_CMD) == 0x02
    out(pic, M_CMD, 0x08)  # RR=0: no change
    assert inb(pic, M_CMD) == 0x02
    out(pic, M_CMD, READ_IRR)
    assert inb(pic, M_CMD) == 0x40
    assert inb(pic, M_DATA) == 0x00  # A0=1 always reads IMR


def test_word_access_reads_both_ports(pic):
    out(pic, M_DATA, 0xA5)
    pic.set_irq(3, True)
    assert pic.io_read(M_CMD, 2) == 0xA508
    pic.io_write(ELCR1, 2, 0xFFFF)
    assert pic.io_read(ELCR1, 2) == 0xDEF8
    assert pic.io_read(M_DATA, 2) == 0xFFA5  # 0x22 is not ours
    assert pic.io_read(ELCR1, 4) == 0xFFFFDEF8


# -- priority, EOI and rotation ----------------------------------------------

def test_fully_nested_priority_order(pic):
    for n in (5, 3, 1, 7):
        pic.irq_line(n).pulse()
    got = []
    while pic.intr:
        got.append(pic.acknowledge() - 0x08)
        assert not pic.intr  # the in-service level blocks every lower one
        out(pic, M_CMD, EOI)
    assert got == [1, 3, 5, 7]


def test_higher_priority_interrupts_lower_in_service(pic):
    pic.irq_line(5).pulse()
    assert pic.acknowledge() == 0x0D
    pic.irq_line(6).pulse()
    assert not pic.intr
    pic.irq_line(5).pulse()
    assert not pic.intr  # same level is not higher
    pic.irq_line(1).pulse()
    assert pic.intr
    assert pic.acknowledge() == 0x09
    assert isr(pic) == 0x22


def test_nonspecific_and_specific_eoi(pic):
    pic.irq_line(5).pulse()
    pic.acknowledge()
    pic.irq_line(1).pulse()
    pic.acknowledge()
    pic.irq_line(3).pulse()
    assert isr(pic) == 0x22
    out(pic, M_CMD, EOI)  # clears the highest priority ISR bit: 1
    assert isr(pic) == 0x20
    assert pic.intr  # 3 now beats in-service 5
    assert pic.acknowledge() == 0x0B
    out(pic, M_CMD, 0x65)  # specific EOI for level 5, leaving 3
    assert isr(pic) == 0x08
    out(pic, M_CMD, 0x40)  # OCW2 no-op
    assert isr(pic) == 0x08
    out(pic, M_CMD, 0x63)
    assert isr(pic) == 0


def test_rotate_on_nonspecific_eoi(pic):
    pic.irq_line(3).pulse()
    pic.acknowledge()
    out(pic, M_CMD, 0xA0)  # rotate on non-specific EOI: 3 becomes lowest
    assert isr(pic) == 0
    for n in (1, 3, 4, 0):
        pic.irq_line(n).pulse()
    got = []
    while pic.intr:
        got.append(pic.acknowledge() - 0x08)
        out(pic, M_CMD, EOI)
    assert got == [4, 0, 1, 3]


def test_rotate_with_nothing_in_service_does_not_rotate(pic):
    out(pic, M_CMD, 0xA0)
    pic.irq_line(6).pulse()
    pic.irq_line(0).pulse()
    assert pic.acknowledge() == 0x08


def test_set_priority_command(pic):
    out(pic, M_CMD, 0xC4)  # IR4 lowest, IR5 highest
    for n in (1, 6, 4, 5):
        pic.irq_line(n).pulse()
    got = []
    while pic.intr:
        got.append(pic.acknowledge() - 0x08)
        out(pic, M_CMD, EOI)
    assert got == [5, 6, 1, 4]


def test_rotate_on_specific_eoi(pic):
    pic.irq_line(6).pulse()
    pic.acknowledge()
    out(pic, M_CMD, 0xE1)  # clear ISR 1 (not set) and make 1 the lowest
    assert isr(pic) == 0x40
    out(pic, M_CMD, 0xE6)
    assert isr(pic) == 0
    pic.irq_line(7).pulse()
    pic.irq_line(0).pulse()
    pic.irq_line(6).pulse()
    assert pic.acknowledge() == 0x0F  # 7 is highest after 6 went lowest


def test_nonspecific_eoi_follows_rotated_priority(pic):
    out(pic, M_CMD, 0xC3)  # IR4 highest
    pic.irq_line(0).pulse()
    pic.acknowledge()
    pic.irq_line(6).pulse()
    pic.acknowledge()
    assert isr(pic) == 0x41
    out(pic, M_CMD, EOI)  # 6 has the higher priority now
    assert isr(pic) == 0x01


def test_auto_eoi(pic):
    init(pic, m_icw4=0x03, s_icw4=0x03)
    pic.irq_line(5).pulse()
    pic.irq_line(6).pulse()
    assert pic.acknowledge() == 0x0D
    assert isr(pic) == 0
    assert pic.intr  # nothing in service, so 6 follows at once
    assert pic.acknowledge() == 0x0E
    assert not pic.intr


def test_auto_eoi_level_line_requests_again(pic):
    init(pic, m_icw4=0x03)
    out(pic, ELCR1, 0x08)
    pic.set_irq(3, True)
    assert pic.acknowledge() == 0x0B
    assert pic.intr
    pic.set_irq(3, False)
    assert not pic.intr


def test_rotate_in_auto_eoi_mode(pic):
    init(pic, m_icw4=0x03)
    out(pic, M_CMD, 0x80)  # rotate in AEOI mode: set
    pic.irq_line(1).pulse()
    assert pic.acknowledge() == 0x09  # 1 becomes lowest
    for n in (0, 1, 3):
        pic.irq_line(n).pulse()
    assert [pic.acknowledge() for _ in range(3)] == [0x0B, 0x08, 0x09]
    out(pic, M_CMD, 0x00)  # rotate in AEOI mode: clear; priority stays where it is
    for n in (0, 1, 3, 7):
        pic.irq_line(n).pulse()
    assert [pic.acknowledge() for _ in range(4)] == [0x0B, 0x0F, 0x08, 0x09]


def test_rotate_in_aeoi_needs_aeoi(pic):
    out(pic, M_CMD, 0x80)
    pic.irq_line(1).pulse()
    pic.acknowledge()
    out(pic, M_CMD, EOI)
    pic.irq_line(0).pulse()
    pic.irq_line(3).pulse()
    assert pic.acknowledge() == 0x08


# -- special mask mode and special fully nested mode ---------------------------

def test_special_mask_mode(pic):
    pic.irq_line(3).pulse()
    assert pic.acknowledge() == 0x0B
    out(pic, M_DATA, 0x08)
    pic.irq_line(5).pulse()
    assert not pic.intr  # ISR 3 still blocks without special mask mode
    out(pic, M_CMD, 0x68)  # SMM on
    assert pic.intr
    assert pic.acknowledge() == 0x0D
    assert isr(pic) == 0x28
    out(pic, M_CMD, EOI)  # skips masked level 3
    assert isr(pic) == 0x08
    out(pic, M_CMD, 0x48)  # SMM off
    pic.irq_line(6).pulse()
    assert not pic.intr
    out(pic, M_CMD, 0x28)  # ESMM=0: SMM bit ignored
    assert not pic.intr
    out(pic, M_CMD, EOI)
    assert isr(pic) == 0 and pic.intr


@pytest.mark.parametrize("sfnm", [False, True])
def test_special_fully_nested_mode(pic, sfnm):
    init(pic, m_icw4=0x11 if sfnm else 0x01)
    pic.irq_line(12).pulse()
    assert pic.acknowledge() == 0x74
    pic.irq_line(9).pulse()  # higher priority than 12 on the slave
    assert pic.intr is sfnm
    pic.irq_line(4).pulse()  # lower than master IR2 in service: blocked either way
    if sfnm:
        assert pic.acknowledge() == 0x71
        assert isr(pic, S_CMD) == 0x12
        pic.irq_line(13).pulse()
        assert not pic.intr  # slave itself blocks 13
    else:
        assert isr(pic, S_CMD) == 0x10


# -- edge / level and ELCR ---------------------------------------------------

def test_elcr_reserved_bits():
    p = Pic8259Pair()
    out(p, ELCR1, 0xFF)
    out(p, ELCR2, 0xFF)
    assert inb(p, ELCR1) == 0xF8
    assert inb(p, ELCR2) == 0xDE
    out(p, ELCR1, 0x07)
    out(p, ELCR2, 0x21)
    assert inb(p, ELCR1) == 0 and inb(p, ELCR2) == 0


def test_edge_latches_on_rising_edge(pic):
    pic.set_irq(5, True)
    pic.set_irq(5, False)
    assert irr(pic) == 0x20  # latched though the line fell
    assert pic.acknowledge() == 0x0D
    out(pic, M_CMD, EOI)
    pic.set_irq(5, True)
    assert pic.acknowledge() == 0x0D
    out(pic, M_CMD, EOI)
    assert not pic.intr  # a line held high asks only once
    pic.set_irq(5, True)
    assert not pic.intr


def test_elcr_level_follows_line(pic):
    out(pic, ELCR1, 0x20)
    out(pic, ELCR2, 0x08)
    out(pic, M_DATA, 0x04)  # keep IR2's latched edge out of the way
    pic.set_irq(5, True)
    pic.set_irq(11, True)
    assert irr(pic) == 0x24 and irr(pic, S_CMD) == 0x08
    pic.set_irq(11, False)
    assert irr(pic, S_CMD) == 0x00
    assert pic.acknowledge() == 0x0D
    assert irr(pic) & 0x20  # still asserted: level IRR is the line
    out(pic, M_CMD, EOI)
    assert pic.intr  # the line is still high: again
    assert pic.acknowledge() == 0x0D
    out(pic, M_CMD, EOI)
    pic.set_irq(5, False)
    assert irr(pic) == 0x04 and not pic.intr  # only the masked IR2 edge is left


def test_withdrawn_level_request_does_not_return_as_edge(pic):
    out(pic, ELCR1, 0x20)
    pic.set_irq(5, True)
    pic.set_irq(5, False)
    out(pic, ELCR1, 0x00)
    assert irr(pic) == 0 and not pic.intr
    out(pic, ELCR1, 0x20)
    pic.set_irq(5, True)
    out(pic, ELCR1, 0x00)  # still high when switched to edge: the edge it rose with counts
    assert irr(pic) == 0x20 and pic.intr


def test_ltim_makes_every_input_level(pic):
    init(pic, ltim=True)
    pic.set_irq(0, True)  # ELCR cannot cover IRQ0, LTIM can
    pic.set_irq(0, False)
    assert irr(pic) == 0 and not pic.intr
    pic.set_irq(0, True)
    assert pic.acknowledge() == 0x08
    out(pic, M_CMD, EOI)
    assert pic.intr


def test_spurious_irq7_level_request_withdrawn(pic):
    out(pic, ELCR1, 0x08)
    pic.set_irq(3, True)
    assert pic.intr
    pic.set_irq(3, False)
    assert pic.acknowledge() == 0x0F
    assert isr(pic) == 0


def test_spurious_irq7_masked_before_inta(pic):
    pic.irq_line(4).pulse()
    out(pic, M_DATA, 0x10)
    assert pic.acknowledge() == 0x0F
    assert isr(pic) == 0
    assert irr(pic) == 0x10


def test_spurious_irq15_sets_master_isr2(pic):
    out(pic, ELCR2, 0x04)
    pic.set_irq(10, True)
    assert pic.intr
    pic.set_irq(10, False)
    assert pic.acknowledge() == 0x77
    assert isr(pic, S_CMD) == 0
    assert isr(pic) == 0x04  # the master did acknowledge IR2
    out(pic, M_CMD, EOI)
    assert isr(pic) == 0


# -- cascade -----------------------------------------------------------------

@pytest.mark.parametrize("n", range(8, 16))
def test_cascade_vectors(pic, n):
    pic.irq_line(n).pulse()
    assert pic.intr
    assert pic.acknowledge() == 0x70 + n - 8
    assert isr(pic) == 0x04
    assert isr(pic, S_CMD) == 1 << (n - 8)
    out(pic, S_CMD, EOI)
    out(pic, M_CMD, EOI)
    assert isr(pic) == 0 and isr(pic, S_CMD) == 0 and not pic.intr


def test_slave_mask_and_priority_within_master_level_2(pic):
    for n in (3, 9, 14, 1):
        pic.irq_line(n).pulse()
    out(pic, S_DATA, 0x02)  # mask IRQ9
    got = []
    while pic.intr:
        v = pic.acknowledge()
        got.append(v)
        if v >= 0x70:
            out(pic, S_CMD, EOI)
        out(pic, M_CMD, EOI)
    assert got == [0x09, 0x76, 0x0B]
    out(pic, S_DATA, 0x00)
    assert pic.acknowledge() == 0x71


def test_slave_pending_requests_all_delivered_in_aeoi(pic):
    init(pic, m_icw4=0x03, s_icw4=0x03)
    pic.irq_line(12).pulse()
    pic.irq_line(9).pulse()
    assert pic.acknowledge() == 0x71
    assert pic.intr
    assert pic.acknowledge() == 0x74
    assert not pic.intr


def test_slave_request_after_master_eoi(pic):
    pic.irq_line(12).pulse()
    pic.acknowledge()
    pic.irq_line(9).pulse()
    assert not pic.intr
    out(pic, S_CMD, EOI)
    out(pic, M_CMD, EOI)
    assert pic.intr
    assert pic.acknowledge() == 0x71


def test_master_without_cascade_bit_answers_itself(pic):
    init(pic, m_icw3=0x00)
    pic.irq_line(8).pulse()
    assert pic.acknowledge() == 0x0A


def test_slave_id_mismatch_floats_bus(pic):
    init(pic, s_icw3=0x05)
    pic.irq_line(8).pulse()
    assert pic.acknowledge() == 0xFF


def test_irq2_input_shares_master_ir2(pic):
    pic.irq_line(2).pulse()
    assert pic.acknowledge() == 0x77  # the slave answers IR2 and has nothing


# -- poll mode ---------------------------------------------------------------

def test_poll_mode(pic):
    out(pic, M_CMD, POLL)
    assert inb(pic, M_CMD) == 0x00  # nothing requested
    pic.irq_line(6).pulse()
    pic.irq_line(4).pulse()
    out(pic, M_CMD, POLL | 0x03)  # poll wins over a status read in the same OCW3
    assert inb(pic, M_CMD) == 0x84
    assert inb(pic, M_CMD) == 0x10  # one-shot; now the ISR as RR/RIS chose
    out(pic, M_CMD, READ_IRR)
    assert inb(pic, M_CMD) == 0x40
    out(pic, M_CMD, POLL)
    assert inb(pic, M_DATA) == 0x00  # the next read of either port; 6 is below 4
    out(pic, M_CMD, EOI)
    out(pic, M_CMD, POLL)
    assert inb(pic, M_DATA) == 0x86
    assert inb(pic, M_DATA) == 0x00  # IMR again
    assert isr(pic) == 0x40


def test_poll_cascade(pic):
    pic.irq_line(13).pulse()
    out(pic, M_CMD, POLL)
    assert inb(pic, M_CMD) == 0x82
    out(pic, S_CMD, POLL)
    assert inb(pic, S_CMD) == 0x85
    assert isr(pic) == 0x04 and isr(pic, S_CMD) == 0x20


def test_poll_with_aeoi(pic):
    init(pic, m_icw4=0x03)
    pic.irq_line(1).pulse()
    out(pic, M_CMD, POLL)
    assert inb(pic, M_CMD) == 0x81
    assert isr(pic) == 0


# -- machine-facing API ------------------------------------------------------

def test_irq_line_objects(pic):
    line = pic.irq_line(7)
    assert isinstance(line, IrqLine)
    assert pic.irq_line(7) is line
    line.raise_()
    assert pic.intr and irr(pic) == 0x80
    with pytest.raises(ValueError):
        pic.irq_line(16)


def test_on_intr_change_only_on_changes(pic):
    calls: list[bool] = []
    pic.on_intr_change = calls.append
    pic.irq_line(4).pulse()
    pic.irq_line(5).pulse()
    pic.irq_line(3).pulse()  # still asserted
    assert calls == [True]
    pic.acknowledge()  # 3 in service blocks 4 and 5
    assert calls == [True, False]
    out(pic, M_CMD, READ_ISR)
    inb(pic, M_CMD)
    assert calls == [True, False]
    out(pic, M_CMD, EOI)
    assert calls == [True, False, True]
    pic.acknowledge()
    out(pic, M_CMD, EOI)  # 4 acked, 5 follows: INTR goes low then high again
    assert calls == [True, False, True, False, True]


def test_program_like_pc_bios():
    p = Pic8259Pair()
    p.program_like_pc_bios()
    assert inb(p, M_DATA) == 0 and inb(p, S_DATA) == 0
    for n in range(16):
        p.irq_line(n).pulse()
        v = p.acknowledge()
        # ISA IRQ2 reaches the cascade input, whose INTA the slave answers
        assert v == (0x77 if n == 2 else 0x08 + n if n < 8 else 0x70 + n - 8)
        out(p, S_CMD, EOI)
        out(p, M_CMD, EOI)
    assert isr(p) == 0 and isr(p, S_CMD) == 0


def test_reset_returns_to_power_on(pic):
    out(pic, M_DATA, 0x55)
    out(pic, ELCR1, 0x20)
    pic.irq_line(1).pulse()
    pic.acknowledge()
    pic.set_irq(6, True)
    pic.reset()
    assert inb(pic, M_DATA) == 0 and inb(pic, ELCR1) == 0
    assert isr(pic) == 0
    assert pic.intr is False  # line 6 is still high, but that edge is gone
    pic.set_irq(6, False)
    pic.set_irq(6, True)
    assert pic.acknowledge() == 0x06


def test_odd_guest_input_never_raises(pic):
    for port in (0x1F, 0x22, 0x9F, 0xA2, 0x4CF, 0x4D2):
        assert pic.io_read(port, 1) == 0xFF
        pic.io_write(port, 1, 0x12)
    for v in range(256):
        out(pic, M_CMD, v)
        out(pic, M_DATA, v)
        out(pic, S_CMD, v)
        out(pic, S_DATA, v)


# -- save / load -------------------------------------------------------------

def _busy(pic: Pic8259Pair) -> None:
    init(pic, m_icw4=0x11)
    out(pic, ELCR2, 0x40)
    out(pic, M_CMD, 0xC5)
    pic.irq_line(3).pulse()
    pic.acknowledge()
    pic.set_irq(14, True)
    pic.irq_line(9).pulse()
    pic.irq_line(1).pulse()
    out(pic, M_DATA, 0x02)
    out(pic, S_CMD, READ_ISR)
    out(pic, M_CMD, 0x68)
    out(pic, M_CMD, POLL)


def _script(pic: Pic8259Pair) -> list[int]:
    res = [int(pic.intr)]
    res.append(inb(pic, M_CMD))  # the pending poll
    for _ in range(4):
        res.append(pic.acknowledge())
        res += [irr(pic), isr(pic), irr(pic, S_CMD), isr(pic, S_CMD), int(pic.intr)]
        out(pic, S_CMD, EOI)
        out(pic, M_CMD, EOI)
    pic.set_irq(14, False)
    res.append(int(pic.intr))
    out(pic, M_DATA, 0)
    res.append(pic.acknowledge())
    return res


def test_save_load_round_trip():
    a = Pic8259Pair()
    _busy(a)
    state = a.save_state()
    assert state["kind"] == "pic8259" and state["version"] == 1
    saved = copy.deepcopy(state)
    b = Pic8259Pair()
    calls: list[bool] = []
    b.on_intr_change = calls.append
    b.load_state(state)
    assert calls == []  # loading raises nothing
    assert b.intr == a.intr
    assert b.irq_line(14).level and not b.irq_line(9).level
    assert b.save_state() == saved
    assert _script(b) == _script(a)


def test_load_state_rejects_bad_state():
    p = Pic8259Pair()
    good = p.save_state()
    with pytest.raises(DeviceStateError):
        p.load_state({**good, "kind": "pit8254"})
    with pytest.raises(DeviceStateError):
        p.load_state({**good, "version": 2})
    with pytest.raises(DeviceStateError):
        p.load_state({k: v for k, v in good.items() if k != "slave"})
    for field, bad in (("imr", 256), ("bottom", 8), ("aeoi", 1), ("elcr", 0x07), ("init_step", 1),
                       ("isr", "x")):
        st = copy.deepcopy(good)
        st["master"][field] = bad
        with pytest.raises(DeviceStateError):
            p.load_state(st)
    st = copy.deepcopy(good)
    del st["master"]["lines"]
    with pytest.raises(DeviceStateError):
        p.load_state(st)


# -- hypothesis conformance --------------------------------------------------

PORTS = [0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1]

op = st.one_of(
    st.tuples(st.just("w"), st.sampled_from(PORTS), st.sampled_from([1, 2, 4]),
              st.integers(0, 0xFFFF_FFFF)),
    st.tuples(st.just("r"), st.sampled_from(PORTS), st.sampled_from([1, 2, 4]), st.just(0)),
    st.tuples(st.just("irq"), st.integers(0, 15), st.booleans(), st.just(0)),
    st.tuples(st.just("ack"), st.just(0), st.just(0), st.just(0)),
)


def _run(pic: Pic8259Pair, ops, out_log: list) -> None:
    for kind, a, b, c in ops:
        if kind == "w":
            pic.io_write(a, b, c & ((1 << (8 * b)) - 1))
        elif kind == "r":
            v = pic.io_read(a, b)
            assert 0 <= v < 1 << (8 * b)
            out_log.append(v)
        elif kind == "irq":
            pic.set_irq(a, b)
        else:
            out_log.append(pic.acknowledge())
        out_log.append(pic.intr)


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=60), st.lists(op, max_size=40), st.booleans())
def test_random_traffic_and_save_load(before, after, bios):
    # The 8259 has no timers, so set_irq/INTA stand in for clock advances.
    a = Pic8259Pair()
    if bios:
        a.program_like_pc_bios()
    log: list = []
    changes: list[bool] = []
    a.on_intr_change = changes.append
    _run(a, before, log)
    # INTR notifications alternate and end at the current level
    assert all(x != y for x, y in itertools.pairwise(changes))
    assert (changes[-1] if changes else False) == a.intr
    b = Pic8259Pair()
    b.load_state(a.save_state())
    assert b.intr == a.intr
    for n in range(16):
        assert b.irq_line(n).level == a.irq_line(n).level
    la: list = []
    lb: list = []
    _run(a, after, la)
    _run(b, after, lb)
    assert la == lb
    assert a.save_state() == b.save_state()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1] + list(range(3, 16))), st.booleans()),
                max_size=40))
def test_intr_matches_reference_model_when_nothing_in_service(events):
    """With a BIOS setup and edge inputs, INTR is 'some unmasked rising edge
    happened', and INTA hands out vectors in AT priority order (slave inside
    master level 2)."""
    p = Pic8259Pair()
    p.program_like_pc_bios()
    out(p, M_DATA, 0x10)
    level = [False] * 16
    latched: set[int] = set()
    for n, lv in events:
        if lv and not level[n]:
            latched.add(n)
        level[n] = lv
        p.set_irq(n, lv)
    pending = latched - {4}
    assert p.intr == bool(pending)
    order = [0, 1, 8, 9, 10, 11, 12, 13, 14, 15, 3, 5, 6, 7]
    expect = [n for n in order if n in pending]
    got = []
    while p.intr:
        v = p.acknowledge()
        got.append(v)
        out(p, S_CMD, EOI)
        out(p, M_CMD, EOI)
        if len(got) > 20:
            break
    assert got == [0x08 + n if n < 8 else 0x70 + n - 8 for n in expect]
    assert irr(p) == (0x10 if 4 in latched else 0)
