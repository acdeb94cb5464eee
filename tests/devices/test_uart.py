"""PC16550D UART and serial backends, driven through ports with no guest."""
from __future__ import annotations

import os
import socket
import termios
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import host.serial as sb
from devices.base import DeviceStateError, IrqLine
from devices.clock import VirtualClock
from host.serial import (
    BufferBackend,
    FileBackend,
    NullBackend,
    SerialBackend,
    SocketBackend,
    StdioBackend,
)
from devices.legacy.uart import Uart16550

BASE = 0x3F8
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7


def make(base: int = BASE):
    irq = IrqLine("com1")
    be = BufferBackend()
    sent: list[int] = []
    u = Uart16550(base, irq, backend=be, on_tx=sent.append)
    return u, irq, be, sent


def rd(u: Uart16550, off: int) -> int:
    return u.io_read(u.base + off, 1)


def wr(u: Uart16550, off: int, v: int) -> None:
    u.io_write(u.base + off, 1, v)


# -- registers ------------------------------------------------------------------
def test_identity_and_ranges():
    u, *_ = make(0x2F8)
    assert u.kind == "uart16550" and u.name == "com1"
    assert u.io_ranges == [(0x2F8, 8)]


def test_reset_values_table_iii():
    u, irq, *_ = make()
    assert rd(u, IER) == 0
    assert rd(u, IIR) == 0x01
    assert rd(u, LCR) == 0
    assert rd(u, MCR) == 0
    assert rd(u, LSR) == 0x60
    assert rd(u, MSR) == 0xB0  # CTS, DSR, DCD asserted by the idle line; no deltas
    assert irq.level is False


def test_dlab_selects_divisor_latch():
    u, _, be, _ = make()
    wr(u, IER, 0x05)
    wr(u, LCR, 0x83)
    wr(u, DLL, 0x01)
    wr(u, DLM, 0x02)
    assert rd(u, DLL) == 0x01 and rd(u, DLM) == 0x02
    assert u.divisor == 0x0201
    assert be.output == b""  # DLL writes are not transmitted
    wr(u, LCR, 0x03)
    assert rd(u, IER) == 0x05  # IER untouched by DLM writes
    wr(u, LCR, 0x80)
    wr(u, DLM, 0)
    wr(u, DLL, 1)
    assert u.baud == 115200
    wr(u, DLL, 0x0C)
    assert u.baud == 9600
    wr(u, LCR, 0x03)
    wr(u, THR, 0x41)
    assert be.output == b"A"
    assert u.divisor == 0x0C


def test_scratch_register_holds_every_value():
    u, *_ = make()
    for v in range(256):
        wr(u, SCR, v)
        assert rd(u, SCR) == v


def test_lcr_reads_back_all_bits_ier_mcr_reserved_bits_read_zero():
    u, *_ = make()
    for v in (0x00, 0x1B, 0x7F, 0xFF, 0x80, 0x43):
        wr(u, LCR, v)
        assert rd(u, LCR) == v
    wr(u, LCR, 0x03)
    wr(u, IER, 0xFF)
    assert rd(u, IER) == 0x0F
    wr(u, MCR, 0xFF)
    assert rd(u, MCR) == 0x1F
    wr(u, MCR, 0x0B)
    assert rd(u, MCR) == 0x0B


def test_lsr_and_msr_writes_are_ignored():
    u, *_ = make()
    wr(u, LSR, 0xFF)
    wr(u, MSR, 0x0F)
    assert rd(u, LSR) == 0x60
    assert rd(u, MSR) == 0xB0


def test_unknown_port_and_wide_accesses():
    u, *_ = make()
    assert u.io_read(BASE + 8, 1) == 0xFF
    assert u.io_read(BASE - 1, 1) == 0xFF
    wr(u, LCR, 0x80)
    wr(u, DLL, 0x34)
    wr(u, DLM, 0x12)
    assert u.io_read(BASE, 2) == 0x1234  # two byte cycles: DLL then DLM
    u.io_write(BASE, 2, 0xBEEF)
    assert u.divisor == 0xBEEF
    # LCR and MCR in one 16-bit write
    u.io_write(BASE + LCR, 2, 0x0803)
    assert rd(u, LCR) == 0x03 and rd(u, MCR) == 0x08
    # bytes past the device read as open bus
    assert u.io_read(BASE + SCR, 4) == 0xFFFFFF00 | rd(u, SCR)
    u.io_write(BASE + SCR, 4, 0xFFFFFF5A)
    assert rd(u, SCR) == 0x5A


