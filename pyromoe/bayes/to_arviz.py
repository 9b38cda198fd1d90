"""ArviZ conversion and label alignment for mixture-of-experts posteriors.

:func:`to_inference_data` turns posterior draws (NUTS, SVI or MAP) into an ArviZ ``InferenceData``
with the groups ``posterior``, ``sample_stats`` (when given), ``log_likelihood`` (pointwise, variable
``y``, for LOO), ``posterior_predictive`` (``y``), ``observed_data`` (``y``) and ``constant_data``
(``x``). Dimensions:

=====================  ==========================  ================================================
variable               dims                        coords
=====================  ==========================  ================================================
``experts.weight``     chain, draw, expert, feature  expert = 0..k-1, feature = 0..d-1 (or names)
``experts.bias``       chain, draw, expert
``gate.weight``        chain, draw, gate, feature    gate = 1..k-1: the expert whose logit the row
                                                     gives (expert 0 is the reference, logit 0)
``gate.bias``          chain, draw, gate
``noise``              chain, draw
``y``                  (chain, draw,) obs            obs = 0..n-1, or the rows the pointwise
                                                     budget keeps (:mod:`pyromoe.bayes.pointwise`)
``x``                  obs, feature
``z``                  obs, gate_feature             only for a model whose gate has covariates of
                                                     its own (``gate_features``): then the gate's
                                                     weights have dims chain, draw, gate,
                                                     gate_feature and ``x`` holds the experts' inputs
=====================  ==========================  ================================================

Label switching (docs/algorithm.md section 5): :func:`align_labels` relabels the experts of every draw to
match a reference estimate (optimal assignment on the expert weights), re-referencing the gate as
:meth:`pyromoe.MoEEstimate.permute` does, so that r_hat and per-expert summaries mean something.

ArviZ versions: tested with arviz 0.23.x (``from_dict(posterior=..., ...)`` returns
``InferenceData``). arviz >= 1.0 (``from_dict({group: {...}})`` returns a ``DataTree``) is handled by
the one adapter :func:`_from_dict`, written against arviz-base's documented signature but not tested
here (it needs Python >= 3.12).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import arviz as az
import numpy as np
import torch

from .._validation import (
    as_tensors,
    check_feature_names,
    check_flag,
    check_model,
    check_seed,
    count_rule,
    validate,
)
from ..core import sites
from ..core.estimate import MoEEstimate
from ..core.labels import align_labels, check_samples
from .init_strategy import match_noise_model
from .model import MODEL_ATTR
from .pointwise import evaluate, pointwise_rows, pointwise_rule

__all__ = ["to_inference_data", "chain_log_likelihood"]

#: the groups :func:`to_inference_data` writes (the log-likelihood and predictions on request)
GROUPS = (
    "posterior",
    "sample_stats",
    "log_likelihood",
    "posterior_predictive",
    "observed_data",
    "constant_data",
)

#: dims of the model's sites after (chain, draw)
SITE_DIMS: dict[str, list[str]] = {
    sites.EXPERTS_WEIGHT: ["expert", "feature"],
    sites.EXPERTS_BIAS: ["expert"],
    sites.GATE_WEIGHT: ["gate", "feature"],
    sites.GATE_BIAS: ["gate"],
    sites.NOISE: [],
}


# ------------------------------------------------------------------------------------ helpers
def _arviz_major() -> int:
    return int(az.__version__.split(".")[0])


def _from_dict(groups: dict[str, dict], *, coords: dict, dims: dict, attrs: dict):
    """ArviZ's own builder for both APIs: 0.x keyword groups, 1.x one dict of groups."""
    groups = {name: data for name, data in groups.items() if data}
    if _arviz_major() >= 1:  # pragma: no cover - needs arviz >= 1 (Python >= 3.12)
        return az.from_dict(groups, coords=coords, dims=dims, attrs={"/": attrs})
    return az.from_dict(**groups, coords=coords, dims=dims, attrs=attrs)


def _numpy(value: torch.Tensor) -> np.ndarray:
    return value.detach().cpu().numpy()


def chunk_slices(total: int, size: int):
    """``slice``s of at most ``size`` consecutive indices covering ``range(total)``."""
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


# ------------------------------------------------------------------------------------ conversion
def chain_log_likelihood(idata) -> np.ndarray:
    """Per-chain mean total log-likelihood ``mean_draws sum_obs log p(y_n | x_n, theta)``.

    A chain stuck in a wrong mode sits tens to hundreds of nats below the best chain
    (docs/algorithm.md section 5); this is the quickest way to see it.
    """
    return np.asarray(idata.attrs["chain_mean_log_likelihood"], dtype=float)


