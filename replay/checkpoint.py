"""Machine checkpoints for time travel: take one anywhere, restore any of them.

A checkpoint is the machine's saved state (vmm/state.py: every vCPU as
plain register data, the clock with its pending timers, the EPT, every
device, the firmware, the platform), encoded to bytes so nothing in it can
alias a live object, plus guest RAM and whatever the replay needs to resume
(its position in the log).  RAM is stored as the pages that changed since
the previous checkpoint (found by comparing page hashes), with a keyframe
every ``KEYFRAME_EVERY`` checkpoints that holds every page that is not all
zeros, so memory cost grows with what the guest touches and writes, not with
RAM size.  Unicorn's own memory snapshots are not used (UNICORN.md section
6: they stop numpy from seeing the guest, slow down with many dirty pages,
and restoring a newer one after an older one crashes), and neither are its
CPU contexts: the same saved state a snapshot file holds is what a
checkpoint restores.

Timers: devices re-arm their own timers when their state is loaded; timers
owned by the machine, the firmware or the replayer (input polls, digests)
are re-created from the restorers they name; every timer gets back its
original sequence number, so timers due at the same tick fire in the same
order as in the original run.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vmm.digest import page_hashes
from vmm.state import decode, encode

PAGE = 4096
KEYFRAME_EVERY = 16


@dataclass
class Checkpoint:
    index: int
    icount: int
    tick: int
    state: bytes                # encode(machine.save_state(ram=False))
    extra: bytes                # encode(the owner's own position data)
    keyframe: dict[int, bytes] | None = None  # every non-zero page, or
    diff: dict[int, bytes] = field(default_factory=dict)  # changed pages since the previous checkpoint
    hashes: np.ndarray | None = None

    @property
    def ram_bytes(self) -> int:
        if self.keyframe is not None:
            return len(self.keyframe) * PAGE
        return len(self.diff) * PAGE

    @property
    def bytes(self) -> int:
        return self.ram_bytes + len(self.state) + len(self.extra)


class Checkpoints:
    """An ordered list of checkpoints of one machine (taken in icount order)."""

    def __init__(self, machine, extra_save: Callable[[], Any] | None = None,
                 extra_load: Callable[[Any], None] | None = None,
                 restorers: Callable[[], dict] | None = None):
        self.m = machine
        self.list: list[Checkpoint] = []
        self._extra_save = extra_save or (dict)
        self._extra_load = extra_load or (lambda d: None)
        self._restorers = restorers or (dict)
        self.lost_timers: list[str] = []

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.list)

    def take(self) -> Checkpoint:
        m = self.m
        ic = m.icount
        if self.list and self.list[-1].icount == ic:
            return self.list[-1]
        if self.list and ic < self.list[-1].icount:
            raise ValueError("checkpoints must be taken in icount order")
        idx = len(self.list)
        ram = m.memory.ram
        hashes = page_hashes(ram)
        cp = Checkpoint(index=idx, icount=ic, tick=m.clock.now(), state=encode(m.save_state(ram=False)),
                        extra=encode(self._extra_save()), hashes=hashes)
        if idx % KEYFRAME_EVERY == 0:
            used = np.flatnonzero(ram.view(np.uint64).reshape(-1, PAGE // 8).any(axis=1))
            cp.keyframe = {int(p): ram[p * PAGE:(p + 1) * PAGE].tobytes() for p in used}
        else:
            prev = self.list[-1].hashes
            changed = np.flatnonzero(prev != hashes)
            cp.diff = {int(p): ram[p * PAGE:(p + 1) * PAGE].tobytes() for p in changed}
        self.list.append(cp)
        return cp

    def latest_at_or_before(self, icount: int) -> Checkpoint | None:
        best = None
        for c in self.list:
            if c.icount <= icount:
                best = c
            else:
                break
        return best

    def truncate_after(self, icount: int) -> None:
        """Drop checkpoints past ``icount`` (after the replay position moved back)."""
        self.list = [c for c in self.list if c.icount <= icount]

    def ram_at(self, cp: Checkpoint) -> np.ndarray:
        """Guest RAM as it was at ``cp`` (a new array)."""
        k = cp.index - cp.index % KEYFRAME_EVERY
        ram = np.zeros_like(self.m.memory.ram)
        for p, data in self.list[k].keyframe.items():
            ram[p * PAGE:(p + 1) * PAGE] = np.frombuffer(data, dtype=np.uint8)
        for c in self.list[k + 1:cp.index + 1]:
            for p, data in c.diff.items():
                ram[p * PAGE:(p + 1) * PAGE] = np.frombuffer(data, dtype=np.uint8)
        return ram

    def restore(self, cp: Checkpoint) -> None:
        m = self.m
        m.memory.ram[:] = self.ram_at(cp)
        # the host write notification drops translated code of every page
        m.memory.on_host_write(0, m.memory.size) if m.memory.on_host_write else None
        self.lost_timers = m.load_state(decode(cp.state), self._restorers())
        self._extra_load(decode(cp.extra))
