"""gsr_plugin.transform: the compressed-tensors factories, checked against the host
library's own ``apply_transform_weight`` applied to the dense stored matrix."""

import importlib
import itertools

import pytest
import torch
from compressed_tensors.transform import (
    TransformArgs,
    TransformFactory,
    TransformScheme,
)
from compressed_tensors.transform.utils.matrix import apply_transform_weight

import gsr_plugin
from gsr_plugin import transform as transform_module
from gsr_plugin.transform import NATURAL_WALSH, SEQUENCY_WALSH, GroupedWalshTransform
from gsr_plugin.walsh import walsh_matrix


def make(type_, block=16, randomize=False, seed=3, precision=torch.float64):
    scheme = TransformScheme(type=type_, head_dim=block, randomize=randomize, precision=precision)
    return TransformFactory.from_scheme(scheme, name="R", seed=seed)


def test_types_are_registered_on_import():
    names = TransformFactory.registered_names()
    assert SEQUENCY_WALSH in names and NATURAL_WALSH in names
    # by name: a reload (below) makes new class objects while the registry keeps the first
    assert type(make(SEQUENCY_WALSH)).__qualname__ == "SequencyWalshFactory"
    assert type(make(NATURAL_WALSH)).__qualname__ == "NaturalWalshFactory"


def test_importing_again_does_not_raise():
    importlib.reload(transform_module)
    transform_module.register_transform_types()
    importlib.reload(gsr_plugin)
    gsr_plugin.register()
    assert SEQUENCY_WALSH in TransformFactory.registered_names()


def test_a_foreign_factory_under_our_name_is_refused(monkeypatch):
    class Impostor(transform_module.WalshFactory):
        pass

    monkeypatch.setitem(transform_module._FACTORIES, "sequency-walsh", Impostor)
    with pytest.raises(RuntimeError, match="already registered"):
        transform_module.register_transform_types()


CASES = [
    (type_, randomize, location, inverse, module_type)
    for type_, randomize, location, inverse, module_type in itertools.product(
        [SEQUENCY_WALSH, NATURAL_WALSH],
        [False, True],
        ["input", "output", "weight_input", "weight_output"],
        [False, True],
        [torch.nn.Linear, torch.nn.Embedding],
    )
    if not (module_type is torch.nn.Embedding and location in ("input", "output"))
]


