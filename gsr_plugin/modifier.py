"""``GSRModifier``: Grouped Sequency-arranged Rotation as an llm-compressor modifier.

Choi, Song, Lim, Yoo, "Grouped Sequency-arranged Rotation: Optimizing Rotation
Transformation for Quantization for Free", arXiv 2505.03810 (2025). Builds on the
R1/R2 rotations of QuaRot (arXiv 2404.00456) and SpinQuant (arXiv 2405.16406).
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Literal

import torch
from compressed_tensors import TRANSFORM_CONFIG_NAME, match_modules_set, match_named_modules
from compressed_tensors.offload import align_module_device
from compressed_tensors.transform import (
    TransformArgs,
    TransformConfig,
    TransformFactory,
    TransformScheme,
)
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

from llmcompressor.core import Event, State
from llmcompressor.modeling import fuse_norm_linears
from llmcompressor.modifiers import Modifier
from llmcompressor.utils import untie_word_embeddings

from gsr_plugin.mappings import (
    NormMapping,
    SpinQuantMapping,
    check_rms_norms,
    resolve_mappings,
)
from gsr_plugin.transform import NATURAL_WALSH, SEQUENCY_WALSH
from gsr_plugin.walsh import check_block_size, is_power_of_two

__all__ = ["GSRModifier", "GSRRotation"]


class GSRRotation(str, Enum):
    R1 = "R1"  # residual stream, grouped sequency-Walsh blocks of `block_size`
    R2 = "R2"  # per attention head, between v_proj and o_proj


_ONLINE_ROTATIONS = ("R3", "R4")
_TYPE_OF_ORDERING = {"sequency": SEQUENCY_WALSH, "natural": NATURAL_WALSH}


class GSRModifier(Modifier, use_enum_values=True):
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

    Lifecycle:

    - on_initialize
        - resolve mappings for the architecture and the block size (default head_dim)
        - refuse what would not be exact or in order, before touching the model:
          unsupported architectures, LayerNorm, block sizes that do not divide,
          `ignore` that splits a rotation, a quantization modifier earlier in the
          recipe or quantization already attached to the model
        - build the ``TransformConfig`` of ``sequency-walsh`` (or ``natural-walsh``)
          schemes
    - on_calibration_start
        - untie word embeddings (the final norm is fused into lm_head only)
        - fuse RMSNorm scales into the following linears (skipped where already ones)
        - fuse the transforms into the weights, record them in
          ``model.transform_config`` (merged with any earlier one)

    :param rotations: which rotations to apply, of ``R1`` (residual stream) and
        ``R2`` (per head, v_proj -> o_proj)
    :param block_size: R1 block size, a power of two dividing hidden_size; defaults
        to the model's head_dim, as in the paper. R2 always uses head_dim
    :param ordering: ``sequency`` (GSR) or ``natural`` (Sylvester order: the
        block-Hadamard ablation)
    :param randomize: multiply each block's rows by seeded random signs
        (``D W / sqrt(k)``); the same signs in every block of a rotation
    :param seed: seed of the random signs (R1 uses ``seed``, R2 ``seed + 1``)
    :param ignore: modules not to rotate. A rotation has to cover every module on
        its path to stay exact, so an ignore that would split R1, or separate a
        v_proj from its o_proj under R2, is refused
    :param mappings: where R1/R2 go, for architectures not in
        ``gsr_plugin.mappings.SUPPORTED_MODEL_TYPES`` (give ``norm_mappings`` too)
    :param norm_mappings: every norm on the residual stream and the linears it feeds
    """

    rotations: list[GSRRotation] = Field(default_factory=lambda: ["R1", "R2"])
    block_size: int | None = Field(default=None)
    ordering: Literal["sequency", "natural"] = Field(default="sequency")
    randomize: bool = Field(default=False)
    seed: int = Field(default=0)
    ignore: list[str] = Field(default_factory=list)
    mappings: SpinQuantMapping | None = Field(default=None)
    norm_mappings: list[NormMapping] | None = Field(default=None)

    _transform_config: TransformConfig | None = PrivateAttr(default=None)
    _norms: list[NormMapping] = PrivateAttr(default_factory=list)

    @field_validator("rotations", mode="before")
    @classmethod
    def _normalize_rotations(cls, value):
        if isinstance(value, str):
            value = [value]
        names = []
        for item in value:
            name = str(getattr(item, "value", item)).upper()
            if name in _ONLINE_ROTATIONS:
                raise ValueError(
                    f"rotation {name} is an online rotation, which GSRModifier does not "
                    "apply yet; use rotations=['R1', 'R2']"
                )
            if name not in names:
                names.append(name)
        if not names:
            raise ValueError("rotations is empty; use ['R1'], ['R2'] or ['R1', 'R2']")
        return names

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

    @field_validator("ignore", mode="before")
    @classmethod
    def _ignore_as_list(cls, value):
        return [value] if isinstance(value, str) else value

    # ------------------------------------------------------------------ lifecycle

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        self._check_recipe_order()
        _check_not_quantized(model)
        mapping, self._norms = resolve_mappings(model, self.mappings, self.norm_mappings)
        head_dim = _head_dim(model.config)
        hidden_size = model.config.hidden_size
        if self.block_size is None:
            self.block_size = head_dim
            if not is_power_of_two(head_dim):
                raise ValueError(
                    f"head_dim {head_dim} is not a power of two, so it cannot be the "
                    "default block_size; pass block_size= a power of two dividing "
                    f"hidden_size {hidden_size}"
                )
        if GSRRotation.R1 in self.rotations:
            check_block_size(hidden_size, self.block_size, "hidden_size")
            check_rms_norms(model, self._norms)
        if GSRRotation.R2 in self.rotations:
            if not is_power_of_two(head_dim):
                raise ValueError(
                    f"R2 rotates each head with a head_dim x head_dim Walsh block, and "
                    f"head_dim {head_dim} is not a power of two; use rotations=['R1']"
                )

        groups = {}
        if GSRRotation.R1 in self.rotations:
            groups["R1"] = self._r1_scheme(mapping)
        if GSRRotation.R2 in self.rotations:
            groups["R2"] = self._r2_scheme(mapping, head_dim)
        config = TransformConfig(config_groups=groups)
        _check_targets(model, config, mapping)
        self._transform_config = config
        return True

    @torch.no_grad()
    def on_calibration_start(self, state: State, event: Event, **kwargs):
        model = state.model
        start = time.perf_counter()
        if GSRRotation.R1 in self.rotations:
            if getattr(model.config, "tie_word_embeddings", False):
                untie_word_embeddings(model)
            self._fuse_norms(model)
        for index, (name, scheme) in enumerate(self._transform_config.config_groups.items()):
            factory = TransformFactory.from_scheme(scheme, name=name, seed=self.seed + index)
            factory.apply_to_model(model)
        _record_transform_config(model, self._transform_config)
        logger.info(
            f"GSR {'+'.join(self.rotations)} ({self.ordering}, block {self.block_size}) "
            f"fused in {time.perf_counter() - start:.1f}s"
        )

    # --------------------------------------------------------------- schemes

    def _scheme(self, block: int, apply: list[TransformArgs]) -> TransformScheme:
        return TransformScheme(
            type=_TYPE_OF_ORDERING[self.ordering],
            apply=apply,
            randomize=self.randomize,
            head_dim=block,
            precision=torch.float64,
        )

    def _r1_scheme(self, m: SpinQuantMapping) -> TransformScheme:
        return self._scheme(
            self.block_size,
            [
                TransformArgs(
                    targets=[m.embedding, m.attn_o, *m.mlp_out],
                    location="weight_output",
                    ignore=self.ignore,
                ),
                TransformArgs(
                    targets=[m.attn_q, m.attn_k, m.attn_v, *m.mlp_in, m.lm_head],
                    location="weight_input",
                    inverse=True,
                    ignore=self.ignore,
                ),
            ],
        )

    def _r2_scheme(self, m: SpinQuantMapping, head_dim: int) -> TransformScheme:
        return self._scheme(
            head_dim,
            [
                TransformArgs(targets=[m.attn_v], location="weight_output", ignore=self.ignore),
                TransformArgs(
                    targets=[m.attn_o], location="weight_input", inverse=True, ignore=self.ignore
                ),
            ],
        )

    # ---------------------------------------------------------------- checks

    def _check_recipe_order(self) -> None:
        """A quantization modifier before GSR would compute its scales, or quantize,
        before the weights are rotated."""
        from llmcompressor.core import active_session
        from llmcompressor.modifiers.quantization import QuantizationMixin

        recipe = getattr(active_session().lifecycle, "recipe", None)
        modifiers = list(getattr(recipe, "modifiers", None) or [])
        position = next((i for i, m in enumerate(modifiers) if m is self), None)
        if position is None:
            return
        earlier = [type(m).__name__ for m in modifiers[:position] if isinstance(m, QuantizationMixin)]
        if earlier:
            raise ValueError(
                f"GSRModifier comes after {', '.join(earlier)} in the recipe; rotations "
                "must be fused before the weights are quantized. Move GSRModifier before "
                f"{earlier[0]}."
            )
        later = [
            type(m).__name__
            for m in modifiers[position + 1 :]
            if type(m).__name__ in ("SpinQuantModifier", "QuIPModifier")
        ]
        if later:
            logger.warning(
                f"{', '.join(later)} comes after GSRModifier: its rotation will be "
                "applied on top of GSR's and regroup the weights. Put GSRModifier last "
                "among the rotations so that quantization sees GSR's grouping."
            )

    # ---------------------------------------------------------------- actions

    def _fuse_norms(self, model: torch.nn.Module) -> None:
        """``W <- W diag(g)``, ``g <- 1`` for every norm feeding the rotated stream,
        in float64 (llm-compressor's ``fuse_norm_linears``). Norms already at one (a
        rotation earlier in the recipe fused them) are left alone."""
        pairs = [
            (norm[0], tree_leaves(linears))
            for mapping in self._norms
            for norm, *linears in match_modules_set(model, (mapping.norm, *mapping.linears))
        ]
        already = 0
        for norm, linears in tqdm(pairs, desc="Fusing norms", leave=False):
            with align_module_device(norm):
                unit = bool((norm.weight == 1).all())
            if unit:
                already += 1
                continue
            fuse_norm_linears(norm, linears)
        if already:
            logger.info(f"{already} of {len(pairs)} norms already had unit weight; not fused again")


