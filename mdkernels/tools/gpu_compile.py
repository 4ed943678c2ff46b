"""Compile the Triton kernels for a CUDA architecture without a GPU (Triton ships ptxas).

CI has no GPU and runs the kernels in Triton's interpreter, which accepts code the GPU compiler
rejects (non-constexpr globals, dtype mismatches in ``tl.dot``, unsupported layouts). This module
compiles each kernel, with the exact constexprs its launcher uses, down to a cubin for sm_80/sm_90:

    python -m mdkernels.tools.gpu_compile           # every op, bf16/fp16/fp32, sm_80 and sm_90

Must run without ``TRITON_INTERPRET=1`` (the decorator then yields interpretable functions).
"""

from __future__ import annotations

import importlib
import sys
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


def main(archs=(80, 90)) -> int:
    failures = 0
    for arch in archs:
        for name, fn, sig, const, opts in all_specs():
            t0 = time.perf_counter()
            try:
                k = compile_kernel(fn, sig, const, opts, arch)
                print(f"ok   sm_{arch} {name}: {len(k.asm['cubin'])} B cubin, {time.perf_counter() - t0:.1f}s")
            except Exception as err:  # report every kernel, then fail
                failures += 1
                print(f"FAIL sm_{arch} {name}: {type(err).__name__}: {str(err)[:2000]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
