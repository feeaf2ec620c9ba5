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

from gsr_plugin.eval.data import IN_DRAWN_ORDER, calibration_windows, find_data_dir, wikitext2_test_text
from gsr_plugin.eval.models import resolve_model
from gsr_plugin.eval.perplexity import perplexity
from gsr_plugin.eval.size import bits_per_weight
from gsr_plugin.recipes import METHODS, RecipeSetting, recipe_yaml

__all__ = ["CompareSettings", "DEFAULT_METHODS", "compare", "run_settings", "run_key", "markdown_table", "plot"]

DEFAULT_METHODS = ["none", "hadamard", "random_hadamard", "gsr", "gsr_random"]
# llmcompressor: oneshot's GPTQModifier (fake-quantized, float32); optimum: the recipe's
# rotation by gsr_plugin.rotate, then gptqmodel's GPTQ through Optimum's GPTQQuantizer,
# its weights dequantized and computed in float32 (gsr_plugin.engines.optimum)
ENGINES = ("llmcompressor", "optimum")


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
    engines: list[str] = field(default_factory=lambda: ["llmcompressor"])
    ranks: list[int] = field(default_factory=lambda: [0])
    lowrank: str = "svd"

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        bad = [e for e in self.engines if e not in ENGINES]
        if bad or not self.engines:
            raise ValueError(f"unknown engine(s) {bad}; choose from {', '.join(ENGINES)}")


def compare(settings: CompareSettings, out_dir: str | Path, command: str | None = None) -> dict:
    """Every (method, bits) of ``settings``; ``compare.json`` is written after each
    run, then the table and the plot."""
    out_dir = Path(out_dir)
    runs = [
        RecipeSetting(method, bits, settings.group_size, settings.symmetric, block_size=settings.block_size,
                      rank=rank, lowrank=settings.lowrank)
        for bits in settings.bits
        for method in settings.methods
        for rank in settings.ranks
    ]
    report = run_settings(
        settings.model,
        runs,
        out_dir / "compare.json",
        calib_samples=settings.calib_samples,
        calib_len=settings.calib_len,
        seed=settings.seed,
        ppl_windows=settings.ppl_windows,
        data_dir=settings.data_dir,
        engines=settings.engines,
        command=command,
        extra={"settings": asdict(settings) | {"data_dir": str(find_data_dir(settings.data_dir) or "hub")}},
    )
    (out_dir / "compare.md").write_text(markdown_table(report))
    plot(report, out_dir / "compare.png")
    return report


