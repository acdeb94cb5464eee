"""Several machines of one process recorded together, each into its own log.

Machines that talk to each other in one process (NICs on one in-process
switch, host/net/switch.py) run in turns: each runs ``slice_ticks`` of its
own virtual time, then the next, so their clocks stay within a slice of each
other and a frame one sends reaches the other's host-side queue before the
other's clock has gone far.  Every frame that enters a machine still crosses
that machine's boundary and is written to its log (devices/net/port.py), so
each log replays on its own, with no switch and no other machine: a group
is replayed by replaying each member's log (``replay.session.Replayer``).

A turn ends on a host stop requested by a timer of the member's clock; a
host stop changes nothing the guest sees (as ``--save-at`` stops do), which
the replay's digests check.
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
        mb.writer.append(Event(EventKind.END, mb.m.icount, ev.encode_end(res.reason.value, res.status, res.message),
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
                    t = m.clock.schedule_in(self.slice_ticks, lambda now, m=m: m.request_host_stop(TURN), TURN)
                    res = m.run(max_instructions)
                    t.cancel()
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
