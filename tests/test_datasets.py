"""pyromoe.datasets: the shipped real data sets load with the right shapes, values and provenance."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pandas as pd
import pytest

from pyromoe.app.table import read_frame, read_table
from pyromoe.datasets import (
    DATASETS,
    Dataset,
    dataset_path,
    load_concrete,
    load_dataset,
    load_mcycle,
    load_old_faithful,
    load_penguins,
)
from pyromoe.spec.formula import ModelSpecification

#: the shipped data sets whose every column is a number (read_table reads them)
NUMERIC = ["concrete", "mcycle", "old_faithful"]

# (name, loader, n, d, first row of x, first y, last row of x, last y) from the R packages' data
EXPECTED = [
    ("old_faithful", load_old_faithful, 272, 1, [3.6], 79.0, [4.467], 74.0),
    ("mcycle", load_mcycle, 133, 1, [2.4], 0.0, [57.6], 10.7),
    (
        "concrete",
        load_concrete,
        1030,
        8,
        [540.0, 0.0, 0.0, 162.0, 2.5, 1040.0, 676.0, 28.0],
        79.99,
        [260.9, 100.5, 78.3, 200.6, 8.6, 864.5, 761.5, 28.0],
        32.4,
    ),
    ("penguins", load_penguins, 333, 3, [39.1, 18.7, 181.0], 3750.0, [50.2, 18.7, 198.0], 3775.0),
]


@pytest.mark.parametrize(
    "name, loader, n, d, first_x, first_y, last_x, last_y", EXPECTED, ids=[e[0] for e in EXPECTED]
)
def test_dataset_has_documented_shape_and_values(
    name, loader, n, d, first_x, first_y, last_x, last_y
):
    data = loader()
    assert isinstance(data, Dataset) and data.name == name
    assert data.x.shape == (n, d) and data.y.shape == (n,)
    assert data.num_samples == n and data.in_features == d
    assert data.x.dtype == np.float64 and data.y.dtype == np.float64
    assert np.isfinite(data.x).all() and np.isfinite(data.y).all()
    np.testing.assert_array_equal(data.x[0], first_x)
    assert data.y[0] == first_y
    np.testing.assert_array_equal(data.x[-1], last_x)
    assert data.y[-1] == last_y
    assert len(data.feature_names) == d


def test_old_faithful_matches_r_summary_statistics():
    # R: mean(faithful$eruptions) = 3.487783, mean(faithful$waiting) = 70.89706
    data = load_old_faithful()
    assert data.feature_names == ("eruptions",) and data.target_name == "waiting"
    assert data.x.mean() == pytest.approx(3.487783, abs=5e-7)
    assert data.y.mean() == pytest.approx(70.89706, abs=5e-6)


def test_old_faithful_has_two_regimes_as_described():
    data = load_old_faithful()
    short = data.x[:, 0] < 3
    assert short.sum() == 97
    assert data.y[short].mean() == pytest.approx(54.49, abs=0.01)
    assert data.y[~short].mean() == pytest.approx(79.99, abs=0.01)


def test_mcycle_columns_and_ranges():
    data = load_mcycle()
    assert data.feature_names == ("times",) and data.target_name == "accel"
    assert data.x.min() == 2.4 and data.x.max() == 57.6
    assert data.y.min() == -134.0 and data.y.max() == 75.0


def test_concrete_columns_and_non_gaussian_features_as_described():
    data = load_concrete()
    assert data.target_name == "compressive_strength"
    assert data.feature_names == (
        "cement",
        "blast_furnace_slag",
        "fly_ash",
        "water",
        "superplasticizer",
        "coarse_aggregate",
        "fine_aggregate",
        "age",
    )
    zero_share = (data.x == 0).mean(axis=0)
    np.testing.assert_allclose(zero_share[[1, 2, 4]], [471 / 1030, 566 / 1030, 379 / 1030])
    assert len(np.unique(data.x[:, 7])) == 14
    rows = np.column_stack([data.x, data.y])
    assert len(rows) - len(np.unique(rows, axis=0)) == 25  # exact duplicate rows, as described


def test_registry_loads_every_dataset_by_name():
    assert sorted(DATASETS) == ["concrete", "mcycle", "old_faithful", "penguins"]
    for name, loader in DATASETS.items():
        data = load_dataset(name)
        np.testing.assert_array_equal(data.x, loader().x)
        assert data.name == name


def test_registry_is_read_only():
    with pytest.raises(TypeError):
        DATASETS["mine"] = load_mcycle


def test_unknown_dataset_name_lists_the_shipped_ones():
    with pytest.raises(
        ValueError, match=r"name must be one of the shipped data sets \['concrete', 'mcycle', "
    ):
        load_dataset("faithful")


def test_dataset_path_of_unknown_name_is_refused():
    with pytest.raises(ValueError, match="name must be one of the shipped data sets"):
        dataset_path("iris")


@pytest.mark.parametrize("name", NUMERIC)
def test_dataset_csv_reads_back_identically_with_read_table(name):
    data = load_dataset(name)
    path = dataset_path(name)
    assert path.is_file() and path.suffix == ".csv"
    x, y, features, target = read_table(path, target=data.target_name)
    assert features == data.feature_names and target == data.target_name
    np.testing.assert_array_equal(x, data.x)
    np.testing.assert_array_equal(y, data.y)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_states_its_source_and_licence(name):
    data = load_dataset(name)
    assert len(data.description) > 100
    sources = (dataset_path(name).parent / "SOURCES.md").read_text(encoding="utf-8")
    assert dataset_path(name).name in sources
    expected_licence = {
        "old_faithful": "GPL-2",
        "mcycle": "GPL-2",
        "concrete": "CC BY 4.0",
        "penguins": "CC0 1.0",
    }[name]
    assert expected_licence in data.license


def test_every_shipped_csv_is_registered():
    folder = dataset_path("mcycle").parent
    shipped = {path.name for path in folder.glob("*.csv")}
    assert shipped == {dataset_path(name).name for name in DATASETS}


def test_dataset_is_frozen_and_each_load_is_a_fresh_copy():
    data = load_mcycle()
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.x = np.zeros((1, 1))
    data.y[0] = 1e6  # arrays stay writable (torch.as_tensor warns on read-only arrays)
    assert load_mcycle().y[0] == 0.0


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_frame_is_the_whole_table_and_agrees_with_x_and_y(name):
    data = load_dataset(name)
    frame = data.frame
    assert isinstance(frame, pd.DataFrame) and len(frame) == data.num_samples
    header = dataset_path(name).read_text(encoding="utf-8").splitlines()[0].split(",")
    assert list(frame.columns) == header
    assert isinstance(frame.index, pd.RangeIndex) and not frame.isna().any().any()
    np.testing.assert_array_equal(frame[list(data.feature_names)].to_numpy(np.float64), data.x)
    np.testing.assert_array_equal(frame[data.target_name].to_numpy(np.float64), data.y)
    frame.loc[0, data.target_name] = -1.0  # a fresh copy each load, apart from x and y
    assert data.y[0] != -1.0 and load_dataset(name).frame.loc[0, data.target_name] == data.y[0]


# penguins.csv: 333 complete rows of palmerpenguins' 344 (see SOURCES.md)
PENGUINS_SHA256 = "b6e7326492ab7e844cabed4e243be2bb4c5af927a9c2e48521324ed050f80fe1"
# row of the frame -> its values; R's row 4 (no measurements) was dropped, so R's row 5 is row 3
PENGUIN_ROWS = {
    0: ("Adelie", "Torgersen", 39.1, 18.7, 181.0, 3750.0, "male", 2007.0),
    3: ("Adelie", "Torgersen", 36.7, 19.3, 193.0, 3450.0, "female", 2007.0),
    332: ("Chinstrap", "Dream", 50.2, 18.7, 198.0, 3775.0, "female", 2009.0),
}
PENGUIN_LEVELS = {
    "species": ["Adelie", "Chinstrap", "Gentoo"],
    "island": ["Biscoe", "Dream", "Torgersen"],
    "sex": ["female", "male"],
}


def test_penguins_file_is_the_documented_one():
    path = dataset_path("penguins")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == PENGUINS_SHA256
    sources = (path.parent / "SOURCES.md").read_text(encoding="utf-8")
    assert "## penguins.csv: Palmer penguins" in sources and PENGUINS_SHA256 in sources
    assert "CC0 1.0" in sources and "doi:10.1371/journal.pone.0090081" in sources
    assert "11 incomplete rows dropped" in sources


def test_penguins_columns_dtypes_and_factor_levels():
    data = load_penguins()
    frame = data.frame
    assert data.target_name == "body_mass_g"
    assert data.feature_names == ("bill_length_mm", "bill_depth_mm", "flipper_length_mm")
    assert list(frame.columns) == [
        "species",
        "island",
        "bill_length_mm",
        "bill_depth_mm",
        "flipper_length_mm",
        "body_mass_g",
        "sex",
        "year",
    ]
    for column, levels in PENGUIN_LEVELS.items():
        assert isinstance(frame[column].dtype, pd.CategoricalDtype), column
        assert not frame[column].cat.ordered
        assert list(frame[column].cat.categories) == levels
    for column in ("bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "year"):
        assert frame[column].dtype == np.float64, column
    for row, values in PENGUIN_ROWS.items():
        assert tuple(frame.loc[row]) == values, row
    assert frame["body_mass_g"].sum() == 1400950.0
    assert frame["flipper_length_mm"].sum() == 66922.0


def test_penguins_counts_and_regimes_as_described():
    frame = load_penguins().frame
    counts = frame["species"].value_counts()
    assert counts.to_dict() == {"Adelie": 146, "Gentoo": 119, "Chinstrap": 68}
    assert frame["sex"].value_counts().to_dict() == {"male": 168, "female": 165}
    assert frame["year"].value_counts().sort_index().to_dict() == {2007: 103, 2008: 113, 2009: 117}
    table = pd.crosstab(frame["species"], frame["island"])
    assert table.loc["Gentoo"].tolist() == [119, 0, 0] and table["Biscoe"].sum() == 163
    gentoo = (frame["species"] == "Gentoo").to_numpy()
    depth = frame["bill_depth_mm"].to_numpy()
    assert (depth[gentoo].min(), depth[gentoo].max()) == (13.1, 17.3)
    assert (depth[~gentoo].min(), depth[~gentoo].max()) == (15.5, 21.5)
    assert depth[gentoo].mean() == pytest.approx(15.0, abs=0.05)
    assert depth[~gentoo].mean() == pytest.approx(18.4, abs=0.05)

    def least_squares(rows):  # mass ~ flipper + male: (intercept, slope, male), residual sd
        part = frame[rows]
        design = np.column_stack(
            [np.ones(len(part)), part["flipper_length_mm"], part["sex"] == "male"]
        ).astype(np.float64)
        coef, *_ = np.linalg.lstsq(design, part["body_mass_g"].to_numpy(), rcond=None)
        residual = part["body_mass_g"].to_numpy() - design @ coef
        return coef, np.sqrt(residual @ residual / (len(part) - 3))

    (_, slope_g, male_g), sd_g = least_squares(gentoo)
    (_, slope_o, male_o), sd_o = least_squares(~gentoo)
    _, sd_all = least_squares(np.ones(len(frame), dtype=bool))
    np.testing.assert_allclose([slope_g, slope_o], [23.5, 15.5], atol=0.05)
    np.testing.assert_allclose([male_g, male_o], [598, 502], atol=0.5)
    np.testing.assert_allclose([sd_g, sd_o, sd_all], [276, 304, 356], atol=0.5)


def test_penguins_bill_shape_predicts_the_regime_as_described():
    from scipy.optimize import minimize

    frame = load_penguins().frame
    gentoo = (frame["species"] == "Gentoo").to_numpy(dtype=np.float64)
    errors = []
    for columns in (["bill_depth_mm"], ["bill_length_mm", "bill_depth_mm"]):
        z = frame[columns].to_numpy()
        design = np.column_stack([np.ones(len(z)), (z - z.mean(0)) / z.std(0)])

        def loss(coef, design=design):  # logistic regression, a whisper of ridge for separation
            logits = design @ coef
            return np.logaddexp(0.0, logits).sum() - gentoo @ logits + 1e-3 * coef @ coef

        coef = minimize(loss, np.zeros(design.shape[1]), method="BFGS").x
        errors.append(int(((design @ coef > 0) != (gentoo > 0)).sum()))
    assert errors == [15, 6]


def test_penguins_csv_reads_back_with_read_frame():
    data = load_penguins()
    frame = read_frame(dataset_path("penguins"))
    assert list(frame.columns) == list(data.frame.columns)
    for column in data.frame.columns:
        expected = data.frame[column]
        if column in PENGUIN_LEVELS:
            assert frame[column].tolist() == expected.astype(str).tolist(), column
        else:
            np.testing.assert_array_equal(frame[column].to_numpy(), expected.to_numpy())


def test_penguins_frame_builds_the_suggested_formulas():
    frame = load_penguins().frame
    spec = ModelSpecification.from_data(
        frame,
        "body_mass_g ~ flipper_length_mm + C(sex)",
        gate="~ bill_length_mm + bill_depth_mm + C(island)",
    )
    assert spec.expert_columns == ("flipper_length_mm", "C(sex)[T.male]")
    assert spec.gate_columns == (
        "bill_length_mm",
        "bill_depth_mm",
        "C(island)[T.Dream]",
        "C(island)[T.Torgersen]",
    )
    assert spec.factor_levels == {
        "island": ("Biscoe", "Dream", "Torgersen"),
        "sex": ("female", "male"),
    }
    design = spec.design(frame)
    assert design.x.shape == (333, 2) and design.z.shape == (333, 4) and design.y.shape == (333,)
