"""Walsh-Hadamard matrices in natural and sequency order, grouped rotations and
their fast transform. Torch only: nothing here knows about llm-compressor.

Notation (n = 2**m, indices written in m bits):

* Sylvester (natural order) Hadamard: ``H[i, j] = (-1) ** popcount(i & j)``.
  It is symmetric and ``H @ H = n * I``.
* Sequency order: row ``s`` is Sylvester row ``pi(s) = bitrev(gray(s))`` with
  ``gray(s) = s ^ (s >> 1)``; row ``s`` has exactly ``s`` sign changes. ``pi`` is
  linear over GF(2) (``pi(s) = J G s`` with ``J`` the bit reversal and ``G`` the
  Gray code matrix) and ``J G = (J G)^T``, so the sequency matrix is symmetric too.
* A *grouped rotation* of width ``dim`` is ``R = D @ blockdiag(B, ..., B)`` with
  ``B = W / sqrt(k)`` (``W`` the k x k Walsh matrix in the chosen order) and ``D``
  an optional diagonal of +-1 signs. ``R`` is orthogonal: ``R @ R.T = I``.

Reference: Choi, Song, Lim, Yoo, "Grouped Sequency-arranged Rotation" (GSR),
arXiv 2505.03810, 2025.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

__all__ = [
    "Ordering",
    "ORDERINGS",
    "is_power_of_two",
    "check_block_size",
    "sequency_permutation",
    "walsh_matrix",
    "sequency_walsh",
    "natural_walsh",
    "random_signs",
    "grouped_rotation",
    "fwht",
    "grouped_walsh_transform",
    "DENSE_MAX_BLOCK",
]

Ordering = Literal["sequency", "natural"]
ORDERINGS: tuple[str, ...] = ("sequency", "natural")

# Blocks up to this size are applied as one batched dense product, larger ones with
# the fast transform: where each wins was measured by benchmarks/cost.py on CPU
# (docs/results/cost.md: dense faster up to 512, fast from 1024 on, 0.24x at 8192).
DENSE_MAX_BLOCK = 512


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def _largest_power_of_two_divisor(n: int) -> int:
    return n & -n


def check_block_size(dim: int, block_size: int, what: str = "dim") -> None:
    """Raise ``ValueError`` naming the fix unless ``block_size`` is a power of two
    dividing ``dim``."""
    if not is_power_of_two(block_size):
        raise ValueError(
            f"block_size {block_size} is not a power of two; Walsh matrices exist for "
            f"sizes 1, 2, 4, ... Use {_largest_power_of_two_divisor(dim)} (the largest "
            f"power of two dividing {what} {dim}) or a smaller power of two."
        )
    if dim % block_size != 0:
        raise ValueError(
            f"block_size {block_size} does not divide {what} {dim}; use "
            f"{_largest_power_of_two_divisor(dim)} (the largest power of two dividing "
            f"{dim}) or a smaller power of two."
        )


def _check_size(n: int) -> int:
    if not is_power_of_two(n):
        raise ValueError(
            f"Walsh matrices exist for powers of two only, got size {n}; "
            "this library never zero-pads (padding is not orthogonal)"
        )
    return n.bit_length() - 1


def sequency_permutation(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``perm[s] = bitrev(gray(s))``: the Sylvester row that is sequency row ``s``."""
    bits = _check_size(n)
    s = torch.arange(n, device=device)
    gray = s ^ (s >> 1)
    rev = torch.zeros_like(gray)
    for b in range(bits):
        rev |= ((gray >> b) & 1) << (bits - 1 - b)
    return rev


@functools.lru_cache(maxsize=64)
def _cached_permutation(n: int, device: torch.device) -> torch.Tensor:
    return sequency_permutation(n, device)


