"""Shared helpers of the benchmark scripts: the ``--threads`` option, runs of the samplers as the
benchmarks make them, machine info and its section of a results page, and result writing (no
maths here)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def add_threads_argument(parser) -> None:
    """The scripts' ``--threads`` option: torch threads, default 1."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine multi-threaded timings are noise)",
    )


def quiet_fit(fit, model, x, y, init, **options):
    """``fit(model, x, y, init=init, **options)``, ``fit`` being ``pyromoe.run_nuts`` or
    ``pyromoe.fit_svi``, as the benchmarks run them: no progress bar, the draws not relabelled
    (``align=False``: a benchmark measures label switching itself) and no posterior predictive."""
    return fit(
        model, x, y, init=init, progress=False, align=False, posterior_predictive=False, **options
    )


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_start": load,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_markdown(info: dict) -> str:
    return "\n".join(f"- {key}: {value}" for key, value in info.items())


def machine_section(info: dict, heading: str = "## Machine") -> list[str]:
    """The closing lines of a results page: a blank line, ``heading`` and the machine's list."""
    return ["", heading, "", machine_markdown(info), ""]


def write_results(name: str, payload: dict, markdown: str, figure=None) -> list[Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = [RESULTS / f"{name}.json", RESULTS / f"{name}.md"]
    paths[0].write_text(json.dumps(payload, indent=2, default=float) + "\n")
    paths[1].write_text(markdown)
    if figure is not None:
        paths.append(RESULTS / f"{name}.png")
        figure.savefig(paths[-1], dpi=120, bbox_inches="tight")
    return paths
