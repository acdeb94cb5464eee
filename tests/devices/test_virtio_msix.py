"""MSI-X on virtio-pci (devices/pci/msix.py and the vector registers of devices/virtio/pci.py):
the capability and table as Linux's pci_msix code and virtio_pci's vp_find_vqs_msix use them,
masking and the pending bits, the legacy header's vector fields, reset and saved state."""
from __future__ import annotations

import copy
import struct

import pytest

from devices.base import DeviceStateError
from devices.pci.function import COMMAND
from devices.virtio import blk as vb
from devices.pci.msix import BAR_SIZE, CTRL_ENABLE, CTRL_FUNCTION_MASK, PBA_OFF
from devices.virtio.queue import NO_VECTOR
from tests.devices.rigs_virtio import BAR0, make_blk

SETTLE = 10_000_000
BAR1 = 0xFEB1_0000
MSI_ADDR = 0xFEE0_0000


def msix_cap(fn) -> int:
    ptr = fn.config_read(0x34, 1)
    while ptr:
        if fn.config_read(ptr, 1) == 0x11:
            return ptr
        ptr = fn.config_read(ptr + 1, 1)
    raise AssertionError("no MSI-X capability")


class Rig:
    """A virtio-blk function with MSI-X, brought up as Linux does: MSI-X enabled under the
    function mask, the table programmed, vectors 0 (configuration) and 1 (queue 0) mapped."""

    def __init__(self, legacy: bool = False, enable: bool = True) -> None:
        self.sent: list[tuple[int, int]] = []
        self.b = make_blk(msi=lambda a, d: self.sent.append((a, d)))
        self.fn = self.b.fn
        self.drv = self.b.driver(legacy)
        self.fn.config_write(0x14, 4, BAR1)
        self.cap = msix_cap(self.fn)
        if enable:
            self.control(CTRL_ENABLE | CTRL_FUNCTION_MASK)
            for v in range(self.vectors):
                self.entry(v, MSI_ADDR, 0x40 + v, masked=False)
            self.control(CTRL_ENABLE)
        self.drv.init()

    @property
    def vectors(self) -> int:
        return (self.fn.config_read(self.cap + 2, 2) & 0x7FF) + 1

    def control(self, v: int) -> None:
        self.fn.config_write(self.cap + 2, 2, v)

    def entry(self, v: int, addr: int, data: int, masked: bool) -> None:
        base = BAR1 + 16 * v
        self.b.mmio.write(base, 4, addr & 0xFFFF_FFFF)
        self.b.mmio.write(base + 4, 4, addr >> 32)
        self.b.mmio.write(base + 8, 4, data)
        self.b.mmio.write(base + 12, 4, int(masked))

    def mask(self, v: int, masked: bool) -> None:
        self.b.mmio.write(BAR1 + 16 * v + 12, 4, int(masked))

    def pba(self) -> int:
        return self.b.mmio.read(BAR1 + PBA_OFF, 4)

    def map_vectors(self, config: int, queue: int) -> tuple[int, int]:
        d = self.drv
        if d.legacy:
            self.b.io.write(BAR0 + 0x14, 2, config)
            self.b.io.write(BAR0 + 0x0E, 2, 0)
            self.b.io.write(BAR0 + 0x16, 2, queue)
            return self.b.io.read(BAR0 + 0x14, 2), self.b.io.read(BAR0 + 0x16, 2)
        d.common_write(0x10, 2, config)
        d.common_write(0x16, 2, 0)
        d.common_write(0x1A, 2, queue)
        return d.common_read(0x10, 2), d.common_read(0x1A, 2)

    def flush(self) -> None:
        self.drv.blk_request(vb.T_FLUSH)
        self.b.clock.advance(SETTLE)


