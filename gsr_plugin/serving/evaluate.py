"""``gsr eval --engine vllm``: WikiText-2 perplexity and PIQA of a checkpoint as vLLM
serves it, from vLLM's prompt log-probabilities, beside transformers' figures for the
same checkpoint on the same token ids, and vLLM's speed and memory.

* Perplexity: the first N non-overlapping windows of ``seq_len`` tokens of the
  tokenized WikiText-2 test stream (``eval.perplexity``'s windows); ``exp`` of the
  mean over windows of each window's mean next-token NLL.
* PIQA: lm-evaluation-harness's ``piqa`` (``eval/lm_eval_tasks/piqa_local.yaml``):
  context ``"Question: {goal}\\nAnswer:"``, continuation ``" " + solution``, tokenized
  as the harness does (the continuation's ids are what the whole text has beyond
  the context's); ``acc`` picks the solution with the larger summed log-probability,
  ``acc_norm`` divides it by the solution's length in characters.

Agreement is serve-check's tolerance (``agreement.Tolerance``): vLLM's mean token NLL
may differ from transformers' float32 one by ``noise_factor`` times what the serving
dtype alone moves it in transformers, and by ``floor`` nats in any case.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from gsr_plugin.checkpoint import check_checkpoint
from gsr_plugin.eval.data import piqa_validation, wikitext2_test_text
from gsr_plugin.eval.perplexity import stream_windows
from gsr_plugin.serving.agreement import Tolerance
from gsr_plugin.serving.rules import refuse_unservable
from gsr_plugin.serving.runner import VLLM_TIMEOUT_SECONDS, run_vllm, vllm_python

__all__ = ["PIQA_CONTEXT", "SPEED", "piqa_requests", "token_logprobs", "mean_nll", "piqa_scores", "evaluate_served", "served_table"]

PIQA_CONTEXT = "Question: {goal}\nAnswer:"
SPEED = {"prompt_tokens": 512, "decode_tokens": 128, "repeats": 3}  # batch 1


def piqa_requests(tokenizer, rows: list[dict]) -> list[tuple[list[int], int]]:
    """Two ``(token ids, index of the first continuation token)`` per row (sol1, sol2)."""
    out = []
    for row in rows:
        context = PIQA_CONTEXT.format(goal=row["goal"])
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        for solution in (row["sol1"], row["sol2"]):
            whole = tokenizer(context + " " + solution, add_special_tokens=False).input_ids
            out.append((whole, len(context_ids)))
    return out


@torch.no_grad()
def token_logprobs(model, sequences, progress: bool = True) -> list[list[float]]:
    """Each sequence's next-token log-probabilities after its first token."""
    device = next(model.parameters()).device
    out = []
    for ids in tqdm(sequences, desc="transformers", unit="seq", disable=not progress):
        ids = torch.as_tensor(ids, device=device)[None]
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        out.append(logp.gather(-1, ids[0, 1:, None])[:, 0].tolist())
    return out


def mean_nll(logprobs: list[list[float]]) -> float:
    """The mean over sequences of each one's mean negative log-probability."""
    return -sum(sum(lp) / len(lp) for lp in logprobs) / len(logprobs)


def piqa_scores(logprobs: list[list[float]], requests, rows: list[dict]) -> dict:
    """acc and acc_norm from the log-probs of ``piqa_requests``' sequences."""
    totals = [sum(lp[start - 1:]) for lp, (_, start) in zip(logprobs, requests)]
    acc = acc_norm = 0
    for i, row in enumerate(rows):
        first, second = totals[2 * i], totals[2 * i + 1]
        acc += int((second > first) == (row["label"] == 1))
        first_norm, second_norm = first / len(row["sol1"]), second / len(row["sol2"])
        acc_norm += int((second_norm > first_norm) == (row["label"] == 1))
    return {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows), "documents": len(rows)}


def _transformers(checkpoint: str, dtype: str, windows, piqa, progress: bool) -> dict:
    from gsr_plugin.loading import load_with_online_transforms

    model = load_with_online_transforms(checkpoint, dtype=getattr(torch, dtype)).eval()
    out = {"windows": token_logprobs(model, windows, progress)}
    if piqa:
        out["piqa"] = token_logprobs(model, [ids for ids, _ in piqa], progress)
    return out


