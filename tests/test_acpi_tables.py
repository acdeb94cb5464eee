"""ACPI tables (vmm/firmware/acpi.py) and the AML encoder (vmm/firmware/aml.py).

Every table's length and checksum; the RSDP's two checksums; the fields of
the FADT, MADT, HPET and FACS at the offsets ACPI 6.4 chapter 5 gives; the
table-loader script run the way SeaBIOS's romfile_loader runs it (an
independent reading of the 128-byte entries) against ``place``; the DSDT
read back by a small AML parser written here, its key objects checked, and
the PCI link methods evaluated against a fake PIIX3 route register file;
and, when Debian's acpica-tools is installed, ``iasl -d`` on every table.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm.firmware import acpi, aml
from vmm.firmware.acpi import AcpiConfig, AcpiTables

IASL = shutil.which("iasl")
TABLES_AT = 0x07FE_0000
RSDP_AT = 0x000F_5A00


def sum8(data: bytes) -> int:
    return sum(data) & 0xFF


def placed(cfg: AcpiConfig | None = None) -> tuple[AcpiTables, bytes, bytes]:
    t = AcpiTables(cfg)
    (ta, tables), (ra, rsdp) = t.place(TABLES_AT, RSDP_AT)
    assert (ta, ra) == (TABLES_AT, RSDP_AT)
    return t, tables, rsdp


def table_at(tables: bytes, addr: int) -> bytes:
    off = addr - TABLES_AT
    (length,) = struct.unpack_from("<I", tables, off + 4)
    return tables[off:off + length]


def all_tables(tables: bytes, rsdp: bytes) -> dict[str, tuple[int, bytes]]:
    """Walk from the RSDP as an OS does: XSDT, its entries, the FADT's FACS and DSDT."""
    (xsdt_addr,) = struct.unpack_from("<Q", rsdp, 24)
    xsdt = table_at(tables, xsdt_addr)
    found = {"XSDT": (xsdt_addr, xsdt)}
    (rsdt_addr,) = struct.unpack_from("<I", rsdp, 16)
    found["RSDT"] = (rsdt_addr, table_at(tables, rsdt_addr))
    for i in range((len(xsdt) - 36) // 8):
        (addr,) = struct.unpack_from("<Q", xsdt, 36 + 8 * i)
        t = table_at(tables, addr)
        found[t[:4].decode()] = (addr, t)
    fadt = found["FACP"][1]
    (facs_addr, dsdt_addr) = struct.unpack_from("<II", fadt, 36)
    found["DSDT"] = (dsdt_addr, table_at(tables, dsdt_addr))
    found["FACS"] = (facs_addr, tables[facs_addr - TABLES_AT:facs_addr - TABLES_AT + 64])
    return found


# -- every table: length, checksum, header ---------------------------------------------------

@pytest.mark.parametrize("cpus", [1, 2, 4, 9, 255])
def test_every_table_has_its_length_and_checksum(cpus):
    t, tables, rsdp = placed(AcpiConfig(cpus=cpus))
    found = all_tables(tables, rsdp)
    assert sorted(found) == ["APIC", "DSDT", "FACP", "FACS", "HPET", "RSDT", "XSDT"]
    for sig, (addr, data) in found.items():
        assert data[:4] == sig.encode()
        (length,) = struct.unpack_from("<I", data, 4)
        assert length == len(data)
        if sig == "FACS":
            assert length == 64 and addr % 64 == 0      # no checksum; 64-byte aligned (5.2.10)
            continue
        assert sum8(data) == 0, sig
        assert data[10:16] == b"PYVMM " and data[16:24] == b"PYVM" + sig.encode()[:4]
        assert data[28:32] == b"PYVM"
    assert {s: len(d) for s, (_, d) in found.items() if s in ("FACP", "HPET")} == {"FACP": 276, "HPET": 56}
    assert found["FACP"][1][8] == 6 and found["APIC"][1][8] == 4 and found["DSDT"][1][8] == 2
    # the unplaced blob is self-consistent too (offsets in place of addresses)
    for sig in ("DSDT", "FACP", "APIC", "HPET", "RSDT", "XSDT"):
        assert sum8(t.table(sig)) == 0


def test_rsdp():
    _, tables, rsdp = placed()
    assert len(rsdp) == 36 and rsdp[:8] == b"RSD PTR "
    assert sum8(rsdp[:20]) == 0 and sum8(rsdp) == 0
    assert rsdp[15] == 2 and struct.unpack_from("<I", rsdp, 20) == (36,)
    assert rsdp[9:15] == b"PYVMM " and rsdp[33:36] == bytes(3)
    found = all_tables(tables, rsdp)
    rsdt, xsdt = found["RSDT"][1], found["XSDT"][1]
    r_entries = struct.unpack_from(f"<{(len(rsdt) - 36) // 4}I", rsdt, 36)
    x_entries = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert r_entries == x_entries and len(r_entries) == 3


def test_fadt_fields():
    _, tables, rsdp = placed(AcpiConfig(cpus=2))
    found = all_tables(tables, rsdp)
    f = found["FACP"][1]
    facs, dsdt = struct.unpack_from("<II", f, 36)
    assert (facs, dsdt) == (found["FACS"][0], found["DSDT"][0])
    assert struct.unpack_from("<QQ", f, 132) == (0, dsdt)             # X_FIRMWARE_CTRL 0, X_DSDT
    sci, smi, enable, disable = struct.unpack_from("<HIBB", f, 46)
    assert (sci, smi, enable, disable) == (9, 0xB2, 0xF1, 0xF0)
    blocks = struct.unpack_from("<8I", f, 56)
    assert blocks == (0x600, 0, 0x604, 0, 0, 0x608, 0xAFE0, 0)
    assert tuple(f[88:93]) == (4, 2, 0, 4, 4)
    assert struct.unpack_from("<HH", f, 96) == (0xFFF, 0xFFF)           # no C2, no C3
    assert f[108] == 0x32                                                # RTC century
    (boot_arch,) = struct.unpack_from("<H", f, 109)
    assert boot_arch & acpi.BOOT_8042 and boot_arch & acpi.BOOT_LEGACY_DEVICES
    (flags,) = struct.unpack_from("<I", f, 112)
    for bit in (acpi.F_WBINVD, acpi.F_PROC_C1, acpi.F_SLP_BUTTON, acpi.F_RESET_REG_SUP, acpi.F_RTC_S4):
        assert flags & bit
    assert not flags & (acpi.F_PWR_BUTTON | acpi.F_TMR_VAL_EXT | acpi.F_FORCE_APIC_CLUSTER_MODEL)
    assert struct.unpack_from("<BBBBQB", f, 116) == (1, 8, 0, 0, 0xCF9, 6)   # reset register, value
    gas = {name: struct.unpack_from("<BBBBQ", f, off) for name, off in
           [("pm1a_evt", 148), ("pm1b_evt", 160), ("pm1a_cnt", 172), ("pm_tmr", 208), ("gpe0", 220)]}
    assert gas["pm1a_evt"] == (1, 32, 0, 0, 0x600)
    assert gas["pm1b_evt"] == (0, 0, 0, 0, 0)
    assert gas["pm1a_cnt"] == (1, 16, 0, 0, 0x604)
    assert gas["pm_tmr"] == (1, 32, 0, 0, 0x608)
    assert gas["gpe0"] == (1, 32, 0, 0, 0xAFE0)
    (flags9,) = struct.unpack_from("<I", all_tables(*placed(AcpiConfig(cpus=9))[1:])["FACP"][1], 112)
    assert flags9 & acpi.F_FORCE_APIC_CLUSTER_MODEL


def test_pm_constants_are_parameters():
    cfg = AcpiConfig(pm1a_evt_blk=0xB000, pm1a_cnt_blk=0xB004, pm_tmr_blk=0xB008, gpe0_blk=0xAFE0,
                     sci_irq=10, s5_slp_typ=7, power_button=False, pm_timer_32bit=True, reset_port=0x64,
                     reset_value=0xFE)
    _, tables, rsdp = placed(cfg)
    f = all_tables(tables, rsdp)["FACP"][1]
    assert struct.unpack_from("<8I", f, 56)[:6] == (0xB000, 0, 0xB004, 0, 0, 0xB008)
    assert struct.unpack_from("<H", f, 46) == (10,)
    (flags,) = struct.unpack_from("<I", f, 112)
    assert flags & acpi.F_PWR_BUTTON and flags & acpi.F_TMR_VAL_EXT
    assert struct.unpack_from("<BBBBQB", f, 116) == (1, 8, 0, 0, 0x64, 0xFE)
    ns = parse_dsdt(AcpiTables(cfg).table("DSDT"))
    assert ns.value("\\_S5_") == [7, 7, 0, 0]
    madt = parse_madt(AcpiTables(cfg).table("APIC"))
    assert (2, 0, 10, 10, 0xD) in madt["overrides"]


def parse_madt(t: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {"lapic": struct.unpack_from("<II", t, 36), "cpus": [], "ioapics": [],
                           "overrides": [], "nmis": []}
    off = 44
    while off < len(t):
        kind, length = t[off], t[off + 1]
        assert length >= 2 and off + length <= len(t)
        if kind == 0:
            assert length == 8
            out["cpus"].append(struct.unpack_from("<BBI", t, off + 2))
        elif kind == 1:
            assert length == 12
            out["ioapics"].append(struct.unpack_from("<BBII", t, off + 2))
        elif kind == 2:
            assert length == 10
            out["overrides"].append((kind, *struct.unpack_from("<BBIH", t, off + 2)))
        elif kind == 4:
            assert length == 6
            out["nmis"].append(struct.unpack_from("<BHB", t, off + 2))
        else:
            raise AssertionError(f"unexpected MADT entry {kind}")
        off += length
    assert off == len(t)
    return out


@pytest.mark.parametrize("cpus", [1, 3, 16])
def test_madt_entries(cpus):
    m = parse_madt(AcpiTables(AcpiConfig(cpus=cpus)).table("APIC"))
    assert m["lapic"] == (0xFEE00000, 1)                                   # PCAT_COMPAT
    assert m["cpus"] == [(i, i, 1) for i in range(cpus)]
    assert m["ioapics"] == [(0, 0, 0xFEC00000, 0)]
    assert m["overrides"] == [(2, 0, 0, 2, 0), (2, 0, 5, 5, 0xD), (2, 0, 9, 9, 0xD), (2, 0, 10, 10, 0xD),
                              (2, 0, 11, 11, 0xD)]
    assert m["nmis"] == [(0xFF, 0, 1)]


def test_hpet_and_facs():
    t = AcpiTables(AcpiConfig(hpet_block_id=0x8086_A701))
    h = t.table("HPET")
    assert struct.unpack_from("<I", h, 36) == (0x8086A701,)
    assert struct.unpack_from("<BBBBQ", h, 40) == (0, 0, 0, 0, 0xFED00000)
    assert h[52] == 0 and struct.unpack_from("<HB", h, 53) == (0, 0)
    facs = t.fw_cfg_files()[acpi.TABLES_FILE][:64]
    assert facs[:4] == b"FACS" and struct.unpack_from("<I", facs, 4) == (64,) and facs[32] == 2
    assert "HPET" not in AcpiTables(AcpiConfig(hpet=False)).offsets


def test_extra_tables_are_listed():
    extra = bytearray(b"SSDT" + bytes(32) + b"\x10\x05\\\x00")
    struct.pack_into("<I", extra, 4, len(extra))
    _, tables, rsdp = placed(AcpiConfig(extra_tables=(bytes(extra),)))
    found = all_tables(tables, rsdp)
    assert "SSDT" in found and sum8(found["SSDT"][1]) == 0


def test_place_refuses_bad_addresses():
    t = AcpiTables()
    for rsdp in (0xF5A08, 0xDFFF0, 0x100000, 0xFFFF0):
        with pytest.raises(ValueError):
            t.place(TABLES_AT, rsdp)
    for at, rsdp in ((TABLES_AT + 8, RSDP_AT), (0xFFFF_FC00, RSDP_AT), (0xE0000, 0xE0400)):
        with pytest.raises(ValueError):
            t.place(at, rsdp)                          # misaligned, past 4 GiB, overlapping
    t.place(0xE0040, 0xE0000)        # both in the BIOS area, side by side


def test_config_validation():
    for bad in ({"cpus": 0}, {"cpus": 256}, {"oem_id": "TOOLONG"}, {"pci_hole": (0, 0xFEBFFFFF)},
                {"link_irqs": (16,)}):
        with pytest.raises(ValueError):
            AcpiConfig(**bad)


# -- the table loader, run as SeaBIOS runs it -------------------------------------------------

def run_loader(files: dict[str, bytes], bases: dict[str, int]) -> dict[str, bytes]:
    """SeaBIOS's romfile_loader_execute, read from the 128-byte entries themselves."""
    script = files[acpi.LOADER_FILE]
    assert len(script) % 128 == 0
    mem: dict[str, bytearray] = {}
    for off in range(0, len(script), 128):
        e = script[off:off + 128]
        (cmd,) = struct.unpack_from("<I", e, 0)
        if cmd == 1:
            name, align, zone = struct.unpack_from("<56sIB", e, 4)
            name = name.rstrip(b"\0").decode()
            assert align & (align - 1) == 0 and zone in (1, 2)
            assert bases[name] % align == 0
            assert (zone == 2) == (name == acpi.RSDP_FILE)          # the RSDP in the F segment
            mem[name] = bytearray(files[name])
        elif cmd == 2:
            dest, src, offset, size = struct.unpack_from("<56s56sIB", e, 4)
            dest, src = dest.rstrip(b"\0").decode(), src.rstrip(b"\0").decode()
            assert size in (1, 2, 4, 8) and offset + size <= len(mem[dest])
            value = int.from_bytes(mem[dest][offset:offset + size], "little") + bases[src]
            mem[dest][offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        elif cmd == 3:
            name, offset, start, length = struct.unpack_from("<56sIII", e, 4)
            blob = mem[name.rstrip(b"\0").decode()]
            assert offset < len(blob) and start + length <= len(blob)
            blob[offset] = (blob[offset] - sum(blob[start:start + length])) & 0xFF
        else:
            raise AssertionError(f"unknown loader command {cmd}")
    return {n: bytes(b) for n, b in mem.items()}


@pytest.mark.parametrize("cpus", [1, 4])
def test_table_loader_installs_the_same_tables_as_place(cpus):
    t = AcpiTables(AcpiConfig(cpus=cpus))
    files = t.fw_cfg_files()
    assert sorted(files) == sorted([acpi.LOADER_FILE, acpi.RSDP_FILE, acpi.TABLES_FILE])
    script = files[acpi.LOADER_FILE]
    commands = [struct.unpack_from("<I", script, o)[0] for o in range(0, len(script), 128)]
    assert commands[0] == 1 and commands.count(1) == 2 and commands[-1] == 3
    # pointers = FADT's 3, RSDT's 3, XSDT's 3, RSDP's 2; checksums = 6 tables + RSDP's 2
    assert commands.count(2) == 11 and commands.count(3) == 8
    installed = run_loader(files, {acpi.TABLES_FILE: TABLES_AT, acpi.RSDP_FILE: RSDP_AT})
    assert [(TABLES_AT, installed[acpi.TABLES_FILE]), (RSDP_AT, installed[acpi.RSDP_FILE])] \
        == t.place(TABLES_AT, RSDP_AT)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(tables_page=st.integers(0x100, 0xFFF00), rsdp_slot=st.integers(0, 0x1FFD))
def test_place_links_pointers_and_checksums_anywhere(tables_page, rsdp_slot):
    t = AcpiTables(AcpiConfig(cpus=2))
    tables_at, rsdp_at = tables_page * 0x1000, 0xE0000 + rsdp_slot * 16
    (_, tables), (_, rsdp) = t.place(tables_at, rsdp_at)
    assert sum8(rsdp[:20]) == 0 and sum8(rsdp) == 0
    (xsdt_at,) = struct.unpack_from("<Q", rsdp, 24)
    assert xsdt_at - tables_at == t.offsets["XSDT"]
    for sig, off in t.offsets.items():
        if sig != "FACS":
            (length,) = struct.unpack_from("<I", tables, off + 4)
            assert sum8(tables[off:off + length]) == 0
    assert run_loader(t.fw_cfg_files(), {acpi.TABLES_FILE: tables_at, acpi.RSDP_FILE: rsdp_at}) \
        == {acpi.TABLES_FILE: tables, acpi.RSDP_FILE: rsdp}


# -- iasl (acpica-tools) ------------------------------------------------------------------------

@pytest.mark.skipif(IASL is None, reason="iasl is not installed (apt-get install acpica-tools)")
def test_iasl_disassembles_every_table(tmp_path):
    t = AcpiTables(AcpiConfig(cpus=2, pci_hole64=(0x1_0000_0000, 0x1F_FFFF_FFFF)))
    _, tables, rsdp = placed(AcpiConfig(cpus=2, pci_hole64=(0x1_0000_0000, 0x1F_FFFF_FFFF)))
    for sig, (_, data) in all_tables(tables, rsdp).items():
        path = tmp_path / f"{sig.lower()}.dat"
        path.write_bytes(data)
        proc = subprocess.run([IASL, "-d", str(path)], capture_output=True, text=True, timeout=60,
                              check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        assert "Error" not in out and "Warning" not in out and "Invalid" not in out, out
        text = (tmp_path / f"{sig.lower()}.dsl").read_text()
        assert f'"{sig}"' in text or f"[{sig}" in text or sig in text
    dsl = (tmp_path / "dsdt.dsl").read_text()
    for needle in ('Name (_S5, Package (0x04)', 'Device (PCI0)', 'EisaId ("PNP0A03")', 'Device (LNKD)',
                   'OperationRegion (P40C, PCI_Config, 0x60, 0x04)', 'EisaId ("PNP0B00")',
                   'EisaId ("PNP0303")', 'EisaId ("PNP0501")', 'EisaId ("PNP0103")', 'QWordMemory',
                   'Memory32Fixed (ReadOnly,', 'IQCR (\\_SB.PCI0.ISA.PRQ3)'):
        assert needle in dsl, needle
    # and it compiles back without errors
    proc = subprocess.run([IASL, str(tmp_path / "dsdt.dsl")], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0 and " 0 Errors" in proc.stdout, proc.stdout
    del t


# -- AML read back ----------------------------------------------------------------------------

class Reader:
    """A reader of the AML this project writes: enough of ACPI 6.4 section 20 to walk it."""

    CALL_ARGS = {"IQST": 1, "IQCR": 1}

    def __init__(self, data: bytes) -> None:
        self.d = data

    def pkglen(self, i: int) -> tuple[int, int]:
        lead = self.d[i]
        extra = lead >> 6
        if extra == 0:
            return lead & 0x3F, i + 1
        value = lead & 0x0F
        for k in range(extra):
            value |= self.d[i + 1 + k] << (4 + 8 * k)
        return value, i + 1 + extra

    def namestring(self, i: int) -> tuple[str, int]:
        prefix = ""
        while self.d[i] in (0x5C, 0x5E):
            prefix += chr(self.d[i])
            i += 1
        b = self.d[i]
        if b == 0:
            return prefix, i + 1
        if b == 0x2E:
            n, i = 2, i + 1
        elif b == 0x2F:
            n, i = self.d[i + 1], i + 2
        else:
            n = 1
        segs = [self.d[i + 4 * k:i + 4 * k + 4].decode() for k in range(n)]
        return prefix + ".".join(segs), i + 4 * n

    def is_name_start(self, b: int) -> bool:
        return b in (0x5C, 0x5E, 0x2E, 0x2F) or 0x41 <= b <= 0x5A or b == 0x5F

    def term(self, i: int) -> tuple[Any, int]:
        d = self.d
        op = d[i]
        if op == 0x00:
            return ("int", 0), i + 1
        if op == 0x01:
            return ("int", 1), i + 1
        if op in (0x0A, 0x0B, 0x0C, 0x0E):
            n = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}[op]
            return ("int", int.from_bytes(d[i + 1:i + 1 + n], "little"), n), i + 1 + n
        if op == 0x0D:
            end = d.index(0, i + 1)
            return ("str", d[i + 1:end].decode()), end + 1
        if op == 0x11:
            ln, j = self.pkglen(i + 1)
            size, k = self.term(j)
            return ("buf", bytes(d[k:i + 1 + ln])), i + 1 + ln
        if op == 0x12:
            ln, j = self.pkglen(i + 1)
            count, j = d[j], j + 1
            items = self.terms(j, i + 1 + ln)
            assert len(items) == count
            return ("pkg", items), i + 1 + ln
        if op in (0x10, 0x14, 0xA0, 0xA1):
            ln, j = self.pkglen(i + 1)
            end = i + 1 + ln
            if op == 0xA0:
                pred, j = self.term(j)
                return ("if", pred, self.terms(j, end)), end
            if op == 0xA1:
                return ("else", self.terms(j, end)), end
            path, j = self.namestring(j)
            if op == 0x10:
                return ("scope", path, self.terms(j, end)), end
            flags = d[j]
            return ("method", path, flags, self.terms(j + 1, end)), end
        if op == 0x08:
            path, j = self.namestring(i + 1)
            value, j = self.term(j)
            return ("name", path, value), j
        if op == 0x5B:
            ext = d[i + 1]
            if ext == 0x82:
                ln, j = self.pkglen(i + 2)
                end = i + 2 + ln
                path, j = self.namestring(j)
                return ("device", path, self.terms(j, end)), end
            if ext == 0x80:
                path, j = self.namestring(i + 2)
                space = d[j]
                off, j = self.term(j + 1)
                length, j = self.term(j)
                return ("region", path, space, off[1], length[1]), j
            if ext == 0x81:
                ln, j = self.pkglen(i + 2)
                end = i + 2 + ln
                region, j = self.namestring(j)
                flags, j = d[j], j + 1
                fields = []
                while j < end:
                    if d[j] == 0:
                        bits, j = self.pkglen(j + 1)
                        fields.append((None, bits))
                    else:
                        fname = d[j:j + 4].decode()
                        bits, j = self.pkglen(j + 4)
                        fields.append((fname, bits))
                return ("field", region, flags, fields), end
            raise AssertionError(f"ext op {ext:#x}")
        if 0x60 <= op <= 0x67:
            return ("local", op - 0x60), i + 1
        if 0x68 <= op <= 0x6E:
            return ("arg", op - 0x68), i + 1
        if op == 0xA4:
            v, j = self.term(i + 1)
            return ("return", v), j
        if op == 0x70:
            src, j = self.term(i + 1)
            dst, j = self.target(j)
            return ("store", src, dst), j
        if op in (0x7B, 0x7D):
            a, j = self.term(i + 1)
            b, j = self.term(j)
            t, j = self.target(j)
            return ({0x7B: "and", 0x7D: "or"}[op], a, b, t), j
        if op in (0x93, 0x94, 0x95):
            a, j = self.term(i + 1)
            b, j = self.term(j)
            return ({0x93: "lequal", 0x94: "lgreater", 0x95: "lless"}[op], a, b), j
        if op == 0x8A:
            src, j = self.term(i + 1)
            idx, j = self.term(j)
            path, j = self.namestring(j)
            return ("dwordfield", src, idx, path), j
        if self.is_name_start(op):
            path, j = self.namestring(i)
            nargs = self.CALL_ARGS.get(path.split(".")[-1].lstrip("\\^"), 0)
            if nargs:
                args = []
                for _ in range(nargs):
                    a, j = self.term(j)
                    args.append(a)
                return ("call", path, args), j
            return ("ref", path), j
        raise AssertionError(f"opcode {op:#x} at {i}")

    def target(self, i: int) -> tuple[Any, int]:
        if self.d[i] == 0:
            return None, i + 1
        return self.term(i)

    def terms(self, i: int, end: int) -> list[Any]:
        out = []
        while i < end:
            t, i = self.term(i)
            out.append(t)
        assert i == end, "a term ran past its package"
        return out


def join(scope: str, path: str) -> str:
    if path.startswith("\\"):
        return path
    base = scope
    while path.startswith("^"):
        base, path = base.rsplit(".", 1)[0] if "." in base else "\\", path[1:]
    if base in ("\\", ""):
        return "\\" + path
    return base + "." + path


@dataclass
class Namespace:
    objects: dict[str, Any] = field(default_factory=dict)

    def add(self, scope: str, terms: list[Any]) -> None:
        for t in terms:
            kind = t[0]
            if kind == "scope":
                self.add(join(scope, t[1]), t[2])
            elif kind == "device":
                path = join(scope, t[1])
                assert path not in self.objects, f"{path} defined twice"
                self.objects[path] = ("device",)
                self.add(path, t[2])
            elif kind in ("name", "method", "region"):
                path = join(scope, t[1])
                assert path not in self.objects, f"{path} defined twice"
                self.objects[path] = t
            elif kind == "field":
                for fname, bits in t[3]:
                    if fname:
                        self.objects[join(scope, fname)] = ("fieldunit", join(scope, t[1]), bits)
            else:
                raise AssertionError(f"{kind} at the top level of {scope}")

    def value(self, path: str) -> Any:
        obj = self.objects[path]
        assert obj[0] == "name", path
        return plain(obj[2])

    def children(self, path: str) -> list[str]:
        return sorted(p for p in self.objects if p.startswith(path + ".") and "." not in p[len(path) + 1:])


def plain(v: Any) -> Any:
    if v[0] == "int":
        return v[1]
    if v[0] == "str":
        return v[1]
    if v[0] == "buf":
        return v[1]
    if v[0] == "pkg":
        return [plain(x) for x in v[1]]
    if v[0] == "ref":
        return ("ref", v[1])
    raise AssertionError(v)


def parse_dsdt(table: bytes) -> Namespace:
    assert table[:4] == b"DSDT"
    r = Reader(table[36:])
    ns = Namespace()
    ns.add("\\", r.terms(0, len(table) - 36))
    return ns


def resources(buf: bytes) -> list[tuple]:
    """Decode a resource template into (kind, fields...) tuples; checks the end tag."""
    out = []
    i = 0
    while True:
        tag = buf[i]
        if tag & 0x80:
            (length,) = struct.unpack_from("<H", buf, i + 1)
            body = buf[i + 3:i + 3 + length]
            kind = tag & 0x7F
            if kind == 0x06:
                out.append(("mem32fixed", *struct.unpack("<BII", body)))
            elif kind == 0x09:
                flags, count = body[0], body[1]
                out.append(("interrupt", flags, list(struct.unpack_from(f"<{count}I", body, 2))))
            elif kind in (0x07, 0x08, 0x0A):
                fmt = {0x07: "I", 0x08: "H", 0x0A: "Q"}[kind]
                name = {0x07: "dword", 0x08: "word", 0x0A: "qword"}[kind]
                out.append((name, *struct.unpack("<BBB" + fmt * 5, body)))
            else:
                raise AssertionError(f"large resource {kind:#x}")
            i += 3 + length
        else:
            kind, length = tag >> 3, tag & 7
            body = buf[i + 1:i + 1 + length]
            if kind == 0x0F:
                assert length == 1 and i + 2 == len(buf)
                return out
            if kind == 0x08:
                out.append(("io", *struct.unpack("<BHHBB", body)))
            elif kind == 0x04:
                (mask,) = struct.unpack_from("<H", body)
                out.append(("irq", [n for n in range(16) if mask >> n & 1]))
            else:
                raise AssertionError(f"small resource {kind:#x}")
            i += 1 + length


def eisa(text: str) -> int:
    return int.from_bytes(aml.eisa_id(text)[1:], "little")


def test_dsdt_key_objects():
    ns = parse_dsdt(AcpiTables(AcpiConfig(cpus=3)).table("DSDT"))
    assert ns.value("\\_S5_") == [0, 0, 0, 0]
    pci = "\\_SB_.PCI0"
    assert ns.value(pci + "._HID") == eisa("PNP0A03")
    assert (ns.value(pci + "._ADR"), ns.value(pci + "._UID"), ns.value(pci + "._BBN")) == (0, 0, 0)
    crs = resources(ns.value(pci + "._CRS"))
    assert crs == [
        ("word", 2, 0x0C, 0, 0, 0, 0xFF, 0, 0x100),
        ("io", 1, 0xCF8, 0xCF8, 1, 8),
        ("word", 1, 0x0C, 3, 0, 0, 0xCF7, 0, 0xCF8),
        ("word", 1, 0x0C, 3, 0, 0xD00, 0xFFFF, 0, 0xF300),
        ("dword", 0, 0x0C, 3, 0, 0xA0000, 0xBFFFF, 0, 0x20000),
        ("dword", 0, 0x0C, 1, 0, 0xE0000000, 0xFEBFFFFF, 0, 0x1EC00000),
    ]
    prt = ns.value(pci + "._PRT")
    assert len(prt) == 128
    for slot in range(32):
        for pin in range(4):
            addr, p, link, src = prt[slot * 4 + pin]
            assert (addr, p, src) == (slot << 16 | 0xFFFF, pin, 0)
            want = "LNKS" if (slot, pin) == (1, 0) else "LNK" + "DABC"[(slot + pin) & 3]
            assert link == ("ref", want)
    isa = pci + ".ISA_"
    assert ns.value(isa + "._ADR") == 0x10000
    assert ns.objects[isa + ".P40C"][2:] == (aml.PCI_CONFIG, 0x60, 4)
    for i in range(4):
        assert ns.objects[f"{isa}.PRQ{i}"] == ("fieldunit", isa + ".P40C", 8)
    hids = {ns.value(d + "._HID"): d for d in ns.children(isa) if d + "._HID" in ns.objects}
    assert {eisa("PNP0B00"), eisa("PNP0303"), eisa("PNP0F13"), eisa("PNP0501"), eisa("PNP0103")} == set(hids)
    assert resources(ns.value(hids[eisa("PNP0B00")] + "._CRS")) == [("io", 1, 0x70, 0x70, 1, 8), ("irq", [8])]
    assert resources(ns.value(hids[eisa("PNP0303")] + "._CRS")) == [
        ("io", 1, 0x60, 0x60, 1, 1), ("io", 1, 0x64, 0x64, 1, 1), ("irq", [1])]
    assert resources(ns.value(hids[eisa("PNP0501")] + "._CRS")) == [("io", 1, 0x3F8, 0x3F8, 1, 8),
                                                                   ("irq", [4])]
    assert resources(ns.value(hids[eisa("PNP0103")] + "._CRS")) == [("mem32fixed", 0, 0xFED00000, 0x400)]
    assert resources(ns.value(pci + ".FWCF._CRS")) == [("io", 1, 0x510, 0x510, 1, 12)]
    assert ns.value(pci + ".FWCF._HID") == "QEMU0002"
    for i, name in enumerate(("LNKA", "LNKB", "LNKC", "LNKD")):
        link = "\\_SB_." + name
        assert ns.value(link + "._HID") == eisa("PNP0C0F") and ns.value(link + "._UID") == i
        assert resources(ns.value(link + "._PRS")) == [("interrupt", 0x09, [5, 10, 11])]   # consumer, shared
        for m in ("_STA", "_DIS", "_CRS", "_SRS"):
            assert ns.objects[f"{link}.{m}"][0] == "method"
    assert resources(ns.value("\\_SB_.LNKS._PRS")) == [("interrupt", 0x09, [9])]
    assert [ns.value(f"\\_SB_.C00{i}._UID") for i in range(3)] == [0, 1, 2]
    assert ns.value("\\_SB_.C000._HID") == "ACPI0007"


def test_dsdt_options():
    ns = parse_dsdt(AcpiTables(AcpiConfig(pci_hole=(0x8000000, 0xFEBFFFFF),
                                          pci_hole64=(1 << 32, (1 << 36) - 1), fw_cfg_port=None,
                                          hpet=False, ps2_mouse=False,
                                          serial_ports=((0x3F8, 4), (0x2F8, 3)))).table("DSDT"))
    crs = resources(ns.value("\\_SB_.PCI0._CRS"))
    assert crs[-2][5:7] == (0x8000000, 0xFEBFFFFF)
    assert crs[-1] == ("qword", 0, 0x0C, 3, 0, 1 << 32, (1 << 36) - 1, 0, (1 << 36) - (1 << 32))
    assert "\\_SB_.PCI0.FWCF" not in ns.objects
    assert "\\_SB_.PCI0.ISA_.HPET" not in ns.objects and "\\_SB_.PCI0.ISA_.MOU_" not in ns.objects
    assert resources(ns.value("\\_SB_.PCI0.ISA_.COM2._CRS")) == [("io", 1, 0x2F8, 0x2F8, 1, 8), ("irq", [3])]
    assert ns.value("\\_SB_.PCI0.ISA_.COM2._UID") == 2


# -- the link methods, evaluated ------------------------------------------------------------------

class Interp:
    """Evaluates the subset of AML the link devices use, with PRQ0-3 in a dict."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.regs = {f"\\_SB_.PCI0.ISA_.PRQ{i}": 0x80 for i in range(4)}

    def call(self, path: str, *args: Any) -> Any:
        _, _, flags, body = self.ns.objects[path]
        assert flags & 7 == len(args)
        env = {"args": list(args), "locals": {}, "scope": path}
        kind, value = self.block(body, env)
        return value

    def block(self, terms: list[Any], env: dict) -> tuple[str, Any]:
        i = 0
        while i < len(terms):
            t = terms[i]
            if t[0] == "return":
                return "return", self.eval(t[1], env)
            if t[0] == "if":
                taken = self.eval(t[1], env) != 0
                has_else = i + 1 < len(terms) and terms[i + 1][0] == "else"
                if taken:
                    r = self.block(t[2], env)
                elif has_else:
                    r = self.block(terms[i + 1][1], env)
                else:
                    r = ("", None)
                if r[0] == "return":
                    return r
                i += 2 if has_else else 1
                continue
            self.eval(t, env)
            i += 1
        return "", None

    def lookup(self, path: str, env: dict) -> str:
        if path.startswith("\\"):
            return path
        if path in env["locals"]:
            return path
        scope = env["scope"]
        while True:
            candidate = join(scope, path)
            if candidate in self.ns.objects:
                return candidate
            if scope == "\\":
                raise KeyError(path)
            scope = scope.rsplit(".", 1)[0] if "." in scope else "\\"

    def read(self, ref: Any, env: dict) -> Any:
        path = ref[1]
        if path in env["locals"]:
            return env["locals"][path]
        full = self.lookup(path, env)
        if full in self.regs:
            return self.regs[full]
        return plain(self.ns.objects[full][2])

    def write(self, target: Any, value: Any, env: dict) -> None:
        if target is None:
            return
        if target[0] == "arg":
            env["args"][target[1]] = value
            return
        path = target[1]
        if path in env["locals"] and isinstance(env["locals"][path], tuple):
            buf, idx = env["locals"][path]
            buf[idx:idx + 4] = (value & 0xFFFF_FFFF).to_bytes(4, "little")
            return
        full = self.lookup(path, env)
        assert full in self.regs, f"store to {full}"
        self.regs[full] = value & 0xFF

    def eval(self, t: Any, env: dict) -> Any:
        kind = t[0]
        if kind == "int":
            return t[1]
        if kind == "arg":
            return env["args"][t[1]]
        if kind == "buf":
            return bytearray(t[1])
        if kind == "ref":
            v = self.read(t, env)
            if isinstance(v, tuple):            # a buffer field
                buf, idx = v
                return int.from_bytes(buf[idx:idx + 4], "little")
            return v
        if kind == "name":                      # a method-local Name
            env["locals"][t[1]] = self.eval(t[2], env)
            return None
        if kind == "dwordfield":
            src = self.eval(t[1], env) if t[1][0] != "ref" else env["locals"][t[1][1]]
            env["locals"][t[3]] = (src, self.eval(t[2], env))
            return None
        if kind == "store":
            v = self.eval(t[1], env)
            self.write(t[2], v, env)
            return v
        if kind in ("and", "or"):
            a, b = self.eval(t[1], env), self.eval(t[2], env)
            v = a & b if kind == "and" else a | b
            self.write(t[3], v, env)
            return v
        if kind == "lless":
            return int(self.eval(t[1], env) < self.eval(t[2], env))
        if kind == "call":
            target = self.lookup(t[1], env)
            return self.call(target, *[self.eval(a, env) for a in t[2]])
        raise AssertionError(f"cannot evaluate {kind}")


def test_link_methods_drive_the_piix3_route_registers():
    ns = parse_dsdt(AcpiTables().table("DSDT"))
    vm = Interp(ns)
    for i, name in enumerate(("LNKA", "LNKB", "LNKC", "LNKD")):
        link = "\\_SB_." + name
        reg = f"\\_SB_.PCI0.ISA_.PRQ{i}"
        assert vm.call(link + "._STA") == 0x09                 # routing disabled at reset (bit 7)
        assert resources(bytes(vm.call(link + "._CRS"))) == [("interrupt", 0x09, [0])]
        # _SRS takes a buffer like _PRS's with one interrupt chosen
        chosen = aml.resource_template(aml.interrupt(10 + i % 2, shared=True))
        vm.call(link + "._SRS", bytearray(Reader(chosen).term(0)[0][1]))
        assert vm.regs[reg] == 10 + i % 2
        assert vm.call(link + "._STA") == 0x0B
        assert resources(bytes(vm.call(link + "._CRS"))) == [("interrupt", 0x09, [10 + i % 2])]
        vm.call(link + "._DIS")
        assert vm.regs[reg] == 0x80 | (10 + i % 2)
        assert vm.call(link + "._STA") == 0x09
    assert vm.call("\\_SB_.LNKS._STA") == 0x0B
    assert resources(bytes(vm.call("\\_SB_.LNKS._CRS"))) == [("interrupt", 0x09, [9])]


# -- the encoder itself ---------------------------------------------------------------------------

def test_integer_encodings_are_shortest():
    assert aml.integer(0) == b"\x00" and aml.integer(1) == b"\x01"
    assert aml.integer(2) == b"\x0a\x02" and aml.integer(0xFF) == b"\x0a\xff"
    assert aml.integer(0x100) == b"\x0b\x00\x01"
    assert aml.integer(0x10000) == b"\x0c\x00\x00\x01\x00"
    assert aml.integer(1 << 32) == b"\x0e" + (1 << 32).to_bytes(8, "little")
    for bad in (-1, 1 << 64, True, 1.0):
        with pytest.raises(aml.AmlError):
            aml.integer(bad)


@given(st.integers(0, (1 << 28) - 8))
def test_pkg_length_round_trips(n):
    enc = aml.pkg_length(n)
    value, end = Reader(enc).pkglen(0)
    assert value == n + len(enc) and end == len(enc)


def test_names_and_ids():
    assert aml.name_string("_SB") == b"_SB_"
    assert aml.name_string("\\_SB.PCI0") == b"\\\x2e_SB_PCI0"
    assert aml.name_string("\\_SB.PCI0.ISA") == b"\\\x2f\x03_SB_PCI0ISA_"
    assert aml.name_string("^^LNKA") == b"^^LNKA"
    assert aml.name_string("\\") == b"\\\x00"
    assert aml.eisa_id("PNP0A03") == b"\x0c\x41\xd0\x0a\x03"
    assert aml.eisa_id("PNP0C0F") == b"\x0c\x41\xd0\x0c\x0f"
    for bad in ("pci0", "12AB", "ABCDE", "A-B"):
        with pytest.raises(aml.AmlError):
            aml.name_seg(bad)
    with pytest.raises(aml.AmlError):
        aml.string("a\0b")
    with pytest.raises(aml.AmlError):
        aml.scope("X", "text")


def test_field_widths_are_raw_bit_counts():
    f = aml.field("REG0", [("A", 8), (None, 56), ("B", 100)], aml.DWORD_ACC, aml.LOCK, aml.WRITE_AS_ZEROS)
    kind, region, flags, fields = Reader(f).term(0)[0]
    assert (kind, region, flags) == ("field", "REG0", 3 | 0x10 | 0x40)
    assert fields == [("A___", 8), (None, 56), ("B___", 100)]


def test_resource_descriptors():
    buf = aml.resource_template(aml.io(0x3F8, 0x3F8, 1, 8), aml.irq_no_flags(4, 3),
                                aml.memory32_fixed(0xFED00000, 0x400), aml.interrupt(5, 10, edge=True),
                                aml.word_io(0xD00, 0xFFFF), aml.dword_memory(0xA0000, 0xBFFFF),
                                aml.qword_memory(1 << 32, (1 << 33) - 1), aml.word_bus_number(0, 0xFF))
    body = Reader(buf).term(0)[0][1]
    assert resources(body) == [
        ("io", 1, 0x3F8, 0x3F8, 1, 8), ("irq", [3, 4]), ("mem32fixed", 1, 0xFED00000, 0x400),
        ("interrupt", 0x03, [5, 10]), ("word", 1, 0x0C, 3, 0, 0xD00, 0xFFFF, 0, 0xF300),
        ("dword", 0, 0x0C, 1, 0, 0xA0000, 0xBFFFF, 0, 0x20000),
        ("qword", 0, 0x0C, 1, 0, 1 << 32, (1 << 33) - 1, 0, 1 << 32),
        ("word", 2, 0x0C, 0, 0, 0, 0xFF, 0, 0x100)]
    with pytest.raises(aml.AmlError):
        aml.irq_no_flags(16)


def test_defaults_are_the_devices_constants():
    from devices.timers import acpi_pm, hpet
    cfg = AcpiConfig()
    assert (cfg.pm1a_evt_blk, cfg.pm1a_cnt_blk, cfg.pm_tmr_blk, cfg.gpe0_blk) == (0x600, 0x604, 0x608, 0xAFE0)
    assert (cfg.smi_cmd, cfg.acpi_enable, cfg.acpi_disable, cfg.sci_irq) == (0xB2, 0xF1, 0xF0, 9)
    assert (cfg.s5_slp_typ, cfg.reset_port, cfg.reset_value) == (acpi_pm.S5_SLP_TYP, 0xCF9, 6)
    assert cfg.hpet_block_id == hpet.CAPABILITIES & 0xFFFF_FFFF == 0x8086A201
