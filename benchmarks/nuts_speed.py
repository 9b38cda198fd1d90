"""NUTS speed: ``run_nuts`` with the fused potential, with the traced model, and NumPyro's NUTS.

Same model (k = 2, linear experts with intercepts, the default priors), data (the demo's
simulation settings, ``pyromoe.app.demo.DEMO_DATA``), chain starts (the true parameters with
the Laplace jitter of ``run_nuts``, in unconstrained space) and float64 for all three. Reports
seconds of sampling, gradient evaluations (warmup included), ms per gradient evaluation and the
minimum bulk ESS over all parameters per second.

NumPyro (``pip install numpyro jax``, the ``bench`` extra) is skipped with a message when it is not
installed. Its seconds include JAX's compilation (a normal run pays it), and its gradient count is
the sum of its trees' leapfrog steps (warmup included, its step-size search not).

    .venv/bin/python benchmarks/nuts_speed.py            # demo (n=2000, d=5) and n=20000, d=10
    .venv/bin/python benchmarks/nuts_speed.py --quick    # 2 chains x 60 + 60
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import arviz as az
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, machine_section, write_results  # noqa: E402

from pyromoe import MixtureOfExperts, simulate  # noqa: E402
from pyromoe.app.demo import DEMO_DATA  # noqa: E402
from pyromoe.bayes.model import DEFAULT_PRIOR_SCALES  # noqa: E402
from pyromoe.bayes.nuts import _chain_starts, run_nuts  # noqa: E402


def _min_ess(posterior: dict[str, np.ndarray]) -> float:
    """Minimum bulk ESS over every scalar of every site; arrays are (chain, draw, ...)."""
    ess = az.ess(az.convert_to_dataset({k: np.asarray(v) for k, v in posterior.items()}))
    return float(min(float(ess[name].min()) for name in ess.data_vars))


def _pyro(model, data, potential, chains, warmup, samples, seed):
    idata = run_nuts(
        model,
        data.x,
        data.y,
        init=data.truth,
        num_chains=chains,
        num_warmup=warmup,
        num_samples=samples,
        seed=seed,
        progress=False,
        posterior_predictive=False,
        potential=potential,
    )
    posterior = {name: idata.posterior[name].values for name in model.site_shapes}
    return {
        "potential": idata.attrs["potential"],
        "seconds": float(idata.attrs["seconds"]),
        "gradients": int(sum(idata.attrs["num_gradient_evaluations"])),
        "divergences": int(idata.attrs["num_divergences"]),
        "min_ess": _min_ess(posterior),
    }


def _numpyro(model, data, starts, chains, warmup, samples, seed):
    try:
        import jax
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as ndist
        from numpyro.infer import MCMC, NUTS
    except ImportError as error:
        return {"skipped": f"NumPyro not installed ({error}); pip install numpyro jax"}
    numpyro.enable_x64()
    jax.config.update("jax_platform_name", "cpu")
    k, d = model.num_experts, model.in_features
    x, y = jnp.asarray(np.asarray(data.x)), jnp.asarray(np.asarray(data.y))
    scales = DEFAULT_PRIOR_SCALES

    def np_model(x, y):
        a = numpyro.sample(
            "experts.weight",
            # the model's default: the scale of a_i . x, so d ** -0.5 per coefficient
            ndist.Normal(0.0, scales["experts.weight"] / d**0.5).expand((k, d)).to_event(2),
        )
        b = numpyro.sample(
            "experts.bias", ndist.Normal(0.0, scales["experts.bias"]).expand((k,)).to_event(1)
        )
        w = numpyro.sample(
            "gate.weight", ndist.Normal(0.0, scales["gate.weight"]).expand((k - 1, d)).to_event(2)
        )
        c = numpyro.sample(
            "gate.bias", ndist.Normal(0.0, scales["gate.bias"]).expand((k - 1,)).to_event(1)
        )
        sigma = numpyro.sample("noise", ndist.HalfNormal(scales["noise"]))
        means = x @ a.T + b
        logits = jnp.concatenate([jnp.zeros((x.shape[0], 1)), x @ w.T + c], axis=1)
        log_gate = jax.nn.log_softmax(logits, axis=1)
        log_normal = ndist.Normal(means, sigma).log_prob(y[:, None])
        numpyro.factor("y", jax.scipy.special.logsumexp(log_gate + log_normal, axis=1).sum())

    init = {name: jnp.asarray(value.detach().cpu().numpy()) for name, value in starts.items()}
    mcmc = MCMC(
        NUTS(np_model),
        num_warmup=warmup,
        num_samples=samples,
        num_chains=chains,
        chain_method="sequential",
        progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.warmup(
        jax.random.PRNGKey(seed),
        x,
        y,
        init_params=init,
        extra_fields=("num_steps",),
        collect_warmup=True,
    )
    warm_steps = int(np.asarray(mcmc.get_extra_fields()["num_steps"]).sum())
    mcmc.run(mcmc.post_warmup_state.rng_key, x, y, extra_fields=("num_steps", "diverging"))
    draws = mcmc.get_samples(group_by_chain=True)
    jax.block_until_ready(draws)
    seconds = time.perf_counter() - start
    extra = mcmc.get_extra_fields()
    steps = warm_steps + int(np.asarray(extra["num_steps"]).sum())
    divergences = int(np.asarray(extra["diverging"]).sum())
    return {
        "potential": "numpyro",
        "seconds": seconds,
        "gradients": steps,
        "divergences": divergences,
        "min_ess": _min_ess({name: np.asarray(v) for name, v in draws.items()}),
    }


def run_setting(name, n, d, chains, warmup, samples, seed, skip_traced=False):
    data_args = {**DEMO_DATA, "n": n, "in_features": d}
    data = simulate(num_experts=2, link="linear", seed=seed, bias=True, **data_args)
    model = MixtureOfExperts(d, 2, link="linear", bias=True)
    x = torch.as_tensor(data.x)
    starts = _chain_starts(model, x, torch.as_tensor(data.y), data.truth, chains, True, seed)
    rows = {"fused": _pyro(model, data, "fused", chains, warmup, samples, seed)}
    if skip_traced:
        rows["traced"] = {"skipped": "--skip-traced"}
    else:
        rows["traced"] = _pyro(model, data, "traced", chains, warmup, samples, seed)
    rows["numpyro"] = _numpyro(model, data, starts, chains, warmup, samples, seed)
    for row in rows.values():
        if "seconds" in row:
            row["ms_per_gradient"] = 1e3 * row["seconds"] / max(row["gradients"], 1)
            row["min_ess_per_second"] = row["min_ess"] / row["seconds"]
        print(name, row, flush=True)
    return {
        "setting": name,
        "n": n,
        "d": d,
        "k": 2,
        "chains": chains,
        "warmup": warmup,
        "samples": samples,
        "results": rows,
    }


def _markdown(payload) -> str:
    lines = [
        "# NUTS speed: fused potential vs traced model vs NumPyro",
        "",
        f"Run: `benchmarks/nuts_speed.py{payload['flags']}`, seed "
        f"{payload['seed']}, float64, one torch thread, chains one after the other.",
        "",
        "| setting | sampler | seconds | gradients | ms / gradient | min ESS | min ESS / s |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting in payload["settings"]:
        label = (
            f"n={setting['n']}, d={setting['d']}, "
            f"{setting['chains']}x({setting['warmup']}+{setting['samples']})"
        )
        for sampler, row in setting["results"].items():
            if "skipped" in row:
                lines.append(f"| {label} | {sampler} | skipped: {row['skipped']} | | | | |")
                continue
            lines.append(
                f"| {label} | {sampler} | {row['seconds']:.1f} | {row['gradients']} | "
                f"{row['ms_per_gradient']:.3f} | {row['min_ess']:.0f} | "
                f"{row['min_ess_per_second']:.2f} |"
            )
    lines += [
        "",
        "Pyro seconds are `MCMC.run` (the fused potential needs no compilation; the traced one "
        "is `jit_compile=True`, compiled inside the run). NumPyro seconds include JAX "
        "compilation; its gradients are leapfrog steps (warmup included, step-size search not).",
        *machine_section(payload["machine"]),
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 chains x (60 + 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-traced", action="store_true", help="only fused and NumPyro")
    parser.add_argument(
        "--only",
        choices=["demo", "large"],
        help="run one setting; writes results/nuts_speed_<setting>.{json,md}",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = machine_info()
    if args.quick:
        chains, warmup, samples = 2, 60, 60
    else:
        chains, warmup, samples = 4, 250, 250
    shapes = {"demo": (DEMO_DATA["n"], DEMO_DATA["in_features"]), "large": (20000, 10)}
    names = [args.only] if args.only else list(shapes)
    settings = [
        run_setting(name, *shapes[name], chains, warmup, samples, args.seed, args.skip_traced)
        for name in names
    ]
    flags = (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")
    payload = {
        "quick": args.quick,
        "flags": flags,
        "seed": args.seed,
        "machine": info,
        "settings": settings,
    }
    stem = f"nuts_speed_{args.only}" if args.only else "nuts_speed"
    for path in write_results(stem, payload, _markdown(payload)):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
