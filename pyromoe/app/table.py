"""Reading a user's table: a CSV file to ``x`` (n, d) and ``y`` (n,) float64 arrays.

:func:`read_table` (a file) and :func:`parse_table` (a string) give errors that name the file, the
column and the row, and say how to fix the problem. I/O only: no maths, no standardisation.

Row numbers in error messages are given both ways: ``data row r`` counts data rows from 1 (the header
is not a data row) and ``file line l`` is the 1-based line of the file (blank lines skipped by the
reader still count as lines).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, TextIO

import numpy as np
import pandas as pd

__all__ = ["Table", "read_table", "parse_table", "read_frame", "MISSING_VALUE_MARKERS"]

#: Cell contents (after stripping spaces, compared case-insensitively) read as a missing value.
MISSING_VALUE_MARKERS: frozenset[str] = frozenset(
    {"", "na", "nan", "n/a", "null", "none", "?", "."}
)

_DELIMITER_CANDIDATES = (",", "\t", ";")


class Table(NamedTuple):
    """A numeric table read from a file: unpacks as ``x, y, feature_names, target_name``.

    Attributes
    ----------
    x : numpy.ndarray, shape (n, d), float64
        Input columns, in the order of ``feature_names``.
    y : numpy.ndarray, shape (n,), float64
        The target column.
    feature_names : tuple of str, length d
    target_name : str
    """

    x: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...]
    target_name: str


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_table(
    path: str | os.PathLike,
    target: str,
    features: Sequence[str] | None = None,
    *,
    min_rows: int = 1,
    min_rows_reason: str | None = None,
    delimiter: str | None = None,
) -> Table:
    """Read a CSV file with a header line into inputs ``x`` and target ``y``.

    Parameters
    ----------
    path : str or os.PathLike
        A text file, UTF-8 (a byte-order mark is accepted), whose first non-blank line names the
        columns. Blank lines are skipped; spaces around names and values are ignored. pandas
        splits the fields (quoting as in Python's ``csv`` module); each value is then read as
        ``float`` reads it, correctly rounded.
    target : str
        Name of the column to predict.
    features : sequence of str, optional
        Names of the input columns, in the order wanted. Default: every column except ``target``, in
        file order (so every other column must then be numeric).
    min_rows : int, default 1
        Fewest data rows accepted (e.g. the number of model parameters).
    min_rows_reason : str, optional
        Why ``min_rows`` rows are needed; quoted in the error message.
    delimiter : str, optional
        Field separator. Default: whichever of ``,``, tab and ``;`` occurs most often in the header
        line (``,`` when none does).

    Returns
    -------
    Table
        ``(x, y, feature_names, target_name)`` with ``x`` of shape (n, d) and ``y`` of shape (n,),
        both float64.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the path is a folder, the file is empty or not UTF-8 text, has no data rows, repeats a
        column name, a quoted value is not closed (or text follows its closing quote, as in
        ``"1" ,2``), a row has the wrong number of fields, ``target`` or a feature is not a column
        (the message lists the columns), ``target`` is also a feature, a feature is listed twice,
        a used cell is missing (empty, ``NA``, ``NaN``, ...) or not a finite number (the message
        names the column, the data row and the file line), or there are fewer than ``min_rows``
        data rows.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "data.csv"
    >>> _ = path.write_text("a,b,y\\n1,2,3\\n4,5,6\\n")
    >>> x, y, names, target = read_table(path, target="y")
    >>> x.shape, y.tolist(), names
    ((2, 2), [3.0, 6.0], ('a', 'b'))
    """
    return _read_file(
        path,
        lambda stream: parse_table(
            stream,
            target,
            features,
            source=str(path),
            min_rows=min_rows,
            min_rows_reason=min_rows_reason,
            delimiter=delimiter,
        ),
    )


def _read_file(path, read: Callable[[TextIO], object]):
    """``read(stream)`` of the UTF-8 text file ``path``, with errors that name it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"data file '{path}' not found (looked for {path.absolute()}); check the path and the "
            "current working directory"
        )
    if path.is_dir():
        raise ValueError(f"data file '{path}' is a folder; pass the path of a CSV file inside it")
    try:
        with open(path, encoding="utf-8-sig", newline="") as stream:
            return read(stream)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"data file '{path}' is not UTF-8 text ({error.reason} at byte {error.start}); "
            "save it as UTF-8 CSV (spreadsheet programs offer 'CSV UTF-8')"
        ) from None


