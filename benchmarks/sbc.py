"""Simulation-based calibration (SBC) of NUTS and SVI on the model with its default priors.

Each replication draws the parameters from the priors of ``MixtureOfExperts(d, k)`` (linear,
biases, shared noise: the defaults of :data:`pyromoe.bayes.model.DEFAULT_PRIOR_SCALES`), ``x`` from
a standard normal (n rows, d columns) and ``y`` from the model, fits the posterior from the
``initialize`` estimate of that data, and records, for each label-invariant test quantity, the
rank of its true value among L = 99 thinned posterior draws and whether the central 50% and 90%
posterior intervals (from all draws) cover it. Under a calibrated posterior the ranks are uniform
on 0..L and the coverages are 0.5 and 0.9 (Talts et al. 2018, "Validating Bayesian inference
algorithms with simulation-based calibration").

Test quantities (invariant to relabelling the experts, so no alignment is involved):
``noise``; ``E[y | x*]`` and ``Var[y | x*]`` at three fixed points ``x*``; and the log-likelihood
of the replication's data, ``sum_n log p(y_n | x_n, theta)``.

Methods: ``nuts`` (:func:`pyromoe.run_nuts`, one chain, ``--warmup`` + ``--samples``, seeded),
``svi_normal``, ``svi_lowrank``, ``svi_mvn`` (:func:`pyromoe.fit_svi` with AutoNormal,
AutoLowRankMultivariateNormal, AutoMultivariateNormal at its defaults, started at the same
estimate), ``svi_psis`` (``svi_mvn`` with ``importance_resample=True``: the guide's draws resampled
with their Pareto-smoothed importance weights where k-hat <= 0.7, :mod:`pyromoe.bayes.psis`; each
line also records k-hat and the ranks and coverages of as many fresh draws from the same trained
guide, uncorrected, so the report compares the two on the same fits, over all replications and
over those with k-hat < 0.7). Thinning: NUTS draws ``4, 8, ..., 396`` of 400 (autocorrelated draws would make the
rank histogram U-shaped); the guides' draws are independent and thinned the same way.

Resumable: every replication appends one JSON line to ``benchmarks/results/sbc/<method>.jsonl``
(the raw data, committed); a re-run skips the replications already there. Run methods in separate
processes to use several cores. ``--report`` (alone or after a run) reads every line and writes
``benchmarks/results/sbc.{json,md,png}``: rank histograms (20 bins) with 99% bands of a uniform
histogram, chi-square and KS p-values (the KS test on ``(rank + U) / (L + 1)``, U uniform, exactly
uniform under calibration), and 50%/90% coverage with binomial standard errors.

Run: ``python benchmarks/sbc.py --methods nuts --reps 200`` (about 5 s per replication on one
thread) and ``--methods svi_normal,svi_lowrank,svi_mvn --reps 200`` in another shell, then
``python benchmarks/sbc.py --report``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer import Predictive  # noqa: E402

import pyromoe  # noqa: E402
from benchmarks._common import RESULTS, machine_info, machine_section, quiet_fit, write_results  # noqa: E402
from pyromoe.bayes.psis import PSIS_KHAT_THRESHOLD  # noqa: E402
from pyromoe.core import likelihood  # noqa: E402

METHODS = ("nuts", "svi_normal", "svi_lowrank", "svi_mvn", "svi_psis")
GUIDES = {"svi_normal": "normal", "svi_lowrank": "lowrank", "svi_mvn": "mvn", "svi_psis": "mvn"}
#: The three fixed points x* (d = 2; for other d the first two coordinates, the rest zero).
POINTS = ((0.0, 0.0), (1.0, -1.0), (-1.5, 0.5))
THIN = 4
BINS = 20

#: Named settings (``--setting``): the model and data of each; ``base`` is the first, smallest
#: case (its files sit in ``results/sbc/`` itself, the others in ``results/sbc/<setting>/``).
#: ``gate_features``: the gate reads covariates of its own (z, standard normal) instead of x.
SETTINGS = {
    "base": dict(n=150, d=2, k=2, link="linear", noise="shared", gate_features=None),
    "tanh_k2": dict(n=1000, d=5, k=2, link="tanh", noise="shared", gate_features=None),
    "linear_k3": dict(n=1000, d=5, k=3, link="linear", noise="shared", gate_features=None),
    "per_expert_noise": dict(
        n=1000, d=5, k=2, link="linear", noise="per_expert", gate_features=None
    ),
    "gate_covariates": dict(n=1000, d=3, k=2, link="linear", noise="shared", gate_features=2),
}


def quantity_names(noise: str = "shared") -> list[str]:
    """The label-invariant test quantities: per-expert noise sds enter sorted (smallest, largest)."""
    names = ["noise"] if noise == "shared" else ["noise_min", "noise_max"]
    names += [f"mean_at_x{j}" for j in range(len(POINTS))]
    names += [f"var_at_x{j}" for j in range(len(POINTS))]
    return names + ["log_likelihood"]


def points(d: int) -> torch.Tensor:
    table = torch.zeros(len(POINTS), d, dtype=torch.float64)
    for j, point in enumerate(POINTS):
        m = min(d, len(point))
        table[j, :m] = torch.tensor(point[:m], dtype=torch.float64)
    return table


def quantities(params, link, x, y) -> torch.Tensor:
    """The test quantities of parameters with any leading batch dims: shape (..., Q). ``x`` is
    the model's whole design (``[x | z]`` with gate covariates: the points ``x*`` then fill both
    the experts' and the gate's first columns)."""
    d_gate = params.gate_weight.shape[-1]
    d = params.experts_weight.shape[-1]
    experts_at = points(d).to(x)
    gate_at = points(d_gate).to(x)
    at = experts_at if x.shape[1] == d else torch.cat([experts_at, gate_at], dim=1)
    gate = torch.softmax(likelihood.gate_logits(at, params.gate_weight, params.gate_bias), -1)
    means = likelihood.expert_means(at, params.experts_weight, params.experts_bias, link)
    sds = params.expert_noise().unsqueeze(-2)  # (..., 1, k)
    mean = (gate * means).sum(-1)
    var = (gate * (sds**2 + means**2)).sum(-1) - mean**2  # the mixture's variance at x*
    noise = params.noise
    if params.per_expert_noise:  # sorted: the smallest and the largest sd
        noise = torch.stack([noise.amin(-1), noise.amax(-1)], dim=-1)
    else:
        noise = noise.unsqueeze(-1)
    loglik = likelihood.log_likelihood(x, y, params, link).sum(-1)
    return torch.cat([noise, mean, var, loglik.unsqueeze(-1)], dim=-1)


def replication(
    rep: int,
    n: int,
    d: int,
    k: int,
    link: str = "linear",
    noise: str = "shared",
    gate_features: int | None = None,
) -> tuple:
    """``(model, x, y, true params)`` of replication ``rep`` (seeded by it); with gate
    covariates ``x`` is the model's design ``[x | z]``."""
    model = pyromoe.MixtureOfExperts(d, k, link=link, noise=noise, gate_features=gate_features)
    seed = 10_000 + rep
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.design_features, generator=generator, dtype=torch.float64)
    pyro.set_rng_seed(seed)
    trace = poutine.trace(model).get_trace(x)
    values = {name: trace.nodes[name]["value"].detach() for name in model.site_shapes}
    y = trace.nodes["y"]["value"].detach()
    return model, x, y, model.params(values, x)


