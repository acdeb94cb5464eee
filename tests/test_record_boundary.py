"""Acceptance tests of the one event-log boundary (issue 9).

* A log streamed over a socket while it is recorded replays exactly as the
  same recording does from a file: same end, same digests, and the streamed
  bytes are the file's bytes.
* Console input crosses the boundary: recorded at the icount the VMM took
  it, and handed back by the ReplayBoundary at those same icounts.
* Recordings that end by themselves (a triple fault, HLT with IF=0, a CPU
  error) replay to that same end through the CLI with the recorded exit
  status, never a divergence; also when the machine has two vCPUs and the
  AP is the one that fails.
* A version-1 log (guests/recordings/crash.vmlog) still replays.
"""
from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import pytest

from replay.boundary import ReplayBoundary
from replay.events import EventKind
from replay.logfile import LogReader
from replay.session import Replayer, record
from tests.machine_helpers import AP_CODE, LOAD, fingerprint, race_image, two_cpu_image
from tools.cli import main
from tools.guestkit import asm
from vmm.machine import StopReason

ROOT = Path(__file__).resolve().parent.parent


# ---- a log over a socket --------------------------------------------------------------------

class Tee:
    """A readable stream that keeps a copy of every byte read through it."""

    def __init__(self, f):
        self.f = f
        self.name = "<socket>"
        self.data = bytearray()

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.data += b
        return b


def record_race(out, image_path: Path, image: bytes):
    return record(str(image_path), image, out, boot_kind="flat", vcpus=2, quantum=997,
                  entries=[(1, AP_CODE)], max_instructions=50_000_000, chunk_events=3)


def test_a_log_streamed_over_a_socket_replays_exactly_as_from_a_file(tmp_path):
    image = race_image(250_000, 250_000)         # ~3M instructions: digests all along the way
    img = tmp_path / "race.bin"
    img.write_bytes(image)
    log = tmp_path / "race.vmlog"
    res_file, m_file = record_race(str(log), img, image)
    from_file = Replayer(str(log))
    r_file = from_file.run()

    tx, rx = socket.socketpair()
    outcome: dict = {}

    def recorder() -> None:
        try:
            w = tx.makefile("wb")
            outcome["res"], outcome["m"] = record_race(w, img, image)
            w.close()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            outcome["error"] = e
        finally:
            tx.shutdown(socket.SHUT_WR)
            tx.close()

    t = threading.Thread(target=recorder, daemon=True)
    t.start()
    stream = Tee(rx.makefile("rb"))
    try:
        streamed = Replayer(stream)
        r_sock = streamed.run()
        while stream.read(65536):                 # whatever the replay did not need to read
            pass
    finally:
        t.join(60)
        rx.close()
    assert "error" not in outcome, outcome.get("error")
    assert not t.is_alive()
    assert not streamed.truncated
    assert (r_sock.reason, r_sock.status, r_sock.icount) == (r_file.reason, r_file.status, r_file.icount) \
        == (res_file.reason, res_file.status, res_file.icount)
    assert r_sock.reason is StopReason.EXIT
    want = fingerprint(m_file)
    assert fingerprint(streamed.m) == fingerprint(from_file.m) == want == fingerprint(outcome["m"])
    assert streamed.events_used == from_file.events_used > 12
    assert bytes(stream.data) == log.read_bytes()
    kinds = [e.kind for e in LogReader(str(log))]
    assert kinds.count(EventKind.REG_DIGEST) >= 6 and kinds[-1] == EventKind.END


def cut_recording(tmp_path) -> tuple[bytes, int]:
    image = race_image(250_000, 250_000)
    img = tmp_path / "race.bin"
    img.write_bytes(image)
    log = tmp_path / "race.vmlog"
    record_race(str(log), img, image)
    data = log.read_bytes()
    return data, len(data) * 2 // 3


def test_a_log_file_cut_in_the_middle_replays_up_to_its_last_whole_chunk(tmp_path):
    data, cut = cut_recording(tmp_path)
    cut_log = tmp_path / "cut.vmlog"
    cut_log.write_bytes(data[:cut])
    rp = Replayer(str(cut_log))
    r = rp.run()
    assert rp.truncated
    assert r.reason is StopReason.LIMIT and 0 < r.icount == rp.reader.last_icount


