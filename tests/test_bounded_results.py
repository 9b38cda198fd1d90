"""The pointwise budget (issue 26 item 5): a fit's pointwise groups keep every row up to
POINTWISE_CELLS draws x rows, beyond it a recorded, seeded random subsample in float32, evaluated
on its own; ``pointwise="all"`` keeps every row; the totals always sum over every row."""

from __future__ import annotations

import math

import arviz as az
import numpy as np
import pandas as pd
import pytest
import torch

import pyromoe.bayes.pointwise as pointwise_module
from pyromoe import MixtureOfExperts, compare_experts, fit_map, fit_svi, simulate
from pyromoe.app.cli import main
from pyromoe.app.regression import MoERegression
from pyromoe.bayes.pointwise import POINTWISE_CELLS, budget_rows, pointwise_rows
from pyromoe.bayes.to_arviz import to_inference_data
from pyromoe.core import likelihood, sites
from pyromoe.core.params import Params

N, D, K = 2500, 2, 2
NUM_DRAWS = 1000  # one chain: 2500 x 1000 cells is over the budget of 2**21
KEPT = POINTWISE_CELLS // NUM_DRAWS  # 2097 rows


@pytest.fixture(scope="module")
def data():
    return simulate(N, D, num_experts=K, noise=0.3, seed=5, bias=True)


@pytest.fixture(scope="module")
def model():
    return MixtureOfExperts(D, K, bias=True)


