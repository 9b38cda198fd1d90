"""What the fits of :mod:`pyromoe.bayes.svi` (MAP, SVI) and :mod:`pyromoe.bayes.nuts` share.

Each fit takes ``init``: an :class:`pyromoe.MoEEstimate` (seeded start, via
:func:`pyromoe.init_to_moments`), ``None`` (Pyro's own default initialisation, for comparisons) or
any Pyro init strategy. Its arguments are checked once, before any work, by one table of rules
(:data:`_RULES`); the data come in through :func:`pyromoe.core.sources.as_source` on the requested
``device``; the output is InferenceData from :func:`pyromoe.bayes.to_arviz.to_inference_data`,
relabelled to the estimate, with ``attrs["init"]`` and ``attrs["seed"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._validation import (
    check_count,
    check_flag,
    check_model,
    check_positive,
    check_probability,
    check_seed,
)
from ..core.estimate import MoEEstimate
from ..core.sources import Source, as_source
from ..core.threads import check_num_threads
from .init_strategy import check_estimate_fits_model, init_to_moments, match_noise_model
from .to_arviz import to_inference_data

#: how each fit's argument is checked, by name: one table for every fit
_RULES: dict[str, Callable[[Any, str], Any]] = {
    "seed": check_seed,
    "num_threads": lambda value, name: check_num_threads(value, name),
    "subsample_size": lambda value, name: None if value is None else check_count(value, name, 1),
    "num_steps": lambda value, name: check_count(value, name, minimum=1),
    "num_chains": lambda value, name: check_count(value, name, minimum=1),
    "num_warmup": lambda value, name: check_count(value, name, minimum=0),
    "max_tree_depth": lambda value, name: check_count(value, name, minimum=1),
    "lr": check_positive,
    "target_accept_prob": check_probability,
    **{
        name: check_flag
        for name in ("progress", "align", "posterior_predictive", "gate_only", "jit_compile")
    },
}


def check_arguments(model, x, y, device=None, **arguments) -> tuple[Source, dict]:
    """``(source, {name: checked value})``: the model, the device and the data
    (:func:`pyromoe.core.sources.as_source`), then each argument by its rule in :data:`_RULES`,
    all before any work."""
    check_model(model)
    source = as_source(x, y, device=device, in_features=getattr(model, "in_features", None))
    checked = {name: _RULES[name](value, name) for name, value in arguments.items()}
    subsample_size = checked.get("subsample_size")
    if subsample_size is not None and subsample_size > source.num_rows:
        raise ValueError(
            f"subsample_size must be at most the number of rows n={source.num_rows}; got "
            f"{subsample_size}. Pass subsample_size=None for full-batch steps."
        )
    return source, checked


def prepare_init(model, init, x, y) -> tuple[Any, dict]:
    """``(init, attrs)``: an estimate moved to the data's device and reconciled with the model
    before any work (:func:`~pyromoe.bayes.init_strategy.match_noise_model`: its number of experts
    and inputs checked, its noise repeated or pooled to the model's noise model), and the attrs
    recording a conversion (``init_noise_conversion``); anything else as it is."""
    if not isinstance(init, MoEEstimate):
        return init, {}
    if init.experts_weight.device != x.device:
        init = init.to(device=x.device)
    init, note = match_noise_model(model, init, x, y)
    return init, ({} if note is None else {"init_noise_conversion": note})


def strategy_for(init, model, x, y) -> tuple[Callable | None, dict | None]:
    """(strategy or None for Pyro's default, latent site shapes when init is an estimate)."""
    if init is None:
        return None, None
    if isinstance(init, MoEEstimate):
        shapes = check_estimate_fits_model(model, x, y, init)
        return init_to_moments(estimate=init), shapes
    if callable(init):
        return init, None
    raise TypeError(
        "init must be a pyromoe.MoEEstimate, None (Pyro's default) or a Pyro init strategy; "
        f"got {type(init).__name__}"
    )


def inference_data(model, x, y, samples, init, align, seed, attrs, **kwargs):
    """InferenceData of any fit: relabelled to ``init`` when it is an estimate and ``align``;
    ``attrs`` gain how the fit was started (``init``) and its ``seed``."""
    started = "pyro_default" if init is None else getattr(init, "method", "strategy")
    return to_inference_data(
        model,
        x,
        y,
        samples,
        align=init if (align and isinstance(init, MoEEstimate)) else None,
        seed=seed,
        attrs={**attrs, "init": started, "seed": seed},
        **kwargs,
    )
