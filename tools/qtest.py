"""A qtest-style harness: drive the PC's devices by port and memory accesses, with no guest.

After QEMU's qtest (docs/devel/qtest.rst): the machine is built but its vCPU
never runs; the test plays the CPU.  It does port I/O, reads and writes the
physical address space (MMIO regions, else RAM), moves the virtual clock by
hand, looks at the interrupt controller's input lines and INTR output, and
runs INTA cycles.

    from tools.qtest import QTest
    q = QTest.pc()                       # a vmm.platform.pc.PcMachine, not running
    q.outb(0x43, 0x34); q.outb(0x40, 0xA9); q.outb(0x40, 0x04)   # PIT ch0: mode 2, 1193
    q.clock_step(1_000_000)              # 10 ms of virtual time; timers fire in order
    q.irq_level(0), q.intr(), q.ack()    # IRQ0 line, INTR pin, INTA -> vector 0x08

Time.  The machine's clock counts retired instructions plus skipped idle
time; with no vCPU running the instruction count stays put, so the harness
moves time the way the run loop does while the guest halts:
``clock.skip_idle_to(deadline)`` then ``clock.fire_due()``, one deadline at
a time, so every timer fires at exactly its tick and in scheduling order.

Script mode::

    python -m tools.qtest SCRIPT [--mem SIZE] [--echo]    (SCRIPT "-" reads stdin)

One command a line; ``#`` starts a comment.  Numbers are decimal or 0x hex.
Each command prints one reply, as QEMU's qtest protocol does: ``OK`` or
``OK <value>``.  A line that cannot be parsed stops the script before anything
runs, with ``qtest: SCRIPT:LINE: message`` on stderr and exit status 2; a
failed ``expect`` exits 1.  Commands:

    outb|outw|outl PORT VALUE        port write
    inb|inw|inl PORT                 port read            -> OK 0x..
    writeb|writew|writel|writeq ADDR VALUE                 physical write
    readb|readw|readl|readq ADDR     physical read        -> OK 0x..
    memwrite ADDR HEXBYTES           bytes into RAM (e.g. 0x0102ff)
    memread ADDR LEN                 bytes from RAM       -> OK 0x0102ff
    clock_step [TICKS]               advance time (default: to the next timer) -> OK <now>
    clock_set TICK                   advance time to TICK -> OK <now>
    irq_level N                      level of 8259 input N (0-15) -> OK 0|1
    irq_set N 0|1                    drive 8259 input N
    intr                             the 8259 pair's INTR output -> OK 0|1
    ack                              one INTA cycle       -> OK <vector>
    serial_in TEXT                   bytes arriving on COM1: the rest of the line, # included
                                     (Python escapes: \\n, \\x00)
    serial_out                       what COM1 sent so far -> OK 'text' (Python repr)
    expect VALUE                     the previous reply's value must equal VALUE
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devices.base import SIZE_MASK

U64 = (1 << 64) - 1


class QTest:
    """The CPU side of a machine whose vCPU never runs."""

    def __init__(self, machine) -> None:
        self.m = machine
        self.clock = machine.clock

    @classmethod
    def pc(cls, mem_size: int = 32 << 20, **config) -> QTest:
        """A fresh PcMachine (see vmm.platform.pc.PcConfig for ``config``), built and not running.

        Serial output is collected (``serial_output()``) unless ``serial=`` is given.
        """
        from host.serial import BufferBackend
        from vmm.platform.pc import PcConfig, PcMachine

        config.setdefault("serial", BufferBackend())
        return cls(PcMachine(PcConfig(mem_size=mem_size, **config)))

    # -- port I/O ----------------------------------------------------------------------
    def _out(self, port: int, size: int, value: int) -> None:
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port:#x} is outside 0..0xffff")
        if not 0 <= value <= SIZE_MASK[size]:
            raise ValueError(f"value {value:#x} does not fit in {size} byte(s)")
        self.m.io.write(port, size, value)

    def _in(self, port: int, size: int) -> int:
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port:#x} is outside 0..0xffff")
        return self.m.io.read(port, size)

    def outb(self, port: int, value: int) -> None:
        self._out(port, 1, value)

    def outw(self, port: int, value: int) -> None:
        self._out(port, 2, value)

    def outl(self, port: int, value: int) -> None:
        self._out(port, 4, value)

    def inb(self, port: int) -> int:
        return self._in(port, 1)

    def inw(self, port: int) -> int:
        return self._in(port, 2)

    def inl(self, port: int) -> int:
        return self._in(port, 4)

    # -- the physical address space ----------------------------------------------------------
    def _write(self, addr: int, size: int, value: int) -> None:
        if not 0 <= value <= SIZE_MASK[size]:
            raise ValueError(f"value {value:#x} does not fit in {size} byte(s)")
        if self.m.mmio.find(addr) is not None:
            self.m.mmio.write(addr, size, value)
        else:
            self.memwrite(addr, value.to_bytes(size, "little"))

    def _read(self, addr: int, size: int) -> int:
        if self.m.mmio.find(addr) is not None:
            return self.m.mmio.read(addr, size)
        return int.from_bytes(self.memread(addr, size), "little")

    def writeb(self, addr: int, value: int) -> None:
        self._write(addr, 1, value)

    def writew(self, addr: int, value: int) -> None:
        self._write(addr, 2, value)

    def writel(self, addr: int, value: int) -> None:
        self._write(addr, 4, value)

    def writeq(self, addr: int, value: int) -> None:
        self._write(addr, 8, value)

    def readb(self, addr: int) -> int:
        return self._read(addr, 1)

    def readw(self, addr: int) -> int:
        return self._read(addr, 2)

    def readl(self, addr: int) -> int:
        return self._read(addr, 4)

    def readq(self, addr: int) -> int:
        return self._read(addr, 8)

    def memread(self, addr: int, length: int) -> bytes:
        """Bytes of guest RAM (MMIO regions are not consulted)."""
        self._check_ram(addr, length)
        return bytes(self.m.memory.read(addr, length))

    def memwrite(self, addr: int, data: bytes) -> None:
        self._check_ram(addr, len(data))
        self.m.memory.write(addr, bytes(data))

    def _check_ram(self, addr: int, length: int) -> None:
        if addr < 0 or length < 0 or addr + length > self.m.memory.size:
            raise ValueError(f"{addr:#x}+{length:#x} is outside the {self.m.memory.size >> 20} MiB of RAM")

    # -- time ----------------------------------------------------------------------------------
    def now(self) -> int:
        """Guest time in ticks (10 ns each)."""
        return self.clock.now()

    def clock_set(self, tick: int) -> int:
        """Move time forward to ``tick``, firing every timer due on the way at its own tick.

        Returns the new time.  Time never goes backwards.
        """
        clock = self.clock
        if tick < clock.now():
            raise ValueError(f"clock_set({tick}): time is already {clock.now()}")
        while True:
            deadline = clock.next_deadline()
            if deadline is None or deadline > tick:
                break
            clock.skip_idle_to(deadline)
            clock.fire_due()
        clock.skip_idle_to(tick)
        clock.fire_due()
        return clock.now()

    def clock_step(self, ticks: int | None = None) -> int:
        """Advance time by ``ticks`` (or, with None, to the next timer's deadline); returns the new time."""
        if ticks is None:
            deadline = self.clock.next_deadline()
            if deadline is None:
                return self.clock.now()
            return self.clock_set(max(deadline, self.clock.now()))
        if ticks < 0:
            raise ValueError("clock_step: ticks must not be negative")
        return self.clock_set(self.clock.now() + ticks)

    # -- interrupts -------------------------------------------------------------------------------
    def irq_level(self, n: int) -> bool:
        """The level of 8259 input line ``n`` (IRQ0-15) as the devices drive it."""
        return bool(self.m.pic.irq_line(n).level)

    def irq_set(self, n: int, level: bool) -> None:
        """Drive 8259 input ``n`` as a device would."""
        self.m.pic.irq_line(n).set(bool(level))

    def intr(self) -> bool:
        """The interrupt controller's INTR output to the CPU."""
        return bool(self.m.pic.intr)

    def ack(self) -> int:
        """One INTA cycle, as the CPU does when it takes the interrupt: the vector."""
        return self.m.pic.acknowledge()

    # -- serial -------------------------------------------------------------------------------------
    def serial_output(self) -> bytes:
        """Everything COM1 has transmitted so far."""
        return bytes(self.m.serial_out)

    def serial_input(self, data: bytes) -> None:
        """Bytes arriving on COM1's receive line, now."""
        self.m.com1.receive(bytes(data))


# ---------------------------------------------------------------------------
# Script mode

class ScriptError(Exception):
    """A bad line (status 2) or a failed ``expect`` (status 1), with its line number."""

    def __init__(self, lineno: int, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.lineno = lineno
        self.message = message
        self.status = status


@dataclass
class Command:
    lineno: int
    text: str
    name: str
    args: list


def _num(token: str, what: str) -> int:
    try:
        v = int(token.replace("_", ""), 0)
    except ValueError:
        raise ValueError(f"{what} {token!r} is not a number") from None
    if v < 0:
        raise ValueError(f"{what} {token!r} is negative")
    return v


def _port(token: str) -> int:
    v = _num(token, "port")
    if v > 0xFFFF:
        raise ValueError(f"port {token} is outside 0..0xffff")
    return v


def _value(size: int) -> Callable[[str], int]:
    def parse(token: str) -> int:
        v = _num(token, "value")
        if v > SIZE_MASK[size]:
            raise ValueError(f"value {token} does not fit in {size} byte(s)")
        return v
    return parse


def _addr(token: str) -> int:
    v = _num(token, "address")
    if v > U64:
        raise ValueError(f"address {token} is above 2**64")
    return v


def _irq(token: str) -> int:
    v = _num(token, "IRQ")
    if v > 15:
        raise ValueError(f"IRQ {token} is outside 0..15")
    return v


def _level(token: str) -> int:
    if token not in ("0", "1"):
        raise ValueError(f"level {token!r} must be 0 or 1")
    return int(token)


def _hexbytes(token: str) -> bytes:
    t = token[2:] if token.lower().startswith("0x") else token
    try:
        return bytes.fromhex(t)
    except ValueError:
        raise ValueError(f"{token!r} is not a hex byte string (e.g. 0x0102ff)") from None


def _text(token: str) -> bytes:
    try:
        return ast.literal_eval("b'''" + token.replace("'''", "\\'\\'\\'") + "'''")
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"bad text {token!r}: {e}") from None


def _any(token: str) -> int:
    return _num(token, "value")


# name -> (argument parsers, optional trailing args, rest-of-line argument)
_SIZES = {"b": 1, "w": 2, "l": 4, "q": 8}
SPEC: dict[str, tuple[tuple[Callable[[str], object], ...], int, bool]] = {
    "clock_step": ((lambda t: _num(t, "ticks"),), 1, False),
    "clock_set": ((lambda t: _num(t, "tick"),), 0, False),
    "irq_level": ((_irq,), 0, False),
    "irq_set": ((_irq, _level), 0, False),
    "intr": ((), 0, False),
    "ack": ((), 0, False),
    "memread": ((_addr, lambda t: _num(t, "length")), 0, False),
    "memwrite": ((_addr, _hexbytes), 0, False),
    "serial_in": ((_text,), 0, True),
    "serial_out": ((), 0, False),
    "expect": ((_any,), 0, False),
}
for _s, _n in (("b", 1), ("w", 2), ("l", 4)):
    SPEC[f"out{_s}"] = ((_port, _value(_n)), 0, False)
    SPEC[f"in{_s}"] = ((_port,), 0, False)
for _s, _n in _SIZES.items():
    SPEC[f"write{_s}"] = ((_addr, _value(_n)), 0, False)
    SPEC[f"read{_s}"] = ((_addr,), 0, False)


def parse_script(text: str) -> list[Command]:
    """Parse every line; raise ScriptError (with the line number) for the first bad one."""
    commands = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("serial_in") else raw.strip()
        if not line:
            continue
        name, _, rest = line.partition(" ")
        spec = SPEC.get(name)
        if spec is None:
            raise ScriptError(lineno, f"unknown command {name!r} (known: {', '.join(sorted(SPEC))})")
        parsers, optional, rest_of_line = spec
        tokens = [rest.strip()] if rest_of_line and rest.strip() else rest.split()
        lo, hi = len(parsers) - optional, len(parsers)
        if not lo <= len(tokens) <= hi:
            want = f"{lo}" if lo == hi else f"{lo} to {hi}"
            raise ScriptError(lineno, f"{name} takes {want} argument(s), got {len(tokens)}")
        try:
            args = [p(t) for p, t in zip(parsers, tokens)]
        except ValueError as e:
            raise ScriptError(lineno, str(e)) from None
        commands.append(Command(lineno, line, name, args))
    return commands


def _hex(value: int, size: int) -> str:
    return f"0x{value:0{2 * size}x}"


def execute(q: QTest, commands: list[Command], out, echo: bool = False) -> None:
    """Run parsed commands, printing one reply each.

    Raises ScriptError with status 1 for a failed ``expect``, status 2 for a
    command the machine refuses (an address outside RAM, time going backwards).
    """
    last: int | None = None
    for c in commands:
        if echo:
            out.write(f"> {c.text}\n")
        try:
            last = _execute_one(q, c, out, last)
        except ValueError as e:
            raise ScriptError(c.lineno, str(e)) from None


def _execute_one(q: QTest, c: Command, out, last: int | None) -> int | None:
    """Run one command and print its reply; returns the value an ``expect`` after it sees."""
    n, a = c.name, c.args
    reply: str
    value: int | None = None
    if n in ("outb", "outw", "outl"):
        q._out(a[0], _SIZES[n[3]], a[1])
    elif n in ("inb", "inw", "inl"):
        size = _SIZES[n[2]]
        value = q._in(a[0], size)
        reply = _hex(value, size)
    elif n in ("writeb", "writew", "writel", "writeq"):
        q._write(a[0], _SIZES[n[5]], a[1])
    elif n in ("readb", "readw", "readl", "readq"):
        size = _SIZES[n[4]]
        value = q._read(a[0], size)
        reply = _hex(value, size)
    elif n == "memread":
        data = q.memread(a[0], a[1])
        reply = "0x" + data.hex()
        value = int.from_bytes(data, "big") if data else 0
    elif n == "memwrite":
        q.memwrite(a[0], a[1])
    elif n == "clock_step":
        value = q.clock_step(a[0] if a else None)
        reply = str(value)
    elif n == "clock_set":
        value = q.clock_set(a[0])
        reply = str(value)
    elif n == "irq_level":
        value = int(q.irq_level(a[0]))
        reply = str(value)
    elif n == "irq_set":
        q.irq_set(a[0], bool(a[1]))
    elif n == "intr":
        value = int(q.intr())
        reply = str(value)
    elif n == "ack":
        value = q.ack()
        reply = _hex(value, 1)
    elif n == "serial_in":
        q.serial_input(a[0])
    elif n == "serial_out":
        reply = repr(q.serial_output().decode("latin-1"))
    elif n == "expect":
        if last is None:
            raise ScriptError(c.lineno, "expect: the previous command returned no value")
        if last != a[0]:
            raise ScriptError(c.lineno, f"expected {a[0]:#x}, got {last:#x}", status=1)
    else:  # pragma: no cover - SPEC and this dispatch are kept in step
        raise ScriptError(c.lineno, f"unhandled command {n}")
    if value is not None or n == "serial_out":
        out.write(f"OK {reply}\n")
    else:
        out.write("OK\n")
    return last if n == "expect" else value


def main(argv: list[str] | None = None) -> int:
    from tools.cli import parse_size

    p = argparse.ArgumentParser(
        prog="python -m tools.qtest",
        description="Drive the PC's devices from a script of port/memory accesses and clock steps, "
                    "with no guest (after QEMU's qtest).",
        epilog="Commands: " + ", ".join(sorted(SPEC)) + ".  See the module docstring for their arguments.  "
               "Exit status: 0 done, 1 a failed expect, 2 a bad script or arguments.",
    )
    p.add_argument("script", help="the script file, or - for standard input")
    p.add_argument("--mem", type=parse_size, default=32 << 20, metavar="SIZE", help="guest RAM (default 32M)")
    p.add_argument("--echo", action="store_true", help="print each command ('> ...') before its reply")
    args = p.parse_args(argv)
    name = "<stdin>" if args.script == "-" else args.script
    try:
        text = sys.stdin.read() if args.script == "-" else Path(args.script).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        print(f"qtest: cannot read {name}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    try:
        commands = parse_script(text)
    except ScriptError as e:
        print(f"qtest: {name}:{e.lineno}: {e.message}", file=sys.stderr)
        return 2
    q = QTest.pc(args.mem)
    try:
        execute(q, commands, sys.stdout, echo=args.echo)
    except ScriptError as e:
        sys.stdout.flush()
        print(f"qtest: {name}:{e.lineno}: {e.message}", file=sys.stderr)
        return e.status
    return 0


if __name__ == "__main__":
    sys.exit(main())
