"""WikiText-2 perplexity with the protocol of GPTQ, QuaRot, SpinQuant and GSR:
tokenize the canonical stream once, cut it into non-overlapping windows of
``seq_len`` tokens, take the mean token negative log-likelihood over the first N
windows and exponentiate. N is part of every figure."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

__all__ = ["PerplexityResult", "perplexity", "stream_windows"]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    windows: int
    total_windows: int
    seq_len: int

    def __str__(self) -> str:
        return f"{self.ppl:.3f} (first {self.windows} of {self.total_windows} windows of {self.seq_len})"

    def to_dict(self) -> dict:
        return asdict(self)


def stream_windows(input_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows (n x seq_len) of a 1-D token stream; the tail that
    does not fill a window is dropped, as in the reference protocol."""
    count = input_ids.numel() // seq_len
    if count == 0:
        raise ValueError(f"the stream has {input_ids.numel()} tokens, fewer than seq_len {seq_len}")
    return input_ids[: count * seq_len].view(count, seq_len)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seq_len: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """exp(mean over windows of the mean next-token NLL inside each window)."""
    windows = stream_windows(input_ids.flatten(), seq_len)
    total = windows.shape[0]
    used = windows if max_windows is None else windows[:max_windows]
    device = next(model.parameters()).device
    nlls = []
    for window in tqdm(used, desc="Perplexity", disable=not progress, unit="window"):
        batch = window[None].to(device)
        logits = model(batch).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:])
        nlls.append(nll.item())
    return PerplexityResult(math.exp(sum(nlls) / len(nlls)), len(nlls), total, seq_len)
