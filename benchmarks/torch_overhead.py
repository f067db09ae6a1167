"""Per-step cost of gradwatch on PyTorch, side by side with the tools users would pick instead.

One run, one machine. Configurations run in turn (A B C … A B C …) so machine drift cancels;
each round times ``--steps`` optimizer steps after ``--warmup`` untimed ones; the reported number
is the median over rounds of the per-round mean step time (check steps count at their real
share), with its ratio to plain training in the same run. Then: peak extra memory (torch
profiler's allocation trace, CPU or CUDA), host synchronisations per step, and the scaling sweep
(thin MLPs of 10 → 1,000 layers) with a plot.

    python benchmarks/torch_overhead.py --out bench-out            # full run
    python benchmarks/torch_overhead.py --quick --out /tmp/quick   # smoke run, < 2 minutes

Peers (Cockpit, wandb, SageMaker Debugger) come from the ``benchmark`` extra, installed next to
the CPU torch so it is not replaced:

    pip install torch==2.13.0 -e ".[torch,benchmark]"

A peer that is not installed or fails is recorded with its error instead of a row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

# smdebug's generated protobuf modules need the pure-Python protobuf runtime.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402

# -- models ------------------------------------------------------------------------------------


def mlp(device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """MLP 64→4×256→10, batch 128: the step is short, so fixed costs show."""
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(),
                          *[m for _ in range(3) for m in (nn.Linear(256, 256), nn.ReLU())],
                          nn.Linear(256, 10))
    return model, torch.randn(128, 64), torch.randint(0, 10, (128,))


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.shortcut = (nn.Sequential() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                       nn.BatchNorm2d(c_out)))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


def cnn(device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """ResNet-8-like on 3×32×32, batch 64: stem + 3 residual blocks."""
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    return model, torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))


class Encoder(nn.Module):
    """Token embedding + 4-layer transformer encoder (d=256, 4 heads, FF 1024) + linear head."""

    def __init__(self, vocab: int = 1000, d: int = 256, layers: int = 4, seq: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens) + self.pos[:tokens.shape[1]]).mean(1))


def transformer(device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Transformer encoder stack, seq 64, batch 16: many parameter tensors (52)."""
    return Encoder(), torch.randint(0, 1000, (16, 64)), torch.randint(0, 10, (16,))


def thin_mlp(layers: int) -> Callable[[torch.device], tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    def build(device: torch.device):
        mods: list[nn.Module] = [nn.Linear(16, 16)]
        for _ in range(layers - 1):
            mods += [nn.ReLU(), nn.Linear(16, 16)]
        return nn.Sequential(*mods), torch.randn(32, 16), torch.randint(0, 16, (32,))
    return build


MODELS = {"mlp": mlp, "cnn": cnn, "transformer": transformer}

# -- configurations ----------------------------------------------------------------------------


class Config:
    """One way of training: ``setup`` attaches the tool to a fresh model, ``step`` trains once."""

    needs: str | None = None  # the module a peer needs, for the error when it is missing

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, workdir: str) -> None:
        self.model, self.x, self.y, self.workdir = model, x, y, workdir
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.loss_fn = nn.CrossEntropyLoss()
        self.steps = 0
        self.setup()

    def setup(self) -> None:
        pass

    def forward_backward(self) -> torch.Tensor:
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        return loss

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.forward_backward()
        self.opt.step()
        self.steps += 1

    def close(self) -> None:
        pass


class Plain(Config):
    pass


class GradWatch(Config):
    options: dict[str, Any] = {}

    def setup(self) -> None:
        self.watcher = gradwatch.torch.watch(self.model, optimizer=self.opt, on_finding="log",
                                             **self.options)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward_backward()
        self.watcher.observe_loss(loss)
        self.opt.step()

    def close(self) -> None:
        self.watcher.remove()


class GradWatchDefault(GradWatch):
    options: dict[str, Any] = {}


class GradWatchEveryStep(GradWatch):
    options = {"check_every": 1, "activation_every": 1}