# -- transmission ------------------------------------------------------------------
def test_output_reaches_backend_and_observer_at_once():
    u, _, be, sent = make()
    wr(u, LCR, 0x03)
    for c in b"Hello\n":
        wr(u, THR, c)
        assert rd(u, LSR) & 0x60 == 0x60  # THR and shift register empty immediately
    assert be.output == b"Hello\n"
    assert sent == list(b"Hello\n")
    assert u.tx_count == 6


def test_uninitialised_lcr_still_sends_full_bytes():
    u, _, be, _ = make()
    wr(u, THR, 0xC1)  # LCR=0 would be 5-bit words on a wire
    assert be.output == b"\xc1"


def test_output_reaches_file_backend(tmp_path):
    path = tmp_path / "serial.log"
    path.write_bytes(b"old:")
    fb = FileBackend(path)
    u = Uart16550(BASE, IrqLine(), backend=fb)
    for c in b"boot ok\r\n":
        wr(u, THR, c)
    assert path.read_bytes() == b"old:boot ok\r\n"  # unbuffered, appended
    assert fb.poll_input() == b""
    fb.close()
    fb.write(b"ignored after close")
    assert path.read_bytes() == b"old:boot ok\r\n"


def test_no_backend_is_fine_and_counts():
    u = Uart16550(BASE, IrqLine())
    wr(u, THR, 0x30)
    assert u.tx_count == 1


# -- FIFOs ------------------------------------------------------------------
def test_fifo_enable_shows_in_iir_and_holds_16_bytes():
    u, *_ = make()
    assert rd(u, IIR) & 0xC0 == 0
    wr(u, FCR, 0x01)
    assert rd(u, IIR) & 0xC0 == 0xC0
    assert u.rx_space() == 16
    u.receive(bytes(range(0x40, 0x50)))
    assert u.rx_space() == 0
    out = []
    while rd(u, LSR) & 0x01:
        out.append(rd(u, RBR))
    assert bytes(out) == bytes(range(0x40, 0x50))
    assert rd(u, LSR) & 0x02 == 0  # no overrun
    wr(u, FCR, 0x00)
    assert rd(u, IIR) & 0xC0 == 0
    assert u.rx_space() == 1


def test_fifo_overrun_drops_new_bytes_and_sets_oe():
    u, *_ = make()
    wr(u, FCR, 0x01)
    u.receive(bytes(range(20)))
    assert u.overrun_count == 4
    lsr = rd(u, LSR)
    assert lsr & 0x03 == 0x03  # DR, OE
    assert rd(u, LSR) & 0x02 == 0  # OE cleared by reading LSR
    assert bytes(rd(u, RBR) for _ in range(16)) == bytes(range(16))
    assert rd(u, LSR) & 0x01 == 0


def test_16450_mode_overrun_overwrites_unread_character():
    u, *_ = make()
    assert u.rx_space() == 1
    u.receive(b"a")
    assert u.rx_space() == 0
    u.receive(b"b")
    assert rd(u, LSR) == 0x63  # DR, OE, THRE, TEMT
    assert rd(u, RBR) == ord("b")
    assert rd(u, LSR) == 0x60
    assert rd(u, RBR) == ord("b")  # an empty RBR keeps its last character


def test_fcr_rx_reset_and_mode_change_clear_fifo():
    u, *_ = make()
    wr(u, FCR, 0x01)
    u.receive(b"abc")
    wr(u, FCR, 0x03)  # RX FIFO reset, FIFOs stay on
    assert rd(u, LSR) & 0x01 == 0
    assert rd(u, IIR) & 0xC0 == 0xC0
    u.receive(b"xyz")
    wr(u, FCR, 0x01)  # no reset bit, same mode: data stays
    assert rd(u, LSR) & 0x01
    wr(u, FCR, 0x00)  # leaving FIFO mode empties the FIFO
    assert rd(u, LSR) & 0x01 == 0
    u.receive(b"q")
    wr(u, FCR, 0x01)  # entering FIFO mode too
    assert rd(u, LSR) & 0x01 == 0


