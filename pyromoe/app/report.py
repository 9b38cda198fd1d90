"""The Markdown reports of the demo and fit runs: tables, texts, the timings, the files written.

Templates and formatting only: the numbers come from :mod:`.fitting` and :mod:`.runs` (the
demo's own report is :mod:`.demo_report`).
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..bayes.convergence import convergence_summary
from ..core.estimate import MoEEstimate
from ..core.links import check_link
from .atomic import save_figure_atomic, write_netcdf_atomic, write_text_atomic
from .plots import parameter_summary

__all__ = ["markdown_table", "machine_info", "parameter_table", "comparison_rows"]


def parameter_table(
    idata, columns: dict[str, MoEEstimate], hdi_prob: float = 0.94
) -> list[dict[str, Any]]:
    """One row per scalar parameter: the given point values (e.g. truth, start), then ArviZ's
    posterior mean, sd, ``hdi_prob`` interval and, with several chains, ess and r_hat.

    The rows of :func:`pyromoe.app.plots.parameter_summary` (its index as the ``parameter`` key),
    as :func:`markdown_table` writes them.
    """
    return parameter_summary(idata, columns, hdi_prob).reset_index().to_dict("records")


_PARAMETER_COLUMNS = (
    "The posterior columns are ArviZ's `az.summary` (mean, sd, 94% HDI; with several chains "
    "ess_bulk, ess_tail and r_hat); experts are numbered from 0, gate rows from 1 (row j gives "
    "expert j's logit; expert 0 is the reference), inputs by column name (by position from 0 "
    "when they have none), as in the figures."
)


def markdown_table(rows: Sequence[dict[str, Any]], digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (dicts with the same keys)."""
    if not rows:
        return "(none)\n"
    keys = list(rows[0])

    def cell(value):
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine_info() -> str:
    return (
        f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads"
    )


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, step: str):
        timer = self

        class _Step:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[step] = time.perf_counter() - self.start

        return _Step()


def write_outputs(folder: Path, idata, figures: dict[str, Any], summary: str) -> None:
    import matplotlib.pyplot as plt

    write_netcdf_atomic(idata, folder / "inference_data.nc")
    for name, figure in figures.items():
        save_figure_atomic(figure, folder / f"{name}.png", dpi=90)
        plt.close(figure)
    write_text_atomic(folder / "summary.md", summary)


#: The columns of :func:`arviz.compare`'s table that `pyromoe fit --experts 1,2,...` reports.
COMPARE_COLUMNS = ("rank", "elpd_loo", "se", "elpd_diff", "dse", "p_loo", "weight", "warning")


def comparison_rows(table) -> list[dict[str, Any]]:
    """:func:`arviz.compare`'s table (indexed ``"k=1"``, ...) as rows ``{"k": "k=1", "rank": 0,
    ...}`` in rank order, with the columns of :data:`COMPARE_COLUMNS`."""
    rows = []
    for label, row in table.sort_values("rank").iterrows():
        record: dict[str, Any] = {"k": str(label)}
        for column in COMPARE_COLUMNS:
            value = row.get(column, float("nan"))
            if column == "rank":
                value = int(value)
            elif column == "warning":
                value = bool(value)
            else:
                value = float(value)
            record[column] = value
        rows.append(record)
    return rows


