"""Overhead of gradwatch.transformers.GradWatchCallback on a Hugging Face ``Trainer``: the tiny
GPT-2 of the tests (2 layers, 32 wide, vocabulary 64, sequences of 16, batch 16) trained on CPU
for ``--steps`` optimizer steps, without and with the callback (default options:
``check_every=10``).

Rounds are paired and alternate their order (plain first, then gradwatch first, ...); each run
builds a fresh model (same seed) and Trainer. Two numbers per run: the wall time of
``trainer.train()`` (setup included: the callback's attach, its ``gc`` lookup of the callback
list and its detach), and the mean step interval after ``--warmup`` steps (a timing callback
stamps every ``on_step_end``). Reported: medians over rounds, the median of the per-round
ratios (gradwatch / plain) and the ratio of the medians.

    python benchmarks/hf_trainer_overhead.py                 # 5 rounds of 100 steps
    python benchmarks/hf_trainer_overhead.py --quick         # smoke run
    python benchmarks/hf_trainer_overhead.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="paired rounds (default 5)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the step time")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: steadier on a shared machine; 0 keeps "
                        "torch's default)")
    p.add_argument("--quick", action="store_true", help="2 rounds of 20 steps")
    p.add_argument("--json", help="also write the numbers here")
    return p


def _run(with_gradwatch: bool, steps: int, warmup: int, workdir: str) -> tuple[float, float]:
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from gradwatch.transformers import GradWatchCallback

    class Stamps(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    g = torch.Generator().manual_seed(0)
    half = torch.randint(0, 64, (512, 8), generator=g)
    ids = torch.cat([half, half], 1)
    data = [{"input_ids": row, "labels": row} for row in ids]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                       n_positions=32))
    args = TrainingArguments(output_dir=workdir, max_steps=steps, per_device_train_batch_size=16,
                             learning_rate=1e-2, use_cpu=True, disable_tqdm=True,
                             save_strategy="no", report_to="none", logging_steps=50, seed=0)
    stamps = Stamps()
    callbacks = [stamps] + ([GradWatchCallback(on_finding="log")] if with_gradwatch else [])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    t = stamps.times[warmup - 1:]
    step_ms = 1000 * (t[-1] - t[0]) / (len(t) - 1)
    return wall, step_ms


def main(argv: list[str] | None = None) -> dict:
    opts = parser().parse_args(argv)
    if opts.quick:
        opts.rounds, opts.steps = 2, 20
    if opts.threads > 0:
        import torch

        torch.set_num_threads(opts.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    results: dict[str, dict[str, list[float]]] = {
        name: {"train_s": [], "step_ms": []} for name in ("plain", "gradwatch")}
    with tempfile.TemporaryDirectory() as workdir:
        _run(False, min(opts.steps, 20), min(opts.warmup, 5), workdir)  # imports, first kernels
        for r in range(opts.rounds):
            order = ("plain", "gradwatch") if r % 2 == 0 else ("gradwatch", "plain")
            for name in order:
                wall, step = _run(name == "gradwatch", opts.steps, opts.warmup, workdir)
                results[name]["train_s"].append(wall)
                results[name]["step_ms"].append(step)
    summary = {}
    for key in ("train_s", "step_ms"):
        plain, ours = results["plain"][key], results["gradwatch"][key]
        summary[key] = {
            "plain_median": statistics.median(plain), "gradwatch_median": statistics.median(ours),
            "paired_ratio": statistics.median(b / a for a, b in zip(plain, ours)),
            "ratio_of_medians": statistics.median(ours) / statistics.median(plain),
            "plain_rounds": plain, "gradwatch_rounds": ours}
    print(f"tiny GPT-2, {opts.steps} steps, {opts.rounds} paired rounds, "
          f"torch threads {opts.threads or 'default'}, loadavg {os.getloadavg()[0]:.2f}")
    print(f"{'':10} {'plain':>10} {'gradwatch':>10} {'paired':>8} {'of med.':>8}")
    for key, unit in (("train_s", "s"), ("step_ms", "ms")):
        s = summary[key]
        print(f"{key:10} {s['plain_median']:>8.3f}{unit:<2} {s['gradwatch_median']:>8.3f}"
              f"{unit:<2} {s['paired_ratio']:>8.3f} {s['ratio_of_medians']:>8.3f}")
    out = {"command": " ".join(["python", "benchmarks/hf_trainer_overhead.py", *sys.argv[1:]]),
           "settings": {"rounds": opts.rounds, "steps": opts.steps, "warmup": opts.warmup,
                        "threads": opts.threads},
           "results": summary}
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
