"""``initialize``: a point estimate for any data (docs/algorithm.md section 4).

The tensor start of :mod:`pyromoe.estimators.tensor_init` where it applies, guarded by random-start
EM and a sanity check, with multi-start EM (:func:`pyromoe.core.em.fit_em`) as the fallback.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from .._validation import (
    SmallDataWarning,
    check_enough_rows,
    check_positive,
    num_parameters,
    on_exact_scale,
)
from ..core.em import CollapseWarning, fit_em, warn_collapse
from ..core.estimate import MoEEstimate
from ..core.links import Link
from ..core.threads import check_num_threads, torch_threads

# tensor_init's names stay importable from here (benchmarks/speed.py reads _moment_experts)
from .tensor_init import (  # noqa: F401
    MomentsNotApplicableError,
    _moment_experts,
    check_arguments,
    minimum_rows,
    tensor_init,
)

__all__ = ["MomentsNotApplicableError", "initialize", "minimum_rows", "tensor_init"]


#: Largest gate-weight norm (per unit standard deviation of x) that `initialize` accepts as a sane
#: seed: beyond it the gate is a near step function fitted to noise (a reference saw 12.5 on a bad
#: start) and NUTS seeded there stalls in warm-up (docs/algorithm.md section 5).
MAX_SANE_GATE_NORM = 20.0

#: Prior scale of the MAP refit when plain EM drives the gate to a step function: the default
#: prior scale of the model's gate weights (pyromoe.bayes.model.DEFAULT_PRIOR_SCALES["gate.weight"]).
MAP_PRIOR_SCALE = 2.5

#: Random-start EM fits that method="auto" runs beside the tensor start (cheap next to NUTS).
AUTO_RANDOM_STARTS = 3


def _sanity_problem(estimate: MoEEstimate, x: torch.Tensor) -> str | None:
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
    scale = x.std(0).clamp_min(1e-12)
    gate_norm = float((estimate.gate_weight * scale).norm(dim=-1).max())
    if gate_norm > MAX_SANE_GATE_NORM:
        return (
            f"its gate weights are huge (norm {gate_norm:.3g} per sd of x, over "
            f"{MAX_SANE_GATE_NORM:g}): a near step-function gate"
        )
    if not float(estimate.noise) > 0:
        return "its noise is not positive"
    return None


def initialize(
    x,
    y,
    num_experts: int = 2,
    link: str | Link = "linear",
    method: str = "auto",
    *,
    n_init: int = 5,
    noise: float | None = None,
    chunk_size: int = 4096,
    seed: int = 0,
    num_threads: int | None = None,
) -> MoEEstimate:
    """A point estimate for any data: the tensor start where it applies, multi-start EM elsewhere.

    Parameters
    ----------
    x : Tensor or array (n, d)
    y : Tensor or array (n,)
    num_experts : int
        ``k >= 2``.
    link : str or Link
    method : {"auto", "tensor", "em"}
        ``"tensor"``: :func:`tensor_init` followed by joint EM (``refine=True``, no random starts);
        errors where the moments cannot apply (``k > d``, too few rows, T2 rank below k).
        ``"em"``: joint EM from ``n_init`` random starts, best log-likelihood wins.
        ``"auto"``: the tensor start followed by EM when ``k <= d`` and the moment step succeeds,
        guarded by :data:`AUTO_RANDOM_STARTS` random-start EM fits (the best log-likelihood wins: a
        seed in the wrong place is worse than none) and a sanity check (finite parameters, gate
        weights below :data:`MAX_SANE_GATE_NORM` per sd of x); otherwise multi-start EM with
        ``n_init`` starts.
    n_init : int
        Random starts of the EM fallback (``method="em"``, or ``"auto"`` when it falls back).
    noise : float, optional
        Known noise standard deviation for the moment step.
    chunk_size : int
        Rows per chunk of the moment passes.
    seed : int or None
        ``None`` draws a fresh seed; the one used is ``diagnostics["seed"]``.
    num_threads : int, optional
        torch threads for the call (None: leave torch's setting; 1 is fastest for small data on a
        shared machine).

    Returns
    -------
    MoEEstimate
        With ``diagnostics["initializer"]`` (``"tensor"``: the moment start ran, with EM after it;
        ``"em"``: multi-start EM only), ``diagnostics["initializer_reason"]`` (why, and for
        ``"auto"`` which start won: ``diagnostics["refine_winner"]``), and the diagnostics of
        the method that ran (shown by ``summary()``).

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
    if method not in ("auto", "tensor", "em"):
        raise ValueError(f"method must be 'auto', 'tensor' or 'em'; got {method!r}")
    x, y, k, link, noise, chunk_size, seed = check_arguments(
        x, y, num_experts, link, noise, chunk_size, seed
    )
    n_init = check_positive(n_init, "n_init", integer=True)
    num_threads = check_num_threads(num_threads)
    with torch_threads(num_threads):
        return _initialize(
            x, y, k, link, method, n_init=n_init, noise=noise, chunk_size=chunk_size, seed=seed
        )


