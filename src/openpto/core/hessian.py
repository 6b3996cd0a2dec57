"""The second-order machinery that GPTQ and SparseGPT share.

Both minimise ``||W X - W' X||^2`` for one Linear, whose Hessian with respect to a row of ``W`` is
``H = 2 X X^T`` accumulated over the calibration tokens. Both then need the upper Cholesky factor
of ``H^-1``; dampening is relative to the mean diagonal, as in the GPTQ paper, and retried upward
when the factorisation fails (near-singular ``H`` from few tokens or dead inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openpto.errors import OptError

#: rows of H per product: narrower strips skip more of the lower triangle; at 256 the products
#: are still wide enough to run at full matmul speed.
_STRIP = 256


class HessianAccumulator:
    """Running ``2/n * sum(x x^T)`` in float32 over every token seen by one Linear.

    ``dtype=torch.bfloat16`` rounds the inputs to bfloat16 for the product, and the product
    itself comes back rounded to bfloat16 (a relative error up to 2^-9 per entry; torch has no
    float32-output bfloat16 matmul on the CPU): 54 instead of 105 CPU-s of Hessians for the default
    model's GPTQ on a CPU with AVX512-BF16 (docs/benchmarks.md), but
    it can leave ``H`` indefinite (see ``hessian_of``). ``H`` itself always stays float32.
    """

    def __init__(
        self,
        columns: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.columns = columns
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.dtype = dtype
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.columns).to(device=self.H.device, dtype=self.dtype)
        new = x.shape[0]
        if new == 0:
            return
        # Rescale the running mean before adding, so H never overflows however many tokens arrive.
        self.H.mul_(self.tokens / (self.tokens + new))
        self.tokens += new
        alpha = 2.0 / self.tokens
        # H is symmetric: only the strips on and above the diagonal are multiplied (58 % of the
        # work at 1536 columns, 70 % at 576), then mirrored.
        for i in range(0, self.columns, _STRIP):
            strip = self.H[i : i + _STRIP, i:]
            if self.dtype == torch.float32:
                strip.addmm_(x[:, i : i + _STRIP].t(), x[:, i:], alpha=alpha)
            else:
                strip.add_(x[:, i : i + _STRIP].t() @ x[:, i:], alpha=alpha)
        self.H.copy_(torch.triu(self.H) + torch.triu(self.H, 1).mT)

    def column_norms(self) -> torch.Tensor:
        """``||X_j||_2`` over all tokens for each input column (what Wanda scores with)."""
        return (self.H.diagonal() * self.tokens / 2.0).clamp_min(0).sqrt()


@dataclass
class InverseFactor:
    """Upper Cholesky factor of the damped ``H^-1`` and how it was obtained."""

    upper: torch.Tensor
    damp: float
    dead: torch.Tensor  # bool [columns]: inputs that were always zero


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    return H.diagonal() == 0


def _revived(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``H`` with a unit diagonal on its dead columns, and those columns."""
    H = H.clone()
    dead = dead_columns(H)
    H[dead, dead] = 1.0
    return H, dead


def inverse_cholesky(H: torch.Tensor, damp: float = 0.01, max_tries: int = 6) -> InverseFactor:
    """Damp ``H`` and return the upper Cholesky factor of its inverse.

    Dead columns (zero diagonal: the input never fired) get a unit diagonal so the factorisation
    exists; callers zero the matching weight columns, which cannot affect the output anyway.
    """
    H, dead = _revived(H)
    mean_diag = H.diagonal().mean().item()
    eye = torch.arange(H.shape[0], device=H.device)
    current = damp
    for _ in range(max_tries):
        damped = H.clone()
        damped[eye, eye] += current * mean_diag
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info.item()) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info.item()) == 0:
                return InverseFactor(upper=upper, damp=current, dead=dead)
        current *= 10.0
    raise OptError(
        f"the Hessian stayed singular after dampening up to {current / 10:g} x its mean diagonal; "
        "use more or longer calibration samples"
    )


