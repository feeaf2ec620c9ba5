"""gsr_plugin.learn.objectives: the grid-to-std ratio against a numpy reference, its
smooth surrogates, and what it measures."""

import math

import numpy as np
import pytest
import torch

from gsr_plugin.learn.objectives import grid_to_std_ratio, relative_rounding_error, smooth_max
from gsr_plugin.walsh import walsh_matrix


def reference_ratio(x: np.ndarray, bits: int, symmetric: bool, group: int | None) -> np.ndarray:
    rows = x.reshape(*x.shape[:-1], -1, group) if group else x[..., None, :]
    std = rows.std(axis=-1)
    if symmetric:
        step = 2 * np.abs(rows).max(axis=-1) / (2**bits - 1)
    else:
        step = (rows.max(axis=-1) - rows.min(axis=-1)) / (2**bits - 1)
    ratio = step / std
    return ratio if group else ratio[..., 0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [None, 16, 64])
def test_exact_ratio_matches_numpy(bits, symmetric, group):
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(bits), dtype=torch.float64) + 0.3
    out = grid_to_std_ratio(x, bits, symmetric, group)
    np.testing.assert_allclose(out.numpy(), reference_ratio(x.numpy(), bits, symmetric, group), rtol=1e-12)


def test_ratio_is_scale_invariant_and_flattening_outliers_lowers_it():
    x = torch.zeros(64, dtype=torch.float64)
    x[3] = 5.0
    x += 0.01 * torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    before = grid_to_std_ratio(x, 4)
    assert torch.allclose(grid_to_std_ratio(7.5 * x, 4), before)
    after = grid_to_std_ratio(x @ walsh_matrix(64), 4)  # the outlier spread over 64 values
    assert after < 0.2 * before  # measured: 1.06 -> 0.14


@pytest.mark.parametrize("kind", ["logsumexp", "pnorm"])
def test_surrogates_bound_the_max_and_tighten_with_sharpness(kind):
    z = torch.rand(10, 576, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    exact = smooth_max(z, "exact")
    gaps = [(smooth_max(z, kind, s) - exact).max().item() for s in (4.0, 16.0, 64.0)]
    assert min((smooth_max(z, kind, s) - exact).min().item() for s in (4.0, 16.0, 64.0)) >= -1e-12
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.2


def test_smooth_ratio_has_gradients_and_exact_is_the_limit():
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    grid_to_std_ratio(x, 4, False, 32, "logsumexp").sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    sharp = grid_to_std_ratio(x.detach(), 4, False, 32, "logsumexp", sharpness=500.0)
    torch.testing.assert_close(sharp, grid_to_std_ratio(x.detach(), 4, False, 32), rtol=2e-2, atol=0)


def test_rounding_error_follows_the_ratio():
    """Uniform rounding error is step/sqrt(12) per value: relative error ~ rho/sqrt(12)."""
    x = torch.randn(200, 256, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for bits in (3, 4, 6):
        rho = grid_to_std_ratio(x, bits, False).mean().item()
        err = relative_rounding_error(x, bits, False).mean().item()
        assert err == pytest.approx(rho / math.sqrt(12), rel=0.1), (bits, err, rho)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        grid_to_std_ratio(torch.randn(2, 100), 4, group_size=64)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clipped_ratio_is_the_clipped_grid_plus_the_clipping_error(symmetric):
    """At c = 1 it is rho; below, the grid shrinks by c and the values beyond the
    clipped range add 12 mean(excess^2) / var, written out with numpy."""
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)).double()
    x[:, 7] *= 9
    from gsr_plugin.learn.objectives import clipped_ratio

    assert torch.allclose(clipped_ratio(x, 4, symmetric, 1.0), grid_to_std_ratio(x, 4, symmetric), atol=1e-12)
    c = 0.7
    a = x.numpy()
    std = a.std(-1, keepdims=True)
    u = a / std
    if symmetric:
        high = np.abs(u).max(-1, keepdims=True)
        low = high
    else:
        high, low = np.maximum(u.max(-1, keepdims=True), 0), np.maximum(-u.min(-1, keepdims=True), 0)
    excess = np.maximum(u - c * high, 0) + np.maximum(-u - c * low, 0)
    expected = np.sqrt((c * (high + low) / 15) ** 2 + 12 * (excess**2).mean(-1, keepdims=True))[:, 0]
    assert np.allclose(clipped_ratio(x, 4, symmetric, c).numpy(), expected, atol=1e-12)
    # per-row clips broadcast over the rows of a batch of runs
    runs = clipped_ratio(x.reshape(1, 5, 64).expand(2, 5, 64), 4, symmetric, torch.tensor([1.0, c]))
    assert torch.allclose(runs[1], torch.from_numpy(expected)) and torch.allclose(runs[0], grid_to_std_ratio(x, 4, symmetric))
