"""Fuzz the snapshot reader (``vmm.state.read_snapshot``) and the state codec
(``decode``): every hostile file is one SnapshotError line (every hostile
encoding one StateError line), in bounded time and memory."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.harness import check_snapshot_bytes, check_state_bytes, fuzz_settings, tally
from tests.fuzz.strategies import byte_mutations, hostile_snapshots, plain_state
from vmm.state import decode, encode


@fuzz_settings(200)
@given(data=hostile_snapshots())
def test_read_snapshot_on_hostile_files(data):
    tally("read_snapshot_on_hostile_files", check_snapshot_bytes(data))


@fuzz_settings(100)
@given(data=byte_mutations("snapshot", max_ops=6))
def test_read_snapshot_on_damaged_files(data):
    tally("read_snapshot_on_damaged_files", check_snapshot_bytes(data))


@fuzz_settings(300)
@given(data=st.one_of(st.binary(max_size=200), plain_state.map(encode).flatmap(lambda b: byte_mutations(b))))
def test_decode_on_hostile_bytes(data):
    tally("decode_on_hostile_bytes", check_state_bytes(data))


@fuzz_settings(200)
@given(state=plain_state)
def test_plain_state_round_trips(state):
    assert decode(encode(state)) == state
    tally("plain_state_round_trips", "round-tripped")
