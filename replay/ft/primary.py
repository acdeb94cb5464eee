"""The primary of a fault-tolerant pair: ``replay.session.record`` with the
log going to the backup over a ``Link``, plus the output rule, the lag bound
and what to do when the backup is lost.

About every FLUSH_TICKS of virtual time a timer (one with slack, at a stop of
the run loop: HORIZON_SLACK below) writes the events so far as a log chunk and
sends a HORIZON (replay/ft/__init__.py).  Console output (and each
NIC frame, replay/ft/netgate.py) is stamped with the last horizon before it
and released once the backup acknowledged a later horizon.  The same timer
bounds the lag: while the backup's replay is more than ``max_lag`` ticks
behind, the primary waits (it slows down; the backup never does).

When the link fails, the primary holds its output and tries the arbiter:
won, it goes on alone (releasing what it held); lost, the backup is live, so
it drops what it held and stops; arbiter unreachable, it keeps holding and
keeps trying.
"""
from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from replay import events as ev
from replay.events import Event, EventKind
from replay.ft import wire
from replay.ft.arbiter import LOST, UNREACHABLE, WON, Arbiter
from replay.ft.console import ConsoleServer
from replay.ft.netgate import hold_frames

FLUSH_TICKS = 100_000     # 1 ms of virtual time between horizons
# A horizon comes at the first stop of the run loop from FLUSH_TICKS - HORIZON_SLACK / 2
# after the last one (a guest that does I/O stops often), the vCPU made to stop exactly
# there only HORIZON_SLACK later, so about FLUSH_TICKS apart on average: an exact stop
# costs two entries into the CPU core and a block translated for it (a third of the
# primary's overhead against a plain run).  The backup's gates follow the horizons it
# heard of (replay/ft/backup.py), so it stops where they came.
HORIZON_SLACK = FLUSH_TICKS // 2
FORMING_PATIENCE = 30.0   # seconds of silence allowed while the pair forms (the backup builds its machine)
JOIN_SNAPSHOT = "<ft join>"   # the snapshot a joined backup's log starts from: the one sent before it
LAG_SAMPLES = 1 << 16
JOIN_PIECE = 4 << 20      # bytes of a snapshot or of the console's output per message to a joining backup


class FtError(Exception):
    """The pair could not form (no backup, a refused handshake): one line."""


class Fenced(Exception):
    """This side lost the arbiter to its peer and stopped."""


@dataclass
class PrimaryStats:
    # ticks behind, at each horizon (the latest LAG_SAMPLES: a long run keeps no unbounded list)
    lag_samples: deque[int] = field(default_factory=lambda: deque(maxlen=LAG_SAMPLES))
    waits: int = 0                 # horizons at which --max-lag made the primary wait
    wait_seconds: float = 0.0
    log_bytes: int = 0
    lost_at: float | None = None   # host time the backup was declared lost
    lost_reason: str = ""
    outcome: str = "paired"        # paired | alone | fenced


