"""The bzImage loader (vmm/firmware/linux.py) against Debian's real kernel.

Offsets are written out here from boot.rst and bootparam.h rather than taken
from the loader, so a wrong constant there shows up as a failure here.
"""
from __future__ import annotations

import itertools
import struct
from pathlib import Path

import pytest

from tests.realguests import debian_kernel  # noqa: F401  (a fixture)
from vmm.firmware import linux
from vmm.firmware.boot import BootError
from vmm.firmware.linux import LinuxBootError, detect_bzimage, load_linux, pc_e820
from vmm.firmware.placement import PlacementError, find_free
from vmm.machine import Machine

MiB = 1 << 20


@pytest.fixture(scope="module")
def image(debian_kernel: Path) -> bytes:  # noqa: F811
    return debian_kernel.read_bytes()


@pytest.fixture(scope="module")
def machine():
    """One 192 MiB machine shared by the tests that only load (loading rewrites everything it reads)."""
    m = Machine(192 * MiB)
    yield m
    m.vcpu.close()


def patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def u(mem, addr: int, fmt: str) -> int:
    return struct.unpack(fmt, mem.read(addr, struct.calcsize(fmt)))[0]


# -- the setup header -----------------------------------------------------------------------------
def test_header_fields_match_the_documented_offsets(image):
    h = linux.SetupHeader.parse(image, "vmlinuz")
    setup_sects = image[0x1F1] or 4
    assert h.setup_sects == setup_sects
    assert h.setup_size == (setup_sects + 1) * 512
    assert h.syssize == struct.unpack_from("<I", image, 0x1F4)[0]
    assert h.setup_size + h.kernel_size <= len(image)
    assert h.version == struct.unpack_from("<H", image, 0x206)[0] >= 0x020F
    assert h.header_end == 0x202 + image[0x201]
    assert h.loadflags & 1                                                   # LOADED_HIGH
    assert h.initrd_addr_max == struct.unpack_from("<I", image, 0x22C)[0]
    assert h.kernel_alignment == struct.unpack_from("<I", image, 0x230)[0]
    assert h.relocatable_kernel == bool(image[0x234])
    assert h.xloadflags == struct.unpack_from("<H", image, 0x236)[0] and h.xloadflags & 1   # XLF_KERNEL_64
    assert h.cmdline_size == struct.unpack_from("<I", image, 0x238)[0] >= 255
    assert h.pref_address == struct.unpack_from("<Q", image, 0x258)[0]
    assert h.init_size == struct.unpack_from("<I", image, 0x260)[0] > h.kernel_size
    assert h.handover_offset == struct.unpack_from("<I", image, 0x264)[0]
    assert h.payload_format in ("gzip", "bzip2", "lzma", "xz", "lz4", "zstd")
    assert h.kernel_version.split()[0] in debian_kernel_release(image)


def debian_kernel_release(image: bytes) -> str:
    # kernel_version points (less 0x200) at "6.1.0-57-amd64 (debian-kernel@...) #1 SMP ..."
    ptr = struct.unpack_from("<H", image, 0x20E)[0] + 0x200
    return image[ptr:ptr + 64].split(b" ")[0].decode()


def test_detect_bzimage(image):
    assert detect_bzimage(image)
    sector = bytes(510) + b"\x55\xaa"
    assert not detect_bzimage(sector)                       # a boot sector also has 55 AA at 510
    assert not detect_bzimage(sector + bytes(1024))
    assert not detect_bzimage(b"")
    assert not detect_bzimage(b"\x7fELF" + bytes(4096))
    assert not detect_bzimage(patched(image, 0x202, "<I", 0x12345678)[:4096])   # no HdrS
    assert not detect_bzimage(patched(image, 0x211, "<B", 0)[:4096])              # a zImage


