"""Recipes: one function builds every rotation + GPTQ setting that ``gsr compare``
runs, and the YAML files in ``recipes/`` are written from it (``python -m
gsr_plugin.recipes``), so a file and the comparison that cites it cannot drift.

A file name spells its setting: ``{method}_w{bits}a{act}[_g{group}|_ch][_asym]_gptq.yaml``
(``ch``: one scale per output channel; ``asym``: with zero points), or for llm-compressor's
FP4 presets ``{method}_{nvfp4a16|nvfp4|mxfp4a16|mxfp4}_{rtn|gptq}.yaml``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = [
    "FP4_SCHEMES",
    "METHODS",
    "RecipeSetting",
    "build_recipe",
    "recipe_yaml",
    "recipes_dir",
    "resolve_recipe",
    "setting_from_name",
    "shipped_settings",
    "write_recipes",
]

# method -> what it is, for comments, tables and --help
METHODS: dict[str, str] = {
    "none": "no rotation",
    "hadamard": "natural-order Hadamard blocks (llm-compressor SpinQuantModifier, transform_type hadamard; QuaRot-style)",
    "random_hadamard": "random Hadamard blocks (llm-compressor SpinQuantModifier, transform_type random-hadamard)",
    "random_orthogonal": "full-width random orthogonal rotation (RandomRotationModifier), exact",
    "random_hadamard_exact": "random Hadamard blocks of any K*2^m size (RandomRotationModifier kind hadamard), exact",
    "natural": "natural-order Hadamard blocks (GSRModifier ordering natural), exact: GSR's ordering ablation",
    "natural_random": "natural-order Hadamard blocks with random row signs (GSRModifier), exact",
    "gsr": "GSR: grouped sequency-ordered Walsh blocks (GSRModifier)",
    "gsr_random": "GSR with seeded random signs on each block's rows",
    "spinquant_gsr": "llm-compressor SpinQuant (hadamard) first, then GSR on top",
    "frtq": "FRTQ: learned R1/R2 minimizing the grid-to-std ratio, GSR-initialized (FRTQModifier)",
    "frtq_random": "FRTQ from a random orthogonal initialization (FRTQModifier init random)",
    "frtq_gsr": "FRTQ (GSR-initialized) first, then GSR on top (a Walsh block is its own inverse: this undoes GSR)",
    "frtq_full": "FRTQ with one full-width learned R1 (FRTQModifier structure full), GSR-initialized",
    "frtq_gptqguard": "FRTQ whose guard judges the learned matrices after GPTQ (FRTQModifier guard_quantizer gptq)",
}


@dataclass(frozen=True)
class RecipeSetting:
    """A rotation method followed by GPTQ.

    :param weight_bits: integer weight bits (2, 3, 4, 8)
    :param group_size: weights per scale along the input dim; None = per channel
    :param symmetric: no zero point (False: asymmetric, as the GSR paper's GPTQ runs)
    :param activation_bits: 16 (weight-only), or 8 / 4 (int dynamic per-token activations)
    :param block_size: rotation block; None = the model's head_dim
    :param online_r4: add the online R4 rotation (down_proj input) to the rotation
    :param r4_block_size: R4 block (GSRModifier; None = its default)
    :param online_r3: add the online R3 rotation (queries and keys after RoPE, per head)
    :param kv_bits: quantize the KV cache to this many bits; None = 16-bit cache
    :param kv_dynamic: the KV quantizer: ``False`` static symmetric scales per attention
        head from calibration (what engines with static scales use), ``True`` the
        published protocol (QuaRot, SpinQuant): dynamic, asymmetric, per token in
        groups of head_dim
    :param weight_observer: how GPTQ's weight scales are chosen before it runs:
        ``minmax`` (each group's range) or ``mse`` (llm-compressor's MSE observer: the
        range shrunk where that lowers the rounding error, i.e. a searched weight clip)
    :param activation_clip: the activation quantizer's clip ratio (``observer_kwargs``,
        ``gsr_plugin.quantizers``): each token's range times this (QuaRot, SpinQuant:
        0.9), or ``"search"``: one ratio per linear searched on the calibration set
        (``ActivationClipModifier``), or ``"learn"`` (FRTQ methods): learned with the
        rotations (``FRTQModifier learn_clip``); None: no clip
    :param kv_clip: the dynamic KV quantizer's clip ratio (published: 0.95)
    :param sink_tokens: keep the keys and values of each sequence's first N tokens
        unquantized (IntactKV, PrefixQuant)
    :param rank: LowRankModifier's rank between the rotation and GPTQ (0: none)
    :param lowrank: its method, ``svd`` or ``activation``
    :param fp4: an FP4 preset of llm-compressor instead of integer GPTQ: ``NVFP4A16``,
        ``NVFP4`` (E2M1 in groups of 16, FP8 E4M3 scales, plus a global scale),
        ``MXFP4A16``, ``MXFP4`` (groups of 32, power-of-two E8M0 scales), applied by
        ``QuantizationModifier`` (round to nearest, as llm-compressor's FP4 examples);
        it sets the weight grid and the activation bits
    :param fp4_gptq: with ``fp4``: ``GPTQModifier`` with the preset instead of round to
        nearest (the integer recipes always run GPTQ)
    """

    method: str = "gsr"
    weight_bits: int = 4
    group_size: int | None = 64
    symmetric: bool = True
    activation_bits: int = 16
    block_size: int | None = None
    online_r4: bool = False
    r4_block_size: int | None = None
    kv_bits: int | None = None
    online_r3: bool = False
    kv_dynamic: bool = False
    weight_observer: str = "minmax"
    activation_clip: float | str | None = None
    kv_clip: float | None = None
    sink_tokens: int = 0
    rank: int = 0
    lowrank: str = "svd"
    fp4: str | None = None
    fp4_gptq: bool = False

    def __post_init__(self):
        if self.fp4_gptq and self.fp4 is None:
            raise ValueError("fp4_gptq is for the FP4 presets (fp4=...); the integer recipes always run GPTQ")
        if self.fp4 is not None:
            if self.fp4 not in FP4_SCHEMES:
                raise ValueError(f"fp4 must be one of {', '.join(FP4_SCHEMES)}, not {self.fp4!r}")
            group, acts = FP4_SCHEMES[self.fp4]
            for field, value in (("weight_bits", 4), ("group_size", group), ("symmetric", True), ("activation_bits", acts)):
                object.__setattr__(self, field, value)
            if self.kv_bits:
                raise ValueError("kv_bits is for the integer recipes; FP4 presets keep a 16-bit KV cache")
        if self.weight_observer not in ("minmax", "mse"):
            raise ValueError(f"weight_observer must be 'minmax' or 'mse', not {self.weight_observer!r}")
        if self.activation_clip is not None:
            if self.activation_bits == 16 or self.fp4:
                raise ValueError("activation_clip clips the int activation quantizer: set activation_bits to 8 or 4")
            if self.activation_clip not in ("search", "learn") and not (
                isinstance(self.activation_clip, (int, float)) and 0 < self.activation_clip < 1
            ):
                raise ValueError(
                    f"activation_clip must be a ratio in (0, 1), 'search' or 'learn', not {self.activation_clip!r}")
            if self.activation_clip == "learn" and not self.method.startswith("frtq"):
                raise ValueError("activation_clip='learn' is FRTQ's (learned with its rotations): use an frtq method")
        if self.kv_clip is not None and not (self.kv_dynamic and 0 < self.kv_clip < 1):
            raise ValueError("kv_clip is a ratio in (0, 1) for the dynamic KV quantizer (kv_dynamic=True); "
                             "static scales come from their observer")
        if self.sink_tokens and not (self.kv_bits and self.sink_tokens > 0):
            raise ValueError("sink_tokens keeps tokens out of the quantized KV cache: set kv_bits, and N > 0")
        if self.kv_dynamic and not self.kv_bits:
            raise ValueError("kv_dynamic chooses the KV quantizer: set kv_bits too")
        if self.lowrank not in ("svd", "activation"):
            raise ValueError(f"lowrank must be 'svd' or 'activation', not {self.lowrank!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.activation_bits not in (4, 8, 16):
            raise ValueError("activation_bits must be 16 (weight-only), 8 or 4 (int, dynamic per token)")

    @property
    def _online(self) -> str:
        """``_r4``, ``_r34``, ``_r3`` (online rotations, R1/R2 implied), R4's block after ``b``."""
        if not (self.online_r3 or self.online_r4):
            return ""
        block = f"b{self.r4_block_size}" if self.online_r4 and self.r4_block_size else ""
        return f"_r{'3' if self.online_r3 else ''}{'4' if self.online_r4 else ''}{block}"

    @property
    def name(self) -> str:
        if self.fp4:
            r4 = self._online
            lr = (f"_lr{self.rank}" + ("a" if self.lowrank == "activation" else "")) if self.rank else ""
            return f"{self.method}_{self.fp4.lower()}{r4}{lr}_{'gptq' if self.fp4_gptq else 'rtn'}"
        group = "" if self.activation_bits == 8 and self.weight_bits == 8 and self.group_size is None else (
            f"_g{self.group_size}" if self.group_size else "_ch"
        )
        asym = "" if self.symmetric else "_asym"
        kv = f"kv{self.kv_bits}" if self.kv_bits else ""
        r4 = self._online + ("_dynkv" if self.kv_dynamic else "")
        lr = (f"_lr{self.rank}" + ("a" if self.lowrank == "activation" else "")) if self.rank else ""
        mse = "_mse" if self.weight_observer == "mse" else ""
        return f"{self.method}_w{self.weight_bits}a{self.activation_bits}{kv}{group}{asym}{r4}{lr}{mse}{self._clips}_gptq"

    @property
    def _clips(self) -> str:
        """``_aclip90`` / ``_aclipsearch``, ``_kvclip95``, ``_sink1``"""
        percent = lambda ratio: f"{round(ratio * 100):d}"  # noqa: E731
        out = ""
        if self.activation_clip is not None:
            out += "_aclip" + (self.activation_clip if isinstance(self.activation_clip, str)
                               else percent(self.activation_clip))
        if self.kv_clip is not None:
            out += f"_kvclip{percent(self.kv_clip)}"
        return out + (f"_sink{self.sink_tokens}" if self.sink_tokens else "")

    @property
    def description(self) -> str:
        group = f"groups of {self.group_size}" if self.group_size else "one scale per output channel"
        kind = "symmetric" if self.symmetric else "asymmetric (zero points)"
        acts = (
            "16-bit activations"
            if self.activation_bits == 16
            else f"int{self.activation_bits} dynamic per-token activations"
        )
        kv = ""
        if self.kv_bits:
            kv = f", int{self.kv_bits} KV cache " + (
                "(dynamic, asymmetric, per token in groups of head_dim)" if self.kv_dynamic
                else "(static symmetric scales per attention head)"
            )
        online = [text for flag, text in ((self.online_r3, "R3 at queries and keys after RoPE"),
                                          (self.online_r4, "R4 at down_proj's input")) if flag]
        r4 = f" (with the online {' and '.join(online)})" if online else ""
        if self.rank:
            r4 += f", a rank-{self.rank} 16-bit path ({self.lowrank}; LowRankModifier, only the residual quantized)"
        if self.fp4:
            scales = "FP8 E4M3 scales and a global scale" if self.fp4.startswith("NV") else "power-of-two E8M0 scales"
            acts = "16-bit activations" if self.activation_bits == 16 else "FP4 activations in the same groups"
            how = "GPTQ (GPTQModifier)" if self.fp4_gptq else "round to nearest (QuantizationModifier)"
            return (f"{METHODS[self.method]}{r4}; then {self.fp4} {how}: FP4 E2M1 "
                    f"weights in groups of {self.group_size} with {scales}, {acts}")
        observer = ", scales from the MSE observer" if self.weight_observer == "mse" else ""
        clips = []
        if self.activation_clip == "search":
            clips.append("activation clip ratios searched per linear")
        elif self.activation_clip == "learn":
            clips.append("activation clip ratios learned with the rotations")
        elif self.activation_clip is not None:
            clips.append(f"activations clipped at {self.activation_clip}")
        if self.kv_clip is not None:
            clips.append(f"KV clipped at {self.kv_clip}")
        if self.sink_tokens:
            clips.append("the first token's KV kept in 16-bit" if self.sink_tokens == 1
                         else f"the first {self.sink_tokens} tokens' KV kept in 16-bit")
        kv += "".join(f", {text}" for text in clips)
        return f"{METHODS[self.method]}{r4}; then GPTQ int{self.weight_bits} {kind} weights in {group}{observer}, {acts}{kv}"


# llm-compressor preset -> (group size, activation bits)
FP4_SCHEMES: dict[str, tuple[int, int]] = {"NVFP4A16": (16, 16), "NVFP4": (16, 4), "MXFP4A16": (32, 16), "MXFP4": (32, 4)}


def _rotation_modifiers(setting: RecipeSetting) -> dict:
    rotations = ["R1", "R2"] + ["R3"] * setting.online_r3 + ["R4"] * setting.online_r4
    block = {} if setting.block_size is None else {"block_size": setting.block_size}
    r4 = {"r4_block_size": setting.r4_block_size} if setting.online_r4 and setting.r4_block_size else {}
    ours = {"rotations": rotations, **block, **r4}
    spin_block = {"transform_block_size": setting.block_size or "head_dim"}
    spin = lambda kind: {"rotations": rotations, "transform_type": kind, **spin_block}  # noqa: E731
    return {
        "none": {},
        "hadamard": {"SpinQuantModifier": spin("hadamard")},
        "random_hadamard": {"SpinQuantModifier": spin("random-hadamard")},
        "random_orthogonal": {"RandomRotationModifier": {**ours, "kind": "orthogonal"}},
        "random_hadamard_exact": {"RandomRotationModifier": {**ours, "kind": "hadamard"}},
        "natural": {"GSRModifier": {**ours, "ordering": "natural"}},
        "natural_random": {"GSRModifier": {**ours, "ordering": "natural", "randomize": True, "seed": 0}},
        "gsr": {"GSRModifier": ours},
        "gsr_random": {"GSRModifier": {**ours, "randomize": True, "seed": 0}},
        "spinquant_gsr": {
            "SpinQuantModifier": spin("hadamard"),
            "GSRModifier": {**ours, "rotations": ["R1", "R2"]},
        },
        "frtq": {"FRTQModifier": ours},
        "frtq_random": {"FRTQModifier": {**ours, "init": "random"}},
        "frtq_full": {"FRTQModifier": {**ours, "structure": "full"}},
        "frtq_gptqguard": {"FRTQModifier": {**ours, "guard_quantizer": "gptq"}},
        "frtq_gsr": {"FRTQModifier": ours, "GSRModifier": {**ours, "rotations": ["R1", "R2"]}},
    }[setting.method]


def build_recipe(setting: RecipeSetting, head_dim: int | None = None) -> dict:
    """The recipe as a dict (llm-compressor's stage/modifier layout). ``head_dim``
    resolves the SpinQuant block where ``block_size`` is None (GSRModifier resolves
    its own from the model)."""
    from gsr_plugin.quantizers import CLIP_RATIO, SINK_TOKENS

    weights = {
        "num_bits": setting.weight_bits,
        "type": "int",
        "symmetric": setting.symmetric,
        "strategy": "group" if setting.group_size else "channel",
    }
    if setting.group_size:
        weights["group_size"] = setting.group_size
    if setting.weight_observer != "minmax":
        weights["observer"] = setting.weight_observer
    scheme = {"targets": ["Linear"], "weights": weights}
    if setting.activation_bits < 16:
        scheme["input_activations"] = {
            "num_bits": setting.activation_bits, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
        }
        if isinstance(setting.activation_clip, float):
            scheme["input_activations"]["observer_kwargs"] = {CLIP_RATIO: setting.activation_clip}
    modifiers = _rotation_modifiers(setting)
    for fields in modifiers.values():
        if fields.get("transform_block_size") == "head_dim":
            if head_dim is None:
                raise ValueError("SpinQuant needs an explicit block: pass head_dim or set block_size")
            fields["transform_block_size"] = head_dim
    if setting.rank:
        modifiers["LowRankModifier"] = {"rank": setting.rank, "method": setting.lowrank}
    if setting.fp4:
        for name, fields in modifiers.items():  # FRTQ learns for an integer proxy of the FP4 grid
            if name == "FRTQModifier":
                group, acts = FP4_SCHEMES[setting.fp4]
                fields.update(weight_bits=4, weight_group_size=group, weight_symmetric=True, activation_bits=acts)
        quantizer = "GPTQModifier" if setting.fp4_gptq else "QuantizationModifier"
        modifiers[quantizer] = {"targets": ["Linear"], "ignore": ["lm_head"], "scheme": setting.fp4}
        return {"quant_stage": {"quant_modifiers": modifiers}}
    modifiers["GPTQModifier"] = {"ignore": ["lm_head"], "config_groups": {"group_0": scheme}}
    if setting.kv_bits and setting.kv_dynamic:
        if head_dim is None:
            raise ValueError("the dynamic KV quantizer groups each token's head: pass head_dim")
        modifiers["GPTQModifier"]["kv_cache_scheme"] = {
            "num_bits": setting.kv_bits, "type": "int", "symmetric": False, "strategy": "group",
            "group_size": head_dim, "dynamic": True,
        }
    elif setting.kv_bits:
        modifiers["GPTQModifier"]["kv_cache_scheme"] = {
            "num_bits": setting.kv_bits, "type": "int", "symmetric": True, "strategy": "attn_head", "dynamic": False,
        }
    kv_extra = {CLIP_RATIO: setting.kv_clip} if setting.kv_clip is not None else {}
    kv_extra |= {SINK_TOKENS: setting.sink_tokens} if setting.sink_tokens else {}
    if kv_extra:
        modifiers["GPTQModifier"]["kv_cache_scheme"]["observer_kwargs"] = kv_extra
    if setting.activation_clip == "search":  # after the quantizer, whose activations it clips
        modifiers["ActivationClipModifier"] = {}
    if setting.activation_clip == "learn":
        modifiers["FRTQModifier"]["learn_clip"] = True
    return {"quant_stage": {"quant_modifiers": modifiers}}


def recipe_yaml(setting: RecipeSetting, head_dim: int | None = None) -> str:
    header = f"# {setting.name}: {setting.description}.\n"
    if setting.method in ("hadamard", "random_hadamard", "spinquant_gsr") and setting.block_size is None:
        header += f"# Rotation blocks of {head_dim} (the default model's head_dim).\n"
    if setting.method in ("random_hadamard_exact", "random_orthogonal") and setting.block_size is None:
        header += "# R1 over the full width (hidden_size), R4 over intermediate_size (RandomRotationModifier's default).\n"
    header += "# Written by `python -m gsr_plugin.recipes`; `gsr compare` runs the same recipe.\n"
    return header + yaml.safe_dump(build_recipe(setting, head_dim), sort_keys=False)


# What ships in recipes/: the serving settings and the baselines `gsr compare` uses on
# the default model (hidden 576, head_dim 64, so groups and blocks of 64).
DEFAULT_MODEL_HEAD_DIM = 64


def shipped_settings() -> list[RecipeSetting]:
    settings = [
        RecipeSetting("gsr", 4, 64),  # serves: vLLM WNA16 (symmetric, like preset W4A16)
        RecipeSetting("gsr", 4, 128),  # LLaMA-2-7B-like models (dims divisible by 128)
        RecipeSetting("gsr", 3, 64, symmetric=False),
        # W3 with GPTQ's scales from the MSE observer (a searched clip): 7% below min-max
        RecipeSetting("gsr", 3, 64, symmetric=False, weight_observer="mse"),
        RecipeSetting("gsr", 2, 64, symmetric=False),
        RecipeSetting("gsr", 8, None, activation_bits=8),  # W8A8 int8, dynamic per token
        RecipeSetting("spinquant_gsr", 4, 64),
        # weights and activations: int4 dynamic per-token activations, 4-bit KV cache,
        # online R4 (fake-quantized evaluation; vLLM runs online transforms on GPU only)
        RecipeSetting("gsr", 4, 64, symmetric=False, activation_bits=4, online_r4=True, kv_bits=4),
        # the published W4A4KV4 protocol: R1-R4, KV4 dynamic asymmetric per token in groups
        # of head_dim (docs/results.md: 2.8x float against 5.0x with the static cache above)
        RecipeSetting("gsr", 4, 64, symmetric=False, activation_bits=4, online_r3=True, online_r4=True, kv_bits=4,
                      kv_dynamic=True),
        # ... with QuaRot's clips (activations 0.9, KV 0.95): the best measured (docs/results.md)
        RecipeSetting("gsr", 4, 64, symmetric=False, activation_bits=4, online_r3=True, online_r4=True, kv_bits=4,
                      kv_dynamic=True, activation_clip=0.9, kv_clip=0.95),
    ]
    for method in ("none", "hadamard", "random_hadamard", "gsr", "gsr_random"):
        for bits in (2, 3, 4):
            settings.append(RecipeSetting(method, bits, 64, symmetric=False))
    settings += [  # a rank-16 16-bit path beside W4 (vLLM serves it with LoRA) and W3/W2
        RecipeSetting("gsr", 4, 64, rank=16),
        RecipeSetting("gsr", 3, 64, symmetric=False, rank=16, lowrank="activation"),
        RecipeSetting("gsr", 2, 64, symmetric=False, rank=32, lowrank="activation"),
    ]
    settings += [  # FRTQ: learned rotations (docs/results.md)
        RecipeSetting("frtq", 4, 64),  # serves: vLLM WNA16, as gsr_w4a16_g64_gptq
        RecipeSetting("frtq", 3, 64, symmetric=False),
        RecipeSetting("frtq", 3, 64, symmetric=False, weight_observer="mse"),  # the W3 recipe to use
        RecipeSetting("frtq", 4, None, symmetric=False),
        RecipeSetting("frtq", 4, 64, symmetric=False, activation_bits=4, online_r4=True, kv_bits=4),
        RecipeSetting("frtq", 4, 64, symmetric=False, activation_bits=4, online_r3=True, online_r4=True, kv_bits=4,
                      kv_dynamic=True),
        RecipeSetting("frtq", 4, 64, symmetric=False, activation_bits=4, online_r3=True, online_r4=True, kv_bits=4,
                      kv_dynamic=True, activation_clip=0.9, kv_clip=0.95),
        RecipeSetting("frtq", 4, 64, symmetric=False, activation_bits=4, online_r3=True, online_r4=True, kv_bits=4,
                      kv_dynamic=True, activation_clip="learn", kv_clip=0.95),  # the clip learned with R1/R2
        RecipeSetting("frtq", 4, 64, symmetric=False, activation_bits=4, online_r4=True),
    ]
    settings += [  # FP4 (vLLM on GPU): R1+R2 blocks of head_dim, a multiple of both scale groups
        RecipeSetting("gsr", fp4=scheme) for scheme in FP4_SCHEMES
    ]
    settings += [RecipeSetting("none", fp4=scheme) for scheme in FP4_SCHEMES]
    settings += [  # FP4 weights through GPTQ (where a rotation pays, docs/results.md); a file name
        # spells no block, so GSR keeps its default (head_dim, a multiple of both groups)
        RecipeSetting(method, fp4=scheme, fp4_gptq=True) for scheme in ("NVFP4A16", "MXFP4A16") for method in ("gsr", "none")
    ]
    # W4A4 in NVFP4 through GPTQ, no rotation: the best 4-bit-activation setting measured
    # (1.36x float with a 16-bit KV cache; GSR before it costs 11%: docs/results.md)
    settings.append(RecipeSetting("none", fp4="NVFP4", fp4_gptq=True))
    # R1 over the full width (random Hadamard of hidden_size; R4 of intermediate_size) with
    # the W4A4KV4 protocol and clips: 2.15x float on one draw, against GSR's 2.69x (blocks of 64)
    settings.append(RecipeSetting("random_hadamard_exact", 4, 64, symmetric=False, activation_bits=4, online_r3=True,
                                  online_r4=True, kv_bits=4, kv_dynamic=True, activation_clip=0.9, kv_clip=0.95))
    return list(dict.fromkeys(settings))


def recipes_dir() -> Path:
    """``$GSR_RECIPES_DIR``, else ``recipes/`` of this checkout."""
    if os.environ.get("GSR_RECIPES_DIR"):
        return Path(os.environ["GSR_RECIPES_DIR"])
    return Path(__file__).resolve().parents[1] / "recipes"


def resolve_recipe(name_or_path: str) -> Path:
    """A YAML file path, or the name of a shipped recipe (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = re.sub(r"\.ya?ml$", "", name_or_path)
    candidate = recipes_dir() / f"{stem}.yaml"
    if candidate.is_file():
        return candidate
    available = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    raise FileNotFoundError(
        f"recipe {name_or_path!r} is neither a file nor a shipped recipe; shipped "
        f"({recipes_dir()}): {', '.join(available) or 'none'}"
    )


def write_recipes(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for setting in shipped_settings():
        path = directory / f"{setting.name}.yaml"
        path.write_text(recipe_yaml(setting, DEFAULT_MODEL_HEAD_DIM))
        written.append(path)
    return written


def setting_from_name(name: str) -> RecipeSetting:
    """Inverse of ``RecipeSetting.name`` (for tests and tables)."""
    pattern = (
        r"(?P<m>[a-z_]+?)_w(?P<w>\d+)a(?P<a>\d+)(?:kv(?P<kv>\d+))?(?:_g(?P<g>\d+)|(?P<ch>_ch))?"
        r"(?P<asym>_asym)?(?:_r(?P<r3>3)?(?P<r4>4)?(?:b(?P<r4b>\d+))?)?(?P<dynkv>_dynkv)?(?:_lr(?P<lr>\d+)(?P<lra>a)?)?(?P<mse>_mse)?"
        r"(?:_aclip(?P<aclip>search|learn|\d+))?(?:_kvclip(?P<kvclip>\d+))?(?:_sink(?P<sink>\d+))?_gptq$"
    )
    fp4 = re.fullmatch(
        r"(?P<m>[a-z_]+?)_(?P<fp4>nvfp4a16|nvfp4|mxfp4a16|mxfp4)(?:_r(?P<r3>3)?(?P<r4>4)?(?:b(?P<r4b>\d+))?)?(?:_lr(?P<lr>\d+)(?P<lra>a)?)?_(?P<q>rtn|gptq)", name
    )
    if fp4:
        return RecipeSetting(
            method=fp4["m"], fp4=fp4["fp4"].upper(), online_r4=fp4["r4"] is not None, online_r3=fp4["r3"] is not None,
            r4_block_size=int(fp4["r4b"]) if fp4["r4b"] else None, rank=int(fp4["lr"]) if fp4["lr"] else 0,
            lowrank="activation" if fp4["lra"] else "svd", fp4_gptq=fp4["q"] == "gptq",
        )
    match = re.fullmatch(pattern, name)
    if not match:
        raise ValueError(f"{name!r} does not spell a recipe setting")
    return RecipeSetting(
        method=match["m"],
        weight_bits=int(match["w"]),
        group_size=int(match["g"]) if match["g"] else None,
        symmetric=match["asym"] is None,
        activation_bits=int(match["a"]),
        online_r4=match["r4"] is not None,
        online_r3=match["r3"] is not None,
        r4_block_size=int(match["r4b"]) if match["r4b"] else None,
        kv_bits=int(match["kv"]) if match["kv"] else None,
        kv_dynamic=match["dynkv"] is not None,
        weight_observer="mse" if match["mse"] else "minmax",
        activation_clip=None if match["aclip"] is None else (
            match["aclip"] if not match["aclip"].isdigit() else int(match["aclip"]) / 100),
        kv_clip=int(match["kvclip"]) / 100 if match["kvclip"] else None,
        sink_tokens=int(match["sink"]) if match["sink"] else 0,
        rank=int(match["lr"]) if match["lr"] else 0,
        lowrank="activation" if match["lra"] else "svd",
    )


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else recipes_dir()
    for written_path in write_recipes(target):
        print(written_path)
