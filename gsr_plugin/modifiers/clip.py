"""``ActivationClipModifier``: a clip ratio for each linear's dynamic input quantizer,
searched on the calibration set."""

from __future__ import annotations

import torch
from compressed_tensors.utils import getattr_chain, match_named_modules
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from pydantic import Field, PrivateAttr, field_validator

from gsr_plugin.quantizers import CLIP_CANDIDATES, INPUT_CLIP_ATTR, clip_error, save_activation_clips_with

__all__ = ["ActivationClipModifier"]


class ActivationClipModifier(Modifier):
    """
    Search a clip ratio per linear for its dynamic input quantizer, on oneshot's
    calibration data, and keep it on the module (``input_clip_ratio``, read by
    ``gsr_plugin.quantizers``). Put it after the quantization modifier (GPTQModifier),
    whose ``input_activations`` it clips.

    For each target and candidate ``c`` in ``ratios`` the calibration inputs' error
    ``sum_j ||W[:, j]||^2 sum_t (Q_c(x)_tj - x_tj)^2`` is summed; the smallest wins
    (``clip_error``). Ratios are chosen layer by layer as the sequential pipeline
    finishes each, so the next layer calibrates on clipped inputs. ``save_pretrained``
    writes them to ``clip/input_clip_ratios.json``; ``gsr_plugin.loading`` puts
    them back.

    :param ratios: the candidates (each in (0, 1])
    :param targets: modules to clip (names, ``re:`` patterns or class names)
    :param ignore: modules to leave
    """

    ratios: list[float] = Field(default_factory=lambda: list(CLIP_CANDIDATES))
    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])

    _modules: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _errors: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)
    _chosen: dict[str, float] = PrivateAttr(default_factory=dict)

    @field_validator("ratios")
    @classmethod
    def _in_unit_interval(cls, value):
        if not value or any(not 0 < r <= 1 for r in value):
            raise ValueError(f"ratios must be a non-empty list of numbers in (0, 1], got {value}")
        return value

    def on_initialize(self, state: State, **kwargs) -> bool:
        self.requires_calibration_data = True
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        for name, module in match_named_modules(state.model, self.targets, self.ignore):
            args = getattr_chain(module, "quantization_scheme.input_activations", None)
            if isinstance(module, torch.nn.Linear) and args is not None and args.dynamic:
                self._modules[name] = module
                self.register_hook(module, self._accumulate(name), "forward_pre")
        if not self._modules:
            raise ValueError(
                "ActivationClipModifier found no linear with dynamic input_activations: put it after the "
                "quantization modifier of a recipe that quantizes activations (e.g. W4A4)"
            )
        save_activation_clips_with(state.model)

    def _accumulate(self, name: str):
        @torch.no_grad()
        def hook(module, args):
            x = args[0].detach().float()
            column_weight = module.weight.detach().float().pow(2).sum(0)
            quant = module.quantization_scheme.input_activations
            errors = torch.stack([clip_error(x, quant, column_weight, r) for r in self.ratios])
            self._errors[name] = self._errors.get(name, 0) + errors

        return hook

    def _choose(self):
        for name, errors in self._errors.items():
            ratio = self.ratios[int(torch.argmin(errors))]
            setattr(self._modules[name], INPUT_CLIP_ATTR, ratio)
            self._chosen[name] = ratio
        self._errors.clear()

    def on_sequential_epoch_end(self, state: State, event: Event, modules=None, **kwargs):
        self._choose()

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        self._choose()
        missing = [n for n in self._modules if n not in self._chosen]
        if missing:
            raise ValueError(f"{len(missing)} targets (e.g. {missing[0]}) saw no calibration input: no clip chosen")

    def on_finalize(self, state: State, **kwargs) -> bool:
        return True

    @property
    def chosen(self) -> dict[str, float]:
        """module name -> the searched ratio"""
        return dict(self._chosen)
