"""Network throughput and latency: two Debian Linux guests on the in-process switch, and a guest
talking to the host through user-mode networking, the latter against QEMU TCG in the same run.

Two machines (e1000 or virtio-net, Debian's kernel and modules in a busybox initramfs) run in
one process in turns (replay/group.py); one sends BYTES of zeros to the other with busybox
``nc`` and both ping each other.  Reported per model:

* guest-to-guest TCP: frames and bytes that crossed the switch during the transfer, per host
  second (from the first to the last frame of the transfer, host clock) and per guest second
  (the guests' virtual time over the same span);
* ping round trip as the guest's ping reports it (virtual time);
* the same number of bytes, in frames of the same sizes, through a host ``socketpair`` with
  the stream backend's framing (4-byte big-endian length), in the same run: the cost of moving
  frames through the host alone.

Guest to host (``--what user``, also in the default ``both``): one guest, the same kernel and
initramfs under `vmm run --nic model=M,net=user` and under `qemu-system-x86_64 -accel tcg -nic
user,model=M` (libslirp in both), sends BYTES of zeros with busybox ``nc`` to a TCP server
this script runs on the host's loopback (10.0.2.2 from the guest) and pings 10.0.2.2 (libslirp
answers).  Reported per model and emulator: bytes per host second as the host's server
counts them (first byte to end of stream), the guest's ping round trip (vmm: virtual time;
QEMU TCG: its guest clock, about host time), and the vmm/QEMU throughput ratio; then the
bytes per CPU second the emulator's process used over the same span (/proc/PID/stat at the
first and last byte, all threads), which moves less than host time on a shared machine.

    python benchmarks/net.py [--model e1000|virtio|both] [--mbytes N] [--what switch|user|both] [--no-qemu]
                             [--append ARGS]

``--append ARGS`` adds kernel arguments to every guest, vmm's and QEMU's.  Both run the same
kernel code by default: vmm's default machine type, pc-3, reports IA32_ARCH_CAPABILITIES with
RDCL_NO, so Linux does not isolate its page tables, and QEMU's default CPU (qemu64) is AMD,
which Linux does not isolate either (``-M pc-2`` would turn isolation on under vmm).

Needs Debian's kernel packages (tools/debian.py); says so and exits 0 without them.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.disk import process_cpu
from replay.group import GroupRecording
from replay.session import machine_config
from tools import debian
from vmm.platform.net import connect_backend, describe_nics
from vmm.platform.pc import DEFAULT_EPOCH

MODULES = {"e1000": ["e1000"], "virtio": ["virtio_pci", "virtio_net"]}
COMMON = """ip link set lo up
ip link set eth0 up
ip addr add {ip}/24 dev eth0
"""
RECEIVER = COMMON.format(ip="10.0.2.15") + """nc -l -p 1234 > /dev/null; echo RECV-DONE
sleep 30
"""
SENDER = COMMON.format(ip="10.0.2.16") + """sleep 2
ping -c 5 10.0.2.15
echo XFER-START
dd if=/dev/zero bs=65536 count={blocks} 2>/dev/null | nc 10.0.2.15 1234; echo XFER-DONE
poweroff -f
"""


class Meter:
    """Counts frames and bytes through a switch port, with host and guest time stamps."""

    def __init__(self, m) -> None:
        self.m = m
        self.frames = self.bytes = 0
        self.sizes: list[int] = []
        self.first = self.last = None

    def __call__(self, frame: bytes, ns: int) -> None:
        now = (time.perf_counter(), ns)
        if self.first is None:
            self.first = now
        self.last = now
        self.frames += 1
        self.bytes += len(frame)
        if len(self.sizes) < 100_000:
            self.sizes.append(len(frame))


def run_model(model: str, mbytes: int, append: str = "") -> dict:
    kernel = debian.kernel()
    data = kernel.read_bytes()
    group = GroupRecording()
    machines = {}
    for name, script, mac in (("rx", RECEIVER, "52:54:00:12:34:56"),
                              ("tx", SENDER.format(blocks=mbytes * 16), "52:54:00:12:34:57")):
        initrd = debian.initramfs(debian.INIT_HEADER + debian.LOAD_MODULES + script, MODULES[model])
        cfg = machine_config(256 << 20, DEFAULT_EPOCH, str(kernel), data, "linux",
                             f"console=ttyS0 panic=-1 {append}".strip(),
                             0x100000, "none", initrd=(str(initrd), initrd.read_bytes()))
        cfg["nics"] = describe_nics([{"model": model, "mac": mac}])
        m = group.add(name, cfg, data, os.devnull)
        connect_backend(m, "net0", f"switch:bench-{model}")
        machines[name] = m
    meter = Meter(machines["tx"])
    tx_mac = bytes.fromhex("525400123457")
    serial = machines["tx"].serial_out

    def tap(frame: bytes, ns: int) -> None:
        # frames the sender sends during the transfer (its ACKs from the receiver are not counted)
        if frame[6:12] == tx_mac and b"XFER-START" in serial and b"XFER-DONE" not in serial:
            meter(frame, ns)
    machines["tx"].net_input.ports["net0"].capture = tap
    t0 = time.perf_counter()
    group.run(60_000_000_000, until=lambda: b"XFER-DONE" in bytes(machines["tx"].serial_out))
    total = time.perf_counter() - t0
    out = bytes(machines["tx"].serial_out).decode(errors="replace")
    rtt = re.search(r"round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms", out)
    for m in machines.values():
        m.close()
    if meter.first is None or "XFER-DONE" not in out:
        raise RuntimeError(f"{model}: the transfer did not complete:\n{out[-2000:]}")
    host_s = meter.last[0] - meter.first[0]
    guest_s = (meter.last[1] - meter.first[1]) / 1e9
    return {"model": model, "frames": meter.frames, "bytes": meter.bytes, "host_s": host_s, "guest_s": guest_s,
            "rtt_ms": "/".join(rtt.groups()) if rtt else None, "sizes": meter.sizes, "total_s": total}


def socketpair_baseline(sizes: list[int], total_frames: int) -> tuple[float, int]:
    """Host seconds to move ``total_frames`` frames of these sizes (cycled) through a socketpair
    with the stream framing, written and read in one thread in 256 KiB batches."""
    a, b = socket.socketpair()
    a.setblocking(False)
    frames = [struct.pack(">I", n) + bytes(n) for n in sizes] or [struct.pack(">I", 1514) + bytes(1514)]
    moved = 0
    pending = bytearray()
    t0 = time.perf_counter()
    i = 0
    got = 0
    buf = bytearray()
    while got < total_frames:
        while i < total_frames and len(pending) < 256 << 10:
            pending += frames[i % len(frames)]
            i += 1
        if pending:
            try:
                n = a.send(pending)
                del pending[:n]
            except BlockingIOError:
                pass
        buf += b.recv(1 << 20)
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = struct.unpack_from(">I", buf, pos)
            if len(buf) - pos - 4 < n:
                break
            pos += 4 + n
            moved += n
            got += 1
        del buf[:pos]
    dt = time.perf_counter() - t0
    a.close()
    b.close()
    return dt, moved


USER_GUEST = """ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
P=$(sed -n 's/.*hostport=\\([0-9]*\\).*/\\1/p' /proc/cmdline)
ping -c 5 10.0.2.2
echo XFER-START
dd if=/dev/zero bs=65536 count={blocks} 2>/dev/null | nc 10.0.2.2 $P; echo XFER-DONE
poweroff -f
"""
QEMU_MODEL = {"e1000": "e1000", "virtio": "virtio-net-pci"}


class Sink:
    """A TCP server on the host's loopback that counts what one connection sends (host clock)."""

    def __init__(self) -> None:
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(1)
        self.port = self.ls.getsockname()[1]
        self.bytes = 0
        self.first = self.last = None
        self.pid: int | None = None          # the emulator's process: its CPU time is read with the bytes
        self.cpu_first = self.cpu_last = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            c, _ = self.ls.accept()
        except OSError:
            return
        with c:
            while chunk := c.recv(1 << 20):
                now = time.perf_counter()
                cpu = process_cpu(self.pid) if self.pid is not None else None
                if self.first is None:
                    self.first, self.cpu_first = now, cpu
                self.last, self.cpu_last = now, cpu
                self.bytes += len(chunk)

    def close(self) -> None:
        self.ls.close()
        self.thread.join(5)


