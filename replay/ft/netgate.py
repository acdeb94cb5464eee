"""The output rule for network frames: a primary's NIC sends a frame to its
wire only once the backup holds the log up to the instruction that produced
it, as the console's output waits (replay/ft/console.py).

A ``HeldWire`` stands between a NIC's port (devices/net/port.py) and its
backend.  The port's ``send`` hands it each frame the guest transmits; it
keeps the frame with the virtual time it was produced at.  The ACK of a
horizon moves the release point (from the link's thread: one number), and the
frames stamped before it go to the backend on the run loop's thread, at the
port's next poll (``poll``, which the machine's ``NetInput`` calls on virtual
time) or at the next horizon (``flush``): the backends are polled on that
thread, and none of them is written from two threads.

Running alone, frames pass at once; a side that lost the arbiter drops what
it held (its backup went live and produces them).  What waits here is not
machine state: the guest saw its frame sent when it wrote the register.

A backup's replica keeps the frames its NICs produce (``Retained``) from the
point the primary last said it had sent everything before (the second number
of a HORIZON).  Going live, it connects its own backends (`vmm ft backup
--nic`) and sends those again: a frame the primary sent in between, after
its last HORIZON, reaches the peer twice.  Across a failover a frame is
never lost but may be repeated, as on Ethernet (VMware FT's network output
likewise); the console's positions make its output exactly-once.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

MAX_HELD_FRAMES = 1 << 16    # frames held for one NIC at most (--max-lag bounds them long before)


class HeldWire:
    def __init__(self, wire: Any, stamp: Callable[[], int]):
        self.wire = wire
        self.stamp = stamp
        self.held: deque[tuple[int, bytes]] = deque()
        self.release_point = 0       # frames stamped before this virtual time may go
        self.passing = False         # alone: no rule
        self.dropped = False         # fenced: nothing goes any more
        self.flushed_through = 0     # every frame stamped before this went to the backend
        self.frames_held = 0         # frames that waited for an acknowledgement
        self.overflow = 0            # frames over MAX_HELD_FRAMES (dropped, as a full queue drops)
        self._lock = threading.Lock()

    # -- the port's side (the run loop's thread) --------------------------------------
    def send(self, frame: bytes) -> None:
        if self.dropped:
            return
        if self.passing and not self.held:
            self.wire.send(frame)
            return
        if len(self.held) >= MAX_HELD_FRAMES:
            self.overflow += 1
            return
        self.held.append((self.stamp(), bytes(frame)))
        self.frames_held += 1

    def poll(self) -> None:
        self.flush()
        poll = getattr(self.wire, "poll", None)
        if callable(poll):
            poll()

    def flush(self) -> None:
        """Send the frames the output rule lets go now, in the order they were produced."""
        with self._lock:
            point, passing, dropped = self.release_point, self.passing, self.dropped
        if dropped:
            self.held.clear()
            return
        while self.held and (passing or self.held[0][0] < point):
            _, frame = self.held.popleft()
            try:
                self.wire.send(frame)
            except OSError:
                pass      # a host-side failure, as the port counts it for a wire of its own
        self.flushed_through = max(self.flushed_through, point)

    # -- the output rule's side (any thread) -------------------------------------------
    def release_through(self, tick: int) -> None:
        with self._lock:
            self.release_point = max(self.release_point, tick)

    def go_alone(self) -> None:
        with self._lock:
            self.passing = True

    def hold_again(self) -> None:
        """A backup joined: the rule holds again for frames from now on."""
        with self._lock:
            self.passing = False

    def drop_held(self) -> None:
        with self._lock:
            self.dropped = True


def hold_frames(machine: Any, stamp: Callable[[], int]) -> list[HeldWire]:
    """Put a HeldWire between each of ``machine``'s NIC ports and its backend (if it has one)."""
    hub = getattr(machine, "net_input", None)
    gates = []
    for port in (hub.ports.values() if hub is not None else ()):
        if port.wire is not None:
            port.wire = HeldWire(port.wire, stamp)
            gates.append(port.wire)
    return gates


class Retained:
    """The wire of a backup's NIC while it replays: keeps the frames from ``floor()`` on
    (the primary sent those before it), with the virtual time each was produced at."""

    def __init__(self, stamp: Callable[[], int], floor: Callable[[], int]):
        self.stamp = stamp
        self.floor = floor
        self.frames: deque[tuple[int, bytes]] = deque()

    def send(self, frame: bytes) -> None:
        self.frames.append((self.stamp(), bytes(frame)))
        f = self.floor()
        while self.frames and self.frames[0][0] < f:
            self.frames.popleft()
        while len(self.frames) > MAX_HELD_FRAMES:
            self.frames.popleft()

    def unsent(self) -> list[bytes]:
        """The frames the primary may not have sent, in order."""
        f = self.floor()
        return [frame for t, frame in self.frames if t >= f]
