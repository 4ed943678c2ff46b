"""Loads the optional CUDA C++ module (``mdkernels._cuda``) and converts tensors to its raw arguments."""

from __future__ import annotations

import contextlib
import functools

import torch

try:  # built by setup.py when nvcc was found (MDK_BUILD_CUDA=AUTO|ON)
    from mdkernels import _cuda as ext
except ImportError:  # pure-Python build, or a build for another Python
    ext = None

compiled = ext  # the GPU module, whatever emulated() does to ext

try:  # the same kernels compiled against a CPU emulator (csrc/emu), built alongside; see emulated()
    from mdkernels import _cuda_emu as emu
except ImportError:
    emu = None

_EMULATING = False

# Must match csrc/common.h::DType.
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def built() -> bool:
    """True when the CUDA module was compiled into this install (whatever :func:`emulated` does)."""
    return compiled is not None


def built_archs(archs: str) -> tuple[set[int], set[int]]:
    """``(cubins, ptx)`` of an ``archs`` string as CMake writes it: ``"80-real;90-real;90-virtual"`` or the plain
    ``"80,90"`` (a plain arch is both a cubin and PTX)."""
    real, virtual = set(), set()
    for item in archs.replace(";", ",").split(","):
        item = item.strip()
        number, _, kind = item.partition("-")
        if not number.isdigit():
            continue
        if kind in ("", "real"):
            real.add(int(number))
        if kind in ("", "virtual"):
            virtual.add(int(number))
    return real, virtual


