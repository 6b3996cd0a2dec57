"""GGUF files -> a cached float Hugging Face folder.

transformers reads a GGUF file with ``from_pretrained(folder, gguf_file=...)`` and dequantizes it,
but the model it returns carries a GGUF quantizer and refuses ``save_pretrained``. So we rebuild a
plain model of the same class from its config (without ``quantization_config``) on the meta device,
move the dequantized tensors into it, and save that. The conversion (the default model's first
load took 24.4 s on an idle 2-core machine, docs/benchmarks.md) happens once per file content;
later loads read the cached safetensors.
"""

from __future__ import annotations

import copy
import json
import re
import struct
from pathlib import Path

from openpto import __version__
from openpto.errors import CorruptFile, UnsupportedModel
from openpto.models.cache import building, file_sha256, models_cache_dir, safe_name
from openpto.progress import NullProgress, ProgressReporter


def gguf_architecture(path: Path) -> str:
    """Read a GGUF header and return ``general.architecture``; ``CorruptFile`` if unreadable."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, struct.error, EOFError) as exc:
        # gguf reports a bad magic as ValueError and a truncated tensor area as a numpy reshape
        # ValueError or an IndexError; all mean the file is not a whole GGUF file.
        raise CorruptFile(f"{path} is not a readable GGUF file: {exc}") from exc
    field = reader.fields.get("general.architecture")
    if field is None:
        raise CorruptFile(f"{path} has no general.architecture field; is it a GGUF model file?")
    return str(field.contents())


def _check_supported(path: Path, architecture: str) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # llama.cpp writes some names differently from transformers (qwen2moe vs qwen2_moe).
    normalised = re.sub(r"(?<=[a-z0-9])moe$", "_moe", architecture.replace("-", "_"))
    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if architecture not in supported and normalised not in supported:
        known = ", ".join(supported)
        raise UnsupportedModel(
            f"{path.name}: GGUF architecture {architecture!r} cannot be read by transformers "
            f"(it reads: {known})"
        )


def convert_gguf(path: Path, dest: Path) -> None:
    """Dequantize a GGUF file into a plain float32 Hugging Face folder at ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openpto.models.loaded import save_model

    folder, name = path.parent, path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)  # nosec B615  # local folder
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)  # nosec B615  # local folder
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(gguf_model)(config)
    # assign=True moves the dequantized tensors in instead of copying them (no second 500 MB).
    plain.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.eval()
    save_model(plain, tokenizer, dest)
    (dest / "conversion.json").write_text(
        json.dumps(
            {
                "source": str(path),
                "source_sha256": file_sha256(path),
                "openpto": __version__,
                "transformers": _transformers_version(),
            },
            indent=1,
        )
    )


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def cached_conversion(
    path: Path, name: str, progress: ProgressReporter | None = None
) -> tuple[Path, str]:
    """The cached float folder for a GGUF file (converted first if needed) and its sha256."""
    sha = file_sha256(path)
    final = models_cache_dir() / f"{safe_name(name)}-{sha[:12]}"
    if final.is_dir():
        return final, sha
    _check_supported(path, gguf_architecture(path))
    with building(final) as tmp:
        if tmp is not None:
            (progress or NullProgress()).log(
                f"converting {path.name} to float safetensors once; cached in {final}"
            )
            convert_gguf(path, tmp)
    return final, sha
