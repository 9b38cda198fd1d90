"""NUTS speed: seeded ``run_nuts`` (fused potential) against NumPyro's NUTS, compile excluded and
included.

Same model (k = 2, linear experts with intercepts, the default priors), data (the demo's
simulation settings, ``pyromoe.app.demo.DEMO_DATA``, at n = 2000, d = 5 and n = 20000, d = 10),
chain starts (the true parameters with the Laplace jitter of ``run_nuts``, in unconstrained
space), float64 and one thread for both (``torch.set_num_threads(1)``; XLA's CPU client with one
intra-op thread). Chains run one after the other in both.

Both engines run twice in the same process, alternately (NumPyro, pyromoe, NumPyro, pyromoe), so
that a busy machine slows both alike. Compile included: the first runs' wall time (NumPyro's
includes JAX's compilation; pyromoe compiles nothing). Compile excluded: the second runs' wall
time less the time JAX spent tracing, lowering and compiling during it (``jax.monitoring``
events; NumPyro 0.22 compiles its sampling loop again on a second run of the same ``MCMC``).
Reports, per run, the seconds (pyromoe: the whole ``run_nuts`` call, and ``MCMC.run`` alone),
the gradient evaluations (leapfrog steps, warmup included; pyromoe also counts its step-size
search), ms per gradient inside the sampler, the minimum bulk ESS over all parameters and ESS per
second. It also times one potential-and-gradient evaluation alone (pyromoe's
``FusedPotential.value_and_grad`` against ``jax.jit(jax.value_and_grad(potential_fn))`` of the
NumPyro model), alternately, median of repeated blocks, and Pyro's NUTS alone per leapfrog step
(on a standard normal potential of the same dimension).

NumPyro (``pip install numpyro jax``, the ``bench`` extra) is skipped with a message when it is not
installed. ``--traced`` adds ``run_nuts(potential="traced")`` (Pyro's traced model) once.

    .venv/bin/python benchmarks/nuts_speed.py                # demo 4x(250+250), large 2x(150+150)
    .venv/bin/python benchmarks/nuts_speed.py --only demo    # one setting
    .venv/bin/python benchmarks/nuts_speed.py --quick        # 2 chains x 60 + 60
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

# one XLA intra-op thread, set before JAX is imported (the torch side uses one thread too)
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import arviz as az  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, machine_section, write_results  # noqa: E402

from pyromoe import MixtureOfExperts, simulate  # noqa: E402
from pyromoe.app.demo import DEMO_DATA  # noqa: E402
from pyromoe.bayes.model import DEFAULT_PRIOR_SCALES  # noqa: E402
from pyromoe.bayes.nuts import _chain_starts, run_nuts  # noqa: E402
from pyromoe.bayes.potential import fused_potential  # noqa: E402


def _min_ess(posterior: dict[str, np.ndarray]) -> float:
    """Minimum bulk ESS over every scalar of every site; arrays are (chain, draw, ...)."""
    ess = az.ess(az.convert_to_dataset({k: np.asarray(v) for k, v in posterior.items()}))
    return float(min(float(ess[name].min()) for name in ess.data_vars))


def _pyromoe(model, data, potential, chains, warmup, samples, seed):
    start = time.perf_counter()
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
    seconds = time.perf_counter() - start
    posterior = {name: idata.posterior[name].values for name in model.site_shapes}
    return {
        "engine": f"pyromoe ({idata.attrs['potential']})",
        "wall_seconds": seconds,
        "compile_seconds": 0.0,  # nothing compiled
        "sampler_seconds": float(idata.attrs["seconds"]),
        "gradients": int(sum(idata.attrs["num_gradient_evaluations"])),
        "divergences": int(idata.attrs["num_divergences"]),
        "min_ess": _min_ess(posterior),
    }


def _numpyro_model(k, d):
    """The NumPyro twin of ``MixtureOfExperts(d, k, link="linear", bias=True)``."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist

    scales = DEFAULT_PRIOR_SCALES

    def model(x, y):
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

    return model


#: JAX's compilation events (tracing, lowering, XLA compilation), whose durations are the compile
#: time of a NumPyro run (NumPyro 0.22 compiles its sampling loop again on a second run)
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


