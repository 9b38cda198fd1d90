"""How often a single random-start EM ends in a wrong basin, for three ways of starting it.

Settings (the statistics issue's): similar experts, expert cosine 0.8 and 0.95, k = 2 and 3,
n = 2000-5000, d = 5, a random gate of norm 2, noise 0.5, intercepts; ``--datasets`` data sets
per setting (seeds 11, 12, ...), ``--starts`` single starts of each kind spread over them, then
``fit_em`` to convergence from each start:

- ``plain``: one :func:`pyromoe.core.em.random_start` draw (``fit_em(..., screen=1)``; what
  ``fit_em``'s random starts and ``initialize``'s fallback were before the screened start);
- ``partition``: flexmix's rule, a random partition of (a subsample of) the rows into k groups
  followed by one M-step (weighted least squares per expert on its rows, the noise pooled);
- ``screened``: :func:`pyromoe.core.em.screened_start`, today's default: 4 plain draws, EM from
  each on a random 5000-row subsample (all rows up to n = 5000; tol 1e-5, at most 50
  iterations), the best kept.

A start ends in a wrong basin when its final log-likelihood is more than 5 nats below EM started at
the truth AND its expert error is over twice that fit's. The screened start's cost (its subsample
fits) is in its seconds. Writes benchmarks/results/random_starts.{json,md}.

Run: ``python benchmarks/random_starts.py`` (100 starts per kind and setting over 5 data sets,
several minutes on 2 cores) or ``--starts 20``. Other data: ``--settings "0.9,3,4000,6;0.8,4,5000,6"
--name random_starts_more``; ``--screen-rows 2000`` for the earlier screening subsample.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import pyromoe  # noqa: E402
from benchmarks._common import machine_info, machine_section, write_results  # noqa: E402
from pyromoe.core import em  # noqa: E402
from pyromoe.core.sources import as_source  # noqa: E402

SETTINGS = [(0.8, 2, 2000, 5), (0.95, 2, 5000, 5), (0.8, 3, 3000, 5), (0.95, 3, 5000, 5)]
KINDS = ("plain", "partition", "screened")
WRONG_NATS = 5.0


def partition_start(x, y, k, link, generator) -> pyromoe.MoEEstimate:
    """flexmix's start: a random partition of up to 5000 rows, then one M-step."""
    source = as_source(x, y)
    n, d = source.shape
    rows = min(n, 5000)
    xs, ys = source.subsample(rows, generator)
    labels = torch.randint(k, (rows,), generator=generator)
    resp = torch.nn.functional.one_hot(labels, k).to(xs)
    design = torch.cat([xs, torch.ones(rows, 1, dtype=xs.dtype)], 1)
    gram = torch.stack([(design * resp[:, i : i + 1]).T @ design for i in range(k)])
    cross = (resp * ys[:, None]).T @ design
    coefficients = em.solve_linear_experts((gram, cross), 1e-8)
    residual = ys[:, None] - design @ coefficients.T
    noise = ((resp * residual**2).sum() / rows).sqrt()
    flat = em.random_start(source, None, k, link, generator)  # a nearly flat gate
    return pyromoe.MoEEstimate(
        coefficients[:, :d], coefficients[:, d], flat.gate_weight, flat.gate_bias, noise, link
    )


def start_of(kind, x, y, k, link, generator, screen_rows=em.SCREEN_ROWS):
    if kind == "plain":
        return em.random_start(x, y, k, link, generator)
    if kind == "partition":
        return partition_start(x, y, k, link, generator)
    return em.screened_start(x, y, k, link, generator, rows=screen_rows)


