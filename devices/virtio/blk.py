"""virtio-blk: a block device on a virtio transport.

Implements OASIS VIRTIO 1.2, 5.2 "Block Device" (device id 2, one request
queue of 256 entries):

* features offered: SIZE_MAX, SEG_MAX, BLK_SIZE (512), FLUSH, DISCARD and
  WRITE_ZEROES, or RO instead of the last two for a read-only disk; the
  configuration space is ``struct virtio_blk_config`` up to the zoned
  characteristics (96 bytes): capacity in 512-byte sectors, size_max
  (64 KiB), seg_max (126, the queue size less header and status, as QEMU's
  seg-max-adjust), blk_size, the discard and write-zeroes limits;
* requests (5.2.6): IN, OUT, FLUSH, GET_ID (the serial, NUL-padded to 20
  bytes), DISCARD and WRITE_ZEROES (segments of sector, count, flags);
  anything else gets VIRTIO_BLK_S_UNSUPP.  The status byte is the last
  device-writable byte of the chain; the used length counts the bytes
  written into the chain (data and status).

Requests are taken from the ring when the driver notifies (header read
then) and complete in order.  Two service models, both deterministic:

* timed (the default): the disk serves one request at a time, each taking
  ``LATENCY_TICKS`` plus one tick per ``BYTES_PER_TICK`` bytes moved, from
  the later of its submission and the previous request's completion; the
  data moves, the status byte is written and the used ring updated when
  the request completes, on the clock's timer named ``"<name>.complete"``;
* immediate (``timed=False``, what the pc board attaches): a disk with no
  service time.  Requests complete inside the notification that made them
  available (the data moved, the used ring updated and the interrupt sent
  before the driver's notify write retires), unless requests of a restored
  timed state are still in flight, which the new ones follow in order.
  A request costs the guest no timer, interrupt-window or HLT exit; the
  virtio spec lets a device use buffers as soon as they are available
  (2.7.13), and drivers take the used-buffer notification whenever it comes.

Either way a FLUSH covers every write that completed before it (5.2.6.4's
"stable" writes), and without FLUSH negotiated every write is flushed
before it completes (5.2.6.4, case 1).

Error handling:

* a malformed request whose status byte can be written fails with
  VIRTIO_BLK_S_IOERR (sector range past the end, a length that is not a
  multiple of 512, more than seg_max x size_max bytes, a write to a
  read-only disk, an error from the image) or VIRTIO_BLK_S_UNSUPP (an
  unknown type, unknown discard flags, discard with the unmap flag, more
  segments than advertised), as 5.2.6.2 requires;
* a chain without a 16-byte header or without a status byte, or whose
  buffers are not RAM, cannot be answered at all: the device reports
  ``device_error`` (QEMU's virtio_error: "virtio-blk missing headers",
  "bogus descriptor"), which sets DEVICE_NEEDS_RESET.

The backing store is duck-typed: ``read(offset, n)``, ``write(offset,
data)``, ``flush()``, ``size``, and optionally ``discard(offset, n)`` and
``writable``.  host/images' ``BlockImage`` (raw, qcow2, linked clones) is
one; the device never imports host/.  Disk contents are not device state:
the state holds the queue of in-flight requests (parsed headers, buffer
addresses, deadlines) and the time the disk is busy until.
"""
from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Any

from devices.base import DeviceStateError, DmaError, State, check_state
from devices.virtio.device import ID_BLOCK, VirtioDevice, bit, state_int
from devices.virtio.queue import MAX_INDIRECT, Chain, gather, scatter, slice_segments

SECTOR = 512

# feature bits (5.2.3)
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_GEOMETRY = 4
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_CONFIG_WCE = 11
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14

# request types and status values (5.2.6)
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_GET_LIFETIME, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 10, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_BYTES = 20
WZ_FLAG_UNMAP = 1

QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2
SIZE_MAX = 64 << 10
MAX_REQUEST = SEG_MAX * SIZE_MAX            # the largest IN/OUT a driver that honours the limits sends
MAX_DISCARD_SECTORS = 0x40_0000             # 2 GiB per discard segment
MAX_DISCARD_SEG = 16
MAX_WRITE_ZEROES_SECTORS = 0x8000           # 16 MiB: zeros are written, so keep one request short
MAX_WRITE_ZEROES_SEG = 1
CONFIG_SIZE = 96
CHUNK = 1 << 20                             # zeros written in pieces of this size

