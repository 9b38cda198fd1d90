"""PSIS of fit_svi's guide draws (pyromoe.bayes.psis; issue 25 item 3).

The problem: one expert (a Bayesian linear regression with the model's default priors), n = 100
rows whose two inputs correlate at 0.7, so the posterior of the two weights is correlated and a
mean-field guide is too narrow (its sds about 0.7 of the posterior's). Its exact posterior is known: given the noise sd the weights
are Gaussian (conjugate), and the noise's marginal posterior is a one-dimensional integral, done
here on a grid. That posterior is the reference (stronger than NUTS draws: no Monte Carlo error).
"""

from __future__ import annotations

import math

import arviz as az
import numpy as np
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, AutoNormal, init_to_value
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroParam

import pyromoe
from pyromoe import MixtureOfExperts, PSISWarning, fit_svi, trained_guide
from pyromoe.bayes import psis
from pyromoe.bayes.psis import PSIS_KHAT_THRESHOLD, importance_log_weights
from pyromoe.bayes.trained import unique_name
from pyromoe.core.sources import as_source

N, RHO, NUM_DRAWS = 100, 0.7, 1000
SITES = ("experts.weight", "experts.bias", "noise")


@pytest.fixture(scope="module")
def regression():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, 2, generator=g, dtype=torch.float64)
    x = torch.stack([z[:, 0], RHO * z[:, 0] + math.sqrt(1 - RHO**2) * z[:, 1]], 1)
    noise = 0.5 * torch.randn(N, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([0.8, -0.5], dtype=torch.float64) + 0.3 + noise
    return MixtureOfExperts(2, 1), x, y


def exact_posterior(x, y) -> dict:
    """Moments of the exact posterior of ``MixtureOfExperts(d, 1)`` with its default priors
    (w ~ N(0, 1/d) each, b ~ N(0, 1), noise ~ HalfNormal(1)): the coefficients ``beta = (w, b)``
    given ``s = log noise`` in closed form, ``s`` on a grid of 2001 points."""
    n, d = x.shape
    design = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    prior_var = torch.tensor([1.0 / d] * d + [1.0], dtype=x.dtype)
    s = torch.linspace(math.log(0.2), math.log(2.0), 2001, dtype=x.dtype)
    sigma2 = torch.exp(2 * s)[:, None, None]
    precision = design.T @ design / sigma2 + torch.diag(1 / prior_var)
    cov = torch.linalg.inv(precision)
    mean = (cov @ (design.T @ y)) / sigma2[:, :, 0]  # (grid, d + 1)
    log_evidence = (
        -0.5 * n * torch.log(2 * math.pi * sigma2[:, 0, 0])
        - 0.5 * torch.log(prior_var).sum()
        + 0.5 * torch.logdet(cov)
        - 0.5 * (y @ y / sigma2[:, 0, 0] - torch.einsum("gi,gij,gj->g", mean, precision, mean))
    )
    log_half_normal = 0.5 * math.log(2 / math.pi) - 0.5 * torch.exp(2 * s)
    weights = torch.softmax(log_half_normal + log_evidence + s, 0)  # + s: the grid is in log sd
    beta_mean = weights @ mean
    second = torch.einsum("g,gij->ij", weights, cov + mean[:, :, None] * mean[:, None, :])
    # (w, b, s) jointly: the unconstrained space of the guides (noise -> log noise)
    joint_mean = torch.cat([beta_mean, (weights @ s)[None]])
    joint_second = torch.zeros(d + 2, d + 2, dtype=x.dtype)
    joint_second[: d + 1, : d + 1] = second
    joint_second[: d + 1, d + 1] = joint_second[d + 1, : d + 1] = weights @ (mean * s[:, None])
    joint_second[d + 1, d + 1] = weights @ s**2
    noise = torch.exp(s)
    return {
        "beta_sd": (second.diagonal() - beta_mean**2).sqrt(),
        "noise_sd": (weights @ noise**2 - (weights @ noise) ** 2).sqrt(),
        "joint_mean": joint_mean,
        "joint_cov": joint_second - joint_mean[:, None] * joint_mean[None, :],
    }


@pytest.fixture(scope="module")
def exact(regression):
    _, x, y = regression
    return exact_posterior(x, y)


def at_posterior_mean(exact) -> dict:
    mean = exact["joint_mean"]
    return {
        "experts.weight": mean[None, :2].clone(),
        "experts.bias": mean[2:3].clone(),
        "noise": torch.exp(mean[3]).clone(),
    }


def exact_guide(model, x, y, exact) -> AutoMultivariateNormal:
    """A multivariate normal guide set to the exact posterior's mean and covariance in the
    unconstrained space (w, b, log noise): a known good approximation."""
    guide = AutoMultivariateNormal(
        model, init_loc_fn=init_to_value(values=at_posterior_mean(exact))
    )
    unique_name(guide)  # its parameters apart from any other guide's in Pyro's store
    guide(x, y)
    order = {"experts.weight": [0, 1], "experts.bias": [2], "noise": [3]}
    index = [i for name, _ in guide.prototype_trace.iter_stochastic_nodes() for i in order[name]]
    tril = torch.linalg.cholesky(exact["joint_cov"][index][:, index])
    scale = tril.diagonal()
    guide.scale = PyroParam(scale, guide.scale_constraint)
    guide.scale_tril = PyroParam(tril / scale[:, None], guide.scale_tril_constraint)
    return guide


@pytest.fixture(scope="module")
def exact_fit(regression, exact):
    """fit_svi on the exact guide, one step of a negligible rate: its draws are the guide's."""
    model, x, y = regression
    guide = exact_guide(model, x, y, exact)
    options = dict(num_steps=1, lr=1e-12, num_samples=NUM_DRAWS, seed=3, progress=False)
    idata = fit_svi(model, x, y, guide=guide, posterior_predictive=False, **options)
    return idata, options


def mean_field_guide(model, x, y, exact) -> AutoNormal:
    """The mean-field normal guide that SVI converges to on a normal posterior (each site's sd
    ``1 / sqrt(precision_ii)``, unconstrained), at the exact posterior's mean: too narrow where
    the posterior correlates (Yao et al. 2018's example of an overconfident guide)."""
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=at_posterior_mean(exact)))
    unique_name(guide)
    guide(x, y)
    sd = 1 / torch.linalg.inv(exact["joint_cov"]).diagonal().sqrt()
    order = {"experts.weight": [0, 1], "experts.bias": [2], "noise": [3]}
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        value = sd[order[name]].reshape(site["value"].shape).clone()
        event_dim = site["fn"].event_dim
        deep_setattr(guide.scales, name, PyroParam(value, guide.scale_constraint, event_dim))
    return guide


