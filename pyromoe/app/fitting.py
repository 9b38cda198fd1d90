"""The `pyromoe fit` analysis: a CSV file standardised, initialized, fitted by seeded NUTS or SVI
(or several numbers of experts compared by PSIS-LOO), reported in standardised and data units."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._validation import (
    check_count,
    check_noise_model,
    check_num_experts,
    num_parameters,
)
from ..bayes.model import MixtureOfExperts
from ..bayes.pointwise import pointwise_rule
from ..core.estimate import MoEEstimate
from ..core.links import check_link
from ..core.units import AffineMap
from ..estimators.initialize import initialize
from ..spec.formula import ModelSpecification
from .atomic import write_text_atomic
from .fit_record import write_fit_record
from .plots import interval_columns, parameter_sites, parameter_summary
from .report import Timer, comparison_rows, fit_summary, write_outputs
from .results import results_directory
from .runs import check_run_arguments, posterior_mean_estimate
from .table import read_frame, read_table

__all__ = ["run_fit", "standardisation_record", "to_data_units"]

#: Rows needed per model parameter by `pyromoe fit`.
ROWS_PER_PARAMETER = 3


def _check_expert_counts(num_experts) -> list[int]:
    """``num_experts`` of :func:`run_fit` as a list: one int, or a sequence of distinct ints (each
    >= 1) to compare."""
    if isinstance(num_experts, (str, bytes)) or not isinstance(num_experts, (int, Sequence)):
        raise TypeError(
            "num_experts must be an int >= 1 or a sequence of distinct ints, e.g. (1, 2, 3); got "
            f"{type(num_experts).__name__}"
        )
    values = [num_experts] if not isinstance(num_experts, Sequence) else list(num_experts)
    if not values:
        raise ValueError("num_experts must list at least one number of experts; got none")
    values = [check_num_experts(k, minimum=1) for k in values]
    if len(set(values)) != len(values):
        raise ValueError(f"num_experts must not repeat a value; got {values}")
    return values


def _num_fit_parameters(d: int, k: int, noise: str) -> int:
    """Free parameters of the model `pyromoe fit` builds (per-expert noise: k sds, not one)."""
    return num_parameters(d, k) + (k - 1 if noise == "per_expert" else 0)


def _standardize_columns(values: np.ndarray, names: Sequence[str], *, target: bool = False):
    mean, scale = values.mean(0), values.std(0)
    constant = [name for name, s in zip(names, scale) if not s > 0]
    if constant and target:
        raise ValueError(
            f"the target column '{constant[0]}' is constant (every value is "
            f"{float(values[0, 0]):g}): there is nothing to model; choose another --target"
        )
    if constant:
        listed = ", ".join(f"'{name}'" for name in constant)
        raise ValueError(
            f"input column(s) {listed} are constant; a constant input carries no information "
            "(the experts' intercepts already model a constant): leave it out by listing the "
            "other inputs with --features"
        )
    return (values - mean) / scale, mean, scale


def standardisation_record(
    feature_names: Sequence[str],
    target_name: str,
    x_mean: np.ndarray,
    x_scale: np.ndarray,
    y_mean: float,
    y_scale: float,
) -> dict[str, Any]:
    """The standardisation of a fit as plain data (``standardisation.json``, ``idata.attrs``).

    ``z = (value - mean) / sd`` for every input column and the target, with the population sd
    (``ddof=0``, numpy's default).

    Examples
    --------
    >>> standardisation_record(["a"], "y", np.array([1.0]), np.array([2.0]), 3.0, 4.0)["target"]
    {'column': 'y', 'mean': 3.0, 'sd': 4.0}
    """
    return {
        "convention": "z = (value - mean) / sd, sd the population standard deviation (ddof=0); "
        "the model was fitted to the z-scores of the inputs and of the target",
        "inputs": [
            {"column": str(name), "mean": float(m), "sd": float(sd)}
            for name, m, sd in zip(feature_names, x_mean, x_scale)
        ],
        "target": {"column": str(target_name), "mean": float(y_mean), "sd": float(y_scale)},
    }


def to_data_units(
    values: dict[str, np.ndarray], standardisation: dict[str, Any], link
) -> dict[str, np.ndarray]:
    """Site values fitted on standardised data, in the data's own units (any leading dims).

    With ``x_std = (x - m) / s`` and ``y_std = (y - m_y) / s_y`` (``standardisation`` as
    :func:`standardisation_record` writes it), the linear expert ``y = s_y (a . x_std + b) + m_y``
    has weights ``s_y a_j / s_j`` and intercept ``s_y (b - sum_j a_j m_j / s_j) + m_y``; the noise
    is ``s_y sigma``; the gate logit ``w . x_std + c`` has weights ``w_j / s_j`` and offset
    ``c - sum_j w_j m_j / s_j``. For any other link the experts have no data-unit form (the link
    sits between the two scales), so only the noise and the gate are returned.
    """

    def columns(part: str) -> dict:
        inputs = standardisation[part]
        return {
            "x_shift": np.array([column["mean"] for column in inputs]),
            "x_scale": np.array([column["sd"] for column in inputs]),
        }

    target = standardisation["target"]
    units = AffineMap(**columns("inputs"), y_shift=target["mean"], y_scale=target["sd"])
    link = check_link(link)
    kept = {
        name: np.asarray(value)
        for name, value in values.items()
        if units.maps_experts(link) or not name.startswith("experts.")
    }
    if "gate_inputs" not in standardisation:  # the gate reads the experts' inputs
        return units.to_original(kept, link)
    gate = {name: value for name, value in kept.items() if name.startswith("gate.")}
    rest = {name: value for name, value in kept.items() if not name.startswith("gate.")}
    mapped = units.to_original(rest, link)
    mapped.update(AffineMap(**columns("gate_inputs")).to_original(gate) if gate else {})
    return {name: mapped[name] for name in kept}


def data_unit_summary(
    idata, start: MoEEstimate, standardisation: dict[str, Any], hdi_prob: float = 0.94
):
    """:func:`pyromoe.app.plots.parameter_summary` of the draws mapped by :func:`to_data_units`
    (draw by draw, so the intervals are those of the mapped draws), with the start mapped too.

    Its columns are ``start``, ``posterior mean``, ``sd`` and the interval, each suffixed
    ``" (data units)"``; rows without a data-unit form are absent.
    """
    import arviz as az
    import xarray as xr

    post = idata.posterior
    names = parameter_sites(idata)
    mapped = to_data_units({n: post[n].values for n in names}, standardisation, start.link)
    dataset = xr.Dataset({n: (post[n].dims, v) for n, v in mapped.items()}, coords=post.coords)
    start_values = {n: v.detach().cpu().numpy() for n, v in start.site_values().items()}
    points = {"start": to_data_units(start_values, standardisation, start.link)}
    table = parameter_summary(az.InferenceData(posterior=dataset), points, hdi_prob)
    low, high = interval_columns(hdi_prob)
    table = table[["start", "posterior mean", "sd", low, high]]
    return table.rename(columns=lambda column: f"{column} (data units)")


def run_fit(
    path: str | Path,
    target: str | None = None,
    features: Sequence[str] | None = None,
    *,
    formula: str | None = None,
    gate: str | None = None,
    num_experts: int | Sequence[int] = 2,
    noise: str = "shared",
    link: str = "linear",
    out: str | Path = "pyromoe-fit",
    method: str = "nuts",
    seed: int = 0,
    num_chains: int = 4,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_steps: int = 3000,
    device: str = "cpu",
    progress: bool = True,
    overwrite: bool = False,
    pointwise: str | int = "auto",
) -> dict[str, Any]:
    """Fit a mixture of experts to a CSV file: standardise, initialize (``method="auto"``), then
    seeded NUTS (``method="nuts"``) or SVI (``method="svi"``, for large n); write ``out``.

    Inputs and target are standardised to zero mean and unit variance (the priors are on that
    scale); every expert has an intercept and the gate an offset. ``noise`` is the noise model
    (``"shared"``: one sd; ``"per_expert"``: one per expert) of the start, the model and the
    tables. ``num_experts`` is one k >= 1 (1: a plain regression, no gate), or several distinct
    ones: each is fitted by :func:`pyromoe.bayes.compare.compare_experts` (same ``method``, steps
    and draws), ranked by PSIS-LOO (written to ``summary.md`` and ``compare_experts.csv``), and
    the rest of the report is for the best-ranked k.

    The model is given either by ``target`` and ``features`` (numeric columns: the shorthand of
    the formula ``target ~ f1 + f2 + ...``) or by ``formula`` (formulaic's syntax, factors
    included, e.g. ``"y ~ x1 + np.log(x2) + C(site)"``) and optionally ``gate`` (the gate's
    one-sided formula; default: the experts' terms). The folder also holds the model's
    specification and settings (``specification.json``, ``model.json``), so that
    :func:`pyromoe.load` and ``pyromoe predict`` can predict new rows from it.

    ``pointwise`` is the rows the fit's pointwise groups keep (:mod:`pyromoe.bayes.pointwise`:
    ``"auto"``, every row up to ``POINTWISE_CELLS`` draws x rows and beyond it a seeded random
    subsample; a number of rows; ``"all"``); ``inference_data.nc``, ``responsibilities.csv`` and
    the responsibilities figure hold those rows (their row numbers in the file are the ``obs``
    coordinate and the CSV's index), so the folder stays bounded whatever the number of rows.

    ``out`` follows the rule of :func:`pyromoe.results_directory`: it may replace only earlier
    pyromoe results, only with ``overwrite=True``, and never the folder holding ``path`` (or one
    above it) nor the working folder. Every argument is checked before any work.
    """
    if method not in ("nuts", "svi"):
        raise ValueError(f"method must be 'nuts' or 'svi'; got {method!r}")
    ks = _check_expert_counts(num_experts)
    noise = check_noise_model(noise)
    check_run_arguments(
        num_experts=max(ks), link=link, seed=seed, device=device, overwrite=overwrite, min_experts=1
    )
    num_chains = check_count(num_chains, "num_chains", minimum=1)
    num_warmup = check_count(num_warmup, "num_warmup", minimum=0)
    num_samples = check_count(num_samples, "num_samples", minimum=4 if method == "nuts" else 1)
    num_steps = check_count(num_steps, "num_steps", minimum=1)
    pointwise = pointwise_rule(pointwise, "pointwise")
    data = _standardised_table(path, target, features, formula, gate, max(ks), noise, device)
    if method == "nuts":
        fit_args = dict(num_chains=num_chains, num_warmup=num_warmup, num_samples=num_samples)
    else:
        fit_args = dict(num_steps=num_steps)
    fit_args["pointwise"] = pointwise
    run = _FitRun(data, ks, noise, link, method, seed, progress, fit_args)
    with results_directory(out, overwrite=overwrite, inputs=[path]) as folder:
        run.fit(folder)
        return run.report(folder)


@dataclass
class _StandardisedTable:
    """A CSV table read, checked for size and z-scored through its model specification;
    ``x``, ``y`` (the standardised design and target) on the device."""

    path: str
    specification: ModelSpecification
    standardisation: dict[str, Any]
    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor | None = None

    @property
    def feature_names(self) -> list[str]:
        return list(self.specification.expert_columns)

    @property
    def gate_features(self) -> int | None:
        return None if self.z is None else self.z.shape[1]

    @property
    def design_names(self) -> list[str]:
        """The names of the model's design: the experts' columns, then the gate's own."""
        gate = [] if self.z is None else list(self.specification.gate_columns)
        return self.feature_names + gate

    @property
    def target_name(self) -> str:
        return self.specification.target


def _standardised_table(path, target, features, formula, gate, largest, noise, device):
    frame = _read_for_model(path, target, features, formula, gate)
    if formula is None:
        formula = " + ".join(_quoted(name) for name in frame.columns[:-1])
        formula = f"{_quoted(target)} ~ {formula}"
    spec = ModelSpecification.from_data(frame, formula, gate)
    design = spec.design(frame)
    rows, d = design.x.shape
    parameters = _num_fit_parameters(d, largest, noise)
    needed = ROWS_PER_PARAMETER * parameters
    if rows < needed:
        raise ValueError(
            f"{path} has {rows} data rows; at least {needed} are needed "
            f"({ROWS_PER_PARAMETER} per parameter: {largest} experts on {d} inputs have "
            f"{parameters} parameters). Use fewer experts or features."
        )
    standardisation = standardisation_record(
        spec.expert_columns, spec.target, spec.x_mean, spec.x_sd, spec.y_mean, spec.y_sd
    )
    z = None
    if spec.gate_columns != spec.expert_columns:  # the gate's own covariates
        standardisation["gate_inputs"] = [
            {"column": str(name), "mean": float(m), "sd": float(sd)}
            for name, m, sd in zip(spec.gate_columns, spec.z_mean, spec.z_sd)
        ]
        z = torch.as_tensor(design.z, device=device)
    return _StandardisedTable(
        str(path),
        spec,
        standardisation,
        torch.as_tensor(design.x, device=device),
        torch.as_tensor(design.y, device=device),
        z,
    )


def _read_for_model(path, target, features, formula, gate) -> pd.DataFrame:
    """The table the specification is learnt from: for the shorthand, the numeric target and
    features (read and checked by :func:`read_table`, constant columns refused by name); for a
    formula, the whole file (:func:`read_frame`: text columns are factors)."""
    if (formula is None) == (target is None):
        raise ValueError(
            "give the model either as a target (with optional features) or as a formula, "
            "e.g. --target y --features a b, or --formula 'y ~ a + C(site)'; not both"
        )
    if formula is not None:
        if features is not None:
            raise ValueError("features go with --target; with --formula list the terms in it")
        return read_frame(path)
    table = read_table(path, target, features, min_rows=2)
    _standardize_columns(table.x, table.feature_names)  # the messages of the shorthand
    _standardize_columns(table.y[:, None], [table.target_name], target=True)
    columns = dict(zip(table.feature_names, table.x.T))
    return pd.DataFrame({**columns, table.target_name: table.y})


def _quoted(name: str) -> str:
    """A column name as a formula term: bare when it is a Python name, else in backticks."""
    return name if name.isidentifier() else f"`{name}`"


@dataclass
class _FitRun:
    """The steps of :func:`run_fit` after the checks: compare or fit, then report."""

    data: _StandardisedTable
    ks: list[int]
    noise: str
    link: str
    method: str
    seed: int
    progress: bool
    fit_args: dict[str, Any]
    timer: Timer = field(default_factory=Timer)
    comparison: list[dict[str, Any]] | None = None
    idata: Any = None
    num_experts: int = 0
    estimate: MoEEstimate | None = None
    model: MixtureOfExperts | None = None

    def fit(self, folder: Path) -> None:
        """Compare the numbers of experts (several ks) or take the one k; start; fit."""
        from ..bayes.nuts import run_nuts
        from ..bayes.svi import fit_svi

        data, names = self.data, self.data.design_names
        self.num_experts = self.ks[0]
        if len(self.ks) > 1:
            self._compare(folder, names)
        # with a comparison this is the start compare_experts gave the best-ranked k (the same
        # call, so the same estimate): the report's start column and initializer section
        with self.timer("initialize (auto)"):
            self.estimate = initialize(
                data.x,
                data.y,
                self.num_experts,
                self.link,
                method="auto",
                noise=self.noise,
                seed=self.seed,
                z=data.z,
                moment_columns=list(data.specification.expert_continuous),
            )
        d = data.x.shape[1]
        self.model = MixtureOfExperts(
            d,
            self.num_experts,
            link=self.link,
            bias=True,
            noise=self.noise,
            gate_features=data.gate_features,
        )
        if self.idata is None:
            with self.timer(f"{self.method.upper()} seeded from the estimate"):
                fit = run_nuts if self.method == "nuts" else fit_svi
                self.idata = fit(
                    self.model,
                    data.x,
                    data.y,
                    z=data.z,
                    init=self.estimate,
                    seed=self.seed,
                    progress=self.progress,
                    feature_names=names,
                    **self.fit_args,
                )
        self.idata.attrs["standardisation"] = json.dumps(data.standardisation)

    def _compare(self, folder: Path, names: list[str]) -> None:
        from ..bayes.compare import compare_experts

        listed = ", ".join(str(k) for k in self.ks)
        with self.timer(f"compare k = {listed} ({self.method.upper()} each, PSIS-LOO)"):
            compared, fits = compare_experts(
                self.data.x,
                self.data.y,
                self.ks,
                self.link,
                inference=self.method,
                z=self.data.z,
                noise=self.noise,
                bias=True,
                seed=self.seed,
                progress=self.progress,
                feature_names=names,
                **self.fit_args,
            )
        self.comparison = comparison_rows(compared)
        best = self.comparison[0]["k"]
        self.num_experts, self.idata = int(best.removeprefix("k=")), fits[best]
        write_text_atomic(
            folder / "compare_experts.csv", pd.DataFrame(self.comparison).to_csv(index=False)
        )

    def report(self, folder: Path) -> dict[str, Any]:
        """Tables, responsibilities, figures and ``summary.md``; returns the summary's numbers."""
        from ..bayes.predict import responsibilities as posterior_responsibilities
        from . import plots

        data, idata, estimate = self.data, self.idata, self.estimate
        standardisation = data.standardisation
        mean = posterior_mean_estimate(idata, estimate.link)
        rows = (
            parameter_summary(idata, {"start": estimate})
            .join(data_unit_summary(idata, estimate, standardisation))
            .reset_index()
            .to_dict("records")
        )
        # the rows the fit kept (every row, or the pointwise budget's subsample): the obs coords
        # (copied: xarray's coordinate arrays are read-only, which torch warns about)
        obs = np.array(idata.constant_data["obs"].values, dtype=np.int64)
        kept = torch.from_numpy(obs).to(data.x.device)
        with self.timer("responsibilities"):
            responsibilities = posterior_responsibilities(
                self.model, idata, data.x[kept], data.y[kept], z=_rows(data.z, kept)
            )
            responsibilities.index = pd.Index(kept.cpu().numpy(), name="obs")
        with self.timer("figures"):
            figures = {
                "trace": plots.plot_trace(idata),
                "posterior": plots.plot_posterior_vs_truth(idata, None, estimate),
                "responsibilities": plots.plot_responsibilities(
                    data.x[kept].cpu(),
                    data.y[kept].cpu(),
                    mean.to("cpu"),
                    data.feature_names,
                    z=_rows(data.z, kept, cpu=True),
                ),
                "posterior_predictive": plots.plot_posterior_predictive(idata),
            }
        numbers = {
            "file": data.path,
            "rows": int(data.x.shape[0]),
            "pointwise_rows": int(kept.numel()),
            "features": data.feature_names,
            "target": data.target_name,
            "formula": data.specification.formula,
            "num_experts": self.num_experts,
            "noise": self.noise,
            "comparison": self.comparison,
            "link": self.link,
            "method": self.method,
            "initializer": estimate.diagnostics.get("initializer", estimate.method),
            "initializer_reason": estimate.diagnostics.get("initializer_reason", ""),
            "standardisation": standardisation,
            "seconds": self.timer.seconds,
        }
        scaling = [*standardisation["inputs"], standardisation["target"]]
        summary = fit_summary(numbers, estimate, idata, rows, scaling, self.method)
        write_text_atomic(
            folder / "standardisation.json", json.dumps(standardisation, indent=1) + "\n"
        )
        write_text_atomic(folder / "responsibilities.csv", responsibilities.to_csv())
        write_fit_record(
            folder,
            data.specification,
            num_experts=self.num_experts,
            link=self.link,
            noise=self.noise,
            method=self.method,
        )
        write_outputs(folder, idata, figures, summary)
        return numbers


def _rows(z: torch.Tensor | None, rows: torch.Tensor, cpu: bool = False) -> torch.Tensor | None:
    """The gate covariates ``z`` of ``rows`` (None without them), on the CPU with ``cpu``."""
    if z is None:
        return None
    return z[rows].cpu() if cpu else z[rows]
