"""IA-PC High Precision Event Timer block, as QEMU's PC machines present it.

Implements, from the IA-PC HPET (High Precision Event Timers) Specification
1.0a (Intel, October 2004), section 2.3 "Register Descriptions":

* 2.3.4 General Capabilities and ID: revision 1, three timers (NUM_TIM_CAP =
  2, the number of the last timer), a 64-bit main counter (COUNT_SIZE_CAP),
  LegacyReplacement Route capable (LEG_RT_CAP), vendor 0x8086, and
  COUNTER_CLK_PERIOD in femtoseconds: 10,000,000 fs, a 100 MHz counter,
  which is QEMU's choice and exactly our clock rate, so the main counter
  advances by one every clock tick with no rounding at all.
* 2.3.5 General Configuration: ENABLE_CNF (halts or runs the main counter
  and gates every timer interrupt) and LEG_RT_CNF.
* 2.3.6 General Interrupt Status: Tn_INT_STS is set by a level-triggered
  timer's event, whether or not its interrupt is enabled, and cleared by
  writing 1; edge-triggered timers leave it alone (the specification tells
  software to ignore it for them, and QEMU never sets it).
* 2.3.7 Main Counter Value: counts while ENABLE_CNF is set; software writes
  it while the counter is halted.  A write while it runs is dropped, as in
  QEMU (the specification leaves it undefined).
* 2.3.8 Timer N Configuration and Capabilities: Tn_INT_TYPE_CNF (level or
  edge), Tn_INT_ENB_CNF, Tn_TYPE_CNF (periodic; every timer here is
  Tn_PER_INT_CAP, as in QEMU), Tn_SIZE_CAP (64-bit), Tn_VAL_SET_CNF,
  Tn_32MODE_CNF, Tn_INT_ROUTE_CNF with the route capability mask in bits
  32-63; FSB delivery is not offered (Tn_FSB_INT_DEL_CAP = 0, so
  Tn_FSB_EN_CNF and the FSB route register read 0).  A route outside the
  capability mask does not stick: the read-back keeps the old route, which is
  how the specification tells software the value is unsupported.
* 2.3.9 Timer N Comparator Value, with its two modes of operation:
  non-periodic (an event each time the main counter comes round to the
  comparator) and periodic (at each match the comparator, the "accumulator",
  is advanced by the last value written to it; with Tn_VAL_SET_CNF set the
  next write sets the accumulator too, and the bit then clears itself).
  In 32-bit mode only the low 32 bits are compared, the comparator and period
  are truncated (QEMU), and a non-periodic timer also interrupts when the
  counter's low 32 bits wrap to zero, as the specification's 32-bit
  one-shot note and QEMU have it.
* 2.4 Interrupt mapping: with LEG_RT_CNF timer 0 drives the legacy IRQ0 line
  (8259 IRQ0 / I/O APIC input 2) and timer 1 the legacy IRQ8 line, and the
  8254's and RTC's own interrupts are cut off; every other timer, and all of
  them without LEG_RT_CNF, drives the I/O APIC input named by
  Tn_INT_ROUTE_CNF.

Time model.  An event is the counter *reaching* a comparator value: the
value it holds when the guest writes the comparator or enables the counter
is already past (so a comparator written equal to the counter fires a full
wrap later, as on hardware; QEMU fires such a timer at once, which no guest
relies on: Linux's set_next_event reads the counter back and retries).  The
device keeps ``counter`` as the main counter's value at ``sync_tick`` and
accounts for every event in (sync_tick, now] in closed form whenever it is
touched, so a periodic accumulator read after an hour is exact without an
hour of callbacks.  Only events something could see are put on the clock:
an edge timer's interrupt (when enabled), a level timer's status bit (while
clear).  All three timers share one clock timer, armed at the earliest of
them, so events at the same tick are handled in timer order whatever order
they were programmed in.  A periodic edge timer is never delivered more
than once per microsecond (the events in between are merged into one
interrupt, as QEMU clamps its periodic timers to 1 us) so that a guest, or a
fuzzer, asking for a one-tick period cannot stall the machine.

Wiring.  The constructor takes ``route_irq(n) -> IrqLine | None`` for I/O
APIC input n and the two legacy lines.  The legacy lines also carry the
8254's and the RTC's interrupts when LEG_RT_CNF is clear: the board connects
the PIT's IRQ0 wire to ``pit_input`` and the RTC's IRQ8 wire to
``rtc_input`` (QEMU wires them through its HPET the same way); a board that
does not simply leaves the two inputs low.  Each IrqLine given here must be
this device's own wire (the board ORs wires at the controller), since the
device drives each one to the OR of everything routed to it.
"""
from __future__ import annotations

