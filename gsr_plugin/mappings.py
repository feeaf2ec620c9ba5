"""Where the rotations go, per architecture.

GSR reuses llm-compressor's SpinQuant vocabulary: a ``SpinQuantMapping`` names the
modules that write the residual stream (embedding, o_proj, down_proj: R1 on their
outputs) and read it (q/k/v, gate/up, lm_head: R1's inverse on their inputs), and a
``NormMapping`` names each RMSNorm and the linears it feeds, whose weights absorb the
norm's scale before rotating (``W diag(g)``, exact since ``RMSNorm(x R) = RMSNorm(x) R``
for orthogonal ``R`` once ``g = 1``).
"""

from __future__ import annotations

import torch
from compressed_tensors import match_named_modules
from llmcompressor.modifiers.transform.spinquant.mappings import SpinQuantMapping
from llmcompressor.modifiers.transform.spinquant.norm_mappings import NormMapping

__all__ = [
    "SpinQuantMapping",
    "NormMapping",
    "SUPPORTED_MODEL_TYPES",
    "UNSUPPORTED_MODEL_TYPES",
    "UNSUPPORTED_ROTATIONS",
    "resolve_mappings",
    "check_rms_norms",
]

_DECODER_MAPPING = SpinQuantMapping(
    embedding="re:.*embed_tokens$",
    attn="re:.*self_attn$",
    attn_q="re:.*self_attn.q_proj$",
    attn_k="re:.*self_attn.k_proj$",
    attn_v="re:.*self_attn.v_proj$",
    attn_o="re:.*self_attn.o_proj$",
    mlp_in=["re:.*mlp.up_proj$", "re:.*mlp.gate_proj$"],
    mlp_out="re:.*mlp.down_proj$",
    lm_head="lm_head",
)

_DECODER_NORMS = [
    NormMapping(
        norm="re:.*input_layernorm$",
        linears=["re:.*self_attn.q_proj$", "re:.*self_attn.k_proj$", "re:.*self_attn.v_proj$"],
    ),
    NormMapping(
        norm="re:.*post_attention_layernorm$",
        linears=["re:.*mlp.up_proj$", "re:.*mlp.gate_proj$"],
    ),
    NormMapping(norm="re:^model.norm$", linears=["lm_head"]),
]

# Mixture of experts, with the experts linearized (llm-compressor's ``linearize_moe``,
# which oneshot runs and GSR runs for ``rotate``): every expert's gate/up read the
# stream and its down_proj writes it; so do a shared expert and a dense MLP (layers
# without experts); the router (``mlp.gate``, a ``weight`` of experts x hidden used as
# ``F.linear``) and a shared expert's gate read it too. One pattern per role, so that a
# norm pairs with whichever of them a layer has.
_MOE_READERS = r"re:.*mlp\.((experts\.\d+|shared_expert)\.)?(up|gate)_proj$|.*mlp\.(gate|shared_expert_gate)$"
_MOE_WRITERS = r"re:.*mlp\.((experts\.\d+|shared_expert)\.)?down_proj$"

_MOE_MAPPING = _DECODER_MAPPING.model_copy(update={"mlp_in": [_MOE_READERS], "mlp_out": [_MOE_WRITERS]})

_MOE_NORMS = [
    _DECODER_NORMS[0],
    NormMapping(norm="re:.*post_attention_layernorm$", linears=[_MOE_READERS]),
    _DECODER_NORMS[2],
]

# Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: both read the stream
# whole, so R1 fuses exactly; R2's v half is a slice of qkv_proj's outputs (refused in
# UNSUPPORTED_ROTATIONS).
_PHI3_QKV = "re:.*self_attn.qkv_proj$"
_PHI3_MAPPING = _DECODER_MAPPING.model_copy(
    update={"attn_q": _PHI3_QKV, "attn_k": _PHI3_QKV, "attn_v": _PHI3_QKV, "mlp_in": ["re:.*mlp.gate_up_proj$"]}
)

_PHI3_NORMS = [
    NormMapping(norm="re:.*input_layernorm$", linears=[_PHI3_QKV]),
    NormMapping(norm="re:.*post_attention_layernorm$", linears=["re:.*mlp.gate_up_proj$"]),
    NormMapping(norm="re:^model.norm$", linears=["lm_head"]),
]

