"""Feature names from a DataFrame (or feature_names=) everywhere, and `pyromoe fit` in data units."""

import json
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd
import pytest
import torch

from pyromoe import MixtureOfExperts, initialize, simulate
from pyromoe.app import plots
from pyromoe.app.cli import main
from pyromoe.app.fitting import to_data_units
from pyromoe.app.results import RESULTS_MARKER
from pyromoe.bayes.nuts import run_nuts
from pyromoe.bayes.svi import fit_map, fit_svi
from pyromoe.bayes.to_arviz import to_inference_data
from pyromoe.core.labels import best_permutation

NAMES = ["age", "dose"]


@pytest.fixture(scope="module")
def frame_data():
    data = simulate(300, 2, num_experts=2, seed=0, bias=True)
    frame = pd.DataFrame(data.x.numpy(), columns=NAMES)
    return data, frame, pd.Series(data.y.numpy(), name="response")


def _fits(model, x, y, init, **kwargs):
    return {
        "map": fit_map(model, x, y, init=init, num_steps=5, **kwargs),
        "svi": fit_svi(
            model, x, y, init=init, num_steps=5, num_samples=4, progress=False, **kwargs
        ),
        "nuts": run_nuts(
            model,
            x,
            y,
            init=init,
            num_chains=1,
            num_warmup=5,
            num_samples=4,
            progress=False,
            **kwargs,
        ),
    }


def test_dataframe_column_names_are_the_feature_coords_of_every_fit(frame_data):
    data, frame, y = frame_data
    model = MixtureOfExperts(2, 2, bias=True)
    for kind, idata in _fits(model, frame, y, data.truth).items():
        assert list(idata.posterior["feature"].values) == NAMES, kind
        assert list(idata.constant_data["feature"].values) == NAMES, kind
        rows = list(plots.parameter_summary(idata, {"start": data.truth}).index)
        assert "experts.weight[0, age]" in rows and "gate.weight[1, dose]" in rows, kind


def test_explicit_feature_names_name_tensor_inputs(frame_data):
    data, _, _ = frame_data
    model = MixtureOfExperts(2, 2, bias=True)
    for kind, idata in _fits(model, data.x, data.y, data.truth, feature_names=["p", "q"]).items():
        assert list(idata.posterior["feature"].values) == ["p", "q"], kind


def test_dataframe_without_string_labels_keeps_positions(frame_data):
    data, frame, y = frame_data
    model = MixtureOfExperts(2, 2, bias=True)
    idata = fit_map(model, pd.DataFrame(frame.to_numpy()), y, init=data.truth, num_steps=2)
    assert list(idata.posterior["feature"].values) == [0, 1]


def test_estimators_keep_the_dataframe_column_names(frame_data):
    data, frame, y = frame_data
    estimate = initialize(frame, y, 2, seed=0)
    assert estimate.feature_names == NAMES
    assert estimate.permute([1, 0]).feature_names == NAMES
    text = estimate.summary()
    assert "expert 0: weight [age " in text and ", dose " in text
    assert initialize(data.x, data.y, 2, seed=0).feature_names is None


@pytest.mark.parametrize(
    "names, message",
    [
        (["age"], "one name per column"),
        (["age", "age"], "distinct"),
        (["age", 3], "strings"),
        ("ad", "list of 2 strings"),
    ],
)
def test_invalid_feature_names_are_refused_naming_the_argument(frame_data, names, message):
    data, _, _ = frame_data
    model = MixtureOfExperts(2, 2, bias=True)
    draws = {k: v.expand(1, 2, *v.shape) for k, v in data.truth.site_values().items()}
    with pytest.raises(ValueError, match="feature_names") as error:
        to_inference_data(model, data.x, data.y, draws, feature_names=names)
    assert message in str(error.value)
    with pytest.raises(ValueError, match=message):
        fit_map(model, data.x, data.y, num_steps=1, feature_names=names)


# ------------------------------------------------------------------------- pyromoe fit, data units
#: the simulated inputs and target are put on these scales: x_j -> x_j * SCALE_j + OFFSET_j
SCALE, OFFSET = np.array([10.0, 0.5]), np.array([50.0, -3.0])
Y_SCALE, Y_OFFSET = 20.0, 100.0
N, NOISE = 2000, 0.3


