"""``gsr eval``: WikiText-2 perplexity and zero-shot accuracy of a model or a saved
(compressed-tensors) checkpoint, with the settings that produced each figure."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from gsr_plugin.eval.data import find_data_dir, wikitext2_test_text
from gsr_plugin.eval.models import resolve_model
from gsr_plugin.eval.perplexity import perplexity

__all__ = ["TASKS", "load_model", "evaluate", "zero_shot", "wikitext2_perplexity"]

LM_EVAL_TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
# our task names -> the lm-eval task that reads the local files
TASKS = {"piqa": "piqa_local"}


def load_model(model_or_dir: str, dtype: str | torch.dtype = "auto"):
    """(model, tokenizer, resolved path); compressed-tensors checkpoints are
    decompressed by transformers on load, and their online transforms (R3, R4), which
    transformers drops, are put back by ``gsr_plugin.loading``."""
    from transformers import AutoTokenizer

    from gsr_plugin.loading import load_with_online_transforms

    path = resolve_model(model_or_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_with_online_transforms(path, dtype=dtype)
    model.eval()
    return model, tokenizer, path


def wikitext2_perplexity(model, tokenizer, windows: int | None = None, seq_len: int = 2048, data_dir=None):
    ids = tokenizer(wikitext2_test_text(data_dir), return_tensors="pt").input_ids
    return perplexity(model, ids, seq_len=seq_len, max_windows=windows)


def zero_shot(
    model,
    tokenizer,
    tasks: list[str],
    data_dir=None,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, dict]:
    """Accuracy through lm-evaluation-harness, with task definitions that read the
    local data directory (``gsr_plugin/eval/lm_eval_tasks``)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; available: {', '.join(TASKS)}")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    root = find_data_dir(data_dir)
    metadata = {"data_dir": str(root)} if root is not None else {}
    manager = TaskManager(include_path=str(LM_EVAL_TASKS_DIR), include_defaults=False, metadata=metadata)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    results = simple_evaluate(
        model=lm,
        tasks=[TASKS[t] for t in tasks],
        task_manager=manager,
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
    )["results"]
    out = {}
    for task in tasks:
        metrics = results[TASKS[task]]
        out[task] = {
            "acc": metrics["acc,none"],
            "acc_norm": metrics["acc_norm,none"],
            "limit": limit,
        }
    return out


def evaluate(
    model_or_dir: str,
    ppl_windows: int | None = None,
    tasks: list[str] = (),
    data_dir=None,
    limit: int | None = None,
    batch_size: int = 16,
    json_path: str | Path | None = None,
    seq_len: int = 2048,
) -> dict:
    """Perplexity (``ppl_windows``: the first N windows of ``seq_len``, None = all) and ``tasks``;
    the result, with its settings, also goes to ``json_path``."""
    start = time.perf_counter()
    model, tokenizer, path = load_model(model_or_dir)
    report = {
        "model": model_or_dir,
        "path": str(path),
        "dtype": str(next(model.parameters()).dtype),
        "quantization": _quantization_summary(path),
        "data_dir": str(find_data_dir(data_dir) or "hub"),
    }
    if ppl_windows != 0:
        report["wikitext2"] = wikitext2_perplexity(model, tokenizer, ppl_windows, seq_len, data_dir=data_dir).to_dict()
    if tasks:
        report["zero_shot"] = zero_shot(model, tokenizer, list(tasks), data_dir, limit, batch_size)
    report["seconds"] = round(time.perf_counter() - start, 1)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _quantization_summary(path: str) -> str:
    config = Path(path) / "config.json"
    if not config.is_file():
        return "unknown"
    full = json.loads(config.read_text())
    qconfig = full.get("quantization_config")
    if not qconfig:
        return "none"
    if qconfig.get("quant_method") == "gptq":
        group = qconfig.get("group_size", -1)
        text = f"gptq w{qconfig.get('bits')}{'' if qconfig.get('sym', True) else ' asym'} "
        text += f"g{group}" if group and group > 0 else "per-channel"
        rotation = full.get("gsr_rotation") or (qconfig.get("meta") or {}).get("gsr_rotation")
        if rotation:
            text += f" + {rotation.get('modifier', 'rotation')} {rotation.get('ordering', '')}".rstrip()
        return text
    groups = qconfig.get("config_groups") or {}
    parts = [] if groups else ["none"]
    for group in groups.values():
        w = group.get("weights") or {}
        a = group.get("input_activations") or {}
        size = w.get("group_size")
        text = f"w{w.get('num_bits')}" + ("" if w.get("symmetric", True) else " asym")
        text += f" g{size}" if size else " per-channel"
        if a:
            text += f" a{a.get('num_bits')} {'dynamic' if a.get('dynamic') else 'static'}"
        parts.append(text)
    transforms = sorted({g["type"] for g in ((qconfig.get("transform_config") or {}).get("config_groups") or {}).values()})
    return ", ".join(parts) + (f" + {'/'.join(transforms)} rotations" if transforms else "")
