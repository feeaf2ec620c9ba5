"""Does GSR beat the other training-free rotations on the default model? Run by hand
(hours on 2 CPU cores; not in CI). Every run: a fresh float32 copy of the model, a
rotation, GPTQ (asymmetric integer weights unless stated), WikiText-2 perplexity.
Results go to ``<out>/<suite>.json`` after each run (``--resume`` continues a stopped
suite); ``tables`` turns them into Markdown and plots.

    python benchmarks/rotations.py main --out docs/results          # W3 g64, full test stream
    python benchmarks/rotations.py bits --out docs/results          # W4 per-channel, W2 g64
    python benchmarks/rotations.py blocks --out docs/results        # block size, group 64 and 32
    python benchmarks/rotations.py activations --out docs/results   # W4A8, W4A4 (R1+R2)
    python benchmarks/rotations.py online --out docs/results        # W4A4, W2A4, KV4 with R4
    python benchmarks/rotations.py frtq --out docs/results          # FRTQ at W3A16 g64, full test stream
    python benchmarks/rotations.py frtq_more --out docs/results     # FRTQ at W4A4KV4, W4A4 (R4), W4 per-channel
    python benchmarks/rotations.py lowrank --out docs/results       # low-rank path: W2/W3 x ranks x methods, equal storage
    python benchmarks/rotations.py engines --out docs/results       # llm-compressor GPTQ vs gptqmodel GPTQ (Optimum)
    python benchmarks/rotations.py fp4 --out docs/results           # NVFP4A16, MXFP4A16, NVFP4, MXFP4 after the rotations
    python benchmarks/rotations.py a4 --out docs/results            # W4A4KV4 decomposed: KV quantizer, R3, activations
    python benchmarks/rotations.py a4_draws --seed 1 --out docs/results  # its close rows, more calibration draws
    python benchmarks/rotations.py sweep --seed 1 --out docs/results  # FRTQ vs GSR over draws 0, 1, 2
    python benchmarks/rotations.py guard --out docs/results         # FRTQ's guard judging after GPTQ (W3A16 g64)
    python benchmarks/rotations.py w3_target --out docs/results     # W3A16 g64 with the MSE weight observer
    python benchmarks/rotations.py tables --out docs/results

Suites list their runs in priority order; ``--limit N`` runs the first N.

All rotations here are applied exactly (RMSNorm scales fused, no mean-centering), so a
difference between two rows is the matrix's doing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shlex
import sys
from pathlib import Path

from gsr_plugin.cli.compare import run_key, run_settings
from gsr_plugin.recipes import METHODS, RecipeSetting

# the list: no rotation; full-width random orthogonal; natural-order Hadamard
# blocks; random-sign Hadamard blocks; sequency blocks (GSR); GSR with random signs
MAIN_METHODS = ["none", "random_orthogonal", "natural", "natural_random", "gsr", "gsr_random"]
# rotations compared at the other bit widths (the sign-randomized variants are in `main`)
BITS_METHODS = ["none", "random_orthogonal", "natural", "gsr"]
# (bits, group) of `bits`: group None = per-channel. W4 in groups of 64 is left to
# `gsr compare` (docs/guide.md): near-lossless on this model, whose weights are
# dequantized 4-bit values in groups of 32
BITS_SETTINGS = [(2, 64), (4, None)]


def main_suite() -> list[RecipeSetting]:
    """W3 asymmetric, groups of 64, every rotation: where rotations separate."""
    return [RecipeSetting(m, 3, 64, symmetric=False) for m in MAIN_METHODS]


def bits_suite() -> list[RecipeSetting]:
    """W4 per-channel and W2 in groups of 64."""
    return [RecipeSetting(m, bits, group, symmetric=False) for bits, group in BITS_SETTINGS for m in BITS_METHODS]


def blocks_suite() -> list[RecipeSetting]:
    """W3, groups of 32 then 64: Walsh blocks 64/32/16 in sequency order, and the
    natural order where it can differ (a group smaller than the block: 64 with groups of
    32), random Hadamard 192 and 576 (K * 2^m constructions), full-width random
    orthogonal; the orderings that can only differ by GPTQ's column order come last."""
    out = []
    for group in (32, 64):
        out.append(RecipeSetting("none", 3, group, symmetric=False))
        out.append(RecipeSetting("gsr", 3, group, symmetric=False, block_size=64))
        if group < 64:
            out.append(RecipeSetting("natural", 3, group, symmetric=False, block_size=64))
        for block in (32, 16):
            out.append(RecipeSetting("gsr", 3, group, symmetric=False, block_size=block))
        for block in (192, 576):
            out.append(RecipeSetting("random_hadamard_exact", 3, group, symmetric=False, block_size=block))
        out.append(RecipeSetting("random_orthogonal", 3, group, symmetric=False))
    for group in (32, 64):
        for block in (32, 16) if group < 64 else (64, 32, 16):
            out.append(RecipeSetting("natural", 3, group, symmetric=False, block_size=block))
    return out


