"""``FRTQModifier``: learned orthogonal R1/R2 that minimize the grid-to-std ratio of
what gets quantized, from the calibration set, with no fine-tuning.

FRTQ ("Flattened Rotation TSVD Quantization") learns rotations at the model's
function-invariant points (R1: the residual stream; R2: each layer's heads) by
minimizing ``rho = step / std`` of the activations and weight groups the quantizer
sees, and keeps one online rotation, the fixed grouped Walsh R4 at down_proj's input.
This file is the glue: it reads the quantizer's grid from the recipe
(``gsr_plugin.session``), has the problem read off the model (``gsr_plugin.calibration``:
a token subsample of the activations, sampled weights), hands it to
``gsr_plugin.learn.frtq`` (the math, torch only), and fuses the learned matrices through the lifecycle every
rotation shares (``gsr_plugin.rotation``), so the model computes the same function to
float rounding. Learning runs on the cached activations, with no backpropagation
through the network (as DartQuant, NeurIPS 2025, does).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from compressed_tensors import match_named_modules
from compressed_tensors.transform import TransformFactory, TransformScheme
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator

from gsr_plugin.calibration import frtq_problem, layer_modules
from gsr_plugin.learn.frtq import Grid, LearnResult, initial_blocks, learn_rotations
from gsr_plugin.learn.guard import guard as guard_rotations
from gsr_plugin.learn.guard import evidence, guard_clips
from gsr_plugin.modifiers.gsr import GSRModifier
from gsr_plugin.quantizers import INPUT_CLIP_ATTR, save_activation_clips_with
from gsr_plugin.rotation import head_dim_of
from gsr_plugin.saving import write_beside_checkpoint
from gsr_plugin.session import following_quantizer_args, is_float_format
from gsr_plugin.transform import LEARNED_ORTHOGONAL, LearnedRotationFactory
from gsr_plugin.walsh import grouped_rotation

__all__ = ["FRTQModifier", "ROTATIONS_FILE", "load_rotations", "save_rotations"]

# in a subfolder: vLLM loads every *.safetensors at a checkpoint's top level as weights
ROTATIONS_FILE = "frtq/rotations.safetensors"
FORMAT = "gsr-plugin.frtq.v1"


class FRTQModifier(GSRModifier):
    """
    FRTQ's learned rotations: R1 (residual stream) and R2 (per layer, every head)
    chosen to minimize the grid-to-std ratio of the quantized activations and weight
    groups; R3/R4 as in ``GSRModifier`` (fixed grouped Walsh, online).

    Put it before the quantization modifier, in the same ``oneshot``: it learns from
    oneshot's calibration dataset and takes the grid (bits, group size, symmetry) from
    the quantization modifier that follows, unless the ``weight_*`` and
    ``activation_bits`` fields say otherwise. With ``init: gsr`` and ``steps: 0`` it is
    exactly ``GSRModifier``. ``ordering``, ``randomize``, ``r4_block_size`` and
    ``fold_r4_permutation`` apply to the fixed R4.

    Lifecycle: as ``GSRModifier`` (``gsr_plugin.rotation``); after the norms are fused
    and before the rotations: cache activations (``tokens`` per rotated input), learn
    (``steps`` of Adam on the generators of ``Q0 expm(A - A^T)``), log the objective
    before and after, then fuse the learned matrices. ``save_pretrained`` then also
    writes them to ``frtq/rotations.safetensors`` beside the checkpoint.

    :param init: ``gsr`` (sequency Walsh blocks, as GSR), ``natural`` (Sylvester-order
        blocks) or ``random`` (seeded random orthogonal)
    :param structure: ``block`` (R1 block-diagonal with blocks of ``block_size``, each
        learned: GSR's outlier isolation kept) or ``full`` (one hidden x hidden matrix,
        initialized as ``init`` in blocks of ``block_size``)
    :param steps: learning steps (0: the initialization, no data needed)
    :param lr: Adam's learning rate on the skew-symmetric generators
    :param tokens: calibration tokens kept per rotated input of each layer (bounds the
        activation cache: ``3 x layers x tokens x hidden`` floats)
    :param weight_rows: rows of each weight in the objective (a seeded sample; o_proj
        and down_proj, rotated on their output side, take whole blocks of R1 rows)
    :param activation_factor: weight of the activation term (0: weights only)
    :param weight_factor: weight of the weight-group term (0: activations only)
    :param smooth_max: surrogate of the max in the ratio: ``logsumexp`` or ``pnorm``
    :param sharpness: ``s`` of logsumexp (on standardized values) or ``p`` of pnorm
    :param weight_bits: weight grid bits (default: the following quantizer's)
    :param weight_group_size: inputs per weight scale, or ``channel`` (default: the
        quantizer's)
    :param weight_symmetric: symmetric weight grid (default: the quantizer's)
    :param activation_bits: activation grid bits (per token), 16 for none (default:
        the quantizer's input activations)
    :param guard: keep a learned matrix only where it beats its initialization on
        held-out calibration tokens (``gsr_plugin.learn.guard``: the quantized output
        error of the linears it changes; R1 once, R2 per layer); the decision and the
        errors go to ``learned["guard"]``, with the evidence per layer
        (``learn.guard.evidence``: the learned matrices' error on the learning tokens
        and on held-out ones, and whether they gain, overfit, or the objective
        disagrees). Needs oneshot's dataset (skipped, with a warning, without one)
    :param guard_quantizer: how the guard quantizes the weights it judges: ``rtn``
        (round to nearest, as the objective sees them) or ``gptq`` (GPTQ calibrated on
        the learning tokens, ``learn.gptq``: judges a rotation by what the GPTQModifier
        after it makes of it; the evidence then also gives the held-out error after
        GPTQ per layer, and the verdict ``GPTQ absorbs it``). Slower: one GPTQ of the
        sampled rows per linear and candidate
    :param learn_clip: also learn a clip ratio for each activation input the rotations
        change (each layer's attention input, MLP input and o_proj input), in
        alternating updates with R1/R2 on the clipped objective (the clipped grid's
        ratio plus the clipping error; ``learn.objectives.clipped_ratio``). The ratios
        go to the linears that read those inputs (``input_clip_ratio``, saved in
        ``clip/``); with ``guard``, each is kept only where it lowers the held-out error.
        Needs quantized activations (one scale per token)
    :param clip_floor: the smallest clip ratio learned
    :param holdout_tokens: held-out tokens per rotated input of each layer, drawn from
        positions the learning sample left (the learning sample is unchanged)
    :param rotations_from: a directory holding ``frtq/rotations.safetensors`` (a
        checkpoint this modifier wrote): apply those matrices, learn nothing
    :param learned: filled in after learning (the objective and its exact terms before
        and after, steps, seconds): a record in the saved recipe, ignored on input
    """

    init: Literal["gsr", "natural", "random"] = Field(default="gsr")
    structure: Literal["block", "full"] = Field(default="block")
    steps: int = Field(default=100, ge=0)
    lr: float = Field(default=1e-2, gt=0)
    tokens: int = Field(default=256, ge=1)
    weight_rows: int = Field(default=64, ge=1)
    activation_factor: float = Field(default=1.0, ge=0)
    weight_factor: float = Field(default=1.0, ge=0)
    smooth_max: Literal["logsumexp", "pnorm"] = Field(default="logsumexp")
    sharpness: float = Field(default=8.0, gt=0)
    weight_bits: int | None = Field(default=None, ge=1, le=16)
    weight_group_size: int | Literal["channel"] | None = Field(default=None)
    weight_symmetric: bool | None = Field(default=None)
    activation_bits: int | None = Field(default=None, ge=1, le=16)
    guard: bool = Field(default=True)
    guard_quantizer: Literal["rtn", "gptq"] = Field(default="rtn")
    learn_clip: bool = Field(default=False)
    clip_floor: float = Field(default=0.5, gt=0, lt=1)
    holdout_tokens: int = Field(default=128, ge=1)
    rotations_from: str | None = Field(default=None)
    learned: dict | None = Field(default=None)

    _weight_grid: Grid | None = PrivateAttr(default=None)
    _activation_grid: Grid | None = PrivateAttr(default=None)
    _r1: torch.Tensor | None = PrivateAttr(default=None)
    _r2: dict[str, torch.Tensor] | None = PrivateAttr(default=None)
    _calibration: object = PrivateAttr(default=None)
    _guarded: dict | None = PrivateAttr(default=None)

    @field_validator("init", "structure", "smooth_max", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _data_for_explicit_activations(self):
        """Alone in a recipe with activation_bits set, FRTQ is what needs the data
        (llm-compressor picks its pipeline and dataloader by this flag)."""
        if self.activation_bits is not None and self.activation_bits < 16 and self.steps > 0 and not self.rotations_from:
            self.requires_calibration_data = True
        return self

    @property
    def learned_rotations(self) -> list[str]:
        return [r for r in ("R1", "R2") if r in self.rotations]

    def describe(self) -> str:
        return f"FRTQ {'+'.join(self.rotations)} ({self.structure}, init {self.init}, block {self.block_size})"

    def _r1_size(self, config) -> int:
        return config.hidden_size if self.structure == "full" else self.block_size

    # ------------------------------------------------------------------ planning

    def on_initialize(self, state, **kwargs) -> bool:
        if not self.learned_rotations:
            raise ValueError(
                "FRTQModifier learns R1 and/or R2, and rotations has neither; add them, or "
                "use GSRModifier for R3/R4 alone"
            )
        initialized = super().on_initialize(state, **kwargs)
        model = state.model
        self._weight_grid, self._activation_grid = self._resolve_grids()
        if self._weight_grid is None and self._activation_grid is None and self.rotations_from is None:
            raise ValueError(
                "FRTQModifier has nothing to minimize: weight_factor is 0 and the recipe "
                "quantizes no activations (or activation_factor is 0)"
            )
        if self.learn_clip and self.rotations_from is None and (
            self._activation_grid is None or self._activation_grid.group_size is not None or self.steps == 0
        ):
            raise ValueError(
                "FRTQModifier learn_clip learns the clip of quantized activations (one scale per token) while it "
                "learns the rotations: use it with a recipe that quantizes activations (e.g. W4A4) and steps > 0, "
                "or drop learn_clip"
            )
        groups = self._transform_config.config_groups
        for name in self.learned_rotations:
            size = self._r1_size(model.config) if name == "R1" else head_dim_of(model.config)
            groups[name] = groups[name].model_copy(update={"type": LEARNED_ORTHOGONAL, "head_dim": size})
        if self.rotations_from is not None:
            config = model.config
            self._r1, self._r2 = load_rotations(
                self.rotations_from, self.learned_rotations, self._r1_size(config), self._attention_names(model),
                width=config.hidden_size, head_dim=head_dim_of(config),
            )
        elif self.steps > 0 and self._activation_grid is not None and state.data.calib is None:
            raise ValueError(
                "FRTQModifier learns from calibration activations, and oneshot was given no "
                "dataset: pass dataset= to oneshot (the data GPTQ calibrates on), or set "
                "activation_factor=0 (weights only), steps=0, or rotations_from=DIR"
            )
        self._calibration = state.data.calib
        return initialized

    def _resolve_grids(self) -> tuple[Grid | None, Grid | None]:
        """The weight and activation grids (None where that term is off): explicit
        fields, else the first quantization modifier after this one in the recipe."""
        weights, activations = following_quantizer_args(self)
        if is_float_format(weights) and self.weight_bits is None:
            raise ValueError(
                "FRTQModifier learns for an integer grid (uniform steps: rho = step / std), and the "
                f"quantizer after it uses {weights.num_bits}-bit floating-point weights (FP4/FP8), whose "
                "steps are not uniform. Use GSRModifier before FP4 schemes, or set weight_bits, "
                "weight_group_size and activation_bits to learn for an integer proxy of that grid"
            )
        bits = self.weight_bits or (weights.num_bits if weights is not None else None)
        if bits is None:
            raise ValueError(
                "FRTQModifier needs the weight grid it learns for: put it before a "
                "quantization modifier (e.g. GPTQModifier) in the same recipe, or set "
                "weight_bits (and weight_group_size, weight_symmetric, activation_bits)"
            )
        if self.weight_group_size is not None:
            group = None if self.weight_group_size == "channel" else self.weight_group_size
        else:
            group = weights.group_size if weights is not None and str(weights.strategy) == "group" else None
        if self.weight_symmetric is not None:
            symmetric = self.weight_symmetric
        else:
            symmetric = weights.symmetric if weights is not None else True
        weight_grid = Grid(bits, symmetric, group) if self.weight_factor > 0 else None
        act_bits = self.activation_bits or (activations.num_bits if activations is not None else 16)
        if act_bits >= 16 or self.activation_factor == 0:
            return weight_grid, None
        act_symmetric = activations.symmetric if activations is not None else True
        act_group = activations.group_size if activations is not None and str(activations.strategy) == "group" else None
        return weight_grid, Grid(act_bits, act_symmetric, act_group)

    def pin_grid(self, weights, activations) -> None:
        """Fill the unset grid fields from QuantizationArgs (to run the rotation part
        of a recipe without its quantizer, as ``gsr diagnose`` does)."""
        if weights is not None:
            self.weight_bits = self.weight_bits or weights.num_bits
            if self.weight_group_size is None:
                self.weight_group_size = weights.group_size if str(weights.strategy) == "group" else "channel"
            if self.weight_symmetric is None:
                self.weight_symmetric = weights.symmetric
        if self.activation_bits is None:
            self.activation_bits = activations.num_bits if activations is not None else 16

    def _attention_names(self, model: torch.nn.Module) -> list[str]:
        """One name per layer (the parent of its v_proj): the keys of R2."""
        return [name.rsplit(".", 1)[0] for name, _ in match_named_modules(model, [self._mapping.attn_v])]

    # ------------------------------------------------------------------ learning

    def _prepare_fusion(self, model: torch.nn.Module) -> None:
        if self.rotations_from is None:
            result = self._learn(model)
            self._r1 = result.r1 if "R1" in self.learned_rotations else None
            if "R2" in self.learned_rotations:
                self._r2 = dict(zip(self._attention_names(model), result.r2.unbind(0)))
            self.learned = _record(result) | ({"guard": self._guarded} if self._guarded else {})
            logger.info(
                f"FRTQ objective {result.objective_before:.4f} -> {result.objective_after:.4f} "
                f"in {result.steps} steps ({result.seconds:.1f}s); exact ratios "
                + ", ".join(f"{k} {result.before[k]:.3f} -> {result.after[k]:.3f}" for k in result.before)
            )
        write_beside_checkpoint(model, "frtq", lambda directory: save_rotations(directory, self))

    def _factory(self, name: str, scheme: TransformScheme, index: int) -> TransformFactory:
        if name == "R1" and self._r1 is not None:
            return LearnedRotationFactory(name, scheme, blocks=self._r1)
        if name == "R2" and self._r2 is not None:
            return LearnedRotationFactory(name, scheme, blocks={k: v[None] for k, v in self._r2.items()})
        return super()._factory(name, scheme, index)

    def _learn(self, model: torch.nn.Module) -> LearnResult:
        config = model.config
        head_dim = head_dim_of(config)
        layers = len(self._attention_names(model))
        if "R1" in self.learned_rotations:
            r1_init = initial_blocks(self.init, self._r1_size(config), config.hidden_size, self.block_size, self.seed)
        else:
            r1_init = torch.eye(config.hidden_size, dtype=torch.float64)[None]
        r2_init = None
        if "R2" in self.learned_rotations:
            r2_init = torch.cat(
                [initial_blocks(self.init, head_dim, head_dim, head_dim, self.seed + 1 + layer) for layer in range(layers)]
            )
        r4 = None
        if "R4" in self.rotations:
            r4 = grouped_rotation(config.intermediate_size, self.r4_block_size, self.ordering, dtype=torch.float32)
        guarding = self.guard and self.steps > 0
        if guarding and self._calibration is None:
            logger.warning("FRTQ guard skipped: oneshot was given no dataset, so no held-out tokens to check "
                           "the learned rotations on (pass dataset=, or set guard: false to silence this)")
            guarding = False
        problem, held_out, seen = frtq_problem(
            model, self._mapping,
            learn_r1="R1" in self.learned_rotations, learn_r2="R2" in self.learned_rotations,
            r1_block=r1_init.shape[-1], activation_grid=self._activation_grid, weight_grid=self._weight_grid,
            calibration=self._calibration if self.steps > 0 else None,
            tokens=self.tokens, weight_rows=self.weight_rows, r4=r4, seed=self.seed,
            holdout=self.holdout_tokens if guarding else 0,
            activation_factor=self.activation_factor, weight_factor=self.weight_factor,
            smooth=self.smooth_max, sharpness=self.sharpness,
        )
        if guarding and held_out is None:
            logger.warning(f"FRTQ guard skipped: the learning sample ({self.tokens} tokens per input) took every "
                           "calibration token, none is left to check it on; pass more calibration samples "
                           "or lower tokens")
        result = learn_rotations(problem, r1_init, r2_init, self.steps, self.lr,
                                 learn_clip=self.learn_clip, clip_floor=self.clip_floor)
        if held_out is not None:
            start = time.perf_counter()
            after_gptq = self.guard_quantizer == "gptq" and self._weight_grid is not None
            layers = evidence(seen, held_out, r1_init, result.r1, r2_init, result.r2, after_gptq=after_gptq)
            decision = guard_rotations(held_out, r1_init, result.r1, r2_init, result.r2,
                                       calibrated_on=seen if after_gptq else None)
            result.r1, result.r2 = decision.r1, decision.r2
            self._guarded = decision.record() | {"quantizer": "gptq" if after_gptq else "rtn",
                                                 "layers": _rounded(layers)}
            verdicts = Counter(row["verdict"] for row in layers)
            logger.info("FRTQ evidence per layer (quantized output error, learning vs held-out tokens): "
                        + ", ".join(f"{n} {v}" for v, n in verdicts.items()))
            logger.info(
                f"FRTQ guard: R1 {self._guarded['R1']} (held-out error init {decision.r1_error['init']:.5f}, "
                f"learned {decision.r1_error['learned']:.5f}); R2 learned in "
                f"{len(self._guarded['R2_learned_layers'])} of {self._guarded['R2_layers']} layers"
            )
            if result.clips is not None:
                result.clips, kept = guard_clips(held_out, result.r1, result.r2, result.clips)
                self._guarded |= kept
                logger.info(f"FRTQ guard: {kept['clips_kept']} of {kept['clips']} learned clips kept")
            self._guarded["seconds"] = round(time.perf_counter() - start, 1)
        if result.clips is not None:
            self._put_clips(model, result.clips)
        return result

    def _put_clips(self, model: torch.nn.Module, clips: dict[str, torch.Tensor]) -> None:
        """Each learned ratio onto the linears that read its input (stream run ``2 l``:
        layer ``l``'s q/k/v; ``2 l + 1``: its MLP inputs; ``o[l]``: its o_proj)."""
        layers = layer_modules(model, self._mapping)
        for l, modules in enumerate(layers):
            readers = {"stream": [(2 * l, [modules["q"], modules["k"], modules["v"]]),
                                  (2 * l + 1, list(modules["mlp_in"]))],
                       "o": [(l, [modules["o"]])]}
            for kind, entries in readers.items():
                if kind not in clips:
                    continue
                for index, targets in entries:
                    ratio = float(clips[kind][index])
                    for module in targets:
                        if ratio < 1.0:
                            setattr(module, INPUT_CLIP_ATTR, ratio)
        save_activation_clips_with(model)


def _rounded(rows: list[dict]) -> list[dict]:
    return [{k: ({e: round(x, 6) for e, x in v.items()} if isinstance(v, dict) else v) for k, v in row.items()}
            for row in rows]


def _record(result: LearnResult) -> dict:
    clips = {} if result.clips is None else {
        "clips": {k: [round(float(c), 4) for c in v] for k, v in result.clips.items()},
        "clipped_ratios_after": {k: round(v, 6) for k, v in result.clipped_after.items()},
    }
    return clips | {
        "objective_before": round(result.objective_before, 6),
        "objective_after": round(result.objective_after, 6),
        "ratios_before": {k: round(v, 6) for k, v in result.before.items()},
        "ratios_after": {k: round(v, 6) for k, v in result.after.items()},
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
    }


# ------------------------------------------------------------------ saving


def save_rotations(directory: str | Path, modifier: FRTQModifier) -> Path:
    """Write the learned matrices to ``directory/frtq/rotations.safetensors`` (R1:
    ``(m, k, k)`` blocks; R2: ``(layers, head_dim, head_dim)`` with the layer names in
    the metadata), with the settings and the objective."""
    from safetensors.torch import save_file

    tensors, metadata = {}, {"format": FORMAT, "init": modifier.init, "structure": modifier.structure}
    if modifier._r1 is not None:
        tensors["R1"] = modifier._r1.contiguous()
    if modifier._r2 is not None:
        tensors["R2"] = torch.stack(list(modifier._r2.values())).contiguous()
        metadata["R2_layers"] = json.dumps(list(modifier._r2))
    metadata["learned"] = json.dumps(modifier.learned)
    path = Path(directory) / ROTATIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_rotations(
    directory: str | Path, rotations: list[str], r1_block: int, layers: list[str], width: int, head_dim: int
):
    """(R1 blocks or None, {layer: R2} or None) from ``directory``, checked against the
    model (R1: ``(width // r1_block, r1_block, r1_block)``; R2: ``(len(layers),
    head_dim, head_dim)`` for the same layer names): ``ValueError`` naming the file and
    both shapes where they differ."""
    from safetensors import safe_open

    path = Path(directory) / ROTATIONS_FILE
    if not path.is_file():
        raise ValueError(f"rotations_from: {path} does not exist; point it to a checkpoint FRTQModifier wrote")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not an FRTQ rotation file (format {metadata.get('format')!r}, expected {FORMAT})")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    fix = "learn them for this model (drop rotations_from), or point rotations_from to a checkpoint of this model"
    r1 = r2 = None
    if "R1" in rotations:
        want = (width // r1_block, r1_block, r1_block)
        found = tuple(tensors["R1"].shape) if "R1" in tensors else "none"
        if found != want:
            raise ValueError(
                f"{path}: R1 has shape {found}, and this model needs {want} (hidden size {width} in blocks of "
                f"{r1_block}): the rotations do not fit this model; {fix}"
            )
        r1 = tensors["R1"].to(torch.float64)
    if "R2" in rotations:
        names = json.loads(metadata.get("R2_layers", "[]"))
        want = (len(layers), head_dim, head_dim)
        found = tuple(tensors["R2"].shape) if "R2" in tensors else "none"
        if found != want or names != layers:
            raise ValueError(
                f"{path}: R2 has shape {found} for layers {names[:2]}..., and this model needs {want} for its "
                f"layers {layers[:2]}...: the rotations do not fit this model; {fix}"
            )
        r2 = dict(zip(names, tensors["R2"].to(torch.float64).unbind(0)))
    return r1, r2
