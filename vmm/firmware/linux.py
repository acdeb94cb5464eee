"""Linux bzImage loader: the x86 boot protocol, entered in 64-bit or 32-bit mode.

What this implements, by the sections of the kernel's
Documentation/arch/x86/boot.rst (protocol 2.15) and zero-page.rst:

- "The Real-Mode Kernel Header" / "Details of Header Fields": the setup
  header at 0x1F1 is parsed and checked (boot_flag 0xAA55, "HdrS", protocol
  2.10 or later, a jump whose target bounds the header, setup_sects with 0
  meaning 4, syssize within the file, LOADED_HIGH, a power-of-two
  kernel_alignment, a payload with a known compression magic).  Anything else
  is refused with a ``LinuxBootError`` naming the problem in one line.
- "32-bit Boot Protocol" / "64-bit Boot Protocol": the zero page (struct
  boot_params, arch/x86/include/uapi/asm/bootparam.h) starts zeroed, receives
  a copy of the setup header (0x1F1 up to 0x202 + the byte at 0x201), and is
  filled in as the kernel's real-mode setup code would have done it:
  screen_info (80x25 VGA text), alt_mem_k, the e820 table (e820_entries at
  0x1E8, the table at 0x2D0), acpi_rsdp_addr; in the header type_of_loader
  0xFF ("undefined"), vid_mode, code32_start, cmd_line_ptr, ramdisk_image
  and ramdisk_size.
- "Loading The Rest of The Kernel": the protected-mode code (from
  (setup_sects + 1) * 512, syssize * 16 bytes) goes to pref_address, or 1 MiB
  aligned up to kernel_alignment, or an address the caller gives a
  relocatable kernel; [load, load + init_size) must lie in usable RAM
  ("init_size": the memory the kernel needs before it reads its memory map).
- "Field name: initrd_addr_max" and "Special Command Line Options" (mem=):
  the initrd goes to the highest page-aligned address whose last byte is at
  most initrd_addr_max, below the end of RAM and 4 GiB, inside one usable
  e820 range and clear of the kernel's init_size window.  vga= sets vid_mode.
- Entry.  64-bit (the default): long mode, identity-mapped page tables for
  the first 4 GiB (2 MiB pages, so the kernel's init_size window, the zero
  page, the command line and the initrd are all mapped), a GDT with flat
  __BOOT_CS (0x10, 64-bit code) and __BOOT_DS (0x18), CS = __BOOT_CS,
  DS = ES = SS = __BOOT_DS, interrupts off, RSI = the zero page, RIP = load
  address + 0x200 (startup_64; needs XLF_KERNEL_64).  32-bit: protected mode
  with paging off, the same selectors with a 32-bit code segment, ESI = the
  zero page, EBP = EDI = EBX = 0, EIP = the load address (startup_32).

Boot structures sit in conventional memory at fixed addresses (``LAYOUT``),
below the kernel (which never loads below 1 MiB) and the initrd (placed high).
"""
from __future__ import annotations

import itertools
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from vmm.cpu.vcpu import CS, DS, ES, FS, GS, MSR_EFER, SS
from vmm.firmware.boot import BootError, BootInfo

# -- the setup header (boot.rst "The Real-Mode Kernel Header") ---------------------------------
HDR_OFFSET = 0x1F1
HDRS_MAGIC = 0x53726448          # "HdrS"
BOOT_FLAG = 0xAA55
MIN_VERSION = 0x020A             # 2.10: pref_address and init_size, needed to place the kernel
MIN_VERSION_64 = 0x020C          # 2.12: xloadflags, which says whether startup_64 exists
HDR_LIMIT = 0x290                # the setup header must end before edd_mbr_sig_buffer in boot_params
OLD_INITRD_ADDR_MAX = 0x37FF_FFFF

LOADED_HIGH = 1 << 0
QUIET_FLAG = 1 << 5
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

TYPE_OF_LOADER = 0xFF            # boot.rst "type_of_loader": 0xFF = undefined
VID_MODE_NORMAL = 0xFFFF         # boot.rst "Special Command Line Options": vga=normal
STARTUP_64_OFFSET = 0x200        # boot.rst "64-bit Boot Protocol": entry = load address + 0x200

