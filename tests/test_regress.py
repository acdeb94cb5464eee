"""`vmm regress`: a corpus of 50 recordings (the bundled one and generated ones)
replayed in parallel, each judged exact, diverged or unreadable; JUnit XML; the
same verdicts on a local Ray instance when Ray is installed."""
from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import vmm
from guests.build import GUESTS_DIR
from replay.events import Event, EventKind, encode_regs, decode_regs
from replay.logfile import LogReader, LogWriter
from replay.regress import DIVERGED, EXACT, UNREADABLE, collect, junit_xml, regress
from tools.cli import main as vmm_main
from tools.guestkit import asm

LOAD = 0x100000


def loop_image(n: int) -> bytes:
    """A flat guest: sums 1..n into memory, then exits with the low byte of the sum."""
    return asm(f"""
        xor eax, eax
        mov ecx, {n}
    top:
        add eax, ecx
        mov [0x200000], eax
        dec ecx
        jnz top
        mov dx, 0x501
        out dx, al
    """, 32, LOAD)


def edit_a_register_digest(src: Path, dst: Path) -> None:
    """The same log with one recorded register digest changed (rbx + 1): a recording
    whose evidence no longer matches the run."""
    r = LogReader(str(src))
    w = LogWriter(str(dst), r.header.config, r.header.initial_digest)
    done = False
    for e in r:
        if e.kind == EventKind.REG_DIGEST and e.icount > 0 and not done:
            regs = decode_regs(e.payload)
            regs["rbx"] += 1
            e = Event(e.kind, e.icount, encode_regs(regs), e.vcpu)
            done = True
        w.append(e)
    w.close()
    assert done


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    shutil.copy(GUESTS_DIR / "recordings" / "crash.vmlog", d / "crash.vmlog")
    vmm.record("demo", d / "demo.vmlog")
    for i in range(20):                                    # the boot sector at different wall-clock times
        vmm.record("hello", d / f"hello-{i:02}.vmlog", rtc_epoch=1_767_225_600 + 86_400 * i)
    sub, images = d / "loops", d / "images"
    sub.mkdir()
    images.mkdir()
    for i in range(26):                                    # flat guests of different lengths, in a subfolder
        img = images / f"loop-{i:02}.bin"
        img.write_bytes(loop_image(1000 + 5000 * i))
        vmm.record(img, sub / f"loop-{i:02}.vmlog", boot="flat")
    edit_a_register_digest(sub / "loop-25.vmlog", d / "edited.vmlog")
    (d / "junk.vmlog").write_bytes(b"this is not a recording\n" * 10)
    assert len(collect([str(d)])) == 50
    return d


def test_a_corpus_of_fifty_is_judged_recording_by_recording(corpus):
    verdicts = regress([str(corpus)], jobs=2)
    by = {Path(v.path).name: v for v in verdicts}
    assert len(verdicts) == 50
    assert by["edited.vmlog"].verdict == DIVERGED
    assert "registers differ" in by["edited.vmlog"].detail and "rbx" in by["edited.vmlog"].detail
    assert by["junk.vmlog"].verdict == UNREADABLE
    exact = [v for v in verdicts if v.verdict == EXACT]
    assert len(exact) == 48
    assert by["crash.vmlog"].result == "exit (status 1)" and by["crash.vmlog"].icount == 7008040
    assert by["loop-00.vmlog"].result == "exit (status 20)"           # sum(1..1000) = 500500, & 0xFF
    # the same verdicts one at a time, in one process
    assert [(v.path, v.verdict, v.detail, v.icount) for v in regress([str(corpus)], jobs=1)] == \
        [(v.path, v.verdict, v.detail, v.icount) for v in verdicts]


def test_junit_xml_has_a_case_per_recording_with_failures_and_errors(corpus):
    verdicts = regress([str(corpus / "loops"), str(corpus / "edited.vmlog"), str(corpus / "junk.vmlog")], jobs=2)
    root = ET.fromstring(junit_xml(verdicts))
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("28", "1", "1")
    cases = {Path(c.get("name")).name: c for c in suite.findall("testcase")}
    assert cases["edited.vmlog"].find("failure").get("type") == "diverged"
    assert "replay diverged at icount" in cases["edited.vmlog"].find("failure").text
    assert cases["junk.vmlog"].find("error") is not None
    assert cases["loop-03.vmlog"].find("failure") is None and cases["loop-03.vmlog"].find("error") is None


def test_the_command_line_lists_exits_and_writes_junit(corpus, tmp_path, capsys):
    lst = tmp_path / "list.txt"
    lst.write_text(f"# two good ones and the edited one\n{corpus}/hello-03.vmlog\n\n{corpus}/loops/loop-01.vmlog\n"
                   f"{corpus}/edited.vmlog\n")
    junit = tmp_path / "out.xml"
    assert vmm_main(["regress", str(lst), "--junit", str(junit)]) == 5
    out = capsys.readouterr().out
    assert "3 recordings: 2 exact, 1 diverged, 0 unreadable" in out
    assert "diverged   " in out and "registers differ" in out
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "1"
    assert vmm_main(["regress", f"{corpus}/hello-03.vmlog", "-q"]) == 0
    assert vmm_main(["regress", f"{corpus}/junk.vmlog"]) == 6


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert vmm_main(["regress", str(tmp_path / "nothing-here")]) == 2
    assert vmm_main(["regress", str(tmp_path)]) == 2                 # an empty folder
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Traceback" not in err and "no recordings to replay" in err


def test_ray_gives_the_same_verdicts(corpus):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'vmm[ray]')")
    assert ray is not None
    local = regress([str(corpus)], jobs=2)
    remote = regress([str(corpus)], ray_address="local")
    assert [(v.path, v.verdict, v.detail, v.icount) for v in remote] == \
        [(v.path, v.verdict, v.detail, v.icount) for v in local]
