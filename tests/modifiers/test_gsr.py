"""GSRModifier through real llm-compressor ``oneshot`` on tiny random models of every
supported architecture: exactness, the rotation actually applied (against a numpy
reference), composition with SpinQuant, offloading, recipes and refusals."""

import weakref

import numpy as np
import pytest
import torch
from compressed_tensors.offload import dispatch_with_map
from compressed_tensors.offload.cache.disk import DiskCache
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from llmcompressor.modifiers.transform import SpinQuantModifier
from llmcompressor.recipe import Recipe
from pydantic import ValidationError

from conftest import ARCHITECTURES, FLOAT64_MODEL_FLOOR, logits, relative_error
from gsr_plugin import GSRModifier
from gsr_plugin.mappings import NormMapping, SpinQuantMapping
from test_walsh import sequency_reference, sylvester_reference



def run_gsr(model, **fields):
    oneshot(model=model, recipe=[GSRModifier(**fields)])
    return model


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------- exactness


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("ordering", ["sequency", "natural"])
@pytest.mark.parametrize("randomize", [False, True])
def test_gsr_preserves_logits_in_float64(load_tiny, tokens, arch, ordering, randomize):
    model = load_tiny(arch, torch.float64)
    before = logits(model, tokens)
    run_gsr(model, ordering=ordering, randomize=randomize)
    err = relative_error(logits(model, tokens), before)
    # transformers' RMSNorm and RoPE run in float32 even in a float64 model, so the
    # floor is float32 rounding (measured 1e-7); a missing norm fusion moves logits
    # by ~1e-1, SpinQuant's embedding centering by ~1e-2
    assert err < FLOAT64_MODEL_FLOOR, f"{arch}/{ordering}/randomize={randomize}: logits moved by {err:.1e}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gsr_preserves_logits_in_float32(load_tiny, tokens, arch):
    model = load_tiny(arch, torch.float32)
    before = logits(model, tokens)
    run_gsr(model)
    err = relative_error(logits(model, tokens), before)
    assert err < 1e-5, f"{arch}: logits moved by {err:.1e} of their scale"  # measured ~5e-7


@pytest.mark.parametrize("block_size", [1, 8, 16, 32, 64, 128])
def test_every_block_size_up_to_hidden_is_exact(load_tiny, tokens, block_size):
    model = load_tiny("llama")
    before = logits(model, tokens)
    run_gsr(model, block_size=block_size, rotations=["R1"])
    assert relative_error(logits(model, tokens), before) < FLOAT64_MODEL_FLOOR


# ------------------------------------------------- the rotation that is applied


