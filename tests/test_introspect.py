"""Introspection from outside the guest: system calls trapped with their
arguments, a process's memory read through its page tables, memory watches by
linear and by physical address, CR3 switches; on a live run and on a replay,
and a replay with all of it attached still matches its recording."""
from __future__ import annotations

import pytest

import vmm
from vmm import StopReason
from vmm.introspect import Introspector

DEMO_LINES = [f"task {t}: step {i}/3 (ring 3, {how})\n".encode()
              for i in (1, 2, 3) for t, how in (("A", "int 0x80"), ("B", "sysenter"))]


TICKS = 0x107000


def attach_everything(pc, seen: dict) -> Introspector:
    """Every kind of callback, each logging what it saw into ``seen``."""
    spy = Introspector(pc)

    def on_call(c):
        text = spy.read_string(c.args[0]) if c.number == 1 else b""    # SYS_WRITE: ebx = the line
        seen["calls"].append((c.mechanism, c.number, c.cpl, text, c.icount))

    spy.on_syscall(on_call)
    spy.on_cr3_switch(lambda e: seen["cr3"].append((e.old, e.new)))
    # the demo's tick counter: the kernel stores it at 0x107000 (identity mapped), the tasks
    # read it at 0x40200000 (a read-only user alias of the same frame)
    spy.watch_physical(TICKS, 4, lambda a: seen["phys"].append((a.kind, a.cpl, a.address)), kind="access")
    spy.watch_virtual(TICKS, 4, lambda a: seen["virt"].append((a.kind, a.value, a.icount)), kind="write")
    return spy


def fresh() -> dict:
    return {"calls": [], "cr3": [], "phys": [], "virt": []}


def test_system_calls_are_trapped_with_their_arguments_read_through_the_page_tables():
    m = vmm.boot("demo")
    seen = fresh()
    attach_everything(m.pc, seen)
    res = m.run()
    assert res.reason is StopReason.EXIT and res.status == 0
    calls = seen["calls"]
    # task A: three writes and an exit through int 0x80; task B the same through SYSENTER
    assert [c[:2] for c in calls if c[0] == "int 0x80"] == [("int 0x80", 1)] * 3 + [("int 0x80", 2)]
    assert [c[:2] for c in calls if c[0] == "sysenter"] == [("sysenter", 1)] * 3 + [("sysenter", 2)]
    assert all(c[2] == 3 for c in calls)                       # made from ring 3
    # each write's string, read from the task's stack through its page tables, is the line printed
    assert [c[3] for c in calls if c[1] == 1] == DEMO_LINES
    # the one CR3 load (the demo's page directory), seen at the next exit
    assert [new for _old, new in seen["cr3"]] == [m.regs.cr3]
    # the timer interrupt's stores to the counter, by the kernel, each one more than the last
    values = [v for _k, v, _ic in seen["virt"]]
    assert values == list(range(len(values))) and len(values) > 10    # zeroed, then 1, 2, 3 ...
    # the physical watch sees those stores and the tasks' reads through their user alias
    kinds = {(k, cpl) for k, cpl, _ in seen["phys"]}
    assert ("write", 0) in kinds and ("read", 3) in kinds
    assert all(lin is None for k, cpl, lin in seen["phys"] if cpl == 3)    # paging on: the alias is not known


def test_a_process_page_is_read_through_its_page_tables_and_watched_by_frame():
    m = vmm.boot("demo")
    m.run(2_000_000)                                  # paging on: 0x40200000 maps the tick counter
    spy = m.introspect
    assert spy.translate(0x40200000) == TICKS
    assert spy.read(0x40200000, 4) == m.read(TICKS, 4)
    with pytest.raises(vmm.PageFault):
        spy.read(0x40300000, 4)                       # nothing mapped there
    reads, virt = [], []
    spy.watch_physical(spy.translate(0x40200000), 4, lambda a: reads.append(a), kind="read")
    spy.watch_virtual(0x40200000, 4, lambda a: virt.append(a), kind="read")   # the same frame, by the task's view
    m.run(1_000_000)
    users = [a for a in reads if a.cpl == 3]
    assert users and all(a.physical == TICKS and a.size == 4 and a.address is None for a in users)
    assert [(a.icount, a.cpl) for a in virt] == [(a.icount, a.cpl) for a in reads]
    assert all(a.address == 0x40200000 and a.physical == TICKS for a in virt)


def test_a_kernel_reading_a_task_buffer_is_seen_by_a_watch_on_the_task_address():
    # sys_write reads the task's line (built on its stack) at ring 0, through the user address
    m = vmm.boot("demo")
    m.run(2_000_000)
    spy = m.introspect
    seen = []
    spy.watch_virtual(0x40100000, 0x1000, lambda a: seen.append(a), kind="read")   # task A's stack page
    m.run()
    kernel = [a for a in seen if a.cpl == 0]
    assert kernel and all(0x40100000 <= a.address < 0x40101000 for a in seen)
    assert all(a.physical == spy.translate(0x40100000) + (a.address - 0x40100000) for a in seen)


def test_a_replay_with_introspection_attached_still_matches_the_recording(tmp_path):
    log = tmp_path / "demo.vmlog"
    live = fresh()
    rec = vmm.record("demo", log, setup=lambda m: attach_everything(m.pc, live))
    assert rec.result.reason is StopReason.EXIT
    r = vmm.replay(log)
    replayed = fresh()
    attach_everything(r.pc, replayed)
    res = r.run()                                     # raises Divergence at the first digest that differs
    assert (res.reason, res.icount) == (rec.result.reason, rec.result.icount)
    assert replayed == live                           # and the callbacks saw the same things at the same icounts
    assert len(live["calls"]) == 8 and live["phys"] and live["virt"]


def test_removing_a_trap_stops_its_callbacks_and_stop_ends_a_live_run():
    m = vmm.boot("demo")
    spy = m.introspect
    calls = []

    def first_write(c):
        calls.append(c)
        spy.stop("the first system call")

    h = spy.on_syscall(first_write)
    res = m.run()
    assert res.reason is StopReason.HOST and len(calls) == 1 and calls[0].number == 1
    spy.remove(h)
    res = m.run()
    assert res.reason is StopReason.EXIT and len(calls) == 1
    assert m.pc.trace is None                        # nothing of the spy is left in the machine


def test_bad_watch_kind_is_a_value_error():
    with pytest.raises(ValueError):
        vmm.boot("hello").introspect.watch_virtual(0, 4, print, kind="execute")
