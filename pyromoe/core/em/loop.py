"""The one EM loop (docs/algorithm.md section 4): starts x iterations, best start kept.

:meth:`EM.fit` is scikit-learn's ``BaseMixture.fit_predict``: a plain double loop over starts and
iterations, tracking the objective (mean log-likelihood per row, or log posterior / n for MAP),
``n_iter`` and ``converged``, keeping the best start and warning (:class:`ConvergenceWarning`)
when that start did not converge, (:class:`CollapseWarning`) when it ends collapsing.

Each iteration is ONE pass over the data in chunks (:func:`pyromoe.core.em.statistics.
pass_statistics` summed by :meth:`pyromoe.core.sources.Source.reduce`), then the M-step from the
sums alone (:mod:`pyromoe.core.em.m_step`). The pass at the proposed parameters gives their
objective; a step that lowered it is halved (one more pass each), so the trace never decreases.
Extra memory is one chunk plus the sums, ``O(chunk_size (d + k) + k d^2)`` for any n, and the
result does not depend on the chunk size beyond rounding.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..chunks import default_chunk_size
from ..likelihood import expert_columns, gate_columns
from ..links import Link
from ..params import Params
from ..sources import Source
from .m_step import (
    accept_slack,
    expert_step,
    feature_scale,
    gate_step,
    log_prior,
    noise_floor,
    noise_step,
)
from .statistics import Statistics, complete_skipped_gram, expert_gram_block, pass_statistics

__all__ = [
    "EM",
    "DEFAULT_TOL",
    "MAX_HALVINGS",
    "CollapseWarning",
    "ConvergenceWarning",
    "EMRun",
    "collapse_report",
    "remaining_gain",
    "squarem_step",
    "warn_collapse",
]


class ConvergenceWarning(UserWarning):
    """An EM run stopped at ``max_iter`` before its objective changed by less than ``tol``."""


class CollapseWarning(UserWarning):
    """An EM fit ended with an expert holding fewer than ``d + 1`` effective rows, or with the
    noise at its floor: the expert is collapsing onto a few points (too many experts)."""


def collapse_report(
    responsibility: torch.Tensor, noise, floor: float, d: int
) -> tuple[list[float], list[int]]:
    """Effective rows per expert (``sum_n r_ni``, shape (k,)) and the experts collapsing onto a
    few points (see EMRun)."""
    effective = responsibility.tolist()
    collapsed = [i for i, rows in enumerate(effective) if rows < d + 1]
    noise = torch.as_tensor(noise).reshape(-1)
    if not collapsed and len(noise) > 1 and bool((noise <= floor * (1 + 1e-9)).any()):
        return effective, [int(torch.argmin(noise))]  # per-expert noise: the expert at its floor
    if not collapsed and float(noise.min()) <= floor * (1 + 1e-9):
        collapsed = [min(range(len(effective)), key=effective.__getitem__)]
    return effective, collapsed


def warn_collapse(collapsed, effective_rows, d: int, stacklevel: int = 3) -> None:
    """One :class:`CollapseWarning` naming the collapsing experts (nothing when there are none)."""
    if not collapsed:
        return
    parts = []
    for i in collapsed:
        rows = effective_rows[i]
        shown = f"{rows:.1f}" if float(f"{rows:.1f}") < d + 1 else f"{rows:.3f}"
        if rows < d + 1:
            parts.append(f"expert {i} holds {shown} effective rows (< d + 1 = {d + 1})")
        else:
            parts.append(f"expert {i} holds {shown} effective rows and the noise hit its floor")
    subject = "it is" if len(parts) == 1 else "they are"
    warnings.warn(
        f"{'; '.join(parts)}: {subject} collapsing onto a few points; use fewer experts",
        CollapseWarning,
        stacklevel=stacklevel,
    )


def _between(start: Params, end: Params, size: float) -> Params:
    """``start + size (end - start)`` for every parameter (absent ones stay absent)."""
    return Params(*(a if a is None else a + size * (b - a) for a, b in zip(start, end)))


@dataclass(frozen=True)
class EMRun:
    """One start's EM run (:meth:`EM.fit`).

    Attributes
    ----------
    params : Params
        The parameters at the end (absent biases stay None).
    trace : list of float
        The objective at the start and after every iteration; never decreasing up to rounding.
    converged : bool
        Whether the objective changed by less than ``tol`` before ``max_iter`` iterations.
    n_iter : int
        Iterations run.
    effective_rows : list of float
        Each expert's summed responsibilities at the end.
    collapsed_experts : list of int
        Experts with fewer than ``d + 1`` effective rows (or, with the noise at its floor, the one
        with the fewest).
    seconds : float
        Wall time of the run.
    passes : int
        Passes over the data (one per iteration, plus one per extra Newton step or step halving,
        plus the first).
    stopped : bool
        Whether the caller's ``stop`` rule (:meth:`EM.fit`) ended the run before convergence.
    """

    params: Params
    trace: list[float]
    converged: bool
    n_iter: int
    effective_rows: list[float]
    collapsed_experts: list[int]
    seconds: float
    passes: int = 0
    stopped: bool = False

    @property
    def objective(self) -> float:
        """The final objective."""
        return self.trace[-1]


#: :func:`remaining_gain` trusts a rate estimate only below this (slower: a plateau, not a tail).
MAX_RATE = 0.99


def remaining_gain(trace: list[float]) -> float:
    """The gain per row an EM run has left, extrapolated from its last two increments.

    EM converges linearly near an optimum: increments shrink by a rate ``r`` per iteration, so
    after an increment ``delta`` the run has about ``delta r / (1 - r)`` left (docs/algorithm.md
    section 4). Returns ``max(delta, delta r / (1 - r))``, 0 for a run that stood still, and
    infinity while the rate is unknown (fewer than two increments), not below 1 (speeding up) or
    above :data:`MAX_RATE` (a plateau).

    Examples
    --------
    >>> remaining_gain([0.0, 1.0, 1.5, 1.75])  # increments halve: 0.25 left
    0.25
    """
    if len(trace) >= 2 and trace[-1] - trace[-2] <= 0:
        return 0.0
    if len(trace) < 3:
        return float("inf")
    last, before = trace[-1] - trace[-2], trace[-2] - trace[-3]
    if before <= 0 or last / before >= MAX_RATE:
        return float("inf")
    rate = last / before
    return max(last, last * rate / (1.0 - rate))


#: EM's default tolerance: a run has converged when its objective (per row) changes by less.
DEFAULT_TOL = 1e-6

#: Step halvings an EM iteration may try before it keeps the parameters it started from.
MAX_HALVINGS = 30

#: Whether :meth:`EM.statistics` obtains one expert's Gram per pass as the design's Gram minus
#: the others' (identity link; see there). False: every expert's Gram is computed in every pass
#: (the explicit path, kept for comparison).
GRAM_IDENTITY = True

#: Whether :meth:`EM.fit` reuses the gate's Hessian of the previous pass in every second
#: iteration (a lazy Newton step: the gate's gradient is always fresh), one weighted Gram fewer
#: per such pass at k = 2 and ``k (k - 1) / 2`` fewer at k > 2. False: every pass forms it.
LAZY_GATE_HESSIAN = True


def _log_noise(params: Params) -> Params:
    return params._replace(noise=params.noise.log())


def _combine(coefficients: Sequence[float], chain: Sequence[Params]) -> Params:
    """``sum_j c_j chain_j`` for every parameter (absent ones stay absent)."""
    return Params(
        *(
            None if fields[0] is None else sum(c * t for c, t in zip(coefficients, fields))
            for fields in zip(*chain)
        )
    )


def _standard_parts(change: Params, units) -> list[torch.Tensor]:
    """A change of the parameters (noise on the log scale) in the units of standardised data,
    ``(x_mean, x_sd, y_sd)`` of the design (D,), (D,) and y (None: as it is). The parameters of
    data ``x -> s x + m`` and ``y -> t y + c`` are an affine map of those of the original data,
    and these coordinates are the same for both, so a length measured in them (the step of
    :func:`squarem_step`) does not depend on the data's units."""
    weight, gate = change.experts_weight, change.gate_weight
    if units is None:
        return [t for t in change if t is not None]
    x_mean, x_sd, y_sd = (u.to(weight) if torch.is_tensor(u) else u for u in units)
    width, gate_width = weight.shape[-1], gate.shape[-1]
    mean_e, sd_e = (expert_columns(u, width, gate_width) for u in (x_mean, x_sd))
    mean_g, sd_g = (gate_columns(u, width, gate_width) for u in (x_mean, x_sd))
    parts = [weight * sd_e / y_sd, gate * sd_g, change.noise]
    if change.experts_bias is not None:
        parts.append((change.experts_bias + weight @ mean_e) / y_sd)
    if change.gate_bias is not None:
        parts.append(change.gate_bias + gate @ mean_g)
    return parts