@pytest.mark.parametrize("type_,randomize,location,inverse,module_type", CASES)
def test_transform_matches_host_dense_application(type_, randomize, location, inverse, module_type):
    factory = make(type_, randomize=randomize)
    module = torch.nn.Linear(64, 48) if module_type is torch.nn.Linear else torch.nn.Embedding(48, 64)
    args = TransformArgs(targets=["m"], location=location, inverse=inverse)
    transform = factory.create_transform(module, args)
    stored = transform.weight.double()
    matrix = (stored.T if inverse else stored) / 4  # sqrt(16)
    if location.startswith("weight"):
        value = module.weight.detach().double()
    else:
        value = torch.randn(5, 64 if location == "input" else 48, dtype=torch.float64)
    expected = apply_transform_weight(matrix, value, location, module_type)
    torch.testing.assert_close(transform(value), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("type_,ordering", [(SEQUENCY_WALSH, "sequency"), (NATURAL_WALSH, "natural")])
def test_stored_weight_is_the_plus_minus_one_walsh_matrix(type_, ordering):
    weight = make(type_).create_transform(torch.nn.Linear(64, 64), TransformArgs(targets=["m"], location="input")).weight
    assert torch.equal(weight.double(), walsh_matrix(16, ordering, normalized=False))


def test_random_signs_are_rows_of_plus_minus_one_shared_per_size():
    factory = make(SEQUENCY_WALSH, randomize=True)
    online = factory.create_transform(torch.nn.Linear(64, 64), TransformArgs(targets=["m"], location="input"))
    fused = factory.create_transform(torch.nn.Linear(64, 64), TransformArgs(targets=["m"], location="weight_input"))
    signs = online.weight[:, 0]
    assert set(online.weight.unique().tolist()) == {-1.0, 1.0}
    assert not bool((signs == 1).all())
    torch.testing.assert_close(online.weight.double(), signs.double()[:, None] * walsh_matrix(16, normalized=False))
    # online (scheme precision) and fused (float64) copies: other dtype, same signs
    assert fused.weight.dtype == torch.float64
    assert torch.equal(fused.weight[:, 0].float(), signs.float())


def test_seed_decides_the_signs():
    def signs(seed):
        factory = make(SEQUENCY_WALSH, randomize=True, seed=seed)
        args = TransformArgs(targets=["m"], location="weight_input")
        return factory.create_transform(torch.nn.Linear(64, 64), args).weight[:, 0]

    assert torch.equal(signs(1), signs(1))
    assert not torch.equal(signs(1), signs(2))


def test_online_transform_runs_in_scheme_precision_and_keeps_the_input_dtype():
    factory = make(SEQUENCY_WALSH, precision=torch.float32)
    transform = factory.create_transform(torch.nn.Linear(64, 64), TransformArgs(targets=["m"], location="input"))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert transform(x).dtype == torch.bfloat16
    assert transform.weight.dtype == torch.float32


def test_unsupported_module_type_names_the_fix():
    transform = GroupedWalshTransform(
        torch.nn.Parameter(walsh_matrix(4, normalized=False), requires_grad=False),
        "sequency",
        TransformScheme(type=SEQUENCY_WALSH, head_dim=4),
        TransformArgs(targets=["m"], location="weight_input"),
        torch.nn.Conv1d,
    )
    with pytest.raises(NotImplementedError, match="Linear or Embedding"):
        transform(torch.randn(4, 4))


def test_sequency_permutation_folds_the_order_into_the_previous_weight():
    """x @ B_seq == (x with gate/up rows reordered) @ H / sqrt(k), blockwise."""
    from gsr_plugin.walsh import grouped_walsh_transform

    weight = torch.randn(48, 8, dtype=torch.float64)  # a gate/up: 3 blocks of 16 outputs
    factory = TransformFactory.from_scheme(TransformScheme(type="sequency-permutation", head_dim=16), name="P")
    fold = factory.create_transform(torch.nn.Linear(8, 48), TransformArgs(targets=["m"], location="weight_output"))
    x = torch.randn(5, 8, dtype=torch.float64)
    sequency = grouped_walsh_transform(x @ weight.T, 16, "sequency", method="dense")
    natural = grouped_walsh_transform(x @ fold(weight).T, 16, "natural", method="dense")
    torch.testing.assert_close(natural, sequency, atol=1e-12, rtol=0)
    unfold = factory.create_transform(
        torch.nn.Linear(8, 48), TransformArgs(targets=["m"], location="weight_output", inverse=True)
    )
    assert torch.equal(unfold(fold(weight)), weight)


@pytest.mark.parametrize("module,location", [(torch.nn.Linear(8, 16), "input"), (torch.nn.Embedding(16, 8), "weight_output")])
def test_sequency_permutation_is_for_linear_weights_only(module, location):
    factory = TransformFactory.from_scheme(TransformScheme(type="sequency-permutation", head_dim=8), name="P")
    with pytest.raises(NotImplementedError, match="Linear weights only"):
        factory.create_transform(module, TransformArgs(targets=["m"], location=location))


def test_online_precision_follows_a_wider_input():
    factory = make(SEQUENCY_WALSH, precision=torch.float32)
    transform = factory.create_transform(torch.nn.Linear(64, 64), TransformArgs(targets=["m"], location="input"))
    x = torch.randn(3, 64, dtype=torch.float64)
    expected = x @ torch.block_diag(*[walsh_matrix(16)] * 4)
    torch.testing.assert_close(transform(x), expected, atol=1e-13, rtol=0)  # float64 kept, not float32


# ---------------------------------------------- R3 beside a quantized KV cache

KV4_STATIC = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "attn_head", "dynamic": False}
KV4_DYNAMIC = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32, "dynamic": True}


