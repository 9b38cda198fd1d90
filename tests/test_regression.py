"""MoERegression: formulas with factors fitted in the data's own units, predictions by column
name, save and load, and the command line's --formula and predict."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import pyromoe
from pyromoe.app.cli import main

# raw units: inputs around 45 and 100, y around 20 +- 5; two experts on u, the gate on v
TRUTH = {"intercepts": (-7.0 + 0.2 * 45, 17.5 - 0.3 * 45), "slopes": (-0.2, 0.3), "site_b": 1.5}
NOISE = 2.5


def _table(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(
        {
            "u": rng.normal(45.0, 5.0, n),
            "v": rng.normal(100.0, 10.0, n),
            "site": rng.choice(["a", "b", "c"], n),
        }
    )
    second = rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-0.2 * (table["v"] - 100.0)))
    mean = np.where(
        second,
        TRUTH["intercepts"][1] + TRUTH["slopes"][1] * table["u"],
        TRUTH["intercepts"][0] + TRUTH["slopes"][0] * table["u"],
    )
    table["y"] = mean + TRUTH["site_b"] * (table["site"] == "b") + rng.normal(0.0, NOISE, n)
    return table


@pytest.fixture(scope="module")
def fitted():
    table = _table(2000, seed=0)
    fit = pyromoe.MoERegression("y ~ u + v + C(site)", num_experts=2)
    return table, fit.fit(table, method="svi", num_steps=1500, seed=0, progress=False)


def _expert_order(summary: pd.DataFrame) -> list[int]:
    """The fitted experts in the truth's order (by the slope of u)."""
    slopes = [summary.loc[f"experts.weight[{i}, u]", "mean"] for i in (0, 1)]
    return [0, 1] if slopes[0] < slopes[1] else [1, 0]


def test_raw_units_fit_recovers_every_coefficient_in_data_units(fitted):
    table, fit = fitted
    summary = fit.summary()
    order = _expert_order(summary)
    n_each = len(table) / 2
    # the sampling sd of a slope is noise / (sqrt(n_i) * sd(u)); of an intercept at u = 0,
    # 45 / sd(u) times larger: bounds of 5 such sds
    slope_bound = 5 * NOISE / (np.sqrt(n_each) * 5.0)
    intercept_bound = slope_bound * (45.0 + 5.0)
    for truth_index, fitted_index in enumerate(order):
        slope = summary.loc[f"experts.weight[{fitted_index}, u]", "mean"]
        intercept = summary.loc[f"experts.bias[{fitted_index}]", "mean"]
        site_b = summary.loc[f"experts.weight[{fitted_index}, C(site)[T.b]]", "mean"]
        assert abs(slope - TRUTH["slopes"][truth_index]) < slope_bound
        assert abs(intercept - TRUTH["intercepts"][truth_index]) < intercept_bound
        assert abs(site_b - TRUTH["site_b"]) < 5 * NOISE / np.sqrt(n_each / 3)
    assert abs(summary.loc["noise", "mean"] - NOISE) < 5 * NOISE / np.sqrt(2 * len(table))
    # the gate in the data's units: logit of the second expert = 0.2 (v - 100)
    sign = 1.0 if order == [0, 1] else -1.0
    gate_v = sign * summary.loc["gate.weight[1, v]", "mean"]
    assert abs(gate_v - 0.2) < 0.05 and abs(summary.loc["gate.bias[1]", "mean"] + sign * 20) < 5


def test_predict_matches_columns_by_name_and_save_load_gives_identical_draws(fitted, tmp_path):
    table, fit = fitted
    new = _table(50, seed=5).drop(columns="y")
    first = fit.predict(new, seed=3)
    shuffled = fit.predict(new[["site", "v", "u"]], seed=3)
    pd.testing.assert_frame_equal(first, shuffled)
    assert list(first.columns) == ["mean", "sd", "q5%", "q95%"]
    assert (first["q5%"] < first["mean"]).all() and (first["mean"] < first["q95%"]).all()
    fit.save(tmp_path / "fit")
    again = pyromoe.load(tmp_path / "fit")
    pd.testing.assert_frame_equal(again.predict(new, seed=3), first, check_exact=True)
    pd.testing.assert_frame_equal(again.summary(), fit.summary())
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        fit.save(tmp_path / "fit")


