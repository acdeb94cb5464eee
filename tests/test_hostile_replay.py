"""Issue 16, replay through the CLI and the exit-status scheme: a damaged log is
never reported as verified, a replay that ends early says so and exits
non-zero, and a script can always tell the guest's status from vmm's (and
neither from a signal)."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from replay.logfile import LogReader, verify
from tools import exitstatus
from tools.cli import EXIT_BAD_LOG, EXIT_INCOMPLETE, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A recording of the bundled demo guest (2.5 M instructions, 2 events a chunk, so digests
    at several icounts): (log path, bytes, reader)."""
    from guests.build import guest_path
    from replay.session import record

    p = str(guest_path("demo"))
    log = tmp_path_factory.mktemp("rec") / "demo.vmlog"
    with open(p, "rb") as f:
        record(p, f.read(), str(log), chunk_events=2, max_instructions=2_500_000)
    return log, log.read_bytes(), LogReader(log)


def _replay(capsys, log, *extra) -> tuple[int, str]:
    status = main(["replay", str(log), "--serial", "none", *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


def test_whole_log_replays_with_every_digest_matched(recording, capsys):
    status, err = _replay(capsys, recording[0])
    assert status == 0 and "every digest matched" in err and "ended early" not in err


def test_cut_log_replay_says_it_ended_early_and_exits_8(recording, tmp_path, capsys):
    log, data, reader = recording
    chunks = reader.chunks
    assert len(chunks) >= 4
    cut = tmp_path / "cut.vmlog"
    for at in (chunks[-2].offset + 20, chunks[2].offset + 20,   # inside a chunk: truncation
               chunks[-2].offset, chunks[2].offset):           # between two chunks: the tail lost
        cut.write_bytes(data[:at])
        assert not verify(cut).ok
        status, err = _replay(capsys, cut)
        assert status == EXIT_INCOMPLETE == 8, err
        assert "the replay ended early" in err and "every digest matched" not in err, err
        assert main(["log", "verify", str(cut)]) != 0
        capsys.readouterr()


def test_cut_log_replayed_only_up_to_before_the_cut_is_a_success(recording, tmp_path, capsys):
    log, data, reader = recording
    chunks = reader.chunks
    cut = tmp_path / "cut.vmlog"
    cut.write_bytes(data[:chunks[-2].offset + 20])
    until = chunks[-3].first_icount // 2
    assert until > 0
    status, err = _replay(capsys, cut, "--until", str(until))
    assert status == 0 and "ended early" not in err and f"state at icount {until}" in err, err


def test_damage_met_mid_replay_is_a_bad_log_not_a_traceback(recording, tmp_path, capsys):
    """A chunk whose checksums are fine but whose digest payload is short, past the first
    chunks: found before the machine runs, reported as a damaged log (6), as verify does."""
    case = ROOT / "tests" / "fuzz" / "corpus" / "log" / "issue16-bad-digest-mid-log.vmlog"
    status, err = _replay(capsys, case)
    assert status == EXIT_BAD_LOG and main(["log", "verify", str(case)]) == EXIT_BAD_LOG, err


# -- the exit-status scheme ------------------------------------------------------------------

def _exit_guest(tmp_path, value: int, size: int = 1) -> Path:
    """A flat 32-bit guest that writes ``value`` to the debug-exit port 0x501 and halts."""
    if size == 1:
        code = b"\x66\xba\x01\x05\xb0" + bytes([value]) + b"\xee\xf4"           # mov dx; mov al; out dx, al
    else:
        code = b"\x66\xba\x01\x05\xb8" + struct.pack("<I", value) + b"\xef\xf4"  # mov dx; mov eax; out dx, eax
    p = tmp_path / f"exit{value}.bin"
    p.write_bytes(code)
    return p


VMM_OWN = {exitstatus.USAGE, exitstatus.SHUTDOWN, exitstatus.CPU_ERROR, exitstatus.DIVERGED,
           exitstatus.BAD_LOG, exitstatus.BAD_SNAPSHOT, exitstatus.INCOMPLETE}


@pytest.mark.parametrize("value", [1, 3, 4, 5, 6, 7, 8, 42, 110])
def test_guest_status_never_looks_like_vmm_s_own(tmp_path, capsys, value):
    status = main(["run", str(_exit_guest(tmp_path, value)), "--boot", "flat", "--serial", "none"])
    capsys.readouterr()
    assert status == 16 + value and status not in VMM_OWN and status < 128
    assert exitstatus.guest_value(status) == value


@pytest.mark.parametrize("value", [0x86, 0x8B, 0xFF])
def test_large_guest_status_never_looks_like_a_signal(tmp_path, capsys, value):
    """0x86 and 0x8B once came out as 134 and 139: SIGABRT and SIGSEGV to a shell."""
    status = main(["run", str(_exit_guest(tmp_path, value)), "--boot", "flat", "--serial", "none"])
    err = capsys.readouterr().err
    assert status == 127 and f"status {value}" in err
    qemu = main(["run", str(_exit_guest(tmp_path, value)), "--boot", "flat", "--serial", "none",
                 "--exit-code", "qemu"])
    capsys.readouterr()
    assert qemu == 127


def test_guest_status_0_and_a_triple_fault_stay_apart(tmp_path, capsys):
    assert main(["run", str(_exit_guest(tmp_path, 0)), "--boot", "flat", "--serial", "none"]) == 0
    # lidt [0x100009] (limit 0) ; ud2: a triple fault is vmm's 3, a guest's 3 is 19
    tf = tmp_path / "tf.bin"
    tf.write_bytes(b"\x0f\x01\x1d" + struct.pack("<I", 0x100009) + b"\x0f\x0b" + bytes(6))
    assert main(["run", str(tf), "--boot", "flat", "--serial", "none"]) == exitstatus.SHUTDOWN
    capsys.readouterr()


def test_the_scheme_is_in_the_help_and_the_readme(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text()
    for code, meaning in exitstatus.VMM_STATUSES.items():
        assert f"  {code:<9} {meaning}" in out
        assert f"| {code} | {meaning} |" in readme, (code, meaning)
    for row in ("16+v", "127", "130"):
        assert row in out and f"| {row} |" in readme