LATENCY_TICKS = 2_000                       # 20 us of virtual time per request
BYTES_PER_TICK = 10                         # 1 GB/s: one 10 ns tick per 10 bytes

_HDR = struct.Struct("<IIQ")
_DWZ = struct.Struct("<QII")


@dataclass
class Request:
    """One request between the ring and its completion."""

    queue: int
    head: int
    type: int
    sector: int
    data: list[tuple[int, int]]     # the data buffers: device-writable for IN/GET_ID, readable otherwise
    status: int                     # guest-physical address of the status byte
    written_max: int                # bytes of the chain's writable part (the used length's bound)
    deadline: int

    @property
    def length(self) -> int:
        return sum(n for _, n in self.data)

    def save(self) -> dict[str, Any]:
        return {"queue": self.queue, "head": self.head, "type": self.type, "sector": self.sector,
                "data": [[a, n] for a, n in self.data], "status": self.status,
                "written_max": self.written_max, "deadline": self.deadline}


class VirtioBlk(VirtioDevice):
    """virtio-blk over ``block`` (see the module docstring).  ``serial`` is what
    GET_ID returns (at most 20 bytes); ``timed`` chooses the service model (the module
    docstring)."""

    device_id = ID_BLOCK
    pci_class = 0x010000                    # mass storage, SCSI: QEMU's class for virtio-blk-pci
    kind = "virtio_blk"
    VERSION = 1
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, block: Any, name: str = "virtio-blk0", serial: str | bytes = b"",
                 read_only: bool | None = None, timed: bool = True) -> None:
        super().__init__(name)
        self.timed = timed                  # configuration (built the same way on restore), not state
        size = int(block.size)
        if size < 0:
            raise ValueError(f"{name}: a disk of {size} bytes")
        self.block = block
        self.size = size
        self.capacity = size // SECTOR
        serial = serial.encode() if isinstance(serial, str) else bytes(serial)
        if len(serial) > ID_BYTES:
            raise ValueError(f"{name}: serial {serial!r} is longer than {ID_BYTES} bytes")
        self.serial = serial
        self.read_only = (not getattr(block, "writable", True)) if read_only is None else read_only
        self.features = bit(F_SIZE_MAX) | bit(F_SEG_MAX) | bit(F_BLK_SIZE) | bit(F_FLUSH)
        if self.read_only:
            self.features |= bit(F_RO)
        else:
            self.features |= bit(F_DISCARD) | bit(F_WRITE_ZEROES)
        self._config = self._build_config()
        self.inflight: deque[Request] = deque()
        self.busy_until = 0
        self._timer: Any = None
        self.io_errors = 0                   # errors the image raised (each failed one request)
        self.last_io_error = ""
        self.completed = 0

    @property
    def timer_name(self) -> str:
        return f"{self.name}.complete"

    def _build_config(self) -> bytes:
        c = bytearray(CONFIG_SIZE)
        struct.pack_into("<QII", c, 0, self.capacity, SIZE_MAX, SEG_MAX)
        struct.pack_into("<I", c, 20, SECTOR)                          # blk_size
        struct.pack_into("<H", c, 34, 1)                               # num_queues
        if not self.read_only:
            struct.pack_into("<IIIII", c, 36, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1,
                             MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG)
            c[56] = 1                                                  # write_zeroes_may_unmap
        return bytes(c)

    def config(self) -> bytes:
        return self._config

    # -- taking requests --------------------------------------------------------------------
    def queue_notify(self, index: int) -> None:
        t = self.transport
        chains = t.pop(index)
        if not chains:
            return
        now = t.clock.now()
        for chain in chains:
            req = self._parse(index, chain, now)
            if req is None:
                return          # the device is broken: it takes and returns nothing more
            self.inflight.append(req)
        if not self.timed and self.inflight[0].deadline <= now:
            # immediate service: complete them now, inside the notification
            if self._timer is not None:
                self._timer.cancel()
            self._complete(now)
        elif self._timer is None:
            self._arm()

    def _parse(self, qi: int, chain: Chain, now: int) -> Request | None:
        t = self.transport
        if chain.out_len < _HDR.size or chain.in_len < 1:
            t.device_error(f"{self.name}: request without a header or a status byte (chain {chain.head})")
            return None
        try:
            rtype, _, sector = _HDR.unpack(chain.read(t.dma, 0, _HDR.size))
        except DmaError as e:
            t.device_error(f"{self.name}: request header unreadable ({e})")
            return None
        in_len = chain.in_len
        last_addr, last_len = chain.inn[-1]
        status = last_addr + last_len - 1
        if rtype in (T_IN, T_GET_ID):
            data = slice_segments(chain.inn, 0, in_len - 1)
        else:
            data = slice_segments(chain.out, _HDR.size, None)
        deadline = max(now, self.busy_until)
        if self.timed:
            moved = sum(n for _, n in data) if rtype in (T_IN, T_OUT) else 0
            deadline += LATENCY_TICKS + min(moved, MAX_REQUEST) // BYTES_PER_TICK
        self.busy_until = deadline
        return Request(qi, chain.head, rtype, sector, data, status, in_len, deadline)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.inflight:
            self._timer = self.transport.clock.schedule(self.inflight[0].deadline, self._complete,
                                                        self.timer_name)

    # -- completing them --------------------------------------------------------------------
    def _complete(self, now: int) -> None:
        self._timer = None
        t = self.transport
        touched: list[int] = []
        while self.inflight and self.inflight[0].deadline <= now and not t.broken:
            req = self.inflight.popleft()
            result = self._execute(req)
            if result is None:
                break
            status, written = result
            try:
                t.dma.write(req.status, bytes((status,)))
            except DmaError as e:
                t.device_error(f"{self.name}: status byte unwritable ({e})")
                break
            t.push(req.queue, req.head, min(written + 1, req.written_max))
            self.completed += 1
            if req.queue not in touched:
                touched.append(req.queue)
        if t.broken:
            self.inflight.clear()
            return
        for qi in touched:
            t.notify_used(qi)
        self._arm()

    def _range_ok(self, sector: int, length: int) -> bool:
        return sector <= self.capacity and sector * SECTOR + length <= self.capacity * SECTOR

    def _execute(self, req: Request) -> tuple[int, int] | None:
        """(status, bytes written into the chain's data), or None after a device error."""
        t = self.transport
        try:
            if req.type == T_IN:
                n = req.length
                if n % SECTOR or n > MAX_REQUEST or not self._range_ok(req.sector, n):
                    return S_IOERR, 0
                data = self._io(self.block.read, req.sector * SECTOR, n)
                if data is None:
                    return S_IOERR, 0
                return S_OK, scatter(t.dma, req.data, 0, data)
            if req.type == T_OUT:
                n = req.length
                if self.read_only or n % SECTOR or n > MAX_REQUEST or not self._range_ok(req.sector, n):
                    return S_IOERR, 0
                data = gather(t.dma, req.data)
                ok = self._io(self.block.write, req.sector * SECTOR, data)
                if ok is not None and not t.has_feature(F_FLUSH):
                    ok = self._io(self.block.flush)
                return (S_OK if ok is not None else S_IOERR), 0
            if req.type == T_FLUSH:
                return (S_OK if self._io(self.block.flush) is not None else S_IOERR), 0
            if req.type == T_GET_ID:
                ident = self.serial.ljust(ID_BYTES, b"\0")[:min(ID_BYTES, req.length)]
                return S_OK, scatter(t.dma, req.data, 0, ident)
            if req.type in (T_DISCARD, T_WRITE_ZEROES):
                return self._discard_or_zero(req), 0
            return S_UNSUPP, 0
        except DmaError as e:
            t.device_error(f"{self.name}: request buffer is not RAM ({e})")
            return None

    def _io(self, op: Any, *args: Any) -> Any:
        """``op(*args)``, one call into the image; None (and a count) if it raised: the request fails."""
        try:
            r = op(*args)
        except Exception as e:   # noqa: BLE001 - any image error fails the one request (IOERR), as QEMU's werror=report
            self.io_errors += 1
            self.last_io_error = f"{type(e).__name__}: {e}"[:300]
            return None
        return True if r is None else r

    def _discard_or_zero(self, req: Request) -> int:
        t = self.transport
        zero = req.type == T_WRITE_ZEROES
        if not t.has_feature(F_WRITE_ZEROES if zero else F_DISCARD):
            return S_UNSUPP
        if self.read_only:
            return S_IOERR
        n = req.length
        if n == 0 or n % _DWZ.size:
            return S_IOERR
        if n // _DWZ.size > (MAX_WRITE_ZEROES_SEG if zero else MAX_DISCARD_SEG):
            return S_UNSUPP
        raw = gather(t.dma, req.data)
        segs = [_DWZ.unpack_from(raw, i) for i in range(0, n, _DWZ.size)]
        limit = MAX_WRITE_ZEROES_SECTORS if zero else MAX_DISCARD_SECTORS
        for sector, count, flags in segs:
            if flags & ~WZ_FLAG_UNMAP or (not zero and flags & WZ_FLAG_UNMAP):
                return S_UNSUPP
            if count > limit or not self._range_ok(sector, count * SECTOR):
                return S_IOERR
        discard = getattr(self.block, "discard", None)
        for sector, count, flags in segs:
            off, length = sector * SECTOR, count * SECTOR
            if not length:
                continue
            if discard is not None and (not zero or flags & WZ_FLAG_UNMAP):
                # the image reads a discarded range as zeros (host/images/base.py), so an unmap
                # satisfies write-zeroes too
                if self._io(discard, off, length) is None:
                    return S_IOERR
            elif zero:
                for pos in range(off, off + length, CHUNK):
                    piece = min(CHUNK, off + length - pos)
                    if self._io(self.block.write, pos, bytes(piece)) is None:
                        return S_IOERR
        return S_OK

    # -- reset and state --------------------------------------------------------------------
    def reset(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.inflight.clear()
        self.busy_until = 0

    def save_state(self) -> State:
        return {"kind": self.kind, "version": self.VERSION, "busy_until": self.busy_until,
                "inflight": [r.save() for r in self.inflight]}

    def check_state(self, state: Any) -> Any:
        check_state(state, self.kind, self.VERSION)
        w = self.kind
        busy = state_int(state, "busy_until", 0, (1 << 63) - 1, w)
        raw = state.get("inflight")
        limit = sum(self.queue_sizes)
        if not isinstance(raw, list) or len(raw) > limit:
            raise DeviceStateError(f"{w}: inflight must be a list of at most {limit} requests")
        reqs = []
        last = 0
        for r in raw:
            if not isinstance(r, dict):
                raise DeviceStateError(f"{w}: an in-flight request must be a dict")
            data = r.get("data")
            if not isinstance(data, list) or len(data) > QUEUE_SIZE + MAX_INDIRECT:
                raise DeviceStateError(f"{w}: request data must be a list of (address, length)")
            segs = []
            for seg in data:
                if (not isinstance(seg, list) or len(seg) != 2
                        or not all(isinstance(x, int) and not isinstance(x, bool) for x in seg)
                        or not 0 <= seg[0] < 1 << 64 or not 1 <= seg[1] < 1 << 32):
                    raise DeviceStateError(f"{w}: bad data segment {seg!r}")
                segs.append((seg[0], seg[1]))
            req = Request(queue=state_int(r, "queue", 0, len(self.queue_sizes) - 1, w),
                          head=state_int(r, "head", 0, 0xFFFF, w),
                          type=state_int(r, "type", 0, 0xFFFF_FFFF, w),
                          sector=state_int(r, "sector", 0, (1 << 64) - 1, w),
                          data=segs, status=state_int(r, "status", 0, (1 << 64) - 1, w),
                          written_max=state_int(r, "written_max", 1, 1 << 48, w),
                          deadline=state_int(r, "deadline", 0, (1 << 63) - 1, w))
            if req.deadline < last:
                raise DeviceStateError(f"{w}: in-flight requests out of completion order")
            last = req.deadline
            reqs.append(req)
        return busy, reqs

    def apply_state(self, checked: Any) -> None:
        busy, reqs = checked
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.busy_until = busy
        self.inflight = deque(reqs)
        self._arm()
