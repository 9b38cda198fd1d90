"""What ``initialize`` costs against EM from random starts (issue 26 item 1).

On ``simulate(n, d, 2, expert_cosine=0.8, gate_norm=2, noise=0.5, bias=True)`` (similar experts,
the setting of benchmarks/random_starts.py; at n = 2000, d = 10 the moment step refuses these data
and ``initialize`` falls back to multi-start EM, so an extra n = 2000 row uses cosine 0.6, where
it applies), one torch thread, in memory, float64:

- ``initialize_s``: ``pyromoe.initialize(x, y, 2)`` (default ``method="auto"``);
- ``em_start_s``: one default (screened) ``fit_em`` start, ``fit_em(x, y, 2, n_init=1)``;
- ``multi_start_em_s``: pyromoe's default multi-start ``fit_em(x, y, 2)`` (5 screened starts);

each the median of ``--repeats`` runs (CPU seconds of the process) taken in turn (initialize,
one start, multi-start) after one
warm-up call, all in one process; ratios are of medians within the run. ``same_optimum``: after
EM from each to a tolerance of 1e-11 (EM's default 1e-6 per iteration leaves each fit up to a few
1e-6 per row short of its optimum), ``initialize``'s mean log-likelihood per row is within
``TOLERANCE`` of the better EM fit's (d = 50 rows: the raw fits, initialize's not below the EM
fit's by more than ``TOLERANCE``); the raw difference is reported too. The time split of ``initialize`` is its
``diagnostics["time_split"]`` (last run). The large rows (``--large``, d = 50) compare
``initialize`` with one random-start EM fit only (a multi-start fit there takes minutes).

Run: ``python benchmarks/initialize_cost.py`` (n = 2000, 2e4, 2e5; a few minutes), add
``--sizes 2000 2e4 2e5 2e6`` and ``--large 1e6`` for the bigger settings, and ``--seeds 1 2 3``
for n = 2000 rows on other data seeds (the ratio's spread over data sets). Writes
benchmarks/results/initialize_cost.{json,md}. Timings on a shared, loaded machine are noisy: read
the ratios, which were measured in one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import (  # noqa: E402
    add_threads_argument,
    machine_info,
    machine_section,
    write_results,
)
from pyromoe import fit_em, initialize, simulate  # noqa: E402
from pyromoe.core.em.statistics import mean_log_likelihood  # noqa: E402
from pyromoe.core.sources import TensorSource  # noqa: E402

#: Largest shortfall of initialize's mean log-likelihood per row behind EM's that still counts as
#: the same optimum.
TOLERANCE = 1e-6
K, COSINE, NOISE, GATE_NORM, DATA_SEED = 2, 0.8, 0.5, 2.0, 11


def _timed(call):
    """``call()`` and its CPU seconds (``time.process_time``: one torch thread, so on an idle
    machine this is the wall time, and on a loaded one it does not count the other jobs' share)."""
    began = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = call()
    return result, time.process_time() - began


def _polish(x, y, estimate):
    """EM from ``estimate`` to a tight tolerance: the optimum of its basin."""
    return fit_em(x, y, K, init=estimate, tol=1e-11, max_iter=1000, seed=0)


def _score(data, estimate) -> float:
    source = TensorSource(data.x, data.y)
    return mean_log_likelihood(source, estimate.params, estimate.link, 65_536)


def measure(
    n: int, d: int, repeats: int, multi_start: bool, cosine: float = COSINE, seed: int = DATA_SEED
) -> dict:
    data = simulate(
        n,
        d,
        K,
        noise=NOISE,
        gate="random",
        seed=seed,
        expert_cosine=cosine,
        gate_norm=GATE_NORM,
        bias=True,
    )
    x, y = data.x, data.y
    calls = {
        "initialize_s": lambda: initialize(x, y, K, seed=0),
        "em_start_s": lambda: fit_em(x, y, K, n_init=1, seed=0),
    }
    if multi_start:
        calls["multi_start_em_s"] = lambda: fit_em(x, y, K, seed=0)
    else:  # the large rows: also one random draw with no choice among candidates (screen=1)
        calls["one_draw_em_s"] = lambda: fit_em(x, y, K, n_init=1, screen=1, seed=0)
    if n <= 200_000:  # warm-up (imports, allocator) where it is cheap
        for call in calls.values():
            _timed(call)
    times = {name: [] for name in calls}
    fits = {}
    for _ in range(repeats):
        for name, call in calls.items():
            fits[name], seconds = _timed(call)
            times[name].append(seconds)
    scores = {name: _score(data, fit) for name, fit in fits.items()}
    best_em = max(value for name, value in scores.items() if name != "initialize_s")
    best_name = max((v, k) for k, v in scores.items() if k != "initialize_s")[1]
    # EM stops when an iteration gains less than tol = 1e-6 per row, up to about tol r / (1 - r)
    # short of its optimum: both fits polished with a tight tolerance show whether they reached
    # the same optimum (d = 10 rows; at d = 50 the raw scores are compared)
    polished = None
    if d <= 10:
        polished = {
            name: _score(data, _timed(lambda f=fits[name]: _polish(x, y, f))[0])
            for name in ("initialize_s", best_name)
        }
    row = {name: statistics.median(values) for name, values in times.items()}
    diagnostics = fits["initialize_s"].diagnostics
    row.update(
        {
            "n": n,
            "d": d,
            "k": K,
            "expert_cosine": cosine,
            "data_seed": seed,
            "same_optimum": bool(
                scores["initialize_s"] >= best_em - TOLERANCE
                if polished is None
                else abs(polished["initialize_s"] - polished[best_name]) <= TOLERANCE
            ),
            "polished_log_likelihood_per_row": polished,
            "log_likelihood_per_row": scores,
            "initialize_minus_best_em": scores["initialize_s"] - best_em,
            "initializer": diagnostics.get("initializer"),
            "refine_winner": diagnostics.get("refine_winner"),
            "time_split": diagnostics.get("time_split"),
            "guard_random_n_iter": diagnostics.get("guard_random_n_iter"),
            "fallback_race_n_iter": diagnostics.get("fallback_race_n_iter"),
            "fallback_race_winner": diagnostics.get("fallback_race_winner"),
            "final_em_n_iter": diagnostics.get("refine_n_iter", diagnostics.get("n_iter")),
            "newton_passes": diagnostics.get("newton_passes"),
            "newton_stopped": diagnostics.get("newton_stopped"),
            "em_start_n_iter": fits["em_start_s"].diagnostics["n_iter"],
            "repeats": repeats,
            "seconds_per_repeat": times,
            "ratio_to_em_start": row["initialize_s"] / row["em_start_s"],
        }
    )
    if multi_start:
        row["ratio_to_multi_start_em"] = row["initialize_s"] / row["multi_start_em_s"]
    else:
        row["ratio_to_one_draw_em"] = row["initialize_s"] / row["one_draw_em_s"]
        row["one_draw_em_n_iter"] = fits["one_draw_em_s"].diagnostics["n_iter"]
    return row


def _split_text(split: dict | None) -> str:
    if not split:
        return "(no guard: multi-start EM fallback)"
    parts = []
    for name, value in split.items():
        if isinstance(value, list):
            parts.append(f"{name} {' + '.join(f'{v:.3f}' for v in value)}")
        else:
            parts.append(f"{name} {value:.3f}")
    return "; ".join(parts)


def markdown(result: dict) -> str:
    lines = [
        "# initialize cost (issue 26 item 1)",
        "",
        f"`simulate(n, d, 2, expert_cosine={COSINE}, gate_norm={GATE_NORM}, noise={NOISE}, "
        f"bias=True, seed={DATA_SEED})`, float64 in memory, {result['threads']} torch thread(s); "
        "medians of the repeats, all in one run, in CPU seconds of the process (`time.process_time`). "
        "**Timings on a shared 2-core machine under load from other jobs** (load in the machine "
        "section): CPU time leaves out the other jobs' share, but caches are shared: compare ratios.",
        "",
        "Targets: `initialize` at most 1.0x one default (screened) `fit_em` start from n = 2e5 "
        "(d = 10), at most 1.5x it at n = 2000, at most 0.25x one random-start EM fit at n = 1e6 "
        "(d = 50), with the same optimum (mean log-likelihood within 1e-6 per row).",
        "",
        "| n | d | cosine | initializer | initialize (s) | one EM start (s) | multi-start EM (s) | "
        "ratio to one start | ratio to multi-start | same optimum | init - best EM LL/row |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"] + result["large_rows"]:
        multi = row.get("multi_start_em_s")
        ratio_multi = row.get("ratio_to_multi_start_em")
        lines.append(
            f"| {row['n']:,} | {row['d']} | {row['expert_cosine']} | {row['initializer']} | {row['initialize_s']:.3f} | "
            f"{row['em_start_s']:.3f} | {'-' if multi is None else f'{multi:.3f}'} | "
            f"{row['ratio_to_em_start']:.2f} | "
            f"{'-' if ratio_multi is None else f'{ratio_multi:.2f}'} | {row['same_optimum']} | "
            f"{row['initialize_minus_best_em']:.2e} |"
        )
    large = result["large_rows"]
    if large:
        lines += [
            "",
            "Large rows against one random draw with no choice among candidates "
            "(`fit_em(n_init=1, screen=1)`: the draw's short EM on a 5,000-row subsample, then EM "
            "on all rows) as well as the default start (`screen=4`: the best of 4 draws after "
            "that subsample EM). A row measured before this run (`--keep-large`) was kept from an "
            "earlier results file, timed on the code of that day: its `measured` time says when.",
            "",
            "| n | d | initialize (s) | default start (s), iterations | one draw (s), iterations | "
            "ratio to default start | ratio to one draw | measured |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in large:
            lines.append(
                f"| {row['n']:,} | {row['d']} | {row['initialize_s']:.2f} | "
                f"{row['em_start_s']:.2f}, {row['em_start_n_iter']} | "
                f"{row['one_draw_em_s']:.2f}, {row['one_draw_em_n_iter']} | "
                f"{row['ratio_to_em_start']:.2f} | {row['ratio_to_one_draw_em']:.2f} | "
                f"{row.get('measured', result['date'])} |"
            )
    others = result.get("seed_rows", [])
    if others:
        ratios = [row["ratio_to_em_start"] for row in others]
        lines += [
            "",
            f"## Other data: the same settings, other data seeds ({len(others)} data sets)",
            "",
            "`initialize` against one default `fit_em` start on each (medians of the repeats); "
            f"ratio median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-"
            f"{max(ratios):.2f}; same optimum on {sum(row['same_optimum'] for row in others)} "
            f"of {len(others)}.",
            "",
            "| n | cosine | data seed | initializer | guard winner | ratio to one start | "
            "same optimum |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in others:
            winner = row.get("refine_winner") or row.get("fallback_race_winner") or "-"
            lines.append(
                f"| {row['n']:,} | {row['expert_cosine']} | {row['data_seed']} | "
                f"{row['initializer']} | {winner} | {row['ratio_to_em_start']:.2f} | "
                f"{row['same_optimum']} |"
            )
    lines += ["", "## Where initialize spends its time (seconds, last run)", ""]
    for row in result["rows"] + result["large_rows"]:
        if row.get("newton_passes") is not None and row["time_split"].get("final_em") == 0.0:
            final = (
                f"Newton on all rows {row['newton_passes']} passes ({row['newton_stopped']}), "
                "no EM after it"
            )
        elif row.get("newton_passes") is not None:
            final = (
                f"Newton on all rows {row['newton_passes']} passes ({row['newton_stopped']}), "
                f"then EM {row['final_em_n_iter']} iterations"
            )
        else:
            final = f"final EM {row['final_em_n_iter']} iterations"
        if row.get("fallback_race_n_iter") is not None:
            screened, *raced = row["fallback_race_n_iter"]
            lines.append(
                f"- n = {row['n']:,}, d = {row['d']}, cosine {row['expert_cosine']}: the moment "
                f"step refused, raced multi-start EM fallback: the screened start {screened} "
                f"iterations, random starts stopped after {raced} iterations, the "
                f"{row['fallback_race_winner']} start won; {final} (one EM start: "
                f"{row['em_start_n_iter']} iterations)"
            )
            continue
        lines.append(
            f"- n = {row['n']:,}, d = {row['d']}, cosine {row['expert_cosine']}: "
            f"{_split_text(row['time_split'])}; {final} (one EM start: "
            f"{row['em_start_n_iter']} iterations); random guard runs stopped after "
            f"{row['guard_random_n_iter']} iterations"
        )
    lines += machine_section(result["machine_info"])
    return "\n".join(lines)


def _earlier_large_rows(skip: set[int]) -> list[dict]:
    """The large rows of the last results file whose n is not in ``skip``, with their date."""
    path = Path(__file__).resolve().parent / "results" / "initialize_cost.json"
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    rows = [row for row in earlier.get("large_rows", []) if row["n"] not in skip]
    for row in rows:
        row.setdefault("measured", earlier["machine_info"].get("date_utc", earlier.get("date")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[2000, 2e4, 2e5])
    parser.add_argument("--large", nargs="*", type=float, default=[], help="n at d = 50")
    parser.add_argument(
        "--small-cosine",
        nargs="*",
        type=float,
        default=[0.6],
        help="extra n = 2000 rows at these expert cosines (at 0.8 the moment step refuses n = 2000)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--seeds",
        nargs="*",
        type=int,
        default=[],
        help="other data seeds: one n = 2000 row (cosine 0.8, 3 repeats) each, in a table of "
        "their own (the spread of the ratio over data sets)",
    )
    parser.add_argument(
        "--keep-large",
        action="store_true",
        help="keep the large rows of the last results file for n not in --large (each keeps the "
        "date it was measured on)",
    )
    add_threads_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        repeats = args.repeats if n <= 2e5 else 1
        rows.append(measure(int(n), 10, repeats, multi_start=True))
        print(rows[-1]["n"], {k: rows[-1][k] for k in ("initialize_s", "em_start_s")}, flush=True)
    for cosine in args.small_cosine:
        rows.insert(0, measure(2000, 10, args.repeats, multi_start=True, cosine=cosine))
    seed_rows = [measure(2000, 10, 3, multi_start=False, seed=seed) for seed in args.seeds]
    large = [measure(int(n), 50, 1, multi_start=False) for n in args.large]
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for row in large:
        row["measured"] = now
    if args.keep_large:
        large += _earlier_large_rows({int(n) for n in args.large})
        large.sort(key=lambda row: row["n"])
    info = machine_info()
    result = {
        "machine": f"{info['cpu']}, {info['cpu_count']} cores, {args.threads} torch thread(s)",
        "date": datetime.date.today().isoformat(),
        "rows": rows,
        "large_rows": large,
        "seed_rows": seed_rows,
        "threads": args.threads,
        "tolerance_per_row": TOLERANCE,
        "timing_note": "shared 2-core machine under load from other jobs; medians, one run",
        "machine_info": info,
    }
    for path in write_results("initialize_cost", result, markdown(result)):
        print(path)


if __name__ == "__main__":
    main()
