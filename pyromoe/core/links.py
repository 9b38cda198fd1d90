"""Expert link functions g, by name: one source of truth for the model, the simulator and the initializer.

Each link is a :class:`Link`: a torch function ``g``, its derivative, and the facts about ``g`` that
the rest of the package branches on, defined once here in the registry: whether ``g - g(0)`` is odd
(the pair's moments are then gate-free; docs/algorithm.md section 2), whether ``g`` is the identity
(experts in closed form, moments exact for any k), positively homogeneous (``y`` may be rescaled) or
linear on either side of a kink at 0 (Gaussian expectations exact from half-Gaussian moments).
Public entry points turn a name into a :class:`Link` once (:func:`check_link`); the functions below
take the :class:`Link`.

Available names: ``"linear"``, ``"tanh"``, ``"relu"``, ``"leaky_relu"`` (negative slope 0.1 by default;
use :func:`leaky_relu` for another slope) and ``"sigmoid"`` (the plain logistic function, whose centred
version ``sigmoid - 1/2`` is odd).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

__all__ = [
    "Link",
    "LINKS",
    "check_link",
    "link_rule",
    "get_link",
    "leaky_relu",
    "DEFAULT_LEAKY_SLOPE",
    "centred",
    "gaussian_expectation",
    "transform_constants",
]

#: Default negative slope of ``"leaky_relu"`` (the value used in docs/algorithm.md's figures).
DEFAULT_LEAKY_SLOPE = 0.1


@dataclass(frozen=True)
class Link:
    """A link function ``g`` applied to each expert's linear predictor ``a.x + b``.

    Attributes
    ----------
    name : str
        Registry name (``"linear"``, ``"tanh"``, ...).
    function : callable
        ``g(z)``, elementwise on a tensor.
    derivative : callable
        ``g'(z)``, elementwise (used by Gauss-Newton steps).
    odd_offset : float or None
        ``g(0)`` when ``g - g(0)`` is an odd function (linear, tanh, sigmoid), else ``None`` (relu, leaky).
    negative_slope : float
        Slope for ``z < 0`` (leaky ReLU only; 0 for relu, unused otherwise).
    is_identity : bool
        ``g(z) = z`` (linear): each expert's M-step is weighted least squares in closed form, and
        the moment step is exact for any number of experts.
    positively_homogeneous : bool
        ``g(s z) = s g(z)`` for ``s > 0`` (linear, relu, leaky_relu): ``y`` may be divided by a
        scale and the experts map back exactly.
    kinked : bool
        ``g`` is linear on either side of a kink at 0 (relu, leaky_relu): its Gaussian expectations
        are exact from half-Gaussian moments, where quadrature would converge slowly.
    """

    name: str
    function: Callable[[torch.Tensor], torch.Tensor]
    derivative: Callable[[torch.Tensor], torch.Tensor]
    odd_offset: float | None
    negative_slope: float = 0.0
    is_identity: bool = False
    positively_homogeneous: bool = False
    kinked: bool = False

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.function(z)

    @property
    def is_odd(self) -> bool:
        """Whether ``g - g(0)`` is odd (the moment step is then gate-free for a pair of experts)."""
        return self.odd_offset is not None

    def __repr__(self) -> str:
        if self.name == "leaky_relu":
            return f"Link('leaky_relu', negative_slope={self.negative_slope})"
        return f"Link({self.name!r})"


# Module-level functions (not lambdas) so that links, and models holding them, can be pickled for
# multi-process MCMC chains.
def _identity(z: torch.Tensor) -> torch.Tensor:
    return z


def _tanh_derivative(z: torch.Tensor) -> torch.Tensor:
    return 1 - torch.tanh(z) ** 2


def _relu_derivative(z: torch.Tensor) -> torch.Tensor:
    return (z > 0).to(z.dtype)


def _sigmoid_derivative(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s)


def _leaky_relu(z: torch.Tensor, negative_slope: float) -> torch.Tensor:
    return torch.where(z >= 0, z, negative_slope * z)


def _leaky_relu_derivative(z: torch.Tensor, negative_slope: float) -> torch.Tensor:
    return torch.where(z >= 0, torch.ones_like(z), torch.full_like(z, negative_slope))


def leaky_relu(negative_slope: float = DEFAULT_LEAKY_SLOPE) -> Link:
    """Leaky ReLU link ``g(z) = max(z, s z)`` with negative slope ``s`` in [0, 1).

    Examples
    --------
    >>> g = leaky_relu(0.2)
    >>> g(torch.tensor([-1.0, 2.0]))
    tensor([-0.2000,  2.0000])
    """
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(
            f"negative_slope must be a float in [0, 1); got {type(negative_slope).__name__}"
        )
    if not 0.0 <= float(negative_slope) < 1.0:
        raise ValueError(f"negative_slope must be in [0, 1); got {negative_slope}")
    s = float(negative_slope)
    return Link(
        name="leaky_relu",
        function=partial(_leaky_relu, negative_slope=s),
        derivative=partial(_leaky_relu_derivative, negative_slope=s),
        odd_offset=None,
        negative_slope=s,
        positively_homogeneous=True,
        kinked=True,
    )


LINKS: dict[str, Link] = {
    "linear": Link(
        "linear",
        _identity,
        torch.ones_like,
        odd_offset=0.0,
        is_identity=True,
        positively_homogeneous=True,
    ),
    "tanh": Link("tanh", torch.tanh, _tanh_derivative, odd_offset=0.0),
    "relu": Link(
        "relu",
        torch.relu,
        _relu_derivative,
        odd_offset=None,
        negative_slope=0.0,
        positively_homogeneous=True,
        kinked=True,
    ),
    "leaky_relu": leaky_relu(DEFAULT_LEAKY_SLOPE),
    "sigmoid": Link("sigmoid", torch.sigmoid, _sigmoid_derivative, odd_offset=0.5),
}


def get_link(link: str | Link) -> Link:
    """Return the :class:`Link` for a registry name (or pass a :class:`Link` through).

    Raises
    ------
    ValueError
        If the name is unknown; the message lists the valid names.
    TypeError
        If ``link`` is neither a string nor a :class:`Link`.

    Examples
    --------
    >>> get_link("tanh").is_odd
    True
    """
    if isinstance(link, Link):
        return link
    if not isinstance(link, str):
        raise TypeError(
            f"link must be a link name (one of {sorted(LINKS)}) or a pyromoe.core.links.Link; "
            f"got {type(link).__name__}"
        )
    try:
        return LINKS[link]
    except KeyError:
        raise ValueError(
            f"link must be one of {sorted(LINKS)}; got {link!r}. "
            "For another leaky-ReLU slope use pyromoe.core.links.leaky_relu(slope)."
        ) from None


def check_link(link: str | Link) -> Link:
    """The :class:`Link` for ``link`` (a registry name or a Link): the boundary's link check.

    The one place where a link name becomes a Link: public entry points call it once and pass the
    Link inward, so nothing below them resolves names again (:func:`get_link` does the lookup).

    Raises
    ------
    ValueError, TypeError
        For an unknown name or a value that is neither a name nor a Link (the message lists the
        links).
    """
    return get_link(link)


def link_rule(value: str | Link, name: str = "link") -> Link:
    """:func:`check_link` as a rule of a public entry's table
    (:func:`pyromoe._validation.rules.validate`): the link becomes a Link once per call."""
    return check_link(value)


# ---------------------------------------------------------------------------------------------
# Gaussian expectations of the links and the moment transform constants (docs/algorithm.md section 2).
# The moment initializer reads these; they are the one place where link-specific maths lives.


def _trapezoid_nodes() -> tuple[torch.Tensor, torch.Tensor]:
    """Trapezoid rule on [-12, 12] against the Gaussian density.

    For integrands analytic in a strip (tanh(r t) has poles at distance pi / (2 r)) it converges
    exponentially in 1/h, faster than Gauss-Hermite quadrature (120 nodes: error ~1e-5 for
    tanh(2 t)).
    """
    t = torch.linspace(-12.0, 12.0, 1201, dtype=torch.float64)
    w = torch.exp(-0.5 * t * t) * (t[1] - t[0]) / math.sqrt(2 * math.pi)
    return t, w


def _hermite_coefficients(degree: int) -> list[float]:
    """Coefficients (constant term first) of the probabilists' Hermite polynomial He_degree."""
    prev, cur = [1.0], [0.0, 1.0]
    if degree == 0:
        return prev
    for m in range(1, degree):
        nxt = [0.0] + cur  # t * He_m
        for i, c in enumerate(prev):
            nxt[i] -= m * c  # - m He_{m-1}
        prev, cur = cur, nxt
    return cur


