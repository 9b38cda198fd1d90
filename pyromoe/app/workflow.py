"""The user's path: the `pyromoe demo` and `pyromoe fit` analyses, as functions.

Each run writes a results folder atomically (:func:`pyromoe.app.io.results_directory`): the
InferenceData as NetCDF, ``summary.md`` and PNG figures. Nothing here does maths of its own: it calls
the initializers (:func:`pyromoe.estimators.initialize`, :func:`pyromoe.core.em.fit_em`), the seeded inference
wrappers (:mod:`pyromoe.bayes.fit`) and the plots (:mod:`pyromoe.app.plots`).
"""

from __future__ import annotations

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
    check_num_experts,
    check_seed,
    num_parameters,
)
from ..bayes.model import MixtureOfExperts
from ..core import sites
from ..core.em import fit_em
from ..core.estimate import MoEEstimate, parameter_errors
from ..estimators.initialize import initialize
from .io import (
    read_table,
    results_directory,
    save_figure_atomic,
    write_netcdf_atomic,
    write_text_atomic,
)
from .plots import parameter_sites, parameter_summary

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
) -> tuple[list[StartRecord], StartRecord]:
    """``num_random`` single random-start EM fits and one tensor start -> EM fit on the same data.

    If the moment step cannot apply, the tensor record says why (its ``estimate`` is None).

    A fit is in a wrong basin when its log-likelihood is more than :data:`WRONG_BASIN_NATS` below
    the best of all fits (and, with ``truth``, its expert error is also over twice the best fit's).
    """
    from tqdm.auto import tqdm

    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-converged random starts are part of the story
        for r in tqdm(range(num_random), desc="random-start EM", disable=not progress, leave=False):
            start = time.perf_counter()
            fit = fit_em(x, y, num_experts, link, n_init=1, bias=bias, seed=seed * 1000 + r)
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
    """The posterior mean of every site as an :class:`MoEEstimate` (zeros for absent bias sites)."""
    post = idata.posterior
    mean = {n: torch.as_tensor(post[n].mean(("chain", "draw")).values) for n in post.data_vars}
    k = mean[sites.EXPERTS_WEIGHT].shape[0]
    zeros = torch.zeros(k, dtype=mean[sites.EXPERTS_WEIGHT].dtype)
    return MoEEstimate(
        experts_weight=mean[sites.EXPERTS_WEIGHT],
        experts_bias=mean.get(sites.EXPERTS_BIAS, zeros),
        gate_weight=mean[sites.GATE_WEIGHT],
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
    "ess_bulk, ess_tail and r_hat); gate rows are numbered from 1 (row j gives expert j's logit)."
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
DEMO_FULL = dict(num_random=20, num_chains=4, num_warmup=250, num_samples=250)


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
    (:func:`pyromoe.app.io.results_directory`). Returns the numbers of the summary (also written to
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
    from ..bayes.fit import run_nuts
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
        with timer("NUTS seeded from the estimate"):
            seeded = run_nuts(model, x, y, init=estimate, **nuts_args)
        with timer("NUTS from Pyro's default init"):
            default = run_nuts(model, x, y, init=None, posterior_predictive=False, **nuts_args)
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


def _check_run_arguments(*, num_experts, link, seed, device, overwrite) -> None:
    """The checks shared by :func:`run_demo` and :func:`run_fit`, before any work."""
    check_num_experts(num_experts)
    check_link(link)
    check_seed(seed)
    check_device(device)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False; got {overwrite!r}")


# ----------------------------------------------------------------------------------- fit
#: Rows needed per model parameter by `pyromoe fit`.
ROWS_PER_PARAMETER = 3


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


def run_fit(
    path: str | Path,
    target: str,
    features: Sequence[str] | None = None,
    *,
    num_experts: int = 2,
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
    scale); every expert has an intercept and the gate an offset.

    ``out`` follows the rule of :func:`pyromoe.app.io.results_directory`: it may replace only earlier
    pyromoe results, only with ``overwrite=True``, and never the folder holding ``path`` (or one
    above it) nor the working folder. Every argument is checked before any work.
    """
    from ..bayes.fit import fit_svi, run_nuts
    from . import plots

    if method not in ("nuts", "svi"):
        raise ValueError(f"method must be 'nuts' or 'svi'; got {method!r}")
    _check_run_arguments(
        num_experts=num_experts, link=link, seed=seed, device=device, overwrite=overwrite
    )
    num_chains = check_count(num_chains, "num_chains", minimum=1)
    num_warmup = check_count(num_warmup, "num_warmup", minimum=0)
    num_samples = check_count(num_samples, "num_samples", minimum=4 if method == "nuts" else 1)
    num_steps = check_count(num_steps, "num_steps", minimum=1)
    table = read_table(path, target, features, min_rows=2)
    d = table.x.shape[1]
    needed = ROWS_PER_PARAMETER * num_parameters(d, num_experts)
    if table.x.shape[0] < needed:
        raise ValueError(
            f"{path} has {table.x.shape[0]} data rows; at least {needed} are needed "
            f"({ROWS_PER_PARAMETER} per parameter: {num_experts} experts on {d} inputs have "
            f"{num_parameters(d, num_experts)} parameters). Use fewer experts or features."
        )
    x_std, x_mean, x_scale = _standardize_columns(table.x, table.feature_names)
    y_std, y_mean, y_scale = _standardize_columns(
        table.y[:, None], [table.target_name], target=True
    )
    x = torch.as_tensor(x_std, device=device)
    y = torch.as_tensor(y_std[:, 0], device=device)
    timer = _Timer()
    with results_directory(out, overwrite=overwrite, inputs=[path]) as folder:
        with timer("initialize (auto)"):
            estimate = initialize(x, y, num_experts, link, method="auto", seed=seed)
        model = MixtureOfExperts(d, num_experts, link=link, bias=True)
        with timer(f"{method.upper()} seeded from the estimate"):
            if method == "nuts":
                idata = run_nuts(
                    model,
                    x,
                    y,
                    init=estimate,
                    num_chains=num_chains,
                    num_warmup=num_warmup,
                    num_samples=num_samples,
                    seed=seed,
                    progress=progress,
                )
            else:
                idata = fit_svi(
                    model, x, y, init=estimate, num_steps=num_steps, seed=seed, progress=progress
                )
        mean = posterior_mean_estimate(idata, estimate.link)
        rows = parameter_table(idata, {"start": estimate})
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
            "link": link,
            "method": method,
            "initializer": estimate.diagnostics.get("initializer", estimate.method),
            "initializer_reason": estimate.diagnostics.get("initializer_reason", ""),
            "seconds": timer.seconds,
        }
        scaling = [
            {"column": name, "mean": float(m), "sd": float(s)}
            for name, m, s in zip(
                [*table.feature_names, table.target_name], [*x_mean, *y_mean], [*x_scale, *y_scale]
            )
        ]
        summary = _fit_summary(numbers, estimate, idata, rows, scaling, method)
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
    return f"""# pyromoe fit

File `{numbers["file"]}`: {numbers["rows"]} rows, target `{numbers["target"]}`, inputs
{", ".join(f"`{f}`" for f in numbers["features"])}; {numbers["num_experts"]} experts, link
`{numbers["link"]}`, each expert with an intercept and the gate with an offset.

**Inputs and target were standardised** (z-scores: value minus mean, divided by sd); the parameters
below are on that scale:

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
{_PARAMETER_COLUMNS}

{markdown_table(rows)}
## Time of each step

{markdown_table(seconds_rows, digits=2)}
## Files

`inference_data.nc` (ArviZ InferenceData), `trace.png`, `posterior.png`, `posterior_predictive.png`,
`responsibilities.png` ({
        "y against the input"
        if len(numbers["features"]) == 1
        else "y against each expert's fitted value g(a_i.x + b_i)"
    }, coloured by responsibility).
"""
