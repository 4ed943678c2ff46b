#!/usr/bin/env bash
# The benchmarks' peers as wheels for the lent GPU machine, which has no internet: Liger-Kernel (fused linear
# cross-entropy), cut-cross-entropy and pytorch-metric-learning (its ArcFaceLoss), for Python 3.12 on x86-64 Linux,
# into .whl/ (git-ignored). The device call names .whl in `carry`; bench/gpu_check.sh installs them with --no-index.
# What they need (torch, triton, numpy, scikit-learn, tqdm) is on that machine's image (torch 2.11, Triton 3.6,
# numpy 2.5), so they are fetched without their dependencies. The pins are the versions the GPU check was written
# against; change them here only.
#
#   bash scripts/peer_wheels.sh          # then, in the device call: carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 pytorch-metric-learning==2.9.0)
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "${PEERS[@]}"
for whl in .whl/*.whl; do  # every requirement but the image's must be carried too: say so, do not guess
  needs=$(unzip -p "$whl" '*/METADATA' | grep '^Requires-Dist:' | grep -v 'extra *==' \
    | sed 's/^Requires-Dist: *\([A-Za-z0-9_.-]*\).*/\1/' | grep -v -i -E '^(torch|triton|numpy|scikit-learn|tqdm)$' || true)
  [ -z "$needs" ] || { echo "$whl needs $needs, which the GPU image may lack: add it to PEERS" >&2; exit 1; }
done
ls -l .whl
echo "$(du -sh .whl | cut -f1) in .whl/ (the device call carries at most 64 MiB in all)"