# payload magic numbers (boot.rst "payload_offset"): gzip, bzip2, LZMA, XZ, LZ4, ZSTD, or ELF
PAYLOAD_MAGIC = {b"\x1f\x8b": "gzip", b"\x1f\x9e": "gzip", b"BZ": "bzip2", b"\x5d\x00": "lzma",
                 b"\xfd\x37": "xz", b"\x02\x21": "lz4", b"\x28\xb5": "zstd", b"\x7fE": "ELF"}

# -- struct boot_params offsets (bootparam.h, zero-page.rst) -------------------------------------
ZP_SIZE = 0x1000
ZP_SCREEN_INFO = 0x000
ZP_ACPI_RSDP_ADDR = 0x070
ZP_EXT_RAMDISK_IMAGE = 0x0C0
ZP_EXT_RAMDISK_SIZE = 0x0C4
ZP_EXT_CMD_LINE_PTR = 0x0C8
ZP_ALT_MEM_K = 0x1E0
ZP_E820_ENTRIES = 0x1E8
ZP_SENTINEL = 0x1EF
ZP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
E820_ENTRY = struct.Struct("<QQI")   # struct boot_e820_entry: addr, size, type (packed, 20 bytes)

# setup_header fields, as absolute offsets in the file and in boot_params
H_SETUP_SECTS = 0x1F1
H_SYSSIZE = 0x1F4
H_VID_MODE = 0x1FA
H_BOOT_FLAG = 0x1FE
H_JUMP = 0x200
H_HEADER = 0x202
H_VERSION = 0x206
H_KERNEL_VERSION = 0x20E
H_TYPE_OF_LOADER = 0x210
H_LOADFLAGS = 0x211
H_CODE32_START = 0x214
H_RAMDISK_IMAGE = 0x218
H_RAMDISK_SIZE = 0x21C
H_CMD_LINE_PTR = 0x228
H_INITRD_ADDR_MAX = 0x22C
H_KERNEL_ALIGNMENT = 0x230
H_RELOCATABLE_KERNEL = 0x234
H_MIN_ALIGNMENT = 0x235
H_XLOADFLAGS = 0x236
H_CMDLINE_SIZE = 0x238
H_PAYLOAD_OFFSET = 0x248
H_PAYLOAD_LENGTH = 0x24C
H_PREF_ADDRESS = 0x258
H_INIT_SIZE = 0x260
H_HANDOVER_OFFSET = 0x264

# screen_info (include/uapi/linux/screen_info.h): what the setup code's store_screen_info and
# the kernel's vgacon read; mode 3 is 80x25 colour text on a VGA
SI_ORIG_X, SI_ORIG_Y, SI_EXT_MEM_K = 0x00, 0x01, 0x02
SI_ORIG_VIDEO_MODE, SI_ORIG_VIDEO_COLS = 0x06, 0x07
SI_ORIG_VIDEO_EGA_BX, SI_ORIG_VIDEO_LINES, SI_ORIG_VIDEO_ISVGA, SI_ORIG_VIDEO_POINTS = 0x0A, 0x0E, 0x0F, 0x10
TEXT_MODE, TEXT_COLS, TEXT_LINES, TEXT_POINTS = 3, 80, 25, 16
EGA_BX = 0x0003   # INT 10h AH=12h BL=10h: colour, 256 KiB; a low byte of 0x10 would mean CGA to vgacon

# -- e820 types (the ACPI address range types) --------------------------------------------------
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5

EBDA_START = 0x9FC00
HIGH_MEMORY = 0x100000
FOUR_GIB = 1 << 32
MiB = 1 << 20
PAGE = 0x1000

# -- where the loader's own structures go (conventional memory, all below the kernel) -----------
BOOT_STACK_TOP = 0x10000   # RSP at entry; the kernel sets its own stack at once
PML4_ADDR = 0x10000
PDPT_ADDR = 0x11000
PD_ADDR = 0x12000          # four page directories: 4 GiB in 2 MiB pages
GDT_ADDR = 0x16000
ZERO_PAGE_ADDR = 0x17000
CMDLINE_ADDR = 0x18000
CMDLINE_END = EBDA_START   # boot.rst: the command line lies below 0xA0000
LAYOUT = {"stack": (BOOT_STACK_TOP - 0x8000, 0x8000), "page tables": (PML4_ADDR, 6 * PAGE),
          "gdt": (GDT_ADDR, 0x20), "zero page": (ZERO_PAGE_ADDR, ZP_SIZE)}

