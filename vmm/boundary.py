"""The determinism boundary: the one object through which every input from
outside a machine enters it.

A machine's run is a function of its configuration, its images and what
crosses this boundary: console bytes, keyboard scancodes, network frames,
randomness, and (in the header of a recording) the wall-clock time at power
on.  Devices and the platform never read a host source themselves; they ask
the machine's ``Boundary`` for what arrived on a *channel*, at a moment that
is itself a function of virtual time (a timer), and the boundary answers.

Three implementations share this interface, and everything else follows one
code path whichever is in use:

* ``Boundary`` (here): a live run.  Each channel has a host source attached
  (the terminal, a file, a socket); its bytes go straight in.
* ``RecordingBoundary`` (replay/boundary.py): as live, and every non-empty
  answer is written to the event log, stamped with the machine's icount and
  the vCPU that was running.
* ``ReplayBoundary`` (replay/boundary.py): host sources are ignored; the
  answer is whatever the log holds for this channel at this stamp.

Channels are names; the event kinds that carry them are fixed by the log
format (replay/events.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

CONSOLE = "console"     # bytes typed at the console (to COM1 or the keyboard, as the platform routes them)
KEYBOARD = "keyboard"   # raw scancodes
RANDOM = "random"       # host randomness a device hands to the guest
NET = "net"             # frames from outside the machine, one per answer
CHANNELS = (CONSOLE, KEYBOARD, RANDOM, NET)


class Boundary:
    """A live run's boundary: inputs come from the host sources attached to it."""

    recording = False
    replaying = False

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], bytes]] = {}
        self.machine: Any = None
        self.inputs = 0            # non-empty answers given

    def bind(self, machine: Any) -> None:
        self.machine = machine

    def attach(self, channel: str, source: Callable[[], bytes] | None) -> None:
        """Where a channel's bytes come from on the host (None detaches)."""
        if channel not in CHANNELS:
            raise ValueError(f"unknown input channel {channel!r}")
        if source is None:
            self.sources.pop(channel, None)
        else:
            self.sources[channel] = source

    def stamp(self) -> tuple[int, int]:
        """(machine icount, id of the vCPU whose turn it is): where an input enters."""
        m = self.machine
        return m.icount, m.current.id

    def input(self, channel: str) -> bytes:
        """What arrived on ``channel`` since it was last asked (b"" if nothing)."""
        src = self.sources.get(channel)
        if src is None:
            return b""
        data = src()
        if data:
            self.inputs += 1
        return bytes(data)

    def close(self) -> None:
        """The run is over (a recording flushes its log here)."""