def test_predict_refuses_missing_columns_and_unseen_levels_by_name(fitted):
    _, fit = fitted
    new = _table(5, seed=6).drop(columns="y")
    with pytest.raises(ValueError, match="data has no column 'v'"):
        fit.predict(new.drop(columns="v"))
    with pytest.raises(ValueError, match=r"column 'site' has level\(s\) 'd'"):
        fit.predict(new.assign(site="d"))
    with pytest.raises(ValueError, match="needs a fitted model"):
        pyromoe.MoERegression("y ~ u").predict(new)


def test_load_refuses_a_folder_that_is_no_saved_fit(tmp_path):
    with pytest.raises(FileNotFoundError, match="'model.json' is missing"):
        pyromoe.load(tmp_path)


def test_cli_formula_fit_then_predict_covers_held_out_rows(tmp_path, capsys):
    train, held = _table(1500, seed=1), _table(2000, seed=2)
    train.to_csv(tmp_path / "train.csv", index=False)
    held.drop(columns="y").to_csv(tmp_path / "new.csv", index=False)
    out, predictions = tmp_path / "results", tmp_path / "predictions.csv"
    args = ["fit", str(tmp_path / "train.csv"), "--formula", "y ~ u + C(site)", "--gate", "~ v"]
    assert (
        main([*args, "--method", "svi", "--steps", "1500", "--no-progress", "--out", str(out)]) == 0
    )
    assert {"specification.json", "model.json"} <= {p.name for p in out.iterdir()}
    assert main(["predict", str(out), str(tmp_path / "new.csv"), "--out", str(predictions)]) == 0
    table = pd.read_csv(predictions)
    assert len(table) == len(held) and list(table["row"]) == list(range(len(held)))
    covered = ((held["y"] >= table["q5%"]) & (held["y"] <= table["q95%"])).mean()
    assert 0.86 <= covered <= 0.94, covered
    # the same folder again: never over an existing file
    capsys.readouterr()
    assert main(["predict", str(out), str(tmp_path / "new.csv"), "--out", str(predictions)]) == 2
    assert "pyromoe never overwrites a file" in capsys.readouterr().err


def test_cli_formula_and_target_are_one_or_the_other(tmp_path, capsys):
    _table(200, seed=3).to_csv(tmp_path / "data.csv", index=False)
    args = ["fit", str(tmp_path / "data.csv"), "--out", str(tmp_path / "r")]
    assert main([*args, "--formula", "y ~ u", "--target", "y"]) == 2
    assert "either as a target" in capsys.readouterr().err
    assert main(args) == 2
    assert not (tmp_path / "r").exists()


def test_a_gate_formula_of_its_own_recovers_the_gate_in_data_units():
    table = _table(2000, seed=4)
    fit = pyromoe.MoERegression("y ~ u + C(site)", gate="~ v", num_experts=2)
    fit.fit(table, method="svi", num_steps=800, seed=0, progress=False)
    assert fit.model.gate_features == 1
    summary = fit.summary()
    assert "gate.weight[1, v]" in summary.index and "gate.weight[1, u]" not in summary.index
    order = _expert_order(summary)
    sign = 1.0 if order == [0, 1] else -1.0
    # logit of the second expert = 0.2 (v - 100): sampling sd of the slope ~ 0.01 at n = 2000
    assert abs(sign * summary.loc["gate.weight[1, v]", "mean"] - 0.2) < 0.05
    assert abs(sign * summary.loc["gate.bias[1]", "mean"] + 20) < 5
    new = _table(20, seed=8).drop(columns="y")
    pd.testing.assert_frame_equal(
        fit.predict(new, seed=1), fit.predict(new[["v", "site", "u"]], seed=1)
    )
    with pytest.raises(ValueError, match="data has no column 'v'"):
        fit.predict(new.drop(columns="v"))


