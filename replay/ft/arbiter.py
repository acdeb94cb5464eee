"""The arbiter against split brain: an atomic test-and-set on storage both
sides reach (VMware FT's shared-disk lock).  The lease is a file created with
O_CREAT|O_EXCL, which the filesystem makes atomic (on NFS too, since v3): of
any number of contenders exactly one creates it, and the file then names the
holder.  A pair starts with no file; the side that creates it after a failure
is the one live side from then on; the lease is never given back.

``try_acquire`` tells three outcomes apart: won, lost (the file exists: someone
else holds it), and unreachable (any other error: the storage cannot be
reached from here).  An unreachable arbiter is not a win: the side keeps
trying and, meanwhile, releases no output.

The arbiter may instead be a small process (``vmm ft arbiter --listen PORT``;
the sides say ``--arbiter tcp:HOST:PORT[/NAME]``): an ``ArbiterServer`` holds
the leases in memory (and, with ``--state FILE``, in a journal written and
fsynced before it answers, so a restarted arbiter forgets no lease) and
answers one request per line on TCP:

  ``TAS <lease> <holder JSON>``  ->  ``WON`` | ``LOST <holder JSON>``
  ``GET <lease>``                ->  ``FREE`` | ``HELD <holder JSON>``
  anything else                  ->  ``ERR <why>``

TAS is the atomic test-and-set: the first request for a lease wins it, every
later one loses, except a repeat of the winner's own request (the holder
carries a random token), so a side whose answer was lost on the way asks
again and learns it won.  A lease is NAME for the first pairing and NAME.N
for the N-th join, as the files are; NAME defaults to ``ft``.  No answer (a
refused connection, a timeout) is "unreachable", as for a file.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
import time

WON, LOST, UNREACHABLE = "won", "lost", "unreachable"


def lease_path(path: str, generation: int) -> str:
    """The lock file of one pairing: ``PATH`` for the first pair, ``PATH.N`` for the pair a
    backup formed by joining a running primary the N-th time (``vmm ft backup --join``).
    A primary accepts a joining backup only while it holds the lease of the pairing
    before, so a backup of an older pairing can never win the new one."""
    return path if generation == 0 else f"{path}.{generation}"


TCP_TIMEOUT = 1.0            # seconds to connect to an arbiter process and to get its answer
_LEASE = re.compile(r"[A-Za-z0-9._/-]{1,200}")


def parse_tcp(spec: str) -> tuple[str, int, str]:
    """'tcp:HOST:PORT[/NAME]' -> (host, port, name); ValueError with one line."""
    rest = spec[4:]
    addr, _, name = rest.partition("/")
    host, _, port = addr.rpartition(":")
    name = name or "ft"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--arbiter tcp:HOST:PORT[/NAME] needs a host and a port 1-65535, not {spec!r}")
    if not _LEASE.fullmatch(name):
        raise ValueError(f"--arbiter {spec!r}: the lease name may hold letters, digits and ._/- only")
    return host.strip("[]"), int(port), name


class Arbiter:
    """The lease of one pairing: a lock file (``PATH``) or one of an arbiter process's
    (``tcp:HOST:PORT[/NAME]``).  ``path`` names it, for messages and `vmm ft status`."""

    def __init__(self, path: str | None, generation: int = 0):
        self.base = path
        self.generation = generation
        self.tcp: tuple[str, int, str] | None = None
        if path is not None and path.startswith("tcp:"):
            host, port, name = parse_tcp(path)
            self.tcp = (host, port, lease_path(name, generation))
            self.path = f"tcp:{host}:{port}/{self.tcp[2]}"
        else:
            self.path = None if path is None else lease_path(path, generation)
        self._token = secrets.token_hex(8)   # a repeated TAS of this side's is recognised as its own

    def _ask(self, line: str) -> str:
        """One request to the arbiter process, its answer line (OSError if none comes)."""
        host, port, _ = self.tcp
        with socket.create_connection((host, port), timeout=TCP_TIMEOUT) as s:
            s.settimeout(TCP_TIMEOUT)
            s.sendall(line.encode() + b"\n")
            buf = bytearray()
            while b"\n" not in buf:
                data = s.recv(4096)
                if not data or len(buf) > 1 << 16:
                    raise OSError("the arbiter closed the connection without an answer")
                buf += data
        return buf[:buf.index(b"\n")].decode(errors="replace")

    def check_free(self) -> str | None:
        """At the start of a pair: None if the lease is free, else one line saying who holds it."""
        if self.path is None:
            return None
        if self.tcp is not None:
            try:
                answer = self._ask(f"GET {self.tcp[2]}")
            except OSError as e:
                return f"cannot reach the arbiter {self.path}: {getattr(e, 'strerror', None) or e}"
            if answer == "FREE":
                return None
            return f"the arbiter {self.path} is already held ({answer[5:]}); a new pair needs a free one"
        try:
            with open(self.path) as f:
                holder = f.read().strip() or "(empty)"
        except FileNotFoundError:
            return None
        except OSError as e:
            return f"cannot read the arbiter {self.path}: {e.strerror}"
        return f"the arbiter {self.path} is already held ({holder}); a new pair needs a free one"

    def holder(self) -> str | None:
        """Who holds the lease (None: nobody, as far as can be seen from here)."""
        if self.path is None:
            return None
        if self.tcp is not None:
            try:
                answer = self._ask(f"GET {self.tcp[2]}")
            except OSError:
                return None
            return answer[5:] if answer.startswith("HELD ") else None
        try:
            with open(self.path) as f:
                return f.read().strip() or "(empty)"
        except OSError:
            return None

    def try_acquire(self, role: str) -> tuple[str, str]:
        """(WON | LOST | UNREACHABLE, detail).  Without an arbiter every call wins."""
        if self.path is None:
            return WON, "no arbiter"
        holder = json.dumps({"role": role, "pid": os.getpid(), "host": socket.gethostname(),
                             "time": time.time()})
        if self.tcp is not None:
            me = json.dumps({"role": role, "pid": os.getpid(), "host": socket.gethostname(), "token": self._token})
            try:
                answer = self._ask(f"TAS {self.tcp[2]} {me}")
            except OSError as e:
                return UNREACHABLE, getattr(e, "strerror", None) or str(e)
            if answer == "WON":
                return WON, role
            if answer.startswith("LOST "):
                return LOST, answer[5:]
            return UNREACHABLE, f"the arbiter answered {answer[:80]!r}"
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(self.path) as f:
                    return LOST, f.read().strip()
            except OSError:
                return LOST, "(unreadable)"
        except OSError as e:
            return UNREACHABLE, e.strerror or str(e)
        with os.fdopen(fd, "w") as f:
            f.write(holder + "\n")
            f.flush()
            os.fsync(f.fileno())
        return WON, role


class ArbiterServer:
    """The arbiter process (`vmm ft arbiter`): test-and-set leases over TCP (module doc)."""

    def __init__(self, host: str, port: int, state: str | None = None,
                 say=lambda s: None):
        self.leases: dict[str, str] = {}
        self.state = state
        self.say = say
        self._lock = threading.Lock()
        if state is not None:
            self._load(state)
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.address = self.sock.getsockname()[:2]

    def _load(self, path: str) -> None:
        """The journal: one JSON line per lease won ([lease, holder]); a torn last line is ignored."""
        try:
            with open(path) as f:
                for line in f:
                    try:
                        lease, holder = json.loads(line)
                    except (ValueError, TypeError):
                        continue
                    if isinstance(lease, str) and isinstance(holder, str):
                        self.leases.setdefault(lease, holder)
        except FileNotFoundError:
            pass

    def serve_forever(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def answer(self, line: str) -> str:
        verb, _, rest = line.partition(" ")
        lease, _, holder = rest.partition(" ")
        if not _LEASE.fullmatch(lease):
            return "ERR a lease name of letters, digits and ._/-"
        if verb == "GET" and not holder:
            with self._lock:
                h = self.leases.get(lease)
            return "FREE" if h is None else f"HELD {h}"
        if verb == "TAS" and holder:
            try:
                token = json.loads(holder).get("token")
            except (ValueError, AttributeError):
                return "ERR the holder is a JSON object"
            with self._lock:
                h = self.leases.get(lease)
                if h is None:
                    if self.state is not None:
                        with open(self.state, "a") as f:
                            f.write(json.dumps([lease, holder]) + "\n")
                            f.flush()
                            os.fsync(f.fileno())
                    self.leases[lease] = holder
                    self.say(f"lease {lease} -> {holder}")
                    return "WON"
            try:
                same = token is not None and json.loads(h).get("token") == token
            except (ValueError, AttributeError):
                same = False
            return "WON" if same else f"LOST {h}"
        return "ERR TAS <lease> <holder> or GET <lease>"

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        buf = bytearray()
        try:
            while True:
                while b"\n" not in buf:
                    data = conn.recv(4096)
                    if not data or len(buf) > 1 << 16:
                        return
                    buf += data
                i = buf.index(b"\n")
                line = buf[:i].decode(errors="replace").strip()
                del buf[:i + 1]
                conn.sendall(self.answer(line).encode() + b"\n")
        except OSError:
            pass
        finally:
            conn.close()
