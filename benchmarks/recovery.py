"""Recovery benchmark: expert error vs n for the tensor start and random-start EM (the paper's figure).

Methods, on data from ``pyromoe.estimators.simulate`` (d = 10, sigma = 0.5, unit-norm experts):

- ``tensor``: ``tensor_init`` (moments + gate EM with the experts fixed), no refinement;
- ``tensor+em``: ``tensor_init(refine=True, random_starts=0)``: joint EM from the tensor start;
- ``em x1``: joint EM from ONE random start (``fit_em(n_init=1)``);
- ``em x5``: best (by likelihood) of five random starts.

Error = max over experts of ||a_hat_i - a_i|| after the best permutation. Gates: random for the odd
links with k = 2 (where the moments are exact for any gate), orthogonal to the experts otherwise
(the paper's setting, where relu/leaky and k > 2 are exact).

Run: ``python benchmarks/recovery.py`` (a few minutes on 2 cores), ``--quick`` (about a minute),
``--full`` (n up to 1e6 and 3 seeds: long). Writes benchmarks/results/recovery.{json,md,png}
(``recovery_quick.*`` / ``recovery_full.*`` for the other runs).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import torch  # noqa: E402

from benchmarks._common import add_threads_argument, machine_info, machine_section, write_results  # noqa: E402
from pyromoe import parameter_errors, simulate  # noqa: E402
from pyromoe.estimators.em import fit_em  # noqa: E402
from pyromoe.estimators.tensor_init import tensor_init  # noqa: E402

LINKS = ["linear", "tanh", "relu", "leaky_relu"]
METHODS = ["tensor", "tensor+em", "em x1", "em x5"]


def gate_for(link: str, k: int) -> str:
    return "random" if (k == 2 and link in ("linear", "tanh")) else "orthogonal"


def run_one(link: str, k: int, n: int, seed: int, d: int = 10) -> dict:
    data = simulate(n, d, k, link, 0.5, gate=gate_for(link, k), seed=seed)
    row = {"link": link, "k": k, "n": n, "seed": seed, "gate": gate_for(link, k)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        try:
            est = tensor_init(data.x, data.y, k, link, seed=seed)
            row["tensor"] = parameter_errors(est, data.truth)["experts"]
            row["tensor_refused"] = None
        except ValueError as err:  # e.g. "the data look like fewer than k experts" at small n
            est = None
            row["tensor"] = math.nan
            row["tensor_refused"] = str(err)[:120]
        row["tensor_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        if est is not None:
            refined = fit_em(data.x, data.y, k, link, init=est, n_init=1, seed=seed)
            row["tensor+em"] = parameter_errors(refined, data.truth)["experts"]
            row["tensor+em_iterations"] = refined.diagnostics.get("n_iter")
        else:
            row["tensor+em"] = math.nan
        row["tensor+em_seconds"] = row["tensor_seconds"] + time.perf_counter() - t
        starts = []
        for start in range(5):
            t = time.perf_counter()
            fit = fit_em(data.x, data.y, k, link, n_init=1, seed=1000 * seed + start)
            starts.append(
                {
                    "error": parameter_errors(fit, data.truth)["experts"],
                    "loglik": float(fit.log_likelihood(data.x, data.y).mean()),
                    "seconds": time.perf_counter() - t,
                    "iterations": fit.diagnostics.get("n_iter"),
                }
            )
    row["em x1"] = starts[0]["error"]
    row["em x1_seconds"] = starts[0]["seconds"]
    row["em x1_iterations"] = starts[0]["iterations"]
    best = max(starts, key=lambda s: s["loglik"])
    row["em x5"] = best["error"]
    row["em x5_seconds"] = sum(s["seconds"] for s in starts)
    row["em_start_errors"] = [s["error"] for s in starts]
    return row


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["link"], row["k"], row["n"]), []).append(row)
    table = []
    for (link, k, n), members in sorted(groups.items()):
        entry = {"link": link, "k": k, "n": n, "seeds": len(members)}
        for method in METHODS:
            values = [m[method] for m in members if not math.isnan(m[method])]
            entry[method] = statistics.median(values) if values else math.nan
            secs = [m[f"{method}_seconds"] for m in members]
            entry[f"{method}_seconds"] = statistics.median(secs)
        starts = [e for m in members for e in m["em_start_errors"]]
        reference = entry["em x5"]
        entry["stuck_random_starts"] = sum(e > max(3 * reference, 0.2) for e in starts)
        entry["random_starts"] = len(starts)
        entry["tensor_refused"] = sum(m["tensor_refused"] is not None for m in members)
        table.append(entry)
    return table


def markdown(table: list[dict], info: dict, args) -> str:
    lines = [
        "# Recovery: expert error vs n (d = 10, sigma = 0.5)",
        "",
        f"Run: `python benchmarks/recovery.py{' --quick' if args.quick else ''}"
        f"{' --full' if args.full else ''}`; median over {args.seeds} seed(s). Error = max_i "
        "||a_hat_i - a_i||. 'stuck' = random EM starts with error > max(3 x best-of-5, 0.2).",
        "",
        "| link | k | n | tensor | tensor+em | em x1 | em x5 | stuck starts | tensor s | "
        "tensor+em s | em x1 s | em x5 s | refused |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        lines.append(
            f"| {e['link']} | {e['k']} | {e['n']:.0e} | {e['tensor']:.4f} | {e['tensor+em']:.4f} | "
            f"{e['em x1']:.4f} | {e['em x5']:.4f} | {e['stuck_random_starts']}/{e['random_starts']}"
            f" | {e['tensor_seconds']:.2f} | {e['tensor+em_seconds']:.2f} | "
            f"{e['em x1_seconds']:.2f} | {e['em x5_seconds']:.2f} | {e['tensor_refused']} |"
        )
    lines += machine_section(info, "Machine:")
    return "\n".join(lines)


def plot(table: list[dict], ks: list[int]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(ks), len(LINKS), figsize=(4 * len(LINKS), 3 * len(ks)), squeeze=False
    )
    for i, k in enumerate(ks):
        for j, link in enumerate(LINKS):
            ax = axes[i][j]
            entries = [e for e in table if e["k"] == k and e["link"] == link]
            ns = [e["n"] for e in entries]
            for method, style in zip(METHODS, ["o-", "s-", "^--", "v--"]):
                ax.plot(ns, [e[method] for e in entries], style, label=method)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{link}, k = {k}")
            ax.set_xlabel("n")
            ax.set_ylabel("expert error")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n <= 1e4, k = 2, 3 (about a minute)")
    parser.add_argument("--full", action="store_true", help="n up to 1e6 and 3 seeds (long)")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        ns, ks, seeds = [1_000, 10_000], [2, 3], [0]
    elif args.full:
        ns, ks, seeds = [1_000, 10_000, 100_000, 1_000_000], [2, 3, 4], [0, 1, 2]
    else:
        ns, ks, seeds = [1_000, 10_000, 100_000], [2, 3, 4], [0]
    args.seeds = len(seeds)
    info = machine_info()
    rows = []
    start = time.perf_counter()
    for k in ks:
        for link in LINKS:
            for n in ns:
                for seed in seeds:
                    row = run_one(link, k, n, seed)
                    rows.append(row)
                    print(
                        f"{link:10s} k={k} n={n:>7d} seed={seed}: tensor {row['tensor']:.4f} "
                        f"tensor+em {row['tensor+em']:.4f} em1 {row['em x1']:.4f} "
                        f"em5 {row['em x5']:.4f} ({time.perf_counter() - start:.0f} s)",
                        flush=True,
                    )
    table = summarise(rows)
    info["total_seconds"] = time.perf_counter() - start
    payload = {
        "machine": info,
        "settings": {"ns": ns, "ks": ks, "seeds": seeds, "d": 10, "noise": 0.5},
        "rows": rows,
        "summary": table,
    }
    name = "recovery_quick" if args.quick else ("recovery_full" if args.full else "recovery")
    paths = write_results(name, payload, markdown(table, info, args), plot(table, ks))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
