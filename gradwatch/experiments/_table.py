"""The experiment table: every reference run, what it trains and the verdict it must produce."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from ._data import DATASETS

#: Kinds a healthy run must not raise. A loss plateau is allowed: a run that converged plateaus
#: too (the finding says whether the run is stuck or converged); saturated sigmoid units are
#: allowed in a net that learns anyway.
UNHEALTHY = ("vanishing_gradient", "exploding_gradient", "nonfinite", "loss_divergence",
             "stalled_update", "dead_units")

#: What a failure must not be mistaken for.
NOT_A_BLOWUP = ("exploding_gradient", "nonfinite", "loss_divergence")

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "prelu")
INITS = ("default", "xavier", "he")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One reference run: a model, how it is trained, and the verdict it must produce.

    The model is an MLP on 2 inputs: ``depth`` hidden layers of ``width`` units, each
    ``Linear -> [BatchNorm] -> activation`` (plus an identity skip around every hidden layer
    but the first when ``residual``), then a linear output unit trained with binary
    cross-entropy on logits. Layers are named alike in every framework: ``fc0``, ``bn0``,
    ``act0``, ..., ``out``.
    """

    #: Unique id, used by ``--only`` and ``gradwatch experiments run``.
    name: str
    #: The lesson it belongs to (several runs share one: the failure and its repairs).
    group: str
    title: str
    #: What the run shows and why; honest about what does not work.
    description: str
    #: The mitigation being shown (``"none"`` for a failure).
    mitigation: str
    #: Kinds that must be reported.
    expect: tuple[str, ...] = ()
    #: Kinds that must not be reported.
    forbid: tuple[str, ...] = UNHEALTHY
    depth: int = 10
    width: int = 32
    activation: str = "sigmoid"
    #: LeakyReLU's slope for negative inputs (PyTorch's default; Keras' is 0.3).
    negative_slope: float = 0.01
    #: ``"default"``: PyTorch's ``nn.Linear`` default, U(±1/sqrt(fan_in)) for weights and biases;
    #: ``"xavier"``: Glorot uniform, zero bias; ``"he"``: He (Kaiming) normal, zero bias.
    init: str = "default"
    #: Multiplies every initial weight matrix (an oversized init when > 1).
    init_scale: float = 1.0
    #: A constant every hidden bias starts at, instead of the scheme's bias.
    bias_init: float | None = None
    batchnorm: bool = False
    residual: bool = False
    data: str = "moons"
    n: int = 512
    noise: float = 0.1
    lr: float = 0.05
    batch: int = 64
    steps: int = 300
    #: Global gradient-norm clipping (``clip_grad_norm_`` / Keras ``global_clipnorm``).
    clip_norm: float | None = None
    seed: int = 0
    #: gradwatch's ``check_every`` for the run.
    check_every: int = 5

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.data not in DATASETS:
            raise ValueError(f"data must be one of {tuple(DATASETS)}, got {self.data!r}")
        if set(self.expect) & set(self.forbid):
            raise ValueError(f"{self.name}: a kind cannot be both expected and forbidden")

    @property
    def expected(self) -> str:
        """The verdict in words: ``"vanishing_gradient"``, ``"healthy"``, ..."""
        if not self.expect:
            return "healthy" if set(self.forbid) >= set(UNHEALTHY) else "no " + ", ".join(self.forbid)
        # The forbidden kinds are worth saying when they are few: they are the run's point
        # (clipping: exploding gradients, but no NaN).
        extra = f", no {', '.join(self.forbid)}" if 0 < len(self.forbid) < 3 else ""
        return " + ".join(self.expect) + extra

    def with_(self, **changes) -> Experiment:
        """A copy with some settings changed (tests use fewer steps, another seed)."""
        return dataclasses.replace(self, **changes)

    def dataset(self) -> tuple[np.ndarray, np.ndarray]:
        return DATASETS[self.data](n=self.n, noise=self.noise, seed=self.seed)


_FAILURE = (
    "The classic failure: 10 hidden sigmoid layers with PyTorch's default init, trained with "
    "plain SGD. The sigmoid's derivative is at most 0.25, so the gradient shrinks at every layer "
    "on its way back: the first layers receive almost none, their weights barely move, and the "
    "loss sits at ln 2 = 0.693 (a coin toss)."
)

EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(
        name="deep-sigmoid", group="failure", title="Deep sigmoid MLP (the failure)",
        description=_FAILURE, mitigation="none",
        expect=("vanishing_gradient", "loss_plateau"),
        forbid=NOT_A_BLOWUP),
    Experiment(
        name="shallow-sigmoid", group="fewer-layers", title="Fewer layers: 2 hidden sigmoid layers",
        description="Same task, activation, init and optimizer, with 2 hidden layers instead of "
                    "10: the gradient passes through two sigmoid derivatives instead of ten and "
                    "reaches the first layer. A shallow sigmoid net still learns slowly with SGD.",
        mitigation="fewer layers", depth=2),
    Experiment(
        name="deep-relu", group="relu", title="ReLU (with He init)",
        description="The 10-layer net with ReLU, initialised as ReLU nets are meant to be (He). "
                    "ReLU's derivative is 1 where a unit is active, so depth no longer divides "
                    "the gradient by 4 per layer. (With PyTorch's default init instead, see "
                    "deep-relu-default-init: it still vanishes.)",
        mitigation="ReLU + He init", activation="relu", init="he"),
    Experiment(
        name="deep-leaky-relu", group="relu", title="LeakyReLU (slope 0.01, He init)",
        description="LeakyReLU keeps a small slope for negative inputs, so a unit cannot die "
                    "(output zero and pass no gradient for every input).",
        mitigation="LeakyReLU + He init", activation="leaky_relu", init="he"),
    Experiment(
        name="deep-prelu", group="relu", title="PReLU (learned slope from 0.25, He init)",
        description="PReLU learns the negative slope of every unit.",
        mitigation="PReLU + He init", activation="prelu", init="he"),
    Experiment(
        name="deep-sigmoid-xavier", group="init", title="Xavier/Glorot init, still sigmoid",
        description="Glorot init keeps the variance of activations and gradients roughly "
                    "constant for a zero-centred activation with slope 1 at 0 (tanh). The "
                    "sigmoid is neither: its slope is at most 0.25. Init alone does not rescue "
                    "the 10-layer sigmoid net.",
        mitigation="Xavier init", init="xavier",
        expect=("vanishing_gradient",),
        forbid=NOT_A_BLOWUP),
    Experiment(
        name="deep-tanh-xavier", group="init", title="Xavier/Glorot init with tanh",
        description="The pairing Glorot init was derived for: tanh is zero-centred with "
                    "slope 1 at 0, and the gradient reaches the first layer.",
        mitigation="tanh + Xavier init", activation="tanh", init="xavier"),
    Experiment(
        name="deep-relu-default-init", group="init",
        title="ReLU with PyTorch's default init (not He)",
        description="ReLU alone is not enough: nn.Linear's default init draws weights with "
                    "variance 1/(3 fan_in), a sixth of He's 2/fan_in, so each ReLU layer shrinks "
                    "the backward signal by about 0.4 and ten layers by about 1e-4. Compare "
                    "deep-relu, the same net with He init.",
        mitigation="ReLU (default init)", activation="relu",
        expect=("vanishing_gradient",),
        forbid=NOT_A_BLOWUP),
    Experiment(
        name="deep-sigmoid-batchnorm", group="batchnorm",
        title="BatchNorm after each linear layer, still sigmoid",
        description="BatchNorm re-centres and re-scales every pre-activation, keeping the "
                    "sigmoids in their steep region, and rescales the gradient by the same "
                    "factor on the way back.",
        mitigation="BatchNorm", batchnorm=True),
    Experiment(
        name="deep-sigmoid-residual", group="residual",
        title="Residual connections, still sigmoid",
        description="An identity skip around each hidden layer (h = h + sigmoid(W h + b)) gives "
                    "the gradient a path to the first layer that multiplies by 1, not by 0.25.",
        mitigation="residual connections", residual=True),
    Experiment(
        name="explode", group="exploding",
        title="Exploding: ReLU with an oversized init (3x He)",
        description="Every layer multiplies the signal, and the gradient, by about 3; across "
                    "10 layers that is a factor of tens of thousands. The first SGD step "
                    "overshoots and the next overflows to NaN.",
        mitigation="none", activation="relu", init="he", init_scale=3.0,
        # It is over within a few steps: check each one, so the plot shows the blow-up.
        steps=60, check_every=1,
        expect=("exploding_gradient", "nonfinite"), forbid=()),
    Experiment(
        name="explode-clip-only", group="exploding",
        title="Gradient-norm clipping alone (oversized init kept)",
        description="Clipping the global gradient norm to 1.0 keeps every step bounded, so no "
                    "NaN; but the gradients themselves are still huge (gradwatch measures them "
                    "before clipping and says so) and the logits are enormous: the loss stays "
                    "in the hundreds.",
        mitigation="clipping", activation="relu", init="he", init_scale=3.0, clip_norm=1.0,
        expect=("exploding_gradient",), forbid=("nonfinite",)),
    Experiment(
        name="explode-repaired", group="exploding",
        title="Repaired: He init, 5x lower learning rate, gradient-norm clipping",
        description="Sane init (He), a 5x lower learning rate and clipping the global gradient "
                    "norm to 1.0, together.",
        mitigation="He init + lower lr + clipping", activation="relu", init="he", lr=0.01,
        clip_norm=1.0),
    Experiment(
        name="dying-relu", group="dying",
        title="Dying ReLU: biases start at -1, most units output zero",
        description="Every hidden bias starts at -1.0: in 3 of the 4 hidden layers most ReLU "
                    "units are negative for every input, output zero, pass no gradient and "
                    "never recover.",
        mitigation="none", activation="relu", init="he", bias_init=-1.0, depth=4,
        expect=("dead_units",), forbid=NOT_A_BLOWUP),
    Experiment(
        name="dying-relu-leaky-0.3", group="dying",
        title="LeakyReLU (slope 0.3, Keras' default), same biases",
        description="With a 30% slope the negative units carry enough gradient to climb back, "
                    "and the net trains.",
        mitigation="LeakyReLU(0.3)", activation="leaky_relu", negative_slope=0.3, init="he",
        bias_init=-1.0, depth=4),
)

