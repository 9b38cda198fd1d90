"""method="auto"'s fallback when the moment step does not apply (issue 26 item 1): one screened
start and random starts raced against it, instead of every start screened and run to the end."""

import types
import warnings

import pytest
import torch

import pyromoe
from pyromoe import fit_em, simulate
from pyromoe.core.em.statistics import mean_log_likelihood
from pyromoe.core.sources import TensorSource
from pyromoe.estimators import initialize as init_module


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _mean_ll(data, estimate) -> float:
    return mean_log_likelihood(TensorSource(data.x, data.y), estimate.params, estimate.link, 4096)


@pytest.fixture(scope="module")
def refused():
    # similar experts at n = 2000, d = 10: the moment step refuses (T2 rank), auto falls back
    return simulate(2000, 10, 2, expert_cosine=0.8, gate_norm=2.0, noise=0.5, bias=True, seed=11)


def test_the_fallback_races_and_reaches_the_multi_start_optimum(refused):
    estimate = _quiet(pyromoe.initialize, refused.x, refused.y, 2, seed=0)
    diagnostics = estimate.diagnostics
    assert diagnostics["initializer"] == "em"
    assert "the moment start could not apply" in diagnostics["initializer_reason"]
    assert "multi-start EM raced on all rows" in diagnostics["initializer_reason"]
    assert diagnostics["fallback_race_rows"] == 2000
    scores = diagnostics["fallback_race_log_likelihoods"]
    # the screened start and RACED_FALLBACK_RANDOM_STARTS raced one(s) (n_init - 1 = 4 is more)
    assert len(scores) == 1 + init_module.RACED_FALLBACK_RANDOM_STARTS
    assert diagnostics["fallback_race_winner"] == "screened"
    # every random start lost, and was stopped before converging
    assert all(diagnostics["fallback_race_stopped"][1:])
    assert max(scores[1:]) < scores[0] + init_module.GUARD_MARGIN
    # the same optimum as five screened starts each run to convergence (EM's tolerance apart)
    multi = _quiet(fit_em, refused.x, refused.y, 2, seed=0)
    assert _mean_ll(refused, estimate) > _mean_ll(refused, multi) - 2e-6


def test_without_random_starts_the_fallback_is_one_default_fit_em_start(refused):
    # n <= SCREEN_ROWS: the race runs on all rows, so one start is fit_em's own, exactly
    estimate = _quiet(pyromoe.initialize, refused.x, refused.y, 2, seed=3, n_init=1)
    one = _quiet(fit_em, refused.x, refused.y, 2, seed=3, n_init=1)
    assert estimate.diagnostics["fallback_race_log_likelihoods"] == [
        one.diagnostics["log_likelihood_per_start"][0]
    ]
    for name in ("experts_weight", "experts_bias", "gate_weight", "gate_bias", "noise"):
        torch.testing.assert_close(getattr(estimate, name), getattr(one, name), rtol=0, atol=0)


def test_a_random_start_that_beats_the_screened_one_wins_and_is_refitted(refused, monkeypatch):
    # the first start a plain draw after one EM iteration: far from any optimum, so a raced run
    # wins
    original = init_module.fit_em.unchecked

    def crippled(*args, **kwargs):
        if kwargs.get("init") is None and kwargs.get("n_init") == 1:
            kwargs.update(max_iter=1, screen=1)
        return original(*args, **kwargs)

    monkeypatch.setattr(init_module, "fit_em", types.SimpleNamespace(unchecked=crippled))
    estimate = _quiet(pyromoe.initialize, refused.x, refused.y, 2, seed=0)
    diagnostics = estimate.diagnostics
    assert diagnostics["fallback_race_winner"] == "random"
    scores = diagnostics["fallback_race_log_likelihoods"]
    assert max(scores[1:]) > scores[0] + init_module.GUARD_MARGIN
    assert (
        "a raced random start won, and EM on all rows ran from it"
        in (diagnostics["initializer_reason"])
    )
    assert diagnostics["converged"]
    # EM ran on from the winner to the optimum: higher than any raced score
    assert _mean_ll(refused, estimate) >= max(scores[1:])


def test_beyond_the_screening_rows_the_race_runs_on_a_subsample_then_em_on_all_rows():
    # k > d: no moment step; 12,000 rows, more than SCREEN_ROWS
    data = simulate(12_000, 1, 2, noise=0.3, bias=True, seed=4)
    estimate = _quiet(pyromoe.initialize, data.x, data.y, 2, seed=0)
    diagnostics = estimate.diagnostics
    assert "num_experts <= its inputs" in diagnostics["initializer_reason"]
    assert diagnostics["fallback_race_rows"] == init_module.SCREEN_ROWS
    assert "EM on all rows ran from it" in diagnostics["initializer_reason"]
    assert diagnostics["converged"]
    multi = _quiet(fit_em, data.x, data.y, 2, seed=0)
    assert _mean_ll(data, estimate) > _mean_ll(data, multi) - 2e-6


def test_beyond_two_experts_the_fallback_runs_every_start_to_convergence():
    # k = 3 > d = 1: the race's stop rule misjudged slow k = 3 runs (RACED_FALLBACK_MAX_EXPERTS)
    data = simulate(600, 1, 3, noise=0.3, bias=True, seed=4)
    estimate = _quiet(pyromoe.initialize, data.x, data.y, 3, seed=0)
    multi = _quiet(fit_em, data.x, data.y, 3, seed=0)
    assert estimate.diagnostics["n_init"] == 5 and "fallback_race_rows" not in estimate.diagnostics
    assert "multi-start EM with n_init=5" in estimate.diagnostics["initializer_reason"]
    torch.testing.assert_close(estimate.experts_weight, multi.experts_weight, rtol=0, atol=0)


def test_method_em_still_runs_every_start_to_convergence(refused):
    estimate = _quiet(pyromoe.initialize, refused.x, refused.y, 2, method="em", seed=0)
    assert estimate.diagnostics["n_init"] == 5
    assert "fallback_race_rows" not in estimate.diagnostics
    assert "multi-start EM with n_init=5" in estimate.diagnostics["initializer_reason"]
