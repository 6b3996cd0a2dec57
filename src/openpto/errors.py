"""One error hierarchy for the whole toolkit.

Front ends turn these into a one-line message and a non-zero exit (CLI), a 4xx JSON error
(server) or a notification (TUI). Anything that is not an ``OptError`` is a bug.
"""

from __future__ import annotations


class OptError(Exception):
    """Base class of every error a user can cause or fix."""

    exit_code = 1


class UsageError(OptError):
    """A bad option or argument value."""

    exit_code = 2


class ModelNotFound(OptError):
    """A MODEL argument that names no alias, path or cached hub id."""


class UnsupportedModel(OptError):
    """A model whose architecture or layout the toolkit cannot handle."""


class CorruptFile(OptError):
    """A file that exists but cannot be read: truncated, corrupt or of the wrong format."""


class DataError(OptError):
    """Text data that is missing, empty or too short for the request."""


class ConfigError(OptError):
    """A method configuration that cannot apply to this model.

    For example a group size that does not divide a layer's width.
    """


class StoreError(OptError):
    """A database problem: a write statement in a read-only query, a missing table, a bad path."""


class BackendUnavailable(OptError):
    """A backend or kernel that cannot run on this machine."""


class PluginError(OptError):
    """A plugin that registers what it may not, such as a name another plugin registered."""


class AgentError(OptError):
    """An ``opt agent`` run that could not finish: the model endpoint failed or refused, the
    model's reply could not be used, or it took more turns than ``--max-turns`` allows."""


class MissingDependency(OptError):
    """An optional dependency that is not installed; the message names the extra to install."""

    def __init__(self, package: str, extra: str, purpose: str = "") -> None:
        self.package = package
        self.extra = extra
        what = f" for {purpose}" if purpose else ""
        super().__init__(
            f"{package} is needed{what} but is not installed: pip install 'openpto[{extra}]'"
        )


def require(module: str, extra: str, purpose: str = "") -> object:
    """Import an optional dependency at the point of use, or raise ``MissingDependency``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(module.split(".")[0], extra, purpose) from exc


def installed_library(
    package: str, module: str, extra: str, errors: tuple[type[Exception], ...] = (ImportError,)
) -> tuple[str | None, str]:
    """``(version, "")`` when the distribution ``package`` is installed and ``module`` imports;
    else ``(None, why not)``: ``require`` for a status line (``opt info``) instead of an error."""
    import importlib
    import importlib.metadata

    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None, f"{package} is not installed: pip install 'openpto[{extra}]'"
    try:
        importlib.import_module(module)
    except errors as exc:
        return None, f"{package} {version} is installed but cannot load: {exc}"
    return version, ""
