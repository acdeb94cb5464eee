"""Fuzz every BIOS service with hostile parameters (issue 16): random
registers, and segment bases anywhere in the 4 GiB space (unreal mode: in
RAM, straddling its end, past it, at the top of 4 GiB), a stack anywhere too.
A service must return (CF/AH as its interface says, or with its buffer
missing RAM), within the time bound, never raise.

Each example enters the BIOS as the vCPU would: CS:IP at the vector's trap
slot, then ``Bios.trap``.  One machine serves every example (a service only
changes guest memory and registers; the machine stays usable)."""
from __future__ import annotations

import functools

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.harness import bounded, fuzz_settings, tally

MEM = 2 << 20


@functools.cache
def _machine():
    from devices.storage.disk import DiskImage  # noqa: F401  (the boot disk below is one)
    from host.serial import NullBackend
    from vmm.firmware.boot import boot
    from vmm.platform.pc import PcConfig, PcMachine

    m = PcMachine(PcConfig(mem_size=MEM, serial=NullBackend()))
    sector = bytearray(512 * 64)
    sector[0] = 0xF4
    sector[510:512] = b"\x55\xaa"
    boot(m, bytes(sector), "disk", name="fuzz.img")
    return m


VECTORS = (0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x1A, 0xF0, 0x08, 0x09, 0x70)
# (AH values each service switches on, so the interesting ones come up often)
FUNCS = {0x10: [0, 1, 2, 3, 5, 6, 7, 8, 9, 0x0A, 0x0E, 0x0F, 0x12, 0x13, 0x1A],
         0x13: [0, 1, 2, 3, 4, 8, 0x15, 0x41, 0x42, 0x43, 0x48],
         0x15: [0x24, 0x86, 0x88, 0xC0, 0xE8], 0x16: [0, 1, 2, 0x10, 0x11, 0x12], 0x1A: [0, 1, 2, 4]}

bases = st.one_of(st.integers(0, 0xFFFF).map(lambda s: s << 4),          # real mode
                  st.integers(MEM - 0x20000, MEM + 0x20000),              # around the end of RAM
                  st.integers(0, 0xFFFF_FFFF),                            # anywhere (unreal mode)
                  st.integers(0xFFFF_0000, 0xFFFF_FFFF))                  # the top of 4 GiB
u16 = st.integers(0, 0xFFFF)


@st.composite
def calls(draw):
    vector = draw(st.sampled_from(VECTORS))
    ah = draw(st.one_of(st.sampled_from(FUNCS.get(vector, [0])), st.integers(0, 0xFF)))
    al = draw(st.integers(0, 0xFF))
    eax = draw(st.one_of(st.just((ah << 8) | al), st.sampled_from([0xE820, 0xE801, 0x2401, 0x2402]),
                         st.integers(0, 0xFFFF_FFFF)))
    regs = {"eax": eax, "ebx": draw(st.integers(0, 0xFFFF_FFFF)), "ecx": draw(st.integers(0, 0xFFFF_FFFF)),
            "edx": draw(st.one_of(st.sampled_from([0x80, 0x00, 0x534D4150]), st.integers(0, 0xFFFF_FFFF))),
            "esi": draw(u16), "edi": draw(u16), "ebp": draw(u16), "esp": draw(u16)}
    segs = {name: draw(bases) for name in ("es", "ds", "ss")}
    return vector, regs, segs


def check_bios_call(vector: int, regs: dict, segs: dict) -> str:
    from vmm.cpu.vcpu import CS, DS, ES, SS
    from vmm.firmware.bios import ROM_BASE, ROM_SEG, TRAP_OFF

    m = _machine()
    cpu = m.vcpu
    for i, name in enumerate(("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")):
        cpu.set_u64(8 * i, regs[name])
    for idx, name in ((ES, "es"), (DS, "ds"), (SS, "ss")):
        cpu.load_seg(idx, 0, segs[name], 0xFFFF_FFFF, cpu.seg(idx).flags)
    cpu.load_seg(CS, ROM_SEG, ROM_BASE, 0xFFFF, cpu.seg(CS).flags)
    cpu.rip = TRAP_OFF + vector
    with bounded():
        m.firmware.trap(m, None)
    return "returned"


@fuzz_settings(300)
@given(call=calls())
def test_bios_services_with_hostile_parameters(call):
    tally("bios_services", check_bios_call(*call))
