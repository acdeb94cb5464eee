"""The PC/AT keyboard controller (Intel 8042 running the IBM keyboard firmware)
and System Control Port A (port 0x92).

Sources implemented:

* IBM PC AT Technical Reference (1984), "Keyboard Controller": status register
  (port 0x64 read), command byte (controller RAM byte 0), controller commands
  0x20-0x3F / 0x60-0x7F (read/write RAM), 0xAA self test, 0xAB interface test,
  0xAD/0xAE keyboard interface disable/enable, 0xC0 read input port,
  0xD0/0xD1 read/write output port, 0xF0-0xFF pulse output port; output port
  bit 0 = system reset (active low), bit 1 = gate A20.
* IBM PS/2 Hardware Interface Technical Reference, "Keyboard/Auxiliary Device
  Controller": status bit 5 (auxiliary output buffer full), command byte bits
  1 (aux interrupt) and 5 (aux disable), commands 0xA7/0xA8/0xA9, 0xD2/0xD3
  (write keyboard/aux output buffer), 0xD4 (write to auxiliary device), and
  the "Keyboard and Auxiliary Device" chapter for the device commands
  (keyboard 0xED, 0xEE, 0xF0, 0xF2-0xF6, 0xF7-0xFD, 0xFE, 0xFF; mouse 0xE6-0xE9,
  0xEB, 0xF2-0xF6, 0xFE, 0xFF).
* Commands 0xDD/0xDF (A20 off/on) are the HP Vectra extension that several
  chipsets accept; port 0x92 follows the PS/2 "System Control Port A".

Model and deliberate choices:

* Commands complete at once, so IBF (status bit 1) always reads 0 and no
  clock is needed.  Responses are queued: controller responses first, then
  the keyboard (its command replies ahead of the keys it has buffered, as a
  keyboard answers a command at once), then the mouse likewise, so a guest
  that reads port 0x60 after every OBF sees every byte and nothing is
  overwritten.
  A byte in the output buffer drives IRQ1 (keyboard or controller byte) or
  IRQ12 (aux byte) when the matching command-byte enable is set, as the
  8042's OBF interrupt outputs (output port bits 4/5) do; reading 0x60 drops
  the line and then loads the next byte, which gives an edge-triggered PIC a
  fresh edge.
* Power-on: the UPI-41/8042's quasi-bidirectional port 2 comes out of reset
  with every pin high, so the output port reads 0xCF (the two interrupt
  outputs low): reset inactive and **A20 enabled**.  It is the BIOS that
  turns A20 off before booting DOS (0xD1 0xDD), so
  ``a20_enabled`` is True after construction and after ``reset()``.  The
  command byte powers on as 0x43 (keyboard and aux interrupts enabled,
  translation on, system flag clear = cold boot); a BIOS rewrites it anyway.
* ``key_input`` bytes are delivered to port 0x60 exactly as given: the
  controller's set-2 -> set-1 translation is not performed (bit 6 is stored
  and readable; ``translating`` and ``scancode_set`` tell the caller what form
  the guest expects).  The keyboard's own replies are likewise untranslated.
* Sending a byte to the keyboard (or 0xD4 to the mouse) clears that
  interface's disable bit, as the AT firmware enables the clock line to
  transmit.  A reset request (0xD1 with bit 0 clear, or an even 0xF0-0xFE
  pulse command) calls ``on_reset`` once and leaves output-port bit 0 high:
  the board's reset logic takes the pulse, the controller is not reset by it.
* ``on_a20`` reports this device's own gate on each change (including one
  caused by ``reset()``); the machine ORs it with port 0x92's gate.
  ``load_state`` never calls it: read ``a20_enabled`` after loading.

Left out: the scan-code translation table, password commands (0xA5, 0xA6;
0xA4 answers "no password"), 0xC1/0xC2 input-port polling into the status
register, 0xE0 test inputs, mouse wrap and remote modes, the keyboard BAT
byte at power-on, parity/timeout errors.  The keyboard's buffer is bounded
(``QUEUE_MAX`` bytes per device); bytes past it are dropped and counted.
"""
from __future__ import annotations

