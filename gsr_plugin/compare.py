"""``gsr compare``: the same GPTQ setting after each rotation method, side by side
in one run, as a Markdown table, a PNG plot (perplexity against bits) and JSON."""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from gsr_plugin.data import calibration_windows, find_data_dir, wikitext2_test_text
from gsr_plugin.models import resolve_model
from gsr_plugin.perplexity import perplexity
from gsr_plugin.recipes import METHODS, RecipeSetting, recipe_yaml

__all__ = ["CompareSettings", "DEFAULT_METHODS", "compare", "markdown_table", "plot"]

DEFAULT_METHODS = ["none", "hadamard", "random_hadamard", "gsr", "gsr_random"]


@dataclass
class CompareSettings:
    model: str = "default"
    bits: list[int] = field(default_factory=lambda: [2, 3, 4])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    group_size: int | None = 64
    symmetric: bool = False
    block_size: int | None = None
    calib_samples: int = 32
    calib_len: int = 512
    seed: int = 0
    ppl_windows: int | None = 10
    data_dir: str | None = None

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")


def compare(settings: CompareSettings, out_dir: str | Path, command: str | None = None) -> dict:
    """Run every (method, bits), write ``compare.json`` after each run (a long run
    that stops keeps what it measured) and the table and plot at the end."""
    import gsr_plugin  # noqa: F401
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = resolve_model(settings.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    stream = tokenizer(wikitext2_test_text(settings.data_dir), return_tensors="pt").input_ids
    windows = calibration_windows(tokenizer, settings.calib_samples, settings.calib_len, settings.seed, settings.data_dir)
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    fp_model = load()
    head_dim = getattr(fp_model.config, "head_dim", None) or fp_model.config.hidden_size // fp_model.config.num_attention_heads
    fp = perplexity(fp_model, stream, max_windows=settings.ppl_windows, progress=False)
    del fp_model
    report = {
        "command": command or "gsr compare " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
        "settings": asdict(settings) | {"data_dir": str(find_data_dir(settings.data_dir) or "hub")},
        "fp": fp.to_dict(),
        "runs": [],
    }
    runs = [(m, b) for b in settings.bits for m in settings.methods]
    for method, bits in tqdm(runs, desc="compare", unit="run"):
        setting = RecipeSetting(method, bits, settings.group_size, settings.symmetric, block_size=settings.block_size)
        model = load()
        start = time.perf_counter()
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=dataset,
            recipe=recipe_yaml(setting, head_dim),
            num_calibration_samples=settings.calib_samples,
            max_seq_length=settings.calib_len,
        )
        seconds = time.perf_counter() - start
        result = perplexity(model, stream, max_windows=settings.ppl_windows, progress=False)
        report["runs"].append(
            {"method": method, "bits": bits, "recipe": setting.name, "ppl": result.ppl, "quantize_seconds": round(seconds, 1)}
        )
        tqdm.write(f"{setting.name}: PPL {result.ppl:.2f}")
        (out_dir / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
        del model
    (out_dir / "compare.md").write_text(markdown_table(report))
    plot(report, out_dir / "compare.png")
    return report


def _fmt(ppl: float) -> str:
    if not math.isfinite(ppl):
        return "inf"
    return f"{ppl:.1f}" if ppl < 1000 else f"{ppl:.2e}"


def markdown_table(report: dict) -> str:
    s = report["settings"]
    bits = sorted({r["bits"] for r in report["runs"]})
    methods = list(dict.fromkeys(r["method"] for r in report["runs"]))
    ppl = {(r["method"], r["bits"]): r["ppl"] for r in report["runs"]}
    group = f"groups of {s['group_size']}" if s["group_size"] else "per-channel scales"
    lines = [
        f"WikiText-2 perplexity of `{s['model']}` after GPTQ "
        f"({'symmetric' if s['symmetric'] else 'asymmetric'} int weights, {group}, 16-bit activations), "
        f"first {report['fp']['windows']} of {report['fp']['total_windows']} windows of {report['fp']['seq_len']} tokens; "
        f"calibration {s['calib_samples']} x {s['calib_len']} tokens of WikiText-2 validation (seed {s['seed']}).",
        "",
        "| method | " + " | ".join(f"W{b}" for b in bits) + " |",
        "|---|" + "---|" * len(bits),
        f"| float32 (no quantization) | " + " | ".join(_fmt(report["fp"]["ppl"]) for _ in bits) + " |",
    ]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(_fmt(ppl.get((method, b), float("nan"))) for b in bits) + " |")
    lines += ["", "Methods: " + "; ".join(f"`{m}`: {METHODS[m]}" for m in methods) + ".", "", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in dict.fromkeys(r["method"] for r in report["runs"]):
        points = sorted((r["bits"], r["ppl"]) for r in report["runs"] if r["method"] == method)
        xs = [b for b, p in points if math.isfinite(p)]
        ys = [p for b, p in points if math.isfinite(p)]
        ax.plot(xs, ys, marker="o", label=method)
    ax.axhline(report["fp"]["ppl"], color="black", linestyle="--", linewidth=1, label="float32")
    ax.set_yscale("log")
    ax.set_xlabel("weight bits")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_xticks(sorted({r["bits"] for r in report["runs"]}))
    s = report["settings"]
    ax.set_title(f"{s['model']}: GPTQ g{s['group_size'] or 'channel'}, first {report['fp']['windows']} windows", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
