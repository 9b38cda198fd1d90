"""The mixture-of-experts likelihood as pure torch functions of the parameters.

One implementation shared by the Pyro model (:mod:`pyromoe.bayes.model`), EM
(:mod:`pyromoe.core.em`) and the ArviZ ``log_likelihood`` group. Parameters may carry leading batch
dimensions (posterior draws, vectorised particles), as in :class:`pyromoe.core.params.Params`, which the
mixture functions take; results have shape ``(..., n)`` or ``(..., n, k)``.

Gate convention (docs/algorithm.md section 1): expert 0 is the reference with logit 0 and expert ``i >= 1``
has logit ``gate_weight[i - 1] . x + gate_bias[i - 1]``; for k = 2 this is
``P(expert 1 | x) = sigmoid(w . x + c)``. ``link`` is a :class:`~pyromoe.core.links.Link` (public
entry points resolve names once, with :func:`pyromoe.core.links.check_link`).
"""

from __future__ import annotations

import math

import torch

from .links import Link
from .params import Params

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

__all__ = [
    "HALF_LOG_2PI",
    "expert_columns",
    "gate_columns",
    "linear_predictors",
    "linear_predictor_rows",
    "log_probs_from_predictors",
    "expert_means",
    "gate_logits",
    "component_log_probs",
    "log_likelihood",
    "log_likelihood_of_rows",
    "responsibilities",
    "draw_from_mixture",
    "sample_mixture",
]


def _layout(total: int, experts: int, gate: int) -> bool:
    """Whether a design of ``total`` columns is split (experts' columns, then the gate's) for
    weights of widths ``experts`` and ``gate``; False when both parts read every column."""
    if experts == total and gate == total:
        return False
    if experts + gate == total:
        return True
    raise ValueError(
        f"the design has {total} columns but the experts' weights read {experts} and the gate's "
        f"{gate}: pass the experts' columns then the gate's (x = [x | z], {experts + gate} "
        "columns), or one design for both"
    )


def expert_columns(x: torch.Tensor, experts_width: int, gate_width: int) -> torch.Tensor:
    """The experts' columns of the design ``x`` (n, D): all of it, or the first ``experts_width``."""
    return x if experts_width == x.shape[-1] else x[..., :experts_width]


def gate_columns(x: torch.Tensor, experts_width: int, gate_width: int) -> torch.Tensor:
    """The gate's columns of the design ``x`` (n, D): all of it, or the last ``gate_width``."""
    return x if gate_width == x.shape[-1] else x[..., x.shape[-1] - gate_width :]


