"""``tensor_init``: experts from tensor moments, then the gate by EM (docs/algorithm.md sections 2-4).

Where the estimate is consistent (the moment step is exact in the population):

- odd links (linear, tanh, sigmoid after centring ``y - 1/2``) with k = 2, any gate, no biases;
- relu / leaky_relu with k = 2 only when the gate is orthogonal to the experts AND the experts have
  equal norms (otherwise the estimate is biased; a ``UserWarning`` says when the fit looks far from
  that);
- linear with k > 2 only when the gate is orthogonal to the experts and the norms are equal.

Everywhere else, and whenever ``x`` is far from Gaussian (the score functions are those of a
Gaussian; standardising ``x`` fixes its mean and covariance only), the estimate is a starting point
for the likelihood (``refine=True``), not an answer. :func:`pyromoe.estimators.initialize.initialize`
chooses between this start and multi-start EM.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace

import torch

from .._validation import (
    SmallDataWarning,
    check_flag,
    check_seed,
    child_seed,
    count_rule,
    keeps_feature_names,
    num_experts_rule,
    optional,
    user_stacklevel,
    validate,
)
from ..core.em.loop import CollapseWarning, ConvergenceWarning, warn_collapse
from ..core.em.statistics import mean_log_likelihood
from ..core.estimate import MoEEstimate
from ..core.links import Link, link_rule
from ..core.params import Params
from ..core.sources import Source
from ..core.tensor import scale_statistics
from ..core.threads import check_num_threads, torch_threads
from ..core.units import on_exact_scale
from .em import fit_em
from .gate import fit_gate
from .moment_setup import (
    MomentOptions,
    MomentsNotApplicableError,
    check_moments_apply,
    minimum_rows,
    moment_arguments,
    moment_source,
    noise_rule,
)
from .moment_step import moment_experts

__all__ = [
    "GATE_WARM_START_ROWS",
    "MomentOptions",
    "MomentsNotApplicableError",
    "minimum_rows",
    "tensor_init",
]

#: Cosine (in the metric of x's covariance) between a gate row and an expert above which the
#: assumptions of relu/leaky and k > 2 look violated.
COSINE_WARNING = 0.3
#: Ratio of the largest to the smallest expert norm above which relu/leaky look unequal.
NORM_RATIO_WARNING = 1.25
#: Mean log-likelihood per row by which random-start EM must beat the refined tensor start to win.
RANDOM_MARGIN = 1e-4


def _metric_cosines(gate_weight, experts_weight, covariance) -> float:
    """Largest |cos| between gate rows and experts in the inner product of x's covariance."""
    g = gate_weight.to(covariance.dtype) @ covariance
    inner = g @ experts_weight.to(covariance.dtype).T
    gn = (g * gate_weight.to(covariance.dtype)).sum(-1).clamp_min(1e-300).sqrt()
    en = ((experts_weight.to(covariance.dtype) @ covariance) * experts_weight).sum(-1)
    en = en.clamp_min(1e-300).sqrt()
    return float((inner / gn[:, None] / en[None, :]).abs().max())


def _center_y_rule(center_y, name: str) -> bool | None:
    if center_y is not None and not isinstance(center_y, bool):
        raise TypeError(f"{name} must be True, False or None; got {type(center_y).__name__}")
    return center_y


#: how :func:`tensor_init` checks its arguments, once per call (:func:`pyromoe._validation.validate`)
TENSOR_INIT_RULES = {
    "num_experts": num_experts_rule(minimum=2),
    "link": link_rule,
    "noise": noise_rule,
    "chunk_size": optional(count_rule(minimum=1)),
    "seed": check_seed,
    "center_y": _center_y_rule,
    "refine": check_flag,
    "random_starts": count_rule(minimum=0),
    "num_threads": check_num_threads,
}


