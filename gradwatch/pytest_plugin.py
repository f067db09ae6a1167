"""gradwatch's pytest plugin: a test that trains a model fails when its gradients are unhealthy.

Registered through the ``pytest11`` entry point, so installing gradwatch is enough; it is inert
unless a test asks for the ``gradient_health`` fixture::

    def test_model_learns(gradient_health):
        w = gradient_health.watch(model, optimizer=opt)     # same arguments as gradwatch.watch
        ...train a few dozen steps...

    @pytest.mark.gradwatch(allow=["loss_plateau"])          # kinds this test permits
    def test_short_run(gradient_health): ...

After the test body has passed, every watcher the fixture made is read; a warning-severity
finding of a kind not allowed fails the test, with the findings, their advice and the flagged
layers as the failure message. Info findings (facts, not problems) never fail a test. At teardown
each watcher the test did not remove is removed. Nothing is global: it works the same under
pytest-xdist.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import pytest

MARKER = "gradwatch"
FIXTURE = "gradient_health"
#: Flagged layers shown in a failure message at most (the rest are counted).
MAX_LAYERS = 12


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(allow=[...]): finding kinds (e.g. 'loss_plateau') the {FIXTURE} fixture "
        "lets this test have without failing it")


class GradientHealth:
    """What the ``gradient_health`` fixture gives a test: ``watch`` and, afterwards, the verdict.

    Args:
        allow: Finding kinds that do not fail the test.
    """

    def __init__(self, allow: Iterable[str] = ()) -> None:
        #: Finding kinds this test permits.
        self.allow = frozenset(allow)
        #: Every watcher (or Keras callback) made by :meth:`watch`, in order.
        self.watchers: list[Any] = []

    def watch(self, model: Any, **options: Any) -> Any:
        """:func:`gradwatch.watch`: a torch watcher with its hooks attached, or a Keras callback
        to pass to ``fit()``; kept so that the test is judged on it."""
        import gradwatch

        watcher = gradwatch.watch(model, **options)
        self.watchers.append(watcher)
        return watcher

    def reports(self) -> list[Any]:
        """Each watcher's report so far."""
        return [w.report() for w in self.watchers]

    def problems(self) -> list[tuple[Any, list[Any]]]:
        """Per watcher with one: its report and the warning findings not allowed."""
        out = []
        for report in self.reports():
            bad = [f for f in report.warnings if f.kind not in self.allow]
            if bad:
                out.append((report, bad))
        return out

    def close(self) -> None:
        """Remove every watcher the test left attached (a Keras callback detaches by itself)."""
        for w in self.watchers:
            remove = getattr(w, "remove", None)
            if remove is not None and not getattr(w, "removed", False):
                remove()


def failure_message(problems: list[tuple[Any, list[Any]]], allow: frozenset[str]) -> str:
    """The failure text: short enough for a CI log (findings, advice, flagged layers only)."""
    count = sum(len(bad) for _, bad in problems)
    lines = [f"gradwatch: {count} unhealthy-gradient finding{'s' * (count != 1)} in this test"
             + (f" (allowed: {', '.join(sorted(allow))})" if allow else "")]
    for report, _ in problems:
        flagged = [row for row in report.layers if row.flags]
        shown = dataclasses.replace(report, layers=tuple(flagged[:MAX_LAYERS]))
        lines += ["", str(shown)]
        if len(flagged) > MAX_LAYERS:
            lines.append(f"(and {len(flagged) - MAX_LAYERS} more flagged layers; only flagged "
                         "layers are shown)")
    lines += ["", f"Permit a kind with @pytest.mark.{MARKER}(allow=[...])."]
    return "\n".join(lines)


def _allowed(node: pytest.Item) -> frozenset[str]:
    marker = node.get_closest_marker(MARKER)
    if marker is None:
        return frozenset()
    if marker.args:
        raise pytest.UsageError(f"{node.nodeid}: @pytest.mark.{MARKER} takes allow=[...] as a "
                                f"keyword, got positional {marker.args!r}")
    unknown_args = set(marker.kwargs) - {"allow"}
    if unknown_args:
        raise pytest.UsageError(f"{node.nodeid}: @pytest.mark.{MARKER} got unexpected "
                                f"argument(s) {', '.join(sorted(unknown_args))}; it takes allow")
    allow = marker.kwargs.get("allow", ())
    if isinstance(allow, str) or not isinstance(allow, Iterable):
        raise pytest.UsageError(f"{node.nodeid}: @pytest.mark.{MARKER}(allow=...) must be a list "
                                f"of finding kinds, got {allow!r}")
    unknown = sorted(set(allow) - set(known_kinds()))
    if unknown:
        raise pytest.UsageError(f"{node.nodeid}: @pytest.mark.{MARKER}(allow=...) names unknown "
                                f"finding kind(s) {', '.join(map(repr, unknown))}; kinds: "
                                f"{', '.join(known_kinds())}")
    return frozenset(allow)


def known_kinds() -> list[str]:
    """The built-in finding kinds, then those of installed plugins' default detectors."""
    from gradwatch import KINDS, get_plugin_manager

    kinds = list(KINDS)
    for detectors in get_plugin_manager().hook.gradwatch_default_detectors():
        for det in detectors:
            kinds += [k for k in det.kinds if k not in kinds]
    return kinds


@pytest.fixture
def gradient_health(request: pytest.FixtureRequest):
    """Watch models with ``gradient_health.watch(model, **options)``; the test fails when one of
    them had a warning-severity finding not permitted by ``@pytest.mark.gradwatch(allow=...)``."""
    health = GradientHealth(_allowed(request.node))
    yield health
    health.close()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if (item.get_closest_marker(MARKER) is not None
            and FIXTURE not in getattr(item, "fixturenames", ())):
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{MARKER} has no effect without the "
                                f"{FIXTURE} fixture; add it to the test's arguments")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    result = yield  # a test that failed by itself propagates from here, judged no further
    health = getattr(item, "funcargs", {}).get(FIXTURE)
    if isinstance(health, GradientHealth):
        problems = health.problems()
        if problems:
            pytest.fail(failure_message(problems, health.allow), pytrace=False)
    return result
