"""Time travel: seeking, reverse-stepi and reverse-continue over a recording."""
from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay.session import record
from replay.timetravel import WRITE, TimeTravel
from tests.test_replay import ACC, race_guest, scripted
from vmm.digest import page_hashes


def state(m):
    return (m.vcpu.icount, tuple(sorted(m.vcpu.snapshot_regs().items())),
            hashlib.sha256(page_hashes(m.memory.ram).tobytes()).hexdigest(), bytes(m.serial_out))


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    d = tmp_path_factory.mktemp("tt")
    img = d / "race.bin"
    image = race_guest(2500, ticks=10)
    img.write_bytes(image)
    log = str(d / "race.vmlog")
    res, _m = record(str(img), image, log, boot_kind="flat", input_kind="file",
                    live_input=scripted([(2, b"hi"), (4, b"there")]), max_instructions=40_000_000)
    assert res.reason.value == "exit"
    return log, res.icount


def straight(log, n):
    tt = TimeTravel(log, interval=1 << 60)  # no checkpoints: a plain forward replay
    tt.seek(n)
    return state(tt.m)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_seeks_land_exactly(recording, data):
    log, total = recording
    targets = data.draw(st.lists(st.integers(0, total), min_size=2, max_size=5))
    tt = TimeTravel(log, interval=300_000)
    for t in targets:
        tt.seek(t)
        assert tt.icount == t
        assert state(tt.m) == straight(log, t)


def test_reverse_stepi_matches_forward_run(recording):
    log, total = recording
    tt = TimeTravel(log, interval=400_000)
    n = total // 2
    before = straight(log, n - 1)
    tt.seek(n)
    stop = tt.reverse_step()
    assert stop.icount == n - 1
    assert state(tt.m) == before
    # and stepping forward again returns to n exactly
    tt.step()
    assert state(tt.m) == straight(log, n)


def test_reverse_continue_finds_the_last_store(recording):
    log, total = recording
    tt = TimeTravel(log, interval=400_000)
    tt.seek(total)  # the end of the recording
    tt.add_watchpoint(WRITE, ACC, 4)
    stop = tt.reverse_cont()
    assert stop.reason == "watchpoint"
    at = stop.icount
    # we stand on the store, before it ran: stepping it writes ACC ...
    tt.remove_watchpoint(WRITE, ACC, 4)
    tt.add_watchpoint(WRITE, ACC, 4)
    s = tt.step()
    assert tt.icount == at + 1 and any(h.icount == at + 1 for h in tt._watch_hits)
    # ... and nothing writes ACC after it: continuing forward reaches the end
    fwd = tt.cont()
    assert fwd.reason == "end"
    # an earlier store exists: reverse-continue from the store finds it
    tt.seek(at)
    earlier = tt.reverse_cont()
    assert earlier.reason == "watchpoint" and earlier.icount < at
    del s


def test_breakpoint_forward_and_reverse(recording):
    log, _ = recording
    tt = TimeTravel(log, interval=400_000)
    # timer_isr entry: find it from a forward run by watching for the first tick counter write
    tt.add_watchpoint(WRITE, 0x6000, 4)
    first = tt.cont()
    assert first.reason == "watchpoint"
    tt.remove_watchpoint(WRITE, 0x6000, 4)
    isr_insn = first.icount - 1
    tt.seek(isr_insn)
    isr_addr = tt.m.vcpu.seg(1).base + tt.m.vcpu.rip
    tt.seek(0)
    tt.add_breakpoint(isr_addr)
    hits = []
    for _ in range(3):
        s = tt.cont()
        assert s.reason == "breakpoint" and tt.m.vcpu.seg(1).base + tt.m.vcpu.rip == isr_addr
        hits.append(s.icount)
    assert hits == sorted(set(hits))
    back = tt.reverse_cont()
    assert back.reason == "breakpoint" and back.icount == hits[1]
    back = tt.reverse_cont()
    assert back.icount == hits[0]


def test_reverse_continue_finds_a_breakpoint_hit_at_a_checkpoint(recording):
    """A hit exactly where a checkpoint was taken counts like any other."""
    log, _ = recording
    probe = TimeTravel(log, interval=400_000)
    probe.add_watchpoint(WRITE, 0x6000, 4)
    at = probe.cont().icount - 1                   # the tick counter's increment in timer_isr
    probe.seek(at)
    addr = probe.m.vcpu.seg(1).base + probe.m.vcpu.rip
    tt = TimeTravel(log, interval=at)              # checkpoints at at, 2 * at, ...
    tt.seek(at + 3)
    assert [c.icount for c in tt.cps.list] == [0, at]
    tt.add_breakpoint(addr)
    back = tt.reverse_cont()
    assert back.reason == "breakpoint" and back.icount == at and back.vcpu == 0
    assert tt.reverse_cont().reason == "start"


def test_one_vcpu_has_no_schedule_map(recording):
    log, _ = recording
    tt = TimeTravel(log, interval=400_000)
    assert tt.sched is None
    tt.seek(1000)
    assert tt.step(vcpu=0).icount == 1001 and tt.reverse_step(vcpu=0).icount == 1000
    assert tt.before_last_insn(0) == 999 and tt.vcpu_icounts() == [1000]


def test_adaptive_checkpoint_interval():
    from replay.timetravel import DEFAULT_INTERVAL, MAX_INTERVAL, adaptive_interval

    assert adaptive_interval(None) == DEFAULT_INTERVAL
    assert adaptive_interval(10_000_000) == DEFAULT_INTERVAL          # short: dense
    assert adaptive_interval(2_560_000_000) == 10_000_000              # ~256 checkpoints
    assert adaptive_interval(10**12) == MAX_INTERVAL                   # the reverse cost stays bounded