@keeps_feature_names
@validate(TENSOR_INIT_RULES)
def tensor_init(
    x,
    y,
    num_experts: int = 2,
    link: str | Link = "linear",
    *,
    z=None,
    gate_features: int | None = None,
    moment_columns=None,
    noise: float | str | None = None,
    refine: bool = False,
    random_starts: int = 2,
    center_y: bool | None = None,
    chunk_size: int | None = None,
    seed: int = 0,
    device=None,
    num_threads: int | None = None,
) -> MoEEstimate:
    """Moment (tensor) estimate of the experts, then the gate by EM with the experts fixed.

    Steps (docs/algorithm.md): standardise ``x`` (centre, whiten by its covariance); centre ``y``
    (see ``center_y``); two streaming passes give
    ``T2 = E[P2(y) S2(z)]`` and the whitened ``T3``; the tensor power method gives the expert
    directions, scales and signs; :func:`pyromoe.fit_gate` then fits the gate (and noise)
    by EM with the experts fixed (for n > 200,000 it first runs on 50,000 random rows and finishes
    on all rows from there: the same fixed point in fewer full passes), run until the gain it has
    left, extrapolated, is below :data:`GATE_GAIN_TOL` nats in all. For tanh and sigmoid each
    expert's scale along its moment direction is then refit by weighted least squares with the
    responsibilities, and the gate refit from there (docs/algorithm.md section 3). The result is
    mapped back to the user's coordinates.

    Biases, honestly: the moment step targets the bias-free model on standardised inputs (an
    offset in ``x`` is removed exactly by standardising). A common intercept in ``y`` cannot be
    told apart from the gate's effect on ``E[y]`` by moments: ``center_y`` decides. Expert biases
    are then set from the centring (linear) or to ``-a . mean(x)`` (other links) and kept fixed
    while the gate (with its bias) is fitted; only ``refine=True`` fits the expert biases.
    The estimate is consistent only where docs/algorithm.md says the moments are exact (see the
    module docstring); elsewhere it is a start for the likelihood.

    Parameters
    ----------
    x : Tensor, ndarray, numpy memmap or dask.array.Array (n, d)
        Inputs; results follow its device and dtype. Memory maps and Dask arrays are read in
        chunks, never whole (:func:`pyromoe.core.sources.as_source`).
    y : the same kinds (n,)
        Outputs.
    num_experts : int
        ``k``, with ``2 <= k <= d`` (the moments cannot separate more experts than features).
    link : str or Link
        The experts' link.
    z, gate_features
        The gate's own covariates, as in :func:`pyromoe.fit_em`: the moments read the experts'
        inputs only; the gate is fitted on ``z``.
    moment_columns : sequence of int or of bool, optional
        The experts' inputs the moment step reads (positions, or one flag per input), e.g. the
        continuous ones when others are a factor's 0/1 columns (Stein's lemma needs Gaussian
        inputs, docs/algorithm.md section 7). The other inputs' weights start at 0 (EM fits them
        with ``refine=True``). Default: every input.
    noise : float, "shared" or "per_expert", optional
        Noise standard deviation if known: then used for the transform constants and kept fixed
        in the gate fit. Default: estimated from ``E[y^2] - E[g(a.z)^2]`` and refined by gate EM.
        ``"per_expert"``: the moment step and gate EM assume one shared sd (the moments need
        it), and the refinement (``refine=True``) fits one per expert; without refinement the
        shared sd is repeated per expert.
    refine : bool
        Run joint EM over all parameters (biases included) from this estimate
        (:func:`pyromoe.fit_em`), plus ``random_starts`` random-start EM runs; the best
        log-likelihood wins and ``diagnostics["refine_winner"]`` says which.
    random_starts : int
        Random starts tried alongside the refinement (0 for the fastest refinement).
    center_y : bool, optional
        Subtract the mean of ``y`` before the moments (odd links only; relu/leaky never centre,
        their ``E[y]`` carries the experts' norm). ``False``: subtract ``g(0)`` only (0, or 1/2 for
        sigmoid): consistent for the bias-free model, biased by an intercept. ``True``: removes a
        common intercept but biases the bias-free model whenever the gate makes ``E[y] != 0``
        (the error then stops shrinking with n). ``None`` (default): centre only when the mean of
        ``y`` is larger than any bias-free two-expert model can produce
        (``mean(y)^2 > (2/pi) mean(y^2)``), i.e. when an intercept is certain;
        ``diagnostics["y_centred_by_mean"]`` says which was done.
    chunk_size : int, optional
        Rows per chunk of every pass over the data (the moments, gate EM, the refinement): bounds
        the extra memory to one chunk, O(chunk_size d). Default
        :func:`pyromoe.core.chunks.default_chunk_size` (about 4 MiB of float64 rows).
    seed : int or None
        Seeds the tensor power method's restarts, the gate EM's start and the refinement.
        ``None`` draws a fresh seed; the one used is ``diagnostics["seed"]``.
    device, num_threads
        As in :func:`pyromoe.fit_em`.

    Returns
    -------
    MoEEstimate
        ``method="tensor"`` (or ``"tensor+em"`` / ``"em"`` after refinement) with diagnostics: T2
        eigenvalues, eigengap and noise floor, whitening condition number, tensor eigenvalues,
        decomposition residual, alpha and beta used, T3 noise-to-signal, gate EM trace and
        convergence flag, chunk count, timings.

    Raises
    ------
    MomentsNotApplicableError
        (a ``ValueError``) ``num_experts > in_features``; fewer rows than :func:`minimum_rows`;
        constant or collinear columns of ``x``; T2 with fewer than k clearly non-zero
        eigenvalues ("the data look like fewer than k experts").
    ValueError
        Constant ``y``; NaN/inf; fewer rows than free parameters + 1; invalid arguments.

    Warns
    -----
    UserWarning
        When the fitted gate is far from orthogonal to the experts (relu/leaky or k > 2) or the
        relu/leaky experts have unequal norms: the moment estimate is then biased. Under
        :data:`pyromoe._validation.ROWS_PER_PARAMETER_WARN` rows per free parameter.
    CollapseWarning
        When the (gate or refined) fit ends with an expert holding fewer than ``d + 1``
        effective rows (``diagnostics["collapsed_experts"]``).

    Notes
    -----
    Columns of ``x`` (and ``y``, linear/relu/leaky links) of extreme magnitude (beyond ``1e77``
    or under ``1e-77`` in float64, where the moments overflow) are divided by exact powers of two
    before the work and the estimate is mapped back (``diagnostics["input_scaling"]``).

    Examples
    --------
    >>> from pyromoe import simulate
    >>> data = simulate(20000, 5, seed=0)
    >>> est = tensor_init(data.x, data.y)
    >>> est.experts_weight.shape, est.method
    (torch.Size([2, 5]), 'tensor')
    """
    layout = dict(z=z, gate_features=gate_features, moment_columns=moment_columns)
    source, noise, options = moment_arguments(
        x, y, num_experts, noise, chunk_size, seed, device, layout=layout
    )
    with torch_threads(num_threads):
        source.summary(options.chunk_size)  # out-of-core data: the NaN check is this first pass
        return _tensor_init(
            source,
            link,
            noise=noise,
            options=options,
            refine=refine,
            random_starts=random_starts,
            center_y=center_y,
        )


