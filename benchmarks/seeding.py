"""Seeding benchmark: NUTS and SVI started at the moment estimate vs Pyro's default initialisation.

For each setting (k = 2, 3; linear and tanh experts; and similar experts, pairwise cosine 0.8,
where default starts go astray: docs/algorithm.md section 5) on ``simulate(n=2000, d=5, sigma=0.5)``:

- ``seeded``: ``tensor_init(refine=True)`` (moments -> gate EM -> joint EM, best of it and two random
  EM starts by likelihood; when ``tensor_init`` refuses the data it falls back to
  ``fit_em(n_init=5)``, recorded as ``seed_method``), then ``run_nuts(init=estimate)`` with
  Laplace-jittered chain starts, and ``fit_svi(init=estimate)``;
- ``default``: ``run_nuts(init=None)`` / ``fit_svi(init=None)``: Pyro's own initialisation.

Reported per run: wall time (the seed's time is reported separately and included in
``total_seconds``), max r_hat over all scalar parameters on the raw draws and after relabelling
every draw to the truth (``align_labels``), whether r_hat <= 1.01 was reached, min ess_bulk,
divergences, the number of chains in a wrong mode (per-chain mean log-likelihood more than
``WRONG_MODE_NATS`` below the best chain's), the max expert error of the posterior mean (aligned)
and, for SVI, the final ELBO (mean of the last 10% of steps) and the expert error of the guide's mean.

Run: ``python benchmarks/seeding.py --quick`` (4 chains x 250 + 250, one data set per setting,
plus the issue's own setting at 4 x 500 + 500; ~25 min on 2 busy cores) or without ``--quick`` (4 x 500 + 500, three data sets per setting: long).
Writes benchmarks/results/seeding.{json,md,png}.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import arviz as az  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import machine_info, machine_section, quiet_fit, write_results  # noqa: E402
from pyromoe import MixtureOfExperts, parameter_errors, simulate, sites  # noqa: E402
from pyromoe.bayes.nuts import run_nuts  # noqa: E402
from pyromoe.bayes.svi import fit_svi  # noqa: E402
from pyromoe.core.estimate import MoEEstimate  # noqa: E402
from pyromoe.core.labels import align_labels  # noqa: E402
from pyromoe.estimators.em import fit_em  # noqa: E402
from pyromoe.estimators.tensor_init import tensor_init  # noqa: E402

N, D, NOISE = 2000, 5, 0.5
WRONG_MODE_NATS = 10.0
SETTINGS = [
    # (name, k, link, expert_cosine)
    ("k2 linear", 2, "linear", None),
    ("k3 linear", 3, "linear", None),
    ("k2 tanh", 2, "tanh", None),
    ("k3 tanh", 3, "tanh", None),
    ("k2 linear cos0.8", 2, "linear", 0.8),
    ("k3 linear cos0.8", 3, "linear", 0.8),
]


def gate_for(k: int) -> str:
    # as benchmarks/recovery.py: random gates for k = 2, orthogonal to the experts for k = 3
    return "random" if k == 2 else "orthogonal"


def seed_estimate(data, k: int, link: str, seed: int) -> tuple[MoEEstimate, str, float]:
    start = time.perf_counter()
    try:
        estimate = tensor_init(data.x, data.y, k, link, seed=seed, refine=True)
        method = estimate.method
    except ValueError as error:  # "the data look like fewer than k experts" etc.
        estimate = fit_em(data.x, data.y, k, link, n_init=5, seed=seed)
        method = f"em x5 (tensor_init refused: {str(error)[:60]}...)"
    return estimate, method, time.perf_counter() - start


def _max_rhat(samples: dict) -> float:
    posterior = {name: np.asarray(value) for name, value in samples.items()}
    rhat = az.rhat(az.convert_to_inference_data(posterior))
    return float(max(float(np.nanmax(rhat[name].values)) for name in rhat.data_vars))


def nuts_row(model, data, init, num_warmup, num_samples, seed) -> dict:
    draws = dict(num_chains=4, num_warmup=num_warmup, num_samples=num_samples)
    idata = quiet_fit(run_nuts, model, data.x, data.y, init, seed=seed, **draws)
    raw = {name: torch.as_tensor(idata.posterior[name].values) for name in model.site_shapes}
    aligned, info = align_labels(raw, data.truth)
    chain_ll = np.asarray(idata.attrs["chain_mean_log_likelihood"])
    gaps = chain_ll.max() - chain_ll
    summary = az.summary(
        az.convert_to_inference_data({name: value.numpy() for name, value in aligned.items()}),
        kind="diagnostics",
    )
    mean = {name: value.mean((0, 1)) for name, value in aligned.items()}
    truth = data.truth.site_values(bias=True)
    error = float((mean[sites.EXPERTS_WEIGHT] - truth[sites.EXPERTS_WEIGHT]).norm(dim=-1).max())
    rhat_aligned = _max_rhat(aligned)
    return {
        "seconds": idata.attrs["seconds"],
        "max_rhat_raw": _max_rhat(raw),
        "max_rhat_aligned": rhat_aligned,
        "converged": bool(rhat_aligned <= 1.01),
        "min_ess_bulk": float(summary["ess_bulk"].min()),
        "divergences": idata.attrs["num_divergences"],
        "chain_log_likelihood_gap": gaps.round(2).tolist(),
        "chains_in_wrong_mode": int((gaps > WRONG_MODE_NATS).sum()),
        "draws_relabelled_to_truth": info["num_draws_relabelled"],
        "expert_error_of_posterior_mean": error,
        "mean_tree_depth": float(idata.sample_stats["tree_depth"].mean()),
        "gradient_evaluations": int(sum(idata.attrs["num_gradient_evaluations"])),
    }


def svi_row(model, data, init, num_steps, seed) -> dict:
    steps = dict(num_steps=num_steps, lr=0.01, num_samples=200)
    idata = quiet_fit(fit_svi, model, data.x, data.y, init, seed=seed, **steps)
    raw = {name: torch.as_tensor(idata.posterior[name].values) for name in model.site_shapes}
    aligned, _ = align_labels(raw, data.truth)
    mean = aligned[sites.EXPERTS_WEIGHT].mean((0, 1))
    error = float((mean - data.truth.experts_weight).norm(dim=-1).max())
    return {
        "seconds": idata.attrs["seconds"],
        "final_elbo": idata.attrs["final_elbo"],
        "expert_error_of_guide_mean": error,
    }


def run_setting(name, k, link, cosine, seed, num_warmup, num_samples, num_steps) -> dict:
    data = simulate(
        N, D, k, link, NOISE, gate=gate_for(k), seed=seed, expert_cosine=cosine, bias=False
    )
    model = MixtureOfExperts(D, k, link, bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimate, method, seed_seconds = seed_estimate(data, k, link, seed)
        row = {
            "setting": name,
            "k": k,
            "link": link,
            "expert_cosine": cosine,
            "seed": seed,
            "num_warmup": num_warmup,
            "num_samples": num_samples,
            "seed_method": method,
            "seed_seconds": seed_seconds,
            "seed_expert_error": parameter_errors(estimate, data.truth)["experts"],
        }
        for label, init in (("seeded", estimate), ("default", None)):
            nuts = nuts_row(model, data, init, num_warmup, num_samples, seed)
            nuts["total_seconds"] = nuts["seconds"] + (seed_seconds if init else 0.0)
            row[f"nuts_{label}"] = nuts
            row[f"svi_{label}"] = svi_row(model, data, init, num_steps, seed)
            print(name, seed, label, nuts, row[f"svi_{label}"], flush=True)
    return row


def run(quick: bool) -> dict:
    seeds = [0] if quick else [0, 1, 2]
    draws = 250 if quick else 500
    num_steps = 1500 if quick else 3000
    rows = []
    if quick:
        # the acceptance setting at its full length: simulate(2000, 5, 2, linear, 0.5, seed 0)
        rows.append(run_setting("issue 5: k2 linear", 2, "linear", None, 0, 500, 500, num_steps))
    for name, k, link, cosine in SETTINGS:
        for seed in seeds:
            rows.append(run_setting(name, k, link, cosine, seed, draws, draws, num_steps))
    return {
        "n": N,
        "d": D,
        "noise": NOISE,
        "num_chains": 4,
        "svi_steps": num_steps,
        "wrong_mode_nats": WRONG_MODE_NATS,
        "rows": rows,
    }


def markdown(result: dict, info: dict) -> str:
    lines = [
        "# Seeded vs default-initialised NUTS and SVI",
        "",
        f"`simulate(n={result['n']}, d={result['d']}, sigma={result['noise']})`; NUTS "
        f"{result['num_chains']} chains x (warmup + draws as listed) (jit, chains one after "
        "another on this machine, 1 torch thread); "
        f"SVI AutoNormal {result['svi_steps']} Adam steps (lr 0.01). Wrong mode: per-chain mean "
        f"log-likelihood more than {result['wrong_mode_nats']:.0f} nats below the best chain. "
        "r_hat: max over scalar parameters, raw and after relabelling every draw to the truth.",
        "",
        "| setting | seed | init | warmup+draws | NUTS s (+seed s) | gradients | r_hat raw "
        "| r_hat aligned | converged "
        "| min ess | div | wrong chains | expert err | SVI s | final ELBO | SVI expert err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        for label in ("seeded", "default"):
            nuts, svi = row[f"nuts_{label}"], row[f"svi_{label}"]
            seed_s = f" (+{row['seed_seconds']:.1f})" if label == "seeded" else ""
            lines.append(
                f"| {row['setting']} | {row['seed']} | {label} | "
                f"{row['num_warmup']}+{row['num_samples']} | {nuts['seconds']:.0f}{seed_s} | "
                f"{nuts.get('gradient_evaluations', float('nan')):.0f} | "
                f"{nuts['max_rhat_raw']:.3f} | {nuts['max_rhat_aligned']:.3f} | "
                f"{'yes' if nuts['converged'] else 'no'} | {nuts['min_ess_bulk']:.0f} | "
                f"{nuts['divergences']} | {nuts['chains_in_wrong_mode']} | "
                f"{nuts['expert_error_of_posterior_mean']:.3f} | {svi['seconds']:.0f} | "
                f"{svi['final_elbo']:.1f} | {svi['expert_error_of_guide_mean']:.3f} |"
            )
    seeded = [r["nuts_seeded"] for r in result["rows"]]
    default = [r["nuts_default"] for r in result["rows"]]
    lines += [
        "",
        f"Converged (aligned r_hat <= 1.01): seeded {sum(r['converged'] for r in seeded)}"
        f"/{len(seeded)}, default {sum(r['converged'] for r in default)}/{len(default)}. "
        f"Chains in a wrong mode: seeded {sum(r['chains_in_wrong_mode'] for r in seeded)}"
        f"/{4 * len(seeded)}, default {sum(r['chains_in_wrong_mode'] for r in default)}"
        f"/{4 * len(default)}. NUTS wall time, total: seeded "
        f"{sum(r['total_seconds'] for r in seeded):.0f} s (seed included), default "
        f"{sum(r['total_seconds'] for r in default):.0f} s. Gradient evaluations (all chains, "
        f"warmup included; independent of machine load): seeded "
        f"{sum(r.get('gradient_evaluations', 0) for r in seeded)}, default "
        f"{sum(r.get('gradient_evaluations', 0) for r in default)}. Wall times on a shared "
        "machine vary with its load (see the load average below); compare gradient counts.",
        "",
        "Seed methods: "
        + "; ".join(
            f"{r['setting']} seed {r['seed']}: {r['seed_method']} (expert error "
            f"{r['seed_expert_error']:.3f})"
            for r in result["rows"]
        ),
        *machine_section(info),
    ]
    return "\n".join(lines)


def figure(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['setting']}\nseed {r['seed']}" for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    for offset, label, colour in ((-0.2, "seeded", "tab:blue"), (0.2, "default", "tab:orange")):
        nuts = [r[f"nuts_{label}"] for r in rows]
        axes[0].bar(x + offset, [r["total_seconds"] for r in nuts], 0.4, label=label, color=colour)
        axes[1].bar(
            x + offset, [r["max_rhat_aligned"] - 1 for r in nuts], 0.4, label=label, color=colour
        )
        axes[2].bar(
            x + offset, [r["chains_in_wrong_mode"] for r in nuts], 0.4, label=label, color=colour
        )
        axes[3].bar(
            x + offset,
            [r.get("gradient_evaluations", 0) for r in nuts],
            0.4,
            label=label,
            color=colour,
        )
    axes[0].set_ylabel("NUTS wall time incl. seed (s)")
    axes[1].set_ylabel("max r_hat - 1 (aligned to truth)")
    axes[1].set_yscale("log")
    axes[1].axhline(0.01, color="k", linestyle="--", linewidth=1)
    axes[2].set_ylabel("chains in a wrong mode (of 4)")
    axes[3].set_ylabel("gradient evaluations, 4 chains incl. warmup")
    for axis in axes:
        axis.set_xticks(x)
        axis.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        axis.legend()
    fig.suptitle("Seeded (tensor start) vs default-initialised NUTS")
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one data set per setting, 250 + 250 draws (plus the issue's 500 + 500 run)",
    )
    args = parser.parse_args(argv)
    # one torch thread for everything (run_nuts does this by default): small tensors, busy cores
    torch.set_num_threads(1)
    info = machine_info()
    start = time.perf_counter()
    result = run(args.quick)
    result["quick"] = args.quick
    result["total_benchmark_seconds"] = time.perf_counter() - start
    result["machine"] = info
    paths = write_results("seeding", result, markdown(result, info), figure(result))
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
