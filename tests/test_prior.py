"""Default priors, the prior predictive (sample_prior_predictive) and NUTS's energy statistic."""

from __future__ import annotations

import math
import random

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC
from pyro.infer.mcmc.util import initialize_model

import pyromoe
from pyromoe import MixtureOfExperts, simulate, sites
from pyromoe.bayes import prior as prior_module
from pyromoe.bayes._rng import seeded_rng
from pyromoe.bayes.model import DEFAULT_PRIOR_SCALES
from pyromoe.bayes.nuts import run_nuts
from pyromoe.bayes.nuts_kernel import CountedPotential, RecordingNUTS, record_draw
from pyromoe.bayes.potential import fused_potential
from pyromoe.bayes.prior import sample_prior_predictive
from pyromoe.estimators.initialize import MAP_PRIOR_SCALE


def _standardised(d: int, n: int = 500, seed: int = 0, **kwargs):
    """Simulated data with every column of x and y standardised to mean 0 and sd 1."""
    data = simulate(n, d, num_experts=2, seed=seed, **kwargs)
    x = (data.x - data.x.mean(0)) / data.x.std(0)
    y = (data.y - data.y.mean()) / data.y.std()
    return x, y


def _median_sd_ratio(model, x, y, num_samples=1000, seed=0) -> float:
    """Median over prior draws of the sd of the predicted y across rows, over the sd of y."""
    idata = sample_prior_predictive(model, x, y, num_samples=num_samples, seed=seed)
    per_draw_sd = idata.prior_predictive[sites.OBS].values[0].std(-1, ddof=1)
    return float(np.median(per_draw_sd)) / float(y.std())


# ------------------------------------------------------------------------------ groups and seeds
def test_prior_predictive_has_the_groups_dims_and_shapes_of_the_posterior():
    x, y = _standardised(3, n=40)
    model = MixtureOfExperts(3, 3)
    idata = sample_prior_predictive(model, x, y, num_samples=25, seed=0)
    assert set(idata.groups()) == {"prior", "prior_predictive", "observed_data", "constant_data"}
    expected = {
        "experts.weight": (("chain", "draw", "expert", "feature"), (1, 25, 3, 3)),
        "experts.bias": (("chain", "draw", "expert"), (1, 25, 3)),
        "gate.weight": (("chain", "draw", "gate", "feature"), (1, 25, 2, 3)),
        "gate.bias": (("chain", "draw", "gate"), (1, 25, 2)),
        "noise": (("chain", "draw"), (1, 25)),
    }
    assert set(idata.prior.data_vars) == set(expected)
    for name, (dims, shape) in expected.items():
        assert idata.prior[name].dims == dims and idata.prior[name].shape == shape, name
    assert idata.prior_predictive["y"].dims == ("chain", "draw", "obs")
    assert idata.prior_predictive["y"].shape == (1, 25, 40)
    assert list(idata.prior.gate.values) == [1, 2]  # gate rows are experts 1..k-1, as posterior
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())
    np.testing.assert_array_equal(idata.constant_data["x"].values, x.numpy())
    assert idata.attrs["inference"] == "prior" and idata.attrs["seed"] == 0


def test_without_y_there_is_no_observed_data_and_no_bias_sites_without_bias():
    x, _ = _standardised(2, n=30)
    idata = sample_prior_predictive(MixtureOfExperts(2, 2, bias=False), x, num_samples=5)
    assert set(idata.groups()) == {"prior", "prior_predictive", "constant_data"}
    assert set(idata.prior.data_vars) == {"experts.weight", "gate.weight", "noise"}


def test_same_seed_same_draws_other_seed_other_draws_global_rng_untouched():
    x, y = _standardised(2, n=50)
    model = MixtureOfExperts(2, 2)
    torch.manual_seed(123)
    random.seed(123)
    expected_torch, expected_random = torch.rand(()), random.random()
    torch.manual_seed(123)
    random.seed(123)
    first = sample_prior_predictive(model, x, y, num_samples=20, seed=7)
    assert torch.rand(()) == expected_torch and random.random() == expected_random
    again = sample_prior_predictive(model, x, y, num_samples=20, seed=7)
    other = sample_prior_predictive(model, x, y, num_samples=20, seed=8)
    for group in ("prior", "prior_predictive"):
        for name in first[group].data_vars:
            a, b, c = (idata[group][name].values for idata in (first, again, other))
            np.testing.assert_array_equal(a, b)
            assert not np.array_equal(a, c), (group, name)


