"""gsr_plugin.checkpoint: damaged, incomplete and mismatched checkpoints are refused
before any model code runs, naming the file and what is wrong; valid ones pass, among
them checkpoints saved with no rotation (``"transform_config": {}``)."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import byte_tokenizer, run_oneshot
from gsr_plugin import GSRModifier
from gsr_plugin.checkpoint import CheckpointError, check_adapter, check_checkpoint, looks_like_path


@pytest.fixture(scope="module")
def rotated(tiny_checkpoints, tmp_path_factory):
    """The tiny llama with GSR R1+R2+R4 (online R4 recorded in transform_config), saved."""
    out = tmp_path_factory.mktemp("rotated")
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
    run_oneshot(model, [GSRModifier(rotations=["R1", "R2", "R4"], block_size=32)])
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


def copy(source, tmp_path, name="ckpt"):
    return shutil.copytree(source, tmp_path / name)


def edit_config(path, change):
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


def test_valid_checkpoints_pass(tiny_checkpoints, rotated):
    assert check_checkpoint(tiny_checkpoints["llama"])["model_type"] == "llama"
    groups = check_checkpoint(rotated)["quantization_config"]["transform_config"]["config_groups"]
    assert {"R1", "R2", "R4"} <= set(groups)


def test_no_rotation_is_a_valid_transform_config(rotated, tmp_path):
    """What compressed-tensors writes for a checkpoint saved without a rotation."""
    ckpt = copy(rotated, tmp_path)
    edit_config(ckpt, lambda c: c["quantization_config"].update(transform_config={}))
    check_checkpoint(ckpt)


def test_missing_directory_and_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        check_checkpoint(tmp_path / "nope")
    assert looks_like_path("/no/such/dir") and looks_like_path("./out") and looks_like_path("a/b/c")
    assert not looks_like_path("HuggingFaceTB/SmolLM2-135M-Instruct") and not looks_like_path("gpt2")


def test_empty_directory_names_config_json_not_the_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json.*it is empty.*interrupted `gsr quantize`"):
        check_checkpoint(tmp_path)


def test_damaged_config_json(tiny_checkpoints, tmp_path):
    ckpt = copy(tiny_checkpoints["llama"], tmp_path)
    (ckpt / "config.json").write_text('{"model_type": "llama", "hidden_')
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        check_checkpoint(ckpt)


def test_truncated_weights(tiny_checkpoints, tmp_path):
    ckpt = copy(tiny_checkpoints["llama"], tmp_path)
    weights = ckpt / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=rf"model.safetensors is truncated: {size // 2} bytes, its header describes {size}"):
        check_checkpoint(ckpt)


@pytest.mark.parametrize("where, junk", [(0, b"\xff" * 8), (8, b"#garbled!#" * 4)])
def test_garbled_weights(tiny_checkpoints, tmp_path, where, junk):
    ckpt = copy(tiny_checkpoints["llama"], tmp_path)
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.seek(where)
        f.write(junk)
    with pytest.raises(CheckpointError, match=r"model.safetensors (is not a readable safetensors file|has a damaged safetensors header)"):
        check_checkpoint(ckpt)


def test_missing_shard(tiny_checkpoints, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    check_checkpoint(tmp_path / "sharded")
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=rf"missing 1 of the {len(shards)} shards .*{shards[-1].name}"):
        check_checkpoint(tmp_path / "sharded")


def test_no_weights(tiny_checkpoints, tmp_path):
    ckpt = copy(tiny_checkpoints["llama"], tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has config.json but no weights"):
        check_checkpoint(ckpt)


def test_unknown_transform_type(rotated, tmp_path):
    ckpt = copy(rotated, tmp_path)
    edit_config(ckpt, lambda c: c["quantization_config"]["transform_config"]["config_groups"]["R1"].update(type="mystery"))
    with pytest.raises(CheckpointError, match=r"config_groups.R1 has type 'mystery', which no installed transform.*sequency-walsh"):
        check_checkpoint(ckpt)


def test_block_that_does_not_divide_the_width(rotated, tmp_path):
    ckpt = copy(rotated, tmp_path)
    edit_config(ckpt, lambda c: c["quantization_config"]["transform_config"]["config_groups"]["R1"].update(head_dim=48))
    with pytest.raises(CheckpointError, match=r"R1 has blocks of 48, which do not divide the width 128"):
        check_checkpoint(ckpt)


def test_transform_targets_that_match_nothing(rotated, tmp_path):
    ckpt = copy(rotated, tmp_path)
    edit_config(ckpt, lambda c: c["quantization_config"]["transform_config"]["config_groups"]["R4"]["apply"][0].update(
        targets=["re:.*no_such_proj$"]))
    with pytest.raises(CheckpointError, match=r"R4 targets \['re:.\*no_such_proj\$'\], which match no module"):
        check_checkpoint(ckpt)


# ------------------------------------------------------------------ the adapter


def write_adapter(ckpt, factors: dict, rank: int = 4, targets=None):
    """A PEFT LoRA adapter in ckpt/lora as LowRankModifier writes it: factors maps a
    module name to (lora_A shape, lora_B shape)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    out = ckpt / "lora"
    out.mkdir(exist_ok=True)
    LoraConfig(r=rank, lora_alpha=rank, target_modules=targets or sorted(factors), task_type="CAUSAL_LM").save_pretrained(out)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(a)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(b)
    save_file(tensors, str(out / "adapter_model.safetensors"))