# the moments would overflow on extreme magnitudes: fit on data divided by exact powers of two
@on_exact_scale("estimate", noise="noise")
def _tensor_init(
    source: Source,
    link: Link,
    *,
    noise: float | None,
    options: MomentOptions,
    refine: bool = False,
    random_starts: int = 0,
    center_y: bool | None = None,
    gate_source: Source | None = None,
) -> MoEEstimate:
    """:func:`tensor_init` on checked arguments.

    ``gate_source``: rows to fit the gate on (default all rows, warm-started on a subsample when
    n is large); ``initialize``'s guard passes its subsample (already on the ordinary scale).
    """
    k = options.num_experts
    check_moments_apply(moment_source(source, options), k)
    estimate, covariance = _moment_start(source, link, noise, options, center_y, gate_source)
    if not refine:
        warn_collapse(
            estimate.diagnostics["collapsed_experts"],
            estimate.diagnostics["effective_rows"],
            estimate.in_features,
            stacklevel=user_stacklevel(1),
        )
    if options.gate_features is None and options.moment_columns is None:
        _warn_if_biased(estimate, covariance, k)
    if refine:
        return _refine(source, link, estimate, options, random_starts)
    if options.noise_model == "per_expert":  # the moment step's one sd, for each expert
        return replace(estimate, noise=estimate.noise.expand(k).clone())
    return estimate


