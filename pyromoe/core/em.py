"""One EM loop for the gated mixture of experts: joint EM and gate EM (docs/algorithm.md section 4).

Joint EM (:func:`fit_em`) is what mixtools / flexmix users run today: EM from random starts, keeping
the start with the best final objective. It can get stuck in a local optimum (similar experts),
which is what the tensor start of :mod:`pyromoe.estimators.tensor_init` avoids; started from that
estimate (``init=``) it is the refinement step. Gate EM (:func:`pyromoe.core.gate.fit_gate`) is the
same loop with the experts frozen (``EM(update_experts=False)``).

The loop (:meth:`EM.fit`) is scikit-learn's ``BaseMixture.fit_predict``: a plain double loop over
starts and iterations, tracking the objective (mean log-likelihood per row, or log posterior / n
for MAP), ``n_iter`` and ``converged``, keeping the best start and warning
(:class:`ConvergenceWarning`) when that start did not converge.

Each iteration is ONE pass over the data, in chunks (:meth:`pyromoe.core.sources.Source.reduce`,
so a memory map or a Dask array is never loaded whole): :func:`pass_statistics` sums, per chunk,
the log-likelihood, the responsibilities' totals, the per-expert weighted Gram matrices and
cross-products (identity link) or Gauss-Newton normal equations (other links), the gate's IRLS
gradient and Hessian, and the weighted squared residuals. The M-step (:meth:`EM.m_step`) solves
from those sums alone: weighted least squares per expert in closed form (identity link) or one
Gauss-Newton step (using ``Link.derivative``); one damped Newton step for the gate; the noise in
closed form. The pass at the proposed parameters gives their objective; a step that lowered it is
halved (one more pass each), so the trace never decreases. Extra memory is one chunk plus the
sums, ``O(chunk_size (d + k) + k d^2)`` for any n, and the result does not depend on the chunk
size beyond rounding.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .._validation import (
    as_tensor,
    check_count,
    check_enough_rows,
    check_flag,
    check_link,
    check_noise_model,
    check_num_experts,
    check_positive,
    check_seed,
    keeps_feature_names,
    num_parameters,
    on_exact_scale,
)
from .estimate import MoEEstimate
from .likelihood import (
    gate_logits,
    linear_predictors,
    log_likelihood,
    log_probs_from_predictors,
)
from .links import Link
from .params import Params
from .sources import DEFAULT_CHUNK_SIZE, Source, TensorSource, as_source
from .threads import check_num_threads, torch_threads

__all__ = [
    "CollapseWarning",
    "ConvergenceWarning",
    "EM",
    "EMRun",
    "MAX_HALVINGS",
    "NOISE_FLOOR",
    "Statistics",
    "check_em_arguments",
    "default_chunk_size",
    "feature_scale",
    "fit_em",
    "gate_m_step",
    "log_prior",
    "mean_log_likelihood",
    "noise_floor",
    "pass_statistics",
    "random_start",
    "screened_start",
    "solve_linear_experts",
    "warn_collapse",
]


class ConvergenceWarning(UserWarning):
    """An EM run stopped at ``max_iter`` before its objective changed by less than ``tol``."""


class CollapseWarning(UserWarning):
    """An EM fit ended with an expert holding fewer than ``d + 1`` effective rows, or with the
    noise at its floor: the expert is collapsing onto a few points (too many experts)."""


# ---------------------------------------------------------------------------------------------- helpers
#: The noise floor of EM, relative to the spread of y (:func:`noise_floor`).
NOISE_FLOOR = 1e-3


def noise_floor(y) -> float:
    """Smallest noise EM may reach: ``NOISE_FLOOR * sd(y)``, relative to y's scale.

    Keeps the likelihood finite (and the fit away from a spike) when one expert fits a few rows
    exactly; a fit that reaches it is reported as collapsing (:class:`CollapseWarning`). ``y`` is a
    tensor, or a :class:`~pyromoe.core.sources.Source` (its outputs' summary).
    """
    if isinstance(y, Source):
        summary, dtype = y.summary(), y.dtype
        spread, peak = (summary.y_sd if summary.num_rows > 1 else 0.0), summary.y_absmax
    else:
        spread = float(y.std()) if y.shape[0] > 1 else 0.0
        peak, dtype = float(y.abs().max()), y.dtype
    if not spread > 0:
        spread = max(peak, torch.finfo(dtype).tiny)
    return NOISE_FLOOR * spread


def feature_scale(x) -> torch.Tensor:
    """Per-column standard deviation, 1 for constant columns (so random starts are scale-free).

    ``x`` is a tensor or a :class:`~pyromoe.core.sources.Source` (float64 from its summary).
    """
    if isinstance(x, Source):
        scale = x.summary().x_sd if x.num_rows > 1 else torch.ones(x.in_features)
    else:
        scale = x.std(dim=0) if x.shape[0] > 1 else torch.ones_like(x[0])
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _accept_slack(value: float, dtype: torch.dtype) -> float:
    """How far an objective may drop from rounding alone (a few ulps of its magnitude)."""
    return 8 * torch.finfo(dtype).eps * max(1.0, abs(value))


def _normal_log_density_sum(value: torch.Tensor, scale: float) -> torch.Tensor:
    """Sum of ``log Normal(value | 0, scale^2)`` over all entries."""
    return -0.5 * (value / scale).pow(2).sum() - value.numel() * (
        math.log(scale) + 0.5 * math.log(2 * math.pi)
    )


def log_prior(prior_scale: float | None, *tensors: torch.Tensor | None) -> torch.Tensor | float:
    """Log density of independent ``Normal(0, prior_scale^2)`` priors on every entry of ``tensors``.

    ``prior_scale=None`` (maximum likelihood) gives 0; ``None`` tensors are skipped.

    Examples
    --------
    >>> round(float(log_prior(1.0, torch.zeros(2))), 4)
    -1.8379
    """
    if prior_scale is None:
        return 0.0
    return sum(_normal_log_density_sum(t, prior_scale) for t in tensors if t is not None)


def _solve_spd(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``matrix @ out = rhs`` for a (batch of) symmetric positive semi-definite ``matrix``.

    A jitter relative to the diagonal keeps a singular system (an expert with no responsibility, a
    saturated gate, a dead relu) solvable; the solution then moves nowhere along the null space.
    """
    size = matrix.shape[-1]
    eye = torch.eye(size, dtype=matrix.dtype, device=matrix.device)
    scale = matrix.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1.0)[..., None, None]
    jitter = 1e3 * torch.finfo(matrix.dtype).eps
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * scale * eye)
        if not bool(info.any()):
            return torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
        jitter *= 100
    return torch.linalg.lstsq(matrix + jitter * scale * eye, rhs.unsqueeze(-1)).solution.squeeze(-1)