def kv_quantized(load_tiny, calibration, rotations, kv_scheme):
    """The tiny llama (float32) after GSR ``rotations`` and a KV-cache scheme (weights
    int8 per channel), with every forward_quantize call recorded as (base, input, output)."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from conftest import run_oneshot
    from gsr_plugin import GSRModifier

    model = load_tiny("llama", torch.float32)
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    quantizer = QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}},
                                     ignore=["lm_head"], kv_cache_scheme=kv_scheme)
    run_oneshot(model, [GSRModifier(rotations=rotations, block_size=32), quantizer], calibration)
    return model


def record_quantized(monkeypatch) -> list:
    import compressed_tensors.modeling.attention as attention
    import compressed_tensors.modeling.kvcache as kvcache

    calls = []
    for where in (attention, kvcache):
        real = where.forward_quantize

        def spy(module, x, base, args, real=real):
            out = real(module, x, base, args)
            calls.append((base, x.detach().clone(), out.detach().clone()))
            return out

        monkeypatch.setattr(where, "forward_quantize", spy)
    return calls


@pytest.mark.parametrize("kv_scheme", [KV4_STATIC, KV4_DYNAMIC], ids=["static", "dynamic"])
def test_r3_runs_beside_a_quantized_kv_cache_and_leaves_queries_alone(load_tiny, calibration, tokens, monkeypatch, kv_scheme):
    """compressed-tensors 0.19 alone: static KV fails ('no attribute q_scale'), dynamic KV
    quantizes the queries to the KV cache's grid. Here: keys and values quantized, the
    keys rotated by R3 first (each head's keys times its Walsh block), queries not."""
    from compressed_tensors.quantization import disable_quantization

    from conftest import logits, relative_error
    from gsr_plugin.transform import KVCacheOnlyAttention

    with_r3 = kv_quantized(load_tiny, calibration, ["R1", "R2", "R3", "R4"], kv_scheme)
    without = kv_quantized(load_tiny, calibration, ["R1", "R2", "R4"], kv_scheme)
    assert isinstance(with_r3.model.layers[0].self_attn.impl, KVCacheOnlyAttention)
    calls = record_quantized(monkeypatch)
    with torch.no_grad():
        with_r3(tokens)
    r3_calls, calls[:] = list(calls), []
    with torch.no_grad():
        without(tokens)
    assert [c[0] for c in r3_calls] == ["k", "v"] * 2  # two layers; no "q"
    walsh = walsh_matrix(32, "sequency", normalized=True, dtype=torch.float32)
    k_r3, k_plain = r3_calls[0][1], calls[0][1]  # the first layer's keys (later ones see quantized attention)
    assert torch.allclose(k_r3, k_plain @ walsh, atol=1e-5)
    # a KV quantizer changes the quantizer only: the float function is the model's
    reference = logits(load_tiny("llama", torch.float32), tokens)
    with_r3.apply(disable_quantization)
    assert relative_error(logits(with_r3, tokens), reference) < 1e-5


def test_dynamic_kv_groups_are_each_tokens_head(load_tiny, calibration, tokens, monkeypatch):
    """The published protocol's KV4 (QuaRot, SpinQuant): asymmetric, per token, in groups
    of head_dim, from each token's own min and max. compressed-tensors' ``group``
    strategy on the cache's (batch, heads, tokens, head_dim) keys does exactly this."""
    model = kv_quantized(load_tiny, calibration, ["R1", "R2", "R3", "R4"], KV4_DYNAMIC)
    calls = record_quantized(monkeypatch)
    with torch.no_grad():
        model(tokens)
    for base, x, out in calls:
        assert x.shape[-1] == 32 and x.dim() == 4  # (batch, kv heads, tokens, head_dim)
        low = x.amin(-1, keepdim=True).clamp(max=0)
        high = x.amax(-1, keepdim=True).clamp(min=0)
        scale = (high - low) / 15
        zero = torch.round(-low / scale).clamp(0, 15)
        reference = (torch.clamp(torch.round(x / scale) + zero, 0, 15) - zero) * scale
        assert torch.allclose(out, reference, atol=1e-5), (base, (out - reference).abs().max())


def test_gptq_calibrates_on_the_same_attention_with_r3(load_tiny, calibration, monkeypatch):
    """R3 is exact in float, so GPTQ must see the same linear inputs with it and give
    the same weights. llm-compressor 0.14 calibrates under eager attention, which
    bypasses the hooked attention where R3 rotates the queries while the keys are
    still rotated; gsr_plugin keeps the hooked attention (``transform.
    _eager_attention_keeping_hooks``). Both hooks run in every calibration pass."""
    import compressed_tensors.modeling.attention as attention
    import compressed_tensors.modeling.kvcache as kvcache
    import compressed_tensors.transform.factory.base as factory_base
    from llmcompressor.modifiers.quantization import GPTQModifier

    from conftest import run_oneshot
    from gsr_plugin import GSRModifier

    counts = {"q": 0, "k": 0}

    def counting(register, kind):
        def wrapped(module, hook):
            def counted(m, x):
                counts[kind] += 1
                return hook(m, x)
            return register(module, counted)
        return wrapped

    monkeypatch.setattr(factory_base, "register_query_hook", counting(attention.register_query_hook, "q"))
    monkeypatch.setattr(factory_base, "register_key_hook", counting(kvcache.register_key_hook, "k"))
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}
    quantized = {}
    for rotations in (["R1", "R2"], ["R1", "R2", "R3"]):
        gptq = GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
        model = run_oneshot(load_tiny("llama", torch.float32), [GSRModifier(rotations=rotations, block_size=32), gptq],
                            calibration)
        quantized[len(rotations)] = {n: m.weight.detach().clone() for n, m in model.named_modules()
                                     if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert counts["q"] == counts["k"] > 0  # calibration passes included
    for name, weight in quantized[2].items():
        changed = (quantized[3][name] != weight).float().mean().item()
        assert changed < 0.01, (name, changed)  # float rounding may flip a rare GPTQ decision
