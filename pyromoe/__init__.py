"""pyromoe: gated Gaussian mixtures of experts in Pyro, started in the right basin.

The public API is re-exported here; nothing is defined in this module.
"""

from . import datasets, io, links, sites
from .datasets import DATASETS, Dataset, load_concrete, load_dataset, load_mcycle, load_old_faithful
from .diagnostics import align_labels, to_inference_data
from .em import fit_em
from .estimate import MoEEstimate, parameter_errors
from .gate import CollapseWarning, ConvergenceWarning, fit_gate
from .inference import fit_map, fit_svi, run_nuts
from .init import init_to_moments
from .initialize import initialize, tensor_init
from .links import Link, get_link
from .models import MixtureOfExperts
from .simulate import SimulatedData, simulate

__version__ = "0.1.0"

__all__ = [
    "CollapseWarning",
    "ConvergenceWarning",
    "DATASETS",
    "Dataset",
    "Link",
    "MixtureOfExperts",
    "MoEEstimate",
    "SimulatedData",
    "align_labels",
    "datasets",
    "fit_em",
    "fit_gate",
    "fit_map",
    "fit_svi",
    "get_link",
    "init_to_moments",
    "initialize",
    "io",
    "links",
    "load_concrete",
    "load_dataset",
    "load_mcycle",
    "load_old_faithful",
    "parameter_errors",
    "run_nuts",
    "simulate",
    "sites",
    "tensor_init",
    "to_inference_data",
]
