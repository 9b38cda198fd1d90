"""predict / responsibilities / plot_predictions: held-out coverage, the maths against numpy,
reproducibility, every fit's output, the figure, and bad input."""

from __future__ import annotations

import arviz as az
import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import pyromoe
from pyromoe import MixtureOfExperts, fit_map, fit_svi, simulate, sites
from pyromoe.bayes.to_arviz import to_inference_data
from pyromoe.core import likelihood
from pyromoe.core.params import Params

matplotlib.use("Agg")

N_TRAIN, N_TEST = 1000, 2000


@pytest.fixture(scope="module")
def data():
    # one simulation split in two: the held-out rows share the training rows' truth
    return simulate(N_TRAIN + N_TEST, 2, num_experts=2, noise=0.3, seed=1)


@pytest.fixture(scope="module")
def train(data):
    return data.x[:N_TRAIN], data.y[:N_TRAIN]


@pytest.fixture(scope="module")
def test_rows(data):
    return data.x[N_TRAIN:], data.y[N_TRAIN:]


@pytest.fixture(scope="module")
def model():
    return MixtureOfExperts(2, 2, bias=False)


@pytest.fixture(scope="module")
def svi_idata(model, data, train):
    return fit_svi(
        model, *train, init=data.truth, num_steps=300, num_samples=400, progress=False, seed=0
    )


@pytest.fixture(scope="module")
def map_idata(model, data, train):
    return fit_map(model, *train, init=data.truth, num_steps=50, seed=0)


@pytest.fixture(scope="module")
def nuts_idata(model, data, train, quick_nuts):
    x, y = train
    return quick_nuts(
        model, x[:200], y[:200], data.truth, num_chains=2, num_warmup=20, num_samples=10
    )


@pytest.fixture(scope="module")
def tanh_case():
    """A tanh model with biases, 3 experts, named features, and made-up draws (2 chains x 4)."""
    model = MixtureOfExperts(2, 3, link="tanh", bias=True)
    generator = np.random.default_rng(0)
    draws = {
        name: generator.normal(size=(2, 4, *shape)) for name, shape in model.site_shapes.items()
    }
    draws[sites.NOISE] = np.abs(draws[sites.NOISE]) + 0.1
    data = simulate(50, 2, num_experts=3, seed=3)
    idata = to_inference_data(
        model, data.x, data.y, draws, posterior_predictive=False, feature_names=["age", "dose"]
    )
    return model, idata, draws, data


# ---------------------------------------------------------------------------------- predict
def test_predict_90_percent_intervals_cover_90_percent_of_held_out_y(model, svi_idata, test_rows):
    x_test, y_test = test_rows
    pred = pyromoe.predict(model, svi_idata, x_test, seed=0)
    draws = pred.predictions[sites.OBS].values.reshape(-1, N_TEST)
    y_test = y_test.numpy()
    # equal-tailed intervals from the 400 predictive draws per row, and ArviZ's HDI
    low, high = np.quantile(draws, [0.05, 0.95], axis=0)
    coverage = np.mean((low <= y_test) & (y_test <= high))
    hdi = az.hdi(pred.predictions, hdi_prob=0.9)[sites.OBS]
    hdi_coverage = np.mean(
        (hdi.sel(hdi="lower").values <= y_test) & (y_test <= hdi.sel(hdi="higher").values)
    )
    # binomial sd of a coverage of 0.9 over 2000 rows: sqrt(0.9 * 0.1 / 2000) = 0.0067, so the
    # window 0.86-0.94 is 6 sd: room for the posterior's and the 400 draws' own error only.
    # Measured: 0.885 (quantiles), 0.8845 (HDI).
    assert 0.86 <= coverage <= 0.94, coverage
    assert 0.86 <= hdi_coverage <= 0.94, hdi_coverage


