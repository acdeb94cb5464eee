"""A gdb Remote Serial Protocol stub over TCP (GDB manual, appendix E "Remote
Protocol": E.1 Overview for framing/acks/escapes, E.3 Stop Reply Packets,
E.4 General Query Packets, E.11 Interrupts, E.12 Packet Acknowledgment,
G.2-G.4 Target Description Format).

One connection at a time, all-stop. Everything about the machine goes
through a `replay.target.DebugTarget`; the stub only ever touches the target
from the thread that serves the connection. Each vCPU is a thread (thread id
= vCPU id + 1) when the target offers `replay.target.VcpuThreads`; a target
without it is thread 1 alone.

Threads, as gdb drives them in all-stop mode (E.3, E.4, and "Packets": H, T,
vCont): `Hg` selects the vCPU whose registers and memory g/G/p/P/m/M/X
access; `Hc` (or a vCont action's thread) the vCPU a step applies to, and
reverse steps `bs` take the Hc thread, or the Hg thread when Hc is "any".
Continuing runs every vCPU; a stop reply names the vCPU the stop is about
(`thread:N`), and the stub selects it for both, as gdb assumes.

    stub = GdbStub(target, port=1234)
    stub.serve_forever()          # or: stub = start_gdbstub_thread(target)

Supported: $..#xx framing with +/- acks and QStartNoAckMode, '}' escapes
(binary X writes in, qXfer/any reply out), qSupported, target.xml through
qXfer:features:read (i386 / x86-64 with x87, SSE, segment bases and a system
feature with control registers), ?, g/G, p/P, m/M/X, Z0-Z4/z0-z4, s/c (with
an address), vCont (c/C/s/S per thread; signals ignored), bs/bc, Ctrl-C
while running, D, k, qRcmd, qAttached, qC, qfThreadInfo/qsThreadInfo,
qThreadExtraInfo, Hg/Hc, T, qOffsets, qSymbol, vMustReplyEmpty, and QEMU's
Qqemu.PhyMemMode (physical addressing for m/M/X). Anything else gets the
empty reply ("not supported").
"""
from __future__ import annotations

import logging
import select
import socket
import threading
import time
from dataclasses import dataclass

from replay.target import (
    BP_HARDWARE,
    SIGINT,
    SIGTRAP,
    WATCH_ACCESS,
    WATCH_READ,
    WATCH_WRITE,
    DebugTarget,
    StopEvent,
    TargetMemoryError,
    VcpuThreads,
)

log = logging.getLogger(__name__)

PACKET_SIZE = 0x4000          # advertised: the largest packet either side sends
MAX_MEM_READ = PACKET_SIZE // 2   # bytes per m reply (two hex digits each)
MAX_INCOMING = PACKET_SIZE * 2    # a longer packet is drained and answered E01
ACK_RETRIES = 8
INTERRUPT_POLL_S = 0.01       # should_stop() looks at the socket at most this often
PAGE = 0x1000

E_MALFORMED = "E01"
E_FAULT = "E14"               # EFAULT

_ESCAPED = frozenset(b"#$}*")
OVERSIZED = b"\x00<oversized packet>"   # what read_packet returns for a drained, too-long packet


# ---------------------------------------------------------------------------
# Target descriptions
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Reg:
    name: str
    bits: int
    type: str
    group: str | None = None

    @property
    def size(self) -> int:
        return self.bits // 8


