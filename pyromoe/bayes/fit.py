"""Thin, seeded wrappers around Pyro's MAP, SVI and NUTS that start at a point estimate and return ArviZ data.

Each wrapper takes ``init``: an :class:`pyromoe.MoEEstimate` (seeded start, via
:func:`pyromoe.init_to_moments`), ``None`` (Pyro's own default initialisation, for comparisons) or any
Pyro init strategy. Each runs with the global random generators seeded from ``seed`` and restored
afterwards (:func:`pyromoe.bayes._rng.seeded_rng`: results follow from the seed, the caller's own
random stream is left as it was) and inside a private Pyro parameter store
(``pyro.get_param_store().scope()``), so fits neither see nor leave parameters in the global store.

Data come in through :func:`pyromoe.core.sources.as_source` on the requested ``device``: in memory
(tensors, numpy arrays: used whole) or out of core (numpy memory maps, Dask arrays). MAP and SVI
read out-of-core data one random mini-batch of ``subsample_size`` rows per step (the model is told
the full size, ``model(x_batch, y_batch, num_rows=n)``, to scale the likelihood by n / B), and
evaluate their output on a fixed random subsample of at most :data:`EVALUATION_ROWS` rows; NUTS,
which needs every row at every step, reads such data into memory once.

NUTS statistics come from Pyro's public interfaces only: the potential energy (by default the
fused log joint of :mod:`pyromoe.bayes.potential`, else the potential of the traced model from
:func:`pyro.infer.mcmc.util.initialize_model`) goes into ``NUTS(potential_fn=...)`` wrapped in a
counter (gradient evaluations, hence leapfrog steps per draw); MCMC's ``hook_fn`` records each kept
draw's step size, leapfrog steps, ``lp`` (minus the potential energy at the draw), ``energy`` (the
Hamiltonian at the trajectory's start, its momentum read off the kernel's momentum sample sites) and
``acceptance_rate`` on the kernel of
the process that runs the chain, and the kernel's ``diagnostics()``, which Pyro sends back from
worker processes too, carries them home; divergences and acceptance come from
:meth:`pyro.infer.MCMC.diagnostics`.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import time
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoGuide,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.infer.autoguide.initialization import init_to_feasible, init_to_uniform
from pyro.infer.mcmc.util import initialize_model

from .._validation import (
    check_count,
    check_feature_names,
    check_flag,
    check_model,
    check_positive,
    check_probability,
    check_seed,
    child_seed,
)
from ..core import sites
from ..core.estimate import MoEEstimate
from ..core.sources import Source, as_source, sample_rows
from ..core.threads import check_num_threads, torch_threads
from ._rng import seeded_rng
from .init_strategy import (
    check_estimate_fits_model,
    init_to_moments,
    latent_site_shapes,
    match_noise_model,
)
from .laplace import laplace_approximation
from .model import MixtureOfExperts
from .potential import FusedPotential, fused_potential, unsupported_prior
from .to_arviz import to_inference_data

__all__ = ["fit_map", "fit_svi", "run_nuts"]


# ------------------------------------------------------------------------------------ checks
#: how each wrapper argument is checked, by name: one table for the three wrappers
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


#: rows of an out-of-core source the output is evaluated on (log-likelihood, predictions)
EVALUATION_ROWS = 10_000

#: rows of an out-of-core source the model is traced on (site shapes, the estimate's check)
_HEAD_ROWS = 256


def _check_arguments(model, x, y, device=None, **arguments) -> tuple[Source, dict]:
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


def _estimate_on(init, device: torch.device):
    """``init`` on the data's device when it is an estimate elsewhere (else ``init`` itself)."""
    if isinstance(init, MoEEstimate) and init.experts_weight.device != device:
        return init.to(device=device)
    return init


def _matched_init(model, init, x, y) -> tuple[Any, dict]:
    """``(init, attrs)``: an estimate reconciled with the model before any work
    (:func:`~pyromoe.bayes.init_strategy.match_noise_model`: its number of experts and inputs
    checked, its noise repeated or pooled to the model's noise model), and the attrs recording a
    conversion (``init_noise_conversion``)."""
    if not isinstance(init, MoEEstimate):
        return init, {}
    init, note = match_noise_model(model, init, x, y)
    return init, ({} if note is None else {"init_noise_conversion": note})


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
            raise ValueError(
                f"x or y contains NaN or infinite values (at row {row}); drop or impute those "
                "rows before fitting"
            )
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


