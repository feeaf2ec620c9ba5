"""gsr_plugin.rotate (gsr_plugin/modifiers/standalone.py): the modifiers' exact fusion without oneshot, for quantizers that
take a plain transformers model (Optimum, gptqmodel): the same oracles as GSRModifier."""

import json

import numpy as np
import pytest
import torch
from llmcompressor import oneshot

from conftest import ARCHITECTURES, FLOAT64_MODEL_FLOOR, logits, relative_error
from gsr_plugin import FRTQModifier, GSRModifier, rotate
from test_walsh import sequency_reference


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rotate_preserves_logits(load_tiny, tokens, arch):
    model = load_tiny(arch)
    before = logits(model, tokens)
    assert rotate(model) is model
    assert relative_error(logits(model, tokens), before) < FLOAT64_MODEL_FLOOR


@pytest.mark.parametrize("fields", [{}, {"block_size": 16, "ordering": "natural", "randomize": True, "seed": 3}])
def test_rotate_is_the_modifiers_fusion(load_tiny, fields):
    """One implementation: the weights equal oneshot's with the same GSRModifier."""
    plain, recipe = load_tiny("qwen2"), load_tiny("qwen2")
    rotate(plain, **fields)
    oneshot(model=recipe, recipe=[GSRModifier(**fields)])
    a, b = plain.state_dict(), recipe.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rotate_applies_the_reference_matrix(load_tiny):
    model = load_tiny("llama")
    embed = model.model.embed_tokens.weight.detach().numpy().copy()
    rotate(model, block_size=16, rotations=["R1"])
    expected = embed @ np.kron(np.eye(8), sequency_reference(16) / 4)
    np.testing.assert_allclose(model.model.embed_tokens.weight.detach().numpy(), expected, atol=1e-12)


def test_rotation_is_recorded_in_the_saved_config(load_tiny, tmp_path):
    model = rotate(load_tiny("llama"), block_size=16)
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["gsr_rotation"]
    assert record["modifier"] == "GSRModifier" and record["block_size"] == 16 and record["rotations"] == ["R1", "R2"]
    assert record["ordering"] == "sequency"


def test_rotate_takes_a_learned_rotation(load_tiny, tokens):
    model = load_tiny("llama")
    before = logits(model, tokens)
    frtq = FRTQModifier(steps=5, lr=5e-2, weight_bits=4, weight_group_size=32)  # weights only: no data
    rotate(model, frtq)
    assert frtq.learned["objective_after"] < frtq.learned["objective_before"]
    assert relative_error(logits(model, tokens), before) < FLOAT64_MODEL_FLOOR
    assert model.config.gsr_rotation["modifier"] == "FRTQModifier"


def test_online_rotations_are_refused_before_the_model_is_touched(load_tiny):
    model = load_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="offline rotations only"):
        rotate(model, rotations=["R1", "R2", "R4"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="not both"):
        rotate(model, GSRModifier(), block_size=16)