def _draws_around(data, draws=NUM_DRAWS, scale=0.02, seed=0):
    """Fake posterior draws (1, draws, ...): the truth plus small noise (noise kept positive)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in data.truth.site_values(bias=True).items():
        eps = torch.randn((1, draws, *value.shape), generator=generator, dtype=value.dtype)
        out[name] = value * (1 + scale * eps) if name == sites.NOISE else value + scale * eps
    return out


@pytest.fixture(scope="module")
def draws(data):
    return _draws_around(data)


@pytest.fixture(scope="module")
def idata(data, model, draws):
    return to_inference_data(model, data.x, data.y, draws, seed=7)


def _independent_log_likelihood(data, draws, rows=None) -> np.ndarray:
    """(draws, rows) log p(y | x, theta) from pyromoe.core.likelihood, draw by draw."""
    x, y = (data.x, data.y) if rows is None else (data.x[rows], data.y[rows])
    out = []
    for s in range(draws[sites.NOISE].shape[1]):
        params = Params.from_sites({name: value[0, s] for name, value in draws.items()}, bias=True)
        out.append(likelihood.log_likelihood(x, y, params, data.truth.link))
    return torch.stack(out).numpy()


def test_budget_rows_keep_every_row_up_to_the_budget_then_the_budget():
    assert budget_rows("auto", 2097, 1000) == 2097
    assert budget_rows("auto", 2098, 1000) == 2097
    assert budget_rows("auto", 10**7, 1) == POINTWISE_CELLS  # a MAP fit: one draw
    assert budget_rows("auto", 10**6, 4000) == POINTWISE_CELLS // 4000
    assert budget_rows(300, 10**6, 4000) == 300 and budget_rows(300, 200, 4000) == 200
    assert budget_rows("all", 10**6, 4000) == 10**6
    assert pointwise_rows("auto", 2097, 1000, seed=0) is None


def test_groups_over_the_budget_keep_the_budgets_rows_in_float32(idata):
    for group in ("log_likelihood", "posterior_predictive"):
        values = idata[group]["y"]
        assert values.shape == (1, NUM_DRAWS, KEPT)
        assert values.dtype == np.float32
    assert idata.observed_data["y"].shape == (KEPT,)
    assert idata.constant_data["x"].shape == (KEPT, D)
    assert idata.attrs["pointwise_num_rows"] == KEPT
    assert idata.attrs["pointwise_dtype"] == "float32"
    assert idata.attrs["num_rows"] == N and idata.attrs["pointwise"] == "auto"


def test_the_recorded_rows_are_the_rows_evaluated(idata, data, draws):
    rows = np.asarray(idata.attrs["pointwise_rows"])
    assert rows.shape == (KEPT,) and (np.diff(rows) > 0).all() and 0 <= rows[0] < rows[-1] < N
    np.testing.assert_array_equal(idata.log_likelihood["obs"].values, rows)
    np.testing.assert_array_equal(idata.observed_data["y"].values, data.y.numpy()[rows])
    np.testing.assert_array_equal(idata.constant_data["x"].values, data.x.numpy()[rows])
    expected = _independent_log_likelihood(data, draws, torch.as_tensor(rows))
    # float32 keeps ~7 significant digits of the float64 value
    np.testing.assert_allclose(idata.log_likelihood["y"].values[0], expected, rtol=2e-7, atol=1e-6)


def test_the_totals_still_sum_over_every_row(idata, data, draws):
    expected = _independent_log_likelihood(data, draws).sum(-1)
    total = idata.sample_stats["log_likelihood_total"].values[0]
    np.testing.assert_allclose(total, expected, rtol=1e-12)
    assert idata.attrs["chain_mean_log_likelihood"] == pytest.approx([expected.mean()], rel=1e-12)


def test_the_subsample_is_uniform_and_follows_the_seed(idata, data, model, draws):
    rows = np.asarray(idata.attrs["pointwise_rows"])
    # the share of kept rows below N / 2: binomial-like, sd <= 0.5 / sqrt(KEPT) (without
    # replacement even less); 4 sd
    assert abs((rows < N / 2).mean() - 0.5) < 4 * 0.5 / math.sqrt(KEPT)
    again = to_inference_data(model, data.x, data.y, draws, seed=7, posterior_predictive=False)
    other = to_inference_data(model, data.x, data.y, draws, seed=8, posterior_predictive=False)
    np.testing.assert_array_equal(again.log_likelihood["obs"].values, rows)
    assert not np.array_equal(other.log_likelihood["obs"].values, rows)


def test_posterior_predictive_on_the_kept_rows_has_the_models_mean(data, model):
    draws = {k: v.expand(1, NUM_DRAWS, *v.shape) for k, v in data.truth.site_values().items()}
    idata = to_inference_data(model, data.x, data.y, draws, seed=3, log_likelihood=False)
    rows = torch.as_tensor(idata.posterior_predictive["obs"].values)
    predicted = torch.as_tensor(idata.posterior_predictive["y"].values[0], dtype=torch.float64)
    x = data.x[rows]
    gate = data.truth.gate_probabilities(x)
    means = likelihood.expert_means(
        x, data.truth.experts_weight, data.truth.experts_bias, data.truth.link
    )
    mean = (gate * means).sum(-1)
    variance = (gate * means**2).sum(-1) - mean**2 + data.truth.noise**2
    z = (predicted.mean(0) - mean) / (variance / NUM_DRAWS).sqrt()
    # mean of KEPT squared N(0, 1): 1 +- sqrt(2 / KEPT); 4 s.e.
    assert abs(float((z**2).mean()) - 1) < 4 * math.sqrt(2 / KEPT)


def test_all_returns_every_row_in_the_datas_dtype(data, model, draws):
    idata = to_inference_data(
        model, data.x, data.y, draws, pointwise="all", posterior_predictive=False
    )
    assert idata.log_likelihood["y"].shape == (1, NUM_DRAWS, N)
    assert idata.log_likelihood["y"].dtype == np.float64
    assert idata.attrs["pointwise_dtype"] == "float64" and "pointwise_rows" not in idata.attrs
    np.testing.assert_array_equal(idata.log_likelihood["obs"].values, np.arange(N))
    expected = _independent_log_likelihood(data, draws)
    # absolute too: a few rows' log-likelihoods sit near 0, where the batched and the draw-by-draw
    # products' rounding (1e-15) is a large relative error
    np.testing.assert_allclose(
        idata.log_likelihood["y"].values[0], expected, rtol=1e-12, atol=1e-13
    )


def test_a_number_of_rows_keeps_at_most_that_many(data, model, draws):
    idata = to_inference_data(model, data.x, data.y, draws, pointwise=100, seed=1)
    assert idata.log_likelihood["y"].shape == (1, NUM_DRAWS, 100)
    assert idata.posterior_predictive["y"].shape == (1, NUM_DRAWS, 100)
    few = {name: value[:, :4] for name, value in draws.items()}
    small = to_inference_data(model, data.x[:50], data.y[:50], few, pointwise=100)
    assert small.log_likelihood["y"].shape == (1, 4, 50)  # fewer rows than asked: all, float64
    assert small.log_likelihood["y"].dtype == np.float64


def test_no_block_holds_draws_x_n_when_a_subsample_is_kept(data, model, draws, monkeypatch):
    monkeypatch.setattr(pointwise_module, "BLOCK_CELLS", 2**14)
    cells = []
    original = model.log_likelihood

    class Recording(MixtureOfExperts):
        def log_likelihood(self, x, y, params):
            cells.append(params[sites.NOISE].shape[0] * x.shape[0])
            return original(x, y, params)

    recording = Recording(D, K, bias=True)
    idata = to_inference_data(recording, data.x, data.y, draws, posterior_predictive=False)
    assert max(cells) <= 2**14
    # every row once for the totals, the kept rows once for the group: nothing else
    assert sum(cells) == NUM_DRAWS * (N + KEPT)
    expected = _independent_log_likelihood(data, draws).sum(-1)
    np.testing.assert_allclose(idata.sample_stats["log_likelihood_total"][0], expected, rtol=1e-12)


@pytest.mark.parametrize("bad", ["some", 0, -3, True, 2.5])
def test_a_bad_pointwise_is_refused_naming_the_argument(data, model, draws, bad):
    with pytest.raises(ValueError, match=r"pointwise must be 'auto' .*, 'all' .* or a number"):
        to_inference_data(model, data.x, data.y, draws, pointwise=bad)
    with pytest.raises(ValueError, match=r"pointwise must be 'auto'"):
        fit_svi(model, data.x, data.y, init=data.truth, num_steps=1, pointwise=bad)


def test_fit_svi_and_fit_map_apply_the_budget(data, model, monkeypatch):
    monkeypatch.setattr(pointwise_module, "POINTWISE_CELLS", 100 * 400)  # 100 draws: 400 rows
    svi = fit_svi(
        model, data.x, data.y, init=data.truth, num_steps=5, num_samples=100, progress=False
    )
    assert svi.log_likelihood["y"].shape == (1, 100, 400)
    assert svi.attrs["pointwise_dtype"] == "float32" and svi.attrs["num_rows"] == N
    # one draw: 2500 cells, within the budget: every row as computed
    point = fit_map(model, data.x, data.y, init=data.truth, num_steps=5)
    assert point.log_likelihood["y"].shape == (1, 1, N)
    assert point.log_likelihood["y"].dtype == np.float64
    few = fit_svi(
        model,
        data.x,
        data.y,
        init=data.truth,
        num_steps=5,
        num_samples=20,
        pointwise=30,
        progress=False,
    )
    assert few.posterior_predictive["y"].shape == (1, 20, 30)


def test_run_nuts_applies_the_budget(data, model, quick_nuts):
    idata = quick_nuts(
        model, data.x, data.y, data.truth, num_chains=1, num_warmup=5, num_samples=5, pointwise=40
    )
    assert idata.log_likelihood["y"].shape == (1, 5, 40)
    assert idata.attrs["pointwise_num_rows"] == 40 and len(idata.attrs["pointwise_rows"]) == 40


def test_compare_experts_compares_the_fits_on_the_same_rows(data, monkeypatch):
    monkeypatch.setattr(pointwise_module, "POINTWISE_CELLS", 100 * 400)  # 100 draws: 400 rows
    table, fits = compare_experts(data.x, data.y, (1, 2), num_steps=5, num_samples=100, seed=2)
    rows = [fit.log_likelihood["obs"].values for fit in fits.values()]
    assert rows[0].shape == (400,)
    np.testing.assert_array_equal(rows[0], rows[1])
    assert set(table.index) == {"k=1", "k=2"}


def test_moe_regression_fit_keeps_the_asked_rows(data):
    frame = pd.DataFrame(data.x.numpy(), columns=["a", "b"]).assign(y=data.y.numpy())
    fit = MoERegression("y ~ a + b", num_experts=2).fit(
        frame, method="svi", num_steps=5, progress=False, pointwise=60
    )
    rows = fit.idata.log_likelihood["obs"].values
    assert rows.shape == (60,)
    table = fit.responsibilities()
    np.testing.assert_array_equal(table.index.values, rows)  # the fitted rows, by row number


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory):
    data = simulate(300, 2, num_experts=2, noise=0.3, seed=1, bias=True)
    path = tmp_path_factory.mktemp("csv") / "data.csv"
    frame = pd.DataFrame(data.x.numpy(), columns=["a", "b"]).assign(y=data.y.numpy())
    frame.to_csv(path, index=False)
    return path


def _fit(csv_path, out, *flags):
    args = ["fit", str(csv_path), "--target", "y", "--method", "svi", "--steps", "5"]
    return main([*args, "--no-progress", "--out", str(out), *flags])


def test_cli_pointwise_flag_bounds_the_results_folder(csv_path, tmp_path):
    assert _fit(csv_path, tmp_path / "few", "--pointwise", "50") == 0
    idata = az.from_netcdf(tmp_path / "few" / "inference_data.nc")
    rows = idata.log_likelihood["obs"].values
    assert idata.log_likelihood["y"].shape == (1, 1000, 50)
    assert idata.log_likelihood["y"].dtype == np.float32
    table = pd.read_csv(tmp_path / "few" / "responsibilities.csv", index_col="obs")
    np.testing.assert_array_equal(table.index.values, rows)
    assert _fit(csv_path, tmp_path / "every", "--pointwise", "all") == 0
    idata = az.from_netcdf(tmp_path / "every" / "inference_data.nc")
    assert idata.log_likelihood["y"].shape == (1, 1000, 300)
    assert idata.log_likelihood["y"].dtype == np.float64
    assert len(pd.read_csv(tmp_path / "every" / "responsibilities.csv")) == 300


@pytest.mark.parametrize("bad", ["0", "some"])
def test_cli_refuses_a_bad_pointwise(csv_path, tmp_path, capsys, bad):
    with pytest.raises(SystemExit):
        _fit(csv_path, tmp_path / "bad", "--pointwise", bad)
    assert "--pointwise" in capsys.readouterr().err


def test_cli_help_states_the_budget():
    from pyromoe.app.cli import build_parser

    fit = build_parser()._subparsers._group_actions[0].choices["fit"]
    assert f"2**{int(math.log2(POINTWISE_CELLS))} draws x rows" in fit.format_help()


def test_a_gate_of_its_own_keeps_its_covariates_on_the_same_rows(data):
    z = data.x[:, :1] * 2 + 1  # one gate covariate of its own
    model = MixtureOfExperts(D, K, bias=True, gate_features=1)
    draws = {
        sites.EXPERTS_WEIGHT: data.truth.experts_weight.expand(1, 4, K, D),
        sites.EXPERTS_BIAS: data.truth.experts_bias.expand(1, 4, K),
        sites.GATE_WEIGHT: torch.ones(1, 4, K - 1, 1, dtype=torch.float64),
        sites.GATE_BIAS: torch.zeros(1, 4, K - 1, dtype=torch.float64),
        sites.NOISE: data.truth.noise.expand(1, 4),
    }
    design = torch.cat([data.x, z], 1)
    idata = to_inference_data(model, design, data.y, draws, pointwise=50, seed=3)
    rows = np.asarray(idata.attrs["pointwise_rows"])
    np.testing.assert_array_equal(idata.constant_data["z"].values, z.numpy()[rows])
    np.testing.assert_array_equal(idata.constant_data["x"].values, data.x.numpy()[rows])
    assert idata.log_likelihood["y"].shape == (1, 4, 50)
