"""FRTQ's guard: a learned rotation is kept only where it quantizes held-out tokens
better than the rotation it started from. Torch only.

The measure is the *quantized output error* of the linears a rotation changes, on
calibration tokens the learning never saw, with round-to-nearest on the problem's
grids (``gsr_plugin.learn.objectives.rounding_error``): for a linear with input ``x``
and weight ``W`` in the rotated basis,

    e = ||Q_a(x) Q_w(W)^T - x W^T||_F^2 / ||x W^T||_F^2

(``Q_a`` the identity without an activation grid). With ``calibrated_on`` (the
learning tokens), ``Q_w`` is GPTQ instead (``gsr_plugin.learn.gptq``: the rounding
error of each column corrected on the later ones, with the Hessian of those tokens
in the same rotated basis), so a rotation is judged by what the quantizer that
follows it makes of it, on tokens GPTQ did not see either (down_proj, whose inputs are
not cached, keeps its round-to-nearest weight error). R1 is judged on every layer at
once (it is one matrix): the mean of ``e`` over the readers of the stream (q, k, v,
the MLP inputs), o_proj (R1 on its outputs) and, for down_proj (whose inputs are not
cached), its relative weight error ``||Q_w(W) - W||^2 / ||W||^2``. Each layer's R2 is
judged on its v_proj and o_proj, with R1 as decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from gsr_plugin.learn.frtq import FRTQProblem, Grid
from gsr_plugin.learn.gptq import gptq, grid_rounding, hessian
from gsr_plugin.learn.objectives import rounding_error
from gsr_plugin.learn.orthogonal import rotate_inputs, rotate_output_blocks

__all__ = ["GuardDecision", "quantized_output_error", "layer_errors", "guard", "guard_clips", "evidence", "VERDICTS"]


def _quantize(x: Tensor, grid: Grid | None, per_row: bool = False, clip: float = 1.0) -> Tensor:
    if grid is None:
        return x
    group = None if per_row else grid.group_size
    if group is not None and x.shape[-1] % group:
        group = None
    return x + rounding_error(x, grid.bits, grid.symmetric, group, clip)


def _quantize_weight(w: Tensor, grid: Grid | None, calibration: Tensor | None) -> Tensor:
    if grid is None or calibration is None:
        return _quantize(w, grid)
    group = grid.group_size if grid.group_size and w.shape[-1] % grid.group_size == 0 else None
    return gptq(w, hessian(calibration), grid_rounding(w, grid.bits, grid.symmetric, group))


def quantized_output_error(
    x: Tensor, w: Tensor, activation_grid: Grid | None, weight_grid: Grid | None, clip: float = 1.0,
    calibration: Tensor | None = None,
) -> float:
    """``||Q_a(x) Q_w(w)^T - x w^T||^2 / ||x w^T||^2`` (activations: one scale per token,
    its range times ``clip``; ``Q_w``: round to nearest, or GPTQ calibrated on the
    inputs ``calibration`` where given)."""
    x, w = x.double(), w.double()
    exact = x @ w.T
    quantized = _quantize(x, activation_grid, per_row=True, clip=clip) @ _quantize_weight(
        w, weight_grid, calibration).T
    return float((quantized - exact).pow(2).sum() / exact.pow(2).sum().clamp_min(1e-30))


def _layer_inputs(problem: FRTQProblem, l: int, r1: Tensor, r2: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Layer ``l``'s attention input, MLP input and o_proj input (None: not cached) in
    the rotated basis."""
    per = problem.stream.shape[0] // (2 * len(problem.layers))
    attention_in = rotate_inputs(problem.stream[2 * l * per:(2 * l + 1) * per].double(), r1)
    mlp_in = rotate_inputs(problem.stream[(2 * l + 1) * per:(2 * l + 2) * per].double(), r1)
    o_in = None
    if problem.o_inputs:
        o_in = problem.o_inputs[l].double()
        if r2 is not None:
            o_in = o_in @ r2[l].double()
        o_in = o_in.reshape(o_in.shape[0], -1)
    return attention_in, mlp_in, o_in