def squarem_step(chain: Sequence[Params], floor: float, units=None) -> Params | None:
    """The SQUAREM extrapolation (Varadhan & Roland 2008, scheme S3) from three consecutive EM
    iterates ``theta_0, theta_1 = F(theta_0), theta_2 = F(theta_1)``:
    ``theta' = theta_0 - 2 a r + a^2 v`` with ``r = theta_1 - theta_0``,
    ``v = theta_2 - 2 theta_1 + theta_0`` and ``a = -max(1, |r| / |v|)`` (``a = -1`` gives
    ``theta_2``), every parameter at once, the noise on the log scale and kept at or above
    ``floor``. The lengths are measured in the units of standardised data (``units``:
    ``(x_mean, x_sd, y_sd)``; see :func:`_standard_parts`), so the step, an affine combination
    of the iterates, does not depend on the data's units. None when ``v`` is zero.

    Examples
    --------
    >>> line = [Params(torch.tensor([[c]]), None, torch.zeros(1, 1), None, torch.tensor(1.0))
    ...         for c in (0.0, 0.5, 0.75)]
    >>> float(squarem_step(line, 1e-3).experts_weight)  # a geometric sequence: its limit
    1.0
    """
    logs = [_log_noise(p) for p in chain]
    r = _standard_parts(_combine((-1.0, 1.0), logs[:2]), units)
    v = _standard_parts(_combine((1.0, -2.0, 1.0), logs), units)
    r2 = sum(float(t.pow(2).sum()) for t in r)
    v2 = sum(float(t.pow(2).sum()) for t in v)
    if not (v2 > 0 and math.isfinite(r2) and math.isfinite(v2)):
        return None
    a = -max(1.0, math.sqrt(r2 / v2))
    leap = _combine(((1 + a) ** 2, -2 * a * (1 + a), a * a), logs)
    return leap._replace(noise=leap.noise.exp().clamp_min(floor))


