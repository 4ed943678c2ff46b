"""Compile the Triton kernels for a CUDA architecture without a GPU (Triton ships ptxas).

CI has no GPU and runs the kernels in Triton's interpreter, which accepts code the GPU compiler
rejects (non-constexpr globals, dtype mismatches in ``tl.dot``, unsupported layouts). This module
compiles each kernel, with the exact constexprs its launcher uses, down to a cubin for sm_80/sm_90, and
runs Triton's ptxas with ``-v`` on its PTX to read the registers and spills:

    python -m mdkernels.tools.gpu_compile           # every op, bf16/fp16/fp32, sm_80 and sm_90

A kernel that fails to compile, or spills registers at its default configuration, is a failure.

Must run without ``TRITON_INTERPRET=1`` (the decorator then yields interpretable functions).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from mdkernels.ops import OPS


def compile_kernel(fn, runtime_sig: dict, constexprs: dict, options: dict, arch: int):
    """Compile ``fn`` for ``sm_<arch>``; returns the compiled kernel (its ``asm`` holds ptx and cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    missing = set(fn.arg_names) - set(runtime_sig) - set(constexprs)
    if missing:
        raise ValueError(f"{fn.__name__}: no signature for {sorted(missing)}")
    sig = {name: ("constexpr" if name in constexprs else runtime_sig[name]) for name in fn.arg_names}
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn, sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(kernel, arch: int) -> tuple[int, int]:
    """``(registers, spilled bytes)`` of a compiled kernel: Triton's own ptxas, ``-v``, on its PTX."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"  # Triton's sm_90 PTX uses the sm_90a features
        out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.devnull], capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if out.returncode != 0 or regs is None or spills is None:
        raise RuntimeError(f"ptxas -v failed: {text[-1000:]}")
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))


def all_specs(dtypes=(torch.bfloat16, torch.float16, torch.float32)) -> list:
    """(name, kernel, signature, constexprs, options) of every Triton kernel in the registry's ops: each
    op's ``triton_backend.compile_specs(dtype)``, for every dtype it takes (triplet distances are fp32)."""
    specs = []
    for name, op in OPS.items():
        if op.package is None or "triton" not in op.backends:
            continue
        backend = importlib.import_module(f"{op.package}.triton_backend")
        for dtype in (torch.float32,) if name == "triplet_distill" else dtypes:
            specs += [(f"{kernel} {dtype}", *rest) for kernel, *rest in backend.compile_specs(dtype)]
    return specs


_JOBS: list = []  # (arch, spec), set before the worker processes fork (kernels do not pickle)


def _check(index: int) -> tuple[bool, str]:
    """Compile one (arch, spec) of ``_JOBS`` and read its registers and spills: ``(ok, report line)``."""
    arch, (name, fn, sig, const, opts) = _JOBS[index]
    t0 = time.perf_counter()
    try:
        k = compile_kernel(fn, sig, const, opts, arch)
        regs, spilled = resource_usage(k, arch)
    except Exception as err:  # report every kernel, then fail
        return False, f"FAIL sm_{arch} {name}: {type(err).__name__}: {str(err)[:2000]}"
    line = (f"sm_{arch} {name}: {regs} registers, {spilled} B spilled, {k.metadata.shared // 1024} KiB shared, "
            f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
    return spilled == 0, ("ok   " if spilled == 0 else "FAIL ") + line


def main(archs=(80, 90)) -> int:
    """Every (arch, kernel) in parallel over the CPU's cores; 1 if any fails or spills."""
    import concurrent.futures
    import multiprocessing

    _JOBS[:] = [(arch, spec) for arch in archs for spec in all_specs()]
    workers = max(1, min(len(_JOBS), os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_check, range(len(_JOBS))))
    for _, line in results:
        print(line)
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
