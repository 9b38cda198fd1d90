"""pyromoe: gated Gaussian mixtures of experts in Pyro, started in the right basin.

The public API is re-exported here lazily (PEP 562 module ``__getattr__``): ``import pyromoe`` loads
nothing heavy, and each name imports its module on first use, so ``pyromoe --help`` needs no torch
and the estimators run without Pyro, ArviZ or matplotlib installed. The layers, in the order data
flows through them (a layer imports only those before it; ``docs/architecture.md``):

* :mod:`pyromoe.core`: torch only: links, parameters, likelihood, moments, tensor, EM, labels;
* :mod:`pyromoe.estimators`: arrays to a point estimate: ``tensor_init``, ``initialize``,
  ``simulate``;
* :mod:`pyromoe.bayes`: Pyro and ArviZ: the model, the init strategy, MAP/SVI/NUTS, InferenceData;
* :mod:`pyromoe.app`: the command line, the demo and fit workflows, plots, files;
* :mod:`pyromoe.datasets`: the data sets that ship with the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__ as __version__

#: public name -> module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    "CollapseWarning": ".core.em.loop",
    "ConvergenceWarning": ".core.em.loop",
    "Link": ".core.links",
    "get_link": ".core.links",
    "MoEEstimate": ".core.estimate",
    "parameter_errors": ".core.estimate",
    "fit_em": ".estimators.em",
    "fit_gate": ".estimators.gate",
    "initialize": ".estimators.initialize",
    "tensor_init": ".estimators.tensor_init",
    "SimulatedData": ".estimators.simulate",
    "simulate": ".estimators.simulate",
    "MixtureOfExperts": ".bayes.model",
    "OneDrawWarning": ".bayes.predict",
    "PSISWarning": ".bayes.psis",
    "NUTSConvergenceWarning": ".bayes.convergence",
    "check_convergence": ".bayes.convergence",
    "init_to_moments": ".bayes.init_strategy",
    "fit_map": ".bayes.svi",
    "fit_svi": ".bayes.svi",
    "trained_guide": ".bayes.trained",
    "mixture_priors": ".bayes.user_model",
    "GateGuide": ".bayes.gate_guide",
    "run_nuts": ".bayes.nuts",
    "sample_prior_predictive": ".bayes.prior",
    "align_labels": ".core.labels",
    "to_inference_data": ".bayes.to_arviz",
    "predict": ".bayes.predict",
    "compare_experts": ".bayes.compare",
    "responsibilities": ".bayes.predict",
    "plot_predictions": ".app.plots",
    "MoERegression": ".app.regression",
    "UnstandardisedDataWarning": ".bayes._fitting",
    "load": ".app.regression",
    "WRONG_BASIN_NATS": ".app.runs",
    "compare_starts": ".app.demo",
    "nuts_report": ".app.runs",
    "parameter_table": ".app.report",
    "posterior_mean_estimate": ".app.runs",
    "relabel": ".app.runs",
    "expert_means": ".core.likelihood",
    "read_table": ".app.table",
    "results_directory": ".app.results",
    "DATASETS": ".datasets",
    "Dataset": ".datasets",
    "load_concrete": ".datasets",
    "load_dataset": ".datasets",
    "load_mcycle": ".datasets",
    "load_old_faithful": ".datasets",
    "load_penguins": ".datasets",
}

#: public submodules, by their short names
_MODULES: dict[str, str] = {
    "datasets": ".datasets",
    "links": ".core.links",
    "plots": ".app.plots",
    "sites": ".core.sites",
}

__all__ = [
    "UnstandardisedDataWarning",
    "MoERegression",
    "CollapseWarning",
    "ConvergenceWarning",
    "DATASETS",
    "Dataset",
    "GateGuide",
    "Link",
    "MixtureOfExperts",
    "MoEEstimate",
    "NUTSConvergenceWarning",
    "OneDrawWarning",
    "PSISWarning",
    "check_convergence",
    "SimulatedData",
    "WRONG_BASIN_NATS",
    "align_labels",
    "compare_experts",
    "compare_starts",
    "datasets",
    "expert_means",
    "fit_em",
    "fit_gate",
    "fit_map",
    "fit_svi",
    "get_link",
    "init_to_moments",
    "initialize",
    "links",
    "load",
    "load_concrete",
    "load_dataset",
    "load_mcycle",
    "load_old_faithful",
    "load_penguins",
    "mixture_priors",
    "nuts_report",
    "parameter_errors",
    "parameter_table",
    "plot_predictions",
    "plots",
    "posterior_mean_estimate",
    "predict",
    "read_table",
    "relabel",
    "responsibilities",
    "results_directory",
    "run_nuts",
    "sample_prior_predictive",
    "simulate",
    "sites",
    "tensor_init",
    "to_inference_data",
    "trained_guide",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name], __name__)
    else:
        raise AttributeError(f"module 'pyromoe' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from . import datasets, sites
    from .app import plots
    from .app.demo import compare_starts
    from .app.plots import plot_predictions
    from .app.regression import MoERegression, load
    from .app.report import parameter_table
    from .app.results import results_directory
    from .app.runs import WRONG_BASIN_NATS, nuts_report, posterior_mean_estimate, relabel
    from .app.table import read_table
    from .bayes._fitting import UnstandardisedDataWarning
    from .bayes.compare import compare_experts
    from .bayes.convergence import NUTSConvergenceWarning, check_convergence
    from .bayes.gate_guide import GateGuide
    from .bayes.init_strategy import init_to_moments
    from .bayes.model import MixtureOfExperts
    from .bayes.nuts import run_nuts
    from .bayes.predict import OneDrawWarning, predict, responsibilities
    from .bayes.prior import sample_prior_predictive
    from .bayes.psis import PSISWarning
    from .bayes.svi import fit_map, fit_svi
    from .bayes.to_arviz import to_inference_data
    from .bayes.trained import trained_guide
    from .bayes.user_model import mixture_priors
    from .core import links
    from .core.em.loop import CollapseWarning, ConvergenceWarning
    from .core.estimate import MoEEstimate, parameter_errors
    from .core.labels import align_labels
    from .core.likelihood import expert_means
    from .core.links import Link, get_link
    from .datasets import (
        DATASETS,
        Dataset,
        load_concrete,
        load_dataset,
        load_mcycle,
        load_old_faithful,
        load_penguins,
    )
    from .estimators.em import fit_em
    from .estimators.gate import fit_gate
    from .estimators.initialize import initialize
    from .estimators.simulate import SimulatedData, simulate
    from .estimators.tensor_init import tensor_init
