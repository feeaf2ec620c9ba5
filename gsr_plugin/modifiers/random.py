"""Rotations GSR is compared against, applied with the same exact lifecycle
(``gsr_plugin.rotation``) so that a comparison measures the matrix and nothing else.

* ``kind="orthogonal"``: a seeded random orthogonal matrix, full width by default
  (block_size = hidden_size), as in SpinQuant's random initialization.
* ``kind="hadamard"``: compressed-tensors' ``random-hadamard`` (random signs times a
  Hadamard matrix of a size ``K * 2^m`` with a known ``K``: 12, 20, 28, 36, ...), which
  allows blocks that are not powers of two, e.g. 192 or 576 on SmolLM2.

Natural-order and sign-randomized Hadamard blocks of power-of-two size are
``GSRModifier(ordering="natural", randomize=...)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from compressed_tensors.transform import TransformArgs, TransformScheme
from pydantic import Field

from gsr_plugin.rotation import ONLINE_PRECISION, FusedRotationModifier, Rotation, head_dim_of
from gsr_plugin.transform import RANDOM_ORTHOGONAL

__all__ = ["RandomRotationModifier", "has_random_hadamard"]


def has_random_hadamard(size: int) -> bool:
    """Whether compressed-tensors can build a random Hadamard matrix of ``size``."""
    from compressed_tensors.transform.utils.hadamard import _fetch_hadamard_divisor

    return size > 0 and _fetch_hadamard_divisor(size, torch.float64) is not None


class RandomRotationModifier(FusedRotationModifier):
    """
    Random rotation baseline: R1 with ``block_size`` blocks (default: full width) and
    R2 per head, random orthogonal or random Hadamard, fused exactly like GSR.

    :param kind: ``orthogonal`` (QR of a Gaussian) or ``hadamard`` (random signs times
        a Hadamard matrix)
    :param block_size: R1 block, dividing hidden_size (default hidden_size)
    """

    kind: Literal["orthogonal", "hadamard"] = Field(default="orthogonal")

    def _default_block_size(self, config) -> int:
        return config.hidden_size

    def _default_r4_block_size(self, config) -> int:
        return config.intermediate_size

    def _check_block_size(self, config) -> None:
        head_dim = head_dim_of(config)
        sizes = ([self.block_size] if Rotation.R1 in self.rotations else []) + (
            [head_dim] if {Rotation.R2, Rotation.R3} & set(self.rotations) else []
        ) + ([self.r4_block_size] if Rotation.R4 in self.rotations else [])
        if Rotation.R1 in self.rotations and config.hidden_size % self.block_size:
            raise ValueError(f"block_size {self.block_size} does not divide hidden_size {config.hidden_size}")
        if Rotation.R4 in self.rotations and config.intermediate_size % self.r4_block_size:
            raise ValueError(
                f"r4_block_size {self.r4_block_size} does not divide intermediate_size {config.intermediate_size}"
            )
        if self.kind == "hadamard":
            missing = [s for s in sizes if not has_random_hadamard(s)]
            if missing:
                raise ValueError(
                    f"no Hadamard matrix of size {missing[0]} is known to compressed-tensors "
                    "(sizes K * 2^m with K in 1, 12, 20, 28, ...); use kind='orthogonal' or "
                    "another block_size"
                )

    def _scheme(self, block: int, apply: list[TransformArgs], online: bool = False) -> TransformScheme:
        return TransformScheme(
            type=RANDOM_ORTHOGONAL if self.kind == "orthogonal" else "random-hadamard",
            apply=apply,
            head_dim=block,
            precision=ONLINE_PRECISION if online else torch.float64,
        )

    def describe(self) -> str:
        return f"random {self.kind} {'+'.join(self.rotations)} (block {self.block_size})"

