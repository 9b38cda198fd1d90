"""What a saved fit records beside its InferenceData: ``model.json`` (formulas, k, link, noise,
priors as JSON) and ``specification.json``; and the priors' JSON form both ways."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..spec.formula import ModelSpecification

__all__ = ["MODEL_FILE", "SPECIFICATION_FILE", "SAVE_FORMAT", "write_fit_record"]

#: The files of a saved fit beside ``inference_data.nc``.
SPECIFICATION_FILE = "specification.json"
MODEL_FILE = "model.json"
SAVE_FORMAT = 1


def write_fit_record(
    folder: Path,
    specification: ModelSpecification,
    *,
    num_experts: int,
    link: str,
    noise: str,
    method: str | None,
    formula: str | None = None,
    gate: str | None = None,
    priors: dict | None = None,
) -> None:
    """Write ``specification.json`` and ``model.json`` into a results folder being built: with
    its ``inference_data.nc``, what :func:`load` reads back."""
    from .atomic import write_text_atomic

    record = {
        "format": SAVE_FORMAT,
        "formula": specification.formula if formula is None else formula,
        "gate": gate,
        "num_experts": int(num_experts),
        "link": link if isinstance(link, str) else link.name,
        "noise": noise,
        "priors": priors,
        "method": method,
    }
    write_text_atomic(folder / SPECIFICATION_FILE, specification.to_json() + "\n")
    write_text_atomic(folder / MODEL_FILE, json.dumps(record, indent=1) + "\n")


def _checked_priors(priors) -> dict[str, Any] | None:
    """``priors`` as JSON-able data: a float scale, or a distribution's name and parameters."""
    if priors is None:
        return None
    if not isinstance(priors, dict):
        raise TypeError(f"priors must be a dict of site name -> prior or None; got {priors!r}")
    record: dict[str, Any] = {}
    for name, prior in priors.items():
        if isinstance(prior, (int, float)) and not isinstance(prior, bool):
            if not (math.isfinite(prior) and prior > 0):
                raise ValueError(f"priors['{name}'] as a number is a scale: positive; got {prior}")
            record[name] = float(prior)
        elif isinstance(prior, dict) and {"distribution", "parameters"} <= set(prior):
            record[name] = prior
        else:
            parameters = {
                key: torch.as_tensor(getattr(prior, key)).tolist()
                for key in getattr(prior, "arg_constraints", {})
            }
            record[name] = {"distribution": type(prior).__name__, "parameters": parameters}
    return record


def _prior_objects(record: dict | None) -> dict | None:
    """The priors :func:`_checked_priors` recorded, as the model takes them."""
    if record is None:
        return None
    import pyro.distributions as dist

    out: dict[str, Any] = {}
    for name, prior in record.items():
        if isinstance(prior, float):
            out[name] = prior
            continue
        family = getattr(dist, prior["distribution"], None)
        if family is None:
            raise ValueError(f"priors['{name}']: unknown distribution {prior['distribution']!r}")
        out[name] = family(
            **{key: torch.as_tensor(value) for key, value in prior["parameters"].items()}
        )
    return out
