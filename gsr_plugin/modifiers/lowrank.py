"""``LowRankModifier``: a rank-r high-precision path beside every quantized linear.

Each target weight is split as ``W = L R + E`` (``gsr_plugin.learn.lowrank``): ``L``
(out x r) and ``R`` (r x in) stay in 16-bit, the weight becomes the residual ``E``, and
the quantizer that follows (GPTQ, with its usual Hessian) quantizes ``E``. The layer
then computes ``y = Q(E) x + L (R x)``: FRTQ's weight half, LoftQ/EoRA/QERA's idea.
Put it after the rotations (the split is taken in the rotated basis) and before the
quantizer, in the same ``oneshot``.

The checkpoint is the compressed-tensors model of the residuals, as without this
modifier; the factors are saved beside it as a standard PEFT LoRA adapter
(``lora/adapter_config.json``, ``lora/adapter_model.safetensors``: ``lora_B = L``,
``lora_A = R``, ``r`` = the rank, ``lora_alpha = r`` so the scaling is 1), which
transformers + PEFT and vLLM (``enable_lora=True``) load.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from compressed_tensors import match_named_modules
from compressed_tensors.offload import align_module_device, get_execution_device, update_offload_parameter
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator
from tqdm import tqdm

from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier

from gsr_plugin.learn.lowrank import low_rank_split
from gsr_plugin.saving import ADAPTER_DIR, write_beside_checkpoint
from gsr_plugin.session import check_before_quantizers

__all__ = ["LowRankModifier", "ADAPTER_DIR", "save_adapter", "LowRankAdapter"]

FACTOR_DTYPE = torch.float16


class LowRankAdapter:
    """``y += L (R x)`` on a linear's output (a forward hook; the factors are plain
    tensors, not parameters, so the checkpoint of the residuals is unchanged)."""

    def __init__(self, module: torch.nn.Module, left: torch.Tensor, right: torch.Tensor):
        self.left, self.right = left, right
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        x = args[0]
        low = torch.nn.functional.linear(torch.nn.functional.linear(x, self.right.to(x.dtype)), self.left.to(x.dtype))
        return output + low


class LowRankModifier(Modifier):
    """
    Keep a rank-``rank`` part of every target weight in 16-bit and leave only the
    residual to the quantizer: ``W = L R + E``, ``y = Q(E) x + L (R x)``.

    Lifecycle:

    - on_initialize: resolve targets and ranks, refuse what cannot work (before the
      model is touched)
    - on_calibration_start: ``svd``: split every target now. ``activation``: hook the
      targets to accumulate ``H = X X^T`` of their inputs
    - on_sequential_epoch_end / on_calibration_end (``activation``): split the
      layers calibrated so far
    - ``save_pretrained`` (oneshot's) then writes the PEFT adapter to ``lora/``

    :param rank: the rank, or a per-layer budget: ``{pattern: rank}`` (a module name,
        or ``re:`` regex, first match wins; a target that matches none is skipped;
        rank 0 turns a layer off)
    :param targets: modules to split (names, ``re:`` patterns or class names)
    :param ignore: modules not to split
    :param method: ``svd`` (truncated SVD of the rotated weight, as FRTQ) or
        ``activation`` (the rank-r part that minimizes the layer's output error on the
        calibration inputs, as QERA / SVD-LLM; oneshot's dataset, no extra data)
    """

    rank: int | dict[str, int] = Field(default=16)
    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    method: Literal["svd", "activation"] = Field(default="svd")

    _ranks: dict[str, int] = PrivateAttr(default_factory=dict)
    _modules: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _hessians: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)
    _adapters: dict[str, LowRankAdapter] = PrivateAttr(default_factory=dict)

    @field_validator("targets", "ignore", mode="before")
    @classmethod
    def _as_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("rank")
    @classmethod
    def _non_negative(cls, value):
        ranks = value.values() if isinstance(value, dict) else [value]
        if any(r < 0 for r in ranks):
            raise ValueError(f"rank must be >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _data_for_activation(self):
        if self.method == "activation":
            self.requires_calibration_data = True
        return self

    # ------------------------------------------------------------------ planning

    def rank_of(self, name: str) -> int:
        if isinstance(self.rank, int):
            return self.rank
        for pattern, rank in self.rank.items():
            if pattern == name or (pattern.startswith("re:") and re.fullmatch(pattern[3:], name)):
                return rank
        return 0

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        check_before_quantizers(
            self, "the quantizer would already have quantized W, not the residual", " (and after the rotations)"
        )
        matched = dict(match_named_modules(model, self.targets, self.ignore))
        if not matched:
            raise ValueError(f"LowRankModifier targets {self.targets} (ignore {self.ignore}) match no module; check targets")
        too_large = []
        for name, module in matched.items():
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"{name} is a {type(module).__name__}; LowRankModifier splits Linear weights only")
            rank = self.rank_of(name)
            if rank >= min(module.in_features, module.out_features):
                too_large.append(f"{name} ({module.out_features} x {module.in_features})")
            if rank > 0:
                self._ranks[name] = rank
                self._modules[name] = module
        if too_large:
            raise ValueError(
                f"rank must be below min(out, in) of every target, and it is not for {too_large[:3]}; "
                "lower the rank or drop those layers from targets"
            )
        if not self._ranks:
            raise ValueError("every target has rank 0; there is nothing to split (check rank's patterns)")
        if self.method == "activation" and state.data.calib is None:
            raise ValueError(
                "LowRankModifier(method='activation') needs calibration inputs: pass dataset= to oneshot (the data "
                "GPTQ calibrates on), or use method='svd'"
            )
        return True

    # ------------------------------------------------------------------ acting

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        if self.method == "svd":
            self._split(list(self._modules))
        else:
            for name, module in self._modules.items():
                self.register_hook(module, self._accumulate(name), "forward")
        write_beside_checkpoint(state.model, "lora", lambda directory: save_adapter(directory, self))

    def _accumulate(self, name: str):
        def hook(module, args, _output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if name not in self._hessians:
                self._hessians[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
            self._hessians[name] += x.T @ x

        return hook

    def on_sequential_epoch_end(self, state: State, event: Event, modules=None, **kwargs):
        if self.method == "activation":
            self._split([name for name in self._hessians if name not in self._adapters])

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        if self.method == "activation":
            missing = [name for name in self._modules if name not in self._hessians and name not in self._adapters]
            if missing:
                raise ValueError(f"{len(missing)} targets (e.g. {missing[0]}) saw no calibration input")
            self._split([name for name in self._hessians if name not in self._adapters])

    @torch.no_grad()
    def _split(self, names: list[str]) -> None:
        for name in tqdm(names, desc=f"Low-rank split ({self.method})", leave=False):
            module = self._modules[name]
            with align_module_device(module):
                hessian = self._hessians.pop(name, None)
                left, right, residual = low_rank_split(module.weight.data, self._ranks[name], hessian, FACTOR_DTYPE)
                update_offload_parameter(module, "weight", residual)
            device = get_execution_device(module)
            self._adapters[name] = LowRankAdapter(module, left.to(device), right.to(device))

    def on_finalize(self, state: State, **kwargs) -> bool:
        if len(self._adapters) != len(self._modules):
            raise ValueError(f"split {len(self._adapters)} of {len(self._modules)} targets")
        logger.info(f"LowRankModifier kept rank {self.rank} ({self.method}) beside {len(self._adapters)} linears")
        return True

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module name: (L, R)} of the split layers."""
        return {name: (a.left, a.right) for name, a in self._adapters.items()}


def save_adapter(directory: str | Path, modifier: LowRankModifier) -> Path:
    """Write the factors as a PEFT LoRA adapter in ``directory/lora``: ``lora_A = R``,
    ``lora_B = L``, ``r`` the largest rank (others in ``rank_pattern``), ``lora_alpha``
    equal to each rank so the scaling is 1."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    factors = modifier.factors()
    ranks = {name: left.shape[1] for name, (left, _) in factors.items()}
    top = max(ranks.values())
    out = Path(directory) / ADAPTER_DIR
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted(factors),
        rank_pattern={name: r for name, r in ranks.items() if r != top},
        alpha_pattern={name: r for name, r in ranks.items() if r != top},
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    config.base_model_name_or_path = str(Path(directory).resolve())
    config.save_pretrained(str(out))
    tensors = {}
    for name, (left, right) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = right.contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = left.contiguous().cpu()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
