"""The Intel 82093AA I/O APIC: 24 interrupt inputs turned into APIC bus messages.

Implements, from the 82093AA datasheet (order no. 290566):

* 3.0 "Register Description": the two memory-mapped registers IOREGSEL
  (offset 0x00, 8-bit register index) and IOWIN (offset 0x10, the selected
  32-bit register).  Like QEMU, the chip decodes only the low 8 address bits
  of its window (the datasheet's xy relocation bits select the window, not a
  register), so the registers repeat every 256 bytes.
* 3.2.1 IOAPICID (index 0x00, bits 27:24 read/write), 3.2.2 IOAPICVER (0x01,
  0x00170011: version 0x11, highest entry 0x17), 3.2.3 IOAPICARB (0x02, read
  only; it is loaded from the ID register, and the rotation the one-wire
  arbitration would make is not modelled because messages here never
  contend), 3.2.4 IOREDTBL0-23 (0x10-0x3F, two registers per entry):
  vector, delivery mode, destination mode, delivery status (always idle:
  delivery takes no time), polarity, remote IRR (read only), trigger mode,
  mask, destination.  Undefined indices read 0 and ignore writes, as QEMU.
* Edge- and level-sensitive inputs: an edge on an unmasked input sends one
  message, an edge on a masked input is ignored (datasheet, "Interrupt
  Mask"; QEMU's ioapic_set_irq does the same).  A level input sends a
  message while it is asserted, unmasked and its remote IRR is clear; the
  message sets remote IRR, and the EOI broadcast of its vector from a local
  APIC (apicbus.py) clears it, after which a still asserted input sends
  again.  Delivery modes other than fixed and lowest priority are always
  edge-sensitive, as the datasheet requires them to be programmed.

Also from QEMU's hw/intc/ioapic.c, because guests depend on it:

* Version 0x20 I/O APICs (``version=0x20``) have the directed EOI register
  at offset 0x40: writing a vector there acts like that vector's EOI
  broadcast.  Version 0x11 has no such register (writes are ignored).
* Writing an entry with the edge trigger mode clears its remote IRR: Linux
  (__eoi_ioapic_pin) flips a stuck level entry to edge and back to clear it
  on I/O APICs without the EOI register.
* An input that is re-asserted by 10,000 EOIs in a row is serviced again
  only 10 ms (virtual) later, so a guest whose handler never quiets a
  level-triggered device still makes progress (QEMU's
  SUCCESSIVE_IRQ_MAX_COUNT).

Polarity.  An input's IrqLine level is whether the input is *asserted*: a
device raises its line to request an interrupt whether the physical wire is
active-high (ISA) or active-low (PCI INTx).  The polarity bit of a
redirection entry is stored and read back but not applied, exactly as in
QEMU's ioapic_set_irq, because the firmware tables (MP/ACPI) describe the
wire's polarity and Linux programs the entry to match; applying the bit to an
already asserted-high signal would invert every PCI interrupt.

The board decides what drives each input (ISA IRQ0 -> input 2 on a PC, as
QEMU's ioapic_set_irq hard-codes); that mapping is not made here.
"""
from __future__ import annotations

from devices.apic.apicbus import DM_FIXED, DM_LOWEST, ApicBus, ApicMessage
from devices.base import DeviceStateError, IrqLine, State, check_state
from devices.clock import TICK_HZ, Timer, VirtualClock

KIND = "ioapic"
VERSION = 1

IOAPIC_BASE = 0xFEC0_0000
WINDOW = 0x1000
PINS = 24

IOREGSEL = 0x00
IOWIN = 0x10
IOEOI = 0x40

REG_ID = 0x00
REG_VERSION = 0x01
REG_ARB = 0x02
REG_REDTBL = 0x10

RTE_DEST_LOGICAL = 1 << 11
RTE_DELIVERY_STATUS = 1 << 12
RTE_POLARITY = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_LEVEL = 1 << 15
RTE_MASKED = 1 << 16
RTE_LO_WRITABLE = 0x0001_AFFF  # vector, delivery mode, dest mode, polarity, trigger, mask
RTE_HI_WRITABLE = 0xFF00_0000  # destination (bits 63:56)
RTE_VALID = RTE_LO_WRITABLE | RTE_REMOTE_IRR | (RTE_HI_WRITABLE << 32)

STORM_EOIS = 10_000
STORM_DELAY = TICK_HZ // 100  # 10 ms


