"""A loaded model with where it came from, and writing a plain Hugging Face folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


@dataclass
class LoadedModel:
    """A causal LM in eval mode, its tokenizer, and its provenance.

    ``kind`` is one of ``alias``, ``hf-folder``, ``gguf``, ``artifact``, ``hub-cache``; ``path`` is
    the folder or file that was loaded (the GGUF file for ``alias``/``gguf``, whose float copy is
    cached); ``source_sha256`` is the sha256 of the source weights file(s); ``metadata`` is the
    artifact's ``openpto.json`` (else empty).
    """

    model: PreTrainedModel
    tokenizer: Any
    name: str
    kind: str
    path: Path
    source_sha256: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_parameters(self) -> int:
        """Parameters counted once each (tied embeddings and lm_head count once)."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights occupy as resident: parameters plus buffers (packed weights, scales),
        each shared tensor counted once."""
        seen: set[tuple[int, int]] = set()
        total = 0
        tensors = [*self.model.parameters(), *self.model.buffers()]
        while tensors:
            tensor = tensors.pop()
            if hasattr(tensor, "__tensor_flatten__"):
                # A wrapper subclass (quanto's QTensor) has no storage of its own: count the
                # plain tensors it holds (codes, scales, shifts).
                names, _ = tensor.__tensor_flatten__()
                tensors.extend(getattr(tensor, name) for name in names)
                continue
            if tensor.device.type == "meta":
                continue
            key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()))
            if key in seen:
                continue
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
        return total

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary for run records and ``--json`` output."""
        return {
            "name": self.name,
            "kind": self.kind,
            "path": str(self.path),
            "source_sha256": self.source_sha256,
            "model_type": getattr(self.model.config, "model_type", None),
            "parameters": self.num_parameters,
            "layers": self.num_layers,
            "weight_bytes": self.weight_bytes,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }


def save_model(model: PreTrainedModel, tokenizer: Any, folder: str | Path) -> Path:
    """Write a plain Hugging Face folder: ``config.json``, ``generation_config.json``,
    ``*.safetensors`` and the tokenizer files. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
