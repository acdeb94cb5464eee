"""The `vmm` command line as people used to QEMU meet it (issue 15).

* QEMU's spellings beside the long options (`QEMU_TABLE`, shown in `vmm run
  --help` and in the README): aliases of the same argparse actions where the
  long option exists, and -s/-S/-nographic/-no-reboot/--input-to here.
* `vmm --version`; an unknown option is reported with the usage of the
  subcommand it was given to (`parse_args`).
* `find_image`: a bundled guest by bare name only; anything else is a path.
* Console input: the terminal, a pipe on stdin, `--input -` or `--input
  FILE` (`live_input`); typed input goes to COM1 when the console is COM1
  (`-serial stdio` / `-nographic`, QEMU's rule), else where the boot kind
  says, unless `--input-to` chooses.
* `Progress`: one line on stderr, only when stderr is a terminal, erased
  before any guest output reaches the terminal (so the two never share a
  line) and at the end.
* `serve_gdb`: `vmm run --gdb`/-s/-S in a terminal: the terminal stays cooked
  (Ctrl-C works) until gdb connects, keys typed while waiting are discarded,
  the port closes once the guest has ended; -s without -S runs the guest
  and lets gdb attach whenever it likes.
"""
from __future__ import annotations

import argparse
import os
import select
import sys
import time

GDB_DEFAULT = "127.0.0.1:1234"

# (QEMU's form, vmm's long form, what it does here)
QEMU_TABLE: list[tuple[str, str, str]] = [
    ("-m SIZE", "--mem SIZE", "guest RAM; a bare number is MiB, as QEMU's"),
    ("-smp N", "--smp N", "number of vCPUs"),
    ("-kernel FILE", "--kernel FILE", "boot a Linux bzImage (or any IMAGE) directly"),
    ("-initrd FILE", "--initrd FILE", "initial ramdisk for -kernel"),
    ("-append TEXT", "--cmdline TEXT", "kernel command line (also --append)"),
    ("-hda FILE", "--drive file=FILE,if=ide,index=0", "first IDE disk"),
    ("-hdb FILE", "--drive file=FILE,if=ide,index=1", "second IDE disk"),
    ("-cdrom FILE", "--drive file=FILE,media=cdrom", "IDE CD-ROM"),
    ("-drive SPEC", "--drive SPEC", "a drive: file=,if=,media=,format=,index=,readonly=,snapshot="),
    ("-serial DEV", "--serial DEV", "where COM1 goes: stdio, none, tcp:[HOST:]PORT or a file"),
    ("-serial mon:stdio", "--serial stdio", "COM1 on the terminal (vmm has no monitor to multiplex)"),
    ("-nographic", "--serial stdio --input-to serial", "COM1 on the terminal, typed input to COM1"),
    ("-s", "--gdb :1234", "gdb stub on 127.0.0.1:1234; the guest runs until gdb attaches"),
    ("-gdb tcp::PORT", "--gdb :PORT", "gdb stub on PORT; the guest runs until gdb attaches (unless -S)"),
    ("-S", "--gdb (waits)", "with -s: wait for gdb before the first instruction (--gdb always waits)"),
    ("-no-reboot", "(always)", "a guest reset ends the run (vmm never reboots)"),
]

# vmm long option -> QEMU alias (same argparse action)
_ALIASES = {"--mem": "-m", "--smp": "-smp", "--kernel": "-kernel", "--initrd": "-initrd",
            "--cmdline": "-append", "--serial": "-serial"}

INPUT_TO = ("serial", "keyboard")


class _Default(str):
    """A default that can be told from the same value given on the command line."""