def arch_runs(archs: str, capability: int) -> bool:
    """Whether a module built for ``archs`` runs on a GPU of ``capability`` (``10 * major + minor``): a cubin
    of the same major version at or below it (sm_80 code runs on sm_86 and sm_89, not on sm_90), or PTX at or
    below it, which the driver compiles (compute_90 PTX runs on sm_100 and sm_120)."""
    real, virtual = built_archs(archs)
    return any(a // 10 == capability // 10 and a <= capability for a in real) or any(a <= capability for a in virtual)


_ARCH_OK: dict[int, bool] = {}


def _arch_ok(device: torch.device) -> bool:
    """The module has code for this GPU (see :func:`arch_runs`). Other GPUs use the Triton backend."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCH_OK:
        major, minor = torch.cuda.get_device_capability(index)
        _ARCH_OK[index] = arch_runs(ext.archs, major * 10 + minor)
    return _ARCH_OK[index]


def driver_floor(runtime_version: int) -> str:
    """The NVIDIA driver a module built with CUDA ``runtime_version`` (13000 = 13.0) needs: the runtime is
    linked statically, and the driver must support its CUDA version (minor-version compatibility within a
    major needs at least the major's first driver; the PTX of the build needs the build's own version)."""
    major, minor = runtime_version // 1000, (runtime_version % 1000) // 10
    known = {(12, 0): "525.60", (12, 4): "550.54", (12, 6): "560.28", (12, 8): "570.86", (12, 9): "575.51",
             (13, 0): "580.65"}  # fmt: skip
    floor = known.get((major, minor))
    return f"CUDA {major}.{minor}" + (f" (Linux driver {floor} or newer)" if floor else "")


@functools.cache
def unusable_reason() -> str | None:
    """Why the compiled CUDA module cannot run in this process, or None when it can: not built, no driver,
    a driver older than the CUDA version the module was built with, or no visible GPU."""
    if compiled is None:
        return "not built (no nvcc at install time, or MDK_BUILD_CUDA=OFF)"
    driver = compiled.driver_version()
    if driver == 0:
        return "no NVIDIA driver found"
    if driver < compiled.cuda_runtime_version:
        return (f"built with CUDA {compiled.cuda_runtime_version // 1000}.{compiled.cuda_runtime_version % 1000 // 10}"
                f", which needs a driver for {driver_floor(compiled.cuda_runtime_version)}; this driver supports "
                f"CUDA {driver // 1000}.{driver % 1000 // 10} (rebuild with an older nvcc, or update the driver)")
    if compiled.device_count() == 0:
        return "no visible CUDA device"
    return None


def usable(*tensors: torch.Tensor) -> bool:
    """True when the CUDA module can run on these tensors (built for this GPU, a driver that runs it, CUDA
    tensors, a supported dtype). Under :func:`emulated`: CPU tensors of a supported dtype."""
    if _EMULATING:
        return all(t.device.type == "cpu" and t.dtype in _DTYPE_CODES for t in tensors)
    return (
        ext is not None
        and all(t.is_cuda and t.dtype in _DTYPE_CODES for t in tensors)
        and unusable_reason() is None
        and _arch_ok(tensors[0].device)
    )


def margin_smem_need(dtype: torch.dtype) -> int:
    """The least dynamic shared memory per block the CUDA margin kernels need for ``dtype`` (their narrow
    layout, 128 accumulator columns: the forward or the center gradient, whichever is larger)."""
    code = _DTYPE_CODES[dtype]
    return max(ext.margin_smem_bytes(code, True, 128), ext.margin_smem_bytes(code, False, 128))


def margin_fits(t: torch.Tensor) -> bool:
    """Whether the CUDA margin kernels fit ``t``'s GPU: its opt-in shared memory per block
    (``shared_memory_per_block_optin``, never the capability) holds their narrow layout. The launcher picks the
    wide layout where it fits too. Under :func:`emulated` the emulator checks its own device's limit."""
    if _EMULATING or not t.is_cuda:
        return True
    props = torch.cuda.get_device_properties(t.device)
    return props.shared_memory_per_block_optin >= margin_smem_need(t.dtype)


def cannot_run(op: str, t: torch.Tensor) -> str | None:
    """Why the CUDA module cannot run kernel op ``op`` on tensor ``t`` here (not built, no driver for it, not a
    CUDA tensor of a supported dtype, no code for this GPU, too little shared memory for the margin kernels), as
    the message ``backend="cuda"`` raises; None when it can. The one place that asks."""
    if not usable(t):
        why = unusable_reason() if t.is_cuda and not _EMULATING else None
        module = f": the module is {why}" if why else ""
        return ("backend='cuda' needs CUDA fp32/bf16/fp16 tensors and the CUDA module built for this GPU "
                f"(mdkernels.info()['cuda_extension']){module}; use backend='triton'")  # fmt: skip
    if op == "margin_ce" and not margin_fits(t):
        props = torch.cuda.get_device_properties(t.device)
        return (f"backend='cuda': the CUDA margin kernels need {margin_smem_need(t.dtype)} bytes of shared memory per "
                f"block for {t.dtype}, and {props.name} allows {props.shared_memory_per_block_optin} "
                "(shared_memory_per_block_optin); use backend='triton'")  # fmt: skip
    return None


@contextlib.contextmanager
def emulated(schedule: str = "forward", seed: int = 0):
    """Within this block, ``backend="cuda"`` runs the CUDA C++ kernels on CPU tensors through the CPU
    emulator (``mdkernels._cuda_emu``: the csrc/ sources compiled against csrc/emu/cuda_emu.h). For tests
    and debugging where no GPU is: slow, single-threaded, and it checks barriers, warp collectives, WMMA
    alignment and launch limits. ``schedule`` orders the threads of a block between barriers ("forward",
    "reverse" or "shuffle") to expose missing barriers. Not thread-safe."""
    global ext, _EMULATING
    if emu is None:
        raise RuntimeError("the CPU emulator of the CUDA kernels was not built (it is built with the CUDA module)")
    saved = ext, _EMULATING
    emu.set_schedule(schedule, seed)
    ext, _EMULATING = emu, True
    try:
        yield emu
    finally:
        ext, _EMULATING = saved
        emu.set_schedule("forward", 0)


def on_device(t: torch.Tensor):
    """Make ``t``'s GPU current while launching on it (kernels run on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dtype_code(t: torch.Tensor) -> int:
    return _DTYPE_CODES[t.dtype]


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def call(name: str, t: torch.Tensor, *args):
    """The CUDA module's function ``name`` with ``t``'s GPU current and ``t``'s device's current stream appended
    as the last argument: the one door into the module (kernels launch on the current device; a tensor on
    cuda:1 while cuda:0 is current must not launch on cuda:0). python_tests/test_layout.py checks that no
    other code calls the module's kernels."""
    with on_device(t):
        return getattr(ext, name)(*args, stream_of(t))


def guard_device(fn):
    """Run ``fn`` with its first tensor argument's GPU current (Triton and CUDA launch on the current one)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        with on_device(t) if t is not None else contextlib.nullcontext():
            return fn(*args, **kwargs)

    return wrapper