def _table(summary: str) -> pd.DataFrame:
    """The posterior table of summary.md (the one with data-unit columns), indexed by parameter."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| parameter | start |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append([cells[0], *(np.nan if c == "-" else float(c) for c in cells[1:])])
    return pd.DataFrame(rows, columns=header).set_index("parameter")


@pytest.fixture(scope="module")
def linear_fit(tmp_path_factory):
    """`pyromoe fit --method svi` on a linear simulated data set with non-trivial means and sds."""
    import pyromoe.app.report as workflow

    data = simulate(N, 2, num_experts=2, noise=NOISE, seed=1, bias=True)
    x = data.x.numpy() * SCALE + OFFSET
    y = data.y.numpy() * Y_SCALE + Y_OFFSET
    folder = tmp_path_factory.mktemp("units")
    path = folder / "data.csv"
    pd.DataFrame({"u": x[:, 0], "v": x[:, 1], "target": y}).to_csv(path, index=False)
    out = folder / "results"
    figures = {}
    original = workflow.save_figure_atomic

    def record(figure, target, **kwargs):
        figures[Path(target).stem] = figure
        return original(figure, target, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(workflow, "save_figure_atomic", record)
        args = ["fit", str(path), "--target", "target", "--method", "svi", "--steps", "400"]
        assert main([*args, "--out", str(out), "--no-progress"]) == 0
    return data, path, out, figures


def _truth_in_data_units(truth):
    a, b = truth.experts_weight.numpy(), truth.experts_bias.numpy()
    w, c = truth.gate_weight.numpy(), truth.gate_bias.numpy()
    return {
        "weight": Y_SCALE * a / SCALE,
        "bias": Y_SCALE * (b - (a * OFFSET / SCALE).sum(-1)) + Y_OFFSET,
        "gate_weight": w / SCALE,
        "gate_bias": c - (w * OFFSET / SCALE).sum(-1),
        "noise": Y_SCALE * float(truth.noise),
    }


def test_data_unit_coefficients_match_a_least_squares_check(linear_fit):
    """The table's data-unit expert lines are the standardised posterior-mean experts mapped to
    the data: a least-squares line through each expert's predictions on the raw inputs."""
    _, path, out, _ = linear_fit
    table = _table((out / "summary.md").read_text())
    frame = pd.read_csv(path)
    raw_x = frame[["u", "v"]].to_numpy()
    x_std = (raw_x - raw_x.mean(0)) / raw_x.std(0)
    target = frame["target"].to_numpy()
    post = az.from_netcdf(out / "inference_data.nc").posterior
    a = post["experts.weight"].mean(("chain", "draw")).values
    b = post["experts.bias"].mean(("chain", "draw")).values
    design = np.column_stack([raw_x, np.ones(len(raw_x))])
    column = "posterior mean (data units)"
    for i in range(2):
        prediction = target.std() * (x_std @ a[i] + b[i]) + target.mean()
        coefficients = np.linalg.lstsq(design, prediction, rcond=None)[0]
        shown = [table.loc[f"experts.weight[{i}, {name}]", column] for name in ("u", "v")]
        shown.append(table.loc[f"experts.bias[{i}]", column])
        # the table rounds to 3 decimals
        np.testing.assert_allclose(shown, coefficients, atol=1e-3, rtol=1e-4)


def test_data_unit_parameters_recover_the_truth_in_data_units(linear_fit):
    data, _, out, _ = linear_fit
    table = _table((out / "summary.md").read_text())
    column = "posterior mean (data units)"
    weight = np.array(
        [[table.loc[f"experts.weight[{i}, {name}]", column] for name in "uv"] for i in range(2)]
    )
    bias = np.array([table.loc[f"experts.bias[{i}]", column] for i in range(2)])
    truth = data.truth.permute(
        best_permutation(torch.as_tensor(weight / Y_SCALE * SCALE), data.truth.experts_weight)
    )
    expected = _truth_in_data_units(truth)
    # standard error of a coefficient ~ noise / sqrt(rows per expert), mapped to data units;
    # 6 of them, and the intercept picks up the offsets' multiples of the weights' errors
    error = NOISE / np.sqrt(N / 2)
    np.testing.assert_allclose(weight, expected["weight"], atol=0, rtol=0.05)
    assert np.all(np.abs(weight - expected["weight"]) < 6 * error * Y_SCALE / SCALE)
    spread = 1 + np.abs(OFFSET / SCALE).sum()
    assert np.all(np.abs(bias - expected["bias"]) < 6 * error * Y_SCALE * spread)
    noise = table.loc["noise", column]
    assert abs(noise - expected["noise"]) < 6 * error * Y_SCALE
    # the gate is estimated less precisely (a logistic fit on the soft labels): within 4
    # posterior sds, the sds mapped to data units too
    for name, truth_value in (
        ("gate.weight[1, u]", expected["gate_weight"][0, 0]),
        ("gate.weight[1, v]", expected["gate_weight"][0, 1]),
        ("gate.bias[1]", expected["gate_bias"][0]),
    ):
        sd = table.loc[name, "sd (data units)"]
        assert abs(table.loc[name, column] - truth_value) < 4 * sd, name


