"""Conformance rig for virtio-blk on the virtio PCI transport (devices/virtio), loaded by
test_conformance.py, and the pieces tests/devices/test_virtio.py drives the device with.

* ``Ram``: guest RAM at 0..size behind the ``Dma`` protocol (anything else raises
  ``DmaError`` before a byte moves), saved and restored as a rig peer; it counts accesses.
* ``MemDisk``: a disk in a bytearray with the duck-typed block interface, also a peer
  (disk contents are not device state, but a restored rig must see the same disk).
* ``Driver``: plays the guest's side as Linux's virtio_pci_modern and virtio_ring do:
  finds the capabilities by walking the list, negotiates features, sets up queues,
  puts descriptor chains in the rings, notifies, and reads the used ring; ``legacy=True``
  does the same through the legacy I/O BAR.

The rig's device is the ``VirtioPciFunction``; its MMIO window is the first 0x400 bytes
of BAR4 (common configuration, ISR, device configuration, the notify registers).  Host
operations bring the device up as a driver would, submit block requests of every type
(some malformed), scribble on the rings, and use the legacy BAR and the PCI
configuration window, logging what the guest would see.
"""
from __future__ import annotations

import hashlib
import struct
import sys
from dataclasses import dataclass
from typing import Any

from devices.base import DeviceStateError, check_state
from devices.bus import IoBus, MmioBus
from devices.clock import VirtualClock
from devices.pci.function import CMD_IO, CMD_MASTER, CMD_MEMORY, COMMAND
from devices.virtio import blk as vb
from devices.virtio.blk import VirtioBlk
from devices.virtio.device import ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK
from devices.virtio.pci import VirtioPciFunction
from devices.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, legacy_layout
from tests.devices.rigs_fw_cfg import FakeRam


class Ram(FakeRam):
    """Guest RAM at 0..size behind the Dma protocol (fw_cfg's rig RAM), counting accesses."""

    def __init__(self, size: int = 0x40000) -> None:
        super().__init__(size)
        self.reads = 0
        self.writes = 0

    def read(self, gpa: int, n: int) -> bytes:
        self.reads += 1
        return super().read(gpa, n)

    def write(self, gpa: int, data: bytes) -> None:
        self.writes += 1
        super().write(gpa, bytes(data))


class MemDisk:
    """A disk in memory: read, write, flush, discard, size (and a log of flushes)."""

    kind = "virtio_rig_disk"

    def __init__(self, size: int = 64 * 512, writable: bool = True) -> None:
        self.data = bytearray(size)
        self.size = size
        self.writable = writable
        self.flushes = 0
        self.fail = False               # make every call raise (an image error)

    def _io(self, offset: int, n: int) -> None:
        if self.fail:
            raise OSError(5, "Input/output error")
        assert 0 <= offset and offset + n <= self.size, (offset, n)

    def read(self, offset: int, n: int) -> bytes:
        self._io(offset, n)
        return bytes(self.data[offset:offset + n])

    def write(self, offset: int, data: bytes) -> None:
        self._io(offset, len(data))
        assert self.writable
        self.data[offset:offset + len(data)] = data

    def discard(self, offset: int, n: int) -> None:
        self._io(offset, n)
        self.data[offset:offset + n] = bytes(n)

    def flush(self) -> None:
        self._io(0, 0)
        self.flushes += 1

    def save_state(self) -> dict:
        return {"kind": self.kind, "version": 1, "data": bytes(self.data), "flushes": self.flushes}

    def load_state(self, state: dict) -> None:
        check_state(state, self.kind, 1)
        data = state.get("data")
        if not isinstance(data, bytes) or len(data) != self.size or not isinstance(state.get("flushes"), int):
            raise DeviceStateError("virtio_rig_disk: data must be the disk's bytes")
        self.data[:] = data
        self.flushes = state["flushes"]


# -- a driver -----------------------------------------------------------------------------------
BAR0 = 0xC000
BAR4 = 0xFEB0_0000


@dataclass
class Blk:
    """A virtio-blk PCI function with its RAM, disk, clock and buses."""

    fn: VirtioPciFunction
    ram: Ram
    disk: MemDisk
    clock: VirtualClock
    io: IoBus
    mmio: MmioBus

    def driver(self, legacy: bool = False) -> Driver:
        return Driver(self.fn, self.io, self.mmio, self.ram, legacy=legacy)