def _half_gaussian_moment(j: int) -> float:
    """E[t^j ; t > 0] for t ~ N(0, 1)."""
    return 2.0 ** (j / 2 - 1) * math.gamma((j + 1) / 2) / math.sqrt(math.pi)


def centred(link: Link, z: torch.Tensor) -> torch.Tensor:
    """``g(z) - g(0)`` for odd links (e.g. ``sigmoid - 1/2``), ``g(z)`` otherwise.

    The moment initializer works with the centred output ``y - g(0)`` so that odd links keep
    their parity (docs/algorithm.md section 2: the plain sigmoid fails for T3).
    """
    return link(z) - (link.odd_offset or 0.0)


def gaussian_expectation(
    link: Link,
    scale,
    power: int = 1,
    hermite: int = 0,
) -> torch.Tensor:
    """``E[c(r t)^power He_hermite(t)]`` for ``t ~ N(0, 1)``, with ``c`` the centred link.

    By Stein's lemma ``E[f(r t) He_m(t)] = r^m E[f^(m)(r t)]``, so these expectations give every
    per-norm constant of the moment method (docs/algorithm.md section 2). ReLU and leaky ReLU are
    computed exactly from half-Gaussian moments (quadrature converges slowly at their kink);
    smooth links by the trapezoid rule on a fine grid (exponentially accurate for them, and more
    accurate than Gauss-Hermite quadrature for tanh at large scales).

    Parameters
    ----------
    link : Link
    scale : float or Tensor
        Expert norm(s) ``r >= 0`` (any shape).
    power : int
        Power ``p >= 0`` of the centred link.
    hermite : int
        Degree ``m >= 0`` of the Hermite polynomial.

    Returns
    -------
    Tensor, float64, the shape of ``scale``.

    Examples
    --------
    >>> round(float(gaussian_expectation(LINKS["linear"], 1.0, power=3, hermite=3)), 10)  # 3! = 6
    6.0
    """
    r = torch.as_tensor(scale, dtype=torch.float64)
    coeffs = _hermite_coefficients(int(hermite))
    if link.kinked:
        s = link.negative_slope
        # c(r t)^p He_m(t) = r^p t^p He_m(t) (t > 0), (s r)^p t^p He_m(t) (t < 0), r >= 0
        total = 0.0
        for i, c in enumerate(coeffs):
            if c == 0.0:
                continue
            j = power + i
            total += c * _half_gaussian_moment(j) * (1.0 + (s**power) * (-1.0) ** j)
        return total * r**power
    nodes, weights = _trapezoid_nodes()
    he = sum(c * nodes**i for i, c in enumerate(coeffs))
    values = centred(link, r.unsqueeze(-1) * nodes) ** power * he
    return (values * weights).sum(-1)


