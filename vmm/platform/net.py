"""The pc-2 board's network cards: NICs described as plain data, attached, and wired to backends.

A NIC is described by a dict (the ``nics`` list of a machine config, so a
recording's or a snapshot's header names them and a replay builds the same
cards)::

    {"id": "net0", "model": "e1000" | "virtio", "mac": "52:54:00:12:34:56", "slot": 3}

The id names the card everywhere a recording does: the device (its state),
its frames in the log (devices/net/port.py's payload) and its output digest
``net:<id>``.  Card N is ``netN`` at PCI slot ``NIC_SLOTS[N]`` (3 first, as
QEMU puts its first NIC, then 12...; virtio disks use 4-11) with MAC
``52:54:00:12:34:56`` + N unless given.

Backends are not machine state: they are outside the determinism boundary,
so a config never names them and a replay runs with none (every frame that
entered the machine comes from the log).  ``connect_backend`` joins a card
to one, live or recording:

* ``switch:NAME``: a port of the in-process learning switch NAME (one per
  name per process: cards of several machines in one process meet there);
* ``stream:HOST:PORT``: frames over TCP with a 4-byte big-endian length, as
  QEMU's ``-netdev stream``; ``server=True`` listens there for one peer;
* ``tap:IFNAME``: a Linux TAP device;
* ``user``: user-mode networking through libslirp (host/net/user.py), with
  ``hostfwd`` rules forwarding host ports to the guest.

and optionally writes everything the card sends and receives to a pcap file,
stamped with virtual time from the machine's RTC epoch.
"""
from __future__ import annotations

import re
import time
from typing import Any

from devices.net import format_mac, parse_mac
from devices.net.port import NicPort, attach_e1000, nic_port

MODELS = ("e1000", "virtio")
NIC_SLOTS = (3, 12, 13, 14, 15, 16, 17, 18)
DEFAULT_MAC = bytes.fromhex("525400123456")
IDLE_SLEEP = 0.001          # host seconds a poll that found nothing sleeps while the guest is halted
PLATFORM_TSO = "pc-4"       # the first machine type whose virtio-net segments and batches
TX_BATCH_TICKS = 100_000    # 1 ms: a transmit within this of the last one waits for the batch
_ID = re.compile(r"net[0-9]")

_switches: dict[str, Any] = {}


class NicError(ValueError):
    """A NIC or backend that cannot be set up; one line naming it."""


def describe_nics(requests: list[dict]) -> list[dict]:
    """Config dicts for cards asked for as {"model": ..., "mac": ... or None}, in order."""
    if len(requests) > len(NIC_SLOTS):
        raise NicError(f"at most {len(NIC_SLOTS)} network cards")
    out = []
    seen: set[bytes] = set()
    for i, r in enumerate(requests):
        if r.get("model", "e1000") not in MODELS:
            raise NicError(f"unknown NIC model {r.get('model')!r} (choose {' or '.join(MODELS)})")
        mac = parse_mac(r["mac"]) if r.get("mac") else (int.from_bytes(DEFAULT_MAC, "big") + i).to_bytes(6, "big")
        if mac[0] & 1:
            raise NicError(f"mac={format_mac(mac)} is a group (multicast) address, not a card's")
        if mac in seen:
            raise NicError(f"two network cards with mac={format_mac(mac)}")
        seen.add(mac)
        out.append({"id": f"net{i}", "model": r.get("model", "e1000"), "mac": format_mac(mac), "slot": NIC_SLOTS[i]})
    return out


def check_nics(nics: Any) -> None:
    """A config's ``nics`` list checked completely (NicError with one line otherwise)."""
    if not isinstance(nics, list) or len(nics) > len(NIC_SLOTS):
        raise NicError(f"nics must be a list of at most {len(NIC_SLOTS)} cards")
    ids, slots = set(), set()
    for n in nics:
        if not (isinstance(n, dict) and set(n) == {"id", "model", "mac", "slot"} and isinstance(n["id"], str)
                and _ID.fullmatch(n["id"]) and n["model"] in MODELS and isinstance(n["mac"], str)
                and isinstance(n["slot"], int) and not isinstance(n["slot"], bool) and n["slot"] in NIC_SLOTS):
            raise NicError(f"a malformed network card: {n!r}"[:200])
        try:
            parse_mac(n["mac"])
        except ValueError as e:
            raise NicError(str(e)) from None
        if n["id"] in ids or n["slot"] in slots:
            raise NicError(f"two network cards named {n['id']} or at slot {n['slot']}")
        ids.add(n["id"])
        slots.add(n["slot"])


