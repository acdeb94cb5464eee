"""User-mode networking as a wire: libslirp, the library QEMU's ``-nic user`` uses.

The guest sees QEMU's user network, 10.0.2.0/24 (libslirp's defaults, as
QEMU configures them): the gateway and the host at 10.0.2.2, a DNS forwarder
at 10.0.2.3 that asks the host's resolvers, and DHCP handing out addresses
from 10.0.2.15; IPv6 as QEMU's, fec0::/64 with the host at fec0::2.  TCP and
UDP connections the guest opens become the host's own sockets (NAT, no root
needed), and 10.0.2.2 reaches the host's loopback.  ``hostfwd`` rules (QEMU's
``hostfwd=[tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT``) listen on a
host port and connect each connection to the guest's port.

libslirp is reached through cffi's ABI mode (``ffi.dlopen`` of
``libslirp.so.0``, Debian's libslirp0), so no compiler or header is needed;
the declarations below are those of libslirp.h (4.x, SlirpConfig version 4).

Determinism: this object lives outside every machine.  Frames libslirp sends
toward the guest go to the receiver (a NIC's ``NicPort``) and wait in its
host queue until the machine's ``NetInput`` takes them through the boundary's
``net`` channel, which logs them; a replay takes them from the log and never
loads libslirp.  libslirp's clock (``clock_get_ns``) and its timers are host
monotonic time, looked at only from ``poll()`` and ``send()``: they decide
what libslirp sends and when the host sees it, never anything in a machine
but through the boundary.

``poll()``, called on the machine's schedule, asks libslirp which of its
sockets to watch (``slirp_pollfds_fill``), polls them without waiting, lets
libslirp handle what is ready (``slirp_pollfds_poll``) and fires due timers.

Failures are one line in a ``NetBackendError``: no libslirp on this host, a
hostfwd address that is not IPv4, a host port in use.
"""
from __future__ import annotations

import functools
import ipaddress
import re
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from host.net import NetBackendError

LIBRARY = "libslirp.so.0"
NETWORK, NETMASK, HOST, DHCP_START, DNS = "10.0.2.0", "255.255.255.0", "10.0.2.2", "10.0.2.15", "10.0.2.3"
PREFIX6, HOST6, DNS6 = "fec0::", "fec0::2", "fec0::3"
CONFIG_VERSION = 4

CDEF = """
typedef struct Slirp Slirp;
struct in_addr { uint32_t s_addr; };
struct in6_addr { uint32_t s6_addr32[4]; };
struct sockaddr_in;
struct sockaddr_in6;
enum { SLIRP_POLL_IN = 1, SLIRP_POLL_OUT = 2, SLIRP_POLL_PRI = 4, SLIRP_POLL_ERR = 8, SLIRP_POLL_HUP = 16 };
typedef ssize_t (*SlirpWriteCb)(const void *buf, size_t len, void *opaque);
typedef void (*SlirpTimerCb)(void *opaque);
typedef int (*SlirpAddPollCb)(int fd, int events, void *opaque);
typedef int (*SlirpGetREventsCb)(int idx, void *opaque);
typedef enum SlirpTimerId { SLIRP_TIMER_RA, SLIRP_TIMER_NUM } SlirpTimerId;
typedef struct SlirpCb {
    SlirpWriteCb send_packet;
    void (*guest_error)(const char *msg, void *opaque);
    int64_t (*clock_get_ns)(void *opaque);
    void *(*timer_new)(SlirpTimerCb cb, void *cb_opaque, void *opaque);
    void (*timer_free)(void *timer, void *opaque);
    void (*timer_mod)(void *timer, int64_t expire_time, void *opaque);
    void (*register_poll_fd)(int fd, void *opaque);
    void (*unregister_poll_fd)(int fd, void *opaque);
    void (*notify)(void *opaque);
    void (*init_completed)(Slirp *slirp, void *opaque);
    void *(*timer_new_opaque)(SlirpTimerId id, void *cb_opaque, void *opaque);
} SlirpCb;
typedef struct SlirpConfig {
    uint32_t version;
    int restricted;
    bool in_enabled;
    struct in_addr vnetwork;
    struct in_addr vnetmask;
    struct in_addr vhost;
    bool in6_enabled;
    struct in6_addr vprefix_addr6;
    uint8_t vprefix_len;
    struct in6_addr vhost6;
    const char *vhostname;
    const char *tftp_server_name;
    const char *tftp_path;
    const char *bootfile;
    struct in_addr vdhcp_start;
    struct in_addr vnameserver;
    struct in6_addr vnameserver6;
    const char **vdnssearch;
    const char *vdomainname;
    size_t if_mtu;
    size_t if_mru;
    bool disable_host_loopback;
    bool enable_emu;
    struct sockaddr_in *outbound_addr;
    struct sockaddr_in6 *outbound_addr6;
    bool disable_dns;
    bool disable_dhcp;
} SlirpConfig;
Slirp *slirp_new(const SlirpConfig *cfg, const SlirpCb *callbacks, void *opaque);
void slirp_cleanup(Slirp *slirp);
void slirp_pollfds_fill(Slirp *slirp, uint32_t *timeout, SlirpAddPollCb add_poll, void *opaque);
void slirp_pollfds_poll(Slirp *slirp, int select_error, SlirpGetREventsCb get_revents, void *opaque);
void slirp_input(Slirp *slirp, const uint8_t *pkt, int pkt_len);
void slirp_handle_timer(Slirp *slirp, SlirpTimerId id, void *cb_opaque);
int slirp_add_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr, int host_port,
                      struct in_addr guest_addr, int guest_port);
const char *slirp_version_string(void);
"""

