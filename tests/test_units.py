"""The one affine reparametrisation (pyromoe.core.units): both ways, every parameter, every link it
can map, and a clear refusal for the experts of the links it cannot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyromoe.core import sites
from pyromoe.core.likelihood import expert_means, gate_logits, log_likelihood
from pyromoe.core.links import get_link
from pyromoe.core.params import Params
from pyromoe.core.units import AffineMap, exact_scales

K, D = 3, 4
F64 = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(seed: int, *batch: int) -> Params:
    g = _generator(seed)

    def normal(*shape):
        return torch.randn((*batch, *shape), generator=g, dtype=F64)

    return Params(normal(K, D), normal(K), normal(K - 1, D), normal(K - 1), normal().exp())


def _maps(seed: int, y_shift: float = 0.7) -> dict[str, AffineMap]:
    g = _generator(seed)
    shift = torch.randn(D, generator=g, dtype=F64)
    scale = torch.rand(D, generator=g, dtype=F64) + 0.5
    root = torch.randn(D, D, generator=g, dtype=F64)
    matrix = root @ root.T + D * torch.eye(D, dtype=F64)  # well conditioned, like a whitening
    return {
        "diagonal": AffineMap(x_shift=shift, x_scale=scale, y_shift=y_shift, y_scale=2.5),
        "matrix": AffineMap(x_shift=shift, x_matrix=matrix, y_shift=y_shift, y_scale=0.4),
        "powers of two": AffineMap(
            x_scale=torch.tensor([2.0**300, 1.0, 2.0**-300, 4.0], dtype=F64), y_scale=2.0**-200
        ),
    }


def _relative(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("kind", ["diagonal", "matrix", "powers of two"])
def test_round_trip_both_ways_to_1e_12(kind):
    units = _maps(0)[kind]
    link = get_link("linear")
    params = _params(1, 2, 5)  # leading batch dims: (chain, draw)
    there_and_back = units.to_new(units.to_original(params, link), link)
    back_and_there = units.to_original(units.to_new(params, link), link)
    for name in Params._fields:
        assert _relative(getattr(there_and_back, name), getattr(params, name)) < 1e-12, name
        assert _relative(getattr(back_and_there, name), getattr(params, name)) < 1e-12, name


def test_site_dicts_of_numpy_draws_map_as_the_tensors_do():
    units = _maps(2)["diagonal"]
    link = get_link("linear")
    params = _params(3, 4)
    draws = {name: value.numpy() for name, value in params.to_sites().items()}
    mapped = units.to_original(draws, link)
    expected = units.to_original(params, link).to_sites()
    assert set(mapped) == set(draws)
    for name, value in mapped.items():
        assert isinstance(value, np.ndarray)
        np.testing.assert_array_equal(value, expected[name].numpy())


def test_powers_of_two_map_exactly_without_underflow():
    units = _maps(0)["powers of two"]
    params = _params(4)
    link = get_link("linear")
    there_and_back = units.to_new(units.to_original(params, link), link)
    for name in Params._fields:
        assert torch.equal(getattr(there_and_back, name), getattr(params, name)), name


def _data(units: AffineMap, link, seed: int, n: int = 500):
    """Original (x, y) and the same rows in the map's new coordinates."""
    g = _generator(seed)
    x = torch.randn(n, D, generator=g, dtype=F64) * 3 + 1
    y = torch.randn(n, generator=g, dtype=F64) * 2
    if not link.is_identity:
        y = y.abs()
    return (x, y), (units.x_to_new(x), units.y_to_new(y))


@pytest.mark.parametrize("kind", ["diagonal", "matrix"])
@pytest.mark.parametrize("link_name", ["linear", "relu", "leaky_relu"])
def test_mapped_parameters_predict_the_original_data_as_the_new_ones_predict_the_new_data(
    kind, link_name
):
    link = get_link(link_name)
    y_shift = 0.7 if link.is_identity else 0.0  # positively homogeneous links: y_scale alone
    units = _maps(5, y_shift=y_shift)[kind]
    new = _params(6)
    original = units.to_original(new, link)
    (x, y), (x_new, y_new) = _data(units, link, seed=7)

    means = expert_means(x, original.experts_weight, original.experts_bias, link)
    means_new = expert_means(x_new, new.experts_weight, new.experts_bias, link)
    assert _relative(means, units.y_scale * means_new + units.y_shift) < 1e-10

    gate = torch.softmax(gate_logits(x, original.gate_weight, original.gate_bias), -1)
    gate_new = torch.softmax(gate_logits(x_new, new.gate_weight, new.gate_bias), -1)
    assert _relative(gate, gate_new) < 1e-10

    # densities of y and y_new differ by the Jacobian 1 / y_scale
    log_lik = log_likelihood(x, y, original, link)
    log_lik_new = log_likelihood(x_new, y_new, new, link) - math.log(units.y_scale)
    assert _relative(log_lik, log_lik_new) < 1e-10


