"""Compile the Triton kernels for CUDA architectures without a GPU, as a launch compiles them.

CI has no GPU and runs the kernels in Triton's interpreter, which accepts code the GPU compiler rejects
(non-constexpr globals, dtype mismatches in ``tl.dot``, unsupported layouts) and says nothing of registers.
This module compiles each kernel down to a cubin with the constexprs its launcher passes and the
specialisation a real launch gets (pointers and the integer arguments a launch sees as multiples of 16
carry ``tt.divisibility=16``), then runs the ptxas that Triton itself uses for that arch
(``get_ptxas(arch)``: Triton 3.9 compiles sm_90 with its newer ``ptxas-blackwell``) with ``-v`` on the PTX:

    python -m mdkernels.tools.gpu_compile                  # every op, bf16/fp16/fp32, sm_80 and sm_90
    python -m mdkernels.tools.gpu_compile --archs 80,90,100,120

A kernel fails when it does not compile, spills registers at its default configuration, or needs more
shared memory than every GPU of its family has (:data:`SMEM_LIMIT`). Fast-fact lines report whether the
sm_90 kernels use wgmma. An arch that this Triton cannot target (sm_100/sm_120 before Triton 3.3) is
reported as ``skip``. Must run without ``TRITON_INTERPRET=1`` (the decorator then yields interpretable
functions). Works with Triton 3.2 to 3.9, whose compile APIs differ (see :func:`compile_kernel`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from mdkernels.ops import OPS

KIB = 1024
# The dynamic shared memory a block may use (opt-in), for the GPUs that run a kernel compiled for an arch.
# Triton compiles at the device's capability, with the same tiles for sm_80, sm_86 and sm_89, so an sm_80
# kernel must fit the smallest of that family: the 99 KiB of sm_86/sm_89 (RTX 30xx/40xx, A10, A40, L4, L40S).
SMEM_LIMIT = {80: 99 * KIB, 90: 227 * KIB, 100: 227 * KIB, 120: 99 * KIB}
SMEM_FAMILY = {80: "sm_86/sm_89", 90: "sm_90", 100: "sm_100", 120: "sm_120"}


def triton_version() -> tuple[int, int]:
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def ptxas(arch: int) -> str:
    """The ptxas binary that this Triton uses for ``sm_<arch>`` (its API changed in 3.3, 3.4 and 3.6)."""
    from triton.backends.nvidia import compiler as nv

    if not hasattr(nv, "get_ptxas"):  # 3.2
        return nv._path_to_binary("ptxas")[0]
    tool = nv.get_ptxas(arch) if inspect.signature(nv.get_ptxas).parameters else nv.get_ptxas()
    return tool.path if hasattr(tool, "path") else tool[0]  # an NvidiaTool (3.4+) or (path, version) (3.3)


def gpu_name(arch: int) -> str:
    """ptxas's ``--gpu-name`` for Triton's PTX: the ``a`` features from sm_90 on, as Triton compiles it."""
    from triton.backends.nvidia import compiler as nv

    if hasattr(nv, "sm_arch_from_capability"):
        return nv.sm_arch_from_capability(arch)
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def compile_kernel(fn, runtime_sig: dict, constexprs: dict, options: dict, arch: int, divisible: set | None = None):
    """Compile ``fn`` for ``sm_<arch>``; returns the compiled kernel (its ``asm`` holds ptx and cubin).

    ``divisible``: the integer arguments a real launch sees as multiples of 16; every pointer argument is
    16-byte aligned (torch's allocations are). The hint changes the generated code (vector widths,
    unrolling, registers), so compiling without it checks another kernel than the one that runs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    missing = set(fn.arg_names) - set(runtime_sig) - set(constexprs)
    if missing:
        raise ValueError(f"{fn.__name__}: no signature for {sorted(missing)}")
    sig = {name: ("constexpr" if name in constexprs else runtime_sig[name]) for name in fn.arg_names}
    hinted = [i for i, name in enumerate(fn.arg_names) if name not in constexprs
              and (runtime_sig[name].startswith("*") or name in (divisible or ()))]  # fmt: skip
    options = {"enable_fp_fusion": True, **options}
    if triton_version() < (3, 3):  # constants by name, and an AttrsDescriptor for the hints
        from triton.backends.compiler import AttrsDescriptor

        src = ASTSource(fn, sig, constants=dict(constexprs), attrs=AttrsDescriptor.from_hints({i: 16 for i in hinted}))
    else:
        consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
        src = ASTSource(fn, sig, constexprs=consts, attrs={(i,): [["tt.divisibility", 16]] for i in hinted})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(kernel, arch: int) -> tuple[int, int]:
    """``(registers, spilled bytes)`` of a compiled kernel: Triton's own ptxas for the arch, ``-v``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run([ptxas(arch), "-v", f"--gpu-name={gpu_name(arch)}", src, "-o", os.devnull],
                             capture_output=True, text=True)  # fmt: skip
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if out.returncode != 0 or regs is None or spills is None:
        raise RuntimeError(f"ptxas -v failed: {text[-1000:]}")
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))


def uses_wgmma(kernel) -> bool:
    """True when the PTX holds Hopper's warpgroup MMA (``wgmma.mma_async``)."""
    return "wgmma.mma_async" in kernel.asm["ptx"]


