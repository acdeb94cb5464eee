"""SIGKILL of a ``vmm run`` process whose Linux guest is writing its disk (issue 12).

Debian's kernel writes numbered 4 KiB blocks to a qcow2 virtio-blk disk with busybox dd
(``oflag=direct conv=fsync``: each write is followed by a FLUSH request) and prints
``FLUSHED i`` once block i's fsync returned.  The host kills the process with SIGKILL at a
point hypothesis picks (after some ``FLUSHED k`` line, plus a delay), while writes are queued
in the write-behind thread (host/images/writebehind.py), under way in the file or between.
Afterwards the image must open and check without corruption (leaked clusters are allowed,
as QEMU allows them after a crash), every block the guest saw flushed must hold its data,
and every other block must hold its data or nothing: no torn or foreign bytes.

test_qcow2.py kills processes driving the image layer alone at every I/O call; this kills
the real thing, guest and all.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host.images import create, open_image
from tests.realguests import _available, debian_kernel  # noqa: F401  (fixtures)
from tests.test_qcow2 import qemu_check
from tools import debian

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = 300
BLOCK = 4096
DISK = 4 << 20
SCRIPT = f"""i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo DISK-READY
i=1
while [ $i -le {BLOCKS} ]; do
  yes "blk $i" | head -c {BLOCK} > /tmp/b
  dd if=/tmp/b of=/dev/vda bs={BLOCK} seek=$i count=1 oflag=direct conv=notrunc,fsync 2>/dev/null && echo FLUSHED $i
  i=$((i+1))
done
echo ALL-DONE
poweroff -f
"""


def pattern(i: int) -> bytes:
    line = f"blk {i}\n".encode()
    return (line * (BLOCK // len(line) + 1))[:BLOCK]


def _run_and_kill(kernel: Path, initrd: Path, image: str, after: int, delay: float) -> int:
    """Run the guest, SIGKILL vmm ``delay`` s after the guest reported block ``after`` flushed;
    returns the highest block reported flushed before the kill."""
    cmd = [sys.executable, "-m", "tools.cli", "run", "--kernel", str(kernel), "--initrd", str(initrd),
           "--append", "console=ttyS0 panic=-1 quiet", "--mem", "128M",
           "--drive", f"file={image},if=virtio,format=qcow2", "--serial", "stdio"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    flushed, buf, kill_at = 0, b"", None
    deadline = time.monotonic() + 600
    try:
        while True:
            assert time.monotonic() < deadline, "the guest did not get there in 10 minutes"
            timeout = 0.5 if kill_at is None else max(0.0, kill_at - time.monotonic())
            ready, _, _ = select.select([p.stdout], [], [], timeout)
            if kill_at is not None and time.monotonic() >= kill_at:
                break
            if not ready:
                continue
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                break                       # it finished before the kill
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.startswith(b"FLUSHED "):
                    flushed = int(line.split()[1])
                    if flushed >= after and kill_at is None:
                        kill_at = time.monotonic() + delay
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        p.stdout.close()
        err = p.stderr.read().decode(errors="replace")
        p.stderr.close()
    assert flushed >= 1, f"the guest flushed nothing before the kill:\n{err[-2000:]}"
    return flushed


@settings(max_examples=3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(after=st.integers(1, BLOCKS - 20), delay=st.floats(0, 0.05), cluster=st.sampled_from([4096, 65536]))
def test_sigkill_of_vmm_keeps_every_block_the_guest_flushed(debian_kernel, tmp_path_factory,  # noqa: F811
                                                             after, delay, cluster):
    initrd = _available(debian.initramfs, debian.INIT_HEADER + debian.LOAD_MODULES + SCRIPT,
                        ["virtio_pci", "virtio_blk"])
    d = tmp_path_factory.mktemp("kill")
    image = str(d / "disk.qcow2")
    create(image, DISK, cluster_size=cluster)
    flushed = _run_and_kill(debian_kernel, initrd, image, after, delay)
    qemu_check(image, allow_leaks=True)
    with open_image(image) as im:
        result = im.check()
        assert not result.corruptions, result
        assert im.read(0, BLOCK) == bytes(BLOCK)
        for i in range(1, BLOCKS + 1):
            got = im.read(i * BLOCK, BLOCK)
            if i <= flushed:
                assert got == pattern(i), f"block {i} was flushed (the guest saw {flushed}) and is lost"
            else:
                assert got in (pattern(i), bytes(BLOCK)), f"block {i} holds bytes nobody wrote"
        assert im.read((BLOCKS + 1) * BLOCK, DISK - (BLOCKS + 1) * BLOCK) == bytes(DISK - (BLOCKS + 1) * BLOCK)