def _with_intercept(x: torch.Tensor, intercept: bool) -> torch.Tensor:
    """The design matrix: ``x`` with a column of ones appended when ``intercept``."""
    return torch.cat([x, torch.ones_like(x[:, :1])], dim=-1) if intercept else x


def _collapse(
    responsibility: torch.Tensor, noise, floor: float, d: int
) -> tuple[list[float], list[int]]:
    """Effective rows per expert (``sum_n r_ni``, shape (k,)) and the experts collapsing onto a
    few points (see EMRun)."""
    effective = responsibility.tolist()
    collapsed = [i for i, rows in enumerate(effective) if rows < d + 1]
    noise = torch.as_tensor(noise).reshape(-1)
    if not collapsed and len(noise) > 1 and bool((noise <= floor * (1 + 1e-9)).any()):
        return effective, [int(torch.argmin(noise))]  # per-expert noise: the expert at its floor
    if not collapsed and float(noise.min()) <= floor * (1 + 1e-9):
        collapsed = [min(range(len(effective)), key=effective.__getitem__)]
    return effective, collapsed


def warn_collapse(collapsed, effective_rows, d: int, stacklevel: int = 3) -> None:
    """One :class:`CollapseWarning` naming the collapsing experts (nothing when there are none)."""
    if not collapsed:
        return
    parts = []
    for i in collapsed:
        rows = effective_rows[i]
        shown = f"{rows:.1f}" if float(f"{rows:.1f}") < d + 1 else f"{rows:.3f}"
        if rows < d + 1:
            parts.append(f"expert {i} holds {shown} effective rows (< d + 1 = {d + 1})")
        else:
            parts.append(f"expert {i} holds {shown} effective rows and the noise hit its floor")
    subject = "it is" if len(parts) == 1 else "they are"
    warnings.warn(
        f"{'; '.join(parts)}: {subject} collapsing onto a few points; use fewer experts",
        CollapseWarning,
        stacklevel=stacklevel,
    )


# ---------------------------------------------------------------------------------------------- M-steps
def solve_linear_experts(
    statistics: tuple[torch.Tensor, torch.Tensor], ridge: float
) -> torch.Tensor:
    """Weighted least squares per expert from the weighted Gram matrices (k, w, w) and
    cross-products (k, w) of :func:`pass_statistics`, ridge ``ridge``: the coefficients (k, w)."""
    gram, cross = statistics
    gram = gram.clone()
    gram.diagonal(dim1=-2, dim2=-1).add_(ridge)
    return _solve_spd(gram, cross)


