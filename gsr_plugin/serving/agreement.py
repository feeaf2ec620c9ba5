"""Does vLLM compute what transformers computes on the same checkpoint?

Both sides see the same token ids. vLLM runs in the serving dtype (bfloat16: its CPU
int4 and int8 kernels take no float32); transformers runs the same checkpoint in float32
as the reference, and once more in the serving dtype to measure how far that dtype
alone moves the log-probabilities (the *noise*). Agreement means, with
``k = noise_factor``:

* a fixed reference text: vLLM's per-token log-probabilities differ from the float32
  reference by at most ``k`` times transformers' own bf16 difference (worst token and
  mean), and never less than ``floor`` nats is allowed;
* greedy generation: the same tokens, except that a divergence is accepted as a
  near-tie when the reference prefers its token over vLLM's by less than the allowed
  worst-token difference; the rest of that prompt is then not compared.

A checkpoint served wrongly (weights misread, a rotation lost) moves log-probs by whole
nats; bf16 and a different GEMM order move them by a few hundredths (measured on the
default model: docs/serving.md).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROMPTS", "REFERENCES", "Tolerance", "run_transformers", "compare_outputs"]

# what the check generates from (greedy) and scores (log-probabilities of every token)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]
REFERENCES = [
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the "
    "tallest structure in Paris. Its base is square, measuring 125 metres on each side.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))  # prints 5\n",
]


@dataclass(frozen=True)
class Tolerance:
    """vLLM may differ from the float32 reference by ``noise_factor`` times what the
    serving dtype alone does in transformers, and by ``floor`` nats in any case."""

    noise_factor: float = 2.0
    floor: float = 0.05

    def allowed(self, noise: float) -> float:
        return max(self.noise_factor * noise, self.floor)


def _reference_logprobs(model, vllm_result: dict) -> list[list[float]]:
    import torch

    out = []
    with torch.no_grad():
        for item in vllm_result["references"]:
            logp = torch.log_softmax(model(torch.tensor([item["ids"]])).logits[0].float(), -1)
            out.append([float(logp[i - 1, item["ids"][i]]) for i in range(1, len(item["ids"]))])
    return out


def run_transformers(checkpoint: str, dtype: str, vllm_result: dict, max_tokens: int, noise_dtype: str) -> dict:
    """Greedy continuations of vLLM's prompt ids with per-step log-probs, and the
    reference texts' token log-probs in ``dtype`` and in ``noise_dtype``."""
    import torch

    from gsr_plugin.loading import load_with_online_transforms

    noisy = load_with_online_transforms(checkpoint, dtype=getattr(torch, noise_dtype))
    noise = _reference_logprobs(noisy.eval(), vllm_result)
    del noisy
    model = load_with_online_transforms(checkpoint, dtype=getattr(torch, dtype))
    model.eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    generations = []
    with torch.no_grad():
        for item in vllm_result["generations"]:
            ids = torch.tensor([item["prompt_ids"]])
            steps = []  # log-probs over the vocabulary at each step, along vLLM's tokens
            mine = []
            theirs = item["ids"]
            for t in range(max_tokens):
                context = torch.tensor([item["prompt_ids"] + theirs[:t]]) if t <= len(theirs) else None
                if context is None:
                    break
                logp = torch.log_softmax(model(context).logits[0, -1].float(), -1)
                choice = int(logp.argmax())
                mine.append(choice)
                steps.append({"top": choice, "top_logprob": float(logp[choice]),
                              "vllm_logprob": float(logp[theirs[t]]) if t < len(theirs) else None})
                if t >= len(theirs) or choice != theirs[t] or choice in eos:
                    break
            generations.append({"ids": mine, "steps": steps})
            del ids
    return {"generations": generations, "references": _reference_logprobs(model, vllm_result), "noise": noise}


def _abs_diffs(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) for x, y in zip(a, b)]


def compare_outputs(vllm_result: dict, hf_result: dict, tolerance: Tolerance, prompts=PROMPTS) -> tuple[list, list]:
    """Rows of the report: one per prompt (greedy), one per reference text."""
    reference_rows = []
    for theirs, mine, noisy in zip(vllm_result["references"], hf_result["references"], hf_result["noise"]):
        diffs, noise = _abs_diffs(theirs["logprobs"], mine), _abs_diffs(noisy, mine)
        row = {
            "tokens": len(diffs),
            "max_abs_diff": max(diffs),
            "mean_abs_diff": sum(diffs) / len(diffs),
            "noise_max": max(noise),
            "noise_mean": sum(noise) / len(noise),
        }
        row["allowed_max"] = tolerance.allowed(row["noise_max"])
        row["allowed_mean"] = tolerance.allowed(row["noise_mean"])
        row["ok"] = row["max_abs_diff"] <= row["allowed_max"] and row["mean_abs_diff"] <= row["allowed_mean"]
        reference_rows.append(row)
    tie = max((r["allowed_max"] for r in reference_rows), default=tolerance.floor)
    prompt_rows = []
    for prompt, theirs, mine in zip(prompts, vllm_result["generations"], hf_result["generations"]):
        equal, diverged_at, gap = 0, None, None
        for t, step in enumerate(mine["steps"]):
            if t < len(theirs["ids"]) and step["top"] == theirs["ids"][t]:
                equal += 1
                continue
            diverged_at = t
            if step["vllm_logprob"] is not None:
                gap = step["top_logprob"] - step["vllm_logprob"]
            break
        ok = diverged_at is None or (gap is not None and gap < tie)
        compared = equal + (diverged_at is not None)
        prompt_rows.append({"prompt": prompt, "equal": equal, "compared": compared, "diverged_at": diverged_at,
                            "gap": gap, "ok": ok, "vllm_text": theirs["text"]})
    return prompt_rows, reference_rows