def walsh_matrix(
    n: int,
    ordering: Ordering = "sequency",
    *,
    normalized: bool = True,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The n x n Walsh-Hadamard matrix in ``ordering``; entries +-1, or +-1/sqrt(n)
    when ``normalized`` (then it is orthonormal). Built from the closed form
    ``(-1) ** popcount(i & j)``, independently of the fast transform."""
    _check_size(n)
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {ORDERINGS}, got {ordering!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _cached_walsh(n, ordering, normalized, dtype, device).clone()


@functools.lru_cache(maxsize=64)
def _cached_walsh(
    n: int, ordering: str, normalized: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Shared, read-only copy behind ``walsh_matrix`` and the transforms."""
    idx = torch.arange(n, device=device)
    rows = sequency_permutation(n, device) if ordering == "sequency" else idx
    anded = rows[:, None] & idx[None, :]
    parity = torch.zeros_like(anded)
    while bool(anded.any()):
        parity ^= anded & 1
        anded = anded >> 1
    mat = (1 - 2 * parity).to(dtype)
    return mat / math.sqrt(n) if normalized else mat


def sequency_walsh(
    n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """Orthonormal n x n Walsh matrix in sequency order: row k has k sign changes."""
    return walsh_matrix(n, "sequency", dtype=dtype, device=device)


def natural_walsh(
    n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix (natural order), for ablations."""
    return walsh_matrix(n, "natural", dtype=dtype, device=device)


def random_signs(
    n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """n random +-1 values drawn from ``generator`` (on the CPU, so seeds are portable)."""
    bits = torch.randint(0, 2, (n,), generator=generator, device="cpu")
    return (1 - 2 * bits).to(dtype)


def grouped_rotation(
    dim: int,
    block_size: int,
    ordering: Ordering = "sequency",
    signs: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Dense ``R = diag(signs) @ blockdiag(B, ..., B)`` of size dim x dim, with
    ``B`` the normalized ``block_size`` Walsh matrix in ``ordering``. ``signs`` has
    ``block_size`` entries (the same in every block) or ``dim`` entries."""
    check_block_size(dim, block_size)
    block = walsh_matrix(block_size, ordering, dtype=dtype)
    rot = torch.block_diag(*([block] * (dim // block_size)))
    if signs is not None:
        rot = _expand_signs(signs, dim, block_size).to(dtype)[:, None] * rot
    return rot


def _expand_signs(signs: torch.Tensor, dim: int, block_size: int) -> torch.Tensor:
    if signs.numel() == dim:
        return signs
    if signs.numel() == block_size:
        return signs.repeat(dim // block_size)
    raise ValueError(
        f"signs must have block_size ({block_size}) or dim ({dim}) entries, "
        f"got {signs.numel()}"
    )


def _sylvester_factor(r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _cached_walsh(r, "natural", False, dtype, device)


# Largest Kronecker factor the fast transform multiplies densely in one pass.
_RADIX = 16


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform (natural order) of the last
    dimension: ``fwht(x) == x @ H`` with ``H`` the Sylvester matrix.

    Uses ``H_n = H_r1 (x) H_r2 (x) ...`` (Kronecker product, factors r <= 16): one
    small batched product per factor, so O(n log n) work for ``n`` a power of two.
    """
    n = x.shape[-1]
    bits = _check_size(n)
    if n == 1:
        return x.clone()
    radix_bits = _RADIX.bit_length() - 1
    factors = [radix_bits] * (bits // radix_bits)
    if bits % radix_bits:
        factors.append(bits % radix_bits)
    y = x.reshape(-1, n)
    rows = y.shape[0]
    left = 1
    for fb in factors:
        r = 1 << fb
        right = n // (left * r)
        h = _sylvester_factor(r, x.dtype, x.device)
        if right == 1:
            y = y.reshape(-1, r) @ h
        else:
            y = torch.matmul(h, y.reshape(rows * left, r, right))
        left *= r
    return y.reshape(x.shape)


def grouped_walsh_transform(
    x: torch.Tensor,
    block_size: int,
    ordering: Ordering = "sequency",
    signs: torch.Tensor | None = None,
    *,
    transpose: bool = False,
    method: Literal["auto", "fast", "dense"] = "auto",
) -> torch.Tensor:
    """``x @ R`` (or ``x @ R.T`` when ``transpose``) over the last dimension, with
    ``R = grouped_rotation(x.shape[-1], block_size, ordering, signs)``.

    Since every Walsh block ``B`` is symmetric, ``x @ R = (x * signs) @ blockdiag(B)``
    and ``x @ R.T = (x @ blockdiag(B)) * signs``; the block product is the FWHT
    followed by the sequency gather ``y[..., s] = fwht(x)[..., pi(s)] / sqrt(k)``.
    ``method="auto"`` uses a dense product for blocks up to ``DENSE_MAX_BLOCK`` and
    the fast transform above. Equal to the dense product to float rounding.
    """
    dim = x.shape[-1]
    check_block_size(dim, block_size)
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {ORDERINGS}, got {ordering!r}")
    sign_vec = None
    if signs is not None:
        sign_vec = _expand_signs(signs, dim, block_size).to(dtype=x.dtype, device=x.device)
    if sign_vec is not None and not transpose:
        x = x * sign_vec
    if method == "auto":
        method = "dense" if block_size <= DENSE_MAX_BLOCK else "fast"
    # contiguous first: a transposed weight (``W.T``, and ``.to(float64)`` keeps its
    # strides) reshapes to a strided view that sends the block product to a generic
    # batched kernel, 17 s instead of 20 ms for a 896 x 128 float64 slice
    blocks = x.contiguous().reshape(*x.shape[:-1], dim // block_size, block_size)
    if method == "dense":
        y = blocks @ _cached_walsh(block_size, ordering, True, x.dtype, x.device)
    elif method == "fast":
        y = fwht(blocks)
        if ordering == "sequency":
            y = y[..., _cached_permutation(block_size, x.device)]
        y = y / math.sqrt(block_size)
    else:
        raise ValueError(f"method must be 'auto', 'fast' or 'dense', got {method!r}")
    y = y.reshape(x.shape)
    if sign_vec is not None and transpose:
        y = y * sign_vec
    return y
