"""GSR + GPTQ W4A16 through ``oneshot`` to a compressed-tensors checkpoint and back
through plain transformers ``from_pretrained``."""

import json

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from llmcompressor.recipe import Recipe
from transformers import AutoModelForCausalLM

from conftest import byte_tokenizer, relative_error
from gsr_plugin import GSRModifier
from gsr_plugin.loading import load_with_online_transforms


def calibration_set(n=8, length=32, vocab=256):
    ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


@pytest.fixture(scope="module")
def saved(tiny_checkpoints, tmp_path_factory):
    """(in-memory model after oneshot, output dir, fp logits, tokens)."""
    out = tmp_path_factory.mktemp("gsr-w4a16")
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"], dtype=torch.float32)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp = model(tokens).logits
    oneshot(
        model=model,
        processor=byte_tokenizer(),
        dataset=calibration_set(),
        recipe=[GSRModifier(block_size=16), GPTQModifier(scheme="W4A16", targets="Linear", ignore=["lm_head"])],
        output_dir=str(out),
        num_calibration_samples=8,
        max_seq_length=32,
        save_compressed=True,
    )
    return model, out, fp, tokens


def test_reloaded_checkpoint_gives_the_in_memory_logits(saved):
    model, out, fp, tokens = saved
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        in_memory, again = model(tokens).logits, reloaded(tokens).logits
    assert relative_error(again, in_memory) < 1e-5
    assert relative_error(in_memory, fp) > 1e-3, "nothing was quantized"


def test_config_is_pack_quantized_and_records_the_sequency_walsh_groups(saved):
    _, out, _, _ = saved
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "pack-quantized"
    groups = qconfig["transform_config"]["config_groups"]
    assert groups["R1"]["type"] == "sequency-walsh" and groups["R1"]["head_dim"] == 16
    assert groups["R2"]["type"] == "sequency-walsh" and groups["R2"]["head_dim"] == 32
    r1_targets = [t for args in groups["R1"]["apply"] for t in args["targets"]]
    assert "lm_head" in r1_targets and "re:.*embed_tokens$" in r1_targets


def test_saved_recipe_loads_again_and_reproduces_the_rotation(saved):
    _, out, _, _ = saved
    recipe = Recipe.create_instance(str(out / "recipe.yaml"))
    gsr = next(m for m in recipe.modifiers if isinstance(m, GSRModifier))
    assert (gsr.rotations, gsr.block_size, gsr.ordering, gsr.randomize) == (["R1", "R2"], 16, "sequency", False)
    assert [type(m).__name__ for m in recipe.modifiers] == ["GSRModifier", "GPTQModifier"]


def test_checkpoint_has_no_online_transform_weights(saved):
    """R1/R2 are fused offline: nothing for a loader to apply at run time."""
    from safetensors import safe_open

    _, out, _, _ = saved
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert not any("R1" in n or "R2" in n for n in names)
    assert any(n.endswith("weight_packed") for n in names)


@pytest.mark.parametrize("scheme,fmt", [("NVFP4A16", "nvfp4-pack-quantized"), ("MXFP4A16", "mxfp4-pack-quantized")])
def test_fp4_checkpoint_after_gsr_reloads_to_the_in_memory_logits(tiny_checkpoints, tmp_path, scheme, fmt):
    """The shipped FP4 recipe shape (GSR, then llm-compressor's FP4 preset) saves a
    packed FP4 checkpoint that transformers reloads to the in-memory model."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp = model(tokens).logits
    oneshot(model=model, recipe=[GSRModifier(block_size=32), QuantizationModifier(targets="Linear", scheme=scheme,
                                                                                     ignore=["lm_head"])])
    with torch.no_grad():  # fake-quantized in float32, before saving packs the weights
        in_memory = model(tokens).logits
    model.save_pretrained(tmp_path, save_compressed=True)
    qconfig = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == fmt
    reloaded = load_with_online_transforms(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        again = reloaded(tokens).logits
    error, quantization = relative_error(again, in_memory), relative_error(in_memory, fp)
    print(f"{scheme}: reload vs in-memory {error:.1e}, in-memory vs float {quantization:.1e}")
    # compressed-tensors decompresses FP4 in bfloat16: E2M1 x E8M0 (MX) is exact there,
    # while NVFP4's float32 global scale rounds every weight to bfloat16 (2^-9 relative)
    assert error < (1e-5 if scheme.startswith("MX") else 5e-3)
    assert quantization > 20 * error, "nothing was quantized"
