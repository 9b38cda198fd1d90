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
from pyromoe.app.io import RESULTS_MARKER, results_directory

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
    import pyromoe.bayes.fit

    def broken(*args, **kwargs):
        raise RuntimeError("sampler crashed")

    monkeypatch.setattr(pyromoe.bayes.fit, "fit_svi", broken)
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
    assert set(listing(workdir)) == {"faithful.csv", "notes.txt", staging[0].name}
    _intact(workdir)


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
