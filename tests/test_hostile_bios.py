"""Issue 16: a guest cannot crash vmm through the BIOS.

A BIOS service's buffer is where the guest's segment says, and in unreal mode
(a segment base loaded in protected mode, kept after the switch back) that can
be anywhere in the 4 GiB space, past the end of RAM.  A real BIOS's accesses
there are the CPU's: past RAM they reach the MMIO bus (unclaimed space reads
zeros, as QEMU's unassigned memory, and drops writes), and the service returns what it would return
(CF and AH as the interface defines).  vmm once ended every such call in a
GuestMemoryError traceback (INT 13h 02h/42h/48h, INT 10h 13h, INT 15h E820).

A protected-mode jump into the BIOS's trap range (F000:0100 + vector) is no
BIOS call: the CPU executes what is there (the ROM's IRET, or, under paging,
whatever the guest mapped at that linear address).
"""
from __future__ import annotations

import struct

import pytest

from devices.storage.disk import DiskImage
from host.serial import NullBackend
from tools.guestkit import asm, seg_desc
from vmm.firmware.boot import boot
from vmm.machine import StopReason
from vmm.platform.pc import PcConfig, PcMachine

MEM = 2 << 20               # the smallest machine: its RAM ends at 2 MiB
HIGH = 0x8000_0000          # a segment base far past the end of RAM (unclaimed space)
GDT, GDTR = 0x500, 0x520


def _unreal(seg: str, base: int) -> str:
    """16-bit code: give ``seg`` the hidden base ``base`` (protected mode and back)."""
    desc = seg_desc(base, 0xFFFF, 0x92, 0)
    return f"""
        cli
        xor ax, ax
        mov ds, ax
        mov ss, ax
        mov sp, 0x7000
        mov dword ptr [{GDT}], 0
        mov dword ptr [{GDT + 4}], 0
        mov dword ptr [{GDT + 8}], {desc & 0xFFFFFFFF:#x}
        mov dword ptr [{GDT + 12}], {desc >> 32:#x}
        mov word ptr [{GDTR}], 15
        mov dword ptr [{GDTR + 2}], {GDT}
        lgdt [{GDTR}]
        mov eax, cr0
        or al, 1
        mov cr0, eax
        mov bx, 8
        mov {seg}, bx
        and al, 0xfe
        mov cr0, eax
    """


# after the call: exit with (CF << 8) | AH through the debug-exit port
REPORT = """
        setc bl
        mov al, ah
        mov ah, bl
        mov dx, 0x501
        out dx, ax
        hlt
"""


def _run(code16: str, disk: bytes | None = None, mem: int = MEM, limit: int = 2_000_000):
    from tests.test_platform_guests import boot_sector

    sector = boot_sector(code16 + REPORT)
    image = sector + (disk[512:] if disk else bytes(512 * 63))
    m = PcMachine(PcConfig(mem_size=mem, serial=NullBackend()))
    boot(m, image, "disk", name="hostile.img", load_addr=0x100000, cmdline="")
    res = m.run(limit)
    return m, res


def _status(res) -> tuple[int, int]:
    assert res.reason is StopReason.EXIT, res
    return res.status >> 8, res.status & 0xFF    # (CF, AH)


def test_int10_write_string_from_beyond_ram():
    m, res = _run(_unreal("es", HIGH) + """
        push ds
        mov ax, 0xb800
        mov ds, ax
        mov cx, 40
        xor si, si
    l_fill:
        mov byte ptr [si], 0x41
        add si, 2
        loop l_fill
        pop ds
        mov ax, 0x1301
        mov bx, 0x0007
        mov cx, 40
        xor dx, dx
        xor bp, bp
        int 0x10
        clc
        mov ah, 0
    """)
    assert _status(res) == (0, 0)
    # the string read as zeros (unassigned space, as under QEMU): 40 NULs over the 'A's the
    # code put at the top left of the screen
    assert m.memory.read(0xB8000, 80)[0::2] == bytes(40)


def test_int13_02_read_that_straddles_the_end_of_ram():
    """ES based 4 KiB below the top of RAM, 16 sectors: the first 8 land in RAM."""
    disk = b"".join(bytes([s]) * 512 for s in range(64))
    m, res = _run(_unreal("es", MEM - 4096) + """
        mov ax, 0x0210
        mov cx, 0x0001
        mov dx, 0x0080
        xor bx, bx
        int 0x13
    """, disk=disk)
    assert _status(res) == (0, 0)
    # (sector 0 is the boot sector itself)
    assert m.memory.read(MEM - 4096 + 512, 3584) == b"".join(bytes([s]) * 512 for s in range(1, 8))


def test_int13_02_read_into_a_buffer_beyond_ram():
    m, res = _run(_unreal("es", HIGH) + """
        mov ax, 0x0204
        mov cx, 0x0001
        mov dx, 0x0080
        xor bx, bx
        int 0x13
    """)
    assert _status(res) == (0, 0)                 # the sectors went where the bus sent them: nowhere


