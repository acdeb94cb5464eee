"""Issue 16: the two MMU modes on page tables outside RAM, held against QEMU.

What a PC would do is a datasheet question (a master abort reads all ones);
what guests written against QEMU meet is QEMU's answer, and that is what vmm
follows (DESIGN.md: where QEMU departs from a datasheet, behave like QEMU and
say so).  Measured on QEMU 7.2 (qemu-system-i386 -m 32, machines pc and q35,
TCG): a load from unassigned guest-physical space above RAM reads zeros, and
so does the page walk: a PDE pointing past RAM gives a #PF with error code 0
(not present) and CR2 the linear address; a CR3 past RAM makes the next fetch
fault, the #PF's delivery fault again (#DF) and then a third time: a triple
fault.

Both MMU modes now do exactly that.  The nested mode always did (Unicorn's
walker is QEMU's); the shadow MMU's walk (vmm/cpu/native/mmu.c and its
reference vmm/memory/paging.py) read all ones there and ended in exit 4 (a
fetch from 0xFFFFFxxx) and is changed to zeros.

A direct load reads zeros too, and a store goes nowhere: a page above RAM
that the guest loads from or stores to is routed to the MMIO bus
(vmm/cpu/engine.py ``_background_page``), which answers an unclaimed read
with zeros, as QEMU's unassigned space does (measured below on QEMU 7.2, pc
and q35, qemu-system-i386 and -x86_64: zeros above RAM, in the PCI hole, next
to the I/O APIC and the HPET, below the BIOS; a store there is dropped).  It
answered all ones (a PC's master abort) until the two disagreed inside vmm:
the walk read zeros from a page until the guest loaded from it, all ones
after.  Now every read of unassigned space answers the same, QEMU's answer.

Each case is one boot sector (assembled here) that reports through the
debug-exit port (0x501): 0x20 + error code from its #PF handler when CR2 is
the expected address (0x3F if not), 0x12 from any other exception, 0x10 or
0x11 when the access went through (0x11: it read all ones).  Where
qemu-system-i386 is installed the same image runs under QEMU too, and must
end the same way.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from host.serial import NullBackend
from tools.guestkit import asm
from vmm.firmware.boot import boot
from vmm.machine import StopReason
from vmm.platform.pc import PcConfig, PcMachine

QEMU = shutil.which("qemu-system-i386")
MEM = 32 << 20
IDT = 0x7E00

# real mode -> 32-bit protected mode, flat; GDT at 0x7C40, GDTR at 0x7C60, IDTR at 0x7C66
STUB16 = """
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    lgdt [0x7c60]
    mov eax, cr0
    or al, 1
    mov cr0, eax
"""
LJMP_0008_7C80 = bytes([0xEA, 0x80, 0x7C, 0x08, 0x00])
GDT = (0).to_bytes(8, "little") + (0x00CF9A000000FFFF).to_bytes(8, "little") + (0x00CF92000000FFFF).to_bytes(8, "little")
GDTR = (23).to_bytes(2, "little") + (0x7C40).to_bytes(4, "little")
IDTR = (32 * 8 - 1).to_bytes(2, "little") + IDT.to_bytes(4, "little")

START32 = f"""
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x90000
    xor ecx, ecx
