"""docs/api.md's examples run: every ```python block, each on its own, in an empty folder."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def blocks() -> list[tuple[str, str]]:
    """(the heading above it, the code) of each python block."""
    out, heading = [], "top"
    for m in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```$", DOC.read_text(), re.M | re.S):
        if m.group(1):
            heading = m.group(1)
        else:
            out.append((heading, m.group(2)))
    return out


def test_the_page_has_examples_for_each_use():
    headings = {h for h, _ in blocks()}
    assert {"Boot a guest from pytest and assert on its console", "Find the store that broke a value in a recording",
            "Reverse debugging without gdb", "Watching the guest from outside: introspection"} <= headings


@pytest.mark.parametrize("heading,code", blocks(), ids=[f"{i}-{h[:30]}" for i, (h, _) in enumerate(blocks())])
def test_example_runs(heading, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"docs/api.md ({heading})", "exec"), {"__name__": "__docs__"})