from collections.abc import Callable

from devices.base import SIZE_MASK, DeviceStateError, IrqLine, State, check_state

# Status register (port 0x64 read).
ST_OBF = 0x01
ST_SYS = 0x04
ST_CMD = 0x08
ST_UNLOCKED = 0x10  # keylock switch in the "unlocked" position
ST_AUX_OBF = 0x20

# Command byte (controller RAM byte 0).
CB_KBD_INT = 0x01
CB_AUX_INT = 0x02
CB_SYS = 0x04
CB_KBD_DIS = 0x10
CB_AUX_DIS = 0x20
CB_XLATE = 0x40

# Output port.
OP_RESET = 0x01  # active low
OP_A20 = 0x02
OP_IRQ1 = 0x10
OP_IRQ12 = 0x20

POWER_ON_COMMAND_BYTE = CB_KBD_INT | CB_AUX_INT | CB_XLATE
POWER_ON_OUTPUT_PORT = 0xCF
# Input port (command 0xC0): keyboard not inhibited, colour display,
# no manufacturing jumper, 512 KiB on the system board.
INPUT_PORT = 0xB0

# Where the byte in the output buffer came from.
SRC_CTRL = 0
SRC_KBD = 1
SRC_AUX = 2

ACK = 0xFA
RESEND = 0xFE
BAT_OK = 0xAA

KBD_DEFAULT_TYPEMATIC = 0x2B  # 10.9 characters/s after 500 ms
AUX_DEFAULT_RATE = 100
AUX_DEFAULT_RESOLUTION = 2  # 4 counts/mm

QUEUE_MAX = 256
CTRL_QUEUE_MAX = 16


