"""The plugin manager: built-in plugins, entry-point discovery and safe hook calls."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import threading
import warnings
from typing import Any

import pluggy

from . import _hookspecs
from ._findings import GradientHealthError, GradWatchInternalWarning

logger = logging.getLogger("gradwatch")

#: Entry-point group every plugin registers under, gradwatch's own adapters included.
ENTRY_POINT_GROUP = "gradwatch"
#: Set to a non-empty value to skip third-party entry points (like PYTEST_DISABLE_PLUGIN_AUTOLOAD);
#: the entry points of the gradwatch distribution itself (its adapters) still load.
DISABLE_AUTOLOAD_ENV = "GRADWATCH_DISABLE_PLUGIN_AUTOLOAD"
#: The distribution whose entry points load even with autoload disabled.
DISTRIBUTION = "gradwatch"

# The core's own plugin (the built-in detectors). Adapters are not named here: they come in
# through their entry points, like anyone's.
_CORE_PLUGINS = {"builtin": "gradwatch._builtin"}

_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None
#: Entry points that failed to load: name -> error text.
failed_plugins: dict[str, str] = {}


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("gradwatch")
    pm.add_hookspecs(_hookspecs)
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager holding built-in and installed plugins (loaded once)."""
    global _manager
    with _lock:
        if _manager is None:
            pm = new_plugin_manager()
            for name, module in _CORE_PLUGINS.items():
                try:
                    pm.register(importlib.import_module(module), name=name)
                except Exception as exc:  # a broken install must not break `import gradwatch`
                    _plugin_failed(name, exc)
            _load_entry_points(pm, own_only=bool(os.environ.get(DISABLE_AUTOLOAD_ENV)))
            _manager = pm
        return _manager


def reset_plugin_manager() -> None:
    """Forget the loaded plugins; the next :func:`get_plugin_manager` loads them again."""
    global _manager
    with _lock:
        _manager = None
        failed_plugins.clear()


def _own(ep: importlib.metadata.EntryPoint) -> bool:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) or ""
    return name.lower().replace("_", "-") == DISTRIBUTION


def _load_entry_points(pm: pluggy.PluginManager, *, own_only: bool = False) -> None:
    # pluggy's load_setuptools_entrypoints does not guard ep.load(): one plugin that fails to
    # import would take every other plugin (and gradwatch) down with it.
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if own_only and not _own(ep):
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            _plugin_failed(ep.name, exc)


def _plugin_failed(name: str, exc: BaseException) -> None:
    text = f"{type(exc).__name__}: {exc}"
    failed_plugins[name] = text
    msg = f"gradwatch plugin {name!r} failed to load and is skipped ({text})"
    logger.error(msg)
    warnings.warn(msg, GradWatchInternalWarning, stacklevel=3)


def adapter_names(pm: pluggy.PluginManager | None = None) -> list[str]:
    """Names of the registered plugins that can claim a model."""
    pm = pm or get_plugin_manager()
    return [impl.plugin_name for impl in pm.hook.gradwatch_claim_model.get_hookimpls()]


def _must_propagate(exc: BaseException) -> bool:
    # Strict mode and `-W error::...` are the user asking training to stop.
    return isinstance(exc, (GradientHealthError, Warning))


def call_each(pm: pluggy.PluginManager, hook_name: str, on_error, **kwargs: Any) -> list[Any]:
    """Call every implementation of a hook, isolating failures: one broken sink must not keep
    the others from running, nor stop training. ``on_error(plugin_name, exc)`` reports it."""
    results = []
    hook = getattr(pm.hook, hook_name)
    for impl in reversed(hook.get_hookimpls()):  # pluggy's own order: last registered first
        try:
            args = {name: kwargs[name] for name in impl.argnames}
            res = impl.function(**args)
        except Exception as exc:
            if _must_propagate(exc):
                raise
            on_error(f"{hook_name} in plugin {impl.plugin_name!r}", exc)
            continue
        if res is not None:
            results.append(res)
    return results
