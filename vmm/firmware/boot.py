"""Boot paths: a boot sector (disk or floppy image), a Multiboot v1 kernel
(ELF32 or the a.out kludge), or a flat binary at a given address.

``detect`` names the kind; ``boot`` loads it into a PcMachine and sets the
CPU state the boot protocol promises.  A file that is none of them gets a
BootError naming what was looked for and not found.

Multiboot v1 (the Multiboot Specification 0.6.96, sections 3.1-3.3): the
header in the first 8 KiB, 4-byte aligned, with magic 0x1BADB002 and a
checksum making the three words sum to 0; the OS image loaded per the ELF
program headers or the header's address fields (flag 16); EAX = 0x2BADB002,
EBX = the Multiboot information structure, flat 32-bit CS/DS/ES/FS/GS/SS,
protected mode with paging off, A20 on, IF = 0.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from devices.storage.disk import DiskImage
from vmm.firmware import eltorito
from vmm.firmware.bios import Bios
from vmm.cpu.vcpu import CS, DS, ES, FS, GS, SS

MB_MAGIC = 0x1BADB002
MB_BOOT_MAGIC = 0x2BADB002
MBI_ADDR = 0x9000
MB_CMDLINE_ADDR = 0x9800
MB_MMAP_ADDR = 0x9400
FLOPPY_SIZES = {368640, 737280, 1228800, 1474560, 2949120}

KINDS = ("auto", "linux", "disk", "floppy", "multiboot", "flat", "bios",   # bios: a real BIOS image (rom.py)
         "cdrom")                                                          # cdrom: El Torito, from the IDE CD-ROM


class BootError(ValueError):
    """An image that cannot be booted the way asked."""


@dataclass
class BootInfo:
    kind: str
    entry: int
    detail: str = ""


def find_multiboot(data: bytes) -> int | None:
    for off in range(0, min(len(data), 8192) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MB_MAGIC and (magic + flags + checksum) & 0xFFFF_FFFF == 0:
            return off
    return None


def detect(data: bytes) -> str:
    from vmm.firmware.linux import detect_bzimage

    if detect_bzimage(data):     # before the boot signature: a bzImage has 55 AA at 510 too
        return "linux"
    if find_multiboot(data) is not None:
        return "multiboot"
    if len(data) >= 512 and data[510:512] == b"\x55\xaa":
        return "floppy" if len(data) in FLOPPY_SIZES else "disk"
    raise BootError(
        "not a bootable image: no Multiboot header in the first 8 KiB and no boot signature "
        "(55 AA) at offset 510; to run a raw binary use --boot flat --load-addr ADDR"
    )


def boot_disks(data: bytes, kind: str, name: str) -> dict[int, DiskImage]:
    """The BIOS drives a boot kind gives the firmware (the image itself, for disks and floppies)."""
    if kind in ("disk", "floppy"):
        return {0x00 if kind == "floppy" else 0x80: DiskImage(data, name)}
    return {}


def attach_firmware(machine, data: bytes, kind: str, name: str) -> Bios:
    """The firmware of a machine that is restored rather than booted: the BIOS object
    with its drives, taking over its trap range, writing nothing to memory."""
    if kind == "bios":              # a real BIOS image (--bios): its ROM policy (vmm/firmware/rom.py)
        from vmm.firmware.rom import attach_rom

        return attach_rom(machine, data, name)
    bios = Bios(machine, boot_disks(data, kind, name))
    if kind == "cdrom":
        _cd_boot_entry(bios)
    bios.attach()
    machine.bios = bios
    return bios


def boot(machine, data: bytes, kind: str = "auto", name: str = "image", load_addr: int = 0x100000,
         cmdline: str = "", modules: list[tuple[str, bytes]] | None = None,
         initrd: bytes | None = None) -> BootInfo:
    if kind == "bios":              # a real BIOS image (--bios) is the firmware: nothing of ours is installed
        from vmm.firmware.rom import boot_rom

        return boot_rom(machine, data, name)
    if kind == "auto":
        kind = detect(data)
    if kind in ("disk", "floppy"):
        if len(data) < 512 or data[510:512] != b"\x55\xaa":
            raise BootError(f"{name}: no boot signature (55 AA) at offset 510, so it is not a bootable disk")
    bios = Bios(machine, boot_disks(data, kind, name))
    bios.install()
    machine.bios = bios
    if hasattr(machine, "install_firmware_tables"):
        machine.install_firmware_tables()
    if kind in ("disk", "floppy"):
        drive = 0x00 if kind == "floppy" else 0x80
        machine.memory.write(0x7C00, data[:512])
        cpu = machine.vcpu
        cpu.reset(0, 0x7C00)
        cpu.set_u64(16, drive)          # DL = boot drive
        cpu.rsp = 0x7C00
        return BootInfo(kind, 0x7C00, f"boot sector from {'floppy' if drive == 0 else 'hard disk'} {drive:#x}")
    if kind == "linux":
        from vmm.firmware.linux import E820Entry, load_linux

        e820 = [E820Entry(a, n, k) for a, n, k in bios.e820_map()]
        rsdp = getattr(machine, "acpi_rsdp", None)
        return load_linux(machine, data, initrd, cmdline, name=name, e820=e820, acpi_rsdp=rsdp)
    if kind == "cdrom":
        return _boot_cdrom(machine, bios)
    if initrd is not None:
        raise BootError(f"{name}: an initrd goes with a Linux kernel (bzImage) only")
    if kind == "multiboot":
        return _multiboot(machine, data, name, cmdline, modules or [])
    if kind == "flat":
        if load_addr + len(data) > machine.memory.size or load_addr < 0x500:
            raise BootError(f"{name}: a flat binary of {len(data)} bytes does not fit at {load_addr:#x}")
        machine.memory.write(load_addr, data)
        _flat32(machine, load_addr)
        machine.vcpu.rsp = load_addr if load_addr <= 0x100000 else 0x90000
        return BootInfo("flat", load_addr, f"flat binary at {load_addr:#x}, 32-bit protected mode")
    raise BootError(f"unknown boot kind {kind!r}: choose one of {', '.join(KINDS)}")


def _cd_boot_entry(bios: Bios) -> tuple[int, eltorito.BootEntry]:
    """The first CD-ROM drive's number and El Torito boot entry, noted in the BIOS (for INT 13h 4Bh)."""
    if not bios.cdroms:
        raise BootError("--boot cdrom needs a CD-ROM drive (-cdrom FILE or --drive file=FILE,media=cdrom)")
    drive = min(bios.cdroms)
    try:
        entry = eltorito.boot_entry(bios.cdroms[drive])
    except eltorito.ElToritoError as e:
        raise BootError(f"CD-ROM: {e}") from None
    bios.cd_boot = (drive, entry)
    return drive, entry


