"""The Python API: a guest you drive from a script or a test (docs/api.md).

    import vmm
    m = vmm.boot("demo")                 # a bundled guest, a path, or the image's bytes
    res = m.run()                        # to the end (or run(instructions=N), run(until=ICOUNT))
    assert b"all tasks done" in m.console

    vmm.record("demo", "run.vmlog")      # a recording of the same run
    r = vmm.replay("run.vmlog")          # replay it, checking every digest; time travel
    r.watch(0x200004, 4)
    r.reverse_cont()                     # back to the last store that changed it

The objects here are thin: ``Machine.pc`` is the PcMachine (vmm/platform/pc.py)
and ``Replay.tt`` the TimeTravel (replay/timetravel.py) underneath, for
everything the facade does not cover.  A machine is built by the same recipe
the command line uses (replay/session.py ``machine_config``), so a
``vmm.record`` here replays under ``vmm replay`` and the other way round.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, MutableSet
from dataclasses import dataclass
from typing import Any

from host.serial import NullBackend
from replay.session import (Divergence, ReplayError, build_machine, load_snapshot, machine_config,
                            save_snapshot)
from replay.session import record as _record
from vmm.firmware.boot import BootError
from vmm.machine import RunResult, StopReason
from vmm.memory.paging import PageFault
from vmm.platform.pc import DEFAULT_EPOCH, PcMachine

__all__ = ["Machine", "Replay", "Recording", "Registers", "Breakpoints", "boot", "record", "replay", "bundled",
           "RunResult", "StopReason", "Divergence", "ReplayError", "BootError", "PageFault"]


def _mem_size(mem: int | str) -> int:
    if isinstance(mem, int):
        return mem
    m = re.fullmatch(r"\s*(\d+)\s*([KMG])?(?:I?B)?\s*", str(mem).upper())
    if not m:
        raise ValueError(f"not a memory size: {mem!r} (use e.g. 64M, 512K, 1G or a number of bytes)")
    return int(m.group(1)) << {"K": 10, "M": 20, "G": 30, None: 20}[m.group(2)]


def _image(image: str | os.PathLike | bytes) -> tuple[str, bytes]:
    """(name, bytes) of an image given as bytes, a path, or a bundled guest's bare name."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "image", bytes(image)
    path = os.fspath(image)
    if not os.path.exists(path):
        from guests.build import GUESTS, guest_path

        if path not in GUESTS:
            raise FileNotFoundError(f"no such image: {path} (bundled guests: {', '.join(sorted(GUESTS))})")
        path = str(guest_path(path))
    with open(path, "rb") as f:
        return path, f.read()


def bundled(name: str) -> str:
    """The path of a bundled guest image (``"demo"``, ``"hello"``, ``"crash"`` ...) or of a
    bundled recording (``"crash.vmlog"``), wherever the package is installed."""
    from guests.build import GUESTS, GUESTS_DIR, guest_path

    if name.endswith(".vmlog"):
        p = GUESTS_DIR / "recordings" / name
        if not p.is_file():
            raise FileNotFoundError(f"no bundled recording {name}")
        return str(p)
    if name not in GUESTS:
        raise FileNotFoundError(f"no bundled guest {name} (bundled guests: {', '.join(sorted(GUESTS))})")
    return str(guest_path(name))


def _config(name: str, data: bytes, *, mem: int | str = "32M", boot: str = "auto", cmdline: str | None = None,
            load_addr: int = 0x100000, rtc_epoch: int = DEFAULT_EPOCH, vcpus: int = 1, mmu: str = "shadow",
            initrd: str | os.PathLike | bytes | None = None, input_kind: str = "none") -> dict:
    from vmm.firmware.linux import detect_bzimage

    if cmdline is None:   # as the command line: empty for Linux, the image name for Multiboot
        cmdline = "" if boot == "linux" or (boot == "auto" and detect_bzimage(data)) else name
    rd = None
    if initrd is not None:
        rd = ("initrd", bytes(initrd)) if isinstance(initrd, (bytes, bytearray)) else _image(initrd)
    return machine_config(_mem_size(mem), rtc_epoch, name, data, boot, cmdline, load_addr, input_kind,
                          vcpus=vcpus, mmu=mmu, initrd=rd)


