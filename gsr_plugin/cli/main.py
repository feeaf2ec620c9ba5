"""The ``gsr`` command: quantize, evaluate and compare rotations on a model.

    gsr quantize --model default --recipe gsr_w4a16_g64_gptq --output out/smollm2-gsr-w4a16
    gsr eval default out/smollm2-gsr-w4a16 --ppl-windows 10 --tasks piqa
    gsr eval out/smollm2-gsr-w4a16 --engine vllm --tasks piqa
    gsr compare --model default --bits 2,3,4 --out docs/compare
    gsr serve-check out/smollm2-gsr-w4a16
    gsr diagnose default --recipe frtq_w4a4kv4_g64_asym_r4_gptq
    gsr recipes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from gsr_plugin.cli.faults import DiskFullError, Interrupted, signal_of, stop_signals_raise
from gsr_plugin.eval.data import DataNotFoundError

__all__ = ["main"]

# errors that are the user's to fix: printed as one line, exit code 2
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, DataNotFoundError, DiskFullError)


_results = sys.stdout  # where results go; main() sends everything else to stderr


def _result(text) -> None:
    """Print a result: stdout holds results only (tables, paths), so it can be piped."""
    print(text, file=_results, flush=True)


def _say(message: str) -> None:
    print(f"[gsr] {message}", file=sys.stderr, flush=True)


def _quiet(verbose: bool) -> None:
    """llm-compressor logs every module at INFO and GPTQ metrics above WARNING; keep
    the console to progress bars and our own lines unless --verbose."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from llmcompressor.logger import LoggerConfig, configure_logger
    from loguru import logger

    configure_logger(LoggerConfig(console_log_level=None))  # keeps the METRIC level defined
    logger.remove()
    logger.add(sys.stderr, level="INFO" if verbose else "ERROR", format="{time:HH:mm:ss} | {level} | {message}")
    if not verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        for name in ("torch.fx._symbolic_trace", "lm-eval", "lm_eval"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=".*save a model with offloaded modules.*")


def _windows(value: str) -> int | None:
    return None if value == "all" else int(value)


def _int_list(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v]


