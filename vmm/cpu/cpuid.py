"""The one CPUID table every guest sees, whatever the host.

A fixed, documented answer per leaf makes guest behaviour independent of the
host CPU and of Unicorn's model table.  The features listed are the ones the
vCPU really executes (Unicorn's Sandy Bridge model) minus those the VMM
withholds: RDRAND/RDSEED (host randomness), XSAVE/AVX (not virtualised by
the VMM's state save), the local APIC, MONITOR/MWAIT and the TSC deadline
timer (not emulated yet).  Leaf 1 ECX bit 31 tells the guest it runs under a
hypervisor; leaf 0x40000000 names it.
"""
from __future__ import annotations


def _s(text: str) -> tuple[int, ...]:
    b = text.encode().ljust(4 * ((len(text) + 3) // 4), b"\0")
    return tuple(int.from_bytes(b[i:i + 4], "little") for i in range(0, len(b), 4))


VENDOR = _s("GenuineIntel")  # ebx, edx, ecx order below
BRAND = _s("vmm deterministic virtual CPU".ljust(47) + "\0")

# leaf 1 EDX: FPU VME DE PSE TSC MSR PAE MCE CX8 - SEP MTRR PGE MCA CMOV PAT PSE36 CLFSH MMX FXSR SSE SSE2
LEAF1_EDX = (
    (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7)
    | (1 << 8) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15) | (1 << 16)
    | (1 << 17) | (1 << 19) | (1 << 23) | (1 << 24) | (1 << 25) | (1 << 26)
)
# leaf 1 ECX: SSE3 PCLMULQDQ SSSE3 CX16 SSE4.1 SSE4.2 POPCNT AES, hypervisor
LEAF1_ECX = (1 << 0) | (1 << 1) | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20) | (1 << 23) | (1 << 25) | (1 << 31)
# 0x80000001 EDX: SYSCALL NX RDTSCP LM; ECX: LAHF/SAHF
EXT1_EDX = (1 << 11) | (1 << 20) | (1 << 27) | (1 << 29)
EXT1_ECX = 1 << 0

TABLE: dict[int, tuple[int, int, int, int]] = {
    0x0: (0xD, VENDOR[0], VENDOR[2], VENDOR[1]),
    # family 6 model 42 (Sandy Bridge) stepping 7; CLFLUSH line 8*8 bytes; 1 logical CPU
    0x1: (0x000206A7, 0x0001_0800, LEAF1_ECX, LEAF1_EDX),
    0x2: (0x0000_0001, 0, 0, 0x002C_307D),
    0x4: (0, 0, 0, 0),
    0x5: (0, 0, 0, 0),
    0x6: (0, 0, 0, 0),
    0x7: (0, 0, 0, 0),
    0xB: (0, 0, 0, 0),
    0xD: (0, 0, 0, 0),
    0x4000_0000: (0x4000_0000,) + _s("vmmDetermVMM")[:3],  # type: ignore[dict-item]
    0x8000_0000: (0x8000_0008, 0, 0, 0),
    0x8000_0001: (0, 0, EXT1_ECX, EXT1_EDX),
    0x8000_0002: BRAND[0:4],  # type: ignore[dict-item]
    0x8000_0003: BRAND[4:8],  # type: ignore[dict-item]
    0x8000_0004: BRAND[8:12],  # type: ignore[dict-item]
    0x8000_0005: (0, 0, 0, 0),
    0x8000_0006: (0, 0, 0x0100_6040, 0),
    0x8000_0007: (0, 0, 0, 0x100),  # invariant TSC
    0x8000_0008: (0x0000_3028, 0, 0, 0),  # 40 physical, 48 linear address bits
}


def cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    """The fixed answer; leaves above the maximum answer like the highest basic leaf (SDM)."""
    if leaf in TABLE:
        return TABLE[leaf]
    if 0x8000_0000 <= leaf:
        return (0, 0, 0, 0)
    if 0x4000_0000 <= leaf < 0x8000_0000:
        return (0, 0, 0, 0)
    return TABLE[0xD] if leaf > 0xD else (0, 0, 0, 0)
