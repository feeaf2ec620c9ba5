"""gsr_plugin.serving.check: what vLLM can run (rules, no vLLM needed), the comparison
logic, and real vLLM (its own environment, built or reused by scripts/vllm_env.sh)
against transformers on small GSR checkpoints made from the default model."""

import copy
import json

import pytest

from gsr_plugin.cli.main import main
from gsr_plugin.serving.check import (
    INT4_KERNEL,
    VLLM_CPU_BUILD_MISSING_OPS,
    Tolerance,
    VllmKernels,
    compare_outputs,
    predict_vllm_kernels,
    probe_vllm_kernels,
    run_transformers,
    run_vllm,
    serve_check,
    unservable_reasons,
    PROMPTS,
    REFERENCES,
)
from gsr_plugin.serving.vllm_worker import PROBED_OPS

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}


def checkpoint(tmp_path, weights, activations=None, transforms=None, dims=SMOLLM2):
    group = {"targets": ["Linear"], "weights": weights, "input_activations": activations}
    qconfig = {"config_groups": {"group_0": group}, "transform_config": {"config_groups": transforms or {}}}
    (tmp_path / "config.json").write_text(json.dumps({**dims, "quantization_config": qconfig}))
    return tmp_path


W4G64 = {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 64}
W8CH = {"num_bits": 8, "symmetric": True, "strategy": "channel"}
A8TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def test_default_model_w4a16_g64_and_w8a8_serve_on_cpu_and_gpu(tmp_path):
    for device in ("cpu", "cuda"):
        assert unservable_reasons(checkpoint(tmp_path, W4G64), device) == []
        assert unservable_reasons(checkpoint(tmp_path, W8CH, A8TOKEN), device) == []


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_weights_are_refused_with_the_setting_that_serves(tmp_path, bits):
    reasons = unservable_reasons(checkpoint(tmp_path, dict(W4G64, num_bits=bits, symmetric=False)))
    assert len(reasons) == 1 and f"{bits}-bit weights" in reasons[0] and "gsr_w4a16_g64_gptq" in reasons[0]


def test_cpu_kernel_rules(tmp_path):
    assert "W8A16" in unservable_reasons(checkpoint(tmp_path, dict(W8CH)), "cpu")[0]
    assert unservable_reasons(checkpoint(tmp_path, dict(W8CH)), "cuda") == []
    assert "odd" in unservable_reasons(checkpoint(tmp_path, dict(W4G64, group_size=63)))[0]
    odd_dims = dict(SMOLLM2, intermediate_size=1000)
    assert "divisible by 32" in unservable_reasons(checkpoint(tmp_path, W4G64, dims=odd_dims))[0]
    assert "symmetric int8" in unservable_reasons(checkpoint(tmp_path, dict(W8CH, symmetric=False), A8TOKEN))[0]
    w4a8 = unservable_reasons(checkpoint(tmp_path, W4G64, A8TOKEN))
    assert "gsr_w8a8_gptq" in w4a8[0]


def gptq_checkpoint(tmp_path, dims=SMOLLM2, **fields):
    qconfig = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True, "format": "gptq", **fields}
    (tmp_path / "config.json").write_text(json.dumps({**dims, "quantization_config": qconfig}))
    return tmp_path


@pytest.mark.parametrize("group,name", [(16, "NVFP4"), (32, "MXFP4")])
def test_fp4_is_refused_on_cpu_and_left_to_vllm_on_gpu(tmp_path, group, name):
    fp4 = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": group}
    reasons = unservable_reasons(checkpoint(tmp_path, fp4), "cpu")
    assert len(reasons) == 1 and f"{name} (FP4)" in reasons[0] and "GPU" in reasons[0]
    assert unservable_reasons(checkpoint(tmp_path, fp4), "cuda") == []


