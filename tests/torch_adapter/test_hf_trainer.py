"""gradwatch.transformers.GradWatchCallback under a real Hugging Face ``Trainer`` (tiny models built
from config, data made here, CPU): what it finds, how it counts steps, which gradients it reads
(before clipping), the loss it sees, and where its numbers go (report_to, log_history)."""

from __future__ import annotations

import logging
import math
import pathlib
import re

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from references import StatsLog  # noqa: E402
from torch import nn  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from gradwatch import UpdateRatioDetector  # noqa: E402
from gradwatch.transformers import GradWatchCallback  # noqa: E402

transformers.utils.logging.set_verbosity_error()  # the tiny GPT-2 config's token-id notes
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"


def targs(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, disable_tqdm=True,
                save_strategy="no", report_to="none", logging_steps=1000, seed=0)
    return TrainingArguments(**{**base, **kw})


class SigmoidMLP(nn.Module):
    """Ten Linear(16)+Sigmoid layers: the classic vanishing-gradient net."""

    def __init__(self, depth: int = 10, scale: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(2 if i == 0 else 16, 16), nn.Sigmoid()]
        self.body = nn.Sequential(*layers, nn.Linear(16, 1))
        self.scale = scale

    def forward(self, x, labels=None):
        logits = self.body(x).squeeze(-1)
        loss = None
        if labels is not None:
            loss = nn.functional.mse_loss(logits, labels * self.scale)
        return {"loss": loss, "logits": logits}


