"""gsr-plugin: Grouped Sequency-arranged Rotation (GSR) for llm-compressor.

``import gsr_plugin`` registers the ``sequency-walsh`` and ``natural-walsh`` transform
types with compressed-tensors and ``GSRModifier`` with llm-compressor's
``ModifierFactory``, so recipes (Python or YAML) can name it. Importing again is a
no-op.
"""

from gsr_plugin.modifier import GSRModifier, GSRRotation
from gsr_plugin.transform import SEQUENCY_WALSH, NATURAL_WALSH, register_transform_types

__all__ = ["GSRModifier", "GSRRotation", "SEQUENCY_WALSH", "NATURAL_WALSH", "register"]
__version__ = "0.1.0"


def register() -> None:
    """Register the transform types and the modifier (idempotent)."""
    from llmcompressor.modifiers import ModifierFactory

    register_transform_types()
    ModifierFactory.register("GSRModifier", GSRModifier)


register()
