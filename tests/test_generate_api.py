"""The public generation and profiling workflows: ``pipeline.generate.generate`` (an iterator of
``StepRecord``s, recorded as a run) and ``pipeline.profile.profile`` (a ``ProfileResult``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openpto.core.generate import generate_text
from openpto.core.sampling import SamplingParams
from openpto.core.steps import StepRecord
from openpto.errors import UsageError
from openpto.pipeline.generate import GenerationConfig, SpeculativeConfig, generate
from openpto.pipeline.profile import ProfileConfig, profile
from openpto.store import Store
from tests.helpers import one_thread, tiny_tokenizer
from tests.test_generate import PROMPTS, lively_llama


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("api-generate")
    lively_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(folder: Path):  # type: ignore[no-untyped-def]
    from openpto.models import load_model

    return load_model(str(folder))


def test_generate_streams_records_and_records_the_run(folder, loaded, tmp_db, capsys) -> None:  # type: ignore[no-untyped-def]
    config = GenerationConfig(prompt=PROMPTS[1], max_new_tokens=12, chat=False)
    stream = generate(str(folder), config)
    assert stream.run_id is None  # nothing runs before the first record is asked for
    records = list(stream)
    assert all(isinstance(r, StepRecord) for r in records) and stream.run_id
    expected = generate_text(loaded.model, loaded.tokenizer, PROMPTS[1],
                             SamplingParams(max_tokens=12))
    assert [r.token_id for r in records] == expected.token_ids
    assert "".join(r.text for r in records) == expected.text
    assert all(r.memory_bytes and r.memory_bytes > 2**20 for r in records)  # process RSS
    result = stream.result().to_dict()
    assert result["text"] == expected.text and result["tokens"] == 12
    assert result["finish_reason"] == "length" and result["run_id"] == stream.run_id
    assert result["tokens_per_second"] > 0 and result["backend"] == "torch"
    store = Store(tmp_db)
    (run,) = store.rows("runs", "id = ?", [stream.run_id])
    assert run["status"] == "succeeded" and run["kind"] == "generate"
    stored = json.loads(run["config"])
    assert stored["prompt"] == PROMPTS[1] and stored["max_new_tokens"] == 12
    names = {m["name"] for m in store.rows("metrics", "run_id = ?", [stream.run_id])}
    assert names == {"tokens_per_second", "ttft_ms", "tokens"}
    captured = capsys.readouterr()
    # Silent without progress= (transformers' own weight-loading bar aside).
    assert captured.out == "" and str(folder) not in captured.err


def test_a_loaded_model_and_an_early_stop(loaded, tmp_db) -> None:  # type: ignore[no-untyped-def]
    stream = generate(loaded, GenerationConfig(prompt=PROMPTS[0], max_new_tokens=50))
    first = [next(stream) for _ in range(3)]
    stream.close()
    result = stream.result()
    assert result.finish_reason == "cancelled" and result.token_ids == [r.token_id for r in first]
    (run,) = Store(tmp_db).rows("runs", "id = ?", [result.run_id])
    assert run["status"] == "succeeded" and run["model"] == loaded.name
    (trace,) = Store(tmp_db).rows("traces", "run_id = ? and name = 'generate'", [result.run_id])
    assert json.loads(trace["attributes"])["finish_reason"] == "cancelled"


def test_bad_configs_are_one_clear_error(loaded) -> None:  # type: ignore[no-untyped-def]
    for kwargs, fragment in [({"top_p": 1.5}, "top_p"), ({"max_new_tokens": 0}, "max_tokens"),
                             ({"decode": "fast"}, "decode"), ({"temperature": -1}, "temperature")]:
        with pytest.raises(UsageError, match=fragment):
            GenerationConfig(prompt="x", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="gamma"):
        SpeculativeConfig(prompt="x", gamma=0)
    with pytest.raises(UsageError, match="MODEL spec"):
        generate(loaded, GenerationConfig(prompt="x", backend="mlx"))
    assert GenerationConfig(stop="ab").stop == ("ab",)  # type: ignore[arg-type]
    assert GenerationConfig(stop=("a",)).to_dict()["stop"] == ["a"]


def test_a_failed_generation_leaves_a_failed_run(tmp_db, tmp_path) -> None:  # type: ignore[no-untyped-def]
    stream = generate(str(tmp_path / "missing"), GenerationConfig(prompt="x"))
    with pytest.raises(Exception, match="missing"):
        list(stream)
    (run,) = Store(tmp_db).rows("runs", "kind = 'generate'")
    assert run["status"] == "failed" and "missing" in run["error"]


def test_profile_returns_the_profile_keys(loaded, tmp_db) -> None:  # type: ignore[no-untyped-def]
    result = profile(loaded, ProfileConfig(prompt_len=8, gen_len=4, repeats=1, warmup=0))
    out = result.to_dict()
    for key in ("ttft_ms", "tpot_ms", "prefill_tokens_per_second", "decode_tokens_per_second",
                "peak_memory_bytes", "device", "run_id", "model"):
        assert key in out
    assert out["model"] == loaded.name and out["setup"]["decode"] == "auto"
    (run,) = Store(tmp_db).rows("runs", "id = ?", [out["run_id"]])
    assert run["kind"] == "profile" and json.loads(run["config"])["gen_len"] == 4
    with pytest.raises(UsageError, match="gen_len"):
        ProfileConfig(gen_len=1)


def test_speculative_runs_on_the_public_config(loaded, tmp_db) -> None:  # type: ignore[no-untyped-def]
    from openpto.pipeline.generate import speculative

    config = SpeculativeConfig(prompt=PROMPTS[1], max_new_tokens=16, chat=False, draft="lookup")
    seen: list[StepRecord] = []
    result = speculative(loaded, config, on_record=seen.append).to_dict()
    plain = generate_text(loaded.model, loaded.tokenizer, PROMPTS[1],
                          SamplingParams(max_tokens=16))
    assert result["text"] == plain.text == "".join(r.text for r in seen)
    assert result["identical_to_target"] is True and result["speedup"] > 0
    assert {"draft_acceptance_rate", "mean_acceptance_length", "run_id"} <= set(result)


def test_the_last_event_carries_each_workflow_result(folder, tmp_db) -> None:  # type: ignore[no-untyped-def]
    from openpto.progress import RunFinished

    events: list = []
    stream = generate(str(folder), GenerationConfig(prompt=PROMPTS[0], max_new_tokens=5,
                                                    chat=False), progress=events.append)
    list(stream)
    last = events[-1]
    assert isinstance(last, RunFinished) and last.run_id == stream.run_id
    assert last.result == json.loads(json.dumps(stream.result().to_dict()))

    events.clear()
    profiled = profile(str(folder), ProfileConfig(prompt_len=8, gen_len=4, repeats=1, warmup=0),
                       progress=events.append)
    last = events[-1]
    assert isinstance(last, RunFinished) and last.run_id == profiled.run_id
    assert last.result is not None
    assert last.result["decode_tokens_per_second"] == profiled.decode_tokens_per_second
