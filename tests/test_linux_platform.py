"""Debian's Linux on the pc-3 board (the default; pc-2 once), as a user runs it: `vmm record` and `vmm
replay` of the real kernel with a busybox initramfs, commands fed with
--input, power-off through ACPI (exit 0).  The guest's own view is checked:
the kernel log shows the local APIC, the I/O APIC, the HPET, ACPI and PCI
found, and PCI lists the host bridge and the ISA bridge.  (Debian's
busybox-static is built without `lspci`; the test reads what lspci reads,
/sys/bus/pci/devices.)  The same boot recorded and replayed: same exit status,
byte-identical console, every digest checked.  With --smp 2 the kernel
brings up both CPUs (issue 11), and that recording replays exactly too.

Everything comes from Debian's packages at test time (tools/debian.py); the
tests skip with the reason where the packages cannot be had.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.realguests import debian_kernel  # noqa: F401 - a pytest fixture
from tools import debian

SHELL_INIT = debian.INIT_HEADER + """echo VMM-INIT-READY
exec /bin/sh
"""
# Bytes that reach the UART before Linux's 8250 driver resets its FIFO are lost
# (as under QEMU); newlines first, then the commands.
COMMANDS = "\n" * 48 + "\n".join([
    "echo CMD-BEGIN",
    "dmesg | grep -E 'APIC|IOAPIC|hpet|ACPI: (Interpreter|PM)|PCI host bridge|smp:'",
    "for d in /sys/bus/pci/devices/*; do echo PCIDEV $(cat $d/vendor) $(cat $d/device) $(cat $d/class); done",
    "echo CPUS $(grep -c ^processor /proc/cpuinfo)",
    "for f in /sys/devices/system/cpu/vulnerabilities/*; do echo VULN ${f##*/}: $(cat $f); done",
    "echo CMD-END",
    "poweroff -f",
]) + "\n"


@pytest.fixture(scope="module")
def shell_initramfs() -> Path:
    try:
        return debian.initramfs(SHELL_INIT)
    except debian.DebianUnavailable as e:
        pytest.skip(f"Debian packages unavailable: {e}")


def vmm(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[1])


def record_and_replay(tmp_path: Path, kernel: Path, initrd: Path, *extra: str) -> str:
    inp = tmp_path / "commands.txt"
    inp.write_text(COMMANDS)
    log, rec_out, rep_out = tmp_path / "linux.vmlog", tmp_path / "rec.txt", tmp_path / "rep.txt"
    rec = vmm("record", "--kernel", str(kernel), "--initrd", str(initrd), "--append", "console=ttyS0 panic=-1",
              "--mem", "256M", "--input", str(inp), "--serial", str(rec_out), "-o", str(log), *extra)
    assert rec.returncode == 0, rec.stderr[-3000:]
    assert "powered off (ACPI S5)" in rec.stderr
    rep = vmm("replay", str(log), "--serial", str(rep_out))
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert "every digest matched" in rep.stderr and "powered off (ACPI S5)" in rep.stderr
    assert rep_out.read_bytes() == rec_out.read_bytes()
    return rec_out.read_text(errors="replace")


def guest_view(console: str) -> str:
    assert "VMM-INIT-READY" in console, console[-3000:]
    m = re.search(r"^CMD-BEGIN\r?$(.*)^CMD-END\r?$", console, re.M | re.S)
    assert m, console[-3000:]
    return m.group(1)


def test_linux_boots_finds_the_platform_and_replays_exactly(tmp_path, debian_kernel, shell_initramfs):  # noqa: F811
    view = guest_view(record_and_replay(tmp_path, debian_kernel, shell_initramfs))
    # the kernel's own log: what it found on the board
    assert re.search(r"IOAPIC\[0\]: apic_id 0, version 17, address 0xfec00000, GSI 0-23", view), view
    assert "APIC: Switch to symmetric I/O mode setup" in view
    assert re.search(r"hpet0: at MMIO 0xfed00000", view), view
    assert "ACPI: Interpreter enabled" in view and "ACPI: PM: (supports S0 S5)" in view
    assert "PCI host bridge to bus 0000:00" in view
    # PCI as lspci sees it: the i440FX host bridge and the PIIX3 ISA bridge
    devs = set(re.findall(r"^PCIDEV (0x\w+) (0x\w+) (0x\w+)", view, re.M))
    assert ("0x8086", "0x1237", "0x060000") in devs and ("0x8086", "0x7000", "0x060100") in devs, devs
    assert "CPUS 1" in view
    # the default machine type (pc-3) reports IA32_ARCH_CAPABILITIES (vmm/cpu/cpuid.py): the kernel
    # finds the CPU not exposed to Meltdown, so it does not isolate its page tables
    vuln = dict(re.findall(r"^VULN (\w+): (.*?)\r?$", view, re.M))
    assert vuln["meltdown"] == "Not affected", vuln
    assert vuln["mds"] == "Not affected" and vuln["l1tf"] == "Not affected", vuln


def test_linux_on_pc2_isolates_its_page_tables(tmp_path, debian_kernel, shell_initramfs):  # noqa: F811
    """pc-2, the machine type of earlier recordings: a Sandy Bridge that does not report
    IA32_ARCH_CAPABILITIES, which Linux takes for exposed to Meltdown."""
    inp, out = tmp_path / "commands.txt", tmp_path / "console.txt"
    inp.write_text(COMMANDS)
    run = vmm("run", "-M", "pc-2", "--kernel", str(debian_kernel), "--initrd", str(shell_initramfs),
              "--append", "console=ttyS0 panic=-1", "--mem", "256M", "--input", str(inp), "--serial", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    view = guest_view(out.read_text(errors="replace"))
    vuln = dict(re.findall(r"^VULN (\w+): (.*?)\r?$", view, re.M))
    assert vuln["meltdown"] == "Mitigation: PTI", vuln


def test_linux_brings_up_two_cpus_and_replays_exactly(tmp_path, debian_kernel, shell_initramfs):  # noqa: F811
    view = guest_view(record_and_replay(tmp_path, debian_kernel, shell_initramfs, "--smp", "2"))
    assert "CPUS 2" in view, view
    assert "smp: Brought up 1 node, 2 CPUs" in view
