"""Your own Pyro model around one :class:`~pyromoe.MixtureOfExperts`, fitted by the fits.

:func:`pyromoe.run_nuts` and :func:`pyromoe.fit_svi` take, besides a bare mixture, a model
function or :class:`~pyro.nn.PyroModule` that calls exactly one ``MixtureOfExperts`` (as
``mixture(x, y)``), with sites of its own (a hierarchical prior, other parameters) and the
mixture's sites possibly renamed (``pyro.contrib.autoname.scope(prefix="moe")`` makes them
``moe/experts.weight``, ...). The contract: the fits call the model as ``model(x, y)``, with the
same ``x`` and ``y`` they were given, and ``y=None`` must draw outputs (as the mixture does).

:func:`find_mixture` runs the model once (:func:`pyro.poutine.trace`, hidden from enclosing
handlers, on a forked random stream) with torch's global module hooks on: the one
``MixtureOfExperts`` called, and the sites sampled during that call (in the mixture's order,
``site_shapes`` then ``y``), tell which of the model's sites are the mixture's, whatever their
names. The result, a :class:`UserModel`, runs the user's model with those sites under the
mixture's own names (:class:`RenameSites`) and answers for the mixture (``num_experts``,
``log_likelihood``, ``settings_json``, ...). So the fits' every step takes it for the mixture: the
estimate seeds the mixture's sites (:func:`~pyromoe.init_to_moments`, which leaves every other
site to its ``fallback``), the chains start at Laplace draws over all sites, the draws are
relabelled on the mixture's sites, and the InferenceData names the mixture's sites as a bare
mixture's fit does (dims ``expert``, ``feature``, ...), while the user's own sites pass through to
the ``posterior`` group under their own names with ArviZ's default dims.

:func:`mixture_priors` sets the mixture's priors for one call, e.g. a hierarchical prior::

    mixture = MixtureOfExperts(5, 2)

    def model(x, y=None):
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        with mixture_priors(mixture, {"experts.weight": dist.Normal(0.0, tau)}):
            return mixture(x, y)
"""

from __future__ import annotations

import contextlib
import json
import numbers
from collections.abc import Iterator, Mapping

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .._validation import check_model
from ..core import sites
from .model import MixtureOfExperts

__all__ = [
    "RenameSites",
    "UserModel",
    "find_mixture",
    "is_mixture",
    "mixture_priors",
    "model_or_mixture_rule",
]

#: attributes a :class:`UserModel` answers for its mixture (what the fits read of a model)
_MIXTURE_ATTRIBUTES = frozenset(
    {
        "num_experts",
        "in_features",
        "gate_features",
        "design_features",
        "noise_model",
        "link",
        "bias",
        "priors",
        "log_likelihood",
        "responsibilities",
        "params",
        "settings",
        "settings_json",
    }
)

#: names a user's own latent site may not have: the mixture's (under its own names in the
#: posterior) and the variables of the other groups
RESERVED_NAMES = frozenset({*sites.PARAMETER_SITES, sites.OBS, "x", "z"})


class RenameSites(Messenger):
    """Rename sample sites: ``names`` maps a site's name (as the model gives it, prefixes
    included) to the name it gets. Placed outside the model, it sees the names after every
    handler inside the model (e.g. ``scope``) has set them."""

    def __init__(self, names: Mapping[str, str]):
        super().__init__()
        self.names = dict(names)

    def _pyro_sample(self, msg):
        msg["name"] = self.names.get(msg["name"], msg["name"])


def is_mixture(model) -> bool:
    """Whether ``model`` is a mixture the fits take as it is (a ``MixtureOfExperts``, or alike:
    with ``log_likelihood``), rather than a user's model around one."""
    return callable(getattr(model, "log_likelihood", None))