def posterior_draws(idata, model, x) -> object:
    posterior = idata.posterior
    flat = {
        name: torch.as_tensor(np.asarray(posterior[name].values)).reshape(-1, *shape)
        for name, shape in model.site_shapes.items()
    }
    return model.params(flat, x)


def rank_record(draws: torch.Tensor, true: torch.Tensor, prefix: str = "") -> dict:
    """Ranks of ``true`` (Q,) among the thinned ``draws`` (S, Q) and the 50% / 90% coverages."""
    thinned = draws[THIN::THIN]
    record = {
        "num_thinned": int(thinned.shape[0]),
        f"{prefix}ranks": (thinned < true).sum(0).tolist(),
    }
    for level in (0.5, 0.9):
        lo = torch.quantile(draws, (1 - level) / 2, dim=0)
        hi = torch.quantile(draws, (1 + level) / 2, dim=0)
        record[f"{prefix}covered_{int(level * 100)}"] = ((lo <= true) & (true <= hi)).tolist()
    return record


def psis_record(idata, model, x, y, seed: int, samples: int) -> tuple[dict, torch.Tensor]:
    """What ``svi_psis`` adds: the fit's PSIS attrs and, for the uncorrected comparison, the
    quantities of ``samples`` fresh draws from the same trained guide."""
    record = {key: idata.attrs[key] for key in ("psis_khat", "psis_ess", "psis_draws")}
    pyro.set_rng_seed(seed)
    guide = pyromoe.trained_guide(idata)
    with torch.no_grad():
        fresh = Predictive(guide, num_samples=samples, return_sites=list(model.site_shapes))(x, y)
    params = model.params({name: fresh[name] for name in model.site_shapes}, x)
    return record, quantities(params, model.link, x, y)


