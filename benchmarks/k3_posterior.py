"""k = 3 posteriors with similar experts (issue 25 item 2): multimodal or badly conditioned?

Setting: ``simulate(n=5000, d=5, k=3, "linear", gate="orthogonal", expert_cosine=0.8)`` on a few
data seeds; every run is ``run_nuts`` seeded by ``pyromoe.initialize`` (draws relabelled to the
estimate, pyromoe's relabelling). Per run it records:

- convergence: max r_hat after relabelling (and per site), divergent draws (per chain), the
  check of :mod:`pyromoe.bayes.convergence`;
- multimodality: each chain's mean log-likelihood (gap to the best chain, nats) and its
  parameter means (the largest distance of a chain's mean from the pooled mean, in pooled sds);
- conditioning: where divergent draws sit (each scalar parameter's standardised shift of the
  divergent draws against all draws, the largest listed; the gate's norm and the noise at
  divergent draws as quantiles of their chain's draws: a funnel shows divergences at one end of a
  scale), the adapted step size, tree depth, gradient evaluations;
- cost: seconds (on a shared, loaded machine: compare gradient evaluations).

Variants (the fixes a user can choose): ``base`` (diagonal mass, target 0.8, the given warm-up),
``dense`` (``full_mass=True``), ``warmup`` (three times the warm-up), ``gate_prior`` (gate
weights and biases Normal(0, 1) instead of the default 2.5), ``target`` (target_accept_prob 0.95),
``long`` (three times the draws).

Run: ``python benchmarks/k3_posterior.py --seeds 0 1 2 --variants base dense`` appends one JSON
line per run to benchmarks/results/k3_posterior.jsonl (runs already there are skipped: resumable);
``--report`` writes benchmarks/results/k3_posterior.{json,md} from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import arviz as az  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import RESULTS, machine_info, machine_section, write_results  # noqa: E402
from pyromoe import MixtureOfExperts, initialize, simulate, sites  # noqa: E402
from pyromoe.bayes.convergence import check_convergence  # noqa: E402
from pyromoe.bayes.nuts import run_nuts  # noqa: E402

N, D, K, COSINE, NOISE = 5000, 5, 3, 0.8, 0.5
LOG = RESULTS / "k3_posterior.jsonl"
VARIANTS = {
    "base": {},
    "dense": {"full_mass": True},
    "warmup": {"warmup_factor": 3},
    "gate_prior": {"priors": {sites.GATE_WEIGHT: 1.0, sites.GATE_BIAS: 1.0}},
    "target": {"target_accept_prob": 0.95},
    "long": {"samples_factor": 3},
}


def data_for(seed: int):
    return simulate(
        N, D, K, "linear", noise=NOISE, gate="orthogonal", seed=seed, expert_cosine=COSINE
    )


def _scalars(posterior) -> tuple[list[str], np.ndarray]:
    """Every scalar parameter as (names, draws of shape (chain, draw, p))."""
    names, columns = [], []
    for site in posterior.data_vars:
        values = np.asarray(posterior[site].values, dtype=float)
        flat = values.reshape(values.shape[0], values.shape[1], -1)
        names += [f"{site}[{i}]" for i in range(flat.shape[-1])]
        columns.append(flat)
    return names, np.concatenate(columns, axis=-1)


def _quantile_in_chain(values: np.ndarray, diverging: np.ndarray) -> list[float]:
    """Each divergent draw's value as a quantile of its chain's draws."""
    out = []
    for chain, draw in zip(*np.nonzero(diverging)):
        out.append(float((values[chain] < values[chain, draw]).mean()))
    return out


def analyse(idata) -> dict:
    names, draws = _scalars(idata.posterior)
    pooled_mean, pooled_sd = draws.mean((0, 1)), draws.std((0, 1)) + 1e-300
    chain_shift = np.abs(draws.mean(1) - pooled_mean) / pooled_sd  # (chain, p)
    diverging = np.asarray(idata.sample_stats["diverging"].values, dtype=bool)
    rhat = az.rhat(idata, var_names=list(idata.posterior.data_vars))
    chain_ll = np.asarray(idata.attrs["chain_mean_log_likelihood"], dtype=float)
    gate = np.asarray(idata.posterior[sites.GATE_WEIGHT].values, dtype=float)
    gate_norm = np.linalg.norm(gate.reshape(*gate.shape[:2], -1), axis=-1)
    noise = np.asarray(idata.posterior[sites.NOISE].values, dtype=float)
    noise = noise.reshape(*noise.shape[:2], -1).mean(-1)
    ess = az.ess(idata, var_names=list(idata.posterior.data_vars))
    row = {
        "max_rhat": {v: float(np.nanmax(rhat[v].values)) for v in rhat.data_vars},
        "min_ess_bulk": float(min(np.nanmin(ess[v].values) for v in ess.data_vars)),
        "divergences_per_chain": diverging.sum(1).tolist(),
        "chain_log_likelihood_gap": (chain_ll.max() - chain_ll).round(2).tolist(),
        "chain_max_parameter_shift_sd": chain_shift.max(1).round(2).tolist(),
        "chain_most_shifted_parameter": [names[i] for i in chain_shift.argmax(1)],
        "step_size_per_chain": np.asarray(idata.sample_stats["step_size"].values)[:, -1].tolist(),
        "mean_tree_depth": float(idata.sample_stats["tree_depth"].mean()),
        "gate_norm_mean_per_chain": gate_norm.mean(1).round(3).tolist(),
    }
    if diverging.any():
        shift = (draws[diverging].mean(0) - pooled_mean) / pooled_sd
        top = np.argsort(-np.abs(shift))[:4]
        row["divergent_shift_sd"] = {names[i]: round(float(shift[i]), 2) for i in top}
        row["divergent_gate_norm_quantiles"] = np.round(
            _quantile_in_chain(gate_norm, diverging), 2
        ).tolist()
        row["divergent_noise_quantiles"] = np.round(
            _quantile_in_chain(noise, diverging), 2
        ).tolist()
    return row


def run_one(seed: int, variant: str, chains: int, warmup: int, samples: int) -> dict:
    options = dict(VARIANTS[variant])
    priors = options.pop("priors", None)
    warmup *= options.pop("warmup_factor", 1)
    samples *= options.pop("samples_factor", 1)
    data = data_for(seed)
    start = time.perf_counter()
    estimate = initialize(data.x, data.y, K, "linear", seed=seed)
    seed_seconds = time.perf_counter() - start
    model = MixtureOfExperts(D, K, priors=priors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = run_nuts(
            model, data.x, data.y, init=estimate, num_chains=chains, num_warmup=warmup,
            num_samples=samples, seed=seed, progress=False, posterior_predictive=False,
            pointwise=1, **options,
        )  # fmt: skip
    report = check_convergence(idata)
    row = {
        "seed": seed,
        "variant": variant,
        "chains": chains,
        "warmup": warmup,
        "samples": samples,
        "seed_method": estimate.method,
        "seed_seconds": seed_seconds,
        "seconds": float(idata.attrs["seconds"]),
        "gradient_evaluations": int(sum(idata.attrs["num_gradient_evaluations"])),
        "max_rhat_aligned": report["max_rhat"],
        "divergent_fraction": report["divergent_fraction"],
        "converged": report["converged"],
        "check": report,
        **analyse(idata),
    }
    return row


def likelihood_modes(seed: int, num_random: int) -> dict:
    """EM optima from plain random starts (``compare_starts``, ``screen=1``) and the tensor start
    on the data: their log-likelihoods (nats below the best) and expert errors; separate optima
    within a few nats with other parameters are separate modes of the likelihood."""
    from pyromoe.app.demo import compare_starts

    data = data_for(seed)
    records, tensor = compare_starts(
        data.x, data.y, K, "linear", num_random=num_random, seed=seed, truth=data.truth,
        progress=False, screen=1,
    )  # fmt: skip
    fits = [r for r in [*records, tensor] if r.estimate is not None]
    best = max(r.log_likelihood for r in fits)
    return {
        "seed": seed,
        "variant": "em_modes",
        "fits": [
            {
                "label": r.label,
                "gap_nats": round(best - r.log_likelihood, 2),
                "expert_error": r.expert_error,
                "converged": r.converged,
                "n_iter": r.n_iter,
            }
            for r in sorted(fits, key=lambda r: -r.log_likelihood)
        ],  # fmt: skip
    }


def laplace_conditioning(seed: int, cosine: float | None) -> dict:
    """The Laplace approximation's geometry at the seed estimate (unconstrained space): the
    condition number of the covariance (what a unit mass matrix faces), of the correlation matrix
    (what NUTS's adapted diagonal mass faces: a dense mass removes it) and the most correlated
    pairs of coordinates."""
    from pyromoe.bayes.laplace import laplace_approximation

    data = simulate(
        N, D, K, "linear", noise=NOISE, gate="orthogonal", seed=seed, expert_cosine=cosine
    )
    estimate = initialize(data.x, data.y, K, "linear", seed=seed)
    approx = laplace_approximation(
        MixtureOfExperts(D, K), data.x, data.y, estimate, min_curvature=1e-8
    )
    cov = approx["covariance"]
    sd = cov.diagonal().sqrt()
    corr = cov / torch.outer(sd, sd)
    names = [
        f"{name}[{i}]"
        for name in approx["names"]
        for i in range(int(np.prod(tuple(approx["shapes"][name]))))
    ]
    upper = torch.triu(corr.abs(), diagonal=1)
    top = torch.topk(upper.flatten(), 4).indices
    p = corr.shape[0]
    eig_corr = torch.linalg.eigvalsh(corr)
    eig_cov = torch.linalg.eigvalsh(cov)
    return {
        "seed": seed,
        "variant": "laplace",
        "expert_cosine": cosine,
        "condition_covariance": float(eig_cov[-1] / eig_cov[0]),
        "condition_correlation": float(eig_corr[-1] / eig_corr[0]),
        "largest_correlations": {
            f"{names[i // p]} ~ {names[i % p]}": round(float(corr.flatten()[i]), 3) for i in top
        },
        "largest_sd": {names[i]: round(float(sd[i]), 4) for i in torch.topk(sd, 3).indices},
    }


def _done() -> set:
    if not LOG.exists():
        return set()
    rows = [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()]
    return {
        (r["seed"], r["variant"], r.get("chains"), r.get("warmup"), r.get("samples")) for r in rows
    }


def markdown(rows: list[dict], modes: list[dict], geometry: list[dict], info: dict) -> str:
    lines = [
        "# k = 3 posteriors with similar experts (expert cosine 0.8)",
        "",
        f"`simulate(n={N}, d={D}, k={K}, linear, gate='orthogonal', expert_cosine={COSINE}, "
        f"noise={NOISE})`; `run_nuts` seeded by `initialize`, draws relabelled to the estimate. "
        "Variants: base (diagonal mass, target 0.8), dense (`full_mass=True`), warmup (3x warm-up), "
        "gate_prior (gate Normal(0, 1) instead of 2.5), target (target_accept_prob 0.95), long "
        "(3x the draws). "
        "Timings were taken on a shared 2-core machine under heavy load (load average in the "
        "machine section): compare gradient evaluations, not seconds.",
        "",
        "| seed | variant | chains x (warmup+draws) | r_hat (relabelled) | min ESS bulk | divergent % | "
        "LL gap per chain (nats) | chain shift (sd) | step sizes | tree depth | gradients | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['variant']} | {r['chains']}x({r['warmup']}+{r['samples']}) | "
            f"{r['max_rhat_aligned']:.3f} | {r.get('min_ess_bulk', float('nan')):.0f} | "
            f"{100 * r['divergent_fraction']:.1f} | "
            f"{r['chain_log_likelihood_gap']} | {r['chain_max_parameter_shift_sd']} | "
            f"{[round(s, 3) for s in r['step_size_per_chain']]} | {r['mean_tree_depth']:.1f} | "
            f"{r['gradient_evaluations']} | {r['seconds']:.0f} |"
        )
    lines += ["", "## Where the divergent draws sit", ""]
    for r in rows:
        if "divergent_shift_sd" in r:
            lines.append(
                f"- seed {r['seed']}, {r['variant']}: shift of divergent draws (pooled sds) "
                f"{r['divergent_shift_sd']}; gate norm quantile in chain "
                f"{r['divergent_gate_norm_quantiles']}; noise quantile "
                f"{r['divergent_noise_quantiles']}"
            )
    if not any("divergent_shift_sd" in r for r in rows):
        lines.append("None: no run had a divergent draw.")
    lines += ["", "## The convergence check's findings", ""]
    for r in rows:
        found = "; ".join(
            f"{f['diagnostic']} {f['value']} (chains named: {f['chains']})"
            for f in r["check"]["findings"]
        )
        lines.append(f"- seed {r['seed']}, {r['variant']}: {found or 'passed'}")
    lines += ["", "## EM optima from random starts (the likelihood's modes)", ""]
    for r in modes:
        fits = ", ".join(
            f"{f['label']}: -{f['gap_nats']} nats, error {f['expert_error']:.3f}" for f in r["fits"]
        )
        lines.append(f"- seed {r['seed']}: {fits}")
    lines += [
        "",
        "## The Laplace approximation's geometry at the seed estimate",
        "",
        "Unconstrained space; condition numbers of the covariance (a unit mass matrix) and of the "
        "correlation matrix (what an adapted diagonal mass leaves; a dense mass removes it).",
        "",
        "| seed | expert cosine | cond(covariance) | cond(correlation) | largest correlations |",
        "|---|---|---|---|---|",
    ]
    for r in geometry:
        lines.append(
            f"| {r['seed']} | {r['expert_cosine'] or 'independent'} | "
            f"{r['condition_covariance']:.0f} | {r['condition_correlation']:.1f} | "
            f"{r['largest_correlations']} |"
        )
    lines += ["", *machine_section(info)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["base"], choices=list(VARIANTS))
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=250)
    parser.add_argument("--samples", type=int, default=250)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--laplace", action="store_true", help="Laplace geometry per seed")
    parser.add_argument("--em-modes", type=int, default=0, help="random EM starts per seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.laplace:
        for seed in args.seeds:
            for cosine in (COSINE, None):
                row = laplace_conditioning(seed, cosine)
                with LOG.open("a") as f:
                    f.write(json.dumps(row, default=float) + "\n")
                print(json.dumps(row, default=float), flush=True)
        return
    if args.em_modes:
        for seed in args.seeds:
            row = likelihood_modes(seed, args.em_modes)
            with LOG.open("a") as f:
                f.write(json.dumps(row, default=float) + "\n")
            print(json.dumps(row, default=float), flush=True)
        return
    if not args.report:
        done = _done()
        for variant in args.variants:
            for seed in args.seeds:
                warm = args.warmup * VARIANTS[variant].get("warmup_factor", 1)
                kept = args.samples * VARIANTS[variant].get("samples_factor", 1)
                if (seed, variant, args.chains, warm, kept) in done:
                    continue
                row = run_one(seed, variant, args.chains, args.warmup, args.samples)
                row["load_average_1min"] = machine_info()["load_average_1min_at_start"]
                with LOG.open("a") as f:
                    f.write(json.dumps(row, default=float) + "\n")
                print(json.dumps({k: row[k] for k in list(row)[:13]}, default=float), flush=True)
        return
    rows = [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()]
    modes = [r for r in rows if r["variant"] == "em_modes"]
    geometry = [r for r in rows if r["variant"] == "laplace"]
    rows = [r for r in rows if r["variant"] not in ("em_modes", "laplace")]
    info = machine_info()
    payload = {"rows": rows, "em_modes": modes, "laplace": geometry, "machine": info}
    write_results("k3_posterior", payload, markdown(rows, modes, geometry, info))


if __name__ == "__main__":
    main()