class I8042:
    """8042 keyboard controller with a PS/2 keyboard and a minimal PS/2 mouse.

    Ports 0x60 (data) and 0x64 (status/command).  The machine feeds replayed
    keystrokes with ``key_input`` (and mouse packets with ``aux_input``).
    """

    kind = "i8042"
    VERSION = 1

    def __init__(
        self,
        irq1: IrqLine,
        irq12: IrqLine,
        on_a20: Callable[[bool], None],
        on_reset: Callable[[], None],
        name: str = "i8042",
    ) -> None:
        self.name = name
        self.io_ranges: list[tuple[int, int]] = [(0x60, 1), (0x64, 1)]
        self._irq1 = irq1
        self._irq12 = irq12
        self._on_a20 = on_a20
        self._on_reset = on_reset
        self._power_on()
        self._update_irq()

    # -- power-on / reset -----------------------------------------------------
    def _power_on(self) -> None:
        self._ram = bytearray(32)
        self._ram[0] = POWER_ON_COMMAND_BYTE
        self._outport = POWER_ON_OUTPUT_PORT
        self._cmd_flag = False
        self._ob = 0
        self._obf = False
        self._ob_src = SRC_CTRL
        self._ctrl_q: list[int] = []  # byte | source << 8
        # Each device answers a command ahead of the data it has buffered,
        # and "clear buffer" commands drop only the buffered data.
        self._kbd_resp = bytearray()
        self._kbd_q = bytearray()
        self._aux_resp = bytearray()
        self._aux_q = bytearray()
        self._pending = 0  # controller command waiting for its data byte
        self.dropped = 0
        self._kbd_defaults()
        self._kbd_scan = True
        self._kbd_leds = 0
        self._kbd_arg = 0
        self._kbd_last = BAT_OK
        self._aux_defaults()
        self._aux_arg = 0
        self._aux_last = BAT_OK

    def _kbd_defaults(self) -> None:
        self._kbd_set = 2
        self._kbd_typematic = KBD_DEFAULT_TYPEMATIC

    def _aux_defaults(self) -> None:
        self._aux_report = False
        self._aux_rate = AUX_DEFAULT_RATE
        self._aux_res = AUX_DEFAULT_RESOLUTION
        self._aux_scale21 = False

    def reset(self) -> None:
        """Power-on state; reports an A20 change through ``on_a20``."""
        was = self.a20_enabled
        self._power_on()
        self._update_irq()
        if self.a20_enabled != was:
            self._on_a20(self.a20_enabled)

    # -- public views -----------------------------------------------------------
    @property
    def a20_enabled(self) -> bool:
        return bool(self._outport & OP_A20)

    @property
    def command_byte(self) -> int:
        return self._ram[0]

    @property
    def output_port(self) -> int:
        return self._read_outport()

    @property
    def translating(self) -> bool:
        return bool(self._ram[0] & CB_XLATE)

    @property
    def scancode_set(self) -> int:
        return self._kbd_set

    @property
    def scanning(self) -> bool:
        return self._kbd_scan

    @property
    def kbd_leds(self) -> int:
        """Bit 0 Scroll Lock, bit 1 Num Lock, bit 2 Caps Lock."""
        return self._kbd_leds

    @property
    def typematic(self) -> int:
        return self._kbd_typematic

    @property
    def aux_reporting(self) -> bool:
        return self._aux_report

    # -- input from the host side ---------------------------------------------------
    def key_input(self, scancodes: bytes) -> None:
        """Bytes from the keyboard, delivered verbatim; dropped while scanning is off."""
        if not self._kbd_scan:
            self.dropped += len(scancodes)
            return
        self._enqueue(self._kbd_q, scancodes)
        self._refill()

    def aux_input(self, data: bytes) -> None:
        """Mouse packet bytes; dropped unless the guest enabled data reporting (0xF4)."""
        if not self._aux_report:
            self.dropped += len(data)
            return
        self._enqueue(self._aux_q, data)
        self._refill()

    # -- port I/O -------------------------------------------------------------------
    def io_read(self, port: int, size: int) -> int:
        # Only the addressed byte belongs to us; wider accesses see open bus above it.
        hi = SIZE_MASK.get(size, 0xFF) & ~0xFF
        if port == 0x64:
            st = ST_UNLOCKED | (self._ram[0] & CB_SYS)
            if self._cmd_flag:
                st |= ST_CMD
            if self._obf:
                st |= ST_OBF | (ST_AUX_OBF if self._ob_src == SRC_AUX else 0)
            return st | hi
        if port == 0x60:
            v = self._ob
            if self._obf:
                self._obf = False
                # Drop the line before loading the next byte so an edge-triggered
                # PIC sees a new edge for it.
                self._update_irq()
                self._refill()
            return v | hi
        return SIZE_MASK.get(size, 0xFF)

    def io_write(self, port: int, size: int, value: int) -> None:
        v = value & 0xFF
        if port == 0x64:
            self._cmd_flag = True
            self._command(v)
        elif port == 0x60:
            self._cmd_flag = False
            self._data(v)

    # -- controller -------------------------------------------------------------------
    def _command(self, c: int) -> None:
        self._pending = 0  # a new command abandons one still waiting for data
        if c < 0x20:
            return
        if c < 0x40:
            self._respond(self._ram[c & 0x1F])
        elif 0x60 <= c < 0x80 or 0xD1 <= c <= 0xD4:
            self._pending = c
        elif c == 0xA4:
            self._respond(0xF1)  # no password installed
        elif c == 0xA7:
            self._ram[0] |= CB_AUX_DIS
        elif c == 0xA8:
            self._ram[0] &= ~CB_AUX_DIS
            self._refill()
        elif c == 0xA9 or c == 0xAB:
            self._respond(0x00)  # interface test: no error
        elif c == 0xAA:
            self._respond(0x55)
        elif c == 0xAD:
            self._ram[0] |= CB_KBD_DIS
        elif c == 0xAE:
            self._ram[0] &= ~CB_KBD_DIS
            self._refill()
        elif c == 0xC0:
            self._respond(INPUT_PORT)
        elif c == 0xD0:
            self._respond(self._read_outport())
        elif c == 0xDD:
            self._set_a20(False)
        elif c == 0xDF:
            self._set_a20(True)
        elif c >= 0xF0 and not c & OP_RESET:
            # Pulse output port bits whose mask bit is 0; only bit 0 (reset)
            # has a lasting effect, a 6 us A20 glitch does not.
            self._on_reset()

    def _data(self, v: int) -> None:
        p = self._pending
        if p:
            self._pending = 0
            if p < 0x80:
                self._ram[p & 0x1F] = v
                if p == 0x60:
                    # Enables and disables act at once on what is buffered.
                    self._refill()
            elif p == 0xD1:
                self._write_outport(v)
            elif p == 0xD2:
                self._respond(v, SRC_KBD)
            elif p == 0xD3:
                self._respond(v, SRC_AUX)
            else:  # 0xD4
                self._ram[0] &= ~CB_AUX_DIS
                self._aux_command(v)
                self._refill()
            return
        self._ram[0] &= ~CB_KBD_DIS
        self._kbd_command(v)
        self._refill()

    def _read_outport(self) -> int:
        v = self._outport & ~(OP_IRQ1 | OP_IRQ12)
        if self._irq1.level:
            v |= OP_IRQ1
        if self._irq12.level:
            v |= OP_IRQ12
        return v

    def _write_outport(self, v: int) -> None:
        old = self._outport
        self._outport = (v | OP_RESET) & ~(OP_IRQ1 | OP_IRQ12)
        if (v ^ old) & OP_A20:
            self._on_a20(bool(v & OP_A20))
        if not v & OP_RESET:
            self._on_reset()

    def _set_a20(self, on: bool) -> None:
        if on == bool(self._outport & OP_A20):
            return
        self._outport ^= OP_A20
        self._on_a20(on)

    def _respond(self, byte: int, src: int = SRC_CTRL) -> None:
        if len(self._ctrl_q) < CTRL_QUEUE_MAX:
            self._ctrl_q.append(byte | (src << 8))
        else:
            self.dropped += 1
        self._refill()

    def _enqueue(self, q: bytearray, data: bytes) -> None:
        room = QUEUE_MAX - len(q)
        if len(data) > room:
            self.dropped += len(data) - max(room, 0)
            data = data[: max(room, 0)]
        q += data

    def _refill(self) -> None:
        if not self._obf:
            cb = self._ram[0]
            if self._ctrl_q:
                e = self._ctrl_q.pop(0)
                self._ob = e & 0xFF
                self._ob_src = e >> 8
                self._obf = True
            elif not cb & CB_KBD_DIS and (self._kbd_resp or self._kbd_q):
                q = self._kbd_resp or self._kbd_q
                self._ob = self._kbd_last = q[0]
                del q[0]
                self._ob_src = SRC_KBD
                self._obf = True
            elif not cb & CB_AUX_DIS and (self._aux_resp or self._aux_q):
                q = self._aux_resp or self._aux_q
                self._ob = self._aux_last = q[0]
                del q[0]
                self._ob_src = SRC_AUX
                self._obf = True
        self._update_irq()

    def _update_irq(self) -> None:
        obf = self._obf
        aux = self._ob_src == SRC_AUX
        cb = self._ram[0]
        self._irq1.set(obf and not aux and bool(cb & CB_KBD_INT))
        self._irq12.set(obf and aux and bool(cb & CB_AUX_INT))

    # -- keyboard -----------------------------------------------------------------------
    def _kbd_send(self, *data: int) -> None:
        self._enqueue(self._kbd_resp, bytes(data))

    def _kbd_command(self, v: int) -> None:
        arg = self._kbd_arg
        if arg:
            self._kbd_arg = 0
            # Any command byte (0xED and up) aborts a pending argument and is
            # executed itself, as the keyboard specification says.
            if v < 0xED:
                if arg == 0xED:
                    self._kbd_leds = v & 0x07
                    self._kbd_send(ACK)
                elif arg == 0xF3:
                    self._kbd_typematic = v & 0x7F
                    self._kbd_send(ACK)
                elif arg == 0xF0:
                    if v == 0:
                        self._kbd_send(ACK, self._kbd_set)
                    elif v <= 3:
                        self._kbd_set = v
                        self._kbd_send(ACK)
                    else:
                        self._kbd_send(RESEND)
                else:  # 0xFB-0xFD: a list of set-3 key codes, until a command
                    self._kbd_arg = arg
                    self._kbd_send(ACK)
                return
        if v == 0xED or v == 0xF3 or v == 0xF0:
            self._kbd_arg = v
            self._kbd_send(ACK)
        elif v == 0xEE:
            self._kbd_send(0xEE)
        elif v == 0xF2:
            self._kbd_send(ACK, 0xAB, 0x83)
        elif v == 0xF4:
            self._kbd_q.clear()
            self._kbd_scan = True
            self._kbd_send(ACK)
        elif v == 0xF5 or v == 0xF6:
            self._kbd_q.clear()
            self._kbd_defaults()
            self._kbd_scan = v == 0xF6
            self._kbd_send(ACK)
        elif 0xF7 <= v <= 0xFA:
            self._kbd_send(ACK)
        elif 0xFB <= v <= 0xFD:
            self._kbd_arg = v
            self._kbd_send(ACK)
        elif v == 0xFE:
            self._kbd_send(self._kbd_last)
        elif v == 0xFF:
            self._kbd_q.clear()
            self._kbd_defaults()
            self._kbd_leds = 0
            self._kbd_scan = True
            self._kbd_send(ACK, BAT_OK)
        else:
            self._kbd_send(RESEND)

    # -- mouse -----------------------------------------------------------------------------
    def _aux_send(self, *data: int) -> None:
        self._enqueue(self._aux_resp, bytes(data))

    def _aux_command(self, v: int) -> None:
        arg = self._aux_arg
        if arg:
            self._aux_arg = 0
            if arg == 0xE8:
                self._aux_res = v & 0x03
            else:
                self._aux_rate = v
            self._aux_send(ACK)
            return
        if v == 0xFF:
            self._aux_q.clear()
            self._aux_defaults()
            self._aux_send(ACK, BAT_OK, 0x00)
        elif v == 0xFE:
            self._aux_send(self._aux_last)
        elif v == 0xF2:
            self._aux_send(ACK, 0x00)  # standard PS/2 mouse
        elif v == 0xE8 or v == 0xF3:
            self._aux_arg = v
            self._aux_send(ACK)
        elif v == 0xF4:
            self._aux_report = True
            self._aux_send(ACK)
        elif v == 0xF5 or v == 0xF6:
            self._aux_defaults()
            self._aux_send(ACK)
        elif v == 0xE6 or v == 0xE7:
            self._aux_scale21 = v == 0xE7
            self._aux_send(ACK)
        elif v == 0xE9:
            status = (0x20 if self._aux_report else 0) | (0x10 if self._aux_scale21 else 0)
            self._aux_send(ACK, status, self._aux_res, self._aux_rate)
        elif v == 0xEB:
            self._aux_send(ACK, 0x08, 0x00, 0x00)  # no movement, no buttons
        else:
            self._aux_send(ACK)

    # -- state ---------------------------------------------------------------------------------
    def save_state(self) -> State:
        return {
            "kind": self.kind,
            "version": self.VERSION,
            "ram": bytes(self._ram),
            "outport": self._outport,
            "cmd_flag": self._cmd_flag,
            "ob": self._ob,
            "obf": self._obf,
            "ob_src": self._ob_src,
            "ctrl_q": list(self._ctrl_q),
            "kbd_resp": bytes(self._kbd_resp),
            "kbd_q": bytes(self._kbd_q),
            "aux_resp": bytes(self._aux_resp),
            "aux_q": bytes(self._aux_q),
            "pending": self._pending,
            "dropped": self.dropped,
            "kbd": {
                "scan": self._kbd_scan,
                "set": self._kbd_set,
                "typematic": self._kbd_typematic,
                "leds": self._kbd_leds,
                "arg": self._kbd_arg,
                "last": self._kbd_last,
            },
            "aux": {
                "report": self._aux_report,
                "rate": self._aux_rate,
                "res": self._aux_res,
                "scale21": self._aux_scale21,
                "arg": self._aux_arg,
                "last": self._aux_last,
            },
        }

    def load_state(self, state: State) -> None:
        check_state(state, self.kind, self.VERSION)
        try:
            ram = _get_bytes(state, "ram", 32, 32)
            outport = _get_int(state, "outport", 0, 0xFF)
            cmd_flag = _get_bool(state, "cmd_flag")
            ob = _get_int(state, "ob", 0, 0xFF)
            obf = _get_bool(state, "obf")
            ob_src = _get_int(state, "ob_src", SRC_CTRL, SRC_AUX)
            ctrl_q = state["ctrl_q"]
            if not isinstance(ctrl_q, list) or len(ctrl_q) > CTRL_QUEUE_MAX:
                raise DeviceStateError("i8042: ctrl_q must be a short list")
            for e in ctrl_q:
                if type(e) is not int or not 0 <= e <= (SRC_AUX << 8 | 0xFF):
                    raise DeviceStateError(f"i8042: bad ctrl_q entry {e!r}")
            kbd_resp = _get_bytes(state, "kbd_resp", 0, QUEUE_MAX)
            kbd_q = _get_bytes(state, "kbd_q", 0, QUEUE_MAX)
            aux_resp = _get_bytes(state, "aux_resp", 0, QUEUE_MAX)
            aux_q = _get_bytes(state, "aux_q", 0, QUEUE_MAX)
            pending = _get_int(state, "pending", 0, 0xFF)
            if pending and not (0x60 <= pending < 0x80 or 0xD1 <= pending <= 0xD4):
                raise DeviceStateError(f"i8042: pending command {pending:#x} takes no data")
            dropped = _get_int(state, "dropped", 0, None)
            k = state["kbd"]
            a = state["aux"]
            if not isinstance(k, dict) or not isinstance(a, dict):
                raise DeviceStateError("i8042: kbd and aux must be dicts")
            kbd = (
                _get_bool(k, "scan"),
                _get_int(k, "set", 1, 3),
                _get_int(k, "typematic", 0, 0x7F),
                _get_int(k, "leds", 0, 7),
                _get_int(k, "arg", 0, 0xFF),
                _get_int(k, "last", 0, 0xFF),
            )
            if kbd[4] not in (0, 0xED, 0xF0, 0xF3, 0xFB, 0xFC, 0xFD):
                raise DeviceStateError(f"i8042: bad keyboard argument state {kbd[4]:#x}")
            aux = (
                _get_bool(a, "report"),
                _get_int(a, "rate", 0, 0xFF),
                _get_int(a, "res", 0, 3),
                _get_bool(a, "scale21"),
                _get_int(a, "arg", 0, 0xFF),
                _get_int(a, "last", 0, 0xFF),
            )
            if aux[4] not in (0, 0xE8, 0xF3):
                raise DeviceStateError(f"i8042: bad aux argument state {aux[4]:#x}")
        except KeyError as e:
            raise DeviceStateError(f"i8042: state lacks {e}") from None
        self._ram = bytearray(ram)
        self._outport = outport
        self._cmd_flag = cmd_flag
        self._ob, self._obf, self._ob_src = ob, obf, ob_src
        self._ctrl_q = list(ctrl_q)
        self._kbd_resp = bytearray(kbd_resp)
        self._kbd_q = bytearray(kbd_q)
        self._aux_resp = bytearray(aux_resp)
        self._aux_q = bytearray(aux_q)
        self._pending = pending
        self.dropped = dropped
        (self._kbd_scan, self._kbd_set, self._kbd_typematic, self._kbd_leds,
         self._kbd_arg, self._kbd_last) = kbd
        (self._aux_report, self._aux_rate, self._aux_res, self._aux_scale21,
         self._aux_arg, self._aux_last) = aux
        # Restore the lines silently: they follow from the state just loaded.
        cb = self._ram[0]
        self._irq1.level = obf and ob_src != SRC_AUX and bool(cb & CB_KBD_INT)
        self._irq12.level = obf and ob_src == SRC_AUX and bool(cb & CB_AUX_INT)


