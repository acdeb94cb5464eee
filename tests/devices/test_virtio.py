"""virtio over PCI and virtio-blk (devices/virtio): the transport as Linux's virtio_pci finds
and drives it, split virtqueues well formed and hostile, and block requests against a
bytearray model of the disk.  The guest side is tests/devices/rigs_virtio.py's ``Driver``."""
from __future__ import annotations

import copy
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.base import DeviceStateError
from devices.clock import VirtualClock
from devices.pci.function import CMD_INTX_DISABLE, COMMAND
from devices.virtio import blk as vb
from devices.virtio.device import (
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    FEATURES_OK,
    NEEDS_RESET,
    bit,
)
from devices.virtio.pci import MODERN_BAR_SIZE
from devices.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, SplitQueue, VirtqError
from tests.devices.rigs_virtio import BAR0, Driver, MemDisk, Ram, make_blk

SETTLE = 10_000_000          # clock ticks after which every request has completed


def up(legacy: bool = False, accept: int = ~0, **kw):
    b = make_blk(**kw)
    drv = b.driver(legacy)
    drv.init(accept)
    return b.fn, drv, b.disk, b.clock


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# ---------------------------------------------------------------------------------------------
# identity and capabilities

def test_transitional_identity_and_bars():
    b = make_blk()
    fn = b.fn
    assert fn.config_read(0x00, 2) == 0x1AF4 and fn.config_read(0x02, 2) == 0x1001
    assert fn.config_read(0x08, 1) == 0                     # transitional: revision 0 (4.1.2.3)
    assert fn.config_read(0x2C, 2) == 0x1AF4 and fn.config_read(0x2E, 2) == 2   # subsystem id = device type
    assert fn.config_read(0x09, 3) == 0x010000 and fn.config_read(0x3D, 1) == 1
    assert fn.config_read(0x06, 2) & 0x10                    # capabilities list
    # BAR sizing (write all ones, read back): BAR0 I/O, BAR4 32-bit memory of 4 KiB
    fn.config_write(0x10, 4, 0xFFFF_FFFF)
    assert fn.config_read(0x10, 4) == (~(fn.legacy_size - 1) & 0xFFFF_FFFF) | 1
    fn.config_write(0x20, 4, 0xFFFF_FFFF)
    assert fn.config_read(0x20, 4) == ~(MODERN_BAR_SIZE - 1) & 0xFFFF_FFFF
    assert 0x14 + len(fn.device.config()) <= fn.legacy_size <= 256


def test_modern_only_identity():
    fn = make_blk(transitional=False).fn
    assert fn.config_read(0x02, 2) == 0x1042 and fn.config_read(0x08, 1) == 1
    assert fn.config_read(0x2E, 2) >= 0x40
    assert fn.bars[0] is None


def test_capabilities_found_by_walking_the_list():
    b = make_blk()
    fn, ram, io, mmio = b.fn, b.ram, b.io, b.mmio
    drv = Driver(fn, io, mmio, ram)
    caps = drv.caps
    assert set(caps) == {1, 2, 3, 4, 5}                     # common, notify, ISR, device, PCI cfg
    for t, c in caps.items():
        assert c["bar"] == 4
        assert c["cap_len"] == (20 if t in (2, 5) else 16)
        assert c["offset"] % 4 == 0
        if t != 5:
            assert c["offset"] + c["length"] <= MODERN_BAR_SIZE
    assert caps[1]["length"] >= 0x38                         # Linux maps sizeof(virtio_pci_common_cfg)
    assert caps[2]["mult"] == 4 and caps[2]["length"] >= 2
    assert caps[4]["length"] >= len(fn.device.config())
    # Linux maps the notify region whole when it fits in a page with its offset
    assert caps[2]["length"] + caps[2]["offset"] % 4096 <= 4096


# ---------------------------------------------------------------------------------------------
# feature negotiation and the status machine

def test_feature_negotiation():
    b = make_blk()
    fn, ram, io, mmio = b.fn, b.ram, b.io, b.mmio
    drv = Driver(fn, io, mmio, ram)
    drv.set_status(0)
    drv.set_status(ACKNOWLEDGE | DRIVER)
    offered = drv.device_features()
    for b in (F_VERSION_1, F_INDIRECT_DESC, F_EVENT_IDX, vb.F_SEG_MAX, vb.F_SIZE_MAX, vb.F_BLK_SIZE, vb.F_FLUSH,
              vb.F_DISCARD, vb.F_WRITE_ZEROES):
        assert offered & bit(b), b
    assert not offered & bit(vb.F_RO) and not offered & bit(27)   # ANY_LAYOUT is legacy-only
    drv.common_write(0x00, 4, 2)
    assert drv.common_read(0x04, 4) == 0                   # no feature above 63
    # the driver accepts some, plus bits never offered: those do not stick
    drv.write_features(bit(F_VERSION_1) | bit(vb.F_FLUSH) | bit(3) | bit(40))
    drv.common_write(0x08, 4, 0)
    assert drv.common_read(0x0C, 4) == bit(vb.F_FLUSH)
    drv.common_write(0x08, 4, 1)
    assert drv.common_read(0x0C, 4) == 1
    drv.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
    assert drv.status() == ACKNOWLEDGE | DRIVER | FEATURES_OK
    # once FEATURES_OK is set, feature writes are ignored
    drv.write_features(bit(F_VERSION_1) | bit(F_EVENT_IDX))
    assert fn.driver_features == bit(F_VERSION_1) | bit(vb.F_FLUSH)


