"""Pyro model of the gated Gaussian mixture of experts, with the expert assignments marginalised."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch.distributions import constraints

from .._validation import (
    as_tensors,
    check_noise_model,
    check_num_experts,
    check_positive,
)
from ..core import likelihood, sites
from ..core.links import Link, check_link
from ..core.params import Params

__all__ = [
    "MixtureOfExperts",
    "DEFAULT_PRIOR_SCALES",
    "SCALED_BY_FEATURES",
    "MODEL_ATTR",
    "describe_distribution",
]

#: Key of ``idata.attrs`` under which the fits record the model they came from, as a JSON string
#: (:meth:`MixtureOfExperts.settings`, plus the fit's ``feature_names``).
MODEL_ATTR = "pyromoe_model"

#: Scales of the default weakly informative priors, for inputs and output on a standardised scale
#: (every column of x and y with mean 0 and sd 1): Normal(0, scale) on the gate's weights and
#: offsets and on the experts' biases; Normal(0, scale / sqrt(d)) on the experts' weights, so that
#: an expert's linear predictor a_i . x has prior sd ``scale`` whatever the input dimension d
#: (:data:`SCALED_BY_FEATURES`); HalfNormal(scale) on the noise. On standardised data (linear
#: link, k = 2) the prior predictive sd of y is then about 1.4 times the data's (median over
#: draws; 99% quantile 3x) for any d, where the earlier Normal(0, 2) experts and HalfCauchy(1)
#: noise gave 3.3x at d = 2, 6.6x at d = 10, 9.2x at d = 20, with a heavy tail (99% quantile
#: 50-95x): tests/test_prior.py. The gate scale 2.5 (per coefficient,
#: Gelman et al. 2008's scale for logistic regression) is also the MAP refit's
#: :data:`pyromoe.estimators.initialize.MAP_PRIOR_SCALE`.
DEFAULT_PRIOR_SCALES: dict[str, float] = {
    sites.EXPERTS_WEIGHT: 1.0,
    sites.EXPERTS_BIAS: 1.0,
    sites.GATE_WEIGHT: 2.5,
    sites.GATE_BIAS: 2.5,
    sites.NOISE: 1.0,
}

#: Sites whose scale (default or a float in ``priors=``) is that of the whole linear predictor:
#: each of the d coefficients gets ``scale / sqrt(d)``.
SCALED_BY_FEATURES: frozenset[str] = frozenset({sites.EXPERTS_WEIGHT})


#: event dims of the fields of :class:`~pyromoe.core.params.Params`, in field order (shared noise)
_EVENT_DIMS = Params(experts_weight=2, experts_bias=1, gate_weight=2, gate_bias=1, noise=0)


def _drop_obs_dim(params: Params, per_expert_noise: bool = False) -> Params:
    """Drop the singleton batch dimension that lines up with the observation plate (dim -1).

    Sites sampled outside the ``obs`` plate but inside outer plates (vectorised particles, parallel
    ``Predictive``) have batch shape ``(..., P, 1)``; the trailing 1 is the ``obs`` plate's slot.
    """
    event_dims = _EVENT_DIMS._replace(noise=1) if per_expert_noise else _EVENT_DIMS
    return Params(
        *(
            value.squeeze(-event_dim - 1)
            if value is not None and value.dim() > event_dim
            else value
            for value, event_dim in zip(params, event_dims)
        )
    )


def _site_of_attribute(name: str) -> str | None:
    """The site an attribute name stands for (``gate_weight`` -> ``gate.weight``), or None."""
    for site in sites.PARAMETER_SITES:
        if name in (site, site.replace(".", "_")):
            return site
    return None


# ------------------------------------------------------------------------ priors: checks and text
def _number(value) -> str:
    """A float as short, pasteable text: ``1.0``, ``0.447214``, ``-2.5``, ``inf``."""
    value = float(value)
    if not math.isfinite(value):
        return f"float({str(value)!r})"
    text = f"{value:.6g}"
    return text if any(c in text for c in ".en") else text + ".0"


def _parameters(distribution) -> dict:
    """The parameters a distribution was built with (those of ``arg_constraints`` it holds)."""
    out = {}
    for name in getattr(distribution, "arg_constraints", {}):
        held = name in vars(distribution) or isinstance(
            getattr(type(distribution), name, None), property
        )
        if held:
            try:
                out[name] = getattr(distribution, name)
            except (AttributeError, NotImplementedError, RuntimeError, ValueError):
                pass
    return out


def _value_text(value) -> str:
    """A parameter as pasteable text: a number, or ``torch.tensor([...])`` when its entries differ."""
    if not isinstance(value, torch.Tensor):
        return _number(value) if isinstance(value, numbers.Real) else repr(value)
    flat = value.detach().reshape(-1)
    if flat.numel() == 0:
        return f"torch.zeros({tuple(value.shape)})"
    same = (flat == flat[0]) | (torch.isnan(flat) & torch.isnan(flat[0]))
    if bool(same.all()):
        return _number(flat[0])  # one value, broadcast over the site by the model
    if flat.dim() == 1 and value.dim() == 1 and flat.numel() <= 8:
        return f"torch.tensor([{', '.join(_number(v) for v in flat.tolist())}])"
    return f"<tensor of shape {tuple(value.shape)}>"


def describe_distribution(distribution, *, module: str = "") -> str:
    """A distribution as readable (and, with ``module="dist."``, pasteable) text.

    ``Normal(loc=0.0, scale=0.447214)``; a parameter whose entries are all equal is shown as that
    one number; ``to_event`` / ``expand`` wrappers are left out (the model reshapes a prior to its
    site), so the text is the prior of each element of the site.

    Examples
    --------
    >>> describe_distribution(dist.HalfNormal(torch.tensor(2.0)), module="dist.")
    'dist.HalfNormal(scale=2.0)'
    """
    while isinstance(distribution, torch.distributions.Independent):
        distribution = distribution.base_dist
    parameters = _parameters(distribution)
    name = type(distribution).__name__
    if not parameters:
        return f"{module}{name}(...)"
    shown = ", ".join(f"{key}={_value_text(value)}" for key, value in parameters.items())
    return f"{module}{name}({shown})"


def _unwrapped_support(support):
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support


def _is_positive_support(support) -> bool:
    """Whether ``support`` lies in [0, inf): (0, inf), [0, inf), an interval with lower end >= 0."""
    support = _unwrapped_support(support)
    bounded = (
        constraints.greater_than,
        constraints.greater_than_eq,
        constraints.interval,
        constraints.half_open_interval,
    )
    if not isinstance(support, bounded):
        return False
    return bool((torch.as_tensor(support.lower_bound) >= 0).all())


def _check_distribution(name: str, prior) -> None:
    """Refuse a prior whose support does not fit site ``name`` or whose parameters are invalid
    (checked here even when the distribution was built with ``validate_args=False``)."""
    shown = describe_distribution(prior, module="dist.")
    example = "dist.HalfNormal(1.0)" if name == sites.NOISE else "dist.Normal(0.0, 1.0)"
    support = getattr(prior, "support", None)
    if support is None or constraints.is_dependent(support):
        raise ValueError(
            f"priors[{name!r}] = {shown} has no support that can be checked; pass a distribution "
            f"with a fixed support, e.g. priors={{{name!r}: {example}}}"
        )
    if _unwrapped_support(support).is_discrete:
        raise ValueError(
            f"priors[{name!r}] = {shown} is discrete (support {support}); the site is a real "
            f"number: pass a continuous distribution, e.g. priors={{{name!r}: {example}}}"
        )
    if name == sites.NOISE and not _is_positive_support(support):
        raise ValueError(
            f"priors['noise'] = {shown} has support {_unwrapped_support(support)}, but the noise "
            "is a standard deviation (> 0): a prior on it must put all its mass on positive "
            "values. Use a positive distribution, e.g. priors={'noise': dist.HalfNormal(1.0)} "
            "(or HalfCauchy, Gamma, LogNormal, Exponential)"
        )
    # the parameters, through the wrappers (to_event, expand, transforms) down to the base
    current = prior
    while current is not None:
        for key, value in _parameters(current).items():
            constraint = current.arg_constraints[key]
            if constraints.is_dependent(constraint) or not isinstance(value, torch.Tensor):
                continue
            valid = bool(constraint.check(value).all())
            if valid and value.is_floating_point():
                valid = bool(torch.isfinite(value).all())
            if not valid:
                raise ValueError(
                    f"priors[{name!r}] = {shown} has an invalid {key}={_value_text(value)} "
                    f"(it must satisfy {constraint}, and be finite); a distribution built with "
                    f"validate_args=False is checked here too. Pass valid parameters, e.g. "
                    f"priors={{{name!r}: {example}}}"
                )
        current = getattr(current, "base_dist", None)


class MixtureOfExperts(PyroModule):
    r"""Gated Gaussian mixture of experts as a Pyro model.

    .. math::
        p(y \mid x) = \sum_{i=0}^{k-1} \mathrm{gate}_i(x)\,
        \mathcal{N}\!\left(y \mid g(a_i^\top x + b_i), \sigma^2\right)

    with a softmax gate over ``k - 1`` free rows (expert 0 is the reference with logit 0), which for
    ``k = 2`` is the sigmoid gate ``P(expert 1 | x) = sigmoid(w . x + c)``. The discrete assignments
    are summed out (``logsumexp`` via ``MixtureSameFamily``), so NUTS and SVI work without enumeration.

    Sample sites (also the ArviZ variable names, see :mod:`pyromoe.core.sites`): ``experts.weight``
    (k, d), ``experts.bias`` (k,), ``gate.weight`` (k - 1, d), ``gate.bias`` (k - 1,), ``noise`` ()
    or (k,) and the observed ``y`` inside the plate ``obs`` (dim -1). Without ``bias`` the two bias
    sites are absent (the paper's model); with one expert the gate sites are (a Bayesian linear, or
    link, regression: the baseline when choosing k).

    Parameters
    ----------
    in_features, num_experts : int
        Input dimension ``d`` (columns of ``x``) and number of experts ``k >= 1``.
    link : str or Link
        Expert link, a name or a :class:`~pyromoe.core.links.Link` (checked once, here).
    bias : bool
        Whether experts have intercepts and the gate offsets.
    noise : {"shared", "per_expert"}
        One noise sd ``sigma`` for every expert (site shape ()), or one per expert ``sigma_i``
        (shape (k,), ArviZ dim ``expert``; the experts' normals get their own scales).
    gate_features : int, optional
        The gate reads covariates of its own, ``z`` with ``gate_features`` columns (flexmix's
        concomitant variables), while the experts read ``x``: the model's design is then
        ``[x | z]`` (``torch.cat([x, z], 1)``; the fits and ``predict`` take ``z=`` apart), and
        ``gate.weight`` has shape (k - 1, gate_features). Default: the gate reads ``x``.
    priors : mapping, optional
        Replace a default prior, by site name: a float (the scale of the default family, see
        :data:`DEFAULT_PRIOR_SCALES`; for ``experts.weight`` the prior sd of ``a_i . x``, so each
        coefficient gets ``Normal(0, scale / sqrt(in_features))``) or a Pyro distribution whose
        shape is the site's shape (batch or event; create it on the device of your data). A
        distribution is checked here: a continuous one (weights and biases: any support within
        the reals); for ``noise`` a support within ``[0, inf)`` (HalfNormal, HalfCauchy, Gamma,
        LogNormal, Exponential, Uniform(a >= 0, b), ...: not ``Normal``); and its parameters
        satisfy their constraints and are finite, even when it was built with
        ``validate_args=False``. This is
        the one way to change a prior: the model does not read :class:`~pyro.nn.PyroSample`
        attributes, so assigning one (or a distribution) to an attribute, e.g.
        ``model.noise = PyroSample(...)``, raises a ``TypeError`` that shows the ``priors=``
        equivalent.

    Raises
    ------
    TypeError
        On assigning a :class:`~pyro.nn.PyroSample` or a distribution to an attribute.
    ValueError
        A prior for an unknown site, of the wrong shape, with a support that does not fit the
        site (a real-valued or discrete prior on ``noise``) or invalid parameters (the message
        names the site, the distribution and a valid example).

    Examples
    --------
    >>> model = MixtureOfExperts(in_features=3, num_experts=2, link="tanh")
    >>> from pyro.infer import Predictive
    >>> draws = Predictive(model, num_samples=10)(torch.randn(50, 3))
    >>> draws["y"].shape
    torch.Size([10, 50])

    Priors are replaced when the model is built (a float keeps the default family and sets its
    scale):

    >>> import pyro.distributions as dist
    >>> model = MixtureOfExperts(
    ...     3, 2, priors={"noise": dist.HalfNormal(torch.tensor(0.2)), "gate.weight": 5.0}
    ... )
    >>> model.prior("noise", torch.zeros(())).scale
    tensor(0.2000)
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int = 2,
        link: str | Link = "linear",
        bias: bool = True,
        priors: Mapping[str, float | dist.Distribution] | None = None,
        noise: str = "shared",
        gate_features: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_positive(in_features, "in_features", integer=True)
        self.gate_features = (
            None
            if gate_features is None
            else check_positive(gate_features, "gate_features", integer=True)
        )
        self.num_experts = check_num_experts(num_experts, minimum=1)
        self.noise_model = check_noise_model(noise)
        self.link = link if isinstance(link, Link) else check_link(link)  # a name, once
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False; got {type(bias).__name__}")
        self.bias = bias
        self.priors = self._check_priors(priors or {})

    def __setattr__(self, name: str, value) -> None:
        # PyroModule would turn a PyroSample attribute into a sample site that forward never
        # reaches: refuse it (and a bare distribution) instead of ignoring it silently
        if isinstance(value, (PyroSample, torch.distributions.Distribution, dist.Distribution)):
            prior = value.prior if isinstance(value, PyroSample) else value
            site = _site_of_attribute(name)
            if isinstance(prior, torch.distributions.Distribution):
                shown = describe_distribution(prior, module="dist.")
            else:  # a callable PyroSample: show the default family with a scale to edit
                shown = "dist.HalfNormal(1.0)" if site == sites.NOISE else "dist.Normal(0.0, 1.0)"
            hint = "" if site is not None else f" (the sites are {list(self.site_shapes)})"
            noise = "" if self.noise_model == "shared" else f", noise={self.noise_model!r}"
            raise TypeError(
                f"{type(self).__name__} takes its priors only through its priors= argument; "
                f"assigning a {type(value).__name__} to .{name} would not change the model. "
                f"Build it with (import pyro.distributions as dist) "
                f"{type(self).__name__}({self.in_features}, {self.num_experts}, "
                f"link={self.link.name!r}, bias={self.bias}{noise}, "
                f"priors={{{site or '<site>'!r}: {shown}}}){hint}."
            )
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ sites and priors
    @property
    def design_features(self) -> int:
        """Columns of the design ``x`` the model reads: ``in_features``, or ``in_features +
        gate_features`` (the experts' inputs, then the gate's own covariates ``z``)."""
        return self.in_features + (self.gate_features or 0)

    @property
    def site_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each latent sample site, by name."""
        k, d = self.num_experts, self.in_features
        d_gate = d if self.gate_features is None else self.gate_features
        noise = (k,) if self.noise_model == "per_expert" else ()
        shapes = {
            sites.EXPERTS_WEIGHT: (k, d),
            sites.GATE_WEIGHT: (k - 1, d_gate),
            sites.NOISE: noise,
        }
        if self.bias:
            shapes[sites.EXPERTS_BIAS] = (k,)
            shapes[sites.GATE_BIAS] = (k - 1,)
        if k == 1:  # one expert: no gate
            del shapes[sites.GATE_WEIGHT]
            shapes.pop(sites.GATE_BIAS, None)
        return shapes

    def _check_priors(self, priors: Mapping) -> dict:
        if not isinstance(priors, Mapping):
            raise TypeError(
                f"priors must be a dict of site name -> prior; got {type(priors).__name__}"
            )
        shapes = self.site_shapes
        checked = {}
        for name, prior in priors.items():
            if name not in shapes:
                raise ValueError(
                    f"priors has an unknown site {name!r}; the model's sites are {sorted(shapes)}"
                )
            if isinstance(prior, numbers.Real) and not isinstance(prior, bool):
                check_positive(prior, f"priors[{name!r}]")
            elif isinstance(prior, dist.Distribution):
                shape = tuple(prior.batch_shape + prior.event_shape)
                if shape not in (shapes[name], ()):
                    raise ValueError(
                        f"priors[{name!r}] must have shape {shapes[name]} (or be scalar); "
                        f"got a distribution of shape {shape}"
                    )
                _check_distribution(name, prior)
            else:
                raise TypeError(
                    f"priors[{name!r}] must be a positive float (a scale) or a "
                    f"pyro.distributions.Distribution; got {type(prior).__name__}"
                )
            checked[name] = prior
        return checked

    def prior(self, name: str, like: torch.Tensor) -> dist.Distribution:
        """The prior of site ``name`` with event shape equal to the site's shape, on ``like``'s device."""
        shape = self.site_shapes[name]
        prior = self.priors.get(name, DEFAULT_PRIOR_SCALES[name])
        if isinstance(prior, dist.Distribution):
            batch_dims = len(shape) - len(prior.event_shape)
            prior = prior.expand(shape[:batch_dims])
            return prior.to_event(batch_dims) if batch_dims else prior
        scale = float(prior)
        if name in SCALED_BY_FEATURES:
            scale /= math.sqrt(self.in_features)
        scale = torch.as_tensor(scale, dtype=like.dtype, device=like.device)
        if name == sites.NOISE:
            noise = dist.HalfNormal(scale)
            return noise.expand(shape).to_event(len(shape)) if shape else noise
        return (
            dist.Normal(torch.zeros((), dtype=like.dtype, device=like.device), scale)
            .expand(shape)
            .to_event(len(shape))
        )

    def settings(self, feature_names: list[str] | None = None) -> dict:
        """The model's settings as plain data (what a fit records in ``idata.attrs``).

        Keys: ``num_experts``, ``in_features``, ``link`` (the name, with its parameters for
        ``leaky_relu``: ``"leaky_relu(negative_slope=0.1)"``), ``bias``, ``noise`` (``"shared"`` /
        ``"per_expert"``), ``priors`` (every site's prior as text, e.g.
        ``{"experts.weight": "Normal(loc=0.0, scale=0.57735)"}``, see
        :func:`describe_distribution`) and ``feature_names`` (the given names, or None).

        Examples
        --------
        >>> MixtureOfExperts(3, 2, link="tanh").settings()["priors"]["noise"]
        'HalfNormal(scale=1.0)'
        """
        like = torch.zeros(())
        link = self.link.name
        if link == "leaky_relu":
            link = f"leaky_relu(negative_slope={_number(self.link.negative_slope)})"
        return {
            "model": type(self).__name__,
            "num_experts": self.num_experts,
            "in_features": self.in_features,
            "gate_features": self.gate_features,
            "link": link,
            "bias": self.bias,
            "noise": self.noise_model,
            "priors": {
                name: describe_distribution(self.prior(name, like)) for name in self.site_shapes
            },
            "feature_names": None if feature_names is None else list(feature_names),
        }

    def settings_json(self, feature_names: list[str] | None = None) -> str:
        """:meth:`settings` as a JSON string (netCDF-safe, for ``idata.attrs[MODEL_ATTR]``)."""
        return json.dumps(self.settings(feature_names), sort_keys=True)

    # ------------------------------------------------------------------ the model
    def forward(
        self,
        x,
        y=None,
        subsample_size: int | None = None,
        num_rows: int | None = None,
    ):
        """Run the model; ``y=None`` samples outputs (prior or posterior predictive).

        Parameters
        ----------
        x : Tensor or ndarray (n, d)
        y : Tensor or ndarray (n,), optional
        subsample_size : int, optional
            Mini-batch size for the ``obs`` plate: each run draws that many of the ``n`` rows of
            ``x``; the likelihood is scaled by ``n / subsample_size``.
        num_rows : int, optional
            ``x`` and ``y`` are already a mini-batch of ``B`` rows of a data set of ``num_rows``
            rows (drawn by the caller, e.g. from an out-of-core source): the ``obs`` plate has
            size ``num_rows`` and subsample ``0..B-1`` (every row given), so the likelihood is
            scaled by ``num_rows / B``. Not together with ``subsample_size``.

        Raises
        ------
        ValueError
            ``subsample_size`` above ``n``, ``num_rows`` below ``n``, or both given.
        """
        x, y = as_tensors(x, y, in_features=self.design_features)
        n = x.shape[0]
        if subsample_size is not None:
            subsample_size = check_positive(subsample_size, "subsample_size", integer=True)
            if subsample_size > n:
                raise ValueError(
                    f"subsample_size must be at most the number of rows n={n}; got {subsample_size}"
                )
        plate_kwargs: dict = {"subsample_size": subsample_size}
        if num_rows is not None:
            if subsample_size is not None:
                raise ValueError(
                    "pass subsample_size (the model draws the mini-batch from x) or num_rows (x is "
                    "the mini-batch already), not both"
                )
            num_rows = check_positive(num_rows, "num_rows", integer=True)
            if num_rows < n:
                raise ValueError(
                    f"num_rows is the size of the data set x is a mini-batch of, so at least the "
                    f"{n} rows of x; got {num_rows}"
                )
            plate_kwargs = {"subsample": torch.arange(n, device=x.device)}
        values = {name: pyro.sample(name, self.prior(name, x)) for name in self.site_shapes}
        params = _drop_obs_dim(
            Params.from_sites(values, bias=self.bias), self.noise_model == "per_expert"
        )

        size = n if num_rows is None else num_rows
        # the plate's own subsample (randperm) is drawn on x's device, where index_select needs it
        with pyro.plate(sites.OBS_PLATE, size, dim=-1, device=x.device, **plate_kwargs) as index:
            x_batch = x if subsample_size is None else x.index_select(0, index)
            y_batch = None
            if y is not None:
                y_batch = y if subsample_size is None else y.index_select(0, index)
            mixture = dist.MixtureSameFamily(
                dist.Categorical(
                    logits=likelihood.gate_logits(x_batch, params.gate_weight, params.gate_bias)
                ),
                dist.Normal(
                    likelihood.expert_means(
                        x_batch, params.experts_weight, params.experts_bias, self.link
                    ),
                    params.expert_noise().unsqueeze(-2),  # (..., 1, k): shared or per expert
                ),
            )
            return pyro.sample(sites.OBS, mixture, obs=y_batch)

    # ------------------------------------------------------------------ functions of the parameters
    def params(self, values: Mapping[str, torch.Tensor], like: torch.Tensor) -> Params:
        """Site values (samples, an init dict) as :class:`~pyromoe.core.params.Params` on ``like``'s
        device and dtype."""
        return Params.from_sites(values, bias=self.bias).like(like)

    def log_likelihood(self, x, y, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Pointwise log-likelihood ``log p(y_n | x_n, params)``, shape ``(..., n)``.

        ``params`` maps site names to values with optional leading batch dims (e.g. draws of shape
        ``(chains, draws, k, d)``), as returned by ``MCMC.get_samples(group_by_chain=True)``.
        """
        x, y = as_tensors(x, y, in_features=self.design_features)
        return likelihood.log_likelihood(x, y, self.params(params, x), self.link)

    def responsibilities(self, x, y, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Posterior responsibilities ``p(expert i | x_n, y_n, params)``, shape ``(..., n, k)``."""
        x, y = as_tensors(x, y, in_features=self.design_features)
        return likelihood.responsibilities(x, y, self.params(params, x), self.link)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_experts={self.num_experts}, "
            f"link={self.link!r}, bias={self.bias}, noise={self.noise_model!r}"
            + ("" if self.gate_features is None else f", gate_features={self.gate_features}")
        )
