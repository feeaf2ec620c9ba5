"""gsr_plugin.recipes: the shipped files are what the code builds, and they parse."""

import pytest
import yaml
from llmcompressor.recipe import Recipe

from gsr_plugin import GSRModifier
from gsr_plugin.recipes import (
    DEFAULT_MODEL_HEAD_DIM,
    METHODS,
    RecipeSetting,
    build_recipe,
    recipes_dir,
    recipe_yaml,
    resolve_recipe,
    setting_from_name,
    shipped_settings,
)

SHIPPED = sorted(recipes_dir().glob("*.yaml"))


def test_every_shipped_setting_has_its_file_and_nothing_else_ships():
    assert {p.stem for p in SHIPPED} == {s.name for s in shipped_settings()}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_file_is_the_built_recipe_and_loads(path):
    setting = setting_from_name(path.stem)
    assert yaml.safe_load(path.read_text()) == build_recipe(setting, DEFAULT_MODEL_HEAD_DIM)
    assert path.read_text().startswith(f"# {path.stem}: ")  # says what it is for
    modifiers = Recipe.create_instance(str(path)).modifiers
    assert type(modifiers[-1]).__name__ == ("QuantizationModifier" if setting.fp4 and not setting.fp4_gptq
                                            else "GPTQModifier")
    if "gsr" in setting.method:
        assert any(isinstance(m, GSRModifier) for m in modifiers)


def test_names_spell_settings_both_ways():
    for setting in shipped_settings():
        assert setting_from_name(setting.name) == setting
    assert RecipeSetting("gsr", 4, None, activation_bits=16).name == "gsr_w4a16_ch_gptq"
    with pytest.raises(ValueError, match="does not spell"):
        setting_from_name("gsr-w4")


