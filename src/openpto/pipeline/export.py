"""``export_artifact``: an artifact folder -> GGUF (llama.cpp/Ollama), compressed-tensors (vLLM)
or MLX (mlx-lm), recorded as an ``export`` run.

GGUF: the llama.cpp architecture the model's adapter names (``openpto.architectures``), its
metadata, tensor names from ``gguf``'s own map, the tokenizer, and what llama.cpp expects of the
tensors (the Q/K row permutation of its llama architecture, Gemma's norms stored as ``1 + w``).
A 4-bit group-32 artifact maps onto Q4_0 (symmetric: ``d = s``,
codes as they are) or Q4_1 (asymmetric: ``d = s``, ``m = -z s`` rounded to float16) without
re-rounding a single code, and an 8-bit symmetric group-32 one onto Q8_0 — so GPTQ/AWQ quality
reaches llama.cpp, whose own quantizer only rounds to nearest. Any other grid is dequantized and
re-quantized by ``gguf``'s reference quantizer, and the result says how many tensors were.

MLX: MLX's affine grid is ``w = q s + b``, so ``b = -z s`` and the codes are reused as they are,
packed LSB-first into uint32 words exactly as compressed-tensors packs them.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openpto.architectures import Architecture, GGUFLayout, architecture
from openpto.errors import ConfigError, UnsupportedModel, UsageError
from openpto.models.resolve import ARTIFACT_FILE
from openpto.pipeline.artifacts import check_output, folder_size
from openpto.pipeline.common import open_run
from openpto.progress import ProgressCallback
from openpto.registry import EXPORTERS

GGUF_TYPES = ("q8_0", "q4_0", "q4_1", "f16")


# ---------------------------------------------------------------------------------------------
# Reading an artifact (or any float Hugging Face folder) without building a model


def read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """``(config, float tensors, packed QuantizedWeights by module)`` of a model folder."""
    from safetensors import safe_open

    from openpto.models.artifact_loaders import read_packed_weights
    from openpto.models.sparse_format import is_sparse_leaf, read_sparse_weights

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UsageError(f"{folder} has no config.json; give an artifact or model folder")
    config = json.loads(config_path.read_text())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{folder} has no .safetensors weights")
    packed: dict[str, Any] = {}
    if (config.get("quantization_config") or {}).get("format") == "pack-quantized":
        packed = read_packed_weights(folder, None)
    suffixes = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape")
    # Pruned weights stored in a compressed-tensors sparse layout come back dense.
    tensors: dict[str, torch.Tensor] = read_sparse_weights(folder)
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                if key.endswith(suffixes) or (tensors and is_sparse_leaf(key)):
                    continue
                tensors[key] = f.get_tensor(key)
    return config, tensors, packed


def _permutation(rows: int, heads: int) -> torch.Tensor:
    """Rows of a Hugging Face q/k projection in the order llama.cpp's rotary embedding reads
    (convert_hf_to_gguf.py's ``permute``: halves interleaved per head)."""
    idx = torch.arange(rows)
    return idx.reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


# ---------------------------------------------------------------------------------------------
# GGUF


def gguf_names(layout: GGUFLayout, blocks: int) -> Callable[[str], str | None]:
    """``hf_name -> llama.cpp name`` for ``layout``'s architecture, from ``gguf``'s own map;
    ``None`` for a tensor that architecture does not store."""
    import gguf

    arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == layout.arch), None)
    if arch is None:
        raise ConfigError(f"this gguf package does not know the {layout.arch!r} architecture")
    names = gguf.get_tensor_name_map(arch, blocks)

    def name(hf_name: str) -> str | None:
        found: str | None = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        return found

    return name


