"""gsr_plugin.serving: what vLLM can run (rules, no vLLM needed), the comparison
logic, and real vLLM (its own environment, built or reused by scripts/vllm_env.sh)
against transformers on small GSR checkpoints made from the default model."""

import copy
import json

import pytest

from gsr_plugin.cli import main
from gsr_plugin.serving import (
    Tolerance,
    compare_outputs,
    run_transformers,
    run_vllm,
    serve_check,
    unservable_reasons,
    PROMPTS,
    REFERENCES,
)

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


def test_online_transforms_need_a_gpu(tmp_path):
    online = {"R4": {"type": "sequency-walsh", "apply": [{"targets": ["re:.*down_proj$"], "location": "input"}]}}
    offline = {"R1": {"type": "sequency-walsh", "apply": [{"targets": ["lm_head"], "location": "weight_input"}]}}
    assert "GPU only" in unservable_reasons(checkpoint(tmp_path, W4G64, transforms=online), "cpu")[0]
    assert unservable_reasons(checkpoint(tmp_path, W4G64, transforms=online), "cuda") == []
    assert unservable_reasons(checkpoint(tmp_path, W4G64, transforms=offline), "cpu") == []


def test_unservable_checkpoint_is_refused_before_vllm_starts(tmp_path, monkeypatch, capsys):
    import gsr_plugin.serving as serving

    monkeypatch.setattr(serving, "run_vllm", lambda *a, **k: pytest.fail("vLLM started"))
    ckpt = checkpoint(tmp_path, dict(W4G64, num_bits=2))
    with pytest.raises(ValueError, match="cannot serve"):
        serve_check(ckpt)
    assert main(["serve-check", str(ckpt), "--device", "cpu"]) == 2
    assert "2-bit weights" in capsys.readouterr().err


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
    from gsr_plugin.data import find_data_dir

    found = find_data_dir(None)
    if found is not None and (found / "wikitext2" / "valid.tokens").is_file():
        return str(found)
    (fallback / "wikitext2").mkdir(parents=True, exist_ok=True)
    (fallback / "wikitext2" / "valid.tokens").write_text(FALLBACK_CALIBRATION * 40)
    return str(fallback)


@pytest.fixture(scope="module")
def small_gsr_checkpoints(default_model_dir, tmp_path_factory):
    """The default model cut to 2 layers (real weights: confident predictions), then
    GSR + GPTQ W4A16 g64 and GSR + W8A8, through `gsr quantize`'s code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gsr_plugin.quantize import quantize

    root = tmp_path_factory.mktemp("serve")
    data_dir = calibration_data_dir(root / "data")
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model.save_pretrained(root / "fp")
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(root / "fp")
    out = {}
    for recipe in ("gsr_w4a16_g64_gptq", "gsr_w8a8_gptq"):
        out[recipe] = quantize(str(root / "fp"), recipe, root / recipe, calib_samples=4, calib_len=64, data_dir=data_dir)
    return out


@pytest.fixture(scope="module")
def vllm_results(small_gsr_checkpoints):
    return {name: run_vllm(str(path), "bfloat16", PROMPTS, REFERENCES, 8) for name, path in small_gsr_checkpoints.items()}


@pytest.mark.parametrize("recipe", ["gsr_w4a16_g64_gptq", "gsr_w8a8_gptq"])
def test_vllm_agrees_with_transformers(small_gsr_checkpoints, vllm_results, recipe):
    path, result = small_gsr_checkpoints[recipe], vllm_results[recipe]
    hf = run_transformers(str(path), "float32", result, 8, noise_dtype="bfloat16")
    prompts, refs = compare_outputs(result, hf, Tolerance())
    assert all(r["ok"] for r in refs), refs
    assert all(p["ok"] for p in prompts), prompts
    assert sum(p["equal"] for p in prompts) >= 8  # not all near-ties
    assert all(len(g["ids"]) > 0 for g in result["generations"])


def test_the_check_fails_when_vllm_serves_something_else(small_gsr_checkpoints, vllm_results):
    """vLLM's W4A16 outputs against transformers on the W8A8 checkpoint: a different
    model must not pass."""
    result = copy.deepcopy(vllm_results["gsr_w4a16_g64_gptq"])
    hf = run_transformers(str(small_gsr_checkpoints["gsr_w8a8_gptq"]), "float32", result, 8, noise_dtype="bfloat16")
    prompts, refs = compare_outputs(result, hf, Tolerance())
    assert not all(r["ok"] for r in refs)


def test_serve_check_command_passes_and_writes_its_report(small_gsr_checkpoints, tmp_path, capsys):
    report = tmp_path / "serve.json"
    code = main(["serve-check", str(small_gsr_checkpoints["gsr_w4a16_g64_gptq"]), "--device", "cpu",
                 "--max-tokens", "8", "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "serve-check: PASS" in out and "VLLM_CPU_INT4_W4A8=0" in out
    assert json.loads(report.read_text())["ok"] is True
