"""Learnable orthogonal matrices and the block products FRTQ needs. Torch only.

A batch of ``m`` orthogonal ``k x k`` matrices is parameterized as
``Q_j = Q0_j expm(A_j - A_j^T)``: ``Q0`` is the initialization (e.g. GSR's Walsh
block), ``A`` starts at zero, and every value of ``A`` gives an orthogonal ``Q`` (the
exponential of a skew-symmetric matrix is a rotation), so plain gradient steps on
``A`` never leave the orthogonal group and zero steps return ``Q0`` exactly.

The residual-stream rotation R1 is ``blockdiag(Q_1, ..., Q_m)`` of width ``m k``
(``m = 1`` for one full-width matrix); the per-head rotation R2 of layer ``l`` is
``Q_l`` applied to every head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "OrthogonalMatrices",
    "rotate_inputs",
    "rotate_output_blocks",
    "block_diagonal",
    "orthogonality_error",
]


class OrthogonalMatrices(nn.Module):
    """``m`` orthogonal matrices ``Q0_j expm(A_j - A_j^T)`` with learnable ``A``.

    :param init: ``(m, k, k)`` orthogonal initial matrices (kept in float64)
    """

    def __init__(self, init: Tensor):
        super().__init__()
        if init.ndim != 3 or init.shape[-1] != init.shape[-2]:
            raise ValueError(f"init must be (m, k, k), got {tuple(init.shape)}")
        self.register_buffer("init", init.to(torch.float64))
        self.generator = nn.Parameter(torch.zeros_like(self.init, dtype=torch.float32))

    def matrices(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(m, k, k)``: in ``dtype``; float64 gives the matrices to fuse."""
        a = self.generator.to(dtype)
        skew = a - a.transpose(-1, -2)
        return self.init.to(dtype) @ torch.linalg.matrix_exp(skew)


def rotate_inputs(x: Tensor, blocks: Tensor) -> Tensor:
    """``x @ blockdiag(blocks)`` over the last dim: ``(..., m k) -> (..., m k)``."""
    m, k, _ = blocks.shape
    y = torch.einsum("...mi,mij->...mj", x.reshape(*x.shape[:-1], m, k), blocks)
    return y.reshape(x.shape)


def rotate_output_blocks(w: Tensor, blocks: Tensor, index: Tensor | None = None) -> Tensor:
    """Rows of ``blockdiag(blocks)^T @ W`` for the blocks ``index`` (all if None).

    ``W`` is ``(m k, n)`` (a linear's weight whose outputs are rotated); the result
    is ``(len(index) k, n)``: block ``j`` of rows is ``Q_j^T W_j``.
    """
    m, k, _ = blocks.shape
    w = w.reshape(m, k, w.shape[-1])
    if index is not None:
        w, blocks = w[index], blocks[index]
    return torch.einsum("bik,bin->bkn", blocks, w).reshape(-1, w.shape[-1])


def block_diagonal(blocks: Tensor) -> Tensor:
    """The dense ``(m k, m k)`` matrix ``blockdiag(blocks)``."""
    return torch.block_diag(*blocks.unbind(0))


def orthogonality_error(blocks: Tensor) -> float:
    """``max |Q Q^T - I|`` over the batch."""
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return float((blocks.detach() @ blocks.detach().transpose(-1, -2) - eye).abs().max())