def test_a_log_stream_cut_in_the_middle_replays_up_to_its_last_whole_chunk(tmp_path):
    data, cut = cut_recording(tmp_path)
    tx, rx = socket.socketpair()

    def sender() -> None:
        tx.sendall(data[:cut])
        tx.close()
    t = threading.Thread(target=sender, daemon=True)
    t.start()
    rp = Replayer(rx.makefile("rb"))
    r = rp.run()
    t.join(10)
    rx.close()
    assert rp.truncated
    assert r.reason is StopReason.LIMIT and 0 < r.icount == rp.reader.last_icount


# ---- console input through the ReplayBoundary ------------------------------------------------

COM1 = 0x3F8
ECHO = asm(f"""
    xor esi, esi
poll:
    inc esi
    mov ecx, 2000
delay:
    dec ecx
    jnz delay
    mov dx, {COM1 + 5:#x}
    in al, dx
    test al, 1
    jz poll
    mov dx, {COM1:#x}
    in al, dx
    mov bl, al
    out dx, al
    mov eax, esi
    out dx, al
    cmp bl, 0x21
    jne poll
    mov dx, 0x501
    mov al, 0
    out dx, al
""", 32, LOAD)
"""Echoes each byte the UART receives followed by the low byte of its poll count (so the
output shows *when* each byte arrived), and exits on '!'."""


def scripted(chunks: dict[int, bytes]):
    polls = {"n": 0}

    def source() -> bytes:
        polls["n"] += 1
        return chunks.pop(polls["n"], b"")
    return source


def test_console_input_replays_through_the_boundary_at_the_recorded_icounts(tmp_path, monkeypatch):
    img = tmp_path / "echo.bin"
    img.write_bytes(ECHO)
    log = str(tmp_path / "echo.vmlog")
    res, m = record(str(img), ECHO, log, boot_kind="flat", input_kind="file",
                    live_input=scripted({2: b"ab", 3: b"c", 5: b"xyz!"}), max_instructions=50_000_000)
    assert res.reason is StopReason.EXIT, res
    recorded = [(e.icount, e.payload) for e in LogReader(log) if e.kind == EventKind.CONSOLE_INPUT]
    assert [p for _, p in recorded] == [b"ab", b"c", b"xyz!"]
    assert len({i for i, _ in recorded}) == 3

    answered = []
    real = ReplayBoundary.input

    def spy(self, channel):
        data = real(self, channel)
        if data:
            answered.append((self.stamp()[0], data))
        return data
    monkeypatch.setattr(ReplayBoundary, "input", spy)
    rp = Replayer(log)
    assert isinstance(rp.m.boundary, ReplayBoundary)
    r = rp.run()
    assert (r.reason, r.icount) == (res.reason, res.icount)
    assert answered == recorded
    assert rp.m.boundary.inputs == 3
    assert bytes(rp.m.serial_out) == bytes(m.serial_out)
    echoed = bytes(m.serial_out)[0::2]
    assert echoed == b"abcxyz!"


def test_the_same_input_at_other_moments_gives_other_output(tmp_path):
    """The echo's output depends on when input arrives: the test above has teeth."""
    outs = []
    for chunks in ({2: b"ab", 3: b"c", 5: b"xyz!"}, {1: b"ab", 4: b"c", 5: b"xyz!"}):
        img = tmp_path / "echo.bin"
        img.write_bytes(ECHO)
        _, m = record(str(img), ECHO, str(tmp_path / "x.vmlog"), boot_kind="flat", input_kind="file",
                      live_input=scripted(dict(chunks)), max_instructions=50_000_000)
        outs.append(bytes(m.serial_out))
    assert outs[0][0::2] == outs[1][0::2] and outs[0] != outs[1]


# ---- recordings that end by themselves, through the CLI ---------------------------------------------

SPIN = "mov ecx, 700000\nspin: dec ecx\njnz spin\n"        # ~1.4M instructions: digests on the way


def _idt_limit_zero(at: int) -> str:
    return f"lidt [{at:#x}]\n"