@dataclass(frozen=True)
class EM:
    """EM over a data source: which parameters move, and how far each M-step goes.

    Each iteration is ONE pass over the data (:func:`pass_statistics` summed chunk by chunk) at
    the current parameters, then an M-step from the sums alone:

    * experts (unless frozen): identity link, weighted least squares per expert in closed form;
      other links, one Gauss-Newton step per expert;
    * gate: one Newton (IRLS) step of the weighted (multinomial) logistic regression, lazy in
      every second iteration (the Hessian of the pass before; :data:`LAZY_GATE_HESSIAN`);
    * noise (unless fixed): ``noise^2 = sum_n sum_i r_ni (y_n - g(a_i . u_n))^2 / n``, with the
      experts just solved (identity link: the squared error of the new experts follows from the
      sums exactly) or, for other links, with the experts before their step (the noise is then
      updated first: both orders are conditional maximisations).

    The next pass, at the proposed parameters, gives their objective. If it fell (an overshooting
    Newton step), the step is halved towards the previous parameters, one pass per halving: the
    M-step direction is an ascent direction of the objective, so a small enough step raises it,
    and the trace never decreases beyond rounding. ``newton_steps`` / ``gauss_newton_steps`` > 1
    take further steps within one M-step, each from one more pass with the responsibilities held.

    Joint EM moves everything; gate EM is ``update_experts=False``. Expert intercepts are fitted
    when the parameters carry them (``experts_bias`` not None), gate offsets when
    ``update_gate_bias``. MAP (``prior_scale``): ``Normal(0, s^2)`` priors on the gate's weights and
    offsets and, when they move, the experts' (a ridge ``noise^2 / s^2`` in their least squares);
    the noise stays maximum likelihood.

    Extra memory: one chunk's ``O(chunk_size (d + k))`` plus the sums' ``O(k d^2)``, any n.

    Attributes
    ----------
    source : Source
    link : Link
    update_experts, update_gate_bias, update_noise : bool
    prior_scale : float or None
    tol : float
        A start has converged when its objective changes by less than ``tol`` in one iteration.
    max_iter : int
    newton_steps : int
        Gate Newton steps per M-step.
    gauss_newton_steps : int
        Gauss-Newton steps per expert per M-step (links other than the identity).
    chunk_size : int, optional
        Rows per chunk of a pass (default :func:`pyromoe.core.chunks.default_chunk_size`).
    gain_tol : float, optional
        A convergence rule in total nats instead of ``tol``: a start has converged once the gain
        it has left, extrapolated from its last two increments (:func:`remaining_gain`), times
        the rows is below ``gain_tol`` (the M-step's own threshold becomes ``gain_tol / rows``).
        ``None``: the per-row ``tol``.
    accelerate : bool
        SQUAREM (:func:`squarem_step`): after every two consecutive full EM steps, the next pass
        is at the extrapolation of the last three iterates; it is kept when its objective is not
        below the current one (then the M-step continues from it), else the run goes on from
        the current parameters with one pass lost. The trace stays monotone, the fixed points
        are EM's, and a run stops only after a plain EM step changed the objective by less
        than ``tol``.
    """

    source: Source
    link: Link
    update_experts: bool = True
    update_gate_bias: bool = True
    update_noise: bool = True
    prior_scale: float | None = None
    tol: float = DEFAULT_TOL
    max_iter: int = 200
    newton_steps: int = 1
    gauss_newton_steps: int = 1
    chunk_size: int | None = None
    gain_tol: float | None = None
    accelerate: bool = False
    floor: float = field(init=False)
    #: the Gram of the experts' columns by their width, and the last pass's responsibility totals
    _grams: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "floor", noise_floor(self.source))
        if self.chunk_size is None:
            object.__setattr__(self, "chunk_size", default_chunk_size(self.source.in_features))

    @property
    def step_tol(self) -> float:
        """The per-row gain below which an M-step is not worth taking."""
        if self.gain_tol is None:
            return self.tol
        return self.gain_tol / max(self.source.num_rows, 1)

    def converged(self, trace: list[float]) -> bool:
        """Whether a run with this trace has converged (``tol`` per row, or ``gain_tol``)."""
        if self.gain_tol is None:
            return abs(trace[-1] - trace[-2]) < self.tol
        return remaining_gain(trace) * self.source.num_rows < self.gain_tol

    def _standard_units(self) -> tuple:
        """``(x_mean, x_sd, y_sd)`` of the source (its cached summary; sds of constant columns
        1) for :func:`squarem_step`."""
        summary = self.source.summary()
        y_sd = summary.y_sd if summary.y_sd > 0 else 1.0
        return summary.x_mean, feature_scale(self.source), y_sd

    @property
    def name(self) -> str:
        return "EM" if self.update_experts else "gate EM"

    def statistics(
        self,
        params: Params,
        linearise_at: Params | None = None,
        gate_hessian: torch.Tensor | None = None,
    ) -> Statistics:
        """One pass: the :class:`Statistics` at ``params`` (systems at ``linearise_at``).

        ``gate_hessian``: the gate's negative Hessian of an earlier pass, used instead of
        forming it in this one (a lazy Newton step; see :meth:`fit`).

        Identity link with the experts updated: the responsibilities sum to one over the
        experts, so their weighted Grams sum to the Gram ``G`` of the experts' columns. The first
        pass computes every expert's Gram and keeps their sum as ``G`` (float64, on this object);
        later passes compute all but one, that of the expert with the largest responsibility
        total in the previous pass, and take it as ``G`` minus the others' (float64): one
        weighted Gram fewer per pass, equal up to rounding (:data:`GRAM_IDENTITY`).
        """
        width = params.in_features
        identity = GRAM_IDENTITY and self.update_experts and self.link.is_identity
        gram = self._grams.get(width) if identity else None
        skip = None
        if gram is not None:
            last = self._grams.get("responsibility")
            k = params.num_experts
            skip = int(last.argmax()) if last is not None and last.shape[0] == k else k - 1
        statistics = self.source.reduce(
            pass_statistics,
            self.chunk_size,
            params,
            self.link,
            self.update_experts,
            self.update_gate_bias,
            linearise_at,
            skip,
            gate_hessian is None,
        )
        if gate_hessian is not None:
            statistics = statistics._replace(gate_hessian=gate_hessian)
        if identity:
            if skip is None:
                gram = expert_gram_block(statistics, width)
                if bool(torch.isfinite(gram).all()):  # not from a pass that failed
                    self._grams[width] = gram
            else:
                statistics = complete_skipped_gram(statistics, skip, gram)
            self._grams["responsibility"] = statistics.responsibility
        return statistics

    def objective(self, statistics: Statistics, params: Params) -> float:
        """Mean log-likelihood per row (plus log prior / n for MAP)."""
        experts = (params.experts_weight, params.experts_bias) if self.update_experts else ()
        prior = log_prior(self.prior_scale, *experts, params.gate_weight, params.gate_bias)
        return float(statistics.log_likelihood + prior) / float(statistics.rows)

    def m_step(
        self, statistics: Statistics, params: Params, *, experts: bool = True, gate: bool = True
    ) -> Params:
        """New parameters from the sums of one pass (experts, gate, noise; see the class and
        :mod:`pyromoe.core.em.m_step`)."""
        squared_error = statistics.squared_error
        if self.update_experts and experts:
            params, squared_error = expert_step(statistics, params, self.link, self.prior_scale)
        if gate:
            params = gate_step(
                statistics,
                params,
                fit_bias=self.update_gate_bias,
                prior_scale=self.prior_scale,
                tol=self.step_tol,
            )
        if self.update_noise:
            params = noise_step(statistics, params, squared_error, self.floor)
        return params

    def _propose(self, statistics: Statistics, params: Params) -> tuple[Params, int]:
        """The M-step's proposal and the extra passes its further Newton steps took."""
        proposal = self.m_step(statistics, params)
        nonlinear = self.update_experts and not self.link.is_identity
        extra = max(self.newton_steps, self.gauss_newton_steps if nonlinear else 1) - 1
        for step in range(1, extra + 1):
            held = self.statistics(params, linearise_at=proposal)
            proposal = self.m_step(
                held,
                proposal,
                experts=nonlinear and step < self.gauss_newton_steps,
                gate=step < self.newton_steps,
            )
        return proposal, extra

    def fit(
        self,
        starts: Sequence[Params],
        *,
        stacklevel: int = 2,
        stop: Callable[[list[float]], bool] | None = None,
    ) -> tuple[list[EMRun], int]:
        """EM from each start in turn; the runs and the index of the best (highest objective).

        ``stop``, called with a run's trace after each iteration, ends that run early when it
        returns True (``EMRun.stopped``): e.g. once a start can no longer beat a rival.
        Warns (``stacklevel`` as for :func:`warnings.warn`, counted from this method) with a
        :class:`ConvergenceWarning` when the best start did not converge, and a
        :class:`CollapseWarning` when it ends collapsing.
        """
        dtype = self.source.dtype
        units = self._standard_units() if self.accelerate else None
        runs: list[EMRun] = []
        for start in starts:
            began = time.perf_counter()
            params = start
            statistics = self.statistics(params)
            value = self.objective(statistics, params)
            trace, passes = [value], 1
            converged, stopped, n_iter = False, False, 0
            chain = [params]  # consecutive full EM steps since the last extrapolation
            for n_iter in range(1, self.max_iter + 1):  # noqa: B007 (n_iter is kept)
                leap = squarem_step(chain, self.floor, units) if len(chain) == 3 else None
                if len(chain) == 3:
                    chain = [params]
                if leap is not None:
                    leap_statistics = self.statistics(leap)
                    leap_value = self.objective(leap_statistics, leap)
                    passes += 1
                    if leap_value >= value:  # NaN or lower: go on from the current parameters
                        params, statistics, value = leap, leap_statistics, leap_value
                        chain = [params]
                        trace.append(value)
                        if stop is not None and stop(trace):
                            stopped = True
                            break
                        continue
                proposal, extra = self._propose(statistics, params)
                passes += extra
                candidate, size = proposal, 1.0
                # every second iteration the pass at the candidate does not form the gate's
                # Hessian: it carries that of the current parameters (one step old), so the
                # next M-step solves its fresh gradient against it (the first try only: a
                # halved step's pass forms one afresh). Near the optimum the Hessian moves by
                # O(|step|), so the step's error is O(|step|^2) and EM's linear rate is
                # unchanged; the halvings below keep the trace monotone.
                lazy = LAZY_GATE_HESSIAN and n_iter % 2 == 0 and statistics.gate_hessian.numel()
                for attempt in range(MAX_HALVINGS):
                    reused = statistics.gate_hessian if lazy and attempt == 0 else None
                    new_statistics = self.statistics(candidate, gate_hessian=reused)
                    new_value = self.objective(new_statistics, candidate)
                    passes += 1
                    if new_value >= value - accept_slack(value, dtype):
                        params, statistics, value = candidate, new_statistics, new_value
                        break
                    size *= 0.5
                    candidate = _between(params, proposal, size)
                if self.accelerate:
                    full_step = size == 1.0 and params is candidate
                    chain = [*chain, params] if full_step else [params]
                trace.append(value)  # unchanged when no step raised the objective
                if self.converged(trace):
                    converged = True
                    break
                if stop is not None and stop(trace):
                    stopped = True
                    break
            effective_rows, collapsed = collapse_report(
                statistics.responsibility, params.noise, self.floor, params.in_features
            )
            runs.append(
                EMRun(
                    params=params,
                    trace=trace,
                    converged=converged,
                    n_iter=n_iter,
                    effective_rows=effective_rows,
                    collapsed_experts=collapsed,
                    seconds=time.perf_counter() - began,
                    passes=passes,
                    stopped=stopped,
                )
            )
        best = max(range(len(runs)), key=lambda i: runs[i].objective)
        if not runs[best].converged:
            trace = runs[best].trace
            which = f" for the best start (start {best} of {len(runs)}; " if len(runs) > 1 else " ("
            rule = f"tol={self.tol:g}" if self.gain_tol is None else f"gain_tol={self.gain_tol:g}"
            warnings.warn(
                f"{self.name} did not converge in max_iter={self.max_iter} iterations{which}last "
                f"change of the objective {trace[-1] - trace[-2]:.3g}, {rule}); "
                "increase max_iter or tol",
                ConvergenceWarning,
                stacklevel=stacklevel + 1,
            )
        warn_collapse(
            runs[best].collapsed_experts,
            runs[best].effective_rows,
            runs[best].params.in_features,
            stacklevel=stacklevel + 2,
        )
        return runs, best
