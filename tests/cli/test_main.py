"""gsr_plugin.cli: the `gsr` command end to end on a tiny model, exit codes and messages."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


# ------------------------------------------------------- checkpoints that are refused


def test_eval_of_a_checkpoint_saved_without_rotation(unrotated_checkpoint, small_data, capsys):
    """A plain llm-compressor checkpoint: compressed-tensors writes `"transform_config": {}`."""
    ckpt = unrotated_checkpoint("W4A16")
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["transform_config"] == {}
    code, stdout, err = run(capsys, "eval", str(ckpt), "--ppl-windows", "1", "--data-dir", str(small_data))
    assert code == 0, err
    assert "| w4 g128 |" in stdout


def damaged(tiny_checkpoints, tmp_path, kind):
    """A copy of the tiny llama with one kind of damage (or none: ``missing``)."""
    import shutil

    ckpt = tmp_path / "ckpt"
    if kind == "missing":
        return ckpt, "no such checkpoint directory"
    if kind == "empty":
        ckpt.mkdir()
        return ckpt, "has no config.json"
    shutil.copytree(tiny_checkpoints["llama"], ckpt)
    weights = ckpt / "model.safetensors"
    if kind == "truncated":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 100)
        return ckpt, "model.safetensors is truncated"
    if kind == "gptq-truncated":  # the Optimum route's format: the same checks
        config = json.loads((ckpt / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True}
        (ckpt / "config.json").write_text(json.dumps(config))
        with open(weights, "r+b") as f:
            f.truncate(1000)
        return ckpt, "model.safetensors is truncated"
    raise ValueError(kind)


KINDS = ["missing", "empty", "truncated", "gptq-truncated"]


@pytest.mark.parametrize("kind", KINDS)
def test_eval_refuses_a_missing_or_damaged_checkpoint_with_exit_2(tiny_checkpoints, tmp_path, capsys, monkeypatch, kind):
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("model code ran"))
    ckpt, words = damaged(tiny_checkpoints, tmp_path, kind)
    code, _, err = run(capsys, "eval", str(ckpt), "--ppl-windows", "1")
    assert code == 2, err
    assert str(ckpt) in err and words in err
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", KINDS)
def test_diagnose_refuses_a_missing_or_damaged_checkpoint_with_exit_2(tiny_checkpoints, tmp_path, capsys, kind):
    ckpt, words = damaged(tiny_checkpoints, tmp_path, kind)
    code, _, err = run(capsys, "diagnose", str(ckpt), "--samples", "1")
    assert code == 2 and words in err, err


def test_quantize_refuses_a_damaged_input_model_before_loading_it(tiny_checkpoints, tmp_path, capsys):
    ckpt, words = damaged(tiny_checkpoints, tmp_path, "truncated")
    code, _, err = run(capsys, "quantize", "--model", str(ckpt), "--recipe", "gsr_w4a16_g64_gptq", "--output",
                       str(tmp_path / "out"))
    assert code == 2 and words in err, err
    assert not (tmp_path / "out").exists()
