"""Validation at the public boundary: arguments checked once per call, with errors that say how to
fix them.

Every public function checks its arguments here, once, before any work (and before any fallback);
errors are ``TypeError`` / ``ValueError`` naming the argument, the value received and the fix. The
package is the lowest layer and imports nothing of pyromoe; by job:

- :mod:`~pyromoe._validation.arrays`: arrays in, checked tensors out (shapes, finiteness, dtypes,
  pandas frames and their column names);
- :mod:`~pyromoe._validation.values`: counts, rates, probabilities, flags, seeds (``child_seed``),
  devices, models, and how much data and memory a request needs;
- :mod:`~pyromoe._validation.rules`: the declarative machinery, one table of rules per public
  entry checked by one decorator (:func:`~pyromoe._validation.rules.validate`).
"""

from . import arrays, rules, values
from .arrays import *  # noqa: F403 - the package re-exports its modules' public names
from .arrays import _is_pandas
from .rules import *  # noqa: F403
from .values import *  # noqa: F403

__all__ = ["_is_pandas", *arrays.__all__, *rules.__all__, *values.__all__]
