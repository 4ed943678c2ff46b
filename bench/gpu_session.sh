#!/usr/bin/env bash
# A GPU session's work in three calls of the device tool, each under its 10-minute limit (run from the
# repository root; results go to bench/results/ and, when set, to $OUT, which the device tool returns):
#
#   bash bench/gpu_session.sh test      # build, then the GPU tests: every backend against the reference
#   bash bench/gpu_session.sh bench     # margin CE GPU grid (fwd+bwd), the main shape in fwd/bwd, distillation
#   bash bench/gpu_session.sh tune      # the auto table (cuda vs triton) and an ncu profile of the main shape
#
# Written without a GPU at hand: adjust the grid if a step runs past its limit.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mdk-gpu-session}
mkdir -p "$OUT"
step=${1:?usage: gpu_session.sh test|bench|tune}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ "$step" = test ]; then
  MDK_BUILD_CUDA=ON pip install --no-build-isolation --no-deps . 2>&1 | tail -3
  (cd /tmp && python -m mdkernels.info) | tee "$OUT/info.json"
  python -m pytest python_tests -q -m gpu -rs -x --durations=20 2>&1 | tee "$OUT/gpu_tests.txt"
  python -m mdkernels.tools.gpu_compile 2>&1 | tail -3
elif [ "$step" = bench ]; then
  python -m bench.bench_margin_ce --suite gpu --modes fwd+bwd 2>&1 | tee "$OUT/bench_margin_ce.txt"
  python -m bench.bench_margin_ce --B 1024 --C 85742 --dtype bfloat16 --modes fwd bwd 2>&1 | tee -a "$OUT/bench_margin_ce.txt"
  python -m bench.bench_margin_ce --B 1024 --C 85742 --dtype bfloat16 --modes bwd fwd+bwd --frozen 2>&1 | tee -a "$OUT/bench_margin_ce.txt"
  python -m bench.bench_distill --device cuda 2>&1 | tee "$OUT/bench_distill.txt"
  csv=$(ls -t bench/results/*.csv | head -1)
  python -m bench.plot "$csv" margin_ce && python -m bench.plot "$csv" margin_ce_frozen || true
  cp bench/results/*.csv bench/results/*.png "$OUT/" 2>/dev/null || true
elif [ "$step" = tune ]; then
  python -m bench.tune_dispatch 2>&1 | tee "$OUT/dispatch.md"
  cp mdkernels/dispatch_table.py "$OUT/"
  if command -v ncu >/dev/null 2>&1; then
    ncu --set full -k regex:"margin|_cos|scatter" -c 8 -o "$OUT/margin_ce" \
      python -m bench.bench_margin_ce --B 1024 --C 85742 --dtype bfloat16 --modes fwd+bwd \
      --only mdk_triton mdk_cuda --no-save 2>&1 | tail -5
  fi
else
  echo "unknown step $step (test|bench|tune)" >&2
  exit 2
fi
