"""`MoERegression`: a gated mixture-of-experts regression on a table, reported in the data's units.

The high-level entry for modellers coming from brms, bambi or flexmix: formulas with factors
(:class:`~pyromoe.spec.formula.ModelSpecification`), the inputs and the target z-scored inside so
that the default priors (written for standardised data) fit any units, the start from
:func:`~pyromoe.initialize`, then NUTS (default) or SVI; every output (coefficients, noise,
predictions and their intervals) in the data's units. A fit saves to a results folder (the
InferenceData as NetCDF, the specification and the model's settings as JSON; no pickle) and
:func:`load` brings it back with predictions identical draw for draw.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .._validation import (
    check_count,
    check_flag,
    check_noise_model,
    check_num_experts,
    check_probability,
    check_seed,
)
from ..core import sites
from ..core.units import AffineMap
from ..spec.formula import ModelSpecification
from .fit_record import (
    MODEL_FILE,
    SAVE_FORMAT,
    SPECIFICATION_FILE,
    _checked_priors,
    _prior_objects,
    write_fit_record,
)

__all__ = ["MoERegression", "load"]

_IDATA_FILE = "inference_data.nc"


class MoERegression:
    """A gated Gaussian mixture-of-experts regression of a table's columns, in their own units.

    As bambi's ``Model`` or brms's ``brm``: give formulas, fit to a table, read the summary and
    predict new rows, all in the data's units. Internally every design column and the target are
    z-scored with the fitted table's means and sds (population sd), so the default priors, which
    are weakly informative for standardised data, suit data of any scale; the posterior is mapped
    back draw by draw.

    Parameters
    ----------
    formula : str
        The experts' formula, e.g. ``"y ~ x1 + np.log(x2) + C(site)"`` (formulaic's syntax:
        factors, interactions, transforms).
    gate : str, optional
        The gate's one-sided formula, e.g. ``"~ z1 + C(site)"``. Default: the experts' terms.
    num_experts : int
        k >= 1 (1: a plain regression without a gate).
    link : str
        The experts' link: ``linear``, ``tanh``, ``relu``, ``leaky_relu``, ``sigmoid``.
    noise : str
        ``"shared"`` (one noise sd) or ``"per_expert"``.
    priors : dict, optional
        As :class:`~pyromoe.MixtureOfExperts`'s ``priors``, on the standardised scale (a float
        sets a default prior's scale).

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> table = pd.DataFrame({"u": rng.normal(50, 10, 400), "site": rng.choice(["a", "b"], 400)})
    >>> table["y"] = 3 + 0.2 * table["u"] + 2 * (table["site"] == "b") + rng.normal(0, 1, 400)
    >>> fit = MoERegression("y ~ u + C(site)", num_experts=1).fit(
    ...     table, method="svi", num_steps=500, progress=False)
    >>> round(float(fit.summary().loc["experts.weight[0, u]", "mean"]), 1)
    0.2
    """

    def __init__(
        self,
        formula: str,
        *,
        gate: str | None = None,
        num_experts: int = 2,
        link: str = "linear",
        noise: str = "shared",
        priors: dict | None = None,
    ):
        from ..core.links import get_link

        if not isinstance(formula, str):
            raise TypeError(f"formula must be a str such as 'y ~ x1 + C(site)'; got {formula!r}")
        if gate is not None and not isinstance(gate, str):
            raise TypeError(f"gate must be a str such as '~ z1 + C(site)' or None; got {gate!r}")
        self.formula, self.gate = formula, gate
        self.num_experts = check_num_experts(num_experts, minimum=1)
        self.link = get_link(link).name if isinstance(link, str) else link
        self.noise = check_noise_model(noise)
        self.priors = _checked_priors(priors)
        self.specification: ModelSpecification | None = None
        self.model = None
        self.idata = None
        self.estimate = None

    # --------------------------------------------------------------------------- fitting
    def fit(
        self,
        data,
        *,
        method: str = "nuts",
        seed: int = 0,
        num_chains: int = 4,
        num_warmup: int = 500,
        num_samples: int = 500,
        num_steps: int = 3000,
        progress: bool = True,
        device: str = "cpu",
        pointwise: str | int = "auto",
    ) -> MoERegression:
        """Build the design from ``data``, start from :func:`~pyromoe.initialize`, then sample.

        Parameters
        ----------
        data : pandas.DataFrame
            The columns the formulas name (others are ignored).
        method : str
            ``"nuts"`` (default; ``num_chains`` x (``num_warmup`` + ``num_samples``)) or
            ``"svi"`` (``num_steps`` steps, for large tables).
        seed : int
            One seed for the start and the sampler.
        pointwise : "auto", "all" or int
            The rows ``idata``'s pointwise groups and data groups keep
            (:mod:`pyromoe.bayes.pointwise`): ``"auto"`` every row up to ``POINTWISE_CELLS``
            draws x rows, beyond it a seeded random subsample (float32); a number of rows;
            ``"all"``. They are also the fitted rows of :meth:`responsibilities` without data,
            and what :meth:`save` writes.

        Returns
        -------
        MoERegression
            ``self``, fitted: ``specification``, ``estimate``, ``model``, ``idata``.
        """
        from ..bayes.nuts import run_nuts
        from ..bayes.pointwise import pointwise_rule
        from ..bayes.svi import fit_svi
        from ..estimators.initialize import initialize

        if method not in ("nuts", "svi"):
            raise ValueError(f"method must be 'nuts' or 'svi'; got {method!r}")
        seed = check_seed(seed)
        progress = check_flag(progress, "progress")
        pointwise = pointwise_rule(pointwise, "pointwise")
        spec = ModelSpecification.from_data(data, self.formula, self.gate)
        design = spec.design(data)
        x = torch.as_tensor(design.x, device=device)
        y = torch.as_tensor(design.y, device=device)
        z = _gate_design(spec, design, device)
        names = list(spec.expert_columns) + ([] if z is None else list(spec.gate_columns))
        estimate = initialize(
            x,
            y,
            self.num_experts,
            self.link,
            method="auto",
            noise=self.noise,
            seed=seed,
            z=z,
            moment_columns=list(spec.expert_continuous),
        )
        model = _model(self, spec)
        if method == "nuts":
            fit, settings = (
                run_nuts,
                dict(
                    num_chains=check_count(num_chains, "num_chains", minimum=1),
                    num_warmup=check_count(num_warmup, "num_warmup", minimum=0),
                    num_samples=check_count(num_samples, "num_samples", minimum=4),
                ),
            )
        else:
            fit, settings = fit_svi, dict(num_steps=check_count(num_steps, "num_steps", minimum=1))
        idata = fit(
            model,
            x,
            y,
            z=z,
            init=estimate,
            seed=seed,
            progress=progress,
            feature_names=names,
            pointwise=pointwise,
            **settings,
        )
        idata.attrs["pyromoe_specification"] = spec.to_json()
        self.specification, self.estimate, self.model, self.idata = spec, estimate, model, idata
        self.method = method
        return self

    def _check_fitted(self, what: str) -> ModelSpecification:
        if self.idata is None or self.specification is None:
            raise ValueError(f"{what} needs a fitted model: call .fit(data) first (or load one)")
        return self.specification

    # --------------------------------------------------------------------------- results
    def draws(self) -> dict[str, np.ndarray]:
        """The posterior draws of every site in the data's units, ``{site: (chain, draw, ...)}``.

        The gate's weights act on the gate's design columns and the experts' on theirs, each in
        the table's units (a factor's column is its 0/1 indicator); the noise is in ``y``'s
        units. For a link whose experts have no form in ``y``'s units (tanh, sigmoid; relu with
        a shifted ``y``), the experts map on ``x`` only: ``y = y_mean + y_sd * g(a.x + b)``.
        """
        spec = self._check_fitted("draws")
        from ..core.links import get_link

        link = get_link(self.link)
        posterior = {name: np.asarray(self.idata.posterior[name].values) for name in _sites(self)}
        experts = AffineMap(
            x_shift=np.asarray(spec.x_mean),
            x_scale=np.asarray(spec.x_sd),
            y_shift=spec.y_mean,
            y_scale=spec.y_sd,
        )
        if not experts.maps_experts(link):
            experts = AffineMap(x_shift=np.asarray(spec.x_mean), x_scale=np.asarray(spec.x_sd))
        gate = AffineMap(x_shift=np.asarray(spec.z_mean), x_scale=np.asarray(spec.z_sd))
        noise = AffineMap(y_scale=spec.y_sd)
        mapped: dict[str, np.ndarray] = {}
        expert_sites = {n: v for n, v in posterior.items() if n.startswith("experts.")}
        gate_sites = {n: v for n, v in posterior.items() if n.startswith("gate.")}
        mapped.update(experts.to_original(expert_sites, link))
        if gate_sites:
            mapped.update(gate.to_original(gate_sites))
        mapped[sites.NOISE] = noise.to_original({sites.NOISE: posterior[sites.NOISE]})[sites.NOISE]
        return mapped

    def summary(self, hdi_prob: float = 0.94) -> pd.DataFrame:
        """ArviZ's ``az.summary`` of every parameter in the data's units (see :meth:`draws`).

        Rows ``experts.weight[i, column]``, ``experts.bias[i]``, ``gate.weight[j, column]`` (gate
        rows from 1: row j is expert j's logit against expert 0), ``gate.bias[j]``, ``noise``.
        """
        import arviz as az

        spec = self._check_fitted("summary")
        hdi_prob = check_probability(hdi_prob, "hdi_prob")
        mapped = self.draws()
        k = self.num_experts
        coords = {
            "expert": list(range(k)),
            "gate_expert": list(range(1, k)),
            "feature": list(spec.expert_columns),
            "gate_feature": list(spec.gate_columns),
        }
        dims = {
            sites.EXPERTS_WEIGHT: ["expert", "feature"],
            sites.EXPERTS_BIAS: ["expert"],
            sites.GATE_WEIGHT: ["gate_expert", "gate_feature"],
            sites.GATE_BIAS: ["gate_expert"],
            sites.NOISE: ["expert"] if self.noise == "per_expert" else [],
        }
        data = az.from_dict(
            posterior={name: np.asarray(value) for name, value in mapped.items()},
            coords=coords,
            dims={name: dims[name] for name in mapped},
        )
        # one chain (SVI, MAP): no r_hat or ess to compute, only the statistics
        kind = "all" if data.posterior.sizes["chain"] > 1 else "stats"
        return az.summary(data, hdi_prob=hdi_prob, kind=kind)

    def responsibilities(self, data=None, *, hdi_prob: float = 0.94) -> pd.DataFrame:
        """Each row's posterior responsibilities ``p(expert i | x, z, y)``: their posterior mean
        and HDI per expert (:func:`pyromoe.responsibilities`), for the rows of ``data`` (with
        its index; the target is needed) or, without it, the fitted rows ``idata`` keeps (every
        row, or the pointwise budget's subsample of :meth:`fit`, indexed by row number)."""
        from ..bayes.predict import responsibilities

        spec = self._check_fitted("responsibilities")
        if data is None:
            return responsibilities(self.model, self.idata, hdi_prob=hdi_prob)
        design = spec.design(data)
        x = torch.as_tensor(design.x)
        table = responsibilities(
            self.model,
            self.idata,
            x,
            torch.as_tensor(design.y),
            z=_gate_design(spec, design, x.device),
            hdi_prob=hdi_prob,
        )
        table.index = data.index if isinstance(data, pd.DataFrame) else table.index
        return table

    def predict(
        self,
        data,
        *,
        interval: float = 0.9,
        seed: int = 0,
        num_draws: int | None = None,
    ) -> pd.DataFrame:
        """Predictions for the rows of ``data`` in the target's units, matched by column name.

        Parameters
        ----------
        data : pandas.DataFrame
            The columns the formulas' right-hand sides name (any order; the target is not needed).
        interval : float
            The mass of the equal-tailed predictive interval, in (0, 1).
        seed : int
            Seed of the predictive draws; the same seed gives the same draws (after a save and
            :func:`load` too).
        num_draws : int, optional
            Evenly spaced posterior draws per chain to use (default: all).

        Returns
        -------
        pandas.DataFrame
            ``data``'s index; columns ``mean`` (the posterior mean of ``E[y | x]``), ``sd`` (of
            the predictive draws of ``y``), and the interval's quantiles of the predictive draws,
            named like ``q5%`` and ``q95%`` for ``interval=0.9``.

        Raises
        ------
        ValueError
            A missing column, a missing value or an unseen factor level (each named); a model
            not fitted yet.
        """
        from ..bayes.predict import predict

        spec = self._check_fitted("predict")
        interval = check_probability(interval, "interval")
        design = spec.design(data, target=False)
        x = torch.as_tensor(design.x)
        predictions = predict(
            self.model,
            self.idata,
            x,
            z_new=_gate_design(spec, design, x.device),
            seed=check_seed(seed),
            num_draws=num_draws,
        )
        draws = np.asarray(predictions.predictions["y"].values)
        draws = spec.y_mean + spec.y_sd * draws.reshape(-1, draws.shape[-1])
        mean = spec.y_mean + spec.y_sd * np.asarray(
            predictions.predictions["mean"].mean(("chain", "draw")).values
        )
        tail = (1.0 - interval) / 2.0
        low, high = np.quantile(draws, [tail, 1.0 - tail], axis=0)
        index = data.index if isinstance(data, pd.DataFrame) else pd.RangeIndex(len(mean))
        return pd.DataFrame(
            {
                "mean": mean,
                "sd": draws.std(axis=0),
                f"q{_percent(tail)}": low,
                f"q{_percent(1.0 - tail)}": high,
            },
            index=index,
        )

    def plot_predictions(
        self, feature: str, data, *, num_points: int = 100, hdi_prob: float = 0.94, seed: int = 0
    ):
        """Conditional predictions along one numeric column, in the data's units.

        As brms's ``conditional_effects``: ``num_points`` values spanning ``feature`` in
        ``data``, every other numeric column at its mean and every factor at its most common
        level; the top panel shows the data, each expert's mean ``g(a_i . x + b_i)`` and the
        mixture mean ``E[y | x]`` with their ``hdi_prob`` bands, the bottom panel each expert's
        gate probability; the axes carry the columns' names.

        Parameters
        ----------
        feature : str
            A numeric column of ``data`` that the formulas read.
        data : pandas.DataFrame
            The table to take the range, the means, the levels and the points from (e.g. the
            fitted table).

        Returns
        -------
        matplotlib.figure.Figure
        """
        from ..bayes.predict import hdi_bounds, predict
        from .plots import _two_panels, draw_conditional

        spec = self._check_fitted("plot_predictions")
        grid, values = _grid(spec, data, feature, check_count(num_points, "num_points", minimum=2))
        design = spec.design(grid, target=False)
        x = torch.as_tensor(design.x)
        z = _gate_design(spec, design, x.device)
        predicted = predict(self.model, self.idata, x, z_new=z, seed=check_seed(seed)).predictions
        variables = predicted[["mean", "expert_mean", "gate"]]
        for name in ("mean", "expert_mean"):  # to the target's units
            variables[name] = variables[name] * spec.y_sd + spec.y_mean
        centre = variables.mean(("chain", "draw"))
        low, high = hdi_bounds(variables, check_probability(hdi_prob, "hdi_prob"))
        figure, ax_y, ax_gate = _two_panels(None)
        if all(name in data for name in spec.target_variables):
            target = spec.design(data).y * spec.y_sd + spec.y_mean
            ax_y.scatter(data[feature], target, s=6, color="0.6", alpha=0.5, label="data")
        title = f"Posterior mean and {hdi_prob * 100:g}% HDI along {feature}"
        return draw_conditional(
            ax_y,
            ax_gate,
            values,
            (centre, low, high),
            y_label=spec.target,
            x_label=feature,
            title=title,
        )

    # --------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the fit to the results folder ``path`` (reload it with :func:`load`).

        The folder holds ``inference_data.nc`` (the InferenceData, on the standardised scale),
        ``specification.json`` (formulas, factor levels, standardisation) and ``model.json`` (k,
        link, noise model, priors). It is written as every pyromoe results folder is
        (:func:`~pyromoe.results_directory`): atomically, never over a folder pyromoe did not
        write, over earlier unchanged results only with ``overwrite=True``.
        """
        from .atomic import write_netcdf_atomic
        from .results import results_directory

        spec = self._check_fitted("save")
        with results_directory(path, overwrite=overwrite) as folder:
            write_netcdf_atomic(self.idata, folder / _IDATA_FILE)
            write_fit_record(
                folder,
                spec,
                num_experts=self.num_experts,
                link=self.link,
                noise=self.noise,
                method=getattr(self, "method", None),
                formula=self.formula,
                gate=self.gate,
                priors=self.priors,
            )
        return Path(path)


def load(path: str | os.PathLike) -> MoERegression:
    """A fit that :meth:`MoERegression.save` wrote to the folder ``path``.

    Raises
    ------
    FileNotFoundError
        ``path`` is not such a folder (the message names the missing file).
    ValueError
        A file that is not what ``save`` writes.
    """
    import arviz as az

    folder = Path(path)
    for name in (MODEL_FILE, SPECIFICATION_FILE, _IDATA_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"'{folder}' is not a saved pyromoe fit: '{name}' is missing (a fit saved with "
                "MoERegression.save or `pyromoe fit --formula` holds it)"
            )
    try:
        record = json.loads((folder / MODEL_FILE).read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"'{folder / MODEL_FILE}' is not valid JSON: {error}") from None
    if not isinstance(record, dict) or record.get("format") != SAVE_FORMAT:
        raise ValueError(f"'{folder / MODEL_FILE}' is not a model record of format {SAVE_FORMAT}")
    spec = ModelSpecification.from_json((folder / SPECIFICATION_FILE).read_text(encoding="utf-8"))
    fit = MoERegression(
        record["formula"],
        gate=record["gate"],
        num_experts=record["num_experts"],
        link=record["link"],
        noise=record["noise"],
        priors=record["priors"],
    )
    idata = az.from_netcdf(folder / _IDATA_FILE)
    for group in idata.groups():  # into memory: the file is not held open
        getattr(idata, group).load()
    fit.specification, fit.idata, fit.method = spec, idata, record.get("method")
    fit.model = _model(fit, spec)
    return fit


# ------------------------------------------------------------------------------------ helpers
def _grid(spec: ModelSpecification, data, feature: str, num_points: int):
    """Rows along ``feature`` (its range in ``data``), the other columns held at their mean (numbers)
    or most common level (factors); and the feature's values."""
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame; got {type(data).__name__}")
    if feature not in spec.variables or feature in spec.factor_levels:
        numeric = [name for name in spec.variables if name not in spec.factor_levels]
        raise ValueError(
            f"feature must be a numeric column the formulas read, one of {numeric}; got {feature!r}"
        )
    columns = {}
    for name in spec.variables:
        if name not in data:
            raise ValueError(f"data has no column {name!r}, which the formulas read")
        column = data[name]
        held = column.mode().iloc[0] if name in spec.factor_levels else float(column.mean())
        columns[name] = [held] * num_points
    values = np.linspace(float(data[feature].min()), float(data[feature].max()), num_points)
    columns[feature] = values
    return pd.DataFrame(columns), values


def _separate_gate(spec: ModelSpecification) -> bool:
    """Whether the gate has a design of its own (other terms than the experts')."""
    return spec.gate_columns != spec.expert_columns


def _gate_design(spec: ModelSpecification, design, device) -> torch.Tensor | None:
    """The gate's own covariates ``z`` of a design, or None when the gate reads ``x``."""
    return torch.as_tensor(design.z, device=device) if _separate_gate(spec) else None


def _model(fit: MoERegression, spec: ModelSpecification):
    """The Pyro model of ``fit`` on the specification's design."""
    from ..bayes.model import MixtureOfExperts

    return MixtureOfExperts(
        len(spec.expert_columns),
        fit.num_experts,
        link=fit.link,
        bias=True,
        noise=fit.noise,
        priors=_prior_objects(fit.priors),
        gate_features=len(spec.gate_columns) if _separate_gate(spec) else None,
    )


def _sites(fit: MoERegression) -> list[str]:
    return [name for name in fit.model.site_shapes if name in fit.idata.posterior]


def _percent(value: float) -> str:
    return f"{100 * value:.10g}%"