@pytest.mark.parametrize("mangle, words", [
    (lambda d: d[: len(d) // 2], "truncated"),
    (lambda d: d[:0x100], "too short"),
    (lambda d: d[:0x1000], "truncated"),
    (lambda d: patched(d, 0x1FE, "<H", 0x1234), "boot_flag"),
    (lambda d: patched(d, 0x202, "<I", 0), "HdrS"),
    (lambda d: patched(d, 0x206, "<H", 0x0201), "boot protocol 2.01"),
    (lambda d: patched(d, 0x206, "<H", 0x0310), "boot protocol 3.16"),
    (lambda d: patched(d, 0x211, "<B", 0), "zImage"),
    (lambda d: patched(d, 0x200, "<B", 0x90), "jump"),
    (lambda d: patched(d, 0x201, "<B", 0x10), "setup header end"),
    (lambda d: patched(d, 0x1F4, "<I", 0x7FFF_FFFF), "truncated"),
    (lambda d: patched(d, 0x1F4, "<I", 0), "syssize"),
    (lambda d: patched(d, 0x230, "<I", 0x300000), "power of two"),
    (lambda d: patched(d, 0x260, "<I", 0x1000), "init_size"),
    (lambda d: patched(d, (d[0x1F1] + 1) * 512 + struct.unpack_from("<I", d, 0x248)[0], "<H", 0), "magic"),
    (lambda d: patched(d, 0x24C, "<I", 0x7FFF_FFFF), "payload"),
    (lambda d: bytes(510) + b"\x55\xaa" + bytes(2048), "HdrS"),
    (lambda d: b"\x7fELF" + bytes(8192), "boot_flag"),
])
def test_refuses_bad_images_with_one_line(image, machine, mangle, words):
    with pytest.raises(LinuxBootError) as err:
        load_linux(machine, mangle(image), name="bad.img")
    msg = str(err.value)
    assert words in msg and msg.startswith("bad.img: ") and "\n" not in msg
    assert isinstance(err.value, BootError)     # the CLI's `except BootError` turns it into exit status 2


def test_refuses_64_bit_entry_without_xlf_kernel_64(image, machine):
    no64 = patched(image, 0x236, "<H", struct.unpack_from("<H", image, 0x236)[0] & ~1)
    with pytest.raises(LinuxBootError, match="XLF_KERNEL_64"):
        load_linux(machine, no64)
    assert load_linux(machine, no64, protocol="32").entry == linux.SetupHeader.parse(image).pref_address


def test_refuses_what_does_not_fit(image, machine):
    with pytest.raises(LinuxBootError, match="cmdline_size"):
        load_linux(machine, image, cmdline="x" * 5000)
    with pytest.raises(LinuxBootError, match="ASCII"):
        load_linux(machine, image, cmdline="console=ttyS0 é")
    with pytest.raises(LinuxBootError, match="no room for an initrd"):
        load_linux(machine, image, initrd=bytes(150 * MiB))
    with pytest.raises(LinuxBootError, match="vga="):
        load_linux(machine, image, cmdline="vga=huge")
    with pytest.raises(LinuxBootError, match="load address"):
        load_linux(machine, image, load_addr=0x1234000)
    with pytest.raises(LinuxBootError, match="64 or 32"):
        load_linux(machine, image, protocol="16")
    small = Machine(48 * MiB)
    try:
        expected = r"needs usable RAM from 0x1000000 .* at least \d+ MiB of RAM; the machine has 48 MiB"
        with pytest.raises(LinuxBootError, match=expected):
            load_linux(small, image)
    finally:
        small.vcpu.close()


# -- the zero page --------------------------------------------------------------------------------
def test_zero_page_layout(image, machine):
    mem = machine.memory
    cmdline = "console=ttyS0 panic=-1 nokaslr"
    initrd = bytes(range(256)) * 4000
    info = load_linux(machine, image, initrd=initrd, cmdline=cmdline, acpi_rsdp=0xF5A30)
    zp = mem.read(info.zero_page, 4096)
    hdr_end = 0x202 + image[0x201]
    # boot.rst "64-bit Boot Protocol": the setup header copied from 0x1F1, the rest written by the loader
    written = {0x1FA: 2, 0x210: 1, 0x214: 4, 0x218: 4, 0x21C: 4, 0x228: 4}
    for off in range(0x1F1, hdr_end):
        if not any(start <= off < start + n for start, n in written.items()):
            assert zp[off] == image[off], f"setup header byte {off:#x}"
    assert zp[0x210] == 0xFF                                               # type_of_loader: undefined
    assert struct.unpack_from("<H", zp, 0x1FA)[0] == 0xFFFF                # vid_mode: normal
    assert struct.unpack_from("<I", zp, 0x214)[0] == info.load_addr        # code32_start
    assert struct.unpack_from("<II", zp, 0x218) == (info.initrd_addr, len(initrd))
    assert struct.unpack_from("<II", zp, 0x0C0) == (0, 0)                  # ext_ramdisk_image/size
    ptr = struct.unpack_from("<I", zp, 0x228)[0]
    assert struct.unpack_from("<I", zp, 0x0C8)[0] == 0                     # ext_cmd_line_ptr
    assert ptr + len(cmdline) < 0xA0000
    assert mem.read(ptr, len(cmdline) + 1) == cmdline.encode() + b"\0"
    assert mem.read(info.initrd_addr, len(initrd)) == initrd
    assert struct.unpack_from("<Q", zp, 0x070)[0] == 0xF5A30               # acpi_rsdp_addr
    assert zp[0x1EF] == 0                                                   # sentinel: a clean boot_params
    # screen_info: an 80x25 colour VGA text screen
    assert zp[0x06] == 3 and zp[0x07] == 80 and zp[0x0E] == 25 and zp[0x0F] == 1
    assert struct.unpack_from("<H", zp, 0x10)[0] == 16
    assert struct.unpack_from("<H", zp, 0x0A)[0] & 0xFF != 0x10                  # not CGA to vgacon
    assert struct.unpack_from("<I", zp, 0x1E0)[0] == (192 - 1) * 1024         # alt_mem_k
    # e820_entries at 0x1E8, struct boot_e820_entry (addr, size, type; 20 bytes) from 0x2D0
    n = zp[0x1E8]
    table = [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(n)]
    assert table == [(0, 0x9FC00, 1), (0x9FC00, 0x100000 - 0x9FC00, 2), (0x100000, 191 * MiB, 1)]
    assert zp[0x2D0 + 20 * n:0x2D0 + 20 * 128] == bytes(20 * (128 - n))
    # nothing else in the padding and firmware fields the loader does not own
    assert zp[0x80:0xC0] == bytes(0x40) and zp[0x140:0x1E0] == bytes(0xA0) and zp[0xD00:] == bytes(0x300)
    # the protected-mode kernel at its preferred address
    h = info.header
    assert info.load_addr == h.pref_address
    assert mem.read(info.load_addr, 4096) == image[h.setup_size:h.setup_size + 4096]


def test_e820_with_reserved_regions(image, machine):
    acpi = (192 * MiB - 0x10000, 0x10000, linux.E820_ACPI)
    info = load_linux(machine, image, initrd=bytes(4 * MiB), reserved=[acpi, (150 * MiB, 0x1000)])
    assert [(e.addr, e.size, e.type) for e in info.e820] == [
        (0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 149 * MiB, 1), (150 * MiB, 0x1000, 2),
        (150 * MiB + 0x1000, 42 * MiB - 0x11000, 1), (192 * MiB - 0x10000, 0x10000, 3)]
    assert machine.memory.read(info.zero_page + 0x1E8, 1) == bytes([6])
    # the initrd sits right below the ACPI tables, page aligned, in usable RAM
    assert info.initrd_addr == 192 * MiB - 0x10000 - 4 * MiB
    assert pc_e820(64 * MiB) == pc_e820(64 * MiB, [])
    with pytest.raises(LinuxBootError, match="e820"):
        pc_e820(64 * MiB, [(0x1000, 0)])
    with pytest.raises(LinuxBootError, match="beyond RAM"):
        load_linux(machine, image, e820=[linux.E820Entry(0x100000, 512 * MiB, 1)])
    with pytest.raises(LinuxBootError, match="zero page"):
        load_linux(machine, image, reserved=[(0x17000, 0x1000)])


@pytest.mark.parametrize("size", [1, 4095, 4096, 3 * MiB + 17])
def test_initrd_placement(image, machine, size):
    info = load_linux(machine, image, initrd=b"\xa5" * size)
    h = info.header
    top = min(h.initrd_addr_max + 1, 192 * MiB, 1 << 32)
    assert info.initrd_addr % 4096 == 0
    assert info.initrd_addr + size <= top
    assert info.initrd_addr + size > top - 4096          # the highest such address
    assert info.initrd_addr >= info.load_addr + h.init_size
    assert machine.memory.read(info.initrd_addr, size) == b"\xa5" * size


def test_initrd_placement_honours_initrd_addr_max_and_mem(image, machine):
    low_max = patched(image, 0x22C, "<I", 100 * MiB - 1)
    info = load_linux(machine, low_max, initrd=bytes(5 * MiB))
    assert info.initrd_addr == 95 * MiB
    info = load_linux(machine, image, initrd=bytes(5 * MiB), cmdline="mem=128M")
    assert info.initrd_addr == 123 * MiB
    # below the kernel's init_size window when there is no room above it
    tight = patched(image, 0x22C, "<I", 0x1000000 + 0x3000000)
    info = load_linux(machine, tight, initrd=bytes(2 * MiB))
    assert info.initrd_addr + 2 * MiB <= info.load_addr


def test_vga_option_sets_vid_mode(image, machine):
    info = load_linux(machine, image, cmdline="vga=0x317 quiet")
    assert u(machine.memory, info.zero_page + 0x1FA, "<H") == 0x317
    info = load_linux(machine, image, cmdline="vga=ask")
    assert u(machine.memory, info.zero_page + 0x1FA, "<H") == 0xFFFD


def test_relocated_load_address(image, machine):
    info = load_linux(machine, image, load_addr=0x2000000)
    assert info.load_addr == 0x2000000 and info.entry == 0x2000200
    assert u(machine.memory, info.zero_page + 0x214, "<I") == 0x2000000


# -- the CPU state at entry -------------------------------------------------------------------------
def test_64_bit_entry_state(image, machine):
    initrd = bytes(8192)
    info = load_linux(machine, image, initrd=initrd, cmdline="console=ttyS0")
    cpu = machine.vcpu
    assert cpu.long_mode and cpu.code_bits == 64
    assert cpu.rip == info.load_addr + 0x200 == info.entry
    assert cpu.reg("rsi") == info.zero_page
    assert not cpu.if_flag
    assert cpu.cr0 & 0x8000_0001 == 0x8000_0001 and cpu.cr4 & 0x20 and cpu.efer & 0x500 == 0x500
    assert cpu.seg(1).selector == 0x10                                           # CS = __BOOT_CS
    assert [cpu.seg(i).selector for i in (0, 2, 3)] == [0x18, 0x18, 0x18]        # ES, SS, DS = __BOOT_DS
    base, limit = cpu.gdtr
    gdt = machine.memory.read(base, limit + 1)
    code, data = struct.unpack_from("<QQ", gdt, 0x10)
    assert code >> 53 & 1 and code >> 47 & 1 and code >> 43 & 1                 # L, present, code
    assert data >> 47 & 1 and not data >> 43 & 1 and data >> 41 & 1             # present, data, writable
    # identity mapped: the whole init_size window, the zero page, the command line and the initrd
    h = info.header
    for addr in (info.load_addr, info.load_addr + h.init_size - 1, info.zero_page, info.cmdline_addr,
                 info.initrd_addr, info.initrd_addr + len(initrd) - 1, (4 << 30) - 1):
        assert cpu.translate(addr, set_ad=False) == addr


def test_32_bit_entry_state(image, machine):
    info = load_linux(machine, image, protocol="32", cmdline="console=ttyS0")
    cpu = machine.vcpu
    assert not cpu.long_mode and cpu.code_bits == 32
    assert cpu.cr0 & 1 and not cpu.cr0 & 0x8000_0000
    assert cpu.rip == info.load_addr == info.entry
    assert cpu.reg("rsi") == info.zero_page
    assert cpu.reg("rbx") == cpu.reg("rdi") == cpu.reg("rbp") == 0
    assert cpu.seg(1).selector == 0x10 and cpu.seg(3).selector == 0x18
    assert not cpu.if_flag


def test_taken_ranges_do_not_overlap(image, machine):
    info = load_linux(machine, image, initrd=bytes(MiB), cmdline="console=ttyS0")
    taken = sorted(info.taken)
    for (a, n), (b, _) in itertools.pairwise(taken):
        assert a + n <= b


# -- the decompressor runs ----------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["64", "32"])
def test_decompressor_reaches_its_first_message(image, protocol):
    """Entered either way, the kernel's decompressor reads the command line from the zero page and
    prints through earlyprintk on COM1 (arch/x86/boot/compressed/kaslr.c)."""
    from vmm.platform.pc import PcConfig, PcMachine

    m = PcMachine(PcConfig(mem_size=160 * MiB))
    try:
        load_linux(m, image, cmdline="console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr",
                   protocol=protocol)
        m.run(50_000_000)
        assert b"KASLR disabled: 'nokaslr' on cmdline." in bytes(m.serial_out)
    finally:
        m.vcpu.close()


# -- placement of other loaders' boot information ------------------------------------------------------
def test_find_free_prefers_the_given_address():
    assert find_free(0x1000, [(0x100000, 0x5000)], 32 * MiB, preferred=0x9000) == 0x9000


def test_find_free_moves_below_a_kernel_loaded_low():
    # a kernel loaded at 0x8000 covers the old fixed Multiboot information address
    addr = find_free(0x1000, [(0x8000, 0x20000)], 32 * MiB, preferred=0x9000)
    assert addr == 0x9E000            # the highest free page below the EBDA


def test_find_free_goes_above_the_highest_segment_when_low_memory_is_taken():
    assert find_free(0x2000, [(0x1000, 0x9F000), (0x100000, 0x12345)], 32 * MiB, preferred=0x9000) == 0x113000
    with pytest.raises(PlacementError, match="no room"):
        find_free(0x2000, [(0x1000, 0x9F000), (0x100000, 31 * MiB)], 32 * MiB)


def test_multiboot_info_base():
    from vmm.firmware.placement import multiboot_info_base

    gdt = (0x800, 0x20)
    assert multiboot_info_base([gdt, (0x100000, 0x4000)], 32 * MiB) == 0x9000        # unchanged layout
    assert multiboot_info_base([gdt, (0x8000, 0x3000)], 32 * MiB) == 0x9E000         # a kernel loaded low
    assert multiboot_info_base([gdt, (0x1000, 0x9F000), (0x100000, 0x4000)], 32 * MiB, 0x1800) == 0x104000
