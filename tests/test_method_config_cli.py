"""``--config FILE``, ``--set FIELD=VALUE`` and ``--show-config`` on opt quantize and opt
sparsify: every field reachable, values parsed by their declared type, one clear line for each
mistake, and the field set is the field that runs and is stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openpto.store import Store
from tests.helpers import run_opt


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openpto.models import save_model
    from tests.helpers import tiny_llama, tiny_tokenizer

    return save_model(tiny_llama(seed=11), tiny_tokenizer(), tmp_path_factory.mktemp("tiny"))


FAST = ["--samples", "4", "--calib-seq-len", "32"]


def test_set_damp_changes_the_solve_and_the_stored_config(
    tiny_folder: Path, tmp_path: Path, tmp_db: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from safetensors.torch import load_file

    packed = {}
    for damp in ("0.01", "0.02"):
        out = tmp_path / f"art-{damp}"
        code, stdout, err = run_opt(
            ["quantize", str(tiny_folder), "--method", "gptq", "--group-size", "32", *FAST,
             "--set", f"damp={damp}", "--output", str(out), "--json"], capsys, monkeypatch)
        assert code == 0, err
        run_id = json.loads(stdout)["run_id"]
        (run,) = Store().rows("runs", "id = ?", [run_id])
        stored = json.loads(run["config"])
        assert stored["method_config"]["damp"] == float(damp)
        assert stored["resolved"]["config"]["damp"] == float(damp)
        packed[damp] = load_file(str(out / "model.safetensors"))
    # The solve used it: the dampening changes GPTQ's codes somewhere.
    assert any(not torch.equal(packed["0.01"][k], packed["0.02"][k])
               for k in packed["0.01"] if k.endswith("weight_packed"))


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_config_file_then_set_in_that_order(suffix: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / f"gptq{suffix}"
    if suffix == ".toml":
        path.write_text('damp = 0.05\nact_order = false\nstatic_groups = false\n'
                        'block_size = 64\ngroup_size = 64\n')
    else:
        path.write_text(json.dumps({"type": "gptq", "damp": 0.05, "act_order": False,
                                    "static_groups": False, "block_size": 64,
                                    "group_size": 64}))
    code, stdout, err = run_opt(
        ["quantize", "--method", "gptq", "--group-size", "128", "--config", str(path),
         "--set", "damp=0.03", "--set", "float_target_samples=16", "--set", "bits=3",
         "--show-config", "--json"], capsys, monkeypatch)
    assert code == 0, err
    shown = json.loads(stdout)
    config = shown["config"]
    # flags < file < --set
    assert (config["damp"], config["group_size"], config["block_size"]) == (0.03, 64, 64)
    assert (config["act_order"], config["float_target_samples"], config["bits"]) == (
        False, 16, 3)
    assert config["symmetric"] is False  # the backend's default below 8 bits
    fields = {f["name"]: f for f in shown["fields"]}
    assert fields["damp"]["value"] == 0.03 and fields["damp"]["default"] == 0.01
    assert fields["damp"]["type"] == "float" and "Hessian" in fields["damp"]["help"]
    assert fields["float_target_samples"]["type"] == "int | None"


def test_show_config_prints_every_field_with_its_description(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from openpto.config import describe_config
    from openpto.core.sparsity import SparseGPTConfig

    code, stdout, err = run_opt(["sparsify", "--method", "sparsegpt", "--pattern", "2:4",
                                 "--set", "bits=4", "--show-config"], capsys, monkeypatch)
    assert code == 0, err
    for info in describe_config(SparseGPTConfig):
        assert info.name in stdout
    assert "OBS" in stdout or "SparseGPT" in stdout
    code, stdout, _ = run_opt(["quantize", "--method", "rtn", "--bits", "8", "--show-config",
                               "--json"], capsys, monkeypatch)
    assert code == 0
    config = json.loads(stdout)["config"]
    assert (config["type"], config["group_size"], config["symmetric"]) == ("rtn", "auto", True)


def test_set_values_parse_by_the_declared_type(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    code, stdout, err = run_opt(
        ["quantize", "--method", "gptq", "--set", "group_size=None", "--set", "act_order=no",
         "--set", "static_groups=false", "--set", "calib_dtype=float32",
         "--set", "float_target_samples=none", "--show-config", "--json"], capsys, monkeypatch)
    assert code == 0, err
    config = json.loads(stdout)["config"]
    assert config["group_size"] is None and config["act_order"] is False
    assert config["calib_dtype"] == "float32" and config["float_target_samples"] is None
    code, stdout, err = run_opt(["sparsify", "--method", "magnitude", "--set", "sparsity=0.25",
                                 "--set", "scope=row", "--show-config", "--json"],
                                capsys, monkeypatch)
    assert code == 0, err
    config = json.loads(stdout)["config"]
    assert (config["sparsity"], config["scope"]) == (0.25, "row")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["quantize", "--method", "gptq", "--set", "dampx=0.1"],
         "the gptq config has no field 'dampx'"),
        (["quantize", "--method", "gptq", "--set", "damp=much"],
         "the gptq config's field 'damp' takes float"),
        (["quantize", "--method", "gptq", "--set", "act_order=maybe"],
         "the gptq config's field 'act_order' takes bool"),
        (["quantize", "--method", "gptq", "--set", "block_size=1.5"],
         "the gptq config's field 'block_size' takes int"),
        (["quantize", "--method", "gptq", "--set", "damp"], "--set takes FIELD=VALUE"),
        (["quantize", "--method", "gptq", "--set", "damp=2"],
         "the gptq config: damp must be in (0, 1), got 2.0"),
        (["quantize", "--method", "rtn", "--float-targets"],
         "the rtn config has no field 'float_targets'"),
        (["quantize", "--method", "nope"], "unknown quantization method 'nope'"),
        (["sparsify", "--method", "wanda", "--set", "bits=4"],
         "the wanda config has no field 'bits'"),
        (["sparsify", "--method", "sparsegpt", "--set", "damp=0"],
         "the sparsegpt config: damp must be in (0, 1)"),
        (["sparsify", "--method", "wanda", "--sparsity", "0.5", "--set", "pattern=2:4"],
         "not both"),
    ],
)
def test_each_mistake_is_one_line_and_exit_2(args: list[str], message: str, tmp_db: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    code, stdout, err = run_opt([*args, "--json"], capsys, monkeypatch)
    assert code == 2 and stdout == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and message in line, line


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.toml", "damp = [", "is not valid TOML"),
        ("bad.json", "{damp: 1}", "is not valid JSON"),
        ("list.json", "[1, 2]", "must hold a table of fields"),
        ("awq.json", '{"type": "awq", "grid": 4}', "is for 'awq', not the gptq config"),
        ("unknown.toml", "dampening = 0.1", "the gptq config has no field 'dampening'"),
        ("wrong.json", '{"damp": "lots"}', "the gptq config's field 'damp' takes float"),
    ],
)
def test_bad_config_files_are_one_line(name: str, text: str, message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / name
    path.write_text(text)
    code, stdout, err = run_opt(["quantize", "--method", "gptq", "--config", str(path),
                                 "--show-config"], capsys, monkeypatch)
    assert code == 2 and stdout == ""
    (line,) = err.strip().splitlines()
    assert message in line, line
    code, _, err = run_opt(["quantize", "--method", "gptq", "--config",
                            str(tmp_path / "missing.toml"), "--show-config"], capsys, monkeypatch)
    assert code == 2 and "cannot read the config file" in err