def activations_suite() -> list[RecipeSetting]:
    """Weights int4 asymmetric g64 (GPTQ), activations int8 / int4 dynamic per token
    (fake-quantized in the forward pass). R1+R2 only: down_proj's input is not rotated
    (that needs the online R4)."""
    return [
        RecipeSetting(method, 4, 64, symmetric=False, activation_bits=acts)
        for method in ("none", "gsr", "natural", "random_orthogonal")
        for acts in (8, 4)
    ]


def online_suite() -> list[RecipeSetting]:
    """W4A4 and W2A4 (int4 dynamic per-token activations) with a 4-bit KV cache, after
    R1+R2+R4: llm-compressor's SpinQuant with ``hadamard`` (blocks of 64 for R1 and R4:
    its one block size must be a power of two dividing 576), GSR with R4 blocks of 512
    (the default) and of 64 (as SpinQuant's). R3 is left out here (SpinQuant's fails
    beside a quantized KV cache in compressed-tensors 0.19; ours runs: suite ``a4``)."""
    out = []
    for bits in (4, 2):
        out.append(RecipeSetting("none", bits, 64, symmetric=False, activation_bits=4, kv_bits=4))
        for method, r4 in (("hadamard", None), ("gsr", None), ("gsr", 64)):
            out.append(
                RecipeSetting(method, bits, 64, symmetric=False, activation_bits=4, kv_bits=4, online_r4=True, r4_block_size=r4)
            )
    return out


FRTQ_METHODS = ["frtq", "gsr", "none", "natural", "frtq_random", "frtq_gsr"]


def frtq_suite() -> list[RecipeSetting]:
    """FRTQ (learned R1/R2, learning for the grid of the GPTQ modifier that follows)
    against the training-free rotations at W3A16 g64, the ``main`` setting (full test
    stream)."""
    return [RecipeSetting(m, 3, 64, symmetric=False) for m in FRTQ_METHODS]


def frtq_more_suite() -> list[RecipeSetting]:
    """W4A4 with a 4-bit KV cache and the online R4, W4A4 with R4 alone, and W4A16 per
    channel, for the rotations that separate there (20 windows; fewer than the main
    setting's six, to fit the CPU budget: see docs/results.md)."""
    w4a4 = dict(symmetric=False, activation_bits=4, online_r4=True)
    return (
        [RecipeSetting(m, 4, 64, kv_bits=4, **w4a4) for m in ("frtq", "gsr", "none", "frtq_random")]
        + [RecipeSetting(m, 4, 64, **w4a4) for m in ("frtq", "gsr")]
        + [RecipeSetting(m, 4, None, symmetric=False) for m in ("frtq", "gsr", "none")]
    )


def lowrank_suite() -> list[RecipeSetting]:
    """The low-rank path after GSR, in priority order: W2 g64 (asymmetric) without it
    and with rank 32 (activation-aware split), W3 g64 with rank 16 and the equal-storage
    reference W4 per channel (4.03 bits per weight both), W3 g64 without it, W2 at rank
    16, then the SVD split at rank 16, W3 at rank 32, and W4A4KV4 with R4 and per-channel
    weights as FRTQ uses it, with and without rank 16."""
    asym = dict(symmetric=False)
    w4a4kv4 = dict(symmetric=False, activation_bits=4, online_r4=True, kv_bits=4)
    return [
        RecipeSetting("gsr", 2, 64, **asym),
        RecipeSetting("gsr", 2, 64, rank=32, lowrank="activation", **asym),
        RecipeSetting("gsr", 3, 64, rank=16, lowrank="activation", **asym),
        RecipeSetting("gsr", 4, None, **asym),
        RecipeSetting("gsr", 3, 64, **asym),
        RecipeSetting("gsr", 2, 64, rank=16, lowrank="activation", **asym),
        RecipeSetting("gsr", 3, 64, rank=16, lowrank="svd", **asym),
        RecipeSetting("gsr", 2, 64, rank=16, lowrank="svd", **asym),
        RecipeSetting("gsr", 3, 64, rank=32, lowrank="activation", **asym),
        RecipeSetting("frtq", 4, None, **w4a4kv4),
        RecipeSetting("frtq", 4, None, rank=16, lowrank="activation", **w4a4kv4),
    ]


