"""GPTQ as the guard measures it: the same weights as llm-compressor's own GPTQ
(``quantize_weight``, no activation ordering) given the same grid, and lower output
error than round to nearest on the inputs it was calibrated on."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

from gsr_plugin.learn.gptq import gptq, grid_rounding, hessian
from gsr_plugin.learn.objectives import rounding_error


def _inputs(n=300, d=192, rows=24, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * torch.linspace(0.2, 3.0, d)  # uneven channels: GPTQ has work to do
    x[:, 5] = 0.0  # a column no input reaches
    return x, torch.randn(rows, d, generator=gen)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_is_llmcompressors_gptq(symmetric):
    x, w = _inputs()
    args = QuantizationArgs(num_bits=3, type="int", symmetric=symmetric, strategy="group", group_size=64, actorder=None)
    groups = w.reshape(w.shape[0], -1, 64)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    h = hessian(x).float()

    theirs, _, fallback = quantize_weight(w[None].clone(), h[None].clone(), scale[None], zero[None], None, args)
    assert not fallback.any()

    def ct_rounding(values, columns):  # compressed-tensors' rounding on the column's group
        g = columns.start // 64
        return fake_quantize(values.float(), scale[:, g:g + 1], zero[:, g:g + 1],
                             QuantizationArgs(num_bits=3, type="int", symmetric=symmetric, strategy="channel")).double()

    mine = gptq(w, h, ct_rounding)
    assert torch.allclose(mine.float(), theirs[0], atol=1e-4), (mine.float() - theirs[0]).abs().max()
    assert (mine[:, 5] == 0).all()


def test_gptq_lowers_the_output_error_of_round_to_nearest_on_its_grid():
    x, w = _inputs(seed=1)
    x = x @ torch.randn(192, 192, generator=torch.Generator().manual_seed(2))  # correlated inputs, as in a model
    rounding = grid_rounding(w, 3, False, 64)
    q = gptq(w, hessian(x), rounding)
    rtn = w.double() + rounding_error(w.double(), 3, False, 64)
    assert torch.allclose(rounding(w.double(), slice(0, 192)), rtn)  # the guard's grid: round to nearest's
    error = lambda wq: ((x.double() @ (wq - w.double()).T).norm() / (x.double() @ w.double().T).norm()).item()  # noqa: E731
    assert error(q) < 0.8 * error(rtn)
    # every value on its group's grid: rounding it again changes nothing
    assert torch.allclose(torch.cat([rounding(q[:, j:j + 1], slice(j, j + 1)) for j in range(192)], 1), q)
