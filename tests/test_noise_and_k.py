"""Per-expert noise and one expert, through every layer: EM, initialize, the model, NUTS/SVI/MAP."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from pyro.infer.mcmc.util import initialize_model

import pyromoe
from pyromoe import MixtureOfExperts, simulate
from pyromoe.bayes.potential import fused_potential
from pyromoe.core.labels import align_labels
from pyromoe.estimators.em import fit_em

NOISE = (0.3, 0.8)


@pytest.fixture(scope="module")
def two_noises():
    """simulate()'s two-expert model with expert noise sds 0.3 and 0.8, n = 3000."""
    data = simulate(3000, 3, seed=1)
    t = data.truth
    generator = torch.Generator().manual_seed(5)
    gate = torch.sigmoid(data.x @ t.gate_weight[0] + t.gate_bias[0])
    second = torch.rand(3000, generator=generator, dtype=torch.float64) < gate
    means = data.x @ t.experts_weight.T + t.experts_bias
    sd = torch.where(second, NOISE[1], NOISE[0]).to(torch.float64)
    noise = torch.randn(3000, generator=generator, dtype=torch.float64)
    y = torch.where(second, means[:, 1], means[:, 0]) + sd * noise
    return data.x, y, t


def _noise_in_truth_order(estimate, truth) -> torch.Tensor:
    errors = pyromoe.parameter_errors(estimate, truth)
    return estimate.permute(errors["permutation"]).noise


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------- EM and initialize
def test_per_expert_em_recovers_both_noise_levels(two_noises):
    x, y, truth = two_noises
    fit = _quiet(fit_em, x, y, 2, noise="per_expert", n_init=3, seed=0)
    assert fit.noise.shape == (2,) and fit.diagnostics["noise_model"] == "per_expert"
    noise = _noise_in_truth_order(fit, truth)
    assert torch.allclose(noise, torch.tensor(NOISE, dtype=noise.dtype), rtol=0.15)
    shared = _quiet(fit_em, x, y, 2, n_init=3, seed=0)
    assert (
        shared.noise.shape == ()
        and fit.diagnostics["log_likelihood_per_start"][fit.diagnostics["best_start"]]
        > shared.diagnostics["log_likelihood_per_start"][shared.diagnostics["best_start"]]
    )


def test_initialize_per_expert_noise(two_noises):
    x, y, truth = two_noises
    est = _quiet(pyromoe.initialize, x, y, 2, noise="per_expert")
    assert est.diagnostics["initializer"] == "tensor" and est.noise_model == "per_expert"
    noise = _noise_in_truth_order(est, truth)
    assert torch.allclose(noise, torch.tensor(NOISE, dtype=noise.dtype), rtol=0.15)
    assert pyromoe.parameter_errors(est, truth)["experts"] < 0.1


def test_fit_em_starts_from_a_per_expert_noise_estimate(two_noises):
    """initialize's guard hands full-data EM a per-expert start when the guard is a subsample."""
    x, y, _ = two_noises
    est = _quiet(pyromoe.initialize, x, y, 2, noise="per_expert", guard_rows=1_000)
    assert est.diagnostics["guard_rows"] < 3000 and est.noise_model == "per_expert"
    again = _quiet(fit_em, x, y, 2, init=est, noise="per_expert")
    assert torch.allclose(again.noise, est.noise, rtol=1e-2)  # the same optimum, refined
    with pytest.raises(ValueError, match=r"init.noise must be > 0; got \[0.5, -1.0\]"):
        fit_em(x, y, 2, init=replace(est, noise=torch.tensor([0.5, -1.0], dtype=x.dtype)))


