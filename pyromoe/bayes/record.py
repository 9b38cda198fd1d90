"""What an InferenceData records of its fit's model, and the checks of a model and of new data
against that record (:func:`pyromoe.predict`, :func:`pyromoe.responsibilities`).

:func:`pyromoe.bayes.to_arviz.to_inference_data` writes the model's settings, priors and feature
names to ``idata.attrs[MODEL_ATTR]`` as JSON; a model that differs in what the draws mean is
refused, other priors warn, and a DataFrame's columns are put in the fit's order by name.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping

from .._validation import _is_pandas, user_stacklevel
from .model import MODEL_ATTR, MixtureOfExperts

__all__ = ["check_model_matches", "columns_by_name", "recorded_feature_names"]

#: the settings of the model that change what the posterior's draws mean: a model that differs
#: from the recorded one in any of them is refused
_STRUCTURAL_SETTINGS = ("num_experts", "in_features", "gate_features", "link", "bias", "noise")


def _recorded_model(idata) -> dict | None:
    """The model settings ``idata.attrs[MODEL_ATTR]`` records (a dict), or None for an idata
    written before pyromoe recorded them (or by something else)."""
    attrs = getattr(idata, "attrs", None)
    text = attrs.get(MODEL_ATTR) if isinstance(attrs, Mapping) else None
    if text is None:
        return None
    try:
        record = json.loads(text)
    except (TypeError, ValueError):
        record = None
    if not isinstance(record, dict):
        raise ValueError(
            f"idata.attrs[{MODEL_ATTR!r}] must be the JSON record of the fit's model that "
            f"pyromoe writes; got {str(text)[:80]!r}. Delete the attribute to skip the check "
            f"(del idata.attrs[{MODEL_ATTR!r}])"
        )
    return record


def _constructor(record: Mapping) -> str:
    """``MixtureOfExperts(...)`` with the recorded settings, as a hint."""
    link = record.get("link")
    shown = f"link={link!r}"
    if isinstance(link, str) and link.startswith("leaky_relu("):
        shown = f"link=pyromoe.core.links.leaky_relu({link[len('leaky_relu(') : -1]})"
    return (
        f"MixtureOfExperts({record.get('in_features')}, {record.get('num_experts')}, {shown}, "
        f"bias={record.get('bias')}, noise={record.get('noise')!r}"
        + (f", gate_features={record['gate_features']})" if record.get("gate_features") else ")")
    )


def check_model_matches(model: MixtureOfExperts, idata) -> dict | None:
    """Refuse a model whose settings differ from those ``idata`` records; return the record.

    The settings that change what the draws mean (:data:`_STRUCTURAL_SETTINGS`) must be equal;
    other priors only warn (the posterior's draws are what they are; predictions do not use the
    priors). An idata without a record (an older file) is not checked.
    """
    record = _recorded_model(idata)
    if record is None:
        return None
    mine = model.settings()
    differing = [
        f"{key}: the fit's model has {record[key]!r}, this model has {mine[key]!r}"
        for key in _STRUCTURAL_SETTINGS
        if key in record and record[key] != mine[key]
    ]
    if differing:
        raise ValueError(
            f"model differs from the model idata was fitted with ({'; '.join(differing)}). Pass "
            f"the fit's model, {_constructor(record)} (recorded in "
            f"idata.attrs[{MODEL_ATTR!r}])"
        )
    priors = record.get("priors")
    if isinstance(priors, Mapping):
        changed = [
            f"{site}: fitted with {priors[site]}, this model has {mine['priors'][site]}"
            for site in mine["priors"]
            if site in priors and priors[site] != mine["priors"][site]
        ]
        if changed:
            warnings.warn(
                f"model's priors differ from those idata was fitted with ({'; '.join(changed)}); "
                "the results use idata's posterior draws, which came from the recorded priors",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
    return record


def recorded_feature_names(record: Mapping | None, posterior) -> list[str] | None:
    """The inputs' names of the fit: recorded with the model, else the posterior's ``feature``
    coords when they are strings; None when the fit had no names."""
    names = None if record is None else record.get("feature_names")
    if names is None and "feature" in posterior.coords:
        coords = [value.item() for value in posterior["feature"].values]
        if coords and all(isinstance(value, str) for value in coords):
            names = coords
    return None if names is None else [str(name) for name in names]


def columns_by_name(x, names: list[str] | None, argument: str):
    """A DataFrame ``x`` with string column labels, its columns put in the fit's order ``names``;
    anything else (arrays, tensors, unnamed columns, a fit without names) as it is: by position.

    Raises
    ------
    ValueError
        The labels are not the fit's names: unknown or missing ones (named), or repeated ones.
    """
    if names is None or not (_is_pandas(x) and hasattr(x, "columns")):
        return x
    columns = list(x.columns)
    if not columns or not all(isinstance(column, str) for column in columns):
        return x  # no names to match: by position, as for an array
    repeated = sorted({column for column in columns if columns.count(column) > 1})
    unknown = [column for column in columns if column not in names]
    missing = [name for name in names if name not in columns]
    problems = [
        f"{kind} columns {labels}"
        for kind, labels in (("unknown", unknown), ("missing", missing), ("repeated", repeated))
        if labels
    ]
    if problems:
        raise ValueError(
            f"{argument} has {', '.join(problems)}; its columns are matched by name to the "
            f"features the model was fitted on, {names}. Pass {argument}[{names!r}] (after "
            "renaming), or a numpy array to match by position"
        )
    return x if columns == names else x[names]
