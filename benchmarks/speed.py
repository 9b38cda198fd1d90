"""Speed benchmark of the tensor start (n = 1e6, d = 50, k = 2, linear, float64, on the CPU).

Reports, on the same data in the same run:

- the moment step (two streaming passes + small eigen/tensor work) divided by one ``x.T @ x``
  (target <= 3), for two chunk sizes;
- gate EM (experts fixed) and the refinement (joint EM from the tensor start): iterations and
  seconds (each EM iteration reads the data about twice: an E-step and an M-step);
- ``tensor_init(refine=True, random_starts=0)`` against ONE random-start EM and best-of-5;
- peak extra memory of the moment step as n grows (each n in a fresh subprocess; RSS high-water
  mark after the moment step minus the RSS with the data already in memory).

Run: ``python benchmarks/speed.py`` (several minutes on 2 cores) or ``--quick`` (n = 2e5).
Writes benchmarks/results/speed.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import torch  # noqa: E402

from benchmarks._common import add_threads_argument, machine_info, machine_section, write_results  # noqa: E402
from pyromoe import parameter_errors, simulate  # noqa: E402
from pyromoe.core.links import get_link  # noqa: E402
from pyromoe.core.sources import as_source  # noqa: E402
from pyromoe.estimators.em import fit_em  # noqa: E402
from pyromoe.estimators.moment_step import moment_experts  # noqa: E402
from pyromoe.estimators.tensor_init import tensor_init  # noqa: E402

_MEMORY_CHILD = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from pyromoe.estimators.moment_step import moment_experts
from pyromoe.core.links import get_link
from pyromoe.core.sources import as_source
n, d = {n}, {d}
g = torch.Generator().manual_seed(0)
x = torch.randn(n, d, generator=g, dtype=torch.float64)
y = x[:, 0] + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) * torch.sign(x[:, 1])
y = y + x[:, 2] * (x[:, 3] > 0)
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])  # kB
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the RSS high-water mark (VmHWM) now that the data are in memory
base = status("VmRSS")
moment_experts(as_source(x, y), 2, get_link("linear"), None, {chunk}, 0)
peak = status("VmHWM")
print(base, peak)
"""


