"""ACPI fixed-hardware PM registers and the PIIX reset register, driven through an IoBus with a manual clock."""
from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.base import DeviceStateError, IrqLine
from devices.bus import IoBus
from devices.clock import TICK_HZ, VirtualClock
from devices.timers import acpi_pm
from devices.timers.acpi_pm import (
    ACPI_DISABLE,
    ACPI_ENABLE,
    GPE0_BLK,
    PM1A_CNT_BLK,
    PM1A_EVT_BLK,
    PM_TMR_BLK,
    RESET_VALUE,
    S5_SLP_TYP,
    SMI_CMD,
    AcpiPm,
    PiixResetControl,
    pm_timer_count,
    pm_timer_tick,
)

STS, EN, CNT, TMR = PM1A_EVT_BLK, PM1A_EVT_BLK + 2, PM1A_CNT_BLK, PM_TMR_BLK
GPE_STS, GPE_EN = GPE0_BLK, GPE0_BLK + 2
TMR_STS, PWRBTN_STS, WAK_STS = 1, 1 << 8, 1 << 15
TMR_EN, PWRBTN_EN = 1, 1 << 8
SCI_EN, SLP_EN = 1, 1 << 13
F, H = 3_579_545, 100_000_000


def slp_typ(t: int) -> int:
    return t << 10


class Board:
    def __init__(self, clock: VirtualClock | None = None, **kw) -> None:
        self.clock = clock or VirtualClock()
        self.log: list[tuple[int, str, bool]] = []
        self.sci = IrqLine("sci")
        self.sci.connect(lambda level: self.log.append((self.clock.now(), "sci", level)))
        self.poweroffs: list[int] = []
        self.resets: list[int] = []
        self.pm = AcpiPm(self.clock, self.sci, lambda: self.poweroffs.append(self.clock.now()), **kw)
        self.rcr = PiixResetControl(lambda: self.resets.append(self.clock.now()))
        self.bus = IoBus()
        for dev in (self.pm, self.rcr):
            for base, length in dev.io_ranges:
                self.bus.register(dev, base, length)

    def inw(self, port: int) -> int:
        return self.bus.read(port, 2)

    def outw(self, port: int, value: int) -> None:
        self.bus.write(port, 2, value)

    def acpi_enable(self) -> None:
        """The OS side of the handshake: ACPI_ENABLE to SMI_CMD, then poll SCI_EN."""
        self.bus.write(SMI_CMD, 1, ACPI_ENABLE)
        assert self.inw(CNT) & SCI_EN


# ---------------------------------------------------------------------------
# The FADT's view

def test_port_layout_is_qemus_piix4():
    assert (acpi_pm.PM1A_EVT_BLK, acpi_pm.PM1_EVT_LEN) == (0x600, 4)
    assert (acpi_pm.PM1A_CNT_BLK, acpi_pm.PM1_CNT_LEN) == (0x604, 2)
    assert (acpi_pm.PM_TMR_BLK, acpi_pm.PM_TMR_LEN) == (0x608, 4)
    assert (acpi_pm.GPE0_BLK, acpi_pm.GPE0_BLK_LEN) == (0xAFE0, 4)
    assert (acpi_pm.SMI_CMD, acpi_pm.ACPI_ENABLE, acpi_pm.ACPI_DISABLE) == (0xB2, 0xF1, 0xF0)
    assert acpi_pm.SCI_IRQ == 9 and acpi_pm.S5_SLP_TYP == 0 and acpi_pm.PM_TMR_VAL_EXT is False
    assert (acpi_pm.RESET_CONTROL_PORT, acpi_pm.RESET_VALUE) == (0xCF9, 0x06)


def test_power_on_values():
    b = Board()
    assert b.inw(STS) == 0 and b.inw(EN) == 0 and b.inw(CNT) == 0
    assert b.bus.read(GPE0_BLK, 4) == 0
    assert not b.sci.level
    assert b.bus.read(PM1A_CNT_BLK + 2, 2) == 0xFFFF       # 0x606-0x607 are not the PM's


