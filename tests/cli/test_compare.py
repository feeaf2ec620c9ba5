"""gsr_plugin.cli.compare: a real (tiny) comparison run, and the table and plot writers."""

import json
import math

import pytest

from gsr_plugin.cli.compare import CompareSettings, compare, markdown_table, plot


def test_compare_runs_every_method_and_bit_width(tiny_checkpoints, small_data, tmp_path):
    settings = CompareSettings(
        model=str(tiny_checkpoints["llama"]), bits=[3, 4], methods=["none", "hadamard", "gsr", "frtq"],
        group_size=32, calib_samples=2, calib_len=32, ppl_windows=1, data_dir=str(small_data),
    )
    report = compare(settings, tmp_path, command="gsr compare (test)")
    assert [(r["method"], r["bits"]) for r in report["runs"]] == [
        ("none", 3), ("hadamard", 3), ("gsr", 3), ("frtq", 3), ("none", 4), ("hadamard", 4), ("gsr", 4), ("frtq", 4)
    ]
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in report["runs"])
    assert report["runs"][0]["recipe"] == "none_w3a16_g32_asym_gptq"
    assert json.loads((tmp_path / "compare.json").read_text()) == report
    table = (tmp_path / "compare.md").read_text()
    assert "| gsr |" in table and "| W3 | W4 |" in table and "gsr compare (test)" in table
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="quarot"):
        CompareSettings(methods=["quarot"])


def fake_report():
    return {
        "command": "gsr compare --bits 2,3",
        "settings": {"model": "m", "group_size": 64, "symmetric": False, "calib_samples": 4, "calib_len": 8, "seed": 0},
        "fp": {"ppl": 20.0, "windows": 3, "total_windows": 9, "seq_len": 2048},
        "runs": [
            {"method": "none", "bits": 2, "ppl": float("inf")},
            {"method": "none", "bits": 3, "ppl": 41.04},
            {"method": "gsr", "bits": 2, "ppl": 12345.0},
            {"method": "gsr", "bits": 3, "ppl": 30.0},
        ],
    }


def test_table_states_protocol_and_formats_extremes():
    table = markdown_table(fake_report())
    assert "first 3 of 9 windows of 2048 tokens" in table and "asymmetric" in table
    assert "| none | inf | 41.0 |" in table
    assert "| gsr | 1.23e+04 | 30.0 |" in table
    assert "| float32 (no quantization) | 20.0 | 20.0 |" in table


def test_plot_skips_infinite_points(tmp_path):
    plot(fake_report(), tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_resume_keeps_finished_runs_and_redoes_nothing(tiny_checkpoints, small_data, tmp_path, monkeypatch):
    from gsr_plugin.cli.compare import run_settings
    from gsr_plugin.recipes import RecipeSetting

    settings = [RecipeSetting("none", 4, 32, symmetric=False), RecipeSetting("gsr", 4, 32, symmetric=False, block_size=16)]
    kwargs = dict(calib_samples=2, calib_len=16, ppl_windows=1, data_dir=str(small_data))
    first = run_settings(str(tiny_checkpoints["llama"]), settings, tmp_path / "r.json", **kwargs)
    assert [r["recipe"] for r in first["runs"]] == ["none_w4a16_g32_asym_gptq", "gsr_w4a16_g32_asym_gptq_b16"]

    import llmcompressor

    monkeypatch.setattr(llmcompressor, "oneshot", lambda *a, **k: pytest.fail("a finished run was repeated"))
    again = run_settings(str(tiny_checkpoints["llama"]), settings, tmp_path / "r.json", resume=True, **kwargs)
    assert again["runs"] == first["runs"]


def test_a_learned_rotation_leaves_its_record_in_the_run(tiny_checkpoints, small_data, tmp_path):
    from gsr_plugin.cli.compare import run_settings
    from gsr_plugin.recipes import RecipeSetting

    settings = [RecipeSetting("frtq", 4, 32, symmetric=False, activation_bits=4, activation_clip=0.9)]
    report = run_settings(str(tiny_checkpoints["llama"]), settings, tmp_path / "r.json", calib_samples=4,
                          calib_len=64, ppl_windows=1, data_dir=str(small_data))
    run = report["runs"][0]
    assert run["activation_clip"] == 0.9 and run["kv_clip"] is None
    learned = run["learned"]
    assert learned["steps"] > 0 and learned["objective_after"] < learned["objective_before"]
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["learned"] == learned


def test_low_rank_rows_sit_in_the_same_table(tiny_checkpoints, small_data, tmp_path):
    settings = CompareSettings(
        model=str(tiny_checkpoints["llama"]), bits=[3], methods=["gsr"], group_size=32, ranks=[0, 8],
        calib_samples=2, calib_len=32, ppl_windows=1, data_dir=str(small_data),
    )
    report = compare(settings, tmp_path, command="gsr compare (test)")
    assert [(r["method"], r["rank"]) for r in report["runs"]] == [("gsr", 0), ("gsr", 8)]
    assert report["runs"][1]["recipe"] == "gsr_w3a16_g32_asym_lr8_gptq"
    assert report["runs"][1]["bits_per_weight"] > report["runs"][0]["bits_per_weight"]
    table = (tmp_path / "compare.md").read_text()
    assert "| gsr + rank 8 svd |" in table and "Bits per weight" in table
