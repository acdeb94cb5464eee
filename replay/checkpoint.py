"""Machine checkpoints for time travel: take one anywhere, restore any of them.

A checkpoint holds the whole machine: the CPU (Unicorn's CPU-only context,
which is the CPUX86State copy, plus the VMM's clock and interrupt fields),
every device's saved state, the virtual clock with its pending timers, the
machine's own bookkeeping (halted, pending console input, output streams) and
guest RAM.  RAM is stored as the pages that changed since the previous
checkpoint (found by comparing page hashes), with a keyframe every
``KEYFRAME_EVERY`` checkpoints that holds every page that is not all zeros,
so memory cost grows with what the guest touches and writes, not with RAM
size.  Unicorn's own memory snapshots are not used
(UNICORN.md section 6: they stop numpy from seeing the guest, slow down with
many dirty pages, and restoring a newer one after an older one crashes).

Timers: devices re-arm their own timers in ``load_state``; timers owned by
the machine or the replayer (input polls, digests) are put back from the
checkpoint; and every timer gets back its original sequence number, so timers
due at the same tick fire in the same order as in the original run.
"""
from __future__ import annotations

import copy
import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from devices.clock import Timer
from vmm.digest import page_hashes

PAGE = 4096
KEYFRAME_EVERY = 16


@dataclass
class Checkpoint:
    index: int
    icount: int
    tick: int
    cpu: Any                    # a Unicorn CPU context
    core: dict[str, int]
    devices: list[dict]
    clock: dict
    timers: list[tuple[int, int, str, Any]]   # (deadline, seq, name, callback)
    machine: dict
    extra: dict
    keyframe: dict[int, bytes] | None = None  # every non-zero page, or
    diff: dict[int, bytes] = field(default_factory=dict)  # changed pages since the previous checkpoint
    hashes: np.ndarray | None = None

    @property
    def ram_bytes(self) -> int:
        if self.keyframe is not None:
            return len(self.keyframe) * PAGE
        return len(self.diff) * PAGE


class Checkpoints:
    """An ordered list of checkpoints of one machine (taken in icount order)."""

    def __init__(self, machine, extra_save=None, extra_load=None):
        self.m = machine
        self.list: list[Checkpoint] = []
        self._extra_save = extra_save or (dict)
        self._extra_load = extra_load or (lambda d: None)

    @property
    def bytes(self) -> int:
        return sum(c.ram_bytes for c in self.list)

    def take(self) -> Checkpoint:
        m = self.m
        cpu = m.vcpu
        if self.list and self.list[-1].icount == cpu.icount:
            return self.list[-1]
        if self.list and cpu.icount < self.list[-1].icount:
            raise ValueError("checkpoints must be taken in icount order")
        idx = len(self.list)
        ram = m.memory.ram
        hashes = page_hashes(ram)
        cp = Checkpoint(
            index=idx, icount=cpu.icount, tick=m.clock.now(), cpu=cpu.uc.context_save(),
            core={"irq_pending": cpu._core.irq_pending, "slow": cpu._core.slow},
            devices=[copy.deepcopy(d.save_state()) for d in m.devices],
            clock=m.clock.save_state() | {"seq": m.clock._seq},
            timers=[(t.deadline, t.seq, t.name, t.callback) for t in m.clock._heap if t.active],
            machine=_machine_state(m), extra=copy.deepcopy(self._extra_save()), hashes=hashes)
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

    def restore(self, cp: Checkpoint) -> None:
        m = self.m
        cpu = m.vcpu
        # RAM: the keyframe at or before it, then the diffs up to it
        k = cp.index - cp.index % KEYFRAME_EVERY
        ram = m.memory.ram
        ram[:] = 0
        for p, data in self.list[k].keyframe.items():
            ram[p * PAGE:(p + 1) * PAGE] = np.frombuffer(data, dtype=np.uint8)
        for c in self.list[k + 1:cp.index + 1]:
            for p, data in c.diff.items():
                ram[p * PAGE:(p + 1) * PAGE] = np.frombuffer(data, dtype=np.uint8)
        # CPU: the context is a plain copy; translated code and the TLB must go
        cpu.uc.context_restore(cp.cpu)
        cpu.icount = cp.icount
        cpu._core.irq_pending = cp.core["irq_pending"]
        cpu._core.slow = cp.core["slow"]
        cpu.invalidate_code()
        cpu.flush_tlb()
        # clock and devices: devices re-arm their own timers
        clock = m.clock
        clock._heap.clear()
        clock.load_state(cp.clock)
        for d, st in zip(m.devices, cp.devices):
            d.load_state(copy.deepcopy(st))
        _load_machine_state(m, cp.machine)
        present = {(t.name, t.deadline) for t in clock._heap if t.active}
        for deadline, seq, name, cb in cp.timers:
            if (name, deadline) not in present:
                clock._heap.append(Timer(deadline, seq, cb, name))
        seqs = {(name, deadline): seq for deadline, seq, name, _ in cp.timers}
        for t in clock._heap:
            t.seq = seqs.get((t.name, t.deadline), t.seq)
        heapq.heapify(clock._heap)
        clock._seq = cp.clock["seq"]
        if hasattr(m, "_input_timer"):
            m._input_timer = next((t for t in clock._heap if t.name == "console-input" and t.active), None)
        self._extra_load(copy.deepcopy(cp.extra))


def _machine_state(m) -> dict:
    st: dict[str, Any] = {"halted": m.halted}
    for name in ("_input_pending", "_a20_kbd", "_a20_fast"):
        if hasattr(m, name):
            st[name] = copy.copy(getattr(m, name))
    if hasattr(m, "outputs"):
        st["outputs"] = {k: (o.count, o._h.copy(), bytes(o.tail)) for k, o in m.outputs.items()}
        st["serial_out"] = bytes(m.serial_out)
        st["debugcon_out"] = bytes(m.debugcon_out)
    if getattr(m, "bios", None) is not None:
        st["bios_screen"] = bytes(m.bios.screen)
        st["disks"] = {d: dict(img.overlay) for d, img in m.bios.disks.items()}
    return st


def _load_machine_state(m, st: dict) -> None:
    m.halted = st["halted"]
    for name in ("_input_pending", "_a20_kbd", "_a20_fast"):
        if name in st:
            setattr(m, name, copy.copy(st[name]))
    if "outputs" in st:
        for k, (count, h, tail) in st["outputs"].items():
            o = m.outputs[k]
            o.count, o._h, o.tail = count, h.copy(), bytearray(tail)
        m.serial_out[:] = st["serial_out"]
        m.debugcon_out[:] = st["debugcon_out"]
    if "bios_screen" in st:
        m.bios.screen[:] = st["bios_screen"]
        for d, ov in st["disks"].items():
            m.bios.disks[d].overlay = dict(ov)
    if hasattr(m, "_apply_a20"):
        m._apply_a20()
