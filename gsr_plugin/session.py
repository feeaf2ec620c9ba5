"""Where a modifier sits in the active llm-compressor recipe, for the checks every
modifier of this package makes before touching the model (a quantizer must come
after what changes the weights it quantizes) and for reading the quantizer's grid."""

from __future__ import annotations

__all__ = ["modifiers_around", "check_before_quantizers"]


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
