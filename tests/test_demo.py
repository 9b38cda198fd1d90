"""`pyromoe demo`: the per-chain figure is written, the labels say what ran, and the benchmark line
is quoted only from a benchmark's results (the full quick demo is in test_cli.py)."""

import json
import struct

import matplotlib
import pytest

from pyromoe.app import demo, demo_report
from pyromoe.app.demo import StartRecord, mark_wrong_basins, nuts_labels
from pyromoe.app.demo_plots import plot_chain_log_likelihoods, wrong_mode_chains

matplotlib.use("Agg")

TINY = dict(n=400, num_random=2, num_chains=2, num_warmup=20, num_samples=20)
COST = {
    "machine": "test box",
    "date": "2026-12-07",
    "rows": [
        {"n": 2000, "d": 5, "k": 2, "initialize_s": 0.1, "em_start_s": 0.05,
         "multi_start_em_s": 0.2, "same_optimum": True},
        {"n": 200000, "d": 10, "k": 2, "initialize_s": 1.5, "em_start_s": 2.0,
         "multi_start_em_s": 9.25, "same_optimum": True},
    ],
}  # fmt: skip


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _refuse_moments(*args, **kwargs):
    raise ValueError("refused by the test")


@pytest.fixture
def tiny_demo(monkeypatch):
    monkeypatch.setattr(demo, "DEMO_QUICK", TINY)
    monkeypatch.setattr(demo, "_can_run_in_parallel", lambda x: False)  # no spawned processes


def test_demo_labels_the_em_fallback_when_the_moment_step_refuses(tiny_demo, monkeypatch, tmp_path):
    import pyromoe.estimators.tensor_init as tensor_init

    monkeypatch.setattr(tensor_init, "moment_experts", _refuse_moments)
    cost = tmp_path / "initialize_cost.json"
    cost.write_text(json.dumps(COST))
    monkeypatch.setattr(demo_report, "INITIALIZE_COST", cost)
    out = tmp_path / "demo"
    numbers = demo.run_demo(out, seed=3, quick=True, progress=False)
    assert numbers["initializer"] == "em"
    assert list(numbers["nuts"]) == [
        "seeded (EM fallback: multi-start EM)",
        "Pyro default (init_to_uniform)",
    ]
    summary = (out / "summary.md").read_text()
    assert "| seeded (EM fallback: multi-start EM) |" in summary
    assert "tensor start ->" not in summary.split("## NUTS")[1].split("## Parameters")[0]
    assert "ran `em` (the moment start could not apply (refused by the test)" in summary
    assert "| tensor -> EM: moment step failed (refused by the test) |" in summary
    assert "The tensor start could not run on these data" in summary
    assert numbers["num_plain_draws"] == numbers["num_random_starts"] == TINY["num_random"]
    quoted = demo_report.initialize_cost_line(cost)
    assert quoted in summary  # the benchmark's line, labelled as such, in the summary ...
    assert numbers["console"][0].startswith("EM fits in a wrong basin: ")
    assert numbers["console"][1] == quoted.replace("`", "")  # ... and printed
    for name in ("chain_log_likelihood", "random_starts", "trace", "posterior_predictive"):
        width, height = _png_size(out / f"{name}.png")
        assert width > 300 and height > 200
    assert "`chain_log_likelihood.png`" in summary


def test_initialize_cost_line_quotes_the_largest_n_labelled_as_a_benchmark_run(tmp_path):
    path = tmp_path / "initialize_cost.json"
    assert demo_report.initialize_cost_line(path) is None  # absent: nothing said
    path.write_text(json.dumps(COST))
    line = demo_report.initialize_cost_line(path)
    assert "at n = 200,000, d = 10, k = 2" in line
    assert "`initialize` took 1.50 s and the default multi-start `fit_em` 9.25 s" in line
    assert "reaching the same optimum" in line
    assert line.endswith("(from a benchmark run (test box, 2026-12-07)).")
    path.write_text(json.dumps({"machine": "m"}))  # not the benchmark's form: nothing said
    assert demo_report.initialize_cost_line(path) is None


def test_nuts_labels_follow_the_initializer_that_ran():
    from pyromoe import simulate

    estimate = simulate(50, 2, seed=0).truth

    def labelled(method, **diagnostics):
        from dataclasses import replace

        return replace(estimate, method=method, diagnostics=diagnostics)

    cases = [
        (labelled("tensor+em", initializer="tensor", refine_winner="tensor"), "tensor start -> EM"),
        (labelled("tensor+em", initializer="tensor", refine_winner="random"), "random start -> EM"),
        (labelled("tensor+map", initializer="tensor", refine_winner="tensor"), "-> MAP EM"),
        (labelled("em", initializer="em"), "EM fallback: multi-start EM"),
    ]
    for estimate_, expected in cases:
        seeded, default = nuts_labels(estimate_)
        assert expected in seeded and default == "Pyro default (init_to_uniform)"


def test_wrong_basins_are_judged_against_the_best_of_every_kind_of_start():
    def record(label, ll, error):
        return StartRecord(label, ll, 0.1, 10, True, error, estimate=object())

    plain = [record("plain 0", -1000.0, 0.05), record("plain 1", -1478.0, 0.4)]
    screened = [record("screened 0", -1000.002, 0.05)]
    tensor = StartRecord("tensor -> EM: moment step failed (x)", float("nan"), 0.1, 0, False)
    mark_wrong_basins([*plain, *screened, tensor])
    assert [r.wrong_basin for r in (*plain, *screened, tensor)] == [False, True, False, False]


def test_chain_figure_marks_the_chains_below_the_threshold():
    import arviz as az
    import numpy as np

    def run(means):
        totals = np.asarray(means, dtype=float)[:, None] + np.zeros((1, 30))
        idata = az.from_dict(
            posterior={"noise": np.ones((len(means), 30))},
            sample_stats={"log_likelihood_total": totals},
        )
        idata.attrs["chain_mean_log_likelihood"] = list(means)
        return idata

    runs = {"seeded": run([-770.0, -771.0]), "default": run([-771.0, -805.0, -776.5])}
    assert wrong_mode_chains([-771.0, -805.0, -776.5], -770.0, 5.0) == [1, 2]
    figure = plot_chain_log_likelihoods(runs, 5.0)
    seeded_ax, default_ax = figure.axes
    assert "0 of 2 chains in a wrong mode" in seeded_ax.get_title()
    assert "2 of 3 chains in a wrong mode" in default_ax.get_title()
    labels = [text.get_text() for text in default_ax.get_legend().get_texts()]
    assert labels == ["chain 0", "chain 1: wrong mode", "chain 2: wrong mode"]