def test_features_ok_refused_without_version_1():
    b = make_blk()
    fn, ram, io, mmio = b.fn, b.ram, b.io, b.mmio
    drv = Driver(fn, io, mmio, ram)
    drv.set_status(ACKNOWLEDGE | DRIVER)
    drv.write_features(bit(vb.F_FLUSH))
    drv.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
    assert drv.status() == ACKNOWLEDGE | DRIVER          # 2.2.2: the device fails to set FEATURES_OK


def test_reset_reads_zero_and_clears_everything():
    fn, drv, _, clock = up()
    drv.blk_request(vb.T_IN, 0, 512)
    clock.advance(SETTLE)
    assert fn.isr and fn.intx.level
    drv.set_status(0)
    assert drv.status() == 0 and fn.isr == 0 and not fn.intx.level
    assert fn.driver_features == 0
    drv.common_write(0x16, 2, 0)
    assert drv.common_read(0x1C, 2) == 0 and drv.common_read(0x18, 2) == 256
    assert fn.queues[0].last_avail == 0 and fn.queues[0].used_idx == 0


def test_queue_configuration_registers():
    b = make_blk()
    fn, ram, io, mmio = b.fn, b.ram, b.io, b.mmio
    drv = Driver(fn, io, mmio, ram)
    assert drv.common_read(0x12, 2) == 1                   # num_queues
    drv.common_write(0x16, 2, 0)
    assert drv.common_read(0x18, 2) == 256
    for bad in (0, 3, 100, 512, 0xFFFF):
        drv.common_write(0x18, 2, bad)
        assert drv.common_read(0x18, 2) == 256               # 0 or a power of two only
    drv.common_write(0x18, 2, 64)
    assert drv.common_read(0x18, 2) == 64
    assert drv.common_read(0x1E, 2) == 0                   # queue_notify_off
    assert drv.common_read(0x1A, 2) == 0xFFFF and drv.common_read(0x10, 2) == 0xFFFF   # no MSI-X
    drv.common_write(0x1A, 2, 3)
    assert drv.common_read(0x1A, 2) == 0xFFFF
    drv.common_write(0x20, 4, 0x1234_5000)
    drv.common_write(0x24, 4, 0x1)
    assert drv.common_read(0x20, 4) == 0x1234_5000 and drv.common_read(0x24, 4) == 1
    drv.common_write(0x1C, 2, 1)
    assert drv.common_read(0x1C, 2) == 1
    drv.common_write(0x18, 2, 32)                          # ignored once enabled
    drv.common_write(0x20, 4, 0)
    assert drv.common_read(0x18, 2) == 64 and drv.common_read(0x20, 4) == 0x1234_5000
    drv.common_write(0x16, 2, 5)                           # a queue that does not exist
    assert drv.common_read(0x18, 2) == 0 and drv.common_read(0x1C, 2) == 0
    assert drv.common_read(0x16, 2) == 5
    # a dword read of device_status/config_generation/queue_select sees each field
    drv.common_write(0x16, 2, 0)
    drv.set_status(ACKNOWLEDGE)
    assert drv.common_read(0x14, 4) == ACKNOWLEDGE | (0 << 8) | (0 << 16)


def test_nothing_is_consumed_before_driver_ok():
    b = make_blk()
    fn, ram, disk, clock, io, mmio = b.fn, b.ram, b.disk, b.clock, b.io, b.mmio
    drv = Driver(fn, io, mmio, ram)
    drv.init(driver_ok=False)
    disk.data[:512] = pattern(512)
    _, buf, status = drv.blk_request(vb.T_IN, 0, 512)
    clock.advance(SETTLE)
    assert drv.used(0) == [] and ram.mem[status] == 0xEE
    drv.set_status(drv.status() | DRIVER_OK)               # buffers made available earlier are taken now
    clock.advance(SETTLE)
    assert drv.used(0) == [(0, 513)] and ram.mem[buf:buf + 512] == pattern(512)


def test_bus_mastering_off_drops_notifications():
    fn, drv, _, clock = up()
    fn.config_write(COMMAND, 2, fn.command & ~4)
    drv.blk_request(vb.T_FLUSH)
    clock.advance(SETTLE)
    assert drv.used(0) == []
    fn.config_write(COMMAND, 2, fn.command | 4)
    drv.kick(0)
    clock.advance(SETTLE)
    assert len(drv.used(0)) == 1


# ---------------------------------------------------------------------------------------------
# interrupts