def _model_rule(model, name: str):
    """A model with ``log_likelihood`` and ``link`` (a class is refused with the fix)."""
    if isinstance(model, type):
        check_model(model)  # the class, not an instance: say so
    if not callable(getattr(model, "log_likelihood", None)) or not hasattr(model, "link"):
        raise TypeError(
            f"{name} must be a pyromoe.MixtureOfExperts (with .log_likelihood(x, y, params) and "
            f".link); got {type(model).__name__}"
        )
    return model


#: how :func:`to_inference_data` checks its arguments, once per call
TO_INFERENCE_DATA_RULES = {
    "model": _model_rule,
    "seed": check_seed,
    "chunk_size": count_rule(minimum=1),
    "log_likelihood": check_flag,
    "posterior_predictive": check_flag,
    "pointwise": pointwise_rule,
}


@validate(TO_INFERENCE_DATA_RULES)
def to_inference_data(
    model,
    x,
    y,
    samples: Mapping[str, Any],
    *,
    sample_stats: Mapping[str, Any] | None = None,
    log_likelihood: bool = True,
    posterior_predictive: bool = True,
    align: MoEEstimate | None = None,
    seed: int = 0,
    attrs: Mapping[str, Any] | None = None,
    feature_names: list[str] | None = None,
    chunk_size: int = 256,
    obs_index=None,
    pointwise: str | int = "auto",
):
    """Posterior draws of :class:`pyromoe.MixtureOfExperts` as ArviZ ``InferenceData``.

    Parameters
    ----------
    model : MixtureOfExperts
        The model the draws come from (its ``link`` and ``log_likelihood`` are used).
    x : Tensor or ndarray (n, d)
    y : Tensor or ndarray (n,)
    samples : dict of site -> array (chain, draw, ...)
        E.g. ``MCMC.get_samples(group_by_chain=True)``.
    sample_stats : dict of name -> array (chain, draw), optional
        Sampler statistics (``diverging``, ``step_size``, ``tree_depth``, ``n_steps``, ...).
    log_likelihood : bool
        Add the pointwise ``log_likelihood`` group (variable ``y``, dims chain, draw, obs).
    posterior_predictive : bool
        Add ``posterior_predictive`` (``y`` drawn once per posterior draw).
    align : MoEEstimate, optional
        Relabel the draws to this estimate first (:func:`align_labels`); recorded in ``attrs``
        (``labels_aligned``, ``num_draws_relabelled``).
    seed : int or None
        Seed of the private generator for the posterior predictive draws (``None``: a fresh one);
        recorded in ``attrs["posterior_predictive_seed"]`` when those draws are made.
    attrs : dict, optional
        Extra attributes (numbers, strings or lists of them).
    feature_names : list of str, optional
        Coordinates of the ``feature`` dim: ``d`` distinct strings. Default: the column labels of
        ``x`` when it is a pandas DataFrame with string labels, else 0..d-1.
    chunk_size : int
        Draws per chunk when computing the log-likelihood and predictions (at most
        :data:`~pyromoe.bayes.pointwise.BLOCK_CELLS` draws x rows at once: memory ~ that * k).
    obs_index : array of int (n,), optional
        Coordinates of the ``obs`` dim (default 0..n-1): the row numbers of ``x`` in a larger
        data set when ``x`` is a subsample of it.
    pointwise : "auto", "all" or int
        The rows the pointwise groups (``log_likelihood``, ``posterior_predictive``) and the
        data groups (``observed_data``, ``constant_data``) keep (:mod:`pyromoe.bayes.pointwise`):
        ``"auto"`` every row up to :data:`~pyromoe.bayes.pointwise.POINTWISE_CELLS` draws x
        rows, beyond it a random subsample of ``POINTWISE_CELLS // draws`` rows; an int ``m`` at
        most ``m`` rows; ``"all"`` every row. A subsample is seeded from ``seed``, stored in
        float32, and its rows (their numbers in ``x``, or ``obs_index`` of them) are the ``obs``
        coordinate and ``attrs["pointwise_rows"]``. Every row counts in the totals
        (``log_likelihood_total``, ``chain_mean_log_likelihood``) whatever ``pointwise`` is.

    Returns
    -------
    arviz.InferenceData
        Its ``attrs`` hold ``chain_mean_log_likelihood`` (per chain), ``pyromoe_model`` (the
        model's settings and ``feature_names`` as a JSON string,
        :meth:`pyromoe.MixtureOfExperts.settings`, which :func:`pyromoe.predict` and
        :func:`pyromoe.responsibilities` check the model against) and, with ``align``, the
        relabelling record, and the pointwise record: ``num_rows`` (n), ``pointwise`` (the
        setting), ``pointwise_num_rows`` (rows kept), ``pointwise_dtype`` and, for a subsample,
        ``pointwise_rows``; ``sample_stats`` gains ``log_likelihood_total`` (chain, draw).

    Raises
    ------
    TypeError
        If ``model`` lacks ``log_likelihood``/``link`` or ``samples`` is not a dict of arrays.
    ValueError
        If the draws' shapes do not match the model's sites, or ``feature_names`` is not ``d``
        distinct strings.

    Examples
    --------
    >>> from pyromoe import MixtureOfExperts, simulate
    >>> data = simulate(50, 2, seed=0)
    >>> model = MixtureOfExperts(2, 2, bias=False)
    >>> draws = {k: v.expand(1, 4, *v.shape) for k, v in data.truth.site_values(bias=False).items()}
    >>> idata = to_inference_data(model, data.x, data.y, draws)
    >>> idata.posterior["experts.weight"].dims
    ('chain', 'draw', 'expert', 'feature')
    """
    frame = x
    x, y = as_tensors(
        x, y, in_features=getattr(model, "design_features", getattr(model, "in_features", None))
    )
    if y is None:
        raise ValueError("y must be given (the observed outputs)")
    feature_names = check_feature_names(feature_names, x.shape[1], frame)
    return inference_data_of(
        model,
        x,
        y,
        samples,
        sample_stats=sample_stats,
        log_likelihood=log_likelihood,
        posterior_predictive=posterior_predictive,
        align=align,
        seed=seed,
        attrs=attrs,
        feature_names=feature_names,
        chunk_size=chunk_size,
        obs_index=obs_index,
        pointwise=pointwise,
    )


