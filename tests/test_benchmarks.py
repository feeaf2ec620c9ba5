"""benchmarks/rotations.py (run by hand): its suites are valid recipes with distinct
resume keys, and its tables and plots render from saved reports."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from gsr_plugin.cli.compare import run_key
from gsr_plugin.recipes import recipe_yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rotations():
    spec = importlib.util.spec_from_file_location("bench_rotations", ROOT / "benchmarks" / "rotations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_suite_has_distinct_resume_keys_and_valid_recipes(rotations):
    from llmcompressor.recipe import Recipe

    import gsr_plugin  # noqa: F401  (registers GSRModifier for the recipe parser)

    for name, suite in rotations.SUITES.items():
        settings = suite()
        keys = [run_key(s) for s in settings]
        assert len(set(keys)) == len(keys), name
        for setting in settings:
            text = recipe_yaml(setting, head_dim=64)
            assert yaml.safe_load(text)
            Recipe.create_instance(text)


def test_online_suite_compares_none_hadamard_and_gsr_with_r4(rotations):
    runs = rotations.online_suite()
    assert {(s.method, s.weight_bits) for s in runs} >= {(m, b) for m in ("none", "hadamard", "gsr") for b in (4, 2)}
    assert all(s.activation_bits == 4 and s.kv_bits == 4 for s in runs)
    assert all(s.online_r4 for s in runs if s.method != "none")


def _report(runs):
    return {
        "command": "python benchmarks/rotations.py x",
        "protocol": {"model": "default", "calib_samples": 4, "calib_len": 8, "seed": 0, "ppl_windows": 2},
        "fp": {"ppl": 20.0, "windows": 2, "total_windows": 148, "seq_len": 2048},
        "runs": runs,
    }


def _run(method, bits, group, ppl, **extra):
    return {"method": method, "bits": bits, "group_size": group, "activation_bits": 16, "block_size": None,
            "online_r4": False, "r4_block_size": None, "kv_bits": None, "ppl": ppl, **extra}


def test_tables_render_every_saved_suite(rotations, tmp_path):
    (tmp_path / "main.json").write_text(json.dumps(_report([_run("none", 3, 64, 41.7), _run("gsr", 3, 64, 35.1)])))
    (tmp_path / "bits.json").write_text(json.dumps(_report([_run("none", 2, 64, 1.5e4), _run("gsr", 4, None, 24.0)])))
    (tmp_path / "blocks.json").write_text(json.dumps(_report([
        _run("none", 3, 32, 40.0), _run("gsr", 3, 32, 35.0, block_size=64), _run("natural", 3, 32, 36.0, block_size=64),
        _run("random_hadamard_exact", 3, 32, 34.0, block_size=192),
    ])))
    (tmp_path / "online.json").write_text(json.dumps(_report([
        _run("none", 4, 64, 300.0, activation_bits=4, kv_bits=4),
        _run("gsr", 4, 64, 30.0, activation_bits=4, kv_bits=4, online_r4=True, r4_block_size=64),
    ])))
    (tmp_path / "fp4.json").write_text(json.dumps(_report([
        _run("none", 4, 16, 28.0, fp4="NVFP4A16"), _run("gsr", 4, 16, 25.0, fp4="NVFP4A16", block_size=16),
        _run("gsr", 4, 32, 26.0, fp4="MXFP4A16", block_size=64),
        _run("gsr", 4, 16, 22.0, fp4="NVFP4A16", block_size=16, fp4_gptq=True),
    ])))
    text = rotations.tables(tmp_path)
    assert "| rotation | NVFP4A16 | MXFP4A16 | NVFP4A16 GPTQ |" in text and "| gsr, block 16 | 25.00 |  | 22.00 |" in text
    assert "| gsr, block 64 |  | 26.00 |" in text
    assert "| none | 41.70 |" in text and "| gsr | 35.10 |" in text
    assert "W2 g64" in text and "W4 per-channel" in text and "1.50e+04" in text
    assert "| gsr, block 64 | 35.00 |" in text
    assert "| gsr R1+R2+R4 (R4 block 64) | 30.00 |" in text and "W4A4KV4 g64" in text
    assert "first 2 of 148 windows" in text
    for png in ("main.png", "bits.png", "blocks.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "tables.md").read_text() == text


def test_cost_at_scale_on_cuts_extrapolates_both_sides_in_depth(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_cost", ROOT / "benchmarks" / "cost.py")
    cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cost)
    tiny = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    monkeypatch.setitem(cost.SCALE_CONFIGS, "tiny", tiny)
    monkeypatch.setitem(cost.SCALE_CUTS, "tiny", (1, 2))
    row = cost.fusion_at_scale("tiny", calib_samples=2, calib_len=16)
    (g1, g2), (q1, q2) = row["gsr_cut_seconds"], row["gptq_cut_seconds"]
    assert row["gsr_seconds"] == pytest.approx(g1 + 5 * (g2 - g1))
    assert row["gptq_seconds_scaled"] == pytest.approx(q1 + 5 * (q2 - q1))
    assert row["gsr_over_gptq"] == pytest.approx(row["gsr_seconds"] / row["gptq_seconds_scaled"])
    assert "1- and 2-layer cuts, extrapolated to 6 layers" in row["gptq"]
    text = cost.tables({"command": "c", "threads": 1, "transform": [], "online_r4": [], "scale": [{**row, "command": "c"}]})
    assert "| tiny |" in text and "(2-layer cut)" in text
    frtq = {"frtq_recipe_seconds": 300.0, "gptq_recipe_seconds": 200.0, "frtq_seconds": 100.0,
            "frtq_learning_seconds": 80.0, "frtq_guard_seconds": 5.0, "frtq_over_gptq": 0.5, "frtq": "f", "gptq": "g",
            "calibration": "32 x 512"}
    text = cost.tables({"command": "c", "threads": 1, "transform": [], "online_r4": [], "frtq_vs_gptq": frtq})
    assert "FRTQ costs 100 s (learning 80 s, guard 5 s), FRTQ / GPTQ = 0.50" in text


def test_draws_table_gives_mean_and_spread_over_draws(rotations, tmp_path):
    first, second = rotations.a4_draws_suite()[:2]
    keys = [rotations.run_key(first), rotations.run_key(second)]
    protocol = {"fp": {"ppl": 20.0}}
    (tmp_path / "a4.json").write_text(json.dumps({**protocol, "runs": [{"recipe": keys[0], "ppl": 50.0}]}))
    assert rotations.draws_table(tmp_path, "a4_draws", "a4") is None  # one draw: no spread to give
    (tmp_path / "a4_draws-seed1.json").write_text(json.dumps({**protocol, "runs": [{"recipe": keys[0], "ppl": 60.0},
                                                                                   {"recipe": keys[1], "ppl": 70.0}]}))
    table = rotations.draws_table(tmp_path, "a4_draws", "a4")
    row = next(line for line in table.splitlines() if line.startswith(f"| {keys[0]} "))
    assert "| 50.00 | 60.00 | 55.00 | 2.75x | 18.2% |" in row
    assert f"| {keys[1]} |  | 70.00 | 70.00 | 3.50x |  |" in table


def test_frtq_against_gsr_is_a_win_only_beyond_the_spread(rotations, tmp_path):
    """Draw by draw ratios; a win needs every FRTQ draw below every GSR draw."""
    gsr, frtq = (rotations.run_key(s) for s in rotations.sweep_suite()[:2])
    w4 = [s for s in rotations.sweep_suite() if s.weight_bits == 4 and s.group_size is None]
    gsr4, frtq4 = rotations.run_key(w4[0]), rotations.run_key(w4[1])
    guard = {"R1": "learned", "R1_error": {"init": 0.04, "learned": 0.03}, "R2_learned_layers": [0], "R2_layers": 2,
             "layers": [{"verdict": "gains"}, {"verdict": "overfits"}]}
    draws = [{gsr: 40.0, frtq: 36.0, gsr4: 30.0, frtq4: 29.0}, {gsr: 41.0, frtq: 38.0, gsr4: 29.5, frtq4: 31.0}]
    for seed, ppl in enumerate(draws):
        runs = [{"recipe": k, "ppl": v, **({"learned": {"guard": guard}} if k == frtq else {})} for k, v in ppl.items()]
        name = "sweep.json" if seed == 0 else f"sweep-seed{seed}.json"
        (tmp_path / name).write_text(json.dumps({"fp": {"ppl": 20.0}, "runs": runs}))
    table = rotations.versus_table(tmp_path, "sweep", "sweep")
    assert f"| {frtq} | 0.900 | 0.927 | 0.913 | wins |" in table
    assert f"| {frtq4} | 0.967 | 1.051 | 1.009 | ties |" in table
    guarded = rotations.guard_table(tmp_path, "sweep", "sweep")
    assert f"| {frtq} | 1 | round to nearest | learned | 0.04000 | 0.03000 | 1 of 2 | 1 gains, 1 overfits |" in guarded
    text = rotations.tables(tmp_path)
    assert "FRTQ against GSR, draw by draw" in text and "FRTQ's guard and evidence" in text


def test_served_table_gives_ratios_to_bf16_in_the_same_engine(tmp_path):
    import sys

    spec = importlib.util.spec_from_file_location("bench_served", ROOT / "benchmarks" / "served.py")
    served = importlib.util.module_from_spec(spec)
    sys.modules["bench_served"] = served  # its dataclasses look their module up
    spec.loader.exec_module(served)

    def measured(engine, ppl, prefill, decode, rss, **extra):
        return {"engine": engine, "ppl": ppl, "transformers_ppl": ppl * 1.001, "peak_rss_bytes": rss,
                "speed": {"prefill_tokens_per_second": prefill, "decode_tokens_per_second": decode}, **extra}

    vllm = dict(agrees=True)
    report = {"command": "c", "windows": 10, "speed": served.SPEED, "rows": [
        {"name": "bf16", "format": "bf16", "bits_per_weight": 16.0, "bytes": 270 * 2**20, "bytes_16bit": 270 * 2**20,
         "lm_head": "tied", "gpu": "g",
         "served": measured("vLLM 0.32 (_C)", 20.0, 1000.0, 50.0, 2 * 2**30, **vllm),
         "transformers": measured("transformers", 20.0, 500.0, 20.0, 2**30)},
        {"name": "gsr w4a16 g64", "format": "compressed-tensors", "bits_per_weight": 4.25, "bytes": 150 * 2**20,
         "bytes_16bit": 100 * 2**20, "lm_head": "own", "gpu": "g",
         "served": measured("vLLM 0.32 (_C)", 22.0, 800.0, 60.0, 2**30, **vllm)},
        {"name": "gsr gptq w3", "format": "GPTQ", "bits_per_weight": 3.5, "bytes": 140 * 2**20, "bytes_16bit": 90 * 2**20,
         "lm_head": "own", "gpu": "refused",
         "served": measured("transformers", 30.0, 250.0, 10.0, 2**29, kernel="TorchQuantLinear")},
    ], "pairs": [{"a": "gsr_w4a16_g64", "b": "none_w4a16_g64", "rounds": 3, "command": "c2",
                  "ratios": {"prefill": [1.0, 0.9, 1.2], "decode": [1.05, 0.95, 1.0]}}]}
    text = served.table(report)
    assert ("gsr_w4a16_g64 / none_w4a16_g64 in vLLM, 3 alternating runs (median, min-max): prefill 1.00 (0.90-1.20), "
            "decode 1.00 (0.95-1.05) (`c2`).") in text
    assert ("| gsr w4a16 g64 | compressed-tensors | 4.25 | 150 | 100 | own | vLLM 0.32 (_C) | 22.00 (agrees) | 22.02 | "
            "0.80 | 1.20 | 0.50 |") in text
    assert ("| gsr gptq w3 | GPTQ | 3.50 | 140 | 90 | own | transformers + TorchQuantLinear | 30.00 | 30.03 | 0.50 | "
            "0.50 | 0.50 |") in text
    served.plot(report, tmp_path / "served.png")
    assert (tmp_path / "served.png").read_bytes()[:4] == b"\x89PNG"

    # sizes from a checkpoint's tensors: float32 ones counted again at 2 bytes; lm_head its own or tied
    from safetensors.torch import save_file

    tensors = {"model.embed_tokens.weight": torch.zeros(10, 8), "model.layers.0.mlp.weight_packed": torch.zeros(
        4, 2, dtype=torch.int32), "model.norm.weight": torch.zeros(8, dtype=torch.bfloat16)}
    (tmp_path / "tied").mkdir()
    save_file(tensors, tmp_path / "tied" / "model.safetensors")
    size = served.checkpoint_size(tmp_path / "tied")
    on_disk = (tmp_path / "tied" / "model.safetensors").stat().st_size
    assert size == {"bytes": on_disk, "bytes_16bit": on_disk - 80 * 2, "lm_head": "tied"}
    (tmp_path / "own").mkdir()
    save_file({**tensors, "lm_head.weight": torch.zeros(10, 8)}, tmp_path / "own" / "model.safetensors")
    size = served.checkpoint_size(tmp_path / "own")
    assert size["lm_head"] == "own" and size["bytes"] - size["bytes_16bit"] == 160 * 2
