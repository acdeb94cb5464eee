"""One conformance suite for every device class in devices/ (after crosvm's device tests).

Each device is built in a small rig with its own manual clock, recorded
interrupt lines and recorded callbacks.  For every device:

(a) save_state -> load_state into a fresh instance (on a fresh clock set to
    the same time) -> the two behave identically under a random sequence of
    port accesses, clock advances and host-side inputs: same values read,
    same interrupt-line edges and callbacks at the same ticks, same final state;
(b) hypothesis-generated port traffic -- any port in and around its io_ranges,
    sizes 1/2/4, any value, clock advances and host-side inputs interleaved --
    never raises out of the device;
(c) the saved state is plain data: json-serialisable once bytes are hex, with
    a "kind" string and an integer "version", and not aliased to the live device;
(d) load_state of a wrong kind, a wrong version, a non-dict, a state missing a
    field, or one with a field replaced by garbage raises DeviceStateError and
    nothing else; a garbage state it does accept leaves a device that still
    works, and one it refuses leaves the device as it was.

The qtest harness (tools/qtest.py) gets its own checks at the end: the same
devices driven through a whole PcMachine by port, and its script mode.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import json
import pkgutil
import pathlib
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import devices
from devices.base import SIZE_MASK, DeviceStateError, IrqLine
from devices.bus import MmioBus
from devices.clock import VirtualClock
from devices.legacy.debugports import DebugConsole, DebugExit, PostCode
from devices.legacy.i8042 import I8042, Port92
from devices.legacy.pic import Pic8259Pair
from devices.legacy.pit import Pit8254, SystemControlB
from devices.legacy.rtc import Rtc146818
from host.serial import BufferBackend
from devices.legacy.uart import Uart16550

EPOCH = 1_767_225_600
FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------
# Rigs: a device, its peers, and everything it can be observed through.

@dataclass
class Rig:
    clock: VirtualClock
    dev: Any
    peers: list[Any] = field(default_factory=list)   # also saved/restored (e.g. the PIT behind port 0x61)
    lines: dict[str, IrqLine] = field(default_factory=dict)
    log: list[tuple] = field(default_factory=list)
    host_ops: dict[str, Callable[..., Any]] = field(default_factory=dict)
    mmio: int = 0            # length of the device's MMIO window (driven at offsets 0..mmio through a bus)
    vcpu_ids: tuple[int, ...] = (0,)   # vCPU ids accesses may carry (per-CPU devices)
    _bus: Any = None

    @property
    def bus(self) -> MmioBus:
        if self._bus is None:
            self._bus = MmioBus()
            self._bus.register(self.dev, 0, self.mmio)
        return self._bus

    def record(self, what: str) -> Callable[..., None]:
        def cb(*args: Any) -> None:
            self.log.append((self.clock.now(), what, *args))
        return cb

    def line(self, name: str) -> IrqLine:
        ln = IrqLine(name)
        ln.connect(lambda level, name=name: self.log.append((self.clock.now(), name, level)))
        self.lines[name] = ln
        return ln

    def observe(self) -> tuple:
        out = tuple(sorted((n, ln.level) for n, ln in self.lines.items()))
        if isinstance(self.dev, Pic8259Pair):
            out += (("intr", self.dev.intr),)
        return out

    def states(self) -> list[dict]:
        return [self.dev.save_state()] + [p.save_state() for p in self.peers]


def rig_pic(clock: VirtualClock) -> Rig:
    pic = Pic8259Pair()
    r = Rig(clock, pic)
    pic.on_intr_change = r.record("intr")
    pic.program_like_pc_bios()
    r.host_ops = {
        "set_irq": lambda n, level: pic.set_irq(n % 16, bool(level)),
        "ack": lambda *_: r.log.append((clock.now(), "inta", pic.acknowledge())),
    }
    return r


def rig_pit(clock: VirtualClock) -> Rig:
    r = Rig(clock, None)
    r.dev = Pit8254(clock, r.line("irq0"))
    r.host_ops = {"gate2": lambda level, *_: r.dev.set_gate(2, bool(level))}
    return r


def rig_port61(clock: VirtualClock) -> Rig:
    r = Rig(clock, None)
    pit = Pit8254(clock, r.line("irq0"))
    r.dev = SystemControlB(pit)
    r.peers = [pit]
    # counter 2 must be reachable through the PIT's ports too, or port 0x61 only sees a quiet counter
    r.host_ops = {"pit": lambda port, value: pit.io_write(0x40 + port % 4, 1, value & 0xFF)}
    return r


def rig_rtc(clock: VirtualClock) -> Rig:
    r = Rig(clock, None)
    r.dev = Rtc146818(clock, r.line("irq8"), EPOCH)
    return r


def rig_uart(clock: VirtualClock) -> Rig:
    r = Rig(clock, None)
    r.dev = Uart16550(0x3F8, r.line("irq4"), "com1", backend=BufferBackend(), on_tx=r.record("tx"))
    r.host_ops = {
        "receive": lambda n, b: r.dev.receive(bytes([b & 0xFF]) * (n % 20)),
        "break": lambda *_: r.dev.receive_break(),
        "modem": lambda n, *_: r.dev.set_modem_inputs(bool(n & 1), bool(n & 2), bool(n & 4), bool(n & 8)),
    }
    return r


def rig_i8042(clock: VirtualClock) -> Rig:
    r = Rig(clock, None)
    r.dev = I8042(r.line("irq1"), r.line("irq12"), r.record("a20"), r.record("reset"))
    r.host_ops = {
        "key": lambda n, b: r.dev.key_input(bytes([b & 0xFF]) * (n % 8)),
        "aux": lambda n, b: r.dev.aux_input(bytes([b & 0xFF]) * (n % 8)),
    }
    return r


def rig_port92(clock: VirtualClock) -> Rig:
    r = Rig(clock, None)
    r.dev = Port92(r.record("a20"), r.record("reset"))
    return r


def rig_debug_exit(clock: VirtualClock) -> Rig:
    r = Rig(clock, None)
    r.dev = DebugExit(r.record("exit"))
    return r


def rig_debugcon(clock: VirtualClock) -> Rig:
    r = Rig(clock, None)
    r.dev = DebugConsole(r.record("console"))
    return r


def rig_postcode(clock: VirtualClock) -> Rig:
    r = Rig(clock, None)
    r.dev = PostCode(r.record("post"))
    return r


RIGS: dict[str, Callable[[VirtualClock], Rig]] = {
    "pic": rig_pic,
    "pit": rig_pit,
    "port61": rig_port61,
    "rtc": rig_rtc,
    "uart": rig_uart,
    "i8042": rig_i8042,
    "port92": rig_port92,
    "debug_exit": rig_debug_exit,
    "debugcon": rig_debugcon,
    "postcode": rig_postcode,
}
CLASS_OF = {
    "pic": Pic8259Pair, "pit": Pit8254, "port61": SystemControlB, "rtc": Rtc146818, "uart": Uart16550,
    "i8042": I8042, "port92": Port92, "debug_exit": DebugExit, "debugcon": DebugConsole, "postcode": PostCode,
}


def _extra_rigs() -> None:
    """Rigs of newer devices live beside this file, one module per family
    (tests/devices/rigs_*.py, each with RIGS and CLASS_OF dicts)."""
    here = pathlib.Path(__file__).parent
    for f in sorted(here.glob("rigs_*.py")):
        mod = importlib.import_module(f"tests.devices.{f.stem}")
        for k, fn in mod.RIGS.items():
            assert k not in RIGS, f"rig {k} defined twice"
            RIGS[k] = fn
        CLASS_OF.update(mod.CLASS_OF)


_extra_rigs()
NAMES = sorted(RIGS)


def test_every_device_class_is_covered():
    """A device class added to devices/ without a rig here fails this test."""
    found = set()
    for mi in pkgutil.walk_packages(devices.__path__, "devices."):
        mod = importlib.import_module(mi.name)
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if (cls.__module__ == mod.__name__ and not getattr(cls, "_is_protocol", False)
                    and hasattr(cls, "save_state") and hasattr(cls, "load_state")
                    and (hasattr(cls, "io_read") or hasattr(cls, "mmio_read"))):
                found.add(cls)
    assert found == set(CLASS_OF.values())


# ---------------------------------------------------------------------------
# Operations

def ports_around(dev: Any) -> list[int]:
    ports: set[int] = set()
    for base, length in getattr(dev, "io_ranges", ()):
        ports.update(p for p in range(base - 4, base + length + 4) if 0 <= p <= 0xFFFF)
    return sorted(ports)


def in_range_ports(dev: Any) -> list[int]:
    return sorted({p for base, length in getattr(dev, "io_ranges", ()) for p in range(base, base + length)})


def op_strategy(name: str, around: bool) -> st.SearchStrategy:
    sample = RIGS[name](VirtualClock())
    dev = sample.dev
    ports = ports_around(dev) if around else in_range_ports(dev)
    host = sorted(sample.host_ops)
    size = st.sampled_from([1, 2, 4])
    byte = st.integers(0, 0xFF)
    vcpu = st.sampled_from(sample.vcpu_ids)
    ops = [st.tuples(st.just("adv"), st.one_of(st.integers(0, 2_000), st.integers(0, 20_000_000)))]
    if ports:
        port = st.sampled_from(ports)
        ops += [
            st.tuples(st.just("r"), port, size),
            st.tuples(st.just("w"), port, size, st.integers(0, 0xFFFF_FFFF)),
            st.tuples(st.just("w"), port, st.just(1), byte),
        ]
    if sample.mmio:
        span = sample.mmio + (64 if around else 0)
        off = st.integers(0, span - 1)
        msize = st.sampled_from([1, 2, 4, 8])
        ops += [
            st.tuples(st.just("mr"), off, msize, vcpu),
            st.tuples(st.just("mw"), off, msize, st.integers(0, (1 << 64) - 1), vcpu),
            st.tuples(st.just("mw"), st.integers(0, sample.mmio - 1).map(lambda o: o & ~3), st.just(4),
                      st.integers(0, 0xFFFF_FFFF), vcpu),
        ]
    if host:
        ops.append(st.tuples(st.just("host"), st.sampled_from(host), st.integers(0, 31), byte))
    return st.lists(st.one_of(*ops), max_size=40)


def apply(rig: Rig, op: tuple) -> Any:
    kind = op[0]
    if kind == "r":
        return rig.dev.io_read(op[1], op[2])
    if kind == "w":
        rig.dev.io_write(op[1], op[2], op[3] & SIZE_MASK[op[2]])
        return None
    if kind == "mr":
        return rig.bus.read(op[1], op[2], op[3])
    if kind == "mw":
        rig.bus.write(op[1], op[2], op[3] & SIZE_MASK[op[2]], op[4])
        return None
    if kind == "adv":
        rig.clock.advance(op[1])
        return None
    rig.host_ops[op[1]](op[2], op[3])
    return None


def run_trace(rig: Rig, ops: list[tuple]) -> list:
    trace = []
    for op in ops:
        start = len(rig.log)
        value = apply(rig, op)
        trace.append((op, value, rig.clock.now(), tuple(rig.log[start:]), rig.observe()))
    return trace


def plain(obj: Any) -> Any:
    """bytes -> hex; everything else must already be JSON data."""
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    if isinstance(obj, dict):
        assert all(isinstance(k, str) for k in obj), f"non-string key in {obj!r}"
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    assert obj is None or type(obj) in (int, bool, str, float), \
        f"{type(obj).__name__} in a saved state: {obj!r}"
    return obj


def restore(rig: Rig) -> Rig:
    """A fresh rig on a fresh clock at the same time, loaded with copies of rig's states."""
    clock = VirtualClock()
    clock.load_state(rig.clock.save_state())
    fresh = RIGS[type_name(rig)](clock)
    for target, state in zip([fresh.dev, *fresh.peers], rig.states()):
        target.load_state(copy.deepcopy(state))
    fresh.log.clear()
    return fresh


