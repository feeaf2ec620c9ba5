"""gsr_plugin.modifiers.random: random rotations applied with GSR's exact lifecycle."""

import pytest
import torch
from compressed_tensors.transform import TransformArgs, TransformFactory, TransformScheme
from llmcompressor import oneshot
from pydantic import ValidationError

from conftest import ARCHITECTURES, FLOAT64_MODEL_FLOOR, logits, relative_error
from gsr_plugin import RandomRotationModifier
from gsr_plugin.modifiers.random import has_random_hadamard


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("kind,block", [("orthogonal", None), ("orthogonal", 32), ("hadamard", 128), ("hadamard", 64)])
def test_random_rotations_preserve_logits(load_tiny, tokens, arch, kind, block):
    model = load_tiny(arch)
    before = logits(model, tokens)
    oneshot(model=model, recipe=[RandomRotationModifier(kind=kind, block_size=block)])
    assert relative_error(logits(model, tokens), before) < FLOAT64_MODEL_FLOOR
    assert model.transform_config.config_groups["R1"].head_dim == (block or 128)


def test_full_width_rotation_mixes_every_column(load_tiny):
    model = load_tiny("llama")
    embed = model.model.embed_tokens.weight.detach().clone()
    oneshot(model=model, recipe=[RandomRotationModifier(rotations=["R1"])])
    rotation = torch.linalg.lstsq(embed, model.model.embed_tokens.weight.detach()).solution
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(128, dtype=torch.float64), atol=1e-8, rtol=0)
    assert (rotation.abs() > 1e-6).float().mean() > 0.99  # dense, not block-diagonal


def test_random_orthogonal_factory_is_orthogonal_and_seeded():
    def matrix(seed):
        scheme = TransformScheme(type="random-orthogonal", head_dim=64)
        factory = TransformFactory.from_scheme(scheme, name="R", seed=seed)
        args = TransformArgs(targets=["m"], location="weight_input")
        return factory.create_transform(torch.nn.Linear(64, 64), args).weight.double()

    q = matrix(0)
    torch.testing.assert_close(q @ q.T, torch.eye(64, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(q, matrix(0)) and not torch.equal(q, matrix(1))


def test_hadamard_sizes_that_exist_and_one_that_does_not(load_tiny):
    # SmolLM2: 576 = 144 x 4 and 192 = 192 x 1 have constructions; 6 has none
    assert has_random_hadamard(576) and has_random_hadamard(192) and not has_random_hadamard(6)
    modifier = RandomRotationModifier(kind="hadamard", block_size=128)
    modifier.block_size = 6
    with pytest.raises(ValueError, match="no Hadamard matrix of size 6"):
        modifier._check_block_size(type("Config", (), {"hidden_size": 12, "head_dim": 32, "num_attention_heads": 1})())


def test_block_that_does_not_divide_is_refused(load_tiny):
    with pytest.raises(ValueError, match="does not divide hidden_size 128"):
        oneshot(model=load_tiny("llama"), recipe=[RandomRotationModifier(block_size=96)])


def test_unknown_kind_is_refused():
    with pytest.raises(ValidationError):
        RandomRotationModifier(kind="haar")