class UserModel:
    """A user's model with its mixture's sites under the mixture's own names.

    Calling it runs ``model(*args, **kwargs)`` inside :class:`RenameSites`; the attributes the
    fits read of a mixture (:data:`_MIXTURE_ATTRIBUTES`) are the mixture's, and
    :attr:`site_shapes` has every latent site (the mixture's, then the user's). It pickles when
    the user's model does (chains in worker processes).

    Attributes
    ----------
    model : callable
        The user's model, as given.
    mixture : MixtureOfExperts
        The one mixture it calls.
    names : dict
        The mixture's sites as the model names them -> the mixture's own names (``y`` included).
    user_sites : dict
        The model's own latent sites -> their shapes (from the tracing run).
    """

    def __init__(self, model, mixture: MixtureOfExperts, names: dict, user_sites: dict):
        self.model, self.mixture = model, mixture
        self.names, self.user_sites = dict(names), dict(user_sites)

    def __call__(self, *args, **kwargs):
        with RenameSites(self.names):
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        # only the listed names, and never before __init__ ran (unpickling looks attributes up)
        if name in _MIXTURE_ATTRIBUTES and "mixture" in self.__dict__:
            return getattr(self.__dict__["mixture"], name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def site_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each latent sample site, by name: the mixture's (its own names), then the
        user's."""
        return {**self.mixture.site_shapes, **self.user_sites}

    @property
    def renamed(self) -> bool:
        """Whether any of the mixture's sites has another name in the user's model."""
        return any(full != own for full, own in self.names.items())

    def attrs(self) -> dict:
        """What a fit records of the user's model in ``idata.attrs``: its name, the mixture's
        sites as the model names them and the model's own latent sites (both JSON strings, which
        netCDF keeps as they are)."""
        return {
            "user_model": getattr(self.model, "__qualname__", type(self.model).__name__),
            "mixture_site_names": json.dumps(
                {own: full for full, own in self.names.items()}, sort_keys=True
            ),
            "user_sites": json.dumps(sorted(self.user_sites)),
        }

    def user_guide(self, guide):
        """``guide`` (trained on this view) for the user's model itself: unchanged when no site
        was renamed, else run with the mixture's sites under the names the model gives them."""
        if not self.renamed:
            return guide
        return RenameSites({own: full for full, own in self.names.items()})(guide)


def _refusal(model, what: str) -> ValueError:
    return ValueError(
        f"model must be a pyromoe.MixtureOfExperts or a Pyro model (a function or PyroModule) "
        f"that calls exactly one MixtureOfExperts, as mixture(x, y); running model(x, y) {what}. "
        "For a model with several mixtures run Pyro's own NUTS or SVI on it; here, fit each "
        "mixture in a model of its own"
    )


def _trace_with_calls(model, x, y):
    """``(trace, calls)``: one run of ``model(x, y)`` and, per ``MixtureOfExperts`` call during it,
    ``[module, site names before, site names after]`` (torch's global module hooks)."""
    calls: list[list] = []
    device = x.device

    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        poutine.block(),
        poutine.trace() as tracer,
    ):

        def before(module, args):
            if isinstance(module, MixtureOfExperts):
                calls.append([module, list(tracer.trace.nodes)])

        def after(module, args, output):
            if isinstance(module, MixtureOfExperts) and calls and calls[-1][0] is module:
                calls[-1].append(list(tracer.trace.nodes))

        hooks = [
            torch.nn.modules.module.register_module_forward_pre_hook(before),
            torch.nn.modules.module.register_module_forward_hook(after),
        ]
        try:
            model(x, y)
        finally:
            for hook in hooks:
                hook.remove()
    return tracer.trace, calls


def _sample_sites(trace, names) -> list[str]:
    """The sample sites among ``names`` (the plates' own subsample sites left out), in order."""
    return [
        name
        for name in names
        if trace.nodes[name]["type"] == "sample" and not site_is_subsample(trace.nodes[name])
    ]


def find_mixture(model, x: torch.Tensor, y: torch.Tensor) -> UserModel:
    """The one ``MixtureOfExperts`` that ``model(x, y)`` calls, and which sites are its.

    Parameters
    ----------
    model : callable
        A model function or ``PyroModule`` that calls one ``MixtureOfExperts`` as
        ``mixture(x, y)`` (its sites may be renamed, e.g. under a ``scope`` prefix).
    x, y : Tensor
        The data the fit calls the model with.

    Returns
    -------
    UserModel

    Raises
    ------
    ValueError
        The model calls no mixture, or more than one (or one twice), or one of its own latent
        sites has a name that the mixture's sites or the InferenceData's other variables have
        (:data:`RESERVED_NAMES`); the message names what was found.
    """
    trace, calls = _trace_with_calls(model, x, y)
    if not calls:
        raise _refusal(
            model,
            "called none (a MixtureOfExperts' forward called directly, mixture.forward(x, y), "
            "is not seen: call mixture(x, y))",
        )
    if len(calls) > 1 or len(calls[0]) != 3:
        found = [
            name
            for call in calls
            for name in _sample_sites(trace, call[2][len(call[1]) :] if len(call) == 3 else [])
        ]
        raise _refusal(model, f"made {len(calls)} MixtureOfExperts calls (sites {found})")
    mixture, before, after = calls[0]
    own = _sample_sites(trace, after[len(before) :])
    expected = [*mixture.site_shapes, sites.OBS]
    if len(own) != len(expected):
        raise _refusal(
            model,
            f"saw the mixture's sites {own}, not its {expected} (is one hidden by poutine.block?)",
        )
    names = dict(zip(own, expected))
    user_sites = {
        name: tuple(trace.nodes[name]["value"].shape)
        for name in _sample_sites(trace, trace.nodes)
        if name not in names and not trace.nodes[name]["is_observed"]
    }
    clashes = sorted(set(user_sites) & RESERVED_NAMES)
    if clashes:
        raise ValueError(
            f"model has sites of its own named {clashes}, names the fit's InferenceData gives "
            f"the mixture's sites and data ({sorted(RESERVED_NAMES)}); rename them "
            "(e.g. pyro.sample('my_noise', ...))"
        )
    return UserModel(model, mixture, names, user_sites)


