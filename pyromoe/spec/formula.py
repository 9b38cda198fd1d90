"""The model specification: formulas with factors for the experts and the gate, and the z-scores.

A :class:`ModelSpecification` is learnt once from the data a model is fitted on
(:meth:`ModelSpecification.from_data`) and then rebuilds the same design for any table
(:meth:`ModelSpecification.design`): the experts' design ``x``, the gate's design ``z`` and the
target ``y``, every column z-scored with the fitted data's mean and sd. Formulas are Wilkinson
formulas as `formulaic <https://matthewwardrop.github.io/formulaic/>`_ reads them (``C(site)``
factors, ``a:b`` interactions, ``np.log(x)``, stateful transforms such as ``scale(x)`` or
``poly(x, 2)``); nothing here parses a formula itself.

The specification keeps what a new table needs: the formulas, each factor's levels, the state of
stateful transforms, the design's column names and the standardisation. It is plain data, written
to and read from JSON (:meth:`ModelSpecification.to_json`), never pickled. New data are matched by
column name; a missing column, a missing value or a factor level the fit never saw is refused with
a message naming it.

The experts have intercepts and the gate has offsets (the model's bias sites), so each design is
built with the formula's intercept (factors then take treatment coding against their first level)
and the intercept column is dropped; a formula that removes the intercept is refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

__all__ = ["Design", "ModelSpecification", "SPECIFICATION_FORMAT"]

#: Version of the JSON written by :meth:`ModelSpecification.to_json`.
SPECIFICATION_FORMAT = 1

_INTERCEPT = "Intercept"


class Design(NamedTuple):
    """The standardised design of a table: ``x`` (n, d_x) for the experts, ``z`` (n, d_z) for the
    gate and ``y`` (n,), or None when the table was built without its target; float64 arrays."""

    x: np.ndarray
    z: np.ndarray
    y: np.ndarray | None


@dataclass(frozen=True)
class ModelSpecification:
    """Formulas, factor levels and standardisation of a mixture of experts fitted to a table.

    Build it with :meth:`from_data`; its fields are plain data (JSON: :meth:`to_json`).

    Attributes
    ----------
    formula : str
        The experts' formula, ``"y ~ x1 + np.log(x2) + C(site)"``.
    gate_formula : str
        The gate's one-sided formula, ``"~ z1 + C(site)"``; by default the experts' right-hand side.
    target : str
        The target as the formula names it (the left-hand side, e.g. ``"y"`` or ``"np.log(y)"``).
    expert_columns, gate_columns : tuple of str
        The design columns, as formulaic names them (``"C(site)[T.b]"``), intercept excluded.
    expert_continuous, gate_continuous : tuple of bool
        Per design column: True when no factor enters it (the moment step uses those columns).
    variables : tuple of str
        The table's columns the predictors read (the target's columns excluded).
    target_variables : tuple of str
        The table's columns the target reads.
    factor_levels : dict
        Each factor's table column -> its levels, in coding order (the first is the reference).
    transform_state : dict
        ``{"experts": ..., "gate": ..., "target": ...}``: formulaic's state of stateful transforms
        (e.g. the centre of ``center(x)``), tagged so that JSON keeps its keys' types.
    x_mean, x_sd, z_mean, z_sd : tuple of float
        The z-scores of the design columns: ``(column - mean) / sd``, population sd.
    y_mean, y_sd : float
        The z-score of the target.
    """

    formula: str
    gate_formula: str
    target: str
    expert_columns: tuple[str, ...]
    gate_columns: tuple[str, ...]
    expert_continuous: tuple[bool, ...]
    gate_continuous: tuple[bool, ...]
    variables: tuple[str, ...]
    target_variables: tuple[str, ...]
    factor_levels: dict[str, tuple]
    transform_state: dict[str, Any]
    x_mean: tuple[float, ...]
    x_sd: tuple[float, ...]
    z_mean: tuple[float, ...]
    z_sd: tuple[float, ...]
    y_mean: float
    y_sd: float

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_data(cls, data, formula: str, gate: str | None = None) -> ModelSpecification:
        """Learn the specification of ``formula`` (experts) and ``gate`` from the table ``data``.

        Parameters
        ----------
        data : pandas.DataFrame or mapping of column name -> 1-D array
        formula : str
            Two-sided: ``"y ~ x1 + C(site)"``.
        gate : str, optional
            One-sided, ``"~ z1 + C(site)"``. Default: the experts' right-hand side (the gate and
            the experts see the same covariates).

        Raises
        ------
        TypeError
            ``formula`` or ``gate`` not a str; ``data`` not a table.
        ValueError
            A formula that formulaic cannot read, or without the required sides; a formula that
            removes the intercept; a column the formula needs missing from ``data``, or with a
            missing value; a design column that is constant (it carries no information); a target
            that is not one column.

        Examples
        --------
        >>> import pandas as pd
        >>> table = pd.DataFrame({"y": [1.0, 2.0, 4.0, 3.0], "u": [0.0, 1.0, 3.0, 2.0],
        ...                       "site": ["a", "b", "a", "b"]})
        >>> spec = ModelSpecification.from_data(table, "y ~ u + C(site)", gate="~ C(site)")
        >>> spec.expert_columns, spec.gate_columns
        (('u', 'C(site)[T.b]'), ('C(site)[T.b]',))
        >>> spec.design(table).x.shape
        (4, 2)
        """
        from formulaic import Formula

        table = _as_table(data, "data")
        experts = _parse(formula, "formula", two_sided=True)
        # the user's own text of each side (formulaic's str() drops the `quotes` of odd names)
        lhs_text, rhs_text = (part.strip() for part in formula.split("~", 1))
        gate_text = f"~ {rhs_text}" if gate is None else gate.strip()
        gate_formula = _parse(gate_text, "gate", two_sided=False)
        target_text = lhs_text
        lhs_spec, target_values = _materialise(Formula(f"{target_text} - 1"), table, "formula")
        x_spec, x = _materialise(experts.rhs, table, "formula")
        z_spec, z = _materialise(gate_formula, table, "gate")
        target_values = target_values.to_numpy(dtype=np.float64)
        if target_values.shape[1] != 1:
            raise ValueError(
                f"formula's left-hand side must give one target column; {target_text!r} gives "
                f"{target_values.shape[1]}"
            )
        data_columns = set(table.columns)
        predictors = _data_variables(x_spec, data_columns) | _data_variables(z_spec, data_columns)
        levels = {**_factor_levels(x_spec, data_columns), **_factor_levels(z_spec, data_columns)}
        x_columns, x_continuous, x = _without_intercept(x_spec, x)
        z_columns, z_continuous, z = _without_intercept(z_spec, z)
        x_mean, x_sd = _z_scores(x, x_columns, "formula")
        z_mean, z_sd = _z_scores(z, z_columns, "gate")
        y_mean, y_sd = _z_scores(target_values, [target_text], "formula", target=True)
        return cls(
            formula=f"{target_text} ~ {rhs_text}",
            gate_formula=gate_text,
            target=target_text,
            expert_columns=tuple(x_columns),
            gate_columns=tuple(z_columns),
            expert_continuous=tuple(x_continuous),
            gate_continuous=tuple(z_continuous),
            variables=tuple(sorted(predictors)),
            target_variables=tuple(sorted(_data_variables(lhs_spec, data_columns))),
            factor_levels={name: tuple(values) for name, values in sorted(levels.items())},
            transform_state={
                "experts": _encode(x_spec.transform_state),
                "gate": _encode(z_spec.transform_state),
                "target": _encode(lhs_spec.transform_state),
            },
            x_mean=x_mean,
            x_sd=x_sd,
            z_mean=z_mean,
            z_sd=z_sd,
            y_mean=y_mean[0],
            y_sd=y_sd[0],
        )

    # ------------------------------------------------------------------------------ using
    def design(self, data, *, target: bool = True) -> Design:
        """The standardised design of ``data``, columns matched by name.

        Parameters
        ----------
        data : pandas.DataFrame or mapping of column name -> 1-D array
            Any column order; extra columns are ignored.
        target : bool, default True
            Also build ``y`` (its columns must then be present); False for new data to predict.

        Raises
        ------
        ValueError
            A column the formulas need is missing (the message lists them and the columns
            given), has a missing value (column and row named), or a factor has a level the
            fitted data did not have (column and levels named).
        """
        from formulaic import Formula, ModelSpec

        table = _as_table(data, "data")
        needed = [*self.variables, *(self.target_variables if target else ())]
        _check_columns(table, needed)
        table = self._with_levels(table)
        built = {}
        for part, text, columns in (
            ("experts", "~ " + self.formula.split("~", 1)[1], self.expert_columns),
            ("gate", self.gate_formula, self.gate_columns),
        ):
            spec = ModelSpec(
                formula=Formula(text), transform_state=_decode(self.transform_state[part])
            )
            matrix = spec.get_model_matrix(table, na_action="raise")
            got = [name for name in matrix.columns if name != _INTERCEPT]
            if tuple(got) != columns:  # cannot happen with the levels fixed; never guess
                raise RuntimeError(f"the {part} design changed: {got} instead of {list(columns)}")
            built[part] = matrix[list(columns)].to_numpy(dtype=np.float64)
        x = (built["experts"] - np.asarray(self.x_mean)) / np.asarray(self.x_sd)
        z = (built["gate"] - np.asarray(self.z_mean)) / np.asarray(self.z_sd)
        y = None
        if target:
            spec = ModelSpec(
                formula=Formula(f"{self.target} - 1"),
                transform_state=_decode(self.transform_state["target"]),
            )
            values = spec.get_model_matrix(table, na_action="raise").to_numpy(dtype=np.float64)
            y = (values[:, 0] - self.y_mean) / self.y_sd
        return Design(x, z, y)

    def _with_levels(self, table: pd.DataFrame) -> pd.DataFrame:
        """``table`` with each factor column cast to a Categorical of the fitted levels."""
        table = table.copy()
        for name, levels in self.factor_levels.items():
            if name not in table.columns:
                continue
            column = table[name]
            known = set(levels)
            unseen = sorted(
                {value for value in column.dropna().unique() if value not in known}, key=str
            )
            if unseen:
                shown = ", ".join(repr(value) for value in unseen[:5])
                raise ValueError(
                    f"column '{name}' has level(s) {shown} that the fitted data did not have; "
                    f"the model knows {list(levels)}. Drop those rows or refit with them"
                )
            table[name] = pd.Categorical(column, categories=list(levels))
        return table

    # ------------------------------------------------------------------------------ JSON
    def to_json(self) -> str:
        """The specification as JSON text (no pickle); :meth:`from_json` reads it back."""
        record = asdict(self)
        record["factor_levels"] = {
            name: _encode(list(values)) for name, values in self.factor_levels.items()
        }
        return json.dumps({"format": SPECIFICATION_FORMAT, **record}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ModelSpecification:
        """The specification :meth:`to_json` wrote.

        Raises
        ------
        ValueError
            Text that is not such a record (the message says what is wrong).
        """
        try:
            record = json.loads(text)
        except ValueError as error:
            raise ValueError(f"not a pyromoe model specification (invalid JSON: {error})") from None
        if not isinstance(record, dict) or record.pop("format", None) != SPECIFICATION_FORMAT:
            raise ValueError(
                f"not a pyromoe model specification of format {SPECIFICATION_FORMAT}; write it "
                "with ModelSpecification.to_json"
            )
        record["factor_levels"] = {
            name: tuple(_decode(values)) for name, values in record["factor_levels"].items()
        }
        for name in (
            "expert_columns",
            "gate_columns",
            "expert_continuous",
            "gate_continuous",
            "variables",
            "target_variables",
            "x_mean",
            "x_sd",
            "z_mean",
            "z_sd",
        ):
            record[name] = tuple(record[name])
        return cls(**record)


# ---------------------------------------------------------------------------------- helpers
def _as_table(data, name: str) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, Mapping):
        try:
            return pd.DataFrame(dict(data))
        except ValueError as error:
            raise ValueError(f"{name} must be a table of equal-length columns: {error}") from None
    raise TypeError(
        f"{name} must be a pandas DataFrame (or a dict of column name -> values); got "
        f"{type(data).__name__}"
    )


def _parse(text, name: str, *, two_sided: bool):
    from formulaic import Formula

    if not isinstance(text, str):
        raise TypeError(
            f"{name} must be a formula string such as 'y ~ x1 + C(site)'; got {type(text).__name__}"
        )
    example = "'y ~ x1 + C(site)'" if two_sided else "'~ z1 + C(site)'"
    try:
        formula = Formula(text)
    except Exception as error:  # formulaic raises its own parser errors
        raise ValueError(
            f"{name} {text!r} is not a formula formulaic can read ({_first_line(error)}); "
            f"e.g. {example}"
        ) from None
    has_lhs = hasattr(formula, "lhs")
    if has_lhs != two_sided:
        need = "a target on the left of '~'" if two_sided else "no left-hand side"
        raise ValueError(f"{name} must have {need}, e.g. {example}; got {text!r}")
    rhs = formula.rhs if two_sided else formula
    if "1" not in [str(term) for term in rhs]:
        raise ValueError(
            f"{name} {text!r} removes the intercept ('- 1' or '+ 0'); the experts have "
            "intercepts and the gate offsets of their own, so keep it (factors are then coded "
            "against their first level)"
        )
    return formula


def _materialise(formula, table: pd.DataFrame, name: str):
    """(formulaic's ModelSpec, the design matrix), with errors in pyromoe's words: a missing
    column or a missing value is named before formulaic sees the table."""
    import re

    from formulaic import model_matrix

    names = {name for term in formula for factor in term.factors for name in _names_in(factor.expr)}
    _check_columns(table, sorted(names & set(table.columns)))
    try:
        matrix = model_matrix(formula, table, na_action="raise")
    except Exception as error:  # formulaic's evaluation errors name the factor
        text = _first_line(error)
        unknown = re.search(r"`([^`]+)` is not present in the dataset", text) or re.search(
            r"name '([^']+)' is not defined", text
        )
        if unknown:
            _check_columns(table, [unknown.group(1)])
        raise ValueError(f"{name}: cannot build the design from the data: {text}") from None
    return matrix.model_spec, matrix


def _names_in(expr) -> set[str]:
    """The names a factor's expression reads (a `quoted` name as the column it names)."""
    import re

    from formulaic.utils.variables import get_expression_variables

    text = str(expr)
    quoted = re.findall(r"`([^`]*)`", text)
    for position, name in enumerate(quoted):
        text = text.replace(f"`{name}`", f"__pyromoe_quoted_{position}__", 1)
    try:
        found = {str(name) for name in get_expression_variables(text, {})}
    except SyntaxError:  # formulaic gives a plain look-up's name bare, spaces and all
        return {str(expr)}
    return {
        quoted[int(name[len("__pyromoe_quoted_") : -2])] if name.startswith("__pyromoe_q") else name
        for name in found
    }


def _first_line(error: Exception) -> str:
    """formulaic's message without its terminal colours and source excerpt."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m|[\u29da\u29db]", "", str(error)).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


def _check_columns(table: pd.DataFrame, needed) -> None:
    missing = [name for name in needed if name not in table.columns]
    if missing:
        shown = ", ".join(f"'{name}'" for name in missing)
        given = ", ".join(f"'{name}'" for name in list(table.columns)[:20])
        raise ValueError(
            f"data has no column {shown}, which the model's formulas use; its columns are {given}"
        )
    for name in needed:
        missing_rows = np.flatnonzero(pd.isna(table[name]).to_numpy())
        if missing_rows.size:
            raise ValueError(
                f"column '{name}' has a missing value (first at row {int(missing_rows[0])}, "
                f"{missing_rows.size} in all); drop or fill those rows first"
            )


def _data_variables(spec, columns: set[str]) -> set[str]:
    return {str(name) for name in spec.variables_by_source.get("data", set()) if name in columns}


def _categorical_factors(spec) -> set[str]:
    return {
        str(expr)
        for expr, (kind, _) in spec.encoder_state.items()
        if getattr(kind, "value", kind) == "categorical"
    }


def _factor_levels(spec, columns: set[str]) -> dict[str, list]:
    """Each factor's table column -> its levels in coding order."""
    levels: dict[str, list] = {}
    for expr, (kind, state) in spec.encoder_state.items():
        if getattr(kind, "value", kind) != "categorical":
            continue
        for name in (name for name in _names_in(expr) if name in columns):
            levels[name] = [_plain(value) for value in state["categories"]]
    return levels


def _without_intercept(spec, matrix) -> tuple[list[str], list[bool], np.ndarray]:
    """Column names, whether each is free of factors, and the values, intercept dropped."""
    categorical = _categorical_factors(spec)
    continuous: dict[str, bool] = {}
    for structure in spec.structure:
        factors = {str(factor.expr) for factor in structure.term.factors}
        for column in structure.columns:
            continuous[column] = not (factors & categorical)
    columns = [name for name in matrix.columns if name != _INTERCEPT]
    return (
        columns,
        [continuous.get(name, True) for name in columns],
        matrix[columns].to_numpy(dtype=np.float64),
    )


def _z_scores(values: np.ndarray, names, part: str, *, target: bool = False):
    """Per column (mean, population sd), refusing a constant column."""
    mean, sd = values.mean(axis=0), values.std(axis=0)
    constant = [str(name) for name, s in zip(names, sd) if not s > 0]
    if constant and target:
        raise ValueError(f"the target {constant[0]} is constant: there is nothing to model")
    if constant:
        shown = ", ".join(f"'{name}'" for name in constant)
        raise ValueError(
            f"{part}: design column(s) {shown} are constant in the data; a constant column "
            "carries no information (the intercept models a constant): remove that term, or a "
            "factor level no row has"
        )
    if not (np.isfinite(mean).all() and np.isfinite(sd).all()):
        raise ValueError(f"{part}: the design has infinite values; check the transforms")
    return tuple(float(m) for m in mean), tuple(float(s) for s in sd)


def _plain(value):
    """A level as a JSON-able Python scalar (numpy scalars to int/float/str/bool)."""
    return value.item() if isinstance(value, np.generic) else value


def _encode(value):
    """formulaic's transform state as JSON-able data that keeps dict keys' and arrays' types."""
    if isinstance(value, Mapping):
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, np.ndarray):
        return {"__array__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, np.generic):
        return _encode(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a transform state of type {type(value).__name__}")


def _decode(value):
    if isinstance(value, dict):
        if "__dict__" in value:
            return {_hashable(_decode(k)): _decode(v) for k, v in value["__dict__"]}
        if "__array__" in value:
            return np.asarray(value["__array__"], dtype=value["dtype"])
        if "__float__" in value:
            return float(value["__float__"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _hashable(value):
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value