def _table_text() -> str:
    w = max(len(q) for q, _, _ in QEMU_TABLE)
    v = max(len(o) for _, o, _ in QEMU_TABLE)
    lines = ["QEMU's options (accepted as QEMU spells them):", f"  {'QEMU':<{w}}  {'vmm':<{v}}  meaning"]
    lines += [f"  {q:<{w}}  {o:<{v}}  {m}" for q, o, m in QEMU_TABLE]
    return "\n".join(lines) + "\n"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _alias(parser: argparse.ArgumentParser, long: str, short: str) -> None:
    action = parser._option_string_actions.get(long)
    if action is None or short in parser._option_string_actions:
        return
    action.option_strings.append(short)
    parser._option_string_actions[short] = action


def _machine_habits(r: argparse.ArgumentParser, live: bool) -> None:
    for long, short in _ALIASES.items():
        _alias(r, long, short)
    serial = r._option_string_actions.get("--serial")
    if serial is not None:
        serial.default = _Default(serial.default)
    r.add_argument("-nographic", dest="nographic", action="store_true",
                   help="as QEMU's: COM1 on the terminal (--serial stdio) and typed input to COM1")
    r.add_argument("-no-reboot", dest="no_reboot", action="store_true",
                   help="as QEMU's: a guest reset ends the run (what vmm always does)")
    r.add_argument("--input-to", choices=INPUT_TO, default=None,
                   help="where console input goes: COM1 (serial) or the PS/2 keyboard; default as QEMU: "
                        "COM1 with -serial stdio or -nographic, else the keyboard for boot sectors and "
                        "COM1 for kernels")
    if live:
        r.add_argument("-s", dest="gdb_s", action="store_true",
                       help=f"as QEMU's: a gdb stub on {GDB_DEFAULT}; the guest runs until gdb attaches")
        r.add_argument("-gdb", dest="gdb_dev", default=None, metavar="tcp:[HOST]:PORT",
                       help="as QEMU's: a gdb stub on this port (-s is -gdb tcp::1234); the guest runs "
                            "until gdb attaches, unless -S")
        r.add_argument("-S", dest="gdb_S", action="store_true",
                       help="as QEMU's: with -s, wait for gdb before the first instruction")
    r.epilog = _table_text() + "\n" + (r.epilog or "")


