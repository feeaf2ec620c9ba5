"""``GSRModifier``: Grouped Sequency-arranged Rotation as an llm-compressor modifier.

Choi, Song, Lim, Yoo, "Grouped Sequency-arranged Rotation: Optimizing Rotation
Transformation for Quantization for Free", arXiv 2505.03810 (2025). Builds on the
R1/R2 rotations of QuaRot (arXiv 2404.00456) and SpinQuant (arXiv 2405.16406).

The whole algorithm: the matrix is ``gsr_plugin.walsh.grouped_rotation`` (identical
normalized Walsh blocks, rows in sequency order), applied as a compressed-tensors
``sequency-walsh`` transform (``gsr_plugin.transform``), fused exactly by the lifecycle
in ``gsr_plugin.rotation``. This file is the choice of matrix and its defaults.
"""

from __future__ import annotations

from typing import Literal

import torch
from compressed_tensors.transform import TransformArgs, TransformScheme
from pydantic import Field, field_validator

from gsr_plugin.rotation import FusedRotationModifier, Rotation, head_dim_of
from gsr_plugin.transform import NATURAL_WALSH, SEQUENCY_WALSH
from gsr_plugin.walsh import check_block_size, is_power_of_two

__all__ = ["GSRModifier", "GSRRotation"]

GSRRotation = Rotation  # R1: residual stream; R2: per attention head
_TYPE_OF_ORDERING = {"sequency": SEQUENCY_WALSH, "natural": NATURAL_WALSH}


class GSRModifier(FusedRotationModifier):
    """
    Grouped Sequency-arranged Rotation (GSR), https://arxiv.org/abs/2505.03810

    Rotates the residual stream (R1) with ``blockdiag(B, ..., B)``, ``B`` the
    normalized ``block_size`` Walsh matrix whose rows are sorted by sequency (number
    of sign changes), and each attention head's values (R2) with the same kind of
    block of size head_dim. Rotations are fused offline into the weights in float64
    (``W R`` for the linears that read the stream, ``R^T W`` for those that write it),
    after the RMSNorm scales are fused into the linears they feed, so the model's
    function is unchanged up to float rounding while neighbouring columns of every
    rotated weight hold neighbouring frequencies: smaller ranges per quantization
    group. Training-free and data-free; put it before the quantization modifier.

    After other rotations in the same recipe (e.g. ``SpinQuantModifier``) it
    composes: norms already fused (weights all ones) are not fused again, untied
    embeddings stay untied, and GSR's rotation multiplies the one already fused
    (``h -> h R_spin R_gsr``), so the stream the quantizer sees is grouped by GSR.

    Lifecycle: see ``gsr_plugin.rotation.FusedRotationModifier`` (on_initialize
    plans and refuses, on_calibration_start untie / fuse norms / fuse rotations).

    :param rotations: which rotations to apply, of ``R1`` (residual stream) and
        ``R2`` (per head, v_proj -> o_proj)
    :param block_size: R1 block size, a power of two dividing hidden_size; defaults
        to the model's head_dim, as in the paper. R2 always uses head_dim
    :param ordering: ``sequency`` (GSR) or ``natural`` (Sylvester order: the
        block-Hadamard ablation)
    :param randomize: multiply each block's rows by seeded random signs
        (``D W / sqrt(k)``); the same signs in every block of a rotation
    :param seed: seed of the random signs (R1 uses ``seed``, R2 ``seed + 1``)
    :param ignore: modules not to rotate; refused where it would split a rotation
    :param mappings: where R1/R2 go, for architectures not in
        ``gsr_plugin.mappings.SUPPORTED_MODEL_TYPES`` (give ``norm_mappings`` too)
    :param norm_mappings: every norm on the residual stream and the linears it feeds
    """

    ordering: Literal["sequency", "natural"] = Field(default="sequency")
    randomize: bool = Field(default=False)

    @field_validator("block_size")
    @classmethod
    def _block_size_power_of_two(cls, value):
        if value is not None and not is_power_of_two(value):
            raise ValueError(
                f"block_size {value} is not a power of two; Walsh blocks exist for "
                "1, 2, 4, ... (the paper uses the quantization group size, e.g. 64 or 128)"
            )
        return value

    @field_validator("ordering", mode="before")
    @classmethod
    def _lower_ordering(cls, value):
        return value.lower() if isinstance(value, str) else value

    def _default_block_size(self, config) -> int:
        head_dim = head_dim_of(config)
        if not is_power_of_two(head_dim):
            raise ValueError(
                f"head_dim {head_dim} is not a power of two, so it cannot be the default "
                f"block_size; pass block_size= a power of two dividing hidden_size "
                f"{config.hidden_size}"
            )
        return head_dim

    def _check_block_size(self, hidden_size: int, head_dim: int) -> None:
        if Rotation.R1 in self.rotations:
            check_block_size(hidden_size, self.block_size, "hidden_size")
        if Rotation.R2 in self.rotations and not is_power_of_two(head_dim):
            raise ValueError(
                f"R2 rotates each head with a head_dim x head_dim Walsh block, and "
                f"head_dim {head_dim} is not a power of two; use rotations=['R1']"
            )

    def _scheme(self, block: int, apply: list[TransformArgs]) -> TransformScheme:
        return TransformScheme(
            type=_TYPE_OF_ORDERING[self.ordering],
            apply=apply,
            randomize=self.randomize,
            head_dim=block,
            precision=torch.float64,
        )

    def describe(self) -> str:
        signs = ", random signs" if self.randomize else ""
        return f"GSR {'+'.join(self.rotations)} ({self.ordering}{signs}, block {self.block_size})"