def parse_table(
    stream: TextIO | str,
    target: str,
    features: Sequence[str] | None = None,
    *,
    source: str = "<table>",
    min_rows: int = 1,
    min_rows_reason: str | None = None,
    delimiter: str | None = None,
) -> Table:
    """Parse CSV text (an open text stream or a string) like :func:`read_table`.

    ``source`` names the table in error messages; the other parameters, the return value and the
    errors are those of :func:`read_table`.

    Examples
    --------
    >>> parse_table("t,y\\n0,1\\n1,3\\n", target="y").x.ravel().tolist()
    [0.0, 1.0]
    """
    _check_min_rows_argument(min_rows)
    if not isinstance(target, str):
        raise TypeError(f"target must be a column name (str); got {type(target).__name__}")
    if isinstance(features, str):
        raise TypeError(
            f"features must be a sequence of column names, e.g. ['{features}']; got the string "
            f"'{features}'"
        )
    if isinstance(stream, str):
        stream = io.StringIO(stream)

    header, cells, lines = _read_records(stream, source, delimiter)
    columns = _column_index(header, source)
    feature_names = _select_features(columns, target, features, source)

    if len(cells) < min_rows:
        why = f" ({min_rows_reason})" if min_rows_reason else ""
        raise ValueError(
            f"{source} has {len(cells)} data row{'s' if len(cells) != 1 else ''}; at least "
            f"{min_rows} are needed{why}. Use more data or a smaller model"
        )

    used = [*feature_names, target]
    values = _to_float_columns(cells[[columns[name] for name in used]], lines, used, source)
    x = np.ascontiguousarray(values[:, :-1])
    y = np.ascontiguousarray(values[:, -1])
    return Table(x=x, y=y, feature_names=tuple(feature_names), target_name=target)


def read_frame(path: str | os.PathLike, *, delimiter: str | None = None) -> pd.DataFrame:
    """Read a CSV file with a header line into a DataFrame for a formula: numbers and factors.

    The file is read as :func:`read_table` reads it (delimiter, quotes, blank lines, byte-order
    mark, the same errors for a malformed file). A column whose every present cell reads as a
    finite number becomes float64; any other column stays text (a factor for the formulas). Empty
    cells and the missing-value markers (``NA``, ``NaN``, ``null``, ...) become missing values,
    which the model specification names by column and row when a formula uses the column.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "data.csv"
    >>> _ = path.write_text("site,u,y\\na,1,3\\nb,NA,6\\n")
    >>> frame = read_frame(path)
    >>> frame["site"].tolist(), frame["u"].isna().tolist(), str(frame["y"].dtype)
    (['a', 'b'], [False, True], 'float64')
    """
    header, cells, _ = _read_file(path, lambda stream: _read_records(stream, str(path), delimiter))
    _column_index(header, str(path))
    columns = {}
    for position, name in enumerate(header):
        texts = cells.iloc[:, position].astype(str)
        missing = texts.str.lower().isin(MISSING_VALUE_MARKERS)
        present = texts[~missing]
        with contextlib.suppress(ValueError):
            values = present.to_numpy(dtype=object).astype(np.float64)
            if np.isfinite(values).all():
                column = np.full(len(texts), np.nan)
                column[~missing.to_numpy()] = values
                columns[name] = column
                continue
        columns[name] = texts.where(~missing, None).to_numpy(dtype=object)
    return pd.DataFrame(columns)


def _check_min_rows_argument(min_rows: int) -> None:
    if isinstance(min_rows, bool) or not isinstance(min_rows, (int, np.integer)) or min_rows < 1:
        raise ValueError(f"min_rows must be a positive integer; got {min_rows!r}")


