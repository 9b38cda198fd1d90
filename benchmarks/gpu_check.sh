#!/usr/bin/env bash
# GPU check of pyromoe: run from the repository root on a machine with one CUDA GPU, offline.
#
#   bash benchmarks/gpu_check.sh
#
# It MUST finish within 5 minutes on one H100 / H200; every part has its own timeout, and the
# worst case of all of them together is 290 s:
#
#   part                                           expected on one H100   timeout
#   1. nvidia-smi, torch / CUDA versions            ~10 s                  15 s + 15 s
#   2. pip install -e . --no-deps (only when        ~10 s                  30 s
#      pyromoe does not import; no network used)
#   3. pytest tests/test_cuda.py (initialize,      ~1-2 min               110 s
#      fit_em, fit_svi, run_nuts on CUDA)
#   4. benchmarks/pass_cost.py on the GPU,          ~40 s each             60 s + 60 s (--budget
#      n = 1e7, d = 50, in memory, float32 then                             45: passes not started
#      float64 (the Gram pass, summary, moment                              by then are recorded as
#      passes and step, EM iterations, gate IRLS                            "-" and the tables
#      as multiples of the Gram pass)                                       still written)
#
# A failing test run does not stop part 4 (device time is scarce: one run gives both answers);
# the script then exits with the tests' status. Any other failure stops it at once. Without a
# CUDA device it says so and exits 0 (nothing to check).
#
# Writes benchmarks/results/gpu/pass_cost_float32.{json,md} and pass_cost_float64.{json,md}.
# Nothing is downloaded: the environment must already hold torch with CUDA, pyro-ppl, arviz,
# dask and distributed (the GPU machine has no network).
#
# Testing the script itself on a CPU (tiny n, no tests, results under /tmp):
#   GPU_CHECK_DEVICE=cpu PASS_COST_N=20000 GPU_CHECK_OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
set -euo pipefail

# the environment's python (not a carried .venv: that one may hold a CPU-only torch)
PYTHON="${PYTHON:-python}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
PASS_COST_N="${PASS_COST_N:-1e7}"
OUT="${GPU_CHECK_OUT:-benchmarks/results/gpu}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
start=$(date +%s)
part() { echo; echo "== $1 ($(( $(date +%s) - start )) s elapsed)"; }

part "1. device and versions"
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 15 nvidia-smi || true
fi
cuda_status=0
timeout 15 "$PYTHON" - "$DEVICE" <<'EOF' || cuda_status=$?
import sys
import torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "| CUDA (build)", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count())
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit(3)  # no CUDA device: the check is skipped below
    print("device 0:", torch.cuda.get_device_name(0))
EOF
if [ "$cuda_status" -eq 3 ]; then
    echo "torch sees no CUDA device: nothing to check here, skipped (exit 0)"
    exit 0
elif [ "$cuda_status" -ne 0 ]; then
    exit "$cuda_status"
fi

part "2. pyromoe importable"
# checked from / so that the repository folder on sys.path does not hide a missing install
if ! (cd / && "$PYTHON" -c "import pyromoe") 2>/dev/null; then
    timeout 30 "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -e .
fi
"$PYTHON" -c "import pyromoe; print('pyromoe', pyromoe.__version__, 'from', pyromoe.__file__)"

tests_status=0
if [ "$DEVICE" = "cuda" ]; then
    part "3. CUDA tests"
    timeout 110 "$PYTHON" -m pytest tests/test_cuda.py -q || tests_status=$?
    echo "pytest exit status: $tests_status"
else
    part "3. CUDA tests: skipped (device $DEVICE)"
fi

for dtype in float32 float64; do
    part "4. pass cost on $DEVICE (n = $PASS_COST_N, d = 50, $dtype, in memory)"
    timeout 60 "$PYTHON" benchmarks/pass_cost.py --device "$DEVICE" --dtype "$dtype" \
        --n "$PASS_COST_N" --d 50 --sources memory --chunks 65536 1048576 --repeats 3 --budget 45 \
        --threads "$OMP_NUM_THREADS" --out "$OUT" --name "pass_cost_$dtype"
    cat "$OUT/pass_cost_$dtype.md"
done

part "done in $(( $(date +%s) - start )) s (tests: exit $tests_status)"
exit "$tests_status"
