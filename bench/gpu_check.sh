#!/usr/bin/env bash
# What a lent GPU must show, sized to the device tool's limits: one command of at most 10 minutes, 15 minutes of
# device time in all (the machine's start and idle waits included), at most 8 files back from $OUT, at most 2
# folders down, names of letters, digits, '.', '_' and '-' (docs/testing.md, "On a lent GPU").
#
#   bash bench/gpu_check.sh                     # call 1: build, info, the GPU tests, the headline margin-CE rows
#   bash bench/gpu_check.sh call2               # call 2, only if time is left: distillation, top-k, IJB images/s,
#                                               # the fused center update, the auto table and plots, the compile
#                                               # check on that Triton
#   bash bench/gpu_check.sh --dry-run [call2]   # on a CPU: the same steps, limits and files; steps 3-5 on a
#                                               # simulated H100 (MDK_SIMULATE_GPU=h100), tiny benchmark shapes
#
# Each step has its own time limit (PLAN below); the limits of call 1 add up to at most 450 s and those of call 2
# to at most 300 s, checked before anything runs. A step that fails or runs out of time is recorded and the next
# one runs. $OUT receives five files: summary.txt (each step's rc, seconds and limit), log.txt (every step's
# output), tests.txt (each test's outcome), results.csv (the benchmark rows) and rest.tar.gz (per-step logs, JUnit
# XML, plots, the auto table, mdk info); the script checks the device tool's file limits on them at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/mdk-gpu-check}
DRY=0
CALL=call1
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    call1 | call2) CALL=$arg ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run] [call1|call2]" >&2; exit 2 ;;
  esac
done

# ---- the plan: every step and its limit in seconds, per call (the sums are the budget) ----------------------------
declare -A LIMIT
PLAN_call1=(1_build:130 2_info:15 3_gpu_tests:100 4_graph_sync_devices:40 5_autocast:25 6a_margin_ce_85k:60
            6b_margin_ce_85k_frozen:30 6c_margin_ce_2M:30 6d_margin_ce_2M_frozen:20)
