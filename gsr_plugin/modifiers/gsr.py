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

import math
from typing import Literal

import torch
from compressed_tensors.transform import TransformArgs, TransformScheme
from pydantic import Field, field_validator, model_validator

from gsr_plugin.mappings import SpinQuantMapping
from gsr_plugin.rotation import ONLINE_PRECISION, FusedRotationModifier, Rotation, check_paired, head_dim_of, mlp_widths
from gsr_plugin.transform import NATURAL_WALSH, SEQUENCY_PERMUTATION, SEQUENCY_WALSH
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

    :param rotations: which rotations to apply: ``R1`` (residual stream) and ``R2``
        (per head, v_proj -> o_proj) are fused offline; ``R3`` (queries and keys after
        RoPE, per head) and ``R4`` (down_proj input) run online, for activation and
        KV-cache quantization
    :param block_size: R1 block size, a power of two dividing hidden_size; defaults
        to the model's head_dim, as in the paper. R2 and R3 always use head_dim
    :param r4_block_size: R4 block, a power of two dividing intermediate_size;
        defaults to the largest such (512 for SmolLM2's 1536)
    :param fold_r4_permutation: fold the sequency order of R4 into gate_proj and
        up_proj (their output rows are permuted blockwise), so that R4's online part
        is a natural ``hadamard`` transform, which vLLM runs with its fast kernel on
        GPU; exact, and down_proj's weight is still grouped in sequency order. Needs
        ``randomize=False``
    :param ordering: ``sequency`` (GSR) or ``natural`` (Sylvester order: the
        block-Hadamard ablation)
    :param randomize: multiply each block's rows by seeded random signs
        (``D W / sqrt(k)``); the same signs in every block of a rotation
    :param seed: seed of the random signs (the i-th rotation group uses ``seed + i``)
    :param ignore: modules not to rotate; refused where it would split a rotation
    :param mappings: where R1/R2 go, for architectures not in
        ``gsr_plugin.mappings.SUPPORTED_MODEL_TYPES`` (give ``norm_mappings`` too)
    :param norm_mappings: every norm on the residual stream and the linears it feeds
    """

    ordering: Literal["sequency", "natural"] = Field(default="sequency")
    randomize: bool = Field(default=False)
    fold_r4_permutation: bool = Field(default=False)

    @model_validator(mode="after")
    def _fold_needs_plain_sequency_r4(self):
        if self.fold_r4_permutation:
            problems = []
            if "R4" not in self.rotations:
                problems.append("R4 in rotations")
            if self.randomize:
                problems.append("randomize=False (vLLM's hadamard kernel applies no signs)")
            if self.ordering != "sequency":
                problems.append("ordering='sequency' (natural order has no permutation to fold)")
            if problems:
                raise ValueError("fold_r4_permutation needs " + " and ".join(problems))
        return self

    @field_validator("block_size", "r4_block_size")
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

    def _default_r4_block_size(self, config) -> int:
        width = math.gcd(*mlp_widths(config))
        return width & -width  # the largest power of two dividing every down_proj's input

    def _check_block_size(self, config) -> None:
        if Rotation.R1 in self.rotations:
            check_block_size(config.hidden_size, self.block_size, "hidden_size")
        head_dim = head_dim_of(config)
        per_head = [r for r in (Rotation.R2, Rotation.R3) if r in self.rotations]
        if per_head and not is_power_of_two(head_dim):
            raise ValueError(
                f"{'/'.join(per_head)} rotate each head with a head_dim x head_dim Walsh block, "
                f"and head_dim {head_dim} is not a power of two; use rotations without them"
            )
        if Rotation.R4 in self.rotations:
            for name, width in mlp_widths(config, named=True).items():
                check_block_size(width, self.r4_block_size, name)

    def _scheme(self, block: int, apply: list[TransformArgs], online: bool = False, type_: str | None = None) -> TransformScheme:
        return TransformScheme(
            type=type_ or _TYPE_OF_ORDERING[self.ordering],
            apply=apply,
            randomize=self.randomize,
            head_dim=block,
            precision=ONLINE_PRECISION if online else torch.float64,
        )

    def _r4_schemes(self, m: SpinQuantMapping) -> dict:
        """With ``fold_r4_permutation``: ``x B_seq = x[pi^-1] H / sqrt(k)`` blockwise, so
        gate/up rows are reordered by ``pi^-1`` (``R4_fold``; the elementwise SiLU-gate
        commutes with it), the online part is the natural ``hadamard`` (``R4``), and
        down_proj's weight still gets ``W B_seq`` (``R4_fused``)."""
        if not self.fold_r4_permutation:
            return super()._r4_schemes(m)
        block, ignore = self.r4_block_size, self.ignore
        return {
            "R4": self._scheme(
                block, [TransformArgs(targets=[*m.mlp_out], location="input", ignore=ignore)], online=True, type_="hadamard"
            ),
            "R4_fused": self._scheme(
                block,
                [TransformArgs(targets=[*m.mlp_out], location="weight_input", inverse=True, ignore=ignore)],
            ),
            "R4_fold": self._scheme(
                block,
                [TransformArgs(targets=[*m.mlp_in], location="weight_output", ignore=ignore)],
                type_=SEQUENCY_PERMUTATION,
            ),
        }

    def on_initialize(self, state, **kwargs) -> bool:
        initialized = super().on_initialize(state, **kwargs)
        groups = self._transform_config.config_groups
        if "R4_fold" in groups:
            check_paired(
                state.model,
                groups["R4_fold"].apply[0],
                groups["R4"].apply[0],
                "fold_r4_permutation needs a layer's gate_proj, up_proj and down_proj all rotated or all ignored",
            )
        return initialized

    def describe(self) -> str:
        signs = ", random signs" if self.randomize else ""
        r4 = f", R4 block {self.r4_block_size}{' folded' if self.fold_r4_permutation else ''}" if self.r4_block_size else ""
        return f"GSR {'+'.join(self.rotations)} ({self.ordering}{signs}, block {self.block_size}{r4})"
