"""Session fixtures for real guests built from Debian packages (tools/debian.py).

Import the fixtures into a test module (``from tests.realguests import
debian_kernel, busybox_initramfs``) and name them as parameters.  Each skips
the test, with the reason, where the packages cannot be had (no apt-get, no
way to the archive).

``busybox_initramfs`` is the reference guest: its /init mounts proc, sysfs and
devtmpfs, prints ``MARKER``, lists the APIC lines of the kernel log and
powers off at once, so a boot that reaches user space ends by itself.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tools import debian

MARKER = "VMM-REALGUEST-INIT-OK"
INIT_SCRIPT = debian.INIT_HEADER + f"""echo {MARKER}
uname -r
dmesg | grep -i apic
poweroff -f
"""


def _available(what, *args):
    try:
        return what(*args)
    except debian.DebianUnavailable as e:
        pytest.skip(f"Debian packages unavailable: {e}")


@pytest.fixture(scope="session")
def debian_kernel() -> Path:
    """The bzImage of Debian's current amd64 kernel (linux-image-amd64's dependency)."""
    return _available(debian.kernel)


@pytest.fixture(scope="session")
def debian_modules(debian_kernel: Path) -> Path:
    """/lib/modules/<release> of that kernel."""
    return _available(debian.modules_dir)


@pytest.fixture(scope="session")
def debian_busybox() -> Path:
    """The static busybox binary of busybox-static."""
    return _available(debian.busybox)


@pytest.fixture(scope="session")
def debian_seabios() -> Path:
    """SeaBIOS's 128 KiB ROM image (bios.bin)."""
    return _available(debian.seabios)


@pytest.fixture(scope="session")
def busybox_initramfs() -> Path:
    """A gzip'd cpio initramfs with busybox-static and INIT_SCRIPT as /init."""
    return _available(debian.initramfs, INIT_SCRIPT)
