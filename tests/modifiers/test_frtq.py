"""FRTQModifier through real llm-compressor ``oneshot`` on tiny random models:
GSR at zero steps, exactness after learning, the fused matrices are the saved ones,
the objective goes down, save / re-apply round trip, grids from the recipe, refusals."""

import json

import pytest
import torch
import yaml
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM

from conftest import FLOAT64_MODEL_FLOOR, logits, relative_error, run_oneshot
from gsr_plugin import FRTQModifier, GSRModifier
from gsr_plugin.learn.orthogonal import block_diagonal
from gsr_plugin.modifiers.frtq import ROTATIONS_FILE

W4A4 = {
    "targets": ["Linear"],
    "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32},
    "input_activations": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
}
W3G32 = {"targets": ["Linear"], "weights": {"num_bits": 3, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}}
# explicit grid for runs without a quantizer: W4 g32 asymmetric, int4 per-token activations
GRID = {"weight_bits": 4, "weight_group_size": 32, "weight_symmetric": False, "activation_bits": 4}


run = run_oneshot


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_zero_steps_is_gsr(load_tiny, arch):
    gsr, frtq = load_tiny(arch), load_tiny(arch)
    run(gsr, [GSRModifier(rotations=["R1", "R2", "R4"])])
    run(frtq, [FRTQModifier(steps=0, rotations=["R1", "R2", "R4"], **GRID)])
    a, b = state(gsr), state(frtq)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-12, worst  # measured 3e-17: dense vs fast Walsh product


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize(
    "fields",
    [{}, {"structure": "full"}, {"init": "random"}, {"rotations": ["R1", "R2", "R3", "R4"]}, {"rotations": ["R2"]}],
    ids=["block", "full", "random", "online", "r2-only"],
)
def test_learned_rotations_preserve_logits(load_tiny, tokens, calibration, arch, fields):
    model = load_tiny(arch)
    before = logits(model, tokens)
    modifier = FRTQModifier(steps=15, lr=5e-2, **GRID, **fields)
    run(model, [modifier], calibration)
    assert modifier.learned["objective_after"] < modifier.learned["objective_before"]
    err = relative_error(logits(model, tokens), before)
    assert err < FLOAT64_MODEL_FLOOR, f"{arch} {fields}: logits moved by {err:.1e}"


def test_fused_weights_are_the_saved_matrices(load_tiny, calibration, tmp_path):
    """Exactness alone would pass for the identity: check W R1 and R2 against the
    learned matrices written beside the checkpoint."""
    from safetensors import safe_open

    model = load_tiny("llama")
    original = state(model)
    run(model, [FRTQModifier(steps=10, lr=5e-2, **GRID)], calibration, output_dir=str(tmp_path))
    with safe_open(str(tmp_path / ROTATIONS_FILE), "pt") as f:
        r1, r2 = f.get_tensor("R1"), f.get_tensor("R2")
        layers = json.loads(f.metadata()["R2_layers"])
    assert layers == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert r1.shape == (4, 32, 32) and r2.shape == (2, 32, 32)  # hidden 128 = 4 blocks of head_dim 32
    assert (r1 - torch.eye(32, dtype=torch.float64)).abs().max() > 1e-3  # learned, not the identity
    R1 = block_diagonal(r1)
    g = original["model.layers.1.input_layernorm.weight"]
    after = state(model)
    torch.testing.assert_close(
        after["model.layers.1.self_attn.q_proj.weight"], (original["model.layers.1.self_attn.q_proj.weight"] * g) @ R1,
        atol=1e-12, rtol=0,
    )
    R2_o = torch.block_diag(*[r2[1]] * 4)
    torch.testing.assert_close(
        after["model.layers.1.self_attn.o_proj.weight"], R1.T @ original["model.layers.1.self_attn.o_proj.weight"] @ R2_o,
        atol=1e-12, rtol=0,
    )
    R2_v = torch.block_diag(*[r2[1]] * 2)
    torch.testing.assert_close(
        after["model.layers.1.self_attn.v_proj.weight"],
        R2_v.T @ (original["model.layers.1.self_attn.v_proj.weight"] * g) @ R1, atol=1e-12, rtol=0,
    )


def test_objective_goes_below_gsr_on_every_rotated_input(load_tiny, calibration):
    modifier = FRTQModifier(steps=30, lr=5e-2, **GRID)
    run(load_tiny("llama"), [modifier], calibration)
    before, after = modifier.learned["ratios_before"], modifier.learned["ratios_after"]
    assert after["act_stream"] < before["act_stream"] and after["act_o_proj"] < before["act_o_proj"], (before, after)


