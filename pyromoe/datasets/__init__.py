"""Real data sets shipped with pyromoe: a table, NumPy arrays, a description, source and licence.

Three numeric classics, copied unchanged (values and column names) from the R packages that
distribute them, through the CSV files of the ``rdatasets`` collection, and the Palmer penguins
(numbers and factors, for formulas with a gate covariate: ``MoERegression``);
``pyromoe/datasets/data/SOURCES.md`` gives the full provenance and licence terms of each file. The
files are read with pandas alone: this package imports nothing else of pyromoe (it is a leaf the app
and the tutorials use).

==============  =====  ==  =========================================================================
name            n      d   what
==============  =====  ==  =========================================================================
old_faithful    272    1   waiting time to the next eruption vs eruption duration (two regimes)
mcycle          133    1   head acceleration vs time after a simulated motorcycle crash
concrete        1030   8   compressive strength of concrete vs mixture and age
penguins        333    3   body mass vs flipper length; factors species, island, sex (two regimes)
==============  =====  ==  =========================================================================

``x`` holds a data set's numeric inputs only; ``frame`` is the whole table (factors as pandas
Categoricals with fixed levels), the input of :class:`pyromoe.MoERegression`'s formulas.

The one-input sets have fewer inputs than any mixture's experts, so the moment (tensor) start does not
apply to them (it needs ``num_experts <= in_features``): they are fitted from EM starts. The concrete
data has eight inputs, enough for the tensor start with up to eight experts, but its inputs are far
from Gaussian (see its description), which the tutorials use to show what that does to the moments.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
    "load_penguins",
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
    frame : pandas.DataFrame
        The whole table, every column of the file in file order (also those not in ``x``):
        numeric columns float64, factors as unordered pandas Categoricals whose categories are the
        documented levels. For formulas: ``MoERegression("y ~ ...").fit(data.frame)``.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...]
    target_name: str
    description: str
    source: str
    license: str
    frame: pd.DataFrame

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
    file: str  # in pyromoe/datasets/data/
    target: str
    description: str
    source: str
    license: str
    # the numeric inputs of ``x``, in file order; None: every column but ``target``
    features: tuple[str, ...] | None = None
    # factor column -> its levels (the Categorical's categories, in this order)
    factors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


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
    "penguins": _Entry(
        file="penguins.csv",
        target="body_mass_g",
        features=("bill_length_mm", "bill_depth_mm", "flipper_length_mm"),
        factors={
            "species": ("Adelie", "Chinstrap", "Gentoo"),
            "island": ("Biscoe", "Dream", "Torgersen"),
            "sex": ("female", "male"),
        },
        description=(
            "Palmer penguins: 333 adult penguins (146 Adelie, 68 Chinstrap, 119 Gentoo) measured "
            "on three islands of the Palmer Archipelago, Antarctica, in 2007-2009 (the 11 rows of "
            "the original 344 with a missing value are left out). Target 'body_mass_g' (grams); "
            "numeric inputs 'bill_length_mm', 'bill_depth_mm', 'flipper_length_mm' (the arrays x "
            "and y); the table (frame) also has the factors 'species' (Adelie, Chinstrap, Gentoo), "
            "'island' (Biscoe, Dream, Torgersen) and 'sex' (female, male), and 'year'. Two "
            "regimes: at the same flipper length Gentoo penguins are heavier, and their mass "
            "grows faster with it (least squares within each group, mass ~ flipper + sex: "
            "slope 23.5 g/mm for Gentoo, 15.5 g/mm for Adelie and Chinstrap together; residual sd "
            "276 and 304 g against 356 g for one line); males are heavier than females of the "
            "same flipper length (by 598 and 502 g in those fits). Bill shape says which regime "
            "a bird is likely in without being an input of the experts, a gate covariate: Gentoo "
            "have long, shallow bills (bill_depth_mm 13.1-17.3, mean 15.0; the others 15.5-21.5, "
            "mean 18.4; Adelie bills are also short). A logistic regression of 'is Gentoo' on "
            "bill depth misclassifies 15 birds, on bill length and depth 6. Suggested model: "
            "MoERegression('body_mass_g ~ flipper_length_mm + C(sex)', gate='~ bill_length_mm + "
            "bill_depth_mm', num_experts=2); leave 'species' out of the model and compare the "
            "responsibilities with it afterwards (two experts can only split Gentoo from the "
            "other two species, which are alike in mass and flipper length). With bill depth "
            "alone in the gate, the best two-expert fit also gives the Gentoo expert the Adelie "
            "and Chinstrap with the shallowest bills (about a fifth of them, all with bill depth "
            "up to 17.3 mm). 'island' can enter the gate as a factor, "
            "but Gentoo live only on Biscoe (119 of its 163 birds; none on Dream or Torgersen), "
            "so only the prior keeps those gate coefficients finite."
        ),
        source=(
            "Gorman, K. B., Williams, T. D. and Fraser, W. R. (2014). Ecological sexual dimorphism "
            "and environmental variability within a community of Antarctic penguins (genus "
            "Pygoscelis). PLoS ONE 9(3), e90081, doi:10.1371/journal.pone.0090081; data collected "
            "by Dr. Kristen Gorman with the Palmer Station Long Term Ecological Research (LTER) "
            "Program. Distributed as R package 'palmerpenguins' (Horst, A. M., Hill, A. P. and "
            "Gorman, K. B. (2020), doi:10.5281/zenodo.3960218), data set 'penguins'; copied from "
            "the 'palmerpenguins' Python package 0.1.6 (its data/penguins.csv, identical to the "
            "rdatasets 0.2.10 copy of the R data set), rows with a missing value dropped."
        ),
        license=(
            "CC0 1.0 (public domain dedication; Palmer Station LTER Data Policy, LTER Data Access "
            "Policy for Type I data); attribution requested: Gorman, Williams and Fraser (2014)"
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
    # The shipped files are clean (a header, numbers or factor levels, no gaps), so plain pandas
    # reads them; the round-trip parser gives each value exactly as float() would, as
    # app.table.read_table does. Factor levels stay text until they become Categoricals.
    numeric = {column: np.float64 for column in _header(resource) if column not in entry.factors}
    with resource.open("r", encoding="utf-8", newline="") as stream:
        frame = pd.read_csv(
            stream,
            dtype={**numeric, **{column: str for column in entry.factors}},
            float_precision="round_trip",
            keep_default_na=False,
        )
    for column, levels in entry.factors.items():
        values = frame[column].astype(object)
        frame[column] = pd.Categorical(values, categories=list(levels))
        if frame[column].isna().any():  # a shipped file disagrees with its entry: never guess
            unknown = sorted(set(values[frame[column].isna()]))
            raise RuntimeError(f"{entry.file}: column '{column}' has undocumented levels {unknown}")
    if entry.features is None:
        features = frame.drop(columns=entry.target)
    else:
        features = frame[list(entry.features)]
    return Dataset(
        name=name,
        x=features.to_numpy(dtype=np.float64, copy=True),
        y=frame[entry.target].to_numpy(dtype=np.float64, copy=True),
        feature_names=tuple(str(column) for column in features.columns),
        target_name=entry.target,
        description=entry.description,
        source=entry.source,
        license=entry.license,
        frame=frame,
    )


def _header(resource) -> list[str]:
    with resource.open("r", encoding="utf-8", newline="") as stream:
        return stream.readline().strip().split(",")


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


def load_penguins() -> Dataset:
    """Palmer penguins (Gorman et al. 2014; CC0): body mass with factors and a gate covariate.

    For formulas with factors and a gate on its own covariates: the two regimes are Gentoo
    penguins and the other two species (see the description); ``species`` is the truth to compare
    the fitted responsibilities with, not an input.

    Returns
    -------
    Dataset
        ``frame`` (333, 8): ``species``, ``island``, ``sex`` (Categoricals), ``bill_length_mm``,
        ``bill_depth_mm``, ``flipper_length_mm`` (mm), ``body_mass_g`` (g), ``year``; ``x``
        (333, 3): the bill and flipper measurements; ``y`` (333,): body mass in grams.

    Examples
    --------
    >>> data = load_penguins()
    >>> data.frame.shape, data.target_name, list(data.frame["sex"].cat.categories)
    ((333, 8), 'body_mass_g', ['female', 'male'])
    >>> # pyromoe.MoERegression("body_mass_g ~ flipper_length_mm + C(sex)",
    >>> #     gate="~ bill_length_mm + bill_depth_mm", num_experts=2).fit(data.frame)
    """
    return _load("penguins")


#: The shipped data sets by name: ``DATASETS[name]()`` loads one (same as ``load_dataset(name)``).
DATASETS: Mapping[str, Callable[[], Dataset]] = types.MappingProxyType(
    {
        "old_faithful": load_old_faithful,
        "mcycle": load_mcycle,
        "concrete": load_concrete,
        "penguins": load_penguins,
    }
)


def load_dataset(name: str) -> Dataset:
    """Load a shipped data set by name.

    Parameters
    ----------
    name : str
        One of ``"old_faithful"``, ``"mcycle"``, ``"concrete"``, ``"penguins"`` (the keys of
        :data:`DATASETS`).

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
