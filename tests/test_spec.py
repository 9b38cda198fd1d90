"""pyromoe.spec: formulas with factors for the experts and the gate, rebuilt for new tables by name."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pyromoe.spec.formula import ModelSpecification

N = 300


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "y": rng.normal(20.0, 5.0, N),
            "x1": rng.normal(45.0, 3.0, N),
            "x2": rng.uniform(1.0, 5.0, N),
            "site": rng.choice(["north", "east", "west"], N),
            "z1": rng.normal(100.0, 10.0, N),
            "cyl": rng.choice([4, 6, 8], N),
        }
    )


FORMULA = "y ~ x1 + np.log(x2) + C(site) + scale(x1):x2"


def test_columns_factors_and_continuous_flags(table):
    spec = ModelSpecification.from_data(table, FORMULA, gate="~ z1 + C(cyl)")
    assert spec.expert_columns == (
        "x1",
        "np.log(x2)",
        "C(site)[T.north]",
        "C(site)[T.west]",
        "scale(x1):x2",
    )
    assert spec.expert_continuous == (True, True, False, False, True)
    assert spec.gate_columns == ("z1", "C(cyl)[T.6]", "C(cyl)[T.8]")
    assert spec.gate_continuous == (True, False, False)
    assert spec.factor_levels == {"cyl": (4, 6, 8), "site": ("east", "north", "west")}
    assert spec.variables == ("cyl", "site", "x1", "x2", "z1") and spec.target == "y"


def test_design_is_the_z_scored_columns_computed_independently(table):
    spec = ModelSpecification.from_data(table, FORMULA, gate="~ z1 + C(cyl)")
    design = spec.design(table)

    def z(values):
        values = np.asarray(values, dtype=float)
        return (values - values.mean()) / values.std()

    x1 = table["x1"].to_numpy()
    scaled = (x1 - x1.mean()) / x1.std(ddof=1)  # formulaic's scale(): sample sd
    expected = np.column_stack(
        [
            z(x1),
            z(np.log(table["x2"])),
            z(table["site"] == "north"),
            z(table["site"] == "west"),
            z(scaled * table["x2"]),
        ]
    )
    np.testing.assert_allclose(design.x, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(design.z[:, 0], z(table["z1"]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(design.z[:, 2], z(table["cyl"] == 8), rtol=0, atol=1e-12)
    np.testing.assert_allclose(design.y, z(table["y"]), rtol=0, atol=1e-12)
    assert spec.y_mean == pytest.approx(table["y"].mean(), rel=1e-14)
    assert spec.y_sd == pytest.approx(table["y"].std(ddof=0), rel=1e-14)


def test_the_gate_defaults_to_the_experts_terms(table):
    spec = ModelSpecification.from_data(table, "y ~ x1 + C(site)")
    assert spec.gate_formula == "~ x1 + C(site)"
    design = spec.design(table)
    np.testing.assert_array_equal(design.x, design.z)


def test_json_round_trip_rebuilds_the_same_design_from_reordered_new_rows(table):
    spec = ModelSpecification.from_data(
        table, "np.log(y) ~ poly(x1, 2) + center(x2) + C(site)", gate="~ C(cyl) + scale(z1)"
    )
    again = ModelSpecification.from_json(spec.to_json())
    assert again == spec
    # new rows: a few, one factor level only, columns in another order, no target
    new = table.iloc[[5, 9, 11]].assign(site="west", cyl=6)[["z1", "cyl", "x2", "site", "x1"]]
    first, second = spec.design(new, target=False), again.design(new, target=False)
    np.testing.assert_array_equal(first.x, second.x)
    np.testing.assert_array_equal(first.z, second.z)
    assert first.y is None
    # the same rows inside the whole table give the same design (stateful transforms kept)
    whole = spec.design(table)
    np.testing.assert_array_equal(
        first.x, spec.design(table.iloc[[5, 9, 11]].assign(site="west", cyl=6)).x
    )
    assert first.x.shape == (3, whole.x.shape[1])
    west = spec.expert_columns.index("C(site)[T.west]")
    assert np.all(first.x[:, west] == whole.x[table["site"] == "west", west][0])


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t.drop(columns="x2"),
            r"data has no column 'x2', which the model's formulas use",
        ),
        (
            lambda t: t.assign(site=["south", *t["site"][1:]]),
            r"column 'site' has level\(s\) 'south' that the fitted data did not have; the model "
            r"knows \['east', 'north', 'west'\]",
        ),
        (
            lambda t: t.assign(x1=[1.0, np.nan, *t["x1"][2:]]),
            r"column 'x1' has a missing value \(first at row 1, 1 in all\)",
        ),
        (lambda t: t.drop(columns="y"), r"data has no column 'y'"),
    ],
)
def test_new_data_problems_are_named(table, change, message):
    spec = ModelSpecification.from_data(table, FORMULA, gate="~ z1 + C(cyl)")
    with pytest.raises(ValueError, match=message):
        spec.design(change(table))


@pytest.mark.parametrize(
    "formula, gate, error, message",
    [
        ("y ~ x1 - 1", None, ValueError, r"removes the intercept \('- 1' or '\+ 0'\)"),
        ("y ~ x1", "~ z1 + 0", ValueError, r"gate '~ z1 \+ 0' removes the intercept"),
        ("~ x1", None, ValueError, r"formula must have a target on the left of '~'"),
        ("y ~ x1", "y ~ z1", ValueError, r"gate must have no left-hand side"),
        ("y ~ x1 +", None, ValueError, r"is not a formula formulaic can read"),
        ("y ~ nothere", None, ValueError, r"data has no column 'nothere'"),
        ("y ~ x1 + I(x1 * 0)", None, ValueError, r"design column\(s\) 'I\(x1 \* 0\)' are constant"),
        ("site ~ x1", None, ValueError, r"left-hand side must give one target column"),
        (3, None, TypeError, r"formula must be a formula string"),
    ],
)
def test_bad_formulas_are_refused_with_the_fix(table, formula, gate, error, message):
    with pytest.raises(error, match=message):
        ModelSpecification.from_data(table, formula, gate=gate)


def test_a_constant_target_and_a_non_table_are_refused(table):
    with pytest.raises(ValueError, match="the target y is constant"):
        ModelSpecification.from_data(table.assign(y=1.0), "y ~ x1")
    with pytest.raises(TypeError, match="data must be a pandas DataFrame"):
        ModelSpecification.from_data(np.zeros((3, 2)), "y ~ x1")


def test_from_json_refuses_other_text():
    with pytest.raises(ValueError, match="invalid JSON"):
        ModelSpecification.from_json("{")
    with pytest.raises(ValueError, match="not a pyromoe model specification of format 1"):
        ModelSpecification.from_json('{"format": 99}')


def test_column_names_with_spaces_are_quoted_with_backticks():
    table = pd.DataFrame(
        {
            "my y": [1.0, 2.0, 3.0, 5.0, 4.0],
            "a b": [3.0, 1.0, 2.0, 7.0, 5.0],
            "the site": ["p", "q", "p", "q", "q"],
        }
    )
    spec = ModelSpecification.from_data(table, "`my y` ~ `a b` + C(`the site`)")
    assert spec.expert_columns == ("a b", "C(`the site`)[T.q]")
    assert spec.variables == ("a b", "the site") and spec.target_variables == ("my y",)
    assert spec.factor_levels == {"the site": ("p", "q")}
    design = ModelSpecification.from_json(spec.to_json()).design(table)
    y = table["my y"].to_numpy()
    np.testing.assert_allclose(design.y, (y - y.mean()) / y.std(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"column 'the site' has level\(s\) 'r'"):
        spec.design(table.assign(**{"the site": ["p", "r", "p", "q", "q"]}))
