"""gsr-plugin: Grouped Sequency-arranged Rotation (GSR) for llm-compressor.

``import gsr_plugin`` registers the ``sequency-walsh``, ``natural-walsh`` and
``random-orthogonal`` transform types with compressed-tensors, and ``GSRModifier`` (and
the ``RandomRotationModifier`` baseline, FRTQ, LowRank, ActivationClip) with
llm-compressor's ``ModifierFactory``, so
recipes (Python or YAML) can name them. Importing again is a no-op.
"""

import os
import sys

if os.path.basename(sys.argv[0]) == "gsr" and not {"-v", "--verbose"} & set(sys.argv):
    # the `gsr` command keeps stdout for results: llm-compressor logs its device
    # warning to stdout while it is imported, before the CLI can configure logging
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")

from gsr_plugin.modifiers.clip import ActivationClipModifier  # noqa: E402
from gsr_plugin.modifiers.frtq import FRTQModifier  # noqa: E402
from gsr_plugin.modifiers.gsr import GSRModifier, GSRRotation  # noqa: E402
from gsr_plugin.modifiers.lowrank import LowRankModifier  # noqa: E402
from gsr_plugin.modifiers.random import RandomRotationModifier  # noqa: E402
from gsr_plugin.modifiers.standalone import rotate  # noqa: E402
from gsr_plugin.quantizers import install as install_quantizers  # noqa: E402
from gsr_plugin.transform import NATURAL_WALSH, SEQUENCY_WALSH, install_calibration_attention, register_transform_types  # noqa: E402

__all__ = ["GSRModifier", "GSRRotation", "FRTQModifier", "LowRankModifier", "ActivationClipModifier", "RandomRotationModifier", "rotate", "SEQUENCY_WALSH", "NATURAL_WALSH", "register"]
__version__ = "0.1.0"


def register() -> None:
    """Register the transform types, the modifiers and the quantizers' clip ratio and
    sink tokens (``gsr_plugin.quantizers``); idempotent."""
    from llmcompressor.modifiers import ModifierFactory

    register_transform_types()
    ModifierFactory.register("GSRModifier", GSRModifier)
    ModifierFactory.register("RandomRotationModifier", RandomRotationModifier)
    ModifierFactory.register("FRTQModifier", FRTQModifier)
    ModifierFactory.register("LowRankModifier", LowRankModifier)
    ModifierFactory.register("ActivationClipModifier", ActivationClipModifier)
    install_quantizers()
    install_calibration_attention()


register()
