"""The on-disk cache under ``OPT_HOME/cache``: file hashes and converted models.

Hashing a large weights file on every load would be slow, so each file's sha256 is remembered
next to its size and modification time and recomputed only when either changes. Converted models are
written to a temporary folder and renamed into place, so an interrupted conversion never leaves a
folder that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from openpto.store.db import opt_home

_CHUNK = 8 * 1024 * 1024


def cache_root() -> Path:
    return opt_home() / "cache"


def models_cache_dir() -> Path:
    return cache_root() / "models"


def _index_path() -> Path:
    return cache_root() / "sha256.json"


def _read_index() -> dict[str, Any]:
    try:
        data = json.loads(_index_path().read_text())
    except (OSError, ValueError):
        # A missing or damaged index only costs a rehash.
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered by (resolved path, size, mtime) so a reload does not rehash."""
    real = Path(path).resolve()
    stat = real.stat()
    key = str(real)
    index = _read_index()
    entry = index.get(key)
    if (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return str(entry["sha256"])
    digest = hashlib.sha256()
    with real.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    sha = digest.hexdigest()
    # Re-read before writing: another process may have added entries meanwhile.
    index = _read_index()
    index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    # A read-only OPT_HOME still loads models; it just rehashes next time.
    with contextlib.suppress(OSError):
        _write_json_atomic(_index_path(), index)
    return sha


def files_sha256(paths: list[Path]) -> str:
    """One digest for a set of files: the file's own sha256 when there is one file, else the
    sha256 of the sorted ``name sha256`` lines (sharded checkpoints)."""
    if len(paths) == 1:
        return file_sha256(paths[0])
    lines = sorted(f"{p.name} {file_sha256(p)}\n" for p in paths)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def safe_name(name: str) -> str:
    """A file-system-safe folder name for a model name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return cleaned or "model"


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[bool]:
    """An exclusive advisory lock, so two processes do not convert the same model at once.
    Yields whether it really locked.

    Where ``fcntl`` is missing (Windows) both convert and the second rename loses; still correct.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path | None]:
    """Build ``final`` atomically: yields a temporary folder to fill (renamed to ``final`` on
    success, removed on failure), or ``None`` when another process finished it while we waited."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{final.name}.lock") as locked:
        if final.is_dir():
            yield None
            return
        if locked:
            # Holding the lock, any temporary folder of this entry is a killed process's leftover.
            for stale in final.parent.glob(f".tmp-{final.name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
        # mkdtemp makes a private folder; the finished cache entry gets ordinary permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        try:
            yield tmp
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
                # Another process (without a lock) finished first; its copy is as good.
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
