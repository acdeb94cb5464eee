"""Motorola MC146818A real-time clock with CMOS RAM, as wired in a PC/AT.

Implements, from the MC146818A datasheet (Motorola, "MC146818A Real-Time
Clock Plus RAM"):

* Address map: 64 bytes in the part, 128 in PC chipsets -- 0x00-0x09 time,
  calendar and alarm, 0x0A-0x0D registers A-D, the rest battery-backed RAM.
* Time, calendar and alarm locations: BCD or binary data mode (DM), 12- or
  24-hour mode (24/12; in 12-hour mode bit 7 of the hours byte is PM), the
  "don't care" alarm code (any byte 0xC0-0xFF), day of week 1-7 with
  Sunday = 1.
* Register A: UIP (set t_BUC = 244 us before each update), DV2-DV0 divider
  control (010 = 32.768 kHz time base, 11x = divider chain held in reset;
  the first update comes one half second after the reset is removed),
  RS3-RS0 periodic rate (Table "Periodic interrupt rate and square-wave output
  frequency", 32.768 kHz column: rates 3-15 give 32768 >> (rate - 1) Hz,
  rates 1 and 2 give 256 Hz and 128 Hz like rates 8 and 9).
* Register B: SET (inhibits updates so the program can initialise the time;
  writing SET = 1 clears UIE and UIP), PIE, AIE, UIE, SQWE, DM, 24/12, DSE.
* Register C: IRQF, PF, AF, UF; the flags are set whatever the enable bits,
  IRQF = PF.PIE + AF.AIE + UF.UIE drives the IRQ pin, and reading C clears
  every flag and releases the pin.
* Register D: VRT, always 1 (the battery never runs down here).
* "Update cycle" and "Interrupts": once a second the time advances, the alarm
  bytes are compared (AF) and UF is set.
* RESET pin (``reset()``): clears PIE, AIE, UIE, SQWE and all of register C;
  time, register A, the other B bits and the RAM are kept.

PC specifics (IBM PC/AT Technical Reference, "Real-time clock and CMOS RAM"):
port 0x70 selects the byte (bits 0-6) and masks NMI (bit 7, write-only latch,
reads return 0xFF); port 0x71 is data; the century is kept in BCD at 0x32;
the BIOS memory-size bytes and the 0x10-0x2D checksum at 0x2E/0x2F.

Time model.  The RTC never reads host time: the machine passes
``start_epoch`` (Unix seconds, recorded in the replay log) and the counters
show ``start_epoch + clock.now() // TICK_HZ`` until the guest sets them.  The
running time is kept as one integer ``offset`` plus the tick ``divider_ref``
at which the 32.768 kHz divider chain was at zero, so everything below is
exact integer tick arithmetic; one second is exactly TICK_HZ ticks and one
oscillator cycle TICK_HZ / 32768 ticks (kept as a rational, never a float).
While SET = 1 or the divider is stopped the time bytes are ordinary RAM
holding whatever was last shown or written; when counting resumes they are
read back into ``offset``.  Flags that no enabled interrupt needs are computed
lazily, when register C is read; a clock timer is armed only for an enabled
source, and only while the IRQ pin is released.

Deliberately left out: daylight-saving updates (DSE is stored, never
applied; PC firmware keeps it 0), the square-wave pin (SQWE stored), the
4.194304 / 1.048576 MHz time bases and the factory-test divider codes (with
the PC's 32.768 kHz crystal any DV other than 010 stops the clock, and going
back to 010 restarts the divider like a reset), the 1948 us duration of the
update cycle (the update is instantaneous at the second boundary), and the
hardware's keeping of the raw bytes when DM or 24/12 is changed while the
clock runs (here the running time is re-encoded in the new mode).  Invalid
values the guest writes (BCD digits above 9, day 31 of February, ...) are
normalised into the calendar when counting resumes; the year follows the
Gregorian calendar (2100 is not a leap year, unlike the part's
divisible-by-four rule).
"""
from __future__ import annotations