def _init_strategy(init, model, x, y) -> tuple[Callable | None, dict | None]:
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


def _init_name(init) -> str:
    """How a fit was started, for ``attrs["init"]``."""
    return "pyro_default" if init is None else getattr(init, "method", "strategy")


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


def _idata(model, x, y, samples, init, align, seed, attrs, **kwargs):
    """InferenceData of any wrapper: relabelled to ``init`` when it is an estimate and ``align``."""
    return to_inference_data(
        model,
        x,
        y,
        samples,
        align=init if (align and isinstance(init, MoEEstimate)) else None,
        seed=seed,
        attrs={**attrs, "init": _init_name(init), "seed": seed},
        **kwargs,
    )


def _optimised_idata(
    model,
    batches: _Batches,
    samples,
    kind,
    init,
    losses,
    seconds,
    checked,
    feature_names=None,
    init_attrs=None,
):
    """InferenceData for an optimisation-based fit (MAP or SVI), with its ELBO trace and
    throughput in attrs; out of core, evaluated on :meth:`_Batches.evaluation_data`."""
    attrs = {
        "inference": kind,
        "final_elbo": _final_elbo(losses),
        "elbo": [-loss for loss in losses],
        "seconds": seconds,
        "rows_per_second": len(losses) * batches.rows_per_step / max(seconds, 1e-12),
        **(init_attrs or {}),
    }
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
    return _idata(
        model,
        x,
        y,
        samples,
        init,
        checked["align"],
        checked["seed"],
        attrs,
        posterior_predictive=checked.get("posterior_predictive", True),
        **kwargs,
    )


