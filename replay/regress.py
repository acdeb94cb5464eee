"""`vmm regress`: replay a corpus of recordings, one verdict each, for CI.

    vmm regress DIR|LIST|LOG ... [--junit FILE] [-j N] [--ray ADDRESS]

Each recording is replayed with every digest checked and judged:

* ``exact``: it replayed to its recorded end and every digest matched;
* ``diverged``: the replay departed from the recording (the report says where:
  icount, RIP, the event before, the register diff, the pages that differ);
* ``unreadable``: the log (or the image or snapshot it names) cannot be used:
  corrupt, cut short, a wrong version, a missing image.

A DIR argument means every ``*.vmlog`` under it (recursively); a LIST is a text
file naming one recording per line (relative to the list's own directory;
blank lines and ``#`` comments are skipped); a file ending in ``.vmlog`` is
itself.  Recordings run on the local cores in parallel (one process each, as
many as there are cores, ``-j`` to choose), or on a Ray cluster with ``--ray
ADDRESS`` (``pip install vmm[ray]``; ``--ray local`` starts a one-machine
instance).  A verdict is a function of the recording alone, so the verdicts
are the same however the corpus is spread.

Exit status: 0 every recording exact; 5 one or more diverged; 6 none diverged
but one or more unreadable; 2 a usage error (nothing to replay, a bad LIST,
Ray not installed).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from tools import exitstatus

EXACT, DIVERGED, UNREADABLE = "exact", "diverged", "unreadable"
# the statuses `vmm replay` gives the same findings (tools/exitstatus.py)
EXIT_OK, EXIT_USAGE, EXIT_DIVERGED, EXIT_UNREADABLE = (exitstatus.OK, exitstatus.USAGE, exitstatus.DIVERGED,
                                                       exitstatus.BAD_LOG)


class RegressUsageError(ValueError):
    """Arguments that name nothing to replay, or a Ray that is not there."""


@dataclass
class Verdict:
    path: str
    verdict: str          # EXACT, DIVERGED or UNREADABLE
    detail: str = ""      # the divergence report, or what made the log unusable
    icount: int | None = None   # instructions replayed
    result: str = ""      # how the replayed guest ended (exit status 0, halted, ...)
    seconds: float = 0.0


def check(path: str) -> Verdict:
    """Replay one recording with every digest checked; never raises for a bad recording."""
    from host.serial import NullBackend
    from replay.events import LogFormatError
    from replay.session import Divergence, Replayer, ReplayError
    from vmm.state import SnapshotError

    t0 = time.perf_counter()

    def done(verdict: str, detail: str = "", icount: int | None = None, result: str = "") -> Verdict:
        return Verdict(path, verdict, detail, icount, result, round(time.perf_counter() - t0, 3))

    rp = None
    try:
        rp = Replayer(path, serial=NullBackend())
        if rp.image_changed:
            return done(UNREADABLE, "the image differs from the recorded one (sha256)")
        res = rp.run()
        if rp.truncated:
            return done(UNREADABLE, f"the log is cut short: it replayed exactly to icount {res.icount}, "
                                    "where its last whole chunk ends", res.icount)
        return done(EXACT, icount=res.icount, result=f"{res.reason.value} (status {res.status})")
    except Divergence as d:
        return done(DIVERGED, str(d), d.icount)
    except (LogFormatError, ReplayError, SnapshotError) as e:
        return done(UNREADABLE, str(e))
    except OSError as e:
        return done(UNREADABLE, f"cannot read {path}: {e.strerror or e}")
    finally:
        if rp is not None:
            rp.m.close()


MAX_LIST = 16 << 20     # bytes of a LIST (some 300,000 paths)


def collect(args: Iterable[str]) -> list[str]:
    """The recordings the arguments name (see the module docstring), in order, each once."""
    out: list[str] = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*.vmlog") if f.is_file())
        elif p.suffix == ".vmlog":
            out.append(str(p))     # a missing one is judged unreadable, not skipped
        elif p.is_file():
            from vmm.firmware.imagefile import read_file

            try:
                # a regular file, its size checked before it is read
                lines = read_file(a, MAX_LIST, "a list of recordings").decode().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise RegressUsageError(f"cannot read the list {a}: {getattr(e, 'strerror', None) or e}") from None
            for line in lines:
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append(str(p.parent / line) if not os.path.isabs(line) else line)
        else:
            raise RegressUsageError(f"{a}: no such directory, list or recording")
    seen: set[str] = set()
    uniq = [x for x in out if not (x in seen or seen.add(x))]
    if not uniq:
        raise RegressUsageError("no recordings to replay (a DIR holds *.vmlog files, a LIST names them)")
    return uniq


def _local(paths: list[str], jobs: int | None) -> list[Verdict]:
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    jobs = max(1, min(jobs or os.cpu_count() or 1, len(paths)))
    if jobs == 1:
        return [check(p) for p in paths]
    # spawn: a worker starts clean, with no CPU engine or open file inherited from here
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(check, paths))


def _ray(paths: list[str], address: str) -> list[Verdict]:
    try:
        import ray
    except ImportError:
        raise RegressUsageError("--ray needs Ray: pip install 'vmm[ray]'") from None
    started = False
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
        started = True
    try:
        remote = ray.remote(check)
        return ray.get([remote.remote(os.path.abspath(p)) for p in paths])
    finally:
        if started:
            ray.shutdown()


def regress(recordings: Iterable[str], jobs: int | None = None, ray_address: str | None = None) -> list[Verdict]:
    """One Verdict per recording the arguments name (DIRs, LISTs, logs), in corpus order."""
    paths = collect(recordings)
    verdicts = _ray(paths, ray_address) if ray_address else _local(paths, jobs)
    for v, p in zip(verdicts, paths):
        v.path = p                 # as named here, whatever path a worker was given
    return verdicts


def junit_xml(verdicts: list[Verdict], name: str = "vmm regress") -> bytes:
    """JUnit XML (the schema Jenkins, GitLab and GitHub read): a testcase per recording,
    <failure> for a divergence, <error> for an unreadable log."""
    failures = sum(v.verdict == DIVERGED for v in verdicts)
    errors = sum(v.verdict == UNREADABLE for v in verdicts)
    total = sum(v.seconds for v in verdicts)
    suites = ET.Element("testsuites", name=name, tests=str(len(verdicts)), failures=str(failures),
                        errors=str(errors), time=f"{total:.3f}")
    suite = ET.SubElement(suites, "testsuite", name=name, tests=str(len(verdicts)), failures=str(failures),
                          errors=str(errors), skipped="0", time=f"{total:.3f}")
    for v in verdicts:
        case = ET.SubElement(suite, "testcase", classname="vmm.replay", name=v.path, time=f"{v.seconds:.3f}")
        if v.verdict == DIVERGED:
            first = v.detail.splitlines()[0] if v.detail else "diverged"
            ET.SubElement(case, "failure", message=first, type="diverged").text = v.detail
        elif v.verdict == UNREADABLE:
            ET.SubElement(case, "error", message=v.detail, type="unreadable").text = v.detail
        else:
            ET.SubElement(case, "system-out").text = f"exact: {v.icount} instructions, {v.result}"
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


def exit_status(verdicts: list[Verdict]) -> int:
    if any(v.verdict == DIVERGED for v in verdicts):
        return EXIT_DIVERGED
    if any(v.verdict == UNREADABLE for v in verdicts):
        return EXIT_UNREADABLE
    return EXIT_OK


def add_parser(sub) -> argparse.ArgumentParser:
    """The `regress` subcommand on the `vmm` command line's subparsers."""
    r = sub.add_parser("regress", help="replay a corpus of recordings: exact, diverged or unreadable",
                       description="Replay every recording named, checking every digest, and report each as "
                                   "exact, diverged (with the report) or unreadable.",
                       epilog="exit status: 0 all exact; 5 a recording diverged; 6 none diverged but one "
                              "is unreadable; 2 usage error")
    r.add_argument("corpus", nargs="+", metavar="DIR|LIST|LOG",
                   help="a directory of *.vmlog files, a text file listing recordings, or a recording")
    r.add_argument("--junit", metavar="FILE", default=None, help="write the verdicts as JUnit XML")
    r.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                   help="replay N recordings at once on this machine (default: one per core)")
    r.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="spread the corpus over a Ray cluster (`local` starts one here); needs vmm[ray]")
    r.add_argument("-q", "--quiet", action="store_true", help="print only what is not exact, and the summary")
    return r


