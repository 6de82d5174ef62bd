"""Colour PSF grids (Gy, Gx, C, k, k): each channel blurred by its own PSFs, checked against an
independent per-channel brute force, the mono operator, and dense adjoints."""

import numpy as np
import pytest
import torch

import physics
from helpers import brute_force_matrix


def colour_grid(H=11, W=13, k=5, G=3):
    """Three different grids stacked on axis 2: channel c is its own random_iid draw."""
    sim = physics.SVBlurSimulator(H, W, k, G, dtype=torch.float64)
    grids = [sim.simulate_sv_kernel_grid("random_iid", seed=s, max_length=4, max_radius=2, sigma_scale=0.4)
             for s in (4, 5, 6)]
    return torch.stack(grids, 2)


def pc(K, form, boundary="reflect"):
    return dict(blur_mode="motion", n_eigen_psfs=K, form=form, boundary=boundary, interpolation="bilinear")


@pytest.mark.parametrize("form", physics.FORMS)
@pytest.mark.parametrize("boundary", physics.BOUNDARIES)
def test_colour_forward_and_adjoint_against_per_channel_brute_force(form, boundary):
    H, W = 11, 13
    grid = colour_grid(H, W)
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eig, grid_op, dec = physics.build_operators(grid, H, W, pc(9, form, boundary))   # K = G²: full rank
    assert dec.colour and eig.colour and grid_op.channels == 3
    for c in range(3):
        M = brute_force_matrix(grid[:, :, c], H, W, form, boundary)
        ref, ref_t = M @ x[0, c].numpy().ravel(), M.T @ y[0, c].numpy().ravel()
        for op in (eig, grid_op):
            np.testing.assert_allclose(op(x)[0, c].numpy().ravel(), ref, atol=1e-12)
            np.testing.assert_allclose(op.adjoint(y)[0, c].numpy().ravel(), ref_t, atol=1e-12)


def test_equal_channels_give_exactly_the_mono_result():
    H, W = 20, 22
    mono = colour_grid(H, W)[:, :, 0].contiguous()
    same = mono[:, :, None].expand(-1, -1, 3, -1, -1).contiguous()
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for form in physics.FORMS:
        a = physics.build_operators(mono, H, W, pc(4, form))
        b = physics.build_operators(same, H, W, pc(4, form))
        assert not b[2].colour
        for op_a, op_b in zip(a[:2], b[:2]):
            assert torch.equal(op_a(x), op_b(x)) and torch.equal(op_a.adjoint(x), op_b.adjoint(x))


def test_colour_truncated_operator_is_exactly_adjoint_and_per_channel():
    """At K < G² the colour operator is, channel by channel, the mono operator of that channel's
    grid (one decomposition per channel), and its adjoint identity holds to float64 precision."""
    H, W = 24, 20
    grid = colour_grid(H, W, k=5, G=3)
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for form in physics.FORMS:
        op, _ = physics.build_eigen_operator(grid, H, W, pc(3, form))
        lhs, rhs = float((op(x) * y).sum()), float((x * op.adjoint(y)).sum())
        assert abs(lhs - rhs) < 1e-12 * abs(lhs)
        for c in range(3):
            mono, _ = physics.build_eigen_operator(grid[:, :, c], H, W, pc(3, form))
            torch.testing.assert_close(op(x)[:, c], mono(x[:, c:c + 1])[:, 0], rtol=1e-12, atol=1e-13)


def test_colour_stacked_operator_is_each_images_own():
    H = W = 16
    decomps = [physics.compute_eigen_decomposition(colour_grid(H, W, G=3) ** p, 4, H, W) for p in (1, 2)]
    both = physics.SVBlurOperator.stacked(decomps)
    x = torch.rand(4, 3, H, W, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    Ax, ATx = both(x), both.adjoint(x)
    for b, d in enumerate(decomps):
        op = physics.SVBlurOperator(d)
        torch.testing.assert_close(Ax[2 * b:2 * b + 2], op(x[2 * b:2 * b + 2]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ATx[2 * b:2 * b + 2], op.adjoint(x[2 * b:2 * b + 2]), rtol=1e-12, atol=1e-12)


def test_colour_grid_refuses_other_channel_counts_and_layouts():
    H, W = 11, 13
    grid = colour_grid(H, W)
    eig, grid_op, _ = physics.build_operators(grid, H, W, pc(3, "gather"))
    for op in (eig, grid_op):
        with pytest.raises(ValueError, match="3 colour channels; the image has 1"):
            op(torch.rand(1, 1, H, W, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(Gy, Gx, C, k, k\)"):
        physics.validate_kernel_grid(grid.permute(0, 1, 3, 4, 2))


def test_explained_variance_is_per_channel():
    H = W = 16
    grid = colour_grid(H, W)
    grid[:, :, 1] = grid[1, 1, 1]            # green: one PSF everywhere, nothing to explain
    dec = physics.compute_eigen_decomposition(grid, 2, H, W)
    ev = dec.explained_variance_per_channel
    assert len(ev) == 3 and ev[1] == 1.0 and 0 < ev[0] < 1 and 0 < ev[2] < 1
    assert dec.total_explained_variance == min(ev)
