"""gsr_plugin.eval.data: data directory resolution, the canonical stream, calibration
windows, and the error when neither files nor hub are there."""

import hashlib

import pytest
import torch

from conftest import byte_tokenizer
from gsr_plugin.eval import data
from gsr_plugin.eval.data import (
    WIKITEXT2_TEST_STREAM_SHA256,
    DataNotFoundError,
    calibration_windows,
    find_data_dir,
    wikitext2_test_rows,
    wikitext2_test_text,
    piqa_validation,
    wikitext2_validation_text,
)


def test_explicit_dir_beats_the_environment(small_data, tmp_path_factory, monkeypatch):
    other = tmp_path_factory.mktemp("other")
    monkeypatch.setenv("GSR_DATA_DIR", str(other))
    assert find_data_dir(small_data) == small_data
    assert find_data_dir() == other


def test_a_data_dir_that_does_not_exist_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        find_data_dir(tmp_path / "nope")
    monkeypatch.setenv("GSR_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(DataNotFoundError, match="GSR_DATA_DIR"):
        find_data_dir()


def test_rows_and_stream_come_from_the_directory(small_data):
    assert wikitext2_test_rows(small_data)[1] == " = Title = "
    assert wikitext2_test_text(small_data).startswith("\n\n = Title = \n\n\n\n Some text .  Some")


def test_a_non_canonical_stream_is_warned_about(small_data):
    from loguru import logger

    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        wikitext2_test_text(small_data)
    finally:
        logger.remove(sink)
    assert any("not comparable" in m for m in messages)


def test_missing_files_and_no_hub_say_where_the_files_go(tmp_path, no_hub):
    with pytest.raises(DataNotFoundError, match=r"wikitext2/test_rows.json.*GSR_DATA_DIR.*hub unreachable"):
        wikitext2_test_rows(tmp_path)
    with pytest.raises(DataNotFoundError, match=r"wikitext2/valid.tokens"):
        wikitext2_validation_text(tmp_path)
    with pytest.raises(DataNotFoundError, match=r"piqa/valid.jsonl"):
        piqa_validation(tmp_path)


def test_hub_is_used_when_the_files_are_missing(tmp_path, monkeypatch):
    calls = []

    def fake_hub(path, name, split):
        calls.append((path, name, split))
        return {"text": ["", " hub row "]}

    monkeypatch.setattr(data, "_hub", fake_hub)
    assert wikitext2_test_rows(tmp_path) == ["", " hub row "]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test")]


def test_piqa_rows_join_questions_and_labels(small_data, tmp_path):
    rows = piqa_validation(small_data)
    assert len(rows) == 8 and rows[1] == {
        "goal": "How do I open jar 1?", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 1
    }
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text((small_data / "piqa" / "valid.jsonl").read_text())
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(ValueError, match="8 questions but 2 labels"):
        piqa_validation(tmp_path)


def test_calibration_windows_are_seeded_slices_of_the_validation_text(small_data):
    tokenizer = byte_tokenizer()
    ids = tokenizer(wikitext2_validation_text(small_data), return_tensors="pt").input_ids[0]
    windows = calibration_windows(tokenizer, 6, 20, seed=3, data_dir=small_data)
    assert windows.shape == (6, 20)
    assert torch.equal(windows, calibration_windows(tokenizer, 6, 20, seed=3, data_dir=small_data))
    assert not torch.equal(windows, calibration_windows(tokenizer, 6, 20, seed=4, data_dir=small_data))
    text = ids.tolist()
    for window in windows.tolist():
        assert any(text[s : s + 20] == window for s in range(len(text) - 19))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        calibration_windows(tokenizer, 1, 10_000, data_dir=small_data)


shared = find_data_dir()
has_shared = shared is not None and (shared / "wikitext2" / "test_rows.json").is_file()


@pytest.mark.skipif(not has_shared, reason="no shared/data beside this checkout")
def test_shared_test_rows_are_the_canonical_stream():
    rows = wikitext2_test_rows()
    assert len(rows) == 4358
    digest = hashlib.sha256("\n\n".join(rows).encode()).hexdigest()
    assert digest == WIKITEXT2_TEST_STREAM_SHA256