def test_weights_are_rotated_by_the_reference_matrices(load_tiny):
    """Exactness alone would pass for the identity: check W R against numpy."""
    model = load_tiny("llama")
    original = weights(model)
    run_gsr(model, block_size=16)
    r1 = np.kron(np.eye(128 // 16), sequency_reference(16) / 4)
    head = sequency_reference(32) / np.sqrt(32)
    r2_v, r2_o = np.kron(np.eye(2), head), np.kron(np.eye(4), head)  # 2 kv heads, 4 heads
    state = weights(model)
    g_in = original["model.layers.0.input_layernorm.weight"].numpy()
    g_final = original["model.norm.weight"].numpy()
    q = original["model.layers.0.self_attn.q_proj.weight"].numpy()
    v = original["model.layers.0.self_attn.v_proj.weight"].numpy()
    o = original["model.layers.0.self_attn.o_proj.weight"].numpy()
    embed = original["model.embed_tokens.weight"].numpy()

    def check(name, expected):
        np.testing.assert_allclose(state[name].numpy(), expected, atol=1e-12, err_msg=name)

    check("model.layers.0.self_attn.q_proj.weight", (q * g_in) @ r1)
    check("model.layers.0.self_attn.v_proj.weight", r2_v.T @ ((v * g_in) @ r1))
    check("model.layers.0.self_attn.o_proj.weight", r1.T @ o @ r2_o)
    check("model.embed_tokens.weight", embed @ r1)
    check("lm_head.weight", (embed * g_final) @ r1)  # tied in the checkpoint
    check("model.layers.0.input_layernorm.weight", np.ones(128))


def test_natural_ordering_uses_sylvester_blocks(load_tiny):
    model = load_tiny("llama")
    embed = weights(model)["model.embed_tokens.weight"].numpy()
    run_gsr(model, block_size=16, ordering="natural", rotations=["R1"])
    expected = embed @ np.kron(np.eye(8), sylvester_reference(16) / 4)
    np.testing.assert_allclose(model.model.embed_tokens.weight.detach().numpy(), expected, atol=1e-12)


def test_random_signs_change_the_rotation_but_not_the_function(load_tiny, tokens):
    plain, signed = load_tiny("llama"), load_tiny("llama")
    run_gsr(plain, block_size=32)
    run_gsr(signed, block_size=32, randomize=True, seed=1)
    q = "model.layers.1.mlp.up_proj.weight"
    assert not torch.allclose(weights(plain)[q], weights(signed)[q])
    assert relative_error(logits(signed, tokens), logits(plain, tokens)) < FLOAT64_MODEL_FLOOR


def test_tied_embeddings_are_untied_and_the_config_says_so(load_tiny):
    model = load_tiny("llama")
    assert model.config.tie_word_embeddings
    run_gsr(model)
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_transform_config_records_the_walsh_groups(load_tiny):
    model = run_gsr(load_tiny("qwen2"), block_size=16, ordering="sequency")
    groups = model.transform_config.config_groups
    assert set(groups) == {"R1", "R2"}
    assert groups["R1"].type == "sequency-walsh" and groups["R1"].head_dim == 16
    assert groups["R2"].type == "sequency-walsh" and groups["R2"].head_dim == 32
    natural = run_gsr(load_tiny("llama"), ordering="natural").transform_config
    assert {g.type for g in natural.config_groups.values()} == {"natural-walsh"}


def test_block_size_defaults_to_head_dim_and_is_written_back(load_tiny):
    modifier = GSRModifier()
    oneshot(model=load_tiny("llama"), recipe=[modifier])
    assert modifier.block_size == 32
    assert modifier.model_dump()["block_size"] == 32  # the saved recipe reproduces it


# -------------------------------------------------------------- composition


def test_after_spinquant_gsr_adds_no_error_and_fuses_no_norm_twice(load_tiny, tokens, monkeypatch):
    spin_only, both = load_tiny("llama"), load_tiny("llama")
    oneshot(model=spin_only, recipe=[SpinQuantModifier(rotations=["R1", "R2"], transform_block_size=32)])

    import gsr_plugin.rotation as rotation

    fused = []
    real = rotation.fuse_norm_linears
    monkeypatch.setattr(rotation, "fuse_norm_linears", lambda n, ls: fused.append(n) or real(n, ls))
    oneshot(
        model=both,
        recipe=[SpinQuantModifier(rotations=["R1", "R2"], transform_block_size=32), GSRModifier(block_size=16)],
    )
    assert fused == []  # SpinQuant already fused every norm
    assert relative_error(logits(both, tokens), logits(spin_only, tokens)) < FLOAT64_MODEL_FLOOR
    groups = both.transform_config.config_groups
    assert [g.type for g in groups.values()] == ["hadamard", "hadamard", "sequency-walsh", "sequency-walsh"]


def test_gsr_after_gsr_is_the_identity(load_tiny):
    """Sequency Walsh blocks are symmetric and orthogonal, so each is its own inverse:
    GSR on top of GSR (or of a rotation learned from GSR's start, suite ``sweep``'s
    ``frtq_gsr``) undoes the first one. The norms stay fused (the first run's doing)."""
    model = load_tiny("llama")
    before = weights(model)
    oneshot(model=model, recipe=[GSRModifier(block_size=16), GSRModifier(block_size=16)])
    after = weights(model)
    layer = "model.layers.0."
    for name in ("self_attn.o_proj", "mlp.down_proj"):  # R1 on the output, R2 / nothing on the input
        torch.testing.assert_close(after[layer + name + ".weight"], before[layer + name + ".weight"])
    norm = before[layer + "input_layernorm.weight"]
    torch.testing.assert_close(after[layer + "self_attn.v_proj.weight"], before[layer + "self_attn.v_proj.weight"] * norm)
    once = run_gsr(load_tiny("llama"), block_size=16)
    assert not torch.allclose(weights(once)[layer + "self_attn.o_proj.weight"], before[layer + "self_attn.o_proj.weight"])


def test_spinquant_after_gsr_is_warned_about(load_tiny, capfd):
    from loguru import logger

    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        oneshot(
            model=load_tiny("llama"),
            recipe=[GSRModifier(), SpinQuantModifier(rotations=["R1"], transform_block_size=32)],
        )
    finally:
        logger.remove(sink)
    assert any("comes after GSRModifier" in m for m in messages)


# --------------------------------------------------------------- offloading


def test_disk_offloaded_model_is_rotated_one_module_at_a_time(load_tiny, tokens, monkeypatch, tmp_path):
    model = load_tiny("llama", torch.float32)
    before = logits(model, tokens)
    leaves = {n: ("cpu", "disk") for n, m in model.named_modules() if list(m.parameters(recurse=False))}
    dispatch_with_map(model, leaves, offload_dir=str(tmp_path), show_progress=False)
    assert isinstance(model.model.layers[0].mlp.down_proj._parameters, DiskCache)

    live, peak = [], [0]
    real_onload = DiskCache.onload

    def tracking_onload(self, offloaded):
        tensor = real_onload(self, offloaded)
        if tensor is not None:
            live.append(weakref.ref(tensor))
            alive = {id(t): t for t in (r() for r in live) if t is not None}
            peak[0] = max(peak[0], sum(t.numel() * t.element_size() for t in alive.values()))
        return tensor

    monkeypatch.setattr(DiskCache, "onload", tracking_onload)
    run_gsr(model)
    monkeypatch.undo()
    layer_bytes = max(sum(p.numel() * 4 for p in layer.parameters()) for layer in model.model.layers)
    assert 0 < peak[0] <= layer_bytes, f"peak onloaded {peak[0]} bytes > one layer {layer_bytes}"
    assert relative_error(logits(model, tokens), before) < 1e-5


# ------------------------------------------------------------------ recipes


def test_pydantic_round_trip():
    modifier = GSRModifier(
        rotations=["r1"],
        block_size=64,
        ordering="Natural",
        randomize=True,
        seed=5,
        ignore=["re:.*layers.3.*"],
        mappings=SpinQuantMapping(
            embedding="re:.*wte$", attn="re:.*attn$", attn_q="re:.*q$", attn_k="re:.*k$",
            attn_v="re:.*v$", attn_o="re:.*o$", mlp_in=["re:.*fc_in$"], mlp_out=["re:.*fc_out$"],
            lm_head="head",
        ),
        norm_mappings=[NormMapping(norm="re:.*ln_1$", linears=["re:.*q$"])],
    )
    assert modifier.rotations == ["R1"] and modifier.ordering == "natural"
    assert GSRModifier.model_validate(modifier.model_dump()) == modifier


def test_yaml_recipe_names_gsr_modifier():
    recipe = Recipe.create_instance(
        """
quant_stage:
  quant_modifiers:
    GSRModifier:
      rotations: [R1, R2]
      block_size: 64
      ordering: sequency
    GPTQModifier:
      targets: [Linear]
      ignore: [lm_head]
      scheme: W4A16
"""
    )
    gsr, gptq = recipe.modifiers
    assert isinstance(gsr, GSRModifier) and gsr.block_size == 64
    assert type(gptq).__name__ == "GPTQModifier"
    again = Recipe.create_instance(recipe.yaml())
    assert again.modifiers[0] == gsr


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"block_size": 48}, "not a power of two"),
        ({"rotations": ["R5"]}, "R5"),
        ({"rotations": ["R1"], "fold_r4_permutation": True}, "needs R4 in rotations"),
        ({"rotations": ["R4"], "fold_r4_permutation": True, "randomize": True}, "randomize=False"),
        ({"r4_block_size": 96}, "not a power of two"),
        ({"rotations": []}, "rotations is empty"),
        ({"ordering": "hilbert"}, "sequency"),
        ({"blocksize": 64}, "Extra inputs are not permitted"),
    ],
)
def test_bad_fields_are_refused_at_construction(fields, message):
    with pytest.raises(ValidationError, match=message):
        GSRModifier(**fields)


