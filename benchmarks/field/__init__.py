"""The field suite: gradwatch on real architectures and their usual training recipes.

Each scenario trains a small but real model (GPT-2, BERT, ViT, ResNet from ``transformers``
configs; the PyTorch word-language-model LSTM; LBFGS; gradient accumulation under bf16 autocast;
gradient checkpointing; float64; the Lightning and ``transformers`` Trainers) on data made in
code, healthy or deliberately broken, watched by the plain ``gradwatch.torch`` watcher. Next to
gradwatch's findings it gathers raw evidence WITHOUT gradwatch (the loss at every step, per-layer
gradient L2 norms read from ``p.grad``, update ratios and dead-unit fractions where they prove the
label) and checks the scenario's label against that evidence (``truth_ok``).

``python -m benchmarks.field.run`` runs it; ``tests/field`` asserts it. See
:mod:`benchmarks.field.scenarios` for the scenarios and the judging rules.
"""

from .scenarios import (
    SCENARIOS,
    FindingRecord,
    RawEvidence,
    Scenario,
    ScenarioResult,
    get,
    run_scenario,
)

__all__ = ["SCENARIOS", "FindingRecord", "RawEvidence", "Scenario", "ScenarioResult", "get",
           "run_scenario"]
