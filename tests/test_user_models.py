"""run_nuts / fit_svi on a user's own Pyro model around one MixtureOfExperts (issue 24 item 3):
a hierarchical prior on the experts' weights, the mixture under a scope prefix, the checks."""

import json
import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.contrib.autoname import scope
from pyro.infer import Predictive
from pyro.nn import PyroModule, PyroSample

from pyromoe import (
    MixtureOfExperts,
    NUTSConvergenceWarning,
    fit_svi,
    relabel,
    run_nuts,
    simulate,
    trained_guide,
)
from pyromoe.bayes.nuts import _chain_starts
from pyromoe.bayes.user_model import find_mixture, mixture_priors


@pytest.fixture(scope="module")
def data():
    return simulate(300, 2, num_experts=2, noise=0.3, seed=0)


def hierarchical(mixture, prefix=None):
    """A model with tau ~ HalfNormal(1) and the experts' weights ~ Normal(0, tau), the mixture
    under ``scope(prefix=prefix)`` when given."""

    def model(x, y=None):
        tau = pyro.sample("tau", dist.HalfNormal(x.new_tensor(1.0)))
        with mixture_priors(mixture, {"experts.weight": dist.Normal(0.0, tau)}):
            if prefix is None:
                return mixture(x, y)
            with scope(prefix=prefix):
                return mixture(x, y)

    return model


def _max_abs(a, b) -> float:
    return float((torch.as_tensor(np.asarray(a)) - torch.as_tensor(np.asarray(b))).abs().max())


def test_find_mixture_tells_the_mixtures_sites_under_a_scope_prefix_from_the_users(data):
    mixture = MixtureOfExperts(2, 2, bias=False)
    found = find_mixture(hierarchical(mixture, "moe"), data.x, data.y)
    assert found.mixture is mixture
    assert found.names == {
        "moe/experts.weight": "experts.weight",
        "moe/gate.weight": "gate.weight",
        "moe/noise": "noise",
        "moe/y": "y",
    }
    assert found.user_sites == {"tau": ()}
    assert found.num_experts == 2 and found.link is mixture.link  # answers for its mixture
    # the tracing run left the caller's random stream and the mixture's priors as they were
    torch.manual_seed(5)
    expected = torch.rand(())
    torch.manual_seed(5)
    find_mixture(hierarchical(mixture), data.x, data.y)
    assert torch.rand(()) == expected and mixture.priors == {}


def test_the_estimate_seeds_the_mixtures_sites_and_the_fallback_the_users(data):
    mixture = MixtureOfExperts(2, 2, bias=False)
    found = find_mixture(hierarchical(mixture, "moe"), data.x, data.y)
    starts = _chain_starts(found, data.x, data.y, data.truth, 3, False, seed=0)
    assert torch.allclose(starts["experts.weight"][0], data.truth.experts_weight)
    assert torch.allclose(starts["gate.weight"][1], data.truth.gate_weight)
    assert torch.allclose(starts["noise"][2], data.truth.noise.log())  # unconstrained: log
    # tau by the fallback, init_to_median (the median of 15 prior draws): one value for every
    # chain without jitter, within HalfNormal(1)'s 5% and 95% quantiles
    tau = starts["tau"].exp()
    assert torch.all(tau == tau[0]) and 0.0627 < float(tau[0]) < 1.96


