"""Arrays in, checked tensors out: tensors, shapes, finiteness and feature names.

Rules for arrays: torch tensors keep their device and (floating) dtype, detached from any autograd
graph; numpy arrays (or anything with ``__array__``, e.g. a pandas frame) become tensors of their
own float dtype (float64 for float64/int input); half precision (float16, bfloat16) is upcast with a
``UserWarning`` (float32 for tensors, float64 for numpy); ``y`` follows ``x``'s device and dtype.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from .rules import user_stacklevel
from .values import _DEVICE_TYPES, SUPPORTED_DEVICES

__all__ = [
    "as_tensor",
    "as_tensors",
    "check_feature_names",
    "check_x_shape",
    "check_y_shape",
    "keeps_feature_names",
    "pandas_feature_names",
]

_HALF = (torch.float16, torch.bfloat16)


def _is_pandas(value) -> bool:
    return type(value).__module__.split(".")[0] == "pandas" and hasattr(value, "to_numpy")


def _from_pandas(value):
    """A pandas object as a numeric numpy array (nullable columns: pd.NA -> NaN), and its labels."""
    columns = list(value.columns) if hasattr(value, "columns") else [getattr(value, "name", None)]
    array = np.asarray(value)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        try:  # nullable Int64 / Float64 / boolean columns holding pd.NA
            array = value.to_numpy(dtype="float64", na_value=np.nan)
        except (TypeError, ValueError):
            pass  # refused below with the dtype
    return array, columns


def _to_tensor(value, name: str, like: torch.Tensor | None = None):
    """``as_tensor`` and the column labels of a pandas input (None otherwise)."""
    columns = None
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.dtype in _HALF and like is None:
            warnings.warn(
                f"{name} has dtype {str(tensor.dtype).replace('torch.', '')}; computing in float32 "
                f"(half precision is too coarse for the moments and Cholesky factors). Pass "
                f"{name}.float() to silence this.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
            tensor = tensor.float()
        if tensor.device.type not in _DEVICE_TYPES:
            raise ValueError(
                f"{name} is on device {str(tensor.device)!r}, which pyromoe does not support: it "
                f"computes on {SUPPORTED_DEVICES}. Move it first, e.g. {name}.to('cpu')."
            )
    elif hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        if _is_pandas(value):
            array, columns = _from_pandas(value)
        else:
            array = np.asarray(value)
        if array.dtype == object or not (
            np.issubdtype(array.dtype, np.number) or array.dtype == bool
        ):
            raise TypeError(
                f"{name} must hold numbers; got an array of dtype {array.dtype}. "
                "Convert it with .astype(float) first."
            )
        if any(stride < 0 for stride in array.strides):
            array = np.ascontiguousarray(array)  # e.g. x[::-1]: torch refuses negative strides
        if array.dtype == np.float16 and like is None:
            warnings.warn(
                f"{name} has dtype float16; computing in float64 (half precision is too coarse "
                f"for the moments and Cholesky factors). Pass {name}.astype('float64') to "
                "silence this.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
            array = array.astype(np.float64)
        with warnings.catch_warnings():
            # a read-only array (a pandas frame's view, a memory map) is shared, never written to
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.as_tensor(array)
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor or a numpy array; got {type(value).__name__}. "
            f"Wrap it with numpy.asarray({name}) first."
        )
    if tensor.is_complex():
        raise TypeError(f"{name} must be real-valued; got dtype {tensor.dtype}")
    if like is not None:
        return tensor.to(device=like.device, dtype=like.dtype), columns
    if not tensor.is_floating_point():
        # integer/bool numpy input becomes float64 (numpy's float); an integer tensor the torch default
        tensor = tensor.to(
            torch.get_default_dtype() if isinstance(value, torch.Tensor) else torch.float64
        )
    return tensor, columns


def as_tensor(
    value,
    name: str,
    *,
    like: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convert ``value`` (torch tensor or array-like with ``__array__``) to a floating tensor.

    With ``like`` given, the result is moved to ``like``'s device and dtype. Tensors are detached
    (an estimate must not hold autograd graphs); negatively strided numpy arrays are copied; pandas
    objects are converted with ``.to_numpy(dtype="float64", na_value=np.nan)`` when they hold
    nullable columns; float16/bfloat16 is upcast with a ``UserWarning``.
    """
    tensor, columns = _to_tensor(value, name, like)
    if columns is not None:
        _check_finite(tensor, name, columns)  # name the pandas column while we know it
    return tensor