def inference_data_of(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    samples: Mapping[str, Any],
    *,
    seed: int,
    sample_stats: Mapping[str, Any] | None = None,
    log_likelihood: bool = True,
    posterior_predictive: bool = True,
    align: MoEEstimate | None = None,
    attrs: Mapping[str, Any] | None = None,
    feature_names: list[str] | None = None,
    chunk_size: int = 256,
    obs_index=None,
    pointwise: str | int = "auto",
):
    """:func:`to_inference_data` on checked arguments and checked tensors ``x``, ``y`` (what the
    fits call: their data and arguments were checked once, at their own entry)."""
    draws = check_samples(samples, x, getattr(model, "site_shapes", None))
    num_chains, num_draws = draws[next(iter(draws))].shape[:2]
    draws, record = _relabel(model, draws, align, x, y)
    settings_json = getattr(model, "settings_json", None)
    if callable(settings_json):  # the model the draws come from, for predict to check
        record[MODEL_ATTR] = settings_json(feature_names)
    generator = torch.Generator(device=x.device).manual_seed(int(seed))
    kept = _pointwise(
        model,
        x,
        y,
        draws,
        pointwise,
        seed,
        chunk_size,
        log_likelihood,
        generator if posterior_predictive else None,
        obs_index,
    )
    record.update(kept.record)
    stats = _sample_stats(sample_stats, num_chains, num_draws)
    stats["log_likelihood_total"] = _numpy(kept.totals)
    chain_means = kept.totals.mean(-1)
    all_attrs = {
        "chain_mean_log_likelihood": chain_means.tolist(),
        "chain_log_likelihood_gap": (chain_means.max() - chain_means).tolist(),
        **record,
        **({"posterior_predictive_seed": seed} if posterior_predictive else {}),
        **dict(attrs or {}),
    }
    groups = {
        "posterior": {name: _numpy(value) for name, value in draws.items()},
        "sample_stats": stats,
        "log_likelihood": {sites.OBS: kept.pointwise} if log_likelihood else None,
        "posterior_predictive": {sites.OBS: kept.predicted} if posterior_predictive else None,
        "observed_data": {sites.OBS: _numpy(kept.y)},
        "constant_data": _constant_data(model, kept.x),
    }
    coords, dims = _coords_and_dims(
        draws, kept.x, feature_names, kept.obs_index, getattr(model, "gate_features", None)
    )
    return _from_dict(groups, coords=coords, dims=dims, attrs=all_attrs)


def _relabel(model, draws: dict, align: MoEEstimate | None, x, y) -> tuple[dict, dict]:
    """``(draws, attrs)``: the draws relabelled to ``align`` when given, and the record of it."""
    if align is None:
        return draws, {"labels_aligned": 0}
    # a reference with the other noise model labels the draws as well (its noise is unused)
    align, _ = match_noise_model(model, align, x, y)
    draws, info = align_labels(draws, align)
    return draws, {
        "labels_aligned": 1,
        "label_alignment": "optimal assignment of experts.weight to the reference estimate",
        "label_reference": align.method,
        "num_draws_relabelled": info["num_draws_relabelled"],
        "num_draws_relabelled_per_chain": info["num_draws_relabelled_per_chain"],
    }


class _Kept(NamedTuple):
    """What :func:`_pointwise` keeps: the per-draw totals (chain, draw) over every row, the kept
    rows' data, their ``obs`` coordinates, the pointwise arrays (chain, draw, kept rows) or None,
    and the attrs recording the choice."""

    totals: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    obs_index: np.ndarray | None
    pointwise: np.ndarray | None
    predicted: np.ndarray | None
    record: dict