def q4_blocks(qw: Any, symmetric_type: bool) -> np.ndarray:
    """A 4-bit group-32 ``QuantizedWeight`` as Q4_0/Q4_1 block bytes ``[rows, blocks * size]``.

    Block layout (ggml-quants): float16 ``d`` (and ``m`` for Q4_1), then 16 bytes holding codes
    ``j`` (low nibble) and ``j + 16`` (high nibble).
    """
    rows, cols = qw.q.shape
    q = qw.q.reshape(rows, cols // 32, 32).to(torch.uint8)
    qs = (q[..., :16] | (q[..., 16:] << 4)).numpy()
    d = qw.scale.to(torch.float16).numpy().reshape(rows, cols // 32, 1).view(np.uint8)
    parts = [d]
    if not symmetric_type:
        m = (-qw.zero * qw.scale).to(torch.float16).numpy().reshape(rows, cols // 32, 1)
        parts.append(m.view(np.uint8))
    parts.append(qs)
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def q8_blocks(qw: Any) -> np.ndarray:
    """An 8-bit symmetric group-32 weight as Q8_0 blocks: float16 ``d``, 32 signed codes."""
    rows, cols = qw.q.shape
    codes = (qw.q.to(torch.int16) - 128).to(torch.int8).reshape(rows, cols // 32, 32).numpy()
    d = qw.scale.to(torch.float16).numpy().reshape(rows, cols // 32, 1).view(np.uint8)
    return np.concatenate([d, codes.view(np.uint8)], axis=-1).reshape(rows, -1)


def exact_gguf_type(qw: Any) -> str | None:
    """The GGUF type a quantized weight maps onto without re-rounding, if any."""
    if qw.group_size != 32:
        return None
    if qw.bits == 4:
        return "q4_0" if qw.symmetric else "q4_1"
    if qw.bits == 8 and qw.symmetric:
        return "q8_0"
    return None


def _permute_qw(qw: Any, perm: torch.Tensor) -> Any:
    from openpto.core.quant.tensor import QuantizedWeight

    return QuantizedWeight(qw.q[perm], qw.scale[perm], qw.zero[perm], qw.bits, qw.group_size,
                           qw.symmetric)


def _add_tokenizer(writer: Any, folder: Path, source_gguf: Path | None) -> None:
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)  # nosec B615  # local folder
    data = json.loads((folder / "tokenizer.json").read_text())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(f"GGUF export handles byte-level BPE tokenizers, not {model.get('type')}")
    vocab = tok.get_vocab()
    tokens = [""] * (max(vocab.values()) + 1)
    for text, index in vocab.items():
        tokens[index] = text
    special = set(tok.all_special_ids) | {
        int(t["id"]) for t in data.get("added_tokens", []) if t.get("special")
    }
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
             for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(source_gguf))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, value in (
        (writer.add_bos_token_id, tok.bos_token_id), (writer.add_eos_token_id, tok.eos_token_id),
        (writer.add_unk_token_id, tok.unk_token_id), (writer.add_pad_token_id, tok.pad_token_id),
    ):
        if value is not None:
            setter(int(value))
    writer.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    writer.add_add_space_prefix(False)
    if getattr(tok, "chat_template", None):
        writer.add_chat_template(tok.chat_template)


def _pre_tokenizer(source_gguf: Path | None) -> str:
    """llama.cpp picks its pre-tokenizer regex by name: reuse the source GGUF's when the model
    came from one, else "default" (llama.cpp's GPT-2 regex)."""
    if source_gguf is not None and source_gguf.is_file():
        import gguf

        field = gguf.GGUFReader(source_gguf).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    return "default"


def _gguf_layout(config: dict[str, Any]) -> tuple[Architecture, GGUFLayout]:
    try:
        arch = architecture(config.get("model_type"))
    except UnsupportedModel as exc:
        raise ConfigError(f"GGUF export: {exc}") from exc
    if arch.gguf is None:
        raise ConfigError(f"GGUF export: llama.cpp has no architecture for {arch.model_type!r}")
    return arch, arch.gguf


def write_gguf(folder: Path, output: Path, qtype: str | None,
               progress: Callable[[str], None]) -> dict[str, Any]:
    """Write ``folder`` as one GGUF file; returns what was mapped exactly and what was not."""
    import gguf

    config, tensors, packed = read_folder(folder)
    arch, layout = _gguf_layout(config)
    exact = {exact_gguf_type(qw) for qw in packed.values()}
    if qtype is None:
        qtype = exact.pop() if len(exact) == 1 and None not in exact else "q8_0"
    if qtype not in GGUF_TYPES:
        raise UsageError(f"--type must be one of {', '.join(GGUF_TYPES)}, not {qtype!r}")
    ggml = getattr(gguf.GGMLQuantizationType, qtype.upper())
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    rope = config.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)  # Gemma 3: local and global bases; llama.cpp wants
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))  # the global one
    rotary = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
    layer_count = int(config["num_hidden_layers"])
    meta_path = folder / ARTIFACT_FILE
    metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    source = metadata.get("source_path")

    writer = gguf.GGUFWriter(str(output), layout.arch)
    writer.add_name(str(metadata.get("source_model") or folder.name))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(layer_count)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(rotary)
    if config.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if layout.metadata is not None:
        layout.metadata(writer, config)
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type({"f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, folder, Path(source) if source else None)

    gguf_name = gguf_names(layout, layer_count)
    skip = set(layout.skip) | ({"lm_head.weight"} if config.get("tie_word_embeddings") else set())
    mapped = requantized = 0
    for name in sorted(set(tensors) | {f"{m}.weight" for m in packed}):
        if name in skip or name.endswith("rotary_emb.inv_freq"):
            continue
        target = gguf_name(name)
        if target is None:
            raise ConfigError(f"no GGUF name for tensor {name!r} in llama.cpp's {layout.arch} "
                              "architecture")
        module = name.removesuffix(".weight")
        perm = None
        if layout.permute_qk and module.endswith("self_attn.q_proj"):
            perm = _permutation(heads * head_dim, heads)
        elif layout.permute_qk and module.endswith("self_attn.k_proj"):
            perm = _permutation(kv_heads * head_dim, kv_heads)
        qw = packed.get(module)
        if qw is not None and exact_gguf_type(qw) == qtype:
            qw = _permute_qw(qw, perm) if perm is not None else qw
            blocks = q8_blocks(qw) if qtype == "q8_0" else q4_blocks(qw, qtype == "q4_0")
            writer.add_tensor(target, blocks, raw_dtype=ggml)
            mapped += 1
            continue
        w = qw.dequantize() if qw is not None else tensors[name].float()
        if perm is not None:
            w = w[perm]
        if arch.norm_offset and name.endswith("norm.weight"):
            w = w + arch.norm_offset  # llama.cpp multiplies by the stored weight as it is
        array = w.contiguous().numpy()
        if w.dim() == 1:
            writer.add_tensor(target, array.astype(np.float32))  # norms stay float32
        elif qtype == "f16":
            writer.add_tensor(target, array.astype(np.float16))
        else:
            # Embeddings/head in Q8_0 at most: 4-bit embeddings cost llama.cpp real quality.
            kind = ggml if (qw is not None or qtype == "q8_0") else gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(target, gguf.quants.quantize(array, kind), raw_dtype=kind)
            requantized += int(qw is not None)
    progress(f"writing {output.name}: {mapped} weights mapped exactly, {requantized} re-quantized")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"type": qtype, "mapped_exactly": mapped, "requantized": requantized}


# ---------------------------------------------------------------------------------------------
# MLX and compressed-tensors


def write_mlx(folder: Path, output: Path, qtype: str | None,
              progress: Callable[[str], None]) -> dict[str, Any]:
    """An MLX folder (mlx-lm layout) holding the artifact's codes as they are."""
    from safetensors.numpy import save_file

    from openpto.core.quant.primitives import pack_int32

    config, tensors, packed = read_folder(folder)
    if not packed:
        raise ConfigError(f"{folder} holds no packed weights; quantize it first or use "
                          "opt quantize --backend mlx")
    if any(qw.group_size not in (32, 64, 128) for qw in packed.values()):
        raise ConfigError("MLX quantizes with group sizes 32/64/128; this artifact has other "
                          "(or per-channel) scales: use opt quantize --backend mlx")
    grids = {(qw.bits, qw.group_size) for qw in packed.values()}
    if len(grids) != 1:
        raise ConfigError(f"MLX export needs one grid (bits, group size) for every Linear, found "
                          f"{sorted(grids)}: per-channel scales give one group per input width")
    bits, group = grids.pop()
    if group not in (32, 64, 128) or bits not in (2, 3, 4, 5, 6, 8):
        raise ConfigError(f"MLX quantizes with group sizes 32/64/128 and 2-6 or 8 bits; this "
                          f"artifact has {bits} bits, group {group}")
    arrays = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
              for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    for module, qw in packed.items():
        words = pack_int32(qw.q, qw.bits).numpy().view(np.uint32)
        arrays[f"{module}.weight"] = np.ascontiguousarray(words)
        arrays[f"{module}.scales"] = qw.scale.float().numpy()
        arrays[f"{module}.biases"] = (-qw.zero * qw.scale).float().numpy()
    output.mkdir(parents=True)
    save_file(arrays, str(output / "model.safetensors"), metadata={"format": "mlx"})
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config["quantization"] = {"group_size": group, "bits": bits}
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in folder.iterdir():
        if path.name.startswith("tokenizer") or path.name in ("special_tokens_map.json",
                                                               "generation_config.json"):
            shutil.copy2(path, output / path.name)
    progress(f"MLX folder with {len(packed)} quantized Linears ({bits} bits, group {group})")
    return {"bits": bits, "group_size": group, "mapped_exactly": len(packed)}


def write_compressed_tensors(folder: Path, output: Path, qtype: str | None,
                             progress: Callable[[str], None]) -> dict[str, Any]:
    """The artifact already is a compressed-tensors folder: copy it, checking that it is one."""
    config = json.loads((folder / "config.json").read_text())
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") != "compressed-tensors":
        raise ConfigError(f"{folder} is not quantized (no compressed-tensors quantization_config); "
                          "run opt quantize first")
    shutil.copytree(folder, output)
    progress(f"copied the {qconfig.get('format')} folder")
    return {"compressed_tensors_format": qconfig.get("format")}


#: an exporter ``(artifact folder, output path, GGUF type, log) -> details``, looked up by format
#: in ``openpto.registry.EXPORTERS`` (``openpto.default_plugins.formats`` registers the above)
_Writer = Callable[[Path, Path, "str | None", Callable[[str], None]], dict[str, Any]]


def export_artifact(
    artifact: str | Path,
    fmt: str,
    output: str | Path,
    qtype: str | None = None,
    progress: ProgressCallback | None = None,
    store: Any = None,
) -> dict[str, Any]:
    """Export an artifact folder; returns ``output``, ``format``, ``size_bytes``, ``run_id`` and
    what was mapped exactly. The output appears only once complete (temporary name, rename)."""
    config = {"artifact": str(artifact), "format": fmt, "type": qtype, "output": str(output)}
    with open_run("export", str(artifact), config, store=store, progress=progress) as wf:
        folder = Path(artifact)
        if not folder.is_dir():
            raise UsageError(f"{folder} is not a folder; give an artifact folder written by opt")
        if fmt not in EXPORTERS:
            raise UsageError(f"--format must be one of {', '.join(EXPORTERS)}, not {fmt!r}")
        writer: _Writer = EXPORTERS.get(fmt)
        if qtype is not None and fmt != "gguf":
            raise UsageError("--type applies to --format gguf only")
        out = Path(output)
        if out.exists():
            raise UsageError(f"{out} exists; give a new path")
        check_output(out)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with wf.run.trace("export", format=fmt) as attrs:
                details = writer(folder, tmp, qtype, wf.progress.log)
                attrs.update(details)
            tmp.rename(out)
        except BaseException:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            raise
        size = out.stat().st_size if out.is_file() else folder_size(out)
        wf.run.metric("size_bytes", size, "bytes", {"format": fmt, **details})
        return wf.set_result({"output": str(out), "format": fmt, "size_bytes": size, **details,
                              "run_id": wf.run_id})


@dataclass(frozen=True)
class ExportConfig:
    """Where and how ``export`` writes an artifact: ``format`` (gguf, compressed-tensors, mlx),
    the output path, and for GGUF the tensor type (None: the one the artifact's grid maps onto
    exactly)."""

    format: str
    output: str | Path
    type: str | None = None


@dataclass
class ExportResult:
    """What ``export`` wrote; ``to_dict()`` is ``opt export --json``'s object."""

    output: str
    format: str
    size_bytes: int
    run_id: str
    details: dict[str, Any] = field(default_factory=dict)  # what was mapped, per format

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "format": self.format, "size_bytes": self.size_bytes,
                **self.details, "run_id": self.run_id}


def export(artifact: str | Path, config: ExportConfig, *,
           progress: ProgressCallback | None = None, store: Any = None) -> ExportResult:
    """Export an artifact folder as ``config`` says (see ``export_artifact``)."""
    done = export_artifact(artifact, config.format, config.output, config.type,
                           progress=progress, store=store)
    fixed = ("output", "format", "size_bytes", "run_id")
    return ExportResult(output=done["output"], format=done["format"],
                        size_bytes=done["size_bytes"], run_id=done["run_id"],
                        details={k: v for k, v in done.items() if k not in fixed})
