"""The M-step of EM: new parameters from the sums of one pass (docs/algorithm.md section 4).

Every solver here reads a :class:`~pyromoe.core.em.statistics.Statistics` and nothing else, so a
memory map or a Dask array costs the same as a tensor: weighted least squares per expert in closed
form (identity link) or one Gauss-Newton step (other links, using ``Link.derivative``); one damped
Newton (IRLS) step for the gate's weighted (multinomial) logistic regression; the noise in closed
form, never below :func:`noise_floor` (the guard against an expert collapsing onto a few points).
MAP adds ``Normal(0, s^2)`` priors (:func:`log_prior`) as ridge terms.
"""

from __future__ import annotations

import math

import torch

from ..links import Link
from ..params import Params
from ..sources import Source
from .statistics import Statistics

__all__ = [
    "NOISE_FLOOR",
    "expert_step",
    "feature_scale",
    "gate_step",
    "log_prior",
    "noise_floor",
    "noise_step",
    "solve_linear_experts",
]


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


def accept_slack(value: float, dtype: torch.dtype) -> float:
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


def solve_linear_experts(
    statistics: tuple[torch.Tensor, torch.Tensor], ridge: float
) -> torch.Tensor:
    """Weighted least squares per expert from the weighted Gram matrices (k, w, w) and
    cross-products (k, w) of :func:`pass_statistics`, ridge ``ridge``: the coefficients (k, w)."""
    gram, cross = statistics
    gram = gram.clone()
    gram.diagonal(dim1=-2, dim2=-1).add_(ridge)
    return _solve_spd(gram, cross)


def _coefficients(params: Params) -> torch.Tensor:
    """Expert weights with the intercepts as a last column (when the model has them): (k, w)."""
    if params.experts_bias is None:
        return params.experts_weight
    return torch.cat([params.experts_weight, params.experts_bias[:, None]], dim=-1)


def expert_step(
    statistics: Statistics, params: Params, link: Link, prior_scale: float | None
) -> tuple[Params, torch.Tensor]:
    """The experts' M-step and the squared error that goes with it.

    Identity link: weighted least squares per expert, exact, and the squared error of the new
    experts from the sums; other links: one Gauss-Newton step per expert and the squared error of
    the experts before it (both orders of the noise update are conditional maximisations). MAP
    (``prior_scale``): the squared error is scaled by ``1 / sigma_i^2``, so the ridge is
    ``sigma_i^2 / s^2``.
    """
    f64, dtype = torch.float64, params.gate_weight.dtype
    squared_error = statistics.squared_error
    d = params.experts_weight.shape[1]
    intercept = params.experts_bias is not None
    coefficients = _coefficients(params).to(f64)
    ridge = (
        0.0
        if prior_scale is None
        else (params.expert_noise().to(f64) ** 2 / prior_scale**2)[:, None]
    )
    gram, vector = statistics.expert_matrix, statistics.expert_vector
    if link.is_identity:
        coefficients = solve_linear_experts((gram, vector), ridge)
        # c_i' G_i c_i (a batched product: einsum plans its contraction on every call)
        quadratic = ((gram @ coefficients[:, :, None])[:, :, 0] * coefficients).sum(-1)
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
    return params, squared_error


def gate_step(
    statistics: Statistics,
    params: Params,
    *,
    fit_bias: bool,
    prior_scale: float | None,
    tol: float,
) -> Params:
    """One Newton (IRLS) step of the gate's weighted (multinomial) logistic regression.

    Solves the gradient and negative Hessian of ``sum_n sum_i r_ni log gate_i(x_n)`` summed by the
    pass (plus the ridge ``1 / s^2`` of a MAP prior); no step when the Newton decrement is below
    what EM's tolerance ``tol`` (per row) would see. ``fit_bias``: whether the offsets move.
    """
    f64, dtype = torch.float64, params.gate_weight.dtype
    if params.gate_weight.shape[0] == 0:
        return params  # one expert: no gate
    d = params.gate_weight.shape[1]
    theta = (
        torch.cat([params.gate_weight, params.gate_bias[:, None]], dim=-1)
        if fit_bias
        else params.gate_weight
    ).to(f64)
    ridge = 0.0 if prior_scale is None else 1.0 / prior_scale**2
    gradient = statistics.gate_gradient - ridge * theta
    hessian = statistics.gate_hessian.clone()
    hessian.diagonal().add_(ridge)
    step = _solve_spd(hessian, gradient.reshape(-1))
    decrement = float(gradient.reshape(-1) @ step)  # Newton decrement squared: ~2 x the gain
    rows = float(statistics.rows)
    value = float(statistics.log_likelihood)
    if decrement <= 2 * max(accept_slack(value, dtype), 0.1 * tol * rows):
        return params  # nothing to gain that EM's tolerance would see
    theta = (theta + step.reshape(theta.shape)).to(dtype)
    if fit_bias:
        return params._replace(gate_weight=theta[:, :d], gate_bias=theta[:, d])
    return params._replace(gate_weight=theta)


def noise_step(
    statistics: Statistics, params: Params, squared_error: torch.Tensor, floor: float
) -> Params:
    """The noise's M-step: ``noise^2 = sum_n sum_i r_ni res_ni^2 / n`` (shared), or
    ``sigma_i^2 = sum_n r_ni res_ni^2 / sum_n r_ni`` (per expert), never below ``floor``."""
    f64, dtype = torch.float64, params.gate_weight.dtype
    if params.per_expert_noise:
        weight = statistics.responsibility.clamp_min(torch.finfo(f64).tiny)
        noise = (squared_error / weight).sqrt().clamp_min(floor)
    else:
        noise = (squared_error.sum() / float(statistics.rows)).sqrt().clamp_min(floor)
    return params._replace(noise=noise.to(dtype))
