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
from .demo_report import console_lines, demo_summary, initialize_cost_line
from .report import Timer, parameter_table, write_outputs
from .results import results_directory
from .runs import (
    WRONG_BASIN_NATS,
    check_run_arguments,
    nuts_report,
    posterior_mean_estimate,
    relabel,
)

__all__ = [
    "StartRecord",
    "compare_starts",
    "mark_wrong_basins",
    "nuts_labels",
    "run_demo",
    "DEMO_DATA",
]


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
    records = _em_fits(x, y, num_experts, link, num_random, bias, seed, truth, progress, screen)
    tensor_record = _tensor_fit(x, y, num_experts, link, seed, truth)
    mark_wrong_basins([*records, tensor_record])
    return records, tensor_record


def _em_fits(
    x, y, num_experts, link, num, bias, seed, truth, progress, screen, label="random", branch=2
):
    """``num`` single-start ``fit_em`` fits labelled ``"{label} r"``, start ``r`` seeded by
    ``child_seed(seed, branch, r)``."""
    from tqdm.auto import tqdm

    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-converged random starts are part of the story
        for r in tqdm(range(num), desc=f"{label} EM", disable=not progress, leave=False):
            start = time.perf_counter()
            start_seed = child_seed(seed, branch, r)  # no arithmetic on the seed
            fit = fit_em(
                x, y, num_experts, link, n_init=1, bias=bias, seed=start_seed, screen=screen
            )
            seconds = time.perf_counter() - start
            records.append(_record(f"{label} {r}", fit, seconds, x, y, truth))
    return records


def _tensor_fit(x, y, num_experts, link, seed, truth) -> StartRecord:
    """``initialize(method="tensor")`` as a record; when the moment step cannot apply, the record
    says why and has no estimate."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tensor = initialize(x, y, num_experts, link, method="tensor", seed=seed)
        except ValueError as error:  # the moments cannot apply here: say so, don't crash the demo
            seconds = time.perf_counter() - start
            label = f"tensor -> EM: moment step failed ({error})"
            return StartRecord(label, float("nan"), seconds, 0, False)
    return _record("tensor -> EM", tensor, time.perf_counter() - start, x, y, truth)


def mark_wrong_basins(records: list[StartRecord]) -> None:
    """Set each record's ``wrong_basin``: its log-likelihood more than :data:`WRONG_BASIN_NATS`
    below the best of ``records`` and (with expert errors) its error over twice the best one.
    A record without an estimate (a failed tensor start) stays ``wrong_basin=False``."""
    everyone = [r for r in records if r.estimate is not None]
    best = max(r.log_likelihood for r in everyone)
    best_error = min((r.expert_error for r in everyone if r.expert_error is not None), default=None)
    for r in everyone:
        low = r.log_likelihood < best - WRONG_BASIN_NATS
        far = best_error is None or r.expert_error > 2 * best_error
        r.wrong_basin = bool(low and far)


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
        with timer("EM from plain random draws, from screened starts and from the tensor start"):
            starts = _three_kinds_of_start(x, y, num_experts, link, sizes, seed, truth, progress)
        with timer("initialize(method='auto')"):
            estimate = initialize(x, y, num_experts, link, method="auto", seed=seed)
        model = MixtureOfExperts(data_args["in_features"], num_experts, link=link, bias=True)
        runs, reports = _seeded_and_default_nuts(
            model, x, y, estimate, sizes, seed, progress, timer
        )
        seeded = next(iter(runs.values()))
        # present everything in the truth's labels
        estimate_t = estimate.permute(parameter_errors(estimate, truth)["permutation"])
        posterior = relabel(seeded, estimate_t)
        posterior.attrs["pyromoe_demo"] = "posterior relabelled to the truth's expert labels"
        rows = parameter_table(posterior, {"truth": truth, "start": estimate_t})
        with timer("figures"):
            figures = _figures(x, y, posterior, truth, estimate_t, starts, runs)
        plain, screened, tensor_record = starts.values()
        numbers = {
            "data": {**data_args, "num_experts": num_experts, "link": link, "seed": seed},
            "plain_draws_in_wrong_basin": sum(r.wrong_basin for r in plain),
            "num_plain_draws": len(plain),
            "random_starts_in_wrong_basin": sum(r.wrong_basin for r in screened),
            "num_random_starts": len(screened),
            "tensor_start_in_wrong_basin": tensor_record.wrong_basin,
            "tensor_start_expert_error": tensor_record.expert_error,
            "initializer": estimate.diagnostics.get("initializer", estimate.method),
            "nuts": reports,
            "initialize_cost": initialize_cost_line(),
            "seconds": timer.seconds,
        }
        numbers["console"] = console_lines(numbers)
        summary = demo_summary(numbers, starts, rows, estimate, reports)
        write_outputs(folder, posterior, figures, summary)
    return numbers


def _three_kinds_of_start(x, y, num_experts, link, sizes, seed, truth, progress) -> dict:
    """EM from plain random draws, from ``fit_em``'s screened starts and from the tensor start,
    each fit's wrong basin judged against the best of them all."""
    fits = dict(bias=True, seed=seed, truth=truth, progress=progress)
    num = sizes["num_random"]
    plain = _em_fits(x, y, num_experts, link, num, **fits, screen=1, label="plain draw")
    screened = _em_fits(
        x, y, num_experts, link, num, **fits, screen=SCREEN_CANDIDATES, label="screened", branch=4
    )
    tensor_record = _tensor_fit(x, y, num_experts, link, seed, truth)
    mark_wrong_basins([*plain, *screened, tensor_record])
    return {"plain": plain, "screened": screened, "tensor": tensor_record}


