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
    HALF_LOG_2PI,
    expert_columns,
    gate_columns,
    linear_predictor_rows,
    log_likelihood,
)
from ..links import Link
from ..params import Params
from ..sources import Source

__all__ = [
    "Statistics",
    "complete_skipped_gram",
    "expert_gram_block",
    "gradient_sums",
    "mean_log_likelihood",
    "pass_statistics",
]


def _hessian_weights(probs: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The NONNEGATIVE row weights (m, n) of the blocks on and above the diagonal of the
    multinomial log-likelihood's negative Hessian, and their block indices ``(a, b)``: block
    ``(a, b)`` is ``U^T diag(p_a (d_ab - p_b)) U``, i.e. the Gram of ``p_a (1 - p_a)`` on the
    diagonal and minus that of ``p_a p_b`` off it. ``probs`` (k - 1, n) are the free experts'
    gate probabilities."""
    free = probs.shape[0]
    pairs = [(a, b) for a in range(free) for b in range(a, free)]
    weights = torch.stack(
        [probs[a] * (1 - probs[a]) if a == b else probs[a] * probs[b] for a, b in pairs]
    )
    return weights, pairs


def _assemble_hessian(grams: torch.Tensor, pairs: list[tuple[int, int]], free: int) -> torch.Tensor:
    """The negative Hessian ((k - 1) w, (k - 1) w) from the Grams (m, w, w) of
    :func:`_hessian_weights`' weights: off-diagonal blocks negated, those below by symmetry."""
    width = grams.shape[-1]
    hessian = grams.new_empty(free * width, free * width)
    blocks = hessian.view(free, width, free, width)
    for gram, (a, b) in zip(grams, pairs):
        if a == b:
            blocks[a, :, a, :] = gram
        else:
            blocks[a, :, b, :] = -gram
            blocks[b, :, a, :] = -gram.T
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


def _weighted_grams(
    x: torch.Tensor,
    weights: torch.Tensor,
    intercept: bool,
    out: torch.Tensor,
    extra: torch.Tensor | None = None,
    skip: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sum_n w_n u_n u_n^T`` (``u_n = (x_n, 1)`` when ``intercept``, else ``x_n``; no design
    matrix is built) for each row of ``weights`` (m, n), all NONNEGATIVE
    (responsibilities, ``g'^2 r``, ``p (1 - p)``): shape (m, w, w); and the weighted sums
    ``sum_n e_jn u_n`` (e, w) of the rows of ``extra`` (e, n) when given (else None).
    ``skip``: a row of ``weights`` whose (d, d) block ``sum w x x^T`` is left ZERO (no GEMM; its
    intercept row and column are summed as for the others), for :func:`complete_skipped_gram`.

    Each Gram is that of ``sqrt(w) x`` with itself, one GEMM per row through the one buffer
    ``out``: the product of a matrix with itself ran faster than that of the weighted copy with
    ``x`` (and a single GEMM of the stacked weighted copies (n, m d) with ``x`` slower still, on a
    CPU). The intercept's rows and columns of all m Grams and the sums of ``extra`` come from ONE
    (m + e, n) x (n, d) product of contiguous rows: a product with few rows costs a read of the
    chunk, whatever their number."""
    m, d = weights.shape[0], x.shape[1]
    rows = weights.contiguous() if extra is None else torch.cat([weights, extra])
    roots = rows[:m].sqrt()
    grams = x.new_empty(m, d, d)
    for i in range(m):
        if i == skip:
            grams[i].zero_()
            continue
        scaled = torch.mul(x, roots[i, :, None], out=out)
        torch.mm(scaled.T, scaled, out=grams[i])
    sums = None
    if intercept or extra is not None:
        sums = rows @ x if intercept or m == 0 else rows[m:] @ x
        if intercept:
            sums = torch.cat([sums, rows.sum(1)[:, None]], dim=1)
    extra_sums = None if extra is None else sums[-extra.shape[0] :]
    if not intercept:
        return grams, extra_sums
    full = x.new_empty(m, d + 1, d + 1)
    full[:, :d, :d] = grams
    full[:, :d, d] = sums[:m, :d]
    full[:, d, :] = sums[:m]
    return full, extra_sums


def _weighted_sums(x: torch.Tensor, weights: torch.Tensor, intercept: bool) -> torch.Tensor:
    """``sum_n w_ni u_n`` for each column ``i`` of ``weights`` (n, m): shape (m, w)."""
    sums = weights.T @ x
    return torch.cat([sums, weights.sum(0)[:, None]], dim=1) if intercept else sums


def _logsumexp_columns(t: torch.Tensor) -> torch.Tensor:
    """``log sum_i exp(t_in)`` over the k rows of ``t`` (k, n): shape (n,). In this layout the
    reduction runs along rows of length n (torch's reductions over a short last dimension took
    about 100 times an ``exp`` of the same tensor on a CPU, torch 2.13)."""
    top = t.amax(0).clamp_min(torch.finfo(t.dtype).min)  # -inf columns stay -inf
    return (t - top).exp().sum(0).log() + top


def _log_prob_rows(y, predictors, logits, params: Params, link: Link) -> torch.Tensor:
    """``log gate_i(x_n) + log Normal(y_n | g(z_in), noise_i^2)`` from the rows (k, n) of
    :func:`~pyromoe.core.likelihood.linear_predictor_rows`: shape (k, n)."""
    log_gate = logits - _logsumexp_columns(logits)
    noise = params.expert_noise().to(dtype=predictors.dtype, device=predictors.device)[:, None]
    standardised = (y - link(predictors)) / noise
    return log_gate - 0.5 * standardised * standardised - torch.log(noise) - HALF_LOG_2PI


def _gate_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """The free experts' gate probabilities (k - 1, n) from the logit rows (k, n); k = 2: a
    sigmoid."""
    if logits.shape[0] == 2:
        return torch.sigmoid(logits[1:] - logits[:1])
    return (logits[1:] - _logsumexp_columns(logits)).exp()


def _expert_system(
    x,
    y,
    resp,
    predictors,
    residual,
    link: Link,
    intercept: bool,
    gate_probs,
    out: torch.Tensor,
    skip: int | None = None,
    gate_hessian: bool = True,
):
    """The experts' weighted Gram matrices (or Gauss-Newton systems), their right-hand sides and
    ``sum r y^2``, from rows (k, n) of responsibilities, predictors and residuals; with
    ``gate_probs`` (k - 1, n) (the gate on the same design, with the same intercept rule) the
    gate's IRLS gradient joins the right-hand sides' product and, for k = 2, its Gram the
    experts' Grams: ``(matrix, vector, y_square, gate_gradient, gate_hessian)``, the last two
    None without ``gate_probs`` (gate_hessian also for k > 2, or when ``gate_hessian`` is
    False). ``skip`` (identity link only): the expert whose (d, d) Gram block is left zero
    (:func:`complete_skipped_gram`)."""
    f64 = torch.float64
    y_square = None
    if link.is_identity:
        gram_weights = resp
        vector_weights = resp * y
        y_square = (resp * (y * y)).sum(1).to(f64)
    else:
        derivative = link.derivative(predictors)  # J_i = g'(z_i) u: weights g'^2 r, g' r res
        gram_weights = resp * derivative.pow(2)
        vector_weights = derivative * resp * residual
        skip = None  # the weights g'^2 r do not sum to one over the experts
    k = resp.shape[0]
    extra = vector_weights
    with_hessian = gate_probs is not None and gate_hessian
    if gate_probs is not None:
        extra = torch.cat([vector_weights, resp[1:] - gate_probs])
    if with_hessian:
        hessian_weights, pairs = _hessian_weights(gate_probs)
        gram_weights = torch.cat([gram_weights, hessian_weights])
    matrix, sums = _weighted_grams(x, gram_weights, intercept, out, extra, skip)
    hessian = _assemble_hessian(matrix[k:], pairs, k - 1) if with_hessian else None
    gradient = sums[k:] if gate_probs is not None else None
    return matrix[:k].to(f64), sums[:k].to(f64), y_square, gradient, hessian


def _gate_system(
    x,
    resp,
    probs,
    gate_bias: bool,
    gradient,
    hessian,
    out: torch.Tensor | None,
    want_hessian: bool = True,
):
    """The gate's IRLS gradient and negative Hessian from rows (k, n) of responsibilities and
    (k - 1, n) of gate probabilities (``gradient``, ``hessian`` when already computed; the
    Hessian None when not ``want_hessian``)."""
    width = x.shape[1] + (1 if gate_bias else 0)
    if probs is None:  # one expert: no gate
        return x.new_zeros(0, width), x.new_zeros(0, 0)
    if hessian is None and want_hessian:
        # the gradient's weighted sums join the Grams' product when it is still to compute
        extra = (resp[1:] - probs) if gradient is None else None
        weights, pairs = _hessian_weights(probs)
        out = torch.empty_like(x) if out is None else out
        grams, sums = _weighted_grams(x, weights, gate_bias, out, extra)
        hessian = _assemble_hessian(grams, pairs, probs.shape[0])
        gradient = sums if gradient is None else gradient
    elif gradient is None:
        gradient = _weighted_sums(x, (resp[1:] - probs).T, gate_bias)
    return gradient, hessian


def pass_statistics(
    x: torch.Tensor,
    y: torch.Tensor,
    params: Params,
    link: Link,
    update_experts: bool,
    gate_bias: bool,
    linearise_at: Params | None = None,
    skip_expert: int | None = None,
    gate_hessian: bool = True,
) -> Statistics:
    """The :class:`Statistics` of one chunk of rows (the function every EM pass sums).

    Responsibilities are computed at ``params``; the expert and gate systems (and the squared
    error) at ``linearise_at`` (default ``params``): a further Newton step within one M-step.
    ``gate_bias``: whether the gate offsets are fitted (an intercept column in the gate system).
    Products run in ``x``'s dtype; the sums are returned in float64. The linear predictors of
    every expert and gate row come from one product, and the Gram matrices are weighted products
    of ``x`` itself (intercepts as sums), so no design matrix is copied.

    ``skip_expert`` (identity link with the experts updated; ignored otherwise): that expert's
    (d, d) block of ``expert_matrix`` (its experts' columns, intercept row and column excluded)
    is left ZERO, one weighted Gram fewer per chunk; the responsibilities sum to one over the
    experts, so the summed block is the design's Gram minus the other experts' blocks
    (:func:`complete_skipped_gram`, after the pass).

    ``gate_hessian=False``: the gate's negative Hessian is not formed (``gate_hessian`` None in
    the result, for the caller to supply one from an earlier pass: a lazy Newton step), one
    weighted Gram fewer per chunk at k = 2 and ``k (k - 1) / 2`` fewer at k > 2.
    """
    f64 = torch.float64
    # the experts' and the gate's columns of the design (the same tensor when they share it)
    x_experts = expert_columns(x, params.in_features, params.gate_weight.shape[-1])
    x_gate = gate_columns(x, params.in_features, params.gate_weight.shape[-1])
    # rows (k, n): every elementwise step and sum over the experts runs along n
    predictors, logits = linear_predictor_rows(x, params)
    log_probs = _log_prob_rows(y, predictors, logits, params, link)
    log_lik = _logsumexp_columns(log_probs)
    resp = (log_probs - log_lik).exp()
    at = params
    if linearise_at is not None:
        at = linearise_at
        predictors, logits = linear_predictor_rows(x, at)
    intercept = at.experts_bias is not None
    residual = y - link(predictors)
    k = resp.shape[0]
    probs = _gate_probabilities(logits) if k > 1 else None
    # one design and one intercept rule: the gate's IRLS gradient (and for k = 2 its Gram) join
    # the experts' products
    fuse_gate = k > 1 and update_experts and x_gate is x_experts and gate_bias == intercept
    matrix = vector = y_square = gradient = hessian = None
    buffer = torch.empty_like(x_experts)  # the weighted rows of every Gram of this chunk
    if update_experts:
        gate_probs = probs if fuse_gate else None
        matrix, vector, y_square, gradient, hessian = _expert_system(
            x_experts,
            y,
            resp,
            predictors,
            residual,
            link,
            intercept,
            gate_probs,
            buffer,
            skip_expert,
            gate_hessian,
        )
    gate_buffer = buffer if x_gate.shape == buffer.shape else None
    gradient, hessian = _gate_system(
        x_gate, resp, probs, gate_bias, gradient, hessian, gate_buffer, gate_hessian
    )
    return Statistics(
        rows=torch.tensor(float(x.shape[0]), dtype=f64, device=x.device),
        log_likelihood=log_lik.sum().to(f64),
        responsibility=resp.sum(1).to(f64),
        squared_error=(resp * residual * residual).sum(1).to(f64),
        expert_matrix=matrix,
        expert_vector=vector,
        y_square=y_square,
        gate_gradient=gradient.to(f64),
        gate_hessian=None if hessian is None else hessian.to(f64),
    )


def expert_gram_block(statistics: Statistics, width: int) -> torch.Tensor:
    """The Gram ``sum_n x_n x_n^T`` (width, width) of the experts' columns, from a pass that
    computed every expert's Gram (identity link, no ``skip_expert``): the sum of their (d, d)
    blocks, since the responsibilities sum to one over the experts (float64)."""
    return statistics.expert_matrix[:, :width, :width].sum(0)


def complete_skipped_gram(statistics: Statistics, skip: int, gram: torch.Tensor) -> Statistics:
    """The :class:`Statistics` of a pass run with ``skip_expert=skip``, with that expert's (d, d)
    Gram block filled in as ``gram`` (:func:`expert_gram_block`: the design's Gram of the
    experts' columns) minus the other experts' blocks (all in float64). Exact up to rounding;
    skipping the expert with the largest responsibility total keeps the subtraction's loss to
    about ``k`` ulps of the block it gives."""
    width = gram.shape[-1]
    matrix = statistics.expert_matrix.clone()
    blocks = matrix[:, :width, :width]
    others = torch.cat([blocks[:skip], blocks[skip + 1 :]]).sum(0)
    blocks[skip] = gram - others
    return statistics._replace(expert_matrix=matrix)


def gradient_sums(x: torch.Tensor, y: torch.Tensor, params: Params, link: Link):
    """One chunk's ``sum_n log p(y_n | x_n)``, its gradient and the responsibilities' totals
    (float64): the gradient as ONE flat vector in the order of
    :class:`pyromoe.core.em.newton.Flat` (expert weights, expert biases, gate weights, gate
    offsets, log noise sd(s)), in closed form from one product of weighted rows with ``x``:
    ``d/da_i = sum_n r_ni (y_n - g(z_ni)) g'(z_ni) u_n / s_i^2``, ``d/dw_j = sum_n (r_nj - p_nj)
    u_n`` (the gate), ``d/dlog s_i = sum_n r_ni ((y_n - g(z_ni))^2 / s_i^2 - 1)`` (summed over
    the experts for a shared sd). A pass costs a read of the chunk beyond the log-likelihood's
    own product, and no Gram matrix."""
    f64 = torch.float64
    k = params.num_experts
    predictors, logits = linear_predictor_rows(x, params)
    log_probs = _log_prob_rows(y, predictors, logits, params, link)
    rows = _logsumexp_columns(log_probs)
    resp = (log_probs - rows).exp()
    noise = params.expert_noise().to(dtype=x.dtype, device=x.device)[:, None]
    residual = y - link(predictors)
    scaled = residual / (noise * noise)
    derivative = 1.0 if link.is_identity else link.derivative(predictors)
    expert_rows = resp * scaled * derivative  # (k, n)
    gate_rows = resp[1:] - _gate_probabilities(logits) if k > 1 else resp[:0]
    sums = torch.cat([expert_rows, gate_rows]) @ x  # (2k - 1, D)
    d, width = params.in_features, params.gate_weight.shape[-1]
    parts = [expert_columns(sums[:k], d, width).reshape(-1)]
    if params.experts_bias is not None:
        parts.append(expert_rows.sum(1))
    parts.append(gate_columns(sums[k:], d, width).reshape(-1))
    if params.gate_bias is not None:
        parts.append(gate_rows.sum(1))
    noise_rows = (resp * (residual * scaled - 1.0)).sum(1)
    parts.append(noise_rows if params.per_expert_noise else noise_rows.sum().reshape(1))
    gradient = torch.cat([t.to(f64) for t in parts])
    return rows.sum().to(f64), gradient, resp.sum(1).to(f64)


def mean_log_likelihood(source: Source, params: Params, link: Link, chunk_size: int) -> float:
    """Mean log-likelihood per row of ``params`` over a source (one pass)."""
    total = source.reduce(_log_likelihood_sums, chunk_size, params, link)
    return float(total[0] / total[1])


def _log_likelihood_sums(x, y, params, link):
    total = log_likelihood(x, y, params, link).sum().to(torch.float64)
    return torch.stack([total, torch.tensor(float(x.shape[0]), dtype=total.dtype, device=x.device)])
