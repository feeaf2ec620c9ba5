"""Check a saved checkpoint's files before any model code reads them.

transformers, PEFT and vLLM fail deep inside on a damaged or mismatched checkpoint (a
hub-client error for a path that does not exist, a tokenizer error for an empty
directory, a shape error halfway through loading), or, worse, load it wrongly without a
word (PEFT drops adapter weights it finds no module for). ``check_checkpoint`` reads
only the files: ``config.json``, the safetensors headers (and every shard an index
lists), the transforms recorded in ``quantization_config.transform_config``, and the
low-rank adapter in ``lora/``. What is wrong comes back as ``CheckpointError`` (a
``ValueError``) naming the file, what is wrong, and the fix.

Shapes come from the model built on the ``meta`` device from ``config.json`` (no
weights, no memory), so every format (dense, packed int4, GPTQ) is checked the same way.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch

from gsr_plugin.saving import ADAPTER_DIR

__all__ = ["CheckpointError", "check_checkpoint", "check_adapter", "looks_like_path", "meta_model"]

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers
REDO = "quantize it again (or copy it again from where it was made)"


class CheckpointError(ValueError):
    """A checkpoint whose files are missing, damaged or do not belong together."""


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (``org/name``)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or name.endswith("/")


def check_checkpoint(path: str | Path) -> dict:
    """Check a checkpoint directory's files; return its ``config.json``.

    :raises FileNotFoundError: ``path`` does not exist
    :raises CheckpointError: anything else that would fail later (or load wrongly)
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the checkpoint's directory (the one holding config.json)")
    config_file = path / "config.json"
    if not config_file.is_file():
        present = sorted(p.name for p in path.iterdir())[:6]
        raise CheckpointError(
            f"{path} has no config.json, so it is not a transformers checkpoint "
            f"({'it is empty' if not present else 'it holds ' + ', '.join(present)}). An interrupted "
            "`gsr quantize` leaves nothing at its --output: run it again"
        )
    config = _read_json(config_file, "config.json")
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{config_file} has no model_type: not a transformers model config; {REDO}")
    for file in _weight_files(path):
        _check_safetensors(file)
    _check_transforms(path, config)
    if (path / ADAPTER_DIR).exists():
        check_adapter(path, config)
    return config


def _first(names: list[str], count: int = 3) -> str:
    return ", ".join(names[:count]) + (" ..." if len(names) > count else "")


def _read_json(file: Path, what: str):
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON ({error}): the {what} is damaged; {REDO}") from None


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of the checkpoint (every shard of an index, which must all
    be there); ``CheckpointError`` where there are no weights at all."""
    for name in INDEX_FILES:
        index_file = path / name
        if index_file.is_file():
            index = _read_json(index_file, "shard index")
            shards = sorted(set((index.get("weight_map") or {}).values()))
            if not shards:
                raise CheckpointError(f"{index_file} lists no shards (no weight_map); {REDO}")
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(
                    f"{path} is missing {len(missing)} of the {len(shards)} shards {index_file.name} lists: "
                    f"{_first(missing)}; copy them too, or {REDO}"
                )
            return [path / s for s in shards if s.endswith(".safetensors")]
    for name in SINGLE_FILES:
        if (path / name).is_file():
            return [path / name] if name.endswith(".safetensors") else []
    raise CheckpointError(
        f"{path} has config.json but no weights ({' or '.join(SINGLE_FILES + INDEX_FILES[:1])}); {REDO}"
    )


def _check_safetensors(file: Path) -> dict:
    """The header of a safetensors file, checked against the file's size: an 8-byte
    little-endian header length, the JSON header, then exactly the bytes it describes."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or length > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{file} is not a readable safetensors file ({size} bytes, "
                f"{'too short for a header' if length is None else f'a header length field of {length}'}): "
                f"it is damaged; {REDO}"
            )
        if length > size - 8:
            raise CheckpointError(f"{file} is truncated: {size} bytes, shorter than its own header ({8 + length}); {REDO}")
        try:
            header = json.loads(f.read(length))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, IndexError):
            raise CheckpointError(f"{file} has a damaged safetensors header (not the JSON it should be); {REDO}") from None
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        how = "truncated" if size < expected else "longer than its header describes"
        raise CheckpointError(f"{file} is {how}: {size} bytes, its header describes {expected}; {REDO}")
    return header


def _safetensors_header(file: Path) -> dict:
    return {k: v for k, v in _check_safetensors(file).items() if k != "__metadata__"}