def test_gptq_rules(tmp_path):
    """vLLM 0.32 reads GPTQ as symmetric 4/8-bit; on CPU, the int4 kernel's rules."""
    assert unservable_reasons(gptq_checkpoint(tmp_path), "cpu", kernels_of("_C")) == []
    assert "symmetric only" in unservable_reasons(gptq_checkpoint(tmp_path, sym=False), "cuda")[0]
    assert "3-bit GPTQ" in unservable_reasons(gptq_checkpoint(tmp_path, bits=3), "cuda")[0]
    assert unservable_reasons(gptq_checkpoint(tmp_path, bits=8), "cuda") == []
    assert "4-bit weights only" in unservable_reasons(gptq_checkpoint(tmp_path, bits=8), "cpu")[0]
    assert INT4_KERNEL in unservable_reasons(gptq_checkpoint(tmp_path), "cpu", kernels_of("_C_AVX2"))[0]
    assert "divisible by 32" in unservable_reasons(gptq_checkpoint(tmp_path, dims=dict(SMOLLM2, intermediate_size=1000)))[0]


def test_online_transforms_need_a_gpu(tmp_path):
    online = {"R4": {"type": "sequency-walsh", "apply": [{"targets": ["re:.*down_proj$"], "location": "input"}]}}
    offline = {"R1": {"type": "sequency-walsh", "apply": [{"targets": ["lm_head"], "location": "weight_input"}]}}
    assert "GPU only" in unservable_reasons(checkpoint(tmp_path, W4G64, transforms=online), "cpu")[0]
    assert unservable_reasons(checkpoint(tmp_path, W4G64, transforms=online), "cuda") == []
    assert unservable_reasons(checkpoint(tmp_path, W4G64, transforms=offline), "cpu") == []


def test_unservable_checkpoint_is_refused_before_vllm_starts(tmp_path, monkeypatch, capsys):
    import gsr_plugin.serving.check as serving

    monkeypatch.setattr(serving, "run_vllm", lambda *a, **k: pytest.fail("vLLM started"))
    monkeypatch.setattr(serving, "probe_vllm_kernels", lambda python=None: kernels_of("_C"))
    ckpt = checkpoint(tmp_path, dict(W4G64, num_bits=2))
    with pytest.raises(ValueError, match="cannot serve"):
        serve_check(ckpt, python="unused")
    assert main(["serve-check", str(ckpt), "--device", "cpu", "--vllm-python", "unused"]) == 2
    assert "2-bit weights" in capsys.readouterr().err


def kernels_of(build: str) -> VllmKernels:
    """A kernel table as vllm-cpu 0.32's ``build`` registers it (no vLLM needed)."""
    ops = {name: name not in VLLM_CPU_BUILD_MISSING_OPS[build] for name in PROBED_OPS}
    return VllmKernels("cpu", build, {"avx2": True, "avx512": build != "_C_AVX2"}, ops, "0.32.0")


def test_without_the_int4_kernel_w4a16_is_refused_naming_the_op_and_what_serves(tmp_path):
    reasons = unservable_reasons(checkpoint(tmp_path, W4G64), "cpu", kernels_of("_C_AVX2"))
    assert len(reasons) == 1
    for words in (INT4_KERNEL, "_C_AVX2", "AVX-512", "GPU", "gsr_w8a8_gptq"):
        assert words in reasons[0], (words, reasons[0])
    assert unservable_reasons(checkpoint(tmp_path, W8CH, A8TOKEN), "cpu", kernels_of("_C_AVX2")) == []
    assert unservable_reasons(checkpoint(tmp_path, W4G64), "cuda", kernels_of("_C_AVX2")) == []
    for build in ("_C", "_C_AVX512"):
        assert unservable_reasons(checkpoint(tmp_path, W4G64), "cpu", kernels_of(build)) == []
    no_int8 = VllmKernels("cpu", "_C_AVX2", {}, {"onednn_scaled_mm": False, "int8_scaled_mm_with_quant": False})
    assert "onednn_scaled_mm" in unservable_reasons(checkpoint(tmp_path, W8CH, A8TOKEN), "cpu", no_int8)[0]