class Registers:
    """One vCPU's registers by name, as attributes or items: ``regs.rip``,
    ``regs["rax"] = 5``.  Names are Unicorn's 64-bit ones (rax ... r15, rip,
    rflags, cr0-cr4, segment selectors through ``dict()``); 32-bit names
    (eax, esp, eip ...) read the low half and write it, keeping the high half."""

    _NARROW = {"eax": "rax", "ebx": "rbx", "ecx": "rcx", "edx": "rdx", "esi": "rsi", "edi": "rdi",
               "ebp": "rbp", "esp": "rsp", "eip": "rip", "eflags": "rflags"}

    def __init__(self, vcpu) -> None:
        object.__setattr__(self, "_vcpu", vcpu)

    def __getitem__(self, name: str) -> int:
        v = self._vcpu
        wide = self._NARROW.get(name)
        if wide is not None:
            return self[wide] & 0xFFFF_FFFF
        if name in ("cr0", "cr2", "cr3", "cr4", "rip", "rflags", "cpl", "efer"):
            return getattr(v, name)
        return v.reg(name)

    def __setitem__(self, name: str, value: int) -> None:
        v = self._vcpu
        wide = self._NARROW.get(name)
        if wide is not None:
            value = (self[wide] & ~0xFFFF_FFFF) | (value & 0xFFFF_FFFF)
            name = wide
        if name == "rip":
            v.rip = value
        elif name == "rflags":
            v.rflags = value
        else:
            v.set_reg(name, value)
        v.invalidate_code()

    def __getattr__(self, name: str) -> int:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no register {name!r}") from None

    def __setattr__(self, name: str, value: int) -> None:
        self[name] = value

    def dict(self) -> dict[str, int]:
        """Every register a replay digest holds (GPRs, rip, rflags, selectors, CRs, CPL)."""
        return self._vcpu.snapshot_regs()

    def __repr__(self) -> str:
        d = self.dict()
        return "Registers(" + ", ".join(f"{k}={d[k]:#x}" for k in ("rip", "rax", "rsp", "cr3")) + ")"


class Breakpoints(MutableSet):
    """Linear addresses the machine stops at, before the instruction there executes.
    A set: ``m.breakpoints.add(addr)``, ``discard``, ``clear``.  Guest memory is never
    patched, so breakpoints cannot change what a guest or a replay computes."""

    def __init__(self, apply) -> None:
        self._set: set[int] = set()
        self._apply = apply

    def __contains__(self, a: object) -> bool:
        return a in self._set

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._set))

    def __len__(self) -> int:
        return len(self._set)

    def add(self, addr: int) -> None:
        self._set.add(int(addr))
        self._apply(self._set)

    def discard(self, addr: int) -> None:
        self._set.discard(int(addr))
        self._apply(self._set)

    def __repr__(self) -> str:
        return "Breakpoints({" + ", ".join(hex(a) for a in self) + "})"


class _ConsoleTap:
    """A serial backend that keeps what the guest sent (and passes it on to another)."""

    def __init__(self, buf: bytearray, then=None) -> None:
        self.buf = buf
        self.then = then

    def write(self, data: bytes) -> None:
        self.buf += data
        if self.then is not None:
            self.then.write(data)

    def poll_input(self) -> bytes:
        return self.then.poll_input() if self.then is not None else b""

    def close(self) -> None:
        if self.then is not None:
            self.then.close()