def type_name(rig: Rig) -> str:
    return next(n for n, c in CLASS_OF.items() if type(rig.dev) is c)


# ---------------------------------------------------------------------------
# (a) save -> load -> identical behaviour

@pytest.mark.parametrize("name", NAMES)
def test_restored_device_behaves_identically(name):
    @FAST
    @given(before=op_strategy(name, around=False), after=op_strategy(name, around=False))
    def check(before, after):
        a = RIGS[name](VirtualClock())
        run_trace(a, before)
        b = restore(a)
        assert b.observe() == a.observe(), "line levels differ right after load_state"
        assert b.states() == a.states(), "the loaded state does not save back identically"
        a.log.clear()
        assert run_trace(b, after) == run_trace(a, after)
        assert b.states() == a.states()

    check()


# ---------------------------------------------------------------------------
# (b) no traffic ever raises

@pytest.mark.parametrize("name", NAMES)
def test_port_traffic_never_raises(name):
    @FAST
    @given(ops=op_strategy(name, around=True))
    def check(ops):
        rig = RIGS[name](VirtualClock())
        for op in ops:
            value = apply(rig, op)
            if op[0] == "r":
                assert 0 <= value <= SIZE_MASK[op[2]], f"read of {op} gave {value!r}"

    check()


# ---------------------------------------------------------------------------
# (c) state is plain data with kind and version

