"""GSR for Optimum and transformers GPTQ users (the gptqmodel backend).

The route users write: rotate the float model with ``gsr_plugin.rotate`` (the same
fusion as ``GSRModifier``), then quantize it with Optimum's ``GPTQQuantizer`` or with
transformers' ``from_pretrained(..., quantization_config=GPTQConfig(...))``. This module
runs either from an llm-compressor recipe (its rotation and its GPTQ grid), and saves
the result as a GPTQ checkpoint that is right as written. Optimum 2.3 gets three
things wrong when it saves:

* ``GPTQQuantizer.save`` converts symmetric weights to GPTQ v1 but leaves
  ``"format": "gptq_v2"`` in ``config.json`` (set while quantizing), so transformers
  reloads v1 weights as v2: every logit wrong. We write the quantizer's format after
  the conversion.
* the calibration dataset is stored in the config: tensors make ``save`` crash,
  strings bloat ``config.json``. We drop it.
* the ``GPTQConfig`` route saves v2 (which only recent vLLM reads). We convert
  symmetric weights to v1 as ``GPTQQuantizer.save`` does.

The rotation's settings are recorded in ``config.json`` (``gsr_rotation``, written by
``rotate``) and in ``quantization_config.meta.gsr_rotation``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["GPTQSettings", "recipe_for_optimum", "quantize_optimum", "save_gptq", "dequantize_to_float", "APIS"]

APIS = ("quantizer", "config")  # GPTQQuantizer, or transformers' GPTQConfig
_DATA_FREE = ("GSRModifier", "RandomRotationModifier")


@dataclass(frozen=True)
class GPTQSettings:
    """GPTQ as gptqmodel runs it. ``group_size`` None: one scale per output channel."""

    bits: int = 4
    group_size: int | None = 128
    sym: bool = True
    desc_act: bool = False
    damp_percent: float = 0.1

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"gptqmodel quantizes to 2, 3, 4 or 8 bits, not {self.bits}")

    def describe(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"gptq w{self.bits} {group} {'sym' if self.sym else 'asym'}"


def recipe_for_optimum(recipe: str):
    """(rotation modifiers, GPTQSettings) of an llm-compressor recipe, for the Optimum
    route. ``ValueError`` naming the reason for what that route cannot run: rotations
    that need data or run online, activation or KV-cache quantization, non-integer
    weights, a quantizer other than GPTQ."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationMixin
    from llmcompressor.recipe import Recipe

    from gsr_plugin.recipes import resolve_recipe

    source = recipe if "\n" in recipe else str(resolve_recipe(recipe))  # YAML text, or a file / shipped name
    modifiers = Recipe.create_instance(source).modifiers
    rotations = [m for m in modifiers if not isinstance(m, QuantizationMixin)]
    quantizers = [m for m in modifiers if isinstance(m, QuantizationMixin)]
    for m in rotations:
        if type(m).__name__ not in _DATA_FREE:
            raise ValueError(
                f"the Optimum engine applies {', '.join(_DATA_FREE)} before GPTQ; {type(m).__name__} is not one "
                "(run this recipe with --engine llmcompressor)"
            )
        online = [r for r in m.rotations if r in ("R3", "R4")]
        if online:
            raise ValueError(
                f"{type(m).__name__} has online rotations {online}; GPTQ checkpoints cannot carry them "
                "(use --engine llmcompressor, or a recipe with R1/R2 only)"
            )
    if len(quantizers) != 1 or not isinstance(quantizers[0], GPTQModifier):
        raise ValueError("the Optimum engine needs exactly one GPTQModifier in the recipe; it runs gptqmodel's GPTQ in its place")
    gptq = quantizers[0]
    groups = list(gptq.resolved_config.config_groups.values())
    if len(groups) != 1 or groups[0].weights is None:
        raise ValueError("the Optimum engine takes one config group with weights (one grid for every linear)")
    weights, acts = groups[0].weights, groups[0].input_activations
    if acts is not None or gptq.resolved_config.kv_cache_scheme is not None:
        raise ValueError("GPTQ checkpoints are weight-only: this recipe quantizes activations or the KV cache "
                         "(use --engine llmcompressor)")
    if str(weights.type) != "int" or str(weights.strategy) not in ("group", "channel"):
        raise ValueError(f"gptqmodel takes integer weights in groups or per channel, not {weights.type} {weights.strategy}")
    ignore = [i for i in (gptq.ignore or []) if i != "lm_head"]
    if ignore:
        raise ValueError(f"the Optimum engine quantizes every decoder linear; it cannot ignore {ignore}")
    settings = GPTQSettings(
        bits=weights.num_bits,
        group_size=weights.group_size if str(weights.strategy) == "group" else None,
        sym=weights.symmetric,
        # llm-compressor's "static" order keeps groups in place (gptqmodel's default
        # group-aware order, GAR, is the counterpart); "group" is act-order with g_idx
        desc_act=str(weights.actorder) == "group",
        damp_percent=getattr(gptq, "dampening_frac", 0.01) or 0.01,
    )
    return rotations, settings


