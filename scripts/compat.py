#!/usr/bin/env python3
"""The version matrix: one fresh virtual environment per supported torch / Triton pair, and each CUDA
toolkit that must compile ``csrc/``. Prints one Markdown table (and writes it with ``--out``).

    python scripts/compat.py                          # every row (about an hour and ~15 GB of downloads)
    python scripts/compat.py --rows triton-3.9,nvcc-12.4 --out bench/results/compat.md

Rows:
  triton-X    torch 2.13.0 (the CPU wheel) with Triton X, X in 3.2 ... 3.9;
  torch-X     torch X from PyPI (its CUDA build, run on the CPU) with the Triton it pins;
  nvcc-X      the CUDA C++ sources compiled by nvcc X for every default arch, from PyPI's nvidia-cuda-nvcc
              wheels where they hold an nvcc (the 12.x wheels hold ptxas alone: the row says so);
              ``nvcc-machine``: the nvcc on PATH.

Each Python row installs the package from one wheel built here (``pip wheel .``, the C++ modules carry no
torch headers, so one wheel serves every torch) the way a user does, ``pip install "<wheel>[test]"`` after
its torch, and runs, from an empty folder:
  1. ``mdk info``;
  2. ``TRITON_INTERPRET=1 python -m mdkernels.tools.selfcheck``: every Triton op once against the reference
     (with ``--torch-checks`` on the torch rows and triton-3.9: ``opcheck`` and ``torch.compile(fullgraph=True)``);
  3. ``python -m mdkernels.tools.gpu_compile --archs 80,90,100,120``: every Triton kernel compiled as a
     launch compiles it, with that Triton's own ptxas, without spills; sm_100/sm_120 where that Triton
     has them.
Not part of CI (it takes too long); CI runs one row, the versions the README's install line resolves.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRITONS = {"3.2": "3.2.0", "3.3": "3.3.1", "3.4": "3.4.0", "3.5": "3.5.1", "3.6": "3.6.0", "3.7": "3.7.1",
           "3.8": "3.8.0", "3.9": "3.9.0"}  # fmt: skip
TORCHES = {"2.6": "2.6.0", "2.8": "2.8.0", "2.9": "2.9.1", "2.10": "2.10.0", "2.14": "2.14.1", "2.15": "2.15.0"}
NVCCS = {"12.4": "12.4.*", "12.8": "12.8.*"}  # the nvcc, runtime and cccl wheels of one release differ in patch
TORCH_CPU = "torch==2.13.0"  # the CPU wheel (an unpinned torch is a CUDA build of several GB)


def all_rows() -> list[str]:
    return ([f"triton-{v}" for v in TRITONS] + [f"torch-{v}" for v in TORCHES] + [f"nvcc-{v}" for v in NVCCS]
            + ["nvcc-machine"])  # fmt: skip


def sh(cmd: list[str], log: Path, timeout: int, env: dict | None = None, cwd: Path | None = None) -> tuple[int, str]:
    """Run ``cmd``, append its output to ``log``; ``(returncode, output)`` (124 on timeout)."""
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        code, out = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as exc:
        code, out = 124, f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {timeout}s"
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}   # rc={code}, {time.perf_counter() - t0:.0f}s\n{out}\n")
    return code, out if isinstance(out, str) else out.decode(errors="replace")


def build_wheel(work: Path, log: Path) -> Path:
    dist = work / "wheel"
    shutil.rmtree(dist, ignore_errors=True)
    code, out = sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(REPO)], log, 1800)
    wheels = list(dist.glob("mdkernels-*.whl"))
    if code or not wheels:
        raise SystemExit(f"building the wheel failed (see {log})")
    return wheels[0]


def python_row(row: str, wheel: Path, work: Path, log: Path) -> dict:
    kind, version = row.split("-", 1)
    venv = work / row
    shutil.rmtree(venv, ignore_errors=True)
    sh([sys.executable, "-m", "venv", str(venv)], log, 300)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    result = {"row": row, "torch": "", "triton": "", "info": "", "selfcheck": "", "compile": "", "notes": ""}
    torch_spec = TORCH_CPU if kind == "triton" else f"torch=={TORCHES[version]}"
    code, out = sh(pip + [torch_spec], log, 3600)
    # the package as a user installs it, with this row's versions held: a version below the declared floor
    # (pyproject.toml's test extra) cannot be resolved, and the row says so
    held = [torch_spec] + ([f"triton=={TRITONS[version]}"] if kind == "triton" else [])
    if code == 0:
        code, out = sh(pip + [f"{wheel}[test]", *held], log, 1800)
    if code:
        last = out.strip().splitlines()[-1][:200] if out.strip() else "?"
        below = "ResolutionImpossible" in out or "conflicting dependencies" in out
        result["notes"] = ("below the declared floor (pip refuses it: ResolutionImpossible)" if below
                           else "install failed: " + last)  # fmt: skip
        return result
    empty = Path(tempfile.mkdtemp(prefix="mdk-compat-"))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    code, out = sh([py, "-c", "import torch, triton; print(torch.__version__, triton.__version__)"], log, 300,
                   env=env, cwd=empty)  # fmt: skip
    if code == 0:
        result["torch"], result["triton"] = out.split()[-2:]
    code, out = sh([str(venv / "bin" / "mdk"), "info"], log, 300, env=env, cwd=empty)
    result["info"] = "ok" if code == 0 else "FAIL: " + (out.strip().splitlines() or ["?"])[-1][:160]
    newest = max(TRITONS, key=lambda v: int(v.split(".")[1]))
    checks = ["--torch-checks"] if kind == "torch" or version == newest else []
    code, out = sh([py, "-m", "mdkernels.tools.selfcheck", *checks], log, 1800, env=dict(env, TRITON_INTERPRET="1"),
                   cwd=empty)  # fmt: skip
    summary = re.search(r"(\d+) ok, (\d+) failed", out)
    result["selfcheck"] = (f"{summary.group(1)} ok" + (" (+opcheck, compile)" if checks else "")
                           if code == 0 and summary else "FAIL: " + _first_failure(out))  # fmt: skip
    code, out = sh([py, "-m", "mdkernels.tools.gpu_compile", "--archs", "80,90,100,120"], log, 3600, env=env, cwd=empty)
    result["compile"] = _compile_summary(code, out)
    shutil.rmtree(empty, ignore_errors=True)
    return result


def _first_failure(out: str) -> str:
    for line in out.splitlines():
        if line.startswith("FAIL") or "Error" in line:
            return line[:200]
    return (out.strip().splitlines() or ["?"])[-1][:200]


def _compile_summary(code: int, out: str) -> str:
    """``sm_80 56 ok, sm_90 56 ok, sm_100 n/a`` from gpu_compile's lines."""
    parts = []
    for arch in (80, 90, 100, 120):
        if re.search(rf"^skip sm_{arch}\b", out, re.M):
            parts.append(f"sm_{arch} n/a")
            continue
        ok = len(re.findall(rf"^ok\s+sm_{arch}\b", out, re.M))
        bad = len(re.findall(rf"^FAIL sm_{arch}\b", out, re.M))
        if ok or bad:
            parts.append(f"sm_{arch} {ok} ok" + (f" {bad} FAIL" if bad else ""))
    text = ", ".join(parts) or "FAIL: " + _first_failure(out)
    return text if code == 0 else text + (" (" + _first_failure(out)[:120] + ")" if "FAIL" not in text else "")