@pytest.mark.parametrize("fcr,trigger", [(0x01, 1), (0x41, 4), (0x81, 8), (0xC1, 14)])
def test_rx_trigger_levels_and_character_timeout(fcr, trigger):
    u, irq, *_ = make()
    wr(u, FCR, fcr)
    wr(u, IER, 0x01)
    wr(u, MCR, 0x08)
    assert rd(u, IIR) == 0xC1
    if trigger > 1:
        u.receive(b"x" * (trigger - 1))
        assert rd(u, IIR) == 0xCC  # character timeout below the trigger level
        assert irq.level
    u.receive(b"y")
    assert rd(u, IIR) == 0xC4  # trigger level reached
    assert irq.level
    rd(u, RBR)
    if trigger > 1:
        assert rd(u, IIR) == 0xCC  # below the trigger again: timeout while data remains
    while rd(u, LSR) & 0x01:
        rd(u, RBR)
    assert rd(u, IIR) == 0xC1
    assert not irq.level


def test_rda_in_16450_mode_cleared_by_reading_rbr():
    u, irq, *_ = make()
    wr(u, IER, 0x01)
    wr(u, MCR, 0x08)
    u.receive(b"k")
    assert rd(u, IIR) == 0x04
    assert irq.level
    assert rd(u, RBR) == ord("k")
    assert rd(u, IIR) == 0x01
    assert not irq.level


# -- interrupts ------------------------------------------------------------------
def test_iir_priority_order():
    u, irq, *_ = make()
    wr(u, MCR, 0x08)
    wr(u, IER, 0x0F)  # ETBEI 0->1 with THR empty: THRE pending
    u.set_modem_inputs(cts=False)  # modem status delta
    u.receive(b"1")
    u.receive(b"2")  # 16450 mode: overrun -> line status
    assert irq.level
    assert rd(u, IIR) == 0x06
    assert rd(u, LSR) & 0x02
    assert rd(u, IIR) == 0x04
    assert rd(u, RBR) == ord("2")
    assert rd(u, IIR) == 0x02  # reading THRE as the source acknowledges it
    assert rd(u, IIR) == 0x00
    assert rd(u, MSR) == 0x21 | 0x80  # DCTS with DSR, DCD
    assert rd(u, IIR) == 0x01
    assert not irq.level


def test_iir_read_does_not_clear_thre_when_not_the_source():
    u, *_ = make()
    wr(u, IER, 0x03)
    u.receive(b"z")
    assert rd(u, IIR) == 0x04
    assert rd(u, IIR) == 0x04
    rd(u, RBR)
    assert rd(u, IIR) == 0x02
    assert rd(u, IIR) == 0x01


def test_thre_interrupt_raise_and_clear_rules():
    u, irq, be, _ = make()
    wr(u, MCR, 0x08)
    wr(u, THR, 0x41)
    assert rd(u, IIR) == 0x01  # not enabled: nothing reported
    wr(u, IER, 0x02)  # enabling ETBEI with THR empty interrupts
    assert irq.level
    assert rd(u, IIR) == 0x02
    assert not irq.level  # acknowledged by the IIR read
    wr(u, IER, 0x02)  # still enabled: no new event
    assert rd(u, IIR) == 0x01
    wr(u, IER, 0x00)
    wr(u, IER, 0x02)  # re-enabling does
    assert irq.level
    edges = irq.edges
    wr(u, THR, 0x42)  # clears THRE; the byte leaves at once and THR empties again
    assert irq.level
    assert irq.edges == edges + 1  # the line dropped and rose: a fresh edge
    assert rd(u, IIR) == 0x02
    wr(u, THR, 0x43)
    assert irq.edges == edges + 2
    assert be.output == b"ABC"


def test_rx_line_status_interrupt_cleared_by_lsr_read():
    u, irq, *_ = make()
    wr(u, FCR, 0x01)
    wr(u, IER, 0x04)
    wr(u, MCR, 0x08)
    u.receive(bytes(17))
    assert rd(u, IIR) == 0xC6
    assert irq.level
    rd(u, LSR)
    assert rd(u, IIR) == 0xC1
    assert not irq.level


