"""What GSR costs, as ratios measured side by side in one run (these machines are noisy).

1. transform: the fast Walsh transform against the dense product with the same matrix
   and against a memory copy (the floor), sizes 64..8192, a batch of rows;
2. online R4: the transform at down_proj's input against down_proj's own matmul, on
   the default model's shapes (2048 tokens x 1536 -> 576);
3. GSR (R1+R2, data-free) against GPTQ W4A16 g64 on the default model;
4. peak memory while applying GSR against the model's size;
5. FRTQ (learned R1+R2 with R4, for a W4A4 g64 grid: caching activations + learning +
   fusing) against GPTQ W4A16 g64, and its peak memory (``--only frtq`` runs this alone);
6. the low-rank path ``L (R x)`` against the layer's matmul, on the default model's
   shapes, as transformers runs them (float32, the weight dequantized) (``--only lowrank``);
7. GSR at scale: fusion time and peak memory on randomly initialized models of a 0.5B
   Qwen2 shape, a 64-expert MoE and a Llama-2-7B shape (on cuts), against GPTQ on the
   same shapes (``--only scale``, ``--scale-models`` to pick).

    python benchmarks/cost.py --out docs/results
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from gsr_plugin.eval.data import IN_DRAWN_ORDER
from gsr_plugin.walsh import DENSE_MAX_BLOCK, grouped_walsh_transform, walsh_matrix


def best_of(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def transform_speed(rows: int = 4096) -> list[dict]:
    out = []
    for n in [64, 128, 256, 512, 1024, 2048, 4096, 8192]:
        x = torch.randn(rows, n)
        dense = walsh_matrix(n, "sequency", dtype=torch.float32)
        t_copy = best_of(lambda: x.clone())
        t_dense = best_of(lambda: x @ dense)
        t_fast = best_of(lambda: grouped_walsh_transform(x, n, method="fast"))
        out.append({
            "size": n, "rows": rows, "copy_ms": t_copy * 1e3, "dense_ms": t_dense * 1e3, "fast_ms": t_fast * 1e3,
            "fast_over_dense": t_fast / t_dense, "fast_over_copy": t_fast / t_copy,
        })
    return out


def online_r4_overhead(tokens: int = 2048) -> list[dict]:
    """down_proj of SmolLM2: (tokens x 1536) @ (1536 x 576)."""
    x = torch.randn(tokens, 1536)
    weight = torch.randn(576, 1536)
    t_matmul = best_of(lambda: torch.nn.functional.linear(x, weight))
    out = []
    for block in (64, 512):
        for method in ("dense", "fast"):
            t = best_of(lambda: grouped_walsh_transform(x, block, method=method))
            out.append({"r4_block": block, "method": method, "transform_ms": t * 1e3,
                        "down_proj_ms": t_matmul * 1e3, "overhead": t / t_matmul,
                        "auto_picks": "dense" if block <= DENSE_MAX_BLOCK else "fast"})
    return out


def lowrank_overhead(tokens: int = 2048, threads: int | None = None) -> list[dict]:
    """``F.linear(F.linear(x, R), L)`` against ``F.linear(x, W)`` for SmolLM2's q_proj
    (576 -> 576), gate_proj (576 -> 1536) and down_proj (1536 -> 576), on ``threads``
    threads (both sides). On a loaded machine, use 1: with 2 OpenMP threads competing
    for 2 busy cores, a rank-8 product waits ~20 ms at the barrier for 0.5 ms of work."""
    if threads:
        torch.set_num_threads(threads)
    out = []
    for name, (n_out, n_in) in {"q_proj": (576, 576), "gate_proj": (1536, 576), "down_proj": (576, 1536)}.items():
        x, w = torch.randn(tokens, n_in), torch.randn(n_out, n_in)
        t_matmul = best_of(lambda: torch.nn.functional.linear(x, w))
        for rank in (8, 16, 32):
            left, right = torch.randn(n_out, rank), torch.randn(rank, n_in)
            t = best_of(lambda: torch.nn.functional.linear(torch.nn.functional.linear(x, right), left))
            out.append({"layer": name, "rank": rank, "lowrank_ms": t * 1e3, "matmul_ms": t_matmul * 1e3,
                        "overhead": t / t_matmul, "threads": torch.get_num_threads()})
    return out


def vllm_lora_overhead(checkpoint: str, repeats: int = 3) -> dict:
    """vLLM's greedy generation time (3 prompts x 64 tokens) with the checkpoint's LoRA
    adapter against the same residual checkpoint without it (a copy without ``lora/``),
    alternating, best of ``repeats``: the low-rank path's cost in vLLM."""
    import shutil
    import tempfile

    from gsr_plugin.serving.agreement import PROMPTS, REFERENCES
    from gsr_plugin.serving.runner import run_vllm

    with tempfile.TemporaryDirectory() as work:
        bare = Path(work) / "bare"
        shutil.copytree(checkpoint, bare, ignore=shutil.ignore_patterns("lora"))
        times = {"lora": [], "bare": []}
        for _ in range(repeats):
            for name, path in (("lora", checkpoint), ("bare", str(bare))):
                times[name].append(run_vllm(path, "bfloat16", PROMPTS, REFERENCES[:1], 64)["generate_seconds"])
    return {"checkpoint": checkpoint, "lora_seconds": min(times["lora"]), "bare_seconds": min(times["bare"]),
            "overhead": min(times["lora"]) / min(times["bare"]), "tokens": "3 prompts x 64 greedy tokens"}


