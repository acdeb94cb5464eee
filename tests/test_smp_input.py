"""Two vCPUs and console input arriving at random moments: every recording replays exactly (issue 11).

tests/ft_guest.py with SMP=1: the BSP starts the AP through the LAPIC (INIT,
SIPI), the AP counts in memory, the BSP prints its line number and the AP's
counter on every line and, every ASK lines, waits for one console byte and
echoes it.  The transcript therefore shows the interleaving of the two vCPUs
and where each byte arrived.  Hypothesis draws the scheduling quantum and the
poll numbers at which input chunks arrive; the replay must reproduce the
console, both vCPUs' counts and registers, and consume every event.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay.logfile import LogReader
from replay.session import Replayer, record
from tests import ft_guest
from tests.test_replay import scripted

pytestmark = pytest.mark.skipif(not ft_guest.have_nasm(), reason="nasm builds the SMP test guest")

LIMIT = 20_000_000   # console input is polled every few million instructions


def final(m):
    return (bytes(m.serial_out), [(v.icount, v.snapshot_regs()) for v in m.vcpus])


inputs = st.lists(st.tuples(st.integers(1, 30), st.binary(min_size=1, max_size=3)), max_size=4,
                  unique_by=lambda t: t[0])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(quantum=st.integers(500, 50_000), chunks=inputs)
def test_smp_recordings_with_input_at_any_moment_replay_exactly(tmp_path, quantum, chunks):
    image_path = ft_guest.build(lines=40, ask=5, smp=True, delay=2000)
    image = image_path.read_bytes()
    log = str(tmp_path / "smp-input.vmlog")
    res, m = record(str(image_path), image, log, boot_kind="flat", vcpus=2, quantum=quantum,
                    input_kind="file" if chunks else "none", input_to="serial",
                    live_input=scripted(list(chunks)) if chunks else None, max_instructions=LIMIT)
    want = final(m)
    assert b"?\n" in want[0]                    # the guest asked for input
    assert want[1][1][0] > 0                     # the AP ran
    typed = b"".join(c for _, c in sorted(chunks))
    echoed = bytes(want[0][i + 4] for i in range(len(want[0])) if want[0].startswith(b"got ", i))
    assert typed.startswith(echoed)              # the bytes echoed are the bytes typed, in order
    if chunks and min(n for n, _ in chunks) <= 3:
        assert echoed                            # input that came early was read
    rp = Replayer(log)
    r2 = rp.run()
    assert (r2.reason, r2.icount) == (res.reason, res.icount)
    assert final(rp.m) == want
    assert rp.events_used == sum(1 for _ in LogReader(log))