@pytest.mark.parametrize("name", NAMES)
def test_state_is_plain_data(name):
    @FAST
    @given(ops=op_strategy(name, around=False))
    def check(ops):
        rig = RIGS[name](VirtualClock())
        run_trace(rig, ops)
        state = rig.dev.save_state()
        assert isinstance(state, dict)
        assert isinstance(state.get("kind"), str) and state["kind"]
        assert type(state.get("version")) is int
        text = json.dumps(plain(state), sort_keys=True)
        assert json.loads(text) == plain(state)
        # not aliased: wrecking the returned containers leaves the device alone
        before = copy.deepcopy(state)
        _wreck(state)
        assert rig.dev.save_state() == before

    check()


def _wreck(obj: Any) -> None:
    if isinstance(obj, dict):
        for v in obj.values():
            _wreck(v)
        obj.clear()
    elif isinstance(obj, list):
        for v in obj:
            _wreck(v)
        obj.clear()
    elif isinstance(obj, bytearray):
        obj[:] = b""


def test_kinds_are_distinct():
    kinds = [RIGS[n](VirtualClock()).dev.save_state()["kind"] for n in NAMES]
    assert len(set(kinds)) == len(kinds), kinds


# ---------------------------------------------------------------------------
# (d) bad states raise DeviceStateError and nothing else