def test_isr_is_read_to_clear_and_drives_intx():
    fn, drv, _, clock = up(accept=~bit(F_EVENT_IDX))
    drv.blk_request(vb.T_FLUSH)
    assert not fn.intx.level
    clock.advance(SETTLE)
    assert fn.intx.level and fn.config_read(0x06, 2) & 0x08
    assert drv.isr() == 1
    assert not fn.intx.level and drv.isr() == 0 and not fn.config_read(0x06, 2) & 0x08
    fn.config_write(COMMAND, 2, fn.command | CMD_INTX_DISABLE)
    drv.blk_request(vb.T_FLUSH)
    clock.advance(SETTLE)
    assert fn.isr == 1 and not fn.intx.level               # masked by the command register
    fn.config_write(COMMAND, 2, fn.command & ~CMD_INTX_DISABLE)
    assert fn.intx.level


def test_avail_flags_suppress_interrupts_without_event_idx():
    fn, drv, _, clock = up(accept=~bit(F_EVENT_IDX))
    q = drv.queues[0]
    struct.pack_into("<H", drv.ram.mem, q["avail"], 1)     # VRING_AVAIL_F_NO_INTERRUPT
    drv.blk_request(vb.T_FLUSH)
    clock.advance(SETTLE)
    assert len(drv.used(0)) == 1 and fn.isr == 0
    struct.pack_into("<H", drv.ram.mem, q["avail"], 0)
    drv.blk_request(vb.T_FLUSH)
    clock.advance(SETTLE)
    assert fn.isr == 1


def test_event_idx_used_event_and_avail_event():
    fn, drv, _, clock = up()
    assert drv.features & bit(F_EVENT_IDX)
    q = drv.queues[0]
    mem = drv.ram.mem
    used_event = q["avail"] + 4 + 2 * q["size"]
    avail_event = q["used"] + 4 + 8 * q["size"]
    drv.blk_request(vb.T_FLUSH)
    assert struct.unpack_from("<H", mem, avail_event)[0] == 1    # the device wants the next kick at 1
    clock.advance(SETTLE)
    assert drv.isr() == 1                                   # the first used buffer is always signalled
    struct.pack_into("<H", mem, used_event, 2)             # then: when the entry at index 2 is used
    drv.blk_request(vb.T_FLUSH)
    clock.advance(SETTLE)
    assert len(drv.used(0)) == 2 and fn.isr == 0           # used idx 1 -> 2: entry 2 not written yet
    drv.blk_request(vb.T_FLUSH)
    clock.advance(SETTLE)
    assert len(drv.used(0)) == 1 and fn.isr == 1           # used idx 2 -> 3


# ---------------------------------------------------------------------------------------------
# virtio-blk requests against a bytearray model

@pytest.mark.parametrize("timed", [True, False], ids=["timed", "immediate"])
@pytest.mark.parametrize("legacy", [False, True], ids=["modern", "legacy"])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_blk_read_write_flush_get_id(legacy, indirect, timed):
    fn, drv, disk, clock = up(legacy=legacy, serial="disk-serial-01", timed=timed)
    model = bytearray(disk.size)
    disk.data[:] = model[:] = pattern(disk.size, 3)
    # write two sectors at 5, read them and the neighbours back
    payload = pattern(1024, 99)
    h1, _, st1 = drv.blk_request(vb.T_OUT, 5, payload, indirect=indirect)
    model[5 * 512:7 * 512] = payload
    h2, _, st2 = drv.blk_request(vb.T_FLUSH, indirect=indirect)
    h3, buf3, st3 = drv.blk_request(vb.T_IN, 4, 4 * 512, indirect=indirect)
    h4, buf4, st4 = drv.blk_request(vb.T_GET_ID, 0, 20, indirect=indirect)
    if timed:
        clock.advance(SETTLE)
    else:
        # each completed inside its notification: no timer, no virtual time
        assert clock.find("virtio-blk0.complete") is None and clock.now() == 0
    used = drv.used(0)
    assert [u[0] for u in used] == [h1, h2, h3, h4]       # in order
    assert used[2][1] == 4 * 512 + 1 and used[3][1] == 21 and used[0][1] == 1
    assert [drv.ram.mem[s] for s in (st1, st2, st3, st4)] == [vb.S_OK] * 4
    assert drv.ram.mem[buf3:buf3 + 2048] == model[4 * 512:8 * 512]
    assert bytes(disk.data) == bytes(model)
    assert drv.ram.mem[buf4:buf4 + 20] == b"disk-serial-01".ljust(20, b"\0")
    assert disk.flushes == 1
    assert drv.isr() & 1 and not fn.broken


def test_blk_config_space():
    _, drv, _, _ = up(disk=MemDisk(1000 * 512))
    assert drv.config_read(0, 4) == 1000 and drv.config_read(4, 4) == 0
    assert drv.config_read(8, 4) == vb.SIZE_MAX and drv.config_read(12, 4) == vb.SEG_MAX
    assert drv.config_read(20, 4) == 512
    assert drv.config_read(36, 4) == vb.MAX_DISCARD_SECTORS and drv.config_read(56, 1) == 1
    assert drv.config_read(0x60, 4) == 0                   # past the structure: zeros
    assert drv.common_read(0x15, 1) == 0                   # config_generation


