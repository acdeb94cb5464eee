"""The National Semiconductor / TI PC16550D UART, as found behind a PC COM port.

Implements, from the PC16550D datasheet ("Universal Asynchronous
Receiver/Transmitter with FIFOs", June 1995, TI literature SNLS378), section
"Registers" and its tables:

* Table II "Summary of Registers": RBR/THR, IER, IIR/FCR, LCR, MCR, LSR,
  MSR, SCR, and the divisor latch DLL/DLM selected by LCR bit 7 (DLAB).
* "Line Control Register": all eight bits read back; bit 7 is DLAB.
* "Programmable Baud Generator": the 16-bit divisor is stored and reads
  back (``baud`` reports the rate for a 1.8432 MHz crystal).
* "Line Status Register": DR, OE, BI, THRE, TEMT and, in FIFO mode, bit 7
  "error in RCVR FIFO"; reading the LSR clears OE and BI.
* "FIFO Control Register": bit 0 enables both 16-byte FIFOs and changing it
  empties them; bits 1 and 2 reset the RX and TX FIFOs and clear
  themselves; bits 6-7 set the RX trigger level (1, 4, 8, 14); the other
  bits are only programmed while bit 0 is written as 1.
* "Interrupt Identification Register" and Table IV "Interrupt Control
  Functions": priorities receiver line status (0x6) > received data
  available (0x4) / character timeout (0xC) > THR empty (0x2) > modem
  status (0x0); bits 6-7 read 11 while the FIFOs are enabled.
* "Interrupt Enable Register" (bits 4-7 read 0), "Modem Control Register"
  (bits 5-7 read 0; bit 4 is loopback), "Modem Status Register" (delta bits
  DCTS, DDSR, TERI, DDCD cleared by reading it), "Scratchpad Register".
* "FIFO Interrupt Mode Operation": the RX data interrupt follows the FIFO
  level against the trigger level; a break is stored as one zero character
  whose BI is revealed when it reaches the top of the FIFO.
* Table III "UART Reset Configuration" for ``reset()``; as the master reset
  does, it leaves the divisor latch and the scratchpad alone.

PC wiring (IBM PC/AT technical reference, asynchronous adapter): the chip's
INTR output reaches the interrupt controller through a buffer enabled by the
OUT2 pin, so the IRQ line is asserted only while an interrupt is pending and
MCR.OUT2 = 1.  In loopback the datasheet forces the OUT2 pin inactive, so on
a PC the line is also held low while MCR bit 4 is set (interrupts are still
identified in the IIR, as the datasheet says, and polling works).

Time.  Transmission is instantaneous in virtual time: a byte written to THR
goes to the backend at once and THR, the TX FIFO and the shift register are
empty again before the next guest instruction, so THRE and TEMT always read
1.  Writing THR still clears a pending THRE interrupt and the THR emptying
raises it again, so the IRQ line drops and rises and an edge-triggered PIC
sees one edge per byte, as with a real transmitter.  Input is likewise
received whole: ``receive()`` places bytes straight into RBR/the RX FIFO.
The machine delivers input (from the replay EventLog, never from the
backend directly) and paces it with ``rx_space()``.

Deliberate simplifications (documented, not datasheet behaviour):

* Character-timeout interrupt: character times are zero in virtual time, so
  "no FIFO activity for four character times" has always already elapsed.
  The timeout indication (IIR 0xC) is therefore pending whenever the FIFO
  holds data below the trigger level, which includes right after
  ``receive()`` leaves bytes below it; reading RBR restarts the timer, which
  expires again at once if bytes remain.
* Framing (word length, parity, stop bits, baud rate) does not alter data:
  bytes pass through as 8 bits, so a guest that writes THR without
  programming LCR still prints.  Parity and framing errors are never
  generated (LSR bits 2-3 read 0); a break arrives only through
  ``receive_break()``.
* DMA mode (FCR bit 3), TXRDY/RXRDY and the baud clock pins have no effect.
* In loopback the serial input is disconnected, as the datasheet says:
  ``receive()`` drops what it is given and ``rx_space()`` is 0, so a machine
  that paces input holds it until loopback ends.
* The external modem inputs default to CTS, DSR and DCD asserted, RI off (a
  connected null-modem terminal); ``set_modem_inputs()`` changes them.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from devices.base import DeviceStateError, IrqLine, State, check_state

if TYPE_CHECKING:
    from host.serial import SerialBackend

KIND = "uart16550"
VERSION = 1

COM1 = (0x3F8, 4)
COM2 = (0x2F8, 3)

FIFO_SIZE = 16
CRYSTAL_HZ = 1_843_200

# IER bits
IER_RDA = 0x01
IER_THRE = 0x02
IER_RLS = 0x04
IER_MS = 0x08
# IIR identification codes (bit 0 = 1: nothing pending)
IIR_NONE = 0x01
IIR_RLS = 0x06
IIR_RDA = 0x04
IIR_TIMEOUT = 0x0C
IIR_THRE = 0x02
IIR_MS = 0x00
IIR_FIFO = 0xC0
# LSR bits
LSR_DR = 0x01
LSR_OE = 0x02
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_FIFO_ERR = 0x80
# MCR bits
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
# MSR bits
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

# A received break is stored as a zero character carrying this flag, so its
# BI can be revealed when it reaches the top of the FIFO.
RX_BREAK = 0x100

_TRIGGER = (1, 4, 8, 14)
_BYTES = [bytes((i,)) for i in range(256)]


class Uart16550:
    """A 16550A UART on eight consecutive ports, driving one IRQ line.

    ``backend`` receives transmitted bytes (``backend.write(bytes)``);
    ``on_tx(byte)`` observes them too (the replay layer digests output).
    Input is never read from the backend here: the machine passes it in
    with ``receive()``.
    """

    kind = KIND

    def __init__(
        self,
        base: int,
        irq: IrqLine,
        name: str = "com1",
        *,
        backend: SerialBackend | None = None,
        on_tx: Callable[[int], None] | None = None,
    ):
        self.name = name
        self.base = base
        self.irq = irq
        self.io_ranges: list[tuple[int, int]] = [(base, 8)]
        self.backend = backend
        self.on_tx = on_tx
        # Power-on values for what the master reset leaves alone: 9600 bps.
        self.dll = 0x0C
        self.dlm = 0
        self.scr = 0
        self.rbr = 0
        self.modem_in = MSR_CTS | MSR_DSR | MSR_DCD
        self.tx_count = 0
        self.rx_count = 0
        self.overrun_count = 0
        self.rx_dropped = 0
        self._readers = (
            self._read_rbr, self._read_ier, self._read_iir, self._read_lcr,
            self._read_mcr, self._read_lsr, self._read_msr, self._read_scr,
        )
        self._writers = (
            self._write_thr, self._write_ier, self._write_fcr, self._write_lcr,
            self._write_mcr, self._ignore, self._ignore, self._write_scr,
        )
        self._reset_registers()

    # -- lifecycle ------------------------------------------------------------
    def _reset_registers(self) -> None:
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.fcr = 0  # programmed FCR bits 3, 6, 7
        self.fifo_on = False
        self.rx: list[int] = []
        self.lsr_err = 0  # latched OE | BI
        self.thre_pending = False
        self.msr_status = self.modem_in
        self.msr_delta = 0

    def reset(self) -> None:
        """Master reset (Table III); divisor latch, SCR and RBR are unaffected."""
        self._reset_registers()
        self.irq.set(False)

    # -- port access ------------------------------------------------------------
    def io_read(self, port: int, size: int) -> int:
        off = port - self.base
        if size == 1:
            return self._readers[off]() if 0 <= off < 8 else 0xFF
        # An 8-bit ISA device sees a wider access as consecutive byte cycles.
        value = 0
        for i in range(size):
            o = off + i
            value |= (self._readers[o]() if 0 <= o < 8 else 0xFF) << (8 * i)
        return value

    def io_write(self, port: int, size: int, value: int) -> None:
        off = port - self.base
        if size == 1:
            if 0 <= off < 8:
                self._writers[off](value & 0xFF)
            return
        for i in range(size):
            o = off + i
            if 0 <= o < 8:
                self._writers[o]((value >> (8 * i)) & 0xFF)

    # -- registers: reads ---------------------------------------------------
    def _read_rbr(self) -> int:
        if self.lcr & 0x80:
            return self.dll
        rx = self.rx
        if not rx:
            return self.rbr
        v = rx.pop(0) & 0xFF
        self.rbr = v
        if rx and rx[0] & RX_BREAK:
            self.lsr_err |= LSR_BI
        self._update_irq()
        return v

    def _read_ier(self) -> int:
        return self.dlm if self.lcr & 0x80 else self.ier

    def _read_iir(self) -> int:
        iid = self._iid()
        if iid == IIR_THRE:
            # Reading the IIR is the acknowledge when THRE is the source.
            self.thre_pending = False
            self._update_irq()
        return iid | IIR_FIFO if self.fifo_on else iid

    def _read_lcr(self) -> int:
        return self.lcr

    def _read_mcr(self) -> int:
        return self.mcr

    def _read_lsr(self) -> int:
        rx = self.rx
        v = LSR_THRE | LSR_TEMT | self.lsr_err
        if rx:
            v |= LSR_DR
            if self.fifo_on and any(c & RX_BREAK for c in rx):
                v |= LSR_FIFO_ERR
        if self.lsr_err:
            self.lsr_err = 0
            self._update_irq()
        return v

    def _read_msr(self) -> int:
        v = self.msr_status | self.msr_delta
        if self.msr_delta:
            self.msr_delta = 0
            self._update_irq()
        return v

    def _read_scr(self) -> int:
        return self.scr

    # -- registers: writes --------------------------------------------------
    def _write_thr(self, v: int) -> None:
        if self.lcr & 0x80:
            self.dll = v
            return
        if self.thre_pending:
            self.thre_pending = False
            if self.irq.level:
                self._update_irq()
        if self.mcr & MCR_LOOP:
            self._rx_push(v)
        else:
            self.tx_count += 1
            if self.backend is not None:
                self.backend.write(_BYTES[v])
            if self.on_tx is not None:
                self.on_tx(v)
        # The byte left at once: THR is empty again, a new THRE event.
        self.thre_pending = True
        self._update_irq()

    def _write_ier(self, v: int) -> None:
        if self.lcr & 0x80:
            self.dlm = v
            return
        v &= 0x0F
        if v & IER_THRE and not self.ier & IER_THRE:
            # Enabling ETBEI while THR is empty (it always is) interrupts.
            self.thre_pending = True
        self.ier = v
        self._update_irq()

    def _write_fcr(self, v: int) -> None:
        if v & 0x01:
            if not self.fifo_on or v & 0x02:
                self.rx.clear()
            if not self.fifo_on or v & 0x04:
                # The TX FIFO was just emptied: the first THRE interrupt
                # after enabling the FIFOs is immediate.
                self.thre_pending = True
            self.fifo_on = True
            self.fcr = v & 0xC8
        elif self.fifo_on:
            self.fifo_on = False
            self.rx.clear()
            self.thre_pending = True
        self._update_irq()

    def _write_lcr(self, v: int) -> None:
        self.lcr = v

    def _write_mcr(self, v: int) -> None:
        v &= 0x1F
        old = self.mcr
        self.mcr = v
        if (old | v) & MCR_LOOP:
            self._set_modem_status(self._modem_status())
        self._update_irq()

    def _write_scr(self, v: int) -> None:
        self.scr = v

    def _ignore(self, v: int) -> None:
        # LSR and MSR writes are reserved for factory test.
        pass

    # -- internals ----------------------------------------------------------
    def _iid(self) -> int:
        ier = self.ier
        if not ier:
            return IIR_NONE
        if ier & IER_RLS and self.lsr_err:
            return IIR_RLS
        if ier & IER_RDA and self.rx:
            if not self.fifo_on or len(self.rx) >= _TRIGGER[self.fcr >> 6]:
                return IIR_RDA
            return IIR_TIMEOUT
        if ier & IER_THRE and self.thre_pending:
            return IIR_THRE
        if ier & IER_MS and self.msr_delta:
            return IIR_MS
        return IIR_NONE

    def _line_level(self) -> bool:
        return (self.mcr & (MCR_OUT2 | MCR_LOOP)) == MCR_OUT2 and self._iid() != IIR_NONE

    def _update_irq(self) -> None:
        level = self._line_level()
        if level != self.irq.level:
            self.irq.set(level)

    def _rx_push(self, c: int) -> None:
        rx = self.rx
        if self.fifo_on:
            if len(rx) >= FIFO_SIZE:
                # The character in the shift register is lost, not the FIFO.
                self.lsr_err |= LSR_OE
                self.overrun_count += 1
                return
            rx.append(c)
            if c & RX_BREAK and len(rx) == 1:
                self.lsr_err |= LSR_BI
        else:
            if rx:
                # 16450 mode: the new character overwrites the unread one.
                self.lsr_err |= LSR_OE
                self.overrun_count += 1
                rx[0] = c
            else:
                rx.append(c)
            if c & RX_BREAK:
                self.lsr_err |= LSR_BI
        self.rx_count += 1

    def _modem_status(self) -> int:
        m = self.mcr
        if m & MCR_LOOP:
            return ((m & MCR_RTS) << 3) | ((m & MCR_DTR) << 5) | ((m & (MCR_OUT1 | MCR_OUT2)) << 4)
        return self.modem_in

    def _set_modem_status(self, new: int) -> None:
        old = self.msr_status
        if new == old:
            return
        changed = old ^ new
        delta = 0
        if changed & MSR_CTS:
            delta |= MSR_DCTS
        if changed & MSR_DSR:
            delta |= MSR_DDSR
        if old & MSR_RI and not new & MSR_RI:
            delta |= MSR_TERI
        if changed & MSR_DCD:
            delta |= MSR_DDCD
        self.msr_delta |= delta
        self.msr_status = new

    # -- machine side -------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Deliver input bytes from the serial line, in order.

        Bytes beyond what the receiver holds set OE: in FIFO mode they are
        dropped, in 16450 mode each overwrites the unread character.  In
        loopback the serial input is disconnected and the bytes are dropped.
        """
        if not data:
            return
        if self.mcr & MCR_LOOP:
            self.rx_dropped += len(data)
            return
        for b in data:
            self._rx_push(b & 0xFF)
        self._update_irq()

    def receive_break(self) -> None:
        """Deliver a break condition: one zero character with BI."""
        if self.mcr & MCR_LOOP:
            self.rx_dropped += 1
            return
        self._rx_push(RX_BREAK)
        self._update_irq()

    def rx_space(self) -> int:
        """How many bytes ``receive()`` can take now without an overrun."""
        if self.mcr & MCR_LOOP:
            return 0
        if self.fifo_on:
            return FIFO_SIZE - len(self.rx)
        return 0 if self.rx else 1

    def set_modem_inputs(self, cts: bool = True, dsr: bool = True, ri: bool = False, dcd: bool = True) -> None:
        """Drive the external modem status inputs (ignored by MSR in loopback)."""
        self.modem_in = (
            (MSR_CTS if cts else 0) | (MSR_DSR if dsr else 0) | (MSR_RI if ri else 0) | (MSR_DCD if dcd else 0)
        )
        if not self.mcr & MCR_LOOP:
            self._set_modem_status(self.modem_in)
            self._update_irq()

    @property
    def divisor(self) -> int:
        return (self.dlm << 8) | self.dll

    @property
    def baud(self) -> int:
        """Line rate for the PC's 1.8432 MHz crystal (0 for divisor 0)."""
        d = self.divisor
        return CRYSTAL_HZ // (16 * d) if d else 0

    @property
    def loopback(self) -> bool:
        return bool(self.mcr & MCR_LOOP)

    # -- state ----------------------------------------------------------------
    def save_state(self) -> State:
        return {
            "kind": KIND,
            "version": VERSION,
            "ier": self.ier,
            "lcr": self.lcr,
            "mcr": self.mcr,
            "fcr": self.fcr,
            "fifo_on": self.fifo_on,
            "dll": self.dll,
            "dlm": self.dlm,
            "scr": self.scr,
            "rbr": self.rbr,
            "rx": list(self.rx),
            "lsr_err": self.lsr_err,
            "thre_pending": self.thre_pending,
            "msr_status": self.msr_status,
            "msr_delta": self.msr_delta,
            "modem_in": self.modem_in,
            "tx_count": self.tx_count,
            "rx_count": self.rx_count,
            "overrun_count": self.overrun_count,
            "rx_dropped": self.rx_dropped,
            "irq": self.irq.level,
        }

    def load_state(self, state: State) -> None:
        check_state(state, KIND, VERSION)

        def num(key: str, hi: int | None = 0xFF, mask: int | None = None) -> int:
            v = state.get(key)
            if type(v) is not int or v < 0 or (hi is not None and v > hi):
                raise DeviceStateError(f"{KIND}: {key} must be an int in 0..{hi}, got {v!r}")
            if mask is not None and v & ~mask:
                raise DeviceStateError(f"{KIND}: {key}={v:#x} has bits outside {mask:#x}")
            return v

        def flag(key: str) -> bool:
            v = state.get(key)
            if not isinstance(v, bool):
                raise DeviceStateError(f"{KIND}: {key} must be a bool, got {v!r}")
            return v

        fifo_on = flag("fifo_on")
        rx = state.get("rx")
        if (
            not isinstance(rx, list)
            or len(rx) > (FIFO_SIZE if fifo_on else 1)
            or any(type(c) is not int or not 0 <= c <= 0xFF | RX_BREAK for c in rx)
        ):
            raise DeviceStateError(f"{KIND}: rx must be a list of at most 16 characters, got {rx!r}")
        values = {
            "ier": num("ier", mask=0x0F),
            "lcr": num("lcr"),
            "mcr": num("mcr", mask=0x1F),
            "fcr": num("fcr", mask=0xC8),
            "dll": num("dll"),
            "dlm": num("dlm"),
            "scr": num("scr"),
            "rbr": num("rbr"),
            "lsr_err": num("lsr_err", mask=LSR_OE | LSR_BI),
            "msr_status": num("msr_status", mask=0xF0),
            "msr_delta": num("msr_delta", mask=0x0F),
            "modem_in": num("modem_in", mask=0xF0),
            "tx_count": num("tx_count", hi=None),
            "rx_count": num("rx_count", hi=None),
            "overrun_count": num("overrun_count", hi=None),
            "rx_dropped": num("rx_dropped", hi=None),
        }
        thre_pending = flag("thre_pending")
        for key, v in values.items():
            setattr(self, key, v)
        self.fifo_on = fifo_on
        self.rx = list(rx)
        self.thre_pending = thre_pending
        # Restored silently: no edge reaches the interrupt controller.
        self.irq.level = self._line_level()
