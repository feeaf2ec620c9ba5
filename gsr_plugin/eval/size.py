"""Honest storage: bits per weight of the quantized decoder linears, including the
scales, the zero points and the 16-bit low-rank factors (lm_head, embeddings and norms
are the same in every setting and are left out).

For a linear of ``out x in`` weights at ``b`` bits in groups of ``g`` (per channel:
``g = in``), with 16-bit scales, ``b``-bit zero points when asymmetric, and a rank-``r``
path in 16-bit::

    bits = b * out * in + (16 + b * asym) * out * in / g + 16 * r * (out + in)

``bits_per_weight`` sums that over the model's linears and divides by their weights.
"""

from __future__ import annotations

__all__ = ["linear_shapes", "bits_per_weight"]

_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(config) -> list[tuple[int, int]]:
    """(out, in) of every decoder linear of a LLaMA-style config (an object or dict)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    hidden, inter, layers = get("hidden_size"), get("intermediate_size"), get("num_hidden_layers")
    heads = get("num_attention_heads")
    kv = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hidden // heads
    per_layer = [(heads * head_dim, hidden), (kv * head_dim, hidden), (kv * head_dim, hidden), (hidden, heads * head_dim),
                 (inter, hidden), (inter, hidden), (hidden, inter)]
    return per_layer * layers


def bits_per_weight(config, bits: int, group_size: int | None, symmetric: bool = True, rank: int = 0,
                    scale_bits: int = 16) -> float:
    """Bits stored per weight of the decoder linears (see the module docstring;
    ``scale_bits`` is 16 for a checkpoint served in 16-bit)."""
    total_bits = total_weights = 0
    for out, inp in linear_shapes(config):
        group = group_size or inp
        weights = out * inp
        total_bits += bits * weights + (scale_bits + (0 if symmetric else bits)) * weights / group + 16 * rank * (out + inp)
        total_weights += weights
    return total_bits / total_weights