def nvcc_row(row: str, work: Path, log: Path) -> dict:
    version = row.split("-", 1)[1]
    result = {"row": row, "torch": "", "triton": "", "info": "", "selfcheck": "", "compile": "", "notes": ""}
    if version == "machine":
        nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
        includes: list[str] = []
    else:
        venv = work / row
        shutil.rmtree(venv, ignore_errors=True)
        sh([sys.executable, "-m", "venv", str(venv)], log, 300)
        full = NVCCS[version]
        code, out = sh([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"nvidia-cuda-nvcc-cu12=={full}",
                        f"nvidia-cuda-runtime-cu12=={full}", f"nvidia-cuda-cccl-cu12=={full}"], log, 1800)  # fmt: skip
        if code:
            result["notes"] = "install failed: " + out.strip().splitlines()[-1][:200]
            return result
        root = next((venv / "lib").glob("python3*/site-packages/nvidia"))
        nvcc = str(root / "cuda_nvcc" / "bin" / "nvcc")
        if not Path(nvcc).exists():  # seen for 12.4.131, 12.8.93 and 12.9.86: bin/ holds ptxas alone
            result["triton"] = f"nvcc {version}"
            result["compile"] = "not run"
            result["notes"] = (f"below the declared floor (setup.py: nvcc >= 13.0); not compiled either: "
                               f"PyPI's nvidia-cuda-nvcc-cu12 {version} holds ptxas and libnvvm, no nvcc "
                               "driver or cicc")  # fmt: skip
            return result
        includes = [f"-I{root / sub / 'include'}" for sub in ("cuda_runtime", "cuda_cccl", "cuda_nvcc")]
    code, out = sh([sys.executable, "-m", "mdkernels.tools.cuda_compile", "--nvcc", nvcc, *includes], log, 3600,
                   env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, cwd=REPO)  # fmt: skip
    version_line = re.search(r"release (\d+\.\d+)", out)  # the line cuda_compile prints first
    result["triton"] = f"nvcc {version_line.group(1)}" if version_line else "nvcc ?"
    summary = re.search(r"^(\d+) kernels? .*$", out, re.M)
    result["compile"] = (summary.group(0) if code == 0 and summary else "FAIL: " + _first_failure(out))
    return result


def table(results: list[dict], date: str, machine: str) -> str:
    lines = [
        f"Ran {date} on {machine}, Python {platform.python_version()}, by `python scripts/compat.py`.",
        "",
        "| row | torch | Triton / nvcc | `mdk info` | selfcheck (interpreter) | compile check | notes |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in results:
        lines.append(f"| {r['row']} | {r['torch']} | {r['triton']} | {r['info']} | {r['selfcheck']} | {r['compile']} "
                     f"| {r['notes']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def machine_name() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, no GPU" if not shutil.which("nvidia-smi") else model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(all_rows()), help=f"comma-separated rows (default: all: {all_rows()})")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "mdk-compat"), help="venvs and logs go here")
    p.add_argument("--out", help="also write the table to this Markdown file")
    p.add_argument("--keep", action="store_true", help="keep each row's venv (default: removed after the row)")
    args = p.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(all_rows()))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {all_rows()}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "compat.log"
    wheel = build_wheel(work, log) if any(not r.startswith("nvcc") for r in rows) else None
    results = []
    for row in rows:
        t0 = time.perf_counter()
        r = nvcc_row(row, work, log) if row.startswith("nvcc") else python_row(row, wheel, work, log)
        r["notes"] = (r["notes"] + "; " if r["notes"] else "") + f"{time.perf_counter() - t0:.0f} s"
        results.append(r)
        print(f"{row}: {r}", flush=True)
        if not args.keep and row.startswith(("triton", "torch", "nvcc-1")):
            shutil.rmtree(work / row, ignore_errors=True)
    text = table(results, datetime.date.today().isoformat(), machine_name())
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if all("FAIL" not in str(r) and "failed" not in r["notes"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
