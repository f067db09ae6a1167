"""The plugin manager: built-in plugins, entry-point discovery (and its off switch), plugins that
fail to load, third-party detectors and adapters, and an import that pulls in no framework."""

from __future__ import annotations

import ast
import importlib.metadata
import logging
import os
import pathlib
import subprocess
import sys
import types

import pytest

import gradwatch
from gradwatch import _manager


@pytest.fixture(autouse=True)
def fresh_manager():
    # The manager is process-wide and loads once: start each test from scratch and leave a
    # fresh one behind, so fake plugins never leak into other tests.
    _manager.reset_plugin_manager()
    yield
    _manager.reset_plugin_manager()


def entry_point(name, value):
    return importlib.metadata.EntryPoint(name=name, value=value, group=_manager.ENTRY_POINT_GROUP)


@pytest.fixture
def installed(monkeypatch):
    """``installed(ep, ...)``: pretend these are installed, beside gradwatch's own entry points
    (its adapters, which load through them)."""
    real = importlib.metadata.entry_points

    def install(*eps):
        def entry_points(**kwargs):
            if kwargs.get("group") == _manager.ENTRY_POINT_GROUP:
                return list(real(**kwargs)) + list(eps)
            return real(**kwargs)

        monkeypatch.setattr(_manager.importlib.metadata, "entry_points", entry_points)

    return install


@pytest.fixture
def plugin_module(monkeypatch):
    """``plugin_module(name, hook=function, ...)``: an importable module of hook implementations."""

    def make(name, **hooks):
        module = types.ModuleType(name)
        for hook, function in hooks.items():
            setattr(module, hook, gradwatch.hookimpl(function))
        monkeypatch.setitem(sys.modules, name, module)
        return module

    return make


class LearningRateDetector(gradwatch.Detector):
    """A third party's detector with its own kind."""

    kinds = ("lr_too_high",)

    def update(self, stats):
        return [gradwatch.Finding(kind="lr_too_high", step=stats.step, layer=None, value=1.0,
                                  threshold=0.5, message=f"step {stats.step}: lr too high")]


class MxModel:
    pass


def claim_mx(model, options):
    return ("mx-watcher", model, options) if isinstance(model, MxModel) else None


# -- built-ins --------------------------------------------------------------------------------


def test_builtin_plugins_are_registered():
    pm = gradwatch.get_plugin_manager()
    assert pm is gradwatch.get_plugin_manager()  # loaded once
    assert pm.get_plugin("builtin") is not None and pm.get_plugin("torch") is not None
    assert "torch" in gradwatch.adapter_names()
    groups = pm.hook.gradwatch_default_detectors()
    assert [type(d) for group in groups for d in group] == [
        type(d) for d in gradwatch.default_detectors()]


def test_a_monitor_without_detectors_runs_the_builtin_ones(context):
    mon = gradwatch.Monitor(context, on_finding="log")
    assert [type(d) for d in mon.detectors] == [type(d) for d in gradwatch.default_detectors()]


# -- entry points -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, loaded",
    [
        pytest.param("1", False, id="disabled"),
        pytest.param(None, True, id="unset"),
        pytest.param("", True, id="empty-means-unset"),
    ],
)
def test_autoload_env_var_skips_third_party_entry_points(
        monkeypatch, installed, plugin_module, env, loaded):
    if env is None:
        monkeypatch.delenv(_manager.DISABLE_AUTOLOAD_ENV, raising=False)
    else:
        monkeypatch.setenv(_manager.DISABLE_AUTOLOAD_ENV, env)
    plugin_module("gw_test_mx", gradwatch_claim_model=claim_mx)
    installed(entry_point("mx", "gw_test_mx"))

    pm = gradwatch.get_plugin_manager()
    assert (pm.get_plugin("mx") is not None) is loaded
    assert ("mx" in gradwatch.adapter_names()) is loaded
    # gradwatch's own adapters come in through their entry points, autoload or not.
    assert pm.get_plugin("builtin") is not None
    assert {"torch", "keras", "jax"} <= set(gradwatch.adapter_names())


def test_the_core_names_no_adapter_package():
    """Adapters are plugins like any third party's: no core module imports or names one."""
    core = pathlib.Path(gradwatch.__file__).parent
    for path in sorted(core.glob("_*.py")):
        text = path.read_text(encoding="utf-8")
        for adapter in ("gradwatch_torch", "gradwatch_keras"):
            assert adapter not in text, f"{path.name} names {adapter}"


def test_the_builtin_adapters_own_entry_point_is_not_loaded_twice(installed):
    installed(entry_point("torch", "gradwatch_torch.plugin"))
    assert gradwatch.adapter_names().count("torch") == 1
    assert _manager.failed_plugins == {}


def _missing_module(tmp_path, monkeypatch):
    return "gw_test_not_installed", "ModuleNotFoundError"


