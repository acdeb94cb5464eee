"""Virtio devices on the PC board's PCI bus.

``attach_virtio(machine, device, slot)`` puts any ``VirtioDevice`` (devices/
virtio) on ``machine.pci`` as a transitional virtio PCI function with its own
DMA view, registers it for reset and saved state (under its name), and
returns the function; INTx reaches the PIIX3's PIRQ routing through the bus,
MSI-X messages the local APICs through the board's APIC bus.
``attach_virtio_blk(machine, block, slot)`` does it for a disk: ``block`` is
any object with ``read(offset, n)``, ``write(offset, data)``, ``flush()`` and
``size`` (host/images ``BlockImage`` and its linked clones are such).
"""
from __future__ import annotations

from typing import Any

from devices.virtio.blk import VirtioBlk
from devices.virtio.device import VirtioDevice
from devices.virtio.pci import VirtioPciFunction
from vmm.memory.dma import DmaView


def _next_name(machine: Any, prefix: str) -> str:
    taken = {getattr(d, "name", "") for d in machine.devices}
    n = 0
    while f"{prefix}{n}" in taken:
        n += 1
    return f"{prefix}{n}"


def attach_virtio(machine: Any, device: VirtioDevice, slot: int, *, transitional: bool = True) -> VirtioPciFunction:
    """Attach ``device`` at PCI ``slot`` (function 0) of ``machine`` and return its PCI function."""
    pci = getattr(machine, "pci", None)
    if pci is None:
        raise ValueError(f"{device.name}: this machine has no PCI bus (virtio needs the pc-2 board)")
    apic_bus = getattr(machine, "apic_bus", None)
    fn = VirtioPciFunction(device, io_bus=machine.io, mmio_bus=machine.mmio,
                           dma=DmaView(machine.ept, device.name), clock=machine.clock, transitional=transitional,
                           msi=apic_bus.send_msi if apic_bus is not None else None)
    pci.attach(fn, slot)
    machine.add_device(fn)
    return fn


def attach_virtio_blk(machine: Any, block: Any, slot: int, *, name: str | None = None, serial: str = "",
                      read_only: bool | None = None) -> VirtioPciFunction:
    """A virtio-blk disk over ``block`` at PCI ``slot``; named virtio-blk0, -blk1, ... unless ``name``."""
    # immediate service (devices/virtio/blk.py): a request completes inside its notification,
    # which spares the guest a timer, an interrupt-window and often a HLT exit per request
    dev = VirtioBlk(block, name=name or _next_name(machine, "virtio-blk"), serial=serial, read_only=read_only,
                    timed=False)
    return attach_virtio(machine, dev, slot)