def test_modem_status_interrupt():
    u, irq, *_ = make()
    wr(u, IER, 0x08)
    wr(u, MCR, 0x08)
    assert not irq.level
    u.set_modem_inputs(cts=True, dsr=True, ri=True, dcd=False)
    assert irq.level
    assert rd(u, IIR) == 0x00
    assert rd(u, MSR) == 0x70 | 0x08  # CTS DSR RI, DDCD
    assert not irq.level
    u.set_modem_inputs(cts=True, dsr=True, ri=False, dcd=False)
    assert rd(u, MSR) == 0x30 | 0x04  # TERI: RI went away
    u.set_modem_inputs(cts=True, dsr=True, ri=False, dcd=False)
    assert rd(u, MSR) == 0x30  # no change, no delta
    assert not irq.level


def test_out2_gates_the_irq_line():
    u, irq, *_ = make()
    wr(u, IER, 0x01)
    u.receive(b"a")
    assert not irq.level  # pending, but OUT2 = 0
    wr(u, MCR, 0x03)  # DTR, RTS only
    assert not irq.level
    wr(u, MCR, 0x0B)
    assert irq.level
    wr(u, MCR, 0x03)
    assert not irq.level
    assert rd(u, IIR) == 0x04  # still identified: only the line is gated
    wr(u, MCR, 0x08)
    rd(u, RBR)
    assert not irq.level


def test_ier_gates_each_source():
    u, irq, *_ = make()
    wr(u, MCR, 0x08)
    u.receive(b"a")
    u.set_modem_inputs(cts=False)
    assert rd(u, IIR) == 0x01
    assert not irq.level
    wr(u, IER, 0x08)
    assert rd(u, IIR) == 0x00


def test_break_reception():
    u, irq, *_ = make()
    wr(u, IER, 0x04)
    wr(u, MCR, 0x08)
    u.receive_break()
    assert irq.level
    assert rd(u, IIR) == 0x06
    assert rd(u, LSR) == 0x71  # BI, DR, THRE, TEMT
    assert rd(u, RBR) == 0x00
    assert rd(u, LSR) == 0x60
    # FIFO mode: BI is revealed when the break character reaches the top
    wr(u, FCR, 0x01)
    u.receive(b"ab")
    u.receive_break()
    lsr = rd(u, LSR)
    assert lsr & 0x10 == 0 and lsr & 0x80  # error in RCVR FIFO, not yet BI
    assert rd(u, RBR) == ord("a")
    assert rd(u, LSR) & 0x10 == 0
    assert rd(u, RBR) == ord("b")
    assert rd(u, IIR) == 0xC6
    assert rd(u, LSR) & 0x90 == 0x90
    assert rd(u, RBR) == 0
    assert rd(u, LSR) == 0x60


# -- loopback ------------------------------------------------------------------
def test_loopback_tx_into_rx_nothing_reaches_backend():
    u, _, be, sent = make()
    wr(u, FCR, 0x01)
    wr(u, MCR, 0x10)
    for c in b"loop":
        wr(u, THR, c)
    assert be.output == b"" and sent == [] and u.tx_count == 0
    assert bytes(rd(u, RBR) for _ in range(4)) == b"loop"
    assert rd(u, LSR) & 0x01 == 0
    # external input is disconnected in loopback
    assert u.rx_space() == 0
    u.receive(b"zz")
    assert rd(u, LSR) & 0x01 == 0
    assert u.rx_dropped == 2
    wr(u, MCR, 0x00)
    wr(u, THR, ord("!"))
    assert be.output == b"!"
    assert u.rx_space() == 16


def test_loopback_16450_overrun():
    u, *_ = make()
    wr(u, MCR, 0x10)
    wr(u, THR, 1)
    wr(u, THR, 2)
    assert rd(u, LSR) & 0x03 == 0x03
    assert rd(u, RBR) == 2


def test_loopback_msr_mirrors_mcr():
    u, *_ = make()
    wr(u, MCR, 0x1A)  # Linux's probe: loop | OUT2 | RTS
    assert rd(u, MSR) & 0xF0 == 0x90  # DCD | CTS
    for mcr, msr in [(0x11, 0x20), (0x12, 0x10), (0x14, 0x40), (0x18, 0x80), (0x1F, 0xF0), (0x10, 0x00)]:
        wr(u, MCR, mcr)
        assert rd(u, MSR) & 0xF0 == msr
    wr(u, MCR, 0x10)
    rd(u, MSR)
    wr(u, MCR, 0x14)
    assert rd(u, MSR) == 0x40  # RI rising: no TERI
    wr(u, MCR, 0x10)
    assert rd(u, MSR) == 0x04  # RI falling: TERI
    wr(u, MCR, 0x13)
    assert rd(u, MSR) == 0x30 | 0x03  # DCTS, DDSR
    wr(u, MCR, 0x00)  # back to the external inputs: CTS DSR DCD
    assert rd(u, MSR) == 0xB0 | 0x08


