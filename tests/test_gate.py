"""Gate EM with the experts fixed (pyromoe.fit_gate on the loop of pyromoe.core.em)."""

import math
import warnings

import numpy as np
import pytest
import torch

from pyromoe import simulate
from pyromoe.core.em.loop import ConvergenceWarning
from pyromoe.core.em.m_step import gate_step, log_prior
from pyromoe.core.em.statistics import pass_statistics
from pyromoe.core.likelihood import gate_logits, log_likelihood, responsibilities
from pyromoe.estimators.gate import GateFit, fit_gate


@pytest.fixture(scope="module")
def data_k2():
    return simulate(100_000, 10, num_experts=2, link="linear", gate="random", seed=1)


@pytest.fixture(scope="module")
def data_k3():
    return simulate(100_000, 10, num_experts=3, link="linear", gate="random", seed=2)


@pytest.fixture(scope="module")
def small():
    return simulate(20_000, 10, num_experts=2, link="linear", seed=5)


def _fit_true_experts(data, **kwargs):
    truth = data.truth
    return fit_gate(data.x, data.y, truth.experts_weight, truth.experts_bias, truth.link, **kwargs)


def _gate_error(fit, truth):
    return float((fit.gate_weight - truth.gate_weight).norm(dim=-1).max())


def _log_likelihood_of_fit(data, fit):
    """Per-row log-likelihood of ``data`` at the true experts with the fit's gate and noise."""
    truth = data.truth
    params = truth.params._replace(
        gate_weight=fit.gate_weight, gate_bias=fit.gate_bias, noise=fit.noise
    )
    return log_likelihood(data.x, data.y, params, truth.link)


# ------------------------------------------------------------------------------------- recovery
def test_gate_em_recovers_k2_gate_and_noise_from_random_start(data_k2):
    # Reference: gate error 0.02-0.05 at n = 1e5 (docs/algorithm.md section 4); the noise estimate's
    # standard error is about 0.5 / sqrt(2 n) = 0.001.
    fit = _fit_true_experts(data_k2, seed=3)
    assert isinstance(fit, GateFit)
    assert fit.converged and fit.n_iter < 50
    assert _gate_error(fit, data_k2.truth) < 0.15
    assert abs(float(fit.gate_bias[0])) < 0.05  # the true offset is 0
    assert abs(float(fit.noise) - 0.5) < 0.02


def test_gate_em_recovers_k3_multinomial_gate(data_k3):
    fit = _fit_true_experts(data_k3, seed=4)
    assert fit.converged
    assert fit.gate_weight.shape == (2, 10) and fit.gate_bias.shape == (2,)
    assert _gate_error(fit, data_k3.truth) < 0.15
    assert abs(float(fit.noise) - 0.5) < 0.02


def test_gate_em_trace_is_non_decreasing():
    data = simulate(20_000, 10, num_experts=3, seed=6)
    fit = _fit_true_experts(data, seed=5, tol=1e-9)
    steps = np.diff(fit.log_likelihood_trace)
    assert len(fit.log_likelihood_trace) == fit.n_iter + 1
    assert steps.min() >= -1e-12
    assert steps[0] > 1e-3  # the random start is poor: the first iteration gains a lot


def test_gate_em_trace_is_the_mean_log_likelihood(small):
    fit = _fit_true_experts(small)
    ll = _log_likelihood_of_fit(small, fit)
    assert fit.log_likelihood_trace[-1] == pytest.approx(float(ll.mean()), abs=1e-12)


def test_gate_em_from_the_truth_stays_near_it(small):
    truth = small.truth
    fit = _fit_true_experts(
        small, init_gate_weight=truth.gate_weight, init_gate_bias=truth.gate_bias, noise=0.5
    )
    assert fit.log_likelihood_trace[-1] >= fit.log_likelihood_trace[0]
    # n = 2e4: statistical error ~0.04 per coordinate-ish, well inside 0.15
    assert _gate_error(fit, truth) < 0.15


def test_gate_em_without_bias_keeps_the_offset_fixed(small):
    fit = _fit_true_experts(small, fit_bias=False, init_gate_bias=torch.tensor([0.3]))
    assert float(fit.gate_bias[0]) == pytest.approx(0.3)
    fit = _fit_true_experts(small, fit_bias=False)
    assert float(fit.gate_bias[0]) == 0.0
    assert _gate_error(fit, small.truth) < 0.15


