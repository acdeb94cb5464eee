"""Intel 8254 programmable interval timer and the PC's system control port B (0x61).

Implements, from the Intel 8254 datasheet (order no. 231164):
- "Control Word Format" (SC, RW, M, BCD) written to port 0x43;
- "Write Operations": counts written as LSB only, MSB only, or LSB then MSB
  (one write flip-flop per counter; the first byte of a two-byte count stops
  a mode 0 counter and drives OUT low);
- "Read Operations": simple reads of the live count, the Counter Latch
  Command, the Read-Back Command and the Status Byte (OUT, NULL COUNT, RW,
  M2-M0 exactly as written, BCD), with "all but the first latch are ignored"
  and "status is read before the count" rules; reads and writes of the same
  counter may interleave (one read and one write flip-flop per counter);
- "Mode Definitions" 0-5 (modes 6 and 7 are 2 and 3), "Gate" (Table 4, the
  GATE pin operations summary), "Minimum and Maximum Initial Counts"
  (a count of 0 is 2**16 binary or 10**4 BCD), decade (BCD) counting.

Port 0x61 follows the IBM PC/AT Technical Reference, system board I/O port
61h: bit 0 timer 2 gate, bit 1 speaker data, bits 2-3 parity/channel-check
enables (read back), bit 4 refresh request toggle (every 15.085 us), bit 5
timer 2 OUT, bits 6-7 parity and I/O channel check (never set here).

Time.  The 8254 CLK runs at 1,193,182 Hz from a free-running oscillator; CLK
pulse ``k`` (counted from guest tick 0) falls at the first guest tick ``T``
with ``T * PIT_HZ // TICK_HZ >= k``.  Every quantity is an exact integer
function of that pulse index, so there is no cumulative drift and an
evaluation at ``clock.now()`` is exact for every mode.

Each counter is described piecewise: before ``load_at`` it holds
``frozen_ce``/``frozen_out``; from pulse ``load_at`` it counts a segment of
count ``n`` with ``d = d0 + (t - load_at)`` decrementing pulses at pulse
``t`` (``d`` stays ``d0`` while the gate stops counting); a mode 2/3 count
written while counting is a second segment starting at ``next_at``.  Any
access that changes a counter first pins the current state, so no event is
ever simulated per CLK pulse.  Only counter 0 drives an interrupt line, and
only its OUT transitions are put on the clock as timers (two per period in
modes 2 and 3).

Deliberately not modelled: CLK pulses slower than the gate (the gate is
sampled at the next CLK pulse, as the datasheet says, with no setup-time
window), the undefined contents of a counter before its first count, and
decade counting from invalid BCD digits (digits above 9 count at face value
and reads show the remaining count modulo 10000 in valid BCD).
"""
from __future__ import annotations

from devices.base import SIZE_MASK, DeviceStateError, IrqLine, State, check_state
from devices.clock import TICK_HZ, Timer, VirtualClock

PIT_HZ = 1_193_182
PIT_BASE = 0x40
PORT_B = 0x61
# 15.085 us between refresh-request toggles, in 10 ns ticks: 1508.5 = 3017 / 2.
_REFRESH_NUM = 2
_REFRESH_DEN = 3017

NEVER = 1 << 62  # a pulse index no guest reaches: "not scheduled"

_CHANNEL_FIELDS = (
    "mode_bits", "rw", "bcd", "gate", "cr", "have_cr", "wff", "wlsb", "rff",
    "latch", "latch_status", "frozen_ce", "frozen_out", "load_at", "n", "d0", "run",
    "next_at", "next_n", "next_d0", "null_until", "trig_at",
)
_PULSE_FIELDS = ("load_at", "next_at", "null_until", "trig_at")


def pulse_index(tick: int) -> int:
    """Number of 8254 CLK pulses that have occurred by guest tick ``tick``."""
    return tick * PIT_HZ // TICK_HZ