def test_learning_is_deterministic(load_tiny, calibration):
    a, b = load_tiny("llama"), load_tiny("llama")
    run(a, [FRTQModifier(steps=5, **GRID)], calibration)
    run(b, [FRTQModifier(steps=5, **GRID)], calibration)
    assert all(torch.equal(x, y) for x, y in zip(state(a).values(), state(b).values()))


def test_grid_comes_from_the_following_quantizer(load_tiny, calibration, tmp_path):
    modifier = FRTQModifier(steps=2)
    run(load_tiny("llama"), [modifier, GPTQModifier(config_groups={"group_0": W4A4}, ignore=["lm_head"])], calibration,
        output_dir=str(tmp_path))
    assert (modifier._weight_grid.bits, modifier._weight_grid.group_size, modifier._weight_grid.symmetric) == (4, 32, False)
    assert (modifier._activation_grid.bits, modifier._activation_grid.group_size) == (4, None)
    weight_only = FRTQModifier(steps=2)
    run(load_tiny("llama"), [weight_only, GPTQModifier(config_groups={"group_0": W3G32}, ignore=["lm_head"])], calibration)
    assert weight_only._activation_grid is None and weight_only._weight_grid.bits == 3
    assert set(weight_only.learned["ratios_after"]) == {"weight_readers", "weight_v_proj", "weight_o_proj", "weight_down_proj"}


def test_checkpoint_reloads_and_rotations_reapply(load_tiny, calibration, tmp_path, tokens):
    """One oneshot with GPTQ writes the checkpoint, its rotations and a recipe that
    records FRTQ; transformers reloads it; rotations_from re-applies the matrices."""
    model = load_tiny("qwen2", torch.float32)
    # guard off: the reference below learns the same matrices without data (no held-out tokens)
    run(model, [FRTQModifier(steps=5, guard=False, **{k: v for k, v in GRID.items() if k != "activation_bits"}),
                GPTQModifier(config_groups={"group_0": W3G32}, ignore=["lm_head"])], calibration, output_dir=str(tmp_path))
    in_memory = logits(model, tokens)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert relative_error(logits(reloaded, tokens), in_memory) < 1e-5
    # unsafe_load: llm-compressor 0.14 writes GPTQ's actorder as a python-object tag
    recipe = yaml.unsafe_load((tmp_path / "recipe.yaml").read_text())
    saved = recipe["default_stage"]["default_modifiers"]["FRTQModifier"]
    assert saved["init"] == "gsr" and saved["learned"]["steps"] == 5 and "ratios_after" in saved["learned"]
    assert FRTQModifier.model_validate(saved).learned == saved["learned"]
    groups = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["transform_config"]["config_groups"]
    assert groups["R1"]["type"] == "learned-orthogonal"

    learned, again = load_tiny("qwen2"), load_tiny("qwen2")
    run(learned, [FRTQModifier(steps=5, guard=False, weight_bits=4, weight_group_size=32, weight_symmetric=False)])
    run(again, [FRTQModifier(rotations_from=str(tmp_path), weight_bits=3)])
    assert all(torch.allclose(x, y, atol=1e-12, rtol=0) for x, y in zip(state(learned).values(), state(again).values()))


def test_pydantic_and_yaml_round_trip():
    from llmcompressor.recipe import Recipe

    modifier = FRTQModifier(init="Random", structure="FULL", steps=7, weight_group_size="channel")
    assert FRTQModifier.model_validate(modifier.model_dump()) == modifier
    recipe = Recipe.create_instance(
        "quant_stage:\n  quant_modifiers:\n    FRTQModifier:\n      init: natural\n      steps: 3\n"
        "    GPTQModifier:\n      scheme: W4A16\n"
    )
    assert isinstance(recipe.modifiers[0], FRTQModifier) and recipe.modifiers[0].init == "natural"
    assert Recipe.create_instance(recipe.yaml()).modifiers[0] == recipe.modifiers[0]


# ------------------------------------------------------------------ refusals


def refused(model, recipe, message, **kwargs):
    before = state(model)
    with pytest.raises(ValueError, match=message):
        run(model, recipe, **kwargs)
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "the model was touched before the refusal"


def test_no_calibration_data_is_refused_naming_the_fix(load_tiny):
    refused(load_tiny("llama"), [FRTQModifier(weight_bits=4, activation_bits=4, steps=3)], "pass dataset=")


def test_no_grid_is_refused(load_tiny):
    refused(load_tiny("llama"), [FRTQModifier(steps=3)], "set weight_bits")


def test_fp4_quantizer_is_refused_naming_gsr(load_tiny, calibration):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    fp4 = QuantizationModifier(targets="Linear", scheme="NVFP4A16", ignore=["lm_head"])
    refused(load_tiny("llama"), [FRTQModifier(steps=3), fp4], "floating-point weights .* Use GSRModifier",
            calibration=calibration)


