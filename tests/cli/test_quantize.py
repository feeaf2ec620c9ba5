"""gsr_plugin.cli.quantize: real oneshot on a tiny model, atomic output, refusals."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from gsr_plugin.eval.data import DataNotFoundError
from gsr_plugin.cli.quantize import PROVENANCE_FILE, OutputExistsError, atomic_directory, quantize


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_quantize_writes_a_checkpoint_with_recipe_and_provenance(tiny_checkpoints, small_data, tmp_path):
    out = quantize(
        str(tiny_checkpoints["llama"]), "gsr_w4a16_g64_gptq", tmp_path / "ckpt",
        calib_samples=4, calib_len=32, data_dir=small_data,
    )
    assert {"config.json", "model.safetensors", "recipe.yaml", "tokenizer.json", PROVENANCE_FILE} <= {
        p.name for p in out.iterdir()
    }
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["calibration"] == {"data": "wikitext2 validation", "samples": 4, "seq_len": 32, "seed": 0}
    assert provenance["recipe"].endswith("gsr_w4a16_g64_gptq.yaml")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert config["transform_config"]["config_groups"]["R1"]["type"] == "sequency-walsh"
    AutoModelForCausalLM.from_pretrained(out)(torch.tensor([[1, 2, 3]]))
    assert leftovers(tmp_path) == []


def test_existing_output_is_refused_before_any_work(tiny_checkpoints, small_data, tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("mine")
    import gsr_plugin.cli.quantize as module

    monkeypatch.setattr(module, "resolve_recipe", lambda r: pytest.fail("work started"))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        quantize(str(tiny_checkpoints["llama"]), "gsr_w4a16_g64_gptq", tmp_path / "ckpt", data_dir=small_data)
    assert (tmp_path / "ckpt" / "keep.txt").read_text() == "mine"


def test_a_failing_recipe_leaves_nothing_at_the_output(tiny_checkpoints, small_data, tmp_path):
    recipe = tmp_path / "g48.yaml"  # 128 columns are not divisible by 48: GPTQ refuses
    recipe.write_text(
        """
quant_stage:
  quant_modifiers:
    GSRModifier: {}
    GPTQModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 48}
"""
    )
    with pytest.raises(ValueError, match="not divisible by group_size"):
        quantize(str(tiny_checkpoints["llama"]), str(recipe), tmp_path / "ckpt", calib_samples=2, calib_len=16, data_dir=small_data)
    assert not (tmp_path / "ckpt").exists()
    assert leftovers(tmp_path) == []


def test_overwrite_keeps_the_old_checkpoint_when_the_new_one_fails(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target, overwrite=True) as staging:
            (staging / "config.json").write_text("new")
            raise RuntimeError("boom")
    assert (target / "config.json").read_text() == "old"
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "config.json").write_text("new")
    assert (target / "config.json").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_missing_calibration_data_is_an_error_before_loading_the_model(tiny_checkpoints, tmp_path, no_hub, monkeypatch):
    import transformers

    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded")
    )
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(DataNotFoundError, match="wikitext2/valid.tokens"):
        quantize(str(tiny_checkpoints["llama"]), "gsr_w4a16_g64_gptq", tmp_path / "ckpt", data_dir=empty)
    assert not (tmp_path / "ckpt").exists()
