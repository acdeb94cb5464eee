"""ACPI fixed-hardware power management of a PIIX4-style chipset, and its reset register.

``AcpiPm`` implements, from the ACPI Specification 6.x, chapter 4 "ACPI
Hardware Specification" (section "ACPI Register Model" and its "Fixed
Hardware Registers"), at the ports QEMU's i440FX/PIIX4 machine uses:

* PM1a event block (PM1_STS, PM1_EN; 4 bytes at 0x600): the status bits
  TMR_STS, BM_STS, GBL_STS, PWRBTN_STS, SLPBTN_STS, RTC_STS,
  PCIEXP_WAKE_STS and WAK_STS are write-1-to-clear; the enables TMR_EN,
  GBL_EN, PWRBTN_EN, SLPBTN_EN, RTC_EN and PCIEXP_WAKE_DIS read back.
  Hardware here sets TMR_STS (PM timer carry) and PWRBTN_STS (``power_button``);
  nothing in this machine sleeps, so WAK_STS is never set.
* PM1a control block (PM1_CNT; 2 bytes at 0x604): SCI_EN, BM_RLD and
  SLP_TYPx read back; SLP_EN (and GBL_RLS, which would signal SMM firmware
  there is none of) are write-only and read 0.  Writing SLP_EN with SLP_TYP
  = ``S5_SLP_TYP`` is the soft-off of chapter 7 "Power and Performance
  Management" (\\_S5): the device calls ``on_poweroff()``.  The value is the
  PIIX4's own encoding, which QEMU keeps (SUS_TYP 000 = soft off), and the
  DSDT's \\_S5 package must carry it; the sleeping states S1-S4 are not
  offered, so other SLP_TYP values do nothing.
* PM timer (PM_TMR; 4 bytes at 0x608): 24 bits (32 with TMR_VAL_EXT) of a
  3.579545 MHz count, ``floor(ticks * 3579545 / 100_000_000)`` of the
  machine clock, exact and free-running from tick 0 (reset does not touch
  it).  TMR_STS is set each time bit 23 (31) of the count changes; with
  TMR_EN and SCI_EN the SCI is raised at the exact tick of that change.
* GPE0 block (0xAFE0, GPE0_BLK_LEN 4 as in QEMU's hw/acpi/piix4.c: two
  bytes of status, write-1-to-clear, then two bytes of enable); ``raise_gpe``
  is the hook for a future event source.
* SCI: level, active high, IRQ 9 (QEMU's wiring; the MADT says so with an
  interrupt source override).  It is asserted while SCI_EN is set and an
  enabled PM1 or GPE0 status bit is.  QEMU raises it whatever SCI_EN says;
  here SCI_EN gates it, as the specification's legacy/ACPI select has it
  (with SCI_EN clear the events would be SMIs, and there is no SMM).
* SMI_CMD (port 0xB2, with the APM status scratch byte at 0xB3, as QEMU's
  apm device has them): writing ACPI_ENABLE (0xF1) sets SCI_EN and
  ACPI_DISABLE (0xF0) clears it -- what the SMM handler of a real board
  does for the OS's ACPI-enable handshake, done at once as in QEMU's PIIX4.

``PiixResetControl`` is the PIIX3/PIIX4 Reset Control register at port
0xCF9 (PIIX4 datasheet, "RC -- Reset Control Register"): bit 1 SRST selects
a hard (1) or soft (0) reset, and setting bit 2 RCPU starts it; bits 3-7
are reserved (bit 3 is FULL_RST only on later ICH parts, so 0x0E resets like
0x06).  The FADT's RESET_REG points here with RESET_VALUE 0x06.  As in
QEMU, RCPU never latches (it reads 0), so every write with it set requests
a reset, and the machine does a full reset for either SRST value: the
board's ``on_reset()`` decides what that means.

Width handling: the registers are byte-addressable, so accesses of any width
are taken apart here byte by byte (a byte write to a write-1-to-clear
register must clear only that byte, which a read-merge-write in the bus
would break); a wide read samples the PM timer once.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from devices.base import IrqLine, State, check_state
from devices.clock import TICK_HZ, Timer, VirtualClock
from devices.timers._common import StateFields, rearm

KIND = "acpi_pm"
VERSION = 1

# Port layout (QEMU i440FX/PIIX4): what the FADT builder puts in its *_BLK fields.
PM_BASE = 0x600
PM1A_EVT_BLK = PM_BASE
PM1_EVT_LEN = 4
PM1A_CNT_BLK = PM_BASE + 4
PM1_CNT_LEN = 2
PM_TMR_BLK = PM_BASE + 8
PM_TMR_LEN = 4
GPE0_BLK = 0xAFE0
GPE0_BLK_LEN = 4
SMI_CMD = 0xB2
APM_STS = 0xB3
ACPI_ENABLE = 0xF1
ACPI_DISABLE = 0xF0
SCI_IRQ = 9
PM_TMR_VAL_EXT = False    # the FADT's TMR_VAL_EXT flag for the default (24-bit) timer, as QEMU's PIIX4

PM_TIMER_HZ = 3_579_545

# PM1_STS / PM1_EN bits.
TMR_STS = 1 << 0
BM_STS = 1 << 4
GBL_STS = 1 << 5
PWRBTN_STS = 1 << 8
SLPBTN_STS = 1 << 9
RTC_STS = 1 << 10
PCIEXP_WAKE_STS = 1 << 14
WAK_STS = 1 << 15
PM1_STS_BITS = TMR_STS | BM_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS | PCIEXP_WAKE_STS | WAK_STS

TMR_EN = 1 << 0
GBL_EN = 1 << 5
PWRBTN_EN = 1 << 8
SLPBTN_EN = 1 << 9
RTC_EN = 1 << 10
PCIEXP_WAKE_DIS = 1 << 14
PM1_EN_BITS = TMR_EN | GBL_EN | PWRBTN_EN | SLPBTN_EN | RTC_EN | PCIEXP_WAKE_DIS
# Status bits that raise the SCI when their enable (same bit position) is set.
SCI_EVENTS = TMR_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS

# PM1_CNT bits.
SCI_EN = 1 << 0
BM_RLD = 1 << 1
GBL_RLS = 1 << 2
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
PM1_CNT_BITS = SCI_EN | BM_RLD | SLP_TYP_MASK

# SLP_TYP of \_S5 (PIIX4 SUS_TYP 000, soft off): the DSDT's Name(_S5, Package{S5_SLP_TYP, S5_SLP_TYP, 0, 0}).
S5_SLP_TYP = 0

GPE0_BITS = (1 << (8 * GPE0_BLK_LEN // 2)) - 1

# PIIX3/PIIX4 reset control register.
RESET_CONTROL_PORT = 0xCF9
RCR_SRST = 1 << 1
RCR_RCPU = 1 << 2
RESET_VALUE = RCR_SRST | RCR_RCPU   # the FADT's RESET_VALUE: a hard reset

# Register ids, and where each of their bytes sits in port space.
_STS, _EN, _CNT, _TMR, _GPE_STS, _GPE_EN, _APMC, _APMS = range(8)
_BYTE_AT: dict[int, tuple[int, int]] = {}
for _reg, _port, _width in ((_STS, PM1A_EVT_BLK, 2), (_EN, PM1A_EVT_BLK + 2, 2), (_CNT, PM1A_CNT_BLK, 2),
                            (_TMR, PM_TMR_BLK, 4), (_GPE_STS, GPE0_BLK, GPE0_BLK_LEN // 2),
                            (_GPE_EN, GPE0_BLK + GPE0_BLK_LEN // 2, GPE0_BLK_LEN // 2),
                            (_APMC, SMI_CMD, 1), (_APMS, APM_STS, 1)):
    for _i in range(_width):
        _BYTE_AT[_port + _i] = (_reg, 8 * _i)
del _reg, _port, _width, _i


def _bytes(port: int, size: int, value: int = 0) -> Iterator[tuple[int, int, int]]:
    """(byte index, port, byte of value) for each byte of an access."""
    for i in range(size):
        yield i, port + i, (value >> (8 * i)) & 0xFF


def pm_timer_count(tick: int) -> int:
    """The PM timer's full count at a clock tick: floor(tick * 3.579545 MHz / TICK_HZ)."""
    return tick * PM_TIMER_HZ // TICK_HZ


