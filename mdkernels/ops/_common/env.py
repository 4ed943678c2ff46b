"""Where the kernels run: Triton's presence, the interpreter, pointer types for the compile check, the
GPU's SMs and compute capability, and the options every Triton launch passes."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU-only installs may not have Triton
    HAS_TRITON = False

# Every Triton launch passes these. Fused multiply-add contraction on: fewer roundings, the numerics every
# Triton up to 3.9 defaulted to (3.10 turns it off by default) and that nvcc's --fmad=true gives the CUDA
# kernels. Set explicitly so that a Triton upgrade does not change mdkernels' results. maxnreg 255: ptxas may
# otherwise cap an 8-warp kernel at 128 registers (two blocks per SM) and spill; the compile check holds every
# kernel to no spill at this setting.
LAUNCH_OPTIONS = {"enable_fp_fusion": True, "maxnreg": 255}

NEG_BIG = -1e30  # finite "minus infinity" for running maxima: keeps exp(m_old - m_new) free of NaN

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def values_at_hand(t: torch.Tensor) -> bool:
    """True when reading ``t``'s values costs nothing: a CPU tensor (unless the tests make the CPU take the
    GPU's path, :data:`mdkernels._validate.DEFER_ON_CPU`). On a GPU a read is a host sync: the fused paths
    never make one in a training step."""
    from mdkernels import _validate

    return t.device.type == "cpu" and not _validate.DEFER_ON_CPU


def triton_runs(t: torch.Tensor) -> bool:
    """True when a Triton kernel can run on ``t``: a CUDA tensor, or a CPU tensor under the interpreter."""
    return HAS_TRITON and (t.is_cuda or interpreting())


def ptr(dtype: torch.dtype) -> str:
    """Triton's signature string of a pointer to ``dtype`` (``"*bf16"``...), for compiling without a GPU."""
    return _PTR[dtype]


@dataclasses.dataclass(frozen=True)
class SimulatedGPU:
    """What the launchers read of a GPU, for running their GPU choices on the CPU (:func:`simulate_gpu`)."""

    name: str
    sms: int
    capability: int  # 10 * major + minor
    smem_optin: int  # bytes of opt-in shared memory per block


# The GPUs the CPU suite can stand in for (nvidia.com data sheets: SMs, compute capability, opt-in shared memory)
SIMULATED_GPUS = {
    "h100": SimulatedGPU("NVIDIA H100 80GB HBM3 (simulated)", 132, 90, 227 * 1024),
    "a100": SimulatedGPU("NVIDIA A100-SXM4-80GB (simulated)", 108, 80, 163 * 1024),
    "l4": SimulatedGPU("NVIDIA L4 (simulated)", 58, 89, 99 * 1024),
}
_SIMULATED: list[SimulatedGPU] = []


def _from_environment() -> SimulatedGPU | None:
    name = os.environ.get("MDK_SIMULATE_GPU", "").strip().lower()
    if not name:
        return None
    if name not in SIMULATED_GPUS:
        raise ValueError(f"MDK_SIMULATE_GPU={name!r}: one of {sorted(SIMULATED_GPUS)}, or unset")
    return SIMULATED_GPUS[name]


def simulated() -> SimulatedGPU | None:
    """The GPU that CPU tensors stand in for (:func:`simulate_gpu`, or ``MDK_SIMULATE_GPU``), else None."""
    return _SIMULATED[-1] if _SIMULATED else _from_environment()


@contextlib.contextmanager
def simulate_gpu(gpu: str | SimulatedGPU = "h100"):
    """CPU tensors take a GPU's launch decisions: its SM count sizes the split-C grids, its compute capability
    picks the Triton tiles (the GPU's own tiles, run by the interpreter) and the CUDA emulator's device 0 gets its
    opt-in shared memory. The numerics stay the interpreter's (16-bit operands rounded exactly, IEEE fp32 dots).
    ``MDK_SIMULATE_GPU=h100`` does the same for a whole process (``bench/gpu_check.sh --dry-run``)."""
    spec = SIMULATED_GPUS[gpu] if isinstance(gpu, str) else gpu
    from mdkernels import _cuda_ext

    _SIMULATED.append(spec)
    if _cuda_ext.emu is not None:
        _cuda_ext.emu.set_device(0, spec.smem_optin)
    try:
        yield spec
    finally:
        _SIMULATED.remove(spec)
        if _cuda_ext.emu is not None:
            _cuda_ext.emu.reset_devices()


def gpu_like(t: torch.Tensor) -> bool:
    """True when ``t``'s launches take a GPU's decisions: a CUDA tensor, or any tensor under :func:`simulate_gpu`."""
    return t.is_cuda or simulated() is not None


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 off the GPU, the simulated GPU's under :func:`simulate_gpu`):
    sizes the split-C grids."""
    if device.type == "cuda":
        return _props(device.index if device.index is not None else torch.cuda.current_device())[0]
    sim = simulated()
    return sim.sms if sim is not None else 1


def capability(device: torch.device) -> int | None:
    """The compute capability of a CUDA ``device`` as ``10 * major + minor`` (90 for an H100), None off the
    GPU (the simulated GPU's under :func:`simulate_gpu`): the Triton tile configurations depend on it (wgmma from
    sm_90 on)."""
    if device.type != "cuda":
        sim = simulated()
        return sim.capability if sim is not None else None
    return _props(device.index if device.index is not None else torch.cuda.current_device())[1]


def gpu_tiles() -> bool:
    """True when the launchers take a GPU's tiles: on a GPU, or under :func:`simulate_gpu`; False in the plain
    interpreter (few large tiles: each interpreted program iteration costs about a millisecond)."""
    return not interpreting() or simulated() is not None


@functools.cache
def _props(index: int) -> tuple[int, int]:
    p = torch.cuda.get_device_properties(index)
    return p.multi_processor_count, 10 * p.major + p.minor


_OPERANDS = {"": None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # as mdkernels._plan names them


def operand_dtype(name: str) -> torch.dtype | None:
    """The custom ops carry the dots' operand dtype as a string ("" = the inputs' own)."""
    return _OPERANDS[name]


@contextlib.contextmanager
def ieee_fp32_matmul(t: torch.Tensor):
    """The torch-side fp32 GEMMs of a fused call (the ``torch`` backend's chunks) in full fp32 on a GPU, whatever
    ``torch.backends.cuda.matmul.allow_tf32`` says: one precision policy for the fused paths (docs/design.md,
    "Precision"; Triton's fp32 dots are tf32x3). Restored on the way out."""
    if not (t.is_cuda and t.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32):
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True


def no_autocast(t: torch.Tensor):
    """The fused ops choose their own precision (``op_dtype``): autocast must not re-cast the torch ops inside."""
    import contextlib

    return torch.autocast(t.device.type, enabled=False) if t.device.type in ("cuda", "cpu") else contextlib.nullcontext()
