"""The log joint of :class:`~pyromoe.bayes.model.MixtureOfExperts` as one pure torch function.

:class:`FusedPotential` is the potential energy (minus the log joint density in unconstrained space)
of the model: the priors, the marginal likelihood and the log-Jacobian of the noise's ``exp``
transform, written as one torch expression of a flat unconstrained vector. It equals the potential
of :func:`pyro.infer.mcmc.util.initialize_model` on the model (tests/test_potential.py checks value
and gradient to 1e-10 in float64) but skips Pyro's trace, its validation and the
``MixtureSameFamily`` machinery: one matrix product for the experts and the gate together, two
row-wise ``logsumexp`` (mixture and gate normaliser).

It knows the priors the model uses by default (``Normal`` on weights and biases, the experts'
weights with scale ``1 / sqrt(d)``, read from :meth:`MixtureOfExperts.prior` like every scale here;
``HalfNormal`` on the noise) and the common replacements: ``Normal`` (on any
site, support real) and, on the noise, ``HalfCauchy`` and ``HalfNormal`` (support positive,
sampled through ``exp``, as Pyro's ``biject_to`` does), with any loc / scale broadcastable to the site's shape, wrapped in ``expand`` /
``to_event`` as :meth:`MixtureOfExperts.prior` does. :func:`fused_potential` returns ``None`` for
anything else (then :func:`pyromoe.bayes.fit.run_nuts` runs the traced model).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.distributions import constraints

from ..core import sites

__all__ = ["FusedPotential", "fused_potential", "unsupported_prior"]

_LOG_2PI = math.log(2 * math.pi)
#: site order of the flat vector
_ORDER = (sites.EXPERTS_WEIGHT, sites.EXPERTS_BIAS, sites.GATE_WEIGHT, sites.GATE_BIAS, sites.NOISE)
#: prior families the fused path knows, by exact type (subclasses may change ``log_prob``)
_FAMILIES = {
    dist.Normal: "normal",
    torch.distributions.Normal: "normal",
    dist.HalfCauchy: "halfcauchy",
    torch.distributions.HalfCauchy: "halfcauchy",
    dist.HalfNormal: "halfnormal",
    torch.distributions.HalfNormal: "halfnormal",
}


def _unwrap(prior):
    """The elementwise base distribution under ``Independent`` / ``expand`` wrappers, or None."""
    while True:
        if isinstance(prior, torch.distributions.Independent):
            prior = prior.base_dist
        elif isinstance(prior, dist.torch_distribution.ExpandedDistribution):
            prior = prior.base_dist
        else:
            break
    return prior if type(prior) in _FAMILIES else None


def _prior_terms(prior, shape, like: torch.Tensor):
    """``(family, loc, scale, constant)`` with loc / scale broadcast to ``shape``, or None."""
    base = _unwrap(prior)
    if base is None:
        return None
    family = _FAMILIES[type(base)]
    options = {"dtype": like.dtype, "device": like.device}
    scale = torch.as_tensor(base.scale, **options).expand(shape).clone()
    if family == "normal":
        loc = torch.as_tensor(base.loc, **options).expand(shape).clone()
        per_element = -0.5 * _LOG_2PI
    else:
        loc = None
        per_element = (
            math.log(2 / math.pi) if family == "halfcauchy" else 0.5 * math.log(2 / math.pi)
        )
    constant = float(scale.numel() * per_element - torch.log(scale).sum())
    return family, loc, scale, constant


def unsupported_prior(model, like: torch.Tensor) -> str | None:
    """The first site whose prior the fused potential does not know (``None``: all known)."""
    for name, shape in model.site_shapes.items():
        prior = model.prior(name, like)
        if _prior_terms(prior, shape, like) is None:
            return name
        support = prior.support
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        expected = constraints.real if name != sites.NOISE else None
        if expected is not None and support is not constraints.real:
            return name
    return None


class FusedPotential:
    """Potential energy ``-log p(theta, y | x)`` in unconstrained space, fused into one expression.

    Call it on Pyro's dict of unconstrained site values (``NUTS(potential_fn=...)``) or use
    :meth:`flat` on the flat vector (site order experts.weight, experts.bias, gate.weight,
    gate.bias, noise; absent biases left out; noise as its unconstrained value, ``log noise`` for a
    positive prior). No argument checks: it runs once per leapfrog step.
    """

    def __init__(self, model, x: torch.Tensor, y: torch.Tensor, priors: dict):
        self.k, self.d = model.num_experts, model.in_features
        self.bias = model.bias
        self.link = model.link
        self.x, self.y = x, y
        self.names = [name for name in _ORDER if name in model.site_shapes]
        self.shapes = {name: model.site_shapes[name] for name in self.names}
        self.sizes = [math.prod(self.shapes[name]) for name in self.names]
        self.priors = priors
        self.constant = sum(terms[3] for terms in priors.values())
        self.noise_positive = priors[sites.NOISE][0] != "normal"
        # the priors as flat vectors in site order, to evaluate all Normal terms at once
        normal = [name for name in self.names if priors[name][0] == "normal"]
        self.normal_names = normal
        self.normal_loc = torch.cat([priors[n][1].reshape(-1) for n in normal])
        self.normal_inv_scale = torch.cat([1 / priors[n][2].reshape(-1) for n in normal])

    @property
    def num_params(self) -> int:
        return sum(self.sizes)

    def to_flat(self, params: dict) -> torch.Tensor:
        return torch.cat([params[name].reshape(-1) for name in self.names])

    def from_flat(self, flat: torch.Tensor) -> dict:
        parts = torch.split(flat, self.sizes)
        return {name: part.reshape(self.shapes[name]) for name, part in zip(self.names, parts)}

    def flat(self, theta: torch.Tensor) -> torch.Tensor:
        """The potential energy at the flat unconstrained vector ``theta``."""
        k, d = self.k, self.d
        parts = dict(zip(self.names, torch.split(theta, self.sizes)))
        # prior: all Normal sites in one expression, then the noise
        normal = torch.cat([parts[name] for name in self.normal_names])
        log_joint = (
            self.constant - 0.5 * (((normal - self.normal_loc) * self.normal_inv_scale) ** 2).sum()
        )
        u = parts[sites.NOISE]  # () shared, (k,) per expert
        if self.noise_positive:
            noise = torch.exp(u)
            family, _, scale, _ = self.priors[sites.NOISE]
            ratio = noise / scale.reshape(u.shape)
            if family == "halfcauchy":
                log_joint = log_joint - torch.log1p(ratio * ratio).sum()
            else:
                log_joint = log_joint - 0.5 * (ratio * ratio).sum()
            log_joint = log_joint + u.sum()  # log |d noise / d u|
            log_noise = u
        else:
            noise = u
            log_noise = torch.log(u)
        # likelihood: one product for the experts and the free gate rows (none for one expert)
        rows = [parts[sites.EXPERTS_WEIGHT].reshape(k, d)]
        if k > 1:
            rows.append(parts[sites.GATE_WEIGHT].reshape(k - 1, d))
        z = self.x @ torch.cat(rows).T
        if self.bias:
            offsets = [parts[sites.EXPERTS_BIAS]] + ([parts[sites.GATE_BIAS]] if k > 1 else [])
            z = z + torch.cat(offsets)
        means = self.link(z[:, :k])
        logits = torch.cat([torch.zeros_like(z[:, :1]), z[:, k:]], dim=1)
        residual = (self.y.unsqueeze(-1) - means) / noise
        n = self.y.shape[0]
        if u.dim() == 0:  # shared: -log sigma leaves the logsumexp
            joint = torch.logsumexp(logits - 0.5 * residual * residual, dim=1)
            log_lik = (joint - torch.logsumexp(logits, dim=1)).sum() - n * log_noise
        else:
            joint = torch.logsumexp(logits - 0.5 * residual * residual - log_noise, dim=1)
            log_lik = (joint - torch.logsumexp(logits, dim=1)).sum()
        log_lik = log_lik - 0.5 * n * _LOG_2PI
        return -(log_joint + log_lik)

    def __call__(self, params: dict) -> torch.Tensor:
        return self.flat(self.to_flat(params))


def fused_potential(model, x: torch.Tensor, y: torch.Tensor) -> FusedPotential | None:
    """The fused potential of ``model`` on ``(x, y)``, or ``None`` if a prior is not one it knows."""
    if unsupported_prior(model, x) is not None:
        return None
    priors = {
        name: _prior_terms(model.prior(name, x), shape, x)
        for name, shape in model.site_shapes.items()
    }
    return FusedPotential(model, x, y, priors)
