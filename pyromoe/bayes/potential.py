"""The log joint of :class:`~pyromoe.bayes.model.MixtureOfExperts` as one pure torch function.

:class:`FusedPotential` is the potential energy (minus the log joint density in unconstrained space)
of the model: the priors, the marginal likelihood and the log-Jacobian of the noise's ``exp``
transform, written as one torch expression of a flat unconstrained vector. It equals the potential
of :func:`pyro.infer.mcmc.util.initialize_model` on the model (tests/test_potential.py checks value
and gradient to 1e-10 in float64) but skips Pyro's trace, its validation and the
``MixtureSameFamily`` machinery, and its gradient is in closed form: one matrix product for the
experts and the gate together forward, one back, on the design held transposed (experts by rows),
so the mixture's and the gate's normalisers over the experts are elementwise operations between
rows (a ``logsumexp`` over a short inner dimension cost three quarters of the time before).

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

__all__ = ["FusedPotential", "fused_potential", "unsupported_prior", "with_gradient"]

_LOG_2PI = math.log(2 * math.pi)
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
        terms = _prior_terms(prior, shape, like)
        if terms is None or (name == sites.NOISE and terms[0] == "normal"):
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
    :meth:`flat` on the flat vector (the sites in sorted order, as Pyro's mass matrix takes them:
    experts.bias, experts.weight, gate.bias, gate.weight, noise; absent sites left out; the noise
    as ``log noise``). No argument checks: it runs once per leapfrog step.

    The data are held once, transposed, with a row of ones for the biases: every per-row tensor
    is ``(experts, n)``, so the sums over the experts (the mixture's and the gate's normalisers)
    are elementwise operations between contiguous rows, and the weights and biases of the experts
    and the gate are one matrix ``(2k - 1, d + 1)`` (one product forward, one for the gradient).
    The per-row arrays live in buffers kept between calls (:meth:`_workspace`), so an evaluation
    asks the allocator for no per-row memory; two experts take a shorter closed form
    (:meth:`_pair_log_likelihood`).
    """

    def __init__(self, model, x: torch.Tensor, y: torch.Tensor, priors: dict):
        self.k, self.d = model.num_experts, model.in_features
        self.bias = model.bias
        self.link = model.link
        self.x, self.y = x, y
        self.n = y.shape[0]
        # the gate's own covariates: x = [x_experts | z] (pyromoe.core.likelihood)
        self.d_gate = getattr(model, "gate_features", None) or self.d
        self.shared_design = getattr(model, "gate_features", None) is None
        # Pyro's order (sorted names, as its mass matrix and pyromoe's NUTS kernel): noise last
        self.names = sorted(model.site_shapes)
        self.shapes = {name: model.site_shapes[name] for name in self.names}
        self.sizes = [math.prod(self.shapes[name]) for name in self.names]
        self.priors = priors
        self.constant = sum(terms[3] for terms in priors.values())
        # every site but the noise has a Normal prior (unsupported_prior): one vector of them
        normal = self.names[:-1]
        self.num_main = sum(self.sizes[:-1])
        self.normal_loc = torch.cat([priors[n][1].reshape(-1) for n in normal])
        self.normal_inv_scale = torch.cat([1 / priors[n][2].reshape(-1) for n in normal])
        self.noise_family = priors[sites.NOISE][0]
        self.noise_inv_scale = 1 / priors[sites.NOISE][2].reshape(self.shapes[sites.NOISE])
        self._layout(x)

    def _layout(self, x: torch.Tensor) -> None:
        """The transposed designs (with a row of ones for the biases) and the map between the
        flat vector's weights and biases and the rows ``[weights | bias]`` of the matrix."""
        k, d, n = self.k, self.d, self.n
        ones = [torch.ones(1, n, dtype=x.dtype, device=x.device)] if self.bias else []
        experts_x, gate_x = (x, x) if self.shared_design else (x[:, :d], x[:, d:])
        self.design_experts = torch.cat([experts_x.T] + ones).contiguous()
        self.design_gate = None
        if k > 1 and not self.shared_design:
            self.design_gate = torch.cat([gate_x.T] + ones).contiguous()
        index = self.from_flat(torch.arange(self.num_params, device=x.device))
        columns = [index[sites.EXPERTS_WEIGHT]]
        columns += [index[sites.EXPERTS_BIAS][:, None]] if self.bias else []
        rows = [torch.cat(columns, dim=1).reshape(-1)]
        if k > 1:
            columns = [index[sites.GATE_WEIGHT]]
            columns += [index[sites.GATE_BIAS][:, None]] if self.bias else []
            rows.append(torch.cat(columns, dim=1).reshape(-1))
        order = torch.cat(rows)
        self.experts_size = k * (d + self.bias)
        self.order = None if not self.bias else order
        self.inverse = None if not self.bias else torch.argsort(order)

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
            return with_gradient(theta, *self.value_and_grad(theta))
        return self.value_and_grad(theta)[0]

    def value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The potential energy at ``theta`` and its gradient, in closed form.

        The priors' and the noise Jacobian's terms are those of their closed forms; the
        likelihood's are :meth:`_log_likelihood`'s.
        """
        theta = theta.detach()
        main, u = theta[: self.num_main], theta[self.num_main :]
        u = u.reshape(self.shapes[sites.NOISE])  # log noise: () shared, (k,) per expert
        standard = (main - self.normal_loc) * self.normal_inv_scale
        ratio2 = torch.exp(2 * u) * self.noise_inv_scale**2  # (noise / scale)^2
        if self.noise_family == "halfcauchy":
            log_noise_prior, grad_u = -torch.log1p(ratio2).sum(), -2 * ratio2 / (1 + ratio2)
        else:
            log_noise_prior, grad_u = -0.5 * ratio2.sum(), -ratio2
        # + u: log |d noise / d u|
        log_prior = self.constant - 0.5 * torch.dot(standard, standard) + log_noise_prior + u.sum()
        log_lik, grad_main, d_u = self._log_likelihood(main, u)
        grad_main = grad_main - standard * self.normal_inv_scale
        grad = torch.cat([grad_main, (grad_u + 1 + d_u).reshape(-1)])
        return -(log_prior + log_lik), -grad

    def _log_likelihood(self, main: torch.Tensor, u: torch.Tensor):
        """``(log-likelihood, its gradient in the weights and biases, in log noise)``.

        With ``a_in = logit_in - r_in^2 / 2 - log sigma_i``, ``r_in = (y_n - g(z_in)) / sigma_i``,
        the responsibilities ``R = softmax_i(a)`` and the gate ``P = softmax_i(logits)``, the
        derivatives are ``R r / sigma g'(z)`` in the experts' predictors ``z``, ``R - P`` in
        the free logits and ``R (r^2 - 1)`` in ``log sigma_i`` (summed over the experts for a
        shared sigma); those in the weights are products with the design.
        """
        k, n = self.k, self.n
        weights = main if self.order is None else main[self.order]
        if k == 2:
            return self._pair_log_likelihood(weights, u)
        work = self._workspace(weights)
        z = self._predictors(weights, work["z"])
        predictors, logits = z[:k], z[k:]
        inv_noise = torch.exp(-u)
        if u.dim() == 1:
            inv_noise = inv_noise[:, None]
        means = predictors if self.link.is_identity else self.link(predictors)
        residual = torch.sub(self.y, means, out=work["residual"]).mul_(inv_noise)  # (k, n)
        square = torch.mul(residual, residual, out=work["square"])
        scores = torch.mul(square, -0.5, out=work["scores"])
        if k > 1:
            scores[1:] += logits
        if u.dim() == 1:
            scores -= u[:, None]
        top = torch.amax(scores, 0, out=work["top"])
        exp_scores = scores.sub_(top).exp_()
        total = torch.sum(exp_scores, 0, out=work["total"])
        resp = exp_scores.div_(total)  # responsibilities
        log_lik = top.sum() + total.log_().sum() - 0.5 * n * _LOG_2PI
        if u.dim() == 0:
            log_lik = log_lik - n * u
        d_z = work["d_z"]
        torch.mul(resp, residual.mul_(inv_noise), out=d_z[:k])  # R r / sigma
        if not self.link.is_identity:
            d_z[:k] *= self.link.derivative(predictors)
        if k > 1:
            log_lik = log_lik - self._gate(logits, d_z[k:], work)
            torch.sub(resp[1:], d_z[k:], out=d_z[k:])
        grad = self._weight_gradients(d_z)
        weighted = square.mul_(resp)
        d_u = weighted.sum() - n if u.dim() == 0 else weighted.sum(1) - resp.sum(1)
        return log_lik, grad if self.inverse is None else grad[self.inverse], d_u

    def _pair_log_likelihood(self, weights: torch.Tensor, u: torch.Tensor):
        """:meth:`_log_likelihood` for two experts, in about half the elementwise work and no
        fresh memory per call.

        With two experts each row's mixture and gate normalisers are softplus terms of one
        log-odds each: ``log(p_0 N_0 + p_1 N_1) = log N_0 - softplus(l) + softplus(t)`` with the
        gate logit ``l`` and ``t = l - (r_1^2 - r_0^2) / 2 - (log sigma_1 - log sigma_0)``, the
        log-odds of expert 1's responsibility, so the responsibilities and the gate are
        ``sigmoid(t)`` and ``sigmoid(l)``. Both softplus terms come from one pass over the stacked
        ``(t, l)``: ``softplus(v) = max(v, 0) + log(1 + exp(-|v|))``, exact for any ``v`` (no
        overflow; the log's absolute error is that of ``1 + exp(-|v|)``, below 2e-16 per row).

        Every per-row array is written into :meth:`_workspace`'s buffers (``out=`` and in-place
        operations): a NUTS run evaluates this thousands of times, and at tens of thousands of
        rows each fresh array would be memory the allocator maps from the system and faults in
        page by page, which cost as much as the arithmetic (measured in ``benchmarks/nuts_speed.py``).
        """
        n = self.n
        work = self._workspace(weights)
        z = self._predictors(weights, work["z"])
        predictors, logit = z[:2], z[2]
        inv_noise = torch.exp(-u)
        if u.dim() == 1:
            inv_noise = inv_noise[:, None]
        means = predictors if self.link.is_identity else self.link(predictors)
        residual = torch.sub(self.y, means, out=work["residual"]).mul_(inv_noise)  # (2, n)
        square = torch.mul(residual, residual, out=work["square"])
        gap = torch.sub(square[1], square[0], out=work["gap"])
        pair = work["pair"]  # (t, l)
        torch.add(logit, gap, alpha=-0.5, out=pair[0])
        if u.dim() == 1:
            pair[0].sub_(u[1] - u[0])
        pair[1].copy_(logit)
        spare = work["spare"]
        positive = torch.clamp(pair, min=0, out=spare).sum(1)
        log_terms = torch.abs(pair, out=work["e"]).neg_().exp_().add_(1).log_().sum(1)
        softplus = positive + log_terms
        square_0 = square[0].sum()
        log_lik = -0.5 * square_0 + softplus[0] - softplus[1] - 0.5 * n * _LOG_2PI
        sigmoid = torch.sigmoid(pair, out=spare)
        resp, gate = sigmoid[0], sigmoid[1]
        scaled = residual.mul_(inv_noise)  # r / sigma
        d_z = work["d_z"]
        torch.mul(scaled[1], resp, out=d_z[1])
        torch.mul(scaled[0], resp, out=d_z[0])
        torch.sub(scaled[0], d_z[0], out=d_z[0])  # (1 - resp) r_0 / sigma_0
        if not self.link.is_identity:
            d_z[:2] *= self.link.derivative(predictors)
        torch.sub(resp, gate, out=d_z[2])
        grad = self._weight_gradients(d_z)
        # d / d log sigma_i: sum_n resp_in (r_in^2 - 1)
        weighted_gap = torch.dot(resp, gap)  # sum resp_1 (r_1^2 - r_0^2)
        if u.dim() == 0:
            log_lik = log_lik - n * u
            d_u = square_0 + weighted_gap - n
        else:
            log_lik = log_lik - n * u[0]
            d_u_1 = torch.dot(resp, square[1]) - resp.sum()
            d_u = torch.stack([square_0 + weighted_gap - d_u_1 - n, d_u_1])
        return log_lik, grad if self.inverse is None else grad[self.inverse], d_u

    def _workspace(self, like: torch.Tensor) -> dict:
        """Per-row buffers for :meth:`_log_likelihood`, made on first use (for ``like``'s dtype
        and device) and kept: about ``8 k`` values a row. A NUTS run evaluates the potential
        thousands of times, and at tens of thousands of rows each fresh per-row array would be
        memory the allocator maps from the system and faults in page by page, which cost as much
        as the arithmetic (``benchmarks/nuts_speed.py``). Not shared between threads, and not
        pickled (a worker process makes its own)."""
        work = self.__dict__.get("_work")
        if work is None or work["z"].dtype != like.dtype or work["z"].device != like.device:
            k, n, options = self.k, self.n, {"dtype": like.dtype, "device": like.device}
            rows = {"z": 2 * k - 1, "d_z": 2 * k - 1, "residual": k, "square": k}
            vectors = ["gap"] if k == 2 else ["top", "total", "gate_top", "gate_total", "spare"]
            rows.update({"pair": 2, "e": 2, "spare": 2} if k == 2 else {"scores": k})
            work = {name: torch.empty(size, n, **options) for name, size in rows.items()}
            work.update({name: torch.empty(n, **options) for name in vectors})
            self._work = work
        return work

    def __getstate__(self):
        return {key: value for key, value in self.__dict__.items() if key != "_work"}

    def _gate(self, logits: torch.Tensor, out: torch.Tensor, work: dict) -> torch.Tensor:
        """``sum_n log sum_i exp(logit_in)`` (expert 0's logit is 0), for ``k > 2``; the free
        experts' gate probabilities are written into ``out`` ``(k - 1, n)``."""
        top = torch.amax(logits, 0, out=work["gate_top"]).clamp_(min=0)
        exp_logits = torch.sub(logits, top, out=out).exp_()
        total = torch.sum(exp_logits, 0, out=work["gate_total"])
        total.add_(torch.neg(top, out=work["spare"]).exp_())
        exp_logits.div_(total)
        return top.sum() + total.log_().sum()

    def _predictors(self, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The experts' predictors and the free gate logits, rows ``[z_1..z_k | l_2..l_k]`` of
        ``out`` ``(2k - 1, n)``, in one product when the gate reads the experts' design."""
        if self.design_gate is None:
            return torch.mm(
                weights.view(-1, self.design_experts.shape[0]), self.design_experts, out=out
            )
        k, size = self.k, self.experts_size
        torch.mm(weights[:size].view(k, -1), self.design_experts, out=out[:k])
        torch.mm(weights[size:].view(k - 1, -1), self.design_gate, out=out[k:])
        return out

    def _weight_gradients(self, d_z: torch.Tensor) -> torch.Tensor:
        """The gradient in the matrix ``[weights | bias]`` (flat) from that in the predictors."""
        if self.design_gate is None:
            return (d_z @ self.design_experts.T).reshape(-1)
        k = self.k
        experts = (d_z[:k] @ self.design_experts.T).reshape(-1)
        return torch.cat([experts, (d_z[k:] @ self.design_gate.T).reshape(-1)])

    def __call__(self, params: dict) -> torch.Tensor:
        return self.flat(self.to_flat(params))


class _WithGradient(torch.autograd.Function):
    """A value whose gradient is known: the backward pass scales it."""

    @staticmethod
    def forward(ctx, theta, value, grad):
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None


def with_gradient(theta: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``value`` (computed from ``theta`` without autograd) with ``grad`` as its gradient in
    ``theta``: one node of the autograd graph when ``theta`` requires a gradient."""
    if theta.requires_grad and torch.is_grad_enabled():
        return _WithGradient.apply(theta, value, grad)
    return value


def fused_potential(model, x: torch.Tensor, y: torch.Tensor) -> FusedPotential | None:
    """The fused potential of ``model`` on ``(x, y)``, or ``None`` if a prior is not one it knows."""
    if unsupported_prior(model, x) is not None:
        return None
    priors = {
        name: _prior_terms(model.prior(name, x), shape, x)
        for name, shape in model.site_shapes.items()
    }
    return FusedPotential(model, x, y, priors)
