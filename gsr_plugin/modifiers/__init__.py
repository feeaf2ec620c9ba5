"""llm-compressor modifiers: each chooses a rotation and fuses it through the shared
lifecycle in ``gsr_plugin.rotation``.

* ``GSRModifier`` (``gsr``): grouped sequency-ordered Walsh blocks (training-free);
* ``FRTQModifier`` (``frtq``): learned R1/R2 minimizing the grid-to-std ratio;
* ``LowRankModifier`` (``lowrank``): a rank-r 16-bit path, only the residual quantized;
* ``ActivationClipModifier`` (``clip``): a searched clip ratio per linear's dynamic input quantizer;
* ``RandomRotationModifier`` (``random``): random orthogonal / random Hadamard baselines.
"""

from gsr_plugin.modifiers.clip import ActivationClipModifier
from gsr_plugin.modifiers.frtq import FRTQModifier
from gsr_plugin.modifiers.gsr import GSRModifier, GSRRotation
from gsr_plugin.modifiers.lowrank import LowRankModifier
from gsr_plugin.modifiers.random import RandomRotationModifier

__all__ = ["ActivationClipModifier", "FRTQModifier", "GSRModifier", "LowRankModifier", "GSRRotation", "RandomRotationModifier"]
