"""Fuzz the log readers: LogReader, StreamLogReader, describe and verify on
hostile logs (tests/fuzz/README.md says how to run it long).  Each example
must end in a one-line LogFormatError or a read, within the time bound, and
the readers must agree: verify says ok exactly when the file reader and the
stream reader read the whole log, it ends with its END, and its config passes
replay.config.check_config."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.harness import check_log_bytes, fuzz_settings, header_bytes, hello_recording, tally
from tests.fuzz.strategies import byte_mutations, hostile_logs


@fuzz_settings(250)
@given(data=hostile_logs("hello"))
def test_log_readers_on_logs_built_from_a_recording(data):
    tally("log_readers_on_logs_built_from_a_recording", check_log_bytes(data))


@fuzz_settings(100)
@given(data=hostile_logs("crash", versions=(1, 2), hostile_config=0.3, framing=0.3, bytewise=0.3))
def test_log_readers_on_old_format_logs(data):
    tally("log_readers_on_old_format_logs", check_log_bytes(data))


@fuzz_settings(100)
@given(data=st.sampled_from(["hello", "crash"]).flatmap(lambda name: byte_mutations(name, max_ops=6)))
def test_log_readers_on_damaged_recordings(data):
    tally("log_readers_on_damaged_recordings", check_log_bytes(data))


@fuzz_settings(100)
@given(version=st.sampled_from([1, 2, 3]), tail=st.binary(max_size=300))
def test_log_readers_on_arbitrary_bytes_after_a_header(version, tail):
    tally("log_readers_on_arbitrary_bytes", check_log_bytes(header_bytes(hello_recording()[1], version) + tail))
    tally("log_readers_on_arbitrary_bytes", check_log_bytes(b"VMMRLOG\0" + tail))
