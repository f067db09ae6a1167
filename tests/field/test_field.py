"""The field suite: real architectures with their usual recipes (benchmarks/field).

Each case trains one scenario at one seed and asserts exactly the suite's judging rule: no crash,
no gradwatch.GradWatchInternalWarning, the label confirmed by raw evidence gathered without
gradwatch (truth_ok), and then a healthy run has no warning-severity finding (info is fine) while a
broken run has a warning of an expected kind (by its deadline) and none of its forbidden kinds.
Scenarios that need an optional package (transformers, lightning) skip without it.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.field import scenarios as field  # noqa: E402

CASES = [pytest.param(s, seed, id=f"{s.name}-seed{seed}")
         for s in field.SCENARIOS for seed in s.test_seeds]


def _explain(r: field.ScenarioResult) -> str:
    lines = [f"{r.name} seed {r.seed} ({r.label}): {r.verdict[1]}",
             f"truth: {r.truth_reason}"]
    for f in r.findings:
        lines.append(f"[{f.severity}] {f.kind} step {f.step} layer {f.layer!r}: {f.message}")
        if f.advice:
            lines.append("    advice: " + " | ".join(f.advice))
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize(("scenario", "seed"), CASES)
def test_field_scenario(scenario: field.Scenario, seed: int) -> None:
    missing = scenario.missing()
    if missing:
        # CI installs the dev extra, which brings them: there a missing one is a broken install.
        if os.environ.get("CI"):
            pytest.fail(f"{scenario.name} needs {', '.join(missing)}, which the dev extra installs")
        pytest.skip(f"needs {', '.join(missing)}")
    r = field.run_scenario(scenario, seed)
    assert r.crash is None, f"{r.name} seed {seed} crashed:\n{r.crash}"
    assert not r.internal_warnings, "GradWatchInternalWarning:\n" + "\n".join(r.internal_warnings)
    assert r.truth_ok, f"raw evidence does not support the label {r.label!r}: {r.truth_reason}"
    if r.healthy:
        assert not r.warnings, _explain(r)
    else:
        assert not r.forbidden_hits, _explain(r)
        assert r.detected, _explain(r)
    assert r.passed, _explain(r)


@pytest.mark.slow
def test_field_cli_writes_results_and_table(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "field"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.field.run", "--only", "deep_sigmoid", "dead_relu",
         "--seeds", "0", "--truth", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [(r["name"], r["seed"]) for r in runs] == [("deep_sigmoid", 0), ("dead_relu", 0)]
    for r in runs:
        assert r["crash"] is None and r["truth_ok"], r["truth_reason"]
        ev = r["evidence"]
        assert len(ev["losses"]) == ev["steps"] > 0
        assert ev["grad_norms"] and set(ev["grad_norms"]["1"]) <= set(ev["layers"])
        for f in r["findings"]:
            assert {"kind", "severity", "step", "layer", "message", "advice"} <= set(f)
    assert (proc.returncode == 0) == all(r["passed"] for r in runs)
    assert "deep_sigmoid  0" in proc.stdout and "median grad L2 per layer" in proc.stdout


@pytest.mark.slow
def test_field_cli_rejects_unknown_scenario_by_name() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.field.run", "--only", "no_such_run"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2
    assert "--only" in proc.stderr and "no_such_run" in proc.stderr
