"""FRTQ's objective: the grid-to-standard-deviation ratio of what gets quantized, and
its smooth surrogates. Torch only.

A vector ``x`` of ``n`` values quantized to ``b`` bits with one scale has the grid step

* symmetric:  ``step = 2 max|x| / (2^b - 1)``
* asymmetric: ``step = (max x - min x) / (2^b - 1)``

and the *grid-to-std ratio* ``rho = step / std(x)`` (population std over the ``n``
values). The rounding error of a uniform grid is about ``step / sqrt(12)`` per value,
so ``rho / sqrt(12)`` is the relative quantization error: a rotation that flattens the
outliers of ``x`` lowers ``max`` at a fixed ``std`` (orthogonal maps keep the energy)
and so lowers ``rho``. ``rho`` does not depend on the scale of ``x``, so a per-token
RMSNorm in front of the quantizer does not change it.

The same definition serves both things FRTQ quantizes: activation tokens (one scale per
token: the vector is the token) and weight groups (one scale per ``group_size`` inputs
of an output row). The max is replaced by a smooth surrogate for learning:

* ``logsumexp``: ``max z ~ log(sum exp(s z)) / s`` on the standardized vector ``z``
  (an upper bound, tight within ``log(n) / s``);
* ``pnorm``: ``max |z| ~ ||z||_p`` (an upper bound, tight within a factor ``n^(1/p)``).

``exact`` uses the true max (for reporting).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["SmoothMax", "grid_to_std_ratio", "clipped_ratio", "smooth_max", "rounding_error", "relative_rounding_error"]

SmoothMax = Literal["exact", "logsumexp", "pnorm"]

_EPS = 1e-12


def smooth_max(z: Tensor, kind: SmoothMax = "exact", sharpness: float = 8.0) -> Tensor:
    """max of ``z`` over the last dim, exact or smoothed; ``sharpness`` is ``s`` of
    ``logsumexp`` or ``p`` of ``pnorm`` (which takes ``z >= 0``)."""
    if kind == "exact":
        return z.amax(dim=-1)
    if kind == "logsumexp":
        return torch.logsumexp(sharpness * z, dim=-1) / sharpness
    if kind == "pnorm":
        return z.clamp_min(0).pow(sharpness).sum(dim=-1).clamp_min(_EPS).pow(1.0 / sharpness)
    raise ValueError(f"unknown smooth max {kind!r}; use 'exact', 'logsumexp' or 'pnorm'")


def grid_to_std_ratio(
    x: Tensor,
    bits: int,
    symmetric: bool = True,
    group_size: int | None = None,
    smooth: SmoothMax = "exact",
    sharpness: float = 8.0,
) -> Tensor:
    """``rho = step / std`` of every quantization group of ``x``.

    :param x: ``(..., n)``; each row is quantized with one scale, or with one scale
        per ``group_size`` consecutive values
    :param bits: grid bits ``b`` (``2^b`` levels)
    :param symmetric: ``step = 2 max|x| / (2^b - 1)``; else ``(max - min) / (2^b - 1)``
    :param group_size: values per scale along the last dim; None = the whole row
    :param smooth: ``exact`` max or a smooth surrogate (see the module docstring)
    :return: ``(..., n // group_size)`` ratios (``(...,)`` without groups)
    """
    if group_size is not None:
        if x.shape[-1] % group_size:
            raise ValueError(f"group_size {group_size} does not divide the last dim {x.shape[-1]}")
        x = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    levels = 2**bits - 1
    mean = x.mean(dim=-1, keepdim=True)
    std = (x - mean).pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(_EPS)
    if symmetric:
        z = x / std
        span = 2 * smooth_max(z.abs(), smooth, sharpness)
    else:
        z = (x - mean) / std
        span = smooth_max(z, smooth, sharpness) + smooth_max(-z, smooth, sharpness)
    return span / levels


def clipped_ratio(
    x: Tensor,
    bits: int,
    symmetric: bool,
    clip: Tensor | float,
    smooth: SmoothMax = "exact",
    sharpness: float = 8.0,
) -> Tensor:
    """The grid-to-std ratio of each row of ``x`` (one scale per row) when its range
    is clipped to ``c [min, max]`` (``clip``: a number or a tensor broadcasting against
    ``x``'s rows), with the clipping error counted in::

        rho_c = sqrt((c rho)^2 + 12 mean(excess^2) / var(x))

    where ``excess`` is how far each value lies beyond the clipped range. The rounding
    error of the clipped grid is about ``(c rho std)^2 / 12`` per value, so ``rho_c /
    sqrt(12)`` is the relative error of the whole quantizer; ``c = 1`` gives ``rho``.
    ``rho`` alone would reward clipping everything. Ranges are taken about zero, as
    compressed-tensors' quantizers take them (``min <= 0 <= max``)."""
    levels = 2**bits - 1
    mean = x.mean(dim=-1, keepdim=True)
    std = (x - mean).pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(_EPS)
    u = x / std
    clip = torch.as_tensor(clip, dtype=u.dtype, device=u.device)
    clip = clip.reshape(*clip.shape, *([1] * (u.dim() - clip.dim()))) if clip.dim() else clip
    if symmetric:
        high = smooth_max(u.abs(), smooth, sharpness).clamp_min(0)[..., None]
        low = high
    else:
        high = smooth_max(u, smooth, sharpness).clamp_min(0)[..., None]
        low = smooth_max(-u, smooth, sharpness).clamp_min(0)[..., None]
    ratio = clip * (high + low) / levels
    excess = torch.relu(u - clip * high) + torch.relu(-u - clip * low)
    return (ratio.pow(2) + 12 * excess.pow(2).mean(dim=-1, keepdim=True)).sqrt()[..., 0]


def rounding_error(
    x: Tensor, bits: int, symmetric: bool = True, group_size: int | None = None, clip: Tensor | float = 1.0
) -> Tensor:
    """``Q(x) - x`` for round-to-nearest on the grid of ``grid_to_std_ratio`` (scale
    from the exact max, times ``clip``; asymmetric with a zero point), same shape as
    ``x``; values beyond the clipped grid saturate."""
    width = group_size or x.shape[-1]
    rows = x.reshape(*x.shape[:-1], x.shape[-1] // width, width)
    step, low = grid_of(rows, bits, symmetric, clip)
    return (round_to_grid(rows, step, low, bits) - rows).reshape(x.shape)


def grid_of(rows: Tensor, bits: int, symmetric: bool, clip: Tensor | float = 1.0) -> tuple[Tensor, Tensor | None]:
    """``(step, low)`` of the grid over the last dim of ``rows`` (kept as size 1):
    symmetric ``step = 2 c max|x| / (2^b - 1)``, ``low`` None; asymmetric
    ``step = c (max x - min x) / (2^b - 1)``, ``low = c min x``."""
    levels = 2**bits - 1
    if symmetric:
        return (clip * 2 * rows.abs().amax(-1, keepdim=True) / levels).clamp_min(_EPS), None
    low, high = clip * rows.amin(-1, keepdim=True), clip * rows.amax(-1, keepdim=True)
    return ((high - low) / levels).clamp_min(_EPS), low


def round_to_grid(x: Tensor, step: Tensor, low: Tensor | None, bits: int) -> Tensor:
    """``x`` rounded to nearest on ``grid_of``'s grid, saturating at its ends."""
    levels = 2**bits - 1
    if low is None:
        return torch.round(x / step).clamp(-(levels + 1) // 2, levels // 2) * step
    return torch.round((x - low) / step).clamp(0, levels) * step + low


def relative_rounding_error(x: Tensor, bits: int, symmetric: bool = True, group_size: int | None = None) -> Tensor:
    """``||Q(x) - x|| / ||x||`` per row (``rounding_error``)."""
    return rounding_error(x, bits, symmetric, group_size).norm(dim=-1) / x.norm(dim=-1).clamp_min(_EPS)