def test_run_nuts_on_a_scoped_model_starts_at_the_estimates_labels_and_relabels(
    quick_nuts, tmp_path
):
    """Started at the truth with its experts swapped, the chains keep that labelling (align=False);
    relabel() to the truth and the ArviZ dims work on the mixture's sites as for a bare mixture."""
    small = simulate(150, 2, num_experts=2, noise=0.3, seed=0)
    mixture = MixtureOfExperts(2, 2, bias=False)
    swapped = small.truth.permute([1, 0])
    with warnings.catch_warnings():  # 2 short chains: the convergence check may well warn
        warnings.simplefilter("ignore", NUTSConvergenceWarning)
        idata = quick_nuts(
            hierarchical(mixture, "moe"), small.x, small.y, swapped,
            num_chains=2, num_warmup=40, num_samples=40, align=False,
        )  # fmt: skip
    post = idata.posterior
    assert post["experts.weight"].dims == ("chain", "draw", "expert", "feature")
    assert post["gate.weight"].dims == ("chain", "draw", "gate", "feature")
    assert post["tau"].dims == ("chain", "draw")  # the user's site, untouched
    assert idata.attrs["potential"] == "traced" and json.loads(idata.attrs["user_sites"]) == ["tau"]
    # n = 150, sigma = 0.3: each expert's ~75 rows pin its weights to ~0.04 (posterior sd)
    mean = post["experts.weight"].mean(("chain", "draw")).values
    assert _max_abs(mean, swapped.experts_weight) < 0.15
    idata.to_netcdf(str(tmp_path / "fit.nc"))  # the records are netCDF-safe
    names = json.loads(az.from_netcdf(str(tmp_path / "fit.nc")).attrs["mixture_site_names"])
    assert names == {
        name: f"moe/{name}" for name in ("experts.weight", "gate.weight", "noise", "y")
    }
    aligned = relabel(idata, small.truth)
    assert aligned.posterior.attrs["num_draws_relabelled"] == 80
    mean = aligned.posterior["experts.weight"].mean(("chain", "draw")).values
    assert _max_abs(mean, small.truth.experts_weight) < 0.15


def test_fit_svi_on_a_user_model_returns_the_mixtures_sites_and_a_guide_for_the_model(data):
    mixture = MixtureOfExperts(2, 2, bias=False)
    model = hierarchical(mixture, "moe")
    idata = fit_svi(
        model, data.x, data.y, init=data.truth, num_steps=100, num_samples=100, progress=False
    )
    post = idata.posterior
    assert set(post.data_vars) == {"experts.weight", "gate.weight", "noise", "tau"}
    assert post["experts.weight"].dims == ("chain", "draw", "expert", "feature")
    assert (
        _max_abs(post["experts.weight"].mean(("chain", "draw")), data.truth.experts_weight) < 0.15
    )
    assert idata.log_likelihood["y"].shape == (1, 100, 300)
    draws = Predictive(model, guide=trained_guide(idata), num_samples=50)(data.x)
    assert draws["moe/y"].shape == (50, 300)
    weight = draws["moe/experts.weight"].reshape(50, 2, 2).mean(0)
    assert _max_abs(weight, data.truth.experts_weight) < 0.15  # the guide's draws, not the prior's


def test_a_model_with_no_mixture_or_two_is_refused(data):
    def no_mixture(x, y=None):
        return pyro.sample("y", dist.Normal(x[:, 0], 1.0).to_event(1), obs=y)

    first, second = MixtureOfExperts(2, 2), MixtureOfExperts(2, 2)

    def two_mixtures(x, y=None):
        with scope(prefix="a"):
            first(x, y)
        with scope(prefix="b"):
            return second(x, y)

    with pytest.raises(ValueError, match="calls exactly one MixtureOfExperts.*called none"):
        run_nuts(no_mixture, data.x, data.y, num_chains=1, num_samples=4, progress=False)
    with pytest.raises(ValueError, match=r"made 2 MixtureOfExperts calls .*'a/experts.weight'"):
        fit_svi(two_mixtures, data.x, data.y, num_steps=1, progress=False)


def test_a_user_model_is_refused_what_only_a_bare_mixture_takes(data):
    model = hierarchical(MixtureOfExperts(2, 2, bias=False))
    with pytest.raises(ValueError, match="potential='fused' needs .* model of your own"):
        run_nuts(model, data.x, data.y, potential="fused", num_chains=1, progress=False)
    with pytest.raises(ValueError, match="z= is for a bare MixtureOfExperts"):
        run_nuts(model, data.x, data.y, z=data.x, num_chains=1, progress=False)
    with pytest.raises(ValueError, match="subsample_size= is for a bare MixtureOfExperts"):
        fit_svi(model, data.x, data.y, subsample_size=50, progress=False)
    with pytest.raises(ValueError, match="importance_resample=True weighs the draws by a bare"):
        fit_svi(model, data.x, data.y, importance_resample=True, progress=False)
    with pytest.raises(TypeError, match="or a Pyro model .* got int"):
        run_nuts(3, data.x, data.y)


