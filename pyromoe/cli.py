"""The `pyromoe` command line (I/O only: the maths lives in the library)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    from .estimate import MoEEstimate, parameter_errors
    from .models import MixtureOfExperts
    from .simulate import simulate

    n = 500 if args.quick else 2000
    steps = 100 if args.quick else 600
    data = simulate(
        n, 5, num_experts=2, link="linear", noise=0.5, gate="orthogonal", seed=args.seed
    )
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    model = MixtureOfExperts(in_features=5, num_experts=2, link="linear", bias=False)
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(steps):
        svi.step(data.x, data.y)
    median = guide.median(data.x, data.y)
    est = MoEEstimate(
        experts_weight=median["experts.weight"].detach(),
        experts_bias=torch.zeros(2, dtype=data.x.dtype),
        gate_weight=median["gate.weight"].detach(),
        gate_bias=torch.zeros(1, dtype=data.x.dtype),
        noise=median["noise"].detach(),
        link="linear",
        method="svi",
    )
    print(est.summary())
    print("errors vs truth:", parameter_errors(est, data.truth))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyromoe",
        description="Gated Gaussian mixtures of experts in Pyro, started in the right basin.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="simulate a mixture of experts and fit it")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--quick", action="store_true", help="a small, fast run (used by CI)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