def test_draws_are_chunked_over_draws_when_n_is_large(monkeypatch):
    x, y = _standardised(2, n=100)
    model = MixtureOfExperts(2, 2)
    whole = sample_prior_predictive(model, x, y, num_samples=30, seed=3)
    # 100 rows x 2 experts per draw: 3 draws per chunk, so 10 chunks
    monkeypatch.setattr(prior_module, "PREDICTIVE_CHUNK_ELEMENTS", 600)
    chunked = sample_prior_predictive(model, x, y, num_samples=30, seed=3)
    assert chunked.prior_predictive["y"].shape == (1, 30, 100)
    assert np.isfinite(chunked.prior_predictive["y"].values).all()
    for name in whole.prior.data_vars:  # the parameters do not depend on the chunks
        np.testing.assert_array_equal(whole.prior[name].values, chunked.prior[name].values)


def test_public_name_is_exported_lazily():
    assert pyromoe.sample_prior_predictive is sample_prior_predictive


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x: sample_prior_predictive(MixtureOfExperts, x), TypeError, "must be an instance"),
        (lambda x: sample_prior_predictive(lambda x: x, x), TypeError, "MixtureOfExperts"),
        (lambda x: sample_prior_predictive(MixtureOfExperts(3), x), ValueError, "in_features=3"),
        (lambda x: sample_prior_predictive(MixtureOfExperts(2), x[:, 0]), ValueError, "2-D"),
        (lambda x: sample_prior_predictive(MixtureOfExperts(2), x, x[:5, 0]), ValueError, "rows"),
        (
            lambda x: sample_prior_predictive(MixtureOfExperts(2), x, num_samples=0),
            ValueError,
            "num_samples must be >= 1",
        ),
        (
            lambda x: sample_prior_predictive(MixtureOfExperts(2), x, num_samples=2.5),
            TypeError,
            "num_samples must be an int",
        ),
        (
            lambda x: sample_prior_predictive(MixtureOfExperts(2), x, seed=-1),
            ValueError,
            "seed must be in",
        ),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(call, error, match):
    x, _ = _standardised(2, n=20)
    with pytest.raises(error, match=match):
        call(x)


# ------------------------------------------------------------------------------ the default priors
@pytest.mark.parametrize("d", [2, 10])
@pytest.mark.parametrize("bias", [True, False])
def test_prior_predictive_sd_is_at_most_four_times_the_data_sd_on_standardised_data(d, bias):
    x, y = _standardised(d)
    assert _median_sd_ratio(MixtureOfExperts(d, 2, bias=bias), x, y) <= 4.0


def test_the_earlier_default_priors_fail_the_four_times_check_at_d10():
    # Normal(0, 2) experts and HalfCauchy(1) noise: the check above has power
    x, y = _standardised(10)
    earlier = {
        "experts.weight": dist.Normal(torch.tensor(0.0, dtype=x.dtype), 2.0),
        "experts.bias": 2.0,
        "noise": dist.HalfCauchy(torch.tensor(1.0, dtype=x.dtype)),
    }
    assert _median_sd_ratio(MixtureOfExperts(10, 2, priors=earlier), x, y) > 4.0


def _check_mean_and_sd(values: np.ndarray, mean: float, sd: float, name: str) -> None:
    """Sample mean and sd of i.i.d. draws within 5 standard errors of the prior's."""
    n = values.size
    assert abs(values.mean() - mean) <= 5 * sd / math.sqrt(n), name
    # sd of the sample sd ~ sd * sqrt((kurtosis - 1) / (4 n)); kurtosis 3 (normal), <= 3.9 here
    assert abs(values.std() - sd) <= 5 * sd * math.sqrt(2.9 / (4 * n)), name


