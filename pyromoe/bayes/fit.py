"""Where the fits lived before they were split by job: :mod:`pyromoe.bayes.svi` (``fit_map``,
``fit_svi``) and :mod:`pyromoe.bayes.nuts` (``run_nuts``). Re-exports them until every caller
imports from there; new code imports ``pyromoe.fit_map`` etc."""

from __future__ import annotations

from .nuts import run_nuts
from .svi import EVALUATION_ROWS, fit_map, fit_svi

__all__ = ["EVALUATION_ROWS", "fit_map", "fit_svi", "run_nuts"]
