"""MC146818A RTC/CMOS driven through ports 0x70/0x71 with a manual clock."""
from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.base import DeviceStateError, IrqLine
from devices.clock import TICK_HZ, VirtualClock
from devices.legacy.rtc import Rtc146818, civil_from_days, days_from_civil

SEC, ASEC, MIN, AMIN, HOUR, AHOUR, DOW, DOM, MON, YEAR = range(10)
RA, RB, RC, RD = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
SET, PIE, AIE, UIE, DM, H24 = 0x80, 0x40, 0x20, 0x10, 0x04, 0x02
IRQF, PF, AF, UF = 0x80, 0x40, 0x20, 0x10
UIP_TICKS = 24_400  # 244 us at 100 MHz


def epoch(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> int:
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0))


def make(start: int = 0, clock: VirtualClock | None = None):
    clock = clock if clock is not None else VirtualClock()
    irq = IrqLine("irq8")
    return clock, irq, Rtc146818(clock, irq, start)


def rd(rtc: Rtc146818, index: int) -> int:
    rtc.io_write(0x70, 1, index)
    return rtc.io_read(0x71, 1)


def wr(rtc: Rtc146818, index: int, value: int) -> None:
    rtc.io_write(0x70, 1, index)
    rtc.io_write(0x71, 1, value)


def bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def expected(ts: int, binary: bool = False, h24: bool = True) -> dict[int, int]:
    dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=ts)
    enc = (lambda v: v) if binary else bcd
    if h24:
        hour = enc(dt.hour)
    else:
        hour = enc(dt.hour % 12 or 12) | (0x80 if dt.hour >= 12 else 0)
    return {
        SEC: enc(dt.second), MIN: enc(dt.minute), HOUR: hour,
        DOW: dt.isoweekday() % 7 + 1,  # Sunday = 1
        DOM: enc(dt.day), MON: enc(dt.month), YEAR: enc(dt.year % 100),
        CENTURY: bcd(dt.year // 100),
    }


def read_time(rtc: Rtc146818) -> dict[int, int]:
    return {r: rd(rtc, r) for r in (SEC, MIN, HOUR, DOW, DOM, MON, YEAR, CENTURY)}


def set_time_bcd(rtc, y, mo, d, h, mi, s, dow):
    for reg, v in ((SEC, bcd(s)), (MIN, bcd(mi)), (HOUR, bcd(h)), (DOW, dow), (DOM, bcd(d)),
                   (MON, bcd(mo)), (YEAR, bcd(y % 100)), (CENTURY, bcd(y // 100))):
        wr(rtc, reg, v)


# -- reading the time -------------------------------------------------------------
def test_power_on_registers():
    _, irq, rtc = make(epoch(2024, 1, 1))
    assert rd(rtc, RA) == 0x26
    assert rd(rtc, RB) == 0x02
    assert rd(rtc, RC) == 0x00
    assert rd(rtc, RD) == 0x80
    assert not irq.level
    assert rtc.io_ranges == [(0x70, 2)]


def test_bcd_24h_across_midnight_into_leap_day():
    clock, _, rtc = make(epoch(2024, 2, 28, 23, 59, 58))
    assert read_time(rtc) == {SEC: 0x58, MIN: 0x59, HOUR: 0x23, DOW: 4, DOM: 0x28, MON: 0x02,
                              YEAR: 0x24, CENTURY: 0x20}
    clock.advance_to(2 * TICK_HZ - 1)
    assert rd(rtc, SEC) == 0x59 and rd(rtc, DOM) == 0x28
    clock.advance_to(2 * TICK_HZ)
    assert read_time(rtc) == {SEC: 0x00, MIN: 0x00, HOUR: 0x00, DOW: 5, DOM: 0x29, MON: 0x02,
                              YEAR: 0x24, CENTURY: 0x20}
    clock.advance(86400 * TICK_HZ)
    assert (rd(rtc, DOM), rd(rtc, MON), rd(rtc, DOW)) == (0x01, 0x03, 6)


@pytest.mark.parametrize("start, after", [
    (epoch(2023, 2, 28, 23, 59, 59), (0x01, 0x03, 0x23, 0x20)),  # not a leap year
    (epoch(2000, 2, 28, 23, 59, 59), (0x29, 0x02, 0x00, 0x20)),  # 400-year rule: leap
    (epoch(2100, 2, 28, 23, 59, 59), (0x01, 0x03, 0x00, 0x21)),  # 100-year rule: not leap
    (epoch(1999, 12, 31, 23, 59, 59), (0x01, 0x01, 0x00, 0x20)),  # century byte rolls
])
def test_day_rollover_calendar(start, after):
    clock, _, rtc = make(start)
    clock.advance_to(TICK_HZ)
    assert (rd(rtc, DOM), rd(rtc, MON), rd(rtc, YEAR), rd(rtc, CENTURY)) == after
    assert read_time(rtc) == expected(start + 1)


def test_binary_mode_and_12_hour_mode():
    start = epoch(2024, 7, 4, 0, 30, 5)  # a Thursday
    clock, _, rtc = make(start)
    wr(rtc, RB, H24 | DM)
    assert read_time(rtc) == {SEC: 5, MIN: 30, HOUR: 0, DOW: 5, DOM: 4, MON: 7, YEAR: 24,
                              CENTURY: 0x20}
    wr(rtc, RB, 0)  # 12-hour BCD
    assert rd(rtc, HOUR) == 0x12  # 00:30 is 12:30 AM
    for hours, bcd12, bin12 in ((1, 0x01, 0x01), (12, 0x92, 0x8C), (13, 0x81, 0x81),
                                (23, 0x91, 0x8B)):
        clock.advance_to(hours * 3600 * TICK_HZ)
        wr(rtc, RB, 0)
        assert rd(rtc, HOUR) == bcd12
        wr(rtc, RB, DM)
        assert rd(rtc, HOUR) == bin12
        assert read_time(rtc) == expected(start + hours * 3600, binary=True, h24=False)


@pytest.mark.parametrize("ticks", [0, 1, TICK_HZ - 1, TICK_HZ, 59 * TICK_HZ + 12345,
                                   3600 * TICK_HZ, 86399 * TICK_HZ, 10 ** 14 + 7])
@pytest.mark.parametrize("mode", [0, DM, H24, DM | H24])
def test_time_at_several_virtual_times(ticks, mode):
    start = epoch(2019, 12, 31, 11, 58, 30)
    clock, _, rtc = make(start)
    wr(rtc, RB, mode)
    clock.advance_to(ticks)
    got = read_time(rtc)
    assert got == expected(start + ticks // TICK_HZ, bool(mode & DM), bool(mode & H24))
    assert rtc.rtc_time() == start + ticks // TICK_HZ


@settings(max_examples=200, deadline=None)
@given(start=st.integers(epoch(1900, 1, 1), epoch(2099, 12, 31, 23, 59, 59)),
       ticks=st.integers(0, 400 * 86400 * TICK_HZ), mode=st.sampled_from([0, DM, H24, DM | H24]))
def test_time_matches_utc_calendar(start, ticks, mode):
    clock, _, rtc = make(start)
    wr(rtc, RB, mode)
    clock.advance_to(ticks)
    assert read_time(rtc) == expected(start + ticks // TICK_HZ, bool(mode & DM), bool(mode & H24))


@given(st.integers(-719_162, 2_900_000))
def test_calendar_functions_match_datetime(days):
    d = date(1970, 1, 1) + timedelta(days=days)
    assert civil_from_days(days) == (d.year, d.month, d.day)
    assert days_from_civil(d.year, d.month, d.day) == days


# -- UIP and the update cycle -----------------------------------------------------
def test_uip_window_is_244us_before_each_update():
    clock, _, rtc = make(epoch(2024, 1, 1))
    for second in (0, 1, 7):
        b = (second + 1) * TICK_HZ
        clock.advance_to(b - UIP_TICKS - 1)
        assert rd(rtc, RA) == 0x26
        clock.advance_to(b - UIP_TICKS)
        assert rd(rtc, RA) == 0xA6
        s_before = rd(rtc, SEC)
        clock.advance_to(b - 1)
        assert rd(rtc, RA) & 0x80
        assert rd(rtc, SEC) == s_before
        clock.advance_to(b)
        assert rd(rtc, RA) == 0x26
        assert rd(rtc, SEC) == bcd(second + 1)
    # SET inhibits updates, so UIP reads 0 inside the window too.
    clock.advance_to(9 * TICK_HZ - 10)
    wr(rtc, RB, SET | H24)
    assert rd(rtc, RA) == 0x26
    # A write to UIP is ignored: it is read-only.
    wr(rtc, RA, 0xA6)
    assert rd(rtc, RA) == 0x26


# -- the guest setting the time ---------------------------------------------------
def test_guest_sets_time_with_set_bit():
    clock, _, rtc = make(epoch(2024, 5, 5, 8, 0, 0))
    clock.advance_to(TICK_HZ * 3 // 10)
    wr(rtc, RB, SET | H24)
    set_time_bcd(rtc, 2030, 6, 15, 12, 34, 56, dow=7)
    clock.advance_to(TICK_HZ * 55 // 10)
    assert rd(rtc, SEC) == 0x56 and rd(rtc, HOUR) == 0x12  # frozen while SET = 1
    wr(rtc, RB, H24)
    assert read_time(rtc) == expected(epoch(2030, 6, 15, 12, 34, 56))
    clock.advance_to(6 * TICK_HZ - 1)  # the divider kept its phase: the update is at 6 s
    assert rd(rtc, SEC) == 0x56
    clock.advance_to(6 * TICK_HZ)
    assert rd(rtc, SEC) == 0x57
    assert rtc.rtc_time() == epoch(2030, 6, 15, 12, 34, 57)
    clock.advance(11 * 3600 * TICK_HZ + 25 * 60 * TICK_HZ + 3 * TICK_HZ)  # to 00:00:00
    assert read_time(rtc) == expected(epoch(2030, 6, 16))
    assert rd(rtc, DOW) == 1  # Saturday -> Sunday


def test_guest_sets_time_in_binary_12_hour_mode():
    clock, _, rtc = make(0)
    wr(rtc, RB, SET | DM)  # binary, 12-hour
    for reg, v in ((SEC, 59), (MIN, 59), (HOUR, 0x80 | 11), (DOW, 3), (DOM, 31), (MON, 12),
                   (YEAR, 99), (CENTURY, 0x19)):
        wr(rtc, reg, v)
    wr(rtc, RB, DM)
    assert rtc.rtc_time() == epoch(1999, 12, 31, 23, 59, 59)
    clock.advance_to(TICK_HZ)
    assert read_time(rtc) == {SEC: 0, MIN: 0, HOUR: 12, DOW: 4, DOM: 1, MON: 1, YEAR: 0,
                              CENTURY: 0x20}
    wr(rtc, RB, H24)
    assert rd(rtc, HOUR) == 0x00 and rd(rtc, YEAR) == 0x00


def test_guest_day_of_week_is_an_independent_counter():
    clock, _, rtc = make(0)
    wr(rtc, RB, SET | H24)
    set_time_bcd(rtc, 2024, 3, 9, 23, 59, 59, dow=3)  # really a Saturday; the guest says 3
    wr(rtc, RB, H24)
    clock.advance_to(TICK_HZ)
    assert rd(rtc, DOW) == 4 and rd(rtc, DOM) == 0x10


def test_write_time_register_while_running_keeps_divider_phase():
    clock, _, rtc = make(epoch(2024, 1, 1, 10, 0, 0))
    clock.advance_to(TICK_HZ // 2)
    wr(rtc, MIN, 0x45)
    assert (rd(rtc, HOUR), rd(rtc, MIN), rd(rtc, SEC)) == (0x10, 0x45, 0x00)
    clock.advance_to(TICK_HZ - 1)
    assert rd(rtc, SEC) == 0x00
    clock.advance_to(TICK_HZ)
    assert rd(rtc, SEC) == 0x01 and rd(rtc, MIN) == 0x45


def test_divider_reset_stops_clock_and_first_update_is_half_a_second_after_release():
    clock, _, rtc = make(epoch(2024, 1, 1, 10, 0, 0))
    clock.advance_to(TICK_HZ // 4)
    wr(rtc, RA, 0x70)  # DV = 111: divider chain in reset
    set_time_bcd(rtc, 2025, 1, 1, 0, 0, 0, dow=4)
    clock.advance_to(5 * TICK_HZ)
    assert rd(rtc, SEC) == 0 and rd(rtc, RA) == 0x70  # stopped, no UIP
    t0 = 5 * TICK_HZ + 123_457
    clock.advance_to(t0)
    wr(rtc, RA, 0x26)
    clock.advance_to(t0 + TICK_HZ // 2 - UIP_TICKS - 1)
    assert rd(rtc, RA) == 0x26
    clock.advance_to(t0 + TICK_HZ // 2 - UIP_TICKS)
    assert rd(rtc, RA) == 0xA6
    clock.advance_to(t0 + TICK_HZ // 2 - 1)
    assert rd(rtc, SEC) == 0x00
    clock.advance_to(t0 + TICK_HZ // 2)
    assert rd(rtc, SEC) == 0x01
    clock.advance_to(t0 + TICK_HZ // 2 + TICK_HZ)
    assert rd(rtc, SEC) == 0x02


# -- periodic interrupt -----------------------------------------------------------
def _isr_reader(clock, rtc, seen):
    def sink(level: bool) -> None:
        if level:
            seen.append((clock.now(), rd(rtc, RC)))
    return sink


@pytest.mark.parametrize("rate, hz", [(6, 1024), (3, 8192), (15, 2), (1, 256), (2, 128),
                                      (8, 256), (9, 128)])
def test_periodic_interrupt_rate(rate, hz):
    clock, irq, rtc = make(epoch(2024, 1, 1))
    wr(rtc, RA, 0x20 | rate)
    seen: list[tuple[int, int]] = []
    irq.connect(_isr_reader(clock, rtc, seen))
    wr(rtc, RB, PIE | H24)
    clock.advance_to(TICK_HZ)
    assert irq.edges == hz == len(seen)
    # Edge k lands on the first tick at or after k periods of the 32.768 kHz chain.
    period_cycles = 32768 // hz
    for k, (tick, c) in enumerate(seen, start=1):
        assert tick == -((-k * period_cycles * TICK_HZ) // 32768)
        assert c & (IRQF | PF) == IRQF | PF
    assert not irq.level


def test_periodic_irq_stays_asserted_until_register_c_is_read():
    clock, irq, rtc = make(0)
    wr(rtc, RB, PIE | H24)
    clock.advance_to(10 * 97_657)  # ten 1024 Hz periods, nobody reads C
    assert irq.level and irq.edges == 1
    assert clock.next_deadline() is None  # nothing to do while the pin is held
    assert rd(rtc, RC) == IRQF | PF
    assert not irq.level
    assert rd(rtc, RC) == 0
    assert clock.next_deadline() == 1_074_219  # ceil(11 * 97656.25)


def test_periodic_flag_polled_without_timers():
    clock, irq, rtc = make(0)
    assert clock.next_deadline() is None  # no interrupt enabled: no timer at all
    rd(rtc, RC)
    clock.advance_to(97_656)  # 1024 Hz: first edge at 97656.25 ticks -> tick 97657
    assert rd(rtc, RC) == 0
    clock.advance_to(97_657)
    assert rd(rtc, RC) == PF  # set although PIE = 0, and no IRQF
    assert rd(rtc, RC) == 0
    wr(rtc, RA, 0x20)  # rate 0: no periodic flag
    clock.advance(TICK_HZ // 10)
    assert rd(rtc, RC) & PF == 0
    assert not irq.level and irq.edges == 0


def test_enabling_pie_with_pf_pending_raises_irq_and_disabling_cancels_timer():
    clock, irq, rtc = make(0)
    clock.advance_to(200_000)
    wr(rtc, RB, PIE | H24)  # PF is already set: IRQF at once
    assert irq.level
    wr(rtc, RB, H24)
    assert not irq.level
    assert rd(rtc, RC) == PF
    wr(rtc, RB, PIE | H24)
    assert clock.next_deadline() is not None
    wr(rtc, RB, H24)
    assert clock.next_deadline() is None


def test_periodic_continues_while_set_but_updates_stop():
    clock, irq, rtc = make(epoch(2024, 1, 1))
    wr(rtc, RB, SET | H24)
    rd(rtc, RC)
    clock.advance_to(3 * TICK_HZ)
    assert rd(rtc, RC) == PF  # no UF while SET = 1
    assert rd(rtc, SEC) == 0x00
    assert not irq.level


# -- alarm and update-ended interrupts --------------------------------------------
def test_alarm_interrupt_at_exact_second():
    clock, irq, rtc = make(epoch(2024, 1, 1, 10, 0, 0))
    wr(rtc, ASEC, 0x05)
    wr(rtc, AMIN, 0x00)
    wr(rtc, AHOUR, 0x10)
    wr(rtc, RB, AIE | H24)
    assert clock.next_deadline() == 5 * TICK_HZ  # one timer, straight to the match
    clock.advance_to(5 * TICK_HZ - 1)
    assert not irq.level
    clock.advance_to(5 * TICK_HZ)
    assert irq.level
    c = rd(rtc, RC)
    assert c & (IRQF | AF | UF) == IRQF | AF | UF
    assert not irq.level
    assert clock.next_deadline() == (5 + 86400) * TICK_HZ  # same time tomorrow


def test_alarm_dont_care_fires_every_minute():
    clock, irq, rtc = make(epoch(2024, 1, 1, 10, 0, 0))
    seen: list[tuple[int, int]] = []
    irq.connect(_isr_reader(clock, rtc, seen))
    wr(rtc, ASEC, 0x30)
    wr(rtc, AMIN, 0xFF)
    wr(rtc, AHOUR, 0xC0)
    wr(rtc, RB, AIE | H24)
    clock.advance_to(180 * TICK_HZ)
    assert [t for t, _ in seen] == [30 * TICK_HZ, 90 * TICK_HZ, 150 * TICK_HZ]
    assert all(c & (IRQF | AF) == IRQF | AF for _, c in seen)


def test_alarm_in_12_hour_mode_matches_pm_bit():
    clock, irq, rtc = make(epoch(2024, 1, 1, 0, 59, 58))  # 12:59:58 AM
    wr(rtc, RB, 0)  # 12-hour BCD
    wr(rtc, ASEC, 0x00)
    wr(rtc, AMIN, 0x00)
    wr(rtc, AHOUR, 0x81)  # 1 PM, not 1 AM
    wr(rtc, RB, AIE)
    clock.advance_to(3 * TICK_HZ)
    assert not irq.level
    assert clock.next_deadline() == (2 + 12 * 3600) * TICK_HZ
    wr(rtc, AHOUR, 0x01)  # 1 AM passed at 2 s: polled AF shows it, no IRQ
    assert not irq.level
    wr(rtc, RB, 0)
    clock.advance_to(4 * TICK_HZ)
    assert rd(rtc, RC) & AF == 0  # the match was before the alarm byte changed
    clock.advance_to((2 + 86400) * TICK_HZ)
    assert rd(rtc, RC) & AF == AF


@pytest.mark.parametrize("byte, every_second", [(0xC0, True), (0xE7, True), (0xFF, True), (0xBF, False)])
def test_alarm_dont_care_code_is_c0_to_ff(byte, every_second):
    clock, _, rtc = make(epoch(2024, 1, 1, 10, 0, 0))
    for reg in (ASEC, AMIN, AHOUR):
        wr(rtc, reg, byte)
    for k in range(1, 4):
        clock.advance_to(k * TICK_HZ)
        assert bool(rd(rtc, RC) & AF) == every_second


def test_alarm_polled_without_aie_and_impossible_alarm():
    clock, irq, rtc = make(epoch(2024, 1, 1, 10, 0, 0))
    wr(rtc, ASEC, 0x05)
    wr(rtc, AMIN, 0x00)
    wr(rtc, AHOUR, 0x10)
    clock.advance_to(4 * TICK_HZ)
    assert rd(rtc, RC) & AF == 0
    clock.advance_to(7 * TICK_HZ)
    assert rd(rtc, RC) & (AF | IRQF) == AF
    assert clock.next_deadline() is None and irq.edges == 0
    wr(rtc, ASEC, 0x75)  # not a BCD second: never matches
    wr(rtc, RB, AIE | H24)
    assert clock.next_deadline() is None
    clock.advance(2 * 86400 * TICK_HZ)
    assert rd(rtc, RC) & AF == 0


def test_update_ended_interrupt_each_second():
    clock, irq, rtc = make(epoch(2024, 1, 1))
    wr(rtc, RA, 0x20)  # no periodic flag, to see UF alone
    wr(rtc, RB, UIE | H24)
    assert clock.next_deadline() == TICK_HZ
    clock.advance_to(TICK_HZ - 1)
    assert not irq.level
    clock.advance_to(TICK_HZ)
    assert irq.level and irq.edges == 1
    assert rd(rtc, RC) == IRQF | UF
    assert not irq.level
    assert clock.next_deadline() == 2 * TICK_HZ
    clock.advance_to(2 * TICK_HZ)
    assert irq.level and irq.edges == 2


def test_set_bit_clears_uie_and_suppresses_uf():
    clock, irq, rtc = make(0)
    wr(rtc, RB, UIE | H24)
    wr(rtc, RB, SET | UIE | H24)
    assert rd(rtc, RB) == SET | H24
    assert clock.next_deadline() is None
    clock.advance_to(3 * TICK_HZ)
    assert rd(rtc, RC) & UF == 0
    assert irq.edges == 0


def test_register_c_read_clears_flags_and_lowers_irq():
    clock, irq, rtc = make(0)
    wr(rtc, RB, UIE | PIE | AIE | H24)
    wr(rtc, ASEC, 0xFF)
    wr(rtc, AMIN, 0xFF)
    wr(rtc, AHOUR, 0xFF)
    clock.advance_to(TICK_HZ)
    assert irq.level
    assert rtc.get_cmos(RC) == IRQF | PF | AF | UF  # a peek does not clear
    assert irq.level
    assert rd(rtc, RC) == IRQF | PF | AF | UF
    assert not irq.level
    assert rd(rtc, RC) == 0
    wr(rtc, RC, 0xFF)  # C and D are read-only
    wr(rtc, RD, 0x00)
    assert rd(rtc, RC) == 0 and rd(rtc, RD) == 0x80


def test_reentrant_handler_reading_c_inside_the_irq_sink():
    clock, irq, rtc = make(0)
    wr(rtc, RB, UIE | H24)
    seen: list[tuple[int, int]] = []
    irq.connect(_isr_reader(clock, rtc, seen))
    clock.advance_to(5 * TICK_HZ)
    assert [t for t, _ in seen] == [k * TICK_HZ for k in range(1, 6)]
    assert not irq.level


def test_reset_pin_clears_enables_and_flags_but_keeps_time_and_ram():
    clock, irq, rtc = make(epoch(2024, 1, 1))
    wr(rtc, 0x40, 0x5A)
    wr(rtc, RB, PIE | AIE | UIE | 0x08 | H24 | DM)
    clock.advance_to(TICK_HZ)
    assert irq.level
    rtc.reset()
    assert not irq.level
    assert rd(rtc, RB) == H24 | DM
    assert rd(rtc, RC) == 0
    assert rd(rtc, RA) == 0x26
    assert rd(rtc, 0x40) == 0x5A and rd(rtc, SEC) == 1
    assert clock.next_deadline() is None


# -- ports, NVRAM, memory bytes ---------------------------------------------------
def test_index_port_nmi_bit_and_wide_accesses():
    _, _, rtc = make(0)
    assert not rtc.nmi_disabled
    rtc.io_write(0x70, 1, 0x8E)
    assert rtc.nmi_disabled
    rtc.io_write(0x71, 1, 0x33)
    assert rtc.get_cmos(0x0E) == 0x33  # bit 7 is not part of the index
    rtc.io_write(0x70, 1, 0x0E)
    assert not rtc.nmi_disabled
    assert rtc.io_read(0x70, 1) == 0xFF
    rtc.io_write(0x70, 2, 0x5510)  # byte lanes: index 0x10, then data 0x55
    assert rtc.get_cmos(0x10) == 0x55
    assert rtc.io_read(0x70, 2) == 0x55FF
    assert rtc.io_read(0x71, 4) == 0xFFFFFF55


def test_nvram_persists_across_time_reset_and_save_load():
    clock, _, rtc = make(epoch(2024, 1, 1))
    cells = [i for i in range(0x0E, 0x80) if i != CENTURY]
    for i in cells:
        wr(rtc, i, (i * 37 + 11) & 0xFF)
    clock.advance(100 * TICK_HZ)
    rtc.reset()
    assert [rd(rtc, i) for i in cells] == [(i * 37 + 11) & 0xFF for i in cells]
    clock2 = VirtualClock()
    clock2.advance_to(clock.now())
    _, _, rtc2 = make(0, clock2)
    rtc2.load_state(rtc.save_state())
    assert [rd(rtc2, i) for i in cells] == [(i * 37 + 11) & 0xFF for i in cells]
    rtc.set_cmos(0x7F, 0xA5)
    assert rtc.get_cmos(0x7F) == 0xA5 and rd(rtc, 0x7F) == 0xA5
    with pytest.raises(ValueError):
        rtc.set_cmos(0x80, 0)
    with pytest.raises(ValueError):
        rtc.get_cmos(-1)


def _word(rtc, lo):
    return rtc.get_cmos(lo) | rtc.get_cmos(lo + 1) << 8


def test_memory_size_bytes_64mib():
    _, _, rtc = make(0)
    rtc.store_memory_size(64 << 20)
    assert _word(rtc, 0x15) == 640
    assert _word(rtc, 0x17) == 63 * 1024 == _word(rtc, 0x30)
    assert _word(rtc, 0x34) == (48 << 20) // 65536
    assert [rtc.get_cmos(i) for i in (0x5B, 0x5C, 0x5D)] == [0, 0, 0]
    total = sum(rtc.get_cmos(i) for i in range(0x10, 0x2E))
    assert rtc.get_cmos(0x2E) << 8 | rtc.get_cmos(0x2F) == total


def test_memory_size_bytes_large_and_small():
    _, _, rtc = make(0)
    rtc.store_memory_size(6 << 30)  # 3.5 GiB below the hole, 2.5 GiB above 4 GiB
    assert _word(rtc, 0x15) == 640
    assert _word(rtc, 0x17) == 0xFFFF == _word(rtc, 0x30)
    assert _word(rtc, 0x34) == (0xE000_0000 - (16 << 20)) // 65536
    above = rtc.get_cmos(0x5B) | rtc.get_cmos(0x5C) << 8 | rtc.get_cmos(0x5D) << 16
    assert above == (6 << 30) - 0xE000_0000 >> 16
    rtc.store_memory_size(512 << 10)
    assert _word(rtc, 0x15) == 512 and _word(rtc, 0x17) == 0 and _word(rtc, 0x34) == 0
    assert rd(rtc, 0x15) == 0x00 and rd(rtc, 0x16) == 0x02  # visible through the ports


# -- state --------------------------------------------------------------------------
def _drive_both(pairs, steps):
    """Apply the same accesses to each (clock, irq, rtc) and return what each saw."""
    out = []
    for clock, irq, rtc in pairs:
        seen = []
        for kind, *args in steps:
            if kind == "adv":
                clock.advance(args[0])
            elif kind == "rd":
                seen.append(rd(rtc, args[0]))
            else:
                wr(rtc, *args)
            seen.append((irq.level, clock.next_deadline()))
        out.append((seen, irq.edges))
    return out


def test_save_load_round_trip_behaves_identically():
    clock, irq, rtc = make(epoch(2024, 2, 29, 23, 59, 0))
    wr(rtc, RB, SET | H24)
    set_time_bcd(rtc, 2031, 12, 31, 23, 58, 30, dow=2)  # really a Wednesday (4)
    clock.advance_to(TICK_HZ // 3)
    wr(rtc, RB, H24)
    wr(rtc, RA, 0x2A)  # 64 Hz
    wr(rtc, ASEC, 0x00)
    wr(rtc, AMIN, 0xC0)
    wr(rtc, AHOUR, 0xC0)
    wr(rtc, RB, PIE | AIE | H24)
    rd(rtc, RC)  # PF from before PIE was set asserted IRQ8 at once; acknowledge it
    wr(rtc, 0x50, 0x77)
    rtc.io_write(0x70, 1, 0x80 | 0x50)
    state = rtc.save_state()
    assert state["timer_armed"]

    clock2 = VirtualClock()
    clock2.advance_to(clock.now())
    irq2 = IrqLine("irq8")
    rtc2 = Rtc146818(clock2, irq2, 0)
    rtc2.load_state(state)
    assert rtc2.save_state() == state
    assert rtc2.nmi_disabled and rtc2.io_read(0x71, 1) == 0x77
    irq2.edges = irq.edges
    steps = [("adv", TICK_HZ // 100), ("rd", RC), ("adv", 2 * TICK_HZ), ("rd", RC)]
    steps += [("rd", r) for r in (SEC, MIN, HOUR, DOW, DOM, MON, YEAR, CENTURY, RA)]
    steps += [("adv", 90 * TICK_HZ), ("rd", RC), ("w", RB, UIE | H24), ("adv", TICK_HZ),
              ("rd", RC), ("w", RA, 0x70), ("adv", 5), ("w", RA, 0x26), ("adv", TICK_HZ),
              ("rd", SEC), ("rd", RC)]
    a, b = _drive_both([(clock, irq, rtc), (clock2, irq2, rtc2)], steps)
    assert a == b
    assert rtc.save_state() == rtc2.save_state()


def test_load_state_raises_no_interrupt():
    clock, irq, rtc = make(0)
    wr(rtc, RB, UIE | H24)
    clock.advance_to(TICK_HZ)
    assert irq.level
    state = rtc.save_state()
    calls = []
    clock2 = VirtualClock()
    clock2.advance_to(TICK_HZ)
    irq2 = IrqLine("irq8", sink=calls.append)
    rtc2 = Rtc146818(clock2, irq2, 0)
    rtc2.load_state(state)
    assert calls == [] and irq2.level
    assert rd(rtc2, RC) == IRQF | UF | PF
    assert calls == [False]


@pytest.mark.parametrize("mutate", [
    lambda s: s.update(kind="pit8254"),
    lambda s: s.update(version=2),
    lambda s: s.update(regs=b"\x00" * 64),
    lambda s: s.update(regs="nope"),
    lambda s: s.update(index=128),
    lambda s: s.update(offset="12"),
    lambda s: s.update(flags=0x81),
    lambda s: s.update(timer_armed=1),
    lambda s: s.pop("divider_ref"),
])
def test_malformed_state_is_rejected(mutate):
    _, _, rtc = make(0)
    state = rtc.save_state()
    mutate(state)
    with pytest.raises(DeviceStateError):
        make(0)[2].load_state(state)
    with pytest.raises(DeviceStateError):
        rtc.load_state([])  # type: ignore[arg-type]


_REGS_OF_INTEREST = st.sampled_from([SEC, ASEC, MIN, AMIN, HOUR, AHOUR, DOW, DOM, MON, YEAR,
                                     RA, RB, RC, RD, CENTURY, 0x0E, 0x7F])
_OP = st.one_of(
    st.tuples(st.just("out"), st.sampled_from([0x70, 0x71]), st.sampled_from([1, 2, 4]),
              st.integers(0, 0xFFFF_FFFF)),
    st.tuples(st.just("in"), st.sampled_from([0x70, 0x71]), st.sampled_from([1, 2, 4])),
    st.tuples(st.just("reg_w"), _REGS_OF_INTEREST,
              st.one_of(st.integers(0, 0xFF), st.sampled_from([0x26, 0x70, 0x23, 0x80, 0x72,
                                                               0x52, 0x12, 0x02, 0x06]))),
    st.tuples(st.just("reg_r"), _REGS_OF_INTEREST),
    st.tuples(st.just("adv"), st.one_of(st.integers(0, 200_000), st.integers(0, 3 * TICK_HZ))),
)


def _apply(op, clock, irq, rtc):
    kind = op[0]
    if kind == "out":
        rtc.io_write(op[1], op[2], op[3] & ((1 << (8 * op[2])) - 1))
        return None
    if kind == "in":
        return rtc.io_read(op[1], op[2])
    if kind == "reg_w":
        wr(rtc, op[1], op[2])
        return None
    if kind == "reg_r":
        return rd(rtc, op[1])
    clock.advance(op[1])
    return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_OP, max_size=40), cut=st.integers(0, 40),
       start=st.integers(-2**33, 2**33))
def test_random_port_traffic_never_raises_and_save_load_is_transparent(ops, cut, start):
    clock, irq, rtc = make(start)
    cut = min(cut, len(ops))
    for op in ops[:cut]:
        r = _apply(op, clock, irq, rtc)
        assert r is None or 0 <= r < 1 << 32
    state = rtc.save_state()
    clock2 = VirtualClock()
    clock2.advance_to(clock.now())
    irq2 = IrqLine("irq8")
    rtc2 = Rtc146818(clock2, irq2, 0)
    rtc2.load_state(state)
    for op in ops[cut:]:
        assert _apply(op, clock, irq, rtc) == _apply(op, clock2, irq2, rtc2)
        assert irq.level == irq2.level
        assert clock.next_deadline() == clock2.next_deadline()
    assert rtc.save_state() == rtc2.save_state()


@settings(max_examples=100, deadline=None)
@given(rate=st.integers(0, 15), alarm=st.tuples(*[st.sampled_from([0x00, 0x05, 0x30, 0x59, 0xC0, 0xFF])] * 3),
       start=st.integers(0, 2**32), steps=st.lists(
           st.tuples(st.integers(0, 5 * TICK_HZ), st.booleans()), min_size=1, max_size=12))
def test_timers_and_lazy_polling_set_the_same_flags(rate, alarm, start, steps):
    """Enabled interrupts (timers) and polled flags (computed on C reads) agree exactly."""
    devs = [make(start), make(start)]
    for enables, (_, _, rtc) in zip((PIE | AIE | UIE, 0), devs):
        wr(rtc, RA, 0x20 | rate)
        for reg, v in zip((ASEC, AMIN, AHOUR), alarm):
            wr(rtc, reg, v)
        wr(rtc, RB, enables | H24)
    for delta, read in steps:
        got = []
        for clock, irq, rtc in devs:
            clock.advance(delta)
            got.append(rd(rtc, RC) if read else rtc.get_cmos(RC))
        assert got[0] & 0x70 == got[1] & 0x70
        assert got[1] & IRQF == 0 and bool(got[0] & IRQF) == bool(got[0] & 0x70)
    assert devs[1][0].next_deadline() is None
