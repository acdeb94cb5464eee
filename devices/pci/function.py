"""A PCI function: the type 0 configuration header, BARs, capabilities, INTx.

Implements, from the PCI Local Bus Specification, revision 3.0 ("PCI LB 3.0"):

* 6.1 "Configuration Space Organization": 256 bytes, the first 64 a
  predefined header; reserved and unimplemented registers read 0 and ignore
  writes.  Every byte here has a write mask (bits software may change) and
  a write-1-to-clear mask; all other bits are read-only and keep the value
  the function was built with.
* 6.2.1 "Device Identification": vendor, device, revision, class code,
  header type (bit 7: multi-function device), subsystem vendor and subsystem
  ids.  All read-only.
* 6.2.2 "Device Control": the command register.  Writable by default: I/O
  space (bit 0), memory space (1), bus master (2), SERR# enable (8) and
  interrupt disable (10); the rest read 0, as the spec allows for functions
  that do not implement them.
* 6.2.3 "Device Status": interrupt status (bit 3, read-only, the function's
  own INTx state before the interrupt-disable gate), capabilities list (4),
  and the error bits 8, 11-15, which are write-1-to-clear.
* 6.2.4 "Miscellaneous Registers": cache line size (read/write storage),
  latency timer, BIST (0: no built-in self test), interrupt line (read/write
  storage for software) and interrupt pin (read-only; 0 = none, 1-4 =
  INTA#-INTD#).  The latency timer reads 0 and ignores writes, as QEMU's
  functions do; the spec lets a function hardwire it, and a bus that is not
  clocked has nothing for it to time.
* 6.2.5.1 "Address Maps": six BARs.  An I/O BAR has bit 0 set; a memory BAR
  has bits 2:1 = 00 (32-bit) or 10 (64-bit, taking the next BAR for the
  upper half) and bit 3 = prefetchable.  The address bits below the size are
  read-only 0, so writing all ones and reading back gives the size mask
  (the sizing protocol of 6.2.5.1).  Sizes are powers of two: at least 4
  bytes and at most 256 for I/O (the spec's limit per I/O BAR), at least 16
  for memory.
* 6.2.5.2 "Expansion ROM Base Address Register": absent reads 0; present,
  bit 0 enables decode and bits 31:11 hold the address.
* 6.7 "Capabilities List": status bit 4, the pointer at 0x34, and a linked
  list of dword-aligned entries in the device-specific area; ``add_capability``
  appends one (MSI-X: devices/pci/msix.py; MSI, PCI power management and vendor
  capabilities come later).
* 2.2.6 "Interrupt Pins" and 6.8.x: INTx is level sensitive, active while the
  function asserts it and the command register's interrupt-disable bit is 0.

BAR decode (which guest addresses reach the function) follows what QEMU's
``pci_bar_address`` decides, since guests written against QEMU rely on it:

* an I/O BAR decodes while command bit 0 is set, a memory BAR (and the ROM,
  which also needs its enable bit) while command bit 1 is set;
* an address of 0 does not decode, nor does a region that reaches the top of
  its address space, which is where the all-ones sizing pattern lands (for a
  32-bit memory BAR, anything touching 0xFFFFFFFF);
* an I/O BAR above 0xFFFF is never reachable: x86 has 64 KiB of ports.

Regions on the machine's buses.  A function is built with the machine's
``IoBus`` and ``MmioBus``; each BAR names the object that serves it
(``io_read(offset, size)``/``io_write(offset, size, value)`` for I/O,
``mmio_read``/``mmio_write`` for memory, with ``io_sizes``/``mmio_sizes``
and ``wants_vcpu`` honoured as for any device).  Offsets are from the BAR's
base for both kinds, because a BAR moves (for I/O this differs from a fixed
port device, which sees absolute ports).  A BAR's region is on its bus
exactly while it decodes.

Overlapping BARs.  Hardware with two functions decoding the same address is
broken; the buses here refuse overlapping claims.  The mapped set is
therefore a pure function of every function's configuration space: walking
functions in bus order (device, function) and BARs in index order, a BAR is
mapped unless an earlier one already holds part of its range (QEMU shows the
later of two overlapping BARs instead; either is a guest bug, ours does not
depend on history).  A BAR that collides with a fixed device's claim stays
off the bus and is counted in ``map_refusals``.  Every change to a BAR or
the command register recomputes the whole bus's mapping, unmapping first and
then mapping, so two BARs can swap addresses.

Save/restore.  ``save_state`` gives the configuration space and the INTx
level; ``load_state`` checks that every read-only bit matches this function
(a state for a different device or a different BAR layout is refused), then
recomputes the mapping as above.  Because the mapping depends only on the
restored configuration spaces, functions may be restored in any order: one
restored first may evict (or wait behind) a stale mapping of one restored
later, and once all are restored the buses hold exactly what the saved
machine held.  Loading never drives a line: the INTx output level is set
silently, and the INTx router (PIIX3) restores its own view.

Subclassing.  A device calls ``super().__init__`` with its identity, then
``add_bar``/``set_rom``/``define_register``/``add_capability`` while it is
being built; it calls ``set_irq(level)`` to drive INTx; it may override
``config_written(offset, size)`` to react to configuration writes.  A
device with more state than the configuration space extends ``save_state``
and builds ``load_state`` from ``parse_pci_state`` (checks only) and
``apply_pci_state`` (changes), so a refused state changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from devices.base import DeviceStateError, IrqLine, State, check_state
from devices.bus import BusError

# Header offsets (PCI LB 3.0, figure 6-1).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09           # 3 bytes: programming interface, sub-class, base class
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BAR0 = 0x10
CARDBUS_CIS = 0x28
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
HEADER_SIZE = 0x40
CONFIG_SIZE = 0x100

# Command register (6.2.2).
CMD_IO = 1 << 0
CMD_MEMORY = 1 << 1
CMD_MASTER = 1 << 2
CMD_SPECIAL_CYCLES = 1 << 3
CMD_PARITY = 1 << 6
CMD_SERR = 1 << 8
CMD_INTX_DISABLE = 1 << 10

# Status register (6.2.3).
ST_INTERRUPT = 1 << 3
ST_CAP_LIST = 1 << 4
ST_FAST_BACK_TO_BACK = 1 << 7
ST_DEVSEL_MEDIUM = 1 << 9
ST_ERRORS_W1C = 0xF900      # parity/target-abort/master-abort/SERR/detected-parity bits

HEADER_MULTI_FUNCTION = 0x80

BAR_IO = 0x01
BAR_MEM_64 = 0x04
BAR_MEM_PREFETCH = 0x08
ROM_ENABLE = 0x01
ROM_INDEX = 6               # the expansion ROM, after BARs 0-5
ROM_MIN_SIZE = 0x800        # address bits 31:11 (6.2.5.2)

VENDOR_INTEL = 0x8086

# Subsystem ids QEMU gives every PCI function that names none (PCI vendor 1af4,
# "Red Hat, Inc.", subsystem 1100 "QEMU Virtual Machine").
QEMU_SUBSYSTEM_VENDOR_ID = 0x1AF4
QEMU_SUBSYSTEM_ID = 0x1100

_IO_LIMIT = 0x10000
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class Bar:
    """One base address register (or the expansion ROM, index 6) and what serves it."""

    index: int
    size: int
    io: bool
    mem64: bool
    prefetchable: bool
    server: Any

    @property
    def offset(self) -> int:
        return ROM_ADDRESS if self.index == ROM_INDEX else BAR0 + 4 * self.index

    @property
    def flags(self) -> int:
        """The read-only low bits the BAR reads with (6.2.5.1)."""
        if self.index == ROM_INDEX:
            return 0
        if self.io:
            return BAR_IO
        return (BAR_MEM_64 if self.mem64 else 0) | (BAR_MEM_PREFETCH if self.prefetchable else 0)

    @property
    def space(self) -> str:
        return "io" if self.io else "mem"


class _IoWindow:
    """What an I/O BAR registers on the IoBus: absolute ports in, BAR offsets out."""

    def __init__(self, server: Any, base: int, name: str) -> None:
        self.name = name
        self.base = base
        self.server = server
        sizes = getattr(server, "io_sizes", None)
        if sizes is not None:
            self.io_sizes = sizes
        self.wants_vcpu = bool(getattr(server, "wants_vcpu", False))

    def io_read(self, port: int, size: int, *vcpu: int) -> int:
        return self.server.io_read(port - self.base, size, *vcpu)

    def io_write(self, port: int, size: int, value: int, *vcpu: int) -> None:
        self.server.io_write(port - self.base, size, value, *vcpu)


@dataclass(frozen=True)
class PciState:
    """A checked configuration space and INTx level, ready for ``apply_pci_state``."""

    config: bytes
    intx: bool


def remap_functions(functions: list[PciFunction]) -> None:
    """Put on the buses exactly the BAR regions that decode, earlier functions first.

    ``functions`` is in bus order.  A region overlapping one already taken in
    this pass (same address space) stays off; everything no longer wanted, or
    wanted elsewhere, is unmapped before anything is mapped.
    """
    taken: dict[str, list[tuple[int, int]]] = {"io": [], "mem": []}
    want: list[tuple[int, int, int]] = []          # (position, bar index, base)
    wanted: dict[tuple[int, int], int] = {}
    for pos, f in enumerate(functions):
        for bar, base in f.decoded_bars():
            end = base + bar.size
            if any(base < e and b < end for b, e in taken[bar.space]):
                continue
            taken[bar.space].append((base, end))
            want.append((pos, bar.index, base))
            wanted[(pos, bar.index)] = base
    for pos, f in enumerate(functions):
        for index, m in enumerate(f._mapped):
            if m is not None and wanted.get((pos, index)) != m[0]:
                f._unmap(index)
    for pos, index, base in want:
        f = functions[pos]
        if f._mapped[index] is None:
            f._map(index, base)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class PciFunction:
    """One PCI function with a type 0 header; real devices subclass it.

    ``io_bus``/``mmio_bus`` are the machine's buses (needed only for BARs of
    that kind).  ``intx`` is the function's INTA#-INTD# output; the PCI bus
    connects it to the INTx router when the function is attached.
    """

    kind = "pci_function"
    VERSION = 1

    def __init__(self, *, name: str, vendor_id: int, device_id: int, class_code: int, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0, interrupt_pin: int = 0,
                 multifunction: bool = False, io_bus: Any = None, mmio_bus: Any = None) -> None:
        if not 0 <= interrupt_pin <= 4:
            raise ValueError(f"{name}: interrupt pin {interrupt_pin} is not 0 (none) or 1-4 (INTA#-INTD#)")
        if vendor_id in (0xFFFF, 0):
            raise ValueError(f"{name}: vendor id {vendor_id:#06x} means 'no device'")
        self.name = name
        self.io_bus = io_bus
        self.mmio_bus = mmio_bus
        self.config = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.w1cmask = bytearray(CONFIG_SIZE)
        # bits the function itself changes (not software, not read-only): the
        # status register's interrupt bit, plus whatever a subclass adds
        self.hwmask = bytearray(CONFIG_SIZE)
        self._reset_config = bytearray(CONFIG_SIZE)
        self._used = bytearray(CONFIG_SIZE)            # device-specific bytes already defined
        self._used[:HEADER_SIZE] = b"\x01" * HEADER_SIZE
        self.bars: list[Bar | None] = [None] * 7
        self._mapped: list[tuple[int, Any] | None] = [None] * 7   # (base, object registered on the bus)
        self.map_refusals = 0                           # BARs a fixed device's claim kept off the bus
        self.intx = IrqLine(f"{name}.intx")
        self._intx_level = False
        self.pci_bus: Any = None                        # set by PciBus.attach
        self.devfn: int | None = None

        self.define_register(VENDOR_ID, 2, vendor_id)
        self.define_register(DEVICE_ID, 2, device_id)
        self.define_register(COMMAND, 2, 0,
                             wmask=CMD_IO | CMD_MEMORY | CMD_MASTER | CMD_SERR | CMD_INTX_DISABLE)
        self.define_register(STATUS, 2, 0, w1c=ST_ERRORS_W1C)
        self.hwmask[STATUS] |= ST_INTERRUPT
        self.define_register(REVISION_ID, 1, revision)
        self.define_register(CLASS_CODE, 3, class_code)
        self.define_register(CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
        self.define_register(HEADER_TYPE, 1, HEADER_MULTI_FUNCTION if multifunction else 0)
        self.define_register(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self.define_register(SUBSYSTEM_ID, 2, subsystem_id)
        self.define_register(INTERRUPT_LINE, 1, 0, wmask=0xFF)
        self.define_register(INTERRUPT_PIN, 1, interrupt_pin)

    # -- building (subclass constructors) ------------------------------------------
    def define_register(self, offset: int, size: int, reset: int, wmask: int = 0, w1c: int = 0) -> None:
        """Give ``size`` bytes at ``offset`` their reset value and write masks.

        Header registers may be redefined (a bridge hardwires its command
        bits); a device-specific byte (0x40 and up) is defined once.
        """
        if size < 1 or offset < 0 or offset + size > CONFIG_SIZE:
            raise ValueError(f"{self.name}: register {offset:#x}+{size} is outside the configuration space")
        if wmask & w1c:
            raise ValueError(f"{self.name}: register {offset:#x} has bits both writable and write-1-to-clear")
        for i in range(size):
            o = offset + i
            if o >= HEADER_SIZE:
                if self._used[o]:
                    raise ValueError(f"{self.name}: configuration byte {o:#x} is already defined")
                self._used[o] = 1
            self._reset_config[o] = self.config[o] = (reset >> (8 * i)) & 0xFF
            self.wmask[o] = (wmask >> (8 * i)) & 0xFF
            self.w1cmask[o] = (w1c >> (8 * i)) & 0xFF

    def add_bar(self, index: int, size: int, server: Any, *, io: bool = False, mem64: bool = False,
                prefetchable: bool = False) -> Bar:
        """Declare BAR ``index`` (a 64-bit memory BAR also takes ``index + 1``)."""
        if not 0 <= index <= 5 or (mem64 and index == 5):
            raise ValueError(f"{self.name}: no BAR {index}" + (" for a 64-bit BAR" if mem64 else ""))
        if size <= 0 or size & (size - 1):
            raise ValueError(f"{self.name}: BAR {index} size {size:#x} is not a power of two")
        if io and (mem64 or prefetchable):
            raise ValueError(f"{self.name}: an I/O BAR is neither 64-bit nor prefetchable")
        if io and not 4 <= size <= 256:
            raise ValueError(f"{self.name}: I/O BAR {index} must be 4..256 bytes (PCI LB 3.0 6.2.5.1)")
        if not io and (size < 16 or size > (1 << 47 if mem64 else 1 << 31)):
            raise ValueError(f"{self.name}: memory BAR {index} size {size:#x} is out of range")
        if io and self.io_bus is None or not io and self.mmio_bus is None:
            raise ValueError(f"{self.name}: BAR {index} needs the machine's {'I/O' if io else 'MMIO'} bus")
        needed = ("io_read", "io_write") if io else ("mmio_read", "mmio_write")
        if not all(callable(getattr(server, m, None)) for m in needed):
            raise ValueError(f"{self.name}: BAR {index}'s server lacks {' or '.join(needed)}")
        slots = (index, index + 1) if mem64 else (index,)
        if any(self.bars[i] is not None or self._is_upper_half(i) for i in slots):
            raise ValueError(f"{self.name}: BAR {index} is already declared")
        bar = Bar(index, size, io, mem64, prefetchable, server)
        self.bars[index] = bar
        wmask = ~(size - 1) & (_U64 if mem64 else _U32)
        self.define_register(bar.offset, 4, bar.flags, wmask=wmask & _U32)
        if mem64:
            self.define_register(bar.offset + 4, 4, 0, wmask=wmask >> 32)
        return bar

    def set_rom(self, size: int, server: Any) -> Bar:
        """Give the function an expansion ROM of ``size`` bytes served by ``server``."""
        if size < ROM_MIN_SIZE or size & (size - 1) or size > 1 << 24:
            raise ValueError(f"{self.name}: ROM size {size:#x} must be a power of two, 2 KiB to 16 MiB")
        if self.mmio_bus is None:
            raise ValueError(f"{self.name}: a ROM needs the machine's MMIO bus")
        if not all(callable(getattr(server, m, None)) for m in ("mmio_read", "mmio_write")):
            raise ValueError(f"{self.name}: the ROM's server lacks mmio_read or mmio_write")
        if self.bars[ROM_INDEX] is not None:
            raise ValueError(f"{self.name}: the ROM is already declared")
        bar = Bar(ROM_INDEX, size, False, False, False, server)
        self.bars[ROM_INDEX] = bar
        self.define_register(ROM_ADDRESS, 4, 0, wmask=(~(size - 1) & _U32) | ROM_ENABLE)
        return bar

    def add_capability(self, cap_id: int, length: int, *, offset: int | None = None, data: bytes = b"",
                       wmask: bytes = b"", w1c: bytes = b"") -> int:
        """Append a capability (PCI LB 3.0 6.7) of ``length`` bytes and return its offset.

        ``data``, ``wmask`` and ``w1c`` describe the bytes after the id and
        next-pointer bytes.  Without ``offset``, the lowest free dword-aligned
        place at 0x40 or above is used.
        """
        if not 0 <= cap_id <= 0xFF or length < 2:
            raise ValueError(f"{self.name}: capability {cap_id:#x} of {length} bytes")
        if max(len(data), len(wmask), len(w1c)) > length - 2:
            raise ValueError(f"{self.name}: capability {cap_id:#x} data is longer than {length - 2} bytes")
        if offset is None:
            offset = next((o for o in range(HEADER_SIZE, CONFIG_SIZE - length + 1, 4)
                           if not any(self._used[o:o + length])), None)
            if offset is None:
                raise ValueError(f"{self.name}: no room for a {length}-byte capability")
        if offset < HEADER_SIZE or offset % 4 or offset + length > CONFIG_SIZE:
            raise ValueError(f"{self.name}: capability offset {offset:#x} must be dword aligned in 0x40-0xff")
        body = bytes(data).ljust(length - 2, b"\0")
        wm = bytes(wmask).ljust(length - 2, b"\0")
        wc = bytes(w1c).ljust(length - 2, b"\0")
        self.define_register(offset, 2, cap_id)
        for i in range(length - 2):
            self.define_register(offset + 2 + i, 1, body[i], wmask=wm[i], w1c=wc[i])
        # append to the list: the pointer at 0x34, or the last entry's next byte
        link = CAPABILITIES_POINTER
        while self._reset_config[link]:
            link = self._reset_config[link] + 1
        self._reset_config[link] = self.config[link] = offset
        self._reset_config[STATUS] |= ST_CAP_LIST
        self.config[STATUS] |= ST_CAP_LIST
        return offset

    def capabilities(self) -> list[tuple[int, int]]:
        """(capability id, offset) in list order."""
        out: list[tuple[int, int]] = []
        ptr = self.config[CAPABILITIES_POINTER] & 0xFC
        while ptr and len(out) < 48:
            out.append((self.config[ptr], ptr))
            ptr = self.config[ptr + 1] & 0xFC
        return out

    def _is_upper_half(self, index: int) -> bool:
        prev = self.bars[index - 1] if index > 0 else None
        return prev is not None and prev.mem64

    # -- registers ---------------------------------------------------------------------
    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    @property
    def status(self) -> int:
        return self._get(STATUS, 2)

    @property
    def interrupt_pin(self) -> int:
        return self.config[INTERRUPT_PIN]

    @property
    def multifunction(self) -> bool:
        return bool(self.config[HEADER_TYPE] & HEADER_MULTI_FUNCTION)

    def config_read(self, offset: int, size: int) -> int:
        """A configuration read of ``size`` bytes inside the 256-byte space."""
        return self._get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A configuration write: writable bits take the value, W1C bits clear, the rest stay."""
        old_command = self.command
        for i in range(size):
            o = offset + i
            b = (value >> (8 * i)) & 0xFF
            wm = self.wmask[o]
            self.config[o] = ((self.config[o] & ~wm) | (b & wm)) & ~(b & self.w1cmask[o]) & 0xFF
        end = offset + size
        if offset < COMMAND + 2 and COMMAND < end:
            if (old_command ^ self.command) & CMD_INTX_DISABLE:
                self._drive_intx()
        if (offset < COMMAND + 2 and COMMAND < end) or (offset < BAR0 + 24 and BAR0 < end) \
                or (offset < ROM_ADDRESS + 4 and ROM_ADDRESS < end):
            self.remap()
        self.config_written(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        """Hook for subclasses: ``size`` bytes at ``offset`` were just written."""

    # -- INTx ------------------------------------------------------------------------
    def set_irq(self, level: bool) -> None:
        """The function asserts (True) or deasserts its INTx# pin (2.2.6)."""
        level = bool(level)
        if level == self._intx_level:
            return
        self._intx_level = level
        self._sync_interrupt_status()
        self._drive_intx()

    @property
    def irq_level(self) -> bool:
        """The function's own interrupt state (what status bit 3 shows)."""
        return self._intx_level

    def _intx_output(self) -> bool:
        return self._intx_level and self.interrupt_pin != 0 and not self.command & CMD_INTX_DISABLE

    def _drive_intx(self) -> None:
        self.intx.set(self._intx_output())

    def _sync_interrupt_status(self) -> None:
        if self._intx_level:
            self.config[STATUS] |= ST_INTERRUPT
        else:
            self.config[STATUS] &= ~ST_INTERRUPT & 0xFF

    # -- BARs on the buses --------------------------------------------------------------
    def decoded_bars(self) -> list[tuple[Bar, int]]:
        """(BAR, base) for every BAR whose region decodes now (see the module doc)."""
        cmd = self.command
        out: list[tuple[Bar, int]] = []
        for bar in self.bars:
            if bar is None:
                continue
            raw = self._get(bar.offset, 8 if bar.mem64 else 4)
            base = raw & ~(bar.size - 1)
            last = base + bar.size - 1
            if bar.io:
                if not cmd & CMD_IO or base == 0 or last >= _IO_LIMIT:
                    continue
            else:
                if not cmd & CMD_MEMORY or base == 0:
                    continue
                if bar.index == ROM_INDEX and not raw & ROM_ENABLE:
                    continue
                if last >= (_U64 if bar.mem64 else _U32):
                    continue
            out.append((bar, base))
        return out

    def bar_address(self, index: int) -> int | None:
        """Where BAR ``index`` (6: the ROM) is on its bus now, or None."""
        m = self._mapped[index]
        return None if m is None else m[0]

    def remap(self) -> None:
        """Bring the buses in line with the BARs (the whole PCI bus's, when attached)."""
        if self.pci_bus is not None:
            self.pci_bus.remap()
        else:
            remap_functions([self])

    def _map(self, index: int, base: int) -> None:
        bar = self.bars[index]
        assert bar is not None
        name = f"{self.name}.{'rom' if index == ROM_INDEX else f'bar{index}'}"
        try:
            if bar.io:
                window = _IoWindow(bar.server, base, name)
                self.io_bus.register(window, base, bar.size, name)
                self._mapped[index] = (base, window)
            else:
                self.mmio_bus.register(bar.server, base, bar.size, name)
                self._mapped[index] = (base, bar.server)
        except BusError:
            self.map_refusals += 1

    def _unmap(self, index: int) -> None:
        m = self._mapped[index]
        bar = self.bars[index]
        assert m is not None and bar is not None
        self._mapped[index] = None
        if bar.io:
            self.io_bus.unregister(m[1])
        else:
            self.mmio_bus.unregister(m[1], m[0])

    # -- reset and state ---------------------------------------------------------------
    def reset(self) -> None:
        """PCI reset (RST#): every register to its reset value, INTx deasserted, BARs off the bus."""
        self._intx_level = False
        self.config[:] = self._reset_config
        self._drive_intx()
        self.remap()

    def save_state(self) -> State:
        return {"kind": self.kind, "version": self.VERSION, "config": bytes(self.config),
                "intx": self._intx_level}

    def load_state(self, state: State) -> None:
        check_state(state, self.kind, self.VERSION)
        self.apply_pci_state(self.parse_pci_state(state))

    def parse_pci_state(self, state: State) -> PciState:
        """Check the "config" and "intx" fields of ``state``; change nothing."""
        config = state.get("config")
        if isinstance(config, list) and all(_is_int(b) and 0 <= b <= 0xFF for b in config):
            config = bytes(config)
        if not isinstance(config, (bytes, bytearray)) or len(config) != CONFIG_SIZE:
            raise DeviceStateError(f"{self.kind}: config must be {CONFIG_SIZE} bytes")
        for o in range(CONFIG_SIZE):
            fixed = ~(self.wmask[o] | self.w1cmask[o] | self.hwmask[o]) & 0xFF
            if (config[o] ^ self._reset_config[o]) & fixed:
                raise DeviceStateError(
                    f"{self.kind}: config byte {o:#04x} = {config[o]:#04x} changes read-only bits "
                    f"(this function has {self._reset_config[o]:#04x}); a state of another device?")
        intx = state.get("intx")
        if not isinstance(intx, bool):
            raise DeviceStateError(f"{self.kind}: intx must be a bool")
        return PciState(bytes(config), intx)

    def apply_pci_state(self, parsed: PciState) -> None:
        """Load a checked state: no line is driven, BAR regions follow the new config."""
        self.config[:] = parsed.config
        self._intx_level = parsed.intx
        self._sync_interrupt_status()
        self.intx.level = self._intx_output()   # silently: a restore raises no interrupt
        self.remap()
