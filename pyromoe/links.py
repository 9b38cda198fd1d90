"""Expert link functions g, by name: one source of truth for the model, the simulator and the initializer.

Each link is a :class:`Link`: a torch function ``g``, its derivative, and the facts the moment
initializer needs (whether ``g - g(0)`` is odd, which makes the pair's moments gate-free; see
ALGORITHM.md section 2).

Available names: ``"linear"``, ``"tanh"``, ``"relu"``, ``"leaky_relu"`` (negative slope 0.1 by default;
use :func:`leaky_relu` for another slope) and ``"sigmoid"`` (the plain logistic function, whose centred
version ``sigmoid - 1/2`` is odd).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

__all__ = ["Link", "LINKS", "get_link", "leaky_relu", "DEFAULT_LEAKY_SLOPE"]

#: Default negative slope of ``"leaky_relu"`` (the value used in ALGORITHM.md's figures).
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
    """

    name: str
    function: Callable[[torch.Tensor], torch.Tensor]
    derivative: Callable[[torch.Tensor], torch.Tensor]
    odd_offset: float | None
    negative_slope: float = 0.0

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
    )


LINKS: dict[str, Link] = {
    "linear": Link("linear", _identity, torch.ones_like, odd_offset=0.0),
    "tanh": Link("tanh", torch.tanh, _tanh_derivative, odd_offset=0.0),
    "relu": Link("relu", torch.relu, _relu_derivative, odd_offset=None, negative_slope=0.0),
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
            f"link must be a link name (one of {sorted(LINKS)}) or a pyromoe.links.Link; "
            f"got {type(link).__name__}"
        )
    try:
        return LINKS[link]
    except KeyError:
        raise ValueError(
            f"link must be one of {sorted(LINKS)}; got {link!r}. "
            "For another leaky-ReLU slope use pyromoe.links.leaky_relu(slope)."
        ) from None
