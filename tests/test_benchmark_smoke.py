"""The overhead benchmark runs and writes well-formed results (timings are not asserted: this
machine is shared; docs/performance.md holds the measured numbers)."""

from __future__ import annotations

import json
import math
import pathlib
import statistics
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = ["plain", "gradwatch-default", "gradwatch-every-step", "floor", "naive-item"]
#: What --quick runs: alternating rounds, timed steps per round, warm-up steps; sweep depths.
QUICK_SETTINGS = {"rounds": 2, "steps": 10, "warmup": 2}
QUICK_DEPTHS = ["10", "100"]
#: Parameter tensors of the benchmark's models: the naive logger syncs once per tensor.
PARAM_TENSORS = {"mlp": 10, "cnn": 29, "transformer": 52}


def check_rows(rows: dict, rounds: int) -> None:
    """Every configuration's numbers, recomputed from the per-round step times it lists (the
    mean step time of each round, in ms rounded to 0.1 µs): median over rounds, ratio of
    medians and median of the per-round ratios to plain, added time."""
    assert list(rows) == QUICK
    plain = rows["plain"]["rounds_ms"]
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        r = row["rounds_ms"]
        assert len(r) == rounds and all(math.isfinite(x) and x > 0 for x in r), (name, r)
        rel = 1e-4 / min(r + plain)  # what rounding the rounds to 0.1 µs can move a ratio
        med, plain_med = statistics.median(r), statistics.median(plain)
        assert row["median_ms"] == pytest.approx(med, abs=1e-4), name
        assert row["ratio"] == pytest.approx(med / plain_med, rel=rel), name
        assert row["paired_ratio"] == pytest.approx(
            statistics.median(a / b for a, b in zip(r, plain)), rel=rel), name
        assert row["added_ms"] == pytest.approx(med - plain_med, abs=2e-4), name
    assert rows["plain"]["ratio"] == rows["plain"]["paired_ratio"] == 1.0
    assert rows["plain"]["added_ms"] == 0.0


def check_quick_results(results: dict, stdout: str, md: str) -> None:
    """What ``torch_overhead.py --quick`` must have written and printed."""
    assert {k: results[k] for k in QUICK_SETTINGS} == QUICK_SETTINGS
    assert "--quick" in results["command"] and results["wall_s"] > 0
    assert list(results["models"]) == ["mlp", "cnn", "transformer"]
    table = {tuple(line.split()[:2]): line.split()[2:] for line in stdout.splitlines()
             if len(line.split()) == 6 and not line.startswith("memory")}
    for model, rows in results["models"].items():
        check_rows(rows, results["rounds"])
        # The printed table and results.md quote these rows, not other numbers.
        for name, row in rows.items():
            assert table[model, name] == [f"{row['median_ms']:.3f}", f"{row['ratio']:.3f}",
                                          f"{row['paired_ratio']:.3f}",
                                          f"{row['added_ms']:.3f}"], (model, name)
            assert f"| {model} | {name} | {row['median_ms']:.2f} | {row['ratio']:.3f} | " in md
        # Host synchronisations: gradwatch reads once per check whatever the model; the naive
        # logger once per parameter tensor per step.
        assert results["syncs_per_step"][model] == {
            "gradwatch-default": pytest.approx(0.1), "gradwatch-every-step": 1.0,
            "floor": 1.0, "naive-item": PARAM_TENSORS[model]}, model
        mem = results["memory"][model]
        for mode in ("gradwatch-default", "gradwatch-exact"):
            assert mem[mode]["persistent_bytes"] > 0
            assert math.isfinite(mem[mode]["peak_extra_fraction_of_params"])
        # exact mode keeps a full copy of the parameters; the default only samples them
        assert mem["gradwatch-exact"]["persistent_bytes"] >= mem["param_bytes"]
        assert mem["gradwatch-default"]["persistent_bytes"] < mem["param_bytes"]
    scaling = results["scaling"]
    assert list(scaling) == QUICK_DEPTHS
    for depth, entry in scaling.items():
        rows = entry["configs"]
        check_rows(rows, results["rounds"])
        for name, row in rows.items():
            assert table[f"mlp-{depth}x16", name][1] == f"{row['ratio']:.3f}", (depth, name)
        assert entry["param_tensors"] == 2 * int(depth)
        assert rows["gradwatch-default"]["syncs_per_step"] == pytest.approx(0.1)
        assert rows["gradwatch-every-step"]["syncs_per_step"] == pytest.approx(1.0)
        assert rows["naive-item"]["syncs_per_step"] == pytest.approx(entry["param_tensors"])
    assert len(table) == len(results["models"]) * len(QUICK) + len(scaling) * len(QUICK)


@pytest.mark.slow
def test_torch_benchmark_quick_mode_writes_results_and_plot(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "torch_overhead.py"), "--quick",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    check_quick_results(results, proc.stdout, (out / "results.md").read_text())
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torch_benchmark_rejects_bad_arguments_by_name():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "torch_overhead.py"), "--configs",
         "plain,no-such-tool"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--configs" in proc.stderr and "no-such-tool" in proc.stderr


def test_torch_benchmark_refuses_quick_with_the_settings_quick_overrides():
    # --quick sets rounds/steps itself: a --rounds the user gave must not be silently dropped.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "torch_overhead.py"), "--quick",
         "--rounds", "30", "--steps", "100"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "drop --rounds, --steps or drop --quick" in proc.stderr


@pytest.mark.parametrize("script, args, ratio", [
    pytest.param("lightning_overhead.py", ["--rounds", "1", "--steps", "20"],
                 lambda n: n["ratio"], id="lightning"),
    pytest.param("hf_trainer_overhead.py", ["--quick"],
                 lambda n: n["results"]["step_ms"]["paired_ratio"], id="hf-trainer"),
])
def test_trainer_benchmarks_run_and_write_their_numbers(script, args, ratio, tmp_path):
    pytest.importorskip("lightning" if script.startswith("lightning") else "transformers")
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args,
                           "--json", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    value = ratio(json.loads(out.read_text()))
    assert math.isfinite(value) and value > 0  # timings are not asserted (a shared machine)
