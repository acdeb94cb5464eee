"""Fuzz the replayer's entry: ``replay.session.Replayer`` constructed on a
hostile log built from a real recording (config fields edited, events
dropped, repeated, moved or changed, chunks reframed with valid checksums),
then run for at most REPLAY_INSTRUCTIONS instructions.  Only the replay
errors may come out (LogFormatError, ReplayError, Divergence, SnapshotError),
within the time bound."""
from __future__ import annotations

from hypothesis import given

from tests.fuzz.harness import check_replay_bytes, fuzz_settings, tally
from tests.fuzz.strategies import hostile_logs


@fuzz_settings(40)
@given(data=hostile_logs("hello", versions=(2, 3), hostile_config=0.2, framing=0.2, bytewise=0.1))
def test_replayer_on_hostile_logs(data):
    tally("replayer_on_hostile_logs", check_replay_bytes(data))