def run_one(
    method: str,
    rep: int,
    *,
    n: int,
    d: int,
    k: int,
    warmup: int,
    samples: int,
    steps: int | None,
    link: str = "linear",
    noise: str = "shared",
    gate_features: int | None = None,
) -> dict:
    model, design, y, truth = replication(rep, n, d, k, link, noise, gate_features)
    x, z = (design, None) if gate_features is None else (design[:, :d], design[:, d:])
    extra = {} if z is None else {"z": z}
    seed = 10_000 + rep
    began = time.perf_counter()
    init = pyromoe.initialize(x, y, k, link, seed=seed, num_threads=1, noise=noise, **extra)
    record = {"method": method, "rep": rep, "seed": seed, "init": init.method}
    if method == "nuts":
        draws = dict(num_chains=1, num_warmup=warmup, num_samples=samples)
        idata = quiet_fit(pyromoe.run_nuts, model, x, y, init, seed=seed, **draws, **extra)
        stats = idata.sample_stats
        record["divergences"] = int(np.asarray(stats["diverging"]).sum())
        if "tree_depth" in stats:
            record["mean_tree_depth"] = float(np.asarray(stats["tree_depth"]).mean())
    else:
        kwargs = {} if steps is None else {"num_steps": steps}
        kwargs.update(guide=GUIDES[method], num_samples=samples, seed=seed, num_threads=1)
        if method == "svi_psis":
            kwargs["importance_resample"] = True
        idata = quiet_fit(pyromoe.fit_svi, model, x, y, init, **kwargs, **extra)
    record["seconds"] = time.perf_counter() - began
    draws = quantities(posterior_draws(idata, model, design), model.link, design, y)  # (S, Q)
    true = quantities(truth, model.link, design, y)  # (Q,)
    record.update(rank_record(draws, true))
    if method == "svi_psis":
        psis, guide_draws = psis_record(idata, model, design, y, seed, samples)
        record.update(psis)
        record.update(rank_record(guide_draws, true, prefix="guide_"))
    record["truth"] = true.tolist()
    return record


def runs_dir(setting: str = "base") -> Path:
    """Where a setting's lines live: ``results/sbc/`` for ``base``, ``results/sbc/<setting>/``."""
    return RESULTS / "sbc" if setting == "base" else RESULTS / "sbc" / setting


def runs_file(method: str, setting: str = "base") -> Path:
    return runs_dir(setting) / f"{method}.jsonl"


def results_name(setting: str = "base") -> str:
    return "sbc" if setting == "base" else f"sbc_{setting}"


