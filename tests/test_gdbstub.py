"""The gdb Remote Serial Protocol stub (replay/gdbstub.py) against a FakeTarget:
raw protocol tests over a socket, then real gdb in batch mode.

Everything is bounded: socket timeouts on the raw client, a subprocess timeout
on gdb, and the stub's serving thread is a daemon closed by each fixture.
"""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay.gdbstub import (
    MAX_INCOMING,
    MAX_MEM_READ,
    PACKET_SIZE,
    TARGET_DESCRIPTIONS,
    checksum,
    escape,
    start_gdbstub_thread,
)
from replay.target import SIGINT, DebugTarget, StopEvent, TargetMemoryError

TIMEOUT = 5.0
PAGE = 0x1000

I386_REGS = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "eip", "eflags",
             "cs", "ss", "ds", "es", "fs", "gs", "cr0", "cr2", "cr3", "cr4"]
X64_REGS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)] + [
    "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs", "fs_base", "gs_base",
    "cr0", "cr2", "cr3", "cr4", "cr8", "efer", "k_gs_base"]


# ---------------------------------------------------------------------------
# FakeTarget: a scripted "CPU" with an undo log for reverse execution
# ---------------------------------------------------------------------------

@dataclass
class Insn:
    """What the fake instruction at one address does. Every instruction also
    increments the accumulator (eax/rax), so it doubles as an icount."""
    length: int = 2
    jump: int | None = None
    writes: tuple[tuple[int, bytes], ...] = ()
    reads: tuple[tuple[int, int], ...] = ()
    exit: int | None = None
    end: bool = False                     # the recording ends here (replay-end)


def default_program() -> dict[int, Insn]:
    return {
        0x1008: Insn(writes=((0x2000, (0x11111111).to_bytes(4, "little")),)),
        0x1010: Insn(writes=((0x2000, (0x22222222).to_bytes(4, "little")),)),
        0x1014: Insn(reads=((0x2004, 4),)),
        0x1030: Insn(exit=7),
        0x1040: Insn(jump=0x1040),           # jmp $
    }


