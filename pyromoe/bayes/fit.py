"""Thin, seeded wrappers around Pyro's MAP, SVI and NUTS that start at a point estimate and return ArviZ data.

Each wrapper takes ``init``: an :class:`pyromoe.MoEEstimate` (seeded start, via
:func:`pyromoe.init_to_moments`), ``None`` (Pyro's own default initialisation, for comparisons) or any
Pyro init strategy. Each calls ``pyro.set_rng_seed(seed)`` first and runs inside a private Pyro
parameter store (``pyro.get_param_store().scope()``), so fits neither see nor leave parameters in
the global store.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import random
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoGuide,
    AutoLowRankMultivariateNormal,
    AutoNormal,
)

from .._validation import (
    as_tensors,
    check_count,
    check_flag,
    check_model,
    check_positive,
    check_probability,
    check_seed,
)
from ..core import sites
from ..core.estimate import MoEEstimate
from .init_strategy import check_estimate_fits_model, init_to_moments, laplace_approximation
from .to_arviz import to_inference_data

__all__ = ["fit_map", "fit_svi", "run_nuts"]


# ------------------------------------------------------------------------------------ checks
def _check_common(model, x, y, *, seed, subsample_size=None, num_threads=None, **flags):
    """The arguments every wrapper shares, checked before any work: (x, y, seed, threads)."""
    check_model(model)
    x, y = as_tensors(x, y, in_features=getattr(model, "in_features", None))
    seed = check_seed(seed)
    for name, value in flags.items():
        check_flag(value, name)
    if subsample_size is not None:
        subsample_size = check_count(subsample_size, "subsample_size", minimum=1)
        if subsample_size > x.shape[0]:
            raise ValueError(
                f"subsample_size must be at most the number of rows n={x.shape[0]}; got "
                f"{subsample_size}. Pass subsample_size=None for full-batch steps."
            )
    if num_threads is not None:
        num_threads = check_count(num_threads, "num_threads", minimum=1)
    return x, y, seed, num_threads


def _set_rng_seed(seed: int) -> None:
    """``pyro.set_rng_seed`` for any seed in [0, 2**63): numpy's global seed takes 32 bits.

    Identical to ``pyro.set_rng_seed(seed)`` for seeds below 2**32.
    """
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


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


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc)


@contextlib.contextmanager
def _torch_threads(num_threads: int | None):
    """Temporarily set torch's intra-op threads (restored afterwards)."""
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _latent_shapes(model, x, y) -> dict[str, tuple[int, ...]]:
    """Shapes of the model's latent sample sites (one prior run of the model)."""
    with poutine.block():
        trace = poutine.trace(model).get_trace(x, y)
    return {
        name: tuple(site["value"].shape)
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and type(site["fn"]).__name__ != "_Subsample"
    }


def _diverged(desc: str, step: int, loss, lr: float) -> ValueError:
    return ValueError(
        f"{desc} diverged at step {step} (loss is {loss}); lower lr (got {lr:g}), e.g. "
        f"lr={lr / 10:g}"
    )


def _run_svi(model, guide, x, y, num_steps, lr, subsample_size, progress, desc):
    """Adam steps; a non-finite loss, or Pyro refusing the parameters a step produced (e.g. a noise
    that underflowed to 0), is reported as divergence with the ``lr`` to lower."""
    optimizer = pyro.optim.Adam({"lr": lr})
    svi = SVI(model, guide, optimizer, loss=Trace_ELBO(max_plate_nesting=1))
    kwargs = {} if subsample_size is None else {"subsample_size": subsample_size}
    losses = []
    for step in _progress(range(num_steps), progress, desc):
        try:
            loss = svi.step(x, y, **kwargs)
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


