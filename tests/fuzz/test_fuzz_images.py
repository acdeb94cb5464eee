"""Fuzz the image loaders (issue 16): boot sectors, Multiboot ELF and a.out
kernels, flat binaries and bzImage headers, built from the bundled guests and
from headers written here, then mutated.  ``vmm.firmware.boot.boot`` may only
refuse with a one-line ``BootError`` (or succeed), within the time bound, on
the smallest machine (2 MiB, so "does it fit" is always in question)."""
from __future__ import annotations

import struct

from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.harness import bounded, fuzz_settings, one_line, tally

MEM = 2 << 20
KINDS = ("auto", "disk", "floppy", "multiboot", "flat", "linux")


def _guest(name: str) -> bytes:
    from guests.build import guest_path

    return guest_path(name).read_bytes()


def _elf(segments) -> bytes:
    """A 32-bit i386 ELF with a Multiboot header after its program headers."""
    phoff, n = 52, len(segments)
    data_off = phoff + 32 * n + 12
    eh = b"\x7fELF\x01\x01\x01" + bytes(9) + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, 0x100000, phoff, 0, 0,
                                                         52, 32, n, 0, 0, 0)
    ph = b"".join(struct.pack("<IIIIIIII", t, off if off is not None else data_off, pa, pa, fs, ms, 5, 0x1000)
                  for t, off, pa, fs, ms in segments)
    mb = struct.pack("<III", 0x1BADB002, 0, (-0x1BADB002) & 0xFFFFFFFF)
    return eh + ph + mb + b"\xf4" * 0x1000


def _aout(header_addr: int, load_addr: int, load_end: int, bss_end: int, entry: int) -> bytes:
    """A Multiboot kernel with the address fields of flag 16 (the a.out kludge), header at offset 0."""
    flags = 1 << 16
    mb = struct.pack("<IIIIIIII", 0x1BADB002, flags, (-(0x1BADB002 + flags)) & 0xFFFFFFFF,
                     header_addr, load_addr, load_end, bss_end, entry)
    return mb + b"\xf4" * 0x1000


u32 = st.integers(0, 0xFFFF_FFFF)
near_top = st.integers(MEM - 0x1000, MEM)
segment = st.tuples(st.sampled_from([1, 1, 1, 2, 0]),                                  # p_type
                    st.sampled_from([None, None, None, 0, 0x10000, 0xFFFF_FFF0]),      # p_offset (None: the body)
                    st.one_of(near_top, near_top, st.integers(0, 0x200000), u32),      # p_paddr
                    st.one_of(st.integers(0, 0x3000), u32),                            # p_filesz
                    st.one_of(st.integers(0, 0x3000), u32))                            # p_memsz
elf_images = st.lists(segment, min_size=1, max_size=4).map(_elf)
address = st.one_of(near_top, st.integers(0, 0x200000), st.integers(0x100000, 0x101000), u32)
aout_images = st.tuples(address, address, st.one_of(st.just(0), address), st.one_of(st.just(0), address),
                        address).map(lambda t: _aout(*t))


def _bzimage_header(fields: dict) -> bytes:
    """A bzImage setup header (boot.rst) with the given fields over plausible defaults."""
    data = bytearray(0x4000)
    f = {"setup_sects": 4, "boot_flag": 0xAA55, "jump": 0x66EB, "version": 0x020F, "loadflags": 1,
         "kernel_alignment": 0x200000, "relocatable": 1, "xloadflags": 3, "syssize": 0x100,
         "init_size": 0x100000, "pref_address": 0x100000, "payload_offset": 0, "payload_length": 16}
    f.update(fields)
    data[0x1F1] = f["setup_sects"] & 0xFF
    struct.pack_into("<H", data, 0x1F4, f["syssize"] & 0xFFFF)
    struct.pack_into("<H", data, 0x1FE, f["boot_flag"] & 0xFFFF)
    struct.pack_into("<H", data, 0x200, f["jump"] & 0xFFFF)
    struct.pack_into("<I", data, 0x202, 0x53726448)
    struct.pack_into("<H", data, 0x206, f["version"] & 0xFFFF)
    data[0x211] = f["loadflags"] & 0xFF
    struct.pack_into("<I", data, 0x230, f["kernel_alignment"] & 0xFFFFFFFF)
    data[0x234] = f["relocatable"] & 0xFF
    struct.pack_into("<H", data, 0x236, f["xloadflags"] & 0xFFFF)
    struct.pack_into("<I", data, 0x248, f["payload_offset"] & 0xFFFFFFFF)
    struct.pack_into("<I", data, 0x24C, f["payload_length"] & 0xFFFFFFFF)
    struct.pack_into("<Q", data, 0x258, f["pref_address"] & (2 ** 64 - 1))
    struct.pack_into("<I", data, 0x260, f["init_size"] & 0xFFFFFFFF)
    return bytes(data)


bz_images = st.dictionaries(
    st.sampled_from(["setup_sects", "version", "loadflags", "kernel_alignment", "relocatable", "xloadflags",
                     "syssize", "init_size", "pref_address", "payload_offset", "payload_length"]),
    st.one_of(u32, st.integers(0, 0x40), st.integers(2 ** 32, 2 ** 64 - 1)), max_size=5).map(_bzimage_header)


@st.composite
def images(draw):
    base = draw(st.one_of(
        st.sampled_from(["hello", "demo", "t_bios", "t_uart", "crash"]).map(_guest),
        elf_images, elf_images, aout_images, bz_images, st.binary(max_size=2048)))
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()) and data:
        data = data[:draw(st.integers(1, len(data)))]
    kind = draw(st.sampled_from(KINDS + ("multiboot", "auto")))
    load_addr = draw(st.one_of(st.just(0x100000), st.integers(0, 0x300000), u32))
    return bytes(data), kind, load_addr


def check_image(data: bytes, kind: str, load_addr: int) -> str:
    from host.serial import NullBackend
    from vmm.firmware.boot import BootError, boot
    from vmm.platform.pc import PcConfig, PcMachine

    m = PcMachine(PcConfig(mem_size=MEM, serial=NullBackend()))
    try:
        with bounded():
            try:
                info = boot(m, data, kind, name="fuzz.img", load_addr=load_addr, cmdline="fuzz")
            except BootError as e:
                one_line(e)
                return "refused"
        return f"booted {info.kind}"
    finally:
        m.close()


@fuzz_settings(200)
@given(case=images())
# issue 16's probe: an ELF segment with p_filesz > p_memsz at the top of RAM wrote past it
@example(case=(_elf([(1, None, MEM - 0x100, 0x1000, 0x100)]), "multiboot", 0x100000))
# the long run (issue 16): load_end_addr and bss_end_addr below load_addr passed the "fits in RAM" check
# with a negative size and wrote past RAM (GuestMemoryError); the Multiboot field order is now checked
@example(case=(_aout(0x1100000, 0x1100000, 0x100000, 0x100000, 0x1100020), "auto", 0x100000))
def test_image_loaders_on_hostile_images(case):
    tally("image_loaders", check_image(*case))
