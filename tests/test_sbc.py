"""benchmarks/sbc.py: the SBC machinery (ranks, resume, report) and a 10-replication run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_sbc():
    spec = importlib.util.spec_from_file_location(
        "pyromoe_bench_sbc", ROOT / "benchmarks" / "sbc.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sbc = _load_sbc()


def test_test_quantities_are_label_invariant_and_match_their_definitions():
    model, x, y, truth = sbc.replication(0, n=50, d=2, k=2)
    values = sbc.quantities(truth, model.link, x, y)
    # the same model with the two experts' labels swapped: gate logit negated (the reference
    # expert, logit 0, is the first)
    swapped = truth._replace(
        experts_weight=truth.experts_weight.flip(0),
        experts_bias=truth.experts_bias.flip(0),
        gate_weight=-truth.gate_weight,
        gate_bias=-truth.gate_bias,
    )
    assert torch.allclose(values, sbc.quantities(swapped, model.link, x, y), rtol=0, atol=1e-9)
    # E[y | x*] and Var[y | x*] from the mixture's definition, for the first point x* = 0:
    # gate (1 - p, p) with p = sigmoid(gate bias), experts' means their biases
    p = torch.sigmoid(truth.gate_bias[0])
    gate = torch.stack([1 - p, p])
    means = truth.experts_bias  # linear experts at x* = 0
    mean = float((gate * means).sum())
    var = float(truth.noise**2 + (gate * (means - mean) ** 2).sum())
    names = sbc.quantity_names()
    assert values[names.index("noise")] == pytest.approx(float(truth.noise), abs=1e-12)
    assert values[names.index("mean_at_x0")] == pytest.approx(mean, abs=1e-10)
    assert values[names.index("var_at_x0")] == pytest.approx(var, abs=1e-10)


@pytest.mark.parametrize("setting", ["tanh_k2", "per_expert_noise", "gate_covariates"])
def test_quantities_of_the_wider_settings_are_label_invariant_and_match_the_mixture(setting):
    spec = {**sbc.SETTINGS[setting], "n": 60}
    model, x, y, truth = sbc.replication(3, **spec)
    assert x.shape == (60, model.design_features)
    values = sbc.quantities(truth, model.link, x, y)
    names = sbc.quantity_names(spec["noise"])
    assert values.shape == (len(names),)
    swapped = truth._replace(
        experts_weight=truth.experts_weight.flip(0),
        experts_bias=truth.experts_bias.flip(0),
        gate_weight=-truth.gate_weight,
        gate_bias=-truth.gate_bias,
        noise=truth.noise.flip(0) if truth.per_expert_noise else truth.noise,
    )
    assert torch.allclose(values, sbc.quantities(swapped, model.link, x, y), rtol=0, atol=1e-9)
    # the mixture's mean and variance at x* = 0 from the definition: gate (1 - p, p), experts'
    # means g(b_i), per-expert sds where the model has them
    p = torch.sigmoid(truth.gate_bias[0])
    gate = torch.stack([1 - p, p])
    means = model.link(truth.experts_bias)
    sds = truth.expert_noise()
    mean = float((gate * means).sum())
    var = float((gate * (sds**2 + means**2)).sum() - mean**2)
    assert values[names.index("mean_at_x0")] == pytest.approx(mean, abs=1e-10)
    assert values[names.index("var_at_x0")] == pytest.approx(var, abs=1e-10)
    if truth.per_expert_noise:
        assert values[names.index("noise_min")] == pytest.approx(float(truth.noise.min()))
        assert values[names.index("noise_max")] == pytest.approx(float(truth.noise.max()))
    # the log-likelihood quantity is the model's own, summed over rows
    total = float(model.log_likelihood(x, y, model_sites(model, truth)).sum())
    assert values[names.index("log_likelihood")] == pytest.approx(total, rel=1e-12)


def model_sites(model, params):
    """``params`` as the model's site values (the inverse of ``model.params``)."""
    from pyromoe.core import sites

    values = {
        sites.EXPERTS_WEIGHT: params.experts_weight,
        sites.GATE_WEIGHT: params.gate_weight,
        sites.NOISE: params.noise,
        sites.EXPERTS_BIAS: params.experts_bias,
        sites.GATE_BIAS: params.gate_bias,
    }
    return {name: values[name] for name in model.site_shapes}


