"""The `vmm` command line.

    vmm run [IMAGE] [--mem SIZE] [--max-instructions N] [--trace] [--serial stdio|none|FILE]
            [--boot auto|disk|floppy|multiboot|flat] [--load-addr ADDR] [--cmdline TEXT]
            [--input FILE] [--rtc-epoch SECONDS] [--exit-code guest|qemu] [--stats]

With no IMAGE, `vmm run` boots the bundled demo guest.  A name of a bundled
guest (`hello`, `demo`) or a path under guests/ also works.

Exit status of `vmm run`: the guest's status when it ends through the
debug-exit port (port 0x501; `--exit-code qemu` gives QEMU's (v << 1) | 1
instead); 0 when it halts for good or reaches --max-instructions; 2 for a
usage error or an unusable image; 3 when the guest triple-faults (processor
shutdown); 4 when the CPU core stops on an error (e.g. executing outside RAM).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

EXIT_USAGE = 2
EXIT_SHUTDOWN = 3
EXIT_ERROR = 4

EPILOG = """\
exit status of `vmm run`:
  the guest's status when it writes v to the debug-exit port 0x501
  (with --exit-code qemu: (v << 1) | 1, as QEMU's isa-debug-exit);
  0 when the guest halts for good or --max-instructions is reached;
  2 usage error or unusable image; 3 triple fault; 4 CPU core error.

examples:
  vmm run                          boot the bundled demo (serial on the terminal)
  vmm run hello                    boot the bundled boot-sector guest
  vmm run disk.img --trace         boot a disk image, printing each instruction
  vmm run kernel.elf --max-instructions 10000000 --serial out.txt
"""


class UsageError(Exception):
    pass


def parse_size(text: str) -> int:
    """'64M', '512K', '1G', '65536K', or a bare number of MiB (as QEMU's -m)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 64M, 512K, 1G)")
    value, unit = int(m.group(1)), m.group(2) or "M"
    return value << {"K": 10, "M": 20, "G": 30}[unit]


def parse_int(text: str) -> int:
    try:
        return int(text.replace("_", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmm",
        description="An instruction-level x86 hypervisor emulator with an exact instruction clock.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser("run", help="boot an image (default: the bundled demo guest)",
                       description="Boot a guest image and run it until it exits, halts or faults.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("image", nargs="?", default="demo",
                   help="disk/floppy image, Multiboot kernel, flat binary, or a bundled guest name (default: demo)")
    r.add_argument("--mem", type=parse_size, default=32 << 20, metavar="SIZE",
                   help="guest RAM, e.g. 32M (default), 128M; a bare number is MiB")
    r.add_argument("--max-instructions", type=parse_int, default=None, metavar="N",
                   help="stop after exactly N retired instructions")
    r.add_argument("--trace", action="store_true",
                   help="print every executed instruction with its icount (slow), VM exits and POST codes, on stderr")
    r.add_argument("--serial", default="stdio", metavar="stdio|none|FILE",
                   help="where COM1 goes: the terminal (default), nowhere, or a file")
    r.add_argument("--boot", default="auto", choices=["auto", "disk", "floppy", "multiboot", "flat"],
                   help="boot protocol (default: detect from the image)")
    r.add_argument("--load-addr", type=parse_int, default=0x100000, metavar="ADDR",
                   help="load and entry address for --boot flat (default 0x100000)")
    r.add_argument("--cmdline", default=None, metavar="TEXT", help="Multiboot command line")
    r.add_argument("--input", default=None, metavar="FILE",
                   help="feed this file to the guest's console input instead of the terminal")
    r.add_argument("--rtc-epoch", type=parse_int, default=None, metavar="SECONDS",
                   help="guest wall-clock time at power-on, Unix seconds (default 2026-01-01 00:00:00 UTC)")
    r.add_argument("--exit-code", choices=["guest", "qemu"], default="guest",
                   help="process exit status: the guest's value (default) or QEMU's (v << 1) | 1")
    r.add_argument("--stats", action="store_true", help="print instructions, exits and speed at the end")
    return p


def resolve_image(name: str) -> str:
    if os.path.exists(name):
        return name
    from guests.build import GUESTS, guest_path

    base = os.path.basename(name)
    key = base.split(".")[0]
    if key in GUESTS:
        return str(guest_path(key))
    raise UsageError(f"image not found: {name}" + (f" (bundled guests: {', '.join(sorted(GUESTS))})" if GUESTS else ""))


def cmd_run(args) -> int:
    from devices.serial_backends import FileBackend, NullBackend, StdioBackend
    from vmm.firmware.boot import BootError, boot
    from vmm.machine import StopReason
    from vmm.pc import DEFAULT_EPOCH, PcConfig, PcMachine

    path = resolve_image(args.image)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"cannot read image {path}: {e.strerror}") from None
    if not data:
        raise UsageError(f"image {path} is empty")
    if args.mem < (2 << 20) or args.mem > (3 << 30) or args.mem % 4096:
        raise UsageError("--mem must be between 2M and 3G")
    stdio = None
    if args.serial == "stdio":
        stdio = StdioBackend()
        backend = stdio
    elif args.serial == "none":
        backend = NullBackend()
    else:
        try:
            backend = FileBackend(args.serial)
        except OSError as e:
            raise UsageError(f"cannot open serial output file {args.serial}: {e.strerror}") from None
    kind = args.boot
    config = PcConfig(mem_size=args.mem, start_epoch=DEFAULT_EPOCH if args.rtc_epoch is None else args.rtc_epoch,
                      serial=backend)
    try:
        m = PcMachine(config)
        try:
            info = boot(m, data, kind, name=args.image,
                        load_addr=args.load_addr, cmdline=args.cmdline if args.cmdline is not None else args.image)
        except BootError as e:
            raise UsageError(str(e)) from None
        if info.kind in ("disk", "floppy"):
            m.config.input_to = "keyboard"
        out = sys.stdout.buffer if args.serial == "stdio" else None
        if out is not None:
            def show(data: bytes) -> None:
                out.write(data)
                out.flush()
            m.on_console_output = show
        if args.input:
            try:
                with open(args.input, "rb") as f:
                    m.console_input(f.read())
            except OSError as e:
                raise UsageError(f"cannot read input file {args.input}: {e.strerror}") from None
        elif stdio is not None and stdio.is_tty:
            _attach_terminal(m, stdio)
        if args.trace:
            _attach_trace(m)
        t0 = time.perf_counter()
        res = m.run(args.max_instructions)
        dt = time.perf_counter() - t0
    finally:
        if stdio is not None:
            stdio.close()
    if args.stats or args.trace:
        mips = res.icount / dt / 1e6 if dt > 0 else 0.0
        print(f"vmm: {res.icount} instructions in {dt:.2f} s ({mips:.1f} MIPS), "
              f"guest time {m.clock.now() / 1e8:.3f} s, exits {res.counts}", file=sys.stderr)
    if res.reason is StopReason.EXIT:
        return (res.status << 1) | 1 if args.exit_code == "qemu" else res.status & 0xFF
    if res.reason is StopReason.SHUTDOWN:
        print(f"vmm: the guest triple-faulted (processor shutdown) at icount {res.icount}: {res.message}",
              file=sys.stderr)
        return EXIT_SHUTDOWN
    if res.reason is StopReason.ERROR:
        print(f"vmm: {res.message}", file=sys.stderr)
        return EXIT_ERROR
    if res.reason is StopReason.HALTED:
        print(f"vmm: {res.message} (icount {res.icount})", file=sys.stderr)
        return 0
    if res.reason is StopReason.LIMIT:
        print(f"vmm: stopped after {res.icount} instructions (--max-instructions)", file=sys.stderr)
        return 0
    if res.reason is StopReason.RESET:
        print(f"vmm: the guest requested a system reset at icount {res.icount}; stopping", file=sys.stderr)
        return 0
    print(f"vmm: {res.message}", file=sys.stderr)
    return 0


def _attach_terminal(m, stdio) -> None:
    """Live console input from the terminal, asked on virtual time (see PcMachine.start_input_polling)."""

    def source() -> bytes:
        data = stdio.poll_input()
        if stdio.quit_requested:
            m.request_host_stop("quit (Ctrl-A x)")
        return data

    m.start_input_polling(source, pace_idle=True)


def _attach_trace(m) -> None:
    import capstone
    import unicorn

    err = sys.stderr
    cpu = m.vcpu
    dis = {b: capstone.Cs(capstone.CS_ARCH_X86, mode) for b, mode in
           ((16, capstone.CS_MODE_16), (32, capstone.CS_MODE_32), (64, capstone.CS_MODE_64))}

    def on_code(uc, address, size, _):
        code = bytes(uc.mem_read(address, size)) if address + size <= m.memory.size else b""
        text = "??"
        for i in dis[cpu.code_bits].disasm(code, address, 1):
            text = f"{i.mnemonic} {i.op_str}".strip()
        err.write(f"{cpu.current_icount():>12} {address:#010x}: {text}\n")

    cpu.uc.hook_add(unicorn.UC_HOOK_CODE, on_code)
    cpu.invalidate_code()
    m.trace = lambda x: err.write(f"{'':>12} -- exit: {x}\n")
    m.postcode.on_code = lambda v: err.write(f"{'':>12} -- POST code {v:#04x}\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "run":
            return cmd_run(args)
    except UsageError as e:
        print(f"vmm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vmm: interrupted", file=sys.stderr)
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
