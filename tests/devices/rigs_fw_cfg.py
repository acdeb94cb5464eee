"""Conformance rig for QEMU's fw_cfg (devices/fw_cfg.py), loaded by tests/devices/test_conformance.py.

Guest memory is a small fake RAM that is also a peer (saved and restored
with the device), so DMA results are part of what a restored rig must
reproduce.  Host operations play the guest's side of a DMA: they put a
FWCfgDmaAccess in RAM and write its address to 0x518, then log the control
word written back and a digest of the buffer.
"""
from __future__ import annotations

import hashlib
import struct
import sys

from devices.base import DeviceStateError, DmaError, check_state
from devices.clock import VirtualClock
from devices import fw_cfg as fc
from devices.fw_cfg import FwCfg

RAM = 0x3000
DESC = 0x100
BUF = 0x1000


class FakeRam:
    """Guest RAM at 0..size behind the ``Dma`` protocol (anything else raises DmaError before a
    byte moves), with a state of its own so a rig can save it as a peer."""

    kind = "fake_ram"

    def __init__(self, size: int = RAM) -> None:
        self.mem = bytearray(size)

    def _check(self, gpa: int, n: int) -> None:
        if gpa < 0 or n < 0 or gpa + n > len(self.mem):
            raise DmaError(gpa, n, "outside the fake RAM")

    def read(self, gpa: int, n: int) -> bytes:
        self._check(gpa, n)
        return bytes(self.mem[gpa:gpa + n])

    def write(self, gpa: int, data: bytes) -> None:
        self._check(gpa, len(data))
        self.mem[gpa:gpa + len(data)] = data

    def read_u32(self, gpa: int) -> int:
        return struct.unpack("<I", self.read(gpa, 4))[0]

    def write_u32(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<I", v))

    def save_state(self) -> dict:
        return {"kind": self.kind, "version": 1, "mem": bytes(self.mem)}

    def load_state(self, state: dict) -> None:
        check_state(state, self.kind, 1)
        mem = state.get("mem")
        if not isinstance(mem, bytes) or len(mem) != len(self.mem):
            raise DeviceStateError("fake_ram: mem must be the RAM's bytes")
        self.mem[:] = mem


CONTROLS = [fc.DMA_CTL_READ, fc.DMA_CTL_SKIP, fc.DMA_CTL_WRITE, fc.DMA_CTL_SELECT | fc.DMA_CTL_READ,
            fc.DMA_CTL_SELECT | fc.DMA_CTL_WRITE, fc.DMA_CTL_SELECT | fc.DMA_CTL_SKIP, 0]
KEYS = [0x00, 0x01, 0x05, 0x19, 0x20, 0x21, 0x22, 0x3F, 0x40, 0x8002]


def _suite_rig(clock: VirtualClock):
    """A Rig of the conformance module loading this file (pytest imports it under its file
    name, and it imports the rigs half-initialised, so it is looked up, not imported)."""
    suite = [m for m in list(sys.modules.values()) if hasattr(m, "Rig") and hasattr(m, "_extra_rigs")]
    if not suite:
        import tests.devices.test_conformance as conformance
        suite = [conformance]
    return suite[0].Rig(clock, None)


def rig_fw_cfg(clock: VirtualClock):
    ram = FakeRam()
    r = _suite_rig(clock)
    items = fc.qemu_x86_items(ram_size=64 << 20, cpus=2, hpet_block_id=0x8086A201)
    files = fc.qemu_x86_files(e820=[(0, 0x9FC00, 1), (0x100000, 0x3F00000, 1)],
                              extra={"opt/org.example/rw": bytes(range(24))})
    r.dev = FwCfg(items, files, ram, writable=["opt/org.example/rw"], on_write=r.record("written"))
    r.peers = [ram]

    def run_dma(n: int, b: int, desc: int = DESC) -> None:
        control = CONTROLS[n % len(CONTROLS)] | (KEYS[b % len(KEYS)] << 16)
        address = BUF if b & 0x80 == 0 else RAM - 8   # sometimes running off the end of RAM
        access = struct.pack(">IIQ", control, (b * 7) % 700, address)[:RAM - desc]
        ram.mem[desc:desc + len(access)] = access
        r.dev.io_write(0x518, 4, int.from_bytes(desc.to_bytes(4, "big"), "little"))
        status = ram.mem[desc:desc + 4].hex()
        r.log.append((clock.now(), "dma", status, hashlib.sha256(ram.mem[BUF:]).hexdigest()[:16]))

    r.host_ops = {
        "dma": run_dma,
        "dma_edge": lambda n, b: run_dma(n, b, RAM - 4),   # a descriptor half outside RAM
        "poke": lambda n, b: ram.mem.__setitem__(BUF + n * 16, b),
    }
    return r


RIGS = {"fw_cfg": rig_fw_cfg}
CLASS_OF = {"fw_cfg": FwCfg}