def engines_suite() -> list[RecipeSetting]:
    """W4 symmetric g64 (vLLM's int4 layout) after none and GSR, for
    llm-compressor's GPTQ and gptqmodel's (Optimum), side by side (``--engines``)."""
    return [RecipeSetting(m, 4, 64) for m in ("gsr", "none")]


def fp4_suite() -> list[RecipeSetting]:
    """llm-compressor's FP4 presets (round to nearest, fake-quantized on CPU) after R1+R2,
    in priority order: none and GSR with blocks of the scale group for each preset, GSR
    with blocks of 64 (head_dim), natural order where it can differ (a block wider than
    the group), random Hadamard blocks of the group, the other group size; then the
    weight-only presets through GPTQ instead of round to nearest, none and GSR. FP4
    activations run without R4 (down_proj's input is not rotated)."""
    group = {"NVFP4A16": 16, "MXFP4A16": 32, "NVFP4": 16, "MXFP4": 32}
    first = [s for scheme in group for s in (RecipeSetting("none", fp4=scheme),
                                             RecipeSetting("gsr", fp4=scheme, block_size=group[scheme]))]
    wide = [RecipeSetting("gsr", fp4=scheme, block_size=64) for scheme in group]
    weight_only = ("NVFP4A16", "MXFP4A16")
    rest = (
        [RecipeSetting("natural", fp4=scheme, block_size=64) for scheme in weight_only]
        + [RecipeSetting("random_hadamard_exact", fp4=scheme, block_size=group[scheme]) for scheme in weight_only]
        + [RecipeSetting("gsr", fp4=scheme, block_size=48 - group[scheme]) for scheme in weight_only]
    )
    gptq = [s for scheme in weight_only for s in (RecipeSetting("none", fp4=scheme, fp4_gptq=True),
                                                  RecipeSetting("gsr", fp4=scheme, block_size=group[scheme], fp4_gptq=True))]
    return first + wide + rest + gptq


