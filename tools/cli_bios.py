"""`vmm run|record --bios FILE`: a real BIOS image (e.g. Debian's SeaBIOS) as the machine's firmware.

With ``--bios`` the firmware file is what the machine boots from, so it is the
recording's image (by path and SHA-256, as any image; ``vmm replay`` reads it
again and ``--image`` points at a moved copy); the boot kind is ``bios``
(vmm/firmware/rom.py maps it as QEMU's ``-bios`` does and puts the vCPU at
the reset vector).  The firmware finds its disks on the board's controllers;
the IMAGE argument is not used.  What the HLE BIOS alone can do is refused in
one line: ``--kernel``/``--initrd``/``--append`` (SeaBIOS boots fw_cfg kernels
only through QEMU's linuxboot option ROM) and another ``--boot`` protocol.  A
snapshot of a BIOS run names its firmware itself (``--restore`` needs no
``--bios``).
"""
from __future__ import annotations

import os


class _DefaultImage(str):
    """The IMAGE argument's default ("demo"), told apart from a user who typed a name."""


DEFAULT_IMAGE = _DefaultImage("demo")


def bios_image(args, error: type[Exception]) -> tuple[str, bytes]:
    """(path, bytes) of the --bios file, with ``args`` set for a BIOS boot (boot kind
    ``bios``, no command line, the firmware named as the image); bad input raises
    ``error`` (the CLI's usage error) with one line."""
    for opt, given in (("--kernel", args.kernel), ("--initrd", args.initrd), ("--append", args.cmdline)):
        if given is not None:
            raise error(f"{opt} needs the built-in firmware: SeaBIOS boots a kernel from fw_cfg only "
                        f"through QEMU's linuxboot option ROM")
    if args.image is not DEFAULT_IMAGE:
        raise error(f"with --bios the firmware is the machine's image; {args.image!r} is not used "
                    f"(the BIOS boots from the board's disk controllers)")
    if args.boot != "auto":
        raise error(f"--boot {args.boot} and --bios exclude each other (the BIOS chooses the boot device)")
    if args.mem < (2 << 20) or args.mem > (3 << 30) or args.mem % 4096:
        raise error("--mem must be between 2M and 3G")
    from vmm.firmware.imagefile import read_file
    from vmm.firmware.rom import ROM_MAX, RomError, check_rom

    try:
        data = read_file(args.bios, ROM_MAX, "a BIOS image")   # a regular file, size checked before reading
    except OSError as e:
        raise error(f"cannot read the BIOS image {args.bios}: {e.strerror}") from None

    try:
        check_rom(data, args.bios)
    except RomError as e:
        raise error(str(e)) from None
    args.image = args.bios
    args.boot = "bios"
    args.cmdline = ""
    return os.path.abspath(args.bios), data


def bios_quantum(args) -> int | None:
    """The scheduling quantum a BIOS run records (None: the machine's default)."""
    from vmm.firmware.rom import SMP_QUANTUM

    return SMP_QUANTUM if getattr(args, "bios", None) and args.smp > 1 else None


def real_bios(m) -> bool:
    """Whether ``m`` runs a real BIOS image.  Its debug log (port 0x402) then stays off the
    terminal: SeaBIOS prints the same messages on COM1 through its serial console, and the two
    streams would interleave there byte by byte.  The log is in ``m.debugcon_out`` and in a
    recording's output digests."""
    from vmm.firmware.rom import RomFirmware

    return isinstance(getattr(m, "firmware", None), RomFirmware)
