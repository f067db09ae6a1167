"""Paths users take that the other tests do not: AMP overflow steps, the scaler without an
optimizer, update_ratio="off", sample_fraction, DataParallel, clipping and advice."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
import gradwatch.torch  # noqa: E402,F401

#: What the scaler's own overflow probes must never raise.
ALARMS = {"nonfinite", "exploding_gradient", "loss_divergence"}


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def _capture(watcher) -> list:
    """The StepStats of each check, as the core receives them."""
    seen: list = []
    check = watcher.monitor.check

    def spy(stats):
        seen.append(stats)
        return check(stats)

    watcher.monitor.check = spy
    return seen


def _per_step(stats: list) -> dict[int, tuple[float, float]]:
    """step -> (loss, whole-model gradient norm) over all checks."""
    out = {}
    for s in stats:
        for i, step in enumerate(s.steps):
            out[int(step)] = (float(s.loss[i]), float(np.sqrt(np.nansum(s.grad_norm[i] ** 2))))
    return out


# -- 1. fp16 GradScaler overflow steps ---------------------------------------------------------

def _amp_run(watch: bool, pass_scaler: bool, steps: int = 24, check_every: int = 4):
    """fp16 autocast on CPU with a GradScaler; at steps 3 and 12 the scale is pushed to 2**19 so
    that the fp16 backward overflows and scaler.step() skips the optimizer (twice or more each
    time, halving the scale until it fits again).

    Returns (truth, watcher, stats): truth is one (skipped, loss, unscaled grad norm) per call.
    """
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    watcher = stats = None
    if watch:
        watcher = gradwatch.torch.watch(model, optimizer=opt, check_every=check_every,
                                        scaler=scaler if pass_scaler else None)
        stats = _capture(watcher)
    torch.manual_seed(1)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    truth = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradientHealthWarning)
        for i in range(steps):
            xb = x + 0.1 * i  # a different loss each step
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = ((model(xb).float() - y) ** 2).mean()
            if watcher is not None:
                watcher.observe_loss(loss)
            scaler.scale(loss).backward()
            scale = scaler.get_scale()
            grads = [p.grad.detach().double() / scale for p in model.parameters()]
            norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            unchanged = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
            scaler.update()
            assert unchanged == (scaler.get_scale() < scale)  # the scaler's own account of a skip
            if i in (3, 12):
                scaler.update(2.0 ** 19)
            truth.append((unchanged, float(loss.detach()), norm))
    if watcher is not None:
        watcher.remove()
    return truth, watcher, stats


def test_amp_truth_without_gradwatch():
    truth, _, _ = _amp_run(watch=False, pass_scaler=False)
    skipped = [i for i, t in enumerate(truth) if t[0]]
    assert len(skipped) >= 2 and 0 not in skipped  # overflow steps really happen, mid-run
    assert all(not math.isfinite(truth[i][2]) for i in skipped)  # they overflowed


@pytest.mark.parametrize("pass_scaler", [True, False], ids=["scaler=", "found"])
def test_amp_skipped_steps_are_not_steps_and_keep_their_loss(pass_scaler):
    truth, watcher, stats = _amp_run(watch=True, pass_scaler=pass_scaler)
    real = [t for t in truth if not t[0]]
    # a skipped step is not an optimizer step (docs/torch.md "Steps"): the optimizer did not run
    assert watcher.step == len(real)
    got = _per_step(stats)
    assert sorted(got) == list(range(1, len(real) // 4 * 4 + 1))  # every checked window full
    for step, (loss, norm) in got.items():
        _, want_loss, want_norm = real[step - 1]
        # the loss of the real step only: a skipped step's loss is not averaged into it
        assert loss == pytest.approx(want_loss, rel=1e-6), step
        # the unscaled norm of the gradient the optimizer applied
        assert norm == pytest.approx(want_norm, rel=1e-4), step
    # the scaler's own skips are normal under AMP: never a warning, said once as info, counted
    assert not {f.kind for f in watcher.findings if f.is_warning} & ALARMS
    told = [f for f in watcher.findings if f.evidence.get("scaler_skipped")]
    assert len(told) == 1 and told[0].severity == "info" and told[0].kind == "nonfinite"
    report = watcher.report()
    assert report.scaler_skipped_steps == len(truth) - len(real)  # the scaler's own account
    assert report.skipped_steps == 0  # not the guard's
    assert "skipped by the scaler" in str(report)


# -- 7. advice stops suggesting clipping once clipping is observed ------------------------------

class _ReluRNN(nn.Module):
    """Identity recurrence scaled by 1.5: gradients grow ~1.5**40 through time (explodes)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(1, 16, nonlinearity="relu", batch_first=True)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(1.5 * torch.eye(16))
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _exploding_run(clip: bool):
    torch.manual_seed(0)
    x = torch.rand(256, 40, 1)
    y = (x.sum(dim=(1, 2)) > 20).float()
    model = _ReluRNN()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradientHealthWarning)
        with gradwatch.torch.watch(model, optimizer=opt) as w:
            for _ in range(40):
                idx = torch.randint(0, len(x), (64,))
                opt.zero_grad()
                loss = nn.functional.binary_cross_entropy_with_logits(
                    model(x[idx]).squeeze(-1), y[idx])
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
    found = [f for f in w.findings if f.kind == "exploding_gradient"]
    assert found, w.report()  # gradients are read before clipping: the explosion is still seen
    return found[0].advice


