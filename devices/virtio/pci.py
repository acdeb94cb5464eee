"""The virtio PCI transport: one PCI function carrying one virtio device.

Implements OASIS VIRTIO 1.2, 4.1 "Virtio Over PCI Bus", for a transitional
device as QEMU's ``virtio-*-pci`` on a conventional PCI bus presents it:

* 4.1.2 discovery: vendor 0x1AF4; a transitional device has the transitional
  device id (0x1000 + n, e.g. 0x1001 for block), revision 0 and subsystem id
  = the virtio device id, so that both legacy and modern drivers bind; a
  non-transitional one (``transitional=False``) has 0x1040 + device id and
  revision 1.  Subsystem vendor 0x1AF4, INTA#.
* 4.1.4 the modern interface: vendor-specific capabilities (id 0x09) naming
  the common configuration, notification, ISR and device configuration
  structures, all in BAR4 (4 KiB: common at 0x000, ISR at 0x040, device
  configuration at 0x100, notifications at 0x200 with
  ``notify_off_multiplier`` 4 and ``queue_notify_off`` = the queue index;
  QEMU spreads the same over 16 KiB); and the VIRTIO_PCI_CAP_PCI_CFG
  capability (4.1.4.9), a window through configuration space into the BARs.
* 4.1.4.3 the common configuration structure: feature selection and
  negotiation (64 bits in two words), ``num_queues``, ``device_status``,
  ``config_generation``, and per queue (``queue_select``) size, enable,
  notify offset and the three ring addresses; ``queue_notify_data``,
  ``queue_reset`` and the admin queue fields read 0 (their features are not
  offered).  Accesses of any width are served byte by byte over the fields
  they cover (a partial write merges into the field), so a driver that does
  not use the natural widths still sees a consistent register file.
* 4.1.4.5 ISR status: bit 0 used buffers, bit 1 configuration change; a
  read returns it, clears it and deasserts INTx.  Without MSI-X the INTx
  level is ``ISR != 0`` (4.1.4.5.1).
* 4.1.4.8 the legacy interface in BAR0 (I/O): host/guest features (bits
  0-31), queue PFN (legacy ring layout, 4096-byte alignment), queue size,
  select, notify, status, ISR, then, while MSI-X is enabled, the
  configuration and queue vectors (4.1.4.10), then the device
  configuration (at 20, or 24 with MSI-X enabled).

BAR4 is a 32-bit memory BAR, where QEMU's is 64-bit and prefetchable.  A
kernel that assigns BARs itself and does not trust the ACPI _CRS windows
(Linux without a DMI date later than 2008, as with direct kernel boot here)
puts a 64-bit BAR above 4 GiB, where our boards have no guest-physical
space; drivers find the BAR through the capabilities either way.

MSI-X (4.1.4.3, 4.1.5.1.2, 4.1.5.4) when the function is built with ``msi``
(the APIC bus's ``send_msi``): the capability, table and PBA of
devices/pci/msix.py in BAR1 (4 KiB, as QEMU's exclusive MSI-X BAR), with
one vector per queue plus one for configuration changes (QEMU's default
``vectors``).  ``msix_config`` and each queue's ``queue_msix_vector`` take
a vector below the table size and read back NO_VECTOR (0xFFFF) for any
other value, which is how the driver learns that a mapping failed; a reset
(status 0) sets them all to NO_VECTOR, as QEMU's ``virtio_reset``.  While
MSI-X is enabled a used buffer notification is the queue's vector and a
configuration change the configuration vector (NO_VECTOR: none at all);
neither sets ISR bits nor touches INTx (the spec asks for ISR only without
MSI-X; Linux's per-queue MSI-X handlers never read it).  Linux's
virtio_pci then takes one vector per queue (``vp_find_vqs_msix``): a request
costs one message and no ISR read or I/O APIC round trip.  Without ``msi``
(or with MSI-X disabled by the driver) it is INTx as below, and the vector
fields read NO_VECTOR.

Device status (2.1).  Writing 0 resets the device (queues, features, ISR,
the device type's in-flight work) and reads back 0 at once.  Through the
modern interface FEATURES_OK sticks only if the driver's features include
VIRTIO_F_VERSION_1 and the device type accepts them (2.2.1: the device
"MUST fail to set the FEATURES_OK device status bit" otherwise); driver
features written once FEATURES_OK is set are ignored (as QEMU's
``virtio_set_features``).  Buffers are consumed, and used buffer
notifications sent, only after DRIVER_OK (2.1.2); at DRIVER_OK every
enabled queue is looked at once, so buffers made available earlier are not
lost.  DEVICE_NEEDS_RESET is set by the device and only a reset clears it.

Where QEMU departs from the spec and guests rely on it, this does as QEMU
does:

* legacy interface: buffers are consumed whatever the status (legacy Linux
  drivers read the partition table before DRIVER_OK); writing queue PFN 0
  resets the whole device; writing status ACKNOWLEDGE|DRIVER turns on bus
  mastering (Linux before 2.6.34 never did);
* a broken ring (``VirtqError``, see queue.py) is QEMU's ``virtio_error``:
  the device stops taking and returning buffers until reset and, if
  VERSION_1 was negotiated, sets DEVICE_NEEDS_RESET and sends a
  configuration change interrupt (with the generation bumped).

Notifications are honoured only while bus mastering is on (command bit 2):
with it off the device may not do DMA, so the notification is dropped; the
driver notifies again after enabling it.

State: the configuration space, INTx, the virtio registers, every queue's
configuration and position, and the device type's own state (nested under
"device"), as plain data; a state is checked completely before anything
changes.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from devices.base import DeviceStateError, State, check_state
from devices.pci.function import CMD_MASTER, COMMAND, PciFunction
from devices.virtio.device import (
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    F_ANY_LAYOUT,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    FEATURES_OK,
    NEEDS_RESET,
    VirtioDevice,
    bit,
    state_bool,
    state_int,
)
from devices.pci.msix import Msix
from devices.virtio.queue import NO_VECTOR, Chain, SplitQueue, VirtqError, legacy_layout

VENDOR_VIRTIO = 0x1AF4
SUBSYSTEM_QEMU = 0x1100
# 4.1.2.1: transitional PCI device ids by virtio device id
TRANSITIONAL_IDS = {1: 0x1000, 2: 0x1001, 5: 0x1002, 3: 0x1003, 8: 0x1004, 4: 0x1005, 9: 0x1009}

PCI_CAP_ID_VNDR = 0x09
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5

LEGACY_BAR = 0
MODERN_BAR = 4
MODERN_BAR_SIZE = 0x1000
COMMON_OFF, COMMON_LEN = 0x000, 0x40
ISR_OFF, ISR_LEN = 0x040, 0x4
DEVICE_OFF, DEVICE_LEN = 0x100, 0x100
NOTIFY_OFF = 0x200
NOTIFY_MULT = 4
MAX_QUEUES = (MODERN_BAR_SIZE - NOTIFY_OFF) // NOTIFY_MULT

ISR_QUEUE = 1
ISR_CONFIG = 2

# virtio_pci_common_cfg (4.1.4.3); 64-bit fields as two 32-bit halves
C_DFSELECT, C_DF, C_GFSELECT, C_GF = 0x00, 0x04, 0x08, 0x0C
C_MSIX, C_NUMQ, C_STATUS, C_CFGGEN = 0x10, 0x12, 0x14, 0x15
C_Q_SELECT, C_Q_SIZE, C_Q_MSIX, C_Q_ENABLE, C_Q_NOFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
C_Q_DESCLO, C_Q_DESCHI, C_Q_AVAILLO, C_Q_AVAILHI, C_Q_USEDLO, C_Q_USEDHI = 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34
C_Q_NDATA, C_Q_RESET, C_ADMIN_IDX, C_ADMIN_NUM = 0x38, 0x3A, 0x3C, 0x3E
COMMON_FIELDS = [(0x00, 4), (0x04, 4), (0x08, 4), (0x0C, 4), (0x10, 2), (0x12, 2), (0x14, 1), (0x15, 1),
                 (0x16, 2), (0x18, 2), (0x1A, 2), (0x1C, 2), (0x1E, 2), (0x20, 4), (0x24, 4), (0x28, 4),
                 (0x2C, 4), (0x30, 4), (0x34, 4), (0x38, 2), (0x3A, 2), (0x3C, 2), (0x3E, 2)]

# The legacy header (4.1.4.10), without MSI-X: the device configuration follows at 20
L_HOST_FEATURES, L_GUEST_FEATURES, L_QUEUE_PFN, L_QUEUE_NUM = 0x00, 0x04, 0x08, 0x0C
L_QUEUE_SEL, L_QUEUE_NOTIFY, L_STATUS, L_ISR = 0x0E, 0x10, 0x12, 0x13
L_MSIX_CONFIG, L_MSIX_QUEUE = 0x14, 0x16       # present only while MSI-X is enabled
LEGACY_HEADER = 0x14
LEGACY_HEADER_MSIX = 0x18
LEGACY_FIELDS = [(0x00, 4), (0x04, 4), (0x08, 4), (0x0C, 2), (0x0E, 2), (0x10, 2), (0x12, 1), (0x13, 1)]
LEGACY_FIELDS_MSIX = LEGACY_FIELDS + [(0x14, 2), (0x16, 2)]
MSIX_BAR = 1

_U32 = 0xFFFF_FFFF


def _field_map(fields: list[tuple[int, int]], length: int) -> list[tuple[int, int] | None]:
    out: list[tuple[int, int] | None] = [None] * length
    for off, width in fields:
        for i in range(width):
            out[off + i] = (off, width)
    return out


_COMMON_MAP = _field_map(COMMON_FIELDS, COMMON_LEN)
_LEGACY_MAP = _field_map(LEGACY_FIELDS, LEGACY_HEADER)
_LEGACY_MAP_MSIX = _field_map(LEGACY_FIELDS_MSIX, LEGACY_HEADER_MSIX)


def _covered(fmap: list[tuple[int, int] | None], off: int, size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in range(off, min(off + size, len(fmap))):
        f = fmap[i]
        if f is not None and (not out or out[-1] != f):
            out.append(f)
    return out


def _read_fields(fmap: list, off: int, size: int, get: Callable[[int], int]) -> int:
    """A read of ``size`` bytes at ``off`` of a register file: each field read once."""
    val = 0
    for foff, width in _covered(fmap, off, size):
        fv = get(foff)
        for i in range(max(off, foff), min(off + size, foff + width)):
            val |= ((fv >> (8 * (i - foff))) & 0xFF) << (8 * (i - off))
    return val


def _write_fields(fmap: list, off: int, size: int, value: int, get: Callable[[int], int],
                  put: Callable[[int, int], None]) -> None:
    """A write: each field it covers gets its written bytes merged into its current value."""
    for foff, width in _covered(fmap, off, size):
        if foff == off and width == size:
            put(foff, value)
            continue
        fv = get(foff)
        for i in range(max(off, foff), min(off + size, foff + width)):
            sh = 8 * (i - foff)
            fv = (fv & ~(0xFF << sh)) | (((value >> (8 * (i - off))) & 0xFF) << sh)
        put(foff, fv)


def _pow2ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class VirtioPciFunction(PciFunction):
    """A virtio device (``VirtioDevice``) on PCI; see the module docstring.

    ``dma`` is the device's view of guest memory, ``clock`` the machine's
    virtual clock (the device type schedules its work on it), ``msi`` where
    MSI-X messages go (``send_msi(address, data)``; None: no MSI-X).
    """

    VERSION = 2
    mmio_sizes = (1, 2, 4)
    io_sizes = (1, 2, 4)

    def __init__(self, device: VirtioDevice, *, io_bus: Any, mmio_bus: Any, dma: Any, clock: Any,
                 name: str | None = None, transitional: bool = True,
                 msi: Callable[[int, int], Any] | None = None) -> None:
        did = device.device_id
        nq = len(device.queue_sizes)
        if not 1 <= nq <= MAX_QUEUES:
            raise ValueError(f"{device.name}: {nq} queues (1..{MAX_QUEUES})")
        config_len = len(device.config())
        if config_len > DEVICE_LEN:
            raise ValueError(f"{device.name}: {config_len} bytes of device configuration (at most {DEVICE_LEN})")
        header = LEGACY_HEADER_MSIX if msi is not None else LEGACY_HEADER
        legacy_size = max(32, _pow2ceil(header + config_len))
        self.transitional = transitional and did in TRANSITIONAL_IDS and legacy_size <= 256
        if self.transitional:
            pci_id, revision, subsystem = TRANSITIONAL_IDS[did], 0, did
        else:
            pci_id, revision, subsystem = 0x1040 + did, 1, SUBSYSTEM_QEMU
        super().__init__(name=name or device.name, vendor_id=VENDOR_VIRTIO, device_id=pci_id,
                         class_code=device.pci_class, revision=revision, subsystem_vendor_id=VENDOR_VIRTIO,
                         subsystem_id=subsystem, interrupt_pin=1, io_bus=io_bus, mmio_bus=mmio_bus)
        self.kind = f"{device.kind}_pci"
        self.device = device
        self.dma = dma
        self.clock = clock
        self.queues = [SplitQueue(i, size) for i, size in enumerate(device.queue_sizes)]
        self.legacy_size = legacy_size if self.transitional else 0
        if self.transitional:
            self.add_bar(LEGACY_BAR, legacy_size, self, io=True)
        self.add_bar(MODERN_BAR, MODERN_BAR_SIZE, self)
        self.msix = Msix(self, nq + 1, MSIX_BAR, msi) if msi is not None else None
        self.notify_len = NOTIFY_MULT * nq
        for cfg_type, off, length in ((CAP_COMMON, COMMON_OFF, COMMON_LEN), (CAP_ISR, ISR_OFF, ISR_LEN),
                                      (CAP_DEVICE, DEVICE_OFF, DEVICE_LEN)):
            self.add_capability(PCI_CAP_ID_VNDR, 16, data=self._cap_body(16, cfg_type, off, length))
        self.add_capability(PCI_CAP_ID_VNDR, 20, data=self._cap_body(20, CAP_NOTIFY, NOTIFY_OFF, self.notify_len)
                            + struct.pack("<I", NOTIFY_MULT))
        # 4.1.4.9: bar, offset, length and pci_cfg_data are writable by the driver
        self.cfg_cap = self.add_capability(PCI_CAP_ID_VNDR, 20, data=self._cap_body(20, CAP_PCI_CFG, 0, 0),
                                           wmask=bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12)
        self.offered_modern = device.features | bit(F_INDIRECT_DESC) | bit(F_EVENT_IDX) | bit(F_VERSION_1)
        self.offered_legacy = (device.features | device.legacy_features | bit(F_INDIRECT_DESC)
                               | bit(F_EVENT_IDX) | bit(F_ANY_LAYOUT)) & _U32
        self.generation = 0
        self.notifies = 0               # driver notifications and ISR reads: counts for benchmarks, not state
        self.isr_reads = 0
        self._reset_virtio(initial=True)
        device.bind(self)

    @staticmethod
    def _cap_body(cap_len: int, cfg_type: int, offset: int, length: int) -> bytes:
        """virtio_pci_cap after cap_vndr and cap_next: cap_len, cfg_type, bar, id, padding, offset, length."""
        return struct.pack("<BBBB2xII", cap_len, cfg_type, MODERN_BAR, 0, offset, length)

    # -- what the device type uses -----------------------------------------------------------
    @property
    def driver_features(self) -> int:
        return self._driver_features

    def has_feature(self, n: int) -> bool:
        return bool(self._driver_features >> n & 1)

    def pop(self, index: int, limit: int | None = None) -> list[Chain]:
        """Take available chains from queue ``index`` ([] if the device may not, or the ring is broken)."""
        q = self.queues[index]
        if self.broken or not q.ready:
            return []
        try:
            return q.pop(self.dma, limit)
        except VirtqError as e:
            self.device_error(str(e))
            return []

    def push(self, index: int, head: int, length: int) -> None:
        q = self.queues[index]
        if self.broken or not q.ready:
            return
        try:
            q.push(self.dma, head, length)
        except VirtqError as e:
            self.device_error(str(e))

    def notify_used(self, index: int) -> None:
        """Publish queue ``index``'s used index; interrupt if the driver asked for it."""
        q = self.queues[index]
        if self.broken or not q.ready:
            return
        try:
            wanted = q.publish(self.dma)
        except VirtqError as e:
            self.device_error(str(e))
            return
        if wanted and (self.device_status & DRIVER_OK or self.legacy):
            self._signal(self.queue_vectors[index], ISR_QUEUE)

    def device_error(self, why: str) -> None:
        """QEMU's virtio_error: stop until reset; DEVICE_NEEDS_RESET and a configuration
        interrupt for a VERSION_1 driver."""
        if self.broken:
            return
        self.broken = True
        self.error = why[:500]
        if self.has_feature(F_VERSION_1):
            self.device_status |= NEEDS_RESET
            self.config_changed()

    def config_changed(self) -> None:
        """The device configuration changed: new generation, and an interrupt once DRIVER_OK."""
        self.generation = (self.generation + 1) & 0xFF
        if self.device_status & DRIVER_OK:
            self._signal(self.config_vector, ISR_CONFIG)

    # -- interrupts ------------------------------------------------------------------------
    @property
    def msix_enabled(self) -> bool:
        return self.msix is not None and self.msix.enabled

    def _signal(self, vector: int, bits: int) -> None:
        """A used buffer or configuration notification: the MSI-X vector while MSI-X is
        enabled, else the ISR bit and INTx."""
        if self.msix is not None and self.msix.enabled:
            self.msix.notify(vector)
            return
        self.isr |= bits
        self.set_irq(True)

    def _take_isr(self) -> int:
        self.isr_reads += 1
        v = self.isr
        self.isr = 0
        self.set_irq(False)
        return v

    # -- reset -------------------------------------------------------------------------------
    def _reset_virtio(self, initial: bool = False) -> None:
        self.device_status = 0
        self.isr = 0
        self.dfselect = 0
        self.gfselect = 0
        self._driver_features = 0
        self.queue_select = 0
        self.config_vector = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * len(self.queues)
        self.legacy = False
        self.broken = False
        self.error = ""
        for q in self.queues:
            q.reset()
            q.event_idx = q.indirect = False
        if not initial:
            self.set_irq(False)
            self.device.reset()

    def reset(self) -> None:
        super().reset()
        if self.msix is not None:
            self.msix.reset()
        self._reset_virtio()

    # -- status and features -------------------------------------------------------------------
    def _set_driver_features(self, value: int) -> None:
        self._driver_features = value
        for q in self.queues:
            q.event_idx = bool(value >> F_EVENT_IDX & 1)
            q.indirect = bool(value >> F_INDIRECT_DESC & 1)

    def _write_status(self, value: int, legacy: bool) -> None:
        value &= 0xFF
        if value == 0:
            self._reset_virtio()
            return
        old = self.device_status
        if not legacy and value & FEATURES_OK and not old & FEATURES_OK and not self._features_acceptable():
            value &= ~FEATURES_OK
        self.device_status = value | (old & NEEDS_RESET)
        if legacy and value == ACKNOWLEDGE | DRIVER and not self.command & CMD_MASTER:
            # QEMU: Linux before 2.6.34 drove legacy devices without enabling bus mastering
            self.config_write(COMMAND, 2, self.command | CMD_MASTER)
        if self.device_status & DRIVER_OK and not old & DRIVER_OK:
            self.device.activate()
            for i, q in enumerate(self.queues):
                if q.ready:
                    self._notify(i)

    def _features_acceptable(self) -> bool:
        f = self._driver_features
        return bool(f >> F_VERSION_1 & 1) and self.device.validate_features(f)

    def _notify(self, index: int) -> None:
        self.notifies += 1
        if not 0 <= index < len(self.queues) or self.broken or not self.queues[index].ready:
            return
        if not (self.device_status & DRIVER_OK or self.legacy) or not self.command & CMD_MASTER:
            return
        self.device.queue_notify(index)

    def _selected(self) -> SplitQueue | None:
        s = self.queue_select
        return self.queues[s] if s < len(self.queues) else None

    # -- the modern BAR ------------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        if offset < COMMON_LEN:
            return _read_fields(_COMMON_MAP, offset, size, self._common_get)
        if ISR_OFF <= offset < ISR_OFF + ISR_LEN:
            return self._take_isr() if offset == ISR_OFF else 0
        if DEVICE_OFF <= offset < DEVICE_OFF + DEVICE_LEN:
            return self._config_read(offset - DEVICE_OFF, size)
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if offset < COMMON_LEN:
            self.legacy = False
            _write_fields(_COMMON_MAP, offset, size, value, self._common_get, self._common_put)
        elif DEVICE_OFF <= offset < DEVICE_OFF + DEVICE_LEN:
            self._config_write(offset - DEVICE_OFF, size, value)
        elif NOTIFY_OFF <= offset < NOTIFY_OFF + self.notify_len:
            # the queue is named by the address (the value is the index too, 4.1.5.2)
            self._notify((offset - NOTIFY_OFF) // NOTIFY_MULT)

    def _common_get(self, off: int) -> int:
        if off == C_DFSELECT:
            return self.dfselect
        if off == C_DF:
            return (self.offered_modern >> (32 * self.dfselect)) & _U32 if self.dfselect < 2 else 0
        if off == C_GFSELECT:
            return self.gfselect
        if off == C_GF:
            return (self._driver_features >> (32 * self.gfselect)) & _U32 if self.gfselect < 2 else 0
        if off == C_MSIX:
            return self.config_vector
        if off == C_NUMQ:
            return len(self.queues)
        if off == C_STATUS:
            return self.device_status
        if off == C_CFGGEN:
            return self.generation
        if off == C_Q_SELECT:
            return self.queue_select
        q = self._selected()
        if q is None:
            return NO_VECTOR if off == C_Q_MSIX else 0
        if off == C_Q_MSIX:
            return self.queue_vectors[q.index]
        if off == C_Q_SIZE:
            return q.size
        if off == C_Q_ENABLE:
            return int(q.enabled)
        if off == C_Q_NOFF:
            return q.index
        if off in (C_Q_DESCLO, C_Q_DESCHI, C_Q_AVAILLO, C_Q_AVAILHI, C_Q_USEDLO, C_Q_USEDHI):
            addr = (q.desc, q.avail, q.used)[(off - C_Q_DESCLO) // 8]
            return (addr >> 32) if off & 4 else addr & _U32
        return 0

    def _common_put(self, off: int, value: int) -> None:
        if off == C_DFSELECT:
            self.dfselect = value & _U32
        elif off == C_GFSELECT:
            self.gfselect = value & _U32
        elif off == C_GF:
            if self.device_status & FEATURES_OK or self.gfselect >= 2:
                return
            sh = 32 * self.gfselect
            f = (self._driver_features & ~(_U32 << sh)) | ((value & _U32) << sh)
            self._set_driver_features(f & self.offered_modern)
        elif off == C_STATUS:
            self._write_status(value, legacy=False)
        elif off == C_Q_SELECT:
            self.queue_select = value & 0xFFFF
        elif off in (C_MSIX, C_Q_MSIX):
            self._map_vector(off == C_MSIX, value)
        else:
            q = self._selected()
            if q is None or q.enabled:
                return          # 4.1.4.3.2: queues are configured before they are enabled
            if off == C_Q_SIZE:
                if 1 <= value <= q.max_size and not value & (value - 1):
                    q.size = value
            elif off == C_Q_ENABLE:
                if value == 1 and q.size:
                    q.enabled = True
            elif C_Q_DESCLO <= off <= C_Q_USEDHI:
                name = ("desc", "avail", "used")[(off - C_Q_DESCLO) // 8]
                old = getattr(q, name)
                new = (old & _U32) | (value & _U32) << 32 if off & 4 else (old & ~_U32) | (value & _U32)
                setattr(q, name, new)

    def _map_vector(self, config: bool, value: int) -> None:
        """The driver maps the configuration vector or the selected queue's vector: the value
        itself if the table has it, else NO_VECTOR (how the driver learns the mapping failed)."""
        value &= 0xFFFF
        if self.msix is None or value >= self.msix.vectors:
            value = NO_VECTOR
        if config:
            self.config_vector = value
        elif (q := self._selected()) is not None:
            self.queue_vectors[q.index] = value

    def _config_read(self, offset: int, size: int) -> int:
        data = self.device.config()[offset:offset + size]
        return int.from_bytes(data.ljust(size, b"\0"), "little")

    def _config_write(self, offset: int, size: int, value: int) -> None:
        n = len(self.device.config())
        if offset < n:
            self.device.config_write(offset, value.to_bytes(size, "little")[:n - offset])

    # -- the legacy BAR -------------------------------------------------------------------------
    def _legacy_header(self) -> tuple[int, list]:
        """The legacy header's length and field map: 4.1.4.10 adds the two vectors while
        MSI-X is enabled, moving the device configuration from 20 to 24."""
        if self.msix is not None and self.msix.enabled:
            return LEGACY_HEADER_MSIX, _LEGACY_MAP_MSIX
        return LEGACY_HEADER, _LEGACY_MAP

    def io_read(self, offset: int, size: int) -> int:
        header, fmap = self._legacy_header()
        if offset < header:
            return _read_fields(fmap, offset, size, self._legacy_get)
        return self._config_read(offset - header, size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        header, fmap = self._legacy_header()
        if offset < header:
            _write_fields(fmap, offset, size, value, self._legacy_get, self._legacy_put)
            self.legacy = True
        else:
            self._config_write(offset - header, size, value)

    def _legacy_get(self, off: int) -> int:
        q = self._selected()
        if off == L_HOST_FEATURES:
            return self.offered_legacy
        if off == L_GUEST_FEATURES:
            return self._driver_features & _U32
        if off == L_QUEUE_PFN:
            return (q.desc >> 12) & _U32 if q is not None and q.enabled else 0
        if off == L_QUEUE_NUM:
            return q.size if q is not None else 0
        if off == L_QUEUE_SEL:
            return self.queue_select
        if off == L_STATUS:
            return self.device_status
        if off == L_ISR:
            return self._take_isr()
        if off == L_MSIX_CONFIG:
            return self.config_vector
        if off == L_MSIX_QUEUE:
            return self.queue_vectors[q.index] if q is not None else NO_VECTOR
        return 0

    def _legacy_put(self, off: int, value: int) -> None:
        if off == L_GUEST_FEATURES:
            self._set_driver_features(value & self.offered_legacy)
        elif off == L_QUEUE_PFN:
            if value == 0:
                self._reset_virtio()        # as QEMU's virtio_ioport_write
                return
            q = self._selected()
            if q is not None and not q.enabled:
                q.size = q.max_size
                q.desc, q.avail, q.used = legacy_layout(value << 12, q.size)
                q.enabled = True
        elif off == L_QUEUE_SEL:
            self.queue_select = value & 0xFFFF
        elif off == L_QUEUE_NOTIFY:
            self._notify(value & 0xFFFF)
        elif off == L_STATUS:
            self._write_status(value, legacy=True)
        elif off in (L_MSIX_CONFIG, L_MSIX_QUEUE):
            self._map_vector(off == L_MSIX_CONFIG, value)

    # -- VIRTIO_PCI_CAP_PCI_CFG ----------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        data = self.cfg_cap + 16
        if offset < data + 4 and data < offset + size:
            self._cfg_window(write=False)
        return super().config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        if self.msix is None:
            super().config_write(offset, size, value)
            return
        old = self.msix.control
        super().config_write(offset, size, value)
        self.msix.config_written(offset, size, old)

    def config_written(self, offset: int, size: int) -> None:
        data = self.cfg_cap + 16
        if offset < data + 4 and data < offset + size:
            self._cfg_window(write=True)

    def _cfg_window(self, write: bool) -> None:
        c = self.cfg_cap
        bar = self.config[c + 4]
        off = int.from_bytes(self.config[c + 8:c + 12], "little")
        ln = int.from_bytes(self.config[c + 12:c + 16], "little")
        if ln not in (1, 2, 4) or off % ln:
            return
        if bar == MODERN_BAR and off + ln <= MODERN_BAR_SIZE:
            read, wr = self.mmio_read, self.mmio_write
        elif bar == LEGACY_BAR and self.transitional and off + ln <= self.legacy_size:
            read, wr = self.io_read, self.io_write
        else:
            return
        if write:
            wr(off, ln, int.from_bytes(self.config[c + 16:c + 16 + ln], "little"))
        else:
            self.config[c + 16:c + 16 + ln] = read(off, ln).to_bytes(ln, "little")

    # -- state --------------------------------------------------------------------------------
    def save_state(self) -> State:
        st = super().save_state()
        st.update(device_status=self.device_status, isr=self.isr, dfselect=self.dfselect, gfselect=self.gfselect,
                  driver_features=self._driver_features, queue_select=self.queue_select,
                  generation=self.generation, legacy=self.legacy, broken=self.broken, error=self.error,
                  queues=[q.save_state() for q in self.queues], device=self.device.save_state(),
                  config_vector=self.config_vector, queue_vectors=list(self.queue_vectors),
                  msix=self.msix.save_state() if self.msix is not None else None)
        return st

    def load_state(self, state: State) -> None:
        check_state(state, self.kind, self.VERSION)
        pci = self.parse_pci_state(state)
        w = self.kind
        regs = {
            "device_status": state_int(state, "device_status", 0, 0xFF, w),
            "isr": state_int(state, "isr", 0, 0xFF, w),
            "dfselect": state_int(state, "dfselect", 0, _U32, w),
            "gfselect": state_int(state, "gfselect", 0, _U32, w),
            "driver_features": state_int(state, "driver_features", 0, (1 << 64) - 1, w),
            "queue_select": state_int(state, "queue_select", 0, 0xFFFF, w),
            "generation": state_int(state, "generation", 0, 0xFF, w),
            "legacy": state_bool(state, "legacy", w),
            "broken": state_bool(state, "broken", w),
        }
        error = state.get("error")
        if not isinstance(error, str) or len(error) > 500:
            raise DeviceStateError(f"{w}: error must be a string of at most 500 characters")
        queues = state.get("queues")
        if not isinstance(queues, list) or len(queues) != len(self.queues):
            raise DeviceStateError(f"{w}: queues must be a list of {len(self.queues)}")
        checked_queues = [q.check_state(s) for q, s in zip(self.queues, queues)]
        if "device" not in state:
            raise DeviceStateError(f"{w}: no 'device'")
        device = self.device.check_state(state["device"])
        top = self.msix.vectors - 1 if self.msix is not None else -1
        config_vector = state_int(state, "config_vector", 0, 0xFFFF, w)
        vectors = state.get("queue_vectors")
        if not isinstance(vectors, list) or len(vectors) != len(self.queues):
            raise DeviceStateError(f"{w}: queue_vectors must be a list of {len(self.queues)}")
        if any(not isinstance(v, int) or isinstance(v, bool) or not (0 <= v <= top or v == NO_VECTOR)
               for v in [config_vector, *vectors]):
            raise DeviceStateError(f"{w}: an MSI-X vector outside the table (0..{top}) that is not NO_VECTOR")
        if "msix" not in state:
            raise DeviceStateError(f"{w}: no 'msix'")
        if self.msix is None:
            if state["msix"] is not None:
                raise DeviceStateError(f"{w}: an MSI-X state for a function without MSI-X")
            msix = None
        else:
            msix = self.msix.check_state(state.get("msix"), w)
        # everything checked: apply
        self.apply_pci_state(pci)
        for k, v in regs.items():
            setattr(self, "_driver_features" if k == "driver_features" else k, v)
        self.error = error
        for q, cq in zip(self.queues, checked_queues):
            q.apply_state(cq)
        self._set_driver_features(self._driver_features)
        self.config_vector = config_vector
        self.queue_vectors = list(vectors)
        if self.msix is not None:
            self.msix.apply_state(msix)
        self.device.apply_state(device)
