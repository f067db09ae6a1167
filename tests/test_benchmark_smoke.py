"""The overhead benchmark runs and writes well-formed results (timings are not asserted: this
machine is shared; docs/performance.md holds the measured numbers)."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = ["plain", "gradwatch-default", "gradwatch-every-step", "floor", "naive-item"]


@pytest.mark.slow
def test_torch_benchmark_quick_mode_writes_results_and_plot(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "torch_overhead.py"), "--quick",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"mlp", "cnn", "transformer"}
    for model, rows in results["models"].items():
        assert list(rows) == QUICK, model
        for name, row in rows.items():
            assert "error" not in row, (model, name, row)
            assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0
            assert len(row["rounds_ms"]) == results["rounds"]
        plain = rows["plain"]["median_ms"]
        for name, row in rows.items():  # ratios and added times are to plain in the same run
            assert row["ratio"] == pytest.approx(row["median_ms"] / plain), name
            assert row["added_ms"] == pytest.approx(row["median_ms"] - plain), name
        assert f"{model:<12} gradwatch-default" in proc.stdout  # the printed table
        mem = results["memory"][model]
        for mode in ("gradwatch-default", "gradwatch-exact"):
            assert mem[mode]["persistent_bytes"] > 0
            assert math.isfinite(mem[mode]["peak_extra_fraction_of_params"])
        # exact mode keeps a full copy of the parameters; the default only samples them
        assert mem["gradwatch-exact"]["persistent_bytes"] >= mem["param_bytes"]
        assert mem["gradwatch-default"]["persistent_bytes"] < mem["param_bytes"]
    # Host synchronisations: gradwatch reads once per check whatever the model; the naive
    # logger once per parameter tensor per step.
    scaling = results["scaling"]
    assert set(scaling) == {"10", "100"}
    for entry in scaling.values():
        rows = entry["configs"]
        assert rows["gradwatch-default"]["syncs_per_step"] == pytest.approx(0.1)
        assert rows["gradwatch-every-step"]["syncs_per_step"] == pytest.approx(1.0)
        assert rows["naive-item"]["syncs_per_step"] == pytest.approx(entry["param_tensors"])
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torch_benchmark_rejects_bad_arguments_by_name():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "torch_overhead.py"), "--configs",
         "plain,no-such-tool"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--configs" in proc.stderr and "no-such-tool" in proc.stderr