def _moment_start(source, link, noise, options: MomentOptions, center_y, gate_source):
    """The moment experts and the gate fitted by EM with them fixed: the estimate (shared noise)
    and the covariance of the columns the moments read."""
    n = source.num_rows
    start = time.perf_counter()
    try:
        weight, bias, noise_moment, standardizer, diagnostics = moment_experts(
            moment_source(source, options),
            options.num_experts,
            link,
            noise,
            options.chunk_size,
            options.seed,
            center_y,
            free_mixing=options.gate_features is not None,
        )
    except ValueError as error:  # arguments are checked above: these are the data's
        raise MomentsNotApplicableError(str(error)) from error
    moment_seconds = time.perf_counter() - start
    weight = weight.to(device=source.device, dtype=source.dtype)
    bias = bias.to(device=source.device, dtype=source.dtype)
    if options.moment_columns is not None:  # the other inputs' weights start at 0
        experts = source.in_features - (options.gate_features or 0)
        full = weight.new_zeros(weight.shape[0], experts)
        full[:, list(options.moment_columns)] = weight
        weight = full
        diagnostics["moment_columns"] = list(options.moment_columns)
    sigma = noise if noise is not None else noise_moment

    start = time.perf_counter()
    with warnings.catch_warnings():
        # reported by the caller for the returned fit only (refine=True fits again)
        warnings.simplefilter("ignore", CollapseWarning)
        fit, warm_iter = _fit_gate_staged(
            source if gate_source is None else gate_source,
            weight,
            bias,
            link,
            sigma,
            noise is None,
            options,
        )
        if link.is_odd and not link.is_identity:  # tanh / sigmoid: the scales from the likelihood
            weight, bias, fit, scales = _refit_scales(
                source if gate_source is None else gate_source,
                weight,
                bias,
                link,
                fit,
                noise is None,
                options,
            )
            diagnostics["expert_scale_refit"] = scales
    diagnostics.update(
        {
            "gate_log_likelihood_trace": list(fit.log_likelihood_trace),
            "gate_converged": bool(fit.converged),
            "gate_n_iter": int(fit.n_iter),
            "gate_rows": n if gate_source is None else gate_source.num_rows,
            "gate_warm_start_rows": min(GATE_WARM_START_ROWS, n) if warm_iter else 0,
            "gate_warm_start_n_iter": warm_iter,
            "moment_seconds": moment_seconds,
            "gate_seconds": time.perf_counter() - start,
            "seed": options.seed,
            "effective_rows": list(fit.effective_rows),
            "collapsed_experts": list(fit.collapsed_experts),
        }
    )
    estimate = MoEEstimate(
        experts_weight=weight,
        experts_bias=bias,
        gate_weight=fit.gate_weight.to(source.dtype),
        gate_bias=fit.gate_bias.to(source.dtype),
        noise=torch.as_tensor(fit.noise, dtype=source.dtype, device=source.device),
        link=link,
        method="tensor",
        diagnostics=diagnostics,
    )
    return estimate, standardizer.covariance


