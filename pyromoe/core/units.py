"""The one affine reparametrisation: standardising, back to the data's units, exact rescaling.

A mixture of experts fitted on transformed data ``x_new = (x - x_shift) / x_scale`` (per column;
or ``(x - x_shift) @ x_matrix``, e.g. whitening) and ``y_new = (y - y_shift) / y_scale`` is the
same model on the original data with other parameters. :class:`AffineMap` is that map, both ways,
for every parameter set pyromoe has (:class:`~pyromoe.core.params.Params`, site dicts of posterior
draws with any leading batch dims, torch tensors or numpy arrays). With ``A`` the input map
(``diag(1 / x_scale)`` or ``x_matrix``), ``m = x_shift``, ``s_y = y_scale`` and ``m_y = y_shift``,
a linear expert ``y' = a'.x_new + b'`` and the gate logit ``w'.x_new + c'`` are, on the original
data::

    a = s_y A a'            b = s_y (b' - (A a').m) + m_y
    w = A w'                c = c' - (A w').m
    noise = s_y noise'

The experts' form needs ``y = s_y g(.) + m_y`` to be ``g(.)`` of an affine predictor: any map for
the identity link; ``y_shift = 0`` for positively homogeneous links (relu, leaky_relu:
``s g(z) = g(s z)`` for ``s > 0``); no ``y`` map at all for the others (tanh, sigmoid), whose
experts are then refused with a message (:meth:`AffineMap.maps_experts` says beforehand). The gate
and the noise map for every link.

Per-column scales are applied one exact operation at a time (never a combined factor, never a
matrix product with zeros), so powers of two map exactly, with no underflow and no ``0 * inf``.
That is the exact rescaling of data of extreme magnitude (:func:`exact_scales`,
:func:`on_exact_scale`): every fit runs on data divided by powers of two and is mapped back.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from . import sites
from .params import Params

__all__ = ["AffineMap", "exact_scales", "on_exact_scale", "rescale_estimate"]

#: The parameters of a mixture of experts by their Params field names, and by their site names.
_FIELDS = ("experts_weight", "experts_bias", "gate_weight", "gate_bias", "noise")
_SITE_FIELDS = {
    sites.EXPERTS_WEIGHT: "experts_weight",
    sites.EXPERTS_BIAS: "experts_bias",
    sites.GATE_WEIGHT: "gate_weight",
    sites.GATE_BIAS: "gate_bias",
    sites.NOISE: "noise",
}


def _as_map_tensor(value) -> torch.Tensor | None:
    if value is None:
        return None
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    return tensor if tensor.is_floating_point() else tensor.double()


@dataclass(frozen=True)
class AffineMap:
    """``x_new = (x - x_shift) / x_scale`` (or ``(x - x_shift) @ x_matrix``),
    ``y_new = (y - y_shift) / y_scale``, and the parameters that go with it.

    Attributes
    ----------
    x_shift : Tensor (d,) or None
        Subtracted from every row of ``x`` (None: nothing).
    x_scale : Tensor (d,) or None
        Each column divided by it (None: nothing). Not with ``x_matrix``.
    x_matrix : Tensor (d, d) or None
        The centred rows multiplied by it (``x_new = (x - x_shift) @ x_matrix``, e.g. the
        whitening ``Sigma^{-1/2}``). Not with ``x_scale``.
    y_shift : float
        Subtracted from ``y``.
    y_scale : float
        ``y`` (after the shift) divided by it; positive.

    Examples
    --------
    >>> units = AffineMap(x_shift=torch.tensor([1.0]), x_scale=torch.tensor([2.0]), y_scale=4.0)
    >>> new = {"experts_weight": torch.tensor([[1.0]]), "experts_bias": torch.tensor([0.0])}
    >>> {k: v.tolist() for k, v in units.to_original(new, "linear").items()}
    {'experts_weight': [[2.0]], 'experts_bias': [-2.0]}
    """

    x_shift: torch.Tensor | None = None
    x_scale: torch.Tensor | None = None
    x_matrix: torch.Tensor | None = None
    y_shift: float = 0.0
    y_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("x_shift", "x_scale", "x_matrix"):
            object.__setattr__(self, name, _as_map_tensor(getattr(self, name)))
        if self.x_scale is not None and self.x_matrix is not None:
            raise ValueError("give x_scale (per column) or x_matrix, not both")
        object.__setattr__(self, "y_shift", float(self.y_shift))
        object.__setattr__(self, "y_scale", float(self.y_scale))
        if not (self.y_scale > 0 and math.isfinite(self.y_scale)):
            raise ValueError(f"y_scale must be a positive finite number; got {self.y_scale}")
        if not math.isfinite(self.y_shift):
            raise ValueError(f"y_shift must be finite; got {self.y_shift}")

    # ------------------------------------------------------------------ the data
    def x_to_new(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs (..., d) in the new coordinates."""
        if self.x_shift is not None:
            x = x - self.x_shift.to(x)
        if self.x_matrix is not None:
            return x @ self.x_matrix.to(x)
        return x if self.x_scale is None else x / self.x_scale.to(x)

    def y_to_new(self, y):
        """Outputs in the new coordinates."""
        if self.y_shift != 0.0:
            y = y - self.y_shift
        return y if self.y_scale == 1.0 else y / self.y_scale

    # ------------------------------------------------------------------ the parameters
    @property
    def maps_y(self) -> bool:
        """Whether ``y`` changes at all."""
        return self.y_shift != 0.0 or self.y_scale != 1.0

    def maps_experts(self, link) -> bool:
        """Whether the experts of ``link`` (a :class:`~pyromoe.core.links.Link`) have a form on
        the other side of this map (see the module docstring)."""
        if not self.maps_y or link.is_identity:
            return True
        return bool(link.positively_homogeneous) and self.y_shift == 0.0

    def to_original(self, values, link=None):
        """Parameters fitted on the new coordinates, for the original data.

        Parameters
        ----------
        values : Params, or a mapping of site names or Params field names to arrays
            Any subset of the parameters (tensors or numpy arrays, any leading batch dims,
            ``None`` entries kept); a bias needs its weight beside it when ``x_shift`` is given.
        link : Link, optional
            The experts' link; needed when experts are given and ``y`` is mapped.

        Returns
        -------
        The same kind as ``values`` (a dict for a mapping), with the same keys.

        Raises
        ------
        ValueError
            Experts whose link has no form across this ``y`` map (tanh, sigmoid with ``y``
            mapped; relu, leaky_relu with ``y_shift != 0``), or a bias without its weight.
        """
        return self._apply(values, link, to_original=True)

    def to_new(self, values, link=None):
        """Parameters for the original data, in the new coordinates (inverse of
        :meth:`to_original`; same arguments)."""
        return self._apply(values, link, to_original=False)

    def _apply(self, values, link, *, to_original: bool):
        if isinstance(values, Params):
            return Params(**self._map(values._asdict(), link, to_original))
        if not isinstance(values, Mapping):
            raise TypeError(
                f"values must be Params or a mapping of parameter names; got {type(values).__name__}"
            )
        names = {key: _SITE_FIELDS.get(key, key) for key in values}
        unknown = [key for key, name in names.items() if name not in _FIELDS]
        if unknown:
            raise ValueError(f"unknown parameters {unknown}; expected site or Params names")
        mapped = self._map({names[key]: value for key, value in values.items()}, link, to_original)
        return {key: mapped[names[key]] for key in values}

    def _map(self, fields: dict[str, Any], link, to_original: bool) -> dict[str, Any]:
        numpy = {name for name, value in fields.items() if isinstance(value, np.ndarray)}
        fields = {
            name: torch.from_numpy(value) if name in numpy else value
            for name, value in fields.items()
        }
        experts = fields.get("experts_weight") is not None or fields.get("experts_bias") is not None
        if experts and not (self.maps_experts(link) if link is not None else not self.maps_y):
            raise ValueError(self._refusal(link))
        step = self._field_to_original if to_original else self._field_to_new
        out = {name: step(name, value, fields) for name, value in fields.items()}
        return {name: out[name].numpy() if name in numpy else out[name] for name in out}

    def _refusal(self, link) -> str:
        where = f"y_shift={self.y_shift:g}, y_scale={self.y_scale:g}"
        if link is None:
            return f"experts map across a map of y ({where}) only with their link; pass link="
        return (
            f"the {link.name} experts have no form on the other side of this map ({where}): the "
            "link sits between the two scales of y (only the identity link maps across any y "
            "map, relu and leaky_relu across y_scale alone, y_shift = 0). The gate and the noise "
            "map for every link"
        )

    def _part(self, vector, weight, part: str):
        """The entries of a per-column ``vector`` that a ``part``'s weight of this width reads:
        all of them, or (a design ``[x | z]``, :mod:`pyromoe.core.likelihood`) the experts' first
        columns or the gate's last ones."""
        width = weight.shape[-1]
        if vector.shape[-1] == width:
            return vector
        return vector[..., :width] if part == "experts" else vector[..., vector.shape[-1] - width :]

    def _weight_through_x(self, weight, inverse: bool = False, part: str = "experts"):
        """``A a`` for rows ``a`` (``A^{-1} a`` when ``inverse``), one exact operation at a time."""
        if self.x_matrix is not None:
            matrix = self.x_matrix.to(weight)
            if inverse:
                eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
                matrix = torch.linalg.solve(matrix, eye)
            return weight @ matrix.T
        if self.x_scale is None:
            return weight
        scale = self._part(self.x_scale, weight, part).to(weight)
        return weight * scale if inverse else weight / scale

    def _shift_term(self, weight, part: str = "experts"):
        """``a . x_shift`` per row of ``weight`` (0 without a shift)."""
        if self.x_shift is None:
            return None
        return weight @ self._part(self.x_shift, weight, part).to(weight)

    def _field_to_original(self, name: str, value, fields: dict):
        if value is None:
            return None
        s_y = self.y_scale
        if name == "noise":
            return value if s_y == 1.0 else value * s_y
        if name == "gate_weight":
            return self._weight_through_x(value, part="gate")
        if name == "experts_weight":  # s_y first, then A: the order of the exact rescaling
            return self._weight_through_x(value if s_y == 1.0 else value * s_y)
        weight = self._weight_of(name, fields)
        part = "gate" if name == "gate_bias" else "experts"
        shift = (
            None
            if weight is None
            else self._shift_term(self._weight_through_x(weight, part=part), part)
        )
        if shift is not None:
            value = value - shift
        if name == "gate_bias":
            return value
        value = value if s_y == 1.0 else value * s_y
        return value if self.y_shift == 0.0 else value + self.y_shift

    def _field_to_new(self, name: str, value, fields: dict):
        if value is None:
            return None
        s_y = self.y_scale
        if name == "noise":
            return value if s_y == 1.0 else value / s_y
        if name == "gate_weight":
            return self._weight_through_x(value, inverse=True, part="gate")
        if name == "experts_weight":
            value = self._weight_through_x(value, inverse=True)
            return value if s_y == 1.0 else value / s_y
        weight = self._weight_of(name, fields)
        if name == "experts_bias" and self.y_shift != 0.0:
            value = value - self.y_shift
        part = "gate" if name == "gate_bias" else "experts"
        shift = None if weight is None else self._shift_term(weight, part)
        if shift is not None:
            value = value + shift
        return value if name == "gate_bias" or s_y == 1.0 else value / s_y

    def _weight_of(self, bias_name: str, fields: dict):
        """The weight beside a bias (needed only with a shift of x)."""
        weight = fields.get(bias_name.replace("_bias", "_weight"))
        if weight is None and self.x_shift is not None:
            raise ValueError(
                f"{bias_name} needs {bias_name.replace('_bias', '_weight')} beside it when x is "
                "shifted"
            )
        return weight