BOOT_CS = 0x10
BOOT_DS = 0x18
# flat 4 GiB descriptors, accessed bit set so the cached copy equals the table
GDT_CODE64 = 0x00AF_9B00_0000_FFFF
GDT_CODE32 = 0x00CF_9B00_0000_FFFF
GDT_DATA = 0x00CF_9300_0000_FFFF

CR0_PE = 1 << 0
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
PDE_2M = 0x83              # present, writable, 2 MiB page

ENTRY_MODES = ("64", "32")


class LinuxBootError(BootError):
    """A Linux kernel image, command line or initrd that cannot be booted as asked."""


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


@dataclass(frozen=True)
class SetupHeader:
    """The fields of the setup header a loader reads (boot.rst "Details of Header Fields")."""

    setup_sects: int          # already corrected: 0 reads as 4
    syssize: int              # in 16-byte paragraphs
    version: int
    header_end: int           # 0x202 + the byte at 0x201
    loadflags: int
    kernel_version: str
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: bool
    min_alignment: int
    xloadflags: int
    cmdline_size: int
    payload_offset: int
    payload_length: int
    payload_format: str
    pref_address: int
    init_size: int
    handover_offset: int

    @property
    def setup_size(self) -> int:
        """Bytes of boot sector plus real-mode setup code; the protected-mode kernel follows."""
        return (self.setup_sects + 1) * 512

    @property
    def kernel_size(self) -> int:
        """Bytes of protected-mode code (syssize is in paragraphs)."""
        return self.syssize * 16

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    @classmethod
    def parse(cls, data: bytes, name: str = "kernel") -> SetupHeader:
        """Read and check the header; a LinuxBootError names the first thing wrong."""
        if len(data) < 0x270:
            raise LinuxBootError(f"{name}: {len(data)} bytes is too short for a Linux boot sector "
                                 f"and setup header")
        boot_flag, = struct.unpack_from("<H", data, H_BOOT_FLAG)
        if boot_flag != BOOT_FLAG:
            raise LinuxBootError(f"{name}: boot_flag at 0x1FE is {boot_flag:#06x}, not 0xAA55: "
                                 f"not a Linux kernel")
        magic, version = struct.unpack_from("<IH", data, H_HEADER)
        if magic != HDRS_MAGIC:
            raise LinuxBootError(f"{name}: no \"HdrS\" magic at 0x202: not a Linux bzImage "
                                 f"(or a pre-2.00 zImage)")
        if version >> 8 != 2 or version < MIN_VERSION:
            raise LinuxBootError(f"{name}: boot protocol {version >> 8}.{version & 0xFF:02d} is not "
                                 f"supported (need 2.{MIN_VERSION & 0xFF:02d} or later 2.x)")
        if data[H_JUMP] != 0xEB:
            raise LinuxBootError(f"{name}: no short jump at 0x200 (found {data[H_JUMP]:#04x}): "
                                 f"corrupt setup header")
        header_end = 0x202 + data[H_JUMP + 1]
        if not H_HANDOVER_OFFSET + 4 <= header_end <= HDR_LIMIT:
            raise LinuxBootError(f"{name}: the jump at 0x200 puts the setup header end at {header_end:#x}, "
                                 f"outside 0x268..0x290: corrupt setup header")
        setup_sects = data[H_SETUP_SECTS] or 4
        setup_size = (setup_sects + 1) * 512
        syssize, = struct.unpack_from("<I", data, H_SYSSIZE)
        loadflags = data[H_LOADFLAGS]
        if not loadflags & LOADED_HIGH:
            raise LinuxBootError(f"{name}: LOADED_HIGH is clear in loadflags: a zImage, "
                                 f"only bzImage is supported")
        if setup_size >= len(data):
            raise LinuxBootError(f"{name}: setup_sects says {setup_size} bytes of setup code but "
                                 f"the file has {len(data)}: truncated")
        if syssize == 0:
            raise LinuxBootError(f"{name}: syssize is 0: no protected-mode kernel")
        if setup_size + syssize * 16 > len(data):
            raise LinuxBootError(f"{name}: truncated: the header promises {setup_size + syssize * 16} bytes "
                                 f"(setup {setup_size} + kernel {syssize * 16}) but the file has {len(data)}")
        (initrd_addr_max, kernel_alignment, relocatable, min_alignment, xloadflags,
         cmdline_size) = struct.unpack_from("<IIBBHI", data, H_INITRD_ADDR_MAX)
        if relocatable and (kernel_alignment == 0 or kernel_alignment & (kernel_alignment - 1)):
            raise LinuxBootError(f"{name}: kernel_alignment {kernel_alignment:#x} is not a power of two")
        if min_alignment > 31:
            raise LinuxBootError(f"{name}: min_alignment 2^{min_alignment} is out of range")
        payload_offset, payload_length = struct.unpack_from("<II", data, H_PAYLOAD_OFFSET)
        payload_format = ""
        if payload_length:
            if payload_offset + payload_length > syssize * 16:
                raise LinuxBootError(f"{name}: the compressed payload ({payload_offset:#x}+"
                                     f"{payload_length:#x}) runs past the protected-mode kernel "
                                     f"({syssize * 16:#x} bytes): corrupt")
            head = data[setup_size + payload_offset:setup_size + payload_offset + 2]
            payload_format = PAYLOAD_MAGIC.get(head, "")
            if not payload_format:
                raise LinuxBootError(f"{name}: the payload at {setup_size + payload_offset:#x} starts with "
                                     f"{head.hex()}, no known compression magic: corrupt kernel image")
        pref_address, init_size, handover_offset = struct.unpack_from("<QII", data, H_PREF_ADDRESS)
        if init_size < syssize * 16:
            raise LinuxBootError(f"{name}: init_size {init_size:#x} is smaller than the kernel itself "
                                 f"({syssize * 16:#x}): corrupt setup header")
        kv_ptr, = struct.unpack_from("<H", data, H_KERNEL_VERSION)
        kernel_version = ""
        if kv_ptr and kv_ptr + 0x200 < setup_size:
            raw = data[kv_ptr + 0x200:min(setup_size, kv_ptr + 0x200 + 256)].split(b"\0", 1)[0]
            kernel_version = raw.decode("ascii", "replace")
        return cls(setup_sects=setup_sects, syssize=syssize, version=version, header_end=header_end,
                   loadflags=loadflags, kernel_version=kernel_version,
                   initrd_addr_max=initrd_addr_max or OLD_INITRD_ADDR_MAX,
                   kernel_alignment=kernel_alignment, relocatable_kernel=bool(relocatable),
                   min_alignment=min_alignment, xloadflags=xloadflags if version >= MIN_VERSION_64 else 0,
                   cmdline_size=cmdline_size, payload_offset=payload_offset, payload_length=payload_length,
                   payload_format=payload_format, pref_address=pref_address, init_size=init_size,
                   handover_offset=handover_offset)