def _x87() -> list[Reg]:
    regs = [Reg(f"st{i}", 80, "i387_ext") for i in range(8)]
    regs += [Reg(n, 32, "int", "float")
             for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")]
    return regs


_EFLAGS_TYPE = """  <flags id="i386_eflags" size="4">
    <field name="CF" start="0" end="0"/>
    <field name="" start="1" end="1"/>
    <field name="PF" start="2" end="2"/>
    <field name="AF" start="4" end="4"/>
    <field name="ZF" start="6" end="6"/>
    <field name="SF" start="7" end="7"/>
    <field name="TF" start="8" end="8"/>
    <field name="IF" start="9" end="9"/>
    <field name="DF" start="10" end="10"/>
    <field name="OF" start="11" end="11"/>
    <field name="NT" start="14" end="14"/>
    <field name="RF" start="16" end="16"/>
    <field name="VM" start="17" end="17"/>
    <field name="AC" start="18" end="18"/>
    <field name="VIF" start="19" end="19"/>
    <field name="VIP" start="20" end="20"/>
    <field name="ID" start="21" end="21"/>
  </flags>
"""

_SSE_TYPES = """  <vector id="v4f" type="ieee_single" count="4"/>
  <vector id="v2d" type="ieee_double" count="2"/>
  <vector id="v16i8" type="int8" count="16"/>
  <vector id="v8i16" type="int16" count="8"/>
  <vector id="v4i32" type="int32" count="4"/>
  <vector id="v2i64" type="int64" count="2"/>
  <union id="vec128">
    <field name="v4_float" type="v4f"/>
    <field name="v2_double" type="v2d"/>
    <field name="v16_int8" type="v16i8"/>
    <field name="v8_int16" type="v8i16"/>
    <field name="v4_int32" type="v4i32"/>
    <field name="v2_int64" type="v2i64"/>
    <field name="uint128" type="uint128"/>
  </union>
  <flags id="i386_mxcsr" size="4">
    <field name="IE" start="0" end="0"/>
    <field name="DE" start="1" end="1"/>
    <field name="ZE" start="2" end="2"/>
    <field name="OE" start="3" end="3"/>
    <field name="UE" start="4" end="4"/>
    <field name="PE" start="5" end="5"/>
    <field name="DAZ" start="6" end="6"/>
    <field name="IM" start="7" end="7"/>
    <field name="DM" start="8" end="8"/>
    <field name="ZM" start="9" end="9"/>
    <field name="OM" start="10" end="10"/>
    <field name="UM" start="11" end="11"/>
    <field name="PM" start="12" end="12"/>
    <field name="FZ" start="15" end="15"/>
  </flags>
"""

_CR0_BITS = [("PE", 0), ("MP", 1), ("EM", 2), ("TS", 3), ("ET", 4), ("NE", 5), ("WP", 16),
             ("AM", 18), ("NW", 29), ("CD", 30), ("PG", 31)]
_CR4_BITS = [("VME", 0), ("PVI", 1), ("TSD", 2), ("DE", 3), ("PSE", 4), ("PAE", 5), ("MCE", 6),
             ("PGE", 7), ("PCE", 8), ("OSFXSR", 9), ("OSXMMEXCPT", 10), ("UMIP", 11),
             ("LA57", 12), ("VMXE", 13), ("SMXE", 14), ("FSGSBASE", 16), ("PCIDE", 17),
             ("OSXSAVE", 18), ("SMEP", 20), ("SMAP", 21), ("PKE", 22)]
_EFER_BITS = [("SCE", 0), ("LME", 8), ("LMA", 10), ("NXE", 11), ("SVME", 12), ("LMSLE", 13),
              ("FFXSR", 14), ("TCE", 15)]


def _flags_xml(type_id: str, size: int, bits: list[tuple[str, int]]) -> str:
    fields = "".join(f'    <field name="{n}" start="{b}" end="{b}"/>\n' for n, b in bits)
    return f'  <flags id="{type_id}" size="{size}">\n{fields}  </flags>\n'


@dataclass(frozen=True)
class Feature:
    name: str
    types: str
    regs: tuple[Reg, ...]


class TargetDescription:
    """The registers of one architecture, in remote-protocol order (their
    index is the number p/P use and the order of the g packet)."""

    def __init__(self, arch: str, architecture: str, features: list[Feature],
                 pc: str, sp: str, fp: str) -> None:
        self.arch = arch
        self.architecture = architecture
        self.features = features
        self.regs: list[Reg] = [r for f in features for r in f.regs]
        self.index = {r.name: i for i, r in enumerate(self.regs)}
        self.pc, self.sp, self.fp = pc, sp, fp
        self.g_size = sum(r.size for r in self.regs)
        self.xml = self._xml().encode()

    def _xml(self) -> str:
        out = ['<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n<target version="1.0">\n',
               f"  <architecture>{self.architecture}</architecture>\n"]
        for f in self.features:
            out.append(f'  <feature name="{f.name}">\n')
            out.extend("  " + line for line in f.types.splitlines(True))
            for r in f.regs:
                group = f' group="{r.group}"' if r.group else ""
                out.append(f'    <reg name="{r.name}" bitsize="{r.bits}" type="{r.type}"{group}/>\n')
            out.append("  </feature>\n")
        out.append("</target>\n")
        return "".join(out)


def _i386() -> TargetDescription:
    gp = [Reg(n, 32, "int32") for n in ("eax", "ecx", "edx", "ebx")]
    gp += [Reg("esp", 32, "data_ptr"), Reg("ebp", 32, "data_ptr")]
    gp += [Reg(n, 32, "int32") for n in ("esi", "edi")]
    gp += [Reg("eip", 32, "code_ptr"), Reg("eflags", 32, "i386_eflags")]
    gp += [Reg(n, 32, "int32") for n in ("cs", "ss", "ds", "es", "fs", "gs")]
    core = Feature("org.gnu.gdb.i386.core", _EFLAGS_TYPE, tuple(gp + _x87()))
    sse = Feature("org.gnu.gdb.i386.sse", _SSE_TYPES,
                  tuple([Reg(f"xmm{i}", 128, "vec128") for i in range(8)]
                        + [Reg("mxcsr", 32, "i386_mxcsr", "vector")]))
    system = Feature("org.vmm.gdb.i386.system",
                     _flags_xml("i386_cr0", 4, _CR0_BITS) + _flags_xml("i386_cr4", 4, _CR4_BITS),
                     (Reg("cr0", 32, "i386_cr0"), Reg("cr2", 32, "uint32"),
                      Reg("cr3", 32, "uint32"), Reg("cr4", 32, "i386_cr4")))
    return TargetDescription("i386", "i386", [core, sse, system], "eip", "esp", "ebp")


def _x86_64() -> TargetDescription:
    gp = [Reg(n, 64, "int64") for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi")]
    gp += [Reg("rbp", 64, "data_ptr"), Reg("rsp", 64, "data_ptr")]
    gp += [Reg(f"r{i}", 64, "int64") for i in range(8, 16)]
    gp += [Reg("rip", 64, "code_ptr"), Reg("eflags", 32, "i386_eflags")]
    gp += [Reg(n, 32, "int32") for n in ("cs", "ss", "ds", "es", "fs", "gs")]
    core = Feature("org.gnu.gdb.i386.core", _EFLAGS_TYPE, tuple(gp + _x87()))
    sse = Feature("org.gnu.gdb.i386.sse", _SSE_TYPES,
                  tuple([Reg(f"xmm{i}", 128, "vec128") for i in range(16)]
                        + [Reg("mxcsr", 32, "i386_mxcsr", "vector")]))
    segments = Feature("org.gnu.gdb.i386.segments", "",
                       (Reg("fs_base", 64, "uint64"), Reg("gs_base", 64, "uint64")))
    system = Feature("org.vmm.gdb.i386.system",
                     _flags_xml("i386_cr0", 8, _CR0_BITS) + _flags_xml("i386_cr4", 8, _CR4_BITS)
                     + _flags_xml("i386_efer", 8, _EFER_BITS),
                     (Reg("cr0", 64, "i386_cr0"), Reg("cr2", 64, "uint64"),
                      Reg("cr3", 64, "uint64"), Reg("cr4", 64, "i386_cr4"),
                      Reg("cr8", 64, "uint64"), Reg("efer", 64, "i386_efer"),
                      Reg("k_gs_base", 64, "uint64")))
    return TargetDescription("x86-64", "i386:x86-64", [core, sse, segments, system],
                             "rip", "rsp", "rbp")


TARGET_DESCRIPTIONS: dict[str, TargetDescription] = {"i386": _i386(), "x86-64": _x86_64()}

# what a register the target leaves out reads as
_DEFAULTS = {"fctrl": 0x37F, "ftag": 0xFFFF, "mxcsr": 0x1F80}


# ---------------------------------------------------------------------------
# Encoding helpers
# ---------------------------------------------------------------------------

def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    """Binary-data escaping (E.1): '#', '$', '}' and '*' become '}' + (c ^ 0x20)."""
    out = bytearray()
    for b in data:
        if b in _ESCAPED:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                raise ValueError("escape at end of packet")
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def frame(data: bytes) -> bytes:
    return b"$" + data + b"#%02x" % checksum(data)


def le_hex(value: int, size: int) -> str:
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little").hex()


def _parse_hex(text: str) -> int:
    if not text or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ValueError(f"bad hex {text!r}")
    return int(text, 16)


class _Malformed(Exception):
    pass


class _Disconnect(Exception):
    """The connection ends (peer gone, detach, kill)."""


# ---------------------------------------------------------------------------
# One connection
# ---------------------------------------------------------------------------

class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False
        self.no_ack = False
        self.interrupt_pending = False
        self._last_poll = 0.0

    # -- raw bytes --------------------------------------------------------
    def _fill(self, timeout: float | None) -> bool:
        """Read what is available (waiting up to timeout; None = forever).
        False at EOF or when nothing arrived in time."""
        if self.eof:
            return False
        if timeout is not None:
            try:
                ready, _, _ = select.select([self.sock], [], [], timeout)
            except (OSError, ValueError):
                self.eof = True
                return False
            if not ready:
                return False
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self.eof = True
            raise _Disconnect() from exc

    # -- packets ----------------------------------------------------------
    def read_packet(self) -> bytes:
        """The next well-formed packet's data (still escaped). Acks it,
        nacks bad checksums, skips noise; a 0x03 outside a packet is noted
        as a pending interrupt."""
        while True:
            start = self._scan_to_dollar()
            if start is None:
                if not self._fill(None):
                    raise _Disconnect()
                continue
            hash_at = self.buf.find(b"#", start + 1)
            if hash_at < 0 or len(self.buf) < hash_at + 3:
                if hash_at < 0 and len(self.buf) - start > MAX_INCOMING + 3:
                    self._drain_oversized(start)
                    self._ack(True)
                    return OVERSIZED
                if not self._fill(None):
                    raise _Disconnect()
                continue
            data = bytes(self.buf[start + 1:hash_at])
            cs_text = bytes(self.buf[hash_at + 1:hash_at + 3])
            del self.buf[:hash_at + 3]
            try:
                ok = int(cs_text, 16) == checksum(data)
            except ValueError:
                ok = False
            if not ok:
                log.debug("gdbstub: bad checksum on %r", data[:40])
                self._ack(False)
                continue
            self._ack(True)
            return data

    def _drain_oversized(self, start: int) -> None:
        del self.buf[:start]
        self.buf.clear()
        while True:
            if not self._fill(None):
                raise _Disconnect()
            at = self.buf.find(b"#")
            if at >= 0:
                while len(self.buf) < at + 3:
                    if not self._fill(None):
                        raise _Disconnect()
                del self.buf[:at + 3]
                return
            self.buf.clear()

    def _scan_to_dollar(self) -> int | None:
        """Drop bytes before the next '$' (noting 0x03), return its index."""
        at = self.buf.find(b"$")
        junk = self.buf if at < 0 else self.buf[:at]
        if 0x03 in junk:
            self.interrupt_pending = True
        if at < 0:
            self.buf.clear()
            return None
        if at:
            del self.buf[:at]
        return 0

    def _ack(self, good: bool) -> None:
        if not self.no_ack:
            self.send_raw(b"+" if good else b"-")

    def send_packet(self, payload: str | bytes) -> None:
        data = payload.encode("latin-1") if isinstance(payload, str) else payload
        packet = frame(data)
        self.send_raw(packet)
        if self.no_ack:
            return
        for _ in range(ACK_RETRIES):
            ack = self._wait_ack()
            if ack != b"-":
                return
            self.send_raw(packet)
        log.warning("gdbstub: packet nacked %d times, giving up on it", ACK_RETRIES)

    def _wait_ack(self) -> bytes:
        while True:
            for i, b in enumerate(self.buf):
                if b in b"+-":
                    del self.buf[:i + 1]
                    return bytes((b,))
                if b == 0x24:  # '$': the peer went on without acking
                    del self.buf[:i]
                    return b"+"
                if b == 0x03:
                    self.interrupt_pending = True
            self.buf.clear()
            if not self._fill(None):
                raise _Disconnect()

    # -- while the target runs -------------------------------------------
    def poll_interrupt(self) -> bool:
        """True once gdb sent Ctrl-C (0x03) or went away. Cheap to call often."""
        if self.interrupt_pending or self.eof:
            return True
        now = time.monotonic()
        if now - self._last_poll < INTERRUPT_POLL_S:
            return False
        self._last_poll = now
        while self._fill(0):
            pass
        at = self.buf.find(b"$")
        head = self.buf if at < 0 else self.buf[:at]
        idx = head.find(b"\x03")
        if idx >= 0:
            del self.buf[idx]
            self.interrupt_pending = True
        return self.interrupt_pending or self.eof


# ---------------------------------------------------------------------------
# The stub
# ---------------------------------------------------------------------------

class GdbStub:
    """Serves gdb for one DebugTarget on a TCP port (one connection at a time)."""

    def __init__(self, target: DebugTarget, host: str = "127.0.0.1", port: int = 0) -> None:
        if target.arch not in TARGET_DESCRIPTIONS:
            raise ValueError(f"unsupported architecture {target.arch!r}")
        self.target = target
        self.tdesc = TARGET_DESCRIPTIONS[target.arch]
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(1)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._conn: _Connection | None = None
        self._lock = threading.Lock()
        self.killed = False
        self.exited: StopEvent | None = None
        self.thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------
    def serve_forever(self) -> None:
        """Serve connections one after another until close() or a kill."""
        while not self._closed.is_set() and not self.killed:
            if not self.serve_one():
                break

    def serve_one(self) -> bool:
        """Wait for one connection and serve it to its end. False if the stub
        was closed before anyone connected."""
        sock = self._accept()
        if sock is None:
            return False
        conn = _Connection(sock)
        with self._lock:
            self._conn = conn
        try:
            self._session(conn)
        finally:
            with self._lock:
                self._conn = None
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        return True

    def close(self) -> None:
        """Stop serving: closes the listener and any live connection."""
        self._closed.set()
        with self._lock:
            conn = self._conn
        if conn is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self._listener.close()
        except OSError:
            pass
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)

    def _accept(self) -> socket.socket | None:
        while not self._closed.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.1)
            except (OSError, ValueError):
                return None
            if not ready:
                continue
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        return None

    # -- one session ------------------------------------------------------
    def _session(self, conn: _Connection) -> None:
        self._gdb_features: set[str] = set()
        self._physical = False
        self._end_session = False
        self._g = getattr(self.target, "selected", 0) if self._threaded else 0
        self._c: int | None = None
        while not self._closed.is_set():
            try:
                data = conn.read_packet()
            except _Disconnect:
                return
            conn.interrupt_pending = False  # a stray Ctrl-C while halted means nothing
            try:
                reply = self._dispatch(conn, data)
            except _Disconnect:
                return
            except _Malformed as exc:
                log.debug("gdbstub: malformed %r: %s", data[:60], exc)
                reply = E_MALFORMED
            except Exception:  # a target bug must not take the debugger down
                log.exception("gdbstub: error handling %r", data[:60])
                reply = E_MALFORMED
            if reply is not None:
                try:
                    conn.send_packet(reply)
                except _Disconnect:
                    return
            if data == b"QStartNoAckMode":
                conn.no_ack = True
            if self._end_session:
                return

    def _dispatch(self, conn: _Connection, data: bytes) -> str | bytes | None:
        """The reply to one packet (None: no reply)."""
        self._end_session = False
        if data is OVERSIZED:
            return E_MALFORMED
        if data[:1] == b"X":
            return self._write_binary(data)
        try:
            pkt = data.decode("ascii")
        except UnicodeDecodeError as exc:
            raise _Malformed("non-ASCII packet") from exc
        if not pkt:
            return ""
        head, rest = pkt[0], pkt[1:]
        if head == "?":
            return self._initial_stop()
        if head == "g":
            return self._read_all_registers()
        if head == "G":
            return self._write_all_registers(rest)
        if head == "p":
            return self._read_register(rest)
        if head == "P":
            return self._write_register(rest)
        if head == "m":
            return self._read_memory(rest)
        if head == "M":
            return self._write_memory(rest)
        if head in "Zz" and rest[:1] in ("0", "1", "2", "3", "4") and len(rest) > 1:
            return self._breakpoint(head == "Z", rest)
        if head in "sc" and (not rest or rest[0] != ";"):
            return self._resume(conn, step=head == "s", addr=rest)
        if head in "SC":
            # S sig[;addr] / C sig[;addr]: the signal is not delivered
            _, _, addr = rest.partition(";")
            return self._resume(conn, step=head == "S", addr=addr)
        if pkt == "bs" or pkt == "bc":
            if not self.target.supports_reverse:
                return ""
            return self._reverse(conn, step=pkt == "bs")
        if head == "D":
            self.target.detach()
            self._end_session = True
            return "OK"
        if pkt == "k":
            self._kill()
            return None
        if head == "H":
            return self._set_thread(rest)
        if head == "T":
            return "OK" if self._thread_vcpu(rest) is not None else "E01"
        if head == "v":
            return self._v_packet(conn, pkt)
        if head == "q":
            return self._query(conn, pkt)
        if head == "Q":
            return self._set(pkt)
        return ""

    # -- queries ----------------------------------------------------------
    def _query(self, conn: _Connection, pkt: str) -> str | bytes:
        name, _, args = pkt.partition(":")
        if name == "qSupported":
            self._gdb_features = {f[:-1] for f in args.split(";") if f.endswith("+")}
            feats = [f"PacketSize={PACKET_SIZE:x}", "qXfer:features:read+", "swbreak+", "hwbreak+",
                     "QStartNoAckMode+", "vContSupported+"]
            if self.target.supports_reverse:
                feats += ["ReverseStep+", "ReverseContinue+"]
            return ";".join(feats)
        if name == "qXfer":
            return self._xfer(args)
        if pkt.startswith("qRcmd,"):
            return self._monitor(conn, pkt[6:])
        if pkt == "qAttached" or pkt.startswith("qAttached:"):
            return "1"
        if pkt == "qC":
            return f"QC{self._tid(self._g)}"
        if pkt == "qfThreadInfo":
            return "m" + ",".join(self._tid(v) for v in self._vcpus())
        if pkt == "qsThreadInfo":
            return "l"
        if pkt.startswith("qThreadExtraInfo,"):
            vcpu = self._thread_vcpu(pkt.partition(",")[2])
            if vcpu is None or vcpu < 0:
                return "E01"
            info = self.target.thread_info(vcpu) if self._threaded else f"vCPU {vcpu}"
            return info.encode().hex()
        if pkt == "qOffsets":
            return "Text=0;Data=0;Bss=0"
        if name == "qSymbol":
            return "OK"
        if pkt == "qqemu.PhyMemMode":
            return "1" if self._physical else "0"
        return ""

    def _set(self, pkt: str) -> str:
        if pkt == "QStartNoAckMode":
            return "OK"
        if pkt.startswith("Qqemu.PhyMemMode:"):
            value = pkt.partition(":")[2]
            if value not in ("0", "1"):
                raise _Malformed(pkt)
            self._physical = value == "1"
            return "OK"
        return ""

    def _xfer(self, args: str) -> str | bytes:
        # qXfer:features:read:ANNEX:OFFSET,LENGTH
        parts = args.split(":")
        if len(parts) != 4 or parts[0] != "features" or parts[1] != "read":
            return ""
        if parts[2] != "target.xml":
            return "E00"
        off_text, _, len_text = parts[3].partition(",")
        try:
            offset, length = _parse_hex(off_text), _parse_hex(len_text)
        except ValueError:
            return "E00"
        xml = self.tdesc.xml
        if offset > len(xml):
            return "E01"
        length = min(length, PACKET_SIZE - 64)
        chunk = xml[offset:offset + length]
        more = offset + len(chunk) < len(xml)
        return (b"m" if more else b"l") + escape(chunk)

    def _monitor(self, conn: _Connection, hex_cmd: str) -> str:
        try:
            command = bytes.fromhex(hex_cmd).decode("utf-8", "replace")
        except ValueError as exc:
            raise _Malformed("bad hex in qRcmd") from exc
        try:
            output = self.target.monitor(command)
        except Exception as exc:  # the message is more use to the user than a traceback
            log.exception("gdbstub: monitor %r", command)
            self._console(conn, f"monitor: {type(exc).__name__}: {exc}\n")
            return "E01"
        if output:
            self._console(conn, output if output.endswith("\n") else output + "\n")
        return "OK"

    def _console(self, conn: _Connection, text: str) -> None:
        data = text.encode("utf-8", "replace")
        step = (PACKET_SIZE - 2) // 2
        for i in range(0, len(data), step):
            conn.send_packet("O" + data[i:i + step].hex())

    # -- v packets ---------------------------------------------------------
    def _v_packet(self, conn: _Connection, pkt: str) -> str | bytes | None:
        if pkt == "vCont?":
            return "vCont;c;C;s;S"
        if pkt.startswith("vCont;"):
            # all-stop: one stop for everything; a thread that is told to step is
            # the stepped vCPU, every other vCPU runs as the schedule says
            step_vcpu: int | None = None
            step = cont = False
            for item in pkt[6:].split(";"):
                action, _, thread = item.partition(":")
                if not action:
                    raise _Malformed(pkt)
                vcpu = self._thread_vcpu(thread) if thread else -1
                if vcpu is None:
                    continue          # a thread that does not exist
                if action[0] in "sS":
                    if not step:
                        step, step_vcpu = True, vcpu
                elif action[0] in "cC":
                    cont = True
                else:
                    return ""
            if not (step or cont):
                return "E01"
            if step:
                return self._resume(conn, step=True, addr="", vcpu=step_vcpu if step_vcpu >= 0 else None)
            return self._resume(conn, step=False, addr="")
        if pkt == "vMustReplyEmpty":
            return ""
        if pkt.startswith("vKill"):
            self._kill()
            return "OK"
        return ""

    # -- threads (vCPUs) -----------------------------------------------------
    @property
    def _threaded(self) -> bool:
        return isinstance(self.target, VcpuThreads)

    def _vcpus(self) -> list[int]:
        return list(self.target.threads()) if self._threaded else [0]

    @staticmethod
    def _tid(vcpu: int) -> str:
        return f"{vcpu + 1:02x}"

    def _thread_vcpu(self, text: str) -> int | None:
        """The vCPU of a thread id (-1 for "all" or "any"; None: no such thread)."""
        if text.startswith("p"):
            text = text.partition(".")[2] or "-1"
        if text in ("-1", "0", ""):
            return -1
        try:
            vcpu = _parse_hex(text) - 1
        except ValueError:
            return None
        return vcpu if vcpu in self._vcpus() else None

    def _select(self, vcpu: int) -> None:
        self._g = vcpu
        if self._threaded:
            self.target.select(vcpu)

    def _set_thread(self, text: str) -> str:
        op, tid = text[:1], text[1:]
        vcpu = self._thread_vcpu(tid)
        if vcpu is None:
            return "E01"
        if op == "g" and vcpu >= 0:
            self._select(vcpu)
        elif op == "c":
            self._c = vcpu if vcpu >= 0 else None
        return "OK"

    def _run_vcpu(self, vcpu: int | None = None) -> int:
        """The vCPU a step applies to: the one named, else the Hc thread, else the Hg one."""
        if vcpu is None:
            vcpu = self._c if self._c is not None else self._g
        return vcpu

    # -- registers --------------------------------------------------------
    def _register_values(self) -> list[int]:
        values = self.target.read_registers()
        return [values.get(r.name, _DEFAULTS.get(r.name, 0)) for r in self.tdesc.regs]

    def _read_all_registers(self) -> str:
        values = self._register_values()
        return "".join(le_hex(v, r.size) for r, v in zip(self.tdesc.regs, values))

    def _write_all_registers(self, text: str) -> str:
        if len(text) != 2 * self.tdesc.g_size:
            raise _Malformed(f"G with {len(text)} hex digits, want {2 * self.tdesc.g_size}")
        raw = self._unhex(text)
        current = self._register_values()
        pos = 0
        for r, old in zip(self.tdesc.regs, current):
            value = int.from_bytes(raw[pos:pos + r.size], "little")
            pos += r.size
            if value != old & ((1 << r.bits) - 1):
                try:
                    self.target.write_register(r.name, value)
                except (KeyError, ValueError):
                    return "E01"
        return "OK"

    def _reg_number(self, text: str) -> int:
        try:
            n = _parse_hex(text)
        except ValueError as exc:
            raise _Malformed(str(exc)) from exc
        if n >= len(self.tdesc.regs):
            raise _Malformed(f"no register {n}")
        return n

    def _read_register(self, text: str) -> str:
        n = self._reg_number(text)
        reg = self.tdesc.regs[n]
        value = self.target.read_registers().get(reg.name, _DEFAULTS.get(reg.name, 0))
        return le_hex(value, reg.size)

    def _write_register(self, text: str) -> str:
        num, sep, value_hex = text.partition("=")
        n = self._reg_number(num)
        reg = self.tdesc.regs[n]
        if not sep or len(value_hex) != 2 * reg.size:
            raise _Malformed(f"P{text}")
        value = int.from_bytes(self._unhex(value_hex), "little")
        try:
            self.target.write_register(reg.name, value)
        except (KeyError, ValueError):
            return "E01"
        return "OK"

    @staticmethod
    def _unhex(text: str) -> bytes:
        try:
            return bytes.fromhex(text)
        except ValueError as exc:
            raise _Malformed("bad hex") from exc

    # -- memory -----------------------------------------------------------
    @staticmethod
    def _addr_len(text: str) -> tuple[int, int]:
        addr_text, sep, len_text = text.partition(",")
        if not sep:
            raise _Malformed("missing ','")
        try:
            return _parse_hex(addr_text), _parse_hex(len_text)
        except ValueError as exc:
            raise _Malformed(str(exc)) from exc

    def _read_memory(self, text: str) -> str:
        addr, length = self._addr_len(text)
        length = min(length, MAX_MEM_READ)
        if length == 0:
            return ""
        try:
            return self.target.read_memory(addr, length, self._physical).hex()
        except TargetMemoryError:
            pass
        # a partial read is allowed: answer with the readable prefix
        data = bytearray()
        while len(data) < length:
            cur = addr + len(data)
            chunk = min(length - len(data), PAGE - (cur % PAGE))
            try:
                data += self.target.read_memory(cur, chunk, self._physical)
            except TargetMemoryError:
                break
        return data.hex() if data else E_FAULT

    def _write_memory(self, text: str) -> str:
        spec, sep, hex_data = text.partition(":")
        if not sep:
            raise _Malformed("missing ':'")
        addr, length = self._addr_len(spec)
        data = self._unhex(hex_data)
        if len(data) != length:
            raise _Malformed("length mismatch")
        return self._store(addr, data)

    def _write_binary(self, data: bytes) -> str:
        spec, sep, payload = data[1:].partition(b":")
        if not sep:
            raise _Malformed("missing ':'")
        try:
            addr, length = self._addr_len(spec.decode("ascii"))
            raw = unescape(payload)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Malformed(str(exc)) from exc
        if len(raw) != length:
            raise _Malformed("length mismatch")
        return self._store(addr, raw)

    def _store(self, addr: int, data: bytes) -> str:
        if not data:
            return "OK"
        try:
            self.target.write_memory(addr, data, self._physical)
        except TargetMemoryError:
            return E_FAULT
        return "OK"

    # -- breakpoints ------------------------------------------------------
    def _breakpoint(self, insert: bool, text: str) -> str:
        kind = int(text[0])
        if text[1] != ",":
            raise _Malformed("Z/z syntax")
        spec = text[2:].split(";", 1)[0]    # conditions/commands are not advertised
        addr, length = self._addr_len(spec)
        try:
            if insert:
                ok = self.target.add_breakpoint(kind, addr, length)
            else:
                ok = self.target.remove_breakpoint(kind, addr, length)
        except NotImplementedError:
            return ""
        except TargetMemoryError:
            return E_FAULT
        return "OK" if ok else "E01"

    # -- execution --------------------------------------------------------
    def _initial_stop(self) -> str:
        if self.exited is not None:
            return self._stop_reply(self.exited)
        return f"T{SIGTRAP:02x}thread:{self._tid(self._g)};"

    def _resume(self, conn: _Connection, step: bool, addr: str, vcpu: int | None = None) -> str:
        if self.exited is not None:      # nothing left to run
            return self._stop_reply(self.exited)
        run_vcpu = self._run_vcpu(vcpu)
        self._select(run_vcpu)
        if addr:
            try:
                pc = _parse_hex(addr)
            except ValueError as exc:
                raise _Malformed(str(exc)) from exc
            self.target.write_register(self.tdesc.pc, pc)
        conn.interrupt_pending = False
        if step:
            event = self.target.step()
        else:
            event = self.target.resume(lambda: conn.poll_interrupt() or self._closed.is_set())
        return self._after_run(conn, event, run_vcpu)

    def _reverse(self, conn: _Connection, step: bool) -> str:
        if self.exited is not None:
            return self._stop_reply(self.exited)
        run_vcpu = self._run_vcpu()
        self._select(run_vcpu)
        conn.interrupt_pending = False
        if step:
            event = self.target.reverse_step()
        else:
            event = self.target.reverse_resume(lambda: conn.poll_interrupt() or self._closed.is_set())
        return self._after_run(conn, event, run_vcpu)

    def _after_run(self, conn: _Connection, event: StopEvent, run_vcpu: int) -> str:
        conn.interrupt_pending = False
        if conn.eof:
            raise _Disconnect()
        if event.reason == "exited":
            self.exited = event
        else:
            # gdb takes the stop's thread as the general thread from now on (its
            # idea of the Hc thread does not change)
            self._select(event.vcpu if event.vcpu is not None else run_vcpu)
        return self._stop_reply(event)

    def _stop_reply(self, event: StopEvent) -> str:
        if event.reason == "exited":
            return f"W{event.exit_status & 0xFF:02x}"
        sig = event.signal
        if sig is None:
            sig = SIGINT if event.reason == "signal" else SIGTRAP
        parts = [f"T{sig & 0xFF:02x}"]
        if event.reason == "breakpoint":
            if event.kind == BP_HARDWARE:
                if "hwbreak" in self._gdb_features:
                    parts.append("hwbreak:;")
            elif "swbreak" in self._gdb_features:
                parts.append("swbreak:;")
        elif event.reason == "watchpoint":
            name = {WATCH_WRITE: "watch", WATCH_READ: "rwatch", WATCH_ACCESS: "awatch"}.get(
                event.kind if event.kind is not None else WATCH_WRITE, "watch")
            parts.append(f"{name}:{(event.addr or 0):x};")
        elif event.reason == "replay-start":
            parts.append("replaylog:begin;")
        elif event.reason == "replay-end":
            parts.append("replaylog:end;")
        try:
            values = self.target.read_registers()
        except Exception:  # the stop itself still has to reach gdb
            log.exception("gdbstub: reading registers for a stop reply")
            values = {}
        for name in (self.tdesc.pc, self.tdesc.sp, self.tdesc.fp):
            if name in values:
                n = self.tdesc.index[name]
                parts.append(f"{n:02x}:{le_hex(values[name], self.tdesc.regs[n].size)};")
        parts.append(f"thread:{self._tid(self._g)};")
        return "".join(parts)

    def _kill(self) -> None:
        try:
            self.target.kill()
        finally:
            self.killed = True
            self._end_session = True


def start_gdbstub_thread(target: DebugTarget, host: str = "127.0.0.1", port: int = 0) -> GdbStub:
    """A GdbStub serving in a daemon thread; stop it with .close()."""
    stub = GdbStub(target, host, port)
    stub.thread = threading.Thread(target=stub.serve_forever, name=f"gdbstub:{stub.port}", daemon=True)
    stub.thread.start()
    return stub