@pytest.mark.parametrize("noise", [0.7, torch.tensor(0.7), np.float64(0.7), np.array([0.7])])
def test_gate_em_with_fixed_noise_keeps_it(small, noise):
    fit = _fit_true_experts(small, noise=noise, fit_noise=False)
    assert float(fit.noise) == pytest.approx(0.7)


def test_gate_em_same_seed_same_fit_different_seed_same_optimum(small):
    a = _fit_true_experts(small, seed=11)
    b = _fit_true_experts(small, seed=11)
    c = _fit_true_experts(small, seed=12)
    assert torch.equal(a.gate_weight, b.gate_weight)
    # the M-step is concave and the paper proves convergence from a random start for k = 2
    assert float((a.gate_weight - c.gate_weight).norm()) < 0.02


def test_gate_em_accepts_numpy_float32_and_follows_dtype(small):
    truth = small.truth
    fit = fit_gate(
        small.x.float().numpy(),
        small.y.float().numpy(),
        truth.experts_weight.numpy(),
        None,
        "linear",
    )
    assert fit.gate_weight.dtype == torch.float32 and fit.noise.dtype == torch.float32
    assert fit.noise.shape == ()
    assert float((fit.gate_weight - truth.gate_weight.float()).norm()) < 0.15


# ------------------------------------------------------------------------------------- MAP
def test_gate_map_with_tight_prior_shrinks_the_gate(small):
    ml = _fit_true_experts(small)
    loose = _fit_true_experts(small, prior_scale=10.0)
    tight = _fit_true_experts(small, prior_scale=0.03)
    tighter = _fit_true_experts(small, prior_scale=0.01)
    norm = {
        name: float(f.gate_weight.norm())
        for name, f in [("ml", ml), ("loose", loose), ("tight", tight), ("tighter", tighter)]
    }
    # a prior of scale 10 is a ridge of 0.01 against a Hessian of order n / 4 = 5000: no effect
    assert norm["loose"] == pytest.approx(norm["ml"], abs=1e-3)
    # measured: ML 0.996, s = 0.03 -> 0.59, s = 0.01 -> 0.16
    assert norm["tight"] < 0.8 * norm["ml"]
    assert norm["tighter"] < 0.5 * norm["tight"]
    assert np.diff(tight.log_likelihood_trace).min() >= -1e-12


def test_gate_map_trace_is_the_log_posterior_per_row(small):
    scale = 0.1
    fit = _fit_true_experts(small, prior_scale=scale)
    ll = _log_likelihood_of_fit(small, fit).sum()
    params = torch.cat([fit.gate_weight.reshape(-1), fit.gate_bias])
    prior = float(
        (-0.5 * (params / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)).sum()
    )
    assert fit.log_likelihood_trace[-1] == pytest.approx((float(ll) + prior) / 20_000, abs=1e-10)
    assert float(log_prior(None, params)) == 0.0


# ------------------------------------------------------------------------------------- M-step
@pytest.mark.parametrize("k, fit_bias", [(2, True), (3, True), (3, False)])
def test_gate_newton_system_of_a_pass_is_the_expected_log_gates_gradient_and_hessian(k, fit_bias):
    """The gate's IRLS system summed by an EM pass is the gradient and negative Hessian of
    ``Q(w, c) = sum_n sum_i r_ni log gate_i(x_n)``, and Newton steps from it (responsibilities
    held, as EM's further Newton steps do) reach the maximiser of Q."""
    data = simulate(4_000, 3, num_experts=k, seed=2)
    truth = data.truth.params
    start = truth._replace(
        gate_weight=torch.zeros_like(truth.gate_weight),
        gate_bias=torch.zeros_like(truth.gate_bias) if fit_bias else truth.gate_bias,
    )
    resp = responsibilities(data.x, data.y, start, data.truth.link)

    def expected_log_gate(theta):
        weight = theta[:, :3]
        bias = theta[:, 3] if fit_bias else start.gate_bias
        log_gate = torch.log_softmax(gate_logits(data.x, weight, bias), dim=-1)
        return (resp * log_gate).sum()

    def theta_of(params):
        if not fit_bias:
            return params.gate_weight
        return torch.cat([params.gate_weight, params.gate_bias[:, None]], dim=-1)

    theta = theta_of(start)
    statistics = pass_statistics(data.x, data.y, start, data.truth.link, False, fit_bias)
    gradient = torch.func.grad(expected_log_gate)(theta)
    hessian = torch.func.hessian(expected_log_gate)(theta).reshape(theta.numel(), -1)
    assert torch.allclose(statistics.gate_gradient, gradient, rtol=1e-10, atol=1e-8)
    assert torch.allclose(statistics.gate_hessian, -hessian, rtol=1e-10, atol=1e-8)

    params = start
    for _ in range(25):
        held = pass_statistics(
            data.x, data.y, start, data.truth.link, False, fit_bias, linearise_at=params
        )
        params = gate_step(held, params, fit_bias=fit_bias, prior_scale=None, tol=0.0)
    gradient = torch.func.grad(expected_log_gate)(theta_of(params))
    assert float(gradient.abs().max()) < 1e-8 * data.x.shape[0]
    assert float(theta_of(params).abs().max()) > 0.1  # it moved away from the flat start


