"""The regression corpus: every input a fuzzer (or issue 16's probe) found
that once crashed, hung or fooled a reader, run through the same check as the
fuzz target it belongs to (tests/fuzz/corpus/<target>/).  Replay cases whose
fix lies outside the files these fuzzers cover are named open-*: they must
still fail the strict check (xfail, strict), so the day they are fixed the
test says so and they lose the prefix."""
from __future__ import annotations

import pytest

from tests.fuzz.harness import (
    CORPUS,
    check_log_bytes,
    check_replay_bytes,
    check_snapshot_bytes,
    check_state_bytes,
)

CHECKS = {"log": check_log_bytes, "snapshot": check_snapshot_bytes, "state": check_state_bytes,
          "replay": lambda data: check_replay_bytes(data, strict=True)}
CASES = sorted(p for kind in CHECKS if (CORPUS / kind).is_dir() for p in (CORPUS / kind).iterdir())


def _param(p):
    marks = [pytest.mark.xfail(strict=True, reason="open finding: fixed in replay/session.py (issue 16)")] \
        if p.name.startswith("open-") else []
    return pytest.param(p, id=f"{p.parent.name}/{p.name}", marks=marks)


@pytest.mark.parametrize("path", [_param(p) for p in CASES])
def test_corpus_case(path):
    CHECKS[path.parent.name](path.read_bytes())