def meta_model(config: dict) -> torch.nn.Module:
    """The model ``config`` describes, on the meta device (shapes only, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("quantization_config", "transformers_version")}
    model_type = fields.pop("model_type")
    try:
        model_config = AutoConfig.for_model(model_type, **fields)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"config.json describes no model transformers can build ({model_type!r}): {error}") from None


def _check_transforms(path: Path, config: dict) -> None:
    """Every transform recorded in ``quantization_config.transform_config`` is of a
    known type, targets modules of this model, and has blocks dividing the widths it
    rotates. An empty or absent ``transform_config`` is a checkpoint without rotations."""
    from compressed_tensors.transform import TransformConfig, TransformFactory
    from compressed_tensors.utils import match_named_modules
    from pydantic import ValidationError

    from gsr_plugin.transform import register_transform_types
    from gsr_plugin.rotation import transformed_size

    where = f"{path / 'config.json'}: quantization_config.transform_config"
    recorded = (config.get("quantization_config") or {}).get("transform_config")
    if not recorded or not recorded.get("config_groups"):
        return
    try:
        transforms = TransformConfig.model_validate(recorded)
    except ValidationError as error:
        raise CheckpointError(f"{where} is malformed: {error.errors()[0]['msg']} at {error.errors()[0]['loc']}; {REDO}") from None
    register_transform_types()  # this package's types, if nothing imported them yet
    known = set(TransformFactory.registered_names())
    for name, scheme in transforms.config_groups.items():
        if scheme.type not in known:
            raise CheckpointError(
                f"{where}.config_groups.{name} has type {scheme.type!r}, which no installed transform provides "
                f"(known: {', '.join(sorted(known))}); install the package that wrote it, or {REDO}"
            )
    model = meta_model(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    for name, scheme in transforms.config_groups.items():
        for args in scheme.apply:
            matched = list(match_named_modules(model, args.targets, args.ignore))
            if not matched:
                raise CheckpointError(
                    f"{where}.config_groups.{name} targets {args.targets}, which match no module of this "
                    f"{config['model_type']} model; the config does not belong to these weights; {REDO}"
                )
            if scheme.head_dim is None:
                continue
            for module_name, module in matched:
                location = str(getattr(args.location, "value", args.location))
                width = head_dim if location in ("q_attn", "k_cache") else transformed_size(module, location)
                if width % scheme.head_dim:
                    raise CheckpointError(
                        f"{where}.config_groups.{name} has blocks of {scheme.head_dim}, which do not divide the "
                        f"width {width} of {module_name} ({location}); the config does not belong to these "
                        f"weights; {REDO}"
                    )


def _peft_matches(name: str, key: str) -> bool:
    """PEFT's rule for a module name against a ``target_modules``/``rank_pattern`` key."""
    return name == key or name.endswith("." + key)


def check_adapter(path: str | Path, config: dict | None = None) -> None:
    """The PEFT LoRA adapter in ``path/lora`` fits the checkpoint: its ranks are the
    ones its config declares, each factor's shape fits its module (``lora_A``:
    ``(r, in)``, ``lora_B``: ``(out, r)``), it has weights for every module it targets
    and for no module the model lacks (PEFT would drop those without a word)."""
    path = Path(path)
    adapter = path / ADAPTER_DIR
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{adapter} has no adapter_config.json: not a PEFT adapter; remove the folder or {REDO}")
    lora = _read_json(config_file, "adapter config")
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{adapter} has no adapter_model.safetensors; {REDO}")
    header = _safetensors_header(weights)
    config = config if config is not None else _read_json(path / "config.json", "config.json")
    linears = {n: m for n, m in meta_model(config).named_modules() if isinstance(m, torch.nn.Linear)}
    default_rank, pattern = int(lora.get("r", 8)), lora.get("rank_pattern") or {}
    found: dict[str, dict[str, list[int]]] = {}
    for key, info in header.items():
        parts = key.removeprefix("base_model.model.").rsplit(".", 2)
        if len(parts) != 3 or parts[1] not in ("lora_A", "lora_B"):
            continue
        found.setdefault(parts[0], {})[parts[1]] = info["shape"]
    stray = sorted(set(found) - set(linears))
    if stray:
        raise CheckpointError(
            f"{weights} has weights for {len(stray)} module(s) this checkpoint does not have "
            f"({_first(stray)}); PEFT would drop them silently. "
            f"The adapter belongs to another model; {REDO}"
        )
    for name, shapes in sorted(found.items()):
        module = linears[name]
        rank = int(next((r for p, r in pattern.items() if _peft_matches(name, p)), default_rank))
        want = {"lora_A": [rank, module.in_features], "lora_B": [module.out_features, rank]}
        for part in ("lora_A", "lora_B"):
            if part not in shapes:
                raise CheckpointError(f"{weights} has no {name}.{part}, only its other factor; {REDO}")
            if list(shapes[part]) != want[part]:
                raise CheckpointError(
                    f"{weights}: {name}.{part} has shape {tuple(shapes[part])}, and this checkpoint needs "
                    f"{tuple(want[part])} (rank {rank} from {config_file.name}, {name} is "
                    f"{module.in_features} -> {module.out_features}); the adapter does not belong to these weights; {REDO}"
                )
    targets = lora.get("target_modules") or []
    if isinstance(targets, str):  # PEFT: a string is a regular expression on the full name
        targeted = [n for n in linears if re.fullmatch(targets, n)]
    else:
        targeted = [n for n in linears if any(_peft_matches(n, t) for t in targets)]
    without = sorted(set(targeted) - set(found))
    if without:
        raise CheckpointError(
            f"{config_file} targets {len(without)} module(s) that {weights.name} has no weights for "
            f"({_first(without)}): PEFT would attach untrained "
            f"factors there. The adapter does not belong to these weights; {REDO}"
        )