def test_loopback_modem_interrupt_identified_but_line_held_low():
    u, irq, *_ = make()
    wr(u, IER, 0x08)
    wr(u, MCR, 0x18)
    assert rd(u, IIR) == 0x00  # delta from entering loopback
    assert not irq.level  # OUT2 pin is forced inactive in loopback
    wr(u, MCR, 0x08)
    assert irq.level


# -- reset / state ------------------------------------------------------------------
def test_reset_keeps_divisor_and_scratch():
    u, irq, *_ = make()
    wr(u, LCR, 0x80)
    wr(u, DLL, 0x03)
    wr(u, LCR, 0x03)
    wr(u, SCR, 0x77)
    wr(u, FCR, 0x01)
    wr(u, IER, 0x0F)
    wr(u, MCR, 0x08)
    u.receive(b"abc")
    assert irq.level
    u.reset()
    assert not irq.level
    assert (rd(u, IER), rd(u, IIR), rd(u, LCR), rd(u, MCR), rd(u, LSR)) == (0, 1, 0, 0, 0x60)
    assert rd(u, SCR) == 0x77
    assert u.divisor == 3


def busy(u: Uart16550) -> None:
    wr(u, LCR, 0x80)
    wr(u, DLL, 0x01)
    wr(u, LCR, 0x03)
    wr(u, SCR, 0x99)
    wr(u, FCR, 0x81)
    wr(u, MCR, 0x0B)
    wr(u, IER, 0x0F)
    u.receive(b"hello")
    u.receive_break()
    u.set_modem_inputs(cts=False)


SCRIPT = [("r", IIR), ("r", LSR), ("r", RBR), ("r", IIR), ("w", THR, 0x55), ("r", IIR), ("r", IIR),
          ("r", MSR), ("r", RBR), ("r", RBR), ("r", RBR), ("r", IIR), ("r", LSR), ("r", RBR), ("r", RBR),
          ("r", LSR), ("r", IIR), ("r", SCR), ("r", LCR), ("w", LCR, 0x83), ("r", DLL), ("r", DLM)]


def run_script(u: Uart16550, irq: IrqLine, be: BufferBackend) -> list:
    trace = []
    for op in SCRIPT:
        if op[0] == "r":
            trace.append(rd(u, op[1]))
        else:
            wr(u, op[1], op[2])
        trace.append(irq.level)
    trace.append(bytes(be.output))
    return trace


def test_save_load_round_trip_on_fresh_instance():
    u, irq, be, _ = make()
    busy(u)
    assert irq.level
    state = u.save_state()
    assert state["kind"] == "uart16550" and state["version"] == 1

    calls = []
    irq2 = IrqLine("com1", sink=calls.append)
    be2 = BufferBackend()
    u2 = Uart16550(BASE, irq2, backend=be2)
    u2.load_state(state)
    assert calls == []  # no interrupt raised by loading
    assert irq2.level is True  # restored silently
    assert u2.save_state() == state
    assert run_script(u2, irq2, be2) == run_script(u, irq, be)


def test_state_is_plain_data():
    u, *_ = make()
    busy(u)

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return isinstance(x, (int, bool, str, bytes))

    assert plain(u.save_state())


@pytest.mark.parametrize(
    "patch",
    [
        {"kind": "pic8259"},
        {"version": 2},
        {"ier": 0x10},
        {"lcr": 256},
        {"mcr": -1},
        {"rx": "abc"},
        {"rx": [0] * 17},
        {"rx": [0x200]},
        {"fifo_on": 1},
        {"thre_pending": None},
        {"msr_delta": 0x10},
        {"tx_count": 1.5},
    ],
)
def test_load_rejects_malformed_state(patch):
    u, *_ = make()
    state = u.save_state()
    state.update(patch)
    with pytest.raises(DeviceStateError):
        Uart16550(BASE, IrqLine()).load_state(state)