def run_user(model: str, mbytes: int, emulator: str, append: str = "") -> dict:
    """One guest sending ``mbytes`` MiB to the host through user-mode networking, under vmm or QEMU."""
    kernel = debian.kernel()
    initrd = debian.initramfs(debian.INIT_HEADER + debian.LOAD_MODULES + USER_GUEST.format(blocks=mbytes * 16),
                              MODULES[model])
    sink = Sink()
    append = f"console=ttyS0 panic=-1 hostport={sink.port} {append}".strip()
    if emulator == "vmm":
        cmd = [sys.executable, "-m", "tools.cli", "run", "--kernel", str(kernel), "--initrd", str(initrd),
               "--mem", "256M", "--append", append, "--nic", f"model={model},net=user"]
    else:
        cmd = [shutil.which("qemu-system-x86_64"), "-accel", "tcg", "-m", "256", "-kernel", str(kernel),
               "-initrd", str(initrd), "-append", append, "-nic", f"user,model={QEMU_MODEL[model]}",
               "-no-reboot", "-nographic", "-monitor", "none"]
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                          stdin=subprocess.DEVNULL) as p:
        sink.pid = p.pid
        try:
            out, err = p.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
    total = time.perf_counter() - t0
    sink.close()
    rtt = re.search(r"round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms", out)
    if "XFER-DONE" not in out or sink.first is None or sink.bytes != mbytes << 20:
        raise RuntimeError(f"{emulator} {model}: the transfer did not complete ({sink.bytes} bytes, "
                           f"rc {p.returncode}):\n{out[-1500:]}{err[-800:]}")
    host_s = max(sink.last - sink.first, 1e-9)
    cpu_s = max(sink.cpu_last - sink.cpu_first, 1e-9) if sink.cpu_first is not None else float("nan")
    return {"bytes": sink.bytes, "host_s": host_s, "cpu_s": cpu_s, "rtt_ms": "/".join(rtt.groups()) if rtt else "?",
            "total_s": total}