def make_blk(disk: MemDisk | None = None, ram: Ram | None = None, clock: VirtualClock | None = None,
             transitional: bool = True, msi: Any = None, **kw: Any) -> Blk:
    disk = disk or MemDisk()
    ram = ram or Ram()
    clock = clock or VirtualClock()
    io, mmio = IoBus(), MmioBus()
    fn = VirtioPciFunction(VirtioBlk(disk, **kw), io_bus=io, mmio_bus=mmio, dma=ram, clock=clock,
                           transitional=transitional, msi=msi)
    return Blk(fn, ram, disk, clock, io, mmio)


class Driver:
    """The guest side, through configuration space and the buses the function's BARs map on."""

    RINGS = 0x1000          # ring memory: queue i at RINGS + i * 0x4000
    BUFS = 0x20000          # buffers and indirect tables from here

    def __init__(self, fn: VirtioPciFunction, io: IoBus, mmio: MmioBus, ram: Ram, legacy: bool = False) -> None:
        self.fn, self.io, self.mmio, self.ram, self.legacy = fn, io, mmio, ram, legacy
        if fn.transitional:
            fn.config_write(0x10, 4, BAR0)
        fn.config_write(0x20, 4, BAR4)
        fn.config_write(COMMAND, 2, CMD_IO | CMD_MEMORY | CMD_MASTER)
        self.caps = self.find_caps()
        self.queues: dict[int, dict] = {}
        self.next_buf = self.BUFS

    # -- configuration space, as Linux's virtio_pci_find_capability walks it
    def find_caps(self) -> dict[int, dict]:
        fn = self.fn
        caps: dict[int, dict] = {}
        ptr = fn.config_read(0x34, 1) & 0xFC
        seen = set()
        while ptr and ptr not in seen:
            seen.add(ptr)
            if fn.config_read(ptr, 1) == 0x09:
                cfg_type = fn.config_read(ptr + 3, 1)
                bar = fn.config_read(ptr + 4, 1)
                if bar <= 5 and cfg_type not in caps:
                    caps[cfg_type] = {"at": ptr, "bar": bar, "offset": fn.config_read(ptr + 8, 4),
                                      "length": fn.config_read(ptr + 12, 4), "cap_len": fn.config_read(ptr + 2, 1)}
                    if cfg_type == 2:
                        caps[cfg_type]["mult"] = fn.config_read(ptr + 16, 4)
            ptr = fn.config_read(ptr + 1, 1) & 0xFC
        return caps

    def _addr(self, cfg_type: int, off: int) -> int:
        c = self.caps[cfg_type]
        base = self.fn.config_read(0x10 + 4 * c["bar"], 4) & ~0xF
        return base + c["offset"] + off

    def common_read(self, off: int, size: int) -> int:
        return self.mmio.read(self._addr(1, off), size)

    def common_write(self, off: int, size: int, value: int) -> None:
        self.mmio.write(self._addr(1, off), size, value)

    def isr(self) -> int:
        if self.legacy:
            return self.io.read(BAR0 + 0x13, 1)
        return self.mmio.read(self._addr(3, 0), 1)

    def config_read(self, off: int, size: int) -> int:
        if self.legacy:
            return self.io.read(BAR0 + 0x14 + off, size)
        return self.mmio.read(self._addr(4, off), size)

    def status(self) -> int:
        return self.io.read(BAR0 + 0x12, 1) if self.legacy else self.common_read(0x14, 1)

    def set_status(self, v: int) -> None:
        if self.legacy:
            self.io.write(BAR0 + 0x12, 1, v)
        else:
            self.common_write(0x14, 1, v)

    def device_features(self) -> int:
        if self.legacy:
            return self.io.read(BAR0, 4)
        self.common_write(0x00, 4, 0)
        lo = self.common_read(0x04, 4)
        self.common_write(0x00, 4, 1)
        return lo | self.common_read(0x04, 4) << 32

    def write_features(self, f: int) -> None:
        if self.legacy:
            self.io.write(BAR0 + 4, 4, f & 0xFFFF_FFFF)
            return
        self.common_write(0x08, 4, 0)
        self.common_write(0x0C, 4, f & 0xFFFF_FFFF)
        self.common_write(0x08, 4, 1)
        self.common_write(0x0C, 4, f >> 32)

    def init(self, accept: int = ~0, queue_sizes: dict[int, int] | None = None, driver_ok: bool = True) -> int:
        """The initialization of 3.1.1: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues,
        DRIVER_OK.  Returns the negotiated features."""
        self.set_status(0)
        assert self.status() == 0
        self.set_status(ACKNOWLEDGE)
        self.set_status(ACKNOWLEDGE | DRIVER)
        features = self.device_features() & accept
        self.write_features(features)
        if not self.legacy:
            self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
            assert self.status() & FEATURES_OK, "device refused the features"
        self.features = features
        nq = 1 if self.legacy else self.common_read(0x12, 2)
        for i in range(nq):
            self.setup_queue(i, (queue_sizes or {}).get(i))
        if driver_ok:
            self.set_status(self.status() | DRIVER_OK)
        return features

    def setup_queue(self, i: int, size: int | None = None) -> dict:
        base = self.RINGS + i * 0x4000
        self.ram.mem[base:base + 0x4000] = bytes(0x4000)      # 4.1.5.1.3: allocate and zero the rings
        if self.legacy:
            self.io.write(BAR0 + 0x0E, 2, i)
            size = self.io.read(BAR0 + 0x0C, 2)
            desc, avail, used = legacy_layout(base, size)
            self.io.write(BAR0 + 0x08, 4, base >> 12)
        else:
            self.common_write(0x16, 2, i)
            maxsize = self.common_read(0x18, 2)
            size = size or maxsize
            self.common_write(0x18, 2, size)
            size = self.common_read(0x18, 2)
            desc, avail = base, base + 16 * size
            used = (avail + 6 + 2 * size + 3) & ~3
            for off, addr in ((0x20, desc), (0x28, avail), (0x30, used)):
                self.common_write(off, 4, addr & 0xFFFF_FFFF)
                self.common_write(off + 4, 4, addr >> 32)
            self.common_write(0x1C, 2, 1)
        q = {"size": size, "desc": desc, "avail": avail, "used": used, "next_desc": 0, "avail_idx": 0,
             "used_seen": 0, "notify_off": 0 if self.legacy else self.common_read(0x1E, 2)}
        self.queues[i] = q
        return q

    def alloc(self, n: int) -> int:
        addr = self.next_buf
        self.next_buf += (n + 15) & ~15
        assert self.next_buf <= len(self.ram.mem), "rig RAM exhausted"
        return addr

    def submit(self, i: int, bufs: list[tuple[int, int, bool]], indirect: bool = False, kick: bool = True) -> int:
        """Put one chain of (address, length, device-writable) buffers in queue ``i``; returns its head."""
        q = self.queues[i]
        mem = self.ram.mem
        if indirect:
            table = self.alloc(16 * len(bufs))
            for k, (addr, ln, w) in enumerate(bufs):
                flags = (DESC_F_WRITE if w else 0) | (DESC_F_NEXT if k + 1 < len(bufs) else 0)
                struct.pack_into("<QIHH", mem, table + 16 * k, addr, ln, flags, k + 1)
            bufs = [(table, 16 * len(bufs), False)]
            flag_extra = DESC_F_INDIRECT
        else:
            flag_extra = 0
        head = q["next_desc"]
        idx = [(head + k) % q["size"] for k in range(len(bufs))]
        for k, (addr, ln, w) in enumerate(bufs):
            flags = (DESC_F_WRITE if w else 0) | (DESC_F_NEXT if k + 1 < len(bufs) else 0) | flag_extra
            nxt = idx[k + 1] if k + 1 < len(bufs) else 0
            struct.pack_into("<QIHH", mem, q["desc"] + 16 * idx[k], addr, ln, flags, nxt)
        q["next_desc"] = (head + len(bufs)) % q["size"]
        struct.pack_into("<H", mem, q["avail"] + 4 + 2 * (q["avail_idx"] % q["size"]), head)
        q["avail_idx"] = (q["avail_idx"] + 1) & 0xFFFF
        struct.pack_into("<H", mem, q["avail"] + 2, q["avail_idx"])
        if kick:
            self.kick(i)
        return head

    def kick(self, i: int) -> None:
        if self.legacy:
            self.io.write(BAR0 + 0x10, 2, i)
        else:
            q = self.queues[i]
            self.mmio.write(self._addr(2, q["notify_off"] * self.caps[2]["mult"]), 2, i)

    def used(self, i: int) -> list[tuple[int, int]]:
        """The used elements the device returned since the last call."""
        q = self.queues[i]
        mem = self.ram.mem
        idx = struct.unpack_from("<H", mem, q["used"] + 2)[0]
        out = []
        while q["used_seen"] != idx:
            out.append(struct.unpack_from("<II", mem, q["used"] + 4 + 8 * (q["used_seen"] % q["size"])))
            q["used_seen"] = (q["used_seen"] + 1) & 0xFFFF
        return out

    # -- virtio-blk requests
    def blk_request(self, rtype: int, sector: int = 0, data: bytes | int = b"", indirect: bool = False,
                    kick: bool = True) -> tuple[int, int, int]:
        """Submit one request; ``data`` is the payload (OUT, DISCARD) or the size of the
        buffer to fill (IN, GET_ID).  Returns (head, data address, status address)."""
        hdr = self.alloc(16)
        struct.pack_into("<IIQ", self.ram.mem, hdr, rtype, 0, sector)
        status = self.alloc(1)
        self.ram.mem[status] = 0xEE
        bufs = [(hdr, 16, False)]
        if isinstance(data, int):
            buf = self.alloc(data)
            if data:
                bufs.append((buf, data, True))
        else:
            buf = self.alloc(len(data))
            self.ram.mem[buf:buf + len(data)] = data
            if data:
                bufs.append((buf, len(data), False))
        bufs.append((status, 1, True))
        head = self.submit(0, bufs, indirect=indirect, kick=kick)
        return head, buf, status