from devices.base import DeviceStateError, IrqLine, State, check_state
from devices.clock import TICK_HZ, VirtualClock

KIND = "rtc146818"
VERSION = 1

INDEX_PORT = 0x70
DATA_PORT = 0x71

OSC_HZ = 32768
UIP_TICKS = TICK_HZ * 244 // 1_000_000  # t_BUC: UIP leads the update by 244 us
CMOS_SIZE = 128

# Clock and calendar bytes.
REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_DAY_OF_WEEK = 0x06
REG_DAY_OF_MONTH = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D

# PC CMOS layout (IBM PC/AT and its successors).
CMOS_SHUTDOWN_STATUS = 0x0F
CMOS_FLOPPY_TYPES = 0x10
CMOS_HARD_DISK_TYPES = 0x12
CMOS_EQUIPMENT = 0x14
CMOS_BASE_MEM_LO = 0x15
CMOS_BASE_MEM_HI = 0x16
CMOS_EXT_MEM_LO = 0x17
CMOS_EXT_MEM_HI = 0x18
CMOS_CHECKSUM_HI = 0x2E
CMOS_CHECKSUM_LO = 0x2F
CMOS_EXT_MEM2_LO = 0x30
CMOS_EXT_MEM2_HI = 0x31
CMOS_CENTURY = 0x32
CMOS_MEM_ABOVE_16M_LO = 0x34
CMOS_MEM_ABOVE_16M_HI = 0x35
CMOS_MEM_ABOVE_4G = 0x5B  # three bytes, 0x5B-0x5D, 64 KiB units
CHECKSUM_FIRST = 0x10
CHECKSUM_LAST = 0x2D

A_UIP = 0x80
A_DV_MASK = 0x70
A_RS_MASK = 0x0F
DV_32K = 0x20

B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_SQWE = 0x08
B_DM = 0x04  # 1 = binary
B_24H = 0x02
B_DSE = 0x01

C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10

D_VRT = 0x80

POWER_ON_A = DV_32K | 0x06  # 32.768 kHz time base, 1024 Hz: what PC firmware programs
POWER_ON_B = B_24H  # 24-hour BCD, no interrupts

DONT_CARE = 0xC0

# Periodic tap in oscillator cycles per RS value (0 = off).
_PERIOD_CYCLES = (0, 128, 256) + tuple(1 << (rs - 1) for rs in range(3, 16))

# The counting bytes and their slot in an encoded time tuple.
_TIME_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_DAY_OF_WEEK, REG_DAY_OF_MONTH,
              REG_MONTH, REG_YEAR, CMOS_CENTURY)
_TIME_SLOT = [-1] * CMOS_SIZE
for _slot, _reg in enumerate(_TIME_REGS):
    _TIME_SLOT[_reg] = _slot
del _slot, _reg
_ALARM_REGS = (REG_SECONDS_ALARM, REG_MINUTES_ALARM, REG_HOURS_ALARM)

_DAY = 86400
_UNIX_DAY0_DOW = 4  # 1970-01-01 was a Thursday; 0 = Sunday


# -- calendar arithmetic (proleptic Gregorian, any integer day) -------------------
def days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a Gregorian date (month 1-12, any day offset)."""
    y = year - (1 if month <= 2 else 0)
    era = y // 400
    yoe = y - era * 400  # 0..399
    mp = (month + 9) % 12  # March = 0: the leap day falls at the end of the year
    doy = (153 * mp + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def civil_from_days(days: int) -> tuple[int, int, int]:
    """(year, month, day) of a count of days since 1970-01-01."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097  # 0..146096
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (1 if month <= 2 else 0), month, day


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(byte: int) -> int:
    # Digits above 9 are not rejected: the part would count them anyway.
    return (byte >> 4) * 10 + (byte & 0x0F)


