"""Evaluation and calibration text: WikiText-2 (and PIQA), read from a data
directory laid out like the project's ``shared/data``, or from the hub.

Layout of a data directory::

    wikitext2/test_rows.json   WikiText-2 raw test split, one JSON string per row
    wikitext2/valid.tokens     WikiText-2 validation split (calibration)
    piqa/valid.jsonl           PIQA validation questions
    piqa/valid-labels.lst      PIQA validation labels

Where it is found: the ``data_dir`` argument, else ``$GSR_DATA_DIR``, else the first of
``./shared/data``, ``../shared/data`` and the ``shared/data`` beside this project's
checkout that exists. Missing files fall back to the hub (``wikitext`` /
``wikitext-2-raw-v1``, ``piqa``) through ``datasets`` when it is reachable.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from loguru import logger

__all__ = [
    "DataNotFoundError",
    "find_data_dir",
    "wikitext2_test_rows",
    "wikitext2_test_text",
    "wikitext2_validation_text",
    "calibration_windows",
    "piqa_validation",
    "WIKITEXT2_TEST_STREAM_SHA256",
]

# sha256 of "\n\n".join(test rows): the stream GPTQ, QuaRot, SpinQuant and GSR measure.
WIKITEXT2_TEST_STREAM_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"
_TEST_ROWS = "wikitext2/test_rows.json"
_VALID_TOKENS = "wikitext2/valid.tokens"
_PIQA = "piqa/valid.jsonl"
_PIQA_LABELS = "piqa/valid-labels.lst"


class DataNotFoundError(FileNotFoundError):
    """Raised with the place the files go when neither a data directory nor the hub
    has them."""


def _candidates() -> list[Path]:
    project = Path(__file__).resolve().parents[2]
    return [Path("shared/data"), Path("../shared/data"), project.parent / "shared" / "data"]


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data directory in use, or None when there is none (hub only)."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise DataNotFoundError(f"data directory {path} does not exist")
        return path
    if os.environ.get("GSR_DATA_DIR"):
        path = Path(os.environ["GSR_DATA_DIR"]).expanduser()
        if not path.is_dir():
            raise DataNotFoundError(f"GSR_DATA_DIR={path} is not a directory")
        return path
    return next((p.resolve() for p in _candidates() if p.is_dir()), None)


def _missing(what: str, relative: str, data_dir: Path | None, hub_error: Exception) -> DataNotFoundError:
    where = data_dir / relative if data_dir else f"<data dir>/{relative}"
    return DataNotFoundError(
        f"{what} not found: put it at {where} (set GSR_DATA_DIR or --data-dir to the "
        f"directory that holds {relative.split('/')[0]}/), or make the Hugging Face hub "
        f"reachable. Hub error: {type(hub_error).__name__}: {str(hub_error)[:200]}"
    )


def wikitext2_test_rows(data_dir: str | os.PathLike | None = None) -> list[str]:
    """WikiText-2 raw test rows, exactly as the hub's ``wikitext-2-raw-v1`` yields them."""
    root = find_data_dir(data_dir)
    if root is not None and (root / _TEST_ROWS).is_file():
        return json.loads((root / _TEST_ROWS).read_text(encoding="utf-8"))
    try:
        return list(_hub("wikitext", "wikitext-2-raw-v1", "test")["text"])
    except Exception as error:  # no hub: say where the file goes
        raise _missing("WikiText-2 test rows", _TEST_ROWS, root, error) from error


def wikitext2_test_text(data_dir: str | os.PathLike | None = None) -> str:
    """``"\\n\\n".join(rows)``: the canonical perplexity stream (sha256 checked)."""
    text = "\n\n".join(wikitext2_test_rows(data_dir))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != WIKITEXT2_TEST_STREAM_SHA256:
        logger.warning(
            f"WikiText-2 test stream has sha256 {digest[:12]}..., not the canonical "
            f"{WIKITEXT2_TEST_STREAM_SHA256[:12]}...: perplexities are not comparable"
        )
    return text


def wikitext2_validation_text(data_dir: str | os.PathLike | None = None) -> str:
    """WikiText-2 validation split (for calibration; disjoint from the test split)."""
    root = find_data_dir(data_dir)
    if root is not None and (root / _VALID_TOKENS).is_file():
        return (root / _VALID_TOKENS).read_text(encoding="utf-8")
    try:
        return "".join(_hub("wikitext", "wikitext-2-v1", "validation")["text"])
    except Exception as error:
        raise _missing("WikiText-2 validation text", _VALID_TOKENS, root, error) from error


# oneshot keyword arguments that feed ``calibration_windows`` to GPTQ in the drawn order:
# llm-compressor's default shuffle draws the order from torch's global RNG, so whatever ran
# before in the process changed GPTQ's Hessian sums, and with them the weights.
IN_DRAWN_ORDER = {"shuffle_calibration_samples": False}


def calibration_windows(
    tokenizer,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """``num_samples`` random windows of ``seq_len`` tokens of the validation text,
    drawn with ``seed`` (shape num_samples x seq_len). Pass ``IN_DRAWN_ORDER`` to
    ``oneshot`` with them, so that the seed alone decides the checkpoint."""
    ids = tokenizer(wikitext2_validation_text(data_dir), return_tensors="pt").input_ids[0]
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seq_len {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def piqa_validation(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """PIQA validation as ``{"goal", "sol1", "sol2", "label"}`` rows (1838)."""
    root = find_data_dir(data_dir)
    if root is not None and (root / _PIQA).is_file() and (root / _PIQA_LABELS).is_file():
        questions = [json.loads(line) for line in (root / _PIQA).read_text(encoding="utf-8").splitlines() if line.strip()]
        labels = [int(x) for x in (root / _PIQA_LABELS).read_text().split()]
        if len(questions) != len(labels):
            raise ValueError(f"{root / _PIQA} has {len(questions)} questions but {len(labels)} labels")
        return [
            {"goal": q["goal"], "sol1": q["sol1"], "sol2": q["sol2"], "label": label}
            for q, label in zip(questions, labels)
        ]
    try:
        rows = _hub("piqa", None, "validation")
        return [{k: row[k] for k in ("goal", "sol1", "sol2", "label")} for row in rows]
    except Exception as error:
        raise _missing("PIQA validation (questions and labels)", _PIQA, root, error) from error


def _hub(path: str, name: str | None, split: str):
    from datasets import load_dataset

    return load_dataset(path, name, split=split)