def test_int13_42_read_that_runs_past_the_end_of_ram():
    """The DAP in RAM, its buffer at FFFF:0010 (1 MiB, A20 on) and 8 sectors more than the
    RAM above it holds: RAM fills to its last byte, the rest misses it."""
    above = (MEM - 0x100000) // 512
    count = above + 8
    disk = b"".join(struct.pack("<H", s) * 256 for s in range(count + 16))
    m, res = _run(f"""
        xor ax, ax
        mov ds, ax
        mov ax, 0x2401
        int 0x15
        mov word ptr [0x600], 0x0010
        mov word ptr [0x602], {count}
        mov word ptr [0x604], 0x0010
        mov word ptr [0x606], 0xffff
        mov dword ptr [0x608], 8
        mov dword ptr [0x60c], 0
        mov si, 0x600
        mov ah, 0x42
        mov dl, 0x80
        int 0x13
    """, disk=disk)
    assert _status(res) == (0, 0)
    last = above - 1
    assert m.memory.read(MEM - 512, 512) == struct.pack("<H", 8 + last) * 256


def test_int13_42_with_its_packet_beyond_ram():
    """DS:SI past RAM: the packet reads as zeros (size 0): no packet."""
    _m, res = _run(_unreal("ds", HIGH) + """
        mov si, 0x10
        mov ah, 0x42
        mov dl, 0x80
        int 0x13
    """)
    cf, ah = _status(res)
    assert cf == 1 and ah != 0


def test_int13_48_parameters_into_a_buffer_beyond_ram():
    _m, res = _run(_unreal("ds", HIGH) + """
        xor si, si
        mov ah, 0x48
        mov dl, 0x80
        int 0x13
    """)
    assert _status(res) == (0, 0)


def test_int15_e820_into_a_buffer_beyond_ram():
    _m, res = _run(_unreal("es", HIGH) + """
        mov eax, 0xe820
        mov edx, 0x534d4150
        xor ebx, ebx
        mov ecx, 20
        xor di, di
        int 0x15
        setc cl
        cmp eax, 0x534d4150
        setne ah
        shr cl, 1
    """)
    assert _status(res) == (0, 0)


def test_a_service_with_its_stack_beyond_ram():
    """SS past RAM: the INT's pushes are lost, the BIOS's FLAGS update too, and the IRET
    pops zeros (0000:0000): the guest has wrecked itself, and vmm just runs it on."""
    m, res = _run(_unreal("ss", HIGH) + """
        mov ah, 0x01
        int 0x16
    """, limit=200_000)
    assert m.firmware.calls.get(0x16) == 1
    assert res.reason in (StopReason.LIMIT, StopReason.SHUTDOWN, StopReason.HALTED, StopReason.ERROR), res


# -- protected mode ----------------------------------------------------------------------------

def _flat_machine(code: bytes, mmu: str) -> PcMachine:
    m = PcMachine(PcConfig(mem_size=32 << 20, serial=NullBackend(), mmu=mmu))
    boot(m, code, "flat", name="pm.bin", load_addr=0x100000, cmdline="")
    return m


@pytest.mark.parametrize("mmu", ["shadow", "nested"])
def test_a_protected_mode_jump_into_the_trap_range_runs_the_rom(mmu):
    """ES based past RAM and AH=13h, as INT 10h's write-string: in protected mode no service
    runs; the ROM's IRET returns through the frame the code pushed, AX untouched."""
    es_desc = seg_desc(HIGH, 0xFFFF, 0x92, 0)
    base = 0x100000
    code = asm(f"""
        mov dword ptr [0x820], {es_desc & 0xFFFFFFFF:#x}
        mov dword ptr [0x824], {es_desc >> 32:#x}
        mov word ptr [{base + 0x800}], 0x27
        mov dword ptr [{base + 0x802}], 0x800
        lgdt [{base + 0x800}]
        mov ax, 0x20
        mov es, ax
        mov eax, 0x1301
        mov ecx, 40
        xor ebp, ebp
        pushfd
        xor edx, edx
        mov dx, cs
        push edx
        push {base + 0x100:#x}
        mov ebx, 0xf0110
        jmp ebx
    """, 32, base)
    assert len(code) < 0x100
    tail = asm("mov dx, 0x501\nout dx, ax\nhlt", 32, base + 0x100)
    image = code.ljust(0x100, b"\x90") + tail
    m = _flat_machine(image, mmu)
    res = m.run(100_000)
    assert res.reason is StopReason.EXIT and res.status == 0x1301, res
    assert 0x10 not in m.firmware.calls


@pytest.mark.parametrize("mmu", ["shadow", "nested"])
def test_paged_code_at_the_trap_range_address_is_the_guest_s(mmu):
    """Under paging, linear F0113h may be any page: the guest's own code there runs."""
    base = 0x100000
    pd, pt, other = 0x300000, 0x301000, 0x302000
    m = _flat_machine(asm(f"""
        mov eax, {pd:#x}
        mov cr3, eax
        mov eax, cr0
        or eax, 0x80000000
        mov cr0, eax
        mov ah, 0x42
        mov ebx, 0xf0113
        jmp ebx
    """, 32, base), mmu)
    mem = m.memory
    mem.write(pd, struct.pack("<I", pt | 3) + bytes(4092))
    mem.write(pt, b"".join(struct.pack("<I", (i << 12) | 3) for i in range(1024)))
    mem.write(pt + 0xF0 * 4, struct.pack("<I", other | 3))
    mem.write(other + 0x113, asm("mov ax, 0x77\nmov dx, 0x501\nout dx, ax\nhlt", 32, 0xF0113))
    res = m.run(100_000)
    assert res.reason is StopReason.EXIT and res.status == 0x77, res
    assert 0x13 not in m.firmware.calls
