"""GradWatchCallback puts its per-epoch numbers into Keras' ``logs`` under ``gradwatch/``, for
the callbacks after it: CSVLogger, History, EarlyStopping(monitor=...)."""

from __future__ import annotations

import csv
import math

import pytest

keras = pytest.importorskip("keras")
from conftest import compiled, deep_sigmoid, fit, mlp, one_torch_thread  # noqa: E402
from references import StatsLog  # noqa: E402

from gradwatch.keras import GradWatchCallback  # noqa: E402

KEYS = ("gradwatch/findings", "gradwatch/warnings", "gradwatch/grad_norm_min",
        "gradwatch/grad_norm_max")


def test_csv_logger_and_history_after_the_callback_get_the_numbers(tmp_path):
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    log = StatsLog()
    cb = GradWatchCallback(check_every=4, plugins=[log])
    path = tmp_path / "log.csv"
    with one_torch_thread():
        run = fit(deep_sigmoid(), scale=100.0, epochs=3, callback=cb,
                  callbacks=(keras.callbacks.CSVLogger(str(path)),))
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 3
    warned = [f for f in cb.findings if f.is_warning]
    assert warned and "vanishing_gradient" in {f.kind for f in warned}
    # 16 steps an epoch, a check every 4: the epoch's last check is its last step.
    by_step = {s.step: s for s in log.stats}
    for epoch, row in enumerate(rows):
        last = by_step[16 * (epoch + 1)]
        norms = last.grad_norm[-1][last.has_grad[-1]]
        assert float(row["gradwatch/grad_norm_min"]) == pytest.approx(norms.min(), rel=1e-6)
        assert float(row["gradwatch/grad_norm_max"]) == pytest.approx(norms.max(), rel=1e-6)
        upto = [f for f in cb.findings if f.step <= 16 * (epoch + 1)]
        assert float(row["gradwatch/findings"]) == len(upto)
        assert float(row["gradwatch/warnings"]) == sum(f.is_warning for f in upto)
    assert float(rows[-1]["gradwatch/warnings"]) == len(warned)
    for key in KEYS:  # History (always last) has them too
        assert len(run.history.history[key]) == 3


def test_early_stopping_can_monitor_the_warning_count():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    cb = GradWatchCallback(check_every=4)
    # Stop as soon as the warning count stops being 0 ("min" mode: a rise is no improvement).
    stop = keras.callbacks.EarlyStopping(monitor="gradwatch/warnings", mode="min", patience=0,
                                         min_delta=0.5)
    with one_torch_thread():
        run = fit(deep_sigmoid(), scale=100.0, epochs=20, callback=cb, callbacks=(stop,))
    epochs = len(run.history.history["loss"])
    assert epochs < 20 and stop.stopped_epoch > 0
    assert run.history.history["gradwatch/warnings"][-1] >= 1


def test_a_healthy_fit_logs_no_warning_and_finite_norms():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    cb = GradWatchCallback(check_every=4)
    with one_torch_thread():
        run = fit(compiled(mlp(3), lr=0.05), epochs=3, callback=cb)
    h = run.history.history
    assert h["gradwatch/warnings"] == [0.0, 0.0, 0.0] and not run.caught
    assert all(0 < lo <= hi and math.isfinite(hi)
               for lo, hi in zip(h["gradwatch/grad_norm_min"], h["gradwatch/grad_norm_max"]))


def test_a_bad_plugins_value_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="plugins"):
        GradWatchCallback(plugins=StatsLog())