def test_load_rejects_missing_key_and_non_dict():
    u, *_ = make()
    state = u.save_state()
    del state["scr"]
    with pytest.raises(DeviceStateError):
        u.load_state(state)
    with pytest.raises(DeviceStateError):
        u.load_state([1, 2])  # type: ignore[arg-type]


# -- property tests ------------------------------------------------------------------
op_st = st.one_of(
    st.tuples(st.just("r"), st.integers(-2, 9), st.sampled_from([1, 2, 4])),
    st.tuples(st.just("w"), st.integers(-2, 9), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFF_FFFF)),
    st.tuples(st.just("rx"), st.binary(max_size=20)),
    st.tuples(st.just("brk")),
    st.tuples(st.just("modem"), st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    st.tuples(st.just("adv"), st.integers(0, 10_000)),
)


def apply(u: Uart16550, clock: VirtualClock, op: tuple):
    kind = op[0]
    if kind == "r":
        return u.io_read(BASE + op[1], op[2])
    if kind == "w":
        u.io_write(BASE + op[1], op[2], op[3] & ((1 << (8 * op[2])) - 1))
    elif kind == "rx":
        u.receive(op[1])
    elif kind == "brk":
        u.receive_break()
    elif kind == "modem":
        u.set_modem_inputs(*op[1:])
    else:
        clock.advance(op[1])
    return None


@settings(max_examples=150, deadline=None)
@given(st.lists(op_st, max_size=60), st.lists(op_st, max_size=60))
def test_random_traffic_never_raises_and_save_load_is_exact(before, after):
    clock = VirtualClock()
    u, irq, be, _ = make()
    for op in before:
        apply(u, clock, op)
        assert irq.level == u._line_level()
        assert 0 <= u.rx_space() <= 16
    state = u.save_state()

    clock2 = VirtualClock()
    clock2.load_state(clock.save_state())
    irq2 = IrqLine("copy")
    be2 = BufferBackend()
    u2 = Uart16550(BASE, irq2, backend=be2)
    u2.load_state(state)
    assert u2.save_state() == state
    assert irq2.level == irq.level
    out_before = len(be.output)

    for op in after:
        r1 = apply(u, clock, op)
        r2 = apply(u2, clock2, op)
        assert r1 == r2
        if r1 is not None:
            assert 0 <= r1 < (1 << (8 * op[2]))
        assert irq.level == irq2.level
    assert bytes(be.output[out_before:]) == bytes(be2.output)
    assert u.save_state() == u2.save_state()


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.sampled_from([0x00, 0x01, 0x41, 0x81, 0xC1]))
def test_rx_space_paced_input_never_overruns(data, fcr):
    u, *_ = make()
    wr(u, FCR, fcr)
    got = bytearray()
    pending = bytearray(data)
    while pending:
        n = u.rx_space()
        assert n > 0
        u.receive(bytes(pending[:n]))
        del pending[:n]
        while rd(u, LSR) & 0x01 and len(got) % 3 != 2:  # guest reads a few at a time
            got.append(rd(u, RBR))
        if rd(u, LSR) & 0x01 and u.rx_space() == 0:
            got.append(rd(u, RBR))
    while rd(u, LSR) & 0x01:
        got.append(rd(u, RBR))
    assert bytes(got) == data
    assert u.overrun_count == 0


# -- backends ------------------------------------------------------------------
def test_backends_satisfy_protocol(tmp_path):
    for be in (NullBackend(), BufferBackend(), FileBackend(tmp_path / "f")):
        assert isinstance(be, SerialBackend)
        be.close()


def test_null_and_buffer_backends():
    nb = NullBackend()
    nb.write(b"x")
    assert nb.poll_input() == b""
    bb = BufferBackend(b"ab")
    bb.feed(b"cd")
    assert bb.poll_input() == b"abcd"
    assert bb.poll_input() == b""
    bb.write(b"out")
    bb.write(b"put")
    assert bb.take_output() == b"output"
    assert bb.output == b""


def _collect(poll, n: int, timeout: float = 2.0) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += poll()
        if len(got) < n:
            time.sleep(0.005)
    return got


