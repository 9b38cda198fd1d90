"""Where the moment step applies: a measured map of the T2 rank test on similar experts.

The moment step (``tensor_init``) refuses when ``T2`` shows fewer than k eigenvalues clear of its
sampling noise. This script asks whether that test gives up signal it could keep, and whether it
lets noise through, by running the moment step with the refusal switched off and deciding
afterwards, for several rules, whether each run would have been refused.

Grid: n in {150, 500, 2e3, 2e4, 2e5}, expert cosine in {0, 0.5, 0.8, 0.95}, k in {2, 3}, d = 5,
linear experts, noise 0.5, no intercepts; a random gate (norm 1) for k = 2 and an orthogonal gate
for k = 3 (the settings where the moment step is consistent for the linear link); ``--reps``
data sets per point (``--target-reps`` at the issue's point cosine 0.8, n = 2000, k = 2), plus a
d = 20 row (k = 2, cosine 0.8) to show how the rules scale with the null block's size.
For each point the same number of **null** data sets with only k - 1 experts (one expert for
k = 2; two with the same cosine for k = 3) measure false accepts.

Per run it records the |eigenvalues| of T2, the noise scale ``s = sqrt(Var(P2) / n)`` that
``moments.t2_noise_floor`` uses, the k-th eigenvalue in units of s, and the moment estimate's
expert error (max over experts of ||a_hat_i - a_i||, best labelling). A run is **useful** when
that error is under half the distance between the two closest true experts (every estimated expert
is nearer its own truth than any other: EM from it starts in the right basin's labelling).

Rules compared (each refuses when |lambda_k| / s is at or below its threshold; m = d - k + 1):
- ``semicircle x 1.25``: ``1.25 * 2 sqrt(m)``, the rule before this benchmark;
- ``GOE 95%`` / ``GOE 99%``: the 95% / 99% quantile of the top |eigenvalue| of an m x m GOE
  matrix (off-diagonal variance 1), the null distribution of |lambda_k| / s
  (:func:`goe_top_quantile`).

Writes benchmarks/results/moment_map.{json,md,png}. Run: ``python benchmarks/moment_map.py``
(about 10 minutes on one core) or ``--quick``.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import pyromoe  # noqa: E402
from benchmarks._common import machine_info, machine_section, write_results  # noqa: E402
from pyromoe.core import moments as moments_module  # noqa: E402
from pyromoe.core.chunks import default_chunk_size  # noqa: E402
from pyromoe.core.labels import best_permutation  # noqa: E402
from pyromoe.core.sources import as_source  # noqa: E402
from pyromoe.estimators.moment_step import moment_experts  # noqa: E402

NS = (150, 500, 2000, 20000, 200000)
COSINES = (0.0, 0.5, 0.8, 0.95)
TARGET = (2, 0.8, 2000, 5)  # k, cosine, n, d
EXTRA_D = [(2, 0.8, n, 20) for n in (2000, 20000, 200000)]
NOISE = 0.5
FLOOR_FACTOR = inspect.signature(moments_module.t2_noise_floor).parameters["factor"].default
EM_CHECK_MAX_ROWS = 20000
WRONG_NATS = 5.0  # as benchmarks/random_starts.py


@functools.lru_cache(maxsize=64)
def goe_top_quantile(size: int, level: float) -> float:
    """The ``level`` quantile of the largest |eigenvalue| of a ``size x size`` GOE matrix.

    GOE here: symmetric, off-diagonal entries N(0, 1), diagonal N(0, 2): to first order the law
    of T2's null block in units of ``s = sqrt(Var(P2) / n)`` (standardising x makes
    ``E_n[z z^T] = I``, so the block is ``E_n[(P2 - mean P2) z z^T]``). Monte Carlo, 20000 draws,
    a fixed seed.
    """
    m = int(size)
    generator = torch.Generator().manual_seed(20190609 + m)
    a = torch.randn(20000, m, m, generator=generator, dtype=torch.float64)
    top = torch.linalg.eigvalsh((a + a.transpose(1, 2)) / math.sqrt(2.0)).abs().amax(-1)
    return float(torch.quantile(top, float(level)))


def rules(m: int) -> dict[str, float]:
    """Thresholds on |lambda_k| / s for a null block of size m."""
    return {
        "semicircle x 1.25": FLOOR_FACTOR * 2.0 * math.sqrt(m),
        "GOE 95%": goe_top_quantile(m, 0.95),
        "GOE 99%": goe_top_quantile(m, 0.99),
    }


def data_set(n, d, k, cosine, seed, null):
    """(x, y, true MoEEstimate or None): k experts, or k - 1 for a null data set."""
    gate = "random" if k == 2 else "orthogonal"
    cos = None if cosine == 0.0 else cosine
    if not null:
        data = pyromoe.simulate(
            n, d, k, noise=NOISE, gate=gate, seed=seed, expert_cosine=0.0 if cos is None else cos
        )
        return data.x, data.y, data.truth
    if k == 2:  # one expert: y = a . x + noise
        data = pyromoe.simulate(n, d, 2, noise=NOISE, gate="random", seed=seed)
        generator = torch.Generator().manual_seed(seed + 1)
        eps = torch.randn(n, generator=generator, dtype=data.x.dtype)
        return data.x, data.x @ data.truth.experts_weight[0] + NOISE * eps, None
    data = pyromoe.simulate(
        n, d, k - 1, noise=NOISE, gate=gate, seed=seed, expert_cosine=0.0 if cos is None else cos
    )
    return data.x, data.y, None


def expert_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """max_i ||a_hat_i - a_i|| after the best relabelling (as pyromoe.parameter_errors)."""
    perm = best_permutation(estimate, truth)
    return float((estimate[perm] - truth).norm(dim=1).max())


def basin_check(x, y, k, truth, seed) -> bool:
    """Did joint EM from the moment start (floor off) end in the basin of EM from the truth?"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        truth_fit = pyromoe.fit_em(x, y, k, init=truth, n_init=1)
        moment_fit = pyromoe.tensor_init(x, y, k, refine=True, random_starts=0, seed=seed)
    best = float(truth_fit.log_likelihood(x, y).sum())
    value = float(moment_fit.log_likelihood(x, y).sum())
    best_error = pyromoe.parameter_errors(truth_fit, truth)["experts"]
    error = pyromoe.parameter_errors(moment_fit, truth)["experts"]
    return not (value < best - WRONG_NATS and error > 2 * best_error)


