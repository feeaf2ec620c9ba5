"""LowRankModifier through real oneshot on tiny models: exact before quantization, the
split is the reference SVD of the rotated weight, one oneshot with GPTQ writes the
checkpoint and a standard PEFT adapter that transformers + PEFT load to the in-memory
logits, per-layer budgets, refusals."""

import json

import numpy as np
import pytest
import torch
from llmcompressor.modifiers.quantization import GPTQModifier

from conftest import logits, relative_error, run_oneshot
from gsr_plugin import GSRModifier, LowRankModifier
from gsr_plugin.loading import load_with_online_transforms

W3G32 = {"targets": ["Linear"], "weights": {"num_bits": 3, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}}
W4A4 = {
    "targets": ["Linear"],
    "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel"},
    "input_activations": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
}


run = run_oneshot


@pytest.mark.parametrize("method", ["svd", "activation"])
def test_split_keeps_the_function_before_quantization(load_tiny, tokens, calibration, method):
    model = load_tiny("llama", torch.float32)
    before = logits(model, tokens)
    modifier = LowRankModifier(rank=8, method=method)
    run(model, [GSRModifier(), modifier], calibration)
    assert len(modifier.factors()) == 14  # 7 linears x 2 layers, lm_head ignored
    assert relative_error(logits(model, tokens), before) < 1e-5  # measured 3e-7: E + L R = W


def test_split_is_the_svd_of_the_rotated_weight(load_tiny):
    rotated, split = load_tiny("llama"), load_tiny("llama")
    run(rotated, [GSRModifier()])
    run(split, [GSRModifier(), LowRankModifier(rank=5)])
    w = rotated.model.layers[1].mlp.down_proj.weight.detach().numpy()
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    expected_residual = w - (u[:, :5] * s[:5]) @ vt[:5]
    got = split.model.layers[1].mlp.down_proj.weight.detach().numpy()
    assert np.abs(got - expected_residual).max() < 2e-3 * np.abs(w).max()  # fp16 factors


@pytest.mark.parametrize("method,scheme", [("svd", W3G32), ("activation", W3G32), ("svd", W4A4)], ids=["svd-w3", "act-w3", "svd-w4a4"])
def test_one_oneshot_writes_checkpoint_and_peft_adapter_that_reload_exactly(load_tiny, tokens, calibration, tmp_path, method, scheme):
    model = load_tiny("qwen2", torch.float32)
    run(model, [GSRModifier(), LowRankModifier(rank=8, method=method),
                GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])], calibration, output_dir=str(tmp_path))
    in_memory = logits(model, tokens)
    adapter = tmp_path / "lora"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 8
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"] and len(config["target_modules"]) == 14
    assert not list(tmp_path.glob("adapter_*"))  # not at the top: transformers would take the dir for an adapter
    reloaded = load_with_online_transforms(tmp_path, dtype=torch.float32)
    assert type(reloaded).__name__ == "PeftModelForCausalLM"
    from gsr_plugin.eval.evaluate import load_model

    assert type(load_model(str(tmp_path), dtype=torch.float32)[0]).__name__ == "PeftModelForCausalLM"  # gsr eval
    if "input_activations" in scheme:
        # 4-bit activations turn float32 rounding differences (1e-7 in the stream, the
        # adapter's sum order) into whole grid steps: compare the weights' function with
        # the activation quantizers off on both sides (weights stay on their grid)
        from compressed_tensors.quantization import disable_quantization

        model.apply(disable_quantization)
        reloaded.apply(disable_quantization)
        in_memory = logits(model, tokens)
    with torch.no_grad():
        assert relative_error(reloaded(tokens).logits, in_memory) < 1e-5


def test_per_layer_budget(load_tiny, tmp_path):
    modifier = LowRankModifier(rank={"re:.*mlp.*": 16, "re:.*self_attn.(q|k)_proj": 4})
    run(load_tiny("llama"), [modifier], output_dir=str(tmp_path))
    ranks = {name: left.shape[1] for name, (left, _) in modifier.factors().items()}
    assert ranks["model.layers.0.mlp.gate_proj"] == 16 and ranks["model.layers.1.self_attn.k_proj"] == 4
    assert "model.layers.0.self_attn.v_proj" not in ranks  # no pattern: rank 0
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 4
    assert config["alpha_pattern"]["model.layers.0.self_attn.q_proj"] == 4  # scaling 1 everywhere


def test_yaml_names_the_modifier():
    from llmcompressor.recipe import Recipe

    recipe = Recipe.create_instance(
        "quant_stage:\n  quant_modifiers:\n    GSRModifier: {}\n    LowRankModifier:\n      rank: 8\n"
        "      method: activation\n    GPTQModifier:\n      scheme: W4A16\n"
    )
    assert isinstance(recipe.modifiers[1], LowRankModifier) and recipe.modifiers[1].requires_calibration_data


# ------------------------------------------------------------------ refusals


def refused(model, recipe, message, calibration=None):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        run(model, recipe, calibration)
    after = model.state_dict()  # a quantizer earlier in the recipe may have attached its scales
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rank_at_least_min_dims_is_refused(load_tiny):
    refused(load_tiny("llama"), [LowRankModifier(rank=128)], "below min\\(out, in\\)")  # k_proj is 64 x 128


def test_targets_that_match_nothing_are_refused(load_tiny):
    refused(load_tiny("llama"), [LowRankModifier(targets=["re:.*nothing$"])], "match no module")


def test_lowrank_after_gptq_is_refused(load_tiny, calibration):
    refused(load_tiny("llama"), [GPTQModifier(config_groups={"group_0": W3G32}), LowRankModifier(rank=8)],
            "Move LowRankModifier before", calibration)


def test_activation_method_without_data_is_refused(load_tiny):
    refused(load_tiny("llama"), [LowRankModifier(method="activation")], "pass dataset=")
