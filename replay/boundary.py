"""The recording and the replaying side of the determinism boundary
(vmm/boundary.py has the interface and the live one).

``RecordingBoundary`` answers from the host sources, as a live run does, and
writes every non-empty answer to the log, stamped with the machine's icount
and the vCPU whose turn it is.  ``ReplayBoundary`` never looks at a host
source: it answers from the log, and only at the stamp the answer was
recorded at.  Everything else in a run is the same code either way.
"""
from __future__ import annotations

from collections.abc import Callable

from replay.events import Event, EventKind
from vmm.boundary import CONSOLE, KEYBOARD, NET, RANDOM, Boundary

KIND_OF = {CONSOLE: EventKind.CONSOLE_INPUT, KEYBOARD: EventKind.KEYBOARD_INPUT,
           RANDOM: EventKind.RANDOM, NET: EventKind.NET_FRAME}
CHANNEL_OF = {k: ch for ch, k in KIND_OF.items()}
INPUT_KINDS = frozenset(KIND_OF.values())


class RecordingBoundary(Boundary):
    recording = True

    def __init__(self, sink: Callable[[Event], None]):
        super().__init__()
        self.sink = sink

    def input(self, channel: str) -> bytes:
        data = super().input(channel)
        if data:
            icount, vcpu = self.stamp()
            self.sink(Event(KIND_OF[channel], icount, data, vcpu))
        return data


class InputMismatch(Exception):
    """The log holds an input the replay never asked for at that point."""

    def __init__(self, event: Event, now: int):
        super().__init__(f"{event.kind.name} recorded at icount {event.icount} was never asked for "
                         f"(the replay is at {now})")
        self.event = event


class ReplayBoundary(Boundary):
    """Answers from a replay's event cursor: ``peek()`` the next event, ``take()`` it."""

    replaying = True

    def __init__(self, peek: Callable[[], Event | None], take: Callable[[], Event]):
        super().__init__()
        self._peek = peek
        self._take = take

    def input(self, channel: str) -> bytes:
        e = self._peek()
        if e is None or e.kind not in INPUT_KINDS:
            return b""
        now, _vcpu = self.stamp()
        if e.icount < now:
            raise InputMismatch(e, now)
        if e.icount == now and e.kind is KIND_OF[channel]:
            self.inputs += 1
            return self._take().payload
        return b""