def test_exploding_advice_suggests_clipping_when_the_user_does_not_clip():
    assert any("clip" in a for a in _exploding_run(clip=False))


def test_exploding_advice_does_not_suggest_clipping_when_the_user_clips():
    advice = _exploding_run(clip=True)
    assert not any("clip the gradient" in a or "clip_grad_norm_" in a for a in advice), advice
    assert any("spectral radius" in a for a in advice)  # the cause, instead
    assert any("learning rate" in a for a in advice)


# -- 3. update_ratio="off" ----------------------------------------------------------------------

def _train_few(model, steps: int = 12, **options):
    d_in = next(model.parameters()).shape[-1]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(1)
    x, y = torch.randn(32, d_in), torch.randn(32, 1)
    w = gradwatch.torch.watch(model, optimizer=opt, check_every=4, **options)
    stats = _capture(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradientHealthWarning)
        for _ in range(steps):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            w.observe_loss(loss)
            opt.step()
    return w, stats, opt


def test_update_ratio_off_measures_no_update_and_holds_less():
    w_off, stats, _ = _train_few(_net(), update_ratio="off")
    w_on, stats_on, _ = _train_few(_net())
    assert w_off.step == 12 and len(stats) == 3
    for s in stats:
        assert s.update_ratio is None or np.isnan(s.update_ratio).all()
        assert s.weight_change is None or np.isnan(s.weight_change).all()
    assert any(s.update_ratio is not None and np.isfinite(s.update_ratio).all()
               for s in stats_on)  # the sampled run does measure it
    assert not {f.kind for f in w_off.findings} & {"stalled_update", "large_update"}
    assert w_off.extra_memory_bytes() < w_on.extra_memory_bytes()
    str(w_off.report())
    w_off.remove()
    w_on.remove()


# -- 4. sample_fraction ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 1.5, "x", -0.1])
def test_bad_sample_fraction_is_refused_by_name(bad):
    with pytest.raises((ValueError, TypeError), match="sample_fraction"):
        gradwatch.torch.watch(_net(), optimizer=None, sample_fraction=bad)


# -- 5. DataParallel ----------------------------------------------------------------------------

def test_data_parallel_layers_and_norms_are_the_users_module():
    net = _net()
    dp = nn.DataParallel(net)  # no GPU: it calls the module
    w, stats, _ = _train_few(dp, steps=4)
    assert list(w.layers()) == ["0", "2"]
    s = stats[-1]
    want = [math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in m.parameters()))
            for m in (net[0], net[2])]
    assert s.layers == ("0", "2")
    np.testing.assert_allclose(s.grad_norm[-1], want, rtol=1e-5)
    w.remove()


# -- 2. scaler= without an optimizer: every backward is a step ----------------------------------

def test_scaler_without_optimizer_unscales_every_backward():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # the user's, not given to gradwatch
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    w = gradwatch.torch.watch(model, scaler=scaler, check_every=2)
    stats = _capture(w)
    torch.manual_seed(1)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    want = []
    for i in range(6):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = ((model(x + 0.1 * i).float() - y) ** 2).mean()
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        want.append([math.sqrt(sum(float(((p.grad.double() / scale) ** 2).sum())
                                   for p in m.parameters())) for m in (model[0], model[2])])
        scaler.step(opt)
        scaler.update()
    assert w.step == 6
    got = np.concatenate([s.grad_norm for s in stats])
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got, want, rtol=1e-4)  # unscaled: scale 1024 would be way off
    w.remove()


# -- 4. sample_fraction: the sample's size ------------------------------------------------------

def test_sample_fraction_sets_the_sample_size():
    big = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 1))
    n = sum(p.numel() for p in big.parameters())
    held = {}
    for frac in (0.02, 0.5, 1.0):
        w, _, _ = _train_few(big, steps=4, sample_fraction=frac)
        held[frac] = w.extra_memory_bytes()
        w.remove()
    # held between steps: the start-of-run sample (float32, ~fraction of the elements; the
    # stride is a prime near 1 / fraction, 32 elements at least per tensor) plus a small
    # per-step history (check_every rows)
    for frac, got in held.items():
        assert got == pytest.approx(frac * 4 * n, rel=0.15, abs=256), frac