class _NumPyro:
    """One NumPyro ``MCMC`` object, run again and again; each run's compile time is the sum of
    JAX's compilation events during it (``jax.monitoring``)."""

    def __init__(self, model, data, starts, chains, warmup, samples, seed):
        import jax
        import jax.numpy as jnp
        import numpyro
        from numpyro.infer import MCMC, NUTS

        numpyro.enable_x64()
        jax.config.update("jax_platform_name", "cpu")
        self.jax = jax
        self.compile_seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        self.np_model = _numpyro_model(model.num_experts, model.in_features)
        self.x = jnp.asarray(np.asarray(data.x))
        self.y = jnp.asarray(np.asarray(data.y))
        self.init = {k: jnp.asarray(v.detach().cpu().numpy()) for k, v in starts.items()}
        self.seed = seed
        self.mcmc = MCMC(
            NUTS(self.np_model),
            num_warmup=warmup,
            num_samples=samples,
            num_chains=chains,
            chain_method="sequential",
            progress_bar=False,
        )

    def _on_event(self, event, duration, **kwargs):
        if event in _COMPILE_EVENTS:
            self.compile_seconds += duration

    def run(self):
        jax, mcmc = self.jax, self.mcmc
        self.compile_seconds = 0.0
        start = time.perf_counter()
        mcmc.warmup(
            jax.random.PRNGKey(self.seed),
            self.x,
            self.y,
            init_params=self.init,
            extra_fields=("num_steps",),
            collect_warmup=True,
        )
        warm_steps = int(np.asarray(mcmc.get_extra_fields()["num_steps"]).sum())
        mcmc.run(
            mcmc.post_warmup_state.rng_key,
            self.x,
            self.y,
            extra_fields=("num_steps", "diverging"),
        )
        draws = mcmc.get_samples(group_by_chain=True)
        jax.block_until_ready(draws)
        seconds = time.perf_counter() - start
        extra = mcmc.get_extra_fields()
        return {
            "engine": "numpyro",
            "wall_seconds": seconds,
            "compile_seconds": self.compile_seconds,
            "sampler_seconds": seconds - self.compile_seconds,
            "gradients": warm_steps + int(np.asarray(extra["num_steps"]).sum()),
            "divergences": int(np.asarray(extra["diverging"]).sum()),
            "min_ess": _min_ess({name: np.asarray(v) for name, v in draws.items()}),
        }

    def gradient_fn(self):
        """``theta -> (potential, gradient)`` of the model, compiled, and its argument."""
        from numpyro.infer.util import initialize_model

        info = initialize_model(
            self.jax.random.PRNGKey(0), self.np_model, model_args=(self.x, self.y)
        )
        fn = self.jax.jit(self.jax.value_and_grad(info.potential_fn))
        point = {name: value[0] for name, value in self.init.items()}
        self.jax.block_until_ready(fn(point))  # compiled here
        return lambda: self.jax.block_until_ready(fn(point))


