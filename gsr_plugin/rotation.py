"""The lifecycle every exact rotation modifier shares: resolve where the rotations go,
refuse what would not be exact, untie embeddings, fuse the RMSNorm scales into the
linears they feed, fuse R1 (residual stream) and R2 (per attention head) into the
weights and attach the online R3 (queries/keys after RoPE) and R4 (down_proj input)
through compressed-tensors transform factories, and record the transforms for
serialization.

Subclasses choose the matrix: ``GSRModifier`` (gsr_plugin.modifiers.gsr) grouped Walsh
blocks in sequency or natural order, ``RandomRotationModifier`` (gsr_plugin.modifiers.random)
random orthogonal or random Hadamard matrices.
"""

from __future__ import annotations

import time
from enum import Enum

import torch
from compressed_tensors import TRANSFORM_CONFIG_NAME, match_modules_set, match_named_modules
from compressed_tensors.offload import align_module_device
from compressed_tensors.transform import (
    TransformArgs,
    TransformConfig,
    TransformFactory,
    TransformScheme,
)
from compressed_tensors.transform.apply import _register_tied_transform_weights
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

from llmcompressor.core import Event, State
from llmcompressor.modeling import fuse_norm_linears
from llmcompressor.modifiers import Modifier
from llmcompressor.utils import untie_word_embeddings

from gsr_plugin.session import check_before_quantizers, modifiers_around
from gsr_plugin.mappings import (
    UNSUPPORTED_ROTATIONS,
    NormMapping,
    SpinQuantMapping,
    check_rms_norms,
    resolve_mappings,
)
from gsr_plugin.transform import is_linear_like

__all__ = ["Rotation", "FusedRotationModifier", "head_dim_of", "mlp_widths", "check_paired", "transformed_size", "ONLINE_PRECISION"]


class Rotation(str, Enum):
    R1 = "R1"  # residual stream, blocks of `block_size` (offline)
    R2 = "R2"  # per attention head, between v_proj and o_proj (offline)
    R3 = "R3"  # queries and keys after RoPE, per head (online)
    R4 = "R4"  # down_proj input, blocks of `r4_block_size` (online; inverse fused)


ONLINE_PRECISION = torch.float32  # online transforms run in float32 or the input's dtype if wider


