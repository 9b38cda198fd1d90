"""pyromoe.app.table, .atomic, .results: reading a user's CSV with clear errors, atomic writing."""

from __future__ import annotations

import os

import matplotlib
import numpy as np
import pytest

from pyromoe.app.atomic import atomic_path, save_figure_atomic, write_text_atomic
from pyromoe.app.results import RESULTS_MARKER, results_directory
from pyromoe.app.table import Table, parse_table, read_table

matplotlib.use("Agg")


def write(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------------
# read_table: what it returns
# --------------------------------------------------------------------------------------------------


def test_read_table_returns_features_in_file_order_and_target(tmp_path):
    path = write(tmp_path, "a,y,b\n1,10,2.5\n3,20,-4e-1\n")
    table = read_table(path, target="y")
    assert isinstance(table, Table)
    x, y, names, target = table
    assert names == ("a", "b") and target == "y"
    assert x.dtype == np.float64 and y.dtype == np.float64
    np.testing.assert_array_equal(x, [[1.0, 2.5], [3.0, -0.4]])
    np.testing.assert_array_equal(y, [10.0, 20.0])


def test_read_table_uses_features_in_the_order_given(tmp_path):
    path = write(tmp_path, "a,b,c,y\n1,2,3,4\n5,6,7,8\n")
    x, _, names, _ = read_table(path, target="y", features=["c", "a"])
    assert names == ("c", "a")
    np.testing.assert_array_equal(x, [[3.0, 1.0], [7.0, 5.0]])


def test_read_table_ignores_unused_non_numeric_columns(tmp_path):
    path = write(tmp_path, "id,x,y\nalpha,1,2\nbeta,3,4\n")
    x, y, _, _ = read_table(path, target="y", features=["x"])
    np.testing.assert_array_equal(x.ravel(), [1.0, 3.0])


def test_read_table_accepts_bom_spaces_quotes_blank_lines_and_crlf(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b'\xef\xbb\xbf x , "y"\r\n\r\n 1.5 , "2"\r\n3,4\r\n\r\n')
    x, y, names, target = read_table(path, target="y")
    assert names == ("x",) and target == "y"
    np.testing.assert_array_equal(x.ravel(), [1.5, 3.0])
    np.testing.assert_array_equal(y, [2.0, 4.0])


@pytest.mark.parametrize("separator", [";", "\t"])
def test_read_table_detects_semicolon_and_tab_separators(tmp_path, separator):
    path = write(tmp_path, separator.join(["x", "y"]) + "\n1" + separator + "2\n")
    x, y, _, _ = read_table(path, target="y")
    assert x.tolist() == [[1.0]] and y.tolist() == [2.0]


def test_parse_table_reads_a_string():
    table = parse_table("t,y\n0,1\n1,3\n", target="y")
    np.testing.assert_array_equal(table.x, [[0.0], [1.0]])


# --------------------------------------------------------------------------------------------------
# read_table: one test per bad input, matching the message
# --------------------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data file '.*nope\.csv' not found"):
        read_table(tmp_path / "nope.csv", target="y")


def test_folder_instead_of_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a folder; pass the path of a CSV file"):
        read_table(tmp_path, target="y")


#: (behaviour, file text, read_table keywords besides target="y", what the message says)
BAD_TABLES = [
    ("empty_file", "\n  \n", {}, "data.csv is empty; expected a header line"),
    ("header_without_rows", "x,y\n", {}, r"has a header line \(x, y\) but no data rows"),
    (
        "unknown_target_lists_available_columns",
        "a,b\n1,2\n",
        {},
        r"target column 'y' not found .* columns: 'a', 'b'",
    ),
    (
        "unknown_features_are_all_named_with_available_columns",
        "a,b,y\n1,2,3\n",
        {"features": ["a", "c", "d"]},
        r"feature columns 'c', 'd' not found .* columns: 'a', 'b', 'y'",
    ),
    (
        "target_among_features",
        "a,y\n1,2\n",
        {"features": ["a", "y"]},
        "target column 'y' is also listed among the features",
    ),
    (
        "feature_listed_twice",
        "a,y\n1,2\n",
        {"features": ["a", "a"]},
        "feature column 'a' is listed more than once",
    ),
    (
        "empty_feature_list",
        "a,y\n1,2\n",
        {"features": []},
        "features must name at least one input column",
    ),
    ("only_a_target_column", "y\n1\n", {}, "has only the target column 'y'"),
    (
        # blank line 3 makes file line and data row differ: data row 3 is file line 5
        "non_numeric_value_names_column_row_and_line",
        "x,y\n1,2\n\n3,4\n5,abc\n",
        {},
        r"column 'y', data row 3 \(file line 5\) holds 'abc', which is not a number",
    ),
    (
        "infinite_value",
        "x,y\ninf,2\n",
        {},
        r"column 'x', data row 1 \(file line 2\) holds 'inf', which is not finite",
    ),
    *[
        (
            f"missing_value_{marker.strip() or 'empty'}_names_column_and_row",
            f"x,y\n1,2\n3,{marker}\n",
            {},
            r"missing value in column 'y', data row 2 \(file line 3\); drop or impute",
        )
        for marker in ["", "NA", "NaN", " null "]
    ],
    (
        "first_problem_in_file_order_is_reported",
        "x,y\n1,2\n3,oops\n,4\n",
        {},
        r"column 'y', data row 2 .* holds 'oops'",
    ),
    (
        "row_with_too_many_fields",
        "x,y\n1,2\n3,4,5\n",
        {},
        r"data row 2 \(file line 3\) has 3 fields but the header has 2",
    ),
    (
        "row_with_too_few_fields",
        "x,y\n1,2\n\n3\n",
        {},
        r"data row 2 \(file line 4\) has 1 field but the header has 2 \(x, y\)",
    ),
    (
        "duplicate_column_name",
        "x,x,y\n1,2,3\n",
        {},
        r"column name 'x' appears twice .*columns 1 and 2",
    ),
    ("unnamed_column", "x,,y\n1,2,3\n", {}, "column 2 of the header has no name"),
    (
        "too_few_rows_says_how_many_and_why",
        "x,y\n1,2\n3,4\n5,6\n",
        {"min_rows": 12, "min_rows_reason": "2 experts need 11 parameters"},
        r"has 3 data rows; at least 12 are needed \(2 experts need 11 parameters\)",
    ),
    (
        "min_rows_must_be_positive",
        "x,y\n1,2\n",
        {"min_rows": 0},
        "min_rows must be a positive integer; got 0",
    ),
    (
        "delimiter_must_be_one_character",
        "x,y\n1,2\n",
        {"delimiter": ",,"},
        "delimiter must be a single character",
    ),
    (
        "unclosed_quote_is_named_with_its_line",
        'x,y\n1,2\n3,"4\n5,6\n',
        {},
        r"malformed CSV at file line 4: .*closed by '\"'",
    ),
]


@pytest.mark.parametrize(
    "text, keywords, message",
    [pytest.param(*case[1:], id=case[0]) for case in BAD_TABLES],
)
def test_bad_table_is_refused_with_a_message_naming_the_problem(tmp_path, text, keywords, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=message):
        read_table(path, target="y", **keywords)


def test_non_utf8_file_is_refused(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("x,y\n1,2\ncaf\xe9,3\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_table(path, target="y")


def test_features_given_as_one_string_is_refused(tmp_path):
    path = write(tmp_path, "a,y\n1,2\n")
    with pytest.raises(
        TypeError, match=r"features must be a sequence of column names, e.g. \['a'\]"
    ):
        read_table(path, target="y", features="a")


def test_exactly_min_rows_is_accepted(tmp_path):
    path = write(tmp_path, "x,y\n1,2\n3,4\n")
    assert read_table(path, target="y", min_rows=2).x.shape == (2, 1)


def test_large_table_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(20_000, 4))
    path = tmp_path / "big.csv"
    np.savetxt(path, values, delimiter=",", header="a,b,c,y", comments="", fmt="%.17g")
    x, y, _, _ = read_table(path, target="y")
    np.testing.assert_array_equal(x, values[:, :3])
    np.testing.assert_array_equal(y, values[:, 3])


def test_cells_are_read_exactly_as_python_float_reads_them(tmp_path):
    texts = [
        "0.1",
        "0.30000000000000004",
        "1.700000000000000177635684",  # a parser that is not correctly rounded gives 1.7
        "2.2250738585072011e-308",
        "4.9e-324",
        "1.7976931348623157e308",
        "9007199254740993",
        "123456789012345678901234567890",
        "-0",
        "1E22",
    ]
    lines = [f'{text},"{text}", {text} ' for text in texts]
    path = write(tmp_path, "a,b,y\n" + "\n".join(lines) + "\n")
    x, y, _, _ = read_table(path, target="y")
    expected = np.array([float(text) for text in texts])
    assert x[:, 0].tobytes() == expected.tobytes() and x[:, 1].tobytes() == expected.tobytes()
    assert y.tobytes() == expected.tobytes()
    assert x[0, 0] == float("0.1") and np.signbit(y[8])


def test_large_file_with_quotes_line_breaks_and_blank_lines_is_read_exactly(tmp_path):
    n = 40_000  # about 2.4 MB: many of the parser's 256 KiB buffers, so records straddle them
    values = np.random.default_rng(1).normal(size=(n, 3))
    records = [f"{i},{a!r},{b!r},{c!r}" for i, (a, b, c) in enumerate(values.tolist())]
    for i in range(0, n, 1000):  # a text column, quoted, with a delimiter and a line break
        records[i] = f'"row {i},\nsee notes"' + records[i][len(str(i)) :]
    for i in range(n - 5000, 0, -5000):
        records.insert(i, "")
    text = "id,a,b,y\n" + "\n".join(records) + "\n"
    path = write(tmp_path, text)
    x, y, names, _ = read_table(path, target="y", features=["a", "b"])
    assert names == ("a", "b")
    np.testing.assert_array_equal(x, values[:, :2])
    np.testing.assert_array_equal(y, values[:, 2])

    last_line = text.count("\n")  # the last data row ends on the file's last line
    broken = write(tmp_path, text[: text.rindex(",") + 1] + "oops\n", name="broken.csv")
    with pytest.raises(
        ValueError, match=rf"data row {n} \(file line {last_line}\) holds 'oops', which is not"
    ):
        read_table(broken, target="y", features=["a", "b"])


def test_file_line_counts_line_breaks_inside_quoted_values(tmp_path):
    path = write(tmp_path, 'id,x,y\n"a\nb",1,2\n"c",3,oops\n"d\ne",4,5\n')
    with pytest.raises(ValueError, match=r"column 'y', data row 2 \(file line 4\) holds 'oops'"):
        read_table(path, target="y", features=["x"])
    path = write(tmp_path, 'id,x,y\n"a\nb",1,2\n"c\nd",3,4,5\n', name="wide.csv")
    with pytest.raises(ValueError, match=r"data row 2 \(file line 5\) has 4 fields"):
        read_table(path, target="y", features=["x"])


def test_lines_of_only_delimiters_or_spaces_are_blank(tmp_path):
    path = write(tmp_path, ",,\nx,y\n , \n1,2\n,,,,\n\t\n3,4\n")
    x, y, _, _ = read_table(path, target="y")
    assert x.ravel().tolist() == [1.0, 3.0] and y.tolist() == [2.0, 4.0]
    path = write(tmp_path, ",,\n,\n", name="blank.csv")
    with pytest.raises(ValueError, match="blank.csv is empty"):
        read_table(path, target="y")


def test_old_mac_line_endings_count_as_lines(tmp_path):
    path = tmp_path / "mac.csv"
    path.write_bytes(b"x,y\r1,2\r\r3,abc\r")
    with pytest.raises(ValueError, match=r"data row 2 \(file line 4\) holds 'abc'"):
        read_table(path, target="y")


def test_names_pandas_would_mangle_are_kept(tmp_path):
    path = write(tmp_path, "a,a.1,y\n1,2,3\n")
    assert read_table(path, target="y").feature_names == ("a", "a.1")


def test_first_cell_python_float_refuses_is_reported(tmp_path):
    # '1_000' is a number to float() (and was before pandas read the file), not to pandas
    path = write(tmp_path, "x,y\n1_000,2\n3,abc\n")
    with pytest.raises(ValueError, match=r"data row 2 \(file line 3\) holds 'abc'"):
        read_table(path, target="y")


# --------------------------------------------------------------------------------------------------
# Atomic writing
# --------------------------------------------------------------------------------------------------


def test_results_directory_success_produces_the_files_and_no_leftovers(tmp_path):
    out = tmp_path / "results"
    with results_directory(out) as folder:
        assert folder.parent == tmp_path and folder != out
        assert not out.exists()  # nothing visible at the final path during the run
        (folder / "summary.md").write_text("# ok")
    assert listing(out) == [RESULTS_MARKER, "summary.md"]
    assert listing(tmp_path) == ["results"]


def test_results_directory_failure_leaves_nothing_behind(tmp_path):
    out = tmp_path / "deeper" / "results"
    with pytest.raises(RuntimeError, match="boom"):
        with results_directory(out) as folder:
            (folder / "half.nc").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert listing(tmp_path) == []  # not even the parent folder it created


def test_results_directory_interrupt_leaves_nothing_behind(tmp_path):
    out = tmp_path / "results"
    with pytest.raises(KeyboardInterrupt):
        with results_directory(out) as folder:
            (folder / "trace.png").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert listing(tmp_path) == []


def test_results_directory_failure_keeps_previous_results_intact(tmp_path):
    out = tmp_path / "results"
    with results_directory(out) as folder:
        (folder / "summary.md").write_text("first run")
    with pytest.raises(RuntimeError):
        with results_directory(out, overwrite=True) as folder:
            (folder / "summary.md").write_text("second run, half written")
            raise RuntimeError("second run failed")
    assert (out / "summary.md").read_text() == "first run"
    assert listing(tmp_path) == ["results"]


def test_results_directory_replaces_its_own_previous_results_at_the_end(tmp_path):
    out = tmp_path / "results"
    with results_directory(out) as folder:
        (folder / "old.md").write_text("first run")
    with pytest.raises(FileExistsError, match="earlier pyromoe run; pass overwrite=True"):
        with results_directory(out):
            raise AssertionError("must not run")
    with results_directory(out, overwrite=True) as folder:
        assert (out / "old.md").exists()  # old results stay until the new run succeeds
        (folder / "new.md").write_text("second run")
    assert listing(out) == [RESULTS_MARKER, "new.md"]
    assert listing(tmp_path) == ["results"]


def test_results_directory_refuses_a_user_folder_before_any_work(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    ran = False
    for overwrite in (False, True):  # not even with overwrite=True
        with pytest.raises(FileExistsError, match="holds files pyromoe did not write"):
            with results_directory(out, overwrite=overwrite):
                ran = True
    assert not ran
    assert listing(out) == ["thesis.tex"] and listing(tmp_path) == ["mine"]


def test_results_directory_overwrite_never_deletes_a_file_added_to_old_results(tmp_path):
    out = tmp_path / "results"
    with results_directory(out) as folder:
        (folder / "summary.md").write_text("first run")
    (out / "my_notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"files pyromoe did not\s+write \('my_notes.txt'\)"):
        with results_directory(out, overwrite=True):
            raise AssertionError("must not run")
    assert listing(out) == [RESULTS_MARKER, "my_notes.txt", "summary.md"]


def test_results_directory_uses_an_existing_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    with results_directory(out) as folder:
        (folder / "a.txt").write_text("a")
    assert listing(out) == [RESULTS_MARKER, "a.txt"]


def test_results_directory_refuses_a_file_path(tmp_path):
    out = write(tmp_path, "not a folder", name="results")
    with pytest.raises(FileExistsError, match="a file of that name exists"):
        with results_directory(out):
            pass
    assert out.read_text() == "not a folder"


def test_results_directory_gives_umask_permissions(tmp_path):
    out = tmp_path / "results"
    with results_directory(out):
        pass
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o777 & ~umask)


def test_write_text_atomic_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "summary.md"
    assert write_text_atomic(path, "one\n") == path
    write_text_atomic(path, "two\n")
    assert path.read_text() == "two\n"
    assert listing(path.parent) == ["summary.md"]


def test_write_text_atomic_refuses_bytes(tmp_path):
    with pytest.raises(TypeError, match="text must be a str; got bytes"):
        write_text_atomic(tmp_path / "a.txt", b"abc")
    assert listing(tmp_path) == []


def test_atomic_path_failure_keeps_the_old_file(tmp_path):
    path = write(tmp_path, "old", name="table.csv")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as temporary:
            assert temporary.suffix == ".csv" and temporary.parent == tmp_path
            temporary.write_text("new, half written")
            raise RuntimeError("failed")
    assert path.read_text() == "old"
    assert listing(tmp_path) == ["table.csv"]


def test_atomic_path_requires_the_block_to_write(tmp_path):
    with pytest.raises(RuntimeError, match="nothing was written to the temporary file"):
        with atomic_path(tmp_path / "x.txt"):
            pass
    assert listing(tmp_path) == []


def test_atomic_path_refuses_an_existing_folder(tmp_path):
    with pytest.raises(ValueError, match="a folder of that name exists"):
        with atomic_path(tmp_path):
            pass


def test_save_figure_atomic_writes_a_png(tmp_path):
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(2, 2))
    axes.plot([0, 1], [1, 0])
    try:
        path = save_figure_atomic(figure, tmp_path / "line.png", dpi=50)
    finally:
        plt.close(figure)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert listing(tmp_path) == ["line.png"]


def test_save_figure_atomic_failure_leaves_no_file(tmp_path):
    class FailingFigure:
        def savefig(self, fname, **kwargs):
            with open(fname, "wb") as stream:
                stream.write(b"\x89PNG half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_figure_atomic(FailingFigure(), tmp_path / "trace.png")
    assert listing(tmp_path) == []


def test_save_figure_atomic_refuses_a_non_figure(tmp_path):
    with pytest.raises(TypeError, match="figure must be a matplotlib Figure"):
        save_figure_atomic("not a figure", tmp_path / "a.png")


def test_save_figure_atomic_needs_a_format(tmp_path):
    class Figure:
        def savefig(self, fname, **kwargs):
            raise AssertionError("must not be called")

    with pytest.raises(ValueError, match="cannot tell the image format"):
        save_figure_atomic(Figure(), tmp_path / "trace")
