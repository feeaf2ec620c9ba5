"""Two things the published W4A4KV4 protocols use that compressed-tensors' dynamic
quantizers lack: a clip ratio, and attention-sink tokens kept in full precision.

Both ride in the quantization args a recipe already has, as ``observer_kwargs``, so
compressed-tensors writes them into the checkpoint's ``config.json``:

- ``clip_ratio: c`` (``0 < c <= 1``) on a *dynamic* quantizer (``input_activations``
  or a dynamic ``kv_cache_scheme``): each group's range is shrunk to ``c [min, max]``
  before its scale is taken, ``s = c (max - min) / (2^b - 1)`` (asymmetric) or
  ``s = c max|x| / (2^(b-1) - 1)`` (symmetric); values beyond the grid saturate.
  Since compressed-tensors' scale and zero point are those of ``min`` and ``max``,
  they are exactly those of ``c x`` (QuaRot and SpinQuant: 0.9 for activations, 0.95
  for the KV cache). A linear with an ``input_clip_ratio`` attribute (a searched
  ratio, ``ActivationClipModifier``) uses that instead.
- ``sink_tokens: n`` on ``kv_cache_scheme``: the keys and values of a sequence's
  first ``n`` positions enter the cache unquantized (IntactKV, PrefixQuant), at any
  cache length. Static scales are still observed over every token.

``install()`` (run on import of ``gsr_plugin``) wraps compressed-tensors' dynamic
scale function and its KV cache's ``forward``; without these keys both compute
exactly what compressed-tensors computes. vLLM reads neither (docs/serving.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import compressed_tensors.modeling.kvcache as kvcache
import torch
import compressed_tensors.quantization.lifecycle.forward as forward
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.utils import getattr_chain
from torch import Tensor
from torch.nn import Module

__all__ = ["CLIP_CANDIDATES", "CLIP_RATIO", "SINK_TOKENS", "INPUT_CLIP_ATTR", "CLIP_DIR", "CLIP_FILE", "clip_ratio_of", "sink_tokens_of",
           "dynamic_qparams", "clip_error", "apply_activation_clips", "write_activation_clips",
           "save_activation_clips_with", "install"]

CLIP_RATIO = "clip_ratio"
SINK_TOKENS = "sink_tokens"
INPUT_CLIP_ATTR = "input_clip_ratio"  # a linear's own (searched) activation clip
CLIP_CANDIDATES = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0 ... 0.5, the searched ratios
CLIP_DIR = "clip"  # beside a checkpoint: the searched ratios, {module name: ratio}
CLIP_FILE = "input_clip_ratios.json"

_unclipped_qparams = forward.compute_dynamic_scales_and_zp
_unkept_kv_forward = kvcache.QuantizedKVCache.forward


def _extra(args: QuantizationArgs | None) -> dict:
    return (getattr(args, "observer_kwargs", None) or {}) if args is not None else {}


def clip_ratio_of(args: QuantizationArgs | None, module: Module | None = None) -> float:
    """The module's searched ratio, else the args' ``clip_ratio``, else 1."""
    ratio = getattr(module, INPUT_CLIP_ATTR, None) if module is not None else None
    if ratio is None:
        ratio = _extra(args).get(CLIP_RATIO, 1.0)
    if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"clip_ratio must be a number in (0, 1], got {ratio!r}: fix observer_kwargs.clip_ratio")
    return float(ratio)


def sink_tokens_of(args: QuantizationArgs | None) -> int:
    n = _extra(args).get(SINK_TOKENS, 0)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"sink_tokens must be a whole number >= 0, got {n!r}: fix kv_cache_scheme.observer_kwargs")
    return n


def dynamic_qparams(value: Tensor, args: QuantizationArgs, module: Module, global_scale: Tensor | None = None):
    """compressed-tensors' dynamic scale and zero point of ``clip_ratio * value``."""
    ratio = clip_ratio_of(args, module)
    if ratio != 1.0:
        value = value * ratio
    return _unclipped_qparams(value, args, module, global_scale=global_scale)


def clip_error(x: torch.Tensor, args, column_weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """``sum_j w_j sum_t (Q_c(x)_tj - x_tj)^2`` for the dynamic quantizer ``args`` at
    clip ratio ``c``, ``w_j = ||W[:, j]||^2``: the layer's output error with the
    cross terms between input columns dropped."""
    holder = torch.nn.Module()  # no searched ratio of its own: the args' ratio is replaced by c
    setattr(holder, INPUT_CLIP_ATTR, ratio)
    scale, zero_point = dynamic_qparams(x, args, holder)
    error = forward.fake_quantize(x, scale, zero_point, args) - x
    return (error.pow(2).reshape(-1, x.shape[-1]).sum(0) * column_weight).sum()


def _kv_forward_keeping_sinks(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
    """``QuantizedKVCache.forward``, the first ``sink_tokens`` positions unquantized."""
    module = self.attn_module()
    quant_args = getattr_chain(module, "quantization_scheme.input_activations", None)
    sinks = sink_tokens_of(quant_args)
    cache = self.past_key_values() if self.past_key_values is not None else None
    if not sinks or not getattr(module, "quantization_enabled", True):
        return _unkept_kv_forward(self, key_states, value_states, *args, **kwargs)
    layer = args[0] if args else kwargs.get("layer_idx", 0)
    start = cache.get_seq_length(layer) if cache is not None else 0
    keep = max(0, min(sinks - start, key_states.shape[-2]))
    quantized_k = forward.forward_quantize(module, key_states, "k", quant_args)
    quantized_v = forward.forward_quantize(module, value_states, "v", quant_args)
    if keep:
        quantized_k[..., :keep, :] = key_states[..., :keep, :]
        quantized_v[..., :keep, :] = value_states[..., :keep, :]
    self.past_key_values = None
    if cache is None:
        return quantized_k, quantized_v
    return cache.update(quantized_k, quantized_v, *args, **kwargs)

def apply_activation_clips(model: torch.nn.Module, checkpoint: str | Path) -> int:
    """Put the searched ratios of ``checkpoint/clip/`` back on ``model``'s linears."""
    path = Path(checkpoint) / CLIP_DIR / CLIP_FILE
    if not path.is_file():
        return 0
    ratios = json.loads(path.read_text())
    modules = dict(model.named_modules())
    missing = [name for name in ratios if name not in modules]
    if missing:
        raise ValueError(f"{path} names modules the model lacks ({missing[:3]}): it belongs to another model")
    for name, ratio in ratios.items():
        setattr(modules[name], INPUT_CLIP_ATTR, float(ratio))
    return len(ratios)


def write_activation_clips(model: Module, directory: str | Path) -> Path | None:
    """Every linear's ``input_clip_ratio`` to ``directory/clip/input_clip_ratios.json``
    (none: nothing written)."""
    ratios = {name: float(getattr(module, INPUT_CLIP_ATTR)) for name, module in model.named_modules()
              if getattr(module, INPUT_CLIP_ATTR, None) is not None}
    if not ratios:
        return None
    folder = Path(directory) / CLIP_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLIP_FILE
    path.write_text(json.dumps(ratios, indent=1, sort_keys=True) + "\n")
    return path


def save_activation_clips_with(model: Module) -> None:
    """Have every ``model.save_pretrained`` also write the clip ratios on its linears."""
    from gsr_plugin.saving import write_beside_checkpoint

    write_beside_checkpoint(model, "activation_clips", lambda directory: write_activation_clips(model, directory))


def install() -> None:
    """Idempotent."""
    forward.compute_dynamic_scales_and_zp = dynamic_qparams
    kvcache.QuantizedKVCache.forward = _kv_forward_keeping_sinks
