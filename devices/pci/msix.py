"""MSI-X for a PCI function: the capability, the vector table and the pending bits.

Implements PCI Local Bus Specification 3.0, 6.8.2 "MSI-X Capability and
Table Structures", as virtio-pci (devices/virtio/pci.py) uses it:

* the capability (id 0x11, 12 bytes): Message Control (table size N-1
  read-only; Function Mask, bit 14, and MSI-X Enable, bit 15, read/write),
  Table Offset/BIR and PBA Offset/BIR (read-only).  The table and the PBA
  live in one 4 KiB memory BAR of their own, the table at 0 and the pending
  bit array at 0x800, where QEMU's ``msix_init_exclusive_bar`` puts them;
* the table (6.8.2.6-6.8.2.9): per vector the message address (low, high),
  the message data and the vector control word, whose bit 0 masks the
  vector; at reset every vector is masked and every field else is 0.  The
  table is read and written in dwords (the BAR declares 4-byte accesses; the
  bus splits a qword).  Only the mask bit of vector control is writable;
* the pending bit array (6.8.2.10): read-only; a vector signalled while it
  or the whole function is masked sets its bit, and unmasking (the vector's
  bit, Function Mask, or MSI-X Enable going on) sends the message and clears
  it.

A message is the dword write of the vector's data to its address (6.8.2),
handed to ``send(address, data)`` (the APIC bus's ``send_msi``).  It is a
memory write by the function, so with bus mastering off it goes nowhere:
QEMU sends it through the function's bus-master address space, which is
disabled then, so the message is dropped, not held pending.

While MSI-X is enabled the function may not use INTx# (6.8.2: "the function
is prohibited from using its INTA# pin"): turning MSI-X on deasserts it; the
owner asks ``enabled`` before choosing which to signal.

State: the table and the pending bits, as bytes (the capability's registers
are in the configuration space the function saves).
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from devices.base import DeviceStateError

PCI_CAP_ID_MSIX = 0x11
CAP_LEN = 12
BAR_SIZE = 0x1000
TABLE_OFF = 0x000
PBA_OFF = 0x800
ENTRY = 16
MAX_VECTORS = (PBA_OFF - TABLE_OFF) // ENTRY     # 128 fit below the PBA

CTRL_ENABLE = 1 << 15
CTRL_FUNCTION_MASK = 1 << 14
VECTOR_MASKED = 1

_CMD_MASTER = 1 << 2
_COMMAND = 0x04
_ENTRY = struct.Struct("<IIII")


class Msix:
    """The MSI-X capability and table of PCI function ``fn`` (see the module docstring);
    ``bar`` is the BAR index it claims for the table and PBA."""

    mmio_sizes = (4,)

    def __init__(self, fn: Any, vectors: int, bar: int, send: Callable[[int, int], Any]) -> None:
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"{fn.name}: {vectors} MSI-X vectors (1..{MAX_VECTORS})")
        self.fn = fn
        self.vectors = vectors
        self.send = send
        self.pba_len = 8 * ((vectors + 63) // 64)        # whole qwords (6.8.2.10)
        n = vectors - 1
        self.cap = fn.add_capability(
            PCI_CAP_ID_MSIX, CAP_LEN,
            data=struct.pack("<HII", n, TABLE_OFF | bar, PBA_OFF | bar),
            wmask=bytes([0, (CTRL_ENABLE | CTRL_FUNCTION_MASK) >> 8]))
        fn.add_bar(bar, BAR_SIZE, self)
        self.table = bytearray(ENTRY * vectors)
        self.pending = 0                                  # bit v: vector v is pending
        self.sent = 0                                     # messages sent (a count for benchmarks)
        self.reset()

    # -- the capability ------------------------------------------------------------------
    @property
    def control(self) -> int:
        c = self.cap + 2
        return self.fn.config[c] | self.fn.config[c + 1] << 8

    @property
    def enabled(self) -> bool:
        return bool(self.control & CTRL_ENABLE)

    def config_written(self, offset: int, size: int, old_control: int) -> None:
        """The function's configuration space was written; ``old_control`` is Message Control
        before the write.  Turning MSI-X on deasserts INTx; unmasking sends what is pending."""
        c = self.cap + 2
        if not (offset < c + 2 and c < offset + size):
            return
        new = self.control
        if new & CTRL_ENABLE and not old_control & CTRL_ENABLE:
            self.fn.set_irq(False)
        if self.pending and self._function_open(new) and not self._function_open(old_control):
            self._flush_pending()

    @staticmethod
    def _function_open(control: int) -> bool:
        return bool(control & CTRL_ENABLE) and not control & CTRL_FUNCTION_MASK

    # -- signalling ------------------------------------------------------------------------
    def notify(self, vector: int) -> None:
        """Signal ``vector`` (ignored if outside the table): send it, or hold it pending while masked."""
        if not 0 <= vector < self.vectors:
            return
        if not self._function_open(self.control) or self._masked(vector):
            self.pending |= 1 << vector
            return
        self._send(vector)

    def _masked(self, vector: int) -> bool:
        return bool(self.table[ENTRY * vector + 12] & VECTOR_MASKED)

    def _send(self, vector: int) -> None:
        lo, hi, data, _ = _ENTRY.unpack_from(self.table, ENTRY * vector)
        cmd = self.fn.config[_COMMAND]
        if not cmd & _CMD_MASTER:
            return          # a memory write with bus mastering off: dropped, as QEMU's bus-master space
        self.sent += 1
        self.send(hi << 32 | lo, data)

    def _flush_pending(self) -> None:
        for v in range(self.vectors):
            if self.pending >> v & 1 and not self._masked(v):
                self.pending &= ~(1 << v)
                self._send(v)

    # -- the table and PBA BAR ----------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        if TABLE_OFF <= offset < TABLE_OFF + len(self.table):
            return int.from_bytes(self.table[offset - TABLE_OFF:offset - TABLE_OFF + 4], "little")
        if PBA_OFF <= offset < PBA_OFF + self.pba_len:
            return (self.pending >> (8 * (offset - PBA_OFF))) & 0xFFFF_FFFF
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if not TABLE_OFF <= offset < TABLE_OFF + len(self.table):
            return          # the PBA is read-only, the rest of the BAR reserved
        off = offset - TABLE_OFF
        vector, field = divmod(off, ENTRY)
        if field == 12:
            was = self._masked(vector)
            value &= VECTOR_MASKED         # the other bits of vector control are reserved
            self.table[off:off + 4] = value.to_bytes(4, "little")
            if was and not value & VECTOR_MASKED and self.pending >> vector & 1 \
                    and self._function_open(self.control):
                self.pending &= ~(1 << vector)
                self._send(vector)
            return
        if field == 0:
            value &= ~3         # message address bits 1:0 are reserved (dword aligned)
        self.table[off:off + 4] = (value & 0xFFFF_FFFF).to_bytes(4, "little")

    # -- reset and state -------------------------------------------------------------------------
    def reset(self) -> None:
        """6.8.2: every vector masked, addresses and data 0, nothing pending (the capability's
        registers are reset with the configuration space)."""
        self.table[:] = bytes(len(self.table))
        for v in range(self.vectors):
            self.table[ENTRY * v + 12] = VECTOR_MASKED
        self.pending = 0

    def save_state(self) -> dict[str, Any]:
        return {"table": bytes(self.table), "pending": self.pending}

    def check_state(self, st: Any, where: str) -> tuple[bytes, int]:
        if not isinstance(st, dict):
            raise DeviceStateError(f"{where}: msix must be a dict")
        table, pending = st.get("table"), st.get("pending")
        if isinstance(table, list) and all(isinstance(b, int) and 0 <= b <= 0xFF for b in table):
            table = bytes(table)
        if not isinstance(table, (bytes, bytearray)) or len(table) != len(self.table):
            raise DeviceStateError(f"{where}: msix table must be {len(self.table)} bytes")
        if any(table[ENTRY * v + 12] & ~VECTOR_MASKED or any(table[ENTRY * v + 13:ENTRY * v + 16])
               for v in range(self.vectors)):
            raise DeviceStateError(f"{where}: msix vector control has reserved bits set")
        if not isinstance(pending, int) or isinstance(pending, bool) or not 0 <= pending < 1 << self.vectors:
            raise DeviceStateError(f"{where}: msix pending must be an integer of {self.vectors} bits")
        return bytes(table), pending

    def apply_state(self, checked: tuple[bytes, int]) -> None:
        self.table[:], self.pending = checked
