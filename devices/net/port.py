"""Frames into a machine through its determinism boundary, and NICs onto a machine.

Everything that enters a machine from outside it crosses the machine's
``Boundary`` (vmm/boundary.py), so that a recording holds it and a replay
needs no network.  For network frames that means:

* A NIC's wire never hands frames to the NIC.  It hands them to the NIC's
  ``NicPort``, which keeps them in a bounded host-side queue (outside the
  boundary: what waits there is not machine state, and a frame the queue
  cannot take is dropped and counted in ``host_drops``).
* One ``NetInput`` per machine asks the boundary for frames on the ``net``
  channel on a virtual-time timer (``net-input``), as the platform polls the
  console.  Live and recording, the boundary's source for that channel is
  the ``NetInput`` itself: it answers with the next waiting frame of a NIC
  that can take one now (link up, receiver enabled, a free descriptor), so a
  guest that is slow to refill its ring slows its senders down instead of
  losing frames, as QEMU's queued packets do.  Replaying, the boundary
  answers from the log and no host queue is looked at.  Either way the frame
  then reaches the NIC's ``deliver`` at the same virtual time.
* One boundary answer is one frame for one NIC.  Its payload (the log's
  NET_FRAME event, replay/events.py) is::

      u16 little-endian length N, N bytes of UTF-8 NIC id,
      u64 little-endian virtual time (clock ticks) of the poll, the frame

  so that all NICs of a machine share the one ``net`` channel and a replay
  hands each recorded frame to the NIC it was recorded for, in the recorded
  order, whatever the NICs' timers do.  ``encode_net_frame`` and
  ``decode_net_frame`` are the one definition of that layout.
* The time is there because a log stamps inputs with the instruction count,
  and a halted guest retires no instructions: polls at two virtual times can
  share one count.  Replaying, a poll takes the log's next frame only when
  its recorded time has come (it looks before it takes), so a frame that
  reached an idle guest late in its sleep is not handed over at the sleep's
  first poll.

When to ask (all of it a function of virtual time and of what crossed the
boundary, never of host state, so a replay asks at the same moments):

* right after a NIC transmits: a poll due at the transmitting instruction
  (``net-input.tx``), so the vCPU stops just after it (where the notify's
  interrupt stops it anyway) and an answer the backend gave at once (libslirp
  acknowledges a TCP segment inside ``send``) goes in there, with no stop of
  its own.  This poll takes what waits and does not poll the backends; when
  it finds nothing (the answer, if any, comes from the host later: another
  machine, a socket) the next periodic poll is brought forward to
  FAST_POLL_TICKS and the periodic poll keeps that interval for BUSY_TICKS;
* periodically (``net-input``), polling the backends first: FAST_POLL_TICKS
  (100 us of virtual time) after a poll that took a frame, then twice as long
  after each poll that took none, up to SLOW_POLL_TICKS (1 ms);
* FAST_POLL_TICKS after a NIC's receiver got room (the guest refilled its
  ring) while the network is busy (a frame went in or out in the last
  BUSY_TICKS) and the last poll that handed over frames left a NIC with no
  receive buffer at all (``can_receive(0)`` false).

A poll takes at most MAX_FRAMES_PER_POLL frames.

Outputs: each NIC's transmitted frames feed an output digest (``FrameStream``,
named ``net:<nic id>``, registered in the machine's ``outputs`` so that
recordings prove a replay sent the same frames) and, when asked, a capture
(``capture(frame, ns)``, e.g. host/net/pcap.py's writer) that sees both
directions stamped with virtual time.
"""
from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from typing import Any

from devices.base import DeviceStateError, State, check_state
from devices.net import MAX_FRAME, parse_mac

NET_CHANNEL = "net"                  # vmm.boundary.NET (devices do not import vmm)
FAST_POLL_TICKS = 10_000             # 100 us
SLOW_POLL_TICKS = 100_000            # 1 ms
BUSY_TICKS = 1_000_000               # 10 ms
MAX_FRAMES_PER_POLL = 256
HOST_QUEUE_FRAMES = 1024             # per NIC, outside the boundary
HOST_QUEUE_BYTES = 4 << 20
NIC_ID_MAX = 64


