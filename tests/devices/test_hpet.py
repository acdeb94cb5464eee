"""HPET conformance (IA-PC HPET Specification 1.0a), driven through an MmioBus with a manual clock."""
from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.base import DeviceStateError, IrqLine
from devices.bus import MmioBus
from devices.clock import TICK_HZ, VirtualClock
from devices.timers.hpet import (
    DEFAULT_ROUTE_CAP,
    HPET_BASE,
    HPET_WINDOW,
    MIN_PERIODIC_TICKS,
    Hpet,
)

GCAP, CONF, STA, CNT = 0x000, 0x010, 0x020, 0x0F0
ENABLE, LEGACY = 1, 2
LEVEL, INT_ENB, PERIODIC, PER_CAP, SIZE_CAP, VAL_SET, MODE32 = 2, 4, 8, 16, 32, 64, 256
FSB_EN, FSB_CAP = 1 << 14, 1 << 15
M32, M64 = (1 << 32) - 1, (1 << 64) - 1
ROUTES = 0x00FF_0104  # I/O APIC inputs 2, 8 and 16-23


def tconf(n: int) -> int:
    return 0x100 + 0x20 * n


def tcmp(n: int) -> int:
    return 0x108 + 0x20 * n


def route(r: int) -> int:
    return r << 9


class Board:
    """An HPET on an MMIO bus, every output wire logging (tick, level)."""

    def __init__(self, route_cap: int = ROUTES, clock: VirtualClock | None = None) -> None:
        self.clock = clock or VirtualClock()
        self.log: list[tuple[int, str, bool]] = []
        self.irq0 = self._line("irq0")
        self.irq8 = self._line("irq8")
        self.gsi = {n: self._line(f"gsi{n}") for n in range(32)}
        self.hpet = Hpet(self.clock, self.gsi.get, self.irq0, self.irq8, route_cap=route_cap)
        self.bus = MmioBus()
        self.bus.register(self.hpet, HPET_BASE, HPET_WINDOW)

    def _line(self, name: str) -> IrqLine:
        ln = IrqLine(name)
        ln.connect(lambda level, name=name: self.log.append((self.clock.now(), name, level)))
        return ln

    def rd(self, off: int, size: int = 4) -> int:
        return self.bus.read(HPET_BASE + off, size)

    def wr(self, off: int, value: int, size: int = 4) -> None:
        self.bus.write(HPET_BASE + off, size, value)

    def rises(self, name: str) -> list[int]:
        return [t for t, n, level in self.log if n == name and level]

    def start(self) -> None:
        self.wr(CONF, self.rd(CONF) | ENABLE)


# ---------------------------------------------------------------------------
# 2.3.4 General Capabilities and ID

def test_capabilities_and_id():
    b = Board()
    cap = b.rd(GCAP, 8)
    assert cap & 0xFF == 1                          # REV_ID
    assert (cap >> 8) & 0x1F == 2                   # NUM_TIM_CAP: number of the last timer
    assert cap >> 13 & 1 == 1                       # COUNT_SIZE_CAP: 64-bit
    assert cap >> 15 & 1 == 1                       # LEG_RT_CAP
    assert (cap >> 16) & 0xFFFF == 0x8086           # VENDOR_ID
    period = cap >> 32
    assert period == 10_000_000                     # fs: 100 MHz, QEMU's value
    assert 0 < period <= 0x05F5E100                 # the specification's upper bound (100 ns)
    assert period * TICK_HZ == 10**15               # one counter increment per clock tick, exactly
    assert b.rd(GCAP) | b.rd(GCAP + 4) << 32 == cap  # 32-bit halves
    b.wr(GCAP, 0, 8)
    assert b.rd(GCAP, 8) == cap                     # read-only


