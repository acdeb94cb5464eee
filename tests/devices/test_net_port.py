"""When a machine's NetInput asks its boundary for frames (devices/net/port.py): right after a
transmit, periodically with a backing-off interval, and soon after a starved receiver got room;
every decision a function of virtual time and of what crossed the boundary, so a replay asks at
the same moments."""
from __future__ import annotations

import pytest

from devices.base import DeviceStateError
from devices.clock import VirtualClock
from devices.net.port import BUSY_TICKS, FAST_POLL_TICKS, SLOW_POLL_TICKS, NetInput, decode_net_frame
from replay.boundary import RecordingBoundary, ReplayBoundary
from tests.machine_helpers import ClockMachine

FRAME = bytes(range(60))


class Nic:
    """A NIC with ``room`` receive buffers; records (time, frame) of what it is handed."""

    def __init__(self, clock, room=8):
        self.clock = clock
        self.room = room
        self.got = []

    def can_receive(self, size=0):
        return self.room > 0

    def deliver(self, frame):
        self.room -= 1
        self.got.append((self.clock.now(), bytes(frame)))


class Wire:
    """A backend; with ``answer`` it hands back a frame inside send, as libslirp acknowledges a
    TCP segment inside slirp_input."""

    def __init__(self, answer=False):
        self.answer = answer
        self.port = None
        self.polls = 0

    def connect(self, port):
        self.port = port

    def send(self, frame):
        if self.answer:
            self.port.deliver(b"\x02" + frame[1:])

    def poll(self):
        self.polls += 1


def rig(boundary, answer=False, room=8):
    clock = VirtualClock()
    boundary.bind(ClockMachine(clock))
    hub = NetInput(clock, lambda: boundary)
    boundary.attach("net", hub.source)
    wire = Wire(answer)
    port = hub.add_port("net0", wire)
    nic = Nic(clock, room)
    port.nic = nic
    nic_rx_ready = hub.rx_ready
    return clock, hub, port, wire, nic, nic_rx_ready


def test_an_answer_given_inside_send_goes_in_at_the_transmit_without_polling_the_wire():
    events = []
    clock, hub, port, wire, nic, _ = rig(RecordingBoundary(events.append), answer=True)
    clock.advance_to(12_345)
    port.send(FRAME)                         # as from the notify of an instruction at 12,345
    clock.advance_to(12_345)                 # the stop right after it
    assert nic.got == [(12_345, b"\x02" + FRAME[1:])]
    assert hub.tx_polls == 1 and hub.polls == 0 and wire.polls == 0
    assert [(ev.icount, decode_net_frame(ev.payload)[0]) for ev in events] == [(12_345, "net0")]
    # the periodic poll was not brought forward: the answer came
    assert hub._timer.deadline == SLOW_POLL_TICKS


def test_a_transmit_with_no_answer_brings_the_periodic_poll_forward():
    clock, hub, port, wire, nic, _ = rig(RecordingBoundary(lambda e: None))
    clock.advance_to(5_000)
    port.send(FRAME)
    clock.advance_to(5_000)
    assert hub.tx_polls == 1 and nic.got == []
    assert hub._timer.deadline == 5_000 + FAST_POLL_TICKS
    # and the periodic poll keeps that pace for BUSY_TICKS (the answer may come later), then backs off
    gaps = []
    while clock.now() < 5_000 + BUSY_TICKS + 8 * FAST_POLL_TICKS:
        clock.advance_to(hub._timer.deadline)
        gaps.append((clock.now(), hub._timer.deadline - clock.now()))
    assert all(g == FAST_POLL_TICKS for t, g in gaps if t < 5_000 + BUSY_TICKS)
    assert [g for t, g in gaps if t >= 5_000 + BUSY_TICKS][:3] == [2 * FAST_POLL_TICKS, 4 * FAST_POLL_TICKS,
                                                                   8 * FAST_POLL_TICKS]