@pytest.mark.parametrize("d", [1, 4, 16])
def test_prior_draws_follow_the_declared_default_priors(d):
    x = torch.randn(10, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    idata = sample_prior_predictive(MixtureOfExperts(d, 3), x, num_samples=2000, seed=1)
    prior = idata.prior
    # experts' weights Normal(0, 1 / sqrt(d)): a_i . x has prior sd 1 for standardised x
    _check_mean_and_sd(prior["experts.weight"].values, 0.0, 1 / math.sqrt(d), "experts.weight")
    _check_mean_and_sd(prior["experts.bias"].values, 0.0, 1.0, "experts.bias")
    _check_mean_and_sd(prior["gate.weight"].values, 0.0, 2.5, "gate.weight")
    _check_mean_and_sd(prior["gate.bias"].values, 0.0, 2.5, "gate.bias")
    # noise HalfNormal(1): mean sqrt(2 / pi), sd sqrt(1 - 2 / pi)
    noise = prior["noise"].values
    _check_mean_and_sd(noise, math.sqrt(2 / math.pi), math.sqrt(1 - 2 / math.pi), "noise")
    assert (noise > 0).all()


def test_map_prior_scale_is_the_default_gate_prior_scale():
    assert MAP_PRIOR_SCALE == DEFAULT_PRIOR_SCALES[sites.GATE_WEIGHT]
    assert MAP_PRIOR_SCALE == DEFAULT_PRIOR_SCALES[sites.GATE_BIAS]


def test_priors_overrides_show_up_in_the_prior_draws():
    d = 4
    x = torch.randn(10, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    priors = {
        "experts.weight": 2.0,  # the scale of a_i . x: each coefficient Normal(0, 2 / sqrt(d))
        "noise": 0.1,  # HalfNormal(0.1)
        "gate.weight": dist.Normal(torch.tensor(3.0, dtype=torch.float64), 0.5),
        "gate.bias": dist.Normal(torch.tensor([-1.0], dtype=torch.float64), 0.2).to_event(1),
    }
    model = MixtureOfExperts(d, 2, priors=priors)
    prior = sample_prior_predictive(model, x, num_samples=2000, seed=2).prior
    _check_mean_and_sd(prior["experts.weight"].values, 0.0, 2.0 / math.sqrt(d), "experts.weight")
    _check_mean_and_sd(
        prior["noise"].values,
        0.1 * math.sqrt(2 / math.pi),
        0.1 * math.sqrt(1 - 2 / math.pi),
        "noise",
    )
    _check_mean_and_sd(prior["gate.weight"].values, 3.0, 0.5, "gate.weight")
    _check_mean_and_sd(prior["gate.bias"].values, -1.0, 0.2, "gate.bias")
    _check_mean_and_sd(prior["experts.bias"].values, 0.0, 1.0, "experts.bias")  # the default


# ------------------------------------------------------------------------------ NUTS energy
@pytest.fixture(scope="module")
def nuts_runs():
    data = simulate(200, 2, num_experts=2, noise=0.3, seed=0)
    model = MixtureOfExperts(2, 2, bias=False)  # 4 + 2 + 1 = 7 unconstrained coordinates
    kwargs = dict(
        init=data.truth,
        num_chains=2,
        num_warmup=40,
        num_samples=80,
        seed=0,
        progress=False,
        posterior_predictive=False,
    )
    return {
        potential: run_nuts(model, data.x, data.y, potential=potential, **kwargs)
        for potential in ("fused", "traced")
    }


def test_energy_has_shape_chain_draw_and_bfmi_is_finite_and_positive(nuts_runs):
    idata = nuts_runs["fused"]
    stats = idata.sample_stats
    for name in ("energy", "lp", "acceptance_rate", "step_size", "tree_depth", "diverging"):
        assert stats[name].dims == ("chain", "draw") and stats[name].shape == (2, 80), name
    bfmi = az.bfmi(idata)
    assert bfmi.shape == (2,) and np.isfinite(bfmi).all() and (bfmi > 0).all()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    az.plot_energy(idata)
    plt.close("all")


def test_energy_is_the_start_potential_plus_a_fresh_kinetic_energy(nuts_runs):
    stats = nuts_runs["fused"].sample_stats
    energy, lp = stats["energy"].values, stats["lp"].values
    # draw t starts at draw t - 1, whose potential energy is -lp; the rest is 0.5 |r|^2 with a
    # fresh r ~ N(0, I_p): 0.5 chi^2_p, mean p / 2 and variance p / 2, independent across draws
    kinetic = energy[:, 1:] + lp[:, :-1]
    p = 7
    assert (kinetic >= 0).all()
    assert abs(kinetic.mean() - p / 2) <= 5 * math.sqrt(p / 2 / kinetic.size)
    assert np.isfinite(energy).all()


def test_acceptance_rate_is_a_per_draw_probability(nuts_runs):
    acceptance = nuts_runs["fused"].sample_stats["acceptance_rate"].values
    assert ((acceptance >= 0) & (acceptance <= 1)).all()
    assert np.unique(acceptance).size > 10  # per draw, not one number per chain


def test_energy_is_the_same_with_the_fused_and_the_traced_potential(nuts_runs):
    fused, traced = (nuts_runs[name].sample_stats for name in ("fused", "traced"))
    for name in ("energy", "lp", "acceptance_rate"):
        np.testing.assert_allclose(fused[name].values, traced[name].values, rtol=1e-6, err_msg=name)


# ------------------------------------------------------------------------------ Pyro's own values
class _PyroMomentum(pyro.poutine.messenger.Messenger):
    """Test only: the momentum Pyro's NUTS draws, read off its private ``r_t=...`` sample sites."""

    def __enter__(self):
        self.values = []
        return super().__enter__()

    def _pyro_post_sample(self, msg):
        if str(msg["name"]).startswith("r_t="):
            self.values.append(msg["value"].detach())


class _WithPyrosValues(RecordingNUTS):
    """RecordingNUTS that also keeps, per transition, what Pyro knows but does not publish: the
    kinetic energy of the fresh momentum and its running mean acceptance probability."""

    def sample(self, params):
        before = self._mean_accept_prob
        with _PyroMomentum() as momentum:
            state = super().sample(params)
        kinetic = 0.5 * sum(float((r * r).sum()) for r in momentum.values)
        self.pyro_values.append((kinetic, before, self._mean_accept_prob))
        return state


@pytest.mark.parametrize("full_mass", [False, True])
def test_energy_and_acceptance_equal_pyros_private_values(full_mass):
    """The pin for pyromoe's public-interface energy and acceptance_rate (trajectory_statistics,
    from positions, gradients, step size and mass matrix): they equal what Pyro computes inside
    NUTS, read here from its private momentum sites and running mean. When a Pyro release
    changes its integrator (or these internals), this test fails first."""
    data = simulate(200, 2, num_experts=2, noise=0.3, seed=0)
    model = MixtureOfExperts(2, 2, bias=True)
    x, y = data.x, data.y
    with seeded_rng(0):
        initial, _, transforms, _ = initialize_model(model, model_args=(x, y), max_plate_nesting=1)
        potential = CountedPotential(
            model, (x, y), transforms, False, fused=fused_potential(model, x, y)
        )
        kernel = _WithPyrosValues(potential, full_mass=full_mass)
        kernel.pyro_values = []
        num_warmup, num_samples = 30, 40
        mcmc = MCMC(
            kernel,
            num_samples=num_samples,
            warmup_steps=num_warmup,
            initial_params=initial,
            hook_fn=record_draw,
            disable_progbar=True,
        )
        mcmc.run()
    stats = {name: np.asarray(value) for name, value in kernel.draw_stats.items()}
    kinetic, before, after = (np.asarray(v) for v in zip(*kernel.pyro_values[num_warmup:]))
    # energy[t] = U(start of t) + K_t, and draw t starts where draw t - 1 ended: U = -lp[t - 1]
    np.testing.assert_allclose(
        stats["energy"][1:] + stats["lp"][:-1], kinetic[1:], rtol=0, atol=1e-10
    )
    # Pyro's running mean over the kept draws, m_n = m_{n-1} + (a_n - m_{n-1}) / n
    n = np.arange(1, num_samples + 1)
    per_draw = np.where(n == 1, after, n * after - (n - 1) * before)
    np.testing.assert_allclose(stats["acceptance_rate"], per_draw, rtol=0, atol=1e-10)
    assert np.unique(stats["acceptance_rate"]).size > 10