class PeakRSS:
    """Samples the process's resident memory in a thread; ``peak`` above ``start``."""

    def __init__(self, interval: float = 0.01):
        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss - self.start)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def _default_model_and_data(calib_samples: int, calib_len: int):
    """(tokenizer, calibration Dataset, float32 default model, its bytes)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gsr_plugin.eval.data import calibration_windows
    from gsr_plugin.eval.models import resolve_model

    path = resolve_model("default")
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = calibration_windows(tokenizer, calib_samples, calib_len)
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return tokenizer, data, model, sum(p.numel() * p.element_size() for p in model.parameters())


def gsr_vs_gptq(calib_samples: int, calib_len: int) -> dict:
    from llmcompressor import oneshot

    from gsr_plugin import GSRModifier
    from gsr_plugin.recipes import RecipeSetting, recipe_yaml

    tokenizer, data, model, model_bytes = _default_model_and_data(calib_samples, calib_len)
    with PeakRSS() as memory:
        start = time.perf_counter()
        oneshot(model=model, recipe=[GSRModifier()])
        gsr_seconds = time.perf_counter() - start
    recipe = recipe_yaml(RecipeSetting("none", 4, 64), 64)  # GPTQ alone, on the rotated model
    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=data, recipe=recipe,
            num_calibration_samples=calib_samples, max_seq_length=calib_len, **IN_DRAWN_ORDER)
    gptq_seconds = time.perf_counter() - start
    return {
        "gsr_seconds": gsr_seconds, "gptq_seconds": gptq_seconds, "gsr_over_gptq": gsr_seconds / gptq_seconds,
        "gptq": f"W4A16 g64, calibration {calib_samples} x {calib_len}",
        "model_bytes": model_bytes, "gsr_peak_extra_bytes": memory.peak,
        "gsr_peak_extra_over_model": memory.peak / model_bytes,
    }


def frtq_vs_gptq(calib_samples: int, calib_len: int) -> dict:
    """FRTQ as shipped for W4A4KV4 (``frtq_w4a4kv4_g64_asym_r34_dynkv_acliplearn_kvclip95_gptq``:
    R1+R2 learned with the clip, 100 steps, 256 tokens per input, the guard on 128
    held-out ones), against the same recipe with no rotation (GPTQ and the
    quantizers alone), on the same model and calibration set, one after the other:
    FRTQ's cost is the difference."""
    from llmcompressor import oneshot
    from llmcompressor.recipe import Recipe

    from gsr_plugin.recipes import RecipeSetting, recipe_yaml

    protocol = dict(symmetric=False, activation_bits=4, kv_bits=4, kv_dynamic=True, online_r3=True, online_r4=True,
                    kv_clip=0.95)
    settings = {"frtq": RecipeSetting("frtq", 4, 64, **protocol, activation_clip="learn"),
                "gptq": RecipeSetting("none", 4, 64, **{**protocol, "online_r3": False, "online_r4": False},
                                      activation_clip=0.9)}
    seconds, learned = {}, {}
    for name, setting in settings.items():
        tokenizer, data, model, model_bytes = _default_model_and_data(calib_samples, calib_len)
        modifiers = Recipe.create_instance(recipe_yaml(setting, 64)).modifiers
        start = time.perf_counter()
        oneshot(model=model, processor=tokenizer, dataset=data, recipe=modifiers,
                num_calibration_samples=calib_samples, max_seq_length=calib_len, **IN_DRAWN_ORDER)
        seconds[name] = time.perf_counter() - start
        learned = next((m.learned for m in modifiers if getattr(m, "learned", None)), learned)
    rotation = seconds["frtq"] - seconds["gptq"]
    return {
        "frtq_recipe_seconds": seconds["frtq"], "gptq_recipe_seconds": seconds["gptq"],
        "frtq_seconds": rotation, "frtq_learning_seconds": learned.get("seconds"),
        "frtq_guard_seconds": learned.get("guard", {}).get("seconds"),
        "frtq_over_gptq": rotation / seconds["gptq"],
        "frtq": settings["frtq"].name, "gptq": settings["gptq"].name,
        "calibration": f"{calib_samples} x {calib_len}", "model_bytes": model_bytes,
    }


