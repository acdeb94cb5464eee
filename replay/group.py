"""Several machines of one process recorded together, each into its own log.

Machines that talk to each other in one process (NICs on one in-process
switch, host/net/switch.py) run in turns: each runs ``slice_ticks`` of its
own virtual time, then the next, so their clocks stay within a slice of each
other and a frame one sends reaches the other's host-side queue before the
other's clock has gone far.  Every frame that enters a machine still crosses
that machine's boundary and is written to its log (devices/net/port.py), so
each log replays on its own, with no switch and no other machine: a group
is replayed by replaying each member's log (``replay.session.Replayer``).

A turn ends on a host stop requested at the first poll of the member's
network input (devices/net/port.py: every 0.1 or 1 ms of virtual time) at or
after the turn's end, or, for a member without a card, at an instruction
count.  No timer of its own: a timer that exists only while recording ends
the vCPU's turns at other instructions than the replay's, and a Linux guest
recorded that way did not replay; the polls are there in the replay too.
The replay's digests check that the stops change nothing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from host.serial import NullBackend
from replay import events as ev
from replay.boundary import RecordingBoundary
from replay.events import Event, EventKind
from replay.logfile import LogWriter
from replay.session import DIGEST_TICKS, MEM_DIGEST_EVERY, _Digests, build_machine, state_digest
from vmm.digest import page_hashes
from vmm.machine import RunResult, StopReason

SLICE_TICKS = 100_000           # 1 ms of virtual time per turn
TURN = "group-turn"


@dataclass
class Member:
    name: str
    m: Any
    writer: LogWriter
    digests: _Digests
    result: RunResult | None = None
    extra: dict = field(default_factory=dict)


class GroupRecording:
    """Build members with ``add``, join their NICs to backends, then ``run``."""

    def __init__(self, slice_ticks: int = SLICE_TICKS) -> None:
        if slice_ticks < 1:
            raise ValueError("a turn must last at least one tick")
        self.slice_ticks = slice_ticks
        self.members: list[Member] = []

    def add(self, name: str, cfg: dict, image: bytes, log_path: Any, serial: Any = None) -> Any:
        """Build the machine ``cfg`` describes (its ``nics`` included) recording into ``log_path``;
        returns the machine, whose NICs are then joined to backends
        (vmm.platform.net.connect_backend)."""
        m = build_machine(cfg, image, serial or NullBackend(), drive_mode="record")
        writer = LogWriter(log_path, cfg, state_digest(m, page_hashes(m.memory.ram)))
        writer.append(Event(EventKind.DISK_IMAGE, 0, ev.encode_disk_image(cfg["image"]["name"],
                                                                          cfg["image"]["sha256"])))

        def emit(events: list[Event]) -> None:
            for e in events:
                writer.append(e)
        m.set_boundary(RecordingBoundary(writer.append))
        digests = _Digests(m, DIGEST_TICKS, MEM_DIGEST_EVERY, emit)
        emit(digests.snapshot(True))
        self.members.append(Member(name, m, writer, digests))
        return m

    def _finish(self, mb: Member, res: RunResult) -> None:
        mb.result = res
        for e in mb.digests.snapshot(True):
            mb.writer.append(e)
        end = ev.encode_end(res.reason.value, res.status, res.message, [v.icount for v in mb.m.vcpus])
        mb.writer.append(Event(EventKind.END, mb.m.icount, end,
                               res.vcpu))
        mb.writer.close()

    def run(self, max_instructions: int | None = None,
            until: Callable[[], bool] | None = None) -> dict[str, RunResult]:
        """Run every member in turns until each has stopped (or ``max_instructions`` each, or
        ``until()`` is true after a round: the rest then end as host stops).  Returns the results."""
        live = [mb for mb in self.members if mb.result is None]
        try:
            while live:
                for mb in list(live):
                    m = mb.m
                    hub = getattr(m, "net_input", None)
                    limit = max_instructions
                    if hub is not None:
                        end = m.clock.now() + self.slice_ticks
                        hub.poll_hook = lambda m=m, end=end: m.clock.now() >= end and m.request_host_stop(TURN)
                    else:
                        limit = m.icount + self.slice_ticks
                        limit = limit if max_instructions is None else min(limit, max_instructions)
                    res = m.run(limit)
                    if hub is not None:
                        hub.poll_hook = None
                    if hub is None and res.reason is StopReason.LIMIT and res.icount != max_instructions:
                        continue
                    if res.reason is not StopReason.HOST or res.message != TURN:
                        self._finish(mb, res)
                        live.remove(mb)
                if until is not None and until():
                    for mb in live:
                        self._finish(mb, RunResult(StopReason.HOST, mb.m.icount, 0, "the group stopped"))
                    live = []
        finally:
            for mb in self.members:
                if mb.result is None:
                    mb.writer.close()
        return {mb.name: mb.result for mb in self.members}