class IoApic:
    """An 82093AA on the APIC bus; inputs are ``irq_line(pin)`` wires."""

    kind = KIND
    mmio_sizes = (4,)

    def __init__(self, clock: VirtualClock, bus: ApicBus, *, apic_id: int = 0, version: int = 0x11,
                 name: str = "ioapic") -> None:
        if version not in (0x11, 0x20):
            raise ValueError(f"I/O APIC version must be 0x11 or 0x20, not {version:#x}")
        if not 0 <= apic_id <= 0xF:
            raise ValueError(f"I/O APIC ids are 4 bits, not {apic_id}")
        self.clock = clock
        self.bus = bus
        self.name = name
        self.version = version
        self.initial_id = apic_id
        self.timer_name = f"{name}.eoi-storm"
        self._inputs = [IrqLine(f"{name}.pin{n}") for n in range(PINS)]
        for n, line in enumerate(self._inputs):
            line.connect(lambda level, n=n: self.set_irq(n, level))
        self.lines = 0  # asserted inputs, one bit per pin
        self._storm: Timer | None = None
        self.storm_deadline: int | None = None
        self.id = apic_id
        self.ioregsel = 0
        self.redir = [RTE_MASKED] * PINS
        self.eoi_counts = [0] * PINS
        bus.attach_ioapic(self)

    # -- inputs ----------------------------------------------------------------------
    def irq_line(self, pin: int) -> IrqLine:
        if not 0 <= pin < PINS:
            raise ValueError(f"I/O APIC inputs are 0-{PINS - 1}, not {pin}")
        return self._inputs[pin]

    def set_irq(self, pin: int, level: bool) -> None:
        """Drive input ``pin`` to ``level`` (True: asserted)."""
        if not 0 <= pin < PINS:
            raise ValueError(f"I/O APIC inputs are 0-{PINS - 1}, not {pin}")
        level = bool(level)
        self._inputs[pin].level = level
        bit = 1 << pin
        was = bool(self.lines & bit)
        if level:
            self.lines |= bit
        else:
            self.lines &= ~bit
        entry = self.redir[pin]
        if _level_sensitive(entry):
            if level:
                self._service(pin)
        elif level and not was and not entry & RTE_MASKED:
            self._send(pin)

    def _service(self, pin: int) -> None:
        """A level input sends while asserted, unmasked and not awaiting its EOI."""
        entry = self.redir[pin]
        if self.lines >> pin & 1 and not entry & (RTE_MASKED | RTE_REMOTE_IRR):
            self._send(pin)

    def _send(self, pin: int) -> None:
        entry = self.redir[pin]
        mode = (entry >> 8) & 7
        level = _level_sensitive(entry)
        if level:
            # Set whether or not some local APIC takes the message, as QEMU
            # does: nothing on this bus can refuse or retry one.
            self.redir[pin] = entry | RTE_REMOTE_IRR
        self.bus.send(ApicMessage(
            vector=entry & 0xFF,
            delivery_mode=mode,
            dest=(entry >> 56) & 0xFF,
            logical=bool(entry & RTE_DEST_LOGICAL),
            level_triggered=level,
        ))

    # -- EOI ----------------------------------------------------------------------------
    def eoi(self, vector: int) -> None:
        """A local APIC's EOI broadcast (or the EOI register): clear remote IRR of
        the level entries with this vector; an input still asserted sends again."""
        vector &= 0xFF
        for pin in range(PINS):
            entry = self.redir[pin]
            if entry & 0xFF != vector or not entry & RTE_LEVEL or not entry & RTE_REMOTE_IRR:
                continue
            self.redir[pin] = entry & ~RTE_REMOTE_IRR
            if entry & RTE_MASKED or not self.lines >> pin & 1:
                self.eoi_counts[pin] = 0
                continue
            self.eoi_counts[pin] += 1
            if self.eoi_counts[pin] >= STORM_EOIS:
                self.eoi_counts[pin] = 0
                self._defer_service(self.clock.now() + STORM_DELAY)
            else:
                self._service(pin)

    def _defer_service(self, deadline: int) -> None:
        if self.storm_deadline is not None and self.storm_deadline <= deadline:
            return
        self._arm_storm(deadline)

    def _arm_storm(self, deadline: int | None) -> None:
        if self._storm is not None:
            self._storm.cancel()
            self._storm = None
        self.storm_deadline = deadline
        if deadline is not None:
            self._storm = self.clock.schedule(deadline, self._on_storm, self.timer_name)

    def _on_storm(self, now: int) -> None:
        self._storm = None
        self.storm_deadline = None
        for pin in range(PINS):
            if _level_sensitive(self.redir[pin]):
                self._service(pin)

    # -- MMIO ---------------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        offset &= 0xFF
        if offset == IOREGSEL:
            return self.ioregsel
        if offset == IOWIN:
            return self.read_register(self.ioregsel)
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        offset &= 0xFF
        if offset == IOREGSEL:
            self.ioregsel = value & 0xFF
        elif offset == IOWIN:
            self.write_register(self.ioregsel, value & 0xFFFF_FFFF)
        elif offset == IOEOI and self.version == 0x20:
            self.eoi(value & 0xFF)

    def read_register(self, index: int) -> int:
        if index in (REG_ID, REG_ARB):
            return self.id << 24
        if index == REG_VERSION:
            return ((PINS - 1) << 16) | self.version
        pin = (index - REG_REDTBL) >> 1
        if 0 <= pin < PINS:
            return (self.redir[pin] >> (32 if index & 1 else 0)) & 0xFFFF_FFFF
        return 0

    def write_register(self, index: int, value: int) -> None:
        if index == REG_ID:
            self.id = (value >> 24) & 0xF
            return
        pin = (index - REG_REDTBL) >> 1
        if not 0 <= pin < PINS:
            return
        entry = self.redir[pin]
        if index & 1:
            entry = (entry & 0xFFFF_FFFF) | ((value & RTE_HI_WRITABLE) << 32)
        else:
            entry = (entry & ~RTE_LO_WRITABLE) | (value & RTE_LO_WRITABLE)
        if not entry & RTE_LEVEL:
            entry &= ~RTE_REMOTE_IRR
        self.redir[pin] = entry
        self.eoi_counts[pin] = 0
        if _level_sensitive(entry):
            self._service(pin)

    # -- Device protocol ----------------------------------------------------------------
    def reset(self) -> None:
        """Power-up: every entry masked, ID back to its initial value; input levels kept."""
        self.id = self.initial_id
        self.ioregsel = 0
        self.redir = [RTE_MASKED] * PINS
        self.eoi_counts = [0] * PINS
        self._arm_storm(None)

    def save_state(self) -> State:
        return {
            "kind": KIND,
            "version": VERSION,
            "id": self.id,
            "ioregsel": self.ioregsel,
            "redir": list(self.redir),
            "lines": self.lines,
            "eoi_counts": list(self.eoi_counts),
            "storm_deadline": self.storm_deadline,
        }

    def load_state(self, state: State) -> None:
        check_state(state, KIND, VERSION)
        for key in ("id", "ioregsel", "redir", "lines", "eoi_counts", "storm_deadline"):
            if key not in state:
                raise DeviceStateError(f"{KIND}: state lacks {key!r}")
        ident, sel, lines, storm = state["id"], state["ioregsel"], state["lines"], state["storm_deadline"]
        redir, counts = state["redir"], state["eoi_counts"]
        if type(ident) is not int or not 0 <= ident <= 0xF:
            raise DeviceStateError(f"{KIND}: 'id' must be an int in 0..15")
        if type(sel) is not int or not 0 <= sel <= 0xFF:
            raise DeviceStateError(f"{KIND}: 'ioregsel' must be an int in 0..255")
        if type(lines) is not int or not 0 <= lines < 1 << PINS:
            raise DeviceStateError(f"{KIND}: 'lines' must be a {PINS}-bit mask")
        if storm is not None and type(storm) is not int:
            raise DeviceStateError(f"{KIND}: 'storm_deadline' must be an int or None")
        if (not isinstance(redir, list) or len(redir) != PINS
                or any(type(e) is not int or not 0 <= e < 1 << 64 or e & ~RTE_VALID for e in redir)):
            raise DeviceStateError(f"{KIND}: 'redir' must be {PINS} valid redirection entries")
        if (not isinstance(counts, list) or len(counts) != PINS
                or any(type(c) is not int or not 0 <= c < STORM_EOIS for c in counts)):
            raise DeviceStateError(f"{KIND}: 'eoi_counts' must be {PINS} ints below {STORM_EOIS}")
        self.id = ident
        self.ioregsel = sel
        self.redir = list(redir)
        self.eoi_counts = list(counts)
        self.lines = lines
        for n, line in enumerate(self._inputs):
            line.level = bool(lines >> n & 1)
        self._arm_storm(storm)


def _level_sensitive(entry: int) -> bool:
    """Level semantics apply to fixed and lowest-priority entries with the level trigger mode."""
    return bool(entry & RTE_LEVEL) and (entry >> 8) & 7 in (DM_FIXED, DM_LOWEST)
