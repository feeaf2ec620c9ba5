"""ActivationClipModifier: the searched ratio is the argmin of the error computed from
the definition, on the inputs the layer saw; it survives save and load."""

import pytest
import torch

from conftest import logits, relative_error, run_oneshot
from test_quantizers import symmetric_reference

RATIOS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]


def w4a4_quantizer():
    from llmcompressor.modifiers.quantization import QuantizationModifier

    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    acts = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    return QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
                                ignore=["lm_head"])


def test_the_searched_ratio_minimizes_the_weighted_error(load_tiny, calibration, tmp_path):
    from gsr_plugin import ActivationClipModifier, GSRModifier
    from gsr_plugin.loading import load_with_online_transforms

    model = load_tiny("llama", torch.float32)
    seen: dict[str, list] = {}
    names = {module: name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    for module, name in names.items():
        if name != "lm_head":
            module.register_forward_pre_hook(lambda m, a: seen.setdefault(names[m], []).append(a[0].detach().clone()))
    clip = ActivationClipModifier(ratios=RATIOS)
    run_oneshot(model, [GSRModifier(rotations=["R1", "R2"], block_size=32), w4a4_quantizer(), clip], calibration)
    assert set(clip.chosen) == set(names.values()) - {"lm_head"}
    assert len(set(clip.chosen.values())) > 1, "every layer chose the same ratio: the search decided nothing"
    for name, chosen in clip.chosen.items():
        module = model.get_submodule(name)
        weight = module.weight.detach().float().pow(2).sum(0)
        # the calibration pass's inputs (the propagation pass repeats them: a constant factor)
        errors = [sum(((symmetric_reference(x, r) - x).pow(2).sum((0, 1)) * weight).sum() for x in seen[name])
                  for r in RATIOS]
        assert chosen == RATIOS[int(torch.tensor(errors).argmin())], name
        assert module.input_clip_ratio == chosen
    # saved beside the checkpoint and put back on load: the same function
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    before = logits(model, tokens)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "clip" / "input_clip_ratios.json").is_file()
    loaded = load_with_online_transforms(tmp_path, dtype=torch.float32)
    assert loaded.get_submodule(name).input_clip_ratio == chosen
    assert relative_error(logits(loaded, tokens), before) < 1e-5


def test_without_quantized_activations_it_says_where_it_belongs(load_tiny, calibration):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from gsr_plugin import ActivationClipModifier

    model = load_tiny("llama", torch.float32)
    with pytest.raises(ValueError, match="after the quantization modifier"):
        run_oneshot(model, [QuantizationModifier(scheme="W4A16", targets=["Linear"], ignore=["lm_head"]),
                            ActivationClipModifier()], calibration)


@pytest.mark.parametrize("ratios", [[], [1.2], [0.0]])
def test_bad_candidates_are_refused(ratios):
    from gsr_plugin import ActivationClipModifier

    with pytest.raises(ValueError, match=r"ratios must be"):
        ActivationClipModifier(ratios=ratios)
