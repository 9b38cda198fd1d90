"""The gate's EM/MAP guide as a Pyro guide: :class:`GateGuide` (docs/algorithm.md section 4).

A guide over the sites of a :class:`~pyromoe.bayes.model.MixtureOfExperts` whose gate sites
(``gate.weight``, ``gate.bias``) are point masses (``Delta``), fitted either

* by gradient (``update="map"``): the gate's values are Pyro parameters that the steps of a plain
  :class:`pyro.infer.SVI` move (MAP, as :class:`~pyro.infer.autoguide.AutoDelta` on the gate), or
* in closed form (``update="em"``): :meth:`GateGuide.em_step` is one iteration of gate EM (the
  E-step's responsibilities at the guide's current point, then one Newton / IRLS step of the
  gate's weighted logistic regression with the model's Normal(0, s) gate prior), run between SVI
  steps. It is the step :func:`pyromoe.fit_gate` iterates (:func:`pyromoe.core.em.statistics.
  pass_statistics` and :func:`pyromoe.core.em.m_step.gate_step`), reused, not re-derived.

The other sites (experts, noise) are either held fixed at an estimate (``fixed=``, point masses
that nothing moves), guided by an autoguide built here over the sites left (``others=AutoNormal``,
``others=AutoDelta``, ... on ``poutine.block(model, hide=guide.point_sites)``), or left to another
guide beside this one in an :class:`~pyro.infer.autoguide.AutoGuideList`. The guide is an
:class:`~pyro.infer.autoguide.AutoGuide`, so it composes with ``SVI``, ``Predictive`` and
``AutoGuideList`` like Pyro's own::

    guide = GateGuide(model, init=est, fixed=["experts.weight", "experts.bias", "noise"])
    for _ in range(20):
        guide.em_step(x, y)                     # closed-form gate steps
    draws = Predictive(model, guide=guide, num_samples=100)(x_new)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from pyro.nn import PyroParam
from torch.distributions import constraints

from .._validation import as_tensors
from ..core import sites
from ..core.em.m_step import gate_step, log_prior
from ..core.em.statistics import pass_statistics
from ..core.estimate import MoEEstimate
from .init_strategy import match_noise_model
from .model import MixtureOfExperts, describe_distribution

__all__ = ["GATE_SITES", "GateGuide", "gate_prior_scale"]

#: The gate's sample sites, the ones :class:`GateGuide` fits (a model without ``bias`` lacks the
#: second).
GATE_SITES = (sites.GATE_WEIGHT, sites.GATE_BIAS)

_UPDATES = ("em", "map")


def _attribute(name: str) -> str:
    """The module attribute holding site ``name``'s point (``gate.weight`` -> ``gate_weight``)."""
    return name.replace(".", "_")


# ------------------------------------------------------------------------ checks of the arguments
def _check_model(model) -> MixtureOfExperts:
    if not isinstance(model, MixtureOfExperts):
        shown = model.__name__ if isinstance(model, type) else type(model).__name__
        raise TypeError(
            "GateGuide guides a pyromoe.MixtureOfExperts instance, e.g. GateGuide("
            f"pyromoe.MixtureOfExperts(in_features, num_experts), init=estimate); got {shown}. "
            "For a model of your own that contains one, guide its sites with an AutoGuideList."
        )
    if model.num_experts < 2:
        raise ValueError(
            "the model has one expert and so no gate: GateGuide needs num_experts >= 2 (guide a "
            "one-expert model with an autoguide such as AutoDelta or AutoNormal)"
        )
    return model


