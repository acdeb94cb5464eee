"""The networks outside every machine: all of it is outside the determinism boundary.

* ``switch``: a learning Ethernet switch (``Switch``) whose ports are the
  wires of NICs in this process, stream links to other processes and TAP
  devices.
* ``stream``: frames over a TCP stream, each after a 4-byte big-endian length
  (QEMU's ``-netdev stream`` / ``-netdev socket`` framing).
* ``tap``: a Linux TAP device through /dev/net/tun.
* ``user``: user-mode networking through libslirp (QEMU's ``-nic user``):
  DHCP, DNS forwarding, NAT to host sockets and forwarded host ports.
* ``pcap``: a libpcap capture file writer (LINKTYPE_ETHERNET, nanosecond
  time stamps taken from virtual time).

A wire here is what devices/net/__init__.py describes: ``send(frame)``,
``connect(receiver)``, and ``poll()`` to pull frames that wait in the host.
Frames reach a machine only through its ``NetInput`` and its boundary
(devices/net/port.py), so nothing here can make a run diverge from its
recording.  Host failures end in ``NetBackendError`` with one line that
names the problem.
"""
from __future__ import annotations


class NetBackendError(OSError):
    """A network backend that cannot be set up or goes wrong (one line for the user)."""
