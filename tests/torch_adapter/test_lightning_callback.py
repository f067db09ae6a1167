"""gradwatch.lightning.GradWatchCallback under real Lightning Trainers (both packages).

The raw evidence each test compares with is gathered by a plain Lightning callback of the test's
own (``on_before_optimizer_step``: after backward, before Lightning clips), never by gradwatch.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import re
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")
from references import StatsLog  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.lightning import GradWatchCallback  # noqa: E402

PACKAGES = ["lightning.pytorch", "pytorch_lightning"]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "integrations" / "lightning.md"


def package(name: str):
    if name == "pytorch_lightning":
        pytest.importorskip("pytorch_lightning")
    return importlib.import_module(name)


def module_class(pl):
    class Classifier(pl.LightningModule):
        """An MLP classifier: ``depth`` hidden layers of ``act``."""

        def __init__(self, depth: int = 3, act: type[nn.Module] = nn.ReLU, lr: float = 1e-2,
                     optimizer: str = "adam") -> None:
            super().__init__()
            torch.manual_seed(0)
            layers: list[nn.Module] = []
            d = 16
            for _ in range(depth):
                layers += [nn.Linear(d, 32), act()]
                d = 32
            layers.append(nn.Linear(d, 4))
            self.net = nn.Sequential(*layers)
            self.lr, self.optimizer = lr, optimizer
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.losses.append(float(loss))
            return loss

        def configure_optimizers(self):
            if self.optimizer == "sgd":
                return torch.optim.SGD(self.parameters(), lr=self.lr)
            return torch.optim.Adam(self.parameters(), lr=self.lr)

    return Classifier


def loader(n: int = 512, batch: int = 32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=gen)
    y = x[:, :4].argmax(1)  # learnable: the largest of the first four inputs
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch,
                                       shuffle=True, generator=gen)


def raw_norms(pl):
    class RawNorms(pl.Callback):
        """Per-layer gradient L2 norms as the optimizer is about to get them, before clipping."""

        def __init__(self) -> None:
            self.norms: dict[int, dict[str, float]] = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            row = {}
            for name, layer in pl_module.named_modules():
                params = [p for p in layer.parameters(recurse=False) if p.grad is not None]
                if params:
                    row[name] = math.sqrt(sum(float(p.grad.double().square().sum())
                                              for p in params))
            self.norms[trainer.global_step + 1] = row

    return RawNorms()


def fit(pl, module, callbacks, steps: int = 60, **trainer_options):
    options = dict(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False)
    options.update(trainer_options)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader())
    told = [w for w in caught if issubclass(w.category, gradwatch.GradientHealthWarning)]
    return trainer, told


def warning_kinds(cb) -> list[str]:
    return [f.kind for f in cb.findings if f.is_warning]


def csv_rows(trainer) -> list[dict[str, str]]:
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", PACKAGES)
def test_a_deep_sigmoid_net_is_caught_and_its_numbers_reach_the_csv_logger(name, tmp_path):
    pl = package(name)
    cb = GradWatchCallback(check_every=5)
    raw = raw_norms(pl)
    trainer, told = fit(pl, module_class(pl)(depth=10, act=nn.Sigmoid, lr=0.1, optimizer="sgd"),
                        [cb, raw], logger=pl.loggers.CSVLogger(tmp_path, name="run"))
    assert "vanishing_gradient" in warning_kinds(cb)
    assert any(w.category is gradwatch.VanishingGradientWarning for w in told)
    assert cb.report().steps == trainer.global_step == 60
    # The per-layer numbers went through the trainer's own logger, on check steps only.
    rows = [r for r in csv_rows(trainer) if r.get("gradwatch/grad_norm/net.0")]
    assert [int(r["step"]) for r in rows] == list(range(5, 61, 5))
    for r in rows:  # the same numbers a plain callback measures before the step
        step = int(r["step"])
        for layer in ("net.0", "net.20"):
            assert float(r[f"gradwatch/grad_norm/{layer}"]) == pytest.approx(
                raw.norms[step][layer], rel=1e-4)
    assert float(rows[-1]["gradwatch/warnings"]) >= 1
    assert all(float(r["gradwatch/update_ratio/net.20"]) > 0 for r in rows)


@pytest.mark.parametrize("name", PACKAGES)
def test_a_healthy_run_with_lightning_clipping_gets_no_warning(name):
    pl = package(name)
    log = StatsLog()
    cb = GradWatchCallback(plugins=[log])
    raw = raw_norms(pl)
    module = module_class(pl)(depth=3, lr=1e-2)
    # A clip value far below the gradients: Lightning clips at every step.
    trainer, told = fit(pl, module, [cb, raw], steps=150, gradient_clip_val=0.05)
    assert warning_kinds(cb) == [] and told == []
    assert module.losses[-1] < 0.6 * module.losses[0]  # it learns: the silence is right
    assert cb.report().steps == trainer.global_step == 150
    assert cb.watcher.monitor.context.model.clipping is True  # clipping is known to advice
    # gradwatch reads gradients before Lightning clips them: the unclipped norms.
    assert len(log.stats) == 15
    for stats in log.stats:
        raw_row = raw.norms[stats.step]
        assert math.sqrt(sum(v * v for v in raw_row.values())) > 4 * 0.05
        for layer, norm in zip(stats.layers, stats.grad_norm[-1]):
            assert norm == pytest.approx(raw_row[layer], rel=1e-4)


def test_accumulated_steps_equal_global_step_and_the_loss_is_the_micro_batch_mean(tmp_path):
    pl = package("lightning.pytorch")
    cb = GradWatchCallback(check_every=5)
    raw = raw_norms(pl)
    module = module_class(pl)(depth=3, lr=1e-2)
    trainer, told = fit(pl, module, [cb, raw], steps=30, accumulate_grad_batches=2,
                        logger=pl.loggers.CSVLogger(tmp_path, name="run"))
    assert cb.report().steps == trainer.global_step == 30
    assert warning_kinds(cb) == []
    rows = [r for r in csv_rows(trainer) if r.get("gradwatch/loss")]
    assert [int(r["step"]) for r in rows] == list(range(5, 31, 5))
    for r in rows:
        step = int(r["step"])
        micro = module.losses[2 * step - 2:2 * step]  # the step's two micro-batches
        assert float(r["gradwatch/loss"]) == pytest.approx(sum(micro) / 2, rel=1e-5)
        # the accumulated gradient, as the optimizer gets it
        assert float(r["gradwatch/grad_norm/net.0"]) == pytest.approx(
            raw.norms[step]["net.0"], rel=1e-4)


def gan_class(pl):
    class GAN(pl.LightningModule):
        """Manual optimization, two optimizers taking turns (Lightning's GAN example)."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.automatic_optimization = False
            self.g = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16))
            self.d = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))

        def training_step(self, batch, batch_idx):
            x = batch[0]
            opt_g, opt_d = self.optimizers()
            bce = nn.functional.binary_cross_entropy_with_logits
            fake = self.g(torch.randn(x.shape[0], 8))
            ones, zeros = torch.ones(x.shape[0], 1), torch.zeros(x.shape[0], 1)
            self.toggle_optimizer(opt_d)
            loss_d = bce(self.d(x), ones) + bce(self.d(fake.detach()), zeros)
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()
            self.untoggle_optimizer(opt_d)
            self.toggle_optimizer(opt_g)
            loss_g = bce(self.d(fake), ones)
            opt_g.zero_grad()
            self.manual_backward(loss_g)
            opt_g.step()
            self.untoggle_optimizer(opt_g)

        def configure_optimizers(self):
            return (torch.optim.Adam(self.g.parameters(), 1e-3),
                    torch.optim.Adam(self.d.parameters(), 1e-3))

    return GAN


