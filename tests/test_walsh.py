"""gsr_plugin.walsh against independent references: Sylvester's recursion in numpy,
rows sorted by counted sign changes, scipy-free block diagonals."""

import numpy as np
import pytest
import torch

from gsr_plugin.walsh import (
    DENSE_MAX_BLOCK,
    check_block_size,
    fwht,
    grouped_rotation,
    grouped_walsh_transform,
    natural_walsh,
    random_signs,
    sequency_permutation,
    sequency_walsh,
    walsh_matrix,
)

SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def sylvester_reference(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def sign_changes(rows: np.ndarray) -> np.ndarray:
    return (np.diff(np.sign(rows), axis=1) != 0).sum(axis=1)


def sequency_reference(n: int) -> np.ndarray:
    """The definition: Sylvester rows sorted by their number of sign changes."""
    h = sylvester_reference(n)
    return h[np.argsort(sign_changes(h), kind="stable")]


@pytest.mark.parametrize("n", SIZES)
def test_sequency_walsh_is_sylvester_sorted_by_sign_changes(n):
    ours = walsh_matrix(n, "sequency", normalized=False).numpy()
    np.testing.assert_array_equal(ours, sequency_reference(n))
    np.testing.assert_array_equal(sign_changes(ours), np.arange(n))


@pytest.mark.parametrize("n", SIZES)
def test_sequency_row_map_is_bitrev_of_gray(n):
    bits = max(n.bit_length() - 1, 0)
    expected = [int(format(s ^ (s >> 1), f"0{bits}b")[::-1] or "0", 2) for s in range(n)]
    assert sequency_permutation(n).tolist() == expected


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("ordering", ["sequency", "natural"])
def test_normalized_walsh_is_orthonormal_and_symmetric(n, ordering):
    w = walsh_matrix(n, ordering)
    torch.testing.assert_close(w @ w.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(w, w.T)  # the fast transform relies on this


def test_natural_walsh_is_sylvester():
    np.testing.assert_array_equal(natural_walsh(64).numpy() * 8, sylvester_reference(64))
    torch.testing.assert_close(sequency_walsh(64) * 8, walsh_matrix(64, normalized=False))


def test_walsh_matrix_returns_a_private_copy():
    w = walsh_matrix(8)
    w.zero_()
    assert walsh_matrix(8).abs().sum() > 0


@pytest.mark.parametrize("bad", [3, 12, 576])
def test_non_power_of_two_sizes_raise_instead_of_padding(bad):
    with pytest.raises(ValueError, match="powers of two"):
        walsh_matrix(bad)
    with pytest.raises(ValueError, match="powers of two"):
        fwht(torch.ones(3, bad))


def test_size_zero_raises():
    with pytest.raises(ValueError, match="powers of two"):
        walsh_matrix(0)


def test_grouped_rotation_is_block_diagonal_of_reference_blocks():
    ref = sequency_reference(64) / 8
    expected = np.kron(np.eye(9), ref)  # SmolLM2: hidden 576 = 9 blocks of 64
    np.testing.assert_allclose(grouped_rotation(576, 64).numpy(), expected, atol=1e-15)
    r = grouped_rotation(576, 64, "natural")
    np.testing.assert_allclose(r.numpy(), np.kron(np.eye(9), sylvester_reference(64) / 8), atol=1e-15)


def test_grouped_rotation_with_signs_is_orthogonal():
    signs = random_signs(576, torch.Generator().manual_seed(0))
    r = grouped_rotation(576, 64, signs=signs)
    torch.testing.assert_close(r @ r.T, torch.eye(576, dtype=torch.float64), atol=1e-12, rtol=0)
    block_signs = signs[:64]
    torch.testing.assert_close(
        grouped_rotation(576, 64, signs=block_signs), grouped_rotation(576, 64, signs=block_signs.repeat(9))
    )


@pytest.mark.parametrize(
    "dim,block,fix",
    [(576, 128, "use 64"), (576, 48, "not a power of two"), (896, 256, "use 128"), (100, 8, "use 4")],
)
def test_block_size_errors_name_the_fix(dim, block, fix):
    # 576 SmolLM2, 896 Qwen2.5-0.5B
    with pytest.raises(ValueError, match=fix):
        check_block_size(dim, block, "hidden_size")
    with pytest.raises(ValueError, match=fix):
        grouped_rotation(dim, block)


def test_signs_of_the_wrong_length_raise():
    with pytest.raises(ValueError, match="signs must have"):
        grouped_rotation(128, 32, signs=torch.ones(16))


@pytest.mark.parametrize("n", [1, 2, 16, 32, 256, 512, 4096])
def test_fwht_equals_sylvester_product(n):
    x = torch.randn(5, n, dtype=torch.float64)
    expected = x.numpy() @ sylvester_reference(n)
    np.testing.assert_allclose(fwht(x).numpy(), expected, atol=1e-9 * max(1, np.log2(n)), rtol=0)


@pytest.mark.parametrize("block", [1, 2, 16, 64, 256, 1024])
@pytest.mark.parametrize("ordering", ["sequency", "natural"])
@pytest.mark.parametrize("method", ["fast", "dense"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("sign_kind", [None, "block", "dim"])
def test_grouped_walsh_transform_equals_dense_product(block, ordering, method, transpose, sign_kind):
    dim = 2048
    x = torch.randn(3, 2, dim, dtype=torch.float64)
    gen = torch.Generator().manual_seed(block)
    signs = None if sign_kind is None else random_signs(block if sign_kind == "block" else dim, gen)
    rot = grouped_rotation(dim, block, ordering, signs)
    expected = x @ (rot.T if transpose else rot)
    out = grouped_walsh_transform(x, block, ordering, signs, transpose=transpose, method=method)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_error_is_relative_to_dtype(dtype, tol):
    x = torch.randn(8, 4096)
    expected = x.double() @ grouped_rotation(4096, 1024)
    out = grouped_walsh_transform(x.to(dtype), 1024, method="fast")
    assert out.dtype == dtype
    err = ((out.double() - expected).abs().max() / expected.abs().max()).item()
    assert err < tol, f"relative error {err:.2e} above {tol:.0e} for {dtype}"


@pytest.mark.parametrize("method", ["fast", "dense"])
def test_transposed_weight_slices_give_the_contiguous_result(method):
    """Fusing at a linear's outputs rotates the columns of ``W.T``: a strided view.
    The product equals the one on a contiguous copy (and runs the contiguous kernel:
    the strided one took 17 s for a 896 x 128 slice, benchmarks/cost.py --only scale)."""
    w = torch.randn(128, 896, dtype=torch.float64)
    strided = w.T
    assert not strided.is_contiguous()
    expected = strided.contiguous() @ grouped_rotation(128, 64)
    torch.testing.assert_close(grouped_walsh_transform(strided, 64, method=method), expected, atol=1e-12, rtol=0)


def test_transform_round_trip_is_identity():
    x = torch.randn(4, 576, dtype=torch.float64)
    signs = random_signs(64, torch.Generator().manual_seed(1))
    y = grouped_walsh_transform(x, 64, signs=signs)
    back = grouped_walsh_transform(y, 64, signs=signs, transpose=True)
    torch.testing.assert_close(back, x, atol=1e-12, rtol=0)


def test_auto_method_switches_at_the_measured_threshold(monkeypatch):
    calls = []
    import gsr_plugin.walsh as walsh

    real = walsh.fwht
    monkeypatch.setattr(walsh, "fwht", lambda x: calls.append(x.shape[-1]) or real(x))
    grouped_walsh_transform(torch.randn(2, 1024), DENSE_MAX_BLOCK)
    assert calls == []
    grouped_walsh_transform(torch.randn(2, 1024), DENSE_MAX_BLOCK * 2)
    assert calls == [DENSE_MAX_BLOCK * 2]


def test_random_signs_follow_the_seed():
    a = random_signs(64, torch.Generator().manual_seed(3))
    b = random_signs(64, torch.Generator().manual_seed(3))
    c = random_signs(64, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.tolist()) == {-1.0, 1.0}
