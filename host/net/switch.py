"""A virtual Ethernet switch: learning, flooding, bounded, in one process.

The switch forwards frames between its ports as an IEEE 802.1D transparent
bridge does (without spanning tree, VLANs or ageing by time):

* Learning: a frame's source address, when it is an individual (unicast)
  address, is recorded as reachable through the port it came in on; a
  station that moves is re-learned at its new port.  The table is bounded
  (``max_macs``): learning a new address when it is full forgets the one
  learned or refreshed longest ago, and counts it in ``evictions``.  Nothing
  ages by time, since the switch has no clock of its own.
* Forwarding: a frame for a learned individual address goes out of that
  port only (and is filtered, counted in ``filtered``, if that is the port
  it came in on); a frame for a group address (broadcast or multicast) or an
  unknown one is flooded out of every other port.
* Frames shorter than an Ethernet header or longer than MAX_FRAME are
  dropped and counted in ``runts``/``giants``.

Ports.  ``port(name)`` makes a port whose *endpoint side* is a wire for a
NIC (devices/net/port.py's ``NicPort`` connects to it): ``send`` puts a
frame into the switch, ``connect`` names who receives what the switch sends
out of it.  ``plug(wire)`` connects an existing wire (a stream link, a TAP
device) to a new port, so frames that arrive on the wire enter the switch
and frames the switch sends out go into the wire.  ``poll()`` asks every
plugged wire for frames waiting in the host; a NIC's port calls it on its
machine's schedule (``SwitchPort.poll``).

Each port counts frames and bytes in and out, and may have a ``capture``
(``capture(frame, ns)``, e.g. a pcap writer) that sees both directions; its
time stamps come from ``clock()`` given to the switch (a machine's virtual
time in ns), or 0 when there is none.

A frame is delivered to the receiving ports synchronously, one after
another, in port creation order; a receiver that re-enters the switch (a
wire whose receiver sends at once) is handled by queueing: frames entering
while the switch is forwarding are forwarded after the current one.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from devices.net import ETH_HEADER, MAX_FRAME

DEFAULT_MAX_MACS = 1024
MAX_PENDING = 4096


class SwitchPort:
    """One port of a ``Switch``; its endpoint side is a wire (``send``/``connect``/``poll``)."""

    def __init__(self, switch: Switch, name: str) -> None:
        self.switch = switch
        self.name = name
        self.receiver: Any = None
        self.capture: Callable[[bytes, int], None] | None = None
        self.frames_in = self.frames_out = 0
        self.bytes_in = self.bytes_out = 0

    # endpoint side (a NIC's wire)
    def send(self, frame: bytes) -> None:
        """A frame from the endpoint into the switch."""
        self.switch.forward(self, bytes(frame))

    def connect(self, receiver: Any) -> None:
        """``receiver.deliver(frame)`` gets what the switch sends out of this port."""
        self.receiver = receiver

    def poll(self) -> None:
        self.switch.poll()

    # switch side
    def _out(self, frame: bytes) -> None:
        self.frames_out += 1
        self.bytes_out += len(frame)
        if self.capture is not None:
            self.capture(frame, self.switch.now_ns())
        if self.receiver is not None:
            self.receiver.deliver(frame)

    def __repr__(self) -> str:
        return f"SwitchPort({self.switch.name}:{self.name})"


class _Uplink:
    """The receiver a plugged wire delivers to: frames from the wire enter the switch at ``port``."""

    def __init__(self, port: SwitchPort) -> None:
        self.port = port

    def deliver(self, frame: bytes) -> None:
        self.port.send(frame)


class _WireOut:
    """What a plugged port's switch side delivers to: the wire's ``send``."""

    def __init__(self, wire: Any) -> None:
        self.wire = wire
        self.errors = 0

    def deliver(self, frame: bytes) -> None:
        try:
            self.wire.send(frame)
        except OSError:
            self.errors += 1


class Switch:
    """A learning switch (module doc).  ``clock()``, if given, returns the time stamp for captures in ns."""

    def __init__(self, name: str = "switch", max_macs: int = DEFAULT_MAX_MACS,
                 clock: Callable[[], int] | None = None) -> None:
        if max_macs < 1:
            raise ValueError("a switch must be able to learn at least one address")
        self.name = name
        self.max_macs = max_macs
        self.clock = clock
        self.ports: list[SwitchPort] = []
        self.table: OrderedDict[bytes, SwitchPort] = OrderedDict()
        self.plugged: list[Any] = []
        self.forwarded = self.flooded = self.filtered = 0
        self.runts = self.giants = self.evictions = self.overflows = 0
        self._pending: deque[tuple[SwitchPort, bytes]] = deque()
        self._busy = False
        self._polling = False

    def now_ns(self) -> int:
        return self.clock() if self.clock is not None else 0

    def port(self, name: str | None = None) -> SwitchPort:
        """A new port (its endpoint side is a wire for a NIC)."""
        name = name or f"port{len(self.ports)}"
        if any(p.name == name for p in self.ports):
            raise ValueError(f"switch {self.name} already has a port {name!r}")
        p = SwitchPort(self, name)
        self.ports.append(p)
        return p

    def plug(self, wire: Any, name: str | None = None) -> SwitchPort:
        """Connect ``wire`` (a stream link, a TAP device) to a new port and return the port."""
        p = self.port(name)
        p.connect(_WireOut(wire))
        wire.connect(_Uplink(p))
        if callable(getattr(wire, "poll", None)):
            self.plugged.append(wire)
        return p

    def poll(self) -> None:
        """Pull frames that wait in the host on every plugged wire."""
        if self._polling:
            return
        self._polling = True
        try:
            for w in list(self.plugged):
                w.poll()
        finally:
            self._polling = False

    def lookup(self, mac: bytes) -> SwitchPort | None:
        return self.table.get(bytes(mac))

    def forward(self, ingress: SwitchPort, frame: bytes) -> None:
        """A frame entering at ``ingress``: learn its source, send it on."""
        if self._busy:
            if len(self._pending) >= MAX_PENDING:
                self.overflows += 1
                return
            self._pending.append((ingress, frame))
            return
        self._busy = True
        try:
            self._forward_one(ingress, frame)
            while self._pending:
                self._forward_one(*self._pending.popleft())
        finally:
            self._busy = False

    def _forward_one(self, ingress: SwitchPort, frame: bytes) -> None:
        if len(frame) < ETH_HEADER:
            self.runts += 1
            return
        if len(frame) > MAX_FRAME:
            self.giants += 1
            return
        ingress.frames_in += 1
        ingress.bytes_in += len(frame)
        if ingress.capture is not None:
            ingress.capture(frame, self.now_ns())
        dst, src = frame[:6], frame[6:12]
        if not src[0] & 1:
            self._learn(src, ingress)
        if not dst[0] & 1:
            out = self.table.get(dst)
            if out is not None:
                if out is ingress:
                    self.filtered += 1
                else:
                    self.forwarded += 1
                    out._out(frame)
                return
        self.flooded += 1
        for p in self.ports:
            if p is not ingress:
                p._out(frame)

    def _learn(self, mac: bytes, port: SwitchPort) -> None:
        table = self.table
        if mac in table:
            table[mac] = port
            table.move_to_end(mac)
            return
        if len(table) >= self.max_macs:
            table.popitem(last=False)
            self.evictions += 1
        table[mac] = port
