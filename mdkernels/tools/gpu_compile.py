"""Compile the Triton kernels for CUDA architectures without a GPU, as a launch compiles them.

CI has no GPU and runs the kernels in Triton's interpreter, which accepts code the GPU compiler rejects
(non-constexpr globals, dtype mismatches in ``tl.dot``, unsupported layouts) and says nothing of registers.
This module compiles each kernel down to a cubin with the constexprs its launcher passes and the
specialisation a real launch gets (pointers, and the integer arguments a launch sees as multiples of 16, carry
``tt.divisibility=16``; a 1 is a constant), with the options every launch passes, and reads the registers and
spills from the log of the ptxas run Triton itself makes for the cubin (:func:`compile_and_measure`):

    python -m mdkernels.tools.gpu_compile                  # the headline kernels (HEADLINE), sm_80 and sm_90
    python -m mdkernels.tools.gpu_compile --all            # the whole launch space, sm_80 to sm_120 (an hour)
    python -m mdkernels.tools.gpu_compile --all --record bench/results/compile_check.txt

The launch space (:func:`launch_space`) is every distinct kernel the launchers' own tile choice can give. A kernel
fails when it does not compile, spills registers, needs more shared memory than every GPU of its family has
(:data:`SMEM_LIMIT`), or, on sm_90, lacks wgmma where its tile allows it (:func:`wants_wgmma`). An arch that this
Triton cannot target is reported as ``skip``. Must run without ``TRITON_INTERPRET=1`` (the decorator then yields
interpretable functions). Works with Triton 3.2 to 3.9, whose compile APIs differ (see :func:`compile_kernel`).
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
SMEM_LIMIT = {80: 99 * KIB, 86: 99 * KIB, 89: 99 * KIB, 90: 227 * KIB, 100: 227 * KIB, 120: 99 * KIB}
SMEM_FAMILY = {80: "sm_86/sm_89", 86: "sm_86", 89: "sm_89", 90: "sm_90", 100: "sm_100", 120: "sm_120"}


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


def specialisation(ints: dict, fn=None) -> tuple[set, dict]:
    """How a launch specialises its integer arguments, as Triton's launcher does: a value of 1 becomes a constant,
    a multiple of 16 carries ``tt.divisibility=16`` (the hint changes vector widths, unrolling and registers, so a
    kernel compiled without it is another kernel than the one that runs), except the arguments ``fn`` was
    decorated ``do_not_specialize``. Returns (hinted names, constants)."""
    fixed = {p.name for p in getattr(fn, "params", ()) if getattr(p, "do_not_specialize", False)}
    free = {k: v for k, v in ints.items() if k not in fixed}
    return {k for k, v in free.items() if v != 1 and v % 16 == 0}, {k: 1 for k, v in free.items() if v == 1}


def compile_kernel(fn, runtime_sig: dict, constexprs: dict, options: dict, arch: int, ints: dict | None = None):
    """Compile ``fn`` for ``sm_<arch>``; returns the compiled kernel (its ``asm`` holds ptx and cubin).

    ``ints``: the integer arguments' values at the launch this stands for (:func:`specialisation`); every pointer
    argument is 16-byte aligned (torch's allocations are)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    hinted_names, ones = specialisation(ints or {}, fn)
    constexprs = {**constexprs, **ones}
    missing = set(fn.arg_names) - set(runtime_sig) - set(constexprs)
    if missing:
        raise ValueError(f"{fn.__name__}: no signature for {sorted(missing)}")
    sig = {name: ("constexpr" if name in constexprs else runtime_sig[name]) for name in fn.arg_names}
    hinted = [i for i, name in enumerate(fn.arg_names) if name not in constexprs
              and (runtime_sig[name].startswith("*") or name in hinted_names)]  # fmt: skip
    from mdkernels.ops._common.env import LAUNCH_OPTIONS

    options = {**LAUNCH_OPTIONS, **options}  # what every launch passes
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


def compile_and_measure(fn, sig, const, opts, arch: int, ints: dict) -> tuple:
    """``(kernel, registers, spilled bytes)``: compiled as a launch compiles it, the registers and spills read from
    the log of the ptxas run that Triton itself made for this cubin (its own flags: ``--regAllocOptLevel=2`` with
    ptxas 13, ``-lineinfo``), where this Triton can print it (3.4 on: ``knobs.nvidia.dump_ptxas_log``); else from
    a ``ptxas -v`` of the PTX (:func:`resource_usage`)."""
    import contextlib
    import io

    try:
        from triton import knobs

        dump, always = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    except (ImportError, AttributeError):
        k = compile_kernel(fn, sig, const, opts, arch, ints)
        return (k, *resource_usage(k, arch))
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True  # a cached kernel runs no ptxas
    try:
        with contextlib.redirect_stdout(log):
            k = compile_kernel(fn, sig, const, opts, arch, ints)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = dump, always
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        return (k, *resource_usage(k, arch))
    return k, int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))