def encode_net_frame(nic_id: str, frame: bytes, tick: int = 0) -> bytes:
    """The payload of one frame for one NIC, taken in at virtual time ``tick`` (module doc)."""
    name = nic_id.encode()
    if len(name) > NIC_ID_MAX:
        raise ValueError(f"NIC id {nic_id!r} is longer than {NIC_ID_MAX} bytes")
    return len(name).to_bytes(2, "little") + name + int(tick).to_bytes(8, "little") + bytes(frame)


def decode_net_frame(payload: bytes) -> tuple[str, int, bytes]:
    """(NIC id, tick, frame) of a payload; ValueError for anything that is not one."""
    if len(payload) < 2:
        raise ValueError("a network frame payload needs its 2-byte id length")
    n = int.from_bytes(payload[:2], "little")
    if n > NIC_ID_MAX or len(payload) < 2 + n + 8:
        raise ValueError(f"a network frame payload names a NIC id of {n} bytes and a time in {len(payload)}")
    try:
        nic_id = payload[2:2 + n].decode()
    except UnicodeDecodeError:
        raise ValueError("a network frame payload's NIC id is not UTF-8") from None
    tick = int.from_bytes(payload[2 + n:10 + n], "little")
    frame = payload[10 + n:]
    if len(frame) > MAX_FRAME:
        raise ValueError(f"a network frame of {len(frame)} bytes is longer than {MAX_FRAME}")
    return nic_id, tick, bytes(frame)