@pytest.mark.parametrize("check_every", [10, 5])
def test_two_optimizers_in_manual_optimization_are_each_steps_and_not_stalled(check_every):
    # Every check step with check_every=10 is the generator's (steps alternate d, g, d, g...):
    # the discriminator did not move in it. Its update ratio is not measured there, not 0 (a
    # stalled_update false alarm on a healthy GAN).
    pl = package("lightning.pytorch")
    log = StatsLog()
    cb = GradWatchCallback(check_every=check_every, plugins=[log])
    trainer, told = fit(pl, gan_class(pl)(), [cb], steps=300)
    assert cb.report().steps == trainer.global_step == 300
    assert warning_kinds(cb) == [] and told == []
    for stats in log.stats:
        ratio = dict(zip(stats.layers, stats.update_ratio))
        moved, idle = ("g", "d") if stats.step % 2 == 0 else ("d", "g")
        assert ratio[f"{moved}.0"] > 0 and ratio[f"{moved}.2"] > 0
        assert math.isnan(ratio[f"{idle}.0"]) and math.isnan(ratio[f"{idle}.2"])
    # an odd check_every alternates the checks: both optimizers' updates are measured
    assert {s.step % 2 for s in log.stats} == ({0} if check_every == 10 else {0, 1})


def test_bf16_mixed_precision_runs_healthy_with_steps_matching():
    pl = package("lightning.pytorch")
    log = StatsLog()
    cb = GradWatchCallback(plugins=[log])
    module = module_class(pl)(depth=3, lr=1e-2)
    trainer, told = fit(pl, module, [cb], steps=100, precision="bf16-mixed")
    assert cb.report().steps == trainer.global_step == 100
    assert warning_kinds(cb) == [] and told == []
    assert all(s.has_grad[-1].all() and (s.grad_norm[-1] > 0).all() for s in log.stats)


