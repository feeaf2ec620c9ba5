"""Why one rotation quantizes better than another, per layer type of the default model.

For each rotation (applied exactly), with ``gsr_plugin.eval.diagnostics.measure`` (the
measurement behind `gsr diagnose`): the grid-to-std ratio of every linear's input at
int4 per token, and of its weight groups with their round-to-nearest error, at
3-bit asymmetric groups of 64. FRTQ learns for that same grid (W3 g64 asym, A4) on 32
calibration windows.

    python benchmarks/diagnostics.py --out docs/results
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from gsr_plugin.eval.diagnostics import LAYER_TYPES, measure
from gsr_plugin.learn.frtq import Grid

GRID = Grid(3, False, 64)
ACT_BITS = 4
FRTQ_GRID = {"weight_bits": 3, "weight_group_size": 64, "weight_symmetric": False, "activation_bits": ACT_BITS}
ROTATIONS = {
    "none": None,
    "random_orthogonal": ("RandomRotationModifier", {"kind": "orthogonal"}),
    "natural": ("GSRModifier", {"ordering": "natural"}),
    "gsr": ("GSRModifier", {}),
    "frtq": ("FRTQModifier", FRTQ_GRID),
    "frtq_random": ("FRTQModifier", {**FRTQ_GRID, "init": "random"}),
}
KEYS = {"input_rho": "input grid/std (A4)", "weight_rho": "weight grid/std (W3 g64)", "weight_error": "weight RTN error (W3 g64)"}


def run(args) -> dict:
    import gsr_plugin
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gsr_plugin.eval.data import calibration_windows
    from gsr_plugin.eval.models import resolve_model

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = calibration_windows(tokenizer, args.samples, args.seq_len, seed=1, data_dir=args.data_dir)
    calib = calibration_windows(tokenizer, 32, args.seq_len, seed=0, data_dir=args.data_dir)
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    report = {
        "command": "python benchmarks/diagnostics.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "inputs": f"{args.samples} x {args.seq_len} tokens of WikiText-2 validation (seed 1)",
        "rotations": {},
    }
    for name, spec in tqdm(ROTATIONS.items(), desc="rotations"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if spec is not None:
            cls, fields = spec
            oneshot(model=model, recipe=[getattr(gsr_plugin, cls)(**fields)], dataset=dataset, processor=tokenizer,
                    num_calibration_samples=32, max_seq_length=args.seq_len, pipeline="datafree")
        report["rotations"][name] = measure(model, windows, GRID, ACT_BITS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnostics.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "diagnostics.md").write_text(tables(report))
    plot(report, out / "diagnostics.png")
    return report


def tables(report: dict) -> str:
    names = list(report["rotations"])
    parts = [f"Inputs: {report['inputs']}. Command: `{report['command']}`", ""]
    for key, title in KEYS.items():
        parts += [f"{title}, mean over layers:", "", "| rotation | " + " | ".join(LAYER_TYPES) + " |",
                  "|---|" + "---|" * len(LAYER_TYPES)]
        for n in names:
            row = report["rotations"][n][key]
            parts.append(f"| {n} | " + " | ".join(f"{row[t]:.4f}" for t in LAYER_TYPES) + " |")
        parts.append("")
    return "\n".join(parts)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["rotations"])
    fig, axes = plt.subplots(1, len(KEYS), figsize=(4.4 * len(KEYS), 3.6), dpi=110)
    width = 0.8 / len(names)
    for ax, (key, title) in zip(axes, KEYS.items()):
        for i, n in enumerate(names):
            values = [report["rotations"][n][key][t] for t in LAYER_TYPES]
            ax.bar([j + i * width for j in range(len(LAYER_TYPES))], values, width, label=n)
        ax.set_title(title, fontsize=9)
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
