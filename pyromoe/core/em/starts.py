"""Random starts for EM, scaled to the data: plain draws and screened starts.

:func:`random_start` draws one start from column means and standard deviations only;
:func:`screened_start` (what :func:`pyromoe.fit_em`'s random starts are) keeps the best of a few
draws after short EM runs on a random subsample, which sorts out most starts in a wrong basin when
the experts are similar (benchmarks/results/random_starts.md). :func:`start_params` puts any start
on the data's device and dtype with the fit's noise model and offsets.
"""

from __future__ import annotations

import warnings

import torch

from ..._validation import as_tensor, check_noise_model, check_positive
from ..chunks import default_chunk_size
from ..estimate import MoEEstimate
from ..links import Link, get_link
from ..params import Params
from ..sources import TensorSource, as_source
from .loop import EM, CollapseWarning, ConvergenceWarning
from .m_step import feature_scale, noise_floor

__all__ = [
    "SCREEN_CANDIDATES",
    "SCREEN_MAX_ITER",
    "SCREEN_ROWS",
    "SCREEN_TOL",
    "random_start",
    "screened_start",
    "start_params",
]


def random_start(
    x,
    y,
    num_experts: int,
    link: str | Link,
    generator: torch.Generator,
    *,
    bias: bool = True,
    gate_features: int | None = None,
) -> MoEEstimate:
    """A random starting point for EM, scaled to the data.

    Expert weights ``a_ij ~ N(0, var(y) / d) / sd(x_j)`` (so ``a_i . x`` has about the spread of
    ``y``); gate weights ``N(0, 0.1^2 / d) / sd(x_j)`` (a nearly flat gate, so the first E-step is
    driven by the experts); offsets centre each linear predictor at the mean of ``x`` (plus the mean
    of ``y`` for the identity link) when ``bias``, else zero; noise ``sd(y)``. Draws come from
    ``generator`` (CPU, float64) and are then moved to the data's device and dtype, so a seed gives
    the same start on any device. Only column means and standard deviations are read
    (:meth:`pyromoe.core.sources.Source.summary`).

    Parameters
    ----------
    x : Tensor (n, d), or a Source (then ``y`` is ignored)
    y : Tensor (n,)
    num_experts : int
    link : str or Link
    generator : torch.Generator
        CPU generator.
    bias : bool
        Whether the model has offsets.
    gate_features : int, optional
        The gate's own covariates are the last ``gate_features`` columns of ``x`` (the experts'
        the others, :mod:`pyromoe.core.likelihood`); default: both read every column.

    Returns
    -------
    MoEEstimate (method ``"random"``)

    Examples
    --------
    >>> x, y = torch.randn(100, 3), torch.randn(100)
    >>> random_start(x, y, 2, "linear", torch.Generator().manual_seed(0)).experts_weight.shape
    torch.Size([2, 3])
    """
    source = as_source(x, y)
    summary = source.summary()
    like = torch.empty(0, dtype=source.dtype, device=source.device)
    total = source.in_features
    d = total if gate_features is None else total - gate_features
    d_gate = total if gate_features is None else gate_features
    k = num_experts
    link = get_link(link)  # a name from a direct caller; the fits pass a Link, taken as it is
    scale = feature_scale(source).to(like)
    y_sd = torch.tensor(max(summary.y_sd, noise_floor(source))).to(like)
    x_mean = summary.x_mean.to(like)
    experts_scale, gate_scale = scale[:d], scale[total - d_gate :]

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(like)

    experts_weight = normal(k, d) * (y_sd / d**0.5) / experts_scale
    gate_weight = normal(k - 1, d_gate) * (0.1 / d_gate**0.5) / gate_scale
    if bias:
        experts_bias = -(experts_weight @ x_mean[:d])
        if link.is_identity:
            experts_bias = experts_bias + summary.y_mean
        gate_bias = -(gate_weight @ x_mean[total - d_gate :])
    else:
        experts_bias = like.new_zeros(k)
        gate_bias = like.new_zeros(k - 1)
    return MoEEstimate(
        experts_weight=experts_weight,
        experts_bias=experts_bias,
        gate_weight=gate_weight,
        gate_bias=gate_bias,
        noise=y_sd,
        link=link,
        method="random",
    )


#: A screened start (:func:`screened_start`, what :func:`pyromoe.fit_em`'s random starts are): the best of
#: ``SCREEN_CANDIDATES`` random draws after at most ``SCREEN_MAX_ITER`` EM iterations (tolerance
#: ``SCREEN_TOL``) on a random subsample of ``SCREEN_ROWS`` rows (all rows when there are fewer).
#: Measured in benchmarks/results/random_starts.md: on similar experts at k = 3 one plain draw ended
#: in a wrong basin on 8-15% of the starts, a screened start on none of 400 (four settings).
#: The subsample's size matters more than the number of candidates: at cosine 0.95, k = 3
#: (n = 5000 and 20000, 100 starts each) 2000 rows left 5 starts in a wrong basin with 4
#: candidates and with 8, 5000 rows none.
SCREEN_CANDIDATES = 4
SCREEN_ROWS = 5000
SCREEN_MAX_ITER = 50
SCREEN_TOL = 1e-5


