"""At the end of a fuzz run: how many examples each target ran and how they
ended (the figures tests/fuzz/README.md asks a long run to report)."""
from __future__ import annotations

import resource


def pytest_terminal_summary(terminalreporter):
    from tests.fuzz.harness import TALLY

    if not TALLY:
        return
    tr = terminalreporter
    tr.section("fuzz outcomes")
    for target, outcomes in sorted(TALLY.items()):
        total = sum(outcomes.values())
        detail = ", ".join(f"{k} {v}" for k, v in outcomes.most_common())
        tr.write_line(f"{target:<28} {total:>8} examples: {detail}")
    tr.write_line(f"peak RSS of the run: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10} MiB")