def test_periodic_polls_back_off_while_nothing_comes_and_speed_up_when_frames_do():
    clock, hub, port, wire, nic, _ = rig(RecordingBoundary(lambda e: None))
    deadlines = []
    for _ in range(6):
        clock.advance_to(hub._timer.deadline)
        deadlines.append(hub._timer.deadline - clock.now())
    assert deadlines == [2 * FAST_POLL_TICKS, 4 * FAST_POLL_TICKS, 8 * FAST_POLL_TICKS,
                         SLOW_POLL_TICKS, SLOW_POLL_TICKS, SLOW_POLL_TICKS]
    assert wire.polls == 6                   # the periodic poll asks the backend first
    port.deliver(FRAME)                      # from the host, between polls
    clock.advance_to(hub._timer.deadline)
    assert nic.got == [(clock.now(), FRAME)]
    assert hub._timer.deadline - clock.now() == FAST_POLL_TICKS


def test_a_refilled_receiver_is_polled_soon_only_when_the_last_poll_left_it_without_buffers():
    clock, hub, port, wire, nic, rx_ready = rig(RecordingBoundary(lambda e: None), room=1)
    port.deliver(FRAME)
    port.deliver(FRAME)
    clock.advance_to(hub._timer.deadline)    # takes one frame: the NIC has no buffer left
    assert len(nic.got) == 1 and hub._starved
    for _ in range(3):
        clock.advance_to(hub._timer.deadline)   # the second frame waits: nothing taken
    assert len(nic.got) == 1
    nic.room = 4
    rx_ready()                               # the guest refilled the ring
    assert hub._timer.deadline == clock.now() + FAST_POLL_TICKS
    clock.advance_to(hub._timer.deadline)
    assert len(nic.got) == 2 and not hub._starved
    later = hub._timer.deadline
    rx_ready()                               # room was there: no early poll
    assert hub._timer.deadline == later


def test_the_same_frames_go_in_at_the_same_times_in_a_replay():
    def drive(clock, port, live):
        for t in (30_000, 31_000, 260_000, 900_000):
            clock.advance_to(t)
            port.send(FRAME)
            if live and t == 260_000:
                port.deliver(b"\x03" + FRAME[1:])     # from the host, taken at a periodic poll
        clock.advance_to(3_000_000)

    events = []
    clock, hub, port, _, nic, _ = rig(RecordingBoundary(events.append), answer=True)
    drive(clock, port, True)
    pos = [0]
    rb = ReplayBoundary(lambda: events[pos[0]] if pos[0] < len(events) else None,
                        lambda: (pos.__setitem__(0, pos[0] + 1), events[pos[0] - 1])[1])
    clock2, hub2, port2, wire2, nic2, _ = rig(rb)    # no answers: every frame comes from the log
    drive(clock2, port2, False)
    assert pos[0] == len(events) == 5
    assert nic2.got == nic.got and hub2.save_state() == hub.save_state()
    assert wire2.polls == 0                  # a replay never polls a backend


def test_state_round_trip_and_the_previous_version():
    clock, hub, port, wire, nic, _ = rig(RecordingBoundary(lambda e: None), answer=True)
    clock.advance_to(100)
    port.send(FRAME)                         # a poll due at 100, not fired yet
    st = hub.save_state()
    assert st["version"] == 2 and st["tx_poll_at"] == 100 and st["fast_until"] is None
    clock2, hub2, port2, _, nic2, _ = rig(RecordingBoundary(lambda e: None))
    hub2.load_state(st)
    assert hub2.save_state() == st
    v1 = {"kind": "net_input", "version": 1, "poll_at": 500, "last_activity": None, "next": 0}
    hub2.load_state(v1)
    st2 = hub2.save_state()
    assert st2["poll_at"] == 500 and st2["tx_poll_at"] is None and st2["starved"] is True
    for bad in ({"interval": 5}, {"interval": SLOW_POLL_TICKS * 2}, {"starved": 1}, {"tx_poll_at": -1},
                {"fast_until": "soon"}):
        with pytest.raises(DeviceStateError):
            hub2.load_state(dict(st, **bad))