from array import array
from collections.abc import Callable

from devices.base import SIZE_MASK, IrqLine, State, check_state
from devices.clock import TICK_HZ, Timer, VirtualClock
from devices.timers._common import StateFields, rearm

KIND = "hpet"
VERSION = 1

HPET_BASE = 0xFED0_0000
HPET_WINDOW = 0x400
NUM_TIMERS = 3

# COUNTER_CLK_PERIOD: one main-counter increment per clock tick.
COUNTER_CLK_PERIOD_FS = 10**15 // TICK_HZ
COUNTER_HZ = TICK_HZ

M32 = 0xFFFF_FFFF
M64 = 0xFFFF_FFFF_FFFF_FFFF
_MOD32 = 1 << 32
_MOD64 = 1 << 64

# Register offsets in the 1 KiB window (2.3.1, "Register Overview").
REG_GCAP_ID = 0x000
REG_GEN_CONF = 0x010
REG_GINTR_STA = 0x020
REG_MAIN_CNT = 0x0F0
REG_TIMER0 = 0x100
TIMER_STRIDE = 0x20
TN_CONF = 0x00
TN_COMPARATOR = 0x08
TN_FSB_ROUTE = 0x10

GCAP_REV_ID = 0x01
GCAP_NUM_TIM_SHIFT = 8
GCAP_COUNT_SIZE_CAP = 1 << 13
GCAP_LEG_RT_CAP = 1 << 15
GCAP_VENDOR_ID_SHIFT = 16
GCAP_VENDOR_ID = 0x8086
GCAP_PERIOD_SHIFT = 32
CAPABILITIES = (GCAP_REV_ID | (NUM_TIMERS - 1) << GCAP_NUM_TIM_SHIFT | GCAP_COUNT_SIZE_CAP | GCAP_LEG_RT_CAP
                | GCAP_VENDOR_ID << GCAP_VENDOR_ID_SHIFT | COUNTER_CLK_PERIOD_FS << GCAP_PERIOD_SHIFT)

ENABLE_CNF = 1 << 0
LEG_RT_CNF = 1 << 1
GEN_CONF_WRITABLE = ENABLE_CNF | LEG_RT_CNF

TN_INT_TYPE_CNF = 1 << 1      # 1 = level-triggered
TN_INT_ENB_CNF = 1 << 2
TN_TYPE_CNF = 1 << 3          # 1 = periodic
TN_PER_INT_CAP = 1 << 4
TN_SIZE_CAP = 1 << 5          # 1 = 64-bit comparator
TN_VAL_SET_CNF = 1 << 6
TN_32MODE_CNF = 1 << 8
TN_INT_ROUTE_SHIFT = 9
TN_INT_ROUTE_MASK = 0x1F << TN_INT_ROUTE_SHIFT
TN_FSB_EN_CNF = 1 << 14
TN_FSB_INT_DEL_CAP = 1 << 15
TN_ROUTE_CAP_SHIFT = 32
TN_WRITABLE = (TN_INT_TYPE_CNF | TN_INT_ENB_CNF | TN_TYPE_CNF | TN_VAL_SET_CNF | TN_32MODE_CNF
               | TN_INT_ROUTE_MASK)
TN_FIXED_CAPS = TN_PER_INT_CAP | TN_SIZE_CAP

# QEMU's pc-i440fx machines advertise I/O APIC input 2 only ("hpet-intcap" = 4;
# q35 adds 8 and 16-23).  The board may pass another mask.
DEFAULT_ROUTE_CAP = 1 << 2

# Periodic edge interrupts come at most once per microsecond (QEMU's clamp).
MIN_PERIODIC_TICKS = TICK_HZ // 1_000_000
# Events further away than this (over a thousand years) are never scheduled.
_HORIZON = 1 << 62


def _merge(old: int, value: int, mask: int) -> int:
    return (old & ~mask) | (value & mask)


