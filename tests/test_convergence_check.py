"""The convergence check run_nuts records (pyromoe.bayes.convergence): r_hat (ArviZ's) naming the
chain apart, the divergent share, chains in a lower mode, the warning and attrs['convergence']."""

from __future__ import annotations

import json
import warnings

import arviz as az
import numpy as np
import pytest
import xarray as xr

from pyromoe import MixtureOfExperts, NUTSConvergenceWarning, check_convergence, run_nuts, simulate
from pyromoe.bayes.convergence import record_convergence

CHAINS, DRAWS = 4, 1000


def _idata(shift_chain=None, shift=0.0, diverging=None, chain_ll=None, seed=0):
    """Independent N(0, 1) draws of the mixture's sites (a well-mixed posterior), one chain
    optionally shifted by ``shift`` posterior sds."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(CHAINS, DRAWS, 2, 2))
    noise = rng.normal(size=(CHAINS, DRAWS))
    if shift_chain is not None:
        weight[shift_chain] += shift
    stats = {"diverging": np.zeros((CHAINS, DRAWS), bool) if diverging is None else diverging}
    attrs = {"chain_mean_log_likelihood": [0.0] * CHAINS if chain_ll is None else chain_ll}
    return az.from_dict(
        posterior={"experts.weight": weight, "noise": noise}, sample_stats=stats, attrs=attrs
    )


def test_well_mixed_chains_pass():
    report = check_convergence(_idata())
    # 5 scalars of 4 x 1000 independent draws: r_hat sits within about 1 + 1/sqrt(4000)
    assert report["converged"] and report["findings"] == []
    assert report["max_rhat"] < 1.005
    assert report["divergent_fraction"] == 0.0


def test_a_shifted_chain_is_flagged_by_arviz_rhat_and_named():
    idata = _idata(shift_chain=2, shift=0.5)
    report = check_convergence(idata)
    expected = float(az.rhat(idata, var_names=["experts.weight"])["experts.weight"].max())
    assert expected > 1.01  # half a posterior sd between one chain and the rest
    (finding,) = report["findings"]
    assert finding["diagnostic"] == "r_hat" and finding["site"] == "experts.weight"
    assert finding["value"] == pytest.approx(expected, abs=1e-4)
    assert finding["chains"] == [2]
    # without chain 2 the others agree again; without any other chain the shift stays
    without = report["rhat_without_chain"]
    assert without[2] <= 1.01 and min(without[:2] + without[3:]) > 1.01


def test_chains_spread_evenly_name_no_chain_and_advise_more_draws():
    idata = _idata()
    idata.posterior["experts.weight"] = idata.posterior["experts.weight"] + xr.DataArray(
        0.2 * np.arange(CHAINS), dims="chain"
    )  # chain means 0, 0.2, 0.4, 0.6 sd: no one chain apart
    (finding,) = check_convergence(idata)["findings"]
    assert finding["diagnostic"] == "r_hat" and finding["chains"] == []
    assert "mix slowly" in finding["advice"] and "num_samples" in finding["advice"]


def test_divergences_above_one_percent_are_flagged_with_their_chains():
    diverging = np.zeros((CHAINS, DRAWS), bool)
    diverging[1, :30] = True  # 30 of 4000 draws: 0.75%, under the threshold
    assert check_convergence(_idata(diverging=diverging))["converged"]
    diverging[3, :20] = True  # 50 of 4000: 1.25%
    report = check_convergence(_idata(diverging=diverging))
    (finding,) = report["findings"]
    assert finding["diagnostic"] == "divergences" and finding["chains"] == [1, 3]
    assert finding["value"] == pytest.approx(50 / (CHAINS * DRAWS))
    assert report["divergences_per_chain"] == [0, 30, 0, 20]


def test_a_chain_at_a_lower_log_likelihood_is_named():
    report = check_convergence(_idata(chain_ll=[-100.0, -100.4, -112.0, -99.8]))
    (finding,) = report["findings"]
    assert finding["diagnostic"] == "log_likelihood" and finding["chains"] == [2]
    assert finding["value"] == [pytest.approx(12.2)]


def test_record_writes_json_attrs_and_warns_naming_the_chain():
    idata = _idata(shift_chain=0, shift=0.5)
    with pytest.warns(NUTSConvergenceWarning, match=r"r_hat on experts.weight .* chains \[0\]"):
        report = record_convergence(idata)
    assert json.loads(idata.attrs["convergence"]) == json.loads(json.dumps(report))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record_convergence(_idata())  # no warning when it passes


def test_run_nuts_records_the_check_in_attrs():
    data = simulate(100, 2, seed=0)
    model = MixtureOfExperts(2, 2, bias=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NUTSConvergenceWarning)  # 10 draws cannot converge
        idata = run_nuts(
            model, data.x, data.y, init=data.truth, num_chains=2, num_warmup=10, num_samples=10,
            progress=False, posterior_predictive=False, seed=0,
        )  # fmt: skip
    report = json.loads(idata.attrs["convergence"])
    assert report == json.loads(json.dumps(check_convergence(idata)))
    assert set(report["rhat_by_site"]) == {"experts.weight", "gate.weight", "noise"}
    assert (
        report["divergences_per_chain"]
        == np.asarray(idata.sample_stats["diverging"].values).sum(1).tolist()
    )


def test_the_reports_show_the_check():
    from pyromoe.app.runs import nuts_report
    from pyromoe.bayes.convergence import convergence_summary

    shifted = _idata(shift_chain=1, shift=0.5)
    text = convergence_summary(shifted)
    assert text.startswith("Convergence check FAILED") and "chains [1]" in text
    assert convergence_summary(_idata()).startswith("Convergence check passed: max r_hat 1.00")
    data = simulate(100, 2, seed=0)
    model = MixtureOfExperts(2, 2, bias=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NUTSConvergenceWarning)
        idata = run_nuts(
            model, data.x, data.y, init=data.truth, num_chains=2, num_warmup=10, num_samples=10,
            progress=False, posterior_predictive=False, seed=0,
        )  # fmt: skip
    report = nuts_report(idata, data.truth)
    assert report["convergence"]["max_rhat"] == pytest.approx(report["max_rhat_aligned"])


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="idata must be an arviz.InferenceData with a posterior"):
        check_convergence("not an idata")
    with pytest.raises(TypeError, match="with a posterior group"):
        check_convergence(az.InferenceData())
    with pytest.raises(ValueError, match="chain and draw dims"):
        check_convergence(az.InferenceData(posterior=xr.Dataset({"noise": ("row", np.zeros(3))})))
    good = az.from_dict(posterior={"noise": np.zeros((2, 5))})
    with pytest.raises(ValueError, match="max_rhat must be > 0"):
        check_convergence(good, max_rhat=0)
    with pytest.raises(TypeError, match="wrong_mode_nats must be a number"):
        check_convergence(good, wrong_mode_nats="5")


def test_draws_at_the_max_tree_depth_are_noted_without_failing_the_check():
    idata = _idata()
    depth = np.full((CHAINS, DRAWS), 3)
    depth[2, :30] = 10  # 30 of 4000 draws at the maximum: 0.75%, not noted
    idata.sample_stats["tree_depth"] = (("chain", "draw"), depth)
    report = check_convergence(idata, max_tree_depth=10)
    assert report["tree_depth_saturated"] == pytest.approx(30 / 4000)
    assert report["notes"] == [] and report["converged"]
    depth[0, :40] = 10  # 70 of 4000: 1.75%, noted for chains 0 and 2
    idata.sample_stats["tree_depth"] = (("chain", "draw"), depth)
    idata.attrs["max_tree_depth"] = 10  # what run_nuts records; read when not passed
    report = check_convergence(idata)
    (note,) = report["notes"]
    assert note["diagnostic"] == "tree_depth" and note["chains"] == [0, 2]
    assert note["value"] == pytest.approx(70 / 4000) and note["max_tree_depth"] == 10
    assert report["converged"] and report["findings"] == []  # efficiency, not validity
    from pyromoe.bayes.convergence import convergence_summary

    text = convergence_summary(idata)
    assert text.startswith("Convergence check passed") and "Efficiency:" in text
    assert "tree_depth 10 reached in a share 0.0175" in text and "full_mass=True" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record_convergence(idata)  # a note is no convergence failure: no warning
    # unknown depth (no attrs, none passed): nothing noted
    del idata.attrs["max_tree_depth"]
    assert check_convergence(idata)["tree_depth_saturated"] is None
    with pytest.raises(ValueError, match="max_tree_depth must be"):
        check_convergence(idata, max_tree_depth=0)