def input_shift(float_x: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``D = 2/n * sum((x_float - x) x^T)`` in float32 over the ``n`` tokens of two inputs of one
    Linear (float model and compressed model), scaled like ``HessianAccumulator.H``.

    The difference is taken before the product: ``x_float x^T - x x^T`` would cancel two nearly
    equal matrices and keep mostly their rounding (in bfloat16, about 2^-8 of H per entry, enough
    to wreck a refit through ``H^-1``). ``dtype`` is that of the product, as in the accumulator.
    """
    columns = x.shape[-1]
    x = x.reshape(-1, columns)
    shift = float_x.reshape(-1, columns).to(device=x.device, dtype=torch.float32) - x.float()
    return (shift.to(dtype).t() @ x.to(dtype)).float().mul_(2.0 / x.shape[0])


#: how much of the dampening bfloat16 rounding of ``H`` may use up (see ``hessian_of``)
_ROUNDING_SHARE = 0.1


def factorizes(H: torch.Tensor, damp: float) -> bool:
    """Whether ``H``, dampened by ``damp`` x its mean diagonal (dead columns set to one, as
    ``inverse_cholesky`` does), has a Cholesky factor."""
    H, _ = _revived(H)
    H.diagonal().add_(damp * H.diagonal().mean())
    return int(torch.linalg.cholesky_ex(H)[1].item()) == 0


def hessian_of(
    x: torch.Tensor, device: torch.device | str, dtype: torch.dtype, damp: float
) -> HessianAccumulator:
    """The Hessian of the inputs ``x`` of one Linear, with products in ``dtype`` where that is
    safe and in float32 where it is not.

    Rounding every entry of ``H`` to bfloat16 is harmless for most Linears, but where one
    direction carries most of the inputs' energy (the attention outputs that ``o_proj`` reads)
    the errors, about 2^-9 of the entries that direction inflates, swamp the smallest
    eigenvalues: measured on the default model with
    128 x 512 tokens, ``o_proj`` of layer 0 had a smallest eigenvalue of -0.19 x the mean
    diagonal in bfloat16 against +2.0e-4 exactly, and GPTQ had to dampen 100x more. So when the
    bfloat16 ``H`` does not factor at a tenth of the requested dampening, it is recomputed in
    float32 (exact inputs, float32 sums): a few Linears per model (25 of 210 on the default
    model). A tenth, not all of it: an ``H`` that factors only thanks to most of the dampening
    still has rounding-made negative eigenvalues, which the float-target refit divides by
    (measured: weights changed by 172 % in one layer, perplexity 19.823 instead of 18.289).
    """
    hessian = HessianAccumulator(x.shape[-1], device, dtype)
    hessian.add_batch(x)
    if dtype != torch.float32 and not factorizes(hessian.H, damp * _ROUNDING_SHARE):
        hessian = HessianAccumulator(x.shape[-1], device, torch.float32)
        hessian.add_batch(x)
    return hessian


def refit_to_float_outputs(
    w: torch.Tensor, H: torch.Tensor, shift: torch.Tensor, damp: float
) -> torch.Tensor | None:
    """The weights that best give the float model's outputs from the compressed model's inputs:
    ``argmin_V ||W X_f - V X||^2 + lam ||V - W||^2 = W + W D (H + lam I)^-1``, with
    ``H = 2 X X^T / n``, ``D = 2 (X_f - X) X^T / n`` (``input_shift``) and
    ``lam = damp * mean(diag H)``.

    The ridge pulls towards ``W`` rather than towards zero, so where the inputs already match
    (``D = 0``, as in the first Linears) ``W`` comes back exactly; directions the calibration
    tokens barely reach keep their original weights.

    None when ``H + lam I`` has no Cholesky factor (``H`` indefinite beyond ``lam``; ``hessian_of``
    avoids that for rounding): the caller keeps ``W`` and reports the refit as not made.
    """
    H, _ = _revived(H)
    lam = damp * H.diagonal().mean()
    H.diagonal().add_(lam)
    lower, info = torch.linalg.cholesky_ex(H)
    if int(info.item()) != 0:
        return None
    return w + torch.cholesky_solve((w @ shift).t(), lower).t()
