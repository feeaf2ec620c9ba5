"""gsr_plugin.eval.diagnostics and `gsr diagnose`: the measured ratios against a direct
computation, FP4 errors against an independent E2M1 quantizer, the rotation part of a
recipe with FRTQ's grid pinned, the command end to end on a tiny model."""

import json

import pytest
import torch

from gsr_plugin.cli.main import main
from gsr_plugin.eval.diagnostics import float_rounding_error, measure, rotation_part
from gsr_plugin.learn.frtq import Grid
from gsr_plugin.learn.objectives import grid_to_std_ratio
from gsr_plugin.modifiers.frtq import FRTQModifier


def test_measure_matches_a_direct_computation(load_tiny):
    model = load_tiny("llama", torch.float32)
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    report = measure(model, windows, Grid(3, False, 32), activation_bits=4)
    seen, outputs = [], []
    layers = [model.model.layers[0].mlp.down_proj, model.model.layers[1].mlp.down_proj]

    def record(m, a):
        x = a[0].reshape(-1, a[0].shape[-1]).double()
        seen.append(x)
        w = m.weight.double()
        groups = w.reshape(w.shape[0], -1, 32)  # W3 g32 asym round to nearest, written out
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        step = (high - low) / 7
        q = (torch.round((groups - low) / step).clamp(0, 7) * step + low).reshape(w.shape)
        outputs.append((x @ (q - w).T).norm().item() / (x @ w.T).norm().item())

    hooks = [m.register_forward_pre_hook(record) for m in layers]
    with torch.no_grad():
        for w in windows:
            model(w[None])
    for h in hooks:
        h.remove()
    expected = sum(grid_to_std_ratio(x, 4, True).mean().item() for x in seen) / len(seen)
    assert report["input_rho"]["down_proj"] == pytest.approx(expected, rel=1e-9)
    w = [m.weight.double() for m in layers]
    assert report["weight_rho"]["down_proj"] == pytest.approx(
        sum(grid_to_std_ratio(x, 3, False, 32).mean().item() for x in w) / 2, rel=1e-9
    )
    assert report["output_error"]["down_proj"] == pytest.approx(sum(outputs) / len(outputs), rel=1e-4)
    assert set(report["input_rho"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(report["kv_dynamic_error"]) == {"k_proj", "v_proj"}
    assert set(report["input_clip"]) == set(report["input_rho"])
    assert all(0 <= g < 1 for g in report["input_clip_gain"].values())


def test_kv_errors_against_compressed_tensors_and_a_written_static_quantizer():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    from gsr_plugin.eval.diagnostics import kv_errors

    x = torch.randn(20, 3 * 16, generator=torch.Generator().manual_seed(0)).double()
    x[0] *= 30  # a sink token with a large key
    errors = kv_errors(x, head_dim=16)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=16, dynamic=True)
    groups = x.reshape(20, 3, 16)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    dynamic = fake_quantize(x.reshape(20, 3, 16), scale[..., None], zero[..., None], args).reshape(20, 48)
    assert errors["kv_dynamic_error"] == pytest.approx(((dynamic - x).norm() / x.norm()).item(), rel=1e-6)
    # static: one symmetric step per head, max|x| / 7.5, levels -8..7
    heads = x.reshape(20, 3, 16)
    step = heads.abs().amax((0, 2), keepdim=True) / 7.5
    static = (torch.round(heads / step).clamp(-8, 7) * step).reshape(20, 48)
    assert errors["kv_static_error"] == pytest.approx(((static - x).norm() / x.norm()).item(), rel=1e-9)
    # the sink inflates the static step; kept out, the other tokens quantize finely
    assert errors["kv_static_sink_error"] < 0.5 * errors["kv_static_error"]


def test_rotation_part_drops_the_quantizer_and_pins_frtqs_grid():
    rotations, grid, act, floats = rotation_part("frtq_w4a4kv4_g64_asym_r4_gptq")
    assert [type(m) for m in rotations] == [FRTQModifier]
    assert grid == Grid(4, False, 64) and act == 4 and floats == (None, None)
    frtq = rotations[0]
    assert (frtq.weight_bits, frtq.weight_group_size, frtq.weight_symmetric, frtq.activation_bits) == (4, 64, False, 4)
    rotations, grid, act, floats = rotation_part("gsr_w4a16_g64_gptq")
    assert grid == Grid(4, True, 64) and act is None


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest FP4 E2M1 value of every entry (sign kept), by search over the 8 magnitudes."""
    nearest = E2M1[(x.abs()[..., None] - E2M1).abs().argmin(-1)]
    return torch.sign(x) * nearest


def _reference_fp4(x: torch.Tensor, group: int, scales: str) -> torch.Tensor:
    """MX (E8M0 scale 2^(e - 2), e the exponent of amax) or NVFP4 (E4M3 scale of amax / 6
    under the global scale 448 * 6 / amax(x)) fake quantization, written from the specs.
    Where amax's mantissa is 1.75 or more, e is rounded up (compressed-tensors does, so
    that amax / scale < 7 does not clip to 6; the OCP spec rounds down)."""
    x = x.double()
    g = x.reshape(x.shape[0], -1, group)
    amax = g.abs().amax(-1, keepdim=True)
    if scales == "mx":
        exponent = torch.floor(torch.log2(amax))
        exponent = exponent + (amax / torch.exp2(exponent) >= 1.75).double()
        scale = torch.exp2(exponent - 2)
    else:
        global_scale = 448 * 6 / x.abs().max()
        scale = (amax / 6 * global_scale).float().to(torch.float8_e4m3fn).double() / global_scale
    return (_e2m1(g / scale) * scale).reshape(x.shape)


@pytest.mark.parametrize("preset, scales", [("MXFP4A16", "mx"), ("NVFP4A16", "nv"), ("NVFP4", "nv")])
def test_float_rounding_error_matches_the_formats_written_from_their_specs(preset, scales):
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, ["Linear"])
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 256)
    expected = _reference_fp4(x, scheme.weights.group_size, scales)
    relative = ((expected - x.double()).norm() / x.double().norm()).item()
    assert float_rounding_error(x, scheme.weights) == pytest.approx(relative, rel=1e-4)
    assert 0.05 < relative < 0.2  # a 4-bit float grid: not zero, not broken


def test_rotation_part_of_an_fp4_recipe_gives_its_float_formats():
    rotations, grid, act, (weights, inputs) = rotation_part("gsr_nvfp4_rtn")
    assert grid is None and act is None
    assert weights.group_size == 16 and inputs is not None and inputs.group_size == 16
    rotations, grid, act, (weights, inputs) = rotation_part("none_mxfp4a16_rtn")
    assert rotations == [] and weights.group_size == 32 and inputs is None


def test_diagnose_command_on_an_fp4_recipe_reports_fp4_errors(tiny_checkpoints, small_data, tmp_path, capsys):
    out = tmp_path / "diag"
    code = main(["diagnose", str(tiny_checkpoints["llama"]), "--recipe", "gsr_nvfp4_rtn", "--samples", "1",
                 "--seq-len", "64", "--data-dir", str(small_data), "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "input FP4 error" in stdout and "weight rho" not in stdout and "groups of 16" in stdout
    report = json.loads((out / "diagnose.json").read_text())
    assert set(report["after"]) == {"input_error", "weight_error", "output_error"}
    assert all(0 < v < 0.3 for v in report["after"]["weight_error"].values())


def test_diagnose_command_writes_table_json_and_plot(tiny_checkpoints, small_data, tmp_path, capsys):
    out = tmp_path / "diag"
    code = main(["diagnose", str(tiny_checkpoints["llama"]), "--recipe", "frtq_w3a16_g64_asym_gptq", "--samples", "1",
                 "--seq-len", "64", "--calib-samples", "2", "--data-dir", str(small_data), "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "| q_proj |" in stdout and "change" in stdout and "weights W3 g64 asym" in stdout
    report = json.loads((out / "diagnose.json").read_text())
    assert report["rotations"] == ["FRTQModifier"] and set(report) >= {"before", "after", "learned"}
    assert report["learned"][0]["steps"] == 100
    assert (out / "diagnose.png").stat().st_size > 1000


def test_block_size_replaces_the_rotation_block_and_refuses_what_it_cannot_set(capsys):
    rotations, *_ = rotation_part("gsr_nvfp4_rtn", block_size=16)
    assert rotations[0].block_size == 16
    with pytest.raises(ValueError, match="not a power of two"):
        rotation_part("gsr_nvfp4_rtn", block_size=48)
    with pytest.raises(ValueError, match="no rotation with a block"):
        rotation_part("none_nvfp4a16_rtn", block_size=16)
    assert main(["diagnose", "default", "--block-size", "16"]) == 2  # no recipe: refused before loading
    assert "pass --recipe too" in capsys.readouterr().err


def test_the_table_shows_frtqs_guard_per_rotation():
    from gsr_plugin.eval.diagnostics import tables

    measured = {"input_rho": {"q_proj": 1.0}}
    guard = {"R1": "init", "R1_error": {"init": 0.01, "learned": 0.02}, "R2_learned_layers": [1],
             "R2_layers": 2, "R2_error": [{"init": 0.03, "learned": 0.04}, {"init": 0.05, "learned": 0.01}]}
    report = {"model": "m", "recipe": "r", "rotations": ["FRTQModifier"], "inputs": "x", "activation_bits": 4,
              "weight_grid": {"bits": 4, "symmetric": False, "group_size": 64}, "before": measured, "after": measured,
              "learned": [{"steps": 5, "guard": guard}]}
    text = tables(report)
    assert "| R1 | 0.01000 | 0.02000 | init |" in text
    assert "| R2 layer 0 | 0.03000 | 0.04000 | init |" in text and "| R2 layer 1 | 0.05000 | 0.01000 | learned |" in text
    assert "evidence" not in text  # a record from before the evidence: no table
    guard["layers"] = [{"seen": {"init": 0.2, "learned": 0.1}, "held_out": {"init": 0.2, "learned": 0.3},
                        "verdict": "overfits"},
                       {"seen": {"init": 0.2, "learned": 0.1}, "held_out": {"init": 0.2, "learned": 0.15},
                        "verdict": "gains"}]
    text = tables(report)
    assert "(1 gains, 1 overfits)" in text
    assert "| 0 | 0.20000 | 0.10000 | 0.20000 | 0.30000 | overfits |" in text