def _read_records(
    stream: TextIO, source: str, delimiter: str | None
) -> tuple[list[str], pd.DataFrame, np.ndarray]:
    """Return the header names, the data cells and the file line of each data row.

    The cells are stripped strings in a frame whose columns ``0 .. len(header) - 1`` follow the
    header, one row per data row; blank lines are left out but count in the file lines.
    """
    text = stream.read()
    if not text.strip():
        raise _empty(source)
    # One line ending for pandas' python engine; a lone "\r" (old Mac files) still ends a line.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if delimiter is None:
        first_line = text.lstrip().split("\n", 1)[0]
        counts = [first_line.count(candidate) for candidate in _DELIMITER_CANDIDATES]
        delimiter = _DELIMITER_CANDIDATES[int(np.argmax(counts))] if max(counts) > 0 else ","
    elif not isinstance(delimiter, str) or len(delimiter) != 1:
        raise ValueError(f"delimiter must be a single character such as ','; got {delimiter!r}")

    width = _header_width(text, delimiter, source)
    cells, fields, line_ends = _split_records(text, delimiter, width, source)
    records = np.flatnonzero(fields)
    if records.size == 0:  # only lines such as ',,'
        raise _empty(source)
    header = [str(name) for name in cells.iloc[records[0], : fields[records[0]]]]
    rows, lines = records[1:], line_ends[records[1:]]
    if rows.size == 0:
        raise ValueError(
            f"{source} has a header line ({', '.join(header)}) but no data rows; add one line per "
            "observation"
        )
    wrong = np.flatnonzero(fields[rows] != len(header))
    if wrong.size:
        row = int(wrong[0])
        count = int(fields[rows[row]])
        raise ValueError(
            f"{source}: data row {row + 1} (file line {lines[row]}) has "
            f"{count} field{'s' if count != 1 else ''} but the header has "
            f"{len(header)} ({', '.join(header)}); check for a missing or extra "
            f"'{delimiter}' or an unquoted '{delimiter}' inside a value"
        )
    return header, cells.iloc[rows, : len(header)], lines


def _empty(source: str) -> ValueError:
    return ValueError(
        f"{source} is empty; expected a header line naming the columns, then one line per "
        "observation, e.g. 'x1,x2,y'"
    )


def _header_width(text: str, delimiter: str, source: str) -> int:
    """The most fields in a record up to the header (the first non-blank one), read as pandas will.

    A frame this wide holds the header, and pandas never takes a first record wider than the frame
    for an index column.
    """
    width = 1
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, skipinitialspace=True, strict=True)
    try:
        for record in reader:
            width = max(width, len(record))
            if "".join(record).strip():
                break
    except csv.Error:
        raise _malformed(text, delimiter, source) from None
    return width


#: Stands in for the fields of a record wider than the frame (see :func:`_split_records`).
_TOO_WIDE = "\0pyromoe: more fields than the frame has columns\0"


def _split_records(
    text: str, delimiter: str, width: int, source: str
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Split ``text`` (lines ending in ``"\\n"``) into records with pandas, in ``width`` columns.

    Returns
    -------
    cells : pandas.DataFrame
        One row per record, blank lines included: the fields as stripped strings, ``None`` past
        the end of a short record. A record with more than ``width`` fields holds a marker.
    fields : numpy.ndarray of int
        Each record's number of fields; 0 for a blank line (every field empty or spaces).
    line_ends : numpy.ndarray of int
        The 1-based file line on which each record ends (a quoted field may hold line breaks).
    """
    wide: list[tuple[int, int, bool]] = []  # (fields, line breaks, blank) of each wider record

    def too_wide(record: list[str]) -> list[str]:
        breaks = sum(field.count("\n") for field in record)
        wide.append((len(record), breaks, not "".join(record).strip()))
        return [_TOO_WIDE] * width

    # The python engine pads a short record with None (the C engine pads with "", which hides a
    # missing field) and hands a long one to on_bad_lines. na_filter=False: every cell a string.
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep=delimiter,
            header=None,
            names=range(width),
            dtype=object,
            na_filter=False,
            skipinitialspace=True,
            skip_blank_lines=False,
            engine="python",
            on_bad_lines=too_wide,
        )
    except pd.errors.ParserError:
        raise _malformed(text, delimiter, source) from None
    cells = frame.apply(lambda column: column.str.strip())
    present = cells.notna()
    fields = present.sum(axis=1).to_numpy(copy=True)
    fields[(~present | cells.eq("")).all(axis=1).to_numpy()] = 0
    is_wide = cells[0].eq(_TOO_WIDE).to_numpy()
    if wide:
        counts, _, blank = zip(*wide)
        fields[is_wide] = np.where(blank, 0, counts)

    # Each record takes one line plus the line breaks inside its quoted fields. pandas skips, with
    # no word, a line the csv module refuses (strict quoting): then the lines do not add up.
    n_lines = text.count("\n") + (not text.endswith("\n"))
    breaks = np.zeros(len(frame), dtype=np.int64)
    if len(frame) != n_lines:
        breaks = frame.apply(lambda column: column.str.count("\n")).fillna(0).sum(axis=1)
        breaks = breaks.to_numpy(dtype=np.int64, copy=True)
        breaks[is_wide] = [count for _, count, _ in wide]
        if len(frame) + breaks.sum() != n_lines:
            raise _malformed(text, delimiter, source)
    line_ends = np.arange(1, len(frame) + 1) + np.cumsum(breaks)
    return cells, fields, line_ends


def _malformed(text: str, delimiter: str, source: str) -> ValueError:
    """The error for a quoting mistake: pandas reads CSV as Python's ``csv`` module does (strict)."""
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, skipinitialspace=True, strict=True)
    try:
        for _ in reader:
            pass
    except csv.Error as error:
        return ValueError(
            f"{source}: malformed CSV at file line {reader.line_num}: {error}; a quoted value must "
            "be closed by '\"' right before the next delimiter or the end of the line (write a "
            "'\"' inside a quoted value as '\"\"')"
        )
    return ValueError(f"{source}: malformed CSV; check the quotes ('\"') in the file")


