"""The user's path: the `pyromoe demo` and `pyromoe fit` analyses, as functions.

Each run writes a results folder atomically (:func:`pyromoe.results_directory`): the
InferenceData as NetCDF, ``summary.md`` and PNG figures. Nothing here does maths of its own: it calls
the initializers (:func:`pyromoe.estimators.initialize`, :func:`pyromoe.core.em.fit_em`), the seeded inference
wrappers (:mod:`pyromoe.bayes.fit`) and the plots (:mod:`pyromoe.app.plots`).
"""

from __future__ import annotations

import json
import math
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._validation import (
    check_count,
    check_device,
    check_link,
    check_noise_model,
    check_num_experts,
    check_seed,
    child_seed,
    num_parameters,
)
from ..bayes.model import MixtureOfExperts
from ..core import sites
from ..core.em import SCREEN_CANDIDATES, fit_em
from ..core.estimate import MoEEstimate, parameter_errors
from ..estimators.initialize import initialize
from .atomic import save_figure_atomic, write_netcdf_atomic, write_text_atomic
from .plots import interval_columns, parameter_sites, parameter_summary
from .results import results_directory
from .table import read_table

__all__ = ["StartRecord", "compare_starts", "run_demo", "run_fit", "nuts_report"]

#: A start (or chain) whose total log-likelihood is this many nats below the best is in a wrong
#: basin. Chains/starts in wrong modes sit 26-840 nats lower (docs/algorithm.md section 5); two starts in
#: the same basin differ by far less than 1 nat after EM converges.
WRONG_BASIN_NATS = 5.0


@dataclass
class StartRecord:
    """One EM fit: where it ended and what it cost."""

    label: str
    log_likelihood: float
    seconds: float
    n_iter: int
    converged: bool
    expert_error: float | None = None
    wrong_basin: bool = False
    estimate: MoEEstimate | None = field(default=None, repr=False)


def _total_log_likelihood(estimate: MoEEstimate, x, y) -> float:
    return float(estimate.log_likelihood(x, y).sum())


def compare_starts(
    x,
    y,
    num_experts: int,
    link: str,
    *,
    num_random: int = 20,
    bias: bool = True,
    seed: int = 0,
    truth: MoEEstimate | None = None,
    progress: bool = True,
    screen: int = SCREEN_CANDIDATES,
) -> tuple[list[StartRecord], StartRecord]:
    """``num_random`` single random-start EM fits and one tensor start -> EM fit on the same data.

    Each random start is ``fit_em``'s (``screen`` as there: by default the best of a few short EM
    runs on a subsample; ``screen=1`` for one plain random draw, which shows how often a raw random
    start ends in a wrong basin). If the moment step cannot apply, the tensor record says why (its
    ``estimate`` is None).

    A fit is in a wrong basin when its log-likelihood is more than :data:`WRONG_BASIN_NATS` below
    the best of all fits (and, with ``truth``, its expert error is also over twice the best fit's).
    """
    from tqdm.auto import tqdm

    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-converged random starts are part of the story
        for r in tqdm(range(num_random), desc="random-start EM", disable=not progress, leave=False):
            start = time.perf_counter()
            start_seed = child_seed(seed, 2, r)  # random start r: no arithmetic on the seed
            fit = fit_em(
                x, y, num_experts, link, n_init=1, bias=bias, seed=start_seed, screen=screen
            )
            seconds = time.perf_counter() - start
            records.append(_record(f"random {r}", fit, seconds, x, y, truth))
        start = time.perf_counter()
        try:
            tensor = initialize(x, y, num_experts, link, method="tensor", seed=seed)
        except ValueError as error:  # the moments cannot apply here: say so, don't crash the demo
            tensor = None
            reason = str(error)
        seconds = time.perf_counter() - start
    if tensor is None:
        tensor_record = StartRecord(
            f"tensor -> EM: moment step failed ({reason})", float("nan"), seconds, 0, False
        )
    else:
        tensor_record = _record("tensor -> EM", tensor, seconds, x, y, truth)
    everyone = [r for r in (*records, tensor_record) if r.estimate is not None]
    best = max(r.log_likelihood for r in everyone)
    best_error = min((r.expert_error for r in everyone if r.expert_error is not None), default=None)
    for r in everyone:  # a failed tensor start has no estimate and stays wrong_basin=False
        low = r.log_likelihood < best - WRONG_BASIN_NATS
        far = best_error is None or r.expert_error > 2 * best_error
        r.wrong_basin = bool(low and far)
    return records, tensor_record


def _record(label, fit: MoEEstimate, seconds, x, y, truth) -> StartRecord:
    diag = fit.diagnostics
    return StartRecord(
        label=label,
        log_likelihood=_total_log_likelihood(fit, x, y),
        seconds=seconds,
        n_iter=int(diag.get("refine_n_iter") or diag.get("n_iter") or 0),
        converged=bool(diag.get("refine_converged", diag.get("converged", True))),
        expert_error=None if truth is None else parameter_errors(fit, truth)["experts"],
        estimate=fit,
    )