def _start_values(model: MixtureOfExperts, init) -> dict[str, torch.Tensor]:
    """``init`` as checked ``{site: value}`` of the model's sites (any dtype and device yet)."""
    if init is None:
        return {}
    if isinstance(init, MoEEstimate):
        init, _ = match_noise_model(model, init)  # a shared sd repeated, per-expert sds pooled
        values = init.site_values(bias=model.bias)
    elif isinstance(init, Mapping):
        values = dict(init)
    else:
        raise TypeError(
            "init must be a pyromoe.MoEEstimate (e.g. from pyromoe.initialize), a dict of site "
            f"name -> value, or None (the gate starts at zero); got {type(init).__name__}"
        )
    shapes = model.site_shapes
    unknown = sorted(set(values) - set(shapes))
    if unknown:
        raise ValueError(
            f"init has unknown sites {unknown}; the model's sites are {sorted(shapes)} "
            "(names in pyromoe.sites)"
        )
    checked = {}
    for name, value in values.items():
        value = torch.as_tensor(value).detach()
        if tuple(value.shape) != shapes[name]:
            raise ValueError(
                f"init[{name!r}] must have the site's shape {shapes[name]}; got "
                f"{tuple(value.shape)}"
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"init[{name!r}] contains NaN or infinite values")
        checked[name] = value
    return checked


def _fixed_sites(fixed, shapes: dict, values: dict) -> tuple[str, ...]:
    """The checked names of the sites held at ``init``'s values."""
    if isinstance(fixed, str):
        fixed = (fixed,)
    if not isinstance(fixed, Iterable):
        raise TypeError(
            "fixed must be a list of site names, e.g. fixed=['experts.weight', 'experts.bias']; "
            f"got {type(fixed).__name__}"
        )
    others = [name for name in shapes if name not in GATE_SITES]
    names = tuple(dict.fromkeys(fixed))
    for name in names:
        if name in GATE_SITES:
            raise ValueError(
                f"fixed names the gate site {name!r}, which this guide fits; fixed takes the "
                f"model's other sites: {others}"
            )
        if name not in shapes:
            raise ValueError(
                f"fixed names an unknown site {name!r}; the model's sites other than the gate's "
                f"are {others} (names in pyromoe.sites)"
            )
        if name not in values:
            raise ValueError(
                f"the fixed site {name!r} needs a value: pass init=an estimate (e.g. "
                f"pyromoe.initialize(x, y, num_experts=k)) or a dict with {name!r}"
            )
    return names


def _check_others(others, rest: list[str]):
    """``others`` as given: None, an AutoGuide class or an AutoGuide instance of its own."""
    if others is None:
        return None
    if isinstance(others, type) and issubclass(others, AutoGuide):
        pass
    elif isinstance(others, AutoGuide):
        if others.master is not None:
            raise ValueError(
                "others is already part of another guide; build a new one for this GateGuide"
            )
    else:
        shown = others.__name__ if isinstance(others, type) else type(others).__name__
        raise TypeError(
            "others must be an AutoGuide class (e.g. pyro.infer.autoguide.AutoNormal: built here "
            "over the sites neither the gate's nor fixed), an AutoGuide instance built on "
            "poutine.block(model, hide=[...the gate's and the fixed sites]), or None; got "
            f"{shown}"
        )
    if not rest:
        raise ValueError(
            "others has no site to guide: every site besides the gate's is fixed; drop others= "
            "or fix fewer sites"
        )
    return others


def _normal_scale(prior) -> float | None:
    """``s`` when ``prior`` is Normal(0, s) with one ``s`` for every element, else None."""
    while isinstance(prior, torch.distributions.Independent):
        prior = prior.base_dist
    if not isinstance(prior, torch.distributions.Normal) or not bool((prior.loc == 0).all()):
        return None
    scale = prior.scale.reshape(-1)
    return float(scale[0]) if bool((scale == scale[0]).all()) else None


def gate_prior_scale(model: MixtureOfExperts) -> float:
    """The ``s`` of the model's Normal(0, s) prior on every gate weight and offset: the ridge of
    the closed-form gate step (:func:`pyromoe.core.em.m_step.gate_step`'s ``prior_scale``).

    Raises
    ------
    ValueError
        When a gate prior is not a zero-mean Normal with one scale, or the weights' and the
        offsets' scales differ (the closed-form step takes one).
    """
    like = torch.zeros(())
    priors = {name: model.prior(name, like) for name in GATE_SITES if name in model.site_shapes}
    scales = {name: _normal_scale(prior) for name, prior in priors.items()}
    if None in scales.values() or len(set(scales.values())) > 1:
        shown = ", ".join(f"{name} ~ {describe_distribution(p)}" for name, p in priors.items())
        raise ValueError(
            "update='em' solves the gate's step in closed form with one Normal(0, s) prior on "
            f"every gate weight and offset; this model has {shown}. Give them one scale (e.g. "
            "priors={'gate.weight': 2.5, 'gate.bias': 2.5}) or fit the gate by gradient "
            "(update='map')"
        )
    return next(iter(scales.values()))


