"""Time the two test tiers of docs/testing.md on this machine, one after the other, and record them.

    python scripts/test_tiers.py                 # writes bench/results/test_tiers.txt
    python scripts/test_tiers.py --tier quick    # re-times one tier, keeping the other's line (and its commit)

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


def kept_lines(path: Path, skip: set[str], machine: str) -> dict[str, str]:
    """The tier lines of an earlier record on this ``machine`` (another machine's line would be mislabelled), each
    naming its commit (older records named it once, in the header)."""
    if not path.is_file():
        return {}
    text = path.read_text()
    if machine not in text.splitlines():
        return {}
    header = re.search(r"at commit ([0-9a-f]{7,40})", text)
    kept, tier = {}, None
    for line in text.splitlines():
        m = re.match(r"^(quick|full)( at [0-9a-f]{7,40})?: (.*)$", line)
        if m:
            tier = m.group(1) if m.group(1) not in skip else None
            if tier:
                at = m.group(2) or (f" at {header.group(1)}" if header else " at unknown")
                kept[tier] = f"{tier}{at}: {m.group(3)}"
        elif tier and line.startswith("    failed: "):
            kept[tier] += "\n" + line
    return kept


def main() -> int:
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tier", choices=sorted(TIERS), action="append", help="only these tiers (default: both)")
    tiers = ap.parse_args().tier or list(TIERS)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"  # fmt: skip
    versions = f"Python {platform.python_version()}, torch {torch.__version__}, Triton {triton_version}"
    out = REPO / "bench" / "results" / "test_tiers.txt"
    machine = f"machine: {cpu()}; {versions}"
    kept = kept_lines(out, set(tiers), machine)
    lines = ["test tiers of docs/testing.md (each line names the commit it ran at)", machine, ""]
    done = {}
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    status = 0
    for tier in tiers:
        extra = TIERS[tier]
        cmd = [sys.executable, "-m", "pytest", str(REPO / "python_tests"), "-q", "-rf", "-p", "no:cacheprovider",
               *extra]  # fmt: skip
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.mkdtemp())
        seconds = time.perf_counter() - t0
        outcome = next((line for line in reversed(res.stdout.splitlines()) if re.search(r"\d+ (passed|failed)", line)),
                       "no outcome line")  # fmt: skip
        ran = sum(int(n) for n in re.findall(r"(\d+) (?:passed|failed|errors?)", outcome))
        took = f"{seconds / 60:.1f} min ({int(seconds // 60)} min {int(seconds % 60)} s)"
        failed = [line.split("python_tests/")[-1] for line in res.stdout.splitlines() if line.startswith("FAILED ")]
        done[tier] = f"{tier} at {commit}: {took}, {ran} tests run; exit code {res.returncode}; {outcome.strip('= ')}"
        done[tier] += "".join(f"\n    failed: {name}" for name in failed)  # which, so that a record explains itself
        print(done[tier], flush=True)
        status = status or res.returncode
    lines += [done.get(tier) or kept.get(tier) for tier in TIERS if done.get(tier) or kept.get(tier)]
    out.write_text("\n".join(lines) + "\n")
    print(f"written: {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