def pulse_tick(k: int) -> int:
    """The guest tick at which CLK pulse ``k`` occurs."""
    return -((-k * TICK_HZ) // PIT_HZ)


def _bcd_decode(raw: int) -> int:
    return ((raw >> 12) & 0xF) * 1000 + ((raw >> 8) & 0xF) * 100 + ((raw >> 4) & 0xF) * 10 + (raw & 0xF)


def _bcd_encode(v: int) -> int:
    return ((v // 1000) % 10) << 12 | ((v // 100) % 10) << 8 | ((v // 10) % 10) << 4 | (v % 10)


class _Channel:
    __slots__ = ("index", "mode") + _CHANNEL_FIELDS

    def __init__(self, index: int) -> None:
        self.index = index
        self.reset()

    def reset(self) -> None:
        # Power-on contents are undefined; start as if control word "mode 0,
        # LSB then MSB, binary" had been written: OUT low, no count, quiet.
        self.mode_bits = 0
        self.mode = 0
        self.rw = 3
        self.bcd = False
        self.gate = self.index != 2  # counters 0 and 1 have GATE tied high on a PC
        self.cr = 0
        self.have_cr = False
        self.wff = False
        self.wlsb = 0
        self.rff = False
        self.latch = -1
        self.latch_status = -1
        self.frozen_ce = 0
        self.frozen_out = False
        self.load_at = NEVER
        self.n = 0x10000
        self.d0 = 0
        self.run = False
        self.next_at = NEVER
        self.next_n = 0x10000
        self.next_d0 = 0
        self.null_until = NEVER
        self.trig_at = NEVER

    def count_of(self, raw: int) -> int:
        if self.bcd:
            return _bcd_decode(raw) or 10000
        return raw or 0x10000

    # -- the waveform, as a function of the CLK pulse index ----------------
    def state_at(self, t: int) -> tuple[int, bool]:
        """(counting element value, OUT) after CLK pulse ``t``."""
        if t >= self.next_at:
            n, d, run = self.next_n, self.next_d0 + (t - self.next_at), True
        elif t >= self.load_at:
            n, run = self.n, self.run
            d = self.d0 + (t - self.load_at) if run else self.d0
        else:
            return self.frozen_ce, self.frozen_out
        m = 10000 if self.bcd else 0x10000
        mode = self.mode
        if mode <= 1:
            return (n - d) % m, d >= n
        if mode >= 4:
            return (n - d) % m, d != n
        p = d % n
        if mode == 2:
            return (n - p) % m, p != n - 1 or not run
        hi = (n + 1) >> 1
        q = p if p < hi else p - hi
        v = (n - 2 * q) if not n & 1 else (n - 1 - 2 * q)
        return v % m, p < hi or not run

    def _seg_next_change(self, n: int, d: int, run: bool, t: int) -> int | None:
        if not run:
            return None
        mode = self.mode
        if mode <= 1:
            return t + (n - d) if d < n else None
        if mode >= 4:
            if d < n:
                return t + (n - d)
            return t + 1 if d == n else None
        if n == 1:
            return None
        p = d % n
        if mode == 2:
            return t + 1 if p == n - 1 else t + (n - 1 - p)
        hi = (n + 1) >> 1
        return t + (hi - p) if p < hi else t + (n - p)

    def next_edge(self, c: int) -> int | None:
        """The first CLK pulse after ``c`` at which OUT changes, or None."""
        out_c = self.state_at(c)[1]
        t = c
        if t < self.load_at:
            if self.load_at >= NEVER:
                return None
            t = self.load_at
            if self.state_at(t)[1] != out_c:
                return t
        if t < self.next_at:
            d = self.d0 + (t - self.load_at) if self.run else self.d0
            k = self._seg_next_change(self.n, d, self.run, t)
            if self.next_at >= NEVER or (k is not None and k < self.next_at):
                return k
            t = self.next_at
            if self.state_at(t)[1] != out_c:
                return t
        d = self.next_d0 + (t - self.next_at)
        return self._seg_next_change(self.next_n, d, True, t)

    def d_at(self, c: int) -> int:
        return self.d0 + (c - self.load_at) if self.run else self.d0

    def sync(self, c: int) -> None:
        """Fold a pending mode 2/3 reload that has already happened into the segment."""
        if c >= self.next_at:
            self.load_at, self.n, self.d0, self.run = self.next_at, self.next_n, self.next_d0, True
            self.next_at = NEVER

    def freeze(self, c: int) -> None:
        self.frozen_ce, self.frozen_out = self.state_at(c)

    def status(self, c: int) -> int:
        out = self.state_at(c)[1]
        return (out << 7) | ((c < self.null_until) << 6) | (self.rw << 4) | (self.mode_bits << 1) | self.bcd

    def latched_value(self, c: int) -> int:
        v = self.state_at(c)[0]
        return _bcd_encode(v) if self.bcd else v

    # -- events, each at CLK pulse index c (the last pulse that has occurred) --
    def control_word(self, value: int, c: int) -> None:
        self.sync(c)
        self.freeze(c)
        self.mode_bits = (value >> 1) & 7
        self.mode = self.mode_bits & 3 if self.mode_bits & 2 else self.mode_bits
        self.rw = (value >> 4) & 3
        self.bcd = bool(value & 1)
        self.frozen_out = self.mode != 0
        self.load_at = NEVER
        self.next_at = NEVER
        self.null_until = NEVER
        self.trig_at = NEVER
        self.have_cr = False
        self.wff = False
        self.rff = False
        self.latch = -1
        self.latch_status = -1

    def write_byte(self, value: int, c: int) -> None:
        rw = self.rw
        if rw == 1:
            self.load_count(value, c)
        elif rw == 2:
            self.load_count(value << 8, c)
        elif not self.wff:
            self.wff = True
            self.wlsb = value
            if self.mode == 0:
                # The first byte of a mode 0 count stops counting and drives OUT low.
                self.sync(c)
                self.freeze(c)
                self.frozen_out = False
                if c < self.load_at < NEVER:
                    self.null_until = NEVER  # the pending load is abandoned, not done
                self.load_at = NEVER
        else:
            self.wff = False
            self.load_count(self.wlsb | value << 8, c)

    def load_count(self, raw: int, c: int) -> None:
        self.sync(c)
        n = self.count_of(raw)
        self.cr = raw
        self.have_cr = True
        mode = self.mode
        if mode == 0 or mode == 4:
            self.freeze(c)
            if mode == 0:
                self.frozen_out = False
            self._start(n, c + 1, self.gate)
        elif mode == 1 or mode == 5:
            if c < self.load_at < NEVER:
                self.n = n  # a trigger in this same CLK period loads the newest count
                self.null_until = self.load_at
            elif c < self.trig_at < NEVER:
                self.freeze(c)
                self._start(n, self.trig_at, True)
            else:
                self.null_until = NEVER  # waits for the next trigger
        elif self.load_at >= NEVER:
            self.freeze(c)
            self._start(n, c + 1, self.gate)
        elif c < self.load_at:
            self.n = n
            self.null_until = self.load_at
        elif not self.run:
            self.null_until = NEVER  # loaded by the next rising edge of GATE
        elif c < self.next_at < NEVER:
            self.next_n = n
            if self.next_d0:
                self.next_d0 = (n + 1) >> 1
        else:
            # Modes 2/3: the current period (mode 2) or half-cycle (mode 3) runs out first.
            d = self.d_at(c)
            cur = self.n
            p = d % cur
            if mode == 2:
                self.next_at, self.next_d0 = c + (cur - p), 0
            else:
                hi = (cur + 1) >> 1
                if p < hi:
                    self.next_at, self.next_d0 = c + (hi - p), (n + 1) >> 1
                else:
                    self.next_at, self.next_d0 = c + (cur - p), 0
            self.next_n = n
            self.null_until = self.next_at

    def _start(self, n: int, at: int, run: bool) -> None:
        self.load_at = at
        self.n = n
        self.d0 = 0
        self.run = run
        self.next_at = NEVER
        self.null_until = at

    def set_gate(self, level: bool, c: int) -> None:
        if level == self.gate:
            return
        self.sync(c)
        self.gate = level
        mode = self.mode
        if mode == 1 or mode == 5:
            if level and not self.have_cr:
                self.trig_at = c + 1  # the edge is sampled at the next CLK; a count may still come
            elif level:
                self.freeze(c)
                null = c < self.null_until
                self._start(self.count_of(self.cr), c + 1, True)
                if not null:
                    self.null_until = 0
            return
        if self.load_at >= NEVER:
            return
        if mode == 0 or mode == 4:
            if c >= self.load_at:
                self.d0 = self.d_at(c)
                self.load_at = c
            self.run = level
            return
        # Modes 2/3: low stops counting and forces OUT high at once; a rising edge reloads.
        if not level:
            if c >= self.load_at:
                self.d0 = self.d_at(c)
                self.load_at = c
            else:
                self.frozen_out = True
            self.run = False
            if self.next_at < NEVER:
                self.next_at = NEVER
                self.null_until = NEVER
        else:
            self.freeze(c)
            null = c < self.null_until
            self._start(self.count_of(self.cr), c + 1, True)
            if not null:
                self.null_until = 0

    def read_byte(self, c: int) -> int:
        if self.latch_status >= 0:
            s = self.latch_status
            self.latch_status = -1
            return s
        latched = self.latch >= 0
        val = self.latch if latched else self.latched_value(c)
        rw = self.rw
        if rw == 1:
            self.latch = -1
            return val & 0xFF
        if rw == 2:
            self.latch = -1
            return (val >> 8) & 0xFF
        if not self.rff:
            self.rff = True
            return val & 0xFF
        self.rff = False
        self.latch = -1
        return (val >> 8) & 0xFF


class Pit8254:
    """The PC's 8254 at ports 0x40-0x43; counter 0 OUT drives ``irq0``.

    The machine registers ``io_ranges`` on the port bus and connects ``irq0``
    to the PIC's IR0.  Port 0x61 (``SystemControlB``) drives counter 2's gate
    through ``set_gate`` and reads its OUT through ``out``.
    """

    kind = "pit8254"

    def __init__(self, clock: VirtualClock, irq0: IrqLine, name: str = "pit") -> None:
        self.name = name
        self.io_ranges: list[tuple[int, int]] = [(PIT_BASE, 4)]
        self.clock = clock
        self.irq0 = irq0
        self.channels = [_Channel(0), _Channel(1), _Channel(2)]
        self._timer: Timer | None = None
        self._edge_pulse = NEVER
        self.irq0.set(False)

    # -- Device --------------------------------------------------------------
    def reset(self) -> None:
        self._cancel_timer()
        for ch in self.channels:
            ch.reset()
        self.irq0.set(False)

    def save_state(self) -> State:
        chans = []
        for ch in self.channels:
            d = {}
            for f in _CHANNEL_FIELDS:
                v = getattr(ch, f)
                d[f] = None if f in _PULSE_FIELDS and v >= NEVER else v
            chans.append(d)
        timer = self._timer is not None and self._timer.active
        return {
            "kind": self.kind,
            "version": 1,
            "channels": chans,
            "irq0_level": bool(self.irq0.level),
            "timer_deadline": self._timer.deadline if timer else None,
            "timer_pulse": self._edge_pulse if timer else None,
        }

    def load_state(self, state: State) -> None:
        check_state(state, self.kind, 1)
        try:
            chans = state["channels"]
            if not isinstance(chans, list) or len(chans) != 3:
                raise DeviceStateError(f"{self.kind}: 'channels' must be a list of 3")
            parsed = []
            for i, d in enumerate(chans):
                ch = _Channel(i)
                for f in _CHANNEL_FIELDS:
                    v = d[f]
                    if f in _PULSE_FIELDS and v is None:
                        v = NEVER
                    if type(v) not in (int, bool):
                        raise DeviceStateError(f"{self.kind}: channel {i} field {f!r} is not an int")
                    setattr(ch, f, type(getattr(ch, f))(v))
                if not (0 <= ch.mode_bits <= 7 and 1 <= ch.rw <= 3 and 0 <= ch.cr <= 0xFFFF
                        and 1 <= ch.n and 1 <= ch.next_n and -1 <= ch.latch <= 0xFFFF
                        and -1 <= ch.latch_status <= 0xFF and 0 <= ch.wlsb <= 0xFF):
                    raise DeviceStateError(f"{self.kind}: channel {i} has out-of-range fields")
                ch.mode = ch.mode_bits & 3 if ch.mode_bits & 2 else ch.mode_bits
                parsed.append(ch)
            level = state["irq0_level"]
            deadline = state["timer_deadline"]
            pulse = state["timer_pulse"]
            if (deadline is None) != (pulse is None):
                raise DeviceStateError(f"{self.kind}: timer deadline and pulse must both be set or unset")
            if deadline is not None and (type(deadline) is not int or type(pulse) is not int):
                raise DeviceStateError(f"{self.kind}: timer fields must be ints")
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, DeviceStateError):
                raise
            raise DeviceStateError(f"{self.kind}: malformed state ({e!r})") from e
        self._cancel_timer()
        self.channels = parsed
        self.irq0.level = bool(level)
        if deadline is not None:
            self._edge_pulse = pulse
            self._timer = self.clock.schedule(deadline, self._on_edge, "pit-ch0")

    # -- wiring --------------------------------------------------------------
    def set_gate(self, channel: int, level: bool) -> None:
        """Drive the GATE input of ``channel`` (port 0x61 bit 0 drives counter 2)."""
        if not 0 <= channel <= 2:
            return
        now = self.clock.now()
        c = now * PIT_HZ // TICK_HZ
        if channel == 0:
            self._catch_up(c)
        self.channels[channel].set_gate(bool(level), c)
        if channel == 0:
            self._rearm(c)

    def out(self, channel: int) -> bool:
        """The OUT pin of ``channel`` at ``clock.now()``."""
        return self.channels[channel].state_at(self.clock.now() * PIT_HZ // TICK_HZ)[1]

    def program_pc_defaults(self) -> None:
        """Program what a PC BIOS leaves behind: counter 0 mode 3 at 18.2 Hz, counter 1 mode 2 count 18."""
        for port, value in ((0x43, 0x36), (0x40, 0), (0x40, 0), (0x43, 0x54), (0x41, 18)):
            self.io_write(port, 1, value)

    # -- port I/O ------------------------------------------------------------
    def io_read(self, port: int, size: int) -> int:
        if size == 1:
            return self._read_byte(port)
        v = 0
        for i in range(size if size in SIZE_MASK else 1):
            v |= self._read_byte(port + i) << (8 * i)
        return v

    def io_write(self, port: int, size: int, value: int) -> None:
        if size == 1:
            self._write_byte(port, value & 0xFF)
            return
        for i in range(size if size in SIZE_MASK else 1):
            self._write_byte(port + i, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, port: int) -> int:
        off = port - PIT_BASE
        if not 0 <= off <= 2:
            return 0xFF  # the control word register is write-only
        return self.channels[off].read_byte(self.clock.now() * PIT_HZ // TICK_HZ)

    def _write_byte(self, port: int, value: int) -> None:
        off = port - PIT_BASE
        if not 0 <= off <= 3:
            return
        c = self.clock.now() * PIT_HZ // TICK_HZ
        if off < 3:
            if off == 0:
                self._catch_up(c)
            self.channels[off].write_byte(value, c)
            if off == 0:
                self._rearm(c)
            return
        sc = value >> 6
        if sc == 3:
            self._read_back(value, c)
            return
        ch = self.channels[sc]
        if not value & 0x30:
            if ch.latch < 0:
                ch.sync(c)
                ch.latch = ch.latched_value(c)
            return
        if sc == 0:
            self._catch_up(c)
        ch.control_word(value, c)
        if sc == 0:
            self._rearm(c)

    def _read_back(self, value: int, c: int) -> None:
        for i in range(3):
            if not value & (2 << i):
                continue
            ch = self.channels[i]
            ch.sync(c)
            # Status is taken before the count, so both describe the same instant.
            if not value & 0x10 and ch.latch_status < 0:
                ch.latch_status = ch.status(c)
            if not value & 0x20 and ch.latch < 0:
                ch.latch = ch.latched_value(c)

    # -- counter 0 -> IRQ0 ---------------------------------------------------
    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._edge_pulse = NEVER

    def _catch_up(self, c: int) -> None:
        # An edge already due but not yet fired (the vCPU stopped late) is delivered
        # before the access that follows it, so no OUT pulse is ever lost.
        while self._timer is not None and self._edge_pulse <= c:
            self._timer.cancel()
            self._fire(self._edge_pulse)

    def _rearm(self, c: int) -> None:
        self._cancel_timer()
        ch = self.channels[0]
        self.irq0.set(ch.state_at(c)[1])
        self._schedule_after(ch, c)

    def _schedule_after(self, ch: _Channel, c: int) -> None:
        k = ch.next_edge(c)
        if k is None:
            self._timer = None
            self._edge_pulse = NEVER
        else:
            self._edge_pulse = k
            self._timer = self.clock.schedule(pulse_tick(k), self._on_edge, "pit-ch0")

    def _fire(self, k: int) -> None:
        ch = self.channels[0]
        ch.sync(k)
        self.irq0.set(ch.state_at(k)[1])
        self._schedule_after(ch, k)

    def _on_edge(self, now: int) -> None:
        self._timer = None
        self._fire(self._edge_pulse)


class SystemControlB:
    """PC/AT port 0x61: counter 2 gate and speaker enable, refresh toggle, counter 2 OUT."""

    kind = "port61"

    def __init__(self, pit: Pit8254, name: str = "port61") -> None:
        self.name = name
        self.io_ranges: list[tuple[int, int]] = [(PORT_B, 1)]
        self.pit = pit
        self.clock = pit.clock
        self.value = 0

    def reset(self) -> None:
        # The PIT's own reset drops counter 2's gate, matching bit 0 = 0 here.
        self.value = 0

    def save_state(self) -> State:
        return {"kind": self.kind, "version": 1, "value": self.value}

    def load_state(self, state: State) -> None:
        check_state(state, self.kind, 1)
        v = state.get("value")
        if type(v) is not int or not 0 <= v <= 0x0F:
            raise DeviceStateError(f"{self.kind}: 'value' must be an int in 0..15")
        self.value = v

    @property
    def speaker_enabled(self) -> bool:
        """Bit 1: counter 2 OUT reaches the speaker."""
        return bool(self.value & 2)

    def _read_byte(self) -> int:
        now = self.clock.now()
        pit2 = self.pit.channels[2]
        out = pit2.state_at(now * PIT_HZ // TICK_HZ)[1]
        return self.value | ((now * _REFRESH_NUM // _REFRESH_DEN) & 1) << 4 | out << 5

    def io_read(self, port: int, size: int) -> int:
        if size == 1 and port == PORT_B:
            return self._read_byte()
        v = 0
        for i in range(size if size in SIZE_MASK else 1):
            v |= (self._read_byte() if port + i == PORT_B else 0xFF) << (8 * i)
        return v

    def io_write(self, port: int, size: int, value: int) -> None:
        if not 0 <= PORT_B - port < (size if size in SIZE_MASK else 1):
            return
        v = (value >> (8 * (PORT_B - port))) & 0x0F
        old = self.value
        self.value = v
        if (old ^ v) & 1:
            self.pit.set_gate(2, bool(v & 1))
