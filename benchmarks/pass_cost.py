"""What one pass over the data costs, as a multiple of a Gram pass (issue 26 item 2).

For each source (in memory; a ``np.load(..., mmap_mode="r")`` memory map) and each chunk size
(the default :func:`pyromoe.core.chunks.default_chunk_size`, 4,096 rows as in
benchmarks/results/scale.md, and 65,536 rows), in one run, the median seconds of:

- ``gram``: one chunked pass of ``x.T @ x`` (the reference, 1.0);
- ``summary``: the summary pass (means, sds, maxima, the NaN check and, for d <=
  :data:`pyromoe.core.summary.GRAM_MAX_FEATURES`, the Gram of the shifted x);
- ``second_moments`` and ``third_moment``: the moment step's two passes, and ``moment_step``:
  the whole moment step (``moment_experts``: both passes, T2, whitening, the tensor power
  method; what ``tensor_init`` reports as ``moment_seconds``), on the source whose summary is
  cached, as in ``initialize`` and ``tensor_init`` (the summary always runs first): the
  second-moment pass takes the summary's Gram;
- ``summary_plus_moment_step``: a fresh summary pass then the moment step, one timed call (the
  work of both, so that moving work between them does not show as a saving);
- ``em_k2_linear``, ``em_k3_linear``, ``em_k2_tanh``, ``em_k3_tanh``: one EM iteration (one pass
  of :func:`pyromoe.core.em.statistics.pass_statistics` and the M-step), the mean of a pair as
  :meth:`pyromoe.core.em.loop.EM.fit` runs them: one pass forming the gate's Hessian, the next
  reusing it (:data:`pyromoe.core.em.loop.LAZY_GATE_HESSIAN`);
- ``gate_irls``: one iteration of gate EM (experts frozen: the gate's IRLS system only), the mean
  of such a pair;

each also divided by the Gram pass of the same source and chunk size. Default n = 1e6, d = 50,
float64 (``--quick``: n = 2e5); ``--device cuda --dtype float32`` runs it on a GPU. On a CPU the
seconds are this process's CPU time (``time.process_time``, with one torch thread), which other
jobs on a shared machine inflate far less than wall time; the wall seconds are reported too.

Run: ``python benchmarks/pass_cost.py [--quick]``; writes benchmarks/results/pass_cost.{json,md}
(``--name`` / ``--out`` for another place). On a shared machine timings are noisy: medians of
``--repeats`` runs, ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import add_threads_argument, machine_info, machine_section  # noqa: E402
from pyromoe import simulate  # noqa: E402
from pyromoe.core.chunks import default_chunk_size  # noqa: E402
from pyromoe.core.em import loop  # noqa: E402
from pyromoe.core.em.loop import EM  # noqa: E402
from pyromoe.core.em.starts import random_start, start_params  # noqa: E402
from pyromoe.core.links import get_link  # noqa: E402
from pyromoe.core.moments import second_moments, whitened_third_moment  # noqa: E402
from pyromoe.core.sources import as_source  # noqa: E402
from pyromoe.core.summary import GRAM_MAX_FEATURES  # noqa: E402
from pyromoe.estimators.moment_step import moment_experts  # noqa: E402

EM_SETTINGS = [(2, "linear"), (3, "linear"), (2, "tanh"), (3, "tanh")]


def _gram(x, y):
    return x.T @ x


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _em_step(source, chunk: int, k: int, link_name: str, update_experts: bool = True):
    link = get_link(link_name)
    generator = torch.Generator().manual_seed(0)
    like = torch.empty(0, dtype=source.dtype, device=source.device)
    params = start_params(random_start(source, None, k, link, generator), like, True)
    em = EM(source, link, update_experts=update_experts, chunk_size=chunk)

    def step():  # two iterations, as EM.fit runs them
        first = em.statistics(params)
        em.m_step(first, params)
        reused = first.gate_hessian if loop.LAZY_GATE_HESSIAN else None
        em.m_step(em.statistics(params, gate_hessian=reused), params)

    step.iterations = 2
    return step


def passes(source, chunk: int) -> dict:
    """The measured calls for one source and chunk size, by name."""
    link = get_link("linear")
    mean = source.summary().x_mean
    d = source.in_features
    projection = torch.eye(d, 2, dtype=torch.float64, device=source.device)
    gram2 = projection.T @ projection

    def summary_then_moment_step():
        source._summary = None  # a fresh summary pass, which the moment step then uses
        source.summary(chunk)
        moment_experts(source, 2, link, None, chunk, 0)

    # the source's summary is cached (main runs it first), so the moment passes find its Gram
    calls = {
        "gram": lambda: source.reduce(_gram, chunk),
        "summary": lambda: source._compute_summary(chunk),
        "second_moments": lambda: second_moments(source, None, chunk_size=chunk),
        "third_moment": lambda: whitened_third_moment(
            source, None, mean, projection, gram2, chunk_size=chunk
        ),
        "moment_step": lambda: moment_experts(source, 2, link, None, chunk, 0),
        "summary_plus_moment_step": summary_then_moment_step,
    }
    for k, name in EM_SETTINGS:
        calls[f"em_k{k}_{name}"] = _em_step(source, chunk, k, name)
    calls["gate_irls"] = _em_step(source, chunk, 2, "linear", update_experts=False)
    return calls


def _ratios(seconds: dict) -> dict:
    gram = seconds["gram"]
    return {
        name: (None if value is None or gram is None else value / gram)
        for name, value in seconds.items()
    }


def measure(source, chunk: int, repeats: int, budget_end: float) -> dict:
    """Median CPU seconds (this process's, ``time.process_time``: other jobs on a shared machine
    do not count) and median wall seconds of each call, and both as multiples of the Gram pass.
    On a GPU the wall time is the measure (the CPU only launches kernels)."""
    device = source.device
    cpu, wall = {}, {}
    for name, call in passes(source, chunk).items():
        if time.perf_counter() > budget_end:
            cpu[name] = wall[name] = None  # not run: the time budget was spent
            continue
        call()  # warm-up
        _synchronise(device)
        cpu_runs, wall_runs = [], []
        for _ in range(repeats):
            if wall_runs and time.perf_counter() > budget_end:
                break  # fewer repeats rather than none
            began, began_cpu = time.perf_counter(), time.process_time()
            call()
            _synchronise(device)
            cpu_runs.append(time.process_time() - began_cpu)
            wall_runs.append(time.perf_counter() - began)
        per = getattr(call, "iterations", 1)  # seconds of one iteration of a timed pair
        cpu[name] = statistics.median(cpu_runs) / per
        wall[name] = statistics.median(wall_runs) / per
    seconds = wall if device.type == "cuda" else cpu
    return {
        "chunk_size": chunk,
        "measure": "wall" if device.type == "cuda" else "cpu",
        "seconds": seconds,
        "gram_passes": _ratios(seconds),
        "wall_seconds": wall,
        "wall_gram_passes": _ratios(wall),
    }


def markdown(result: dict) -> str:
    names = list(result["rows"][0]["seconds"])
    lines = [
        f"# Pass cost: n = {result['n']:,}, d = {result['d']}, {result['dtype']}, "
        f"{result['device']}",
        "",
        "CPU seconds of one pass (this process's `time.process_time`, median of the repeats; "
        "wall seconds on a GPU) as multiples of one chunked Gram pass `x.T @ x` of the same "
        "source and chunk size, all measured in one run; the wall-clock ratios follow. "
        f"Default chunk size: {result['default_chunk_size']:,} rows. " + result["timing_note"],
        "",
        "Targets (issue 26): moment step <= 3 Gram passes, one EM iteration (k = 2, linear, "
        "d = 50) <= 3.5, at n = 1e6 and the default chunk size.",
        "",
        "| source | chunk | Gram s | " + " | ".join(names[1:]) + " |",
        "|---|---|---|" + "---|" * (len(names) - 1),
    ]
    for row in result["rows"]:
        cells = [
            "-" if row["gram_passes"][name] is None else f"{row['gram_passes'][name]:.2f}"
            for name in names[1:]
        ]
        gram = row["seconds"]["gram"]
        lines.append(
            f"| {row['source']} | {row['chunk_size']:,} | "
            f"{'-' if gram is None else f'{gram:.4f}'} | " + " | ".join(cells) + " |"
        )
    lines += ["", "Wall-clock ratios of the same runs (other jobs' load included):", ""]
    lines += ["| source | chunk | Gram s | " + " | ".join(names[1:]) + " |"]
    lines += ["|---|---|---|" + "---|" * (len(names) - 1)]
    for row in result["rows"]:
        ratios, gram = row["wall_gram_passes"], row["wall_seconds"]["gram"]
        cells = ["-" if ratios[name] is None else f"{ratios[name]:.2f}" for name in names[1:]]
        lines.append(
            f"| {row['source']} | {row['chunk_size']:,} | "
            f"{'-' if gram is None else f'{gram:.4f}'} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "`moment_step` is the whole moment step (both moment passes and the small maths after "
        "them) on a source whose summary is cached, as in `initialize` and `tensor_init`; the "
        "summary pass is separate, run once per source and cached. For d <= "
        f"`GRAM_MAX_FEATURES` ({GRAM_MAX_FEATURES}) the summary pass forms the Gram of the shifted x (its "
        "diagonal gives the sds) and the second-moment pass takes it from the cached summary "
        "instead of forming it; `summary_plus_moment_step` times a fresh summary pass and the "
        "moment step together, the total that such a move of work must lower. `em_*` is one EM "
        "iteration (pass and M-step), `gate_irls` one iteration of gate EM with the experts "
        "frozen, each the mean of two as EM runs them: one pass forming the gate's Hessian, the "
        "next reusing it (a lazy Newton step for the gate; the gradient is always fresh).",
        "",
        "What the maths needs: the summary pass one d x d Gram (of x), the second-moment pass "
        "one (of P2(y)-weighted x) and a (3, d) product, the third-moment pass one product of x "
        "with a (d, k) projection; one EM pass at "
        "k = 2 with the gate on the experts' design forms, for the identity link, two weighted "
        "d x d Grams (one expert and the gate's IRLS Hessian; the responsibilities sum to one, "
        "so the other expert's Gram is the design's Gram, kept from the EM object's first pass, "
        "minus the first's), k = 3 five (two experts, three Hessian blocks); other links three "
        "and six (every expert's Gauss-Newton Gram); every second pass leaves out the Hessian's "
        "Grams (one at k = 2, three at k = 3). The timed iterations follow a warm-up pair, "
        "so they are such later passes. "
        "Each weighted Gram is the GEMM of sqrt(w) x with itself after scaling the chunk, so "
        "it costs a Gram pass plus that scaling; everything else in a pass (the products with "
        "the stacked weights, the responsibilities, the right-hand sides and gradients in one "
        "product) is small beside them.",
    ]
    lines += _reconciliation(result)
    lines += machine_section(result["machine_info"])
    return "\n".join(lines)


def _reconciliation(result: dict) -> list[str]:
    """scale.md's view (the summary pass counted in the moment step, everything divided by a
    4,096-row memory-map Gram pass) beside this page's (each pass over the Gram pass of the same
    source and chunk size), from this run's rows."""
    seconds = {(r["source"], r["chunk_size"]): r["seconds"] for r in result["rows"]}
    default = result["default_chunk_size"]
    small = seconds.get(("memmap", 4096))
    if small is None or small["gram"] is None:
        return []
    lines = [
        "",
        "## Against benchmarks/results/scale.md",
        "",
        "scale.md divided the moment step (with the summary pass inside it) and one EM iteration "
        "by a Gram pass over a memory map in 4,096-row chunks. The same quotients from this run, "
        "beside this page's view (each divided by the Gram pass of its own source and chunk size):",
        "",
        "| source | chunk | (summary + moment step) / 4,096-row memmap Gram | moment step / "
        "own Gram | EM k=2 linear / 4,096-row memmap Gram | EM k=2 linear / own Gram |",
        "|---|---|---|---|---|---|",
    ]
    for (kind, chunk), row in seconds.items():
        if chunk != default or row["gram"] is None:
            continue
        parts = [row.get("summary"), row.get("moment_step"), row.get("em_k2_linear")]
        if any(part is None for part in parts):
            continue
        summary, moment, em = parts
        lines.append(
            f"| {kind} | {chunk:,} | {(summary + moment) / small['gram']:.2f} | "
            f"{moment / row['gram']:.2f} | {em / small['gram']:.2f} | {em / row['gram']:.2f} |"
        )
    lines += [
        "",
        "Which view measures a pass's own work: the quotient by the Gram pass of the same source "
        "and chunk size. Both read the same chunks the same way, so reading, copying and the "
        "per-chunk overhead cancel and what is left is the pass's extra arithmetic. A Gram pass "
        "over a memory map in 4,096-row chunks is itself slower than one in memory at the default "
        "chunk size (the Gram column above), so as a unit it hides part of a pass's cost; and "
        "the summary pass runs once per source and is cached (fit_em reads it too), so it is not "
        "part of the moment step.",
    ]
    return lines


