"""gsr_plugin.serving.rules: what vLLM can run, per format and processor (no vLLM needed)."""

import json

import pytest
import torch

from gsr_plugin.serving.rules import INT4_KERNEL, VLLM_CPU_BUILD_MISSING_OPS, VllmKernels, unservable_reasons
from gsr_plugin.serving.vllm_worker import PROBED_OPS

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}


def checkpoint(tmp_path, weights, activations=None, transforms=None, dims=SMOLLM2):
    """A checkpoint's files as far as the rules read them: config.json (and a weights
    file, so that it passes gsr_plugin.checkpoint's file checks)."""
    from safetensors.torch import save_file

    tmp_path.mkdir(parents=True, exist_ok=True)
    group = {"targets": ["Linear"], "weights": weights, "input_activations": activations}
    qconfig = {"config_groups": {"group_0": group}, "transform_config": {"config_groups": transforms or {}}}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **dims, "quantization_config": qconfig}))
    save_file({"lm_head.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
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
    assert "what serves instead" in err and "gsr_w8a8_gptq" in err
    _say_servability(ckpt, kernels_of("_C_AVX512"))
    err = capsys.readouterr().err
    assert "vLLM can serve it on this CPU" in err and "what serves instead" not in err


@pytest.mark.parametrize("bits", [2, 3])
def test_quantize_names_what_serves_a_low_bit_checkpoint(tmp_path, capsys, bits):
    from gsr_plugin.cli.main import _say_servability
    from gsr_plugin.serving.rules import served_alternatives

    ckpt = checkpoint(tmp_path, dict(W4G64, num_bits=bits, symmetric=False))
    alternatives = served_alternatives(ckpt, f"frtq_w{bits}a16_g64_asym_gptq")
    assert f"W{bits} kept: `gsr quantize --engine optimum`" in alternatives[0]
    assert "`frtq_w4a16_g64_gptq`" in alternatives[1]
    _say_servability(ckpt, kernels_of("_C_AVX512"), recipe=f"frtq_w{bits}a16_g64_asym_gptq")
    err = capsys.readouterr().err
    assert "what serves instead" in err and "gptqmodel's packed kernels" in err
    (tmp_path / "gptq").mkdir()
    gptq = gptq_checkpoint(tmp_path / "gptq", bits=bits, sym=False)
    assert "gptqmodel's packed kernels" in served_alternatives(gptq)[0]
    assert served_alternatives(checkpoint(tmp_path / "w4", W4G64, A8TOKEN))[0].startswith("`gsr_w4a16_g64_gptq`")


@pytest.mark.parametrize("kv", [
    {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "attn_head", "dynamic": False},
    {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64, "dynamic": True},
])
def test_an_int4_kv_cache_is_not_carried_to_vllm(tmp_path, kv):
    ckpt = checkpoint(tmp_path, W4G64)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"] = kv
    (ckpt / "config.json").write_text(json.dumps(config))
    for device in ("cpu", "cuda"):
        reasons = unservable_reasons(ckpt, device)
        assert len(reasons) == 1 and "FP8 KV-cache schemes" in reasons[0] and "--kv-cache-dtype" in reasons[0]
    config["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"}
    (ckpt / "config.json").write_text(json.dumps(config))
    assert unservable_reasons(ckpt, "cuda") == []


def test_clips_and_sinks_are_said_not_to_reach_vllm(tmp_path):
    clipped = dict(A8TOKEN, observer_kwargs={"clip_ratio": 0.9})
    reasons = unservable_reasons(checkpoint(tmp_path / "a", W8CH, clipped), "cuda")
    assert len(reasons) == 1 and "group_0: a clip_ratio" in reasons[0] and "unclipped" in reasons[0]
    searched = checkpoint(tmp_path / "b", W8CH, A8TOKEN)
    assert unservable_reasons(searched, "cuda") == []
    (searched / "clip").mkdir()
    (searched / "clip" / "input_clip_ratios.json").write_text('{"model.layers.0.mlp.down_proj": 0.8}')
    assert "searched clip ratios" in unservable_reasons(searched, "cuda")[0]
    ckpt = checkpoint(tmp_path / "c", W4G64)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"] = {
        "num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "observer_kwargs": {"sink_tokens": 1}}
    (ckpt / "config.json").write_text(json.dumps(config))
    reasons = unservable_reasons(ckpt, "cuda")
    assert len(reasons) == 1 and "sink_tokens" in reasons[0] and "vLLM applies neither" in reasons[0]
