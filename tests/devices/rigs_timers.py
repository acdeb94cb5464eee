"""Conformance-suite rigs for devices/timers: the HPET, the ACPI PM block and the PIIX reset register.

test_conformance.py imports this module while it is itself being imported
(from its ``_extra_rigs``), so ``Rig`` is looked up when a rig is built, not
at import time; pytest imports that module as ``test_conformance`` (rootdir
mode, tests/devices has no __init__.py), a package-style run as
``tests.devices.test_conformance``.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from devices.clock import VirtualClock
from devices.timers.acpi_pm import AcpiPm, PiixResetControl
from devices.timers.hpet import HPET_WINDOW, Hpet

# Routes the rig's HPET may use: QEMU q35's mask (I/O APIC inputs 2, 8, 16-23),
# richer than the i440FX default so the traffic exercises per-timer routing.
RIG_ROUTE_CAP = 0x00FF_0104


def _rig(clock: VirtualClock, **kw: Any) -> Any:
    for name in ("test_conformance", "tests.devices.test_conformance"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "Rig"):
            break
    else:
        mod = importlib.import_module("tests.devices.test_conformance")
    return mod.Rig(clock, None, **kw)


def rig_hpet(clock: VirtualClock) -> Any:
    r = _rig(clock, mmio=HPET_WINDOW)
    # Route 0 is the power-on value of Tn_INT_ROUTE_CNF, whether or not it is offered.
    routes = {n: r.line(f"ioapic{n}") for n in range(32) if RIG_ROUTE_CAP >> n & 1 or n == 0}
    r.dev = Hpet(clock, routes.get, r.line("irq0"), r.line("irq8"), route_cap=RIG_ROUTE_CAP)
    r.host_ops = {
        "pit": lambda n, _: r.dev.pit_input(bool(n & 1)),
        "rtc": lambda n, _: r.dev.rtc_input(bool(n & 1)),
    }
    return r


def rig_acpi_pm(clock: VirtualClock) -> Any:
    r = _rig(clock)
    r.dev = AcpiPm(clock, r.line("sci"), r.record("poweroff"))
    r.host_ops = {
        "power_button": lambda *_: r.dev.power_button(),
        "gpe": lambda n, _: r.dev.raise_gpe(n % 16),
    }
    return r


def rig_piix_rcr(clock: VirtualClock) -> Any:
    r = _rig(clock)
    r.dev = PiixResetControl(r.record("reset"))
    return r


RIGS: dict[str, Callable[[VirtualClock], Any]] = {
    "hpet": rig_hpet,
    "acpi_pm": rig_acpi_pm,
    "piix_rcr": rig_piix_rcr,
}
CLASS_OF = {"hpet": Hpet, "acpi_pm": AcpiPm, "piix_rcr": PiixResetControl}
