"""Field scenarios: real architectures with their usual recipes, healthy and broken.

Every scenario trains one small model on data made in code (nothing is downloaded; the
``transformers`` models are built from configs), watched by the plain
``gradwatch.torch.watch(model, optimizer=opt)``, and returns a :class:`ScenarioResult`:

- ``findings``: what gradwatch reported (kind, severity, step, layer, message, advice);
- ``evidence``: a :class:`RawEvidence` gathered WITHOUT gradwatch: the loss at every optimizer
  step, per-layer gradient L2 norms read directly from ``p.grad`` (``torch.linalg.vector_norm``)
  every ``grad_every`` steps, and where the label needs them one-step update ratios
  ``||W_after - W_before|| / ||W_before||`` and ReLU dead-unit fractions (own forward hooks);
- ``truth_ok`` / ``truth_reason``: the scenario's label checked against that raw evidence only.

Judging (:attr:`ScenarioResult.passed`): no crash, no ``gradwatch.GradWatchInternalWarning``,
``truth_ok``; a healthy run has no finding of severity ``"warning"`` (``"info"`` is fine); a broken
run has a warning-severity finding of one of its expected kinds (by step ``within`` where set) and
none of its ``forbidden`` kinds.

Layers in the raw evidence are grouped the way gradwatch documents them (docs/torch.md): the
modules that own parameters directly, in ``named_modules()`` order, a shared (tied) parameter
belonging to the first; the norm of a layer is ``sqrt(sum ||p.grad||^2)`` over its parameters.
Step ``k`` is the k-th optimizer step (1-based); its gradient is read after the last backward and
before clipping and ``optimizer.step()``, except where a scenario's ``evidence.extra`` says
otherwise.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch
from gradwatch._findings import json_number, to_json_ready

HEALTHY = "healthy"
THREADS = 1

# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FindingRecord:
    """One gradwatch finding, as the suite keeps it."""

    kind: str
    severity: str
    step: int
    layer: str | None
    message: str
    advice: tuple[str, ...] = ()

    @classmethod
    def of(cls, f: gradwatch.Finding) -> FindingRecord:
        return cls(kind=f.kind, severity=f.severity, step=f.step, layer=f.layer,
                   message=f.message, advice=tuple(f.advice))

    @property
    def is_warning(self) -> bool:
        return self.severity == "warning"

    def short(self) -> str:
        where = f" {self.layer}" if self.layer is not None else ""
        return f"{self.kind}@{self.step}{where}"


@dataclasses.dataclass
class RawEvidence:
    """What the run did, measured without gradwatch."""

    #: Loss of every optimizer step, in order (step k is ``losses[k-1]``); for accumulation, the
    #: mean over the step's micro-batches.
    losses: list[float] = dataclasses.field(default_factory=list)
    #: Steps between gradient-norm reads (also read at each of steps 1-5).
    grad_every: int = 10
    #: Layer names, gradwatch's grouping, input side first (``named_modules()`` order).
    layers: list[str] = dataclasses.field(default_factory=list)
    #: step -> layer -> gradient L2 norm from ``p.grad`` (layers without a gradient omitted).
    grad_norms: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    #: step -> layer -> ``||W_after - W_before|| / ||W_before||`` over that optimizer step.
    update_ratios: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    #: step -> ReLU module -> share of units with no positive output in the whole batch.
    dead_fractions: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    #: Anything else a scenario's label needs (accuracy, reference losses, notes).
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -- summaries ------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def initial_loss(self) -> float:
        """Mean loss of the first 5 steps."""
        return _mean(self.losses[:5])

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 20 steps (NaN when any of them is non-finite)."""
        return _mean(self.losses[-20:])

    @property
    def final_over_initial(self) -> float:
        return self.final_loss / self.initial_loss if self.initial_loss else math.nan

    @property
    def nonfinite_step(self) -> int | None:
        """First step with a non-finite loss or gradient norm, else None."""
        bad = [i + 1 for i, x in enumerate(self.losses) if not math.isfinite(x)]
        bad += [s for s, row in self.grad_norms.items()
                if any(not math.isfinite(v) for v in row.values())]
        return min(bad) if bad else None

    def median_grad_norms(self, until: int | None = None) -> dict[str, float]:
        """Per layer, the median of its finite gradient norms (over steps <= ``until``)."""
        per: dict[str, list[float]] = {}
        for step, row in self.grad_norms.items():
            if until is not None and step > until:
                continue
            for name, v in row.items():
                if math.isfinite(v):
                    per.setdefault(name, []).append(v)
        return {n: float(np.median(v)) for n, v in per.items() if v}

    def first_to_largest(self, first: str | None = None, until: int | None = None,
                         norms: dict[str, float] | None = None) -> tuple[float, str, str]:
        """(median norm of ``first`` (default: the first layer) / the largest median, first,
        largest)."""
        med = norms if norms is not None else self.median_grad_norms(until)
        if not med:
            return math.nan, "", ""
        first = first or next(n for n in self.layers if n in med)
        largest = max(med, key=med.get)
        return (med[first] / med[largest] if med[largest] > 0 else math.nan), first, largest

    def max_grad_norm(self) -> float:
        vals = [math.sqrt(sum(v * v for v in row.values())) for row in self.grad_norms.values()]
        return max(vals) if vals else math.nan

    def total_grad_norms(self) -> dict[int, float]:
        return {s: math.sqrt(sum(v * v for v in row.values()))
                for s, row in sorted(self.grad_norms.items())}

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "initial_loss": _json(self.initial_loss),
            "final_loss": _json(self.final_loss),
            "final_over_initial": _json(self.final_over_initial),
            "nonfinite_step": self.nonfinite_step,
            "losses": [_json(x) for x in self.losses],
            "grad_every": self.grad_every,
            "layers": list(self.layers),
            "grad_norms": {str(s): {k: _json(v) for k, v in row.items()}
                           for s, row in sorted(self.grad_norms.items())},
            "update_ratios": {str(s): {k: _json(v) for k, v in row.items()}
                              for s, row in sorted(self.update_ratios.items())},
            "dead_fractions": {str(s): dict(row) for s, row in sorted(self.dead_fractions.items())},
            "extra": _jsonable(self.extra),
        }