def _group(value: str) -> int | None:
    return None if value in ("channel", "0") else int(value)


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default=None,
        help="directory laid out like shared/data (wikitext2/, piqa/); default $GSR_DATA_DIR, "
        "then shared/data beside the checkout, then the hub",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsr", description="Grouped Sequency-arranged Rotation for llm-compressor")
    parser.add_argument("--verbose", "-v", action="store_true", help="show llm-compressor's logs")
    commands = parser.add_subparsers(dest="command", required=True)

    q = commands.add_parser("quantize", help="apply a recipe and save a compressed-tensors checkpoint")
    q.add_argument("--model", required=True, help="hub id, local directory, or 'default' (SmolLM2-135M-Instruct)")
    q.add_argument("--recipe", required=True, help="YAML file, or a shipped recipe name (see `gsr recipes`)")
    q.add_argument("--output", required=True, help="checkpoint directory (written atomically)")
    q.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    q.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window (default 512)")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("--engine", choices=["llmcompressor", "optimum"], default="llmcompressor",
                   help="llmcompressor (oneshot, compressed-tensors checkpoint) or optimum (the recipe's rotation with "
                   "gsr_plugin.rotate, then gptqmodel's GPTQ at the recipe's grid: a GPTQ checkpoint)")
    q.add_argument("--api", choices=["quantizer", "config"], default="quantizer",
                   help="with --engine optimum: Optimum's GPTQQuantizer, or transformers' GPTQConfig")
    _add_data(q)

    e = commands.add_parser("eval", help="WikiText-2 perplexity and zero-shot accuracy")
    e.add_argument("models", nargs="+", metavar="MODEL_OR_DIR", help="model(s): hub id, directory or 'default'")
    e.add_argument("--ppl-windows", type=_windows, default=None, help="first N windows, 'all' (default; with --engine vllm: 10), 0 to skip")
    e.add_argument("--tasks", default="", help="comma-separated zero-shot tasks (piqa), through lm-evaluation-harness")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--json", default=None, help="write the figures and their settings to this file")
    e.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                   help="vllm: the checkpoint as vLLM serves it (prompt log-probabilities; perplexity on the same windows "
                        "and PIQA), beside transformers' figures, with vLLM's speed and peak memory")
    e.add_argument("--seq-len", type=int, default=2048, help="perplexity window (default 2048)")
    e.add_argument("--no-speed", action="store_true", help="with --engine vllm: skip the prefill and decode timings")
    e.add_argument("--device", choices=["cpu", "cuda"], default=None, help="with --engine vllm: vLLM's platform")
    e.add_argument("--vllm-python", default=None, help="with --engine vllm: python of an environment with vLLM")
    e.add_argument("--timeout", type=float, default=900, help="with --engine vllm: seconds vLLM may take")
    _add_data(e)

    c = commands.add_parser("compare", help="the same GPTQ setting after each rotation: table and plot")
    c.add_argument("--model", default="default")
    c.add_argument("--bits", type=_int_list, default=[2, 3, 4], help="weight bits, e.g. 2,3,4")
    c.add_argument("--methods", default=",".join(_default_methods()), help="comma-separated; see `gsr recipes --methods`")
    c.add_argument("--group-size", type=_group, default=64, help="GPTQ group size, or 'channel' (default 64)")
    c.add_argument("--symmetric", action="store_true", help="symmetric weights (default: asymmetric, as the GSR paper)")
    c.add_argument("--block-size", type=int, default=None, help="rotation block (default: head_dim)")
    c.add_argument("--calib-samples", type=int, default=32)
    c.add_argument("--calib-len", type=int, default=512)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--ppl-windows", type=_windows, default=10, help="first N windows (default 10), or 'all'")
    c.add_argument("--ranks", type=_int_list, default=[0],
                   help="LowRankModifier ranks before GPTQ, e.g. 0,8,16 (0: none); rows per rank")
    c.add_argument("--lowrank", choices=["svd", "activation"], default="svd", help="the low-rank split (with --ranks)")
    c.add_argument("--engines", default="llmcompressor",
                   help="comma-separated: llmcompressor (oneshot's GPTQ), optimum (gsr_plugin.rotate + gptqmodel's GPTQ)")
    c.add_argument("--out", default="compare-out", help="directory for compare.md, compare.png, compare.json")
    _add_data(c)

    s = commands.add_parser("serve-check", help="serve a checkpoint with vLLM and compare with transformers")
    s.add_argument("checkpoint", metavar="DIR")
    s.add_argument("--dtype", default="bfloat16", help="vLLM's dtype (its CPU int4/int8 kernels take bfloat16 or float16)")
    s.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per prompt")
    s.add_argument("--device", choices=["cpu", "cuda"], default=None, help="vLLM's platform (default: cuda if available)")
    s.add_argument("--vllm-python", default=None, help="python of an environment with vLLM (default: scripts/vllm_env.sh)")
    s.add_argument("--json", default=None, help="write the report to this file")
    s.add_argument("--timeout", type=float, default=900, help="seconds vLLM may take before it is stopped (default 900)")
    s.epilog = ("exit status: 0 vLLM agrees with transformers, 1 it disagrees, 2 the checkpoint or the machine "
                "cannot be checked (the reason is printed), 3 vLLM died, 4 vLLM did not answer in time")

    d = commands.add_parser("diagnose", help="grid-to-std ratios and weight errors per layer type, before/after a recipe's rotations")
    d.add_argument("model", metavar="MODEL", help="hub id, local directory, or 'default'")
    d.add_argument("--recipe", default=None, help="YAML file or shipped recipe: its rotations (and its grid) are measured")
    d.add_argument("--samples", type=int, default=4, help="WikiText-2 validation windows measured (default 4)")
    d.add_argument("--seq-len", type=int, default=512)
    d.add_argument("--calib-samples", type=int, default=32, help="calibration windows for learned rotations (default 32)")
    d.add_argument("--weight-bits", type=int, default=4, help="weight grid where the recipe has none (default 4)")
    d.add_argument("--group-size", type=_group, default=64, help="weight group where the recipe has none, or 'channel'")
    d.add_argument("--symmetric", action="store_true", help="symmetric weights where the recipe has no grid")
    d.add_argument("--act-bits", type=int, default=4, help="activation bits where the recipe has none (default 4)")
    d.add_argument("--block-size", type=int, default=None, help="replace the recipe's rotation block (a power of two)")
    d.add_argument("--out", default=None, help="write diagnose.md, diagnose.json, diagnose.png here")
    _add_data(d)

    r = commands.add_parser("recipes", help="list the shipped recipes")
    r.add_argument("--methods", action="store_true", help="list the rotation methods instead")
    return parser


def _default_methods() -> list[str]:
    from gsr_plugin.cli.compare import DEFAULT_METHODS

    return DEFAULT_METHODS


