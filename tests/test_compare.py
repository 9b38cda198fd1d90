"""Choosing k: compare_experts fits each k from initialize and ranks them by PSIS-LOO."""

from __future__ import annotations

import warnings

import pytest

import pyromoe
from pyromoe import simulate


@pytest.fixture(scope="module")
def compared():
    data = simulate(1500, 2, num_experts=2, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, fits = pyromoe.compare_experts(
            data.x, data.y, (1, 2, 3), num_steps=600, num_samples=300, seed=0
        )
    return table, fits


def test_k1_is_last_and_k2_within_two_dse_of_the_best(compared):
    table, fits = compared
    assert sorted(table.index) == ["k=1", "k=2", "k=3"] and sorted(fits) == sorted(table.index)
    assert table.index[-1] == "k=1"
    best = table["elpd_loo"].max()
    row = table.loc["k=2"]
    assert best - row["elpd_loo"] <= 2 * max(row["dse"], 1e-9)
    # the regression baseline is far behind: one expert cannot fit two regimes
    assert table.loc["k=1", "elpd_diff"] > 5 * table.loc["k=1", "dse"]


def test_each_fit_has_its_k_and_a_log_likelihood(compared):
    _, fits = compared
    for label, idata in fits.items():
        k = int(label.split("=")[1])
        assert idata.posterior.sizes["expert"] == k
        assert idata.log_likelihood["y"].shape[-1] == 1500
        assert ("gate.weight" in idata.posterior) == (k > 1)


def test_nuts_comparison_runs():
    data = simulate(300, 1, num_experts=2, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, fits = pyromoe.compare_experts(
            data.x,
            data.y,
            (1, 2),
            inference="nuts",
            num_warmup=40,
            num_samples=40,
            num_chains=1,
        )
    assert set(table.index) == {"k=1", "k=2"}
    assert fits["k=2"].attrs["inference"].startswith("nuts")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(num_experts=(2,)), ValueError, "at least two values"),
        (dict(num_experts=(1, 1)), ValueError, "must not repeat"),
        (dict(num_experts=(0, 2)), ValueError, "num_experts must be >= 1"),
        (dict(num_experts=3), TypeError, "sequence of ints"),
        (dict(inference="mcmc"), ValueError, "inference must be 'svi' or 'nuts'"),
        (dict(noise="each"), ValueError, "noise must be 'shared'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, message):
    data = simulate(100, 2, seed=0)
    with pytest.raises(error, match=message):
        pyromoe.compare_experts(data.x, data.y, **kwargs)