@on_exact_scale("estimate", noise="y")
def _initialize(x, y, k, link, method, *, n_init, noise, chunk_size, seed) -> MoEEstimate:
    """:func:`initialize` on checked arguments."""
    n, d = x.shape
    check_enough_rows(
        n,
        num_parameters(d, k),
        k,
        model=f"a mixture of {k} experts on {d} input(s) with biases",
        stacklevel=5,
    )
    with warnings.catch_warnings():
        # the rows were checked (and warned about) once, here; collapse is reported for the
        # returned fit only
        warnings.simplefilter("ignore", SmallDataWarning)
        warnings.simplefilter("ignore", CollapseWarning)
        estimate = _choose(x, y, k, link, method, n_init, noise, chunk_size, seed)
    diagnostics = estimate.diagnostics
    warn_collapse(
        diagnostics.get("collapsed_experts", []),
        diagnostics.get("effective_rows", []),
        d,
        stacklevel=5,
    )
    return estimate


def _choose(x, y, k, link, method, n_init, noise, chunk_size, seed) -> MoEEstimate:
    """The start for :func:`initialize` (``method`` on checked, ordinary-scale data)."""
    d = x.shape[1]

    def labelled(estimate: MoEEstimate, initializer: str, reason: str) -> MoEEstimate:
        diagnostics = {"initializer": initializer, "initializer_reason": reason, "seed": seed}
        diagnostics.update(estimate.diagnostics)
        return replace(estimate, diagnostics=diagnostics)

    def multistart(reason: str) -> MoEEstimate:
        fit = fit_em(x, y, k, link, n_init=n_init, seed=seed)
        return labelled(
            fit,
            "em",
            f"{reason}; multi-start EM with n_init={n_init}, best "
            f"log-likelihood of start {fit.diagnostics.get('best_start')} kept",
        )

    if method == "em":
        return multistart("method='em' was asked for")
    if method == "tensor":
        estimate = tensor_init(
            x,
            y,
            k,
            link,
            noise=noise,
            refine=True,
            random_starts=0,
            chunk_size=chunk_size,
            seed=seed,
        )
        return labelled(estimate, "tensor", "method='tensor' was asked for")
    if k > d:
        return multistart(
            f"the moment start needs num_experts <= in_features, got {k} experts and {d} "
            "input(s) (T2 has rank at most d)"
        )
    try:
        estimate = tensor_init(
            x,
            y,
            k,
            link,
            noise=noise,
            refine=True,
            random_starts=AUTO_RANDOM_STARTS,
            chunk_size=chunk_size,
            seed=seed,
        )
    except MomentsNotApplicableError as error:
        return multistart(f"the moment start could not apply ({error})")
    problem = _sanity_problem(estimate, x)
    if problem is not None:
        # Typically the likelihood pushes the gate to a step function (a split that separates the
        # data). Refit from the moment estimate as MAP with the model's default gate prior scale,
        # which keeps the gate moderate, as the Bayesian model will.
        moment = tensor_init(x, y, k, link, noise=noise, chunk_size=chunk_size, seed=seed)
        estimate = fit_em(x, y, k, link, init=moment, prior_scale=MAP_PRIOR_SCALE, seed=seed)
        second = _sanity_problem(estimate, x)
        if second is not None:
            return multistart(f"the tensor start -> EM estimate is not a sane seed: {problem}")
        diagnostics = dict(moment.diagnostics)
        diagnostics.update(estimate.diagnostics)
        estimate = replace(estimate, method="tensor+map", diagnostics=diagnostics)
        return labelled(
            estimate,
            "tensor",
            f"k <= d and the moment step succeeded, but plain EM from it was not a sane seed "
            f"({problem}); refitted from the moment estimate as MAP EM with a Normal(0, "
            f"{MAP_PRIOR_SCALE:g}^2) prior on weights and biases (the model's default gate prior)",
        )
    winner = estimate.diagnostics.get("refine_winner", "tensor")
    reason = (
        f"k <= d and the moment step succeeded; tensor start -> EM checked against "
        f"{AUTO_RANDOM_STARTS} random-start EM fits: the {winner} start had the best "
        "log-likelihood and was kept"
    )
    return labelled(estimate, "tensor", reason)
