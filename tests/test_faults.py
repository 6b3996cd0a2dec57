"""Faults a long command meets: killed with SIGKILL while it writes its artifact, a full disk
during that write, a database that another process holds locked, a database it may not write.

Each runs the real ``opt`` in a subprocess. The kill and the full disk happen inside the weights
write itself: safetensors' ``save_file`` is wrapped, in that subprocess only, to SIGKILL the
process once the file is written, or to write half of it and fail with ENOSPC as a full disk does.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent

_FAULTY_SAVE = """
import errno, os, signal, sys
import safetensors.torch as st

real = st.save_file
fault = os.environ["OPT_TEST_FAULT"]

def faulty(tensors, filename, metadata=None):
    if fault == "kill":
        real(tensors, filename, metadata=metadata)
        os.kill(os.getpid(), signal.SIGKILL)
    with open(filename, "wb") as handle:  # what a disk that fills up halfway leaves
        handle.write(b"\\0" * 4096)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

st.save_file = faulty
sys.argv = ["opt", *sys.argv[1:]]
from openpto.cli.main import run
run()
"""


def _opt(args: list[str], db: Path, fault: str | None = None,
         **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPT_DB": str(db), "HF_HUB_OFFLINE": "1"}
    if fault is None:
        command = [sys.executable, "-m", "openpto", *args]
    else:
        env["OPT_TEST_FAULT"] = fault
        command = [sys.executable, "-c", _FAULTY_SAVE, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                          **kwargs)  # type: ignore[call-overload,no-any-return]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _runs(db: Path) -> list[tuple[str, str, str | None]]:
    return sqlite3.connect(db).execute(
        "select kind, status, error from runs order by started_at").fetchall()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("faults") / "tiny"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_a_full_disk_or_a_kill_during_the_write_leaves_no_half_artifact(
        tiny_folder: Path, tmp_path: Path) -> None:
    db, out = tmp_path / "opt.db", tmp_path / "art"
    quantize = ["quantize", str(tiny_folder), "--method", "rtn", "--output", str(out), "--json"]
    first = _opt(quantize, db)
    assert first.returncode == 0, first.stderr
    before = _digest(out)
    assert "openpto.json" in before

    # The disk fills up during the weights write: one clear line, the old artifact untouched,
    # no hidden partial folder left beside it, the run recorded failed.
    full = _opt(quantize, db, fault="full")
    assert full.returncode == 1, full.stderr
    assert "Traceback" not in full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write the artifact {out}: No space left on device")
    assert "nothing was left half-written" in last
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".art")) == []
    assert _runs(db)[-1][:2] == ("quantize", "failed")
    assert "No space left on device" in (_runs(db)[-1][2] or "")

    # SIGKILL once the weights are on disk, before the folder is complete: nothing can clean up,
    # yet nothing there looks like a complete artifact, and the old one is still whole.
    killed = _opt(quantize, db, fault="kill")
    assert killed.returncode == -signal.SIGKILL
    assert _digest(out) == before
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".art.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").exists()
    assert not (leftovers[0] / "openpto.json").exists()  # its presence marks an artifact
    assert _runs(db)[-1][1] == "running"  # nothing could record the kill itself

    # The next command, whatever it is, closes the orphaned row with a reason.
    listed = _opt(["db", "tables", "--json"], db)
    assert listed.returncode == 0, listed.stderr
    kind, status, error = _runs(db)[-1]
    assert (kind, status) == ("quantize", "failed")
    assert error is not None and error.startswith("stale: process ")


def test_a_locked_database_is_a_clear_error(tiny_folder: Path, tmp_path: Path) -> None:
    db = tmp_path / "opt.db"
    from openpto.store import Store

    Store(db).db.conn.close()  # created and migrated
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a long write
    try:
        done = _opt(["quantize", str(tiny_folder), "--method", "rtn", "--output",
                     str(tmp_path / "art"), "--json"], db)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: the database {db} is locked by another process")
    assert not (tmp_path / "art").exists()


_READ_ONLY_MOUNT = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'


def _read_only_prefix(folder: Path) -> list[str]:
    """A command prefix that runs what follows with ``folder`` on a read-only mount (root in a
    private mount namespace), or nothing when file modes already stop writes (not root)."""
    if os.geteuid() != 0:
        return []
    probe = subprocess.run(["unshare", "-m", "sh", "-c", _READ_ONLY_MOUNT, "sh", str(folder),
                            "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"root here cannot make a read-only mount: {probe.stderr.strip()}")
    return ["unshare", "-m", "sh", "-c", _READ_ONLY_MOUNT, "sh", str(folder)]


def test_a_database_on_a_read_only_file_system_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "opt.db"
    from openpto.store import Store

    Store(db).db.conn.close()
    for leftover in folder.glob("opt.db-*"):
        leftover.unlink()
    os.chmod(db, 0o444)
    os.chmod(folder, 0o555)
    try:
        done = subprocess.run(
            [*_read_only_prefix(folder), sys.executable, "-m", "openpto", "db", "tables",
             "--json"], capture_output=True, text=True, timeout=120,
            env={**os.environ, "OPT_DB": str(db)})
    finally:
        os.chmod(folder, 0o755)
    assert done.returncode == 1, done.stdout
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot open the database {db}")


def test_the_error_of_a_write_names_what_sqlite_said(tmp_path: Path) -> None:
    from openpto.errors import StoreError
    from openpto.store import Store

    store = Store(tmp_path / "opt.db")
    store.db.execute("PRAGMA query_only = ON")  # refuses writes as a read-only file does
    with pytest.raises(StoreError, match=r"is read-only .*: attempt to write a readonly database"):
        store.insert("datasets", {"id": "x", "name": "n"})
    assert json.loads(json.dumps(store.tables()))["runs"] == 0