def test_predict_mean_gate_and_expert_means_equal_numpy(tanh_case):
    model, idata, draws, data = tanh_case
    x_new = np.random.default_rng(1).normal(size=(7, 2))
    pred = pyromoe.predict(model, idata, x_new).predictions
    for chain, draw in [(0, 0), (0, 3), (1, 2)]:
        a, b = draws[sites.EXPERTS_WEIGHT][chain, draw], draws[sites.EXPERTS_BIAS][chain, draw]
        w, c = draws[sites.GATE_WEIGHT][chain, draw], draws[sites.GATE_BIAS][chain, draw]
        logits = np.concatenate([np.zeros((7, 1)), x_new @ w.T + c], axis=1)
        gate = np.exp(logits - logits.max(1, keepdims=True))
        gate /= gate.sum(1, keepdims=True)
        expert_mean = np.tanh(x_new @ a.T + b)
        np.testing.assert_allclose(pred["gate"].values[chain, draw], gate, rtol=0, atol=1e-10)
        np.testing.assert_allclose(
            pred["expert_mean"].values[chain, draw], expert_mean, rtol=0, atol=1e-10
        )
        np.testing.assert_allclose(
            pred["mean"].values[chain, draw], (gate * expert_mean).sum(1), rtol=0, atol=1e-10
        )