def _final_elbo(losses: list[float], n: int) -> float:
    tail = losses[-max(1, len(losses) // 10) :]
    return -float(sum(tail) / len(tail))


def _optimised_idata(
    model, x, y, samples, kind, init, losses, seconds, seed, align, posterior_predictive=True
):
    """InferenceData for an optimisation-based fit (MAP or SVI), with its ELBO trace in attrs."""
    attrs = {
        "inference": kind,
        "init": "pyro_default" if init is None else getattr(init, "method", "strategy"),
        "final_elbo": _final_elbo(losses, x.shape[0]),
        "elbo": [-loss for loss in losses],
        "seconds": seconds,
        "seed": seed,
    }
    return to_inference_data(
        model,
        x,
        y,
        samples,
        align=init if (align and isinstance(init, MoEEstimate)) else None,
        posterior_predictive=posterior_predictive,
        seed=seed,
        attrs=attrs,
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
):
    """MAP estimate with :class:`~pyro.infer.autoguide.AutoDelta`, started at ``init``.

    Parameters
    ----------
    model : MixtureOfExperts
    x : Tensor or ndarray (n, d)
    y : Tensor or ndarray (n,)
    init : MoEEstimate, callable or None
        Start (``None``: Pyro's default for AutoDelta, ``init_to_median``).
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
        ``pyro.set_rng_seed(seed)`` before anything else (``None``: a fresh seed); recorded in
        ``attrs["seed"]``.
    progress : bool
        Show a tqdm progress bar.
    align : bool
        Relabel to ``init`` in the output (only matters with an estimate).
    num_threads : int, optional
        torch intra-op threads during the fit (restored afterwards; see :func:`run_nuts`).

    Returns
    -------
    arviz.InferenceData
        One chain, one draw (the MAP point); ``attrs["final_elbo"]`` and ``attrs["elbo"]`` (trace).

    Raises
    ------
    ValueError
        If ``gate_only`` without an estimate, or the estimate does not fit the model; invalid
        arguments (checked before any work); a fit that diverges (non-finite loss: lower ``lr``).
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
    x, y, seed, num_threads = _check_common(
        model,
        x,
        y,
        seed=seed,
        subsample_size=subsample_size,
        num_threads=num_threads,
        gate_only=gate_only,
        progress=progress,
        align=align,
    )
    num_steps = check_count(num_steps, "num_steps", minimum=1)
    lr = check_positive(lr, "lr")
    _set_rng_seed(seed)
    strategy, shapes = _init_strategy(init, model, x, y)
    fixed: dict[str, torch.Tensor] = {}
    if gate_only:
        if not isinstance(init, MoEEstimate):
            raise ValueError(
                "gate_only=True fixes the experts at an estimate: init must be a MoEEstimate; "
                f"got {type(init).__name__}"
            )
        values = init.site_values(bias=True)
        fixed = {
            name: values[name].to(device=x.device, dtype=x.dtype)
            for name in (sites.EXPERTS_WEIGHT, sites.EXPERTS_BIAS)
            if name in shapes
        }
    fitted_model = poutine.condition(model, data=fixed) if fixed else model
    with pyro.get_param_store().scope(), _torch_threads(num_threads):
        guide_kwargs = {} if strategy is None else {"init_loc_fn": strategy}
        guide = AutoDelta(fitted_model, **guide_kwargs)
        start = time.perf_counter()
        losses = _run_svi(fitted_model, guide, x, y, num_steps, lr, subsample_size, progress, "MAP")
        seconds = time.perf_counter() - start
        with torch.no_grad():
            point = {name: value.detach() for name, value in guide.median(x, y).items()}
    point.update(fixed)
    samples = {name: value[None, None] for name, value in point.items()}
    kind = "map_gate_only" if gate_only else "map"
    return _optimised_idata(model, x, y, samples, kind, init, losses, seconds, seed, align)


# ------------------------------------------------------------------------------------ SVI
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
):
    """Variational inference with an autoguide started at ``init``; posterior draws from the guide.

    Parameters
    ----------
    model : MixtureOfExperts
    x : Tensor or ndarray (n, d)
    y : Tensor or ndarray (n,)
    init : MoEEstimate, callable or None
        Start of the guide's location (``None``: the autoguide's own default).
    guide : {"normal", "lowrank"} or AutoGuide
        :class:`~pyro.infer.autoguide.AutoNormal`, :class:`~pyro.infer.autoguide.
        AutoLowRankMultivariateNormal`, or your own guide (then ``init`` is only used for alignment).
    num_steps : int
        Adam steps.
    lr : float
        Adam learning rate.
    subsample_size : int, optional
        Mini-batch size for large n.
    num_samples : int
        Posterior draws taken from the fitted guide.
    seed : int or None
        ``pyro.set_rng_seed(seed)`` first (``None``: a fresh seed); recorded in ``attrs["seed"]``.
    progress : bool
        tqdm progress bar over the steps.
    align : bool
        Relabel the draws to ``init`` when it is an estimate.
    posterior_predictive : bool
        Add the posterior predictive group.
    num_threads : int, optional
        torch intra-op threads during the fit (restored afterwards; see :func:`run_nuts`).

    Returns
    -------
    arviz.InferenceData
        One chain of ``num_samples`` draws; ``attrs["final_elbo"]`` (mean of the last 10% of the
        steps) and ``attrs["elbo"]`` (per step).

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
    x, y, seed, num_threads = _check_common(
        model,
        x,
        y,
        seed=seed,
        subsample_size=subsample_size,
        num_threads=num_threads,
        progress=progress,
        align=align,
        posterior_predictive=posterior_predictive,
    )
    num_steps = check_count(num_steps, "num_steps", minimum=1)
    num_samples = check_count(num_samples, "num_samples", minimum=1)
    lr = check_positive(lr, "lr")
    if not (isinstance(guide, AutoGuide) or guide in ("normal", "lowrank")):
        raise ValueError(
            f"guide must be 'normal', 'lowrank' or a pyro AutoGuide instance; got {guide!r}"
        )
    _set_rng_seed(seed)
    strategy, _ = _init_strategy(init, model, x, y)
    guide_kwargs = {} if strategy is None else {"init_loc_fn": strategy}
    if isinstance(guide, AutoGuide):
        pass
    elif guide == "normal":
        guide = AutoNormal(model, **guide_kwargs)
    elif guide == "lowrank":
        guide = AutoLowRankMultivariateNormal(model, **guide_kwargs)
    else:
        raise ValueError(
            f"guide must be 'normal', 'lowrank' or a pyro AutoGuide instance; got {guide!r}"
        )
    latent = _latent_shapes(model, x, y)
    with pyro.get_param_store().scope(), _torch_threads(num_threads):
        start = time.perf_counter()
        losses = _run_svi(model, guide, x, y, num_steps, lr, subsample_size, progress, "SVI")
        seconds = time.perf_counter() - start
        draws = _guide_draws(guide, latent, num_samples, x, y)
    samples = {name: draws[name].detach()[None] for name in latent}
    kind = f"svi_{type(guide).__name__}"
    return _optimised_idata(
        model, x, y, samples, kind, init, losses, seconds, seed, align, posterior_predictive
    )


# ------------------------------------------------------------------------------------ NUTS
class _RecordingNUTS(NUTS):
    """NUTS that records per-draw statistics and returns them with its end-of-chain diagnostics.

    The statistics travel back through ``kernel.diagnostics()``, which Pyro sends from worker
    processes too, so they survive parallel chains. ``n_steps`` counts potential-energy gradient
    evaluations (leapfrog steps) of the draw; ``tree_depth`` is ``ceil(log2(n_steps + 1))``.
    """

    _STATS = ("step_size", "n_steps", "tree_depth", "acceptance_rate", "lp")

    def setup(self, warmup_steps, *args, **kwargs):
        self._draw_stats = {name: [] for name in self._STATS}
        self._num_gradients = 0
        super().setup(warmup_steps, *args, **kwargs)

    def _initialize_model_properties(self, model_args, model_kwargs):
        super()._initialize_model_properties(model_args, model_kwargs)
        potential_fn = self.potential_fn

        def counted(params):
            self._num_gradients += 1
            return potential_fn(params)

        self.potential_fn = counted

    def sample(self, params):
        gradients, mean_before = self._num_gradients, self._mean_accept_prob
        z = super().sample(params)
        if self._t > self._warmup_steps:
            n = self._t - self._warmup_steps
            n_steps = self._num_gradients - gradients
            stats = self._draw_stats
            stats["step_size"].append(float(self.step_size))
            stats["n_steps"].append(n_steps)
            stats["tree_depth"].append(math.ceil(math.log2(n_steps + 1)))
            stats["acceptance_rate"].append(
                mean_before + n * (self._mean_accept_prob - mean_before)
            )
            stats["lp"].append(-float(self._potential_energy_last))
        return z

    def diagnostics(self):
        out = super().diagnostics()
        out["draw_stats"] = self._draw_stats
        out["num_gradients"] = self._num_gradients  # warmup included: the load-free cost
        return out


def _chain_starts(model, x, y, estimate, num_chains, jitter, seed):
    """Per-chain unconstrained starts: the estimate plus Laplace (or fixed-scale) Gaussian jitter."""
    approx = laplace_approximation(model, x, y, estimate)
    loc = approx["loc"]
    generator = torch.Generator().manual_seed(int(seed) + 1)
    eps = torch.randn(num_chains, loc.numel(), generator=generator, dtype=torch.float64)
    eps = eps.to(device=loc.device, dtype=loc.dtype)
    if jitter is True:
        factor = torch.linalg.cholesky(approx["covariance"])
        starts = loc + eps @ factor.T
    elif jitter is False or jitter == 0:
        starts = loc.expand(num_chains, -1)
    else:
        starts = loc + float(jitter) * eps
    per_chain = [approx["unflatten"](row) for row in starts]
    return {name: torch.stack([p[name] for p in per_chain]) for name in approx["names"]}


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
):
    """NUTS with every chain started at ``init`` (jittered), returned as ArviZ ``InferenceData``.

    Chains run in worker processes when Pyro allows it (``num_chains <= cpu_count - 1``) and one
    after the other otherwise (any machine, including 2 cores).

    Parameters
    ----------
    model : MixtureOfExperts
    x : Tensor or ndarray (n, d)
    y : Tensor or ndarray (n,)
    init : MoEEstimate, callable or None
        ``MoEEstimate``: seeded start. ``None``: Pyro's default (``init_to_uniform``). A callable:
        any Pyro init strategy (no jitter added).
    num_chains : int
        Chains (>= 1).
    num_warmup, num_samples : int
        Warm-up iterations (>= 0) and kept draws per chain (>= 4: Pyro's split r_hat, computed
        with the sampler's statistics, needs 4 draws per chain).
    seed : int or None
        ``pyro.set_rng_seed(seed)`` first; the jitter uses its own generator seeded from it.
        ``None``: a fresh seed, recorded (like any seed) in ``attrs["seed"]``.
    jitter : bool or float
        Dispersed starts, needed for a meaningful r_hat (only with an estimate). ``True``: each
        chain starts at a draw from the Laplace approximation at the estimate
        (:func:`pyromoe.bayes.init_strategy.laplace_approximation`, in unconstrained space). A float ``s``: the
        estimate plus ``s * N(0, 1)`` per unconstrained coordinate. ``False`` / ``0``: every chain
        starts exactly at the estimate.
    progress : bool
        Pyro's progress bars.
    jit_compile : bool
        Pyro's ``jit_compile`` for the potential energy.
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

    Returns
    -------
    arviz.InferenceData
        ``sample_stats``: ``diverging``, ``step_size``, ``n_steps``, ``tree_depth``,
        ``acceptance_rate``, ``lp``, ``log_likelihood_total``; ``attrs``: ``num_divergences``,
        ``num_gradient_evaluations`` (per chain, warmup included: a cost measure that does not
        depend on machine load), ``chain_mean_log_likelihood``, ``seconds``, the relabelling
        record.

    Raises
    ------
    ValueError
        ``num_chains < 1``, ``target_accept_prob`` outside (0, 1), ``max_tree_depth < 1`` and
        other invalid arguments (all checked before any work), an estimate that does not fit the
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
    x, y, seed, num_threads = _check_common(
        model,
        x,
        y,
        seed=seed,
        num_threads=num_threads,
        progress=progress,
        jit_compile=jit_compile,
        align=align,
        posterior_predictive=posterior_predictive,
    )
    num_chains = check_count(num_chains, "num_chains", minimum=1)
    num_warmup = check_count(num_warmup, "num_warmup", minimum=0)
    num_samples = check_count(num_samples, "num_samples", minimum=4)
    target_accept_prob = check_probability(target_accept_prob, "target_accept_prob")
    max_tree_depth = check_count(max_tree_depth, "max_tree_depth", minimum=1)
    if isinstance(jitter, bool):
        pass
    elif not isinstance(jitter, (int, float)) or not (jitter >= 0 and math.isfinite(jitter)):
        raise ValueError(f"jitter must be True, False or a finite float >= 0; got {jitter!r}")
    methods = multiprocessing.get_all_start_methods()
    if mp_context is not None and mp_context not in methods:
        raise ValueError(f"mp_context must be None or one of {methods}; got {mp_context!r}")
    _set_rng_seed(seed)
    strategy, _ = _init_strategy(init, model, x, y)
    initial_params = None
    if isinstance(init, MoEEstimate):
        initial_params = _chain_starts(model, x, y, init, num_chains, jitter, seed)
        if num_chains == 1:
            initial_params = {name: value[0] for name, value in initial_params.items()}
    kernel_kwargs: dict[str, Any] = dict(
        jit_compile=jit_compile,
        ignore_jit_warnings=True,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
        max_plate_nesting=1,
    )
    if strategy is not None:
        kernel_kwargs["init_strategy"] = strategy
    kernel = _RecordingNUTS(model, **kernel_kwargs)
    if mp_context is None and x.is_cuda and num_chains > 1:
        mp_context = "spawn"
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=num_warmup,
        num_chains=num_chains,
        initial_params=initial_params,
        disable_progbar=not progress,
        mp_context=mp_context,
    )
    start = time.perf_counter()
    with warnings.catch_warnings(), _torch_threads(num_threads):
        # Pyro warns when it falls back to sequential chains (fewer CPUs than chains): documented.
        warnings.filterwarnings("ignore", message=".*Chains will be drawn sequentially.*")
        # Pyro's jit_compile uses torch.jit.trace, deprecated in recent torch; nothing to act on
        warnings.filterwarnings("ignore", message=".*torch.jit.trace.* is deprecated.*")
        mcmc.run(x, y)
    seconds = time.perf_counter() - start
    samples = mcmc.get_samples(group_by_chain=True)
    diagnostics = mcmc.diagnostics()
    chains = [f"chain {chain}" for chain in range(num_chains)]
    diverging = torch.zeros(num_chains, num_samples, dtype=torch.bool)
    for chain, key in enumerate(chains):
        index = [i for i in diagnostics["divergences"][key] if 0 <= i < num_samples]
        diverging[chain, index] = True
    stats = {"diverging": diverging.numpy()}
    for name in _RecordingNUTS._STATS:
        stats[name] = torch.tensor(
            [diagnostics["draw_stats"][key][name] for key in chains], dtype=torch.float64
        ).numpy()
    attrs = {
        "inference": "nuts",
        "init": "pyro_default" if init is None else getattr(init, "method", "strategy"),
        "jitter": str(jitter) if isinstance(init, MoEEstimate) else "none",
        "num_divergences": int(diverging.sum()),
        "num_gradient_evaluations": [diagnostics["num_gradients"][key] for key in chains],
        "seconds": seconds,
        "num_chains": num_chains,
        "num_warmup": num_warmup,
        "num_samples": num_samples,
        "parallel_chains": int(1 < num_chains <= max(multiprocessing.cpu_count() - 1, 1)),
        "seed": seed,
    }
    return to_inference_data(
        model,
        x,
        y,
        samples,
        sample_stats=stats,
        align=init if (align and isinstance(init, MoEEstimate)) else None,
        posterior_predictive=posterior_predictive,
        seed=seed,
        attrs=attrs,
    )
