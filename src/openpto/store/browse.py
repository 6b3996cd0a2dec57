"""Starting Datasette on the run database, with titles, descriptions and canned queries."""

from __future__ import annotations

import json
import shutil
import subprocess  # nosec B404  # runs datasette, argv list
import sys
import tempfile
from importlib import resources
from pathlib import Path

from openpto.errors import MissingDependency


def datasette_metadata(db_path: Path) -> dict[str, object]:
    text = resources.files("openpto.store").joinpath("datasette_metadata.json").read_text()
    metadata = json.loads(text)
    # Datasette names a database after its file stem; key the metadata the same way.
    metadata["databases"] = {db_path.stem: metadata["databases"]["opt"]}
    return metadata


def datasette_command(db_path: Path, host: str, port: int, metadata_path: Path) -> list[str]:
    try:
        import datasette  # noqa: F401
    except ImportError as exc:
        raise MissingDependency("datasette", "db", "opt db serve") from exc
    return [
        sys.executable, "-m", "datasette", "serve", str(db_path),
        "--host", host, "--port", str(port), "--metadata", str(metadata_path),
        "--setting", "sql_time_limit_ms", "5000",
    ]


def serve_datasette(db_path: Path, host: str = "127.0.0.1", port: int = 9000) -> int:
    """Run Datasette in the foreground until it stops; return its exit code."""
    workdir = Path(tempfile.mkdtemp(prefix="opt-datasette-"))
    try:
        metadata_path = workdir / "metadata.json"
        metadata_path.write_text(json.dumps(datasette_metadata(db_path)))
        return subprocess.call(datasette_command(db_path, host, port, metadata_path))  # nosec B603  # fixed argv list, no shell
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