class _Guest:
    """What a live machine and a replay share: registers, memory, console output."""

    pc: PcMachine

    @property
    def icount(self) -> int:
        """Instructions retired by all vCPUs together: the machine's clock."""
        return self.pc.icount

    @property
    def regs(self) -> Registers:
        """The bootstrap processor's registers (``cpu(i)`` for another vCPU)."""
        return Registers(self.pc.vcpu)

    def cpu(self, i: int) -> Registers:
        return Registers(self.pc.vcpus[i])

    @property
    def console(self) -> bytes:
        """Everything the guest sent to COM1 so far."""
        return bytes(self.pc.serial_out)

    @property
    def serial(self) -> bytes:
        """Everything the guest sent to COM1 (``console`` has the BIOS screen and the
        debug console too, for a live machine)."""
        return bytes(self.pc.serial_out)

    @property
    def debugcon(self) -> bytes:
        """Everything the guest wrote to the debug console ports (0xE9, 0x402)."""
        return bytes(self.pc.debugcon_out)

    def read(self, addr: int, n: int) -> bytes:
        """``n`` bytes of guest-physical memory."""
        return self.pc.memory.read(addr, n)

    def virt_to_phys(self, addr: int, cr3: int | None = None, vcpu: int = 0) -> int:
        """The guest-physical address of a linear address, through the page tables the
        vCPU uses now (or those at ``cr3``), without setting accessed/dirty bits;
        PageFault if it is not mapped."""
        from vmm.introspect import translate

        return translate(self.pc, addr, cr3=cr3, vcpu=vcpu)

    def read_virt(self, addr: int, n: int, cr3: int | None = None, vcpu: int = 0) -> bytes:
        """``n`` bytes at a linear address (see ``virt_to_phys``)."""
        from vmm.introspect import read_virtual

        return read_virtual(self.pc, addr, n, cr3=cr3, vcpu=vcpu)

    @property
    def introspect(self):
        """The guest's Introspector (vmm/introspect.py): watch memory, trap system calls
        and CR3 switches, read processes' memory, without the guest noticing."""
        if self._introspector is None:
            from vmm.introspect import Introspector

            self._introspector = Introspector(self.pc)
        return self._introspector

    def close(self) -> None:
        """Release the CPU engine now."""
        self.pc.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Machine(_Guest):
    """A PC guest: booted from an image, run in steps, inspected and changed.

    ``image`` is a bundled guest's name (``"demo"``, ``"hello"``), a path or the
    image's bytes: a boot sector, a Multiboot kernel, a Linux bzImage (with
    ``initrd`` and ``cmdline``), or a flat binary (``boot="flat"``,
    ``load_addr``).  ``mem`` is a size (``"128M"`` or bytes).  The guest's
    wall clock starts at ``rtc_epoch`` (never the host's clock)."""

    def __init__(self, image: str | os.PathLike | bytes = "demo", *, mem: int | str = "32M", boot: str = "auto",
                 cmdline: str | None = None, initrd: str | os.PathLike | bytes | None = None,
                 load_addr: int = 0x100000, rtc_epoch: int = DEFAULT_EPOCH, vcpus: int = 1, mmu: str = "shadow",
                 serial=None, _restore: tuple[PcMachine, dict] | None = None) -> None:
        self._console = bytearray()
        if _restore is not None:
            self.pc, self.config = _restore
        else:
            name, data = _image(image)
            self.config = _config(name, data, mem=mem, boot=boot, cmdline=cmdline, load_addr=load_addr,
                                  rtc_epoch=rtc_epoch, vcpus=vcpus, mmu=mmu, initrd=initrd)
            self.pc = build_machine(self.config, data, _ConsoleTap(self._console, serial))
        self._tap_console()
        self.breakpoints = Breakpoints(self.pc.vcpu.set_breakpoints)
        self.last: RunResult | None = None
        self._introspector = None

    def _tap_console(self) -> None:
        pc = self.pc
        prev = pc.on_console_output
        buf = self._console

        def shown(data: bytes) -> None:     # the BIOS's teletype output and the debug console
            buf.extend(data)
            if prev is not None:
                prev(data)
        pc.on_console_output = shown
        if not isinstance(pc.com1.backend, _ConsoleTap):
            pc.com1.backend = _ConsoleTap(buf, pc.com1.backend)

    @property
    def console(self) -> bytes:
        """What a terminal would have shown since this object was made: COM1, the BIOS's
        teletype output (INT 10h) and the debug console, in the order the guest wrote them."""
        return bytes(self._console)

    @classmethod
    def restore(cls, path: str | os.PathLike, serial=None) -> Machine:
        """The machine a snapshot file (``save``, ``vmm run --save-at``) holds."""
        return cls(_restore=load_snapshot(path, serial))

    def save(self, path: str | os.PathLike) -> int:
        """Write a snapshot of the machine now; returns its size in bytes."""
        return save_snapshot(self.pc, self.config, path)

    def run(self, instructions: int | None = None, *, until: int | None = None) -> RunResult:
        """Run until the guest stops, a breakpoint is reached, ``instructions`` more
        instructions have retired, or the clock reads ``until``.  Run again after a
        breakpoint and the machine steps over it and goes on."""
        limit = until
        if instructions is not None:
            limit = self.icount + instructions if limit is None else min(limit, self.icount + instructions)
        self.last = self.pc.run(limit)
        return self.last

    def step(self) -> RunResult:
        """Exactly one instruction (an exception or interrupt delivered counts as none)."""
        return self.run(1)

    def write(self, addr: int, data: bytes) -> None:
        """Write guest-physical memory (translated code there is dropped)."""
        self.pc.ept.write(addr, bytes(data))

    def write_virt(self, addr: int, data: bytes, cr3: int | None = None, vcpu: int = 0) -> None:
        """Write at a linear address, page by page through the page tables."""
        off = 0
        data = bytes(data)
        while off < len(data):
            a = addr + off
            n = min(len(data) - off, 0x1000 - (a & 0xFFF))
            self.write(self.virt_to_phys(a, cr3, vcpu), data[off:off + n])
            off += n

    def send(self, data: bytes | str) -> None:
        """Console input: reaches COM1 (or the keyboard, for boot-sector guests) at the
        next input tick of virtual time."""
        self.pc.console_input(data.encode() if isinstance(data, str) else bytes(data))