def _head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim or config.hidden_size // config.num_attention_heads


def _check_not_quantized(model: torch.nn.Module) -> None:
    quantized = [
        name
        for name, module in model.named_modules()
        if getattr(module, "quantization_scheme", None) is not None
    ]
    if quantized:
        raise ValueError(
            f"{len(quantized)} modules (e.g. {quantized[0]}) already carry a quantization "
            "scheme; GSR must rotate full-precision weights. Put GSRModifier before any "
            "quantization modifier and start from an unquantized checkpoint."
        )


def _check_targets(model: torch.nn.Module, config: TransformConfig, mapping: SpinQuantMapping) -> None:
    """Every rotation must cover all of its path (ignore may not split it) and fit
    every module it touches; checked before anything is modified."""
    for name, scheme in config.config_groups.items():
        for args in scheme.apply:
            matched = dict(match_named_modules(model, args.targets))
            kept = dict(match_named_modules(model, args.targets, args.ignore))
            if not matched:
                raise ValueError(
                    f"{name} targets {args.targets} match no module of the model; check "
                    "mappings"
                )
            dropped = sorted(set(matched) - set(kept))
            if dropped and name == "R1":
                raise ValueError(
                    f"ignore removes {dropped[:3]} from R1, but R1 rotates the residual "
                    "stream that every one of its readers and writers shares: leaving one "
                    "out changes the model's output. Remove them from GSRModifier.ignore "
                    "(to keep a layer unquantized, ignore it in the quantization modifier), "
                    "or drop R1 from rotations."
                )
            for module_name, module in kept.items():
                size = _transformed_size(module, args.location)
                if size % scheme.head_dim:
                    raise ValueError(
                        f"{name} block {scheme.head_dim} does not divide {module_name}'s "
                        f"{args.location} size {size}; choose a block_size that divides it"
                    )
    if "R2" in config.config_groups:
        v_args, o_args = config.config_groups["R2"].apply
        v_parents = {n.rsplit(".", 1)[0] for n, _ in match_named_modules(model, v_args.targets, v_args.ignore)}
        o_parents = {n.rsplit(".", 1)[0] for n, _ in match_named_modules(model, o_args.targets, o_args.ignore)}
        if v_parents != o_parents:
            odd = sorted(v_parents ^ o_parents)
            raise ValueError(
                f"ignore rotates v_proj and o_proj of {odd[:3]} differently; R2 needs both "
                "or neither of a layer's v_proj and o_proj in GSRModifier.ignore"
            )


def _transformed_size(module: torch.nn.Module, location: str) -> int:
    if isinstance(module, torch.nn.Embedding):
        return module.embedding_dim if location == "weight_output" else module.num_embeddings
    if isinstance(module, torch.nn.Linear):
        return module.in_features if location in ("weight_input", "input") else module.out_features
    raise ValueError(
        f"{type(module).__name__} cannot be rotated; mappings must name Linear or "
        "Embedding modules"
    )


def _record_transform_config(model: torch.nn.Module, config: TransformConfig) -> None:
    """Attach ``config`` for serialization (``quantization_config.transform_config``),
    merged after any transforms an earlier modifier recorded."""
    existing = getattr(model, TRANSFORM_CONFIG_NAME, None)
    if existing is None:
        setattr(model, TRANSFORM_CONFIG_NAME, config.model_copy(deep=True))
    else:
        existing.merge(config.model_copy(deep=True))
