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

from .arrays import (
    _is_pandas,
    as_tensor,
    as_tensors,
    check_feature_names,
    check_x_shape,
    check_y_shape,
    keeps_feature_names,
    pandas_feature_names,
)
from .rules import (
    Rule,
    check_forwarded,
    count_rule,
    model_rule,
    num_experts_rule,
    one_of,
    optional,
    user_stacklevel,
    validate,
)
from .values import (
    FALLBACK_MEMORY_BOUND,
    NOISE_MODELS,
    PHYSICAL_MEMORY_SHARE,
    ROWS_PER_PARAMETER_WARN,
    SEED_BOUND,
    SUPPORTED_DEVICES,
    SmallDataWarning,
    available_devices,
    check_count,
    check_device,
    check_enough_rows,
    check_flag,
    check_model,
    check_noise_model,
    check_num_experts,
    check_positive,
    check_probability,
    check_request_size,
    check_seed,
    child_seed,
    memory_bound,
    num_parameters,
)

__all__ = [
    "FALLBACK_MEMORY_BOUND",
    "NOISE_MODELS",
    "PHYSICAL_MEMORY_SHARE",
    "ROWS_PER_PARAMETER_WARN",
    "Rule",
    "SEED_BOUND",
    "SUPPORTED_DEVICES",
    "SmallDataWarning",
    "_is_pandas",
    "as_tensor",
    "as_tensors",
    "available_devices",
    "check_count",
    "check_device",
    "check_enough_rows",
    "check_feature_names",
    "check_flag",
    "check_forwarded",
    "check_model",
    "check_noise_model",
    "check_num_experts",
    "check_positive",
    "check_probability",
    "check_request_size",
    "check_seed",
    "check_x_shape",
    "check_y_shape",
    "child_seed",
    "count_rule",
    "keeps_feature_names",
    "memory_bound",
    "model_rule",
    "num_experts_rule",
    "num_parameters",
    "one_of",
    "optional",
    "pandas_feature_names",
    "user_stacklevel",
    "validate",
]