def _sources(x, y, device, kinds, folder: Path) -> dict:
    sources = {}
    if "memory" in kinds:
        sources["memory"] = as_source(x.to(device), y.to(device))
    if "memmap" in kinds:
        np.save(folder / "x.npy", x.cpu().numpy())
        np.save(folder / "y.npy", y.cpu().numpy())
        xm = np.load(folder / "x.npy", mmap_mode="r")
        ym = np.load(folder / "y.npy", mmap_mode="r")
        sources["memmap"] = as_source(xm, ym, device=device)
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=float, default=1e6)
    parser.add_argument("--d", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="n = 2e5")
    parser.add_argument("--chunks", nargs="+", type=int, default=None)
    parser.add_argument("--sources", nargs="+", default=["memory", "memmap"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--budget", type=float, default=1e9, help="seconds; later passes skipped")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", default="pass_cost")
    add_threads_argument(parser)
    args = parser.parse_args()
    began = time.perf_counter()
    torch.set_num_threads(args.threads)
    n = int(2e5 if args.quick else args.n)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    default = default_chunk_size(args.d)
    # the default chunk size is always measured
    chunks = sorted({default, *(args.chunks or [4096, 65_536])})
    # drawn on the device unless a memory map (a file on the host) is measured too
    where = torch.device("cpu") if "memmap" in args.sources else device
    data = simulate(n, args.d, 2, seed=0, dtype=dtype, device=where)
    rows = []
    info = machine_info()

    def write() -> None:  # after every row: a run stopped by a timeout keeps what it measured
        result = {
            "n": n,
            "d": args.d,
            "dtype": args.dtype,
            "device": str(device),
            "default_chunk_size": default,
            "repeats": args.repeats,
            "rows": rows,
            "timing_note": (
                "One torch thread; CPU time of this process (other jobs' load, in the machine "
                "section, inflates it less than wall time), medians, ratios within one run."
                if device.type == "cpu"
                else "Timings on one GPU (torch.cuda.synchronize after each call)."
            ),
            "seconds_total": time.perf_counter() - began,
            "machine_info": info,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{args.name}.md").write_text(markdown(result))

    with tempfile.TemporaryDirectory() as folder:
        sources = _sources(data.x, data.y, device, args.sources, Path(folder))
        del data
        for kind, source in sources.items():
            source.summary()
            for chunk in chunks:
                row = measure(source, chunk, args.repeats, began + args.budget)
                row["source"] = kind
                rows.append(row)
                write()
                print(kind, chunk, {k: v and round(v, 2) for k, v in row["gram_passes"].items()})
        del sources
    print(args.out / f"{args.name}.md")


if __name__ == "__main__":
    main()
