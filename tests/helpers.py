"""Tiny random models and a tiny real tokenizer for unit tests (seconds, no network)."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from openpto.core.threads import intra_op_threads

if TYPE_CHECKING:
    import pytest


def one_thread() -> contextlib.AbstractContextManager[None]:
    """Torch on one intra-op thread: tiny models gain nothing from more, and on a busy shared CPU
    two threads waiting on each other make every forward pass many times slower."""
    return intra_op_threads(1)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = "\n".join(list(topics.values())[:40])
    tok.train_from_iterator([text], trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():  # type: ignore[no-untyped-def]
    """A real byte-level BPE tokenizer (vocab 512) trained on Python's docs."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def tiny_llama(
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):  # type: ignore[no-untyped-def]
    """A randomly initialised LlamaForCausalLM small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    return model


@contextlib.contextmanager
def registered_plugin(plugin: object, name: str) -> Iterator[None]:
    """``plugin`` (an object with ``@hookimpl`` methods) on the real plugin manager for the
    block: the registries refill with its entries, and without them afterwards."""
    from openpto.plugins import load_plugins, pm

    load_plugins()  # the built-ins first, so they keep their names
    pm.register(plugin, name)
    try:
        yield
    finally:
        pm.unregister(name=name)


def run_opt(args: list[str], capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """The real ``opt`` entry point in this process: exit code, stdout, stderr."""
    import signal

    from openpto.cli.main import run

    monkeypatch.setattr(sys, "argv", ["opt", *args])
    capsys.readouterr()
    # The entry point owns its process's stop signals (it ignores them while it exits); give
    # the test process its own back.
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    out, err = capsys.readouterr()
    return code, out, err


def linear_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every Linear's input when ``model`` runs on ``ids``, by module name."""
    from openpto.core.calibrate import find_linears

    captured: dict[str, torch.Tensor] = {}
    handles = [
        linear.register_forward_pre_hook(
            lambda m, args, name=name: captured.__setitem__(name, args[0].detach())
        )
        for name, linear in find_linears(model).items()
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def quantized_logit_error(base: torch.nn.Module, config: object, calib: torch.Tensor | None,
                          ids: torch.Tensor) -> float:
    """Relative L2 error of the logits on ``ids`` after quantizing a copy of ``base``."""
    import copy

    from openpto.api import quantize_

    with torch.no_grad():
        reference = base(ids).logits
    model = copy.deepcopy(base)
    quantize_(model, config, calib)  # type: ignore[arg-type]
    with torch.no_grad():
        return float((model(ids).logits - reference).norm() / reference.norm())


class RoundingCompressor:
    """A ``LinearGroupCompressor`` for driver tests: rounds each group's weights to one decimal
    and keeps, per Linear, the inputs (and float-model inputs) it was handed."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.inputs: dict[str, torch.Tensor] = {}
        self.float_inputs: dict[str, torch.Tensor] = {}

    def compress_group(self, index, prefix, linears, inputs, clock, float_inputs=None):  # type: ignore[no-untyped-def]
        from openpto.core.calibrate import LinearReport

        self.groups.append(list(linears))
        reports = []
        for name, linear in linears.items():
            self.inputs[f"{prefix}.{name}"] = inputs.detach().clone()
            if float_inputs is not None:
                self.float_inputs[f"{prefix}.{name}"] = float_inputs.detach().clone()
            linear.weight.data = torch.round(linear.weight.data * 10) / 10
            reports.append(LinearReport(index, f"{prefix}.{name}", 0.0, 0.0))
        return reports