def main(args: argparse.Namespace) -> int:
    if args.jobs is not None and args.jobs < 1:
        raise RegressUsageError(f"--jobs wants a positive number, not {args.jobs}")
    t0 = time.perf_counter()
    verdicts = regress(args.corpus, jobs=args.jobs, ray_address=args.ray)
    dt = time.perf_counter() - t0
    out = sys.stdout
    for v in verdicts:
        if v.verdict == EXACT:
            if not args.quiet:
                print(f"exact      {v.path}  ({v.icount:,} instructions, {v.result})", file=out)
        else:
            print(f"{v.verdict:<10} {v.path}", file=out)
            for line in v.detail.splitlines():
                print(f"    {line}", file=out)
    counts = {k: sum(v.verdict == k for v in verdicts) for k in (EXACT, DIVERGED, UNREADABLE)}
    where = f"Ray at {args.ray}" if args.ray else "local cores"
    print(f"{len(verdicts)} recordings: {counts[EXACT]} exact, {counts[DIVERGED]} diverged, "
          f"{counts[UNREADABLE]} unreadable ({dt:.1f} s on {where})", file=out)
    if args.junit:
        try:
            with open(args.junit, "wb") as f:
                f.write(junit_xml(verdicts))
        except OSError as e:
            raise RegressUsageError(f"cannot write {args.junit}: {e.strerror}") from None
    return exit_status(verdicts)


def as_dicts(verdicts: list[Verdict]) -> list[dict]:
    return [asdict(v) for v in verdicts]