#: draws of the mean-field fit: the resampled sds' standard errors, sd / sqrt(2 ess), are then
#: a tenth of the guide's error
MEAN_FIELD_DRAWS = 2000


@pytest.fixture(scope="module")
def mean_field_fit(regression, exact):
    """fit_svi on the mean-field guide (one step of a negligible rate), draws resampled."""
    model, x, y = regression
    guide = mean_field_guide(model, x, y, exact)
    return fit_svi(
        model, x, y, guide=guide, num_steps=1, lr=1e-12, num_samples=MEAN_FIELD_DRAWS, seed=0,
        progress=False, posterior_predictive=False, importance_resample=True,
    )  # fmt: skip


def traced_draws(guide, model, x, y, count: int):
    """``count`` draws of the guide, each with Pyro's own log q (the guide's trace) and log p
    (the model's trace conditioned on the draw: every prior site and the observed y)."""
    draws, log_q, log_p = [], [], []
    for _ in range(count):
        trace = poutine.trace(guide).get_trace(x, y)
        values = {name: trace.nodes[name]["value"].detach() for name in SITES}
        conditioned = poutine.trace(poutine.condition(model, data=values)).get_trace(x, y)
        draws.append(values)
        log_q.append(float(trace.log_prob_sum().detach()))
        log_p.append(float(conditioned.log_prob_sum().detach()))
    stacked = {name: torch.stack([draw[name] for draw in draws]) for name in SITES}
    return stacked, torch.tensor(log_p, dtype=x.dtype) - torch.tensor(log_q, dtype=x.dtype)


