"""`vmm ft`: lockstep fault tolerance from the command line (replay/ft/).

    vmm ft primary [IMAGE and run options] --backup HOST:PORT [--console [HOST:]PORT]
                   [--arbiter PATH] [--heartbeat SECONDS] [--max-lag DURATION] [--linger SECONDS]
    vmm ft backup --listen [HOST:]PORT | --join HOST:PORT [--image PATH] [--drive-file NAME=PATH]
                  [--arbiter PATH] [--console [HOST:]PORT]
    vmm ft console HOST:PORT [HOST:PORT ...]
    vmm ft status HOST:PORT
    vmm ft arbiter --listen [HOST:]PORT [--state FILE]
"""
from __future__ import annotations

import argparse
import re
import sys
import time

EXIT_FT_REFUSED = 10   # the pair could not form: no backup, a refused handshake, a diverged replay
EXIT_FT_FENCED = 11    # this side lost the arbiter to its peer and stopped

FT_EPILOG = """\
the pair:
  the primary runs the guest and streams its event log to the backup, which
  replays it a bounded lag behind (--max-lag, in virtual time; the primary
  waits, never the backup).  Console output leaves the primary only once the
  backup holds the log up to the instruction that produced it.  Heartbeats
  (--heartbeat) detect a failure; the side that then wins the arbiter
  (--arbiter PATH: a lock file on storage both reach, created atomically; or
  --arbiter tcp:HOST:PORT[/NAME]: a lease of a `vmm ft arbiter` process) is
  the one live side: a backup goes live at the primary's last horizon and
  serves the console at the same address; a primary goes on alone.
  A primary that runs alone takes a new backup: `vmm ft backup --join
  HOST:PORT` (its console address) gets the machine's saved state at the
  primary's next horizon and follows it from there; the pair then contends
  for a new lease (PATH.1, PATH.2, ... for the first, second, ... join).

disks (--drive, -hda, -hdb, -cdrom): the backup checks its copy of each (the
primary's path, or --drive-file NAME=PATH) against the primary's SHA-256
before the first instruction; each side keeps the guest's writes in memory, so
the image files stay as they were.

the console (--console) speaks a small protocol in which every output and
input carries its stream position, so a client that reconnects after a
failover loses and repeats nothing: use `vmm ft console HOST:PORT`.

exit status: as `vmm run` for the guest; 10 when the pair cannot form (no
backup, a refused handshake, a replay that diverged); 11 when this side lost
the arbiter to its peer and stopped; 2 for a usage error.
"""