def _rig_class() -> type:
    suite = [m for m in list(sys.modules.values()) if hasattr(m, "Rig") and hasattr(m, "_extra_rigs")]
    if suite:
        return suite[0].Rig
    from tests.devices.test_conformance import Rig
    return Rig


def rig_virtio_blk(clock: VirtualClock) -> Any:
    """The function with MSI-X, which starts disabled: INTx until a host op turns it on."""
    r = _rig_class()(clock, None)
    b = make_blk(clock=clock, serial="rig-serial", msi=lambda a, d: r.log.append((clock.now(), "msi", a, d)))
    fn, ram, disk, io, mmio = b.fn, b.ram, b.disk, b.io, b.mmio
    for k in range(disk.size // 512):
        disk.data[k * 512:k * 512 + 8] = struct.pack("<Q", 0x5EC7_0000 + k)
    r.dev = fn
    r.peers = [ram, disk]
    r.mmio = 0x400
    fn.intx.connect(lambda level: r.log.append((clock.now(), "intx", level)))
    r.lines["intx"] = fn.intx
    drv = Driver.__new__(Driver)
    drv.fn, drv.io, drv.mmio, drv.ram, drv.legacy = fn, io, mmio, ram, False
    drv.queues = {}
    drv.kick = lambda i: r.bus.write(0x200 + 4 * i, 2, i)      # BAR4's notify registers, at 0 on r.bus
    # the driver's bookkeeping lives in the rig's RAM (saved with it), so a restored rig
    # continues exactly where the saved one was
    scratch = struct.Struct("<4sIQQQIIIQ")

    def load_drv() -> bool:
        magic, size, desc, avail, used, nd, ai, us, nb = scratch.unpack_from(ram.mem, 0)
        top = len(ram.mem)
        if (magic != b"VDRV" or not 1 <= size <= 256 or size & (size - 1) or nd >= size
                or not all(0 < a < top - 0x1000 for a in (desc, avail, used)) or not Driver.BUFS <= nb <= top):
            drv.queues = {}
            return False
        drv.queues = {0: {"size": size, "desc": desc, "avail": avail, "used": used, "next_desc": nd,
                          "avail_idx": ai, "used_seen": us, "notify_off": 0}}
        drv.next_buf = nb
        return True

    def save_drv() -> None:
        q = drv.queues[0]
        scratch.pack_into(ram.mem, 0, b"VDRV", q["size"], q["desc"], q["avail"], q["used"], q["next_desc"],
                          q["avail_idx"], q["used_seen"], drv.next_buf)

    def bring_up(n: int, b: int) -> None:
        """A driver's initialization through the rig's own window (BAR4 at 0 on r.bus)."""
        bus = r.bus
        fn.config_write(COMMAND, 2, CMD_IO | CMD_MEMORY | CMD_MASTER)     # pci_set_master
        bus.write(0x14, 1, 0)
        bus.write(0x14, 1, ACKNOWLEDGE | DRIVER)
        bus.write(0x08, 4, 0)
        bus.write(0x0C, 4, 0x3000_0000 | (b << 1 & 0x6646))     # indirect/event idx and some blk bits
        bus.write(0x08, 4, 1)
        bus.write(0x0C, 4, 1)
        bus.write(0x14, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK)
        size = 1 << (n % 9)
        bus.write(0x16, 2, 0)
        bus.write(0x18, 2, size)
        base = Driver.RINGS
        used = (base + 16 * size + 6 + 2 * size + 3) & ~3
        for off, addr in ((0x20, base), (0x28, base + 16 * size), (0x30, used)):
            bus.write(off, 4, addr)
        bus.write(0x1C, 2, 1)
        bus.write(0x14, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        size = fn.queues[0].size
        ram.mem[base:Driver.BUFS] = bytes(Driver.BUFS - base)
        drv.queues = {0: {"size": size, "desc": base, "avail": base + 16 * size, "used": used, "next_desc": 0,
                          "avail_idx": 0, "used_seen": 0, "notify_off": 0}}
        drv.next_buf = Driver.BUFS
        save_drv()
        r.log.append((clock.now(), "up", bus.read(0x14, 1)))

    TYPES = [vb.T_IN, vb.T_OUT, vb.T_FLUSH, vb.T_GET_ID, vb.T_DISCARD, vb.T_WRITE_ZEROES, 7]

    def submit(n: int, b: int) -> None:
        """One block request (some malformed: odd lengths, sectors past the end)."""
        if not load_drv() or drv.next_buf > len(ram.mem) - 0x1000:
            bring_up(n, b)
        rtype = TYPES[n % len(TYPES)]
        sector = b % 80
        length = 512 * (1 + b % 3) + (7 if n & 8 else 0)
        if rtype in (vb.T_IN, vb.T_GET_ID):
            data: bytes | int = length
        elif rtype in (vb.T_DISCARD, vb.T_WRITE_ZEROES):
            data = struct.pack("<QII", sector, b % 5, (n >> 3) & 1)
        else:
            data = bytes([b]) * length
        drv.blk_request(rtype, sector, data, indirect=bool(n & 16))
        save_drv()
        r.log.append((clock.now(), "submitted", rtype, ram.mem[Driver.RINGS:Driver.RINGS + 64].hex()))

    def collect(n: int, b: int) -> None:
        if load_drv():
            used = drv.used(0)
            save_drv()
            r.log.append((clock.now(), "used", used, hashlib.sha256(ram.mem[Driver.BUFS:]).hexdigest()[:16],
                          hashlib.sha256(disk.data).hexdigest()[:16]))

    def scribble(n: int, b: int) -> None:
        """A hostile driver: overwrite a byte of the rings, then notify."""
        ram.mem[Driver.RINGS + (n * 37 + b) % 0x1000] = b
        fn.mmio_write(0x200, 2, 0)

    def legacy(n: int, b: int) -> None:
        off = (n * 4 + b) % fn.legacy_size
        if n & 1:
            fn.io_write(off & ~1, 2 if off % 2 == 0 else 1, b)
        else:
            r.log.append((clock.now(), "legacy", off, fn.io_read(off, 1)))

    def window(n: int, b: int) -> None:
        """The VIRTIO_PCI_CAP_PCI_CFG window: read or write a byte of BAR4 or BAR0."""
        c = fn.cfg_cap
        fn.config_write(c + 4, 1, 4 if n & 2 else 0)
        fn.config_write(c + 8, 4, (b * 4) % 0x400)
        fn.config_write(c + 12, 4, (1, 2, 4)[n % 3])
        if n & 1:
            fn.config_write(c + 16, 4, b)
        else:
            r.log.append((clock.now(), "window", fn.config_read(c + 16, 4)))

    def msix_op(n: int, b: int) -> None:
        """MSI-X as a driver (or a hostile one) drives it: Message Control, table entries, the
        configuration and queue vectors."""
        m = fn.msix
        k = n % 4
        if k == 0:
            fn.config_write(m.cap + 2, 2, (b & 3) << 14)                 # enable / function mask
        elif k == 1:
            v, field = b % 3, (n >> 2) % 4                               # vector 2 is past the table
            m.mmio_write(16 * v + 4 * field, 4, (0xFEE0_0000 | b) if field == 0 else b & 1 if field == 3 else b)
        elif k == 2:
            r.bus.write(0x10 if n & 4 else 0x1A, 2, b % 4)               # config / queue 0 vector
        else:
            r.log.append((clock.now(), "pba", m.mmio_read(0x800, 4), m.mmio_read(16 * (b % 2) + 12, 4)))

    r.host_ops = {"up": bring_up, "submit": submit, "collect": collect, "scribble": scribble,
                  "legacy": legacy, "window": window, "msix": msix_op}
    return r


RIGS = {"virtio_blk": rig_virtio_blk}
CLASS_OF = {"virtio_blk": VirtioPciFunction}
