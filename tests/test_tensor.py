"""Whitening, the tensor power method, un-whitening and per-expert scales on exact (population) inputs."""

import math

import pytest
import torch

from pyromoe.core.links import LINKS, gaussian_expectation
from pyromoe.core.tensor import expert_scales, tensor_power_method, unwhiten, whiten

F64 = torch.float64


def _cube(weights, vectors):
    """sum_i weights[i] vectors[i]^(x)3 for rows of vectors."""
    return torch.einsum("i,ia,ib,ic->abc", weights, vectors, vectors, vectors)


def _experts(k=2, d=6, seed=0, norms=None):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(k, d, generator=gen, dtype=F64)
    a = a / a.norm(dim=-1, keepdim=True)
    if norms is not None:
        a = a * torch.tensor(norms, dtype=F64)[:, None]
    return a


def test_whiten_makes_t2_identity_on_its_top_k_space():
    a = _experts(3, 7)
    t2 = a.T @ a
    w = whiten(t2, 3)
    torch.testing.assert_close(w.projection.T @ t2 @ w.projection, torch.eye(3, dtype=F64))
    assert w.eigengap == pytest.approx(float(w.eigenvalues[2] / w.eigenvalues[0]), abs=1e-9)
    assert w.condition_number >= 1.0


def test_whiten_keeps_negative_eigenvalues_with_their_sign():
    t2 = torch.diag(torch.tensor([2.0, -1.0, 0.0], dtype=F64))
    w = whiten(t2, 2)
    assert w.signs.tolist() == [1.0, -1.0]
    torch.testing.assert_close(w.projection.T @ t2 @ w.projection, torch.diag(w.signs))


def test_whiten_refuses_rank_deficient_t2():
    a = _experts(1, 5)
    t2 = a.T @ a + 1e-3 * torch.eye(5, dtype=F64)
    with pytest.raises(ValueError, match="the data look like fewer than 2 experts"):
        whiten(t2, 2, noise_floor=0.01)


def test_tensor_power_method_recovers_an_orthogonal_decomposition():
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=F64))
    weights = torch.tensor([5.0, 3.0, 2.0, 1.0], dtype=F64)
    out = tensor_power_method(_cube(weights, q.T), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.eigenvalues, weights, atol=1e-10, rtol=0)
    # eigenvectors match the columns of q up to order (sorted by eigenvalue here)
    torch.testing.assert_close(out.eigenvectors.abs(), q.abs(), atol=1e-8, rtol=0)
    assert out.residual < 1e-10


def test_tensor_power_method_is_reproducible_from_its_generator():
    t = torch.randn(3, 3, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    t = (t + t.permute(1, 0, 2) + t.permute(2, 1, 0) + t.permute(0, 2, 1)) / 4
    one = tensor_power_method(t, generator=torch.Generator().manual_seed(5))
    two = tensor_power_method(t, generator=torch.Generator().manual_seed(5))
    assert torch.equal(one.eigenvectors, two.eigenvectors)


@pytest.mark.parametrize("k", [2, 3])
def test_linear_population_moments_recover_experts_exactly(k):
    a = _experts(k, 8, seed=3)
    if k == 2:  # T2 = sum a a^T, T3 = 3 sum a^(x)3
        t2, w3 = a.T @ a, torch.full((k,), 3.0, dtype=F64)
    else:  # k > 2, equal norms, orthogonal gate with mixing weights p: T2 = 2 sum p a a^T
        p = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
        t2, w3 = (2 * p[:, None] * a).T @ a, 6 * p
    w = whiten(t2, k)
    m = w.projection
    t3 = torch.einsum("abc,ai,bj,ck->ijk", _cube(w3, a), m, m, m)
    dec = tensor_power_method(t3)
    weights = expert_scales(LINKS["linear"], unwhiten(w, dec.eigenvectors), dec.eigenvalues)
    dist = torch.cdist(weights, a)
    assert float(dist.min(dim=0).values.max()) < 1e-8


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_odd_link_scales_and_signs_come_from_the_first_moment(name):
    link = LINKS[name]
    a = _experts(2, 6, seed=4, norms=[1.3, 0.7])
    norms = a.norm(dim=-1)
    units = a / norms[:, None]
    kappa1 = torch.stack([gaussian_expectation(link, r, 1, 1) / 2 for r in norms])
    first = (kappa1[:, None] * units).sum(0)  # E[y z] = sum_i kappa1(|a_i|) a_i / |a_i|
    kappa2 = torch.stack([gaussian_expectation(link, r, 2, 2) / 2 for r in norms])
    # the decomposition's directions come with arbitrary signs: flip the second one
    directions = units * kappa2.sqrt()[:, None] * torch.tensor([1.0, -1.0], dtype=F64)[:, None]
    out = expert_scales(link, directions, torch.ones(2, dtype=F64), first_moment=first)
    torch.testing.assert_close(out, a, atol=1e-3, rtol=0)


def test_relu_scales_solve_the_t2_equation_with_beta():
    a = _experts(2, 6, seed=5, norms=[1.0, 1.0])
    beta = -2 * math.sqrt(2 / math.pi)
    kappa2 = (
        gaussian_expectation(LINKS["relu"], 1.0, 2, 2)
        + beta * gaussian_expectation(LINKS["relu"], 1.0, 1, 2)
    ) / 2
    directions = a * math.sqrt(float(kappa2))
    out = expert_scales(LINKS["relu"], directions, torch.ones(2, dtype=F64), beta=beta)
    torch.testing.assert_close(out, a, atol=1e-5, rtol=0)


def test_expert_scales_needs_first_moment_for_tanh():
    with pytest.raises(ValueError, match="first_moment is needed"):
        expert_scales(LINKS["tanh"], torch.eye(2, 3, dtype=F64), torch.ones(2, dtype=F64))
