"""The guides that :func:`~pyromoe.fit_svi` and :func:`~pyromoe.fit_map` trained, handed back.

Both fits return :class:`arviz.InferenceData` (draws, log-likelihood, ELBO trace); the guide they
trained is reachable from that object with :func:`trained_guide`::

    idata = pyromoe.fit_svi(model, x, y, init=est)
    guide = pyromoe.trained_guide(idata)
    draws = pyro.infer.Predictive(model, guide=guide, num_samples=500)(x_new)

The InferenceData itself is unchanged (its ``attrs`` stay plain strings and numbers, so it saves
to netCDF and pickles as before): the guide is kept in a process-local registry keyed by the
identity of the returned object and dropped when that object is garbage collected. A copy, a
selection (``idata.sel(...)``, ``idata.copy()``) or an InferenceData loaded from a file has no
guide; :func:`trained_guide` then says so (the fits are reproducible from their ``seed``: refit to
get the guide back).

The guide holds its trained parameters itself (AutoGuides are ``PyroModule`` s), under a name of
its own (``AutoNormal_<id>``, not Pyro's default ``AutoNormal``), so it works after
``pyro.clear_param_store()`` and beside other guides of the same class, whose parameters in the
global store it would otherwise take over.
"""

from __future__ import annotations

import uuid
import weakref

__all__ = ["trained_guide"]

#: id(idata) -> (weak reference to idata, guide); an entry leaves when its idata is collected
_REGISTRY: dict[int, tuple[weakref.ref, object]] = {}


def unique_name(guide, prefix: str | None = None) -> None:
    """Give an AutoGuide that has not run yet a parameter-name prefix of its own
    (``<class>_<8 hex>``), so its parameters never share names with another guide's."""
    name = f"{prefix or type(guide).__name__}_{uuid.uuid4().hex[:8]}"
    guide._pyro_set_supermodule(name, guide._pyro_context)


def register(idata, guide) -> None:
    """Record ``guide`` as the guide trained for ``idata`` (this object, while it lives)."""
    key = id(idata)
    _REGISTRY[key] = (weakref.ref(idata), guide)
    weakref.finalize(idata, _REGISTRY.pop, key, None)


def trained_guide(idata):
    """The guide :func:`~pyromoe.fit_svi` or :func:`~pyromoe.fit_map` trained for ``idata``.

    Use it with the model as any Pyro guide, e.g.
    ``pyro.infer.Predictive(model, guide=guide, num_samples=1000)(x_new)`` for posterior
    predictive draws on new rows (``"obs"``, the per-row means and the latent sites), or
    ``guide.median()`` / ``guide.quantiles(...)``.

    Parameters
    ----------
    idata : arviz.InferenceData
        The object a fit returned in this process.

    Returns
    -------
    pyro.infer.autoguide.AutoGuide
        :func:`~pyromoe.fit_svi`: the trained autoguide (``AutoNormal``, ... or the instance you
        passed). :func:`~pyromoe.fit_map`: its trained ``AutoDelta`` (a point: every draw is the
        MAP estimate); with ``gate_only=True``, an ``AutoDelta`` over all of the model's sites,
        at the fitted gate and noise and the estimate's fixed experts. The guide holds its
        parameters itself: ``pyro.clear_param_store()`` does not affect it.

    Raises
    ------
    ValueError
        ``idata`` has no guide in this process: it comes from a fit without one (``run_nuts``,
        the prior), or it is a copy, a selection or loaded from a file (guides are not saved:
        refit with the same ``seed``).
    TypeError
        ``idata`` is not an InferenceData.
    """
    import arviz as az

    if not isinstance(idata, az.InferenceData):
        raise TypeError(
            "trained_guide takes the arviz.InferenceData returned by fit_svi or fit_map; got "
            f"{type(idata).__name__}"
        )
    entry = _REGISTRY.get(id(idata))
    if entry is not None and entry[0]() is idata:
        return entry[1]
    inference = str(idata.attrs.get("inference", "unknown"))
    if inference.startswith(("svi", "map")):
        fit = "fit_map" if inference.startswith("map") else "fit_svi"
        raise ValueError(
            f"this InferenceData comes from {fit} (attrs['inference'] = {inference!r}) but is not "
            "the object the fit returned in this process: a copy, a selection or one loaded from "
            f"a file has no guide (guides live in memory and are not saved). Refit with the same "
            f"seed (attrs['seed'] = {idata.attrs.get('seed')!r}; fits are reproducible from it) "
            "and call trained_guide on what the fit returns."
        )
    raise ValueError(
        f"this InferenceData has no trained guide: it comes from attrs['inference'] = "
        f"{inference!r}, not from fit_svi or fit_map, the fits that train a guide (run_nuts "
        "draws from the posterior without one: use pyromoe.predict on its draws)."
    )
