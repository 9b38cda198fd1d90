"""SQUAREM in EM (issue 26): ``EM(accelerate=True)`` extrapolates from every three consecutive
EM iterates (Varadhan & Roland 2008) and keeps the point only when its objective is not lower.
The step must not depend on the data's units, the trace must stay monotone, a rejected point
must cost one pass and change nothing else, and the fit must reach EM's optimum, closer at the
same tolerance and in fewer passes on a problem where EM crawls."""

import warnings

import numpy as np
import pytest
import torch

from pyromoe import simulate
from pyromoe.core.em import loop
from pyromoe.core.em.loop import EM, squarem_step
from pyromoe.core.em.starts import random_start, start_params
from pyromoe.core.links import get_link
from pyromoe.core.params import Params
from pyromoe.core.sources import as_source

F64 = torch.float64


def _data():
    # the fit_em pin of tests/test_validation.py: plain EM crawls along the gate's offset
    return simulate(2000, 3, seed=0, bias=True)


def _start(data, seed=3):
    draw = random_start(data.x, data.y, 2, "linear", torch.Generator().manual_seed(seed))
    return start_params(draw, torch.empty(0, dtype=F64), True)


def _fit(data, accelerate, tol=1e-6, max_iter=5000, start=None):
    em = EM(
        as_source(data.x, data.y),
        get_link("linear"),
        tol=tol,
        max_iter=max_iter,
        accelerate=accelerate,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs, _ = em.fit([start if start is not None else _start(data)])
    return runs[0]


def test_the_step_does_not_depend_on_the_units_of_x_and_y():
    g = torch.Generator().manual_seed(0)

    def params():
        return Params(
            torch.randn(2, 3, generator=g, dtype=F64),
            torch.randn(2, generator=g, dtype=F64),
            torch.randn(1, 3, generator=g, dtype=F64),
            torch.randn(1, generator=g, dtype=F64),
            torch.tensor(0.5, dtype=F64) + 0.1 * torch.rand((), generator=g, dtype=F64),
        )

    chain = [params() for _ in range(3)]
    x_mean, x_sd, y_sd = torch.tensor([1.0, -2.0, 3.0], dtype=F64), torch.ones(3, dtype=F64), 1.0
    # data x -> s x + m, y -> t y + c: weights a s^-1 t, biases t b + c - a.(s^-1 m) t, ...
    s = torch.tensor([1e3, 1e-2, 7.0], dtype=F64)
    m = torch.tensor([5.0, -1.0, 2.0], dtype=F64)
    t, c = 40.0, -3.0

    def to_new(p: Params) -> Params:
        weight = p.experts_weight / s * t
        return Params(
            weight,
            t * p.experts_bias + c - weight @ m,
            p.gate_weight / s,
            p.gate_bias - (p.gate_weight / s) @ m,
            t * p.noise,
        )

    leap = squarem_step(chain, 1e-9, (x_mean, x_sd, y_sd))
    new_units = (s * x_mean + m, s * x_sd, t * y_sd)
    new_leap = squarem_step([to_new(p) for p in chain], 1e-9, new_units)
    for a, b in zip(to_new(leap), new_leap):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # without the units the step length is not invariant: the same check fails
    plain = squarem_step([to_new(p) for p in chain], 1e-9)
    assert not torch.allclose(to_new(leap).experts_weight, plain.experts_weight, rtol=1e-3)


def test_the_noise_stays_at_or_above_the_floor():
    chain = [
        Params(torch.zeros(2, 1), None, torch.zeros(1, 1), None, torch.tensor(n))
        for n in (1.0, 0.1, 0.02)
    ]
    leap = squarem_step(chain, 0.05)
    assert float(leap.noise) == pytest.approx(0.05)


def test_accelerated_em_reaches_the_optimum_closer_and_in_fewer_passes():
    data = _data()
    optimum = _fit(data, False, tol=1e-12).objective
    plain, fast = _fit(data, False), _fit(data, True)
    assert plain.converged and fast.converged
    assert (np.diff(fast.trace) >= -1e-12).all()  # never falls
    assert fast.passes < 0.75 * plain.passes
    # at the same tol the plain run stops further below the optimum (EM crawls along a ridge)
    assert optimum - fast.objective < 0.5 * (optimum - plain.objective)
    assert optimum - fast.objective < 5e-6
    # run tight, both reach the same optimum
    assert abs(_fit(data, True, tol=1e-12).objective - optimum) < 1e-10


def test_a_rejected_point_costs_one_pass_and_changes_nothing_else(monkeypatch):
    data = _data()
    plain = _fit(data, False, max_iter=30)
    far = []

    def nowhere(chain, floor, units=None):  # a point far worse than the chain's
        leap = chain[-1]._replace(experts_weight=chain[-1].experts_weight + 50.0)
        far.append(leap)
        return leap

    monkeypatch.setattr(loop, "squarem_step", nowhere)
    rejected = _fit(data, True, max_iter=30)
    assert far  # tried
    assert rejected.passes == plain.passes + len(far)
    assert rejected.n_iter == plain.n_iter
    assert rejected.trace == pytest.approx(plain.trace, rel=0, abs=1e-12)
    for a, b in zip(rejected.params, plain.params):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