# ------------------------------------------------------------------------------------ the guide
class GateGuide(AutoGuide):
    """A Pyro guide whose gate sites are point masses fitted by EM steps or by gradient (MAP).

    The gate (``gate.weight`` (k - 1, d_gate), ``gate.bias`` (k - 1,)) is a ``Delta`` at the
    guide's point. With ``update="em"`` the point moves only by :meth:`em_step` (one iteration of
    gate EM on the data it is given, in closed form); the SVI steps around it move the other
    sites' guide. With ``update="map"`` the point is a Pyro parameter that ``SVI`` moves by
    gradient: the MAP estimate of the gate, as :class:`~pyro.infer.autoguide.AutoDelta` over the
    gate sites.

    The experts' and the noise's sites are, per site: held at ``init`` (``fixed``: a ``Delta``
    nothing moves), guided by ``others`` (an autoguide over every site neither the gate's nor
    fixed), or, with neither, left to a guide beside this one in an
    :class:`~pyro.infer.autoguide.AutoGuideList` (build that one on
    ``poutine.block(model, hide=gate_guide.point_sites)``). A model with separate gate covariates
    (``gate_features``) works alike: the guide, like the model, takes the joined design
    ``[x | z]``.

    With ``update="map"`` the gate's values are Pyro parameters named ``GateGuide.gate_weight``
    and ``GateGuide.gate_bias`` in Pyro's parameter store, as an autoguide's are: a second such
    guide in the same store takes them over (``pyro.clear_param_store()`` between fits, as for
    Pyro's autoguides). With ``update="em"`` they are buffers of the guide, in no store.

    Parameters
    ----------
    model : MixtureOfExperts
        The model (k >= 2: a one-expert model has no gate).
    init : MoEEstimate or dict of site name -> Tensor, optional
        The start: the gate's (default zeros) and the values of the ``fixed`` sites and, for an
        autoguide built from a class as ``others``, its start (``init_loc_fn``); an estimate of
        the other noise model is reconciled as in :func:`pyromoe.fit_map`.
    fixed : sequence of str
        Sites held at ``init``'s values, e.g. ``["experts.weight", "experts.bias", "noise"]``
        (names in :mod:`pyromoe.sites`; not the gate's).
    others : AutoGuide class or instance, optional
        The guide of the sites neither the gate's nor fixed: a class (``AutoNormal``,
        ``AutoDelta``, ``AutoMultivariateNormal``, ...) is built on the first call over
        ``poutine.block(model, hide=point_sites)``, started at ``init``; an instance must have
        been built over those sites alone.
    update : {"em", "map"}
        How the gate moves: :meth:`em_step` (``"em"``; needs a Normal(0, s) gate prior with one
        ``s``, the default) or the gradient steps of ``SVI`` (``"map"``).
    create_plates : callable, optional
        As for any :class:`~pyro.infer.autoguide.AutoGuide`.

    Attributes
    ----------
    point_sites : tuple of str
        The sites this guide holds as points: the gate's, then the fixed ones.

    Raises
    ------
    TypeError
        ``model`` is not a :class:`MixtureOfExperts` instance; ``init``, ``fixed`` or ``others``
        of the wrong kind.
    ValueError
        A one-expert model; unknown site names (in ``init`` or ``fixed``; the message lists the
        model's); a fixed site without a value; a gate site in ``fixed``; ``others`` with no
        site left; ``update`` not "em" / "map"; ``update="em"`` with a gate prior other than one
        Normal(0, s).

    Examples
    --------
    >>> import pyromoe
    >>> from pyro.infer import SVI, Trace_ELBO
    >>> from pyro.optim import Adam
    >>> data = pyromoe.simulate(500, 2, seed=0)
    >>> model = pyromoe.MixtureOfExperts(2, 2)
    >>> guide = GateGuide(model, init=data.truth, fixed=["experts.weight", "experts.bias"],
    ...                   others=pyro.infer.autoguide.AutoDelta)
    >>> svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    >>> for _ in range(5):
    ...     loss = svi.step(data.x, data.y)      # the noise, by gradient
    ...     objective = guide.em_step(data.x, data.y)  # the gate, in closed form
    >>> sorted(guide.median(data.x, data.y))
    ['experts.bias', 'experts.weight', 'gate.bias', 'gate.weight', 'noise']
    """

    def __init__(
        self,
        model: MixtureOfExperts,
        init: MoEEstimate | Mapping[str, torch.Tensor] | None = None,
        *,
        fixed: Iterable[str] = (),
        others=None,
        update: str = "em",
        create_plates=None,
    ) -> None:
        model = _check_model(model)
        if update not in _UPDATES:
            raise ValueError(
                "update must be 'em' (closed-form gate steps: guide.em_step(x, y) between SVI "
                f"steps) or 'map' (the gate moved by SVI's gradient steps); got {update!r}"
            )
        shapes = model.site_shapes
        values = _start_values(model, init)
        fixed = _fixed_sites(fixed, shapes, values)
        gate = tuple(name for name in GATE_SITES if name in shapes)
        rest = [name for name in shapes if name not in gate and name not in fixed]
        others = _check_others(others, rest)
        prior_scale = gate_prior_scale(model) if update == "em" else None
        super().__init__(model, create_plates=create_plates)
        self.update = update
        self.point_sites = gate + fixed
        self._gate_sites, self._fixed_sites, self._rest = gate, fixed, tuple(rest)
        self._start, self._prior_scale, self._event_dims = values, prior_scale, {}
        self._others_class = others if isinstance(others, type) else None
        self.others = None if isinstance(others, type) else others

    @property
    def mixture(self) -> MixtureOfExperts:
        """The model this guide guides."""
        return self.model

    # ------------------------------------------------------------------ Pyro's guide protocol
    def _check_prototype(self, part_trace) -> None:
        """A part (``others``) traced the model alike: the same shapes at every site it has."""
        for name, part_site in part_trace.iter_stochastic_nodes():
            site = self.prototype_trace.nodes.get(name)
            if site is None or part_site["value"].shape != site["value"].shape:
                raise ValueError(
                    f"others traces the site {name!r} unlike the model; build it on "
                    "poutine.block(model, hide=gate_guide.point_sites)"
                )

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        nodes = self.prototype_trace.nodes
        for name in self.point_sites:
            like = nodes[name]["value"].detach()  # the data's dtype and device
            self._event_dims[name] = nodes[name]["fn"].event_dim
            default = torch.zeros_like(like) if name in self._gate_sites else None
            value = self._start.get(name, default).to(like).clone()
            if name in self._gate_sites and self.update == "map":
                setattr(self, _attribute(name), PyroParam(value, constraints.real))
            else:
                self.register_buffer(_attribute(name), value)
        if self._others_class is not None:
            blocked = poutine.block(self.model, hide=list(self.point_sites))
            start = {
                name: self._start[name].to(nodes[name]["value"]).clone()  # never moved in place
                for name in self._rest
                if name in self._start
            }
            options = {"init_loc_fn": init_to_value(values=start, fallback=init_to_median)}
            self.others = self._others_class(blocked, **(options if start else {}))

    def _points(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, _attribute(name)) for name in self.point_sites}

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Draw every site this guide covers; the same ``*args, **kwargs`` as the model."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        self._create_plates(*args, **kwargs)
        result = {
            name: pyro.sample(name, dist.Delta(value, event_dim=self._event_dims[name]))
            for name, value in self._points().items()
        }
        if self.others is not None:
            drawn = self.others(*args, **kwargs)
            clash = sorted(set(drawn) & set(result))
            if clash:
                raise ValueError(
                    f"others draws the sites {clash}, which this guide holds; build it on "
                    "poutine.block(model, hide=gate_guide.point_sites)"
                )
            result.update(drawn)
        return result

    def _ready(self, *args, **kwargs) -> None:
        """Set the guide (and ``others``, or the AutoGuideList it is part of) up, drawing
        nothing that any enclosing handler sees."""
        pending = self.prototype_trace is None or (
            self.others is not None and self.others.prototype_trace is None
        )
        if pending:
            guide = self if self.master is None else self.master()
            with torch.no_grad(), poutine.block():
                guide(*args, **kwargs)

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The point of every site this guide holds, and ``others``' medians."""
        self._ready(*args, **kwargs)
        result = {name: value.detach().clone() for name, value in self._points().items()}
        if self.others is not None:
            result.update(self.others.median(*args, **kwargs))
        return result

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Every quantile of a point is the point (shape ``(len(quantiles), *site shape)``);
        ``others``' quantiles for its sites."""
        self._ready(*args, **kwargs)
        count = len(quantiles)
        result = {
            name: value.detach().expand(count, *value.shape).clone()
            for name, value in self._points().items()
        }
        if self.others is not None:
            result.update(self.others.quantiles(quantiles, *args, **kwargs))
        return result

    # ------------------------------------------------------------------ the closed-form gate step
    def _current_values(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every site's value at the guide's point: its own, ``others``' medians, or those of the
        AutoGuideList it is part of."""
        self._ready(x, y)
        values = {name: value.detach() for name, value in self._points().items()}
        if self.others is not None:
            values.update(self.others.median(x, y))
        elif self.master is not None:
            medians = self.master().median(x, y)
            values.update({name: v for name, v in medians.items() if name not in values})
        missing = [name for name in self.mixture.site_shapes if name not in values]
        if missing:
            raise ValueError(
                f"em_step needs a value of every site of the model; {missing} have none. Fix "
                f"them at an estimate (GateGuide(model, init=estimate, fixed={missing})), guide "
                "them (others=AutoDelta), or append this guide to an AutoGuideList with a guide "
                "over them"
            )
        return values

    @torch.no_grad()
    def em_step(self, x, y) -> float:
        """One iteration of gate EM, in place: responsibilities at the guide's current point
        (the other sites at their fixed values or their guide's medians), then one Newton
        (IRLS) step of the gate's weighted logistic regression with the model's Normal(0, s)
        gate prior (:func:`pyromoe.core.em.m_step.gate_step`, the step :func:`pyromoe.fit_gate`
        iterates). No step halving: the step is taken as proposed.

        Parameters
        ----------
        x : Tensor or ndarray (n, design_features)
            The model's design, as given to the model (``[x | z]`` for a model with
            ``gate_features``): all the rows (the prior is weighed against these rows).
        y : Tensor or ndarray (n,)
            The observed outputs.

        Returns
        -------
        float
            The gate's objective at the point the step started from: the mean log-likelihood
            per row plus the gate's log prior divided by n (the quantity of
            ``pyromoe.fit_gate(..., prior_scale=s).log_likelihood_trace``).

        Raises
        ------
        ValueError
            The guide was built with ``update="map"``; a site has no value (neither fixed, nor
            guided by ``others`` or a guide beside it in an AutoGuideList); malformed data.
        """
        if self.update != "em":
            raise ValueError(
                "em_step needs a guide built with update='em' (this one has update='map': SVI "
                "moves its gate by gradient)"
            )
        model = self.mixture
        x, y = as_tensors(x, y, in_features=model.design_features)
        if y is None:
            raise ValueError("em_step needs the observed outputs y (n,)")
        params = model.params(self._current_values(x, y), like=x)
        statistics = pass_statistics(
            x, y, params, model.link, update_experts=False, gate_bias=model.bias
        )
        prior = log_prior(self._prior_scale, params.gate_weight, params.gate_bias)
        objective = float(statistics.log_likelihood + prior) / x.shape[0]
        step = gate_step(
            statistics, params, fit_bias=model.bias, prior_scale=self._prior_scale, tol=0.0
        )
        for name, value in (
            (sites.GATE_WEIGHT, step.gate_weight),
            (sites.GATE_BIAS, step.gate_bias),
        ):
            if name in self._gate_sites:
                getattr(self, _attribute(name)).copy_(value)
        return objective