SCALE_CONFIGS = {
    # Qwen2.5-0.5B's shape (hidden 896, 24 layers, vocabulary 151,936), random weights
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # a many-expert MoE: 64 experts per layer (Qwen3-MoE layout, 8 layers), vocabulary 151,936
    "qwen3-moe-64e": dict(model_type="qwen3_moe", hidden_size=1024, intermediate_size=3072, moe_intermediate_size=256,
                          num_experts=64, num_experts_per_tok=8, num_hidden_layers=8, num_attention_heads=16,
                          num_key_value_heads=4, head_dim=64, vocab_size=151936, tie_word_embeddings=False),
    # Llama-2-7B's shape (hidden 4096, 32 layers, intermediate 11008): 27 GB in float32,
    # more than this machine holds, so both sides run on cuts (SCALE_CUTS)
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
}
# models measured on cuts of 1 and 2 layers, both GSR and GPTQ: per layer = t(2) - t(1),
# whole model = t(1) + (layers - 1) * per layer (the embedding, lm_head and the
# pipeline's setup are counted once, not once per layer)
SCALE_CUTS = {"llama2-7b": (1, 2)}


def _random_model(fields: dict, layers: int | None = None):
    """A randomly initialized float32 model of ``fields`` (``layers`` overrides the depth)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(fields)
    model_type = fields.pop("model_type")
    if layers is not None:
        fields["num_hidden_layers"] = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields), dtype=torch.float32)


def _gsr_fusion(fields: dict, layers: int | None = None) -> dict:
    """GSR R1+R2 (``rotate``) on a random model: seconds, peak bytes above the model."""
    from gsr_plugin import rotate

    model = _random_model(fields, layers)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    modules = sum(1 for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)))
    with PeakRSS() as memory:
        start = time.perf_counter()
        rotate(model)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak": memory.peak, "model_bytes": model_bytes, "modules": modules}


def _gptq_seconds(fields: dict, layers: int, calib_samples: int, calib_len: int) -> float:
    """GPTQ W4A16 g64 through ``oneshot`` on a ``layers``-layer random model, random tokens."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gsr_plugin.recipes import RecipeSetting, recipe_yaml
    from gsr_plugin.eval.models import resolve_model

    model = _random_model(fields, layers)
    with tempfile.TemporaryDirectory() as work:  # oneshot reads the config back from disk
        model.save_pretrained(work)
        del model
        model = AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32)
        tokens = torch.randint(0, fields["vocab_size"], (calib_samples, calib_len),
                               generator=torch.Generator().manual_seed(0))
        data = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
        # the data is token ids already; oneshot still wants a processor, and a random
        # model has none on disk: the default model's tokenizer stands in (never used)
        tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
        start = time.perf_counter()
        oneshot(model=model, processor=tokenizer, dataset=data, recipe=recipe_yaml(RecipeSetting("none", 4, 64), 64),
                num_calibration_samples=calib_samples, max_seq_length=calib_len, **IN_DRAWN_ORDER)
        return time.perf_counter() - start


