"""Guests built from Debian packages (tools/debian.py): the initramfs builder and a reference boot
in QEMU, which proves the kernel and initramfs work, so that a failure in our VMM is ours."""
from __future__ import annotations

import gzip
import shutil
import subprocess
import time

import pytest

from tests.realguests import (  # noqa: F401  (fixtures)
    MARKER,
    busybox_initramfs,
    debian_busybox,
    debian_kernel,
    debian_modules,
    debian_seabios,
)
from tools import debian

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed "
                                "(apt-get install qemu-system-x86)")


def read_newc(data: bytes) -> list[dict]:
    """Parse a newc archive independently of the writer (buffer-format.rst)."""
    out, off = [], 0
    while True:
        assert data[off:off + 6] == b"070701", f"bad magic at {off:#x}"
        f = [int(data[off + 6 + 8 * i:off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[off + 110:off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off:off + filesize]
        off += filesize
        off += -off % 4
        if name == "TRAILER!!!":
            assert off == len(data)
            return out
        out.append({"ino": f[0], "mode": f[1], "uid": f[2], "gid": f[3], "nlink": f[4], "mtime": f[5],
                    "rdev": (f[9], f[10]), "name": name, "data": body, "check": f[12]})


def test_cpio_newc_format():
    data = debian.cpio_newc([debian.CpioEntry("a", 0o040755), debian.CpioEntry("a/f", 0o100644, b"hello"),
                             debian.CpioEntry("a/l", 0o120777, b"f"),
                             debian.CpioEntry("c", 0o020600, rdev=(5, 1))])
    assert data.startswith(b"070701" + b"00000001" + b"000041ED" + b"00000000" * 2 + b"00000002")
    entries = read_newc(data)
    assert [(e["name"], e["ino"], e["nlink"], e["data"], e["rdev"]) for e in entries] == [
        ("a", 1, 2, b"", (0, 0)), ("a/f", 2, 1, b"hello", (0, 0)), ("a/l", 3, 1, b"f", (0, 0)),
        ("c", 4, 1, b"", (5, 1))]
    assert len(data) % 4 == 0


def test_modinfo_and_dependency_order(debian_modules):  # noqa: F811
    mods = debian.resolve_modules(["virtio_blk", "ext4"], debian_modules)
    names = [n for n, _ in mods]
    assert names.index("virtio") < names.index("virtio_blk") and names[-1] == "ext4"
    assert "jbd2" in names and names.index("jbd2") < names.index("ext4")
    assert len(names) == len(set(names))
    info = debian.modinfo(dict(mods)["virtio_blk"])
    assert info["name"] == "virtio_blk" and "virtio" in info["depends"].split(",")
    assert info["vermagic"].split()[0] == debian_modules.name
    assert debian.resolve_modules(["8250"], debian_modules) == []          # built in: nothing to load
    with pytest.raises(debian.InitramfsError, match="no kernel module named no_such_module"):
        debian.resolve_modules(["no_such_module"], debian_modules)


def test_initramfs_is_deterministic_and_complete(debian_modules):  # noqa: F811
    extra = {"etc/hostname": "guest\n", "/usr/bin/hello": "#!/bin/sh\necho hi\n", "etc/blob": b"\x00\x01"}
    first = debian.initramfs("echo one\n", ["virtio_blk"], extra)
    second = debian.initramfs("echo one\n", ["virtio_blk"], dict(reversed(list(extra.items()))))
    assert first.read_bytes() == second.read_bytes()
    assert first.name.endswith(".cpio.gz")
    raw = first.read_bytes()
    assert raw[4:8] == bytes(4)                                     # gzip MTIME 0
    entries = read_newc(gzip.decompress(raw))
    names = [e["name"] for e in entries]
    assert names == sorted(names) and len(names) == len(set(names))
    assert all(e["mtime"] == 0 and e["uid"] == 0 and e["gid"] == 0 and e["check"] == 0 for e in entries)
    by = {e["name"]: e for e in entries}
    assert by["init"]["mode"] == 0o100755 and by["init"]["data"] == b"#!/bin/sh\necho one\n"
    assert by["bin/busybox"]["mode"] == 0o100755 and by["bin/busybox"]["data"][:4] == b"\x7fELF"
    assert by["bin/sh"]["mode"] == 0o120777 and by["bin/sh"]["data"] == b"/bin/busybox"
    assert by["sbin/insmod"]["data"] == b"/bin/busybox" and by["sbin/poweroff"]["data"] == b"/bin/busybox"
    assert by["dev/console"]["mode"] == 0o020600 and by["dev/console"]["rdev"] == (5, 1)
    assert by["usr/bin/hello"]["mode"] == 0o100755 and by["etc/hostname"]["mode"] == 0o100644
    assert by["etc/blob"]["data"] == b"\x00\x01"
    order = by["lib/modules/load-order"]["data"].decode().split()
    assert order[-1] == "virtio_blk" and order.index("virtio_ring") < order.index("virtio")
    assert all(by[f"lib/modules/{m}.ko"]["data"][:4] == b"\x7fELF" for m in order)
    assert by["tmp"]["mode"] == 0o041777
    # a change of input is a change of file
    assert debian.initramfs("echo two\n", ["virtio_blk"], extra) != first


def test_initramfs_extracts_with_busybox_cpio(tmp_path, debian_busybox):  # noqa: F811
    """busybox's own cpio reads what we wrote: every file, link and directory comes out."""
    archive = gzip.decompress(debian.initramfs("echo x\n", [], {"etc/motd": "hi\n"}).read_bytes())
    r = subprocess.run([str(debian_busybox), "cpio", "-i", "-d"], input=archive, cwd=tmp_path, check=False,
                       capture_output=True, timeout=60)
    assert r.returncode == 0 or b"mknod" in r.stderr, r.stderr
    assert (tmp_path / "etc" / "motd").read_text() == "hi\n"
    sh = tmp_path / "bin" / "sh"
    assert sh.is_symlink() and str(sh.readlink()) == "/bin/busybox"
    assert (tmp_path / "init").stat().st_mode & 0o111


def test_bad_initramfs_paths_are_refused():
    for bad in ("../etc/passwd", "/", "a//b", "./x"):
        with pytest.raises(debian.InitramfsError, match="bad initramfs path"):
            debian.initramfs("x", [], {bad: "x"})


def test_unavailable_packages_give_one_line(monkeypatch, tmp_path):
    debian.candidate.cache_clear()
    debian.package.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("VMM_CACHE", str(tmp_path / "cache"))
    try:
        with pytest.raises(debian.DebianUnavailable) as err:
            debian.busybox()
        assert "apt-cache is not installed" in str(err.value) and "\n" not in str(err.value)
    finally:
        debian.candidate.cache_clear()
        debian.package.cache_clear()


def test_seabios_rom(debian_seabios):  # noqa: F811
    rom = debian_seabios.read_bytes()
    assert len(rom) == 128 << 10
    assert rom[-16] == 0xEA                      # the reset vector at F000:FFF0 is a far jump


def test_cache_is_reused(debian_kernel):  # noqa: F811
    t0 = time.perf_counter()
    again = debian.kernel()
    assert again == debian_kernel
    assert time.perf_counter() - t0 < 5


@needs_qemu
def test_qemu_boots_the_kernel_and_initramfs(debian_kernel, busybox_initramfs):  # noqa: F811
    """The reference: QEMU boots Debian's kernel into our initramfs, which prints the marker, shows the
    APIC lines of the kernel log and powers off."""
    t0 = time.perf_counter()
    r = subprocess.run([QEMU, "-nographic", "-no-reboot", "-m", "256M", "-kernel", str(debian_kernel),
                        "-initrd", str(busybox_initramfs), "-append", "console=ttyS0 panic=-1"],
                       check=False, capture_output=True, timeout=90, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    out = r.stdout.decode(errors="replace")
    assert MARKER in out, out[-3000:]
    after = out.split(MARKER, 1)[1]
    assert debian_kernel.name.removeprefix("vmlinuz-") in after        # uname -r in the guest
    assert "APIC" in after.upper()
    assert "reboot: Power down" in out
    assert elapsed < 60


@needs_qemu
def test_qemu_loads_the_modules_we_packed(debian_kernel, debian_modules):  # noqa: F811
    init = debian.INIT_HEADER + debian.LOAD_MODULES + "echo MODULES-LOADED\nlsmod\npoweroff -f\n"
    img = debian.initramfs(init, ["virtio_blk"])
    r = subprocess.run([QEMU, "-nographic", "-no-reboot", "-m", "256M", "-kernel", str(debian_kernel),
                        "-initrd", str(img), "-append", "console=ttyS0 panic=-1 quiet"],
                       check=False, capture_output=True, timeout=90, stdin=subprocess.DEVNULL)
    out = r.stdout.decode(errors="replace")
    assert "MODULES-LOADED" in out, out[-3000:]
    lsmod = out.split("MODULES-LOADED", 1)[1]
    for m in ("virtio_blk", "virtio_ring", "virtio"):
        assert f"insmod {m} failed" not in out
        assert f"\n{m} " in lsmod.replace("\r", "")


def test_vmm_boots_the_kernel_and_initramfs(debian_kernel, busybox_initramfs):  # noqa: F811
    """Our VMM boots the same kernel and initramfs as the QEMU reference above, entering through the
    64-bit boot protocol, up to the marker of /init and the end of poweroff -f."""
    from vmm.firmware.linux import load_linux
    from vmm.machine import StopReason
    from vmm.platform.pc import PcConfig, PcMachine

    m = PcMachine(PcConfig(mem_size=256 << 20))
    try:
        load_linux(m, debian_kernel.read_bytes(), busybox_initramfs.read_bytes(), "console=ttyS0 panic=-1")
        res = m.run(20_000_000_000)
        out = bytes(m.serial_out).decode(errors="replace")
        assert MARKER in out, f"{res}\n{out[-3000:]}"
        after = out.split(MARKER, 1)[1]
        assert debian_kernel.name.removeprefix("vmlinuz-") in after
        assert "reboot: System halted" in after or "reboot: Power down" in after, f"{res}\n{after[-2000:]}"
        assert res.reason is not StopReason.LIMIT
    finally:
        m.vcpu.close()