# ----------------------------------------------------------------- refusals


def assert_refused_unchanged(model, recipe, message, **oneshot_args):
    original = weights(model)
    with pytest.raises(ValueError, match=message):
        oneshot(model=model, recipe=recipe, **oneshot_args)
    for name, value in original.items():
        assert torch.equal(model.state_dict()[name], value), f"{name} was modified before the error"


def test_block_size_that_does_not_divide_hidden_is_refused(load_tiny):
    assert_refused_unchanged(load_tiny("llama"), [GSRModifier(block_size=256)], "does not divide hidden_size 128")


def test_gsr_after_a_quantization_modifier_is_refused(load_tiny):
    ids = torch.randint(0, 256, (4, 16))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    from conftest import byte_tokenizer

    assert_refused_unchanged(
        load_tiny("llama"),
        [GPTQModifier(scheme="W4A16", targets="Linear", ignore=["lm_head"]), GSRModifier()],
        "Move GSRModifier before GPTQModifier",
        dataset=data,
        processor=byte_tokenizer(),
    )


def test_already_quantized_model_is_refused(load_tiny):
    model = load_tiny("llama")
    model.model.layers[0].mlp.up_proj.quantization_scheme = object()
    assert_refused_unchanged(model, [GSRModifier()], "already carry a quantization scheme")