def test_per_expert_noise_step_is_the_weighted_residual_formula(two_noises):
    """One EM iteration's noise equals sqrt(sum r_i res_i^2 / sum r_i) at the new experts."""
    x, y, truth = two_noises
    start = truth.params._replace(noise=torch.tensor([0.5, 0.5], dtype=torch.float64))
    from pyromoe.core.em.loop import EM
    from pyromoe.core.likelihood import expert_means, responsibilities
    from pyromoe.core.sources import as_source

    em = EM(as_source(x, y), truth.link)
    new = em.m_step(em.statistics(start), start)
    resp = responsibilities(x, y, start, truth.link)
    residual = (y[:, None] - expert_means(x, new.experts_weight, new.experts_bias, truth.link)) ** 2
    expected = ((resp * residual).sum(0) / resp.sum(0)).sqrt()
    assert torch.allclose(new.noise, expected, rtol=1e-10)


def test_chunked_per_expert_em_equals_one_chunk(two_noises):
    x, y, _ = two_noises
    fits = [
        _quiet(fit_em, x, y, 2, noise="per_expert", n_init=1, seed=2, chunk_size=size)
        for size in (10**9, 701)
    ]
    assert torch.allclose(fits[0].noise, fits[1].noise, rtol=1e-9)
    assert torch.allclose(fits[0].experts_weight, fits[1].experts_weight, rtol=1e-9)


def test_permute_and_align_carry_per_expert_noise(two_noises):
    _, _, truth = two_noises
    est = pyromoe.MoEEstimate(
        truth.experts_weight,
        truth.experts_bias,
        truth.gate_weight,
        truth.gate_bias,
        torch.tensor([0.3, 0.8], dtype=torch.float64),
        truth.link,
    )
    assert est.permute([1, 0]).noise.tolist() == [0.8, 0.3]
    draws = {
        name: value.expand(2, 3, *value.shape).clone()
        for name, value in est.permute([1, 0]).site_values().items()
    }
    aligned, info = align_labels(draws, est)
    assert info["num_draws_relabelled"] == 6
    assert torch.equal(aligned["noise"][1, 2], est.noise)


def test_one_expert_em_is_least_squares():
    data = simulate(2000, 3, seed=3)
    fit = _quiet(fit_em, data.x, data.y, 1, n_init=1)
    design = torch.cat([data.x, torch.ones(2000, 1, dtype=data.x.dtype)], 1)
    solution = torch.linalg.lstsq(design, data.y[:, None]).solution.squeeze(-1)
    assert torch.allclose(fit.experts_weight[0], solution[:3], atol=1e-8)
    assert float(fit.experts_bias[0]) == pytest.approx(float(solution[3]), abs=1e-8)
    rms = float((data.y - design @ solution).pow(2).mean().sqrt())
    assert float(fit.noise) == pytest.approx(rms, rel=1e-8)
    assert fit.gate_weight.shape == (0, 3)
    est = _quiet(pyromoe.initialize, data.x, data.y, 1)
    assert (
        est.diagnostics["initializer"] == "em"
        and "one expert" in (est.diagnostics["initializer_reason"])
    )


def test_one_expert_has_no_gate_sites_and_the_moments_refuse_it():
    model = MixtureOfExperts(3, 1)
    assert sorted(model.site_shapes) == ["experts.bias", "experts.weight", "noise"]
    data = simulate(500, 3, seed=0)
    with pytest.raises(ValueError, match="num_experts must be >= 2"):
        pyromoe.tensor_init(data.x, data.y, 1)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        MixtureOfExperts(3, 0)


def test_bad_noise_model_is_refused():
    with pytest.raises(ValueError, match="noise must be 'shared' .* or 'per_expert'"):
        MixtureOfExperts(3, 2, noise="each")
    data = simulate(500, 3, seed=0)
    with pytest.raises(ValueError, match="noise must be 'shared'"):
        fit_em(data.x, data.y, 2, noise="per-expert")


