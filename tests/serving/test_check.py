"""gsr_plugin.serving.check (``gsr serve-check``), the probe of vLLM's kernels and the
runner: real vLLM (its own environment, built or reused by scripts/vllm_env.sh)
against transformers on small GSR checkpoints made from the default model."""

import copy
import json

import pytest

from gsr_plugin.cli.main import main
from gsr_plugin.serving.agreement import PROMPTS, REFERENCES, Tolerance, compare_outputs, run_transformers
from gsr_plugin.serving.check import serve_check
from gsr_plugin.serving.rules import INT4_KERNEL, predict_vllm_kernels, probe_vllm_kernels, unservable_reasons
from gsr_plugin.serving.runner import run_vllm
from serving.conftest import cpu_has_avx512
from serving.test_rules import W4G64, checkpoint, kernels_of


def test_unservable_checkpoint_is_refused_before_vllm_starts(tmp_path, monkeypatch, capsys):
    import gsr_plugin.serving.check as serving

    monkeypatch.setattr(serving, "run_vllm", lambda *a, **k: pytest.fail("vLLM started"))
    monkeypatch.setattr("gsr_plugin.serving.rules.probe_vllm_kernels", lambda python=None: kernels_of("_C"))
    ckpt = checkpoint(tmp_path, dict(W4G64, num_bits=2))
    with pytest.raises(ValueError, match="cannot serve"):
        serve_check(ckpt, python="unused")
    assert main(["serve-check", str(ckpt), "--device", "cpu", "--vllm-python", "unused"]) == 2
    assert "2-bit weights" in capsys.readouterr().err


# --------------------------------------------------------------- real vLLM



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


def test_a_damaged_checkpoint_is_refused_before_vllm_or_its_environment(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    import shutil

    import gsr_plugin.serving.check as serving

    monkeypatch.setattr(serving, "vllm_python", lambda *a, **k: pytest.fail("vLLM's environment touched"))
    ckpt = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "ckpt")
    (ckpt / "config.json").write_text("{")
    assert main(["serve-check", str(ckpt), "--device", "cpu"]) == 2
    assert "config.json is not valid JSON" in capsys.readouterr().err
    assert main(["serve-check", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err


def test_serve_check_of_a_checkpoint_saved_without_rotation(unrotated_checkpoint, native_kernels, capsys):
    """A plain llm-compressor checkpoint (`"transform_config": {}`) of a model with 256
    positions: vLLM is asked for the model's context, not a fixed 512, and agrees."""
    scheme = "W4A16" if native_kernels.has(INT4_KERNEL) else "W8A8"  # what this processor's vLLM build runs
    ckpt = unrotated_checkpoint(scheme)
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["transform_config"] == {}
    code = main(["serve-check", str(ckpt), "--device", "cpu", "--max-tokens", "8"])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err[-3000:]
    assert "serve-check: PASS" in captured.out