def test_quantize_does_not_claim_vllm_serves_w4a16_without_the_int4_kernel(tmp_path, capsys):
    from gsr_plugin.cli.main import _say_servability

    ckpt = checkpoint(tmp_path, W4G64)
    _say_servability(ckpt, kernels_of("_C_AVX2"))
    err = capsys.readouterr().err
    assert "cannot serve this checkpoint on this CPU" in err and INT4_KERNEL in err
    assert "vLLM can serve it" not in err and "GPU kernels take this setting" in err
    _say_servability(ckpt, kernels_of("_C_AVX512"))
    assert "vLLM can serve it on this CPU" in capsys.readouterr().err


# ------------------------------------------------------------ comparison logic


def synthetic(shift=0.0, noise=0.02, greedy_gap=None):
    base = [-1.0, -2.0, -0.5, -3.0]
    vllm = {
        "references": [{"logprobs": [x + shift for x in base]}],
        "generations": [{"ids": [5, 6, 7], "text": "x"}],
    }
    steps = [{"top": 5, "top_logprob": -0.1, "vllm_logprob": -0.1}, {"top": 6, "top_logprob": -0.2, "vllm_logprob": -0.2}]
    if greedy_gap is not None:
        steps.append({"top": 9, "top_logprob": -0.3, "vllm_logprob": -0.3 - greedy_gap})
    else:
        steps.append({"top": 7, "top_logprob": -0.3, "vllm_logprob": -0.3})
    hf = {"references": [base], "noise": [[x + noise for x in base]], "generations": [{"ids": [5, 6], "steps": steps}]}
    return vllm, hf


def test_agreement_within_the_dtype_noise_passes():
    prompts, refs = compare_outputs(*synthetic(shift=0.03), Tolerance(), prompts=["p"])
    assert refs[0]["ok"] and prompts[0]["ok"] and prompts[0]["equal"] == 3


def test_logprob_shift_beyond_the_noise_fails():
    _, refs = compare_outputs(*synthetic(shift=1.0), Tolerance(), prompts=["p"])
    assert not refs[0]["ok"]
    assert refs[0]["allowed_max"] == pytest.approx(0.05)  # 2 x 0.02 noise, floored at 0.05


def test_greedy_divergence_is_a_tie_only_below_the_allowed_gap():
    prompts, _ = compare_outputs(*synthetic(greedy_gap=0.01), Tolerance(), prompts=["p"])
    assert prompts[0]["ok"] and prompts[0]["diverged_at"] == 2
    prompts, _ = compare_outputs(*synthetic(greedy_gap=2.0), Tolerance(), prompts=["p"])
    assert not prompts[0]["ok"]


# --------------------------------------------------------------- real vLLM



# Calibration text where no WikiText-2 is at hand (the check compares vLLM with
# transformers on the same checkpoint, so what it was calibrated on does not matter).
FALLBACK_CALIBRATION = (
    " = Rotations = \n A rotation of the residual stream spreads outlier channels over many"
    " others , so that a quantization grid fits the weights better . The model computes the"
    " same function , because every rotation is undone in the next layer . In 1995 the"
    " method was unknown ; today it runs on every machine , from phones to large servers . \n"
)


def calibration_data_dir(fallback):
    """The real data directory when there is one, else ``fallback`` laid out like it."""
    from gsr_plugin.eval.data import find_data_dir

    found = find_data_dir(None)
    if found is not None and (found / "wikitext2" / "valid.tokens").is_file():
        return str(found)
    (fallback / "wikitext2").mkdir(parents=True, exist_ok=True)
    (fallback / "wikitext2" / "valid.tokens").write_text(FALLBACK_CALIBRATION * 40)
    return str(fallback)


