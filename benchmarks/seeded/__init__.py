"""A seeded-bug benchmark for gradwatch, in PyTorch and Keras.

Model families after the ones AUTOTRAINER (Zhang et al., ICSE 2021) and DeepDiagnosis (Wardat et
al., ICSE 2022) evaluate on: nets with a known training bug planted in them (stacked exponential
activations, deep sigmoid stacks, tiny initial weights, dying ReLUs) and nets the published tools
label healthy (they learn), each without and with L2 regularisation, over a few seeds.

Every run's label is checked against raw evidence gathered by this benchmark itself, not by
gradwatch (per-layer gradient norms, dead-unit fractions and the loss, read directly from the
framework), and a run the evidence contradicts is reported as mislabelled instead of being scored.

* :mod:`benchmarks.seeded.families`: framework-neutral specs, data sets, initial weights, batch
  order, the truth check and the scoring;
* :mod:`benchmarks.seeded.torch_models`, :mod:`benchmarks.seeded.keras_models`: build a spec's
  model, train it (watched by gradwatch or not) and gather the evidence;
* :mod:`benchmarks.seeded.run`: the command line,
  ``python -m benchmarks.seeded.run --framework torch|keras|all --seeds 0 1 2``.
"""
