"""``gsr quantize``: a model and a recipe in, a compressed-tensors checkpoint out.

What a failure leaves (docs/guide.md, "When things go wrong"):

* the output is claimed first (``claim_output``): a lock beside it, so that a second
  run writing the same ``--output`` fails at once naming the first one; leftovers of a
  run that was killed outright (SIGKILL, power loss) are removed then, and said so;
* the checkpoint is built in a hidden sibling directory and renamed into place only
  when everything (oneshot, save, provenance) succeeded (``atomic_directory``), so an
  error, an interrupt (SIGINT; SIGTERM and SIGHUP, which the command raises as
  ``gsr_plugin.cli.faults.Interrupted``) or a full disk never leaves something at
  ``output`` that looks finished.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from gsr_plugin.cli.faults import STOP_SIGNALS, DiskFullError, disk_full
from gsr_plugin.eval.data import IN_DRAWN_ORDER, calibration_windows
from gsr_plugin.eval.models import resolve_model
from gsr_plugin.recipes import resolve_recipe

__all__ = [
    "OutputExistsError",
    "OutputBusyError",
    "quantize",
    "claim_output",
    "atomic_directory",
    "PROVENANCE_FILE",
]

PROVENANCE_FILE = "gsr_quantize.json"


class OutputExistsError(FileExistsError):
    pass


class OutputBusyError(FileExistsError):
    """Another run is writing the same output."""


def _writable(output: Path, overwrite: bool) -> Path:
    """``output``, with its parent made; ``OutputExistsError`` where it exists and
    ``overwrite`` is not set."""
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def _leftovers(output: Path) -> list[Path]:
    """Staging and retired directories of runs on ``output`` (``atomic_directory``'s)."""
    name = glob.escape(output.name)
    return sorted(p for kind in ("partial", "old") for p in output.parent.glob(f".{name}.{kind}-*"))


@contextmanager
def claim_output(output: Path, overwrite: bool = False):
    """Hold ``output`` for this run: refuse an existing one without ``overwrite``
    (``OutputExistsError``) and one another run is writing (``OutputBusyError``,
    with its pid), then remove what killed runs left beside it, saying so. The lock
    is ``.{name}.lock`` beside ``output`` (``flock``: released when the process dies),
    removed when the run ends."""
    import fcntl

    output = _writable(Path(output), overwrite)
    lock = output.parent / f".{output.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputBusyError(
                f"{output} is being written by another gsr quantize (pid {holder}); wait for it to "
                "finish, or choose another --output"
            ) from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break  # still the lock file in place (not one a finishing run just removed)
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    try:
        for stale in _leftovers(output):
            shutil.rmtree(stale, ignore_errors=True)
            print(f"[gsr] removed {stale}, left by a gsr quantize that was killed before it finished",
                  file=sys.stderr, flush=True)
        yield output
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)


def _bytes_in(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@contextmanager
def atomic_directory(output: Path, overwrite: bool = False):
    """Yield a fresh staging directory beside ``output``; on normal exit it replaces
    ``output``, on an exception it is deleted and ``output`` is left as it was.

    An exception leaving here carries ``gsr_during`` (what was going on: writing the
    checkpoint once the staging directory holds files) and ``gsr_left`` (what is at
    ``output``); a full disk becomes ``DiskFullError`` naming the path, the bytes
    written and the bytes free. The final renames run with stop signals held."""
    output = _writable(Path(output), overwrite)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    left = f"the previous {output} is left as it was" if output.exists() else f"nothing was written at {output}"
    try:
        yield staging
    except BaseException as error:
        writing = staging.is_dir() and any(staging.iterdir())
        written = _bytes_in(staging) if writing else 0
        shutil.rmtree(staging, ignore_errors=True)
        if disk_full(error):
            free = shutil.disk_usage(output.parent).free
            raise DiskFullError(
                errno.ENOSPC,
                f"no space left on the device of {output.parent} while writing the checkpoint: it needs more than "
                f"the {written} bytes written before the disk filled ({free} bytes free now that they are "
                f"removed); free space there or choose another --output; {left}",
            ) from error
        error.gsr_during = "while writing the checkpoint" if writing else "during calibration and quantization"
        error.gsr_left = left
        raise
    retired = output.parent / f".{output.name}.old-{os.getpid()}"
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        if output.exists():
            output.rename(retired)
        staging.rename(output)
    finally:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a signal held meanwhile is raised here
        except BaseException as error:
            error.gsr_during, error.gsr_left = "as the checkpoint was finished", f"{output} is complete"
            shutil.rmtree(retired, ignore_errors=True)
            raise
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
    if engine not in ("llmcompressor", "optimum"):
        raise ValueError(f"engine must be 'llmcompressor' or 'optimum', not {engine!r}")
    with claim_output(Path(output), overwrite) as output:  # before any expensive work
        common = dict(calib_samples=calib_samples, calib_len=calib_len, seed=seed, data_dir=data_dir, overwrite=overwrite)
        if engine == "optimum":
            return _quantize_optimum(model, recipe, output, api=api, **common)
        return _quantize_llmcompressor(model, recipe, output, dtype=dtype, **common)


def _quantize_llmcompressor(model, recipe, output, *, calib_samples, calib_len, seed, data_dir, overwrite, dtype) -> Path:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.recipe import Recipe
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
            **IN_DRAWN_ORDER,
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
