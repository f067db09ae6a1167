"""gradwatch under torch.distributed: two CPU processes (gloo) training with DDP and FSDP2 give
the single-process run's numbers and findings, emit from rank 0 only by default, and never hang.

The two ranks run every scenario in one session (starting processes and importing torch is
most of the cost); the tests below assert on what each rank wrote. Run this file as a script
(``python test_distributed.py RANK PORT OUTDIR``) to be one rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import warnings

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import numpy as np  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402

WORLD = 2
STEPS = 40
CHECK_EVERY = 5
GLOBAL_BATCH = 64
#: A hang (a collective one rank never joins) fails the test instead of stalling CI.
TIMEOUT_S = 120


# -- the training run every scenario shares ------------------------------------------------------

def deep_sigmoid() -> nn.Sequential:
    """10 Linear+Sigmoid layers: the first layers' gradients vanish (finding at step 15)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    d = 2
    for _ in range(10):
        layers += [nn.Linear(d, 16), nn.Sigmoid()]
        d = 16
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers)


def batches(rank: int | None):
    """Per step, this rank's half of the global batch (the whole batch for rank None)."""
    from gradwatch.experiments import moons

    x, y = map(torch.from_numpy, moons(seed=0))
    gen = torch.Generator().manual_seed(1)
    per_rank = GLOBAL_BATCH // WORLD
    for _ in range(STEPS):
        idx = torch.randint(0, len(x), (GLOBAL_BATCH,), generator=gen)
        if rank is not None:
            idx = idx[rank * per_rank:(rank + 1) * per_rank]
        yield x[idx], y[idx]


class Recorder:
    """A run plugin: every step's per-layer statistics as the detectors got them."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, list[float]]] = {}

    @gradwatch.hookimpl
    def gradwatch_step_stats(self, stats) -> None:
        for i, step in enumerate(stats.steps):
            self.rows[int(step)] = {"grad_norm": stats.grad_norm[i].tolist()}
        last = self.rows[int(stats.step)]
        for name in ("weight_norm", "update_ratio", "weight_change", "grad_max",
                     "grad_zero_fraction"):
            value = getattr(stats, name)
            if value is not None:
                last[name] = np.asarray(value, dtype=float).tolist()


def train(model: nn.Module, rank: int | None, watch_target=None, micro: int = 1,
          nan_at: tuple[int, int] | None = None, **options) -> dict:
    """Train STEPS steps (watching when ``watch_target`` is given); what the rank saw.
    ``micro > 1``: each step accumulates that many micro-batches, all but the last under
    DDP's ``no_sync()`` (the loss divided by ``micro``: the step's gradient is the batch's).
    ``nan_at=(step, rank)``: that rank's batch at that step holds one NaN input."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    recorder = Recorder()
    called: list[str] = []
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("gradwatch")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    out: dict = {"error": None, "raised_at": None}
    w = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if watch_target is not None:
                if options.get("on_finding") == "callable":
                    options["on_finding"] = lambda f: called.append(f.kind)
                w = gradwatch.torch.watch(watch_target, optimizer=opt, plugins=[recorder],
                                          **options)
            for step, (xb, yb) in enumerate(batches(rank), start=1):
                if nan_at is not None and (step, rank) == nan_at:
                    xb = xb.clone()
                    xb[0, 0] = float("nan")
                opt.zero_grad()
                chunks = list(zip(xb.chunk(micro), yb.chunk(micro)))
                for i, (xc, yc) in enumerate(chunks):
                    last = i == len(chunks) - 1
                    with contextlib.nullcontext() if last else model.no_sync():
                        loss = nn.functional.binary_cross_entropy_with_logits(
                            model(xc).squeeze(-1), yc) / micro
                        loss.backward()
                    if w is not None:
                        w.observe_loss(loss * micro)
                try:
                    opt.step()
                except gradwatch.GradientHealthError:
                    out["raised_at"] = step
                    break
            if w is not None:
                w.remove()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    out["findings"] = [[f.kind, f.layer, f.step] for f in w.findings] if w else []
    out["skipped_steps"] = w.report().skipped_steps if w else 0
    with torch.no_grad():
        weights = [_distributed_full(p) for p in model.parameters()]
    out["weights_finite"] = all(bool(torch.isfinite(t).all()) for t in weights)
    out["weights"] = [float(t.double().sum()) for t in weights]
    out["stats"] = recorder.rows
    out["warnings"] = sum(issubclass(c.category, gradwatch.GradientHealthWarning) for c in caught)
    out["internal_warnings"] = [str(c.message) for c in caught
                                if issubclass(c.category, gradwatch.GradWatchInternalWarning)]
    out["log_records"] = len(records)
    out["called"] = called
    return out


