"""One parameter type for the gated Gaussian mixture of experts, and its one mapping to Pyro sites.

:class:`Params` is what the likelihood (:mod:`pyromoe.core.likelihood`), EM, the point estimate
(:class:`pyromoe.core.estimate.MoEEstimate`, whose ``.params`` it is) and the Pyro model
(:class:`pyromoe.bayes.model.MixtureOfExperts`) all take. Every tensor may carry the same leading
batch dimensions (posterior draws, vectorised particles).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from . import sites

__all__ = ["Params"]


class Params(NamedTuple):
    """Parameters of the model, with optional leading batch dimensions ``...``.

    Attributes
    ----------
    experts_weight : Tensor (..., k, d)
        Expert weights ``a_i``.
    experts_bias : Tensor (..., k) or None
        Expert intercepts ``b_i``; None for a model without intercepts.
    gate_weight : Tensor (..., k - 1, d)
        Gate weights; expert 0 is the reference (logit 0).
    gate_bias : Tensor (..., k - 1) or None
        Gate offsets; None for a model without offsets.
    noise : Tensor (...) or (..., k)
        Noise standard deviation ``sigma``: one shared by the experts, or one per expert
        (:attr:`per_expert_noise`; :meth:`expert_noise` broadcasts either to (..., k)).

    Examples
    --------
    >>> p = Params(torch.ones(2, 3), None, torch.zeros(1, 3), None, torch.tensor(0.5))
    >>> sorted(p.to_sites())
    ['experts.weight', 'gate.weight', 'noise']
    >>> Params.from_sites(p.to_sites()).num_experts
    2
    """

    experts_weight: torch.Tensor
    experts_bias: torch.Tensor | None
    gate_weight: torch.Tensor
    gate_bias: torch.Tensor | None
    noise: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.experts_weight.shape[-2]

    @property
    def in_features(self) -> int:
        return self.experts_weight.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.experts_weight.shape[:-2]

    @property
    def per_expert_noise(self) -> bool:
        """Whether the noise has one sd per expert (a trailing expert axis beyond the batch)."""
        return torch.as_tensor(self.noise).dim() > len(self.batch_shape)

    def expert_noise(self) -> torch.Tensor:
        """Each expert's noise sd, shape (..., k), whichever noise model the parameters have."""
        noise = torch.as_tensor(self.noise)
        if self.per_expert_noise:
            return noise
        return noise.unsqueeze(-1).expand(*noise.shape, self.num_experts)

    def to(self, device=None, dtype=None) -> Params:
        """Every tensor moved to ``device`` / ``dtype`` (absent biases stay None)."""
        return Params(
            *(
                None if value is None else torch.as_tensor(value).to(device=device, dtype=dtype)
                for value in self
            )
        )

    def like(self, tensor: torch.Tensor) -> Params:
        """Every tensor on ``tensor``'s device and dtype."""
        return self.to(device=tensor.device, dtype=tensor.dtype)

    def to_sites(self) -> dict[str, torch.Tensor]:
        """``{site name: value}`` for the Pyro model; absent biases are left out."""
        values = {
            sites.EXPERTS_WEIGHT: self.experts_weight,
            sites.EXPERTS_BIAS: self.experts_bias,
            sites.GATE_WEIGHT: self.gate_weight,
            sites.GATE_BIAS: self.gate_bias,
            sites.NOISE: self.noise,
        }
        if self.num_experts == 1:  # one expert: no gate sites
            values[sites.GATE_WEIGHT] = values[sites.GATE_BIAS] = None
        return {name: value for name, value in values.items() if value is not None}

    @classmethod
    def from_sites(cls, values: Mapping[str, torch.Tensor], *, bias: bool | None = None) -> Params:
        """Parameters from ``{site name: value}`` (samples, a guide's medians, an init dict).

        ``bias``: None reads the bias sites where present; False ignores them; True requires them.

        Raises
        ------
        ValueError
            If a required site is missing (the message lists what was given).
        """
        weight = values.get(sites.EXPERTS_WEIGHT)
        one_expert = weight is not None and torch.as_tensor(weight).shape[-2] == 1
        required = [sites.EXPERTS_WEIGHT, sites.NOISE]
        if not one_expert:  # one expert has no gate (the sites may be left out)
            required.append(sites.GATE_WEIGHT)
        if bias:
            required += [sites.EXPERTS_BIAS] + ([] if one_expert else [sites.GATE_BIAS])
        missing = [name for name in required if name not in values]
        if missing:
            raise ValueError(
                f"the parameters are missing the sites {missing}; got {sorted(values)}"
            )

        def optional(name):
            return None if bias is False else values.get(name)

        weight = torch.as_tensor(weight)
        gate_weight = values.get(sites.GATE_WEIGHT)
        gate_bias = optional(sites.GATE_BIAS)
        if gate_weight is None:  # one expert: an empty gate, (..., 0, d)
            gate_weight = weight.new_zeros(*weight.shape[:-2], 0, weight.shape[-1])
            if bias or (bias is None and sites.EXPERTS_BIAS in values):
                gate_bias = weight.new_zeros(*weight.shape[:-2], 0)
        return cls(
            weight,
            optional(sites.EXPERTS_BIAS),
            torch.as_tensor(gate_weight),
            gate_bias,
            torch.as_tensor(values[sites.NOISE]),
        )