@pytest.mark.parametrize("which", ["normal", "mvn"])
def test_log_weights_are_the_model_trace_minus_the_guide_trace(
    which, regression, exact_fit, mean_field_fit
):
    model, x, y = regression
    fit = mean_field_fit if which == "normal" else exact_fit[0]
    guide = trained_guide(fit)
    assert isinstance(guide, AutoNormal if which == "normal" else AutoMultivariateNormal)
    draws, expected = traced_draws(guide, model, x, y, count=4)
    with torch.no_grad():
        log_weights = importance_log_weights(model, guide, draws, x, y)
    assert torch.allclose(log_weights, expected, rtol=1e-10, atol=1e-8)


def test_fit_svi_records_the_khat_of_its_draws(regression, exact_fit):
    model, x, y = regression
    idata, _ = exact_fit
    draws = {
        name: torch.as_tensor(idata.posterior[name].values[0]) for name in model.site_shapes
    }  # no estimate to relabel to: the guide's draws as drawn
    with torch.no_grad():
        log_weights = importance_log_weights(model, trained_guide(idata), draws, x, y)
    smoothed, khat = az.psislw(log_weights.numpy(), reff=1.0)
    assert idata.attrs["psis_khat"] == pytest.approx(float(khat), abs=1e-9)
    assert idata.attrs["psis_ess"] == pytest.approx(1 / float(np.sum(np.exp(smoothed) ** 2)))
    assert idata.attrs["psis_draws"] == "guide"
    assert idata.attrs["psis_khat_threshold"] == PSIS_KHAT_THRESHOLD == 0.7


def test_khat_is_small_when_the_guide_is_the_posteriors_normal_approximation(exact_fit):
    idata, _ = exact_fit
    # Yao et al. 2018: k < 0.5 is a good importance distribution; the weights here vary only
    # by the posterior's departure from normality (log noise, n = 100)
    assert idata.attrs["psis_khat"] < 0.5
    assert idata.attrs["psis_ess"] > 0.5 * NUM_DRAWS


def test_a_too_narrow_guide_warns_and_is_not_resampled(regression, exact):
    model, x, y = regression
    # sd 1e-3 per site, where the posterior's are 0.04-0.1: the weights' tail is heavy
    start = init_to_value(values=at_posterior_mean(exact))
    guide = AutoNormal(model, init_loc_fn=start, init_scale=1e-3)
    advice = (
        r"k-hat \d+\.\d\d > 0\.7 .*returned the guide's draws uncorrected.*Use pyromoe.run_nuts"
    )
    with pytest.warns(PSISWarning, match=advice):
        idata = fit_svi(
            model, x, y, guide=guide, num_steps=1, lr=1e-12, num_samples=NUM_DRAWS,
            progress=False, posterior_predictive=False, importance_resample=True,
        )  # fmt: skip
    assert idata.attrs["psis_khat"] > PSIS_KHAT_THRESHOLD
    assert idata.attrs["psis_draws"] == "guide"


def test_resampled_draws_are_the_guides_draws_reweighted_and_seeded(regression, exact):
    model, x, y = regression
    options = dict(num_steps=1, lr=1e-12, num_samples=200, seed=5, progress=False)
    options["posterior_predictive"] = False
    plain = fit_svi(model, x, y, guide=exact_guide(model, x, y, exact), **options)
    runs = [
        fit_svi(
            model, x, y, guide=exact_guide(model, x, y, exact), importance_resample=True, **options
        )
        for _ in range(2)
    ]
    assert [run.attrs["psis_draws"] for run in runs] == ["importance_resampled"] * 2
    guide_draws = plain.posterior["experts.weight"].values[0].reshape(200, -1)
    resampled = runs[0].posterior["experts.weight"].values[0].reshape(200, -1)
    np.testing.assert_array_equal(
        resampled, runs[1].posterior["experts.weight"].values[0].reshape(200, -1)
    )
    distance = np.abs(resampled[:, None, :] - guide_draws[None, :, :]).max(-1).min(-1)
    assert distance.max() < 1e-9  # every resampled draw is one of the guide's draws
    assert len(np.unique(resampled[:, 0])) < 200  # drawn with replacement