class GradWatchNoChecks(GradWatch):
    """The default watcher's per-step recording alone: no check ever comes (``check_every`` past
    any run), so ``gradwatch-default`` minus this is what the checks cost."""

    # (the per-step ring buffer has check_every rows: longer than a run, no larger)
    options = {"check_every": 10_000, "activation_every": 10_000}


class GradWatchTensorBoard(GradWatch):
    """The default watcher writing every check to TensorBoard (``tensorboard=`` a temporary
    log directory: torch's SummaryWriter), so this minus ``gradwatch-default`` is the sink."""

    def setup(self) -> None:
        self._logdir = tempfile.TemporaryDirectory()
        self.options = {"tensorboard": self._logdir.name}
        super().setup()

    def close(self) -> None:
        super().close()  # remove(): the writer is flushed and closed
        self._logdir.cleanup()


class GradWatchGuard(GradWatch):
    """The default watcher with ``guard="skip"``: one finiteness check and one host sync
    before every optimizer step (docs/guard.md)."""

    options = {"guard": "skip"}


class GradWatchExact(GradWatch):
    options = {"update_ratio": "exact"}


class Floor(Config):
    """The least any per-layer gradient monitor must do: one batched norm, one transfer."""

    def step(self) -> None:
        super().step()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.last = torch.stack(torch._foreach_norm(grads, 2)).cpu()


class NaiveItem(Config):
    """A per-parameter ``.item()`` norm logger (what Lightning's ``grad_norm`` logging does):
    one host synchronisation per parameter tensor per step."""

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.forward_backward()
        self.last = {n: p.grad.norm(2).item() for n, p in self.model.named_parameters()
                     if p.grad is not None}
        self.opt.step()


class DetectAnomaly(Config):
    def step(self) -> None:
        with torch.autograd.detect_anomaly(check_nan=True):
            super().step()


