from __future__ import annotations

import pytest
import torch

from openpto.core.calibrate import (
    LinearReport,
    capture_layer_inputs,
    decoder_layers,
    find_linears,
    run_layer_sequential,
    run_linear_sequential,
)
from openpto.core.hessian import HessianAccumulator, inverse_cholesky
from tests.helpers import tiny_llama


class RecordingCompressor:
    """Rounds every weight to one decimal and records the inputs each layer saw."""

    def __init__(self) -> None:
        self.inputs: dict[int, list[torch.Tensor]] = {}

    def compress_layer(self, index, prefix, layer, run_layer):  # type: ignore[no-untyped-def]
        seen: list[torch.Tensor] = []
        handle = layer.register_forward_pre_hook(
            lambda m, args, kw: seen.append(args[0]), with_kwargs=True
        )
        run_layer()
        handle.remove()
        self.inputs[index] = seen
        reports = []
        for name, linear in find_linears(layer).items():
            linear.weight.data = torch.round(linear.weight.data * 10) / 10
            reports.append(LinearReport(index, f"{prefix}.{name}", 0.0, 0.0))
        return reports


def test_layer_sequential_feeds_compressed_outputs_forward() -> None:
    model = tiny_llama(num_hidden_layers=3)
    reference = tiny_llama(num_hidden_layers=3)
    calib = torch.randint(0, 512, (5, 16), generator=torch.Generator().manual_seed(0))
    compressor = RecordingCompressor()
    events = []
    reports = run_layer_sequential(model, calib, compressor, batch_size=2, on_layer=events.append)
    assert [e.index for e in events] == [0, 1, 2]
    assert len(reports) == 3 * 7
    assert reports[0].name.startswith("model.layers.0.")
    # The inputs each layer saw equal the hidden states of the fully compressed model.
    with torch.no_grad():
        out = model(calib, output_hidden_states=True)
    for index in range(3):
        seen = torch.cat(compressor.inputs[index])
        torch.testing.assert_close(seen, out.hidden_states[index], rtol=1e-5, atol=1e-5)
    # And the compression really happened (weights differ from the untouched twin).
    ours, theirs = model.model.layers[0].mlp.up_proj, reference.model.layers[0].mlp.up_proj
    assert not torch.equal(ours.weight, theirs.weight)


def test_capture_matches_embeddings() -> None:
    model = tiny_llama()
    calib = torch.randint(0, 512, (3, 8))
    hidden, kwargs = capture_layer_inputs(model, calib, torch.device("cpu"), batch_size=2)
    assert [h.shape[0] for h in hidden] == [2, 1]
    torch.testing.assert_close(torch.cat(hidden), model.model.embed_tokens(calib))
    assert "position_embeddings" in kwargs[0]
    assert decoder_layers(model)[0] == "model.layers"


def test_hessian_matches_float64_reference() -> None:
    torch.manual_seed(0)
    xs = [torch.randn(4, 7, 16) for _ in range(3)]
    acc = HessianAccumulator(16)
    for x in xs:
        acc.add_batch(x)
    flat = torch.cat([x.reshape(-1, 16) for x in xs]).double()
    expected = 2 * flat.T @ flat / flat.shape[0]
    torch.testing.assert_close(acc.H.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc.column_norms().double(), flat.norm(dim=0), rtol=1e-5, atol=1e-6)


def test_inverse_cholesky_handles_dead_and_singular_columns() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 16)  # fewer tokens than columns: H is singular
    x[:, 3] = 0  # a dead input
    acc = HessianAccumulator(16)
    acc.add_batch(x)
    factor = inverse_cholesky(acc.H, damp=0.01)
    assert factor.dead.nonzero().flatten().tolist() == [3]
    H = acc.H.clone().double()
    H[3, 3] = 1
    H += factor.damp * H.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    inverse = factor.upper.double().T @ factor.upper.double()
    torch.testing.assert_close(inverse, torch.linalg.inv(H), rtol=1e-3, atol=1e-3)


class FailingAt:
    """A layer compressor and a group compressor that round like ``RecordingCompressor`` until
    decoder layer ``index``, where they raise."""

    def __init__(self, index: int) -> None:
        self.index = index

    def compress_layer(self, index, prefix, layer, run_layer):  # type: ignore[no-untyped-def]
        if index == self.index:
            raise RuntimeError(f"layer {index} failed")
        return RecordingCompressor().compress_layer(index, prefix, layer, run_layer)

    def compress_group(self, index, prefix, linears, inputs, clock, float_inputs=None):  # type: ignore[no-untyped-def]
        if index == self.index:
            raise RuntimeError(f"layer {index} failed")
        return []


@pytest.mark.parametrize("driver", [run_layer_sequential, run_linear_sequential])
def test_a_failing_layer_leaves_the_model_as_it_was_set(driver) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama(num_hidden_layers=3)
    model.train()
    calib = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="layer 1 failed"):
        driver(model, calib, FailingAt(1))
    # The training flag the drivers switched off is restored, down to every submodule.
    assert model.training and all(m.training for m in model.modules())


def test_wrong_input_groups_in_an_adapter_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from openpto.architectures import architecture
    from openpto.core import calibrate
    from openpto.errors import UnsupportedModel
    from tests.helpers import RoundingCompressor

    # q/k/v and o in one group: o_proj reads the attention output, not the norm's.
    llama = architecture("llama")
    wrong = dataclasses.replace(llama, input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        *llama.input_groups[2:],
    ))
    monkeypatch.setattr(calibrate, "architecture_of", lambda model: wrong)
    model = tiny_llama()
    with pytest.raises(UnsupportedModel, match=r"model.layers.0.self_attn.o_proj does not read "
                                               r"the input of its group"):
        run_linear_sequential(model, torch.randint(0, 512, (2, 8)), RoundingCompressor())
