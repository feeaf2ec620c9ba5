"""The clip ratio and the sink tokens of ``gsr_plugin.quantizers``: against the
quantizer written from its definition, with the real compressed-tensors hooks."""

import pytest
import torch

import gsr_plugin  # noqa: F401  (installs the quantizers)
from compressed_tensors.quantization import QuantizationArgs, disable_quantization
from compressed_tensors.quantization.lifecycle.forward import forward_quantize

from conftest import logits, relative_error, run_oneshot

TOKEN_A4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
KV4_DYNAMIC = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32, "dynamic": True}
KV4_STATIC = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "attn_head", "dynamic": False}


def bare(**attrs) -> torch.nn.Module:
    """A module as forward_quantize sees a quantized one (status frozen)."""
    from compressed_tensors.quantization import QuantizationStatus

    module = torch.nn.Module()
    module.quantization_status = QuantizationStatus.FROZEN
    for name, value in attrs.items():
        setattr(module, name, value)
    return module


def symmetric_reference(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """int4 symmetric per token: 16 levels -8..7, scale = ratio * max|x| / 7.5."""
    scale = ratio * x.abs().amax(-1, keepdim=True) / 7.5
    return torch.clamp(torch.round(x / scale), -8, 7) * scale


def asymmetric_reference(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """int4 asymmetric per group of the last dim, the range shrunk by ratio."""
    low = ratio * x.amin(-1, keepdim=True).clamp(max=0)
    high = ratio * x.amax(-1, keepdim=True).clamp(min=0)
    scale = (high - low) / 15
    zero = torch.round(-low / scale).clamp(0, 15)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 15) - zero) * scale


@pytest.mark.parametrize("ratio", [0.9, 0.6])
def test_activation_clip_is_the_grid_of_the_shrunk_range(ratio):
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 64)
    args = QuantizationArgs(**TOKEN_A4, observer_kwargs={"clip_ratio": ratio})
    out = forward_quantize(bare(), x, "input", args)
    assert torch.allclose(out, symmetric_reference(x, ratio), atol=1e-6)
    # values beyond the clipped range saturate: the largest is no longer reproduced
    assert (out - x).abs().amax() > 0.05 * x.abs().amax()


def test_without_a_ratio_the_quantizer_is_compressed_tensors_own():
    from gsr_plugin.quantizers import _unclipped_qparams

    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(1))
    args = QuantizationArgs(**TOKEN_A4)
    scale, zero = _unclipped_qparams(x, args, torch.nn.Module())
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    assert torch.equal(forward_quantize(bare(), x, "input", args), fake_quantize(x, scale, zero, args))
    assert torch.allclose(forward_quantize(bare(), x, "input", args), symmetric_reference(x, 1.0), atol=1e-6)


def test_a_module_ratio_wins_over_the_recipe_ratio():
    x = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(2))
    module = bare(input_clip_ratio=0.7)
    args = QuantizationArgs(**TOKEN_A4, observer_kwargs={"clip_ratio": 0.9})
    assert torch.allclose(forward_quantize(module, x, "input", args), symmetric_reference(x, 0.7), atol=1e-6)


@pytest.mark.parametrize("bad", [0, 1.5, "0.9"])
def test_a_bad_ratio_names_the_field(bad):
    args = QuantizationArgs(**TOKEN_A4, observer_kwargs={"clip_ratio": bad})
    with pytest.raises(ValueError, match="observer_kwargs.clip_ratio"):
        forward_quantize(bare(), torch.randn(2, 8), "input", args)


# ------------------------------------------------------------------ the KV cache


NO_R3 = ("R1", "R2", "R4")


