"""Declarative argument rules, checked once per public call (scikit-learn's ``validate_params``).

A public entry declares in one table how each of its arguments is checked, ``{name: rule}``, and is
decorated with :func:`validate`::

    @validate({"num_experts": num_experts_rule(minimum=1), "link": link_rule, "seed": check_seed})
    def fit_em(x, y, num_experts=2, link="linear", *, seed=0): ...

A rule is any callable ``rule(value, name)`` that returns the value in its canonical form or raises
a ``TypeError`` / ``ValueError`` naming the argument. The checks of
:mod:`pyromoe._validation.values` with that signature are rules as they are (``check_seed``,
``check_flag``, ``check_positive``, ``check_probability``, ``check_noise_model``); the factories
below make the others (``count_rule(minimum=1)``, ``optional(rule)``, ``one_of("svi", "nuts")``),
and a layer above adds its own (:func:`pyromoe.core.links.link_rule`).

The decorated function binds each call's arguments, applies every rule of its table in the table's
order before any work, replaces each argument by its checked value (a link name becomes a ``Link``,
``seed=None`` a drawn seed) and runs the function as written, which trusts them. That function is
the decorated one's ``unchecked`` attribute: an internal caller that holds checked values calls
``fit_em.unchecked(...)``, and nothing is checked twice. The data (``x``, ``y``) are no rules: the
function converts them itself (:func:`pyromoe.core.sources.as_source`, ``as_tensors``), and an
internal caller passes them converted (a ``Source`` or tensors).

Every default of a decorated signature is already in its checked form (counts are ints, flags
bools) except link names and ``seed=None``: an ``unchecked`` call passes those explicitly.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from .values import check_count, check_model, check_num_experts

__all__ = [
    "Rule",
    "check_forwarded",
    "count_rule",
    "model_rule",
    "num_experts_rule",
    "one_of",
    "optional",
    "user_stacklevel",
    "validate",
]

#: ``rule(value, name) -> checked value``; raises ``TypeError`` / ``ValueError`` naming ``name``.
Rule = Callable[[Any, str], Any]

F = TypeVar("F", bound=Callable[..., Any])


def validate(rules: Mapping[str, Rule]) -> Callable[[F], F]:
    """Decorate a public entry: check the arguments named in ``rules`` once, then run it on them.

    Parameters
    ----------
    rules : mapping of argument name -> rule
        The entry's table; applied in its order, defaults included (``seed=None`` is drawn).

    Returns
    -------
    callable
        The decorator. The decorated function has ``rules`` (the table, read-only) and
        ``unchecked`` (the function as written, for internal callers with checked arguments);
        both survive further ``functools.wraps`` decorators, which copy the attributes.

    Raises
    ------
    TypeError
        At decoration, for a rule naming no argument of the function.

    Examples
    --------
    >>> from pyromoe._validation import check_seed
    >>> @validate({"seed": check_seed, "num_steps": count_rule(minimum=1)})
    ... def fit(num_steps=10, seed=0):
    ...     return num_steps, seed
    >>> fit(seed=3)
    (10, 3)
    >>> fit.unchecked(5, seed=7)
    (5, 7)
    """
    table = MappingProxyType(dict(rules))

    def decorate(function: F) -> F:
        signature = inspect.signature(function)
        unknown = [name for name in table if name not in signature.parameters]
        if unknown:
            raise TypeError(f"{function.__qualname__} has no argument {unknown[0]!r} to check")

        @functools.wraps(function)
        def checked(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return function(*args, **kwargs)  # a malformed call: Python's own message
            bound.apply_defaults()
            arguments = bound.arguments
            for name, rule in table.items():
                arguments[name] = rule(arguments[name], name)
            return function(*bound.args, **bound.kwargs)

        checked.rules = table
        checked.unchecked = function
        return checked  # type: ignore[return-value]

    return decorate


def check_forwarded(function: Callable, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword ``arguments`` a caller forwards to the validated ``function`` (e.g.
    ``compare_experts``' ``**fit_kwargs``), each checked by its rule in ``function.rules``, once;
    names without a rule pass as they are (the function checks them with the data)."""
    rules = function.rules
    return {
        name: rules[name](value, name) if name in rules else value
        for name, value in arguments.items()
    }


def count_rule(minimum: int = 0) -> Rule:
    """An int >= ``minimum`` (:func:`~pyromoe._validation.values.check_count`)."""

    def rule(value, name: str) -> int:
        return check_count(value, name, minimum=minimum)

    return rule


def num_experts_rule(minimum: int = 2) -> Rule:
    """A number of experts >= ``minimum`` (:func:`~pyromoe._validation.values.check_num_experts`)."""

    def rule(value, name: str) -> int:
        return check_num_experts(value, minimum=minimum)

    return rule


def optional(rule: Rule) -> Rule:
    """``None`` as it is, anything else by ``rule``."""

    def optional_rule(value, name: str):
        return None if value is None else rule(value, name)

    return optional_rule


def one_of(*choices: str) -> Rule:
    """One of the strings ``choices``: ``"method must be 'auto', 'tensor' or 'em'; got 'x'"``."""
    words = " or ".join([", ".join(map(repr, choices[:-1])), repr(choices[-1])])

    def rule(value, name: str) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{name} must be {words}; got {value!r}")
        return value

    return rule


def model_rule(value, name: str = "model"):
    """A model instance (:func:`~pyromoe._validation.values.check_model`), returned as it is."""
    check_model(value)
    return value


def user_stacklevel(below: int = 0) -> int:
    """The ``stacklevel`` that makes a warning name the user's line: the first frame outside
    pyromoe above the function calling this one.

    Counted, not written by hand: a public entry is one or two wrappers deep (:func:`validate`,
    ``keeps_feature_names``) and an internal caller reaches the same body through ``unchecked``,
    so no fixed number is right on both paths.

    Parameters
    ----------
    below : int
        How many frames below the caller ``warnings.warn`` runs: 0 when the caller warns itself
        (or passes the level to ``EM.fit``, which counts it from its caller), 1 when it passes
        the level to a function that hands it to ``warnings.warn`` (``check_enough_rows``,
        ``warn_collapse``).
    """
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("pyromoe."):
        frame, level = frame.f_back, level + 1
    return level + below
