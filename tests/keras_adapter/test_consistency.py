"""The same network, data and optimizer in PyTorch and in Keras: gradwatch says the same thing.

Each scenario builds one Keras MLP, copies its initial weights into the equivalent
``torch.nn.Sequential``, and trains both with plain SGD on the same numpy data, in the same batch
order, for the same number of optimizer steps. The two runs are then the same computation up to
float32 rounding, so the gradient/update findings (kind, layer position) must agree, and so must
the gradient norms gradwatch measured at the first check.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from conftest import StatsRecorder, circles, compiled, fit, mlp, to_numpy  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.keras import GradWatchCallback  # noqa: E402

#: Findings about gradients and updates, which both adapters measure per layer.
GRADIENT_KINDS = {"vanishing_gradient", "exploding_gradient", "stalled_update", "nonfinite"}
EPOCHS = 6
BATCH = 32

TORCH_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


def torch_twin(model) -> nn.Sequential:
    """The Keras Dense stack as ``Linear``/activation modules, starting from the same weights."""
    modules: list[nn.Module] = []
    dense = [layer for layer in model.layers if layer.weights]
    for i, layer in enumerate(dense):
        kernel, bias = (to_numpy(w) for w in layer.weights)
        lin = nn.Linear(*kernel.shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(kernel.T.copy()))
            lin.bias.copy_(torch.from_numpy(bias))
        modules.append(lin)
        if i < len(dense) - 1:
            modules.append(TORCH_ACTIVATIONS[layer.activation.__name__]())
    return nn.Sequential(*modules)


def epochs_of(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``EPOCHS`` shuffled passes over the data, laid end to end: both frameworks then see the
    same batches in the same order (fitted as one epoch with ``shuffle=False``)."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(x)) for _ in range(EPOCHS)])
    return x[order], y[order]


def train_torch(model: nn.Module, x: np.ndarray, y: np.ndarray, lr: float, **options):
    """The loop Keras' ``fit(shuffle=False)`` runs: batches in order, SGD, mean BCE on logits."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with gradwatch.torch.watch(model, optimizer=opt, **options) as watcher:
            for i in range(0, len(xt), BATCH):
                opt.zero_grad()
                loss = loss_fn(model(xt[i:i + BATCH]).squeeze(-1), yt[i:i + BATCH])
                loss.backward()
                watcher.observe_loss(loss)
                opt.step()
    return watcher


def indexed(findings, report) -> set[tuple[str, int]]:
    """(kind, position of the finding's layer among the report's layer rows); -1 for a finding
    about the whole model (a non-finite loss names no layer)."""
    position = {row.name: i for i, row in enumerate(report.layers)}
    return {(f.kind, -1 if f.layer is None else position[f.layer])
            for f in findings if f.kind in GRADIENT_KINDS}


def first_per_kind(pairs: set[tuple[str, int]]) -> dict[str, int]:
    first: dict[str, int] = {}
    for kind, i in sorted(pairs):
        first.setdefault(kind, i)
    return first


SCENARIOS = [
    pytest.param(dict(depth=10, activation="sigmoid", init="glorot_uniform", lr=0.1, scale=100.0),
                 {"vanishing_gradient": 0}, True, id="deep-sigmoid-inputs-x100"),
    pytest.param(dict(depth=10, activation="relu", init="he_normal", lr=0.05, scale=1.0),
                 {}, True, id="relu-he-10-layers"),
    pytest.param(dict(depth=3, activation="relu", init="he_normal", lr=1e-7, scale=1.0),
                 {"stalled_update": 0}, True, id="tiny-learning-rate"),
    # Explodes within a few steps (which layer first depends on the initial weights, so on the
    # backend's random streams), then the ReLUs die or the values overflow. A diverging run is
    # chaotic: float32 rounding decides when, and where, the later findings start, so only the
    # kinds are compared.
    pytest.param(dict(depth=3, activation="relu", init="he_normal", lr=50.0, scale=1.0),
                 {"exploding_gradient": None}, False, id="huge-learning-rate"),
]


def twins(setup):
    """The scenario's data, a compiled Keras MLP and its weight-copied torch twin."""
    x, y = epochs_of(*circles())
    model = compiled(mlp(setup["depth"], activation=setup["activation"], init=setup["init"]),
                     lr=setup["lr"])
    return x * setup["scale"], y, model, torch_twin(model)