def kv_model(load_tiny, calibration, kv_scheme, rotations=("R1", "R2", "R3", "R4")):
    """The tiny llama (float32) after GSR and int8 weights with ``kv_scheme``."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from gsr_plugin import GSRModifier

    model = load_tiny("llama", torch.float32)
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    quantizer = QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}},
                                     ignore=["lm_head"], kv_cache_scheme=kv_scheme)
    run_oneshot(model, [GSRModifier(rotations=list(rotations), block_size=32), quantizer], calibration)
    return model


def cached_keys(model, tokens, monkeypatch) -> list:
    """(keys offered to the cache, keys that entered it) per layer. ``update`` is
    spied (the module's ``forward`` is wrapped per instance); with no R3 hook its
    input is the quantizer's."""
    import compressed_tensors.modeling.kvcache as kvcache

    calls = []
    real = kvcache.QuantizedKVCache.update

    def spy(self, key, value, *args, **kwargs):
        before = key.detach().clone()
        out = real(self, key, value, *args, **kwargs)
        calls.append((before, out[0].detach().clone()))
        return out

    monkeypatch.setattr(kvcache.QuantizedKVCache, "update", spy)
    with torch.no_grad():
        model(tokens)
    assert len(calls) == model.config.num_hidden_layers
    return calls


def test_kv_clip_is_the_grid_of_each_tokens_shrunk_range(load_tiny, calibration, tokens, monkeypatch):
    model = kv_model(load_tiny, calibration, {**KV4_DYNAMIC, "observer_kwargs": {"clip_ratio": 0.95}}, NO_R3)
    for keys, stored in cached_keys(model, tokens, monkeypatch):
        assert torch.allclose(stored, asymmetric_reference(keys, 0.95), atol=1e-5)


@pytest.mark.parametrize("kv_scheme", [KV4_DYNAMIC, KV4_STATIC], ids=["dynamic", "static"])
def test_sink_tokens_enter_the_cache_unquantized(load_tiny, calibration, tokens, monkeypatch, kv_scheme):
    plain = kv_model(load_tiny, calibration, kv_scheme, NO_R3)
    kept = kv_model(load_tiny, calibration, {**kv_scheme, "observer_kwargs": {"sink_tokens": 2}}, NO_R3)
    plain_calls = cached_keys(plain, tokens, monkeypatch)
    kept_calls = cached_keys(kept, tokens, monkeypatch)
    first_keys, first_stored = kept_calls[0]
    assert torch.equal(first_stored[..., :2, :], first_keys[..., :2, :])
    assert not torch.allclose(first_stored[..., 2:, :], first_keys[..., 2:, :], atol=1e-3)
    if kv_scheme is KV4_DYNAMIC:  # per token: the other tokens quantize exactly as without sinks
        assert torch.equal(first_stored[..., 2:, :], plain_calls[0][1][..., 2:, :])
    assert not torch.allclose(logits(kept, tokens), logits(plain, tokens))


def test_sink_tokens_count_from_the_start_of_the_sequence_across_decoding(load_tiny, calibration, tokens):
    """Prefill one token, then decode one at a time with transformers' cache: the
    second token is still a sink, the third is not. Per-token quantization makes the
    last logits equal those of one forward over the whole sequence."""
    from transformers import DynamicCache

    model = kv_model(load_tiny, calibration, {**KV4_DYNAMIC, "observer_kwargs": {"sink_tokens": 2}})
    sequence = tokens[:1, :6]
    with torch.no_grad():
        whole = model(sequence).logits[:, -1]
        cache = DynamicCache(config=model.config)
        out = model(sequence[:, :1], past_key_values=cache, use_cache=True)
        for position in range(1, 6):
            out = model(sequence[:, position:position + 1], past_key_values=out.past_key_values, use_cache=True)
    assert relative_error(out.logits[:, -1], whole) < 1e-5
    stored = out.past_key_values.layers[0].keys
    assert stored.shape[-2] == 6


def test_clips_and_sinks_change_only_the_quantizer(load_tiny, calibration, tokens):
    """With the quantizers off, the model computes the float model's function."""
    scheme = {**KV4_DYNAMIC, "observer_kwargs": {"clip_ratio": 0.9, "sink_tokens": 3}}
    model = kv_model(load_tiny, calibration, scheme)
    model.apply(disable_quantization)
    assert relative_error(logits(model, tokens), logits(load_tiny("llama", torch.float32), tokens)) < 1e-5


def test_clips_and_sinks_survive_save_and_load(load_tiny, calibration, tokens, tmp_path):
    """A W4A4 model with R1-R4, a clipped activation quantizer and a dynamic KV4 cache
    with a clip and a sink, saved and loaded back: config.json carries the options and
    the reloaded model computes the in-memory logits."""
    import json

    from llmcompressor.modifiers.quantization import QuantizationModifier

    from gsr_plugin import GSRModifier
    from gsr_plugin.loading import load_with_online_transforms

    scheme = {**KV4_DYNAMIC, "observer_kwargs": {"clip_ratio": 0.95, "sink_tokens": 1}}
    acts = {**TOKEN_A4, "observer_kwargs": {"clip_ratio": 0.9}}
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    quantizer = QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights,
                                                          "input_activations": acts}},
                                     ignore=["lm_head"], kv_cache_scheme=scheme)
    model = run_oneshot(load_tiny("llama", torch.float32),
                        [GSRModifier(rotations=["R1", "R2", "R3", "R4"], block_size=32), quantizer], calibration)
    before = logits(model, tokens)
    model.save_pretrained(tmp_path)
    qconfig = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qconfig["kv_cache_scheme"]["observer_kwargs"] == {"clip_ratio": 0.95, "sink_tokens": 1}
    (group,) = [g for g in qconfig["config_groups"].values() if g.get("weights")]  # the other: attention (KV)
    assert group["input_activations"]["observer_kwargs"] == {"clip_ratio": 0.9}
    reloaded = load_with_online_transforms(tmp_path, dtype=torch.float32)
    assert relative_error(logits(reloaded, tokens), before) < 1e-5
    unclipped = load_with_online_transforms(tmp_path, dtype=torch.float32)
    for module in unclipped.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "input_activations", None)
        if args is not None:
            args.observer_kwargs = {}
    assert relative_error(logits(unclipped, tokens), before) > 1e-3  # the options were in force