def a4_suite() -> list[RecipeSetting]:
    """Where W4A4KV4 loses, in priority order (W4 g64 asymmetric GPTQ; A4: int4 dynamic
    per-token activations; KV4: static symmetric per head as shipped before, or dynamic
    asymmetric per token in groups of head_dim as published): GSR R1+R2+R4 with each KV
    quantizer, with R3, and with GPTQ's scales from the MSE observer (a searched weight
    clip), with activation and KV clip ratios (fixed, searched) and the first token's KV
    kept in 16-bit (sinks), then the decomposition (W4A16, W4A4 with a 16-bit cache,
    W4A16 with KV4, the dynamic one) for GSR, no rotation, llm-compressor's SpinQuant
    (hadamard, blocks of 64, no R3: its R3 beside a quantized cache fails in
    compressed-tensors 0.19) and FRTQ (R3 where a KV cache is quantized; the slowest)."""
    w4 = dict(symmetric=False)
    a4 = dict(activation_bits=4)
    kv_static, kv_dynamic = dict(kv_bits=4), dict(kv_bits=4, kv_dynamic=True)
    rotated = dict(online_r4=True)
    out = [
        RecipeSetting("gsr", 4, 64, **w4, **a4, **kv_static, **rotated),
        RecipeSetting("gsr", 4, 64, **w4, **a4, **kv_dynamic, **rotated),
        RecipeSetting("gsr", 4, 64, **w4, **a4, **kv_dynamic, **rotated, online_r3=True),
        RecipeSetting("gsr", 4, 64, **w4, **a4, **kv_dynamic, **rotated, online_r3=True, weight_observer="mse"),
        RecipeSetting("gsr", 4, 64, **w4, **a4, **rotated),
        RecipeSetting("gsr", 4, 64, **w4, **kv_dynamic, online_r3=True),
        RecipeSetting("gsr", 4, 64, **w4),
    ]
    published = dict(**w4, **a4, **kv_dynamic, **rotated, online_r3=True)
    out += [  # clipping (QuaRot's fixed ratios; searched per linear), then sinks with a static cache
        RecipeSetting("gsr", 4, 64, **published, activation_clip=0.9, kv_clip=0.95),
        RecipeSetting("gsr", 4, 64, **published, activation_clip="search", kv_clip=0.95),
        RecipeSetting("gsr", 4, 64, **w4, **a4, **kv_static, **rotated, online_r3=True, sink_tokens=1),
        RecipeSetting("gsr", 4, 64, **published, activation_clip="search", kv_clip=0.95, sink_tokens=1),
    ]
    best = dict(**published, activation_clip=0.9, kv_clip=0.95)  # the searched clip did no better
    out += [  # the static cache with R3 and no sink: what the sink row is measured against
        RecipeSetting("gsr", 4, 64, **w4, **a4, **kv_static, **rotated, online_r3=True),
    ]
    out += [  # the deployable 4-bit activation format: NVFP4 (W4A4 in FP4 groups of 16, 16-bit KV) through
        # GPTQ; FRTQ learns for its integer proxy (int4 symmetric groups of 16, int4 per-token activations)
        RecipeSetting(method, fp4="NVFP4", fp4_gptq=True) for method in ("none", "gsr", "frtq")
    ]
    out += [  # FRTQ at the best setting; R1 wider than 64 (576 = 9 x 64 has no wider Walsh
        # block): random Hadamard of 576 against 64 (both with R4 of 1536)
        RecipeSetting("frtq", 4, 64, **best),
        RecipeSetting("frtq", 4, 64, **{**best, "activation_clip": "learn"}),  # the clip learned with R1/R2
        RecipeSetting("random_hadamard_exact", 4, 64, block_size=576, **best),
        RecipeSetting("random_hadamard_exact", 4, 64, block_size=64, **best),
    ]
    out += [  # the decomposition: SpinQuant (hadamard, R1+R2+R4), no rotation
        RecipeSetting("hadamard", 4, 64, **w4, **a4, **kv_dynamic, **rotated),
        RecipeSetting("hadamard", 4, 64, **w4, **a4, **rotated),
        RecipeSetting("hadamard", 4, 64, **w4, **kv_dynamic),
        RecipeSetting("hadamard", 4, 64, **w4),
        RecipeSetting("none", 4, 64, **w4, **a4, **kv_dynamic),
        RecipeSetting("none", 4, 64, **w4, **a4),
        RecipeSetting("none", 4, 64, **w4, **kv_dynamic),
        RecipeSetting("none", 4, 64, **w4),
    ]
    out += [  # FRTQ's decomposition and full-width R1 (the slowest)
        RecipeSetting("frtq", 4, 64, **w4, **a4, **rotated),
        RecipeSetting("frtq_full", 4, 64, **best),
    ]
    out += [  # the dynamic KV4 alone without R3 (what the R3 row at W4A16 KV4 is read against)
        RecipeSetting("gsr", 4, 64, **w4, **kv_dynamic),
    ]
    return out


def a4_draws_suite() -> list[RecipeSetting]:
    """The W4A4KV4 headline rows (GSR with the published protocol, with and without
    the clips; R1 of 576 and FRTQ with the clips), for more calibration draws (``--seed 1``, ``--seed 2``; draw 0 is in
    suite ``a4``)."""
    published = dict(symmetric=False, activation_bits=4, kv_bits=4, kv_dynamic=True, online_r3=True, online_r4=True)
    best = dict(**published, activation_clip=0.9, kv_clip=0.95)
    return [RecipeSetting("gsr", 4, 64, **best),
            RecipeSetting("gsr", 4, 64, **published),
            RecipeSetting("random_hadamard_exact", 4, 64, block_size=576, **best),
            RecipeSetting("frtq", 4, 64, **best)]


def a4_headline_suite() -> list[RecipeSetting]:
    """The W4A4KV4 headline rows after R3's calibration fix (``transform.
    _eager_attention_keeping_hooks``), for draws 1 and 2; their draw 0 is suite
    ``a4_draws`` run with ``--seed 0`` (``a4_draws.json``)."""
    rows = a4_draws_suite()
    return [rows[2], rows[0], rows[3]]  # full-width R1, GSR, FRTQ (all with the clips)


def sweep_suite() -> list[RecipeSetting]:
    """FRTQ's generalization, for three calibration draws (``--seed 0``, ``1``, ``2``):
    W3A16 g64 with every rotation FRTQ is compared with (natural order, FRTQ from a
    random start, GSR after FRTQ), W4A16 per channel, and the W4A4KV4 protocol with
    the clips; FRTQ with its guard."""
    w3, ch = dict(symmetric=False), dict(symmetric=False)
    a4 = dict(symmetric=False, activation_bits=4, kv_bits=4, kv_dynamic=True, online_r3=True, online_r4=True,
              activation_clip=0.9, kv_clip=0.95)
    return (
        [RecipeSetting(m, 3, 64, **w3) for m in ("gsr", "frtq", "frtq_random", "frtq_gsr", "natural", "none")]
        + [RecipeSetting(m, 4, None, **ch) for m in ("gsr", "frtq", "none")]
        + [RecipeSetting(m, 4, 64, **a4) for m in ("gsr", "frtq")]
    )


