"""PCI configuration mechanism #1 (ports 0xCF8/0xCFC) and the PCI bus behind it.

Implements PCI Local Bus Specification 3.0, 3.2.2.3.2 "Software Generation of
Configuration Transactions", configuration mechanism #1, as the 82441FX PMC
(the i440FX host bridge, datasheet "CONFADD"/"CONFDATA") decodes it:

* CONFIG_ADDRESS at 0xCF8 is a 32-bit register, latched only by a dword
  write at 0xCF8 and read back only by a dword read there.  Bit 31 enables
  configuration cycles; bits 23:16 bus, 15:11 device, 10:8 function, 7:2
  dword register.  Bits 30:24 are reserved and bits 1:0 are fixed at 00 for
  type 0/1 translation; both read 0.
* CONFIG_DATA at 0xCFC-0xCFF: while bit 31 is set, a byte, word or dword
  access there is a configuration access to register (bits 7:2) plus the
  port's low two bits, of the access's width.  Bus 0 is this bus (type 0,
  device and function decoded); any other bus number would be a type 1 cycle
  for a PCI-to-PCI bridge, and there are none, so it ends in master abort:
  reads all ones, writes dropped.  With bit 31 clear CONFIG_DATA is an
  ordinary I/O port nobody decodes (all ones).
* A function that is absent reads all ones (the master abort of 6.1: vendor
  id 0xFFFF means "no device").  Functions 1-7 of a slot exist only when
  function 0 is present and its header type has bit 7 (multi-function) set,
  which is how software discovers them (6.2.1); ``PciBus.attach`` refuses a
  layout that would contradict it.

Byte and word accesses to 0xCF8-0xCFB.  The datasheet has them "pass
through" CONFADD as ordinary I/O cycles, and the PIIX3 answers one of them:
its Reset Control Register at 0xCF9 (byte-wide).  Our IoBus maps each port
to one claim and refuses overlaps, and it splits an access that crosses
claims, so the two registers cannot be separate claims: a dword OUT to
0xCF8 would be split and its second byte would land in the reset register
(writing CONFIG_ADDRESS for function 4-7 of any device would reset the
machine).  The choice made here: ``ConfigMechanism1`` claims 0xCF8-0xCFB as
one range and hands every byte of a non-dword (or unaligned) access in it,
one byte at a time, to the ``narrow`` device given at construction when that
device's ``io_ranges`` cover the byte (the reset control register, which the
machine then must not register on the IoBus itself); other bytes read 0xFF
and writes to them are dropped, as for an unclaimed port.  QEMU gets the
same routing from a priority-1 overlap region at 0xCF9; unlike QEMU, a byte
read of 0xCF8 here is not the low byte of CONFIG_ADDRESS but open bus, as on
the chipset (Linux's mechanism #2 probe relies on neither: it runs only if
mechanism #1 is absent).

BAR mapping and INTx: the bus recomputes every function's BAR regions on
any change (function.py, ``remap_functions``), and connects each attached
function's ``intx`` output to the INTx router (the PIIX3), which maps the
function's slot and pin to a PIRQ line.
"""
from __future__ import annotations

from typing import Any, Protocol

from devices.base import SIZE_MASK, DeviceStateError, State, check_state
from devices.pci.function import PciFunction, remap_functions

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC
ENABLE = 1 << 31
ADDRESS_MASK = 0x80FF_FFFC      # bits 30:24 reserved, 1:0 fixed


class IntxRouter(Protocol):
    """What routes INTx: told each time an attached function's INTx output changes."""

    def pci_intx(self, slot: int, pin: int, devfn: int, level: bool) -> None: ...


class PciBus:
    """Bus 0: 32 device slots of 8 functions, each a ``PciFunction`` or absent."""

    SLOTS = 32
    FUNCTIONS = 8

    def __init__(self, name: str = "pci.0") -> None:
        self.name = name
        self._functions: dict[int, PciFunction] = {}     # devfn -> function
        self._router: IntxRouter | None = None

    # -- wiring -----------------------------------------------------------------------
    def attach(self, function: PciFunction, slot: int, fn: int = 0) -> PciFunction:
        """Put ``function`` at ``slot``.``fn`` (attach function 0 of a slot first)."""
        if not 0 <= slot < self.SLOTS or not 0 <= fn < self.FUNCTIONS:
            raise ValueError(f"{self.name}: no slot {slot} function {fn}")
        devfn = slot << 3 | fn
        if devfn in self._functions:
            raise ValueError(f"{self.name}: {slot:02x}.{fn} is taken by {self._functions[devfn].name}")
        if function.pci_bus is not None:
            raise ValueError(f"{function.name} is already on a PCI bus")
        if fn:
            f0 = self._functions.get(slot << 3)
            if f0 is None or not f0.multifunction:
                raise ValueError(f"{self.name}: {function.name} at {slot:02x}.{fn} needs a multi-function "
                                 f"function 0 in slot {slot:02x} first")
        elif not function.multifunction and any((slot << 3 | f) in self._functions for f in range(1, 8)):
            raise ValueError(f"{self.name}: {function.name} is single-function but slot {slot:02x} "
                             "has other functions")
        function.pci_bus = self
        function.devfn = devfn
        self._functions[devfn] = function
        function.intx.connect(lambda level, devfn=devfn: self._intx_changed(devfn, level))
        self.remap()
        return function

    def set_intx_router(self, router: IntxRouter) -> None:
        """The function that routes INTx (PIIX3); told at once of INTx already asserted."""
        self._router = router
        for devfn, f in self.functions():
            if f.intx.level:
                router.pci_intx(devfn >> 3, f.interrupt_pin, devfn, True)

    def _intx_changed(self, devfn: int, level: bool) -> None:
        if self._router is not None:
            f = self._functions[devfn]
            self._router.pci_intx(devfn >> 3, f.interrupt_pin, devfn, level)

    def function_at(self, slot: int, fn: int = 0) -> PciFunction | None:
        """The function software can reach at ``slot``.``fn`` (see the module doc), or None."""
        if not 0 <= slot < self.SLOTS or not 0 <= fn < self.FUNCTIONS:
            return None
        if fn:
            f0 = self._functions.get(slot << 3)
            if f0 is None or not f0.multifunction:
                return None
        return self._functions.get(slot << 3 | fn)

    def functions(self) -> list[tuple[int, PciFunction]]:
        """(devfn, function) in bus order."""
        return sorted(self._functions.items())

    def remap(self) -> None:
        """Recompute every attached function's BAR regions (function.py, ``remap_functions``)."""
        remap_functions([f for _, f in self.functions()])

    # -- configuration cycles ---------------------------------------------------------
    def config_read(self, bus: int, devfn: int, offset: int, size: int) -> int:
        """A configuration read; all ones for an absent function (master abort)."""
        f = self.function_at(devfn >> 3, devfn & 7) if bus == 0 else None
        if f is None:
            return SIZE_MASK[size]
        return f.config_read(offset, size)

    def config_write(self, bus: int, devfn: int, offset: int, size: int, value: int) -> None:
        f = self.function_at(devfn >> 3, devfn & 7) if bus == 0 else None
        if f is not None:
            f.config_write(offset, size, value & SIZE_MASK[size])


