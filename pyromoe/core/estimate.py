"""The point-estimate container :class:`MoEEstimate` and parameter-error metrics.

The same container holds true parameters (from :func:`pyromoe.estimators.simulate`), moment estimates and EM
estimates, so one function (:func:`parameter_errors`) compares any two of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .._validation import as_tensors, check_device
from . import likelihood, sites
from .design import gate_covariates
from .labels import best_permutation, permute_draws
from .links import Link, check_link
from .params import Params

__all__ = ["MoEEstimate", "parameter_errors"]


@dataclass(frozen=True, repr=False)
class MoEEstimate:
    """Parameters of a gated Gaussian mixture of experts, in the user's coordinates.

    Attributes
    ----------
    experts_weight : Tensor (k, d)
        Expert weights ``a_i``.
    experts_bias : Tensor (k,)
        Expert intercepts ``b_i`` (zeros for the bias-free paper model).
    gate_weight : Tensor (k - 1, d)
        Gate weights; expert 0 is the reference (logit 0). For k = 2,
        ``P(expert 1 | x) = sigmoid(gate_weight[0] . x + gate_bias[0])``.
    gate_bias : Tensor (k - 1,)
        Gate offsets.
    noise : Tensor () or (k,)
        Noise standard deviation ``sigma``: shared, or one per expert.
    link : Link
        The experts' link function.
    method : str
        What produced it: ``"truth"``, ``"tensor"``, ``"em"``, ...
    diagnostics : mapping
        Method-specific diagnostics (eigengap, EM trace, ...), shown by :meth:`summary`.
    """

    experts_weight: torch.Tensor
    experts_bias: torch.Tensor
    gate_weight: torch.Tensor
    gate_bias: torch.Tensor
    noise: torch.Tensor
    link: Link
    method: str = "truth"
    diagnostics: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.link, Link):  # a name is checked once; a Link is taken as it is
            object.__setattr__(self, "link", check_link(self.link))
        w = self.experts_weight
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] < 1:
            raise ValueError(
                "experts_weight must be a tensor of shape (k, d) with k >= 1; "
                f"got {getattr(w, 'shape', type(w).__name__)}"
            )
        k, d = w.shape
        gate = self.gate_weight
        gate_width = gate.shape[-1] if isinstance(gate, torch.Tensor) and gate.dim() == 2 else d
        expected = {
            "experts_bias": [(k,)],
            "gate_weight": [(k - 1, gate_width)],
            "gate_bias": [(k - 1,)],
            "noise": [(), (k,)],
        }
        for name, shapes in expected.items():
            value = getattr(self, name)
            value = torch.as_tensor(value, dtype=w.dtype, device=w.device)
            if tuple(value.shape) not in shapes:
                shape = " or ".join(str(s) for s in shapes)
                raise ValueError(
                    f"{name} must have shape {shape} for {k} experts and {d} features; "
                    f"got {tuple(value.shape)}"
                )
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ shapes and conversion
    @property
    def num_experts(self) -> int:
        return self.experts_weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.experts_weight.shape[1]

    @property
    def gate_features(self) -> int:
        """Width of the gate's weights: ``in_features`` when the gate reads the experts' inputs,
        else the number of the gate's own covariates ``z``."""
        return self.gate_weight.shape[1]

    def design(self, x, z=None) -> torch.Tensor:
        """The checked design the likelihood reads: ``x`` (n, in_features), or ``[x | z]`` with the
        gate's covariates ``z`` (n, gate_features) after the experts' inputs."""
        if z is None:
            if self.gate_features != self.in_features:
                raise ValueError(
                    f"this estimate's gate reads {self.gate_features} covariates of its own; pass "
                    "them as z (n, gate_features)"
                )
            return as_tensors(x, in_features=self.in_features)[0]
        x, _ = as_tensors(x, in_features=self.in_features)
        return torch.cat([x, gate_covariates(z, x, self.gate_features)], dim=-1)

    @property
    def feature_names(self) -> list[str] | None:
        """The inputs' names (``diagnostics["feature_names"]``, e.g. a DataFrame's column labels),
        or None."""
        names = self.diagnostics.get("feature_names")
        return None if names is None else list(names)

    @property
    def noise_model(self) -> str:
        """``"per_expert"`` when ``noise`` has one sd per expert, else ``"shared"``."""
        return "per_expert" if self.noise.dim() == 1 else "shared"

    def to(self, device=None, dtype=None) -> MoEEstimate:
        """A copy with every tensor moved to ``device`` / ``dtype``.

        A device other than the current one is checked first
        (:func:`pyromoe._validation.check_device`: a clear error for a bogus string or a missing
        CUDA/MPS).
        """
        if device is not None and (isinstance(device, str) or device != self.experts_weight.device):
            device = check_device(device)
        moved = {
            name: getattr(self, name).to(device=device, dtype=dtype)
            for name in ("experts_weight", "experts_bias", "gate_weight", "gate_bias", "noise")
        }
        return replace(self, **moved)

    def site_values(self, bias: bool = True) -> dict[str, torch.Tensor]:
        """The estimate as ``{site name: value}`` for :class:`pyromoe.MixtureOfExperts`."""
        params = self.params
        if not bias:
            params = params._replace(experts_bias=None, gate_bias=None)
        return params.to_sites()

    def permute(self, permutation) -> MoEEstimate:
        """Relabel the experts: new expert ``j`` is old expert ``permutation[j]``.

        The gate is re-referenced so that the new expert 0 has logit 0; the model is unchanged.
        """
        perm = torch.as_tensor(list(permutation), device=self.experts_weight.device)
        if sorted(perm.tolist()) != list(range(self.num_experts)):
            raise ValueError(
                f"permutation must be a permutation of 0..{self.num_experts - 1}; "
                f"got {list(permutation)}"
            )
        if self.num_experts == 1:
            return self
        moved = permute_draws(self.site_values(bias=True), perm)
        return replace(
            self,
            experts_weight=moved[sites.EXPERTS_WEIGHT],
            experts_bias=moved[sites.EXPERTS_BIAS],
            gate_weight=moved[sites.GATE_WEIGHT],
            gate_bias=moved[sites.GATE_BIAS],
            noise=moved[sites.NOISE],
        )

    # ------------------------------------------------------------------ likelihood
    @property
    def params(self) -> Params:
        """The parameters as :class:`~pyromoe.core.params.Params` (what the likelihood takes)."""
        return Params(
            self.experts_weight, self.experts_bias, self.gate_weight, self.gate_bias, self.noise
        )

    @classmethod
    def from_params(
        cls,
        params: Params,
        link: str | Link,
        method: str = "truth",
        diagnostics: Mapping[str, Any] | None = None,
    ) -> MoEEstimate:
        """An estimate from :class:`~pyromoe.core.params.Params` (absent biases become zeros)."""
        w = params.experts_weight
        k = w.shape[-2]
        return cls(
            experts_weight=w,
            experts_bias=w.new_zeros(k) if params.experts_bias is None else params.experts_bias,
            gate_weight=params.gate_weight,
            gate_bias=w.new_zeros(k - 1) if params.gate_bias is None else params.gate_bias,
            noise=params.noise,
            link=link,
            method=method,
            diagnostics={} if diagnostics is None else diagnostics,
        )

    def _design_and_y(self, x, y, z):
        design = self.design(x, z)
        _, y = as_tensors(design, y)
        return design, y

    def log_likelihood(self, x, y, z=None) -> torch.Tensor:
        """Per-observation log-likelihood ``log p(y_n | x_n, z_n)`` under this estimate, shape (n,).

        ``z``: the gate's own covariates, when the estimate has them (:meth:`design`)."""
        x, y = self._design_and_y(x, y, z)
        return likelihood.log_likelihood(x, y, self.params.like(x), self.link)

    def responsibilities(self, x, y, z=None) -> torch.Tensor:
        """Posterior responsibilities ``p(expert | x_n, y_n)`` under this estimate, shape (n, k)."""
        x, y = self._design_and_y(x, y, z)
        return likelihood.responsibilities(x, y, self.params.like(x), self.link)

    def gate_probabilities(self, x, z=None) -> torch.Tensor:
        """Gate probabilities ``gate_i(x_n)`` (of ``z_n`` when the gate has covariates of its own),
        shape (n, k)."""
        x = self.design(x, z)
        p = self.params.like(x)
        return torch.softmax(likelihood.gate_logits(x, p.gate_weight, p.gate_bias), dim=-1)

    def predict(self, x, z=None) -> torch.Tensor:
        """Mean prediction ``E[y | x] = sum_i gate_i(x) g(a_i . x + b_i)``, shape (n,)."""
        x = self.design(x, z)
        p = self.params.like(x)
        gate = torch.softmax(likelihood.gate_logits(x, p.gate_weight, p.gate_bias), dim=-1)
        return (gate * likelihood.expert_means(x, p.experts_weight, p.experts_bias, self.link)).sum(
            -1
        )

    # ------------------------------------------------------------------ display
    def summary(self) -> str:
        """A plain-text table of the parameters and the diagnostics."""
        lines = [
            f"MoEEstimate(method={self.method!r}, link={self.link!r}, "
            f"num_experts={self.num_experts}, in_features={self.in_features}, "
            f"noise={_format_value(self.noise)})"
        ]
        names = self.feature_names

        def row(values: torch.Tensor) -> str:
            if names is None:
                return ", ".join(f"{v:+.3f}" for v in values.tolist())
            return ", ".join(f"{name} {v:+.3f}" for name, v in zip(names, values.tolist()))

        for i in range(self.num_experts):
            weights = row(self.experts_weight[i])
            lines.append(
                f"  expert {i}: weight [{weights}]  bias {float(self.experts_bias[i]):+.3f}"
            )
        gate_names = self.diagnostics.get("gate_feature_names")
        for i in range(self.num_experts - 1):
            weights = row(self.gate_weight[i])
            if self.gate_features != self.in_features or gate_names is not None:
                values = self.gate_weight[i].tolist()
                labels = gate_names or [f"z{j}" for j in range(self.gate_features)]
                weights = ", ".join(f"{name} {v:+.3f}" for name, v in zip(labels, values))
            lines.append(
                f"  gate {i + 1} vs 0: weight [{weights}]  bias {float(self.gate_bias[i]):+.3f}"
            )
        for key, value in self.diagnostics.items():
            if key not in ("feature_names", "gate_feature_names"):  # shown with the weights
                lines.append(f"  {key}: {_format_value(value)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def _format_value(value) -> str:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        if len(value) > 8:
            head = ", ".join(_format_value(v) for v in value[:3])
            tail = ", ".join(_format_value(v) for v in value[-3:])
            return f"[{head}, ..., {tail}] ({len(value)} values)"
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value)


