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
anything else (then :func:`pyromoe.bayes.nuts.run_nuts` runs the traced model).
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
        # the gate's own covariates: x = [x_experts | z] (pyromoe.core.likelihood)
        self.d_gate = getattr(model, "gate_features", None) or self.d
        self.shared_design = getattr(model, "gate_features", None) is None
        self.x_experts, self.x_gate = (
            (x, x) if self.shared_design else (x[:, : self.d], x[:, self.d :])
        )
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
        """The potential energy at the flat unconstrained vector ``theta``.

        Its gradient is the analytic one of :meth:`value_and_grad` (an autograd ``Function``),
        not autograd through the expression: half the cost of a NUTS gradient evaluation here.
        """
        if theta.requires_grad and torch.is_grad_enabled():
            return _Potential.apply(theta, self)
        return self.value_and_grad(theta)[0]

    def value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The potential energy at ``theta`` and its gradient, in closed form.

        With ``a_ni = logit_i - (y_n - g(z_ni))^2 / (2 sigma_i^2) - log sigma_i`` and the
        responsibilities ``R = softmax(a)``, gate probabilities ``P = softmax(logits)``, the
        log-likelihood's derivatives are ``R_ni (y_n - g) / sigma_i^2 g'(z_ni)`` in ``z_ni`` (the
        experts' predictors), ``R_ni - P_ni`` in the free logits and ``R_ni (r_ni^2 - 1)`` in
        ``log sigma_i`` (summed over the experts for a shared sigma); the priors' and the
        Jacobian's are those of their closed forms.
        """
        k, d = self.k, self.d
        theta = theta.detach()
        parts = dict(zip(self.names, torch.split(theta, self.sizes)))
        # prior: all Normal sites in one expression, then the noise
        normal = torch.cat([parts[name] for name in self.normal_names])
        standard = (normal - self.normal_loc) * self.normal_inv_scale
        log_joint = self.constant - 0.5 * (standard * standard).sum()
        grad_normal = -standard * self.normal_inv_scale
        u = parts[sites.NOISE].reshape(self.shapes[sites.NOISE])  # () shared, (k,) per expert
        if self.noise_positive:
            noise = torch.exp(u)
            family, _, scale, _ = self.priors[sites.NOISE]
            ratio2 = (noise / scale.reshape(u.shape)) ** 2
            if family == "halfcauchy":
                log_joint = log_joint - torch.log1p(ratio2).sum()
                grad_u = -2 * ratio2 / (1 + ratio2)
            else:
                log_joint = log_joint - 0.5 * ratio2.sum()
                grad_u = -ratio2
            log_joint = log_joint + u.sum()  # log |d noise / d u|
            grad_u = grad_u + 1
            log_noise = u
        else:
            noise = u
            log_noise = torch.log(u)
            grad_u = torch.zeros_like(u)
        # likelihood: one product for the experts and the free gate rows (none for one expert)
        experts_rows = parts[sites.EXPERTS_WEIGHT].reshape(k, d)
        gate_rows = parts[sites.GATE_WEIGHT].reshape(k - 1, self.d_gate) if k > 1 else None
        z = self._predictors(experts_rows, gate_rows)
        if self.bias:
            offsets = [parts[sites.EXPERTS_BIAS]] + ([parts[sites.GATE_BIAS]] if k > 1 else [])
            z = z + torch.cat(offsets)
        predictors = z[:, :k]
        means = self.link(predictors)
        logits = torch.cat([torch.zeros_like(z[:, :1]), z[:, k:]], dim=1)
        residual = (self.y.unsqueeze(-1) - means) / noise
        n = self.y.shape[0]
        shared = u.dim() == 0
        scores = logits - 0.5 * residual * residual
        if not shared:
            scores = scores - log_noise
        joint = torch.logsumexp(scores, dim=1)
        normaliser = torch.logsumexp(logits, dim=1)
        log_lik = (joint - normaliser).sum() - 0.5 * n * _LOG_2PI
        if shared:
            log_lik = log_lik - n * log_noise
        resp = torch.exp(scores - joint[:, None])
        gate = torch.exp(logits - normaliser[:, None])
        # gradient of the log-likelihood in z (experts' predictors, then the free logits)
        d_predictors = resp * residual / noise * self.link.derivative(predictors)
        d_z = torch.cat([d_predictors, (resp - gate)[:, 1:]], dim=1)
        d_experts, d_gate = self._weight_gradients(d_z)
        d_offsets = d_z.sum(0)
        weighted = resp * residual * residual
        d_log_noise = weighted.sum() - n if shared else weighted.sum(0) - resp.sum(0)
        if self.noise_positive:
            grad_u = grad_u + d_log_noise  # log sigma = u
        else:
            grad_u = grad_u + d_log_noise / u
        grads = {
            sites.EXPERTS_WEIGHT: d_experts,
            sites.GATE_WEIGHT: d_gate,
            sites.NOISE: grad_u,
        }
        if self.bias:
            grads[sites.EXPERTS_BIAS] = d_offsets[:k]
            grads[sites.GATE_BIAS] = d_offsets[k:]
        # the Normal priors' part, in their own order
        sizes = [self.sizes[self.names.index(name)] for name in self.normal_names]
        for name, part in zip(self.normal_names, torch.split(grad_normal, sizes)):
            grads[name] = grads[name].reshape(-1) + part
        grad = torch.cat([grads[name].reshape(-1) for name in self.names])
        return -(log_joint + log_lik), -grad

    def _predictors(self, experts_rows: torch.Tensor, gate_rows: torch.Tensor | None):
        """The experts' predictors and the free gate logits, (n, 2k - 1), in one product when the
        gate reads ``x``; without a gate (k = 1) the gate's covariates are not read."""
        if self.shared_design:
            return self.x @ torch.cat([experts_rows] + ([gate_rows] if self.k > 1 else [])).T
        if gate_rows is None:
            return self.x_experts @ experts_rows.T
        return torch.cat([self.x_experts @ experts_rows.T, self.x_gate @ gate_rows.T], dim=1)

    def _weight_gradients(self, d_z: torch.Tensor):
        """The gradients of the experts' and the gate's weights from those of the predictors."""
        k = self.k
        if self.shared_design:
            d_weights = d_z.T @ self.x  # (2k - 1, d)
            return d_weights[:k], d_weights[k:]
        return d_z[:, :k].T @ self.x_experts, (d_z[:, k:].T @ self.x_gate if k > 1 else None)

    def __call__(self, params: dict) -> torch.Tensor:
        return self.flat(self.to_flat(params))


class _Potential(torch.autograd.Function):
    """The fused potential with its closed-form gradient as the backward pass."""

    @staticmethod
    def forward(ctx, theta, potential):
        value, grad = potential.value_and_grad(theta)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None


def fused_potential(model, x: torch.Tensor, y: torch.Tensor) -> FusedPotential | None:
    """The fused potential of ``model`` on ``(x, y)``, or ``None`` if a prior is not one it knows."""
    if unsupported_prior(model, x) is not None:
        return None
    priors = {
        name: _prior_terms(model.prior(name, x), shape, x)
        for name, shape in model.site_shapes.items()
    }
    return FusedPotential(model, x, y, priors)
