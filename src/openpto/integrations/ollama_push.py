"""``opt ollama push``: an artifact into an Ollama server (or ``opt serve``) in one command.

1. the artifact is exported to GGUF through ``openpto.export`` (a 4-bit group-32 grid maps onto
   Q4_0/Q4_1 and an 8-bit symmetric group-32 one onto Q8_0 without re-rounding a code; other
   grids are re-quantized to the type asked, and the export says so);
2. the tokenizer's chat template becomes Ollama's Go template (``chat_template.convert``, checked
   by rendering both), with the stop strings and the default system prompt;
3. the GGUF goes up as a blob — unless ``HEAD /api/blobs/<digest>`` says the server has it;
4. ``create`` makes NAME[:TAG] from the blob, the template, ``SYSTEM``, the stop parameters and
   the license (a LICENSE file in the artifact, else the source model's when it is known).

``--modelfile PATH`` also writes the equivalent Modelfile, with the GGUF kept beside it. A chat
template that cannot be converted stops the push after the Modelfile is written, with a comment
where the TEMPLATE goes, for the user to finish and ``ollama create -f``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openpto.errors import OptError, UsageError
from openpto.integrations import ollama_client
from openpto.integrations.chat_template import (
    OllamaTemplate,
    UnconvertibleTemplate,
    convert,
    modelfile,
)

ARTIFACT_FILE = "openpto.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?"
                   r"(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?")
#: licenses of the models an alias names
KNOWN_LICENSES = {"smollm2-135m": "Apache-2.0"}
_LICENSE_FILES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE")


@dataclass(frozen=True)
class PushResult:
    name: str
    digest: str
    size_bytes: int
    gguf: str
    host: str
    uploaded: bool
    gguf_type: str
    template_style: str
    template_checked: int
    modelfile: str
    warnings: tuple[str, ...]
    export_run_id: str
    mapped_exactly: int = 0
    requantized: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "digest": self.digest, "size_bytes": self.size_bytes,
                "gguf": self.gguf, "host": self.host, "uploaded": self.uploaded,
                "gguf_type": self.gguf_type, "template_style": self.template_style,
                "template_checked": self.template_checked, "modelfile": self.modelfile,
                "warnings": list(self.warnings), "export_run_id": self.export_run_id,
                "mapped_exactly": self.mapped_exactly, "requantized": self.requantized}


def check_name(name: str) -> str:
    """NAME[:TAG] as Ollama names models; names are not paths."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise UsageError(f"not a model name: {name!r} (NAME[:TAG], letters, digits, . _ -; "
                         "names are not paths)")
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def check_artifact(folder: Path) -> dict[str, Any]:
    """The artifact's ``openpto.json``; a clear error for any other folder."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; give an artifact folder written by opt")
    meta_path = folder / ARTIFACT_FILE
    if not meta_path.is_file() or not (folder / "config.json").is_file():
        raise UsageError(f"{folder} is not an artifact written by opt (no {ARTIFACT_FILE} and "
                         "config.json); make one with opt quantize or opt sparsify")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise UsageError(f"{meta_path} is not JSON: {exc}") from exc
    return meta if isinstance(meta, dict) else {}


def license_text(folder: Path, meta: dict[str, Any]) -> str | None:
    for name in _LICENSE_FILES:
        if (folder / name).is_file():
            return (folder / name).read_text().strip() or None
    return KNOWN_LICENSES.get(str(meta.get("source_model") or ""))


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def upload_blob(url: str, path: Path, digest: str) -> bool:
    """Upload ``path`` unless the server already has ``digest``; True when it was uploaded."""
    import httpx

    with ollama_client.reported(url):
        try:
            head = httpx.head(f"{url}/api/blobs/{digest}", timeout=30.0)
        except httpx.ConnectError as exc:
            raise ConnectionError(str(exc)) from exc
        if head.status_code == 200:
            return False
        sent = ollama_client.client(url).create_blob(path)
    if sent != digest:
        raise OptError(f"{path} changed while it was uploaded ({sent} != {digest})")
    return True


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))  # nosec B615  # local folder


def push(artifact: str | Path, name: str, *, host: str | None = None, gguf_type: str | None = None,
         modelfile_path: str | Path | None = None,
         on_status: Callable[[str], None] = lambda _: None, store: Any = None) -> PushResult:
    import openpto

    folder = Path(artifact).expanduser()
    meta = check_artifact(folder)
    model = check_name(name)
    url = ollama_client.host_url(host)
    license_value = license_text(folder, meta)
    template: OllamaTemplate | None = None
    problem = ""
    tokenizer = _tokenizer(folder)
    try:
        template = convert(tokenizer)
    except UnconvertibleTemplate as exc:
        problem = str(exc)
        if modelfile_path is None:
            raise UnconvertibleTemplate(f"{exc} (pass --modelfile PATH to get a Modelfile to "
                                        "edit)") from exc
    mf = Path(modelfile_path).expanduser() if modelfile_path else None
    scratch = Path(tempfile.mkdtemp(prefix="opt-push-"))
    try:
        gguf = (mf.parent / f"{model.replace('/', '-').replace(':', '-')}.gguf" if mf
                else scratch / "model.gguf")
        if gguf.exists():
            raise UsageError(f"{gguf} exists; remove it or choose another --modelfile folder")
        on_status(f"exporting {folder} to GGUF")
        exported = openpto.export(str(folder), openpto.ExportConfig(
            format="gguf", output=str(gguf), type=gguf_type), store=store)
        if mf is not None:
            mf.write_text(modelfile(f"./{gguf.name}", template, license_value, problem,
                                    str(getattr(tokenizer, "chat_template", "") or "")))
        if template is None:
            raise UnconvertibleTemplate(f"{problem}; the Modelfile {mf} is written for you to "
                                        f"edit, then: ollama create {model} -f {mf}")
        digest = file_digest(gguf)
        on_status(f"uploading {gguf.stat().st_size} bytes ({digest[:19]}…)")
        uploaded = upload_blob(url, gguf, digest)
        if not uploaded:
            on_status("the server already has this blob")
        on_status(f"creating {model}")
        parameters: dict[str, Any] = {"stop": list(template.stop)}
        for chunk in ollama_client.stream(
                url, "create", model, files={"model.gguf": digest}, template=template.template,
                system=template.system, parameters=parameters, license=license_value):
            on_status(str(chunk.get("status", "")))
        size = gguf.stat().st_size
        details = exported.details
        return PushResult(
            name=model, digest=digest, size_bytes=size, gguf=str(gguf) if mf else "",
            host=url, uploaded=uploaded,
            gguf_type=str(details.get("type") or gguf_type or ""),
            mapped_exactly=int(details.get("mapped_exactly") or 0),
            requantized=int(details.get("requantized") or 0),
            template_style=template.style, template_checked=template.checked,
            modelfile=str(mf) if mf else "", warnings=template.warnings,
            export_run_id=exported.run_id)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
