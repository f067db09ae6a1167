"""Framework-free helpers shared by the core tests: a scripted detector, a context, statistics."""

from __future__ import annotations

import importlib
import os

import pytest

import gradwatch

#: The frameworks the README's test command installs. A run where one of them cannot be imported
#: is refused, not passed: every test of that framework would be skipped and pytest would exit 0.
#: To test without one on purpose, name it: ``GRADWATCH_TESTS_WITHOUT=keras python -m pytest``.
REQUIRED_FRAMEWORKS = ("torch", "keras", "jax", "optax")


def _one_framework_thread() -> None:
    """Under ``-n N`` each worker gets one framework thread: N workers with a thread pool
    each oversubscribe the cores, and torch's spinning OpenMP threads then slow a small model's
    loop 10-20x (measured here: a 2.5 s test took 52 s in the full ``-n 2`` run). Subprocesses
    the tests start inherit the environment."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    try:
        import torch
    except Exception:  # a missing torch is the controller's to report
        return
    torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has checked
        _one_framework_thread()
        return
    allowed = {n.strip() for n in os.environ.get("GRADWATCH_TESTS_WITHOUT", "").split(",")}
    missing: dict[str, str] = {}
    for name in REQUIRED_FRAMEWORKS:
        if name in allowed:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or a broken install failing as it loads
            missing[name] = f"{name} ({type(exc).__name__}: {exc})"
    if missing:
        raise pytest.UsageError(
            f"cannot import {', '.join(missing.values())}: its tests would all be skipped. "
            f"Install what the README's test command installs (pip install torch==2.13.0 -e "
            f"\".[dev,keras,jax]\"), or run without it on purpose: "
            f"GRADWATCH_TESTS_WITHOUT={','.join(missing)} python -m pytest")

#: Layer names of the toy model every core test watches, input side first.
LAYERS = ("0", "1", "2")


class ScriptedDetector(gradwatch.Detector):
    """Returns, at each check, the next entry of its script (a list of findings, or None)."""

    kinds = ("vanishing_gradient", "exploding_gradient", "loss_divergence")

    def __init__(self, script) -> None:
        super().__init__()
        self.script = list(script)

    def update(self, stats):
        return self.script.pop(0) if self.script else []


@pytest.fixture
def context() -> gradwatch.RunContext:
    return gradwatch.RunContext(
        model=gradwatch.ModelInfo(framework="test", activations=frozenset({"sigmoid"}), depth=3,
                                  learning_rates=(0.1,)),
        layers=tuple(gradwatch.LayerInfo(name=n, type="Linear", num_params=10) for n in LAYERS),
    )


@pytest.fixture
def scripted():
    """``scripted([f1], None, [])``: a detector answering each check with the next entry."""
    return lambda *checks: ScriptedDetector(checks)


@pytest.fixture
def finding():
    def make(step, kind="vanishing_gradient", layer="0", **kw):
        kw.setdefault("value", 1e-7)
        kw.setdefault("threshold", 1e-4)
        kw.setdefault("message", f"step {step}: {kind} in layer {layer!r}")
        return gradwatch.Finding(kind=kind, step=step, layer=layer, **kw)

    return make


@pytest.fixture
def stats():
    """``stats(step)``: real single-step statistics for the toy model (healthy by default)."""

    def make(step, grad_norm=(1.0, 1.0, 1.0), **kw):
        kw.setdefault("loss", 1.0)
        return gradwatch.make_step_stats(step, LAYERS, grad_norm, **kw)

    return make