@dataclasses.dataclass
class ScenarioResult:
    """One scenario at one seed: gradwatch's findings, the raw evidence and the verdicts."""

    name: str
    seed: int
    #: ``"healthy"``, or the expected warning kinds joined by ``" or "``.
    label: str
    expected: tuple[str, ...]
    forbidden: tuple[str, ...]
    within: int | None
    findings: list[FindingRecord]
    evidence: RawEvidence
    truth_ok: bool
    truth_reason: str
    #: The traceback of an exception that ended the run, else None.
    crash: str | None = None
    #: Messages of ``gradwatch.GradWatchInternalWarning``s (with the logged traceback's tail).
    internal_warnings: list[str] = dataclasses.field(default_factory=list)
    #: Why the scenario did not run (a missing optional package), else None.
    skipped: str | None = None
    seconds: float = 0.0

    @property
    def healthy(self) -> bool:
        return self.label == HEALTHY

    @property
    def warnings(self) -> list[FindingRecord]:
        return [f for f in self.findings if f.is_warning]

    @property
    def infos(self) -> list[FindingRecord]:
        return [f for f in self.findings if not f.is_warning]

    @property
    def detected(self) -> list[FindingRecord]:
        """Warning findings of an expected kind (within the deadline, if any)."""
        return [f for f in self.warnings if f.kind in self.expected
                and (self.within is None or f.step <= self.within)]

    @property
    def forbidden_hits(self) -> list[FindingRecord]:
        return [f for f in self.warnings if f.kind in self.forbidden]

    @property
    def verdict(self) -> tuple[bool, str]:
        """(passed, why)."""
        if self.skipped:
            return False, f"skipped: {self.skipped}"
        if self.crash:
            return False, "crashed: " + _last_line(self.crash)
        if self.internal_warnings:
            return False, f"{len(self.internal_warnings)} GradWatchInternalWarning(s)"
        if not self.truth_ok:
            return False, "raw evidence does not support the label: " + self.truth_reason
        if self.healthy:
            if self.warnings:
                return False, "false alarm: " + ", ".join(f.short() for f in self.warnings)
            return True, "no warning"
        if self.forbidden_hits:
            return False, "forbidden: " + ", ".join(f.short() for f in self.forbidden_hits)
        if not self.detected:
            got = ", ".join(f.short() for f in self.warnings) or "no warning"
            when = f" by step {self.within}" if self.within else ""
            return False, f"missed {self.label}{when} (got {got})"
        return True, "detected " + ", ".join(f.short() for f in self.detected)

    @property
    def passed(self) -> bool:
        return self.verdict[0]

    def to_dict(self) -> dict[str, Any]:
        passed, why = self.verdict
        return {
            "name": self.name, "seed": self.seed, "label": self.label,
            "expected": list(self.expected), "forbidden": list(self.forbidden),
            "within": self.within, "passed": passed, "verdict": why,
            "truth_ok": self.truth_ok, "truth_reason": self.truth_reason,
            "crash": self.crash, "internal_warnings": list(self.internal_warnings),
            "skipped": self.skipped, "seconds": round(self.seconds, 2),
            "findings": [dataclasses.asdict(f) | {"advice": list(f.advice)}
                         for f in self.findings],
            "evidence": self.evidence.to_dict(),
        }


