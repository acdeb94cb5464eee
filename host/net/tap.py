"""A Linux TAP device as a wire: the host's network stack on the other end.

Opened as Linux's tun/tap driver documents it (Documentation/networking/
tuntap.rst; QEMU's net/tap-linux.c does the same): open /dev/net/tun, then
the TUNSETIFF ioctl with IFF_TAP (Ethernet frames) and IFF_NO_PI (no packet
information header before each frame), naming the interface.  Each read
returns one frame, each write sends one.  The interface is created if it does
not exist (which needs CAP_NET_ADMIN) and must then be brought up and given
addresses by the host (``ip link set NAME up``), as with QEMU.

Failures are one line in a ``NetBackendError``: no /dev/net/tun (no tun
driver, or a container without the device), no permission, a name in use by
another kind of interface or too long.

The device is non-blocking: ``poll()`` reads every frame waiting (at most
MAX_FRAMES_PER_POLL) and delivers each to the receiver; ``send`` writes one
frame and drops it (counted in ``drops``) if the kernel will not take it now.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Any

from host.net import NetBackendError

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
READ_SIZE = 65536 + 4096
MAX_FRAMES_PER_POLL = 1024


class TapLink:
    """A TAP interface (module doc)."""

    def __init__(self, ifname: str) -> None:
        label = f"tap:{ifname}"
        raw = ifname.encode()
        if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw:
            raise NetBackendError(f"{label}: an interface name is 1 to {IFNAMSIZ - 1} bytes without '/'")
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ENOENT:
                why = f"{TUN_DEVICE} does not exist (no tun/tap driver here)"
            elif e.errno in (errno.EACCES, errno.EPERM):
                why = f"no permission to open {TUN_DEVICE} (TAP needs root or CAP_NET_ADMIN)"
            else:
                why = f"cannot open {TUN_DEVICE}: {e.strerror}"
            raise NetBackendError(f"{label}: {why}") from None
        try:
            ifr = struct.pack("16sH22x", raw, IFF_TAP | IFF_NO_PI)
            out = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EPERM, errno.EACCES):
                why = "no permission to create or attach it (TAP needs root or CAP_NET_ADMIN)"
            elif e.errno == errno.EBUSY:
                why = "the interface is in use"
            elif e.errno == errno.EINVAL:
                why = "the name belongs to an interface that is not a TAP device"
            else:
                why = f"TUNSETIFF failed: {e.strerror}"
            raise NetBackendError(f"{label}: {why}") from None
        self.fd: int | None = fd
        self.ifname = out[:IFNAMSIZ].split(b"\0", 1)[0].decode()
        self.name = f"tap:{self.ifname}"
        self.receiver: Any = None
        self.frames_in = self.frames_out = 0
        self.drops = 0

    def connect(self, receiver: Any) -> None:
        self.receiver = receiver

    def send(self, frame: bytes) -> None:
        if self.fd is None:
            self.drops += 1
            return
        try:
            os.write(self.fd, frame)
            self.frames_out += 1
        except OSError:
            self.drops += 1          # the kernel's queue is full, or the interface is down

    def poll(self) -> int:
        n = 0
        while self.fd is not None and n < MAX_FRAMES_PER_POLL:
            try:
                frame = os.read(self.fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if not frame:
                break
            n += 1
            self.frames_in += 1
            if self.receiver is not None:
                self.receiver.deliver(frame)
        return n

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
