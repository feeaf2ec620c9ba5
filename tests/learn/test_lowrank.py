"""gsr_plugin.learn.lowrank against numpy: the truncated SVD is Eckart-Young's best
rank-r approximation, the activation-aware split minimizes the output error, and the
residual plus the rounded factors give back W."""

import numpy as np
import pytest
import torch

from gsr_plugin.learn.lowrank import activation_aware, low_rank_split, truncated_svd


def weight(out=48, inp=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("rank", [1, 8, 20])
def test_truncated_svd_is_the_best_rank_r_approximation(rank):
    w = weight()
    left, right = truncated_svd(w, rank)
    assert left.shape == (48, rank) and right.shape == (rank, 40)
    s = np.linalg.svd(w.numpy(), compute_uv=False)
    error = np.linalg.norm(w.numpy() - (left @ right).numpy())
    assert error == pytest.approx(np.sqrt((s[rank:] ** 2).sum()), rel=1e-10)  # Eckart-Young
    # the singular values are split evenly between the factors
    np.testing.assert_allclose(np.linalg.norm(left.numpy(), axis=0), np.linalg.norm(right.numpy(), axis=1), rtol=1e-10)


def test_activation_aware_minimizes_the_output_error():
    w = weight()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 500, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, 40, dtype=torch.float64)[:, None]
    h = x @ x.T
    left, right = activation_aware(w, h, 8, damping=0.0)
    aware = torch.linalg.norm((w - left @ right) @ x)
    plain_l, plain_r = truncated_svd(w, 8)
    plain = torch.linalg.norm((w - plain_l @ plain_r) @ x)
    assert aware < 0.8 * plain, (aware, plain)  # measured 0.43x on these inputs
    # the optimum: the output-space truncated SVD of W X has this error
    s = np.linalg.svd((w @ x).numpy(), compute_uv=False)
    assert float(aware) == pytest.approx(np.sqrt((s[8:] ** 2).sum()), rel=1e-8)


def test_identity_inputs_give_the_plain_svd():
    w = weight()
    left, right = activation_aware(w, torch.eye(40, dtype=torch.float64), 6)
    plain_l, plain_r = truncated_svd(w, 6)
    torch.testing.assert_close(left @ right, plain_l @ plain_r, atol=1e-10, rtol=0)


@pytest.mark.parametrize("hessian", [None, "inputs"])
def test_residual_and_rounded_factors_give_back_the_weight(hessian):
    w = weight().float()
    h = None if hessian is None else (lambda x: x @ x.T)(torch.randn(40, 200, dtype=torch.float64))
    left, right, residual = low_rank_split(w, 8, h, torch.float16)
    assert left.dtype == right.dtype == torch.float16 and residual.dtype == torch.float32
    rebuilt = residual.double() + left.double() @ right.double()
    assert (rebuilt - w.double()).abs().max() < 1e-6  # float32 rounding of E
    assert torch.linalg.norm(residual) < torch.linalg.norm(w)  # the top directions left W
