"""Newton steps on all rows with a subsample's curvature (issue 26, initialize at large n): the
flat parameters round-trip, the subsample Hessian equals the closed form where there is one, the
polish reaches EM's optimum on all rows in a few passes without ever lowering the
log-likelihood, refuses an indefinite Hessian, and initialize records it."""

import warnings

import numpy as np
import pytest
import torch

import pyromoe
from pyromoe.core.em.newton import Flat, newton_polish, subsample_hessian
from pyromoe.core.em.starts import start_params
from pyromoe.core.em.statistics import gradient_sums
from pyromoe.core.likelihood import log_likelihood
from pyromoe.core.links import get_link
from pyromoe.core.params import Params
from pyromoe.core.sources import as_source

F64 = torch.float64
LINEAR = get_link("linear")


@pytest.mark.parametrize("bias, per_expert, gate_width", [(True, False, 3), (False, True, 2)])
def test_the_flat_parameters_round_trip(bias, per_expert, gate_width):
    g = torch.Generator().manual_seed(0)
    params = Params(
        torch.randn(3, 3, generator=g, dtype=F64),
        torch.randn(3, generator=g, dtype=F64) if bias else None,
        torch.randn(2, gate_width, generator=g, dtype=F64),
        torch.randn(2, generator=g, dtype=F64) if bias else None,
        torch.rand(3 if per_expert else (), generator=g, dtype=F64) + 0.5,
    )
    flat = Flat(params)
    theta = flat.flat(params)
    assert theta.shape == (9 + 2 * gate_width + (5 if bias else 0) + (3 if per_expert else 1),)
    for a, b in zip(flat.params(theta), params):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-14)


def _random_params(g, k, d_experts, d_gate, bias, per_expert) -> Params:
    """Parameters drawn from ``g`` (float64): weights and biases normal, noise sd(s) in
    [0.5, 1.5)."""
    return Params(
        torch.randn(k, d_experts, generator=g, dtype=F64),
        torch.randn(k, generator=g, dtype=F64) if bias else None,
        torch.randn(k - 1, d_gate, generator=g, dtype=F64),
        torch.randn(k - 1, generator=g, dtype=F64) if bias else None,
        torch.rand(k if per_expert else (), generator=g, dtype=F64) + 0.5,
    )


def _autograd_hessian(x, y, params, link):
    """The reference: autograd over every flat parameter (p + 1 backward passes)."""
    flat = Flat(params)

    def total(theta):
        return log_likelihood(x, y, flat.params(theta), link).sum()

    return torch.autograd.functional.hessian(total, flat.flat(params))


@pytest.mark.parametrize(
    "k, link, bias, per_expert, split",
    [
        (2, "linear", True, False, False),
        (2, "linear", False, True, False),
        (3, "tanh", True, True, False),
        (3, "relu", True, False, False),
        (3, "tanh", True, True, True),  # the gate on covariates of its own: x = [x | z]
        (2, "sigmoid", False, False, True),
    ],
)
def test_the_predictor_hessian_equals_autograd_over_every_parameter(
    k, link, bias, per_expert, split
):
    g = torch.Generator().manual_seed(k + 7 * split)
    n, d_experts, d_gate = 700, 3, 2 if split else 3
    x = torch.randn(n, d_experts + (d_gate if split else 0), generator=g, dtype=F64)
    y = torch.randn(n, generator=g, dtype=F64)
    params = _random_params(g, k, d_experts, d_gate, bias, per_expert)
    expected = _autograd_hessian(x, y, params, get_link(link))
    hessian = subsample_hessian(x, y, params, get_link(link))
    assert hessian.shape == expected.shape
    torch.testing.assert_close(hessian, expected, rtol=1e-11, atol=1e-11 * expected.abs().max())


def test_the_hessian_of_one_expert_is_the_regression_closed_form():
    g = torch.Generator().manual_seed(1)
    n, d = 400, 3
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 0.3 + 0.7 * torch.randn(n, generator=g)
    sigma = 0.8
    params = Params(
        torch.tensor([[0.9, -1.8, 0.4]], dtype=F64),
        torch.tensor([0.2], dtype=F64),
        torch.zeros(0, d, dtype=F64),
        torch.zeros(0, dtype=F64),
        torch.tensor(sigma, dtype=F64),
    )
    hessian = subsample_hessian(x, y, params, LINEAR)
    u = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1)
    residual = y - u @ torch.cat([params.experts_weight[0], params.experts_bias])
    # log N(y | u.c, s^2) with s = exp(t): d2/dc2 = -u u^T / s^2, d2/dc dt = -2 r u / s^2,
    # d2/dt2 = -2 r^2 / s^2
    expected = torch.zeros(d + 2, d + 2, dtype=F64)
    expected[: d + 1, : d + 1] = -u.T @ u / sigma**2
    expected[: d + 1, d + 1] = expected[d + 1, : d + 1] = -2 * (residual @ u) / sigma**2
    expected[d + 1, d + 1] = -2 * (residual @ residual) / sigma**2
    torch.testing.assert_close(hessian, expected, rtol=1e-10, atol=1e-9)