@dataclass
class FakeTarget:
    arch: str = "i386"
    supports_reverse: bool = True
    program: dict[int, Insn] = field(default_factory=default_program)
    pc0: int = 0x1000
    calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = I386_REGS if self.arch == "i386" else X64_REGS
        self.pc_name = "eip" if self.arch == "i386" else "rip"
        self.acc = "eax" if self.arch == "i386" else "rax"
        self.regs = {n: 0 for n in names}
        self.regs.update({self.pc_name: self.pc0, "eflags": 0x202, "cs": 0x08, "ss": 0x10, "ds": 0x10,
                          "es": 0x10, "cr0": 0x80000011, "cr3": 0x5000})
        self.regs["esp" if self.arch == "i386" else "rsp"] = 0x3FF0
        if self.arch == "x86-64":
            self.regs.update({"rbx": 0x1122334455667788, "efer": 0x500, "cr4": 0x20,
                              "gs_base": 0xFFFF800000001000})
        self.pages: dict[int, bytearray] = {1: bytearray(b"\x90" * PAGE), 2: bytearray(PAGE),
                                            3: bytearray(PAGE)}
        self.undo: list[tuple[dict[str, int], list[tuple[int, bytes]], Insn]] = []
        self.breakpoints: set[tuple[int, int, int]] = set()
        self.detached = self.killed = False
        self.should_stop_calls = 0
        self.last_physical = False

    # -- state ----------------------------------------------------------
    @property
    def pc(self) -> int:
        return self.regs[self.pc_name]

    def read_registers(self) -> dict[str, int]:
        return dict(self.regs)

    def write_register(self, name: str, value: int) -> None:
        if name not in self.regs:
            raise KeyError(name)
        self.regs[name] = value

    def _check(self, addr: int, length: int) -> None:
        for page in range(addr // PAGE, (addr + max(length, 1) - 1) // PAGE + 1):
            if page not in self.pages:
                raise TargetMemoryError(f"unmapped {page * PAGE:#x}")

    def read_memory(self, addr: int, length: int, physical: bool = False) -> bytes:
        self.last_physical = physical
        self._check(addr, length)
        return bytes(self.pages[(addr + i) // PAGE][(addr + i) % PAGE] for i in range(length))

    def write_memory(self, addr: int, data: bytes, physical: bool = False) -> None:
        self._check(addr, len(data))
        for i, b in enumerate(data):
            self.pages[(addr + i) // PAGE][(addr + i) % PAGE] = b

    # -- breakpoints ------------------------------------------------------
    def add_breakpoint(self, kind: int, addr: int, length: int) -> bool:
        self.calls.append(f"Z{kind},{addr:x},{length}")
        self.breakpoints.add((kind, addr, length))
        return True

    def remove_breakpoint(self, kind: int, addr: int, length: int) -> bool:
        self.calls.append(f"z{kind},{addr:x},{length}")
        self.breakpoints.discard((kind, addr, length))
        return True

    def _bp_here(self) -> StopEvent | None:
        for kind, addr, _ in self.breakpoints:
            if kind in (0, 1) and addr == self.pc:
                return StopEvent("breakpoint", kind=kind)
        return None

    def _watch_hit(self, insn: Insn) -> StopEvent | None:
        for kind, addr, length in self.breakpoints:
            accesses = []
            if kind in (2, 4):
                accesses += [(a, len(d)) for a, d in insn.writes]
            if kind in (3, 4):
                accesses += list(insn.reads)
            for a, n in accesses:
                if a < addr + length and addr < a + n:
                    return StopEvent("watchpoint", kind=kind, addr=max(a, addr))
        return None

    # -- execution --------------------------------------------------------
    def _exec(self) -> StopEvent | None:
        insn = self.program.get(self.pc, Insn())
        if insn.exit is not None:
            return StopEvent("exited", exit_status=insn.exit)
        if insn.end:
            return StopEvent("replay-end")
        old_mem = [(a, self.read_memory(a, len(d))) for a, d in insn.writes]
        self.undo.append((dict(self.regs), old_mem, insn))
        for a, d in insn.writes:
            self.write_memory(a, d)
        self.regs[self.acc] += 1
        self.regs[self.pc_name] = insn.jump if insn.jump is not None else self.pc + insn.length
        return self._watch_hit(insn)

    def _unexec(self) -> StopEvent | None:
        regs, old_mem, insn = self.undo.pop()
        self.regs = regs
        for a, d in old_mem:
            self.write_memory(a, d)
        return self._watch_hit(insn)

    def step(self) -> StopEvent:
        self.calls.append("step")
        return self._exec() or StopEvent("step")

    def resume(self, should_stop: Callable[[], bool]) -> StopEvent:
        self.calls.append("resume")
        n = 0
        while True:
            ev = self._bp_here() or self._exec()
            if ev is not None:
                return ev
            n += 1
            if n % 16 == 0:
                self.should_stop_calls += 1
                if should_stop():
                    return StopEvent("signal", SIGINT)

    def reverse_step(self) -> StopEvent:
        self.calls.append("reverse_step")
        if not self.undo:
            return StopEvent("replay-start")
        return self._unexec() or StopEvent("step")

    def reverse_resume(self, should_stop: Callable[[], bool]) -> StopEvent:
        self.calls.append("reverse_resume")
        n = 0
        while self.undo:
            ev = self._unexec() or self._bp_here()
            if ev is not None:
                return ev
            n += 1
            if n % 16 == 0 and should_stop():
                return StopEvent("signal", SIGINT)
        return StopEvent("replay-start")

    def monitor(self, command: str) -> str:
        self.calls.append(f"monitor {command}")
        if command == "fail":
            raise RuntimeError("monitor exploded")
        if command == "icount":
            return f"icount {len(self.undo)}"
        if command == "big":
            return "x" * 20000
        return f"unknown command: {command}"

    def detach(self) -> None:
        self.detached = True

    def kill(self) -> None:
        self.killed = True


def test_fake_target_is_a_debug_target():
    assert isinstance(FakeTarget(), DebugTarget)


# ---------------------------------------------------------------------------
# A raw RSP client
# ---------------------------------------------------------------------------

class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.settimeout(TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.ack = True

    def close(self) -> None:
        self.sock.close()

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("stub closed the connection")
        self.buf += data

    def read_byte(self) -> bytes:
        while not self.buf:
            self._more()
        b = bytes(self.buf[:1])
        del self.buf[:1]
        return b

    def read_frame(self, ack: bool | None = None) -> bytes:
        """The next $...#xx from the stub (checksum verified, data as sent)."""
        while True:
            start = self.buf.find(b"$")
            end = self.buf.find(b"#", start + 1) if start >= 0 else -1
            if start >= 0 and end >= 0 and len(self.buf) >= end + 3:
                break
            self._more()
        assert bytes(self.buf[:start]) == b"", f"junk before packet: {bytes(self.buf[:start])!r}"
        data = bytes(self.buf[start + 1:end])
        assert int(self.buf[end + 1:end + 3], 16) == checksum(data)
        del self.buf[:end + 3]
        if self.ack if ack is None else ack:
            self.send(b"+")
        return data

    def request(self, payload: str | bytes) -> str:
        """Send a packet, expect '+' (in ack mode) and one reply."""
        self.send_packet(payload)
        return self.read_frame().decode("latin-1")

    def send_packet(self, payload: str | bytes) -> None:
        data = payload.encode("latin-1") if isinstance(payload, str) else payload
        self.send(b"$" + data + b"#%02x" % checksum(data))
        if self.ack:
            assert self.read_byte() == b"+"

    def expect_closed(self) -> None:
        try:
            while True:
                self._more()
        except EOFError:
            return


@pytest.fixture
def target():
    return FakeTarget()


@pytest.fixture
def stub(target):
    s = start_gdbstub_thread(target)
    yield s
    s.close()


@pytest.fixture
def client(stub):
    c = Client(stub.port)
    yield c
    c.close()


def regs_of(reply: str, arch: str = "i386") -> dict[str, int]:
    tdesc = TARGET_DESCRIPTIONS[arch]
    raw = bytes.fromhex(reply)
    out, pos = {}, 0
    for r in tdesc.regs:
        out[r.name] = int.from_bytes(raw[pos:pos + r.size], "little")
        pos += r.size
    assert pos == len(raw)
    return out


def stop_fields(reply: str) -> dict[str, str]:
    assert reply.startswith("T"), reply
    return dict(item.partition(":")[::2] for item in reply[3:].split(";") if item)


# ---------------------------------------------------------------------------
# (a) raw protocol
# ---------------------------------------------------------------------------

def test_framing_checksum_and_initial_stop(client):
    client.send(b"$?#3f")
    assert client.read_byte() == b"+"
    reply = client.read_frame().decode()
    assert reply.startswith("T05")
    assert stop_fields(reply)["thread"] == "01"


def test_bad_checksum_is_nacked_then_resend_works(client):
    client.send(b"$?#00")
    assert client.read_byte() == b"-"
    client.send(b"$?#zz")
    assert client.read_byte() == b"-"
    assert client.request("?").startswith("T05")


def test_noise_between_packets_is_skipped(client):
    client.send(b"garbage+-\x03 ")
    assert client.request("qC") == "QC01"


def test_stub_resends_on_nack(client):
    client.send_packet("qC")
    assert client.read_frame(ack=False) == b"QC01"
    client.send(b"-")
    assert client.read_frame(ack=False) == b"QC01"
    client.send(b"+")
    assert client.request("qAttached") == "1"


def test_no_ack_mode(client):
    assert client.request("QStartNoAckMode") == "OK"
    client.ack = False
    client.send_packet("qC")
    assert client.read_frame() == b"QC01"
    client.send(b"$qC#00")                   # bad checksum: dropped silently in no-ack mode
    client.send_packet("qfThreadInfo")
    assert client.read_frame() == b"m01"
    client.sock.settimeout(0.2)
    with pytest.raises(socket.timeout):
        client.read_byte()                   # no stray acks or replies


def test_qsupported_with_and_without_reverse():
    for reverse in (True, False):
        s = start_gdbstub_thread(FakeTarget(supports_reverse=reverse))
        c = Client(s.port)
        try:
            feats = c.request("qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386").split(";")
            assert f"PacketSize={PACKET_SIZE:x}" in feats
            for f in ("qXfer:features:read+", "swbreak+", "hwbreak+", "QStartNoAckMode+",
                      "vContSupported+"):
                assert f in feats
            assert ("ReverseStep+" in feats) == reverse
            assert ("ReverseContinue+" in feats) == reverse
            if not reverse:
                assert c.request("bs") == ""
                assert c.request("bc") == ""
        finally:
            c.close()
            s.close()


def _read_xml(c: Client, chunk: int) -> bytes:
    out, offset = b"", 0
    while True:
        reply = c.request(f"qXfer:features:read:target.xml:{offset:x},{chunk:x}").encode("latin-1")
        assert reply[:1] in (b"m", b"l")
        body = reply[1:]
        assert b"}" not in body and b"*" not in body       # nothing to escape in our XML
        out += body
        offset += len(body)
        if reply[:1] == b"l":
            return out


@pytest.mark.parametrize("arch", ["i386", "x86-64"])
def test_target_xml(arch):
    s = start_gdbstub_thread(FakeTarget(arch=arch))
    c = Client(s.port)
    try:
        whole = _read_xml(c, 0xFFFF)
        assert whole == _read_xml(c, 0x7B)          # chunked reads agree
        root = ET.fromstring(whole)
        assert root.find("architecture").text == ("i386" if arch == "i386" else "i386:x86-64")
        features = {f.get("name"): [r.get("name") for r in f.findall("reg")] for f in root.findall("feature")}
        core = features["org.gnu.gdb.i386.core"]
        if arch == "i386":
            assert core[:10] == ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "eip", "eflags"]
            assert features["org.vmm.gdb.i386.system"] == ["cr0", "cr2", "cr3", "cr4"]
        else:
            assert core[:8] == ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"]
            assert core[16:18] == ["rip", "eflags"]
            assert features["org.gnu.gdb.i386.segments"] == ["fs_base", "gs_base"]
            assert features["org.vmm.gdb.i386.system"] == ["cr0", "cr2", "cr3", "cr4", "cr8", "efer",
                                                           "k_gs_base"]
        assert c.request("qXfer:features:read:other.xml:0,100") == "E00"
        assert c.request("qXfer:features:read:target.xml:zz,100") == "E00"
        assert c.request("qXfer:features:read:target.xml:100000,100") == "E01"
        assert c.request("qXfer:features:write:target.xml:0:abc") == ""
    finally:
        c.close()
        s.close()


def test_g_and_G(client, target):
    regs = regs_of(client.request("g"))
    assert regs["eip"] == 0x1000 and regs["esp"] == 0x3FF0 and regs["cr0"] == 0x80000011
    assert regs["fctrl"] == 0x37F and regs["mxcsr"] == 0x1F80     # not provided by the target
    tdesc = TARGET_DESCRIPTIONS["i386"]
    raw = bytearray(bytes.fromhex(client.request("g")))
    off = sum(r.size for r in tdesc.regs[:tdesc.index["ebx"]])
    raw[off:off + 4] = (0xDEADBEEF).to_bytes(4, "little")
    assert client.request("G" + raw.hex()) == "OK"
    assert target.regs["ebx"] == 0xDEADBEEF
    assert client.request("G" + raw.hex()[:-2]) == "E01"           # wrong length
    assert client.request("G" + "zz" * tdesc.g_size) == "E01"      # bad hex
    off = sum(r.size for r in tdesc.regs[:tdesc.index["st0"]])
    raw[off] = 1
    assert client.request("G" + raw.hex()) == "E01"                # target has no st0


def test_p_and_P(client, target):
    tdesc = TARGET_DESCRIPTIONS["i386"]
    eip = tdesc.index["eip"]
    assert client.request(f"p{eip:x}") == "00100000"
    assert client.request(f"P{tdesc.index['eax']:x}=78563412") == "OK"
    assert target.regs["eax"] == 0x12345678
    assert client.request(f"p{tdesc.index['cr3']:x}") == "00500000"
    assert client.request(f"p{tdesc.index['st0']:x}") == "00" * 10
    assert client.request("pzz") == "E01"
    assert client.request("p1000") == "E01"
    assert client.request("P0=1234") == "E01"                       # wrong size
    assert client.request(f"P{tdesc.index['st0']:x}=" + "01" * 10) == "E01"


def test_memory_read_write(client, target):
    assert client.request("m1000,4") == "90909090"
    assert client.request("M2000,4:01020304") == "OK"
    assert target.read_memory(0x2000, 4) == b"\x01\x02\x03\x04"
    assert client.request("m2000,4") == "01020304"
    assert client.request("m1ffe,4") == "90900102"                  # across a page boundary
    assert client.request("m100000,4") == "E14"                     # unmapped
    assert client.request("M100000,1:00") == "E14"
    assert client.request("m3ffc,8") == "00000000"                  # readable prefix only
    assert client.request("mzz,4") == "E01"
    assert client.request("m1000") == "E01"
    assert client.request("M2000,4:0102") == "E01"
    assert client.request("M2000,2:zzzz") == "E01"
    assert client.request("m1000,0") == ""
    assert client.request("m3ffffffffffffffff,4") == "E14"


def test_oversized_read_is_capped(client):
    reply = client.request("m1000,100000")
    assert len(reply) <= PACKET_SIZE
    assert len(reply) == 2 * MAX_MEM_READ
    assert reply.startswith("90" * 16)


def test_oversized_incoming_packet_is_refused(client):
    assert client.request("M2000,1:" + "0" * (MAX_INCOMING + 100)) == "E01"
    assert client.request("qC") == "QC01"


def test_binary_write_with_escapes(client, target):
    data = bytes([0x23, 0x24, 0x7D, 0x2A, 0x03, 0x00, 0xFF, 0x41])
    payload = b"X2100,%x:" % len(data) + escape(data)
    assert b"}" in payload
    assert client.request(payload) == "OK"
    assert target.read_memory(0x2100, len(data)) == data
    assert client.request(f"m2100,{len(data):x}") == data.hex()
    assert client.request("X2100,0:") == "OK"                        # gdb's probe
    assert client.request(b"X100000,1:A") == "E14"
    assert client.request(b"X2100,2:A") == "E01"                     # length mismatch
    assert client.request(b"X2100,1:}") == "E01"                     # dangling escape
    assert client.request(b"X2100") == "E01"


def test_breakpoints_and_stop_reasons(client, target):
    client.request("qSupported:swbreak+;hwbreak+")
    assert client.request("Z0,1010,1") == "OK"
    reply = client.request("c")
    f = stop_fields(reply)
    assert reply.startswith("T05") and "swbreak" in f
    assert int.from_bytes(bytes.fromhex(f["08"]), "little") == 0x1010
    assert target.pc == 0x1010
    assert client.request("c") .startswith("T05")                 # breakpoint at PC: hit at once
    assert target.pc == 0x1010
    assert client.request("z0,1010,1") == "OK"
    assert client.request("Z1,1014,1") == "OK"
    assert "hwbreak" in stop_fields(client.request("c"))
    assert client.request("z1,1014,1") == "OK"
    assert client.request("Z3,2004,4") == "OK"
    f = stop_fields(client.request("c"))
    assert f["rwatch"] == "2004" and target.pc == 0x1016
    assert client.request("z3,2004,4") == "OK"
    assert ("Z0", "1010") and "Z0,1010,1" in target.calls
    assert client.request("Z9,1000,1") == ""
    assert client.request("Z0,zz,1") == "E01"
    assert client.request("Z0;1000") == "E01"


def test_write_and_access_watchpoints(client, target):
    assert client.request("Z2,2000,4") == "OK"
    f = stop_fields(client.request("c"))
    assert f["watch"] == "2000" and target.pc == 0x100A
    assert client.request("z2,2000,4") == "OK"
    assert client.request("Z4,2002,2") == "OK"
    f = stop_fields(client.request("c"))
    assert f["awatch"] == "2002" and target.pc == 0x1012


def test_step_and_vcont(client, target):
    assert client.request("vCont?") == "vCont;c;C;s;S"
    assert client.request("s").startswith("T05")
    assert target.pc == 0x1002
    assert client.request("vCont;s:1").startswith("T05")
    assert target.pc == 0x1004
    assert client.request("vCont;S05:01;c").startswith("T05")
    assert target.pc == 0x1006
    assert client.request("vCont;s:p1.1").startswith("T05")
    assert client.request("S05").startswith("T05")
    assert client.request("s100c").startswith("T05")                   # step at an address
    assert target.pc == 0x100E
    assert client.request("vCont;s:2") == "E01"                        # no such thread
    assert client.request("vCont;") == "E01"
    assert client.request("vCont;r1000,2000") == ""
    assert client.request("Z0,1020,1") == "OK"
    assert client.request("vCont;C02") .startswith("T05")              # signal ignored
    assert target.pc == 0x1020
    assert client.request("C05;1022") == "W07"                          # from 0x1022 on to the exit
    assert target.calls.count("step") == 6


def test_exit_reports_w(client, target):
    assert client.request("c") == "W07"
    assert client.request("?") == "W07"
    assert client.request("s") == "W07" and client.request("bc") == "W07"    # nothing left to run
    assert target.calls == ["resume"]


def test_reverse_step_and_continue(client, target):
    client.request("qSupported:swbreak+")
    assert client.request("bs") == client.request("bs")                # at start: nothing to undo
    assert "replaylog" in stop_fields(client.request("bs"))
    assert client.request("Z0,1010,1") == "OK"
    client.request("c")
    client.request("s")
    assert target.pc == 0x1012 and target.read_memory(0x2000, 4) == (0x22222222).to_bytes(4, "little")
    f = stop_fields(client.request("bs"))
    assert "replaylog" not in f and target.pc == 0x1010
    assert target.read_memory(0x2000, 4) == (0x11111111).to_bytes(4, "little")
    assert client.request("z0,1010,1") == "OK"
    assert client.request("Z2,2000,4") == "OK"
    f = stop_fields(client.request("bc"))
    assert f["watch"] == "2000" and target.pc == 0x1008
    assert target.read_memory(0x2000, 4) == bytes(4)
    f = stop_fields(client.request("bc"))
    assert f["replaylog"] == "begin" and target.pc == 0x1000
    assert client.request("z2,2000,4") == "OK"
    client.request("Z0,1004,1")
    client.request("c")
    client.request("s")
    client.request("s")
    assert target.pc == 0x1008
    assert "swbreak" in stop_fields(client.request("bc"))           # going back onto a breakpoint
    assert target.pc == 0x1004


def test_ctrl_c_interrupts_resume():
    target = FakeTarget(pc0=0x1040)                                  # jmp $
    s = start_gdbstub_thread(target)
    c = Client(s.port)
    try:
        c.send_packet("c")
        time.sleep(0.2)
        assert target.pc == 0x1040 and target.should_stop_calls > 0
        c.send(b"\x03")
        reply = c.read_frame().decode()
        assert reply.startswith("T02")
        assert c.request("qC") == "QC01"                              # still serving
        c.send_packet("vCont;c")                                      # and again, 0x03 in the same segment
        c.send(b"\x03")
        assert c.read_frame().decode().startswith("T02")
        target.breakpoints.clear()
        target.undo.clear()
        target.undo.extend([(dict(target.regs), [], Insn())] * 100000)
        c.send_packet("bc")
        c.send(b"\x03")
        assert c.read_frame().decode().startswith("T02")
    finally:
        c.close()
        s.close()


def test_monitor_command(client, target):
    client.send_packet("qRcmd," + b"icount".hex())
    out = client.read_frame()
    assert out.startswith(b"O")
    assert bytes.fromhex(out[1:].decode()) == b"icount 0\n"
    assert client.read_frame() == b"OK"
    client.send_packet("qRcmd," + b"big".hex())
    text = b""
    while (frame := client.read_frame()) != b"OK":
        assert frame.startswith(b"O") and len(frame) <= PACKET_SIZE
        text += bytes.fromhex(frame[1:].decode())
    assert text == b"x" * 20000 + b"\n"
    client.send_packet("qRcmd," + b"fail".hex())
    out = client.read_frame()
    assert b"monitor exploded" in bytes.fromhex(out[1:].decode())
    assert client.read_frame() == b"E01"
    assert client.request("qRcmd,zz") == "E01"
    assert "monitor fail" in target.calls


def test_misc_queries(client, target):
    assert client.request("qAttached") == "1"
    assert client.request("qAttached:1") == "1"
    assert client.request("qC") == "QC01"
    assert client.request("qfThreadInfo") == "m01"
    assert client.request("qsThreadInfo") == "l"
    assert client.request("Hg0") == "OK"
    assert client.request("Hc-1") == "OK"
    assert client.request("T1") == "OK"
    assert client.request("T2") == "E01"
    assert client.request("qOffsets") == "Text=0;Data=0;Bss=0"
    assert client.request("qSymbol::") == "OK"
    assert client.request("vMustReplyEmpty") == ""
    assert client.request("qTStatus") == ""
    assert client.request("!") == ""
    assert client.request("qFooBar") == ""
    assert client.request("") == ""
    assert client.request("\xff\xfe") == "E01"
    assert bytes.fromhex(client.request("qThreadExtraInfo,1")) == b"vCPU 0"
    assert client.request("qqemu.PhyMemMode") == "0"
    assert client.request("Qqemu.PhyMemMode:1") == "OK"
    assert client.request("qqemu.PhyMemMode") == "1"
    assert client.request("m1000,1") == "90" and target.last_physical
    assert client.request("Qqemu.PhyMemMode:0") == "OK"
    assert client.request("m1000,1") == "90" and not target.last_physical
    assert client.request("Qqemu.PhyMemMode:7") == "E01"


def test_detach_then_reconnect(stub, target):
    c = Client(stub.port)
    assert c.request("D") == "OK"
    c.expect_closed()
    c.close()
    assert target.detached
    c = Client(stub.port)
    try:
        assert c.request("qC") == "QC01"
    finally:
        c.close()


def test_kill(stub, target):
    c = Client(stub.port)
    c.send_packet("k")
    c.expect_closed()
    c.close()
    assert target.killed
    stub.thread.join(TIMEOUT)
    assert not stub.thread.is_alive()


def test_client_vanishing_mid_run_is_survived(stub, target):
    target.regs["eip"] = 0x1040
    c = Client(stub.port)
    c.send_packet("c")
    time.sleep(0.05)
    c.close()
    c = Client(stub.port)                      # the stub noticed and serves the next one
    try:
        assert c.request("qC") == "QC01"
    finally:
        c.close()


def test_target_exception_becomes_error_reply(client, target, monkeypatch):
    def boom():
        raise RuntimeError("target bug")
    monkeypatch.setattr(target, "read_registers", boom)
    assert client.request("g") == "E01"
    assert client.request("qC") == "QC01"


SAFE_HEADS = "gGpPmMXZzqQHT?"


def test_fuzzed_packets_always_get_a_reply():
    """Any payload behind a non-executing command letter, after any noise
    between packets, is answered and the stub keeps serving (execution
    packets are left out: with random register writes they may run forever)."""
    s = start_gdbstub_thread(FakeTarget())
    c = Client(s.port)
    c.sock.settimeout(1.0)          # keeps a failing run (and its shrinking) short

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(noise=st.binary(max_size=16).map(lambda b: b.replace(b"$", b"")),
           head=st.sampled_from(SAFE_HEADS),
           body=st.one_of(st.binary(max_size=64),
                          st.text(alphabet="0123456789abcdefxyz,:;=-.", max_size=40).map(str.encode)))
    def check(noise: bytes, head: str, body: bytes) -> None:
        c.send(noise)
        c.send_packet(head.encode() + escape(body))
        while (reply := c.read_frame()).startswith(b"O") and reply != b"OK":   # qRcmd output first
            pass
        assert c.request("qC") == "QC01"

    try:
        check()
    finally:
        c.close()
        s.close()


@dataclass
class TwoVcpuFake(FakeTarget):
    """FakeTarget with a second vCPU (replay.target.VcpuThreads): each vCPU's ebx
    holds 0xB0 + its id; steps and stops note which vCPU they were for."""

    selected: int = 0
    stop_vcpu: int | None = None        # the vCPU a resume's stop names
    runs: list[str] = field(default_factory=list)

    def threads(self) -> list[int]:
        return [0, 1]

    def select(self, vcpu: int) -> None:
        if vcpu not in (0, 1):
            raise ValueError(vcpu)
        self.selected = vcpu

    def thread_info(self, vcpu: int) -> str:
        return f"vCPU {vcpu}, {'halted' if vcpu else 'running'}"

    def read_registers(self) -> dict[str, int]:
        return super().read_registers() | {"ebx": 0xB0 + self.selected}

    def step(self) -> StopEvent:
        self.runs.append(f"step vCPU {self.selected}")
        return super().step()

    def reverse_step(self) -> StopEvent:
        self.runs.append(f"reverse_step vCPU {self.selected}")
        return super().reverse_step()

    def resume(self, should_stop: Callable[[], bool]) -> StopEvent:
        ev = super().resume(should_stop)
        ev.vcpu = self.stop_vcpu
        return ev


def test_vcpus_as_threads():
    target = TwoVcpuFake()
    s = start_gdbstub_thread(target)
    c = Client(s.port)
    try:
        c.request("qSupported:swbreak+")
        assert c.request("qfThreadInfo") == "m01,02" and c.request("qsThreadInfo") == "l"
        assert c.request("qC") == "QC01" and stop_fields(c.request("?"))["thread"] == "01"
        assert c.request("T2") == "OK" and c.request("T3") == "E01" and c.request("T0") == "OK"
        assert bytes.fromhex(c.request("qThreadExtraInfo,2")) == b"vCPU 1, halted"
        assert c.request("qThreadExtraInfo,3") == "E01"
        assert c.request("Hg3") == "E01" and c.request("Hc3") == "E01"
        assert regs_of(c.request("g"))["ebx"] == 0xB0
        assert c.request("Hg2") == "OK" and c.request("qC") == "QC02"
        assert regs_of(c.request("g"))["ebx"] == 0xB1
        assert c.request("p3") == le(0xB1)
        assert c.request("Hg0") == "OK" and c.request("qC") == "QC02"      # "any" keeps the selection
        # vCont names the stepped thread; the stop names it too and selects it
        f = stop_fields(c.request("vCont;s:1;c"))
        assert f["thread"] == "01" and target.runs[-1] == "step vCPU 0" and c.request("qC") == "QC01"
        f = stop_fields(c.request("vCont;S05:2;c"))
        assert f["thread"] == "02" and target.runs[-1] == "step vCPU 1"
        # s and bs step the Hc thread, or the Hg thread when Hc is "any"
        assert c.request("Hc1") == "OK"
        assert stop_fields(c.request("s"))["thread"] == "01" and target.runs[-1] == "step vCPU 0"
        assert c.request("Hg2") == "OK"
        assert stop_fields(c.request("bs"))["thread"] == "01" and target.runs[-1] == "reverse_step vCPU 0"
        assert c.request("Hc0") == "OK" and c.request("Hg2") == "OK"
        assert stop_fields(c.request("bs"))["thread"] == "02" and target.runs[-1] == "reverse_step vCPU 1"
        assert c.request("Hc-1") == "OK" and c.request("Hg1") == "OK"
        assert stop_fields(c.request("vCont;s"))["thread"] == "01" and target.runs[-1] == "step vCPU 0"
        assert c.request("vCont;s:3") == "E01"                              # no such thread
        # a stop made by the other vCPU names it and selects it for g
        target.stop_vcpu = 1
        assert c.request("Z0,1010,1") == "OK"
        f = stop_fields(c.request("vCont;c"))
        assert "swbreak" in f and f["thread"] == "02" and c.request("qC") == "QC02"
        assert regs_of(c.request("g"))["ebx"] == 0xB1
    finally:
        c.close()
        s.close()


def le(value: int, size: int = 4) -> str:
    return value.to_bytes(size, "little").hex()


# ---------------------------------------------------------------------------
# (b) real gdb
# ---------------------------------------------------------------------------

GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed")


def run_gdb(port: int, arch: str, commands: list[str], timeout: float = 30) -> str:
    args = [GDB, "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off",
            "-ex", f"set architecture {arch}", "-ex", f"target remote 127.0.0.1:{port}"]
    for cmd in commands:
        args += ["-ex", cmd]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          check=False)
    return proc.stdout + proc.stderr


def _reg_line(out: str, name: str) -> str:
    m = re.search(rf"^{name}\s+(\S+)\s*(.*)$", out, re.MULTILINE)
    assert m, f"no {name} in gdb output:\n{out}"
    return m.group(1) + " " + m.group(2)


SESSION = [
    "info registers",
    "x/4xb 0x1000",
    "break *0x1010",
    "continue",
    "stepi",
    "print/x $pc",
    "x/xw 0x2000",
    "reverse-stepi",
    "print/x $pc",
    "x/xw 0x2000",
    "watch *(int*)0x2000",
    "reverse-continue",
    "print/x $pc",
    "reverse-continue",
    "print/x $pc",
    "continue",
    "print/x $pc",
    "continue",
    "delete",
    "monitor icount",
    "set var *(unsigned char*)0x2100 = 0x24",
    "x/xb 0x2100",
    "x/xw 0x100000",
    "continue",
]


def _check_session(out: str, pc: str) -> None:
    assert "Remote communication error" not in out and "Protocol error" not in out, out
    assert re.search(r"0x1000:\s+0x90\s+0x90\s+0x90\s+0x90", out), out
    assert "Breakpoint 1 at 0x1010" in out
    assert re.search(r"Breakpoint 1, 0x0+1010 in \?\? \(\)", out), out
    pcs = re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.MULTILINE)[-5:]
    # stepi, reverse-stepi, reverse-continue (watch), reverse-continue (start), continue (watch)
    assert pcs == ["0x1012", "0x1010", "0x1008", "0x1000", "0x100a"], out
    assert re.search(r"0x2000:\s+0x22222222", out) and re.search(r"0x2000:\s+0x11111111", out), out
    assert "Hardware watchpoint 2: *(int*)0x2000" in out
    assert re.search(r"Old value = 286331153\s+New value = 0", out), out     # in reverse
    assert re.search(r"Old value = 0\s+New value = 286331153", out), out     # forward again
    assert "No more reverse-execution history." in out
    assert "icount 8" in out                                  # 0x1000..0x100e executed
    assert re.search(r"0x2100:\s+0x24", out), out
    assert "Cannot access memory at address 0x100000" in out
    assert re.search(r"exited with code 07", out), out
    assert pc in out


@needs_gdb
def test_gdb_i386_session():
    target = FakeTarget(arch="i386")
    s = start_gdbstub_thread(target)
    try:
        out = run_gdb(s.port, "i386", SESSION)
    finally:
        s.close()
    assert _reg_line(out, "eip").startswith("0x1000")
    assert _reg_line(out, "esp").startswith("0x3ff0")
    assert _reg_line(out, "eflags") == "0x202 [ IF ]"
    assert _reg_line(out, "cr0") == "0x80000011 [ PE ET PG ]"
    assert _reg_line(out, "cr3").startswith("0x5000")
    _check_session(out, "eip")
    assert not target.killed


@needs_gdb
def test_gdb_x86_64_session():
    target = FakeTarget(arch="x86-64")
    s = start_gdbstub_thread(target)
    try:
        out = run_gdb(s.port, "i386:x86-64",
                      SESSION[:1] + ["print/x $efer", "print/x $gs_base", "print $cr4"] + SESSION[1:])
    finally:
        s.close()
    assert _reg_line(out, "rip").startswith("0x1000")
    assert _reg_line(out, "rbx").startswith("0x1122334455667788")
    assert _reg_line(out, "cr0") == "0x80000011 [ PE ET PG ]"
    assert _reg_line(out, "efer") == "0x500 [ LME LMA ]"
    assert _reg_line(out, "gs_base") == "0xffff800000001000 18446603336221200384"
    assert _reg_line(out, "k_gs_base").startswith("0x0")
    assert "$1 = 0x500" in out and "$2 = 0xffff800000001000" in out and "$3 = [ PAE ]" in out
    _check_session(out, "rip")


@needs_gdb
def test_gdb_without_reverse_support():
    target = FakeTarget(supports_reverse=False)
    s = start_gdbstub_thread(target)
    try:
        out = run_gdb(s.port, "i386", ["stepi", "print/x $pc", "reverse-stepi"])
    finally:
        s.close()
    assert "$1 = 0x1002" in out
    assert target.detached and not target.killed                 # -batch ends with a detach (qAttached: 1)
    assert "Target remote does not support this command." in out or "does not support" in out, out


@needs_gdb
def test_gdb_interrupt():
    """gdb's own Ctrl-C path: SIGINT to gdb while it waits for a stop."""
    target = FakeTarget(pc0=0x1040)
    s = start_gdbstub_thread(target)
    try:
        args = [GDB, "-nx", "-batch", "-ex", "set pagination off", "-ex", "set architecture i386",
                "-ex", f"target remote 127.0.0.1:{s.port}", "-ex", "continue", "-ex", "print/x $pc"]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while "resume" not in target.calls and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
            proc.send_signal(2)
            out, _ = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        s.close()
    assert "SIGINT" in out, out
    assert "$1 = 0x1040" in out, out


@needs_gdb
def test_gdb_hw_breakpoint_and_read_watchpoints():
    target = FakeTarget()
    s = start_gdbstub_thread(target)
    try:
        out = run_gdb(s.port, "i386", [
            "hbreak *0x1012", "continue", "print/x $pc",
            "rwatch *(int*)0x2004", "continue", "print/x $pc",
            "delete", "awatch *(int*)0x2000", "reverse-continue", "print/x $pc"])
    finally:
        s.close()
    assert "Hardware assisted breakpoint 1 at 0x1012" in out
    assert re.search(r"Breakpoint 1, 0x0+1012 in", out), out
    assert {"Z1,1012,1", "Z3,2004,4", "Z4,2000,4"} <= set(target.calls)
    assert "$1 = 0x1012" in out
    assert re.search(r"Hardware read watchpoint 2: \*\(int\*\)0x2004\s+Value = 0", out), out
    assert "$2 = 0x1016" in out
    assert re.search(r"Hardware access \(read/write\) watchpoint 3: \*\(int\*\)0x2000", out), out
    assert "$3 = 0x1010" in out, out


@needs_gdb
def test_gdb_replay_end_keeps_the_session():
    target = FakeTarget()
    target.program[0x1020] = Insn(end=True)
    s = start_gdbstub_thread(target)
    try:
        out = run_gdb(s.port, "i386", ["continue", "print/x $pc", "reverse-stepi", "print/x $pc",
                                       "continue", "print/x $pc"])
    finally:
        s.close()
    assert out.count("No more reverse-execution history.") == 2, out
    assert "$1 = 0x1020" in out and "$2 = 0x101e" in out and "$3 = 0x1020" in out, out
    assert target.detached