def test_capability_table_and_pba_layout():
    r = Rig(enable=False)
    fn = r.fn
    assert r.vectors == 2                                    # one queue plus the configuration vector
    assert fn.config_read(r.cap + 4, 4) == 0x000 | 1         # table at 0 of BAR1
    assert fn.config_read(r.cap + 8, 4) == PBA_OFF | 1       # PBA at 0x800 of BAR1
    fn.config_write(0x14, 4, 0xFFFF_FFFF)
    assert fn.config_read(0x14, 4) == (~(BAR_SIZE - 1)) & 0xFFFF_FFFF    # a 4 KiB memory BAR
    fn.config_write(0x14, 4, BAR1)
    # only Function Mask and MSI-X Enable are writable
    fn.config_write(r.cap + 2, 2, 0xFFFF)
    assert fn.config_read(r.cap + 2, 2) == CTRL_ENABLE | CTRL_FUNCTION_MASK | 1
    # at reset every vector is masked
    assert [r.b.mmio.read(BAR1 + 16 * v + 12, 4) for v in range(2)] == [1, 1]
    # without a message sink there is no MSI-X at all
    plain = make_blk().fn
    ptr, ids = plain.config_read(0x34, 1), []
    while ptr:
        ids.append(plain.config_read(ptr, 1))
        ptr = plain.config_read(ptr + 1, 1)
    assert 0x11 not in ids and plain.msix is None


def test_queue_vector_sends_the_message_and_leaves_isr_and_intx_alone():
    r = Rig()
    assert r.map_vectors(0, 1) == (0, 1)
    r.flush()
    assert len(r.drv.used(0)) == 1
    assert r.sent == [(MSI_ADDR, 0x41)]
    assert r.fn.isr == 0 and not r.fn.intx.level and not r.fn.config_read(0x06, 2) & 0x08


def test_a_vector_outside_the_table_reads_back_no_vector_and_signals_nothing():
    r = Rig()
    assert r.map_vectors(2, 7) == (NO_VECTOR, NO_VECTOR)
    r.flush()
    assert len(r.drv.used(0)) == 1 and r.sent == [] and r.fn.isr == 0 and not r.fn.intx.level
    r.fn.config_changed()
    assert r.sent == []


def test_configuration_change_uses_the_configuration_vector():
    r = Rig()
    r.map_vectors(0, 1)
    r.fn.config_changed()
    assert r.sent == [(MSI_ADDR, 0x40)] and r.fn.isr == 0


def test_masked_vector_is_pending_until_unmasked():
    r = Rig()
    r.map_vectors(0, 1)
    r.mask(1, True)
    r.flush()
    r.flush()
    assert r.sent == [] and r.pba() == 0b10                  # one pending bit, however many events
    r.mask(1, False)
    assert r.sent == [(MSI_ADDR, 0x41)] and r.pba() == 0
    r.mask(1, True)
    r.mask(1, False)
    assert len(r.sent) == 1                                  # nothing was pending


def test_function_mask_holds_every_vector():
    r = Rig()
    r.map_vectors(0, 1)
    r.control(CTRL_ENABLE | CTRL_FUNCTION_MASK)
    r.flush()
    r.fn.config_changed()
    assert r.sent == [] and r.pba() == 0b11
    r.control(CTRL_ENABLE)
    assert r.sent == [(MSI_ADDR, 0x40), (MSI_ADDR, 0x41)] and r.pba() == 0


def test_the_pba_and_reserved_bits_are_read_only():
    r = Rig()
    r.map_vectors(0, 1)
    r.mask(1, True)
    r.flush()
    r.b.mmio.write(BAR1 + PBA_OFF, 4, 0)
    assert r.pba() == 0b10
    r.b.mmio.write(BAR1 + 16 + 12, 4, 0xFFFF_FFFF)
    assert r.b.mmio.read(BAR1 + 16 + 12, 4) == 1
    r.b.mmio.write(BAR1 + 16, 4, MSI_ADDR | 3)
    assert r.b.mmio.read(BAR1 + 16, 4) == MSI_ADDR           # the address is dword aligned


def test_bus_mastering_off_drops_the_message():
    r = Rig()
    r.map_vectors(0, 1)
    r.fn.config_changed()
    r.fn.config_write(COMMAND, 2, r.fn.command & ~4)
    r.fn.config_changed()
    assert r.sent == [(MSI_ADDR, 0x40)] and r.pba() == 0


def test_msix_disabled_means_isr_and_intx():
    r = Rig(enable=False)
    assert r.map_vectors(0, 1) == (0, 1)                     # mappings are kept for when it is on
    r.flush()
    assert r.sent == [] and r.fn.isr == 1 and r.fn.intx.level
    r.control(CTRL_ENABLE)                                   # turning MSI-X on deasserts INTx
    assert not r.fn.intx.level