# ------------------------------------------------------------------------ exact rescaling
def _extreme_bounds(dtype: torch.dtype) -> tuple[float, float]:
    """Magnitudes beyond which products of four values over- or underflow ``dtype``."""
    info = torch.finfo(dtype)
    return info.max**0.25, info.tiny**0.25


def exact_scales(x, y, link) -> AffineMap | None:
    """Powers of two that bring extreme columns of ``x`` (and ``y``) to magnitude ~1.

    ``x``, ``y`` are tensors, or ``x`` is a :class:`pyromoe.core.sources.Source` (``y`` None):
    its summary's largest magnitudes are used.

    A column (or ``y``) is extreme when its largest magnitude is above ``finfo.max ** 0.25`` or
    below ``finfo.tiny ** 0.25`` (1.2e77 and 1.2e-77 in float64): the moments and Gram matrices
    take products of up to four values and would overflow (``linalg.eigh failed to converge``)
    or underflow. Dividing by a power of two is exact, so ordinary data are never touched
    (None: nothing to do) and rescaled data map back exactly (:func:`rescale_estimate`).

    Returns
    -------
    AffineMap or None
        ``x_scale`` (d,) (None when no column is extreme) and ``y_scale``; no shifts.

    Raises
    ------
    ValueError
        When ``y`` is extreme and the link is not positively homogeneous
        (``Link.positively_homogeneous``: tanh, sigmoid): ``y`` on that scale cannot come from the
        model; standardise it.
    """
    high, low = _extreme_bounds(x.dtype)
    if hasattr(x, "summary"):  # a Source: the largest magnitudes of its one summary pass
        summary = x.summary()
        peak, y_peak = summary.x_absmax.to(x.dtype), summary.y_absmax
    else:
        peak, y_peak = x.abs().amax(dim=0), float(y.abs().max())
    extreme = (peak > high) | ((peak > 0) & (peak < low))
    x_scale = None
    if bool(extreme.any()):
        exponents = torch.where(extreme, torch.round(torch.log2(peak)), torch.zeros_like(peak))
        x_scale = torch.ldexp(torch.ones_like(peak), exponents.to(torch.int32))
    y_scale = 1.0
    if y_peak > high or 0 < y_peak < low:
        if not link.positively_homogeneous:
            raise ValueError(
                f"y reaches {y_peak:.3g}, an extreme scale the {link.name} link cannot produce "
                f"(its outputs are bounded); standardise y (y - y.mean()) / y.std() or use "
                "link='linear'"
            )
        y_scale = math.ldexp(1.0, round(math.log2(y_peak)))
    if x_scale is None and y_scale == 1.0:
        return None
    return AffineMap(x_scale=x_scale, y_scale=y_scale)