def test_unsupported_architecture_lists_supported_ones_and_the_override(load_tiny):
    model = load_tiny("llama")
    model.config.model_type = "my_decoder"
    assert_refused_unchanged(model, [GSRModifier()], r"llama, mistral, mixtral, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe.*norm_mappings")


def test_unlisted_architecture_works_with_mappings(load_tiny, tokens):
    model = load_tiny("llama")
    model.config.model_type = "my_decoder"
    before = logits(model, tokens)
    mapping = SpinQuantMapping(
        embedding="model.embed_tokens", attn="re:.*self_attn$", attn_q="re:.*q_proj$",
        attn_k="re:.*k_proj$", attn_v="re:.*v_proj$", attn_o="re:.*o_proj$",
        mlp_in=["re:.*up_proj$", "re:.*gate_proj$"], mlp_out=["re:.*down_proj$"], lm_head="lm_head",
    )
    norms = [
        NormMapping(norm="re:.*input_layernorm$", linears=["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]),
        NormMapping(norm="re:.*post_attention_layernorm$", linears=["re:.*up_proj$", "re:.*gate_proj$"]),
        NormMapping(norm="model.norm", linears=["lm_head"]),
    ]
    run_gsr(model, mappings=mapping, norm_mappings=norms)
    assert relative_error(logits(model, tokens), before) < FLOAT64_MODEL_FLOOR


def test_layernorm_is_refused(load_tiny):
    model = load_tiny("llama")
    model.model.norm = torch.nn.LayerNorm(128, dtype=torch.float64)
    assert_refused_unchanged(model, [GSRModifier()], "RMSNorm")


def test_ignore_that_splits_r1_is_refused(load_tiny):
    assert_refused_unchanged(load_tiny("llama"), [GSRModifier(ignore=["lm_head"])], "ignore it in the quantization modifier")


def test_ignore_that_splits_r2_is_refused(load_tiny):
    model = load_tiny("llama")
    modifier = GSRModifier(rotations=["R2"], ignore=["model.layers.0.self_attn.v_proj"])
    assert_refused_unchanged(model, [modifier], "both or neither")


def test_ignoring_a_whole_r2_pair_keeps_the_model_exact(load_tiny, tokens):
    model = load_tiny("llama")
    before = logits(model, tokens)
    v0, v1 = (model.model.layers[i].self_attn.v_proj.weight.detach().clone() for i in (0, 1))
    run_gsr(model, rotations=["R2"], ignore=["re:model.layers.0.self_attn.[vo]_proj$"])
    assert torch.equal(model.model.layers[0].self_attn.v_proj.weight, v0)
    assert not torch.equal(model.model.layers[1].self_attn.v_proj.weight, v1)
    assert relative_error(logits(model, tokens), before) < FLOAT64_MODEL_FLOOR


def test_r2_alone_needs_no_norm_fusion(load_tiny, tokens):
    model = load_tiny("qwen2")  # v_proj bias is rotated with the weight
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    before = logits(model, tokens)
    run_gsr(model, rotations=["R2"])
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm)
    assert relative_error(logits(model, tokens), before) < FLOAT64_MODEL_FLOOR



# ------------------------------------------------------------ online R3 / R4


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(
    "fields",
    [
        {"rotations": ["R1", "R2", "R3", "R4"]},
        {"rotations": ["R1", "R2", "R3", "R4"], "fold_r4_permutation": True},
        {"rotations": ["R3", "R4"], "r4_block_size": 32, "randomize": True},
        {"rotations": ["R4"], "ordering": "natural", "r4_block_size": 256},
    ],
    ids=["all", "fold", "signs", "natural"],
)
def test_online_rotations_preserve_logits(load_tiny, tokens, arch, fields):
    model = load_tiny(arch)
    before = logits(model, tokens)
    run_gsr(model, **fields)
    err = relative_error(logits(model, tokens), before)
    assert err < FLOAT64_MODEL_FLOOR, f"{arch} {fields}: logits moved by {err:.1e}"


def captured_inputs(model, module, tokens, **kwargs):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        out = model(tokens, **kwargs)
    handle.remove()
    return seen[0], out


def test_r4_rotates_down_projs_input_by_the_reference_blocks(load_tiny, tokens):
    plain, rotated = load_tiny("llama"), load_tiny("llama")
    run_gsr(rotated, rotations=["R4"], r4_block_size=64)  # intermediate 256 = 4 blocks of 64
    x, _ = captured_inputs(plain, plain.model.layers[1].mlp.down_proj, tokens)
    x_rot, _ = captured_inputs(rotated, rotated.model.layers[1].mlp.down_proj, tokens)
    r4 = torch.from_numpy(np.kron(np.eye(4), sequency_reference(64) / 8))
    torch.testing.assert_close(x_rot, x @ r4, atol=1e-10, rtol=0)


def test_r3_rotates_the_cached_keys_per_head(load_tiny, tokens):
    plain, rotated = load_tiny("llama"), load_tiny("llama")
    run_gsr(rotated, rotations=["R3"])
    with torch.no_grad():
        keys = plain(tokens, use_cache=True).past_key_values.layers[0].keys
        keys_rot = rotated(tokens, use_cache=True).past_key_values.layers[0].keys
    head = torch.from_numpy(sequency_reference(32) / np.sqrt(32))
    torch.testing.assert_close(keys_rot, keys @ head, atol=1e-10, rtol=0)


def test_folded_r4_runs_a_natural_hadamard_online(load_tiny, tokens):
    from compressed_tensors.transform import HadamardTransform

    model = load_tiny("qwen2")
    before = logits(model, tokens)
    run_gsr(model, rotations=["R1", "R2", "R4"], fold_r4_permutation=True, r4_block_size=128)
    groups = model.transform_config.config_groups
    assert (groups["R4"].type, groups["R4_fused"].type, groups["R4_fold"].type) == (
        "hadamard", "sequency-walsh", "sequency-permutation"
    )
    assert [a.location for a in groups["R4"].apply] == ["input"]
    online = model.model.layers[0].mlp.down_proj.R4_input
    assert type(online) is HadamardTransform and online.perm is None
    assert relative_error(logits(model, tokens), before) < FLOAT64_MODEL_FLOOR


def test_fold_reorders_gate_and_up_rows_by_the_inverse_sequency_map(load_tiny):
    from gsr_plugin.walsh import sequency_permutation

    model = load_tiny("llama")
    gate = model.model.layers[0].mlp.gate_proj.weight.detach().clone()
    run_gsr(model, rotations=["R4"], fold_r4_permutation=True, r4_block_size=64)
    inverse = torch.argsort(sequency_permutation(64))
    order = torch.cat([block * 64 + inverse for block in range(4)])
    assert torch.equal(model.model.layers[0].mlp.gate_proj.weight, gate[order])


def test_fold_that_ignore_would_split_is_refused(load_tiny):
    modifier = GSRModifier(rotations=["R4"], fold_r4_permutation=True, ignore=["model.layers.0.mlp.down_proj"])
    assert_refused_unchanged(load_tiny("llama"), [modifier], "all rotated or all ignored")


def test_r4_block_that_does_not_divide_intermediate_is_refused(load_tiny):
    assert_refused_unchanged(load_tiny("llama"), [GSRModifier(rotations=["R4"], r4_block_size=512)],
                             "does not divide intermediate_size 256")