class Port92:
    """System Control Port A (0x92): bit 0 fast reset, bit 1 fast A20.

    Bit 3 (CMOS password lock) is write-once until reset, bits 6-7 (disk
    activity light) read back as written, bits 2, 4 and 5 read 0.  A 0->1
    transition of bit 0 requests a reset; the bit stays 1 until the guest
    clears it, so another reset needs another 0->1 write.
    """

    kind = "port92"
    VERSION = 1
    _RW_MASK = 0xCB

    def __init__(
        self, on_a20: Callable[[bool], None], on_reset: Callable[[], None], name: str = "port92"
    ) -> None:
        self.name = name
        self.io_ranges: list[tuple[int, int]] = [(0x92, 1)]
        self._on_a20 = on_a20
        self._on_reset = on_reset
        self._value = 0

    @property
    def a20_enabled(self) -> bool:
        return bool(self._value & 0x02)

    @property
    def value(self) -> int:
        return self._value

    def reset(self) -> None:
        """Power-on value 0; reports an A20 change through ``on_a20``."""
        was = self.a20_enabled
        self._value = 0
        if was:
            self._on_a20(False)

    def io_read(self, port: int, size: int) -> int:
        if port != 0x92:
            return SIZE_MASK.get(size, 0xFF)
        return self._value | (SIZE_MASK.get(size, 0xFF) & ~0xFF)

    def io_write(self, port: int, size: int, value: int) -> None:
        if port != 0x92:
            return
        old = self._value
        new = (value & self._RW_MASK) | (old & 0x08)
        self._value = new
        if (old ^ new) & 0x02:
            self._on_a20(bool(new & 0x02))
        if new & 0x01 and not old & 0x01:
            self._on_reset()

    def save_state(self) -> State:
        return {"kind": self.kind, "version": self.VERSION, "value": self._value}

    def load_state(self, state: State) -> None:
        check_state(state, self.kind, self.VERSION)
        try:
            v = _get_int(state, "value", 0, 0xFF)
        except KeyError as e:
            raise DeviceStateError(f"port92: state lacks {e}") from None
        if v & ~self._RW_MASK:
            raise DeviceStateError(f"port92: value {v:#x} has read-only bits set")
        self._value = v


def _get_int(state: dict, key: str, lo: int, hi: int | None) -> int:
    v = state[key]
    if type(v) is not int or v < lo or (hi is not None and v > hi):
        raise DeviceStateError(f"{key}: {v!r} is not an int in [{lo}, {hi}]")
    return v


def _get_bool(state: dict, key: str) -> bool:
    v = state[key]
    if type(v) is not bool:
        raise DeviceStateError(f"{key}: {v!r} is not a bool")
    return v


def _get_bytes(state: dict, key: str, lo: int, hi: int) -> bytes:
    v = state[key]
    if not isinstance(v, (bytes, bytearray)) or not lo <= len(v) <= hi:
        raise DeviceStateError(f"{key}: expected {lo}..{hi} bytes")
    return bytes(v)