def rescale_estimate(estimate, units: AffineMap, *, to_user: bool):
    """Map an estimate between the user's data and data rescaled by :func:`exact_scales`.

    ``to_user=True`` maps a fit on the rescaled data back (recording
    ``diagnostics["input_scaling"]``); ``False`` maps a start forward.

    Raises
    ------
    ValueError
        When the estimate does not fit in its dtype in the user's units.
    """
    fields = {name: getattr(estimate, name) for name in _FIELDS}
    if not to_user:
        return replace(estimate, **units.to_new(fields, estimate.link))
    values = units.to_original(fields, estimate.link)
    w = estimate.experts_weight
    xs = torch.ones_like(w[0]) if units.x_scale is None else units.x_scale.to(w)
    diagnostics = dict(estimate.diagnostics)
    diagnostics["input_scaling"] = {
        "x_scale": xs.tolist(),
        "y_scale": units.y_scale,
        "note": "x and y were divided by these powers of two (exact) before fitting; "
        "the other diagnostics refer to the rescaled data",
    }
    if not all(bool(torch.isfinite(value).all()) for value in values.values()):
        raise ValueError(
            "the estimate does not fit in "
            f"{str(w.dtype).replace('torch.', '')} in the units of x and y (x and y differ "
            "in scale by a factor near the largest float): standardise x and y, e.g. "
            "(x - x.mean(0)) / x.std(0), and fit again"
        )
    return replace(estimate, **values, diagnostics=diagnostics)


