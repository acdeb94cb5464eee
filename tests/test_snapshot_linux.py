"""Issue 9's snapshot property on software nobody here wrote: Debian's Linux.

A recording of Debian's kernel booting a busybox initramfs to power-off, saved
at two hypothesis-drawn icounts (one in the first three quarters of the boot:
the decompressor and early setup; one in the kernel proper, where timers,
the APIC, the HPET and the UART interrupt it), then restored in new
processes: each restored run finishes with the same exit, the same icount,
the same console output and the same final digest (every register and RAM
page hash) as the recording that never stopped; and taking the two snapshots
does not change the recording either.  A stop of the VMM is invisible to the
guest, or this fails: an earlier main diverged within ~10^4 instructions of a
restore at 4.8 G and took another path when save points were added.

Everything comes from Debian's packages at test time (tools/debian.py); the
test skips with the reason where the packages cannot be had.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from replay.session import record, state_digest
from tests.realguests import MARKER, busybox_initramfs, debian_kernel  # noqa: F401 - pytest fixtures
from tests.test_snapshot import restore_in_a_new_process
from vmm.machine import StopReason

APPEND = "console=ttyS0 panic=-1"
LIMIT = 20_000_000_000


def boot(kernel: Path, initrd: Path, log: Path, save_at=None) -> dict:
    res, m = record(str(kernel), kernel.read_bytes(), str(log), mem_size=256 << 20, cmdline=APPEND,
                    initrd=(str(initrd), initrd.read_bytes()), max_instructions=LIMIT, save_at=save_at)
    assert res.reason is StopReason.POWEROFF and res.status == 0, res
    return {"reason": res.reason.value, "status": res.status, "icount": res.icount, "digest": state_digest(m),
            "serial": bytes(m.serial_out).hex(), "clock": m.clock.now()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("linux-snapshots")


@pytest.fixture(scope="module")
def uninterrupted(workdir, debian_kernel, busybox_initramfs) -> dict:  # noqa: F811
    """The recording that never stopped."""
    ref = boot(debian_kernel, busybox_initramfs, workdir / "ref.vmlog")
    assert MARKER in bytes.fromhex(ref["serial"]).decode(errors="replace")
    return ref


@settings(max_examples=1, deadline=None, phases=[Phase.explicit, Phase.generate],  # a boot per example: no shrinking
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(early=st.floats(0.02, 0.75), late=st.floats(0.75, 0.995))
def test_a_linux_boot_restored_from_a_snapshot_finishes_as_the_run_that_never_stopped(
        workdir, debian_kernel, busybox_initramfs, uninterrupted, early, late):  # noqa: F811
    ref = uninterrupted
    points = sorted({max(1, int(ref["icount"] * early)), int(ref["icount"] * late)})
    snaps = [(at, workdir / f"at-{at}.snap") for at in points]
    saving = boot(debian_kernel, busybox_initramfs, workdir / "saving.vmlog",
                  save_at=[(at, str(p)) for at, p in snaps])
    assert saving == ref                      # taking the snapshots did not change the run
    for at, snap in snaps:
        got = restore_in_a_new_process(snap, LIMIT, timeout=600)
        assert got["start"] == at
        for key in ("reason", "status", "icount", "digest", "serial", "clock"):
            assert got[key] == ref[key], (at, key)
