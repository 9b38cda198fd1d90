"""The fault suite: pyromoe never deletes what it did not write, and leaves nothing half-written.

Each test asserts the message the user sees and that the user's own files are intact. The signal and
write-failure cases run the real `pyromoe` command in a subprocess: SIGINT, SIGTERM and SIGHUP mid-run
remove the staging folder; SIGKILL (which no process can catch) may leave only the documented hidden
``.<name>.partial-<random>`` folder; a file-size limit (RLIMIT_FSIZE, the same error as a full disk)
gives one line and exit code 1, never a traceback or a segfault.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyromoe import datasets
from pyromoe.app.cli import main
from pyromoe.app.results import RESULTS_MARKER, results_directory

FAST_SVI = ["--method", "svi", "--steps", "20", "--no-progress"]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder holding the user's data file and one of their own files."""
    shutil.copy(datasets.dataset_path("old_faithful"), tmp_path / "faithful.csv")
    (tmp_path / "notes.txt").write_text("the user's own notes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _intact(folder: Path) -> None:
    assert (folder / "notes.txt").read_text() == "the user's own notes"
    assert (folder / "faithful.csv").read_bytes() == datasets.dataset_path(
        "old_faithful"
    ).read_bytes()


def _fit(*args: str) -> int:
    return main(["fit", "faithful.csv", "--target", "waiting", *args])


# ------------------------------------------------------------------ never delete the user's files
def test_out_folder_with_the_users_files_is_refused(workdir, capsys):
    mine = workdir / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    for extra in ([], ["--overwrite"]):
        assert _fit("--out", "mine", *extra, *FAST_SVI) == 2
        error = capsys.readouterr().err
        assert "pyromoe fit: error: results folder 'mine' already exists and holds files " in error
        assert "pyromoe never deletes those" in error
    assert listing(mine) == ["thesis.tex"] and (mine / "thesis.tex").read_text() == "precious"
    _intact(workdir)


@pytest.mark.parametrize("out", [".", "./", "..", "{cwd}"])
def test_out_at_the_working_folder_or_above_is_refused(workdir, capsys, out):
    out = out.format(cwd=workdir)
    assert _fit("--out", out, "--overwrite", *FAST_SVI) == 2
    assert "is the current working folder or contains it" in capsys.readouterr().err
    assert listing(workdir) == ["faithful.csv", "notes.txt"]
    _intact(workdir)


def test_out_at_the_folder_of_the_input_or_above_is_refused(tmp_path, capsys):
    data = tmp_path / "project" / "data"
    data.mkdir(parents=True)
    shutil.copy(datasets.dataset_path("old_faithful"), data / "faithful.csv")
    for out in (data, data.parent):
        (out / RESULTS_MARKER).write_text("")  # even a folder that looks like old results
        args = ["fit", str(data / "faithful.csv"), "--target", "waiting", "--out", str(out)]
        assert main([*args, "--overwrite", *FAST_SVI]) == 2
        assert "holds the input file" in capsys.readouterr().err
    assert (data / "faithful.csv").exists()


def test_earlier_results_are_replaced_only_with_overwrite(workdir, capsys):
    assert _fit("--out", "results", *FAST_SVI) == 0
    first = (workdir / "results" / "summary.md").read_text()
    assert _fit("--out", "results", *FAST_SVI) == 2
    assert "pass overwrite=True (--overwrite on the command line)" in capsys.readouterr().err
    assert (workdir / "results" / "summary.md").read_text() == first
    (workdir / "results" / "mine.txt").write_text("added by the user")
    assert _fit("--out", "results", "--overwrite", *FAST_SVI) == 2
    assert "also files pyromoe did not write ('mine.txt')" in capsys.readouterr().err
    (workdir / "results" / "mine.txt").unlink()
    assert _fit("--out", "results", "--overwrite", "--seed", "1", *FAST_SVI) == 0
    assert "inference_data.nc" in listing(workdir / "results")
    assert listing(workdir) == ["faithful.csv", "notes.txt", "results"]
    _intact(workdir)


def test_out_below_a_file_is_one_clear_line(workdir, capsys):
    assert _fit("--out", "notes.txt/results", *FAST_SVI) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is a file, not a folder" in error
    _intact(workdir)


def test_out_in_a_folder_that_cannot_be_written_is_one_line_and_exit_1(
    workdir, capsys, monkeypatch
):
    # As root (CI) chmod cannot make a folder read-only, so the refusal is simulated at mkdir.
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name.startswith(".results.partial-"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert _fit("--out", "results", *FAST_SVI) == 1
    error = capsys.readouterr().err
    assert error.startswith("pyromoe fit: failed: [Errno 13] Permission denied")
    assert error.count("\n") == 1
    assert listing(workdir) == ["faithful.csv", "notes.txt"]


# ------------------------------------------------------------------ one line for every user error
@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "-1"], "argument --seed: must be between 0 and 2**63 - 1, got -1"),
        (["--seed", str(2**70)], "argument --seed: must be between 0 and 2**63 - 1"),
        (["--chains", "0"], "argument --chains: must be >= 1, got 0"),
        (["--samples", "ten"], "argument --samples: expected a whole number, got 'ten'"),
        (["--experts", "0"], "argument --experts: every number of experts must be >= 1"),
    ],
)
def test_bad_option_values_are_usage_errors(workdir, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        _fit("--out", "results", *args)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert listing(workdir) == ["faithful.csv", "notes.txt"]


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu0", "device 'gpu0'"),
        pytest.param(
            "cuda",
            "CUDA is not available",
            marks=pytest.mark.skipif(
                __import__("torch").cuda.is_available(), reason="this machine has CUDA"
            ),
        ),
    ],
)
def test_bad_device_is_one_line_before_any_work(workdir, capsys, device, message):
    assert _fit("--out", "results", "--device", device, *FAST_SVI) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error and "Traceback" not in error
    assert listing(workdir) == ["faithful.csv", "notes.txt"]


