"""tensor_init on tanh data with a generic (non-orthogonal) gate and unequal expert norms
(issue 25 item 1): expert error, gate error, the larger expert's norm and CPU seconds per seed.

    OMP_NUM_THREADS=1 python benchmarks/tanh_generic_gate.py --n 200000 --seeds 0 1 2

Data: ``simulate``'s tanh pair (d = 12, gate norm 2, random gate directions), experts rescaled to
norms 0.7 and 1.4, ``y`` redrawn through the package's mixture sampler with noise 0.5.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import replace

import torch

import pyromoe
from pyromoe.core.likelihood import sample_mixture


def generic_gate_data(n: int, d: int, seed: int, norms=(0.7, 1.4), noise=0.5):
    data = pyromoe.simulate(n, d, 2, "tanh", noise=noise, gate="random", gate_norm=2.0, seed=seed)
    weight = data.truth.experts_weight.clone()
    weight = weight / weight.norm(dim=-1, keepdim=True)
    weight = weight * torch.tensor(norms, dtype=weight.dtype)[:, None]
    truth = replace(data.truth, experts_weight=weight)
    generator = torch.Generator().manual_seed(seed + 1000)
    y, _ = sample_mixture(data.x, truth.params, truth.link, generator)
    return data.x, y, truth


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reference", action="store_true", help="also gate EM from the truth")
    parser.add_argument(
        "--no-scale-refit", action="store_true", help="keep the kappa1 scales (gate fix only)"
    )
    args = parser.parse_args()
    if args.no_scale_refit:
        from pyromoe.estimators import tensor_init as module

        module.SCALE_ROUNDS = 0
    torch.set_num_threads(1)
    for seed in args.seeds:
        x, y, truth = generic_gate_data(args.n, args.d, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            began = time.process_time()
            est = pyromoe.tensor_init(x, y, 2, "tanh", seed=seed)
            cpu = time.process_time() - began
        errors = pyromoe.parameter_errors(est, truth)
        est_p = est.permute(errors["permutation"])
        row = {
            "seed": seed,
            "experts": round(errors["experts"], 4),
            "gate": round(errors["gate"], 4),
            "norms": [round(v, 4) for v in est_p.experts_weight.norm(dim=-1).tolist()],
            "gate_n_iter": est.diagnostics["gate_n_iter"],
            "cpu_seconds": round(cpu, 2),
        }
        if args.reference:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = pyromoe.fit_gate(
                    x, y, truth.experts_weight, None, "tanh", tol=1e-10, max_iter=2000
                )
            given = replace(truth, gate_weight=ref.gate_weight, gate_bias=ref.gate_bias)
            row["gate_from_truth"] = round(pyromoe.parameter_errors(given, truth)["gate"], 4)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
