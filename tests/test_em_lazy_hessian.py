"""The gate's lazy Newton step (issue 26 item 2): EM forms the gate's negative Hessian in every
second pass only and reuses the previous one in between; the gradient is always fresh. A pass
without it must give every other sum unchanged, a fit must reach the same optimum as with a
fresh Hessian in every pass (the fixed point of a Newton step does not depend on the matrix it
solves with), its trace must never fall, and the passes must alternate as documented."""

import itertools
import warnings

import numpy as np
import pytest
import torch

import pyromoe
from pyromoe.core.em import loop
from pyromoe.core.em.loop import EM
from pyromoe.core.em.statistics import pass_statistics
from pyromoe.core.links import get_link
from pyromoe.core.params import Params
from pyromoe.core.sources import as_source

F64 = torch.float64
N, D, DZ, CHUNK = 4_000, 4, 2, 1_000  # four chunks


def _problem(k: int, gate_covariates: bool, seed: int = 0, link: str = "linear"):
    """A design (n, D [+ DZ]) and outputs from a k-expert model with intercepts and ``link``,
    and two parameter sets near it (soft responsibilities), float64."""
    g = torch.Generator().manual_seed(seed)
    width = D + (DZ if gate_covariates else 0)
    x = torch.randn(N, width, generator=g, dtype=F64) + 0.5
    gate_width = DZ if gate_covariates else width
    weight = 1.5 * torch.randn(k, D, generator=g, dtype=F64)
    bias = torch.randn(k, generator=g, dtype=F64)
    gate = torch.randn(k - 1, gate_width, generator=g, dtype=F64)
    logits = torch.cat([torch.zeros(N, 1, dtype=F64), x[:, -gate_width:] @ gate.T], 1)
    labels = torch.distributions.Categorical(logits=logits).sample()
    means = get_link(link)((x[:, :D] * weight[labels]).sum(1) + bias[labels])
    y = means + (0.5 if link == "linear" else 0.2) * torch.randn(N, generator=g, dtype=F64)

    def near(scale: float) -> Params:
        parts = (weight, bias, gate, torch.zeros(k - 1, dtype=F64))
        moved = (t * scale + 0.05 * torch.randn(t.shape, generator=g, dtype=F64) for t in parts)
        return Params(*moved, torch.tensor(0.7, dtype=F64))

    return x, y, near(0.8), near(1.1)


@pytest.mark.parametrize(
    "k, gate_covariates, update_experts, link_name",
    [
        (2, False, True, "linear"),
        (3, False, True, "linear"),
        (2, True, True, "linear"),
        (2, False, True, "tanh"),
        (3, False, False, "linear"),
    ],
)
def test_a_pass_without_the_hessian_leaves_every_other_sum_unchanged(
    k, gate_covariates, update_experts, link_name
):
    x, y, params, _ = _problem(k, gate_covariates)
    source = as_source(x, y)
    link = get_link(link_name)
    full = source.reduce(pass_statistics, CHUNK, params, link, update_experts, True, None, None)
    lean = source.reduce(
        pass_statistics, CHUNK, params, link, update_experts, True, None, None, False
    )
    assert lean.gate_hessian is None
    assert full.gate_hessian.shape[0] == (k - 1) * (params.gate_weight.shape[1] + 1)
    for name in full._fields:
        if name == "gate_hessian" or getattr(full, name) is None:
            continue
        a, b = getattr(lean, name), getattr(full, name)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))


def test_em_statistics_carries_the_hessian_it_is_given():
    x, y, first, second = _problem(2, False)
    em = EM(as_source(x, y), get_link("linear"), chunk_size=CHUNK)
    at_first = em.statistics(first)
    at_second = em.statistics(second)
    reused = em.statistics(second, gate_hessian=at_first.gate_hessian)
    assert reused.gate_hessian is at_first.gate_hessian
    assert not torch.allclose(at_first.gate_hessian, at_second.gate_hessian)
    torch.testing.assert_close(reused.gate_gradient, at_second.gate_gradient, rtol=1e-12, atol=0)
    torch.testing.assert_close(reused.expert_matrix, at_second.expert_matrix, rtol=1e-10, atol=0)


def test_fit_forms_the_hessian_in_every_second_iteration_only(monkeypatch):
    x, y, first, _ = _problem(2, False)
    flags = []

    def spy(*args):
        flags.append(args[8])  # gate_hessian: whether this pass forms it
        return pass_statistics(*args)

    monkeypatch.setattr(loop, "pass_statistics", spy)
    em = EM(as_source(x, y), get_link("linear"), chunk_size=x.shape[0], tol=1e-12, max_iter=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs, _ = em.fit([first])
    # the start's pass, then one per iteration (no step was halved on this problem)
    assert runs[0].passes == len(flags) == 7
    assert flags == [True, True, False, True, False, True, False]
    monkeypatch.setattr(loop, "LAZY_GATE_HESSIAN", False)
    flags.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        em.fit([first])
    assert all(flags) and len(flags) == 7


def _fit(x, y, k, lazy, monkeypatch, **options):
    monkeypatch.setattr(loop, "LAZY_GATE_HESSIAN", lazy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pyromoe.fit_em(x, y, k, n_init=2, seed=4, tol=1e-10, max_iter=1000, **options)


@pytest.mark.parametrize(
    "k, gate_covariates, link",
    [(2, False, "linear"), (3, False, "linear"), (2, True, "linear"), (2, False, "tanh")],
)
def test_the_lazy_step_reaches_the_same_optimum(k, gate_covariates, link, monkeypatch):
    x, y, _, _ = _problem(k, gate_covariates, seed=2, link=link)
    options = {"link": link}
    if gate_covariates:
        options["gate_features"] = DZ
    lazy = _fit(x, y, k, True, monkeypatch, **options)
    fresh = _fit(x, y, k, False, monkeypatch, **options)
    assert lazy.diagnostics["converged"] and fresh.diagnostics["converged"]
    trace = np.array(lazy.diagnostics["log_likelihood_trace"])
    assert (np.diff(trace) >= -1e-12).all()  # never falls
    assert abs(trace[-1] - fresh.diagnostics["log_likelihood_trace"][-1]) < 1e-9
    # the same optimum up to the experts' labels (the best start may differ)
    best = min(
        itertools.permutations(range(k)),
        key=lambda p: float((lazy.experts_weight[list(p)] - fresh.experts_weight).abs().max()),
    )
    lazy = lazy.permute(list(best))
    scale = float(fresh.experts_weight.abs().max())
    assert float((lazy.experts_weight - fresh.experts_weight).abs().max()) < 1e-3 * scale
    z = x[:, -DZ:] if gate_covariates else None
    inputs = x[:, :D] if gate_covariates else x
    gate = lazy.gate_probabilities(inputs, z) - fresh.gate_probabilities(inputs, z)
    assert float(gate.abs().max()) < 1e-3
    assert abs(float(lazy.noise) - float(fresh.noise)) < 1e-4 * float(fresh.noise)