def boot(image: str | os.PathLike | bytes = "demo", **options: Any) -> Machine:
    """``Machine(image, **options)``: a booted guest, ready to run."""
    return Machine(image, **options)


@dataclass
class Recording:
    """What ``record`` gives back: how the run ended, the log's path, and the machine
    as it stood at the end."""

    result: RunResult
    path: str
    machine: Machine


def record(image: str | os.PathLike | bytes, log: str | os.PathLike, *, instructions: int | None = None,
           input: bytes | str | None = None, setup=None, **options: Any) -> Recording:
    """Run a guest to its end (or for ``instructions``) while writing its replay log.

    The log names its image by path and SHA-256: record from a file (or a bundled
    guest) to replay from the log alone; an image given as bytes must be passed
    to ``replay(log, image=...)`` again.

    ``input`` is console input, offered to the guest from the start as ``vmm
    record --input FILE`` does.  ``setup(machine)`` is called before the run (a
    ``vmm.Machine``: breakpoints, introspection)."""
    name, data = _image(image)
    cfg = _config(name, data, **options)
    script = [input.encode() if isinstance(input, str) else bytes(input)] if input else []
    box: dict = {}

    def _setup(pc: PcMachine) -> None:
        box["m"] = Machine(_restore=(pc, cfg))
        if setup is not None:
            setup(box["m"])

    res, pc = _record(name, data, os.fspath(log), mem_size=cfg["mem_size"], epoch=cfg["rtc_epoch"],
                      boot_kind=cfg["boot"], cmdline=cfg["cmdline"], load_addr=cfg["load_addr"],
                      live_input=(lambda: script.pop() if script else b"") if input else None,
                      input_kind="file" if input else "none", max_instructions=instructions,
                      mmu=cfg["mmu"], vcpus=cfg["vcpus"],
                      initrd=("initrd", _image(options["initrd"])[1]) if options.get("initrd") else None,
                      setup=_setup)
    mach = box["m"]
    mach.last = res
    return Recording(res, os.fspath(log), mach)


