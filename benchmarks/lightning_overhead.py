"""What GradWatchCallback costs a Lightning fit: plain Trainer vs the same Trainer with the
callback, in paired rounds.

Each round fits a fresh copy of the same model (the 4x256 MLP of ``torch_overhead.py``, batch
64, SGD) for ``--steps`` optimizer steps three times: plain, with the torch watcher attached by
hand in a bare callback (no loss, no logging), and with GradWatchCallback; the order alternates
from round to round (so machine drift cancels), and the time of each fit excludes building the
Trainer. Reported: the median over rounds of each configuration's seconds per step, and the
median of the per-round ratios to plain. The logger is Lightning's CSVLogger in all three (so
the callback's ``log_metrics`` calls are in the timing), progress bar and checkpointing off.

    python benchmarks/lightning_overhead.py --rounds 7 --steps 300
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
from torch import nn


def build(pl: Any) -> Any:
    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            layers: list[nn.Module] = []
            d = 256
            for _ in range(4):
                layers += [nn.Linear(d, 256), nn.ReLU()]
            self.net = nn.Sequential(*layers, nn.Linear(256, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return MLP()


def loader(steps: int) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64 * steps, 256, generator=gen)
    y = torch.randint(0, 10, (64 * steps,), generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)


def bare_watch(pl: Any) -> Any:
    import gradwatch

    class BareWatch(pl.Callback):
        """The torch watcher attached by hand (as users did before the callback): no loss, no
        logging, so ``callback`` minus this is what the integration itself adds."""

        def on_fit_start(self, trainer, pl_module):
            self.watcher = gradwatch.torch.watch(pl_module, optimizer=trainer.optimizers[0])

        def on_fit_end(self, trainer, pl_module):
            self.watcher.remove()

    return BareWatch()


def fit_seconds(pl: Any, steps: int, config: str, logdir: str) -> float:
    from gradwatch.lightning import GradWatchCallback

    callbacks = {"plain": [], "watch": [bare_watch(pl)], "callback": [GradWatchCallback()]}[config]
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, callbacks=callbacks,
                         logger=pl.loggers.CSVLogger(logdir), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    module, data = build(pl), loader(steps)
    start = time.perf_counter()
    trainer.fit(module, data)
    return (time.perf_counter() - start) / steps


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="write the numbers here too")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps < 20:
        ap.error("--rounds must be >= 1 and --steps >= 20")
    if args.threads:
        torch.set_num_threads(args.threads)
    import lightning.pytorch as pl

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    configs = ("plain", "watch", "callback")
    times: dict[str, list[float]] = {name: [] for name in configs}
    ratios: dict[str, list[float]] = {name: [] for name in configs[1:]}
    with tempfile.TemporaryDirectory() as logdir:
        fit_seconds(pl, 20, "callback", logdir)  # warm-up: imports, first traces
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else configs[::-1]
            got = {name: fit_seconds(pl, args.steps, name, logdir) for name in order}
            for name, t in got.items():
                times[name].append(t)
            for name in configs[1:]:
                ratios[name].append(got[name] / got["plain"])
    result: dict[str, Any] = {name: statistics.median(t) for name, t in times.items()}
    result["ratio"] = statistics.median(ratios["callback"])
    result["watch_ratio"] = statistics.median(ratios["watch"])
    result.update(rounds=args.rounds, steps=args.steps, threads=torch.get_num_threads(),
                  torch=torch.__version__, lightning=pl.__version__)
    print(f"Lightning fit, 4x256 MLP, {args.steps} steps x {args.rounds} rounds, "
          f"{result['threads']} threads; ratio: median of the paired rounds' ratios to plain")
    print(f"  plain                        {1e3 * result['plain']:.3f} ms/step")
    print(f"  watch() by hand (no logging) {1e3 * result['watch']:.3f} ms/step  "
          f"ratio {result['watch_ratio']:.3f}")
    print(f"  GradWatchCallback            {1e3 * result['callback']:.3f} ms/step  "
          f"ratio {result['ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