class Hpet:
    """HPET timer block: main counter and three comparators, 1 KiB of MMIO at 0xFED00000."""

    kind = KIND
    # Every width, naturally aligned (the bus splits the rest).  Each access is
    # applied under its byte mask, as the hardware's byte enables would: a byte
    # write to the write-1-to-clear status register must not write back the
    # other bytes, which a read-merge-write of a wider register would.  (QEMU
    # accepts only 32- and 64-bit accesses; nothing depends on that.)
    mmio_sizes = (1, 2, 4, 8)

    def __init__(self, clock: VirtualClock, route_irq: Callable[[int], IrqLine | None],
                 irq0: IrqLine, irq8: IrqLine, *, route_cap: int = DEFAULT_ROUTE_CAP,
                 name: str = "hpet") -> None:
        if not 0 < route_cap <= M32:
            raise ValueError(f"route capability mask {route_cap:#x} must be a non-zero 32-bit mask")
        self.name = name
        self.route_cap = route_cap
        self._clock = clock
        self._route_irq = route_irq
        self._irq0 = irq0
        self._irq8 = irq8
        self._lines: dict[int, IrqLine | None] = {}
        self._timer: Timer | None = None
        self._pit_level = False
        self._rtc_level = False
        self._config = 0
        self._status = 0
        self._counter = 0
        self._sync_tick = clock.now()
        self._tconf = [0] * NUM_TIMERS
        # an array, not a list: a CPU core stores inert timers' comparator writes into
        # it (comparator_sink), so it is filled in place, never replaced
        self._cmp = array("Q", [M64] * NUM_TIMERS)
        self._period = [0] * NUM_TIMERS
        # called when counter_view() may have changed (a CPU core answers counter reads from it)
        self.on_view_change: Callable[[], None] | None = None

    # -- Device protocol ----------------------------------------------------------
    def reset(self) -> None:
        """Power-on values: counter halted at 0, comparators all ones, timers off.

        The legacy inputs keep their levels: they mirror the PIT's and RTC's
        wires, which those devices drive themselves.
        """
        self._config = 0
        self._status = 0
        self._counter = 0
        self._sync_tick = self._clock.now()
        self._tconf = [0] * NUM_TIMERS
        self._cmp[:] = array("Q", [M64] * NUM_TIMERS)
        self._period = [0] * NUM_TIMERS
        self._arm()
        self._drive(())
        self._view_changed()

    def save_state(self) -> State:
        return {
            "kind": KIND,
            "version": VERSION,
            "config": self._config,
            "status": self._status,
            "counter": self._counter,
            "sync_tick": self._sync_tick,
            "pit_level": self._pit_level,
            "rtc_level": self._rtc_level,
            "timers": [{"config": self._tconf[n], "comparator": self._cmp[n], "period": self._period[n]}
                       for n in range(NUM_TIMERS)],
        }

    def load_state(self, state: State) -> None:
        check_state(state, KIND, VERSION)
        f = StateFields(state, KIND)
        config = f.bits("config", GEN_CONF_WRITABLE)
        status = f.bits("status", (1 << NUM_TIMERS) - 1)
        counter = f.int("counter", 0, M64)
        sync_tick = f.int("sync_tick", 0)
        pit_level = f.bool("pit_level")
        rtc_level = f.bool("rtc_level")
        tconf, cmp, period = [], [], []
        for t in f.records("timers", NUM_TIMERS):
            conf = t.bits("config", TN_WRITABLE)
            top = M32 if conf & TN_32MODE_CNF else M64   # 32-bit mode keeps both truncated
            tconf.append(conf)
            cmp.append(t.int("comparator", 0, top))
            period.append(t.int("period", 0, top))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._config, self._status, self._counter, self._sync_tick = config, status, counter, sync_tick
        self._pit_level, self._rtc_level = pit_level, rtc_level
        self._tconf, self._period = tconf, period
        self._cmp[:] = array("Q", cmp)
        self._arm()
        for line, level in self._output_levels():
            line.level = level   # silently: a restore raises no interrupt
        self._view_changed()

    # -- MMIO ---------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        now = self._clock.now()
        self._catch_up(now)
        shift = (offset & 7) * 8
        return (self._read_reg(offset & ~7, now) >> shift) & SIZE_MASK.get(size, M64)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        now = self._clock.now()
        self._catch_up(now)
        shift = (offset & 7) * 8
        mask = (SIZE_MASK.get(size, M64) << shift) & M64
        reg = offset & ~7
        self._write_reg(reg, (value << shift) & mask, mask)
        self._arm()
        t = self._timer_index(reg)
        if t is None or t[1] != TN_COMPARATOR or not self._inert(t[0]):
            self._view_changed()
        if reg == REG_MAIN_CNT or (reg >= REG_TIMER0 and (reg - REG_TIMER0) % TIMER_STRIDE != TN_CONF):
            # a comparator or the counter: no level output's inputs changed (a Linux
            # boot writes comparators 40,000 times)
            return
        self._drive(())

    # -- legacy inputs (2.4, LegacyReplacement Route) ------------------------------
    def pit_input(self, level: bool) -> None:
        """The 8254 counter 0 OUT wire; passed on to IRQ0 unless LEG_RT_CNF is set."""
        self._pit_level = bool(level)
        self._drive(())

    def rtc_input(self, level: bool) -> None:
        """The RTC's IRQ8 wire; passed on to IRQ8 unless LEG_RT_CNF is set."""
        self._rtc_level = bool(level)
        self._drive(())

    # -- registers ----------------------------------------------------------------
    def counter(self) -> int:
        """The main counter's value now (no side effect)."""
        return self._counter_at(self._clock.now())

    def _inert(self, n: int) -> bool:
        """Timer n's events change nothing: an edge, one-shot, with its interrupt off."""
        conf = self._tconf[n]
        return not conf & (TN_INT_TYPE_CNF | TN_TYPE_CNF | TN_INT_ENB_CNF)

    def _view_changed(self) -> None:
        if self.on_view_change is not None:
            self.on_view_change()

    def counter_view(self) -> tuple[int, int, int, bool]:
        """(counter, sync_tick, limit, running): at any tick ``now < limit`` a main-counter
        read is ``counter + now - sync_tick`` if running and ``now > sync_tick``, else
        ``counter``, and no timer has an event to account for (``_sync`` would fire
        nothing but inert timers' events, which change nothing), so a read that skips this
        device changes nothing it would have.  What
        a CPU core may answer for it (vmm/cpu/native/core.c, ctr_answer) until the next
        access the device itself takes."""
        if not self._config & ENABLE_CNF:
            return self._counter, self._sync_tick, M64, False
        start = self._counter
        first = M64
        for n in range(NUM_TIMERS):
            if self._inert(n):
                continue
            conf = self._tconf[n]
            mod = _MOD32 if conf & TN_32MODE_CNF else _MOD64
            first = min(first, (self._cmp[n] - start) % mod or mod)
            if conf & TN_32MODE_CNF and not conf & TN_TYPE_CNF:
                first = min(first, (-start) % _MOD32 or _MOD32)
        return start, self._sync_tick, min(M64, self._sync_tick + first), True

    def comparator_sink(self) -> tuple[int, int, array, Callable[[], tuple[int, int]]]:
        """(offset of timer 0's comparator, stride, the comparators, masks): a write to
        the comparator of a timer in ``masks()[0]`` (bit n) may be stored straight into
        the array (the low half only for one in ``masks()[1]``, 32-bit mode) while
        counter_view's limit is not reached, skipping this device: such a timer's events
        change nothing anyone sees, and a write to it nothing else (mmio_write).  A Linux
        boot writes one 40,000 times (hpet_calibrate); vmm/cpu/native/core.c, cmp_take."""
        return REG_TIMER0 + TN_COMPARATOR, TIMER_STRIDE, self._cmp, self._sink_masks

    def _sink_masks(self) -> tuple[int, int]:
        inert = mode32 = 0
        for n in range(NUM_TIMERS):
            conf = self._tconf[n]
            if self._inert(n) and not conf & TN_VAL_SET_CNF:   # a write clears VAL_SET
                inert |= 1 << n
                if conf & TN_32MODE_CNF:
                    mode32 |= 1 << n
        return inert, mode32

    def _counter_at(self, now: int) -> int:
        if self._config & ENABLE_CNF and now > self._sync_tick:
            return (self._counter + now - self._sync_tick) & M64
        return self._counter

    def _timer_index(self, reg: int) -> tuple[int, int] | None:
        if reg < REG_TIMER0:
            return None
        n, sub = divmod(reg - REG_TIMER0, TIMER_STRIDE)
        return (n, sub) if n < NUM_TIMERS else None

    def _read_reg(self, reg: int, now: int) -> int:
        if reg == REG_GCAP_ID:
            return CAPABILITIES
        if reg == REG_GEN_CONF:
            return self._config
        if reg == REG_GINTR_STA:
            return self._status
        if reg == REG_MAIN_CNT:
            return self._counter_at(now)
        t = self._timer_index(reg)
        if t is None:
            return 0   # reserved
        n, sub = t
        if sub == TN_CONF:
            return self._tconf[n] | TN_FIXED_CAPS | self.route_cap << TN_ROUTE_CAP_SHIFT
        if sub == TN_COMPARATOR:
            return self._cmp[n]
        return 0       # FSB route (no FSB delivery) and the reserved quadword

    def _write_reg(self, reg: int, value: int, mask: int) -> None:
        if reg == REG_GEN_CONF:
            # The counter was synced to now by the caller, so halting freezes it
            # there and enabling counts on from it.
            self._config = _merge(self._config, value, mask & GEN_CONF_WRITABLE)
        elif reg == REG_GINTR_STA:
            self._status &= ~(value & mask)
        elif reg == REG_MAIN_CNT:
            if not self._config & ENABLE_CNF:
                self._counter = _merge(self._counter, value, mask)
        else:
            t = self._timer_index(reg)
            if t is None:
                return
            n, sub = t
            if sub == TN_CONF:
                self._write_tconf(n, value, mask)
            elif sub == TN_COMPARATOR:
                self._write_comparator(n, value, mask)

    def _write_tconf(self, n: int, value: int, mask: int) -> None:
        old = self._tconf[n]
        new = _merge(old, value, mask & TN_WRITABLE)
        route = (new & TN_INT_ROUTE_MASK) >> TN_INT_ROUTE_SHIFT
        if not self.route_cap >> route & 1:
            new = _merge(new, old, TN_INT_ROUTE_MASK)
        if old & TN_INT_TYPE_CNF and not new & TN_INT_TYPE_CNF:
            self._status &= ~(1 << n)   # an edge timer has no status bit (QEMU clears it here)
        self._tconf[n] = new
        if new & TN_32MODE_CNF:
            self._cmp[n] &= M32
            self._period[n] &= M32

    def _write_comparator(self, n: int, value: int, mask: int) -> None:
        conf = self._tconf[n]
        if conf & TN_32MODE_CNF:
            mask &= M32            # the high half is not there in 32-bit mode
            if not mask:
                return
        periodic = conf & TN_TYPE_CNF
        if not periodic or conf & TN_VAL_SET_CNF:
            self._cmp[n] = _merge(self._cmp[n], value, mask)
        if periodic:
            self._period[n] = _merge(self._period[n], value, mask)
        self._tconf[n] = conf & ~TN_VAL_SET_CNF

    # -- events -------------------------------------------------------------------
    def _sync(self, now: int) -> list[int]:
        """Account for every event in (sync_tick, now]; the timers that had one, in order."""
        if not self._config & ENABLE_CNF:
            self._sync_tick = now
            return []
        delta = now - self._sync_tick
        if delta <= 0:
            return []
        start = self._counter
        fired = []
        for n in range(NUM_TIMERS):
            conf = self._tconf[n]
            mod = _MOD32 if conf & TN_32MODE_CNF else _MOD64
            first = (self._cmp[n] - start) % mod or mod
            hit = first <= delta
            if hit and conf & TN_TYPE_CNF:
                period = self._period[n] % mod
                matches = 1 + (delta - first) // (period or mod)
                self._cmp[n] = (self._cmp[n] + matches * period) % mod
            elif conf & TN_32MODE_CNF and not conf & TN_TYPE_CNF:
                hit = hit or ((-start) % _MOD32 or _MOD32) <= delta
            if hit:
                fired.append(n)
                if conf & TN_INT_TYPE_CNF:
                    self._status |= 1 << n
        self._counter = (start + delta) & M64
        self._sync_tick = now
        return fired

    def _catch_up(self, now: int) -> None:
        """Before an access: deliver what happened up to this tick, as if the clock had fired."""
        fired = self._sync(now)
        if fired:
            self._arm()
            self._drive(fired)
            self._view_changed()

    def _next_distance(self, n: int, counter: int) -> int | None:
        """Counter increments from ``counter`` to timer n's next event anyone could see."""
        conf = self._tconf[n]
        if conf & TN_INT_TYPE_CNF:
            if self._status >> n & 1:
                return None        # already pending: further events change nothing visible
        elif not conf & TN_INT_ENB_CNF:
            return None            # an edge nobody receives (the accumulator is kept in _sync)
        mod = _MOD32 if conf & TN_32MODE_CNF else _MOD64
        d = (self._cmp[n] - counter) % mod or mod
        if conf & TN_TYPE_CNF:
            step = self._period[n] % mod or mod
            if step < MIN_PERIODIC_TICKS and not conf & TN_INT_TYPE_CNF:
                d += (-(-MIN_PERIODIC_TICKS // step) - 1) * step
        elif conf & TN_32MODE_CNF:
            d = min(d, (-counter) % _MOD32 or _MOD32)
        return d if d < _HORIZON else None

    def _arm(self) -> None:
        """Keep one clock timer at the earliest visible event of any timer."""
        best = None
        if self._config & ENABLE_CNF:
            for n in range(NUM_TIMERS):
                d = self._next_distance(n, self._counter)
                if d is not None and (best is None or d < best):
                    best = d
        deadline = None if best is None else self._sync_tick + best
        self._timer = rearm(self._clock, self._timer, deadline, self._on_timer, self.name)

    def _on_timer(self, now: int) -> None:
        self._timer = None
        fired = self._sync(now)
        self._arm()
        self._drive(fired)
        self._view_changed()

    # -- interrupt outputs (2.4) --------------------------------------------------
    def _route_line(self, route: int) -> IrqLine | None:
        if route not in self._lines:
            self._lines[route] = self._route_irq(route)
        return self._lines[route]

    def _target(self, n: int) -> IrqLine | None:
        if self._config & LEG_RT_CNF and n < 2:
            return self._irq0 if n == 0 else self._irq8
        return self._route_line((self._tconf[n] & TN_INT_ROUTE_MASK) >> TN_INT_ROUTE_SHIFT)

    def _output_levels(self) -> list[tuple[IrqLine, bool]]:
        """Every wire this device drives, with the OR of what is routed to it."""
        out: dict[int, list] = {}

        def drive(line: IrqLine | None, level: bool) -> None:
            if line is not None:
                slot = out.setdefault(id(line), [line, False])
                slot[1] = slot[1] or level

        legacy = bool(self._config & LEG_RT_CNF)
        drive(self._irq0, not legacy and self._pit_level)
        drive(self._irq8, not legacy and self._rtc_level)
        for route in sorted(self._lines):
            drive(self._lines[route], False)   # a route left behind goes low
        enabled = bool(self._config & ENABLE_CNF)
        for n in range(NUM_TIMERS):
            conf = self._tconf[n]
            drive(self._target(n), enabled and bool(conf & TN_INT_TYPE_CNF) and bool(conf & TN_INT_ENB_CNF)
                  and bool(self._status >> n & 1))
        return [(line, level) for line, level in out.values()]

    def _drive(self, fired: list[int] | tuple[()]) -> None:
        """Set every level output, then pulse the edge timers that fired (last, for re-entrant sinks)."""
        for line, level in self._output_levels():
            line.set(level)
        if not self._config & ENABLE_CNF:
            return
        for n in fired:
            conf = self._tconf[n]
            if conf & TN_INT_ENB_CNF and not conf & TN_INT_TYPE_CNF:
                line = self._target(n)
                # A wire held high by a level source shows no edge (wired OR).
                if line is not None and not line.level:
                    line.pulse()

    def __repr__(self) -> str:
        return (f"Hpet({self.name!r}, config={self._config:#x}, counter={self.counter():#x}, "
                f"status={self._status:#x})")


__all__ = ["CAPABILITIES", "COUNTER_CLK_PERIOD_FS", "COUNTER_HZ", "DEFAULT_ROUTE_CAP", "HPET_BASE",
           "HPET_WINDOW", "Hpet", "NUM_TIMERS"]