# SLIRP_POLL_* <-> poll(2) events
_TO_POLL = ((1, select.POLLIN), (2, select.POLLOUT), (4, select.POLLPRI), (8, select.POLLERR), (16, select.POLLHUP))
_HOSTFWD = re.compile(r"(tcp|udp|):([^:]*):([0-9]+)-([^:]*):([0-9]+)")


@dataclass(frozen=True)
class Hostfwd:
    """One forwarding rule: connections to host_addr:host_port go to guest_addr:guest_port."""

    proto: str              # "tcp" or "udp"
    host_addr: str          # "" for every address, as QEMU
    host_port: int
    guest_addr: str         # "" for the first DHCP address (10.0.2.15)
    guest_port: int

    def __str__(self) -> str:
        return f"{self.proto}:{self.host_addr}:{self.host_port}-{self.guest_addr}:{self.guest_port}"


def parse_hostfwd(text: str) -> Hostfwd:
    """QEMU's ``[tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT``; ValueError with one line."""
    m = _HOSTFWD.fullmatch(text)
    if m is None:
        raise ValueError(f"hostfwd={text!r} is not [tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT "
                         f"(e.g. tcp::8080-:80)")
    proto, haddr, hport, gaddr, gport = m.groups()
    for what, addr in (("host", haddr), ("guest", gaddr)):
        if addr:
            try:
                ipaddress.IPv4Address(addr)
            except ValueError:
                raise ValueError(f"hostfwd={text!r}: the {what} address {addr!r} is not an IPv4 address") from None
    if gaddr and ipaddress.IPv4Address(gaddr) not in ipaddress.IPv4Network(f"{NETWORK}/{NETMASK}"):
        raise ValueError(f"hostfwd={text!r}: the guest address {gaddr} is outside the user network {NETWORK}/24")
    for what, port in (("host", hport), ("guest", gport)):
        if not 0 < int(port) < 65536:
            raise ValueError(f"hostfwd={text!r}: the {what} port must be 1-65535, not {port}")
    return Hostfwd(proto or "tcp", haddr, int(hport), gaddr, int(gport))


@functools.cache
def _library() -> tuple[Any, Any]:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    try:
        lib = ffi.dlopen(LIBRARY)
    except OSError:
        raise NetBackendError(f"user: cannot load {LIBRARY} (user-mode networking needs libslirp; "
                              f"Debian: apt-get install libslirp0)") from None
    return ffi, lib


def version() -> str:
    """libslirp's version string (NetBackendError without it)."""
    ffi, lib = _library()
    return ffi.string(lib.slirp_version_string()).decode()


def _in_addr(text: str) -> dict:
    return {"s_addr": struct.unpack("=I", socket.inet_aton(text))[0]}


def _in6_addr(text: str) -> dict:
    return {"s6_addr32": list(struct.unpack("=4I", socket.inet_pton(socket.AF_INET6, text)))}