def cmd_quantize(args) -> int:
    from gsr_plugin.cli.quantize import quantize

    _say(f"quantizing {args.model} with {args.recipe} -> {args.output}")
    output = quantize(
        args.model,
        args.recipe,
        args.output,
        calib_samples=args.calib_samples,
        calib_len=args.calib_len,
        seed=args.seed,
        data_dir=args.data_dir,
        overwrite=args.overwrite,
        engine=args.engine,
        api=args.api,
    )
    kind = "GPTQ" if args.engine == "optimum" else "compressed-tensors"
    _say(f"saved {output} ({kind}; recipe.yaml and gsr_quantize.json inside)")
    _say_servability(output, recipe=args.recipe)
    _result(output)
    return 0


def _say_servability(checkpoint, kernels=None, recipe: str | None = None) -> None:
    """Where vLLM serves the checkpoint: this CPU (its kernel build, probed where the
    vLLM environment exists, else predicted), and GPU (by vLLM's rules); where it
    cannot, what serves instead."""
    from gsr_plugin.serving.rules import local_vllm_kernels, served_alternatives, unservable_reasons

    kernels = kernels or local_vllm_kernels()
    cpu, gpu = unservable_reasons(checkpoint, "cpu", kernels), unservable_reasons(checkpoint, "cuda")
    if not cpu:
        _say(f"vLLM can serve it on this CPU ({kernels.describe()}): `vllm serve {checkpoint}`; "
             f"check with `gsr serve-check {checkpoint}`")
        return
    _say(f"vLLM cannot serve this checkpoint on this CPU ({kernels.describe()}):\n  - " + "\n  - ".join(cpu))
    if gpu:
        _say("nor on GPU:\n  - " + "\n  - ".join(gpu))
    else:
        _say("vLLM's GPU kernels take this setting (by vLLM 0.32's rules; not checked on a GPU here)")
    alternatives = served_alternatives(checkpoint, recipe)
    if alternatives:
        _say("what serves instead:\n  - " + "\n  - ".join(alternatives))


def cmd_eval(args) -> int:
    from gsr_plugin.eval.evaluate import evaluate
    from gsr_plugin.eval.models import resolve_model

    tasks = [t for t in args.tasks.split(",") if t]
    if args.engine == "vllm":
        return _eval_served(args, tasks)
    for model in args.models:  # every checkpoint checked before the first is evaluated
        resolve_model(model)
    reports = []
    for model in args.models:
        _say(f"evaluating {model}")
        reports.append(evaluate(model, args.ppl_windows, tasks, args.data_dir, args.limit, args.batch_size,
                                seq_len=args.seq_len))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports if len(reports) > 1 else reports[0], f, indent=2)
            f.write("\n")
    _result(_eval_table(reports, tasks))
    return 0


def _eval_served(args, tasks: list[str]) -> int:
    from gsr_plugin.serving.evaluate import evaluate_served, served_table
    from gsr_plugin.serving.runner import VllmFailed, VllmTimedOut

    device = args.device or _default_device()
    python = Path(args.vllm_python) if args.vllm_python else None
    windows = 10 if args.ppl_windows is None else args.ppl_windows
    if windows == 0:
        raise ValueError("--engine vllm measures perplexity on the served checkpoint: give --ppl-windows 1 or more")
    reports = []
    try:
        for checkpoint in args.models:
            _say(f"serving {checkpoint} with vLLM ({device}) and scoring it with transformers too")
            reports.append(evaluate_served(checkpoint, windows, args.seq_len, tasks, args.limit, args.data_dir,
                                           speed=not args.no_speed, device=device, python=python,
                                           timeout=args.timeout))
    except VllmFailed as error:
        print(f"gsr eval: error: {error}", file=sys.stderr)
        return VLLM_TIMED_OUT if isinstance(error, VllmTimedOut) else VLLM_DIED
    if args.json:
        Path(args.json).write_text(json.dumps(reports if len(reports) > 1 else reports[0], indent=2) + "\n")
    _result(served_table(reports))
    return 0 if all(r["wikitext2"]["agrees"] for r in reports) else 1


def _eval_table(reports: list[dict], tasks: list[str]) -> str:
    head = ["model", "quantization"]
    if any("wikitext2" in r for r in reports):
        w = next(r["wikitext2"] for r in reports if "wikitext2" in r)
        head.append(f"WikiText-2 PPL ({w['windows']}/{w['total_windows']} windows of {w['seq_len']})")
    for task in tasks:
        head += [f"{task} acc", f"{task} acc_norm"]
    rows = []
    for r in reports:
        row = [r["model"], r["quantization"]]
        if "wikitext2" in r:
            row.append(f"{r['wikitext2']['ppl']:.3f}")
        for task in tasks:
            z = r["zero_shot"][task]
            row += [f"{z['acc']:.4f}", f"{z['acc_norm']:.4f}"]
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    limits = {z.get("limit") for r in reports for z in r.get("zero_shot", {}).values()}
    if limits - {None}:
        lines.append(f"(zero-shot on the first {limits.pop()} documents only)")
    return "\n".join(lines)


