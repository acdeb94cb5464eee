"""The PC/AT pair of Intel 8259A programmable interrupt controllers, plus ELCR.

Implements, from the Intel 8259A/8259A-2 datasheet (order no. 231468):

* "Interrupt Sequence" (8086 mode): the INTA cycle freezes the highest
  priority request, sets its ISR bit and clears its IRR bit, then supplies
  ``T7..T3`` of ICW2 with the level in the low three bits.  A request gone by
  INTA time gives the default IR7 vector without setting an ISR bit.
* "Initialization Command Words": ICW1 (IC4, SNGL, ADI, LTIM; it resets the
  edge sense latches, clears IMR, makes IR7 the lowest priority, sets the
  slave address to 7, leaves special mask mode, selects IRR for status reads
  and, without IC4, zeroes every ICW4 function), ICW2 (vector base; the low
  three bits are ignored in 8086 mode), ICW3 (slave bitmap on the master,
  slave ID on the slave), ICW4 (uPM, AEOI, M/S, BUF, SFNM).
* "Operation Command Words": OCW1 (IMR), OCW2 (non-specific / specific EOI,
  rotate on non-specific / specific EOI, rotate-in-AEOI set / clear, set
  priority, no-op), OCW3 (read IRR/ISR select, poll, special mask mode).
* "Fully Nested Mode", "End of Interrupt", "Automatic Rotation",
  "Specific Rotation", "Special Mask Mode" (in-service levels that are masked
  no longer inhibit other levels; a non-specific EOI skips them),
  "Poll Command" (the next read is an INTA: it returns ``0x80 | level`` or
  0), "Reading the 8259A Status", "Edge and Level Triggered Modes",
  "The Special Fully Nested Mode" (on the master, a request on a cascade input
  is honoured while that same input is in service) and "Cascade Mode" (the
  slave's INT output is wired to master IR2; the slave answers the INTA when
  the master's ICW3 names IR2 and the slave's ID is 2, so a request that
  vanished on the slave yields IRQ15's default vector while master ISR bit 2
  stays set, as on real hardware).

The Edge/Level Control Registers at 0x4D0/0x4D1 follow the Intel 82371AB
(PIIX4) datasheet, "ELCR1/ELCR2": a set bit makes that input level
sensitive; IRQ0, 1, 2, 8 and 13 are reserved (read 0, cannot be set).  An
input is level sensitive if its ELCR bit or its chip's LTIM bit is set.

Deliberate departures, each to match what virtual devices and guests need:

* An edge-triggered request stays latched in IRR until acknowledged or until
  ICW1, even if the line drops first (the datasheet demands the line stay high
  until INTA).  Devices here signal edges with ``IrqLine.pulse()``, and QEMU
  and KVM latch the same way.
* ICW1 also clears ISR and the poll and rotate-in-AEOI flags, as QEMU and
  Bochs do, so a re-initialised chip cannot keep a stale in-service level.
* While an ICW sequence is in progress the chip requests no interrupt (its
  vector base is not yet known).
* MCS-80/85 mode (uPM=0) is accepted and stored, but INTA always answers in
  8086 form: an x86 CPU cannot execute the 8080 CALL sequence.
* The slave's INT output is re-evaluated after every INTA cycle, so a request
  still pending on the slave (e.g. in AEOI mode) reaches the master's
  edge-triggered IR2 as a fresh edge.
* ISA IRQ2 (``irq_line(2)``) is wire-ORed with the slave's INT on master IR2;
  on an AT the bus pin is routed to IRQ9, so devices should use 9.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from devices.base import DeviceStateError, IrqLine, State, check_state

KIND = "pic8259"
VERSION = 1

MASTER_ELCR_MASK = 0xF8  # IRQ0, 1, 2 reserved
SLAVE_ELCR_MASK = 0xDE  # IRQ8, 13 reserved

_CHIP_FIELDS: tuple[tuple[str, type], ...] = (
    ("lines", int), ("irr", int), ("isr", int), ("imr", int), ("icw1", int),
    ("base", int), ("icw3", int), ("init_step", int), ("ic4", bool), ("single", bool),
    ("ltim", bool), ("upm", bool), ("aeoi", bool), ("ms", bool), ("buffered", bool),
    ("sfnm", bool), ("rotate_aeoi", bool), ("bottom", int), ("read_isr", bool),
    ("poll", bool), ("smm", bool), ("elcr", int),
)


class _Chip:
    """One 8259A's registers.  ``irr`` holds the edge latches; level-sensitive
    inputs take their IRR bit straight from ``lines``."""

    __slots__ = tuple(f for f, _ in _CHIP_FIELDS) + ("elcr_mask",)

    def __init__(self, elcr_mask: int) -> None:
        self.elcr_mask = elcr_mask
        self.power_on(0)

    def power_on(self, lines: int) -> None:
        self.lines = lines
        self.irr = 0
        self.isr = 0
        self.imr = 0
        self.icw1 = 0
        self.base = 0
        self.icw3 = 0
        self.init_step = 0  # 0: operational, else the ICW expected next
        self.ic4 = False
        self.single = False
        self.ltim = False
        self.upm = False
        self.aeoi = False
        self.ms = False
        self.buffered = False
        self.sfnm = False
        self.rotate_aeoi = False
        self.bottom = 7  # the level with the lowest priority
        self.read_isr = False
        self.poll = False
        self.smm = False
        self.elcr = 0

    def eff_irr(self) -> int:
        lvl = 0xFF if self.ltim else self.elcr
        return (self.irr & ~lvl) | (self.lines & lvl)

    def input(self, bit: int, level: bool) -> None:
        if level:
            if not self.lines & bit:
                self.lines |= bit
                self.irr |= bit
        elif self.lines & bit:
            self.lines &= ~bit
            # A level-mode request is withdrawn with its line; an edge latch
            # survives the fall (pulse() delivers up-then-down at once).
            if self.ltim or self.elcr & bit:
                self.irr &= ~bit

    def resolve(self, cascade_sfnm: int) -> int:
        """The level the priority resolver would grant, or -1.

        ``cascade_sfnm`` is the set of inputs whose own ISR bit must not block
        them (special fully nested mode on the master)."""
        if self.init_step:
            return -1
        req = self.eff_irr() & ~self.imr
        if not req:
            return -1
        ins = self.isr & ~self.imr if self.smm else self.isr
        p = (self.bottom + 1) & 7
        for _ in range(8):
            b = 1 << p
            if req & b and (not ins & b or cascade_sfnm & b):
                return p
            if ins & b:
                return -1
            p = (p + 1) & 7
        return -1

    def ack(self, level: int) -> None:
        b = 1 << level
        self.irr &= ~b
        if self.aeoi:
            if self.rotate_aeoi:
                self.bottom = level
        else:
            self.isr |= b

    def highest_isr(self) -> int:
        ins = self.isr & ~self.imr if self.smm else self.isr
        if not ins:
            return -1
        p = (self.bottom + 1) & 7
        for _ in range(8):
            if ins >> p & 1:
                return p
            p = (p + 1) & 7
        return -1

    def write_cmd(self, v: int) -> None:
        if v & 0x10:  # ICW1
            self.icw1 = v
            self.ic4 = bool(v & 1)
            self.single = bool(v & 2)
            self.ltim = bool(v & 8)
            self.irr = 0
            self.isr = 0
            self.imr = 0
            self.bottom = 7
            self.icw3 = 7
            self.smm = False
            self.read_isr = False
            self.poll = False
            self.rotate_aeoi = False
            if not self.ic4:
                self.upm = self.aeoi = self.ms = self.buffered = self.sfnm = False
            self.init_step = 2
        elif v & 0x08:  # OCW3
            if v & 0x04:
                self.poll = True
            if v & 0x02:
                self.read_isr = bool(v & 1)
            if v & 0x40:
                self.smm = bool(v & 0x20)
        else:  # OCW2
            cmd = v >> 5
            lvl = v & 7
            if cmd == 1 or cmd == 5:
                hi = self.highest_isr()
                if hi >= 0:
                    self.isr &= ~(1 << hi)
                    if cmd == 5:
                        self.bottom = hi
            elif cmd == 3:
                self.isr &= ~(1 << lvl)
            elif cmd == 7:
                self.isr &= ~(1 << lvl)
                self.bottom = lvl
            elif cmd == 6:
                self.bottom = lvl
            elif cmd == 4:
                self.rotate_aeoi = True
            elif cmd == 0:
                self.rotate_aeoi = False
            # cmd 2 is the no-operation

    def write_data(self, v: int) -> None:
        step = self.init_step
        if step == 0:
            self.imr = v
        elif step == 2:
            self.base = v & 0xF8
            self.init_step = 0 if self.single and not self.ic4 else (4 if self.single else 3)
        elif step == 3:
            self.icw3 = v
            self.init_step = 4 if self.ic4 else 0
        else:
            self.upm = bool(v & 1)
            self.aeoi = bool(v & 2)
            self.ms = bool(v & 4)
            self.buffered = bool(v & 8)
            self.sfnm = bool(v & 0x10)
            self.init_step = 0

    def save(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f, _ in _CHIP_FIELDS}

    def load(self, st: Any, who: str) -> None:
        if not isinstance(st, dict):
            raise DeviceStateError(f"{KIND}: {who} state must be a dict")
        vals = {}
        for f, t in _CHIP_FIELDS:
            if f not in st:
                raise DeviceStateError(f"{KIND}: {who} state lacks {f!r}")
            v = st[f]
            if t is bool:
                if not isinstance(v, bool):
                    raise DeviceStateError(f"{KIND}: {who}.{f} must be a bool")
            elif not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 0xFF:
                raise DeviceStateError(f"{KIND}: {who}.{f} must be an int in 0..255")
            vals[f] = v
        if vals["bottom"] > 7 or vals["init_step"] not in (0, 2, 3, 4):
            raise DeviceStateError(f"{KIND}: {who} bottom/init_step out of range")
        if vals["elcr"] & ~self.elcr_mask:
            raise DeviceStateError(f"{KIND}: {who}.elcr sets reserved bits")
        for f, v in vals.items():
            setattr(self, f, v)


class Pic8259Pair:
    """Master 8259A at 0x20, slave at 0xA0 on master IR2, ELCR at 0x4D0."""

    kind = KIND

    def __init__(self, name: str = "pic") -> None:
        self.name = name
        self.io_ranges: list[tuple[int, int]] = [(0x20, 2), (0xA0, 2), (0x4D0, 2)]
        self.on_intr_change: Callable[[bool], None] | None = None
        self._m = _Chip(MASTER_ELCR_MASK)
        self._s = _Chip(SLAVE_ELCR_MASK)
        self._lines = [IrqLine(f"irq{n}") for n in range(16)]
        for n, line in enumerate(self._lines):
            line.connect(lambda level, n=n: self.set_irq(n, level))
        self._ext2 = False  # ISA IRQ2, wire-ORed with the slave's INT
        self._slave_int = False
        self._intr = False

    # -- machine-facing API -------------------------------------------------
    def irq_line(self, n: int) -> IrqLine:
        if not 0 <= n < 16:
            raise ValueError(f"8259 pair has inputs 0-15, not {n}")
        return self._lines[n]

    def set_irq(self, n: int, level: bool) -> None:
        """Drive input ``n`` (0-15) to ``level``."""
        level = bool(level)
        if not 0 <= n < 16:
            raise ValueError(f"8259 pair has inputs 0-15, not {n}")
        self._lines[n].level = level
        if n >= 8:
            self._s.input(1 << (n - 8), level)
        elif n == 2:
            self._ext2 = level
            self._m.input(4, level or self._slave_int)
        else:
            self._m.input(1 << n, level)
        self._update()

    @property
    def intr(self) -> bool:
        """The master's INT output to the CPU."""
        return self._intr

    def acknowledge(self) -> int:
        """One INTA cycle: the vector the CPU reads; IRR/ISR updated."""
        m = self._m
        lv = m.resolve(self._sfnm_mask())
        if lv < 0:
            vec = m.base | 7
        else:
            m.ack(lv)
            if not m.single and m.icw3 >> lv & 1:
                s = self._s
                if lv == 2 and s.icw3 & 7 == 2:
                    sl = s.resolve(0)
                    if sl < 0:
                        vec = s.base | 7
                    else:
                        s.ack(sl)
                        vec = s.base | sl
                    # The slave's INT drops during INTA; a request still
                    # pending there must reach the master as a new edge.
                    self._slave_int = False
                    m.input(4, self._ext2)
                else:
                    vec = 0xFF  # no slave drives the bus for that CAS code
            else:
                vec = m.base | lv
        self._update()
        return vec

    def program_like_pc_bios(self) -> None:
        """Program both chips as a PC BIOS leaves them (0x08/0x70, cascade on
        IR2, 8086 mode, nothing masked)."""
        for port, value in ((0x20, 0x11), (0x21, 0x08), (0x21, 0x04), (0x21, 0x01),
                            (0xA0, 0x11), (0xA1, 0x70), (0xA1, 0x02), (0xA1, 0x01),
                            (0x21, 0x00), (0xA1, 0x00)):
            self.io_write(port, 1, value)

    # -- Device protocol ----------------------------------------------------
    def reset(self) -> None:
        """Power-on state; input line levels are kept (devices still drive them)."""
        m_lines = 0
        s_lines = 0
        for n in range(8):
            if self._lines[n].level and n != 2:
                m_lines |= 1 << n
            if self._lines[n + 8].level:
                s_lines |= 1 << n
        self._ext2 = self._lines[2].level
        self._m.power_on(m_lines | (4 if self._ext2 else 0))
        self._s.power_on(s_lines)
        self._slave_int = False
        self._update()

    def io_read(self, port: int, size: int) -> int:
        if size == 1:
            return self._read_byte(port)
        v = 0
        for i in range(size):
            v |= self._read_byte(port + i) << (8 * i)
        return v

    def io_write(self, port: int, size: int, value: int) -> None:
        if size == 1:
            self._write_byte(port, value & 0xFF)
            return
        for i in range(size):
            self._write_byte(port + i, (value >> (8 * i)) & 0xFF)

    def save_state(self) -> State:
        return {
            "kind": KIND,
            "version": VERSION,
            "master": self._m.save(),
            "slave": self._s.save(),
            "ext2": self._ext2,
            "slave_int": self._slave_int,
        }

    def load_state(self, state: State) -> None:
        check_state(state, KIND, VERSION)
        try:
            m_st, s_st = state["master"], state["slave"]
            ext2, slave_int = state["ext2"], state["slave_int"]
        except KeyError as e:
            raise DeviceStateError(f"{KIND}: state lacks {e}") from None
        if not isinstance(ext2, bool) or not isinstance(slave_int, bool):
            raise DeviceStateError(f"{KIND}: ext2/slave_int must be bools")
        m = _Chip(MASTER_ELCR_MASK)
        s = _Chip(SLAVE_ELCR_MASK)
        m.load(m_st, "master")
        s.load(s_st, "slave")
        self._m, self._s = m, s
        self._ext2 = ext2
        self._slave_int = slave_int
        for n in range(8):
            self._lines[n].level = bool(m.lines >> n & 1) if n != 2 else ext2
            self._lines[n + 8].level = bool(s.lines >> n & 1)
        # Silent: the output level is recomputed, nobody is told.
        self._intr = m.resolve(self._sfnm_mask()) >= 0

    # -- internals ----------------------------------------------------------
    def _sfnm_mask(self) -> int:
        m = self._m
        return m.icw3 if m.sfnm and not m.single else 0

    def _update(self) -> None:
        s_int = self._s.resolve(0) >= 0
        if s_int != self._slave_int:
            self._slave_int = s_int
            self._m.input(4, s_int or self._ext2)
        intr = self._m.resolve(self._sfnm_mask()) >= 0
        if intr != self._intr:
            self._intr = intr
            cb = self.on_intr_change
            if cb is not None:
                cb(intr)

    def _poll(self, c: _Chip) -> int:
        c.poll = False
        lv = c.resolve(self._sfnm_mask() if c is self._m else 0)
        if lv < 0:
            return 0
        c.ack(lv)
        self._update()
        return 0x80 | lv

    def _read_byte(self, port: int) -> int:
        if port == 0x20 or port == 0x21:
            c = self._m
        elif port == 0xA0 or port == 0xA1:
            c = self._s
        elif port == 0x4D0:
            return self._m.elcr
        elif port == 0x4D1:
            return self._s.elcr
        else:
            return 0xFF
        if c.poll:
            return self._poll(c)
        if port & 1:
            return c.imr
        return c.isr if c.read_isr else c.eff_irr()

    def _write_byte(self, port: int, v: int) -> None:
        if port == 0x20:
            self._m.write_cmd(v)
        elif port == 0x21:
            self._m.write_data(v)
        elif port == 0xA0:
            self._s.write_cmd(v)
        elif port == 0xA1:
            self._s.write_data(v)
        elif port == 0x4D0:
            self._m.elcr = v & MASTER_ELCR_MASK
        elif port == 0x4D1:
            self._s.elcr = v & SLAVE_ELCR_MASK
        else:
            return
        self._update()
