"""Why one rotation quantizes better than another, per layer type of the default model.

For each rotation (applied exactly, as in benchmarks/rotations.py):

* weight error: ``||W - RTN(W)||_F / ||W||_F`` of every linear (lm_head excluded) with
  round-to-nearest asymmetric integer quantization: 3-bit in groups of 64 and of 32,
  4-bit per output channel;
* grid-to-standard-deviation ratio of every linear's *input*: for int4 symmetric
  dynamic per-token quantization, ``step / std`` with ``step = max|x_t| / 7`` and
  ``std`` the token's standard deviation, averaged over tokens (lower: finer grid
  relative to the signal, smaller error); measured on WikiText-2 validation windows.

    python benchmarks/diagnostics.py --out docs/results
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

ROTATIONS = {
    "none": None,
    "random_orthogonal": ("RandomRotationModifier", {"kind": "orthogonal"}),
    "natural": ("GSRModifier", {"ordering": "natural"}),
    "natural_random": ("GSRModifier", {"ordering": "natural", "randomize": True}),
    "gsr": ("GSRModifier", {}),
    "gsr_random": ("GSRModifier", {"randomize": True}),
}
WEIGHT_SETTINGS = {"W3 g64": (3, 64), "W3 g32": (3, 32), "W4 per-channel": (4, None)}
LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rtn_relative_error(weight: torch.Tensor, bits: int, group: int | None) -> float:
    """Round-to-nearest, asymmetric min-max per group (or per row), relative Frobenius."""
    w = weight.double()
    rows = w.reshape(w.shape[0], -1, group) if group else w.reshape(w.shape[0], 1, -1)
    low, high = rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True)
    scale = ((high - low) / (2**bits - 1)).clamp_min(1e-12)
    zero = torch.round(-low / scale)
    q = torch.clamp(torch.round(rows / scale) + zero, 0, 2**bits - 1)
    deq = ((q - zero) * scale).reshape(w.shape)
    return (torch.linalg.norm(w - deq) / torch.linalg.norm(w)).item()


def grid_to_std(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Per token: (max|x| / (2^(b-1) - 1)) / std(x), for symmetric per-token quantization."""
    x = x.reshape(-1, x.shape[-1]).double()
    step = x.abs().amax(-1) / (2 ** (bits - 1) - 1)
    return step / x.std(-1).clamp_min(1e-12)


def layer_type(name: str) -> str | None:
    return next((t for t in LAYER_TYPES if name.endswith(t)), None)


def diagnose(model, windows: torch.Tensor) -> dict:
    weights: dict = defaultdict(lambda: defaultdict(list))
    ratios: dict = defaultdict(list)
    hooks = []
    for name, module in model.named_modules():
        kind = layer_type(name)
        if kind and isinstance(module, torch.nn.Linear):
            for label, (bits, group) in WEIGHT_SETTINGS.items():
                weights[label][kind].append(rtn_relative_error(module.weight.detach(), bits, group))
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, kind=kind: ratios[kind].append(grid_to_std(args[0].detach()).mean().item())
            ))
    with torch.no_grad():
        for window in windows:
            model(window[None])
    for hook in hooks:
        hook.remove()
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {
        "weight_error": {label: {k: mean(v) for k, v in per.items()} for label, per in weights.items()},
        "input_grid_to_std_a4": {k: mean(v) for k, v in ratios.items()},
    }


def run(args) -> dict:
    import gsr_plugin
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gsr_plugin.eval.data import calibration_windows
    from gsr_plugin.eval.models import resolve_model

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = calibration_windows(tokenizer, args.samples, args.seq_len, seed=1, data_dir=args.data_dir)
    report = {
        "command": "python benchmarks/diagnostics.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "inputs": f"{args.samples} x {args.seq_len} tokens of WikiText-2 validation (seed 1)",
        "rotations": {},
    }
    for name, spec in tqdm(ROTATIONS.items(), desc="rotations"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if spec is not None:
            cls, fields = spec
            oneshot(model=model, recipe=[getattr(gsr_plugin, cls)(**fields)])
        report["rotations"][name] = diagnose(model, windows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnostics.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "diagnostics.md").write_text(tables(report))
    plot(report, out / "diagnostics.png")
    return report


def tables(report: dict) -> str:
    names = list(report["rotations"])
    parts = [f"Inputs: {report['inputs']}. Command: `{report['command']}`", ""]
    for label in WEIGHT_SETTINGS:
        parts += [f"Weight RTN error, {label} (relative Frobenius, mean over layers):", "",
                  "| rotation | " + " | ".join(LAYER_TYPES) + " |", "|---|" + "---|" * len(LAYER_TYPES)]
        for n in names:
            row = report["rotations"][n]["weight_error"][label]
            parts.append(f"| {n} | " + " | ".join(f"{row[t]:.4f}" for t in LAYER_TYPES) + " |")
        parts.append("")
    parts += ["Input grid-to-std ratio for int4 per-token activations (mean over layers and tokens):", "",
              "| rotation | " + " | ".join(LAYER_TYPES) + " |", "|---|" + "---|" * len(LAYER_TYPES)]
    for n in names:
        row = report["rotations"][n]["input_grid_to_std_a4"]
        parts.append(f"| {n} | " + " | ".join(f"{row[t]:.3f}" for t in LAYER_TYPES) + " |")
    return "\n".join(parts) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["rotations"])
    panels = [("W3 g64", "weight_error"), ("W3 g32", "weight_error"), ("W4 per-channel", "weight_error"),
              ("input grid/std (A4)", "input_grid_to_std_a4")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=110)
    width = 0.8 / len(names)
    for ax, (label, key) in zip(axes, panels):
        lowest = 1.0
        for i, n in enumerate(names):
            data = report["rotations"][n][key]
            if key == "weight_error":  # relative to no rotation: differences are a few %
                base = report["rotations"]["none"][key][label]
                values = [data[label][t] / base[t] for t in LAYER_TYPES]
                lowest = min(lowest, *values)
            else:
                values = [data[t] for t in LAYER_TYPES]
            ax.bar([j + i * width for j in range(len(LAYER_TYPES))], values, width, label=n)
        if key == "weight_error":
            ax.set_ylim(lowest - 0.01, 1.01)
            ax.set_title(f"weight RTN error / no rotation, {label}", fontsize=9)
        else:
            ax.set_title(label, fontsize=9)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(LAYER_TYPES))],
                      [t.replace("_proj", "") for t in LAYER_TYPES], fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--data-dir", default=None)
    print(tables(run(parser.parse_args())))
