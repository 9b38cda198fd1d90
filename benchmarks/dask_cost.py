"""What a Dask array costs against the same data in memory: time on a cluster, memory on threads.

Data: the two-expert linear mixture of ``scale.py`` (x ~ N(0, I), experts of unit norm and cosine
0.5, sigmoid gate of norm 2, noise 0.5), simulated in chunks straight into ``.npy`` files (never
whole in memory) and reopened with ``np.load(path, mmap_mode="r")``. Each section runs in fresh
child processes (one torch thread), so memory peaks and caches do not mix.

Time (d = 50, n = 1e6; with ``--large`` also 1e7), in one child that alternates the two kinds
(memory, cluster, memory, cluster: ``--repeats`` rounds), so that each round's ratio compares runs
made close together on a machine whose load changes:

- ``memory``: the data loaded into tensors; ``initialize(x, y, 2, method="auto")`` and one EM pass
  (``Source.reduce`` of the EM statistics at the true parameters, the default chunk size);
- ``cluster``: the same two calls on ``dask.array`` blocks of n / 8 rows (4 per worker), each
  block a memory-map slice opened on the worker that reads it (``da.from_delayed``: the file is
  not shipped, and the block is not copied), on ``LocalCluster(n_workers=2, threads_per_worker=1,
  processes=True)`` with a ``Client`` (cluster start-up not timed). It also times a pass that does
  no work per block (the fixed cost of one pass: graph, scheduling, the tree) and counts the
  passes ``initialize`` made, so the overhead can be told apart from the work.

Memory (d = 20, n = 2e6: 320 MB on disk): peak extra anonymous memory (``RssAnon`` from
/proc/self/status, sampled every 5 ms, minus its value before the call; mapped file pages are not
counted) of ``initialize`` on

- ``memmap``: the memory map passed directly;
- ``threaded``: ``da.from_array(memmap, chunks=(200_000, -1))`` (y likewise) under Dask's default
  threaded scheduler (one thread per core);
- ``threaded8``: the same with 8 scheduler threads (``dask.config.set(num_workers=8)``), to show
  what a machine with more cores would hold.

Ratios are within one run of this script; the machine is shared with other processes, so absolute
seconds depend on its load (the 1-minute load average is recorded before and after each child).
The timed section runs with whatever scheduler load the machine has: on 2 cores, the cluster's
four processes (client, scheduler, two workers) compete with everything else running.
Results identical to in-memory are checked: the largest relative difference between the Dask
and the in-memory estimates is recorded.

Run: ``python benchmarks/dask_cost.py`` (a few minutes on 2 cores; 1.3 GB of data in a temp
dir, or ``--data-dir``), ``--large`` adds n = 1e7 (4 GB more data, several more minutes),
``--quick`` (n = 2e5 and 4e5: a minute). Writes ``results/dask_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks._common import machine_info, machine_section, write_results  # noqa: E402
from benchmarks.scale import (  # noqa: E402
    NOISE,
    PeakSampler,
    prime_page_cache,
    truth_arrays,
)

TAG = "DASK-COST "
K = 2
GEN_CHUNK = 1 << 16


# ------------------------------------------------------------------------------------ data
def write_data(folder: Path, n: int, d: int, seed: int = 0) -> tuple[Path, Path]:
    """x (n, d) and y (n,) float64 ``.npy`` files, simulated chunk by chunk (skipped if present)."""
    px, py = folder / f"x_{n}_{d}.npy", folder / f"y_{n}_{d}.npy"
    if px.exists() and py.exists():
        return px, py
    truth = truth_arrays(d, seed)
    a, w = truth["experts_weight"], truth["gate_weight"][0]
    xs = np.lib.format.open_memmap(folder / "x.tmp.npy", mode="w+", dtype="float64", shape=(n, d))
    ys = np.lib.format.open_memmap(folder / "y.tmp.npy", mode="w+", dtype="float64", shape=(n,))
    for index, start in enumerate(range(0, n, GEN_CHUNK)):
        rows = min(GEN_CHUNK, n - start)
        rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
        x = rng.standard_normal((rows, d))
        expert = (rng.random(rows) < 1.0 / (1.0 + np.exp(-(x @ w)))).astype(np.int64)
        xs[start : start + rows] = x
        ys[start : start + rows] = np.einsum("nd,nd->n", x, a[expert]) + NOISE * (
            rng.standard_normal(rows)
        )
    xs.flush()
    ys.flush()
    del xs, ys
    (folder / "x.tmp.npy").rename(px)
    (folder / "y.tmp.npy").rename(py)
    return px, py


def _npy_rows(path: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a ``.npy`` file as a memory-map slice (read on a worker, no copy)."""
    return np.load(path, mmap_mode="r")[start:stop]