def screened_start(
    x,
    y,
    num_experts: int,
    link: str | Link,
    generator: torch.Generator,
    *,
    candidates: int = SCREEN_CANDIDATES,
    rows: int = SCREEN_ROWS,
    bias: bool = True,
    noise: str = "shared",
    prior_scale: float | None = None,
    chunk_size: int | None = None,
    gate_features: int | None = None,
) -> MoEEstimate:
    """The best of ``candidates`` random starts after short EM runs on a random subsample.

    Each candidate is a :func:`random_start` draw (scaled to all the data); EM runs from each on
    the same ``rows`` rows drawn at random (all rows when ``n <= rows``), for at most
    :data:`SCREEN_MAX_ITER` iterations with tolerance :data:`SCREEN_TOL`, and the one with the
    highest objective there is returned. A single draw often starts EM in a wrong basin when the
    experts are similar (benchmarks/random_starts.py); a few short fits on a subsample sort out
    most of those at the cost of ``candidates * SCREEN_MAX_ITER`` passes over ``rows`` rows,
    whatever ``n``. Draws (rows and candidates) come from ``generator``.

    Parameters
    ----------
    x, y, num_experts, link, generator
        As in :func:`random_start`.
    candidates : int
        Random draws screened (1: the plain :func:`random_start`, no EM).
    rows : int
        Rows of the screening subsample.
    bias, noise, prior_scale : as in :func:`pyromoe.fit_em`
    gate_features : int, optional
        As in :func:`random_start`.
    chunk_size : int, optional
        Rows per chunk of the screening passes (default :func:`default_chunk_size`).

    Returns
    -------
    MoEEstimate
        ``method="random"``; ``diagnostics``: ``screened`` (candidates), ``screen_rows``,
        ``screen_objective_per_candidate`` (each candidate's objective on the subsample) and
        ``screen_best``.

    Examples
    --------
    >>> from pyromoe import simulate
    >>> data = simulate(500, 3, seed=0)
    >>> start = screened_start(data.x, data.y, 2, "linear", torch.Generator().manual_seed(0))
    >>> start.diagnostics["screened"], start.diagnostics["screen_rows"]
    (4, 500)
    """
    source = as_source(x, y)
    link = get_link(link)  # a name from a direct caller; the fits pass a Link, taken as it is
    candidates = check_positive(candidates, "candidates", integer=True)
    rows = check_positive(rows, "rows", integer=True)
    per_expert = check_noise_model(noise) == "per_expert"
    draws = [
        random_start(
            source, None, num_experts, link, generator, bias=bias, gate_features=gate_features
        )
        for _ in range(candidates)
    ]
    if candidates == 1 or num_experts == 1:
        return draws[0]
    n = source.num_rows
    sub = source if n <= rows else TensorSource(*source.subsample(rows, generator))
    like = torch.empty(0, dtype=source.dtype, device=source.device)
    starts = [start_params(draw, like, bias, per_expert) for draw in draws]
    em = EM(
        sub,
        link,
        update_gate_bias=bias,
        prior_scale=prior_scale,
        tol=SCREEN_TOL,
        max_iter=SCREEN_MAX_ITER,
        chunk_size=default_chunk_size(source.in_features) if chunk_size is None else chunk_size,
    )
    with warnings.catch_warnings():  # short fits: stopping early and collapsing are expected
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", CollapseWarning)
        runs, best = em.fit(starts)
    k = num_experts
    params = runs[best].params
    params = params._replace(noise=params.noise.reshape((k,) if per_expert else ()))
    diagnostics = {
        "screened": candidates,
        "screen_rows": min(n, rows),
        "screen_objective_per_candidate": [r.objective for r in runs],
        "screen_best": best,
    }
    return MoEEstimate.from_params(params, link, method="random", diagnostics=diagnostics)


def start_params(
    start: MoEEstimate, like: torch.Tensor, bias: bool, per_expert: bool = False
) -> Params:
    """A start's parameters on ``like``'s device and dtype; without ``bias`` no offsets at all;
    ``per_expert``: one noise sd per expert (a shared one is repeated), else one shared sd (the
    root mean square of per-expert ones)."""
    noise = as_tensor(start.noise, "noise", like=like)
    k = start.num_experts
    if per_expert and noise.dim() == 0:
        noise = noise.expand(k).clone()
    elif not per_expert and noise.dim() == 1:
        noise = noise.pow(2).mean().sqrt()
    params = start.params.like(like)._replace(noise=noise)
    return params if bias else params._replace(experts_bias=None, gate_bias=None)