@dataclass
class LinuxBootInfo(BootInfo):
    """BootInfo for a Linux kernel, with where everything went."""

    header: SetupHeader | None = None
    protocol: str = "64"
    load_addr: int = 0
    zero_page: int = ZERO_PAGE_ADDR
    cmdline_addr: int = CMDLINE_ADDR
    cmdline_size: int = 0
    initrd_addr: int = 0
    initrd_size: int = 0
    e820: list[E820Entry] = field(default_factory=list)

    @property
    def taken(self) -> list[tuple[int, int]]:
        """Guest-physical ranges the loader used (for whoever places ACPI tables or fw_cfg data next)."""
        out = list(LAYOUT.values())
        out.append((self.cmdline_addr, self.cmdline_size + 1))
        if self.header is not None:
            out.append(kernel_window(self.header, self.load_addr))
        if self.initrd_size:
            out.append((self.initrd_addr, self.initrd_size))
        return out


def detect_bzimage(data: bytes) -> bool:
    """True if ``data`` starts like a bzImage: boot_flag 0xAA55, "HdrS", protocol 2.x and LOADED_HIGH.

    A bzImage also carries 55 AA at offset 510, so this must be asked before
    taking an image for a boot sector."""
    if len(data) < 0x212:
        return False
    boot_flag, = struct.unpack_from("<H", data, H_BOOT_FLAG)
    magic, version = struct.unpack_from("<IH", data, H_HEADER)
    return (boot_flag == BOOT_FLAG and magic == HDRS_MAGIC and version >> 8 == 2
            and bool(data[H_LOADFLAGS] & LOADED_HIGH))


Region = tuple[int, int] | tuple[int, int, int]


