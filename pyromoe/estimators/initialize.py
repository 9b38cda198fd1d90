"""``initialize``: a point estimate for any data (docs/algorithm.md section 4).

The tensor start of :mod:`pyromoe.estimators.tensor_init` where it applies, guarded by random-start
EM on a random subsample and a sanity check, with multi-start EM (:func:`pyromoe.fit_em`) as
the fallback (at k = 2 raced: hopeless starts stop early). On all rows the guarded path costs
the summary and moment passes plus a few Newton steps from the winning start's fit on the guard
subsample, with that subsample's curvature
(:mod:`pyromoe.core.em.newton`; EM on all rows only where they do not converge): the comparison
with random starts never takes a full-data pass, and a random start's run stops as soon as it
cannot beat the tensor start."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace

import torch

from .._validation import (
    SmallDataWarning,
    check_enough_rows,
    check_seed,
    child_seed,
    count_rule,
    keeps_feature_names,
    num_experts_rule,
    num_parameters,
    one_of,
    optional,
    user_stacklevel,
    validate,
)
from ..core.em.loop import (
    DEFAULT_TOL,
    EM,
    CollapseWarning,
    ConvergenceWarning,
    collapse_report,
    warn_collapse,
)
from ..core.em.m_step import noise_floor
from ..core.em.newton import newton_polish, subsample_hessian
from ..core.em.starts import SCREEN_ROWS, random_start, start_params
from ..core.estimate import MoEEstimate
from ..core.links import Link, link_rule
from ..core.sources import Source, TensorSource
from ..core.threads import check_num_threads, torch_threads
from ..core.units import on_exact_scale
from .em import fit_em
from .moment_setup import (
    MomentOptions,
    MomentsNotApplicableError,
    minimum_rows,
    moment_arguments,
    moment_source,
    noise_rule,
)
from .tensor_init import _tensor_init, tensor_init

__all__ = ["MomentsNotApplicableError", "guard_size", "initialize", "minimum_rows", "tensor_init"]


#: Largest gate-weight norm (per unit standard deviation of x) that `initialize` accepts as a sane
#: seed: beyond it the gate is a near step function fitted to noise (a reference saw 12.5 on a bad
#: start) and NUTS seeded there stalls in warm-up (docs/algorithm.md section 5).
MAX_SANE_GATE_NORM = 20.0

#: Prior scale of the MAP refit when plain EM drives the gate to a step function: the default
#: prior scale of the model's gate weights (pyromoe.bayes.model.DEFAULT_PRIOR_SCALES["gate.weight"]).
MAP_PRIOR_SCALE = 2.5

#: Largest k whose ``method="auto"`` fallback is raced (:func:`_raced_multistart`); beyond it
#: every start is screened and run to convergence. Measured at n = 2000, d = 5, expert cosine
#: 0.9, k = 3: random starts that would have ended in a better basin than the screened start's
#: were stopped after 9-17 iterations (EM's rate there changes, so the geometric extrapolation
#: of :func:`_cannot_win` misjudged them), and the race kept a worse basin than five screened
#: starts on 2 of 50 data sets; at k = 2 (cosine 0.8 and 0.95) it reached their optimum on every
#: data set (84 data sets where the moment step refused, n = 2000).
RACED_FALLBACK_MAX_EXPERTS = 2

#: Random-start EM fits that method="auto" runs beside the tensor start, on the guard subsample.
AUTO_RANDOM_STARTS = 3

#: Random-start EM runs raced against the screened start in the k = 2 fallback (at most
#: ``n_init - 1``). The screened start is already the best of
#: :data:`~pyromoe.core.em.starts.SCREEN_CANDIDATES` draws, and it won every race of the 84 data
#: sets above; each raced run (stopped after 13-23 iterations at n = 2000) cost about a fifth of
#: the screened start, so three took the fallback to 1.4-1.9x one start on data of the benchmark's
#: kind, one to about 1.2x.
RACED_FALLBACK_RANDOM_STARTS = 1

#: Rows of the random subsample on which method="auto" compares the tensor start with random
#: starts: at most this many (all rows when n is smaller; see :func:`guard_size`).
GUARD_ROWS = 20_000

#: Above ``guard_rows``, the guard's subsample is this fraction of n (at least
#: :data:`GUARD_MIN_ROWS`): its four EM fits then cost a fixed fraction of one full-data fit.
GUARD_FRACTION = 0.05
GUARD_MIN_ROWS = 5_000


def guard_size(num_rows: int, guard_rows: int = GUARD_ROWS) -> int:
    """Rows of ``initialize``'s guard subsample for n = ``num_rows``.

    All rows up to ``guard_rows``; beyond, ``GUARD_FRACTION`` of n, at least
    ``min(guard_rows, GUARD_MIN_ROWS)`` and at most ``guard_rows``. Measured (d = 50, n = 1e5, one
    thread): with a 20,000-row guard the guard's four EM fits cost more than one random-start EM on
    all rows; with 5,000 rows, a third of it, and the tensor start still won.

    Examples
    --------
    >>> [guard_size(n) for n in (10_000, 100_000, 200_000, 10_000_000)]
    [10000, 5000, 10000, 20000]
    """
    if num_rows <= guard_rows:
        return num_rows
    floor = min(guard_rows, GUARD_MIN_ROWS)
    return max(floor, min(guard_rows, int(GUARD_FRACTION * num_rows)))


def _sanity_problem(estimate: MoEEstimate, source: Source) -> str | None:
    """Why ``estimate`` is not a sane seed, or None."""
    values = [
        estimate.experts_weight,
        estimate.experts_bias,
        estimate.gate_weight,
        estimate.gate_bias,
        estimate.noise,
    ]
    if not all(bool(torch.isfinite(v).all()) for v in values):
        return "it has non-finite parameters"
    scale = source.summary().x_sd.to(estimate.gate_weight).clamp_min(1e-12)
    scale = scale[scale.shape[0] - estimate.gate_features :]  # the gate's columns
    gate_norm = float((estimate.gate_weight * scale).norm(dim=-1).max())
    if gate_norm > MAX_SANE_GATE_NORM:
        return (
            f"its gate weights are huge (norm {gate_norm:.3g} per sd of x, over "
            f"{MAX_SANE_GATE_NORM:g}): a near step-function gate"
        )
    if not bool((estimate.noise > 0).all()):
        return "its noise is not positive"
    return None


@dataclass(frozen=True)
class _Choice:
    """What :func:`initialize` was asked to choose between (checked)."""

    method: str
    n_init: int
    guard_rows: int


#: how :func:`initialize` checks its arguments, once per call (:func:`pyromoe._validation.validate`)
INITIALIZE_RULES = {
    "method": one_of("auto", "tensor", "em"),
    "num_experts": num_experts_rule(minimum=1),
    "link": link_rule,
    "noise": noise_rule,
    "chunk_size": optional(count_rule(minimum=1)),
    "seed": check_seed,
    "n_init": count_rule(minimum=1),
    "guard_rows": count_rule(minimum=1),
    "num_threads": check_num_threads,
}


@keeps_feature_names
@validate(INITIALIZE_RULES)
def initialize(
    x,
    y,
    num_experts: int = 2,
    link: str | Link = "linear",
    method: str = "auto",
    *,
    z=None,
    gate_features: int | None = None,
    moment_columns=None,
    n_init: int = 5,
    noise: float | str | None = None,
    chunk_size: int | None = None,
    seed: int = 0,
    guard_rows: int = GUARD_ROWS,
    device=None,
    num_threads: int | None = None,
) -> MoEEstimate:
    """A point estimate for any data: the tensor start where it applies, multi-start EM elsewhere.

    Parameters
    ----------
    x : Tensor, ndarray, numpy memmap or dask.array.Array (n, d)
        Memory maps and Dask arrays are read in chunks, never whole
        (:func:`pyromoe.core.sources.as_source`).
    y : the same kinds (n,)
    num_experts : int
        ``k >= 1`` (one expert: a plain regression by EM, the baseline of a comparison).
    link : str or Link
    method : {"auto", "tensor", "em"}
        ``"tensor"``: :func:`tensor_init` followed by joint EM (``refine=True``, no random starts);
        errors where the moments cannot apply (``k > d``, too few rows, T2 rank below k).
        ``"em"``: joint EM from ``n_init`` random starts, best log-likelihood wins.
        ``"auto"``: when ``k <= d`` and the moment step (on all rows) succeeds, a guard on a random
        subsample of :data:`~pyromoe.core.em.starts.SCREEN_ROWS` rows: the gate is fitted there
        and EM from the tensor start is compared with :data:`AUTO_RANDOM_STARTS` random-start EM
        runs by mean log-likelihood (a seed in the wrong place is worse than none; random starts
        must win by :data:`GUARD_MARGIN` nats per row, and each stops once it cannot beat the
        best so far; the gate there is fitted only to :data:`GUARD_GATE_GAIN_PER_ROW`); EM then runs
        from the winner only, on the guard subsample (:func:`guard_size`), and on all rows Newton
        steps with the guard subsample's Hessian follow (EM after them only if they did not
        converge: ``diagnostics["newton_passes"]``, ``["newton_stopped"]``); a
        sanity check follows (finite parameters, gate weights below :data:`MAX_SANE_GATE_NORM`
        per sd of x). Otherwise multi-start EM, for k = 2 raced: on a random subsample of
        :data:`~pyromoe.core.em.starts.SCREEN_ROWS` rows (all rows when n is smaller) one screened
        start (:func:`pyromoe.fit_em`'s default start) runs to convergence and
        ``min(n_init - 1, RACED_FALLBACK_RANDOM_STARTS)`` random-start EM run(s) are each stopped
        once they cannot beat it by :data:`GUARD_MARGIN`
        nats per row; EM on all rows follows from the winner (``diagnostics["fallback_race_*"]``;
        for k > :data:`RACED_FALLBACK_MAX_EXPERTS` every start is screened and run to
        convergence, as for ``method="em"``).
    n_init : int
        Random starts of the EM fallback: for ``method="em"`` each screened and run to
        convergence on all rows (:func:`pyromoe.fit_em`), for ``"auto"`` at k = 2 raced as
        above.
    noise : float, "shared" or "per_expert", optional
        A known noise standard deviation for the moment step, or the noise model of the EM fits:
        ``"per_expert"`` fits one sd per expert (the moment step still assumes a shared one).
    chunk_size : int, optional
        Rows per chunk of every pass over the data (moments, every EM fit, the scores); default
        :func:`pyromoe.core.chunks.default_chunk_size` (about 4 MiB of float64 rows).
    seed : int or None
        ``None`` draws a fresh seed; the one used is ``diagnostics["seed"]``.
    guard_rows : int
        Largest guard subsample (``method="auto"``): all rows when n is at most this, else 5% of
        n within ``[min(guard_rows, 5000), guard_rows]`` (:func:`guard_size`).
    device, num_threads
        As in :func:`pyromoe.fit_em`.

    Returns
    -------
    MoEEstimate
        With ``diagnostics["initializer"]`` (``"tensor"``: the moment start ran, with EM after it;
        ``"em"``: multi-start EM only), ``diagnostics["initializer_reason"]`` (why, and for
        ``"auto"`` which start won: ``diagnostics["refine_winner"]``, with the subsample's
        ``refine_log_likelihoods`` on the screening rows, ``guard_rows``, ``guard_screen_rows``,
        ``guard_seconds`` and ``time_split``: the seconds of the summary pass, the moment passes,
        gate EM, each guard fit and the final EM), and the diagnostics of the method that ran
        (shown by ``summary()``).

    Raises
    ------
    ValueError, TypeError
        Any invalid argument, checked before any work (``method="auto"`` falls back to EM only
        on :class:`MomentsNotApplicableError`, never on a bad argument); fewer rows than the
        model's free parameters + 1, or ``k > n``; for ``method="tensor"`` the errors of
        :func:`tensor_init`.

    Warns
    -----
    UserWarning
        Under :data:`pyromoe._validation.ROWS_PER_PARAMETER_WARN` rows per free parameter.
    CollapseWarning
        When the returned fit has an expert holding fewer than ``d + 1`` effective rows.

    Examples
    --------
    >>> from pyromoe import simulate
    >>> data = simulate(500, 1, num_experts=2, seed=0)
    >>> initialize(data.x, data.y, 2).diagnostics["initializer"]
    'em'
    """
    layout = dict(z=z, gate_features=gate_features, moment_columns=moment_columns)
    source, noise, options = moment_arguments(
        x, y, num_experts, noise, chunk_size, seed, device, layout=layout
    )
    choice = _Choice(method=method, n_init=n_init, guard_rows=guard_rows)
    with torch_threads(num_threads):
        began = time.perf_counter()
        source.summary(options.chunk_size)  # out-of-core data: the NaN check is this first pass
        summary_seconds = time.perf_counter() - began
        estimate = _initialize(source, link, noise=noise, options=options, choice=choice)
    split = estimate.diagnostics.get("time_split")
    if split is not None:  # the guarded tensor start ran: its split, with the summary pass
        total = time.perf_counter() - began
        estimate.diagnostics["time_split"] = {"summary": summary_seconds, **split, "total": total}
    return estimate


@on_exact_scale("estimate", noise="noise")
def _initialize(
    source: Source, link: Link, *, noise: float | None, options: MomentOptions, choice: _Choice
) -> MoEEstimate:
    """:func:`initialize` on checked arguments."""
    n, d = source.shape
    k = options.num_experts
    d_gate = d if options.gate_features is None else options.gate_features
    d -= options.gate_features or 0  # the experts' inputs
    covariates = "" if options.gate_features is None else f", a gate on {d_gate} covariate(s)"
    check_enough_rows(
        n,
        num_parameters(d, k) + (k - 1) * (d_gate - d),
        k,
        model=f"a mixture of {k} experts on {d} input(s){covariates} with biases",
        stacklevel=user_stacklevel(1),
    )
    with warnings.catch_warnings():
        # the rows were checked (and warned about) once, here; collapse is reported for the
        # returned fit only
        warnings.simplefilter("ignore", SmallDataWarning)
        warnings.simplefilter("ignore", CollapseWarning)
        estimate = _choose(source, link, noise, options, choice)
    diagnostics = estimate.diagnostics
    warn_collapse(
        diagnostics.get("collapsed_experts", []),
        diagnostics.get("effective_rows", []),
        d,
        stacklevel=user_stacklevel(1),
    )
    return estimate


def _labelled(estimate: MoEEstimate, initializer: str, reason: str, seed: int) -> MoEEstimate:
    """``estimate`` with ``diagnostics["initializer"]``, its reason and the seed first."""
    diagnostics = {"initializer": initializer, "initializer_reason": reason, "seed": seed}
    diagnostics.update(estimate.diagnostics)
    return replace(estimate, diagnostics=diagnostics)


def _multistart(
    source, link, options: MomentOptions, n_init: int, reason: str, raced: bool = False
) -> MoEEstimate:
    """Multi-start EM, the fallback of :func:`initialize`, labelled with why it ran: every start
    screened and run to convergence on all rows (``method="em"``, and ``"auto"`` beyond
    :data:`RACED_FALLBACK_MAX_EXPERTS` experts), or, ``raced``, the lean race of
    :func:`_raced_multistart` (``method="auto"``)."""
    if raced and options.num_experts <= RACED_FALLBACK_MAX_EXPERTS:
        fit, reason = _raced_multistart(source, link, options, n_init, reason)
    else:
        fit = fit_em.unchecked(
            source,
            None,
            options.num_experts,
            link,
            n_init=n_init,
            seed=options.seed,
            noise=options.noise_model,
            chunk_size=options.chunk_size,
            **options.layout,
        )
        reason = (
            f"{reason}; multi-start EM with n_init={n_init}, best "
            f"log-likelihood of start {fit.diagnostics.get('best_start')} kept"
        )
    problem = _sanity_problem(fit, source) if options.num_experts > 1 else None
    if problem is not None:
        # the likelihood's own optimum can be a step-function gate (a split that separates the
        # data): no sane seed for NUTS or SVI. The MAP refit keeps the gate moderate, as the
        # model's prior does.
        refit = _map_em(source, link, options, fit)
        diagnostics = {**fit.diagnostics, **refit.diagnostics, "em_problem": problem}
        fit = replace(refit, method="em+map", diagnostics=diagnostics)
        reason = (
            f"{reason}; that estimate was not a sane seed ({problem}), so it was refitted as "
            f"MAP EM with a Normal(0, {MAP_PRIOR_SCALE:g}^2) prior on weights and biases (the "
            "model's default gate prior)"
        )
    return _labelled(fit, "em", reason, options.seed)


def _choose(source, link, noise, options: MomentOptions, choice: _Choice) -> MoEEstimate:
    """The start for :func:`initialize` (``choice.method`` on checked, ordinary-scale data)."""
    k, method = options.num_experts, choice.method
    if options.moment_columns == () and method == "auto":
        reason = "the experts have no continuous input for the moment step (moment_columns)"
        return _multistart(source, link, options, choice.n_init, reason, raced=True)
    d = moment_source(source, options).in_features if options.moment_columns != () else 0
    if method == "em":
        return _multistart(source, link, options, choice.n_init, "method='em' was asked for")
    if k == 1 and method == "auto":
        reason = "one expert is a plain regression (no mixture for the moments to split)"
        return _multistart(source, link, options, choice.n_init, reason, raced=True)
    if method == "tensor":
        estimate = _tensor_init(
            source, link, noise=noise, options=options, refine=True, random_starts=0
        )
        return _labelled(estimate, "tensor", "method='tensor' was asked for", options.seed)
    if k > d:
        inputs = "input(s)" if options.moment_columns is None else "continuous input(s)"
        reason = (
            f"the moment start needs num_experts <= its inputs, got {k} experts and {d} "
            f"{inputs} (T2 has rank at most d)"
        )
        return _multistart(source, link, options, choice.n_init, reason, raced=True)
    try:
        estimate, moment = _guarded(source, link, noise, options, choice.guard_rows)
    except MomentsNotApplicableError as error:
        reason = f"the moment start could not apply ({error})"
        return _multistart(source, link, options, choice.n_init, reason, raced=True)
    problem = _sanity_problem(estimate, source)
    if problem is not None:
        return _map_refit(source, link, options, choice, moment, problem)
    diagnostics = estimate.diagnostics
    winner = diagnostics["refine_winner"]
    rows = diagnostics["guard_screen_rows"]
    where = "all rows" if rows == source.num_rows else f"a random subsample of {rows} rows"
    reason = (
        f"k <= d and the moment step succeeded; tensor start -> EM checked against "
        f"{AUTO_RANDOM_STARTS} random-start EM runs on {where}: the {winner} start had the best "
        "log-likelihood there, and EM on all rows ran from it"
    )
    return _labelled(estimate, "tensor", reason, options.seed)


def _map_em(source, link, options: MomentOptions, start: MoEEstimate) -> MoEEstimate:
    """MAP EM from ``start`` with the model's default gate prior scale on every weight and bias:
    what keeps a step-function gate moderate, as the Bayesian model will."""
    return fit_em.unchecked(
        source,
        None,
        options.num_experts,
        link,
        init=start,
        prior_scale=MAP_PRIOR_SCALE,
        seed=options.seed,
        noise=options.noise_model,
        chunk_size=options.chunk_size,
        **options.layout,
    )


def _map_refit(source, link, options, choice, moment: MoEEstimate, problem: str) -> MoEEstimate:
    """The moment start refitted as MAP EM when plain EM from it was no sane seed.

    Typically the likelihood pushes the gate to a step function (a split that separates the
    data). Refit from the moment estimate as MAP with the model's default gate prior scale, which
    keeps the gate moderate, as the Bayesian model will.
    """
    estimate = _map_em(source, link, options, moment)
    if _sanity_problem(estimate, source) is not None:
        reason = f"the tensor start -> EM estimate is not a sane seed: {problem}"
        return _multistart(source, link, options, choice.n_init, reason, raced=True)
    diagnostics = dict(moment.diagnostics)
    diagnostics.update(estimate.diagnostics)
    estimate = replace(estimate, method="tensor+map", diagnostics=diagnostics)
    return _labelled(
        estimate,
        "tensor",
        f"k <= d and the moment step succeeded, but plain EM from it was not a sane seed "
        f"({problem}); refitted from the moment estimate as MAP EM with a Normal(0, "
        f"{MAP_PRIOR_SCALE:g}^2) prior on weights and biases (the model's default gate prior)",
        options.seed,
    )


#: Mean log-likelihood per row by which a random start must beat the tensor start in the guard
#: (5 nats on its 5,000 rows): a better basin, not two runs to one optimum differing in the last
#: digits. The larger it is, the sooner a random run heading for the same optimum is stopped.
GUARD_MARGIN = 1e-3

#: Nats per row the guard's gate EM (the experts fixed at the moment estimate) may stop short of
#: its optimum, extrapolated: joint EM from there on the same rows finishes the gate with the
#: experts. Run to tensor_init's 0.01 nats in all, a start whose moment experts were poor spent
#: as long on the gate (over 100 iterations at n = 2000) as a screened EM start on everything.
GUARD_GATE_GAIN_PER_ROW = 1e-4

#: The guard's stop rule (:func:`_cannot_win`) waits this many iterations of a random start, and
#: extrapolates only a run converging faster than this rate per iteration.
STOP_MIN_ITER = 5
STOP_MAX_RATE = 0.95


def _cannot_win(target: float):
    """The guard's ``stop`` rule for a random start's EM run (:meth:`EM.fit`): True once the run,
    extrapolated to its limit, cannot beat ``target`` by :data:`GUARD_MARGIN`.

    EM converges linearly near an optimum: increments shrink by a rate ``r`` per iteration, so
    the run has at most ``delta r / (1 - r)`` left to gain; twice that bound is used. Runs still
    speeding up, or slower than :data:`STOP_MAX_RATE` (a plateau, e.g. near a saddle), go on.
    """

    def stop(trace: list[float]) -> bool:
        if len(trace) <= STOP_MIN_ITER:
            return False
        last, before = trace[-1] - trace[-2], trace[-2] - trace[-3]
        if last < 0 or before <= 0 or last / before >= STOP_MAX_RATE:
            return False
        rate = last / before
        return trace[-1] + 2.0 * last * rate / (1.0 - rate) < target + GUARD_MARGIN

    return stop


def _random_runs(
    source, rows: Source, link, options: MomentOptions, target: float, count=AUTO_RANDOM_STARTS
):
    """EM on ``rows`` from ``count`` random draws in turn, each stopped once it cannot beat the
    best so far (:func:`_cannot_win`): ``target`` or, for k <= :data:`RACED_FALLBACK_MAX_EXPERTS`,
    a better run before it that was not stopped (a run that beats the rival makes the next ones
    race it, so when the rival is in a worse basin only the first run to a better one runs to
    convergence; at k = 3 the stop rule misjudged random runs raced against one another, so
    there they race ``target`` only). The runs and the index of the best."""
    k = options.num_experts
    generator = torch.Generator().manual_seed(child_seed(options.seed, 1))
    like = torch.empty(0, dtype=source.dtype, device=source.device)
    per_expert = options.noise_model == "per_expert"
    starts = [
        start_params(
            random_start(source, None, k, link, generator, gate_features=options.gate_features),
            like,
            True,
            per_expert,
        )
        for _ in range(count)
    ]
    em = EM(rows, link, chunk_size=options.chunk_size)
    runs = []
    with warnings.catch_warnings():
        # the guard's fits are not the answer: only the final fit may warn
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", CollapseWarning)
        for start in starts:
            (run,), _ = em.fit([start], stop=_cannot_win(target))
            runs.append(run)
            if k <= RACED_FALLBACK_MAX_EXPERTS and not run.stopped:
                target = max(target, run.objective)
    return runs, max(range(len(runs)), key=lambda i: runs[i].objective)


def _raced_multistart(source, link, options: MomentOptions, n_init: int, reason: str):
    """The fallback of ``method="auto"`` at k = 2: one screened start and up to
    :data:`RACED_FALLBACK_RANDOM_STARTS` random ones, hopeless ones stopped early.

    On a random subsample of :data:`SCREEN_ROWS` rows (all rows when n is smaller): EM to
    convergence from one screened start (the best of
    :data:`~pyromoe.core.em.starts.SCREEN_CANDIDATES` draws, :func:`pyromoe.fit_em`'s default
    start), then ``min(n_init - 1, RACED_FALLBACK_RANDOM_STARTS)`` random-start EM run(s)
    raced against it, each stopped as soon as it cannot beat the best so far by
    :data:`GUARD_MARGIN` nats per row (:func:`_cannot_win`); EM on all rows
    from the winner (none when the subsample is all rows and the screened start won). Every
    start of ``method="em"`` is screened and run to convergence on all rows instead: at n = 2000
    that is five times one start, where the race costs little more than one (its runs that
    cannot win stop after a few iterations). Returns (the fit, ``reason`` with what ran).
    """
    k, seed = options.num_experts, options.seed
    em_options = dict(noise=options.noise_model, chunk_size=options.chunk_size, **options.layout)
    screen = _subsample(source, SCREEN_ROWS, child_seed(seed, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        first = fit_em.unchecked(screen, None, k, link, n_init=1, seed=seed, **em_options)
    target = first.diagnostics["log_likelihood_per_start"][0]
    runs, best = [], None
    if n_init > 1:
        count = min(n_init - 1, RACED_FALLBACK_RANDOM_STARTS)
        runs, best = _random_runs(source, screen, link, options, target, count=count)
    won = best is not None and runs[best].objective > target + GUARD_MARGIN
    fit = _run_estimate(runs[best], link, options) if won else first
    refit = won or screen.num_rows < source.num_rows  # the winner is not converged on all rows
    if refit:
        fit = fit_em.unchecked(source, None, k, link, init=fit, seed=seed, **em_options)
    winner = "a raced random start" if won else "the screened start"
    where = "all rows" if screen.num_rows == source.num_rows else f"{screen.num_rows} random rows"
    race = (
        f"{reason}; multi-start EM raced on {where}: one screened start run to convergence, "
        f"{len(runs)} random start(s) each stopped once it could not beat it by "
        f"{GUARD_MARGIN:g} per row; {winner} won"
    )
    if refit:
        race += ", and EM on all rows ran from it"
    diagnostics = dict(fit.diagnostics)
    diagnostics.update(
        {
            "fallback_race_rows": screen.num_rows,
            "fallback_race_winner": "random" if won else "screened",
            "fallback_race_log_likelihoods": [target] + [run.objective for run in runs],
            "fallback_race_n_iter": [first.diagnostics["n_iter"]] + [r.n_iter for r in runs],
            "fallback_race_stopped": [False] + [run.stopped for run in runs],
        }
    )
    return replace(fit, diagnostics=diagnostics), race


def _subsample(source: Source, rows: int, seed: int) -> Source:
    """A random subsample of ``rows`` rows of ``source`` (``source`` itself when it has no more)."""
    if rows >= source.num_rows:
        return source
    generator = torch.Generator().manual_seed(int(seed))
    return TensorSource(*source.subsample(rows, generator))


def _guarded(source, link, noise, options: MomentOptions, guard_rows: int):
    """The guarded tensor start of ``method="auto"``: (the estimate, the moment estimate).

    The moment step reads all rows (two passes). On a random subsample of :data:`SCREEN_ROWS`
    rows the gate is fitted with the moment experts fixed (to :data:`GUARD_GATE_GAIN_PER_ROW`
    nats per row), then joint EM runs from that start, and :data:`AUTO_RANDOM_STARTS`
    random-start EM runs there are each stopped as soon as they cannot beat it or a better run
    before them (:func:`_random_runs`). EM then runs from the winner only, on the guard's
    subsample of ``guard_size(n, guard_rows)`` rows; on all rows Newton steps with that
    subsample's Hessian scaled to n (:func:`pyromoe.core.em.newton.newton_polish`) take it to the
    optimum in three or four passes where EM takes about ten, and EM on all rows runs from
    there only when they did not converge; the seconds of each step are
    ``diagnostics["time_split"]``.
    """
    began = time.perf_counter()
    k, seed = options.num_experts, options.seed
    em_options = dict(noise=options.noise_model, chunk_size=options.chunk_size, **options.layout)
    guard = _subsample(source, guard_size(source.num_rows, guard_rows), seed)
    screen = _subsample(guard, SCREEN_ROWS, child_seed(seed, 2))
    # the moment estimate keeps the moment step's one shared sd (EM expands it per expert)
    # joint EM follows on the same rows, so its gate EM stops GUARD_GATE_GAIN_PER_ROW short
    shared = replace(
        options, noise_model="shared", gate_gain_tol=GUARD_GATE_GAIN_PER_ROW * screen.num_rows
    )
    moment = _tensor_init(source, link, noise=noise, options=shared, gate_source=screen)
    clock = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        tensor = fit_em.unchecked(screen, None, k, link, init=moment, seed=seed, **em_options)
    tensor_seconds = time.perf_counter() - clock
    scores = {"tensor": tensor.diagnostics["log_likelihood_per_start"][0]}
    clock = time.perf_counter()
    runs, best = _random_runs(source, screen, link, options, scores["tensor"])
    random_seconds = time.perf_counter() - clock
    scores["random"] = runs[best].objective
    # random starts must beat the tensor start by a real margin (GUARD_MARGIN nats per row): two
    # runs converging to the same optimum differ in the last digits and that is not a "win"
    winner = "random" if scores["random"] > scores["tensor"] + GUARD_MARGIN else "tensor"
    guard_seconds = time.perf_counter() - began
    # the winner's fit and the rows it was fitted on (a random run is refitted: fit_em's report)
    final, fitted = tensor, screen.num_rows
    if winner == "random":
        final, fitted = _run_estimate(runs[best], link, options), 0
    stages, polish, polished = {}, None, False
    clock = time.perf_counter()
    if guard.num_rows > fitted:
        final = fit_em.unchecked(guard, None, k, link, init=final, seed=seed, **em_options)
        fitted = guard.num_rows
    stages["guard_em"] = time.perf_counter() - clock
    if source.num_rows > fitted:
        # Newton steps on all rows with the guard subsample's curvature: three or four passes
        # where EM from the subsample's optimum takes about ten; EM on all rows only when they
        # did not converge (or left the noise below EM's floor)
        clock = time.perf_counter()
        polish, final = _newton_polish(source, guard, final, link, options)
        polished = _polished_enough(polish, source)
        stages["newton"] = time.perf_counter() - clock
    stages["final_em"] = 0.0  # no EM on all rows: they are the guard's, or the polish converged
    if source.num_rows > fitted and not polished:
        clock = time.perf_counter()
        final = fit_em.unchecked(source, None, k, link, init=final, seed=seed, **em_options)
        stages["final_em"] = time.perf_counter() - clock
    diagnostics = dict(moment.diagnostics)
    em = final.diagnostics
    if polished:  # the polish converged on all rows: its own report
        effective, collapsed = collapse_report(
            polish.responsibility,
            polish.params.noise,
            noise_floor(source),
            polish.params.in_features,
        )
        em = {
            "converged": True,
            "n_iter": len(polish.trace) - 1,
            "passes_per_start": [polish.passes],
            "seconds_per_start": [stages["newton"]],
            "effective_rows": effective,
            "collapsed_experts": collapsed,
        }
    split = {
        "moments": diagnostics["moment_seconds"],
        "gate_em": diagnostics["gate_seconds"],
        "guard_tensor_em": tensor_seconds,
        "guard_random_em": [run.seconds for run in runs],
        **stages,
    }
    diagnostics.update(
        {
            "refined": True,
            "refine_winner": winner,
            "refine_log_likelihoods": scores,
            "guard_rows": guard.num_rows,
            "guard_screen_rows": screen.num_rows,
            "guard_seconds": guard_seconds,
            "guard_random_seconds": random_seconds,
            "guard_random_n_iter": [run.n_iter for run in runs],
            "guard_random_stopped": [run.stopped for run in runs],
            "time_split": split,
            "refine_converged": em.get("converged"),
            "refine_n_iter": em.get("n_iter"),
            "refine_passes": em.get("passes_per_start", [None])[0],
            "refine_seconds": sum(em.get("seconds_per_start", [0.0])),
            "newton_passes": None if polish is None else polish.passes,
            "newton_stopped": None if polish is None else polish.stopped,
            "moment_estimate_experts_weight": moment.experts_weight.tolist(),
            "effective_rows": em["effective_rows"],
            "collapsed_experts": em["collapsed_experts"],
        }
    )
    method = "tensor+em" if winner == "tensor" else "em"
    return replace(final, method=method, diagnostics=diagnostics), moment


def _newton_polish(source: Source, guard: Source, estimate, link: Link, options: MomentOptions):
    """:func:`pyromoe.core.em.newton.newton_polish` of ``estimate`` (fitted on the ``guard``
    subsample) on all rows of ``source``, with the Hessian of the guard's log-likelihood:
    (what it did, the estimate it ends at)."""
    like = torch.empty(0, dtype=source.dtype, device=source.device)
    per_expert = options.noise_model == "per_expert"
    params = start_params(estimate, like, True, per_expert)
    x, y = guard.tensors()
    hessian = subsample_hessian(x, y, params, link)
    polish = newton_polish(
        source,
        params,
        link,
        hessian,
        guard.num_rows,
        tol=DEFAULT_TOL,
        chunk_size=options.chunk_size,
    )
    k = options.num_experts
    params = polish.params._replace(noise=polish.params.noise.reshape((k,) if per_expert else ()))
    return polish, MoEEstimate.from_params(params, link, method="newton")


def _polished_enough(polish, source: Source) -> bool:
    """Whether the polish is the answer: converged, finite, the noise at or above EM's floor."""
    params = [t for t in polish.params if t is not None]
    return (
        polish.stopped == "converged"
        and all(bool(torch.isfinite(t).all()) for t in params)
        and float(polish.params.noise.min()) >= noise_floor(source)
    )


def _run_estimate(run, link: Link, options: MomentOptions) -> MoEEstimate:
    """An EM run's parameters as an estimate (the noise shaped by the fit's noise model)."""
    k = options.num_experts
    per_expert = options.noise_model == "per_expert"
    params = run.params._replace(noise=run.params.noise.reshape((k,) if per_expert else ()))
    return MoEEstimate.from_params(params, link, method="em")