def one_run(n, d, k, cosine, seed, null, link):
    x, y, truth = data_set(n, d, k, cosine, seed, null)
    seen = {}

    original = moments_module.t2_noise_floor

    def no_floor(moments, num_components):
        # the library's floor is FACTOR * 2 sqrt(m) * s: record s, refuse nothing
        m = max(moments.covariance.shape[0] - int(num_components) + 1, 1)
        seen["s"] = original(moments, num_components) / (FLOOR_FACTOR * 2.0 * math.sqrt(m))
        return 0.0

    moments_module.t2_noise_floor = no_floor
    try:
        weight, _, _, _, diagnostics = moment_experts(
            as_source(x, y), k, link, None, default_chunk_size(x.shape[1]), seed
        )
        right_basin = None
        if truth is not None and n <= EM_CHECK_MAX_ROWS:
            right_basin = basin_check(x, y, k, truth, seed)
    finally:
        moments_module.t2_noise_floor = original
    eigenvalues = [abs(v) for v in diagnostics["t2_eigenvalues"]]
    row = {
        "n": n,
        "d": d,
        "k": k,
        "expert_cosine": cosine,
        "seed": seed,
        "null": null,
        "t2_abs_eigenvalues": eigenvalues,
        "noise_scale": seen["s"],
        "statistic": eigenvalues[k - 1] / seen["s"],
    }
    if truth is not None:
        true_weight = truth.experts_weight
        separation = min(
            float((true_weight[i] - true_weight[j]).norm())
            for i in range(k)
            for j in range(i + 1, k)
        )
        row["expert_error"] = expert_error(weight.to(true_weight), true_weight)
        row["useful"] = row["expert_error"] < separation / 2
        row["em_right_basin"] = right_basin
    return row


def points(quick: bool):
    ns = (500, 2000, 20000) if quick else NS
    cosines = (0.5, 0.8) if quick else COSINES
    grid = [(k, c, n, 5) for k in (2, 3) for c in cosines for n in ns]
    return grid + ([] if quick else EXTRA_D)