def test_a_users_site_named_as_the_mixtures_is_refused(data):
    mixture = MixtureOfExperts(2, 2, bias=False)

    def clashing(x, y=None):
        pyro.sample("noise", dist.HalfNormal(x.new_tensor(1.0)))
        with scope(prefix="moe"):
            return mixture(x, y)

    with pytest.raises(ValueError, match=r"sites of its own named \['noise'\]"):
        find_mixture(clashing, data.x, data.y)


def test_mixture_priors_sets_priors_for_the_block_only_and_checks_them():
    mixture = MixtureOfExperts(2, 2, priors={"noise": 0.5})
    prior = dist.Normal(0.0, 3.0)
    with mixture_priors(mixture, {"experts.weight": prior}):
        assert mixture.prior("experts.weight", torch.zeros(())).base_dist.scale.unique() == 3.0
        assert mixture.priors["noise"] == 0.5
    assert mixture.priors == {"noise": 0.5}
    with pytest.raises(ValueError, match="unknown site 'weight'"):
        with mixture_priors(mixture, {"weight": prior}):
            pass
    with pytest.raises(ValueError, match=r"shape \(2, 2\) or be scalar"):
        with mixture_priors(mixture, {"experts.weight": dist.Normal(torch.zeros(3), 1.0)}):
            pass


def _max_rhat(idata, names) -> float:
    rhat = az.rhat(idata, var_names=names)
    return max(float(np.nanmax(rhat[name].values)) for name in names)


@pytest.mark.slow
def test_seeded_nuts_on_a_hierarchical_model_converges_where_default_init_strands_chains():
    """Similar experts (cosine 0.8, the demo's setting at n = 400, d = 4) under tau ~ HalfNormal(1),
    weights ~ Normal(0, tau): from Pyro's default init a chain sits in a wrong mode; started at
    initialize's estimate every chain finds the same mode and r_hat on the mixture's sites is at
    most 1.01."""
    from pyromoe import WRONG_BASIN_NATS, initialize

    data = simulate(
        400, 4, 2, noise=0.5, expert_cosine=0.8, gate="orthogonal", gate_norm=2.0, seed=0
    )
    model = hierarchical(MixtureOfExperts(4, 2, bias=False))
    names = ["experts.weight", "gate.weight", "noise"]
    common = dict(num_chains=4, seed=0, progress=False, posterior_predictive=False)
    with pytest.warns(NUTSConvergenceWarning, match="stuck in a lower mode"):
        default = run_nuts(
            model, data.x, data.y, init=None, num_warmup=50, num_samples=50, **common
        )
    gaps = np.asarray(default.attrs["chain_log_likelihood_gap"])
    assert (gaps > WRONG_BASIN_NATS).sum() >= 1  # measured: 2 chains, 24.8 nats below
    assert _max_rhat(default, names) > 1.1  # measured: 2.8
    start = initialize(data.x, data.y, 2, "linear", seed=0)
    seeded = run_nuts(model, data.x, data.y, init=start, num_warmup=100, num_samples=400, **common)
    assert np.all(np.asarray(seeded.attrs["chain_log_likelihood_gap"]) < WRONG_BASIN_NATS)
    assert _max_rhat(seeded, names) <= 1.01  # measured: 1.006
    assert json.loads(seeded.attrs["user_sites"]) == ["tau"] and "tau" in seeded.posterior


class HierarchicalModule(PyroModule):
    """The hierarchical model as a PyroModule: tau a PyroSample attribute, the mixture a
    submodule."""

    def __init__(self):
        super().__init__()
        self.mixture = MixtureOfExperts(2, 2, bias=False)
        self.tau = PyroSample(dist.HalfNormal(torch.tensor(1.0, dtype=torch.float64)))

    def forward(self, x, y=None):
        with mixture_priors(self.mixture, {"experts.weight": dist.Normal(0.0, self.tau)}):
            return self.mixture(x, y)


def test_a_pyro_module_around_the_mixture_is_fitted_by_fit_svi(data):
    module = HierarchicalModule()
    found = find_mixture(module, data.x, data.y)
    assert found.mixture is module.mixture and found.user_sites == {"tau": ()}
    assert not found.renamed
    idata = fit_svi(
        module, data.x, data.y, init=data.truth, num_steps=20, num_samples=20, progress=False
    )
    assert set(idata.posterior.data_vars) == {"experts.weight", "gate.weight", "noise", "tau"}
    assert idata.attrs["user_model"] == "HierarchicalModule"
