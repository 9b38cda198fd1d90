"""The demo's Markdown report and console lines, and the one line it quotes from the
initializer-cost benchmark when the clone has its results.

Templates and formatting only: the numbers come from :mod:`.demo`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.estimate import MoEEstimate
from .report import _PARAMETER_COLUMNS, machine_info, markdown_table
from .runs import WRONG_BASIN_NATS

if TYPE_CHECKING:
    from .demo import StartRecord

__all__ = ["demo_summary", "console_lines", "initialize_cost_line", "INITIALIZE_COST"]

#: Where ``benchmarks/initialize_cost.py`` writes its results, in a clone of the repository.
INITIALIZE_COST = Path(__file__).resolve().parents[2] / "benchmarks/results/initialize_cost.json"


def initialize_cost_line(path: str | Path | None = None) -> str | None:
    """One line on what the tensor start buys, from the initializer-cost benchmark's results.

    Reads ``path`` (default :data:`INITIALIZE_COST`): ``{"machine", "date", "rows": [{"n", "d",
    "k", "initialize_s", "em_start_s", "multi_start_em_s", "same_optimum"}, ...]}`` and quotes the
    row with the most rows of data, labelled as coming from that benchmark run. None when the
    file is absent (an installed package, or a clone without the results) or not of that form.
    """
    path = Path(INITIALIZE_COST if path is None else path)
    try:
        results = json.loads(path.read_text())
        row = max(results["rows"], key=lambda r: r["n"])
        machine, date = results["machine"], results["date"]
        shape = f"n = {int(row['n']):,}, d = {int(row['d'])}, k = {int(row['k'])}"
        initialize_s, em_s = float(row["initialize_s"]), float(row["multi_start_em_s"])
        same = bool(row["same_optimum"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    optimum = "the same optimum" if same else "a different optimum"
    return (
        f"What the tensor start buys at larger n: at {shape}, `initialize` took "
        f"{initialize_s:.2f} s and the default multi-start `fit_em` {em_s:.2f} s, reaching "
        f"{optimum} (from a benchmark run ({machine}, {date}))."
    )


def console_lines(numbers: dict[str, Any]) -> list[str]:
    """What ``pyromoe demo`` prints before the NUTS lines: the starts and, when known, the
    benchmark line."""
    error = numbers["tensor_start_expert_error"]
    tensor = "moment step failed" if error is None else f"expert error {error:.3f}"
    lines = [
        f"EM fits in a wrong basin: {numbers['plain_draws_in_wrong_basin']} of "
        f"{numbers['num_plain_draws']} from plain random draws, "
        f"{numbers['random_starts_in_wrong_basin']} of {numbers['num_random_starts']} from "
        f"screened starts; tensor start -> EM: {tensor}"
    ]
    if numbers.get("initialize_cost"):
        lines.append(numbers["initialize_cost"].replace("`", ""))
    return lines


def _starts_rows(records: Sequence[StartRecord], best: float) -> list[dict[str, Any]]:
    return [
        {
            "start": r.label,
            "log-likelihood": r.log_likelihood,
            "below best (nats)": best - r.log_likelihood,
            "expert error": float("nan") if r.expert_error is None else r.expert_error,
            "EM iterations": r.n_iter,
            "seconds": r.seconds,
            "wrong basin": r.wrong_basin,
        }
        for r in records
    ]


def _nuts_rows(reports: dict[str, dict]) -> list[dict[str, Any]]:
    return [
        {
            "NUTS init": label,
            "max r_hat (as sampled)": rep["max_rhat_raw"],
            "max r_hat (relabelled)": rep["max_rhat_aligned"],
            "min ESS bulk": rep["min_ess_bulk_aligned"],
            "divergences": rep["divergences"],
            "chains in a wrong mode": rep["chains_in_wrong_mode"],
            "convergence check": "passed" if rep["convergence"]["converged"] else "FAILED",
            "chain mean log-lik": ", ".join(f"{v:.1f}" for v in rep["chain_mean_log_likelihood"]),
            "seconds": rep["seconds"],
        }
        for label, rep in reports.items()
    ]


def _starts_text(numbers) -> str:
    plain, screened = numbers["num_plain_draws"], numbers["num_random_starts"]
    return (
        f"{numbers['plain_draws_in_wrong_basin']} of {plain} EM fits from one plain random draw "
        f"and {numbers['random_starts_in_wrong_basin']} of {screened} from `fit_em`'s default "
        "screened start (the best of a few short EM runs on a subsample) ended in a wrong basin "
        f"(log-likelihood more than {WRONG_BASIN_NATS:g} nats below the best fit and expert "
        "error over twice the best fit's). " + _tensor_text(numbers)
    )


def _tensor_text(numbers) -> str:
    error = numbers["tensor_start_expert_error"]
    if error is None:
        return "The tensor start could not run on these data (see the table)."
    where = "a wrong" if numbers["tensor_start_in_wrong_basin"] else "the right"
    return f"The tensor start -> EM fit landed in {where} basin (expert error {error:.3f})."


def _initializer_text(estimate: MoEEstimate) -> str:
    diag = estimate.diagnostics
    return (
        f"ran `{diag.get('initializer', estimate.method)}` ({diag.get('initializer_reason', '')})."
    )


def demo_summary(numbers, starts: dict, rows, estimate, reports) -> str:
    """``summary.md`` of ``pyromoe demo``; ``starts`` holds the ``"plain"`` and ``"screened"``
    records and the ``"tensor"`` record."""
    d = numbers["data"]
    records = [*starts["plain"], *starts["screened"], starts["tensor"]]
    best = max(r.log_likelihood for r in records if r.estimate is not None)
    seconds_rows = [{"step": k, "seconds": v} for k, v in numbers["seconds"].items()]
    cost = f"\n{numbers['initialize_cost']}\n" if numbers.get("initialize_cost") else ""
    return f"""# pyromoe demo