def _boot_cdrom(machine, bios: Bios) -> BootInfo:
    """El Torito no-emulation boot: the boot image at load_segment:0, run in real mode with
    DL = the CD's drive number (vmm/firmware/eltorito.py)."""
    drive, entry = _cd_boot_entry(bios)
    try:
        image = eltorito.load_boot_image(bios.cdroms[drive], entry, machine.memory.size)
    except eltorito.ElToritoError as e:
        raise BootError(f"CD-ROM: {e}") from None
    machine.memory.write(entry.load_segment << 4, image)
    cpu = machine.vcpu
    cpu.reset(entry.load_segment, 0)
    cpu.set_u64(16, drive)          # DL = boot drive
    cpu.rsp = 0x7C00
    return BootInfo("cdrom", entry.load_segment << 4,
                    f"El Torito boot image ({entry.image_bytes} bytes) from CD-ROM {drive:#x}")


def _flat32(machine, entry: int) -> None:
    """Flat 32-bit protected mode with a GDT of our own at 0x800 (code 0x10, data 0x18)."""
    cpu = machine.vcpu
    cpu.reset(0, 0)
    gdt = struct.pack("<QQQQ", 0, 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
    machine.memory.write(0x800, gdt)
    cpu.set_sys_seg("gdt", 0, 0x800, len(gdt) - 1, 0)
    cpu.set_reg("cr0", cpu.cr0 | 1)
    cpu.load_seg(CS, 0x10, 0, 0xFFFF_FFFF, 0x00CF9A00 & 0x00F0FF00 | 0x100)
    for s in (SS, DS, ES, FS, GS):
        cpu.load_seg(s, 0x18, 0, 0xFFFF_FFFF, 0x00CF9200 & 0x00F0FF00 | 0x100)
    cpu.rip = entry
    cpu.rflags = 0x2
    cpu.invalidate_code()


def _multiboot(machine, data: bytes, name: str, cmdline: str, modules: list[tuple[str, bytes]]) -> BootInfo:
    off = find_multiboot(data)
    if off is None:
        raise BootError(f"{name}: no Multiboot header (magic 1BADB002 with a valid checksum) in the first 8 KiB")
    flags = struct.unpack_from("<I", data, off + 4)[0]
    mem = machine.memory
    if flags & (1 << 16):
        if len(data) < off + 32:
            raise BootError(f"{name}: Multiboot header too short for its address fields")
        header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<IIIII", data, off + 12)
        # the order the Multiboot spec (3.1.3) implies, checked as QEMU's loader checks it
        if header_addr < load_addr:
            raise BootError(f"{name}: Multiboot header_addr {header_addr:#x} is below load_addr {load_addr:#x}")
        start = off - (header_addr - load_addr)
        if start < 0:
            raise BootError(f"{name}: Multiboot header_addr/load_addr point before the file")
        if load_end and load_end < load_addr:
            raise BootError(f"{name}: Multiboot load_end_addr {load_end:#x} is below load_addr {load_addr:#x}")
        size = (load_end - load_addr) if load_end else len(data) - start
        if bss_end and bss_end < load_addr + size:
            raise BootError(f"{name}: Multiboot bss_end_addr {bss_end:#x} is below the end of the loaded "
                            f"image {load_addr + size:#x}")
        if load_addr + max(size, bss_end - load_addr if bss_end else 0) > mem.size:
            raise BootError(f"{name}: the kernel does not fit in {mem.size >> 20} MiB of RAM")
        mem.write(load_addr, data[start:start + size])
        if bss_end > load_addr + size:
            mem.fill(load_addr + size, bss_end - load_addr - size)
        kernel_end = max(load_addr + size, bss_end)
    elif data[:4] == b"\x7fELF":
        entry, kernel_end = _load_elf(mem, data, name)
    else:
        raise BootError(f"{name}: Multiboot kernel is neither ELF nor marked with address fields (flag 16)")
    # modules, page aligned after the kernel
    mod_addr = (kernel_end + 0xFFF) & ~0xFFF
    mod_list = []
    strings = MB_CMDLINE_ADDR + 0x200
    for mname, mdata in modules:
        if mod_addr + len(mdata) > mem.size:
            raise BootError(f"module {mname} does not fit in RAM")
        mem.write(mod_addr, mdata)
        mem.write(strings, mname.encode() + b"\0")
        mod_list.append(struct.pack("<IIII", mod_addr, mod_addr + len(mdata), strings, 0))
        strings += len(mname) + 1
        mod_addr = (mod_addr + len(mdata) + 0xFFF) & ~0xFFF
    mods_addr = MB_MMAP_ADDR + 0x300
    mem.write(mods_addr, b"".join(mod_list))
    mem.write(MB_CMDLINE_ADDR, (cmdline or name).encode()[:0x1FF] + b"\0")
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind) for base, length, kind in machine.bios.e820_map())
    mem.write(MB_MMAP_ADDR, mmap)
    mbi = bytearray(0x58)
    mb_flags = (1 << 0) | (1 << 2) | (1 << 6) | (1 << 9) | ((1 << 3) if modules else 0)
    struct.pack_into("<III", mbi, 0, mb_flags, 639, (mem.size >> 10) - 1024)
    struct.pack_into("<I", mbi, 16, MB_CMDLINE_ADDR)
    struct.pack_into("<II", mbi, 20, len(modules), mods_addr)
    struct.pack_into("<II", mbi, 44, len(mmap), MB_MMAP_ADDR)
    loader = MB_CMDLINE_ADDR + 0x1F0
    mem.write(loader, b"vmm\0")
    struct.pack_into("<I", mbi, 64, loader)
    mem.write(MBI_ADDR, bytes(mbi))
    _flat32(machine, entry)
    cpu = machine.vcpu
    cpu.set_u64(0, MB_BOOT_MAGIC)
    cpu.set_u64(24, MBI_ADDR)
    return BootInfo("multiboot", entry, f"Multiboot kernel, entry {entry:#x}")


