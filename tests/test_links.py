import numpy as np
import pytest
import torch

from pyromoe.core.links import DEFAULT_LEAKY_SLOPE, LINKS, get_link, leaky_relu

Z = torch.linspace(-3, 3, 61, dtype=torch.float64)

EXPECTED = {
    "linear": lambda z: z,
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0),
    "leaky_relu": lambda z: np.where(z >= 0, z, DEFAULT_LEAKY_SLOPE * z),
    "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
}


@pytest.mark.parametrize("name", sorted(LINKS))
def test_link_matches_numpy_definition(name):
    np.testing.assert_allclose(get_link(name)(Z).numpy(), EXPECTED[name](Z.numpy()), atol=1e-15)


@pytest.mark.parametrize("name", sorted(LINKS))
def test_link_derivative_matches_finite_difference(name):
    link = get_link(name)
    z = Z[Z.abs() > 1e-3]  # avoid the kink at 0
    h = 1e-6
    numeric = (link(z + h) - link(z - h)) / (2 * h)
    np.testing.assert_allclose(link.derivative(z).numpy(), numeric.numpy(), atol=1e-7)


def test_odd_links_are_odd_after_offset():
    for name in sorted(LINKS):
        link = get_link(name)
        centred = link(Z) - (link.odd_offset or 0.0)
        is_odd = torch.allclose(centred, -centred.flip(0), atol=1e-14)
        assert is_odd == link.is_odd, name


def test_leaky_relu_default_slope_is_documented_value():
    assert get_link("leaky_relu").negative_slope == 0.1
    assert leaky_relu(0.25)(torch.tensor([-4.0])).item() == pytest.approx(-1.0)


def test_unknown_link_lists_valid_names():
    with pytest.raises(ValueError, match=r"link must be one of \['leaky_relu', 'linear', 'relu'"):
        get_link("softsign")


def test_link_of_wrong_type_is_type_error():
    with pytest.raises(TypeError, match="link must be a link name"):
        get_link(3)


def test_leaky_slope_out_of_range():
    with pytest.raises(ValueError, match=r"negative_slope must be in \[0, 1\); got 1.5"):
        leaky_relu(1.5)