# ---------------------------------------------------------------------------
# PM timer

@pytest.mark.parametrize("ticks", [0, 1, 27, 28, 10**8, 3600 * 10**8, 7 * 10**8 + 12_345, 2**40 + 3])
def test_pm_timer_counts_exactly_at_3_579545_mhz(ticks):
    b = Board()
    b.clock.advance(ticks)
    assert b.bus.read(TMR, 4) == (ticks * F // H) & 0xFFFFFF
    assert b.pm.pm_timer() == (ticks * F // H) & 0xFFFFFF


def test_pm_timer_rate_over_an_hour():
    b = Board()
    b.clock.advance(3600 * TICK_HZ)
    assert pm_timer_count(b.clock.now()) == 3600 * F       # no drift at all
    assert b.bus.read(TMR, 4) == (3600 * F) % (1 << 24)
    assert b.bus.read(TMR + 3, 1) == 0                      # 24-bit: bits 24-31 read 0


def test_pm_timer_32bit_with_tmr_val_ext():
    b = Board(tmr_val_ext=True)
    b.clock.advance(1300 * TICK_HZ)                          # past 2**32 / F seconds is 1200 s
    assert b.bus.read(TMR, 4) == (1300 * F) % (1 << 32)


def test_pm_timer_tick_is_the_first_tick_reaching_a_count():
    for count in (1, 2, 3579545, 1 << 23, 1 << 24, 12_345_678_901):
        t = pm_timer_tick(count)
        assert pm_timer_count(t) >= count > pm_timer_count(t - 1)


def test_tmr_sts_sets_at_the_bit23_transition_tick_and_clears_on_write_1():
    b = Board()
    t1 = pm_timer_tick(1 << 23)                     # bit 23 goes 0 -> 1
    b.clock.advance_to(t1 - 1)
    assert not b.inw(STS) & TMR_STS
    b.clock.advance_to(t1)
    assert b.inw(STS) & TMR_STS
    b.outw(STS, 0)                                  # writing 0: no effect
    assert b.inw(STS) & TMR_STS
    b.outw(STS, TMR_STS)
    assert not b.inw(STS) & TMR_STS
    t2 = pm_timer_tick(1 << 24)                     # bit 23 goes 1 -> 0: also a carry
    b.clock.advance_to(t2 - 1)
    assert not b.inw(STS) & TMR_STS
    b.clock.advance_to(t2)
    assert b.inw(STS) & TMR_STS


def test_tmr_sts_32bit_timer_carries_on_bit_31():
    b = Board(tmr_val_ext=True)
    b.clock.advance_to(pm_timer_tick(1 << 24))
    assert not b.inw(STS) & TMR_STS                 # bit 23 does not count any more
    b.clock.advance_to(pm_timer_tick(1 << 31))
    assert b.inw(STS) & TMR_STS


def test_pm_timer_sci_raised_at_the_exact_tick():
    b = Board()
    b.acpi_enable()
    b.outw(EN, TMR_EN)
    t1, t2 = pm_timer_tick(1 << 23), pm_timer_tick(2 << 23)
    assert b.clock.next_deadline() == t1            # the exact tick is scheduled
    b.clock.advance_to(t1 + 1000)
    assert b.log == [(t1, "sci", True)]
    b.outw(STS, TMR_STS)                            # the handler acknowledges
    assert b.log[-1] == (t1 + 1000, "sci", False)
    b.clock.advance_to(t2)
    assert b.log[-1] == (t2, "sci", True)


# ---------------------------------------------------------------------------
# SCI_EN, the SMI_CMD handshake, the SCI

def test_acpi_enable_handshake_through_smi_cmd():
    b = Board()
    assert not b.inw(CNT) & SCI_EN
    b.bus.write(SMI_CMD, 1, 0x42)                   # some other SMI command: nothing here
    assert not b.inw(CNT) & SCI_EN
    b.bus.write(SMI_CMD, 1, ACPI_ENABLE)
    assert b.inw(CNT) & SCI_EN and b.pm.sci_enabled
    assert b.bus.read(SMI_CMD, 1) == ACPI_ENABLE     # APM_CNT reads back
    b.bus.write(SMI_CMD + 1, 1, 0x5A)                # APM_STS: a scratch byte
    assert b.bus.read(SMI_CMD + 1, 1) == 0x5A
    b.bus.write(SMI_CMD, 1, ACPI_DISABLE)
    assert not b.inw(CNT) & SCI_EN


def test_sci_is_gated_by_sci_en():
    b = Board()
    b.outw(EN, PWRBTN_EN)
    b.pm.power_button()
    assert b.inw(STS) & PWRBTN_STS and not b.sci.level     # legacy mode: no SCI
    b.acpi_enable()
    assert b.sci.level
    b.outw(STS, PWRBTN_STS)
    assert not b.sci.level


def test_power_button_status_without_enable_and_sci_with_it():
    b = Board()
    b.acpi_enable()
    b.pm.power_button()
    assert b.inw(STS) & PWRBTN_STS and not b.sci.level     # the status is set regardless
    b.outw(EN, PWRBTN_EN)
    assert b.sci.level
    assert b.inw(EN) == PWRBTN_EN


def test_write_1_to_clear_is_per_bit_and_per_byte():
    b = Board()
    b.pm.power_button()
    b.clock.advance_to(pm_timer_tick(1 << 23))
    assert b.inw(STS) == TMR_STS | PWRBTN_STS
    b.bus.write(STS, 1, 0xFF)                       # the low byte: TMR_STS only
    assert b.inw(STS) == PWRBTN_STS
    b.outw(STS, WAK_STS)                            # a bit that is not set: nothing
    assert b.inw(STS) == PWRBTN_STS
    b.bus.write(STS + 1, 1, PWRBTN_STS >> 8)
    assert b.inw(STS) == 0


def test_enable_and_control_registers_keep_only_their_bits():
    b = Board()
    b.outw(EN, 0xFFFF)
    assert b.inw(EN) == 0x4721                      # TMR, GBL, PWRBTN, SLPBTN, RTC, PCIEXP_WAKE_DIS
    b.outw(CNT, 0x1C03 | 0x0004)                    # SCI_EN, BM_RLD, SLP_TYP=7; GBL_RLS is write-only
    assert b.inw(CNT) == 0x1C03


# ---------------------------------------------------------------------------
# Sleep states: SLP_TYP / SLP_EN

def test_slp_en_with_s5_powers_off_like_linux_does():
    b = Board()
    b.acpi_enable()
    b.clock.advance(10)
    cnt = b.inw(CNT) & ~(slp_typ(7) | SLP_EN)
    b.outw(CNT, cnt | slp_typ(S5_SLP_TYP))         # write 1: the type
    assert b.poweroffs == []
    b.outw(CNT, cnt | slp_typ(S5_SLP_TYP) | SLP_EN)   # write 2: type and enable
    assert b.poweroffs == [10]
    assert not b.inw(CNT) & SLP_EN                  # SLP_EN is write-only


def test_other_sleep_types_and_slp_typ_alone_do_nothing():
    b = Board()
    for t in range(8):
        b.outw(CNT, slp_typ(t))
    for t in range(1, 8):
        b.outw(CNT, slp_typ(t) | SLP_EN)
    assert b.poweroffs == []
    b.bus.write(CNT + 1, 1, (slp_typ(S5_SLP_TYP) | SLP_EN) >> 8)   # a byte write of the high half
    assert len(b.poweroffs) == 1


# ---------------------------------------------------------------------------
# GPE0

def test_gpe0_status_is_write_1_to_clear_and_enable_reads_back():
    b = Board()
    b.acpi_enable()
    b.outw(GPE_EN, 0xA5C3)
    assert b.inw(GPE_EN) == 0xA5C3
    b.outw(GPE_STS, 0xFFFF)
    assert b.inw(GPE_STS) == 0
    b.pm.raise_gpe(3)
    assert b.inw(GPE_STS) == 0x0008 and not b.sci.level   # GPE 3 is not enabled
    b.pm.raise_gpe(1)
    assert b.sci.level
    b.bus.write(GPE_STS, 1, 0x02)
    assert b.inw(GPE_STS) == 0x0008 and not b.sci.level
    with pytest.raises(ValueError):
        b.pm.raise_gpe(16)


# ---------------------------------------------------------------------------
# Reset control register, port 0xCF9

@pytest.mark.parametrize("value", [0x06, 0x0E, 0x04, 0xFF])
def test_reset_control_rcpu_requests_a_reset(value):
    b = Board()
    b.bus.write(0xCF9, 1, value)
    assert b.resets == [0]


def test_reset_control_srst_alone_is_stored_and_linux_cf9_sequence_resets_once():
    b = Board()
    b.bus.write(0xCF9, 1, 0x02)
    assert b.resets == [] and b.bus.read(0xCF9, 1) == 0x02 and b.rcr.hard_reset
    cf9 = b.bus.read(0xCF9, 1) & ~0x0E              # arch/x86/kernel/reboot.c, BOOT_CF9
    b.bus.write(0xCF9, 1, cf9 | 0x02)
    b.bus.write(0xCF9, 1, cf9 | 0x0E)
    assert b.resets == [0]
    assert b.bus.read(0xCF9, 1) == 0x02             # RCPU does not latch; reserved bits read 0
    b.bus.write(0xCF9, 1, RESET_VALUE)              # the FADT's RESET_REG write
    assert b.resets == [0, 0]
    b.rcr.reset()
    assert b.bus.read(0xCF9, 1) == 0


# ---------------------------------------------------------------------------
# save / restore and reset

def test_restore_keeps_the_armed_pm_timer_and_raises_nothing():
    a = Board()
    a.acpi_enable()
    a.outw(EN, TMR_EN | PWRBTN_EN)
    a.clock.advance(1000)
    state = copy.deepcopy(a.pm.save_state())
    clock = VirtualClock()
    clock.load_state(a.clock.save_state())
    b = Board(clock=clock)
    b.pm.load_state(state)
    assert b.log == [] and b.pm.save_state() == state
    t1 = pm_timer_tick(1 << 23)
    b.clock.advance_to(t1)
    assert b.log == [(t1, "sci", True)]
    for bad in ({**state, "pm1_cnt": 1 << 13}, {**state, "gpe0_en": 1 << 16}, {**state, "sync_tick": -1},
                {k: v for k, v in state.items() if k != "pm1_en"}, {**state, "pm1_sts": True}):
        before = b.pm.save_state()
        with pytest.raises(DeviceStateError):
            b.pm.load_state(bad)
        assert b.pm.save_state() == before


def test_reset_clears_registers_and_lowers_the_sci_but_not_the_timer():
    b = Board()
    b.acpi_enable()
    b.outw(EN, PWRBTN_EN)
    b.pm.power_button()
    b.clock.advance(5_000)
    assert b.sci.level
    b.pm.reset()
    assert not b.sci.level and b.inw(STS) == 0 and b.inw(EN) == 0 and b.inw(CNT) == 0
    assert b.bus.read(TMR, 4) == pm_timer_count(5_000)


# ---------------------------------------------------------------------------
# TMR_STS against the definition: set iff the count's bit 23 changed since it was last cleared

@settings(max_examples=60, deadline=None, derandomize=True)
@given(steps=st.lists(st.tuples(st.integers(1, 40_000_000), st.booleans(), st.booleans()), max_size=40))
def test_tmr_sts_matches_its_definition(steps):
    b = Board()
    b.acpi_enable()
    b.outw(EN, TMR_EN)
    cleared_at = 0
    for ticks, look, clear in steps:
        b.clock.advance(ticks)
        now = b.clock.now()
        carried = pm_timer_count(now) >> 23 != pm_timer_count(cleared_at) >> 23
        assert b.sci.level == carried
        if look:
            assert bool(b.inw(STS) & TMR_STS) == carried
        if clear:
            b.outw(STS, TMR_STS)
            cleared_at = now
            assert not b.sci.level