@pytest.mark.parametrize("link_name", ["tanh", "sigmoid"])
def test_the_gate_and_noise_map_for_any_link(link_name):
    link = get_link(link_name)
    units = _maps(8)["matrix"]
    new = _params(9)
    original = units.to_original(
        {sites.GATE_WEIGHT: new.gate_weight, sites.GATE_BIAS: new.gate_bias, "noise": new.noise},
        link,
    )
    (x, _), (x_new, _) = _data(units, get_link("linear"), seed=10)
    gate = torch.softmax(gate_logits(x, original[sites.GATE_WEIGHT], original[sites.GATE_BIAS]), -1)
    gate_new = torch.softmax(gate_logits(x_new, new.gate_weight, new.gate_bias), -1)
    assert _relative(gate, gate_new) < 1e-10
    assert float(original["noise"]) == pytest.approx(units.y_scale * float(new.noise), rel=1e-15)


@pytest.mark.parametrize(
    "link_name, y_shift, y_scale",
    [("tanh", 0.0, 2.0), ("sigmoid", 0.5, 1.0), ("relu", 0.5, 1.0), ("leaky_relu", 1.0, 3.0)],
)
def test_experts_of_a_link_across_a_y_map_it_cannot_cross_are_refused(link_name, y_shift, y_scale):
    link = get_link(link_name)
    units = AffineMap(x_scale=torch.ones(D, dtype=F64), y_shift=y_shift, y_scale=y_scale)
    assert not units.maps_experts(link)
    with pytest.raises(ValueError, match=f"the {link_name} experts have no form .* gate and the"):
        units.to_original(_params(11), link)
    with pytest.raises(ValueError, match="have no form"):
        units.to_new({"experts_weight": torch.ones(K, D, dtype=F64)}, link)


def test_nonlinear_experts_map_when_y_is_not_mapped():
    units = AffineMap(x_shift=torch.ones(D, dtype=F64), x_scale=torch.full((D,), 2.0, dtype=F64))
    assert units.maps_experts(get_link("tanh"))
    params = _params(12)
    mapped = units.to_original(params, get_link("tanh"))
    assert torch.allclose(mapped.experts_weight, params.experts_weight / 2)


def test_a_bias_without_its_weight_is_refused_when_x_is_shifted():
    units = AffineMap(x_shift=torch.ones(D, dtype=F64))
    with pytest.raises(ValueError, match="gate_bias needs gate_weight beside it"):
        units.to_original({"gate_bias": torch.zeros(K - 1, dtype=F64)})


def test_bad_maps_are_refused():
    with pytest.raises(ValueError, match="x_scale .* or x_matrix, not both"):
        AffineMap(x_scale=torch.ones(2), x_matrix=torch.eye(2))
    with pytest.raises(ValueError, match="y_scale must be a positive finite number"):
        AffineMap(y_scale=0.0)
    with pytest.raises(ValueError, match="unknown parameters"):
        AffineMap().to_original({"weights": torch.ones(2)})
    with pytest.raises(ValueError, match="only with their link; pass link="):
        AffineMap(y_scale=2.0).to_original({"experts_weight": torch.ones(K, D)})


def test_exact_scales_are_powers_of_two_and_none_for_ordinary_data():
    g = _generator(13)
    x = torch.randn(100, 3, generator=g, dtype=F64)
    y = torch.randn(100, generator=g, dtype=F64)
    assert exact_scales(x, y, get_link("linear")) is None
    units = exact_scales(
        x * torch.tensor([2.0**400, 1.0, 2.0**-400], dtype=F64), y * 2.0**300, get_link("relu")
    )
    exponents = torch.log2(units.x_scale)
    assert torch.equal(exponents, exponents.round()) and float(exponents[1]) == 0.0
    assert math.log2(units.y_scale) == round(math.log2(units.y_scale)) > 250
    with pytest.raises(ValueError, match="extreme scale the tanh link cannot produce"):
        exact_scales(x, y * 2.0**300, get_link("tanh"))