# ------------------------------------------------------------------------------------ MAP
def fit_map(
    model,
    x,
    y,
    init: MoEEstimate | Callable | None = None,
    *,
    gate_only: bool = False,
    num_steps: int = 1000,
    lr: float = 0.01,
    subsample_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    align: bool = True,
    num_threads: int | None = None,
    device: str | torch.device | None = None,
    feature_names: list[str] | None = None,
):
    """MAP estimate with :class:`~pyro.infer.autoguide.AutoDelta`, started at ``init``.

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
        ``data_kind``, ``num_rows``, ``subsample_size`` and ``num_evaluation_rows``.

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
    source, checked = _check_arguments(
        model,
        x,
        y,
        device=device,
        seed=seed,
        subsample_size=subsample_size,
        num_threads=num_threads,
        gate_only=gate_only,
        progress=progress,
        align=align,
        num_steps=num_steps,
        lr=lr,
    )
    feature_names = check_feature_names(feature_names, source.in_features, x)
    if gate_only and not isinstance(init, MoEEstimate):
        raise ValueError(
            "gate_only=True fixes the experts at an estimate: init must be a MoEEstimate; "
            f"got {type(init).__name__}"
        )
    batches = _Batches(source, checked["subsample_size"], checked["seed"], "fit_map")
    init = _estimate_on(init, source.device)
    x, y = batches.x, batches.y
    init, init_attrs = _matched_init(model, init, x, y)
    with _fit_context(checked["seed"], source.device, checked["num_threads"]):
        strategy, shapes = _init_strategy(init, model, x, y)
        fixed: dict[str, torch.Tensor] = {}
        if gate_only:
            values = init.site_values(bias=True)
            fixed = {
                name: values[name].to(device=x.device, dtype=x.dtype)
                for name in (sites.EXPERTS_WEIGHT, sites.EXPERTS_BIAS)
                if name in shapes
            }
        fitted_model = poutine.condition(model, data=fixed) if fixed else model
        guide_kwargs = {} if strategy is None else {"init_loc_fn": strategy}
        guide = AutoDelta(fitted_model, **guide_kwargs)
        start = time.perf_counter()
        losses = _run_svi(
            fitted_model, guide, batches, checked["num_steps"], checked["lr"], progress, "MAP"
        )
        seconds = time.perf_counter() - start
        with torch.no_grad():
            point = {name: value.detach() for name, value in guide.median(x, y).items()}
    point.update(fixed)
    samples = {name: value[None, None] for name, value in point.items()}
    kind = "map_gate_only" if gate_only else "map"
    return _optimised_idata(
        model, batches, samples, kind, init, losses, seconds, checked, feature_names, init_attrs
    )


# ------------------------------------------------------------------------------------ SVI
#: autoguides by the names ``fit_svi`` takes
_GUIDES: dict[str, type[AutoGuide]] = {
    "normal": AutoNormal,
    "lowrank": AutoLowRankMultivariateNormal,
    "mvn": AutoMultivariateNormal,
}


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
    seed: int = 0,
    progress: bool = True,
    align: bool = True,
    posterior_predictive: bool = True,
    num_threads: int | None = None,
    device: str | torch.device | None = None,
    feature_names: list[str] | None = None,
):
    """Variational inference with an autoguide started at ``init``; posterior draws from the guide.

    Takes the same data as :func:`fit_map`: in memory, or out of core (a numpy memory map, a
    ``dask.array.Array``) with ``subsample_size`` rows read from it at random at every step, the
    likelihood scaled by ``n / subsample_size``.

    Parameters
    ----------
    model : MixtureOfExperts
    x : Tensor, ndarray, numpy memmap or dask.array.Array (n, d)
    y : the same kinds (n,)
    init : MoEEstimate, callable or None
        Start of the guide's location (``None``: the autoguide's own default).
        An estimate with the other noise model is reconciled before any work
        (:func:`~pyromoe.bayes.init_strategy.match_noise_model`: a shared sd repeated for a
        per-expert model, per-expert sds pooled for a shared one), recorded in
        ``attrs["init_noise_conversion"]``; one with another number of experts or inputs is
        refused.
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
    progress : bool
        tqdm progress bar over the steps.
    align : bool
        Relabel the draws to ``init`` when it is an estimate.
    posterior_predictive : bool
        Add the posterior predictive group.
    feature_names : list of str, optional
        Names of the inputs, the ``feature`` coordinates of the output (``d`` distinct strings).
        Default: the column labels of ``x`` when it is a pandas DataFrame with string labels,
        else 0..d-1.

    Returns
    -------
    arviz.InferenceData
        One chain of ``num_samples`` draws; ``attrs["final_elbo"]`` (mean of the last 10% of the
        steps), ``attrs["elbo"]`` (per step), ``attrs["seconds"]`` and
        ``attrs["rows_per_second"]`` as in :func:`fit_map`. Out of core, the groups that need the
        data are computed on a fixed random subsample of at most :data:`EVALUATION_ROWS` rows,
        recorded as in :func:`fit_map`; the ``posterior`` group is always the guide's draws.

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
    source, checked = _check_arguments(
        model,
        x,
        y,
        device=device,
        seed=seed,
        subsample_size=subsample_size,
        num_threads=num_threads,
        progress=progress,
        align=align,
        posterior_predictive=posterior_predictive,
        num_steps=num_steps,
        lr=lr,
    )
    feature_names = check_feature_names(feature_names, source.in_features, x)
    num_samples = check_count(num_samples, "num_samples", minimum=1)
    if not isinstance(guide, AutoGuide) and guide not in _GUIDES:
        raise ValueError(
            f"guide must be 'normal', 'lowrank', 'mvn' or a pyro AutoGuide instance; got {guide!r}"
        )
    batches = _Batches(source, checked["subsample_size"], checked["seed"], "fit_svi")
    init = _estimate_on(init, source.device)
    x, y = batches.x, batches.y
    init, init_attrs = _matched_init(model, init, x, y)
    with _fit_context(checked["seed"], source.device, checked["num_threads"]):
        strategy, _ = _init_strategy(init, model, x, y)
        if not isinstance(guide, AutoGuide):
            guide_kwargs = {} if strategy is None else {"init_loc_fn": strategy}
            guide = _GUIDES[guide](model, **guide_kwargs)
        latent = latent_site_shapes(model, x, y)
        start = time.perf_counter()
        losses = _run_svi(
            model, guide, batches, checked["num_steps"], checked["lr"], progress, "SVI"
        )
        seconds = time.perf_counter() - start
        draws = _guide_draws(guide, latent, num_samples, x, y)
    samples = {name: draws[name].detach()[None] for name in latent}
    kind = f"svi_{type(guide).__name__}"
    return _optimised_idata(
        model, batches, samples, kind, init, losses, seconds, checked, feature_names, init_attrs
    )