def setting_args(setting: str) -> dict:
    """The model arguments of a named setting as recorded in each line (``base`` keeps the
    keys its first lines were written with, so they resume)."""
    spec = dict(SETTINGS[setting])
    if setting == "base":
        return {key: spec[key] for key in ("n", "d", "k")}
    return spec


def read_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by an interrupted run: ignored
            continue
    return records


def run(methods, reps: int, settings: dict, out_dir: Path | None = None, first: int = 0) -> None:
    """Replications ``first..reps-1`` of each method not yet in its file, replication by
    replication (so interrupted runs leave every method with about as many). Processes given
    disjoint ranges (``--first``) can append to the same file at once."""
    paths = {m: runs_file(m) if out_dir is None else out_dir / f"{m}.jsonl" for m in methods}
    done = {}
    for method, path in paths.items():
        records = read_runs(path)
        other = [r["settings"] for r in records if r["settings"] != settings]
        if other:
            raise SystemExit(
                f"{path} holds replications run with {other[0]}, not {settings}: pass those "
                "settings to resume, or move the file away to start afresh"
            )
        done[method] = {r["rep"] for r in records}
    for rep in range(first, reps):
        for method in methods:
            path = paths[method]
            path.parent.mkdir(parents=True, exist_ok=True)
            if rep in done[method]:
                continue
            record = run_one(method, rep, **settings)
            record["settings"] = settings
            cut = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
            with path.open("a") as f:  # one line per replication: an interrupted run loses one
                f.write(("\n" if cut else "") + json.dumps(record) + "\n")
                f.flush()
            print(
                f"{method} rep {rep}: {record['seconds']:.1f} s, init {record['init']}", flush=True
            )


# ------------------------------------------------------------------------------------ report
def record_noise(records: list[dict]) -> str:
    return records[0].get("settings", {}).get("noise", "shared")


def summarise(records: list[dict], seed: int = 0) -> dict:
    """Per quantity: rank histogram, chi-square and KS p-values, 50%/90% coverage (+ SE)."""
    from scipy import stats

    names = quantity_names(record_noise(records))
    ranks = np.array([r["ranks"] for r in records])  # (R, Q)
    L = records[0]["num_thinned"]
    reps = ranks.shape[0]
    rng = np.random.default_rng(seed)
    uniform = (ranks + rng.random(ranks.shape)) / (L + 1)
    out = {}
    for q, name in enumerate(names):
        counts = np.histogram(uniform[:, q], bins=BINS, range=(0.0, 1.0))[0]
        chi2 = stats.chisquare(counts).pvalue
        ks = stats.kstest(uniform[:, q], "uniform").pvalue
        entry = {"counts": counts.tolist(), "chi2_p": float(chi2), "ks_p": float(ks)}
        for level in (50, 90):
            p = float(np.mean([r[f"covered_{level}"][q] for r in records]))
            entry[f"coverage_{level}"] = p
            entry[f"coverage_{level}_se"] = math.sqrt(max(p * (1 - p), 1e-12) / reps)
        out[name] = entry
    return {"replications": reps, "num_thinned": L, "quantities": out}


#: the svi_psis views the report shows, each a method of its own (see :func:`psis_views`)
BELOW, ABOVE = f"k<{PSIS_KHAT_THRESHOLD}", f"k>={PSIS_KHAT_THRESHOLD}"


def psis_views(records: list[dict]) -> dict[str, list[dict]]:
    """``svi_psis``'s lines as five methods: the draws ``fit_svi`` returned (resampled where
    k-hat <= 0.7, the guide's above) and the same fits' uncorrected guide draws, each over every
    replication and over those with k-hat < 0.7, and the draws returned where k-hat >= 0.7 (the
    guide's: the replications the diagnostic flags). Empty views are left out."""
    below = [r for r in records if r["psis_khat"] < PSIS_KHAT_THRESHOLD]
    above = [r for r in records if r["psis_khat"] >= PSIS_KHAT_THRESHOLD]

    def uncorrected(chosen: list[dict]) -> list[dict]:
        return [
            {**r, **{key: r[f"guide_{key}"] for key in ("ranks", "covered_50", "covered_90")}}
            for r in chosen
        ]

    views = {
        "svi_psis": records,
        f"svi_psis ({BELOW})": below,
        "svi_psis uncorrected": uncorrected(records),
        f"svi_psis uncorrected ({BELOW})": uncorrected(below),
        f"svi_psis ({ABOVE})": above,
    }
    return {name: chosen for name, chosen in views.items() if chosen}


