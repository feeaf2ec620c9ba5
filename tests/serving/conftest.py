"""Fixtures shared by the tests of ``gsr_plugin.serving``: small checkpoints of the
default model (made once per run) and this processor's vLLM kernels."""

import pytest

from gsr_plugin.serving.rules import probe_vllm_kernels

# Calibration text where no WikiText-2 is at hand (the check compares vLLM with
# transformers on the same checkpoint, so what it was calibrated on does not matter).
FALLBACK_CALIBRATION = (
    " = Rotations = \n A rotation of the residual stream spreads outlier channels over many"
    " others , so that a quantization grid fits the weights better . The model computes the"
    " same function , because every rotation is undone in the next layer . In 1995 the"
    " method was unknown ; today it runs on every machine , from phones to large servers . \n"
)


def calibration_data_dir(fallback):
    """The real data directory when there is one, else ``fallback`` laid out like it."""
    from gsr_plugin.eval.data import find_data_dir

    found = find_data_dir(None)
    if found is not None and (found / "wikitext2" / "valid.tokens").is_file():
        return str(found)
    (fallback / "wikitext2").mkdir(parents=True, exist_ok=True)
    (fallback / "wikitext2" / "valid.tokens").write_text(FALLBACK_CALIBRATION * 40)
    return str(fallback)


@pytest.fixture(scope="package")
def small_gsr_checkpoints(default_model_cut, tmp_path_factory):
    """The default model cut to 2 layers (real weights: confident predictions), then
    GSR + GPTQ W4A16 g64, GSR + W8A8 and FRTQ (learned rotations) + W4A16 g64 through
    `gsr quantize`'s code, and GSR + gptqmodel's GPTQ W4 g64 through its Optimum engine."""
    from gsr_plugin.cli.quantize import quantize

    root = tmp_path_factory.mktemp("serve")
    data_dir = calibration_data_dir(root / "data")
    out = {}
    for recipe in ("gsr_w4a16_g64_gptq", "gsr_w8a8_gptq", "frtq_w4a16_g64_gptq", "gsr_w4a16_g64_lr16_gptq"):
        out[recipe] = quantize(str(default_model_cut), recipe, root / recipe, calib_samples=4, calib_len=64, data_dir=data_dir)
    out["optimum_gsr_w4_g64"] = quantize(str(default_model_cut), "gsr_w4a16_g64_gptq", root / "optimum", calib_samples=4,
                                         calib_len=64, data_dir=data_dir, engine="optimum")
    return out


def cpu_has_avx512() -> bool:
    """The independent reference for which build vLLM loads: the kernel's CPU flags
    (none when the whole run simulates an AVX2 processor with GSR_VLLM_CPU_ISA=avx2)."""
    import os

    if os.environ.get("GSR_VLLM_CPU_ISA") == "avx2":
        return False
    with open("/proc/cpuinfo") as f:
        return " avx512f " in f.read().replace("\n", " ")


@pytest.fixture(scope="package")
def native_kernels():
    return probe_vllm_kernels()