Data: `simulate(n={d["n"]}, in_features={d["in_features"]}, num_experts={d["num_experts"]},
link={d["link"]!r}, noise={d["noise"]}, expert_cosine={d["expert_cosine"]}, gate={d["gate"]!r},
gate_norm={d["gate_norm"]}, seed={d["seed"]})`: experts with pairwise cosine {d["expert_cosine"]},
where likelihood fits from random starts can settle in a wrong basin.

Machine: {machine_info()}.

## EM from plain random draws, from screened starts and from the tensor start

{_starts_text(numbers)} Expert error = max over experts of ||a_i - a_i*||, experts matched by
the best permutation. `random_starts.png` plots each fit's distance below the best fit against
its expert error.
{cost}
{markdown_table(_starts_rows(records, best))}
## NUTS seeded from the estimate against Pyro's default init

The seed is `pyromoe.initialize(method="auto")`: {_initializer_text(estimate)}
Each seeded chain starts at a draw from the Laplace approximation at the estimate (dispersed starts,
so that r_hat means something). A chain is in a wrong mode when its mean log-likelihood is more than
{WRONG_BASIN_NATS:g} nats below the best chain of either run (`chain_log_likelihood.png` draws each
chain, wrong-mode chains dashed in red). r_hat "relabelled" is computed after matching every draw's
experts to the estimate (label switching undone).

{markdown_table(_nuts_rows(reports))}
## Parameters: truth, start, posterior (seeded NUTS, relabelled to the truth's labels)

{_PARAMETER_COLUMNS}

{markdown_table(rows)}
## Time of each step

{markdown_table(seconds_rows, digits=2)}
## Files

- `inference_data.nc`: the seeded posterior as ArviZ InferenceData (`az.from_netcdf`), with
  posterior, sample_stats, log_likelihood, posterior_predictive, observed_data, constant_data.
- `random_starts.png`: where each EM fit ended (nats below the best fit, expert error), by kind
  of start: plain random draw, screened start, tensor start.
- `chain_log_likelihood.png`: each NUTS chain's total log-likelihood per draw, seeded and
  default init side by side, chains in a wrong mode marked.
- `trace.png`, `posterior_vs_truth.png`, `posterior_predictive.png` (the seeded run).
- `responsibilities.png`: y against each expert's fitted value g(a_i.x + b_i) at the posterior
  mean, coloured by that expert's responsibility p(expert | x, y) (d > 1: no 1-D projection).
"""