def test_tensorboard_logger_gets_the_scalars_and_the_findings_text(tmp_path):
    pl = package("lightning.pytorch")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = GradWatchCallback(check_every=5)
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    fit(pl, module_class(pl)(depth=10, act=nn.Sigmoid, lr=0.1, optimizer="sgd"), [cb],
        logger=logger)
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("gradwatch/grad_norm/net.0")]
    assert steps == list(range(5, 61, 5))
    texts = [e.tensor_proto.string_val[0].decode()
             for e in acc.Tensors("gradwatch/findings_text/text_summary")]
    assert any("vanishing_gradient" in t for t in texts)


def test_the_tensorboard_option_writes_its_own_event_file(tmp_path):
    pl = package("lightning.pytorch")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = GradWatchCallback(check_every=5, tensorboard=str(tmp_path / "gw"))
    fit(pl, module_class(pl)(depth=3), [cb], steps=20)
    acc = EventAccumulator(str(tmp_path / "gw"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("gradwatch/grad_norm/net.0")] == [5, 10, 15, 20]


def test_a_second_fit_is_watched_afresh_and_the_first_is_removed():
    pl = package("lightning.pytorch")
    cb = GradWatchCallback(check_every=5)
    module = module_class(pl)(depth=3)
    fit(pl, module, [cb], steps=20)
    first = cb.watcher
    fit(pl, module, [cb], steps=40)  # resumes nothing: a new Trainer, steps from 0
    assert cb.watcher is not first and first._removed
    assert cb.report().steps == 40


@pytest.mark.parametrize("options, message", [
    ({"chek_every": 5}, "chek_every"),
    ({"optimizer": None}, "optimizer"),
    ({"check_every": 0}, "check_every"),
    ({"update_ratio": "some"}, "update_ratio"),
    ({"tensorboard": 3}, "tensorboard"),
])
def test_bad_options_fail_at_construction_naming_them(options, message):
    with pytest.raises((TypeError, ValueError), match=message):
        GradWatchCallback(**options)


def test_findings_and_report_before_any_fit_are_empty():
    cb = GradWatchCallback()
    assert cb.findings == [] and cb.report().steps == 0


def test_the_docs_example_runs_as_it_stands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    scope: dict = {"__name__": "example"}
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        exec(compile(blocks[0], str(DOCS), "exec"), scope)
    cb = scope["cb"]
    assert "vanishing_gradient" in warning_kinds(cb)
    assert list(tmp_path.rglob("metrics.csv"))


import lightning.pytorch as lpl  # noqa: E402


class SpawnedSigmoid(lpl.LightningModule):
    """The deep sigmoid net at module level: ddp_spawn pickles the module into each process."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for i in range(10):
            layers += [nn.Linear(16 if i == 0 else 32, 32), nn.Sigmoid()]
        self.net = nn.Sequential(*layers, nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_ddp_spawn_on_two_processes_logs_and_reports_from_rank_zero(tmp_path):
    # ddp_spawn pickles the callbacks into each process (the callback travels as its options);
    # rank 0 alone logs and writes events, every rank measures.
    events = tmp_path / "run.jsonl"
    cb = GradWatchCallback(check_every=5, events=str(events))
    trainer = lpl.Trainer(max_steps=30, accelerator="cpu", devices=2, strategy="ddp_spawn",
                          callbacks=[cb], logger=lpl.loggers.CSVLogger(tmp_path, name="run"),
                          enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=gen)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :4].argmax(1)),
                                       batch_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(SpawnedSigmoid(), data)
    # (the parent's logger has not run: its log_dir would be the next version)
    files = list((tmp_path / "run").rglob("metrics.csv"))
    assert len(files) == 1
    with files[0].open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("gradwatch/grad_norm/net.0")]
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 25, 30]
    assert sorted(p.name for p in tmp_path.glob("run*.jsonl")) == ["run.jsonl"]  # rank 0's
    kinds = [json.loads(line).get("kind") for line in events.read_text().splitlines()]
    assert "vanishing_gradient" in kinds


def test_the_guard_skips_a_nan_batch_under_lightnings_closure():
    # Automatic optimization passes a closure to optimizer.step: the guard runs it (forward,
    # backward, clipping), finds the NaN gradient and does not apply the step.
    pl = package("lightning.pytorch")
    cb = GradWatchCallback(guard="skip")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(640, 16, generator=gen)
    y = x[:, :4].argmax(1)
    x[6 * 32 + 3, 5] = float("nan")  # in the 7th batch
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    module = module_class(pl)(depth=3, lr=1e-2)
    trainer = pl.Trainer(max_steps=20, accelerator="cpu", devices=1, logger=False,
                         callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, gradient_clip_val=1.0)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        trainer.fit(module, data)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    report = cb.report()
    assert report.skipped_steps == 1
    assert [f.step for f in report.findings if f.kind == "nonfinite"] == [7]
    # Lightning counts the call it made; gradwatch counts applied steps
    assert trainer.global_step == 20 and report.steps == 19
