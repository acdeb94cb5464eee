"""Record -> replay -> compare, on a guest whose behaviour depends on timing.

The guest (a flat 32-bit binary built here with keystone) races PIT
interrupts against a busy loop, takes serial input by interrupt at whatever
moment it arrives, reads the RTC, and writes all of it to COM1 -- so its
output and final state depend on exactly when each event happened.
Recording with random inputs arriving at random moments, then replaying,
must reproduce every digest, the output and the final state; replaying twice
gives the same result; and perturbed recordings are caught.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay import events as ev
from replay.events import Event, EventKind
from replay.logfile import LogFormatError, LogReader, LogWriter
from replay.session import Divergence, Replayer, record
from tools.guestkit import asm

LOAD = 0x100000
TICKS = 0x6000       # timer interrupts seen
CHARS = 0x6004       # serial bytes received
ACC = 0x6008         # an accumulator mixing counter values, input and RTC reads


def race_guest(divisor: int = 5000, ticks: int = 12) -> bytes:
    """A guest whose output depends on when timer and serial interrupts land."""
    src = f"""
    start:
        mov esp, 0x90000
        mov edi, 0x5000
        mov ecx, 512
        xor eax, eax
        rep stosd
        mov eax, timer_isr
        mov edi, 0x5000 + 0x20*8
        call set_gate
        mov eax, serial_isr
        mov edi, 0x5000 + 0x24*8
        call set_gate
        mov eax, spurious_isr
        mov edi, 0x5000 + 0x27*8
        call set_gate
        lidt [idtr]
        mov al, 0x11
        out 0x20, al
        out 0xa0, al
        mov al, 0x20
        out 0x21, al
        mov al, 0x28
        out 0xa1, al
        mov al, 4
        out 0x21, al
        mov al, 2
        out 0xa1, al
        mov al, 1
        out 0x21, al
        out 0xa1, al
        mov al, 0xEE
        out 0x21, al
        mov al, 0xFF
        out 0xa1, al
        mov al, 0x34
        out 0x43, al
        mov al, {divisor & 0xFF}
        out 0x40, al
        mov al, {divisor >> 8}
        out 0x40, al
        mov dx, 0x3f9
        mov al, 1
        out dx, al
        mov dx, 0x3fc
        mov al, 0x08
        out dx, al
        xor ebx, ebx
        sti
    spin:
        inc ebx
        test ebx, 0x3ff
        jnz spin
        cmp dword ptr [{TICKS}], {ticks}
        jb spin
        cli
        mov eax, [{ACC}]
        mov dx, 0x3f8
        out dx, al
        mov dx, 0x501
        mov al, 0
        out dx, al
        hlt
    set_gate:
        mov [edi], ax
        mov word ptr [edi+2], 0x10
        mov word ptr [edi+4], 0x8E00
        shr eax, 16
        mov [edi+6], ax
        ret
    timer_isr:
        push eax
        push edx
        inc dword ptr [{TICKS}]
        mov al, 0
        out 0x70, al
        in al, 0x71
        movzx eax, al
        add eax, ebx
        add [{ACC}], eax
        mov dx, 0x3f8
        mov al, bl
        out dx, al
        mov al, 0x20
        out 0x20, al
        pop edx
        pop eax
        iretd
    serial_isr:
        push eax
        push edx
    serial_more:
        mov dx, 0x3fd
        in al, dx
        test al, 1
        jz serial_done
        mov dx, 0x3f8
        in al, dx
        inc dword ptr [{CHARS}]
        xor al, bl
        out dx, al
        movzx eax, al
        imul eax, ebx
        xor [{ACC}], eax
        jmp serial_more
    serial_done:
        mov al, 0x20
        out 0x20, al
        pop edx
        pop eax
        iretd
    spurious_isr:
        iretd
    idtr:
        .word 0x7ff
        .long 0x5000
    """
    return asm(src, 32, LOAD)


def scripted(chunks: list[tuple[int, bytes]]):
    """An input source that answers chunk k at its chosen poll number (a 'random moment')."""
    polls = {"n": 0}
    pending = dict(chunks)

    def source() -> bytes:
        polls["n"] += 1
        return pending.pop(polls["n"], b"")
    return source


def do_record(tmp_path, image: bytes, chunks=(), name="race.bin", **kw):
    img = tmp_path / name
    img.write_bytes(image)
    log = str(tmp_path / "run.vmlog")
    res, m = record(str(img), image, log, boot_kind="flat", input_kind="file" if chunks else "none",
                    live_input=scripted(list(chunks)) if chunks else None, max_instructions=40_000_000, **kw)
    return log, res, m


def final_state(m):
    return (m.vcpu.icount, m.vcpu.snapshot_regs(), bytes(m.serial_out), m.memory.read(0x6000, 16))


inputs = st.lists(st.tuples(st.integers(1, 12), st.binary(min_size=1, max_size=6)), max_size=4,
                  unique_by=lambda t: t[0])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(divisor=st.integers(1200, 6000), chunks=inputs)
def test_timing_dependent_guest_replays_exactly(tmp_path, divisor, chunks):
    log, res, m = do_record(tmp_path, race_guest(divisor), chunks)
    assert res.reason.value == "exit", res
    want = final_state(m)
    for _ in range(2):  # replaying twice gives the same result
        rp = Replayer(log)
        r2 = rp.run()
        assert r2.reason is res.reason and r2.status == res.status
        assert final_state(rp.m) == want


def test_input_timing_changes_the_run(tmp_path):
    # the same bytes at different moments give different output: the test above has teeth
    _, _, m1 = do_record(tmp_path, race_guest(3000), [(2, b"abc")])
    _, _, m2 = do_record(tmp_path, race_guest(3000), [(5, b"abc")])
    assert m1.serial_out != m2.serial_out


def _rewrite(log: str, out: str, change) -> None:
    r = LogReader(log)
    w = LogWriter(out, r.header.config, r.header.initial_digest)
    for e in r:
        w.append(change(e))
    w.close()


def test_changed_image_byte_is_caught(tmp_path):
    image = race_guest(4000)
    log, _, _ = do_record(tmp_path, image)
    bad = bytearray(image)
    bad[0x60] ^= 0x01  # inside the PIC/PIT set-up code
    with pytest.raises(Divergence) as info:
        Replayer(log, image=bytes(bad)).run()
    d = info.value
    assert d.icount == 0 and "image changed" in str(d)
    assert (LOAD >> 12) in d.pages  # the page holding the changed byte is named


def test_flipped_input_payload_is_caught(tmp_path):
    log, _, _ = do_record(tmp_path, race_guest(4000), [(3, b"hello")])
    out = str(tmp_path / "flipped.vmlog")

    def flip(e: Event) -> Event:
        if e.kind == EventKind.CONSOLE_INPUT:
            return Event(e.kind, e.icount, bytes([e.payload[0] ^ 0x20]) + e.payload[1:])
        return e
    _rewrite(log, out, flip)
    with pytest.raises(Divergence) as info:
        Replayer(out).run()
    d = info.value
    assert d.icount > 0
    assert d.reg_diff or "output stream" in d.what or d.pages


def test_shifted_input_icount_is_caught(tmp_path):
    log, _, _ = do_record(tmp_path, race_guest(4000), [(3, b"x")])
    out = str(tmp_path / "shifted.vmlog")

    def shift(e: Event) -> Event:
        return Event(e.kind, e.icount - 1, e.payload) if e.kind == EventKind.CONSOLE_INPUT else e
    _rewrite(log, out, shift)
    with pytest.raises(Divergence) as info:
        Replayer(out).run()
    assert "never asked for" in info.value.what


def test_register_divergence_reports_a_diff(tmp_path):
    log, _, _ = do_record(tmp_path, race_guest(4000))
    out = str(tmp_path / "regs.vmlog")
    seen = {"n": 0}

    def poke(e: Event) -> Event:
        if e.kind == EventKind.REG_DIGEST and e.icount > 0:
            seen["n"] += 1
            if seen["n"] == 3:
                regs = ev.decode_regs(e.payload)
                regs["rbx"] ^= 0x40
                return Event(e.kind, e.icount, ev.encode_regs(regs))
        return e
    _rewrite(log, out, poke)
    with pytest.raises(Divergence) as info:
        Replayer(out).run()
    d = info.value
    assert "rbx" in d.reg_diff and d.icount > 0 and d.rip
    assert "REG_DIGEST" in d.previous_event or "OUTPUT_DIGEST" in d.previous_event or d.previous_event


def test_truncated_log_replays_its_whole_chunks(tmp_path):
    log, res, _ = do_record(tmp_path, race_guest(2000, ticks=40), chunk_events=4)
    data = open(log, "rb").read()
    cut = str(tmp_path / "cut.vmlog")
    with open(cut, "wb") as f:
        f.write(data[: int(len(data) * 0.6)])
    rp = Replayer(cut)
    assert rp.reader.truncated
    r = rp.run()
    assert r.reason.value == "limit" and 0 < rp.m.vcpu.icount < res.icount
    assert rp.m.vcpu.icount == rp.reader.last_icount


@pytest.mark.parametrize("content,needle", [
    (b"", "log"),
    (b"\x7fELF" + b"\0" * 60, "not a vmm replay log"),
    (b"VMMRLOG\x00\x07\x00" + b"\0" * 40, "version"),
])
def test_bad_log_files_give_one_line_errors(tmp_path, content, needle):
    p = tmp_path / "bad.vmlog"
    p.write_bytes(content)
    with pytest.raises(LogFormatError) as info:
        Replayer(str(p))
    msg = str(info.value)
    assert "\n" not in msg and needle in msg.lower()


def test_cli_replay_reports_divergence_and_bad_logs(tmp_path):
    from tools.cli import main

    image = race_guest(4000)
    log, _, _ = do_record(tmp_path, image, [(2, b"q")])
    assert main(["replay", log, "--serial", "none"]) == 0
    assert main(["log", "verify", log]) == 0
    bad = tmp_path / "bad.img"
    b = bytearray(image)
    b[0x60] ^= 1
    bad.write_bytes(bytes(b))
    assert main(["replay", log, "--serial", "none", "--image", str(bad)]) == 5
    junk = tmp_path / "junk.vmlog"
    junk.write_bytes(os.urandom(100))
    assert main(["replay", str(junk), "--serial", "none"]) == 6
    assert main(["log", "verify", str(junk)]) == 6


def test_a_run_recorded_with_an_instruction_limit_replays_to_that_limit(tmp_path):
    img = tmp_path / "race.bin"
    image = race_guest(3000)
    img.write_bytes(image)
    log = str(tmp_path / "limited.vmlog")
    res, m = record(str(img), image, log, boot_kind="flat", max_instructions=1_234_567)
    assert res.reason.value == "limit" and res.icount == 1_234_567
    rp = Replayer(log)
    r = rp.run()
    assert r.reason.value == "limit" and rp.m.vcpu.icount == 1_234_567
    assert final_state(rp.m) == final_state(m)


def test_cli_record_with_scripted_input_then_replay(tmp_path, capsys):
    from tools.cli import main

    img = tmp_path / "race.bin"
    img.write_bytes(race_guest(3000))
    inp = tmp_path / "input.txt"
    inp.write_bytes(b"typed by a script")
    log = str(tmp_path / "cli.vmlog")
    out1 = tmp_path / "rec.serial"
    assert main(["record", str(img), "--boot", "flat", "-o", log, "--input", str(inp),
                 "--serial", str(out1)]) == 0
    err = capsys.readouterr().err
    assert "recorded" in err and "events" in err and "log bytes" in err
    kinds = [e.kind for e in LogReader(log)]
    assert EventKind.CONSOLE_INPUT in kinds
    out2 = tmp_path / "rep.serial"
    assert main(["replay", log, "--serial", str(out2)]) == 0
    assert out1.read_bytes() == out2.read_bytes() and len(out1.read_bytes()) > 17
    assert main(["replay", log, "--serial", "none", "--until", "1000"]) == 0
    assert "state at icount 1000" in capsys.readouterr().err
    assert main(["log", "show", log, "--events"]) == 0
    assert "CONSOLE_INPUT" in capsys.readouterr().out


def test_tracing_stays_outside_the_guests_view(tmp_path):
    """A run under --trace (a code hook on every instruction) records the same log as a plain run."""
    import io
    import sys

    from tools.cli import _attach_trace

    image = race_guest(1200, ticks=2)
    plain_log, _, _ = do_record(tmp_path, image, name="a.bin")
    plain = [(e.kind, e.icount, e.payload) for e in LogReader(plain_log)]
    img = tmp_path / "b.bin"
    img.write_bytes(image)
    traced_log = str(tmp_path / "traced.vmlog")
    saved, sys.stderr = sys.stderr, io.StringIO()
    try:
        record(str(img), image, traced_log, boot_kind="flat", max_instructions=40_000_000, setup=_attach_trace)
    finally:
        sys.stderr = saved
    traced = [(e.kind, e.icount, e.payload) for e in LogReader(traced_log)]
    # the image name differs (a.bin / b.bin); every other event is identical
    assert len(plain) > 3
    assert [x for x in plain if x[0] != EventKind.DISK_IMAGE] == [x for x in traced if x[0] != EventKind.DISK_IMAGE]


@pytest.mark.parametrize("mmu", ["shadow", "nested"])
def test_the_mmu_mode_is_recorded_and_replayed(tmp_path, mmu):
    img = tmp_path / "race.bin"
    image = race_guest(3000)
    img.write_bytes(image)
    log = str(tmp_path / f"{mmu}.vmlog")
    res, m = record(str(img), image, log, boot_kind="flat", mmu=mmu, max_instructions=40_000_000)
    assert LogReader(log).header.config["mmu"] == mmu
    rp = Replayer(log)
    assert rp.m.vcpu.mmu_mode == mmu
    rp.run()
    assert final_state(rp.m) == final_state(m)
