"""gsr_plugin.eval.evaluate: perplexity and PIQA through lm-evaluation-harness, offline,
from the local files; lm-eval's accuracy checked against a direct log-likelihood oracle."""

import json

import pytest
import torch

from gsr_plugin.eval.data import DataNotFoundError, find_data_dir, piqa_validation
from gsr_plugin.eval.evaluate import evaluate, load_model, zero_shot


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def continuation_logprob(model, tokenizer, context, continuation):
    ctx = tokenizer(context).input_ids
    full = tokenizer(context + continuation).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
    return sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full)))


def test_piqa_through_lm_eval_matches_a_loglikelihood_oracle(tiny_checkpoints, small_data, offline):
    model, tokenizer, _ = load_model(str(tiny_checkpoints["llama"]), dtype=torch.float64)
    got = zero_shot(model, tokenizer, ["piqa"], data_dir=small_data, batch_size=4)["piqa"]
    hits = hits_norm = 0
    docs = piqa_validation(small_data)
    for doc in docs:
        context = f"Question: {doc['goal']}\nAnswer:"
        scores = [continuation_logprob(model, tokenizer, context, " " + s) for s in (doc["sol1"], doc["sol2"])]
        normed = [score / len(s) for score, s in zip(scores, (doc["sol1"], doc["sol2"]))]
        hits += int(max(range(2), key=scores.__getitem__) == doc["label"])
        hits_norm += int(max(range(2), key=normed.__getitem__) == doc["label"])
    assert got["acc"] == pytest.approx(hits / len(docs))
    assert got["acc_norm"] == pytest.approx(hits_norm / len(docs))


def test_unknown_task_is_refused(tiny_checkpoints):
    model, tokenizer, _ = load_model(str(tiny_checkpoints["llama"]))
    with pytest.raises(ValueError, match="available: piqa"):
        zero_shot(model, tokenizer, ["hellaswag"])


def test_missing_piqa_with_no_hub_says_where_files_go(tiny_checkpoints, tmp_path, no_hub, offline):
    model, tokenizer, _ = load_model(str(tiny_checkpoints["llama"]))
    with pytest.raises(DataNotFoundError, match="piqa/valid.jsonl"):
        zero_shot(model, tokenizer, ["piqa"], data_dir=tmp_path)


def test_evaluate_report_carries_its_settings(tiny_checkpoints, small_data, tmp_path, offline):
    out = tmp_path / "r.json"
    report = evaluate(str(tiny_checkpoints["qwen3"]), ppl_windows=1, tasks=["piqa"], data_dir=small_data, limit=4, json_path=out)
    assert json.loads(out.read_text()) == report
    assert report["wikitext2"]["windows"] == 1 and report["wikitext2"]["seq_len"] == 2048
    assert report["zero_shot"]["piqa"]["limit"] == 4
    assert report["quantization"] == "none" and report["data_dir"] == str(small_data)


@pytest.mark.skipif(find_data_dir() is None, reason="needs shared/data")
def test_default_model_piqa_is_above_chance(default_model_dir, offline):
    """SmolLM2-135M-Instruct: acc_norm ~0.69 on the first 100 PIQA questions (measured)."""
    model, tokenizer, _ = load_model("default")
    got = zero_shot(model, tokenizer, ["piqa"], limit=100, batch_size=32)["piqa"]
    assert got["acc_norm"] > 0.55, f"acc_norm {got['acc_norm']:.2f} is at chance: the task is wired wrong"
