"""gsr_plugin.cli: the `gsr` command end to end on a tiny model, exit codes and messages."""

import json
import subprocess
import sys
from pathlib import Path

from gsr_plugin.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_quantize_then_eval(tiny_checkpoints, small_data, tmp_path, capsys):
    out = tmp_path / "ckpt"
    code, stdout, _ = run(
        capsys, "quantize", "--model", str(tiny_checkpoints["llama"]), "--recipe", "gsr_w4a16_g64_gptq",
        "--output", str(out), "--calib-samples", "2", "--calib-len", "16", "--data-dir", str(small_data),
    )
    assert code == 0 and str(out) in stdout and (out / "recipe.yaml").is_file()
    report = tmp_path / "eval.json"
    code, stdout, _ = run(
        capsys, "eval", str(tiny_checkpoints["llama"]), str(out), "--ppl-windows", "1",
        "--data-dir", str(small_data), "--json", str(report),
    )
    assert code == 0
    assert "| model | quantization | WikiText-2 PPL (1/1 windows of 2048) |" in stdout
    assert "w4 g64 + sequency-walsh rotations" in stdout
    assert [r["quantization"] for r in json.loads(report.read_text())] == ["none", "w4 g64 + sequency-walsh rotations"]


def test_existing_output_exits_2_and_names_the_flag(tiny_checkpoints, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    code, _, err = run(
        capsys, "quantize", "--model", str(tiny_checkpoints["llama"]), "--recipe", "gsr_w4a16_g64_gptq",
        "--output", str(tmp_path / "ckpt"),
    )
    assert code == 2 and "already exists; pass --overwrite" in err


def test_missing_data_exits_2_and_says_where_files_go(tiny_checkpoints, tmp_path, capsys, no_hub):
    code, _, err = run(capsys, "eval", str(tiny_checkpoints["llama"]), "--ppl-windows", "1", "--data-dir", str(tmp_path))
    assert code == 2 and "wikitext2/test_rows.json" in err and "GSR_DATA_DIR" in err


def test_unknown_recipe_lists_the_shipped_ones(tiny_checkpoints, tmp_path, capsys):
    code, _, err = run(
        capsys, "quantize", "--model", str(tiny_checkpoints["llama"]), "--recipe", "w5", "--output", str(tmp_path / "o")
    )
    assert code == 2 and "gsr_w4a16_g64_gptq" in err and not (tmp_path / "o").exists()


def test_recipes_lists_names_and_purposes(capsys):
    code, stdout, _ = run(capsys, "recipes")
    assert code == 0 and "gsr_w8a8_gptq" in stdout and "dynamic per-token" in stdout
    code, stdout, _ = run(capsys, "recipes", "--methods")
    assert "gsr_random" in stdout


def test_console_script_is_installed():
    gsr = Path(sys.executable).parent / "gsr"
    result = subprocess.run([str(gsr), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "quantize" in result.stdout and "compare" in result.stdout
