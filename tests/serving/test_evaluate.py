"""gsr_plugin.serving.evaluate (``gsr eval --engine vllm``): its transformers side is
``gsr eval``'s perplexity and lm-evaluation-harness's PIQA, and real vLLM on a 2-layer
cut of the default model agrees with it, where a shifted result does not."""

import copy
import math

import pytest
import torch

from gsr_plugin.cli.main import main
from gsr_plugin.serving.evaluate import evaluate_served, mean_nll, piqa_requests, piqa_scores, token_logprobs


@pytest.fixture(scope="module")
def cut_model(default_model_cut):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_cut, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_model_cut)


def test_the_scored_windows_give_gsr_evals_perplexity(cut_model, small_data):
    from gsr_plugin.eval.data import wikitext2_test_text
    from gsr_plugin.eval.perplexity import perplexity, stream_windows

    model, tokenizer = cut_model
    ids = tokenizer(wikitext2_test_text(small_data), return_tensors="pt").input_ids
    windows = stream_windows(ids.flatten(), 128)[:3].tolist()
    expected = perplexity(model, ids, seq_len=128, max_windows=3, progress=False).ppl
    assert math.exp(mean_nll(token_logprobs(model, windows, progress=False))) == pytest.approx(expected, rel=1e-5)


def test_piqa_is_lm_evaluation_harnesss_piqa(cut_model, small_data):
    """The same acc and acc_norm as ``gsr eval --tasks piqa`` (lm-evaluation-harness)
    on the same model and documents."""
    from gsr_plugin.eval.data import piqa_validation
    from gsr_plugin.eval.evaluate import zero_shot

    model, tokenizer = cut_model
    rows = piqa_validation(small_data)
    requests = piqa_requests(tokenizer, rows)
    mine = piqa_scores(token_logprobs(model, [ids for ids, _ in requests], progress=False), requests, rows)
    harness = zero_shot(model, tokenizer, ["piqa"], data_dir=small_data, batch_size=4)["piqa"]
    assert mine["documents"] == len(rows) == 8
    assert mine["acc"] == pytest.approx(harness["acc"]) and mine["acc_norm"] == pytest.approx(harness["acc_norm"])


def test_piqa_scores_pick_the_likelier_solution():
    rows = [{"sol1": "aa", "sol2": "bbbb", "label": 1}, {"sol1": "a", "sol2": "b", "label": 0}]
    requests = [([0, 1, 2, 3], 2), ([0, 1, 2, 3], 2), ([0, 1, 2], 2), ([0, 1, 2], 2)]
    # continuation log-probs (from index start - 1): -3 vs -4 (-1.5 vs -1.0 per character), -1 vs -2
    logprobs = [[-9.0, -1.0, -2.0], [-9.0, -2.0, -2.0], [-5.0, -1.0], [-5.0, -2.0]]
    scores = piqa_scores(logprobs, requests, rows)
    assert scores == {"acc": 0.5, "acc_norm": 1.0, "documents": 2}


@pytest.fixture(scope="module")
def w8a8(small_gsr_checkpoints):
    """W8A8 serves on both of vLLM's CPU builds (AVX2 and AVX-512)."""
    return small_gsr_checkpoints["gsr_w8a8_gptq"]


def test_served_perplexity_agrees_with_transformers_and_a_shifted_one_does_not(w8a8, small_data, monkeypatch):
    import gsr_plugin.serving.evaluate as served

    report = evaluate_served(w8a8, ppl_windows=2, seq_len=256, tasks=["piqa"], data_dir=small_data, progress=False)
    w = report["wikitext2"]
    assert w["agrees"], w
    assert w["windows"] == 2 and abs(w["nll_difference"]) <= w["allowed"]
    assert report["piqa"]["vllm"]["documents"] == 8
    assert abs(report["piqa"]["vllm"]["acc"] - report["piqa"]["transformers"]["acc"]) <= 1 / 8
    speed = report["speed"]
    assert speed["prefill_tokens_per_second"] > 0 and speed["decode_tokens_per_second"] > 0
    assert report["peak_rss_bytes"] > 2**27  # vLLM with a model: well over 128 MiB

    # the same vLLM result, every log-prob moved by a tenth of a nat: refused
    real = served.run_vllm
    result = {}

    def shifted(*args, **kwargs):
        out = copy.deepcopy(result.setdefault("r", real(*args, **kwargs)))
        out["sequences"] = [[lp - 0.1 for lp in seq] for seq in out["sequences"]]
        return out

    monkeypatch.setattr(served, "run_vllm", shifted)
    moved = evaluate_served(w8a8, ppl_windows=2, seq_len=256, data_dir=small_data, speed=False, progress=False)
    assert not moved["wikitext2"]["agrees"]
    assert moved["wikitext2"]["nll_difference"] == pytest.approx(w["nll_difference"] + 0.1, abs=0.02)


def test_the_command_prints_both_figures(default_model_cut, small_data, tmp_path, capsys, monkeypatch):
    """vLLM stood in for by transformers in bf16: the command's table and json."""
    import json

    import gsr_plugin.serving.evaluate as served

    fake = {"vllm": "0", "sequences": None, "load_seconds": 1.0, "peak_rss_bytes": 2**30,
            "speed": {"prefill_tokens_per_second": 1000.0, "decode_tokens_per_second": 50.0}}

    def from_transformers(checkpoint, dtype, prompts, references, max_tokens, python, timeout, sequences, speed,
                          context):
        from gsr_plugin.loading import load_with_online_transforms

        model = load_with_online_transforms(checkpoint, dtype=torch.bfloat16).eval()
        return {**fake, "sequences": token_logprobs(model, sequences, progress=False)}

    monkeypatch.setattr(served, "run_vllm", lambda *a, **k: from_transformers(*a, **k))
    monkeypatch.setattr(served, "refuse_unservable", lambda *a, **k: None)
    out_json = tmp_path / "served.json"
    code = main(["eval", str(default_model_cut), "--engine", "vllm", "--ppl-windows", "2", "--seq-len", "256",
                 "--data-dir", str(small_data), "--json", str(out_json), "--vllm-python", "unused"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "| vLLM PPL | transformers PPL |" in text and "| yes |" in text and "| 1000 | 50.0 | 1024 |" in text
    assert json.loads(out_json.read_text())["wikitext2"]["agrees"] is True


def test_unservable_checkpoint_is_refused_before_anything_loads(tmp_path, monkeypatch, capsys):
    from serving.test_rules import W4G64, checkpoint, kernels_of

    import gsr_plugin.serving.evaluate as served

    monkeypatch.setattr(served, "run_vllm", lambda *a, **k: pytest.fail("vLLM started"))
    monkeypatch.setattr("gsr_plugin.serving.rules.probe_vllm_kernels", lambda python=None: kernels_of("_C"))
    ckpt = checkpoint(tmp_path, dict(W4G64, num_bits=3))
    assert main(["eval", str(ckpt), "--engine", "vllm", "--vllm-python", "unused"]) == 2
    err = capsys.readouterr().err
    assert "cannot serve" in err and "3-bit weights" in err