def evaluate_served(
    checkpoint: str | Path,
    ppl_windows: int = 10,
    seq_len: int = 2048,
    tasks: list[str] = (),
    limit: int | None = None,
    data_dir=None,
    dtype: str = "bfloat16",
    reference_dtype: str = "float32",
    tolerance: Tolerance = Tolerance(),
    speed: bool = True,
    device: str = "cpu",
    python: Path | None = None,
    timeout: float = VLLM_TIMEOUT_SECONDS,
    progress: bool = True,
) -> dict:
    """vLLM's perplexity (and ``tasks``: piqa) of ``checkpoint`` against transformers'
    in ``reference_dtype`` on the same token ids, with the serving ``dtype``'s own
    difference in transformers as the noise; vLLM's speed (``SPEED``) and peak memory.
    Refuses (``ValueError``) what vLLM cannot serve here, before anything is loaded."""
    from transformers import AutoTokenizer

    unknown = [t for t in tasks if t != "piqa"]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} for --engine vllm; available: piqa")
    check_checkpoint(checkpoint)
    checkpoint = str(checkpoint)
    python = python or vllm_python()
    kernels = refuse_unservable(checkpoint, device, python)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    stream = tokenizer(wikitext2_test_text(data_dir), return_tensors="pt").input_ids
    windows = stream_windows(stream.flatten(), seq_len)[:ppl_windows].tolist()
    rows = piqa_validation(data_dir)[:limit] if "piqa" in tasks else []
    piqa = piqa_requests(tokenizer, rows)
    served = run_vllm(
        checkpoint, dtype, [], [], 1, python, timeout, sequences=windows + [ids for ids, _ in piqa],
        speed={"prompt_ids": windows[0][: SPEED["prompt_tokens"]], "decode_tokens": SPEED["decode_tokens"],
               "repeats": SPEED["repeats"]} if speed else None,
        context=max(seq_len, max((len(ids) for ids, _ in piqa), default=0)) + 1,
    )
    served_windows, served_piqa = served["sequences"][: len(windows)], served["sequences"][len(windows):]
    reference = _transformers(checkpoint, reference_dtype, windows, piqa, progress)
    noisy = _transformers(checkpoint, dtype, windows, [], progress)
    nll = {"vllm": mean_nll(served_windows), "transformers": mean_nll(reference["windows"]),
           "transformers_" + dtype: mean_nll(noisy["windows"])}
    noise = abs(nll["transformers_" + dtype] - nll["transformers"])
    difference = nll["vllm"] - nll["transformers"]
    report = {
        "checkpoint": checkpoint,
        "vllm": served["vllm"],
        "dtype": dtype,
        "reference_dtype": reference_dtype,
        "kernels": kernels.describe() if kernels else None,
        "wikitext2": {
            "windows": len(windows), "seq_len": seq_len,
            "vllm": math.exp(nll["vllm"]), "transformers": math.exp(nll["transformers"]),
            f"transformers_{dtype}": math.exp(nll["transformers_" + dtype]),
            "nll_difference": difference, "noise": noise, "allowed": tolerance.allowed(noise),
            "agrees": abs(difference) <= tolerance.allowed(noise),
        },
        "load_seconds": served["load_seconds"],
        "peak_rss_bytes": served.get("peak_rss_bytes"),
    }
    if speed:
        report["speed"] = served["speed"]
    if rows:
        report["piqa"] = {"vllm": piqa_scores(served_piqa, piqa, rows),
                          "transformers": piqa_scores(reference["piqa"], piqa, rows)}
    return report


def served_table(reports: list[dict]) -> str:
    """One row per checkpoint: vLLM's figures, transformers', the difference."""
    lines = ["| checkpoint | vLLM PPL | transformers PPL | NLL difference (allowed) | agrees | vLLM PIQA acc | "
             "transformers PIQA acc | prefill tok/s | decode tok/s | peak RSS MiB |", "|" + "---|" * 10]
    for r in reports:
        w, p, s = r["wikitext2"], r.get("piqa"), r.get("speed")
        cells = [r["checkpoint"], f"{w['vllm']:.3f}", f"{w['transformers']:.3f}",
                 f"{w['nll_difference']:+.4f} ({w['allowed']:.4f})", "yes" if w["agrees"] else "NO"]
        cells += [f"{p['vllm']['acc']:.4f}", f"{p['transformers']['acc']:.4f}"] if p else ["-", "-"]
        cells += [f"{s['prefill_tokens_per_second']:.0f}", f"{s['decode_tokens_per_second']:.1f}"] if s else ["-", "-"]
        cells.append(f"{r['peak_rss_bytes'] / 2**20:.0f}" if r.get("peak_rss_bytes") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    w = reports[0]["wikitext2"]
    lines.append(f"(first {w['windows']} windows of {w['seq_len']}; vLLM in {reports[0]['dtype']}, transformers in "
                 f"{reports[0]['reference_dtype']}; allowed: serve-check's tolerance on the mean token NLL)")
    return "\n".join(lines)