def guard_suite() -> list[RecipeSetting]:
    """FRTQ with its guard judging after GPTQ (``guard_quantizer: gptq``) at the sweep's
    W3A16 g64 setting, against suite ``sweep``'s FRTQ (the guard on round to nearest)
    of the same draw."""
    return [RecipeSetting("frtq_gptqguard", 3, 64, symmetric=False)]


def w3_target_suite() -> list[RecipeSetting]:
    """The W3A16 g64 target (at most 1.5x float): GSR and FRTQ with GPTQ's scales from
    llm-compressor's MSE observer (a searched weight clip) instead of min-max, against
    suite ``sweep``'s min-max rows of the same draw."""
    return [RecipeSetting(m, 3, 64, symmetric=False, weight_observer="mse") for m in ("gsr", "frtq")]


SUITES = {"main": main_suite, "online": online_suite, "bits": bits_suite, "blocks": blocks_suite,
          "activations": activations_suite, "frtq": frtq_suite, "frtq_more": frtq_more_suite,
          "lowrank": lowrank_suite, "engines": engines_suite, "fp4": fp4_suite, "a4": a4_suite,
          "a4_draws": a4_draws_suite, "a4_headline": a4_headline_suite, "sweep": sweep_suite,
          "guard": guard_suite, "w3_target": w3_target_suite}
WINDOWS = {"main": None, "online": 20, "bits": 20, "blocks": 20, "activations": 20, "frtq": None, "frtq_more": 20,
           "lowrank": 10, "engines": 10, "fp4": 20, "a4": 20, "a4_draws": 20, "a4_headline": 20, "sweep": 20, "guard": 20,
           "w3_target": 20}
ENGINES = {"engines": ["llmcompressor", "optimum"]}


def run(suite: str, args) -> None:
    windows = WINDOWS[suite] if args.ppl_windows is None else (None if args.ppl_windows == "all" else int(args.ppl_windows))
    command = "python benchmarks/rotations.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run_settings(
        args.model,
        SUITES[suite]()[: args.limit],
        Path(args.out) / (f"{suite}.json" if args.seed == 0 else f"{suite}-seed{args.seed}.json"),
        calib_samples=args.calib_samples,
        seed=args.seed,
        calib_len=args.calib_len,
        ppl_windows=windows,
        data_dir=args.data_dir,
        command=command,
        resume=args.resume,
        engines=ENGINES.get(suite, ["llmcompressor"]),
    )


# ----------------------------------------------------------------- tables, plots


def _fmt(ppl: float) -> str:
    if not math.isfinite(ppl):
        return "inf"
    return f"{ppl:.2f}" if ppl < 100 else (f"{ppl:.0f}" if ppl < 10000 else f"{ppl:.2e}")


def _protocol(report: dict) -> str:
    p, fp = report["protocol"], report["fp"]
    return (
        f"`{p['model']}`, calibration {p['calib_samples']} x {p['calib_len']} tokens of WikiText-2 validation "
        f"(seed {p['seed']}), perplexity on the first {fp['windows']} of {fp['total_windows']} windows of "
        f"{fp['seq_len']} tokens (float32: {fp['ppl']:.2f}). Command: `{report['command']}`"
    )


def _column(run: dict) -> str:
    group = f"g{run['group_size']}" if run["group_size"] else "per-channel"
    acts = "" if run["activation_bits"] == 16 else f"A{run['activation_bits']}"
    return f"W{run['bits']}{acts} {group}"