# ------------------------------------------------------------------------------------ NUTS
class _CountedPotential:
    """The model's potential energy, counting its evaluations.

    The potential is the fused one of :mod:`pyromoe.bayes.potential` when ``fused`` is given
    (a :class:`~pyromoe.bayes.potential.FusedPotential`), else ``initialize_model``'s
    ``potential_fn`` on the traced model (``jit_compile`` as asked). NUTS evaluates it with its
    gradient once per leapfrog step, and in warmup also to search for a step size, so
    :attr:`count` is the sampler's cost in gradient evaluations. The traced potential is built
    where it is first used and not pickled: Pyro wraps the model in closures that pickle cannot
    carry, so each spawned worker process builds its own, as Pyro's ``NUTS(model)`` does in
    ``setup``. The fused one is plain tensors and pickles as it is.
    """

    def __init__(self, model, model_args: tuple, transforms: dict, jit_compile: bool, fused=None):
        self.model, self.model_args = model, model_args
        self.transforms, self.jit_compile = transforms, jit_compile
        self.fused = fused
        self.count = 0
        self._potential_fn: Callable | None = None

    @property
    def path(self) -> str:
        """``"fused"`` or ``"traced"``: which potential runs (``attrs["potential"]``)."""
        return "traced" if self.fused is None else "fused"

    def __getstate__(self):
        return {**self.__dict__, "_potential_fn": None}

    def energy(self, params: dict) -> torch.Tensor:
        """The potential energy at unconstrained ``params``, not counted."""
        if self._potential_fn is None:
            if self.fused is not None:
                self._potential_fn = self.fused
            else:
                # tracing the model samples its priors: keep those draws off the chain's random
                # stream, so that both potentials give the same draws from the same seed
                device = self.model_args[0].device
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    _, self._potential_fn, _, _ = initialize_model(
                        self.model,
                        model_args=self.model_args,
                        transforms=self.transforms,
                        max_plate_nesting=1,
                        jit_compile=self.jit_compile,
                        skip_jit_warnings=True,
                        init_strategy=init_to_feasible,
                    )
        return self._potential_fn(params)

    def __call__(self, params: dict) -> torch.Tensor:
        self.count += 1
        return self.energy(params)


class _MomentumRecorder(poutine.messenger.Messenger):
    """Keeps the momentum HMC / NUTS draws at the start of a transition.

    Pyro's kernels draw the momentum as sample sites named ``r_t={t}_{sites}`` (standard normal in
    the mass matrix's whitened coordinates, Pyro's ``r_unscaled``); this handler records their
    values as they pass, and nothing else (the model's own sites, if the potential traces it, pass
    untouched).
    """

    def __enter__(self):
        self.values: list[torch.Tensor] = []
        return super().__enter__()

    def _pyro_post_sample(self, msg) -> None:
        if str(msg["name"]).startswith("r_t="):
            self.values.append(msg["value"].detach())