class XorData(torch.utils.data.Dataset):
    def __init__(self, n: int = 512) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 2, generator=g)
        self.y = (self.x[:, 0] * self.x[:, 1] > 0).float()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class CopyData(torch.utils.data.Dataset):
    """Random tokens whose second half repeats the first: learnable by a 2-layer GPT-2."""

    def __init__(self, n: int = 512, length: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        half = torch.randint(0, vocab, (n, length // 2), generator=g)
        self.ids = torch.cat([half, half], 1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def gpt2(**kw) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                      n_positions=32, **kw))


def train(tmp_path, model, data, cb, **kw) -> Trainer:
    trainer = Trainer(model=model, args=targs(tmp_path, **kw), train_dataset=data,
                      callbacks=[cb])
    trainer.train()
    return trainer


def rows(trainer, key: str) -> dict[int, dict]:
    """log_history entries holding ``key``, by step."""
    return {h["step"]: h for h in trainer.state.log_history if key in h}


def total_norm(row: dict) -> float:
    return math.sqrt(sum(v * v for k, v in row.items() if k.startswith("gradwatch/grad_norm/")))


# -- what it finds ---------------------------------------------------------------------------


def test_deep_sigmoid_mlp_vanishing_gradient_is_caught(tmp_path):
    torch.manual_seed(0)
    cb = GradWatchCallback(check_every=5)
    trainer = train(tmp_path, SigmoidMLP(), XorData(), cb, max_steps=60, optim="sgd",
                    learning_rate=0.1, per_device_train_batch_size=32)
    found = [f for f in cb.findings if f.kind == "vanishing_gradient" and f.is_warning]
    assert found, [(f.kind, f.severity, f.message) for f in cb.findings]
    lines = [h["gradwatch/finding"] for h in trainer.state.log_history if "gradwatch/finding" in h]
    assert any(line.startswith("vanishing_gradient in ") for line in lines)
    counts = rows(trainer, "gradwatch/warnings")
    assert counts[max(counts)]["gradwatch/warnings"] >= 1


def test_healthy_gpt2_gets_no_warning(tmp_path):
    cb = GradWatchCallback(check_every=10)
    trainer = train(tmp_path, gpt2(), CopyData(), cb, max_steps=150, learning_rate=1e-2,
                    per_device_train_batch_size=16, logging_steps=25)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 0.5  # it learns: a healthy run, by the Trainer's own log
    assert [(f.kind, f.severity, f.layer, f.message) for f in cb.findings if f.is_warning] == []
    assert cb.report().internal_errors == ()


def test_fine_tuning_at_the_trainers_default_lr_gets_no_warning(tmp_path):
    # The common case: a pretrained model fine-tuned with the Trainer's defaults (AdamW at 5e-5,
    # linear decay). "Pretrained" here: the copy task learnt first by hand at 1e-3; the
    # fine-tuning task shifts the copied half by one token. LayerNorm gains move ~5e-6 of their
    # norm a step under Adam at this LR (below the stall threshold), and that is healthy.
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=128,
                                       n_positions=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        half = torch.randint(0, 128, (32, 16), generator=gen)
        batch = torch.cat([half, half], 1)
        opt.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
    half = torch.randint(0, 128, (3200, 16), generator=gen)
    data = [{"input_ids": r, "labels": r} for r in torch.cat([half, (half + 1) % 128], 1)]
    log = StatsLog()
    cb = GradWatchCallback(plugins=[log])
    trainer = train(tmp_path, model, data, cb, max_steps=200, per_device_train_batch_size=16,
                    logging_steps=50)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 0.3  # the loss falls: it learns the new task, slowly
    assert [(f.kind, f.layer, f.message) for f in cb.findings if f.is_warning] == []
    # the reason it needed saying: the norm gains' own ratios are below the stall threshold
    gains = [r for stats in log.stats for name, r in zip(stats.layers, stats.update_ratio)
             if ".ln_" in name]
    assert gains and min(gains) < UpdateRatioDetector().stall_threshold


# -- steps, loss, gradients ------------------------------------------------------------------


@pytest.mark.parametrize("which", ["mlp", "gpt2"])
def test_steps_and_loss_match_the_trainer_with_gradient_accumulation(tmp_path, which):
    # GPT-2 takes num_items_in_batch (each micro-batch loss is its share: summed), the MLP does
    # not (micro-batch means: averaged); logging every step, the Trainer's "loss" is the step's.
    model, data = (SigmoidMLP(depth=2), XorData()) if which == "mlp" else (gpt2(), CopyData())
    cb = GradWatchCallback(check_every=3)
    trainer = train(tmp_path, model, data, cb, max_steps=13, gradient_accumulation_steps=2,
                    per_device_train_batch_size=8, logging_steps=1)
    assert trainer.state.global_step == 13
    assert cb.report().steps == trainer.state.global_step == cb.watcher.step
    hf, ours = rows(trainer, "loss"), rows(trainer, "gradwatch/loss")
    assert sorted(ours) == [3, 6, 9, 12]
    for step, row in ours.items():
        assert row["gradwatch/loss"] == pytest.approx(hf[step]["loss"], rel=1e-5)


def test_norms_are_read_before_clipping(tmp_path):
    # Targets x1000: gradients far above max_grad_norm=1.0, so the Trainer clips every step.
    # Its logged grad_norm is clip_grad_norm_'s total norm before clipping.
    cb = GradWatchCallback(check_every=2)
    trainer = train(tmp_path, SigmoidMLP(depth=3, scale=1000.0), XorData(), cb, max_steps=8,
                    optim="sgd", learning_rate=1e-3, max_grad_norm=1.0, logging_steps=1,
                    per_device_train_batch_size=32)
    hf, ours = rows(trainer, "grad_norm"), rows(trainer, "gradwatch/grad_norm/body.0")
    assert sorted(ours) == [2, 4, 6, 8]
    for step, row in ours.items():
        assert hf[step]["grad_norm"] > 100  # clipped by a factor > 100
        assert total_norm(row) == pytest.approx(hf[step]["grad_norm"], rel=1e-4)
    assert cb.watcher.monitor.context.model.clipping is True  # gradwatch knows it is clipped


@pytest.mark.parametrize("reentrant", [False, True], ids=["checkpoint", "reentrant"])
def test_bf16_and_gradient_checkpointing(tmp_path, reentrant):
    # activation_checkpointing is what transformers 5 calls gradient_checkpointing (now an
    # alias); the reentrant variant runs a backward pass of its own inside each block's.
    cb = GradWatchCallback(check_every=4)
    model = gpt2()
    trainer = train(tmp_path, model, CopyData(), cb, max_steps=12, bf16=True,
                    activation_checkpointing=True,
                    activation_checkpointing_kwargs={"use_reentrant": reentrant},
                    logging_steps=1, per_device_train_batch_size=8, learning_rate=1e-3)
    assert model.is_activation_checkpointing
    assert cb.report().steps == trainer.state.global_step == 12
    hf, ours = rows(trainer, "grad_norm"), rows(trainer, "gradwatch/loss")
    assert sorted(ours) == [4, 8, 12]
    layers = list(cb.watcher.layers())
    for step, row in ours.items():
        # every layer's gradient, read once the whole (recomputing) backward pass was over
        assert all(f"gradwatch/grad_norm/{name}" in row for name in layers)
        assert total_norm(row) == pytest.approx(hf[step]["grad_norm"], rel=1e-3)
        assert row["gradwatch/loss"] == pytest.approx(rows(trainer, "loss")[step]["loss"],
                                                      rel=1e-3)
    assert cb.report().internal_errors == ()


def test_each_train_gets_a_fresh_watcher_and_leaves_no_hook(tmp_path):
    model = SigmoidMLP(depth=2)
    cb = GradWatchCallback(check_every=2)
    trainer = Trainer(model=model, args=targs(tmp_path, max_steps=4), train_dataset=XorData(),
                      callbacks=[cb])
    trainer.train()
    first = cb.watcher
    assert first.removed and first.step == 4
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())
    trainer.args.max_steps = 6
    trainer.train()
    assert cb.watcher is not first and cb.watcher.removed
    assert cb.report().steps == trainer.state.global_step == 6
    assert first.report().steps == 4


def test_a_failed_train_is_detached_by_the_next(tmp_path):
    class Boom(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("boom")

    cb, boom = GradWatchCallback(check_every=2), Boom()
    trainer = Trainer(model=SigmoidMLP(depth=2), args=targs(tmp_path, max_steps=4),
                      train_dataset=XorData(), callbacks=[cb, boom])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    failed = cb.watcher
    assert not failed.removed  # no Trainer event for a failure: still attached
    trainer.remove_callback(boom)
    trainer.train()
    assert failed.removed and cb.watcher is not failed
    assert sorted(rows(trainer, "gradwatch/grad_norm/body.0")) == [2, 4]


# -- where the numbers go ----------------------------------------------------------------------


def test_numbers_reach_tensorboard_and_log_history(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    cb = GradWatchCallback(check_every=5, tensorboard=tmp_path / "own")
    trainer = train(tmp_path, SigmoidMLP(depth=2), XorData(), cb, max_steps=20,
                    report_to=["tensorboard"], logging_steps=10)
    ours = rows(trainer, "gradwatch/grad_norm/body.0")
    assert sorted(ours) == [5, 10, 15, 20]
    assert all(isinstance(v, float) for row in ours.values() for k, v in row.items()
               if k != "step")

    def scalars(logdir):
        acc = EventAccumulator(str(logdir))
        acc.Reload()
        return acc, set(acc.Tags()["scalars"])

    # The Trainer's TensorBoardCallback prefixes "train/" to every key it is handed.
    acc, tags = scalars(tmp_path / "tb")
    assert {"train/gradwatch/grad_norm/body.0", "train/gradwatch/loss",
            "train/gradwatch/findings", "train/gradwatch/warnings", "train/loss"} <= tags
    events = acc.Scalars("train/gradwatch/grad_norm/body.0")
    assert [e.step for e in events] == [5, 10, 15, 20]
    assert [e.value for e in events] == pytest.approx(
        [ours[s]["gradwatch/grad_norm/body.0"] for s in (5, 10, 15, 20)], rel=1e-6)
    # tensorboard= of the torch watcher still writes its own event file
    acc, tags = scalars(tmp_path / "own")
    assert "gradwatch/grad_norm/body.0" in tags
    assert [e.step for e in acc.Scalars("gradwatch/grad_norm/body.0")] == [5, 10, 15, 20]


def test_one_callback_in_two_trainers_reports_to_the_one_training(tmp_path, monkeypatch):
    cb = GradWatchCallback(check_every=2)
    first, second = (Trainer(model=SigmoidMLP(depth=2), args=targs(tmp_path / name, max_steps=4),
                             train_dataset=XorData(), callbacks=[cb]) for name in "ab")
    seen = []
    for trainer in (first, second):
        monkeypatch.setattr(transformers.integrations.TensorBoardCallback, "on_log",
                            lambda self, *a, logs=None, **kw: seen.append((self, logs)))
        trainer.callback_handler.add_callback(transformers.integrations.TensorBoardCallback())
    second.train()
    assert cb._callbacks is second.callback_handler.callbacks
    ours = [(r, logs) for r, logs in seen if "gradwatch/grad_norm/body.0" in logs]
    reporter = second.callback_handler.callbacks[-1]
    assert [r for r, _ in ours] == [reporter, reporter]  # steps 2 and 4, to this trainer's
    assert all(isinstance(v, float) for _, logs in ours for v in logs.values())


def test_without_the_callback_list_numbers_go_to_log_history_and_it_warns_once(
        tmp_path, monkeypatch, caplog):
    import gradwatch_torch._hf as hf

    monkeypatch.setattr(hf, "find_callbacks", lambda callback, model: None)
    cb = GradWatchCallback(check_every=2)
    trainer = Trainer(model=SigmoidMLP(depth=2), args=targs(tmp_path, max_steps=4),
                      train_dataset=XorData(), callbacks=[cb])
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        trainer.train()
        trainer.train()
    said = [r for r in caplog.records if "callback list" in r.getMessage()]
    assert len(said) == 1 and "log_history only" in said[0].getMessage()
    assert sorted(rows(trainer, "gradwatch/grad_norm/body.0")) == [2, 4]


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("options, error, name", [
    ({"check_evry": 5}, TypeError, "check_evry"),
    ({"optimizer": object()}, TypeError, "optimizer"),
    ({"update_ratio": "often"}, ValueError, "update_ratio"),
    ({"sample_fraction": 2.0}, ValueError, "sample_fraction"),
    ({"check_every": 0}, ValueError, "check_every"),
    ({"tensorboard": 3}, TypeError, "tensorboard"),
    ({"on_finding": "shout"}, ValueError, "on_finding"),
])
def test_bad_options_fail_at_construction_naming_them(options, error, name):
    with pytest.raises(error, match=name):
        GradWatchCallback(**options)


def test_before_any_train_there_is_an_empty_report():
    cb = GradWatchCallback()
    assert cb.findings == [] and cb.report().steps == 0


# -- the docs page ---------------------------------------------------------------------------


def test_the_docs_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (DOCS / "integrations" / "transformers.md").read_text(encoding="utf-8")
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    scope = {"__name__": "example"}
    exec(compile(code, "docs/integrations/transformers.md", "exec"), scope)
    assert scope["trainer"].state.global_step == scope["cb"].report().steps > 0


def test_the_guard_skips_a_nan_batch_behind_accelerates_optimizer(tmp_path):
    torch.manual_seed(0)
    data = XorData(640)
    data.x[6 * 32 + 3, 0] = float("nan")  # in the 7th batch (no shuffling: see sampler below)
    model = SigmoidMLP(depth=2)
    cb = GradWatchCallback(guard="skip")
    trainer = Trainer(model=model, args=targs(tmp_path, max_steps=20, optim="adamw_torch",
                                              learning_rate=1e-2, per_device_train_batch_size=32,
                                              train_sampling_strategy="sequential"),
                      train_dataset=data, callbacks=[cb])
    trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    report = cb.report()
    assert report.skipped_steps == 1
    assert [f.step for f in report.findings if f.kind == "nonfinite"] == [7]
    assert trainer.state.global_step == 20 and report.steps == 19