def wants_wgmma(arch: int, name: str, const: dict) -> bool:
    """Whether the tile allows Hopper's warpgroup MMA, so the compiled kernel must use it: sm_90, 16-bit dot operands
    (autocast's included) and an M of 64 (the row tile of a forward or a top-k, the class tile of a center gradient:
    ``BLOCK_C * KP``). sm_100 has its own MMA (tcgen05), not wgmma."""
    import triton.language as tl

    if arch != 90 or const.get("OP_DTYPE", const.get("ACC_DTYPE")) not in (tl.bfloat16, tl.float16):
        return False
    if name.startswith(("margin_ce_forward", "margin_kd_forward")):
        return const["BLOCK_B"] >= 64
    if name.startswith(("margin_ce_center_grad", "margin_kd_center_grad")):
        return const["BLOCK_C"] * const.get("KP", 1) >= 64
    if name.startswith("cosine_topk"):
        return const["BLOCK_Q"] >= 64
    return False


def uses_wgmma(kernel) -> bool:
    """True when the PTX holds Hopper's warpgroup MMA (``wgmma.mma_async``)."""
    return "wgmma.mma_async" in kernel.asm["ptx"]


def launch_space(arch: int) -> list:
    """Every distinct kernel a GPU launch on ``sm_<arch>`` can compile: each op's ``triton_backend.launch_specs(arch)``
    (which enumerates the launcher's own tile choice over the launch space, :data:`tiles.GPU_DTYPE_PATHS` and
    :func:`tiles.shape_representatives`), two launches that compile the same kernel counted once. Items: (name,
    kernel, runtime signature, constexprs, options, integer argument values)."""
    seen, specs = set(), []
    for op in OPS.values():
        if op.package is None or "triton" not in op.backends:
            continue
        backend = importlib.import_module(f"{op.package}.triton_backend")
        for spec in backend.launch_specs(arch):
            key = spec_key(spec)
            if key not in seen:
                seen.add(key)
                specs.append(spec)
    return specs


def spec_key(spec) -> str:
    """What makes two launches compile the same kernel: the kernel's source (with its callees', Triton's cache key),
    the signature, constexprs, options and the integers' specialisation."""
    _, fn, sig, const, opts, ints = spec
    hinted, ones = specialisation(ints, fn)
    consts = sorted((k, str(v)) for k, v in const.items())
    return repr((fn.__name__, getattr(fn, "cache_key", ""), sorted(sig.items()), consts, sorted(opts.items()),
                 sorted(hinted), sorted(ones)))


# The CI subset (test_gpu_compile): the headline shapes of each kernel, aligned: D = 128 (resident everywhere),
# 512 and 1024 (split), B = 1024 and 32 (Hopper's small-batch tile), K = 1 and 3; top-k at k = 9 and 17
HEADLINE = re.compile(r"(^margin_(ce|kd)_\w+ [^K]*(KP=(1|4) )?B=(32|1024) D=(128|512|1024) aligned$)"
                      r"|(^cosine_topk .* k=(9|17) D=(128|512) aligned$)|(^angular_\w+ .* D=(128|4032) aligned$)"
                      r"|(^triplet_all )")  # fmt: skip


def fingerprint(archs) -> str:
    """A hash of the whole launch space (every arch's :func:`spec_key` set): a record of the full check is current
    while this is unchanged (a new tile, option or kernel source changes it)."""
    import hashlib

    lines = sorted(f"sm_{arch} {spec_key(spec)}" for arch in archs for spec in launch_space(arch))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


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
    arch, (name, fn, sig, const, opts, ints) = _JOBS[index]
    t0 = time.perf_counter()
    try:
        k, regs, spilled = compile_and_measure(fn, sig, const, opts, arch, ints)
    except Exception as err:  # report every kernel, then fail
        return False, f"FAIL sm_{arch} {name}: {type(err).__name__}: {str(err)[:2000]}"
    shared = k.metadata.shared
    fits = shared <= SMEM_LIMIT[arch]
    mma_ok = not wants_wgmma(arch, name, const) or uses_wgmma(k)
    ok = spilled == 0 and fits and mma_ok
    line = (f"sm_{arch} {name}: {regs} registers, {spilled} B spilled, {shared / KIB:.1f} KiB shared"
            + ("" if fits else f" > {SMEM_LIMIT[arch] // KIB} KiB ({SMEM_FAMILY[arch]})")
            + (", wgmma" if arch >= 90 and uses_wgmma(k) else "")
            + ("" if mma_ok else ", no wgmma where the tile allows it")
            + f", {time.perf_counter() - t0:.1f}s")  # fmt: skip
    return ok, ("ok   " if ok else "FAIL ") + line


