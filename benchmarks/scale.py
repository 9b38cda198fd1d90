"""Scale benchmark: memory-mapped, Dask and GPU data paths as n grows (d = 50, k = 2, linear).

Data: a two-expert linear mixture with a sigmoid gate (unit-norm experts of cosine 0.5, gate of
norm 2 at a random direction, noise 0.5, x ~ N(0, I)), simulated in chunks straight into ``.npy``
files (``np.lib.format.open_memmap``; never the whole array in memory) and reopened with
``np.load(path, mmap_mode="r")``. For each n it reports, every (n, measurement) in a fresh
subprocess so that memory peaks do not mix:

- ``gram_memmap``: one chunked ``x.T @ x`` over the memmap source
  (``as_source(x, y).reduce(lambda a, b: a.T @ a, chunk)``): the unit of the ratios;
- ``gram_memory`` (n <= --memory-max): ``x.T @ x`` on the data loaded into a tensor;
- ``moments_memmap`` / ``moments_memory``: the moment step (``moment_experts`` on a Source: the
  source's summary pass, its two streaming passes and the small eigen/tensor work) over the memmap
  / over in-memory tensors;
- ``em_iteration_memmap`` / ``em_iteration_memory``: one joint-EM iteration from the true
  parameters, as ``(fit_em(max_iter=3) - fit_em(max_iter=1)) / 2`` (the setup cancels; the
  faster of two ``max_iter=1`` calls, made before and after);
- ``initialize_memmap`` and ``fit_em_memmap``: ``initialize(x, y, 2, method="auto")`` against ONE
  random-start ``fit_em(x, y, 2, n_init=1)``, with the expert error of each against the truth;
- ``initialize_memory`` and ``initialize_dask`` (at n = --dask-n): the same ``initialize`` on
  in-memory tensors and on ``dask.array`` blocks read from the ``.npy`` file by the workers of a
  ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` with a ``Client``: overhead
  and the largest relative difference between the two estimates;
- ``svi_memmap`` (largest n): ``fit_svi(..., subsample_size=4096, num_steps=200)`` on the memmap:
  ``idata.attrs["rows_per_second"]``, the script's own rows/s, and peak memory.

Memory: peak extra anonymous memory, ``RssAnon`` from /proc/self/status sampled every 5 ms by a
background thread during the call, minus ``RssAnon`` before it. ``RssAnon`` leaves out mapped file
pages, which ``VmRSS`` counts (a pass over a memmap would otherwise look like a copy). For Dask it
is the client process only (the workers are other processes). Ratios are within one run of this
script; absolute seconds depend on the machine and its load (both recorded).

A failing measurement records its error string in the JSON and Markdown; the others still run.

Run: ``python benchmarks/scale.py`` (n = 1e5, 1e6, 1e7: roughly half an hour on 2 cores; 1e7
needs 4.4 GB of disk in float64), ``--quick`` (n = 1e5, 2e5: about two minutes),
``--device cuda --dtype float32`` (the GPU check, benchmarks/gpu_check.sh). Writes ``<out>/<name>.{json,md,png}`` (default
benchmarks/results/scale.*).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import RESULTS, add_threads_argument, machine_info, machine_section  # noqa: E402

D, K, NOISE, GATE_NORM, COSINE = 50, 2, 0.5, 2.0, 0.5
GEN_CHUNK = 1 << 16  # rows per generation chunk (fixed, so the data do not depend on --chunk-size)
RESULT_TAG = "SCALE-RESULT "
WARM_ROWS = 5000  # rows of the warm-up call made before the memory sampler starts

MEASUREMENTS = [
    "gram_memmap",
    "gram_memory",
    "moments_memmap",
    "moments_memory",
    "em_iteration_memmap",
    "em_iteration_memory",
    "svi_memmap",
    "initialize_memmap",
    "fit_em_memmap",
    "initialize_memory",
    "initialize_dask",
]
IN_MEMORY = {"gram_memory", "moments_memory", "em_iteration_memory"}


# ------------------------------------------------------------------------------------ the data
def truth_arrays(d: int = D, seed: int = 0) -> dict[str, np.ndarray]:
    """True parameters of the generator: experts of unit norm and cosine 0.5, gate of norm 2."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 999]))
    a1 = rng.standard_normal(d)
    a1 /= np.linalg.norm(a1)
    u = rng.standard_normal(d)
    u -= (u @ a1) * a1
    u /= np.linalg.norm(u)
    a2 = COSINE * a1 + math.sqrt(1 - COSINE**2) * u
    w = rng.standard_normal(d)
    w *= GATE_NORM / np.linalg.norm(w)
    return {
        "experts_weight": np.stack([a1, a2]),
        "experts_bias": np.zeros(2),
        "gate_weight": w[None, :],
        "gate_bias": np.zeros(1),
        "noise": np.array(NOISE),
    }


