"""Shared fixtures: tiny random decoders of each supported architecture, saved with a
byte-level tokenizer so that llm-compressor's ``oneshot`` can load them like any
checkpoint, and the real default model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# hidden 128 = 4 heads x 32, GQA with 2 kv heads: small, but every rotation path
# (blocks smaller than, equal to and wider than head_dim) has room to go wrong
TINY = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
)
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def byte_tokenizer():
    """A 256-token byte-level tokenizer (no hub access needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(alphabet)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            pre_tokenizers.Split("", "isolated"),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0], pad_token=alphabet[0])


def make_tiny_config(arch: str, **overrides):
    from transformers import AutoConfig

    fields = dict(TINY, tie_word_embeddings=arch in ("llama", "qwen3"))
    fields.update(overrides)
    return AutoConfig.for_model(arch, **fields)


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm weights away from one and nonzero biases: an exactness test on a model
    whose norms are all ones cannot see a missing norm fusion."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.4 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{arch: directory} of saved tiny random models with perturbed norms."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = byte_tokenizer()
    paths = {}
    for index, arch in enumerate(ARCHITECTURES):
        torch.manual_seed(index)
        model = AutoModelForCausalLM.from_config(make_tiny_config(arch), dtype=torch.float32)
        perturb_(model, seed=index)
        path = root / arch
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[arch] = path
    return paths


@pytest.fixture
def load_tiny(tiny_checkpoints):
    """load_tiny(arch, dtype) -> a fresh model loaded from its checkpoint."""
    from transformers import AutoModelForCausalLM

    def load(arch: str = "llama", dtype: torch.dtype = torch.float64):
        return AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], dtype=dtype)

    return load


@pytest.fixture(scope="session")
def default_model_dir():
    """SmolLM2-135M-Instruct as a transformers checkpoint (built once, cached)."""
    from gsr_plugin.eval.models import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def default_model_cut(default_model_dir, tmp_path_factory):
    """The default model cut to its first 2 layers (real weights: confident
    predictions, seconds to quantize), with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("cut") / "smollm2-2layers"
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model.save_pretrained(root)
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def calibration():
    """8 random windows of 48 byte tokens: calibration data for the tiny models."""
    from datasets import Dataset

    ids = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def run_oneshot(model, recipe, calibration=None, **kwargs):
    """llm-compressor's oneshot on a tiny model, with ``calibration`` when given."""
    from llmcompressor import oneshot

    data = {} if calibration is None else {
        "dataset": calibration, "processor": byte_tokenizer(), "num_calibration_samples": 8, "max_seq_length": 48,
    }
    oneshot(model=model, recipe=recipe, **data, **kwargs)
    return model


@pytest.fixture
def small_data(tmp_path_factory):
    """A data directory with the layout of shared/data and a few rows of each set."""
    import json

    root = tmp_path_factory.mktemp("data")
    (root / "wikitext2").mkdir()
    (root / "piqa").mkdir()
    (root / "wikitext2" / "test_rows.json").write_text(json.dumps(["", " = Title = ", "", " Some text . " * 300]))
    (root / "wikitext2" / "valid.tokens").write_text(" = Valid = \n" + " the cat sat on the mat ." * 200)
    questions = [
        {"goal": f"How do I open jar {i}?", "sol1": "Twist the lid.", "sol2": "Eat the lid."} for i in range(8)
    ]
    (root / "piqa" / "valid.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(8)))
    return root


@pytest.fixture
def no_hub(monkeypatch):
    """The hub is unreachable: loading from it raises as it would offline."""
    from gsr_plugin.eval import data

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable (test)")

    monkeypatch.setattr(data, "_hub", offline)


@pytest.fixture
def tokens():
    return torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(7))


# transformers' RMSNorm and RoPE run in float32 even in a float64 model, so an exact
# rotation of a float64 tiny model moves logits by float32 rounding (measured 1e-7)
FLOAT64_MODEL_FLOOR = 1e-6


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="session")
def unrotated_checkpoint(tiny_checkpoints, tmp_path_factory):
    """unrotated_checkpoint(scheme): the tiny llama quantized with llm-compressor's
    preset ``scheme`` (QuantizationModifier, no rotation: ``"transform_config": {}``),
    saved with its tokenizer; built once per scheme."""
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    built = {}

    def get(scheme: str = "W4A16"):
        if scheme not in built:
            out = tmp_path_factory.mktemp(f"unrotated-{scheme.lower()}")
            model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
            run_oneshot(model, [QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])])
            model.save_pretrained(out)
            byte_tokenizer().save_pretrained(out)
            built[scheme] = out
        return built[scheme]

    return get