@pytest.fixture(scope="module")
def small_gsr_checkpoints(default_model_cut, tmp_path_factory):
    """The default model cut to 2 layers (real weights: confident predictions), then
    GSR + GPTQ W4A16 g64, GSR + W8A8 and FRTQ (learned rotations) + W4A16 g64 through
    `gsr quantize`'s code, and GSR + gptqmodel's GPTQ W4 g64 through its Optimum engine."""
    from gsr_plugin.cli.quantize import quantize

    root = tmp_path_factory.mktemp("serve")
    data_dir = calibration_data_dir(root / "data")
    out = {}
    for recipe in ("gsr_w4a16_g64_gptq", "gsr_w8a8_gptq", "frtq_w4a16_g64_gptq", "gsr_w4a16_g64_lr16_gptq"):
        out[recipe] = quantize(str(default_model_cut), recipe, root / recipe, calib_samples=4, calib_len=64, data_dir=data_dir)
    out["optimum_gsr_w4_g64"] = quantize(str(default_model_cut), "gsr_w4a16_g64_gptq", root / "optimum", calib_samples=4,
                                         calib_len=64, data_dir=data_dir, engine="optimum")
    return out


def cpu_has_avx512() -> bool:
    """The independent reference for which build vLLM loads: the kernel's CPU flags
    (none when the whole run simulates an AVX2 processor with GSR_VLLM_CPU_ISA=avx2)."""
    import os

    if os.environ.get("GSR_VLLM_CPU_ISA") == "avx2":
        return False
    with open("/proc/cpuinfo") as f:
        return " avx512f " in f.read().replace("\n", " ")


@pytest.fixture(scope="module")
def native_kernels():
    return probe_vllm_kernels()


@pytest.fixture
def simulated_avx2(monkeypatch):
    """vLLM loads its AVX2 build, as on a processor without AVX-512 (a no-op there)."""
    monkeypatch.setenv("GSR_VLLM_CPU_ISA", "avx2")


def test_probe_finds_the_build_this_processor_loads(native_kernels):
    assert native_kernels.platform == "cpu" and native_kernels.source == "probe"
    assert (native_kernels.build != "_C_AVX2") == cpu_has_avx512(), native_kernels
    assert native_kernels.has(INT4_KERNEL) == cpu_has_avx512()
    # the table used where no vLLM environment is built agrees with the probe
    assert predict_vllm_kernels().ops == native_kernels.ops


def test_probe_of_the_avx2_build(simulated_avx2):
    kernels = probe_vllm_kernels()
    assert kernels.build == "_C_AVX2" and kernels.simulated == "avx2"
    assert not kernels.has(INT4_KERNEL) and kernels.has("onednn_scaled_mm")
    assert predict_vllm_kernels().ops == kernels.ops


def test_the_avx2_build_really_lacks_the_int4_kernel(small_gsr_checkpoints, simulated_avx2):
    """Why the refusal exists: vLLM's own run of W4A16 dies at the first forward."""
    with pytest.raises(RuntimeError, match=INT4_KERNEL):
        run_vllm(str(small_gsr_checkpoints["gsr_w4a16_g64_gptq"]), "bfloat16", PROMPTS[:1], REFERENCES[:1], 2)


