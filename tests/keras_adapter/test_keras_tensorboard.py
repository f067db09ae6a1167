"""GradWatchCallback(tensorboard=...): event files TensorBoard reads back, on the TensorFlow
backend (tf.summary) and the torch backend (torch's SummaryWriter)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorboard")
from conftest import BACKEND, deep_sigmoid, fit, one_torch_thread  # noqa: E402
from references import FakeWriter, StatsLog  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)
from tensorboard.util import tensor_util  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch import GradWatchInternalWarning  # noqa: E402
from gradwatch.keras import GradWatchCallback  # noqa: E402

CHECK_EVERY = 4
EPOCHS = 3  # 16 steps an epoch
#: Where each writer puts a text summary (torch's SummaryWriter appends "/text_summary"; the
#: TensorFlow and JAX backends write through tf.summary).
FINDINGS_TAG = "gradwatch/findings/text_summary" if BACKEND == "torch" else \
    "gradwatch/findings"


def events(logdir) -> EventAccumulator:
    assert list(Path(logdir).rglob("events.out.tfevents.*")), f"no event file under {logdir}"
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def series(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar: a simple value (SummaryWriter) or a TF2 tensor summary."""
    tags = acc.Tags()
    if tag in tags["scalars"]:
        return [(e.step, e.value) for e in acc.Scalars(tag)]
    if tag in tags["tensors"]:
        return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
                for e in acc.Tensors(tag)]
    raise AssertionError(f"{tag} not written; tags: {tags}")


def texts(acc: EventAccumulator) -> list[tuple[int, str]]:
    out = []
    for e in acc.Tensors(FINDINGS_TAG):
        value = tensor_util.make_ndarray(e.tensor_proto)
        out.append((e.step, (value.item() if value.shape == () else value.ravel()[0]).decode()))
    return out


def fitted(**options):
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    log = StatsLog()
    cb = GradWatchCallback(check_every=CHECK_EVERY, plugins=[log], **options)
    with one_torch_thread():
        fit(deep_sigmoid(), scale=100.0, epochs=EPOCHS, callback=cb)
    return cb, log


def test_deep_sigmoid_fit_writes_check_step_scalars_and_findings(tmp_path):
    cb, log = fitted(tensorboard=tmp_path / "run")
    acc = events(tmp_path / "run")
    checks = list(range(CHECK_EVERY, EPOCHS * 16 + 1, CHECK_EVERY))
    assert [s.step for s in log.stats] == checks
    report = cb.report()
    for i, row in enumerate(report.layers):
        got = series(acc, f"gradwatch/grad_norm/{row.name}")
        assert [step for step, _ in got] == checks  # check steps only
        np.testing.assert_allclose([v for _, v in got],
                                   [float(s.grad_norm[-1][i]) for s in log.stats], rtol=1e-6)
        assert got[-1][1] == pytest.approx(row.grad_norm, rel=1e-6)
        change = series(acc, f"gradwatch/weight_change/{row.name}")
        assert change[-1][1] == pytest.approx(row.weight_change, rel=1e-5)
        assert series(acc, f"gradwatch/update_ratio/{row.name}")
    loss = series(acc, "gradwatch/loss")
    assert [step for step, _ in loss] == checks
    np.testing.assert_allclose([v for _, v in loss], [float(s.loss[-1]) for s in log.stats],
                               rtol=1e-6)
    vanishing = [f for f in cb.findings if f.kind == "vanishing_gradient"]
    assert vanishing, report
    written = texts(acc)
    assert len(written) == len(cb.findings)
    for finding in vanishing:
        assert any(step == finding.step and "vanishing_gradient" in text
                   and f"`{finding.layer}`" in text for step, text in written), written


def test_user_writer_is_used_flushed_and_not_closed_across_fits():
    writer = FakeWriter()
    cb, _ = fitted(tensorboard=writer)
    steps = sorted({s for tag, _, s in writer.scalars if tag == "gradwatch/grad_norm/d0"})
    assert steps == list(range(CHECK_EVERY, EPOCHS * 16 + 1, CHECK_EVERY))
    assert [t for t, _, _ in writer.texts] == ["gradwatch/findings"] * len(cb.findings)
    assert (writer.flushes, writer.closes) == (1, 0)
    with one_torch_thread():
        fit(deep_sigmoid(), scale=100.0, epochs=1, callback=cb)  # the callback, reused
    assert (writer.flushes, writer.closes) == (2, 0)
    assert writer.scalars[-1][2] == 16


def test_a_reused_callback_writes_each_fit_to_a_new_event_file(tmp_path):
    cb, _ = fitted(tensorboard=tmp_path)
    with one_torch_thread():
        fit(deep_sigmoid(), scale=100.0, epochs=1, callback=cb)
    files = sorted(tmp_path.rglob("events.out.tfevents.*"))
    assert len(files) == 2  # the first closed at the end of its fit, the second opened after
    assert series(events(tmp_path), "gradwatch/grad_norm/d0")[-1][0] == 16


class BrokenWriter(FakeWriter):
    def add_scalar(self, tag, value, global_step):
        super().add_scalar(tag, value, global_step)
        raise OSError("disk full")

    def add_text(self, tag, text, global_step):
        raise OSError("disk full")


def test_failing_writer_is_reported_once_and_fit_continues():
    writer = BrokenWriter()
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    cb = GradWatchCallback(check_every=CHECK_EVERY, tensorboard=writer)
    x = np.random.default_rng(0).normal(size=(128, 2)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradientHealthWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # Keras' own, numpy 2's copy=
        with pytest.warns(GradWatchInternalWarning, match="disk full") as record, \
                one_torch_thread():
            history = deep_sigmoid().fit(x, y, batch_size=32, epochs=3, verbose=0,
                                         callbacks=[cb])
    assert len([w for w in record if issubclass(w.category, GradWatchInternalWarning)]) == 1
    assert len(writer.scalars) == 1
    assert len(history.history["loss"]) == 3
    assert cb.report().steps == 12


@pytest.mark.parametrize("value", [pytest.param(True, id="bool"), pytest.param(3, id="int"),
                                   pytest.param(object(), id="object")])
def test_bad_tensorboard_value_is_a_type_error(value):
    with pytest.raises(TypeError, match="tensorboard"):
        GradWatchCallback(tensorboard=value)


def test_a_callback_never_fitted_leaves_no_event_file(tmp_path):
    GradWatchCallback(tensorboard=tmp_path / "logs")
    assert not (tmp_path / "logs").exists()


def test_missing_tensorboard_is_an_import_error_at_construction(tmp_path, monkeypatch):
    if BACKEND == "torch":
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    else:  # tf.summary's writing ops come from the tensorboard package
        import tensorflow as tf

        monkeypatch.setattr(tf.summary, "scalar", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        GradWatchCallback(tensorboard=tmp_path)