def run_settings(
    model: str,
    settings: list[RecipeSetting],
    out_json: str | Path,
    *,
    calib_samples: int = 32,
    calib_len: int = 512,
    seed: int = 0,
    ppl_windows: int | None = 10,
    data_dir: str | None = None,
    command: str | None = None,
    extra: dict | None = None,
    resume: bool = False,
    engines: list[str] = ("llmcompressor",),
) -> dict:
    """Quantize a fresh copy of ``model`` with each setting (rotation + GPTQ, in
    memory) and measure WikiText-2 perplexity; ``out_json`` is rewritten after every
    run. With ``resume``, runs already in ``out_json`` under the same calibration and
    evaluation settings are kept instead of repeated."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.recipe import Recipe
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from gsr_plugin.rotation import head_dim_of

    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    stream = tokenizer(wikitext2_test_text(data_dir), return_tensors="pt").input_ids
    windows = calibration_windows(tokenizer, calib_samples, calib_len, seed, data_dir)
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    protocol = {"model": model, "calib_samples": calib_samples, "calib_len": calib_len, "seed": seed,
                "ppl_windows": ppl_windows}

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    previous = json.loads(out_json.read_text()) if resume and out_json.is_file() else {}
    if previous.get("protocol") != protocol:
        previous = {}
    if "fp" in previous:
        fp = previous["fp"]
    else:
        fp = perplexity(load(), stream, max_windows=ppl_windows, progress=False).to_dict()
    model_config = AutoConfig.from_pretrained(path)
    head_dim = head_dim_of(model_config)
    report = {
        "command": command or "gsr " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "protocol": protocol,
        **(extra or {}),
        "fp": fp,
        "runs": [],
    }
    done = {r["recipe"]: r for r in previous.get("runs", [])}
    for setting, engine in tqdm([(s, e) for s in settings for e in engines], desc="runs", unit="run"):
        key = run_key(setting, engine)
        if key in done:
            report["runs"].append(done[key])
            continue
        start = time.perf_counter()
        learned = None
        if engine == "optimum":
            quantized = _quantize_with_optimum(path, tokenizer, windows, recipe_yaml(setting, head_dim))
        else:
            quantized = load()
            modifiers = Recipe.create_instance(recipe_yaml(setting, head_dim)).modifiers
            oneshot(
                model=quantized,
                processor=tokenizer,
                dataset=dataset,
                recipe=modifiers,
                num_calibration_samples=calib_samples,
                max_seq_length=calib_len,
                **IN_DRAWN_ORDER,
            )
            learned = next((m.learned for m in modifiers if getattr(m, "learned", None)), None)
        seconds = time.perf_counter() - start
        result = perplexity(quantized, stream, max_windows=ppl_windows, progress=False)
        report["runs"].append(
            {
                "recipe": key,
                "engine": engine,
                "method": setting.method,
                "bits": setting.weight_bits,
                "group_size": setting.group_size,
                "symmetric": setting.symmetric,
                "activation_bits": setting.activation_bits,
                "block_size": setting.block_size,
                "online_r4": setting.online_r4,
                "r4_block_size": setting.r4_block_size,
                "kv_bits": setting.kv_bits,
                "online_r3": setting.online_r3,
                "kv_dynamic": setting.kv_dynamic,
                "weight_observer": setting.weight_observer,
                "rank": setting.rank,
                "lowrank": setting.lowrank if setting.rank else None,
                "fp4": setting.fp4,
                "fp4_gptq": setting.fp4_gptq,
                "activation_clip": setting.activation_clip,
                "kv_clip": setting.kv_clip,
                "sink_tokens": setting.sink_tokens,
                "bits_per_weight": round(bits_per_weight(model_config, setting.weight_bits, setting.group_size,
                                                         setting.symmetric, setting.rank,
                                                         scale_bits=8 if setting.fp4 else 16), 4),
                "ppl": result.ppl,
                "windows": result.windows,
                "quantize_seconds": round(seconds, 1),
                **({"learned": learned} if learned else {}),  # a learned rotation's record (FRTQ: objective, guard)
            }
        )
        tqdm.write(f"{key}: PPL {result.ppl:.2f}")
        out_json.write_text(json.dumps(report, indent=2) + "\n")
        del quantized
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def run_key(setting: RecipeSetting, engine: str = "llmcompressor") -> str:
    """A run's name in reports (and the key ``resume`` matches): the recipe name, plus
    the R1 block when it is not the default, plus the engine when it is not oneshot."""
    key = setting.name + ("" if setting.block_size is None else f"_b{setting.block_size}")
    return key + ("" if engine == "llmcompressor" else f"@{engine}")


def _quantize_with_optimum(path, tokenizer, windows, recipe: str):
    """The recipe through the Optimum engine, weights dequantized to float32."""
    from gsr_plugin.engines.optimum import dequantize_to_float, quantize_optimum, recipe_for_optimum

    rotations, gptq = recipe_for_optimum(recipe)
    model, _ = quantize_optimum(path, tokenizer, windows, gptq, rotations)
    return dequantize_to_float(model)


def _row(run: dict, engines: set) -> str:
    row = run["method"] + (f" + rank {run['rank']} {run['lowrank']}" if run.get("rank") else "")
    return row if len(engines) < 2 else f"{row} ({run.get('engine', 'llmcompressor')})"


def _fmt(ppl: float) -> str:
    if not math.isfinite(ppl):
        return "inf"
    return f"{ppl:.1f}" if ppl < 1000 else f"{ppl:.2e}"


def markdown_table(report: dict) -> str:
    s = report["settings"]
    bits = sorted({r["bits"] for r in report["runs"]})
    engines = {r.get("engine", "llmcompressor") for r in report["runs"]}
    methods = list(dict.fromkeys(_row(r, engines) for r in report["runs"]))
    ppl = {(_row(r, engines), r["bits"]): r["ppl"] for r in report["runs"]}
    group = f"groups of {s['group_size']}" if s["group_size"] else "per-channel scales"
    lines = [
        f"WikiText-2 perplexity of `{s['model']}` after GPTQ "
        f"({'symmetric' if s['symmetric'] else 'asymmetric'} int weights, {group}, 16-bit activations), "
        f"first {report['fp']['windows']} of {report['fp']['total_windows']} windows of {report['fp']['seq_len']} tokens; "
        f"calibration {s['calib_samples']} x {s['calib_len']} tokens of WikiText-2 validation (seed {s['seed']}).",
        "",
        "| method | " + " | ".join(f"W{b}" for b in bits) + " |",
        "|---|" + "---|" * len(bits),
        "| float32 (no quantization) | " + " | ".join(_fmt(report["fp"]["ppl"]) for _ in bits) + " |",
    ]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(_fmt(ppl.get((method, b), float("nan"))) for b in bits) + " |")
    if any(r.get("rank") for r in report["runs"]):
        lines += ["", "Bits per weight of the decoder linears (weights, 16-bit scales, zero points, 16-bit low-rank factors):",
                  "", "| method | " + " | ".join(f"W{b}" for b in bits) + " |", "|---|" + "---|" * len(bits)]
        bpw = {(_row(r, engines), r["bits"]): r.get("bits_per_weight") for r in report["runs"]}
        for method in methods:
            lines.append(f"| {method} | " + " | ".join(
                f"{bpw[(method, b)]:.2f}" if bpw.get((method, b)) else "" for b in bits) + " |")
    described = dict.fromkeys(r["method"] for r in report["runs"])
    lines += ["", "Methods: " + "; ".join(f"`{m}`: {METHODS[m]}" for m in described) + "."]
    if len(engines) > 1:
        lines += ["", "Engines: `llmcompressor`: oneshot's GPTQModifier; `optimum`: the same rotation by "
                  "gsr_plugin.rotate, then gptqmodel's GPTQ (Optimum's GPTQQuantizer), its weights dequantized and "
                  "computed in float32 like llm-compressor's fake quantization."]
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    engines = {r.get("engine", "llmcompressor") for r in report["runs"]}
    for method in dict.fromkeys(_row(r, engines) for r in report["runs"]):
        points = sorted((r["bits"], r["ppl"]) for r in report["runs"] if _row(r, engines) == method)
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
