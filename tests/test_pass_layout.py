"""The per-chunk sums of the EM pass and the moment passes in their fast layouts (rows of length
n, Grams of ``sqrt(w) x``, one product for all weighted sums) equal an independent dense
computation."""

import pytest
import torch

from pyromoe.core.em.statistics import pass_statistics
from pyromoe.core.likelihood import (
    linear_predictor_rows,
    linear_predictors,
    responsibilities,
)
from pyromoe.core.links import get_link
from pyromoe.core.moments import second_moments
from pyromoe.core.params import Params

F64 = torch.float64


def _params(k, d, gate_d, bias, generator, per_expert=False):
    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=F64)

    noise = draw(k).abs() + 0.5 if per_expert else torch.tensor(0.7, dtype=F64)
    return Params(
        draw(k, d),
        draw(k) if bias else None,
        draw(k - 1, gate_d),
        draw(k - 1) if bias else None,
        noise,
    )


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_predictor_rows_are_linear_predictors_transposed(k, split, bias):
    generator = torch.Generator().manual_seed(k)
    d, gate_d = 4, (3 if split else 4)
    x = torch.randn(50, d + (gate_d if split else 0), generator=generator, dtype=F64)
    params = _params(k, d, gate_d, bias, generator)
    predictors, logits = linear_predictors(x, params)
    rows, logit_rows = linear_predictor_rows(x, params)
    assert torch.allclose(rows, predictors.T, rtol=0, atol=1e-13)
    assert torch.allclose(logit_rows, logits.T, rtol=0, atol=1e-13)


def _design(x, bias):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=F64)], 1) if bias else x


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("link_name", ["linear", "tanh"])
@pytest.mark.parametrize("per_expert", [False, True])
def test_pass_statistics_equal_dense_sums(k, link_name, per_expert):
    generator = torch.Generator().manual_seed(10 + k)
    n, d = 300, 5
    link = get_link(link_name)
    x = torch.randn(n, d, generator=generator, dtype=F64)
    y = torch.randn(n, generator=generator, dtype=F64)
    params = _params(k, d, d, True, generator, per_expert)
    stats = pass_statistics(x, y, params, link, True, True)
    resp = responsibilities(x, y, params, link)  # (n, k), torch.softmax: independent
    u = _design(x, True)
    z = u @ torch.cat([params.experts_weight, params.experts_bias[:, None]], 1).T
    if link.is_identity:
        weights, rhs = resp, resp * y[:, None]
    else:
        derivative = link.derivative(z)
        weights, rhs = resp * derivative**2, resp * derivative * (y[:, None] - link(z))
    dense = torch.einsum("ni,na,nb->iab", weights, u, u)
    assert torch.allclose(stats.expert_matrix, dense, rtol=1e-12, atol=1e-10)
    assert torch.allclose(stats.expert_vector, rhs.T @ u, rtol=1e-12, atol=1e-10)
    assert torch.allclose(stats.responsibility, resp.sum(0), rtol=1e-12)
    gate = torch.softmax(
        torch.cat(
            [
                torch.zeros(n, 1, dtype=F64),
                u @ torch.cat([params.gate_weight, params.gate_bias[:, None]], 1).T,
            ],
            1,
        ),
        -1,
    )[:, 1:]
    assert torch.allclose(stats.gate_gradient, (resp[:, 1:] - gate).T @ u, atol=1e-10)
    free = k - 1
    hessian = torch.einsum(
        "nab,ni,nj->aibj",
        torch.diag_embed(gate) - gate[:, :, None] * gate[:, None, :],
        u,
        u,
    ).reshape(free * (d + 1), free * (d + 1))
    assert torch.allclose(stats.gate_hessian, hessian, rtol=1e-12, atol=1e-10)
    squared = (resp * (y[:, None] - link(z)) ** 2).sum(0)
    assert torch.allclose(stats.squared_error, squared, rtol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.8])
def test_second_moments_weighted_gram_equals_dense(beta):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(400, 6, generator=generator, dtype=F64)
    y = torch.randn(400, generator=generator, dtype=F64)
    moments = second_moments(x, y, centre=0.2, beta=beta, chunk_size=128)
    yc = y - 0.2
    p = yc * (yc + beta)
    xc = x - x.mean(0)
    dense = (xc * p[:, None]).T @ xc / 400
    assert torch.allclose(moments.weighted, dense, rtol=1e-12, atol=1e-13)
    assert torch.allclose(moments.covariance, xc.T @ xc / 400, rtol=1e-12, atol=1e-13)