def _rescale(value, kind: str, units: AffineMap, link, *, to_user: bool):
    """``value`` of ``kind`` mapped by ``units``: ``"estimate"`` (:func:`rescale_estimate`),
    ``"params"`` (:class:`~pyromoe.core.params.Params`, absent entries stay absent) or a
    parameter's name (``"noise"``, ``"gate_weight"``, ...). ``None`` stays ``None``."""
    if value is None:
        return None
    if kind == "estimate":
        return rescale_estimate(value, units, to_user=to_user)
    mapped = units.to_original if to_user else units.to_new
    if kind == "params":
        return mapped(value, link)
    return mapped({kind: value}, link)[kind]


def on_exact_scale(result: str | Mapping[str, str], **kinds: str) -> Callable:
    """Decorate a fit so that data of extreme magnitude are fitted rescaled, and mapped back.

    The decorated function takes a ``source`` (a :class:`pyromoe.core.sources.Source`, read
    through its ``rescaled`` view) and a ``link`` (by those names). When :func:`exact_scales`
    finds nothing extreme it is called as it is. Otherwise it runs on the rescaled data, with each
    argument named in ``kinds`` mapped to that scale (``noise="noise"``, ``init="estimate"``,
    ``start="params"``; see :func:`_rescale`), and its result is mapped back:
    ``result="estimate"`` for an estimate (:func:`rescale_estimate`, which records
    ``diagnostics["input_scaling"]``), or ``{field: parameter name}`` for a dataclass whose named
    fields are mapped (``dataclasses.replace``).

    Raises
    ------
    ValueError
        As :func:`exact_scales` (extreme ``y`` for a bounded link) and :func:`rescale_estimate`.
    """

    def decorate(fit: Callable) -> Callable:
        signature = inspect.signature(fit)

        @functools.wraps(fit)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            arguments = bound.arguments
            link = arguments["link"]
            units = exact_scales(arguments["source"], None, link)
            if units is None:
                return fit(*args, **kwargs)
            arguments["source"] = arguments["source"].rescaled(units)
            for name, kind in kinds.items():
                if name in arguments:
                    arguments[name] = _rescale(arguments[name], kind, units, link, to_user=False)
            out = fit(*bound.args, **bound.kwargs)
            if isinstance(result, str):
                return _rescale(out, result, units, link, to_user=True)
            mapped = {
                name: _rescale(getattr(out, name), kind, units, link, to_user=True)
                for name, kind in result.items()
            }
            return replace(out, **mapped)

        return wrapper

    return decorate