def fit_summary(numbers, estimate, idata, rows, scaling, method) -> str:
    extra = ""
    if method == "nuts":
        chain_ll = ", ".join(f"{v:.1f}" for v in idata.attrs["chain_mean_log_likelihood"])
        divergences = int(np.asarray(idata.sample_stats["diverging"].values).sum())
        extra = (
            f"NUTS: {idata.posterior.sizes['chain']} chains x {idata.posterior.sizes['draw']} draws, "
            f"{divergences} divergences; per-chain mean log-likelihood: {chain_ll} (a chain far "
            "below the others sits in a wrong mode).\n"
        )
        extra += convergence_summary(idata) + "\n"
    else:
        extra = (
            f"SVI: final ELBO {float(idata.attrs.get('final_elbo', float('nan'))):.2f}; PSIS "
            f"k-hat {float(idata.attrs.get('psis_khat', float('nan'))):.2f} (above 0.7 the "
            "guide is too far from the posterior to trust its intervals: use NUTS).\n"
        )
    seconds_rows = [{"step": k, "seconds": v} for k, v in numbers["seconds"].items()]
    k = numbers["num_experts"]
    if k == 1:
        model_text = "1 expert (a plain regression: no gate), with an intercept"
    else:
        model_text = f"{k} experts, each with an intercept, and the gate with an offset"
    noise_text = (
        "one noise sd per expert (`--noise per_expert`: rows `noise[i]`)"
        if numbers["noise"] == "per_expert"
        else "one noise sd shared by the experts (`--noise shared`)"
    )
    comparison_file = _comparison_file_text(numbers)
    return f"""# pyromoe fit

File `{numbers["file"]}`: {numbers["rows"]} rows, target `{numbers["target"]}`, inputs
{", ".join(f"`{f}`" for f in numbers["features"])}; {model_text}; link `{numbers["link"]}`;
{noise_text}.
{_comparison_text(numbers, method)}

**Inputs and target were standardised** (z-scores: value minus mean, divided by sd, the population
sd); the model was fitted on that scale (also in `standardisation.json` and the InferenceData's
`attrs["standardisation"]`):

{markdown_table(scaling, digits=4)}
## Initializer

`pyromoe.initialize(method="auto")` ran **{numbers["initializer"]}**: {
        numbers["initializer_reason"]
    }

```
{estimate.summary()}
```

## Posterior ({method.upper()}, experts labelled as in the start)

{extra}
{_PARAMETER_COLUMNS} The columns without a suffix are on the standardised scale.

{_data_units_text(numbers["link"])}

{markdown_table(rows)}
## Time of each step

{markdown_table(seconds_rows, digits=2)}
## Files

- `inference_data.nc` (ArviZ InferenceData, the standardised data and parameters).
{comparison_file}- `standardisation.json`: the mean and sd of every input column and of the target.
- `responsibilities.csv`: one row per data row (`obs`, from 0): each expert's responsibility
  p(expert | x, y) averaged over the posterior draws (`mean_expert_i`) and its 94% HDI over the
  draws (`hdi_3%_expert_i`, `hdi_97%_expert_i`), as `pyromoe.responsibilities` gives them.
- `trace.png`, `posterior.png` (posterior mean and 94% HDI of every parameter, the start marked),
  `posterior_predictive.png`.
- `responsibilities.png`: one panel per expert, {_responsibility_panels(numbers["features"])}
  on the standardised scale, points coloured by that expert's responsibility (posterior mean
  parameters).
"""


def _comparison_text(numbers, method: str) -> str:
    """The section of `pyromoe fit --experts 1,2,...`: the PSIS-LOO table (empty for one k)."""
    rows = numbers.get("comparison")
    if not rows:
        return ""
    shown = [{key: row[key] for key in ("k", *COMPARE_COLUMNS) if key != "weight"} for row in rows]
    best = rows[0]["k"]
    return f"""
## Number of experts: PSIS-LOO comparison

`pyromoe.bayes.compare.compare_experts` fitted each number of experts ({method.upper()}, started
from `pyromoe.initialize`) and `arviz.compare` ranked them by expected log predictive density
(PSIS-LOO; elpd_diff and dse are against the best; warning: `yes` when the Pareto k diagnostic of
PSIS is unreliable for that fit). {_svi_loo_note(method)}Also in `compare_experts.csv`.

{markdown_table(shown)}
**The rest of this report is for {best} ({_experts(numbers["num_experts"])}), the best-ranked.**
"""


def _experts(k: int) -> str:
    return "1 expert" if k == 1 else f"{k} experts"


def _svi_loo_note(method: str) -> str:
    if method != "svi":
        return ""
    return "With SVI, LOO is computed on the guide's draws: an approximation. "


def _comparison_file_text(numbers) -> str:
    if not numbers.get("comparison"):
        return ""
    return (
        "- `compare_experts.csv`: the PSIS-LOO comparison of the numbers of experts, one row per "
        "k in rank order (arviz.compare's columns, with its stacking weight).\n"
    )


def _responsibility_panels(features: Sequence[str]) -> str:
    if len(features) == 1:
        return "y against the input with that expert's fit,"
    return "y against that expert's fitted value g(a_i.x + b_i),"


def _data_units_text(link: str) -> str:
    """How the "(data units)" columns of the fit's table were computed."""
    text = (
        "The columns marked (data units) are the same parameters in the units of the data: with "
        "x_std = (x - m) / s per input and y_std = (y - m_y) / s_y, the noise is s_y sigma, the "
        "gate weights are w_j / s_j and the gate offsets c - sum_j w_j m_j / s_j"
    )
    if check_link(link).is_identity:
        return (
            text + "; the expert weights are s_y a_j / s_j and the intercepts "
            "s_y (b - sum_j a_j m_j / s_j) + m_y. Each draw is mapped, so the intervals are those "
            "of the mapped draws."
        )
    return (
        text + f". With the {link} link the experts have no data-unit form "
        f"(y = s_y g(a.x_std + b) + m_y: the link sits between the two scales), so their rows "
        "show '-' there. Each draw is mapped, so the intervals are those of the mapped draws."
    )
