"""Lockstep fault tolerance (replay/ft/): what the pair costs and how fast it fails over.

    python benchmarks/ft.py [--rounds N] [--kills N]

- throughput: the same guest (numbered lines, printed continuously) under a plain
  `vmm run`, `vmm record` (FT's primary records: the part of the cost that is not
  FT's own) and as `vmm ft primary` with a backup, each reporting its own MIPS;
  the variants alternate so host load hits them alike (the backup replays on the
  same host: on a 2-core machine it competes with the primary for CPU); and the
  CPU seconds the primary process itself spent on the guest, against the other
  two (a figure a loaded host disturbs far less than the wall clock);
- log bandwidth (bytes per second of guest time) and the backup's lag behind the
  primary (virtual ms, sampled at every horizon), from the primary's --stats;
- output latency: a guest that asks for a byte on every line; the round trip
  from typing the byte to reading its echo, plain (`--serial tcp:`) against the
  FT console (where the echo also waits for the backup's acknowledgement);
- failover: the time from the primary's death to the console client's first new
  byte from the backup, after SIGKILL (the link closes) and after SIGSTOP (only
  the heartbeats can tell), with the backup's own detection time;
- join: the time a new backup takes to join a primary that runs alone (`vmm ft
  backup --join`) until the pair is whole again, and the size of the state sent.

Needs nasm (the guest is tests/ft_guest.py).
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import ft_guest

from replay.ft.console import ConsoleClient

CLI = "import sys; from tools.cli import main; sys.exit(main())"
MAX_LAG: str | None = None     # --max-lag for every primary (None: vmm ft primary's default)
HEARTBEAT = "50ms"             # --heartbeat of every pair
GUEST_LINES = 3000


def vmm(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", CLI, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mips(err: str) -> float:
    m = re.search(r"\(([\d.]+) MIPS\)", err)
    if not m:
        raise RuntimeError(err)
    return float(m.group(1))


def start_pair(guest: Path, tmp: Path, heartbeat: str | None = None, backup_console: int | None = None):
    """(primary, backup, console port); ``backup_console``: the backup serves the console there
    (a stopped primary still holds its own port, as on another host it would not)."""
    lp, cp = port(), port()
    heartbeat = heartbeat or HEARTBEAT
    arb = tmp / f"arb-{lp}"
    extra = ["--console", f"127.0.0.1:{backup_console}"] if backup_console else []
    b = vmm("ft", "backup", "--listen", f"127.0.0.1:{lp}", "--arbiter", str(arb), "--linger", "3",
            "--heartbeat", heartbeat, *extra)
    p = vmm("ft", "primary", str(guest), "--boot", "flat", "--backup", f"127.0.0.1:{lp}",
            "--console", f"127.0.0.1:{cp}", "--arbiter", str(arb), "--linger", "3", "--stats",
            "--heartbeat", heartbeat, *(["--max-lag", MAX_LAG] if MAX_LAG else []))
    return p, b, cp


def _reaped_cpu(p: subprocess.Popen) -> tuple[str, float, int]:
    """(stderr, CPU seconds of ``p`` alone, its voluntary context switches: each time one of
    its threads waited, e.g. for another thread): it is the only child reaped in between."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    err = p.communicate()[1].decode()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (err, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            after.ru_nvcsw - before.ru_nvcsw)


def _variants(guest: Path, tmp: Path) -> dict[str, tuple[str, float, int]]:
    """One run of each variant: {name: (stderr, CPU seconds and voluntary context switches of
    the process that ran the guest)}."""
    out = {}
    out["plain"] = _reaped_cpu(vmm("run", str(guest), "--boot", "flat", "--serial", "none", "--stats"))
    out["record"] = _reaped_cpu(vmm("record", str(guest), "--boot", "flat", "--serial", "none",
                                    "-o", str(tmp / "rec.vmlog")))
    p, b, cp = start_pair(guest, tmp)
    ConsoleClient([("127.0.0.1", cp)]).run(timeout=300)
    out["ft"] = _reaped_cpu(p)
    b.communicate()
    return out


