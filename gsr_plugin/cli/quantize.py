"""``gsr quantize``: a model and a recipe in, a compressed-tensors checkpoint out,
written atomically: the checkpoint is built in a hidden sibling directory and renamed
into place only when everything (oneshot, save, provenance) succeeded, so a failure
never leaves something at ``output`` that looks like a finished checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from gsr_plugin.eval.data import calibration_windows
from gsr_plugin.eval.models import resolve_model
from gsr_plugin.recipes import resolve_recipe

__all__ = ["OutputExistsError", "quantize", "atomic_directory", "PROVENANCE_FILE"]

PROVENANCE_FILE = "gsr_quantize.json"


class OutputExistsError(FileExistsError):
    pass


@contextmanager
def atomic_directory(output: Path, overwrite: bool = False):
    """Yield a fresh staging directory beside ``output``; on normal exit it replaces
    ``output``, on an exception it is deleted and ``output`` is left as it was."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = output.parent / f".{output.name}.old-{os.getpid()}"
    if output.exists():
        output.rename(retired)
    staging.rename(output)
    shutil.rmtree(retired, ignore_errors=True)


def quantize(
    model: str,
    recipe: str,
    output: str | Path,
    *,
    calib_samples: int = 32,
    calib_len: int = 512,
    seed: int = 0,
    data_dir: str | None = None,
    overwrite: bool = False,
    dtype: str = "auto",
    engine: str = "llmcompressor",
    api: str = "quantizer",
) -> Path:
    """Apply ``recipe`` (a YAML path or a shipped recipe name) to ``model`` with
    WikiText-2 validation windows for calibration, and save the checkpoint, its
    tokenizer, ``recipe.yaml`` and ``gsr_quantize.json`` (the settings) at ``output``.

    ``engine="optimum"`` runs the recipe's rotation with ``gsr_plugin.rotate`` and its
    GPTQ grid with gptqmodel through Optimum (``api``: ``quantizer`` for
    ``GPTQQuantizer``, ``config`` for transformers' ``GPTQConfig``), and saves a GPTQ
    checkpoint (``gsr_plugin.engines.optimum``)."""
    if engine == "optimum":
        return _quantize_optimum(model, recipe, output, calib_samples=calib_samples, calib_len=calib_len, seed=seed,
                                 data_dir=data_dir, overwrite=overwrite, api=api)
    if engine != "llmcompressor":
        raise ValueError(f"engine must be 'llmcompressor' or 'optimum', not {engine!r}")
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.recipe import Recipe
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = Path(output)
    if output.exists() and not overwrite:  # before any expensive work
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")
    recipe_path = resolve_recipe(recipe)
    modifiers = Recipe.create_instance(str(recipe_path)).modifiers  # fails fast on a bad recipe
    needs_data = any(m.requires_calibration_data for m in modifiers)
    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = None
    if needs_data:
        windows = calibration_windows(tokenizer, calib_samples, calib_len, seed, data_dir)
        dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)

    with atomic_directory(output, overwrite) as staging:
        start = time.perf_counter()
        oneshot(
            model=loaded,
            processor=tokenizer,
            dataset=dataset,
            recipe=str(recipe_path),
            num_calibration_samples=calib_samples,
            max_seq_length=calib_len,
            output_dir=str(staging),
            save_compressed=True,
        )
        provenance = {
            "model": model,
            "model_path": str(path),
            "recipe": str(recipe_path),
            "calibration": (
                {"data": "wikitext2 validation", "samples": calib_samples, "seq_len": calib_len, "seed": seed}
                if needs_data
                else None
            ),
            "seconds": round(time.perf_counter() - start, 1),
            "versions": _versions(),
        }
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return output


def _quantize_optimum(model, recipe, output, *, calib_samples, calib_len, seed, data_dir, overwrite, api) -> Path:
    from transformers import AutoTokenizer

    from gsr_plugin.engines.optimum import quantize_optimum, recipe_for_optimum, save_gptq

    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")
    recipe_path = resolve_recipe(recipe)
    rotations, settings = recipe_for_optimum(str(recipe_path))  # refuses before any work
    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = calibration_windows(tokenizer, calib_samples, calib_len, seed, data_dir)
    with atomic_directory(output, overwrite) as staging:
        start = time.perf_counter()
        quantized, quantizer = quantize_optimum(path, tokenizer, windows, settings, rotations, api=api)
        save_gptq(quantized, quantizer, staging, tokenizer)
        shutil.copyfile(recipe_path, staging / "recipe.yaml")
        provenance = {
            "model": model,
            "model_path": str(path),
            "recipe": str(recipe_path),
            "engine": f"optimum ({'GPTQQuantizer' if api == 'quantizer' else 'GPTQConfig'}, gptqmodel)",
            "gptq": settings.describe(),
            "calibration": {"data": "wikitext2 validation", "samples": calib_samples, "seq_len": calib_len, "seed": seed},
            "seconds": round(time.perf_counter() - start, 1),
            "versions": _versions(),
        }
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return output


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("gsr-plugin", "llmcompressor", "compressed-tensors", "transformers", "torch", "optimum", "gptqmodel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