class LinkSink:
    """What the LogWriter writes to: each write (the header, one chunk) goes out as one LOG frame."""

    name = "<ft link>"

    def __init__(self, primary: Primary):
        self.p = primary
        self.closed = False

    def write(self, data: bytes) -> int:
        if self.p.header is None:
            self.p.header = bytes(data)      # the LogWriter's first write: the log header
        if not self.p.alone:
            self.p.link.send(wire.LOG, bytes(data))
            self.p.stats.log_bytes += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class Primary:
    def __init__(self, backup: tuple[str, int], console: ConsoleServer, *, heartbeat: float = 0.05,
                 max_lag: int = 2_000_000, arbiter: str | None = None,
                 say: Callable[[str], None] = lambda s: None):
        self.backup = backup
        self.console = console
        self.heartbeat = heartbeat
        self.max_lag = max_lag
        self.arbiter = Arbiter(arbiter)
        self.say = say
        self.stats = PrimaryStats()
        self.cv = threading.Condition()
        self.acked = 0
        self.progress = 0
        self.handshake: str | None = None     # "accepted" or the refusal
        self.alone = False
        self.fenced = False
        self.link: wire.Link | None = None
        self.side: wire.SidePath | None = None
        self.writer = None
        self.machine = None
        self.last_tick = 0
        self.header: bytes | None = None      # the recording's log header (its config)
        self.joining: tuple[wire.Link, wire.SidePath] | None = None   # a backup joining, not yet sent the state
        self.joins = 0
        self.said_bye = False
        self.gates: list = []                 # the NICs' HeldWires (replay/ft/netgate.py)
        # (horizon tick, the machine's icount there) of the horizons not yet acknowledged, and
        # the last one that was: `vmm ft status` names the acknowledged point as an icount too
        self.horizons: deque[tuple[int, int]] = deque([(0, 0)], maxlen=LAG_SAMPLES)
        self.peer_host = backup[0]
        console.status = self.status
        console.on_join = self._on_join

    # -- forming the pair -----------------------------------------------------------
    def connect(self, timeout: float, hello: dict) -> None:
        held = self.arbiter.check_free()
        if held:
            raise FtError(held)
        try:
            sock = wire.connect(self.backup, timeout, "backup")
        except OSError as e:
            raise FtError(str(e)) from None
        sock.settimeout(None)
        self.side = wire.SidePath(sock.getsockname()[0], self.heartbeat)
        self.side.start()
        self.link = self._new_link(sock)
        self.link.patience = FORMING_PATIENCE
        self.link.start()
        self.link.send(wire.HELLO, wire.pack_json(dict(hello, protocol=wire.PROTOCOL, heartbeat=self.heartbeat,
                                                       max_lag=self.max_lag,
                                                       arbiter=self.arbiter.path, side_port=self.side.port)))

    def on_writer(self, writer) -> None:
        self.writer = writer

    def setup(self, m) -> None:
        """Called by record() before the first instruction: the handshake, then the horizon timer."""
        self.writer.flush()           # the DISK_IMAGE and the initial digests: the backup checks them
        self.link.send(wire.HORIZON, wire.u64(0))
        with self.cv:
            self.cv.wait_for(lambda: self.handshake is not None, timeout=120)
        if self.handshake != "accepted":
            self.link.close(drain=0)
            raise FtError(f"the backup refused: {self.handshake or 'no answer within 120 s'}")
        self.machine = m
        self.gates = hold_frames(m, self.stamp)
        m.clock.schedule_in(FLUSH_TICKS - HORIZON_SLACK // 2, self._tick, "ft-horizon", slack=HORIZON_SLACK)

    def _new_link(self, sock: socket.socket) -> wire.Link:
        """A link whose messages reach this side only while it is the pair's link."""
        link: wire.Link

        def on_message(kind: bytes, payload: bytes) -> None:
            if link is self.link:
                self._on_message(kind, payload)

        def on_lost(reason: str) -> None:
            if self.joining is not None and link is self.joining[0]:
                self.joining = None            # it went before it got the state: nothing started
                self.say(f"the joining backup went away before it got the machine's state ({reason})")
            elif link is self.link:
                self._on_lost(reason)

        link = wire.Link(sock, self.heartbeat, on_message, on_lost)
        return link

    def stamp(self) -> int:
        """The virtual time an output is stamped with: the last horizon passed.  An output at
        time t with last_tick <= t < next horizon is released by an ACK of a horizon > t, which
        is an ACK > last_tick: the same outputs go as with t itself, and reading the exact
        clock in the middle of a translated block (per console byte) costs far more (the
        console marks its output so at each horizon, ConsoleServer.mark; each frame a NIC
        sends is stamped so)."""
        return self.last_tick

    def status(self) -> dict:
        """For `vmm ft status`: who this side is, the backup's lag, the log's bandwidth."""
        s = self.stats
        guest_s = self.last_tick / 1e8
        with self.cv:
            icount = self.horizons[-1][1]
            acked_icount = next((ic for t, ic in reversed(self.horizons) if t <= self.acked), 0)
        return {"state": s.outcome, "tick": self.last_tick, "acked_horizon": min(self.acked, self.last_tick),
                "icount": icount, "acked_icount": acked_icount,
                "lag_ms": (s.lag_samples[-1] / 1e5) if s.lag_samples else 0.0, "log_bytes": s.log_bytes,
                "log_bytes_per_guest_s": round(s.log_bytes / guest_s) if guest_s else 0,
                "heartbeat_s": self.heartbeat, "arbiter": self.arbiter.path, "joins": self.joins,
                "lease_generation": self.arbiter.generation}

    # -- the horizon timer (the run loop's thread) ------------------------------------
    def _tick(self, now: int) -> None:
        self.console.mark(self.last_tick)     # the output since the last horizon came after it
        self.last_tick = now
        m = self.machine
        if self.fenced:
            m.request_host_stop("this primary lost the arbiter to its backup")
            return
        for g in self.gates:
            g.flush()
        if not self.alone:
            self.writer.flush()
            with self.cv:
                hz = self.horizons
                hz.append((now, m.icount))
                while len(hz) > 1 and hz[1][0] <= self.acked:
                    hz.popleft()
            sent = min((g.flushed_through for g in self.gates), default=None)
            self.link.send(wire.HORIZON, wire.u64(now) + (wire.u64(sent) if sent is not None else b""))
            lag = now - self.progress
            self.stats.lag_samples.append(max(0, lag))
            if lag > self.max_lag:
                with self.cv:
                    t0 = time.perf_counter()
                    self.stats.waits += 1
                    while now - self.progress > self.max_lag and not self.alone and not self.fenced:
                        self.cv.wait(self.heartbeat)
                    self.stats.wait_seconds += time.perf_counter() - t0
            if self.fenced:
                m.request_host_stop("this primary lost the arbiter to its backup")
                return
        m.clock.schedule_in(FLUSH_TICKS - HORIZON_SLACK // 2, self._tick, "ft-horizon", slack=HORIZON_SLACK)
        if self.alone and self.joining is not None:
            self._send_state(now)       # after the next horizon is scheduled: the snapshot holds it

    # -- restoring redundancy: a backup joins (vmm ft backup --join) -------------------
    def _on_join(self, sock: socket.socket) -> None:
        """The console server's thread: a backup asks to join.  Only a primary that runs
        alone (and holds the lease of its pairing) takes one; the machine's state goes
        out at its next horizon, on the run loop's thread."""
        with self.cv:
            why = None
            if self.fenced:
                why = "this primary lost the arbiter and is stopping"
            elif not self.alone:
                why = "this primary has a backup" if self.handshake == "accepted" else "this primary is not running yet"
            elif self.joining is not None:
                why = "another backup is joining this primary"
            if why is None:
                sock.settimeout(None)
                side = wire.SidePath(sock.getsockname()[0], self.heartbeat)
                link = self._new_link(sock)
                link.patience = FORMING_PATIENCE
                self.joining = (link, side)
        if why is not None:
            try:
                sock.sendall(wire.frame(wire.REFUSE, why.encode()))
            except OSError:
                pass
            sock.close()
            return
        side.start()
        link.start()
        host, port = self.console.address or ("127.0.0.1", 0)
        link.send(wire.HELLO, wire.pack_json({
            "protocol": wire.PROTOCOL, "heartbeat": self.heartbeat, "arbiter": self.arbiter.base,
            "max_lag": self.max_lag,
            "side_port": side.port, "console": [host, port], "join": True,
            "generation": self.arbiter.generation + 1}))
        self.say(f"a backup joins from {sock.getpeername()[0]}; its state goes out at the next horizon")

    def _send_state(self, now: int) -> None:
        """The run loop's thread, at a horizon, running alone: the joining backup gets the
        machine's saved state (a snapshot file's bytes), the console's output and input
        positions, then a log that starts here; from now on the pair runs in lockstep
        again, under a new lease (the arbiter's next generation)."""
        import tempfile

        from replay.logfile import StreamLogReader
        from replay.session import snapshot_events, state_digest
        from vmm.state import write_snapshot

        link, side = self.joining
        self.joining = None
        if link.lost is not None:
            return
        m = self.machine
        self.writer.flush()               # the events before the join point: to no one (alone)
        cfg = StreamLogReader(_Bytes(self.header)).header.config
        with tempfile.TemporaryDirectory(prefix="vmm-ft-join") as d:
            path = f"{d}/join.snap"
            write_snapshot(path, cfg, m.icount, m.save_state())
            with open(path, "rb") as f:
                snap = f.read()
        out, taken = self.console.rejoin()   # output from here waits for the new backup's ACKs
        for g in self.gates:
            g.hold_again()
        digests = m.clock.find("digest")
        generation = self.arbiter.generation + 1
        link.send(wire.JOIN, wire.pack_json({
            "generation": generation, "icount": m.icount, "tick": now, "snapshot_bytes": len(snap),
            "digests": digests.callback.__self__.n if digests is not None else 0,
            "output": len(out), "input": taken}))
        for i in range(0, len(snap), JOIN_PIECE):
            link.send(wire.SNAP, snap[i:i + JOIN_PIECE])
        for i in range(0, len(out), JOIN_PIECE):
            link.send(wire.OUTPUT, out[i:i + JOIN_PIECE])
        with self.cv:
            self.link, self.side = link, side
            try:
                self.peer_host = link.sock.getpeername()[0]
            except OSError:
                pass
            self.arbiter = Arbiter(self.arbiter.base, generation)
            self.handshake = None
            self.progress = self.acked = now
            self.horizons = deque([(now, m.icount)], maxlen=LAG_SAMPLES)
            self.alone = False
            self.joins += 1
            self.stats.outcome = "joining"     # "paired" once the backup holds a machine (its ACCEPT)
        # the new log: the recipe names the snapshot (its bytes came over the link), then the
        # initial events a recording from that snapshot starts with, then the horizon
        self.writer.restart(dict(cfg, snapshot={"path": JOIN_SNAPSHOT, "sha256": hashlib.sha256(snap).hexdigest()}),
                            state_digest(m))
        self.writer.append(Event(EventKind.DISK_IMAGE, m.icount,
                                 ev.encode_disk_image(cfg["image"]["name"], cfg["image"]["sha256"])))
        self.writer.extend(snapshot_events(m, True))
        self.writer.flush()
        link.send(wire.HORIZON, wire.u64(now))
        self.say(f"sent the machine's state at tick {now} (icount {m.icount}, {len(snap):,} bytes) "
                 f"to the joining backup; lockstep again (lease generation {generation})")

    # -- the link's side ------------------------------------------------------------
    def _on_message(self, kind: bytes, payload: bytes) -> None:
        if kind == wire.ACK:
            tick = wire.read_u64(payload)
            reached = wire.read_u64(payload, 1) if len(payload) >= 16 else 0
            if reached:
                self.link.patience = None      # as a PROGRESS: the backup's replay runs
            with self.cv:
                self.acked = max(self.acked, tick)
                self.progress = max(self.progress, reached)
                self.cv.notify_all()
            if not self.alone and not self.fenced:
                self.console.release_through(tick)
                for g in self.gates:
                    g.release_through(tick)
        elif kind == wire.PROGRESS:
            self.link.patience = None      # the backup's replay runs: heartbeats rule from now on
            with self.cv:
                self.progress = max(self.progress, wire.read_u64(payload))
                self.cv.notify_all()
        elif kind in (wire.ACCEPT, wire.REFUSE):
            if kind == wire.ACCEPT:
                try:
                    port = int(json.loads(payload).get("side_port") or 0)
                except (ValueError, AttributeError):
                    port = 0
                if 0 < port < 65536:
                    self.side.peer = (self.peer_host, port)
            with self.cv:
                self.handshake = "accepted" if kind == wire.ACCEPT else payload.decode(errors="replace")
                self.cv.notify_all()
            if kind == wire.ACCEPT and self.machine is not None:
                self.stats.outcome = "paired"
                self.say("the joined backup follows: the pair is whole again")
            if kind == wire.REFUSE and self.machine is not None:
                # a joining backup that refused never goes live: back to running alone
                self.say(f"the joining backup refused: {self.handshake}; going on alone")
                link = self.link
                self._go_alone()
                link.close(drain=0)

    def _go_alone(self) -> None:
        """No backup any more: output leaves on the primary's word alone."""
        with self.cv:
            self.alone = True
            self.stats.outcome = "alone"
            self.cv.notify_all()
        self.console.go_alone()
        for g in self.gates:
            g.go_alone()

    def _on_lost(self, reason: str) -> None:
        self.stats.lost_at = time.monotonic()
        self.stats.lost_reason = reason
        with self.cv:
            if self.alone or self.said_bye:
                return                  # a joining backup that refused, then closed; or the run ended
            if self.machine is None and self.handshake is None:
                self.handshake = f"the connection was lost during the handshake ({reason})"
                self.cv.notify_all()
                return
            if self.machine is None and self.handshake != "accepted":
                return                  # the pair never formed: nothing ran, nothing to decide
            # a pair that ran (a joined backup too, even before its ACCEPT came: it may
            # have sent one) is decided by the arbiter
        threading.Thread(target=self._contend, args=(reason,), name="ft-arbiter", daemon=True).start()

    def _contend(self, reason: str) -> None:
        warned = False
        while True:
            outcome, detail = self.arbiter.try_acquire("primary")
            if outcome == WON:
                self.say(f"the backup is lost ({reason}); "
                         + ("holding the arbiter's lease, " if self.arbiter.path else "")
                         + "going on alone")
                self._go_alone()
                return
            if outcome == LOST:
                self.say(f"the backup is lost ({reason}) and holds the arbiter ({detail}): stopping")
                self.console.drop_held()
                for g in self.gates:
                    g.drop_held()
                with self.cv:
                    self.fenced = True
                    self.stats.outcome = "fenced"
                    self.cv.notify_all()
                return
            if outcome == UNREACHABLE and not warned:
                self.say(f"the backup is lost ({reason}) and the arbiter cannot be reached ({detail}): "
                         f"holding output, retrying")
                warned = True
            time.sleep(self.heartbeat)

    # -- the end of the run ------------------------------------------------------------
    def finish(self, status: int, linger: float) -> None:
        """The guest ended (record() wrote the END): have the backup acknowledge the whole
        log, release the rest, give the console's clients the END, say BYE."""
        if not self.alone and not self.fenced:
            self.link.send(wire.HORIZON, wire.u64(wire.END_OF_LOG))
            with self.cv:
                self.cv.wait_for(lambda: self.acked >= wire.END_OF_LOG or self.alone or self.fenced)
        if self.fenced:
            raise Fenced()
        self.console.mark(self.last_tick)
        if self.acked >= wire.END_OF_LOG:
            self.console.release_through(wire.END_OF_LOG)
            for g in self.gates:
                g.release_through(wire.END_OF_LOG)
        for g in self.gates:
            g.flush()
        self.console.finish(status)
        end = time.monotonic() + linger
        while time.monotonic() < end and not (self.console.all_sent() and self.console.ever_ended()):
            time.sleep(0.02)
        if self.fenced:
            raise Fenced()
        if not self.alone:
            self.said_bye = True     # the backup closes on BYE, maybe before this side does: not a failure
            self.link.send(wire.BYE)
            self.link.close()


class _Bytes(io.BytesIO):
    name = "<ft log header>"