def transform_constants(link: Link, noise: float, scale: float = 1.0) -> tuple[float | None, float]:
    """Transform constants ``(alpha, beta)`` of ``P3(y) = y^3 + alpha y``, ``P2(y) = y^2 + beta y``.

    They cancel the first-order gate terms of the moments when the gate is orthogonal to the
    experts and all experts have norm ``scale`` (docs/algorithm.md section 2):
    ``beta = -E[(g^2)'(z)] / E[g'(z)]``, ``alpha = -E[(g^3)''(z) + 3 sigma^2 g''(z)] / E[g''(z)]``,
    ``z ~ N(0, scale^2)``. For odd links (linear, tanh, centred sigmoid) ``beta = 0`` and
    ``alpha`` is free (returned as ``None``): the pair's moments are gate-free for any alpha, and
    the initializer picks it from the data.

    Examples
    --------
    >>> alpha, beta = transform_constants(LINKS["relu"], noise=0.5)
    >>> round(alpha, 4), round(beta, 4)
    (-6.75, -1.5958)
    """
    if link.is_odd:
        return None, 0.0
    r = float(scale)
    sigma2 = float(noise) ** 2

    def e(power, hermite):
        return float(gaussian_expectation(link, r, power, hermite))

    beta = -e(2, 1) / e(1, 1)
    alpha = -(e(3, 2) + 3 * sigma2 * e(1, 2)) / e(1, 2)
    return alpha, beta
