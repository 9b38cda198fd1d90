"""The mixture-of-experts likelihood as pure torch functions of the parameters.

One implementation shared by the Pyro model (:mod:`pyromoe.bayes.model`), EM
(:mod:`pyromoe.core.em`) and the ArviZ ``log_likelihood`` group. Parameters may carry leading batch
dimensions (posterior draws, vectorised particles), as in :class:`pyromoe.core.params.Params`, which the
mixture functions take; results have shape ``(..., n)`` or ``(..., n, k)``.

Gate convention (docs/algorithm.md section 1): expert 0 is the reference with logit 0 and expert ``i >= 1``
has logit ``gate_weight[i - 1] . x + gate_bias[i - 1]``; for k = 2 this is
``P(expert 1 | x) = sigmoid(w . x + c)``. ``link`` is a :class:`~pyromoe.core.links.Link` (public
entry points resolve names once, with :func:`pyromoe._validation.check_link`).
"""

from __future__ import annotations

import math

import torch

from .links import Link
from .params import Params

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

__all__ = [
    "linear_predictors",
    "log_probs_from_predictors",
    "expert_means",
    "gate_logits",
    "component_log_probs",
    "log_likelihood",
    "responsibilities",
]


def expert_means(
    x: torch.Tensor,
    experts_weight: torch.Tensor,
    experts_bias: torch.Tensor | None,
    link: Link,
) -> torch.Tensor:
    """Each expert's mean ``g(a_i . x + b_i)``: shape ``(..., n, k)``."""
    z = torch.einsum("nd,...kd->...nk", x, experts_weight)
    if experts_bias is not None:
        z = z + experts_bias.unsqueeze(-2)
    return link(z)


def gate_logits(
    x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor | None
) -> torch.Tensor:
    """Gate logits with the reference expert's zero column first: shape ``(..., n, k)``."""
    free = torch.einsum("nd,...kd->...nk", x, gate_weight)
    if gate_bias is not None:
        free = free + gate_bias.unsqueeze(-2)
    return torch.cat([free.new_zeros(*free.shape[:-1], 1), free], dim=-1)


def linear_predictors(x: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' linear predictors ``a_i . x + b_i`` and the gate logits (reference expert's
    zero first), shapes ``(..., n, k)`` each, from ONE product of ``x`` with the stacked expert
    and gate weights."""
    k = params.num_experts
    weights = torch.cat([params.experts_weight, params.gate_weight], dim=-2)  # (..., 2k - 1, d)
    z = torch.einsum("nd,...kd->...nk", x, weights)
    experts, free = z[..., :k], z[..., k:]
    if params.experts_bias is not None:
        experts = experts + params.experts_bias.unsqueeze(-2)
    if params.gate_bias is not None:
        free = free + params.gate_bias.unsqueeze(-2)
    return experts, torch.cat([free.new_zeros(*free.shape[:-1], 1), free], dim=-1)


def log_probs_from_predictors(
    y: torch.Tensor, predictors: torch.Tensor, logits: torch.Tensor, params: Params, link: Link
) -> torch.Tensor:
    """:func:`component_log_probs` from :func:`linear_predictors`' output: shape ``(..., n, k)``."""
    log_gate = torch.log_softmax(logits, dim=-1)
    # (..., 1, k): a shared sd broadcast over the experts, or one per expert
    noise = params.expert_noise().to(dtype=predictors.dtype, device=predictors.device)
    noise = noise.unsqueeze(-2)
    standardised = (y.unsqueeze(-1) - link(predictors)) / noise
    return log_gate - 0.5 * standardised * standardised - torch.log(noise) - _HALF_LOG_2PI


def component_log_probs(
    x: torch.Tensor, y: torch.Tensor, params: Params, link: Link
) -> torch.Tensor:
    """``log gate_i(x_n) + log Normal(y_n | g(a_i . x_n + b_i), noise_i^2)``: shape ``(..., n, k)``."""
    return log_probs_from_predictors(y, *linear_predictors(x, params), params, link)


def log_likelihood(x: torch.Tensor, y: torch.Tensor, params: Params, link: Link) -> torch.Tensor:
    """Per-observation log-likelihood ``log p(y_n | x_n)``, assignments marginalised: shape ``(..., n)``.

    Examples
    --------
    >>> x, y = torch.zeros(3, 1), torch.zeros(3)
    >>> from pyromoe.core.links import LINKS
    >>> params = Params(torch.ones(2, 1), None, torch.zeros(1, 1), None, torch.tensor(1.0))
    >>> log_likelihood(x, y, params, LINKS["linear"]).shape
    torch.Size([3])
    """
    return torch.logsumexp(component_log_probs(x, y, params, link), dim=-1)


def responsibilities(x: torch.Tensor, y: torch.Tensor, params: Params, link: Link) -> torch.Tensor:
    """Posterior responsibilities ``p(expert i | x_n, y_n)``: shape ``(..., n, k)``, rows sum to 1."""
    return torch.softmax(component_log_probs(x, y, params, link), dim=-1)
