"""The CPUID table every guest sees, whatever the host.

A fixed, documented answer per leaf makes guest behaviour independent of the
host CPU and of Unicorn's model table.  The features listed are the ones the
vCPU really executes (Unicorn's Sandy Bridge model) minus those the VMM
withholds: RDRAND/RDSEED (host randomness), XSAVE/AVX (not virtualised by
the VMM's state save), MONITOR/MWAIT, and the TSC deadline timer (the
IA32_TSC_DEADLINE MSR would need WRMSR to reach the VMM, which Unicorn does
not offer).  Leaf 1 ECX bit 31 tells the guest it runs under a hypervisor;
leaf 0x40000000 names it.

Three models, by machine type (vmm/platform/pc.py): ``pc-1``, the table of the
first recordings (no local APIC); ``pc-2``, which adds the local APIC
(leaf 1 EDX bit 9) with each vCPU's initial APIC ID in leaf 1 EBX[31:24],
and the frequencies a kernel would otherwise calibrate: leaf 0x15 (TSC =
crystal x 1/1, crystal 100 MHz: the machine's tick), leaf 0x16 (base,
maximum and bus 100 MHz) and the hypervisor timing leaf 0x40000010 (TSC and
APIC bus in kHz); and ``pc-3``, which adds IA32_ARCH_CAPABILITIES (leaf 7
EDX bit 29, the MSR answered by vmm/cpu/native/msr.c) saying the CPU is not
exposed to the speculative-execution flaws the MSR enumerates.  That is the
truth for a CPU that executes nothing speculatively, and without it Linux
takes a Sandy Bridge for vulnerable to Meltdown and isolates its page tables
(a CR3 write, a full TLB flush under Unicorn, on every kernel entry and exit).
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


TSC_KHZ = 100_000          # the machine's tick (devices/clock.py TICK_HZ)
LEAF1_EDX_APIC = 1 << 9
MAX_BASIC_PC2 = 0x16
MAX_HYPERVISOR_PC2 = 0x4000_0010


LEAF7_EDX_ARCH_CAPABILITIES = 1 << 29
# IA32_ARCH_CAPABILITIES of pc-3 (SDM vol. 4, table 2-2): RDCL_NO (0: no Meltdown), SSB_NO (4),
# MDS_NO (5), IF_PSCHANGE_MC_NO (6), TAA_NO (8), SBDR_SSDP_NO (13), FBSDP_NO (14), PSDP_NO (15),
# BHI_NO (20), PBRSB_NO (24), GDS_NO (26), RFDS_NO (27), and ITS_NO (62), which hypervisors set for
# their guests (Linux's msr-index.h): every "not affected" bit, nothing else
ARCH_CAPABILITIES = sum(1 << b for b in (0, 4, 5, 6, 8, 13, 14, 15, 20, 24, 26, 27, 62))


def pc2_cpuid(vcpu_id: int, vcpus: int, arch_capabilities: bool = False):
    """The ``pc-2`` model's CPUID function for one vCPU; with ``arch_capabilities``,
    ``pc-3``'s (IA32_ARCH_CAPABILITIES enumerated)."""
    def answer(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        if leaf == 0x7 and arch_capabilities:
            return (0, 0, 0, LEAF7_EDX_ARCH_CAPABILITIES) if subleaf == 0 else (0, 0, 0, 0)
        if leaf == 0x0:
            return (MAX_BASIC_PC2,) + TABLE[0x0][1:]
        if leaf == 0x1:
            a, b, c, d = TABLE[0x1]
            # EBX: initial APIC ID (31:24); CLFLUSH size and the brand index as before
            return a, (b & 0x00FF_FFFF) | ((vcpu_id & 0xFF) << 24), c, d | LEAF1_EDX_APIC
        if leaf == 0x15:
            return (1, 1, TSC_KHZ * 1000, 0)       # TSC/crystal = 1/1, crystal 100 MHz
        if leaf == 0x16:
            mhz = TSC_KHZ // 1000
            return (mhz, mhz, mhz, 0)
        if leaf == 0x4000_0000:
            return (MAX_HYPERVISOR_PC2,) + TABLE[0x4000_0000][1:]
        if leaf == 0x4000_0010:
            return (TSC_KHZ, TSC_KHZ, 0, 0)         # TSC kHz, APIC bus kHz
        if 0xD < leaf <= MAX_BASIC_PC2:
            return (0, 0, 0, 0)
        if leaf > MAX_BASIC_PC2 and leaf < 0x4000_0000:
            return answer(MAX_BASIC_PC2, subleaf)
        return cpuid(leaf, subleaf)
    return answer
