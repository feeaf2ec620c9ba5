"""A rotation modifier run on a plain transformers model, without llm-compressor's
``oneshot``: ``gsr_plugin.rotate(model)``, the route of quantizers that take a plain
model (Optimum's ``GPTQQuantizer``, transformers' ``GPTQConfig``, gptqmodel).

It calls the modifier's own lifecycle hooks (``gsr_plugin.rotation``), so there is one
implementation of the fusion for every entry point.
"""

from __future__ import annotations

import torch
from llmcompressor.core import State
from llmcompressor.modifiers import Modifier

from gsr_plugin.modifiers.gsr import GSRModifier
from gsr_plugin.rotation import FusedRotationModifier, Rotation

__all__ = ["rotate", "ROTATION_RECORD"]

ROTATION_RECORD = "gsr_rotation"  # the config.json key rotate() writes


def rotate(model: torch.nn.Module, modifier: FusedRotationModifier | None = None, calibration=None, **fields):
    """Fuse a rotation into a transformers model in place, without llm-compressor's
    ``oneshot``, and return the model.

    It runs the same lifecycle as the modifier in a recipe (the same planning,
    refusals, norm fusion and float64 fusion), so the function is unchanged to float
    rounding. ``model.config.gsr_rotation`` records the settings, and
    ``save_pretrained`` writes them to ``config.json``.

    :param modifier: the rotation (default ``GSRModifier(**fields)``); offline rotations
        only (R1, R2), since a GPTQ checkpoint cannot carry the online R3/R4
    :param calibration: batches (dicts of ``input_ids``, ``attention_mask``) for a
        modifier that learns from data (``FRTQModifier`` with an activation term)
    :param fields: ``GSRModifier`` fields (``block_size``, ``ordering``, ...)
    """
    if modifier is None:
        modifier = GSRModifier(**fields)
    elif fields:
        raise ValueError("pass either a modifier or GSRModifier fields, not both")
    online = [r for r in modifier.rotations if r in (Rotation.R3, Rotation.R4)]
    if online:
        raise ValueError(
            f"rotate() fuses offline rotations only (R1, R2), and rotations has {online}: online rotations run "
            "at inference, which GPTQ checkpoints cannot carry. Use the modifier in an llm-compressor recipe "
            "(compressed-tensors checkpoints keep them), or drop them from rotations"
        )
    state = State(model=model)
    state.data.calib = calibration
    modifier.on_initialize(state)
    modifier.on_calibration_start(state, None)
    own = set(type(modifier).model_fields) - set(Modifier.model_fields) - {"mappings", "norm_mappings", "learned"}
    record = {"modifier": type(modifier).__name__, **modifier.model_dump(include=own, mode="json")}
    setattr(model.config, ROTATION_RECORD, record)
    return model
