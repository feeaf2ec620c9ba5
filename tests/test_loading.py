"""gsr_plugin.loading: a checkpoint with online transforms (R3, R4) reloads in
transformers with the logits it had in memory."""

import json

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM

from conftest import byte_tokenizer, relative_error
from gsr_plugin import GSRModifier
from gsr_plugin.eval.evaluate import load_model
from gsr_plugin.loading import attach_online_transforms, load_with_online_transforms, online_transform_config

W4A4 = {
    "targets": ["Linear"],
    "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32},
    "input_activations": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
}


@pytest.fixture(scope="module")
def saved_online(tiny_checkpoints, tmp_path_factory):
    """GSR R1-R4 with random signs + GPTQ W4A4, saved; (in-memory logits, dir, tokens)."""
    out = tmp_path_factory.mktemp("online")
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
    ids = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(
        model=model, processor=byte_tokenizer(), dataset=data, num_calibration_samples=8, max_seq_length=48,
        output_dir=str(out),
        recipe=[
            GSRModifier(rotations=["R1", "R2", "R3", "R4"], r4_block_size=64, randomize=True, seed=3),
            GPTQModifier(config_groups={"group_0": W4A4}, ignore=["lm_head"]),
        ],
    )
    tokens = ids[:2, :24]
    with torch.no_grad():
        return model(tokens).logits, out, tokens


def test_loader_restores_the_in_memory_logits(saved_online):
    in_memory, out, tokens = saved_online
    with torch.no_grad():
        restored = load_with_online_transforms(out, dtype=torch.float32)(tokens).logits
    assert relative_error(restored, in_memory) < 1e-6


def test_plain_transformers_drops_the_online_transforms(saved_online):
    """Why the loader exists (docs/gsr.md): transformers 5.17 ignores them."""
    in_memory, out, tokens = saved_online
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(tokens).logits
    assert relative_error(plain, in_memory) > 1e-2


def test_gsr_eval_loads_through_the_loader(saved_online):
    in_memory, out, tokens = saved_online
    model, _, _ = load_model(str(out), dtype=torch.float32)
    assert hasattr(model.model.layers[1].mlp.down_proj, "R4_input")
    with torch.no_grad():
        assert relative_error(model(tokens).logits, in_memory) < 1e-6


def test_only_online_halves_are_reattached(saved_online):
    _, out, _ = saved_online
    config = json.loads((out / "config.json").read_text())["quantization_config"]["transform_config"]
    online = online_transform_config(config)
    assert set(online.config_groups) == {"R3", "R4"}
    assert [a.location for a in online.config_groups["R4"].apply] == ["input"]
    assert online_transform_config({"config_groups": {"R1": config["config_groups"]["R1"]}}) is None


def test_a_missing_transform_weight_is_an_error(saved_online, tmp_path):
    from safetensors.torch import load_file, save_file

    _, out, _ = saved_online
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "R4_input" not in k}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with pytest.raises(ValueError, match="no saved weight for the online transform"):
        attach_online_transforms(model, tmp_path)


def test_checkpoint_without_online_transforms_is_left_alone(tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    assert attach_online_transforms(model, tiny_checkpoints["llama"]) == 0


def test_rotation_only_checkpoint_loads_with_its_logits(tiny_checkpoints, tmp_path, tokens):
    """GSR with no quantizer: config.json has a transform_config but no quantization
    groups, which plain transformers 5.17 cannot load; the loader can, exactly."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"], dtype=torch.float32)
    oneshot(model=model, processor=byte_tokenizer(), output_dir=str(tmp_path), recipe=[GSRModifier()])
    qconfig = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert "R1" in qconfig["transform_config"]["config_groups"] and not qconfig.get("config_groups")
    with pytest.raises(AttributeError, match="config_groups"):
        AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        in_memory = model(tokens).logits
        restored = load_with_online_transforms(tmp_path, dtype=torch.float32)(tokens).logits
    assert relative_error(restored, in_memory) < 1e-6


def test_a_damaged_checkpoint_is_refused_before_transformers_reads_it(tiny_checkpoints, tmp_path, monkeypatch):
    import shutil

    from gsr_plugin.checkpoint import CheckpointError

    ckpt = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "ckpt")
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.truncate(5000)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("transformers ran"))
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        load_with_online_transforms(ckpt)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load_with_online_transforms(tmp_path / "nope")