def _prior_rule(mixture: MixtureOfExperts, name: str, prior):
    """One of :func:`mixture_priors`' priors, checked by what costs no tensor value (the call
    may run under ``torch.jit.trace``): the site, the type and the shape."""
    shapes = mixture.site_shapes
    if name not in shapes:
        raise ValueError(
            f"priors has an unknown site {name!r}; the mixture's sites are {sorted(shapes)}"
        )
    if isinstance(prior, numbers.Real) and not isinstance(prior, bool) and prior > 0:
        return prior
    if not isinstance(prior, dist.Distribution):
        raise TypeError(
            f"priors[{name!r}] must be a pyro.distributions.Distribution (e.g. "
            f"dist.Normal(0.0, tau)) or a positive float; got {type(prior).__name__}"
        )
    shape = tuple(prior.batch_shape + prior.event_shape)
    if shape not in (shapes[name], ()):
        raise ValueError(
            f"priors[{name!r}] must have the site's shape {shapes[name]} or be scalar (it is "
            f"then expanded); got a distribution of shape {shape}"
        )
    return prior


@contextlib.contextmanager
def mixture_priors(
    mixture: MixtureOfExperts, priors: Mapping[str, dist.Distribution | float]
) -> Iterator[MixtureOfExperts]:
    """Set some of ``mixture``'s priors while the block runs (restored afterwards).

    For a model of your own around the mixture whose priors depend on its own sites, e.g. a
    hierarchical prior on the experts' weights. The priors are read as the ``priors=`` of
    :class:`~pyromoe.MixtureOfExperts` (a distribution of the site's shape, or scalar and then
    expanded to it; or a float scale of the default family), the others stay as they are.

    Parameters
    ----------
    mixture : MixtureOfExperts
    priors : dict of site name -> Distribution or float

    Raises
    ------
    TypeError, ValueError
        ``mixture`` is no MixtureOfExperts; a prior for an unknown site, of another type or of
        another shape.

    Examples
    --------
    >>> import pyro
    >>> mixture = MixtureOfExperts(2, 2)
    >>> def model(x, y=None):
    ...     tau = pyro.sample("tau", dist.HalfNormal(1.0))
    ...     with mixture_priors(mixture, {"experts.weight": dist.Normal(0.0, tau)}):
    ...         return mixture(x, y)
    >>> trace = poutine.trace(model).get_trace(torch.randn(5, 2))
    >>> trace.nodes["experts.weight"]["fn"].base_dist.scale.shape
    torch.Size([2, 2])
    """
    if not isinstance(mixture, MixtureOfExperts):
        raise TypeError(f"mixture must be a pyromoe.MixtureOfExperts; got {type(mixture).__name__}")
    if not isinstance(priors, Mapping):
        raise TypeError(f"priors must be a dict of site name -> prior; got {type(priors).__name__}")
    checked = {name: _prior_rule(mixture, name, prior) for name, prior in priors.items()}
    saved = mixture.priors
    mixture.priors = {**saved, **checked}
    try:
        yield mixture
    finally:
        mixture.priors = saved


def model_or_mixture_rule(model, name: str = "model"):
    """The fits' rule for ``model``: a mixture (checked as ever) or a callable user model (its
    mixture found later, with the data); a class or anything else is refused."""
    if isinstance(model, type) or is_mixture(model):
        check_model(model)  # a class: the usual message
    elif not callable(model):
        raise TypeError(
            f"{name} must be a pyromoe.MixtureOfExperts or a Pyro model (a function or "
            f"PyroModule) that calls one as mixture(x, y); got {type(model).__name__}"
        )
    return model
