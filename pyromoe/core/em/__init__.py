"""One EM loop for the gated mixture of experts: joint EM and gate EM (docs/algorithm.md section 4).

The package holds the machinery, by job; the public entries that take arrays and return an
estimate are :func:`pyromoe.fit_em` (joint EM from random starts or a given start) and
:func:`pyromoe.fit_gate` (the same loop with the experts frozen), in :mod:`pyromoe.estimators`.

- :mod:`.statistics`: :func:`~.statistics.pass_statistics`, the sums of one pass over chunks;
- :mod:`.m_step`: new parameters from those sums (experts, gate, noise; priors, noise floor);
- :mod:`.loop`: :class:`~.loop.EM`, starts x iterations with step halving, the best start kept,
  :class:`~.loop.ConvergenceWarning` and :class:`~.loop.CollapseWarning`;
- :mod:`.starts`: random and screened starts.
"""

from .loop import EM, MAX_HALVINGS, CollapseWarning, ConvergenceWarning, EMRun, warn_collapse
from .m_step import NOISE_FLOOR, feature_scale, log_prior, noise_floor, solve_linear_experts
from .starts import (
    SCREEN_CANDIDATES,
    SCREEN_MAX_ITER,
    SCREEN_ROWS,
    SCREEN_TOL,
    random_start,
    screened_start,
    start_params,
)
from .statistics import Statistics, mean_log_likelihood, pass_statistics

__all__ = [
    "EM",
    "MAX_HALVINGS",
    "NOISE_FLOOR",
    "SCREEN_CANDIDATES",
    "SCREEN_MAX_ITER",
    "SCREEN_ROWS",
    "SCREEN_TOL",
    "CollapseWarning",
    "ConvergenceWarning",
    "EMRun",
    "Statistics",
    "feature_scale",
    "log_prior",
    "mean_log_likelihood",
    "noise_floor",
    "pass_statistics",
    "random_start",
    "screened_start",
    "solve_linear_experts",
    "start_params",
    "warn_collapse",
]