TruthFn = Callable[[RawEvidence], "tuple[bool, str]"]


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A named training run with its label and the raw-evidence test of that label."""

    name: str
    description: str
    train: Callable[[Run], None]
    truth: TruthFn
    #: Expected warning kinds; empty for a healthy run.
    expected: tuple[str, ...] = ()
    #: Kinds that must not be reported as warnings (broken runs).
    forbidden: tuple[str, ...] = ()
    #: The expected finding must come at or before this step.
    within: int | None = None
    #: Optional packages the scenario imports.
    requires: tuple[str, ...] = ()
    #: Seeds the tests run (cheap scenarios run several).
    test_seeds: tuple[int, ...] = (0, 1)

    @property
    def label(self) -> str:
        return " or ".join(self.expected) if self.expected else HEALTHY

    def missing(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


# --------------------------------------------------------------------------------------------
# Raw evidence, without gradwatch
# --------------------------------------------------------------------------------------------


def owned_layers(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """Modules owning parameters directly, ``named_modules()`` order, shared params to the
    first owner (gradwatch's documented grouping, re-implemented here)."""
    seen: set[int] = set()
    out = []
    for name, mod in model.named_modules():
        params = []
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            params.append(p)
        if params:
            out.append((name or "(root)", params))
    return out


class Recorder:
    """Reads the loss, gradient norms, update ratios and ReLU outputs straight from torch."""

    def __init__(self, model: nn.Module, evidence: RawEvidence, every: int = 10,
                 updates: bool = False, relu: bool = False, penalty: float = 0.0) -> None:
        self.ev = evidence
        self.ev.grad_every = every
        self.layers = owned_layers(model)
        self.ev.layers = [n for n, _ in self.layers]
        self.every = every
        self.updates = updates
        self.penalty = penalty  # an L2 penalty's coefficient: also record data-loss gradients
        self._before: list[list[torch.Tensor]] | None = None
        self._step = 0
        self._handles = []
        if relu:
            for name, mod in model.named_modules():
                if isinstance(mod, (nn.ReLU, nn.ReLU6)):
                    self._handles.append(mod.register_forward_hook(self._relu_hook(name)))

    def due(self, step: int) -> bool:
        return step <= 5 or step % self.every == 0

    def begin(self, step: int) -> None:
        self._step = step

    def _relu_hook(self, name: str):
        def hook(mod, args, out):
            if not (torch.is_grad_enabled() and mod.training and self.due(self._step)):
                return
            with torch.no_grad():
                y = out.detach()
                y = y.movedim(-1, 1) if y.dim() == 3 else y
                alive = (y > 0).movedim(1, 0).reshape(y.shape[1], -1).any(dim=1)
                self.ev.dead_fractions.setdefault(self._step, {})[name] = \
                    1.0 - alive.float().mean().item()
        return hook

    def grads(self, step: int) -> None:
        """Call after the step's last backward, before clipping and ``optimizer.step()``."""
        if not self.due(step):
            return
        row, data_row = {}, {}
        with torch.no_grad():
            for name, params in self.layers:
                grads = [p.grad for p in params if p.grad is not None]
                if not grads:
                    continue
                sq = sum(torch.linalg.vector_norm(g.double()) ** 2 for g in grads)
                row[name] = math.sqrt(float(sq))
                if self.penalty:
                    # gradient of the data loss alone: p.grad - d(penalty)/dp for weights
                    dsq = sum(torch.linalg.vector_norm(
                        (p.grad - 2 * self.penalty * p).double() if p.dim() > 1
                        else p.grad.double()) ** 2 for p in params if p.grad is not None)
                    data_row[name] = math.sqrt(float(dsq))
        self.ev.grad_norms[step] = row
        if self.penalty:
            self.ev.extra.setdefault("data_grad_norms", {})[step] = data_row

    def before_step(self, step: int) -> None:
        if self.updates and self.due(step):
            self._before = [[p.detach().clone() for p in ps] for _, ps in self.layers]

    def after_step(self, step: int) -> None:
        if self._before is None:
            return
        row = {}
        with torch.no_grad():
            for (name, params), before in zip(self.layers, self._before):
                num = math.sqrt(sum(float(torch.linalg.vector_norm((p - b).double()) ** 2)
                                    for p, b in zip(params, before)))
                den = math.sqrt(sum(float(torch.linalg.vector_norm(b.double()) ** 2)
                                    for b in before))
                if den > 0:
                    row[name] = num / den
        self.ev.update_ratios[step] = row
        self._before = None

    def loss(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().double().item()
        self.ev.losses.append(float(value))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class _NullWatcher:
    """Stands in for the watcher in unwatched reference (twin) runs."""

    findings: list = []

    def observe_loss(self, loss: Any) -> None:
        pass

    def remove(self) -> None:
        pass


class Run:
    """What a scenario's training function gets: the seed, and where to attach and record."""

    def __init__(self, seed: int, watching: bool = True) -> None:
        self.seed = seed
        self.watching = watching
        self.evidence = RawEvidence()
        self.watcher: Any = None
        self.recorders: list[Recorder] = []

    def watch(self, model: nn.Module, optimizer: Any = None, **options: Any) -> Any:
        """The plain watcher, default options."""
        if not self.watching:
            return _NullWatcher()
        self.watcher = gradwatch.torch.watch(model, optimizer=optimizer, **options)
        return self.watcher

    def record(self, model: nn.Module, **kw: Any) -> Recorder:
        rec = Recorder(model, self.evidence, **kw)
        self.recorders.append(rec)
        return rec

    @property
    def extra(self) -> dict[str, Any]:
        return self.evidence.extra

    def close(self) -> list[FindingRecord]:
        for rec in self.recorders:
            rec.close()
        if self.watcher is None:
            return []
        self.watcher.remove()
        return [FindingRecord.of(f) for f in self.watcher.findings]


def loop(run: Run, model: nn.Module, opt: torch.optim.Optimizer, steps: int,
         batch_loss: Callable[[int], torch.Tensor], *, clip: float | None = None,
         sched: Any = None, rec: Recorder, watcher: Any) -> None:
    """The usual loop: zero_grad, forward, backward, observe_loss, clip, step, schedule."""
    for step in range(1, steps + 1):
        rec.begin(step)
        opt.zero_grad(set_to_none=True)
        loss = batch_loss(step)
        loss.backward()
        rec.grads(step)
        watcher.observe_loss(loss)
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        rec.before_step(step)
        opt.step()
        rec.after_step(step)
        if sched is not None:
            sched.step()
        rec.loss(loss)


# --------------------------------------------------------------------------------------------
# Data made in code
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MarkovChain:
    """A random sparse first-order Markov chain over ``vocab`` tokens: each token has
    ``fanout`` successors (always including the next id, so the chain is irreducible)."""

    P: np.ndarray
    pi: np.ndarray
    entropy_rate: float       # nats/token: the best achievable next-token loss
    unigram_entropy: float    # nats/token: the loss of predicting the marginal only

    @classmethod
    def make(cls, vocab: int, fanout: int, seed: int) -> MarkovChain:
        rng = np.random.default_rng(seed)
        P = np.zeros((vocab, vocab))
        for i in range(vocab):
            succ = rng.choice(np.delete(np.arange(vocab), (i + 1) % vocab), fanout - 1,
                              replace=False)
            succ = np.append(succ, (i + 1) % vocab)
            P[i, succ] = rng.dirichlet(np.ones(fanout))
        pi = np.full(vocab, 1.0 / vocab)
        for _ in range(2000):
            pi = pi @ P
        pi /= pi.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            row_h = -np.nansum(np.where(P > 0, P * np.log(P), 0.0), axis=1)
        h_rate = float(pi @ row_h)
        h_uni = float(-(pi[pi > 0] * np.log(pi[pi > 0])).sum())
        return cls(P, pi, h_rate, h_uni)

    def sample(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` sequences of ``length`` tokens, started from the stationary distribution."""
        cum = np.cumsum(self.P, axis=1)
        out = np.empty((n, length), dtype=np.int64)
        out[:, 0] = rng.choice(len(self.pi), size=n, p=self.pi)
        for t in range(1, length):
            u = rng.random(n)[:, None]
            out[:, t] = np.minimum((u > cum[out[:, t - 1]]).sum(axis=1), len(self.pi) - 1)
        return out


def prototype_images(n_classes: int, shape: tuple[int, ...], n: int, noise: float,
                     rng: np.random.Generator, protos: np.ndarray | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Images = their class's random prototype + Gaussian noise."""
    if protos is None:
        protos = rng.standard_normal((n_classes, *shape)).astype(np.float32)
    y = rng.integers(0, n_classes, n)
    x = protos[y] + noise * rng.standard_normal((n, *shape)).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y), protos


def gaussian_clusters(n_classes: int, dim: int, n: int, rng: np.random.Generator,
                      spread: float = 1.0, centers: np.ndarray | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    if centers is None:
        centers = rng.standard_normal((n_classes, dim)) * 1.5
    y = rng.integers(0, n_classes, n)
    x = centers[y] + spread * rng.standard_normal((n, dim))
    return torch.tensor(x, dtype=torch.float32), torch.from_numpy(y), centers


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


# --------------------------------------------------------------------------------------------
# Truth tests on the raw evidence
# --------------------------------------------------------------------------------------------


def truth_healthy(max_ratio: float = 0.5, max_final: str | float | None = None,
                  min_accuracy: float | None = None) -> TruthFn:
    """Finite throughout; final loss < ``max_ratio`` x initial (and < ``max_final``, a number
    or a key of ``extra``); held-out accuracy >= ``min_accuracy`` when given."""

    def check(ev: RawEvidence) -> tuple[bool, str]:
        bad = ev.nonfinite_step
        if bad is not None:
            return False, f"non-finite loss/gradient at step {bad}"
        r = ev.final_over_initial
        why = [f"loss {ev.initial_loss:.4g} -> {ev.final_loss:.4g} (x{r:.3g}, need < "
               f"{max_ratio})"]
        ok = r < max_ratio
        if max_final is not None:
            limit = ev.extra[max_final] if isinstance(max_final, str) else max_final
            ok &= ev.final_loss < limit
            why.append(f"final < {limit:.4g}" + (f" ({max_final})" if isinstance(max_final, str)
                                                 else ""))
        if min_accuracy is not None:
            acc = ev.extra.get("accuracy", math.nan)
            ok &= acc >= min_accuracy
            why.append(f"held-out accuracy {acc:.3f} (need >= {min_accuracy})")
        return bool(ok), "; ".join(why) + "; all finite"

    return check


def truth_vanishing(ratio: float = 1e-3, no_fall: float = 0.9, data_grads: bool = False
                    ) -> TruthFn:
    """The first layer's median gradient norm < ``ratio`` x the largest layer's, and the loss
    did not fall below ``no_fall`` x its start. ``data_grads``: also on the gradients of the data
    loss alone (an L2 penalty's gradient removed)."""

    def check(ev: RawEvidence) -> tuple[bool, str]:
        r, first, largest = ev.first_to_largest()
        med = ev.median_grad_norms()
        ok = r < ratio
        why = [f"median |g| {first} {med.get(first, math.nan):.3g} / {largest} "
               f"{med.get(largest, math.nan):.3g} = {r:.3g} (need < {ratio:g})"]
        if data_grads:
            rows = ev.extra.get("data_grad_norms", {})
            dmed: dict[str, list[float]] = {}
            for row in rows.values():
                for k, v in row.items():
                    dmed.setdefault(k, []).append(v)
            dnorm = {k: float(np.median(v)) for k, v in dmed.items()}
            dr, _, dl = ev.first_to_largest(norms=dnorm)
            ok &= dr < ratio
            why.append(f"data-loss gradient only: {first} {dnorm.get(first, math.nan):.3g} / "
                       f"{dl} {dnorm.get(dl, math.nan):.3g} = {dr:.3g}")
        fr = ev.final_over_initial
        ok &= fr > no_fall
        why.append(f"loss {ev.initial_loss:.4g} -> {ev.final_loss:.4g} (x{fr:.3g}, need > "
                   f"{no_fall}: did not fall)")
        return bool(ok), "; ".join(why)

    return check


def truth_blowup(rise: float = 1.3, within: int = 20, twin_factor: float = 1.5) -> TruthFn:
    """The loss rose above ``rise`` x its first value within the first ``within`` steps, and
    afterwards every 25-step mean stayed above ``twin_factor`` x the healthy twin's final loss
    (``extra["twin_final_loss"]``)."""

    def check(ev: RawEvidence) -> tuple[bool, str]:
        early = ev.losses[:within]
        peak = max(early) if early else math.nan
        twin = ev.extra.get("twin_final_loss", math.nan)
        later = ev.losses[within:]
        means = [_mean(later[i:i + 25]) for i in range(0, max(len(later) - 24, 1), 25)]
        floor = min(means) if means else math.nan
        ok = peak > rise * ev.first_loss and floor > twin_factor * twin
        return bool(ok), (f"first loss {ev.first_loss:.4g}, peak in first {within} steps "
                          f"{peak:.4g} (x{peak / ev.first_loss:.3g}, need > {rise}); lowest "
                          f"25-step mean after that {floor:.4g} vs healthy twin's final "
                          f"{twin:.4g} (need > {twin_factor}x); final {ev.final_loss:.4g}")

    return check


def truth_explodes(grad_factor: float = 100.0, peak_factor: float = 10.0,
                   loss_factor: float = 1.5) -> TruthFn:
    """Non-finite loss/gradient; or a total gradient norm > ``grad_factor`` x step 1's; or a
    loss > ``peak_factor`` x the first loss; or a final loss > ``loss_factor`` x the first."""

    def check(ev: RawEvidence) -> tuple[bool, str]:
        bad = ev.nonfinite_step
        totals = ev.total_grad_norms()
        g1 = totals.get(1, math.nan)
        finite = [v for v in totals.values() if math.isfinite(v)]
        gmax = max(finite) if finite else math.nan
        losses = [x for x in ev.losses if math.isfinite(x)]
        peak = max(losses) if losses else math.nan
        first = ev.first_loss
        why = (f"non-finite at step {bad}; " if bad is not None else "all finite; ") + \
            (f"total |g| step 1 {g1:.3g}, max finite {gmax:.3g} (x{gmax / g1:.3g}, limit "
             f"x{grad_factor:g}); loss first {first:.4g}, peak {peak:.4g} (x{peak / first:.3g}, "
             f"limit x{peak_factor:g}), final {ev.final_loss:.4g}")
        ok = (bad is not None or gmax > grad_factor * g1 or peak > peak_factor * first
              or ev.final_loss > loss_factor * first)
        return bool(ok), why

    return check


def truth_stalled(update: float = 1e-5, update_max: float = 1e-4, ratio: float = 1e-3,
                  no_fall: float = 0.98) -> TruthFn:
    """The measured one-step update ratios: median (over layers and sampled steps) <
    ``update`` and every one < ``update_max``; gradients NOT vanishing (each layer's median norm
    >= ``ratio`` x the largest); the loss did not fall."""

    def check(ev: RawEvidence) -> tuple[bool, str]:
        ups = sorted(v for row in ev.update_ratios.values() for v in row.values())
        umed = ups[len(ups) // 2] if ups else math.nan
        umax = ups[-1] if ups else math.nan
        med = ev.median_grad_norms()
        largest = max(med.values()) if med else math.nan
        weakest = min(med, key=med.get) if med else ""
        rmin = med[weakest] / largest if med else math.nan
        fr = ev.final_over_initial
        ok = umed < update and umax < update_max and rmin >= ratio and fr > no_fall
        return bool(ok), (f"one-step update ratios: median {umed:.3g} (need < {update:g}), max "
                          f"{umax:.3g} (need < {update_max:g}); weakest layer {weakest} median "
                          f"|g| = {rmin:.3g} of the largest (need >= {ratio:g}: not vanishing); "
                          f"loss {ev.initial_loss:.4g} -> {ev.final_loss:.4g} (x{fr:.4g}, need "
                          f"> {no_fall})")

    return check


def truth_dead(fraction: float = 0.5, no_fall: float = 0.9) -> TruthFn:
    """In most sampled batches some ReLU has >= ``fraction`` dead units; loss did not fall."""

    def check(ev: RawEvidence) -> tuple[bool, str]:
        rows = list(ev.dead_fractions.values())
        worst = [max(r.values()) for r in rows if r]
        share = sum(w >= fraction for w in worst) / len(worst) if worst else 0.0
        fr = ev.final_over_initial
        ok = share > 0.5 and fr > no_fall
        med = float(np.median(worst)) if worst else math.nan
        return bool(ok), (f"{share:.0%} of {len(worst)} sampled batches have a ReLU with >= "
                          f"{fraction:.0%} dead units (median worst {med:.2f}); loss "
                          f"{ev.initial_loss:.4g} -> {ev.final_loss:.4g} (x{fr:.3g}, need > "
                          f"{no_fall})")

    return check


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def gpt2(vocab: int, seq: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet_transformers()
    cfg = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=64, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM")
    return GPT2LMHeadModel(cfg)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The usual AdamW grouping: no decay for biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "ln" in name or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class LeNet(nn.Module):
    """LeNet-5 (d2l's version): conv-act-pool x2, then three linear layers."""

    def __init__(self, act: type[nn.Module] = nn.Sigmoid, classes: int = 10,
                 extra: int = 0) -> None:
        super().__init__()
        head = [m for _ in range(extra) for m in (nn.Linear(120, 120), act())]
        self.net = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), act(), nn.AvgPool2d(2, 2),
            nn.Conv2d(6, 16, 5), act(), nn.AvgPool2d(2, 2), nn.Flatten(),
            nn.Linear(400, 120), act(), *head, nn.Linear(120, 84), act(),
            nn.Linear(84, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RNNModel(nn.Module):
    """pytorch/examples word_language_model's RNNModel (LSTM), weights tied."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.2,
                 tie_weights: bool = True) -> None:
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            assert nhid == ninp
            self.decoder.weight = self.encoder.weight
        self.nhid, self.nlayers = nhid, nlayers
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        if not tie_weights:
            nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input: torch.Tensor, hidden: Any) -> tuple[torch.Tensor, Any]:
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = next(self.parameters())
        return (w.new_zeros(self.nlayers, bsz, self.nhid), w.new_zeros(self.nlayers, bsz, self.nhid))


def mlp(sizes: Sequence[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------
# Training functions: healthy
# --------------------------------------------------------------------------------------------

VOCAB, SEQ = 64, 32
GPT2_STEPS = 300
_TWIN_FINAL: dict[int, float] = {}


def _gpt2_train(run: Run, *, lr: float, warmup: float | None, clip: float | None, steps: int,
                checkpointing: bool = False) -> None:
    from transformers import get_cosine_schedule_with_warmup

    chain = MarkovChain.make(VOCAB, 4, seed=1000 + run.seed)
    rng = np.random.default_rng(run.seed)
    pool = torch.from_numpy(chain.sample(4096, SEQ, rng))
    held = torch.from_numpy(chain.sample(256, SEQ, rng))
    torch.manual_seed(run.seed)
    model = gpt2(VOCAB, SEQ)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(decay_groups(model, 0.01), lr=lr)
    sched = (get_cosine_schedule_with_warmup(opt, int(warmup * steps), steps)
             if warmup is not None else None)
    watcher = run.watch(model, optimizer=opt)
    rec = run.record(model)
    gen = torch.Generator().manual_seed(run.seed)

    def batch_loss(step: int) -> torch.Tensor:
        x = pool[torch.randint(0, len(pool), (16,), generator=gen)]
        return model(input_ids=x, labels=x, use_cache=False).loss

    loop(run, model, opt, steps, batch_loss, clip=clip, sched=sched, rec=rec, watcher=watcher)
    model.eval()
    with torch.no_grad():
        run.extra["held_out_loss"] = float(model(input_ids=held, labels=held).loss)
    # The best a model can do on this chain is its entropy rate (plus the first token, which
    # has no context: that one is predicted at the unigram entropy).
    run.extra["entropy_rate"] = chain.entropy_rate
    run.extra["unigram_entropy"] = chain.unigram_entropy
    run.extra["good_loss"] = chain.entropy_rate + 0.5 * (chain.unigram_entropy
                                                         - chain.entropy_rate)
    run.extra["lr_at_end"] = opt.param_groups[0]["lr"]


def train_gpt2(run: Run) -> None:
    _gpt2_train(run, lr=3e-3, warmup=0.05, clip=1.0, steps=GPT2_STEPS)
    if run.watching:
        _TWIN_FINAL[run.seed] = run.evidence.final_loss


def train_gpt2_checkpointing(run: Run) -> None:
    _gpt2_train(run, lr=3e-3, warmup=0.05, clip=1.0, steps=200, checkpointing=True)


def train_gpt2_high_lr(run: Run) -> None:
    _gpt2_train(run, lr=0.2, warmup=None, clip=None, steps=400)
    if run.seed not in _TWIN_FINAL:  # the healthy recipe on the same seed, unwatched
        twin = Run(run.seed, watching=False)
        train_gpt2(twin)
        _TWIN_FINAL[run.seed] = twin.evidence.final_loss
    run.extra["twin_final_loss"] = _TWIN_FINAL[run.seed]


def _marker_task(n: int, rng: np.random.Generator, seq: int = 16, vocab: int = 32,
                 marker: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS]=1 then tokens from 4..vocab-1; label 1 iff the marker token appears."""
    x = rng.integers(4, vocab, (n, seq))
    x[:, 0] = 1
    y = rng.integers(0, 2, n)
    pos = rng.integers(1, seq, n)
    x[y == 1, pos[y == 1]] = marker
    return torch.from_numpy(x), torch.from_numpy(y)


def tiny_bert(vocab: int = 32, seq: int = 16) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    _quiet_transformers()
    cfg = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=seq, num_labels=2,
                     pad_token_id=0)
    return BertForSequenceClassification(cfg)


def train_bert(run: Run) -> None:
    from transformers import get_linear_schedule_with_warmup

    rng = np.random.default_rng(run.seed)
    x, y = _marker_task(4096, rng)
    xt, yt = _marker_task(512, rng)
    torch.manual_seed(run.seed)
    model = tiny_bert()
    steps = 400
    opt = torch.optim.AdamW(decay_groups(model, 0.01), lr=1e-3)
    sched = get_linear_schedule_with_warmup(opt, steps // 10, steps)
    watcher = run.watch(model, optimizer=opt)
    rec = run.record(model)
    gen = torch.Generator().manual_seed(run.seed)

    def batch_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (32,), generator=gen)
        return model(input_ids=x[idx], labels=y[idx]).loss

    model.train()
    loop(run, model, opt, steps, batch_loss, clip=1.0, sched=sched, rec=rec, watcher=watcher)
    model.eval()
    with torch.no_grad():
        run.extra["accuracy"] = _accuracy(model(input_ids=xt).logits, yt)


def train_vit(run: Run) -> None:
    from transformers import ViTConfig, ViTForImageClassification, get_cosine_schedule_with_warmup

    _quiet_transformers()
    rng = np.random.default_rng(run.seed)
    x, y, protos = prototype_images(4, (3, 16, 16), 4096, 1.5, rng)
    xt, yt, _ = prototype_images(4, (3, 16, 16), 512, 1.5, rng, protos)
    torch.manual_seed(run.seed)
    model = ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, num_labels=4))
    steps = 300
    opt = torch.optim.AdamW(decay_groups(model, 0.05), lr=1e-3)
    sched = get_cosine_schedule_with_warmup(opt, steps // 20, steps)
    watcher = run.watch(model, optimizer=opt)
    rec = run.record(model)
    gen = torch.Generator().manual_seed(run.seed)

    def batch_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (32,), generator=gen)
        return model(pixel_values=x[idx], labels=y[idx]).loss

    model.train()
    loop(run, model, opt, steps, batch_loss, clip=1.0, sched=sched, rec=rec, watcher=watcher)
    model.eval()
    with torch.no_grad():
        run.extra["accuracy"] = _accuracy(model(pixel_values=xt).logits, yt)


def train_resnet(run: Run) -> None:
    from transformers import ResNetConfig, ResNetForImageClassification

    _quiet_transformers()
    rng = np.random.default_rng(run.seed)
    x, y, protos = prototype_images(4, (3, 16, 16), 4096, 1.5, rng)
    xt, yt, _ = prototype_images(4, (3, 16, 16), 512, 1.5, rng, protos)
    torch.manual_seed(run.seed)
    model = ResNetForImageClassification(ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
        layer_type="basic", num_labels=4))
    steps = 300
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    watcher = run.watch(model, optimizer=opt)
    rec = run.record(model)
    gen = torch.Generator().manual_seed(run.seed)

    def batch_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (32,), generator=gen)
        return model(pixel_values=x[idx], labels=y[idx]).loss

    model.train()
    loop(run, model, opt, steps, batch_loss, sched=sched, rec=rec, watcher=watcher)
    model.eval()
    with torch.no_grad():
        run.extra["accuracy"] = _accuracy(model(pixel_values=xt).logits, yt)


def _batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    nbatch = data.size(0) // bsz
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous()


def _word_lm(run: Run, *, lr: float, clip: float | None, epochs: int) -> None:
    """pytorch/examples/word_language_model main.py, scaled down: emsize = nhid = 64, 2 layers,
    tied, dropout 0.2, bptt 35, batch 20, SGD at ``lr`` with gradient clipping at ``clip``,
    hidden state carried across batches (detached), lr / 4 when validation loss stops
    improving."""
    chain = MarkovChain.make(VOCAB, 4, seed=2000 + run.seed)
    rng = np.random.default_rng(run.seed)
    train = torch.from_numpy(chain.sample(1, 20 * 35 * 40 + 1, rng)[0])
    val = torch.from_numpy(chain.sample(1, 10 * 35 * 8 + 1, rng)[0])
    bsz, bptt = 20, 35
    train_data, val_data = _batchify(train, bsz), _batchify(val, 10)
    torch.manual_seed(run.seed)
    model = RNNModel(VOCAB, 64, 64, 2, dropout=0.2, tie_weights=True)
    criterion = nn.NLLLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    watcher = run.watch(model, optimizer=opt)
    rec = run.record(model, updates=True)

    def evaluate() -> float:
        model.eval()
        total, hidden = 0.0, model.init_hidden(10)
        with torch.no_grad():
            for i in range(0, val_data.size(0) - 1, bptt):
                n = min(bptt, len(val_data) - 1 - i)
                out, hidden = model(val_data[i:i + n], hidden)
                total += n * criterion(out, val_data[i + 1:i + 1 + n].reshape(-1)).item()
        return total / (len(val_data) - 1)

    step, best_val, vals = 0, None, []
    for _ in range(epochs):
        model.train()
        hidden = model.init_hidden(bsz)
        for i in range(0, train_data.size(0) - 1, bptt):
            n = min(bptt, len(train_data) - 1 - i)
            data, targets = train_data[i:i + n], train_data[i + 1:i + 1 + n].reshape(-1)
            step += 1
            rec.begin(step)
            hidden = tuple(h.detach() for h in hidden)  # repackage_hidden
            opt.zero_grad()
            output, hidden = model(data, hidden)
            loss = criterion(output, targets)
            loss.backward()
            rec.grads(step)
            watcher.observe_loss(loss)
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            rec.before_step(step)
            opt.step()
            rec.after_step(step)
            rec.loss(loss)
        v = evaluate()
        vals.append(v)
        if best_val is None or v < best_val:
            best_val = v
        else:
            for g in opt.param_groups:
                g["lr"] /= 4.0
    run.extra["val_loss_per_epoch"] = vals
    run.extra["entropy_rate"] = chain.entropy_rate
    run.extra["unigram_entropy"] = chain.unigram_entropy
    run.extra["good_loss"] = chain.entropy_rate + 0.5 * (chain.unigram_entropy
                                                         - chain.entropy_rate)


def train_word_lm(run: Run) -> None:
    _word_lm(run, lr=20.0, clip=0.25, epochs=6)


def train_word_lm_no_clip(run: Run) -> None:
    _word_lm(run, lr=50.0, clip=None, epochs=3)


def train_lbfgs(run: Run) -> None:
    rng = np.random.default_rng(run.seed)
    x = torch.tensor(rng.uniform(-2, 2, (256, 2)), dtype=torch.float32)
    y = (torch.sin(2 * x[:, :1]) * torch.cos(x[:, 1:]))
    torch.manual_seed(run.seed)
    model = mlp([2, 32, 32, 1], nn.Tanh)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=20, history_size=10,
                            line_search_fn="strong_wolfe")
    watcher = run.watch(model, optimizer=opt)
    rec = run.record(model, every=5)
    evals = []

    def make_closure(step: int) -> Callable[[], torch.Tensor]:
        first = [True]

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            if first[0]:  # the loss and gradient at the step's starting point
                first[0] = False
                rec.grads(step)
                watcher.observe_loss(loss)
            return loss

        return closure

    for step in range(1, 41):
        rec.begin(step)
        loss = opt.step(make_closure(step))
        evals.append(opt.state[opt.param_groups[0]["params"][0]]["func_evals"])
        rec.loss(loss)
    run.extra["closure_evaluations_total"] = evals[-1]
    run.extra["note"] = ("observe_loss is called on the first closure evaluation of each step "
                         "(the loss LBFGS.step returns)")


def train_accum_bf16(run: Run) -> None:
    rng = np.random.default_rng(run.seed)
    x, y, centers = gaussian_clusters(8, 32, 8192, rng, spread=1.5)
    xt, yt, _ = gaussian_clusters(8, 32, 1024, rng, spread=1.5, centers=centers)
    torch.manual_seed(run.seed)
    model = nn.Sequential(nn.Linear(32, 128), nn.LayerNorm(128), nn.ReLU(), nn.Linear(128, 128),
                          nn.ReLU(), nn.Linear(128, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    steps, micro, accum = 200, 32, 4
    watcher = run.watch(model, optimizer=opt)
    rec = run.record(model)
    gen = torch.Generator().manual_seed(run.seed)
    for step in range(1, steps + 1):
        rec.begin(step)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accum):
            idx = torch.randint(0, len(x), (micro,), generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x[idx]), y[idx])
            (loss / accum).backward()
            watcher.observe_loss(loss)
            total += loss.detach().double().item() / accum
        rec.grads(step)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        rec.loss(total)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        run.extra["accuracy"] = _accuracy(model(xt).float(), yt)
    run.extra["autocast_loss_dtype"] = str(loss.dtype)


def train_float64(run: Run) -> None:
    rng = np.random.default_rng(run.seed)
    x, y, centers = gaussian_clusters(4, 16, 4096, rng, spread=1.5)
    xt, yt, _ = gaussian_clusters(4, 16, 512, rng, spread=1.5, centers=centers)
    x, xt = x.double(), xt.double()
    torch.manual_seed(run.seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 4)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    watcher = run.watch(model, optimizer=opt)
    rec = run.record(model)
    gen = torch.Generator().manual_seed(run.seed)

    def batch_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (64,), generator=gen)
        return F.cross_entropy(model(x[idx]), y[idx])

    loop(run, model, opt, 300, batch_loss, rec=rec, watcher=watcher)
    with torch.no_grad():
        run.extra["accuracy"] = _accuracy(model(xt), yt)
    run.extra["param_dtype"] = str(next(model.parameters()).dtype)


def train_lightning(run: Run) -> None:
    import lightning.pytorch as pl

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rng = np.random.default_rng(run.seed)
    x, y, centers = gaussian_clusters(4, 16, 4096, rng, spread=1.5)
    xt, yt, _ = gaussian_clusters(4, 16, 512, rng, spread=1.5, centers=centers)
    steps = 200

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp([16, 64, 64, 4], nn.ReLU)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            xb, yb = batch
            return F.cross_entropy(self(xb), yb)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Watch(pl.Callback):
        """Attaches the plain watcher to the module and Lightning's (unwrapped) optimizer."""

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.watcher = run.watch(pl_module, optimizer=trainer.optimizers[0])
            self.rec = run.record(pl_module)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                                 batch_idx: int) -> None:
            self.rec.begin(trainer.global_step + 1)

        def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
            self.watcher.observe_loss(loss)

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            # Lightning: after backward, before gradient clipping and the update.
            self.rec.grads(trainer.global_step + 1)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            self.rec.loss(outputs["loss"])

    torch.manual_seed(run.seed)
    module = Classifier()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64,
                                         shuffle=True,
                                         generator=torch.Generator().manual_seed(run.seed))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=1.0,
                         num_sanity_val_steps=0, callbacks=[Watch()])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, loader)
    module.eval()
    with torch.no_grad():
        run.extra["accuracy"] = _accuracy(module(xt), yt)
    run.extra["note"] = ("Lightning's automatic optimization runs forward and backward inside "
                         "optimizer.step(closure)")


def train_hf_trainer(run: Run) -> None:
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    _quiet_transformers()
    rng = np.random.default_rng(run.seed)
    x, y = _marker_task(4096, rng)
    xt, yt = _marker_task(512, rng)
    data = [{"input_ids": a, "labels": b} for a, b in zip(x, y)]
    torch.manual_seed(run.seed)
    model = tiny_bert()
    state: dict[str, Any] = {}

    class Watch(TrainerCallback):
        """The plain watcher, attached at on_train_begin to the model and Trainer's optimizer."""

        def on_train_begin(self, args: Any, st: Any, control: Any, model: Any = None,
                           optimizer: Any = None, **kw: Any) -> None:
            run.extra["optimizer_type"] = type(optimizer).__module__ + "." + \
                type(optimizer).__qualname__
            state["watcher"] = run.watch(model, optimizer=optimizer)
            state["rec"] = run.record(model)

    class WatchedTrainer(Trainer):
        """Feeds observe_loss and the raw recorder; training itself is Trainer's."""

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            loss = out[0] if return_outputs else out
            if "watcher" in state and model.training:
                state["watcher"].observe_loss(loss)
            return out

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            step = self.state.global_step + 1
            state["rec"].begin(step)
            loss = super().training_step(model, inputs, num_items_in_batch)
            state["rec"].grads(step)  # after backward, before Trainer clips (accumulation 1)
            state["rec"].loss(loss)
            return loss

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no",
            logging_strategy="no", disable_tqdm=True, max_steps=300,
            per_device_train_batch_size=32, learning_rate=1e-3, weight_decay=0.01,
            warmup_steps=30, lr_scheduler_type="linear", seed=run.seed,
            dataloader_num_workers=0)
        trainer = WatchedTrainer(model=model, args=args, train_dataset=data,
                                 callbacks=[Watch()])
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training metrics
        trainer.train()
    model.eval()
    with torch.no_grad():
        run.extra["accuracy"] = _accuracy(model(input_ids=xt).logits, yt)


# --------------------------------------------------------------------------------------------
# Training functions: broken
# --------------------------------------------------------------------------------------------


def train_deep_sigmoid(run: Run) -> None:
    rng = np.random.default_rng(run.seed)
    x, y, _ = gaussian_clusters(2, 16, 4096, rng)
    torch.manual_seed(run.seed)
    model = mlp([16] + [32] * 10 + [2], nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watcher = run.watch(model, optimizer=opt)
    rec = run.record(model)
    gen = torch.Generator().manual_seed(run.seed)

    def batch_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (64,), generator=gen)
        return F.cross_entropy(model(x[idx]), y[idx])

    loop(run, model, opt, 200, batch_loss, rec=rec, watcher=watcher)


def train_huge_lr(run: Run) -> None:
    rng = np.random.default_rng(run.seed)
    x, y, _ = prototype_images(10, (1, 28, 28), 4096, 1.0, rng)
    torch.manual_seed(run.seed)
    model = LeNet(nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=20.0)
    watcher = run.watch(model, optimizer=opt)
    rec = run.record(model)
    gen = torch.Generator().manual_seed(run.seed)

    def batch_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (64,), generator=gen)
        return F.cross_entropy(model(x[idx]), y[idx])

    loop(run, model, opt, 100, batch_loss, rec=rec, watcher=watcher)


def train_tiny_lr(run: Run) -> None:
    chain = MarkovChain.make(VOCAB, 4, seed=1000 + run.seed)
    rng = np.random.default_rng(run.seed)
    pool = torch.from_numpy(chain.sample(2048, SEQ, rng))
    torch.manual_seed(run.seed)
    model = gpt2(VOCAB, SEQ)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-7)
    watcher = run.watch(model, optimizer=opt)
    rec = run.record(model, updates=True)
    gen = torch.Generator().manual_seed(run.seed)

    def batch_loss(step: int) -> torch.Tensor:
        x = pool[torch.randint(0, len(pool), (16,), generator=gen)]
        return model(input_ids=x, labels=x, use_cache=False).loss

    loop(run, model, opt, 120, batch_loss, rec=rec, watcher=watcher)


def train_dead_relu(run: Run) -> None:
    rng = np.random.default_rng(run.seed)
    x, y, _ = gaussian_clusters(4, 20, 4096, rng)
    x = (x - x.mean(0)) / x.std(0)
    torch.manual_seed(run.seed)
    model = mlp([20, 64, 64, 64, 4], nn.ReLU)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear) and m.out_features != 4:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.bias.fill_(-6.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    watcher = run.watch(model, optimizer=opt)
    rec = run.record(model, relu=True)
    gen = torch.Generator().manual_seed(run.seed)

    def batch_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (64,), generator=gen)
        return F.cross_entropy(model(x[idx]), y[idx])

    loop(run, model, opt, 200, batch_loss, rec=rec, watcher=watcher)


def train_sigmoid_lenet_l2(run: Run) -> None:
    rng = np.random.default_rng(run.seed)
    x, y, _ = prototype_images(10, (1, 28, 28), 4096, 1.0, rng)
    torch.manual_seed(run.seed)
    # Six more sigmoid layers in the head: the data gradient reaching conv1 is then ~1e-6 of
    # the classifier's, while the penalty's pull 2*lam*W (~2e-4 on conv1) stays above the
    # absolute vanishing threshold. (The plain LeNet at lr 0.1 is merely slow: its data
    # gradient, 1.3e-4, is above the threshold.)
    model = LeNet(nn.Sigmoid, extra=6)
    lam = 1e-4
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = run.watch(model, optimizer=opt)
    rec = run.record(model, penalty=lam)
    gen = torch.Generator().manual_seed(run.seed)
    weights = [p for p in model.parameters() if p.dim() > 1]

    def batch_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (64,), generator=gen)
        return F.cross_entropy(model(x[idx]), y[idx]) + lam * sum((w * w).sum() for w in weights)

    loop(run, model, opt, 300, batch_loss, rec=rec, watcher=watcher)
    run.extra["l2_penalty"] = lam


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

TF = ("transformers",)
BLOWUP = ("exploding_gradient", "nonfinite", "loss_divergence")

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("gpt2", "GPT-2 LM (2 layers, 64 wide), Markov corpus, AdamW 3e-3 wd 0.01, cosine "
             "with 5% warm-up to 0, clip 1.0, to the end of the schedule", train_gpt2,
             truth_healthy(0.5, "good_loss"), requires=TF),
    Scenario("bert", "BERT sequence classification (2 layers, 64 wide), marker-token task, "
             "AdamW 1e-3 + linear warm-up/decay to 0, to convergence", train_bert,
             truth_healthy(0.05, 0.05, min_accuracy=0.98), requires=TF),
    Scenario("vit", "ViT image classification (16px, patch 4, 2 layers), class prototypes, "
             "AdamW + cosine", train_vit, truth_healthy(0.2, min_accuracy=0.95), requires=TF),
    Scenario("resnet", "ResNet (tiny ResNetConfig, BatchNorm), class prototypes, SGD momentum "
             "0.9 + cosine", train_resnet, truth_healthy(0.2, min_accuracy=0.95), requires=TF),
    Scenario("word_lm", "pytorch/examples word_language_model: tied 2-layer LSTM, SGD lr 20, "
             "clip 0.25, dropout 0.2, bptt 35, Markov corpus", train_word_lm,
             truth_healthy(0.6, "good_loss")),
    Scenario("lbfgs", "LBFGS (strong Wolfe) with a closure, tanh MLP regression", train_lbfgs,
             truth_healthy(0.1)),
    Scenario("accum_bf16", "4 micro-batches per step + bf16 autocast on CPU, MLP classifier",
             train_accum_bf16, truth_healthy(0.3, min_accuracy=0.9)),
    Scenario("gpt2_checkpointing", "GPT-2 with gradient_checkpointing_enable()",
             train_gpt2_checkpointing, truth_healthy(0.5, "good_loss"), requires=TF,
             test_seeds=(0,)),
    Scenario("float64", "float64 tanh MLP (.double()), Adam", train_float64,
             truth_healthy(0.3, min_accuracy=0.9)),
    Scenario("lightning", "lightning.pytorch Trainer, automatic optimization, clip 1.0",
             train_lightning, truth_healthy(0.3, min_accuracy=0.9), requires=("lightning",),
             test_seeds=(0,)),
    Scenario("hf_trainer", "transformers Trainer (BERT), watcher attached at on_train_begin",
             train_hf_trainer, truth_healthy(0.05, 0.05, min_accuracy=0.98),
             requires=TF + ("accelerate",), test_seeds=(0,)),
    # broken
    Scenario("gpt2_high_lr", "GPT-2, AdamW lr 0.2 (constant), no warm-up, no clipping",
             train_gpt2_high_lr, truth_blowup(), expected=("loss_divergence", "loss_plateau"),
             requires=TF, test_seeds=(0,)),
    Scenario("deep_sigmoid", "10-layer sigmoid MLP, SGD momentum", train_deep_sigmoid,
             truth_vanishing(), expected=("vanishing_gradient",), within=50),
    Scenario("huge_lr", "ReLU LeNet-5, plain SGD lr 20", train_huge_lr, truth_explodes(),
             expected=BLOWUP),
    Scenario("tiny_lr", "GPT-2, Adam lr 1e-7", train_tiny_lr, truth_stalled(),
             expected=("stalled_update",), forbidden=("vanishing_gradient",), requires=TF),
    Scenario("word_lm_no_clip", "word_language_model LSTM without clipping, SGD lr 50",
             train_word_lm_no_clip, truth_explodes(), expected=BLOWUP),
    Scenario("dead_relu", "ReLU MLP with biases initialised to -6", train_dead_relu,
             truth_dead(), expected=("dead_units",)),
    Scenario("sigmoid_lenet_l2", "sigmoid LeNet-5 with 6 more sigmoid layers in its head, SGD "
             "0.1, + 1e-4 * sum of squared weights",
             train_sigmoid_lenet_l2, truth_vanishing(data_grads=True),
             expected=("vanishing_gradient",)),
)

_BY_NAME = {s.name: s for s in SCENARIOS}


def get(name: str) -> Scenario:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no scenario {name!r}; known: {', '.join(_BY_NAME)}") from None


# --------------------------------------------------------------------------------------------
# Running one
# --------------------------------------------------------------------------------------------


class _ErrorLog(logging.Handler):
    """Keeps gradwatch's ERROR records (internal failures, logged with their traceback)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += " | " + " ".join(traceback.format_exception(*record.exc_info)[-2:]).strip()
        self.records.append(text)


def run_scenario(scenario: Scenario | str, seed: int = 0) -> ScenarioResult:
    """Train one scenario at one seed and judge it. Never raises for a training failure: the
    traceback becomes ``crash``."""
    sc = get(scenario) if isinstance(scenario, str) else scenario
    base = dict(name=sc.name, seed=seed, label=sc.label, expected=sc.expected,
                forbidden=sc.forbidden, within=sc.within)
    missing = sc.missing()
    if missing:
        return ScenarioResult(**base, findings=[], evidence=RawEvidence(), truth_ok=False,
                              truth_reason="not run", skipped=f"needs {', '.join(missing)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    run = Run(seed)
    crash = None
    errors = _ErrorLog()
    glog = logging.getLogger("gradwatch")
    glog.addHandler(errors)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                sc.train(run)
            except Exception:
                crash = traceback.format_exc()
            finally:
                try:
                    findings = run.close()
                except Exception:
                    findings = []
                    crash = (crash or "") + traceback.format_exc()
    finally:
        glog.removeHandler(errors)
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    internal = [str(w.message) for w in caught
                if issubclass(w.category, gradwatch.GradWatchInternalWarning)]
    if internal and errors.records:
        internal = [f"{m} [log: {errors.records[min(i, len(errors.records) - 1)][-600:]}]"
                    for i, m in enumerate(internal)]
    ev = run.evidence
    if crash is not None and not ev.losses:
        truth_ok, reason = False, "crashed before any step"
    else:
        try:
            truth_ok, reason = sc.truth(ev)
        except Exception as exc:  # evidence incomplete (a crash mid-run)
            truth_ok, reason = False, f"truth check failed: {exc!r}"
    return ScenarioResult(**base, findings=findings, evidence=ev, truth_ok=truth_ok,
                          truth_reason=reason, crash=crash, internal_warnings=internal,
                          seconds=seconds)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    xs = list(xs)
    if not xs:
        return math.nan
    return float(sum(xs) / len(xs))


# Strict JSON (NaN/Infinity as strings), as gradwatch's own event file writes it.
_json = json_number
_jsonable = to_json_ready


def _last_line(tb: str) -> str:
    lines = [ln for ln in tb.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""