def _column_index(header: list[str], source: str) -> dict[str, int]:
    for position, name in enumerate(header):
        if not name:
            raise ValueError(
                f"{source}: column {position + 1} of the header has no name; name every column"
            )
    seen: dict[str, int] = {}
    for position, name in enumerate(header):
        if name in seen:
            raise ValueError(
                f"{source}: column name '{name}' appears twice in the header (columns "
                f"{seen[name] + 1} and {position + 1}); rename one of them"
            )
        seen[name] = position
    return seen


def _select_features(
    columns: dict[str, int], target: str, features: Sequence[str] | None, source: str
) -> list[str]:
    available = ", ".join(f"'{name}'" for name in columns)
    if target not in columns:
        raise ValueError(
            f"target column '{target}' not found in {source}; available columns: {available}"
        )
    if features is None:
        selected = [name for name in columns if name != target]
        if not selected:
            raise ValueError(
                f"{source} has only the target column '{target}'; add at least one input column"
            )
        return selected
    selected = [str(name) for name in features]
    if not selected:
        raise ValueError(
            "features must name at least one input column; pass None to use every column except "
            f"the target. Available columns: {available}"
        )
    unknown = [name for name in selected if name not in columns]
    if unknown:
        listed = ", ".join(f"'{name}'" for name in unknown)
        raise ValueError(
            f"feature column{'s' if len(unknown) > 1 else ''} {listed} not found in {source}; "
            f"available columns: {available}"
        )
    if target in selected:
        raise ValueError(
            f"target column '{target}' is also listed among the features; a column cannot "
            "predict itself, remove it from the features"
        )
    repeated = sorted({name for name in selected if selected.count(name) > 1})
    if repeated:
        listed = ", ".join(f"'{name}'" for name in repeated)
        raise ValueError(f"feature column {listed} is listed more than once; list each column once")
    return selected


def _to_float_columns(
    cells: pd.DataFrame, lines: np.ndarray, names: list[str], source: str
) -> np.ndarray:
    """Convert the chosen columns to float64, reporting the first bad cell in file order.

    Numbers are read as Python's ``float`` reads them (correctly rounded, so ``0.1`` in the file is
    ``float("0.1")``); pandas only finds the bad cells, one vectorised pass per column.
    """
    texts = cells.to_numpy(dtype=object)
    with contextlib.suppress(ValueError):
        values = texts.astype(np.float64)
        if np.isfinite(values).all():
            return values  # the common case: no cell-level diagnosis needed
    missing = cells.apply(lambda column: column.str.lower().isin(MISSING_VALUE_MARKERS))
    numbers = cells.mask(missing, "0").apply(pd.to_numeric, errors="coerce")
    missing = missing.to_numpy()
    suspects = missing | ~np.isfinite(numbers.to_numpy(dtype=np.float64))
    for flat in np.flatnonzero(suspects):  # row-major: file order
        row, column = divmod(int(flat), texts.shape[1])
        where = f"column '{names[column]}', data row {row + 1} (file line {lines[row]})"
        if missing[row, column]:
            raise ValueError(
                f"{source}: missing value in {where}; drop or impute incomplete rows before fitting"
            )
        text = texts[row, column]
        try:
            value = float(text)
        except ValueError:
            problem = "is not a number"
        else:
            if np.isfinite(value):
                continue  # pandas refused what float() reads, such as '1_000': a number after all
            problem = "is not finite"
        raise ValueError(
            f"{source}: {where} holds '{text}', which {problem}; "
            "every input and target value must be numeric (encode categories as numbers or "
            "leave that column out of the features)"
        )
    return texts.astype(np.float64)
