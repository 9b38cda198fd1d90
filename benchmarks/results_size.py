"""Written size and peak memory of ``pyromoe fit --method svi`` as n grows (issue 26 item 5).

Each run is ``python -m pyromoe fit data.csv --target y --method svi --steps S`` on a generated
CSV (6 inputs, 2 linear experts from :func:`pyromoe.simulate`), in a child process of its own;
its peak memory is ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` read by a small wrapper
process around it (the largest of the fit and the processes it waited for, such as the NetCDF
writer). The written size is the results folder's files. SVI takes few steps here (the size and
memory of the results do not depend on how well the guide fits); ``pyromoe fit`` takes 1000
draws from the guide.

It also measures what LOO loses to the budget on the n = 54,000 fit saved with
``--pointwise all``: ``az.loo`` on every row in float64 (the reference), on every row cast to
float32, and on the rows ``pointwise="auto"`` keeps (the same seeded rows the default run
keeps, in float32), whose elpd is a sum over m rows: per row divide by m, for every row multiply
elpd and se by n / m.

Usage: ``python benchmarks/results_size.py [--quick]`` (``--quick``: n = 5,000 only, to check the script).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, machine_section, write_results  # noqa: E402

from pyromoe import simulate  # noqa: E402
from pyromoe.bayes.pointwise import POINTWISE_CELLS, pointwise_rows  # noqa: E402

#: a wrapper process: runs its arguments, prints their peak memory (KiB) and wall time as JSON
WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps({'returncode': code, 'peak_kib': peak,"
    " 'seconds': time.perf_counter() - start}))\n"
)

NUM_INPUTS = 6


def write_csv(n: int, folder: Path) -> Path:
    data = simulate(n, NUM_INPUTS, num_experts=2, noise=0.3, seed=11, bias=True)
    columns = [f"x{j}" for j in range(NUM_INPUTS)]
    frame = pd.DataFrame(data.x.numpy(), columns=columns).assign(y=data.y.numpy())
    path = folder / f"data_{n}.csv"
    frame.to_csv(path, index=False)
    return path


def run_fit(csv: Path, out: Path, steps: int, pointwise: str) -> dict:
    command = [sys.executable, "-m", "pyromoe", "fit", str(csv), "--target", "y"]
    command += ["--method", "svi", "--steps", str(steps), "--pointwise", pointwise]
    command += ["--no-progress", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True, check=True
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if measured["returncode"] != 0:
        raise RuntimeError(f"pyromoe fit failed: {result.stderr[-2000:]}")
    files = {path.name: path.stat().st_size for path in out.iterdir() if path.is_file()}
    return {
        "csv_mb": csv.stat().st_size / 1e6,
        "steps": steps,
        "pointwise": pointwise,
        "folder_mb": sum(files.values()) / 1e6,
        "inference_data_mb": files["inference_data.nc"] / 1e6,
        "responsibilities_mb": files["responsibilities.csv"] / 1e6,
        "peak_mb": measured["peak_kib"] * 1024 / 1e6,
        "seconds": measured["seconds"],
    }


def loo_losses(folder: Path, n: int) -> dict:
    """az.loo on every row (float64 / float32) and on the auto subsample, of one saved fit."""
    idata = az.from_netcdf(folder / "inference_data.nc")
    log_likelihood = idata.log_likelihood["y"].values  # (1, draws, n) float64
    num_draws = log_likelihood.shape[0] * log_likelihood.shape[1]
    rows = pointwise_rows("auto", n, num_draws, seed=0).numpy()

    def loo(values: np.ndarray, obs: np.ndarray) -> tuple[float, float]:
        data = az.from_dict(log_likelihood={"y": values}, coords={"obs": obs}, dims={"y": ["obs"]})
        result = az.loo(data, pointwise=False, reff=1.0)  # one chain of guide draws
        return float(result["elpd_loo"]), float(result["se"])

    reference = loo(log_likelihood, np.arange(n))
    single = loo(log_likelihood.astype(np.float32), np.arange(n))
    subsample = loo(log_likelihood[..., rows].astype(np.float32), rows)
    m = rows.size
    scaled = (subsample[0] * n / m, subsample[1] * n / m)
    return {
        "n": n,
        "draws": num_draws,
        "subsample_rows": int(m),
        "float64_all_rows": {"elpd_loo": reference[0], "se": reference[1]},
        "float32_all_rows": {"elpd_loo": single[0], "se": single[1]},
        "float32_subsample": {"elpd_loo": subsample[0], "se": subsample[1]},
        "subsample_scaled_to_n": {"elpd_loo": scaled[0], "se": scaled[1]},
        "elpd_per_row": {
            "all_rows": reference[0] / n,
            "subsample": subsample[0] / m,
            "subsample_se": subsample[1] / m,
        },
    }


def markdown(runs: list[dict], loo: dict | None, info: dict) -> str:
    lines = [
        "# Results size: `pyromoe fit --method svi` as n grows",
        "",
        "Generated CSVs (6 inputs, 2 linear experts), `pyromoe fit data.csv --target y --method "
        "svi --steps S --pointwise P`, 1000 draws from the guide. Peak memory: `ru_maxrss` of "
        "the fit's process and the processes it waited for. SVI takes few steps here: the "
        "results' size and memory do not depend on the fit's quality, and the seconds are "
        "those of these short runs (the pointwise budget's totals and the guide's PSIS check "
        "each evaluate the log-likelihood of every draw on every row). Timings are from a "
        "2-core machine shared with other jobs (the load when the run started is in the machine "
        f"section below). Budget: {POINTWISE_CELLS} "
        'draws x rows (`pointwise="auto"`).',
        "",
        "| n | CSV MB | --pointwise | steps | folder MB | inference_data.nc MB | "
        "responsibilities.csv MB | peak MB | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['n']:,} | {run['csv_mb']:.1f} | {run['pointwise']} | {run['steps']} | "
            f"{run['folder_mb']:.1f} | {run['inference_data_mb']:.1f} | "
            f"{run['responsibilities_mb']:.2f} | {run['peak_mb']:.0f} | {run['seconds']:.0f} |"
        )
    if loo is not None:
        ref = loo["float64_all_rows"]
        rows = [
            ("every row, float64 (reference)", loo["float64_all_rows"]),
            ("every row, float32", loo["float32_all_rows"]),
            (f"auto subsample ({loo['subsample_rows']} rows), float32", loo["float32_subsample"]),
            ("auto subsample scaled by n / m", loo["subsample_scaled_to_n"]),
        ]
        lines += [
            "",
            f"## What LOO loses (the n = {loo['n']:,} fit, {loo['draws']} draws)",
            "",
            "| log_likelihood | elpd_loo | se | elpd_loo - reference |",
            "|---|---|---|---|",
        ]
        for name, value in rows:
            # the unscaled subsample sums over m rows: no difference to the reference to show
            difference = value["elpd_loo"] - ref["elpd_loo"]
            shown = (
                "(sum over m rows)" if value is loo["float32_subsample"] else f"{difference:+.3g}"
            )
            lines.append(f"| {name} | {value['elpd_loo']:.3f} | {value['se']:.6g} | {shown} |")
        per_row = loo["elpd_per_row"]
        single, scaled = loo["float32_all_rows"], loo["subsample_scaled_to_n"]
        lost = single["elpd_loo"] - ref["elpd_loo"]
        off = scaled["elpd_loo"] - ref["elpd_loo"]
        lines += [
            "",
            f"elpd per row: {per_row['all_rows']:.5f} on every row, {per_row['subsample']:.5f} "
            f"+- {per_row['subsample_se']:.5f} (se) on the subsample.",
            "",
            f"float32 changes elpd_loo by {lost:+.3g} nats (relative {lost / ref['elpd_loo']:.1e}) "
            f"and its se by {single['se'] - ref['se']:+.3g}. The subsample, scaled by n / m, is "
            f"{off:+.4g} nats from every row's elpd_loo, {abs(off) / scaled['se']:.2f} of its "
            f"scaled se ({scaled['se']:.4g}, which counts the subsampling error; every row's se "
            f"is {ref['se']:.4g}).",
        ]
    lines += machine_section(info)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n = 5,000 only, to check the script")
    parser.add_argument(
        "--markdown-only", action="store_true", help="rewrite the .md from the saved .json"
    )
    args = parser.parse_args()
    if args.markdown_only:
        payload = json.loads((RESULTS / "results_size.json").read_text())
        text = markdown(payload["runs"], payload["loo"], payload["machine"])
        (RESULTS / "results_size.md").write_text(text)
        return
    info = machine_info()
    settings = (
        [(5_000, 50, "auto"), (5_000, 50, "all")]
        if args.quick
        else [(54_000, 200, "auto"), (54_000, 200, "all"), (1_000_000, 5, "auto")]
    )
    runs, loo = [], None
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        for n, steps, pointwise in settings:
            start = time.perf_counter()
            csv = write_csv(n, folder)
            print(f"n = {n}: CSV written in {time.perf_counter() - start:.0f} s", flush=True)
            out = folder / f"fit_{n}_{pointwise}"
            run = {"n": n, **run_fit(csv, out, steps, pointwise)}
            print(json.dumps(run), flush=True)
            runs.append(run)
            if pointwise == "all":
                loo = loo_losses(out, n)
                print(json.dumps(loo), flush=True)
            csv.unlink()
    payload = {"runs": runs, "loo": loo, "pointwise_cells": POINTWISE_CELLS, "machine": info}
    name = "results_size_quick" if args.quick else "results_size"
    for path in write_results(name, payload, markdown(runs, loo, info)):
        print(path)


if __name__ == "__main__":
    main()