def truth_estimate(d: int = D, seed: int = 0):
    from pyromoe import MoEEstimate

    arrays = truth_arrays(d, seed)
    return MoEEstimate(
        **{name: torch.as_tensor(value, dtype=torch.float64) for name, value in arrays.items()},
        link="linear",
    )


def data_paths(data_dir: Path, n: int, dtype: str) -> tuple[Path, Path]:
    return data_dir / f"x_{n}_{dtype}.npy", data_dir / f"y_{n}_{dtype}.npy"


def write_data(data_dir: Path, n: int, dtype: str, seed: int = 0) -> tuple[Path, Path]:
    """Simulate n rows chunk by chunk into x (n, d) and y (n,) ``.npy`` files (skip if present)."""
    px, py = data_paths(data_dir, n, dtype)
    if px.exists() and py.exists():
        return px, py
    truth = truth_arrays(D, seed)
    a, w = truth["experts_weight"], truth["gate_weight"][0]
    xs = np.lib.format.open_memmap(px.with_suffix(".tmp.npy"), mode="w+", dtype=dtype, shape=(n, D))
    ys = np.lib.format.open_memmap(py.with_suffix(".tmp.npy"), mode="w+", dtype=dtype, shape=(n,))
    for index, start in enumerate(range(0, n, GEN_CHUNK)):
        rows = min(GEN_CHUNK, n - start)
        rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
        x = rng.standard_normal((rows, D))
        gate = 1.0 / (1.0 + np.exp(-(x @ w + truth["gate_bias"][0])))
        expert = (rng.random(rows) < gate).astype(np.int64)  # 1 with probability sigmoid(w . x)
        mean = np.einsum("nd,nd->n", x, a[expert]) + truth["experts_bias"][expert]
        xs[start : start + rows] = x
        ys[start : start + rows] = mean + NOISE * rng.standard_normal(rows)
    xs.flush()
    ys.flush()
    del xs, ys
    px.with_suffix(".tmp.npy").rename(px)
    py.with_suffix(".tmp.npy").rename(py)
    return px, py