def test_legacy_header_grows_by_the_vectors_while_msix_is_enabled():
    r = Rig(legacy=True)
    assert r.map_vectors(0, 1) == (0, 1)
    capacity = r.fn.device.capacity
    assert r.b.io.read(BAR0 + 0x18, 4) == capacity & 0xFFFF_FFFF     # device configuration at 24
    r.flush()
    assert r.sent == [(MSI_ADDR, 0x41)]
    r.control(0)
    assert r.b.io.read(BAR0 + 0x14, 4) == capacity & 0xFFFF_FFFF     # and at 20 without MSI-X


def test_device_reset_unmaps_the_vectors_and_pci_reset_masks_the_table():
    r = Rig()
    r.map_vectors(0, 1)
    r.drv.set_status(0)
    assert r.drv.common_read(0x10, 2) == NO_VECTOR
    r.drv.common_write(0x16, 2, 0)
    assert r.drv.common_read(0x1A, 2) == NO_VECTOR
    r.fn.reset()
    assert r.fn.config_read(r.cap + 2, 2) == 1 and r.fn.config_read(0x14, 4) == 0   # BAR1 off the bus too
    assert [r.fn.msix.mmio_read(16 * v + 12, 4) for v in range(2)] == [1, 1]
    assert r.fn.msix.mmio_read(16, 4) == 0


def test_state_round_trip_and_bad_states():
    r = Rig()
    r.map_vectors(0, 1)
    r.mask(1, True)
    r.flush()
    st = r.fn.save_state()
    assert st["msix"]["pending"] == 0b10 and st["queue_vectors"] == [1] and st["config_vector"] == 0
    other = Rig(enable=False)
    other.fn.load_state(copy.deepcopy(st))
    other.sent.clear()
    assert other.fn.save_state() == st
    other.mask(1, False)
    assert other.sent == [(MSI_ADDR, 0x41)]
    for key, value, why in (("queue_vectors", [2], "outside the table"),
                            ("config_vector", 5, "outside the table"),
                            ("msix", {"table": b"\0" * 31, "pending": 0}, "32 bytes"),
                            ("msix", {"table": st["msix"]["table"], "pending": 4}, "2 bits"),
                            ("msix", {"table": b"\0" * 12 + b"\x02" + b"\0" * 19, "pending": 0}, "reserved")):
        bad = copy.deepcopy(st)
        bad[key] = value
        before = other.fn.save_state()
        with pytest.raises(DeviceStateError, match=why):
            other.fn.load_state(bad)
        assert other.fn.save_state() == before
    plain = make_blk().fn
    bad = copy.deepcopy(st)
    with pytest.raises(DeviceStateError):
        plain.load_state(bad)


def test_pc_board_wires_msix_to_the_local_apic():
    from vmm.platform.pc import PcConfig, PcMachine
    from vmm.platform.virtio import attach_virtio_blk
    from tests.devices.rigs_virtio import MemDisk

    m = PcMachine(PcConfig(mem_size=16 << 20))
    try:
        fn = attach_virtio_blk(m, MemDisk(), 4)
        assert fn.msix is not None and fn.msix.vectors == 2
        cfg = 0x8000_0000 | 4 << 11
        for off, size, val in ((0x14, 4, BAR1), (0x04, 2, 0x0006)):
            m.io.write(0xCF8, 4, cfg | off)
            m.io.write(0xCFC + (off & 3), size, val)
        m.mmio.write(0xFEE0_00F0, 4, 0x1FF)                 # the local APIC's SVR: software enabled
        m.mmio.write(BAR1, 4, MSI_ADDR)
        m.mmio.write(BAR1 + 8, 4, 0x51)
        m.mmio.write(BAR1 + 12, 4, 0)
        cap = msix_cap(fn)
        fn.config_write(cap + 2, 2, CTRL_ENABLE)
        fn.config_vector = 0
        fn.device_status |= 4
        fn.config_changed()
        assert fn.msix.sent == 1 and m.lapics[0].irr >> 0x51 & 1
    finally:
        m.close()