def test_the_raw_model_warns_on_data_far_from_standardised():
    import warnings

    table = _table(300, seed=9)
    x, y = table[["u", "v"]].to_numpy(), table["y"].to_numpy()
    model = pyromoe.MixtureOfExperts(2, 2)
    with pytest.warns(pyromoe.UnstandardisedDataWarning) as caught:
        pyromoe.fit_map(model, x, y, num_steps=2)
    message = str(caught[0].message)
    assert "x column(s) 0 (mean 45" in message and "y (mean" in message
    assert "pyromoe.MoERegression" in message and caught[0].filename == __file__
    z_scores = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    with warnings.catch_warnings():
        warnings.simplefilter("error", pyromoe.UnstandardisedDataWarning)
        pyromoe.fit_map(model, *z_scores, num_steps=2)  # standardised: no warning
        priors = {name: 100.0 for name in model.site_shapes}
        pyromoe.fit_map(pyromoe.MixtureOfExperts(2, 2, priors=priors), x, y, num_steps=2)


def test_plot_predictions_along_a_column_in_data_units(fitted):
    import matplotlib

    matplotlib.use("Agg")
    table, fit = fitted
    figure = fit.plot_predictions("u", table, num_points=20)
    top, gate = figure.axes[:2]
    assert top.get_ylabel() == "y" and gate.get_xlabel() == "u"
    mixture = [line for line in top.get_lines() if line.get_label().startswith("mixture")][0]
    x_values = mixture.get_xdata()
    assert x_values.min() == pytest.approx(table["u"].min()) and len(x_values) == 20
    # the mixture mean is in y's units: within the data's range
    assert table["y"].min() < mixture.get_ydata().mean() < table["y"].max()
    with pytest.raises(ValueError, match="feature must be a numeric column the formulas read"):
        fit.plot_predictions("site", table)


@pytest.mark.slow
def test_nuts_in_raw_units_puts_the_truth_within_three_posterior_sds():
    # the setting: n = 400, inputs around 45 / 100 / 70, y around 20 +- 5, intercepts
    # -7.0 and 17.5 at zero inputs, noise 2.5; the gate on x2
    rng = np.random.default_rng(11)
    n = 400
    table = pd.DataFrame(
        {"x1": rng.normal(45, 5, n), "x2": rng.normal(100, 10, n), "x3": rng.normal(70, 8, n)}
    )
    slopes = np.array([[0.3, 0.05, -0.1], [-0.1, 0.05, 0.05]])
    intercepts = np.array([-7.0, 17.5])
    second = rng.uniform(size=n) < 1 / (1 + np.exp(-0.3 * (table["x2"] - 100)))
    means = table[["x1", "x2", "x3"]].to_numpy() @ slopes.T + intercepts
    table["y"] = np.where(second, means[:, 1], means[:, 0]) + rng.normal(0, 2.5, n)
    fit = pyromoe.MoERegression("y ~ x1 + x2 + x3", num_experts=2)
    fit.fit(
        table, method="nuts", num_chains=2, num_warmup=300, num_samples=300, seed=0, progress=False
    )
    summary = fit.summary()
    slope = [summary.loc[f"experts.weight[{i}, x1]", "mean"] for i in (0, 1)]
    order = [0, 1] if slope[0] > slope[1] else [1, 0]  # expert 0 of the truth has slope 0.3
    for truth_index, i in enumerate(order):
        for j, column in enumerate(("x1", "x2", "x3")):
            row = summary.loc[f"experts.weight[{i}, {column}]"]
            assert abs(row["mean"] - slopes[truth_index, j]) < 3 * row["sd"], (i, column)
        row = summary.loc[f"experts.bias[{i}]"]
        assert abs(row["mean"] - intercepts[truth_index]) < 3 * row["sd"], i
    row = summary.loc["noise"]
    assert abs(row["mean"] - 2.5) < 3 * row["sd"]


def test_responsibilities_of_table_rows_keep_their_index(fitted):
    table, fit = fitted
    rows = table.iloc[[5, 17, 42]]
    result = fit.responsibilities(rows)
    assert list(result.index) == [5, 17, 42]
    means = result[["mean_expert_0", "mean_expert_1"]].to_numpy()
    np.testing.assert_allclose(means.sum(1), 1.0, atol=1e-9)
    assert len(fit.responsibilities()) == len(table)
