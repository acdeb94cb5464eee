"""Network cards on the command line of `vmm run|record`, in QEMU's manner.

    --nic model=e1000|virtio,net=BACKEND[,mac=52:54:00:12:34:56][,pcap=FILE][,server=on][,hostfwd=RULE]
    -nic ..., -netdev ...      the same option

repeatable (card N is ``netN``).  BACKEND is one of

    switch:NAME        a port of the in-process learning switch NAME
    stream:HOST:PORT   frames over TCP, a 4-byte big-endian length before each (QEMU's
                       -netdev stream/socket); connects to HOST:PORT, or with server=on
                       listens there for the peer (another `vmm`, or QEMU)
    tap:IFNAME         a Linux TAP device (needs root or CAP_NET_ADMIN)
    user               user-mode networking (libslirp, as QEMU's -nic user): DHCP gives the
                       guest 10.0.2.15, 10.0.2.2 is the host, 10.0.2.3 its DNS, NAT to the
                       host's network without root; hostfwd=[tcp|udp]:[HOSTADDR]:HOSTPORT-
                       [GUESTADDR]:GUESTPORT (repeatable) forwards a host port to the guest

A leading word without '=' is the backend (``--nic stream:127.0.0.1:5555,model=virtio``);
``model`` defaults to e1000 and ``mac`` to 52:54:00:12:34:56 plus the card's index.
``pcap=FILE`` writes every frame the card sends and receives to FILE, stamped with
the guest's virtual time.  A recording logs every frame that enters the guest, so
`vmm replay` needs no network and no option for it.

A bad option, a port in use (hostfwd's too), a missing TAP device or libslirp: one line on
stderr, exit status 2.
"""
from __future__ import annotations

import argparse

KEYS = ("model", "net", "mac", "pcap", "server", "hostfwd")


def _usage(msg: str) -> Exception:
    from tools.cli import UsageError

    return UsageError(msg)


def add_nic_options(r: argparse.ArgumentParser) -> None:
    r.add_argument("--nic", "-nic", "-netdev", dest="nics", action="append", default=None,
                   metavar="model=e1000|virtio,net=switch:NAME|stream:HOST:PORT|tap:IFNAME|user[,hostfwd=tcp::HOSTPORT-:GUESTPORT][,mac=..][,pcap=FILE]",
                   help="add a network card (repeatable; see tools/cli_net.py); net=user is user-mode "
                        "networking (libslirp: DHCP 10.0.2.15, host 10.0.2.2, DNS 10.0.2.3, no root), "
                        "hostfwd (repeatable) forwards a host port to the guest")


def parse_nic(text: str) -> dict:
    """One --nic value as {"model", "net", "mac", "pcap", "server", "hostfwd"} (hostfwd: a list of
    host/net/user.py's rules); ValueError with one line."""
    out: dict = {"model": "e1000", "net": None, "mac": None, "pcap": None, "server": False, "hostfwd": []}
    seen = set()
    for i, item in enumerate(text.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            if i == 0 and item:
                key, value = "net", item
            else:
                raise ValueError(f"--nic {text!r}: {item!r} is not KEY=VALUE")
        if key not in KEYS:
            raise ValueError(f"--nic {text!r}: unknown key {key!r} (use {', '.join(KEYS)})")
        if key == "hostfwd":
            from host.net.user import parse_hostfwd

            out["hostfwd"].append(parse_hostfwd(value))
            continue
        if key in seen:
            raise ValueError(f"--nic {text!r}: {key} given twice")
        seen.add(key)
        if key == "model":
            if value not in ("e1000", "virtio", "virtio-net-pci", "virtio-net"):
                raise ValueError(f"--nic {text!r}: model must be e1000 or virtio, not {value!r}")
            value = "virtio" if value.startswith("virtio") else value
        elif key == "server":
            if value not in ("on", "off"):
                raise ValueError(f"--nic {text!r}: server must be on or off, not {value!r}")
            value = value == "on"
        elif not value:
            raise ValueError(f"--nic {text!r}: {key} needs a value")
        out[key] = value
    net = out["net"]
    if net is None:
        raise ValueError(f"--nic {text!r}: name a backend with net=switch:NAME, stream:HOST:PORT, tap:IFNAME or user")
    kind = net.partition(":")[0]
    if out["hostfwd"] and net != "user":
        raise ValueError(f"--nic {text!r}: hostfwd= goes with net=user")
    if net == "user":
        if out["server"]:
            raise ValueError(f"--nic {text!r}: server=on goes with net=stream:HOST:PORT")
        return out
    if kind not in ("switch", "stream", "tap") or not net.partition(":")[2]:
        raise ValueError(f"--nic {text!r}: net must be switch:NAME, stream:HOST:PORT, tap:IFNAME or user, not {net!r}")
    if out["server"] and kind != "stream":
        raise ValueError(f"--nic {text!r}: server=on goes with net=stream:HOST:PORT")
    return out


def requests_from_args(args) -> list[dict]:
    try:
        return [parse_nic(t) for t in getattr(args, "nics", None) or []]
    except ValueError as e:
        raise _usage(str(e)) from None


def nics_from_args(args) -> list[dict] | None:
    """The config's ``nics`` for the cards the arguments ask for (None if none); a usage error
    (one line) for a bad option."""
    from vmm.platform.net import NicError, describe_nics

    reqs = requests_from_args(args)
    if not reqs:
        return None
    try:
        return describe_nics([{"model": r["model"], "mac": r["mac"]} for r in reqs])
    except ValueError as e:
        raise _usage(f"--nic: {e}" if not isinstance(e, NicError) else str(e)) from None


def connect(m, args) -> None:
    """Join the machine's cards to the backends the arguments name, in order."""
    from vmm.platform.net import NicError, connect_backend

    reqs = requests_from_args(args)
    if not reqs:
        return
    hub = getattr(m, "net_input", None)
    ids = sorted(hub.ports) if hub is not None else []
    if len(ids) != len(reqs):
        raise _usage(f"--nic: the machine has {len(ids)} network cards, the options name {len(reqs)}")
    epoch = getattr(getattr(m, "config", None), "start_epoch", 0) or 0
    for nic_id, r in zip(ids, reqs):
        try:
            connect_backend(m, nic_id, r["net"], server=r["server"], pcap=r["pcap"], epoch=epoch,
                            hostfwd=r["hostfwd"])
        except NicError as e:
            raise _usage(str(e)) from None


def close(m) -> None:
    """Close the machine's backends and captures (a capture file is complete after this)."""
    from vmm.platform.net import close_backends

    close_backends(m)