def _encode_hour(hour: int, binary: bool, h24: bool) -> int:
    if h24:
        return hour if binary else _bcd(hour)
    h12 = hour % 12 or 12
    return (h12 if binary else _bcd(h12)) | (0x80 if hour >= 12 else 0)


def _next_alarm_at_or_after(hours: list[int], mins: list[int], secs: list[int], x: int) -> int | None:
    """Smallest second of the day >= x matching the alarm sets, or None."""
    xh, rem = divmod(x, 3600)
    xm, xs = divmod(rem, 60)
    for h in hours:
        if h < xh:
            continue
        if h > xh:
            return h * 3600 + mins[0] * 60 + secs[0]
        for m in mins:
            if m < xm:
                continue
            if m > xm:
                return h * 3600 + m * 60 + secs[0]
            for s in secs:
                if s >= xs:
                    return h * 3600 + m * 60 + s
    return None


class Rtc146818:
    """MC146818A RTC + 128 bytes of CMOS RAM at ports 0x70/0x71, IRQ 8."""

    kind = KIND

    def __init__(self, clock: VirtualClock, irq8: IrqLine, start_epoch: int, name: str = "rtc") -> None:
        self.name = name
        self.io_ranges: list[tuple[int, int]] = [(INDEX_PORT, 2)]
        self.start_epoch = int(start_epoch)
        self._clock = clock
        self._irq = irq8
        self._timer = None
        self._regs = bytearray(CMOS_SIZE)
        self._regs[REG_A] = POWER_ON_A
        self._regs[REG_B] = POWER_ON_B
        self._index = 0
        self._nmi_disabled = False
        # The divider was at zero at tick 0, when the counters showed start_epoch.
        self._div_running = True
        self._div_ref = 0
        self._offset = self.start_epoch
        self._dow_adjust = 0  # guest-written day of week minus the calendar's
        self._flags = 0
        self._sync_tick = clock.now()
        self._enc_key: tuple[int, int, int] | None = None
        self._enc_val: tuple[int, ...] = ()
        self._alarm_key: tuple[int, int, int, int] | None = None
        self._alarm_val: tuple[list[int], list[int], list[int]] | None = None

    # -- Device protocol ----------------------------------------------------------
    def reset(self) -> None:
        """The RESET pin: interrupt enables and flags clear, time and RAM survive."""
        now = self._clock.now()
        self._sync(now)
        self._regs[REG_B] &= ~(B_PIE | B_AIE | B_UIE | B_SQWE) & 0xFF
        self._flags = 0
        self._refresh(now)

    def save_state(self) -> State:
        t = self._timer
        armed = t is not None and t.active
        return {
            "kind": KIND,
            "version": VERSION,
            "regs": bytes(self._regs),
            "index": self._index,
            "nmi_disabled": self._nmi_disabled,
            "divider_running": self._div_running,
            "divider_ref": self._div_ref,
            "offset": self._offset,
            "dow_adjust": self._dow_adjust,
            "flags": self._flags,
            "sync_tick": self._sync_tick,
            "timer_armed": armed,
            "timer_deadline": t.deadline if armed else 0,
            "irq_level": bool(self._irq.level),
            "start_epoch": self.start_epoch,
        }

    def load_state(self, state: State) -> None:
        check_state(state, KIND, VERSION)
        regs = state.get("regs")
        if isinstance(regs, list) and all(isinstance(b, int) and 0 <= b <= 0xFF for b in regs):
            regs = bytes(regs)
        if not isinstance(regs, (bytes, bytearray)) or len(regs) != CMOS_SIZE:
            raise DeviceStateError(f"{KIND}: regs must be {CMOS_SIZE} bytes")

        def integer(key: str, lo: int | None = None, hi: int | None = None) -> int:
            v = state.get(key)
            if not isinstance(v, int) or isinstance(v, bool):
                raise DeviceStateError(f"{KIND}: {key} must be an int, not {type(v).__name__}")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise DeviceStateError(f"{KIND}: {key}={v} is out of range")
            return v

        def boolean(key: str) -> bool:
            v = state.get(key)
            if not isinstance(v, bool):
                raise DeviceStateError(f"{KIND}: {key} must be a bool")
            return v

        index = integer("index", 0, CMOS_SIZE - 1)
        nmi = boolean("nmi_disabled")
        div_running = boolean("divider_running")
        div_ref = integer("divider_ref")
        offset = integer("offset")
        dow_adjust = integer("dow_adjust", 0, 6)
        flags = integer("flags", 0, 0xFF)
        if flags & ~(C_PF | C_AF | C_UF):
            raise DeviceStateError(f"{KIND}: flags {flags:#x} has bits outside PF/AF/UF")
        sync_tick = integer("sync_tick")
        armed = boolean("timer_armed")
        deadline = integer("timer_deadline")
        level = boolean("irq_level")
        start_epoch = integer("start_epoch")

        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._regs = bytearray(regs)
        self._index = index
        self._nmi_disabled = nmi
        self._div_running = div_running
        self._div_ref = div_ref
        self._offset = offset
        self._dow_adjust = dow_adjust
        self._flags = flags
        self._sync_tick = sync_tick
        self.start_epoch = start_epoch
        self._enc_key = None
        self._alarm_key = None
        if armed:
            self._timer = self._clock.schedule(deadline, self._on_timer, "rtc")
        self._irq.level = level  # silently: a restore raises no interrupt

    # -- port I/O -----------------------------------------------------------------
    def io_read(self, port: int, size: int) -> int:
        if size == 1:
            return self._read_reg(self._index, False) if port == DATA_PORT else 0xFF
        # A wide access is split into byte cycles on the ISA bus, one per port.
        value = 0
        for i in range(size):
            b = self._read_reg(self._index, False) if port + i == DATA_PORT else 0xFF
            value |= b << (8 * i)
        return value

    def io_write(self, port: int, size: int, value: int) -> None:
        if size == 1:
            if port == INDEX_PORT:
                self._select(value)
            elif port == DATA_PORT:
                self._write_reg(self._index, value & 0xFF)
            return
        for i in range(size):
            b = (value >> (8 * i)) & 0xFF
            if port + i == INDEX_PORT:
                self._select(b)
            elif port + i == DATA_PORT:
                self._write_reg(self._index, b)

    @property
    def nmi_disabled(self) -> bool:
        """Bit 7 of the last write to port 0x70: the machine masks NMI while set."""
        return self._nmi_disabled

    # -- machine / firmware interface ---------------------------------------------
    def get_cmos(self, index: int) -> int:
        """Byte ``index`` (0-127) as the guest would read it, without side effects."""
        if not 0 <= index < CMOS_SIZE:
            raise ValueError(f"CMOS index {index:#x} is outside 0..0x7f")
        return self._read_reg(index, True)

    def set_cmos(self, index: int, value: int) -> None:
        """Write byte ``index`` exactly as a guest write through port 0x71 would."""
        if not 0 <= index < CMOS_SIZE:
            raise ValueError(f"CMOS index {index:#x} is outside 0..0x7f")
        if not 0 <= value <= 0xFF:
            raise ValueError(f"CMOS value {value:#x} is not a byte")
        self._write_reg(index, value)

    def store_checksum(self) -> int:
        """Store the AT checksum of bytes 0x10-0x2D at 0x2E (high) / 0x2F (low)."""
        total = sum(self._regs[CHECKSUM_FIRST:CHECKSUM_LAST + 1]) & 0xFFFF
        self._regs[CMOS_CHECKSUM_HI] = total >> 8
        self._regs[CMOS_CHECKSUM_LO] = total & 0xFF
        return total

    def store_memory_size(self, ram_bytes: int, below_4g_limit: int = 0xE000_0000) -> None:
        """Fill the memory-size bytes as a PC BIOS does after its memory test.

        RAM up to ``below_4g_limit`` sits at 0 (the rest of the 32-bit space
        is the PCI/MMIO hole); whatever is left is mapped from 4 GiB up.
        """
        if ram_bytes < 0 or below_4g_limit < 0:
            raise ValueError("memory sizes must not be negative")
        kib, mib = 1024, 1024 * 1024
        low = min(ram_bytes, below_4g_limit)
        high = ram_bytes - low
        base_kib = min(low, 640 * kib) // kib
        ext_kib = min(max(low - mib, 0) // kib, 0xFFFF)
        above_16m = min(max(low - 16 * mib, 0) // (64 * kib), 0xFFFF)
        above_4g = min(high // (64 * kib), 0xFFFFFF)
        r = self._regs
        r[CMOS_BASE_MEM_LO], r[CMOS_BASE_MEM_HI] = base_kib & 0xFF, base_kib >> 8
        r[CMOS_EXT_MEM_LO], r[CMOS_EXT_MEM_HI] = ext_kib & 0xFF, ext_kib >> 8
        r[CMOS_EXT_MEM2_LO], r[CMOS_EXT_MEM2_HI] = ext_kib & 0xFF, ext_kib >> 8
        r[CMOS_MEM_ABOVE_16M_LO], r[CMOS_MEM_ABOVE_16M_HI] = above_16m & 0xFF, above_16m >> 8
        r[CMOS_MEM_ABOVE_4G] = above_4g & 0xFF
        r[CMOS_MEM_ABOVE_4G + 1] = (above_4g >> 8) & 0xFF
        r[CMOS_MEM_ABOVE_4G + 2] = above_4g >> 16
        self.store_checksum()

    def rtc_time(self) -> int:
        """The time the counters show, as seconds since 1970-01-01 of the calendar."""
        if self._counting():
            return self._value(self._clock.now())
        return self._decode_time()[0]

    # -- register file ------------------------------------------------------------
    def _select(self, value: int) -> None:
        self._index = value & 0x7F
        self._nmi_disabled = bool(value & 0x80)

    def _counting(self) -> bool:
        return self._div_running and not self._regs[REG_B] & B_SET

    def _value(self, now: int) -> int:
        return self._offset + (now - self._div_ref) // TICK_HZ

    def _read_reg(self, index: int, peek: bool) -> int:
        regs = self._regs
        slot = _TIME_SLOT[index]
        if slot >= 0:
            if self._div_running and not regs[REG_B] & B_SET:
                return self._encoded(self._value(self._clock.now()))[slot]
            return regs[index]
        if index == REG_A:
            a = regs[REG_A]
            if (self._div_running and not regs[REG_B] & B_SET
                    and (self._clock.now() - self._div_ref) % TICK_HZ >= TICK_HZ - UIP_TICKS):
                a |= A_UIP
            return a
        if index == REG_C:
            now = self._clock.now()
            self._sync(now)
            flags = self._flags
            if flags & regs[REG_B]:  # PF/AF/UF sit under PIE/AIE/UIE bit for bit
                flags |= C_IRQF
            if not peek:
                self._flags = 0
                self._refresh(now)
            return flags
        if index == REG_D:
            return D_VRT
        return regs[index]

    def _write_reg(self, index: int, value: int) -> None:
        if _TIME_SLOT[index] >= 0:
            now = self._clock.now()
            self._sync(now)
            if self._counting():
                self._freeze(now)
                self._regs[index] = value
                self._thaw(now)
            else:
                self._regs[index] = value
            self._refresh(now)
        elif index in _ALARM_REGS:
            now = self._clock.now()
            self._sync(now)
            self._regs[index] = value
            self._refresh(now)
        elif index == REG_A:
            self._write_a(value)
        elif index == REG_B:
            self._write_b(value)
        elif index == REG_C or index == REG_D:
            pass  # read-only
        else:
            self._regs[index] = value

    def _write_a(self, value: int) -> None:
        now = self._clock.now()
        self._sync(now)
        was_counting = self._counting()
        self._regs[REG_A] = value & ~A_UIP & 0xFF
        if value & A_DV_MASK == DV_32K:
            if not self._div_running:
                # Out of reset the chain starts half-way, so the first update is 0.5 s away.
                self._div_running = True
                self._div_ref = now - TICK_HZ // 2
        elif self._div_running:
            if was_counting:
                self._freeze(now)
            self._div_running = False
        if self._counting() and not was_counting:
            self._thaw(now)
        self._refresh(now)

    def _write_b(self, value: int) -> None:
        now = self._clock.now()
        self._sync(now)
        was_counting = self._counting()
        if value & B_SET:
            value &= ~B_UIE
            if was_counting:
                self._freeze(now)  # in the old data mode: the bytes are what was shown
        self._regs[REG_B] = value
        if self._counting() and not was_counting:
            self._thaw(now)
        self._refresh(now)

    # -- time encoding ------------------------------------------------------------
    def _encoded(self, value: int) -> tuple[int, ...]:
        key = (value, self._regs[REG_B] & (B_DM | B_24H), self._dow_adjust)
        if key == self._enc_key:
            return self._enc_val
        binary = bool(key[1] & B_DM)
        h24 = bool(key[1] & B_24H)
        days, sod = divmod(value, _DAY)
        hour, rem = divmod(sod, 3600)
        minute, second = divmod(rem, 60)
        year, month, day = civil_from_days(days)
        dow = (days + _UNIX_DAY0_DOW + self._dow_adjust) % 7 + 1
        enc = (lambda v: v) if binary else _bcd
        val = (
            enc(second),
            enc(minute),
            _encode_hour(hour, binary, h24),
            dow,
            enc(day),
            enc(month),
            enc(year % 100),
            _bcd((year // 100) % 100),  # PCs keep the century in BCD whatever DM says
        )
        self._enc_key, self._enc_val = key, val
        return val

    def _decode_time(self) -> tuple[int, int]:
        """(time value, day-of-week adjustment) held in the time bytes."""
        r = self._regs
        b = r[REG_B]
        dec = (lambda v: v) if b & B_DM else _from_bcd
        hb = r[REG_HOURS]
        if b & B_24H:
            hour = dec(hb)
        else:
            hour = dec(hb & 0x7F) % 12 + (12 if hb & 0x80 else 0)
        year = _from_bcd(r[CMOS_CENTURY]) * 100 + dec(r[REG_YEAR])
        carry, month0 = divmod(dec(r[REG_MONTH]) - 1, 12)
        days = days_from_civil(year + carry, month0 + 1, 1) + dec(r[REG_DAY_OF_MONTH]) - 1
        value = days * _DAY + hour * 3600 + dec(r[REG_MINUTES]) * 60 + dec(r[REG_SECONDS])
        adjust = (dec(r[REG_DAY_OF_WEEK]) - 1 - (value // _DAY + _UNIX_DAY0_DOW)) % 7
        return value, adjust

    def _freeze(self, now: int) -> None:
        for reg, byte in zip(_TIME_REGS, self._encoded(self._value(now))):
            self._regs[reg] = byte

    def _thaw(self, now: int) -> None:
        # The divider keeps its phase: the written time is what the counters
        # hold now, and the next update comes at the next divider boundary.
        value, self._dow_adjust = self._decode_time()
        self._offset = value - (now - self._div_ref) // TICK_HZ

    # -- alarm --------------------------------------------------------------------
    def _alarm_sets(self) -> tuple[list[int], list[int], list[int]] | None:
        r = self._regs
        mode = r[REG_B] & (B_DM | B_24H)
        key = (r[REG_SECONDS_ALARM], r[REG_MINUTES_ALARM], r[REG_HOURS_ALARM], mode)
        if key == self._alarm_key:
            return self._alarm_val
        binary = bool(mode & B_DM)
        h24 = bool(mode & B_24H)
        enc = (lambda v: v) if binary else _bcd

        def matching(byte: int, n: int) -> list[int]:
            if byte >= DONT_CARE:
                return list(range(n))
            return [v for v in range(n) if enc(v) == byte]

        secs = matching(key[0], 60)
        mins = matching(key[1], 60)
        if key[2] >= DONT_CARE:
            hours = list(range(24))
        else:
            hours = [h for h in range(24) if _encode_hour(h, binary, h24) == key[2]]
        val = (hours, mins, secs) if hours and mins and secs else None
        self._alarm_key, self._alarm_val = key, val
        return val

    def _alarm_delta(self, value: int) -> int | None:
        """Seconds from ``value`` to the next update whose new time matches the alarm."""
        sets = self._alarm_sets()
        if sets is None:
            return None
        x = value % _DAY
        nxt = _next_alarm_at_or_after(*sets, x + 1)
        if nxt is None:
            nxt = _next_alarm_at_or_after(*sets, 0) + _DAY  # type: ignore[operator]
        return nxt - x

    # -- events -------------------------------------------------------------------
    def _sync(self, now: int) -> None:
        """Set the flags of every event in (sync_tick, now]."""
        last = self._sync_tick
        if now <= last:
            return
        self._sync_tick = now
        if not self._div_running:
            return
        ref = self._div_ref
        flags = self._flags
        p = _PERIOD_CYCLES[self._regs[REG_A] & A_RS_MASK]
        if p and not flags & C_PF:
            span = TICK_HZ * p
            if ((now - ref) * OSC_HZ) // span != ((last - ref) * OSC_HZ) // span:
                flags |= C_PF
        if not self._regs[REG_B] & B_SET:
            k_last = (last - ref) // TICK_HZ
            k_now = (now - ref) // TICK_HZ
            if k_now > k_last:
                flags |= C_UF
                if not flags & C_AF:
                    d = self._alarm_delta(self._offset + k_last)
                    if d is not None and k_last + d <= k_now:
                        flags |= C_AF
        self._flags = flags

    def _next_deadline(self, now: int) -> int | None:
        """Tick of the next event an enabled interrupt needs, or None."""
        if not self._div_running:
            return None
        b = self._regs[REG_B]
        ref = self._div_ref
        best: int | None = None
        p = _PERIOD_CYCLES[self._regs[REG_A] & A_RS_MASK]
        if b & B_PIE and p:
            k = ((now - ref) * OSC_HZ) // (TICK_HZ * p) + 1
            best = ref - ((-k * p * TICK_HZ) // OSC_HZ)  # first tick at or past edge k
        if not b & B_SET and b & (B_UIE | B_AIE):
            k_now = (now - ref) // TICK_HZ
            if b & B_UIE:
                t = ref + (k_now + 1) * TICK_HZ
                best = t if best is None else min(best, t)
            if b & B_AIE:
                d = self._alarm_delta(self._offset + k_now)
                if d is not None:
                    t = ref + (k_now + d) * TICK_HZ
                    best = t if best is None else min(best, t)
        return best

    def _refresh(self, now: int) -> None:
        """Drive IRQ8 from IRQF and keep exactly the timer the enabled sources need."""
        level = bool(self._flags & self._regs[REG_B])
        deadline = None if level else self._next_deadline(now)
        t = self._timer
        if t is not None and (not t.active or t.deadline != deadline):
            t.cancel()
            t = self._timer = None
        if t is None and deadline is not None:
            self._timer = self._clock.schedule(deadline, self._on_timer, "rtc")
        # Last, so that an interrupt handler run synchronously by the line's
        # sink (reading register C) finds the device consistent.
        self._irq.set(level)

    def _on_timer(self, now: int) -> None:
        self._timer = None
        self._sync(now)
        self._refresh(now)

    def __repr__(self) -> str:
        return f"Rtc146818({self.name!r}, time={self.rtc_time()}, flags={self._flags:#04x})"


__all__ = ["Rtc146818", "civil_from_days", "days_from_civil"]
