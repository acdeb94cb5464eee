"""The buses: claims, unclaimed space, width splitting done once in the bus,
vCPU ids carried by every access, MMIO regions moved at run time."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.bus import BusError, IoBus, MmioBus, split_access


class Regs:
    """A little-endian register file that logs every access it gets."""

    name = "regs"

    def __init__(self, size: int, sizes=None, wants_vcpu: bool = False):
        self.mem = bytearray(size)
        self.log: list[tuple] = []
        if sizes is not None:
            self.mmio_sizes = sizes
            self.io_sizes = tuple(s for s in sizes if s <= 4)
        self.wants_vcpu = wants_vcpu

    def _rd(self, off, size, *vcpu):
        self.log.append(("r", off, size, *vcpu))
        return int.from_bytes(self.mem[off:off + size], "little")

    def _wr(self, off, size, value, *vcpu):
        self.log.append(("w", off, size, value, *vcpu))
        self.mem[off:off + size] = value.to_bytes(size, "little")

    mmio_read = _rd
    mmio_write = _wr

    def io_read(self, port, size, *vcpu):
        return self._rd(port - 0x100, size, *vcpu)

    def io_write(self, port, size, value, *vcpu):
        self._wr(port - 0x100, size, value, *vcpu)


def test_split_access_is_naturally_aligned_and_covers_the_access():
    assert split_access(0, 8, (4,)) == [(0, 4), (4, 4)]
    assert split_access(2, 4, (4,)) == [(0, 4), (4, 4)]
    assert split_access(1, 2, (1, 2, 4)) == [(1, 1), (2, 1)]
    assert split_access(3, 1, (4,)) == [(0, 4)]


@settings(max_examples=300, deadline=None)
@given(off=st.integers(0, 56), size=st.sampled_from([1, 2, 4, 8]),
       sizes=st.sampled_from([(1,), (4,), (2, 4), (1, 2, 4, 8), (8,)]), data=st.integers(0, (1 << 64) - 1))
def test_mmio_width_adjustment_matches_a_byte_model(off, size, sizes, data):
    """Whatever widths a device implements, a guest access reads and writes the same
    bytes a plain byte array would, and the device sees only aligned accesses it implements."""
    dev = Regs(64, sizes)
    model = bytearray(range(64))
    dev.mem[:] = model
    bus = MmioBus()
    bus.register(dev, 0x1000, 64)
    assert bus.read(0x1000 + off, size) == int.from_bytes(model[off:off + size], "little")
    value = data & ((1 << (8 * size)) - 1)
    bus.write(0x1000 + off, size, value)
    model[off:off + size] = value.to_bytes(size, "little")
    assert dev.mem == model
    for kind, o, w, *_ in dev.log:
        assert w in sizes and o % w == 0


def test_access_across_a_claims_edge_is_split_and_the_rest_is_unclaimed():
    a, b = Regs(16), Regs(16)
    a.mem[:] = bytes(range(16))
    b.mem[:] = bytes(range(0x40, 0x50))
    bus = MmioBus()
    bus.register(a, 0x1000, 16, "a")
    bus.register(b, 0x1010, 16, "b")
    assert bus.read(0x100E, 4) == int.from_bytes(bytes([14, 15, 0x40, 0x41]), "little")
    assert bus.read(0x101E, 4) == int.from_bytes(bytes([0x4E, 0x4F, 0, 0]), "little")
    assert bus.unclaimed_reads == 1
    bus.write(0x100F, 2, 0xBBAA)
    assert a.mem[15] == 0xAA and b.mem[0] == 0xBB


def test_vcpu_id_reaches_devices_that_want_it():
    dev = Regs(16, wants_vcpu=True)
    bus = MmioBus()
    bus.register(dev, 0, 16)
    bus.write(4, 4, 7, vcpu=3)
    bus.read(4, 4, vcpu=5)
    assert dev.log == [("w", 4, 4, 7, 3), ("r", 4, 4, 5)]
    io = IoBus()
    pdev = Regs(16, wants_vcpu=True)
    io.register(pdev, 0x100, 16)
    io.write(0x102, 1, 9, vcpu=2)
    assert pdev.log == [("w", 2, 1, 9, 2)]


def test_overlapping_claims_are_refused_and_regions_move():
    bus = MmioBus()
    seen = []
    bus.listeners.append(lambda base, n, added: seen.append((base, n, added)))
    d = Regs(16)
    bus.register(d, 0x1000, 16)
    with pytest.raises(BusError):
        bus.register(Regs(16), 0x1008, 16)
    bus.move(d, 0x1000, 0x2000)
    assert bus.find(0x1000) is None and bus.find(0x2004).device is d
    assert seen == [(0x1000, 16, True), (0x1000, 16, False), (0x2000, 16, True)]
    other = Regs(16)
    bus.register(other, 0x3000, 16)
    with pytest.raises(BusError):
        bus.move(d, 0x2000, 0x3008)
    assert bus.find(0x2000).device is d          # a refused move leaves the region where it was


def test_io_word_access_to_byte_ports_is_two_byte_accesses():
    dev = Regs(4, sizes=(1,))
    io = IoBus()
    io.register(dev, 0x100, 4)
    io.write(0x100, 2, 0xBEEF)
    assert dev.log == [("w", 0, 1, 0xEF), ("w", 1, 1, 0xBE)]
    assert io.read(0x100, 4) == 0xBEEF
    # a dword that runs off the end of the claim: the rest is unclaimed (all ones)
    assert io.read(0x102, 4) == 0xFFFF0000


# the CPU side's entry (engine.mmio_handler): a per-page cache of the claim with a fast path for
# accesses inside one claim at a width its device takes; it must answer exactly as read/write do,
# device by device and access by access, while claims appear, go and move under it
_NEAR = [0x1000, 0x1010, 0x1400, 0x17F8, 0x1FF8, 0x2000, 0x2C00, 0x2FFC, 0x3000]   # claim edges, then and after moves
_OPS = st.lists(st.one_of(
    st.tuples(st.just("access"), st.booleans(),
              st.builds(lambda near, d: near + d, st.sampled_from(_NEAR), st.integers(-8, 24)),
              st.sampled_from([1, 2, 4, 8]),
              st.integers(0, (1 << 64) - 1), st.integers(0, 3)),
    st.tuples(st.just("move"), st.integers(0, 2), st.sampled_from([0x1000, 0x1010, 0x1FF8, 0x2000, 0x2C00]))),
    max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=_OPS)
def test_the_fast_access_path_answers_as_read_and_write_do(ops):
    def machine():
        bus = MmioBus()
        devs = [Regs(16, sizes=(4,)), Regs(0x400, wants_vcpu=True), Regs(8, sizes=(1, 2))]
        for d, base in zip(devs, (0x1000, 0x1400, 0x2FFC)):
            d.mem[:] = bytes(i % 251 for i in range(len(d.mem)))
            bus.register(d, base, len(d.mem))
        return bus, devs

    fast, fdevs = machine()
    ref, rdevs = machine()
    for op in ops:
        if op[0] == "access":
            _, is_write, addr, size, value, vcpu = op
            value &= (1 << (8 * size)) - 1
            got = fast.access(int(is_write), addr, size, value, vcpu)
            if is_write:
                ref.write(addr, size, value, vcpu)
                assert got == 0
            else:
                assert got == ref.read(addr, size, vcpu)
        else:
            _, i, base = op
            old = next(c.base for c in ref.claims if c.device is rdevs[i])
            try:
                ref.move(rdevs[i], old, base)
            except BusError:
                with pytest.raises(BusError):
                    fast.move(fdevs[i], old, base)
                continue
            fast.move(fdevs[i], old, base)
    assert [d.log for d in fdevs] == [d.log for d in rdevs]
    assert [bytes(d.mem) for d in fdevs] == [bytes(d.mem) for d in rdevs]
    assert (fast.accesses, fast.unclaimed_reads, fast.unclaimed_writes) == \
        (ref.accesses, ref.unclaimed_reads, ref.unclaimed_writes)
