"""tanh off the paper's assumptions (non-orthogonal gate, unequal expert norms): the gate that
tensor_init returns is the optimum given its experts, as good as gate EM given the TRUE experts."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest
import torch

import pyromoe

N, D = 200_000, 12


@pytest.fixture(scope="module")
def unequal():
    """simulate()'s tanh pair with a random (non-orthogonal) gate, expert 1 scaled by 1.6."""
    data = pyromoe.simulate(N, D, num_experts=2, link="tanh", gate="random", gate_norm=2.0, seed=4)
    truth = data.truth
    weight = truth.experts_weight.clone()
    weight[1] *= 1.6
    truth = replace(truth, experts_weight=weight)
    generator = torch.Generator().manual_seed(9)
    noise = float(truth.noise) * torch.randn(N, generator=generator, dtype=torch.float64)
    means = torch.tanh(data.x @ weight.T + truth.experts_bias)
    y = means.gather(1, data.labels.long()[:, None]).squeeze(1) + noise
    return data.x, y, truth


def _gate_error(estimate, truth) -> float:
    return pyromoe.parameter_errors(estimate, truth)["gate"]


def test_tensor_init_gate_is_as_good_as_the_gate_given_the_true_experts(unequal):
    x, y, truth = unequal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the relu/unequal-norm warnings are not the point
        est = pyromoe.tensor_init(x, y, 2, "tanh")
        reference = pyromoe.fit_gate(
            x, y, truth.experts_weight, truth.experts_bias, "tanh", tol=1e-9, max_iter=1000
        )
    assert est.diagnostics["gate_converged"]
    given_truth = replace(truth, gate_weight=reference.gate_weight, gate_bias=reference.gate_bias)
    ours, best = _gate_error(est, truth), _gate_error(given_truth, truth)
    # the gate's own sampling error is of order sqrt(d / n) times a constant of the gate's
    # logistic-regression information; the moment experts add their own error on top
    assert best < 10 * math.sqrt(D / N)
    assert ours <= 1.5 * best
    # the moment experts are a start here (measured 0.10 at this seed): far from collapsing
    assert pyromoe.parameter_errors(est, truth)["experts"] < 0.2
