"""GPTQ as a measure: what the quantizer that follows a rotation makes of a weight.
Torch only.

FRTQ's objective and its guard judge a rotation by round-to-nearest; GPTQ, which
follows in every shipped recipe, then corrects each column's rounding error on the
columns after it (Frantar et al. 2022, OBQ's update): with ``H = X^T X`` the inputs'
Hessian, damped by ``damp * mean(diag H)``, and ``U`` the upper Cholesky factor of
``H^-1``, column ``j`` is rounded to ``q_j`` and

    W[:, j+1:] -= (w_j - q_j) / U_jj * U[j, j+1:]

``gptq`` is that loop as llm-compressor 0.14 runs it without activation ordering
(``modifiers/gptq/gptq_quantize.quantize_weight``; lazy updates in blocks of 128, the
same result), with the rounding left to the caller: a column's grid (its group's
scale) is fixed before the loop, from the original weights, as the observer fixes it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from gsr_plugin.learn.objectives import grid_of, round_to_grid

__all__ = ["gptq", "hessian", "grid_rounding"]


def hessian(x: Tensor) -> Tensor:
    """``2 X^T X / n`` of ``(n, d)`` inputs (llm-compressor's normalization; GPTQ's
    result does not depend on the scale)."""
    x = x.reshape(-1, x.shape[-1]).double()
    return 2 * x.T @ x / x.shape[0]


def gptq(
    w: Tensor, h: Tensor, round_columns: Callable[[Tensor, slice], Tensor], damp: float = 0.01, block: int = 128
) -> Tensor:
    """``w`` ``(rows, d)`` quantized by GPTQ against the Hessian ``h`` ``(d, d)``;
    ``round_columns(values, columns)`` rounds ``values`` ``(rows, n)``, the weights now
    in ``columns`` (a slice of ``0..d``), onto their grid. Returns the dequantized
    weights (float64). Columns no input reaches (``H_jj = 0``) are zeroed, as upstream."""
    w, h = w.double().clone(), h.double().clone()
    dead = torch.diagonal(h) == 0
    torch.diagonal(h)[dead] = 1.0
    w[:, dead] = 0.0
    torch.diagonal(h).add_(damp * torch.diagonal(h).mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    d = w.shape[1]
    q = torch.empty_like(w)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        w1, err = w[:, i1:i2].clone(), torch.empty(w.shape[0], i2 - i1, dtype=w.dtype)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q[:, i1 + i] = round_columns(w1[:, i:i + 1], slice(i1 + i, i1 + i + 1))[:, 0]
            err[:, i] = (w1[:, i] - q[:, i1 + i]) / u1[i, i]
            w1[:, i:] -= err[:, i:i + 1] * u1[i, i:].unsqueeze(0)
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return q


def grid_rounding(w: Tensor, bits: int, symmetric: bool, group_size: int | None) -> Callable[[Tensor, slice], Tensor]:
    """``round_columns`` for ``gptq`` on FRTQ's weight grid
    (``learn.objectives.grid_of``): one scale per row and ``group_size`` columns
    (None: per row), from the range of ``w`` as given (before GPTQ moves it)."""
    w = w.double()
    d = w.shape[1]
    width = group_size if group_size and d % group_size == 0 else d
    step, low = grid_of(w.reshape(w.shape[0], d // width, width), bits, symmetric)
    column_group = torch.arange(d) // width

    def round_columns(values: Tensor, columns: slice) -> Tensor:
        g = column_group[columns]
        return round_to_grid(values, step[:, g, 0], None if low is None else low[:, g, 0], bits)

    return round_columns
