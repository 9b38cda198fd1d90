"""pyromoe.datasets: the shipped real data sets load with the right shapes, values and provenance."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pyromoe.app.table import read_table
from pyromoe.datasets import (
    DATASETS,
    Dataset,
    dataset_path,
    load_concrete,
    load_dataset,
    load_mcycle,
    load_old_faithful,
)

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
    assert sorted(DATASETS) == ["concrete", "mcycle", "old_faithful"]
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


@pytest.mark.parametrize("name", sorted(DATASETS))
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
    expected_licence = {"old_faithful": "GPL-2", "mcycle": "GPL-2", "concrete": "CC BY 4.0"}[name]
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
