"""pyromoe: gated Gaussian mixtures of experts in Pyro, started in the right basin.

The public API is re-exported here; nothing is defined in this module.
"""

from . import links, sites
from .estimate import MoEEstimate, parameter_errors
from .links import Link, get_link
from .models import MixtureOfExperts
from .simulate import SimulatedData, simulate

__version__ = "0.1.0"

__all__ = [
    "Link",
    "MixtureOfExperts",
    "MoEEstimate",
    "SimulatedData",
    "get_link",
    "links",
    "parameter_errors",
    "simulate",
    "sites",
]