def pc_e820(mem_size: int, reserved: Iterable[Region] = ()) -> list[E820Entry]:
    """The e820 map of a PC with ``mem_size`` bytes of RAM: usable below the EBDA (639 KiB), reserved
    from 0x9FC00 to 1 MiB, usable from 1 MiB to the end of RAM; then each ``(addr, size[, type])``
    in ``reserved`` (type 2 unless given, e.g. E820_ACPI for ACPI tables) is painted over it."""
    if mem_size <= HIGH_MEMORY:
        raise LinuxBootError(f"{mem_size >> 10} KiB of RAM is too little for Linux (need more than 1 MiB)")
    paint = [(0, EBDA_START, E820_RAM), (EBDA_START, HIGH_MEMORY - EBDA_START, E820_RESERVED),
             (HIGH_MEMORY, mem_size - HIGH_MEMORY, E820_RAM)]
    for r in reserved:
        addr, size = r[0], r[1]
        kind = r[2] if len(r) > 2 else E820_RESERVED
        if size <= 0 or addr < 0 or kind <= 0:
            raise LinuxBootError(f"e820: bad region {addr:#x}+{size:#x} type {kind}")
        paint.append((addr, size, kind))
    return _flatten(paint)


def _flatten(paint: list[tuple[int, int, int]]) -> list[E820Entry]:
    """Later regions win where they overlap earlier ones; adjacent ranges of one type merge."""
    cuts = sorted({p for a, s, _ in paint for p in (a, a + s)})
    out: list[E820Entry] = []
    for lo, hi in itertools.pairwise(cuts):
        kind = 0
        for a, s, k in paint:
            if a <= lo and hi <= a + s:
                kind = k
        if not kind:
            continue
        if out and out[-1].type == kind and out[-1].end == lo:
            out[-1] = E820Entry(out[-1].addr, hi - out[-1].addr, kind)
        else:
            out.append(E820Entry(lo, hi - lo, kind))
    return out


def _parse_size(text: str) -> int | None:
    m = re.fullmatch(r"(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)([kKmMgGtTpPeE]?)", text)
    if not m:
        return None
    value = int(m.group(1), 0)
    return value << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}[m.group(2).lower()]


def _cmdline_options(cmdline: str) -> tuple[int, int | None]:
    """vid_mode from vga= and the end of memory from mem= (boot.rst "Special Command Line Options")."""
    vid_mode, mem_end = VID_MODE_NORMAL, None
    for word in cmdline.split():
        if word.startswith("vga="):
            arg = word[4:]
            named = {"normal": 0xFFFF, "ext": 0xFFFE, "ask": 0xFFFD}
            try:
                vid_mode = named[arg] if arg in named else int(arg, 0) & 0xFFFF
            except ValueError:
                raise LinuxBootError(f"command line: vga={arg} is neither normal, ext, ask "
                                     f"nor a number") from None
        elif word.startswith("mem="):
            size = _parse_size(word[4:])
            if size is None:
                raise LinuxBootError(f"command line: mem={word[4:]} is not a size (e.g. 64M)")
            mem_end = size
    return vid_mode, mem_end


def _in_ram(e820: list[E820Entry], start: int, size: int) -> bool:
    return any(e.type == E820_RAM and e.addr <= start and start + size <= e.end for e in e820)


