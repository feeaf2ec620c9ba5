"""The low-rank path: ``W = L R + E`` with ``L`` (out x r) and ``R`` (r x in) kept in
16-bit and only the residual ``E`` quantized, so ``y = Q(E) x + L (R x)``. Torch only.

* ``svd``: ``L R`` is the rank-r truncated SVD of ``W`` (FRTQ's split): the ``r``
  directions of largest energy stay exact.
* ``activation``: ``L R`` minimizes the layer's output error on calibration inputs,
  ``||(W - L R) X||_F``, as SVD-LLM and QERA do. With ``H = X X^T = S S`` (``S`` its
  symmetric square root, damped like GPTQ's Hessian), ``||(W - M) X||_F = ||(W - M) S||_F``,
  so ``M = [W S]_r S^{-1}``: the truncated SVD of ``W S`` mapped back.

The factors split the singular values evenly (``L = U sqrt(s)``, ``R = sqrt(s) V^T``) so
neither is large in 16-bit, and are rounded to ``dtype`` before the residual is taken:
``E + L R = W`` holds to float rounding with the stored factors.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["truncated_svd", "activation_aware", "low_rank_split", "DAMPING"]

DAMPING = 0.01  # of the mean diagonal of H, as GPTQ's default dampening


def _top_split(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(U_r sqrt(s_r), sqrt(s_r) V_r^T) of the top ``rank`` singular triplets of a
    float64 ``matrix``, from the eigendecomposition of its smaller Gram matrix (an
    ``eigh`` of min(out, in) squared: several times faster than a full SVD on CPU)."""
    wide = matrix.shape[0] < matrix.shape[1]
    gram = matrix @ matrix.T if wide else matrix.T @ matrix
    eigenvalues, vectors = torch.linalg.eigh(gram)
    top = vectors[:, -rank:].flip(-1)  # eigh sorts ascending
    s = eigenvalues[-rank:].flip(-1).clamp_min(0).sqrt()
    root = s.sqrt().clamp_min(1e-300)
    if wide:  # top = U_r; V_r^T = S_r^-1 U_r^T W
        return top * root, (top.T @ matrix) / root[:, None]
    return (matrix @ top) / root, root[:, None] * top.T  # top = V_r; U_r S_r = W V_r


def truncated_svd(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(L, R) in float64 with ``L R`` the best rank-``rank`` approximation of ``weight``."""
    return _top_split(weight.double(), rank)


def activation_aware(weight: Tensor, hessian: Tensor, rank: int, damping: float = DAMPING) -> tuple[Tensor, Tensor]:
    """(L, R) in float64 minimizing ``||(W - L R) X||_F`` given ``hessian = X X^T``
    (``in x in``, any positive scale)."""
    h = hessian.double()
    h = h + damping * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    eigenvalues, vectors = torch.linalg.eigh(h)
    eigenvalues = eigenvalues.clamp_min(eigenvalues.max() * 1e-12)
    root = (vectors * eigenvalues.sqrt()) @ vectors.T
    inverse_root = (vectors / eigenvalues.sqrt()) @ vectors.T
    left, right = _top_split(weight.double() @ root, rank)
    return left, right @ inverse_root


def low_rank_split(weight: Tensor, rank: int, hessian: Tensor | None = None, dtype: torch.dtype = torch.float16):
    """(L, R, E): factors rounded to ``dtype`` and the residual ``E = W - L R`` (in
    ``weight``'s dtype, computed in float64). ``hessian`` None: plain truncated SVD."""
    left, right = truncated_svd(weight, rank) if hessian is None else activation_aware(weight, hessian, rank)
    left, right = left.to(dtype), right.to(dtype)
    residual = (weight.double() - left.double() @ right.double()).to(weight.dtype)
    return left, right, residual