def _distributed_full(p: torch.Tensor) -> torch.Tensor:
    """A parameter as a plain tensor (a DTensor gathered: every rank takes part)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


def worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist = torch.distributed
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from gradwatch_torch import _distributed
    from torch.nn.parallel import DistributedDataParallel as DDP

    collectives = []
    real_all_reduce = _distributed.all_reduce_sum
    _distributed.all_reduce_sum = lambda t: (collectives.append(t.numel()), real_all_reduce(t))
    results: dict = {}

    def run(name: str, fn, everyone: bool = True) -> None:
        collectives.clear()
        try:
            results[name] = fn()
        except Exception as exc:  # recorded: the other rank must not wait for a crash
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["collectives"] = len(collectives)
        if everyone:
            dist.barrier()

    events = os.path.join(outdir, "events.jsonl")
    if rank == 0:
        run("single", lambda: train(model := deep_sigmoid(), None, model, check_every=CHECK_EVERY,
                                    on_finding="callable"), everyone=False)

    def ddp(watch_module: bool, **options):
        model = DDP(deep_sigmoid())
        return train(model, rank, model.module if watch_module else model, **options)

    # Watching the DDP wrapper, default ranks="zero": only rank 0 warns, logs and writes.
    run("ddp_zero", lambda: ddp(False, check_every=CHECK_EVERY, events=events))
    run("ddp_all", lambda: ddp(True, check_every=CHECK_EVERY, on_finding="callable",
                               ranks="all", events=os.path.join(outdir, "all.jsonl")))
    run("ddp_callable_zero", lambda: ddp(True, check_every=CHECK_EVERY, on_finding="callable"))
    run("ddp_strict", lambda: ddp(True, check_every=CHECK_EVERY, on_finding="raise"))
    # Rank 1 does not watch at all; then the ranks check at different steps. No collective, so
    # neither can hang.
    run("ddp_rank0_only", lambda: train(model := DDP(deep_sigmoid()), rank,
                                        model if rank == 0 else None, check_every=CHECK_EVERY))
    run("ddp_no_sync", lambda: ddp(True, micro=2, check_every=CHECK_EVERY))
    run("ddp_check_every_differs", lambda: ddp(True, check_every=CHECK_EVERY if rank == 0 else 7))

    def fsdp(**options):
        from torch.distributed.fsdp import fully_shard

        model = deep_sigmoid()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        return train(model, rank, model, check_every=CHECK_EVERY, **options)

    run("fsdp", lambda: fsdp(update_ratio="exact", activation_every=None))
    # guard="skip", rank 1's batch at step 12 holds a NaN: every rank skips that step.
    run("ddp_guard", lambda: ddp(True, check_every=CHECK_EVERY, guard="skip", nan_at=(12, 1)))

    run("fsdp_guard", lambda: fsdp(guard="skip", nan_at=(12, 1)))
    if rank == 0:
        run("single_exact", lambda: train(model := deep_sigmoid(), None, model,
                                          check_every=CHECK_EVERY, update_ratio="exact",
                                          activation_every=None), everyone=False)
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)
    dist.destroy_process_group()


# -- the tests ------------------------------------------------------------------------------------
#: The tests that need the two processes (~10 s to start them and run every scenario).
spawned = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist")
    port = _free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(port), str(outdir)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
             for r in range(WORLD)]
    deadline = time.monotonic() + TIMEOUT_S
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [p.communicate()[0][-2000:] for p in procs]
        pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s (a hang):\n" + "\n".join(tails))
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"
    out = [json.loads((outdir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in range(WORLD):
        for name, res in out[r].items():
            assert res["error"] is None, f"rank {r}, {name}: {res['error']}"
            assert not res["internal_warnings"], (r, name, res["internal_warnings"])
    return out, outdir


def _norms(result: dict) -> np.ndarray:
    return np.array([result["stats"][str(s)]["grad_norm"] for s in range(1, STEPS + 1)])


@spawned
def test_ddp_gradients_are_read_after_the_all_reduce(ranks):
    """Each rank's local batch differs: read before DDP's all-reduce, the ranks' norms would
    differ from each other and from the single-process run on the whole batch."""
    (r0, r1), _ = ranks
    single = _norms(r0["single"])
    for name in ("ddp_zero", "ddp_all", "ddp_callable_zero"):
        a, b = _norms(r0[name]), _norms(r1[name])
        np.testing.assert_array_equal(a, b, err_msg=name)
        np.testing.assert_allclose(a, single, rtol=1e-4, atol=1e-12, err_msg=name)


@spawned
def test_ddp_no_sync_accumulation_gives_the_steps_all_reduced_gradient(ranks):
    """Two micro-batches per step, the first under ``no_sync()``: one step per ``opt.step()``
    (not per backward), read after the last backward's all-reduce. Read after the first, the
    norms would be of a quarter of the batch on one rank and differ between the ranks."""
    (r0, r1), _ = ranks
    a, b = _norms(r0["ddp_no_sync"]), _norms(r1["ddp_no_sync"])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, _norms(r0["single"]), rtol=1e-4, atol=1e-12)
    assert sorted(map(int, r0["ddp_no_sync"]["stats"])) == list(range(1, STEPS + 1))
    assert r0["ddp_no_sync"]["findings"] == r0["single"]["findings"]


@spawned
def test_ddp_findings_match_the_single_process_run_on_every_rank(ranks):
    (r0, r1), _ = ranks
    expected = r0["single"]["findings"]
    assert ["vanishing_gradient", "0", 15] in expected
    for name in ("ddp_zero", "ddp_all", "ddp_callable_zero"):
        assert r0[name]["findings"] == expected, name
        assert r1[name]["findings"] == expected, name  # kept on rank 1 even when it is silent
    # No collective from gradwatch under DDP (FSDP2 sums shards; the guard all-reduces its
    # flag through torch.distributed itself, see test_the_guard_skips_the_same_step_...).
    assert all(r[name]["collectives"] == 0 for r in (r0, r1) for name in r
               if not name.startswith("fsdp"))


@spawned
def test_by_default_only_rank_zero_warns_logs_calls_back_and_writes_events(ranks):
    (r0, r1), outdir = ranks
    assert r0["ddp_zero"]["warnings"] > 0 and r0["ddp_zero"]["log_records"] > 0
    assert r1["ddp_zero"]["warnings"] == 0 and r1["ddp_zero"]["log_records"] == 0
    assert r0["ddp_callable_zero"]["called"] and not r1["ddp_callable_zero"]["called"]
    events = [json.loads(line) for line in (outdir / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("start") == 1  # rank 1 did not append to it
    assert [[e["kind"], e["layer"], e["step"]] for e in events if e["event"] == "finding"] \
        == r0["single"]["findings"]
    assert not [p.name for p in outdir.iterdir() if p.name.startswith("events.rank")]


@spawned
def test_ranks_all_emits_on_every_rank_with_one_event_file_per_rank(ranks):
    (r0, r1), outdir = ranks
    expected = [kind for kind, _, _ in r0["single"]["findings"]]
    assert r0["ddp_all"]["called"] == expected and r1["ddp_all"]["called"] == expected
    for name in ("all.jsonl", "all.rank1.jsonl"):
        events = [json.loads(line) for line in (outdir / name).read_text().splitlines()]
        assert [e["event"] for e in events].count("start") == 1, name
        assert [e["kind"] for e in events if e["event"] == "finding"] == expected, name


@spawned
def test_strict_mode_raises_on_every_rank_at_the_same_step(ranks):
    (r0, r1), _ = ranks
    first = r0["single"]["findings"][0][2]
    assert r0["ddp_strict"]["raised_at"] == first
    assert r1["ddp_strict"]["raised_at"] == first
    assert r1["ddp_strict"]["log_records"] == 0  # silent on rank 1, but it stops


@spawned
def test_ranks_that_do_not_watch_or_check_at_other_steps_do_not_hang(ranks):
    """Reaching this test at all means no hang; rank 0's findings are unaffected."""
    (r0, r1), _ = ranks
    expected = r0["single"]["findings"]
    assert r0["ddp_rank0_only"]["findings"] == expected
    assert r1["ddp_rank0_only"]["findings"] == []
    assert r0["ddp_check_every_differs"]["findings"] == expected
    assert r1["ddp_check_every_differs"]["findings"]  # its own schedule (check_every=7)
    assert np.isfinite(_norms(r0["ddp_rank0_only"])).all()