# ----------------------------------------------------------------------------------- NUTS report
def relabel(idata, estimate: MoEEstimate):
    """A copy of ``idata`` with every draw's experts relabelled to ``estimate``.

    Only the posterior changes: the log-likelihood and the predictions do not depend on labels.
    """
    from ..core.labels import align_labels

    names = parameter_sites(idata)
    draws = {n: torch.as_tensor(idata.posterior[n].values) for n in names}
    aligned, info = align_labels(draws, estimate)
    out = idata.copy()
    for n in names:
        out.posterior[n] = (idata.posterior[n].dims, aligned[n].cpu().numpy())
    out.posterior.attrs["num_draws_relabelled"] = info["num_draws_relabelled"]
    return out


def _max_rhat(idata, names) -> float:
    import arviz as az

    rhat = az.rhat(idata, var_names=names)
    return float(np.nanmax([np.nanmax(np.asarray(rhat[v].values, dtype=float)) for v in names]))


def nuts_report(idata, reference: MoEEstimate, best_log_likelihood: float | None = None) -> dict:
    """Max r_hat of the draws as sampled and after relabelling to ``reference``, divergences, chains
    in a wrong mode (mean log-likelihood over :data:`WRONG_BASIN_NATS` below the best chain, or below
    ``best_log_likelihood`` when given, e.g. the best chain of another run on the same data)."""
    import arviz as az

    names = parameter_sites(idata)
    aligned = relabel(idata, reference)
    chain_ll = np.asarray(idata.attrs["chain_mean_log_likelihood"], dtype=float)
    best = (
        chain_ll.max() if best_log_likelihood is None else max(best_log_likelihood, chain_ll.max())
    )
    ess = az.ess(aligned, var_names=names)
    return {
        "max_rhat_raw": _max_rhat(idata, names),
        "max_rhat_aligned": _max_rhat(aligned, names),
        "min_ess_bulk_aligned": float(np.nanmin([np.nanmin(ess[n].values) for n in names])),
        "divergences": int(np.asarray(idata.sample_stats["diverging"].values).sum()),
        "chain_mean_log_likelihood": chain_ll.tolist(),
        "chains_in_wrong_mode": int((chain_ll < best - WRONG_BASIN_NATS).sum()),
        "seconds": float(idata.attrs.get("seconds", float("nan"))),
    }


# ----------------------------------------------------------------------------------- tables
def posterior_mean_estimate(idata, link, method: str = "posterior mean") -> MoEEstimate:
    """The posterior mean of every site as an :class:`MoEEstimate` (zeros for absent bias sites;
    one expert has no gate sites: a gate of zero rows)."""
    post = idata.posterior
    mean = {n: torch.as_tensor(post[n].mean(("chain", "draw")).values) for n in post.data_vars}
    k, d = mean[sites.EXPERTS_WEIGHT].shape
    zeros = torch.zeros(k, dtype=mean[sites.EXPERTS_WEIGHT].dtype)
    no_gate = torch.zeros(k - 1, d, dtype=zeros.dtype)
    return MoEEstimate(
        experts_weight=mean[sites.EXPERTS_WEIGHT],
        experts_bias=mean.get(sites.EXPERTS_BIAS, zeros),
        gate_weight=mean.get(sites.GATE_WEIGHT, no_gate),
        gate_bias=mean.get(sites.GATE_BIAS, zeros[1:]),
        noise=mean[sites.NOISE],
        link=link,
        method=method,
    )


def parameter_table(
    idata, columns: dict[str, MoEEstimate], hdi_prob: float = 0.94
) -> list[dict[str, Any]]:
    """One row per scalar parameter: the given point values (e.g. truth, start), then ArviZ's
    posterior mean, sd, ``hdi_prob`` interval and, with several chains, ess and r_hat.

    The rows of :func:`pyromoe.app.plots.parameter_summary` (its index as the ``parameter`` key),
    as :func:`markdown_table` writes them.
    """
    return parameter_summary(idata, columns, hdi_prob).reset_index().to_dict("records")


_PARAMETER_COLUMNS = (
    "The posterior columns are ArviZ's `az.summary` (mean, sd, 94% HDI; with several chains "
    "ess_bulk, ess_tail and r_hat); experts are numbered from 0, gate rows from 1 (row j gives "
    "expert j's logit; expert 0 is the reference), inputs by column name (by position from 0 "
    "when they have none), as in the figures."
)