# ------------------------------------------------------------------------------- the Pyro model
@pytest.mark.parametrize(
    "k, noise, link, bias",
    [
        (2, "per_expert", "linear", True),
        (3, "per_expert", "tanh", False),
        (1, "shared", "linear", True),
        (1, "per_expert", "relu", False),
    ],
)
def test_fused_potential_equals_traced(k, noise, link, bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(60, generator=generator, dtype=torch.float64)
    model = MixtureOfExperts(3, k, link=link, bias=bias, noise=noise)
    _, traced, _, _ = initialize_model(model, model_args=(x, y), max_plate_nesting=1)
    fused = fused_potential(model, x, y)
    assert fused is not None
    for _ in range(3):
        point = {
            name: torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_()
            for name, shape in model.site_shapes.items()
        }
        a, b = traced(point), fused(point)
        assert abs(float(a.detach()) - float(b.detach())) <= 1e-10 * max(
            1.0, abs(float(a.detach()))
        )
        for name, ga, gb in zip(
            point,
            torch.autograd.grad(a, list(point.values())),
            torch.autograd.grad(b, list(point.values())),
        ):
            torch.testing.assert_close(gb, ga, rtol=0, atol=1e-10, msg=name)


def test_nuts_per_expert_noise_recovers_both_levels(two_noises):
    x, y, truth = two_noises
    est = _quiet(pyromoe.initialize, x, y, 2, noise="per_expert")
    model = MixtureOfExperts(3, 2, noise="per_expert")
    idata = _quiet(
        pyromoe.run_nuts,
        model,
        x,
        y,
        init=est,
        num_warmup=100,
        num_samples=100,
        num_chains=1,
        progress=False,
        seed=0,
    )
    assert idata.posterior["noise"].dims == ("chain", "draw", "expert")
    noise = idata.posterior["noise"].mean(("chain", "draw")).values
    order = pyromoe.parameter_errors(est, truth)["permutation"]
    assert np.allclose(noise[order], NOISE, rtol=0.15)
    assert idata.attrs["potential"] == "fused"


def test_one_expert_model_runs_in_svi_and_nuts(quick_nuts):
    data = simulate(800, 2, seed=4)
    est = _quiet(pyromoe.initialize, data.x, data.y, 1)
    model = MixtureOfExperts(2, 1)
    svi = _quiet(
        pyromoe.fit_svi,
        model,
        data.x,
        data.y,
        init=est,
        num_steps=50,
        num_samples=20,
        progress=False,
    )
    assert "gate.weight" not in svi.posterior
    counts = dict(num_warmup=30, num_samples=30, num_chains=1)
    nuts = _quiet(quick_nuts, model, data.x, data.y, est, posterior_predictive=True, **counts)
    weight = nuts.posterior["experts.weight"].mean(("chain", "draw")).values[0]
    assert np.allclose(weight, est.experts_weight[0].numpy(), atol=0.1)
    assert nuts.log_likelihood["y"].shape[-1] == 800


@pytest.mark.parametrize("noise", ["shared", "per_expert"])
def test_fused_gradient_with_halfcauchy_noise_and_shifted_normal_priors(noise):
    import pyro.distributions as dist

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(40, 2, generator=generator, dtype=torch.float64)
    y = torch.randn(40, generator=generator, dtype=torch.float64)
    priors = {
        "experts.weight": dist.Normal(
            torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=torch.float64),
            torch.tensor(0.7, dtype=torch.float64),
        ),
        "gate.bias": 3.0,
        "noise": dist.HalfCauchy(torch.tensor(0.4, dtype=torch.float64)),
    }
    model = MixtureOfExperts(2, 2, link="sigmoid", priors=priors, noise=noise)
    _, traced, _, _ = initialize_model(model, model_args=(x, y), max_plate_nesting=1)
    fused = fused_potential(model, x, y)
    point = {
        name: torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_()
        for name, shape in model.site_shapes.items()
    }
    a, b = traced(point), fused(point)
    assert abs(float(a.detach()) - float(b.detach())) <= 1e-10 * max(1.0, abs(float(a.detach())))
    for ga, gb in zip(
        torch.autograd.grad(a, list(point.values())), torch.autograd.grad(b, list(point.values()))
    ):
        torch.testing.assert_close(gb, ga, rtol=0, atol=1e-10)
