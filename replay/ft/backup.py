"""The backup of a fault-tolerant pair: a ``Replayer`` reading the primary's
log from the link, held a horizon behind it, that goes live where the
primary's last horizon was.

The replay may pass a horizon tick only once a later horizon has arrived, so
it is never beyond the last point where the log is known to be whole.  When
the link fails, the backup tries the arbiter; won, it replays to the last
horizon it holds (every event before it is there), stops exactly there, and
continues the same machine live: input from the console's clients, output to
them at the same console address, from the output position each client says
it holds.  Lost, the primary is live and the backup stops.
"""
from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from replay import events as ev
from replay.boundary import InputMismatch
from replay.events import EventKind
from replay.ft import wire
from replay.ft.arbiter import LOST, UNREACHABLE, WON, Arbiter
from replay.ft.console import ConsoleServer
from replay.ft.netgate import Retained
from replay.ft.primary import FLUSH_TICKS, FORMING_PATIENCE, JOIN_SNAPSHOT, Fenced, FtError
from replay.logfile import StreamLogReader
from replay.session import VMM_VERSION, Replayer
from vmm.boundary import CONSOLE, Boundary
from vmm.machine import RunResult, StopReason


class _Feed:
    """A binary stream the link's receiver fills; read() blocks until bytes come or the link ends."""

    name = "<ft link>"
    closed = False

    def __init__(self):
        self._buf = bytearray()
        self._cv = threading.Condition()
        self._ended = False
        self._kept: bytearray | None = None

    def mark(self) -> None:
        """Keep what is read from now on, for ``rewind``."""
        with self._cv:
            self._kept = bytearray()

    def rewind(self) -> None:
        """Put back what was read since ``mark`` (the handshake reads the log header twice)."""
        with self._cv:
            self._buf[:0] = self._kept
            self._kept = None
            self._cv.notify_all()

    def put(self, data: bytes) -> None:
        with self._cv:
            self._buf += data
            self._cv.notify_all()

    def ready(self) -> bool:
        """A read would not block: bytes are here (whole chunks: the link carries nothing less), or the end."""
        with self._cv:
            return bool(self._buf) or self._ended

    def end(self) -> None:
        with self._cv:
            self._ended = True
            self._cv.notify_all()

    def read(self, n: int = -1) -> bytes:
        with self._cv:
            while not self._buf and not self._ended:
                self._cv.wait()
            if n < 0:
                n = len(self._buf)
            out = bytes(self._buf[:n])
            del self._buf[:n]
            if self._kept is not None:
                self._kept += out
            return out