class UserNet:
    """A libslirp instance (module doc): one guest network, its NAT and its forwarded ports."""

    def __init__(self, hostfwds: list[Hostfwd] | tuple[Hostfwd, ...] = (), name: str = "user") -> None:
        ffi, lib = _library()
        self.ffi, self.lib = ffi, lib
        self.name = name
        self.receiver: Any = None
        self.frames_in = self.frames_out = 0
        self.drops = 0
        self.guest_errors = 0
        self.last_guest_error = ""
        self._timers: dict[int, list] = {}      # handle -> [deadline ms or None, id, cb_opaque, cb]
        self._next_timer = 1
        self._fds: list[tuple[int, int]] = []
        self._revents: list[int] = []
        self._callbacks = self._make_callbacks()
        cfg = ffi.new("SlirpConfig *", {
            "version": CONFIG_VERSION, "restricted": 0, "in_enabled": True,
            "vnetwork": _in_addr(NETWORK), "vnetmask": _in_addr(NETMASK), "vhost": _in_addr(HOST),
            "in6_enabled": True, "vprefix_addr6": _in6_addr(PREFIX6), "vprefix_len": 64,
            "vhost6": _in6_addr(HOST6), "vdhcp_start": _in_addr(DHCP_START), "vnameserver": _in_addr(DNS),
            "vnameserver6": _in6_addr(DNS6)})
        self._cb = ffi.new("SlirpCb *", self._callbacks)
        slirp = lib.slirp_new(cfg, self._cb, ffi.NULL)
        if slirp == ffi.NULL:
            raise NetBackendError(f"{name}: libslirp could not set up the user network")
        self._slirp = slirp
        for fwd in hostfwds:
            haddr = ffi.new("struct in_addr *", _in_addr(fwd.host_addr or "0.0.0.0"))[0]
            gaddr = ffi.new("struct in_addr *", _in_addr(fwd.guest_addr or "0.0.0.0"))[0]
            if lib.slirp_add_hostfwd(slirp, int(fwd.proto == "udp"), haddr, fwd.host_port, gaddr, fwd.guest_port) < 0:
                self.close()
                raise NetBackendError(f"{name}: hostfwd={fwd}: cannot listen on "
                                      f"{fwd.host_addr or '0.0.0.0'}:{fwd.host_port} "
                                      f"({_why_not_bound(fwd)})")
        self.hostfwds = tuple(hostfwds)

    # -- libslirp's callbacks ------------------------------------------------------------------
    def _make_callbacks(self) -> dict:
        ffi = self.ffi

        def send_packet(buf: Any, length: int, _opaque: Any) -> int:
            frame = bytes(ffi.buffer(buf, length))
            self.frames_in += 1
            if self.receiver is not None:
                self.receiver.deliver(frame)
            else:
                self.drops += 1
            return length

        def guest_error(msg: Any, _opaque: Any) -> None:
            self.guest_errors += 1
            self.last_guest_error = ffi.string(msg).decode(errors="replace")

        def clock_get_ns(_opaque: Any) -> int:
            return _host_ns()

        def timer_new(cb: Any, cb_opaque: Any, _opaque: Any) -> Any:
            return self._new_timer(None, cb_opaque, cb)

        def timer_new_opaque(timer_id: int, cb_opaque: Any, _opaque: Any) -> Any:
            return self._new_timer(timer_id, cb_opaque, None)

        def timer_free(timer: Any, _opaque: Any) -> None:
            self._timers.pop(int(ffi.cast("uintptr_t", timer)), None)

        def timer_mod(timer: Any, expire_ms: int, _opaque: Any) -> None:
            t = self._timers.get(int(ffi.cast("uintptr_t", timer)))
            if t is not None:
                t[0] = expire_ms

        def nothing(_fd: Any, _opaque: Any) -> None:
            pass

        def notify(_opaque: Any) -> None:
            pass

        def init_completed(_slirp: Any, _opaque: Any) -> None:
            pass

        self._add_poll = ffi.callback("SlirpAddPollCb", self._on_add_poll, onerror=_minus_one)
        self._get_revents = ffi.callback("SlirpGetREventsCb", self._on_get_revents, onerror=_zero)
        cbs = {
            "send_packet": ffi.callback("SlirpWriteCb", send_packet, onerror=_minus_one),
            "guest_error": ffi.callback("void(const char *, void *)", guest_error),
            "clock_get_ns": ffi.callback("int64_t(void *)", clock_get_ns),
            "timer_new": ffi.callback("void *(SlirpTimerCb, void *, void *)", timer_new),
            "timer_free": ffi.callback("void(void *, void *)", timer_free),
            "timer_mod": ffi.callback("void(void *, int64_t, void *)", timer_mod),
            "register_poll_fd": ffi.callback("void(int, void *)", nothing),
            "unregister_poll_fd": ffi.callback("void(int, void *)", nothing),
            "notify": ffi.callback("void(void *)", notify),
            "init_completed": ffi.callback("void(Slirp *, void *)", init_completed),
            "timer_new_opaque": ffi.callback("void *(SlirpTimerId, void *, void *)", timer_new_opaque),
        }
        self._keep = cbs          # the C side holds these pointers: keep them alive
        return cbs

    def _new_timer(self, timer_id: int | None, cb_opaque: Any, cb: Any) -> Any:
        handle = self._next_timer
        self._next_timer += 1
        self._timers[handle] = [None, timer_id, cb_opaque, cb]
        return self.ffi.cast("void *", handle)

    def _on_add_poll(self, fd: int, events: int, _opaque: Any) -> int:
        self._fds.append((fd, events))
        return len(self._fds) - 1

    def _on_get_revents(self, idx: int, _opaque: Any) -> int:
        return self._revents[idx] if 0 <= idx < len(self._revents) else 0

    # -- the wire --------------------------------------------------------------------------------
    def connect(self, receiver: Any) -> None:
        self.receiver = receiver

    def send(self, frame: bytes) -> None:
        """A frame from the guest into libslirp (its answers may come back at once, to the receiver)."""
        if self._slirp is None:
            self.drops += 1
            return
        self.frames_out += 1
        self.lib.slirp_input(self._slirp, frame, len(frame))

    def poll(self) -> int:
        """Move what waits on libslirp's host sockets and fire its due timers; returns frames delivered."""
        if self._slirp is None:
            return 0
        before = self.frames_in
        self._fds = []
        timeout = self.ffi.new("uint32_t *", 0xFFFFFFFF)
        self.lib.slirp_pollfds_fill(self._slirp, timeout, self._add_poll, self.ffi.NULL)
        revents: dict[int, int] = {}
        if self._fds:
            p = select.poll()
            for fd, ev in self._fds:
                p.register(fd, sum(pe for se, pe in _TO_POLL if ev & se))
            try:
                revents = dict(p.poll(0))
            except InterruptedError:
                revents = {}
        self._revents = [sum(se for se, pe in _TO_POLL if revents.get(fd, 0) & pe) for fd, _ in self._fds]
        self.lib.slirp_pollfds_poll(self._slirp, 0, self._get_revents, self.ffi.NULL)
        self._fire_timers()
        return self.frames_in - before

    def _fire_timers(self) -> None:
        now_ms = _host_ns() // 1_000_000
        for handle, t in list(self._timers.items()):
            if t[0] is None or t[0] > now_ms or self._slirp is None:
                continue
            t[0] = None
            if t[3] is not None:
                t[3](t[2])
            else:
                self.lib.slirp_handle_timer(self._slirp, t[1], t[2])

    def close(self) -> None:
        if getattr(self, "_slirp", None) is not None:
            self.lib.slirp_cleanup(self._slirp)
            self._slirp = None
        self._timers.clear()


def _host_ns() -> int:
    """libslirp's clock: host monotonic time (outside every machine; module doc)."""
    return time.monotonic_ns()


def _minus_one(*_args: Any) -> int:
    return -1


def _zero(*_args: Any) -> int:
    return 0


def _why_not_bound(fwd: Hostfwd) -> str:
    """Why libslirp could not listen (it only says -1): try the bind ourselves to name the cause."""
    kind = socket.SOCK_DGRAM if fwd.proto == "udp" else socket.SOCK_STREAM
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((fwd.host_addr or "0.0.0.0", fwd.host_port))
    except OSError as e:
        import errno

        if e.errno == errno.EADDRINUSE:
            return "the port is in use"
        if e.errno == errno.EADDRNOTAVAIL:
            return "no such address on this host"
        if e.errno == errno.EACCES:
            return "no permission for that port"
        return e.strerror or str(e)
    finally:
        s.close()
    return "libslirp refused it"