class _RecordingNUTS(NUTS):
    """NUTS on a :class:`_CountedPotential` that returns per-draw statistics with its diagnostics.

    Only the kernel's public interface is used: the potential comes in through ``potential_fn``;
    :meth:`setup` and :meth:`diagnostics` are the kernel methods MCMC calls once per chain (Pyro
    sends ``diagnostics()`` back from worker processes); :func:`_record_draw`, MCMC's ``hook_fn``,
    calls :meth:`record_draw` after every iteration with the kernel of the process running the
    chain. ``n_steps`` counts the potential's evaluations in the draw (its leapfrog steps);
    ``tree_depth`` is ``ceil(log2(n_steps + 1))``; ``lp`` is minus the potential energy at the draw
    (log joint density in unconstrained space, as ArviZ's ``lp``), evaluated once more, uncounted.

    ``energy`` is the Hamiltonian at the start of the draw's trajectory, right after the momentum
    is resampled: the potential energy of the previous state (the ``params`` NUTS starts from,
    evaluated once more, uncounted) plus the kinetic energy ``0.5 * |r|^2`` of the fresh momentum
    ``r`` in the mass matrix's whitened coordinates (Pyro's ``r_unscaled``, the standard normal
    draws of the kernel's ``r_t=...`` sample sites, read by :class:`_MomentumRecorder`). The
    Hamiltonian is conserved along the trajectory up to the integrator's error, so this is the
    energy of the draw's level set that Stan, PyMC and NumPyro report (they take it at the selected
    point, which differs by that error) and what ``az.bfmi`` / ``az.plot_energy`` need.
    ``acceptance_rate`` is the draw's mean Metropolis acceptance probability over the trajectory
    (what NUTS adapts the step size to), recovered from the kernel's running mean of it.
    """

    STATS = ("step_size", "n_steps", "tree_depth", "lp", "energy", "acceptance_rate")

    def __init__(self, potential: _CountedPotential, **kwargs):
        super().__init__(potential_fn=potential, **kwargs)
        self.potential = potential

    def setup(self, warmup_steps, *args, **kwargs):
        self.draw_stats: dict[str, list] = {name: [] for name in self.STATS}
        self.count_at_setup = self.potential.count
        super().setup(warmup_steps, *args, **kwargs)
        self.count_at_last_draw = self.potential.count

    def sample(self, params):
        # what record_draw needs of the transition: its start, its momentum, the running mean
        # acceptance probability before and after it
        accept_before = float(getattr(self, "_mean_accept_prob", math.nan))
        with _MomentumRecorder() as momentum:
            state = super().sample(params)
        self.transition = {
            "start": params,
            "kinetic_energy": 0.5 * sum(float((r * r).sum()) for r in momentum.values),
            "accept_before": accept_before,
            "accept_after": float(getattr(self, "_mean_accept_prob", math.nan)),
        }
        return state

    def record_draw(self, params: dict, stage: str) -> None:
        count = self.potential.count
        n_steps, self.count_at_last_draw = count - self.count_at_last_draw, count
        if not stage.lower().startswith("sample"):
            return
        transition = self.transition
        with torch.no_grad():
            lp = -float(self.potential.energy(params))
            start_potential = float(self.potential.energy(transition["start"]))
        stats = self.draw_stats
        # the kernel's mean over the n draws so far: m_n = m_{n-1} + (a_n - m_{n-1}) / n
        n = len(stats["lp"]) + 1
        acceptance = n * transition["accept_after"] - (n - 1) * transition["accept_before"]
        stats["step_size"].append(float(self.step_size))
        stats["n_steps"].append(n_steps)
        stats["tree_depth"].append(math.ceil(math.log2(n_steps + 1)))
        stats["lp"].append(lp)
        stats["energy"].append(start_potential + transition["kinetic_energy"])
        stats["acceptance_rate"].append(min(max(acceptance, 0.0), 1.0))

    def diagnostics(self):
        out = super().diagnostics()
        out["draw_stats"] = self.draw_stats
        out["num_gradient_evaluations"] = self.potential.count - self.count_at_setup  # warmup too
        return out


def _choose_potential(potential: str, model, x, y) -> FusedPotential | None:
    """The fused potential for ``potential="auto"`` / ``"fused"`` when the model has one, else None."""
    if potential not in ("auto", "fused", "traced"):
        raise ValueError(f"potential must be 'auto', 'fused' or 'traced'; got {potential!r}")
    if potential == "traced":
        return None
    known = isinstance(model, MixtureOfExperts)
    fused = fused_potential(model, x, y) if known else None
    if fused is None and potential == "fused":
        reason = (
            f"the prior of {unsupported_prior(model, x)!r} is not one it knows"
            if known
            else f"got a {type(model).__name__}, not a MixtureOfExperts"
        )
        raise ValueError(
            "potential='fused' needs a MixtureOfExperts with Normal priors (HalfCauchy or "
            f"HalfNormal on the noise); {reason}. Use potential='auto' or 'traced'."
        )
    return fused


def _record_draw(kernel, params, stage, i) -> None:
    """MCMC ``hook_fn`` (picklable for worker processes): hand the draw to the kernel."""
    kernel.record_draw(params, stage)