def test_socket_backend_on_loopback():
    be = SocketBackend()
    try:
        assert be.host == "127.0.0.1" and be.port > 0
        be.write(b"nobody listening")
        assert be.dropped == len(b"nobody listening")
        u = Uart16550(BASE, IrqLine(), backend=be)
        with socket.create_connection(("127.0.0.1", be.port), timeout=2.0) as client:
            client.settimeout(2.0)
            deadline = time.monotonic() + 2.0
            while not be.connected and time.monotonic() < deadline:
                be.poll_input()
                time.sleep(0.005)
            assert be.connected
            client.sendall(b"typed")
            assert _collect(be.poll_input, 5) == b"typed"
            for c in b"echo:typed":
                wr(u, THR, c)
            got = b""
            while len(got) < 10:
                chunk = client.recv(64)
                assert chunk
                got += chunk
            assert got == b"echo:typed"
        # the client left: the backend notices and serves the next one
        deadline = time.monotonic() + 2.0
        while be.connected and time.monotonic() < deadline:
            be.poll_input()
            time.sleep(0.005)
        assert not be.connected
        with socket.create_connection(("127.0.0.1", be.port), timeout=2.0) as client2:
            client2.sendall(b"2nd")
            assert _collect(be.poll_input, 3) == b"2nd"
            assert be.connections == 2
    finally:
        be.close()


def test_stdio_backend_on_pty_raw_mode_and_restore(monkeypatch):
    registered, unregistered = [], []
    monkeypatch.setattr(sb.atexit, "register", registered.append)
    monkeypatch.setattr(sb.atexit, "unregister", unregistered.append)
    master, slave = os.openpty()
    try:
        original = termios.tcgetattr(slave)
        assert original[3] & termios.ICANON and original[3] & termios.ECHO
        be = StdioBackend(slave, slave)
        assert be.is_tty and be.escape
        raw = termios.tcgetattr(slave)
        assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert not raw[0] & termios.ICRNL
        assert raw[1] & termios.OPOST  # guest LF still renders as a new line
        assert registered == [be.restore_terminal]

        assert be.poll_input() == b""
        os.write(master, b"ab\r")
        assert _collect(be.poll_input, 3) == b"ab\r"  # no line discipline, no CR->NL
        os.write(master, b"\x01\x01z\x01q")
        assert _collect(be.poll_input, 4) == b"\x01z\x01q"
        assert not be.quit_requested
        os.write(master, b"k\x01")
        assert _collect(be.poll_input, 1) == b"k"  # escape split across reads
        os.write(master, b"x")
        _collect(be.poll_input, 1, timeout=0.3)
        assert be.quit_requested

        be.write(b"hi\n")
        got = _collect(lambda: os.read(master, 64), 4)
        assert got == b"hi\r\n"

        be.close()
        assert termios.tcgetattr(slave) == original
        assert unregistered == [be.restore_terminal]
        be.close()  # idempotent
        assert be.poll_input() == b""
    finally:
        os.close(master)
        os.close(slave)


def test_stdio_backend_atexit_hook_restores_terminal(monkeypatch):
    registered = []
    monkeypatch.setattr(sb.atexit, "register", registered.append)
    monkeypatch.setattr(sb.atexit, "unregister", lambda f: None)
    master, slave = os.openpty()
    try:
        original = termios.tcgetattr(slave)
        be = StdioBackend(slave, slave)
        assert termios.tcgetattr(slave) != original
        for hook in registered:  # the interpreter exiting without close()
            hook()
        assert termios.tcgetattr(slave) == original
        be.close()
        assert termios.tcgetattr(slave) == original
    finally:
        os.close(master)
        os.close(slave)


def test_stdio_backend_on_pipe_is_not_a_tty(monkeypatch):
    registered = []
    monkeypatch.setattr(sb.atexit, "register", registered.append)
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    try:
        be = StdioBackend(r_in, w_out)
        assert not be.is_tty and not be.escape and registered == []
        os.write(w_in, b"\x01xdata")
        assert _collect(be.poll_input, 6) == b"\x01xdata"  # no escapes on a pipe
        assert not be.quit_requested
        be.write(b"out")
        assert os.read(r_out, 16) == b"out"
        os.close(w_in)
        w_in = -1
        assert be.poll_input() == b""
        assert be.eof
        os.close(r_out)
        r_out = -1
        be.write(b"broken pipe is absorbed")
        assert be.output_broken
        be.close()
    finally:
        for fd in (r_in, w_in, r_out, w_out):
            if fd >= 0:
                os.close(fd)