def _dask_from_files(px: Path, py: Path, n: int, d: int, rows: int):
    import dask
    import dask.array as da

    bounds = [(s, min(s + rows, n)) for s in range(0, n, rows)]

    def column(path, shape):
        return da.concatenate(
            [
                da.from_delayed(
                    dask.delayed(_npy_rows)(str(path), s, e), shape=(e - s, *shape), dtype="f8"
                )
                for s, e in bounds
            ]
        )

    return column(px, (d,)), column(py, ())


# ------------------------------------------------------------------------------------ children
def _em_pass(x, y, params, link):
    from pyromoe.core.chunks import default_chunk_size
    from pyromoe.core.em.statistics import pass_statistics
    from pyromoe.core.sources import as_source

    source = as_source(x, y)
    chunk = default_chunk_size(source.in_features)
    start = time.perf_counter()
    source.reduce(pass_statistics, chunk, params, link, True, True, None)
    return time.perf_counter() - start


def _no_work(x, y):
    import torch

    return torch.zeros(1, dtype=torch.float64)


def _counting_passes(n: int):
    """Count the passes over all ``n`` rows (``Source.reduce``); returns the counter dict."""
    from pyromoe.core import sources

    counts = {"passes": 0}
    for cls in (sources.TensorSource, sources.DaskSource):
        real = cls.reduce

        def counted(self, *args, _real=real, **kwargs):
            counts["passes"] += self.num_rows == n
            return _real(self, *args, **kwargs)

        cls.reduce = counted
    return counts


def _estimate(est) -> dict:
    names = ("experts_weight", "experts_bias", "gate_weight", "gate_bias", "noise")
    return {name: getattr(est, name).double().tolist() for name in names}


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_seconds(client) -> float:
    """CPU seconds used so far by this process (client, scheduler and nannies of a
    ``LocalCluster`` live here) and by the cluster's worker processes."""
    return _process_cpu() + sum(client.run(_process_cpu).values())


def time_child(args) -> dict:
    """In-memory and cluster runs alternated in one process (memory, cluster, memory, ...), so
    each ratio compares runs made minutes apart at most on a machine whose load changes."""
    import torch
    from dask.distributed import Client, LocalCluster

    from pyromoe import initialize
    from pyromoe.core.links import get_link
    from pyromoe.core.params import Params
    from pyromoe.core.sources import as_source

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    n, d = args.n, args.d
    px, py = Path(args.data_dir) / f"x_{n}_{d}.npy", Path(args.data_dir) / f"y_{n}_{d}.npy"
    truth = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in truth_arrays(d).items()}
    params, link = Params(**truth), get_link("linear")
    prime_page_cache(px, py)
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = Client(cluster)
    data = {
        "memory": (torch.from_numpy(np.load(px)), torch.from_numpy(np.load(py))),
        "cluster": _dask_from_files(px, py, n, d, args.block_rows),
    }
    out: dict = {"n": n, "d": d, "measurement": "time", "block_rows": args.block_rows}
    for x, y in data.values():  # warm-up on a few rows: imports, the workers' first calls
        initialize(x[:5000], y[:5000], K, "linear", seed=0)
    counts = _counting_passes(n)
    for _ in range(args.repeats):
        for kind, (x, y) in data.items():
            counts["passes"] = 0
            cpu = _cpu_seconds(client)
            start = time.perf_counter()
            est = initialize(x, y, K, "linear", method="auto", seed=0)
            out.setdefault(f"{kind}_initialize_seconds", []).append(time.perf_counter() - start)
            out.setdefault(f"{kind}_initialize_cpu_seconds", []).append(_cpu_seconds(client) - cpu)
            out[f"{kind}_passes"] = counts["passes"]
            out[f"{kind}_estimate"] = _estimate(est)
            out.setdefault(f"{kind}_em_pass_seconds", []).append(_em_pass(x, y, params, link))
    source = as_source(*data["cluster"])
    times = []
    for _ in range(5):
        start = time.perf_counter()
        source.reduce(_no_work, 1 << 16)
        times.append(time.perf_counter() - start)
    out["cluster_empty_pass_seconds"] = sorted(times)[2]
    client.close()
    cluster.close()
    return out


