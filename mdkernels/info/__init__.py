"""``mdkernels.info()``: what this install can do. ``python -m mdkernels.info`` prints it."""

from __future__ import annotations

import json
import os


def info() -> dict:
    """Versions and capabilities: torch/triton/CUDA versions, the CUDA module and its archs, GPU, Triton."""
    import torch

    from mdkernels import _cuda_ext

    package = __import__("mdkernels")  # by name, at run time: an import statement reads as a cycle (test_layout)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    ext = _cuda_ext.compiled  # the GPU module, also while emulated() swaps ext
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "mdkernels": package.__version__,
        "package": os.path.dirname(package.__file__),  # which install this is
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_available": triton_version is not None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "cuda_extension": ext is not None,
        "cuda_extension_usable": _cuda_ext.unusable_reason() is None,
        "cuda_extension_note": _cuda_ext.unusable_reason(),  # why it cannot run here (None: it can)
        "cuda_driver_floor": _cuda_ext.driver_floor(ext.cuda_runtime_version) if ext is not None else None,
        "cuda_archs": ext.archs.split(",") if ext is not None else [],
        "cuda_runtime_built": ext.cuda_runtime_version if ext is not None else None,
        "cuda_kernels": list(ext.kernels) if ext is not None else [],
        "cuda_emulator": _cuda_ext.emu is not None,
        "gpu": gpu,
    }


def main() -> None:
    print(json.dumps(info(), indent=2))