def parse_duration(text: str) -> float:
    """'100ms', '0.5s', '2' (seconds) -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|us)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 100ms, 0.5s)")
    v = float(m.group(1)) * {"ms": 1e-3, "us": 1e-6, "s": 1.0, None: 1.0}[m.group(2)]
    return v


def add_ft_parser(sub) -> None:
    from tools.cli import add_machine_options

    ft = sub.add_parser("ft", help="lockstep fault tolerance: a primary and a backup that takes over",
                        description="Run a guest as a fault-tolerant pair of processes.",
                        epilog=FT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    fsub = ft.add_subparsers(dest="ft_command", metavar="SUBCOMMAND")
    p = fsub.add_parser("primary", help="run the guest, streaming its log to a backup",
                        epilog=FT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_machine_options(p)
    p.add_argument("--backup", required=True, metavar="HOST:PORT", help="the backup's --listen address")
    _common(p)
    p.add_argument("--max-lag", type=parse_duration, default=0.02, metavar="DURATION",
                   help="the most virtual time the backup's replay may be behind (default 20ms); it is "
                        "what a takeover replays after the primary's death, so it bounds the failover time")
    p.add_argument("--connect-timeout", type=parse_duration, default=30.0, metavar="SECONDS",
                   help="how long to keep trying to reach the backup (default 30)")
    b = fsub.add_parser("backup", help="replay a primary's log live and take over when it dies",
                        epilog=FT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--listen", default=None, metavar="[HOST:]PORT", help="where the primary connects")
    b.add_argument("--join", default=None, metavar="HOST:PORT",
                   help="instead of --listen: join a primary that runs alone (its backup died), at its "
                        "console address; it sends the machine's state and lockstep resumes")
    b.add_argument("--image", default=None, metavar="PATH",
                   help="this host's copy of the image (default: the primary's path, or the bundled guest)")
    b.add_argument("--drive-file", dest="drive_files", action="append", default=[], metavar="NAME=PATH",
                   help="this host's copy of the primary's disk NAME (ide0.0, virtio0, ...; default: the "
                        "primary's path); it must hold what the primary's did when its run began")
    b.add_argument("--exit-code", choices=["guest", "qemu"], default="guest")
    b.add_argument("--wait", type=parse_duration, default=None, metavar="SECONDS",
                   help="give up when no primary connects within this time (default: wait)")
    from tools import cli_net

    cli_net.add_nic_options(b)     # the backends this side's cards join once it is live
    _common(b)
    a = fsub.add_parser("arbiter", help="an arbiter process: atomic test-and-set leases for pairs "
                        "(--arbiter tcp:HOST:PORT)")
    a.add_argument("--listen", required=True, metavar="[HOST:]PORT", help="where the pairs ask")
    a.add_argument("--state", default=None, metavar="FILE",
                   help="a journal of the leases won, fsynced before each answer (a restarted arbiter "
                        "forgets none); default: memory only")
    st = fsub.add_parser("status", help="the live side's role, lag, log bandwidth and last acknowledged horizon and icount")
    st.add_argument("address", metavar="HOST:PORT", help="the pair's console address")
    c = fsub.add_parser("console", help="a console client that follows a pair across a failover")
    c.add_argument("address", nargs="+", metavar="HOST:PORT")
    c.add_argument("--timeout", type=parse_duration, default=30.0, metavar="SECONDS",
                   help="how long to keep reconnecting after the console goes away (default 30)")


def _common(p) -> None:
    p.add_argument("--console", default=None, metavar="[HOST:]PORT",
                   help="the console endpoint (default on the primary 127.0.0.1 and a free port; "
                        "on the backup: the primary's address)")
    p.add_argument("--arbiter", default=None, metavar="PATH|tcp:HOST:PORT[/NAME]",
                   help="a lock file on storage both sides reach (it must not exist when the pair "
                        "starts), or a lease NAME (default ft) of a `vmm ft arbiter` process")
    p.add_argument("--heartbeat", type=parse_duration, default=0.05, metavar="SECONDS",
                   help="heartbeat interval; 3 missed ones are a failure (default 50ms)")
    p.add_argument("--linger", type=parse_duration, default=10.0, metavar="SECONDS",
                   help="after the guest ends, how long to wait for console clients to read the rest "
                        "(default 10)")


def cmd_ft(args) -> int:
    from tools.cli import UsageError

    if args.ft_command == "primary":
        return _primary(args)
    if args.ft_command == "backup":
        return _backup(args)
    if args.ft_command == "console":
        return _console_client(args)
    if args.ft_command == "status":
        return _status(args)
    if args.ft_command == "arbiter":
        return _arbiter(args)
    raise UsageError("ft needs a subcommand: primary, backup, console, status or arbiter")


def _say(role: str):
    def say(msg: str) -> None:
        print(f"vmm ft {role}: {msg}", file=sys.stderr, flush=True)
    return say


def _addr(text: str | None, what: str, default=("127.0.0.1", 0)):
    from replay.ft.wire import parse_hostport
    from tools.cli import UsageError

    if text is None:
        return default
    try:
        return parse_hostport(text, what)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_heartbeat(args) -> None:
    from replay.ft.arbiter import parse_tcp
    from tools.cli import UsageError

    if not 0.001 <= args.heartbeat <= 60:
        raise UsageError("--heartbeat must be between 1ms and 60s")
    if args.arbiter and args.arbiter.startswith("tcp:"):
        try:
            parse_tcp(args.arbiter)
        except ValueError as e:
            raise UsageError(str(e)) from None


def _primary(args) -> int:
    from replay.ft.console import ConsoleServer
    from replay.ft.primary import FLUSH_TICKS, Fenced, FtError, LinkSink, Primary
    from replay.session import VMM_VERSION, ReplayError, record
    from tools import cli_net
    from tools.cli import UsageError, _cmdline, _exit_status, _initrd, _load_image
    from vmm.firmware.boot import BootError
    from vmm.platform.pc import DEFAULT_EPOCH

    for opt, default in (("serial", "stdio"), ("input", None), ("restore", None), ("save_at", None)):
        if getattr(args, opt) != default:
            raise UsageError(f"vmm ft primary: --{opt.replace('_', '-')} is not for a pair "
                             f"(the console is --console)")
    from tools import cli_disk
    from tools.cli_bios import bios_image, bios_quantum

    _check_heartbeat(args)
    max_lag = int(args.max_lag * 1e8)
    if max_lag < 4 * FLUSH_TICKS:
        raise UsageError(f"--max-lag must be at least {4 * FLUSH_TICKS / 1e5:g}ms of virtual time")
    backup = _addr(args.backup, "--backup")
    path, data = bios_image(args, UsageError) if args.bios else _load_image(args)
    # the disks, with their hashes: the backup checks its copies against them before the first
    # instruction; each side keeps the guest's writes in an overlay of its own (as a recording does)
    drives = cli_disk.drives_from_args(args, with_hash=True, recording=True)
    say = _say("primary")
    ref: dict = {}
    console = ConsoleServer("primary")     # the Primary stamps its output (Primary.stamp)
    try:
        chost, cport = console.listen(*_addr(args.console, "--console"))
    except OSError as e:
        raise UsageError(f"cannot serve the console on {args.console}: {e.strerror}") from None
    say(f"console on {chost}:{cport} (`vmm ft console {chost}:{cport}`)")
    p = Primary(backup, console, heartbeat=args.heartbeat, max_lag=max_lag, arbiter=args.arbiter, say=say)

    def setup(m) -> None:
        ref["m"] = m
        cli_net.connect(m, args)       # the NICs' backends; the primary holds their frames (netgate)
        p.setup(m)

    t0 = time.perf_counter()
    try:
        p.connect(args.connect_timeout, {"vmm_version": VMM_VERSION, "console": [chost, cport]})
        res, m = record(path, data, LinkSink(p), mem_size=args.mem,
                        epoch=DEFAULT_EPOCH if args.rtc_epoch is None else args.rtc_epoch,
                        boot_kind=args.boot, cmdline=_cmdline(args, data), load_addr=args.load_addr,
                        live_input=console.poll_input, input_kind="ft", max_instructions=args.max_instructions,
                        serial=console, pace_idle=True, setup=setup, mmu=args.mmu, vcpus=args.smp,
                        initrd=_initrd(args), debug_exit=args.debug_exit, on_writer=p.on_writer,
                        nics=cli_net.nics_from_args(args), drives=drives, quantum=bios_quantum(args),
                        platform=args.machine)
        if p.fenced:
            raise Fenced()
        dt = time.perf_counter() - t0
        status = _exit_status(res, args)
        p.finish(status, args.linger)
    except FtError as e:
        print(f"vmm ft primary: error: {e}", file=sys.stderr)
        return EXIT_FT_REFUSED
    except Fenced:
        console.stop()
        return EXIT_FT_FENCED
    except BootError as e:
        raise UsageError(str(e)) from None
    except ReplayError as e:
        raise UsageError(str(e)) from None
    finally:
        console.stop()
        if "m" in ref:
            cli_net.close(ref["m"])
            cli_disk.close(ref["m"])
    if args.stats:
        _primary_stats(p, res, dt, m)
    return status


def _primary_stats(p, res, dt: float, m) -> None:
    s = p.stats
    guest_s = m.clock.now() / 1e8
    lags = sorted(s.lag_samples) or [0]

    def pct(q: float) -> float:
        return lags[min(len(lags) - 1, int(q * len(lags)))] / 1e5

    print(f"vmm ft primary: {res.icount:,} instructions in {dt:.2f} s ({res.icount / max(dt, 1e-9) / 1e6:.1f} MIPS), "
          f"guest {guest_s:.3f} s; log {s.log_bytes:,} bytes ({s.log_bytes / max(guest_s, 1e-9):,.0f} B per guest s); "
          f"lag ms p50 {pct(0.5):.2f} p99 {pct(0.99):.2f} max {lags[-1] / 1e5:.2f}; "
          f"max-lag waits {s.waits} ({s.wait_seconds:.3f} s); {s.outcome}", file=sys.stderr)


def _backup(args) -> int:
    from replay.ft.backup import Backup
    from replay.ft.primary import Fenced, FtError
    from tools.cli import UsageError, _exit_status

    _check_heartbeat(args)
    if (args.listen is None) == (args.join is None):
        raise UsageError("vmm ft backup needs --listen [HOST:]PORT (a new pair) or --join HOST:PORT "
                         "(a primary that runs alone), one of the two")
    listen = _addr(args.listen, "--listen") if args.listen else None
    join = _addr(args.join, "--join") if args.join else None
    image = None
    if args.image:
        from vmm.firmware.imagefile import read_file

        try:
            image = read_file(args.image)     # a regular file of an image's size, checked before reading
        except OSError as e:
            raise UsageError(f"cannot read image {args.image}: {e.strerror}") from None
    drive_files = {}
    for spec in args.drive_files:
        name, eq, file = spec.partition("=")
        if not eq or not name or not file:
            raise UsageError(f"--drive-file wants NAME=PATH (a drive name such as ide0.0), not {spec!r}")
        drive_files[name] = file
    say = _say("backup")
    from tools import cli_net

    reqs = cli_net.requests_from_args(args)
    b = Backup(listen, image=image, arbiter=args.arbiter,
               console=_addr(args.console, "--console") if args.console else None,
               heartbeat=args.heartbeat, say=say,
               nics=(len(reqs), lambda m: _connect_nics(m, args)) if reqs else None, drive_files=drive_files)
    if listen is not None:
        try:
            host, port = b.bind()
        except OSError as e:
            raise UsageError(f"cannot listen on {args.listen}: {e.strerror}") from None
        say(f"waiting for a primary on {host}:{port}")
    try:
        if join is not None:
            r = b.join(join, wait=30.0 if args.wait is None else args.wait, linger=args.linger)
        else:
            r = b.serve(wait=args.wait, linger=args.linger)
    except FtError as e:
        print(f"vmm ft backup: error: {e}", file=sys.stderr)
        return EXIT_FT_REFUSED
    except Fenced:
        return EXIT_FT_FENCED
    if r.outcome == "primary-finished":
        say(f"the primary finished; the replay ended the same way at icount {r.result.icount:,}")
    elif r.detected_after is not None:
        say(f"failure detected {r.detected_after * 1e3:.0f} ms after the primary was last heard")
    return _exit_status(r.result, args)


def _arbiter(args) -> int:
    from replay.ft.arbiter import ArbiterServer
    from tools.cli import UsageError

    host, port = _addr(args.listen, "--listen")
    say = _say("arbiter")
    try:
        srv = ArbiterServer(host, port, state=args.state, say=say)
    except OSError as e:
        what = f"cannot read the journal {args.state}" if e.filename else f"cannot listen on {args.listen}"
        raise UsageError(f"{what}: {e.strerror}") from None
    say(f"listening on {srv.address[0]}:{srv.address[1]} ({len(srv.leases)} lease(s) held"
        + (f", journal {args.state})" if args.state else ", in memory)"))
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.close()
    return 0


def _connect_nics(m, args) -> None:
    """A backup going live: its cards join the backends of its --nic options (ValueError, one line)."""
    from tools import cli_net
    from tools.cli import UsageError

    try:
        cli_net.connect(m, args)
    except UsageError as e:
        raise ValueError(str(e)) from None


def _status(args) -> int:
    from replay.ft.console import query_status

    host, port = _addr(args.address, "status address")
    try:
        st = query_status(host, port)
    except (OSError, ValueError) as e:
        print(f"vmm ft status: no live side answers on {host}:{port} ({e})", file=sys.stderr)
        return EXIT_FT_REFUSED
    for k in sorted(st):
        print(f"{k}: {st[k]}")
    return 0


def _console_client(args) -> int:
    import threading

    from replay.ft.console import ConsoleClient

    addrs = [_addr(a, "console address") for a in args.address]
    out = sys.stdout.buffer
    shown = [0]

    def on_output(c) -> None:
        out.write(bytes(c.transcript[shown[0]:]))
        out.flush()
        shown[0] = len(c.transcript)

    client = ConsoleClient(addrs, on_output)

    def pump() -> None:
        import os

        while True:
            data = os.read(sys.stdin.fileno(), 4096)
            if not data:
                return
            client.type(data)

    threading.Thread(target=pump, daemon=True).start()
    try:
        return client.run(timeout=1e9, reconnect_for=args.timeout)
    except TimeoutError as e:
        print(f"vmm ft console: {e}", file=sys.stderr)
        return EXIT_FT_REFUSED
