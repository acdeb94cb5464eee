"""isa-debug-exit, port E9 console and port 80 POST codes, driven through their ports."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.base import DeviceStateError
from devices.bus import IoBus
from devices.clock import VirtualClock
from devices.legacy.debugports import DebugConsole, DebugExit, PostCode

MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}


# -- isa-debug-exit --------------------------------------------------------------------

def test_debug_exit_defaults_match_qemu() -> None:
    d = DebugExit(lambda v: None)
    assert d.io_ranges == [(0x501, 2)]
    assert d.kind == "debug_exit"


def test_debug_exit_calls_on_exit_with_value() -> None:
    codes: list[int] = []
    d = DebugExit(codes.append)
    d.io_write(0x501, 1, 0x10)
    assert codes == [0x10]
    d.io_write(0x501, 2, 0x1234)
    d.io_write(0x502, 1, 0)  # any port in the range
    assert codes == [0x10, 0x1234, 0]
    assert d.writes == 3 and d.last == 0


def test_debug_exit_qemu_status() -> None:
    assert DebugExit.qemu_status(0) == 1
    assert DebugExit.qemu_status(0x10) == 0x21
    assert DebugExit.qemu_status(0x31) == 0x63


def test_debug_exit_reads_all_ones() -> None:
    d = DebugExit(lambda v: None)
    assert d.io_read(0x501, 1) == 0xFF
    assert d.io_read(0x501, 2) == 0xFFFF
    assert d.io_read(0x502, 4) == 0xFFFF_FFFF


def test_debug_exit_custom_port_and_size_through_bus() -> None:
    codes: list[int] = []
    d = DebugExit(codes.append, port=0xF4, size=4)
    bus = IoBus()
    for base, length in d.io_ranges:
        bus.register(d, base, length)
    bus.write(0xF4, 4, 0xDEADBEEF)
    bus.write(0xF7, 1, 0x02)
    bus.write(0xF8, 1, 0x03)  # outside the device
    assert codes == [0xDEADBEEF, 0x02]
    with pytest.raises(ValueError):
        DebugExit(codes.append, size=3)


def test_debug_exit_state_round_trip() -> None:
    a = DebugExit(lambda v: None)
    a.io_write(0x501, 1, 7)
    codes: list[int] = []
    b = DebugExit(codes.append)
    b.load_state(a.save_state())
    assert codes == []  # loading calls nothing
    assert (b.writes, b.last) == (1, 7)
    b.io_write(0x501, 1, 9)
    assert codes == [9] and b.writes == 2
    fresh = DebugExit(lambda v: None)
    fresh.load_state(DebugExit(lambda v: None).save_state())
    assert fresh.last is None
    for bad in ({"kind": "debug_exit", "version": 1, "writes": -1, "last": None},
                {"kind": "debug_exit", "version": 1, "writes": 0},
                {"kind": "debug_exit", "version": 1, "writes": 0, "last": "x"},
                {"kind": "debugcon", "version": 1, "bytes_written": 0}):
        with pytest.raises(DeviceStateError):
            b.load_state(bad)


# -- port E9 console ------------------------------------------------------------------------

def test_debugcon_bytes_go_to_sink() -> None:
    out: list[bytes] = []
    d = DebugConsole(out.append)
    assert d.io_ranges == [(0xE9, 1)] and d.kind == "debugcon"
    for ch in b"hi\n":
        d.io_write(0xE9, 1, ch)
    assert b"".join(out) == b"hi\n"
    assert out == [b"h", b"i", b"\n"]
    d.io_write(0xE9, 2, 0x4241)  # only the addressed byte
    assert out[-1] == b"A"
    assert d.bytes_written == 4


def test_debugcon_detection_read() -> None:
    d = DebugConsole(lambda b: None)
    assert d.io_read(0xE9, 1) == 0xE9
    assert d.io_read(0xE9, 2) == 0xFFE9


def test_debugcon_other_port() -> None:
    out: list[bytes] = []
    d = DebugConsole(out.append, port=0x402)
    assert d.io_ranges == [(0x402, 1)]
    d.io_write(0x402, 1, 0x41)
    assert out == [b"A"]
    assert d.io_read(0x402, 1) == 0xE9


def test_debugcon_state_round_trip() -> None:
    a = DebugConsole(lambda b: None)
    a.io_write(0xE9, 1, 0x41)
    out: list[bytes] = []
    b = DebugConsole(out.append)
    b.load_state(a.save_state())
    assert out == [] and b.bytes_written == 1
    b.io_write(0xE9, 1, 0x42)
    assert out == [b"B"] and b.bytes_written == 2
    with pytest.raises(DeviceStateError):
        b.load_state({"kind": "debugcon", "version": 1})


# -- port 80 POST codes --------------------------------------------------------------------------

def test_postcode_latches_counts_and_reports() -> None:
    seen: list[int] = []
    p = PostCode(seen.append)
    assert p.io_ranges == [(0x80, 1)] and p.kind == "postcode"
    assert p.writes == 0
    p.io_write(0x80, 1, 0x12)
    p.io_write(0x80, 1, 0x34)
    assert p.last == 0x34 and p.writes == 2 and seen == [0x12, 0x34]
    assert p.io_read(0x80, 1) == 0x34
    assert p.io_read(0x80, 2) == 0xFF34
    p.io_write(0x80, 4, 0xAABBCC56)
    assert p.last == 0x56 and seen[-1] == 0x56


def test_postcode_without_callback() -> None:
    p = PostCode()
    p.io_write(0x80, 1, 0xAA)
    assert p.io_read(0x80, 1) == 0xAA and p.writes == 1
    p.reset()
    assert p.last == 0 and p.writes == 0


def test_postcode_state_round_trip() -> None:
    a = PostCode()
    a.io_write(0x80, 1, 0x55)
    seen: list[int] = []
    b = PostCode(seen.append)
    b.load_state(a.save_state())
    assert seen == [] and b.last == 0x55 and b.io_read(0x80, 1) == 0x55 and b.writes == 1
    b.io_write(0x80, 1, 0x66)
    assert seen == [0x66] and b.writes == 2
    with pytest.raises(DeviceStateError):
        b.load_state({"kind": "postcode", "version": 1, "last": 0x100, "writes": 0})


# -- random traffic ---------------------------------------------------------------------------------

def _make(which: str, log: list) -> object:
    if which == "exit":
        return DebugExit(lambda v: log.append(("exit", v)))
    if which == "con":
        return DebugConsole(lambda b: log.append(("con", b)))
    return PostCode(lambda v: log.append(("post", v)))


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(["exit", "con", "post"]),
    st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.sampled_from([1, 2, 4]),
                       st.integers(0, 0xFFFF_FFFF), st.integers(0, 1000)), max_size=30),
    st.integers(0, 30),
)
def test_random_traffic_and_snapshot_anywhere(which: str, ops: list, cut: int) -> None:
    clock = VirtualClock()
    log_a: list = []
    a = _make(which, log_a)
    base, length = a.io_ranges[0]
    b = None
    log_b: list = []
    for i, (is_read, off, size, value, dt) in enumerate(ops):
        if i == cut:
            b = _make(which, log_b)
            b.load_state(a.save_state())
            mark = len(log_a)
        port = base + off % length
        if is_read:
            ra = a.io_read(port, size)
            assert 0 <= ra <= MASK[size]
            if b is not None:
                assert b.io_read(port, size) == ra
        else:
            a.io_write(port, size, value & MASK[size])
            if b is not None:
                b.io_write(port, size, value & MASK[size])
        clock.advance(dt)  # these ports keep no time
    if b is not None:
        assert log_a[mark:] == log_b
        assert a.save_state() == b.save_state()
