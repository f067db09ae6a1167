"""Per-step overhead of gradwatch on PyTorch: plain training vs watched, alternating runs.

Configurations run in turn (A B C A B C ...) so machine drift cancels; each round times
``--steps`` optimizer steps after ``--warmup`` untimed ones (a multiple of check_every, so check
steps are counted at their real share); the reported number is the median over rounds of the
per-round mean step time, and the ratio to plain training.

    python benchmarks/torch_overhead.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/torch_overhead.py --quick    # smoke run, well under a minute
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

import gradwatch


def mlp() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.LazyLinear(256), nn.ReLU())],
                          nn.Linear(256, 10))
    return model, (torch.randn(128, 64), torch.randint(0, 10, (128,)))


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Sequential() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                       nn.BatchNorm2d(c_out)))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def cnn() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """ResNet-8-like on 32x32: stem + 3 residual blocks."""
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    return model, (torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))


MODELS = {"mlp": mlp, "cnn": cnn}
CONFIGS = {
    "plain": None,
    "gradwatch-default": {},
    "gradwatch-every-step": {"check_every": 1, "activation_every": 1},
}


class Runner:
    def __init__(self, model_name: str, config: dict | None) -> None:
        torch.manual_seed(0)
        self.model, (self.x, self.y) = MODELS[model_name]()
        self.model(self.x)  # materialise lazy layers
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.watcher = (gradwatch.torch.watch(self.model, optimizer=self.opt, on_finding="log",
                                              **config) if config is not None else None)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        if self.watcher is not None:
            self.watcher.observe_loss(loss)
        self.opt.step()

    def timed(self, steps: int, warmup: int) -> float:
        for _ in range(warmup):
            self.step()
        # Mean over the round, not the median step: check steps are 1 in check_every and their
        # cost must be counted, amortised.
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - t) / steps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few rounds and steps (CI smoke test)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 3, 10, 2
    torch.set_num_threads(torch.get_num_threads())
    results = {"machine": f"{platform.processor() or platform.machine()}, "
                          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
               "command": "python benchmarks/torch_overhead.py " + " ".join(argv or []),
               "rounds": args.rounds, "steps": args.steps, "models": {}}
    for model_name in args.models.split(","):
        runners = {name: Runner(model_name, cfg) for name, cfg in CONFIGS.items()}
        per_round: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                per_round[name].append(runner.timed(args.steps, args.warmup))
        plain = statistics.median(per_round["plain"])
        rows = {}
        for name in CONFIGS:
            med = statistics.median(per_round[name])
            rows[name] = {"median_ms": med * 1e3, "ratio": med / plain,
                          "added_ms": (med - plain) * 1e3}
        results["models"][model_name] = rows
        for r in runners.values():
            if r.watcher is not None:
                r.watcher.remove()
    print(f"{'model':<6} {'config':<22} {'median ms/step':>15} {'ratio':>7} {'added ms':>9}")
    for model_name, rows in results["models"].items():
        for name, row in rows.items():
            print(f"{model_name:<6} {name:<22} {row['median_ms']:>15.3f} {row['ratio']:>7.3f} "
                  f"{row['added_ms']:>9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
