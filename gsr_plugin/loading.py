"""Load a saved checkpoint with its *online* transforms (R3, R4) in transformers.

transformers loads compressed-tensors checkpoints (decompressing weights, restoring
activation and KV-cache quantization) but not their online transforms: the transform
weights in the checkpoint (e.g. ``model.layers.0.mlp.down_proj.R4_input.weight``) are
dropped as unexpected keys and no hook is attached, so a model with R4 computes
``x W^T`` where it should compute ``(x R)(W R)^T``. vLLM applies them (on GPU). This
loader puts them back: it attaches the online half of every scheme in
``quantization_config.transform_config`` with compressed-tensors' factories and fills
the transform weights from the checkpoint (so random signs come back as saved). The
offline halves are already fused into the weights and are not applied again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.transform import TransformConfig, TransformFactory
from compressed_tensors.transform.apply import _register_tied_transform_weights
from compressed_tensors.transform.factory.base import TransformBase

from gsr_plugin.saving import ADAPTER_DIR

__all__ = ["online_transform_config", "load_with_online_transforms", "attach_online_transforms"]


def online_transform_config(config: dict | TransformConfig | None) -> TransformConfig | None:
    """The schemes of ``config`` cut to their online locations; None if there are none.
    An empty ``config`` (``{}``: what compressed-tensors writes for a checkpoint saved
    without a rotation) has none."""
    if not config or isinstance(config, dict) and not config.get("config_groups"):
        return None
    config = config if isinstance(config, TransformConfig) else TransformConfig.model_validate(config)
    groups = {}
    for name, scheme in config.config_groups.items():
        online = [args for args in scheme.apply if args.is_online()]
        if online:
            groups[name] = scheme.model_copy(update={"apply": online})
    return TransformConfig(config_groups=groups) if groups else None


def _saved_tensors(path: Path, suffixes: set[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key.rsplit(".", 2)[-2] in suffixes:
                    out[key] = f.get_tensor(key)
    return out


def attach_online_transforms(model: torch.nn.Module, checkpoint: str | Path) -> int:
    """Attach the online transforms recorded in ``checkpoint``'s config to ``model``
    (loaded from it) and load their saved weights; returns how many were attached."""
    checkpoint = Path(checkpoint)
    qconfig = json.loads((checkpoint / "config.json").read_text()).get("quantization_config") or {}
    online = online_transform_config(qconfig.get("transform_config"))
    if online is None:
        return 0
    for name, scheme in online.config_groups.items():
        TransformFactory.from_scheme(scheme, name=name).apply_to_model(model, use_tqdm=False)
    # modules built from one factory for one size share a Parameter (as when saved,
    # where such ties are written once): load each shared weight from any saved copy
    shared: dict[int, list[tuple[str, TransformBase]]] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, TransformBase):
            shared.setdefault(id(module.weight), []).append((module_name, module))
    saved = _saved_tensors(checkpoint, {name.rsplit(".", 1)[-1] for group in shared.values() for name, _ in group})
    for group in shared.values():
        keys = [f"{name}.weight" for name, _ in group if f"{name}.weight" in saved]
        if not keys:
            raise ValueError(f"{checkpoint} has no saved weight for the online transform {group[0][0]}")
        tensor = saved[keys[0]]
        for name, module in group:
            if tensor.shape != module.weight.shape:
                raise ValueError(f"{keys[0]}: saved shape {tuple(tensor.shape)}, expected {tuple(module.weight.shape)}")
            update_offload_parameter(module, "weight", tensor.to(dtype=module.weight.dtype))
    _register_tied_transform_weights(model)
    return sum(len(group) for group in shared.values())


def load_with_online_transforms(checkpoint: str | Path, dtype="auto", **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` plus the checkpoint's online
    transforms, its searched activation clips (``clip/``) and its low-rank adapter (``lora/``, through PEFT, kept unmerged: the
    adapter runs in 16-bit beside the quantized layer): the saved model computes what
    it computed before saving. A local checkpoint's files are checked first
    (``gsr_plugin.checkpoint``: ``CheckpointError`` naming the file and the fix).

    A rotation-only checkpoint (transforms, no quantization) has a
    ``quantization_config`` without ``config_groups``, which transformers 5's
    compressed-tensors loader fails on (``'NoneType' object has no attribute
    'config_groups'``); its weights are plain, so it is loaded without that entry."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gsr_plugin.checkpoint import check_checkpoint, looks_like_path
    from gsr_plugin.quantizers import apply_activation_clips

    local = Path(checkpoint).exists() or looks_like_path(str(checkpoint))
    qconfig = (check_checkpoint(checkpoint).get("quantization_config") or {}) if local else {}
    rotation_only = qconfig.get("quant_method") == "compressed-tensors" and not qconfig.get("config_groups")
    if rotation_only and "config" not in kwargs:
        config = AutoConfig.from_pretrained(checkpoint)
        del config.quantization_config
        kwargs["config"] = config
    adapter = Path(checkpoint) / ADAPTER_DIR
    has_adapter = (adapter / "adapter_config.json").is_file()
    # FP4 (NVFP4/MXFP4) run compressed decompresses to bfloat16 in every forward,
    # whatever dtype was asked for, and then fails on float32 inputs
    fp4 = any(((g.get("weights") or {}).get("type") == "float" and (g.get("weights") or {}).get("num_bits") == 4)
              for g in (qconfig.get("config_groups") or {}).values())
    if (has_adapter or fp4) and qconfig.get("quant_method") == "compressed-tensors" and not rotation_only:
        from transformers import CompressedTensorsConfig

        # PEFT wraps Linear.weight: decompress (a packed checkpoint otherwise stays packed)
        kwargs.setdefault("quantization_config", CompressedTensorsConfig(run_compressed=False))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, **kwargs)
    if fp4 and isinstance(dtype, torch.dtype):  # decompressed to bfloat16 regardless
        model = model.to(dtype)
    attach_online_transforms(model, checkpoint)
    apply_activation_clips(model, checkpoint)
    if has_adapter:  # the low-rank path (LowRankModifier), unmerged
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model
