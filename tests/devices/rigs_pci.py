"""Conformance rigs for the PCI devices, and a small test-only PCI function.

The rig's device is configuration mechanism #1; its peers are the i440FX and
PIIX3 functions and two ``ToyFunction``s whose INTx pins share one PIRQ, so
save/restore covers configuration spaces, BAR mappings on the rig's own
buses and the PIIX3's wired-OR state.  Host operations drive what a guest
would reach only after many port writes: select a register, program BARs
and routing as firmware would, touch BAR regions, raise and lower INTx.

``Rig`` comes from test_conformance, which imports this module while it is
itself being imported; it is looked up only when a rig is built, so the
import order does not matter.
"""
from __future__ import annotations

import sys
from typing import Any

from devices.base import DeviceStateError, State, check_state
from devices.bus import IoBus, MmioBus
from devices.clock import VirtualClock
from devices.pci.config import ENABLE, ConfigMechanism1, PciBus
from devices.pci.function import COMMAND, PciFunction
from devices.pci.i440fx import I440fx
from devices.pci.piix3 import Piix3


class RegisterFile:
    """A BAR's server: plain bytes at any width.  Offset 0 is a doorbell: bit 0 of a
    byte written there is the function's INTx level."""

    def __init__(self, size: int, owner: PciFunction | None = None) -> None:
        self.mem = bytearray(size)
        self.owner = owner
        self.name = "regs"

    def mmio_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.mem[offset:offset + size].ljust(size, b"\xff"), "little")

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        data = value.to_bytes(size, "little")[:max(0, len(self.mem) - offset)]
        self.mem[offset:offset + len(data)] = data
        if offset == 0 and self.owner is not None:
            self.owner.set_irq(bool(value & 1))

    io_read = mmio_read
    io_write = mmio_write


class ToyFunction(PciFunction):
    """Test-only: an I/O BAR 0 (32 bytes, doorbell at 0), a 32-bit memory BAR 1 (4 KiB),
    a 64-bit prefetchable BAR 2 (16 KiB), a 2 KiB ROM and a vendor capability."""

    kind = "toy_pci"
    VERSION = 1

    def __init__(self, io_bus: Any, mmio_bus: Any, name: str = "toy", pin: int = 1,
                 device_id: int = 0x0001, multifunction: bool = False) -> None:
        super().__init__(name=name, vendor_id=0x1234, device_id=device_id, class_code=0xFF0000,
                         revision=0x05, subsystem_vendor_id=0x1234, subsystem_id=0x5678,
                         interrupt_pin=pin, multifunction=multifunction, io_bus=io_bus, mmio_bus=mmio_bus)
        self.io_regs = RegisterFile(32, self)
        self.mem_regs = RegisterFile(4096)
        self.mem64_regs = RegisterFile(16384)
        self.rom = RegisterFile(2048)
        self.rom.mem[:4] = b"\x55\xaa\x04\x00"
        self.add_bar(0, 32, self.io_regs, io=True)
        self.add_bar(1, 4096, self.mem_regs)
        self.add_bar(2, 16384, self.mem64_regs, mem64=True, prefetchable=True)
        self.set_rom(2048, self.rom)
        self.cap = self.add_capability(0x09, 4, data=b"\x04\x00", wmask=b"\x00\xff")

    def save_state(self) -> State:
        state = super().save_state()
        state.update(io=bytes(self.io_regs.mem), mem=bytes(self.mem_regs.mem),
                     mem64=bytes(self.mem64_regs.mem))
        return state

    def load_state(self, state: State) -> None:
        check_state(state, self.kind, self.VERSION)
        pci = self.parse_pci_state(state)
        regs = {}
        for key, rf in (("io", self.io_regs), ("mem", self.mem_regs), ("mem64", self.mem64_regs)):
            v = state.get(key)
            if not isinstance(v, bytes) or len(v) != len(rf.mem):
                raise DeviceStateError(f"{self.kind}: {key} must be {len(rf.mem)} bytes")
            regs[key] = v
        self.apply_pci_state(pci)
        self.io_regs.mem[:] = regs["io"]
        self.mem_regs.mem[:] = regs["mem"]
        self.mem64_regs.mem[:] = regs["mem64"]


class ResetControlProbe:
    """Stands in for the PIIX3 reset control register at 0xCF9 (narrow accesses only)."""

    name = "rcr"

    def __init__(self, record: Any = None) -> None:
        self.io_ranges = [(0xCF9, 1)]
        self.record = record
        self.writes: list[int] = []

    def io_read(self, port: int, size: int) -> int:
        return 0x02

    def io_write(self, port: int, size: int, value: int) -> None:
        self.writes.append(value)
        if self.record is not None:
            self.record(port, value)