def _chain_starts(model, x, y, estimate, num_chains, jitter, seed):
    """Per-chain unconstrained starts: the estimate plus Laplace (or fixed-scale) Gaussian jitter."""
    approx = laplace_approximation(model, x, y, estimate)
    loc = approx["loc"]
    generator = torch.Generator().manual_seed(child_seed(seed, 1))
    eps = torch.randn(num_chains, loc.numel(), generator=generator, dtype=torch.float64)
    eps = eps.to(device=loc.device, dtype=loc.dtype)
    if jitter is True:
        factor = torch.linalg.cholesky(approx["covariance"])
        starts = loc + eps @ factor.T
    elif jitter is False or jitter == 0:
        starts = loc.expand(num_chains, -1)
    else:
        starts = loc + float(jitter) * eps
    return approx["unflatten"](starts)


def _nuts_sample_stats(mcmc: MCMC, num_chains: int, num_samples: int) -> tuple[dict, dict]:
    """(``sample_stats`` arrays (chain, draw), per-chain attrs) from ``mcmc.diagnostics()``."""
    diagnostics = mcmc.diagnostics()
    chains = [f"chain {chain}" for chain in range(num_chains)]
    diverging = torch.zeros(num_chains, num_samples, dtype=torch.bool)
    for chain, key in enumerate(chains):
        index = [i for i in diagnostics["divergences"][key] if 0 <= i < num_samples]
        diverging[chain, index] = True
    stats = {"diverging": diverging.numpy()}
    for name in _RecordingNUTS.STATS:
        stats[name] = torch.tensor(
            [diagnostics["draw_stats"][key][name] for key in chains], dtype=torch.float64
        ).numpy()
    attrs = {
        "num_divergences": int(diverging.sum()),
        "num_gradient_evaluations": [
            diagnostics["num_gradient_evaluations"][key] for key in chains
        ],
        "acceptance_rate": [float(diagnostics["acceptance rate"][key]) for key in chains],
    }
    return stats, attrs


