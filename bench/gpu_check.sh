#!/usr/bin/env bash
# Everything a lent GPU must show, in one call of the device tool (at most 8 minutes), each step with its own
# time limit, its output teed into $OUT (which the device tool returns):
#
#   bash bench/gpu_check.sh              # on the GPU (the device tool's run; peers' wheels in .whl/, carried)
#   bash bench/gpu_check.sh --dry-run    # on a CPU: the same steps and files, tiny shapes, a fake device name
#
# Steps: 1 build (nvcc, sm_80/sm_90 + PTX), 2 mdk info, 3 the -m gpu tests, 4 no host sync / CUDA graph / cuda:1,
# 5 autocast, 6 the bf16 margin-CE rows at B=1024, D=512, C in {85,742, 2M} against gemm_bound, eager,
# torch.compile and the peers (Liger-Kernel FLCE, cut-cross-entropy), trainable and frozen, 7 the distillation
# losses, 7b cosine top-k against faiss, identification at a million distractors and IJB images/s, 8 the auto
# table (tune_dispatch) and the plots. A step that fails or runs out of time is recorded in
# $OUT/summary.txt and the next one runs. The whole dry run took 4 minutes on 2 CPU cores; CI runs four of its
# steps (2_info 6a 6c 8: python_tests/test_gpu_readiness.py::test_gpu_check_dry_run), so that on a GPU only
# the GPU itself is new.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mdk-gpu-check}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
DRY=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  export MDK_FAKE_DEVICE="${MDK_FAKE_DEVICE:-Fake H200 (dry run)}" TRITON_INTERPRET=1 MDK_BENCH_RESULTS="$OUT"
fi
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # peers carried as wheels (the device tool's README)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME LIMIT_SECONDS COMMAND...  (MDK_GPU_CHECK_ONLY="2_info 8": only steps starting so)
  local name=$1 limit=$2
  shift 2
  if [ -n "${MDK_GPU_CHECK_ONLY:-}" ]; then
    local keep=0 want
    for want in $MDK_GPU_CHECK_ONLY; do [[ $name == "$want"* ]] && keep=1; done
    [ $keep = 1 ] || return 0
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > >(tee "$OUT/$name.txt") 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
}

if [ $DRY = 1 ]; then  # the build is the one every install runs (CI: pip install with nvcc present)
  step 1_build 10 echo "dry run: the CUDA module of this install is used"
  GRID=(--B 16 --D 32 --C 300 --reps 1)
  GRID_BIG=(--B 16 --D 32 --C 600 --reps 1)
  DEV=(--device cpu)
  TABLE=(--out "$OUT/dispatch_table.py")  # never the repository's table
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
  step 1_build 240 env MDK_BUILD_CUDA=ON $PY -m pip install -q --no-build-isolation --no-deps .
  GRID=(--B 1024 --D 512 --C 85742 --reps 5)
  GRID_BIG=(--B 1024 --D 512 --C 2000000 --reps 3)
  DEV=(--device cuda)
  TABLE=()
fi
# Every Python step imports the installed package, never this tree's mdkernels/ (a clean checkout has no built
# modules): it runs from $RUN, where only bench/ is linked in. (python -m puts the working directory first on
# sys.path, so a step run from the repository root would test the source tree, without its CUDA module.)
REPO=$PWD
RUN=$(mktemp -d)
ln -s "$REPO/bench" "$RUN/bench"
IN=(env -C "$RUN")
step 2_info 60 "${IN[@]}" $PY -m mdkernels.info
step 3_gpu_tests 150 "${IN[@]}" $PY -m pytest "$REPO/python_tests" -q -m gpu -rs -x -p no:cacheprovider --durations=10
step 4_sync_graph_devices 60 "${IN[@]}" $PY -m pytest -q -p no:cacheprovider "$REPO/python_tests/test_sync_free.py" \
  "$REPO/python_tests/test_gpu_readiness.py" -k "sync or graph or second_gpu or gpu_fp32"
step 5_autocast 60 "${IN[@]}" $PY -m pytest -q -p no:cacheprovider "$REPO/python_tests/test_gpu_readiness.py" -k autocast
PEERS=(mdk_triton mdk_cuda mdk_torch gemm_bound reference compile_reference insightface_eager compile_insightface
       torch_linear_ce liger_flce cce pml_arcface)
[ $DRY = 1 ] && PEERS=(mdk_triton mdk_cuda gemm_bound reference)  # no CPU compiles: the plumbing, quickly
MODES=(fwd bwd fwd+bwd)
[ $DRY = 1 ] && MODES=(fwd+bwd)
step 6a_margin_ce_85k 120 "${IN[@]}" $PY -m bench.bench_margin_ce "${DEV[@]}" "${GRID[@]}" --dtype bfloat16 \
  --modes "${MODES[@]}" --only "${PEERS[@]}"
step 6b_margin_ce_85k_frozen 60 "${IN[@]}" $PY -m bench.bench_margin_ce "${DEV[@]}" "${GRID[@]}" --dtype bfloat16 \
  --modes fwd+bwd --frozen --only mdk_triton mdk_cuda gemm_bound reference liger_flce cce
step 6c_margin_ce_2M 120 "${IN[@]}" $PY -m bench.bench_margin_ce "${DEV[@]}" "${GRID_BIG[@]}" --dtype bfloat16 \
  --modes fwd+bwd --only mdk_triton mdk_cuda gemm_bound liger_flce cce
step 6d_margin_ce_amp 60 "${IN[@]}" $PY -m bench.bench_margin_ce "${DEV[@]}" "${GRID[@]}" --dtype float32 --amp \
  --modes fwd+bwd --only mdk_triton gemm_bound reference
step 7_distill 60 "${IN[@]}" $PY -m bench.bench_distill "${DEV[@]}" --reps 2 $([ $DRY = 1 ] && echo --tiny)
if [ $DRY = 1 ]; then SEARCH=(--Q 64 --G 4096) IDENT=(--probes 100 --distractors 20000) IJB=(--network mbf --images 24)
else SEARCH=(--Q 2000 --G 1000000) IDENT=() IJB=(--network r50 --images 600); fi
step 7b_search_and_eval 150 "${IN[@]}" bash -c "$PY -m bench.bench_cosine_topk ${DEV[*]} ${SEARCH[*]} && \
  $PY -m bench.bench_eval identify ${DEV[*]} ${IDENT[*]} && $PY -m bench.bench_eval ijb ${DEV[*]} ${IJB[*]}"
CSV=$(ls -t "${MDK_BENCH_RESULTS:-bench/results}"/*.csv 2>/dev/null | head -1)
step 8_tune_and_plots 60 "${IN[@]}" bash -c "$PY -m bench.tune_dispatch --csv '$CSV' ${TABLE[*]} && \
  $PY -m bench.plot '$CSV' margin_ce"
cp -f "$CSV" "$(dirname "$CSV")"/*.png "$OUT/" 2>/dev/null
[ $DRY = 1 ] || cp -f mdkernels/dispatch_table.py "$OUT/"
echo "== done: $OUT" && cat "$OUT/summary.txt"
rm -rf "$RUN"
