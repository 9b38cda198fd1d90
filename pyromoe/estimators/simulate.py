"""Simulate data from the gated Gaussian mixture of experts with known true parameters."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .._validation import (
    check_device,
    check_flag,
    check_positive,
    check_seed,
    count_rule,
    num_experts_rule,
    one_of,
    validate,
)
from ..core.estimate import MoEEstimate
from ..core.likelihood import sample_mixture
from ..core.links import Link, link_rule
from ..core.params import Params

__all__ = ["SimulatedData", "simulate"]


@dataclass(frozen=True)
class SimulatedData:
    """Data drawn by :func:`simulate`.

    Attributes
    ----------
    x : Tensor (n, d)
        Inputs, i.i.d. standard Gaussian.
    y : Tensor (n,)
        Outputs.
    labels : Tensor (n,), int64
        The expert that generated each row.
    truth : MoEEstimate
        The true parameters (``method="truth"``), comparable with any estimate through
        :func:`pyromoe.parameter_errors`.
    seed : int or None
        The seed used (drawn afresh when :func:`simulate` got ``seed=None``).
    """

    x: torch.Tensor
    y: torch.Tensor
    labels: torch.Tensor
    truth: MoEEstimate
    seed: int | None = None


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True)


def _dtype_rule(dtype, name: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a floating torch dtype (e.g. torch.float64 or torch.float32); got "
            f"{dtype!r}"
        )
    return dtype


def _device_rule(device, name: str) -> torch.device | None:
    return None if device is None else check_device(device)


def _gate_norm_rule(gate_norm, name: str) -> float:
    if isinstance(gate_norm, bool) or not isinstance(gate_norm, numbers.Real):
        raise TypeError(f"{name} must be a number >= 0; got {type(gate_norm).__name__}")
    gate_norm = float(gate_norm)
    if not (gate_norm >= 0 and math.isfinite(gate_norm)):
        raise ValueError(f"{name} must be a finite number >= 0; got {gate_norm}")
    return gate_norm


#: how :func:`simulate` checks its arguments, once per call (:func:`pyromoe._validation.validate`)
SIMULATE_RULES = {
    "n": count_rule(minimum=1),
    "in_features": count_rule(minimum=1),
    "num_experts": num_experts_rule(minimum=2),
    "link": link_rule,
    "noise": check_positive,
    "seed": check_seed,
    "bias": check_flag,
    "device": _device_rule,
    "dtype": _dtype_rule,
    "gate_norm": _gate_norm_rule,
    "gate": one_of("random", "orthogonal"),
}


@validate(SIMULATE_RULES)
def simulate(
    n: int,
    in_features: int,
    num_experts: int = 2,
    link: str | Link = "linear",
    noise: float = 0.5,
    gate: str = "random",
    seed: int = 0,
    *,
    expert_cosine: float | None = None,
    gate_norm: float = 1.0,
    bias: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
) -> SimulatedData:
    """Draw ``n`` rows from a mixture of experts with unit-norm experts and ``x ~ N(0, I)``.

    Parameters
    ----------
    n : int
        Number of rows.
    in_features : int
        Input dimension ``d``.
    num_experts : int
        Number of experts ``k >= 2``.
    link : str or Link
        Expert link (see :mod:`pyromoe.core.links`).
    noise : float
        Noise standard deviation ``sigma > 0``.
    gate : {"random", "orthogonal"}
        ``"random"``: each gate row is a uniformly random direction. ``"orthogonal"``: the paper's
        setting, gate rows orthogonal to every expert (needs ``in_features > num_experts``, or
        ``> num_experts + 1`` with ``expert_cosine``).
    seed : int or None
        Seed of a private ``torch.Generator``: same seed, same data, on any device. ``None``: a
        fresh seed, recorded in ``SimulatedData.seed``.
    expert_cosine : float in [0, 1), optional
        Make every pair of experts have this cosine (similar experts, where random-start fits get
        stuck: docs/algorithm.md section 4). Default: independent random directions.
    gate_norm : float
        Norm of each gate row (gate sharpness).
    bias : bool
        Draw expert intercepts and gate offsets from N(0, 0.5^2) (default: none, as in the paper).
    device, dtype
        Where the returned tensors live (``device`` checked by
        :func:`pyromoe._validation.check_device`: a clear error for a bogus string or a missing
        CUDA/MPS); ``dtype`` a floating torch dtype. Drawing happens on the CPU in float64.

    Returns
    -------
    SimulatedData

    Examples
    --------
    >>> data = simulate(1000, 5, num_experts=2, link="tanh", gate="orthogonal", seed=1)
    >>> data.x.shape, data.truth.experts_weight.shape
    (torch.Size([1000, 5]), torch.Size([2, 5]))
    """
    d, k = in_features, num_experts
    _check_shape_of_truth(d, k, gate, expert_cosine)
    generator = torch.Generator().manual_seed(int(seed))
    cpu = dict(dtype=torch.float64)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, **cpu)

    experts_weight, experts_bias, gate_weight, gate_bias = _draw_parameters(
        normal, d, k, gate, gate_norm, expert_cosine, bias
    )
    x = normal(n, d)
    params = Params(
        experts_weight, experts_bias, gate_weight, gate_bias, torch.tensor(noise, **cpu)
    )
    y, labels = sample_mixture(x, params, link, generator)

    truth = MoEEstimate(
        experts_weight=experts_weight,
        experts_bias=experts_bias,
        gate_weight=gate_weight,
        gate_bias=gate_bias,
        noise=torch.tensor(noise, **cpu),
        link=link,
        method="truth",
    ).to(device=device, dtype=dtype)
    return SimulatedData(
        x=x.to(device=device, dtype=dtype),
        y=y.to(device=device, dtype=dtype),
        labels=labels.to(device=device),
        truth=truth,
        seed=seed,
    )


def _check_shape_of_truth(d: int, k: int, gate: str, expert_cosine) -> None:
    """The experts' cosine and the gate's kind of :func:`simulate`, checked against ``d`` and
    ``k``."""
    if expert_cosine is not None and not 0.0 <= float(expert_cosine) < 1.0:
        raise ValueError(f"expert_cosine must be in [0, 1); got {expert_cosine}")
    directions = k + 1 if expert_cosine is not None else k
    if expert_cosine is not None and directions > d:
        raise ValueError(
            f"expert_cosine needs in_features >= num_experts + 1 = {directions}; got in_features={d}"
        )
    if gate == "orthogonal" and d <= directions:
        raise ValueError(
            f"gate='orthogonal' needs in_features > {directions} (room for a gate orthogonal to the "
            f"experts); got in_features={d}. Use gate='random' or more features."
        )


def _draw_parameters(normal, d: int, k: int, gate: str, gate_norm: float, expert_cosine, bias):
    """The true experts (unit rows, or pairwise cosine ``expert_cosine``), gate (norm
    ``gate_norm``, orthogonal to the experts for ``gate="orthogonal"``) and biases, drawn by
    ``normal(*shape)`` in this order."""
    if expert_cosine is None:
        experts_weight = _unit_rows(normal(k, d))
    else:
        basis, _ = torch.linalg.qr(normal(d, k + 1))  # orthonormal columns
        c = float(expert_cosine)
        experts_weight = math.sqrt(c) * basis[:, :1].T + math.sqrt(1 - c) * basis[:, 1:].T

    raw_gate = normal(k - 1, d)
    if gate == "orthogonal":
        q, _ = torch.linalg.qr(experts_weight.T)  # basis of span(experts)
        raw_gate = raw_gate - (raw_gate @ q) @ q.T
    gate_weight = gate_norm * _unit_rows(raw_gate)

    if bias:
        experts_bias, gate_bias = 0.5 * normal(k), 0.5 * normal(k - 1)
    else:
        experts_bias = torch.zeros(k, dtype=torch.float64)
        gate_bias = torch.zeros(k - 1, dtype=torch.float64)
    return experts_weight, experts_bias, gate_weight, gate_bias