def _busy_rig(name: str) -> Rig:
    rig = RIGS[name](VirtualClock())
    for port in in_range_ports(rig.dev):
        if type(rig.dev) is not DebugExit:
            rig.dev.io_write(port, 1, 0x11)
        rig.dev.io_read(port, 1)
    rig.clock.advance(12_345)
    return rig


@pytest.mark.parametrize("name", NAMES)
def test_wrong_kind_version_or_shape_raises_device_state_error(name):
    good = _busy_rig(name).dev.save_state()
    bad_states: list[Any] = [None, 0, "state", [], (), b"", {}, {"kind": good["kind"]},
                             {"version": good["version"]}, {"kind": good["kind"], "version": good["version"]}]
    for kind in ("nope", "", None, 7, good["kind"].upper() + "x"):
        bad_states.append({**good, "kind": kind})
    for version in (good["version"] + 1, good["version"] - 1, 0, -1, None, str(good["version"]), 1.5, 2**70):
        bad_states.append({**good, "version": version})
    other = next(n for n in NAMES if n != name)
    bad_states.append(RIGS[other](VirtualClock()).dev.save_state())
    for state in bad_states:
        rig = _busy_rig(name)
        before = rig.states()
        with pytest.raises(DeviceStateError):
            rig.dev.load_state(copy.deepcopy(state))
        assert rig.states() == before, f"a refused load changed the device: {state!r}"


# Fields a loader may leave out because it derives them from the rest (it
# recomputes them on load); a missing one must then change nothing.
DERIVED_FIELDS = {"uart": {"irq"}}


@pytest.mark.parametrize("name", NAMES)
def test_missing_field_raises_device_state_error(name):
    good = _busy_rig(name).dev.save_state()
    probe = [("w", p, 1, 0x5A) for p in in_range_ports(RIGS[name](VirtualClock()).dev)
             if CLASS_OF[name] is not DebugExit] + [("adv", 5_000_000)]
    probe += [("r", p, 1) for p in in_range_ports(RIGS[name](VirtualClock()).dev)]
    for key in good:
        if key in ("kind", "version"):
            continue
        state = {k: v for k, v in good.items() if k != key}
        rig = _busy_rig(name)
        before = rig.states()
        if key in DERIVED_FIELDS.get(name, ()):
            ref = _busy_rig(name)
            ref.dev.load_state(copy.deepcopy(good))
            rig.dev.load_state(state)
            assert run_trace(rig, probe) == run_trace(ref, probe)
            continue
        with pytest.raises(DeviceStateError):
            rig.dev.load_state(copy.deepcopy(state))
        assert rig.states() == before, f"a refused load (without {key!r}) changed the device"