def median_time(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory_row(n: int, d: int, chunk: int) -> dict:
    code = "import torch; torch.set_num_threads(1)\n" + _MEMORY_CHILD.format(
        root=str(Path(__file__).resolve().parents[1]), n=n, d=d, chunk=chunk
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak = (int(v) for v in out.stdout.split())
    return {
        "n": n,
        "chunk_size": chunk,
        "x_mib": n * d * 8 / 2**20,
        "rss_with_data_mib": base / 1024,
        "extra_peak_mib": (peak - base) / 1024,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 2e5 instead of 1e6")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = 200_000 if args.quick else 1_000_000
    d, k = 50, 2
    info = machine_info()
    data = simulate(n, d, k, "linear", 0.5, seed=0)
    x, y = data.x, data.y
    result = {"n": n, "d": d, "k": k}

    xtx = median_time(lambda: x.T @ x)
    result["xtx_seconds"] = xtx
    link = get_link("linear")
    source = as_source(x, y)
    for chunk in (4096, 65536):
        secs = median_time(lambda c=chunk: moment_experts(source, k, link, None, c, 0))
        result[f"moment_seconds_chunk_{chunk}"] = secs
        result[f"moment_over_xtx_chunk_{chunk}"] = secs / xtx
        print(
            f"moment step, chunk {chunk}: {secs:.3f} s = {secs / xtx:.2f} x (x.T @ x {xtx:.3f} s)"
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        est = tensor_init(x, y, k, seed=0)
        result["tensor_init_seconds"] = time.perf_counter() - t
        diag = est.diagnostics
        result["gate_em_seconds"] = diag["gate_seconds"]
        result["gate_em_iterations"] = diag["gate_n_iter"]
        result["gate_em_converged"] = diag["gate_converged"]
        result["tensor_expert_error"] = parameter_errors(est, data.truth)["experts"]
        result["tensor_gate_error"] = parameter_errors(est, data.truth)["gate"]

        t = time.perf_counter()
        refined = tensor_init(x, y, k, refine=True, random_starts=0, seed=0)
        result["tensor_init_refine_seconds"] = time.perf_counter() - t
        result["refine_em_seconds"] = refined.diagnostics["refine_seconds"]
        result["refine_em_iterations"] = refined.diagnostics["refine_n_iter"]
        result["refined_expert_error"] = parameter_errors(refined, data.truth)["experts"]

        one_times, one_iters, one_errors = [], [], []
        for start in range(5):
            t = time.perf_counter()
            fit = fit_em(x, y, k, n_init=1, seed=start)
            one_times.append(time.perf_counter() - t)
            one_iters.append(fit.diagnostics.get("n_iter"))
            one_errors.append(parameter_errors(fit, data.truth)["experts"])
        result["random_em_seconds_per_start"] = one_times
        result["random_em_iterations_per_start"] = one_iters
        result["random_em_errors_per_start"] = one_errors
        result["random_em_one_start_seconds"] = statistics.median(one_times)
        result["random_em_best_of_5_seconds"] = sum(one_times)
    result["refine_vs_one_random_start"] = (
        result["tensor_init_refine_seconds"] / result["random_em_one_start_seconds"]
    )
    result["refine_vs_best_of_5"] = (
        result["tensor_init_refine_seconds"] / result["random_em_best_of_5_seconds"]
    )
    print(json.dumps({k_: v for k_, v in result.items() if not isinstance(v, list)}, indent=1))

    memory = []
    sizes = [50_000, 100_000, 200_000] if args.quick else [100_000, 300_000, 1_000_000]
    for size in sizes:
        row = memory_row(size, d, 65536)
        memory.append(row)
        print(row)
    result["memory"] = memory

    md = [
        f"# Speed: n = {n:.0e}, d = {d}, k = {k}, linear, float64, CPU",
        "",
        f"Run: `python benchmarks/speed.py{' --quick' if args.quick else ''}` "
        f"(torch threads: {args.threads}). Each EM iteration reads the data about twice "
        "(E-step, M-step).",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| one x.T @ x | {xtx:.3f} s |",
    ]
    for chunk in (4096, 65536):
        md.append(
            f"| moment step, chunk {chunk} | {result[f'moment_seconds_chunk_{chunk}']:.3f} s = "
            f"{result[f'moment_over_xtx_chunk_{chunk}']:.2f} x x.T@x |"
        )
    md += [
        f"| gate EM (experts fixed) | {result['gate_em_iterations']} iterations, "
        f"{result['gate_em_seconds']:.2f} s |",
        f"| tensor_init (moments + gate EM) | {result['tensor_init_seconds']:.2f} s, expert error "
        f"{result['tensor_expert_error']:.4f}, gate error {result['tensor_gate_error']:.4f} |",
        f"| refinement (joint EM from the tensor start) | {result['refine_em_iterations']} "
        f"iterations, {result['refine_em_seconds']:.2f} s |",
        f"| tensor_init(refine=True, random_starts=0) | {result['tensor_init_refine_seconds']:.2f} s, "
        f"expert error {result['refined_expert_error']:.4f} |",
        f"| one random-start EM (median of 5) | {result['random_em_one_start_seconds']:.2f} s, "
        f"iterations {result['random_em_iterations_per_start']} |",
        f"| best-of-5 random-start EM | {result['random_em_best_of_5_seconds']:.2f} s, errors "
        f"{[round(e, 4) for e in result['random_em_errors_per_start']]} |",
        f"| refine / one random start | {result['refine_vs_one_random_start']:.2f} |",
        f"| refine / best-of-5 | {result['refine_vs_best_of_5']:.2f} |",
        "",
        "Peak extra memory of the moment step (fresh process per n, chunk 65536, d = 50):",
        "",
        "| n | x (MiB) | RSS with data (MiB) | extra peak (MiB) |",
        "|---|---|---|---|",
    ]
    for row in memory:
        md.append(
            f"| {row['n']:.0e} | {row['x_mib']:.0f} | {row['rss_with_data_mib']:.0f} | "
            f"{row['extra_peak_mib']:.0f} |"
        )
    md += machine_section(info, "Machine:")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    labels = ["moments", "gate EM", "tensor_init\n+refine", "EM x1", "EM x5"]
    values = [
        result["moment_seconds_chunk_65536"],
        result["gate_em_seconds"],
        result["tensor_init_refine_seconds"],
        result["random_em_one_start_seconds"],
        result["random_em_best_of_5_seconds"],
    ]
    ax1.bar(labels, values)
    ax1.set_ylabel("seconds")
    ax1.set_title(f"n = {n:.0e}, d = {d}, k = {k}")
    ax2.plot([r["n"] for r in memory], [r["extra_peak_mib"] for r in memory], "o-", label="extra")
    ax2.plot([r["n"] for r in memory], [r["x_mib"] for r in memory], "s--", label="x itself")
    ax2.set_xscale("log")
    ax2.set_xlabel("n")
    ax2.set_ylabel("MiB")
    ax2.set_title("moment step memory")
    ax2.legend()
    fig.tight_layout()
    paths = write_results("speed", {"machine": info, "result": result}, "\n".join(md), fig)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
