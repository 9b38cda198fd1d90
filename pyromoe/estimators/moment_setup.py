"""What :func:`pyromoe.tensor_init` and :func:`pyromoe.initialize` share about the moment step: its
settings (:class:`MomentOptions`, from their checked arguments and the data), when it applies
(:class:`MomentsNotApplicableError`, :func:`minimum_rows`) and the columns it reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._validation import (
    check_enough_rows,
    check_noise_model,
    check_positive,
    num_parameters,
    user_stacklevel,
)
from ..core.chunks import default_chunk_size
from ..core.design import as_design_source, select_columns
from ..core.sources import Source

__all__ = [
    "MomentOptions",
    "MomentsNotApplicableError",
    "check_moments_apply",
    "minimum_rows",
    "moment_arguments",
    "moment_source",
    "noise_rule",
]


class MomentsNotApplicableError(ValueError):
    """The moment (tensor) start cannot apply to these data (``k > d``, too few rows for the
    moments, T2 of rank below k, constant or collinear inputs); ``initialize(method="auto")``
    falls back to multi-start EM on this error, and on no other."""


def minimum_rows(in_features: int, num_experts: int | None = None) -> int:
    """Rows :func:`tensor_init` needs: ``max(100, 2 d^2)`` (T2 has d(d+1)/2 entries to estimate).

    With ``num_experts``, also at least the model's free parameters + 1
    (:func:`pyromoe._validation.num_parameters`), which every point estimate needs.
    """
    need = max(100, 2 * int(in_features) ** 2)
    if num_experts is not None:
        need = max(need, num_parameters(int(in_features), int(num_experts)) + 1)
    return need


@dataclass(frozen=True)
class MomentOptions:
    """The checked settings :func:`tensor_init` and :func:`pyromoe.initialize` share: what the
    private functions below them trust.

    Attributes
    ----------
    num_experts : int
    chunk_size : int
        Rows per chunk of every pass over the data.
    seed : int
    noise_model : {"shared", "per_expert"}
        The noise model of the EM fits (the moment step and gate EM assume one shared sd).
    gate_features : int or None
        The design's last ``gate_features`` columns are the gate's own covariates (None: the
        gate reads the experts' inputs).
    moment_columns : tuple of int or None
        The experts' columns the moment step reads (None: all of them); the others start at 0.
    gate_gain_tol : float or None
        The gate EM's stop (nats left, extrapolated, summed over its rows); None:
        :data:`pyromoe.estimators.tensor_init.GATE_GAIN_TOL`. ``initialize``'s guard, where
        joint EM follows on the same rows, stops it sooner.
    """

    num_experts: int
    chunk_size: int
    seed: int
    noise_model: str = "shared"
    gate_features: int | None = None
    moment_columns: tuple[int, ...] | None = None
    gate_gain_tol: float | None = None

    @property
    def layout(self) -> dict:
        """The keyword that tells :func:`~pyromoe.fit_em` / :func:`~pyromoe.fit_gate` the
        design's layout (``gate_features``)."""
        return {"gate_features": self.gate_features}


def noise_rule(noise, name: str) -> float | str | None:
    """``noise`` of :func:`tensor_init` and :func:`pyromoe.initialize`: a known noise sd (a number
    > 0), None, or a noise model name (``"shared"`` / ``"per_expert"``)."""
    if isinstance(noise, str):
        return check_noise_model(noise, name)
    return None if noise is None else check_positive(noise, name)


def moment_arguments(
    x,
    y,
    num_experts: int,
    noise: float | str | None,
    chunk_size: int | None,
    seed: int,
    device=None,
    layout: dict | None = None,
):
    """The data and settings :func:`tensor_init` and :func:`pyromoe.estimators.initialize.initialize`
    share, from their checked arguments: ``(source, noise, options)`` with :class:`MomentOptions`.

    ``noise`` checked by :func:`noise_rule`: a model name gives the options' ``noise_model`` and
    a known sd of None. ``layout``: ``z``, ``gate_features`` and ``moment_columns`` as the
    entries take them (checked here, with the data).
    """
    layout = layout or {}
    source, gate_features = as_design_source(
        x, y, layout.get("z"), gate_features=layout.get("gate_features"), device=device
    )
    moment_columns = _check_moment_columns(
        layout.get("moment_columns"), source.in_features - (gate_features or 0)
    )
    noise_model = "shared"
    if isinstance(noise, str):
        noise_model, noise = noise, None
    options = MomentOptions(
        num_experts=num_experts,
        chunk_size=default_chunk_size(source.in_features) if chunk_size is None else chunk_size,
        seed=seed,
        noise_model=noise_model,
        gate_features=gate_features,
        moment_columns=moment_columns,
    )
    return source, noise, options


def _check_moment_columns(columns, experts_width: int) -> tuple[int, ...] | None:
    """``moment_columns`` as a tuple of distinct positions among the experts' inputs, or None
    (all of them)."""
    if columns is None:
        return None
    if isinstance(columns, (str, bytes)) or not hasattr(columns, "__iter__"):
        raise TypeError(f"moment_columns must be a sequence of column positions; got {columns!r}")
    values = list(columns)
    if values and all(isinstance(v, (bool, np.bool_)) for v in values):  # a boolean mask
        if len(values) != experts_width:
            raise ValueError(
                f"moment_columns as a mask needs one flag per input of the experts "
                f"({experts_width}); got {len(values)}"
            )
        values = [i for i, flag in enumerate(values) if flag]
    if not values:  # every input is, e.g., a factor's column: no moment step (initialize: EM)
        return ()
    positions = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"moment_columns must hold int positions; got {value!r}")
        if not 0 <= int(value) < experts_width:
            raise ValueError(
                f"moment_columns must be positions 0 to {experts_width - 1}; got {int(value)}"
            )
        positions.append(int(value))
    if len(set(positions)) != len(positions):
        raise ValueError(f"moment_columns must not repeat a position; got {positions}")
    if positions == list(range(experts_width)):
        return None
    return tuple(positions)


