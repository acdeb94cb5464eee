"""virtio (OASIS VIRTIO 1.2): split virtqueues, the PCI transport, and device types.

* ``queue``: split virtqueues read and written through a ``Dma`` view, hostile
  rings caught (``VirtqError``) with bounded work per notification.
* ``device``: ``VirtioDevice``, what a device type (block, network) supplies
  to a transport, and the status and reserved feature bits.
* ``pci``: ``VirtioPciFunction``, a transitional virtio PCI function (modern
  capabilities in BAR4, the legacy interface in BAR0, INTx) carrying one
  ``VirtioDevice``.
* ``blk``: ``VirtioBlk``, the block device type.

A board attaches one with vmm/platform/virtio.py (``attach_virtio_blk``).
"""
from devices.virtio.blk import VirtioBlk
from devices.virtio.device import VirtioDevice
from devices.virtio.pci import VirtioPciFunction
from devices.virtio.queue import Chain, SplitQueue, VirtqError

__all__ = ["Chain", "SplitQueue", "VirtioBlk", "VirtioDevice", "VirtioPciFunction", "VirtqError"]