def run_nuts(
    model,
    x,
    y,
    init: MoEEstimate | Callable | None = None,
    *,
    num_chains: int = 4,
    num_warmup: int = 500,
    num_samples: int = 500,
    seed: int = 0,
    jitter: bool | float = True,
    progress: bool = True,
    jit_compile: bool = True,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    align: bool = True,
    posterior_predictive: bool = True,
    mp_context: str | None = None,
    num_threads: int | None = 1,
    potential: str = "auto",
    device: str | torch.device | None = None,
    feature_names: list[str] | None = None,
):
    """NUTS with every chain started at ``init`` (jittered), returned as ArviZ ``InferenceData``.

    Chains run in worker processes when Pyro allows it (``num_chains <= cpu_count - 1``) and one
    after the other otherwise (any machine, including 2 cores).

    Parameters
    ----------
    model : MixtureOfExperts
    x : Tensor or ndarray (n, d)
        Or a numpy memory map / ``dask.array.Array``: NUTS evaluates the likelihood of every row
        at every leapfrog step, so such data are read into memory (on ``device``) once.
    y : Tensor or ndarray (n,)
    init : MoEEstimate, callable or None
        ``MoEEstimate``: seeded start. ``None``: Pyro's default (``init_to_uniform``). A callable:
        any Pyro init strategy (no jitter added).
        An estimate with the other noise model is reconciled before any work
        (:func:`~pyromoe.bayes.init_strategy.match_noise_model`: a shared sd repeated for a
        per-expert model, per-expert sds pooled for a shared one), recorded in
        ``attrs["init_noise_conversion"]``; one with another number of experts or inputs is
        refused.
    num_chains : int
        Chains (>= 1).
    num_warmup, num_samples : int
        Warm-up iterations (>= 0) and kept draws per chain (>= 4: Pyro's split r_hat, computed
        with the sampler's statistics, needs 4 draws per chain).
    seed : int or None
        Seeds the run's random numbers (the global generators are restored afterwards; worker
        processes seed theirs from it as Pyro does); the jitter uses its own generator seeded
        from it. ``None``: a fresh seed, recorded (like any seed) in ``attrs["seed"]``.
    jitter : bool or float
        Dispersed starts, needed for a meaningful r_hat (only with an estimate). ``True``: each
        chain starts at a draw from the Laplace approximation at the estimate
        (:func:`pyromoe.bayes.laplace.laplace_approximation`, in unconstrained space). A float
        ``s``: the estimate plus ``s * N(0, 1)`` per unconstrained coordinate. ``False`` / ``0``: every chain
        starts exactly at the estimate.
    progress : bool
        Pyro's progress bars.
    jit_compile : bool
        Compile the traced potential with the PyTorch JIT (``initialize_model(jit_compile=...)``).
        The fused potential always runs eagerly: measured on 2 CPU cores, ``torch.jit.trace`` of
        it was no faster per gradient and ``torch.compile`` took 10-40 s to compile, more than it
        saved in a run (benchmarks/README.md, NUTS speed).
    target_accept_prob, max_tree_depth
        NUTS settings: a probability strictly in (0, 1) and an int >= 1.
    align : bool
        Relabel every draw to the estimate (when ``init`` is one).
    posterior_predictive : bool
        Add the posterior predictive group.
    mp_context : str, optional
        Multiprocessing context for parallel chains (``"spawn"`` is used for CUDA tensors).
    num_threads : int or None
        torch intra-op threads while sampling (restored afterwards); ``None`` leaves them alone.
        The default 1 suits the small per-gradient tensors of NUTS: on a busy 2-core machine two
        threads made each gradient ~10x slower (50 s vs 3.7 s for 100 iterations at n = 300).
    potential : {"auto", "fused", "traced"}
        The potential energy NUTS differentiates. ``"fused"``: the model's log joint as one torch
        expression (:mod:`pyromoe.bayes.potential`; equal to the traced one to rounding, cheaper
        per gradient, see benchmarks/nuts_speed.py); it knows Normal priors and HalfCauchy /
        HalfNormal on the noise, and raises ``ValueError`` for another prior. ``"traced"``:
        Pyro's potential of the traced model (any prior). ``"auto"``: fused when every prior is
        one it knows, traced otherwise. Recorded in ``attrs["potential"]``.
    device : str or torch.device, optional
        Where to sample. ``None``: ``x``'s device (a tensor), else the CPU; the data (and an
        estimate given as ``init``) are moved there. Chains of CUDA data in worker processes use
        the ``"spawn"`` context.
    feature_names : list of str, optional
        Names of the inputs, the ``feature`` coordinates of the output (``d`` distinct strings).
        Default: the column labels of ``x`` when it is a pandas DataFrame with string labels,
        else 0..d-1.

    Returns
    -------
    arviz.InferenceData
        ``sample_stats`` (chain, draw), with ArviZ's names: ``diverging``, ``step_size``,
        ``n_steps`` (leapfrog steps), ``tree_depth``, ``lp`` (log joint density in unconstrained
        space, minus the potential energy), ``energy`` (the Hamiltonian, potential plus kinetic
        energy, at the start of the draw's trajectory after the momentum is resampled, so
        ``az.bfmi(idata)`` and ``az.plot_energy(idata)`` work), ``acceptance_rate`` (the draw's
        mean acceptance probability over its trajectory, what the step size is adapted to),
        ``log_likelihood_total``; ``attrs``: ``potential`` (``"fused"`` or ``"traced"``),
        ``num_divergences``, ``num_gradient_evaluations`` (per chain, warmup included: a cost
        measure that does not depend on machine load), ``acceptance_rate`` (per chain: Pyro's
        share of draws that moved), ``chain_mean_log_likelihood``, ``seconds``, the relabelling
        record.

    Raises
    ------
    ValueError
        ``num_chains < 1``, ``target_accept_prob`` outside (0, 1), ``max_tree_depth < 1``, a
        ``device`` that does not exist and other invalid arguments (all checked before any work), an estimate that does not fit the
        model (names the site), a model without the expected sites.
    TypeError
        If ``model`` is not a model instance (e.g. the class itself), or arguments of the wrong type.

    Examples
    --------
    >>> from pyromoe import MixtureOfExperts, simulate
    >>> data = simulate(100, 2, seed=0)
    >>> model = MixtureOfExperts(2, 2, bias=False)
    >>> idata = run_nuts(model, data.x, data.y, init=data.truth, num_chains=1, num_warmup=10,
    ...                  num_samples=10, progress=False)
    >>> idata.posterior["experts.weight"].dims
    ('chain', 'draw', 'expert', 'feature')
    """
    source, checked = _check_arguments(
        model,
        x,
        y,
        device=device,
        seed=seed,
        num_threads=num_threads,
        progress=progress,
        jit_compile=jit_compile,
        align=align,
        posterior_predictive=posterior_predictive,
        num_chains=num_chains,
        num_warmup=num_warmup,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
    )
    feature_names = check_feature_names(feature_names, source.in_features, x)
    num_samples = check_count(num_samples, "num_samples", minimum=4)
    num_chains, seed = checked["num_chains"], checked["seed"]
    if isinstance(jitter, bool):
        pass
    elif not isinstance(jitter, (int, float)) or not (jitter >= 0 and math.isfinite(jitter)):
        raise ValueError(f"jitter must be True, False or a finite float >= 0; got {jitter!r}")
    methods = multiprocessing.get_all_start_methods()
    if mp_context is not None and mp_context not in methods:
        raise ValueError(f"mp_context must be None or one of {methods}; got {mp_context!r}")
    if potential not in ("auto", "fused", "traced"):
        _choose_potential(potential, model, None, None)  # raises, naming the choices
    tensors = source.tensors()
    x, y = tensors if tensors is not None else source.take(torch.arange(source.num_rows))
    init = _estimate_on(init, x.device)
    init, init_attrs = _matched_init(model, init, x, y)
    fused = _choose_potential(potential, model, x, y)
    if mp_context is None and x.is_cuda and num_chains > 1:
        mp_context = "spawn"
    with (
        seeded_rng(seed, x.device),
        warnings.catch_warnings(),
        torch_threads(checked["num_threads"]),
    ):
        # Pyro warns when it falls back to sequential chains (fewer CPUs than chains): documented.
        warnings.filterwarnings("ignore", message=".*Chains will be drawn sequentially.*")
        # Pyro's jit_compile uses torch.jit.trace, deprecated in recent torch; nothing to act on
        warnings.filterwarnings("ignore", message=".*torch.jit.trace.* is deprecated.*")
        strategy, _ = _init_strategy(init, model, x, y)
        starts = None
        if isinstance(init, MoEEstimate):
            starts = _chain_starts(model, x, y, init, num_chains, jitter, seed)
            if num_chains == 1:
                starts = {name: value[0] for name, value in starts.items()}
        initial_params, _, transforms, _ = initialize_model(
            model,
            model_args=(x, y),
            max_plate_nesting=1,
            num_chains=num_chains,
            init_strategy=strategy if strategy is not None else init_to_uniform,
            initial_params=starts,
        )
        kernel = _RecordingNUTS(
            _CountedPotential(model, (x, y), transforms, checked["jit_compile"], fused=fused),
            target_accept_prob=checked["target_accept_prob"],
            max_tree_depth=checked["max_tree_depth"],
        )
        mcmc = MCMC(
            kernel,
            num_samples=num_samples,
            warmup_steps=num_warmup,
            num_chains=num_chains,
            initial_params=initial_params,
            hook_fn=_record_draw,
            disable_progbar=not progress,
            mp_context=mp_context,
            transforms=transforms,
        )
        start = time.perf_counter()
        mcmc.run()
        seconds = time.perf_counter() - start
    samples = mcmc.get_samples(group_by_chain=True)
    stats, chain_attrs = _nuts_sample_stats(mcmc, num_chains, num_samples)
    attrs = {
        "inference": "nuts",
        "potential": kernel.potential.path,
        "jitter": str(jitter) if isinstance(init, MoEEstimate) else "none",
        **chain_attrs,
        "seconds": seconds,
        "num_chains": num_chains,
        "num_warmup": checked["num_warmup"],
        "num_samples": num_samples,
        "parallel_chains": int(1 < num_chains <= max(multiprocessing.cpu_count() - 1, 1)),
        **init_attrs,
    }
    return _idata(
        model,
        x,
        y,
        samples,
        init,
        align,
        seed,
        attrs,
        sample_stats=stats,
        posterior_predictive=posterior_predictive,
        feature_names=feature_names,
    )