def _pointwise(
    model, x, y, draws: dict, pointwise, seed, chunk_size, keep, generator, obs_index
) -> _Kept:
    """The totals over every row and the pointwise groups on the rows ``pointwise`` keeps
    (:func:`~pyromoe.bayes.pointwise.pointwise_rows`): all of them in ``x``'s dtype, or a
    subsample, evaluated on its own (never draws x n at once) and kept in float32."""
    num_chains, num_draws = draws[next(iter(draws))].shape[:2]
    flat = {name: value.reshape(-1, *value.shape[2:]) for name, value in draws.items()}
    n = x.shape[0]
    rows = pointwise_rows(pointwise, n, num_chains * num_draws, seed)
    options = dict(chunk_size=chunk_size, keep=keep, generator=generator)
    if obs_index is not None:
        obs_index = np.asarray(obs_index)
        if obs_index.shape != (n,):
            raise ValueError(f"obs_index must have n={n} entries; got shape {obs_index.shape}")
    record = {"num_rows": n, "pointwise": str(pointwise)}
    if rows is None:
        dtype = _numpy(x[:0]).dtype
        totals, values, predicted = evaluate(model, x, y, flat, dtype=dtype, **options)
    else:
        totals, _, _ = evaluate(
            model, x, y, flat, chunk_size=chunk_size, keep=False, generator=None, dtype=np.float32
        )
        index = rows.to(x.device)
        x, y = x.index_select(0, index), y.index_select(0, index)
        dtype = np.dtype(np.float32)
        _, values, predicted = evaluate(model, x, y, flat, dtype=dtype, **options)
        obs_index = rows.numpy() if obs_index is None else obs_index[rows.numpy()]
        record["pointwise_rows"] = obs_index.tolist()
    record.update(pointwise_num_rows=int(x.shape[0]), pointwise_dtype=str(dtype))
    shape = (num_chains, num_draws, x.shape[0])
    return _Kept(
        totals.reshape(num_chains, num_draws),
        x,
        y,
        obs_index,
        None if values is None else values.reshape(shape),
        None if predicted is None else predicted.reshape(shape),
        record,
    )


def _sample_stats(sample_stats: Mapping | None, num_chains: int, num_draws: int) -> dict:
    """The sampler's statistics as numpy arrays, each checked to be (chain, draw)."""
    stats = {
        name: np.asarray(_numpy(value) if isinstance(value, torch.Tensor) else value)
        for name, value in (sample_stats or {}).items()
    }
    for name, value in stats.items():
        if value.shape[:2] != (num_chains, num_draws):
            raise ValueError(
                f"sample_stats[{name!r}] must have shape (chain, draw) = {(num_chains, num_draws)}; "
                f"got {value.shape}"
            )
    return stats


def _constant_data(model, x: torch.Tensor) -> dict:
    """``x`` (obs, feature); with a gate on covariates of its own, ``x`` the experts' inputs and
    ``z`` (obs, gate_feature) the gate's."""
    gate_features = getattr(model, "gate_features", None)
    if gate_features is None:
        return {"x": _numpy(x)}
    d = x.shape[1] - gate_features
    return {"x": _numpy(x[:, :d]), "z": _numpy(x[:, d:])}


def _coords_and_dims(
    draws: dict, x, feature_names, obs_index, gate_features: int | None = None
) -> tuple[dict, dict]:
    """The ``coords`` and ``dims`` of the groups (table in the module docstring)."""
    n, total = x.shape
    names = np.asarray(feature_names) if feature_names is not None else np.arange(total)
    d = total - (gate_features or 0)
    coords: dict[str, Any] = {
        "obs": np.arange(n) if obs_index is None else obs_index,
        "feature": names[:d],
    }
    if gate_features is not None:
        coords["gate_feature"] = (
            names[d:] if feature_names is not None else np.arange(gate_features)
        )
    if sites.EXPERTS_WEIGHT in draws:
        k = int(draws[sites.EXPERTS_WEIGHT].shape[-2])
        coords["expert"] = np.arange(k)
        coords["gate"] = np.arange(1, k)
    dims = {name: SITE_DIMS[name] for name in draws if name in SITE_DIMS}
    if sites.NOISE in draws and np.ndim(draws[sites.NOISE]) == 3:
        dims[sites.NOISE] = ["expert"]  # one noise sd per expert: (chain, draw, expert)
    dims.update({sites.OBS: ["obs"], "x": ["obs", "feature"]})
    if gate_features is not None:
        dims[sites.GATE_WEIGHT] = ["gate", "gate_feature"]
        dims["z"] = ["obs", "gate_feature"]
    return coords, dims