def _load_elf(mem, data: bytes, name: str) -> tuple[int, int]:
    if len(data) < 52 or data[4] != 1 or data[5] != 1:
        raise BootError(f"{name}: only 32-bit little-endian ELF Multiboot kernels are supported")
    (_e_type, e_machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum) = struct.unpack_from(
        "<HHIIIIIHHH", data, 16)
    if e_machine != 3:
        raise BootError(f"{name}: ELF machine {e_machine} is not i386")
    end = 0
    loaded = 0
    for i in range(phnum):
        p = phoff + i * phentsize
        if p + 32 > len(data):
            raise BootError(f"{name}: ELF program header {i} lies outside the file")
        p_type, p_off, _vaddr, p_paddr, p_filesz, p_memsz, _f, _a = struct.unpack_from("<IIIIIIII", data, p)
        if p_type != 1 or p_memsz == 0:
            continue
        if p_filesz > p_memsz:      # the ELF spec forbids it: the file part would overrun the segment
            raise BootError(f"{name}: ELF segment {i} has {p_filesz:#x} bytes in the file but {p_memsz:#x} in memory")
        if p_off + p_filesz > len(data) or p_paddr + p_memsz > mem.size:
            raise BootError(f"{name}: ELF segment {i} ({p_paddr:#x}+{p_memsz:#x}) does not fit")
        mem.write(p_paddr, data[p_off:p_off + p_filesz])
        if p_memsz > p_filesz:
            mem.fill(p_paddr + p_filesz, p_memsz - p_filesz)
        end = max(end, p_paddr + p_memsz)
        loaded += 1
    if not loaded:
        raise BootError(f"{name}: the ELF file has no loadable segment")
    return entry, end