def attach_virtio_net(machine: Any, wire: Any, mac: bytes | str, slot: int, *, name: str | None = None,
                      capture: Any = None) -> Any:
    """A virtio-net card at PCI ``slot`` on ``wire``; returns the ``VirtioNet`` device (its
    ``transport`` is the PCI function).  Ids as ``attach_e1000``'s."""
    from devices.virtio.net import VirtioNet
    from vmm.platform.virtio import attach_virtio

    nic_id = name or f"virtio-net.{slot}"
    mac = parse_mac(mac)
    port = nic_port(machine, nic_id, wire, capture)
    from vmm.platform.pc import since

    offload = since(getattr(machine, "platform", PLATFORM_TSO), PLATFORM_TSO)
    dev = VirtioNet(port, mac, name=nic_id, tso=offload, tx_batch=TX_BATCH_TICKS if offload else 0)
    port.nic = dev
    dev.on_rx_ready = port.hub.rx_ready
    attach_virtio(machine, dev, slot)
    return dev


def attach_nics(machine: Any, nics: list[dict]) -> dict[str, NicPort]:
    """Attach the cards a config describes, without backends; returns their ports by id."""
    check_nics(nics)
    ports = {}
    for n in nics:
        attach = attach_e1000 if n["model"] == "e1000" else attach_virtio_net
        attach(machine, None, n["mac"], n["slot"], name=n["id"])
        ports[n["id"]] = machine.net_input.ports[n["id"]]
    return ports


def switch(name: str) -> Any:
    """The in-process switch ``name`` (made on first use)."""
    from host.net.switch import Switch

    sw = _switches.get(name)
    if sw is None:
        sw = _switches[name] = Switch(name)
    return sw


def open_backend(spec: str, *, server: bool = False, label: str = "", hostfwd: tuple | list = ()) -> Any:
    """The wire a backend spec names (``switch:NAME``, ``stream:HOST:PORT``, ``tap:IFNAME``,
    ``user``; ``hostfwd``: host/net/user.py's rules, or their QEMU spelling, for ``user``)."""
    from host.net import NetBackendError
    from host.net.stream import StreamLink
    from host.net.tap import TapLink

    kind, _, rest = spec.partition(":")
    if hostfwd and spec != "user":
        raise NicError(f"{label}hostfwd= goes with net=user")
    try:
        if spec == "user":
            from host.net.user import Hostfwd, UserNet, parse_hostfwd

            try:
                rules = [r if isinstance(r, Hostfwd) else parse_hostfwd(r) for r in hostfwd]
            except ValueError as e:
                raise NicError(f"{label}{e}") from None
            return UserNet(rules)
        if kind == "switch":
            if not rest:
                raise NicError(f"{label}net=switch:NAME needs a switch name")
            return switch(rest).port()
        if kind == "stream":
            host, _, port = rest.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise NicError(f"{label}net=stream:HOST:PORT needs a host and a port 1-65535, not {rest!r}")
            host = host.strip("[]")
            return StreamLink.listen(host, int(port)) if server else StreamLink.connect_to(host, int(port))
        if kind == "tap":
            return TapLink(rest)
    except NetBackendError as e:
        raise NicError(f"{label}{e}") from None
    raise NicError(f"{label}unknown network backend {spec!r} (switch:NAME, stream:HOST:PORT, tap:IFNAME or user)")


def connect_backend(machine: Any, nic_id: str, spec: str | None, *, server: bool = False,
                    pcap: str | None = None, epoch: int = 0, hostfwd: tuple | list = ()) -> Any:
    """Join card ``nic_id`` of ``machine`` to the backend ``spec`` (None: no wire) and, with
    ``pcap``, capture its frames there.  Returns the wire."""
    port = machine.net_input.ports[nic_id]
    wire = open_backend(spec, server=server, label=f"{nic_id}: ", hostfwd=hostfwd) if spec else None
    if wire is not None:
        port.wire = wire
        wire.connect(port)
        if not spec.startswith("switch:"):
            _pace_when_idle(machine)
        close = getattr(wire, "close", None)
        if callable(close):
            _closers(machine).append(close)
    if pcap:
        from host.net.pcap import PcapWriter

        try:
            writer = PcapWriter(pcap, epoch=epoch)
        except OSError as e:
            raise NicError(f"{nic_id}: cannot write the capture {pcap}: {e.strerror}") from None
        port.capture = writer
        _closers(machine).append(writer.close)
    return wire


def _pace_when_idle(machine: Any) -> None:
    """A machine talking to the host sleeps a little at polls that found nothing while its
    guest is halted, so virtual time does not race ahead of a peer in real time.  Host-side
    only: when polls happen and what they answer depend on virtual time and the boundary."""
    def idle() -> None:
        if getattr(machine, "halted", False):
            time.sleep(IDLE_SLEEP)
    machine.net_input.idle_hook = idle


def _closers(machine: Any) -> list:
    closers = getattr(machine, "net_closers", None)
    if closers is None:
        closers = machine.net_closers = []
    return closers


def close_backends(machine: Any) -> None:
    """Close every backend and capture ``connect_backend`` opened for ``machine`` (once)."""
    for close in getattr(machine, "net_closers", ()):
        try:
            close()
        except OSError:
            pass
    machine.net_closers = []