def throughput(guest: Path, tmp: Path, rounds: int) -> None:
    """Wall-clock MIPS as each process reports it, and the CPU the primary process itself
    spent on the guest (its CPU time less that of a 2-line run of the same variant: start-up,
    imports and the machine's construction), which host load and the backup's replay on the
    same cores disturb far less than the wall clock."""
    tiny = ft_guest.build(lines=2)
    names = ("plain", "record", "ft")
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    base: dict[str, list[float]] = {n: [] for n in names}
    switches: dict[str, list[int]] = {n: [] for n in names}
    stats = []
    for _ in range(rounds):
        for n, (err, t, vcs) in _variants(guest, tmp).items():
            wall[n].append(mips(err))
            cpu[n].append(t)
            switches[n].append(vcs)
            if n == "ft":
                stats.append(err.strip().splitlines()[-1])
        for n, (_err, t, _vcs) in _variants(tiny, tmp).items():
            base[n].append(t)
    best = {n: max(wall[n]) for n in names}
    print(f"throughput (wall-clock MIPS, best of {rounds}): plain {best['plain']:.1f}, record {best['record']:.1f}, "
          f"FT primary {best['ft']:.1f}; FT/plain {best['ft'] / best['plain']:.2f}, "
          f"FT/record {best['ft'] / best['record']:.2f}")
    print(f"  plain {wall['plain']}  record {wall['record']}  FT {wall['ft']}")
    run = {n: min(cpu[n]) - min(base[n]) for n in names}
    print(f"guest CPU seconds of the process (best of {rounds}, less a 2-line run's "
          f"{min(base['plain']):.2f}/{min(base['record']):.2f}/{min(base['ft']):.2f} s): plain {run['plain']:.3f}, "
          f"record {run['record']:.3f}, FT primary {run['ft']:.3f}; throughput per CPU second FT/plain "
          f"{run['plain'] / run['ft']:.2f}, FT/record {run['record'] / run['ft']:.2f}")
    # waits of the process's threads for one another (the FT link's threads at each horizon),
    # which host load hardly changes, unlike the CPU seconds
    print(f"voluntary context switches of the process (fewest of {rounds}): plain {min(switches['plain']):,}, "
          f"record {min(switches['record']):,}, FT primary {min(switches['ft']):,}")
    line = stats[wall["ft"].index(best["ft"])]
    for key in ("log", "lag", "max-lag waits"):
        m = re.search(key + r" ([^;]+);", line)
        if m:
            print(f"  {key}: {m.group(1)}")


def latency(tmp: Path, trips: int) -> None:
    guest = ft_guest.build(lines=trips, ask=1, delay=1000)
    # plain: COM1 on a raw TCP socket
    cp = port()
    r = vmm("run", str(guest), "--boot", "flat", "--serial", f"tcp:127.0.0.1:{cp}")
    s = _connect(cp)
    plain = []
    buf = b""
    n = 0
    t0 = 0.0
    while n < trips:
        data = s.recv(4096)
        if not data:
            break
        buf += data
        if buf.count(b"?\n") > n and t0 == 0.0:
            t0 = time.perf_counter()
            s.sendall(b"x")
        if buf.count(b"got x\n") > n:
            plain.append(time.perf_counter() - t0)
            n += 1
            t0 = 0.0
            if buf.count(b"?\n") > n:
                t0 = time.perf_counter()
                s.sendall(b"x")
    s.close()
    r.communicate()
    # FT: the pair's console
    p, b, cport = start_pair(guest, tmp)
    ft: list[float] = []
    sent: list[float] = []

    def on_output(c: ConsoleClient) -> None:
        got = c.transcript.count(b"got x\n")
        while len(ft) < got:
            ft.append(time.perf_counter() - sent[len(ft)])
        if c.transcript.count(b"?\n") > len(c.typed):
            sent.append(time.perf_counter())
            c.type(b"x")

    ConsoleClient([("127.0.0.1", cport)], on_output).run(timeout=300)
    p.communicate()
    b.communicate()
    print(f"echo round trip over {trips} prompts (ms, median / p90): plain {_ms(plain)}, FT {_ms(ft)}")


def _ms(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"{statistics.median(xs) * 1e3:.1f} / {xs[int(0.9 * (len(xs) - 1))] * 1e3:.1f}"


def _connect(p: int, timeout: float = 30) -> socket.socket:
    end = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", p))
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)


STEPS = ("detect", "arbiter", "tail", "console", "first output")


def failover(guest: Path, tmp: Path, kills: int, sig: int) -> None:
    gaps, detected = [], []
    steps: dict[str, list[float]] = {k: [] for k in STEPS}
    tails: list[int] = []
    total = len(ft_guest.expected(GUEST_LINES, 0, b""))
    for i in range(kills):
        bcp = port() if sig == signal.SIGSTOP else None
        p, b, cp = start_pair(guest, tmp, backup_console=bcp)
        mark: dict = {}
        at = int(total * (0.1 + 0.85 * (i + 0.5) / kills))    # kill points spread over the run

        def on_output(c: ConsoleClient, p=p, mark=mark, at=at) -> None:
            if "t" not in mark and len(c.transcript) > at:
                mark["t"] = time.perf_counter()
                mark["n"] = len(c.transcript)
                p.send_signal(sig)
            elif "t" in mark and "first" not in mark and c.served_by[-1] == "backup":
                mark["first"] = time.perf_counter()

        c = ConsoleClient([("127.0.0.1", cp)] + ([("127.0.0.1", bcp)] if bcp else []), on_output)
        if bcp:
            # the stopped primary's console still accepts connections: the client is told to move on
            threading.Thread(target=_drop_when_stopped, args=(c, mark), daemon=True).start()
        c.run(timeout=300)
        err = b.communicate()[1].decode()
        p.kill()
        p.communicate()
        if "first" in mark:
            gaps.append(mark["first"] - mark["t"])
        m = re.search(r"failure detected (\d+) ms", err)
        if m:
            detected.append(int(m.group(1)))
        m = re.search(r"takeover: .*?: (.*) ms; tail ([\d,]+) ticks", err)
        if m:
            for part in m.group(1).split(", "):
                k, _, v = part.rpartition(" ")
                steps[k].append(float(v))
            tails.append(int(m.group(2).replace(",", "")))
    name = {signal.SIGKILL: "SIGKILL", signal.SIGSTOP: "SIGSTOP"}[sig]
    print(f"failover after {name} ({len(gaps)} of {kills}): primary's death to the backup's first "
          f"output, ms: {_dist([g * 1e3 for g in gaps])}")
    print(f"  the backup's detection, ms after it last heard the primary: {_dist(detected)}")
    print("  the backup's takeover, ms per step (median / p90 / max): "
          + "; ".join(f"{k} {_dist(v, short=True)}" for k, v in steps.items() if v))
    if tails:
        print(f"  tail replayed after the arbiter, ticks (1 tick = 10 ns of guest time): {_dist(tails, short=True)}")