@spawned
def test_fsdp2_norms_are_the_whole_parameters_not_one_shard(ranks):
    """fully_shard on CPU/gloo: each rank holds half of every weight (the last layer's single
    row lives on rank 0 only). The statistics are the full model's, on both ranks."""
    (r0, r1), _ = ranks
    single = r0["single_exact"]
    np.testing.assert_allclose(_norms(r0["fsdp"]), _norms(single), rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(_norms(r1["fsdp"]), _norms(single), rtol=1e-4, atol=1e-12)
    checked = 0
    for step in range(CHECK_EVERY, STEPS + 1, CHECK_EVERY):
        want = single["stats"][str(step)]
        for r in (r0, r1):
            got = r["fsdp"]["stats"][str(step)]
            for key in ("weight_norm", "update_ratio", "weight_change", "grad_max",
                        "grad_zero_fraction"):
                if key in want:
                    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-9,
                                               err_msg=f"{key} at step {step}")
                    checked += 1
    assert checked >= 2 * 8 * 3  # weight norms and both ratios at every check, both ranks
    # The whole-tensor view came from one all-reduce per check.
    assert r0["fsdp"]["collectives"] == r1["fsdp"]["collectives"] == STEPS // CHECK_EVERY


@spawned
def test_fsdp2_findings_match_the_single_process_run(ranks):
    (r0, r1), _ = ranks
    expected = r0["single_exact"]["findings"]
    assert ["vanishing_gradient", "0", 15] in expected
    assert r0["fsdp"]["findings"] == expected
    assert r1["fsdp"]["findings"] == expected


