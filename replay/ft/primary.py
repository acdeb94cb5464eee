"""The primary of a fault-tolerant pair: ``replay.session.record`` with the
log going to the backup over a ``Link``, plus the output rule, the lag bound
and what to do when the backup is lost.

Every FLUSH_TICKS of virtual time a timer writes the events so far as a log
chunk and sends a HORIZON (replay/ft/__init__.py).  Console output is stamped
with the virtual time it was produced at and released to the console's
clients once the backup acknowledged a horizon after it.  The same timer
bounds the lag: while the backup's replay is more than ``max_lag`` ticks
behind, the primary waits (it slows down; the backup never does).

When the link fails, the primary holds its output and tries the arbiter:
won, it goes on alone (releasing what it held); lost, the backup is live, so
it drops what it held and stops; arbiter unreachable, it keeps holding and
keeps trying.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from replay.ft import wire
from replay.ft.arbiter import LOST, UNREACHABLE, WON, Arbiter
from replay.ft.console import ConsoleServer

FLUSH_TICKS = 100_000     # 1 ms of virtual time between horizons
FORMING_PATIENCE = 30.0   # seconds of silence allowed while the pair forms (the backup builds its machine)


class FtError(Exception):
    """The pair could not form (no backup, a refused handshake): one line."""


class Fenced(Exception):
    """This side lost the arbiter to its peer and stopped."""


@dataclass
class PrimaryStats:
    lag_samples: list[int] = field(default_factory=list)   # ticks behind, at each horizon
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
                 max_lag: int = 10_000_000, arbiter: str | None = None,
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
        console.status = self.status

    # -- forming the pair -----------------------------------------------------------
    def connect(self, timeout: float, hello: dict) -> None:
        held = self.arbiter.check_free()
        if held:
            raise FtError(held)
        end = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection(self.backup, timeout=1.0)
                break
            except OSError as e:
                if time.monotonic() > end:
                    raise FtError(f"cannot reach the backup at {self.backup[0]}:{self.backup[1]}: "
                                  f"{e.strerror or e}") from None
                time.sleep(0.05)
        sock.settimeout(None)
        self.side = wire.SidePath(sock.getsockname()[0], self.heartbeat)
        self.side.start()
        self.link = wire.Link(sock, self.heartbeat, self._on_message, self._on_lost)
        self.link.patience = FORMING_PATIENCE
        self.link.start()
        self.link.send(wire.HELLO, wire.pack_json(dict(hello, protocol=wire.PROTOCOL, heartbeat=self.heartbeat,
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
        m.clock.schedule_in(FLUSH_TICKS, self._tick, "ft-horizon")

    def status(self) -> dict:
        """For `vmm ft status`: who this side is, the backup's lag, the log's bandwidth."""
        s = self.stats
        guest_s = self.last_tick / 1e8
        return {"state": s.outcome, "tick": self.last_tick, "acked_horizon": min(self.acked, self.last_tick),
                "lag_ms": (s.lag_samples[-1] / 1e5) if s.lag_samples else 0.0, "log_bytes": s.log_bytes,
                "log_bytes_per_guest_s": round(s.log_bytes / guest_s) if guest_s else 0,
                "heartbeat_s": self.heartbeat, "arbiter": self.arbiter.path}

    # -- the horizon timer (the run loop's thread) ------------------------------------
    def _tick(self, now: int) -> None:
        self.last_tick = now
        m = self.machine
        if self.fenced:
            m.request_host_stop("this primary lost the arbiter to its backup")
            return
        if not self.alone:
            self.writer.flush()
            self.link.send(wire.HORIZON, wire.u64(now))
            with self.cv:
                self.stats.lag_samples.append(max(0, now - self.progress))
                if now - self.progress > self.max_lag and not self.alone and not self.fenced:
                    t0 = time.perf_counter()
                    self.stats.waits += 1
                    while now - self.progress > self.max_lag and not self.alone and not self.fenced:
                        self.cv.wait(self.heartbeat)
                    self.stats.wait_seconds += time.perf_counter() - t0
            if self.fenced:
                m.request_host_stop("this primary lost the arbiter to its backup")
                return
        m.clock.schedule_in(FLUSH_TICKS, self._tick, "ft-horizon")

    # -- the link's side ------------------------------------------------------------
    def _on_message(self, kind: bytes, payload: bytes) -> None:
        if kind == wire.ACK:
            tick = wire.read_u64(payload)
            with self.cv:
                self.acked = max(self.acked, tick)
                self.cv.notify_all()
            if not self.alone and not self.fenced:
                self.console.release_through(tick)
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
                    self.side.peer = (self.backup[0], port)
            with self.cv:
                self.handshake = "accepted" if kind == wire.ACCEPT else payload.decode(errors="replace")
                self.cv.notify_all()

    def _on_lost(self, reason: str) -> None:
        self.stats.lost_at = time.monotonic()
        self.stats.lost_reason = reason
        with self.cv:
            if self.handshake is None:
                self.handshake = f"the connection was lost during the handshake ({reason})"
                self.cv.notify_all()
                return
            if self.handshake != "accepted":
                return                  # the pair never formed: nothing ran, nothing to decide
        threading.Thread(target=self._contend, args=(reason,), name="ft-arbiter", daemon=True).start()

    def _contend(self, reason: str) -> None:
        warned = False
        while True:
            outcome, detail = self.arbiter.try_acquire("primary")
            if outcome == WON:
                self.say(f"the backup is lost ({reason}); "
                         + ("holding the arbiter's lease, " if self.arbiter.path else "")
                         + "going on alone")
                with self.cv:
                    self.alone = True
                    self.stats.outcome = "alone"
                    self.cv.notify_all()
                self.console.go_alone()
                return
            if outcome == LOST:
                self.say(f"the backup is lost ({reason}) and holds the arbiter ({detail}): stopping")
                self.console.drop_held()
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
        if self.acked >= wire.END_OF_LOG:
            self.console.release_through(wire.END_OF_LOG)
        self.console.finish(status)
        end = time.monotonic() + linger
        while time.monotonic() < end and not (self.console.all_sent() and self.console.ever_ended()):
            time.sleep(0.02)
        if self.fenced:
            raise Fenced()
        if not self.alone:
            self.link.send(wire.BYE)
            self.link.close()
