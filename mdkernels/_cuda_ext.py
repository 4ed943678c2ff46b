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


_ARCH_OK: dict[int, bool] = {}


def _arch_ok(device: torch.device) -> bool:
    """The module was built for this GPU: a compute capability at or above the lowest built arch (the
    build embeds PTX, which newer GPUs JIT-compile). Older GPUs fall back to torch."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCH_OK:
        major, minor = torch.cuda.get_device_capability(index)
        lowest = min(int(a) for a in ext.archs.split(",") if a.strip().isdigit())
        _ARCH_OK[index] = major * 10 + minor >= lowest
    return _ARCH_OK[index]


def usable(*tensors: torch.Tensor) -> bool:
    """True when the CUDA module can run on these tensors (built for this GPU, CUDA tensors, a supported
    dtype). Under :func:`emulated`: CPU tensors of a supported dtype."""
    if _EMULATING:
        return all(t.device.type == "cpu" and t.dtype in _DTYPE_CODES for t in tensors)
    return (
        ext is not None and all(t.is_cuda and t.dtype in _DTYPE_CODES for t in tensors) and _arch_ok(tensors[0].device)
    )


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


def guard_device(fn):
    """Run ``fn`` with its first tensor argument's GPU current (Triton and CUDA launch on the current one)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        with on_device(t) if t is not None else contextlib.nullcontext():
            return fn(*args, **kwargs)

    return wrapper