def _records(ranks, num_thinned=99):
    names = sbc.quantity_names()
    return [
        {
            "ranks": [int(r)] * len(names),
            "num_thinned": num_thinned,
            "covered_50": [True] * len(names),
            "covered_90": [True] * len(names),
        }
        for r in ranks
    ]


def test_summary_flags_a_skewed_rank_histogram_and_passes_a_uniform_one():
    rng = np.random.default_rng(0)
    uniform = sbc.summarise(_records(rng.integers(0, 100, size=400)))
    skewed = sbc.summarise(_records(rng.integers(0, 30, size=400)))  # truth in the lower tail
    q = sbc.quantity_names()[0]
    assert uniform["quantities"][q]["chi2_p"] > 1e-3 and uniform["quantities"][q]["ks_p"] > 1e-3
    assert skewed["quantities"][q]["chi2_p"] < 1e-10 and skewed["quantities"][q]["ks_p"] < 1e-10
    assert sum(uniform["quantities"][q]["counts"]) == 400


@pytest.mark.slow
def test_ten_replications_resume_and_give_sane_coverage(tmp_path):
    settings = dict(n=150, d=2, k=2, warmup=60, samples=80, steps=300)
    sbc.run(["nuts", "svi_mvn"], 10, settings, out_dir=tmp_path)
    for method in ("nuts", "svi_mvn"):
        records = sbc.read_runs(tmp_path / f"{method}.jsonl")
        assert sorted(r["rep"] for r in records) == list(range(10))
        for record in records:
            assert record["num_thinned"] == settings["samples"] // sbc.THIN - 1
            assert all(0 <= rank <= record["num_thinned"] for rank in record["ranks"])
    # a line cut short by an interrupted run is ignored and its replication re-run on resume
    path = tmp_path / "svi_mvn.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    assert len(sbc.read_runs(path)) == 9
    sbc.run(["svi_mvn"], 10, settings, out_dir=tmp_path)
    records = sbc.read_runs(path)
    assert sorted(r["rep"] for r in records) == list(range(10))
    assert json.loads(path.read_text().splitlines()[-1])["rep"] == 9
    # resuming with other settings is refused, naming the file
    with pytest.raises(SystemExit, match="svi_mvn.jsonl holds replications run with"):
        sbc.run(["svi_mvn"], 10, {**settings, "steps": 200}, out_dir=tmp_path)
    result = sbc.report(["nuts", "svi_mvn"], in_dir=tmp_path, write=False)
    for method in ("nuts", "svi_mvn"):
        entry = result["methods"][method]
        assert entry["replications"] == 10
        coverage = np.mean([q["coverage_90"] for q in entry["quantities"].values()])
        # 80 indicators, correlated within a replication: a calibrated fit sits near 0.9;
        # 0.65 is about four standard errors below it at an effective 20 replications
        assert 0.65 <= coverage <= 1.0, (method, coverage)


def test_nuts_runs_at_the_maximum_tree_depth_are_shown_apart():
    records = [{"rep": i, "mean_tree_depth": depth} for i, depth in enumerate([3.5, 9.9, 4.0])]
    assert list(sbc.nuts_views(records[::2])) == ["nuts"]  # none saturated: one view
    views = sbc.nuts_views(records)
    assert [r["rep"] for r in views["nuts"]] == [0, 1, 2]
    assert [r["rep"] for r in views["nuts (mean tree depth < 9)"]] == [0, 2]
    assert [r["rep"] for r in views["nuts (mean tree depth >= 9)"]] == [1]