PLAN_call2=(7_distill:55 7b_topk:45 7c_identify_ijb:65 7d_center_update:30 8_auto_table_plots:70 9_compile_check:35)
BUDGET_call1=450
BUDGET_call2=300
declare -n PLAN="PLAN_$CALL" BUDGET="BUDGET_$CALL"
total=0
for entry in "${PLAN[@]}"; do
  LIMIT[${entry%%:*}]=${entry##*:}
  total=$((total + ${entry##*:}))
done
if [ "$total" -gt "$BUDGET" ]; then
  echo "$CALL: the steps' limits add up to ${total} s, over its ${BUDGET} s" >&2
  exit 2
fi

mkdir -p "$OUT"
rm -f "$OUT"/summary.txt "$OUT"/log.txt "$OUT"/tests.txt "$OUT"/results.csv "$OUT"/rest.tar.gz  # ours, from a rerun
WORK=$(mktemp -d)
: > "$OUT/summary.txt"
: > "$OUT/log.txt"
echo "$CALL$([ $DRY = 1 ] && echo ' (dry run)'): ${#PLAN[@]} steps, limits ${total} s of ${BUDGET} s" | tee -a "$OUT/summary.txt"

PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # the peers and a recent setuptools, carried as wheels
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
SLOW=1
if [ $DRY = 1 ]; then  # the CPU: the interpreter and the emulator, a fake device name, results outside the repo
  export TRITON_INTERPRET=1 MDK_FAKE_DEVICE="${MDK_FAKE_DEVICE:-Fake H100 (dry run)}"
  SLOW=${MDK_DRY_RUN_SLOWDOWN:-4}  # the interpreter is slower than the GPU: each limit times this on the CPU
fi
export MDK_BENCH_RESULTS="$WORK/bench" PYTHONUNBUFFERED=1
mkdir -p "$MDK_BENCH_RESULTS"

step() {  # step NAME COMMAND...   (MDK_GPU_CHECK_ONLY="2_info 6a": only the steps whose names start so)
  local name=$1
  shift
  if [ -n "${MDK_GPU_CHECK_ONLY:-}" ]; then
    local keep=0 want
    for want in $MDK_GPU_CHECK_ONLY; do [[ $name == "$want"* ]] && keep=1; done
    [ $keep = 1 ] || return 0
  fi
  local limit=${LIMIT[$name]:?step $name is not in the plan of $CALL}
  echo "== $name (limit ${limit} s$([ "$SLOW" != 1 ] && echo " x $SLOW on the CPU")): $*" | tee -a "$OUT/log.txt"
  local t0=$SECONDS
  timeout -k 10 $((limit * SLOW)) "$@" > "$WORK/$name.txt" 2>&1
  local rc=$?
  tee -a "$OUT/log.txt" < "$WORK/$name.txt" | tail -n 3
  echo "$name rc=$rc $((SECONDS - t0)) s (limit ${limit} s)" | tee -a "$OUT/summary.txt"
}

# Every Python step imports the installed package, never this tree's mdkernels/ (a fresh checkout has no built
# modules): it runs from $RUN, where only bench/ is linked in (python -m puts the working directory first on
# sys.path). The tests are given by path.
RUN=$(mktemp -d)
ln -s "$REPO/bench" "$RUN/bench"
IN=(env -C "$RUN")
PYTEST=("${IN[@]}" $PY -m pytest -q -rA -p no:cacheprovider)
if [ $DRY = 0 ]; then
  $PY -c "import xdist" 2>/dev/null && PYTEST+=(-n 8)        # the GPU machine's 16 cores compile kernels at once
  $PY -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 60)
fi
T=$REPO/python_tests
SIM=()
[ $DRY = 1 ] && SIM=(env MDK_SIMULATE_GPU=h100)  # steps 3-5 on a simulated H100: 132 SMs, sm_90 tiles

if [ "$CALL" = call1 ]; then
  if [ $DRY = 1 ]; then
    step 1_build echo "dry run: the CUDA module of this install (CI builds it with nvcc) is used"
    GRID=(--device cpu --B 16 --D 32 --C 300 --reps 1)
    GRID_BIG=(--device cpu --B 16 --D 32 --C 600 --reps 1)
    PEERS=(mdk_triton mdk_cuda gemm_bound reference)  # no CPU compiles or GPU-only peers: the plumbing, quickly
    FROZEN=(mdk_triton mdk_cuda gemm_bound reference)
    BIG=(mdk_triton gemm_bound)
  else
    cap=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
    step 1_build env MDK_BUILD_CUDA=ON MDK_CUDA_ARCHS="${cap}-real" CMAKE_BUILD_PARALLEL_LEVEL=16 \
      $PY -m pip install -q --no-build-isolation --no-deps "$REPO"
    GRID=(--device cuda --B 1024 --D 512 --C 85742 --reps 5)
    GRID_BIG=(--device cuda --B 1024 --D 512 --C 2000000 --reps 3)
    PEERS=(mdk_triton mdk_cuda gemm_bound reference compile_reference insightface_eager torch_linear_ce liger_flce cce
           pml_arcface)
    FROZEN=(mdk_triton mdk_cuda gemm_bound reference liger_flce cce)
    BIG=(mdk_triton mdk_cuda gemm_bound liger_flce cce)
  fi
  step 2_info bash -c "${IN[*]} $PY -m mdkernels.info; (nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv || true); ${IN[*]} $PY -c 'import torch, triton, numpy; print(torch.__version__, triton.__version__, \
    numpy.__version__)'"
  step 3_gpu_tests "${SIM[@]}" "${PYTEST[@]}" "$T" -m "gpu and not needs_cuda" --junitxml="$WORK/3_gpu_tests.xml"
  if [ $DRY = 1 ]; then  # CUDA itself cannot run here: the CPU-side tests of the same logic, with fakes
    step 4_graph_sync_devices "${PYTEST[@]}" "$T/test_sync_free.py" \
      "$T/test_gpu_readiness.py::test_call_makes_the_tensors_gpu_current" \
      "$T/test_gpu_readiness.py::test_fp32_dots_are_tf32x3_whatever_allow_tf32_says" \
      --junitxml="$WORK/4_graph_sync_devices.xml"
  else
    step 4_graph_sync_devices "${PYTEST[@]}" "$T" -m needs_cuda --junitxml="$WORK/4_graph_sync_devices.xml"
  fi
  step 5_autocast "${SIM[@]}" "${PYTEST[@]}" "$T/test_gpu_readiness.py::test_autocast_runs_16_bit_operands_on_fp32_centers" \
    "$T/test_gpu_readiness.py::test_autocast_choices" "$T/test_gpu_readiness.py::test_pml_layout_is_read_in_place" \
    "$T/test_gpu_readiness.py::test_the_sharded_head_takes_the_single_heads_16_bit_operands_under_autocast" \
    "$T/test_memory_probes.py::test_autocast_makes_no_16_bit_copy_of_the_centers" --junitxml="$WORK/5_autocast.xml"
  M=("${IN[@]}" $PY -m bench.bench_margin_ce --dtype bfloat16 --modes fwd+bwd)
  step 6a_margin_ce_85k "${M[@]}" "${GRID[@]}" --only "${PEERS[@]}"
  step 6b_margin_ce_85k_frozen "${M[@]}" "${GRID[@]}" --frozen --only "${FROZEN[@]}"
  step 6c_margin_ce_2M "${M[@]}" "${GRID_BIG[@]}" --only "${BIG[@]}"
  step 6d_margin_ce_2M_frozen "${M[@]}" "${GRID_BIG[@]}" --frozen --only "${BIG[@]}"
else
  if [ $DRY = 1 ]; then
    DEV=(--device cpu) TINY=(--tiny) SEARCH=(--Q 64 --G 4096) IDENT=(--probes 100 --distractors 20000)
    IJB=(--network mbf --images 24) SUITE=(--device cpu --B 16 --D 32 --C 300 --reps 1 --dtype float32)
    TABLE=(--out "$WORK/dispatch_table.py")  # never the repository's table
  else
    DEV=(--device cuda) TINY=() SEARCH=(--Q 2000 --G 1000000) IDENT=() IJB=(--network r50 --images 600)
    SUITE=(--suite gpu) TABLE=(--out "$WORK/dispatch_table.py")
  fi
  step 7_distill "${IN[@]}" $PY -m bench.bench_distill "${DEV[@]}" --reps 3 "${TINY[@]}"
  step 7b_topk "${IN[@]}" $PY -m bench.bench_cosine_topk "${DEV[@]}" "${SEARCH[@]}"
  step 7c_identify_ijb bash -c "${IN[*]} $PY -m bench.bench_eval identify ${DEV[*]} ${IDENT[*]} && \
    ${IN[*]} $PY -m bench.bench_eval ijb ${DEV[*]} ${IJB[*]}"
  if [ $DRY = 1 ]; then
    CENTER=(--device cpu --B 16 --D 32 --C 300 --reps 1)
  else
    CENTER=(--device cuda --dtype bfloat16 --B 1024 --D 512 --C 2000000)
  fi
  step 7d_center_update "${IN[@]}" $PY -m bench.bench_center_update "${CENTER[@]}"  # both optimizers
  step 8_auto_table_plots bash -c "${IN[*]} $PY -m bench.bench_margin_ce ${SUITE[*]} --modes fwd+bwd \
    --only mdk_triton mdk_cuda && CSV=\$(ls -t $MDK_BENCH_RESULTS/*.csv | head -1) && \
    ${IN[*]} $PY -m bench.tune_dispatch --csv \"\$CSV\" ${TABLE[*]} && ${IN[*]} $PY -m bench.plot \"\$CSV\" margin_ce"
  if [ $DRY = 1 ]; then
    step 9_compile_check echo "dry run: the CPU suite runs the compile check (python_tests/test_gpu_compile.py)"
  else
    step 9_compile_check env -u TRITON_INTERPRET "${IN[@]}" $PY -m mdkernels.tools.gpu_compile --archs "$($PY -c \
      "import torch; print('%d%d' % torch.cuda.get_device_capability())")"
  fi
fi

# ---- pack: five plain files in $OUT, the device tool's limits checked ----------------------------------------------
$PY - "$WORK" "$OUT/tests.txt" <<'EOF'
import sys, glob, xml.etree.ElementTree as ET
work, out = sys.argv[1], sys.argv[2]
lines = []
for path in sorted(glob.glob(f"{work}/*.xml")):
    step = path.rsplit("/", 1)[1][:-4]
    for case in ET.parse(path).iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        lines.append(f"{step} {outcome.upper()} {case.get('classname')}::{case.get('name')} {case.get('time')} s")
open(out, "w").write("\n".join(lines) + ("\n" if lines else ""))
counts = {}
for line in lines:
    counts[line.split()[1]] = counts.get(line.split()[1], 0) + 1
print("tests:", ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items())) or "none")
EOF
csvs=("$MDK_BENCH_RESULTS"/*.csv)
if [ -e "${csvs[0]}" ]; then cat "${csvs[@]}" | awk 'NR == 1 || !/^op,/' > "$OUT/results.csv"; fi
cp "$OUT/summary.txt" "$WORK/summary-copy.txt"
tar -czf "$OUT/rest.tar.gz" -C "$WORK" .
failed=$(grep -c -E ' rc=[1-9]' "$OUT/summary.txt")
echo "$CALL: $((${#PLAN[@]})) steps, ${failed} failed; files in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')" \
  | tee -a "$OUT/summary.txt"
bad=$(cd "$OUT" && find . -mindepth 1 | awk -F/ 'NF > 4' ; cd "$OUT" && find . -mindepth 1 -printf '%f\n' \
  | grep -v -E '^[A-Za-z0-9._-]+$')
nfiles=$(find "$OUT" -type f | wc -l)
if [ "$nfiles" -gt 8 ] || [ -n "$bad" ]; then
  echo "the device tool returns at most 8 files, 2 folders down, plain names: $nfiles files; $bad" \
    | tee -a "$OUT/summary.txt"
  exit 1
fi
rm -rf "$RUN" "$WORK"