def _rig_class() -> type:
    for name in ("test_conformance", "tests.devices.test_conformance"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "Rig"):
            return mod.Rig
    from tests.devices.test_conformance import Rig
    return Rig


# devfns the "select" operation aims at: the host bridge, the ISA bridge, the toys
# (slots 3 and 4), an absent slot and an absent function of the ISA bridge
SELECTABLE = (0 << 3, 1 << 3, 3 << 3, 4 << 3, 9 << 3, 1 << 3 | 5)


def rig_pci(clock: VirtualClock) -> Any:
    r = _rig_class()(clock, None)
    io, mmio = IoBus(), MmioBus()
    lines = [r.line(f"isa{n}") for n in range(16)]
    pci = PciBus()
    conf = ConfigMechanism1(pci, narrow=ResetControlProbe(r.record("rcr")))
    host = pci.attach(I440fx(), 0)
    piix3 = Piix3(lambda n: lines[n])
    pci.attach(piix3, 1)
    pci.set_intx_router(piix3)
    # slot 3 INTA# and slot 4 INTD# both reach PIRQC (wired-OR)
    toys = [pci.attach(ToyFunction(io, mmio, "toy_a", pin=1), 3),
            pci.attach(ToyFunction(io, mmio, "toy_b", pin=4, device_id=2), 4)]
    r.dev = conf
    r.peers = [host, piix3, *toys]

    def cfg_write(devfn: int, reg: int, size: int, value: int) -> None:
        conf.io_write(0xCF8, 4, ENABLE | devfn << 8 | (reg & 0xFC))
        conf.io_write(0xCFC + (reg & 3), size, value)

    def select(n: int, b: int) -> None:
        conf.io_write(0xCF8, 4, ENABLE | SELECTABLE[n % len(SELECTABLE)] << 8 | (b & 0xFC))

    def program(n: int, b: int) -> None:
        """Firmware-like set-up of one toy (addresses from n and b, so they can collide)."""
        devfn = (3 + n % 2) << 3
        cfg_write(devfn, 0x10, 4, 0xC000 + 0x20 * (b % 4))
        cfg_write(devfn, 0x14, 4, 0xFEB0_0000 + 0x1000 * (b % 3))
        cfg_write(devfn, 0x18, 4, 0xFEC1_0000 if n & 4 else 0)
        cfg_write(devfn, 0x1C, 4, 0 if n & 4 else 1)
        cfg_write(devfn, 0x30, 4, 0xFEB8_0001 + 0x800 * (b & 1))
        cfg_write(devfn, COMMAND, 2, 0x0003 | (0x400 if n & 8 else 0))
        if n & 16:
            cfg_write(1 << 3, 0x60 + (b >> 2) % 4, 1, b & 0x8F)

    def touch(n: int, b: int) -> None:
        toy = toys[n % 2]
        which = (n >> 1) % 4
        base = toy.bar_address((0, 1, 2, 6)[which])
        bus = io if which == 0 else mmio
        if base is None:
            r.log.append((clock.now(), "unmapped", toy.name, which))
            program(n, b)
        elif n & 8:
            bus.write(base + (0 if n & 16 else b & 7), 1, b)   # offset 0: the doorbell
        else:
            r.log.append((clock.now(), "read", toy.name, which, bus.read(base + (b & 7), 4)))

    # as firmware leaves it: PIRQA-D on IRQ 10, 10, 11, 11 (SeaBIOS's choice), toy_a
    # decoding at its addresses, toy_b programmed but with decode off
    for p, irq in enumerate((10, 10, 11, 11)):
        cfg_write(1 << 3, 0x60 + p, 1, irq)
    program(0, 0)
    program(1, 1)
    cfg_write(4 << 3, COMMAND, 2, 0)
    # port traffic at 0xCFC-0xCFF then lands in toy_a's command and status registers
    # until a dword write to 0xCF8 selects something else
    select(2, COMMAND)
    r.log.clear()

    r.host_ops = {
        "select": select,
        "program": program,
        "touch": touch,
        "irq": lambda n, b: toys[n % 2].set_irq(bool(b & 1)),
    }
    return r


RIGS = {"pci_config": rig_pci}
CLASS_OF = {"pci_config": ConfigMechanism1}
