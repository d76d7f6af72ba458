#!/usr/bin/env bash
# The GPU checks in one command:   bash tests/gpu/run_gpu_checks.sh
#
#   1. the `gpu`-marked tests (tests/gpu/test_gpu.py): rollout and a learner step on
#      CUDA in bf16, collective weight sync between Ray actors (gloo with CUDA tensors
#      on one GPU; NCCL when there are 2+ GPUs), a short training run on the GPU;
#   2. the collective-sync tests on CPU (gloo), as a regression check on that machine;
#   3. tests/gpu/bench_gpu.py: learner MFU and rollout tokens/s for a ~0.5B Llama
#      built from a config (random weights).
#
# Results go to $OUT (default: a new temporary folder): gpu-tests.log/.xml,
# bench_gpu.log/.json, env.txt, nvidia-smi.txt. Exit status: non-zero if a step failed.
#
# Requires a CUDA build of torch in the Python it runs ($PYTHON, else .venv/bin/python,
# else python3), plus the project's dependencies with the `test` extra; nothing is
# downloaded (no model hub: the models are built from configs). The venv the README
# builds on the CPU reference machine holds torch 2.13.0+cpu, which cannot run these:
# on the GPU machine, install a CUDA build of torch matching its driver before the
# project (e.g. `.venv/bin/pip install torch==2.13.0 --index-url
# https://download.pytorch.org/whl/<cuda tag>`, then `.venv/bin/pip install -e ".[test]"`),
# or point $PYTHON at a Python that has one. The script checks this first and stops
# with a clear message (exit 2, $OUT/ERROR.txt) if CUDA is not usable.
# About 3-5 minutes on one H100/H200 (bench <= 3 min).
set -uo pipefail
cd "$(dirname "$0")/../.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${OUT:-$(mktemp -d -t fleetrl-gpu-XXXXXX)}"
mkdir -p "$OUT"
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "results -> $OUT"

{
  date -u
  echo "python: $PY"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "devices", torch.cuda.device_count()); print("nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None)' 2>&1
  "$PY" -c 'import ray, transformers; print("ray", ray.__version__, "transformers", transformers.__version__)' 2>&1
} | tee "$OUT/env.txt"
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

if ! "$PY" - > "$OUT/ERROR.txt" 2>&1 <<'EOF'
import sys
try:
    import torch
except ImportError as e:
    sys.exit(f"ERROR: {sys.executable} cannot import torch ({e}): install the project with a CUDA build of torch "
             f"(see the top of tests/gpu/run_gpu_checks.sh) or set PYTHON")
if not torch.cuda.is_available():
    sys.exit(f"ERROR: torch.cuda.is_available() is False in {sys.executable}: torch {torch.__version__}, CUDA build "
             f"{torch.version.cuda or 'none (a CPU-only wheel)'}. Install a CUDA build of torch (see the top of "
             f"tests/gpu/run_gpu_checks.sh) on a machine with a GPU")
EOF
then
  cat "$OUT/ERROR.txt" >&2
  exit 2
fi
rm -f "$OUT/ERROR.txt"

status=0
echo "== 1. gpu tests"
timeout 900 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rA --durations=0 \
  --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2. collective sync on CPU (gloo)"
timeout 300 "$PY" -m pytest -q tests/test_collective_sync.py -p no:cacheprovider --durations=0 \
  --junitxml="$OUT/collective-cpu-tests.xml" 2>&1 | tee "$OUT/collective-cpu-tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 3. bench: learner MFU, rollout tokens/s (~0.5B Llama, random weights)"
timeout 300 "$PY" tests/gpu/bench_gpu.py --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "status $status; results in $OUT"
exit $status
