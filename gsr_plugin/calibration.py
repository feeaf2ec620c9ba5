"""What FRTQ learns from, read off the model being calibrated: each decoder layer's
modules by role, a sample of their weights as the quantizer will see them, and a
seeded token subsample of the activations at the inputs the rotations change,
assembled into ``gsr_plugin.learn.frtq.FRTQProblem`` (the math, torch only).

The model is read as it is when called: after the norm scales are fused and before
any rotation, so these are the tensors the quantizer would see without one.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from compressed_tensors import match_named_modules
from compressed_tensors.offload import align_module_device, get_execution_device
from tqdm import tqdm

from gsr_plugin.learn.frtq import FRTQProblem, Grid, LayerWeights
from gsr_plugin.mappings import SpinQuantMapping
from gsr_plugin.rotation import head_dim_of

__all__ = ["layer_modules", "sample_layer_weights", "cache_activations", "frtq_problem"]

LayerModules = dict  # role ("q", "k", "v", "o", "down") -> module; "mlp_in" -> [modules]


def layer_modules(model: torch.nn.Module, mapping: SpinQuantMapping) -> list[LayerModules]:
    """Per decoder layer: its q, k, v, o, down modules and its MLP inputs."""
    roles = {"q": mapping.attn_q, "k": mapping.attn_k, "v": mapping.attn_v, "o": mapping.attn_o, "down": mapping.mlp_out}
    found = {
        role: [module for _, module in match_named_modules(model, pattern if isinstance(pattern, list) else [pattern])]
        for role, pattern in roles.items()
    }
    found["mlp_in"] = [[module for _, module in match_named_modules(model, [pattern])] for pattern in mapping.mlp_in]
    layers = len(found["v"])
    if any(len(found[r]) != layers for r in roles) or any(len(x) != layers for x in found["mlp_in"]):
        raise ValueError(
            f"FRTQModifier expects one of each of {', '.join(roles)} and the MLP inputs per layer; check mappings"
        )
    return [
        {**{role: found[role][i] for role in roles}, "mlp_in": [x[i] for x in found["mlp_in"]]} for i in range(layers)
    ]


def _weight(module: torch.nn.Module) -> torch.Tensor:
    with align_module_device(module):
        return module.weight.detach().float().cpu()


def sample_layer_weights(
    layers: list[LayerModules], r1_block: int, weight_rows: int, seed: int, r4: torch.Tensor | None = None
) -> list[LayerWeights]:
    """Each layer's weights as the quantizer will see them, sampled (seeded):
    ``weight_rows`` rows of the readers (q, k, MLP inputs), whole R1 blocks of the
    writers (o_proj, down_proj, rotated on their output side); down_proj's input
    already rotated by the fixed ``r4`` when there is one."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for modules in tqdm(layers, desc="FRTQ sampling weights", leave=False):
        readers = []
        for module in (modules["q"], modules["k"], *modules["mlp_in"]):
            w = _weight(module)
            rows = torch.randperm(w.shape[0], generator=generator)[:weight_rows]
            readers.append(w[rows])
        o, down = _weight(modules["o"]), _weight(modules["down"])
        blocks = o.shape[0] // r1_block
        keep = min(blocks, max(1, math.ceil(weight_rows / r1_block)))
        o_blocks = torch.randperm(blocks, generator=generator)[:keep]
        down_blocks = torch.randperm(blocks, generator=generator)[:keep]
        if r4 is not None:
            down = down @ r4
        pick = lambda w, index: w.reshape(blocks, r1_block, -1)[index].reshape(-1, w.shape[-1])  # noqa: E731
        out.append(LayerWeights(
            readers=torch.cat(readers), v=_weight(modules["v"]),
            o=pick(o, o_blocks), o_blocks=o_blocks, down=pick(down, down_blocks), down_blocks=down_blocks,
            attention_readers=readers[0].shape[0] + readers[1].shape[0],
        ))
    return out


