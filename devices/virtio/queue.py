"""Split virtqueues, read and written only through a ``Dma`` view.

Implements the device side of the OASIS VIRTIO 1.2 specification, 2.7
"Split Virtqueues" (the descriptor table, available ring and used ring of
2.7.5-2.7.8, indirect descriptors of 2.7.5.3, and the used/available buffer
notification suppression of 2.7.7 and 2.7.10 with VIRTIO_F_EVENT_IDX).

Guest memory is touched only through the ``Dma`` protocol (devices/base.py);
anything outside RAM raises ``DmaError`` there, before a byte moves.

A hostile ring never crashes the host and never makes it loop: every way a
driver can break a ring is caught here and raised as ``VirtqError``, which
the transport turns into QEMU's ``virtio_error`` (DEVICE_NEEDS_RESET, a
configuration change interrupt, and no further processing until reset):

* the available index moving ahead by more than the queue size (QEMU:
  "Guest moved used index");
* a chain head, or a ``next``, outside its descriptor table;
* a chain longer than its table: the spec forbids chains longer than the
  queue size (2.7.5.3.1), so a longer one is a loop;
* an indirect descriptor without VIRTIO_F_INDIRECT_DESC, inside an indirect
  table, with NEXT set (all forbidden to the driver by 2.7.5.3.1), or with a
  table length that is 0, not a multiple of 16, or above 1024 entries (QEMU's
  VIRTQUEUE_MAX_SIZE);
* a zero-length buffer (QEMU refuses them: "zero sized buffers are not
  allowed"; the spec does not allow them either, a buffer has a length);
* a device-readable descriptor after a device-writable one (2.7.4.2: "The
  driver MUST place any device-writable descriptor elements after any
  device-readable descriptor elements"; QEMU: "Incorrect order");
* rings or tables outside RAM (a ``DmaError`` on the ring itself).

Work per call is bounded: ``pop`` takes at most the queue size chains, each
at most ``size`` direct descriptors plus one indirect table of at most 1024;
the descriptor table and the available ring are read with one DMA each per
call.  Buffers (the data a chain points at) are not checked at pop time; the
device finds out when it moves the data, gets a ``DmaError`` and reports it.

State: a queue's configuration (size, enable, ring addresses) and its
position (``last_avail``: the next available entry the device will take;
``used_idx``: the next used entry it will write; the event-index bookkeeping)
are plain data (``save_state``/``check_state``/``apply_state``).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from devices.base import DeviceStateError, Dma, DmaError

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768          # 2.7: "The maximum Queue Size value is 32768"
MAX_INDIRECT = 1024             # entries in one indirect table (QEMU's VIRTQUEUE_MAX_SIZE)
NO_VECTOR = 0xFFFF
LEGACY_ALIGN = 4096             # the legacy PCI interface's ring alignment (4.1.5.1.3.1)

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")
_U64_LIMIT = 1 << 64


class VirtqError(Exception):
    """The driver broke a virtqueue; the device must stop and ask for a reset."""


@dataclass
class Chain:
    """One descriptor chain taken from the available ring: the head index and the
    buffers, device-readable (``out``) then device-writable (``inn``), as
    (guest-physical address, length) pairs."""

    head: int
    out: list[tuple[int, int]] = field(default_factory=list)
    inn: list[tuple[int, int]] = field(default_factory=list)

    @property
    def out_len(self) -> int:
        return sum(n for _, n in self.out)

    @property
    def in_len(self) -> int:
        return sum(n for _, n in self.inn)

    def read(self, dma: Dma, offset: int = 0, n: int | None = None) -> bytes:
        """``n`` bytes (default: all) of the readable part from byte ``offset``."""
        return gather(dma, self.out, offset, n)

    def write(self, dma: Dma, offset: int, data: bytes) -> int:
        """Write ``data`` into the writable part at byte ``offset``; returns the bytes written
        (fewer than ``len(data)`` when the buffers end first)."""
        return scatter(dma, self.inn, offset, data)


def slice_segments(segs: list[tuple[int, int]], offset: int, n: int | None) -> list[tuple[int, int]]:
    """The (address, length) pieces covering bytes [offset, offset+n) of ``segs`` laid end to end."""
    out = []
    pos = 0
    end = None if n is None else offset + n
    for addr, ln in segs:
        a = max(offset, pos)
        b = pos + ln if end is None else min(end, pos + ln)
        if a < b:
            out.append((addr + a - pos, b - a))
        pos += ln
        if end is not None and pos >= end:
            break
    return out


def gather(dma: Dma, segs: list[tuple[int, int]], offset: int = 0, n: int | None = None) -> bytes:
    pieces = slice_segments(segs, offset, n)
    if len(pieces) == 1:
        return dma.read(*pieces[0])
    return b"".join(dma.read(a, ln) for a, ln in pieces)


def scatter(dma: Dma, segs: list[tuple[int, int]], offset: int, data: bytes) -> int:
    done = 0
    mv = memoryview(data)
    for addr, ln in slice_segments(segs, offset, len(data)):
        dma.write(addr, mv[done:done + ln])
        done += ln
    return done


def legacy_layout(pa: int, size: int) -> tuple[int, int, int]:
    """(descriptor table, available ring, used ring) of a legacy ring at ``pa`` (2.7.2's
    legacy layout: the used ring starts at the next 4096-byte boundary)."""
    avail = pa + DESC_SIZE * size
    used = (avail + 2 * (3 + size) + LEGACY_ALIGN - 1) & ~(LEGACY_ALIGN - 1)
    return pa, avail, used


class SplitQueue:
    """One split virtqueue: its configuration, as the driver writes it through the
    transport, and the device's position in it."""

    __slots__ = ("avail", "desc", "enabled", "event_idx", "index", "indirect", "last_avail", "max_size",
                 "signalled_used", "signalled_valid", "size", "used", "used_idx")

    def __init__(self, index: int, max_size: int) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue {index}: size {max_size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        self.index = index
        self.max_size = max_size
        self.event_idx = False      # VIRTIO_F_EVENT_IDX negotiated
        self.indirect = False       # VIRTIO_F_INDIRECT_DESC negotiated
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.enabled = False
        self.desc = self.avail = self.used = 0
        self.last_avail = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_valid = False

    @property
    def ready(self) -> bool:
        return self.enabled and self.size > 0

    # -- the available ring ---------------------------------------------------------------
    def pending(self, dma: Dma) -> int:
        """How many chains the driver has made available and the device not yet taken."""
        try:
            idx = _U16.unpack(dma.read(self.avail + 2, 2))[0]
        except DmaError as e:
            raise VirtqError(f"queue {self.index}: available ring unreadable ({e})") from None
        n = (idx - self.last_avail) & 0xFFFF
        if n > self.size:
            raise VirtqError(f"queue {self.index}: the driver moved the available index from "
                             f"{self.last_avail} to {idx}, more than the queue size {self.size}")
        return n

    def pop(self, dma: Dma, limit: int | None = None) -> list[Chain]:
        """Take up to ``limit`` (default: all) available chains, in ring order."""
        size = self.size
        try:
            # the index and the ring in one transfer (the common case)
            avail = dma.read(self.avail + 2, 2 + 2 * size)
        except DmaError:
            avail = None
        if avail is None:
            n = self.pending(dma)       # names what is unreadable, as before
        else:
            n = (_U16.unpack_from(avail)[0] - self.last_avail) & 0xFFFF
            if n > size:
                self.pending(dma)       # raises: the driver moved the index too far
        if limit is not None:
            n = min(n, limit)
        chains: list[Chain] = []
        if n:
            try:
                ring = avail[2:] if avail is not None else dma.read(self.avail + 4, 2 * size)
                table = dma.read(self.desc, DESC_SIZE * size)
            except DmaError as e:
                raise VirtqError(f"queue {self.index}: ring or descriptor table unreadable ({e})") from None
            for _ in range(n):
                head = _U16.unpack_from(ring, 2 * (self.last_avail % size))[0]
                chains.append(self._walk(dma, table, head))
                self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx:
            # 2.7.10: ask for a notification when the driver makes the next chain available
            self._write(dma, self.used + 4 + 8 * self.size, _U16.pack(self.last_avail))
        return chains

    def unpop(self, n: int = 1) -> None:
        """Give back the last ``n`` chains taken (a device that could not use them yet)."""
        self.last_avail = (self.last_avail - n) & 0xFFFF

    def _walk(self, dma: Dma, table: bytes, head: int) -> Chain:
        size = self.size
        if head >= size:
            raise VirtqError(f"queue {self.index}: chain head {head} is outside the {size}-entry table")
        chain = Chain(head)
        out, inn = chain.out, chain.inn
        limit = size
        idx = head
        count = 0
        indirect = False
        while True:
            count += 1
            if count > limit:
                raise VirtqError(f"queue {self.index}: descriptor chain from {head} is longer than its "
                                 f"{limit}-entry table (a loop)")
            addr, ln, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * idx)
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqError(f"queue {self.index}: indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if indirect:
                    raise VirtqError(f"queue {self.index}: indirect descriptor inside an indirect table")
                if flags & DESC_F_NEXT:
                    raise VirtqError(f"queue {self.index}: indirect descriptor with NEXT set")
                if ln == 0 or ln % DESC_SIZE or ln // DESC_SIZE > MAX_INDIRECT:
                    raise VirtqError(f"queue {self.index}: indirect table of {ln} bytes")
                try:
                    table = dma.read(addr, ln)
                except DmaError as e:
                    raise VirtqError(f"queue {self.index}: indirect table unreadable ({e})") from None
                indirect = True
                limit = ln // DESC_SIZE
                idx = 0
                count = 0
                continue
            if ln == 0:
                # QEMU's virtqueue_map_desc: "zero sized buffers are not allowed"
                raise VirtqError(f"queue {self.index}: zero-length buffer in the chain from {head}")
            if addr + ln > _U64_LIMIT:
                raise VirtqError(f"queue {self.index}: buffer {addr:#x}+{ln:#x} wraps the address space")
            if flags & DESC_F_WRITE:
                inn.append((addr, ln))
            elif inn:
                raise VirtqError(f"queue {self.index}: device-readable buffer after a device-writable one")
            else:
                out.append((addr, ln))
            if not flags & DESC_F_NEXT:
                return chain
            idx = nxt
            if idx >= limit:
                raise VirtqError(f"queue {self.index}: next {nxt} is outside the {limit}-entry table")

    # -- the used ring ------------------------------------------------------------------
    def push(self, dma: Dma, head: int, length: int) -> None:
        """Put one used element (chain ``head``, ``length`` bytes written) in the used ring;
        the driver sees it once ``publish`` writes the index."""
        self._write(dma, self.used + 4 + 8 * (self.used_idx % self.size),
                    _USED_ELEM.pack(head & 0xFFFF_FFFF, length & 0xFFFF_FFFF))
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def publish(self, dma: Dma) -> bool:
        """Write the used index; True if the driver wants a notification (2.7.7.2)."""
        new = self.used_idx
        self._write(dma, self.used + 2, _U16.pack(new))
        if self.event_idx:
            valid, old = self.signalled_valid, self.signalled_used
            self.signalled_valid = True
            self.signalled_used = new
            event = _U16.unpack(self._read(dma, self.avail + 4 + 2 * self.size, 2))[0]
            return not valid or ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        flags = _U16.unpack(self._read(dma, self.avail, 2))[0]
        return not flags & AVAIL_F_NO_INTERRUPT

    def _write(self, dma: Dma, gpa: int, data: bytes) -> None:
        try:
            dma.write(gpa, data)
        except DmaError as e:
            raise VirtqError(f"queue {self.index}: used ring unwritable ({e})") from None

    def _read(self, dma: Dma, gpa: int, n: int) -> bytes:
        try:
            return dma.read(gpa, n)
        except DmaError as e:
            raise VirtqError(f"queue {self.index}: available ring unreadable ({e})") from None

    # -- state --------------------------------------------------------------------------
    FIELDS = ("size", "enabled", "desc", "avail", "used", "last_avail", "used_idx", "signalled_used",
              "signalled_valid")

    def save_state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.FIELDS}

    def check_state(self, st: Any) -> dict[str, Any]:
        """The fields of a saved queue, checked; raises DeviceStateError, changes nothing."""
        where = f"queue {self.index}"
        if not isinstance(st, dict):
            raise DeviceStateError(f"{where}: state must be a dict")
        out: dict[str, Any] = {}
        for k in self.FIELDS:
            if k not in st:
                raise DeviceStateError(f"{where}: no {k!r}")
            v = st[k]
            if k in ("enabled", "signalled_valid"):
                if not isinstance(v, bool):
                    raise DeviceStateError(f"{where}: {k} must be a bool")
            else:
                hi = {"size": self.max_size, "desc": _U64_LIMIT - 1, "avail": _U64_LIMIT - 1,
                      "used": _U64_LIMIT - 1}.get(k, 0xFFFF)
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
                    raise DeviceStateError(f"{where}: {k} must be an integer in 0..{hi:#x}")
            out[k] = v
        if out["size"] and out["size"] & (out["size"] - 1):
            raise DeviceStateError(f"{where}: size {out['size']} is not a power of two")
        if out["enabled"] and not out["size"]:
            raise DeviceStateError(f"{where}: enabled with size 0")
        return out

    def apply_state(self, checked: dict[str, Any]) -> None:
        for k, v in checked.items():
            setattr(self, k, v)
