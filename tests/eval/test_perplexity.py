"""gsr_plugin.eval.perplexity against closed forms and transformers' own loss."""

import math

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutput

from gsr_plugin.eval.perplexity import perplexity, stream_windows


class UniformLM(torch.nn.Module):
    """Equal logits for every token: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return CausalLMOutput(logits=torch.zeros(*input_ids.shape, self.vocab) + self.anchor)


def test_stream_windows_drop_the_tail():
    windows = stream_windows(torch.arange(10), 4)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="fewer than seq_len"):
        stream_windows(torch.arange(3), 4)


def test_uniform_model_has_the_vocabulary_size_as_perplexity():
    result = perplexity(UniformLM(50), torch.randint(0, 50, (1, 300)), seq_len=64, progress=False)
    assert result.ppl == pytest.approx(50, rel=1e-6)
    assert (result.windows, result.total_windows, result.seq_len) == (4, 4, 64)


def test_matches_transformers_loss_window_by_window(load_tiny):
    model = load_tiny("llama", torch.float32)
    stream = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, stream, seq_len=64, max_windows=2, progress=False)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in stream_windows(stream, 64)[:2]]
    assert result.ppl == pytest.approx(math.exp(sum(losses) / 2), rel=1e-5)
    assert "first 2 of 3 windows of 64" in str(result)