def kernel_window(hdr: SetupHeader, load_addr: int) -> tuple[int, int]:
    """(start, size) of the memory the kernel occupies until it reads its memory map: the loaded
    image and [runtime start, + init_size) (boot.rst "init_size").

    boot.rst gives the runtime start of a relocatable kernel as load_addr
    aligned up to kernel_alignment; Linux's x86 decompressor
    (arch/x86/boot/compressed/head_64.S, startup_32 and startup_64) also never
    goes below LOAD_PHYSICAL_ADDR, which the header exports as pref_address."""
    if hdr.relocatable_kernel:
        runtime = max(-(-load_addr // hdr.kernel_alignment) * hdr.kernel_alignment, hdr.pref_address)
    else:
        runtime = hdr.pref_address or load_addr
    start = min(load_addr, runtime)
    return start, max(load_addr + hdr.kernel_size, runtime + hdr.init_size) - start


def _choose_load_addr(hdr: SetupHeader, e820: list[E820Entry], load_addr: int | None, name: str) -> int:
    """boot.rst "Loading The Rest of The Kernel", "relocatable_kernel" and "pref_address": the
    preferred address, or one the caller gives a relocatable kernel."""
    if load_addr is None:
        addr = hdr.pref_address or HIGH_MEMORY
    else:
        if not hdr.relocatable_kernel and load_addr != (hdr.pref_address or HIGH_MEMORY):
            raise LinuxBootError(f"{name}: the kernel is not relocatable; it loads only at "
                                 f"{hdr.pref_address or HIGH_MEMORY:#x}")
        align = hdr.kernel_alignment if hdr.relocatable_kernel else PAGE
        if hdr.min_alignment:
            align = min(align, 1 << hdr.min_alignment)
        if load_addr % align or load_addr < HIGH_MEMORY:
            raise LinuxBootError(f"{name}: load address {load_addr:#x} must be at or above 1 MiB and aligned "
                                 f"to {align:#x}")
        addr = load_addr
    start, size = kernel_window(hdr, addr)
    if start + size > FOUR_GIB or not _in_ram(e820, start, size):
        ram = max((e.end for e in e820 if e.type == E820_RAM), default=0)
        raise LinuxBootError(f"{name}: the kernel needs usable RAM from {start:#x} to {start + size:#x} "
                             f"(init_size {hdr.init_size:#x}), so at least "
                             f"{-(-(start + size) // MiB)} MiB of RAM; the machine has {ram // MiB} MiB")
    return addr


def _place_initrd(size: int, hdr: SetupHeader, e820: list[E820Entry], avoid: list[tuple[int, int]],
                  mem_end: int | None, name: str) -> int:
    """The highest page-aligned address for the initrd (boot.rst "initrd_addr_max")."""
    limit = min(hdr.initrd_addr_max + 1, FOUR_GIB, mem_end if mem_end is not None else FOUR_GIB)
    for e in sorted((e for e in e820 if e.type == E820_RAM and e.end > HIGH_MEMORY), key=lambda e: -e.end):
        top = min(e.end, limit)
        while top - size >= max(e.addr, HIGH_MEMORY):
            addr = (top - size) & ~(PAGE - 1)
            if addr < max(e.addr, HIGH_MEMORY):
                break
            clash = [(s, n) for s, n in avoid if addr < s + n and s < addr + size]
            if not clash:
                return addr
            top = min(s for s, _ in clash)
    raise LinuxBootError(f"{name}: no room for an initrd of {size} bytes below {limit:#x} outside "
                         f"the kernel's init_size window; give the machine more RAM")


def _zero_page(data: bytes, hdr: SetupHeader, *, load_addr: int, cmdline_addr: int, initrd: tuple[int, int],
               e820: list[E820Entry], vid_mode: int, acpi_rsdp: int | None, text_screen: bool) -> bytes:
    """struct boot_params (boot.rst "32-bit Boot Protocol": zeroed, then the setup header copied in)."""
    zp = bytearray(ZP_SIZE)
    zp[HDR_OFFSET:hdr.header_end] = data[HDR_OFFSET:hdr.header_end]
    zp[H_TYPE_OF_LOADER] = TYPE_OF_LOADER
    struct.pack_into("<H", zp, H_VID_MODE, vid_mode)
    struct.pack_into("<I", zp, H_CODE32_START, load_addr)
    struct.pack_into("<II", zp, H_RAMDISK_IMAGE, initrd[0] & 0xFFFF_FFFF, initrd[1] & 0xFFFF_FFFF)
    struct.pack_into("<II", zp, ZP_EXT_RAMDISK_IMAGE, initrd[0] >> 32, initrd[1] >> 32)
    struct.pack_into("<I", zp, H_CMD_LINE_PTR, cmdline_addr & 0xFFFF_FFFF)
    struct.pack_into("<I", zp, ZP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    ram_above_1m = 0
    for e in e820:
        if e.type == E820_RAM and e.addr <= HIGH_MEMORY + ram_above_1m < e.end:
            ram_above_1m = e.end - HIGH_MEMORY
    struct.pack_into("<I", zp, ZP_ALT_MEM_K, ram_above_1m >> 10)                      # as INT 15h E801h
    struct.pack_into("<H", zp, ZP_SCREEN_INFO + SI_EXT_MEM_K, min(0xFFFF, ram_above_1m >> 10))  # INT 15h 88h
    if text_screen:
        zp[ZP_SCREEN_INFO + SI_ORIG_VIDEO_MODE] = TEXT_MODE
        zp[ZP_SCREEN_INFO + SI_ORIG_VIDEO_COLS] = TEXT_COLS
        struct.pack_into("<H", zp, ZP_SCREEN_INFO + SI_ORIG_VIDEO_EGA_BX, EGA_BX)
        zp[ZP_SCREEN_INFO + SI_ORIG_VIDEO_LINES] = TEXT_LINES
        zp[ZP_SCREEN_INFO + SI_ORIG_VIDEO_ISVGA] = 1
        struct.pack_into("<H", zp, ZP_SCREEN_INFO + SI_ORIG_VIDEO_POINTS, TEXT_POINTS)
    if acpi_rsdp is not None:
        struct.pack_into("<Q", zp, ZP_ACPI_RSDP_ADDR, acpi_rsdp)
    zp[ZP_E820_ENTRIES] = len(e820)
    for i, e in enumerate(e820):
        E820_ENTRY.pack_into(zp, ZP_E820_TABLE + i * E820_ENTRY.size, e.addr, e.size, e.type)
    return bytes(zp)


def _page_tables() -> bytes:
    """PML4, PDPT and four page directories identity-mapping 0-4 GiB with 2 MiB pages."""
    pml4 = struct.pack("<Q", PDPT_ADDR | 0x3).ljust(PAGE, b"\0")
    pdpt = b"".join(struct.pack("<Q", (PD_ADDR + i * PAGE) | 0x3) for i in range(4)).ljust(PAGE, b"\0")
    pds = b"".join(struct.pack("<Q", (i << 21) | PDE_2M) for i in range(4 * 512))
    return pml4 + pdpt + pds


def _seg_flags(desc: int) -> int:
    """The descriptor's attribute bits as the CPU's segment cache holds them."""
    return (desc >> 32) & 0x00F0_FF00


def _enter(machine, protocol: str, entry: int) -> None:
    """Set the CPU state of boot.rst "64-bit Boot Protocol" or "32-bit Boot Protocol"."""
    cpu = machine.vcpu
    mem = machine.memory
    code = GDT_CODE64 if protocol == "64" else GDT_CODE32
    gdt = struct.pack("<QQQQ", 0, 0, code, GDT_DATA)
    mem.write(GDT_ADDR, gdt)
    cpu.reset(0, 0)
    cpu.set_sys_seg("gdt", 0, GDT_ADDR, len(gdt) - 1, 0)
    cpu.set_sys_seg("idt", 0, 0, 0, 0)      # none yet: the kernel loads its own before enabling interrupts
    if protocol == "64":
        mem.write(PML4_ADDR, _page_tables())
        cpu.set_reg("cr3", PML4_ADDR)
        cpu.set_reg("cr4", cpu.cr4 | CR4_PAE)
        cpu.set_msr(MSR_EFER, cpu.efer | EFER_LME)
        cpu.set_reg("cr0", cpu.cr0 | CR0_PE | CR0_PG)     # with LME and PAE set, this activates long mode
        if not cpu.long_mode or not cpu.efer & EFER_LMA:
            raise RuntimeError("the vCPU did not enter long mode when paging was enabled with EFER.LME set")
    else:
        cpu.set_reg("cr0", (cpu.cr0 | CR0_PE) & ~CR0_PG)
    cpu.load_seg(CS, BOOT_CS, 0, 0xFFFF_FFFF, _seg_flags(code))
    for s in (DS, ES, SS, FS, GS):
        cpu.load_seg(s, BOOT_DS, 0, 0xFFFF_FFFF, _seg_flags(GDT_DATA))
    for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
              "r14", "r15"):
        cpu.set_reg(r, 0)
    cpu.set_reg("rsi", ZERO_PAGE_ADDR)
    cpu.rsp = BOOT_STACK_TOP
    cpu.rflags = 0x2                         # IF = 0: the protocol enters with interrupts disabled
    cpu.rip = entry
    cpu.flush_tlb()
    cpu.invalidate_code()


def load_linux(machine, kernel: bytes, initrd: bytes | None = None, cmdline: str = "", *,
               protocol: str = "64", name: str = "kernel", e820: list[E820Entry] | None = None,
               reserved: Iterable[Region] = (), acpi_rsdp: int | None = None,
               load_addr: int | None = None, text_screen: bool = True) -> LinuxBootInfo:
    """Load a bzImage (and an initrd) into ``machine`` and set the vCPU at the kernel's entry point.

    ``protocol`` is "64" (startup_64 in long mode, the default) or "32"
    (startup_32 in flat protected mode).  The e820 map is ``e820`` if given,
    else ``pc_e820(machine.memory.size, reserved)``.  ``acpi_rsdp`` goes to
    boot_params.acpi_rsdp_addr.  ``text_screen`` describes an 80x25 VGA text
    screen in screen_info (else the kernel is told there is no screen).
    Raises LinuxBootError (one line) for anything that cannot be booted.
    """
    if protocol not in ENTRY_MODES:
        raise LinuxBootError(f"unknown Linux entry {protocol!r}: choose 64 or 32")
    hdr = SetupHeader.parse(kernel, name)
    if protocol == "64" and not hdr.xloadflags & XLF_KERNEL_64:
        raise LinuxBootError(f"{name}: XLF_KERNEL_64 is clear in xloadflags (protocol {hdr.version_text}): "
                             f"no 64-bit entry point; use the 32-bit boot protocol")
    mem = machine.memory
    if not machine.vcpu.a20_mask & (1 << 20):
        raise LinuxBootError("A20 is disabled: the kernel cannot be loaded above 1 MiB")
    table = _flatten([(e.addr, e.size, e.type) for e in e820]) if e820 is not None \
        else pc_e820(mem.size, reserved)
    if len(table) > E820_MAX_ENTRIES_ZEROPAGE:
        raise LinuxBootError(f"e820: {len(table)} entries do not fit the zero page's "
                             f"{E820_MAX_ENTRIES_ZEROPAGE}")
    for e in table:
        if e.type == E820_RAM and e.end > mem.size:
            raise LinuxBootError(f"e820: usable range {e.addr:#x}-{e.end - 1:#x} lies beyond RAM "
                                 f"({mem.size:#x})")
    for what, (start, size) in LAYOUT.items():
        if not _in_ram(table, start, size):
            raise LinuxBootError(f"e820: the loader's {what} at {start:#x} is not in usable RAM")
    try:
        raw_cmdline = cmdline.encode("ascii")
    except UnicodeEncodeError:
        raise LinuxBootError("the kernel command line must be ASCII") from None
    if b"\0" in raw_cmdline:
        raise LinuxBootError("the kernel command line contains a NUL byte")
    if len(raw_cmdline) > hdr.cmdline_size or CMDLINE_ADDR + len(raw_cmdline) + 1 > CMDLINE_END:
        raise LinuxBootError(f"the kernel command line is {len(raw_cmdline)} bytes; {name} accepts at most "
                             f"{hdr.cmdline_size} (cmdline_size)")
    if not _in_ram(table, CMDLINE_ADDR, len(raw_cmdline) + 1):
        raise LinuxBootError(f"e820: the command line at {CMDLINE_ADDR:#x} is not in usable RAM")
    vid_mode, mem_end = _cmdline_options(cmdline)
    addr = _choose_load_addr(hdr, table, load_addr, name)
    window = kernel_window(hdr, addr)
    initrd_addr = initrd_size = 0
    if initrd:
        initrd_size = len(initrd)
        avoid = [window, *LAYOUT.values(), (CMDLINE_ADDR, len(raw_cmdline) + 1)]
        initrd_addr = _place_initrd(initrd_size, hdr, table, avoid, mem_end, name)
    mem.write(addr, kernel[hdr.setup_size:hdr.setup_size + hdr.kernel_size])
    if initrd:
        mem.write(initrd_addr, initrd)
    mem.write(CMDLINE_ADDR, raw_cmdline + b"\0")
    zp = _zero_page(kernel, hdr, load_addr=addr, cmdline_addr=CMDLINE_ADDR, initrd=(initrd_addr, initrd_size),
                    e820=table, vid_mode=vid_mode, acpi_rsdp=acpi_rsdp, text_screen=text_screen)
    mem.write(ZERO_PAGE_ADDR, zp)
    entry = addr + STARTUP_64_OFFSET if protocol == "64" else addr
    _enter(machine, protocol, entry)
    version = hdr.kernel_version.split(" ", 1)[0] or "unknown version"
    detail = (f"Linux {version} (boot protocol {hdr.version_text}, {protocol}-bit entry) at {addr:#x}"
              + (f", initrd {initrd_size} bytes at {initrd_addr:#x}" if initrd else ""))
    return LinuxBootInfo("linux", entry, detail, header=hdr, protocol=protocol, load_addr=addr,
                         zero_page=ZERO_PAGE_ADDR, cmdline_addr=CMDLINE_ADDR, cmdline_size=len(raw_cmdline),
                         initrd_addr=initrd_addr,
                         initrd_size=initrd_size, e820=table)
