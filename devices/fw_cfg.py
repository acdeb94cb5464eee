"""QEMU's firmware configuration device (fw_cfg), port-I/O flavour, as on x86.

What it implements, from QEMU's docs/specs/fw_cfg.rst ("QEMU Firmware
Configuration (fw_cfg) Device") and, where the document leaves a choice
open, from what QEMU's hw/nvram/fw_cfg.c does on a PC (firmware written
against QEMU relies on those details; we behave the same and say so):

* **Selector register** (0x510, 16-bit, write-only, little-endian): selects
  an item and sets the data offset to zero.  Bit 15 selects the
  architecture-specific item space, bit 14 ("write channel") is kept in the
  selector but ignored when the item is looked up.  A key whose index
  (bits 0-13) lies past the last file slot selects nothing ("invalid");
  reads of it, as of an item with no data, return zeros.
* **Data register** (0x511, 8-bit): each read returns the next byte of the
  selected item and advances the offset; past the end it reads 0 and the
  offset stays.  Writes are ignored ("As of QEMU v2.4, writes to the fw_cfg
  data register are no longer supported").
* **Port decoding, as QEMU does it on x86** (checked against
  qemu-system-x86_64 7.2 with a probe guest): the selector and data register
  are one 2-byte region at 0x510 that accepts byte accesses at either port
  (a byte read of 0x510 is a data read too) and a word write at 0x510 (a
  select).  QEMU's IN/OUT helpers give the whole access to the region of its
  first port and never split it, so every other access is refused whole: a
  word or dword read there reads 0 and consumes no data (``inw(0x511)`` and
  ``inl(0x510)`` are 0), and word writes at 0x511, dword writes and byte
  writes (data writes) change nothing.  0x512 and 0x513 belong to nobody.
* **Signature** (key 0x0000): "QEMU".  **ID** (key 0x0001): 32-bit LE
  feature bitmap, bit 0 traditional interface, bit 1 DMA.
* **File directory** (key 0x0019): be32 count, then one 64-byte entry per
  file slot (be32 size, be16 select, be16 reserved, char name[56]) sorted
  by name (strcmp order, as QEMU machines newer than 2.4 keep it); the item
  is as long as all slots (4 + 64 * slots, unused slots zero), as QEMU
  allocates it.  Files take keys 0x0020 + their index in that order.
* **DMA interface** (0x514, 8 bytes, big-endian): a naturally aligned read
  of any width returns the bytes of the signature "QEMU CFG", a misaligned
  one reads 0; a 32-bit write at 0x514 sets
  the high half of the address (and clears the low half), a 32-bit write at
  0x518 ORs in the low half and starts the transfer; other writes are
  ignored, as QEMU's region refuses them.  The register holds a
  ``FWCfgDmaAccess`` address: ``{be32 control, be32 length, be64 address}``.
  Control bits: error (0), read (1), skip (2), select (3, with the key in
  bits 16-31), write (4).  Select is done first; then read (if set) wins over
  write, write over skip, and with none of them the length is ignored.  A
  read copies bytes from the current offset to guest memory and zero-fills
  past the item's end; a skip advances the offset; a write is refused (error
  bit) unless the item was declared writable and the whole write fits inside
  it ("the item cannot be resized"; "truncated writes are dropped
  entirely").  On completion the control word is written back: 0 on
  success, the error bit on failure.  The address held is 0 again after a
  transfer, so the next 32-bit address needs only the low-half write.

Guest memory comes only through the ``Dma`` view given at construction
(devices/base.py): it raises ``DmaError`` for anything but RAM.  A DMA that
meets such an address sets the error bit and stops; a descriptor that is
itself outside RAM gets the error bit written back if that is possible, and
nothing else happens.  It never raises out of the device.  QEMU's memory
layer still copies the parts of a partly bad transfer that do reach RAM;
we copy page by page up to the first bad page, which no firmware can tell
apart (the error bit is set either way).

Contents are plain data given at construction (``items``: key -> bytes for
the numbered items, ``files``: name -> bytes for the directory), built by
the machine with ``qemu_x86_items``/``qemu_x86_files`` and
``linux_boot_items`` below.  Only files named in ``writable`` accept DMA
writes (QEMU's ``read_only = false`` files); their contents are part of the
saved state, everything else is constructor data.

Reset selects the signature item, as QEMU's reset does; it also clears the
DMA address register (QEMU leaves it; the document says it is 0 "at
startup", and nothing can depend on the difference).  Writable files keep
what the guest wrote, as in QEMU, whose firmware writes them again on every
boot.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping

from devices.base import Dma, DmaError, DeviceStateError, State, check_state

KIND = "fw_cfg"
VERSION = 1

IO_BASE = 0x510          # selector; data at IO_BASE + 1
DMA_IO_BASE = 0x514
CTL_SIZE = 2             # the selector/data region (the data port overlaps the selector's high byte)
DMA_SIZE = 8

# Well-known keys (QEMU include/standard-headers/linux/qemu_fw_cfg.h).
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_KERNEL_ADDR = 0x07
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_KERNEL_CMDLINE = 0x09
FW_CFG_INITRD_ADDR = 0x0A
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_BOOT_DEVICE = 0x0C
FW_CFG_NUMA = 0x0D
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_KERNEL_ENTRY = 0x10
FW_CFG_KERNEL_DATA = 0x11
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_ADDR = 0x13
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_SETUP_ADDR = 0x16
FW_CFG_SETUP_SIZE = 0x17
FW_CFG_SETUP_DATA = 0x18
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = 0x3FFF
FW_CFG_INVALID = 0xFFFF
# x86 architecture-local keys (QEMU include/hw/i386/fw_cfg.h).
FW_CFG_ACPI_TABLES = FW_CFG_ARCH_LOCAL + 0
FW_CFG_SMBIOS_ENTRIES = FW_CFG_ARCH_LOCAL + 1
FW_CFG_IRQ0_OVERRIDE = FW_CFG_ARCH_LOCAL + 2
FW_CFG_E820_TABLE = FW_CFG_ARCH_LOCAL + 3
FW_CFG_HPET = FW_CFG_ARCH_LOCAL + 4

FILE_SLOTS_DEFAULT = 0x20   # QEMU's FW_CFG_FILE_SLOTS_DFLT
FILE_SLOTS_MIN = 0x10
MAX_FILE_NAME = 56          # including the NUL
FILE_ENTRY_SIZE = 64

SIGNATURE = b"QEMU"
DMA_SIGNATURE = b"QEMU CFG"  # what the DMA address register reads as, byte by byte
ID_TRADITIONAL = 0x01
ID_DMA = 0x02

DMA_CTL_ERROR = 0x01
DMA_CTL_READ = 0x02
DMA_CTL_SKIP = 0x04
DMA_CTL_SELECT = 0x08
DMA_CTL_WRITE = 0x10
DMA_ACCESS_SIZE = 16        # FWCfgDmaAccess

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4

PAGE = 0x1000
_CHUNK = 0x10000            # DMA copies in page-aligned pieces of at most this


def _u16(v: int) -> bytes:
    return struct.pack("<H", v & 0xFFFF)


def _u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFF_FFFF)


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v & 0xFFFF_FFFF_FFFF_FFFF)


def _bswap32(v: int) -> int:
    return int.from_bytes((v & 0xFFFF_FFFF).to_bytes(4, "little"), "big")


class FwCfg:
    """The fw_cfg device: selector/data at ``io_base``, DMA address at ``dma_base``."""

    kind = KIND
    VERSION = VERSION

    def __init__(self, items: Mapping[int, bytes], files: Mapping[str, bytes], dma: Dma | None = None, *,
                 writable: Iterable[str] = (), file_slots: int = FILE_SLOTS_DEFAULT,
                 on_write: Callable[[str, int, int], None] | None = None,
                 io_base: int = IO_BASE, dma_base: int = DMA_IO_BASE, name: str = "fw_cfg") -> None:
        """``items``: numbered items (key -> bytes; not 0x0000, 0x0001, 0x0019 nor file keys,
        which the device makes); ``files``: the file directory (name -> bytes); ``dma``: the
        guest-memory view, or None for a device without the DMA interface; ``writable``: the
        files DMA may write (``on_write(name, offset, length)`` is told after each write)."""
        if not FILE_SLOTS_MIN <= file_slots <= FW_CFG_ENTRY_MASK - FW_CFG_FILE_FIRST + 1:
            raise ValueError(f"file_slots {file_slots:#x} out of range")
        self.name = name
        self.io_base = io_base
        self.dma_base = dma_base
        self.file_slots = file_slots
        self.max_entry = FW_CFG_FILE_FIRST + file_slots
        self._dma = dma
        self.dma_enabled = dma is not None
        self._on_write = on_write
        if self.dma_enabled and dma_base != io_base + 4:
            raise ValueError("the DMA register sits at the selector + 4, as on every QEMU PC")
        # One claim from the selector to the end of the DMA register (the span QEMU's ACPI
        # FWCF device declares), so the bus hands every access whole to this device, as
        # QEMU's port dispatch does; 0x512/0x513 read as nobody's ports.
        self.io_ranges: list[tuple[int, int]] = [(io_base, 4 + DMA_SIZE if self.dma_enabled else CTL_SIZE)]

        self._data: dict[int, bytes | bytearray] = {}
        for key, value in items.items():
            if type(key) is not int or not 0 <= key <= 0xFFFF or key & FW_CFG_WRITE_CHANNEL:
                raise ValueError(f"fw_cfg key {key!r} is not a 16-bit read channel key")
            index = key & FW_CFG_ENTRY_MASK
            if index >= FW_CFG_FILE_FIRST:
                raise ValueError(f"fw_cfg key {key:#x} is in the file range: pass it as a file")
            if key in (FW_CFG_SIGNATURE, FW_CFG_ID, FW_CFG_FILE_DIR):
                raise ValueError(f"fw_cfg key {key:#x} is made by the device")
            self._data[key] = bytes(value)
        self._data[FW_CFG_SIGNATURE] = SIGNATURE
        self._data[FW_CFG_ID] = _u32(ID_TRADITIONAL | (ID_DMA if self.dma_enabled else 0))

        names = sorted(files, key=lambda n: n.encode("ascii", "replace"))
        if len(names) > file_slots:
            raise ValueError(f"{len(names)} fw_cfg files do not fit in {file_slots} slots")
        directory = bytearray(4 + FILE_ENTRY_SIZE * file_slots)
        struct.pack_into(">I", directory, 0, len(names))
        self.file_keys: dict[str, int] = {}
        for i, fname in enumerate(names):
            raw = fname.encode("ascii") if fname.isascii() else b""
            if not raw or b"\0" in raw or len(raw) >= MAX_FILE_NAME:
                raise ValueError(f"fw_cfg file name {fname!r} must be 1-55 ASCII characters")
            data = bytes(files[fname])
            key = FW_CFG_FILE_FIRST + i
            struct.pack_into(">IHH56s", directory, 4 + FILE_ENTRY_SIZE * i, len(data), key, 0, raw)
            self._data[key] = data
            self.file_keys[fname] = key
        self._data[FW_CFG_FILE_DIR] = bytes(directory)

        self.writable: tuple[str, ...] = tuple(sorted(writable))
        for fname in self.writable:
            if fname not in self.file_keys:
                raise ValueError(f"writable fw_cfg file {fname!r} is not among the files")
        self._writable_keys = {self.file_keys[f]: f for f in self.writable}
        for key in self._writable_keys:
            self._data[key] = bytearray(self._data[key])

        self.cur_entry = FW_CFG_SIGNATURE
        self.cur_offset = 0
        self.dma_addr = 0
        self.dma_transfers = 0
        self.dma_errors = 0

    # -- the item space ----------------------------------------------------------------------
    def item(self, key: int) -> bytes:
        """The current contents of an item (what a guest selecting ``key`` reads)."""
        data = self._entry(key)
        return b"" if data is None else bytes(data)

    def _entry(self, key: int) -> bytes | bytearray | None:
        if key == FW_CFG_INVALID or (key & FW_CFG_ENTRY_MASK) >= self.max_entry:
            return None
        return self._data.get(key & ~FW_CFG_WRITE_CHANNEL)

    def _select(self, key: int) -> None:
        """fw_cfg.rst "Selector (Control) Register": set the item, offset 0."""
        key &= 0xFFFF
        self.cur_offset = 0
        self.cur_entry = FW_CFG_INVALID if (key & FW_CFG_ENTRY_MASK) >= self.max_entry else key

    def _read_byte(self) -> int:
        """fw_cfg.rst "Data Register": the next byte, or 0 past the end."""
        data = self._entry(self.cur_entry)
        if data is None or self.cur_offset >= len(data):
            return 0
        b = data[self.cur_offset]
        self.cur_offset += 1
        return b

    # -- port I/O ----------------------------------------------------------------------------
    def _region(self, port: int) -> tuple[str, int]:
        """The region the access's first byte falls in, and the offset in it.

        QEMU's x86 IN/OUT helpers hand the whole access to the region that
        holds its first port (address_space_ldl/stl), which accepts it or
        not: it is never split across regions, so it is not split here.
        """
        if self.io_base <= port < self.io_base + CTL_SIZE:
            return "ctl", port - self.io_base
        if self.dma_enabled and self.dma_base <= port < self.dma_base + DMA_SIZE:
            return "dma", port - self.dma_base
        return "none", 0

    def io_read(self, port: int, size: int) -> int:
        region, off = self._region(port)
        if region == "ctl":
            # Byte reads (of either port) read data; wider reads are refused and read 0.
            return self._read_byte() if size == 1 else 0
        if region == "dma":
            # Any naturally aligned read shows the signature; a misaligned one is refused (0).
            if off % size:
                return 0
            return int.from_bytes(DMA_SIGNATURE[off:off + size], "little")
        return (1 << (8 * size)) - 1     # 0x512/0x513: nobody's ports

    def io_write(self, port: int, size: int, value: int) -> None:
        region, off = self._region(port)
        if region == "ctl":
            if size == 2 and off == 0:
                self._select(value & 0xFFFF)
            # byte writes are data writes (ignored since QEMU 2.4); the rest is refused
        elif region == "dma" and size == 4:
            # A big-endian register: the guest's little-endian dword arrives byte-swapped.
            if off == 0:
                self.dma_addr = _bswap32(value) << 32
            elif off == 4:
                self.dma_addr |= _bswap32(value)
                self._dma_transfer()

    # -- DMA ---------------------------------------------------------------------------------
    def _pieces(self, gpa: int, n: int) -> Iterable[tuple[int, int]]:
        """(gpa, length) pieces of a transfer, page-aligned, at most _CHUNK long."""
        end = gpa + n
        while gpa < end:
            step = min(end - gpa, _CHUNK - (gpa % PAGE))
            yield gpa, step
            gpa += step

    def _dma_put(self, gpa: int, data: bytes) -> bool:
        """Copy ``data`` to guest memory; False at the first page outside RAM."""
        assert self._dma is not None
        done = 0
        for a, n in self._pieces(gpa, len(data)):
            try:
                self._dma.write(a, data[done:done + n])
            except DmaError:
                return self._dma_put_pages(a, data[done:done + n])
            done += n
        return True

    def _dma_put_pages(self, gpa: int, data: bytes) -> bool:
        assert self._dma is not None
        done = 0
        while done < len(data):
            n = min(len(data) - done, PAGE - (gpa + done) % PAGE)
            try:
                self._dma.write(gpa + done, data[done:done + n])
            except DmaError:
                return False
            done += n
        return True

    def _dma_zero(self, gpa: int, n: int) -> bool:
        for a, step in self._pieces(gpa, n):
            if not self._dma_put(a, bytes(step)):
                return False
        return True

    def _dma_transfer(self) -> None:
        """fw_cfg.rst "Guest-side DMA Interface": one FWCfgDmaAccess, synchronously."""
        assert self._dma is not None
        desc_addr, self.dma_addr = self.dma_addr, 0
        self.dma_transfers += 1
        try:
            control, length, address = struct.unpack(">IIQ", self._dma.read(desc_addr, DMA_ACCESS_SIZE))
        except DmaError:
            self._dma_status(desc_addr, DMA_CTL_ERROR)
            return
        if control & DMA_CTL_SELECT:
            self._select(control >> 16)
        if control & DMA_CTL_READ:
            op = DMA_CTL_READ
        elif control & DMA_CTL_WRITE:
            op = DMA_CTL_WRITE
        elif control & DMA_CTL_SKIP:
            op = DMA_CTL_SKIP
        else:
            op, length = 0, 0
        status = 0
        while length > 0 and not status & DMA_CTL_ERROR:
            data = self._entry(self.cur_entry)
            if data is None or self.cur_offset >= len(data):
                n = length
                if op == DMA_CTL_READ and not self._dma_zero(address, n):
                    status |= DMA_CTL_ERROR
                elif op == DMA_CTL_WRITE:
                    status |= DMA_CTL_ERROR
            else:
                n = min(length, len(data) - self.cur_offset)
                if op == DMA_CTL_READ:
                    if not self._dma_put(address, bytes(data[self.cur_offset:self.cur_offset + n])):
                        status |= DMA_CTL_ERROR
                elif op == DMA_CTL_WRITE:
                    if not self._dma_write_item(data, address, n, length):
                        status |= DMA_CTL_ERROR
                self.cur_offset += n
            address = (address + n) & 0xFFFF_FFFF_FFFF_FFFF
            length -= n
        self._dma_status(desc_addr, status)

    def _dma_write_item(self, data: bytes | bytearray, address: int, n: int, length: int) -> bool:
        """A DMA write into the selected item: only writable files, only whole writes."""
        assert self._dma is not None
        fname = self._writable_keys.get(self.cur_entry & ~FW_CFG_WRITE_CHANNEL)
        if fname is None or n != length or not isinstance(data, bytearray):
            return False
        try:
            new = self._dma.read(address, n)
        except DmaError:
            return False
        offset = self.cur_offset
        data[offset:offset + n] = new
        if self._on_write is not None:
            self._on_write(fname, offset, n)
        return True

    def _dma_status(self, desc_addr: int, status: int) -> None:
        if status & DMA_CTL_ERROR:
            self.dma_errors += 1
        try:
            assert self._dma is not None
            self._dma.write(desc_addr, struct.pack(">I", status))
        except DmaError:
            pass    # the descriptor itself is not in RAM: nowhere to report to (QEMU drops it too)

    # -- reset and state ---------------------------------------------------------------------
    def reset(self) -> None:
        self._select(FW_CFG_SIGNATURE)
        self.dma_addr = 0

    def save_state(self) -> State:
        return {
            "kind": KIND,
            "version": VERSION,
            "selector": self.cur_entry,
            "offset": self.cur_offset,
            "dma_address": self.dma_addr,
            "written": {f: bytes(self._data[self.file_keys[f]]) for f in self.writable},
        }

    def load_state(self, state: State) -> None:
        check_state(state, KIND, VERSION)

        def num(key: str, hi: int) -> int:
            if key not in state:
                raise DeviceStateError(f"{KIND}: state lacks {key!r}")
            v = state[key]
            if type(v) is not int or not 0 <= v <= hi:
                raise DeviceStateError(f"{KIND}: {key} must be an int in 0..{hi:#x}, got {v!r}")
            return v

        selector = num("selector", 0xFFFF)
        if selector != FW_CFG_INVALID and (selector & FW_CFG_ENTRY_MASK) >= self.max_entry:
            raise DeviceStateError(f"{KIND}: selector {selector:#x} names no item slot")
        offset = num("offset", 0xFFFF_FFFF)
        dma_address = num("dma_address", 0xFFFF_FFFF_FFFF_FFFF)
        if "written" not in state:
            raise DeviceStateError(f"{KIND}: state lacks 'written'")
        written = state["written"]
        if (not isinstance(written, dict) or any(type(k) is not str for k in written)
                or sorted(written) != list(self.writable)):
            raise DeviceStateError(f"{KIND}: written must hold exactly the writable files {self.writable}")
        contents: dict[int, bytearray] = {}
        for fname in self.writable:
            v = written[fname]
            key = self.file_keys[fname]
            if not isinstance(v, (bytes, bytearray)) or len(v) != len(self._data[key]):
                raise DeviceStateError(f"{KIND}: written[{fname!r}] must be {len(self._data[key])} bytes")
            contents[key] = bytearray(v)
        data = self._entry(selector)
        limit = 0 if data is None else len(data)
        if offset > limit:
            raise DeviceStateError(f"{KIND}: offset {offset} is past the end of item {selector:#x} ({limit})")
        self.cur_entry, self.cur_offset, self.dma_addr = selector, offset, dma_address
        self._data.update(contents)


# ---------------------------------------------------------------------------------------------
# Contents: what QEMU's x86 machines put in fw_cfg (hw/nvram/fw_cfg.c fw_cfg_common_realize,
# hw/i386/fw_cfg.c fw_cfg_arch_create, hw/i386/x86.c x86_load_linux), as plain data.

def e820_table(entries: Iterable[tuple[int, int, int]]) -> bytes:
    """"etc/e820": QEMU's packed ``struct e820_entry {u64 address; u64 length; u32 type}``."""
    return b"".join(struct.pack("<QQI", base, length, kind) for base, length, kind in entries)