def table(report: dict, row_key, column_key=_column) -> str:
    runs = report["runs"]
    rows = list(dict.fromkeys(row_key(r) for r in runs))
    columns = list(dict.fromkeys(column_key(r) for r in runs))
    cell = {(row_key(r), column_key(r)): r["ppl"] for r in runs}
    lines = ["| rotation | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        values = [_fmt(cell[(row, c)]) if (row, c) in cell else "" for c in columns]
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _online_row(run: dict) -> str:
    if run["method"] == "none":
        return "none"
    r4 = run.get("r4_block_size") or ("64" if run["method"] == "hadamard" else "512")
    return f"{run['method']} R1+R2+R4 (R4 block {r4})"


def _online_column(run: dict) -> str:
    return f"W{run['bits']}A{run['activation_bits']}KV{run.get('kv_bits')} g{run['group_size']}"


def _block_row(run: dict) -> str:
    block = run["block_size"] or ("576 (full)" if run["method"] == "random_orthogonal" else "-")
    return f"{run['method']}, block {block}" if run["method"] != "none" else "none"


def plot_main(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(dict.fromkeys(_column(r) for r in report["runs"]))
    methods = list(dict.fromkeys(r["method"] for r in report["runs"]))
    cell = {(r["method"], _column(r)): r["ppl"] for r in report["runs"]}
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns) + 0.8, 3.6), dpi=120, squeeze=False)
    axes = axes[0]
    for ax, column in zip(axes, columns):
        values = [cell.get((m, column), float("nan")) for m in methods]
        ax.bar(range(len(methods)), values, color=[f"C{i}" for i in range(len(methods))])
        ax.axhline(report["fp"]["ppl"], color="black", linestyle="--", linewidth=1)
        ax.set_title(column, fontsize=10)
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=8)
        if max(v for v in values if math.isfinite(v)) > 100:
            ax.set_yscale("log")
    axes[0].set_ylabel("WikiText-2 PPL (dashed: float32)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_blocks(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120, sharey=True)
    for ax, group in zip(axes, (64, 32)):
        runs = [r for r in report["runs"] if r["group_size"] == group]
        for method, marker in (("natural", "s"), ("gsr", "o")):
            pts = sorted((r["block_size"], r["ppl"]) for r in runs if r["method"] == method)
            ax.plot([b for b, _ in pts], [p for _, p in pts], marker=marker, label=method)
        for r in runs:
            if r["method"] == "random_hadamard_exact":
                ax.scatter([r["block_size"]], [r["ppl"]], marker="^", color="C2",
                           label="random Hadamard" if r["block_size"] == 192 else None)
            if r["method"] == "random_orthogonal":
                ax.scatter([576], [r["ppl"]], marker="x", color="C3", label="random orthogonal (576)")
            if r["method"] == "none":
                ax.axhline(r["ppl"], color="gray", linestyle=":", label="no rotation")
        ax.set_xscale("log", base=2)
        ax.set_xticks([16, 32, 64, 192, 576], ["16", "32", "64", "192", "576"])
        ax.set_title(f"W3 asymmetric, groups of {group}", fontsize=10)
        ax.set_xlabel("rotation block size")
    axes[0].set_ylabel(f"WikiText-2 PPL ({report['fp']['windows']} windows)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _setting_column(run: dict) -> str:
    acts = "" if run["activation_bits"] == 16 else f"A{run['activation_bits']}"
    kv = f"KV{run['kv_bits']}" if run.get("kv_bits") else ""
    group = f"g{run['group_size']}" if run["group_size"] else "per-channel"
    return f"W{run['bits']}{acts}{kv} {group}" + (" +R4" if run.get("online_r4") else "")


def _a4_column(run: dict) -> str:
    if run.get("fp4"):
        return f"{run['fp4']} KV16" + (" GPTQ" if run.get("fp4_gptq") else "")
    acts = "A16" if run["activation_bits"] == 16 else f"A{run['activation_bits']}"
    kv = "KV16" if not run.get("kv_bits") else f"KV{run['kv_bits']} {'dynamic' if run.get('kv_dynamic') else 'static'}"
    return f"W{run['bits']}{acts} {kv}"


def _a4_row(run: dict) -> str:
    online = [r for r, flag in (("R3", run.get("online_r3")), ("R4", run.get("online_r4"))) if flag]
    mse = ", MSE weight scales" if run.get("weight_observer") == "mse" else ""
    recipe = run["recipe"]  # older reports lack the clip fields: read them off the name
    named = re.search(r"_aclip(search|learn|\d+)", recipe)
    clip = run.get("activation_clip", None if named is None else named.group(1))
    if isinstance(clip, str) and clip.isdigit():
        clip = int(clip) / 100
    kv_clip = re.search(r"_kvclip(\d+)", recipe)
    if kv_clip and run.get("kv_clip") is None:
        run = {**run, "kv_clip": int(kv_clip.group(1)) / 100}
    sink = re.search(r"_sink(\d+)", recipe)
    if sink and not run.get("sink_tokens"):
        run = {**run, "sink_tokens": int(sink.group(1))}
    block = re.search(r"_b(\d+)$", recipe)
    if block:
        mse += f", R1 blocks of {block.group(1)}"
    if clip is not None:
        mse += ", activation clip " + ("searched" if clip == "search" else f"{clip}")
    if run.get("kv_clip") is not None:
        mse += f", KV clip {run['kv_clip']}"
    if run.get("sink_tokens"):
        mse += f", first {run['sink_tokens']} KV in 16-bit"
    if run["method"] == "none":
        return "none" + mse
    return f"{run['method']} R1+R2" + "".join(f"+{r}" for r in online) + mse


def _fp4_column(run: dict) -> str:
    if not run.get("fp4"):
        return _column(run)
    return run["fp4"] + (" GPTQ" if run.get("fp4_gptq") else "")


def _fp4_row(run: dict) -> str:
    if run["method"] == "none":
        return "none"
    return f"{run['method']}, block {run['block_size'] or 64}"


def _lowrank_row(run: dict) -> str:
    if not run.get("rank"):
        return f"{run['method']}, no low-rank path"
    return f"{run['method']} + rank {run['rank']} ({run['lowrank']})"


def _lowrank_table(report: dict) -> str:
    lines = ["| setting | low-rank path | bits per weight | PPL |", "|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {_setting_column(r)} | {_lowrank_row(r)} | {r.get('bits_per_weight', float('nan')):.2f} | "
                     f"{_fmt(r['ppl'])} |")
    return "\n".join(lines)


def _by_method(run: dict) -> str:
    return run["method"]


def _engine_column(run: dict) -> str:
    return f"{_column(run)} ({run.get('engine', 'llmcompressor')})"


# suite -> (heading, the table of its report, the plot it gets), in the order of tables.md
TABLES = {
    "main": ("Main table", lambda r: table(r, _by_method), plot_main),
    "bits": ("Other bit widths", lambda r: table(r, _by_method), plot_main),
    "blocks": ("Block size and ordering", lambda r: table(r, _block_row), plot_blocks),
    "activations": ("Activations (R1+R2 only)", lambda r: table(r, _by_method), None),
    "online": ("Activations with R4", lambda r: table(r, _online_row, _online_column), None),
    "frtq": ("FRTQ at W3A16 g64", lambda r: table(r, _by_method), plot_main),
    "frtq_more": ("FRTQ with activations and per channel", lambda r: table(r, _by_method, _setting_column), None),
    "lowrank": ("The low-rank path", _lowrank_table, None),
    "fp4": ("FP4 formats (llm-compressor presets; round to nearest, or GPTQ where marked)",
            lambda r: table(r, _fp4_row, _fp4_column), None),
    "a4": ("W4A4KV4 decomposed: KV quantizer, R3, activations (W4 g64 asymmetric)",
           lambda r: table(r, _a4_row, _a4_column), None),
    "engines": ("Engines: llm-compressor GPTQ vs gptqmodel GPTQ (Optimum)", lambda r: table(r, _by_method, _engine_column),
                None),
}


# suites run over several calibration draws: suite -> the suite holding its draw 0
DRAWS = {"a4_draws": "a4", "a4_headline": "a4_draws", "sweep": "sweep", "guard": "guard",
         "w3_target": "w3_target"}


def draws_table(out: Path, suite: str, first: str) -> str | None:
    """Mean and spread over the calibration draws of each run of ``suite`` (draw 0 in
    ``<first>.json``, draw N in ``<suite>-seed<N>.json``); None when no draw beyond 0
    exists. Spread: (max - min) / mean."""
    by_draw = _draws(out, suite, first)
    if len(by_draw) < 2 or 0 not in by_draw:
        return None
    fp = json.loads((out / f"{first}.json").read_text())["fp"]["ppl"]
    seeds = sorted(by_draw)
    lines = [f"| run | {' | '.join(f'draw {s}' for s in seeds)} | mean | / float | spread |",
             "|---|" + "---|" * (len(seeds) + 3)]
    for setting in SUITES[suite]():
        key = run_key(setting)
        values = [by_draw[s][key]["ppl"] if key in by_draw[s] else None for s in seeds]
        found = [v for v in values if v is not None]
        if not found:
            continue
        mean = sum(found) / len(found)
        cells = [f"{v:.2f}" if v is not None else "" for v in values]
        spread = f"{100 * (max(found) - min(found)) / mean:.1f}%" if len(found) > 1 else ""
        lines.append(f"| {key} | {' | '.join(cells)} | {mean:.2f} | {mean / fp:.2f}x | {spread} |")
    return "\n".join(lines)


def _draws(out: Path, suite: str, first: str) -> dict[int, dict[str, dict]]:
    """{draw: {run key: run}} for the draws of ``suite`` saved in ``out``."""
    reports = {0: out / f"{first}.json", **{int(p.stem.rsplit("seed", 1)[1]): p for p in out.glob(f"{suite}-seed*.json")}}
    return {seed: {r["recipe"]: r for r in json.loads(p.read_text())["runs"]} for seed, p in sorted(reports.items())
            if p.is_file()}


def versus_table(out: Path, suite: str, first: str, method: str = "frtq", baseline: str = "gsr") -> str | None:
    """``method`` against ``baseline`` with the same quantizers, draw by draw (ratio
    of perplexities), and the verdict: *wins* where every draw of ``method`` is below
    every draw of ``baseline`` (a difference beyond the spread), *loses* where every
    one is above, *ties* otherwise. None with fewer than two draws of any pair."""
    by_draw = _draws(out, suite, first)
    lines = []
    for setting in SUITES[suite]():
        if setting.method != method:
            continue
        key, other = run_key(setting), run_key(dataclasses.replace(setting, method=baseline))
        pairs = [(runs[key]["ppl"], runs[other]["ppl"]) for runs in by_draw.values() if key in runs and other in runs]
        if len(pairs) < 2:
            continue
        ours, theirs = [p[0] for p in pairs], [p[1] for p in pairs]
        verdict = "wins" if max(ours) < min(theirs) else "loses" if min(ours) > max(theirs) else "ties"
        ratios = [a / b for a, b in pairs]
        lines.append(f"| {key} | {' | '.join(f'{r:.3f}' for r in ratios)} | {sum(ratios) / len(ratios):.3f} | "
                     f"{verdict} |")
    if not lines:
        return None
    width = max(line.count("|") for line in lines) - 4
    return "\n".join([f"| run | {' | '.join(f'{method} / {baseline}, draw {i}' for i in range(width))} | mean | "
                      f"beyond the spread |", "|---|" + "---|" * (width + 2), *lines])


def guard_table(out: Path, suite: str, first: str) -> str | None:
    """What FRTQ's guard kept in each run and draw, and the evidence per layer
    (``learned["guard"]`` as recorded by the runs)."""
    lines = []
    for seed, runs in _draws(out, suite, first).items():
        for key, run in runs.items():
            guard = (run.get("learned") or {}).get("guard")
            if not guard:
                continue
            verdicts = [row["verdict"] for row in guard.get("layers", [])]
            counts = ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts)) or "-"
            judged = "GPTQ" if guard.get("quantizer") == "gptq" else "round to nearest"
            lines.append(f"| {key} | {seed} | {judged} | {guard['R1']} | {guard['R1_error']['init']:.5f} | "
                         f"{guard['R1_error']['learned']:.5f} | {len(guard['R2_learned_layers'])} of "
                         f"{guard['R2_layers']} | {counts} |")
    if not lines:
        return None
    return "\n".join(["| run | draw | judged by | R1 kept | R1 held-out error, init | learned | R2 learned | "
                      "evidence per layer |", "|---|---|---|---|---|---|---|---|", *lines])


