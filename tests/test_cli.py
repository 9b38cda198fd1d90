"""The command line: `pyromoe demo` and `pyromoe fit` produce every output, and fail cleanly."""

import struct
import subprocess
import sys

import arviz as az
import pytest

from pyromoe import datasets
from pyromoe.app.cli import main

GROUPS = {"posterior", "sample_stats", "log_likelihood", "posterior_predictive", "observed_data"}
# one chain: these tests check the outputs, not mixing (the demo test runs two); two chains on a
# 2-core machine cost over twice the time
SMALL_NUTS = ["--chains", "1", "--warmup", "60", "--samples", "60", "--no-progress"]


def _png_size(path):
    """Width and height from a PNG header (fails on anything that is not a PNG)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _check_results(folder, figures):
    idata = az.from_netcdf(folder / "inference_data.nc")
    assert GROUPS <= set(idata.groups())
    assert idata.posterior["experts.weight"].dims[:3] == ("chain", "draw", "expert")
    for name in figures:
        width, height = _png_size(folder / f"{name}.png")
        assert width > 100 and height > 100
    return (folder / "summary.md").read_text()


def test_help_lists_the_commands():
    result = subprocess.run(
        [sys.executable, "-m", "pyromoe.app.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "demo" in result.stdout and "fit" in result.stdout


@pytest.mark.slow
def test_demo_quick_writes_every_output(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    summary = _check_results(
        out,
        [
            "trace",
            "posterior_vs_truth",
            "random_starts",
            "chain_log_likelihood",
            "responsibilities",
            "posterior_predictive",
        ],
    )
    assert "| start | log-likelihood | below best (nats) | expert error |" in summary
    # the seeded NUTS row names the initializer that ran
    seeded = "(EM fallback: multi-start EM)" if "ran `em`" in summary else "(tensor start -> "
    assert f"| seeded {seeded}" in summary
    assert "| NUTS init | max r_hat (as sampled) | max r_hat (relabelled) |" in summary
    assert "| parameter | truth | start | posterior mean | sd | 94% low | 94% high |" in summary
    assert "| step | seconds |" in summary
    assert "results written to" in capsys.readouterr().out


def test_fit_one_input_data_set_uses_the_em_fallback(tmp_path):
    out = tmp_path / "faithful"
    path = datasets.dataset_path("old_faithful")
    assert main(["fit", str(path), "--target", "waiting", "--out", str(out), *SMALL_NUTS]) == 0
    summary = _check_results(
        out, ["trace", "posterior", "responsibilities", "posterior_predictive"]
    )
    assert "ran **em**: the moment start needs num_experts <= its inputs" in summary
    assert "Inputs and target were standardised" in summary


def test_fit_multi_feature_data_set_uses_the_tensor_start(tmp_path):
    out = tmp_path / "concrete"
    path = datasets.dataset_path("concrete")
    args = ["fit", str(path), "--target", "compressive_strength", "--method", "svi"]
    assert main([*args, "--steps", "300", "--out", str(out), "--no-progress"]) == 0
    summary = _check_results(
        out, ["trace", "posterior", "responsibilities", "posterior_predictive"]
    )
    assert "ran **tensor**" in summary


def test_fit_mcycle_with_three_experts(tmp_path):
    out = tmp_path / "mcycle"
    path = datasets.dataset_path("mcycle")
    args = ["fit", str(path), "--target", "accel", "--experts", "3", "--link", "tanh"]
    assert main([*args, "--method", "svi", "--steps", "200", "--out", str(out)]) == 0
    assert "ran **em**" in (out / "summary.md").read_text()


def _write(tmp_path, text):
    path = tmp_path / "data.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda p: [str(p / "missing.csv"), "--target", "y"], "missing.csv"),
        (lambda p: [str(_write(p, "a,y\n1,2\n")), "--target", "z"], "'z'"),
        (lambda p: [str(_write(p, "a,y\n1,2\n")), "--target", "y", "--features", "b"], "'b'"),
        (lambda p: [str(_write(p, "a,y\n1,2\nx,3\n")), "--target", "y"], "column 'a', data row 2"),
        (lambda p: [str(_write(p, "a,y\n1,2\n3,\n")), "--target", "y"], "column 'y', data row 2"),
        (
            lambda p: [str(_write(p, "a,y\n" + "1,2\n2,3\n" * 5)), "--target", "y"],
            "has 10 data rows; at least 21 are needed",
        ),
    ],
)
def test_fit_bad_input_has_a_clear_message_and_no_output(tmp_path, capsys, make_args, message):
    out = tmp_path / "results"
    assert main(["fit", *make_args(tmp_path), "--out", str(out), *SMALL_NUTS]) == 2
    error = capsys.readouterr().err
    assert "pyromoe fit: error:" in error and message in error
    assert not out.exists()


def test_fit_that_fails_midway_leaves_no_partial_output(tmp_path, monkeypatch):
    import pyromoe.bayes.nuts

    def broken(*args, **kwargs):
        raise RuntimeError("sampler crashed")

    monkeypatch.setattr(pyromoe.bayes.nuts, "run_nuts", broken)
    out = tmp_path / "results"
    path = datasets.dataset_path("old_faithful")
    assert main(["fit", str(path), "--target", "waiting", "--out", str(out), *SMALL_NUTS]) == 1
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_fit_figures_show_what_they_say_on_one_input(tmp_path, monkeypatch):
    """Real data (no truth): the posterior figure is not titled 'vs truth', its rows are the
    table's (gate rows from 1, the input by name), and the 1-D responsibilities figure colours the
    points by responsibility (a continuous colour map in [0, 1]), not by hard assignment."""
    import json
    from pathlib import Path

    import numpy as np

    import pyromoe.app.report as workflow
    from pyromoe.app.results import RESULTS_MARKER

    figures = {}
    original = workflow.save_figure_atomic

    def record(figure, target, **kwargs):
        figures[Path(target).stem] = figure
        return original(figure, target, **kwargs)

    monkeypatch.setattr(workflow, "save_figure_atomic", record)
    out = tmp_path / "faithful"
    path = datasets.dataset_path("old_faithful")
    assert main(["fit", str(path), "--target", "waiting", "--out", str(out), *SMALL_NUTS]) == 0
    summary = (out / "summary.md").read_text()
    rows = [line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("| ")]
    ax = figures["posterior"].axes[0]
    assert "truth" not in ax.get_title().lower()
    ticks = [label.get_text() for label in ax.get_yticklabels()]
    assert "gate.weight[1, eruptions]" in ticks and set(ticks) <= set(rows)
    assert "gate.weight[1, eruptions]" in rows and "experts.weight[0, eruptions]" in rows
    responsibilities = figures["responsibilities"]
    panels = [a for a in responsibilities.axes if a.get_title().startswith("expert")]
    assert len(panels) == 2
    for panel in panels:
        colours = np.asarray(panel.collections[0].get_array())
        assert colours.shape == (272,) and colours.min() >= 0 and colours.max() <= 1
        assert np.any((colours > 0.05) & (colours < 0.95)) or len(np.unique(colours)) > 2
    assert "responsibility" in responsibilities._suptitle.get_text()
    files = json.loads((out / RESULTS_MARKER).read_text())["files"]
    assert {"standardisation.json", "responsibilities.csv"} <= set(files)
    assert "(data units)" in summary


# ------------------------------------------------------------ --noise and --experts (comparison)
FAITHFUL_SVI = ["--target", "waiting", "--method", "svi", "--no-progress"]


def _table_rows(summary):
    return [line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("| ")]


def test_fit_per_expert_noise_has_a_noise_row_per_expert(tmp_path):
    out = tmp_path / "per_expert"
    path = datasets.dataset_path("old_faithful")
    args = ["fit", str(path), *FAITHFUL_SVI, "--steps", "100", "--noise", "per_expert"]
    assert main([*args, "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    rows = _table_rows(summary)
    assert "noise[0]" in rows and "noise[1]" in rows and "noise" not in rows
    noise_rows = [line for line in summary.splitlines() if line.startswith("| noise[")]
    assert all("-" not in line.split("|")[-2] for line in noise_rows)  # data units filled in
    assert "one noise sd per expert" in summary
    idata = az.from_netcdf(out / "inference_data.nc")
    assert idata.posterior["noise"].dims[2:] == ("expert",)


def test_fit_compares_numbers_of_experts_and_reports_the_best(tmp_path, capsys):
    import json

    import pandas as pd

    from pyromoe.app.results import RESULTS_MARKER

    out = tmp_path / "compare"
    path = datasets.dataset_path("old_faithful")
    args = ["fit", str(path), *FAITHFUL_SVI, "--steps", "100", "--experts", "1,2"]
    assert main([*args, "--out", str(out)]) == 0
    table = pd.read_csv(out / "compare_experts.csv")
    assert len(table) == 2 and sorted(table["k"]) == ["k=1", "k=2"]
    assert list(table["rank"]) == [0, 1]
    for column in ("elpd_loo", "se", "elpd_diff", "dse", "p_loo", "warning"):
        assert column in table
    best = table["k"][0]
    best_k = int(best.removeprefix("k="))
    summary = (out / "summary.md").read_text()
    assert "| k | rank | elpd_loo | se | elpd_diff | dse | p_loo | warning |" in summary
    assert f"The rest of this report is for {best}" in summary
    assert "compare_experts.csv" in json.loads((out / RESULTS_MARKER).read_text())["files"]
    idata = az.from_netcdf(out / "inference_data.nc")
    assert idata.posterior.sizes["expert"] == best_k  # the report is the best-ranked fit
    rows = _table_rows(summary)
    assert f"experts.weight[{best_k - 1}, eruptions]" in rows
    assert ("gate.weight[1, eruptions]" in rows) == (best_k > 1)
    assert f"report for {best}" in capsys.readouterr().out


def test_fit_one_expert_is_a_regression_without_gate_rows(tmp_path):
    out = tmp_path / "one"
    path = datasets.dataset_path("old_faithful")
    args = ["fit", str(path), *FAITHFUL_SVI, "--steps", "50", "--experts", "1", "--out", str(out)]
    assert main(args) == 0
    summary = _check_results(
        out, ["trace", "posterior", "responsibilities", "posterior_predictive"]
    )
    rows = _table_rows(summary)
    assert "experts.weight[0, eruptions]" in rows and "noise" in rows
    assert not any(row.startswith("gate.") for row in rows)
    assert "1 expert (a plain regression: no gate)" in summary
    assert not (out / "compare_experts.csv").exists()


@pytest.mark.parametrize(
    "option, message",
    [
        (["--experts", "0,2"], "--experts"),
        (["--experts", "2,2"], "--experts"),
        (["--experts", "1,,2"], "--experts"),
        (["--noise", "each"], "--noise"),
    ],
)
def test_fit_bad_experts_or_noise_is_a_usage_error(tmp_path, capsys, option, message):
    out = tmp_path / "results"
    path = datasets.dataset_path("old_faithful")
    with pytest.raises(SystemExit) as stop:
        main(["fit", str(path), "--target", "waiting", *option, "--out", str(out)])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {message}" in error
    assert not out.exists()
