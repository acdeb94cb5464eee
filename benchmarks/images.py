"""Disk image throughput: qcow2 against raw, 4 KiB requests, side by side.

    python benchmarks/images.py [--size-mb 128] [--cluster-size 65536] [--repeat 3]

For each format, on a file of --size-mb in a temporary folder (so, mostly in
the host's page cache: this measures what the format layer costs, not the
disk), best of --repeat:

* sequential write of the whole disk in 4 KiB requests, then one flush
  (for qcow2 on a new image: every cluster is allocated on the way);
* sequential read of the whole disk;
* random 4 KiB reads, then random 4 KiB writes (in place), --ops each,
  flush included;
* random 4 KiB writes on a new, empty image (qcow2: allocating writes,
  each one a new cluster, plus the flush that orders the metadata).

With qemu-img installed, ``qemu-img bench`` (C, its own I/O loop) runs the
same sequential and random 4 KiB reads on the same qcow2 file, as a peer
figure: the gap is what Python costs.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from host.images import create, open_image

BLOCK = 4096


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _new_raw(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def run_format(fmt: str, folder: str, size: int, ops: int, cluster: int, repeat: int) -> dict[str, float]:
    """Seconds for each workload, best of ``repeat``."""
    path = os.path.join(folder, f"bench.{fmt}")
    offsets = [random.Random(i).randrange(size // BLOCK) * BLOCK for i in range(ops)]
    payload = random.Random(0).randbytes(BLOCK)

    def fresh() -> None:
        if os.path.exists(path):
            os.unlink(path)
        if fmt == "raw":
            _new_raw(path, size)
        else:
            create(path, size, cluster_size=cluster)

    def seq_write() -> None:
        with open_image(path, True) as im:
            for off in range(0, size, BLOCK):
                im.write(off, payload)
            im.flush()

    def seq_read() -> None:
        with open_image(path) as im:
            for off in range(0, size, BLOCK):
                im.read(off, BLOCK)

    def rand_read() -> None:
        with open_image(path) as im:
            for off in offsets:
                im.read(off, BLOCK)

    def rand_write() -> None:
        with open_image(path, True) as im:
            for off in offsets:
                im.write(off, payload)
            im.flush()

    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, seconds), seconds)

    for _ in range(repeat):
        fresh()
        keep("seq write (alloc)", _timed(seq_write))
        keep("seq read", _timed(seq_read))
        keep("rand read", _timed(rand_read))
        keep("rand write", _timed(rand_write))
        fresh()
        keep("rand write (alloc)", _timed(rand_write))
    return best


def qemu_img_bench(folder: str, size: int, cluster: int, ops: int) -> dict[str, float]:
    """qemu-img bench on a fully written qcow2 of the same geometry, through the page
    cache as ours are: seconds per workload."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        return {}
    path = os.path.join(folder, "peer.qcow2")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", path,
                    str(size)], check=True)
    subprocess.run(["qemu-io", "-c", f"write -P 0x5a 0 {size}", path], check=True, capture_output=True)
    out: dict[str, float] = {}
    for name, extra, count in (("seq read", [], size // BLOCK),
                               ("rand read", ["-S", str(BLOCK * 7919)], ops)):
        # -S with a large prime step walks the disk out of order (qemu-img
        # bench has no random mode); requests wrap round at the end.
        p = subprocess.run([qemu_img, "bench", "-f", "qcow2", "-t", "writeback", "-d", "1",
                            "-c", str(count), "-s", str(BLOCK), *extra, path],
                           check=False, capture_output=True, text=True)
        m = re.search(r"Run completed in ([0-9.]+) seconds", p.stdout)
        if p.returncode == 0 and m:
            out[name] = float(m.group(1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=128)
    ap.add_argument("--ops", type=int, default=20000, help="requests in each random workload")
    ap.add_argument("--cluster-size", type=int, default=65536)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    size = args.size_mb << 20
    counts = {"seq write (alloc)": size // BLOCK, "seq read": size // BLOCK, "rand read": args.ops,
              "rand write": args.ops, "rand write (alloc)": args.ops}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as folder:
        raw = run_format("raw", folder, size, args.ops, args.cluster_size, args.repeat)
        qcow2 = run_format("qcow2", folder, size, args.ops, args.cluster_size, args.repeat)
        peer = qemu_img_bench(folder, size, args.cluster_size, args.ops)
    print(f"{args.size_mb} MiB disk, 4 KiB requests, qcow2 clusters of {args.cluster_size} B, "
          f"best of {args.repeat}; Python {sys.version.split()[0]}")
    print(f"{'workload':<20} {'raw IOPS':>10} {'qcow2 IOPS':>11} {'qcow2/raw':>10} {'raw MB/s':>9} "
          f"{'qcow2 MB/s':>11} {'qemu-img bench IOPS':>20}")
    for name, n in counts.items():
        r, q = n / raw[name], n / qcow2[name]
        p = f"{n / peer[name]:,.0f}" if name in peer else "-"
        print(f"{name:<20} {r:>10,.0f} {q:>11,.0f} {q / r:>10.2f} {r * BLOCK / 1e6:>9.1f} "
              f"{q * BLOCK / 1e6:>11.1f} {p:>20}")
    if not peer:
        print("(qemu-img not installed: no peer column; apt-get install qemu-utils)")


if __name__ == "__main__":
    main()