@dataclass
class Stop:
    """Where a time-travel command stopped: ``reason`` is "breakpoint", "watchpoint",
    "step", "end", "start" or "limit"; ``addr`` the breakpoint or the data address."""

    reason: str
    icount: int
    addr: int | None = None
    vcpu: int | None = None


_WATCH = {"write": 2, "read": 3, "access": 4}


class Replay(_Guest):
    """A recording replayed bit-exact, with time travel.

    ``run()`` replays forward checking every digest (``Divergence`` at the first
    mismatch, with a report); ``cont``/``seek``/``step`` and their reverses move
    through the recording with breakpoints and watchpoints, as gdb does against
    ``vmm replay --gdb``."""

    def __init__(self, log: str | os.PathLike, *, image: bytes | None = None, interval: int | None = None,
                 serial=None) -> None:
        from replay.timetravel import TimeTravel

        self.path = os.fspath(log)
        self.tt = TimeTravel(self.path, image=image, interval=interval, serial=serial or NullBackend())
        self.pc = self.tt.m
        self.breakpoints = Breakpoints(self._set_breakpoints)
        self._introspector = None

    def _set_breakpoints(self, addrs: Iterable[int]) -> None:
        tt = self.tt
        for a in set(tt.breakpoints) - set(addrs):
            tt.remove_breakpoint(a)
        for a in set(addrs) - set(tt.breakpoints):
            tt.add_breakpoint(a)

    @property
    def end_icount(self) -> int | None:
        """The icount at which the recording ends."""
        return self.tt.end_icount

    def events(self):
        """The recording's events in order (``replay.events.Event``: ``kind``, an
        ``EventKind`` such as CONSOLE_INPUT or REG_DIGEST, ``icount``, ``payload``,
        ``vcpu``); docs/log-format.md describes each."""
        from replay.logfile import LogReader

        return iter(LogReader(self.path))

    def run(self, until: int | None = None) -> RunResult:
        """Replay forward to the recording's end (or to exactly ``until``), checking every
        digest; raises Divergence where the replay departs from the recording."""
        tt = self.tt
        if tt.breakpoints:
            tt.m.vcpu.set_breakpoints(())
        try:
            return tt.rp.run(until)
        finally:
            if tt.breakpoints:
                tt.m.vcpu.set_breakpoints(tt.breakpoints)

    def _stop(self, s) -> Stop:
        return Stop(s.reason, s.icount, s.hit.addr if s.hit is not None else None, s.vcpu)

    def cont(self, limit: int | None = None) -> Stop:
        """Forward to the next breakpoint or watchpoint hit, the end, or ``limit``."""
        return self._stop(self.tt.cont(limit))

    def reverse_cont(self) -> Stop:
        """Back to the last breakpoint or watchpoint hit before here (or the start)."""
        return self._stop(self.tt.reverse_cont())

    def step(self) -> Stop:
        return self._stop(self.tt.step())

    def reverse_step(self) -> Stop:
        """Un-execute the last instruction: the state a forward run had one instruction ago."""
        return self._stop(self.tt.reverse_step())

    def seek(self, icount: int) -> int:
        """Go to exactly ``icount`` (clamped to the recording), forward or back."""
        return self.tt.seek(icount)

    def watch(self, addr: int, length: int = 1, kind: str = "write") -> None:
        """A watchpoint on linear addresses [addr, addr+length): "write" (stops only on
        stores that change the value, as gdb's ``watch``), "read" or "access"."""
        self.tt.add_watchpoint(_WATCH[kind], addr, length)

    def unwatch(self, addr: int, length: int = 1, kind: str = "write") -> None:
        self.tt.remove_watchpoint(_WATCH[kind], addr, length)



def replay(log: str | os.PathLike, **options: Any) -> Replay:
    """``Replay(log, **options)``: a recording ready to replay or travel through."""
    return Replay(log, **options)