def test_standardisation_json_holds_the_pandas_means_and_sds(linear_fit):
    _, path, out, _ = linear_fit
    frame = pd.read_csv(path)
    record = json.loads((out / "standardisation.json").read_text())
    assert [column["column"] for column in record["inputs"]] == ["u", "v"]
    for column in [*record["inputs"], record["target"]]:
        values = frame[column["column"]]
        assert column["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert column["sd"] == pytest.approx(values.std(ddof=0), rel=1e-12)
    idata = az.from_netcdf(out / "inference_data.nc")
    assert json.loads(idata.attrs["standardisation"]) == record
    assert list(idata.posterior["feature"].values) == ["u", "v"]
    files = json.loads((out / RESULTS_MARKER).read_text())["files"]
    assert {"standardisation.json", "responsibilities.csv"} <= set(files)


def test_responsibilities_csv_has_a_row_per_observation_summing_to_one(linear_fit):
    _, _, out, _ = linear_fit
    frame = pd.read_csv(out / "responsibilities.csv")
    assert len(frame) == N and list(frame["obs"]) == list(range(N))
    means = frame[["mean_expert_0", "mean_expert_1"]].to_numpy()
    assert np.all((means >= 0) & (means <= 1))
    np.testing.assert_allclose(means.sum(1), 1.0, atol=1e-9)
    for i in range(2):
        low, high = frame[f"hdi_3%_expert_{i}"], frame[f"hdi_97%_expert_{i}"]
        assert np.all((low >= 0) & (low <= high + 1e-12) & (high <= 1))
    # the experts are well separated here: most rows belong clearly to one of them
    assert np.mean(means.max(1) > 0.9) > 0.5


def test_posterior_figure_on_real_data_has_no_truth_and_the_table_labels(linear_fit):
    _, _, out, figures = linear_fit
    ax = figures["posterior"].axes[0]
    assert "truth" not in ax.get_title().lower()
    assert "truth" not in [text.get_text() for text in ax.get_legend().get_texts()]
    ticks = [label.get_text() for label in ax.get_yticklabels()]
    rows = list(_table((out / "summary.md").read_text()).index)
    assert len(ticks) == len(rows) and set(ticks) == set(rows)
    assert "gate.weight[1, u]" in ticks and not any("gate.weight[0" in t for t in ticks)


def test_posterior_figure_with_truth_is_titled_so(frame_data):
    data, frame, y = frame_data
    model = MixtureOfExperts(2, 2, bias=True)
    idata = fit_map(model, frame, y, init=data.truth, num_steps=2)
    figure = plots.plot_posterior_vs_truth(idata, data.truth, data.truth)
    assert figure.axes[0].get_title() == "Posterior vs truth"
    figure = plots.plot_posterior_vs_truth(idata, None, None)
    assert "truth" not in figure.axes[0].get_title().lower()


def test_to_data_units_of_a_nonlinear_link_keeps_only_noise_and_gate():
    record = {
        "inputs": [{"column": "u", "mean": 2.0, "sd": 4.0}],
        "target": {"column": "y", "mean": 1.0, "sd": 3.0},
    }
    values = {
        "experts.weight": np.ones((2, 1)),
        "experts.bias": np.zeros(2),
        "gate.weight": np.array([[2.0]]),
        "gate.bias": np.array([1.0]),
        "noise": np.array(0.5),
    }
    mapped = to_data_units(values, record, "tanh")
    assert set(mapped) == {"gate.weight", "gate.bias", "noise"}
    assert mapped["gate.weight"][0, 0] == 0.5 and mapped["gate.bias"][0] == 1.0 - 2.0 * 2.0 / 4.0
    assert float(mapped["noise"]) == 1.5
    linear = to_data_units(values, record, "linear")
    assert linear["experts.weight"][0, 0] == 3.0 * 1.0 / 4.0
    assert linear["experts.bias"][0] == 3.0 * (0.0 - 2.0 / 4.0) + 1.0