GARBAGE = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                    st.text(max_size=3), st.binary(max_size=300), st.lists(st.integers(-5, 300), max_size=20),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=3))


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if prefix or k not in ("kind", "version"):
                out.append(prefix + (k,))
                out.extend(_paths(v, prefix + (k,)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append(prefix + (i,))
            out.extend(_paths(v, prefix + (i,)))
    return out


def _set_path(obj: Any, path: tuple, value: Any) -> None:
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


@pytest.mark.parametrize("name", NAMES)
def test_garbage_fields_raise_device_state_error_or_load_a_working_device(name):
    rig0 = _busy_rig(name)
    good = rig0.dev.save_state()
    paths = _paths(good)

    @settings(max_examples=80, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def check(data):
        state = copy.deepcopy(good)
        for _ in range(data.draw(st.integers(1, 3))):
            path = data.draw(st.sampled_from(paths))
            try:
                _set_path(state, path, data.draw(GARBAGE))
            except (KeyError, IndexError, TypeError):
                pass  # the path went away under an earlier replacement
        rig = _busy_rig(name)
        before = rig.states()
        try:
            rig.dev.load_state(state)
        except DeviceStateError:
            assert rig.states() == before, "a refused load changed the device"
            return
        # accepted: the device must still work and save plain data
        for op in data.draw(op_strategy(name, around=False)):
            apply(rig, op)
        json.dumps(plain(rig.dev.save_state()))

    check()


# ---------------------------------------------------------------------------
# The qtest harness: the same devices through a whole PcMachine, by port

def test_qtest_pit_drives_irq0_through_the_pic():
    from tools.qtest import QTest

    q = QTest.pc()
    q.outb(0x21, 0xFE)                    # only IRQ0 unmasked
    q.outb(0x43, 0x34)                    # counter 0, mode 2
    q.outb(0x40, 1193 & 0xFF)
    q.outb(0x40, 1193 >> 8)
    assert q.intr()                       # OUT rose with the control word: one edge latched
    assert q.ack() == 0x08
    q.outb(0x20, 0x20)
    assert not q.intr()
    vectors = []
    for _ in range(10):
        q.clock_step()                    # to the next timer: OUT falls or rises
        if q.intr():
            vectors.append(q.ack())
            q.outb(0x20, 0x20)
    assert vectors == [0x08] * 5          # two edges per period, one rising
    t = q.now()
    assert 4 * 99_000 < t < 6 * 101_000
    q.outb(0x43, 0xC2)                    # read-back: status and count of counter 0
    assert q.inb(0x40) & 0x3F == 0x34
    count = q.inb(0x40) | q.inb(0x40) << 8
    assert 1 <= count <= 1193


def test_qtest_rtc_periodic_interrupt_through_the_cascade():
    from tools.qtest import QTest

    q = QTest.pc()
    q.outb(0xA1, 0xFE)                    # IRQ8 unmasked on the slave (IR2 is open on the master)
    q.outb(0x70, 0x0A)
    q.outb(0x71, 0x26)                    # 1024 Hz
    q.outb(0x70, 0x0B)
    q.outb(0x71, 0x42)                    # PIE
    seen = 0
    q.clock_set(10_000_000)               # 100 ms
    while q.now() < 20_000_000:
        if q.intr():
            assert q.ack() == 0x70
            q.outb(0x70, 0x0C)
            assert q.inb(0x71) & 0xC0 == 0xC0
            q.outb(0xA0, 0x20)
            q.outb(0x20, 0x20)
            seen += 1
        q.clock_step()
    assert 100 <= seen <= 104             # 1024 Hz for 100 ms
    assert q.irq_level(8) in (True, False)


def test_qtest_uart_loopback_and_memory():
    from tools.qtest import QTest

    q = QTest.pc()
    q.outb(0x3FC, 0x10)                   # loopback
    q.outb(0x3F8, 0x41)
    assert q.inb(0x3FD) & 1
    assert q.inb(0x3F8) == 0x41
    q.outb(0x3FC, 0x03)
    q.outb(0x3F8, 0x42)
    assert q.serial_output() == b"B"
    q.writel(0x1000, 0xDEADBEEF)
    assert q.readw(0x1002) == 0xDEAD
    assert q.memread(0x1000, 4) == bytes.fromhex("efbeadde")
    with pytest.raises(ValueError):
        q.outb(0x80, 0x100)
    with pytest.raises(ValueError):
        q.clock_set(q.now() - 1)


def test_qtest_physical_accesses_reach_an_mmio_region():
    from tools.qtest import QTest

    class Regs:
        name = "regs"

        def __init__(self) -> None:
            self.mem = bytearray(0x100)
            self.log: list[tuple] = []

        def mmio_read(self, offset: int, size: int) -> int:
            self.log.append(("r", offset, size))
            return int.from_bytes(self.mem[offset:offset + size], "little")

        def mmio_write(self, offset: int, size: int, value: int) -> None:
            self.log.append(("w", offset, size, value))
            self.mem[offset:offset + size] = value.to_bytes(size, "little")

    q = QTest.pc()
    regs = Regs()
    q.m.mmio.register(regs, 0xD000_0000, 0x100)
    q.writel(0xD000_0010, 0xCAFEF00D)
    assert q.readw(0xD000_0012) == 0xCAFE
    assert q.readq(0xD000_0010) == 0xCAFEF00D
    assert regs.log == [("w", 0x10, 4, 0xCAFEF00D), ("r", 0x12, 2), ("r", 0x10, 8)]
    q.writeb(0x3000, 0x77)                # not in a region: RAM
    assert q.memread(0x3000, 1) == b"\x77" and len(regs.log) == 3


def _qtest(tmp_path, text: str, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "s.qtest"
    script.write_text(text)
    return subprocess.run([sys.executable, "-m", "tools.qtest", str(script), *args], capture_output=True,
                          text=True, timeout=60, cwd=str(ROOT), check=False)


ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_qtest_script_mode(tmp_path):
    proc = _qtest(tmp_path, """\
# PIT counter 0 in mode 2 at ~1 kHz, IRQ0 through the 8259
outb 0x21 0xfe
outb 0x43 0x34
outb 0x40 0xa9   # 1193 = 0x04a9
outb 0x40 0x04
intr
expect 1
ack
expect 0x08
outb 0x20 0x20
clock_step 50000
outb 0x43 0xe2   # read-back: status of counter 0 (OUT high mid-period)
inb 0x40
expect 0xb4
writel 0x2000 0x12345678
readb 0x2001
memread 0x2000 2
expect 0x7856
outb 0x3f8 0x68
serial_out
clock_set 250000
irq_level 0
""", "--echo")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    replies = [line for line in proc.stdout.splitlines() if not line.startswith(">")]
    assert replies == ["OK", "OK", "OK", "OK", "OK 1", "OK", "OK 0x08", "OK", "OK", "OK 50000", "OK",
                       "OK 0xb4", "OK", "OK", "OK 0x56", "OK 0x7856", "OK", "OK", "OK 'h'", "OK 250000",
                       "OK 1"]
    assert "> outb 0x40 0xa9" in proc.stdout


@pytest.mark.parametrize("text, line, message", [
    ("outb 0x80 1\nfrobnicate 1\n", 2, "unknown command 'frobnicate'"),
    ("\n\ninb\n", 3, "inb takes 1 argument(s), got 0"),
    ("outb 0x80 0x100\n", 1, "value 0x100 does not fit in 1 byte(s)"),
    ("outw 0x10000 1\n", 1, "port 0x10000 is outside 0..0xffff"),
    ("# ok\nclock_step ten\n", 2, "ticks 'ten' is not a number"),
    ("irq_set 3 2\n", 1, "level '2' must be 0 or 1"),
    ("memread 0x7fffffff 4\n", 1, "is outside the 32 MiB of RAM"),
])
def test_qtest_script_errors_name_the_line(tmp_path, text, line, message):
    proc = _qtest(tmp_path, text)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr
    assert err[0].startswith(f"qtest: {tmp_path / 's.qtest'}:{line}: ")
    assert message in err[0]


def test_qtest_script_failed_expect_exits_1(tmp_path):
    proc = _qtest(tmp_path, "outb 0x80 0x12\ninb 0x80\nexpect 0x13\n")
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == ["OK", "OK 0x12"]
    assert proc.stderr.strip().endswith(":3: expected 0x13, got 0x12")
