"""A long random soak of the fuzz tests (python_tests/test_fuzz.py), outside the suite, with its log committed.

    python scripts/soak.py --examples 30 --seed 1     # 30 x the per-backend factor: 300 torch, 120 Triton, 90 CUDA

Every public loss on every backend here (torch; Triton under its interpreter; the CUDA C++ kernels under the
emulator where nvcc built them) against the fp64 reference, with hypothesis drawing at random from the seed. The
report (machine, versions, commit, seed, cases per loss and backend, each test's outcome, the time) goes to
``--out`` (``bench/results/soak.txt`` by default); a failing case prints its reproduction blob there.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FACTORS = {"torch": 10, "triton": 4, "cuda": 3}  # test_fuzz.py's EXAMPLES


def _cpu() -> str:
    """The CPU's model name (as bench/harness.py names the machine)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=30, help="base examples per test (x 10 torch, 4 Triton, 3 CUDA)")
    p.add_argument("--seed", type=int, default=1, help="hypothesis's seed (the draws are random, reproducible)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "soak.txt"), help="where the report goes")
    args = p.parse_args(argv)
    env = {**os.environ, "MDK_SOAK_EXAMPLES": str(args.examples), "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(REPO / "python_tests" / "test_fuzz.py"), "-p", "no:cacheprovider",
           "-q", "-rA", "--hypothesis-profile=soak", f"--hypothesis-seed={args.seed}"]  # fmt: skip
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO / "python_tests")
    seconds = time.perf_counter() - t0
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    outcome = [line for line in run.stdout.splitlines() if line.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))]
    cases = ", ".join(f"{b} {args.examples * f}" for b, f in FACTORS.items())
    report = "\n".join([
        f"soak of python_tests/test_fuzz.py: {args.examples} base examples per test ({cases} cases per loss), "
        f"hypothesis seed {args.seed}",
        f"machine: {_cpu()}, {os.cpu_count()} cores; Python "
        f"{platform.python_version()}, torch {torch.__version__}; mdkernels commit {commit.strip()}",
        f"exit code {run.returncode}, {seconds / 60:.1f} min",
        "",
        *outcome,
        "",
        *(run.stdout.splitlines()[-40:] if run.returncode else []),
    ])  # fmt: skip
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report + "\n")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