def tables(out: Path) -> str:
    """tables.md (and the plots) from every suite's saved report in ``out``."""
    parts = []
    for suite, first in DRAWS.items():
        table_text = draws_table(out, suite, first)
        if table_text:
            parts += [f"## {suite}: mean and spread over calibration draws", "", table_text, ""]
        versus = versus_table(out, suite, first)
        if versus:
            parts += [f"## {suite}: FRTQ against GSR, draw by draw", "", versus, ""]
        guarded = guard_table(out, suite, first)
        if guarded:
            parts += [f"## {suite}: FRTQ's guard and evidence", "", guarded, ""]
    for suite, (heading, render, plot) in TABLES.items():
        path = out / f"{suite}.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        parts += [f"## {heading}", "", _protocol(report), "", render(report), ""]
        if plot is not None:
            plot(report, out / f"{suite}.png")
    text = "\n".join(parts)
    (out / "tables.md").write_text(text)
    return text


def cli(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=[*SUITES, "all", "tables"])
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--model", default="default")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0,
                        help="calibration draw (windows of WikiText-2 validation); other than 0: <suite>-seed<N>.json")
    parser.add_argument("--ppl-windows", default=None, help="override: N or 'all' (main: all, others: 20)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--resume", action="store_true", help="keep the runs already in <out>/<suite>.json")
    parser.add_argument("--limit", type=int, default=None, help="only the first N runs of each suite (they are in priority order)")
    args = parser.parse_args(argv)
    if args.suite != "tables":
        for suite in SUITES if args.suite == "all" else [args.suite]:
            run(suite, args)
    print(tables(Path(args.out)))


assert set(MAIN_METHODS) <= set(METHODS)

if __name__ == "__main__":
    cli()
