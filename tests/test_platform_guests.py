"""The device test guests (guests/t_*.asm) run on the PC platform.

Each guest checks one device path from inside the machine and ends through
the debug-exit port with 0 (all checks passed) or the number of the first
check that failed (99: an unexpected exception, 98: an interrupt that never
came).  Here each one runs

* through the CLI entry point, ``tools.cli.main(["run", IMAGE, ...])``, in
  process, with ``--serial none`` (exit status only) and ``--serial FILE``;
* through ``vmm.platform.pc.PcMachine`` directly, asserting the stop reason and status;
* twice, asserting the two runs are identical (instruction count, serial
  bytes, VM-exit counts): the machine is a deterministic function of its inputs;

and its serial output is compared with the reference QEMU produced
(guests/expected/<name>.serial, made by ``guests.build.qemu_command``), so
the platform is held to QEMU's behaviour even where QEMU is not installed
(tests/test_qemu_compare.py runs QEMU live when it is).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from guests import build as gb
from tools import cli
from vmm.firmware.boot import boot
from vmm.machine import StopReason
from vmm.platform.pc import PcConfig, PcMachine

# The device test guests (guests/t_*.asm with the frame in t_common.asm).
# Other t_* guests (e.g. t_paging, maintained elsewhere) have their own tests.
T_GUESTS = ["t_bios", "t_kbd", "t_pic", "t_pit", "t_rtc", "t_uart"]
MEM = 32 << 20
LIMIT = 200_000_000  # far above any of them (the slowest needs ~1M instructions)


def image(name: str) -> str:
    path = gb.BUILD_DIR / gb.GUESTS[name].output
    if not path.is_file():
        pytest.fail(f"{path} is missing: run python3 guests/build.py")
    return str(path)


def run_direct(name: str, data: bytes | None = None, mem: int = MEM):
    m = PcMachine(PcConfig(mem_size=mem))
    path = image(name)
    boot(m, data if data is not None else Path(path).read_bytes(), name=path, cmdline=path)
    res = m.run(LIMIT)
    return m, res


def test_the_device_guests_are_built_by_guests_build():
    assert set(T_GUESTS) <= set(gb.GUESTS)
    for name in T_GUESTS:
        assert gb.validate(name, Path(image(name)).read_bytes()) is None


@pytest.mark.parametrize("name", T_GUESTS)
def test_guest_passes_through_the_cli(name, tmp_path, capsys):
    assert cli.main(["run", image(name), "--serial", "none", "--mem", "32M"]) == 0
    serial = tmp_path / "serial.txt"
    assert cli.main(["run", image(name), "--serial", str(serial), "--mem", "32M",
                     "--max-instructions", str(LIMIT)]) == 0
    out = serial.read_bytes()
    assert f"{name}: all checks passed".encode() in out, out.decode(errors="replace")
    assert b" FAIL " not in out
    assert cli.main(["run", image(name), "--serial", "none", "--exit-code", "qemu"]) == 1  # (0 << 1) | 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("name", T_GUESTS)
def test_guest_passes_on_pc_machine_and_runs_identically_twice(name):
    m1, r1 = run_direct(name)
    assert r1.reason is StopReason.EXIT, f"{r1}\n{bytes(m1.serial_out).decode(errors='replace')}"
    assert r1.status == 0, bytes(m1.serial_out).decode(errors="replace")
    out = bytes(m1.serial_out)
    assert out.startswith(f"{name}: started".encode())
    assert out.endswith(f"{name}: all checks passed\r\n".encode())
    assert m1.io.unclaimed_writes == 0 or name == "t_bios", dict(m1.io.unclaimed_ports)

    m2, r2 = run_direct(name)
    assert (r2.reason, r2.status, r2.icount) == (r1.reason, r1.status, r1.icount)
    assert bytes(m2.serial_out) == out
    assert r2.counts == r1.counts
    assert m2.clock.now() == m1.clock.now()


@pytest.mark.parametrize("name", T_GUESTS)
def test_guest_output_matches_the_qemu_reference(name):
    m, res = run_direct(name, mem=128 << 20)  # the reference was made with QEMU's default 128 MiB
    assert res.reason is StopReason.EXIT and res.status == 0
    assert bytes(m.serial_out) == gb.expected_serial(name)


def test_a_failing_check_reports_its_number():
    """Corrupt the signature t_bios expects at LBA 8: check 7 fails, status 7."""
    data = bytearray(Path(image("t_bios")).read_bytes())
    assert data[8 * 512:8 * 512 + 4] == b"LBA8"
    data[8 * 512] = ord("X")
    m, res = run_direct("t_bios", bytes(data))
    assert res.reason is StopReason.EXIT
    assert res.status == 7
    out = bytes(m.serial_out).decode()
    assert out.splitlines()[-1] == "t_bios FAIL: INT 13h AH=42h: LBA 8 read"
    assert "t_bios ok: INT 13h AH=41h: packet calls supported (CX bit 0)" in out


def test_a_failing_check_sets_the_cli_exit_status(tmp_path, capsys):
    data = bytearray(Path(image("t_bios")).read_bytes())
    data[8 * 512] = ord("X")
    bad = tmp_path / "t_bios_bad.img"
    bad.write_bytes(bytes(data))
    assert cli.main(["run", str(bad), "--serial", "none"]) == 16 + 7  # the guest's 7 (tools/exitstatus.py)
    assert cli.main(["run", str(bad), "--serial", "none", "--exit-code", "qemu"]) == 15
    capsys.readouterr()


# ---- BIOS services against what SeaBIOS does under QEMU ----------------------------------------

def boot_sector(asm: str) -> bytes:
    """A boot sector from 16-bit assembly (keystone, a project dependency), padded and signed."""
    keystone = pytest.importorskip("keystone")
    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_16)
    code, _ = ks.asm(asm, 0x7C00)
    sector = bytearray(512)
    sector[:len(code)] = bytes(code)
    sector[510:] = b"\x55\xaa"
    return bytes(sector)


# Ticks of the BIOS tick count (18.2 Hz) across INT 15h AH=86h "wait CX:DX microseconds"
# for 500 ms; exits with the count, plus 0x80 if the call set CF.
WAIT_500MS = """
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7C00
    xor ah, ah
    int 0x1A
    mov word ptr [0x600], dx
    mov ah, 0x86
    mov cx, 0x0007
    mov dx, 0xA120
    int 0x15
    setc bl
    xor ah, ah
    int 0x1A
    sub dx, word ptr [0x600]
    mov al, dl
    shl bl, 7
    or al, bl
    mov dx, 0x501
    out dx, al
    cli
    hlt
"""


def test_bios_wait_lets_the_time_pass(tmp_path):
    path = tmp_path / "wait.img"
    path.write_bytes(boot_sector(WAIT_500MS))
    m = PcMachine(PcConfig(mem_size=MEM))
    boot(m, path.read_bytes(), name=str(path))
    res = m.run(LIMIT)
    assert res.reason is StopReason.EXIT
    assert not res.status & 0x80, "INT 15h AH=86h set CF"
    assert 8 <= res.status <= 10, f"{res.status} BIOS ticks passed during a 500 ms wait"
