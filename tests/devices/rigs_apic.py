"""Conformance rigs for the APIC family (loaded by tests/devices/test_conformance.py).

Each rig is a small APIC system: an APIC bus, two vCPUs' CpuPins, their local
APICs, an 8259 pair on LINT0, and, for the I/O APIC, the local APICs it
delivers to.  The CpuPins and the other chips are peers, so they are saved
and restored with the device under test, and ``observe`` adds what reached
each CPU (INTR, NMI, INIT, SIPI, SMI).

Host operations poke the registers that matter most (SVR enable, TPR, EOI,
timer, ICR, LINT0) with meaningful values, so that random traffic reaches
enabled-APIC paths that raw random register writes would rarely find, plus
the inputs a board drives (8259 IRQs, LINT1, I/O APIC pins, bus messages,
TSC deadlines) and INTA cycles.

The suite's Rig class is taken from the conformance module that loaded this
one (it imports this module while it is itself being imported), at the time a
rig is built, so the two modules never import each other at load time.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from devices.apic import lapic as L
from devices.apic.apicbus import ApicBus, ApicMessage
from devices.apic.ioapic import IOAPIC_BASE, IOREGSEL, IOWIN, IoApic
from devices.apic.ioapic import WINDOW as IOAPIC_WINDOW
from devices.bus import MmioBus
from devices.apic.lapic import LocalApic, LocalApicBank
from devices.clock import VirtualClock
from devices.irqchip import CpuPins
from devices.legacy.pic import Pic8259Pair

_RIG_CLASSES: dict[type, type] = {}


def _suite() -> Any:
    """The conformance module whose RIGS hold these rigs (whatever name pytest gave it)."""
    for mod in list(sys.modules.values()):
        rigs = getattr(mod, "RIGS", None)
        if isinstance(rigs, dict) and rigs.get("lapic") is rig_lapic and hasattr(mod, "Rig"):
            return mod
    return importlib.import_module("tests.devices.test_conformance")


def _apic_rig(clock: VirtualClock, dev: Any, **kw: Any) -> Any:
    base = _suite().Rig
    cls = _RIG_CLASSES.get(base)
    if cls is None:
        class ApicRig(base):  # type: ignore[misc, valid-type]
            pins: list[CpuPins]

            def observe(self) -> tuple:
                seen = tuple((p.id, p.intr, p.nmi, p.init, p.sipi, p.smi) for p in self.pins)
                return super().observe() + seen

        cls = _RIG_CLASSES[base] = ApicRig
    rig = cls(clock, dev, **kw)
    return rig


# Registers poked by the "reg" host op, each with a value maker: byte -> value.
_POKES: tuple[tuple[int, Callable[[int], int]], ...] = (
    (L.REG_SVR, lambda b: 0x100 | b),
    (L.REG_TPR, lambda b: b & 0xF0),
    (L.REG_EOI, lambda b: 0),
    (L.REG_LVT_TIMER, lambda b: (b & 0xF0 | 0x20) | (b & 3) << 17),
    (L.REG_TMICT, lambda b: b * 997 + 1),
    (L.REG_TDCR, lambda b: b & 0xB),
    (L.REG_ICR_LO, lambda b: 0x4_0000 | (b | 0x20)),               # fixed, self
    (L.REG_ICR_LO, lambda b: 0xC_0000 | (b & 7) << 8 | b | 0x10),  # any mode, all but self
    (L.REG_LVT_LINT0, lambda b: 0x700 if b & 1 else 0x8000 | (b | 0x20)),
    (L.REG_LVT_LINT1, lambda b: 0x400 if b & 1 else b | 0x20),
    (L.REG_LVT_ERROR, lambda b: b),
    (L.REG_LDR, lambda b: b << 24),
    (L.REG_DFR, lambda b: 0xFFFF_FFFF if b & 1 else 0x0FFF_FFFF),
)


def _poke(lapic: LocalApic, n: int, b: int) -> None:
    reg, value = _POKES[n % len(_POKES)]
    lapic.write_register(reg, value(b) & 0xFFFF_FFFF)


class ApicSystem:
    """A board of ``n`` vCPUs with their local APICs on one MMIO bank, an 8259
    pair on LINT0 and optionally an I/O APIC, driven through an MmioBus with
    no guest; ``kicks`` records every CpuPins kick (vCPU ids)."""

    def __init__(self, n: int = 2, clock: VirtualClock | None = None, *, pic: bool = True,
                 ioapic: bool = False, ioapic_version: int = 0x11) -> None:
        self.clock = clock if clock is not None else VirtualClock()
        self.bus = ApicBus()
        self.kicks: list[int] = []
        self.pins = [CpuPins(i, self.kicks.append) for i in range(n)]
        self.lapics = [LocalApic(self.clock, self.bus, self.pins[i], apic_id=i, bsp=i == 0)
                       for i in range(n)]
        self.bank = LocalApicBank(self.lapics)
        self.mmio = MmioBus()
        self.mmio.register(self.bank, L.DEFAULT_BASE, L.WINDOW)
        self.pic: Pic8259Pair | None = None
        if pic:
            self.pic = Pic8259Pair()
            self.pic.program_like_pc_bios()
            self.bank.attach_pic(self.pic)
        self.ioapic: IoApic | None = None
        if ioapic:
            self.ioapic = IoApic(self.clock, self.bus, version=ioapic_version)
            self.mmio.register(self.ioapic, IOAPIC_BASE, IOAPIC_WINDOW)

    # -- local APIC registers, as vCPU ``cpu`` sees them ----------------------------
    def read(self, cpu: int, reg: int, size: int = 4) -> int:
        return self.mmio.read(L.DEFAULT_BASE + reg, size, cpu)

    def write(self, cpu: int, reg: int, value: int, size: int = 4) -> None:
        self.mmio.write(L.DEFAULT_BASE + reg, size, value, cpu)

    def enable(self, *cpus: int, svr: int = 0x1FF) -> None:
        for cpu in cpus or range(len(self.lapics)):
            self.write(cpu, L.REG_SVR, svr)

    def vectors(self, cpu: int, base: int) -> list[int]:
        """The vectors set in the 256-bit register at ``base`` (ISR, TMR or IRR)."""
        bits = sum(self.read(cpu, base + 0x10 * i) << (32 * i) for i in range(8))
        return [v for v in range(256) if bits >> v & 1]

    def irr(self, cpu: int) -> list[int]:
        return self.vectors(cpu, L.REG_IRR)

    def isr(self, cpu: int) -> list[int]:
        return self.vectors(cpu, L.REG_ISR)

    def tmr(self, cpu: int) -> list[int]:
        return self.vectors(cpu, L.REG_TMR)

    def inta(self, cpu: int) -> int:
        assert self.pins[cpu].intr, f"vCPU {cpu} has no INTR to acknowledge"
        return self.pins[cpu].acknowledge()

    def eoi(self, cpu: int) -> None:
        self.write(cpu, L.REG_EOI, 0)

    def ipi(self, cpu: int, lo: int, dest: int = 0) -> None:
        self.write(cpu, L.REG_ICR_HI, dest << 24)
        self.write(cpu, L.REG_ICR_LO, lo)

    def esr(self, cpu: int) -> int:
        self.write(cpu, L.REG_ESR, 0)
        return self.read(cpu, L.REG_ESR)

    # -- the I/O APIC -------------------------------------------------------------------
    def io_read(self, index: int) -> int:
        self.mmio.write(IOAPIC_BASE + IOREGSEL, 4, index)
        return self.mmio.read(IOAPIC_BASE + IOWIN, 4)

    def io_write(self, index: int, value: int) -> None:
        self.mmio.write(IOAPIC_BASE + IOREGSEL, 4, index)
        self.mmio.write(IOAPIC_BASE + IOWIN, 4, value)

    def rte(self, pin: int, vector: int, *, mode: int = 0, logical: bool = False, level: bool = False,
            masked: bool = False, dest: int = 0) -> None:
        self.io_write(0x11 + 2 * pin, dest << 24)
        self.io_write(0x10 + 2 * pin, vector | mode << 8 | (0x800 if logical else 0)
                      | (0x8000 if level else 0) | (0x1_0000 if masked else 0))


def _ack(rig: Any, pins: CpuPins) -> None:
    vector = pins.acknowledge() if pins.intr else None
    rig.log.append((rig.clock.now(), "inta", pins.id, vector))


def _take(rig: Any, pins: CpuPins) -> None:
    rig.log.append((rig.clock.now(), "events", pins.id, pins.take_nmi(), pins.take_init(),
                    pins.take_sipi()))
    pins.smi = False


def _host_ops(rig: Any, sy: ApicSystem) -> dict[str, Callable[..., Any]]:
    clock, pins, lapics, bus, pic = rig.clock, sy.pins, sy.lapics, sy.bus, sy.pic
    assert pic is not None
    return {
        "reg": lambda n, b: _poke(lapics[n & 1], n >> 1, b),
        "irq": lambda n, b: pic.set_irq(n % 16, bool(b & 1)),
        "lint1": lambda n, b: lapics[n & 1].set_lint(1, bool(b & 1)),
        "ack": lambda n, b: _ack(rig, pins[n & 1]),
        "take": lambda n, b: _take(rig, pins[n & 1]),
        "msg": lambda n, b: bus.send(ApicMessage(vector=b, delivery_mode=n & 7, dest=(n >> 3) & 3,
                                                 logical=bool(n & 16), level_triggered=bool(b & 1))),
        "tsc": lambda n, b: lapics[n & 1].msr_write(L.MSR_TSC_DEADLINE, clock.now() + b * 1009),
        "init": lambda n, b: lapics[n & 1].init_reset(),
    }


def rig_lapic(clock: VirtualClock) -> Any:
    """One LocalApic mapped on its own (a machine with one vCPU), a second on the bus."""
    sy = ApicSystem(clock=clock)
    a = sy.lapics[0]
    assert sy.pic is not None
    sy.pic.on_intr_change = lambda level: a.set_lint(0, level)
    # The register file is 0x000-0x3F0; the rest of the page behaves as its
    # reserved slots do, so the rig drives the first 1 KiB.
    rig = _apic_rig(clock, a, peers=[sy.lapics[1], sy.pic, *sy.pins], mmio=0x400)
    rig.pins = sy.pins
    rig.host_ops = _host_ops(rig, sy)
    return rig


def rig_lapic_bank(clock: VirtualClock) -> Any:
    """Two vCPUs' APICs behind one claim, selected by the accessing vCPU."""
    sy = ApicSystem(clock=clock)
    rig = _apic_rig(clock, sy.bank, peers=[sy.pic, *sy.pins], mmio=0x400, vcpu_ids=(0, 1))
    rig.pins = sy.pins
    rig.host_ops = _host_ops(rig, sy)
    return rig