def markdown_table(rows: Sequence[dict[str, Any]], digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (dicts with the same keys)."""
    if not rows:
        return "(none)\n"
    keys = list(rows[0])

    def cell(value):
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine_info() -> str:
    return (
        f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads"
    )


# ----------------------------------------------------------------------------------- demo
#: The demo's data: a pair of similar experts (pairwise cosine 0.8), where random-start EM and
#: default-init NUTS land in wrong basins now and then (docs/algorithm.md sections 4-5; README).
DEMO_DATA = dict(
    n=2000, in_features=5, noise=0.5, expert_cosine=0.8, gate="orthogonal", gate_norm=2.0
)
DEMO_QUICK = dict(n=1000, num_random=4, num_chains=2, num_warmup=60, num_samples=60)
DEMO_FULL = dict(num_random=20, num_chains=4, num_warmup=150, num_samples=150)


def _can_run_in_parallel(x: torch.Tensor) -> bool:
    """Whether the demo's two NUTS runs go to two processes: CPU data and at least two CPUs."""
    import os

    return x.device.type == "cpu" and (os.cpu_count() or 1) >= 2


def _nuts_job(job):
    """One ``run_nuts`` call in a worker process (top level, so that it pickles)."""
    from ..bayes.fit import run_nuts

    model, x, y, kwargs = job
    torch.set_num_threads(1)
    return run_nuts(model, x, y, **kwargs)


def _run_nuts_jobs(model, x, y, jobs: list[dict], parallel: bool) -> list:
    """``run_nuts(model, x, y, **job)`` for each job: in that many spawned processes at once when
    ``parallel`` (their progress bars off), else one after the other. Pyro runs the chains of one
    call in processes only when there are more CPUs than chains, so on a small machine the two
    independent runs are what can share the cores. The pool is terminated on any error or
    interrupt, so no worker outlives the call."""
    from ..bayes.fit import run_nuts

    if not parallel:
        return [run_nuts(model, x, y, **job) for job in jobs]
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(len(jobs))
    try:
        pending = [
            pool.apply_async(_nuts_job, ((model, x, y, {**job, "progress": False}),))
            for job in jobs
        ]
        results = [result.get() for result in pending]
        pool.close()
        pool.join()
        return results
    finally:
        pool.terminate()


class _Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, step: str):
        timer = self

        class _Step:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[step] = time.perf_counter() - self.start

        return _Step()


def _starts_rows(records: Sequence[StartRecord]) -> list[dict[str, Any]]:
    return [
        {
            "start": r.label,
            "log-likelihood": r.log_likelihood,
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
            "chain mean log-lik": ", ".join(f"{v:.1f}" for v in rep["chain_mean_log_likelihood"]),
            "seconds": rep["seconds"],
        }
        for label, rep in reports.items()
    ]


def _write_outputs(folder: Path, idata, figures: dict[str, Any], summary: str) -> None:
    import matplotlib.pyplot as plt

    write_netcdf_atomic(idata, folder / "inference_data.nc")
    for name, figure in figures.items():
        save_figure_atomic(figure, folder / f"{name}.png", dpi=90)
        plt.close(figure)
    write_text_atomic(folder / "summary.md", summary)


