"""What a virtio device type (block, network, ...) is, apart from its transport.

OASIS VIRTIO 1.2, chapter 2 "Basic Facilities of a Virtio Device": a device
has a status field (2.1), feature bits (2.2), notifications (2.3), a
device-specific configuration space (2.5) and virtqueues (2.7).  The
transport (devices/virtio/pci.py) owns the status field, the feature
negotiation, the virtqueues' configuration and the interrupts; a device type
subclasses ``VirtioDevice`` and supplies the rest:

* identity: ``device_id`` (5 "Device Types"), ``pci_class`` (the PCI class
  code QEMU gives it), ``queue_sizes`` (the maximum size of each virtqueue);
* ``features``: the device-type feature bits it offers (the transport adds
  VERSION_1, INDIRECT_DESC and EVENT_IDX), ``legacy_features``: extra bits
  offered only through a legacy interface;
* ``config()``: the device-specific configuration space as bytes (little
  endian, read fresh on every access), ``config_write(offset, data)``;
* ``validate_features(features)``: may refuse a feature set the driver
  accepts (FEATURES_OK then stays clear);
* ``activate()``: DRIVER_OK was set, features are final;
* ``queue_notify(index)``: the driver notified virtqueue ``index`` (only
  while the transport lets the device consume buffers);
* ``reset()``: a device reset (status 0 or PCI reset): forget in-flight
  work, cancel timers, raise nothing;
* ``save_state()`` / ``check_state(state)`` / ``apply_state(checked)``: the
  device type's own state as plain data, checked completely before anything
  changes (the transport nests it in its own state).

The transport is reached through ``self.transport`` (set by ``bind``):

* ``dma``, ``clock``: guest memory and the machine's virtual clock;
* ``queues``: the ``SplitQueue`` objects; ``pop(index, limit)`` takes
  available chains (a broken ring marks the device broken and returns []),
  ``push(index, head, length)`` returns one, ``notify_used(index)`` publishes
  the used index and interrupts the driver if it asked for it;
* ``has_feature(bit)``, ``driver_features``: what was negotiated;
* ``device_error(why)``: QEMU's ``virtio_error``: DEVICE_NEEDS_RESET, a
  configuration interrupt, and no more processing until reset; ``broken``;
* ``config_changed()``: the configuration space changed (generation and
  interrupt).
"""
from __future__ import annotations

from typing import Any

from devices.base import DeviceStateError, State, check_state

# Device status bits (2.1)
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
NEEDS_RESET = 64
FAILED = 128

# Reserved (transport and ring) feature bits (6 "Reserved Feature Bits")
F_NOTIFY_ON_EMPTY = 24          # legacy only
F_ANY_LAYOUT = 27               # legacy only
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34

# Device ids (5 "Device Types")
ID_NET = 1
ID_BLOCK = 2


def bit(n: int) -> int:
    return 1 << n


class VirtioDevice:
    """Base class of a virtio device type; see the module docstring."""

    device_id = 0
    pci_class = 0xFF0000
    kind = "virtio_device"
    VERSION = 1
    queue_sizes: tuple[int, ...] = ()
    features = 0
    legacy_features = 0

    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: Any = None

    def bind(self, transport: Any) -> None:
        self.transport = transport

    def config(self) -> bytes:
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """The driver wrote device-specific configuration (read-only by default)."""

    def validate_features(self, features: int) -> bool:
        return True

    def activate(self) -> None:
        """DRIVER_OK: the negotiated features are final."""

    def queue_notify(self, index: int) -> None:
        """The driver made buffers available in queue ``index``."""

    def reset(self) -> None:
        """Device reset: drop in-flight work and timers, raise nothing."""

    def save_state(self) -> State:
        return {"kind": self.kind, "version": self.VERSION}

    def check_state(self, state: Any) -> Any:
        """Check a saved state completely and return what ``apply_state`` needs."""
        check_state(state, self.kind, self.VERSION)
        return None

    def apply_state(self, checked: Any) -> None:
        """Load a state ``check_state`` accepted (no interrupt, no other device touched)."""

    def load_state(self, state: State) -> None:
        self.apply_state(self.check_state(state))


def state_int(st: dict, key: str, lo: int, hi: int, where: str) -> int:
    """``st[key]``, an int in [lo, hi], or DeviceStateError."""
    if key not in st:
        raise DeviceStateError(f"{where}: no {key!r}")
    v = st[key]
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise DeviceStateError(f"{where}: {key} must be an integer in {lo}..{hi:#x}")
    return v


def state_bool(st: dict, key: str, where: str) -> bool:
    if key not in st:
        raise DeviceStateError(f"{where}: no {key!r}")
    v = st[key]
    if not isinstance(v, bool):
        raise DeviceStateError(f"{where}: {key} must be a bool")
    return v
