"""The Device protocol, interrupt lines and the small types devices share.

A device implements the methods of ``Device`` that apply to it; port-I/O
devices get absolute port numbers (a device may answer several ranges, as the
8259 pair at 0x20/0xA0 and its ELCR at 0x4D0 do), MMIO devices get the offset
inside the region they were mapped at (BARs move, ports do not).

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