def _problem(n=40_000, m=4_000, seed=11):
    data = pyromoe.simulate(
        n, 5, 2, expert_cosine=0.6, gate_norm=2.0, noise=0.5, bias=True, seed=seed
    )
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:m]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sub = pyromoe.fit_em(data.x[rows], data.y[rows], 2, n_init=1, seed=0)
    params = start_params(sub, torch.empty(0, dtype=F64), True)
    return data, rows, params


def test_the_polish_reaches_the_optimum_on_all_rows_in_a_few_passes():
    data, rows, params = _problem()
    m = rows.numel()
    hessian = subsample_hessian(data.x[rows], data.y[rows], params, LINEAR)
    polish = newton_polish(
        as_source(data.x, data.y), params, LINEAR, hessian, m, tol=1e-9, chunk_size=7_000
    )
    assert polish.stopped == "converged" and polish.passes <= 5
    assert (np.diff(polish.trace) > 0).all()  # every kept step raised the log-likelihood
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tight = pyromoe.fit_em(
            data.x,
            data.y,
            2,
            init=pyromoe.MoEEstimate.from_params(
                polish.params._replace(noise=polish.params.noise.reshape(())), LINEAR, method="em"
            ),
            tol=1e-12,
            max_iter=2000,
        )
    optimum = float(tight.diagnostics["log_likelihood_trace"][-1])
    assert optimum - polish.trace[-1] < 1e-8  # per row
    start = float(log_likelihood(data.x, data.y, params, LINEAR).mean())
    assert optimum - start > 1e-4  # the subsample's optimum was well short on all rows
    assert polish.trace[0] == pytest.approx(start, abs=1e-12)


def test_an_indefinite_hessian_takes_no_step():
    data, rows, params = _problem(n=8_000, m=2_000)
    flat_size = Flat(params).flat(params).numel()
    polish = newton_polish(
        as_source(data.x, data.y),
        params,
        LINEAR,
        torch.eye(flat_size, dtype=F64),
        2_000,
        tol=1e-6,
        chunk_size=4_000,
    )
    assert polish.stopped == "indefinite" and polish.passes == 1
    for a, b in zip(polish.params, params):
        assert (a is None and b is None) or torch.equal(a, b)


def test_initialize_polishes_on_all_rows_beyond_the_guard():
    data = pyromoe.simulate(60_000, 5, 2, expert_cosine=0.6, noise=0.5, bias=True, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimate = pyromoe.initialize(data.x, data.y, 2)
        reference = pyromoe.fit_em(data.x, data.y, 2, n_init=1, seed=0, tol=1e-12, max_iter=2000)
    d = estimate.diagnostics
    assert d["guard_rows"] < 60_000 and d["newton_passes"] >= 2
    assert d["newton_stopped"] == "converged"
    assert "newton" in d["time_split"]
    gap = float(reference.log_likelihood(data.x, data.y).mean()) - float(
        estimate.log_likelihood(data.x, data.y).mean()
    )
    assert gap < 1e-6


@pytest.mark.parametrize(
    "k, link, bias, per_expert, gate_width",
    [
        (2, "linear", True, False, None),
        (3, "tanh", True, True, None),
        (2, "linear", False, False, 2),
        (1, "linear", True, False, None),
        (2, "leaky_relu", True, False, None),
    ],
)
def test_the_closed_form_gradient_equals_autograd(k, link, bias, per_expert, gate_width):
    g = torch.Generator().manual_seed(2)
    n, d = 500, 3
    width = d + (gate_width or 0)
    x = torch.randn(n, width, generator=g, dtype=F64)
    y = torch.randn(n, generator=g, dtype=F64)
    params = _random_params(g, k, d, gate_width or d, bias, per_expert)
    link = get_link(link)
    flat = Flat(params)
    theta = flat.flat(params).requires_grad_(True)
    total = log_likelihood(x, y, flat.params(theta), link).sum()
    (expected,) = torch.autograd.grad(total, [theta])
    value, gradient, responsibility = gradient_sums(x, y, params, link)
    torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-10)
    assert float(value) == pytest.approx(float(total.detach()), rel=1e-12)
    assert float(responsibility.sum()) == pytest.approx(n, rel=1e-12)