def _figures(x, y, posterior, truth, estimate_t, starts, runs) -> dict:
    from . import plots

    plain, screened, tensor_record = starts.values()

    def points(records):
        return [r.log_likelihood for r in records], [r.expert_error for r in records]

    mean = posterior_mean_estimate(posterior, estimate_t.link)
    return {
        "trace": plots.plot_trace(posterior),
        "posterior_vs_truth": plots.plot_posterior_vs_truth(posterior, truth, estimate_t),
        "random_starts": plots.plot_random_starts(
            {
                "plain random draw -> EM": points(plain),
                f"screened start -> EM (best of {SCREEN_CANDIDATES} short runs)": points(screened),
                "tensor start -> EM": points([tensor_record]),
            },
            WRONG_BASIN_NATS,
        ),
        "chain_log_likelihood": plots.plot_chain_log_likelihoods(runs, WRONG_BASIN_NATS),
        "responsibilities": plots.plot_responsibilities(x.cpu(), y.cpu(), mean.to("cpu")),
        "posterior_predictive": plots.plot_posterior_predictive(posterior),
    }


def _seeded_and_default_nuts(model, x, y, estimate, sizes, seed, progress, timer):
    """NUTS seeded from ``estimate`` and from Pyro's default init: the two InferenceData by label
    (seeded first, :func:`nuts_labels`) and their reports. A chain's wrong mode is judged against
    the best chain of either run."""
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
    labels = nuts_labels(estimate)
    runs = dict(zip(labels, (seeded, default)))
    reports = {label: nuts_report(run, estimate, best) for label, run in runs.items()}
    return runs, reports


def nuts_labels(estimate: MoEEstimate) -> tuple[str, str]:
    """The labels of the seeded and the default NUTS runs. The seeded one names what seeded it,
    from ``estimate.diagnostics``: the tensor start -> EM (or -> MAP EM when plain EM from it was
    refitted), a random start -> EM when one beat the tensor start in ``initialize``'s guard, or
    the multi-start EM fallback when the moment step could not apply."""
    diagnostics = estimate.diagnostics
    ran = diagnostics.get("initializer", estimate.method)
    if ran == "em":
        seeded = "seeded (EM fallback: multi-start EM)"
    elif ran != "tensor":
        seeded = f"seeded ({ran})"
    elif diagnostics.get("refine_winner", "tensor") != "tensor":
        seeded = "seeded (random start -> EM: it beat the tensor start)"
    elif estimate.method == "tensor+map":
        seeded = "seeded (tensor start -> MAP EM)"
    else:
        seeded = "seeded (tensor start -> EM)"
    return seeded, "Pyro default (init_to_uniform)"
