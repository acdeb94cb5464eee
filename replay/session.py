"""Recording and replaying a run: the determinism boundary made concrete.

A run of a PcMachine is a deterministic function of its configuration, its
images and the inputs that cross the boundary.  Everything that crosses it
passes through the machine's ``Boundary`` (vmm/boundary.py): the RTC start
epoch (in the header), console input (stamped with the exact icount at which
the VMM took it), and the image contents (named by SHA-256).  A ``Session``
is one code path for both directions: recording, its boundary writes the
inputs to the log and its digest timer writes digests; replaying, its
boundary answers from the log and the same digest timer checks them.
Devices and the VMM never see the difference.

To prove a replay exact, the recorder also writes digests: registers (in full,
for a diff) at a fixed virtual-time interval, per-page RAM hashes less often,
and the SHA-256 of every output stream.  The replayer computes the same at the
same moments and stops at the first mismatch with a ``Divergence`` report:
icount, RIP, the event just before, the register diff, the pages that differ.

Both sides schedule the same timers (digests, input polls) at the same virtual
times, so the extra VM exits they cause are the same in both; exits are
invisible to the guest anyway (the clock is exact).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from replay import events as ev
from replay.boundary import INPUT_KINDS, InputMismatch, RecordingBoundary, ReplayBoundary
from replay.config import check_config
from replay.events import Event, EventKind
from replay.logfile import LogReader, LogWriter, StreamLogReader
from host.serial import NullBackend
from vmm.digest import page_hashes
from vmm.firmware.boot import attach_firmware, boot
from vmm.firmware.imagefile import read_file
from vmm.machine import RunResult, StopReason
from vmm.platform.pc import DEFAULT_EPOCH, PcConfig, PcMachine

VMM_VERSION = "0.1.0"
DIGEST_TICKS = 1_000_000        # registers and outputs every 10 ms of virtual time
MAX_SNAPSHOT = 8 << 30          # the largest snapshot file hashed (RAM is at most 3 GiB)
MEM_DIGEST_EVERY = 50           # RAM page hashes every 50 register digests (0.5 s virtual)


class ReplayError(Exception):
    """A replay that cannot start (missing or changed image, unreadable log)."""


@dataclass
class Divergence(Exception):
    """Replay departed from the recording: everything known about where."""

    icount: int
    rip: int
    what: str
    previous_event: str = ""
    reg_diff: dict[str, tuple[int, int]] = field(default_factory=dict)
    pages: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"replay diverged at icount {self.icount} (rip {self.rip:#x}): {self.what}"]
        if self.previous_event:
            lines.append(f"  last event before it: {self.previous_event}")
        for name, (want, got) in self.reg_diff.items():
            lines.append(f"  {name:>6}: recorded {want:#x}, replay {got:#x}")
        if self.pages:
            shown = ", ".join(f"{p << 12:#x}" for p in self.pages[:16])
            more = f" and {len(self.pages) - 16} more" if len(self.pages) > 16 else ""
            lines.append(f"  {len(self.pages)} guest page(s) differ: {shown}{more}")
        return "\n".join(lines)


def _file_ref(name: str, data: bytes) -> dict:
    return {"name": name, "path": os.path.abspath(name) if os.path.exists(name) else name,
            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def machine_config(mem_size: int, epoch: int, image_name: str, image: bytes, boot_kind: str,
                   cmdline: str, load_addr: int, input_kind: str, vcpus: int = 1, quantum: int | None = None,
                   mmu: str = "shadow", entries: list[tuple[int, int]] | None = None,
                   initrd: tuple[str, bytes] | None = None, debug_exit: tuple[int, int] = (0x501, 2),
                   platform: str = "pc-4") -> dict:
    """The machine's recipe: everything a recording's or a snapshot's header needs to
    build the same machine again (images by path and SHA-256)."""
    return {
        "initrd": _file_ref(*initrd) if initrd else None,
        "debug_exit": list(debug_exit),
        "platform": platform,
        "entries": [list(e) for e in entries or []],
        "vcpus": vcpus,
        "quantum": quantum,
        "mmu": mmu,
        "vmm_version": VMM_VERSION,
        "mem_size": mem_size,
        "rtc_epoch": epoch,
        "boot": boot_kind,
        "cmdline": cmdline,
        "load_addr": load_addr,
        "input": input_kind,
        "image": {"name": image_name, "path": os.path.abspath(image_name) if os.path.exists(image_name) else image_name,
                  "sha256": hashlib.sha256(image).hexdigest(), "size": len(image),
                  "bundled": _bundled_name(image_name)},
        "digest_ticks": DIGEST_TICKS,
        "mem_digest_every": MEM_DIGEST_EVERY,
    }


def _bundled_name(path: str) -> str | None:
    """The bundled guest an image path is (guests/build/<name>.*), so a log replays from any clone."""
    from guests.build import BUILD_DIR, GUESTS

    try:
        p = os.path.abspath(path)
    except (TypeError, ValueError):
        return None
    if os.path.dirname(p) == str(BUILD_DIR):
        stem = os.path.basename(p).split(".")[0]
        if stem in GUESTS:
            return stem
    return None


def read_initrd(cfg: dict) -> bytes | None:
    """The initrd a config names, checked by hash (None if it names none)."""
    ref = cfg.get("initrd")
    if not ref:
        return None
    try:
        data = read_file(ref["path"])
    except OSError as e:
        raise ReplayError(f"cannot read the initrd {ref['path']}: {e.strerror}") from None
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise ReplayError(f"the initrd {ref['path']} is not the one recorded (sha256)")
    return data


def _find_image(cfg: dict) -> str:
    path = cfg["image"]["path"]
    if os.path.exists(path):
        return path
    bundled = cfg["image"].get("bundled")
    if bundled:
        from guests.build import guest_path

        return str(guest_path(bundled))
    return path


def build_machine(cfg: dict, image: bytes, serial, parts: dict | None = None,
                  drive_mode: str = "replay", restorers: dict | None = None) -> PcMachine:
    """The machine a config describes: booted from ``image``, or, given the ``parts``
    of a saved state, restored to it (the firmware attached, nothing booted; the
    saved timers of owners outside the machine come back through ``restorers``).  Its
    ``drives`` are opened as ``drive_mode`` says (vmm/platform/storage.py: "run",
    "record", or "replay", which checks each image's hash)."""
    m = PcMachine(PcConfig(mem_size=cfg["mem_size"], start_epoch=cfg["rtc_epoch"], serial=serial,
                           mmu=cfg.get("mmu", "shadow"), vcpus=cfg.get("vcpus", 1), quantum=cfg.get("quantum"),
                           platform=cfg.get("platform", "pc-1"),
                           debug_exit=tuple(cfg.get("debug_exit", (0x501, 2)))))
    if cfg.get("drives"):
        _attach_drives(m, cfg, drive_mode)
    if cfg.get("nics"):
        _attach_nics(m, cfg)
    if parts is None:
        info = boot(m, image, cfg["boot"], name=cfg["image"]["name"], load_addr=cfg["load_addr"],
                    cmdline=cfg["cmdline"], initrd=read_initrd(cfg))
        kind = info.kind
        cfg["booted"] = kind
        _start_harness_vcpus(m, cfg)
    else:
        kind = cfg.get("booted")
        if kind not in ("disk", "floppy", "multiboot", "flat", "linux", "bios", "cdrom"):
            raise ReplayError(f"the saved machine does not say how it was booted ({kind!r})")
        attach_firmware(m, image, kind, cfg["image"]["name"])
        m.load_state(parts, restorers)
    if kind in ("disk", "floppy", "cdrom"):
        m.config.input_to = "keyboard"
    if cfg.get("input_to") is not None:   # chosen (vmm run --input-to, -serial stdio, -nographic)
        m.config.input_to = cfg["input_to"]
    return m


def _attach_drives(m: PcMachine, cfg: dict, mode: str) -> None:
    from vmm.platform.storage import DriveError, attach_drives, check_config

    try:
        check_config(cfg["drives"])
    except ValueError as e:
        raise ev.LogFormatError(f"the config's drives: {e}") from None
    try:
        attach_drives(m, cfg["drives"], mode)
    except DriveError as e:
        raise ReplayError(str(e)) from None


def _attach_nics(m: PcMachine, cfg: dict) -> None:
    """The config's network cards, without backends (vmm/platform/net.py): a replay needs none."""
    from vmm.platform.net import attach_nics

    try:
        attach_nics(m, cfg["nics"])
    except ValueError as e:
        raise ev.LogFormatError(f"the config's nics: {e}") from None


def build_recorded_machine(cfg: dict, image: bytes, serial, parts: dict | None = None,
                           restorers: dict | None = None) -> PcMachine:
    """build_machine for a config read from a file: an image that does not boot the
    recorded way, or a machine the bus cannot assemble, is one ReplayError line."""
    from devices.bus import BusError
    from vmm.firmware.boot import BootError

    try:
        return build_machine(cfg, image, serial, parts, restorers=restorers)
    except BootError as e:
        raise ReplayError(f"the image {cfg['image']['name']} does not boot as recorded: {e}") from None
    except BusError as e:
        raise ReplayError(f"the recorded machine cannot be assembled: {e}") from None


def run_saving(m: PcMachine, cfg: dict, limit: int | None, save_at: list[tuple[int, str]] | None,
               report: Callable[[str], None] | None = None) -> RunResult:
    """Run to the end (or ``limit``), stopping at each (icount, path) of ``save_at``
    to write a snapshot there; the run goes on exactly as it would have."""
    say = report or (lambda msg: None)
    for at, path in sorted(save_at or []):
        if limit is not None and at > limit:
            break
        if at < m.icount:
            say(f"--save-at {at}: the run starts at icount {m.icount}; {path} not written")
            continue
        res = m.run(at)
        if res.reason is not StopReason.LIMIT:
            say(f"the guest stopped before icount {at}; {path} not written")
            return res
        size = save_snapshot(m, cfg, path)
        say(f"snapshot at icount {at} -> {path} ({size:,} bytes)")
    return m.run(limit)


def _start_harness_vcpus(m: PcMachine, cfg: dict) -> None:
    """A test harness's convention, before the APIC brings up CPUs the way an OS does:
    ``cfg["entries"]`` lists [vcpu, address] pairs; each such vCPU starts at that
    address in the state the BSP was booted in (flat protected mode for --boot flat)."""
    entries = cfg.get("entries") or []
    for vid, addr in entries:
        if not (isinstance(vid, int) and 0 < vid < len(m.vcpus) and isinstance(addr, int) and 0 <= addr < 1 << 32):
            raise ReplayError(f"bad vCPU entry {vid!r}: {addr!r}")
        v = m.vcpus[vid]
        st = m.vcpu.save_state()
        st.update(id=vid, icount=0, irq_pending=False, rip=addr)
        v.load_state(st)
        m.start(vid)


def save_snapshot(m: PcMachine, cfg: dict, path) -> int:
    """Write ``m`` as a snapshot file whose header holds ``cfg`` (the machine's recipe)."""
    from vmm.state import write_snapshot

    return write_snapshot(path, cfg, m.icount, m.save_state())


def load_snapshot(path, serial=None, image: bytes | None = None) -> tuple[PcMachine, dict]:
    """(machine, config) restored from a snapshot file; SnapshotError or ReplayError
    (one line each) for anything wrong with it or its image."""
    from devices.base import DeviceStateError
    from vmm.state import SnapshotError, read_snapshot

    header, parts = read_snapshot(path)
    cfg = header["config"]
    try:
        check_config(cfg, "the snapshot header")
    except ev.LogFormatError as e:
        raise SnapshotError(str(e)) from None
    if image is None:
        p = _find_image(cfg)
        try:
            image = read_file(p)
        except OSError as e:
            raise ReplayError(f"cannot read the snapshot's image {p}: {e.strerror} (pass --image PATH)") from None
    if hashlib.sha256(image).hexdigest() != cfg["image"]["sha256"]:
        raise ReplayError(f"the image {cfg['image']['name']} is not the one the snapshot was taken with (sha256)")
    try:
        m = build_recorded_machine(cfg, image, serial or NullBackend(), parts)
    except DeviceStateError as e:
        raise SnapshotError(f"the saved state does not load: {e}") from None
    if m.icount != header["icount"]:
        raise SnapshotError(f"the snapshot says icount {header['icount']}, its state holds {m.icount}")
    return m, cfg


def state_digest(m: PcMachine, hashes=None) -> str:
    """SHA-256 over the registers of every vCPU and the RAM page hashes (computed here unless given)."""
    if hashes is None:
        hashes = page_hashes(m.memory.ram)
    h = hashlib.sha256()
    for v in m.vcpus:
        h.update(ev.encode_regs(v.snapshot_regs()))
    h.update(hashlib.sha256(hashes.tobytes()).hexdigest().encode())
    return h.hexdigest()


def snapshot_events(m: PcMachine, with_memory: bool, hashes=None) -> list[Event]:
    """The digests of the machine now: each vCPU's registers, RAM page hashes (with_memory),
    and every output stream's length and SHA-256."""
    ic = m.icount
    out = [Event(EventKind.REG_DIGEST, ic, ev.encode_regs(v.snapshot_regs()), v.id) for v in m.vcpus]
    if with_memory:
        if hashes is None:
            hashes = page_hashes(m.memory.ram)
        out.append(Event(EventKind.MEM_DIGEST, ic, ev.encode_page_hashes(hashes)))
    for name, stream in m.outputs.items():
        out.append(Event(EventKind.OUTPUT_DIGEST, ic, ev.encode_output_digest(name, stream.count, stream.digest())))
    return out


class _Digests:
    """The periodic digest timer: the same timer in a recording and in its replay.

    RAM page hashes are kept up to date incrementally where the MMU can tell
    which pages were written (the EPT's dirty log, shadow MMU): only those are
    hashed again at each memory digest, instead of all of RAM.  The dirty log
    is invisible to the guest (the first write to a page marks it, in the TLB
    fill), and a recording and its replay collect it at the same moments.
    """

    def __init__(self, m: PcMachine, ticks: int, mem_every: int, emit: Callable[[list[Event]], None],
                 schedule: bool = True):
        self.m = m
        self.ticks = ticks
        self.mem_every = mem_every
        self.emit = emit
        self.n = 0
        self._hashes = None
        self._incremental = m.engine.mmu_mode == "shadow"
        if schedule:
            m.clock.schedule_in(ticks, self.fire, "digest")

    def page_hashes(self):
        """Hashes of every RAM page now (only the pages written since the last call are hashed)."""
        m = self.m
        ept = m.ept
        if not self._incremental:
            return page_hashes(m.memory.ram)
        if self._hashes is None or not ept.logging:
            if not ept.logging:
                ept.start_dirty_log()
            self._hashes = page_hashes(m.memory.ram)
            return self._hashes.copy()
        dirty = [gpa // 4096 for gpa in ept.collect_dirty() if gpa < m.memory.size]
        if dirty:
            idx = np.array(dirty, dtype=np.int64)
            pages = m.memory.ram.reshape(-1, 4096)[idx]
            self._hashes[idx] = page_hashes(pages.reshape(-1))
        return self._hashes.copy()

    def forget(self) -> None:
        """The machine was put back to another state (a checkpoint): hash everything next time."""
        self._hashes = None

    def snapshot(self, with_memory: bool, hashes=None) -> list[Event]:
        if with_memory and hashes is None:
            hashes = self.page_hashes()
        return snapshot_events(self.m, with_memory, hashes)

    def fire(self, now: int) -> None:
        self.n += 1
        self.emit(self.snapshot(self.n % self.mem_every == 0))
        self.m.clock.schedule_in(self.ticks, self.fire, "digest")


def _end_limit(end: Event | None) -> int | None:
    """How far a replay may run: to the recorded end, and one instruction past it
    when the run ended by itself there (a triple fault's faulting instruction,
    a halt, a CPU error and a guest exit all stop the machine at that count
    without a limit; only an instruction limit or the host stopped it)."""
    if end is None:
        return None
    reason, _status, _msg = ev.decode_end(end.payload)
    if reason in (StopReason.LIMIT.value, StopReason.HOST.value, StopReason.BREAKPOINT.value):
        return end.icount
    return end.icount + 1


def record(image_name: str, image: bytes, out_path, *, mem_size: int = 32 << 20, epoch: int = DEFAULT_EPOCH,
           boot_kind: str = "auto", cmdline: str | None = None, load_addr: int = 0x100000,
           live_input: Callable[[], bytes] | None = None, input_kind: str = "none",
           max_instructions: int | None = None, serial=None, pace_idle: bool = False,
           setup: Callable[[PcMachine], None] | None = None,
           chunk_events: int | None = None, mmu: str = "shadow", vcpus: int = 1,
           quantum: int | None = None, restore: str | None = None,
           save_at: list[tuple[int, str]] | None = None,
           report: Callable[[str], None] | None = None,
           entries: list[tuple[int, int]] | None = None, initrd: tuple[str, bytes] | None = None,
           debug_exit: tuple[int, int] = (0x501, 2),
           input_to: str | None = None, drives: list[dict] | None = None, nics: list[dict] | None = None,
           on_writer: Callable[[LogWriter], None] | None = None,
           platform: str = "pc-4") -> tuple[RunResult, PcMachine]:
    """Run a guest while writing its event log to ``out_path`` (a path or a binary stream).

    ``on_writer`` is handed the log writer once the header is written (lockstep
    FT flushes it at points of its own: replay/ft/primary.py).

    ``drives`` (vmm/platform/storage.py ``describe``, with hashes) go into the log's
    config; the guest writes to in-memory overlays, so the images stay as named.

    ``restore`` starts the recording from a snapshot file instead of a boot
    (the snapshot's own recipe then describes the machine, and the log names
    the snapshot by path and SHA-256, so a replay starts from it too).
    """
    if restore is not None:
        m, cfg = load_snapshot(restore, serial, image)
        cfg = dict(cfg, input=input_kind, snapshot=_snapshot_ref(restore))
    else:
        cfg = machine_config(mem_size, epoch, image_name, image, boot_kind,
                             cmdline if cmdline is not None else image_name,
                             load_addr, input_kind, vcpus=vcpus, quantum=quantum, mmu=mmu, entries=entries,
                             initrd=initrd, debug_exit=debug_exit, platform=platform)
        if drives:
            cfg["drives"] = drives
        if nics:
            cfg["nics"] = nics         # vmm/platform/net.py describe_nics; backends join in ``setup``
        m = build_machine(cfg, image, serial or NullBackend(), drive_mode="record")
    if input_to is not None:           # where console input goes: "serial" (COM1) or "keyboard"
        cfg["input_to"] = m.config.input_to = input_to
    initial_hashes = page_hashes(m.memory.ram)
    writer = LogWriter(out_path, cfg, state_digest(m, initial_hashes),
                       **({"chunk_events": chunk_events} if chunk_events else {}))
    writer.append(Event(EventKind.DISK_IMAGE, 0, ev.encode_disk_image(image_name, cfg["image"]["sha256"])))
    if on_writer is not None:
        on_writer(writer)

    def emit(events: list[Event]) -> None:
        for e in events:
            writer.append(e)

    m.set_boundary(RecordingBoundary(writer.append))
    if input_kind != "none":
        m.start_input_polling(live_input, pace_idle=pace_idle)
    digests = _Digests(m, DIGEST_TICKS, MEM_DIGEST_EVERY, emit)
    emit(digests.snapshot(True))  # the initial state in full: a changed image shows page by page
    if setup is not None:
        setup(m)
    try:
        res = run_saving(m, cfg, max_instructions, save_at, report)
        emit(digests.snapshot(True))
        end = ev.encode_end(res.reason.value, res.status, res.message, [v.icount for v in m.vcpus])
        writer.append(Event(EventKind.END, m.icount, end,
                            res.vcpu))
    finally:
        writer.close()
    return res, m


class Replayer:
    """Replay a log, checking every digest; ``run()`` returns the RunResult or raises Divergence.

    ``log`` is a path, or a binary stream (a socket's file) whose events are
    read as the replay needs them.
    """

    def __init__(self, log, image: bytes | None = None, serial=None, verify: bool = True):
        if hasattr(log, "read"):
            self.reader = StreamLogReader(log)
            self._stream = True
        else:
            self.reader = LogReader(log)
            self._stream = False
        self.header = self.reader.header
        cfg = self.header.config
        self.cfg = cfg
        check_config(cfg)
        if image is None:
            path = _find_image(cfg)
            try:
                image = read_file(path)
            except OSError as e:
                raise ReplayError(f"cannot read the recorded image {path}: {e.strerror} (pass --image PATH)") from None
        sha = hashlib.sha256(image).hexdigest()
        self.image_changed = sha != cfg["image"]["sha256"]
        self.m = self._build_machine(cfg, image, serial)
        self.verify = verify
        # the events read so far (time travel moves the position back)
        self.events: list[Event] = []
        self._source = iter(self.reader)
        self._exhausted = False
        self._cut = False
        self._pos = 0
        self._next: Event | None = None
        self.last_event: Event | None = None
        self.events_used = 0
        if not self._stream:
            self._fetch_to(1 << 62)  # every event now: damage anywhere is found before the machine runs
        self._advance()
        # the image event comes first
        if self._next is not None and self._next.kind == EventKind.DISK_IMAGE:
            self._take()
        m = self.m
        m.set_boundary(ReplayBoundary(lambda: self._next, self._take))
        if cfg.get("input", "none") != "none":
            m.start_input_polling()
        # a machine restored with its digest timer (a backup joining a running primary,
        # replay/ft/backup.py) keeps that one: its deadline and order are the recording's
        self._digests = _Digests(m, cfg["digest_ticks"], cfg["mem_digest_every"], self._check,
                                 schedule=m.clock.find("digest") is None)
        if verify:
            hashes = self._digests.page_hashes()
            try:
                self._check(self._digests.snapshot(True, hashes))
            except Divergence as d:
                d.what = "the initial machine state differs from the recording: " + (
                    "the image changed since recording" if self.image_changed else d.what)
                raise
            if state_digest(m, hashes) != self.header.initial_digest:
                raise self._diverge("the initial machine state differs from the recording (header digest)")
        else:
            self._skip_initial()

    def _build_machine(self, cfg: dict, image: bytes, serial) -> PcMachine:
        """The machine the replay starts from: the snapshot the log names, or a boot."""
        if cfg.get("snapshot"):
            return _machine_from_snapshot_ref(cfg["snapshot"], serial, image)
        return build_recorded_machine(cfg, image, serial or NullBackend())

    def _skip_initial(self) -> None:
        while self._next is not None and self._next.icount == 0 and self._next.kind in (
                EventKind.REG_DIGEST, EventKind.MEM_DIGEST, EventKind.OUTPUT_DIGEST):
            self._take()

    # -- the event stream --------------------------------------------------------
    def _fetch_to(self, i: int) -> bool:
        """Read events from the log until index i exists (False at the log's end)."""
        while len(self.events) <= i and not self._exhausted:
            try:
                self.events.append(next(self._source))
            except StopIteration:
                self._exhausted = True
        return i < len(self.events)

    def _advance(self) -> None:
        self._next = self.events[self._pos] if self._fetch_to(self._pos) else None

    def _take(self) -> Event:
        e = self._next
        assert e is not None
        self.last_event = e
        self.events_used += 1
        self._pos += 1
        self._advance()
        return e

    @property
    def truncated(self) -> bool:
        return bool(self.reader.truncated)

    # -- checkpoint support: the replay position is part of the machine's story --
    def save_position(self) -> dict:
        return {"pos": self._pos, "used": self.events_used, "digests": self._digests.n}

    def load_position(self, st: dict) -> None:
        self._digests.forget()
        self._pos = st["pos"]
        self.events_used = st["used"]
        self._digests.n = st["digests"]
        self.last_event = self.events[self._pos - 1] if self._pos else None
        self._advance()

    def timer_restorers(self) -> dict:
        return {"digest": self._digests.fire}

    @property
    def end_event(self) -> Event | None:
        """The recording's END event (for a stream: only once it has been read)."""
        if not self._stream:
            self._fetch_to(1 << 62)
        for e in reversed(self.events):
            if e.kind == EventKind.END:
                return e
        return None

    @property
    def end_icount(self) -> int | None:
        """The icount at which the recording ends (its END event), if it has one."""
        e = self.end_event
        return None if e is None else e.icount

    def _describe(self, e: Event | None) -> str:
        if e is None:
            return "(none: the start of the recording)"
        who = f" vCPU {e.vcpu}" if len(self.m.vcpus) > 1 else ""
        return f"{e.kind.name}{who} at icount {e.icount} ({len(e.payload)} bytes)"

    def _diverge(self, what: str, **kw) -> Divergence:
        m = self.m
        v = m.current
        if len(m.vcpus) > 1:
            what = f"vCPU {v.id} at its icount {v.icount}: {what}"
        return Divergence(m.icount, v.rip, what, self._describe(self.last_event), **kw)

    def _check(self, snapshot: list[Event]) -> None:
        for mine in snapshot:
            e = self._next
            if e is None:
                if self.reader.truncated or not self.reader.complete:
                    # a log cut inside a chunk (a recorder that died) or its tail lost: no evidence
                    # and no input past its last whole chunk, so the replay stops here (and the
                    # caller says it ended early: replay_ended_early)
                    if self._stream and not self._cut:
                        self._cut = True
                        self.m.request_host_stop("the log stream ends before the recording did")
                    return
                raise self._diverge(f"the recording has no more events but replay reached a {mine.kind.name}")
            if e.kind in INPUT_KINDS and e.icount <= mine.icount:
                raise self._diverge(f"{e.kind.name} recorded at icount {e.icount} was never asked for")
            if e.kind != mine.kind or e.icount != mine.icount or e.vcpu != mine.vcpu:
                raise self._diverge(f"expected {self._describe(e)}, replay produced {self._describe(mine)}")
            self._take()
            if not self.verify or e.payload == mine.payload:
                continue
            if e.kind == EventKind.REG_DIGEST:
                want, got = ev.decode_regs(e.payload), ev.decode_regs(mine.payload)
                diff = {k: (want[k], got.get(k, 0)) for k in want if want[k] != got.get(k, 0)}
                what = "registers differ" + (f" (vCPU {e.vcpu})" if len(self.m.vcpus) > 1 else "")
                raise self._diverge(what, reg_diff=diff)
            if e.kind == EventKind.MEM_DIGEST:
                want, got = ev.decode_page_hashes(e.payload), ev.decode_page_hashes(mine.payload)
                pages = [i for i in range(min(len(want), len(got))) if want[i] != got[i]]
                raise self._diverge("guest memory differs", pages=pages)
            if e.kind == EventKind.OUTPUT_DIGEST:
                name, count, _ = ev.decode_output_digest(e.payload)
                _, mcount, _ = ev.decode_output_digest(mine.payload)
                raise self._diverge(f"output stream {name} differs (recorded {count} bytes, replay {mcount})")

    def run(self, until: int | None = None) -> RunResult:
        """Replay to the end (or to exactly ``until`` instructions).

        A truncated log (a killed recorder) holds no evidence past its last
        whole chunk, and no input either: the replay stops there.  A recording
        that ended by itself (a triple fault, a halt, a CPU error, a guest
        exit) replays to that same end.
        """
        m = self.m
        limit = until
        if self.reader.truncated or (self._stream and self._exhausted and self.end_event is None) \
                or (not self._stream and not self.reader.complete):
            last = self.reader.last_icount or 0
            limit = last if limit is None else min(limit, last)
        end = self.end_event
        end_limit = _end_limit(end)
        if end_limit is not None:
            limit = end_limit if limit is None else min(limit, end_limit)
        try:
            res = m.run(limit)
        except InputMismatch as e:
            raise self._diverge(str(e)) from None
        if self._cut and res.reason is StopReason.HOST:
            # the stream ended inside a chunk: as a cut file, the replay ends at its last whole chunk
            return RunResult(StopReason.LIMIT, res.icount, 0, "the log ends before the recording did", res.exit,
                             res.counts)
        if res.reason is StopReason.LIMIT and (end is None or m.icount < end.icount or self.reader.truncated
                                                or (until is not None and until < (end_limit or 0))):
            return res
        # the run ended: the recording must end the same way
        self._check(self._digests.snapshot(True))
        e = self._next
        if e is None:
            if self.reader.truncated:
                return res
            raise self._diverge("the recording ended earlier than the replay")
        if e.kind != EventKind.END:
            raise self._diverge(f"replay ended ({res.reason.value}) but the recording continues with {e.kind.name} "
                                f"at icount {e.icount}")
        end = self._take()
        reason, status, msg = ev.decode_end(end.payload)
        replayed = res.reason.value
        if reason in (StopReason.HOST.value, StopReason.BREAKPOINT.value) and res.reason is StopReason.LIMIT:
            # the host stopped the recording there; the replay stops at the same count
            res = RunResult(StopReason(reason), res.icount, status, msg, res.exit, res.counts, res.vcpu)
            replayed = reason
        if end.icount != m.icount or reason != replayed or status != res.status:
            raise self._diverge(f"the run ended differently: recorded {reason} (status {status}) at icount "
                                f"{end.icount}, replay {res.reason.value} (status {res.status}) at icount {m.icount}")
        return res


def replay_ended_early(rp: Replayer, res: RunResult, until: int | None) -> str | None:
    """Why a finished replay did not reach the end of the recording (None if it did, or
    if it stopped at ``until`` first): the log ends before its END (cut, or its tail lost)."""
    if rp.reader.complete:
        return None
    if until is not None and res.icount >= until:
        return None
    note = rp.reader.incomplete_note or "the log ends before the recording did"
    return f"{note} (replayed to icount {res.icount})"


def _snapshot_ref(path: str) -> dict:
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return {"path": os.path.abspath(path), "sha256": sha}


def _machine_from_snapshot_ref(ref: dict, serial, image: bytes) -> PcMachine:
    """The machine a recording started from: the snapshot it names, checked by hash."""
    from vmm.state import SnapshotError

    if not isinstance(ref, dict) or not isinstance(ref.get("path"), str) or not isinstance(ref.get("sha256"), str):
        raise ev.LogFormatError("the log header names its starting snapshot badly")
    try:
        sha = hashlib.sha256(read_file(ref["path"], MAX_SNAPSHOT)).hexdigest()
    except OSError as e:
        raise ReplayError(f"cannot read the snapshot the recording started from, {ref['path']}: {e.strerror}") from None
    if sha != ref["sha256"]:
        raise ReplayError(f"the snapshot {ref['path']} changed since the recording started from it (sha256)")
    try:
        m, _cfg = load_snapshot(ref["path"], serial, image)
    except SnapshotError as e:
        raise ReplayError(f"the snapshot the recording started from cannot be used: {e}") from None
    return m