def test_constant_target_says_so(workdir, capsys):
    (workdir / "flat.csv").write_text("x,y\n" + "".join(f"{i},3\n" for i in range(60)))
    assert main(["fit", "flat.csv", "--target", "y", "--out", "results", *FAST_SVI]) == 2
    error = capsys.readouterr().err
    assert "the target column 'y' is constant (every value is 3)" in error
    assert "--features" not in error


def test_version(capsys):
    from pyromoe import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"pyromoe {__version__}"


def test_failure_inside_the_fit_is_one_line_and_exit_1(workdir, capsys, monkeypatch):
    import pyromoe.bayes.svi

    def broken(*args, **kwargs):
        raise RuntimeError("sampler crashed")

    monkeypatch.setattr(pyromoe.bayes.svi, "fit_svi", broken)
    assert _fit("--out", "results", *FAST_SVI) == 1
    error = capsys.readouterr().err
    assert error == (
        "pyromoe fit: failed: RuntimeError: sampler crashed (PYROMOE_DEBUG=1 shows the traceback)\n"
    )
    assert listing(workdir) == ["faithful.csv", "notes.txt"]


def test_library_rule_is_the_same(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "data.csv").write_text("a,y\n1,2\n")
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(ValueError, match="current working folder"):
        with results_directory(".", overwrite=True):
            raise AssertionError("must not run")
    source = tmp_path / "data" / "data.csv"
    for out in (tmp_path / "data", "../data"):
        with pytest.raises(ValueError, match="holds the input file"):
            with results_directory(out, overwrite=True, inputs=[source]):
                raise AssertionError("must not run")
    assert listing(tmp_path / "data") == ["data.csv"] and listing(tmp_path / "work") == []


# ------------------------------------------------------------------ the marker records contents
def _earlier_results(folder: Path) -> Path:
    """A real earlier pyromoe result at ``folder``: summary.md and a subfolder with a table."""
    with results_directory(folder) as staging:
        (staging / "summary.md").write_text("# pyromoe's summary\n")
        (staging / "tables").mkdir()
        (staging / "tables" / "draws.csv").write_text("a,b\n1,2\n")
    return folder