@pytest.mark.parametrize("setup, first, exact", SCENARIOS)
def test_keras_and_torch_report_the_same_gradient_findings(setup, first, exact):
    x, y, model, twin = twins(setup)
    keras_rec, torch_rec = StatsRecorder(), StatsRecorder()
    k = fit(model, (x, y), epochs=1, batch_size=BATCH, shuffle=False, sync=True,
            callback=GradWatchCallback(plugins=[keras_rec]))
    t = train_torch(twin, x, y, setup["lr"], plugins=[torch_rec])

    # Same layers, in the same order.
    assert len(k.report.layers) == len(t.report().layers) == setup["depth"] + 1
    assert k.report.steps == t.report().steps == len(x) // BATCH == EPOCHS * 16
    # Same numbers for the first steps: the runs are one computation up to float32 rounding
    # (later, a diverging run amplifies the rounding differences).
    np.testing.assert_allclose(keras_rec.stats[0].steps, torch_rec.stats[0].steps)
    np.testing.assert_allclose(keras_rec.stats[0].grad_norm[:3], torch_rec.stats[0].grad_norm[:3],
                               rtol=1e-3)
    np.testing.assert_allclose(keras_rec.stats[0].loss[:3], torch_rec.stats[0].loss[:3],
                               rtol=1e-4)

    keras_pairs = indexed(k.findings, k.report)
    torch_pairs = indexed(t.findings, t.report())
    found = first_per_kind(keras_pairs)
    for kind, layer in first.items():  # None: any layer
        assert kind in found and layer in (None, found[kind]), k.report
    if exact:
        assert found == first, k.report
        # Exact sets, not just the first layer per kind: the runs start from the same weights
        # and see the same batches, so even which later layers cross a threshold agrees.
        assert keras_pairs == torch_pairs, f"keras:\n{k.report}\n\ntorch:\n{t.report()}"
    else:
        # Past the first NaN the twins are different computations (here Keras' loss ends at
        # 3e35, torch's went NaN and came back to 7.6): the warnings agree, the later facts
        # (an info on the dead gradient after the blow-up) need not.
        warned = [{f.kind for f in run if f.is_warning} for run in (k.findings, t.findings)]
        assert warned[0] == warned[1], f"keras:\n{k.report}\n\ntorch:\n{t.report()}"


#: Per-layer statistics both adapters report, each compared at every check of the first 10
#: steps. Same float32 computation with a different operation order (TF/Keras matmuls against
#: torch's): measured gaps are ~1e-6 after 10 steps (orthogonal norm: up to 6e-7, weight change
#: 4e-7); 1e-4 leaves 100x for backends and BLAS builds and still catches any definitional slip
#: (a bias left out of a layer moves its weight norm by percents, a ratio taken against the
#: wrong weights by ~update_ratio itself).
SHARED_STATS = ("grad_norm", "loss", "grad_max", "grad_nonfinite", "weight_norm",
                "weight_nonfinite", "update_ratio", "weight_change", "grad_norm_orthogonal")
TWIN_RTOL = 1e-4


@pytest.mark.parametrize("setup", [
    # tanh on inputs x20: part of the first layers saturates (a non-trivial saturated fraction)
    pytest.param(dict(depth=4, activation="tanh", init="glorot_uniform", lr=0.1, scale=20.0),
                 id="tanh-saturating"),
    # He-init ReLUs: no unit dead for a whole batch, so dead fractions compare 0 with 0; the
    # other statistics through ReLU layers are the point
    pytest.param(dict(depth=6, activation="relu", init="he_normal", lr=0.05, scale=1.0),
                 id="relu-he"),
    pytest.param(dict(depth=3, activation="sigmoid", init="glorot_uniform", lr=0.5, scale=30.0),
                 id="sigmoid-saturating"),
])
def test_keras_and_torch_measure_every_shared_statistic_alike(setup):
    """Every statistic both adapters put in StepStats, not only gradient norms: the twins are
    one computation, so any gap beyond float32 rounding is one adapter measuring something else
    (update_ratio="exact": a strided sample of a [in, out] kernel and of a [out, in] weight are
    different elements, so sampled ratios are not one computation)."""
    x, y, model, twin = twins(setup)
    keras_rec, torch_rec = StatsRecorder(), StatsRecorder()
    options = dict(update_ratio="exact", check_every=5, activation_every=5)
    fit(model, (x, y), epochs=1, batch_size=BATCH, shuffle=False, sync=True,
        callback=GradWatchCallback(plugins=[keras_rec], **options))
    train_torch(twin, x, y, setup["lr"], plugins=[torch_rec], **options)
    for ks, ts in zip(keras_rec.stats[:2], torch_rec.stats[:2]):
        assert ks.step == ts.step and len(ks.layers) == len(ts.layers)
        for name in SHARED_STATS:
            a, b = getattr(ks, name), getattr(ts, name)
            assert a is not None and b is not None, name
            np.testing.assert_allclose(a, b, rtol=TWIN_RTOL, atol=0, err_msg=f"{name} at {ks.step}")
        # Activation sites in forward order (Keras names them by layer, torch by module).
        k_acts, t_acts = list(ks.activations.values()), list(ts.activations.values())
        assert [a.kind for a in k_acts] == [a.kind for a in t_acts] == \
            [setup["activation"]] * setup["depth"]
        for ka, ta in zip(k_acts, t_acts):
            assert ka.units == ta.units
            field = "dead_fraction" if ka.kind == "relu" else "saturated_fraction"
            # A count over the batch: an output within rounding of the saturation threshold
            # may flip; one flip is 1 / (BATCH * units) (dead units: 1 / units, never seen).
            np.testing.assert_allclose(getattr(ka, field), getattr(ta, field), rtol=0,
                                       atol=1.5 / (BATCH * ka.units), err_msg=field)
    if setup["activation"] == "relu":
        return
    # The saturating scenarios measure something: a fraction of 0 everywhere compares nothing.
    fractions = [a.saturated_fraction if a.kind != "relu" else a.dead_fraction
                 for s in torch_rec.stats[:2] for a in s.activations.values()]
    assert max(fractions) > 0, fractions
