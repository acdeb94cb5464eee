"""Record and replay with disks (issue 12), through the CLI as a user runs it.

Debian's kernel boots with an IDE disk (-hda, ext4 made at test time) and a
virtio-blk disk; its /init mounts both, writes and syncs files, reads one back
and powers off.  The recording names each drive with the SHA-256 of its
content; the guest's writes go to in-memory overlays, so the images are
byte-identical afterwards and the replay, which opens them the same way after
checking their hashes, matches every digest (registers, RAM pages, serial
output) to the recorded end.  Disk completions are device timers on virtual
time, so the log holds no disk data.  An image changed after the recording is
refused before the replay starts: one line, exit status 2.  Going back in the
recording (checkpoints) puts the overlays back too.
"""
from __future__ import annotations

import hashlib

import pytest

from replay.logfile import LogReader
from tests.realguests import _available, debian_kernel, debian_modules  # noqa: F401  (fixtures)
from tests.test_linux_virtio_blk import e2fsprogs, make_ext4  # noqa: F401  (a fixture)
from tools import cli, debian

MODULES = ["ata_piix", "sd_mod", "virtio_pci", "virtio_blk", "ext4", "crc32c_generic"]
GUEST = """echo DISK-REPLAY-START
i=0; while [ ! -b /dev/sda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /mnt/a /mnt/b
mount -t ext4 /dev/sda /mnt/a && echo MOUNTED-IDE
mount -t ext4 /dev/vda /mnt/b && echo MOUNTED-VIRTIO
seq 1 5000 > /mnt/a/numbers.txt
echo "written during the recording" > /mnt/b/note.txt
sync
echo 3 > /proc/sys/vm/drop_caches
echo "ide $(md5sum < /mnt/a/numbers.txt)"
cat /mnt/b/note.txt
umount /mnt/a && umount /mnt/b && echo UNMOUNTED
echo DISK-REPLAY-DONE
poweroff -f
"""
NUMBERS_MD5 = hashlib.md5("".join(f"{i}\n" for i in range(1, 5001)).encode()).hexdigest()


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def recording(debian_kernel, debian_modules, e2fsprogs, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("disk-replay")
    initrd = _available(debian.initramfs, debian.INIT_HEADER + debian.LOAD_MODULES + GUEST, MODULES)
    ide, vd = tmp / "ide.img", tmp / "virtio.img"
    make_ext4(e2fsprogs, ide, 16)
    make_ext4(e2fsprogs, vd, 16)
    before = {ide: sha(ide), vd: sha(vd)}
    log, serial = tmp / "run.vmlog", tmp / "serial.txt"
    status = cli.main(["record", str(debian_kernel), "--initrd", str(initrd), "--append", "console=ttyS0 panic=-1",
                       "--mem", "256M", "--serial", str(serial), "-hda", str(ide),
                       "--drive", f"file={vd},if=virtio,format=raw", "-o", str(log)])
    return {"status": status, "log": log, "ide": ide, "virtio": vd, "before": before, "serial": serial,
            "tmp": tmp}


def test_the_recording_names_the_drives_and_leaves_the_images_as_they_were(recording):
    rec = recording
    out = rec["serial"].read_text(errors="replace")
    assert rec["status"] == 0, out[-3000:]
    for marker in ("MOUNTED-IDE", "MOUNTED-VIRTIO", f"ide {NUMBERS_MD5}", "written during the recording",
                   "UNMOUNTED", "DISK-REPLAY-DONE"):
        assert marker in out, out[-3000:]
    drives = {d["name"]: d for d in LogReader(rec["log"]).header.config["drives"]}
    assert set(drives) == {"ide0.0", "virtio0"}
    assert drives["ide0.0"]["sha256"] == rec["before"][rec["ide"]]
    assert drives["virtio0"]["sha256"] == rec["before"][rec["virtio"]]
    assert drives["virtio0"]["if"] == "virtio" and drives["ide0.0"]["if"] == "ide"
    for path, digest in rec["before"].items():
        assert sha(path) == digest, f"{path.name} changed during the recording"


def test_the_recording_replays_with_every_digest_matching(recording, capsys):
    rec = recording
    serial = rec["tmp"] / "replay-serial.txt"
    status = cli.main(["replay", str(rec["log"]), "--serial", str(serial)])
    err = capsys.readouterr().err
    assert status == 0, err[-2000:]
    assert "every digest matched" in err
    assert serial.read_bytes() == rec["serial"].read_bytes()
    for path, digest in rec["before"].items():
        assert sha(path) == digest


def test_a_changed_image_is_refused_before_the_replay(recording, capsys, tmp_path):
    rec = recording
    data = bytearray(rec["ide"].read_bytes())
    changed = rec["ide"].with_name("ide-changed.img")
    data[4096 * 3] ^= 0xFF
    changed.write_bytes(bytes(data))
    rec["ide"].rename(rec["tmp"] / "ide-kept.img")
    changed.rename(rec["ide"])
    try:
        status = cli.main(["replay", str(rec["log"]), "--serial", "none"])
        err = capsys.readouterr().err
    finally:
        rec["ide"].unlink()
        (rec["tmp"] / "ide-kept.img").rename(rec["ide"])
    assert status == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "ide0.0" in lines[0] and "not the one recorded" in lines[0], err


def test_time_travel_puts_the_overlays_back(recording):
    """Going back in a replay (a checkpoint restored, then a short run forward) puts back
    what the guest had written to its disks at that point, no more and no less."""
    from replay.timetravel import TimeTravel

    tt = TimeTravel(str(recording["log"]))
    end = tt.end_icount
    # checkpoint positions, so going back restores one and runs nothing forward (a run forward
    # from a restored checkpoint of a Linux recording can diverge, disks or not: a core issue)
    points = [tt.origin + (end * k // 100 - tt.origin) // tt.interval * tt.interval for k in (80, 90, 95, 98)]
    points = sorted(set(points)) + [end - 1]
    seen = {}
    for p in points:                       # forward, taking checkpoints on the way
        tt.seek(p)
        seen[p] = {n: img.save_blocks() for n, img in tt.m.drive_images.items()}
    last = seen[points[-1]]
    assert all(last[n] for n in ("ide0.0", "virtio0")), "the guest wrote to both disks"
    assert any(seen[p] != last for p in points[:-1]), "some point lies before the writes"
    for p in reversed(points[:-1]):        # and back
        tt.seek(p)
        assert tt.icount == p
        assert {n: img.save_blocks() for n, img in tt.m.drive_images.items()} == seen[p], p
