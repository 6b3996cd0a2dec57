"""The quantize workflow on tiny models: round trips per method and backend, dry-run size, the
run record, and bad configurations that must fail early and leave nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openpto.core.quant import AWQConfig, GPTQConfig, LLMInt8Config, NF4Config, RTNConfig
from openpto.core.sparsity import SparseGPTConfig
from openpto.errors import ConfigError, OptError, UnsupportedModel, UsageError, WriteError
from openpto.pipeline.workflow import CalibrationOptions, EvalOptions, QuantizeOptions
from openpto.store import Store

SPEC_KEYS = {"output", "method", "bits", "group_size", "size_bytes_before", "size_bytes_after",
             "seconds", "run_id"}
FAST = CalibrationOptions(samples=4, seq_len=32)
CONFIGS = {"rtn": RTNConfig, "gptq": GPTQConfig, "awq": AWQConfig, "nf4": NF4Config,
           "int8": LLMInt8Config}


def quantize(folder: Path, method: str = "gptq", *, store: Store,
             progress: object = None, fields: dict | None = None, **options: object):
    """``openpto.quantize`` with a ``method`` config of ``fields`` and ``QuantizeOptions``."""
    import openpto

    config = CONFIGS[method](**(fields or {}))
    options.setdefault("calibration", FAST)
    return openpto.quantize(str(folder), config, QuantizeOptions(**options),  # type: ignore[arg-type]
                            progress=progress, store=store)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hidden width 96: 64 does not divide it (as 128 does not divide the default model's 576)."""
    from openpto.models import save_model
    from tests.helpers import tiny_llama, tiny_tokenizer

    model = tiny_llama(hidden_size=96, intermediate_size=192, seed=7)
    return save_model(model, tiny_tokenizer(), tmp_path_factory.mktemp("tiny96"))


@pytest.fixture
def eval_file(tmp_path: Path) -> Path:
    from openpto.data import load_text

    path = tmp_path / "held-out.txt"
    path.write_text(load_text("stdlib-docstrings").text[:3000], encoding="utf-8")
    return path


