"""The sums one EM iteration needs, from one pass over the data (docs/algorithm.md section 4).

:func:`pass_statistics` is the function every EM pass sums chunk by chunk
(:meth:`pyromoe.core.sources.Source.reduce`): the log-likelihood, the responsibilities' totals, the
per-expert weighted Gram matrices and cross-products (identity link) or Gauss-Newton normal
equations (other links), the gate's IRLS gradient and negative Hessian, and the weighted squared
residuals, all as :class:`Statistics` (float64, fixed size whatever n). The M-step
(:mod:`pyromoe.core.em.m_step`) solves from these sums alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..likelihood import (
    expert_columns,
    gate_columns,
    linear_predictors,
    log_likelihood,
    log_probs_from_predictors,
)
from ..links import Link
from ..params import Params
from ..sources import Source

__all__ = ["Statistics", "mean_log_likelihood", "pass_statistics"]


def _with_intercept(x: torch.Tensor, intercept: bool) -> torch.Tensor:
    """The design matrix: ``x`` with a column of ones appended when ``intercept``."""
    return torch.cat([x, torch.ones_like(x[:, :1])], dim=-1) if intercept else x


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
    # the experts' and the gate's columns of the design (the same tensor when they share it)
    x_experts = expert_columns(x, params.in_features, params.gate_weight.shape[-1])
    x_gate = gate_columns(x, params.in_features, params.gate_weight.shape[-1])
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
            matrix = torch.stack(
                [_weighted_gram(x_experts, resp[:, i], intercept) for i in range(k)]
            )
            vector = _weighted_sums(x_experts, resp * y[:, None], intercept)
            y_square = (resp * (y * y)[:, None]).sum(0).to(f64)
        else:
            derivative = link.derivative(predictors)  # J_i = g'(z_i) u: weights g'^2 r, g' r res
            matrix = torch.stack(
                [
                    _weighted_gram(x_experts, resp[:, i] * derivative[:, i].pow(2), intercept)
                    for i in range(k)
                ]
            )
            vector = _weighted_sums(x_experts, derivative * resp * residual, intercept)
        matrix, vector = matrix.to(f64), vector.to(f64)
    width = x_gate.shape[1] + (1 if gate_bias else 0)
    if k == 1:  # one expert: no gate
        gradient = x.new_zeros(0, width)
        hessian = x.new_zeros(0, 0)
    else:
        probs = torch.softmax(logits, dim=-1)[:, 1:]
        gradient = _weighted_sums(x_gate, resp[:, 1:] - probs, gate_bias)
        if k == 2:
            hessian = _weighted_gram(x_gate, probs[:, 0] * (1 - probs[:, 0]), gate_bias)
        else:
            hessian = _negative_hessian(_with_intercept(x_gate, gate_bias), probs)
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