# ------------------------------------------------------------------------------------- warnings
def test_gate_em_warns_when_max_iter_is_reached(small):
    with pytest.warns(ConvergenceWarning, match="did not converge in max_iter=1"):
        fit = _fit_true_experts(small, max_iter=1)
    assert not fit.converged and fit.n_iter == 1 and len(fit.log_likelihood_trace) == 2


def test_gate_em_does_not_warn_when_converged(small):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        assert _fit_true_experts(small).converged


def test_convergence_warning_is_a_user_warning():
    assert issubclass(ConvergenceWarning, UserWarning)


# ------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def tiny():
    return simulate(50, 3, seed=0)


def _call(tiny, **overrides):
    truth = tiny.truth
    args = dict(
        x=tiny.x,
        y=tiny.y,
        experts_weight=truth.experts_weight,
        experts_bias=truth.experts_bias,
        link="linear",
    )
    args.update(overrides)
    return fit_gate(**args)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            dict(experts_weight=torch.zeros(2, 4)),
            ValueError,
            r"experts_weight must have shape \(k, d\)",
        ),
        (
            dict(experts_weight=torch.zeros(3)),
            ValueError,
            r"experts_weight must have shape \(k, d\)",
        ),
        (dict(experts_weight=torch.zeros(1, 3)), ValueError, "at least 2 rows"),
        (
            dict(experts_weight=torch.full((2, 3), float("nan"))),
            ValueError,
            "experts_weight contains NaN",
        ),
        (dict(experts_bias=torch.zeros(3)), ValueError, r"experts_bias must have shape \(2,\)"),
        (
            dict(init_gate_weight=torch.zeros(2, 3)),
            ValueError,
            r"init_gate_weight must have shape \(1, 3\)",
        ),
        (dict(init_gate_bias=torch.zeros(2)), ValueError, r"init_gate_bias must have shape \(1,\)"),
        (dict(noise=0.0), ValueError, "noise must be > 0"),
        (dict(noise=torch.ones(2)), ValueError, "noise must be a positive scalar"),
        (dict(tol=-1.0), ValueError, "tol must be > 0"),
        (dict(max_iter=0), ValueError, "max_iter must be >= 1; got 0"),
        (dict(max_iter=2.5), TypeError, "max_iter must be an int"),
        (dict(prior_scale=0.0), ValueError, "prior_scale must be > 0"),
        (dict(fit_bias="yes"), TypeError, "fit_bias must be True or False"),
        (dict(fit_noise=1), TypeError, "fit_noise must be True or False"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(link="cubic"), ValueError, "link must be one of"),
        (dict(y=torch.zeros(49)), ValueError, "same number of rows"),
        (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor or a numpy array"),
    ],
)
def test_gate_em_rejects_bad_input(tiny, overrides, error, message):
    with pytest.raises(error, match=message):
        _call(tiny, **overrides)


def test_gate_em_rejects_nan_in_y(tiny):
    y = tiny.y.clone()
    y[7] = float("nan")
    with pytest.raises(ValueError, match="y contains NaN or infinite values"):
        _call(tiny, y=y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gate_em_runs_on_cuda(small):
    truth = small.truth.to(device="cuda")
    fit = fit_gate(
        small.x.cuda(), small.y.cuda(), truth.experts_weight, truth.experts_bias, "linear"
    )
    assert fit.gate_weight.device.type == "cuda" and fit.noise.device.type == "cuda"
    assert float((fit.gate_weight.cpu() - small.truth.gate_weight).norm()) < 0.15