def _warn_if_biased(estimate: MoEEstimate, covariance: torch.Tensor, k: int) -> None:
    """Warn where the moment estimate's assumptions look violated (a gate far from orthogonal to
    the experts for relu/leaky or k > 2, unequal relu/leaky norms); records the cosine."""
    link, diagnostics = estimate.link, estimate.diagnostics
    cosine = _metric_cosines(estimate.gate_weight, estimate.experts_weight, covariance)
    diagnostics["max_gate_expert_cosine"] = cosine
    if (not link.is_odd or k > 2) and cosine > COSINE_WARNING:
        warnings.warn(
            f"the fitted gate is far from orthogonal to the experts (|cos| = {cosine:.2f} > "
            f"{COSINE_WARNING}): the moment estimate for link={link.name!r}, k={k} assumes an "
            "orthogonal gate and is biased here; use refine=True.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    if not link.is_odd:
        norms = diagnostics["expert_norms_standardised"]
        if max(norms) > NORM_RATIO_WARNING * max(min(norms), 1e-12):
            warnings.warn(
                f"the {link.name} experts have unequal norms ({[round(v, 3) for v in norms]} on "
                "standardised inputs): the moment transform assumes equal norms and is biased "
                "here; use refine=True.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )


#: tensor_init's gate EM stops once the gain it has left, extrapolated (EM converges linearly),
#: summed over the rows is below this many nats (:func:`pyromoe.core.em.loop.remaining_gain`):
#: a per-row tolerance stops short by many standard errors at large n (docs/algorithm.md
#: section 4). 0.01 nats leaves the gate within about ``sqrt(2 * 0.01) = 0.14`` standard errors.
GATE_GAIN_TOL = 0.01
#: Iteration cap of that gate EM (a pass is cheap: one product with the weights per chunk).
GATE_MAX_ITER = 1000

#: Gate EM first runs on this many random rows when n is over 4 times larger, then finishes on all
#: rows from there: the same fixed point, with most iterations on a small subsample.
GATE_WARM_START_ROWS = 50_000


def _fit_gate_staged(
    source: Source, weight, bias, link, sigma, fit_noise: bool, options: MomentOptions
):
    """Gate EM with the experts fixed; on large data warm-started on a random subsample.

    Returns the fit on all rows and the number of warm-start iterations (0 when none ran).
    """
    n = source.num_rows
    seed = options.seed
    init_weight = init_bias = None
    warm_iter = 0
    if n > 4 * GATE_WARM_START_ROWS:
        generator = torch.Generator().manual_seed(int(seed))
        x_rows, y_rows = source.subsample(GATE_WARM_START_ROWS, generator)
        with warnings.catch_warnings():
            # a warm start that stops early (or looks collapsed) is finished on all rows below
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", CollapseWarning)
            warm = _gate_em(x_rows, y_rows, weight, bias, link, options, sigma, fit_noise)
        init_weight, init_bias, warm_iter = warm.gate_weight, warm.gate_bias, int(warm.n_iter)
        if fit_noise:
            sigma = float(warm.noise)
    fit = _gate_em(
        source, None, weight, bias, link, options, sigma, fit_noise, init_weight, init_bias
    )
    return fit, warm_iter


def _gate_em(
    x,
    y,
    weight,
    bias,
    link,
    options: MomentOptions,
    sigma,
    fit_noise,
    init_weight=None,
    init_bias=None,
):
    """tensor_init's gate EM with the experts fixed: to :data:`GATE_GAIN_TOL` nats of its optimum
    (``options.gate_gain_tol`` when set; at most :data:`GATE_MAX_ITER` iterations), from
    ``init_*`` (default: a random gate)."""
    return fit_gate.unchecked(
        x,
        y,
        weight,
        bias,
        link,
        **options.layout,
        noise=sigma,
        fit_noise=fit_noise,
        init_gate_weight=init_weight,
        init_gate_bias=init_bias,
        seed=options.seed,
        chunk_size=options.chunk_size,
        gain_tol=GATE_GAIN_TOL if options.gate_gain_tol is None else options.gate_gain_tol,
        max_iter=GATE_MAX_ITER,
    )


#: The expert-scale refit (:func:`_refit_scales`) stops when no scale moves by more than this
#: fraction in a round, or after this many rounds of (scale steps, gate EM).
SCALE_TOL = 1e-4
SCALE_ROUNDS = 5
#: Gauss-Newton steps of the scales per round (each one pass, responsibilities recomputed).
SCALE_STEPS = 10


def _refit_scales(source: Source, weight, bias, link, fit, fit_noise: bool, options):
    """Each expert's scale along its moment direction by weighted least squares, then the gate.

    The moment scales of tanh / sigmoid come from inverting ``kappa1`` (docs/algorithm.md section
    3), which saturates for large norms: small errors in ``E[y z]`` become large errors of the
    norm. Here the directions stay and each expert's linear predictor ``a_i . x + b_i`` is scaled
    by the ``s_i`` maximising the expected complete log-likelihood, a weighted least-squares fit
    ``sum_n r_ni (y_n - g(s_i eta_ni))^2`` (Gauss-Newton on one scalar per expert, one pass per
    step with the responsibilities recomputed: an ECM step); gate EM then refits the gate and the
    noise from the last gate. Rounds repeat until no scale moves by :data:`SCALE_TOL`.
    Returns the weights, biases, gate fit and the cumulative scales.
    """
    total = torch.ones(weight.shape[0], dtype=torch.float64, device=weight.device)
    for _ in range(SCALE_ROUNDS):
        params = Params(weight, bias, fit.gate_weight, fit.gate_bias, fit.noise)
        moved = 0.0
        for _ in range(SCALE_STEPS):
            sums = source.reduce(scale_statistics, options.chunk_size, params, link)
            step = sums[0] / sums[1].clamp_min(1e-300)
            scale = (1.0 + step).clamp(0.5, 2.0)  # bounded: a far-off start takes several steps
            total = total * scale
            change = float((scale - 1.0).abs().max())
            moved = max(moved, change)
            like = scale.to(weight)
            params = params._replace(
                experts_weight=params.experts_weight * like[:, None],
                experts_bias=params.experts_bias * like,
            )
            if change < SCALE_TOL:
                break
        weight, bias = params.experts_weight, params.experts_bias
        fit = _gate_em(
            source,
            None,
            weight,
            bias,
            link,
            options,
            float(fit.noise),
            fit_noise,
            fit.gate_weight,
            fit.gate_bias,
        )
        if moved < SCALE_TOL:
            break
    return weight, bias, fit, total.tolist()


def _refine(
    source, link, estimate: MoEEstimate, options: MomentOptions, random_starts: int
) -> MoEEstimate:
    """Joint EM from the moment estimate, against ``random_starts`` random starts; best wins."""
    k, seed = options.num_experts, options.seed
    em_options = dict(noise=options.noise_model, chunk_size=options.chunk_size, **options.layout)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # only the winner's collapse is worth a warning (below); rows were checked by the caller
        warnings.simplefilter("ignore", CollapseWarning)
        warnings.simplefilter("ignore", SmallDataWarning)
        from_tensor = fit_em.unchecked(
            source, None, k, link, init=estimate, n_init=1, seed=seed, **em_options
        )
        refine_seconds = time.perf_counter() - start
        candidates = {"tensor": from_tensor}
        random_seconds = 0.0
        if random_starts > 0:
            start = time.perf_counter()
            random_seed = child_seed(seed, 1)  # no arithmetic on the seed: 2**63 - 1 is valid
            candidates["random"] = fit_em.unchecked(
                source, None, k, link, n_init=random_starts, seed=random_seed, **em_options
            )
            random_seconds = time.perf_counter() - start
    scores = {
        name: mean_log_likelihood(source, est.params, link, options.chunk_size)
        for name, est in candidates.items()
    }
    # random starts must beat the tensor start by a real margin (RANDOM_MARGIN nats per row): two
    # runs converging to the same optimum differ in the last digits and that is not a "win"
    winner = "tensor"
    if "random" in scores and scores["random"] > scores["tensor"] + RANDOM_MARGIN:
        winner = "random"
    best = candidates[winner]
    diagnostics = dict(estimate.diagnostics)
    em_diag = dict(from_tensor.diagnostics)
    diagnostics.update(
        {
            "refined": True,
            "refine_winner": winner,
            "refine_log_likelihoods": scores,
            "refine_converged": em_diag.get("converged"),
            "refine_n_iter": em_diag.get("n_iter"),
            "refine_seconds": refine_seconds,
            "random_starts_seconds": random_seconds,
            "moment_estimate_experts_weight": estimate.experts_weight.tolist(),
            "effective_rows": best.diagnostics["effective_rows"],
            "collapsed_experts": best.diagnostics["collapsed_experts"],
        }
    )
    warn_collapse(
        diagnostics["collapsed_experts"],
        diagnostics["effective_rows"],
        best.in_features,
        stacklevel=user_stacklevel(1),
    )
    return replace(
        best, method="tensor+em" if winner == "tensor" else "em", diagnostics=diagnostics
    )
