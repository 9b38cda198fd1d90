"""init_to_moments as a Pyro init strategy, its jitter, and the Laplace scales."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import NUTS
from pyro.infer.autoguide import (
    AutoDelta,
    AutoLowRankMultivariateNormal,
    AutoNormal,
)
from pyro.infer.autoguide.initialization import InitMessenger, init_to_mean
from pyro.infer.mcmc.util import initialize_model
from pyro.poutine.util import site_is_subsample

import pyromoe
from pyromoe import MixtureOfExperts, simulate, sites
from pyromoe.bayes.init_strategy import init_to_moments
from pyromoe.bayes.laplace import laplace_approximation, laplace_scales


@pytest.fixture(scope="module")
def data():
    return simulate(300, 3, num_experts=2, link="tanh", noise=0.4, seed=1, bias=True)


@pytest.fixture(scope="module")
def model():
    return MixtureOfExperts(3, 2, link="tanh", bias=True)


def _traced_values(model, strategy, x, y):
    trace = poutine.trace(InitMessenger(strategy)(model)).get_trace(x, y)
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


def test_init_to_moments_returns_exactly_the_estimate_at_every_site(data, model):
    values = _traced_values(model, init_to_moments(estimate=data.truth), data.x, data.y)
    expected = data.truth.site_values(bias=True)
    assert set(values) == set(expected)
    for name, value in values.items():
        assert torch.equal(value, expected[name]), name


def test_init_to_moments_with_site_argument_returns_the_value(data, model):
    trace = poutine.trace(model).get_trace(data.x, data.y)
    site = trace.nodes[sites.GATE_WEIGHT]
    assert torch.equal(init_to_moments(site, data.truth), data.truth.gate_weight)


def test_init_to_moments_follows_the_site_dtype(data):
    model32 = MixtureOfExperts(3, 2, link="tanh", bias=True)
    x, y = data.x.float(), data.y.float()
    values = _traced_values(model32, init_to_moments(estimate=data.truth), x, y)
    assert all(value.dtype == torch.float32 for value in values.values())
    assert torch.allclose(values[sites.NOISE].double(), data.truth.noise, atol=1e-7)


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoLowRankMultivariateNormal, AutoDelta])
def test_autoguide_initial_loc_equals_the_estimate(data, model, guide_class):
    with pyro.get_param_store().scope():
        guide = guide_class(model, init_loc_fn=init_to_moments(estimate=data.truth))
        guide(data.x, data.y)
        median = guide.median(data.x, data.y)
    for name, value in data.truth.site_values(bias=True).items():
        # the noise goes through exp(log(.)) in the guide's unconstrained space: 1 ulp-scale error
        assert torch.allclose(median[name], value, rtol=1e-12, atol=1e-12), name


def test_autonormal_stores_the_noise_in_unconstrained_space(data, model):
    with pyro.get_param_store().scope():
        guide = AutoNormal(model, init_loc_fn=init_to_moments(estimate=data.truth))
        guide(data.x, data.y)
        loc = guide.locs.noise.detach()
    assert torch.allclose(loc, data.truth.noise.log(), atol=1e-12)


def test_nuts_kernel_starts_at_the_estimate(data, model):
    kernel = NUTS(model, init_strategy=init_to_moments(estimate=data.truth), max_plate_nesting=1)
    kernel.setup(0, data.x, data.y)
    start = kernel.initial_params  # unconstrained
    assert torch.allclose(start[sites.NOISE], data.truth.noise.log(), atol=1e-12)
    assert torch.equal(start[sites.EXPERTS_WEIGHT], data.truth.experts_weight)
    kernel.cleanup()


def test_unknown_sites_go_to_the_fallback_and_fallback_none_raises(data, model):
    def extended(x, y):
        pyro.sample("offset", dist.Normal(torch.tensor(3.0, dtype=x.dtype), 1.0))
        return model(x, y)

    values = _traced_values(
        extended, init_to_moments(estimate=data.truth, fallback=init_to_mean), data.x, data.y
    )
    assert float(values["offset"]) == 3.0
    with pytest.raises(ValueError, match="no value for site 'offset'"):
        _traced_values(
            extended, init_to_moments(estimate=data.truth, fallback=None), data.x, data.y
        )


def test_jitter_draws_afresh_for_each_model_execution_on_the_given_scale(data, model):
    strategy = init_to_moments(estimate=data.truth, jitter=0.1, seed=0)
    runs = [_traced_values(model, strategy, data.x, data.y) for _ in range(200)]
    weight = torch.stack([run[sites.EXPERTS_WEIGHT] for run in runs]) - data.truth.experts_weight
    log_noise = torch.stack([run[sites.NOISE] for run in runs]).log() - data.truth.noise.log()
    assert not torch.equal(runs[0][sites.GATE_WEIGHT], runs[1][sites.GATE_WEIGHT])
    # 1200 weight deviations: the sd estimate has relative s.e. 1/sqrt(2400) ~ 2%; allow 5 s.e.
    assert abs(float(weight.std()) - 0.1) < 0.1 * 5 / math.sqrt(2 * weight.numel())
    # noise jittered on the log scale (unconstrained), 200 draws: relative s.e. 5%; allow 4 s.e.
    assert abs(float(log_noise.std()) - 0.1) < 0.1 * 4 / math.sqrt(2 * 200)
    assert bool((torch.stack([run[sites.NOISE] for run in runs]) > 0).all())


def test_jitter_is_reproducible_from_the_seed(data, model):
    first = _traced_values(
        model, init_to_moments(estimate=data.truth, jitter=0.2, seed=7), data.x, data.y
    )
    second = _traced_values(
        model, init_to_moments(estimate=data.truth, jitter=0.2, seed=7), data.x, data.y
    )
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_jitter_without_a_seed_leaves_the_global_generators_alone(data, model):
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    expected = float(torch.rand(())), random.random(), float(np.random.random())
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    strategy = init_to_moments(estimate=data.truth, jitter=0.2)
    runs = [_traced_values(model, strategy, data.x, data.y) for _ in range(2)]
    assert (float(torch.rand(())), random.random(), float(np.random.random())) == expected
    assert not torch.equal(runs[0][sites.EXPERTS_WEIGHT], runs[1][sites.EXPERTS_WEIGHT])


def test_per_site_jitter_scales_leave_other_sites_exact(data, model):
    strategy = init_to_moments(estimate=data.truth, jitter={sites.GATE_WEIGHT: 0.5}, seed=0)
    values = _traced_values(model, strategy, data.x, data.y)
    assert torch.equal(values[sites.EXPERTS_WEIGHT], data.truth.experts_weight)
    assert not torch.equal(values[sites.GATE_WEIGHT], data.truth.gate_weight)


def test_laplace_scale_of_the_noise_matches_the_fisher_information():
    # Well-separated experts and small noise: responsibilities are ~0/1, so the Fisher information
    # of log(sigma) is ~2n and its posterior sd ~1/sqrt(2n) (priors are negligible at n = 2000).
    data = simulate(2000, 3, num_experts=2, noise=0.05, seed=0)
    model = MixtureOfExperts(3, 2, bias=False)
    scales = laplace_scales(model, data.x, data.y, data.truth)
    expected = 1 / math.sqrt(2 * 2000)
    # ambiguous rows (|(a1 - a2).x| < a few sigma, ~5% here) lower the information slightly
    assert expected * 0.97 < float(scales[sites.NOISE]) < expected * 1.15


def test_laplace_covariance_is_the_inverse_hessian_of_the_potential_energy(data, model):
    # the estimate is the truth, not the mode, but at n = 300 the curvature is well above the floor
    approx = laplace_approximation(model, data.x, data.y, data.truth, min_curvature=1e-6)
    params, potential_fn, _, _ = initialize_model(
        model, (data.x, data.y), init_strategy=init_to_moments(estimate=data.truth)
    )
    names = approx["names"]
    loc = torch.cat([params[name].reshape(-1) for name in names])
    torch.testing.assert_close(approx["loc"], loc, rtol=0, atol=0)
    hessian = torch.autograd.functional.hessian(
        lambda theta: potential_fn(approx["unflatten"](theta)), loc
    )
    assert float(torch.linalg.eigvalsh(hessian).min()) > 1.0
    torch.testing.assert_close(
        approx["covariance"], torch.linalg.inv(hessian), rtol=1e-9, atol=1e-12
    )


def test_laplace_scales_are_capped_by_min_curvature(data, model):
    approx = laplace_approximation(model, data.x, data.y, data.truth, min_curvature=4.0)
    assert float(approx["covariance"].diagonal().max()) <= 0.25 + 1e-12
    scales = laplace_scales(model, data.x, data.y, data.truth)
    assert set(scales) == set(sites.PARAMETER_SITES)
    assert scales[sites.GATE_WEIGHT].shape == (1, 3)


# ---------------------------------------------------------------------------------- bad input
def test_shape_mismatch_between_estimate_and_model_names_the_site(data):
    model4 = MixtureOfExperts(4, 2, link="tanh", bias=True)
    x = torch.randn(50, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="site 'experts.weight' has shape"):
        _traced_values(model4, init_to_moments(estimate=data.truth), x, None)


def test_noise_outside_the_support_is_refused(data, model):
    broken = replace(data.truth, noise=torch.tensor(0.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="site 'noise' is outside the site's support"):
        _traced_values(model, init_to_moments(estimate=broken), data.x, data.y)


def test_init_to_moments_refuses_a_non_estimate():
    with pytest.raises(TypeError, match="estimate must be a pyromoe.MoEEstimate"):
        init_to_moments(estimate={"noise": 1.0})


def test_negative_jitter_is_refused(data):
    with pytest.raises(ValueError, match="jitter must be a finite number >= 0"):
        init_to_moments(estimate=data.truth, jitter=-0.1)


def test_non_numeric_jitter_is_refused(data):
    with pytest.raises(TypeError, match="jitter must be a float"):
        init_to_moments(estimate=data.truth, jitter="laplace")


def test_jitter_for_an_unknown_site_is_refused(data):
    with pytest.raises(ValueError, match="jitter has scales for unknown sites"):
        init_to_moments(estimate=data.truth, jitter={"gate.weights": 0.1})


def test_an_em_fallback_with_a_step_function_gate_is_refitted_as_map():
    # one input, two regimes split exactly at x = 0: the likelihood's optimum is a step gate
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 1, generator=g, dtype=torch.float64)
    noise = 0.3 * torch.randn(2000, generator=g, dtype=torch.float64)
    y = torch.where(x[:, 0] > 0, 3.0 + 0.5 * x[:, 0], -3.0 - 0.5 * x[:, 0]) + noise
    estimate = pyromoe.initialize(x, y, 2, seed=0)
    assert estimate.diagnostics["initializer"] == "em" and estimate.method == "em+map"
    assert "its gate weights are huge" in estimate.diagnostics["em_problem"]
    assert "refitted as MAP EM" in estimate.diagnostics["initializer_reason"]
    assert float(estimate.gate_weight.abs().max()) < 100  # the plain EM gate was ~3e4