def _negative_hessian(design: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Negative Hessian of the multinomial log-likelihood, blocks ``X^T diag(p_a (d_ab - p_b)) X``.

    ``probs`` (n, k - 1) are the free experts' gate probabilities; the result is
    ((k - 1) width, (k - 1) width). Two matrix products whatever k (fewer passes than block by block).
    """
    free, width = probs.shape[1], design.shape[1]
    if free == 1:
        weight = probs[:, 0] * (1 - probs[:, 0])
        return (design * weight[:, None]).T @ design
    scaled = (probs[:, :, None] * design[:, None, :]).reshape(-1, free * width)
    hessian = -(scaled.T @ scaled)  # - sum_n p_a p_b x x^T
    diagonal = (scaled.T @ design).reshape(free, width, width)  # sum_n p_a x x^T
    blocks = hessian.view(free, width, free, width)
    for a in range(free):
        blocks[a, :, a, :] += diagonal[a]
    return hessian


def _gate_system(
    design: torch.Tensor, responsibilities: torch.Tensor, probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient (k - 1, width) and negative Hessian of ``sum_n sum_i r_ni log gate_i(x_n)`` in the
    free experts' gate coefficients, at gate probabilities ``probs`` (n, k - 1): the IRLS system."""
    return (responsibilities[:, 1:] - probs).T @ design, _negative_hessian(design, probs)


def gate_m_step(
    x: torch.Tensor,
    responsibilities: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    *,
    fit_bias: bool = True,
    prior_scale: float | None = None,
    max_steps: int = 5,
    tol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted (multinomial) logistic regression of soft labels on ``x`` by damped Newton steps.

    Maximises ``Q(w, c) = sum_n sum_i r_ni log gate_i(x_n) + log prior(w, c)`` over the gate weights
    ``w`` (and offsets ``c`` when ``fit_bias``), expert 0 the reference, for labels held in memory.
    ``Q`` is concave; each Newton step (the IRLS system of the EM loop, :func:`_gate_system`) is
    halved until ``Q`` does not drop. Stops early when the Newton decrement is negligible. The EM
    loop takes its gate steps from the same system summed over chunks (:class:`EM`).

    Parameters
    ----------
    x : Tensor (n, d)
    responsibilities : Tensor (n, k)
        Soft labels ``r_ni`` (rows sum to 1).
    gate_weight : Tensor (k - 1, d)
        Starting gate weights.
    gate_bias : Tensor (k - 1,) or None
        Starting gate offsets (kept fixed unless ``fit_bias``; None: a gate without offsets).
    fit_bias : bool
        Whether to update the offsets.
    prior_scale : float, optional
        Scale ``s`` of a ``Normal(0, s^2)`` prior on every gate weight and offset (a ridge term
        ``1 / s^2`` in the Newton system). ``None``: maximum likelihood.
    max_steps : int
        Maximum number of Newton steps.
    tol : float
        Stop when a Newton step would raise ``Q / n`` by less than this.

    Returns
    -------
    (gate_weight, gate_bias) : tuple of Tensor, shapes (k - 1, d) and (k - 1,) (or None)

    Examples
    --------
    >>> x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> r1 = torch.sigmoid(3 * x[:, 0])
    >>> w, c = gate_m_step(x, torch.stack([1 - r1, r1], -1), torch.zeros(1, 2, dtype=torch.float64),
    ...                    torch.zeros(1, dtype=torch.float64), max_steps=20)
    >>> [round(v) for v in w[0].tolist()]
    [3, 0]
    """
    n, d = x.shape
    free = gate_weight.shape[0]
    width = d + 1 if fit_bias else d
    design = _with_intercept(x, fit_bias)
    theta = (
        torch.cat([gate_weight, gate_bias[:, None]], dim=-1) if fit_bias else gate_weight.clone()
    )
    offset = None if fit_bias else gate_bias
    ridge = 0.0 if prior_scale is None else 1.0 / prior_scale**2

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (t[:, :d], t[:, d]) if fit_bias else (t, offset)

    def objective(t: torch.Tensor) -> tuple[float, torch.Tensor]:
        log_gate = torch.log_softmax(gate_logits(x, *split(t)), dim=-1)
        value = (responsibilities * log_gate).sum() - 0.5 * ridge * t.pow(2).sum()
        return float(value), log_gate

    value, log_gate = objective(theta)
    for _ in range(max_steps):
        gradient, hessian = _gate_system(design, responsibilities, log_gate[:, 1:].exp())
        gradient = gradient - ridge * theta
        hessian.diagonal().add_(ridge)
        step = _solve_spd(hessian, gradient.reshape(-1))
        decrement = float(gradient.reshape(-1) @ step)  # Newton decrement squared: ~2 x the gain
        if decrement <= 2 * max(_accept_slack(value, x.dtype), tol * n):
            break
        step = step.reshape(free, width)
        size, accepted = 1.0, False
        for _ in range(40):
            candidate = theta + size * step
            new_value, new_log_gate = objective(candidate)
            if new_value >= value:
                gain = new_value - value
                theta, value, log_gate, accepted = candidate, new_value, new_log_gate, True
                break
            size *= 0.5
        if not accepted or (size == 1.0 and gain <= max(_accept_slack(value, x.dtype), tol * n)):
            break
    return split(theta)


# ---------------------------------------------------------------------------------------------- one pass
class Statistics(NamedTuple):
    """Sums over rows that one EM iteration needs (float64): what a pass hands the M-step.

    Summed chunk by chunk (:meth:`pyromoe.core.sources.Source.reduce`), so their size is fixed
    whatever n. Responsibilities ``r_ni`` are those of the parameters the pass was run at; the
    expert and gate systems are linearised at those parameters, or at ``linearise_at``
    (:func:`pass_statistics`).

    Attributes
    ----------
    rows : Tensor ()
        Number of rows.
    log_likelihood : Tensor ()
        ``sum_n log p(y_n | x_n)``.
    responsibility : Tensor (k,)
        ``sum_n r_ni``: each expert's effective rows.
    squared_error : Tensor (k,)
        ``sum_n r_ni (y_n - g(a_i . u_n))^2`` at the linearisation point.
    expert_matrix, expert_vector : Tensor (k, w, w), (k, w), or None
        Identity link: the weighted Gram matrices ``sum r u u^T`` and ``sum r y u``. Other links:
        the Gauss-Newton system ``sum r J J^T`` and ``sum r J (y - g)``, ``J = g'(z) u``. None when
        the experts are frozen.
    y_square : Tensor (k,) or None
        ``sum_n r_ni y_n^2`` (identity link: the squared error of the solved experts follows).
    gate_gradient, gate_hessian : Tensor (k - 1, wg), ((k - 1) wg, (k - 1) wg)
        The IRLS gradient and negative Hessian of the gate's expected log-likelihood.
    """

    rows: torch.Tensor
    log_likelihood: torch.Tensor
    responsibility: torch.Tensor
    squared_error: torch.Tensor
    expert_matrix: torch.Tensor | None
    expert_vector: torch.Tensor | None
    y_square: torch.Tensor | None
    gate_gradient: torch.Tensor
    gate_hessian: torch.Tensor


def _coefficients(params: Params) -> torch.Tensor:
    """Expert weights with the intercepts as a last column (when the model has them): (k, w)."""
    if params.experts_bias is None:
        return params.experts_weight
    return torch.cat([params.experts_weight, params.experts_bias[:, None]], dim=-1)


def _weighted_gram(x: torch.Tensor, weight: torch.Tensor, intercept: bool) -> torch.Tensor:
    """``sum_n w_n u_n u_n^T`` with ``u_n = (x_n, 1)`` when ``intercept`` (else ``x_n``), without
    building the design matrix: one GEMM, and a matrix-vector product and a sum for the
    intercept's row and column."""
    gram = (x * weight[:, None]).T @ x
    if not intercept:
        return gram
    edge = weight @ x
    top = torch.cat([gram, edge[:, None]], dim=1)
    return torch.cat([top, torch.cat([edge, weight.sum()[None]])[None]], dim=0)


def _weighted_sums(x: torch.Tensor, weights: torch.Tensor, intercept: bool) -> torch.Tensor:
    """``sum_n w_ni u_n`` for each column ``i`` of ``weights`` (n, m): shape (m, w)."""
    sums = weights.T @ x
    return torch.cat([sums, weights.sum(0)[:, None]], dim=1) if intercept else sums


def pass_statistics(
    x: torch.Tensor,
    y: torch.Tensor,
    params: Params,
    link: Link,
    update_experts: bool,
    gate_bias: bool,
    linearise_at: Params | None = None,
) -> Statistics:
    """The :class:`Statistics` of one chunk of rows (the function every EM pass sums).

    Responsibilities are computed at ``params``; the expert and gate systems (and the squared
    error) at ``linearise_at`` (default ``params``): a further Newton step within one M-step.
    ``gate_bias``: whether the gate offsets are fitted (an intercept column in the gate system).
    Products run in ``x``'s dtype; the sums are returned in float64. The linear predictors of
    every expert and gate row come from one product, and the Gram matrices are weighted products
    of ``x`` itself (intercepts as sums), so no design matrix is copied.
    """
    f64 = torch.float64
    predictors, logits = linear_predictors(x, params)
    log_probs = log_probs_from_predictors(y, predictors, logits, params, link)
    log_lik = torch.logsumexp(log_probs, dim=-1)
    resp = (log_probs - log_lik[:, None]).exp()
    at = params
    if linearise_at is not None:
        at = linearise_at
        predictors, logits = linear_predictors(x, at)
    intercept = at.experts_bias is not None
    residual = y[:, None] - link(predictors)
    k = resp.shape[1]
    matrix = vector = y_square = None
    if update_experts:
        if link.is_identity:
            matrix = torch.stack([_weighted_gram(x, resp[:, i], intercept) for i in range(k)])
            vector = _weighted_sums(x, resp * y[:, None], intercept)
            y_square = (resp * (y * y)[:, None]).sum(0).to(f64)
        else:
            derivative = link.derivative(predictors)  # J_i = g'(z_i) u: weights g'^2 r, g' r res
            matrix = torch.stack(
                [
                    _weighted_gram(x, resp[:, i] * derivative[:, i].pow(2), intercept)
                    for i in range(k)
                ]
            )
            vector = _weighted_sums(x, derivative * resp * residual, intercept)
        matrix, vector = matrix.to(f64), vector.to(f64)
    width = x.shape[1] + (1 if gate_bias else 0)
    if k == 1:  # one expert: no gate
        gradient = x.new_zeros(0, width)
        hessian = x.new_zeros(0, 0)
    else:
        probs = torch.softmax(logits, dim=-1)[:, 1:]
        gradient = _weighted_sums(x, resp[:, 1:] - probs, gate_bias)
        if k == 2:
            hessian = _weighted_gram(x, probs[:, 0] * (1 - probs[:, 0]), gate_bias)
        else:
            hessian = _negative_hessian(_with_intercept(x, gate_bias), probs)
    return Statistics(
        rows=torch.tensor(float(x.shape[0]), dtype=f64, device=x.device),
        log_likelihood=log_lik.sum().to(f64),
        responsibility=resp.sum(0).to(f64),
        squared_error=(resp * residual.pow(2)).sum(0).to(f64),
        expert_matrix=matrix,
        expert_vector=vector,
        y_square=y_square,
        gate_gradient=gradient.to(f64),
        gate_hessian=hessian.to(f64),
    )


def mean_log_likelihood(source: Source, params: Params, link: Link, chunk_size: int) -> float:
    """Mean log-likelihood per row of ``params`` over a source (one pass)."""
    total = source.reduce(_log_likelihood_sums, chunk_size, params, link)
    return float(total[0] / total[1])


def _log_likelihood_sums(x, y, params, link):
    total = log_likelihood(x, y, params, link).sum().to(torch.float64)
    return torch.stack([total, torch.tensor(float(x.shape[0]), dtype=total.dtype, device=x.device)])


def _between(start: Params, end: Params, size: float) -> Params:
    """``start + size (end - start)`` for every parameter (absent ones stay absent)."""
    return Params(*(a if a is None else a + size * (b - a) for a, b in zip(start, end)))


# ---------------------------------------------------------------------------------------------- the loop
@dataclass(frozen=True)
class EMRun:
    """One start's EM run (:meth:`EM.fit`).

    Attributes
    ----------
    params : Params
        The parameters at the end (absent biases stay None).
    trace : list of float
        The objective at the start and after every iteration; never decreasing up to rounding.
    converged : bool
        Whether the objective changed by less than ``tol`` before ``max_iter`` iterations.
    n_iter : int
        Iterations run.
    effective_rows : list of float
        Each expert's summed responsibilities at the end.
    collapsed_experts : list of int
        Experts with fewer than ``d + 1`` effective rows (or, with the noise at its floor, the one
        with the fewest).
    seconds : float
        Wall time of the run.
    passes : int
        Passes over the data (one per iteration, plus one per extra Newton step or step halving,
        plus the first).
    """

    params: Params
    trace: list[float]
    converged: bool
    n_iter: int
    effective_rows: list[float]
    collapsed_experts: list[int]
    seconds: float
    passes: int = 0

    @property
    def objective(self) -> float:
        """The final objective."""
        return self.trace[-1]


#: Step halvings an EM iteration may try before it keeps the parameters it started from.
MAX_HALVINGS = 30


@dataclass(frozen=True)
class EM:
    """EM over a data source: which parameters move, and how far each M-step goes.

    Each iteration is ONE pass over the data (:func:`pass_statistics` summed chunk by chunk) at
    the current parameters, then an M-step from the sums alone:

    * experts (unless frozen): identity link, weighted least squares per expert in closed form;
      other links, one Gauss-Newton step per expert;
    * gate: one Newton (IRLS) step of the weighted (multinomial) logistic regression;
    * noise (unless fixed): ``noise^2 = sum_n sum_i r_ni (y_n - g(a_i . u_n))^2 / n``, with the
      experts just solved (identity link: the squared error of the new experts follows from the
      sums exactly) or, for other links, with the experts before their step (the noise is then
      updated first: both orders are conditional maximisations).

    The next pass, at the proposed parameters, gives their objective. If it fell (an overshooting
    Newton step), the step is halved towards the previous parameters, one pass per halving: the
    M-step direction is an ascent direction of the objective, so a small enough step raises it,
    and the trace never decreases beyond rounding. ``newton_steps`` / ``gauss_newton_steps`` > 1
    take further steps within one M-step, each from one more pass with the responsibilities held.

    Joint EM moves everything; gate EM is ``update_experts=False``. Expert intercepts are fitted
    when the parameters carry them (``experts_bias`` not None), gate offsets when
    ``update_gate_bias``. MAP (``prior_scale``): ``Normal(0, s^2)`` priors on the gate's weights and
    offsets and, when they move, the experts' (a ridge ``noise^2 / s^2`` in their least squares);
    the noise stays maximum likelihood.

    Extra memory: one chunk's ``O(chunk_size (d + k))`` plus the sums' ``O(k d^2)``, any n.

    Attributes
    ----------
    source : Source
    link : Link
    update_experts, update_gate_bias, update_noise : bool
    prior_scale : float or None
    tol : float
        A start has converged when its objective changes by less than ``tol`` in one iteration.
    max_iter : int
    newton_steps : int
        Gate Newton steps per M-step.
    gauss_newton_steps : int
        Gauss-Newton steps per expert per M-step (links other than the identity).
    chunk_size : int
        Rows per chunk of a pass.
    """

    source: Source
    link: Link
    update_experts: bool = True
    update_gate_bias: bool = True
    update_noise: bool = True
    prior_scale: float | None = None
    tol: float = 1e-6
    max_iter: int = 200
    newton_steps: int = 1
    gauss_newton_steps: int = 1
    chunk_size: int = DEFAULT_CHUNK_SIZE
    floor: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "floor", noise_floor(self.source))

    @property
    def name(self) -> str:
        return "EM" if self.update_experts else "gate EM"

    def statistics(self, params: Params, linearise_at: Params | None = None) -> Statistics:
        """One pass: the :class:`Statistics` at ``params`` (systems at ``linearise_at``)."""
        return self.source.reduce(
            pass_statistics,
            self.chunk_size,
            params,
            self.link,
            self.update_experts,
            self.update_gate_bias,
            linearise_at,
        )

    def objective(self, statistics: Statistics, params: Params) -> float:
        """Mean log-likelihood per row (plus log prior / n for MAP)."""
        experts = (params.experts_weight, params.experts_bias) if self.update_experts else ()
        prior = log_prior(self.prior_scale, *experts, params.gate_weight, params.gate_bias)
        return float(statistics.log_likelihood + prior) / float(statistics.rows)

    def m_step(
        self, statistics: Statistics, params: Params, *, experts: bool = True, gate: bool = True
    ) -> Params:
        """New parameters from the sums of one pass (experts, gate, noise; see the class)."""
        f64, dtype = torch.float64, params.gate_weight.dtype
        rows = float(statistics.rows)
        squared_error = statistics.squared_error
        if self.update_experts and experts:
            d = params.experts_weight.shape[1]
            intercept = params.experts_bias is not None
            coefficients = _coefficients(params).to(f64)
            # MAP: the squared error is scaled by 1 / sigma_i^2, so the ridge is sigma_i^2 / s^2
            ridge = (
                0.0
                if self.prior_scale is None
                else (params.expert_noise().to(f64) ** 2 / self.prior_scale**2)[:, None]
            )
            gram, vector = statistics.expert_matrix, statistics.expert_vector
            if self.link.is_identity:
                coefficients = solve_linear_experts((gram, vector), ridge)
                quadratic = torch.einsum("iw,iwv,iv->i", coefficients, gram, coefficients)
                squared_error = (
                    statistics.y_square - 2 * (coefficients * vector).sum(-1) + quadratic
                ).clamp_min(0)
            else:
                system = gram.clone()
                system.diagonal(dim1=-2, dim2=-1).add_(ridge)
                coefficients = coefficients + _solve_spd(system, vector - ridge * coefficients)
            coefficients = coefficients.to(dtype)
            params = params._replace(
                experts_weight=coefficients[:, :d],
                experts_bias=coefficients[:, d] if intercept else None,
            )
        if gate:
            params = self._gate_step(statistics, params)
        if self.update_noise:
            if params.per_expert_noise:  # sigma_i^2 = sum_n r_ni residual^2 / sum_n r_ni
                weight = statistics.responsibility.clamp_min(torch.finfo(f64).tiny)
                noise = (squared_error / weight).sqrt().clamp_min(self.floor)
            else:
                noise = (squared_error.sum() / rows).sqrt().clamp_min(self.floor)
            params = params._replace(noise=noise.to(dtype))
        return params

    def _gate_step(self, statistics: Statistics, params: Params) -> Params:
        f64, dtype = torch.float64, params.gate_weight.dtype
        if params.gate_weight.shape[0] == 0:
            return params  # one expert: no gate
        d = params.gate_weight.shape[1]
        fit_bias = self.update_gate_bias
        theta = (
            torch.cat([params.gate_weight, params.gate_bias[:, None]], dim=-1)
            if fit_bias
            else params.gate_weight
        ).to(f64)
        ridge = 0.0 if self.prior_scale is None else 1.0 / self.prior_scale**2
        gradient = statistics.gate_gradient - ridge * theta
        hessian = statistics.gate_hessian.clone()
        hessian.diagonal().add_(ridge)
        step = _solve_spd(hessian, gradient.reshape(-1))
        decrement = float(gradient.reshape(-1) @ step)  # Newton decrement squared: ~2 x the gain
        rows = float(statistics.rows)
        value = float(statistics.log_likelihood)
        if decrement <= 2 * max(_accept_slack(value, dtype), 0.1 * self.tol * rows):
            return params  # nothing to gain that EM's tolerance would see
        theta = (theta + step.reshape(theta.shape)).to(dtype)
        if fit_bias:
            return params._replace(gate_weight=theta[:, :d], gate_bias=theta[:, d])
        return params._replace(gate_weight=theta)

    def _propose(self, statistics: Statistics, params: Params) -> tuple[Params, int]:
        """The M-step's proposal and the extra passes its further Newton steps took."""
        proposal = self.m_step(statistics, params)
        nonlinear = self.update_experts and not self.link.is_identity
        extra = max(self.newton_steps, self.gauss_newton_steps if nonlinear else 1) - 1
        for step in range(1, extra + 1):
            held = self.statistics(params, linearise_at=proposal)
            proposal = self.m_step(
                held,
                proposal,
                experts=nonlinear and step < self.gauss_newton_steps,
                gate=step < self.newton_steps,
            )
        return proposal, extra

    def fit(self, starts: Sequence[Params], *, stacklevel: int = 2) -> tuple[list[EMRun], int]:
        """EM from each start in turn; the runs and the index of the best (highest objective).

        Warns (``stacklevel`` as for :func:`warnings.warn`, counted from this method) with a
        :class:`ConvergenceWarning` when the best start did not converge, and a
        :class:`CollapseWarning` when it ends collapsing.
        """
        d = self.source.in_features
        dtype = self.source.dtype
        runs: list[EMRun] = []
        for start in starts:
            began = time.perf_counter()
            params = start
            statistics = self.statistics(params)
            value = self.objective(statistics, params)
            trace, passes = [value], 1
            converged, n_iter = False, 0
            for n_iter in range(1, self.max_iter + 1):  # noqa: B007 (n_iter is kept)
                proposal, extra = self._propose(statistics, params)
                passes += extra
                candidate, size = proposal, 1.0
                for _ in range(MAX_HALVINGS):
                    new_statistics = self.statistics(candidate)
                    new_value = self.objective(new_statistics, candidate)
                    passes += 1
                    if new_value >= value - _accept_slack(value, dtype):
                        params, statistics, value = candidate, new_statistics, new_value
                        break
                    size *= 0.5
                    candidate = _between(params, proposal, size)
                trace.append(value)  # unchanged when no step raised the objective
                if abs(trace[-1] - trace[-2]) < self.tol:
                    converged = True
                    break
            effective_rows, collapsed = _collapse(
                statistics.responsibility, params.noise, self.floor, d
            )
            runs.append(
                EMRun(
                    params=params,
                    trace=trace,
                    converged=converged,
                    n_iter=n_iter,
                    effective_rows=effective_rows,
                    collapsed_experts=collapsed,
                    seconds=time.perf_counter() - began,
                    passes=passes,
                )
            )
        best = max(range(len(runs)), key=lambda i: runs[i].objective)
        if not runs[best].converged:
            trace = runs[best].trace
            which = f" for the best start (start {best} of {len(runs)}; " if len(runs) > 1 else " ("
            warnings.warn(
                f"{self.name} did not converge in max_iter={self.max_iter} iterations{which}last "
                f"change of the objective {trace[-1] - trace[-2]:.3g} >= tol={self.tol:g}); "
                "increase max_iter or tol",
                ConvergenceWarning,
                stacklevel=stacklevel + 1,
            )
        warn_collapse(
            runs[best].collapsed_experts, runs[best].effective_rows, d, stacklevel=stacklevel + 2
        )
        return runs, best


def default_chunk_size(in_features: int) -> int:
    """Rows per chunk of an EM pass: about 4 MB of float64 design rows, 1024 to 65536 rows.

    Measured (2e6 x 20 memory map, one thread): 4 MB chunks ran a pass 30% faster than 10 MB
    ones and kept the process's extra anonymous memory near zero, where 8-10 MB chunks left about
    100 MiB behind in the allocator's heap.
    """
    return max(1024, min(DEFAULT_CHUNK_SIZE, (1 << 19) // (int(in_features) + 1)))


def check_em_arguments(
    x,
    y,
    link,
    seed,
    tol,
    max_iter,
    prior_scale,
    newton_steps,
    gauss_newton_steps=1,
    *,
    chunk_size=None,
    device=None,
) -> tuple[Source, Link, int, dict]:
    """The arguments :func:`fit_em` and :func:`pyromoe.core.gate.fit_gate` share, checked.

    Returns ``(source, link, seed, options)``, ``options`` the keyword arguments of :class:`EM`
    (``chunk_size`` included: ``None`` picks :func:`default_chunk_size`).

    Raises
    ------
    ValueError, TypeError
        As :func:`pyromoe.core.sources.as_source` (at least 2 rows) and
        :func:`pyromoe._validation.check_link`; for a ``tol`` or ``prior_scale`` that is not a
        positive number, step counts or ``chunk_size`` that are not ints >= 1, or a bad seed.
    """
    source = as_source(x, y, device=device, min_rows=2)
    if chunk_size is None:
        chunk_size = default_chunk_size(source.in_features)
    options = dict(
        tol=check_positive(tol, "tol"),
        max_iter=check_positive(max_iter, "max_iter", integer=True),
        prior_scale=None if prior_scale is None else check_positive(prior_scale, "prior_scale"),
        newton_steps=check_positive(newton_steps, "newton_steps", integer=True),
        gauss_newton_steps=check_positive(gauss_newton_steps, "gauss_newton_steps", integer=True),
        chunk_size=check_count(chunk_size, "chunk_size", minimum=1),
    )
    return source, check_link(link), check_seed(seed), options


# ---------------------------------------------------------------------------------------------- joint EM
def random_start(
    x,
    y,
    num_experts: int,
    link: str | Link,
    generator: torch.Generator,
    *,
    bias: bool = True,
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
    d = source.in_features
    k = num_experts
    link = check_link(link)
    scale = feature_scale(source).to(like)
    y_sd = torch.tensor(max(summary.y_sd, noise_floor(source))).to(like)
    x_mean = summary.x_mean.to(like)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(like)

    experts_weight = normal(k, d) * (y_sd / d**0.5) / scale
    gate_weight = normal(k - 1, d) * (0.1 / d**0.5) / scale
    if bias:
        experts_bias = -(experts_weight @ x_mean)
        if link.is_identity:
            experts_bias = experts_bias + summary.y_mean
        gate_bias = -(gate_weight @ x_mean)
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


#: A screened start (:func:`screened_start`, what :func:`fit_em`'s random starts are): the best of
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
    x : Tensor (n, d), or a Source (then ``y`` is ignored)
    y : Tensor (n,)
    num_experts : int
    link : str or Link
    generator : torch.Generator
        CPU generator.
    candidates : int
        Random draws screened (1: the plain :func:`random_start`, no EM).
    rows : int
        Rows of the screening subsample.
    bias, noise, prior_scale : as in :func:`fit_em`
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
    link = check_link(link)
    candidates = check_positive(candidates, "candidates", integer=True)
    rows = check_positive(rows, "rows", integer=True)
    per_expert = check_noise_model(noise) == "per_expert"
    draws = [
        random_start(source, None, num_experts, link, generator, bias=bias)
        for _ in range(candidates)
    ]
    if candidates == 1 or num_experts == 1:
        return draws[0]
    n = source.num_rows
    sub = source if n <= rows else TensorSource(*source.subsample(rows, generator))
    like = torch.empty(0, dtype=source.dtype, device=source.device)
    starts = [_start_params(draw, like, bias, per_expert) for draw in draws]
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


def _check_init(init, k: int, d: int, link: Link, source: Source) -> MoEEstimate:
    if not isinstance(init, MoEEstimate):
        raise TypeError(
            f"init must be a pyromoe.MoEEstimate (e.g. from tensor_init); got {type(init).__name__}"
        )
    if (init.num_experts, init.in_features) != (k, d):
        raise ValueError(
            f"init must have num_experts={k} and in_features={d} to match the fit; got "
            f"num_experts={init.num_experts}, in_features={init.in_features}"
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
    if not float(init.noise) > 0:
        raise ValueError(f"init.noise must be > 0; got {float(init.noise)}")
    return init


@keeps_feature_names
def fit_em(
    x,
    y,
    num_experts: int = 2,
    link: str | Link = "linear",
    *,
    init: MoEEstimate | None = None,
    n_init: int | None = None,
    screen: int = SCREEN_CANDIDATES,
    bias: bool = True,
    noise: str = "shared",
    tol: float = 1e-6,
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
    init : MoEEstimate, optional
        A starting point (e.g. :func:`pyromoe.tensor_init`); the first start.
    n_init : int, optional
        Total number of starts. Default: 5 random starts without ``init``; only the given start
        with ``init`` (``n_init > 1`` then adds ``n_init - 1`` random starts). Random starts are
        screened starts (:func:`screened_start`) drawn from a ``torch.Generator`` seeded with
        ``seed``.
    screen : int
        Random draws behind each random start: the best of ``screen`` draws after at most
        :data:`SCREEN_MAX_ITER` EM iterations on a random subsample of :data:`SCREEN_ROWS` rows
        (default :data:`SCREEN_CANDIDATES`). ``1``: one plain :func:`random_start` draw per start
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
        for MAP) changes by less than ``tol`` in one iteration.
    max_iter : int
        Maximum EM iterations per start.
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
        Rows per chunk of each pass (default :func:`default_chunk_size`: about 16 MB of rows).
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

    Each iteration is one pass over the data in chunks (:class:`EM`): extra memory
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
    source, link, seed, em = check_em_arguments(
        x,
        y,
        link,
        seed,
        tol,
        max_iter,
        prior_scale,
        newton_steps,
        gauss_newton_steps,
        chunk_size=chunk_size,
        device=device,
    )
    n, d = source.shape
    k = check_num_experts(num_experts, minimum=1)
    bias = check_flag(bias, "bias")
    per_expert = check_noise_model(noise) == "per_expert"
    if n_init is None:
        n_init = 1 if init is not None else 5
    n_init = check_positive(n_init, "n_init", integer=True)
    screen = check_positive(screen, "screen", integer=True)
    num_threads = check_num_threads(num_threads)
    if init is not None:
        init = _check_init(init, k, d, link, source)
    with torch_threads(num_threads):
        summary = source.summary()  # out-of-core data: the NaN check is this first pass
        if summary.y_sd == 0.0:
            raise ValueError(
                f"y is constant (every value is {summary.y_first:g}); a mixture of experts needs "
                "varying y"
            )
        return _fit_em(
            source,
            k,
            link,
            init=init,
            n_init=n_init,
            bias=bias,
            seed=seed,
            em=em,
            per_expert=per_expert,
            screen=screen,
        )


@on_exact_scale("estimate", init="estimate")
def _fit_em(
    source, k, link, *, init, n_init, bias, seed, em, per_expert=False, screen=SCREEN_CANDIDATES
) -> MoEEstimate:
    """:func:`fit_em` on checked arguments; ``em``: the options of :class:`EM`."""
    n, d = source.shape
    check_enough_rows(
        n,
        num_parameters(d, k, bias),
        k,
        model=f"a mixture of {k} experts on {d} input(s){' with biases' if bias else ''}",
        stacklevel=5,
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
        )
        starts.append(start)
        kinds.append("random")
    screen_seconds = time.perf_counter() - began
    like = torch.empty(0, dtype=source.dtype, device=source.device)
    starts = [_start_params(start, like, bias, per_expert) for start in starts]
    runs, best = EM(source, link, update_gate_bias=bias, **em).fit(starts, stacklevel=4)
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


def _start_params(
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
