"""Introspection on a real guest: Debian's kernel booting a busybox initramfs.
From outside, without the guest noticing: the address-space switches of its
processes, and the system calls they make, with the buffers they pass read
through each process's own page tables."""
from __future__ import annotations

import vmm
from tests.realguests import MARKER, busybox_initramfs, debian_kernel  # noqa: F401  (fixtures)

SYS_WRITE, SYS_EXECVE = 1, 59      # x86-64 system call numbers


def test_linux_processes_seen_from_outside(debian_kernel, busybox_initramfs):  # noqa: F811
    m = vmm.boot(debian_kernel, initrd=busybox_initramfs, cmdline="console=ttyS0 panic=-1", mem="256M")
    spy = m.introspect
    switches, execs, first_user = [], [], []
    marker = []

    def on_call(c):
        if c.cpl != 3 or c.mechanism != "syscall":
            return
        if not first_user:
            first_user.append(c)
        if c.number == SYS_EXECVE:     # execve(path, argv, envp): strings in the caller's memory
            argv, at = [], c.args[1]
            while (ptr := int.from_bytes(spy.read(at, 8), "little")) and len(argv) < 64:
                argv.append(spy.read_string(ptr))
                at += 8
            execs.append((spy.read_string(c.args[0]), argv, c.cr3))
        if c.number == SYS_WRITE and 0 < c.args[2] < 4096:
            data = spy.read(c.args[1], c.args[2])            # the caller's buffer, through its page tables
            if MARKER.encode() in data:
                marker.append((data, c.cr3, c.icount))
                spy.stop("the init script printed its marker")

    calls = spy.on_syscall(on_call)
    cr3s = spy.on_cr3_switch(lambda e: switches.append(e))
    res = m.run(20_000_000_000)
    assert res.reason is vmm.StopReason.HOST, (res, m.console[-2000:])
    # the marker's write(1, buf, n), caught before the kernel ran it: the bytes the shell passed
    (data, cr3, icount), = marker
    assert data == (MARKER + "\n").encode() and MARKER.encode() not in m.console
    # the first execve: /init's first command, `mount -t proc proc /proc`, which busybox runs by
    # executing itself; its path and argv read from the shell's memory
    path, argv, _ = execs[0]
    assert path == b"/proc/self/exe" and argv == [b"mount", b"-t", b"proc", b"proc", b"/proc"], execs[:3]
    # user space ran in address spaces of its own: CR3 loads the kernel did for its processes
    assert first_user and first_user[0].cr3 != switches[0].old
    assert len({s.new for s in switches}) >= 2 and cr3 in {s.new for s in switches}
    # taken out, the traps leave a guest that goes on to print what the shell wrote, and power off
    spy.remove(calls)
    spy.remove(cr3s)
    res = m.run(20_000_000_000)
    assert res.reason is vmm.StopReason.POWEROFF and MARKER.encode() + b"\r\n" in m.console