class FrameStream:
    """An output digest of frames: their count and a chained SHA-256.

    The digest after frame k is SHA-256(digest after frame k-1 || u32 big-endian
    length || frame), starting from 32 zero bytes; ``count`` is the bytes of
    all frames plus 4 per frame (the stream socket's framing).  Unlike a byte
    stream's digest, this keeps frame boundaries and its state is 32 bytes,
    not every frame ever sent.  Same interface as vmm.digest.OutputStream.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0
        self.frames = 0
        self._chain = bytes(32)

    def append(self, frame: bytes) -> None:
        header = len(frame).to_bytes(4, "big")
        self._chain = hashlib.sha256(self._chain + header + frame).digest()
        self.count += 4 + len(frame)
        self.frames += 1

    def digest(self) -> str:
        return self._chain.hex()

    def save_state(self) -> dict:
        return {"kind": "frame-stream", "version": 1, "name": self.name, "count": self.count,
                "frames": self.frames, "chain": self._chain}

    def load_state(self, st: dict) -> None:
        try:
            count, frames, chain = st["count"], st["frames"], st["chain"]
        except (KeyError, TypeError):
            raise ValueError("frame stream state needs count, frames and chain") from None
        if st.get("kind") != "frame-stream" or st.get("version") != 1:
            raise ValueError("not a frame stream state of version 1")
        if not (isinstance(chain, bytes) and len(chain) == 32 and isinstance(count, int) and isinstance(frames, int)
                and 0 <= frames and 4 * frames <= count):
            raise ValueError("malformed frame stream state")
        self.count, self.frames, self._chain = count, frames, chain


class NicPort:
    """A NIC's connection to its wire: the wire delivers here, the NIC sends here.

    ``wire`` is any object with ``send(frame)`` (and, optionally,
    ``connect(receiver)`` and ``poll()``); ``nic`` is the device (``deliver``,
    ``can_receive``), set once it is built.
    """

    def __init__(self, hub: NetInput, nic_id: str, wire: Any, capture: Callable[[bytes, int], None] | None = None,
                 max_frames: int = HOST_QUEUE_FRAMES, max_bytes: int = HOST_QUEUE_BYTES) -> None:
        self.hub = hub
        self.nic_id = nic_id
        self.wire = wire
        self.nic: Any = None
        self.capture = capture
        self.output = FrameStream(f"net:{nic_id}")
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.queue: deque[bytes] = deque()
        self.queued_bytes = 0
        self.host_drops = 0            # frames the host queue could not take (outside the boundary)
        self.host_errors = 0           # sends the wire refused with an OSError
        self.sent = 0
        self.received = 0
        if wire is not None and callable(getattr(wire, "connect", None)):
            wire.connect(self)

    # -- host side: the wire's receiver ------------------------------------------------------
    def deliver(self, frame: bytes) -> None:
        """A frame from the wire; it waits here until the machine asks for it."""
        frame = bytes(frame)
        if len(frame) > MAX_FRAME or len(self.queue) >= self.max_frames \
                or self.queued_bytes + len(frame) > self.max_bytes:
            self.host_drops += 1
            return
        self.queue.append(frame)
        self.queued_bytes += len(frame)

    def take(self) -> bytes | None:
        if not self.queue:
            return None
        frame = self.queue.popleft()
        self.queued_bytes -= len(frame)
        return frame

    # -- machine side ---------------------------------------------------------------------------
    def send(self, frame: bytes) -> None:
        """A frame the NIC transmits (called during the guest's register write)."""
        frame = bytes(frame)
        self.sent += 1
        self.output.append(frame)
        if self.capture is not None:
            self.capture(frame, self.hub.clock.ns())
        self.hub.transmitted()
        if self.wire is not None:
            try:
                self.wire.send(frame)
            except OSError:
                self.host_errors += 1      # a host-side failure is the host's, not the guest's

    def received_frame(self, frame: bytes) -> None:
        """A frame that crossed the boundary for this NIC: into the device."""
        self.received += 1
        if self.capture is not None:
            self.capture(frame, self.hub.clock.ns())
        if self.nic is not None:
            self.nic.deliver(frame)


class NetInput:
    """The receive side of one machine's NICs at its boundary (see the module doc).

    ``boundary`` returns the machine's current boundary (it changes when a
    recording or a replay takes over).
    """

    kind = "net_input"
    VERSION = 2

    def __init__(self, clock: Any, boundary: Callable[[], Any], name: str = "net-input") -> None:
        self.name = name
        self.clock = clock
        self._boundary = boundary
        self.ports: dict[str, NicPort] = {}
        self._order: list[str] = []
        self._next = 0
        self.last_activity: int | None = None
        self.polls = 0
        self.tx_polls = 0
        self.unknown = 0                # logged frames for no NIC of this machine (a damaged log)
        self.idle_hook: Callable[[], None] | None = None   # host-side, called by a poll that got nothing
        self.poll_hook: Callable[[], None] | None = None   # host-side, called at the end of every poll
        self._timer = None
        self._tx_timer = None
        self._interval = FAST_POLL_TICKS  # the periodic poll's next interval
        self._starved = False           # the last poll that handed over frames left a NIC without buffers
        self._fast_until: int | None = None  # a transmit went unanswered: poll fast until then

    def add_port(self, nic_id: str, wire: Any, capture: Callable[[bytes, int], None] | None = None) -> NicPort:
        if nic_id in self.ports:
            raise ValueError(f"two NICs named {nic_id!r} on one machine")
        encode_net_frame(nic_id, b"")      # the id must fit the payload layout
        port = NicPort(self, nic_id, wire, capture)
        self.ports[nic_id] = port
        self._order = sorted(self.ports)
        if self._timer is None:
            self._arm(SLOW_POLL_TICKS)
        return port

    # -- the live source of the net channel ----------------------------------------------------
    def poll_wires(self) -> None:
        """Let every backend move what waits on its host side (host-side only: never replaying)."""
        for port in self.ports.values():
            poll = getattr(port.wire, "poll", None)
            if callable(poll):
                try:
                    poll()
                except OSError:
                    port.host_errors += 1

    def source(self) -> bytes:
        """The next frame for a NIC that can take it now, as a boundary payload (b"" if none).
        The backends are not polled here: a poll does that once before it asks."""
        n = len(self._order)
        for k in range(n):
            port = self.ports[self._order[(self._next + k) % n]]
            if not port.queue or port.nic is None or not port.nic.can_receive(len(port.queue[0])):
                continue
            frame = port.take()
            self._next = (self._next + k + 1) % n
            return encode_net_frame(port.nic_id, frame, self.clock.now())
        return b""

    # -- polling on virtual time ------------------------------------------------------------------
    def _busy(self, now: int) -> bool:
        return self.last_activity is not None and now - self.last_activity < BUSY_TICKS

    def _arm(self, delta: int) -> None:
        self._timer = self.clock.schedule_in(delta, self.poll, self.name)

    def transmitted(self) -> None:
        """A NIC sent a frame: take its answer right after the transmitting instruction."""
        now = self.clock.now()
        self.last_activity = now
        t = self._tx_timer
        if t is None or not t.active:
            self._tx_timer = self.clock.schedule(now, self._tx_poll, self.name + ".tx")

    def rx_ready(self) -> None:
        """A NIC's receiver got room (the guest refilled it): frames may be waiting, so poll soon
        if the last poll that handed over frames left a NIC without buffers."""
        if self._starved and self._busy(self.clock.now()):
            self._poll_soon()

    def _poll_soon(self) -> None:
        now = self.clock.now()
        self._interval = FAST_POLL_TICKS
        t = self._timer
        if t is not None and t.active and t.deadline > now + FAST_POLL_TICKS:
            t.cancel()
            self._arm(FAST_POLL_TICKS)

    def _tx_poll(self, now: int) -> None:
        self._tx_timer = None
        self.tx_polls += 1
        if not self._take(now):
            self._fast_until = now + BUSY_TICKS
            self._poll_soon()             # no answer yet: it may come from the host soon
        if self.poll_hook is not None:
            self.poll_hook()

    def poll(self, now: int) -> None:
        self._timer = None
        self.polls += 1
        boundary = self._boundary()
        if not getattr(boundary, "replaying", False):
            self.poll_wires()
        got = self._take(now)
        if got == 0 and self.idle_hook is not None:
            self.idle_hook()
        fast = got or (self._fast_until is not None and now < self._fast_until)
        self._interval = FAST_POLL_TICKS if fast else min(2 * self._interval, SLOW_POLL_TICKS)
        self._arm(self._interval)
        if self.poll_hook is not None:
            self.poll_hook()

    def _take(self, now: int) -> int:
        """Hand the NICs what the boundary answers, up to MAX_FRAMES_PER_POLL; how many answers."""
        boundary = self._boundary()
        got = 0
        for _ in range(MAX_FRAMES_PER_POLL):
            if getattr(boundary, "replaying", False) and not self._due(boundary):
                break
            payload = boundary.input(NET_CHANNEL)
            if not payload:
                break
            got += 1
            try:
                nic_id, _tick, frame = decode_net_frame(payload)
            except ValueError:
                self.unknown += 1
                continue
            port = self.ports.get(nic_id)
            if port is None:
                self.unknown += 1
                continue
            self.last_activity = now
            port.received_frame(frame)
        if got:
            self._starved = any(p.nic is not None and not p.nic.can_receive(0) for p in self.ports.values())
        return got

    def _due(self, boundary: Any) -> bool:
        """Replaying: is the log's next input, if it is a frame, one taken in at this time or
        before?  (A frame for a later time waits for a later poll at the same icount.)"""
        peek = getattr(boundary, "_peek", None)
        e = peek() if callable(peek) else None
        if e is None or getattr(e.kind, "name", "") != "NET_FRAME":
            return True
        try:
            _, tick, _ = decode_net_frame(e.payload)
        except ValueError:
            return True
        return tick <= self.clock.now()

    # -- state ---------------------------------------------------------------------------------------
    def save_state(self) -> State:
        t, tx = self._timer, self._tx_timer
        return {"kind": self.kind, "version": self.VERSION,
                "poll_at": t.deadline if t is not None and t.active else None,
                "tx_poll_at": tx.deadline if tx is not None and tx.active else None,
                "interval": self._interval, "starved": self._starved, "fast_until": self._fast_until,
                "last_activity": self.last_activity, "next": self._next}

    def load_state(self, state: State) -> None:
        if isinstance(state, dict) and state.get("kind") == self.kind and state.get("version") == 1:
            # before the poll after a transmit and the backing-off interval
            state = dict(state, version=self.VERSION, tx_poll_at=None, interval=FAST_POLL_TICKS, starved=True)
        check_state(state, self.kind, self.VERSION)

        def tick_or_none(key: str) -> int | None:
            if key not in state:
                raise DeviceStateError(f"{self.kind}: the state has no {key!r}")
            v = state[key]
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 63):
                raise DeviceStateError(f"{self.kind}: {key} must be a tick or None")
            return v
        poll_at = tick_or_none("poll_at")
        tx_poll_at = tick_or_none("tx_poll_at")
        last = tick_or_none("last_activity")
        fast_until = tick_or_none("fast_until") if "fast_until" in state else None
        nxt = state.get("next")
        if not isinstance(nxt, int) or isinstance(nxt, bool) or nxt < 0:
            raise DeviceStateError(f"{self.kind}: next must be a port index")
        interval = state.get("interval")
        if not isinstance(interval, int) or isinstance(interval, bool) \
                or not FAST_POLL_TICKS <= interval <= SLOW_POLL_TICKS:
            raise DeviceStateError(f"{self.kind}: interval must be {FAST_POLL_TICKS}..{SLOW_POLL_TICKS} ticks")
        starved = state.get("starved")
        if not isinstance(starved, bool):
            raise DeviceStateError(f"{self.kind}: starved must be a bool")
        for t in (self._timer, self._tx_timer):
            if t is not None:
                t.cancel()
        self._timer = self._tx_timer = None
        self.last_activity = last
        self._next = nxt % max(1, len(self._order))
        self._interval = interval
        self._starved = starved
        self._fast_until = fast_until
        if poll_at is not None:
            self._timer = self.clock.schedule(poll_at, self.poll, self.name)
        if tx_poll_at is not None:
            self._tx_timer = self.clock.schedule(tx_poll_at, self._tx_poll, self.name + ".tx")

    def reset(self) -> None:
        """Nothing of the guest's lives here; polling goes on."""