def _independent_log_likelihood(x, y, params, link):
    """``log sum_i gate_i N(y | g(a_i . x + b_i), sigma_i^2)`` from torch.distributions, draw by
    draw (batch dimensions flattened), with the gate's softmax written out."""
    from pyromoe.core.likelihood import expert_means, gate_logits

    means = expert_means(x, params.experts_weight, params.experts_bias, link)  # (..., n, k)
    logits = gate_logits(x, params.gate_weight, params.gate_bias)
    sd = params.expert_noise().unsqueeze(-2)
    component = torch.distributions.Normal(means, sd).log_prob(y.unsqueeze(-1))
    return torch.logsumexp(component + logits - torch.logsumexp(logits, -1, keepdim=True), -1)


def _independent_responsibilities(x, y, params, link):
    """``p(expert i | x_n, y_n)`` by Bayes' rule on torch.distributions' densities."""
    from pyromoe.core.likelihood import expert_means, gate_logits

    means = expert_means(x, params.experts_weight, params.experts_bias, link)
    logits = gate_logits(x, params.gate_weight, params.gate_bias)
    sd = params.expert_noise().unsqueeze(-2)
    joint = torch.distributions.Normal(means, sd).log_prob(y.unsqueeze(-1)).exp() * torch.softmax(
        logits, -1
    )
    return joint / joint.sum(-1, keepdim=True)


@pytest.mark.parametrize("batch", [(), (5,), (2, 3)])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("per_expert", [False, True])
@pytest.mark.parametrize("link", ["linear", "tanh", "relu"])
def test_log_likelihood_by_expert_rows_equals_torch_distributions(batch, k, per_expert, link):
    """``log_likelihood`` and ``responsibilities`` (expert by expert on rows of length n,
    normalisers as elementwise operations between rows) equal the mixture written with
    torch.distributions to 1e-12, for
    batched draws, one to three experts, a split design (gate covariates), with and without
    biases; its autograd gradient equals that of the independent form."""
    from pyromoe.core.likelihood import log_likelihood

    generator = torch.Generator().manual_seed(len(batch) * 10 + k)
    for split, bias in ((False, True), (True, True), (False, False)):
        d, gate_d, n = 3, (2 if split else 3), 40
        x = torch.randn(n, d + (gate_d if split else 0), generator=generator, dtype=F64)
        y = torch.randn(n, generator=generator, dtype=F64)

        def draw(*shape):
            return torch.randn((*batch, *shape), generator=generator, dtype=F64)

        noise = draw(*((k,) if per_expert else ())).abs() + 0.3
        params = Params(
            draw(k, d), draw(k) if bias else None, 2 * draw(k - 1, gate_d),
            draw(k - 1) if bias else None, noise,
        )  # fmt: skip
        if k == 1 and split:
            continue
        got = log_likelihood(x, y, params, get_link(link))
        expected = _independent_log_likelihood(x, y, params, get_link(link))
        assert got.shape == (*batch, n)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        weights = responsibilities(x, y, params, get_link(link))
        expected_weights = _independent_responsibilities(x, y, params, get_link(link))
        assert weights.shape == (*batch, n, k)
        torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-12)
        weight = params.experts_weight.clone().requires_grad_()
        gate = params.gate_weight.clone().requires_grad_()
        grads = []
        wrt = [weight, gate] if k > 1 else [weight]
        for fn in (log_likelihood, _independent_log_likelihood):
            moved = params._replace(experts_weight=weight, gate_weight=gate)
            grads.append(torch.autograd.grad(fn(x, y, moved, get_link(link)).sum(), wrt))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_log_likelihood_keeps_logsumexps_infinities():
    """Residuals that overflow in every expert give ``-inf`` (not NaN), as ``torch.logsumexp``
    does; a finite row beside them is unaffected."""
    from pyromoe.core.likelihood import log_likelihood

    x = torch.zeros(2, 1, dtype=F64)
    y = torch.tensor([1e200, 0.5], dtype=F64)
    params = Params(
        torch.zeros(2, 1, dtype=F64), None, torch.zeros(1, 1, dtype=F64), None,
        torch.tensor(1e-100, dtype=F64),
    )  # fmt: skip
    values = log_likelihood(x, y, params, get_link("linear"))
    assert float(values[0]) == -float("inf")
    scale = torch.tensor(1e-100, dtype=F64)
    expected = torch.distributions.Normal(0.0, scale).log_prob(torch.tensor(0.5, dtype=F64))
    assert abs(float(values[1]) / float(expected) - 1) < 1e-14 and float(values[1]) < -1e198
