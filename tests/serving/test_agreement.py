"""gsr_plugin.serving.agreement: the comparison of vLLM's outputs with transformers' (synthetic outputs)."""

import pytest

from gsr_plugin.serving.agreement import Tolerance, compare_outputs



def synthetic(shift=0.0, noise=0.02, greedy_gap=None):
    base = [-1.0, -2.0, -0.5, -3.0]
    vllm = {
        "references": [{"logprobs": [x + shift for x in base]}],
        "generations": [{"ids": [5, 6, 7], "text": "x"}],
    }
    steps = [{"top": 5, "top_logprob": -0.1, "vllm_logprob": -0.1}, {"top": 6, "top_logprob": -0.2, "vllm_logprob": -0.2}]
    if greedy_gap is not None:
        steps.append({"top": 9, "top_logprob": -0.3, "vllm_logprob": -0.3 - greedy_gap})
    else:
        steps.append({"top": 7, "top_logprob": -0.3, "vllm_logprob": -0.3})
    hf = {"references": [base], "noise": [[x + noise for x in base]], "generations": [{"ids": [5, 6], "steps": steps}]}
    return vllm, hf


def test_agreement_within_the_dtype_noise_passes():
    prompts, refs = compare_outputs(*synthetic(shift=0.03), Tolerance(), prompts=["p"])
    assert refs[0]["ok"] and prompts[0]["ok"] and prompts[0]["equal"] == 3


def test_logprob_shift_beyond_the_noise_fails():
    _, refs = compare_outputs(*synthetic(shift=1.0), Tolerance(), prompts=["p"])
    assert not refs[0]["ok"]
    assert refs[0]["allowed_max"] == pytest.approx(0.05)  # 2 x 0.02 noise, floored at 0.05


def test_greedy_divergence_is_a_tie_only_below_the_allowed_gap():
    prompts, _ = compare_outputs(*synthetic(greedy_gap=0.01), Tolerance(), prompts=["p"])
    assert prompts[0]["ok"] and prompts[0]["diverged_at"] == 2
    prompts, _ = compare_outputs(*synthetic(greedy_gap=2.0), Tolerance(), prompts=["p"])
    assert not prompts[0]["ok"]