def memory_child(args) -> dict:
    import dask
    import dask.array as da
    import torch

    from pyromoe import initialize

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    n, d = args.n, args.d
    px, py = Path(args.data_dir) / f"x_{n}_{d}.npy", Path(args.data_dir) / f"y_{n}_{d}.npy"
    xm, ym = np.load(px, mmap_mode="r"), np.load(py, mmap_mode="r")
    prime_page_cache(px, py)
    if args.child == "memmap":
        x, y = xm, ym
    else:
        x = da.from_array(xm, chunks=(args.block_rows, -1))
        y = da.from_array(ym, chunks=args.block_rows)
    threads = 8 if args.child == "threaded8" else None
    config = {"scheduler": "threads"} | ({"num_workers": threads} if threads else {})
    with dask.config.set(config):
        initialize(x[:5000], y[:5000], K, "linear", seed=0)  # imports, first calls
        sampler = PeakSampler()
        start = time.perf_counter()
        with sampler:
            est = initialize(x, y, K, "linear", method="auto", seed=0)
        seconds = time.perf_counter() - start
    return {
        "n": n,
        "d": d,
        "measurement": args.child,
        "block_rows": None if args.child == "memmap" else args.block_rows,
        "scheduler_threads": threads or os.cpu_count(),
        "seconds": seconds,
        "peak_extra_rss_anon_mib": sampler.extra_mib,
        "estimate": _estimate(est),
    }


# ------------------------------------------------------------------------------------ parent
def run_child(args, child: str, n: int, d: int, block_rows: int, data_dir: Path) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        child,
        "--n",
        str(n),
        "--d",
        str(d),
        "--block-rows",
        str(block_rows),
        "--data-dir",
        str(data_dir),
        "--repeats",
        str(args.repeats),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(TAG)]
    if proc.returncode != 0 or not lines:
        row = {"n": n, "d": d, "measurement": child, "error": proc.stderr[-800:]}
    else:
        row = json.loads(lines[-1][len(TAG) :])
    row["wall_seconds"] = time.perf_counter() - start
    row["load_1min"] = [load_before, os.getloadavg()[0]]
    print({k: v for k, v in row.items() if "estimate" not in k}, flush=True)
    return row


def relative_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for name, va in a.items():
        va, vb = np.asarray(va, dtype=float), np.asarray(b[name], dtype=float)
        scale = float(np.abs(vb).max())
        if scale > 0:
            worst = max(worst, float(np.abs(va - vb).max()) / scale)
    return worst