def hpet_config(block_id: int, base: int = 0xFED0_0000, min_tick: int = 0, page_prot: int = 0) -> bytes:
    """FW_CFG_HPET: ``struct hpet_fw_config {u8 count; struct hpet_fw_entry hpet[8]}``, packed,
    one HPET (``hpet_fw_entry`` = u32 event_timer_block_id, u64 address, u16 min_tick, u8 page_prot)."""
    entry = struct.pack("<IQHB", block_id & 0xFFFF_FFFF, base, min_tick, page_prot)
    return bytes([1]) + entry + bytes(len(entry) * 7)


def qemu_x86_items(*, ram_size: int, cpus: int, max_cpus: int | None = None, uuid: bytes = bytes(16),
                   nographic: bool = True, boot_menu: bool = False, hpet_block_id: int | None = None,
                   hpet_base: int = 0xFED0_0000, irq0_override: bool = True,
                   machine_id: int | None = None) -> dict[int, bytes]:
    """The numbered items of a QEMU PC: UUID, NOGRAPHIC, BOOT_MENU, NB_CPUS, MAX_CPUS (QEMU puts
    the APIC-ID limit there), RAM_SIZE, the (empty) NUMA table, IRQ0_OVERRIDE and, with an HPET,
    FW_CFG_HPET.  SeaBIOS reads all of them (src/fw/paravirt.c)."""
    if len(uuid) != 16:
        raise ValueError("the UUID is 16 bytes")
    limit = cpus if max_cpus is None else max_cpus
    items = {
        FW_CFG_UUID: bytes(uuid),
        FW_CFG_NOGRAPHIC: _u16(int(nographic)),
        FW_CFG_BOOT_MENU: _u16(int(boot_menu)),
        FW_CFG_NB_CPUS: _u16(cpus),
        FW_CFG_MAX_CPUS: _u16(limit),
        FW_CFG_RAM_SIZE: _u64(ram_size),
        # NUMA: u64 node count (0), one u64 node per possible APIC ID, one u64 size per node.
        FW_CFG_NUMA: bytes(8 * (1 + limit)),
    }
    if irq0_override:
        items[FW_CFG_IRQ0_OVERRIDE] = _u32(1)
    if hpet_block_id is not None:
        items[FW_CFG_HPET] = hpet_config(hpet_block_id, hpet_base)
    if machine_id is not None:
        items[FW_CFG_MACHINE_ID] = _u32(machine_id)
    return items


