"""What a user gets when they serve it: one checkpoint per shipped recipe family of the
default model, quantized with ``gsr quantize``'s code, then measured as served:

* vLLM where it serves the checkpoint on this CPU (``gsr eval --engine vllm``: perplexity
  from vLLM's prompt log-probabilities on the same windows as transformers, prefill and
  decode speed at batch 1, peak resident memory), with transformers' figure beside it;
* transformers with gptqmodel's packed kernels for GPTQ-format checkpoints vLLM does
  not read (W3, W2), timed the same way in a process of its own;
* speed and memory as ratios to the bf16 model in the same engine and the same run.

    python benchmarks/served.py --out docs/results --work /tmp/served --resume

Results go to ``<out>/served.json`` after each row, ``served.md`` and ``served.png``.
Checkpoints stay in ``--work`` (never committed).
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gsr_plugin.recipes import RecipeSetting, recipe_yaml

from gsr_plugin.serving.evaluate import SPEED  # noqa: E402  (the served side times the same way)


@dataclass(frozen=True)
class Row:
    name: str
    setting: RecipeSetting | None  # None: the bf16 model
    engine: str = "llmcompressor"  # or "optimum" (GPTQ format)


# in priority order: the bf16 baseline, GSR against no rotation at W4A16 g64 (same bytes?),
# W8A8, FRTQ, the GPTQ format at 3 and 4 bits, per channel, W2
ROWS = [
    Row("bf16", None),
    Row("gsr w4a16 g64", RecipeSetting("gsr", 4, 64)),
    Row("none w4a16 g64", RecipeSetting("none", 4, 64)),
    Row("gsr w8a8", RecipeSetting("gsr", 8, None, activation_bits=8)),
    Row("frtq w4a16 g64", RecipeSetting("frtq", 4, 64)),
    Row("gsr gptq w3 g64 (optimum)", RecipeSetting("gsr", 3, 64, symmetric=False), "optimum"),
    Row("gsr gptq w4 g64 (optimum)", RecipeSetting("gsr", 4, 64), "optimum"),
    Row("gsr w4a16 per channel", RecipeSetting("gsr", 4, None, symmetric=False)),
    Row("frtq w4a16 per channel", RecipeSetting("frtq", 4, None, symmetric=False)),
    Row("none w4a16 per channel", RecipeSetting("none", 4, None, symmetric=False)),
    Row("gsr gptq w2 g64 (optimum)", RecipeSetting("gsr", 2, 64, symmetric=False), "optimum"),
]

# what would load each on a CUDA GPU, read from vLLM 0.32's source (not run here)
GPU_READ = {
    "bf16": "unquantized linears",
    "w4a16": "CompressedTensorsWNA16: Marlin (sm75+; pads qkv, o_proj); Machete on sm90 where N % 128 = 0",
    "w8a8": "CompressedTensorsW8A8Int8: CUTLASS int8 scaled_mm (sm75+)",
    "gptq4": "AutoGPTQConfig (4, sym): Marlin, as W4A16",
    "gptq_low": "refused: AutoGPTQConfig takes (4, sym) and (8, sym) only",
}


def bytes_on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


_DTYPE_BYTES = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1}


def checkpoint_size(path: Path) -> dict:
    """What the weights take: ``bytes`` on disk; ``bytes_16bit``, the same with every
    float32 tensor at 2 bytes (the default model's source is float32, so its
    quantized checkpoints keep float32 embeddings, norms and scales where a bf16
    source keeps bf16); ``lm_head``: ``tied`` to the embedding or its ``own`` matrix
    (R1 unties them: the final norm's scale is fused into lm_head only)."""
    import math

    from safetensors import safe_open

    total = sixteen = 0
    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                view = f.get_slice(name)
                count = math.prod(view.get_shape())
                size = _DTYPE_BYTES[view.get_dtype()]
                total += count * size
                sixteen += count * (2 if view.get_dtype() == "F32" else size)
                names.add(name)
    on_disk = bytes_on_disk(path)
    return {"bytes": on_disk, "bytes_16bit": on_disk - total + sixteen,
            "lm_head": "own" if any(n.startswith("lm_head.") for n in names) else "tied"}


def checkpoint_dir(work: Path, name: str) -> Path:
    return work / name.replace(" ", "_").replace("(", "").replace(")", "")


def make_checkpoint(row: Row, work: Path, calib_samples: int) -> Path:
    from gsr_plugin.cli.quantize import quantize
    from gsr_plugin.eval.models import resolve_model

    out = checkpoint_dir(work, row.name)
    if (out / "config.json").is_file():
        return out
    if row.setting is None:  # the model as served in 16-bit
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model("default")
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(out)
        AutoTokenizer.from_pretrained(path).save_pretrained(out)
        return out
    recipe = work / f"{row.setting.name}.yaml"
    recipe.write_text(recipe_yaml(row.setting, 64))
    return quantize("default", str(recipe), out, calib_samples=calib_samples, engine=row.engine)


def measure_transformers(checkpoint: str) -> dict:
    """In this process (run it alone): transformers' speed at batch 1 (prefill of
    SPEED's prompt; greedy decoding of SPEED's tokens after it) and peak memory."""
    from transformers import AutoTokenizer

    from gsr_plugin.eval.data import wikitext2_test_text
    from gsr_plugin.loading import load_with_online_transforms

    start = time.perf_counter()
    model = load_with_online_transforms(checkpoint, dtype=torch.bfloat16).eval()
    loaded = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer(wikitext2_test_text(None)[:20000], return_tensors="pt").input_ids[:, : SPEED["prompt_tokens"]]

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(SPEED["repeats"]):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        prefill = best(lambda: model(ids))
        both = best(lambda: model.generate(ids, max_new_tokens=SPEED["decode_tokens"],
                                           min_new_tokens=SPEED["decode_tokens"], do_sample=False))
    decode = both - prefill
    return {"engine": "transformers", "load_seconds": round(loaded, 1),
            "speed": {"prefill_tokens_per_second": ids.shape[1] / prefill,
                      "decode_tokens_per_second": (SPEED["decode_tokens"] - 1) / decode},
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "kernel": _gptq_kernel(model)}


def _gptq_kernel(model) -> str | None:
    names = {type(m).__name__ for m in model.modules() if hasattr(m, "qweight")}  # gptqmodel's packed linears
    return ", ".join(sorted(names)) or None


def transformers_row(checkpoint: Path, windows: int) -> dict:
    """Perplexity (``gsr eval``, float32 as every transformers figure here) and the
    timings of ``measure_transformers`` in a process of its own (its memory alone)."""
    from gsr_plugin.eval.evaluate import evaluate

    result = subprocess.run([sys.executable, __file__, "--measure-transformers", str(checkpoint)],
                            capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    report = evaluate(str(checkpoint), windows)
    measured["ppl"] = report["wikitext2"]["ppl"]
    measured["transformers_ppl"] = report["wikitext2"]["ppl"]
    return measured


def vllm_row(checkpoint: Path, windows: int) -> dict:
    from gsr_plugin.serving.evaluate import evaluate_served

    report = evaluate_served(checkpoint, windows, progress=False)
    w = report["wikitext2"]
    return {"engine": report["kernels"] or f"vLLM {report['vllm']}", "ppl": w["vllm"], "transformers_ppl": w["transformers"],
            "agrees": w["agrees"], "nll_difference": w["nll_difference"], "allowed": w["allowed"],
            "speed": report["speed"], "peak_rss_bytes": report["peak_rss_bytes"], "load_seconds": report["load_seconds"]}


def speed_pairs(a: Path, b: Path, rounds: int) -> dict:
    """vLLM's speed of checkpoint ``a`` against ``b``, measured in turn (a b a b ...),
    each in a fresh vLLM process (SPEED's prompt and decode, best of its repeats), and
    the ratios a / b pair by pair: what a difference between them has to beat."""
    from transformers import AutoTokenizer

    from gsr_plugin.eval.data import wikitext2_test_text
    from gsr_plugin.serving.runner import run_vllm

    ids = AutoTokenizer.from_pretrained(a)(wikitext2_test_text(None)[:20000]).input_ids[: SPEED["prompt_tokens"]]
    request = {"prompt_ids": ids, "decode_tokens": SPEED["decode_tokens"], "repeats": SPEED["repeats"]}
    ratios = {"prefill": [], "decode": []}
    for _ in range(rounds):
        pair = [run_vllm(str(c), "bfloat16", [], [], 1, speed=request, context=2048)["speed"] for c in (a, b)]
        for kind in ratios:
            key = f"{kind}_tokens_per_second"
            ratios[kind].append(pair[0][key] / pair[1][key])
    return {"a": a.name, "b": b.name, "rounds": rounds, "ratios": ratios}


def gpu_method(row: Row) -> str:
    if row.setting is None:
        return GPU_READ["bf16"]
    if row.engine == "optimum":
        return GPU_READ["gptq4"] if row.setting.weight_bits == 4 and row.setting.symmetric else GPU_READ["gptq_low"]
    return GPU_READ["w8a8"] if row.setting.activation_bits == 8 else GPU_READ["w4a16"]


def run(args) -> dict:
    from transformers import AutoConfig

    from gsr_plugin.eval.models import resolve_model
    from gsr_plugin.eval.size import bits_per_weight
    from gsr_plugin.serving.rules import local_vllm_kernels, unservable_reasons

    out_json = Path(args.out) / "served.json"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/served.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    previous = json.loads(out_json.read_text()) if args.resume and out_json.is_file() else {}
    done = {r["name"]: r for r in previous.get("rows", [])}
    report = {"command": command, "windows": args.windows, "calib_samples": args.calib_samples, "speed": SPEED,
              "rows": [], **({"pairs": previous["pairs"]} if "pairs" in previous else {})}
    config = AutoConfig.from_pretrained(resolve_model("default"))
    kernels = local_vllm_kernels()
    for row in ROWS[: args.limit]:
        if row.name in done:
            report["rows"].append(done[row.name])
            continue
        start = time.perf_counter()
        checkpoint = make_checkpoint(row, work, args.calib_samples)
        quantize_seconds = time.perf_counter() - start
        s = row.setting
        entry = {"name": row.name, "recipe": s.name if s else None, "format": "GPTQ" if row.engine == "optimum" else
                 ("compressed-tensors" if s else "bf16"),
                 "bits_per_weight": round(bits_per_weight(config, s.weight_bits, s.group_size, s.symmetric), 3)
                 if s else 16.0,
                 **checkpoint_size(checkpoint), "gpu": gpu_method(row), "quantize_seconds": round(quantize_seconds)}
        reasons = unservable_reasons(checkpoint, "cpu", kernels)
        entry["vllm_cpu"] = "serves" if not reasons else "; ".join(reasons)
        entry["served"] = vllm_row(checkpoint, args.windows) if not reasons else transformers_row(checkpoint, args.windows)
        if row.setting is None:  # the bf16 model in transformers too: the base of that engine's ratios
            entry["transformers"] = transformers_row(checkpoint, args.windows)
        report["rows"].append(entry)
        print(f"{row.name}: {entry['served']['engine']} PPL {entry['served']['ppl']:.2f}", flush=True)
        out_json.write_text(json.dumps(report, indent=2) + "\n")
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def table(report: dict) -> str:
    """Markdown: one row per checkpoint, speed and memory as ratios to bf16 in the same engine."""
    rows = report["rows"]
    base = next((r for r in rows if r["name"] == "bf16"), None)
    bases = {"vllm": base["served"] if base else None, "transformers": base.get("transformers") if base else None}
    lines = [f"Command: `{report['command']}`; perplexity on the first {report['windows']} windows of 2048 "
             f"(float 16-bit model in the first row); speed at batch 1, prompt {report['speed']['prompt_tokens']} "
             f"tokens, {report['speed']['decode_tokens']} decoded; ratios to the bf16 model in the same engine.", "",
             "| checkpoint | format | bits / weight | MiB on disk | MiB, 16-bit rest | lm_head | runs on this CPU | "
             "served PPL | transformers PPL | prefill x bf16 | decode x bf16 | peak memory x bf16 | "
             "GPU (vLLM 0.32, read) |",
             "|" + "---|" * 13]
    for r in rows:
        served = r["served"]
        engine = "transformers" if served["engine"] == "transformers" else "vllm"
        ref = bases[engine]

        def ratio(key, sub=None):
            if not ref:
                return "-"
            mine = served[key][sub] if sub else served[key]
            theirs = ref[key][sub] if sub else ref[key]
            return f"{mine / theirs:.2f}"

        where = served["engine"] if engine == "vllm" else f"transformers + {served.get('kernel') or 'dense'}"
        agree = "" if engine != "vllm" else (" (agrees)" if served["agrees"] else " (DISAGREES)")
        lines.append(
            f"| {r['name']} | {r['format']} | {r['bits_per_weight']:.2f} | {r['bytes'] / 2**20:.0f} | "
            f"{r['bytes_16bit'] / 2**20:.0f} | {r['lm_head']} | {where} | "
            f"{served['ppl']:.2f}{agree} | {served['transformers_ppl']:.2f} | "
            f"{ratio('speed', 'prefill_tokens_per_second')} | {ratio('speed', 'decode_tokens_per_second')} | "
            f"{ratio('peak_rss_bytes')} | {r['gpu']} |")
    for pair in report.get("pairs", []):
        ratio = lambda kind: sorted(pair["ratios"][kind])  # noqa: E731
        text = ", ".join(f"{kind} {statistics.median(ratio(kind)):.2f} ({ratio(kind)[0]:.2f}-{ratio(kind)[-1]:.2f})"
                         for kind in ("prefill", "decode"))
        lines += ["", f"{pair['a']} / {pair['b']} in vLLM, {pair['rounds']} alternating runs (median, min-max): {text} "
                  f"(`{pair['command']}`)."]
    if base:
        lines += ["", f"bf16 in vLLM: prefill {base['served']['speed']['prefill_tokens_per_second']:.0f} tokens/s, "
                  f"decode {base['served']['speed']['decode_tokens_per_second']:.1f} tokens/s, peak "
                  f"{base['served']['peak_rss_bytes'] / 2**30:.2f} GiB."]
        if base.get("transformers"):
            t = base["transformers"]
            lines.append(f"bf16 in transformers: prefill {t['speed']['prefill_tokens_per_second']:.0f} tokens/s, "
                         f"decode {t['speed']['decode_tokens_per_second']:.1f} tokens/s, peak "
                         f"{t['peak_rss_bytes'] / 2**30:.2f} GiB.")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path, ceiling: float = 100.0) -> None:
    """Perplexity against MiB (float32 tensors at 16 bits), each point numbered, the
    numbers listed with the decode speed ratio; rows above ``ceiling`` are named in
    the title instead (they would flatten the rest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    base = next((r for r in rows if r["name"] == "bf16"), None)
    fig, (ax, key) = plt.subplots(1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    legend, off = [], []
    for number, r in enumerate(rows, 1):
        served = r["served"]
        engine = "transformers" if served["engine"] == "transformers" else "vllm"
        ref = (base.get("transformers") if engine == "transformers" else base["served"]) if base else None
        speed = (served["speed"]["decode_tokens_per_second"] / ref["speed"]["decode_tokens_per_second"]) if ref else None
        where = "transformers + gptqmodel" if engine == "transformers" else "vLLM"
        legend.append(f"{number}  {r['name']}: {where}" + (f", {speed:.2f}x decode" if speed else ""))
        if served["ppl"] > ceiling:
            off.append(f"{number} ({served['ppl']:.0f})")
            continue
        x, y = r.get("bytes_16bit", r["bytes"]) / 2**20, served["ppl"]
        ax.scatter(x, y, marker="o" if engine == "vllm" else "s", color="C0" if engine == "vllm" else "C1")
        ax.annotate(str(number), (x, y), fontsize=8, xytext=(3, 3 + 7 * (number % 3)), textcoords="offset points")
    ax.set_xlabel("checkpoint MiB (float32 tensors counted at 16 bits)")
    ax.set_ylabel(f"WikiText-2 PPL as served ({report['windows']} windows)")
    ax.set_title("vLLM (circles), transformers + gptqmodel (squares)" + (f"\noff the chart: {', '.join(off)}" if off else ""),
                 fontsize=9)
    key.axis("off")
    key.text(0, 1, "\n".join(legend), va="top", fontsize=8, family="monospace")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--work", default="/tmp/gsr-served", help="where the checkpoints go (kept for --resume)")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows (in priority order)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in served.json")
    parser.add_argument("--tables", action="store_true", help="only rewrite served.md and served.png")
    parser.add_argument("--pair", nargs=2, metavar=("A", "B"), default=None,
                        help="only time two rows' checkpoints in vLLM in turn (A B A B ...): the ratios A / B")
    parser.add_argument("--rounds", type=int, default=3, help="with --pair: how many A B rounds")
    parser.add_argument("--measure-transformers", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_transformers:
        print(json.dumps(measure_transformers(args.measure_transformers)))
        sys.exit(0)
    out = Path(args.out)
    if args.pair:
        report = json.loads((out / "served.json").read_text())
        pair = speed_pairs(*(checkpoint_dir(Path(args.work), name) for name in args.pair), args.rounds)
        pair["command"] = "python benchmarks/served.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        report["pairs"] = [p for p in report.get("pairs", []) if (p["a"], p["b"]) != (pair["a"], pair["b"])] + [pair]
    else:
        report = run(args) if not args.tables else json.loads((out / "served.json").read_text())
    for entry in report["rows"]:  # rows measured before the sizes were recorded: from their checkpoints
        folder = checkpoint_dir(Path(args.work), entry["name"])
        if "bytes_16bit" not in entry and folder.is_dir():
            entry.update(checkpoint_size(folder))
    (out / "served.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "served.md").write_text(table(report))
    plot(report, out / "served.png")
    print(table(report))