#: a NUTS replication whose draws averaged at least this tree depth ran most trajectories to the
#: default ``max_tree_depth`` (10): the report shows those apart (the tree-depth note of
#: :func:`pyromoe.check_convergence` flags such runs)
SATURATED_MEAN_DEPTH = 9.0


def nuts_views(records: list[dict]) -> dict[str, list[dict]]:
    """``nuts``'s lines, and, when some replications ran most trajectories to the maximum tree
    depth, those and the others apart (conditioning on the run, like the k-hat views: a
    diagnostic, not SBC in the strict sense)."""
    deep = [r for r in records if r.get("mean_tree_depth", 0.0) >= SATURATED_MEAN_DEPTH]
    if not deep:
        return {"nuts": records}
    rest = [r for r in records if r.get("mean_tree_depth", 0.0) < SATURATED_MEAN_DEPTH]
    depth = f"{SATURATED_MEAN_DEPTH:g}"
    return {
        "nuts": records,
        f"nuts (mean tree depth < {depth})": rest,
        f"nuts (mean tree depth >= {depth})": deep,
    }


def psis_summary(records: list[dict]) -> dict:
    """k-hat over the replications: how many below the threshold, quartiles, median ESS."""
    khat = np.array([r["psis_khat"] for r in records])
    return {
        "replications": len(records),
        "below_threshold": int((khat < PSIS_KHAT_THRESHOLD).sum()),
        "khat_quartiles": np.quantile(khat, [0.25, 0.5, 0.75]).tolist(),
        "median_ess": float(np.median([r["psis_ess"] for r in records])),
        "num_draws": records[0]["settings"]["samples"],
        "reps": sorted(r["rep"] for r in records),
    }


def _ranges(numbers: list[int]) -> str:
    """``0-15, 60-75`` for consecutive runs of sorted integers."""
    runs, start = [], None
    for i, value in enumerate(numbers):
        if start is None:
            start = value
        if i + 1 == len(numbers) or numbers[i + 1] != value + 1:
            runs.append(f"{start}-{value}" if value != start else f"{value}")
            start = None
    return ", ".join(runs)


def report(methods, in_dir: Path | None = None, write: bool = True, setting: str = "base") -> dict:
    summary, settings, psis = {}, None, None
    views = {}
    for method in methods:
        path = runs_file(method, setting) if in_dir is None else in_dir / f"{method}.jsonl"
        records = read_runs(path)
        if records and method == "svi_psis":
            psis = psis_summary(records)
            views.update(psis_views(records))
        elif records and method == "nuts":
            views.update(nuts_views(records))
        elif records:
            views[method] = records
    for method, records in views.items():
        summary[method] = summarise(records)
        summary[method]["seconds_per_replication"] = float(np.mean([r["seconds"] for r in records]))
        summary[method]["init_methods"] = sorted({r["init"] for r in records})
        if method.startswith("nuts"):
            summary[method]["replications_with_divergences"] = int(
                sum(r.get("divergences", 0) > 0 for r in records)
            )
        settings = records[0]["settings"]
    names = quantity_names((settings or {}).get("noise", "shared"))
    tests = 2 * len(names)
    result = {
        "setting": setting,
        "quantity_names": names,
        "settings": settings,
        "methods": summary,
        "tests_per_method": tests,
        "bonferroni_alpha": 0.01 / tests,
        "psis": psis,
    }
    if write:
        info = machine_info()
        figure = _figure(summary)
        name = results_name(setting)
        write_results(name, {**result, "machine": info}, _markdown(result, info, name), figure)
    return result


