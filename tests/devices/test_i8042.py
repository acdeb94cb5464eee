"""8042 keyboard controller and port 0x92, driven through their ports only."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.base import DeviceStateError, IrqLine
from devices.clock import VirtualClock
from devices.legacy.i8042 import I8042, Port92

DATA, CMD = 0x60, 0x64
OBF, SYS, CMDF, AUXOBF = 0x01, 0x04, 0x08, 0x20


class Rig:
    def __init__(self) -> None:
        self.irq1_log: list[bool] = []
        self.irq12_log: list[bool] = []
        self.irq1 = IrqLine("irq1", self.irq1_log.append)
        self.irq12 = IrqLine("irq12", self.irq12_log.append)
        self.a20: list[bool] = []
        self.resets = 0
        self.kbc = I8042(self.irq1, self.irq12, self.a20.append, self._reset)

    def _reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        return self.kbc.io_read(CMD, 1)

    def read(self) -> int:
        return self.kbc.io_read(DATA, 1)

    def cmd(self, c: int, *data: int) -> None:
        self.kbc.io_write(CMD, 1, c)
        for d in data:
            self.kbc.io_write(DATA, 1, d)

    def send(self, *data: int) -> None:
        for d in data:
            self.kbc.io_write(DATA, 1, d)

    def drain(self) -> list[int]:
        out = []
        for _ in range(1000):
            if not self.status() & OBF:
                return out
            out.append(self.read())
        raise AssertionError("output buffer never empties")

    def drain_tagged(self) -> list[tuple[int, bool]]:
        out = []
        while self.status() & OBF:
            aux = bool(self.status() & AUXOBF)
            out.append((self.read(), aux))
        return out


@pytest.fixture
def rig() -> Rig:
    return Rig()


# -- power-on state and status register ----------------------------------------------

def test_power_on_state(rig: Rig) -> None:
    st_ = rig.status()
    assert st_ & OBF == 0
    assert st_ & 0x02 == 0  # IBF: commands complete at once
    assert st_ & SYS == 0  # cold boot
    assert st_ & 0x10  # keylock unlocked
    assert rig.kbc.a20_enabled  # the 8042 output port powers on as 0xCF
    assert rig.kbc.command_byte == 0x43
    assert not rig.irq1.level and not rig.irq12.level
    assert rig.a20 == [] and rig.resets == 0


def test_command_data_flag(rig: Rig) -> None:
    rig.cmd(0xAD)
    assert rig.status() & CMDF
    rig.send(0xEE)
    assert not rig.status() & CMDF
    rig.cmd(0xAE)
    assert rig.status() & CMDF


def test_ibf_never_set(rig: Rig) -> None:
    for c in (0x20, 0x60, 0xAA, 0xD1):
        rig.cmd(c)
        assert rig.status() & 0x02 == 0
    rig.send(0xCF)
    assert rig.status() & 0x02 == 0


def test_wide_access_reads_open_bus_above_the_byte(rig: Rig) -> None:
    rig.cmd(0xAA)
    assert rig.kbc.io_read(DATA, 2) == 0xFF55
    assert rig.kbc.io_read(CMD, 4) & 0xFFFF_FF00 == 0xFFFF_FF00


# -- controller commands ------------------------------------------------------------------

def test_read_write_command_byte(rig: Rig) -> None:
    rig.cmd(0x20)
    assert rig.status() & OBF and not rig.status() & AUXOBF
    assert rig.read() == 0x43
    assert not rig.status() & OBF
    rig.cmd(0x60, 0x65)
    assert rig.kbc.command_byte == 0x65
    rig.cmd(0x20)
    assert rig.read() == 0x65


def test_system_flag_follows_command_byte(rig: Rig) -> None:
    rig.cmd(0x60, 0x04)
    assert rig.status() & SYS
    rig.cmd(0x60, 0x00)
    assert not rig.status() & SYS


def test_controller_ram_read_write(rig: Rig) -> None:
    rig.cmd(0x60 + 5, 0x5A)
    rig.cmd(0x7F, 0xA5)
    rig.cmd(0x20 + 5)
    assert rig.read() == 0x5A
    rig.cmd(0x3F)
    assert rig.read() == 0xA5
    assert rig.kbc.command_byte == 0x43  # other RAM bytes leave byte 0 alone


def test_self_test_and_interface_tests(rig: Rig) -> None:
    rig.cmd(0xAA)
    assert rig.read() == 0x55
    rig.cmd(0xAB)
    assert rig.status() & OBF
    assert rig.read() == 0x00
    rig.cmd(0xA9)
    assert rig.status() & OBF
    assert rig.read() == 0x00
    rig.cmd(0xA4)
    assert rig.read() == 0xF1


def test_read_input_port(rig: Rig) -> None:
    rig.cmd(0xC0)
    assert rig.status() & OBF
    assert rig.read() & 0x80  # keyboard not inhibited


def test_aux_disable_enable_commands(rig: Rig) -> None:
    rig.cmd(0xA7)
    assert rig.kbc.command_byte & 0x20
    rig.cmd(0xA8)
    assert not rig.kbc.command_byte & 0x20


def test_keyboard_disable_holds_bytes_until_enabled(rig: Rig) -> None:
    rig.cmd(0xAD)
    assert rig.kbc.command_byte & 0x10
    rig.kbc.key_input(b"\x1e\x9e")
    assert not rig.status() & OBF
    assert not rig.irq1.level
    rig.cmd(0xAE)
    assert not rig.kbc.command_byte & 0x10
    assert rig.irq1.level
    assert rig.drain() == [0x1E, 0x9E]


def test_aux_disable_holds_mouse_bytes(rig: Rig) -> None:
    rig.cmd(0xD4, 0xF4)
    assert rig.drain() == [0xFA]
    rig.cmd(0xA7)
    rig.kbc.aux_input(b"\x08\x01\x02")
    assert not rig.status() & OBF
    rig.cmd(0xA8)
    assert rig.drain_tagged() == [(0x08, True), (0x01, True), (0x02, True)]


def test_write_keyboard_output_buffer(rig: Rig) -> None:
    rig.cmd(0xD2, 0x9C)
    s = rig.status()
    assert s & OBF and not s & AUXOBF
    assert rig.irq1.level and not rig.irq12.level
    assert rig.read() == 0x9C
    assert not rig.irq1.level


def test_write_aux_output_buffer(rig: Rig) -> None:
    rig.cmd(0xD3, 0x42)
    s = rig.status()
    assert s & OBF and s & AUXOBF
    assert rig.irq12.level and not rig.irq1.level
    assert rig.read() == 0x42
    assert not rig.irq12.level
    assert not rig.status() & (OBF | AUXOBF)


def test_new_command_abandons_pending_data(rig: Rig) -> None:
    rig.cmd(0x60)  # waits for the command byte...
    rig.cmd(0xAA)  # ...but a new command arrives
    assert rig.read() == 0x55
    rig.send(0xF2)  # so this goes to the keyboard
    assert rig.drain() == [0xFA, 0xAB, 0x83]
    assert rig.kbc.command_byte == 0x43


def test_unknown_controller_command_is_ignored(rig: Rig) -> None:
    for c in (0x00, 0x1F, 0x40, 0x5F, 0x80, 0xA0, 0xB5, 0xC7, 0xE5):
        rig.cmd(c)
    assert not rig.status() & OBF
    assert rig.resets == 0 and rig.a20 == []


def test_read_output_port(rig: Rig) -> None:
    rig.cmd(0xD0)
    assert rig.read() == 0xCF  # reset inactive, A20 on, clocks/data high, IRQ outputs 0
    rig.cmd(0xD1, 0xDD)
    rig.cmd(0xD0)
    assert rig.read() == 0xCD


def test_output_port_irq_bits_reflect_obf(rig: Rig) -> None:
    rig.kbc.key_input(b"\x1e")
    rig.cmd(0xD0)
    # Answered while the key held the buffer with IRQ1 (output port bit 4) up.
    assert rig.drain() == [0x1E, 0xDF]
    rig.cmd(0xD3, 0x00)
    rig.cmd(0xD0)
    assert rig.drain() == [0x00, 0xEF]  # IRQ12 is output port bit 5
    rig.cmd(0x60, 0x40)
    rig.cmd(0xD3, 0x00)
    rig.cmd(0xD0)
    assert rig.drain() == [0x00, 0xCF]  # the outputs are gated by the enables


# -- A20 and reset ---------------------------------------------------------------------------

def test_a20_via_output_port(rig: Rig) -> None:
    rig.cmd(0xD1, 0xDD)
    assert not rig.kbc.a20_enabled and rig.a20 == [False]
    rig.cmd(0xD1, 0xDD)  # no change: no callback
    assert rig.a20 == [False]
    rig.cmd(0xD1, 0xDF)
    assert rig.kbc.a20_enabled and rig.a20 == [False, True]
    assert rig.resets == 0
    assert not rig.status() & OBF


def test_a20_via_dd_df(rig: Rig) -> None:
    rig.cmd(0xDD)
    assert not rig.kbc.a20_enabled and rig.a20 == [False]
    rig.cmd(0xDD)
    assert rig.a20 == [False]
    rig.cmd(0xDF)
    assert rig.kbc.a20_enabled and rig.a20 == [False, True]
    rig.cmd(0xD0)
    assert rig.read() & 0x02


def test_reset_via_fe(rig: Rig) -> None:
    rig.cmd(0xFE)
    assert rig.resets == 1
    rig.cmd(0xFE)
    assert rig.resets == 2
    assert rig.a20 == []


def test_pulse_commands_reset_only_when_bit0_pulsed(rig: Rig) -> None:
    for c in range(0xF0, 0x100):
        before = rig.resets
        rig.cmd(c)
        assert rig.resets - before == (0 if c & 1 else 1), hex(c)
    assert rig.kbc.a20_enabled and rig.a20 == []


def test_reset_via_output_port_bit0(rig: Rig) -> None:
    rig.cmd(0xD1, 0xCE)
    assert rig.resets == 1
    assert rig.a20 == []
    rig.cmd(0xD0)
    assert rig.read() & 0x01  # the pulse does not stick
    rig.cmd(0xD1, 0xCF)
    assert rig.resets == 1
    rig.cmd(0xD1, 0xCC)  # reset and A20 off in one write
    assert rig.resets == 2 and rig.a20 == [False]


def test_reset_restores_power_on_and_reports_a20(rig: Rig) -> None:
    rig.cmd(0xDD)
    rig.cmd(0x60, 0x00)
    rig.kbc.key_input(b"\x01")
    rig.kbc.reset()
    assert rig.kbc.a20_enabled and rig.a20 == [False, True]
    assert rig.kbc.command_byte == 0x43
    assert not rig.status() & OBF
    assert rig.resets == 0


# -- output buffer, queue and interrupts -----------------------------------------------------

def test_key_input_queue_and_irq1(rig: Rig) -> None:
    rig.kbc.key_input(b"\x1e\x9e\x30")
    assert rig.status() & OBF and not rig.status() & AUXOBF
    assert rig.irq1.level and not rig.irq12.level
    assert rig.read() == 0x1E
    # The next byte is loaded at once and gets its own rising edge.
    assert rig.irq1.level and rig.status() & OBF
    assert rig.read() == 0x9E
    assert rig.read() == 0x30
    assert not rig.irq1.level and not rig.status() & OBF
    assert rig.irq1.edges == 3
    assert rig.irq1_log == [True, False, True, False, True, False]


def test_empty_read_returns_last_byte_without_irq(rig: Rig) -> None:
    rig.kbc.key_input(b"\x2a")
    assert rig.read() == 0x2A
    assert rig.read() == 0x2A
    assert rig.irq1.edges == 1 and not rig.irq1.level


def test_irq1_gated_by_command_byte(rig: Rig) -> None:
    rig.cmd(0x60, 0x40)  # interrupts off
    rig.kbc.key_input(b"\x1e")
    assert rig.status() & OBF and not rig.irq1.level
    rig.cmd(0x60, 0x41)  # enabling with a byte waiting raises the line
    assert rig.irq1.level
    rig.cmd(0x60, 0x40)
    assert not rig.irq1.level
    assert rig.read() == 0x1E


def test_irq12_gated_by_command_byte(rig: Rig) -> None:
    rig.cmd(0x60, 0x41)  # keyboard interrupt only
    rig.cmd(0xD3, 0x11)
    assert rig.status() & AUXOBF and not rig.irq12.level and not rig.irq1.level
    rig.cmd(0x60, 0x43)
    assert rig.irq12.level and not rig.irq1.level
    assert rig.read() == 0x11
    assert not rig.irq12.level


def test_controller_response_raises_irq1_when_enabled(rig: Rig) -> None:
    rig.cmd(0x20)
    assert rig.irq1.level  # the 8042's OBF interrupt does not know who filled it
    rig.read()
    rig.cmd(0x60, 0x40)
    rig.cmd(0x20)
    assert not rig.irq1.level
    assert rig.read() == 0x40


def test_controller_response_goes_before_queued_keys(rig: Rig) -> None:
    rig.kbc.key_input(b"\x10\x11")
    rig.cmd(0xAA)
    assert rig.drain() == [0x10, 0x55, 0x11]


def test_keyboard_and_aux_bytes_are_tagged(rig: Rig) -> None:
    rig.cmd(0xD4, 0xF4)
    rig.kbc.aux_input(b"\x09")
    rig.kbc.key_input(b"\x1c")
    assert rig.drain_tagged() == [(0xFA, True), (0x1C, False), (0x09, True)]


def test_queue_is_bounded(rig: Rig) -> None:
    rig.kbc.key_input(bytes(range(256)) * 3)
    got = rig.drain()
    assert got == list(range(256))
    assert rig.kbc.dropped == 512


# -- keyboard commands -----------------------------------------------------------------------

def test_kbd_reset(rig: Rig) -> None:
    rig.send(0xF3, 0x00)
    rig.drain()
    rig.kbc.key_input(b"\x1e")
    rig.send(0xFF)
    assert rig.drain() == [0x1E, 0xFA, 0xAA]
    assert rig.kbc.typematic == 0x2B


def test_kbd_identify(rig: Rig) -> None:
    rig.send(0xF2)
    assert rig.drain() == [0xFA, 0xAB, 0x83]


def test_kbd_disable_enable_scanning(rig: Rig) -> None:
    rig.send(0xF5)
    assert rig.drain() == [0xFA]
    assert not rig.kbc.scanning
    rig.kbc.key_input(b"\x1e")
    assert not rig.status() & OBF
    rig.send(0xF4)
    assert rig.drain() == [0xFA]
    rig.kbc.key_input(b"\x1e")
    assert rig.drain() == [0x1E]


def test_kbd_set_default(rig: Rig) -> None:
    rig.send(0xF0, 0x01)
    rig.send(0xF6)
    assert rig.drain() == [0xFA, 0xFA, 0xFA]
    assert rig.kbc.scancode_set == 2 and rig.kbc.scanning


def test_kbd_set_leds(rig: Rig) -> None:
    rig.send(0xED)
    assert rig.drain() == [0xFA]
    rig.send(0x05)
    assert rig.drain() == [0xFA]
    assert rig.kbc.kbd_leds == 0x05


def test_kbd_command_aborts_pending_argument(rig: Rig) -> None:
    rig.send(0xED, 0xF2)
    assert rig.drain() == [0xFA, 0xFA, 0xAB, 0x83]
    assert rig.kbc.kbd_leds == 0


def test_kbd_scancode_set(rig: Rig) -> None:
    rig.send(0xF0, 0x00)
    assert rig.drain() == [0xFA, 0xFA, 0x02]
    rig.send(0xF0, 0x03)
    assert rig.drain() == [0xFA, 0xFA]
    rig.send(0xF0, 0x00)
    assert rig.drain() == [0xFA, 0xFA, 0x03]
    assert rig.kbc.scancode_set == 3
    rig.send(0xF0, 0x07)
    assert rig.drain() == [0xFA, 0xFE]
    assert rig.kbc.scancode_set == 3


def test_kbd_typematic(rig: Rig) -> None:
    rig.send(0xF3)
    assert rig.drain() == [0xFA]
    rig.send(0x20)
    assert rig.drain() == [0xFA]
    assert rig.kbc.typematic == 0x20


def test_kbd_echo(rig: Rig) -> None:
    rig.send(0xEE)
    assert rig.drain() == [0xEE]


def test_kbd_unknown_command_resend(rig: Rig) -> None:
    for c in (0x00, 0x55, 0xEC, 0xEF, 0xF1):
        rig.send(c)
        assert rig.drain() == [0xFE], hex(c)


def test_kbd_resend_last_byte(rig: Rig) -> None:
    rig.send(0xF2)
    rig.drain()
    rig.send(0xFE)
    assert rig.drain() == [0x83]


def test_kbd_set3_key_list(rig: Rig) -> None:
    rig.send(0xFB, 0x1C, 0x1B, 0xEE)
    assert rig.drain() == [0xFA, 0xFA, 0xFA, 0xEE]


def test_kbd_reply_goes_ahead_of_buffered_keys_and_clear_drops_keys_only(rig: Rig) -> None:
    rig.kbc.key_input(b"\x10\x11\x12")  # 0x10 reaches the output buffer, the rest wait
    rig.send(0xEE)
    rig.send(0xF4)  # "clears its output buffer": the waiting keys, not the echo
    assert rig.drain() == [0x10, 0xEE, 0xFA]


def test_kbd_write_enables_interface(rig: Rig) -> None:
    rig.cmd(0xAD)
    rig.send(0xEE)
    assert not rig.kbc.command_byte & 0x10
    assert rig.drain() == [0xEE]


def test_kbd_responses_raise_irq1(rig: Rig) -> None:
    rig.send(0xF4)
    assert rig.irq1.level
    rig.read()
    assert not rig.irq1.level


# -- aux device --------------------------------------------------------------------------------

def test_aux_reset(rig: Rig) -> None:
    rig.cmd(0xD4, 0xFF)
    assert rig.drain_tagged() == [(0xFA, True), (0xAA, True), (0x00, True)]


def test_aux_commands_acknowledged(rig: Rig) -> None:
    for c in (0xF6, 0xE6, 0xEA, 0xF0, 0x55):
        rig.cmd(0xD4, c)
        assert rig.drain_tagged() == [(0xFA, True)], hex(c)
    rig.cmd(0xD4, 0xF2)
    assert rig.drain() == [0xFA, 0x00]
    rig.cmd(0xD4, 0xF3)
    rig.cmd(0xD4, 200)
    rig.cmd(0xD4, 0xE9)  # status request: status, resolution, sample rate
    assert rig.drain() == [0xFA, 0xFA, 0xFA, 0x00, 0x02, 200]
    rig.cmd(0xD4, 0xE7)  # 2:1 scaling
    rig.cmd(0xD4, 0xE8)
    rig.cmd(0xD4, 0x03)
    rig.cmd(0xD4, 0xF4)
    rig.cmd(0xD4, 0xE9)
    assert rig.drain() == [0xFA, 0xFA, 0xFA, 0xFA, 0xFA, 0x30, 0x03, 200]


def test_aux_reply_raises_irq12(rig: Rig) -> None:
    rig.cmd(0xD4, 0xF4)
    assert rig.irq12.level and not rig.irq1.level
    rig.read()
    assert not rig.irq12.level


def test_aux_input_only_when_reporting(rig: Rig) -> None:
    rig.kbc.aux_input(b"\x08\x00\x00")
    assert not rig.status() & OBF
    rig.cmd(0xD4, 0xF4)
    rig.drain()
    rig.kbc.aux_input(b"\x08\x00\x00")
    assert rig.drain_tagged() == [(0x08, True), (0, True), (0, True)]


def test_d4_enables_aux_interface(rig: Rig) -> None:
    rig.cmd(0xA7)
    rig.cmd(0xD4, 0xF2)
    assert not rig.kbc.command_byte & 0x20
    assert rig.drain() == [0xFA, 0x00]


# -- port 0x92 ---------------------------------------------------------------------------------

class P92Rig:
    def __init__(self) -> None:
        self.a20: list[bool] = []
        self.resets = 0
        self.p = Port92(self.a20.append, self._reset)

    def _reset(self) -> None:
        self.resets += 1


def test_port92_a20() -> None:
    r = P92Rig()
    assert r.p.io_read(0x92, 1) == 0 and not r.p.a20_enabled
    r.p.io_write(0x92, 1, 0x02)
    assert r.a20 == [True] and r.p.a20_enabled
    assert r.p.io_read(0x92, 1) == 0x02
    r.p.io_write(0x92, 1, 0x02)
    assert r.a20 == [True]
    r.p.io_write(0x92, 1, 0x00)
    assert r.a20 == [True, False]
    assert r.resets == 0


def test_port92_fast_reset_on_rising_edge_only() -> None:
    r = P92Rig()
    r.p.io_write(0x92, 1, 0x01)
    assert r.resets == 1
    assert r.p.io_read(0x92, 1) & 0x01
    r.p.io_write(0x92, 1, 0x01)
    assert r.resets == 1  # already 1: no new request
    r.p.io_write(0x92, 1, 0x00)
    assert r.resets == 1
    r.p.io_write(0x92, 1, 0x03)
    assert r.resets == 2 and r.a20 == [True]


def test_port92_lock_bit_sticks_and_reserved_bits_read_zero() -> None:
    r = P92Rig()
    r.p.io_write(0x92, 1, 0xFC)
    assert r.p.io_read(0x92, 1) == 0xC8
    r.p.io_write(0x92, 1, 0x00)
    assert r.p.io_read(0x92, 1) == 0x08
    r.p.reset()
    assert r.p.io_read(0x92, 1) == 0x00


def test_port92_reset_reports_a20_off() -> None:
    r = P92Rig()
    r.p.io_write(0x92, 1, 0x02)
    r.p.reset()
    assert r.a20 == [True, False] and r.resets == 0


def test_port92_state_round_trip() -> None:
    r = P92Rig()
    r.p.io_write(0x92, 1, 0x0B)
    r2 = P92Rig()
    r2.p.load_state(r.p.save_state())
    assert r2.a20 == [] and r2.resets == 0  # loading calls nothing
    assert r2.p.io_read(0x92, 1) == 0x0B and r2.p.a20_enabled
    r2.p.io_write(0x92, 1, 0x01)  # bit 0 already set: no edge
    assert r2.resets == 0
    with pytest.raises(DeviceStateError):
        r2.p.load_state({"kind": "port92", "version": 1, "value": 0x04})
    with pytest.raises(DeviceStateError):
        r2.p.load_state({"kind": "port92", "version": 2, "value": 0})


# -- state -------------------------------------------------------------------------------------

def _busy_rig() -> Rig:
    r = Rig()
    r.cmd(0xDD)
    r.cmd(0x60, 0x47)
    r.cmd(0x65, 0x99)
    r.send(0xED)  # keyboard waiting for the LED byte
    r.cmd(0xD4, 0xF4)
    r.kbc.key_input(b"\x1e\x9e")
    r.cmd(0xAA)
    r.cmd(0xD1)  # controller waiting for its data byte
    return r


def test_state_round_trip_behaves_identically() -> None:
    a = _busy_rig()
    state = a.kbc.save_state()
    b = Rig()
    b.kbc.load_state(state)
    assert b.irq1_log == [] and b.irq12_log == [] and b.a20 == [] and b.resets == 0
    assert b.irq1.level == a.irq1.level and b.irq12.level == a.irq12.level
    assert b.kbc.save_state() == state
    for r in (a, b):
        r.send(0xDF)  # the pending 0xD1 data: A20 back on
        r.send(0x03)  # the LED byte
        r.kbc.aux_input(b"\x08\x01\x01")
    ta, tb = a.drain_tagged(), b.drain_tagged()
    assert ta == tb
    # ED's ack, the self-test answer, the LED byte's ack ahead of the buffered keys.
    assert ta[:5] == [(0xFA, False), (0x55, False), (0xFA, False), (0x1E, False), (0x9E, False)]
    assert ta[5:] == [(0xFA, True), (0x08, True), (0x01, True), (0x01, True)]
    assert a.kbc.kbd_leds == b.kbc.kbd_leds == 3
    assert a.a20[-1] is True and b.a20 == [True]
    a.cmd(0x25)
    b.cmd(0x25)
    assert a.read() == b.read() == 0x99


def test_state_round_trip_with_aux_byte_waiting() -> None:
    a = Rig()
    a.cmd(0xD4, 0xF2)  # mouse ID reply: FA 00 on the aux side
    b = Rig()
    b.kbc.load_state(a.kbc.save_state())
    assert b.irq12.level and not b.irq1.level and b.irq12_log == []
    assert b.status() == a.status() and b.status() & AUXOBF
    assert b.drain_tagged() == a.drain_tagged() == [(0xFA, True), (0x00, True)]
    assert not b.irq12.level


def test_state_is_plain_data() -> None:
    state = _busy_rig().kbc.save_state()

    def plain(x: object) -> bool:
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (int, bool, str, bytes))

    assert plain(state)
    assert state["kind"] == "i8042" and state["version"] == 1


def test_load_rejects_malformed_state(rig: Rig) -> None:
    good = _busy_rig().kbc.save_state()
    bad = [
        {**good, "kind": "pic"},
        {**good, "version": 2},
        {k: v for k, v in good.items() if k != "ram"},
        {**good, "ram": b"\x00" * 31},
        {**good, "ob": 256},
        {**good, "obf": 1},
        {**good, "pending": 0xAA},
        {**good, "ctrl_q": [0x400]},
        {**good, "kbd_q": b"\x00" * 1000},
        {**good, "kbd": {**good["kbd"], "set": 4}},
        {**good, "aux": {**good["aux"], "arg": 0x42}},
        "nope",
    ]
    for s in bad:
        with pytest.raises(DeviceStateError):
            rig.kbc.load_state(s)  # type: ignore[arg-type]


# -- random traffic ------------------------------------------------------------------------------

_op = st.one_of(
    st.tuples(st.just("r"), st.sampled_from([DATA, CMD]), st.sampled_from([1, 2, 4])),
    st.tuples(st.just("w"), st.sampled_from([DATA, CMD]), st.sampled_from([1, 2, 4]),
              st.integers(0, 0xFFFF_FFFF)),
    # Bias writes toward the interesting command space.
    st.tuples(st.just("w"), st.just(CMD), st.just(1),
              st.sampled_from([0x20, 0x60, 0xA7, 0xA8, 0xAD, 0xAE, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4,
                               0xDD, 0xDF, 0xFE, 0xAA])),
    st.tuples(st.just("w"), st.just(DATA), st.just(1),
              st.sampled_from([0xED, 0xEE, 0xF0, 0xF2, 0xF3, 0xF4, 0xF5, 0xFF, 0x00, 0x02, 0xE9])),
    st.tuples(st.just("k"), st.binary(max_size=8)),
    st.tuples(st.just("m"), st.binary(max_size=6)),
    st.tuples(st.just("t"), st.integers(0, 10_000)),
)


def _apply(r: Rig, clock: VirtualClock, op: tuple) -> object:
    kind = op[0]
    if kind == "r":
        v = r.kbc.io_read(op[1], op[2])
        assert 0 <= v <= {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}[op[2]]
        return v
    if kind == "w":
        mask = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}[op[2]]
        r.kbc.io_write(op[1], op[2], op[3] & mask)
        return None
    if kind == "k":
        r.kbc.key_input(op[1])
    elif kind == "m":
        r.kbc.aux_input(op[1])
    else:
        clock.advance(op[1])  # the controller keeps no time: nothing may change
    return None


def _observe(r: Rig) -> tuple:
    return (r.irq1.level, r.irq12.level, r.kbc.a20_enabled, r.resets)


@settings(max_examples=150, deadline=None)
@given(st.lists(_op, max_size=40), st.lists(_op, max_size=40))
def test_random_traffic_and_snapshot_anywhere(before: list, after: list) -> None:
    clock = VirtualClock()
    a = Rig()
    for op in before:
        _apply(a, clock, op)
    state = a.kbc.save_state()
    b = Rig()
    b.kbc.load_state(state)
    assert b.irq1.level == a.irq1.level and b.irq12.level == a.irq12.level
    base_a20, base_resets = len(a.a20), a.resets
    b.resets = a.resets
    for op in after:
        assert _apply(a, clock, op) == _apply(b, clock, op)
        assert _observe(a) == _observe(b)
    assert a.a20[base_a20:] == b.a20
    assert a.kbc.save_state() == b.kbc.save_state()
    assert base_resets <= a.resets


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFF_FFFF),
                          st.booleans()), max_size=30), st.integers(0, 30))
def test_port92_random_traffic_and_snapshot(ops: list, cut: int) -> None:
    a = P92Rig()
    b = None
    for i, (size, value, is_read) in enumerate(ops):
        if i == cut:
            b = P92Rig()
            b.p.load_state(a.p.save_state())
            b.resets, b.a20[:] = a.resets, a.a20
        mask = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}[size]
        for r in (a,) if b is None else (a, b):
            if is_read:
                assert r.p.io_read(0x92, size) & ~mask == 0
            else:
                r.p.io_write(0x92, size, value & mask)
        if b is not None:
            assert a.p.io_read(0x92, 1) == b.p.io_read(0x92, 1)
            assert (a.resets, a.a20) == (b.resets, b.a20)
