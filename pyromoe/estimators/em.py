"""``fit_em``: joint EM over all parameters, best of several starts (docs/algorithm.md section 4).

Joint EM is what mixtools / flexmix users run today: EM from random starts, keeping the start with
the best final objective. It can get stuck in a local optimum (similar experts), which is what the
tensor start of :mod:`pyromoe.estimators.tensor_init` avoids; started from that estimate
(``init=``) it is the refinement step. The loop, the passes and the M-steps are those of
:mod:`pyromoe.core.em`; this module checks the arguments, builds the starts and reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .._validation import (
    check_enough_rows,
    check_flag,
    check_noise_model,
    check_positive,
    check_seed,
    count_rule,
    keeps_feature_names,
    num_experts_rule,
    num_parameters,
    optional,
    user_stacklevel,
    validate,
)
from ..core.chunks import default_chunk_size
from ..core.design import as_design_source
from ..core.em.loop import DEFAULT_TOL, EM
from ..core.em.starts import SCREEN_CANDIDATES, screened_start, start_params
from ..core.estimate import MoEEstimate
from ..core.links import Link, link_rule
from ..core.sources import Source
from ..core.threads import check_num_threads, torch_threads
from ..core.units import on_exact_scale

__all__ = ["em_options", "fit_em"]


#: Whether :func:`fit_em`'s EM runs are accelerated by SQUAREM (``EM(accelerate=True)``: an
#: extrapolation from every three consecutive EM iterates, kept only when it raises the
#: objective; docs/algorithm.md section 4). The screening of random starts, the guard's races
#: and gate EM run plain EM.
ACCELERATE = True

#: how the options of EM that :func:`fit_em` and :func:`pyromoe.fit_gate` share are checked
EM_RULES = {
    "tol": check_positive,
    "max_iter": count_rule(minimum=1),
    "prior_scale": optional(check_positive),
    "newton_steps": count_rule(minimum=1),
}


def em_options(
    source: Source, tol, max_iter, prior_scale, newton_steps, gauss_newton_steps, chunk_size
) -> dict:
    """The options of :class:`~pyromoe.core.em.loop.EM` that :func:`fit_em` and
    :func:`pyromoe.estimators.gate.fit_gate` share, from their checked arguments (``chunk_size``
    None: :func:`pyromoe.core.chunks.default_chunk_size`)."""
    if chunk_size is None:
        chunk_size = default_chunk_size(source.in_features)
    return dict(
        tol=tol,
        max_iter=max_iter,
        prior_scale=prior_scale,
        newton_steps=newton_steps,
        gauss_newton_steps=gauss_newton_steps,
        chunk_size=chunk_size,
    )


def _check_init(
    init, k: int, d: int, link: Link, source: Source, gate_features: int | None = None
) -> MoEEstimate:
    if not isinstance(init, MoEEstimate):
        raise TypeError(
            f"init must be a pyromoe.MoEEstimate (e.g. from tensor_init); got {type(init).__name__}"
        )
    if (init.num_experts, init.in_features) != (k, d):
        raise ValueError(
            f"init must have num_experts={k} and in_features={d} to match the fit; got "
            f"num_experts={init.num_experts}, in_features={init.in_features}"
        )
    if init.gate_features != (d if gate_features is None else gate_features):
        raise ValueError(
            f"init's gate reads {init.gate_features} covariates but the fit's gate reads "
            f"{d if gate_features is None else gate_features} ({'z' if gate_features else 'x'})"
        )
    if (init.link.name, init.link.negative_slope) != (link.name, link.negative_slope):
        raise ValueError(
            f"init has link {init.link!r} but fit_em was asked for link {link!r}; pass "
            "link=init.link"
        )
    init = init.to(device=source.device, dtype=source.dtype)
    for name in ("experts_weight", "experts_bias", "gate_weight", "gate_bias", "noise"):
        if not bool(torch.isfinite(getattr(init, name)).all()):
            raise ValueError(f"init.{name} contains NaN or infinite values")
    if not bool((init.noise > 0).all()):  # one shared sd or one per expert
        raise ValueError(f"init.noise must be > 0; got {init.noise.tolist()}")
    return init


@dataclass(frozen=True)
class _StartPlan:
    """The starts of :func:`fit_em` and the model they fit (checked)."""

    num_experts: int
    n_init: int
    bias: bool
    seed: int
    per_expert: bool
    screen: int
    gate_features: int | None = None


#: how :func:`fit_em` checks its arguments, once per call (:func:`pyromoe._validation.validate`)
FIT_EM_RULES = {
    **EM_RULES,
    "gauss_newton_steps": count_rule(minimum=1),
    "chunk_size": optional(count_rule(minimum=1)),
    "link": link_rule,
    "seed": check_seed,
    "num_experts": num_experts_rule(minimum=1),
    "bias": check_flag,
    "noise": check_noise_model,
    "n_init": optional(count_rule(minimum=1)),
    "screen": count_rule(minimum=1),
    "num_threads": check_num_threads,
}


@keeps_feature_names
@validate(FIT_EM_RULES)
def fit_em(
    x,
    y,
    num_experts: int = 2,
    link: str | Link = "linear",
    *,
    z=None,
    gate_features: int | None = None,
    init: MoEEstimate | None = None,
    n_init: int | None = None,
    screen: int = SCREEN_CANDIDATES,
    bias: bool = True,
    noise: str = "shared",
    tol: float = DEFAULT_TOL,
    max_iter: int = 200,
    prior_scale: float | None = None,
    seed: int = 0,
    newton_steps: int = 1,
    gauss_newton_steps: int = 1,
    chunk_size: int | None = None,
    device=None,
    num_threads: int | None = None,
) -> MoEEstimate:
    """Joint EM over all parameters (experts, offsets, gate, noise), best of several starts.

    Parameters
    ----------
    x : Tensor, ndarray, numpy memmap or dask.array.Array (n, d)
        Inputs (:func:`pyromoe.core.sources.as_source`): memory maps and Dask arrays are read
        in chunks, never whole.
    y : the same kinds (n,)
        Outputs.
    num_experts : int
        Number of experts ``k >= 1`` (one expert: a plain least-squares / link regression, the
        baseline of a comparison).
    link : str or Link
        Expert link (must match ``init.link`` when ``init`` is given).
    z : Tensor, ndarray, DataFrame or dask.array.Array (n, d_z), optional
        Covariates of the gate's own (flexmix's concomitant variables): the gate is
        ``softmax(w . z + c)`` while the experts read ``x``. Default: the gate reads ``x``.
    gate_features : int, optional
        Instead of ``z``: ``x`` holds the joined design ``[x | z]`` and its last
        ``gate_features`` columns are the gate's (e.g. one memory map of both).
    init : MoEEstimate, optional
        A starting point (e.g. :func:`pyromoe.tensor_init`); the first start.
    n_init : int, optional
        Total number of starts. Default: 5 random starts without ``init``; only the given start
        with ``init`` (``n_init > 1`` then adds ``n_init - 1`` random starts). Random starts are
        screened starts (:func:`pyromoe.core.em.starts.screened_start`) drawn from a ``torch.Generator`` seeded with
        ``seed``.
    screen : int
        Random draws behind each random start: the best of ``screen`` draws after at most
        :data:`~pyromoe.core.em.starts.SCREEN_MAX_ITER` EM iterations on a random subsample of
        :data:`~pyromoe.core.em.starts.SCREEN_ROWS` rows (default
        :data:`~pyromoe.core.em.starts.SCREEN_CANDIDATES`). ``1``: one plain
        :func:`~pyromoe.core.em.starts.random_start` draw per start
        (cheaper; on similar experts far more often in a wrong basin, see
        benchmarks/results/random_starts.md).
    bias : bool
        Fit expert intercepts and gate offsets; with ``False`` they are fixed at 0 (an ``init``'s
        offsets are then ignored).
    noise : {"shared", "per_expert"}
        One noise sd for all experts, or one per expert (the M-step is then
        ``sigma_i^2 = sum_n r_ni (y_n - mean_ni)^2 / sum_n r_ni``; the estimate's ``noise`` has
        shape (k,)). A shared-noise ``init`` is expanded to one value per expert.
    tol : float
        A start has converged when its objective (mean log-likelihood per row, or log posterior / n
        for MAP) changes by less than ``tol`` in one EM iteration. The runs are accelerated by
        SQUAREM (:data:`ACCELERATE`): every third pass is at an extrapolation of the last three
        iterates, kept only when it raises the objective, so a run takes fewer passes and, where
        EM crawls, stops nearer the optimum at the same ``tol``.
    max_iter : int
        Maximum iterations (passes at the parameters kept) per start.
    prior_scale : float, optional
        ``s`` of ``Normal(0, s^2)`` priors on every expert and gate weight and offset: MAP EM (ridge
        terms in each M-step; the noise stays maximum likelihood). ``None``: maximum likelihood.
        (On data of extreme magnitude, rescaled as in the Notes, the priors apply to the
        rescaled problem.)
    seed : int or None
        Seed of the random starts; ``None`` draws a fresh one. Recorded in
        ``diagnostics["seed"]``.
    newton_steps : int
        Maximum Newton steps of each gate M-step.
    gauss_newton_steps : int
        Maximum Gauss-Newton steps per expert in each M-step (nonlinear links; linear experts are
        solved exactly).
    chunk_size : int, optional
        Rows per chunk of every pass over the data (default
        :func:`pyromoe.core.chunks.default_chunk_size`: about 4 MiB of float64 rows).
        The result does not depend on it beyond rounding.
    device : str or torch.device, optional
        Where to compute (default: ``x``'s device, or the CPU for arrays); memory-mapped chunks
        are moved there as they are read.
    num_threads : int, optional
        torch threads for the call (None: leave torch's setting; 1 is fastest for small data on a
        shared machine).

    Returns
    -------
    MoEEstimate
        ``method="em"``; ``diagnostics`` holds ``n_init``, ``start_kinds`` (``"given"`` /
        ``"random"``), ``log_likelihood_per_start`` (final objective of each start),
        ``best_start``, ``converged`` and ``n_iter`` of the best start, ``log_likelihood_trace`` of
        the best start, ``converged_per_start``, ``n_iter_per_start``, ``seconds_per_start``,
        ``passes_per_start`` (passes over the data), ``chunk_size``, ``source`` (``"tensor"``,
        ``"memmap"`` or ``"dask"``), ``objective`` (``"mean log-likelihood"`` or
        ``"log posterior / n"``), ``seed``, ``screen`` and ``screen_seconds`` (drawing and
        screening the random starts),
        ``effective_rows`` (per expert, best start) and ``collapsed_experts``.

    Raises
    ------
    ValueError, TypeError
        For malformed inputs or an ``init`` that does not match ``num_experts``, ``x`` or ``link``;
        for fewer rows than free parameters + 1 (:func:`pyromoe._validation.num_parameters`) or
        more experts than rows.

    Warns
    -----
    ConvergenceWarning
        When the best start reached ``max_iter`` before converging (scikit-learn's rule: other
        starts that did not converge show in ``converged_per_start``).
    CollapseWarning
        When the best start ends with an expert holding fewer than ``d + 1`` effective rows or the
        noise at its floor (``1e-3 sd(y)``).
    UserWarning
        Under :data:`pyromoe._validation.ROWS_PER_PARAMETER_WARN` rows per free parameter.

    Notes
    -----
    Columns of ``x`` (and ``y`` for the linear, relu and leaky links) of extreme magnitude (beyond
    ``1e77`` or under ``1e-77`` in float64, where the Gram matrices overflow) are divided by
    exact powers of two before fitting and the estimate is mapped back
    (``diagnostics["input_scaling"]``); ordinary data are not touched.

    Each iteration is one pass over the data in chunks (:class:`pyromoe.core.em.loop.EM`): extra memory
    ``O(chunk_size (d + k) + k d^2)`` whatever n. Starts run one after another. The chosen start is the one with the highest final objective; starts that ended lower
    (a local optimum, docs/algorithm.md section 4) show in ``log_likelihood_per_start``.

    Examples
    --------
    >>> from pyromoe import simulate
    >>> data = simulate(2000, 3, seed=0)
    >>> fit = fit_em(data.x, data.y, 2, n_init=2)
    >>> fit.method, len(fit.diagnostics["log_likelihood_per_start"])
    ('em', 2)
    """
    source, gate_features = as_design_source(
        x, y, z, gate_features=gate_features, device=device, min_rows=2
    )
    steps = (newton_steps, gauss_newton_steps)
    em = em_options(source, tol, max_iter, prior_scale, *steps, chunk_size)
    n, d = source.shape
    d -= gate_features or 0  # the experts' inputs
    k, per_expert = num_experts, noise == "per_expert"
    if n_init is None:
        n_init = 1 if init is not None else 5
    if init is not None:
        init = _check_init(init, k, d, link, source, gate_features)
    with torch_threads(num_threads):
        summary = source.summary(em["chunk_size"])  # out-of-core data: the NaN check is here
        if summary.y_sd == 0.0:
            raise ValueError(
                f"y is constant (every value is {summary.y_first:g}); a mixture of experts needs "
                "varying y"
            )
        plan = _StartPlan(k, n_init, bias, seed, per_expert, screen, gate_features)
        return _fit_em(source, link, init=init, plan=plan, em=em)


@on_exact_scale("estimate", init="estimate")
def _fit_em(
    source: Source, link: Link, *, init: MoEEstimate | None, plan: _StartPlan, em: dict
) -> MoEEstimate:
    """:func:`fit_em` on checked arguments; ``em``: the options of :class:`EM`."""
    n, d = source.shape
    k, bias, seed, per_expert = plan.num_experts, plan.bias, plan.seed, plan.per_expert
    n_init, screen, gate_features = plan.n_init, plan.screen, plan.gate_features
    d -= gate_features or 0
    # the gate's own covariates: (k - 1) d_z gate weights instead of (k - 1) d
    gate_change = 0 if gate_features is None else (k - 1) * (gate_features - d)
    covariates = "" if gate_features is None else f" and a gate on {gate_features} covariate(s)"
    check_enough_rows(
        n,
        num_parameters(d, k, bias) + gate_change,
        k,
        model=f"a mixture of {k} experts on {d} input(s){covariates}"
        f"{' with biases' if bias else ''}",
        stacklevel=user_stacklevel(1),
    )
    starts, kinds = [], []
    if init is not None:
        starts.append(init)
        kinds.append("given")
    generator = torch.Generator().manual_seed(seed)
    began = time.perf_counter()
    while len(starts) < n_init:
        start = screened_start(
            source,
            None,
            k,
            link,
            generator,
            candidates=screen,
            bias=bias,
            noise="per_expert" if per_expert else "shared",
            prior_scale=em["prior_scale"],
            chunk_size=em["chunk_size"],
            gate_features=gate_features,
        )
        starts.append(start)
        kinds.append("random")
    screen_seconds = time.perf_counter() - began
    like = torch.empty(0, dtype=source.dtype, device=source.device)
    starts = [start_params(start, like, bias, per_expert) for start in starts]
    runs, best = EM(source, link, update_gate_bias=bias, accelerate=ACCELERATE, **em).fit(
        starts, stacklevel=user_stacklevel()
    )
    run = runs[best]
    diagnostics = {
        "n_init": len(runs),
        "start_kinds": kinds,
        "log_likelihood_per_start": [r.objective for r in runs],
        "best_start": best,
        "converged": run.converged,
        "n_iter": run.n_iter,
        "log_likelihood_trace": run.trace,
        "converged_per_start": [r.converged for r in runs],
        "n_iter_per_start": [r.n_iter for r in runs],
        "seconds_per_start": [r.seconds for r in runs],
        "passes_per_start": [r.passes for r in runs],
        "chunk_size": em["chunk_size"],
        "source": source.kind,
        "objective": "mean log-likelihood" if em["prior_scale"] is None else "log posterior / n",
        "noise_model": "per_expert" if per_expert else "shared",
        "seed": seed,
        "screen": screen,
        "screen_seconds": screen_seconds,
        "effective_rows": run.effective_rows,
        "collapsed_experts": run.collapsed_experts,
    }
    params = run.params._replace(noise=run.params.noise.reshape((k,) if per_expert else ()))
    return MoEEstimate.from_params(params, link, method="em", diagnostics=diagnostics)