GROUPS: tuple[str, ...] = tuple(dict.fromkeys(e.group for e in EXPERIMENTS))


def get(name: str) -> Experiment:
    """The experiment called ``name``; a ``KeyError`` lists the valid names."""
    for e in EXPERIMENTS:
        if e.name == name:
            return e
    raise KeyError(f"no experiment {name!r}; choose from: {', '.join(e.name for e in EXPERIMENTS)}")


def select(names: Iterable[str] | None) -> list[Experiment]:
    """Experiments by name or group (``"init"`` selects its three runs), in table order.

    ``None`` or an empty selection selects all. An unknown name raises ``KeyError``.
    """
    wanted = [n.strip() for name in (names or ()) for n in name.split(",") if n.strip()]
    if not wanted:
        return list(EXPERIMENTS)
    known = {e.name for e in EXPERIMENTS} | set(GROUPS)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise KeyError(f"unknown experiment(s) {', '.join(map(repr, unknown))}; choose from "
                       f"names {', '.join(e.name for e in EXPERIMENTS)} or groups "
                       f"{', '.join(GROUPS)}")
    return [e for e in EXPERIMENTS if e.name in wanted or e.group in wanted]


def judge(exp: Experiment, kinds: Iterable[str]) -> list[str]:
    """What is wrong with a run's findings against the spec: ``[]`` means PASS."""
    seen = set(kinds)
    problems = [f"expected {k}, not reported" for k in exp.expect if k not in seen]
    problems += [f"{k} reported, expected none" for k in exp.forbid if k in seen]
    return problems


def describe(experiments: Sequence[Experiment]) -> str:
    """The ``gradwatch experiments list`` text."""
    lines = []
    group = None
    for e in experiments:
        if e.group != group:
            group = e.group
            lines.append(f"{group}:")
        lines.append(f"  {e.name:<24} {e.title}  [expected: {e.expected}]")
    return "\n".join(lines)