def test_power_on_values():
    b = Board()
    assert b.rd(CONF, 8) == 0 and b.rd(STA, 8) == 0 and b.rd(CNT, 8) == 0
    for n in range(3):
        c = b.rd(tconf(n), 8)
        assert c & 0xFFFF == PER_CAP | SIZE_CAP     # periodic- and 64-bit-capable, all else clear
        assert not c & FSB_CAP                      # no FSB delivery
        assert c >> 32 == ROUTES                    # Tn_INT_ROUTE_CAP
        assert b.rd(tcmp(n), 8) == M64              # comparators reset to all ones
    assert Board(route_cap=DEFAULT_ROUTE_CAP).rd(tconf(0) + 4) == 1 << 2   # QEMU i440FX: input 2 only


def test_read_only_and_reserved_bits_do_not_stick():
    b = Board()
    b.wr(CONF, M32)
    assert b.rd(CONF) == ENABLE | LEGACY
    b.wr(CONF, 0)
    b.wr(tconf(0), M32)
    c = b.rd(tconf(0))
    assert c & ~(route(0x1F)) == LEVEL | INT_ENB | PERIODIC | PER_CAP | SIZE_CAP | VAL_SET | MODE32
    assert not c & (FSB_EN | FSB_CAP | 1 | 1 << 7)
    b.wr(tconf(0) + 4, 0)
    assert b.rd(tconf(0) + 4) == ROUTES             # the capability half is read-only
    b.wr(0x110, M32)                                # FSB route register: no FSB, reads 0
    assert b.rd(0x110, 8) == 0
    assert b.rd(0x400 - 8, 8) == 0 and b.rd(0x0F8) == 0 and b.rd(0x160, 8) == 0   # reserved


# ---------------------------------------------------------------------------
# 2.3.5 / 2.3.7 Main counter: halted, running, written

def test_counter_counts_only_while_enabled_and_exactly_one_per_tick():
    b = Board()
    b.clock.advance(1_000)
    assert b.rd(CNT, 8) == 0                        # halted at power-on
    b.start()
    b.clock.advance(12_345)
    assert b.rd(CNT, 8) == 12_345
    b.wr(CONF, 0)
    b.clock.advance(99_999)
    assert b.rd(CNT, 8) == 12_345                   # halted: frozen
    b.start()
    b.clock.advance(5)
    assert b.rd(CNT, 8) == 12_350


def test_counter_rate_is_exact_over_an_hour():
    b = Board()
    b.start()
    hour = 3600 * TICK_HZ
    b.clock.advance(hour)
    count = b.rd(CNT) | b.rd(CNT + 4) << 32
    period_fs = b.rd(GCAP + 4)
    assert count * period_fs == 3600 * 10**15      # to the femtosecond
    assert count > M32                              # the 32-bit low half has wrapped


def test_counter_written_while_halted_and_not_while_running():
    b = Board()
    b.wr(CNT, 0xFFFF_FFF0)
    b.wr(CNT + 4, 0x1)
    assert b.rd(CNT, 8) == 0x1_FFFF_FFF0
    b.start()
    b.clock.advance(0x20)
    assert b.rd(CNT, 8) == 0x2_0000_0010            # carries into the high half
    b.wr(CNT, 0, 8)                                 # running: dropped, as QEMU does
    assert b.rd(CNT, 8) == 0x2_0000_0010
    b.wr(CONF, 0)
    b.wr(CNT, M64, 8)
    b.start()
    b.clock.advance(2)
    assert b.rd(CNT, 8) == 1                        # the 64-bit counter wraps


# ---------------------------------------------------------------------------
# 2.3.9 Comparator: non-periodic mode

def test_one_shot_fires_at_the_exact_tick():
    b = Board()
    b.wr(tconf(2), INT_ENB | route(16))
    b.start()
    b.clock.advance(500)
    b.wr(tcmp(2), 500 + 1_000, 8)                   # counter is 500: 1000 ticks ahead
    b.clock.advance(999)
    assert b.rises("gsi16") == []
    b.clock.advance(1)
    assert b.rises("gsi16") == [1_500]
    assert b.log[-1] == (1_500, "gsi16", False)     # edge: a pulse
    b.clock.advance(10**6)
    assert b.rises("gsi16") == [1_500]              # one shot
    assert b.rd(STA) == 0                           # edge timers leave the status bit alone