def summarise(rows: list[dict]) -> dict:
    out: dict = {}
    by = {(r["n"], r["measurement"]): r for r in rows if "error" not in r}
    for (n, what), row in by.items():
        if what != "time":
            continue
        init = [
            c / m
            for c, m in zip(row["cluster_initialize_seconds"], row["memory_initialize_seconds"])
        ]
        em = [c / m for c, m in zip(row["cluster_em_pass_seconds"], row["memory_em_pass_seconds"])]
        cpu = [
            c / m
            for c, m in zip(
                row["cluster_initialize_cpu_seconds"], row["memory_initialize_cpu_seconds"]
            )
        ]
        out[f"n={n}"] = {
            "initialize_cpu_cluster_over_memory_per_round": cpu,
            "initialize_cpu_cluster_over_memory_median": statistics.median(cpu),
            "initialize_cluster_over_memory_per_round": init,
            "initialize_cluster_over_memory_median": statistics.median(init),
            "em_pass_cluster_over_memory_per_round": em,
            "em_pass_cluster_over_memory_median": statistics.median(em),
            "empty_pass_seconds_times_passes": row["cluster_empty_pass_seconds"]
            * row["cluster_passes"],
            "estimate_max_relative_difference": relative_difference(
                row["cluster_estimate"], row["memory_estimate"]
            ),
        }
    memmap = [r for (n, what), r in by.items() if what == "memmap"]
    if memmap:
        base = memmap[0]
        for what in ("threaded", "threaded8"):
            row = by.get((base["n"], what))
            if row is not None:
                out[f"memory_{what}"] = {
                    "extra_mib": row["peak_extra_rss_anon_mib"],
                    "memmap_extra_mib": base["peak_extra_rss_anon_mib"],
                    "estimate_max_relative_difference": relative_difference(
                        row["estimate"], base["estimate"]
                    ),
                }
    return out


