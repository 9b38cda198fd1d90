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

import warnings
from collections.abc import Callable
from typing import Any

from .._validation import (
    Rule,
    check_feature_names,
    check_flag,
    check_positive,
    check_probability,
    check_seed,
    count_rule,
    model_rule,
    optional,
    pandas_feature_names,
    user_stacklevel,
)
from ..core.design import as_design_source
from ..core.estimate import MoEEstimate
from ..core.sources import Source, as_source
from ..core.threads import check_num_threads
from .init_strategy import check_estimate_fits_model, init_to_moments, match_noise_model
from .to_arviz import inference_data_of
from .user_model import UserModel, find_mixture, is_mixture

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


def fit_source(model, x, y, device=None, subsample_size: int | None = None, z=None) -> Source:
    """The fit's data as a :class:`~pyromoe.core.sources.Source` on ``device``
    (:func:`~pyromoe.core.sources.as_source`, ``x`` with the model's ``in_features`` columns, or
    its whole design ``[x | z]`` when the model's gate has covariates of its own, which ``z``
    gives apart), and a checked ``subsample_size`` of at most its rows."""
    gate_features = getattr(model, "gate_features", None)
    if z is not None:
        if gate_features is None:
            raise ValueError(
                "z is given but the model's gate reads x; build the model with "
                "MixtureOfExperts(..., gate_features=z.shape[1])"
            )
        source, width = as_design_source(
            x, y, z, device=device, in_features=getattr(model, "in_features", None)
        )
        if width != gate_features:
            raise ValueError(f"z must have gate_features={gate_features} columns; got {width}")
    else:
        width = getattr(model, "design_features", getattr(model, "in_features", None))
        source = as_source(x, y, device=device, in_features=width)
    if subsample_size is not None and subsample_size > source.num_rows:
        raise ValueError(
            f"subsample_size must be at most the number of rows n={source.num_rows}; got "
            f"{subsample_size}. Pass subsample_size=None for full-batch steps."
        )
    warn_if_unstandardised(model, source)
    return source


class UnstandardisedDataWarning(UserWarning):
    """The data are far from standardised while the model keeps default priors, which are weakly
    informative for standardised data only (:data:`pyromoe.bayes.model.DEFAULT_PRIOR_SCALES`)."""


#: A column (or y) counts as standardised when its sd lies in this range and its mean within
#: :data:`STANDARDISED_MEAN` of 0; beyond, the default priors pull the fit (the intercepts' and the
#: noise's most).
STANDARDISED_SD = (0.1, 10.0)
STANDARDISED_MEAN = 10.0


def warn_if_unstandardised(model, source: Source) -> None:
    """Warn (:class:`UnstandardisedDataWarning`) when a default prior meets data far from
    standardised: a column of ``x`` or ``y`` with sd outside :data:`STANDARDISED_SD` or mean
    beyond :data:`STANDARDISED_MEAN`. The message names them and the two fixes."""
    priors = getattr(model, "priors", None)
    shapes = getattr(model, "site_shapes", None)
    if priors is None or shapes is None or all(name in priors for name in shapes):
        return
    summary = source.summary()
    low, high = STANDARDISED_SD

    def off(mean: float, sd: float) -> bool:
        return not (low <= sd <= high) or abs(mean) > STANDARDISED_MEAN

    means, sds = summary.x_mean.tolist(), summary.x_sd.tolist()
    columns = [j for j, (mean, sd) in enumerate(zip(means, sds)) if off(mean, sd)]
    parts = []
    if columns:
        shown = ", ".join(f"{j} (mean {means[j]:.3g}, sd {sds[j]:.3g})" for j in columns[:4])
        parts.append(f"x column(s) {shown}{', ...' if len(columns) > 4 else ''}")
    if off(summary.y_mean, summary.y_sd):
        parts.append(f"y (mean {summary.y_mean:.3g}, sd {summary.y_sd:.3g})")
    if parts:
        warnings.warn(
            f"the data are far from standardised ({'; '.join(parts)}) but the model keeps "
            "default priors, which are written for standardised data (each column and y with "
            "mean 0 and sd 1) and pull this fit: standardise x and y, fit in the data's own units "
            "with pyromoe.MoERegression (it standardises inside and reports in data units), or "
            "set priors= for this scale",
            UnstandardisedDataWarning,
            stacklevel=user_stacklevel(),
        )


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
    if isinstance(model, UserModel):  # what the fit's model was, beside its mixture's record
        attrs = {**model.attrs(), **attrs}
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


def fit_data(model, x, y, z, device, subsample_size=None, feature_names=None):
    """``(source, feature_names)``: :func:`fit_source` and :func:`design_feature_names`, what
    every fit checks of its data first."""
    source = fit_source(model, x, y, device, subsample_size, z=z)
    return source, design_feature_names(feature_names, model, x, z)


#: rows of out-of-core data a user's model is traced on to find its mixture
_TRACE_ROWS = 256


def fit_model_data(
    model, x, y, z, device, subsample_size=None, feature_names=None, importance_resample=False
):
    """``(model, source, feature_names)``: :func:`fit_data` for a mixture; for a user's model
    around one, the model as a :class:`~pyromoe.bayes.user_model.UserModel` (its mixture found
    by tracing it on the data, :func:`~pyromoe.bayes.user_model.find_mixture`), its data
    checked against the mixture. A user's model is called as ``model(x, y)``: ``z`` and
    ``subsample_size`` (keyword arguments it may not take) are refused, and so is
    ``importance_resample`` (its log joint is not computed here, for PSIS)."""
    if is_mixture(model):
        return model, *fit_data(model, x, y, z, device, subsample_size, feature_names)
    if importance_resample:
        raise ValueError(
            "importance_resample=True weighs the draws by a bare MixtureOfExperts' log joint; "
            "your own model's is not computed here (its psis_khat is nan): leave it False"
        )
    for given, what in ((z, "z"), (subsample_size, "subsample_size")):
        if given is not None:
            raise ValueError(
                f"{what}= is for a bare MixtureOfExperts: your own model is called as "
                "model(x, y) with all rows (for a gate with covariates of its own pass the "
                "joined design torch.cat([x, z], 1) as x)"
            )
    source = as_source(x, y, device=device)
    tensors = source.tensors()
    found = find_mixture(model, *(tensors if tensors is not None else source.head(_TRACE_ROWS)))
    source = fit_source(found, x, y, device)
    return found, source, design_feature_names(feature_names, found, x)


def design_feature_names(feature_names, model, x, z=None) -> list[str] | None:
    """The names of the design's columns: the experts' inputs, then (a model whose gate has
    covariates of its own) the gate's. Given names are checked part by part (each part's names
    distinct); else the labels of DataFrames ``x`` and ``z``."""
    gate_features = getattr(model, "gate_features", None)
    d = getattr(model, "in_features", None)
    if gate_features is None:
        return check_feature_names(feature_names, d if d is not None else x.shape[1], x)
    if feature_names is None:
        experts = pandas_feature_names(x)
        gate = pandas_feature_names(z) if z is not None else None
        return experts + gate if experts is not None and gate is not None else None
    names = list(feature_names)
    if len(names) != d + gate_features:
        raise ValueError(
            f"feature_names must name the {d} inputs of the experts and the {gate_features} "
            f"covariates of the gate ({d + gate_features} names); got {len(names)}"
        )
    return check_feature_names(names[:d], d) + check_feature_names(names[d:], gate_features)
