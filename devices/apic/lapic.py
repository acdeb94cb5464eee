"""The xAPIC local APIC of one vCPU, and the MMIO bank that selects it by vCPU id.

Implements, from the Intel SDM vol. 3A chapter 10 "Advanced Programmable
Interrupt Controller (APIC)" (chapter 11 in editions from 2023 on):

* 10.4.1 / Table 10-1 "Local APIC Register Address Map": the register file at
  offsets 0x000-0x3F0 of a 4 KiB page, 32-bit registers on 16-byte
  boundaries.  Reserved registers read 0, ignore writes and set "illegal
  register address" in the ESR (10.5.3); read-only registers ignore writes;
  the EOI register reads 0.  A dword at offset 4, 8 or 12 of a 16-byte slot
  is not a register: it reads 0 and ignores writes.
* 10.4.3 "Enabling or Disabling the Local APIC" and 10.4.4 "Local APIC Status
  and Location": the IA32_APIC_BASE MSR (0x1B): base address (bits 12-39,
  this machine has 40 physical address bits), BSP flag (bit 8, read-only),
  global enable (bit 11).  Clearing bit 11 takes the APIC off the bus and
  returns it to its power-up register state (10.4.3 allows that); while it is
  off its registers are not there (reads are all ones) and
  the 8259's INTR and the LINT1 pin reach the CPU directly as INTR and NMI.
  Setting bit 11 again brings it back software-disabled.  Writes that set
  reserved bits, or the x2APIC enable bit 10 (no x2APIC here), are refused.
* 10.4.6 "Local APIC ID" (read/write, 8 bits) and 10.4.8 "Local APIC Version
  Register": 0x00050014, version 0x14 with 6 LVT entries, as QEMU reports
  (so the CMCI LVT at 0x2F0 is a plain register that no source drives).
* 10.4.7.1-10.4.7.3: power-up and INIT reset states (``reset``,
  ``init_reset``) and the software-disabled state of SVR bit 8: every LVT is
  masked on the enabled -> disabled transition and cannot be unmasked while
  disabled; fixed and lowest-priority messages are dropped (10.4.7.2, as
  KVM), NMI, SMI, INIT and SIPI still arrive.
* 10.5.1 "Local Vector Table": timer, thermal, performance counter, LINT0,
  LINT1, error and CMCI entries with their writable fields; delivery status
  always reads idle, because delivery takes no time.
* 10.5.3 "Error Handling": ESR bits "send illegal vector" (5), "received
  illegal vector" (6), "illegal register address" (7); errors accumulate
  internally and a write to the ESR moves them into the readable register;
  each new error raises the error LVT.
* 10.5.4 "APIC Timer" with the divide configuration register, one-shot and
  periodic modes, and 10.5.4.1 "TSC-Deadline Mode" with IA32_TSC_DEADLINE
  (0x6E0): a write to the LVT timer that changes the mode disarms the timer;
  in TSC-deadline mode initial-count writes are ignored and the current count
  reads 0; the MSR reads 0 and ignores writes in the other modes.
* 10.6.1 "Interrupt Command Register": IPIs through the APIC bus
  (apicbus.py); the delivery status bit reads idle at once.
* 10.8.3.1 "Task and Processor Priorities" (TPR, PPR), 10.8.6.1 CR8 as the
  TPR's priority class (``cr8``/``write_cr8``, for the machine's MOV CR8),
  and 10.6.2.4's APR;
  10.8.4 "Interrupt Acceptance for Fixed Interrupts" (IRR -> ISR by priority
  class above the PPR; TMR set for level-triggered vectors); 10.8.5 "EOI"
  (highest ISR bit cleared; a vector whose TMR bit is set is broadcast to
  the I/O APICs); 10.9 "Spurious Interrupt": an INTA with nothing
  deliverable any more answers the SVR vector and sets no ISR bit.
* LINT0 and LINT1: fixed (edge, or level on LINT0, with remote IRR), NMI, SMI,
  INIT and ExtINT.  ExtINT on LINT0 is the PC's "virtual wire": INTR follows
  the 8259 pair's INTR and the INTA cycle goes to the 8259
  (``pic.acknowledge()``).  ExtINT is answered before any APIC vector (it
  ignores priorities: QEMU and KVM both ask the 8259 first).

Time.  The timer's input is the 100 MHz bus clock, which is the machine's
tick (devices/clock.py), and the TSC is ``clock.now()``.  The timer is
described by the tick ``t0`` at which the current count equalled the initial
count; the current count is computed from it, so no event is ever simulated
per count.  Only expiries are put on the clock, as one timer
``lapic<id>.timer``; a masked periodic timer puts nothing on the clock (its
expiries would deliver nothing) and resumes on its old period grid when it
is unmasked.

Deliberate departures, each to match what guests written against QEMU/KVM
need, or to keep a guest from stalling the host:

* Power-up reset of the bootstrap processor's APIC leaves LVT LINT0 at
  0x700 (ExtINT, unmasked) rather than masked, as QEMU's apic_reset_common
  does, so the 8259 reaches the CPU through an enabled-but-unprogrammed APIC
  as it does under SeaBIOS.  INIT leaves it masked, as the SDM says.
* Input pins take their level as "asserted": the LINT polarity bits are
  stored but not applied (QEMU's apic_deliver_pic_intr ignores them too); the
  active-low wiring of a board is accounted for where it is wired.
* LINT1 is always edge-sensitive (10.5.1 says level is not supported there),
  and ExtINT is only meaningful on LINT0, where the 8259 is wired.
* IPIs are always sent edge-triggered; only an INIT's trigger and level bits
  are used (INIT level de-assert).  Pentium 4 and later ignore the trigger
  bit as well (10.6.1).  ICR delivery modes 011 and 111 are reserved and send
  nothing.
* A periodic timer's period is at least ``MIN_PERIOD`` ticks (100 us): KVM
  enforces a floor for the same reason, a guest asking for an interrupt
  every few instructions would otherwise stall the emulator.
* The APIC's registers are at one address for every vCPU (the bank's
  mapping); per-vCPU relocation is reported through ``on_base_change`` for
  the machine to act on.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from devices.apic.apicbus import (
    DM_EXTINT,
    DM_FIXED,
    DM_INIT,
    DM_LOWEST,
    DM_NMI,
    DM_REMOTE_READ,
    DM_SMI,
    DM_STARTUP,
    ApicBus,
    ApicMessage,
)
from devices.base import SIZE_MASK, DeviceStateError, State, check_state
from devices.clock import Timer, VirtualClock
from devices.irqchip import CpuPins

KIND = "lapic"
BANK_KIND = "lapic-bank"
VERSION = 1

APIC_VERSION = 0x0005_0014
DEFAULT_BASE = 0xFEE0_0000
WINDOW = 0x1000

MSR_APIC_BASE = 0x1B
MSR_TSC_DEADLINE = 0x6E0
BASE_BSP = 1 << 8
BASE_ENABLE = 1 << 11
PHYS_ADDR_BITS = 40
BASE_ADDR_MASK = ((1 << PHYS_ADDR_BITS) - 1) & ~0xFFF
U64 = (1 << 64) - 1

# Register offsets (Table 10-1).
REG_ID = 0x020
REG_VERSION = 0x030
REG_TPR = 0x080
REG_APR = 0x090
REG_PPR = 0x0A0
REG_EOI = 0x0B0
REG_RRD = 0x0C0
REG_LDR = 0x0D0
REG_DFR = 0x0E0
REG_SVR = 0x0F0
REG_ISR = 0x100
REG_TMR = 0x180
REG_IRR = 0x200
REG_ESR = 0x280
REG_LVT_CMCI = 0x2F0
REG_ICR_LO = 0x300
REG_ICR_HI = 0x310
REG_LVT_TIMER = 0x320
REG_LVT_THERMAL = 0x330
REG_LVT_PERF = 0x340
REG_LVT_LINT0 = 0x350
REG_LVT_LINT1 = 0x360
REG_LVT_ERROR = 0x370
REG_TMICT = 0x380
REG_TMCCT = 0x390
REG_TDCR = 0x3E0

# LVT entries, in the order they are saved.
LVT_CMCI, LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = range(7)
LVT_OFFSET = (REG_LVT_CMCI, REG_LVT_TIMER, REG_LVT_THERMAL, REG_LVT_PERF, REG_LVT_LINT0,
              REG_LVT_LINT1, REG_LVT_ERROR)
_LVT_AT = {off: i for i, off in enumerate(LVT_OFFSET)}
# Writable bits of each LVT entry (Figure 10-8): vector, delivery mode where
# the entry has one, polarity and trigger on the LINT pins, mask, timer mode.
LVT_WRITABLE = (0x0001_07FF, 0x0007_00FF, 0x0001_07FF, 0x0001_07FF, 0x0001_A7FF, 0x0001_A7FF,
                0x0001_00FF)
LVT_MASKED = 1 << 16
LVT_LEVEL = 1 << 15
LVT_REMOTE_IRR = 1 << 14

SVR_ENABLE = 1 << 8
SVR_WRITABLE = 0x1FF  # vector and enable, as QEMU; focus checking and EOI suppression absent

ICR_LO_WRITABLE = 0x000C_CFFF  # vector, mode, dest mode, level, trigger, shorthand
ICR_HI_WRITABLE = 0xFF00_0000
LDR_WRITABLE = 0xFF00_0000
DFR_WRITABLE = 0xF000_0000
TDCR_WRITABLE = 0xB

ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECEIVE_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7
ESR_BITS = ESR_SEND_ILLEGAL_VECTOR | ESR_RECEIVE_ILLEGAL_VECTOR | ESR_ILLEGAL_REGISTER

TIMER_ONESHOT = 0
TIMER_PERIODIC = 1
TIMER_TSC_DEADLINE = 2

MIN_PERIOD = 10_000  # ticks: 100 us at 100 MHz

_U32 = 0xFFFF_FFFF
_REG_SLOTS = frozenset(
    [REG_ID, REG_VERSION, REG_TPR, REG_APR, REG_PPR, REG_EOI, REG_RRD, REG_LDR, REG_DFR, REG_SVR,
     REG_ESR, REG_ICR_LO, REG_ICR_HI, REG_TMICT, REG_TMCCT, REG_TDCR, *LVT_OFFSET]
    + [base + 0x10 * i for base in (REG_ISR, REG_TMR, REG_IRR) for i in range(8)]
)


def timer_divisor(tdcr: int) -> int:
    """Divide configuration register bits 3, 1, 0 -> divisor (Figure 10-10)."""
    code = (tdcr & 3) | ((tdcr >> 1) & 4)
    return 1 << ((code + 1) & 7)


def _words(bits: int) -> list[int]:
    return [(bits >> (32 * i)) & _U32 for i in range(8)]


class LocalApic:
    """One vCPU's local APIC (xAPIC mode).

    ``pins`` is the vCPU's CpuPins: the APIC becomes its INTR source and
    drives its NMI/INIT/SIPI/SMI events.  ``pic`` is the 8259 pair wired to
    LINT0 (``LocalApicBank.attach_pic`` wires it to every APIC).  The APIC
    joins ``bus`` at construction.
    """

    kind = KIND
    mmio_sizes = (4,)

    def __init__(self, clock: VirtualClock, bus: ApicBus, pins: CpuPins, apic_id: int, *,
                 bsp: bool = False, pic: Any | None = None, name: str | None = None) -> None:
        if not 0 <= apic_id <= 0xFF:
            raise ValueError(f"xAPIC ids are 0-255, not {apic_id}")
        self.clock = clock
        self.bus = bus
        self.pins = pins
        self.vcpu_id = pins.id
        self.initial_id = apic_id
        self.bsp = bool(bsp)
        self.pic = pic
        self.name = name or f"lapic{apic_id}"
        self.timer_name = f"lapic{apic_id}.timer"
        # Called as on_base_change(old, new) when the guest moves the APIC's
        # page (MSR 0x1B), so the machine can move the MMIO claim.
        self.on_base_change: Callable[[int, int], None] | None = None
        self._timer: Timer | None = None
        self._intr_seen: bool | None = False
        self.lint = [False, False]  # input pin levels (asserted), driven from outside
        self.apic_base = 0
        self.apic_id = apic_id
        self._init_registers()
        pins.source = self
        bus.attach_lapic(self)
        self.reset()

    # -- registers at reset (10.4.7.1) ------------------------------------------
    def _init_registers(self) -> None:
        self.tpr = 0
        self.ldr = 0
        self.dfr = DFR_WRITABLE
        self.svr = 0xFF
        self.irr = 0
        self.isr = 0
        self.tmr = 0
        self.esr = 0
        self.esr_pending = 0
        self.icr_lo = 0
        self.icr_hi = 0
        self.lvt = [LVT_MASKED] * 7
        self.tmict = 0
        self.tdcr = 0
        self.t0 = 0
        self.timer_next: int | None = None
        self.tsc_deadline = 0
        self.extint_pending = False
        self._cancel_timer()

    def reset(self) -> None:
        """Power-up reset (10.4.7.1), with the BSP's LINT0 left in ExtINT as QEMU has it."""
        old_base = self.base_address
        self.apic_id = self.initial_id
        self.apic_base = DEFAULT_BASE | BASE_ENABLE | (BASE_BSP if self.bsp else 0)
        self._init_registers()
        if self.bsp:
            self.lvt[LVT_LINT0] = DM_EXTINT << 8
        self._update()
        if old_base != DEFAULT_BASE and self.on_base_change is not None:
            self.on_base_change(old_base, DEFAULT_BASE)

    def init_reset(self) -> None:
        """INIT (10.4.7.3): power-up state except the APIC ID and the APIC base MSR.

        The machine calls this when the vCPU takes an INIT (the APIC only
        latches INIT in the vCPU's pins)."""
        self._init_registers()
        self._update()

    # -- state seen by the bus --------------------------------------------------
    @property
    def hw_enabled(self) -> bool:
        return bool(self.apic_base & BASE_ENABLE)

    @property
    def sw_enabled(self) -> bool:
        return bool(self.svr & SVR_ENABLE)

    @property
    def base_address(self) -> int:
        return self.apic_base & BASE_ADDR_MASK

    @property
    def ldr_id(self) -> int:
        return self.ldr >> 24

    @property
    def dfr_model(self) -> int:
        return self.dfr >> 28

    def ppr(self) -> int:
        """Processor priority (10.8.3.1)."""
        isrv = self.isr.bit_length() - 1 if self.isr else 0
        if self.tpr >> 4 >= isrv >> 4:
            return self.tpr
        return isrv & 0xF0

    def arbitration_priority(self) -> int:
        """APR (10.6.2.4, P6 formula; its "AND" is the maximum of the three)."""
        tpr = self.tpr >> 4
        irrv = (self.irr.bit_length() - 1) >> 4 if self.irr else 0
        isrv = (self.isr.bit_length() - 1) >> 4 if self.isr else 0
        if tpr >= irrv and tpr > isrv:
            return self.tpr
        return max(tpr, irrv, isrv) << 4

    @property
    def cr8(self) -> int:
        """CR8 in 64-bit mode is TPR[7:4] (10.8.6.1)."""
        return self.tpr >> 4

    def write_cr8(self, value: int) -> None:
        """MOV to CR8: TPR[7:4] = value[3:0], TPR[3:0] = 0 (10.8.6.1)."""
        self.tpr = (value & 0xF) << 4
        self._update()

    def highest_deliverable(self) -> int:
        """The IRR vector the CPU would take now, or -1 (10.8.3.1: class above the PPR's)."""
        irr = self.irr
        if not irr or not self.svr & SVR_ENABLE:
            return -1
        v = irr.bit_length() - 1
        return v if v >> 4 > self.ppr() >> 4 else -1

    # -- InterruptSource (devices/irqchip.py) -------------------------------------
    @property
    def intr(self) -> bool:
        """The CPU's INTR input."""
        if not self.apic_base & BASE_ENABLE:
            pic = self.pic
            return pic is not None and bool(pic.intr)
        if self.extint_pending or self._lint0_extint():
            return True
        return self.highest_deliverable() >= 0

    def acknowledge(self) -> int:
        """The INTA cycle: the vector the CPU takes (ExtINT first, then IRR -> ISR,
        else the spurious vector)."""
        if not self.apic_base & BASE_ENABLE:
            vector = self._pic_acknowledge()
        elif self.extint_pending or self._lint0_extint():
            self.extint_pending = False
            vector = self._pic_acknowledge()
        else:
            v = self.highest_deliverable()
            if v < 0:
                vector = self.svr & 0xFF
            else:
                bit = 1 << v
                self.irr &= ~bit
                self.isr |= bit
                vector = v
        self._update()
        return vector

    def _pic_acknowledge(self) -> int:
        if self.pic is None:
            return self.svr & 0xFF
        return self.pic.acknowledge() & 0xFF

    def _lint0_extint(self) -> bool:
        lvt = self.lvt[LVT_LINT0]
        return (not lvt & LVT_MASKED and (lvt >> 8) & 7 == DM_EXTINT
                and self.pic is not None and bool(self.pic.intr))

    def _update(self) -> None:
        """Tell the vCPU when its INTR input changed."""
        level = self.intr
        if level != self._intr_seen:
            self._intr_seen = level
            self.pins.kick()

    # -- messages from the APIC bus ------------------------------------------------
    def receive(self, mode: int, vector: int, level_triggered: bool = False) -> None:
        """Accept one message addressed to this APIC (apicbus.py)."""
        if not self.apic_base & BASE_ENABLE:
            return
        if mode == DM_FIXED or mode == DM_LOWEST:
            if self.svr & SVR_ENABLE:
                self._accept(vector, level_triggered)
        elif mode == DM_NMI:
            self.pins.raise_nmi()
        elif mode == DM_SMI:
            self._raise_smi()
        elif mode == DM_INIT:
            self.pins.raise_init()
        elif mode == DM_STARTUP:
            self.pins.raise_sipi(vector & 0xFF)
        elif mode == DM_EXTINT:
            self.extint_pending = True
            self._update()

    def _raise_smi(self) -> None:
        self.pins.smi = True
        self.pins.kick()

    def _accept(self, vector: int, level_triggered: bool) -> None:
        """10.8.4: a fixed interrupt enters the IRR; the TMR records its trigger mode."""
        vector &= 0xFF
        if vector < 16:
            self._error(ESR_RECEIVE_ILLEGAL_VECTOR)
            return
        bit = 1 << vector
        self.irr |= bit
        if level_triggered:
            self.tmr |= bit
        else:
            self.tmr &= ~bit
        self._update()

    def _error(self, bits: int) -> None:
        """10.5.3: log an error and raise the error LVT."""
        self.esr_pending |= bits
        lvt = self.lvt[LVT_ERROR]
        if lvt & LVT_MASKED:
            return
        if lvt & 0xFF < 16:
            # An illegal vector in the error LVT is itself an error; it must
            # not raise another error interrupt, or this would never end.
            self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR
            return
        self._accept(lvt & 0xFF, False)

    def _local(self, index: int) -> None:
        """Raise the interrupt of LVT entry ``index`` (10.5.1)."""
        lvt = self.lvt[index]
        if lvt & LVT_MASKED:
            return
        mode = DM_FIXED if index in (LVT_TIMER, LVT_ERROR) else (lvt >> 8) & 7
        if mode == DM_FIXED:
            level = index == LVT_LINT0 and bool(lvt & LVT_LEVEL)
            if level and lvt & 0xFF >= 16:
                self.lvt[index] |= LVT_REMOTE_IRR
            self._accept(lvt & 0xFF, level)
        elif mode == DM_NMI:
            self.pins.raise_nmi()
        elif mode == DM_SMI:
            self._raise_smi()
        elif mode == DM_INIT:
            self.pins.raise_init()
        elif mode == DM_EXTINT:
            self._update()

    # -- the LINT0/LINT1 pins ----------------------------------------------------------
    def set_lint(self, pin: int, level: bool) -> None:
        """Drive input LINT0 (``pin`` 0) or LINT1 (1); ``level`` is asserted/deasserted."""
        if pin not in (0, 1):
            raise ValueError(f"local APIC pins are LINT0 and LINT1, not {pin}")
        level = bool(level)
        old = self.lint[pin]
        if level == old:
            return
        self.lint[pin] = level
        if not self.apic_base & BASE_ENABLE:
            # 10.4.3: with the APIC off, LINT0 is the CPU's INTR, LINT1 its NMI.
            if pin == 1 and level:
                self.pins.raise_nmi()
            self._update()
            return
        index = LVT_LINT0 + pin
        lvt = self.lvt[index]
        mode = (lvt >> 8) & 7
        if mode == DM_EXTINT:
            self._update()
        elif pin == 0 and mode == DM_FIXED and lvt & LVT_LEVEL:
            if level:
                if not lvt & LVT_REMOTE_IRR:
                    self._local(index)
            else:
                self._withdraw_lint0(lvt)
        elif level:
            self._local(index)

    def _withdraw_lint0(self, lvt: int) -> None:
        """A level request that falls before the CPU took it is withdrawn (as QEMU)."""
        bit = 1 << (lvt & 0xFF)
        if lvt & LVT_REMOTE_IRR and self.irr & bit and not self.isr & bit:
            self.irr &= ~bit
            self.lvt[LVT_LINT0] &= ~LVT_REMOTE_IRR
            self._update()

    # -- EOI (10.8.5) -----------------------------------------------------------------
    def _eoi(self) -> None:
        if not self.isr:
            return
        v = self.isr.bit_length() - 1
        self.isr &= ~(1 << v)
        lvt0 = self.lvt[LVT_LINT0]
        if lvt0 & LVT_REMOTE_IRR and lvt0 & 0xFF == v:
            self.lvt[LVT_LINT0] = lvt0 & ~LVT_REMOTE_IRR
            if self.lint[0] and (lvt0 >> 8) & 7 == DM_FIXED and lvt0 & LVT_LEVEL:
                self._local(LVT_LINT0)
        if self.tmr >> v & 1:
            self.bus.eoi(v)
        self._update()

    # -- IPIs (10.6.1) ------------------------------------------------------------------
    def _send_ipi(self) -> None:
        lo = self.icr_lo
        vector = lo & 0xFF
        mode = (lo >> 8) & 7
        if mode == DM_REMOTE_READ or mode == DM_EXTINT:
            return
        if mode in (DM_FIXED, DM_LOWEST) and vector < 16:
            self._error(ESR_SEND_ILLEGAL_VECTOR)
            return
        init = mode == DM_INIT
        msg = ApicMessage(
            vector=vector,
            delivery_mode=mode,
            dest=self.icr_hi >> 24,
            logical=bool(lo & 0x800),
            level_triggered=init and bool(lo & 0x8000),
            asserted=not init or bool(lo & 0x4000),
            shorthand=(lo >> 18) & 3,
        )
        self.bus.send(msg, source=self)

    # -- the timer (10.5.4) -------------------------------------------------------------
    @property
    def timer_mode(self) -> int:
        return (self.lvt[LVT_TIMER] >> 17) & 3

    def _period(self, divisor: int | None = None) -> int:
        d = timer_divisor(self.tdcr) if divisor is None else divisor
        return max(self.tmict * d, MIN_PERIOD)

    def current_count(self) -> int:
        mode = self.timer_mode
        if self.tmict == 0 or mode not in (TIMER_ONESHOT, TIMER_PERIODIC):
            return 0
        elapsed = self.clock.now() - self.t0
        if mode == TIMER_PERIODIC:
            elapsed %= self._period()
        return min(self.tmict, max(0, self.tmict - elapsed // timer_divisor(self.tdcr)))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, deadline: int | None) -> None:
        self._cancel_timer()
        self.timer_next = deadline
        if deadline is not None:
            self._timer = self.clock.schedule(deadline, self._on_timer, self.timer_name)

    def _next_boundary(self, after: int) -> int:
        """The first expiry of the periodic grid t0 + k*period that is later than ``after``."""
        p = self._period()
        return after + p - ((after - self.t0) % p)

    def _write_tmict(self, value: int) -> None:
        mode = self.timer_mode
        if mode not in (TIMER_ONESHOT, TIMER_PERIODIC):
            return  # ignored in TSC-deadline mode (10.5.4.1) and the reserved mode
        self.tmict = value
        now = self.clock.now()
        self.t0 = now
        if value == 0:
            self._arm(None)
        elif mode == TIMER_ONESHOT:
            self._arm(now + value * timer_divisor(self.tdcr))
        elif self.lvt[LVT_TIMER] & LVT_MASKED:
            self._arm(None)
        else:
            self._arm(now + self._period())

    def _write_tdcr(self, value: int) -> None:
        """A new divisor takes effect from the current count on (KVM rescales the same way)."""
        old = timer_divisor(self.tdcr)
        self.tdcr = value
        new = timer_divisor(value)
        mode = self.timer_mode
        if new == old or self.tmict == 0 or mode not in (TIMER_ONESHOT, TIMER_PERIODIC):
            return
        now = self.clock.now()
        elapsed = now - self.t0
        if mode == TIMER_PERIODIC:
            elapsed %= self._period(old)
        counted = min(elapsed // old, self.tmict)
        self.t0 = now - counted * new
        if self.timer_next is None:
            return  # an expired one-shot (its count stays 0) or a masked periodic timer
        if mode == TIMER_ONESHOT:
            self._arm(self.t0 + self.tmict * new)
        else:
            nxt = self.t0 + self._period()
            self._arm(nxt if nxt >= now else self._next_boundary(now))

    def _write_lvt_timer(self, value: int) -> None:
        old_mode = self.timer_mode
        self.lvt[LVT_TIMER] = value
        if self.timer_mode != old_mode:
            # 10.5.4.1: a write that changes the timer mode disarms the timer.
            self.tmict = 0
            self.tsc_deadline = 0
            self._arm(None)
            return
        self._timer_mask_changed()

    def _timer_mask_changed(self) -> None:
        """A periodic timer is only on the clock while its LVT entry is unmasked."""
        if self.timer_mode != TIMER_PERIODIC or self.tmict == 0:
            return
        if self.lvt[LVT_TIMER] & LVT_MASKED:
            self._arm(None)
        elif self.timer_next is None:
            self._arm(self._next_boundary(self.clock.now()))

    def _on_timer(self, now: int) -> None:
        deadline = self.timer_next
        self._timer = None
        self.timer_next = None
        if deadline is None:
            return
        mode = self.timer_mode
        if mode == TIMER_TSC_DEADLINE:
            self.tsc_deadline = 0  # 10.5.4.1: the timer disarms itself and clears the MSR
        elif mode == TIMER_PERIODIC and self.tmict:
            nxt = deadline + self._period()
            if nxt <= now:
                nxt = self._next_boundary(now)
            if not self.lvt[LVT_TIMER] & LVT_MASKED:
                self._arm(nxt)
        self._local(LVT_TIMER)

    def _write_tsc_deadline(self, value: int) -> None:
        if self.timer_mode != TIMER_TSC_DEADLINE:
            return  # 10.5.4.1: writes are ignored in the other modes
        self.tsc_deadline = value
        if value == 0:
            self._arm(None)
        elif value <= self.clock.now():
            # A deadline already passed fires at once.
            self._arm(None)
            self.tsc_deadline = 0
            self._local(LVT_TIMER)
        else:
            self._arm(value)

    # -- MSRs ------------------------------------------------------------------------------
    def msr_read(self, index: int) -> int | None:
        """IA32_APIC_BASE and IA32_TSC_DEADLINE; None for MSRs this device does not own."""
        if index == MSR_APIC_BASE:
            return self.apic_base
        if index == MSR_TSC_DEADLINE:
            return self.tsc_deadline if self.timer_mode == TIMER_TSC_DEADLINE else 0
        return None

    def msr_write(self, index: int, value: int) -> bool:
        """False for MSRs this device does not own and for writes the CPU refuses
        (reserved bits in IA32_APIC_BASE): the machine raises #GP for both."""
        if index == MSR_TSC_DEADLINE:
            self._write_tsc_deadline(value & U64)
            return True
        if index != MSR_APIC_BASE:
            return False
        value &= U64
        if value & ~(BASE_ADDR_MASK | BASE_BSP | BASE_ENABLE):
            return False
        old_base = self.base_address
        was_enabled = self.hw_enabled
        self.apic_base = (value & (BASE_ADDR_MASK | BASE_ENABLE)) | (self.apic_base & BASE_BSP)
        if was_enabled and not self.hw_enabled:
            self._init_registers()
        new_base = self.base_address
        self._update()
        if new_base != old_base and self.on_base_change is not None:
            self.on_base_change(old_base, new_base)
        return True

    # -- MMIO --------------------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        if not self.apic_base & BASE_ENABLE:
            return SIZE_MASK.get(size, _U32)
        if size != 4 or offset & 0xF:
            return 0
        return self.read_register(offset)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if not self.apic_base & BASE_ENABLE or size != 4 or offset & 0xF:
            return
        self.write_register(offset, value & _U32)

    def read_register(self, reg: int) -> int:
        """The 32-bit register at offset ``reg`` (a multiple of 16)."""
        if reg == REG_ID:
            return self.apic_id << 24
        if reg == REG_VERSION:
            return APIC_VERSION
        if reg == REG_TPR:
            return self.tpr
        if reg == REG_APR:
            return self.arbitration_priority()
        if reg == REG_PPR:
            return self.ppr()
        if reg in (REG_EOI, REG_RRD):
            return 0
        if reg == REG_LDR:
            return self.ldr
        if reg == REG_DFR:
            return self.dfr | 0x0FFF_FFFF
        if reg == REG_SVR:
            return self.svr
        if REG_ISR <= reg < REG_ISR + 0x80:
            return (self.isr >> (32 * ((reg - REG_ISR) >> 4))) & _U32
        if REG_TMR <= reg < REG_TMR + 0x80:
            return (self.tmr >> (32 * ((reg - REG_TMR) >> 4))) & _U32
        if REG_IRR <= reg < REG_IRR + 0x80:
            return (self.irr >> (32 * ((reg - REG_IRR) >> 4))) & _U32
        if reg == REG_ESR:
            return self.esr
        if reg == REG_ICR_LO:
            return self.icr_lo
        if reg == REG_ICR_HI:
            return self.icr_hi
        if reg in _LVT_AT:
            return self.lvt[_LVT_AT[reg]]
        if reg == REG_TMICT:
            return self.tmict
        if reg == REG_TMCCT:
            return self.current_count()
        if reg == REG_TDCR:
            return self.tdcr
        self._error(ESR_ILLEGAL_REGISTER)
        return 0

    def write_register(self, reg: int, value: int) -> None:
        """Write the 32-bit register at offset ``reg`` (a multiple of 16)."""
        if reg not in _REG_SLOTS:
            self._error(ESR_ILLEGAL_REGISTER)
        elif reg == REG_ID:
            self.apic_id = value >> 24
        elif reg == REG_TPR:
            self.tpr = value & 0xFF
            self._update()
        elif reg == REG_EOI:
            self._eoi()
        elif reg == REG_LDR:
            self.ldr = value & LDR_WRITABLE
        elif reg == REG_DFR:
            self.dfr = value & DFR_WRITABLE
        elif reg == REG_SVR:
            self._write_svr(value)
        elif reg == REG_ESR:
            self.esr = self.esr_pending
            self.esr_pending = 0
        elif reg == REG_ICR_LO:
            self.icr_lo = value & ICR_LO_WRITABLE
            self._send_ipi()
        elif reg == REG_ICR_HI:
            self.icr_hi = value & ICR_HI_WRITABLE
        elif reg in _LVT_AT:
            self._write_lvt(_LVT_AT[reg], value)
        elif reg == REG_TMICT:
            self._write_tmict(value)
        elif reg == REG_TDCR:
            self._write_tdcr(value & TDCR_WRITABLE)
        # the rest (version, APR, PPR, RRD, ISR, TMR, IRR, current count) is read-only

    def _write_svr(self, value: int) -> None:
        was_enabled = self.svr & SVR_ENABLE
        self.svr = value & SVR_WRITABLE
        if was_enabled and not self.svr & SVR_ENABLE:
            # 10.4.7.2: software disable masks every LVT entry.
            for i in range(7):
                self.lvt[i] |= LVT_MASKED
            self._timer_mask_changed()
        self._update()

    def _write_lvt(self, index: int, value: int) -> None:
        keep = self.lvt[index] & LVT_REMOTE_IRR if index == LVT_LINT0 else 0
        value = (value & LVT_WRITABLE[index]) | keep
        if not self.svr & SVR_ENABLE:
            value |= LVT_MASKED  # 10.4.7.2: masks cannot be cleared while software-disabled
        if index == LVT_TIMER:
            self._write_lvt_timer(value)
            return
        if index == LVT_LINT0 and not value & LVT_LEVEL:
            value &= ~LVT_REMOTE_IRR
        self.lvt[index] = value
        if index == LVT_LINT0:
            # A level request still asserted on the pin is taken once unmasked.
            mode = (value >> 8) & 7
            if (mode == DM_FIXED and value & LVT_LEVEL and self.lint[0]
                    and not value & (LVT_MASKED | LVT_REMOTE_IRR)):
                self._local(LVT_LINT0)
            self._update()

    # -- state ----------------------------------------------------------------------------
    def save_state(self) -> State:
        return {
            "kind": KIND,
            "version": VERSION,
            "id": self.apic_id,
            "apic_base": self.apic_base,
            "tpr": self.tpr,
            "ldr": self.ldr,
            "dfr": self.dfr,
            "svr": self.svr,
            "irr": _words(self.irr),
            "isr": _words(self.isr),
            "tmr": _words(self.tmr),
            "esr": self.esr,
            "esr_pending": self.esr_pending,
            "icr_lo": self.icr_lo,
            "icr_hi": self.icr_hi,
            "lvt": list(self.lvt),
            "tmict": self.tmict,
            "tdcr": self.tdcr,
            "t0": self.t0,
            "timer_next": self.timer_next,
            "tsc_deadline": self.tsc_deadline,
            "lint": list(self.lint),
            "extint_pending": self.extint_pending,
        }

    def load_state(self, state: State) -> None:
        self.apply_state(self.parse_state(state))

    def parse_state(self, state: State) -> dict[str, Any]:
        """Validate a saved state; DeviceStateError for anything malformed."""
        check_state(state, KIND, VERSION)
        out: dict[str, Any] = {}

        def num(key: str, lo: int, hi: int, valid: int | None = None) -> int:
            if key not in state:
                raise DeviceStateError(f"{KIND}: state lacks {key!r}")
            v = state[key]
            if type(v) is not int or not lo <= v <= hi or (valid is not None and v & ~valid):
                raise DeviceStateError(f"{KIND}: {key!r} is not a valid value: {v!r}")
            return v

        def bits256(key: str) -> int:
            words = state.get(key)
            if (not isinstance(words, list) or len(words) != 8
                    or any(type(w) is not int or not 0 <= w <= _U32 for w in words)):
                raise DeviceStateError(f"{KIND}: {key!r} must be a list of 8 32-bit words")
            if words[0] & 0xFFFF:
                raise DeviceStateError(f"{KIND}: {key!r} holds vectors 0-15")
            return sum(w << (32 * i) for i, w in enumerate(words))

        out["id"] = num("id", 0, 0xFF)
        out["apic_base"] = num("apic_base", 0, U64, BASE_ADDR_MASK | BASE_BSP | BASE_ENABLE)
        out["tpr"] = num("tpr", 0, 0xFF)
        out["ldr"] = num("ldr", 0, _U32, LDR_WRITABLE)
        out["dfr"] = num("dfr", 0, _U32, DFR_WRITABLE)
        out["svr"] = num("svr", 0, SVR_WRITABLE)
        for key in ("irr", "isr", "tmr"):
            out[key] = bits256(key)
        out["esr"] = num("esr", 0, 0xFF, ESR_BITS)
        out["esr_pending"] = num("esr_pending", 0, 0xFF, ESR_BITS)
        out["icr_lo"] = num("icr_lo", 0, _U32, ICR_LO_WRITABLE)
        out["icr_hi"] = num("icr_hi", 0, _U32, ICR_HI_WRITABLE)
        lvt = state.get("lvt")
        if not isinstance(lvt, list) or len(lvt) != 7:
            raise DeviceStateError(f"{KIND}: 'lvt' must be a list of 7 entries")
        for i, v in enumerate(lvt):
            valid = LVT_WRITABLE[i] | (LVT_REMOTE_IRR if i == LVT_LINT0 else 0)
            if type(v) is not int or not 0 <= v <= _U32 or v & ~valid:
                raise DeviceStateError(f"{KIND}: LVT entry {i} is not valid: {v!r}")
        out["lvt"] = list(lvt)
        out["tmict"] = num("tmict", 0, _U32)
        out["tdcr"] = num("tdcr", 0, TDCR_WRITABLE, TDCR_WRITABLE)
        if "t0" not in state or type(state["t0"]) is not int:
            raise DeviceStateError(f"{KIND}: 't0' must be an int")
        out["t0"] = state["t0"]
        if "timer_next" not in state:
            raise DeviceStateError(f"{KIND}: state lacks 'timer_next'")
        nxt = state["timer_next"]
        if nxt is not None and type(nxt) is not int:
            raise DeviceStateError(f"{KIND}: 'timer_next' must be an int or None")
        out["timer_next"] = nxt
        out["tsc_deadline"] = num("tsc_deadline", 0, U64)
        lint = state.get("lint")
        if not isinstance(lint, list) or len(lint) != 2 or any(type(x) is not bool for x in lint):
            raise DeviceStateError(f"{KIND}: 'lint' must be a list of 2 bools")
        out["lint"] = list(lint)
        if type(state.get("extint_pending")) is not bool:
            raise DeviceStateError(f"{KIND}: 'extint_pending' must be a bool")
        out["extint_pending"] = state["extint_pending"]
        return out

    def apply_state(self, st: dict[str, Any]) -> None:
        """Install a state ``parse_state`` accepted: re-arms the timer, tells nobody."""
        self._cancel_timer()
        self.apic_id = st["id"]
        self.apic_base = st["apic_base"]
        for key in ("tpr", "ldr", "dfr", "svr", "irr", "isr", "tmr", "esr", "esr_pending", "icr_lo",
                    "icr_hi", "tmict", "tdcr", "t0", "tsc_deadline", "extint_pending"):
            setattr(self, key, st[key])
        self.lvt = list(st["lvt"])
        self.lint = list(st["lint"])
        self.timer_next = None
        if st["timer_next"] is not None:
            self._arm(st["timer_next"])
        # Unknown until the next event: INTR may also depend on an 8259 that
        # is loaded after this APIC, so that event kicks the vCPU regardless.
        self._intr_seen = None


class LocalApicBank:
    """The local APICs of every vCPU behind one MMIO claim.

    Each vCPU sees its own APIC at the same address: the bus passes the id of
    the accessing vCPU (``wants_vcpu``) and the bank forwards the access.  The
    bank's state holds every APIC's state, in vCPU order.
    """

    kind = BANK_KIND
    wants_vcpu = True
    mmio_sizes = (4,)

    def __init__(self, lapics: Sequence[LocalApic], name: str = "lapic") -> None:
        if not lapics:
            raise ValueError("a local APIC bank needs at least one APIC")
        self.name = name
        self.lapics = tuple(lapics)
        self._by_vcpu: dict[int, LocalApic] = {}
        for a in self.lapics:
            if a.vcpu_id in self._by_vcpu:
                raise ValueError(f"two local APICs for vCPU {a.vcpu_id}")
            self._by_vcpu[a.vcpu_id] = a

    def lapic(self, vcpu: int) -> LocalApic:
        return self._by_vcpu[vcpu]

    def attach_pic(self, pic: Any) -> None:
        """Wire the 8259 pair's INTR output to LINT0 of every APIC (virtual wire)."""
        for a in self.lapics:
            a.pic = pic
        pic.on_intr_change = self.pic_intr_changed
        self.pic_intr_changed(bool(pic.intr))

    def pic_intr_changed(self, level: bool) -> None:
        for a in self.lapics:
            a.set_lint(0, level)

    def msr_read(self, index: int, vcpu: int) -> int | None:
        """RDMSR on ``vcpu``: its APIC's MSRs (see LocalApic.msr_read)."""
        a = self._by_vcpu.get(vcpu)
        return None if a is None else a.msr_read(index)

    def msr_write(self, index: int, value: int, vcpu: int) -> bool:
        """WRMSR on ``vcpu``; False means not an APIC MSR or a refused value (#GP)."""
        a = self._by_vcpu.get(vcpu)
        return a is not None and a.msr_write(index, value)

    # -- MMIO -------------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int, vcpu: int) -> int:
        a = self._by_vcpu.get(vcpu)
        if a is None:
            return SIZE_MASK.get(size, _U32)
        return a.mmio_read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int, vcpu: int) -> None:
        a = self._by_vcpu.get(vcpu)
        if a is not None:
            a.mmio_write(offset, size, value)

    # -- Device protocol -----------------------------------------------------------------
    def reset(self) -> None:
        for a in self.lapics:
            a.reset()

    def save_state(self) -> State:
        return {"kind": BANK_KIND, "version": VERSION, "lapics": [a.save_state() for a in self.lapics]}

    def load_state(self, state: State) -> None:
        check_state(state, BANK_KIND, VERSION)
        states = state.get("lapics")
        if not isinstance(states, list) or len(states) != len(self.lapics):
            raise DeviceStateError(f"{BANK_KIND}: 'lapics' must be a list of {len(self.lapics)} states")
        parsed = [a.parse_state(s) for a, s in zip(self.lapics, states)]
        for a, st in zip(self.lapics, parsed):
            a.apply_state(st)
