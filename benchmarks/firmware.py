"""From reset to the boot sector: Debian's SeaBIOS under vmm, vmm's built-in BIOS, and QEMU TCG
running the same SeaBIOS file, in the same run.

    python benchmarks/firmware.py [--runs N] [--smp N] [--no-qemu] [--no-cli]

The guest: a 1 MiB disk on the primary IDE master whose boot sector writes 0
to QEMU's isa-debug-exit port (0x501, 2 bytes wide), so every run ends the
moment its firmware hands over to the disk.  SeaBIOS comes from Debian's
``seabios`` package at run time (tools/debian.py, bios.bin).

Figures, each the best of N runs (default 3):

* vmm in process: a PcMachine built, the firmware put in place, run to the
  exit: the instructions retired from reset to the boot sector (vmm's exact
  count) and seconds, split into building the machine and running it.  For
  the built-in BIOS the count is what it takes from the loaded boot sector to
  the exit: it loads the boot sector itself, without guest code.
* whole processes, wall time: ``vmm run --bios bios.bin -hda disk.img`` and
  ``vmm run disk.img``, and ``qemu-system-x86_64 -accel tcg -bios bios.bin
  -hda disk.img`` with the same devices that matter (IDE, isa-debug-exit);
  with, for each, the same process given a 64 KiB ROM whose reset vector
  exits at once, which is the fixed cost of starting and ending the process,
  so "firmware" = total - that.  QEMU has no exact instruction count (its
  plugins are not in Debian's package), so its column is time only.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXIT_PORT = 0x501
# mov dx, 0x501; xor ax, ax; out dx, ax; cli; hlt
EXIT_CODE = bytes([0xBA, EXIT_PORT & 0xFF, EXIT_PORT >> 8, 0x31, 0xC0, 0xEF, 0xFA, 0xF4])
BUDGET = 100_000_000


def boot_disk() -> bytes:
    img = bytearray(1 << 20)
    img[:len(EXIT_CODE)] = EXIT_CODE
    img[510:512] = b"\x55\xaa"
    return bytes(img)


def exit_rom() -> bytes:
    """A 64 KiB BIOS image whose reset vector writes the exit port: a short jump over nothing, then it."""
    rom = bytearray(b"\xf4" * 0x10000)
    rom[-16:-16 + 2 + len(EXIT_CODE)] = b"\xeb\x00" + EXIT_CODE
    return bytes(rom)


def vmm_in_process(rom: bytes | None, disk: Path, smp: int) -> tuple[int, float, float]:
    """(instructions, build seconds, run seconds) of one boot to the exit port."""
    from devices.storage.ide import attach_ide
    from host.images import open_image
    from vmm.firmware.boot import boot
    from vmm.firmware.rom import SMP_QUANTUM, boot_rom
    from vmm.machine import StopReason
    from vmm.platform.pc import PcConfig, PcMachine

    t0 = time.perf_counter()
    m = PcMachine(PcConfig(mem_size=32 << 20, vcpus=smp, quantum=SMP_QUANTUM if smp > 1 and rom else None))
    image = None
    try:
        if rom is not None:
            boot_rom(m, rom, "bios.bin")
            image = open_image(disk)
            attach_ide(m, {(0, 0): ("disk", image)})
        else:
            boot(m, disk.read_bytes(), "disk", name=disk.name)
        t1 = time.perf_counter()
        res = m.run(BUDGET)
        t2 = time.perf_counter()
        if res.reason is not StopReason.EXIT:
            raise SystemExit(f"the boot did not reach the boot sector's exit: {res}")
        return res.icount, t1 - t0, t2 - t1
    finally:
        m.close()
        if image is not None:
            image.close()


def wall(cmd: list[str], ok: tuple[int, ...]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    dt = time.perf_counter() - t0
    if p.returncode not in ok:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.decode(errors='replace')[-300:]}")
    return dt


def best(n: int, fn):
    return min((fn() for _ in range(n)), key=lambda r: r if isinstance(r, float) else sum(r[1:]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--no-cli", action="store_true", help="only the in-process figures")
    args = ap.parse_args()
    from tools import debian

    try:
        bios_path = debian.seabios("bios.bin")
    except debian.DebianUnavailable as e:
        print(f"SeaBIOS unavailable: {e}")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        return measure(args, bios_path, Path(tmp))


def measure(args, bios_path: Path, tmp: Path) -> int:
    rom = bios_path.read_bytes()
    img = tmp / "disk.img"
    img.write_bytes(boot_disk())
    n = args.runs
    print(f"SeaBIOS {bios_path} ({len(rom) // 1024} KiB), {args.smp} vCPU(s), best of {n}")

    print("\n== vmm in process: reset to the boot sector's exit")
    print(f"{'firmware':<16} {'instructions':>13} {'build s':>8} {'run s':>8} {'MIPS':>7}")
    for label, r in (("SeaBIOS", rom), ("built-in BIOS", None)):
        ic, tb, tr = best(n, lambda r=r: vmm_in_process(r, img, args.smp))
        print(f"{label:<16} {ic:>13,} {tb:8.3f} {tr:8.3f} {ic / tr / 1e6 if tr else 0:7.1f}")

    if args.no_cli and args.no_qemu:
        return 0
    tiny = tmp / "exit.rom"
    tiny.write_bytes(exit_rom())
    smp = ["--smp", str(args.smp)] if args.smp > 1 else []
    print("\n== whole processes, wall seconds (fixed: the same process with a ROM that exits at reset)")
    print(f"{'':<34} {'total':>7} {'fixed':>7} {'firmware':>9}")
    results = {}
    if not args.no_cli:
        vmm = [sys.executable, "-m", "tools.cli", "run", "--serial", "none"]
        try:
            total = best(n, lambda: wall(vmm + ["--bios", str(bios_path), "-hda", str(img)] + smp, (0,)))
            fixed = best(n, lambda: wall(vmm + ["--bios", str(tiny)] + smp, (0,)))
            results["vmm SeaBIOS"] = (total, fixed)
        except RuntimeError as e:
            print(f"vmm --bios -hda: not measured ({e})")
        total = best(n, lambda: wall(vmm + [str(img)] + smp, (0,)))
        fixed = best(n, lambda: wall(vmm + ["--bios", str(tiny)], (0,)))
        results["vmm built-in BIOS"] = (total, fixed)
    qemu = shutil.which("qemu-system-x86_64")
    if not args.no_qemu and qemu:
        base = [qemu, "-accel", "tcg", "-m", "32", "-display", "none", "-nodefaults", "-serial", "none",
                "-monitor", "none", "-no-reboot", "-smp", str(args.smp),
                "-device", f"isa-debug-exit,iobase={EXIT_PORT:#x},iosize=2"]
        total = best(n, lambda: wall(base + ["-bios", str(bios_path), "-drive",
                                             f"file={img},format=raw,if=ide"], (1,)))
        fixed = best(n, lambda: wall(base + ["-bios", str(tiny)], (1,)))
        results["QEMU TCG SeaBIOS"] = (total, fixed)
    elif not args.no_qemu:
        print("qemu-system-x86_64 is not installed: no QEMU figures")
    for label, (total, fixed) in results.items():
        print(f"{label:<34} {total:7.3f} {fixed:7.3f} {total - fixed:9.3f}")
    if "vmm SeaBIOS" in results and "QEMU TCG SeaBIOS" in results:
        v, q = results["vmm SeaBIOS"], results["QEMU TCG SeaBIOS"]
        print(f"vmm / QEMU: {v[0] / q[0]:.2f}x total, {(v[0] - v[1]) / max(q[0] - q[1], 1e-9):.2f}x "
              f"firmware only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