class Cockpit(Config):
    """Cockpit's "economy" quantities (BackPACK), tracked every ``interval`` steps."""

    needs = "cockpit"
    interval = 1

    def setup(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from backpack import extend
            from cockpit import Cockpit as CockpitTool
            from cockpit.utils.configuration import configuration
            from cockpit.utils.schedules import linear
        self.model = extend(self.model)
        self.loss_fn = extend(nn.CrossEntropyLoss())
        self.individual = nn.CrossEntropyLoss(reduction="none")
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.cockpit = CockpitTool(self.model.parameters(), quantities=configuration(
            "economy", track_schedule=linear(self.interval)))

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        out = self.model(self.x)
        loss = self.loss_fn(out, self.y)
        losses = self.individual(out, self.y)
        info = {"batch_size": self.x.shape[0], "individual_losses": losses, "loss": loss,
                "optimizer": self.opt}
        with self.cockpit(self.steps, info=info):
            loss.backward(create_graph=self.cockpit.create_graph(self.steps))
        self.opt.step()
        self.steps += 1


class Cockpit16(Cockpit):
    interval = 16


class Wandb(Config):
    """``wandb.watch(log="gradients")`` in offline mode; a ``log`` call per step commits it."""

    needs = "wandb"
    log_freq = 1

    def setup(self) -> None:
        import wandb

        self.run = wandb.init(project="gradwatch-bench", dir=self.workdir, mode="offline",
                              reinit="create_new", settings=wandb.Settings(silent=True))
        self.run.watch(self.model, log="gradients", log_freq=self.log_freq)

    def step(self) -> None:
        import wandb

        # wandb's gradient hooks log to the global ``wandb.run``; two watched runs alternate
        # here, so the one stepping is made current.
        wandb.run = self.run
        super().step()
        self.run.log({"step": self.steps})

    def close(self) -> None:
        self.run.unwatch(self.model)
        self.run.finish(quiet=True)


class Wandb100(Wandb):
    log_freq = 100


class Smdebug(Config):
    """SageMaker Debugger's PyTorch hook saving the gradients every step."""

    needs = "smdebug"

    def setup(self) -> None:
        import numpy as np
        import smdebug.core.writer as smd_writer
        import smdebug.pytorch as smd
        from smdebug.core.tfevent import util as smd_util

        if not hasattr(np.ndarray, "tostring"):
            # smdebug 1.0.34 (its last release) calls ndarray.tostring(), removed in numpy 2;
            # the same bytes come from tobytes(). Nothing else of smdebug is changed.
            def make_tensor_proto(nparray_data, tag):
                isnum, dtype = smd_util._get_proto_dtype(nparray_data.dtype)
                dims = [smd_util.TensorShapeProto.Dim(size=d, name=f"{tag}_{d}")
                        for d in nparray_data.shape]
                shape = smd_util.TensorShapeProto(dim=dims)
                if not isnum:
                    proto = smd_util.TensorProto(tensor_shape=shape)
                    proto.string_val.extend(bytes(x, encoding="utf-8") for x in nparray_data)
                    return proto
                return smd_util.TensorProto(dtype=dtype, tensor_content=nparray_data.tobytes(),
                                            tensor_shape=shape)

            smd_writer.make_tensor_proto = make_tensor_proto
        out = tempfile.mkdtemp(dir=self.workdir)
        os.rmdir(out)  # smdebug refuses an existing directory
        self.hook = smd.Hook(out_dir=out, save_config=smd.SaveConfig(save_interval=1),
                             include_collections=["gradients"])
        self.hook.register_module(self.model)
        self.hook.register_loss(self.loss_fn)


CONFIGS: dict[str, type[Config]] = {
    "plain": Plain,
    "gradwatch-default": GradWatchDefault,
    "gradwatch-every-step": GradWatchEveryStep,
    "gradwatch-no-checks": GradWatchNoChecks,
    "gradwatch-tensorboard": GradWatchTensorBoard,
    "gradwatch-guard": GradWatchGuard,
    "floor": Floor,
    "naive-item": NaiveItem,
    "detect-anomaly": DetectAnomaly,
    "cockpit-economy-1": Cockpit,
    "cockpit-economy-16": Cockpit16,
    "wandb-gradients-1": Wandb,
    "wandb-gradients-100": Wandb100,
    "smdebug-gradients-1": Smdebug,
}
QUICK_CONFIGS = ["plain", "gradwatch-default", "gradwatch-every-step", "floor", "naive-item"]


# --quick trains on the first QUICK_BATCH samples only: it checks that everything runs and
# writes well-formed results, it does not time anything worth quoting.
QUICK_BATCH = 4
_batch_limit: int | None = None


def _quick_inputs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = x[:_batch_limit], y[:_batch_limit]
    if x.dtype == torch.long and x.dim() == 2:  # token sequences: 16 positions
        x = x[:, :16]
    return x, y


def build(config: str | type[Config], model_fn, device: torch.device, workdir: str) -> Config:
    cls = CONFIGS[config] if isinstance(config, str) else config
    torch.manual_seed(0)
    model, x, y = model_fn(device)
    if _batch_limit is not None:
        x, y = _quick_inputs(x, y)
    model = model.to(device)
    with contextlib.redirect_stdout(sys.stderr):  # peers print banners; keep stdout the table
        return cls(model, x.to(device), y.to(device), workdir)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: How a round is timed: ``time.perf_counter`` (wall, the default) or ``time.process_time``
#: (``--clock cpu``: this process's CPU time, which other processes taking the machine's cores
#: do not inflate; with several torch threads it adds theirs up).
_clock: Callable[[], float] = time.perf_counter


def timed(cfg: Config, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        cfg.step()
    sync(device)
    t = _clock()
    for _ in range(steps):
        cfg.step()
    sync(device)
    return (_clock() - t) / steps


def error_text(exc: BaseException, needs: str | None) -> str:
    if isinstance(exc, ImportError) and needs:
        return (f"{needs} not installed ({exc}); pip install torch==2.13.0 -e "
                "'.[torch,benchmark]'")
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"


def time_configs(model_fn, configs: list[str], rounds: int, steps: int, warmup: int,
                 device: torch.device, workdir: str) -> dict[str, dict]:
    """Alternating rounds over every configuration that builds and runs; errors recorded."""
    live: dict[str, Config] = {}
    rows: dict[str, dict] = {}
    for name in configs:
        try:
            cfg = build(name, model_fn, device, workdir)
            with contextlib.redirect_stdout(sys.stderr):
                cfg.step()  # a peer that cannot train this model fails here, not mid-timing
            live[name] = cfg
        except Exception as exc:  # a peer that cannot run: its error is the result
            rows[name] = {"error": error_text(exc, CONFIGS[name].needs)}
            print(f"  {name}: {rows[name]['error']}", file=sys.stderr)
            if os.environ.get("GRADWATCH_BENCH_DEBUG"):
                traceback.print_exc()
    per_round: dict[str, list[float]] = {name: [] for name in live}
    for r in range(rounds):
        # The order turns each round, so that no configuration always runs first (or right
        # after the same other one).
        names = list(live)
        for name in names[r % len(names):] + names[:r % len(names)]:
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    per_round[name].append(timed(live[name], steps, warmup, device))
            except Exception as exc:
                rows[name] = {"error": error_text(exc, None)}
                del live[name], per_round[name]
    plain_rounds = per_round["plain"]
    plain = statistics.median(plain_rounds)
    for name in per_round:
        med = statistics.median(per_round[name])
        rows[name] = {"median_ms": med * 1e3, "ratio": med / plain, "added_ms": (med - plain) * 1e3,
                      "paired_ratio": statistics.median(
                          a / b for a, b in zip(per_round[name], plain_rounds)),
                      "rounds_ms": [round(x * 1e3, 4) for x in per_round[name]]}
    for cfg in live.values():
        with contextlib.suppress(Exception), contextlib.redirect_stdout(sys.stderr):
            cfg.close()
    return {name: rows[name] for name in configs if name in rows}


# -- host synchronisations and memory -----------------------------------------------------------


@contextlib.contextmanager
def count_syncs():
    """Counts device-to-host reads (``.item()``, ``.cpu()``, ``.tolist()``, bool/float of a
    tensor) made while the block runs."""
    counts = {"n": 0}
    names = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(original):
        def counted(self, *a, **k):
            counts["n"] += 1
            return original(self, *a, **k)
        return counted

    for n in names:
        setattr(torch.Tensor, n, wrap(originals[n]))
    try:
        yield counts
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)


def syncs_per_step(config: str, model_fn, device: torch.device, workdir: str,
                   steps: int = 20) -> float:
    from gradwatch_torch import _reduce

    cfg = build(config, model_fn, device, workdir)
    for _ in range(5):
        cfg.step()
    # Counted on the path every device takes: on the CPU the float32-first norms also read a
    # CPU scalar per reduction, which is no device transfer (and is in the timings above).
    cpu_path, _reduce.FLOAT32_FIRST_ON_CPU = _reduce.FLOAT32_FIRST_ON_CPU, False
    try:
        with count_syncs() as counts:
            for _ in range(steps):
                cfg.step()
    finally:
        _reduce.FLOAT32_FIRST_ON_CPU = cpu_path
    cfg.close()
    return counts["n"] / steps


def peak_allocated(cfg: Config, steps: int, device: torch.device) -> int:
    """Peak bytes allocated above the level at the start, over ``steps`` steps."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            cfg.step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile, record_function

    # Blocks allocated before profiling starts are invisible when freed, so two warm-up steps
    # run inside the session first; the level when the measured steps begin is the base.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):
            cfg.step()
        with record_function("gradwatch-bench-measured"):
            for _ in range(steps):
                cfg.step()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    start = min(e["ts"] for e in events if e.get("name") == "gradwatch-bench-measured")
    mem = sorted((e for e in events if e.get("name") == "[memory]"
                  and e.get("args", {}).get("Device Type", 0) == 0), key=lambda e: e["ts"])
    before = [e for e in mem if e["ts"] < start]
    during = [e for e in mem if e["ts"] >= start]
    if not during:
        return 0
    base = before[-1]["args"]["Total Allocated"] if before else 0
    return max(e["args"]["Total Allocated"] for e in during) - base


def memory(model_fn, device: torch.device, workdir: str, steps: int) -> dict[str, Any]:
    """Extra memory of each gradwatch mode over plain training: persistent (what the watcher
    holds between steps) and peak (the largest allocation level reached during the steps,
    check steps included, minus plain training's)."""
    out: dict[str, Any] = {}
    peaks = {}
    for name in ("plain", "gradwatch-default", "gradwatch-exact"):
        cfg = build(GradWatchExact if name == "gradwatch-exact" else name, model_fn, device,
                    workdir)
        for _ in range(3):
            cfg.step()
        peaks[name] = peak_allocated(cfg, steps, device)
        if name == "plain":
            params = sum(p.numel() * p.element_size() for p in cfg.model.parameters())
            out["param_bytes"] = params
        else:
            held = cfg.watcher.extra_memory_bytes()
            extra = held + max(peaks[name] - peaks["plain"], 0)
            out[name] = {"persistent_bytes": held, "peak_extra_bytes": extra,
                         "peak_extra_fraction_of_params": extra / out["param_bytes"]}
        cfg.close()
    return out


# -- scaling -----------------------------------------------------------------------------------

SCALING_CONFIGS = ["plain", "gradwatch-default", "gradwatch-every-step", "floor", "naive-item"]


def scaling(depths: list[int], rounds: int, steps: int, warmup: int, device: torch.device,
            workdir: str, configs: list[str] = SCALING_CONFIGS) -> dict[str, Any]:
    """The thin-MLP sweep, over the ``configs`` of :data:`SCALING_CONFIGS` asked for."""
    out: dict[str, Any] = {}
    names = [name for name in SCALING_CONFIGS if name in configs]
    for depth in depths:
        model_fn = thin_mlp(depth)
        rows = time_configs(model_fn, names, rounds, steps, warmup, device, workdir)
        for name in names[1:]:
            if "error" not in rows[name]:
                rows[name]["syncs_per_step"] = syncs_per_step(name, model_fn, device, workdir)
        out[str(depth)] = {"param_tensors": 2 * depth, "configs": rows}
        print(f"  scaling: {depth} layers done", file=sys.stderr)
    return out


def plot_scaling(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"gradwatch-default": "gradwatch (default, check every 10)",
              "gradwatch-every-step": "gradwatch (every detector every step)",
              "naive-item": "naive per-parameter .item()",
              "floor": "floor (one batched norm + one transfer)"}
    tensors = [v["param_tensors"] for v in result.values()]
    for name, label in labels.items():
        if any(name not in v["configs"] or "error" in v["configs"][name]
               for v in result.values()):
            continue
        added = [max(v["configs"][name]["added_ms"], 1e-3) for v in result.values()]
        ax_t.plot(tensors, added, marker="o", label=label)
        ax_s.plot(tensors, [v["configs"][name]["syncs_per_step"] for v in result.values()],
                  marker="o", label=label)
    for ax in (ax_t, ax_s):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameter tensors (thin MLP, 16 wide)")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_ylabel("added time per step (ms)")
    ax_s.set_ylabel("host synchronisations per step")
    ax_t.legend(fontsize=7)
    fig.suptitle("Overhead as the number of parameter tensors grows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    text = (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"Python {platform.python_version()}, torch {torch.__version__}")
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def table(results: dict[str, Any]) -> str:
    lines = [f"{'model':<12} {'config':<22} {'median ms/step':>15} {'ratio':>7} {'paired':>7} "
             f"{'added ms':>9}"]
    sweep = {f"mlp-{depth}x16": entry["configs"] for depth, entry in results["scaling"].items()}
    for model_name, rows in {**results["models"], **sweep}.items():
        for name, row in rows.items():
            if "error" in row:
                lines.append(f"{model_name:<12} {name:<22} error: {row['error']}")
            else:
                lines.append(f"{model_name:<12} {name:<22} {row['median_ms']:>15.3f} "
                             f"{row['ratio']:>7.3f} {row['paired_ratio']:>7.3f} "
                             f"{row['added_ms']:>9.3f}")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The results as the Markdown tables docs/performance.md quotes."""
    out = [f"Machine: {results['machine']}; device {results['device']}.  ",
           f"Command: `{results['command'].strip()}` ({results['rounds']} alternating rounds x "
           f"{results['steps']} steps after {results['warmup']} warm-up, "
           f"{results.get('clock', 'wall')} clock; {results['wall_s'] / 60:.0f} min).", "",
           "Ratios: *median* = median round / median plain round; *paired* = median over rounds "
           "of (this config / plain in the same round); *best* = fastest round / fastest plain "
           "round (noise only ever adds time, so on a shared machine the best rounds are the "
           "least disturbed).", "",
           "| model | configuration | median ms/step | ratio (median) | ratio (paired) | "
           "best ms/step | ratio (best) | host syncs/step |", "|---|---|---|---|---|---|---|---|"]
    for model_name, rows in results["models"].items():
        syncs = results["syncs_per_step"].get(model_name, {})
        plain = rows.get("plain", {}).get("rounds_ms")
        for name, row in rows.items():
            if "error" in row:
                out.append(f"| {model_name} | {name} | — | — | — | — | — | error: {row['error']} |")
                continue
            s = syncs.get(name)
            r = row["rounds_ms"]
            paired = statistics.median(a / b for a, b in zip(r, plain))
            out.append(f"| {model_name} | {name} | {row['median_ms']:.2f} | {row['ratio']:.3f} | "
                       f"{paired:.3f} | {min(r):.2f} | {min(r) / min(plain):.3f} | "
                       f"{'' if s is None else f'{s:g}'} |")
    out += ["", "| model | parameters | default: persistent | default: peak extra | "
            "exact: persistent | exact: peak extra |", "|---|---|---|---|---|---|"]
    for model_name, mem in results["memory"].items():
        d, e = mem["gradwatch-default"], mem["gradwatch-exact"]
        kib = 1024
        out.append(f"| {model_name} | {mem['param_bytes'] / kib:.0f} KiB | "
                   f"{d['persistent_bytes'] / kib:.1f} KiB | {d['peak_extra_bytes'] / kib:.1f} KiB "
                   f"({100 * d['peak_extra_fraction_of_params']:.1f} %) | "
                   f"{e['persistent_bytes'] / kib:.0f} KiB | {e['peak_extra_bytes'] / kib:.0f} KiB "
                   f"({100 * e['peak_extra_fraction_of_params']:.0f} %) |")
    if results["scaling"]:
        first = next(iter(results["scaling"].values()))["configs"]
        names = [n for n in SCALING_CONFIGS[1:] if n in first]
        out += ["", "| layers | parameter tensors | plain ms/step | " +
                " | ".join(f"{n} added ms, paired ratio (syncs)" for n in names) + " |",
                "|---" * (3 + len(names)) + "|"]
        for depth, entry in results["scaling"].items():
            rows = entry["configs"]
            cells = [f"error: {rows[n]['error']}" if "error" in rows[n] else
                     f"{rows[n]['added_ms']:+.2f}, {rows[n]['paired_ratio']:.3f} "
                     f"({rows[n].get('syncs_per_step', float('nan')):g})" for n in names]
            out.append(f"| {depth} | {entry['param_tensors']} | {rows['plain']['median_ms']:.2f} | "
                       + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (tests/test_docs.py checks the
    commands the docs quote against it)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: gradwatch, floor and naive configs only, batch of 4, few "
                        "rounds, small scaling sweep (well under 2 minutes; not for quoting)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=50,
                   help="timed steps per round (a multiple of 10 keeps check steps at their share)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--depths", default="10,30,100,300,1000", help="scaling sweep (layers)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time rounds by the wall clock, or by this process's CPU time (on a "
                        "machine others are using)")
    p.add_argument("--out", help="directory for results.json, results.md and scaling.png")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = p.parse_args(argv)
    if args.quick:
        # --quick sets these itself: a value the user also gave would be silently overridden.
        given = [f"--{name}" for name in ("rounds", "steps", "warmup", "depths")
                 if getattr(args, name) != p.get_default(name)]
        if given:
            p.error(f"--quick sets --rounds, --steps, --warmup and --depths itself; drop "
                    f"{', '.join(given)} or drop --quick")
        global _batch_limit
        _batch_limit = QUICK_BATCH
        args.rounds, args.steps, args.warmup, args.depths = 2, 10, 2, "10,100"
        if args.configs == ",".join(CONFIGS):
            args.configs = ",".join(QUICK_CONFIGS)
    for name, value in (("--rounds", args.rounds), ("--steps", args.steps)):
        if value < 1:
            p.error(f"{name} must be >= 1, got {value}")
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or "plain" not in configs:
        p.error(f"--configs: unknown {unknown} (must include plain; valid: {', '.join(CONFIGS)})")
    models = [m for m in args.models.split(",") if m]
    if any(m not in MODELS for m in models):
        p.error(f"--models: valid models are {', '.join(MODELS)}, got {args.models}")
    try:
        depths = [int(d) for d in args.depths.split(",") if d]
    except ValueError:
        p.error(f"--depths must be comma-separated integers, got {args.depths!r}")
    device = torch.device(args.device)
    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter
    started = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine(device), "device": str(device),
        "command": "python benchmarks/torch_overhead.py " + " ".join(argv or sys.argv[1:]),
        "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "clock": args.clock,
        "models": {}, "syncs_per_step": {}, "memory": {}, "scaling": {},
    }
    with tempfile.TemporaryDirectory() as workdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peers' deprecation chatter; gradwatch logs, not warns
        for model_name in models:
            print(f"[{time.perf_counter() - started:6.1f}s] timing {model_name} …", file=sys.stderr)
            results["models"][model_name] = time_configs(
                MODELS[model_name], configs, args.rounds, args.steps, args.warmup, device, workdir)
            results["syncs_per_step"][model_name] = {
                name: syncs_per_step(name, MODELS[model_name], device, workdir)
                for name in ("gradwatch-default", "gradwatch-every-step", "floor", "naive-item")}
            print(f"[{time.perf_counter() - started:6.1f}s] memory {model_name} …", file=sys.stderr)
            results["memory"][model_name] = memory(MODELS[model_name], device, workdir,
                                                   steps=10 if args.quick else 50)
        if depths:
            print(f"[{time.perf_counter() - started:6.1f}s] scaling sweep …", file=sys.stderr)
            results["scaling"] = scaling(depths, args.rounds, args.steps, args.warmup, device,
                                         workdir, configs)
    results["wall_s"] = time.perf_counter() - started
    print(table(results))
    for model_name, mem in results["memory"].items():
        for mode in ("gradwatch-default", "gradwatch-exact"):
            m = mem[mode]
            print(f"memory {model_name:<12} {mode:<18} peak extra {m['peak_extra_bytes'] / 1024:9.1f} "
                  f"KiB = {100 * m['peak_extra_fraction_of_params']:.1f}% of parameters "
                  f"({mem['param_bytes'] / 1024:.0f} KiB)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2, allow_nan=False, default=lambda x: None)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(markdown(results))
        if results["scaling"]:
            plot_scaling(results["scaling"], os.path.join(args.out, "scaling.png"))
        print(f"wrote {args.out}/results.json, results.md" + (", scaling.png" if depths else ""))
    return results


if __name__ == "__main__":
    main()