class ConfigMechanism1:
    """CONFIG_ADDRESS (0xCF8, dword) and CONFIG_DATA (0xCFC-0xCFF) of the host bridge.

    ``narrow`` is the port device that answers byte/word accesses inside
    0xCF8-0xCFB (the PIIX3 reset control register at 0xCF9); see the module doc.
    """

    kind = "pci_config"
    VERSION = 1

    def __init__(self, bus: PciBus, narrow: Any = None, name: str = "pci-config") -> None:
        self.name = name
        self.bus = bus
        self.narrow = narrow
        self.io_ranges: list[tuple[int, int]] = [(CONFIG_ADDRESS, 4), (CONFIG_DATA, 4)]
        self.address = 0

    def reset(self) -> None:
        self.address = 0

    # -- port I/O -------------------------------------------------------------------------
    def io_read(self, port: int, size: int) -> int:
        if port == CONFIG_ADDRESS and size == 4:
            return self.address
        if CONFIG_DATA <= port and port + size <= CONFIG_DATA + 4:
            return self._data_read(port, size)
        value = 0
        for i in range(size):
            value |= self._byte_read(port + i) << (8 * i)
        return value

    def io_write(self, port: int, size: int, value: int) -> None:
        if port == CONFIG_ADDRESS and size == 4:
            self.address = value & ADDRESS_MASK
            return
        if CONFIG_DATA <= port and port + size <= CONFIG_DATA + 4:
            self._data_write(port, size, value & SIZE_MASK[size])
            return
        for i in range(size):
            self._byte_write(port + i, (value >> (8 * i)) & 0xFF)

    def _byte_read(self, port: int) -> int:
        if CONFIG_DATA <= port < CONFIG_DATA + 4:
            return self._data_read(port, 1)
        if CONFIG_ADDRESS <= port < CONFIG_DATA and self._narrow_decodes(port):
            return self.narrow.io_read(port, 1) & 0xFF
        return 0xFF

    def _byte_write(self, port: int, value: int) -> None:
        if CONFIG_DATA <= port < CONFIG_DATA + 4:
            self._data_write(port, 1, value)
        elif CONFIG_ADDRESS <= port < CONFIG_DATA and self._narrow_decodes(port):
            self.narrow.io_write(port, 1, value)

    def _narrow_decodes(self, port: int) -> bool:
        return self.narrow is not None and any(b <= port < b + n for b, n in self.narrow.io_ranges)

    def _target(self) -> tuple[int, int, int] | None:
        a = self.address
        if not a & ENABLE:
            return None
        return (a >> 16) & 0xFF, (a >> 8) & 0xFF, a & 0xFC

    def _data_read(self, port: int, size: int) -> int:
        t = self._target()
        if t is None:
            return SIZE_MASK[size]
        bus, devfn, reg = t
        return self.bus.config_read(bus, devfn, reg + (port & 3), size)

    def _data_write(self, port: int, size: int, value: int) -> None:
        t = self._target()
        if t is not None:
            bus, devfn, reg = t
            self.bus.config_write(bus, devfn, reg + (port & 3), size, value)

    # -- state ------------------------------------------------------------------------------
    def save_state(self) -> State:
        return {"kind": self.kind, "version": self.VERSION, "address": self.address}

    def load_state(self, state: State) -> None:
        check_state(state, self.kind, self.VERSION)
        a = state.get("address")
        if not isinstance(a, int) or isinstance(a, bool) or not 0 <= a <= 0xFFFF_FFFF or a & ~ADDRESS_MASK:
            raise DeviceStateError(f"{self.kind}: address {a!r} is not a CONFIG_ADDRESS value")
        self.address = a