def nic_port(machine: Any, nic_id: str, wire: Any,
             capture: Callable[[bytes, int], None] | None = None) -> NicPort:
    """A new NIC's port on ``machine``: its ``NetInput`` (made, registered and attached to
    the boundary's net channel for the first NIC), and the port's output digest registered
    in the machine's ``outputs``.  The caller sets ``port.nic`` once the device exists."""
    hub = getattr(machine, "net_input", None)
    if hub is None:
        hub = NetInput(machine.clock, lambda: machine.boundary)
        machine.net_input = hub
        machine.add_device(hub, io=False)
        machine.boundary.attach(NET_CHANNEL, hub.source)
    port = hub.add_port(nic_id, wire, capture)
    outputs = getattr(machine, "outputs", None)
    if isinstance(outputs, dict):
        outputs[port.output.name] = port.output
    return port


def attach_e1000(machine: Any, wire: Any, mac: bytes | str, slot: int, *, name: str | None = None,
                 capture: Callable[[bytes, int], None] | None = None) -> Any:
    """An 82540EM at PCI ``slot`` of ``machine`` (a pc-2 PcMachine), on ``wire``; returns the NIC.

    The NIC's id (its device name, its timers' prefix, the id in logged frames
    and the name of its output digest) is ``name`` or ``e1000.<slot>``; it must
    be stable, since recordings name it.  ``capture(frame, ns)`` sees every
    frame the NIC sends or receives, stamped with virtual time in ns.
    """
    from devices.net.e1000 import E1000

    pci = getattr(machine, "pci", None)
    if pci is None:
        raise ValueError("this machine has no PCI bus (the e1000 needs the pc-2 board)")
    nic_id = name or f"e1000.{slot}"
    mac = parse_mac(mac)
    port = nic_port(machine, nic_id, wire, capture)
    nic = E1000(machine.clock, machine.dma, port, mac, io_bus=machine.io, mmio_bus=machine.mmio,
                name=nic_id)
    port.nic = nic
    nic.on_rx_ready = port.hub.rx_ready
    machine.add_device(nic, io=False)
    pci.attach(nic, slot)
    return nic