def test_importance_resampling_moves_mean_field_moments_toward_the_posterior(
    regression, exact, mean_field_fit
):
    model, x, y = regression
    idata = mean_field_fit
    assert idata.attrs["psis_khat"] < PSIS_KHAT_THRESHOLD
    assert idata.attrs["psis_draws"] == "importance_resampled"
    torch.manual_seed(0)
    draws = Predictive(trained_guide(idata), num_samples=MEAN_FIELD_DRAWS, parallel=True)
    guide_sd = draws(x, y)["experts.weight"][:, 0].std(0)  # the guide's draws, fresh
    resampled_sd = torch.as_tensor(idata.posterior["experts.weight"].values[0, :, 0].std(0, ddof=1))
    exact_sd = exact["beta_sd"][:2]
    # the mean-field guide misses the weights' correlation: their sds too small by a fifth or more
    assert bool((guide_sd < 0.8 * exact_sd).all()), (guide_sd, exact_sd)
    # an sd estimated from `ess` effective draws has standard error about sd / sqrt(2 ess): the
    # correction must beat three of them for each weight
    se = exact_sd / math.sqrt(2 * idata.attrs["psis_ess"])
    guide_error, resampled_error = (guide_sd - exact_sd).abs(), (resampled_sd - exact_sd).abs()
    assert bool((resampled_error < guide_error - 3 * se).all()), (guide_sd, resampled_sd, exact_sd)


def test_a_guide_of_unknown_density_is_recorded_as_such(regression, exact):
    model, x, y = regression
    guide = AutoDelta(model, init_loc_fn=init_to_value(values=at_posterior_mean(exact)))
    with pytest.warns(PSISWarning, match="needs the guide's density"):
        idata = fit_svi(
            model, x, y, guide=guide, num_steps=1, num_samples=5, progress=False,
            posterior_predictive=False, importance_resample=True,
        )  # fmt: skip
    assert math.isnan(idata.attrs["psis_khat"]) and idata.attrs["psis_draws"] == "guide"


def test_importance_resample_must_be_a_flag(regression):
    model, x, y = regression
    with pytest.raises(TypeError, match=r"importance_resample must be True or False; got str"):
        fit_svi(model, x, y, importance_resample="yes")


def test_psis_warning_is_exported():
    assert pyromoe.PSISWarning is PSISWarning and issubclass(PSISWarning, UserWarning)


def test_the_log_joint_of_an_out_of_core_source_is_summed_over_every_row_in_chunks(
    regression, exact, tmp_path, monkeypatch
):
    model, x, y = regression
    guide = mean_field_guide(model, x, y, exact)
    torch.manual_seed(0)
    draws = Predictive(guide, num_samples=4, parallel=True, return_sites=SITES)(x, y)
    draws = {name: draws[name] for name in SITES}
    whole = psis.model_log_joint(model, draws, x, y)
    path = tmp_path / "xy.npy"
    np.save(path, torch.cat([x, y[:, None]], 1).numpy())
    table = np.load(path, mmap_mode="r")
    source = as_source(table[:, :2], table[:, 2])
    assert source.tensors() is None  # read from the file, chunk by chunk
    monkeypatch.setattr(psis, "_PASS_BYTES", 8 * 4 * 4 * 7)  # 7 rows per chunk: 15 chunks
    chunked = psis.model_log_joint(model, draws, source)
    assert torch.allclose(chunked, whole, rtol=1e-12, atol=1e-9)
    prior_only = sum(
        model.prior(name, x).log_prob(draws[name]).reshape(4, -1).sum(-1) for name in SITES
    )
    assert bool((whole < prior_only).all())  # the rows' log-likelihood (n = 100) is in it
