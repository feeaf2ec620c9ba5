"""gsr_plugin.cli.quantize: real oneshot on a tiny model, atomic output, refusals, and what\nsignals, a full disk and a second run on the same output leave (real subprocesses)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gsr_plugin.cli.quantize import PROVENANCE_FILE, OutputExistsError, atomic_directory, claim_output, quantize
from gsr_plugin.eval.data import DataNotFoundError


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_quantize_writes_a_checkpoint_with_recipe_and_provenance(tiny_checkpoints, small_data, tmp_path):
    out = quantize(
        str(tiny_checkpoints["llama"]), "gsr_w4a16_g64_gptq", tmp_path / "ckpt",
        calib_samples=4, calib_len=32, data_dir=small_data,
    )
    assert {"config.json", "model.safetensors", "recipe.yaml", "tokenizer.json", PROVENANCE_FILE} <= {
        p.name for p in out.iterdir()
    }
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["calibration"] == {"data": "wikitext2 validation", "samples": 4, "seq_len": 32, "seed": 0}
    assert provenance["recipe"].endswith("gsr_w4a16_g64_gptq.yaml")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert config["transform_config"]["config_groups"]["R1"]["type"] == "sequency-walsh"
    AutoModelForCausalLM.from_pretrained(out)(torch.tensor([[1, 2, 3]]))
    assert leftovers(tmp_path) == []


def test_existing_output_is_refused_before_any_work(tiny_checkpoints, small_data, tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("mine")
    import gsr_plugin.cli.quantize as module

    monkeypatch.setattr(module, "resolve_recipe", lambda r: pytest.fail("work started"))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        quantize(str(tiny_checkpoints["llama"]), "gsr_w4a16_g64_gptq", tmp_path / "ckpt", data_dir=small_data)
    assert (tmp_path / "ckpt" / "keep.txt").read_text() == "mine"


def test_a_failing_recipe_leaves_nothing_at_the_output(tiny_checkpoints, small_data, tmp_path):
    recipe = tmp_path / "g48.yaml"  # 128 columns are not divisible by 48: GPTQ refuses
    recipe.write_text(
        """
quant_stage:
  quant_modifiers:
    GSRModifier: {}
    GPTQModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 48}