class LiveReplica(Replayer):
    """A replay that checks every digest like any other while the primary lives,
    stops at the tick ``stop_at`` when told to, and then runs live."""

    def __init__(self, feed: _Feed, image: bytes | None, serial, gate: Callable[[int], int | None],
                 join: JoinState | None = None, drive_files: dict[str, str] | None = None):
        self.live = False
        self._drive_files = drive_files or {}
        self.stop_at: int | None = None
        self._feed = feed
        self._join = join
        self._gate = gate
        self.input_base = join.input if join is not None else 0
        super().__init__(feed, image=image, serial=serial, verify=True)
        if join is not None:
            self._digests.n = join.digests      # the recording's digest count: memory digests fall alike
        self.position = 0

    def _build_machine(self, cfg: dict, image: bytes, serial):
        """A joining backup's machine: the snapshot the primary sent, with the timers of the
        pair (the digest timer, the horizon timer) at their deadlines and in their order."""
        _local_drives(cfg, self._drive_files)
        if self._join is None:
            return super()._build_machine(cfg, image, serial)
        import tempfile

        from devices.base import DeviceStateError
        from replay.session import ReplayError, build_recorded_machine
        from vmm.state import SnapshotError, read_snapshot

        ref = cfg.get("snapshot")
        snap = self._join.snapshot
        if not isinstance(ref, dict) or ref.get("path") != JOIN_SNAPSHOT \
                or ref.get("sha256") != hashlib.sha256(snap).hexdigest():
            raise ReplayError("the log does not start from the snapshot the primary sent")
        with tempfile.TemporaryDirectory(prefix="vmm-ft-join") as d:
            path = f"{d}/join.snap"
            with open(path, "wb") as f:
                f.write(snap)
            try:
                header, parts = read_snapshot(path)
            except SnapshotError as e:
                raise ReplayError(f"the primary's snapshot: {e}") from None
        restorers = {"digest": lambda now: self._digests.fire(now), "ft-horizon": lambda now: self._tick(now)}
        _local_drives(header["config"], self._drive_files)
        try:
            m = build_recorded_machine(header["config"], image, serial, parts, restorers=restorers)
        except DeviceStateError as e:
            raise ReplayError(f"the primary's snapshot does not load: {e}") from None
        if m.icount != header["icount"] or m.icount != self._join.icount:
            raise ReplayError(f"the primary's snapshot holds icount {m.icount}, it said {self._join.icount}")
        return m

    def _fetch_to(self, i: int) -> bool:
        """As the Replayer's, except that it never waits for a chunk that has not come: the
        horizon gate guarantees every event before the next stop is here by then, so an
        empty link means no event before it (the base class would block here on the next
        chunk, holding the replay a whole digest interval behind)."""
        while len(self.events) <= i and not self._exhausted:
            if not self._feed.ready():
                return False
            chunk = self.reader._next_chunk()
            if chunk is None:
                self.reader._done = True
                self._exhausted = True
            else:
                self.events.extend(chunk)
        return i < len(self.events)

    def start_ticks(self) -> None:
        self.m.clock.schedule_in(FLUSH_TICKS, self._tick, "ft-horizon")

    def _tick(self, now: int) -> None:
        # the same timer, at the same ticks, as the primary's horizon timer
        if self.live:
            return
        self.position = now
        latest = self._gate(now)
        if self._next is None:
            self._advance()         # the events up to the next horizon are here now
        if self.stop_at is not None and now >= self.stop_at:
            self.m.request_host_stop("takeover")
            return
        # the next gate: the latest of the primary's horizons heard of (they come wherever
        # its run loop stopped after FLUSH_TICKS, so they are not multiples of it)
        nxt = latest if latest is not None and latest > now else now + FLUSH_TICKS
        self.m.clock.schedule(nxt, self._tick, "ft-horizon")

    def _check(self, snapshot) -> None:
        if self.live or (self.stop_at is not None and self.m.clock.now() >= self.stop_at):
            return   # at or past the last horizon: the primary's log may not hold these
        super()._check(snapshot)

    def replay(self) -> RunResult:
        """Replay until the takeover stop (reason HOST) or the guest's end (checked against the END)."""
        m = self.m
        # the point the replay starts from (tick 0, or a joined backup's join point) is a
        # horizon too: pass it only once the log is known whole beyond it (a guest may end
        # before the horizon timer first fires), or stop right there to take over
        self._gate(m.clock.now())
        if self.stop_at is not None and m.clock.now() >= self.stop_at:
            return RunResult(StopReason.HOST, m.icount, message="takeover")
        try:
            res = m.run(None)
        except InputMismatch as e:
            raise self._diverge(str(e)) from None
        if res.reason is StopReason.HOST:
            return res      # the takeover point, or the primary holds the arbiter
        self._check(self._digests.snapshot(True))
        e = self._next
        if e is None or e.kind != EventKind.END:
            raise self._diverge(f"the replay ended ({res.reason.value}) where the primary's log does not")
        end = self._take()
        reason, status, _msg = ev.decode_end(end.payload)
        if end.icount != m.icount or reason != res.reason.value or status != res.status:
            raise self._diverge(f"the run ended differently: primary {reason} (status {status}) at icount "
                                f"{end.icount}, backup {res.reason.value} (status {res.status}) at {m.icount}")
        return res

    def input_position(self) -> int:
        """Console input bytes the replayed machine took (the live side's input position)."""
        return self.input_base + sum(len(e.payload) for e in self.events[:self._pos] if e.kind == EventKind.CONSOLE_INPUT)

    def go_live(self, console: ConsoleServer) -> None:
        self.live = True
        m = self.m
        m.set_boundary(Boundary())
        m.boundary.attach(CONSOLE, console.poll_input)
        m.pace_idle = True


def _local_drives(cfg: dict, files: dict[str, str]) -> None:
    """This host's copies of the primary's disks: the drive named NAME opens the file
    ``files[NAME]`` (vmm ft backup --drive-file NAME=PATH) instead of the primary's path."""
    import os

    for d in cfg.get("drives") or []:
        if isinstance(d, dict) and d.get("name") in files:
            d["path"] = os.path.abspath(files[d["name"]])