# model_type -> (rotation mapping, norm mappings). The dense four share LLaMA's module
# names; Qwen2 adds q/k/v biases (untouched by R1, rotated with v_proj by R2) and
# Qwen3 adds per-head q/k norms (inside attention, untouched by R1 and R2).
SUPPORTED_MODEL_TYPES: dict[str, tuple[SpinQuantMapping, list[NormMapping]]] = {
    "llama": (_DECODER_MAPPING, _DECODER_NORMS),
    "mistral": (_DECODER_MAPPING, _DECODER_NORMS),
    "qwen2": (_DECODER_MAPPING, _DECODER_NORMS),
    "qwen3": (_DECODER_MAPPING, _DECODER_NORMS),
    "mixtral": (_MOE_MAPPING, _MOE_NORMS),
    "qwen2_moe": (_MOE_MAPPING, _MOE_NORMS),
    "qwen3_moe": (_MOE_MAPPING, _MOE_NORMS),
    "phi3": (_PHI3_MAPPING, _PHI3_NORMS),
}

# model_type -> {rotation: why it cannot be fused exactly there}
UNSUPPORTED_ROTATIONS: dict[str, dict[str, str]] = {
    "phi3": {
        "R2": "phi3 computes v inside the fused qkv_proj, so R2 would rotate a slice of "
        "its outputs, which a weight transform cannot address; use rotations=['R1'] "
        "(with R4 if wanted)",
    },
}

# model_type -> why no rotation of the residual stream is exact there
UNSUPPORTED_MODEL_TYPES: dict[str, str] = {
    reason_for: (
        f"{reason_for} normalizes each sublayer's output before the residual add "
        "(sandwich norms: post_attention_layernorm, post_feedforward_layernorm), and "
        "the RMSNorm scale there sits between o_proj/down_proj and the stream with no "
        "linear after it to absorb it, so R1 cannot commute with it; GSR would change "
        "the model's output. Quantize it without a rotation"
    )
    for reason_for in ("gemma2", "gemma3", "gemma3_text")
}


def resolve_mappings(
    model: torch.nn.Module,
    mappings: SpinQuantMapping | None,
    norm_mappings: list[NormMapping] | None,
) -> tuple[SpinQuantMapping, list[NormMapping]]:
    """The user's mappings where given, else the registry's for ``model_type``;
    ``ValueError`` listing the supported types and the override otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in UNSUPPORTED_MODEL_TYPES:
        raise ValueError(f"GSR cannot rotate {model_type} exactly: {UNSUPPORTED_MODEL_TYPES[model_type]}.")
    if model_type in SUPPORTED_MODEL_TYPES:
        default_mapping, default_norms = SUPPORTED_MODEL_TYPES[model_type]
        return mappings or default_mapping, norm_mappings or default_norms
    if mappings is not None and norm_mappings is not None:
        return mappings, norm_mappings
    raise ValueError(
        f"GSRModifier does not know model_type {model_type!r} "
        f"({type(model).__name__}); supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}. "
        "For another RMSNorm decoder pass both `mappings=SpinQuantMapping(...)` (its "
        "embedding, attn, attn_q/k/v/o, mlp_in, mlp_out and lm_head module names or "
        "`re:` patterns) and `norm_mappings=[NormMapping(norm=..., linears=[...]), ...]` "
        "(every norm on the residual stream and the linears it feeds); both classes are "
        "in gsr_plugin.mappings."
    )


def check_rms_norms(model: torch.nn.Module, norm_mappings: list[NormMapping]) -> int:
    """Refuse norms that a rotation does not commute with; return how many matched.

    RMSNorm commutes with an orthogonal R once its scale is fused into the next
    linears. LayerNorm subtracts the mean and adds a bias, which R does not preserve
    (llm-compressor's SpinQuant centres embeddings for that, and is then not exact on
    RMSNorm models), so it is refused rather than approximated.
    """
    count = 0
    for mapping in norm_mappings:
        for name, norm in match_named_modules(model, [mapping.norm]):
            count += 1
            if isinstance(norm, torch.nn.LayerNorm) or getattr(norm, "bias", None) is not None:
                raise ValueError(
                    f"{name} is a {type(norm).__name__} with a mean/bias term; GSR rotates "
                    "exactly only through RMSNorm (scale-only) norms. This architecture "
                    "is not supported."
                )
            if getattr(norm, "weight", None) is None:
                raise ValueError(
                    f"{name} ({type(norm).__name__}) has no weight to fuse; check "
                    "norm_mappings"
                )
    if count == 0:
        raise ValueError(
            "norm_mappings matched no module in the model; check their `norm` patterns"
        )
    return count