Q0, V0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"  # 128 -> 128, 128 -> 64


def test_a_fitting_adapter_passes(tiny_checkpoints, tmp_path):
    ckpt = copy(tiny_checkpoints["llama"], tmp_path)
    write_adapter(ckpt, {Q0: ((4, 128), (128, 4)), V0: ((4, 128), (64, 4))})
    check_checkpoint(ckpt)


def test_adapter_of_another_width_names_both_shapes(tiny_checkpoints, tmp_path):
    ckpt = copy(tiny_checkpoints["llama"], tmp_path)
    write_adapter(ckpt, {Q0: ((4, 96), (96, 4))})
    with pytest.raises(CheckpointError, match=r"q_proj.lora_A has shape \(4, 96\), and this checkpoint needs \(4, 128\)"):
        check_adapter(ckpt)


def test_adapter_of_another_rank_names_both_shapes(tiny_checkpoints, tmp_path):
    ckpt = copy(tiny_checkpoints["llama"], tmp_path)
    write_adapter(ckpt, {Q0: ((8, 128), (128, 8))}, rank=4)
    with pytest.raises(CheckpointError, match=r"has shape \(8, 128\), and this checkpoint needs \(4, 128\) \(rank 4"):
        check_checkpoint(ckpt)


def test_adapter_for_modules_the_model_lacks(tiny_checkpoints, tmp_path):
    """Weights for layer 5 of a 2-layer model: PEFT drops them without an error."""
    ckpt = copy(tiny_checkpoints["llama"], tmp_path)
    write_adapter(ckpt, {Q0: ((4, 128), (128, 4)), "model.layers.5.self_attn.q_proj": ((4, 128), (128, 4))})
    with pytest.raises(CheckpointError, match=r"weights for 1 module\(s\) this checkpoint does not have \(model.layers.5"):
        check_checkpoint(ckpt)


def test_adapter_targeting_modules_it_has_no_weights_for(tiny_checkpoints, tmp_path):
    """PEFT would attach factors to every q_proj and fill only layer 0's."""
    ckpt = copy(tiny_checkpoints["llama"], tmp_path)
    write_adapter(ckpt, {Q0: ((4, 128), (128, 4))}, targets=["q_proj"])
    with pytest.raises(CheckpointError, match=r"targets 1 module\(s\) that adapter_model.safetensors has no weights for \(model.layers.1"):
        check_checkpoint(ckpt)
