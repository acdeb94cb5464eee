"""Capture files in the libpcap format, with time stamps from virtual time.

The classic pcap format (the "pcap-savefile" description of libpcap, and
IETF draft-ietf-opsawg-pcap): a 24-byte file header, then per packet a
16-byte record header and the captured bytes.

* File header: magic A1B23C4Dh (the nanosecond-resolution variant, written
  in this host's little-endian order, which is how readers tell the byte
  order), version 2.4, time zone 0, accuracy 0, snapshot length, and the
  link type LINKTYPE_ETHERNET (1): frames from the destination address on,
  without FCS.
* Record: seconds and nanoseconds of the time stamp, the captured length
  (at most the snapshot length) and the frame's original length.

Time stamps are virtual: ``write(frame, ns)`` is given nanoseconds of a
machine's virtual time (plus ``epoch``, seconds added to every stamp, e.g.
the machine's RTC start time), so the same run, or its replay, writes the
same file byte for byte.  tshark, tcpdump and dpkt read it.

The writer owns its file: ``close()`` (or ``with``) flushes it; ``flush()``
makes what was written so far readable while the run goes on.
"""
from __future__ import annotations

import struct
from typing import IO, Any, Self

MAGIC_NS = 0xA1B23C4D
VERSION = (2, 4)
LINKTYPE_ETHERNET = 1
DEFAULT_SNAPLEN = 262144
_FILE = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")


class PcapWriter:
    """Append frames to a pcap file (module doc).  ``path`` is a file name or a binary stream."""

    def __init__(self, path: Any, snaplen: int = DEFAULT_SNAPLEN, epoch: int = 0) -> None:
        if snaplen < 1:
            raise ValueError("the snapshot length must be positive")
        self._own = not hasattr(path, "write")
        self.file: IO[bytes] = open(path, "wb") if self._own else path  # noqa: SIM115 (closed by close())
        self.snaplen = snaplen
        self.epoch = epoch
        self.packets = 0
        self.file.write(_FILE.pack(MAGIC_NS, VERSION[0], VERSION[1], 0, 0, snaplen, LINKTYPE_ETHERNET))

    def write(self, frame: bytes, ns: int) -> None:
        """One frame seen at ``ns`` nanoseconds of virtual time."""
        if self.file is None:
            return
        sec, nsec = divmod(max(0, int(ns)), 1_000_000_000)
        data = bytes(frame[:self.snaplen])
        self.file.write(_RECORD.pack((sec + self.epoch) & 0xFFFF_FFFF, nsec, len(data), len(frame)))
        self.file.write(data)
        self.packets += 1

    __call__ = write          # a capture callback: capture(frame, ns)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is None:
            return
        self.file.flush()
        if self._own:
            self.file.close()
        self.file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
