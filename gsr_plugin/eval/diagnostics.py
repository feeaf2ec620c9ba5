"""``gsr diagnose``: why a recipe's rotations help (or not), per layer type.

For every linear of the decoder layers (lm_head excluded), before and after the
rotations of a recipe (its modifiers before the quantizer, applied exactly):

* the grid-to-std ratio ``rho = step / std`` of its *input* (one scale per token,
  ``gsr_plugin.learn.objectives``: the quantity FRTQ minimizes), on WikiText-2
  validation windows; q/k/v and gate/up share an input;
* the grid-to-std ratio of its weight groups and their round-to-nearest error
  ``||W - RTN(W)||_F / ||W||_F``,
* the error that weight rounding puts on the layer's *output*, on the same inputs:
  ``||X (RTN(W) - W)^T||_F / ||X W^T||_F`` (what perplexity feels: weight error along
  the directions the inputs use),

* the activation clip: the ratio ``c`` of the input quantizer's range that minimizes
  ``sum_j ||W[:, j]||^2 ||Q_c(x_j) - x_j||^2`` (``gsr_plugin.quantizers.clip_error``,
  what ``ActivationClipModifier`` searches; ``input_clip``) and how much of the
  unclipped error it removes (``input_clip_gain``),
* the KV cache at 4 bits, on k_proj's and v_proj's outputs (keys before RoPE):
  the relative error ``||Q(x) - x|| / ||x||`` of the published dynamic quantizer
  (asymmetric, per token in groups of head_dim; ``kv_dynamic_error``), of static
  symmetric scales per head taken from the same window (``kv_static_error``), and of
  static scales with the first token left out of the scale and kept in 16-bit
  (``kv_static_sink_error``: what ``sink_tokens: 1`` can do),

at the recipe's weight grid (bits, group size, symmetry) and activation bits, or the
``--weight-bits/--group-size/--act-bits`` defaults where the recipe has none.

A recipe whose quantizer is an FP4 preset (NVFP4, MXFP4: a float grid, where
``rho`` has no meaning) gets the relative round-to-nearest error of that format
instead, ``||x - Q(x)|| / ||x||`` through compressed-tensors' own quantizer (the one the
perplexity runs use): of every weight, and of every input where the preset quantizes
activations (``input_error``; global scale from the window itself).

    gsr diagnose default --recipe frtq_w4a4kv4_g64_asym_r4_gptq --out diagnose-out
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs
from tqdm import tqdm

from gsr_plugin.learn.frtq import Grid
from gsr_plugin.learn.guard import VERDICTS
from gsr_plugin.learn.objectives import grid_to_std_ratio, rounding_error
from gsr_plugin.quantizers import CLIP_CANDIDATES, clip_error
from gsr_plugin.walsh import is_power_of_two

__all__ = ["LAYER_TYPES", "CLIP_GRID", "kv_errors", "measure", "diagnose", "rotation_part", "float_rounding_error", "tables", "plot"]

LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


CLIP_GRID = CLIP_CANDIDATES  # ActivationClipModifier's candidates
KV_BITS = 4


def kv_errors(x: torch.Tensor, head_dim: int, bits: int = KV_BITS) -> dict[str, float]:
    """Relative errors of a (tokens, heads * head_dim) key or value block under the
    dynamic per-token-head asymmetric quantizer, static symmetric per-head scales, and
    static scales with the first token kept in 16-bit (and out of the scale)."""
    x = x.reshape(x.shape[0], -1, head_dim).double()
    levels = 2**bits - 1
    low, high = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((high - low) / levels).clamp_min(1e-12)
    zero = torch.round(-low / scale)
    dynamic = (torch.clamp(torch.round(x / scale) + zero, 0, levels) - zero) * scale

    def static(part: torch.Tensor) -> torch.Tensor:
        step = (part.abs().amax((0, 2), keepdim=True) / (levels / 2)).clamp_min(1e-12)
        return torch.clamp(torch.round(part / step), -(levels + 1) // 2, levels // 2) * step

    kept = torch.cat([x[:1], static(x[1:])])
    relative = lambda q: ((q - x).norm() / x.norm().clamp_min(1e-30)).item()  # noqa: E731
    return {"kv_dynamic_error": relative(dynamic), "kv_static_error": relative(static(x)),
            "kv_static_sink_error": relative(kept)}


def layer_type(name: str) -> str | None:
    return next((t for t in LAYER_TYPES if name.endswith(t)), None)


def _has_global_scale(args) -> bool:
    """NVFP4's layout: group scales under one per-tensor scale (``tensor_group``)."""
    from compressed_tensors.quantization import QuantizationStrategy

    return args.strategy == QuantizationStrategy.TENSOR_GROUP