def parameter_errors(estimate: MoEEstimate, truth: MoEEstimate) -> dict[str, Any]:
    """Errors of ``estimate`` against ``truth`` with experts matched by the best permutation.

    Returns a dict with ``experts`` (max over experts of ``||a_hat_i - a_i||``), ``experts_bias``
    (max abs), ``gate`` (max over gate rows of the weight error after re-referencing the gate to the
    matched labels), ``noise`` (abs) and ``permutation``.

    Examples
    --------
    >>> from pyromoe import simulate
    >>> data = simulate(100, 3, seed=0)
    >>> parameter_errors(data.truth.permute([1, 0]), data.truth)["experts"]
    0.0
    """
    if (estimate.num_experts, estimate.in_features) != (truth.num_experts, truth.in_features):
        raise ValueError(
            "estimate and truth must have the same number of experts and features; got "
            f"{(estimate.num_experts, estimate.in_features)} and "
            f"{(truth.num_experts, truth.in_features)}"
        )
    est = estimate.to(device=truth.experts_weight.device, dtype=truth.experts_weight.dtype)
    perm = best_permutation(est.experts_weight, truth.experts_weight)
    est = est.permute(perm)
    return {
        "experts": float((est.experts_weight - truth.experts_weight).norm(dim=-1).max()),
        "experts_bias": float((est.experts_bias - truth.experts_bias).abs().max()),
        "gate": float((est.gate_weight - truth.gate_weight).norm(dim=-1).max()),
        "gate_bias": float((est.gate_bias - truth.gate_bias).abs().max()),
        "noise": float((est.noise - truth.noise).abs().max()),
        "permutation": perm,
    }