def fusion_at_scale(name: str, gptq_layers: int = 2, calib_samples: int = 16, calib_len: int = 512) -> dict:
    """GSR (R1+R2) on a randomly initialized model of ``SCALE_CONFIGS[name]``: time and
    peak memory above the model. GPTQ (W4A16 g64 on random tokens) runs on a
    ``gptq_layers``-layer cut of the same shape and is scaled to the full depth (GPTQ's
    cost is per layer; lm_head is not quantized), which 2 CPU cores can afford. Models in
    ``SCALE_CUTS`` run both sides on two cuts and extrapolate linearly in depth."""
    fields = SCALE_CONFIGS[name]
    depth = fields["num_hidden_layers"]
    if name in SCALE_CUTS:
        short, long = SCALE_CUTS[name]

        def extrapolate(t_short: float, t_long: float) -> float:
            per_layer = (t_long - t_short) / (long - short)
            return t_short + (depth - short) * per_layer

        gsr = [_gsr_fusion(fields, layers) for layers in (short, long)]
        gptq = [_gptq_seconds(fields, layers, calib_samples, calib_len) for layers in (short, long)]
        gsr_seconds, gptq_seconds = extrapolate(*(g["seconds"] for g in gsr)), extrapolate(*gptq)
        measured, peak = gsr[1], max(g["peak"] for g in gsr)
        how = f"{short}- and {long}-layer cuts, extrapolated to {depth} layers"
        extra = {"cut_layers": [short, long], "gsr_cut_seconds": [g["seconds"] for g in gsr],
                 "gptq_cut_seconds": gptq, "peak_measured_on": f"{long}-layer cut"}
    else:
        measured = _gsr_fusion(fields)
        gsr_seconds, peak = measured["seconds"], measured["peak"]
        gptq_cut = _gptq_seconds(fields, gptq_layers, calib_samples, calib_len)
        gptq_seconds = gptq_cut * depth / gptq_layers
        how = f"{gptq_layers}-layer cut x {depth / gptq_layers:g}"
        extra = {"gptq_cut_layers": gptq_layers, "gptq_cut_seconds": gptq_cut}
    return {
        "model": name, "config": fields, "modules": measured["modules"], "model_bytes": measured["model_bytes"],
        "gsr_seconds": gsr_seconds, "gsr_peak_extra_bytes": peak,
        "gsr_peak_extra_over_model": peak / measured["model_bytes"],
        "gptq_seconds_scaled": gptq_seconds, "gsr_over_gptq": gsr_seconds / gptq_seconds,
        "gptq": f"W4A16 g64, {calib_samples} x {calib_len} random tokens, {how}", **extra,
    }


