"""MAP and variational inference, seeded, started at a point estimate, returned as ArviZ data.

:func:`fit_svi` fits an autoguide by stochastic variational inference (Pyro's ``SVI`` with
``Trace_ELBO`` and Adam) and returns draws from it; :func:`fit_map` is the same fit with a point
(delta) guide, :class:`~pyro.infer.autoguide.AutoDelta`, whose one draw is the MAP estimate. Both
run with the global random generators seeded from ``seed`` and restored afterwards
(:func:`pyromoe.bayes._rng.seeded_rng`: results follow from the seed, the caller's own random
stream is left as it was) and inside a private Pyro parameter store
(``pyro.get_param_store().scope()``), so fits neither see nor leave parameters in the global store.
The trained guide keeps its parameters itself (a ``PyroModule``, under a name of its own) and is
handed back by :func:`pyromoe.trained_guide` from the returned InferenceData
(:mod:`pyromoe.bayes.trained`).

Data come in through :func:`pyromoe.core.sources.as_source` on the requested ``device``: in memory
(tensors, numpy arrays: used whole) or out of core (numpy memory maps, Dask arrays). Out-of-core
data are read one random mini-batch of ``subsample_size`` rows per step (the model is told the full
size, ``model(x_batch, y_batch, num_rows=n)``, to scale the likelihood by n / B), and the output is
evaluated on a fixed random subsample of at most :data:`EVALUATION_ROWS` rows.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoGuide,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_value,
)

from .._validation import check_flag, child_seed, count_rule, validate
from ..core import sites
from ..core.estimate import MoEEstimate
from ..core.sources import Source, sample_rows
from ..core.threads import torch_threads
from ._fitting import (
    fit_data,
    fit_model_data,
    fit_rules,
    inference_data,
    prepare_init,
    strategy_for,
)
from ._rng import seeded_rng
from .init_strategy import latent_site_shapes
from .pointwise import pointwise_rule
from .psis import psis_of_guide
from .trained import register, trained_guide, unique_name
from .user_model import UserModel, model_or_mixture_rule

__all__ = ["EVALUATION_ROWS", "fit_map", "fit_svi"]

#: rows of an out-of-core source the output is evaluated on (log-likelihood, predictions)
EVALUATION_ROWS = 10_000

#: rows of an out-of-core source the model is traced on (site shapes, the estimate's check)
_HEAD_ROWS = 256


class _Batches:
    """The data of each SVI step and of the calls around it.

    In memory: every step gets the whole tensors (and ``subsample_size`` for the model's own
    mini-batches), as Pyro's SVI usually runs. Out of core: every step draws ``subsample_size``
    distinct random rows from the source (a ``torch.Generator`` seeded from the fit's seed; the
    sorted rows read by :meth:`Source.take`) and calls the model with ``num_rows=n``, so no more
    than one mini-batch is in memory. :attr:`x`, :attr:`y` are the data the model is traced on
    (site shapes, the guide's init check): the whole tensors, or the first rows of the source.
    """

    def __init__(self, source: Source, subsample_size: int | None, seed: int, desc: str):
        self.source, self.subsample_size = source, subsample_size
        tensors = source.tensors()
        self.out_of_core = tensors is None
        if self.out_of_core and subsample_size is None:
            raise ValueError(
                f"x is a {source.kind} source of {source.num_rows} rows read out of core: {desc} "
                "on it needs mini-batches; pass subsample_size (e.g. subsample_size=1024) so that "
                "each step reads that many random rows. Full-batch steps would read every row at "
                "every step; for data that fit in memory pass them as a tensor or np.asarray(x)."
            )
        if self.out_of_core:
            self.generator = torch.Generator().manual_seed(int(seed))
            self.x, self.y = source.head(_HEAD_ROWS)
        else:
            self.x, self.y = tensors

    @property
    def rows_per_step(self) -> int:
        """Rows one step processes (the mini-batch, or every row)."""
        return self.source.num_rows if self.subsample_size is None else self.subsample_size

    def __call__(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the next step's model and guide call."""
        if not self.out_of_core:
            kwargs = {} if self.subsample_size is None else {"subsample_size": self.subsample_size}
            return (self.x, self.y), kwargs
        n = self.source.num_rows
        rows = sample_rows(n, self.subsample_size, self.generator)
        x, y = self.source.take(rows)
        finite = torch.isfinite(x).all(dim=1) & torch.isfinite(y)
        if not bool(finite.all()):
            row = int(rows[(~finite).nonzero()[0, 0].cpu()])
            raise ValueError(self.source.non_finite_message(row))
        return (x, y), {"num_rows": n}

    def evaluation_data(self, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(x, y, rows)`` the output is evaluated on: the whole data (``rows`` None) in memory;
        out of core :data:`EVALUATION_ROWS` (or all n when fewer) random rows from a generator
        seeded from ``seed`` alone (``child_seed(seed, 1)``, apart from the steps' stream), so the
        same rows for every fit with that seed."""
        if not self.out_of_core:
            return self.x, self.y, None
        n = self.source.num_rows
        generator = torch.Generator().manual_seed(child_seed(seed, 1))
        rows = sample_rows(n, min(n, EVALUATION_ROWS), generator)
        x, y = self.source.take(rows)
        return x, y, rows


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc)


@contextlib.contextmanager
def _fit_context(seed: int, device: torch.device, num_threads: int | None):
    """Seeded and restored random state, a private parameter store, the requested threads."""
    with seeded_rng(seed, device), pyro.get_param_store().scope(), torch_threads(num_threads):
        yield


def _diverged(desc: str, step: int, loss, lr: float) -> ValueError:
    return ValueError(
        f"{desc} diverged at step {step} (loss is {loss}); lower lr (got {lr:g}), e.g. "
        f"lr={lr / 10:g}"
    )


def _run_svi(model, guide, batches: _Batches, num_steps, lr, progress, desc):
    """Adam steps on the data ``batches`` gives each step; a non-finite loss, or Pyro refusing the
    parameters a step produced (e.g. a noise that underflowed to 0), is reported as divergence
    with the ``lr`` to lower."""
    optimizer = pyro.optim.Adam({"lr": lr})
    svi = SVI(model, guide, optimizer, loss=Trace_ELBO(max_plate_nesting=1))
    losses = []
    for step in _progress(range(num_steps), progress, desc):
        args, kwargs = batches()
        try:
            loss = svi.step(*args, **kwargs)
        except ValueError as error:
            if step > 0 and "invalid values" in str(error):  # the start was fine: a step broke it
                raise _diverged(desc, step, "nan/inf", lr) from error
            raise
        if not math.isfinite(loss):
            raise _diverged(desc, step, loss, lr)
        losses.append(loss)
    return losses


def _guide_draws(guide, latent: dict, num_samples: int, x, y) -> dict:
    """``num_samples`` draws of the latent sites from a fitted guide, vectorised where it can be."""
    with torch.no_grad():
        try:
            draws = Predictive(
                guide, num_samples=num_samples, parallel=True, return_sites=list(latent)
            )(x, y)
            if all(tuple(draws[name].shape) == (num_samples, *latent[name]) for name in latent):
                return draws
        except (RuntimeError, ValueError, NotImplementedError):
            pass
        # a guide that does not vectorise over an outer plate: one guide call per draw
        return Predictive(guide, num_samples=num_samples, return_sites=list(latent))(x, y)


def _final_elbo(losses: list[float]) -> float:
    tail = losses[-max(1, len(losses) // 10) :]
    return -float(sum(tail) / len(tail))


def _optimised_idata(model, batches: _Batches, samples, init, checked, attrs, feature_names):
    """InferenceData for an optimisation-based fit (MAP or SVI), with its ELBO trace and
    throughput in ``attrs``; out of core, evaluated on :meth:`_Batches.evaluation_data`."""
    x, y, rows = batches.evaluation_data(checked["seed"])
    kwargs = {"feature_names": feature_names}
    if rows is not None:
        attrs.update(
            data_kind=batches.source.kind,
            num_rows=batches.source.num_rows,
            subsample_size=batches.subsample_size,
            num_evaluation_rows=int(rows.numel()),
            evaluation_rows=rows.tolist(),
        )
        kwargs["obs_index"] = rows.numpy()
    return inference_data(
        model,
        x,
        y,
        samples,
        init,
        checked["align"],
        checked["seed"],
        attrs,
        posterior_predictive=checked.get("posterior_predictive", True),
        pointwise=checked["pointwise"],
        **kwargs,
    )


def _fixed_experts(init: MoEEstimate, shapes: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The experts' sites of the estimate ``init`` that the model has, on ``x``'s device and
    dtype: the values ``gate_only`` conditions the model on."""
    values = init.site_values(bias=True)
    return {
        name: values[name].to(device=x.device, dtype=x.dtype)
        for name in (sites.EXPERTS_WEIGHT, sites.EXPERTS_BIAS)
        if name in shapes
    }


def _fit(model, source: Source, init, guide, checked: dict, feature_names, *, num_samples, kind):
    """The one SVI fit behind :func:`fit_map` and :func:`fit_svi`.

    ``guide`` is an AutoGuide instance or an AutoGuide class, built on the model with the start's
    strategy as ``init_loc_fn``; ``kind`` is ``"map"`` for the delta guide of :func:`fit_map`
    (``attrs["inference"]`` ``"map"`` or ``"map_gate_only"``) and ``"svi"`` otherwise
    (``"svi_<guide class>"``). With ``checked["gate_only"]`` the model is conditioned on the
    estimate's experts, which are added to the draws. The MAP fit's one draw is its delta guide's
    point (:meth:`~pyro.infer.autoguide.AutoDelta.median`); :func:`fit_svi`'s guides are drawn
    from with :class:`~pyro.infer.Predictive`, their latent sites traced from the priors (on the
    fit's random stream) before the steps.
    """
    desc = "MAP" if kind == "map" else "SVI"
    batches = _Batches(source, checked["subsample_size"], checked["seed"], f"fit_{kind}")
    x, y = batches.x, batches.y
    init, init_attrs = prepare_init(model, init, x, y)
    with _fit_context(checked["seed"], source.device, checked["num_threads"]):
        strategy, shapes = strategy_for(init, model, x, y)
        fixed = _fixed_experts(init, shapes, x) if checked.get("gate_only") else {}
        fitted_model = poutine.condition(model, data=fixed) if fixed else model
        if not isinstance(guide, AutoGuide):
            guide = guide(fitted_model, **({} if strategy is None else {"init_loc_fn": strategy}))
            unique_name(guide)  # its parameters never meet another guide's in the global store
        point = kind == "map"  # the delta guide's one draw: its point
        latent = None if point else latent_site_shapes(model, x, y)
        start = time.perf_counter()
        losses = _run_svi(
            fitted_model,
            guide,
            batches,
            checked["num_steps"],
            checked["lr"],
            checked["progress"],
            desc,
        )
        seconds = time.perf_counter() - start
        psis_attrs = {}  # fit_svi: PSIS k-hat of the draws, maybe resampled (pyromoe.bayes.psis)
        with torch.no_grad():
            if point:
                draws = {name: value[None] for name, value in guide.median(x, y).items()}
            else:
                draws = _guide_draws(guide, latent, num_samples, x, y)
                draws = {name: draws[name] for name in latent}
                draws, psis_attrs = psis_of_guide(
                    model, guide, draws, source, (x, y),
                    resample=checked["importance_resample"], seed=checked["seed"],
                )  # fmt: skip
        if fixed:  # hand back a point over all of the model's sites, the experts' included
            point_values = {**{name: value[0] for name, value in draws.items()}, **fixed}
            guide = AutoDelta(model, init_loc_fn=init_to_value(values=point_values))
            unique_name(guide)
            guide(x, y)  # sets its parameters up at the point, inside the fit's private store
    samples = {name: value.detach()[None] for name, value in draws.items()}
    samples.update({name: value[None, None] for name, value in fixed.items()})
    if point:
        kind = "map_gate_only" if checked.get("gate_only") else "map"
    attrs = {
        "inference": kind if point else f"svi_{type(guide).__name__}",
        "final_elbo": _final_elbo(losses),
        "elbo": [-loss for loss in losses],
        "seconds": seconds,
        "rows_per_second": len(losses) * batches.rows_per_step / max(seconds, 1e-12),
        **init_attrs,
        **psis_attrs,
    }
    idata = _optimised_idata(model, batches, samples, init, checked, attrs, feature_names)
    register(idata, guide)  # pyromoe.trained_guide(idata) hands it back
    return idata


# ------------------------------------------------------------------------------------ MAP
#: how :func:`fit_map` checks its arguments, once per call (:func:`pyromoe._validation.validate`)
FIT_MAP_RULES = fit_rules(
    "seed",
    "subsample_size",
    "num_threads",
    "gate_only",
    "progress",
    "align",
    "num_steps",
    "lr",
    pointwise=pointwise_rule,
)


@validate(FIT_MAP_RULES)
def fit_map(
    model,
    x,
    y,
    init: MoEEstimate | Callable | None = None,
    *,
    gate_only: bool = False,
    pointwise: str | int = "auto",
    num_steps: int = 1000,
    lr: float = 0.01,
    subsample_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    align: bool = True,
    num_threads: int | None = None,
    device: str | torch.device | None = None,
    feature_names: list[str] | None = None,
    z=None,
):
    """MAP estimate with :class:`~pyro.infer.autoguide.AutoDelta`, started at ``init``.

    The fit of :func:`fit_svi` with a point (delta) guide and one draw, the MAP point.

    Data in memory (tensors, numpy arrays, pandas objects) are used whole at every step, or with
    ``subsample_size`` as the model's own mini-batches. Out-of-core data (a numpy memory map such
    as ``np.load(path, mmap_mode="r")``, a ``dask.array.Array``, or an out-of-core
    :class:`~pyromoe.core.sources.Source`) need ``subsample_size``: every step reads that many
    distinct random rows (a ``torch.Generator`` seeded from ``seed``) and the likelihood is scaled
    by ``n / subsample_size``, so at most one mini-batch is in memory whatever n. The output of an
    out-of-core fit is then evaluated on a fixed random subsample of at most
    :data:`EVALUATION_ROWS` rows (see Returns).

    Parameters
    ----------
    model : MixtureOfExperts
    x : Tensor, ndarray, numpy memmap or dask.array.Array (n, d)
    y : the same kinds (n,)
    init : MoEEstimate, callable or None
        Start (``None``: Pyro's default for AutoDelta, ``init_to_median``).
        An estimate with the other noise model is reconciled before any work
        (:func:`~pyromoe.bayes.init_strategy.match_noise_model`: a shared sd repeated for a
        per-expert model, per-expert sds pooled for a shared one), recorded in
        ``attrs["init_noise_conversion"]``; one with another number of experts or inputs is
        refused.
    gate_only : bool
        Fix the experts at ``init`` (``poutine.condition`` on ``experts.weight`` / ``experts.bias``)
        and fit only the gate sites and the noise: EM's gate step in Pyro form. Needs an estimate.
    num_steps : int
        Adam steps.
    lr : float
        Adam learning rate.
    subsample_size : int, optional
        Mini-batch size (the likelihood is rescaled by the model).
    seed : int or None
        Seeds the fit's random numbers (the global generators are restored afterwards);
        ``None``: a fresh seed. Recorded in ``attrs["seed"]``.
    progress : bool
        Show a tqdm progress bar.
    align : bool
        Relabel to ``init`` in the output (only matters with an estimate).
    num_threads : int, optional
        torch intra-op threads during the fit (restored afterwards; see :func:`run_nuts`).
    device : str or torch.device, optional
        Where to compute. ``None``: ``x``'s device (a tensor), else the CPU. In-memory data are
        moved there whole, out-of-core mini-batches one at a time; an estimate given as ``init``
        is moved there too. Everything runs in ``x``'s dtype.
    pointwise : "auto", "all" or int
        The rows the pointwise groups keep (:mod:`pyromoe.bayes.pointwise`): every row up to
        ``POINTWISE_CELLS`` draws x rows, beyond it a seeded random subsample in float32
        (``"auto"``), at most that many rows (an int) or every row (``"all"``; out of core: every
        evaluation row).
    z : Tensor, ndarray, DataFrame or dask.array.Array (n, gate_features), optional
        The gate's own covariates, for a model built with ``gate_features`` (or pass the joined
        design ``[x | z]`` as ``x``); ``feature_names`` then name the joined columns.
    feature_names : list of str, optional
        Names of the inputs, the ``feature`` coordinates of the output (``d`` distinct strings).
        Default: the column labels of ``x`` when it is a pandas DataFrame with string labels,
        else 0..d-1.

    Returns
    -------
    arviz.InferenceData
        One chain, one draw (the MAP point); ``attrs["final_elbo"]`` and ``attrs["elbo"]`` (trace),
        ``attrs["seconds"]`` (the steps' wall time) and ``attrs["rows_per_second"]`` (rows the
        steps processed, ``num_steps`` times the mini-batch size or n, per second of it). Out of
        core, the groups that need the data (``log_likelihood``, ``posterior_predictive``,
        ``observed_data``, ``constant_data``, ``sample_stats.log_likelihood_total`` and
        ``attrs["chain_mean_log_likelihood"]``) are computed on ``min(n, EVALUATION_ROWS)``
        distinct random rows, the same for every fit with the same ``seed``; their ``obs``
        coordinate and ``attrs["evaluation_rows"]`` are those rows' indices, and ``attrs`` add
        ``data_kind``, ``num_rows``, ``subsample_size`` and ``num_evaluation_rows``. The trained
        ``AutoDelta`` is handed back by :func:`~pyromoe.trained_guide` (with ``gate_only``: an
        ``AutoDelta`` over all of the model's sites, the experts at the estimate), for
        ``pyro.infer.Predictive(model, guide=...)`` or your own Pyro code.

    Raises
    ------
    ValueError
        If ``gate_only`` without an estimate, or the estimate does not fit the model; invalid
        arguments (checked before any work), including a ``device`` that does not exist and
        out-of-core data without ``subsample_size``; a fit that diverges (non-finite loss: lower
        ``lr``); non-finite values in an out-of-core mini-batch (naming the row).
    TypeError
        If ``model`` is not a model instance (e.g. the class itself), or arguments of the wrong type.

    Examples
    --------
    >>> from pyromoe import MixtureOfExperts, simulate
    >>> data = simulate(200, 2, seed=0)
    >>> model = MixtureOfExperts(2, 2, bias=False)
    >>> idata = fit_map(model, data.x, data.y, init=data.truth, num_steps=20)
    >>> idata.posterior["noise"].shape
    (1, 1)
    """
    source, feature_names = fit_data(model, x, y, z, device, subsample_size, feature_names)
    if gate_only and not isinstance(init, MoEEstimate):
        raise ValueError(
            "gate_only=True fixes the experts at an estimate: init must be a MoEEstimate; "
            f"got {type(init).__name__}"
        )
    checked = dict(seed=seed, subsample_size=subsample_size, num_threads=num_threads)
    checked.update(gate_only=gate_only, progress=progress, align=align)
    checked.update(num_steps=num_steps, lr=lr, pointwise=pointwise)
    return _fit(model, source, init, AutoDelta, checked, feature_names, num_samples=1, kind="map")


# ------------------------------------------------------------------------------------ SVI
#: autoguides by the names ``fit_svi`` takes
_GUIDES: dict[str, type[AutoGuide]] = {
    "normal": AutoNormal,
    "lowrank": AutoLowRankMultivariateNormal,
    "mvn": AutoMultivariateNormal,
}


def _guide_rule(guide, name: str):
    if not isinstance(guide, AutoGuide) and guide not in _GUIDES:
        raise ValueError(
            f"{name} must be 'normal', 'lowrank', 'mvn' or a pyro AutoGuide instance; got {guide!r}"
        )
    return guide


#: how :func:`fit_svi` checks its arguments, once per call (:func:`pyromoe._validation.validate`)
FIT_SVI_RULES = fit_rules(
    "seed",
    "subsample_size",
    "num_threads",
    "progress",
    "align",
    "posterior_predictive",
    "num_steps",
    "lr",
    num_samples=count_rule(minimum=1),
    guide=_guide_rule,
    model=model_or_mixture_rule,
    pointwise=pointwise_rule,
    importance_resample=check_flag,
)


@validate(FIT_SVI_RULES)
def fit_svi(
    model,
    x,
    y,
    init: MoEEstimate | Callable | None = None,
    *,
    guide: str | AutoGuide = "normal",
    num_steps: int = 2000,
    lr: float = 0.01,
    subsample_size: int | None = None,
    num_samples: int = 1000,
    importance_resample: bool = False,
    seed: int = 0,
    progress: bool = True,
    align: bool = True,
    posterior_predictive: bool = True,
    pointwise: str | int = "auto",
    num_threads: int | None = None,
    device: str | torch.device | None = None,
    feature_names: list[str] | None = None,
    z=None,
):
    """Variational inference with an autoguide started at ``init``; posterior draws from the guide.

    Takes the same data as :func:`fit_map`: in memory, or out of core (a numpy memory map, a
    ``dask.array.Array``) with ``subsample_size`` rows read from it at random at every step, the
    likelihood scaled by ``n / subsample_size``.

    Parameters
    ----------
    model : MixtureOfExperts or a Pyro model around one
        As in :func:`~pyromoe.run_nuts` (a model of your own: all rows in memory, no ``z``; the
        guide covers all its sites; :func:`~pyromoe.trained_guide` under the model's site names;
        no PSIS: ``psis_khat`` nan, ``importance_resample`` refused).
    x : Tensor, ndarray, numpy memmap or dask.array.Array (n, d)
    y : the same kinds (n,)
    init : MoEEstimate, callable or None
        Start of the guide's location (``None``: the autoguide's own default).
        An estimate is reconciled with the model's noise model as in :func:`fit_map`.
    guide : {"normal", "lowrank", "mvn"} or AutoGuide
        :class:`~pyro.infer.autoguide.AutoNormal` (mean field), :class:`~pyro.infer.autoguide.
        AutoLowRankMultivariateNormal`, :class:`~pyro.infer.autoguide.AutoMultivariateNormal`
        (full covariance), or your own guide (then ``init`` is only used for alignment).
        Calibration, measured by simulation-based calibration (``benchmarks/results/sbc.md``):
        every guide's intervals for the noise and the log-likelihood are too narrow; the
        ``"lowrank"`` and ``"mvn"`` guides' intervals for ``E[y | x]`` are close to calibrated,
        AutoNormal's less so. For intervals you report, prefer :func:`run_nuts`.
    num_steps, lr, subsample_size, seed, num_threads, device
        As in :func:`fit_map` (Adam steps and rate, mini-batch size for large n, ...;
        ``subsample_size`` is required for out-of-core data).
    num_samples : int
        Posterior draws taken from the fitted guide.
    importance_resample : bool
        Return the draws resampled with their Pareto-smoothed importance weights against the model
        (:mod:`pyromoe.bayes.psis`) when k-hat is at most 0.7; above, the guide's draws with a
        :class:`~pyromoe.PSISWarning`. Either way ``attrs["psis_khat"]`` is recorded.
    progress : bool
        tqdm progress bar over the steps.
    align : bool
        Relabel the draws to ``init`` when it is an estimate.
    posterior_predictive : bool
        Add the posterior predictive group.
    pointwise : "auto", "all" or int
        As in :func:`fit_map`.
    z : Tensor, ndarray, DataFrame or dask.array.Array (n, gate_features), optional
        The gate's own covariates, for a model built with ``gate_features`` (or pass the joined
        design ``[x | z]`` as ``x``); ``feature_names`` then name the joined columns.
    feature_names : list of str, optional
        As in :func:`fit_map`.

    Returns
    -------
    arviz.InferenceData
        One chain of ``num_samples`` draws; ``attrs["final_elbo"]`` (mean of the last 10% of the
        steps), ``attrs["elbo"]`` (per step), ``attrs["seconds"]`` and
        ``attrs["rows_per_second"]`` as in :func:`fit_map`; ``attrs["psis_khat"]`` (Pareto k-hat of
        the draws' importance weights, one pass over every row; above 0.7 a
        :class:`~pyromoe.PSISWarning`: prefer :func:`run_nuts`), ``psis_ess`` and ``psis_draws``
        (``"guide"`` or ``"importance_resampled"``). Out of core, the groups that need the
        data are computed on a fixed random subsample of at most :data:`EVALUATION_ROWS` rows,
        recorded as in :func:`fit_map`; the ``posterior`` group is always the guide's draws.
        The trained guide itself: ``pyromoe.trained_guide(idata)``, e.g.
        ``pyro.infer.Predictive(model, guide=pyromoe.trained_guide(idata), num_samples=500)(x_new)``
        for predictive draws on new rows. It holds its parameters (``pyro.clear_param_store()``
        leaves it intact) and lives with this object in this process only (a copy or a file
        loaded back has none).

    Raises
    ------
    ValueError
        Invalid arguments (checked before any work), including an unknown ``guide``, a ``device``
        that does not exist and out-of-core data without ``subsample_size``; an estimate that
        does not fit the model; a fit that diverges (lower ``lr``).

    Examples
    --------
    >>> from pyromoe import MixtureOfExperts, simulate
    >>> data = simulate(200, 2, seed=0)
    >>> model = MixtureOfExperts(2, 2, bias=False)
    >>> idata = fit_svi(model, data.x, data.y, init=data.truth, num_steps=20, num_samples=10,
    ...                 progress=False)
    >>> idata.posterior["experts.weight"].shape
    (1, 10, 2, 2)
    """
    model, source, feature_names = fit_model_data(
        model, x, y, z, device, subsample_size, feature_names, importance_resample
    )
    checked = dict(seed=seed, subsample_size=subsample_size, num_threads=num_threads)
    checked.update(progress=progress, align=align, posterior_predictive=posterior_predictive)
    checked.update(pointwise=pointwise)
    checked.update(num_steps=num_steps, lr=lr, importance_resample=importance_resample)
    guide = guide if isinstance(guide, AutoGuide) else _GUIDES[guide]
    idata = _fit(
        model, source, init, guide, checked, feature_names, num_samples=num_samples, kind="svi"
    )
    if isinstance(model, UserModel):  # the guide for the user's model, under its site names
        register(idata, model.user_guide(trained_guide(idata)))
    return idata