def main(argv: list[str] | None = None) -> int:
    """Every (arch, kernel) in parallel over the CPU's cores; 1 if any fails, spills or overflows."""
    import concurrent.futures
    import multiprocessing

    from mdkernels.ops._common.tiles import GPU_ARCHS

    p = argparse.ArgumentParser(prog="python -m mdkernels.tools.gpu_compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default=None, help="comma-separated compute capabilities (default: 80,90; with --all: "
                   f"{','.join(map(str, GPU_ARCHS))})")  # fmt: skip
    p.add_argument("--all", action="store_true", help="the whole launch space (default: the headline shapes)")
    p.add_argument("--only", default="", help="only kernels whose name contains this text")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles at once (default: the CPU's cores)")
    p.add_argument("--record", default=None, help="write the report, with the commit and the launch space's "
                   "fingerprint, to this file (bench/results/compile_check.txt)")  # fmt: skip
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("gpu_compile needs the real compiler: unset TRITON_INTERPRET")
    archs = [int(a) for a in (args.archs or ("80,90" if not args.all else ",".join(map(str, GPU_ARCHS)))).split(",")
             if a.strip()]  # fmt: skip
    for arch in archs:
        if arch not in SMEM_LIMIT:
            raise SystemExit(f"--archs: no shared-memory limit known for sm_{arch} (known: {sorted(SMEM_LIMIT)})")
    if args.record and (args.only or not args.all):
        raise SystemExit("--record writes the full check only: use it with --all and without --only")
    t0 = time.perf_counter()
    runnable = [a for a in archs if arch_supported(a)]
    skipped = [f"skip sm_{a}: the ptxas of this Triton cannot target it" for a in sorted(set(archs) - set(runnable))]
    _JOBS[:] = [(arch, spec) for arch in runnable for spec in launch_space(arch)
                if args.only in spec[0] and (args.all or HEADLINE.search(spec[0]))]  # fmt: skip
    workers = max(1, min(len(_JOBS), args.jobs))
    if skipped:
        print("\n".join(skipped), flush=True)
    results = []
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for result in pool.map(_check, range(len(_JOBS)), chunksize=2):  # in order, each as soon as it is done
            results.append(result)
            print(result[1], flush=True)
    import triton

    lines = skipped + [line for _, line in results]
    summary = f"triton {triton.__version__}: {sum(ok for ok, _ in results)} of {len(results)} kernels ok"
    print(summary)
    if args.record:
        _record(args.record, archs, lines, summary, time.perf_counter() - t0)
    return 0 if all(ok for ok, _ in results) else 1


def _record(path: str, archs: list[int], lines: list[str], summary: str, seconds: float) -> None:
    """The full check's report: what it ran on, the launch space's fingerprint (test_gpu_compile compares it with
    the current one), every kernel's line, per arch its count."""
    import platform
    import subprocess as sp

    import triton

    here = os.path.dirname(os.path.abspath(__file__))
    commit = sp.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = sp.run(["git", "-C", here, "status", "--porcelain", "--", "../ops"], capture_output=True, text=True).stdout
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    per_arch = {a: sum(1 for line in lines if f" sm_{a} " in f" {line[5:]}") for a in archs}
    head = [
        "# mdkernels: every distinct Triton kernel a GPU launch can compile, compiled for each arch with the ptxas",
        "# Triton uses for it (python -m mdkernels.tools.gpu_compile --all --record bench/results/compile_check.txt)",
        f"commit: {commit or 'unknown'}{' (kernels modified)' if dirty.strip() else ''}",
        f"triton: {triton.__version__}; torch: {torch.__version__}; python: {platform.python_version()}",
        f"machine: {cpu}, {os.cpu_count()} cores; {seconds / 60:.1f} min",
        f"archs: {', '.join(f'sm_{a} ({n} kernels)' for a, n in per_arch.items())}",
        f"fingerprint: {fingerprint(archs)}",
        f"result: {summary}",
    ]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