def _snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry below ``folder``: file bytes, link targets, 'dir' for folders."""
    found: dict[str, bytes | str] = {}
    for entry in sorted(folder.rglob("*")):
        name = entry.relative_to(folder).as_posix()
        if entry.is_symlink():
            found[name] = "link:" + os.readlink(entry)
        elif entry.is_dir():
            found[name] = "dir"
        else:
            found[name] = entry.read_bytes()
    return found


def _refused(out: Path, error: type[Exception], match: str) -> None:
    ran = False
    with pytest.raises(error, match=match):
        with results_directory(out, overwrite=True):
            ran = True
    assert not ran  # refused before any work


def test_marker_records_size_and_sha256_of_every_file(tmp_path):
    import hashlib
    import json

    out = _earlier_results(tmp_path / "results")
    record = json.loads((out / RESULTS_MARKER).read_text())
    assert record["format"] == 2 and record["folders"] == ["tables"]
    body = b"# pyromoe's summary\n"
    assert record["files"]["summary.md"] == {
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    assert set(record["files"]) == {"summary.md", "tables/draws.csv"}


def test_overwrite_replaces_unchanged_results_and_leaves_no_hidden_folder(tmp_path):
    out = _earlier_results(tmp_path / "results")
    with results_directory(out, overwrite=True) as staging:
        (staging / "summary.md").write_text("second run")
    assert listing(out) == [RESULTS_MARKER, "summary.md"]
    assert (out / "summary.md").read_text() == "second run"
    assert listing(tmp_path) == ["results"]  # no .old, no .partial, no lock file


@pytest.mark.parametrize("edit", ["list of names", "format 2, bogus hash", "format 2, no hash"])
def test_a_marker_edited_to_list_a_users_file_never_deletes_it(tmp_path, edit):
    import json

    out = _earlier_results(tmp_path / "results")
    (out / "notes.txt").write_text("the user's own notes")
    record = json.loads((out / RESULTS_MARKER).read_text())
    if edit == "list of names":
        record = {"pyromoe": "0.1.0", "files": [*record["files"], "notes.txt"]}
        match = "its marker lists no file contents .* remove it yourself"
    elif edit == "format 2, bogus hash":
        record["files"]["notes.txt"] = {"size": 20, "sha256": "0" * 64}
        match = r"files changed since pyromoe wrote them \('notes.txt'\)"
    else:
        record["files"]["notes.txt"] = {"size": 20}
        match = "its marker records no size and SHA-256 for 'notes.txt'"
    (out / RESULTS_MARKER).write_text(json.dumps(record))
    before = _snapshot(out)
    _refused(out, FileExistsError, match)
    assert _snapshot(out) == before and listing(tmp_path) == ["results"]


def test_an_empty_old_marker_is_never_trusted_for_deletion(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / RESULTS_MARKER).write_text("")  # what pyromoe 0.1 wrote
    (out / "summary.md").write_text("the user's own summary")
    before = _snapshot(out)
    _refused(out, FileExistsError, r"empty or unreadable .* rm -r")
    assert _snapshot(out) == before and listing(tmp_path) == ["results"]


@pytest.mark.parametrize("name", ["summary.md", "tables/draws.csv"])
def test_overwrite_refuses_results_whose_files_the_user_edited(tmp_path, name):
    out = _earlier_results(tmp_path / "results")
    (out / name).write_text("edited by the user")
    before = _snapshot(out)
    _refused(out, FileExistsError, rf"files changed since pyromoe wrote them \('{name}'\)")
    assert _snapshot(out) == before


def test_overwrite_refuses_a_file_swapped_for_a_link_or_a_link_added(tmp_path):
    out = _earlier_results(tmp_path / "results")
    (tmp_path / "mine.txt").write_text("mine")
    (out / "extra").symlink_to(tmp_path / "mine.txt")
    before = _snapshot(out)
    _refused(out, FileExistsError, r"files pyromoe did not write \('extra'\)")
    (out / "extra").unlink()
    (out / "summary.md").unlink()
    (out / "summary.md").symlink_to(tmp_path / "mine.txt")
    before = _snapshot(out)
    _refused(out, FileExistsError, r"changed since pyromoe wrote them \('summary.md'\)")
    assert _snapshot(out) == before and (tmp_path / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize("target", ["earlier results", "empty folder", "dangling"])
def test_out_that_is_a_symlink_is_refused_before_any_work(tmp_path, target):
    real = tmp_path / "real"
    if target == "earlier results":
        _earlier_results(real)
    elif target == "empty folder":
        real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    before = _snapshot(tmp_path)
    _refused(link, ValueError, "is a symbolic link .* never writes through nor replaces a link")
    assert _snapshot(tmp_path) == before  # still a link; no hidden .link.old-*


def test_cli_symlink_out_is_refused_before_the_fit(workdir, capsys):
    (workdir / "link").symlink_to(workdir / "nowhere")
    assert _fit("--out", "link", "--overwrite", *FAST_SVI) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "results folder 'link' is a symbolic link" in error
    assert (
        listing(workdir) == ["faithful.csv", "link", "notes.txt"]
        and (workdir / "link").is_symlink()
    )


def test_a_second_run_on_the_same_out_fails_at_once(tmp_path):
    out = tmp_path / "results"
    with results_directory(out) as staging:
        for overwrite in (False, True):
            with pytest.raises(FileExistsError, match="is being written by another pyromoe run"):
                with results_directory(out, overwrite=overwrite):
                    raise AssertionError("must not run")
        (staging / "summary.md").write_text("the first run")
    assert (out / "summary.md").read_text() == "the first run"
    assert listing(tmp_path) == ["results"]  # the lock file is gone


def test_a_foreign_file_at_the_lock_path_is_never_changed(tmp_path):
    out = tmp_path / "results"
    (tmp_path / ".results.pyromoe-lock").write_text("mine")
    with pytest.raises(FileExistsError, match="pyromoe did not write it"):
        with results_directory(out):
            raise AssertionError("must not run")
    assert (tmp_path / ".results.pyromoe-lock").read_text() == "mine"
    assert listing(tmp_path) == [".results.pyromoe-lock"]


def test_two_cli_fits_on_one_out_the_second_fails_at_once(workdir):
    process = _start_long_fit(workdir)
    try:
        for extra in (["--overwrite"],):  # without it: the library test above
            started = time.monotonic()
            result = subprocess.run(
                _command(
                    "fit",
                    "faithful.csv",
                    "--target",
                    "waiting",
                    "--out",
                    "results",
                    *extra,
                    *FAST_SVI,
                ),
                cwd=workdir,
                env=_env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 2, result.stderr
            assert "is being written by another pyromoe run (process" in result.stderr
            assert "Traceback" not in result.stderr
            assert time.monotonic() - started < 60  # refused up front, not after a fit
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert listing(workdir) == ["faithful.csv", "notes.txt"]
    _intact(workdir)


# ------------------------------------------------------------------ faults in a real process
def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyromoe.app.cli", *args]


def _env() -> dict[str, str]:
    return dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _staging(folder: Path) -> list[Path]:
    return sorted(folder.glob(".results.partial-*"))


def _start_long_fit(folder: Path) -> subprocess.Popen:
    """A fit that takes minutes, started in ``folder``; returns once it is writing (staging)."""
    args = ["fit", "faithful.csv", "--target", "waiting", "--out", "results", "--no-progress"]
    long_nuts = ["--chains", "1", "--warmup", "5000", "--samples", "5000"]
    process = subprocess.Popen(
        _command(*args, *long_nuts),
        cwd=folder,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not _staging(folder):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the fit never started writing"
        time.sleep(0.1)
    time.sleep(1.0)  # well inside the fit
    return process


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name
)
def test_signal_mid_run_leaves_no_staging_folder(workdir, signum):
    process = _start_long_fit(workdir)
    process.send_signal(signum)
    _, error = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, error
    name = signal.Signals(signum).name
    assert error.strip().endswith(
        f"pyromoe fit: interrupted by {name}; partial results were removed"
    ), error
    assert "Traceback" not in error
    assert listing(workdir) == ["faithful.csv", "notes.txt"]  # no staging, no results
    _intact(workdir)


def test_sigkill_mid_run_leaves_only_the_documented_staging_folder(workdir):
    process = _start_long_fit(workdir)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    staging = _staging(workdir)
    assert len(staging) == 1 and not (workdir / "results").exists()
    lock = ".results.pyromoe-lock"  # the kernel released the lock itself; the file stays
    assert set(listing(workdir)) == {"faithful.csv", "notes.txt", staging[0].name, lock}
    _intact(workdir)
    assert _fit("--out", "results", *FAST_SVI) == 0  # the stale lock file is reused, then removed
    assert set(listing(workdir)) == {"faithful.csv", "notes.txt", staging[0].name, "results"}


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))


def test_failed_write_is_one_line_exit_1_and_leaves_nothing(workdir):
    args = ["fit", "faithful.csv", "--target", "waiting", "--out", "results", *FAST_SVI]
    result = subprocess.run(
        _command(*args),
        cwd=workdir,
        env=_env(),
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr  # not -11 (a segfault)
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"pyromoe fit: failed: [Errno 27] could not write '{lines[0].split(chr(39))[1]}': "
        "File too large"
    ], result.stderr
    assert "inference_data.nc" in lines[0]
    assert listing(workdir) == ["faithful.csv", "notes.txt"]
    _intact(workdir)


# ------------------------------------------------------------------ issue 21: seeds, out-of-core NaN messages, devices, sizes
#: The largest documented seed: ``seed + 1`` would leave [0, 2**63).
LARGEST_SEED = 2**63 - 1


@pytest.fixture(scope="module")
def mixture():
    """Three inputs, two experts: the moment start applies (so do its guard's random starts)."""
    from pyromoe import simulate

    return simulate(1000, 3, num_experts=2, seed=1)


def test_child_seed_is_a_spawned_seed_in_range_without_arithmetic():
    import numpy as np

    from pyromoe._validation import SEED_BOUND, child_seed

    seeds = [child_seed(LARGEST_SEED, i) for i in range(3)]
    spawned = np.random.SeedSequence(LARGEST_SEED).spawn(3)
    assert seeds == [int(c.generate_state(1, dtype=np.uint64)[0] >> 1) for c in spawned]
    assert all(0 <= s < SEED_BOUND for s in seeds) and len(set(seeds)) == 3
    assert child_seed(0, 2, 5) == child_seed(0, 2, 5) != child_seed(0, 2, 6)


def test_largest_seed_works_in_initialize_and_tensor_init(mixture):
    import torch

    import pyromoe

    x, y = mixture.x, mixture.y
    first = pyromoe.initialize(x, y, 2, seed=LARGEST_SEED)
    assert first.diagnostics["initializer"] == "tensor"  # the guard's random starts ran too
    assert first.diagnostics["seed"] == LARGEST_SEED
    refined = pyromoe.tensor_init(x, y, 2, refine=True, random_starts=1, seed=LARGEST_SEED)
    assert bool(torch.isfinite(refined.experts_weight).all())


@pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto")  # 10 SVI draws
def test_largest_seed_works_in_compare_experts_and_compare_starts(mixture):
    from pyromoe.app.demo import compare_starts
    from pyromoe.bayes.compare import compare_experts

    x, y = mixture.x, mixture.y
    table, fits = compare_experts(x, y, (1, 2), seed=LARGEST_SEED, num_steps=5, num_samples=10)
    assert sorted(fits) == ["k=1", "k=2"] and fits["k=2"].attrs["seed"] == LARGEST_SEED
    records, tensor = compare_starts(
        x, y, 2, "linear", num_random=1, seed=LARGEST_SEED, progress=False, screen=1
    )
    assert len(records) == 1 and tensor.estimate is not None


def test_cli_takes_the_largest_seed_through_the_start_to_the_fit(workdir, mixture, monkeypatch):
    """The seed reaches the fit through the guarded moment start (which failed on ``seed + 1``);
    the fit itself is stopped there, to keep the test fast."""
    import numpy as np

    import pyromoe.bayes.svi

    seen = {}

    def stop_at_the_fit(model, x, y, *, init, seed, **kwargs):
        seen.update(seed=seed, initializer=init.diagnostics["initializer"])
        raise RuntimeError("stopped at the fit")

    monkeypatch.setattr(pyromoe.bayes.svi, "fit_svi", stop_at_the_fit)
    table = np.column_stack([mixture.x.numpy(), mixture.y.numpy()])
    rows = "".join(",".join(map(str, row)) + "\n" for row in table)
    (workdir / "mix.csv").write_text("a,b,c,y\n" + rows)
    args = ["fit", "mix.csv", "--target", "y", "--seed", str(LARGEST_SEED), "--out", "results"]
    assert main([*args, *FAST_SVI]) == 1  # the stub's failure, after the start
    assert seen == {"seed": LARGEST_SEED, "initializer": "tensor"}
    assert not (workdir / "results").exists()
    _intact(workdir)


def test_nan_in_a_memmap_or_dask_array_names_the_argument_row_and_column(tmp_path, mixture):
    import dask.array as da
    import numpy as np

    import pyromoe

    x, y = mixture.x.numpy().copy(), mixture.y.numpy().copy()
    x[290, 2] = np.inf
    np.save(tmp_path / "x.npy", x)
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    in_x = r"x contains NaN or infinite values \(first at row 290, column 2\); drop or impute"
    with pytest.raises(ValueError, match=in_x):
        pyromoe.fit_em(xm, y, 2)
    with pytest.raises(ValueError, match=in_x):
        pyromoe.initialize(da.from_array(x, chunks=(500, 3)), y, 2)
    x[290, 2] = 0.5
    y[410] = np.nan
    in_y = r"y contains NaN or infinite values \(first at row 410\); drop or impute"
    with pytest.raises(ValueError, match=in_y):
        pyromoe.tensor_init(da.from_array(x, chunks=(500, 3)), da.from_array(y, chunks=500), 2)
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(ValueError, match=in_y):
        pyromoe.fit_em(np.load(tmp_path / "x.npy", mmap_mode="r"), y, 2)


@pytest.mark.parametrize("device", ["xla", "meta"])
def test_unsupported_devices_are_refused_up_front(mixture, device):
    import torch

    import pyromoe
    from pyromoe import MixtureOfExperts, fit_svi

    message = (
        rf"device='{device}' is not supported: pyromoe computes on 'cpu', 'cuda' or 'cuda:N' .*"
        r"available on this machine: 'cpu'"
    )
    x, y = mixture.x, mixture.y
    calls = [
        lambda: pyromoe.fit_em(x, y, 2, device=device),
        lambda: pyromoe.initialize(x, y, 2, device=device),
        lambda: pyromoe.tensor_init(x, y, 2, device=device),
        lambda: pyromoe.simulate(50, 2, device=device),
        lambda: mixture.truth.to(device=device),
        lambda: fit_svi(MixtureOfExperts(3, 2), x, y, num_steps=1, device=torch.device(device)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()


def test_data_on_an_unsupported_device_is_refused(mixture):
    import pyromoe

    message = r"x is on device 'meta', which pyromoe does not support: .* e\.g\. x\.to\('cpu'\)"
    with pytest.raises(ValueError, match=message):
        pyromoe.initialize(mixture.x.to("meta"), mixture.y, 2)


def test_cli_unsupported_device_is_one_line_before_any_work(workdir, capsys):
    assert _fit("--out", "results", "--device", "meta", *FAST_SVI) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "device='meta' is not supported" in error
    assert listing(workdir) == ["faithful.csv", "notes.txt"]


def test_prior_predictive_beyond_memory_is_refused_before_drawing(monkeypatch):
    import sys

    import torch

    from pyromoe import MixtureOfExperts, sample_prior_predictive

    model, x = MixtureOfExperts(3, 2), torch.randn(1000, 3)
    message = (
        r"num_samples=1000000000 needs about [\d.]+ TiB for the prior draws \(2013 values each: "
        r"the parameters and y for 1000 rows\), more than .*; pass fewer num_samples or fewer "
        r"rows of x \(num_samples <= \d+ fits\)"
    )
    with pytest.raises(ValueError, match=message):
        sample_prior_predictive(model, x, num_samples=10**9)
    monkeypatch.setitem(sys.modules, "psutil", None)  # without psutil: a share of physical memory
    with pytest.raises(ValueError, match=r"more than [\d.]+ \w+ \(25% of this host's physical"):
        sample_prior_predictive(model, x, num_samples=10**9)
    assert sample_prior_predictive(model, x, num_samples=3).prior_predictive["y"].shape == (
        1,
        3,
        1000,
    )