# ------------------------------------------------------------------------------------ memory
def rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakSampler:
    """Highest RssAnon while the ``with`` block runs, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_kib())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.base = self.peak = rss_anon_kib()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_kib())
        return False

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 1024


# ------------------------------------------------------------------------------------ child side
def prime_page_cache(*paths: Path, buffer_bytes: int = 1 << 22) -> None:
    """Read files once through a small buffer (page cache, not anonymous memory)."""
    buffer = bytearray(buffer_bytes)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _device_kwargs(device: str) -> dict:
    """``device=`` only off the CPU (the CPU is every estimator's default)."""
    return {} if device == "cpu" else {"device": device}


def _timed(fn, device: str):
    _sync(device)
    start = time.perf_counter()
    value = fn()
    _sync(device)
    return time.perf_counter() - start, value


def _estimate_dict(estimate) -> dict:
    out = {
        name: getattr(estimate, name).detach().cpu().double().tolist()
        for name in ("experts_weight", "experts_bias", "gate_weight", "gate_bias", "noise")
    }
    out["diagnostics"] = {
        key: estimate.diagnostics.get(key)
        for key in ("initializer", "initializer_reason", "refine_winner", "n_iter", "converged")
        if key in estimate.diagnostics
    }
    return out


def _errors(estimate, truth) -> dict:
    from pyromoe import parameter_errors

    errors = parameter_errors(estimate, truth)
    return {key: errors[key] for key in ("experts", "gate", "noise")}


def run_child(args) -> dict:
    """One measurement at one n (in its own process); returns a JSON-able dict."""
    from pyromoe import fit_em, initialize
    from pyromoe.core.chunks import default_chunk_size
    from pyromoe.core.links import get_link
    from pyromoe.core.sources import as_source
    from pyromoe.estimators.moment_step import moment_experts

    torch.set_num_threads(args.threads)
    n, device = args.n, args.device
    # 0: the library's default for every pass (default_chunk_size(d))
    chunk = args.chunk_size or default_chunk_size(D)
    moment_chunk = chunk
    px, py = data_paths(Path(args.data_dir), n, args.dtype)
    x_mm, y_mm = np.load(px, mmap_mode="r"), np.load(py, mmap_mode="r")
    truth = truth_estimate()
    link = get_link("linear")
    what = args.child
    out: dict = {"n": n, "measurement": what}
    warnings.simplefilter("ignore")  # ConvergenceWarning of max_iter=1 etc.: not the point here

    x_t = y_t = x_d = y_d = None
    if what in IN_MEMORY or what == "initialize_memory":
        x_t = torch.from_numpy(np.load(px)).to(device)  # loaded before the sampler starts
        y_t = torch.from_numpy(np.load(py)).to(device)
    if what == "initialize_dask":
        import dask
        import dask.array as da
        from dask.distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
        rows = args.dask_block_rows
        blocks = [(s, min(s + rows, n)) for s in range(0, n, rows)]
        np_dtype = np.dtype(args.dtype)
        x_d = da.concatenate(
            [
                da.from_delayed(
                    dask.delayed(_npy_block)(str(px), s, e), shape=(e - s, D), dtype=np_dtype
                )
                for s, e in blocks
            ]
        )
        y_d = da.concatenate(
            [
                da.from_delayed(
                    dask.delayed(_npy_block)(str(py), s, e), shape=(e - s,), dtype=np_dtype
                )
                for s, e in blocks
            ]
        )
        out["dask_blocks"] = len(blocks)
        out["dask_block_rows"] = rows

    if what == "svi_memmap":  # Pyro's import is not the call's memory
        from pyromoe import MixtureOfExperts, fit_svi  # noqa: F401 (used in svi below)

    def inputs(kind):
        return {"memmap": (x_mm, y_mm), "memory": (x_t, y_t), "dask": (x_d, y_d)}[kind]

    def em_from_truth(xs, ys, iters):
        return fit_em(
            xs,
            ys,
            K,
            "linear",
            init=truth,
            n_init=1,
            max_iter=iters,
            seed=0,
            **_device_kwargs(device),
        )

    def gram(xs, ys):
        source = as_source(xs, ys, **_device_kwargs(device))
        return source.reduce(lambda a, b: a.T @ a, chunk)

    def moments(xs, ys):
        # the source's summary pass (NaN check, column statistics) runs inside the call
        source = as_source(xs, ys, **_device_kwargs(device))
        return moment_experts(source, K, link, None, moment_chunk, 0)

    def init(xs, ys):
        return initialize(xs, ys, K, "linear", method="auto", seed=0, **_device_kwargs(device))

    def em_random(xs, ys):
        return fit_em(xs, ys, K, "linear", n_init=1, seed=0, **_device_kwargs(device))

    def svi(xs, ys, steps):
        model = MixtureOfExperts(D, K, "linear")
        return fit_svi(
            model,
            xs,
            ys,
            init=truth,
            subsample_size=min(args.svi_batch, xs.shape[0]),
            num_steps=steps,
            num_samples=10,
            progress=False,
            **_device_kwargs(device),
        )

    sampler = PeakSampler()
    try:
        kind = "dask" if what.endswith("_dask") else what.rsplit("_", 1)[1]
        xs, ys = inputs(kind)
        # Before the sampler: the files into the page cache through a small buffer, and a warm-up
        # call on the first rows only (imports, first-call costs). A full-size warm-up would
        # leave freed memory that malloc keeps and the measured call reuses, hiding its peak.
        prime_page_cache(px, py)
        head = (xs[:WARM_ROWS], ys[:WARM_ROWS])
        if what.startswith("gram"):
            gram(*head)
        elif what.startswith("moments"):
            moments(*head)
        elif what.startswith("em_iteration"):
            em_from_truth(*head, 1)
        elif what.startswith("initialize") and kind != "dask":
            init(*head)
        elif what.startswith("initialize"):
            init(x_mm[:WARM_ROWS], y_mm[:WARM_ROWS])
        elif what.startswith("fit_em"):
            em_random(*head)
        elif what.startswith("svi"):
            svi(*head, 5)
        with sampler:
            if what.startswith("gram"):
                call = (lambda: x_t.T @ x_t) if kind == "memory" else (lambda: gram(xs, ys))
                times = [_timed(call, device)[0] for _ in range(args.repeats)]
                out["seconds"] = statistics.median(times)
                out["seconds_all"] = times
            elif what.startswith("moments"):
                out["seconds"], _ = _timed(lambda: moments(xs, ys), device)
            elif what.startswith("em_iteration"):
                # 1, 3, 1 iterations: the faster 1-iteration call is the setup + one iteration
                s1a, f1 = _timed(lambda: em_from_truth(xs, ys, 1), device)
                s3, f3 = _timed(lambda: em_from_truth(xs, ys, 3), device)
                s1b, _ = _timed(lambda: em_from_truth(xs, ys, 1), device)
                s1 = min(s1a, s1b)
                i1, i3 = f1.diagnostics.get("n_iter", 1), f3.diagnostics.get("n_iter", 3)
                out["seconds_max_iter_1"], out["seconds_max_iter_3"] = [s1a, s1b], s3
                out["n_iter"] = [i1, i3]
                out["seconds"] = (s3 - s1) / max(i3 - i1, 1)
            elif what.startswith("initialize") or what.startswith("fit_em"):
                call = init if what.startswith("initialize") else em_random
                out["seconds"], est = _timed(lambda: call(xs, ys), device)
                out["errors"] = _errors(est, truth)
                out["estimate"] = _estimate_dict(est)
            elif what == "svi_memmap":
                out["seconds"], idata = _timed(lambda: svi(xs, ys, args.svi_steps), device)
                attrs = idata.attrs
                out["svi_seconds"] = attrs.get("seconds")
                out["rows_per_second_attr"] = attrs.get("rows_per_second")
                if out["rows_per_second_attr"] is None:
                    out["rows_per_second_attr_error"] = "idata.attrs has no 'rows_per_second'"
                step_seconds = attrs.get("seconds") or out["seconds"]
                out["rows_per_second_script"] = args.svi_batch * args.svi_steps / step_seconds
                out["batch"], out["steps"] = args.svi_batch, args.svi_steps
            else:
                raise ValueError(f"unknown measurement {what!r}")
    except Exception as error:  # recorded, shown in the Markdown; the other measurements still run
        out["error"] = f"{type(error).__name__}: {error}"[:600]
    out["rss_anon_base_mib"] = sampler.base / 1024
    out["peak_extra_rss_anon_mib"] = sampler.extra_mib
    if what == "initialize_dask":
        client.close()
        cluster.close()
    return out


def _npy_block(path: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a ``.npy`` file, read on a Dask worker (the file is not shipped): a
    view of the mapped pages, not a copy (pyromoe reads it in pieces; ``core/blocks.py``)."""
    return np.load(path, mmap_mode="r")[start:stop]


# ------------------------------------------------------------------------------------ parent side
def run_measurement(args, what: str, n: int, data_dir: Path, timeout: float | None = None) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        what,
        "--n",
        str(n),
        "--data-dir",
        str(data_dir),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--chunk-size",
        str(args.chunk_size),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--svi-batch",
        str(args.svi_batch),
        "--svi-steps",
        str(args.svi_steps),
        "--dask-block-rows",
        str(args.dask_block_rows),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            "n": n,
            "measurement": what,
            "error": f"timed out after {timeout:.0f} s (--step-timeout / --budget)",
            "wall_seconds": time.perf_counter() - start,
        }
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        row = {
            "n": n,
            "measurement": what,
            "error": f"subprocess exit {proc.returncode}: " + " | ".join(tail)[-600:],
        }
    else:
        row = json.loads(lines[-1][len(RESULT_TAG) :])
    row["wall_seconds"] = time.perf_counter() - start
    return row


def _relative_difference(a: dict, b: dict) -> float:
    """Largest relative difference of ``a`` to ``b`` over the parameter arrays, after matching labels."""
    from pyromoe import MoEEstimate, parameter_errors

    names = ("experts_weight", "experts_bias", "gate_weight", "gate_bias", "noise")

    def build(d):
        return MoEEstimate(
            **{k: torch.tensor(d[k], dtype=torch.float64) for k in names}, link="linear"
        )

    ea, eb = build(a), build(b)
    ea = ea.permute(parameter_errors(ea, eb)["permutation"])
    worst = 0.0
    for name in names:
        va, vb = getattr(ea, name), getattr(eb, name)
        scale = float(vb.abs().max())
        if scale > 0:
            worst = max(worst, float((va - vb).abs().max()) / scale)
    return worst


def derived(rows: list[dict], sizes: list[int], dask_n: int | None) -> dict:
    """Ratios within this run: against the chunked memmap Gram pass and the in-memory x.T @ x."""
    by = {(r["n"], r["measurement"]): r for r in rows}

    def secs(n, what):
        r = by.get((n, what))
        return None if r is None or "error" in r or r.get("seconds") is None else r["seconds"]

    out = {}
    for n in sizes:
        entry = {}
        gram_mm, gram_mem = secs(n, "gram_memmap"), secs(n, "gram_memory")
        for what in (
            "moments_memmap",
            "moments_memory",
            "em_iteration_memmap",
            "em_iteration_memory",
        ):
            s = secs(n, what)
            if s is not None and gram_mm:
                entry[f"{what}_over_gram_memmap"] = s / gram_mm
            if s is not None and gram_mem:
                entry[f"{what}_over_gram_memory"] = s / gram_mem
        if gram_mm and gram_mem:
            entry["gram_memmap_over_gram_memory"] = gram_mm / gram_mem
        init, em = secs(n, "initialize_memmap"), secs(n, "fit_em_memmap")
        if init is not None and em:
            entry["initialize_over_one_random_fit_em"] = init / em
        iters = ((by.get((n, "fit_em_memmap")) or {}).get("estimate") or {}).get("diagnostics", {})
        if em and iters.get("n_iter"):
            # the other estimate of one EM iteration: a whole random-start fit / its iterations
            entry["fit_em_seconds_per_iteration"] = em / iters["n_iter"]
            if gram_mm:
                entry["fit_em_per_iteration_over_gram_memmap"] = em / iters["n_iter"] / gram_mm
        out[n] = entry
    if dask_n is not None:
        dask_row, mem_row = (
            by.get((dask_n, "initialize_dask")),
            by.get((dask_n, "initialize_memory")),
        )
        ds, ms = secs(dask_n, "initialize_dask"), secs(dask_n, "initialize_memory")
        if ds is not None and ms:
            out["dask_over_memory"] = ds / ms
            out["dask_vs_memory_max_relative_difference"] = _relative_difference(
                dask_row["estimate"], mem_row["estimate"]
            )
    return out


def _fmt(value, spec=".3g"):
    return "-" if value is None else format(value, spec)


def markdown(payload: dict, command: str) -> str:
    rows, ratios, settings = payload["rows"], payload["derived"], payload["settings"]
    by = {(r["n"], r["measurement"]): r for r in rows}
    lines = [
        f"# Scale: d = {D}, k = {K}, linear, {settings['dtype']}, device {settings['device']}",
        "",
        f"Run: `{command}`. Data simulated in chunks to `.npy` files and read with "
        f'`np.load(path, mmap_mode="r")`; chunk size {settings["chunk_size"] or "the library default"} (rows); torch '
        f"threads {settings['threads']}; every (n, measurement) in a fresh subprocess. Peak memory "
        "= highest RssAnon (anonymous memory, not mapped file pages) during the call minus RssAnon "
        "before it, sampled every 5 ms. Ratios are within this run; seconds depend on the "
        f"machine and its load (1-min load {payload['load_at_start'][0]:.2f} at the start, "
        f"{payload['load_at_end'][0]:.2f} at the end).",
        "",
        *_merged_lines(settings),
        "| n | measurement | seconds | / memmap Gram pass | / in-memory x.T@x | "
        "peak extra RssAnon (MiB) | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in settings["sizes"]:
        entry = ratios.get(n, ratios.get(str(n), {}))
        for what in MEASUREMENTS:
            r = by.get((n, what))
            if r is None or what in ("initialize_memmap", "fit_em_memmap", "initialize_memory"):
                continue
            if what in ("initialize_dask", "svi_memmap"):
                continue
            lines.append(
                f"| {n:.0e} | {what} | {_fmt(r.get('seconds'))} | "
                f"{_fmt(entry.get(f'{what}_over_gram_memmap'), '.2f')} | "
                f"{_fmt(entry.get(f'{what}_over_gram_memory'), '.2f')} | "
                f"{_fmt(r.get('peak_extra_rss_anon_mib'), '.0f')} | {r.get('error', '')} |"
            )
    lines += [
        "",
        '`initialize(x, y, 2, method="auto")` against one random-start `fit_em(x, y, 2, n_init=1)`, '
        "both on the memmap (expert error = max_i ||a_hat_i - a_i|| after the best permutation):",
        "",
        "| n | initialize s | fit_em s | ratio | initialize expert error | fit_em expert error | "
        "initializer | fit_em iterations (s each, / memmap Gram) | peak extra MiB (init / em) | "
        "error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in settings["sizes"]:
        ri, re_ = by.get((n, "initialize_memmap")), by.get((n, "fit_em_memmap"))
        if ri is None and re_ is None:
            continue
        ri, re_ = ri or {}, re_ or {}
        entry = ratios.get(n, ratios.get(str(n), {}))
        err = "; ".join(e for e in (ri.get("error"), re_.get("error")) if e)
        lines.append(
            f"| {n:.0e} | {_fmt(ri.get('seconds'))} | {_fmt(re_.get('seconds'))} | "
            f"{_fmt(entry.get('initialize_over_one_random_fit_em'), '.2f')} | "
            f"{_fmt((ri.get('errors') or {}).get('experts'), '.4f')} | "
            f"{_fmt((re_.get('errors') or {}).get('experts'), '.4f')} | "
            f"{(ri.get('estimate') or {}).get('diagnostics', {}).get('initializer', '-')} | "
            f"{(re_.get('estimate') or {}).get('diagnostics', {}).get('n_iter', '-')} "
            f"({_fmt(entry.get('fit_em_seconds_per_iteration'))}, "
            f"{_fmt(entry.get('fit_em_per_iteration_over_gram_memmap'), '.2f')}) | "
            f"{_fmt(ri.get('peak_extra_rss_anon_mib'), '.0f')} / "
            f"{_fmt(re_.get('peak_extra_rss_anon_mib'), '.0f')} | {err} |"
        )
    dask_n = settings.get("dask_n")
    lines += [""]
    if dask_n is None:
        lines.append("Dask: skipped (no size <= 1e6 in --sizes, or --dask-n 0).")
    else:
        rm, rd = by.get((dask_n, "initialize_memory"), {}), by.get((dask_n, "initialize_dask"), {})
        lines += [
            f"Dask at n = {dask_n:.0e}: `initialize` on in-memory tensors vs on `dask.array` blocks "
            f"of {settings['dask_block_rows']} rows (read from the `.npy` file by the workers) on "
            "`LocalCluster(n_workers=2, threads_per_worker=1, processes=True)` + `Client` (cluster "
            "start-up not timed; peak memory is the client process only):",
            "",
            "| input | seconds | expert error | peak extra RssAnon (MiB) | error |",
            "|---|---|---|---|---|",
        ]
        for label, r in (("in-memory tensors", rm), ("dask.distributed", rd)):
            lines.append(
                f"| {label} | {_fmt(r.get('seconds'))} | "
                f"{_fmt((r.get('errors') or {}).get('experts'), '.4f')} | "
                f"{_fmt(r.get('peak_extra_rss_anon_mib'), '.0f')} | {r.get('error', '')} |"
            )
        lines += [
            "",
            f"Dask / in-memory: {_fmt(ratios.get('dask_over_memory'), '.2f')}; largest relative "
            "difference between the two estimates: "
            f"{_fmt(ratios.get('dask_vs_memory_max_relative_difference'), '.2e')}.",
        ]
    svi = [r for r in rows if r["measurement"] == "svi_memmap"]
    lines += [""]
    for r in svi:
        lines += [
            f"Minibatch SVI on the memmap, n = {r['n']:.0e}: `fit_svi(..., subsample_size="
            f"{settings['svi_batch']}, num_steps={settings['svi_steps']}, num_samples=10)` from the "
            "true parameters (call seconds include building the InferenceData).",
            "",
            "| rows/s (idata.attrs) | rows/s (batch x steps / attrs['seconds']) | call seconds | "
            "peak extra RssAnon (MiB) | error |",
            "|---|---|---|---|---|",
            f"| {_fmt(r.get('rows_per_second_attr'), '.4g')} | "
            f"{_fmt(r.get('rows_per_second_script'), '.4g')} | {_fmt(r.get('seconds'))} | "
            f"{_fmt(r.get('peak_extra_rss_anon_mib'), '.0f')} | "
            f"{r.get('error', r.get('rows_per_second_attr_error', ''))} |",
        ]
    lines += machine_section(payload["machine"], "Machine:")
    return "\n".join(lines)


def plot(payload: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    colours = plt.get_cmap("tab20").colors
    for index, what in enumerate(MEASUREMENTS):
        points = sorted(
            (r["n"], r["seconds"])
            for r in payload["rows"]
            if r["measurement"] == what and "error" not in r and r.get("seconds")
        )
        if points:
            style = (
                "s--" if what.endswith("_memory") else ("^:" if what.endswith("_dask") else "o-")
            )
            ax.plot(*zip(*points), style, color=colours[2 * index % 20], label=what)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n")
    ax.set_ylabel("seconds")
    s = payload["settings"]
    ax.set_title(f"d = {D}, k = {K}, linear, {s['dtype']}, {s['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def write_outputs(out: Path, name: str, payload: dict, md: str, fig) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    paths[0].write_text(json.dumps(payload, indent=2, default=float) + "\n")
    paths[1].write_text(md)
    fig.savefig(paths[2], dpi=120, bbox_inches="tight")
    return paths


def parse_sizes(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def plan(args, sizes: list[int], dask_n: int | None) -> list[tuple[str, int]]:
    """(measurement, n) in the order they run: cheap ones first, at every n; SVI at the largest."""
    wanted = set(args.only.split(",")) if args.only else set(MEASUREMENTS)
    unknown = wanted - set(MEASUREMENTS)
    if unknown:
        raise SystemExit(
            f"--only: unknown measurement(s) {sorted(unknown)}; choose from {MEASUREMENTS}"
        )
    steps = []
    for n in sizes:
        for what in MEASUREMENTS:
            if what not in wanted:
                continue
            if what in IN_MEMORY and n > args.memory_max:
                continue
            if what == "svi_memmap" and n != max(sizes):
                continue
            if what in ("initialize_memory", "initialize_dask") and n != dask_n:
                continue
            steps.append((what, n))
    return steps


def _merged_lines(settings: dict) -> list[str]:
    """Markdown lines naming the runs a merged table comes from (none for a single run)."""
    runs = settings.get("merged_runs")
    if not runs:
        return []
    lines = ["Rows from more than one run (`--merge`); every n's rows come from one run:", ""]
    for run in runs:
        if run["rows"]:
            sizes = sorted({row.split(" ")[0] for row in run["rows"]}, key=float)
            load = run.get("load_at_start") or [float("nan")]
            lines.append(
                f"- `{run['command']}` (1-min load {load[0]:.2f} at its start): n = "
                f"{', '.join(sizes)}"
            )
    return [*lines, ""]


def merged(payload: dict, previous: Path) -> dict:
    """``payload`` with the rows of an earlier run's JSON that this run did not measure again.

    Each (n, measurement) row then comes from one run; the runs' commands and loads are listed in
    ``settings["merged_runs"]`` (a ratio across rows of different runs mixes their loads: the
    ratios this script derives are between rows of the same n, re-measured together).
    """
    if not previous.exists():
        return payload
    old = json.loads(previous.read_text())
    fresh = {(row["n"], row["measurement"]) for row in payload["rows"]}
    kept = [row for row in old["rows"] if (row["n"], row["measurement"]) not in fresh]
    order = {what: i for i, what in enumerate(MEASUREMENTS)}
    rows = sorted(
        kept + payload["rows"], key=lambda r: (r["n"], order.get(r["measurement"], len(order)))
    )
    runs = old["settings"].get("merged_runs") or [
        {
            "command": old["settings"].get("command"),
            "load_at_start": old.get("load_at_start"),
            "rows": sorted({f"{r['n']:.0e} {r['measurement']}" for r in old["rows"]}),
        }
    ]
    runs = [
        {
            **run,
            "rows": [
                r
                for r in run["rows"]
                if tuple(r.split(" ", 1)) not in {(f"{n:.0e}", m) for n, m in fresh}
            ],
        }
        for run in runs
    ]
    runs.append(
        {
            "command": payload["settings"]["command"],
            "load_at_start": payload["load_at_start"],
            "rows": sorted(f"{n:.0e} {m}" for n, m in fresh),
        }
    )
    payload = dict(payload)
    payload["rows"] = rows
    settings = dict(payload["settings"])
    settings["sizes"] = sorted({row["n"] for row in rows})
    settings["merged_runs"] = runs
    payload["settings"] = settings
    return payload


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 1e5, 2e5")
    parser.add_argument("--sizes", default=None, help="comma-separated n (default 1e5,1e6,1e7)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--out", default=str(RESULTS), help="output folder (benchmarks/results)")
    parser.add_argument("--name", default="scale", help="output file stem (default scale)")
    parser.add_argument(
        "--data-dir", default=None, help="where the .npy files go (default: a temp dir, removed)"
    )
    parser.add_argument("--keep-data", action="store_true", help="keep the temp data dir")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=0,
        help="rows per chunk of the Gram and moment passes (0: the library's defaults)",
    )
    add_threads_argument(parser)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each Gram pass (median)")
    parser.add_argument(
        "--memory-max", type=float, default=1e6, help="largest n for in-memory rows"
    )
    parser.add_argument(
        "--dask-n",
        type=float,
        default=None,
        help="n of the Dask comparison (default 1e6, or the largest size <= 1e6; 0 skips)",
    )
    parser.add_argument("--dask-block-rows", type=int, default=1 << 17, help="rows per Dask block")
    parser.add_argument("--svi-batch", type=int, default=4096)
    parser.add_argument("--svi-steps", type=int, default=200)
    parser.add_argument("--step-timeout", type=float, default=None, help="seconds per measurement")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run (data included): later steps are recorded as not run, "
        "and the results are still written",
    )
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {MEASUREMENTS}")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of the existing <out>/<name>.json that this run does not measure",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = run_child(args)
        print(RESULT_TAG + json.dumps(result, default=float), flush=True)
        return

    sizes = (
        parse_sizes(args.sizes)
        if args.sizes
        else ([100_000, 200_000] if args.quick else [100_000, 1_000_000, 10_000_000])
    )
    if args.dask_n is None:
        small = [n for n in sizes if n <= 1_000_000]
        dask_n = 1_000_000 if 1_000_000 in sizes else (max(small) if small else None)
    else:
        dask_n = int(args.dask_n) or None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    info = machine_info()
    load_start = os.getloadavg()
    command = "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    temp = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="pyromoe-scale-") if temp else args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    rows, generation = [], {}
    started = time.perf_counter()
    try:
        for n in sizes:
            t = time.perf_counter()
            write_data(data_dir, n, args.dtype)
            generation[n] = time.perf_counter() - t
            print(f"data n={n:.0e}: {generation[n]:.1f} s in {data_dir}", flush=True)
        for what, n in plan(args, sizes, dask_n):
            limits = [args.step_timeout] if args.step_timeout else []
            if args.budget:
                left = args.budget - (time.perf_counter() - started)
                if left < 5:
                    rows.append({"n": n, "measurement": what, "error": "not run: --budget spent"})
                    print(f"n={n:.0e} {what}: not run (--budget spent)", flush=True)
                    continue
                limits.append(left)
            row = run_measurement(args, what, n, data_dir, min(limits) if limits else None)
            rows.append(row)
            shown = row.get("error") or (
                f"{row.get('seconds', float('nan')):.4g} s, peak extra "
                f"{row.get('peak_extra_rss_anon_mib', float('nan')):.0f} MiB"
            )
            print(f"n={n:.0e} {what}: {shown} ({time.perf_counter() - started:.0f} s)", flush=True)
    finally:
        if temp and not args.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
    payload = {
        "machine": info,
        "load_at_start": list(load_start),
        "load_at_end": list(os.getloadavg()),
        "total_seconds": time.perf_counter() - started,
        "settings": {
            "sizes": sizes,
            "d": D,
            "k": K,
            "link": "linear",
            "noise": NOISE,
            "expert_cosine": COSINE,
            "gate_norm": GATE_NORM,
            "device": args.device,
            "dtype": args.dtype,
            "chunk_size": args.chunk_size,
            "threads": args.threads,
            "repeats": args.repeats,
            "dask_n": dask_n,
            "dask_block_rows": args.dask_block_rows,
            "svi_batch": args.svi_batch,
            "svi_steps": args.svi_steps,
            "data_dir": None if temp else str(data_dir),
            "generation_seconds": generation,
            "command": command,
        },
        "rows": rows,
    }
    if args.merge:
        payload = merged(payload, Path(args.out) / f"{args.name}.json")
        sizes = payload["settings"]["sizes"]
        dask_rows = [r["n"] for r in payload["rows"] if r["measurement"] == "initialize_dask"]
        if dask_n is None and dask_rows:  # an earlier run's Dask rows are kept: show them
            dask_n = dask_rows[0]
            payload["settings"]["dask_n"] = dask_n
    payload["derived"] = derived(payload["rows"], sizes, dask_n)
    md = markdown(payload, command)
    paths = write_outputs(Path(args.out), args.name, payload, md, plot(payload))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