def test_serve_check_exits_2_on_w4a16_without_the_int4_kernel(small_gsr_checkpoints, simulated_avx2, monkeypatch, capsys):
    import gsr_plugin.serving.check as serving

    monkeypatch.setattr(serving, "run_vllm", lambda *a, **k: pytest.fail("vLLM started"))
    code = main(["serve-check", str(small_gsr_checkpoints["gsr_w4a16_g64_gptq"]), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert INT4_KERNEL in err and "AVX-512" in err and "GPU" in err


def test_w8a8_serve_check_passes_on_the_avx2_build(small_gsr_checkpoints, simulated_avx2, capsys):
    code = main(["serve-check", str(small_gsr_checkpoints["gsr_w8a8_gptq"]), "--device", "cpu", "--max-tokens", "8"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "serve-check: PASS" in out and "_C_AVX2" in out


@pytest.fixture(scope="module")
def vllm_result(small_gsr_checkpoints, native_kernels):
    """vllm_result(recipe): vLLM's outputs on that checkpoint, natively (run once);
    skipped, naming the missing op, where this processor's vLLM build cannot run it."""
    results = {}

    def get(recipe: str) -> dict:
        path = small_gsr_checkpoints[recipe]
        reasons = unservable_reasons(path, "cpu", native_kernels)
        if reasons:
            pytest.skip(f"{recipe} not servable by vLLM on this processor: {reasons[0]}")
        if recipe not in results:
            results[recipe] = run_vllm(str(path), "bfloat16", PROMPTS, REFERENCES, 8)
        return results[recipe]

    return get


@pytest.mark.parametrize(
    "recipe", ["gsr_w4a16_g64_gptq", "gsr_w8a8_gptq", "frtq_w4a16_g64_gptq", "optimum_gsr_w4_g64", "gsr_w4a16_g64_lr16_gptq"]
)
def test_vllm_agrees_with_transformers(small_gsr_checkpoints, vllm_result, recipe):
    path, result = small_gsr_checkpoints[recipe], vllm_result(recipe)
    hf = run_transformers(str(path), "float32", result, 8, noise_dtype="bfloat16")
    prompts, refs = compare_outputs(result, hf, Tolerance())
    assert all(r["ok"] for r in refs), refs
    assert all(p["ok"] for p in prompts), prompts
    # not all near-ties (the 73 reference tokens carry the main check): measured 7-24 of 24
    assert sum(p["equal"] for p in prompts) >= 6
    assert all(len(g["ids"]) > 0 for g in result["generations"])


def test_the_check_fails_when_vllm_serves_something_else(small_gsr_checkpoints, vllm_result):
    """vLLM's W8A8 outputs against transformers on the W4A16 checkpoint: a different
    model must not pass."""
    result = copy.deepcopy(vllm_result("gsr_w8a8_gptq"))
    hf = run_transformers(str(small_gsr_checkpoints["gsr_w4a16_g64_gptq"]), "float32", result, 8, noise_dtype="bfloat16")
    prompts, refs = compare_outputs(result, hf, Tolerance())
    assert not all(r["ok"] for r in refs)


def test_vllm_applies_the_low_rank_adapter(small_gsr_checkpoints, vllm_result, tmp_path):
    """The LoRA path matters: vLLM on the residuals alone (the adapter removed) is far
    from transformers + PEFT, so the agreement above means vLLM applied the adapter."""
    import shutil

    with_adapter = small_gsr_checkpoints["gsr_w4a16_g64_lr16_gptq"]
    vllm_result("gsr_w4a16_g64_lr16_gptq")  # skips where vLLM cannot serve W4A16 here
    bare = tmp_path / "bare"
    shutil.copytree(with_adapter, bare, ignore=shutil.ignore_patterns("lora"))
    result = run_vllm(str(bare), "bfloat16", PROMPTS, REFERENCES, 8)
    hf = run_transformers(str(with_adapter), "float32", result, 8, noise_dtype="bfloat16")
    _, refs = compare_outputs(result, hf, Tolerance())
    assert all(r["mean_abs_diff"] > 10 * r["allowed_mean"] for r in refs), refs  # measured: 14 nats vs 0.08


def test_serve_check_command_passes_and_writes_its_report(small_gsr_checkpoints, native_kernels, tmp_path, capsys):
    ckpt = small_gsr_checkpoints["gsr_w4a16_g64_gptq"]
    if not native_kernels.has(INT4_KERNEL):
        pytest.skip(f"W4A16 serve-check: vLLM's {native_kernels.short()} has no {INT4_KERNEL} on this processor")
    report = tmp_path / "serve.json"
    code = main(["serve-check", str(ckpt), "--device", "cpu", "--max-tokens", "8", "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "serve-check: PASS" in out and "VLLM_CPU_INT4_W4A8=0" in out
    written = json.loads(report.read_text())
    assert written["ok"] is True and written["kernels"]["ops"][INT4_KERNEL] is True