def test_write_through_without_flush_feature():
    _, drv, disk, clock = up(accept=~bit(vb.F_FLUSH))
    drv.blk_request(vb.T_OUT, 0, b"x" * 512)
    clock.advance(SETTLE)
    assert disk.flushes == 1                                # 5.2.6.4: stable on completion


def test_blk_request_errors():
    fn, drv, disk, clock = up(disk=MemDisk(16 * 512))
    reqs = [
        (vb.T_IN, 15, 1024, vb.S_IOERR),                 # runs past the end
        (vb.T_IN, 0, 100, vb.S_IOERR),                   # not whole sectors
        (vb.T_OUT, 2**63, b"y" * 512, vb.S_IOERR),
        (vb.T_IN, 16, 0, vb.S_OK),                       # nothing, at the end: fine
        (7, 0, 512, vb.S_UNSUPP),                        # unknown type
        (vb.T_GET_LIFETIME, 0, 8, vb.S_UNSUPP),
        (vb.T_DISCARD, 0, struct.pack("<QII", 0, 4, 1), vb.S_UNSUPP),     # discard with unmap
        (vb.T_DISCARD, 0, struct.pack("<QII", 0, 4, 2), vb.S_UNSUPP),     # unknown flag
        (vb.T_DISCARD, 0, struct.pack("<QII", 14, 4, 0), vb.S_IOERR),     # past the end
        (vb.T_DISCARD, 0, b"z" * 15, vb.S_IOERR),
        (vb.T_WRITE_ZEROES, 0, struct.pack("<QII", 0, 1, 0) * 2, vb.S_UNSUPP),   # 2 segments > max 1
    ]
    statuses = []
    for rtype, sector, data, _ in reqs:
        statuses.append(drv.blk_request(rtype, sector, data)[2])
    clock.advance(SETTLE)
    assert [drv.ram.mem[s] for s in statuses] == [r[3] for r in reqs]
    assert not fn.broken and len(drv.used(0)) == len(reqs)
    assert bytes(disk.data) == bytes(disk.size)


def test_discard_and_write_zeroes():
    _, drv, disk, clock = up()
    disk.data[:] = b"\xAA" * disk.size
    s1 = drv.blk_request(vb.T_DISCARD, 0, struct.pack("<QII", 2, 2, 0) + struct.pack("<QII", 8, 1, 0))[2]
    s2 = drv.blk_request(vb.T_WRITE_ZEROES, 0, struct.pack("<QII", 20, 3, 0))[2]
    s3 = drv.blk_request(vb.T_WRITE_ZEROES, 0, struct.pack("<QII", 30, 1, 1))[2]
    clock.advance(SETTLE)
    assert [drv.ram.mem[s] for s in (s1, s2, s3)] == [vb.S_OK] * 3
    zero = [range(2 * 512, 4 * 512), range(8 * 512, 9 * 512), range(20 * 512, 23 * 512), range(30 * 512, 31 * 512)]
    for i in range(disk.size):
        assert disk.data[i] == (0 if any(i in r for r in zero) else 0xAA), i


def test_read_only_disk():
    _, drv, disk, clock = up(disk=MemDisk(writable=False))
    assert drv.features & bit(vb.F_RO) and not drv.features & bit(vb.F_DISCARD)
    s = drv.blk_request(vb.T_OUT, 0, b"w" * 512)[2]
    clock.advance(SETTLE)
    assert drv.ram.mem[s] == vb.S_IOERR and bytes(disk.data) == bytes(disk.size)


def test_image_errors_fail_one_request():
    fn, drv, disk, clock = up()
    disk.fail = True
    s1 = drv.blk_request(vb.T_IN, 0, 512)[2]
    s2 = drv.blk_request(vb.T_FLUSH)[2]
    clock.advance(SETTLE)
    disk.fail = False
    s3 = drv.blk_request(vb.T_IN, 0, 512)[2]
    clock.advance(SETTLE)
    assert [drv.ram.mem[s] for s in (s1, s2, s3)] == [vb.S_IOERR, vb.S_IOERR, vb.S_OK]
    assert fn.device.io_errors == 2 and "Input/output" in fn.device.last_io_error