def _gradient_timings(model, data, starts, numpyro, repeats=7, calls=200):
    """ms per potential-and-gradient evaluation alone, pyromoe and NumPyro alternately: the
    median over ``repeats`` blocks of ``calls`` evaluations each."""
    x, y = torch.as_tensor(data.x), torch.as_tensor(data.y)
    fused = fused_potential(model, x, y)
    theta = fused.to_flat({name: value[0] for name, value in starts.items()})
    engines = {"pyromoe": lambda: fused.value_and_grad(theta)}
    if numpyro is not None:
        engines["numpyro"] = numpyro.gradient_fn()
    times = {name: [] for name in engines}
    for _ in range(repeats):
        for name, fn in engines.items():
            fn()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append(1e3 * (time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in times.items()}


def _pyro_tree_ms(num_params: int, seed: int, steps: int = 100) -> float:
    """ms per leapfrog step of Pyro's NUTS alone: one chain of ``steps`` warmup and ``steps``
    draws on a standard normal potential in ``num_params`` dimensions (one flat site, a
    closed-form gradient as pyromoe's kernel gives it), so almost all of it is tree building."""
    import pyro
    from pyro.infer import MCMC, NUTS

    from pyromoe.bayes.potential import with_gradient

    count = [0]

    def potential(params):
        count[0] += 1
        theta = params["_flat"]
        value = 0.5 * torch.dot(theta.detach(), theta.detach())
        return with_gradient(theta, value, theta.detach())

    pyro.set_rng_seed(seed)
    start = {"_flat": torch.zeros(num_params, dtype=torch.float64)}
    mcmc = MCMC(
        NUTS(potential_fn=potential),
        num_samples=steps,
        warmup_steps=steps,
        initial_params=start,
        disable_progbar=True,
    )
    begin = time.perf_counter()
    mcmc.run()
    return 1e3 * (time.perf_counter() - begin) / count[0]


def _numpyro_or_reason(model, data, starts, chains, warmup, samples, seed):
    try:
        return _NumPyro(model, data, starts, chains, warmup, samples, seed), None
    except ImportError as error:
        return None, f"NumPyro not installed ({error}); pip install numpyro jax"


def run_setting(name, n, d, chains, warmup, samples, seed, traced=False):
    data_args = {**DEMO_DATA, "n": n, "in_features": d}
    data = simulate(num_experts=2, link="linear", seed=seed, bias=True, **data_args)
    model = MixtureOfExperts(d, 2, link="linear", bias=True)
    x = torch.as_tensor(data.x)
    starts = _chain_starts(model, x, torch.as_tensor(data.y), data.truth, chains, True, seed)
    numpyro, reason = _numpyro_or_reason(model, data, starts, chains, warmup, samples, seed)
    runs = []
    for label in ("first", "second"):  # alternately, in one process
        if numpyro is not None:
            runs.append({"run": label, "load": os.getloadavg()[0], **numpyro.run()})
            print(name, runs[-1], flush=True)
        runs.append(
            {
                "run": label,
                "load": os.getloadavg()[0],
                **_pyromoe(model, data, "fused", chains, warmup, samples, seed),
            }
        )
        print(name, runs[-1], flush=True)
    if traced:
        row = _pyromoe(model, data, "traced", chains, warmup, samples, seed)
        runs.append({"run": "first", "load": os.getloadavg()[0], **row})
    for row in runs:
        # compile excluded: the wall time less JAX's compilation (pyromoe compiles nothing)
        row["seconds"] = row["wall_seconds"] - row["compile_seconds"]
        row["ms_per_gradient"] = 1e3 * row["sampler_seconds"] / max(row["gradients"], 1)
        row["min_ess_per_second"] = row["min_ess"] / row["seconds"]
        row["min_ess_per_wall_second"] = row["min_ess"] / row["wall_seconds"]
    gradient_ms = _gradient_timings(model, data, starts, numpyro)
    num_params = sum(math.prod(shape) for shape in model.site_shapes.values())
    gradient_ms["pyro tree building alone (per step)"] = _pyro_tree_ms(num_params, seed)
    print(name, "ms per gradient alone", gradient_ms, flush=True)
    return {
        "setting": name,
        "n": n,
        "d": d,
        "k": 2,
        "chains": chains,
        "warmup": warmup,
        "samples": samples,
        "numpyro_skipped": reason,
        "runs": runs,
        "gradient_ms_alone": gradient_ms,
        "ratios": _ratios(runs, gradient_ms),
    }


def _ratios(runs, gradient_ms) -> dict:
    """pyromoe (fused) over NumPyro. Compile included: the first runs' wall seconds (ESS per wall
    second the other way round). Compile excluded: the second runs' seconds less compilation, and
    ms per gradient in the sampler."""
    rows = {(row["engine"], row["run"]): row for row in runs}
    out = {}
    first = rows.get(("pyromoe (fused)", "first")), rows.get(("numpyro", "first"))
    second = rows.get(("pyromoe (fused)", "second")), rows.get(("numpyro", "second"))
    if None not in first:
        ours, theirs = first
        out["seconds_compile_included"] = ours["wall_seconds"] / theirs["wall_seconds"]
        out["ess_per_second_compile_included"] = (
            ours["min_ess_per_wall_second"] / theirs["min_ess_per_wall_second"]
        )
    if None not in second:
        ours, theirs = second
        out["seconds_compile_excluded"] = ours["seconds"] / theirs["seconds"]
        out["ess_per_second_compile_excluded"] = (
            ours["min_ess_per_second"] / theirs["min_ess_per_second"]
        )
        out["ms_per_gradient_in_sampler"] = ours["ms_per_gradient"] / theirs["ms_per_gradient"]
    if "numpyro" in gradient_ms:
        out["ms_per_gradient_alone"] = gradient_ms["pyromoe"] / gradient_ms["numpyro"]
    return out


def _markdown(payload) -> str:
    lines = [
        "# NUTS speed: seeded run_nuts (fused potential) vs NumPyro",
        "",
        f"Run: `benchmarks/nuts_speed.py{payload['flags']}`, seed {payload['seed']}, float64, "
        "one thread for torch and for XLA, chains one after the other, both engines in one "
        "process, alternately (NumPyro, pyromoe, NumPyro, pyromoe). **Timed on a shared 2-core "
        "machine under load from other jobs** (`load` is the 1-minute load average when each "
        "run started): compare the engines within one setting, not across runs of the script.",
        "",
        "| setting | engine | run | load | wall s | compile s | wall - compile s | sampler s "
        "| gradients | ms / gradient | min ESS | ESS / s (no compile) | ESS / wall s | div. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in payload["settings"]:
        label = (
            f"n={setting['n']}, d={setting['d']}, "
            f"{setting['chains']}x({setting['warmup']}+{setting['samples']})"
        )
        for row in setting["runs"]:
            lines.append(
                f"| {label} | {row['engine']} | {row['run']} | {row['load']:.1f} | "
                f"{row['wall_seconds']:.1f} | {row['compile_seconds']:.1f} | "
                f"{row['seconds']:.1f} | {row['sampler_seconds']:.1f} | {row['gradients']} | "
                f"{row['ms_per_gradient']:.3f} | {row['min_ess']:.0f} | "
                f"{row['min_ess_per_second']:.2f} | {row['min_ess_per_wall_second']:.2f} | "
                f"{row['divergences']} |"
            )
        if setting["numpyro_skipped"]:
            lines.append(f"| {label} | numpyro | skipped: {setting['numpyro_skipped']} |")
    lines += ["", "Ratios, pyromoe over NumPyro (time: lower is better; ESS/s: higher is better):"]
    lines += ["", "| setting | ratio | value |", "|---|---|---|"]
    for setting in payload["settings"]:
        for key, value in setting["ratios"].items():
            lines.append(f"| n={setting['n']}, d={setting['d']} | {key} | {value:.2f} |")
    lines += [
        "",
        "ms per potential-and-gradient evaluation alone (median of 7 blocks of 200), and ms per "
        "leapfrog step of Pyro's NUTS alone (one chain of 100 + 100 on a standard normal "
        "potential of the same dimension, one flat site: its tree building and integrator):",
    ]
    lines += ["", "| setting | engine | ms |", "|---|---|---|"]
    for setting in payload["settings"]:
        for engine, ms in setting["gradient_ms_alone"].items():
            lines.append(f"| n={setting['n']}, d={setting['d']} | {engine} | {ms:.3f} |")
    lines += [
        "",
        "pyromoe's wall seconds are the whole `run_nuts` call (chain starts, sampling, "
        "InferenceData; no posterior predictive), `sampler s` its `MCMC.run`; it compiles "
        "nothing. NumPyro's wall seconds are warmup and sampling; `compile s` is the time JAX "
        "spent tracing, lowering and compiling during the run (`jax.monitoring` events): the "
        "first run compiles everything, and NumPyro 0.22 compiles its sampling loop again on the "
        "second run of the same `MCMC` object, so compile excluded is the wall time less it. "
        "ms / gradient is sampler seconds (NumPyro: wall less compile) over gradient "
        "evaluations, so it includes each engine's tree building. NumPyro's gradients are "
        "leapfrog steps (warmup included, step-size search not).",
        *machine_section(payload["machine"]),
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 chains x (60 + 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--traced", action="store_true", help="also run the traced model once")
    parser.add_argument(
        "--only",
        choices=["demo", "large"],
        help="run one setting; writes results/nuts_speed_<setting>.{json,md}",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = machine_info()
    # (n, d, chains, warmup, draws); the large setting is there for ms per gradient, which needs
    # no long run: 2 chains x (150 + 150) keep the script within minutes on a busy machine
    shapes = {
        "demo": (DEMO_DATA["n"], DEMO_DATA["in_features"], 4, 250, 250),
        "large": (20000, 10, 2, 150, 150),
    }
    if args.quick:
        shapes = {name: (n, d, 2, 60, 60) for name, (n, d, *_) in shapes.items()}
    names = [args.only] if args.only else list(shapes)
    settings = [run_setting(name, *shapes[name], args.seed, args.traced) for name in names]
    flags = (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")
    flags += " --traced" if args.traced else ""
    payload = {
        "quick": args.quick,
        "flags": flags,
        "seed": args.seed,
        "machine": info,
        "settings": settings,
    }
    stem = f"nuts_speed_{args.only}" if args.only else "nuts_speed"
    if args.quick:
        stem += "_quick"
    for path in write_results(stem, payload, _markdown(payload)):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
