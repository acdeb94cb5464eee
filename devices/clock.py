"""The virtual clock: guest time measured in retired instructions.

There is one clock per machine and it is the only time a guest ever sees.
One *tick* is one retired instruction at the nominal rate ``TICK_HZ``
(100 MHz: one instruction = 10 ns, and the TSC counts ticks).  While the vCPU
is halted the machine skips straight to the next deadline; the skipped ticks
are kept in ``idle`` so that ``now() == retired_instructions + idle``.

Devices schedule callbacks at absolute tick deadlines.  Timers due at the same
tick fire in the order they were scheduled, so firing order never depends on
hashing or host timing.  No host clock is read anywhere in here.

Tests drive a clock by hand: with no ``source`` it is a manual clock whose
time moves only by ``advance_to``/``advance``.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable

TICK_HZ = 100_000_000
NS_PER_TICK = 1_000_000_000 // TICK_HZ


class Timer:
    """A scheduled callback; ``cancel()`` it, or let it fire once."""

    __slots__ = ("active", "callback", "deadline", "name", "seq", "slack")

    def __init__(self, deadline: int, seq: int, callback: Callable[[int], None], name: str, slack: int = 0):
        self.deadline = deadline
        self.seq = seq
        self.callback = callback
        self.active = True
        self.name = name
        self.slack = slack

    def __lt__(self, other: Timer) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)

    def cancel(self) -> None:
        self.active = False

    def __repr__(self) -> str:
        return f"Timer({self.name!r} at {self.deadline}{'' if self.active else ', cancelled'})"


class VirtualClock:
    """Instruction-counted time with deadline timers.

    ``source`` returns the exact number of instructions retired so far (the
    vCPU supplies it, exact even in the middle of a translation block).
    ``on_new_deadline(tick)`` is told whenever a timer is scheduled, so that a
    running vCPU can shorten its budget and stop in time.
    """

    def __init__(self, source: Callable[[], int] | None = None):
        self._source = source
        self._manual = 0
        self.idle = 0
        self._heap: list[Timer] = []
        self._soft: list[Timer] = []    # the timers with slack (never in the heap)
        self._seq = 0
        self.on_new_deadline: Callable[[int], None] | None = None

    # -- time ---------------------------------------------------------------
    def now(self) -> int:
        """Current guest time in ticks."""
        if self._source is None:
            return self._manual + self.idle
        return self._source() + self.idle

    def ns(self) -> int:
        return self.now() * NS_PER_TICK

    def ticks_to_icount(self, tick: int) -> int:
        """The retired-instruction count at which guest time reaches ``tick``."""
        return tick - self.idle

    # -- timers -------------------------------------------------------------
    def schedule(self, deadline: int, callback: Callable[[int], None], name: str = "timer",
                 slack: int = 0) -> Timer:
        """Call ``callback(now)`` once guest time reaches ``deadline`` ticks.

        With ``slack`` the callback may come at any tick from ``deadline`` to
        ``deadline + slack``: at the first point between two vCPU turns at or after
        ``deadline`` (fire_soft_due, after the timers of that tick fired), the vCPU
        made to stop exactly there only at the end of the slack.  Only for callbacks
        the guest cannot see (the FT primary's log horizon): when they come depends
        on where the run loop stops."""
        self._seq += 1
        t = Timer(int(deadline), self._seq, callback, name, max(0, int(slack)))
        if t.slack:
            self._soft.append(t)          # fire_due leaves them alone
        else:
            heapq.heappush(self._heap, t)
        if self.on_new_deadline is not None:
            self.on_new_deadline(t.deadline + t.slack)
        return t

    def schedule_in(self, delta: int, callback: Callable[[int], None], name: str = "timer",
                    slack: int = 0) -> Timer:
        return self.schedule(self.now() + max(0, int(delta)), callback, name, slack)

    def next_deadline(self) -> int | None:
        """Tick by which the earliest active timer must fire (one with slack: its
        deadline plus the slack), or None."""
        heap = self._heap
        while heap and not heap[0].active:
            heapq.heappop(heap)
        first = heap[0].deadline if heap else None
        for t in self._soft:
            if t.active and (first is None or t.deadline + t.slack < first):
                first = t.deadline + t.slack
        return first

    def fire_soft_due(self) -> int:
        """Fire the timers with slack whose deadline has been reached; how many.  The run
        loop calls this between vCPU turns, after the exit's own timers (fire_due)."""
        soft = self._soft
        if not soft:
            return 0
        now = self.now()
        fired = 0
        for t in list(soft):
            if not t.active:
                soft.remove(t)
            elif t.deadline <= now:
                soft.remove(t)
                t.active = False
                t.callback(now)
                fired += 1
        return fired

    def fire_due(self) -> int:
        """Fire every active timer whose deadline has been reached; return how many."""
        fired = 0
        heap = self._heap
        while True:
            while heap and not heap[0].active:
                heapq.heappop(heap)
            if not heap:
                break
            now = self.now()
            if heap[0].deadline > now:
                break
            t = heapq.heappop(heap)
            t.active = False
            t.callback(now)
            fired += 1
        return fired

    def skip_idle_to(self, tick: int) -> None:
        """While halted: jump guest time forward to ``tick`` without retiring instructions."""
        now = self.now()
        if tick > now:
            self.idle += tick - now

    # -- manual clocks (tests, qtest harness) -------------------------------
    def advance_to(self, tick: int) -> int:
        """Manual clock: move time to ``tick``, firing timers in deadline order."""
        if self._source is not None:
            raise RuntimeError("advance_to() is only for manual clocks; a vCPU drives this one")
        fired = 0
        while True:
            nd = self.next_deadline()
            if nd is None or nd > tick:
                break
            if nd > self._manual + self.idle:
                self._manual = nd - self.idle
            fired += self.fire_due() + self.fire_soft_due()
        if tick > self._manual + self.idle:
            self._manual = tick - self.idle
        return fired + self.fire_soft_due()     # the stop at ``tick``

    def advance(self, ticks: int) -> int:
        return self.advance_to(self.now() + ticks)

    # -- state --------------------------------------------------------------
    def save_state(self) -> dict:
        """Time, and the pending timers as (deadline, sequence, name).

        A timer's callback is code, not state: a device re-arms its own
        timers in ``load_state``, and any other owner (the platform's input
        poll, a replay's digest timer) names a restorer in ``finish_restore``.
        The sequence numbers keep the firing order of timers due at the same
        tick exactly as it was.
        """
        timers = sorted((t.deadline, t.seq, t.name) for t in self._heap + self._soft if t.active)
        return {"kind": "clock", "version": 2, "idle": self.idle, "manual": self._manual, "seq": self._seq,
                "timers": [list(x) for x in timers]}

    def load_state(self, state: dict) -> None:
        """Restore time; pending timers come back as their owners re-arm them (see finish_restore)."""
        if not isinstance(state, dict) or state.get("kind") != "clock" or state.get("version") not in (1, 2):
            raise ValueError("clock: not a clock state of version 1 or 2")
        self.idle = int(state["idle"])
        self._manual = int(state["manual"])
        self._heap = []
        self._soft = []
        self._restoring = [(int(d), int(s), str(n)) for d, s, n in state.get("timers", [])]
        self._saved_seq = int(state.get("seq", self._seq))

    def finish_restore(self, restorers: dict[str, Callable[[int], None]] | None = None) -> list[str]:
        """After every owner has loaded its state: give re-armed timers their saved
        sequence numbers, re-create the timers of ``restorers`` (name -> callback),
        and return the names of saved timers nobody re-armed."""
        restorers = restorers or {}
        saved = getattr(self, "_restoring", [])
        by_key = {(t.name, t.deadline): t for t in self._heap if t.active}
        lost = []
        for deadline, seq, name in saved:
            t = by_key.pop((name, deadline), None)
            if t is not None:
                t.seq = seq
            elif name in restorers:
                self._heap.append(Timer(deadline, seq, restorers[name], name))
            else:
                lost.append(name)
        heapq.heapify(self._heap)
        self._seq = max(getattr(self, "_saved_seq", self._seq), max((t.seq for t in self._heap), default=0))
        self._restoring = []
        return lost

    def find(self, name: str) -> Timer | None:
        """The active timer of that name (the first due), if any."""
        best = None
        for t in self._heap + self._soft:
            if t.active and t.name == name and (best is None or t < best):
                best = t
        return best