"""
    )
    with pytest.raises(ValueError, match="not divisible by group_size"):
        quantize(str(tiny_checkpoints["llama"]), str(recipe), tmp_path / "ckpt", calib_samples=2, calib_len=16, data_dir=small_data)
    assert not (tmp_path / "ckpt").exists()
    assert leftovers(tmp_path) == []


def test_overwrite_keeps_the_old_checkpoint_when_the_new_one_fails(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target, overwrite=True) as staging:
            (staging / "config.json").write_text("new")
            raise RuntimeError("boom")
    assert (target / "config.json").read_text() == "old"
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "config.json").write_text("new")
    assert (target / "config.json").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_missing_calibration_data_is_an_error_before_loading_the_model(tiny_checkpoints, tmp_path, no_hub, monkeypatch):
    import transformers

    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded")
    )
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(DataNotFoundError, match="wikitext2/valid.tokens"):
        quantize(str(tiny_checkpoints["llama"]), "gsr_w4a16_g64_gptq", tmp_path / "ckpt", data_dir=empty)
    assert not (tmp_path / "ckpt").exists()


# ------------------------------------------------------------ faults from outside

PAUSED = Path(__file__).with_name("paused_quantize.py")


def start_paused(where, tiny, small_data, out, tmp_path, *extra):
    """A real ``gsr quantize`` subprocess paused at ``where``: (process, marker, go)."""
    marker, go = tmp_path / f"paused-{where}", tmp_path / f"go-{where}"
    argv = ["quantize", "--model", str(tiny), "--recipe", "gsr_w4a16_g64_gptq", "--output", str(out),
            "--calib-samples", "2", "--calib-len", "16", "--data-dir", str(small_data), *extra]
    # SIGINT as a terminal delivers it, whatever this process inherited: a shell that
    # starts jobs in the background (nohup, `&` in a script) sets it to ignored
    process = subprocess.Popen([sys.executable, str(PAUSED), where, str(marker), str(go), "--", *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"never reached the pause ({where}): {process.communicate()[1][-3000:]}")
        time.sleep(0.1)
    return process, marker, go


@pytest.mark.parametrize("stop, where, during", [
    (signal.SIGINT, "gptq", "during calibration and quantization"),
    (signal.SIGTERM, "gptq", "during calibration and quantization"),
    (signal.SIGINT, "save", "while writing the checkpoint"),
    (signal.SIGTERM, "save", "while writing the checkpoint"),
])
def test_an_interrupted_quantize_leaves_nothing_and_says_what_it_stopped(
    tiny_checkpoints, small_data, tmp_path, stop, where, during
):
    out = tmp_path / "ckpt"
    process, _, _ = start_paused(where, tiny_checkpoints["llama"], small_data, out, tmp_path)
    process.send_signal(stop)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + stop, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last == f"gsr quantize: interrupted by {stop.name} {during}; nothing was written at {out}", last
    assert not out.exists() and leftovers(tmp_path) == []


def test_after_an_interrupt_the_same_command_succeeds(tiny_checkpoints, small_data, tmp_path, capsys):
    from gsr_plugin.cli.main import main

    out = tmp_path / "ckpt"
    process, _, _ = start_paused("save", tiny_checkpoints["llama"], small_data, out, tmp_path)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == 143
    argv = ["quantize", "--model", str(tiny_checkpoints["llama"]), "--recipe", "gsr_w4a16_g64_gptq", "--output",
            str(out), "--calib-samples", "2", "--calib-len", "16", "--data-dir", str(small_data)]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / PROVENANCE_FILE).is_file() and leftovers(tmp_path) == []


def test_a_killed_run_is_cleaned_by_the_next_one_which_says_so(tmp_path, capsys):
    """SIGKILL cannot be caught: its staging directory stays until the next run."""
    out = tmp_path / "ckpt"
    for stale in (f".ckpt.partial-{2 ** 22 + 1}", f".ckpt.old-{2 ** 22 + 2}"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "model.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / ".other.partial-1").mkdir()  # another output's: not ours to remove
    with claim_output(out):
        assert leftovers(tmp_path) == [".ckpt.lock", ".other.partial-1"]
    err = capsys.readouterr().err
    assert err.count("left by a gsr quantize that was killed before it finished") == 2
    assert leftovers(tmp_path) == [".other.partial-1"]


def test_two_runs_on_one_output_one_wins_the_other_fails_at_once(tiny_checkpoints, small_data, tmp_path, capsys):
    from gsr_plugin.cli.main import main

    out = tmp_path / "ckpt"
    first, _, go = start_paused("gptq", tiny_checkpoints["llama"], small_data, out, tmp_path)
    argv = ["quantize", "--model", str(tiny_checkpoints["llama"]), "--recipe", "gsr_w4a16_g64_gptq", "--output",
            str(out), "--overwrite", "--data-dir", str(small_data)]
    assert main(argv) == 2
    assert f"{out} is being written by another gsr quantize (pid {first.pid})" in capsys.readouterr().err
    go.write_text("go")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "recipe.yaml", "tokenizer.json",
         "tokenizer_config.json", PROVENANCE_FILE]
    )
    assert leftovers(tmp_path) == []  # no lock, no staging directory


def full_disk_quantize(tiny, small_data, out, capsys):
    from gsr_plugin.cli.main import main

    code = main(["quantize", "--model", str(tiny), "--recipe", "gsr_w4a16_g64_gptq", "--output", str(out),
                 "--calib-samples", "2", "--calib-len", "16", "--data-dir", str(small_data)])
    return code, capsys.readouterr().err


def test_a_full_disk_leaves_nothing_and_names_the_path_and_bytes(tiny_checkpoints, small_data, tmp_path, capsys, monkeypatch):
    """Injected: the weights file fails half written with ENOSPC, as the OS reports it."""
    import errno

    import transformers.modeling_utils as modeling_utils

    def full(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\0" * 5000)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    out = tmp_path / "ckpt"
    code, err = full_disk_quantize(tiny_checkpoints["llama"], small_data, out, capsys)
    assert code == 2, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert f"no space left on the device of {tmp_path} while writing the checkpoint" in line
    assert "bytes written before the disk filled" in line and "bytes free" in line
    assert f"nothing was written at {out}" in line
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (skipped where this machine does not let the tests mount one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()[:200]}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_really_full_disk(tiny_checkpoints, small_data, small_disk, capsys):
    """A real full filesystem: safetensors reports it as its own error, not an OSError."""
    out = small_disk / "ckpt"
    code, err = full_disk_quantize(tiny_checkpoints["llama"], small_data, out, capsys)
    assert code == 2, err[-2000:]
    assert f"no space left on the device of {small_disk}" in err.strip().splitlines()[-1]
    assert list(small_disk.iterdir()) == []


def test_the_global_rng_does_not_change_the_checkpoint(tiny_checkpoints, small_data, tmp_path):
    """The calibration windows are a seeded draw and reach GPTQ in that order: llm-compressor's
    default shuffle drew the order from torch's global RNG, so what ran before changed the
    weights (GPTQ's Hessian sums in another order)."""
    files = []
    for name, global_seed in (("a", 1), ("b", 2)):
        with torch.random.fork_rng(devices=[]):  # the tests after this one keep their RNG state
            torch.manual_seed(global_seed)
            out = quantize(str(tiny_checkpoints["llama"]), "gsr_w8a8_gptq", tmp_path / name,
                           calib_samples=8, calib_len=32, data_dir=small_data)
        files.append((out / "model.safetensors").read_bytes())
    assert files[0] == files[1]
