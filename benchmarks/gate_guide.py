"""Gate guide benchmark: steps and seconds to the gate's MAP point, GateGuide's EM steps against
AutoDelta MAP by gradient, from the same start.

For each n (default 1e3 and 1e4; ``simulate(n, d=5, k=2, bias=True)``): the experts and the noise
are fixed at an ``initialize`` estimate, and the reference is ``fit_gate``'s MAP gate with the
model's Normal(0, 2.5) gate prior (the same objective as the Pyro model's log joint in the gate),
converged to ``tol=1e-13``. From a zero gate:

- ``em``: :class:`pyromoe.GateGuide` (``update="em"``), one ``guide.em_step(x, y)`` per step;
- ``autodelta lr=...``: Pyro's ``AutoDelta`` over the gate sites of the model conditioned on the
  same experts and noise, one ``SVI`` step (``Trace_ELBO``, Adam) per step, at ``fit_map``'s
  default rate 0.01 and at 0.05.

Reported per method: the steps until every gate weight and offset is within ``0.1 / sqrt(n)`` of
the reference (a tenth of the order of the gate's statistical error; ``null`` when not reached in
``--max-steps``), the seconds of those steps (the distance checks excluded; the fastest of ``--repeats`` runs) and per step, and the
distance after the last step run.

Run: ``python benchmarks/gate_guide.py`` (about a minute or two on 2 busy cores) or
``--sizes 1000,10000,100000``. Writes benchmarks/results/gate_guide.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import torch  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoDelta, init_to_value  # noqa: E402
from pyro.optim import Adam  # noqa: E402

from benchmarks._common import (  # noqa: E402
    add_threads_argument,
    machine_info,
    machine_section,
    write_results,
)
from pyromoe import GateGuide, MixtureOfExperts, fit_gate, initialize, simulate, sites  # noqa: E402
from pyromoe.bayes.model import DEFAULT_PRIOR_SCALES  # noqa: E402

D, K = 5, 2
OTHER_SITES = (sites.EXPERTS_WEIGHT, sites.EXPERTS_BIAS, sites.NOISE)
LEARNING_RATES = (0.01, 0.05)


def _distance(point: dict, reference) -> float:
    return max(
        float((point[sites.GATE_WEIGHT] - reference.gate_weight).abs().max()),
        float((point[sites.GATE_BIAS] - reference.gate_bias).abs().max()),
    )


def _race(step, point, reference, tol: float, max_steps: int) -> dict:
    """Run ``step()`` until ``point()`` is within ``tol`` of the reference gate."""
    seconds, reached = 0.0, None
    for number in range(1, max_steps + 1):
        began = time.perf_counter()
        step()
        seconds += time.perf_counter() - began
        distance = _distance(point(), reference)
        if distance < tol:
            reached = number
            break
    return {
        "steps": reached,
        "steps_run": number,
        "seconds": seconds,
        "seconds_per_step": seconds / number,
        "final_distance": distance,
    }


def one_size(n: int, seed: int, max_steps: int, repeats: int) -> dict:
    data = simulate(n, D, K, seed=seed, bias=True)
    x, y = data.x, data.y
    estimate = initialize(x, y, num_experts=K, link="linear", seed=seed)
    scale = DEFAULT_PRIOR_SCALES[sites.GATE_WEIGHT]
    began = time.perf_counter()
    reference = fit_gate(
        x,
        y,
        estimate.experts_weight,
        estimate.experts_bias,
        "linear",
        noise=estimate.noise,
        fit_noise=False,
        prior_scale=scale,
        init_gate_weight=torch.zeros(K - 1, D, dtype=x.dtype),
        tol=1e-13,
        max_iter=500,
    )
    reference_seconds = time.perf_counter() - began
    tol = 0.1 / math.sqrt(n)
    fixed = {name: estimate.site_values()[name].to(x) for name in OTHER_SITES}
    model = MixtureOfExperts(D, K)
    conditioned = poutine.condition(model, data=fixed)

    def em():
        guide = GateGuide(model, init=fixed, fixed=list(fixed))
        return lambda: guide.em_step(x, y), lambda: guide.median(x, y)

    def autodelta(lr: float):
        zero = {  # fresh tensors: AutoDelta's parameters are the start's tensors, moved in place
            sites.GATE_WEIGHT: torch.zeros(K - 1, D, dtype=x.dtype),
            sites.GATE_BIAS: torch.zeros(K - 1, dtype=x.dtype),
        }
        delta = AutoDelta(conditioned, init_loc_fn=init_to_value(values=zero))
        svi = SVI(conditioned, delta, Adam({"lr": lr}), Trace_ELBO())
        return lambda: svi.step(x, y), lambda: delta.median(x, y)

    methods = {
        "em": em,
        **{f"autodelta lr={lr:g}": partial(autodelta, lr) for lr in LEARNING_RATES},
    }
    rows = {}
    for name, build in methods.items():
        runs = []
        for _ in range(repeats):  # the steps are the same each time; the fastest time is kept
            pyro.clear_param_store()
            runs.append(_race(*build(), reference, tol, max_steps))
        rows[name] = min(runs, key=lambda run: run["seconds"])
    return {
        "n": n,
        "tol": tol,
        "initializer": estimate.method,
        "fit_gate_iterations": reference.n_iter,
        "fit_gate_seconds": reference_seconds,
        "methods": rows,
    }


def markdown(results: list[dict], info: dict, command: str, max_steps: int) -> str:
    lines = [
        "# GateGuide: EM steps vs AutoDelta MAP to the gate's MAP point",
        "",
        f"`{command}`. simulate(n, d={D}, k={K}, bias=True); experts and noise fixed at "
        "`initialize`'s estimate; reference: `fit_gate` (MAP, Normal(0, 2.5) gate prior, noise "
        "fixed, tol 1e-13). From a zero gate, steps until every gate weight and offset is within "
        f"0.1/sqrt(n) of the reference (`-`: not within {max_steps} steps). Seconds: the steps "
        "alone, the fastest of `--repeats` runs. The step counts are deterministic; the "
        "timings were taken on a shared machine under load (the load average is in the "
        "machine section), where equal work can take several times as long from one run to "
        "the next: read them as orders of magnitude.",
        "",
        "| n | method | steps to tol | seconds | ms per step | distance after last step |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        for name, row in result["methods"].items():
            steps = "-" if row["steps"] is None else str(row["steps"])
            lines.append(
                f"| {result['n']} | {name} | {steps} | {row['seconds']:.2f} | "
                f"{1000 * row['seconds_per_step']:.1f} | {row['final_distance']:.2g} |"
            )
    lines += ["", "fit_gate itself (the reference, run to tol 1e-13):", ""]
    for result in results:
        lines.append(
            f"- n = {result['n']}: {result['fit_gate_iterations']} EM iterations, "
            f"{result['fit_gate_seconds']:.2f} s (initializer: {result['initializer']})"
        )
    return "\n".join(lines + machine_section(info))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated n")
    parser.add_argument("--max-steps", type=int, default=1000, help="steps per method at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per method; the fastest is reported"
    )
    add_threads_argument(parser)
    args = parser.parse_args()
    try:
        sizes = [int(float(size)) for size in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes takes comma-separated numbers, e.g. 1000,1e4; got {args.sizes!r}")
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    info = machine_info()
    results = [one_size(n, args.seed, args.max_steps, args.repeats) for n in sizes]
    for result in results:
        for name, row in result["methods"].items():
            print(result["n"], name, row["steps"], f"{row['seconds']:.2f}s")
    command = " ".join(["python benchmarks/gate_guide.py", *sys.argv[1:]])
    payload = {
        "results": results,
        "max_steps": args.max_steps,
        "repeats": args.repeats,
        "seed": args.seed,
        "machine": info,
    }
    for path in write_results(
        "gate_guide", payload, markdown(results, info, command, args.max_steps)
    ):
        print("wrote", path)


if __name__ == "__main__":
    main()