def qemu_x86_files(*, e820: Iterable[tuple[int, int, int]], boot_fail_wait: int = -1,
                   bootorder: Iterable[str] = (),
                   extra: Mapping[str, bytes] | None = None) -> dict[str, bytes]:
    """The named files of a QEMU PC that are not ACPI or SMBIOS: "etc/e820" (RAM and
    reservations, 20-byte entries), "etc/boot-fail-wait" (le32 seconds, -1 = never reboot)
    and "bootorder" (OpenFirmware device paths, one a line, NUL-terminated; empty when no
    device has a boot index, as QEMU makes it).  ``extra`` adds more (the ACPI files from
    vmm/firmware/acpi.py, option ROMs)."""
    paths = list(bootorder)
    files = {
        "etc/e820": e820_table(e820),
        "etc/boot-fail-wait": _u32(boot_fail_wait),
        "bootorder": ("\n".join(paths) + "\0").encode("ascii") if paths else b"",
    }
    for fname, data in (extra or {}).items():
        if fname in files:
            raise ValueError(f"fw_cfg file {fname!r} given twice")
        files[fname] = bytes(data)
    return files


def linux_boot_items(*, setup_addr: int, setup: bytes, kernel_addr: int, kernel: bytes,
                     cmdline_addr: int, cmdline: bytes, initrd_addr: int | None = None,
                     initrd: bytes = b"", kernel_entry: int | None = None) -> dict[int, bytes]:
    """The direct-kernel-boot items QEMU's x86_load_linux adds and its linuxboot option ROM
    reads: SETUP_ADDR/SIZE/DATA (the real-mode part), KERNEL_ADDR/SIZE/DATA (the
    protected-mode part), CMDLINE_ADDR/SIZE/DATA (NUL-terminated: one is added if missing),
    INITRD_ADDR/SIZE/DATA when there is an initrd, KERNEL_ENTRY when given; addresses and
    sizes are le32."""
    if not cmdline.endswith(b"\0"):
        cmdline += b"\0"
    items = {
        FW_CFG_SETUP_ADDR: _u32(setup_addr), FW_CFG_SETUP_SIZE: _u32(len(setup)),
        FW_CFG_SETUP_DATA: bytes(setup),
        FW_CFG_KERNEL_ADDR: _u32(kernel_addr), FW_CFG_KERNEL_SIZE: _u32(len(kernel)),
        FW_CFG_KERNEL_DATA: bytes(kernel),
        FW_CFG_CMDLINE_ADDR: _u32(cmdline_addr), FW_CFG_CMDLINE_SIZE: _u32(len(cmdline)),
        FW_CFG_CMDLINE_DATA: bytes(cmdline),
    }
    if initrd_addr is not None:
        items[FW_CFG_INITRD_ADDR] = _u32(initrd_addr)
        items[FW_CFG_INITRD_SIZE] = _u32(len(initrd))
        items[FW_CFG_INITRD_DATA] = bytes(initrd)
    if kernel_entry is not None:
        items[FW_CFG_KERNEL_ENTRY] = _u32(kernel_entry)
    return items
