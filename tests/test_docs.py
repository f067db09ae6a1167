"""The docs' examples run as they stand: a reader who pastes one gets what the page says."""

from __future__ import annotations

import pathlib
import re
import warnings

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("index", [
    pytest.param(0, id="plugins-detector-and-sink"),
    pytest.param(2, id="plugins-numpy-adapter"),
])
def test_plugins_page_examples_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = python_blocks("plugins.md")[index]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an example that warns would teach the wrong thing
        exec(compile(code, f"docs/plugins.md block {index}", "exec"), {"__name__": "example"})
    if index == 0:
        rows = (tmp_path / "findings.csv").read_text().splitlines()
        assert len(rows) == 1 and rows[0].startswith("demo,7,loss_spike,,warning,")


def test_the_first_plugins_example_is_the_detector():
    # The page promises its first block runs as it stands: keep the runnable one first.
    assert "class LossSpikeDetector" in python_blocks("plugins.md")[0]