def pm_timer_tick(count: int) -> int:
    """The first clock tick at which the PM timer's count reaches ``count``."""
    return -((-count * TICK_HZ) // PM_TIMER_HZ)


class AcpiPm:
    """PM1a event/control blocks, PM timer, GPE0 and SMI_CMD; the SCI on one level IrqLine."""

    kind = KIND

    def __init__(self, clock: VirtualClock, sci: IrqLine, on_poweroff: Callable[[], None] | None = None,
                 *, tmr_val_ext: bool = PM_TMR_VAL_EXT, name: str = "acpi_pm") -> None:
        self.name = name
        self.io_ranges: list[tuple[int, int]] = [
            (PM1A_EVT_BLK, PM1_EVT_LEN), (PM1A_CNT_BLK, PM1_CNT_LEN), (PM_TMR_BLK, PM_TMR_LEN),
            (GPE0_BLK, GPE0_BLK_LEN), (SMI_CMD, 2),
        ]
        self.tmr_val_ext = bool(tmr_val_ext)
        self._carry_bit = 31 if self.tmr_val_ext else 23
        self._tmr_mask = (1 << (self._carry_bit + 1)) - 1
        self._clock = clock
        self._sci = sci
        self._on_poweroff = on_poweroff
        self._timer: Timer | None = None
        self._sts = 0
        self._en = 0
        self._cnt = 0
        self._gpe_sts = 0
        self._gpe_en = 0
        self._apm_cnt = 0
        self._apm_sts = 0
        self._sync_tick = clock.now()

    # -- Device protocol ----------------------------------------------------------
    def reset(self) -> None:
        """Every register to 0 (SCI_EN clear: the OS must do the ACPI-enable handshake again).

        The PM timer keeps counting: it is free-running from power-on.
        """
        self._sts = self._en = self._cnt = 0
        self._gpe_sts = self._gpe_en = 0
        self._apm_cnt = self._apm_sts = 0
        self._sync_tick = self._clock.now()
        self._refresh()

    def save_state(self) -> State:
        return {
            "kind": KIND,
            "version": VERSION,
            "pm1_sts": self._sts,
            "pm1_en": self._en,
            "pm1_cnt": self._cnt,
            "gpe0_sts": self._gpe_sts,
            "gpe0_en": self._gpe_en,
            "apm_cnt": self._apm_cnt,
            "apm_sts": self._apm_sts,
            "sync_tick": self._sync_tick,
        }

    def load_state(self, state: State) -> None:
        check_state(state, KIND, VERSION)
        f = StateFields(state, KIND)
        sts = f.bits("pm1_sts", PM1_STS_BITS)
        en = f.bits("pm1_en", PM1_EN_BITS)
        cnt = f.bits("pm1_cnt", PM1_CNT_BITS)
        gpe_sts = f.bits("gpe0_sts", GPE0_BITS)
        gpe_en = f.bits("gpe0_en", GPE0_BITS)
        apm_cnt = f.int("apm_cnt", 0, 0xFF)
        apm_sts = f.int("apm_sts", 0, 0xFF)
        sync_tick = f.int("sync_tick", 0)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._sts, self._en, self._cnt = sts, en, cnt
        self._gpe_sts, self._gpe_en = gpe_sts, gpe_en
        self._apm_cnt, self._apm_sts = apm_cnt, apm_sts
        self._sync_tick = sync_tick
        self._arm()
        self._sci.level = self._sci_level()   # silently: a restore raises no interrupt

    # -- port I/O -----------------------------------------------------------------
    def io_read(self, port: int, size: int) -> int:
        now = self._clock.now()
        self._catch_up(now)
        value = 0
        for i, p, _ in _bytes(port, size):
            at = _BYTE_AT.get(p)
            b = 0xFF if at is None else (self._register(at[0], now) >> at[1]) & 0xFF
            value |= b << (8 * i)
        return value

    def io_write(self, port: int, size: int, value: int) -> None:
        self._catch_up(self._clock.now())
        # Gather the access per register, so a 16-bit write is one register write.
        writes: dict[int, list[int]] = {}
        for _, p, b in _bytes(port, size, value):
            at = _BYTE_AT.get(p)
            if at is not None:
                slot = writes.setdefault(at[0], [0, 0])
                slot[0] |= b << at[1]
                slot[1] |= 0xFF << at[1]
        poweroff = False
        for reg, (v, mask) in writes.items():
            poweroff |= self._write(reg, v, mask)
        self._refresh()
        if poweroff and self._on_poweroff is not None:
            self._on_poweroff()

    # -- host side ----------------------------------------------------------------
    def power_button(self) -> None:
        """A press of the power button: PWRBTN_STS, and the SCI if PWRBTN_EN."""
        self._catch_up(self._clock.now())
        self._sts |= PWRBTN_STS
        self._refresh()

    def raise_gpe(self, bit: int) -> None:
        """A general-purpose event: sets GPE0_STS bit ``bit`` (0-15), and the SCI if enabled."""
        if not 0 <= bit < 8 * GPE0_BLK_LEN // 2:
            raise ValueError(f"GPE {bit} is outside GPE0 (0..{8 * GPE0_BLK_LEN // 2 - 1})")
        self._catch_up(self._clock.now())
        self._gpe_sts |= 1 << bit
        self._refresh()

    def pm_timer(self) -> int:
        """The PM_TMR value now (no side effect)."""
        return pm_timer_count(self._clock.now()) & self._tmr_mask

    @property
    def sci_enabled(self) -> bool:
        return bool(self._cnt & SCI_EN)

    # -- registers ----------------------------------------------------------------
    def _register(self, reg: int, now: int) -> int:
        if reg == _TMR:
            return pm_timer_count(now) & self._tmr_mask
        return (self._sts, self._en, self._cnt, 0, self._gpe_sts, self._gpe_en,
                self._apm_cnt, self._apm_sts)[reg]

    def _write(self, reg: int, value: int, mask: int) -> bool:
        """One register write; True if it was a request for soft-off."""
        if reg == _STS:
            self._sts &= ~(value & mask)
        elif reg == _EN:
            self._en = ((self._en & ~mask) | (value & mask)) & PM1_EN_BITS
        elif reg == _CNT:
            self._cnt = ((self._cnt & ~mask) | (value & mask)) & PM1_CNT_BITS
            if value & mask & SLP_EN:
                return (self._cnt & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLP_TYP
        elif reg == _GPE_STS:
            self._gpe_sts &= ~(value & mask)
        elif reg == _GPE_EN:
            self._gpe_en = ((self._gpe_en & ~mask) | (value & mask)) & GPE0_BITS
        elif reg == _APMC:
            self._apm_cnt = value
            if value == ACPI_ENABLE:
                self._cnt |= SCI_EN
            elif value == ACPI_DISABLE:
                self._cnt &= ~SCI_EN
        elif reg == _APMS:
            self._apm_sts = value
        return False   # PM_TMR is read-only

    # -- PM timer carry and the SCI -----------------------------------------------
    def _sync(self, now: int) -> bool:
        """Set TMR_STS if bit 23 (31) of the count changed in (sync_tick, now]; True if it did."""
        last = self._sync_tick
        if now <= last:
            return False
        self._sync_tick = now
        bit = self._carry_bit
        if self._sts & TMR_STS or pm_timer_count(now) >> bit == pm_timer_count(last) >> bit:
            return False
        self._sts |= TMR_STS
        return True

    def _catch_up(self, now: int) -> None:
        if self._sync(now):
            self._refresh()

    def _sci_level(self) -> bool:
        return bool(self._cnt & SCI_EN) and bool(self._sts & self._en & SCI_EVENTS
                                                 or self._gpe_sts & self._gpe_en)

    def _arm(self) -> None:
        """A clock timer at the next carry, only while that carry would raise the SCI."""
        deadline = None
        if self._cnt & SCI_EN and self._en & TMR_EN and not self._sts & TMR_STS:
            bit = self._carry_bit
            deadline = pm_timer_tick(((pm_timer_count(self._sync_tick) >> bit) + 1) << bit)
        self._timer = rearm(self._clock, self._timer, deadline, self._on_timer, f"{self.name}.tmr")

    def _refresh(self) -> None:
        self._arm()
        self._sci.set(self._sci_level())

    def _on_timer(self, now: int) -> None:
        self._timer = None
        self._sync(now)
        self._refresh()

    def __repr__(self) -> str:
        return (f"AcpiPm({self.name!r}, pm1_sts={self._sts:#06x}, pm1_en={self._en:#06x}, "
                f"pm1_cnt={self._cnt:#06x})")


class PiixResetControl:
    """PIIX3/PIIX4 Reset Control register, port 0xCF9: the FADT's RESET_REG."""

    kind = "piix_rcr"

    def __init__(self, on_reset: Callable[[], None] | None = None, name: str = "rcr") -> None:
        self.name = name
        self.io_ranges: list[tuple[int, int]] = [(RESET_CONTROL_PORT, 1)]
        self._on_reset = on_reset
        self._rcr = 0

    def reset(self) -> None:
        self._rcr = 0

    def save_state(self) -> State:
        return {"kind": self.kind, "version": 1, "rcr": self._rcr}

    def load_state(self, state: State) -> None:
        check_state(state, self.kind, 1)
        self._rcr = StateFields(state, self.kind).bits("rcr", RCR_SRST)

    @property
    def hard_reset(self) -> bool:
        """SRST: whether the last reset asked for was a hard one."""
        return bool(self._rcr & RCR_SRST)

    def io_read(self, port: int, size: int) -> int:
        value = 0
        for i, p, _ in _bytes(port, size):
            value |= (self._rcr if p == RESET_CONTROL_PORT else 0xFF) << (8 * i)
        return value

    def io_write(self, port: int, size: int, value: int) -> None:
        for _, p, b in _bytes(port, size, value):
            if p == RESET_CONTROL_PORT:
                self._rcr = b & RCR_SRST
                if b & RCR_RCPU and self._on_reset is not None:
                    self._on_reset()


__all__ = [
    "ACPI_DISABLE", "ACPI_ENABLE", "APM_STS", "AcpiPm", "GPE0_BLK", "GPE0_BLK_LEN", "PM1A_CNT_BLK",
    "PM1A_EVT_BLK", "PM1_CNT_LEN", "PM1_EVT_LEN", "PM_BASE", "PM_TIMER_HZ", "PM_TMR_BLK", "PM_TMR_LEN",
    "PM_TMR_VAL_EXT", "PiixResetControl", "RESET_CONTROL_PORT", "RESET_VALUE", "S5_SLP_TYP", "SCI_IRQ",
    "SMI_CMD", "pm_timer_count", "pm_timer_tick",
]
