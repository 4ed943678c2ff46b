"""Time the two test tiers of docs/testing.md on this machine, one after the other, and record them.

    python scripts/test_tiers.py                 # writes bench/results/test_tiers.txt

Each tier runs as the docs give it (``TRITON_INTERPRET=1 pytest python_tests -q``, with ``-m "not slow"`` for the
quick tier) from an empty folder, against the installed package. The record names the machine, the versions and the
commit, and each tier's outcome line, test count and wall time. Run it on an idle machine: a loaded one takes
longer, and the figures are the docs' promise.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIERS = {"quick": ["-m", "not slow"], "full": []}


def cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def main() -> int:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"  # fmt: skip
    versions = f"Python {platform.python_version()}, torch {torch.__version__}, Triton {triton_version}"
    lines = [f"test tiers of docs/testing.md at commit {commit}", f"machine: {cpu()}; {versions}", ""]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    status = 0
    for tier, extra in TIERS.items():
        cmd = [sys.executable, "-m", "pytest", str(REPO / "python_tests"), "-q", "-p", "no:cacheprovider", *extra]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.mkdtemp())
        seconds = time.perf_counter() - t0
        outcome = next((line for line in reversed(res.stdout.splitlines()) if re.search(r"\d+ (passed|failed)", line)),
                       "no outcome line")  # fmt: skip
        ran = sum(int(n) for n in re.findall(r"(\d+) (?:passed|failed|errors?)", outcome))
        took = f"{seconds / 60:.1f} min ({int(seconds // 60)} min {int(seconds % 60)} s)"
        lines.append(f"{tier}: {took}, {ran} tests run; exit code {res.returncode}; {outcome.strip('= ')}")
        print(lines[-1], flush=True)
        status = status or res.returncode
    out = REPO / "bench" / "results" / "test_tiers.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"written: {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
