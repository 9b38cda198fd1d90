"""tanh with a generic (non-orthogonal) gate of norm 2 and expert norms 1 and 2 (issue 25 item 1):
tensor_init's gate is as good as gate EM given the true experts, and the expert scales come from
the likelihood (not the saturating kappa1 inversion), leaving the moment directions' error."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest
import torch

import pyromoe
from pyromoe.core.em.loop import remaining_gain
from pyromoe.core.likelihood import sample_mixture

N, D = 40_000, 8


@pytest.fixture(scope="module")
def generic():
    """simulate()'s tanh pair with random gate directions of norm 2, experts rescaled to norms 1
    and 2, y redrawn through the package's mixture sampler (noise 0.5)."""
    data = pyromoe.simulate(N, D, 2, "tanh", noise=0.5, gate="random", gate_norm=2.0, seed=3)
    weight = data.truth.experts_weight / data.truth.experts_weight.norm(dim=-1, keepdim=True)
    weight = weight * torch.tensor([1.0, 2.0], dtype=weight.dtype)[:, None]
    truth = replace(data.truth, experts_weight=weight)
    y, _ = sample_mixture(data.x, truth.params, truth.link, torch.Generator().manual_seed(11))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = pyromoe.tensor_init(data.x, y, 2, "tanh", seed=0)
    return data.x, y, truth, est


def test_remaining_gain_extrapolates_a_linear_tail():
    trace = [0.0, 1.0, 1.5, 1.75]  # increments halve: as much again is left
    assert remaining_gain(trace) == pytest.approx(0.25)
    assert remaining_gain([0.0, 1.0]) == math.inf  # no rate yet
    assert remaining_gain([0.0, 1.0, 1.0]) == 0.0  # stood still


def test_tensor_init_gate_within_1_5x_of_gate_em_from_the_true_experts(generic):
    x, y, truth, est = generic
    reference = pyromoe.fit_gate(
        x, y, truth.experts_weight, None, "tanh", tol=1e-10, max_iter=2000, seed=0
    )
    given = replace(truth, gate_weight=reference.gate_weight, gate_bias=reference.gate_bias)
    best = pyromoe.parameter_errors(given, truth)["gate"]
    ours = pyromoe.parameter_errors(est, truth)["gate"]
    assert est.diagnostics["gate_converged"]
    # the gate's sampling error is of order sqrt(d / n) times its logistic information's constant
    assert best < 10 * math.sqrt(D / N)
    assert ours <= 1.5 * best


def test_tensor_init_expert_scales_come_from_the_likelihood(generic):
    x, y, truth, est = generic
    errors = pyromoe.parameter_errors(est, truth)
    order = errors["permutation"]
    norms = est.permute(order).experts_weight.norm(dim=-1)
    refit = torch.tensor(est.diagnostics["expert_scale_refit"], dtype=norms.dtype)[order]
    moment = norms / refit  # the kappa1 inversion's norms (x is N(0, I): standardised ~ raw)
    # the saturating kappa1 inversion misses the norm-2 expert by several percent (4% at this
    # seed, 5.7-11% on the data); the least-squares scale given the direction is left with
    # the direction's own error (measured 2.3%, from an expert error of 0.15)
    assert abs(float(norms[1]) - 2.0) < 0.6 * abs(float(moment[1]) - 2.0)
    assert abs(float(norms[1]) - 2.0) < 0.035 * 2.0
    # the moment directions' error: of order the T3 estimate's relative noise times the norm
    relative_noise = math.sqrt(est.diagnostics["t3_noise_to_signal"])
    assert errors["experts"] < 2.0 * 2.0 * relative_noise
