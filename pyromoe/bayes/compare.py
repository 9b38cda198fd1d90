"""Choosing the number of experts: fit each k, compare by PSIS-LOO (``arviz.compare``).

flexmix's ``stepFlexmix(k = 1:K)`` in the Bayesian workflow: for every k the start comes from
:func:`pyromoe.initialize` (k = 1: a plain regression by EM), the posterior from
:func:`~pyromoe.bayes.svi.fit_svi` or :func:`~pyromoe.bayes.nuts.run_nuts`, and the table from
:func:`arviz.compare` on the pointwise log-likelihoods. k = 1 is the regression baseline a mixture
has to beat.
"""

from __future__ import annotations

from collections.abc import Sequence

import arviz as az

from .._validation import (
    check_flag,
    check_forwarded,
    check_noise_model,
    check_num_experts,
    check_seed,
    one_of,
    pandas_feature_names,
    validate,
)
from ..core.design import as_design_source
from ..core.links import link_rule
from ..estimators.initialize import initialize
from .model import MixtureOfExperts
from .nuts import run_nuts
from .svi import fit_svi

__all__ = ["compare_experts"]

_INFERENCE = ("svi", "nuts")


def _num_experts_rule(num_experts, name: str) -> list[int]:
    if isinstance(num_experts, (str, bytes)) or not isinstance(num_experts, Sequence):
        raise TypeError(
            f"{name} must be a sequence of ints, e.g. {name}=(1, 2, 3); got "
            f"{type(num_experts).__name__}"
        )
    values = [check_num_experts(k, minimum=1) for k in num_experts]
    if len(values) < 2:
        raise ValueError(f"{name} must list at least two values to compare; got {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat a value; got {values}")
    return values


#: how :func:`compare_experts` checks its arguments, once per call (the fit's own arguments,
#: ``**fit_kwargs``, by the fit's rules)
COMPARE_EXPERTS_RULES = {
    "num_experts": _num_experts_rule,
    "inference": one_of(*_INFERENCE),
    "noise": check_noise_model,
    "bias": check_flag,
    "link": link_rule,
    "seed": check_seed,
}


@validate(COMPARE_EXPERTS_RULES)
def compare_experts(
    x,
    y,
    num_experts: Sequence[int] = (1, 2, 3),
    link="linear",
    *,
    inference: str = "svi",
    noise: str = "shared",
    bias: bool = True,
    seed: int = 0,
    z=None,
    **fit_kwargs,
):
    """Fit one mixture per number of experts and rank them by expected log predictive density.

    Parameters
    ----------
    x : Tensor, ndarray or DataFrame (n, d)
    y : Tensor or ndarray (n,)
    num_experts : sequence of int
        The k to compare (each >= 1, distinct, at least two).
    link : str or Link
    inference : {"svi", "nuts"}
        :func:`~pyromoe.bayes.svi.fit_svi` (fast; LOO on the guide's draws is an approximation)
        or :func:`~pyromoe.bayes.nuts.run_nuts`.
    noise : {"shared", "per_expert"}
        The noise model of every fit.
    bias : bool
        Expert intercepts and gate offsets.
    seed : int or None
        Seeds every start and fit (the one used is ``fits[label].attrs["seed"]``).
    z : Tensor, ndarray or DataFrame (n, d_z), optional
        The gate's own covariates (as in :func:`~pyromoe.fit_em`), for every fit with k >= 2
        (k = 1 has no gate).
    **fit_kwargs
        Passed to the fitting function (``num_steps``, ``num_samples``, ``num_chains``,
        ``num_warmup``, ``progress``, ``pointwise``, ...). ``progress`` defaults to False.
        ``pointwise`` (default ``"auto"``, :mod:`pyromoe.bayes.pointwise`) bounds the rows of
        every fit's ``log_likelihood``; with the same seed, rows and draws every fit keeps the
        same rows, so the fits are compared row for row. Over the budget the table's
        ``elpd_loo`` and ``se`` are sums over those ``attrs["pointwise_num_rows"]`` rows: divide
        by it for the elpd per row, or multiply by ``num_rows / pointwise_num_rows`` for an
        estimate over every row (its se, so scaled, includes the subsampling error).

    Returns
    -------
    (table, fits) : (pandas.DataFrame, dict of str -> arviz.InferenceData)
        ``table`` is :func:`arviz.compare`'s table (PSIS-LOO, ``elpd_loo``, ``dse``, ``warning``
        ...) indexed ``"k=1"``, ``"k=2"``, ...; ``fits`` maps the same labels to the fits, each
        started from :func:`pyromoe.initialize` (its reason in ``attrs["init"]`` and the
        estimate's diagnostics). ArviZ's warnings (e.g. Pareto k above 0.7) are passed on.

    Raises
    ------
    ValueError, TypeError
        For bad ``num_experts`` (fewer than two values, repeats, values below 1), ``inference``,
        ``noise``, or the checks of the fitting functions; all before any fit.

    Examples
    --------
    >>> from pyromoe import simulate
    >>> data = simulate(400, 2, seed=0)
    >>> table, fits = compare_experts(data.x, data.y, (1, 2), num_steps=50, num_samples=50)
    >>> sorted(fits)
    ['k=1', 'k=2']
    """
    fit = fit_svi if inference == "svi" else run_nuts
    fit_kwargs.setdefault("progress", False)
    fit_kwargs = check_forwarded(fit, fit_kwargs)
    if fit_kwargs.get("feature_names") is None:
        names = [pandas_feature_names(x)] + ([] if z is None else [pandas_feature_names(z)])
        fit_kwargs["feature_names"] = None if None in names else sum(names, [])
    # the data, checked once for every start and fit
    source, gate_features = as_design_source(x, y, z, min_rows=2)
    # on another device the fit moves the data there (the starts stay on x's device)
    fit_data = (source, None) if fit_kwargs.get("device") is None else (x, y)
    fit_z = z if fit_kwargs.get("device") is not None else None
    d = source.in_features - (gate_features or 0)
    fits = {}
    for k in num_experts:
        estimate = initialize.unchecked(
            source, None, k, link, noise=noise, seed=seed, gate_features=gate_features
        )
        model = MixtureOfExperts(d, k, link, bias=bias, noise=noise, gate_features=gate_features)
        fits[f"k={k}"] = fit.unchecked(
            model, *fit_data, z=fit_z, init=estimate, seed=seed, **fit_kwargs
        )
    table = az.compare(fits)
    return table, fits
