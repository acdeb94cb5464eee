"""The Device protocol, interrupt lines and the small types devices share.

A device implements the methods of ``Device`` that apply to it; port-I/O
devices get absolute port numbers (a device may answer several ranges, as the
8259 pair at 0x20/0xA0 and its ELCR at 0x4D0 do), MMIO devices get the offset
inside the region they were mapped at (BARs move, ports do not).

Widths: a device may declare the access widths it implements, ``io_sizes``
(subset of 1, 2, 4) and ``mmio_sizes`` (subset of 1, 2, 4, 8); the bus
(devices/bus.py) then only ever calls it with naturally aligned accesses of
those widths, splitting or widening the guest's access itself.  Without the
declaration a device gets every access as the guest made it.

vCPU ids: every bus access carries the id of the vCPU that made it; a device
that needs it (per-CPU registers, as the local APIC has) sets
``wants_vcpu = True`` and receives it as one more, last, argument of
``io_read``/``io_write``/``mmio_read``/``mmio_write``.

DMA: a device that reads or writes guest memory is given a ``Dma`` view
(vmm/memory/dma.py) at construction; it raises ``DmaError`` for anything
outside RAM, before any byte moves.

Interrupts: devices drive ``IrqLine`` wires; only interrupt controllers talk
to CPUs, through ``CpuPins`` (devices/irqchip.py).

Time: only the machine's ``VirtualClock`` (devices/clock.py); a timer's
name is a stable id (``"pit.ch0"``), unique in the machine.

State is plain data: ``save_state()`` returns a dict of ints, bools, strings,
bytes, lists and dicts (never a live object) carrying a ``"version"`` key;
``load_state()`` restores it, raises no interrupt and touches no other device.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NewType, Protocol, runtime_checkable

Port = NewType("Port", int)
GuestPhysAddr = NewType("GuestPhysAddr", int)
GuestVirtAddr = NewType("GuestVirtAddr", int)

State = dict[str, Any]

SIZE_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


class DmaError(ValueError):
    """A DMA transfer that would touch memory outside the guest's RAM (raised by
    the machine's DMA view, vmm/memory/dma.py, before any byte moves)."""

    def __init__(self, gpa: int, length: int, why: str):
        super().__init__(f"DMA {why} at guest-physical {gpa:#x}+{length:#x}")
        self.gpa = gpa
        self.length = length


class Dma(Protocol):
    """What a DMA-capable device is given: guest-physical reads and writes that
    raise DmaError for anything but RAM."""

    def read(self, gpa: int, n: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...

    def read_u32(self, gpa: int) -> int: ...

    def write_u32(self, gpa: int, v: int) -> None: ...


class DeviceStateError(ValueError):
    """A saved device state that cannot be loaded (wrong version or shape)."""


def check_state(state: State, kind: str, version: int) -> None:
    """Raise DeviceStateError unless ``state`` is a dict of this kind and version."""
    if not isinstance(state, dict):
        raise DeviceStateError(f"{kind}: state must be a dict, not {type(state).__name__}")
    if state.get("kind") != kind:
        raise DeviceStateError(f"{kind}: state is for {state.get('kind')!r}")
    if state.get("version") != version:
        raise DeviceStateError(
            f"{kind}: state version {state.get('version')!r} is not supported (expected {version})"
        )


@runtime_checkable
class Device(Protocol):
    """What every device offers; unused access kinds may simply not be defined."""

    name: str

    def reset(self) -> None: ...

    def save_state(self) -> State: ...

    def load_state(self, state: State) -> None: ...


class PortDevice(Device, Protocol):
    def io_read(self, port: int, size: int) -> int: ...

    def io_write(self, port: int, size: int, value: int) -> None: ...


class MmioDevice(Device, Protocol):
    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None: ...


class IrqLine:
    """One interrupt request wire from a device to an interrupt controller input.

    The device drives it with ``raise_()``, ``lower()``, ``set(level)`` or
    ``pulse()`` (an edge: up then down).  The controller end is a callable
    ``sink(level: bool)``, connected by the machine.  Until connected the line
    only remembers its level, so devices can be unit-tested on their own.
    """

    __slots__ = ("_sink", "edges", "level", "name")

    def __init__(self, name: str = "irq", sink: Callable[[bool], None] | None = None):
        self.name = name
        self.level = False
        self._sink = sink
        self.edges = 0  # rising edges seen: tests and statistics

    def connect(self, sink: Callable[[bool], None]) -> None:
        self._sink = sink
        if self.level:
            sink(True)

    def set(self, level: bool) -> None:
        level = bool(level)
        if level == self.level:
            return
        self.level = level
        if level:
            self.edges += 1
        if self._sink is not None:
            self._sink(level)

    def raise_(self) -> None:
        self.set(True)

    def lower(self) -> None:
        self.set(False)

    def pulse(self) -> None:
        self.set(True)
        self.set(False)


class IrqOr:
    """Several interrupt wires joined into one (a shared ISA IRQ line, a PCI PIRQ):
    the output is asserted while any input is.  ``input(name)`` makes a new input
    wire; ``sinks`` are called with the output level whenever it changes."""

    __slots__ = ("_inputs", "level", "name", "sinks")

    def __init__(self, name: str = "irq-or", sinks: list[Callable[[bool], None]] | None = None):
        self.name = name
        self.sinks = list(sinks or [])
        self._inputs: list[IrqLine] = []
        self.level = False

    def input(self, name: str | None = None) -> IrqLine:
        line = IrqLine(name or f"{self.name}.in{len(self._inputs)}")
        self._inputs.append(line)
        line.connect(lambda _level: self._update())
        return line

    def _update(self) -> None:
        level = any(i.level for i in self._inputs)
        if level != self.level:
            self.level = level
            for s in self.sinks:
                s(level)

    def save_state(self) -> list[bool]:
        """The input wires' levels (the wiring is the board's, the levels are state)."""
        return [i.level for i in self._inputs]

    def load_state(self, levels: list[bool]) -> None:
        """Put the levels back without telling anyone (the receivers restore their own state)."""
        if not isinstance(levels, list) or len(levels) != len(self._inputs):
            raise DeviceStateError(f"{self.name}: {len(self._inputs)} input levels expected")
        for line, level in zip(self._inputs, levels):
            line.level = bool(level)
        self.level = any(i.level for i in self._inputs)