def run(reps: int, target_reps: int, quick: bool) -> dict:
    link = pyromoe.get_link("linear")
    runs = []
    for k, cosine, n, d in points(quick):
        count = target_reps if (k, cosine, n, d) == TARGET else reps
        began = time.perf_counter()
        for rep in range(count):
            for null in (False, True):
                seed = (50000 if null else 10000) + 100 * rep + 7 * k
                runs.append(one_run(n, d, k, cosine, seed, null, link))
        print(
            f"k={k} cos={cosine} n={n} d={d}: {count} x 2 runs, "
            f"{time.perf_counter() - began:.1f} s",
            flush=True,
        )
    return {"runs": runs, "summary": summarise(runs), "target_tradeoff": tradeoff(runs, TARGET)}


def tradeoff(runs: list[dict], point) -> dict:
    """At one point: refusal and false-accept rates of every threshold on |lambda_k| / s, and the
    empirical null's 95% quantile (what a test with exactly 5% false accepts would use)."""
    k, cosine, n, d = point
    here = [r for r in runs if (r["k"], r["expert_cosine"], r["n"], r["d"]) == point]
    if not here:
        return {}
    real = torch.tensor([r["statistic"] for r in here if not r["null"]])
    null = torch.tensor([r["statistic"] for r in here if r["null"]])
    rows = []
    for threshold in [3.5 + 0.25 * i for i in range(13)]:
        rows.append(
            {
                "threshold": threshold,
                "refused": float((real <= threshold).double().mean()),
                "false_accepts": float((null > threshold).double().mean()),
            }
        )
    q95 = float(torch.quantile(null, 0.95))
    return {
        "point": {"k": k, "expert_cosine": cosine, "n": n, "d": d},
        "reps": int(real.numel()),
        "null_quantile_95": q95,
        "refused_at_null_quantile_95": float((real <= q95).double().mean()),
        "rows": rows,
    }


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["k"], r["expert_cosine"], r["n"], r["d"]) for r in runs})
    for k, cosine, n, d in keys:
        here = [
            r for r in runs if (r["k"], r["expert_cosine"], r["n"], r["d"]) == (k, cosine, n, d)
        ]
        real = [r for r in here if not r["null"]]
        null = [r for r in here if r["null"]]
        thresholds = rules(d - k + 1)
        checked = [r for r in real if r["em_right_basin"] is not None]

        def good(r):  # EM from the moment start reached the right basin (else: useful)
            return r["em_right_basin"] if r["em_right_basin"] is not None else r["useful"]

        row = {
            "k": k,
            "expert_cosine": cosine,
            "n": n,
            "d": d,
            "reps": len(real),
            "useful": sum(r["useful"] for r in real) / len(real),
            "median_expert_error": float(torch.tensor([r["expert_error"] for r in real]).median()),
            "em_right_basin": (
                sum(r["em_right_basin"] for r in checked) / len(checked) if checked else None
            ),
            "median_statistic": float(torch.tensor([r["statistic"] for r in real]).median()),
            "null_median_statistic": float(torch.tensor([r["statistic"] for r in null]).median()),
            "rules": {},
        }
        for name, threshold in thresholds.items():
            accepted = [r for r in real if r["statistic"] > threshold]
            refused = [r for r in real if r["statistic"] <= threshold]
            row["rules"][name] = {
                "threshold": threshold,
                "refused": len(refused) / len(real),
                "given_up": sum(good(r) for r in refused) / len(real),
                "accepted_bad": sum(not good(r) for r in accepted) / len(real),
                "false_accepts": sum(r["statistic"] > threshold for r in null) / len(null),
            }
        rows.append(row)
    return rows


def se(p: float, count: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.25 / count) / count)


