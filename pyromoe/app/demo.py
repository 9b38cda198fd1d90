"""The `pyromoe demo` analysis: similar experts simulated, random-start EM against the tensor start,
NUTS seeded from the estimate against Pyro's default init, written to a results folder."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._validation import child_seed
from ..bayes.model import MixtureOfExperts
from ..core.em.starts import SCREEN_CANDIDATES
from ..core.estimate import MoEEstimate, parameter_errors
from ..estimators.em import fit_em
from ..estimators.initialize import initialize
from .report import Timer, demo_summary, parameter_table, write_outputs
from .results import results_directory
from .runs import (
    WRONG_BASIN_NATS,
    check_run_arguments,
    nuts_report,
    posterior_mean_estimate,
    relabel,
)

__all__ = ["StartRecord", "compare_starts", "run_demo", "DEMO_DATA"]


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
    from ..bayes.nuts import run_nuts

    model, x, y, kwargs = job
    torch.set_num_threads(1)
    return run_nuts(model, x, y, **kwargs)


def _run_nuts_jobs(model, x, y, jobs: list[dict], parallel: bool) -> list:
    """``run_nuts(model, x, y, **job)`` for each job: in that many spawned processes at once when
    ``parallel`` (their progress bars off), else one after the other. Pyro runs the chains of one
    call in processes only when there are more CPUs than chains, so on a small machine the two
    independent runs are what can share the cores. The pool is terminated on any error or
    interrupt, so no worker outlives the call."""
    from ..bayes.nuts import run_nuts

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
    check_run_arguments(
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
    timer = Timer()
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
        reports, seeded = _seeded_and_default_nuts(
            model, x, y, estimate, sizes, seed, progress, timer
        )
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
        summary = demo_summary(numbers, random_records, tensor_record, rows, estimate, reports)
        write_outputs(folder, posterior, figures, summary)
    return numbers


def _seeded_and_default_nuts(model, x, y, estimate, sizes, seed, progress, timer):
    """NUTS seeded from ``estimate`` and from Pyro's default init; their reports, and the seeded
    InferenceData. A chain's wrong mode is judged against the best chain of either run."""
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
    how = "two processes at once" if parallel else "one after the other"
    with timer(f"NUTS seeded and from Pyro's default init ({how})"):
        seeded, default = _run_nuts_jobs(model, x, y, jobs, parallel)
    best = max(
        max(seeded.attrs["chain_mean_log_likelihood"]),
        max(default.attrs["chain_mean_log_likelihood"]),
    )
    ran = estimate.diagnostics.get("initializer", estimate.method)
    seeded_label = (
        "seeded (tensor start -> EM)" if ran == "tensor" else f"seeded ({ran}: multi-start EM)"
    )
    reports = {
        seeded_label: nuts_report(seeded, estimate, best),
        "Pyro default (init_to_uniform)": nuts_report(default, estimate, best),
    }
    return reports, seeded
