"""The example scripts run as tests, on the real default model and data (small settings)."""

import importlib.util
from pathlib import Path

import pytest

from gsr_plugin.eval.data import find_data_dir

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(find_data_dir() is None, reason="needs WikiText-2 (shared/data or GSR_DATA_DIR)")
def test_gsr_gptq_w4a16_example(default_model_dir, tmp_path, capsys):
    example = load_example("gsr_gptq_w4a16")
    result = example.main(
        ["--ppl-windows", "1", "--calib-samples", "4", "--calib-len", "128", "--output", str(tmp_path / "out")]
    )
    # SmolLM2 FP on the first window: ~17; 4-bit g64 with a tiny calibration stays near it
    assert 5 < result["fp"] < 40
    assert result["fp"] < result["quantized"] < 2 * result["fp"]
    assert (tmp_path / "out" / "recipe.yaml").is_file()
    assert "GSR + GPTQ W4A16 g64" in capsys.readouterr().out