def layer_errors(
    problem: FRTQProblem, r1: Tensor, r2: Tensor | None, clips: dict[str, Tensor] | None = None,
    calibrated_on: FRTQProblem | None = None,
) -> list[dict[str, float]]:
    """Per layer, the quantized output error of each kind of linear under ``r1``
    (``(m, k, k)`` blocks) and ``r2`` (``(layers, head_dim, head_dim)`` or None), on
    the problem's tokens (``stream``: ``2 layers`` equal runs of tokens, the attention
    and MLP inputs of each layer in turn; ``o_inputs``), with the activation ``clips``
    (``{"stream": (2 layers,), "o": (layers,)}``) where given; weights rounded to
    nearest, or by GPTQ on ``calibrated_on``'s tokens (the same layers and weights)."""
    a, w = problem.activation_grid, problem.weight_grid
    layers = len(problem.layers)
    if problem.stream is None or not layers:
        raise ValueError("the guard needs held-out tokens and the sampled weights of every layer")
    if calibrated_on is not None and (calibrated_on.stream is None or len(calibrated_on.layers) != layers
                                      or bool(calibrated_on.o_inputs) != bool(problem.o_inputs)):
        raise ValueError("GPTQ's calibration tokens must be cached for the same layers and inputs as the held-out ones")
    out = []
    clip = lambda kind, index: float(clips[kind][index]) if clips and kind in clips else 1.0  # noqa: E731
    for l, lw in enumerate(problem.layers):
        attention_clip, mlp_clip = clip("stream", 2 * l), clip("stream", 2 * l + 1)
        attention_in, mlp_in, o_in = _layer_inputs(problem, l, r1, r2)
        cal = _layer_inputs(calibrated_on, l, r1, r2) if calibrated_on is not None else (None, None, None)
        readers = rotate_inputs(lw.readers.double(), r1)
        split = lw.attention_readers if lw.attention_readers is not None else 0
        errors = {}
        if split:
            errors["attention_readers"] = quantized_output_error(
                attention_in, readers[:split], a, w, attention_clip, cal[0])
        errors["mlp_readers"] = quantized_output_error(mlp_in, readers[split:], a, w, mlp_clip, cal[1])
        v = lw.v.double()
        if r2 is not None:
            v = rotate_output_blocks(v, r2[l].double().expand(v.shape[0] // r2.shape[-1], -1, -1))
        errors["v_proj"] = quantized_output_error(attention_in, rotate_inputs(v, r1), a, w, attention_clip, cal[0])
        o = rotate_output_blocks(lw.o.double(), r1[lw.o_blocks])
        if o_in is not None:
            if r2 is not None:
                o = rotate_inputs(o, r2[l].double().expand(o.shape[-1] // r2.shape[-1], -1, -1))
            errors["o_proj"] = quantized_output_error(o_in, o, a, w, clip("o", l), cal[2])
        down = rotate_output_blocks(lw.down.double(), r1[lw.down_blocks])
        errors["down_proj_weight"] = float(
            (_quantize(down, w) - down).pow(2).sum() / down.pow(2).sum().clamp_min(1e-30)
        ) if w is not None else 0.0
        out.append(errors)
    return out


def _mean(errors: list[dict[str, float]], keys=None) -> float:
    values = [v for e in errors for k, v in e.items() if keys is None or k in keys]
    return sum(values) / len(values)


@dataclass
class GuardDecision:
    """What the guard kept: ``r1`` and ``r2`` (learned where they won), and the
    held-out errors behind each choice."""

    r1: Tensor
    r2: Tensor | None
    r1_learned: bool
    r1_error: dict[str, float]  # {"init": e, "learned": e}
    r2_learned: list[bool] = field(default_factory=list)
    r2_error: list[dict[str, float]] = field(default_factory=list)

    def record(self) -> dict:
        return {
            "R1": "learned" if self.r1_learned else "init",
            "R1_error": {k: round(v, 6) for k, v in self.r1_error.items()},
            "R2_learned_layers": [i for i, kept in enumerate(self.r2_learned) if kept],
            "R2_layers": len(self.r2_learned),
            "R2_error": [{k: round(v, 6) for k, v in e.items()} for e in self.r2_error],
        }


@torch.no_grad()
def guard(
    held_out: FRTQProblem,
    r1_init: Tensor,
    r1_learned: Tensor,
    r2_init: Tensor | None = None,
    r2_learned: Tensor | None = None,
    calibrated_on: FRTQProblem | None = None,
) -> GuardDecision:
    """Keep the learned R1 only where its held-out error (all layers, R2 at its
    initialization) is below the initialization's; then each layer's learned R2 only
    where its v_proj and o_proj error (under the chosen R1) is below its
    initialization's. Ties keep the initialization. Weights are rounded to nearest,
    or by GPTQ calibrated on ``calibrated_on``'s tokens (``layer_errors``)."""
    r1_init, r1_learned = r1_init.double(), r1_learned.double()
    r2_init = None if r2_init is None else r2_init.double()
    errors = lambda r1, r2: layer_errors(held_out, r1, r2, calibrated_on=calibrated_on)  # noqa: E731
    r1_error = {"init": _mean(errors(r1_init, r2_init)), "learned": _mean(errors(r1_learned, r2_init))}
    keep_r1 = r1_error["learned"] < r1_error["init"]
    r1 = r1_learned if keep_r1 else r1_init
    decision = GuardDecision(r1=r1, r2=r2_init, r1_learned=keep_r1, r1_error=r1_error)
    if r2_learned is None or r2_init is None:
        decision.r2 = r2_learned if r2_init is None else r2_init
        return decision
    r2_learned = r2_learned.double()
    head_kinds = {"v_proj", "o_proj"}
    before, after = errors(r1, r2_init), errors(r1, r2_learned)
    chosen = []
    for l in range(r2_init.shape[0]):
        errors = {"init": _mean([before[l]], head_kinds), "learned": _mean([after[l]], head_kinds)}
        keep = errors["learned"] < errors["init"]
        decision.r2_learned.append(keep)
        decision.r2_error.append(errors)
        chosen.append(r2_learned[l] if keep else r2_init[l])
    decision.r2 = torch.stack(chosen)
    return decision


# which linears' errors each learned clip changes
_CLIP_KINDS = {("stream", 0): ("attention_readers", "v_proj"), ("stream", 1): ("mlp_readers",), ("o", 0): ("o_proj",)}


@torch.no_grad()
def guard_clips(
    held_out: FRTQProblem, r1: Tensor, r2: Tensor | None, clips: dict[str, Tensor]
) -> tuple[dict[str, Tensor], dict]:
    """Each learned clip kept only where the linears it feeds quantize held-out tokens
    better with it than without (ratio 1); returns the kept clips (1 elsewhere) and a
    record ``{"kept": n, "of": m}``."""
    without = layer_errors(held_out, r1, r2)
    with_clip = layer_errors(held_out, r1, r2, clips)
    kept = {kind: values.clone() for kind, values in clips.items()}
    count = total = 0
    for kind, values in kept.items():
        for index in range(values.shape[0]):
            layer, position = (index // 2, index % 2) if kind == "stream" else (index, 0)
            keys = _CLIP_KINDS[(kind, position)]
            if not all(k in without[layer] for k in keys):
                continue
            total += 1
            better = sum(with_clip[layer][k] for k in keys) < sum(without[layer][k] for k in keys)
            if better:
                count += 1
            else:
                values[index] = 1.0
    return kept, {"clips_kept": count, "clips": total}


# what a layer's errors say about a learned rotation (``evidence``)
VERDICTS = {
    "gains": "lower error on the learning tokens and on held-out ones",
    "overfits": "lower error on the learning tokens only",
    "objective disagrees": "the objective fell, the output error on the very tokens it learned from did not",
    "GPTQ absorbs it": "lower round-to-nearest error on both, but not once GPTQ has corrected the rounding",
}


@torch.no_grad()
def evidence(
    seen: FRTQProblem, held_out: FRTQProblem, r1_init: Tensor, r1: Tensor,
    r2_init: Tensor | None = None, r2: Tensor | None = None, after_gptq: bool = False,
) -> list[dict]:
    """Why a learned rotation wins or loses, per layer: the quantized output error
    (mean over the layer's linears, ``layer_errors``) under the initialization and
    under the learned ``r1``/``r2``, on the tokens the learning saw (``seen``) and on
    held-out ones, and the verdict (``VERDICTS``): with ``e`` the error,

    * ``gains``: ``e_learned < e_init`` on both;
    * ``overfits``: on the seen tokens only (too few tokens per input);
    * ``objective disagrees``: not even on the seen tokens, though the ratio it
      minimized fell (the grid-to-std ratio is a proxy of the output error);
    * ``GPTQ absorbs it`` (with ``after_gptq``: the held-out error also with GPTQ
      calibrated on the seen tokens, ``held_out_gptq``): a gain in both round-to-
      nearest errors that GPTQ's own correction makes up for the initialization."""
    to = lambda t: None if t is None else t.double()  # noqa: E731
    r1_init, r1, r2_init, r2 = to(r1_init), to(r1), to(r2_init), to(r2)
    errors = {name: (layer_errors(problem, r1_init, r2_init), layer_errors(problem, r1, r2))
              for name, problem in (("seen", seen), ("held_out", held_out))}
    if after_gptq:
        errors["held_out_gptq"] = tuple(layer_errors(held_out, a, b, calibrated_on=seen)
                                        for a, b in ((r1_init, r2_init), (r1, r2)))
    out = []
    for layer in range(len(errors["seen"][0])):
        row = {name: {"init": _mean([before[layer]]), "learned": _mean([after[layer]])}
               for name, (before, after) in errors.items()}
        if row["seen"]["learned"] >= row["seen"]["init"]:
            row["verdict"] = "objective disagrees"
        elif row["held_out"]["learned"] >= row["held_out"]["init"]:
            row["verdict"] = "overfits"
        elif after_gptq and row["held_out_gptq"]["learned"] >= row["held_out_gptq"]["init"]:
            row["verdict"] = "GPTQ absorbs it"
        else:
            row["verdict"] = "gains"
        out.append(row)
    return out
