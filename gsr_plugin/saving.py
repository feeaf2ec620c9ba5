"""Files a modifier writes beside a checkpoint when the model is saved.

llm-compressor's ``oneshot`` saves through ``model.save_pretrained`` (its own wrapper),
and so do users who save later. ``write_beside_checkpoint`` wraps that method once,
so that every save also calls each registered writer with the save directory: FRTQ's
rotations (``frtq/``) and the low-rank adapter (``lora/``). Writers go in
subfolders: vLLM loads every top-level ``*.safetensors`` as weights, and transformers
takes a top-level ``adapter_config.json`` for a PEFT adapter.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch

__all__ = ["ADAPTER_DIR", "write_beside_checkpoint"]

ADAPTER_DIR = "lora"  # LowRankModifier's PEFT adapter, beside the checkpoint


def write_beside_checkpoint(model: torch.nn.Module, name: str, writer: Callable[[Path], object]) -> None:
    """After every ``model.save_pretrained(dir)``, call ``writer(Path(dir))``;
    registering ``name`` again replaces its writer."""
    save = model.save_pretrained
    writers = getattr(save, "_gsr_writers", None)
    if writers is None:
        writers = {}

        @functools.wraps(save)
        def save_pretrained(save_directory, *args, **kwargs):
            result = save(save_directory, *args, **kwargs)
            for write in writers.values():
                write(Path(save_directory))
            return result

        save_pretrained._gsr_writers = writers
        save_pretrained._overridden = getattr(save, "_overridden", False)  # llm-compressor's wrapper stays
        model.save_pretrained = save_pretrained
    writers[name] = writer