def check_moments_apply(source: Source, k: int) -> None:
    """Refuse data the moment step cannot use (:class:`MomentsNotApplicableError`), too few rows
    for any estimate, and a constant ``y``."""
    n, d = source.shape
    if k > d:
        raise MomentsNotApplicableError(
            f"num_experts={k} exceeds in_features={d}: the moment method needs num_experts <= "
            "in_features (T2 has rank at most d). Use pyromoe.fit_em with several random starts."
        )
    parameters, need = num_parameters(d, k), minimum_rows(d, k)
    if parameters < n < need:  # enough rows for a point estimate, too few for the moments
        raise MomentsNotApplicableError(
            f"x has {n} rows; tensor_init needs at least {need} rows for {d} features "
            f"(max(100, 2 d^2)) to estimate the moments. Use pyromoe.fit_em for small data."
        )
    check_enough_rows(
        n,
        parameters,
        k,
        model=f"a mixture of {k} experts on {d} input(s) with biases",
        stacklevel=user_stacklevel(1),
    )
    summary = source.summary()
    if not summary.y_sd > 1e-12 * (1.0 + summary.y_absmax):
        raise ValueError(
            f"y is constant (every value is {summary.y_first:.6g}): there is nothing for the "
            "experts to explain. Check that y is the response column."
        )


def moment_source(source: Source, options: MomentOptions) -> Source:
    """The columns the moment step reads: the experts' inputs (not the gate's own covariates),
    restricted to ``options.moment_columns``."""
    experts = source.in_features - (options.gate_features or 0)
    columns = range(experts) if options.moment_columns is None else options.moment_columns
    if not columns:
        raise MomentsNotApplicableError(
            "moment_columns selects no input: the moment step needs continuous (Gaussian-like) "
            "inputs and every input here is left out (e.g. a factor's 0/1 columns)"
        )
    return select_columns(source, columns)