def quantize_optimum(model_dir: str | Path, tokenizer, windows: torch.Tensor, settings: GPTQSettings, rotations=(),
                     api: str = "quantizer", dtype: torch.dtype = torch.float32):
    """Load ``model_dir`` in float32, ``rotate`` it with each of ``rotations``, and run
    gptqmodel's GPTQ on ``windows`` (token ids, one calibration sample per row) through
    ``api``: ``quantizer`` (Optimum's ``GPTQQuantizer.quantize_model``) or ``config``
    (transformers' ``from_pretrained(..., quantization_config=GPTQConfig(...))``, from
    the rotated model saved to a temporary directory). Returns (model, the Optimum
    quantizer that ran). Save it (``save_gptq``) before running it in eval mode:
    gptqmodel's CPU int4 kernel repacks the weights in place at its first eval-mode
    forward, after which they can no longer be saved."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    from gsr_plugin.modifiers.standalone import rotate

    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, not {api!r}")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    for modifier in rotations:
        rotate(model, modifier)
    data = [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in windows]
    common = dict(bits=settings.bits, group_size=settings.group_size or -1, sym=settings.sym,
                  desc_act=settings.desc_act, damp_percent=settings.damp_percent, model_seqlen=windows.shape[1],
                  dataset=data)
    if api == "quantizer":
        from optimum.gptq import GPTQQuantizer

        quantizer = GPTQQuantizer(**common)
        model = quantizer.quantize_model(model, tokenizer)
    else:
        with tempfile.TemporaryDirectory() as staged:
            model.save_pretrained(staged)
            tokenizer.save_pretrained(staged)
            model = AutoModelForCausalLM.from_pretrained(
                staged, dtype=dtype, quantization_config=GPTQConfig(tokenizer=tokenizer, **common)
            )
        quantizer = model.hf_quantizer.optimum_quantizer
    return model, quantizer


def save_gptq(model, quantizer, output: str | Path, tokenizer=None) -> Path:
    """Save a GPTQ checkpoint that is right as written: symmetric weights converted to
    v1 (Optimum's ``save``), ``config.json``'s ``quantization_config`` equal to the
    quantizer's settings after that conversion (its real ``format``), no calibration
    dataset in any config, and the rotation record in ``meta.gsr_rotation``. The
    in-memory model stays usable (converted back to the v2 layout its kernels read)."""
    from gsr_plugin.modifiers.standalone import ROTATION_RECORD

    output = Path(output)
    repacked = [n for n, m in model.named_modules() if getattr(m, "linear_mode", None) == "inference"]
    if repacked:
        raise ValueError(
            f"{repacked[0]} already ran gptqmodel's CPU inference kernel, which repacks its weights in place; "
            "save the model before running it in eval mode"
        )
    quantizer.dataset = None
    rotation = getattr(model.config, ROTATION_RECORD, None)
    if rotation is not None:
        quantizer.meta = {**(quantizer.meta or {}), ROTATION_RECORD: rotation}
    if getattr(quantizer, "quant_linear", None) is None:  # the GPTQConfig route never selected one for saving
        quantizer.select_quant_linear(device_map="cpu", pack=True)
    model.config.quantization_config = None  # set while quantizing: the dataset and the pre-conversion format
    quantizer.save(model, str(output))
    if quantizer.format == "gptq":
        # save converted the weights in place to v1; the in-memory kernels read v2
        from gptqmodel.utils.model import hf_convert_gptq_v1_to_v2_format

        hf_convert_gptq_v1_to_v2_format(model, quantizer.bits, quantizer.quant_linear, "gptq", quantizer.meta)
    config_path = output / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantizer.to_dict()
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.config.quantization_config = quantizer.to_dict()
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    return output


def dequantize_to_float(model, dtype: torch.dtype = torch.float32):
    """Replace every gptqmodel quantized linear by an ``nn.Linear`` holding its
    dequantized weight, in place: the GPTQ weights computed in ``dtype``, as
    llm-compressor's fake quantization computes them (gptqmodel's CPU inference kernel
    runs bfloat16), so two engines' GPTQ can be compared on equal terms."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if not hasattr(module, "dequantize_weight") or not hasattr(module, "qweight"):
            continue
        weight = module.dequantize_weight().T.to(dtype)  # gptqmodel returns (in, out)
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
        replaced += 1
    if replaced == 0:
        raise ValueError("no gptqmodel quantized linear found to dequantize")
    for attribute in ("quantization_method", "hf_quantizer"):  # no longer a GPTQ model
        if hasattr(model, attribute):
            delattr(model, attribute)
    model.config.quantization_config = None
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model.eval()