def run_demo(
    out: str | Path = "pyromoe-demo",
    *,
    seed: int = 0,
    quick: bool = False,
    device: str = "cpu",
    num_experts: int = 2,
    link: str = "linear",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Simulate similar experts; compare random-start EM with the tensor start; run NUTS seeded from
    the estimate and from Pyro's default init; write the results folder ``out``.

    ``out`` may replace only the results of an earlier run, and only with ``overwrite=True``
    (:func:`pyromoe.results_directory`). Returns the numbers of the summary (also written to
    ``out/summary.md``).
    """
    _check_run_arguments(
        num_experts=num_experts, link=link, seed=seed, device=device, overwrite=overwrite
    )
    # One torch thread: the demo's tensors are small, and a thread pool fighting other processes
    # for 2 cores made each EM iteration ~50x slower (0.3 s instead of 5 ms, measured here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(out, seed, quick, device, num_experts, link, progress, overwrite)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out, seed, quick, device, num_experts, link, progress, overwrite) -> dict[str, Any]:
    from ..estimators.simulate import simulate
    from . import plots

    sizes = {**DEMO_FULL, **(DEMO_QUICK if quick else {})}
    data_args = {**DEMO_DATA, "n": sizes.get("n", DEMO_DATA["n"])}
    if num_experts + 1 > data_args["in_features"]:
        data_args["in_features"] = num_experts + 2
    timer = _Timer()
    with results_directory(out, overwrite=overwrite) as folder:
        with timer("simulate"):
            data = simulate(
                num_experts=num_experts, link=link, seed=seed, device=device, **data_args
            )
        x, y, truth = data.x, data.y, data.truth
        with timer("random-start EM and tensor start"):
            random_records, tensor_record = compare_starts(
                x,
                y,
                num_experts,
                link,
                num_random=sizes["num_random"],
                seed=seed,
                truth=truth,
                progress=progress,
            )
        with timer("initialize (auto: tensor start, guarded by random EM starts)"):
            estimate = initialize(x, y, num_experts, link, method="auto", seed=seed)
        model = MixtureOfExperts(data_args["in_features"], num_experts, link=link, bias=True)
        nuts_args = dict(
            num_chains=sizes["num_chains"],
            num_warmup=sizes["num_warmup"],
            num_samples=sizes["num_samples"],
            seed=seed,
            progress=progress,
            align=False,
        )
        jobs = [
            {"init": estimate, **nuts_args},
            {"init": None, "posterior_predictive": False, **nuts_args},
        ]
        parallel = _can_run_in_parallel(x)
        step = (
            "NUTS seeded and from Pyro's default init (two processes at once)"
            if parallel
            else "NUTS seeded and from Pyro's default init (one after the other)"
        )
        with timer(step):
            seeded, default = _run_nuts_jobs(model, x, y, jobs, parallel)
        best = max(
            max(seeded.attrs["chain_mean_log_likelihood"]),
            max(default.attrs["chain_mean_log_likelihood"]),
        )
        reports = {
            "seeded (tensor start -> EM)": nuts_report(seeded, estimate, best),
            "Pyro default (init_to_uniform)": nuts_report(default, estimate, best),
        }
        # present everything in the truth's labels
        estimate_t = estimate.permute(parameter_errors(estimate, truth)["permutation"])
        posterior = relabel(seeded, estimate_t)
        posterior.attrs["pyromoe_demo"] = "posterior relabelled to the truth's expert labels"
        mean = posterior_mean_estimate(posterior, estimate.link)
        rows = parameter_table(posterior, {"truth": truth, "start": estimate_t})
        with timer("figures"):
            figures = {
                "trace": plots.plot_trace(posterior),
                "posterior_vs_truth": plots.plot_posterior_vs_truth(posterior, truth, estimate_t),
                "random_starts": plots.plot_random_starts(
                    [r.expert_error for r in random_records],
                    [r.log_likelihood for r in random_records],
                    tensor_record.expert_error,
                    tensor_record.log_likelihood,
                ),
                "responsibilities": plots.plot_responsibilities(x.cpu(), y.cpu(), mean.to("cpu")),
                "posterior_predictive": plots.plot_posterior_predictive(posterior),
            }
        wrong = sum(r.wrong_basin for r in random_records)
        numbers = {
            "data": {**data_args, "num_experts": num_experts, "link": link, "seed": seed},
            "random_starts_in_wrong_basin": wrong,
            "num_random_starts": len(random_records),
            "tensor_start_in_wrong_basin": tensor_record.wrong_basin,
            "tensor_start_expert_error": tensor_record.expert_error,
            "initializer": estimate.diagnostics.get("initializer", estimate.method),
            "nuts": reports,
            "seconds": timer.seconds,
        }
        summary = _demo_summary(numbers, random_records, tensor_record, rows, estimate, reports)
        _write_outputs(folder, posterior, figures, summary)
    return numbers


def _demo_summary(numbers, random_records, tensor_record, rows, estimate, reports) -> str:
    d = numbers["data"]
    seconds_rows = [{"step": k, "seconds": v} for k, v in numbers["seconds"].items()]
    wrong_text = (
        f"{numbers['random_starts_in_wrong_basin']} of {numbers['num_random_starts']} random-start "
        f"EM fits ended in a wrong basin (log-likelihood more than {WRONG_BASIN_NATS:g} nats below "
        "the best fit and expert error over twice the best fit's)."
    )
    return f"""# pyromoe demo

Data: `simulate(n={d["n"]}, in_features={d["in_features"]}, num_experts={d["num_experts"]},
link={d["link"]!r}, noise={d["noise"]}, expert_cosine={d["expert_cosine"]}, gate={d["gate"]!r},
gate_norm={d["gate_norm"]}, seed={d["seed"]})`: experts with pairwise cosine {d["expert_cosine"]},
where likelihood fits from random starts can settle in a wrong basin.

Machine: {machine_info()}.

## Random-start EM against the tensor start

{wrong_text} {_tensor_text(numbers)} Expert error = max over experts of ||a_i - a_i*||,
experts matched by the best permutation.

{markdown_table(_starts_rows([*random_records, tensor_record]))}
## NUTS seeded from the estimate against Pyro's default init

The seed is `pyromoe.initialize(method="auto")`: {_initializer_text(estimate)}
Each seeded chain starts at a draw from the Laplace approximation at the estimate (dispersed starts,
so that r_hat means something). A chain is in a wrong mode when its mean log-likelihood is more than
{WRONG_BASIN_NATS:g} nats below the best chain of either run. r_hat "relabelled" is computed after
matching every draw's experts to the estimate (label switching undone).

{markdown_table(_nuts_rows(reports))}
## Parameters: truth, start, posterior (seeded NUTS, relabelled to the truth's labels)

{_PARAMETER_COLUMNS}

{markdown_table(rows)}
## Time of each step

{markdown_table(seconds_rows, digits=2)}
## Files

- `inference_data.nc`: the seeded posterior as ArviZ InferenceData (`az.from_netcdf`), with
  posterior, sample_stats, log_likelihood, posterior_predictive, observed_data, constant_data.
- `trace.png`, `posterior_vs_truth.png`, `random_starts.png`, `posterior_predictive.png`.
- `responsibilities.png`: y against each expert's fitted value g(a_i.x + b_i) at the posterior
  mean, coloured by that expert's responsibility p(expert | x, y) (d > 1: no 1-D projection).
"""


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


def _check_run_arguments(*, num_experts, link, seed, device, overwrite, min_experts=2) -> None:
    """The checks shared by :func:`run_demo` and :func:`run_fit`, before any work."""
    check_num_experts(num_experts, minimum=min_experts)
    check_link(link)
    check_seed(seed)
    check_device(device)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False; got {overwrite!r}")


# ----------------------------------------------------------------------------------- fit
#: Rows needed per model parameter by `pyromoe fit`.
ROWS_PER_PARAMETER = 3


def _check_expert_counts(num_experts) -> list[int]:
    """``num_experts`` of :func:`run_fit` as a list: one int, or a sequence of distinct ints (each
    >= 1) to compare."""
    if isinstance(num_experts, (str, bytes)) or not isinstance(num_experts, (int, Sequence)):
        raise TypeError(
            "num_experts must be an int >= 1 or a sequence of distinct ints, e.g. (1, 2, 3); got "
            f"{type(num_experts).__name__}"
        )
    values = [num_experts] if not isinstance(num_experts, Sequence) else list(num_experts)
    if not values:
        raise ValueError("num_experts must list at least one number of experts; got none")
    values = [check_num_experts(k, minimum=1) for k in values]
    if len(set(values)) != len(values):
        raise ValueError(f"num_experts must not repeat a value; got {values}")
    return values


def _num_fit_parameters(d: int, k: int, noise: str) -> int:
    """Free parameters of the model `pyromoe fit` builds (per-expert noise: k sds, not one)."""
    return num_parameters(d, k) + (k - 1 if noise == "per_expert" else 0)


#: The columns of :func:`arviz.compare`'s table that `pyromoe fit --experts 1,2,...` reports.
COMPARE_COLUMNS = ("rank", "elpd_loo", "se", "elpd_diff", "dse", "p_loo", "weight", "warning")


def comparison_rows(table) -> list[dict[str, Any]]:
    """:func:`arviz.compare`'s table (indexed ``"k=1"``, ...) as rows ``{"k": "k=1", "rank": 0,
    ...}`` in rank order, with the columns of :data:`COMPARE_COLUMNS`."""
    rows = []
    for label, row in table.sort_values("rank").iterrows():
        record: dict[str, Any] = {"k": str(label)}
        for column in COMPARE_COLUMNS:
            value = row.get(column, float("nan"))
            if column == "rank":
                value = int(value)
            elif column == "warning":
                value = bool(value)
            else:
                value = float(value)
            record[column] = value
        rows.append(record)
    return rows


def _standardize_columns(values: np.ndarray, names: Sequence[str], *, target: bool = False):
    mean, scale = values.mean(0), values.std(0)
    constant = [name for name, s in zip(names, scale) if not s > 0]
    if constant and target:
        raise ValueError(
            f"the target column '{constant[0]}' is constant (every value is "
            f"{float(values[0, 0]):g}): there is nothing to model; choose another --target"
        )
    if constant:
        listed = ", ".join(f"'{name}'" for name in constant)
        raise ValueError(
            f"input column(s) {listed} are constant; a constant input carries no information "
            "(the experts' intercepts already model a constant): leave it out by listing the "
            "other inputs with --features"
        )
    return (values - mean) / scale, mean, scale


def standardisation_record(
    feature_names: Sequence[str],
    target_name: str,
    x_mean: np.ndarray,
    x_scale: np.ndarray,
    y_mean: float,
    y_scale: float,
) -> dict[str, Any]:
    """The standardisation of a fit as plain data (``standardisation.json``, ``idata.attrs``).

    ``z = (value - mean) / sd`` for every input column and the target, with the population sd
    (``ddof=0``, numpy's default).

    Examples
    --------
    >>> standardisation_record(["a"], "y", np.array([1.0]), np.array([2.0]), 3.0, 4.0)["target"]
    {'column': 'y', 'mean': 3.0, 'sd': 4.0}
    """
    return {
        "convention": "z = (value - mean) / sd, sd the population standard deviation (ddof=0); "
        "the model was fitted to the z-scores of the inputs and of the target",
        "inputs": [
            {"column": str(name), "mean": float(m), "sd": float(sd)}
            for name, m, sd in zip(feature_names, x_mean, x_scale)
        ],
        "target": {"column": str(target_name), "mean": float(y_mean), "sd": float(y_scale)},
    }


def to_data_units(
    values: dict[str, np.ndarray], standardisation: dict[str, Any], link
) -> dict[str, np.ndarray]:
    """Site values fitted on standardised data, in the data's own units (any leading dims).

    With ``x_std = (x - m) / s`` and ``y_std = (y - m_y) / s_y`` (``standardisation`` as
    :func:`standardisation_record` writes it), the linear expert ``y = s_y (a . x_std + b) + m_y``
    has weights ``s_y a_j / s_j`` and intercept ``s_y (b - sum_j a_j m_j / s_j) + m_y``; the noise
    is ``s_y sigma``; the gate logit ``w . x_std + c`` has weights ``w_j / s_j`` and offset
    ``c - sum_j w_j m_j / s_j``. For any other link the experts have no data-unit form (the link
    sits between the two scales), so only the noise and the gate are returned.
    """
    m = np.array([column["mean"] for column in standardisation["inputs"]])
    s = np.array([column["sd"] for column in standardisation["inputs"]])
    y_mean, y_sd = standardisation["target"]["mean"], standardisation["target"]["sd"]
    out: dict[str, np.ndarray] = {}
    if sites.NOISE in values:
        out[sites.NOISE] = y_sd * np.asarray(values[sites.NOISE])
    if sites.GATE_WEIGHT in values:
        gate = np.asarray(values[sites.GATE_WEIGHT])
        out[sites.GATE_WEIGHT] = gate / s
        if sites.GATE_BIAS in values:
            out[sites.GATE_BIAS] = np.asarray(values[sites.GATE_BIAS]) - (gate * (m / s)).sum(-1)
    if check_link(link).is_identity and sites.EXPERTS_WEIGHT in values:
        weight = np.asarray(values[sites.EXPERTS_WEIGHT])
        out[sites.EXPERTS_WEIGHT] = y_sd * weight / s
        if sites.EXPERTS_BIAS in values:
            bias = np.asarray(values[sites.EXPERTS_BIAS])
            out[sites.EXPERTS_BIAS] = y_sd * (bias - (weight * (m / s)).sum(-1)) + y_mean
    return out


def data_unit_summary(
    idata, start: MoEEstimate, standardisation: dict[str, Any], hdi_prob: float = 0.94
):
    """:func:`pyromoe.app.plots.parameter_summary` of the draws mapped by :func:`to_data_units`
    (draw by draw, so the intervals are those of the mapped draws), with the start mapped too.

    Its columns are ``start``, ``posterior mean``, ``sd`` and the interval, each suffixed
    ``" (data units)"``; rows without a data-unit form are absent.
    """
    import arviz as az
    import xarray as xr

    post = idata.posterior
    names = parameter_sites(idata)
    mapped = to_data_units({n: post[n].values for n in names}, standardisation, start.link)
    dataset = xr.Dataset({n: (post[n].dims, v) for n, v in mapped.items()}, coords=post.coords)
    start_values = {n: v.detach().cpu().numpy() for n, v in start.site_values().items()}
    points = {"start": to_data_units(start_values, standardisation, start.link)}
    table = parameter_summary(az.InferenceData(posterior=dataset), points, hdi_prob)
    low, high = interval_columns(hdi_prob)
    table = table[["start", "posterior mean", "sd", low, high]]
    return table.rename(columns=lambda column: f"{column} (data units)")


def posterior_responsibilities(model, idata, x, y, hdi_prob: float = 0.94):
    """Per observation, each expert's responsibility ``p(expert i | x_n, y_n, theta)`` averaged
    over the posterior draws, and its ``hdi_prob`` interval over the draws.

    Returns a pandas DataFrame with one row per observation (``obs``, the ``obs`` coordinate of
    ``idata``) and, per expert ``i``, the columns ``expert_i_mean``, ``expert_i_hdi_low`` and
    ``expert_i_hdi_high``. Computed in blocks of observations (memory ~ draws x block x k).
    """
    import arviz as az
    import pandas as pd

    post = idata.posterior
    names = parameter_sites(idata)
    num_chains, num_draws = post.sizes["chain"], post.sizes["draw"]
    total = num_chains * num_draws
    draws = {
        n: torch.as_tensor(post[n].values, dtype=x.dtype, device=x.device).reshape(
            total, *post[n].shape[2:]
        )
        for n in names
    }
    n = x.shape[0]
    k = int(draws[sites.EXPERTS_WEIGHT].shape[-2])
    block = max(1, (1 << 22) // (total * k))
    means, intervals = [], []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # az.hdi warns about a single chain or draw
        for start in range(0, n, block):
            part = slice(start, min(start + block, n))
            resp = model.responsibilities(x[part], y[part], draws).cpu().numpy()
            resp = resp.reshape(num_chains, num_draws, *resp.shape[1:])
            means.append(resp.mean(axis=(0, 1)))
            intervals.append(az.hdi(resp, hdi_prob=hdi_prob))
    mean, interval = np.concatenate(means), np.concatenate(intervals)
    observed = getattr(idata, "observed_data", None)
    obs = observed.coords["obs"].values if observed is not None else np.arange(n)
    columns: dict[str, Any] = {"obs": obs if len(obs) == n else np.arange(n)}
    for i in range(k):
        columns[f"expert_{i}_mean"] = mean[:, i]
        columns[f"expert_{i}_hdi_low"] = interval[:, i, 0]
        columns[f"expert_{i}_hdi_high"] = interval[:, i, 1]
    return pd.DataFrame(columns)


def run_fit(
    path: str | Path,
    target: str,
    features: Sequence[str] | None = None,
    *,
    num_experts: int | Sequence[int] = 2,
    noise: str = "shared",
    link: str = "linear",
    out: str | Path = "pyromoe-fit",
    method: str = "nuts",
    seed: int = 0,
    num_chains: int = 4,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_steps: int = 3000,
    device: str = "cpu",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fit a mixture of experts to a CSV file: standardise, initialize (``method="auto"``), then
    seeded NUTS (``method="nuts"``) or SVI (``method="svi"``, for large n); write ``out``.

    Inputs and target are standardised to zero mean and unit variance (the priors are on that
    scale); every expert has an intercept and the gate an offset. ``noise`` is the noise model
    (``"shared"``: one sd; ``"per_expert"``: one per expert) of the start, the model and the
    tables. ``num_experts`` is one k >= 1 (1: a plain regression, no gate), or several distinct
    ones: each is fitted by :func:`pyromoe.bayes.compare.compare_experts` (same ``method``, steps
    and draws), ranked by PSIS-LOO (written to ``summary.md`` and ``compare_experts.csv``), and
    the rest of the report is for the best-ranked k.

    ``out`` follows the rule of :func:`pyromoe.results_directory`: it may replace only earlier
    pyromoe results, only with ``overwrite=True``, and never the folder holding ``path`` (or one
    above it) nor the working folder. Every argument is checked before any work.
    """
    import pandas as pd

    from ..bayes.compare import compare_experts
    from ..bayes.fit import fit_svi, run_nuts
    from . import plots

    if method not in ("nuts", "svi"):
        raise ValueError(f"method must be 'nuts' or 'svi'; got {method!r}")
    ks = _check_expert_counts(num_experts)
    noise = check_noise_model(noise)
    _check_run_arguments(
        num_experts=max(ks),
        link=link,
        seed=seed,
        device=device,
        overwrite=overwrite,
        min_experts=1,
    )
    num_chains = check_count(num_chains, "num_chains", minimum=1)
    num_warmup = check_count(num_warmup, "num_warmup", minimum=0)
    num_samples = check_count(num_samples, "num_samples", minimum=4 if method == "nuts" else 1)
    num_steps = check_count(num_steps, "num_steps", minimum=1)
    table = read_table(path, target, features, min_rows=2)
    d = table.x.shape[1]
    largest = max(ks)
    parameters = _num_fit_parameters(d, largest, noise)
    needed = ROWS_PER_PARAMETER * parameters
    if table.x.shape[0] < needed:
        raise ValueError(
            f"{path} has {table.x.shape[0]} data rows; at least {needed} are needed "
            f"({ROWS_PER_PARAMETER} per parameter: {largest} experts on {d} inputs have "
            f"{parameters} parameters). Use fewer experts or features."
        )
    x_std, x_mean, x_scale = _standardize_columns(table.x, table.feature_names)
    y_std, y_mean, y_scale = _standardize_columns(
        table.y[:, None], [table.target_name], target=True
    )
    standardisation = standardisation_record(
        table.feature_names, table.target_name, x_mean, x_scale, y_mean[0], y_scale[0]
    )
    names = list(table.feature_names)
    x = torch.as_tensor(x_std, device=device)
    y = torch.as_tensor(y_std[:, 0], device=device)
    if method == "nuts":
        fit_args = dict(num_chains=num_chains, num_warmup=num_warmup, num_samples=num_samples)
    else:
        fit_args = dict(num_steps=num_steps)
    timer = _Timer()
    comparison, idata = None, None
    with results_directory(out, overwrite=overwrite, inputs=[path]) as folder:
        if len(ks) > 1:
            listed = ", ".join(str(k) for k in ks)
            with timer(f"compare k = {listed} ({method.upper()} each, PSIS-LOO)"):
                compared, fits = compare_experts(
                    x,
                    y,
                    ks,
                    link,
                    inference=method,
                    noise=noise,
                    bias=True,
                    seed=seed,
                    progress=progress,
                    feature_names=names,
                    **fit_args,
                )
            comparison = comparison_rows(compared)
            best = comparison[0]["k"]
            num_experts, idata = int(best.removeprefix("k=")), fits[best]
            write_text_atomic(
                folder / "compare_experts.csv", pd.DataFrame(comparison).to_csv(index=False)
            )
        else:
            num_experts = ks[0]
        # with a comparison this is the start compare_experts gave the best-ranked k (the same
        # call, so the same estimate): the report's start column and initializer section
        with timer("initialize (auto)"):
            estimate = initialize(x, y, num_experts, link, method="auto", noise=noise, seed=seed)
        model = MixtureOfExperts(d, num_experts, link=link, bias=True, noise=noise)
        if idata is None:
            with timer(f"{method.upper()} seeded from the estimate"):
                fit = run_nuts if method == "nuts" else fit_svi
                idata = fit(
                    model,
                    x,
                    y,
                    init=estimate,
                    seed=seed,
                    progress=progress,
                    feature_names=names,
                    **fit_args,
                )
        idata.attrs["standardisation"] = json.dumps(standardisation)
        mean = posterior_mean_estimate(idata, estimate.link)
        rows = (
            parameter_summary(idata, {"start": estimate})
            .join(data_unit_summary(idata, estimate, standardisation))
            .reset_index()
            .to_dict("records")
        )
        with timer("responsibilities"):
            responsibilities = posterior_responsibilities(model, idata, x, y)
        with timer("figures"):
            figures = {
                "trace": plots.plot_trace(idata),
                "posterior": plots.plot_posterior_vs_truth(idata, None, estimate),
                "responsibilities": plots.plot_responsibilities(
                    x.cpu(), y.cpu(), mean.to("cpu"), table.feature_names
                ),
                "posterior_predictive": plots.plot_posterior_predictive(idata),
            }
        numbers = {
            "file": str(path),
            "rows": int(table.x.shape[0]),
            "features": list(table.feature_names),
            "target": table.target_name,
            "num_experts": num_experts,
            "noise": noise,
            "comparison": comparison,
            "link": link,
            "method": method,
            "initializer": estimate.diagnostics.get("initializer", estimate.method),
            "initializer_reason": estimate.diagnostics.get("initializer_reason", ""),
            "standardisation": standardisation,
            "seconds": timer.seconds,
        }
        scaling = [*standardisation["inputs"], standardisation["target"]]
        summary = _fit_summary(numbers, estimate, idata, rows, scaling, method)
        write_text_atomic(
            folder / "standardisation.json", json.dumps(standardisation, indent=1) + "\n"
        )
        write_text_atomic(folder / "responsibilities.csv", responsibilities.to_csv(index=False))
        _write_outputs(folder, idata, figures, summary)
    return numbers


def _fit_summary(numbers, estimate, idata, rows, scaling, method) -> str:
    extra = ""
    if method == "nuts":
        chain_ll = ", ".join(f"{v:.1f}" for v in idata.attrs["chain_mean_log_likelihood"])
        divergences = int(np.asarray(idata.sample_stats["diverging"].values).sum())
        extra = (
            f"NUTS: {idata.posterior.sizes['chain']} chains x {idata.posterior.sizes['draw']} draws, "
            f"{divergences} divergences; per-chain mean log-likelihood: {chain_ll} (a chain far "
            "below the others sits in a wrong mode).\n"
        )
    else:
        extra = f"SVI: final ELBO {float(idata.attrs.get('final_elbo', float('nan'))):.2f}.\n"
    seconds_rows = [{"step": k, "seconds": v} for k, v in numbers["seconds"].items()]
    k = numbers["num_experts"]
    if k == 1:
        model_text = "1 expert (a plain regression: no gate), with an intercept"
    else:
        model_text = f"{k} experts, each with an intercept, and the gate with an offset"
    noise_text = (
        "one noise sd per expert (`--noise per_expert`: rows `noise[i]`)"
        if numbers["noise"] == "per_expert"
        else "one noise sd shared by the experts (`--noise shared`)"
    )
    comparison_file = _comparison_file_text(numbers)
    return f"""# pyromoe fit

File `{numbers["file"]}`: {numbers["rows"]} rows, target `{numbers["target"]}`, inputs
{", ".join(f"`{f}`" for f in numbers["features"])}; {model_text}; link `{numbers["link"]}`;
{noise_text}.
{_comparison_text(numbers, method)}

**Inputs and target were standardised** (z-scores: value minus mean, divided by sd, the population
sd); the model was fitted on that scale (also in `standardisation.json` and the InferenceData's
`attrs["standardisation"]`):

{markdown_table(scaling, digits=4)}
## Initializer

`pyromoe.initialize(method="auto")` ran **{numbers["initializer"]}**: {
        numbers["initializer_reason"]
    }

```
{estimate.summary()}
```

## Posterior ({method.upper()}, experts labelled as in the start)

{extra}
{_PARAMETER_COLUMNS} The columns without a suffix are on the standardised scale.

{_data_units_text(numbers["link"])}

{markdown_table(rows)}
## Time of each step

{markdown_table(seconds_rows, digits=2)}
## Files

- `inference_data.nc` (ArviZ InferenceData, the standardised data and parameters).
{comparison_file}- `standardisation.json`: the mean and sd of every input column and of the target.
- `responsibilities.csv`: one row per data row (`obs`, from 0): each expert's responsibility
  p(expert | x, y) averaged over the posterior draws (`expert_i_mean`) and its 94% HDI over the
  draws (`expert_i_hdi_low`, `expert_i_hdi_high`).
- `trace.png`, `posterior.png` (posterior mean and 94% HDI of every parameter, the start marked),
  `posterior_predictive.png`.
- `responsibilities.png`: one panel per expert, {_responsibility_panels(numbers["features"])}
  on the standardised scale, points coloured by that expert's responsibility (posterior mean
  parameters).
"""


def _comparison_text(numbers, method: str) -> str:
    """The section of `pyromoe fit --experts 1,2,...`: the PSIS-LOO table (empty for one k)."""
    rows = numbers.get("comparison")
    if not rows:
        return ""
    shown = [{key: row[key] for key in ("k", *COMPARE_COLUMNS) if key != "weight"} for row in rows]
    best = rows[0]["k"]
    return f"""
## Number of experts: PSIS-LOO comparison

`pyromoe.bayes.compare.compare_experts` fitted each number of experts ({method.upper()}, started
from `pyromoe.initialize`) and `arviz.compare` ranked them by expected log predictive density
(PSIS-LOO; elpd_diff and dse are against the best; warning: `yes` when the Pareto k diagnostic of
PSIS is unreliable for that fit). {_svi_loo_note(method)}Also in `compare_experts.csv`.

{markdown_table(shown)}
**The rest of this report is for {best} ({_experts(numbers["num_experts"])}), the best-ranked.**
"""


def _experts(k: int) -> str:
    return "1 expert" if k == 1 else f"{k} experts"


def _svi_loo_note(method: str) -> str:
    if method != "svi":
        return ""
    return "With SVI, LOO is computed on the guide's draws: an approximation. "


def _comparison_file_text(numbers) -> str:
    if not numbers.get("comparison"):
        return ""
    return (
        "- `compare_experts.csv`: the PSIS-LOO comparison of the numbers of experts, one row per "
        "k in rank order (arviz.compare's columns, with its stacking weight).\n"
    )


def _responsibility_panels(features: Sequence[str]) -> str:
    if len(features) == 1:
        return "y against the input with that expert's fit,"
    return "y against that expert's fitted value g(a_i.x + b_i),"


def _data_units_text(link: str) -> str:
    """How the "(data units)" columns of the fit's table were computed."""
    text = (
        "The columns marked (data units) are the same parameters in the units of the data: with "
        "x_std = (x - m) / s per input and y_std = (y - m_y) / s_y, the noise is s_y sigma, the "
        "gate weights are w_j / s_j and the gate offsets c - sum_j w_j m_j / s_j"
    )
    if check_link(link).is_identity:
        return (
            text + "; the expert weights are s_y a_j / s_j and the intercepts "
            "s_y (b - sum_j a_j m_j / s_j) + m_y. Each draw is mapped, so the intervals are those "
            "of the mapped draws."
        )
    return (
        text + f". With the {link} link the experts have no data-unit form "
        f"(y = s_y g(a.x_std + b) + m_y: the link sits between the two scales), so their rows "
        "show '-' there. Each draw is mapped, so the intervals are those of the mapped draws."
    )
