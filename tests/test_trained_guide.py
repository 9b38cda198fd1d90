"""trained_guide: fit_svi / fit_map hand back the guide they trained, usable with Predictive."""

from __future__ import annotations

import gc

import arviz as az
import pyro
import pytest
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoDelta, AutoNormal

from pyromoe import (
    MixtureOfExperts,
    fit_map,
    fit_svi,
    initialize,
    run_nuts,
    simulate,
    trained_guide,
)
from pyromoe.bayes import trained

N = 2000  # training rows, and held-out rows


@pytest.fixture(scope="module")
def data():
    return simulate(2 * N, 2, num_experts=2, noise=0.3, seed=1)


@pytest.fixture(scope="module")
def train(data):
    return data.x[:N], data.y[:N]


@pytest.fixture(scope="module")
def estimate(train):
    return initialize(*train, 2, seed=0)


@pytest.fixture(scope="module")
def model():
    return MixtureOfExperts(2, 2)


@pytest.fixture(scope="module")
def map_fit(model, train, estimate):
    return fit_map(model, *train, init=estimate, num_steps=100)


def test_fit_svi_guide_gives_calibrated_predictive_intervals_on_held_out_rows(
    data, train, estimate, model
):
    idata = fit_svi(
        model,
        *train,
        init=estimate,
        num_steps=400,
        num_samples=20,
        progress=False,
        posterior_predictive=False,
    )
    guide = trained_guide(idata)
    assert isinstance(guide, AutoNormal)
    pyro.clear_param_store()  # the guide holds its own parameters
    x_new, y_new = data.x[N:], data.y[N:]
    pyro.set_rng_seed(0)
    with torch.no_grad():
        draws = Predictive(model, guide=guide, num_samples=500, parallel=True)(x_new)
    assert draws["y"].shape == (500, N)
    low, high = draws["y"].quantile(0.05, dim=0), draws["y"].quantile(0.95, dim=0)
    coverage = float(((y_new >= low) & (y_new <= high)).double().mean())
    assert 0.86 <= coverage <= 0.94, coverage


def test_fit_map_guide_is_the_map_point(map_fit, model, data):
    guide = trained_guide(map_fit)
    assert isinstance(guide, AutoDelta)
    draws = Predictive(model, guide=guide, num_samples=3, return_sites=["noise", "gate.weight"])(
        data.x[:10]
    )
    for name in ("noise", "gate.weight"):
        point = torch.as_tensor(map_fit.posterior[name].values[0, 0])
        assert torch.allclose(draws[name].squeeze(1), point.expand_as(draws[name].squeeze(1)))


def test_gate_only_guide_covers_every_site_with_the_experts_at_the_estimate(model, train, estimate):
    idata = fit_map(model, *train, init=estimate, num_steps=30, gate_only=True)
    median = trained_guide(idata).median()
    assert set(median) == {"experts.weight", "experts.bias", "gate.weight", "gate.bias", "noise"}
    assert torch.equal(median["experts.weight"], estimate.experts_weight.to(median["noise"].dtype))
    gate = torch.as_tensor(idata.posterior["gate.weight"].values[0, 0])
    assert torch.allclose(median["gate.weight"], gate)


def test_guides_of_two_fits_do_not_take_each_others_parameters(model, train, estimate):
    """Two trained AutoDeltas used one after the other in the global parameter store: each keeps
    its own point (with Pyro's default name, the second would take over the first's)."""
    pyro.clear_param_store()
    first = trained_guide(fit_map(model, *train, init=estimate, num_steps=2))
    second = trained_guide(fit_map(model, *train, init=estimate, num_steps=100))
    before = first.median()["noise"].item()
    other = second.median()["noise"].item()
    assert first.median()["noise"].item() == before != other
    assert second.median()["noise"].item() == other
    pyro.clear_param_store()


def test_an_idata_without_a_guide_is_refused_saying_why(map_fit, train, model, tmp_path):
    map_fit.to_netcdf(tmp_path / "fit.nc")
    for copy in (az.from_netcdf(tmp_path / "fit.nc"), map_fit.copy()):
        with pytest.raises(ValueError, match="comes from fit_map .* not saved.* same seed"):
            trained_guide(copy)
    x, y = train[0][:100], train[1][:100]
    nuts = run_nuts(
        model, x, y, num_chains=1, num_warmup=5, num_samples=5, progress=False,
        posterior_predictive=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="'nuts', not from fit_svi or fit_map"):
        trained_guide(nuts)
    with pytest.raises(TypeError, match="InferenceData"):
        trained_guide({"posterior": None})


def test_the_guide_leaves_the_registry_with_its_idata(model, train, estimate):
    idata = fit_map(model, *train, init=estimate, num_steps=2)
    key = id(idata)
    assert key in trained._REGISTRY
    del idata
    gc.collect()
    assert key not in trained._REGISTRY
