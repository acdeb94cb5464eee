"""The `vmm` command line.

    vmm run [IMAGE] [--mem SIZE] [--max-instructions N] [--trace] [--serial stdio|none|FILE]
            [--boot auto|disk|floppy|multiboot|flat] [--load-addr ADDR] [--cmdline TEXT]
            [--input FILE] [--rtc-epoch SECONDS] [--exit-code guest|qemu] [--stats] [--gdb [HOST:]PORT]
            [--mmu shadow|nested] [--bios FILE]
    vmm record [IMAGE] -o LOG [same options as run]
    vmm replay LOG [--until ICOUNT] [--no-verify] [--image PATH] [--serial ...] [--gdb [HOST:]PORT]
    vmm log show LOG [--events]
    vmm log verify LOG

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

from tools import cli_disk, cli_habits, cli_net
from tools.cli_bios import DEFAULT_IMAGE, bios_image, bios_quantum, real_bios
from tools.cli_checks import ArgError, SerialFile, check_args, check_checkpoints
from tools.exitstatus import EPILOG as EXIT_STATUS_EPILOG
from tools.exitstatus import guest_status, qemu_status
from vmm.firmware.imagefile import read_file
EXIT_USAGE = 2
EXIT_SHUTDOWN = 3
EXIT_ERROR = 4
EXIT_DIVERGED = 5
EXIT_BAD_LOG = 6
EXIT_BAD_SNAPSHOT = 7
EXIT_INCOMPLETE = 8

EPILOG = EXIT_STATUS_EPILOG + """
examples:
  vmm run                          boot the bundled demo (serial on the terminal)
  vmm run hello                    boot the bundled boot-sector guest
  vmm run disk.img --trace         boot a disk image, printing each instruction
  vmm run kernel.elf --max-instructions 10000000 --serial out.txt
  vmm record demo -o run.vmlog     record a run (console input from the terminal or --input FILE)
  vmm replay run.vmlog --verify    replay it bit-exact, checking every digest
  vmm run --bios /usr/share/seabios/bios.bin --max-instructions 20000000
                                   run SeaBIOS (its serial console on the terminal)
  vmm log show run.vmlog --events  what is in a log
"""


class UsageError(Exception):
    pass


class SnapshotUnusable(Exception):
    """A snapshot file that cannot be restored (exit status EXIT_BAD_SNAPSHOT)."""


def parse_size(text: str) -> int:
    """'64M', '512K', '1G', '65536K', or a bare number of MiB (as QEMU's -m)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 64M, 512K, 1G)")
    value, unit = int(m.group(1)), m.group(2) or "M"
    return value << {"K": 10, "M": 20, "G": 30}[unit]


def parse_count(text: str) -> int:
    v = parse_int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return v


def parse_debug_exit(text: str) -> tuple[int, int]:
    base, _, size = text.partition(",")
    b = parse_int(base)
    s = parse_int(size) if size else 2
    if s not in (1, 2, 4) or not 0 <= b <= 0xFFFF - s + 1:
        raise argparse.ArgumentTypeError(f"--debug-exit wants IOBASE[,SIZE] with SIZE 1, 2 or 4, not {text!r}")
    return b, s


def parse_smp(text: str) -> int:
    v = parse_int(text)
    if not 1 <= v <= 64:
        raise argparse.ArgumentTypeError(f"--smp takes 1 to 64 vCPUs, not {text!r}")
    return v


def parse_save_at(text: str) -> tuple[int, str]:
    at, sep, path = text.partition(":")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"--save-at wants ICOUNT:FILE, not {text!r}")
    return parse_count(at), path