ENDINGS = {
    # name: (code after the spin, exit status, recorded reason)
    "triple fault (#UD, no IDT)": ("lidt [{d}]\nud2\n", 3, "shutdown"),
    "triple fault (#PF with CR2, no IDT)": (
        "lidt [{d}]\nmov eax, 0x300000\nmov cr3, eax\nmov eax, cr0\nor eax, 0x80000000\nmov cr0, eax\nnop\n",
        3, "shutdown"),
    "HLT with IF=0": ("cli\nhlt\n", 0, "halted"),
    "CPU error: a fetch outside RAM": ("mov eax, 0x40000000\njmp eax\n", 4, "error"),
    # (a read of unclaimed space above RAM is no ending: it reads zeros, as under QEMU)
}


def ending_image(tail: str) -> bytes:
    desc = LOAD + 0x800                          # an IDT descriptor of limit 0 (and base 0)
    code = asm(SPIN + tail.format(d=hex(desc)), 32, LOAD)
    assert len(code) < 0x800
    return code.ljust(0x800, b"\x90") + struct.pack("<HI", 0, 0)


@pytest.mark.parametrize("mmu", ["shadow", "nested"])
@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_recording_that_ends_by_itself_replays_to_the_same_end(tmp_path, capsys, ending, mmu):
    tail, status, reason = ENDINGS[ending]
    img = tmp_path / "end.bin"
    img.write_bytes(ending_image(tail))
    log = str(tmp_path / "end.vmlog")
    assert main(["record", str(img), "--boot", "flat", "--serial", "none", "--mmu", mmu, "-o", log]) == status
    rec_err = capsys.readouterr().err
    end = [e for e in LogReader(log)][-1]
    assert end.kind == EventKind.END
    assert main(["replay", log, "--serial", "none"]) == status
    err = capsys.readouterr().err
    assert "diverged" not in err and "every digest matched" in err, err
    assert f"replayed {end.icount:,} instructions" in err
    # the same one-line account of the end as when it was recorded
    last = [ln for ln in rec_err.splitlines() if ln.startswith("vmm: ") and "recorded" not in ln]
    assert last and last[-1] in err
    rp = Replayer(log)
    r = rp.run()
    assert r.reason.value == reason and r.icount == end.icount
    assert sum(1 for e in rp.events if e.kind == EventKind.REG_DIGEST) >= 3   # one on the way


def test_a_two_vcpu_recording_where_the_ap_fails_replays_to_that_failure(tmp_path):
    bsp = "mov ecx, 600000\nl0: dec ecx\njnz l0\ncli\nh0: hlt\njmp h0\n"
    ap = "mov ecx, 300000\nl1: dec ecx\njnz l1\nmov eax, 0x40000000\njmp eax\n"   # a fetch outside RAM
    image = two_cpu_image(bsp, ap)
    img = tmp_path / "apfail.bin"
    img.write_bytes(image)
    log = str(tmp_path / "apfail.vmlog")
    res, m = record(str(img), image, log, boot_kind="flat", vcpus=2, quantum=1000, entries=[(1, AP_CODE)],
                    max_instructions=50_000_000)
    assert res.reason is StopReason.ERROR and res.vcpu == 1, res
    end = [e for e in LogReader(log)][-1]
    assert end.kind == EventKind.END and end.vcpu == 1
    rp = Replayer(log)
    r = rp.run()
    assert (r.reason, r.icount, r.vcpu) == (res.reason, res.icount, 1)
    assert fingerprint(rp.m) == fingerprint(m)
    assert main(["replay", log, "--serial", "none"]) == 4


# ---- an old log ------------------------------------------------------------------------------

def test_a_version_1_log_still_replays_through_the_cli(tmp_path, capsys):
    log = ROOT / "guests" / "recordings" / "crash.vmlog"
    assert LogReader(str(log)).header.version == 1
    out = tmp_path / "crash.serial"
    assert main(["replay", str(log), "--serial", str(out)]) == 16 + 1  # the guest's 1 (tools/exitstatus.py)
    err = capsys.readouterr().err
    assert "every digest matched" in err and "diverged" not in err
    assert b"CRASH: page fault at CR2=0x00000000" in out.read_bytes()
