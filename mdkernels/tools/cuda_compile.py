"""Compile the CUDA C++ sources (csrc/*.cu) for every arch of a build, as the build does, without a GPU:

    python -m mdkernels.tools.cuda_compile                               # the machine's nvcc, the default archs
    python -m mdkernels.tools.cuda_compile --nvcc /path/to/nvcc -I/path/to/cuda/include --archs "80-real;90-real"

For each real arch, ``nvcc -Xptxas -v`` must report no register spill in any kernel (every dtype and layout
instantiation); for each virtual arch the PTX must compile (its machine code is the driver's). The shared
memory of the margin kernels' layouts is checked at compile time by ``static_assert`` (csrc/margin_ce.cu:
every layout within an A100's 163 KiB, the 128-column one within the 99 KiB of sm_86/89/120), so a source
that would not fit fails here. Needs the source tree (csrc/ beside the package).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

SOURCES = ("margin_ce.cu", "margin_target.cu", "l2norm.cu", "angular_distill.cu")
DEFAULT_ARCHS = "80-real;90-real;90-virtual"  # as CMakeLists.txt and setup.py


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    for cand in (found, os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand):
            return cand
    return None


def csrc_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "csrc"


def compile_source(nvcc: str, source: Path, arch: str, includes: list[str]) -> tuple[bool, str]:
    """``(ok, report)`` of one source for one CMake-style arch (``90-real``, ``90-virtual`` or ``90``)."""
    number, _, kind = arch.partition("-")
    if kind == "virtual":
        cmd = [nvcc, "-std=c++17", "-ptx", f"-arch=compute_{number}", *includes, f"-I{source.parent}", str(source),
               "-o", os.devnull]  # fmt: skip
    else:
        cmd = [nvcc, "-std=c++17", "-c", f"-arch=sm_{number}", "-Xptxas", "-v", *includes, f"-I{source.parent}",
               str(source), "-o", os.devnull]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return False, f"FAIL {source.name} {arch}: nvcc failed: {res.stderr[-1500:]}"
    if kind == "virtual":
        return True, f"ok   {source.name} {arch}: PTX"
    kernels = re.findall(r"Compiling entry function '(\w+)'", res.stderr)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    if not kernels or len(spills) != len(kernels):
        return False, f"FAIL {source.name} {arch}: could not read ptxas -v: {res.stderr[-1500:]}"
    bad = [k for k, (st, ld) in zip(kernels, spills, strict=True) if int(st) or int(ld)]
    if bad:
        return False, f"FAIL {source.name} {arch}: spills in {bad}"
    return True, f"ok   {source.name} {arch}: {len(kernels)} kernels, 0 B spilled"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdkernels.tools.cuda_compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--nvcc", default=None, help="the nvcc to use (default: PATH, then $CUDA_HOME/bin)")
    p.add_argument("--archs", default=DEFAULT_ARCHS, help=f"CMake-style archs (default: {DEFAULT_ARCHS})")
    p.add_argument("-I", dest="includes", action="append", default=[], help="extra include folder (repeatable)")
    args = p.parse_args(argv)
    nvcc = args.nvcc or find_nvcc()
    if nvcc is None:
        raise SystemExit("no nvcc found (pass --nvcc or set CUDA_HOME)")
    src = csrc_dir()
    if not src.is_dir():
        raise SystemExit(f"needs the source tree: {src} not found")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    # "Cuda compilation tools, release 13.0, V13.0.88" (scripts/compat.py reads the release from it)
    print(next((line for line in version if "release" in line), version[-1] if version else "nvcc: version unknown"))
    includes = [f"-I{i}" for i in args.includes]
    archs = [a.strip() for a in args.archs.replace(",", ";").split(";") if a.strip()]
    results = [compile_source(nvcc, src / name, arch, includes) for name in SOURCES for arch in archs]
    for _, line in results:
        print(line)
    kernels = sum(int(m.group(1)) for _, line in results if (m := re.search(r": (\d+) kernels", line)))
    ok = all(good for good, _ in results)
    print(f"{kernels} kernels over {len(archs)} archs ({', '.join(archs)}): " + ("0 spills" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
