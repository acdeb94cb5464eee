"""How interrupts reach a vCPU: the interrupt inputs of each CPU, and the chip
interface the machine's run loop uses (after crosvm's IrqChip).

Devices never touch a CPU.  They drive ``IrqLine`` wires into an interrupt
controller (the 8259 pair, the I/O APIC); the controller that talks to a CPU
(its local APIC, or the 8259 pair itself on a machine without APICs) drives
that CPU's ``CpuPins``:

* ``intr``: a maskable interrupt is waiting; the run loop takes it at the
  next instruction boundary with IF=1 and no STI/MOV SS shadow, by calling
  the pins' ``acknowledge()`` (the INTA cycle) for the vector;
* NMI, INIT and SIPI are latched events (``raise_nmi``, ``raise_init``,
  ``raise_sipi(vector)``) the run loop consumes (``take_nmi``...);
* every change calls the machine's ``kick(vcpu_id)`` so that a vCPU that is
  running stops right after the current instruction and one that is halted
  wakes.  The kick never carries host timing into the guest: it happens
  inside a device access or a timer callback, both at exact instruction
  counts.

``LegacyIrqChip`` is the wiring of a PC without APICs: the 8259 pair's INTR
output is the bootstrap processor's INTR pin.  The local APIC (devices/apic)
implements the same ``InterruptSource`` protocol per CPU and takes the 8259
through LINT0.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class InterruptSource(Protocol):
    """What a CPU's INTR pin is connected to."""

    @property
    def intr(self) -> bool: ...

    def acknowledge(self) -> int: ...


class CpuPins:
    """The interrupt inputs of one vCPU."""

    __slots__ = ("_kick", "id", "init", "nmi", "sipi", "smi", "source")

    def __init__(self, vcpu_id: int, kick: Callable[[int], None] | None = None):
        self.id = vcpu_id
        self._kick = kick
        self.source: InterruptSource | None = None
        self.nmi = False
        self.init = False
        self.sipi: int | None = None
        self.smi = False

    def connect(self, kick: Callable[[int], None]) -> None:
        self._kick = kick

    def kick(self) -> None:
        """The pins changed: the machine looks at them at the next instruction boundary."""
        if self._kick is not None:
            self._kick(self.id)

    # -- maskable interrupts --------------------------------------------------
    @property
    def intr(self) -> bool:
        s = self.source
        return s is not None and s.intr

    def acknowledge(self) -> int:
        """The INTA cycle: the vector of the interrupt the CPU takes now."""
        if self.source is None:
            raise RuntimeError(f"vCPU {self.id}: INTA with nothing on the INTR pin")
        return self.source.acknowledge()

    # -- latched events -------------------------------------------------------
    def raise_nmi(self) -> None:
        self.nmi = True
        self.kick()

    def raise_init(self) -> None:
        self.init = True
        self.kick()

    def raise_sipi(self, vector: int) -> None:
        self.sipi = vector & 0xFF
        self.kick()

    def take_nmi(self) -> bool:
        n, self.nmi = self.nmi, False
        return n

    def take_init(self) -> bool:
        n, self.init = self.init, False
        return n

    def take_sipi(self) -> int | None:
        v, self.sipi = self.sipi, None
        return v

    @property
    def pending_event(self) -> bool:
        """Something that can wake a halted CPU regardless of IF (NMI, INIT, SIPI)."""
        return self.nmi or self.init or self.sipi is not None

    def save_state(self) -> dict[str, Any]:
        return {"kind": "cpu-pins", "version": 1, "nmi": self.nmi, "init": self.init,
                "sipi": -1 if self.sipi is None else self.sipi, "smi": self.smi}

    def load_state(self, st: dict[str, Any]) -> None:
        self.nmi = bool(st["nmi"])
        self.init = bool(st["init"])
        self.sipi = None if st["sipi"] < 0 else int(st["sipi"])
        self.smi = bool(st["smi"])


class LegacyIrqChip:
    """A PC without APICs: the 8259 pair's INTR is the BSP's INTR pin."""

    def __init__(self, pic: Any, pins: CpuPins):
        self.pic = pic
        self.pins = pins
        pins.source = pic
        pic.on_intr_change = self._changed

    def _changed(self, level: bool) -> None:
        self.pins.kick()
