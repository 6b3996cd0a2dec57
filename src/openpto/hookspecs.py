"""The hooks a plugin implements to extend ``openpto`` (pluggy hookspecs, as ``llm`` has them).

A plugin is a module (or any object) with functions marked ``@hookimpl`` whose names are the
hooks below. Each hook receives one ``register`` callback; every value given to it may be the
object itself or a ``"package.module:attr"`` string, imported only when the entry is first used,
so a plugin costs nothing until something asks for what it registered::

    from openpto.hookspecs import hookimpl

    @hookimpl
    def register_methods(register):
        register(FloorConfig, floor_transform)

Third-party plugins are found through the entry-point group ``openpto.plugins``; the built-ins
in ``openpto.default_plugins`` implement the same hooks.
"""

from __future__ import annotations

from typing import Any

import pluggy

#: the pluggy project name: a plugin's functions are marked with this project's ``hookimpl``
PROJECT = "openpto"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_methods(register: Any) -> None:
    """``register(config_type, transform)``: a frozen ``MethodConfig`` subclass with its own
    ``type_name`` and the transform that applies it,
    ``(model, config, calibration, *, device, on_layer) -> CompressionResult``. A subclass of
    ``QuantConfig`` is a quantization method (``opt quantize --method TYPE_NAME``), a subclass of
    ``SparsityConfig`` a pruning method."""


@hookspec
def register_quantization_backends(register: Any) -> None:
    """``register(name, backend_class)``: a ``QuantBackend`` subclass, ``--backend NAME``."""


@hookspec
def register_kernels(register: Any) -> None:
    """``register(name, kernel_class)``: a ``Kernel`` subclass running packed Linears."""


@hookspec
def register_artifact_loaders(register: Any) -> None:
    """``register(format, loader)``: ``loader(request: ArtifactRequest) -> LoadedModel`` for
    artifacts whose ``openpto.json`` names that ``format``."""


@hookspec
def register_exporters(register: Any) -> None:
    """``register(format, writer)``: ``writer(artifact_folder, output, qtype, log) -> details``,
    ``opt export --format FORMAT``."""


@hookspec
def register_generation_backends(register: Any) -> None:
    """``register(name, engine_class)``: an ``Engine`` taking ``(model_spec, options)``,
    ``opt serve --backend NAME``."""
