"""gsr_plugin.learn.orthogonal: the parameterization stays orthogonal and starts at
its initialization; block products against dense references."""

import torch

from gsr_plugin.learn.orthogonal import (
    OrthogonalMatrices,
    block_diagonal,
    orthogonality_error,
    rotate_inputs,
    rotate_output_blocks,
)
from gsr_plugin.walsh import walsh_matrix


def test_zero_generator_is_the_initialization_exactly():
    init = walsh_matrix(64).expand(9, 64, 64).clone()  # SmolLM2: hidden 576 = 9 x 64
    q = OrthogonalMatrices(init).matrices(torch.float64)
    assert torch.equal(q, init)


def test_any_generator_gives_orthogonal_matrices():
    module = OrthogonalMatrices(walsh_matrix(32).expand(3, 32, 32).clone())
    with torch.no_grad():
        module.generator.copy_(torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0)))
    q = module.matrices(torch.float64)
    assert orthogonality_error(q) < 1e-12
    assert (q - module.init).abs().max() > 0.1  # and it moved


def test_rotate_inputs_is_the_block_diagonal_product():
    blocks = OrthogonalMatrices(torch.linalg.qr(torch.randn(4, 16, 16, dtype=torch.float64))[0]).matrices(torch.float64)
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    torch.testing.assert_close(rotate_inputs(x, blocks), x @ block_diagonal(blocks), atol=1e-12, rtol=0)


def test_rotate_output_blocks_is_rows_of_the_transposed_product():
    blocks = torch.linalg.qr(torch.randn(4, 16, 16, dtype=torch.float64))[0]
    w = torch.randn(64, 40, dtype=torch.float64)
    full = block_diagonal(blocks).T @ w
    torch.testing.assert_close(rotate_output_blocks(w, blocks), full, atol=1e-12, rtol=0)
    index = torch.tensor([2, 0])
    expected = torch.cat([full[32:48], full[0:16]])
    torch.testing.assert_close(rotate_output_blocks(w, blocks, index), expected, atol=1e-12, rtol=0)