def all_specs(arch: int, dtypes=(torch.bfloat16, torch.float16, torch.float32)) -> list:
    """(name, kernel, signature, constexprs, options, divisible) of every Triton kernel in the registry's
    ops on ``sm_<arch>``: each op's ``triton_backend.compile_specs(dtype, arch)``, for every dtype it takes
    (triplet distances are fp32)."""
    specs = []
    for name, op in OPS.items():
        if op.package is None or "triton" not in op.backends:
            continue
        backend = importlib.import_module(f"{op.package}.triton_backend")
        for dtype in (torch.float32,) if name in ("triplet_distill",) else dtypes:
            specs += [(f"{kernel} {dtype}", *rest) for kernel, *rest in backend.compile_specs(dtype, arch)]
    return specs


def arch_supported(arch: int) -> bool:
    """Whether this Triton can target ``sm_<arch>``: its ptxas for the arch knows the arch."""
    try:
        out = subprocess.run([ptxas(arch), "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return False
    return f"sm_{arch}" in out.stdout + out.stderr


_JOBS: list = []  # (arch, spec), set before the worker processes fork (kernels do not pickle)


def _check(index: int) -> tuple[bool, str]:
    """Compile one (arch, spec) of ``_JOBS``: ``(ok, report line)``."""
    arch, (name, fn, sig, const, opts, divisible) = _JOBS[index]
    t0 = time.perf_counter()
    try:
        k = compile_kernel(fn, sig, const, opts, arch, divisible)
        regs, spilled = resource_usage(k, arch)
    except Exception as err:  # report every kernel, then fail
        return False, f"FAIL sm_{arch} {name}: {type(err).__name__}: {str(err)[:2000]}"
    shared = k.metadata.shared
    fits = shared <= SMEM_LIMIT[arch]
    ok = spilled == 0 and fits
    line = (f"sm_{arch} {name}: {regs} registers, {spilled} B spilled, {shared / KIB:.1f} KiB shared"
            + ("" if fits else f" > {SMEM_LIMIT[arch] // KIB} KiB ({SMEM_FAMILY[arch]})")
            + (", wgmma" if arch >= 90 and uses_wgmma(k) else "") + f", {time.perf_counter() - t0:.1f}s")  # fmt: skip
    return ok, ("ok   " if ok else "FAIL ") + line


def main(argv: list[str] | None = None) -> int:
    """Every (arch, kernel) in parallel over the CPU's cores; 1 if any fails, spills or overflows."""
    import concurrent.futures
    import multiprocessing

    p = argparse.ArgumentParser(prog="python -m mdkernels.tools.gpu_compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="80,90", help="comma-separated compute capabilities (default: 80,90)")
    p.add_argument("--only", default="", help="only kernels whose name contains this text")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("gpu_compile needs the real compiler: unset TRITON_INTERPRET")
    archs = [int(a) for a in args.archs.split(",") if a.strip()]
    for arch in archs:
        if arch not in SMEM_LIMIT:
            raise SystemExit(f"--archs: no shared-memory limit known for sm_{arch} (known: {sorted(SMEM_LIMIT)})")
    runnable = [a for a in archs if arch_supported(a)]
    for arch in sorted(set(archs) - set(runnable)):
        print(f"skip sm_{arch}: the ptxas of this Triton cannot target it")
    _JOBS[:] = [(arch, spec) for arch in runnable for spec in all_specs(arch) if args.only in spec[0]]
    workers = max(1, min(len(_JOBS), os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_check, range(len(_JOBS))))
    for _, line in results:
        print(line)
    import triton

    print(f"triton {triton.__version__}: {sum(ok for ok, _ in results)} of {len(results)} kernels ok")
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
