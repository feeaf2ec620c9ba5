"""gsr_plugin.eval.diagnostics and `gsr diagnose`: the measured ratios against a direct
computation, the rotation part of a recipe with FRTQ's grid pinned, the command end
to end on a tiny model."""

import json

import pytest
import torch

from gsr_plugin.cli.main import main
from gsr_plugin.eval.diagnostics import measure, rotation_part
from gsr_plugin.learn.frtq import Grid
from gsr_plugin.learn.objectives import grid_to_std_ratio
from gsr_plugin.modifiers.frtq import FRTQModifier


def test_measure_matches_a_direct_computation(load_tiny):
    model = load_tiny("llama", torch.float32)
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    report = measure(model, windows, Grid(3, False, 32), activation_bits=4)
    seen = []
    layers = [model.model.layers[0].mlp.down_proj, model.model.layers[1].mlp.down_proj]
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).double())) for m in layers]
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
    assert set(report["input_rho"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_rotation_part_drops_the_quantizer_and_pins_frtqs_grid():
    rotations, grid, act = rotation_part("frtq_w4a4kv4_g64_asym_r4_gptq")
    assert [type(m) for m in rotations] == [FRTQModifier]
    assert grid == Grid(4, False, 64) and act == 4
    frtq = rotations[0]
    assert (frtq.weight_bits, frtq.weight_group_size, frtq.weight_symmetric, frtq.activation_bits) == (4, 64, False, 4)
    rotations, grid, act = rotation_part("gsr_w4a16_g64_gptq")
    assert grid == Grid(4, True, 64) and act is None


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