def extend_parser(p: argparse.ArgumentParser) -> None:
    """Add --version, QEMU's spellings and --input-to to the parser tools.cli builds."""
    from replay.session import VMM_VERSION

    p.add_argument("--version", action="version", version=f"vmm {VMM_VERSION}")
    subs = _subparsers(p)
    for name in ("run", "record"):
        if name in subs:
            _machine_habits(subs[name], live=name == "run")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None):
    """parser.parse_args, except that an unknown option is reported with the usage of
    the (innermost) subcommand it was given to; then `apply`."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        target = parser
        while True:
            action = next((a for a in target._actions if isinstance(a, argparse._SubParsersAction)), None)
            sub = action.choices.get(getattr(args, action.dest, None) or "") if action is not None else None
            if sub is None:
                break
            target = sub
        target.error(f"unrecognized arguments: {' '.join(extras)}")
    return apply(args)


def apply(args):
    """Resolve the QEMU spellings into the options the rest of the CLI reads."""
    if not hasattr(args, "serial") or not hasattr(args, "input_to"):
        return args
    if args.serial == "mon:stdio":         # QEMU's serial and monitor on stdio: vmm has no monitor
        args.serial = "stdio"
    if getattr(args, "nographic", False):
        if isinstance(args.serial, _Default):
            args.serial = "stdio"
        if args.input_to is None:
            args.input_to = "serial"
    if args.input_to is None and args.serial == "stdio" and not isinstance(args.serial, _Default):
        args.input_to = "serial"           # QEMU's -serial stdio: the console is COM1
    if hasattr(args, "gdb_s"):
        qemu_dev = args.gdb_dev
        if qemu_dev is not None:
            if not qemu_dev.startswith("tcp:"):
                raise SystemExit(_usage_error(f"-gdb wants tcp:[HOST]:PORT, not {qemu_dev!r}"))
            qemu_dev = qemu_dev[4:]
        elif args.gdb_s:
            qemu_dev = GDB_DEFAULT
        if args.gdb_S and qemu_dev is None and args.gdb is None:
            raise SystemExit(_usage_error("-S waits for gdb: give -s, -gdb or --gdb [HOST:]PORT with it"))
        if qemu_dev is not None and args.gdb is None:
            args.gdb = qemu_dev
            args.gdb_wait = bool(args.gdb_S)    # QEMU's -s/-gdb: the guest runs unless -S
        else:
            args.gdb_wait = True                # --gdb: always waits for gdb
    return args


def _usage_error(msg: str) -> int:
    print(f"vmm run: error: {msg}", file=sys.stderr)
    return 2


# -- images ---------------------------------------------------------------------------------

def find_image(name: str) -> str | None:
    """The file an IMAGE argument names: an existing path, or a bundled guest by its bare
    name (`demo`, `hello`); None for anything else (a missing path is never a guest)."""
    if os.path.exists(name):
        return name
    from guests.build import GUESTS, guest_path

    if name in GUESTS:
        return str(guest_path(name))
    return None


# -- console input ------------------------------------------------------------------------------

class _StdinPipe:
    """Non-blocking reads of a pipe or file on fd 0, up to its end."""

    def __init__(self, fd: int = 0):
        self.fd = fd
        self.eof = False

    def poll_input(self) -> bytes:
        if self.eof:
            return b""
        try:
            ready, _, _ = select.select([self.fd], [], [], 0)
            if not ready:
                return b""
            data = os.read(self.fd, 4096)
        except (OSError, ValueError):
            data = b""
        if not data:
            self.eof = True
        return data


def _stdin_is_terminal() -> bool:
    try:
        return os.isatty(0)
    except OSError:
        return False


def live_input(args, stdio, usage_error):
    """(input kind, source) for a live run or a recording: `--input FILE`, `--input -`
    (stdin), the terminal, a pipe on stdin when COM1 is on stdio, a socket client, or nothing."""
    spec = args.input
    if spec == "-":
        if stdio is not None and getattr(stdio, "in_fd", None) == 0:
            return ("terminal" if stdio.is_tty else "pipe"), stdio.poll_input
        if _stdin_is_terminal():
            raise usage_error("--input - reads a pipe or file on stdin; without --serial stdio the terminal "
                              "is not read")
        return "pipe", _StdinPipe().poll_input
    if spec:
        from replay.logfile import MAX_EVENT_PAYLOAD
        from vmm.firmware.imagefile import read_file

        try:
            # a regular file, size checked before reading: it is fed (and recorded) as one console
            # event, whose payload the log format bounds
            script = [read_file(spec, MAX_EVENT_PAYLOAD, "console input")]
        except OSError as e:
            raise usage_error(f"cannot read input file {spec}: {e.strerror}") from None
        return "file", lambda: script.pop() if script else b""
    if stdio is None:
        return "none", None
    if getattr(stdio, "in_fd", None) is None:      # a socket client
        return "terminal", stdio.poll_input
    if stdio.is_tty:
        return "terminal", stdio.poll_input
    return "pipe", stdio.poll_input               # `printf x | vmm run k.elf`, as QEMU's -serial stdio


# -- statistics ---------------------------------------------------------------------------------

def io_stats(m) -> str:
    """Port I/O and MMIO accesses the vCPUs made (each is a VM exit to the VMM's device model)."""
    eng = m.vcpu.engine
    return f"port I/O {int(eng._core.io_count)}, MMIO {int(eng.mmio_accesses)}"


def trace_size(size: int) -> int:
    """Unicorn reports an invalid opcode with a size of 0xF1F1F1F1: read at most one instruction."""
    return size if 0 < size <= 15 else 15


# -- progress -------------------------------------------------------------------------------------

class Progress:
    """One progress line on stderr (a terminal only), refreshed every `interval` host seconds
    (VMM_PROGRESS_INTERVAL, default 2), erased before guest output and when a run returns.

    Display only: the check runs on a virtual-time timer like the input poll, and the guest
    never sees it."""

    TICKS = 1_000_000    # virtual time between looks at the host clock (10 ms)

    def __init__(self, m, label: str, total=None, stream=None):
        self.m = m
        self.label = label
        self.total = total
        self.err = stream or sys.stderr
        self.shown = False
        self.enabled = self.err.isatty()
        try:
            self.interval = float(os.environ.get("VMM_PROGRESS_INTERVAL", "2"))
        except ValueError:
            self.interval = 2.0
        self.t0 = self.t = time.perf_counter()
        if not self.enabled:
            return
        self._wrap_outputs()
        run = m.run

        def run_then_erase(*args, **kwargs):    # whatever vmm prints after a run starts a clean line
            try:
                return run(*args, **kwargs)
            finally:
                self.erase()
        m.run = run_then_erase
        m.clock.schedule_in(self.TICKS, self._tick, "progress")

    def _wrap_outputs(self) -> None:
        m = self.m
        shown = m.on_console_output
        if shown is not None:
            def console(data: bytes) -> None:
                self.erase()
                shown(data)
            m.on_console_output = console
        com1 = getattr(m, "com1", None)
        backend = getattr(com1, "backend", None)
        if backend is not None and getattr(backend, "out_fd", None) is not None:
            write = backend.write

            def serial(data: bytes) -> None:
                self.erase()
                write(data)
            backend.write = serial

    def _tick(self, now: int) -> None:
        t = time.perf_counter()
        if self.m.trace is not None:      # --trace: its lines on stderr are the progress
            self.enabled = False
            return
        if t - self.t >= self.interval:
            self.t = t
            self.show()
        self.m.clock.schedule_in(self.TICKS, self._tick, "progress")

    def _total(self) -> int | None:
        """The total, asked for when first shown (a replay's needs the log read to its END)."""
        if callable(self.total):
            try:
                self.total = self.total()
            except Exception:  # noqa: BLE001 - a damaged log: the replay itself will say so
                self.total = None
        return self.total

    def line(self) -> str:
        ic = self.m.icount
        total = self._total()
        dt = max(time.perf_counter() - self.t0, 1e-9)
        pct = f" ({100 * ic / total:.1f}%)" if total else ""
        return (f"vmm: {self.label} {ic:,}" + (f" of {total:,}" if total else "")
                + f" instructions{pct}, guest {self.m.clock.now() / 1e8:.2f} s, {ic / dt / 1e6:.1f} MIPS")

    def show(self) -> None:
        if not self.enabled:
            return
        self.err.write("\r\x1b[K" + self.line())
        self.err.flush()
        self.shown = True

    def erase(self) -> None:
        if self.shown:
            self.shown = False
            self.err.write("\r\x1b[K")
            self.err.flush()

    def close(self) -> None:
        self.erase()
        self.enabled = False


# -- gdb on a live run, from a terminal ------------------------------------------------------------

def gdb_hint() -> str:
    """Where the shipped gdb commands are (tools/vmm.gdb), for the waiting message."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vmm.gdb")
    return f"\nvmm: gdb commands (vmm-seek, vmm-icount, vmm-refresh): source {path}" if os.path.exists(path) else ""


def symbols_hint(image: str | None) -> str:
    """The gdb symbol file of a bundled guest (guests/build/NAME.sym, guests/symbols.py),
    for the waiting message."""
    from guests.build import BUILD_DIR

    path = find_image(image) if image else None
    if path is None:
        return ""
    sym = os.path.splitext(os.path.realpath(path))[0] + ".sym"
    if os.path.dirname(sym) != str(BUILD_DIR) or not os.path.exists(sym):
        return ""
    return f"\nvmm: guest symbols: symbol-file {sym}"


def _gdb_stub_class():
    from replay.gdbstub import GdbStub

    class TerminalGdbStub(GdbStub):
        """A GdbStub that hands the terminal to the guest only while gdb is connected:
        cooked (Ctrl-C works) while waiting, raw once gdb is there, and whatever was
        typed while waiting is discarded rather than fed to the guest later."""

        def __init__(self, target, host, port, stdio):
            super().__init__(target, host, port)
            self.stdio = stdio

        def _accept(self):
            sock = super()._accept()
            if sock is not None and self.stdio is not None:
                _take_terminal(self.stdio)
            return sock

        def serve_one(self) -> bool:
            try:
                return super().serve_one()
            finally:
                _release_terminal(self.stdio)

    return TerminalGdbStub


def _release_terminal(stdio) -> None:
    """Give the terminal back to the user as it was (a socket console has none)."""
    restore = getattr(stdio, "restore_terminal", None)
    if restore is not None:
        restore()


def _take_terminal(stdio) -> None:
    """Discard typed-ahead input and put the terminal in raw mode for the guest."""
    import termios

    if getattr(stdio, "in_fd", None) is None or not getattr(stdio, "is_tty", False):
        return
    try:
        termios.tcflush(stdio.in_fd, termios.TCIFLUSH)
    except (termios.error, OSError):
        pass
    if not stdio.closed and stdio._saved_attrs is None:
        stdio._enter_raw(False)


def serve_gdb(m, args, stdio, parse_hostport, usage_error, exit_status) -> int:
    """`vmm run --gdb [HOST:]PORT` or `-s -S` (wait for gdb before the first instruction),
    or `-s` / `-gdb tcp::PORT` without -S (the guest runs at once; gdb may attach at any
    time and finds it stopped where it was).  When gdb detaches, the guest runs on and gdb
    may attach again, as with QEMU; the port closes once the guest has ended."""
    from replay.debugtarget import LiveTarget

    host, port = parse_hostport(args.gdb)
    target = LiveTarget(m)
    try:
        stub = _gdb_stub_class()(target, host, port, stdio)
    except OSError as e:
        raise usage_error(f"cannot listen on {host}:{port}: {e.strerror}") from None
    wait = getattr(args, "gdb_wait", True)
    try:
        if wait:
            _release_terminal(stdio)            # cooked until gdb connects: Ctrl-C ends the wait
            print(f"vmm: waiting for gdb: target remote {stub.host}:{stub.port} (Ctrl-C quits)"
                  + gdb_hint() + symbols_hint(getattr(args, "image", None)), file=sys.stderr, flush=True)
        else:
            print(f"vmm: gdb may attach at any time: target remote {stub.host}:{stub.port}" + gdb_hint()
                  + symbols_hint(getattr(args, "image", None)), file=sys.stderr, flush=True)
        while True:
            if not wait:
                if stdio is not None:
                    _take_terminal(stdio)
                res = _run_until_gdb(m, stub, args)
                if res is not None:
                    return exit_status(res, args)
            if not stub.serve_one() or target.exited is not None or stub.killed:
                break
            wait = False                        # detached: the guest runs on
    finally:
        stub.close()
    if target.exited is not None:
        return exit_status(target.exited, args)
    return 0


def _run_until_gdb(m, stub, args):
    """Run the guest until it ends (its RunResult) or a gdb connects (None)."""
    from vmm.machine import StopReason

    state = {"attached": False}
    listener = stub._listener

    def look(now: int) -> None:
        try:
            ready, _, _ = select.select([listener], [], [], 0)
        except (OSError, ValueError):
            ready = []
        if ready:
            state["attached"] = True
            m.request_host_stop("gdb attached")
        else:
            m.clock.schedule_in(Progress.TICKS, look, "gdb-attach")

    m.clock.schedule_in(Progress.TICKS, look, "gdb-attach")
    res = m.run(args.max_instructions)
    if state["attached"] and res.reason is StopReason.HOST:
        return None
    return res
