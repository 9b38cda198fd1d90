"""Newton steps on all rows with the curvature of a subsample (docs/algorithm.md section 4).

EM converges linearly; from a fit on a random subsample of ``m`` rows it still needs about ten
passes over all ``n`` rows to meet its tolerance, since the subsample's optimum is about
``(p / 2) (n / m)`` nats short on all rows. The log-likelihood's Hessian on all rows is, to
``O(1 / sqrt(m))`` relative error, ``n / m`` times the subsample's at the same point, so Newton
steps with that scaled Hessian and the gradient on all rows (one pass each, no Gram matrix)
converge at a rate of that relative error per step: two or three passes where EM takes ten.

:func:`subsample_hessian` forms the observed Hessian of the subsample's summed log-likelihood
(float64, over the flat parameters of :class:`Flat`: expert weights and biases, gate weights and
offsets, the log of each noise sd) from each row's second derivatives in its linear predictors
(autograd, a few backward passes) and weighted Grams of the rows' designs; :func:`newton_polish` takes the steps, each kept
only when the pass at the new point shows a higher log-likelihood (else the step is halved, and
after a few halvings the polish stops where it is). Pure torch; any :class:`~pyromoe.core.sources.
Source`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..likelihood import (
    expert_columns,
    gate_columns,
    linear_predictor_rows,
    log_likelihood,
    log_likelihood_of_rows,
)
from ..links import Link
from ..params import Params
from ..sources import Source
from .statistics import gradient_sums

__all__ = ["Flat", "NewtonPolish", "newton_polish", "subsample_hessian"]

F64 = torch.float64

#: Halvings of a Newton step before the polish stops where it is.
MAX_HALVINGS = 4


@dataclass(frozen=True)
class Flat:
    """The parameters of a :class:`Params` as one flat float64 vector: expert weights, expert
    biases (if any), gate weights, gate offsets (if any), the log of the noise sd(s)."""

    like: Params

    def flat(self, params: Params) -> torch.Tensor:
        params = params._replace(noise=params.noise.log())
        return torch.cat([t.reshape(-1).to(F64) for t in params if t is not None])

    def params(self, theta: torch.Tensor, dtype: torch.dtype | None = None) -> Params:
        like = self.like
        out, start = [], 0
        for t in like:
            if t is None:
                out.append(None)
                continue
            size = t.numel()
            out.append(theta[start : start + size].reshape(t.shape))
            start += size
        out[-1] = out[-1].exp()
        params = Params(*out)
        if dtype is None:
            return params
        return Params(*(None if t is None else t.to(dtype) for t in params))


def _sums(x, y, theta, flat: Flat, link: Link):
    """One chunk's summed log-likelihood, its gradient in the flat parameters and the
    responsibilities' totals (k,) (float64; :func:`~pyromoe.core.em.statistics.gradient_sums`)."""
    return gradient_sums(x, y, flat.params(theta.to(x.device), x.dtype), link)


def subsample_hessian(x: torch.Tensor, y: torch.Tensor, params: Params, link: Link):
    """The Hessian (p, p) of ``sum_n log p(y_n | x_n)`` over the rows given, in :class:`Flat`'s
    parameters, at ``params`` (float64, on ``x``'s device).

    Each row's log-likelihood depends on the weights and biases only through its ``2k - 1``
    linear predictors ``u_n`` (the experts' ``a_i . x_n + b_i`` and the gate's free logits), which
    are linear in them, and on the log noise sd(s) ``s``: so the Hessian is ``sum_n J_n^T
    (d^2 f_n / d(u_n, s)^2) J_n`` with ``J_n`` made of the rows' designs ``[x_n, 1]``. Autograd
    gives the per-row second derivatives in ``2k - 1`` plus one backward pass per noise sd (the
    rows' Hessians in ``u`` are block diagonal), and the blocks are weighted Grams of the
    designs; autograd over all ``p`` parameters takes ``p + 1`` passes (155 at k = 2, d = 50).
    One expert (no gate) takes that plain autograd route.
    """
    x64, y64 = x.to(F64), y.to(F64)
    if params.num_experts > 1:
        return _predictor_hessian(x64, y64, params.to(x.device, F64), link)
    flat = Flat(params)

    def total(theta):
        return log_likelihood(x64, y64, flat.params(theta), link).sum()

    return torch.autograd.functional.hessian(total, flat.flat(params).to(x.device))