def _products(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``x`` (n, d) times each row of ``weights`` (..., k, d): (..., n, k). A matmul for one set
    of weights (einsum plans its contraction on every call: a third of a small EM pass)."""
    return x @ weights.T if weights.dim() == 2 else torch.einsum("nd,...kd->...nk", x, weights)


def expert_means(
    x: torch.Tensor,
    experts_weight: torch.Tensor,
    experts_bias: torch.Tensor | None,
    link: Link,
) -> torch.Tensor:
    """Each expert's mean ``g(a_i . x + b_i)``: shape ``(..., n, k)``; ``x`` is the whole design or
    the experts' columns of it (its first ``experts_weight.shape[-1]`` columns are read)."""
    z = _products(x[..., : experts_weight.shape[-1]], experts_weight)
    if experts_bias is not None:
        z = z + experts_bias.unsqueeze(-2)
    return link(z)


def gate_logits(
    x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor | None
) -> torch.Tensor:
    """Gate logits with the reference expert's zero column first: shape ``(..., n, k)``; ``x`` is
    the whole design or the gate's columns of it (its last ``gate_weight.shape[-1]`` are read)."""
    free = _products(x[..., x.shape[-1] - gate_weight.shape[-1] :], gate_weight)
    if gate_bias is not None:
        free = free + gate_bias.unsqueeze(-2)
    return torch.cat([free.new_zeros(*free.shape[:-1], 1), free], dim=-1)


def _stacked_weights(params: Params, total: int) -> torch.Tensor:
    """The experts' and the gate's weights stacked, (..., 2k - 1, total), each padded with zeros
    over the other's columns when the design is split (x = [x | z])."""
    experts, gate = params.experts_weight, params.gate_weight
    if _layout(total, experts.shape[-1], gate.shape[-1]):  # x = [x | z]: pad with zeros
        experts = torch.cat([experts, experts.new_zeros(*experts.shape[:-1], gate.shape[-1])], -1)
        gate = torch.cat([gate.new_zeros(*gate.shape[:-1], params.in_features), gate], -1)
    return torch.cat([experts, gate], dim=-2)


def linear_predictors(x: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' linear predictors ``a_i . x + b_i`` and the gate logits (reference expert's
    zero first), shapes ``(..., n, k)`` each, from ONE product of ``x`` with the stacked expert
    and gate weights."""
    k = params.num_experts
    if k == 1:  # no gate: the experts' columns only (a design [x | z] keeps z unread)
        experts = params.experts_weight
        z = _products(x[..., : experts.shape[-1]], experts)
        if params.experts_bias is not None:
            z = z + params.experts_bias.unsqueeze(-2)
        return z, z.new_zeros(z.shape)
    z = _products(x, _stacked_weights(params, x.shape[-1]))
    experts, free = z[..., :k], z[..., k:]
    if params.experts_bias is not None:
        experts = experts + params.experts_bias.unsqueeze(-2)
    if params.gate_bias is not None:
        free = free + params.gate_bias.unsqueeze(-2)
    return experts, torch.cat([free.new_zeros(*free.shape[:-1], 1), free], dim=-1)


def linear_predictor_rows(x: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`linear_predictors` transposed, for parameters without batch dimensions: shapes
    ``(k, n)`` each, rows of length n, from ONE product ``weights @ x.T``. Elementwise work and
    sums over the k experts run along the long dimension in this layout (torch's kernels over a
    short last dimension cost many times as much on a CPU)."""
    k = params.num_experts
    if k == 1:
        experts = params.experts_weight.contiguous()
        z = experts @ x[:, : experts.shape[-1]].T
        if params.experts_bias is not None:
            z = z + params.experts_bias[:, None]
        return z, torch.zeros_like(z)
    z = _stacked_weights(params, x.shape[-1]) @ x.T  # (2k - 1, n)
    experts, free = z[:k], z[k:]
    if params.experts_bias is not None:
        experts = experts + params.experts_bias[:, None]
    if params.gate_bias is not None:
        free = free + params.gate_bias[:, None]
    return experts, torch.cat([free.new_zeros(1, free.shape[1]), free])


def log_probs_from_predictors(
    y: torch.Tensor, predictors: torch.Tensor, logits: torch.Tensor, params: Params, link: Link
) -> torch.Tensor:
    """:func:`component_log_probs` from :func:`linear_predictors`' output: shape ``(..., n, k)``."""
    # (..., 1, k): a shared sd broadcast over the experts, or one per expert
    noise = params.expert_noise().to(dtype=predictors.dtype, device=predictors.device)
    gaussian = _gaussian_terms(y.unsqueeze(-1), predictors, noise.unsqueeze(-2), link)
    return torch.log_softmax(logits, dim=-1) + gaussian - HALF_LOG_2PI


def _gaussian_terms(y, predictors, noise, link: Link) -> torch.Tensor:
    """``-r^2 / 2 - log sigma`` with ``r = (y - g(z)) / sigma``, elementwise (broadcasting):
    the log of an expert's Normal density less ``log sqrt(2 pi)``, in either layout (the
    experts last, or one expert's row)."""
    standardised = (y - link(predictors)) / noise
    return -0.5 * standardised * standardised - torch.log(noise)


def component_log_probs(
    x: torch.Tensor, y: torch.Tensor, params: Params, link: Link
) -> torch.Tensor:
    """``log gate_i(x_n) + log Normal(y_n | g(a_i . x_n + b_i), noise_i^2)``: shape ``(..., n, k)``."""
    return log_probs_from_predictors(y, *linear_predictors(x, params), params, link)


def log_likelihood(x: torch.Tensor, y: torch.Tensor, params: Params, link: Link) -> torch.Tensor:
    """Per-observation log-likelihood ``log p(y_n | x_n)``, assignments marginalised: shape ``(..., n)``.

    Computed expert by expert on rows of length n (:func:`_predictor_rows`): the sums over the k
    experts (the mixture's and the gate's normalisers) are elementwise operations between
    those rows, where ``torch.logsumexp`` / ``log_softmax`` over a short last dimension of
    :func:`component_log_probs`' ``(..., n, k)`` cost several times as much (ArviZ's
    ``log_likelihood`` group and the PSIS check evaluate it for every draw).

    Examples
    --------
    >>> x, y = torch.zeros(3, 1), torch.zeros(3)
    >>> from pyromoe.core.links import LINKS
    >>> params = Params(torch.ones(2, 1), None, torch.zeros(1, 1), None, torch.tensor(1.0))
    >>> log_likelihood(x, y, params, LINKS["linear"]).shape
    torch.Size([3])
    """
    return log_likelihood_of_rows(y, _predictor_rows(x, params), params, link)


def log_likelihood_of_rows(
    y: torch.Tensor, rows: torch.Tensor, params: Params, link: Link
) -> torch.Tensor:
    """:func:`log_likelihood` from the linear predictors as rows ``(..., 2k - 1, n)``: the
    experts' ``a_i . x_n + b_i`` then the free gate logits (``(..., 1, n)`` for one expert);
    ``params`` give the noise sd(s). Shape ``(..., n)``."""
    k = params.num_experts
    total = _logsumexp(_joint_terms(y, rows, params, link)) - HALF_LOG_2PI
    if k == 1:
        return total
    return total - _logsumexp(
        [torch.zeros_like(total)] + [rows[..., k + i, :] for i in range(k - 1)]
    )


def _joint_terms(y: torch.Tensor, rows: torch.Tensor, params: Params, link: Link) -> list:
    """Each expert's ``logit_i - r_i^2 / 2 - log sigma_i`` (``r_i = (y - g(z_i)) / sigma_i``,
    expert 0's logit 0), rows of shape ``(..., n)``: the log of gate times density up to the
    terms common to the experts (the gate's normaliser and ``log sqrt(2 pi)``)."""
    k = params.num_experts
    noise = params.expert_noise().to(dtype=rows.dtype, device=rows.device)
    terms = []
    for i in range(k):
        term = _gaussian_terms(y, rows[..., i, :], noise[..., i, None], link)
        terms.append(term if i == 0 else term + rows[..., k + i - 1, :])
    return terms


def _predictor_rows(x: torch.Tensor, params: Params) -> torch.Tensor:
    """The experts' predictors then the free gate logits, biases added, as rows of length n:
    ``(..., 2k - 1, n)`` (``(..., 1, n)`` for one expert), from ONE product of the stacked
    weights with ``x.T`` (one GEMM over all batch dimensions)."""
    k = params.num_experts
    if k == 1:
        weights = params.experts_weight
        rows = weights @ x[:, : weights.shape[-1]].T
        bias = params.experts_bias
    else:
        rows = _stacked_weights(params, x.shape[-1]) @ x.T
        experts, gate = params.experts_bias, params.gate_bias
        bias = None
        if experts is not None or gate is not None:
            if experts is None:
                experts = gate.new_zeros(*gate.shape[:-1], k)
            if gate is None:
                gate = experts.new_zeros(*experts.shape[:-1], k - 1)
            bias = torch.cat([experts, gate], dim=-1)
    return rows if bias is None else rows + bias.unsqueeze(-1)


def _logsumexp(terms: list[torch.Tensor]) -> torch.Tensor:
    """``log sum_i exp(terms[i])`` elementwise over a list of equal-shaped tensors, with
    ``torch.logsumexp``'s handling of infinite maxima (all ``-inf``: ``-inf``; any ``+inf``:
    ``+inf``)."""
    if len(terms) == 1:
        return terms[0]
    top = terms[0]
    for term in terms[1:]:
        top = torch.maximum(top, term)
    top = top.masked_fill(torch.isinf(top), 0.0)
    total = torch.exp(terms[0] - top)
    for term in terms[1:]:
        total = total + torch.exp(term - top)
    return top + torch.log(total)


def responsibilities(x: torch.Tensor, y: torch.Tensor, params: Params, link: Link) -> torch.Tensor:
    """Posterior responsibilities ``p(expert i | x_n, y_n)``: shape ``(..., n, k)``, rows sum to 1.

    Computed expert by expert on rows of length n, as :func:`log_likelihood`."""
    terms = _joint_terms(y, _predictor_rows(x, params), params, link)
    normaliser = _logsumexp(terms)
    return torch.stack([torch.exp(term - normaliser) for term in terms], dim=-1)


def draw_from_mixture(
    gate: torch.Tensor, means: torch.Tensor, noise: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw of ``y`` per row from a mixture: an expert by the gate, then its Gaussian noise.

    The one mixture sampler of the package (:func:`pyromoe.simulate`, the posterior predictive of
    :func:`pyromoe.to_inference_data` and :func:`pyromoe.predict` all draw through it). Its
    random numbers, in this order, from ``generator``: one uniform per row (the expert, by
    inverting the gate's cumulative probabilities), then one standard normal per row (the
    noise); the same generator state gives the same draws.

    Parameters
    ----------
    gate : Tensor (..., n, k)
        Gate probabilities (rows sum to 1).
    means : Tensor (..., n, k)
        Each expert's mean ``g(a_i . x + b_i)``; the draws have its device and dtype.
    noise : Tensor (..., k)
        Each expert's noise sd (:meth:`~pyromoe.core.params.Params.expert_noise`).
    generator : torch.Generator
        On ``means``' device.

    Returns
    -------
    (y, labels) : Tensor (..., n), int64 Tensor (..., n)
        The draws and the expert that made each.

    Examples
    --------
    >>> gate = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    >>> means = torch.tensor([[3.0, -3.0]], dtype=torch.float64)
    >>> y, labels = draw_from_mixture(gate, means, torch.zeros(2, dtype=torch.float64),
    ...                               torch.Generator().manual_seed(0))
    >>> y.tolist(), labels.tolist()
    ([3.0], [0])
    """
    options = dict(generator=generator, device=means.device, dtype=means.dtype)
    uniform = torch.rand(gate.shape[:-1] + (1,), **options)
    labels = (uniform > gate.cumsum(-1)[..., :-1]).sum(-1, keepdim=True)
    mean = means.gather(-1, labels).squeeze(-1)
    # the chosen expert's sd: shared, or per expert
    noise = noise.to(dtype=means.dtype, device=means.device).unsqueeze(-2)
    sd = noise.expand_as(means).gather(-1, labels).squeeze(-1)
    eps = torch.randn(mean.shape, **options)
    return mean + sd * eps, labels.squeeze(-1)


def sample_mixture(
    x: torch.Tensor, params: Params, link: Link, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`draw_from_mixture` at inputs ``x`` (n, d) with ``params`` (optional batch dims):
    ``(y, labels)``, each of shape ``(..., n)``."""
    gate = torch.softmax(gate_logits(x, params.gate_weight, params.gate_bias), dim=-1)
    means = expert_means(x, params.experts_weight, params.experts_bias, link)
    return draw_from_mixture(gate, means, params.expert_noise(), generator)