def _module_that_raises(tmp_path, monkeypatch):
    (tmp_path / "gw_test_needs_cuda.py").write_text("raise RuntimeError('needs CUDA')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "gw_test_needs_cuda", "needs CUDA"


def _missing_attribute(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gw_test_empty", types.ModuleType("gw_test_empty"))
    return "gw_test_empty:plugin", "AttributeError"


@pytest.mark.parametrize("broken", [
    pytest.param(_missing_module, id="missing-module"),
    pytest.param(_module_that_raises, id="module-raises-on-import"),
    pytest.param(_missing_attribute, id="missing-attribute"),
])
def test_a_plugin_that_fails_to_load_is_reported_by_name_and_the_rest_works(
        monkeypatch, installed, plugin_module, tmp_path, caplog, context, stats, broken):
    monkeypatch.delenv(_manager.DISABLE_AUTOLOAD_ENV, raising=False)
    value, error = broken(tmp_path, monkeypatch)
    plugin_module("gw_test_mx", gradwatch_claim_model=claim_mx)
    installed(entry_point("broken", value), entry_point("mx", "gw_test_mx"))

    with pytest.warns(gradwatch.GradWatchInternalWarning, match="'broken'") as record:
        pm = gradwatch.get_plugin_manager()
    assert error in str(record[0].message)
    assert list(_manager.failed_plugins) == ["broken"]
    assert error in _manager.failed_plugins["broken"]
    assert any("'broken'" in r.getMessage() for r in caplog.records
               if r.name == "gradwatch" and r.levelno == logging.ERROR)

    assert pm.get_plugin("mx") is not None
    assert set(gradwatch.adapter_names()) >= {"mx", "torch"}
    model = MxModel()
    assert gradwatch.watch(model)[1] is model
    mon = gradwatch.Monitor(context, on_finding="log")
    mon.check(stats(10))
    assert mon.report().internal_errors == ()


def test_a_third_party_detector_plugin_joins_the_default_detectors(
        monkeypatch, installed, plugin_module, context, stats):
    monkeypatch.delenv(_manager.DISABLE_AUTOLOAD_ENV, raising=False)
    plugin_module("gw_test_lr", gradwatch_default_detectors=lambda: [LearningRateDetector()])
    installed(entry_point("lr", "gw_test_lr"))

    mon = gradwatch.Monitor(context, on_finding="log")
    kinds = [type(d) for d in mon.detectors]
    assert LearningRateDetector in kinds
    assert set(kinds) >= {type(d) for d in gradwatch.default_detectors()}
    mon.check(stats(10))
    assert [(f.kind, f.step) for f in mon.findings] == [("lr_too_high", 10)]
    assert mon.findings[0].category is gradwatch.GradientHealthWarning


def test_watch_dispatches_to_the_adapter_that_claims_the_model(
        monkeypatch, installed, plugin_module):
    monkeypatch.delenv(_manager.DISABLE_AUTOLOAD_ENV, raising=False)
    plugin_module("gw_test_mx", gradwatch_claim_model=claim_mx)
    installed(entry_point("mx", "gw_test_mx"))
    model = MxModel()
    assert gradwatch.watch(model, check_every=5) == ("mx-watcher", model, {"check_every": 5})


def test_watch_of_an_unknown_object_lists_the_installed_adapters():
    with pytest.raises(TypeError, match=r"builtins\.object.*installed adapters: .*torch"):
        gradwatch.watch(object())


# -- no framework at import -------------------------------------------------------------------


@pytest.mark.parametrize("action", [
    pytest.param("pass", id="import"),
    pytest.param("gradwatch.get_plugin_manager()", id="plugin-loading"),
    pytest.param("try:\n    gradwatch.watch(object())\nexcept TypeError:\n    pass",
                 id="watch-unknown-object"),
])
def test_gradwatch_imports_no_framework(action):
    code = "\n".join([
        "import sys",
        "import gradwatch",
        action,
        "loaded = [m for m in ('torch', 'tensorflow', 'keras', 'jax', 'lightning', "
        "'pytorch_lightning', 'transformers', 'tensorboard', 'pytest') if m in sys.modules]",
        "assert not loaded, loaded",
    ])
    env = {k: v for k, v in os.environ.items() if k != _manager.DISABLE_AUTOLOAD_ENV}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_the_builtin_adapters_import_only_public_core_names():
    """The built-in adapters use the kit exactly as a third party's would: no private module."""
    adapters = pathlib.Path(gradwatch.__file__).parent.parent / "adapters"
    for path in sorted(adapters.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "gradwatch":
                    assert not any(p.startswith("_") for p in parts[1:]), \
                        f"{path.relative_to(adapters)}:{node.lineno} imports {name}"


def _pytest_with_broken_keras(tmp_path, **env):
    """The suite's own conftest, in a fresh process where ``import keras`` fails."""
    fake = tmp_path / "fake" / "keras"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("raise ImportError('keras is broken here')\n")
    root = pathlib.Path(__file__).resolve().parents[1]
    environ = {k: v for k, v in os.environ.items() if k != "GRADWATCH_TESTS_WITHOUT"}
    environ["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "fake"),
                                             os.environ.get("PYTHONPATH", "")])
    environ.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p",
                           "no:cacheprovider", "tests/test_severity.py"], cwd=root, env=environ,
                          capture_output=True, text=True, timeout=300)


def test_a_test_run_without_a_framework_the_readme_installs_fails_instead_of_skipping(tmp_path):
    refused = _pytest_with_broken_keras(tmp_path)
    assert refused.returncode == pytest.ExitCode.USAGE_ERROR, refused.stdout + refused.stderr
    assert "cannot import keras (ImportError: keras is broken here)" in refused.stderr
    assert "GRADWATCH_TESTS_WITHOUT=keras" in refused.stderr
    # Said on purpose, the run goes ahead (and these core tests pass without keras).
    allowed = _pytest_with_broken_keras(tmp_path, GRADWATCH_TESTS_WITHOUT="keras")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