@pytest.mark.parametrize("bits", [8, 4])
def test_activations_are_quantized_dynamically_per_token(bits):
    setting = RecipeSetting("gsr", 8 if bits == 8 else 4, None if bits == 8 else 64, activation_bits=bits)
    scheme = build_recipe(setting)["quant_stage"]["quant_modifiers"]
    acts = scheme["GPTQModifier"]["config_groups"]["group_0"]["input_activations"]
    assert acts == {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    assert setting.name == ("gsr_w8a8_gptq" if bits == 8 else "gsr_w4a4_g64_gptq")


def test_spinquant_after_gsr_recipe_puts_gsr_second():
    mods = build_recipe(RecipeSetting("spinquant_gsr"), 64)["quant_stage"]["quant_modifiers"]
    assert list(mods) == ["SpinQuantModifier", "GSRModifier", "GPTQModifier"]


def test_spinquant_methods_need_a_block():
    with pytest.raises(ValueError, match="explicit block"):
        build_recipe(RecipeSetting("hadamard"))
    assert build_recipe(RecipeSetting("hadamard", block_size=32))["quant_stage"]["quant_modifiers"][
        "SpinQuantModifier"
    ]["transform_block_size"] == 32


def test_bad_settings_and_names_are_refused():
    with pytest.raises(ValueError, match="unknown method"):
        RecipeSetting("quarot")
    with pytest.raises(ValueError, match="activation_bits"):
        RecipeSetting(activation_bits=6)
    with pytest.raises(FileNotFoundError, match="gsr_w4a16_g64_gptq"):
        resolve_recipe("gsr_w5a16")


def test_resolve_by_name_or_path(tmp_path):
    assert resolve_recipe("gsr_w4a16_g64_gptq") == recipes_dir() / "gsr_w4a16_g64_gptq.yaml"
    assert resolve_recipe("gsr_w4a16_g64_gptq.yaml") == recipes_dir() / "gsr_w4a16_g64_gptq.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("x: 1")
    assert resolve_recipe(str(own)) == own


def test_every_method_is_described():
    assert all(METHODS[s.method] for s in shipped_settings())


@pytest.mark.parametrize("scheme,group,acts", [("NVFP4A16", 16, 16), ("NVFP4", 16, 4), ("MXFP4A16", 32, 16), ("MXFP4", 32, 4)])
def test_fp4_settings_use_the_llm_compressor_preset(scheme, group, acts):
    setting = RecipeSetting("gsr", fp4=scheme)
    assert (setting.weight_bits, setting.group_size, setting.activation_bits) == (4, group, acts)
    mods = build_recipe(setting)["quant_stage"]["quant_modifiers"]
    assert list(mods) == ["GSRModifier", "QuantizationModifier"]
    assert mods["QuantizationModifier"] == {"targets": ["Linear"], "ignore": ["lm_head"], "scheme": scheme}
    assert setting.name == f"gsr_{scheme.lower()}_rtn"
    assert setting_from_name(setting.name) == setting
    with pytest.raises(ValueError, match="fp4 must be one of"):
        RecipeSetting("gsr", fp4="FP4")


def test_fp4_gptq_setting_puts_the_preset_in_gptq():
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.recipe import Recipe

    setting = RecipeSetting("gsr", fp4="NVFP4A16", fp4_gptq=True, block_size=16)
    mods = build_recipe(setting)["quant_stage"]["quant_modifiers"]
    assert list(mods) == ["GSRModifier", "GPTQModifier"]
    assert mods["GPTQModifier"] == {"targets": ["Linear"], "ignore": ["lm_head"], "scheme": "NVFP4A16"}
    assert setting.name == "gsr_nvfp4a16_gptq" and setting_from_name("gsr_nvfp4a16_gptq").fp4_gptq
    assert setting_from_name("gsr_nvfp4a16_rtn").fp4_gptq is False
    gptq = Recipe.create_instance(recipe_yaml(setting)).modifiers[-1]
    assert isinstance(gptq, GPTQModifier)
    weights = next(iter(gptq.resolved_config.config_groups.values())).weights
    assert (str(weights.type), weights.group_size) == ("float", 16)
    with pytest.raises(ValueError, match="fp4_gptq is for the FP4 presets"):
        RecipeSetting("gsr", 4, 64, fp4_gptq=True)


def test_kv_quantizers_r3_and_the_weight_observer_are_spelled_and_built():
    w4a4kv4 = dict(symmetric=False, activation_bits=4, online_r4=True, kv_bits=4)
    static = RecipeSetting("gsr", 4, 64, **w4a4kv4)
    published = RecipeSetting("gsr", 4, 64, **w4a4kv4, online_r3=True, kv_dynamic=True, weight_observer="mse")
    assert static.name == "gsr_w4a4kv4_g64_asym_r4_gptq"
    assert published.name == "gsr_w4a4kv4_g64_asym_r34_dynkv_mse_gptq"
    for setting in (static, published, RecipeSetting("none", 4, 64, symmetric=False, kv_bits=4, kv_dynamic=True)):
        assert setting_from_name(setting.name) == setting
    gptq = build_recipe(published, head_dim=64)["quant_stage"]["quant_modifiers"]
    assert gptq["GSRModifier"]["rotations"] == ["R1", "R2", "R3", "R4"]
    assert gptq["GPTQModifier"]["kv_cache_scheme"] == {
        "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64, "dynamic": True,
    }
    assert gptq["GPTQModifier"]["config_groups"]["group_0"]["weights"]["observer"] == "mse"
    assert build_recipe(static, 64)["quant_stage"]["quant_modifiers"]["GPTQModifier"]["kv_cache_scheme"]["strategy"] == "attn_head"
    with pytest.raises(ValueError, match="set kv_bits"):
        RecipeSetting(kv_dynamic=True)
    with pytest.raises(ValueError, match="weight_observer"):
        RecipeSetting(weight_observer="percentile")
    with pytest.raises(ValueError, match="head_dim"):
        build_recipe(published)


def test_clips_and_sinks_are_spelled_and_built_where_llm_compressor_keeps_quantizer_options():
    w4a4kv4 = dict(symmetric=False, activation_bits=4, online_r3=True, online_r4=True, kv_bits=4, kv_dynamic=True)
    fixed = RecipeSetting("gsr", 4, 64, **w4a4kv4, activation_clip=0.9, kv_clip=0.95, sink_tokens=1)
    searched = RecipeSetting("frtq", 4, 64, **w4a4kv4, activation_clip="search")
    assert fixed.name == "gsr_w4a4kv4_g64_asym_r34_dynkv_aclip90_kvclip95_sink1_gptq"
    assert searched.name == "frtq_w4a4kv4_g64_asym_r34_dynkv_aclipsearch_gptq"
    learned = RecipeSetting("frtq", 4, 64, **w4a4kv4, activation_clip="learn", kv_clip=0.95)
    assert learned.name == "frtq_w4a4kv4_g64_asym_r34_dynkv_acliplearn_kvclip95_gptq"
    assert build_recipe(learned, 64)["quant_stage"]["quant_modifiers"]["FRTQModifier"]["learn_clip"] is True
    with pytest.raises(ValueError, match="FRTQ's"):
        RecipeSetting("gsr", 4, 64, **w4a4kv4, activation_clip="learn")
    for setting in (fixed, searched, learned):
        assert setting_from_name(setting.name) == setting
    modifiers = build_recipe(fixed, 64)["quant_stage"]["quant_modifiers"]
    gptq = modifiers["GPTQModifier"]
    assert gptq["config_groups"]["group_0"]["input_activations"]["observer_kwargs"] == {"clip_ratio": 0.9}
    assert gptq["kv_cache_scheme"]["observer_kwargs"] == {"clip_ratio": 0.95, "sink_tokens": 1}
    assert "ActivationClipModifier" not in modifiers
    modifiers = build_recipe(searched, 64)["quant_stage"]["quant_modifiers"]
    assert list(modifiers)[-2:] == ["GPTQModifier", "ActivationClipModifier"]
    assert "observer_kwargs" not in modifiers["GPTQModifier"]["config_groups"]["group_0"]["input_activations"]
    for bad, message in ((dict(activation_clip=0.9), "activation_bits"),
                         (dict(activation_bits=4, activation_clip=1.2), "activation_clip must be"),
                         (dict(kv_bits=4, kv_clip=0.95), "kv_dynamic"),
                         (dict(sink_tokens=2), "set kv_bits")):
        with pytest.raises(ValueError, match=message):
            RecipeSetting("gsr", 4, 64, **bad)
