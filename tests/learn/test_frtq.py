"""gsr_plugin.learn.frtq: the objective's terms against direct computations, and the
solver: exact at zero steps, lower objective after learning, deterministic."""

import pytest
import torch

from gsr_plugin.learn.frtq import FRTQProblem, Grid, LayerWeights, learn_rotations
from gsr_plugin.learn.objectives import grid_to_std_ratio
from gsr_plugin.learn.orthogonal import block_diagonal
from gsr_plugin.walsh import walsh_matrix

D, K, HEADS, HEAD_DIM, KV = 64, 16, 4, 16, 2
W4G16 = Grid(4, False, 16)
A4 = Grid(4, True, None)


def problem(seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    stream = torch.randn(300, D, generator=g)
    if outliers:  # a few channels carry most of the energy, as in LLMs
        stream[:, [3, 17, 40]] *= 12
    layers = [
        LayerWeights(
            readers=torch.randn(24, D, generator=g),
            v=torch.randn(KV * HEAD_DIM, D, generator=g),
            o=torch.randn(2 * K, HEADS * HEAD_DIM, generator=g),
            o_blocks=torch.tensor([1, 3]),
            down=torch.randn(K, 96, generator=g),
            down_blocks=torch.tensor([2]),
        )
        for _ in range(2)
    ]
    o_inputs = [torch.randn(50, HEADS, HEAD_DIM, generator=g) * torch.linspace(0.1, 4, HEAD_DIM) for _ in range(2)]
    return FRTQProblem(stream, o_inputs, layers, A4, W4G16)


def walsh_blocks(count, size):
    return walsh_matrix(size).expand(count, size, size).clone()


def test_terms_at_given_rotations_equal_direct_computation():
    p = problem()
    r1 = walsh_blocks(D // K, K).float()
    r2 = torch.linalg.qr(torch.randn(2, HEAD_DIM, HEAD_DIM))[0]
    terms = p.terms(r1, r2, smooth="exact")
    R1 = block_diagonal(r1)
    rho = lambda x, grid: grid_to_std_ratio(x, grid.bits, grid.symmetric, grid.group_size)  # noqa: E731
    torch.testing.assert_close(terms["act_stream"], rho(p.stream @ R1, A4).mean())
    o_act = torch.cat([rho((x @ r2[l]).reshape(50, -1), A4) for l, x in enumerate(p.o_inputs)])
    torch.testing.assert_close(terms["act_o_proj"], o_act.mean())
    l0, l1 = p.layers
    v = [torch.block_diag(*[r2[l]] * KV).T @ lw.v @ R1 for l, lw in enumerate(p.layers)]
    torch.testing.assert_close(terms["weight_v_proj"], torch.cat([rho(x, W4G16).flatten() for x in v]).mean())
    o = [(R1.T @ torch.cat([torch.zeros(K, HEADS * HEAD_DIM), lw.o[:K], torch.zeros(K, HEADS * HEAD_DIM), lw.o[K:]]))
         for lw in p.layers]  # rows of blocks 1 and 3 placed where they belong
    o = [(x[K:2 * K].clone(), x[3 * K:].clone()) for x in o]
    o = [torch.cat(pair) @ torch.block_diag(*[r2[l]] * HEADS) for l, pair in enumerate(o)]
    torch.testing.assert_close(terms["weight_o_proj"], torch.cat([rho(x, W4G16).flatten() for x in o]).mean())


def test_zero_steps_returns_the_initialization_exactly():
    p = problem()
    init = walsh_blocks(D // K, K)
    result = learn_rotations(p, init, walsh_blocks(2, HEAD_DIM), steps=0, progress=False)
    assert torch.equal(result.r1, init) and result.before == result.after


def test_learning_lowers_the_objective_below_walsh_and_stays_orthogonal():
    p = problem()
    result = learn_rotations(p, walsh_blocks(D // K, K), walsh_blocks(2, HEAD_DIM), steps=60, lr=2e-2, progress=False)
    assert result.objective_after < 0.95 * result.objective_before, (result.objective_before, result.objective_after)
    assert result.after["act_stream"] < result.before["act_stream"]
    assert result.after["act_o_proj"] < result.before["act_o_proj"]
    eye = torch.eye(K, dtype=torch.float64)
    assert (result.r1 @ result.r1.transpose(-1, -2) - eye).abs().max() < 1e-12


def test_learning_is_deterministic():
    a = learn_rotations(problem(), walsh_blocks(D // K, K), None, steps=10, progress=False)
    b = learn_rotations(problem(), walsh_blocks(D // K, K), None, steps=10, progress=False)
    assert torch.equal(a.r1, b.r1)


def test_weight_term_alone_can_be_learned():
    p = problem()
    p.activation_grid = None
    result = learn_rotations(p, walsh_blocks(D // K, K), None, steps=40, lr=2e-2, progress=False)
    assert set(result.before) == {"weight_readers", "weight_v_proj", "weight_o_proj", "weight_down_proj"}
    assert result.objective_after < result.objective_before


def test_learning_leaves_the_global_rng_alone():
    """It once reseeded it: every later draw (oneshot's calibration order included) changed."""
    state = torch.random.get_rng_state()
    learn_rotations(problem(), walsh_blocks(D // K, K), None, steps=2, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_learning_the_clip_lowers_the_clipped_objective_and_keeps_ratios_in_range():
    """Stream of 2 layers x 2 inputs (4 equal runs of 75 tokens) with outlier channels:
    the learned clips leave 1 where a clip pays, stay within [floor, 1], and the
    clipped objective ends below both the start and the rotations learned alone."""
    from gsr_plugin.learn.frtq import initial_clips

    p = problem()
    p.stream_runs = 4
    r1, r2 = walsh_blocks(D // K, K), walsh_blocks(2, HEAD_DIM)
    both = learn_rotations(p, r1, r2, steps=40, lr=0.05, progress=False, learn_clip=True, clip_floor=0.6)
    alone = learn_rotations(p, r1, r2, steps=40, lr=0.05, progress=False)
    assert set(both.clips) == {"stream", "o"} and both.clips["stream"].shape == (4,) and both.clips["o"].shape == (2,)
    values = torch.cat(list(both.clips.values()))
    assert (values >= 0.6).all() and (values <= 1).all() and (values < 0.99).any()
    assert both.objective_after < both.objective_before
    ones = initial_clips(p)
    assert p.loss(both.r1.float(), both.r2.float(), "exact", both.clips).item() < p.loss(
        alone.r1.float(), alone.r2.float(), "exact", ones).item()
    with pytest.raises(ValueError, match="equal runs"):
        learn_rotations(problem(), r1, r2, steps=1, progress=False, learn_clip=True)
