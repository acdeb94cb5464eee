"""QEMU fw_cfg (devices/fw_cfg.py) driven through an IoBus, with a fake DMA view over a bytearray.

The port-level expectations for odd widths (word/dword reads of the data
port, misaligned DMA-register reads, word writes at 0x511) are what
qemu-system-x86_64 7.2 answered to a probe guest; the DMA results (ID read,
error for a target outside RAM, error for a write to a read-only item, skip,
zero fill past the end, a control word without operation bits) likewise.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.base import DeviceStateError
from devices.bus import IoBus
from devices import fw_cfg as fc
from devices.fw_cfg import FwCfg
from tests.devices.rigs_fw_cfg import FakeRam

RAM_SIZE = 0x20000
DESC = 0x1000     # where the tests put FWCfgDmaAccess structures
BUF = 0x2000      # and where the data goes


FILES = {
    "etc/e820": fc.e820_table([(0, 0x9FC00, 1), (0x100000, 0x1F00000, 1)]),
    "bootorder": b"",
    "etc/boot-fail-wait": struct.pack("<i", -1),
    "etc/acpi/tables": bytes(range(256)) * 3,
    "opt/org.example/rw": b"\x11" * 16,
}


def make(dma: bool = True, writable=("opt/org.example/rw",), **kw):
    ram = FakeRam(RAM_SIZE)
    written: list[tuple[str, int, int]] = []
    dev = FwCfg(fc.qemu_x86_items(ram_size=32 << 20, cpus=2, hpet_block_id=0x8086A201), FILES,
                ram if dma else None, writable=writable if dma else (),
                on_write=lambda *a: written.append(a), **kw)
    bus = IoBus()
    for base, length in dev.io_ranges:
        bus.register(dev, base, length)
    return dev, bus, ram, written


def select(bus: IoBus, key: int) -> None:
    bus.write(0x510, 2, key)


def read_bytes(bus: IoBus, n: int) -> bytes:
    return bytes(bus.read(0x511, 1) for _ in range(n))


def dma(bus: IoBus, ram: FakeRam, control: int, length: int, address: int, desc: int = DESC) -> int:
    """Run one FWCfgDmaAccess at ``desc``; returns the control word written back."""
    ram.mem[desc:desc + 16] = struct.pack(">IIQ", control, length, address)
    if desc >> 32:
        bus.write(0x514, 4, int.from_bytes((desc >> 32).to_bytes(4, "big"), "little"))
    bus.write(0x518, 4, int.from_bytes((desc & 0xFFFF_FFFF).to_bytes(4, "big"), "little"))
    return struct.unpack(">I", ram.mem[desc:desc + 4])[0]


# -- signature, ID, the DMA register ------------------------------------------------------

def test_signature_and_id():
    dev, bus, _, _ = make()
    select(bus, fc.FW_CFG_SIGNATURE)
    assert read_bytes(bus, 4) == b"QEMU"
    assert read_bytes(bus, 2) == b"\0\0"          # past the end: zeros
    select(bus, fc.FW_CFG_ID)
    assert read_bytes(bus, 4) == struct.pack("<I", 3)   # traditional + DMA
    nodma, bus2, _, _ = make(dma=False)
    select(bus2, fc.FW_CFG_ID)
    assert read_bytes(bus2, 4) == struct.pack("<I", 1)
    assert nodma.io_ranges == [(0x510, 2)]
    assert dev.io_ranges == [(0x510, 12)]
    assert bus2.read(0x514, 4) == 0xFFFF_FFFF            # no DMA register without DMA


def test_dma_register_reads_the_dma_signature():
    _, bus, _, _ = make()
    assert bus.read(0x514, 4).to_bytes(4, "little") == b"QEMU"
    assert bus.read(0x518, 4).to_bytes(4, "little") == b" CFG"
    assert bytes(bus.read(0x514 + i, 1) for i in range(8)) == b"QEMU CFG"
    assert bus.read(0x51A, 2).to_bytes(2, "little") == b"FG"
    # misaligned reads are refused by QEMU's region and read 0
    assert bus.read(0x516, 4) == 0 and bus.read(0x515, 2) == 0


def test_qemu_port_widths():
    """What QEMU 7.2 answers (probe guest): only byte reads read data; wider accesses are refused whole."""
    _, bus, _, _ = make()
    select(bus, 0)
    assert bus.read(0x510, 4) == 0            # refused, consumes nothing
    assert bus.read(0x511, 2) == 0
    assert bus.read(0x510, 2) == 0
    assert bus.read(0x510, 1) == ord("Q")     # a byte read of the selector port reads data too
    bus.write(0x511, 2, 0x19)                 # misaligned word write: no select
    assert bus.read(0x511, 1) == ord("E")
    bus.write(0x510, 1, 0x19)                 # byte write = data write: ignored
    assert bus.read(0x511, 1) == ord("M")
    bus.write(0x510, 4, 0x0019_0001)          # dword write: refused
    assert bus.read(0x511, 1) == ord("U")
    assert bus.read(0x512, 1) == 0xFF and bus.read(0x513, 1) == 0xFF
    assert bus.read(0x512, 2) == 0xFFFF


# -- selector semantics --------------------------------------------------------------------

def test_select_resets_offset_and_write_channel_is_ignored():
    dev, bus, _, _ = make()
    select(bus, 0)
    assert read_bytes(bus, 2) == b"QE"
    assert dev.cur_offset == 2
    select(bus, 0)
    assert dev.cur_offset == 0 and read_bytes(bus, 1) == b"Q"
    select(bus, fc.FW_CFG_WRITE_CHANNEL | fc.FW_CFG_SIGNATURE)
    assert dev.cur_entry == 0x4000 and read_bytes(bus, 4) == b"QEMU"


def test_well_known_items_little_endian():
    _, bus, _, _ = make()
    for key, expect in [(fc.FW_CFG_RAM_SIZE, struct.pack("<Q", 32 << 20)),
                        (fc.FW_CFG_NB_CPUS, struct.pack("<H", 2)),
                        (fc.FW_CFG_MAX_CPUS, struct.pack("<H", 2)),
                        (fc.FW_CFG_NOGRAPHIC, struct.pack("<H", 1)),
                        (fc.FW_CFG_BOOT_MENU, struct.pack("<H", 0)),
                        (fc.FW_CFG_UUID, bytes(16)),
                        (fc.FW_CFG_NUMA, bytes(8 * 3)),
                        (fc.FW_CFG_IRQ0_OVERRIDE, struct.pack("<I", 1))]:
        select(bus, key)
        assert read_bytes(bus, len(expect) + 1) == expect + b"\0", hex(key)
    select(bus, fc.FW_CFG_HPET)
    hpet = read_bytes(bus, 121)
    assert hpet[0] == 1 and struct.unpack_from("<IQHB", hpet, 1) == (0x8086A201, 0xFED00000, 0, 0)


def test_invalid_and_empty_keys_read_zero():
    dev, bus, _, _ = make()
    for key in (0x3FFF, 0x0040, 0xFFFF, 0x8040):     # past the last file slot: invalid
        select(bus, key)
        assert dev.cur_entry == fc.FW_CFG_INVALID
        assert read_bytes(bus, 4) == bytes(4) and dev.cur_offset == 0
    for key in (0x0C, 0x8005, 0x003F):               # valid slots with nothing in them
        select(bus, key)
        assert dev.cur_entry == key
        assert read_bytes(bus, 4) == bytes(4) and dev.cur_offset == 0


def test_file_directory_format_and_order():
    dev, bus, _, _ = make()
    select(bus, fc.FW_CFG_FILE_DIR)
    raw = read_bytes(bus, 4 + 64 * 0x20 + 8)
    assert raw[-8:] == bytes(8)                      # the item is exactly 4 + 64 * slots long
    raw = raw[:-8]
    (count,) = struct.unpack_from(">I", raw, 0)
    assert count == len(FILES)
    entries = []
    for i in range(count):
        size, key, reserved, name = struct.unpack_from(">IHH56s", raw, 4 + 64 * i)
        assert reserved == 0
        assert name.rstrip(b"\0").find(b"\0") == -1 and name.endswith(b"\0")
        entries.append((name.rstrip(b"\0").decode(), size, key))
    assert raw[4 + 64 * count:] == bytes(64 * (0x20 - count))
    names = [e[0] for e in entries]
    assert names == sorted(FILES) == ["bootorder", "etc/acpi/tables", "etc/boot-fail-wait", "etc/e820",
                                      "opt/org.example/rw"]
    assert [e[2] for e in entries] == list(range(0x20, 0x20 + count))
    for name, size, key in entries:
        assert size == len(FILES[name])
        assert dev.file_keys[name] == key
        select(bus, key)
        assert read_bytes(bus, size) == FILES[name]


def test_e820_file_is_qemus_packed_entries():
    table = fc.e820_table([(0, 0x9FC00, fc.E820_RAM), (0xFEFFC000, 0x4000, fc.E820_RESERVED)])
    assert len(table) == 40
    assert struct.unpack("<QQIQQI", table) == (0, 0x9FC00, 1, 0xFEFFC000, 0x4000, 2)
    files = fc.qemu_x86_files(e820=[(0, 1 << 20, 1)], bootorder=["/pci@i0cf8/ide@1,1/drive@0/disk@0"])
    assert files["bootorder"] == b"/pci@i0cf8/ide@1,1/drive@0/disk@0\0"
    assert files["etc/boot-fail-wait"] == b"\xff\xff\xff\xff"
    assert fc.qemu_x86_files(e820=[])["bootorder"] == b""
    with pytest.raises(ValueError):
        fc.qemu_x86_files(e820=[], extra={"etc/e820": b""})


def test_linux_boot_items():
    items = fc.linux_boot_items(setup_addr=0x90000, setup=b"S" * 0x400, kernel_addr=0x100000,
                                kernel=b"K" * 100, cmdline_addr=0x20000, cmdline=b"console=ttyS0",
                                initrd_addr=0x7000000, initrd=b"I" * 7)
    assert items[fc.FW_CFG_CMDLINE_DATA] == b"console=ttyS0\0"
    assert struct.unpack("<I", items[fc.FW_CFG_CMDLINE_SIZE]) == (14,)
    assert struct.unpack("<I", items[fc.FW_CFG_KERNEL_SIZE]) == (100,)
    assert struct.unpack("<I", items[fc.FW_CFG_SETUP_ADDR]) == (0x90000,)
    assert struct.unpack("<I", items[fc.FW_CFG_INITRD_SIZE]) == (7,)
    assert fc.FW_CFG_KERNEL_ENTRY not in items
    dev = FwCfg(items, {}, None)
    assert dev.item(fc.FW_CFG_SETUP_DATA) == b"S" * 0x400


def test_constructor_refuses_bad_contents():
    with pytest.raises(ValueError):
        FwCfg({fc.FW_CFG_SIGNATURE: b"XXXX"}, {}, None)
    with pytest.raises(ValueError):
        FwCfg({0x20: b""}, {}, None)
    with pytest.raises(ValueError):
        FwCfg({0x4005: b""}, {}, None)
    with pytest.raises(ValueError):
        FwCfg({}, {"x" * 56: b""}, None)
    with pytest.raises(ValueError):
        FwCfg({}, {f"f{i}": b"" for i in range(0x21)}, None)
    with pytest.raises(ValueError):
        FwCfg({}, {"a": b""}, FakeRam(RAM_SIZE), writable=["b"])
    assert FwCfg({}, {f"f{i}": b"" for i in range(0x40)}, None, file_slots=0x40).item(0x5F) == b""


# -- DMA -----------------------------------------------------------------------------------

def test_dma_read_select_skip_and_zero_fill():
    dev, bus, ram, _ = make()
    assert dma(bus, ram, (fc.FW_CFG_ID << 16) | fc.DMA_CTL_SELECT | fc.DMA_CTL_READ, 4, BUF) == 0
    assert ram.mem[BUF:BUF + 4] == struct.pack("<I", 3)
    assert dev.dma_addr == 0
    # skip 2 of the signature, then read 4: "MU" and zero fill
    assert dma(bus, ram, (0 << 16) | fc.DMA_CTL_SELECT | fc.DMA_CTL_SKIP, 2, 0) == 0
    ram.mem[BUF:BUF + 4] = b"wwww"
    assert dma(bus, ram, fc.DMA_CTL_READ, 4, BUF) == 0
    assert ram.mem[BUF:BUF + 4] == b"MU\0\0"
    assert dev.cur_offset == 4                     # the offset stops at the end
    # DMA and the data port share the offset
    dma(bus, ram, fc.DMA_CTL_SELECT | fc.DMA_CTL_SKIP, 1, 0)
    assert bus.read(0x511, 1) == ord("E")
    # read wins over write and skip; no operation bit: the length is ignored
    key = dev.file_keys["etc/acpi/tables"]
    assert dma(bus, ram, (key << 16) | 0x1E, 8, BUF) == 0
    assert ram.mem[BUF:BUF + 8] == bytes(range(8))
    assert dma(bus, ram, 0x40, 100, BUF) == 0 and dev.cur_offset == 8
    # a long read crosses pages and the item's end
    ram.mem[BUF:BUF + 0x1000] = b"\xee" * 0x1000
    assert dma(bus, ram, (key << 16) | fc.DMA_CTL_SELECT | fc.DMA_CTL_READ, 0x1000, BUF) == 0
    assert ram.mem[BUF:BUF + 768] == FILES["etc/acpi/tables"]
    assert ram.mem[BUF + 768:BUF + 0x1000] == bytes(0x1000 - 768)


def test_dma_select_of_invalid_key_zero_fills():
    dev, bus, ram, _ = make()
    ram.mem[BUF:BUF + 8] = b"\xaa" * 8
    assert dma(bus, ram, (0x3FFF << 16) | fc.DMA_CTL_SELECT | fc.DMA_CTL_READ, 8, BUF) == 0
    assert dev.cur_entry == fc.FW_CFG_INVALID and ram.mem[BUF:BUF + 8] == bytes(8)


def test_dma_target_outside_ram_sets_error():
    dev, bus, ram, _ = make()
    control = (0 << 16) | fc.DMA_CTL_SELECT | fc.DMA_CTL_READ
    assert dma(bus, ram, control, 16, 0xF000_0000) == fc.DMA_CTL_ERROR
    # crossing the end of RAM: the part in RAM is copied, then the error
    assert dma(bus, ram, control, 4, RAM_SIZE - 2) == fc.DMA_CTL_ERROR
    assert ram.mem[RAM_SIZE - 2:] == b"QE"
    assert dev.cur_offset == 4                     # the offset advanced over the failed copy, as in QEMU
    # zero fill past the end into a bad address
    assert dma(bus, ram, fc.DMA_CTL_READ, 4, 0x1_0000_0000) == fc.DMA_CTL_ERROR
    assert dev.dma_errors == 3 and dev.dma_transfers == 3


def test_dma_descriptor_outside_ram_never_raises():
    dev, bus, ram, _ = make()
    before = bytes(ram.mem)
    bus.write(0x518, 4, int.from_bytes((0xF000_0000).to_bytes(4, "big"), "little"))
    assert bytes(ram.mem) == before and dev.dma_addr == 0 and dev.dma_errors == 1
    # a descriptor straddling the end of RAM: unreadable, but its control word is reported to
    edge = RAM_SIZE - 8
    ram.mem[edge:] = struct.pack(">II", fc.DMA_CTL_READ, 4)
    bus.write(0x518, 4, int.from_bytes(edge.to_bytes(4, "big"), "little"))
    assert struct.unpack(">I", ram.mem[edge:edge + 4])[0] == fc.DMA_CTL_ERROR
    # 64-bit descriptor address: high half, then low half
    bus.write(0x514, 4, int.from_bytes((1).to_bytes(4, "big"), "little"))
    assert dev.dma_addr == 1 << 32
    bus.write(0x518, 4, int.from_bytes(DESC.to_bytes(4, "big"), "little"))
    assert dev.dma_addr == 0 and dev.dma_errors == 3


def test_dma_register_writes_of_other_widths_are_ignored():
    dev, bus, ram, _ = make()
    bus.write(0x514, 2, 0x1234)
    bus.write(0x518, 1, 0x12)
    bus.write(0x516, 4, 0x12345678)      # misaligned
    assert dev.dma_addr == 0 and dev.dma_transfers == 0
    bus.write(0x514, 4, 0x01000000)      # high half 1, big-endian
    assert dev.dma_addr == 1 << 32
    bus.write(0x514, 4, 0x02000000)      # a second high write replaces it
    assert dev.dma_addr == 2 << 32


def test_dma_write_rules():
    dev, bus, ram, written = make()
    ram.mem[BUF:BUF + 16] = bytes(range(0x40, 0x50))
    # read-only items refuse
    assert dma(bus, ram, (fc.FW_CFG_NB_CPUS << 16) | fc.DMA_CTL_SELECT | fc.DMA_CTL_WRITE, 2, BUF) \
        == fc.DMA_CTL_ERROR
    assert dev.item(fc.FW_CFG_NB_CPUS) == struct.pack("<H", 2)
    rw = dev.file_keys["opt/org.example/rw"]
    # a writable file, at an offset
    assert dma(bus, ram, (rw << 16) | fc.DMA_CTL_SELECT | fc.DMA_CTL_SKIP, 4, 0) == 0
    assert dma(bus, ram, fc.DMA_CTL_WRITE, 8, BUF) == 0
    assert dev.item(rw) == b"\x11" * 4 + bytes(range(0x40, 0x48)) + b"\x11" * 4
    assert written == [("opt/org.example/rw", 4, 8)]
    # a write running past the end is dropped entirely
    assert dma(bus, ram, fc.DMA_CTL_WRITE, 8, BUF) == fc.DMA_CTL_ERROR
    assert dev.item(rw) == b"\x11" * 4 + bytes(range(0x40, 0x48)) + b"\x11" * 4
    # a write from outside RAM
    control = (rw << 16) | fc.DMA_CTL_SELECT | fc.DMA_CTL_WRITE
    assert dma(bus, ram, control, 4, 0xF000_0000) == fc.DMA_CTL_ERROR
    assert len(written) == 1
    # the write channel bit does not make a read-only item writable
    assert dma(bus, ram, (0x4000 << 16) | fc.DMA_CTL_SELECT | fc.DMA_CTL_WRITE, 4, BUF) == fc.DMA_CTL_ERROR
    assert dev.item(0) == b"QEMU"
    # the port data register never writes
    select(bus, rw)
    bus.write(0x511, 1, 0x99)
    assert dev.item(rw)[0] == 0x11


@settings(max_examples=60, deadline=None, derandomize=True)
@given(name=st.sampled_from(sorted(FILES)), offset=st.integers(0, 800), length=st.integers(0, 900),
       via_port=st.booleans())
def test_dma_read_equals_item_slice(name, offset, length, via_port):
    dev, bus, ram, _ = make()
    key = dev.file_keys[name]
    if via_port:
        select(bus, key)
        read_bytes(bus, offset)
    else:
        dma(bus, ram, (key << 16) | fc.DMA_CTL_SELECT | fc.DMA_CTL_SKIP, offset, 0)
    ram.mem[BUF:BUF + length] = b"\xcc" * length
    assert dma(bus, ram, fc.DMA_CTL_READ, length, BUF) == 0
    data = FILES[name]
    start = min(offset, len(data))
    expect = data[start:start + length]
    assert ram.mem[BUF:BUF + length] == expect + bytes(length - len(expect))


# -- reset and state -----------------------------------------------------------------------

def test_reset_selects_signature():
    dev, bus, ram, _ = make()
    select(bus, fc.FW_CFG_FILE_DIR)
    read_bytes(bus, 5)
    bus.write(0x514, 4, 0x01000000)
    dev.reset()
    assert dev.cur_entry == 0 and dev.cur_offset == 0 and dev.dma_addr == 0
    assert read_bytes(bus, 4) == b"QEMU"


def test_state_round_trip_keeps_written_files():
    dev, bus, ram, _ = make()
    rw = dev.file_keys["opt/org.example/rw"]
    ram.mem[BUF:BUF + 2] = b"\x01\x02"
    assert dma(bus, ram, (rw << 16) | fc.DMA_CTL_SELECT | fc.DMA_CTL_WRITE, 2, BUF) == 0
    select(bus, fc.FW_CFG_FILE_DIR)
    read_bytes(bus, 7)
    bus.write(0x514, 4, 0x01000000)
    state = dev.save_state()
    assert state == {"kind": "fw_cfg", "version": 1, "selector": 0x19, "offset": 7, "dma_address": 1 << 32,
                     "written": {"opt/org.example/rw": b"\x01\x02" + b"\x11" * 14}}
    other, bus2, _, _ = make()
    other.load_state(state)
    assert other.save_state() == state
    assert other.item(rw)[:2] == b"\x01\x02"
    assert read_bytes(bus2, 4) == read_bytes(bus, 4)


@pytest.mark.parametrize("change", [
    {"selector": 0x40}, {"selector": -1}, {"selector": True}, {"offset": 5},   # past the signature's end
    {"offset": 2**32}, {"dma_address": 2**64}, {"written": {}}, {"written": {"opt/org.example/rw": b"x"}},
    {"written": {"opt/org.example/rw": b"x" * 16, "etc/e820": b""}}, {"written": []},
    {"written": {"opt/org.example/rw": b"x" * 16, 1: b""}},
])
def test_load_state_refuses_bad_fields(change):
    dev, bus, _, _ = make()
    good = dev.save_state()
    with pytest.raises(DeviceStateError):
        dev.load_state({**good, **change})
    assert dev.save_state() == good