# -- the same rules in one process (torchrun's RANK variable, no process group) ---------------------

@pytest.mark.parametrize("ranks, emits", [
    pytest.param("zero", False, id="ranks-zero"),
    pytest.param("all", True, id="ranks-all"),
])
def test_rank_from_torchrun_environment_decides_what_is_emitted(ranks, emits, monkeypatch,
                                                                 tmp_path):
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = deep_sigmoid()
    out = train(model, None, model, check_every=CHECK_EVERY, ranks=ranks,
                events=tmp_path / "run.jsonl")
    assert ["vanishing_gradient", "0", 15] in out["findings"]  # kept either way
    assert bool(out["warnings"]) is emits and bool(out["log_records"]) is emits
    assert sorted(p.name for p in tmp_path.iterdir()) == (["run.rank1.jsonl"] if emits else [])


def test_ranks_option_is_validated():
    with pytest.raises(ValueError, match="ranks"):
        gradwatch.torch.watch(nn.Linear(2, 2), ranks="first")


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    sys.exit(0)


@spawned
@pytest.mark.parametrize("scenario", ["ddp_guard", "fsdp_guard"])
def test_the_guard_skips_the_same_step_on_every_rank(ranks, scenario):
    # Only rank 1's batch is bad; the flag is all-reduced, so both ranks skip step 12 and stay
    # in step: their weights are equal and finite at the end.
    (r0, r1), _ = ranks
    r0, r1 = r0[scenario], r1[scenario]
    for r in (r0, r1):
        assert r["error"] is None and not r["internal_warnings"], r
        assert r["skipped_steps"] == 1 and r["weights_finite"]
        assert ["nonfinite", 12] in [[kind, step] for kind, _, step in r["findings"]]
    assert r0["weights"] == pytest.approx(r1["weights"], rel=1e-6)