@torch.no_grad()
def cache_activations(
    model: torch.nn.Module, layers: list[LayerModules], batches: Iterable[dict], tokens: int, seed: int,
    holdout: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
    """A seeded subsample of ``tokens`` real (unpadded) calibration tokens per layer
    at the inputs R1 rotates (q/k/v, the MLP inputs), stacked as ``(2 layers tokens,
    hidden)``, and at o_proj's input (R2), per layer ``(tokens, heads, head_dim)``,
    from forward passes of ``model`` as it is now. A shuffling dataloader (oneshot's)
    is drawn in an order set by ``seed``, not by the global RNG, which is left as it was.

    Returns ``(stream, o_inputs, held_stream, held_o_inputs)``: with ``holdout > 0`` the
    last two hold as many *other* tokens per layer, drawn from the positions the first
    sample left (the guard's held-out set; the first sample is the same as without
    it), else ``(None, [])``, as when no token was left."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batches = list(batches)
    per_batch = max(1, math.ceil(tokens / max(1, len(batches))))
    held_per_batch = max(1, math.ceil(holdout / max(1, len(batches)))) if holdout else 0
    generator = torch.Generator().manual_seed(seed)
    sets = ("learn", "held") if holdout else ("learn",)
    stream = {name: [[] for _ in range(2 * len(layers))] for name in sets}
    o_inputs = {name: [[] for _ in layers] for name in sets}
    keep: dict[str, torch.Tensor] = {}

    def record(lists: dict, index: int, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        for name in sets:
            lists[name][index].append(x[keep[name].to(x.device)].float().cpu())

    hooks = []
    for i, modules in enumerate(layers):
        hooks.append(modules["q"].register_forward_pre_hook(lambda m, a, i=i: record(stream, 2 * i, a[0])))
        hooks.append(modules["mlp_in"][0].register_forward_pre_hook(lambda m, a, i=i: record(stream, 2 * i + 1, a[0])))
        hooks.append(modules["o"].register_forward_pre_hook(lambda m, a, i=i: record(o_inputs, i, a[0])))
    device = get_execution_device(model)
    try:
        for batch in tqdm(batches, desc="FRTQ caching activations", leave=False):
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            mask = batch.get("attention_mask")
            valid = (mask.reshape(-1) > 0).nonzero().flatten().cpu() if mask is not None else torch.arange(
                batch["input_ids"].numel()
            )
            order = torch.randperm(len(valid), generator=generator)
            keep["learn"] = valid[order[:per_batch]]
            keep["held"] = valid[order[per_batch:per_batch + held_per_batch]]
            model(**batch, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    heads, head_dim = model.config.num_attention_heads, head_dim_of(model.config)

    def stacked(name: str, count: int):
        # equal runs per layer input (the guard and the learned clips read the stream run by run)
        count = min([count] + [len(torch.cat(x)) for x in stream[name]])
        if count == 0:  # every calibration token went to the learning sample
            return None, []
        return (torch.cat([torch.cat(x)[:count] for x in stream[name]]),
                [torch.cat(x)[:count].reshape(-1, heads, head_dim) for x in o_inputs[name]])

    return (*stacked("learn", tokens), *(stacked("held", holdout) if holdout else (None, [])))


def frtq_problem(
    model: torch.nn.Module,
    mapping: SpinQuantMapping,
    *,
    learn_r1: bool,
    learn_r2: bool,
    r1_block: int,
    activation_grid: Grid | None,
    weight_grid: Grid | None,
    calibration: Iterable[dict] | None = None,
    tokens: int = 256,
    weight_rows: int = 64,
    r4: torch.Tensor | None = None,
    seed: int = 0,
    holdout: int = 0,
    **objective,
) -> tuple[FRTQProblem, FRTQProblem | None, FRTQProblem | None]:
    """FRTQ's problem for ``model``: cached activations where there is an activation
    grid and ``calibration`` batches, sampled weights where there is a weight grid;
    ``objective``: ``FRTQProblem``'s factors, ``smooth`` and ``sharpness``.

    Returns ``(problem, held_out, seen)``: ``held_out`` is the guard's problem with
    ``holdout`` other tokens per layer and the same weights, or None (``holdout`` 0,
    no ``calibration``, or no token left by the learning sample) (activations cached even without an
    activation grid: the guard measures the output error of weight rounding on them);
    ``seen`` is the same on the learning sample's tokens, None where ``held_out`` is
    (the guard's evidence compares the two)."""
    layers = layer_modules(model, mapping)
    stream, o_inputs = None, []
    held = seen = None
    if calibration is not None and (activation_grid is not None or holdout):
        stream, o_inputs, held_stream, held_o = cache_activations(model, layers, calibration, tokens, seed, holdout)
        if held_stream is not None:
            held, seen = (held_stream, held_o), (stream, o_inputs)
        if activation_grid is None:  # cached for the guard only: no activation term
            stream, o_inputs = None, []
    weights = sample_layer_weights(layers, r1_block, weight_rows, seed, r4) if (weight_grid is not None or held) else []
    runs = 2 * len(layers)
    problem = FRTQProblem(
        stream_runs=runs if stream is not None and learn_r1 else 0,
        stream=stream if learn_r1 else None,
        o_inputs=o_inputs if learn_r2 else [],
        layers=weights if weight_grid is not None else [],
        activation_grid=activation_grid,
        weight_grid=weight_grid,
        **objective,
    )
    if held is None:
        return problem, None, None
    held_out, seen = (
        FRTQProblem(stream=part[0], o_inputs=part[1], layers=weights, activation_grid=activation_grid,
                    weight_grid=weight_grid, stream_runs=runs, **objective)
        for part in (held, seen)
    )
    return problem, held_out, seen
