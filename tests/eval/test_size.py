"""gsr_plugin.eval.size: the bits-per-weight formula against the bytes a real saved
checkpoint and its adapter hold."""

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from safetensors import safe_open

from conftest import byte_tokenizer
from gsr_plugin import GSRModifier, LowRankModifier
from gsr_plugin.eval.size import bits_per_weight, linear_shapes

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def stored_bits(directory) -> float:
    bits = 0
    for path in [directory / "model.safetensors", directory / "lora" / "adapter_model.safetensors"]:
        if not path.is_file():
            continue
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                module = key.rsplit(".", 1)[0].replace(".lora_A", "").replace(".lora_B", "")
                if module.endswith(ROLES) and not key.endswith("weight_shape") and not key.endswith("bias"):
                    t = f.get_tensor(key)
                    bits += t.numel() * t.element_size() * 8
    return bits


@pytest.mark.parametrize("symmetric,rank", [(True, 0), (False, 0), (False, 8)])
def test_formula_equals_the_saved_bytes(load_tiny, tmp_path, symmetric, rank):
    model = load_tiny("llama", torch.float32)
    scheme = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric,
                                                 "strategy": "group", "group_size": 32}}
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = [GSRModifier()] + ([LowRankModifier(rank=rank)] if rank else []) + [
        GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]
    oneshot(model=model, recipe=recipe, dataset=data, processor=byte_tokenizer(), num_calibration_samples=4,
            max_seq_length=32, output_dir=str(tmp_path))
    weights = sum(o * i for o, i in linear_shapes(model.config))
    # float32 model: the checkpoint stores float32 scales (a 16-bit model stores 16-bit ones)
    expected = bits_per_weight(model.config, 4, 32, symmetric, rank, scale_bits=32)
    assert stored_bits(tmp_path) / weights == pytest.approx(expected, rel=1e-12)


def test_default_model_figures():
    smollm2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "head_dim": 64}
    assert bits_per_weight(smollm2, 4, 64, True) == pytest.approx(4.25)
    assert bits_per_weight(smollm2, 3, 64, False, rank=16) == pytest.approx(4.033, abs=1e-3)
    assert bits_per_weight(smollm2, 4, None, False) == pytest.approx(4.029, abs=1e-3)
