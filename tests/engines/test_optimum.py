"""gsr_plugin.engines.optimum: GSR then gptqmodel's GPTQ through Optimum's
GPTQQuantizer and transformers' GPTQConfig, on a 2-layer cut of the default model;
checkpoints right as written (v1, the real format, no dataset), reloading to the
in-memory model; recipe translation and refusals."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gsr_plugin.cli.main import main
from gsr_plugin.engines.optimum import GPTQSettings, quantize_optimum, recipe_for_optimum, save_gptq
from gsr_plugin.eval.data import calibration_windows

W4G64 = GPTQSettings(bits=4, group_size=64, sym=True)
TEXT = "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in Paris."


@pytest.fixture(scope="module")
def calibration(default_model_cut, small_data_module):
    tokenizer = AutoTokenizer.from_pretrained(default_model_cut)
    return tokenizer, calibration_windows(tokenizer, 4, 64, 0, str(small_data_module))


@pytest.fixture(scope="module")
def small_data_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext2").mkdir()
    (root / "wikitext2" / "valid.tokens").write_text(" = Valid = \n" + " the cat sat on the mat in the old house ." * 200)
    (root / "wikitext2" / "test_rows.json").write_text(json.dumps([" = Title = ", " Some text about Paris . " * 600]))
    return root


def gsr():
    rotations, _ = recipe_for_optimum("gsr_w4a16_g64_gptq")
    return rotations


def token_ids(tokenizer):
    return tokenizer(TEXT, return_tensors="pt").input_ids


def dequantized(model):
    return {n: m.dequantize_weight().detach().clone() for n, m in model.named_modules() if hasattr(m, "dequantize_weight")}


@pytest.mark.parametrize("api", ["quantizer", "config"])
def test_checkpoint_reloads_to_the_in_memory_model(default_model_cut, calibration, tmp_path, api):
    tokenizer, windows = calibration
    model, quantizer = quantize_optimum(default_model_cut, tokenizer, windows, W4G64, gsr(), api=api)
    weights = dequantized(model)
    save_gptq(model, quantizer, tmp_path, tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert qconfig["format"] == "gptq" and qconfig["dataset"] is None  # v1, as the weights are
    assert qconfig["meta"]["gsr_rotation"]["ordering"] == "sequency" and config["gsr_rotation"]["block_size"] == 64
    assert "dataset" not in json.loads((tmp_path / "quantize_config.json").read_text()) or \
        json.loads((tmp_path / "quantize_config.json").read_text())["dataset"] is None

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    again = dequantized(reloaded)
    assert weights.keys() == again.keys() and len(weights) == 14  # 7 linears x 2 layers
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    ids = token_ids(tokenizer)
    with torch.no_grad():
        in_memory = model.eval()(ids).logits
        assert torch.equal(reloaded.eval()(ids).logits, in_memory)


def test_optimums_own_save_writes_the_wrong_format(default_model_cut, calibration, tmp_path):
    """Why save_gptq exists: Optimum 2.3's GPTQQuantizer.save converts the weights to
    v1 but config.json keeps "gptq_v2" (and would crash on the tensor dataset)."""
    tokenizer, windows = calibration
    model, quantizer = quantize_optimum(default_model_cut, tokenizer, windows, W4G64, gsr())
    with pytest.raises(TypeError, match="not JSON serializable"):
        quantizer.save(model, str(tmp_path / "crash"))
    model, quantizer = quantize_optimum(default_model_cut, tokenizer, windows, W4G64, gsr())
    weights = dequantized(model)
    quantizer.dataset = None
    model.config.quantization_config["dataset"] = None
    quantizer.save(model, str(tmp_path / "naive"))
    assert json.loads((tmp_path / "naive" / "config.json").read_text())["quantization_config"]["format"] == "gptq_v2"
    wrong = dequantized(AutoModelForCausalLM.from_pretrained(tmp_path / "naive", dtype=torch.float32))
    assert any(not torch.equal(weights[k], wrong[k]) for k in weights)


def test_gsr_quantize_with_the_optimum_engine_then_eval(default_model_cut, small_data_module, tmp_path, capsys):
    out = tmp_path / "gptq"
    assert main(["quantize", "--engine", "optimum", "--api", "config", "--model", str(default_model_cut), "--recipe",
                 "gsr_w4a16_g64_gptq", "--output", str(out), "--calib-samples", "4", "--calib-len", "64",
                 "--data-dir", str(small_data_module)]) == 0
    err = capsys.readouterr().err
    assert "saved" in err and "(GPTQ;" in err
    provenance = json.loads((out / "gsr_quantize.json").read_text())
    assert provenance["engine"].startswith("optimum (GPTQConfig") and provenance["gptq"] == "gptq w4 g64 sym"
    assert main(["eval", str(out), "--ppl-windows", "1", "--data-dir", str(small_data_module)]) == 0
    assert "gptq w4 g64 + GSRModifier sequency" in capsys.readouterr().out


def test_recipe_translation():
    rotations, settings = recipe_for_optimum("gsr_w3a16_g64_asym_gptq")
    assert [type(m).__name__ for m in rotations] == ["GSRModifier"]
    assert settings == GPTQSettings(bits=3, group_size=64, sym=False, desc_act=False, damp_percent=0.01)
    assert recipe_for_optimum("none_w4a16_g64_asym_gptq")[0] == []
    assert recipe_for_optimum("gsr_w4a16_g64_gptq")[1] == GPTQSettings(4, 64, True, False, 0.01)


@pytest.mark.parametrize(
    "recipe,message",
    [
        ("gsr_w4a4kv4_g64_asym_r4_gptq", "online rotations"),
        ("gsr_w8a8_gptq", "weight-only"),
        ("frtq_w3a16_g64_asym_gptq", "FRTQModifier is not one"),
        ("hadamard_w4a16_g64_asym_gptq", "SpinQuantModifier is not one"),
    ],
)
def test_what_the_optimum_route_cannot_run_is_refused(recipe, message):
    with pytest.raises(ValueError, match=message):
        recipe_for_optimum(recipe)


def test_refusal_comes_before_any_work(default_model_cut, tmp_path, capsys):
    assert main(["quantize", "--engine", "optimum", "--model", str(default_model_cut), "--recipe",
                 "gsr_w8a8_gptq", "--output", str(tmp_path / "x")]) == 2
    assert "weight-only" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_compare_puts_the_engines_side_by_side(default_model_cut, small_data_module, tmp_path):
    from gsr_plugin.cli.compare import CompareSettings, compare
    settings = CompareSettings(model=str(default_model_cut), bits=[4], methods=["none", "gsr"], group_size=64,
                               symmetric=True, calib_samples=4, calib_len=64, ppl_windows=1,
                               data_dir=str(small_data_module), engines=["llmcompressor", "optimum"])
    report = compare(settings, tmp_path, command="gsr compare (test)")
    assert [(r["method"], r["engine"]) for r in report["runs"]] == [
        ("none", "llmcompressor"), ("none", "optimum"), ("gsr", "llmcompressor"), ("gsr", "optimum")]
    assert report["runs"][1]["recipe"] == "none_w4a16_g64_gptq@optimum"
    ppl = {(r["method"], r["engine"]): r["ppl"] for r in report["runs"]}
    # the same GPTQ on the same data: the two engines land close to each other
    assert 0.8 < ppl[("gsr", "optimum")] / ppl[("gsr", "llmcompressor")] < 1.25, ppl
    table = (tmp_path / "compare.md").read_text()
    assert "| gsr (optimum) |" in table and "Engines:" in table


def test_dequantized_model_computes_the_gptq_weights_in_float32(default_model_cut, calibration):
    from gsr_plugin.engines.optimum import dequantize_to_float

    tokenizer, windows = calibration
    model, _ = quantize_optimum(default_model_cut, tokenizer, windows, W4G64, gsr())
    weights = dequantized(model)
    dequantize_to_float(model)
    linear = model.model.layers[1].mlp.down_proj
    assert type(linear) is torch.nn.Linear and linear.weight.dtype == torch.float32
    torch.testing.assert_close(linear.weight, weights["model.layers.1.mlp.down_proj"].T.float(), atol=0, rtol=0)
