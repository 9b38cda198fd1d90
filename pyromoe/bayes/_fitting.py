"""What the fits of :mod:`pyromoe.bayes.svi` (MAP, SVI) and :mod:`pyromoe.bayes.nuts` share.

Each fit takes ``init``: an :class:`pyromoe.MoEEstimate` (seeded start, via
:func:`pyromoe.init_to_moments`), ``None`` (Pyro's own default initialisation, for comparisons) or
any Pyro init strategy. Its arguments are checked once, before any work, by its table of rules
(:func:`fit_rules`: the rules the fits share, :data:`RULES`, by name, and its own) and the
decorator :func:`pyromoe._validation.validate`; the data come in through
:func:`pyromoe.core.sources.as_source` on the requested ``device`` (:func:`fit_source`); the output
is InferenceData from :func:`pyromoe.bayes.to_arviz.inference_data_of`, relabelled to the
estimate, with ``attrs["init"]`` and ``attrs["seed"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._validation import (
    Rule,
    check_flag,
    check_positive,
    check_probability,
    check_seed,
    count_rule,
    model_rule,
    optional,
)
from ..core.estimate import MoEEstimate
from ..core.sources import Source, as_source
from ..core.threads import check_num_threads
from .init_strategy import check_estimate_fits_model, init_to_moments, match_noise_model
from .to_arviz import inference_data_of

#: how the fits check their arguments, by name: each fit's table takes its own from here
RULES: dict[str, Rule] = {
    "model": model_rule,
    "seed": check_seed,
    "num_threads": check_num_threads,
    "subsample_size": optional(count_rule(minimum=1)),
    "num_steps": count_rule(minimum=1),
    "num_chains": count_rule(minimum=1),
    "num_warmup": count_rule(minimum=0),
    "max_tree_depth": count_rule(minimum=1),
    "lr": check_positive,
    "target_accept_prob": check_probability,
    **{
        name: check_flag
        for name in ("progress", "align", "posterior_predictive", "gate_only", "jit_compile")
    },
}


def fit_rules(*names: str, **own: Rule) -> dict[str, Rule]:
    """One fit's table of rules: the model's, then the shared :data:`RULES` of ``names``, then the
    fit's ``own``, in this order (the order of the checks)."""
    return {"model": RULES["model"], **{name: RULES[name] for name in names}, **own}


def fit_source(model, x, y, device=None, subsample_size: int | None = None) -> Source:
    """The fit's data as a :class:`~pyromoe.core.sources.Source` on ``device``
    (:func:`~pyromoe.core.sources.as_source`, ``x`` with the model's ``in_features`` columns), and
    a checked ``subsample_size`` of at most its rows."""
    source = as_source(x, y, device=device, in_features=getattr(model, "in_features", None))
    if subsample_size is not None and subsample_size > source.num_rows:
        raise ValueError(
            f"subsample_size must be at most the number of rows n={source.num_rows}; got "
            f"{subsample_size}. Pass subsample_size=None for full-batch steps."
        )
    return source


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
    return inference_data_of(
        model,
        x,
        y,
        samples,
        align=init if (align and isinstance(init, MoEEstimate)) else None,
        seed=seed,
        attrs={**attrs, "init": started, "seed": seed},
        **kwargs,
    )
