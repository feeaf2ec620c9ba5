"""Architectures beyond the dense LLaMA family (gsr_plugin.mappings): mixture-of-experts
models (every expert, the shared expert and the router are on the residual stream),
Phi-3's fused projections, and Gemma's sandwich norms (refused with the reason). Tiny
random float64 models through real ``oneshot`` (which linearizes the experts) and
through ``gsr_plugin.rotate``."""

import pytest
import torch
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM

from conftest import FLOAT64_MODEL_FLOOR, TINY, logits, make_tiny_config, perturb_, relative_error
from gsr_plugin import GSRModifier, rotate
from test_walsh import sequency_reference

MOE_CONFIGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=96),
    # layer 1 dense (mlp_only_layers): a norm feeds experts in one layer, an MLP in the other
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, mlp_only_layers=[1]),
}
CONFIGS = {**MOE_CONFIGS, "phi3": dict(pad_token_id=0)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(arch) -> a fresh float64 model of ``arch`` with random routers and perturbed
    norms, loaded from a saved checkpoint (oneshot reads the config back from disk)."""
    root, saved = tmp_path_factory.mktemp("tiny_arch"), {}

    def load(arch: str) -> torch.nn.Module:
        if arch not in saved:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(make_tiny_config(arch, **CONFIGS.get(arch, {})), dtype=torch.float64)
            with torch.no_grad():  # routers are zero-initialized in some architectures
                for name, param in model.named_parameters():
                    if name.endswith("mlp.gate.weight"):
                        param.copy_(torch.randn(param.shape, dtype=param.dtype))
            perturb_(model, seed=0)
            model.save_pretrained(root / arch)
            saved[arch] = root / arch
        # eager experts: the grouped-mm kernel has no float64
        return AutoModelForCausalLM.from_pretrained(saved[arch], dtype=torch.float64, experts_implementation="eager")

    return load


@pytest.mark.parametrize("arch", sorted(MOE_CONFIGS))
@pytest.mark.parametrize("rotations", [["R1", "R2"], ["R1", "R2", "R4"]])
def test_moe_models_are_exact_under_gsr(tiny, tokens, arch, rotations):
    model = tiny(arch)
    before = logits(model, tokens)
    oneshot(model=model, recipe=[GSRModifier(rotations=rotations, block_size=32)])
    err = relative_error(logits(model, tokens), before)
    assert err < FLOAT64_MODEL_FLOOR, f"{arch} {rotations}: logits moved by {err:.1e}"


def test_every_expert_and_the_router_are_rotated(tiny):
    """R1 reaches each expert's gate/up (W diag(g) R), down (R^T W) and the router:
    checked against the reference blocks, not only through the logits."""
    model = tiny("qwen2_moe")
    norm = model.model.layers[0].post_attention_layernorm.weight.detach().clone()
    router = model.model.layers[0].mlp.gate.weight.detach().clone()
    shared_gate = model.model.layers[0].mlp.shared_expert_gate.weight.detach().clone()
    oneshot(model=model, recipe=[GSRModifier(block_size=32)])
    r1 = torch.block_diag(*[torch.as_tensor(sequency_reference(32) / 32**0.5)] * (TINY["hidden_size"] // 32))
    mlp = model.model.layers[0].mlp
    torch.testing.assert_close(mlp.gate.weight, (router * norm) @ r1, atol=1e-12, rtol=0)
    torch.testing.assert_close(mlp.shared_expert_gate.weight, (shared_gate * norm) @ r1, atol=1e-12, rtol=0)
    experts = [m for n, m in mlp.named_modules() if n.startswith("experts.") and n.endswith("down_proj")]
    assert len(experts) == 4
    assert torch.equal(model.model.layers[0].post_attention_layernorm.weight, torch.ones_like(norm))


def test_rotate_linearizes_the_experts_and_stays_exact(tiny, tokens):
    """``gsr_plugin.rotate`` (no oneshot) gets the same linearization oneshot does."""
    model = tiny("qwen3_moe")
    before = logits(model, tokens)
    rotate(model, block_size=32)
    assert hasattr(model.model.layers[0].mlp.experts[0], "down_proj")
    assert relative_error(logits(model, tokens), before) < FLOAT64_MODEL_FLOOR


def test_ignoring_one_expert_is_refused(tiny):
    model = tiny("mixtral")
    with pytest.raises(ValueError, match="ignore removes .*experts.1.down_proj.* from R1"):
        oneshot(model=model, recipe=[GSRModifier(block_size=32, ignore=[r"re:.*experts\.1\.down_proj$"])])


@pytest.mark.parametrize("rotations", [["R1"], ["R1", "R4"]])
def test_phi3_fused_projections_are_exact_under_r1(tiny, tokens, rotations):
    model = tiny("phi3")
    before = logits(model, tokens)
    oneshot(model=model, recipe=[GSRModifier(rotations=rotations, block_size=32)])
    assert relative_error(logits(model, tokens), before) < FLOAT64_MODEL_FLOOR


def test_phi3_r2_is_refused_with_the_reason(tiny):
    model = tiny("phi3")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"R2 to phi3: .*qkv_proj.*rotations=\['R1'\]"):
        oneshot(model=model, recipe=[GSRModifier(block_size=32)])
    # oneshot's own Gemma norm conversion (w -> 1 + w and back, in float32) leaves
    # 1.2e-7 on the norms before any modifier runs; nothing of ours touched them
    moved = {k: (model.state_dict()[k] - v).abs().max().item() for k, v in original.items()}
    assert max(moved.values()) < 1e-6, {k: d for k, d in moved.items() if d >= 1e-6}


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_gemma_sandwich_norms_are_refused_with_the_reason(tiny, arch):
    model = tiny(arch)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"cannot rotate {arch} exactly: .*sandwich norms"):
        oneshot(model=model, recipe=[GSRModifier(block_size=32)])
    # oneshot's own Gemma norm conversion (w -> 1 + w and back, in float32) leaves
    # 1.2e-7 on the norms before any modifier runs; nothing of ours touched them
    moved = {k: (model.state_dict()[k] - v).abs().max().item() for k, v in original.items()}
    assert max(moved.values()) < 1e-6, {k: d for k, d in moved.items() if d >= 1e-6}