def test_comparator_already_reached_waits_for_the_counter_to_come_round():
    b = Board()
    b.wr(tconf(2), INT_ENB | MODE32 | route(16))
    b.start()
    b.clock.advance(1_000)
    b.wr(tcmp(2), 1_000)                            # equal to the counter: already reached
    b.wr(CONF, 0)
    b.wr(CNT, 0, 8)                                 # no wrap interrupt in the way: start at 0
    b.wr(CNT, 1_000)
    b.start()
    start = b.clock.now()
    b.clock.advance(1 << 31)
    assert b.rises("gsi16") == []
    b.clock.advance(1 << 32)
    # 32-bit one-shot: the low half wraps to 0 (an interrupt of its own), then matches again
    assert b.rises("gsi16") == [start + (1 << 32) - 1_000, start + (1 << 32)]


def test_32bit_mode_compares_the_low_half_and_interrupts_on_wrap():
    b = Board()
    b.wr(CNT, 0x5_FFFF_0000, 8)
    b.wr(tconf(2), INT_ENB | MODE32 | route(16))
    b.wr(tcmp(2), 0x5_0000_1000, 8)
    assert b.rd(tcmp(2), 8) == 0x1000               # truncated to 32 bits
    b.wr(tcmp(2) + 4, 0x77)
    assert b.rd(tcmp(2), 8) == 0x1000               # no high half in 32-bit mode
    b.start()
    t0 = b.clock.now()
    b.clock.advance(0x20000)
    # the low half wraps at 0x10000 ticks (one interrupt), then matches 0x1000 later
    assert b.rises("gsi16") == [t0 + 0x10000, t0 + 0x11000]


def test_64bit_comparator_with_a_32bit_write_pair():
    b = Board()
    b.wr(CNT, 0xFFFF_FF00, 8)
    b.wr(tconf(0), INT_ENB | route(2))
    b.wr(tcmp(0), 0x0000_0100)
    b.wr(tcmp(0) + 4, 0x1)
    assert b.rd(tcmp(0), 8) == 0x1_0000_0100
    b.start()
    t0 = b.clock.now()
    b.clock.advance(0x300)
    assert b.rises("gsi2") == [t0 + 0x200]          # no 32-bit wrap interrupt in 64-bit mode


# ---------------------------------------------------------------------------
# 2.3.9 Comparator: periodic mode and Tn_VAL_SET_CNF

def linux_periodic(b: Board, n: int, delta: int) -> int:
    """arch/x86/kernel/hpet.c's periodic set-up: stop, accumulator = now + delta, period = delta, start.

    Linux runs its timers in 32-bit mode and writes the comparator 32 bits at a time.
    """
    b.wr(CONF, b.rd(CONF) & ~ENABLE)
    now = b.rd(CNT)
    b.wr(tconf(n), b.rd(tconf(n)) | INT_ENB | PERIODIC | VAL_SET | MODE32)
    b.wr(tcmp(n), (now + delta) & M32)
    b.wr(tcmp(n), delta)                            # second write: period only (AMD 81xx)
    b.start()
    return b.clock.now()


def test_periodic_reload_at_exact_ticks_and_accumulator_readback():
    b = Board()
    b.wr(CONF, LEGACY)
    t0 = linux_periodic(b, 0, 100_000)
    b.clock.advance(350_000)
    assert b.rises("irq0") == [t0 + 100_000, t0 + 200_000, t0 + 300_000]
    assert b.rd(tcmp(0), 8) == 400_000              # the accumulator: next match
    assert not b.rd(tconf(0)) & VAL_SET             # cleared by the comparator write
    b.wr(tcmp(0), 50_000)                           # without VAL_SET: the period only
    assert b.rd(tcmp(0), 8) == 400_000
    b.clock.advance(160_000)
    assert b.rises("irq0")[3:] == [t0 + 400_000, t0 + 450_000, t0 + 500_000]