def _band(reps: int) -> tuple[float, float]:
    from scipy import stats

    return (
        float(stats.binom.ppf(0.005, reps, 1 / BINS)),
        float(stats.binom.ppf(0.995, reps, 1 / BINS)),
    )


def _figure(summary: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(summary.values()), None)
    names = list(first["quantities"]) if first else quantity_names()
    methods = list(summary)
    fig, axes = plt.subplots(
        len(methods), len(names), figsize=(2.0 * len(names), 1.8 * len(methods)), squeeze=False
    )
    for row, method in enumerate(methods):
        reps = summary[method]["replications"]
        lo, hi = _band(reps)
        for col, name in enumerate(names):
            ax = axes[row, col]
            counts = summary[method]["quantities"][name]["counts"]
            ax.axhspan(lo, hi, color="0.85", zorder=0)
            ax.axhline(reps / BINS, color="0.5", lw=0.8)
            ax.bar(np.arange(BINS), counts, width=1.0, color="C0", edgecolor="white", lw=0.3)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
            if col == 0:
                ax.set_ylabel(method, fontsize=8)
    fig.suptitle("SBC rank histograms (grey: 99% band of a uniform histogram)", fontsize=9)
    fig.tight_layout()
    return fig


def _markdown(result: dict, info: dict, figure: str = "sbc") -> str:
    s = result["settings"] or {}
    gate = s.get("gate_features")
    model = (
        f"`MixtureOfExperts(d={s.get('d')}, k={s.get('k')}, link={s.get('link', 'linear')!r}, "
        f"noise={s.get('noise', 'shared')!r}"
        + (
            f", gate_features={gate})`: the gate reads its own standard-normal covariates z"
            if gate
            else ")`"
        )
    )
    lines = [
        f"# Simulation-based calibration (SBC): setting `{result.get('setting', 'base')}`",
        "",
        f"Model: {model}, biases, "
        f"default priors; n = {s.get('n')} rows of standard-normal x per replication. Posterior "
        f"from the `initialize` estimate: NUTS one chain of {s.get('warmup')} + {s.get('samples')}; "
        f"SVI at `fit_svi`'s defaults ({s.get('steps') or 2000} steps), {s.get('samples')} guide "
        f"draws. Ranks among every {THIN}th draw (L = 99); coverage of the central intervals from "
        "all draws. Under calibration: uniform ranks, coverage 0.50 and 0.90. "
        f"Bonferroni threshold over the {result['tests_per_method']} tests of a method at "
        f"family-wise 1%: p < {result['bonferroni_alpha']:.2g}.",
        "",
        "| method | quantity | reps | chi2 p | KS p | 50% cover (se) | 90% cover (se) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, entry in result["methods"].items():
        for name, q in entry["quantities"].items():
            flag = " **" if min(q["chi2_p"], q["ks_p"]) < result["bonferroni_alpha"] else ""
            lines.append(
                f"| {method} | {name} | {entry['replications']} | {q['chi2_p']:.3g}{flag} | "
                f"{q['ks_p']:.3g}{flag} | {q['coverage_50']:.2f} ({q['coverage_50_se']:.2f}) | "
                f"{q['coverage_90']:.2f} ({q['coverage_90_se']:.2f}) |"
            )
    lines += [
        "",
        "| method | reps | mean 50% cover | mean 90% cover | seconds / rep | notes |",
        "|---|---|---|---|---|---|",
    ]
    for method, entry in result["methods"].items():
        qs = entry["quantities"].values()
        c50 = np.mean([q["coverage_50"] for q in qs])
        c90 = np.mean([q["coverage_90"] for q in qs])
        note = f"inits: {', '.join(entry['init_methods'])}"
        if "replications_with_divergences" in entry:
            note += f"; reps with divergences: {entry['replications_with_divergences']}"
        lines.append(
            f"| {method} | {entry['replications']} | {c50:.3f} | {c90:.3f} | "
            f"{entry['seconds_per_replication']:.1f} | {note} |"
        )
    lines += ["", "`**`: below the Bonferroni threshold.", *_psis_markdown(result)]
    lines += ["", f"![ranks]({figure}.png)", *machine_section(info)]
    return "\n".join(lines)


def _mean_coverage(result: dict, method: str, level: int = 90) -> str:
    entry = result["methods"].get(method)
    if entry is None:
        return "n/a"
    value = np.mean([q[f"coverage_{level}"] for q in entry["quantities"].values()])
    return f"{value:.3f} ({entry['replications']} reps)"


def _psis_markdown(result: dict) -> list[str]:
    psis = result.get("psis")
    if not psis:
        return []
    q1, q2, q3 = psis["khat_quartiles"]
    return [
        "",
        "## PSIS correction (`svi_psis`)",
        "",
        '`fit_svi(guide="mvn", importance_resample=True)` on the same replications\' data: '
        "Pareto-smoothed importance sampling of the guide's draws against the model "
        "(`pyromoe.bayes.psis`; Yao et al. 2018), the draws resampled with the smoothed weights "
        f"where k-hat <= {PSIS_KHAT_THRESHOLD}, the guide's draws returned (with a `PSISWarning`) "
        "above. `svi_psis uncorrected` is as many fresh draws from the same trained guide, so the "
        "two compare on the same fits; `(k<0.7)` keeps the replications with k-hat < 0.7. "
        "Selecting replications by k-hat conditions on the data, so the `(k<0.7)` rows are "
        "calibration where the diagnostic passes, not SBC in the strict sense.",
        "",
        f"- k-hat < {PSIS_KHAT_THRESHOLD} in {psis['below_threshold']} of "
        f"{psis['replications']} replications (quartiles {q1:.2f}, {q2:.2f}, {q3:.2f}); median "
        f"effective number of draws {psis['median_ess']:.0f} of {psis['num_draws']}.",
        f"- mean 90% coverage over the {len(result['quantity_names'])} quantities where k-hat < "
        f"{PSIS_KHAT_THRESHOLD}: corrected {_mean_coverage(result, f'svi_psis ({BELOW})')}, "
        f"uncorrected {_mean_coverage(result, f'svi_psis uncorrected ({BELOW})')}; where "
        f"k-hat >= {PSIS_KHAT_THRESHOLD} (the guide's draws, with the warning) "
        f"{_mean_coverage(result, f'svi_psis ({ABOVE})')}.",
        f"- over every replication: as returned {_mean_coverage(result, 'svi_psis')}, "
        f"uncorrected {_mean_coverage(result, 'svi_psis uncorrected')}; `svi_mvn` (its own "
        f"run, uncorrected) {_mean_coverage(result, 'svi_mvn')}.",
        f"- replications run: {_ranges(psis['reps'])}. The run resumes where it stopped "
        "(`python benchmarks/sbc.py --methods svi_psis --reps 200`, or disjoint `--first` "
        "ranges in parallel processes).",
        "- `svi_psis` seconds / rep were measured while other jobs shared the two cores (see "
        "the load average below), so they are not comparable with the other rows' (run "
        "2026-12-02 on an idle machine).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--first", type=int, default=0, help="first replication to run")
    parser.add_argument("--setting", default="base", choices=sorted(SETTINGS))
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--steps", type=int, default=None, help="SVI steps (default fit_svi's)")
    parser.add_argument("--report", action="store_true", help="write sbc.* from every line")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    settings = dict(
        **setting_args(args.setting), warmup=args.warmup, samples=args.samples, steps=args.steps
    )
    if not args.report_only:
        out_dir = None if args.setting == "base" else runs_dir(args.setting)
        run(methods, args.reps, settings, out_dir=out_dir, first=args.first)
    if args.report or args.report_only:
        report(METHODS, setting=args.setting)
        print("wrote", RESULTS / f"{results_name(args.setting)}.md")


if __name__ == "__main__":
    main()