def tables(report: dict) -> str:
    lines = [f"Command: `{report['command']}` ({report['threads']} threads)", "",
             "| size | rows | copy ms | dense ms | fast ms | fast / dense | fast / copy |", "|---|---|---|---|---|---|---|"]
    for r in report["transform"]:
        lines.append(f"| {r['size']} | {r['rows']} | {r['copy_ms']:.2f} | {r['dense_ms']:.2f} | {r['fast_ms']:.2f} | "
                     f"{r['fast_over_dense']:.3f} | {r['fast_over_copy']:.1f} |")
    lines += ["", "| R4 block | method | transform ms | down_proj matmul ms | overhead | `auto` uses |", "|---|---|---|---|---|---|"]
    for r in report["online_r4"]:
        lines.append(f"| {r['r4_block']} | {r['method']} | {r['transform_ms']:.2f} | {r['down_proj_ms']:.2f} | "
                     f"{r['overhead']:.2f} | {r['auto_picks']} |")
    g = report.get("gsr_vs_gptq")
    if g:
        lines += ["", f"GSR (R1+R2) {g['gsr_seconds']:.1f} s, GPTQ ({g['gptq']}) {g['gptq_seconds']:.1f} s: "
                  f"GSR / GPTQ = {g['gsr_over_gptq']:.3f}. Peak extra memory while applying GSR "
                  f"{g['gsr_peak_extra_bytes'] / 2**20:.0f} MiB = {g['gsr_peak_extra_over_model']:.2f} x the "
                  f"model's {g['model_bytes'] / 2**20:.0f} MiB of float32 weights."]
    low = report.get("lowrank")
    if low:
        lines += ["", "| layer (2048 tokens) | rank | threads | L(Rx) ms | x W^T ms | overhead |", "|---|---|---|---|---|---|"]
        for r in low:
            lines.append(f"| {r['layer']} | {r['rank']} | {r.get('threads', report['threads'])} | {r['lowrank_ms']:.2f} | "
                         f"{r['matmul_ms']:.2f} | {r['overhead']:.3f} |")
    v = report.get("vllm_lora")
    if v:
        lines += ["", f"vLLM ({v['tokens']}, best of 3): with the LoRA adapter {v['lora_seconds']:.2f} s, the same "
                  f"residual checkpoint without it {v['bare_seconds']:.2f} s: overhead {v['overhead']:.2f} x "
                  f"(`{v['checkpoint']}`)."]
    scale = report.get("scale")
    if scale:
        lines += ["", "| model (random weights) | Linear/Embedding modules as loaded (experts fused) | float32 GiB | GSR s | GSR peak extra | GPTQ s (scaled) | GSR / GPTQ |",
                  "|---|---|---|---|---|---|---|"]
        for r in scale:
            on = f" ({r['peak_measured_on']})" if "peak_measured_on" in r else ""
            lines.append(f"| {r['model']} | {r['modules']} | {r['model_bytes'] / 2**30:.2f}{on} | {r['gsr_seconds']:.1f} | "
                         f"{r['gsr_peak_extra_over_model']:.2f} x model{on} | {r['gptq_seconds_scaled']:.0f} "
                         f"({r['gptq']}) | {r['gsr_over_gptq']:.3f} |")
    f = report.get("frtq_vs_gptq")
    if f:
        lines += ["", f"`{f['frtq']}` {f['frtq_recipe_seconds']:.0f} s against `{f['gptq']}` (GPTQ and the "
                  f"same quantizers, no rotation) {f['gptq_recipe_seconds']:.0f} s, calibration {f['calibration']}: "
                  f"FRTQ costs {f['frtq_seconds']:.0f} s (learning {f['frtq_learning_seconds']:.0f} s, guard "
                  f"{f['frtq_guard_seconds']:.0f} s), FRTQ / GPTQ = {f['frtq_over_gptq']:.2f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--skip-model", action="store_true", help="only the transform timings")
    parser.add_argument("--lora-checkpoint", default=None,
                        help="with --only lowrank: also time vLLM with this checkpoint's adapter against without")
    parser.add_argument("--threads", type=int, default=None,
                        help="with --only lowrank: time on this many threads (1 on a loaded machine)")
    parser.add_argument("--scale-models", nargs="+", choices=list(SCALE_CONFIGS), default=None,
                        help="with --only scale: measure these models (the others' rows are kept)")
    parser.add_argument("--only", choices=["frtq", "lowrank", "scale"], default=None,
                        help="run this part alone (kept with the others in cost.json)")
    args = parser.parse_args()
    out = Path(args.out)
    command = "python benchmarks/cost.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.only:
        report = json.loads((out / "cost.json").read_text()) if (out / "cost.json").is_file() else {}
        if args.only == "frtq":
            report["frtq_vs_gptq"] = {**frtq_vs_gptq(args.calib_samples, args.calib_len), "command": command}
        elif args.only == "scale":
            rows = {r["model"]: r for r in report.get("scale", [])}
            for name in args.scale_models or list(SCALE_CONFIGS):
                rows[name] = {**fusion_at_scale(name), "command": command}
            report["scale"] = [rows[name] for name in SCALE_CONFIGS if name in rows]
        else:
            report["lowrank"] = lowrank_overhead(threads=args.threads)
            if args.lora_checkpoint:
                report["vllm_lora"] = vllm_lora_overhead(args.lora_checkpoint)
        report.setdefault("command", command)
        report.setdefault("threads", torch.get_num_threads())
    else:
        report = {"command": command, "threads": torch.get_num_threads(), "transform": transform_speed(),
                  "online_r4": online_r4_overhead()}
        if not args.skip_model:
            report["gsr_vs_gptq"] = gsr_vs_gptq(args.calib_samples, args.calib_len)
            report["frtq_vs_gptq"] = frtq_vs_gptq(args.calib_samples, args.calib_len)
        report["lowrank"] = lowrank_overhead()
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "cost.md").write_text(tables(report))
    print(tables(report))