def run(
    starts: int, datasets: int, settings=SETTINGS, screen_rows=em.SCREEN_ROWS, kinds=KINDS
) -> dict:
    link = pyromoe.get_link("linear")
    rows = []
    for cosine, k, n, d in settings:
        cases = []
        for seed in range(11, 11 + datasets):
            data = pyromoe.simulate(
                n,
                d,
                num_experts=k,
                expert_cosine=cosine,
                gate="random",
                gate_norm=2.0,
                seed=seed,
                noise=0.5,
                bias=True,
            )
            reference = pyromoe.fit_em(data.x, data.y, k, init=data.truth, n_init=1)
            best = reference.diagnostics["log_likelihood_per_start"][0]
            best_error = pyromoe.parameter_errors(reference, data.truth)["experts"]
            cases.append((data, best, best_error))
        for kind in kinds:
            generator = torch.Generator().manual_seed(123)
            wrong, began = 0, time.perf_counter()
            for start_index in range(starts):
                data, best, best_error = cases[start_index % datasets]
                start = start_of(kind, data.x, data.y, k, link, generator, screen_rows)
                fit = pyromoe.fit_em(data.x, data.y, k, init=start, n_init=1)
                value = fit.diagnostics["log_likelihood_per_start"][0]
                error = pyromoe.parameter_errors(fit, data.truth)["experts"]
                wrong += int(value < best - WRONG_NATS / n and error > 2 * best_error)
            row = {
                "expert_cosine": cosine,
                "k": k,
                "n": n,
                "d": d,
                "kind": kind,
                "starts": starts,
                "datasets": datasets,
                "wrong": wrong,
                "rate": wrong / starts,
                "se": math.sqrt(max(wrong, 0.5) * (starts - wrong) / starts) / starts,
                "seconds": time.perf_counter() - began,
            }
            rows.append(row)
            print(
                f"cos={cosine} k={k} n={n} {kind}: {wrong}/{starts} wrong, {row['seconds']:.1f} s",
                flush=True,
            )
    return {
        "rows": rows,
        "wrong_nats": WRONG_NATS,
        "starts": starts,
        "datasets": datasets,
        "screen_rows": screen_rows,
    }


def markdown(result: dict, info: dict, command: str) -> str:
    lines = [
        "# Single random starts: how often EM ends in a wrong basin",
        "",
        f"Run: `{command}`. Random gate of norm 2, noise 0.5, intercepts, screened starts on "
        f"{result['screen_rows']} rows, "
        f"{result['datasets']} data sets per setting (seeds 11, 12, ...), {result['starts']} "
        "starts per kind and setting, spread evenly over them. Wrong basin: more than "
        f"{result['wrong_nats']:g} nats below EM started at the truth and expert error over twice "
        "its. Seconds: the starts plus their full EM fits (one thread).",
        "",
        "| cosine | k | n | d | start | wrong basin | rate (se) | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['expert_cosine']} | {r['k']} | {r['n']} | {r['d']} | {r['kind']} | "
            f"{r['wrong']}/{r['starts']} | {r['rate']:.3f} ({r['se']:.3f}) | {r['seconds']:.1f} |"
        )
    lines += machine_section(info)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=100, help="starts per kind and setting")
    parser.add_argument("--datasets", type=int, default=5, help="data sets per setting")
    parser.add_argument(
        "--settings",
        default=None,
        help="semicolon-separated cosine,k,n,d settings (default: the four above, d = 5)",
    )
    parser.add_argument("--screen-rows", type=int, default=em.SCREEN_ROWS)
    parser.add_argument("--name", default="random_starts", help="results/<name>.{json,md}")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated start kinds")
    args = parser.parse_args()
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.name):
        parser.error(
            f"--name must be letters, digits, '_' or '-' (a file in results/); got {args.name!r}"
        )
    settings = SETTINGS
    if args.settings:
        try:
            settings = [
                (float(c), int(k), int(n), int(d))
                for c, k, n, d in (item.split(",") for item in args.settings.split(";"))
            ]
        except ValueError:
            parser.error("--settings takes 'cosine,k,n,d;cosine,k,n,d', e.g. '0.9,3,4000,6'")
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    info = machine_info()
    kinds = [kind for kind in args.kinds.split(",") if kind]
    if not kinds or set(kinds) - set(KINDS):
        parser.error(f"--kinds takes some of {', '.join(KINDS)}; got {args.kinds!r}")
    result = run(args.starts, args.datasets, settings, args.screen_rows, kinds)
    command = " ".join(["python benchmarks/random_starts.py", *sys.argv[1:]])
    for path in write_results(
        args.name, {**result, "machine": info}, markdown(result, info, command)
    ):
        print("wrote", path)


if __name__ == "__main__":
    main()
