"""Where a modifier sits in the active llm-compressor recipe, for the checks every
modifier of this package makes before touching the model (a quantizer must come
after what changes the weights it quantizes) and for reading the quantizer's grid."""

from __future__ import annotations

__all__ = ["modifiers_around", "check_before_quantizers", "first_quantizer_args", "following_quantizer_args", "is_float_format"]


def modifiers_around(modifier) -> tuple[list, list] | None:
    """(modifiers before, modifiers after) ``modifier`` in the active session's recipe;
    None when it is not in one (hooks called directly, ``gsr_plugin.rotate``)."""
    from llmcompressor.core import active_session

    recipe = getattr(active_session().lifecycle, "recipe", None)
    modifiers = list(getattr(recipe, "modifiers", None) or [])
    position = next((i for i, m in enumerate(modifiers) if m is modifier), None)
    if position is None:
        return None
    return modifiers[:position], modifiers[position + 1 :]


def check_before_quantizers(modifier, why: str, where: str = "") -> None:
    """Refuse a recipe that puts a quantization modifier before ``modifier``:
    ``ValueError`` with ``why`` and the move that fixes it."""
    from llmcompressor.modifiers.quantization import QuantizationMixin

    around = modifiers_around(modifier)
    if around is None:
        return
    earlier = [type(m).__name__ for m in around[0] if isinstance(m, QuantizationMixin)]
    if earlier:
        name = type(modifier).__name__
        raise ValueError(
            f"{name} comes after {', '.join(earlier)} in the recipe; {why}. Move {name} before {earlier[0]}{where}."
        )


def first_quantizer_args(modifiers) -> tuple:
    """(weights, input_activations) QuantizationArgs of the first quantization
    modifier in ``modifiers`` (its first config group with weights); (None, None)."""
    from llmcompressor.modifiers.quantization import QuantizationMixin

    for modifier in modifiers:
        if isinstance(modifier, QuantizationMixin):
            for scheme in modifier.resolved_config.config_groups.values():
                if scheme.weights is not None:
                    return scheme.weights, scheme.input_activations
    return None, None


def following_quantizer_args(modifier) -> tuple:
    """``first_quantizer_args`` of the modifiers after ``modifier`` in the active recipe."""
    around = modifiers_around(modifier)
    return (None, None) if around is None else first_quantizer_args(around[1])


def is_float_format(args) -> bool:
    """Whether QuantizationArgs (or None) describe a floating-point grid (FP4/FP8)."""
    from compressed_tensors.quantization import QuantizationType

    return args is not None and args.type == QuantizationType.FLOAT
