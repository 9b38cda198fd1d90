"""Validation at the public boundary: arrays in, checked tensors out, with errors that say how to fix them.

Rules: torch tensors keep their device and (floating) dtype; numpy arrays (or anything with
``__array__``, e.g. a pandas frame) become tensors of their own float dtype (float64 for float64/int
input); ``y`` follows ``x``'s device and dtype.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

__all__ = ["as_tensors", "as_tensor", "check_num_experts", "check_positive"]


def as_tensor(
    value,
    name: str,
    *,
    like: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convert ``value`` (torch tensor or array-like with ``__array__``) to a floating tensor.

    With ``like`` given, the result is moved to ``like``'s device and dtype.
    """
    if isinstance(value, torch.Tensor):
        tensor = value
    elif hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        array = np.asarray(value)
        if array.dtype == object or not (
            np.issubdtype(array.dtype, np.number) or array.dtype == bool
        ):
            raise TypeError(
                f"{name} must hold numbers; got an array of dtype {array.dtype}. "
                "Convert it with .astype(float) first."
            )
        tensor = torch.as_tensor(array)
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor or a numpy array; got {type(value).__name__}. "
            f"Wrap it with numpy.asarray({name}) first."
        )
    if tensor.is_complex():
        raise TypeError(f"{name} must be real-valued; got dtype {tensor.dtype}")
    if like is not None:
        return tensor.to(device=like.device, dtype=like.dtype)
    if not tensor.is_floating_point():
        # integer/bool numpy input becomes float64 (numpy's float); an integer tensor the torch default
        tensor = tensor.to(
            torch.get_default_dtype() if isinstance(value, torch.Tensor) else torch.float64
        )
    return tensor


def _check_finite(tensor: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        index = torch.nonzero(bad)[0].tolist()
        where = f"row {index[0]}" + (f", column {index[1]}" if len(index) > 1 else "")
        raise ValueError(
            f"{name} contains NaN or infinite values (first at {where}); "
            "drop or impute those rows before fitting"
        )


def as_tensors(
    x,
    y=None,
    *,
    in_features: int | None = None,
    min_rows: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate inputs ``x`` (n, d) and outputs ``y`` (n,) and return them as tensors.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray, shape (n, d)
        Inputs. A 1-D array is refused (reshape it to (n, 1)).
    y : torch.Tensor or numpy.ndarray, shape (n,), optional
        Outputs; converted to ``x``'s device and dtype.
    in_features : int, optional
        Expected ``d``; checked when given.
    min_rows : int
        Minimum number of rows.

    Returns
    -------
    (x, y) : tuple of tensors (``y`` is None when not given)

    Raises
    ------
    TypeError
        For non-array input.
    ValueError
        For wrong shapes, mismatched lengths, too few rows, NaN or infinite values.
    """
    x = as_tensor(x, "x")
    if x.dim() != 2:
        hint = " (for a single input use x.reshape(-1, 1))" if x.dim() == 1 else ""
        raise ValueError(f"x must be a 2-D array of shape (n, d); got shape {tuple(x.shape)}{hint}")
    if in_features is not None and x.shape[1] != in_features:
        raise ValueError(
            f"x must have in_features={in_features} columns; got shape {tuple(x.shape)}. "
            "Build the model with in_features=x.shape[1]."
        )
    if x.shape[0] < min_rows:
        raise ValueError(f"x must have at least {min_rows} rows; got {x.shape[0]}")
    _check_finite(x, "x")
    if y is None:
        return x, None
    y = as_tensor(y, "y", like=x)
    if y.dim() == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.dim() != 1:
        raise ValueError(f"y must be a 1-D array of shape (n,); got shape {tuple(y.shape)}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(
            f"x and y must have the same number of rows; got {x.shape[0]} rows in x "
            f"and {y.shape[0]} in y"
        )
    _check_finite(y, "y")
    return x, y


def check_num_experts(num_experts) -> int:
    """Check that ``num_experts`` is an integer >= 2 and return it."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, numbers.Integral):
        raise TypeError(f"num_experts must be an int >= 2; got {type(num_experts).__name__}")
    if num_experts < 2:
        raise ValueError(
            f"num_experts must be >= 2 (a mixture needs at least two experts); got {num_experts}"
        )
    return int(num_experts)


def check_positive(value, name: str, *, integer: bool = False):
    """Check that ``value`` is a finite number > 0 (an int if ``integer``) and return it."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {expected} > 0; got {type(value).__name__}")
    if not (value > 0 and np.isfinite(float(value))):
        raise ValueError(f"{name} must be > 0 and finite; got {value}")
    return int(value) if integer else float(value)
