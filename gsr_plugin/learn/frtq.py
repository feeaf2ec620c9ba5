"""FRTQ's learning problem: orthogonal R1 (residual stream) and R2 (per layer, every
head) that minimize the grid-to-std ratio of what gets quantized. Torch only:
``gsr_plugin.calibration`` reads the plain tensors off the model, and the modifier
(``gsr_plugin.modifiers.frtq``) hands them over.

With the stream rotated ``h -> h R1`` and each head's values ``v -> v R2_l``:

* activations (one scale per token): the inputs of q/k/v and gate/up are the
  normalized stream ``x R1``; o_proj's input is ``concat_heads(a_h R2_l)``;
* weights (one scale per group of inputs of an output row): readers of the stream
  ``W R1`` (q, k, gate, up), v_proj ``R2_l^T W R1`` (per head on the output side),
  o_proj ``R1^T W R2_l`` (per head on the input side), down_proj ``R1^T W R4`` (R4
  fixed).

Objective (lower is better), with ``rho`` of ``gsr_plugin.learn.objectives``::

    L = a * mean_tokens rho_act + w * mean_groups rho_weight

The ratios of writers (o_proj, down_proj: rotated on the output side) are taken on
whole blocks of rows (``rows`` index the blocks of R1 kept per matrix), readers on a
row sample: the mean over the sample estimates the mean over the matrix.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from gsr_plugin.learn.objectives import SmoothMax, clipped_ratio, grid_to_std_ratio
from gsr_plugin.learn.orthogonal import OrthogonalMatrices, rotate_inputs, rotate_output_blocks
from gsr_plugin.walsh import walsh_matrix

__all__ = ["Grid", "LayerWeights", "FRTQProblem", "LearnResult", "initial_blocks", "initial_clips", "learn_rotations"]


@dataclass(frozen=True)
class Grid:
    """What a quantizer does to a vector: ``bits``, ``symmetric``, and one scale per
    ``group_size`` values (None: per row / per token)."""

    bits: int
    symmetric: bool = True
    group_size: int | None = None


@dataclass
class LayerWeights:
    """One decoder layer's weights as the quantizer will see them (norm scales fused).

    :param readers: ``(r, d)`` sampled rows of q/k/gate/up (inputs: the stream)
    :param v: ``(kv_heads * head_dim, d)`` v_proj, all rows
    :param o: ``(b k, heads * head_dim)`` o_proj rows of the R1 blocks ``o_blocks``
    :param o_blocks: which R1 blocks ``o`` holds
    :param down: ``(b k, intermediate)`` down_proj rows (R4 already applied on the input
        side) of the R1 blocks ``down_blocks``
    :param down_blocks: which R1 blocks ``down`` holds
    :param attention_readers: how many of ``readers`` (the first) read the attention
        input (q, k); the rest read the MLP input (None: not recorded)
    """

    readers: Tensor
    v: Tensor
    o: Tensor
    o_blocks: Tensor
    down: Tensor
    down_blocks: Tensor
    attention_readers: int | None = None


@dataclass
class FRTQProblem:
    """Everything the objective needs, as plain tensors.

    :param stream: ``(T, d)`` residual-stream tokens at the inputs of every layer's
        attention and MLP norms (R1 rotates them; scale does not matter)
    :param o_inputs: per layer ``(T_l, heads, head_dim)`` o_proj inputs, or empty
    :param layers: per layer ``LayerWeights``, or empty (no weight term)
    :param activation_grid: grid of activations (None: 16-bit, no activation term)
    :param weight_grid: grid of weights (None: no weight term)
    :param stream_runs: ``stream`` is this many equal runs of tokens, the attention and
        MLP inputs of each layer in turn (``2 layers``; 0: not recorded). Per-input
        clips need it
    """

    stream: Tensor | None
    o_inputs: list[Tensor]
    layers: list[LayerWeights]
    activation_grid: Grid | None
    weight_grid: Grid | None
    activation_factor: float = 1.0
    weight_factor: float = 1.0
    smooth: SmoothMax = "logsumexp"
    sharpness: float = 8.0
    stream_runs: int = 0

    def _rho(self, x: Tensor, grid: Grid, smooth: SmoothMax) -> Tensor:
        return grid_to_std_ratio(x, grid.bits, grid.symmetric, grid.group_size, smooth, self.sharpness)

    def terms(
        self, r1: Tensor, r2: Tensor | None, smooth: SmoothMax | None = None, clips: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Mean ratio of each kind of quantized tensor under the rotations ``r1``
        (``(m, k, k)`` blocks) and ``r2`` (``(layers, head_dim, head_dim)`` or None:
        identity). ``smooth`` defaults to the problem's surrogate. ``clips``:
        activation clip ratios, ``{"stream": (stream_runs,), "o": (layers,)}``; the
        activations then count ``clipped_ratio`` (the clipped grid plus the clipping
        error) instead of ``rho``, with the exact max: a smooth surrogate overstates
        the range, and a learned clip would only undo that."""
        smooth = smooth or self.smooth
        out: dict[str, Tensor] = {}
        a, w = self.activation_grid, self.weight_grid
        if a is not None and self.stream is not None:
            y = rotate_inputs(self.stream, r1)
            if clips is None:
                out["act_stream"] = self._rho(y, a, smooth).mean()
            else:
                y = y.reshape(self.stream_runs, -1, y.shape[-1])
                out["act_stream"] = clipped_ratio(y, a.bits, a.symmetric, clips["stream"]).mean()
        if a is not None and self.o_inputs:
            values = []
            for l, x in enumerate(self.o_inputs):
                y = x if r2 is None else x @ r2[l]
                y = y.reshape(y.shape[0], -1)
                if clips is None:
                    values.append(self._rho(y, a, smooth))
                else:
                    values.append(clipped_ratio(y, a.bits, a.symmetric, clips["o"][l]))
            out["act_o_proj"] = torch.cat(values).mean()
        if w is not None and self.layers:
            kinds: dict[str, list[Tensor]] = {"readers": [], "v_proj": [], "o_proj": [], "down_proj": []}
            for l, lw in enumerate(self.layers):
                kinds["readers"].append(self._rho(rotate_inputs(lw.readers, r1), w, smooth).flatten())
                v = lw.v
                if r2 is not None:  # R2^T on each head's rows
                    heads = v.shape[0] // r2.shape[-1]
                    v = rotate_output_blocks(v, r2[l].expand(heads, -1, -1))
                kinds["v_proj"].append(self._rho(rotate_inputs(v, r1), w, smooth).flatten())
                o = rotate_output_blocks(lw.o, r1[lw.o_blocks])
                if r2 is not None:
                    o = rotate_inputs(o, r2[l].expand(o.shape[-1] // r2.shape[-1], -1, -1))
                kinds["o_proj"].append(self._rho(o, w, smooth).flatten())
                down = rotate_output_blocks(lw.down, r1[lw.down_blocks])
                kinds["down_proj"].append(self._rho(down, w, smooth).flatten())
            for kind, values in kinds.items():
                out[f"weight_{kind}"] = torch.cat(values).mean()
        return out

    def loss(
        self, r1: Tensor, r2: Tensor | None, smooth: SmoothMax | None = None, clips: dict[str, Tensor] | None = None
    ) -> Tensor:
        terms = self.terms(r1, r2, smooth, clips)
        act = [v for k, v in terms.items() if k.startswith("act_")]
        wgt = [v for k, v in terms.items() if k.startswith("weight_")]
        total = torch.zeros(())
        if act:
            total = total + self.activation_factor * torch.stack(act).mean()
        if wgt:
            total = total + self.weight_factor * torch.stack(wgt).mean()
        return total


def initial_blocks(init: str, size: int, width: int, block: int, seed: int) -> Tensor:
    """``(width // size, size, size)`` float64 orthogonal blocks: each is ``init`` in
    blocks of ``block`` (``gsr``: sequency Walsh blocks repeated, ``natural``:
    Sylvester-order ones; ``random``: seeded random orthogonal)."""
    count = width // size
    if init == "random":
        generator = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(count, size, size, generator=generator, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    walsh = walsh_matrix(block, "sequency" if init == "gsr" else "natural", normalized=True, dtype=torch.float64)
    one = torch.block_diag(*([walsh] * (size // block)))
    return one.expand(count, size, size).clone()


@dataclass
class LearnResult:
    r1: Tensor  # (m, k, k) float64
    r2: Tensor | None  # (layers, head_dim, head_dim) float64
    before: dict[str, float] = field(default_factory=dict)  # exact ratios at the init
    after: dict[str, float] = field(default_factory=dict)
    objective_before: float = math.nan  # the smooth objective
    objective_after: float = math.nan
    steps: int = 0
    seconds: float = 0.0
    clips: dict[str, Tensor] | None = None  # learned activation clips ({"stream", "o"}), or None
    clipped_after: dict[str, float] = field(default_factory=dict)  # exact terms with them


def _exact(problem: FRTQProblem, r1: Tensor, r2: Tensor | None, clips=None) -> dict[str, float]:
    with torch.no_grad():
        terms = problem.terms(r1.float(), None if r2 is None else r2.float(), smooth="exact", clips=clips)
    return {k: float(v) for k, v in terms.items()}


def initial_clips(problem: FRTQProblem) -> dict[str, Tensor]:
    """Clip ratios of 1 (no clip) for every input the problem's activations have."""
    if problem.activation_grid is None or problem.activation_grid.group_size is not None:
        raise ValueError("learning the clip needs activations quantized with one scale per token")
    out = {}
    if problem.stream is not None:
        if problem.stream_runs < 1 or problem.stream.shape[0] % problem.stream_runs:
            raise ValueError("learning the clip needs the stream as equal runs per layer input (stream_runs)")
        out["stream"] = torch.ones(problem.stream_runs)
    if problem.o_inputs:
        out["o"] = torch.ones(len(problem.o_inputs))
    return out


def learn_rotations(
    problem: FRTQProblem,
    r1_init: Tensor,
    r2_init: Tensor | None,
    steps: int = 100,
    lr: float = 1e-2,
    progress: bool = True,
    learn_clip: bool = False,
    clip_floor: float = 0.5,
) -> LearnResult:
    """Minimize ``problem.loss`` over ``R1 = blockdiag(r1_init_j expm(S_j))`` and
    ``R2_l = r2_init_l expm(S'_l)`` with Adam on the skew generators; returns the
    learned matrices in float64 (orthogonal to rounding) and the objective before
    and after. ``steps=0`` returns the initialization exactly. Nothing here is random
    (the initialization is the caller's), so the global RNG is left alone.

    ``learn_clip``: also a clip ratio per activation input (``initial_clips``, from 1),
    in alternating updates: each step moves the rotations with the clips fixed, then
    the clips (projected onto ``[clip_floor, 1]``) with the rotations fixed, both on
    the clipped objective (``clipped_ratio``: the clipped grid plus the clipping
    error)."""
    start = time.perf_counter()
    r1 = OrthogonalMatrices(r1_init)
    r2 = OrthogonalMatrices(r2_init) if r2_init is not None else None
    params = list(r1.parameters()) + (list(r2.parameters()) if r2 is not None else [])
    clips = {k: torch.nn.Parameter(v) for k, v in initial_clips(problem).items()} if learn_clip else None
    if clips is not None and not 0 < clip_floor < 1:
        raise ValueError(f"clip_floor must be in (0, 1), got {clip_floor}")
    result = LearnResult(r1=r1_init.to(torch.float64), r2=None if r2_init is None else r2_init.to(torch.float64))
    result.before = _exact(problem, result.r1, result.r2)
    with torch.no_grad():
        result.objective_before = float(problem.loss(r1.matrices(), r2.matrices() if r2 is not None else None,
                                                     clips=clips))
    if steps > 0:
        _learn_steps(problem, r1, r2, params, steps, lr, progress, clips, clip_floor)
        with torch.no_grad():
            result.r1 = r1.matrices(torch.float64).detach()
            result.r2 = r2.matrices(torch.float64).detach() if r2 is not None else None
            result.objective_after = float(problem.loss(r1.matrices(), r2.matrices() if r2 is not None else None,
                                                        clips=clips))
    else:
        result.objective_after = result.objective_before
    result.after = _exact(problem, result.r1, result.r2)
    if clips is not None:
        result.clips = {k: v.detach().clone() for k, v in clips.items()}
        result.clipped_after = _exact(problem, result.r1, result.r2, result.clips)
    result.steps = steps
    result.seconds = time.perf_counter() - start
    return result


@torch.enable_grad()  # callers (llm-compressor's hooks) may run under no_grad
def _learn_steps(problem, r1, r2, params, steps, lr, progress, clips=None, clip_floor=0.5) -> None:
    optimizer = torch.optim.Adam(params, lr=lr)
    clip_optimizer = torch.optim.Adam(list(clips.values()), lr=lr) if clips else None
    bar = tqdm(range(steps), desc="FRTQ learning rotations", disable=not progress, leave=False)
    for _ in bar:
        optimizer.zero_grad(set_to_none=True)
        fixed = {k: v.detach() for k, v in clips.items()} if clips else None
        loss = problem.loss(r1.matrices(), r2.matrices() if r2 is not None else None, clips=fixed)
        loss.backward()
        optimizer.step()
        if clip_optimizer is not None:
            clip_optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                m1, m2 = r1.matrices(), r2.matrices() if r2 is not None else None
            problem.loss(m1, m2, clips=clips).backward()
            clip_optimizer.step()
            with torch.no_grad():
                for value in clips.values():
                    value.clamp_(clip_floor, 1.0)
        bar.set_postfix(objective=f"{loss.item():.4f}")
