"""A gate on covariates of its own: p(y | x, z) = sum_i gate_i(z) Normal(y | a_i . x + b_i, s^2).

The design the core reads is [x | z] (the experts' columns first): the likelihood, the EM
statistics, the starts, fit_em / fit_gate / tensor_init / initialize (z=...) and the moment step,
which is consistent when z is independent of x (docs/algorithm.md section 7)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pyromoe
from pyromoe.core import likelihood
from pyromoe.core.links import get_link
from pyromoe.core.params import Params

A = torch.tensor([[1.0, 0.5, -0.5], [-0.8, 1.0, 0.3]], dtype=torch.float64)
B = torch.tensor([0.5, -0.5], dtype=torch.float64)
W = torch.tensor([[2.0, -1.5]], dtype=torch.float64)
C = torch.tensor([0.3], dtype=torch.float64)
NOISE = 0.5


def mixed_regression(n: int, seed: int, factor: bool = False):
    """x (n, 3) and z (n, 2) independent standard normal; the gate reads z only. With ``factor``
    a 0/1 column (a two-level factor, independent of x) enters the experts: effects 1.5 and -1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    second = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(z @ W[0] + C[0])
    labels = second.long()
    y = (x @ A.T + B).gather(1, labels[:, None]).squeeze(1)
    y = y + NOISE * torch.randn(n, generator=g, dtype=torch.float64)
    if factor:
        level = (torch.rand(n, generator=g) < 0.4).double()
        y = y + torch.tensor([1.5, -1.0], dtype=torch.float64)[labels] * level
        x = torch.cat([x, level[:, None]], dim=1)
    return x, y, z


def _expert_error(weight: torch.Tensor) -> float:
    """Max row error of the first three columns against A, experts matched."""
    return min(
        float((weight[:, :3] - A).norm(dim=1).max()),
        float((weight.flip(0)[:, :3] - A).norm(dim=1).max()),
    )


def test_the_likelihood_reads_the_experts_columns_then_the_gates():
    x, y, z = mixed_regression(50, seed=0)
    params = Params(A, B, W, C, torch.tensor(NOISE, dtype=torch.float64))
    got = likelihood.log_likelihood(torch.cat([x, z], 1), y, params, get_link("linear"))
    gate = torch.sigmoid(z @ W[0] + C[0])
    means = x @ A.T + B
    density = torch.exp(-0.5 * ((y[:, None] - means) / NOISE) ** 2) / (
        NOISE * math.sqrt(2 * math.pi)
    )
    expected = torch.log((1 - gate) * density[:, 0] + gate * density[:, 1])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    with pytest.raises(
        ValueError, match=r"the design has 4 columns but the experts' weights read 3"
    ):
        likelihood.log_likelihood(torch.cat([x, z[:, :1]], 1), y, params, get_link("linear"))


def test_fit_em_and_fit_gate_recover_experts_and_gate_from_z():
    n = 20_000
    x, y, z = mixed_regression(n, seed=1)
    fit = pyromoe.fit_em(x, y, 2, z=z, seed=0)
    assert fit.gate_features == 2 and fit.in_features == 3
    # sampling error of each coefficient ~ noise / sqrt(n / 2); of the gate ~ 2.5 / sqrt(n)
    assert _expert_error(fit.experts_weight) < 8 * NOISE / math.sqrt(n / 2)
    sign = 1.0 if float((fit.experts_weight[0] - A[0]).norm()) < 0.5 else -1.0
    assert float((sign * fit.gate_weight - W).abs().max()) < 10 * 2.5 / math.sqrt(n)
    gate = pyromoe.fit_gate(x, y, A, B, "linear", z=z, seed=0)
    assert float((gate.gate_weight - W).abs().max()) < 10 * 2.5 / math.sqrt(n)
    assert abs(float(gate.gate_bias[0]) - 0.3) < 10 * 2.5 / math.sqrt(n)
    # the same fit from the joined design and gate_features
    joined = pyromoe.fit_em(torch.cat([x, z], 1), y, 2, gate_features=2, seed=0)
    torch.testing.assert_close(joined.experts_weight, fit.experts_weight)


def test_the_moment_step_is_consistent_when_the_gate_reads_independent_covariates():
    # population: exact (docs/algorithm.md section 7); the error shrinks like 1 / sqrt(n). With
    # equal mixing weights assumed (the paper's k = 2 rule) it stopped near 0.05 whatever n.
    n = 500_000
    x, y, z = mixed_regression(n, seed=2)
    moment = pyromoe.tensor_init(x, y, 2, z=z, seed=0)
    assert moment.method == "tensor" and moment.gate_features == 2
    assert _expert_error(moment.experts_weight) < 25 / math.sqrt(n)


def test_factor_columns_are_left_to_em_and_recovered():
    n = 20_000
    x, y, z = mixed_regression(n, seed=3, factor=True)
    fit = pyromoe.initialize(x, y, 2, z=z, moment_columns=[True, True, True, False], seed=0)
    assert fit.diagnostics["moment_columns"] == [0, 1, 2]
    assert fit.diagnostics["initializer"] == "tensor"
    assert _expert_error(fit.experts_weight) < 8 * NOISE / math.sqrt(n / 2)
    effects = sorted(fit.experts_weight[:, 3].tolist())
    np.testing.assert_allclose(effects, [-1.0, 1.5], atol=10 * NOISE / math.sqrt(0.4 * n / 2))
    none = pyromoe.initialize(x, y, 2, z=z, moment_columns=[False] * 4, seed=0)
    assert none.diagnostics["initializer"] == "em"
    assert "no continuous input" in none.diagnostics["initializer_reason"]


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda x, z: (x, z[:10]), ValueError, r"z must have one row per row of x \(200\)"),
        (lambda x, z: (x, z[:, 0]), ValueError, r"z \(the gate's covariates\) must be a 2-D"),
        (lambda x, z: (x, z.clone().fill_(math.nan)), ValueError, r"z contains NaN"),
        (lambda x, z: (x.numpy(), np.memmap), TypeError, r"z \(the gate's covariates\) goes"),
    ],
)
def test_bad_gate_covariates_are_refused_by_name(change, error, message, tmp_path):
    x, y, z = mixed_regression(200, seed=4)
    x_bad, z_bad = change(x, z)
    if z_bad is np.memmap:
        np.save(tmp_path / "z.npy", z.numpy())
        z_bad = np.load(tmp_path / "z.npy", mmap_mode="r")
    with pytest.raises(error, match=message):
        pyromoe.fit_em(x_bad, y, 2, z=z_bad)


def test_gate_features_must_leave_columns_for_the_experts():
    x, y, z = mixed_regression(200, seed=5)
    with pytest.raises(ValueError, match="gate_features must be between 1 and 4"):
        pyromoe.fit_em(torch.cat([x, z], 1), y, 2, gate_features=5)
    with pytest.raises(ValueError, match="pass z or gate_features, not both"):
        pyromoe.fit_em(x, y, 2, z=z, gate_features=2)


def test_compare_experts_with_gate_covariates_ranks_the_true_k_first():
    x, y, z = mixed_regression(1500, seed=6)
    table, fits = pyromoe.compare_experts(x, y, (1, 2), z=z, num_steps=200, num_samples=100)
    assert table.index[0] == "k=2"
    assert fits["k=2"].posterior["gate.weight"].dims[-1] == "gate_feature"
    assert fits["k=2"].constant_data["z"].shape == (1500, 2)
    assert "gate.weight" not in fits["k=1"].posterior
