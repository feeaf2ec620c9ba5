"""``gsr diagnose``: why a recipe's rotations help (or not), per layer type.

For every linear of the decoder layers (lm_head excluded), before and after the
rotations of a recipe (its modifiers before the quantizer, applied exactly):

* the grid-to-std ratio ``rho = step / std`` of its *input* (one scale per token,
  ``gsr_plugin.learn.objectives``: the quantity FRTQ minimizes), on WikiText-2
  validation windows; q/k/v and gate/up share an input;
* the grid-to-std ratio of its weight groups and their round-to-nearest error
  ``||W - RTN(W)||_F / ||W||_F``,

at the recipe's weight grid (bits, group size, symmetry) and activation bits, or the
``--weight-bits/--group-size/--act-bits`` defaults where the recipe has none.

    gsr diagnose default --recipe frtq_w4a4kv4_g64_asym_r4_gptq --out diagnose-out
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from gsr_plugin.learn.frtq import Grid
from gsr_plugin.learn.objectives import grid_to_std_ratio, rounding_error

__all__ = ["LAYER_TYPES", "measure", "diagnose", "rotation_part", "tables", "plot"]

LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_type(name: str) -> str | None:
    return next((t for t in LAYER_TYPES if name.endswith(t)), None)


@torch.no_grad()
def measure(model: torch.nn.Module, windows: torch.Tensor, weight_grid: Grid, activation_bits: int) -> dict:
    """Per layer type, means over layers (and tokens): ``input_rho``, ``weight_rho``,
    ``weight_error``."""
    inputs: dict[str, list[float]] = defaultdict(list)
    weight_rho: dict[str, list[float]] = defaultdict(list)
    weight_error: dict[str, list[float]] = defaultdict(list)
    hooks = []
    for name, module in model.named_modules():
        kind = layer_type(name)
        if kind is None or not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight.detach().double()
        group = weight_grid.group_size if weight_grid.group_size and w.shape[1] % weight_grid.group_size == 0 else None
        weight_rho[kind].append(grid_to_std_ratio(w, weight_grid.bits, weight_grid.symmetric, group).mean().item())
        error = rounding_error(w, weight_grid.bits, weight_grid.symmetric, group)
        weight_error[kind].append((error.norm() / w.norm()).item())

        def hook(m, args, kind=kind):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            inputs[kind].append(grid_to_std_ratio(x, activation_bits, True).mean().item())

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        for window in windows:
            model(window[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {
        "input_rho": {k: mean(v) for k, v in inputs.items()},
        "weight_rho": {k: mean(v) for k, v in weight_rho.items()},
        "weight_error": {k: mean(v) for k, v in weight_error.items()},
    }


def rotation_part(recipe: str):
    """(rotation modifiers, weight grid or None, activation bits or None) of a recipe:
    the modifiers before its first quantization modifier, with FRTQ's grid pinned to
    that quantizer's (it is dropped here)."""
    from llmcompressor.modifiers.quantization import QuantizationMixin
    from llmcompressor.recipe import Recipe

    import gsr_plugin  # noqa: F401  (registers the modifiers for YAML)
    from gsr_plugin.cli.recipes import resolve_recipe
    from gsr_plugin.modifiers.frtq import FRTQModifier, first_quantizer_args

    modifiers = Recipe.create_instance(str(resolve_recipe(recipe))).modifiers
    split = next((i for i, m in enumerate(modifiers) if isinstance(m, QuantizationMixin)), len(modifiers))
    rotations, rest = modifiers[:split], modifiers[split:]
    weights, activations = first_quantizer_args(rest)
    for modifier in rotations:
        if isinstance(modifier, FRTQModifier):
            modifier.pin_grid(weights, activations)
    grid = None
    if weights is not None:
        group = weights.group_size if str(weights.strategy) == "group" else None
        grid = Grid(weights.num_bits, weights.symmetric, group)
    return rotations, grid, (activations.num_bits if activations is not None else None)


def diagnose(
    model: str = "default",
    recipe: str | None = None,
    samples: int = 4,
    seq_len: int = 512,
    data_dir: str | None = None,
    weight_grid: Grid = Grid(4, False, 64),
    activation_bits: int = 4,
    calib_samples: int = 32,
) -> dict:
    """Measure ``model`` as loaded and, with ``recipe``, after its rotations
    (calibrated, for FRTQ, on ``calib_samples`` other validation windows)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gsr_plugin.eval.data import calibration_windows
    from gsr_plugin.eval.models import resolve_model

    rotations, recipe_grid, recipe_act = rotation_part(recipe) if recipe else ([], None, None)
    weight_grid = recipe_grid or weight_grid
    activation_bits = recipe_act or activation_bits
    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = calibration_windows(tokenizer, samples, seq_len, seed=1, data_dir=data_dir)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    report = {
        "model": model,
        "recipe": recipe,
        "rotations": [type(m).__name__ for m in rotations],
        "inputs": f"{samples} x {seq_len} tokens of WikiText-2 validation (seed 1)",
        "weight_grid": {"bits": weight_grid.bits, "symmetric": weight_grid.symmetric, "group_size": weight_grid.group_size},
        "activation_bits": activation_bits,
        "before": measure(loaded, tqdm(windows, desc="measuring before", leave=False), weight_grid, activation_bits),
    }
    if rotations:
        calib = calibration_windows(tokenizer, calib_samples, seq_len, seed=0, data_dir=data_dir)
        dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        oneshot(model=loaded, processor=tokenizer, dataset=dataset, recipe=rotations,
                num_calibration_samples=calib_samples, max_seq_length=seq_len, pipeline="datafree")
        report["after"] = measure(loaded, tqdm(windows, desc="measuring after", leave=False), weight_grid, activation_bits)
        report["learned"] = [m.learned for m in rotations if getattr(m, "learned", None)]
    return report


def tables(report: dict) -> str:
    g = report["weight_grid"]
    grid = f"W{g['bits']} {'g' + str(g['group_size']) if g['group_size'] else 'per-channel'} {'sym' if g['symmetric'] else 'asym'}"
    lines = [
        f"{report['model']}: {', '.join(report['rotations']) or 'no rotation'}"
        + (f" from {report['recipe']}" if report["recipe"] else "")
        + f"; weights {grid}, activations int{report['activation_bits']} per token; inputs {report['inputs']}",
        "",
    ]
    after = report.get("after")
    head = ["layer", "input rho"] + (["after", "change"] if after else []) + ["weight rho"] + (
        ["after", "change"] if after else []) + ["weight RTN error"] + (["after", "change"] if after else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind in LAYER_TYPES:
        row = [kind]
        for key, fmt in (("input_rho", "{:.3f}"), ("weight_rho", "{:.3f}"), ("weight_error", "{:.4f}")):
            before = report["before"][key].get(kind)
            row.append(fmt.format(before) if before is not None else "-")
            if after:
                value = after[key].get(kind)
                row += [fmt.format(value), f"{100 * (value / before - 1):+.1f}%"] if value is not None else ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("input_rho", "input grid/std"), ("weight_rho", "weight grid/std"), ("weight_error", "weight RTN error")]
    states = ["before"] + (["after"] if "after" in report else [])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
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
