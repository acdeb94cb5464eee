"""The CPU each machine type offers (vmm/cpu/cpuid.py): pc-3's IA32_ARCH_CAPABILITIES.

The SDM (vol. 2A CPUID, vol. 4 table 2-2): CPUID.(EAX=7,ECX=0):EDX[29] says
IA32_ARCH_CAPABILITIES (MSR 0x10A) exists, and its bits say which flaws of
speculative execution the processor is not exposed to.  pc-3 enumerates it and
answers the MSR (vmm/cpu/native/msr.c, in front of Unicorn's RDMSR, which
answers 0 for it); pc-2, the CPU of earlier recordings, does neither.  Every
other MSR goes on reading what Unicorn keeps, on both.
"""
from __future__ import annotations

import pytest

from host.serial import NullBackend
from replay.session import build_machine
from tests.machine_helpers import EXIT0, LOAD, SHARED, flat_config
from tools.guestkit import asm
from vmm.cpu.cpuid import ARCH_CAPABILITIES

# MSRs written and read back through Unicorn's own helper (after msr.c's check)
ROUND_TRIP = {
    0xC000_0080: 0x0000_0800,            # EFER.NXE
    0xC000_0081: 0x0023_0010_0000_0000,  # STAR
    0xC000_0082: 0xFFFF_FFFF_8100_1000,  # LSTAR
    0x0000_0174: 0x10,                   # SYSENTER_CS
    0x0000_0277: 0x0007_0406_0007_0406,  # PAT
}


def probe_image() -> bytes:
    """CPUID leaf 7 EDX, then RDMSR 0x10A and each ROUND_TRIP MSR after writing it, stored
    from SHARED on: 4 bytes of EDX, then 8 bytes (EDX:EAX) per MSR."""
    code = [f"mov eax, 7\nxor ecx, ecx\ncpuid\nmov [{SHARED:#x}], edx",
            f"mov ecx, 0x10a\nrdmsr\nmov [{SHARED + 4:#x}], eax\nmov [{SHARED + 8:#x}], edx"]
    at = SHARED + 12
    for msr, value in ROUND_TRIP.items():
        code.append(f"mov ecx, {msr:#x}\nmov eax, {value & 0xFFFF_FFFF:#x}\nmov edx, {value >> 32:#x}\nwrmsr\n"
                    f"xor eax, eax\nxor edx, edx\nrdmsr\nmov [{at:#x}], eax\nmov [{at + 4:#x}], edx")
        at += 8
    return asm("\n".join(code) + "\n" + EXIT0, 32, LOAD)


def probe(platform: str) -> tuple[int, int, list[int]]:
    image = probe_image()
    cfg = flat_config(image, vcpus=1)
    cfg["platform"] = platform
    m = build_machine(cfg, image, NullBackend())
    try:
        m.run(max_instructions=10_000)
        raw = m.memory.read(SHARED, 12 + 8 * len(ROUND_TRIP))
    finally:
        m.close()
    edx7 = int.from_bytes(raw[0:4], "little")
    cap = int.from_bytes(raw[4:12], "little")
    return edx7, cap, [int.from_bytes(raw[i:i + 8], "little") for i in range(12, len(raw), 8)]


def test_pc3_enumerates_arch_capabilities_and_answers_the_msr():
    edx7, cap, msrs = probe("pc-3")
    assert edx7 & (1 << 29)
    assert cap == ARCH_CAPABILITIES
    assert cap & 1, "RDCL_NO: not exposed to Meltdown (rogue data cache load)"
    assert not cap & 0b10, "IBRS_ALL is a feature this CPU does not have, not an immunity"
    assert msrs == list(ROUND_TRIP.values())


def test_pc2_keeps_the_cpu_of_its_recordings():
    edx7, cap, msrs = probe("pc-2")
    assert edx7 == 0 and cap == 0
    assert msrs == list(ROUND_TRIP.values())


@pytest.mark.parametrize("order", [("pc-3", "pc-2"), ("pc-2", "pc-3")])
def test_the_answer_belongs_to_the_machine_not_the_process(order):
    """The replacement is installed once per process; each machine still reads its own type's value."""
    got = {p: probe(p)[1] for p in order}
    assert got == {"pc-3": ARCH_CAPABILITIES, "pc-2": 0}