def user_table(models: list[str], mbytes: int, qemu: bool, append: str = "") -> None:
    print(f"\nguest -> host over user networking (libslirp), {mbytes} MiB with busybox nc, host clock:")
    print(f"{'model':7s} {'vmm MB/s':>9} {'QEMU MB/s':>10} {'vmm/QEMU':>9}   {'vmm ping min/avg/max':>22}   "
          f"{'QEMU ping min/avg/max':>22}   {'vmm run s':>9} {'QEMU run s':>10}   "
          f"{'vmm MB/cpu-s':>12} {'QEMU MB/cpu-s':>13} {'ratio':>6}")
    for model in models:
        v = run_user(model, mbytes, "vmm", append)
        q = run_user(model, mbytes, "qemu", append) if qemu else None
        vr = v["bytes"] / v["host_s"] / 1e6
        qr = q["bytes"] / q["host_s"] / 1e6 if q else None
        print(f"{model:7s} {vr:9.2f} {qr if qr is not None else float('nan'):10.2f} "
              f"{(vr / qr if qr else float('nan')):8.2f}x   {v['rtt_ms'] + ' ms':>22}   "
              f"{(q['rtt_ms'] + ' ms') if q else '-':>22}   {v['total_s']:9.1f} "
              f"{q['total_s'] if q else float('nan'):10.1f}   {v['bytes'] / v['cpu_s'] / 1e6:12.2f} "
              f"{q['bytes'] / q['cpu_s'] / 1e6 if q else float('nan'):13.2f} "
              f"{(v['bytes'] / v['cpu_s']) / (q['bytes'] / q['cpu_s']) if q else float('nan'):5.2f}x", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["e1000", "virtio", "both"], default="both")
    ap.add_argument("--mbytes", type=int, default=4, help="MiB sent guest to guest, and guest to host (default 4)")
    ap.add_argument("--what", choices=["switch", "user", "both"], default="both",
                    help="guest to guest on the switch, guest to host over user networking, or both")
    ap.add_argument("--no-qemu", action="store_true", help="no QEMU column in the user-networking table")
    ap.add_argument("--append", default="", help="more kernel arguments, for every guest (e.g. mitigations=off)")
    a = ap.parse_args()
    try:
        debian.kernel()
        debian.busybox()
    except debian.DebianUnavailable as e:
        print(f"net: skipped, Debian packages unavailable: {e}")
        return 0
    models = ["e1000", "virtio"] if a.model == "both" else [a.model]
    for model in models if a.what != "user" else []:
        r = run_model(model, a.mbytes, a.append)
        base_s, base_bytes = socketpair_baseline(r["sizes"], r["frames"])
        print(f"{model:7s} guest->guest over the switch: {r['frames']} frames, {r['bytes'] / 1e6:.1f} MB in "
              f"{r['host_s']:.2f} host s = {r['frames'] / r['host_s']:,.0f} frames/s, "
              f"{r['bytes'] / r['host_s'] / 1e6:.2f} MB/s host; {r['bytes'] / max(r['guest_s'], 1e-9) / 1e6:.1f} "
              f"MB/s in guest time ({r['guest_s']:.3f} guest s)")
        print(f"{model:7s} ping round trip (guest's ping, virtual time; the first includes ARP): min/avg/max "
              f"{r['rtt_ms'] or '?'} ms; whole run {r['total_s']:.1f} s")
        print(f"{model:7s} host socketpair, same frames with 4-byte framing: {r['frames'] / base_s:,.0f} frames/s, "
              f"{base_bytes / base_s / 1e6:.0f} MB/s ({base_s * 1e3:.1f} ms): the switch path is "
              f"{base_s / r['host_s'] * 100:.2f}% as fast")
    if a.what != "switch":
        qemu = not a.no_qemu and shutil.which("qemu-system-x86_64") is not None
        if not a.no_qemu and not qemu:
            print("net: no qemu-system-x86_64 on PATH: the QEMU column is left out")
        user_table(models, a.mbytes, qemu, a.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