@dataclass
class JoinState:
    """What a primary sends a backup that joins it: where the new log starts."""
    generation: int        # the arbiter's lease of the new pairing
    icount: int
    digests: int           # digests the recording wrote before the join point
    input: int             # console input bytes the machine took before it
    snapshot: bytes


@dataclass
class BackupResult:
    result: RunResult
    outcome: str            # "primary-finished" | "took-over" | "fenced"
    detected_after: float | None = None   # seconds from the last thing heard to the declaration
    takeover_tick: int | None = None


SIDE_GRACE_BEATS = 5    # heartbeats a backup waits for a primary still heard on the second path
PROGRESS_EVERY = 4      # horizons at most between two reports of the replay's position (--max-lag is at least 4)


class Backup:
    def __init__(self, listen: tuple[str, int] | None, *, image: bytes | None = None, arbiter: str | None = None,
                 console: tuple[str, int] | None = None, heartbeat: float = 0.05,
                 say: Callable[[str], None] = lambda s: None,
                 nics: tuple[int, Callable[[object], None]] | None = None,
                 drive_files: dict[str, str] | None = None):
        self.listen_addr = listen
        self.drive_files = drive_files or {}      # drive name -> this host's copy of its image
        self.image = image
        self.arbiter_path = arbiter
        self.console_addr = console
        self.heartbeat = heartbeat
        self.say = say
        self.cv = threading.Condition()
        self.hello: dict | None = None
        self.horizon = -1     # HORIZON 0 follows the initial events: the replay can be built then
        self._acked = -1
        self._ticks = 0
        self._position = 0    # the horizon tick the replay reached last (its gate)
        self._reported = 0    # the value of _ticks when the primary was last told the replay's position
        self._told = 0        # ... and the position it was told
        self.lost: str | None = None
        self.lost_at: float | None = None
        self.heard_last: float | None = None
        self.bye = False
        self.decision: str | None = None      # WON / LOST once the arbiter answered
        self.feed = _Feed()
        self.link: wire.Link | None = None
        self.replica: LiveReplica | None = None
        self.side: wire.SidePath | None = None
        self._peer_host = "127.0.0.1"
        self._srv: socket.socket | None = None
        self.joining = False          # --join: this backup joins a primary that runs alone
        self.generation = 0           # the arbiter's lease this pairing contends for
        self.accepted = False         # ACCEPT sent: this side may go live
        self.refused: str | None = None
        self.join_meta: dict | None = None
        # (how many, connect(machine)): the NIC backends this side uses once live (--nic)
        self.nics = nics
        self.frames_sent = 0          # the primary sent every frame its NICs produced before this tick
        self.snap = bytearray()
        self.output = bytearray()
        # a takeover's steps, host monotonic times: heard (the primary last heard), lost (declared
        # lost), decided (the arbiter won), stopped (the replay reached the last horizon),
        # listening (the console served), first (the first byte a client got); tail: ticks
        # the replay still had to go when the arbiter was won
        self.timeline: dict[str, float] = {}

    def bind(self) -> tuple[str, int]:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(self.listen_addr)
        s.listen(1)
        self._srv = s
        return s.getsockname()[:2]

    # -- the link's side ----------------------------------------------------------------
    def _on_message(self, kind: bytes, payload: bytes) -> None:
        if kind == wire.LOG:
            self.feed.put(payload)
        elif kind == wire.HORIZON:
            with self.cv:
                self.horizon = max(self.horizon, wire.read_u64(payload))
                if len(payload) >= 16:
                    self.frames_sent = max(self.frames_sent, wire.read_u64(payload, 1))
                self.cv.notify_all()
        elif kind == wire.HELLO:
            with self.cv:
                try:
                    import json

                    self.hello = json.loads(payload)
                except ValueError:
                    self.hello = {}
                self.cv.notify_all()
        elif kind == wire.BYE:
            with self.cv:
                self.bye = True
                self.cv.notify_all()
        elif kind == wire.SNAP:
            self.snap += payload
        elif kind == wire.OUTPUT:
            self.output += payload
        elif kind == wire.JOIN:
            import json

            try:
                meta = json.loads(payload)
            except ValueError:
                meta = None
            self.join_meta = meta if isinstance(meta, dict) else {}
        elif kind == wire.REFUSE:
            with self.cv:
                self.refused = payload.decode(errors="replace")
                self.cv.notify_all()

    def _ack(self) -> None:
        """After each read from the link: acknowledge the last horizon it brought (the log
        up to it came before it), one ACK however many horizons the read held.  The ACK
        carries the replay's position too (a PROGRESS the primary need not be woken for)."""
        h = self.horizon
        if h > self._acked:
            self._acked = h
            self._reported = self._ticks
            self._told = self._position
            self.link.send(wire.ACK, wire.u64(h) + wire.u64(self._position))

    def _on_lost(self, reason: str) -> None:
        with self.cv:
            self.lost_at = time.monotonic()
            self.heard_last = self.link.last_heard if self.link else None
            self.timeline.update(lost=self.lost_at, heard=self.heard_last or self.lost_at)
            if self.bye:
                self.feed.end()
                self.cv.notify_all()
                return
            self.lost = reason
            self.cv.notify_all()
            # a joining backup that never said ACCEPT never goes live: the primary goes on
            contend = not (self.joining and not self.accepted)
        self.feed.end()
        if not contend:
            return
        threading.Thread(target=self._contend, name="ft-arbiter", daemon=True).start()

    def _contend(self) -> None:
        arb = Arbiter(self.arbiter_path, self.generation)
        warned = False
        # the primary still answers on the second path: only the link failed.  Leave it the
        # lease for a while (it goes on alone) rather than take over from a healthy primary.
        grace = time.monotonic() + SIDE_GRACE_BEATS * self.heartbeat
        if self.link.silent and self.side is not None and self.side.alive():
            self.say(f"the link to the primary failed ({self.lost}) but it answers on the second path: "
                     f"leaving it the arbiter for {SIDE_GRACE_BEATS * self.heartbeat:.3g} s")
            while time.monotonic() < grace and self.side.alive() and arb.holder() is None:
                time.sleep(self.heartbeat / 4)
        while True:
            outcome, detail = arb.try_acquire("backup")
            if outcome in (WON, LOST):
                with self.cv:
                    self.decision = outcome
                    if outcome == WON:
                        self.timeline["decided"] = time.monotonic()
                        self.stop_tick = self.horizon
                        if self.replica is not None:
                            self.replica.stop_at = self.horizon
                            self.timeline["tail"] = max(0, self.horizon - self.replica.position)
                    self.cv.notify_all()
                if outcome == LOST:
                    self.say(f"the primary is lost ({self.lost}) but holds the arbiter ({detail}): stopping")
                return
            if outcome == UNREACHABLE and not warned:
                self.say(f"the primary is lost ({self.lost}); the arbiter cannot be reached ({detail}): retrying")
                warned = True
            time.sleep(self.heartbeat)

    def _gate(self, now: int) -> int:
        """At each horizon tick of the replay: go on only once the log is known whole past it."""
        self._ticks += 1
        self._position = now
        if self._ticks - self._reported >= PROGRESS_EVERY:
            # no ACK told the primary where the replay is for a while (it waits under
            # --max-lag and sends no horizons, or the replay catches up on a backlog)
            self._reported = self._ticks
            self._told = now
            self.link.send(wire.PROGRESS, wire.u64(now))
        with self.cv:
            lag = (self.hello or {}).get("max_lag")
            if self.horizon <= now and isinstance(lag, int) and now - self._told > lag // 2:
                # about to wait for the next horizon while the primary may be waiting for
                # this side under --max-lag (it sends none then): tell it where the replay is
                self._reported = self._ticks
                self._told = now
                self.link.send(wire.PROGRESS, wire.u64(now))
            while self.horizon <= now and self.decision is None:
                self.cv.wait(self.heartbeat)
            if self.decision == LOST:
                self.replica.m.request_host_stop("the primary holds the arbiter")
            return self.horizon

    # -- the run -----------------------------------------------------------------------
    def serve(self, wait: float | None = None, linger: float = 10.0) -> BackupResult:
        if self._srv is None:
            self.bind()
        self._srv.settimeout(wait)
        try:
            conn, peer = self._srv.accept()
        except TimeoutError:
            raise FtError(f"no primary connected within {wait} s") from None
        self._srv.close()
        return self._follow(conn, peer, linger)

    def join(self, primary: tuple[str, int], wait: float = 30.0, linger: float = 10.0) -> BackupResult:
        """Join a primary that runs alone (its backup died): ask on its console address;
        it sends the machine's state at its next horizon and a log from there."""
        self.joining = True
        try:
            conn = wire.connect(primary, wait, "primary")
        except OSError as e:
            raise FtError(str(e)) from None
        try:
            conn.sendall(b"JOIN\n")
            peer = conn.getpeername()
        except OSError as e:
            raise FtError(f"the primary at {primary[0]}:{primary[1]} closed the connection: "
                          f"{e.strerror or e}") from None
        return self._follow(conn, peer, linger)

    def _follow(self, conn: socket.socket, peer, linger: float) -> BackupResult:
        from replay.events import LogFormatError
        from replay.session import Divergence, ReplayError
        from vmm.state import SnapshotError

        conn.settimeout(None)
        self._peer_host = peer[0]
        self.side = wire.SidePath(conn.getsockname()[0], self.heartbeat)
        self.side.start()
        self.link = wire.Link(conn, self.heartbeat, self._on_message, self._on_lost)
        self.link.on_batch = self._ack
        self.link.patience = FORMING_PATIENCE
        self.link.start()
        with self.cv:
            self.cv.wait_for(lambda: self.hello is not None or self.lost is not None or self.refused is not None,
                             timeout=60)
        if self.refused is not None:
            self.link.close(drain=0)
            raise FtError(f"the primary refused: {self.refused}")
        hello = self.hello
        if hello is None:
            raise FtError("the primary said nothing")

        def refuse(why: str) -> FtError:
            self.link.send(wire.REFUSE, why.encode())
            self.link.close()
            return FtError(why)

        if hello.get("protocol") != wire.PROTOCOL:
            raise refuse(f"FT protocol {hello.get('protocol')!r}, this backup speaks {wire.PROTOCOL}")
        if bool(hello.get("join")) != self.joining:
            raise refuse("a primary that starts needs a backup that listens (--listen), "
                         "one that runs alone a backup that joins (--join)")
        gen = hello.get("generation", 0)
        if not isinstance(gen, int) or not 0 <= gen < 1 << 32:
            raise refuse(f"the primary's lease generation {gen!r} is not a count")
        self.generation = gen
        if self.arbiter_path is not None and not hello.get("arbiter"):
            raise refuse("this backup has an arbiter (--arbiter) and the primary none: both or neither")
        if self.arbiter_path is None:
            self.arbiter_path = hello.get("arbiter")
        held = Arbiter(self.arbiter_path, self.generation).check_free()
        if held:
            raise refuse(held)
        hb = hello.get("heartbeat")
        if isinstance(hb, (int, float)) and 0.001 <= hb <= 60:
            self.heartbeat = self.link.heartbeat = self.side.heartbeat = float(hb)
        # the handshake reads the log header (image hashes, configuration) and answers before
        # the primary runs an instruction; the replay then reads the header again
        with self.cv:
            self.cv.wait_for(lambda: self.horizon >= 0 or self.lost is not None, timeout=FORMING_PATIENCE)
        if self.horizon < 0:
            if self.joining and self.lost is not None:
                raise FtError(f"the primary went away before it sent the machine's state ({self.lost})")
            raise FtError("the primary sent no initial state")
        join = None
        if self.joining:
            meta = self.join_meta or {}
            try:
                join = JoinState(int(meta["generation"]), int(meta["icount"]), int(meta["digests"]),
                                 int(meta["input"]), bytes(self.snap))
                whole = len(self.snap) == int(meta["snapshot_bytes"]) and len(self.output) == int(meta["output"])
            except (KeyError, TypeError, ValueError):
                whole = False
            if not whole or join.generation != self.generation:
                raise refuse("the machine's state came incomplete")
        self.feed.mark()
        try:
            cfg = StreamLogReader(self.feed).header.config
        except LogFormatError as e:
            raise refuse(f"the primary's log header: {e}") from None
        self.feed.rewind()
        why = self._disagreement(cfg)
        if why:
            raise refuse(why)
        have = len(cfg.get("nics") or [])
        if self.nics is not None and self.nics[0] != have:
            raise refuse(f"the primary's machine has {have} network cards, this backup's --nic options "
                         f"name {self.nics[0]}")
        side_port = hello.get("side_port")
        if isinstance(side_port, int) and 0 < side_port < 65536:
            self.side.peer = (self._peer_host, side_port)
        accept = wire.pack_json({"vmm_version": VMM_VERSION, "side_port": self.side.port})
        if not self.joining:
            self.accepted = True
            self.link.send(wire.ACCEPT, accept)
        console = ConsoleServer("backup")
        console.preload(bytes(self.output))
        try:
            rp = LiveReplica(self.feed, self.image, console, self._gate, join, self.drive_files)
        except (LogFormatError, ReplayError, Divergence, SnapshotError, OSError) as e:
            why = f"the backup cannot follow the primary: {str(e).splitlines()[0]}"
            if self.joining:
                raise refuse(why) from None
            self.link.close(drain=0)
            raise FtError(why) from None
        if self.joining:
            # a joining backup answers once it holds a machine that can go live
            with self.cv:
                if self.lost is not None:
                    raise FtError(f"the primary went away before this backup could follow it ({self.lost})")
                self.accepted = True
            self.link.send(wire.ACCEPT, accept)
        self.replica = rp
        hub = getattr(rp.m, "net_input", None)
        for port in (hub.ports.values() if hub is not None else ()):
            port.wire = Retained(rp.m.clock.now, lambda: self.frames_sent)
        if hub is not None and hub.ports and self.nics is None:
            self.say("this backup has no --nic: once live, its network cards reach no network")
        with self.cv:
            if self.decision == WON:
                rp.stop_at = self.horizon
        if join is not None:
            self.say(f"joined the primary at {peer[0]}:{peer[1]} at icount {join.icount} "
                     f"(state {len(join.snapshot):,} bytes, lease generation {self.generation}); replaying "
                     f"{rp.cfg['image']['name']} ({rp.cfg.get('vcpus', 1)} vCPU)")
        else:
            self.say(f"paired with the primary at {peer[0]}:{peer[1]}; replaying "
                     f"{rp.cfg['image']['name']} ({rp.cfg.get('vcpus', 1)} vCPU)")
            rp.start_ticks()     # a joining backup's horizon timer came with the snapshot
        self.link.patience = None
        try:
            res = rp.replay()
        except Divergence as d:
            self.link.close(drain=0)
            raise FtError(f"the backup's replay diverged from the primary: {str(d).splitlines()[0]}") from None
        if self.decision == LOST:
            raise Fenced()
        addr = self.console_addr or tuple(hello.get("console") or ("127.0.0.1", 0))
        if res.reason is StopReason.HOST and rp.stop_at is not None:
            self.timeline["stopped"] = time.monotonic()
            console.on_first_release = self._first_output
            rp.go_live(console)
            self._nics_live(rp.m)
            console.go_alone(rp.input_position())
            console.status = lambda: {"state": "took over", "takeover_tick": rp.stop_at,
                                      "failure": self.lost, "arbiter": self.arbiter_path}
            self._listen_console(console, addr)
            self.timeline["listening"] = time.monotonic()
            detected = (self.lost_at - self.heard_last) if self.lost_at and self.heard_last else None
            self.say(f"the primary is lost ({self.lost}); live from tick {rp.stop_at} (icount {rp.m.icount}), "
                     f"console on {console.address[0]}:{console.address[1]}")
            res = rp.m.run(None)
            console.finish(_status(res))
            _linger(console, linger)
            return BackupResult(res, "took-over", detected, rp.stop_at)
        # the guest ended, as it did on the primary
        status = _status(res)
        with self.cv:
            self.cv.wait_for(lambda: self.bye or self.decision is not None)
        if self.bye:
            self.link.close(drain=0)
            return BackupResult(res, "primary-finished")
        with self.cv:
            self.cv.wait_for(lambda: self.decision is not None)
        if self.decision == LOST:
            raise Fenced()
        # the primary died after the end, perhaps before every output was out: serve them
        console.go_alone(rp.input_position())
        self._listen_console(console, addr)
        console.finish(status)
        _linger(console, linger)
        return BackupResult(res, "took-over")

    def _first_output(self, when: float) -> None:
        """The console's thread: the first output a client got from this side, live; say where
        the time since the primary was lost went (benchmarks/ft.py reads this line)."""
        t = dict(self.timeline, first=when)
        self.timeline = t
        self.say(takeover_line(t))

    def _nics_live(self, m) -> None:
        """Going live: the NICs join this side's backends, and the frames the primary may not
        have sent (those after the last point it reported) go out again."""
        hub = getattr(m, "net_input", None)
        if hub is None or not hub.ports:
            return
        kept = {nic_id: port.wire for nic_id, port in hub.ports.items()}
        for port in hub.ports.values():
            port.wire = None
        if self.nics is None:
            return
        try:
            self.nics[1](m)
        except (OSError, ValueError) as e:      # a backend that cannot be opened: one line
            self.say(f"the network cards stay off the network: {e}")
            return
        again = 0
        for nic_id, port in hub.ports.items():
            old = kept[nic_id]
            if port.wire is None or not isinstance(old, Retained):
                continue
            for frame in old.unsent():
                try:
                    port.wire.send(frame)
                    again += 1
                except OSError:
                    port.host_errors += 1
        self.say(f"network cards live; {again} frame(s) after the primary's last report sent again")

    def _disagreement(self, cfg: dict) -> str | None:
        """Why this backup cannot replay the machine the primary's header describes (None if it can)."""
        from replay.session import _find_image

        if not isinstance(cfg, dict) or not isinstance(cfg.get("image"), dict):
            return "the primary's log header does not describe its image"
        if cfg.get("vmm_version") != VMM_VERSION:
            return f"the primary runs vmm {cfg.get('vmm_version')}, this backup {VMM_VERSION}"
        if self.image is None:
            path = _find_image(cfg)
            try:
                with open(path, "rb") as f:
                    self.image = f.read()
            except OSError as e:
                return f"this backup cannot read the image {path}: {e.strerror} (give it --image PATH)"
        sha = hashlib.sha256(self.image).hexdigest()
        want = cfg["image"].get("sha256")
        if sha != want:
            return (f"the image differs: the primary's {cfg['image'].get('name')} has sha256 {str(want)[:16]}..., "
                    f"this backup's {sha[:16]}...")
        return self._drives_differ(cfg)

    def _drives_differ(self, cfg: dict) -> str | None:
        """Why this backup's copies of the primary's disks cannot replay it (None if they can):
        each must hold what the primary's held when its run began (size and SHA-256)."""
        from host.images import ImageError, open_image
        from vmm.platform.storage import check_config

        try:
            drives = check_config(cfg.get("drives"))
        except ValueError as e:
            return f"the primary's log header: {e}"
        unknown = sorted(set(self.drive_files) - {d["name"] for d in drives})
        if unknown:
            return f"--drive-file {unknown[0]}: the primary's machine has no drive of that name " \
                   f"({', '.join(d['name'] for d in drives) or 'it has none'})"
        for d in drives:
            path = self.drive_files.get(d["name"], d["path"])
            try:
                with open_image(path, False, d["format"]) as img:
                    size, sha = img.size, img.sha256()
            except (ImageError, OSError) as e:
                why = str(e) if isinstance(e, ImageError) else f"{path}: {e.strerror or e}"
                return f"this backup cannot open the disk {d['name']}: {why} (give it --drive-file {d['name']}=PATH)"
            if d.get("sha256") is None or size != d["size"] or sha != d["sha256"]:
                return (f"the disk {d['name']} differs: the primary's has sha256 {str(d.get('sha256'))[:16]}... "
                        f"({d['size']:,} bytes), this backup's {path} {sha[:16]}... ({size:,} bytes)")
        return None

    def _listen_console(self, console: ConsoleServer, addr) -> None:
        end = time.monotonic() + 5.0
        while True:
            try:
                console.listen(addr[0], int(addr[1]))
                return
            except OSError as e:
                if time.monotonic() > end:
                    raise FtError(f"cannot serve the console on {addr[0]}:{addr[1]}: {e.strerror}") from None
                time.sleep(0.02)


def takeover_line(t: dict[str, float]) -> str:
    """'takeover: ...' with the milliseconds of each step of a timeline (Backup.timeline)."""
    steps = [("detect", "heard", "lost"), ("arbiter", "lost", "decided"), ("tail", "decided", "stopped"),
             ("console", "stopped", "listening"), ("first output", "listening", "first")]
    parts = [f"{name} {(t[b] - t[a]) * 1e3:.1f}" for name, a, b in steps if a in t and b in t]
    total = (t["first"] - t["heard"]) * 1e3 if "first" in t and "heard" in t else float("nan")
    return (f"takeover: {total:.1f} ms from the primary last heard to the first output: "
            + ", ".join(parts) + f" ms; tail {int(t.get('tail', 0)):,} ticks")


def _status(res: RunResult) -> int:
    return res.status & 0xFF if res.reason is StopReason.EXIT else 0


def _linger(console: ConsoleServer, linger: float) -> None:
    end = time.monotonic() + linger
    while time.monotonic() < end and not (console.all_sent() and console.ever_ended()):
        time.sleep(0.02)