class FusedRotationModifier(Modifier, use_enum_values=True):
    """
    Base of the rotation modifiers: R1 and R2 fused offline, R3 and R4 online, exactly.

    Lifecycle:

    - on_initialize
        - resolve mappings for the architecture and the block size
        - refuse what would not be exact or in order, before touching the model
        - build the ``TransformConfig`` (``_scheme`` gives each subclass's matrix type)
    - on_calibration_start
        - untie word embeddings (the final norm is fused into lm_head only)
        - fuse RMSNorm scales into the following linears (skipped where already ones)
        - ``_prepare_fusion``: nothing here; a learned rotation learns its matrices
        - fuse the offline transforms into the weights in float64, attach the
          online ones as hooks (float32, or the input's dtype if wider), record them
          in ``model.transform_config`` (merged with any earlier one)

    :param rotations: which rotations to apply: ``R1`` (residual stream) and ``R2``
        (per head, v_proj -> o_proj), fused offline; ``R3`` (queries and keys after
        RoPE, per head) and ``R4`` (down_proj input), applied online at run time (R4's
        inverse is fused into down_proj). R3/R4 serve activation and KV-cache
        quantization; they cost a transform per forward
    :param block_size: R1 block size (subclasses give the default and the rule)
    :param r4_block_size: R4 block size, dividing intermediate_size (subclasses give
        the default)
    :param seed: seed of any randomness (the i-th rotation group uses ``seed + i``)
    :param ignore: modules not to rotate. A rotation has to cover every module on
        its path to stay exact, so an ignore that would split R1, or separate a
        v_proj from its o_proj under R2, is refused
    :param mappings: where R1/R2 go, for architectures not in
        ``gsr_plugin.mappings.SUPPORTED_MODEL_TYPES`` (give ``norm_mappings`` too)
    :param norm_mappings: every norm on the residual stream and the linears it feeds
    """

    rotations: list[Rotation] = Field(default_factory=lambda: ["R1", "R2"])
    block_size: int | None = Field(default=None)
    r4_block_size: int | None = Field(default=None)
    seed: int = Field(default=0)
    ignore: list[str] = Field(default_factory=list)
    mappings: SpinQuantMapping | None = Field(default=None)
    norm_mappings: list[NormMapping] | None = Field(default=None)

    _transform_config: TransformConfig | None = PrivateAttr(default=None)
    _mapping: SpinQuantMapping | None = PrivateAttr(default=None)
    _norms: list[NormMapping] = PrivateAttr(default_factory=list)

    @field_validator("rotations", mode="before")
    @classmethod
    def _normalize_rotations(cls, value):
        if isinstance(value, str):
            value = [value]
        names = []
        for item in value:
            name = str(getattr(item, "value", item)).upper()
            if name not in names:
                names.append(name)
        if not names:
            raise ValueError("rotations is empty; use some of ['R1', 'R2', 'R3', 'R4']")
        return names

    @field_validator("ignore", mode="before")
    @classmethod
    def _ignore_as_list(cls, value):
        return [value] if isinstance(value, str) else value

    # ------------------------------------------------------ what subclasses choose

    def _default_block_size(self, config) -> int:
        raise NotImplementedError

    def _default_r4_block_size(self, config) -> int:
        raise NotImplementedError

    def _check_block_size(self, config) -> None:
        """Raise ``ValueError`` naming the fix when the blocks cannot be built."""
        raise NotImplementedError

    def _scheme(self, block: int, apply: list[TransformArgs], online: bool = False) -> TransformScheme:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{type(self).__name__} {'+'.join(self.rotations)} (block {self.block_size})"

    def _prepare_fusion(self, model: torch.nn.Module) -> None:
        """Called after the norms are fused and before any rotation: a modifier that
        learns its matrices from the model (FRTQ) does it here."""

    def _factory(self, name: str, scheme: TransformScheme, index: int) -> TransformFactory:
        """The factory that applies rotation group ``name`` (the i-th group is seeded
        with ``seed + i``)."""
        return TransformFactory.from_scheme(scheme, name=name, seed=self.seed + index)

    # ------------------------------------------------------------------ lifecycle

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        self._check_recipe_order()
        _check_not_quantized(model, type(self).__name__)
        mapping, self._norms = resolve_mappings(model, self.mappings, self.norm_mappings)
        self._mapping = mapping
        _check_rotations_supported(model, self.rotations, type(self).__name__)
        _linearize_experts(model)
        head_dim = head_dim_of(model.config)
        if self.block_size is None:
            self.block_size = self._default_block_size(model.config)
        if Rotation.R4 in self.rotations and self.r4_block_size is None:
            self.r4_block_size = self._default_r4_block_size(model.config)
        self._check_block_size(model.config)
        if Rotation.R1 in self.rotations:
            check_rms_norms(model, self._norms)
        groups = {}
        if Rotation.R1 in self.rotations:
            groups["R1"] = self._r1_scheme(mapping)
        if Rotation.R2 in self.rotations:
            groups["R2"] = self._r2_scheme(mapping, head_dim)
        if Rotation.R3 in self.rotations:
            groups["R3"] = self._r3_scheme(mapping, head_dim)
        if Rotation.R4 in self.rotations:
            groups.update(self._r4_schemes(mapping))
        config = TransformConfig(config_groups=groups)
        _check_targets(model, config, type(self).__name__)
        self._transform_config = config
        return True

    @torch.no_grad()
    def on_calibration_start(self, state: State, event: Event, **kwargs):
        model = state.model
        start = time.perf_counter()
        if Rotation.R1 in self.rotations:
            if getattr(model.config, "tie_word_embeddings", False):
                untie_word_embeddings(model)
            self._fuse_norms(model)
        self._prepare_fusion(model)
        for index, (name, scheme) in enumerate(self._transform_config.config_groups.items()):
            self._factory(name, scheme, index).apply_to_model(model)
        # online transforms share one weight per size: declare the ties for save_pretrained
        _register_tied_transform_weights(model)
        _record_transform_config(model, self._transform_config)
        logger.info(f"{self.describe()} fused in {time.perf_counter() - start:.1f}s")

    # --------------------------------------------------------------- schemes

    def _r1_scheme(self, m: SpinQuantMapping) -> TransformScheme:
        """Writers of the stream get ``R^T W`` (weight_output), readers ``W R``."""
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

    def _r3_scheme(self, m: SpinQuantMapping, head_dim: int) -> TransformScheme:
        """The same rotation on queries and keys after RoPE: ``(q R)(k R)^T = q k^T``."""
        return self._scheme(
            head_dim,
            [
                TransformArgs(targets=[m.attn], location="q_attn", ignore=self.ignore),
                TransformArgs(targets=[m.attn], location="k_cache", ignore=self.ignore),
            ],
            online=True,
        )

    def _r4_schemes(self, m: SpinQuantMapping) -> dict[str, TransformScheme]:
        """``x -> x R`` at down_proj's input (online), ``W -> W R`` fused."""
        return {
            "R4": self._scheme(
                self.r4_block_size,
                [
                    TransformArgs(targets=[*m.mlp_out], location="input", ignore=self.ignore),
                    TransformArgs(targets=[*m.mlp_out], location="weight_input", inverse=True, ignore=self.ignore),
                ],
                online=True,
            )
        }

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
        """A quantization modifier before the rotation would compute its scales, or
        quantize, before the weights are rotated."""
        check_before_quantizers(self, "rotations must be fused before the weights are quantized")
        around = modifiers_around(self)
        later = [type(m).__name__ for m in (around[1] if around else []) if type(m).__name__ in ("SpinQuantModifier", "QuIPModifier")]
        if later:
            logger.warning(
                f"{', '.join(later)} comes after {type(self).__name__}: its rotation will be "
                f"applied on top of this one and regroup the weights. Put {type(self).__name__} "
                "last among the rotations so that quantization sees its grouping."
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


def _check_rotations_supported(model: torch.nn.Module, rotations: list, name: str) -> None:
    model_type = getattr(model.config, "model_type", None)
    refused = {r: why for r, why in UNSUPPORTED_ROTATIONS.get(model_type, {}).items() if r in rotations}
    if refused:
        rotation, why = next(iter(refused.items()))
        raise ValueError(f"{name} cannot apply {rotation} to {model_type}: {why}.")


def _linearize_experts(model: torch.nn.Module) -> None:
    """Fused 3-D expert weights become one Linear per expert projection, as oneshot
    does before any modifier runs (so ``rotate`` without oneshot sees the same)."""
    from llmcompressor.modeling.moe.linearize import get_non_linearized_moes, linearize_moe

    if get_non_linearized_moes(model):
        logger.info("linearizing the experts (one Linear per expert projection) to rotate them")
        linearize_moe(model)


# config fields that size a down_proj's input: a dense MLP, the routed experts, a shared expert
MLP_WIDTH_FIELDS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")


def mlp_widths(config, named: bool = False):
    """The input widths of the model's down_projs (``{field: width}`` when ``named``)."""
    widths = {f: getattr(config, f) for f in MLP_WIDTH_FIELDS if getattr(config, f, None)}
    return widths if named else list(widths.values())


def head_dim_of(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim or config.hidden_size // config.num_attention_heads


def _check_not_quantized(model: torch.nn.Module, name: str) -> None:
    quantized = [
        module_name
        for module_name, module in model.named_modules()
        if getattr(module, "quantization_scheme", None) is not None
    ]
    if quantized:
        raise ValueError(
            f"{len(quantized)} modules (e.g. {quantized[0]}) already carry a quantization "
            f"scheme; rotations must be fused into full-precision weights. Put {name} before "
            "any quantization modifier and start from an unquantized checkpoint."
        )


def _check_targets(model: torch.nn.Module, config: TransformConfig, name: str) -> None:
    """Every rotation must cover all of its path (ignore may not split it) and fit
    every module it touches; checked before anything is modified."""
    for group, scheme in config.config_groups.items():
        for args in scheme.apply:
            matched = dict(match_named_modules(model, args.targets))
            kept = dict(match_named_modules(model, args.targets, args.ignore))
            if not matched:
                raise ValueError(
                    f"{group} targets {args.targets} match no module of the model; check "
                    "mappings"
                )
            dropped = sorted(set(matched) - set(kept))
            if dropped and group == "R1":
                raise ValueError(
                    f"ignore removes {dropped[:3]} from R1, but R1 rotates the residual "
                    "stream that every one of its readers and writers shares: leaving one "
                    f"out changes the model's output. Remove them from {name}.ignore "
                    "(to keep a layer unquantized, ignore it in the quantization modifier), "
                    "or drop R1 from rotations."
                )
            if args.location in ("q_attn", "k_cache"):
                continue  # per head: head_dim was checked with the block sizes
            for module_name, module in kept.items():
                size = transformed_size(module, args.location)
                if size % scheme.head_dim:
                    raise ValueError(
                        f"{group} block {scheme.head_dim} does not divide {module_name}'s "
                        f"{args.location} size {size}; choose a block size that divides it"
                    )
    if "R2" in config.config_groups:
        v_args, o_args = config.config_groups["R2"].apply
        check_paired(model, v_args, o_args, f"R2 needs both or neither of a layer's v_proj and o_proj in {name}.ignore")


def check_paired(model: torch.nn.Module, a: TransformArgs, b: TransformArgs, fix: str) -> None:
    """Two halves of one rotation must reach the same parent modules (layers)."""
    parents_a = {n.rsplit(".", 1)[0] for n, _ in match_named_modules(model, a.targets, a.ignore)}
    parents_b = {n.rsplit(".", 1)[0] for n, _ in match_named_modules(model, b.targets, b.ignore)}
    if parents_a != parents_b:
        odd = sorted(parents_a ^ parents_b)
        raise ValueError(f"ignore rotates the two sides of {odd[:3]} differently; {fix}")


def transformed_size(module: torch.nn.Module, location: str) -> int:
    """The width a transform at ``location`` of ``module`` (Linear or Embedding) acts on."""
    if isinstance(module, torch.nn.Embedding):
        return module.embedding_dim if location == "weight_output" else module.num_embeddings
    if is_linear_like(type(module)):
        out_features, in_features = module.weight.shape
        return in_features if location in ("weight_input", "input") else out_features
    raise ValueError(
        f"{type(module).__name__} cannot be rotated; mappings must name Linear or "
        "Embedding modules (or a router in gsr_plugin.transform.LINEAR_LIKE_TYPES)"
    )


def _record_transform_config(model: torch.nn.Module, config: TransformConfig) -> None:
    """Attach ``config`` for serialization (``quantization_config.transform_config``),
    merged after any transforms an earlier modifier recorded."""
    existing = getattr(model, TRANSFORM_CONFIG_NAME, None)
    if existing is None:
        setattr(model, TRANSFORM_CONFIG_NAME, config.model_copy(deep=True))
    else:
        existing.merge(config.model_copy(deep=True))
