"""``fit_gate``: gate EM, the EM loop of :mod:`pyromoe.core.em` with the experts frozen
(docs/algorithm.md section 4).

With the experts known (from the tensor step, or the truth in a test), the gate of a mixture of
experts is learnt by EM: the E-step computes responsibilities ``r_ni = p(expert i | x_n, y_n)``
with the one likelihood implementation (:func:`pyromoe.core.likelihood.component_log_probs`); the
M-step is a weighted logistic (k = 2) or multinomial logistic (k > 2, expert 0 the reference)
regression of ``r`` on ``x``, which is concave, solved by one Newton (IRLS) step per EM iteration
from the gradient and Hessian summed over the rows; the noise has a closed-form update. The loop,
the one pass per iteration over chunks of any data source, the M-steps and the warnings are those
of joint EM (:class:`pyromoe.core.em.loop.EM` with ``update_experts=False``); this module checks
the arguments and builds the start. Pure torch on the data's device and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .._validation import (
    as_tensor,
    check_enough_rows,
    check_flag,
    check_num_experts,
    check_positive,
    check_seed,
    count_rule,
    optional,
    user_stacklevel,
    validate,
)
from ..core.design import as_design_source
from ..core.em.loop import EM
from ..core.em.m_step import feature_scale
from ..core.likelihood import expert_means
from ..core.links import Link, link_rule
from ..core.params import Params
from ..core.sources import Source
from ..core.threads import check_num_threads, torch_threads
from ..core.units import on_exact_scale
from .em import EM_RULES, em_options

__all__ = ["GateFit", "fit_gate"]


def _check_matrix(value, name: str, shape: tuple[int, ...], like: torch.Tensor, meaning: str):
    tensor = as_tensor(value, name, like=like)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({meaning}); got {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


@dataclass(frozen=True)
class GateFit:
    """Result of :func:`fit_gate`.

    Attributes
    ----------
    gate_weight : Tensor (k - 1, d)
        Gate weights (expert 0 is the reference, logit 0).
    gate_bias : Tensor (k - 1,)
        Gate offsets (the initial value, zeros by default, when ``fit_bias=False``).
    noise : Tensor ()
        Noise standard deviation.
    log_likelihood_trace : list of float
        The objective at the start and after every EM iteration: the mean per-row log-likelihood, or
        for MAP (``prior_scale`` given) the log posterior divided by ``n``. Non-decreasing up to
        rounding.
    converged : bool
        Whether the objective changed by less than ``tol`` (or the extrapolated remaining gain
        fell below ``gain_tol``) before ``max_iter`` iterations.
    n_iter : int
        Number of EM iterations run.
    seed : int or None
        The seed used (drawn afresh when ``fit_gate`` got ``seed=None``).
    effective_rows : list of float
        Sum of each expert's responsibilities at the end.
    collapsed_experts : list of int
        Experts with fewer than ``d + 1`` effective rows (or, with the noise at its floor, the
        one with the fewest); a :class:`CollapseWarning` named them.
    """

    gate_weight: torch.Tensor
    gate_bias: torch.Tensor
    noise: torch.Tensor
    log_likelihood_trace: list[float]
    converged: bool
    n_iter: int
    seed: int | None = None
    effective_rows: list[float] = field(default_factory=list)
    collapsed_experts: list[int] = field(default_factory=list)


def _noise_rule(noise, name: str) -> float | None:
    """A known noise sd: None, or a positive number (a one-element tensor or array too)."""
    if noise is None:
        return None
    if isinstance(noise, torch.Tensor) or hasattr(noise, "__array__"):
        shape = tuple(getattr(noise, "shape", ()))
        if math.prod(shape) != 1:
            raise ValueError(f"{name} must be a positive scalar; got shape {shape}")
        noise = noise.item() if hasattr(noise, "item") else float(noise)
    return check_positive(noise, name)


#: how :func:`fit_gate` checks its arguments, once per call (:func:`pyromoe._validation.validate`)
FIT_GATE_RULES = {
    **EM_RULES,
    "chunk_size": optional(count_rule(minimum=1)),
    "link": link_rule,
    "seed": check_seed,
    "fit_bias": check_flag,
    "fit_noise": check_flag,
    "num_threads": check_num_threads,
    "noise": _noise_rule,
    "gain_tol": optional(check_positive),
}


@validate(FIT_GATE_RULES)
def fit_gate(
    x,
    y,
    experts_weight,
    experts_bias,
    link: str | Link,
    *,
    z=None,
    gate_features: int | None = None,
    noise=None,
    init_gate_weight=None,
    init_gate_bias=None,
    fit_bias: bool = True,
    fit_noise: bool = True,
    prior_scale: float | None = None,
    tol: float = 1e-6,
    max_iter: int = 100,
    gain_tol: float | None = None,
    seed: int = 0,
    newton_steps: int = 1,
    chunk_size: int | None = None,
    device=None,
    num_threads: int | None = None,
) -> GateFit:
    """Fit the gate (and the noise) by EM with the experts fixed (docs/algorithm.md section 4).

    E-step: responsibilities from :func:`pyromoe.core.likelihood.component_log_probs`. M-step: a
    Newton step of the weighted logistic / multinomial logistic regression and, if ``fit_noise``,
    ``noise^2 = mean_n sum_i r_ni (y_n - g(a_i . x_n + b_i))^2``, from sums over chunks of rows
    (:class:`pyromoe.core.em.loop.EM`, one pass per iteration). The objective (mean log-likelihood, or
    log posterior / n for MAP) never decreases. Runs on the data's device and dtype.

    Parameters
    ----------
    x : Tensor, ndarray, numpy memmap or dask.array.Array (n, d)
        Inputs, one row per observation (:func:`pyromoe.core.sources.as_source`).
    y : the same kinds (n,)
        Outputs.
    experts_weight : Tensor or ndarray (k, d)
        Fixed expert weights.
    experts_bias : Tensor or ndarray (k,), or None
        Fixed expert intercepts (``None``: zeros).
    link : str or Link
        Expert link.
    z : Tensor, ndarray, DataFrame or dask.array.Array (n, d_z), optional
        The gate's own covariates (the gate is then ``softmax(w . z + c)``); default: ``x``.
    gate_features : int, optional
        Instead of ``z``: ``x`` holds the joined design ``[x | z]`` and its last
        ``gate_features`` columns are the gate's (e.g. one memory map of both).
    noise : float or 0-d Tensor, optional
        Starting noise standard deviation (the fixed one when ``fit_noise=False``). Default: the
        root-mean-square residual of each row's best-fitting expert (biased low when experts overlap;
        EM corrects it).
    init_gate_weight : Tensor or ndarray (k - 1, d) (or (k - 1, d_z) with ``z``), optional
        Starting gate weights. Default: random, ``N(0, 0.25 / d)`` per weight divided by the column's
        standard deviation, from a ``torch.Generator`` seeded with ``seed``.
    init_gate_bias : Tensor or ndarray (k - 1,), optional
        Starting gate offsets (default zeros).
    fit_bias : bool
        Whether to fit the gate offsets (otherwise they stay at ``init_gate_bias``).
    fit_noise : bool
        Whether to update the noise.
    prior_scale : float, optional
        ``s`` of a ``Normal(0, s^2)`` prior on every gate weight and offset: MAP instead of ML, and
        the trace holds the log posterior / n. ``None``: maximum likelihood.
    tol : float
        Stop when the objective (per row) changes by less than ``tol``.
    max_iter : int
        Maximum number of EM iterations.
    gain_tol : float, optional
        Instead of ``tol``: stop once the gain the run has left, extrapolated from its last two
        increments (EM converges linearly: ``delta r / (1 - r)`` at a rate ``r``), summed over
        the rows is below ``gain_tol`` nats (:func:`pyromoe.core.em.loop.remaining_gain`). A
        per-row ``tol`` stops short at large n (docs/algorithm.md section 4); ``gain_tol=0.01``
        leaves the gate within about 0.14 standard errors of its optimum. ``None``: ``tol``.
    seed : int or None
        Seed of the random starting gate (``None``: a fresh one, recorded in ``GateFit.seed``).
    newton_steps : int
        Newton steps per M-step (default 1; each further step costs one more pass and rarely saves
        an EM iteration).
    chunk_size : int, optional
        Rows per chunk of every pass over the data (default
        :func:`pyromoe.core.chunks.default_chunk_size`).
    device, num_threads
        As in :func:`pyromoe.fit_em`.

    Returns
    -------
    GateFit

    Raises
    ------
    ValueError, TypeError
        For malformed inputs (shapes, NaN, non-positive ``noise``/``tol``/``max_iter``...), and for
        fewer rows than the gate's free parameters + 1 (``(k - 1)(d + 1)`` and the noise) or
        ``k > n``.

    Warns
    -----
    ConvergenceWarning
        When ``max_iter`` is reached before convergence.
    CollapseWarning
        When an expert ends with fewer than ``d + 1`` effective rows or the noise at its floor
        (``1e-3 sd(y)``).
    UserWarning
        Under :data:`pyromoe._validation.ROWS_PER_PARAMETER_WARN` rows per free parameter.

    Notes
    -----
    Columns of ``x`` (and ``y``) of extreme magnitude (beyond ``1e77`` or under ``1e-77`` in
    float64) are divided by exact powers of two before fitting and the fit is mapped back.

    Examples
    --------
    >>> from pyromoe import simulate
    >>> data = simulate(5000, 3, seed=0)
    >>> t = data.truth
    >>> fit = fit_gate(data.x, data.y, t.experts_weight, t.experts_bias, "linear")
    >>> fit.converged, fit.gate_weight.shape
    (True, torch.Size([1, 3]))
    """
    source, gate_features = as_design_source(
        x, y, z, gate_features=gate_features, device=device, min_rows=2
    )
    em = em_options(source, tol, max_iter, prior_scale, newton_steps, 1, chunk_size)
    n, d = source.shape
    d_gate = d if gate_features is None else gate_features
    d -= gate_features or 0  # the experts' inputs
    x = torch.empty(0, dtype=source.dtype, device=source.device)  # device and dtype to follow
    experts_weight = as_tensor(experts_weight, "experts_weight", like=x)
    if experts_weight.dim() != 2 or experts_weight.shape[1] != d:
        raise ValueError(
            f"experts_weight must have shape (k, d) = (num_experts, {d}) to match x; "
            f"got {tuple(experts_weight.shape)}"
        )
    k = experts_weight.shape[0]
    if k < 2:
        raise ValueError(f"experts_weight must have at least 2 rows (one per expert); got {k}")
    check_num_experts(k)
    if not bool(torch.isfinite(experts_weight).all()):
        raise ValueError("experts_weight contains NaN or infinite values")
    if experts_bias is None:
        experts_bias = torch.zeros(k, dtype=x.dtype, device=x.device)
    else:
        experts_bias = _check_matrix(experts_bias, "experts_bias", (k,), x, "one per expert")
    gate_weight = init_gate_weight
    if gate_weight is not None:
        gate_weight = _check_matrix(
            gate_weight,
            "init_gate_weight",
            (k - 1, d_gate),
            x,
            "num_experts - 1 rows, a column per input of the gate",
        )
    if init_gate_bias is None:
        gate_bias = torch.zeros(k - 1, dtype=x.dtype, device=x.device)
    else:
        gate_bias = _check_matrix(
            init_gate_bias, "init_gate_bias", (k - 1,), x, "one per non-reference expert"
        )
    if noise is not None:
        noise = torch.tensor(noise, dtype=x.dtype, device=x.device)
    em.update(update_gate_bias=fit_bias, update_noise=fit_noise, gain_tol=gain_tol)
    start = Params(experts_weight, experts_bias, gate_weight, gate_bias, noise)
    with torch_threads(num_threads):
        source.summary(em["chunk_size"])  # out-of-core data: the NaN check is this first pass
        return _fit_gate(source, start, link, em=em, seed=seed)


@on_exact_scale({"gate_weight": "gate_weight", "noise": "noise"}, start="params")
def _fit_gate(source: Source, start: Params, link: Link, *, em: dict, seed: int) -> GateFit:
    """:func:`fit_gate` on checked arguments: ``start`` may lack the gate weights and the noise
    (then drawn / estimated here); ``em``: the options of :class:`pyromoe.core.em.loop.EM`."""
    n, total = source.shape
    k = start.num_experts
    d = total - start.in_features or total  # the gate's inputs: its own columns, or all of x
    width = d + 1 if em["update_gate_bias"] else d
    parameters = (k - 1) * width + (1 if em["update_noise"] else 0)
    check_enough_rows(
        n,
        parameters,
        k,
        model=f"the gate of {k} experts on {d} input(s)",
        stacklevel=user_stacklevel(1),
    )
    gate_em = EM(source, link, update_experts=False, **em)
    like = torch.empty(0, dtype=source.dtype, device=source.device)
    if start.gate_weight is None:
        generator = torch.Generator().manual_seed(seed)
        raw = torch.randn(k - 1, d, generator=generator, dtype=torch.float64)
        scale = feature_scale(source).to(like)[total - d :]
        start = start._replace(gate_weight=raw.to(like) * (0.5 / math.sqrt(d)) / scale)
    if start.noise is None:
        # each row's best-fitting expert: biased low when experts overlap; EM corrects it
        total = source.reduce(_best_squared_residual, em["chunk_size"], start, link)
        best_residual = (total / n).sqrt().to(like)
        start = start._replace(noise=best_residual.clamp_min(gate_em.floor))
    runs, _ = gate_em.fit([start], stacklevel=user_stacklevel())
    run = runs[0]
    return GateFit(
        gate_weight=run.params.gate_weight,
        gate_bias=run.params.gate_bias,
        noise=run.params.noise.reshape(()),
        log_likelihood_trace=run.trace,
        converged=run.converged,
        n_iter=run.n_iter,
        seed=seed,
        effective_rows=run.effective_rows,
        collapsed_experts=run.collapsed_experts,
    )


def _best_squared_residual(x, y, params: Params, link: Link) -> torch.Tensor:
    """``sum_n min_i (y_n - g(a_i . x_n + b_i))^2`` of one chunk (float64)."""
    means = expert_means(x, params.experts_weight, params.experts_bias, link)
    return (y[:, None] - means).pow(2).min(dim=-1).values.sum().to(torch.float64)