def rig_ioapic(clock: VirtualClock) -> Any:
    """An I/O APIC (version 0x20, with the EOI register) delivering to two enabled local APICs."""
    sy = ApicSystem(clock=clock, ioapic=True, ioapic_version=0x20)
    io = sy.ioapic
    assert io is not None
    sy.enable()
    for a in sy.lapics:
        a.write_register(L.REG_LDR, 1 << (24 + a.apic_id))
    # The chip decodes 8 address bits (its registers repeat every 256 bytes).
    rig = _apic_rig(clock, io, peers=[sy.bank, sy.pic, *sy.pins], mmio=0x100)
    rig.pins = sy.pins
    ops = _host_ops(rig, sy)

    def program(n: int, b: int) -> None:
        sy.rte(n % 24, 0x30 + n % 24, mode=b & 7, logical=bool(b & 8), level=bool(b & 0x80),
               masked=bool(b & 0x40), dest=(b >> 4) & 3)

    ops.update({
        "pin": lambda n, b: io.set_irq(n % 24, bool(b & 1)),
        "rte": program,
        "eoi": lambda n, b: sy.eoi(n & 1),
    })
    rig.host_ops = ops
    return rig


RIGS: dict[str, Callable[[VirtualClock], Any]] = {
    "lapic": rig_lapic,
    "lapic_bank": rig_lapic_bank,
    "ioapic": rig_ioapic,
}
CLASS_OF = {"lapic": LocalApic, "lapic_bank": LocalApicBank, "ioapic": IoApic}