def test_completion_times_are_deterministic_and_in_order():
    fn, drv, _, clock = up()
    clock.advance(1000)
    drv.blk_request(vb.T_IN, 0, 4096, kick=False)
    drv.blk_request(vb.T_IN, 8, 512, kick=False)
    drv.kick(0)
    timer = clock.find("virtio-blk0.complete")
    first = 1000 + vb.LATENCY_TICKS + 4096 // vb.BYTES_PER_TICK
    assert timer is not None and timer.deadline == first
    assert [r.deadline for r in fn.device.inflight] == [first, first + vb.LATENCY_TICKS + 512 // vb.BYTES_PER_TICK]
    clock.advance_to(first - 1)
    assert drv.used(0) == []
    clock.advance_to(first)
    assert len(drv.used(0)) == 1
    clock.advance(SETTLE)
    assert len(drv.used(0)) == 1 and clock.find("virtio-blk0.complete") is None


def test_immediate_service_completes_inside_the_notification():
    fn, drv, disk, clock = up(timed=False)
    clock.advance(1000)
    drv.blk_request(vb.T_IN, 0, 4096, kick=False)
    drv.blk_request(vb.T_IN, 8, 512, kick=False)
    assert drv.used(0) == [] and drv.isr() == 0       # nothing before the notification
    drv.kick(0)
    assert [n for _, n in drv.used(0)] == [4097, 513]  # both, in order, as the write returned
    assert drv.isr() & 1 and clock.find("virtio-blk0.complete") is None
    assert not fn.device.inflight and fn.device.busy_until == 1000 and fn.device.completed == 2
    assert fn.device.save_state() == {"kind": "virtio_blk", "version": 1, "busy_until": 1000, "inflight": []}


def test_immediate_service_follows_restored_requests_in_flight():
    """A timed device's state with requests in flight, loaded into an immediate one: those
    complete on their timers and a new request after them, in order."""
    fn, drv, disk, clock = up()
    h1, _, _ = drv.blk_request(vb.T_IN, 1, 512)
    state = copy.deepcopy(fn.save_state())
    ram_copy = bytes(drv.ram.mem)
    deadline = state["device"]["inflight"][0]["deadline"]
    b = make_blk(timed=False)
    b.fn.load_state(copy.deepcopy(state))
    b.ram.mem[:] = ram_copy
    drv2 = Driver(b.fn, b.io, b.mmio, b.ram)
    drv2.queues = drv.queues
    drv2.next_buf = drv.next_buf
    h2, _, _ = drv2.blk_request(vb.T_IN, 2, 512)
    assert drv2.used(0) == [] and [r.deadline for r in b.fn.device.inflight] == [deadline, deadline]
    b.clock.advance_to(deadline)
    assert [u[0] for u in drv2.used(0)] == [h1, h2] and not b.fn.device.inflight
    assert b.clock.find("virtio-blk0.complete") is None


def test_save_and_restore_with_requests_in_flight():
    fn, drv, disk, clock = up()
    disk.data[:] = pattern(disk.size, 5)
    drv.blk_request(vb.T_IN, 1, 1024)
    drv.blk_request(vb.T_OUT, 3, b"q" * 512)
    state = copy.deepcopy(fn.save_state())
    ram_copy = bytes(drv.ram.mem)
    assert len(state["device"]["inflight"]) == 2
    clock.advance(SETTLE)
    done_a = drv.used(0)
    # a new machine: same RAM and disk contents, the state loaded
    clock2 = VirtualClock()
    clock2.load_state(VirtualClock().save_state())
    disk2 = MemDisk()
    disk2.data[:] = pattern(disk.size, 5)
    b = make_blk(disk=disk2, clock=clock2)
    fn2, ram2 = b.fn, b.ram
    ram2.mem[:] = ram_copy
    fn2.load_state(copy.deepcopy(state))
    assert fn2.save_state() == state
    assert clock2.find("virtio-blk0.complete") is not None
    clock2.advance(SETTLE)
    assert ram2.mem == drv.ram.mem and disk2.data == disk.data
    assert fn2.isr == fn.isr and fn2.intx.level == fn.intx.level
    assert len(done_a) == 2


def test_bad_states_are_refused_before_anything_changes():
    fn, drv, _, _ = up()
    drv.blk_request(vb.T_IN, 0, 512)
    good = fn.save_state()
    for mutate in (lambda s: s["queues"][0].update(size=3), lambda s: s["queues"].pop(),
                   lambda s: s["device"]["inflight"][0].update(data=[[0, 0]]),
                   lambda s: s["device"].update(kind="x"), lambda s: s.update(device_status=256),
                   lambda s: s["device"]["inflight"].append(dict(s["device"]["inflight"][0], deadline=0))):
        st = copy.deepcopy(good)
        mutate(st)
        before = fn.save_state()
        with pytest.raises(DeviceStateError):
            fn.load_state(st)
        assert fn.save_state() == before


# ---------------------------------------------------------------------------------------------
# the legacy interface and the PCI configuration window

def test_legacy_interface_registers():
    b = make_blk()
    fn, ram, disk, io, mmio = b.fn, b.ram, b.disk, b.io, b.mmio
    drv = Driver(fn, io, mmio, ram, legacy=True)
    f = drv.device_features()
    assert f & bit(27) and f & bit(F_INDIRECT_DESC) and f & bit(vb.F_FLUSH)    # ANY_LAYOUT offered
    assert io.read(BAR0 + 0x0C, 2) == 256
    fn.config_write(COMMAND, 2, fn.command & ~4)
    drv.set_status(ACKNOWLEDGE | DRIVER)
    assert fn.command & 4                                   # QEMU's bus-master quirk
    drv.write_features(f)
    assert fn.driver_features == f & 0xFFFF_FFFF
    io.write(BAR0 + 0x08, 4, 0x3)                          # queue PFN: ring at 0x3000
    assert io.read(BAR0 + 0x08, 4) == 3
    q = fn.queues[0]
    assert (q.desc, q.avail, q.used) == (0x3000, 0x3000 + 16 * 256, 0x3000 + 0x2000)
    assert drv.config_read(0, 4) == disk.size // 512        # the configuration at offset 20
    io.write(BAR0 + 0x08, 4, 0)                             # PFN 0 resets the device, as in QEMU
    assert drv.status() == 0 and not fn.queues[0].enabled


def test_legacy_driver_is_served_before_driver_ok():
    b = make_blk()
    fn, ram, clock, io, mmio = b.fn, b.ram, b.clock, b.io, b.mmio
    drv = Driver(fn, io, mmio, ram, legacy=True)
    drv.init(driver_ok=False)
    s = drv.blk_request(vb.T_FLUSH)[2]
    clock.advance(SETTLE)
    assert ram.mem[s] == vb.S_OK and fn.isr == 1


def test_pci_configuration_window():
    fn = up()[0]
    c = fn.cfg_cap
    # read num_queues (common 0x12, 2 bytes) through the window
    fn.config_write(c + 4, 1, 4)
    fn.config_write(c + 8, 4, 0x12)
    fn.config_write(c + 12, 4, 2)
    assert fn.config_read(c + 16, 2) == 1
    # write device_status through it
    fn.config_write(c + 8, 4, 0x14)
    fn.config_write(c + 12, 4, 1)
    fn.config_write(c + 16, 4, 0)
    assert fn.device_status == 0
    # misaligned or bad lengths do nothing
    fn.config_write(c + 8, 4, 0x13)
    fn.config_write(c + 12, 4, 2)
    fn.config_write(c + 16, 4, 0xFF)
    fn.config_write(c + 12, 4, 3)
    fn.config_write(c + 16, 4, 0xFF)
    assert fn.device_status == 0


# ---------------------------------------------------------------------------------------------
# hostile rings

def _broken(fn, drv, why: str) -> None:
    assert fn.broken, "the device should have stopped"
    assert why in fn.error, fn.error
    assert fn.device_status & NEEDS_RESET
    assert fn.isr & 2 and fn.intx.level                     # configuration change interrupt
    # recovery: a reset brings it back
    drv.init()
    drv.next_buf = Driver.BUFS
    s = drv.blk_request(vb.T_FLUSH)[2]
    drv.fn.clock.advance(SETTLE)
    assert not fn.broken and drv.ram.mem[s] == vb.S_OK, fn.error


def _desc(drv, i, addr, ln, flags, nxt=0):
    q = drv.queues[0]
    struct.pack_into("<QIHH", drv.ram.mem, q["desc"] + 16 * i, addr, ln, flags, nxt)


def _make_avail(drv, *heads, idx=None):
    q = drv.queues[0]
    for k, h in enumerate(heads):
        struct.pack_into("<H", drv.ram.mem, q["avail"] + 4 + 2 * ((q["avail_idx"] + k) % q["size"]), h)
    q["avail_idx"] = (q["avail_idx"] + len(heads)) & 0xFFFF if idx is None else idx
    struct.pack_into("<H", drv.ram.mem, q["avail"] + 2, q["avail_idx"])
    drv.kick(0)


HDR, STATUS = 0x30000, 0x30100


@pytest.mark.parametrize("case, why", [
    ("loop", "longer than"),
    ("next_out_of_table", "outside the"),
    ("head_out_of_table", "chain head"),
    ("avail_jump", "more than the queue size"),
    ("zero_length", "zero-length"),
    ("readable_after_writable", "device-readable buffer after"),
    ("nested_indirect", "inside an indirect table"),
    ("indirect_with_next", "NEXT set"),
    ("indirect_bad_len", "indirect table of"),
    ("indirect_outside_ram", "indirect table unreadable"),
    ("table_outside_ram", "unreadable"),
    ("no_status", "status byte"),
    ("no_header", "header"),
    ("data_outside_ram", "not RAM"),
    ("status_outside_ram", "status byte unwritable"),
])
def test_hostile_ring_sets_needs_reset(case, why):
    fn, drv, _, clock = up()
    mem = drv.ram.mem
    struct.pack_into("<IIQ", mem, HDR, vb.T_IN, 0, 0)
    q = drv.queues[0]
    if case == "loop":
        _desc(drv, 0, HDR, 16, DESC_F_NEXT, 1)
        _desc(drv, 1, STATUS, 1, DESC_F_NEXT, 0)
        _make_avail(drv, 0)
    elif case == "next_out_of_table":
        _desc(drv, 0, HDR, 16, DESC_F_NEXT, q["size"])
        _make_avail(drv, 0)
    elif case == "head_out_of_table":
        _make_avail(drv, q["size"] + 3)
    elif case == "avail_jump":
        _desc(drv, 0, STATUS, 1, DESC_F_WRITE)
        _make_avail(drv, 0, idx=q["size"] + 1)
    elif case == "zero_length":
        _desc(drv, 0, HDR, 0, DESC_F_NEXT, 1)
        _desc(drv, 1, STATUS, 1, DESC_F_WRITE)
        _make_avail(drv, 0)
    elif case == "readable_after_writable":
        _desc(drv, 0, STATUS, 1, DESC_F_WRITE | DESC_F_NEXT, 1)
        _desc(drv, 1, HDR, 16, 0)
        _make_avail(drv, 0)
    elif case in ("nested_indirect", "indirect_with_next", "indirect_bad_len", "indirect_outside_ram"):
        table = 0x31000
        struct.pack_into("<QIHH", mem, table, table, 32, DESC_F_INDIRECT, 0)
        struct.pack_into("<QIHH", mem, table + 16, STATUS, 1, DESC_F_WRITE, 0)
        flags = DESC_F_INDIRECT | (DESC_F_NEXT if case == "indirect_with_next" else 0)
        ln = 24 if case == "indirect_bad_len" else 32
        addr = len(mem) - 16 if case == "indirect_outside_ram" else table
        _desc(drv, 0, addr, ln, flags, 1)
        _make_avail(drv, 0)
    elif case == "table_outside_ram":
        drv.set_status(0)
        fn.queues[0].desc = 0   # placeholder: set up the queue again with its table past the RAM
        drv.set_status(ACKNOWLEDGE | DRIVER)
        drv.write_features(drv.features)
        drv.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        drv.common_write(0x16, 2, 0)
        drv.common_write(0x20, 4, len(mem) - 64)
        drv.common_write(0x28, 4, q["avail"])
        drv.common_write(0x30, 4, q["used"])
        drv.common_write(0x1C, 2, 1)
        drv.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        _make_avail(drv, 0)
    elif case == "no_status":
        _desc(drv, 0, HDR, 16, 0)
        _make_avail(drv, 0)
    elif case == "no_header":
        _desc(drv, 0, HDR, 8, DESC_F_NEXT, 1)
        _desc(drv, 1, STATUS, 1, DESC_F_WRITE)
        _make_avail(drv, 0)
    elif case == "data_outside_ram":
        _desc(drv, 0, HDR, 16, DESC_F_NEXT, 1)
        _desc(drv, 1, len(mem) - 256, 512, DESC_F_WRITE | DESC_F_NEXT, 2)
        _desc(drv, 2, STATUS, 1, DESC_F_WRITE)
        _make_avail(drv, 0)
    elif case == "status_outside_ram":
        _desc(drv, 0, HDR, 16, DESC_F_NEXT, 1)
        _desc(drv, 1, len(mem) + 100, 1, DESC_F_WRITE)
        _make_avail(drv, 0)
    clock.advance(SETTLE)
    _broken(fn, drv, why)


def test_a_broken_device_ignores_notifications_and_returns_nothing():
    fn, drv, _, clock = up()
    _desc(drv, 0, HDR, 16, DESC_F_NEXT, 0)
    _make_avail(drv, 0)
    assert fn.broken
    used_idx = fn.queues[0].used_idx
    drv.blk_request(vb.T_FLUSH)
    clock.advance(SETTLE)
    assert fn.queues[0].used_idx == used_idx and drv.used(0) == []
    drv.set_status(ACKNOWLEDGE)                            # the driver cannot clear NEEDS_RESET
    assert drv.status() & NEEDS_RESET


def test_legacy_error_sets_no_needs_reset():
    b = make_blk()
    fn, ram, io, mmio = b.fn, b.ram, b.io, b.mmio
    drv = Driver(fn, io, mmio, ram, legacy=True)
    drv.init()
    _desc(drv, 0, HDR, 16, DESC_F_NEXT, 0)
    _make_avail(drv, 0)
    assert fn.broken and not fn.device_status & NEEDS_RESET      # legacy has no such bit


QUEUE_SIZES = st.sampled_from([1, 2, 4, 8, 16])


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(size=QUEUE_SIZES, table=st.binary(min_size=0, max_size=16 * 16), ring=st.binary(max_size=64),
       avail_idx=st.integers(0, 0xFFFF), last=st.integers(0, 0xFFFF),
       indirect=st.binary(max_size=128), features=st.integers(0, 7), kicks=st.integers(1, 3))
def test_random_rings_never_escape_the_device(size, table, ring, avail_idx, last, indirect, features, kicks):
    """Random descriptor tables, rings and indices: nothing raises, nothing touches memory
    outside RAM (the Ram raises before a byte moves, and the device catches it), the work is
    bounded, and the device either completes requests or stops with NEEDS_RESET."""
    accept = ~0
    if not features & 1:
        accept &= ~bit(F_INDIRECT_DESC)
    if not features & 2:
        accept &= ~bit(F_EVENT_IDX)
    b = make_blk(ram=Ram(0x8000), timed=not features & 4)     # both service models
    fn, ram, clock, io, mmio = b.fn, b.ram, b.clock, b.io, b.mmio
    drv = Driver(fn, io, mmio, ram)
    drv.init(accept, queue_sizes={0: size})
    q = drv.queues[0]
    mem = ram.mem
    # descriptors point into the first 32 KiB (RAM) or just past it; indirect tables too
    tbl = bytearray(table.ljust(16 * size, b"\0")[:16 * size])
    for i in range(size):
        addr = struct.unpack_from("<Q", tbl, 16 * i)[0] % 0x9000
        struct.pack_into("<Q", tbl, 16 * i, addr)
    mem[q["desc"]:q["desc"] + len(tbl)] = tbl
    mem[0x6000:0x6000 + len(indirect)] = indirect
    mem[q["avail"] + 4:q["avail"] + 4 + 2 * size] = ring.ljust(2 * size, b"\0")[:2 * size]
    fn.queues[0].last_avail = last
    struct.pack_into("<H", mem, q["avail"] + 2, avail_idx)
    ops_before = ram.reads + ram.writes
    for _ in range(kicks):
        drv.kick(0)
        clock.advance(SETTLE)
    work = ram.reads + ram.writes - ops_before
    assert work <= kicks * (size * (3 + 2 * 4) + 8) + 16, work
    if not fn.broken:
        assert not fn.device_status & NEEDS_RESET
    else:
        assert fn.device_status & NEEDS_RESET and fn.error


# ---------------------------------------------------------------------------------------------
# the split queue on its own

def test_split_queue_limits():
    with pytest.raises(ValueError):
        SplitQueue(0, 3)
    with pytest.raises(ValueError):
        SplitQueue(0, 65536)
    ram = Ram(0x10000)
    q = SplitQueue(0, 4)
    q.enabled = True
    q.desc, q.avail, q.used = 0x1000, 0x2000, 0x3000
    struct.pack_into("<H", ram.mem, 0x2002, 5)
    with pytest.raises(VirtqError):
        q.pop(ram)
    struct.pack_into("<H", ram.mem, 0x2002, 1)
    struct.pack_into("<QIHH", ram.mem, 0x1000, 0x4000, 8, 0, 0)
    [chain] = q.pop(ram)
    assert chain.out == [(0x4000, 8)] and chain.inn == [] and q.last_avail == 1
    q.unpop()
    assert q.pending(ram) == 1


def test_chain_read_and_write_span_buffers():
    ram = Ram(0x10000)
    from devices.virtio.queue import Chain
    c = Chain(0, out=[(0x100, 3), (0x200, 5)], inn=[(0x300, 2), (0x400, 6)])
    ram.mem[0x100:0x103] = b"abc"
    ram.mem[0x200:0x205] = b"defgh"
    assert c.read(ram) == b"abcdefgh" and c.read(ram, 2, 4) == b"cdef"
    assert c.write(ram, 1, b"XYZ") == 3
    assert ram.mem[0x301] == ord("X") and ram.mem[0x400:0x402] == b"YZ"
    assert c.write(ram, 6, b"1234") == 2                   # the buffers end first


# ---------------------------------------------------------------------------------------------
# on the PC board

def test_attach_virtio_blk_on_the_pc_board():
    from vmm.platform.pc import PcConfig, PcMachine
    from vmm.platform.virtio import attach_virtio_blk

    m = PcMachine(PcConfig(mem_size=16 << 20))
    try:
        a = attach_virtio_blk(m, MemDisk(), 4)
        b = attach_virtio_blk(m, MemDisk(), 5, serial="second")
        assert (a.name, b.name) == ("virtio-blk0", "virtio-blk1")
        with pytest.raises(ValueError):
            attach_virtio_blk(m, MemDisk(), 4)
        # through the configuration ports, as firmware sees it
        m.io.write(0xCF8, 4, 0x8000_0000 | 4 << 11)
        assert m.io.read(0xCFC, 4) == 0x1001_1AF4
        # program BAR4 and decode; the device's registers appear in guest-physical space
        m.io.write(0xCF8, 4, 0x8000_0000 | 4 << 11 | 0x20)
        m.io.write(0xCFC, 4, 0xFEB0_0000)
        m.io.write(0xCF8, 4, 0x8000_0000 | 4 << 11 | 0x04)
        m.io.write(0xCFC, 2, 0x0006)
        assert m.mmio.read(0xFEB0_0012, 2) == 1             # num_queues
        # INTx goes through the PIIX3's PIRQ routing to an ISA IRQ (slot 4 INTA# -> PIRQD -> 11)
        a.set_irq(True)
        assert m.isa_irqs[11].level
        a.set_irq(False)
        parts = m.save_state(ram=False)
        assert parts["dev:virtio-blk0"]["kind"] == "virtio_blk_pci"
        m.load_state(m.save_state())
    finally:
        m.close()
