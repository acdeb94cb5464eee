"""Fuzz every device's ports and MMIO (issue 16): each example picks one device
of the conformance suite (tests/devices/test_conformance.py: every device
class, with its peers, IRQ lines and host-side inputs), drives it with random
port reads and writes of every width on and around its ports, MMIO accesses on
and past its window, virtual time and host input, saves and restores it half
way, and goes on with both copies.

A device must never raise, a read must fit its width, and the restored copy
must behave exactly as the original from there on (the same values, times,
interrupt lines and host output), all within the time bound."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.harness import bounded, fuzz_settings, tally


def _suite():
    from tests.devices import test_conformance as c

    return c


@st.composite
def traffic(draw):
    c = _suite()
    name = draw(st.sampled_from(c.NAMES))
    before = draw(c.op_strategy(name, around=True))
    after = draw(c.op_strategy(name, around=True))
    return name, before, after


def check_device(name: str, before: list, after: list) -> str:
    from devices.clock import VirtualClock

    c = _suite()
    with bounded():
        rig = c.RIGS[name](VirtualClock())
        for op in before:
            value = c.apply(rig, op)
            if op[0] in ("r", "mr"):
                assert 0 <= value <= c.SIZE_MASK[op[2]], f"{name}: read {op} gave {value!r}"
        copy = c.restore(rig)
        assert copy.states() == rig.states(), f"{name}: the loaded state does not save back identically"
        rig.log.clear()
        assert c.run_trace(copy, after) == c.run_trace(rig, after), f"{name}: the restored device differs"
    return name


@fuzz_settings(300)
@given(case=traffic())
def test_device_ports_and_mmio_with_hostile_traffic(case):
    tally("devices", check_device(*case))
