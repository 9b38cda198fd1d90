#!/usr/bin/env bash
# GPU check of pyromoe: run from the repository root on a machine with one CUDA GPU, offline.
#
#   bash benchmarks/gpu_check.sh
#
# It MUST finish within 8 minutes on one H200 (the device time a check gets); every part has its
# own timeout, and the worst case of all of them together is 470 s:
#
#   part                                           expected on one H200   timeout
#   1. nvidia-smi, torch / CUDA versions            ~10 s                  20 s + 20 s
#   2. pip install -e . --no-deps (only when        ~10 s                  30 s
#      pyromoe does not import; no network used)
#   3. pytest tests/test_cuda.py (initialize,      ~1-2 min               120 s
#      fit_em, fit_svi, run_nuts on CUDA)
#   4. benchmarks/scale.py --device cuda            ~3-4 min               280 s (--budget 230:
#      --dtype float32 --sizes 1e7 (2 GB of                                 steps not started by
#      float32 data written to a temp dir first)                            then are recorded as
#                                                                           "not run" and the
#                                                                           results still written)
#
# A failing test run does not stop part 4 (device time is scarce: one run gives both answers);
# the script then exits with the tests' status. Any other failure stops it at once.
#
# Writes benchmarks/results/gpu/gpu.{json,md,png}. Nothing is downloaded: the environment must
# already hold torch with CUDA, pyro-ppl, arviz, dask and distributed (the GPU machine has no
# network).
set -euo pipefail

# the environment's python (not a carried .venv: that one may hold a CPU-only torch)
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
start=$(date +%s)
part() { echo; echo "== $1 ($(( $(date +%s) - start )) s elapsed)"; }

part "1. GPU and versions"
timeout 20 nvidia-smi
timeout 20 "$PYTHON" - <<'EOF'
import sys
import torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "| CUDA (build)", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count())
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device: this check needs one")
print("device 0:", torch.cuda.get_device_name(0))
EOF

part "2. pyromoe importable"
# checked from / so that the repository folder on sys.path does not hide a missing install
if ! (cd / && "$PYTHON" -c "import pyromoe") 2>/dev/null; then
    timeout 30 "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -e .
fi
"$PYTHON" -c "import pyromoe; print('pyromoe', pyromoe.__version__, 'from', pyromoe.__file__)"

part "3. CUDA tests"
tests_status=0
timeout 120 "$PYTHON" -m pytest tests/test_cuda.py -q || tests_status=$?
echo "pytest exit status: $tests_status"

part "4. scale benchmark on CUDA (n = 1e7, float32)"
timeout 280 "$PYTHON" benchmarks/scale.py --device cuda --dtype float32 --sizes 1e7 \
    --threads "$OMP_NUM_THREADS" --budget 230 --step-timeout 120 \
    --out benchmarks/results/gpu --name gpu
cat benchmarks/results/gpu/gpu.md

part "done in $(( $(date +%s) - start )) s (tests: exit $tests_status)"
exit "$tests_status"