def test_predict_shapes_dims_coords_and_gate_rows_sum_to_one(model, svi_idata, test_rows):
    x_new = test_rows[0][:30]
    pred = pyromoe.predict(model, svi_idata, x_new)
    assert set(pred.groups()) == {"predictions", "predictions_constant_data"}
    predictions = pred.predictions
    assert predictions[sites.OBS].dims == ("chain", "draw", "obs")
    assert predictions["mean"].shape == (1, 400, 30)
    assert predictions["gate"].dims == ("chain", "draw", "obs", "expert")
    assert predictions["expert_mean"].shape == predictions["gate"].shape == (1, 400, 30, 2)
    gate = predictions["gate"].values
    assert ((gate >= 0) & (gate <= 1)).all()
    np.testing.assert_allclose(gate.sum(-1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(pred.predictions_constant_data["x_new"].values, x_new.numpy())
    assert pred.predictions_constant_data["x_new"].dims == ("obs", "feature")
    intervals = az.hdi(pred.predictions)
    assert intervals[sites.OBS].shape == (30, 2) and intervals["gate"].shape == (30, 2, 2)
    assert (intervals[sites.OBS].sel(hdi="lower") < intervals[sites.OBS].sel(hdi="higher")).all()


def test_predict_takes_feature_names_from_the_posterior(tanh_case):
    model, idata, _, data = tanh_case
    pred = pyromoe.predict(model, idata, data.x[:4])
    assert list(pred.predictions_constant_data["feature"].values) == ["age", "dose"]


def test_predict_is_reproducible_and_leaves_the_global_rng_alone(model, svi_idata, test_rows):
    x_new = test_rows[0][:50]
    state = torch.get_rng_state()
    first = pyromoe.predict(model, svi_idata, x_new, seed=5).predictions
    assert torch.equal(torch.get_rng_state(), state)
    again = pyromoe.predict(model, svi_idata, x_new, seed=5).predictions
    other = pyromoe.predict(model, svi_idata, x_new, seed=6).predictions
    np.testing.assert_array_equal(first[sites.OBS].values, again[sites.OBS].values)
    assert not np.allclose(first[sites.OBS].values, other[sites.OBS].values)
    # the seed only moves the draws of y, not their mean
    np.testing.assert_array_equal(first["mean"].values, other["mean"].values)


def test_predict_chunks_and_thins_draws_without_changing_the_means(model, svi_idata, test_rows):
    x_new = test_rows[0][:20]
    whole = pyromoe.predict(model, svi_idata, x_new).predictions
    chunked = pyromoe.predict(model, svi_idata, x_new, chunk_draws=7).predictions
    np.testing.assert_allclose(chunked["mean"].values, whole["mean"].values, rtol=0, atol=1e-14)
    thinned = pyromoe.predict(model, svi_idata, x_new, num_draws=5).predictions
    kept = thinned["draw"].values
    np.testing.assert_array_equal(kept, [0, 100, 200, 299, 399])
    np.testing.assert_allclose(
        thinned["gate"].values, whole["gate"].sel(draw=kept).values, rtol=0, atol=1e-14
    )


def test_predict_works_on_map_and_nuts_output(model, map_idata, nuts_idata, test_rows):
    x_new = test_rows[0][:10]
    with pytest.warns(pyromoe.OneDrawWarning, match="one posterior draw .*'map'"):
        map_pred = pyromoe.predict(model, map_idata, x_new).predictions
    assert map_pred[sites.OBS].shape == (1, 1, 10)
    # the MAP point: the mean is the likelihood module's mixture mean at that point
    point = {
        name: torch.as_tensor(map_idata.posterior[name].values[0, 0]) for name in model.site_shapes
    }
    params = model.params(point, x_new)
    gate = torch.softmax(likelihood.gate_logits(x_new, params.gate_weight, None), -1)
    means = likelihood.expert_means(x_new, params.experts_weight, None, model.link)
    np.testing.assert_allclose(
        map_pred["mean"].values[0, 0], (gate * means).sum(-1).numpy(), rtol=0, atol=1e-12
    )
    nuts_pred = pyromoe.predict(model, nuts_idata, x_new).predictions
    assert nuts_pred["gate"].shape == (2, 10, 10, 2)
    assert np.isfinite(nuts_pred[sites.OBS].values).all()


# ---------------------------------------------------------------------------------- responsibilities
def _averaged_responsibilities(model, idata, x, y) -> np.ndarray:
    values = {
        name: torch.as_tensor(idata.posterior[name].values).flatten(0, 1)
        for name in model.site_shapes
    }
    params = Params.from_sites(values, bias=model.bias).like(x)
    return likelihood.responsibilities(x, y, params, model.link).mean(0).numpy()


def test_responsibilities_columns_ranges_and_the_likelihood_average(model, svi_idata, train):
    table = pyromoe.responsibilities(model, svi_idata)
    assert list(table.columns) == [
        "mean_expert_0",
        "hdi_3%_expert_0",
        "hdi_97%_expert_0",
        "mean_expert_1",
        "hdi_3%_expert_1",
        "hdi_97%_expert_1",
    ]
    assert table.shape == (N_TRAIN, 6) and table.index.name == "obs"
    values = table.to_numpy()
    assert ((values >= 0) & (values <= 1)).all()
    means = table[["mean_expert_0", "mean_expert_1"]].to_numpy()
    np.testing.assert_allclose(means.sum(1), 1.0, atol=1e-12)
    assert (table["hdi_3%_expert_1"] <= table["hdi_97%_expert_1"]).all()
    np.testing.assert_allclose(
        means, _averaged_responsibilities(model, svi_idata, *train), rtol=0, atol=1e-12
    )


def test_responsibilities_intervals_are_arviz_hdi_and_blocks_change_nothing(
    model, svi_idata, test_rows
):
    x, y = test_rows[0][:40], test_rows[1][:40]
    table = pyromoe.responsibilities(model, svi_idata, x, y, hdi_prob=0.9)
    assert "hdi_5%_expert_0" in table and "hdi_95%_expert_0" in table
    blocked = pyromoe.responsibilities(model, svi_idata, x, y, hdi_prob=0.9, chunk_rows=7)
    np.testing.assert_allclose(blocked.to_numpy(), table.to_numpy(), rtol=0, atol=1e-14)
    # row 3, expert 0 directly from arviz over the 400 draws
    values = {
        name: torch.as_tensor(svi_idata.posterior[name].values[0]) for name in model.site_shapes
    }
    draws = likelihood.responsibilities(x[3:4], y[3:4], model.params(values, x), model.link)
    low, high = az.hdi(draws[:, 0, 0].numpy(), hdi_prob=0.9)
    assert table.loc[3, "hdi_5%_expert_0"] == pytest.approx(low, abs=1e-14)
    assert table.loc[3, "hdi_95%_expert_0"] == pytest.approx(high, abs=1e-14)


def test_responsibilities_on_map_output(model, map_idata, train):
    with pytest.warns(pyromoe.OneDrawWarning, match="zero width"):
        table = pyromoe.responsibilities(model, map_idata)
    np.testing.assert_allclose(
        table[["mean_expert_0", "mean_expert_1"]].to_numpy(),
        _averaged_responsibilities(model, map_idata, *train),
        rtol=0,
        atol=1e-12,
    )
    # one draw: the interval is the point
    np.testing.assert_array_equal(table["hdi_3%_expert_0"], table["mean_expert_0"])


# ---------------------------------------------------------------------------------- the figure
def test_plot_predictions_by_position_and_by_name(tanh_case):
    import matplotlib.pyplot as plt

    model, idata, _, _ = tanh_case
    for feature in (0, "dose"):
        figure = pyromoe.plot_predictions(model, idata, feature, num_points=25)
        assert isinstance(figure, Figure) and len(figure.axes) == 2
        ax_y, ax_gate = figure.axes
        assert len(ax_gate.lines) == 3  # one gate curve per expert
        assert ax_gate.get_xlabel() == ("age" if feature == 0 else "dose")
        # the mixture mean line is predict's mean on the grid, averaged over the draws
        mixture = next(line for line in ax_y.lines if line.get_label().startswith("mixture"))
        grid_x = np.asarray(idata.constant_data["x"].values)
        column = 0 if feature == 0 else 1
        held = np.repeat(grid_x.mean(0, keepdims=True), 25, axis=0)
        held[:, column] = mixture.get_xdata()
        expected = pyromoe.predict(model, idata, held).predictions["mean"].mean(("chain", "draw"))
        np.testing.assert_allclose(mixture.get_ydata(), expected.values, atol=1e-12)
        plt.close(figure)


def test_plot_predictions_rejects_an_unknown_feature(tanh_case):
    model, idata, _, _ = tanh_case
    with pytest.raises(
        ValueError, match=r"feature must be one of the feature names \['age', 'dose'\]"
    ):
        pyromoe.plot_predictions(model, idata, "weight")
    with pytest.raises(ValueError, match="feature must be a position 0 to 1"):
        pyromoe.plot_predictions(model, idata, 2)
    with pytest.raises(TypeError, match="feature must be an int"):
        pyromoe.plot_predictions(model, idata, 1.0)


# ---------------------------------------------------------------------------------- bad input
def test_predict_rejects_bad_x_new(model, svi_idata):
    with pytest.raises(ValueError, match=r"x_new must have shape \(m, in_features=2\)"):
        pyromoe.predict(model, svi_idata, np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"x_new must be a 2-D array.*x_new.reshape\(-1, 1\)"):
        pyromoe.predict(model, svi_idata, np.zeros(5))
    bad = np.zeros((4, 2))
    bad[2, 1] = np.nan
    with pytest.raises(
        ValueError, match=r"x_new contains NaN or infinite values \(first at row 2, column 1\)"
    ):
        pyromoe.predict(model, svi_idata, bad)


def test_predict_and_responsibilities_reject_bad_models_and_idata(model, svi_idata, train):
    x_new = np.zeros((3, 2))
    with pytest.raises(TypeError, match="got the class MixtureOfExperts"):
        pyromoe.predict(MixtureOfExperts, svi_idata, x_new)
    with pytest.raises(TypeError, match="model must be a pyromoe.MixtureOfExperts; got dict"):
        pyromoe.responsibilities({}, svi_idata)
    with pytest.raises(TypeError, match="idata must be an arviz.InferenceData"):
        pyromoe.predict(model, {"posterior": {}}, x_new)
    without = az.from_dict(observed_data={"y": np.zeros(3)})
    with pytest.raises(ValueError, match="idata has no posterior group"):
        pyromoe.predict(model, without, x_new)
    # the fit's record of its model refuses another model first, naming the setting...
    with pytest.raises(ValueError, match="bias: the fit's model has False, this model has True"):
        pyromoe.predict(MixtureOfExperts(2, 2, bias=True), svi_idata, x_new)
    with pytest.raises(ValueError, match="num_experts: the fit's model has 2, this model has 3"):
        pyromoe.predict(MixtureOfExperts(2, 3, bias=False), svi_idata, x_new)
    # ...and without the record (older files) the posterior's sites and shapes are checked
    unrecorded = svi_idata.copy()
    del unrecorded.attrs["pyromoe_model"]
    with pytest.raises(
        ValueError, match=r"lacks the model's sites \['experts.bias', 'gate.bias'\]"
    ):
        pyromoe.predict(MixtureOfExperts(2, 2, bias=True), unrecorded, x_new)
    with pytest.raises(ValueError, match=r"idata.posterior\['experts.weight'\] must have dims"):
        pyromoe.predict(MixtureOfExperts(2, 3, bias=False), unrecorded, x_new)
    with pytest.raises(ValueError, match="pass both x and y, or neither"):
        pyromoe.responsibilities(model, svi_idata, x=train[0])
    posterior_only = az.from_dict(
        posterior={name: svi_idata.posterior[name].values for name in model.site_shapes}
    )
    with pytest.raises(ValueError, match=r"no constant_data\['x'\] / observed_data\['y'\]"):
        pyromoe.responsibilities(model, posterior_only)
    with pytest.raises(ValueError, match="hdi_prob must be strictly between 0 and 1"):
        pyromoe.responsibilities(model, svi_idata, hdi_prob=1.5)
    with pytest.raises(ValueError, match="num_draws must be >= 1"):
        pyromoe.predict(model, svi_idata, x_new, num_draws=0)
    with pytest.raises(TypeError, match="chunk_draws must be an int"):
        pyromoe.predict(model, svi_idata, x_new, chunk_draws=2.5)


def test_predict_draws_use_each_experts_own_noise_when_it_has_one():
    # per-expert noise (Params.noise of shape (draws, k)): the draws of y take the chosen
    # expert's sd. The gate sends every row to expert 1 (offset 40: gate_0 ~ 4e-18).
    from pyromoe.bayes.predict import _predict_chunk

    model = MixtureOfExperts(1, 2, bias=True)
    x = torch.linspace(-1, 1, 500, dtype=torch.float64)[:, None]
    params = Params(
        experts_weight=torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64),
        experts_bias=torch.zeros(1, 2, dtype=torch.float64),
        gate_weight=torch.zeros(1, 1, 1, dtype=torch.float64),
        gate_bias=torch.full((1, 1), 40.0, dtype=torch.float64),
        noise=torch.tensor([[100.0, 0.01]], dtype=torch.float64),
    )
    out = _predict_chunk(model, x, params, torch.Generator().manual_seed(0))
    residual = (out[sites.OBS] - out["expert_mean"][..., 1]).numpy()
    # sd of a sample sd over 500 draws: 0.01 / sqrt(2 * 500) = 3e-4; 100 would be far off
    assert np.std(residual) == pytest.approx(0.01, abs=0.002)


def test_predictions_beyond_memory_are_refused_before_any_draw(monkeypatch):
    import pyromoe._validation.values as validation
    from pyromoe import MixtureOfExperts, fit_map, predict, simulate

    data = simulate(200, 2, seed=0)
    model = MixtureOfExperts(2, 2, bias=False)
    idata = fit_map(model, data.x, data.y, init=data.truth, num_steps=5)
    monkeypatch.setattr(validation, "memory_bound", lambda device=None: (10_000, "a test bound"))
    with pytest.raises(ValueError, match=r"num_draws=1 needs about .* for predictions, more than"):
        predict(model, idata, data.x)