l_idt:
    mov eax, l_other
    mov word ptr [{IDT:#x} + ecx*8], ax
    mov word ptr [{IDT:#x} + ecx*8 + 2], 0x08
    mov word ptr [{IDT:#x} + ecx*8 + 4], 0x8e00
    shr eax, 16
    mov word ptr [{IDT:#x} + ecx*8 + 6], ax
    inc ecx
    cmp ecx, 32
    jne l_idt
    mov eax, l_pf
    mov word ptr [{IDT:#x} + 14*8], ax
    shr eax, 16
    mov word ptr [{IDT:#x} + 14*8 + 6], ax
    lidt [0x7c66]
"""


def tables(zero_dwords: int, entries: str, pt: int, width: int, count: int) -> str:
    """Clear the tables from 0x10000 on, write ``entries``, fill an identity page table at ``pt``
    (``count`` entries of ``width`` bytes, present and writable)."""
    return f"""
    mov edi, 0x10000
    xor eax, eax
    mov ecx, {zero_dwords}
    rep stosd
{entries}
    xor ecx, ecx
l_pt:
    mov eax, ecx
    shl eax, 12
    or eax, 3
    mov dword ptr [{pt:#x} + ecx*{width}], eax
    inc ecx
    cmp ecx, {count}
    jne l_pt
"""


# 32-bit paging: page directory at 0x10000 (PDE 0: identity page table at 0x11000, PDE 1: past RAM)
PD32 = tables(2048, "mov dword ptr [0x10000], 0x11003\nmov dword ptr [0x10004], 0x80000003", 0x11000, 4, 1024) + """
    mov eax, 0x10000
    mov cr3, eax
"""
# PAE: PDPT at 0x10000 -> PD at 0x11000 (PDE 0: identity page table at 0x12000, PDE 2: past RAM)
PDPT_PAE = tables(3072, "mov dword ptr [0x10000], 0x11001\nmov dword ptr [0x11000], 0x12003\n"
                        "mov dword ptr [0x11010], 0x80000003", 0x12000, 8, 512) + """
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, 0x10000
    mov cr3, eax
"""
PAGING_ON = """
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
"""
READ_4M = """
    mov eax, dword ptr [0x400000]
    mov bx, 0x10
    cmp eax, 0xffffffff
    jne l_report
    mov bx, 0x11
l_report:
    mov ax, bx
    mov dx, 0x501
    out dx, ax
    hlt
"""


def handlers(cr2: int) -> str:
    return f"""
l_pf:
    mov eax, cr2
    cmp eax, {cr2:#x}
    jne l_bad
    mov eax, dword ptr [esp]
    add eax, 0x20
    jmp l_out
l_bad:
    mov eax, 0x3f
    jmp l_out
l_other:
    mov eax, 0x12
l_out:
    mov dx, 0x501
    out dx, ax
    hlt
"""


# name: (32-bit code, CR2 the #PF handler expects, QEMU's end, vmm's end in both modes)
CASES = {
    "a PDE pointing past RAM": (PD32 + PAGING_ON + READ_4M, 0x400000, ("exit", 0x20), ("exit", 0x20)),
    "a PAE page directory past RAM": (PDPT_PAE + PAGING_ON + READ_4M, 0x400000, ("exit", 0x20), ("exit", 0x20)),
    # the next fetch finds no PDE: #PF, whose delivery faults (#DF), which faults again
    "CR3 past RAM": ("mov eax, 0x80000000\nmov cr3, eax\n" + PAGING_ON + READ_4M, 0, ("shutdown", 0),
                     ("shutdown", 0)),
    # PDE 1 -> the identity page table too: 0x400000 reads physical 0 (the IVT)
    "page tables in RAM": (PD32.replace("0x80000003", "0x00011003") + PAGING_ON + READ_4M, 0,
                           ("exit", 0x10), ("exit", 0x10)),
    # the page at 0x80000000 was loaded from (routed to the bus) before it serves as a page
    # table: it reads zeros there too, as QEMU reads it (it read all ones: exit 0x11)
    "a page table on a page already routed to the bus": (
        "mov eax, dword ptr [0x80000000]\n" + PD32 + PAGING_ON + READ_4M, 0x400000, ("exit", 0x20),
        ("exit", 0x20)),
}


def image(code32: str, cr2: int) -> bytes:
    sector = bytearray(512)
    stub = asm(STUB16, 16, 0x7C00) + LJMP_0008_7C80
    assert len(stub) <= 0x40
    sector[0:len(stub)] = stub
    sector[0x40:0x40 + len(GDT)] = GDT
    sector[0x60:0x66] = GDTR
    sector[0x66:0x6C] = IDTR
    body = asm(START32 + code32 + handlers(cr2), 32, 0x7C80)
    assert 0x80 + len(body) <= 510, len(body)
    sector[0x80:0x80 + len(body)] = body
    sector[510:512] = b"\x55\xaa"
    return bytes(sector) + bytes(63 * 512)


def run_vmm(img: bytes, mmu: str):
    m = PcMachine(PcConfig(mem_size=MEM, serial=NullBackend(), mmu=mmu))
    try:
        boot(m, img, "disk", name="mmu.img")
        res = m.run(1_000_000)
        return res, m.vcpu.snapshot_regs()
    finally:
        m.close()


def end_of(res) -> tuple[str, int]:
    if res.reason is StopReason.EXIT:
        return "exit", res.status
    if res.reason is StopReason.SHUTDOWN:
        return "shutdown", 0
    return res.reason.value, res.status


@pytest.mark.parametrize("mmu", ["shadow", "nested"])
@pytest.mark.parametrize("name", list(CASES))
def test_page_tables_outside_ram_end_as_under_qemu(name, mmu):
    code, cr2, _qemu, want = CASES[name]
    res, _regs = run_vmm(image(code, cr2), mmu)
    assert end_of(res) == want, res


@pytest.mark.parametrize("name", list(CASES))
def test_both_modes_agree_on_icount_exit_and_registers(name):
    code, cr2, _qemu, _want = CASES[name]
    img = image(code, cr2)
    ends = []
    for mmu in ("shadow", "nested"):
        res, regs = run_vmm(img, mmu)
        ends.append((res.reason, res.status, res.icount, regs))
    assert ends[0] == ends[1]


@pytest.mark.skipif(QEMU is None, reason="qemu-system-i386 is not installed (apt-get install qemu-system-x86)")
@pytest.mark.parametrize("name", list(CASES))
def test_qemu_ends_each_case_as_the_table_says(name):
    """The measurement behind the table: the same boot sector under QEMU."""
    code, cr2, qemu_end, _want = CASES[name]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mmu.img"
        path.write_bytes(image(code, cr2))
        p = subprocess.run([QEMU, "-accel", "tcg", "-m", "32", "-display", "none", "-serial", "null",
                            "-monitor", "none", "-no-reboot", "-device", "isa-debug-exit,iobase=0x501,iosize=2",
                            "-drive", f"format=raw,file={path}"], check=False, capture_output=True,
                           timeout=60)
    # isa-debug-exit: status (v << 1) | 1; a triple fault with -no-reboot: QEMU exits 0
    got = ("exit", p.returncode >> 1) if p.returncode & 1 else ("shutdown", 0) if p.returncode == 0 \
        else ("qemu failed", p.returncode)
    assert got == qemu_end, p.stderr.decode(errors="replace")[-500:]


# -- loads and stores to unassigned guest-physical space ------------------------------------------
# addresses nothing claims in a 32 MiB PC (vmm and QEMU): the end of RAM, the PCI hole, next to the
# I/O APIC (0xFEC00000) and past the HPET's 1 KiB (0xFED00000), just below the BIOS
UNASSIGNED = [0x0200_0000, 0x0200_0FFC, 0x1000_0000, 0x8000_0000, 0xC000_0000, 0xFEBF_F000, 0xFED0_0800,
              0xFEDF_F000, 0xFFBF_FFF0]
TABLE = 0x7DA0          # the address list, in the boot sector
PROBE = f"""
    mov esi, {TABLE:#x}
l_loop:
    mov ebx, dword ptr [esi]
    test ebx, ebx
    jz l_done
    mov eax, dword ptr [ebx]
    call l_put4
    add esi, 4
    jmp l_loop
l_put4:
    mov ecx, 4
    mov dx, 0x3f8
l_p:
    out dx, al
    shr eax, 8
    loop l_p
    ret
l_done:
    mov dword ptr [0x80000000], 0x12345678
    mov eax, dword ptr [0x80000000]
    call l_put4
    xor eax, eax
    mov al, byte ptr [0x80000003]
    call l_put4
    mov dx, 0x501
    mov ax, 0x10
    out dx, ax
    hlt
"""


def probe_image() -> bytes:
    """A boot sector that prints (COM1, raw little-endian dwords) what each UNASSIGNED address reads,
    what 0x80000000 reads after a store of 0x12345678 to it, and a byte load from 0x80000003;
    padded to 1 MiB (QEMU's q35 SeaBIOS does not boot a 32 KiB disk)."""
    img = bytearray(image(PROBE, 0))
    tab = struct.pack(f"<{len(UNASSIGNED) + 1}I", *UNASSIGNED, 0)
    at = TABLE - 0x7C00
    assert not any(img[at:at + len(tab)])
    img[at:at + len(tab)] = tab
    return bytes(img).ljust(1 << 20, b"\0")


PROBE_READS = bytes(4 * (len(UNASSIGNED) + 2))   # every load reads zeros, the store went nowhere


@pytest.mark.parametrize("mmu", ["shadow", "nested"])
def test_unassigned_space_reads_zeros_and_drops_stores(mmu):
    m = PcMachine(PcConfig(mem_size=MEM, mmu=mmu))
    try:
        boot(m, probe_image(), "disk", name="probe.img")
        res = m.run(1_000_000)
        assert end_of(res) == ("exit", 0x10), res
        assert bytes(m.serial_out) == PROBE_READS
    finally:
        m.close()


@pytest.mark.skipif(QEMU is None, reason="qemu-system-i386 is not installed (apt-get install qemu-system-x86)")
@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_qemu_reads_zeros_from_unassigned_space(machine):
    """The measurement behind the answer: the same boot sector under QEMU."""
    with tempfile.TemporaryDirectory() as d:
        path, out = Path(d) / "probe.img", Path(d) / "com1.bin"
        path.write_bytes(probe_image())
        p = subprocess.run([QEMU, "-M", machine, "-accel", "tcg", "-m", "32", "-display", "none",
                            "-serial", f"file:{out}", "-monitor", "none", "-no-reboot",
                            "-device", "isa-debug-exit,iobase=0x501,iosize=2", "-drive", f"format=raw,file={path}"],
                           check=False, capture_output=True, timeout=60)
        assert p.returncode == (0x10 << 1) | 1, p.stderr.decode(errors="replace")[-500:]
        assert out.read_bytes() == PROBE_READS