def float_rounding_error(x: torch.Tensor, args, relative: bool = True):
    """``||x - Q(x)||_F / ||x||_F`` for compressed-tensors' quantizer of ``args`` (a float
    format with one scale per ``group_size`` values; NVFP4's global scale
    ``FP8_max * FP4_max / max|x|`` is taken from ``x``, as its observer does);
    ``relative=False``: the error tensor ``Q(x) - x`` itself, shaped ``(-1, n)``."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    x = x.reshape(-1, x.shape[-1]).float()
    groups = x.unflatten(-1, (x.shape[-1] // args.group_size, args.group_size))
    global_scale = None
    if _has_global_scale(args):
        global_scale = generate_gparam(x.min().reshape(1), x.max().reshape(1))
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=global_scale)
    q = fake_quantize(x, scale, zero_point, args, global_scale=global_scale)
    if not relative:
        return q - x
    return ((q - x).norm() / x.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def measure(
    model: torch.nn.Module,
    windows: torch.Tensor,
    weight_grid: Grid,
    activation_bits: int,
    float_weights=None,
    float_inputs=None,
) -> dict:
    """Per layer type, means over layers (and windows): ``input_rho``, ``weight_rho``,
    ``weight_error``, ``output_error``; with ``float_weights`` (QuantizationArgs of an FP4 format) the
    weight error is that format's and there is no weight ``rho``; with ``float_inputs``
    the inputs get that format's error (``input_error``) instead of ``rho``."""
    inputs: dict[str, list[float]] = defaultdict(list)
    input_error: dict[str, list[float]] = defaultdict(list)
    weight_rho: dict[str, list[float]] = defaultdict(list)
    weight_error: dict[str, list[float]] = defaultdict(list)
    output_error: dict[str, list[float]] = defaultdict(list)
    clip: dict[str, list[float]] = defaultdict(list)
    clip_gain: dict[str, list[float]] = defaultdict(list)
    kv: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    token_args = QuantizationArgs(num_bits=activation_bits, type="int", symmetric=True, strategy="token", dynamic=True)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    hooks = []
    for name, module in model.named_modules():
        kind = layer_type(name)
        if kind is None or not isinstance(module, torch.nn.Linear):
            continue
        if float_weights is not None:
            error = float_rounding_error(module.weight.detach(), float_weights, relative=False)
        else:
            w = module.weight.detach().double()
            group = weight_grid.group_size if weight_grid.group_size and w.shape[1] % weight_grid.group_size == 0 else None
            weight_rho[kind].append(grid_to_std_ratio(w, weight_grid.bits, weight_grid.symmetric, group).mean().item())
            error = rounding_error(w, weight_grid.bits, weight_grid.symmetric, group)
        weight_error[kind].append((error.norm() / module.weight.detach().double().norm()).item())
        error = error.to(module.weight.dtype)

        def hook(m, args, kind=kind, error=error):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            output_error[kind].append(((x @ error.T).norm() / (x @ m.weight.T).norm().clamp_min(1e-30)).item())
            if float_inputs is not None:
                input_error[kind].append(float_rounding_error(x, float_inputs))
            else:
                inputs[kind].append(grid_to_std_ratio(x.double(), activation_bits, True).mean().item())
                column_weight = m.weight.detach().float().pow(2).sum(0)
                errors = [clip_error(x[None].float(), token_args, column_weight, c).item() for c in CLIP_GRID]
                best = min(range(len(CLIP_GRID)), key=errors.__getitem__)
                clip[kind].append(CLIP_GRID[best])
                clip_gain[kind].append(1 - errors[best] / max(errors[0], 1e-30))

        def kv_hook(m, args, output, kind=kind):
            for key, value in kv_errors(output.detach().reshape(-1, output.shape[-1]), head_dim).items():
                kv[key][kind].append(value)

        hooks.append(module.register_forward_pre_hook(hook))
        if kind in ("k_proj", "v_proj") and float_weights is None:  # the integer protocol's KV4
            hooks.append(module.register_forward_hook(kv_hook))
    try:
        for window in windows:
            model(window[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    measured = {"input_rho": inputs, "input_error": input_error, "input_clip": clip, "input_clip_gain": clip_gain,
                "weight_rho": weight_rho, "weight_error": weight_error, "output_error": output_error, **kv}
    return {key: {k: mean(v) for k, v in values.items()} for key, values in measured.items() if values}


def rotation_part(recipe: str, block_size: int | None = None):
    """(rotation modifiers, weight grid or None, activation bits or None, float formats)
    of a recipe: the modifiers before its first quantization modifier, with FRTQ's grid
    pinned to that quantizer's (it is dropped here); float formats = (weights, inputs)
    QuantizationArgs of an FP4 quantizer, else (None, None). ``block_size`` replaces
    the rotation block of every rotation modifier (``block_size`` or SpinQuant's
    ``transform_block_size``)."""
    from llmcompressor.modifiers.quantization import QuantizationMixin
    from llmcompressor.recipe import Recipe

    from gsr_plugin.recipes import resolve_recipe
    from gsr_plugin.modifiers.frtq import FRTQModifier
    from gsr_plugin.session import first_quantizer_args, is_float_format

    modifiers = Recipe.create_instance(str(resolve_recipe(recipe))).modifiers
    split = next((i for i, m in enumerate(modifiers) if isinstance(m, QuantizationMixin)), len(modifiers))
    rotations, rest = modifiers[:split], modifiers[split:]
    if block_size is not None:
        if not is_power_of_two(block_size):
            raise ValueError(f"--block-size {block_size} is not a power of two; Walsh blocks exist for 1, 2, 4, ...")
        fields = [f for m in rotations for f in ("block_size", "transform_block_size") if f in type(m).model_fields]
        if not fields:
            raise ValueError(f"--block-size: recipe {recipe!r} has no rotation with a block to set; "
                             "pick a recipe with GSRModifier, FRTQModifier, RandomRotationModifier or SpinQuantModifier")
        for modifier in rotations:
            for field in ("block_size", "transform_block_size"):
                if field in type(modifier).model_fields:
                    setattr(modifier, field, block_size)
    weights, activations = first_quantizer_args(rest)
    for modifier in rotations:
        if isinstance(modifier, FRTQModifier):
            modifier.pin_grid(weights, activations)
    if is_float_format(weights):
        floats = (weights, activations if is_float_format(activations) else None)
        return rotations, None, None, floats
    grid = None
    if weights is not None:
        group = weights.group_size if str(weights.strategy) == "group" else None
        grid = Grid(weights.num_bits, weights.symmetric, group)
    return rotations, grid, (activations.num_bits if activations is not None else None), (None, None)


def diagnose(
    model: str = "default",
    recipe: str | None = None,
    samples: int = 4,
    seq_len: int = 512,
    data_dir: str | None = None,
    weight_grid: Grid = Grid(4, False, 64),
    activation_bits: int = 4,
    calib_samples: int = 32,
    block_size: int | None = None,
) -> dict:
    """Measure ``model`` as loaded and, with ``recipe``, after its rotations
    (calibrated, for FRTQ, on ``calib_samples`` other validation windows)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gsr_plugin.eval.data import calibration_windows
    from gsr_plugin.eval.models import resolve_model

    if block_size is not None and not recipe:
        raise ValueError("--block-size sets the block of a recipe's rotations: pass --recipe too")
    rotations, recipe_grid, recipe_act, floats = (rotation_part(recipe, block_size) if recipe
                                                  else ([], None, None, (None, None)))
    weight_grid = recipe_grid or weight_grid
    activation_bits = recipe_act or activation_bits
    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = calibration_windows(tokenizer, samples, seq_len, seed=1, data_dir=data_dir)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    report = {
        "model": model,
        "recipe": recipe,
        "block_size": block_size,
        "rotations": [type(m).__name__ for m in rotations],
        "inputs": f"{samples} x {seq_len} tokens of WikiText-2 validation (seed 1)",
        "weight_grid": {"bits": weight_grid.bits, "symmetric": weight_grid.symmetric, "group_size": weight_grid.group_size},
        "activation_bits": activation_bits,
    }
    if floats[0] is not None:
        report["float_format"] = {"weights": _describe(floats[0]), "inputs": _describe(floats[1]) if floats[1] else None}
    report["before"] = measure(loaded, tqdm(windows, desc="measuring before", leave=False), weight_grid,
                               activation_bits, *floats)
    if rotations:
        calib = calibration_windows(tokenizer, calib_samples, seq_len, seed=0, data_dir=data_dir)
        dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        oneshot(model=loaded, processor=tokenizer, dataset=dataset, recipe=rotations,
                num_calibration_samples=calib_samples, max_seq_length=seq_len, pipeline="datafree")
        report["after"] = measure(loaded, tqdm(windows, desc="measuring after", leave=False), weight_grid,
                                  activation_bits, *floats)
        report["learned"] = [m.learned for m in rotations if getattr(m, "learned", None)]
    return report


def _describe(args) -> str:
    """``FP4 e2m1, groups of 16, scales float8_e4m3fn + global`` style name of float QuantizationArgs."""
    scales = str(args.scale_dtype).replace("torch.", "") if args.scale_dtype is not None else "float"
    glob = " + global" if _has_global_scale(args) else ""
    return f"FP{args.num_bits}, groups of {args.group_size}, scales {scales}{glob}"


COLUMNS = (("input_rho", "input rho", "{:.3f}"), ("input_error", "input FP4 error", "{:.4f}"),
           ("weight_rho", "weight rho", "{:.3f}"), ("weight_error", "weight RTN error", "{:.4f}"),
           ("output_error", "output error (W)", "{:.4f}"), ("input_clip", "best input clip", "{:.2f}"),
           ("input_clip_gain", "error removed by it", "{:.1%}"), ("kv_dynamic_error", "KV4 dynamic error", "{:.4f}"),
           ("kv_static_error", "KV4 static error", "{:.4f}"),
           ("kv_static_sink_error", "KV4 static, first token kept", "{:.4f}"))


def tables(report: dict) -> str:
    g = report["weight_grid"]
    grid = f"W{g['bits']} {'g' + str(g['group_size']) if g['group_size'] else 'per-channel'} {'sym' if g['symmetric'] else 'asym'}"
    formats = report.get("float_format")
    if formats:
        what = f"weights {formats['weights']}; " + (f"inputs {formats['inputs']}" if formats["inputs"]
                                                    else f"inputs int{report['activation_bits']} per token")
    else:
        what = f"weights {grid}, activations int{report['activation_bits']} per token"
    lines = [
        f"{report['model']}: {', '.join(report['rotations']) or 'no rotation'}"
        + (f" from {report['recipe']}" if report["recipe"] else "")
        + (f" with blocks of {report['block_size']}" if report.get("block_size") else "")
        + f"; {what}; inputs {report['inputs']}",
        "",
    ]
    after = report.get("after")
    columns = [c for c in COLUMNS if report["before"].get(c[0])]
    head = ["layer"]
    for _, title, _ in columns:
        head += [title] + (["after", "change"] if after else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind in LAYER_TYPES:
        row = [kind]
        for key, _, fmt in columns:
            before = report["before"][key].get(kind)
            row.append(fmt.format(before) if before is not None else "-")
            if after:
                value = after.get(key, {}).get(kind)
                row += [fmt.format(value), f"{100 * (value / before - 1):+.1f}%"] if value is not None else ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    for learned in report.get("learned") or []:
        lines += _guard_lines(learned.get("guard"))
    return "\n".join(lines) + "\n"


def _guard_lines(guard: dict | None) -> list[str]:
    """FRTQ's guard as a table: the held-out quantized output error of the
    initialization and of the learned matrix, per rotation, and what was kept."""
    if not guard:
        return []
    judged = "GPTQ" if guard.get("quantizer") == "gptq" else "round to nearest"
    lines = ["", f"FRTQ guard: held-out quantized output error ({judged}; initialization, learned), and what was kept", "",
             "| rotation | init | learned | kept |", "|---|---|---|---|",
             f"| R1 | {guard['R1_error']['init']:.5f} | {guard['R1_error']['learned']:.5f} | {guard['R1']} |"]
    learned_layers = set(guard.get("R2_learned_layers", []))
    for layer, errors in enumerate(guard.get("R2_error", [])):
        kept = "learned" if layer in learned_layers else "init"
        lines.append(f"| R2 layer {layer} | {errors['init']:.5f} | {errors['learned']:.5f} | {kept} |")
    if "clips" in guard:
        lines.append(f"| learned clips | | | {guard['clips_kept']} of {guard['clips']} |")
    rows = guard.get("layers")
    if rows:
        gptq = all("held_out_gptq" in row for row in rows)
        counts = Counter(row["verdict"] for row in rows)
        lines += ["", "FRTQ evidence per layer: quantized output error of the initialization and of the learned "
                  "R1/R2, on the tokens learning saw and on held-out ones ("
                  + ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v]) + ")", "",
                  "| layer | seen init | seen learned | held-out init | held-out learned | "
                  + ("held-out after GPTQ init | learned | " if gptq else "") + "verdict |",
                  "|---|---|---|---|---|" + ("---|---|" if gptq else "") + "---|"]
        for layer, row in enumerate(rows):
            seen, held = row["seen"], row["held_out"]
            after = f"{row['held_out_gptq']['init']:.5f} | {row['held_out_gptq']['learned']:.5f} | " if gptq else ""
            lines.append(f"| {layer} | {seen['init']:.5f} | {seen['learned']:.5f} | {held['init']:.5f} | "
                         f"{held['learned']:.5f} | {after}{row['verdict']} |")
        lines += [""] + [f"- {v}: {meaning}" for v, meaning in VERDICTS.items()]
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(key, title) for key, title, _ in COLUMNS if report["before"].get(key)]
    states = ["before"] + (["after"] if "after" in report else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.6), dpi=110, squeeze=False)
    axes = axes[0]
    width = 0.8 / len(states)
    for ax, (key, title) in zip(axes, keys):
        for i, state in enumerate(states):
            values = [report[state][key].get(t, 0.0) for t in LAYER_TYPES]
            ax.bar([j + i * width for j in range(len(LAYER_TYPES))], values, width, label=state)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(LAYER_TYPES))],
                      [t.replace("_proj", "") for t in LAYER_TYPES], fontsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle(", ".join(report["rotations"]) or "no rotation", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(report: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "diagnose.md").write_text(tables(report))
    plot(report, out / "diagnose.png")
    return out