def test_block_that_does_not_divide_hidden_is_refused(load_tiny):
    refused(load_tiny("llama"), [FRTQModifier(block_size=256, weight_bits=3)], "does not divide hidden_size")


def test_frtq_after_the_quantizer_is_refused(load_tiny, calibration):
    refused(load_tiny("llama"), [GPTQModifier(config_groups={"group_0": W3G32}), FRTQModifier()], "Move FRTQModifier before",
            calibration=calibration)


def test_unsupported_architecture_is_refused(load_tiny):
    model = load_tiny("llama")
    model.config.model_type = "gpt_neox"
    refused(model, [FRTQModifier(weight_bits=3)], "does not know model_type")


def test_rotations_from_a_directory_without_them_is_refused(load_tiny, tmp_path):
    refused(load_tiny("llama"), [FRTQModifier(rotations_from=str(tmp_path), weight_bits=3)], "does not exist")


def test_rotations_from_another_shape_is_refused(load_tiny, calibration, tmp_path):
    run(load_tiny("llama"), [FRTQModifier(steps=1, block_size=16, weight_bits=3)], output_dir=str(tmp_path))
    refused(load_tiny("llama"), [FRTQModifier(rotations_from=str(tmp_path), weight_bits=3)], "do not fit")


def test_gsr_after_frtq_composes_exactly(load_tiny, tokens, calibration):
    model = load_tiny("llama")
    before = logits(model, tokens)
    run(model, [FRTQModifier(steps=5, **GRID), GSRModifier()], calibration)
    assert relative_error(logits(model, tokens), before) < FLOAT64_MODEL_FLOOR


def test_rotations_from_a_model_of_another_width_are_refused_with_both_shapes(load_tiny, tmp_path):
    """Same block (16), other width: the last dimension alone would have fit."""
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_config

    AutoModelForCausalLM.from_config(
        make_tiny_config("llama", hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1),
    ).save_pretrained(tmp_path / "narrow")
    narrow = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow", dtype=torch.float64)
    run(narrow, [FRTQModifier(steps=1, block_size=16, weight_bits=3, rotations=["R1"])], output_dir=str(tmp_path))
    refused(load_tiny("llama"), [FRTQModifier(rotations_from=str(tmp_path), block_size=16, weight_bits=3, rotations=["R1"])],
            r"R1 has shape \(4, 16, 16\), and this model needs \(8, 16, 16\)")
    refused(load_tiny("llama"), [FRTQModifier(rotations_from=str(tmp_path), block_size=16, weight_bits=3, rotations=["R2"])],
            r"R2 has shape none .*needs \(2, 32, 32\)")


def test_learned_clips_go_to_the_linears_that_read_each_input(load_tiny, calibration, tokens, tmp_path):
    """learn_clip: one ratio per layer input, put on the linears reading it (those the
    guard kept), saved beside the checkpoint; the float function is untouched."""
    from gsr_plugin.quantizers import CLIP_DIR, CLIP_FILE

    reference = logits(load_tiny("llama"), tokens)
    modifier = FRTQModifier(steps=20, lr=0.05, learn_clip=True, clip_floor=0.6, **GRID)
    model = run(load_tiny("llama"), [modifier], calibration)
    assert relative_error(logits(model, tokens), reference) < FLOAT64_MODEL_FLOOR
    clips = modifier.learned["clips"]
    assert len(clips["stream"]) == 4 and len(clips["o"]) == 2
    guard = modifier.learned["guard"]
    assert guard["clips"] == 6 and 0 < guard["clips_kept"]
    for l in range(2):
        layer = model.model.layers[l]
        for ratio, readers in ((clips["stream"][2 * l], [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                               (clips["stream"][2 * l + 1], [layer.mlp.gate_proj, layer.mlp.up_proj]),
                               (clips["o"][l], [layer.self_attn.o_proj])):
            for module in readers:
                assert getattr(module, "input_clip_ratio", 1.0) == pytest.approx(ratio, abs=1e-4)
        assert not hasattr(layer.mlp.down_proj, "input_clip_ratio")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / CLIP_DIR / CLIP_FILE).read_text())
    assert saved and all(0.6 <= r < 1 for r in saved.values())
    assert saved == {n: m.input_clip_ratio for n, m in model.named_modules() if hasattr(m, "input_clip_ratio")}


def test_learn_clip_without_quantized_activations_is_refused(load_tiny, calibration):
    grid = {**GRID, "activation_bits": 16}
    refused(load_tiny("llama"), [FRTQModifier(steps=3, learn_clip=True, **grid)], "learn_clip learns the clip",
            calibration=calibration)