def _run(store: Store, run_id: str) -> dict:
    (run,) = store.rows("runs", "id = ?", [run_id])
    return run


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_round_trip_quantize_save_load_eval(method: str, tiny_folder: Path, eval_file: Path,
                                            tmp_path: Path) -> None:
    from openpto.core.metrics import perplexity
    from openpto.data import tokenize_text
    from openpto.kernels import QuantLinear
    from openpto.models import load_model
    store = Store(tmp_path / "opt.db")
    out = tmp_path / "art"
    result = quantize(tiny_folder, method, fields={"bits": 4, "group_size": 32}, output=out,
                      evaluation=EvalOptions(text=str(eval_file), seq_len=64),
                      store=store).to_dict()
    assert set(result) >= SPEC_KEYS | {"perplexity_before", "perplexity_after"}
    assert (result["method"], result["bits"], result["group_size"]) == (method, 4, 32)
    assert result["size_bytes_after"] < 0.6 * result["size_bytes_before"]
    # A random model is near-uniform over 512 tokens; 4-bit g32 barely moves it.
    assert result["perplexity_after"] == pytest.approx(result["perplexity_before"], rel=0.05)

    loaded = load_model(str(out))
    assert sum(isinstance(m, QuantLinear) for m in loaded.model.modules()) == 14
    ids = tokenize_text(loaded.tokenizer, eval_file.read_text())
    packed_ppl = perplexity(loaded.model, ids, 64).perplexity
    # Same weights; the packed CPU kernel computes in bfloat16.
    assert packed_ppl == pytest.approx(result["perplexity_after"], rel=0.01)

    run = _run(store, result["run_id"])
    assert (run["kind"], run["status"]) == ("quantize", "succeeded")
    traces = {t["name"]: json.loads(t["attributes"]) for t in store.rows("traces")}
    assert {"load", "plan", "quantize", "layer 0", "layer 1", "eval before", "eval after"} <= set(
        traces)
    layer0 = traces["layer 0"]
    assert set(layer0["errors"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                     "mlp.down_proj"}
    assert 0 <= layer0["mean_error"] <= layer0["max_error"] < 0.1 and layer0["peak_rss_bytes"] > 0
    if method == "gptq":  # what each Linear's solve did
        o_proj = layer0["linears"]["self_attn.o_proj"]
        assert o_proj["damp"] >= 0.01 and o_proj["solved_with"] == ["self_attn.o_proj"]
        assert o_proj["hessian_products"] in ("bfloat16", "float32")
        assert o_proj["refit"] is None or o_proj["refit"] >= 0
    elif method == "awq":  # the scale search's alpha, per Linear (None where none was searched)
        assert set(layer0["linears"]) == set(layer0["errors"])
        assert all(0 <= (v["alpha"] or 0) <= 1 for v in layer0["linears"].values())
    else:
        assert layer0["linears"] == {}
    metrics = {m["name"]: m["value"] for m in store.rows("metrics")}
    assert metrics["size_bytes_after"] == result["size_bytes_after"]
    assert metrics["perplexity_after"] == pytest.approx(result["perplexity_after"])
    (row,) = store.rows("models")
    assert row["path"] == str(out.resolve()) and row["method"] == method
    assert row["run_id"] == result["run_id"] and row["size_bytes"] == result["size_bytes_after"]
    roles = json.loads(run["config"])
    assert "eval_data" in roles and (method == "rtn") != ("calibration_data" in roles)
    meta = json.loads((out / "openpto.json").read_text())
    assert meta["method_config"]["type"] == method and meta["source_sha256"]


def test_dry_run_size_is_within_one_percent_and_writes_nothing(tiny_folder: Path,
                                                                 tmp_path: Path) -> None:
    store = Store(tmp_path / "opt.db")
    for bits, group, sym in ((4, 32, False), (8, None, True)):
        out = tmp_path / f"art{bits}"
        fields = {"bits": bits, "group_size": group, "symmetric": sym}
        dry = quantize(tiny_folder, "rtn", fields=fields, output=out, dry_run=True, store=store)
        assert dry.dry_run and not out.exists()
        real = quantize(tiny_folder, "rtn", fields=fields, output=out, store=store)
        assert real.dry_run is None and "dry_run" not in real.to_dict()
        assert abs(dry.size_bytes_after - real.size_bytes_after) / real.size_bytes_after < 0.01


def test_automatic_group_size_says_why(tiny_folder: Path, tmp_path: Path) -> None:
    from openpto.progress import Message, ProgressEvent

    messages: list[str] = []

    def log(event: ProgressEvent) -> None:
        if isinstance(event, Message):
            messages.append(event.message)

    auto = {"group_size": "auto"}
    result = quantize(tiny_folder, "rtn", fields={"bits": 4, **auto}, dry_run=True,
                      output=tmp_path / "a", progress=log, store=Store(tmp_path / "d.db"))
    assert result.group_size == 32
    assert any("group size 32" in m and "128, 64 does not divide" in m for m in messages)
    eight = quantize(tiny_folder, "rtn", fields={"bits": 8, **auto}, dry_run=True,
                     output=tmp_path / "b", store=Store(tmp_path / "d.db"))
    assert eight.group_size is None and eight.symmetric is True


@pytest.mark.parametrize(
    ("config", "options", "error", "message"),
    [
        (GPTQConfig(bits=4, group_size=64), {}, ConfigError,
         "group sizes that divide every width: 32"),
        (NF4Config(bits=3), {"backend": "bitsandbytes"}, ConfigError, "cannot quantize to 3 bits"),
        (RTNConfig(bits=3), {"backend": "quanto"}, ConfigError, "cannot quantize to 3"),
        (GPTQConfig(), {"backend": "quanto"}, ConfigError, "has no method 'gptq'"),
        (SparseGPTConfig(), {}, ConfigError, "has no method 'sparsegpt'"),
        (GPTQConfig(), {"backend": "nope"}, UsageError, "unknown quantization backend 'nope'"),
        (GPTQConfig(), {"calibration": CalibrationOptions(samples=0)}, UsageError,
         "--samples must be at least 1"),
        (GPTQConfig(), {"float_dtype": "int8"}, UsageError, "float_dtype must be one of"),
    ],
)
def test_bad_configs_fail_before_any_work(config: object, options: dict, error: type,
                                          message: str, tiny_folder: Path,
                                          tmp_path: Path) -> None:
    import openpto

    store = Store(tmp_path / "opt.db")
    options = {"calibration": FAST, **options}
    with pytest.raises(error, match=message):
        openpto.quantize(str(tiny_folder), config,  # type: ignore[arg-type]
                         QuantizeOptions(output=tmp_path / "art", **options), store=store)
    assert not (tmp_path / "art").exists()
    (run,) = store.rows("runs")
    assert run["status"] == "failed" and message.split("'")[0] in run["error"]
    names = {t["name"] for t in store.rows("traces")}
    assert not names & {"quantize", "calibration data"}


def test_unwritable_output_fails_before_loading(tiny_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    store = Store(tmp_path / "opt.db")
    with pytest.raises(UsageError, match="not a writable folder"):
        quantize(tiny_folder, "gptq", output=tmp_path / "a-file" / "art", store=store)
    assert [t["name"] for t in store.rows("traces")] == []
    assert store.rows("runs")[0]["status"] == "failed"


def test_failure_while_saving_marks_the_run_failed_and_leaves_no_folder(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def save_then_fail(tensors, filename, metadata=None):  # type: ignore[no-untyped-def]
        real_save(tensors, filename, metadata=metadata)  # the weights are on disk, then
        raise OSError("no space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    store = Store(tmp_path / "opt.db")
    with pytest.raises(WriteError, match="no space left on device; nothing was left half-written"):
        quantize(tiny_folder, "rtn", fields={"bits": 4, "group_size": 32},
                 output=tmp_path / "out" / "art", store=store)
    assert list((tmp_path / "out").iterdir()) == []
    assert store.rows("runs")[0]["status"] == "failed" and store.rows("models") == []


def test_a_model_without_linear_layers_is_refused() -> None:
    from types import SimpleNamespace

    from torch import nn

    from openpto.pipeline.backends.torch_backend import decoder_linears

    class NoLinears(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(model_type="llama")
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([nn.LayerNorm(8), nn.LayerNorm(8)])

    with pytest.raises(UnsupportedModel, match="no Linear layers"):
        decoder_linears(NoLinears())
    with pytest.raises(UnsupportedModel, match="no architecture adapter for model type None"):
        decoder_linears(nn.Sequential(nn.ReLU()))


def test_backend_availability_reports_every_backend() -> None:
    from openpto.pipeline.backends import backend_availability

    report = backend_availability()
    assert set(report) == {"torch", "bitsandbytes", "quanto", "mlx"}
    assert report["torch"]["available"] is True
    for entry in report.values():
        assert isinstance(entry["available"], bool) and entry["reason"]


def test_mlx_backend_writes_a_folder_mlx_lm_runs(tiny_folder: Path, eval_file: Path,
                                                 tmp_path: Path) -> None:
    pytest.importorskip("mlx_lm")
    from mlx_lm import generate, load

    out = tmp_path / "mlx"
    result = quantize(tiny_folder, "rtn", fields={"bits": 4, "group_size": "auto",
                                                  "symmetric": False},
                      backend="mlx", output=out,
                      evaluation=EvalOptions(text=str(eval_file), seq_len=64),
                      store=Store(tmp_path / "d.db"))
    assert (result.format, result.group_size, result.symmetric) == ("mlx", 32, False)
    assert result.perplexity_after == pytest.approx(result.perplexity_before, rel=0.05)
    config = json.loads((out / "config.json").read_text())
    assert (config["quantization"]["group_size"], config["quantization"]["bits"]) == (32, 4)
    model, tok = load(str(out))
    text = generate(model, tok, prompt="def main():", max_tokens=8)
    assert isinstance(text, str) and len(tok.encode(text)) >= 1


def test_bitsandbytes_nf4_round_trip(tiny_folder: Path, eval_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from openpto.models import save_model
    from tests.helpers import tiny_llama, tiny_tokenizer

    with pytest.raises(ConfigError, match="divisible by 64; this model has 96"):
        quantize(tiny_folder, "nf4", backend="bitsandbytes", output=tmp_path / "no",
                 store=Store(tmp_path / "d.db"))
    folder = save_model(tiny_llama(seed=2), tiny_tokenizer(), tmp_path / "tiny64")
    out = tmp_path / "bnb"
    result = quantize(folder, "nf4", backend="bitsandbytes", output=out,
                      evaluation=EvalOptions(text=str(eval_file), seq_len=64),
                      store=Store(tmp_path / "d.db"))
    assert (result.format, result.group_size) == ("bitsandbytes", 64)
    assert result.perplexity_after == pytest.approx(result.perplexity_before, rel=0.05)
    reloaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(reloaded.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    ids = torch.arange(20).reshape(1, 20)
    with torch.no_grad():
        assert torch.isfinite(reloaded(ids).logits).all()


def test_other_backends_refuse_what_they_lack(tiny_folder: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "d.db")
    with pytest.raises(OptError, match="drop --sym"):
        quantize(tiny_folder, "rtn", fields={"bits": 4, "group_size": 32, "symmetric": True},
                 backend="mlx", output=tmp_path / "m", dry_run=True, store=store)
    with pytest.raises(ConfigError, match="pass --bits 8"):
        quantize(tiny_folder, "int8", fields={"bits": 4}, backend="bitsandbytes",
                 output=tmp_path / "b", dry_run=True, store=store)


def test_quanto_qint8_round_trip(tiny_folder: Path, eval_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("optimum.quanto")
    from openpto.models import load_model

    out = tmp_path / "quanto"
    result = quantize(tiny_folder, "rtn", fields={"bits": 8}, backend="quanto", output=out,
                      evaluation=EvalOptions(text=str(eval_file), seq_len=64),
                      store=Store(tmp_path / "d.db"))
    assert (result.format, result.group_size, result.symmetric) == ("quanto", None, True)
    assert result.perplexity_after == pytest.approx(result.perplexity_before, rel=0.01)
    assert json.loads((out / "openpto.json").read_text())["format"] == "quanto"
    reloaded = load_model(str(out))
    assert type(reloaded.model.model.layers[0].mlp.down_proj).__name__ == "QLinear"
    with torch.no_grad():
        assert torch.isfinite(reloaded.model(torch.arange(16).reshape(1, 16)).logits).all()


def test_the_config_given_is_the_config_run_and_stored(tiny_folder: Path, tmp_path: Path) -> None:
    """A GPTQ field set by the caller reaches the solve (a different damp gives different codes)
    and the run's stored config, and the artifact's openpto.json."""
    from safetensors.torch import load_file

    store = Store(tmp_path / "opt.db")
    weights = {}
    for damp in (0.01, 0.2):
        out = tmp_path / f"art-{damp}"
        result = quantize(tiny_folder, "gptq",
                          fields={"bits": 4, "group_size": 32, "damp": damp,
                                  "float_targets": False}, output=out, store=store)
        config = json.loads(_run(store, result.run_id)["config"])
        assert config["method_config"]["damp"] == damp
        assert config["resolved"]["config"] == {**GPTQConfig(
            bits=4, group_size=32, damp=damp, float_targets=False).to_dict()}
        assert json.loads((out / "openpto.json").read_text())["method_config"]["damp"] == damp
        weights[damp] = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight_packed"
    assert not torch.equal(weights[0.01][name], weights[0.2][name])


def test_a_loaded_model_is_quantized_in_place(tiny_folder: Path, tmp_path: Path) -> None:
    import openpto
    from openpto.models import load_model

    loaded = load_model(str(tiny_folder))
    before = loaded.model.model.layers[0].mlp.down_proj.weight.detach().clone()
    result = openpto.quantize(loaded, RTNConfig(bits=4, group_size=32),
                              QuantizeOptions(output=tmp_path / "art"),
                              store=Store(tmp_path / "d.db"))
    after = loaded.model.model.layers[0].mlp.down_proj.weight.detach()
    assert result.method == "rtn" and not torch.equal(before, after)
    assert torch.unique(after[0, :32]).numel() <= 16  # one group: at most 2^4 levels


def test_both_workflows_report_each_layer_through_progress(tiny_folder: Path,
                                                           tmp_path: Path) -> None:
    import openpto
    from openpto.core.sparsity import MagnitudeConfig
    from openpto.progress import LayerDone, ProgressEvent, RunFinished

    for name, run in (
        ("quantize", lambda cb: openpto.quantize(
            str(tiny_folder), RTNConfig(bits=4, group_size=32),
            QuantizeOptions(output=tmp_path / "q"), progress=cb, store=Store(tmp_path / "d.db"))),
        ("sparsify", lambda cb: openpto.sparsify(
            str(tiny_folder), MagnitudeConfig(sparsity=0.5),
            openpto.SparsifyOptions(output=tmp_path / "s"), progress=cb,
            store=Store(tmp_path / "d.db"))),
    ):
        events: list[ProgressEvent] = []
        result = run(events.append)
        layers = [e for e in events if isinstance(e, LayerDone)]
        assert [(e.index, e.total, e.name) for e in layers] == [
            (0, 2, "model.layers.0"), (1, 2, "model.layers.1")], name
        assert set(layers[0].error) == {"self_attn.q_proj", "self_attn.k_proj",
                                        "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                                        "mlp.up_proj", "mlp.down_proj"}
        assert all(0 <= v < 1 for v in layers[0].error.values())
        assert isinstance(events[-1], RunFinished) and events[-1].result == result.to_dict()


def test_float_dtype_option_sets_how_the_other_tensors_are_stored(tiny_folder: Path,
                                                                   tmp_path: Path) -> None:
    from safetensors import safe_open

    store = Store(tmp_path / "d.db")
    sizes = {}
    for float_dtype, expected in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        out = tmp_path / float_dtype
        fields = {"bits": 4, "group_size": 32}
        dry = quantize(tiny_folder, "rtn", fields=fields, output=out, dry_run=True,
                       float_dtype=float_dtype, store=store)
        real = quantize(tiny_folder, "rtn", fields=fields, output=out, float_dtype=float_dtype,
                        store=store)
        assert abs(dry.size_bytes_after - real.size_bytes_after) < 0.01 * real.size_bytes_after
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            assert f.get_tensor("model.embed_tokens.weight").dtype == expected
        sizes[float_dtype] = real.size_bytes_after
        run = json.loads(_run(store, real.run_id)["config"])
        assert run["float_dtype"] == float_dtype
    assert sizes["bfloat16"] < sizes["float32"]