def markdown(rows: list[dict], summary: dict, info: dict, command: str) -> str:
    lines = [
        "# Dask cost: a cluster's time and a threaded scheduler's memory against in-memory data",
        "",
        f"Run: `{command}`. Every row is a fresh child process with one torch thread on a 2-core "
        "machine; the 1-minute load average before and after each row is listed (other jobs' "
        "load makes seconds noisy: then only the ratios within this run mean much).",
        "",
        "## Time: `initialize(x, y, 2, method='auto')` and one EM pass, d = 50",
        "",
        "`cluster`: `LocalCluster(n_workers=2, threads_per_worker=1, processes=True)` + `Client`, "
        "blocks read as memory-map slices on the workers; `empty pass`: the median of five "
        "passes that do no work per block (graph, scheduling, the combining tree).",
        "",
        "In-memory and cluster runs alternate in one process (memory, cluster, memory, "
        "cluster), so each round's ratio compares runs made close together in time.",
        "",
        "| n | data | block rows | passes | initialize s (per round) | EM pass s (per round) "
        "| empty pass s | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["measurement"] != "time":
            continue
        if "error" in r:
            lines.append(f"| {r['n']:.0e} | error: {r['error'][-200:]} |")
            continue
        for kind in ("memory", "cluster"):
            init = ", ".join(f"{v:.2f}" for v in r[f"{kind}_initialize_seconds"])
            em = ", ".join(f"{v:.3f}" for v in r[f"{kind}_em_pass_seconds"])
            empty = f"{r['cluster_empty_pass_seconds']:.3f}" if kind == "cluster" else "-"
            block = r["block_rows"] if kind == "cluster" else "-"
            lines.append(
                f"| {r['n']:.0e} | {kind} | {block} | {r[f'{kind}_passes']} | {init} | {em} | "
                f"{empty} | {r['load_1min'][0]:.1f} / {r['load_1min'][1]:.1f} |"
            )
    lines += [
        "",
        "| n | initialize wall, cluster / memory (per round; median) | initialize CPU seconds, "
        "cluster / memory (per round; median) | EM pass wall, cluster / memory (per round; "
        "median) | empty pass x passes (s) | estimates' largest relative difference |",
        "|---|---|---|---|---|---|",
    ]
    for key, s in summary.items():
        if key.startswith("n="):
            init = ", ".join(f"{v:.2f}" for v in s["initialize_cluster_over_memory_per_round"])
            cpu = ", ".join(f"{v:.2f}" for v in s["initialize_cpu_cluster_over_memory_per_round"])
            em = ", ".join(f"{v:.2f}" for v in s["em_pass_cluster_over_memory_per_round"])
            lines.append(
                f"| {key[2:]} | {init}; **{s['initialize_cluster_over_memory_median']:.2f}** | "
                f"{cpu}; **{s['initialize_cpu_cluster_over_memory_median']:.2f}** | "
                f"{em}; {s['em_pass_cluster_over_memory_median']:.2f} | "
                f"{s['empty_pass_seconds_times_passes']:.2f} | "
                f"{s['estimate_max_relative_difference']:.1e} |"
            )
    lines += [
        "",
        "CPU seconds: this process (client, scheduler and nannies) plus the two workers "
        "(`getrusage`), against the in-memory run's process. The machine schedules CPU fairly "
        "between sessions (Linux autogroup, enabled here), not between processes: while other "
        "sessions keep both cores busy the cluster's two workers share one session's share, so "
        "under load the wall-clock ratio shows the overhead without the second worker's gain, "
        "and the CPU ratio shows the work Dask adds whatever the load.",
    ]
    lines += [
        "",
        "## Memory: `initialize` on a 320 MB memory map (n = 2e6, d = 20)",
        "",
        "Peak extra `RssAnon` (anonymous memory; mapped file pages are not counted) during the "
        "call. `threaded`: `da.from_array(memmap, chunks=(200_000, -1))` under Dask's default "
        "threaded scheduler (one thread per core); `threaded8`: the same with 8 threads.",
        "",
        "| data | scheduler threads | seconds | peak extra MiB | load |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["measurement"] not in ("memmap", "threaded", "threaded8"):
            continue
        if "error" in r:
            lines.append(f"| {r['measurement']} | error: {r['error'][-200:]} |")
            continue
        threads = "-" if r["measurement"] == "memmap" else r["scheduler_threads"]
        lines.append(
            f"| {r['measurement']} | {threads} | {r['seconds']:.2f} | "
            f"{r['peak_extra_rss_anon_mib']:.1f} | "
            f"{r['load_1min'][0]:.1f} / {r['load_1min'][1]:.1f} |"
        )
    for what in ("threaded", "threaded8"):
        s = summary.get(f"memory_{what}")
        if s:
            lines.append(
                f"\n{what}: estimates' largest relative difference to the memmap's: "
                f"{s['estimate_max_relative_difference']:.1e}."
            )
    lines += machine_section(info)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", default=None)
    parser.add_argument("--n", type=int, default=0)
    parser.add_argument("--d", type=int, default=50)
    parser.add_argument("--block-rows", type=int, default=125_000)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--keep-data", action="store_true")
    parser.add_argument("--large", action="store_true", help="also n = 1e7 (time)")
    parser.add_argument("--quick", action="store_true", help="n = 2e5 (time), 4e5 (memory)")
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--repeats", type=int, default=2, help="alternated rounds per kind")
    parser.add_argument("--name", default="dask_cost")
    args = parser.parse_args(argv)
    if args.child is not None:
        child = time_child if args.child == "time" else memory_child
        print(TAG + json.dumps(child(args)), flush=True)
        return
    folder = Path(args.data_dir or tempfile.mkdtemp(prefix="dask_cost_"))
    folder.mkdir(parents=True, exist_ok=True)
    time_sizes = [200_000] if args.quick else [1_000_000] + ([10_000_000] if args.large else [])
    memory_n = 400_000 if args.quick else 2_000_000
    info = machine_info()
    rows: list[dict] = []
    started = time.perf_counter()
    try:
        for n in time_sizes:
            write_data(folder, n, 50)
            block = max(math.ceil(n / 8), 1)  # 8 blocks: 4 per worker
            rows.append(run_child(args, "time", n, 50, block, folder))
        write_data(folder, memory_n, 20)
        for child in ("memmap", "threaded", "threaded8"):
            rows.append(run_child(args, child, memory_n, 20, 200_000, folder))
    finally:
        if args.data_dir is None and not args.keep_data:
            shutil.rmtree(folder, ignore_errors=True)
    summary = summarise(rows)
    command = "python benchmarks/dask_cost.py " + " ".join(sys.argv[1:])
    payload = {
        "machine": info,
        "total_seconds": time.perf_counter() - started,
        "rows": rows,
        "summary": summary,
        "note": "timings on a 2-core machine; see each row's load_1min for other jobs' load",
    }
    for path in write_results(args.name, payload, markdown(rows, summary, info, command)):
        print(path)


if __name__ == "__main__":
    main()
