"""MP Specification 1.4 tables (vmm/firmware/mptable.py), read back per the spec's tables 4-1 to 4-11."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm.firmware import mptable as mp
from vmm.firmware.mptable import MpConfig, PciInterrupt

SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


def parse(floating: bytes, table: bytes, table_addr: int) -> dict:
    """Check and decode both structures as an OS's MP parser does."""
    assert len(floating) == 16
    sig, phys, length, rev, csum, f1, f2 = struct.unpack_from("<4sIBBBBB", floating)
    assert (sig, phys, length, rev) == (b"_MP_", table_addr, 1, 4)
    assert sum(floating) & 0xFF == 0
    assert f1 == 0 and f2 & 0x80 == 0 and floating[12:] == bytes(4)      # table present, virtual wire
    (sig, base_len, rev, csum, oem, product, oem_ptr, oem_size, count, lapic, ext_len, ext_csum,
     reserved) = struct.unpack_from("<4sHBB8s12sIHHIHBB", table)
    assert (sig, rev, base_len) == (b"PCMP", 4, len(table))
    assert sum(table) & 0xFF == 0
    assert (oem_ptr, oem_size, ext_len, ext_csum, reserved) == (0, 0, 0, 0, 0)
    out: dict = {"oem": oem, "product": product, "lapic": lapic, "cpus": [], "buses": [], "ioapics": [],
                 "io_ints": [], "local_ints": []}
    off, order = 44, []
    for _ in range(count):
        kind = table[off]
        order.append(kind)
        size = SIZES[kind]
        e = table[off:off + size]
        if kind == 0:
            _, apic_id, ver, flags, sig, feat, res = struct.unpack("<BBBBII8s", e)
            assert res == bytes(8)
            out["cpus"].append((apic_id, ver, flags, sig, feat))
        elif kind == 1:
            out["buses"].append((e[1], e[2:8]))
        elif kind == 2:
            out["ioapics"].append(struct.unpack("<xBBBI", e))
        else:
            entry = struct.unpack("<xBHBBBB", e)
            out["io_ints" if kind == 3 else "local_ints"].append(entry)
        off += size
    assert off == len(table)
    assert order == sorted(order), "entries must come in type order (Table 4-3)"
    return out


@pytest.mark.parametrize("cpus", [1, 2, 8])
def test_checksums_and_layout(cpus):
    cfg = MpConfig(cpus=cpus, cpu_signature=0x000906EA, cpu_features=0x178BFBFF)
    (fa, floating), (ta, table) = mp.mptable(0xF5B00, cfg=cfg)
    assert (fa, ta) == (0xF5B00, 0xF5B10)
    t = parse(floating, table, ta)
    assert t["lapic"] == 0xFEE00000 and t["oem"] == b"PYVMM   " and t["product"] == b"PC" + b" " * 10
    assert t["cpus"] == [(i, 0x14, 1 | (2 if i == 0 else 0), 0x000906EA, 0x178BFBFF) for i in range(cpus)]
    assert t["buses"] == [(0, b"PCI   "), (1, b"ISA   ")]
    assert t["ioapics"] == [(0, 0x11, 1, 0xFEC00000)]
    isa = [e for e in t["io_ints"] if e[2] == 1]
    assert isa[0] == (0, 0, 1, 0, 0, 2)                       # IRQ0 -> INTIN2
    assert [e[3] for e in isa] == [0, 1, 3, 4, 6, 7, 8, 12, 13, 14, 15]   # no 2, none of 5 9 10 11
    assert all(e[4:] == (0, e[3]) for e in isa[1:])           # identity-mapped
    assert all(e[0] == 0 and e[1] == 0 for e in isa)          # INT, bus-conforming
    assert t["local_ints"] == [(3, 0, 1, 0, 0, 0), (1, 0, 1, 0, 0xFF, 1)]   # ExtINT LINT0 BSP; NMI LINT1 all


def test_pci_interrupts_follow_the_links():
    devices = (PciInterrupt(1, 1), PciInterrupt(1, 4), PciInterrupt(2, 1), PciInterrupt(3, 1),
               PciInterrupt(3, 1), PciInterrupt(4, 2))
    cfg = MpConfig(pci_devices=devices, pirq_routes=(10, 11, 5, 9))
    (_, floating), (ta, table) = mp.mptable(0x9FC00, cfg=cfg)
    pci = [e for e in parse(floating, table, ta)["io_ints"] if e[2] == 0]
    # (type, flags, bus, device << 2 | pin, ioapic, intin); PIRQ = (device + pin - 1) mod 4
    assert pci == [(0, 0x0D, 0, 1 << 2 | 0, 0, 10),   # 1 INTA -> PIRQA
                   (0, 0x0D, 0, 1 << 2 | 3, 0, 9),    # 1 INTD -> PIRQD
                   (0, 0x0D, 0, 2 << 2 | 0, 0, 11),   # 2 INTA -> PIRQB
                   (0, 0x0D, 0, 3 << 2 | 0, 0, 5),    # 3 INTA -> PIRQC (once, though listed twice)
                   (0, 0x0D, 0, 4 << 2 | 1, 0, 10)]   # 4 INTB -> PIRQA


def test_placement_rules():
    ebda = 0x9FC00
    mp.mptable(ebda, cfg=MpConfig(), areas=mp.search_areas(ebda=ebda))
    mp.mptable(0x9FC00)                                      # the last KB of 640 KiB of base memory
    mp.mptable(0xFFFF0, config_addr=0xF0000)
    for bad in (0xF5B08, 0x80000, 0xE0000, 0x100000, 0xFFFF8):
        with pytest.raises(ValueError):
            mp.mptable(bad)
    with pytest.raises(ValueError):
        mp.mptable(0xF5B00, config_addr=0xF5B08)              # overlaps the pointer
    with pytest.raises(ValueError):
        MpConfig(cpus=0)
    with pytest.raises(ValueError):
        MpConfig(pci_devices=(PciInterrupt(1, 5),))
    assert mp.search_areas(639, ebda=0x9F800) == [(0x9F800, 0x9FC00), (0x9F800, 0x9FC00), (0xF0000, 0x100000)]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(cpus=st.integers(1, 255), slot=st.integers(0, 0x3FF), devs=st.lists(
    st.tuples(st.integers(0, 31), st.integers(1, 4)), max_size=12))
def test_any_configuration_parses(cpus, slot, devs):
    cfg = MpConfig(cpus=cpus, pci_devices=tuple(PciInterrupt(d, p) for d, p in devs))
    (fa, floating), (ta, table) = mp.mptable(0xF0000 + slot * 16, config_addr=0x9F000, cfg=cfg)
    t = parse(floating, table, ta)
    assert len(t["cpus"]) == cpus
    assert len([e for e in t["io_ints"] if e[2] == 0]) == len(set(devs))