def markdown(result: dict, info: dict, command: str) -> str:
    names = list(result["summary"][0]["rules"])
    lines = [
        "# Where the moment step applies: the T2 rank test on similar experts",
        "",
        f"Run: `{command}`. Linear experts, noise 0.5, no intercepts, x ~ N(0, I); random gate "
        "(k = 2) or orthogonal gate (k = 3). Each point: `reps` data sets with k experts and as "
        "many with k - 1 (null). The moment step ran with its refusal off; each rule is applied "
        "afterwards to |lambda_k| / s, s = sqrt(Var(P2) / n). *useful*: the moment estimate's "
        "expert error is under half the smallest distance between true experts. *EM right*: "
        "joint EM from the moment start (`tensor_init(refine=True, random_starts=0)`, refusal off) "
        "ended in the basin of EM started at the truth (not more than 5 nats lower, or an expert "
        "error under twice that fit's); checked for n <= 20000. *refused*: share "
        "of the k-expert data sets the rule refuses; *given up*: refused though EM from the moment "
        "start reached the right basin (useful, where EM was not checked); "
        "*false acc.*: share of the null data sets it accepts. Standard errors: "
        "sqrt(p (1 - p) / reps).",
        "",
        "| k | cos | n | d | reps | useful | EM right | median error | median stat (null) | "
        + " | ".join(f"{name}: refused / given up / false acc." for name in names)
        + " |",
        "|" + "---|" * (9 + len(names)),
    ]
    for row in result["summary"]:
        cells = [
            str(row["k"]),
            str(row["expert_cosine"]),
            str(row["n"]),
            str(row["d"]),
            str(row["reps"]),
            f"{row['useful']:.2f}",
            "-" if row["em_right_basin"] is None else f"{row['em_right_basin']:.2f}",
            f"{row['median_expert_error']:.3f}",
            f"{row['median_statistic']:.1f} ({row['null_median_statistic']:.1f})",
        ]
        for name in names:
            rule = row["rules"][name]
            cells.append(
                f"{rule['refused']:.2f} / {rule['given_up']:.2f} / {rule['false_accepts']:.2f}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    trade = result.get("target_tradeoff")
    if trade:
        point = trade["point"]
        lines += [
            "",
            f"## The trade-off at k = {point['k']}, cosine {point['expert_cosine']}, "
            f"n = {point['n']}, d = {point['d']} ({trade['reps']} data sets of each kind)",
            "",
            "Any threshold t on |lambda_k| / s: share of k-expert data sets refused, share of null "
            f"data sets accepted. The null's own 95% quantile is {trade['null_quantile_95']:.2f}; "
            f"a test with exactly 5% false accepts refuses {trade['refused_at_null_quantile_95']:.2f}"
            " here.",
            "",
            "| t | refused | false accepts |",
            "|---|---|---|",
        ]
        for row in trade["rows"]:
            lines.append(
                f"| {row['threshold']:.2f} | {row['refused']:.2f} | {row['false_accepts']:.2f} |"
            )
    lines += ["", "Thresholds on |lambda_k| / s by null-block size m = d - k + 1:", ""]
    for m in sorted({row["d"] - row["k"] + 1 for row in result["summary"]}):
        lines.append(
            f"- m = {m}: " + ", ".join(f"{name} {value:.2f}" for name, value in rules(m).items())
        )
    lines += machine_section(info)
    return "\n".join(lines)


def figure_of(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["summary"] if r["d"] == 5]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, k in zip(axes, (2, 3)):
        for cosine in sorted({r["expert_cosine"] for r in rows}):
            line = sorted(
                (r for r in rows if r["k"] == k and r["expert_cosine"] == cosine),
                key=lambda r: r["n"],
            )
            if not line:
                continue
            ns = [r["n"] for r in line]
            ax.plot(
                ns,
                [r["rules"]["GOE 95%"]["refused"] for r in line],
                "o-",
                label=f"refused, cos {cosine}",
            )
            ax.plot(
                ns,
                [1 - r["useful"] for r in line],
                "x:",
                color=ax.lines[-1].get_color(),
                label=f"not useful, cos {cosine}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("n")
        ax.set_title(f"k = {k}, d = 5 (GOE 95% rule)")
    axes[0].set_ylabel("share of data sets")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--target-reps", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="a small grid, 5 reps")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    reps = 5 if args.quick else args.reps
    target = 5 if args.quick else args.target_reps
    info = machine_info()
    result = run(reps, target, args.quick)
    command = "python benchmarks/moment_map.py" + (" --quick" if args.quick else "")
    if not args.quick and (args.reps, args.target_reps) != (20, 100):
        command += f" --reps {args.reps} --target-reps {args.target_reps}"
    result["settings"] = {"reps": reps, "target_reps": target, "quick": args.quick}
    result["machine"] = info
    paths = write_results("moment_map", result, markdown(result, info, command), figure_of(result))
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