def _predictor_hessian(x, y, params: Params, link: Link) -> torch.Tensor:
    """:func:`subsample_hessian` from the rows' second derivatives in their linear predictors."""
    k = params.num_experts
    experts, gate = params.experts_weight.shape[-1], params.gate_weight.shape[-1]
    designs = [expert_columns(x, experts, gate)] * k + [gate_columns(x, experts, gate)] * (k - 1)
    biases = [params.experts_bias is not None] * k + [params.gate_bias is not None] * (k - 1)
    designs = [
        torch.cat([d, d.new_ones(d.shape[0], 1)], 1) if bias else d
        for d, bias in zip(designs, biases, strict=True)
    ]
    # each predictor's positions in the flat vector: its weights, then its bias
    index, start = [], 0
    offsets = {}
    for name, t in zip(params._fields, params, strict=True):
        offsets[name], start = start, start + (0 if t is None else t.numel())
    for p in range(2 * k - 1):
        expert = p < k
        row = p if expert else p - k
        width = experts if expert else gate
        weights = offsets["experts_weight" if expert else "gate_weight"] + row * width
        positions = list(range(weights, weights + width))
        if biases[p]:
            positions.append(offsets["experts_bias" if expert else "gate_bias"] + row)
        index.append(torch.tensor(positions, device=x.device))
    noise_at = offsets["noise"]
    # the rows' predictors as leaves (n, 2k - 1) and the log noise sd(s)
    predictors, logits = linear_predictor_rows(x, params)
    u = torch.cat([predictors, logits[1:]]).T.detach().requires_grad_(True)
    s = params.noise.log().detach().requires_grad_(True)
    with torch.enable_grad():
        total = log_likelihood_of_rows(y, u.T, params._replace(noise=s.exp()), link).sum()
        grad_u, grad_s = torch.autograd.grad(total, (u, s), create_graph=True)
        h_uu = [
            torch.autograd.grad(grad_u[:, j].sum(), u, retain_graph=True)[0]
            for j in range(2 * k - 1)
        ]
        s_rows = [
            torch.autograd.grad(grad_s.reshape(-1)[m], (u, s), retain_graph=True)
            for m in range(s.numel())
        ]
    hessian = x.new_zeros(start, start)
    for p in range(2 * k - 1):
        for q in range(p, 2 * k - 1):
            block = (designs[p] * h_uu[p][:, q, None]).T @ designs[q]
            hessian[index[p][:, None], index[q][None, :]] = block
            hessian[index[q][:, None], index[p][None, :]] = block.T
        for m, (h_su, _) in enumerate(s_rows):
            column = designs[p].T @ h_su[:, p]
            hessian[index[p], noise_at + m] = column
            hessian[noise_at + m, index[p]] = column
    for m, (_, h_ss) in enumerate(s_rows):
        hessian[noise_at + m, noise_at : noise_at + s.numel()] = h_ss.reshape(-1)
    return hessian.detach()


@dataclass(frozen=True)
class NewtonPolish:
    """What :func:`newton_polish` did: the parameters it ends at, the mean log-likelihood per
    row after each accepted step (the first entry at the start), the passes over the data, the
    responsibilities' totals (k,) at the end (each expert's effective rows), and why it stopped
    (``"converged"``: the gain the next step promises fell below ``tol`` per row;
    ``"not_ascending"``: a step halved :data:`MAX_HALVINGS` times still lowered the
    log-likelihood; ``"max_steps"``; ``"indefinite"``: the subsample's Hessian is not negative
    definite, no step was taken)."""

    params: Params
    trace: list[float]
    passes: int
    stopped: str
    responsibility: torch.Tensor


def newton_polish(
    source: Source,
    params: Params,
    link: Link,
    hessian: torch.Tensor,
    hessian_rows: int,
    *,
    tol: float,
    chunk_size: int,
    max_steps: int = 6,
) -> NewtonPolish:
    """Newton steps on all rows of ``source`` from ``params``, with the gradient on all rows and
    ``n / hessian_rows`` times ``hessian`` (:func:`subsample_hessian` on ``hessian_rows`` rows).

    Each pass gives the summed log-likelihood and its gradient at the current point; a step is
    kept only when the next pass shows a higher log-likelihood (else it is halved, up to
    :data:`MAX_HALVINGS` times, one pass each). Stops once the gain the next step promises
    (half the Newton decrement ``g . step``) is below ``tol`` per row.
    """
    n = source.num_rows
    flat = Flat(params)
    dtype = params.experts_weight.dtype
    curvature = -hessian.to(F64) * (n / hessian_rows)
    factor, info = torch.linalg.cholesky_ex(curvature)
    theta = flat.flat(params).to(curvature.device)

    def evaluate(point):
        value, grad, responsibility = source.reduce(_sums, chunk_size, point, flat, link)
        return float(value), grad.to(curvature.device), responsibility

    value, grad, responsibility = evaluate(theta)
    trace, passes = [value / n], 1
    if bool(info.any()):
        return NewtonPolish(params, trace, passes, "indefinite", responsibility)
    stopped = "max_steps"
    for _ in range(max_steps):
        step = torch.cholesky_solve(grad[:, None], factor)[:, 0]
        if float(grad @ step) < 2 * tol * n:
            stopped = "converged"
            break
        size = 1.0
        for _ in range(MAX_HALVINGS + 1):
            candidate = theta + size * step
            new_value, new_grad, new_responsibility = evaluate(candidate)
            passes += 1
            if new_value >= value:
                break
            size *= 0.5
        else:
            stopped = "not_ascending"
            break
        theta, value, grad, responsibility = candidate, new_value, new_grad, new_responsibility
        trace.append(value / n)
    return NewtonPolish(flat.params(theta, dtype), trace, passes, stopped, responsibility)
