"""Timers with slack (devices/clock.py): a callback the guest cannot see (the FT primary's
log horizon) comes at the first stop between vCPU turns at or after its deadline, and the
vCPU is made to stop exactly for it only at deadline + slack."""
from __future__ import annotations

from devices.clock import VirtualClock
from tools.guestkit import Guest

LOOP = "mov ecx, 30000; L: dec ecx; jnz L; mov dx, 0x501; mov al, 0; out dx, al; hlt"


def test_next_deadline_counts_the_slack_and_a_manual_clock_fires_it_in_time():
    c = VirtualClock()
    seen: list[tuple[str, int]] = []
    soft = c.schedule(50, lambda now: seen.append(("soft", now)), "soft", slack=100)
    hard = c.schedule(120, lambda now: seen.append(("hard", now)), "hard")
    assert c.next_deadline() == 120          # the hard timer comes before 50 + 100
    hard.cancel()
    assert c.next_deadline() == 150
    assert c.find("soft") is soft
    assert [t[2] for t in c.save_state()["timers"]] == ["soft"]   # a snapshot holds it
    c.advance_to(60)
    assert seen == [("soft", 60)] and c.next_deadline() is None


def _run(timers: list[tuple[str, int, int]]):
    g = Guest()
    g.protected_mode(LOOP)
    fired: list[tuple[str, int]] = []
    clock = g.m.clock
    for name, deadline, slack in timers:
        clock.schedule(deadline, lambda now, name=name: fired.append((name, now)), name, slack=slack)
    res = g.run(1_000_000)
    return fired, res, g.cpu.icount, [g.cpu.reg(r) for r in ("rax", "rcx", "rdx", "rip")], dict(g.m.exit_counts)


def test_a_timer_with_slack_waits_for_a_stop_and_the_guest_sees_nothing():
    base = _run([])
    # alone in a loop without exits: the vCPU stops exactly at the end of the slack
    fired, res, icount, regs, _ = _run([("soft", 10_000, 5_000)])
    assert fired == [("soft", 15_000)]
    assert (res.reason, icount, regs) == (base[1].reason, base[2], base[3])
    # a stop for another timer inside the slack: it comes there, after that timer
    fired, res, icount, regs, exits = _run([("soft", 10_000, 50_000), ("hard", 12_345, 0)])
    assert fired == [("hard", 12_345), ("soft", 12_345)]
    assert (res.reason, icount, regs) == (base[1].reason, base[2], base[3])
    assert exits["deadline"] == base[4]["deadline"] + 1      # one exact stop, not two