def parse_int(text: str) -> int:
    try:
        return int(text.replace("_", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def add_machine_options(r: argparse.ArgumentParser) -> None:
    r.add_argument("image", nargs="?", default=DEFAULT_IMAGE,
                   help="disk/floppy image, Multiboot kernel, flat binary, or a bundled guest name (default: demo)")
    r.add_argument("--mem", type=parse_size, default=32 << 20, metavar="SIZE",
                   help="guest RAM, e.g. 32M (default), 128M; a bare number is MiB")
    r.add_argument("--max-instructions", type=parse_count, default=None, metavar="N",
                   help="stop after exactly N retired instructions")
    r.add_argument("--trace", action="store_true",
                   help="print every executed instruction with its icount (slow), VM exits and POST codes, on stderr")
    r.add_argument("--serial", default="stdio", metavar="stdio|none|tcp:[HOST:]PORT|FILE",
                   help="where COM1 goes: the terminal (default), nowhere, a TCP socket (127.0.0.1 by default; "
                        "input comes from the client), or a file")
    r.add_argument("--boot", default="auto", choices=["auto", "linux", "disk", "floppy", "multiboot", "flat", "cdrom"],
                   help="boot protocol (default: detect from the image); cdrom: El Torito from the CD-ROM drive")
    r.add_argument("--load-addr", type=parse_int, default=0x100000, metavar="ADDR",
                   help="load and entry address for --boot flat (default 0x100000)")
    r.add_argument("--cmdline", "--append", dest="cmdline", default=None, metavar="TEXT",
                   help="kernel command line: Linux (default: empty) or Multiboot (default: the image name)")
    r.add_argument("--bios", default=None, metavar="FILE",
                   help="boot this BIOS image (e.g. Debian's /usr/share/seabios/bios.bin) as the firmware, "
                        "as QEMU's -bios; IMAGE is then not used")
    r.add_argument("--kernel", default=None, metavar="BZIMAGE",
                   help="boot this Linux kernel (bzImage) directly, as QEMU's -kernel; the same as giving it as IMAGE")
    r.add_argument("--initrd", default=None, metavar="FILE", help="initial ramdisk for a Linux kernel")
    r.add_argument("--debug-exit", type=parse_debug_exit, default=(0x501, 2), metavar="IOBASE[,SIZE]",
                   help="where QEMU's isa-debug-exit answers: I/O base and size 1, 2 or 4 (default 0x501,2; "
                        "many OS test suites use 0xf4)")
    r.add_argument("--input", default=None, metavar="FILE",
                   help="feed this file to the guest's console input instead of the terminal; - reads stdin "
                        "(a pipe), whatever --serial says")
    r.add_argument("--rtc-epoch", type=parse_int, default=None, metavar="SECONDS",
                   help="guest wall-clock time at power-on, Unix seconds (default 2026-01-01 00:00:00 UTC)")
    r.add_argument("--exit-code", choices=["guest", "qemu"], default="guest",
                   help="process exit status: the guest's value (default) or QEMU's (v << 1) | 1")
    r.add_argument("--stats", action="store_true", help="print instructions, exits and speed at the end")
    r.add_argument("--mmu", choices=["shadow", "nested"], default="shadow",
                   help="shadow: the VMM fills the CPU's TLB from the guest's page tables and the EPT "
                        "(default); nested: the CPU core walks the guest's tables itself")
    r.add_argument("-M", "--machine", choices=["pc-4", "pc-3", "pc-2"], default="pc-4", metavar="TYPE",
                   help="machine type: pc-4 (default); pc-3, whose virtio-net offers no TCP segmentation "
                        "and transmits at every notify; or pc-2, whose CPU also does not report "
                        "IA32_ARCH_CAPABILITIES, so Linux takes it for vulnerable to Meltdown and isolates its "
                        "page tables (a replay builds the type its log names)")
    r.add_argument("--smp", type=parse_smp, default=1, metavar="N",
                   help="number of vCPUs, 1 to 64 (default 1); application processors wait for INIT/SIPI")
    r.add_argument("--restore", default=None, metavar="FILE",
                   help="continue the machine saved in a snapshot file (instead of booting IMAGE)")
    r.add_argument("--save-at", type=parse_save_at, action="append", default=None, metavar="ICOUNT:FILE",
                   help="write a snapshot when the vCPUs together have retired ICOUNT instructions, then "
                        "go on (repeatable)")
    cli_disk.add_drive_options(r)
    cli_net.add_nic_options(r)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmm",
        description="An instruction-level x86 hypervisor emulator with an exact instruction clock "
                    "and deterministic record/replay.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser("run", help="boot an image (default: the bundled demo guest)",
                       description="Boot a guest image and run it until it exits, halts or faults.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_machine_options(r)
    r.add_argument("--gdb", default=None, metavar="[HOST:]PORT",
                   help="wait for gdb on this port (default host 127.0.0.1) and run under its control; "
                        "forward only: record, then `vmm replay LOG --gdb` for reverse execution")
    rec = sub.add_parser("record", help="run an image while recording its event log",
                         description="Run a guest exactly as `vmm run` does, writing every input that crosses "
                                     "the determinism boundary, and digests of the state, to a replay log.",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_machine_options(rec)
    rec.add_argument("-o", "--output", required=True, metavar="LOG", help="the replay log to write")
    rp = sub.add_parser("replay", help="replay a recorded run bit-exact",
                        description="Replay a recording, checking register, memory and output digests; "
                                    "the first mismatch stops the replay with a report.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    rp.add_argument("log", metavar="LOG")
    rp.add_argument("--until", type=parse_count, default=None, metavar="ICOUNT",
                    help="stop after exactly ICOUNT instructions and print the state there")
    rp.add_argument("--verify", dest="verify", action="store_true", default=True,
                    help="check every digest (default)")
    rp.add_argument("--no-verify", dest="verify", action="store_false",
                    help="check only the event order, not the digests")
    rp.add_argument("--image", default=None, metavar="PATH", help="the recorded image, if it moved")
    rp.add_argument("--serial", default="stdio", metavar="stdio|none|FILE", help="where the replayed COM1 goes")
    rp.add_argument("--exit-code", choices=["guest", "qemu"], default="guest")
    rp.add_argument("--gdb", default=None, metavar="[HOST:]PORT",
                    help="serve the gdb remote protocol (default host 127.0.0.1), with reverse execution: "
                         "connect with `target remote :PORT`; the replay then runs under gdb's control")
    rp.add_argument("--checkpoint-interval", type=parse_count, default=None, metavar="N",
                    help="with --gdb: take a checkpoint every N instructions (default: adapted to the "
                         "recording's length, 2M to 20M, which bounds the cost of going back)")
    lg = sub.add_parser("log", help="inspect a replay log",
                        description="Inspect or check a replay log.")
    lsub = lg.add_subparsers(dest="log_command", metavar="SUBCOMMAND")
    show = lsub.add_parser("show", help="header, event counts and sizes, instructions per vCPU; "
                                        "--events lists the events",
                           description="Print a log's header, event counts and sizes, how it ended and the "
                                       "instructions each vCPU retired (per vCPU, from the log's END event; "
                                       "they add up to the end icount).")
    show.add_argument("log", metavar="LOG")
    show.add_argument("--events", action="store_true", help="list every event")
    ver = lsub.add_parser("verify", help="check the structure and every checksum")
    ver.add_argument("log", metavar="LOG")
    from tools import cli_ft

    cli_ft.add_ft_parser(sub)
    cli_disk.add_disk_parser(sub)
    from replay.regress import add_parser as add_regress_parser

    add_regress_parser(sub)
    cli_habits.extend_parser(p)
    return p


def resolve_image(name: str) -> str:
    if os.path.exists(name):
        return name
    from guests.build import GUESTS

    found = cli_habits.find_image(name)  # a bundled guest by bare name only
    if found is not None:
        return found
    raise UsageError(f"image not found: {name}" + (f" (bundled guests: {', '.join(sorted(GUESTS))})" if GUESTS else ""))


def _cmdline(args, data: bytes) -> str:
    """The command line: as given; else empty for Linux (QEMU's -kernel without -append)
    and the image name for Multiboot kernels, as before."""
    if args.cmdline is not None:
        return args.cmdline
    from vmm.firmware.linux import detect_bzimage

    return "" if args.boot == "linux" or (args.boot == "auto" and detect_bzimage(data)) else args.image


def _initrd(args) -> tuple[str, bytes] | None:
    if args.initrd is None:
        return None
    try:
        return args.initrd, read_file(args.initrd)
    except OSError as e:
        raise UsageError(f"cannot read the initrd {args.initrd}: {e.strerror}") from None


def _load_image(args) -> tuple[str, bytes]:
    cli_disk.boot_from_drive(args)
    path = resolve_image(args.image)
    try:
        data = read_file(path)       # a regular file of a size an image may have, or OSError
    except OSError as e:
        raise UsageError(f"cannot read image {path}: {e.strerror}") from None
    if not data:
        raise UsageError(f"image {path} is empty")
    if args.mem < (2 << 20) or args.mem > (3 << 30) or args.mem % 4096:
        raise UsageError("--mem must be between 2M and 3G")
    return path, data


def _serial_backend(spec: str):
    """(backend, the terminal backend if the terminal is used)."""
    from host.serial import NullBackend, StdioBackend

    if spec == "stdio":
        b = StdioBackend()
        return b, b
    if spec == "none":
        return NullBackend(), None
    if spec.startswith("tcp:"):
        from host.serial import SocketBackend

        hostport = spec[4:]
        host, _, port = hostport.rpartition(":")
        try:
            b = SocketBackend(host or "127.0.0.1", int(port))
        except ValueError:
            raise UsageError(f"--serial tcp: wants tcp:[HOST:]PORT, not {spec!r}") from None
        except OSError as e:
            raise UsageError(f"cannot listen on {hostport}: {e.strerror}") from None
        print(f"vmm: COM1 on tcp {host or '127.0.0.1'}:{b.port}: waiting for a client "
              f"(e.g. `nc 127.0.0.1 {b.port}`)", file=sys.stderr, flush=True)
        while not b.connected:  # as QEMU's server,wait: the guest starts once someone listens
            b.poll_input()
            time.sleep(0.02)
        return b, b  # the client's bytes are console input
    try:
        return SerialFile(spec), None
    except OSError as e:
        raise UsageError(f"cannot open serial output file {spec}: {e.strerror}") from None


def _console(m, args) -> None:
    if args.serial == "stdio" and not real_bios(m):     # a real BIOS's port-0x402 log: not on the terminal
        out = sys.stdout.buffer

        def show(data: bytes) -> None:
            out.write(data)
            out.flush()
        m.on_console_output = show


def _live_input(args, stdio):
    """(input kind, source) for a live run: a scripted file, stdin, the terminal, or nothing."""
    return cli_habits.live_input(args, stdio, UsageError)


def _progress(m, label: str, total=None):
    """A progress line on stderr (a terminal only) that guest output never shares (tools/cli_habits.py)."""
    return cli_habits.Progress(m, label, total)


def _exit_status(res, args) -> int:
    from vmm.machine import StopReason

    if res.reason is StopReason.EXIT:
        code = qemu_status(res.status) if args.exit_code == "qemu" else guest_status(res.status)
        if code == 127:  # more than the status can hold
            print(f"vmm: the guest exited with status {res.status} ({res.status:#x}): exit status {code}",
                  file=sys.stderr)
        return code
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
        print(f"vmm: stopped after {res.icount} instructions", file=sys.stderr)
        return 0
    if res.reason is StopReason.RESET:
        print(f"vmm: the guest requested a system reset at icount {res.icount}; stopping", file=sys.stderr)
        return 0
    print(f"vmm: {res.message}", file=sys.stderr)
    return 0


def _machine(args, backend):
    """(machine, config): booted from the image the arguments name, or restored from --restore."""
    from replay.session import ReplayError, build_machine, load_snapshot, machine_config
    from vmm.firmware.boot import BootError
    from vmm.platform.pc import DEFAULT_EPOCH
    from vmm.state import SnapshotError

    if args.restore is not None:
        try:
            return load_snapshot(args.restore, backend)
        except SnapshotError as e:
            raise SnapshotUnusable(f"{args.restore}: {e}") from None
        except ReplayError as e:
            raise UsageError(str(e)) from None
    path, data = bios_image(args, UsageError) if args.bios else _load_image(args)
    cfg = machine_config(args.mem, DEFAULT_EPOCH if args.rtc_epoch is None else args.rtc_epoch, path, data,
                         args.boot, _cmdline(args, data), args.load_addr,
                         "none", vcpus=args.smp, mmu=args.mmu, initrd=_initrd(args),
                         debug_exit=args.debug_exit, quantum=bios_quantum(args), platform=args.machine)
    cfg["image"]["name"] = args.image     # as the user named it, in messages
    if getattr(args, "input_to", None) is not None:
        cfg["input_to"] = args.input_to
    drives = cli_disk.drives_from_args(args, with_hash=bool(args.save_at))
    if drives:
        cfg["drives"] = drives
    nics = cli_net.nics_from_args(args)
    if nics:
        cfg["nics"] = nics
    try:
        return build_machine(cfg, data, backend, drive_mode="run"), cfg
    except BootError as e:
        raise UsageError(str(e)) from None
    except ReplayError as e:
        raise UsageError(str(e)) from None


def _run_saving(m, cfg, args):
    """Run to the end, stopping at each --save-at ICOUNT to write a snapshot there."""
    from replay.session import run_saving

    try:
        return run_saving(m, cfg, args.max_instructions, args.save_at,
                          lambda msg: print(f"vmm: {msg}", file=sys.stderr))
    except OSError as e:
        if e.filename is None:       # not a snapshot's file (e.g. --serial /dev/full): main reports it
            raise
        raise UsageError(f"cannot write a snapshot: {e.strerror} ({e.filename})") from None


def cmd_run(args) -> int:
    backend, stdio = _serial_backend(args.serial)
    m = None
    try:
        m, cfg = _machine(args, backend)
        cli_net.connect(m, args)
        _console(m, args)
        kind, source = _live_input(args, stdio)
        if source is not None:
            m.start_input_polling(_quit_aware(m, source, stdio), pace_idle=kind == "terminal")
        if args.trace:
            _attach_trace(m)
        if args.gdb is not None:
            return _run_gdb(m, args, stdio)
        _progress(m, "running", args.max_instructions)
        t0 = time.perf_counter()
        res = _run_saving(m, cfg, args)
        dt = time.perf_counter() - t0
    finally:
        if m is not None:
            cli_disk.close(m)
            cli_net.close(m)
        if stdio is not None:
            stdio.close()
    if args.stats or args.trace:
        mips = res.icount / dt / 1e6 if dt > 0 else 0.0
        print(f"vmm: {res.icount} instructions in {dt:.2f} s ({mips:.1f} MIPS), "
              f"guest time {m.clock.now() / 1e8:.3f} s, exits {res.counts}, {cli_habits.io_stats(m)}",
              file=sys.stderr)
    return _exit_status(res, args)


def _quit_aware(m, source, stdio):
    if stdio is None:
        return source

    def src() -> bytes:
        data = source()
        if getattr(stdio, "quit_requested", False):
            m.request_host_stop("quit (Ctrl-A x)")
        return data
    return src


def cmd_record(args) -> int:
    from replay.session import ReplayError, record
    from vmm.firmware.boot import BootError
    from vmm.platform.pc import DEFAULT_EPOCH
    from vmm.state import SnapshotError

    if args.restore is not None:
        path, data = args.restore, None
    else:
        path, data = bios_image(args, UsageError) if args.bios else _load_image(args)
    drives = cli_disk.drives_from_args(args, with_hash=True, recording=True)
    nics = cli_net.nics_from_args(args)
    if drives and args.restore is not None:
        raise UsageError("--restore takes the snapshot's disks; drive options cannot be added")
    backend, stdio = _serial_backend(args.serial)
    ref: dict = {}
    try:
        kind, live = _live_input(args, stdio)
        source = None
        if live is not None:
            def source() -> bytes:
                d = live()
                if stdio is not None and getattr(stdio, "quit_requested", False):
                    ref["m"].request_host_stop("quit (Ctrl-A x)")
                return d

        def setup(m) -> None:
            ref["m"] = m
            cli_net.connect(m, args)
            _console(m, args)
            _progress(m, "recording", args.max_instructions)
            if args.trace:
                _attach_trace(m)

        t0 = time.perf_counter()
        try:
            res, m = record(path, data, args.output, mem_size=args.mem,
                            epoch=DEFAULT_EPOCH if args.rtc_epoch is None else args.rtc_epoch,
                            boot_kind=args.boot, cmdline=_cmdline(args, data) if data is not None else "",
                            load_addr=args.load_addr, live_input=source, input_kind=kind,
                            max_instructions=args.max_instructions, serial=backend,
                            pace_idle=kind == "terminal", setup=setup, mmu=args.mmu, vcpus=args.smp,
                            restore=args.restore, save_at=args.save_at, initrd=_initrd(args),
                            debug_exit=args.debug_exit, quantum=bios_quantum(args),
                            input_to=getattr(args, "input_to", None), platform=args.machine,
                            drives=drives, nics=nics, report=lambda msg: print(f"vmm: {msg}", file=sys.stderr))
        except BootError as e:
            raise UsageError(str(e)) from None
        except SnapshotError as e:
            raise SnapshotUnusable(f"{args.restore}: {e}") from None
        except ReplayError as e:
            raise UsageError(str(e)) from None
        except OSError as e:
            raise UsageError(f"cannot write the log {args.output}: {e.strerror}") from None
        dt = time.perf_counter() - t0
    finally:
        if stdio is not None:
            stdio.close()
    cli_disk.close(m)
    cli_net.close(m)
    print(f"\nvmm: recorded {res.icount:,} instructions ({m.clock.now() / 1e8:.3f} guest s) in {dt:.2f} s "
          f"({res.icount / max(dt, 1e-9) / 1e6:.1f} MIPS); {_count_events(args.output)} events, "
          f"{os.path.getsize(args.output):,} log bytes -> {args.output}", file=sys.stderr)
    return _exit_status(res, args)


def _count_events(path: str) -> int:
    from replay.logfile import LogReader

    return sum(1 for _ in LogReader(path))


def cmd_replay(args) -> int:
    from replay.logfile import LogFormatError
    from replay.session import Divergence, Replayer, ReplayError, replay_ended_early

    image = None
    if args.image:
        try:
            image = read_file(args.image)
        except OSError as e:
            raise UsageError(f"cannot read image {args.image}: {e.strerror}") from None
    if args.gdb is not None:
        return _replay_gdb(args, image)
    backend, stdio = _serial_backend(args.serial)
    try:
        try:
            rp = Replayer(args.log, image=image, serial=backend, verify=args.verify)
        except LogFormatError as e:
            print(f"vmm: {args.log}: {e}", file=sys.stderr)
            return EXIT_BAD_LOG
        except ReplayError as e:
            raise UsageError(str(e)) from None
        except OSError as e:
            raise UsageError(f"cannot read {args.log}: {e.strerror}") from None
        except Divergence as d:
            print(f"vmm: {d}", file=sys.stderr)
            return EXIT_DIVERGED
        note = getattr(rp.reader, "truncation_note", None)
        if rp.reader.truncated and note:
            print(f"vmm: {note}", file=sys.stderr)
        if rp.image_changed:
            print("vmm: warning: the image differs from the recorded one (sha256); expect a divergence",
                  file=sys.stderr)
        _console(rp.m, args)
        _progress(rp.m, "replaying", lambda: rp.end_icount)   # read when first shown
        t0 = time.perf_counter()
        try:
            res = rp.run(args.until)
        except Divergence as d:
            print(f"\nvmm: {d}", file=sys.stderr)
            return EXIT_DIVERGED
        except LogFormatError as e:  # damage found past the part read before the replay started
            print(f"\nvmm: {args.log}: {e}", file=sys.stderr)
            return EXIT_BAD_LOG
        dt = time.perf_counter() - t0
    finally:
        if stdio is not None:
            stdio.close()
    m = rp.m
    early = replay_ended_early(rp, res, args.until)
    print(f"\nvmm: replayed {res.icount:,} instructions ({m.clock.now() / 1e8:.3f} guest s) in {dt:.2f} s "
          f"({res.icount / max(dt, 1e-9) / 1e6:.1f} MIPS); {rp.events_used} events"
          + (", every digest matched" if args.verify and not early else ""), file=sys.stderr)
    if early:
        print(f"vmm: the replay ended early: {early}", file=sys.stderr)
        return EXIT_INCOMPLETE
    if len(m.vcpus) > 1:
        print("vmm: instructions per vCPU: " + ", ".join(f"vCPU {v.id}: {v.icount:,}" for v in m.vcpus),
              file=sys.stderr)
    if args.until is not None:
        regs = m.vcpu.snapshot_regs()
        print("vmm: state at icount {}: {}".format(
            m.vcpu.icount, " ".join(f"{k}={v:#x}" for k, v in regs.items())), file=sys.stderr)
    return _exit_status(res, args)


def _run_gdb(m, args, stdio=None) -> int:
    """gdb on a live run, the terminal handed over only while gdb is connected (tools/cli_habits.py)."""
    return cli_habits.serve_gdb(m, args, stdio, parse_hostport, UsageError, _exit_status)


def parse_hostport(text: str) -> tuple[str, int]:
    from replay.ft.wire import parse_hostport as parse

    try:
        return parse(text, "--gdb")
    except ValueError as e:
        raise UsageError(str(e)) from None


def _replay_gdb(args, image) -> int:
    from replay.debugtarget import ReplayTarget
    from replay.gdbstub import GdbStub
    from replay.logfile import LogFormatError
    from replay.session import Divergence, ReplayError
    from replay.timetravel import TimeTravel

    host, port = parse_hostport(args.gdb)
    backend, _stdio = _serial_backend("none" if args.serial == "stdio" else args.serial)
    try:
        tt = TimeTravel(args.log, image=image, interval=args.checkpoint_interval, serial=backend)
    except LogFormatError as e:
        print(f"vmm: {args.log}: {e}", file=sys.stderr)
        return EXIT_BAD_LOG
    except (ReplayError, OSError) as e:
        raise UsageError(str(e)) from None
    except Divergence as d:
        print(f"vmm: {d}", file=sys.stderr)
        return EXIT_DIVERGED
    try:
        check_checkpoints(args.checkpoint_interval, tt.end_icount or tt.rp.reader.last_icount)
    except ArgError as e:
        raise UsageError(str(e)) from None
    try:
        stub = GdbStub(ReplayTarget(tt), host, port)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    print(f"vmm: replaying {args.log} ({tt.end_icount} instructions) under gdb: "
          f"target remote {stub.host}:{stub.port}" + cli_habits.gdb_hint(), file=sys.stderr, flush=True)
    try:
        stub.serve_forever()
    except Divergence as d:
        print(f"vmm: {d}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        stub.close()
    return 0


def cmd_log(args) -> int:
    from replay.logfile import LogFormatError, describe, verify

    if args.log_command is None:
        raise UsageError("log needs a subcommand: show or verify")
    try:
        if args.log_command == "show":
            print(describe(args.log, events=args.events))
            return 0
        rep = verify(args.log)
    except LogFormatError as e:
        print(f"vmm: {args.log}: {e}", file=sys.stderr)
        return EXIT_BAD_LOG
    except OSError as e:
        raise UsageError(f"cannot read {args.log}: {e.strerror}") from None
    print(rep)
    return 0 if rep.ok else EXIT_BAD_LOG


def _attach_trace(m) -> None:
    import capstone

    err = sys.stderr
    cpu = m.vcpu
    dis = {b: capstone.Cs(capstone.CS_ARCH_X86, mode) for b, mode in
           ((16, capstone.CS_MODE_16), (32, capstone.CS_MODE_32), (64, capstone.CS_MODE_64))}

    def on_code(address, size):
        code = cpu._code_bytes(address, cli_habits.trace_size(size)) or b""  # through the guest's page tables
        text = "??"
        for i in dis[cpu.code_bits].disasm(code, address, 1):
            text = f"{i.mnemonic} {i.op_str}".strip()
        err.write(f"{cpu.current_icount():>12} {address:#010x}: {text}\n")

    cpu.add_code_hook(on_code)
    m.trace = lambda x: err.write(f"{'':>12} -- exit: {x}\n")
    m.postcode.on_code = lambda v: err.write(f"{'':>12} -- POST code {v:#04x}\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli_habits.parse_args(parser, argv)
    if getattr(args, "kernel", None) is not None:
        args.image = args.kernel
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        check_args(args)             # every numeric flag's range, before anything is built
    except ArgError as e:
        print(f"vmm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "record":
            return cmd_record(args)
        if args.command == "replay":
            return cmd_replay(args)
        if args.command == "log":
            return cmd_log(args)
        if args.command == "ft":
            from tools import cli_ft

            return cli_ft.cmd_ft(args)
        if args.command == "disk":
            return cli_disk.cmd_disk(args)
        if args.command == "regress":
            from replay.regress import RegressUsageError, main as regress_main

            try:
                return regress_main(args)
            except RegressUsageError as e:
                raise UsageError(str(e)) from None
    except UsageError as e:
        print(f"vmm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SnapshotUnusable as e:
        print(f"vmm: error: {e}", file=sys.stderr)
        return EXIT_BAD_SNAPSHOT
    except KeyboardInterrupt:
        print("vmm: interrupted", file=sys.stderr)
        return 130
    except OSError as e:             # the host refused a file mid-run (e.g. --serial /dev/full)
        print(f"vmm: error: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


if __name__ == "__main__":
    # `python -m tools.cli` runs this file as __main__, a second copy of the module: call the
    # tools.cli that the other tools/ modules import, so main() catches their UsageError
    from tools.cli import main as _main

    sys.exit(_main())