def test_periodic_accumulator_stays_exact_with_interrupts_off():
    b = Board()
    b.wr(tconf(2), PERIODIC | VAL_SET | route(16))  # no Tn_INT_ENB: nothing scheduled
    b.wr(tcmp(2), 7, 8)
    b.wr(tcmp(2), 7, 8)
    b.start()
    b.clock.advance(10**9 + 3)                      # ten seconds in one step
    assert b.rd(tcmp(2), 8) == 7 * ((10**9 + 3) // 7 + 1)   # the first multiple of 7 still ahead
    assert b.rises("gsi16") == []


def test_32bit_periodic_accumulator_wraps():
    b = Board()
    b.wr(CNT, 0xFFFF_F000, 8)
    b.wr(tconf(2), INT_ENB | PERIODIC | VAL_SET | MODE32 | route(16))
    b.wr(tcmp(2), 0xFFFF_F800)
    b.wr(tcmp(2), 0x1000)
    b.start()
    t0 = b.clock.now()
    b.clock.advance(0x27FF)
    assert b.rises("gsi16") == [t0 + 0x800, t0 + 0x1800]   # no extra wrap interrupt when periodic
    assert b.rd(tcmp(2), 8) == 0x0000_1800          # 0xFFFF_F800 + 2 * 0x1000 mod 2**32


def test_tiny_periods_are_merged_to_one_interrupt_per_microsecond():
    b = Board()
    b.wr(tconf(2), INT_ENB | PERIODIC | VAL_SET | route(16))
    b.wr(tcmp(2), 3, 8)
    b.wr(tcmp(2), 3, 8)
    b.start()
    t0 = b.clock.now()
    b.clock.advance(1_000)
    # ceil(100 / 3) = 34 matches merged into each interrupt: one every 102 ticks
    assert b.rises("gsi16") == [t0 + 102 * k for k in range(1, 10)]
    assert b.rd(tcmp(2), 8) == 3 * (1_000 // 3 + 1)  # the accumulator saw every match


# ---------------------------------------------------------------------------
# 2.4 Interrupt mapping: LegacyReplacement and Tn_INT_ROUTE_CNF

def test_legacy_replacement_routes_timer0_to_irq0_and_timer1_to_irq8():
    b = Board()
    b.wr(tconf(0), INT_ENB | route(16))
    b.wr(tconf(1), INT_ENB | route(17))
    b.wr(tconf(2), INT_ENB | route(18))
    for n in range(3):
        b.wr(tcmp(n), 100 * (n + 1), 8)
    b.wr(CONF, ENABLE | LEGACY)
    b.clock.advance(1_000)
    assert b.rises("irq0") == [100] and b.rises("irq8") == [200]
    assert b.rises("gsi16") == b.rises("gsi17") == []      # the route bits do not count for 0 and 1
    assert b.rises("gsi18") == [300]                # timer 2 keeps its own route


def test_without_legacy_replacement_each_timer_uses_its_route():
    b = Board()
    for n, r in enumerate((2, 8, 23)):
        b.wr(tconf(n), INT_ENB | route(r))
        b.wr(tcmp(n), 10 * (n + 1), 8)
    b.start()
    b.clock.advance(100)
    assert (b.rises("gsi2"), b.rises("gsi8"), b.rises("gsi23")) == ([10], [20], [30])
    assert b.rises("irq0") == b.rises("irq8") == []


def test_a_route_outside_the_capability_mask_does_not_stick():
    b = Board()
    b.wr(tconf(2), route(16))
    b.wr(tconf(2), route(5) | INT_ENB)              # input 5 is not offered
    assert (b.rd(tconf(2)) >> 9) & 0x1F == 16       # read-back differs: unsupported
    assert b.rd(tconf(2)) & INT_ENB                  # the other bits of the write took


def test_legacy_mode_cuts_off_the_pit_and_rtc_inputs():
    b = Board()
    b.hpet.pit_input(True)
    b.hpet.rtc_input(True)
    assert b.irq0.level and b.irq8.level            # passed through while LEG_RT_CNF is clear
    b.wr(CONF, LEGACY)
    assert not b.irq0.level and not b.irq8.level
    b.hpet.pit_input(False)
    b.hpet.pit_input(True)
    assert not b.irq0.level
    b.wr(CONF, 0)
    assert b.irq0.level and b.irq8.level


# ---------------------------------------------------------------------------
# 2.3.6 General Interrupt Status: level-triggered timers

def test_level_interrupt_sets_status_holds_the_line_and_clears_on_write_1():
    b = Board()
    b.wr(tconf(2), LEVEL | INT_ENB | route(20))
    b.wr(tcmp(2), 1_000, 8)
    b.start()
    b.clock.advance(2_000)
    assert b.rises("gsi20") == [1_000]
    assert b.gsi[20].level and b.rd(STA) == 0b100
    b.wr(STA, 0b011)                                # writing 0 to bit 2 changes nothing
    assert b.gsi[20].level and b.rd(STA) == 0b100
    b.wr(STA, 0b100)
    assert not b.gsi[20].level and b.rd(STA) == 0
    assert b.log[-1] == (2_000, "gsi20", False)


def test_narrow_writes_touch_only_their_bytes():
    b = Board()
    b.wr(tconf(2), LEVEL | route(20))
    b.wr(tcmp(2), 10, 8)
    b.start()
    b.clock.advance(20)
    assert b.rd(STA) == 0b100
    b.wr(STA + 1, 0xFF, 1)                          # another byte of the status register
    assert b.rd(STA) == 0b100
    b.wr(STA, 0x04, 1)
    assert b.rd(STA) == 0
    b.wr(tcmp(2) + 2, 0xAB, 1)                      # a byte of the comparator
    assert b.rd(tcmp(2), 8) == 0xAB_000A
    assert b.rd(GCAP + 2, 2) == 0x8086              # the vendor id as a word


def test_level_status_without_interrupt_enable_and_gating_by_enable_cnf():
    b = Board()
    b.wr(tconf(2), LEVEL | route(20))               # Tn_INT_ENB clear: status, no interrupt
    b.wr(tcmp(2), 1_000, 8)
    b.start()
    b.clock.advance(1_500)
    assert b.rd(STA) == 0b100 and not b.gsi[20].level
    b.wr(tconf(2), LEVEL | INT_ENB | route(20))     # enabling it asserts the pending interrupt
    assert b.gsi[20].level
    b.wr(CONF, 0)                                   # halting gates interrupts, keeps status
    assert not b.gsi[20].level and b.rd(STA) == 0b100
    b.start()
    assert b.gsi[20].level
    b.wr(tconf(2), INT_ENB | route(20))             # switched to edge: no status bit any more
    assert b.rd(STA) == 0 and not b.gsi[20].level


def test_level_timers_share_a_wire_as_a_wired_or():
    b = Board()
    b.wr(tconf(1), LEVEL | INT_ENB | route(16))
    b.wr(tconf(2), LEVEL | INT_ENB | route(16))
    b.wr(tcmp(1), 100, 8)
    b.wr(tcmp(2), 200, 8)
    b.start()
    b.clock.advance(300)
    assert b.rd(STA) == 0b110 and b.rises("gsi16") == [100]
    b.wr(STA, 0b010)
    assert b.gsi[16].level                          # timer 2 still holds it
    b.wr(STA, 0b100)
    assert not b.gsi[16].level


# ---------------------------------------------------------------------------
# save / restore mid-flight

def test_restore_continues_the_periodic_timer_exactly():
    a = Board()
    a.wr(CONF, LEGACY)
    t0 = linux_periodic(a, 0, 100_000)
    a.clock.advance(150_000)
    state = copy.deepcopy(a.hpet.save_state())
    clock = VirtualClock()
    clock.load_state(a.clock.save_state())
    b = Board(clock=clock)
    b.hpet.load_state(state)
    assert b.log == []                              # a restore raises nothing
    b.clock.advance(300_000)
    assert b.rises("irq0") == [t0 + 200_000, t0 + 300_000, t0 + 400_000]
    with pytest.raises(DeviceStateError):
        b.hpet.load_state({**state, "timers": state["timers"][:2]})
    bad = copy.deepcopy(state)
    bad["timers"][0]["config"] |= MODE32
    bad["timers"][0]["comparator"] = 1 << 40       # 32-bit mode keeps the comparator truncated
    with pytest.raises(DeviceStateError):
        b.hpet.load_state(bad)


def test_reset_halts_and_restores_power_on_values():
    b = Board()
    b.wr(tconf(2), LEVEL | INT_ENB | route(20))
    b.wr(tcmp(2), 10, 8)
    b.start()
    b.clock.advance(20)
    assert b.gsi[20].level
    b.hpet.reset()
    assert not b.gsi[20].level
    assert b.rd(CONF) == 0 and b.rd(STA) == 0 and b.rd(CNT, 8) == 0 and b.rd(tcmp(2), 8) == M64
    assert b.clock.next_deadline() is None


# ---------------------------------------------------------------------------
# Against a tick-by-tick model of the comparator (the specification's wording, literally)

def reference_events(counter: int, cmp: int, period: int, periodic: bool, mode32: bool, ticks: int):
    """Ticks (1..ticks) at which the timer has an event, stepping the counter one tick at a time."""
    mod = 1 << 32 if mode32 else 1 << 64
    out = []
    for t in range(1, ticks + 1):
        counter = (counter + 1) & M64
        event = counter % mod == cmp % mod
        if event and periodic:
            cmp = (cmp + period) % mod
        if mode32 and not periodic and counter % (1 << 32) == 0:
            event = True
        if event:
            out.append(t)
    return out, cmp


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.one_of(st.integers(0, 3_000), st.integers((1 << 32) - 3_000, (1 << 32) + 100),
                    st.integers(M64 - 3_000, M64)),
    cmp_off=st.integers(-200, 3_000),
    period=st.one_of(st.just(0), st.integers(MIN_PERIODIC_TICKS, 1_500)),
    periodic=st.booleans(),
    mode32=st.booleans(),
    chunks=st.lists(st.tuples(st.integers(1, 700), st.booleans()), min_size=1, max_size=12),
)
def test_events_match_a_tick_by_tick_model(start, cmp_off, period, periodic, mode32, chunks):
    b = Board()
    b.wr(CNT, start, 8)
    cmp = (start + cmp_off) & M64
    b.wr(tconf(2), INT_ENB | route(16) | (PERIODIC | VAL_SET if periodic else 0) | (MODE32 if mode32 else 0))
    b.wr(tcmp(2), cmp, 8)
    if periodic:
        b.wr(tcmp(2), period, 8)
    if mode32:
        cmp &= M32
    b.start()
    t0 = b.clock.now()
    for ticks, peek in chunks:
        b.clock.advance(ticks)
        if peek:                                    # reads must not change what happens
            b.rd(CNT)
            b.rd(tcmp(2), 8)
    total = b.clock.now() - t0
    want, final_cmp = reference_events(start, cmp, period, periodic, mode32, total)
    assert [t - t0 for t in b.rises("gsi16")] == want
    if periodic:
        assert b.rd(tcmp(2), 8) == final_cmp


# ---------------------------------------------------------------------------
# The main counter read by the CPU core in C (vmm/cpu/native/core.c, ctr_answer)

def _guest_counter_reads(fast: bool) -> tuple[bytes, int, list, int]:
    # a guest that reads the main counter (both halves, at a block's start and in the
    # middle of one, after an inner loop of varying length) while timer 0 fires edges
    # and timer 1 (level, interrupt off: its status bit still sets) has its comparator moved
    # just ahead of the counter: the C answers stop where an event is due
    from tools.guestkit import Guest

    g = Guest()
    log: list[tuple[int, str, bool]] = []
    lines = {}
    for name in ("irq0", "irq8", *(f"gsi{n}" for n in range(24))):
        ln = IrqLine(name)
        ln.connect(lambda level, name=name: log.append((g.m.clock.now(), name, level)))
        lines[name] = ln
    hpet = Hpet(g.m.clock, lambda r: lines.get(f"gsi{r}"), lines["irq0"], lines["irq8"], route_cap=ROUTES)
    g.m.add_device(hpet)
    g.m.mmio.register(hpet, HPET_BASE, HPET_WINDOW, "hpet")
    first, stride, comparators, masks = hpet.comparator_sink()
    g.m.engine.set_tick_counter(HPET_BASE + CNT, hpet.counter_view, (HPET_BASE + first, stride, comparators, masks))
    hpet.on_view_change = g.m.engine.tick_counter_changed
    g.m.engine.fast_counter = fast
    b = HPET_BASE
    # timer 2 is idle (edge, one-shot, interrupt off) and its comparator is written as
    # Linux's hpet_calibrate does, both halves, then read back; from the 100th round on it
    # is in 32-bit mode (its high half gone), and for rounds 60..40 its interrupt is on
    g.protected_mode(
        f"mov dword ptr [{b + 0x100:#x}], {INT_ENB | PERIODIC | VAL_SET | MODE32 | (2 << 9):#x}; "
        f"mov dword ptr [{b + 0x108:#x}], 3000; mov dword ptr [{b + 0x120:#x}], {MODE32 | LEVEL:#x}; "
        f"mov dword ptr [{b + 0x108:#x}], 3000; mov dword ptr [{b + CONF:#x}], 1; "
        "mov edi, 0x50000; mov ebp, 0x60000; mov esi, 150; "
        f"L: mov eax, [{b + CNT:#x}]; mov edx, [{b + CNT + 4:#x}]; mov [edi], eax; mov [edi+4], edx; "
        f"add eax, esi; mov [{b + 0x148:#x}], eax; mov [{b + 0x14C:#x}], esi; "
        f"mov eax, [{b + 0x148:#x}]; mov edx, [{b + 0x14C:#x}]; mov [ebp], eax; mov [ebp+4], edx; add ebp, 8; "
        f"cmp esi, 100; jne T1; mov dword ptr [{b + 0x140:#x}], {MODE32:#x}; "
        f"T1: cmp esi, 60; jne T2; mov dword ptr [{b + 0x140:#x}], {MODE32 | INT_ENB | (2 << 9):#x}; "
        f"T2: cmp esi, 40; jne T3; mov dword ptr [{b + 0x140:#x}], {MODE32:#x}; T3: "
        "mov ebx, esi; M: dec ebx; jnz M; jmp N; "
        f"N: nop; mov eax, [{b + CNT:#x}]; mov [edi+8], eax; add eax, 5; mov [{b + 0x128:#x}], eax; "
        f"mov eax, [{b + CNT:#x}]; mov [edi+12], eax; add edi, 16; dec esi; jnz L; "
        "mov dx, 0x501; mov al, 0; out dx, al; hlt")
    assert g.run(1_000_000).reason.value == "exit"
    core = g.m.engine._core
    return (g.m.memory.read(0x50000, 150 * 16) + g.m.memory.read(0x60000, 150 * 8), g.cpu.icount, log,
            (int(core.ctr_hits), int(core.cmp_hits)))


def test_main_counter_answered_in_c_reads_what_the_device_reads():
    fast, n_fast, log_fast, (hits, cmp_hits) = _guest_counter_reads(True)
    ref, n_ref, log_ref, (hits_ref, cmp_ref) = _guest_counter_reads(False)
    assert hits_ref == 0 and 150 < hits < 1000
    assert cmp_ref == 0 and 150 < cmp_hits < 300     # both halves, not while its interrupt is on
    assert fast == ref and n_fast == n_ref and log_fast == log_ref
    readback = [int.from_bytes(ref[2400 + 8 * i:2408 + 8 * i], "little") for i in range(150)]
    assert readback[0] >> 32 == 150 and readback[-1] >> 32 == 0      # 64-bit, then 32-bit mode
    assert len([1 for _, name, level in log_ref if name == "gsi2" and level]) > 5   # timer 0 fired throughout