def _dist(xs: list[float], short: bool = False) -> str:
    """'median / p90 / max' (with short=False: 'min median p90 max' of n, and the values when few)."""
    if not xs:
        return "none"
    xs = sorted(xs)
    med, p90 = statistics.median(xs), xs[min(len(xs) - 1, int(0.9 * len(xs)))]
    if short:
        return f"{med:.1f} / {p90:.1f} / {xs[-1]:.1f}" if isinstance(xs[0], float) else f"{med:,.0f} / {p90:,} / {xs[-1]:,}"
    return f"n {len(xs)}, min {xs[0]:.0f}, median {med:.0f}, p90 {p90:.0f}, max {xs[-1]:.0f}"


def rejoin(tmp: Path, rounds: int) -> None:
    """Restoring redundancy: a pair whose backup is killed; the primary goes on alone (its
    guest waits for a console byte, running); the time from starting `vmm ft backup --join`
    to the primary saying the pair is whole again, and the state it sent."""
    from replay.ft.console import query_status

    guest = ft_guest.build(lines=100, ask=50)
    times, sizes = [], []

    def until(cp: int, want) -> None:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if want(query_status("127.0.0.1", cp)):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        raise RuntimeError("the pair never got there")

    for _ in range(rounds):
        p, b, cp = start_pair(guest, tmp)
        until(cp, lambda s: s.get("state") == "paired" and int(s.get("acked_horizon", 0)) > 0)
        b.kill()
        b.communicate()
        until(cp, lambda s: s.get("state") == "alone")
        t0 = time.perf_counter()
        j = vmm("ft", "backup", "--join", f"127.0.0.1:{cp}", "--heartbeat", HEARTBEAT)
        until(cp, lambda s: s.get("state") == "paired" and s.get("joins") == 1)
        times.append(time.perf_counter() - t0)
        for x in (j, p):
            x.kill()
        err = p.communicate()[1].decode()
        j.communicate()
        m = re.search(r"icount \d+, ([\d,]+) bytes\)", err)
        if m:
            sizes.append(int(m.group(1).replace(",", "")))
    print(f"join ({rounds}): `vmm ft backup --join` started to the pair whole again, s: "
          f"{', '.join(f'{t:.2f}' for t in times)} (the backup's start-up included); machine state sent: "
          f"{', '.join(f'{n:,}' for n in sizes)} bytes (32 MiB of RAM, compressed)")


def _drop_when_stopped(c: ConsoleClient, mark: dict) -> None:
    while "t" not in mark:
        time.sleep(0.005)
    c.addresses = c.addresses[1:]
    c.drop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--trips", type=int, default=40)
    ap.add_argument("--only", choices=["throughput", "latency", "failover", "join"], default=None,
                    help="run one part only")
    ap.add_argument("--max-lag", default=None, metavar="DURATION", help="the primaries' --max-lag")
    ap.add_argument("--heartbeat", default="50ms", metavar="DURATION", help="the pairs' --heartbeat (default 50ms)")
    args = ap.parse_args()
    global MAX_LAG, HEARTBEAT
    MAX_LAG, HEARTBEAT = args.max_lag, args.heartbeat
    if not ft_guest.have_nasm():
        sys.exit("benchmarks/ft.py needs nasm to build its guest")
    tmp = Path(tempfile.mkdtemp(prefix="vmm-ft-bench-"))
    guest = ft_guest.build(lines=GUEST_LINES)
    print(f"guest: {guest.name}, {GUEST_LINES} lines, ~60M instructions; heartbeat {HEARTBEAT}; --max-lag {MAX_LAG or 'default'}; load "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.only in (None, "throughput"):
        throughput(guest, tmp, args.rounds)
    if args.only in (None, "latency"):
        latency(tmp, args.trips)
    if args.only in (None, "failover"):
        failover(guest, tmp, args.kills, signal.SIGKILL)
        failover(guest, tmp, args.kills, signal.SIGSTOP)
    if args.only in (None, "join"):
        rejoin(tmp, args.kills)


if __name__ == "__main__":
    threading.excepthook = lambda a: None
    main()