def _first_non_finite(tensor: torch.Tensor) -> list[int] | None:
    """The index of the first NaN or infinite entry, or None; in row chunks of about 4 MB
    (``torch.isfinite`` on a whole float64 array allocates a float copy of it)."""
    if tensor.dim() == 0:
        return None if bool(torch.isfinite(tensor)) else []
    per_row = max(1, tensor[0].numel())
    rows = max(1, (1 << 19) // per_row)
    for start in range(0, tensor.shape[0], rows):
        bad = ~torch.isfinite(tensor[start : start + rows])
        if bool(bad.any()):
            index = torch.nonzero(bad)[0].tolist()
            index[0] += start
            return index
    return None


def _check_finite(tensor: torch.Tensor, name: str, columns: list | None = None) -> None:
    index = _first_non_finite(tensor)
    if index is not None:
        if columns is not None and bool(torch.isnan(tensor[tuple(index)])):
            j = index[1] if len(index) > 1 else 0
            label = columns[j] if j < len(columns) else None
            column = f"column {label!r} (column {j})" if label is not None else f"column {j}"
            raise ValueError(
                f"{name} contains NaN or infinite values: a missing value (NaN or pd.NA) in "
                f"{column}, row {index[0]}; drop or impute those rows (e.g. frame.dropna()) "
                "before fitting"
            )
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
        For wrong shapes (including ``d = 0``), mismatched lengths, too few rows, NaN or infinite
        values (for a pandas input the message names the column and row of a missing value).
    """
    x = as_tensor(x, "x")
    check_x_shape(tuple(x.shape), in_features, min_rows)
    _check_finite(x, "x")
    if y is None:
        return x, None
    y = as_tensor(y, "y", like=x)
    if check_y_shape(tuple(y.shape), x.shape[0]):
        y = y.reshape(-1)
    _check_finite(y, "y")
    return x, y


def check_x_shape(shape: tuple, in_features: int | None = None, min_rows: int = 1) -> None:
    """Check the shape of inputs ``x`` (tensor, array, memory map or Dask array alike).

    Raises
    ------
    ValueError
        Not 2-D (with the reshape hint for 1-D), no columns, not ``in_features`` columns, fewer
        than ``min_rows`` rows.
    """
    if len(shape) != 2:
        hint = " (for a single input use x.reshape(-1, 1))" if len(shape) == 1 else ""
        raise ValueError(f"x must be a 2-D array of shape (n, d); got shape {tuple(shape)}{hint}")
    if shape[1] == 0:
        raise ValueError(
            f"x has no columns (shape {tuple(shape)}): a mixture of experts needs at least one "
            "input; pass x of shape (n, d) with d >= 1"
        )
    if in_features is not None and shape[1] != in_features:
        raise ValueError(
            f"x must have in_features={in_features} columns; got shape {tuple(shape)}. "
            "Build the model with in_features=x.shape[1]."
        )
    if shape[0] < min_rows:
        raise ValueError(f"x must have at least {min_rows} rows; got {shape[0]}")


def check_y_shape(shape: tuple, rows: int) -> bool:
    """Check the shape of outputs ``y`` against ``rows`` rows of ``x``; True when ``y`` is
    (n, 1) and must be flattened.

    Raises
    ------
    ValueError
        Not (n,) or (n, 1), or a row count other than x's.
    """
    column = len(shape) == 2 and shape[1] == 1
    if len(shape) != 1 and not column:
        raise ValueError(f"y must be a 1-D array of shape (n,); got shape {tuple(shape)}")
    if shape[0] != rows:
        raise ValueError(
            f"x and y must have the same number of rows; got {rows} rows in x and {shape[0]} in y"
        )
    return column


def pandas_feature_names(x) -> list[str] | None:
    """The column labels of a pandas DataFrame ``x`` when they can name features, else None.

    They can when every label is a string and no two are equal (a frame with integer or repeated
    column labels keeps the default names, positions 0..d-1).
    """
    if not (_is_pandas(x) and hasattr(x, "columns")):
        return None
    columns = list(x.columns)
    if columns and all(isinstance(c, str) for c in columns) and len(set(columns)) == len(columns):
        return columns
    return None


def check_feature_names(feature_names, in_features: int, x=None) -> list[str] | None:
    """The names of the ``in_features`` inputs: ``feature_names`` checked, else ``x``'s labels.

    Parameters
    ----------
    feature_names : sequence of str or None
        Explicit names, one per column of ``x``.
    in_features : int
        The number of columns ``d``.
    x : array-like, optional
        The inputs as the user passed them: without ``feature_names``, a pandas DataFrame's column
        labels are used (:func:`pandas_feature_names`).

    Returns
    -------
    list of str or None
        None when there are no names (the ``feature`` coordinates stay 0..d-1).

    Raises
    ------
    ValueError
        If ``feature_names`` is not a sequence of ``in_features`` distinct, non-empty strings.

    Examples
    --------
    >>> check_feature_names(["age", "dose"], 2)
    ['age', 'dose']
    """
    if feature_names is None:
        return None if x is None else pandas_feature_names(x)
    if isinstance(feature_names, (str, bytes)) or not hasattr(feature_names, "__iter__"):
        raise ValueError(
            f"feature_names must be a list of {in_features} strings, one per column of x; got "
            f"{type(feature_names).__name__} {feature_names!r}"
        )
    names = list(feature_names)
    wrong = [name for name in names if not isinstance(name, str) or not name]
    if wrong:
        raise ValueError(
            f"feature_names must hold non-empty strings; got {wrong[0]!r} "
            f"({type(wrong[0]).__name__}). Pass e.g. feature_names=[str(c) for c in columns]."
        )
    if len(names) != in_features:
        raise ValueError(
            f"feature_names must have one name per column of x (d={in_features}); got "
            f"{len(names)} names"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"feature_names must be distinct; {', '.join(map(repr, repeated))} appear more than "
            "once"
        )
    return names


def keeps_feature_names(fit: Callable) -> Callable:
    """Decorate a public estimator: a DataFrame ``x``'s column labels go with the estimate.

    The labels (:func:`pandas_feature_names`) are recorded in the returned estimate's
    ``diagnostics["feature_names"]``, which :meth:`pyromoe.MoEEstimate.summary` shows.
    """
    signature = inspect.signature(fit)

    @functools.wraps(fit)
    def wrapper(*args, **kwargs):
        names = pandas_feature_names(signature.bind_partial(*args, **kwargs).arguments.get("x"))
        estimate = fit(*args, **kwargs)
        if names is None or getattr(estimate, "in_features", None) != len(names):
            return estimate
        return replace(estimate, diagnostics={**estimate.diagnostics, "feature_names": names})

    return wrapper
