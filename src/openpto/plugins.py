"""The plugin manager: every registry in ``openpto.registry`` is filled through it.

The built-in hook modules (``DEFAULT_PLUGINS``) are registered on the manager directly, as
``llm`` does, so a checkout whose installed metadata is stale still has every built-in; other
packages join through the entry-point group ``openpto.plugins``::

    [project.entry-points."openpto.plugins"]
    floor = "openpto_floor"

Nothing happens at ``import openpto``: the first read of any registry calls ``load_plugins``,
which imports the hook modules and asks each plugin's hooks what it registers (entries
themselves stay ``"module:attr"`` strings until used). A plugin that fails, on import or in a
hook, is skipped with one ``PluginLoadWarning`` naming it, and everything else keeps working.
Registering another plugin object on ``pm`` later (tests do) refills the registries on the next
read.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy

from openpto import hookspecs, registry
from openpto.config import MethodConfig
from openpto.errors import PluginError

ENTRY_POINT_GROUP = "openpto.plugins"

DEFAULT_PLUGINS = (
    "openpto.default_plugins.methods",
    "openpto.default_plugins.kernels",
    "openpto.default_plugins.backends",
    "openpto.default_plugins.formats",
)


class PluginLoadWarning(UserWarning):
    """A plugin that could not be loaded and was skipped."""


pm = pluggy.PluginManager(hookspecs.PROJECT)
pm.add_hookspecs(hookspecs)


@dataclass
class PluginFailure:
    name: str
    error: str
    distribution: str | None = None


@dataclass
class _State:
    started: bool = False
    filling: bool = False
    #: the (name, plugin) pairs the registries were last filled from
    filled_from: frozenset[tuple[str, int]] | None = None
    failures: dict[str, PluginFailure] = field(default_factory=dict)


_state = _State()
_lock = threading.RLock()
_warning_registry: dict[Any, Any] = {}


def load_plugins() -> None:
    """Register the built-ins and the installed plugins (once per process) and fill the
    registries from their hooks (again whenever the set of registered plugins changed)."""
    with _lock:
        if _state.filling:
            return  # a hook module reading a registry while it is being filled
        if not _state.started:
            _state.started = True
            for module in DEFAULT_PLUGINS:
                pm.register(importlib.import_module(module), module)
            _load_entry_points()
        current = _plugin_set()
        if current != _state.filled_from:
            _state.filling = True
            try:
                _fill()
            finally:
                _state.filling = False
            _state.filled_from = _plugin_set()


def _plugin_set() -> frozenset[tuple[str, int]]:
    return frozenset((name, id(plugin)) for name, plugin in pm.list_name_plugin())


def _load_entry_points() -> None:
    """Each entry point through pluggy's loader, one at a time, so one that fails to import is
    skipped instead of stopping the others."""
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        name = entry_point.name
        if pm.get_plugin(name) is not None or pm.is_blocked(name):
            continue
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
            pm.check_pending()  # a hook function named after no hook
        except Exception as exc:
            plugin = pm.get_plugin(name)
            if plugin is not None:
                pm.unregister(plugin)
            dist = entry_point.dist
            origin = f"{dist.metadata['Name']} {dist.version}" if dist is not None else None
            report_failure(name, exc, f"entry point {entry_point.value!r}", origin)


def _fill() -> None:
    """Ask each plugin in turn for its entries; a plugin whose hook raises or that registers a
    taken name adds nothing at all (no half-registered plugin)."""
    for target in registry.REGISTRIES:
        target.clear()
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        staged: list[tuple[Any, Any, Any]] = []
        try:
            for target in registry.REGISTRIES:
                others = [p for p in pm.get_plugins() if p is not plugin]
                caller = pm.subset_hook_caller(target.hook, remove_plugins=others)

                def register(key: Any, value: Any, _target: Any = target,
                             _staged: list[Any] = staged) -> None:
                    _staged.append((_target, key, value))

                caller(register=register)
            seen: set[tuple[int, Any]] = set()
            for target, key, _ in staged:
                target.check_new(key, name)
                if (id(target), key) in seen:
                    raise PluginError(f"plugin {name!r} registers {key!r} twice")
                seen.add((id(target), key))
        except Exception as exc:
            origin = _distribution(plugin)
            pm.unregister(plugin)
            report_failure(name, exc, "its hooks", origin)
            continue
        for target, key, value in staged:
            target.add(key, value, name)


def _distribution(plugin: object) -> str | None:
    for candidate, dist in pm.list_plugin_distinfo():
        if candidate is plugin:
            return f"{dist.project_name} {dist.version}"
    return None


def report_failure(name: str, exc: BaseException, where: str,
                   distribution: str | None = None) -> None:
    """One ``PluginLoadWarning`` per plugin and process: what failed and why; the plugin (or
    the one entry) is skipped."""
    with _lock:
        if name in _state.failures:
            return
        error = f"{type(exc).__name__}: {exc}"
        _state.failures[name] = PluginFailure(name, error, distribution)
    origin = f" ({distribution})" if distribution else ""
    # Attributed to this module, line 0: the warning is about the plugin, and a source line of
    # ours under it would only be noise on the command line.
    warnings.warn_explicit(
        f"openpto plugin {name!r}{origin} failed to load ({where}) and was skipped: {error}",
        PluginLoadWarning, filename=__name__, lineno=0, module=__name__,
        registry=_warning_registry,
    )


def plugin_report() -> dict[str, Any]:
    """Every loaded plugin with what it registered, and every plugin that failed (``opt plugins``).

    Method configs registered by name are imported here to show their ``type_name``; nothing
    else is."""
    load_plugins()
    registered: dict[str, dict[str, list[str]]] = {}
    for cls, owner in registry.TRANSFORMS.owners().items():
        method = cls.type_name if issubclass(cls, MethodConfig) else cls.__name__
        registered.setdefault(owner, {}).setdefault("methods", []).append(method)
    for target in registry.REGISTRIES:
        if isinstance(target, registry.NameRegistry):
            for entry, owner in target.owners().items():
                kind = target.hook.removeprefix("register_")
                registered.setdefault(owner, {}).setdefault(kind, []).append(entry)
    plugins = []
    for name, plugin in pm.list_name_plugin():
        plugins.append({
            "name": name,
            "builtin": name in DEFAULT_PLUGINS,
            "distribution": _distribution(plugin),
            "registered": {k: sorted(v) for k, v in sorted(registered.get(name, {}).items())},
        })
    failed = [{"name": f.name, "distribution": f.distribution, "error": f.error}
              for f in _state.failures.values()]
    return {"plugins": plugins, "failed": failed}
