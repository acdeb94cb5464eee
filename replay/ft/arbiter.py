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
"""
from __future__ import annotations

import json
import os
import socket
import time

WON, LOST, UNREACHABLE = "won", "lost", "unreachable"


def lease_path(path: str, generation: int) -> str:
    """The lock file of one pairing: ``PATH`` for the first pair, ``PATH.N`` for the pair a
    backup formed by joining a running primary the N-th time (``vmm ft backup --join``).
    A primary accepts a joining backup only while it holds the lease of the pairing
    before, so a backup of an older pairing can never win the new one."""
    return path if generation == 0 else f"{path}.{generation}"


class Arbiter:
    def __init__(self, path: str | None, generation: int = 0):
        self.base = path
        self.generation = generation
        self.path = None if path is None else lease_path(path, generation)

    def check_free(self) -> str | None:
        """At the start of a pair: None if the lease is free, else one line saying who holds it."""
        if self.path is None:
            return None
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
        try:
            with open(self.path) as f:
                return f.read().strip() or "(empty)"
        except OSError:
            return None

    def try_acquire(self, role: str) -> tuple[str, str]:
        """(WON | LOST | UNREACHABLE, detail).  Without an arbiter every call wins."""
        if self.path is None:
            return WON, "no arbiter"
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
            f.write(json.dumps({"role": role, "pid": os.getpid(), "host": socket.gethostname(),
                                "time": time.time()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return WON, role