def cmd_compare(args) -> int:
    from gsr_plugin.cli.compare import CompareSettings, compare

    settings = CompareSettings(
        model=args.model,
        bits=args.bits,
        methods=[m for m in args.methods.split(",") if m],
        group_size=args.group_size,
        symmetric=args.symmetric,
        block_size=args.block_size,
        calib_samples=args.calib_samples,
        calib_len=args.calib_len,
        seed=args.seed,
        ppl_windows=args.ppl_windows,
        data_dir=args.data_dir,
        engines=[e for e in args.engines.split(",") if e],
        ranks=args.ranks,
        lowrank=args.lowrank,
    )
    _say(f"comparing {len(settings.methods)} methods x {len(settings.bits)} bit widths on {settings.model}")
    compare(settings, args.out)
    _result((Path(args.out) / "compare.md").read_text())
    _say(f"wrote {args.out}/compare.md, compare.png, compare.json")
    return 0


VLLM_DIED, VLLM_TIMED_OUT = 3, 4  # serve-check's exit status where vLLM gave no answer


def cmd_serve_check(args) -> int:
    from gsr_plugin.serving.check import serve_check
    from gsr_plugin.serving.runner import VllmFailed, VllmTimedOut

    device = args.device or _default_device()
    _say(f"serving {args.checkpoint} with vLLM ({device}, {args.dtype}) and transformers")
    python = Path(args.vllm_python) if args.vllm_python else None
    try:
        report = serve_check(args.checkpoint, dtype=args.dtype, max_tokens=args.max_tokens, device=device, python=python,
                             timeout=args.timeout)
    except VllmFailed as error:  # not a verdict on the checkpoint: say which failure it was
        print(f"gsr serve-check: error: {error}", file=sys.stderr)
        return VLLM_TIMED_OUT if isinstance(error, VllmTimedOut) else VLLM_DIED
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    _result(report.text())
    return 0 if report.ok else 1


def cmd_diagnose(args) -> int:
    from gsr_plugin.eval.diagnostics import diagnose, tables, write
    from gsr_plugin.learn.frtq import Grid

    _say(f"diagnosing {args.model}" + (f" with the rotations of {args.recipe}" if args.recipe else ""))
    report = diagnose(
        args.model,
        args.recipe,
        samples=args.samples,
        seq_len=args.seq_len,
        data_dir=args.data_dir,
        weight_grid=Grid(args.weight_bits, args.symmetric, args.group_size),
        activation_bits=args.act_bits,
        calib_samples=args.calib_samples,
        block_size=args.block_size,
    )
    _result(tables(report))
    if args.out:
        _say(f"wrote {write(report, args.out)}/diagnose.md, diagnose.json, diagnose.png")
    return 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_recipes(args) -> int:
    from gsr_plugin.recipes import METHODS, recipes_dir

    if args.methods:
        for name, text in METHODS.items():
            _result(f"{name:16s} {text}")
        return 0
    for path in sorted(recipes_dir().glob("*.yaml")):
        first = path.read_text().splitlines()[0].lstrip("# ")
        _result(f"{path.stem:36s} {first.split(': ', 1)[-1]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet(args.verbose)
    handler = {
        "quantize": cmd_quantize,
        "eval": cmd_eval,
        "compare": cmd_compare,
        "serve-check": cmd_serve_check,
        "diagnose": cmd_diagnose,
        "recipes": cmd_recipes,
    }[args.command]
    global _results
    _results = sys.stdout
    try:
        # libraries print progress and banners to stdout (gptqmodel's logger does):
        # while a command runs, their stdout goes to stderr; results use _result
        with contextlib.redirect_stdout(sys.stderr), stop_signals_raise():
            return handler(args)
    except (KeyboardInterrupt, Interrupted) as error:
        stop = signal_of(error)
        during = getattr(error, "gsr_during", "")
        left = getattr(error, "gsr_left", "")
        print(f"gsr {args.command}: interrupted by {stop.name}{' ' + during if during else ''}"
              f"{'; ' + left if left else ''}", file=sys.stderr)
        return 128 + stop
    except USER_ERRORS as error:
        if args.verbose:
            raise
        print(f"gsr {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
