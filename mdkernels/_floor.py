"""The oldest torch and Triton mdkernels runs with: what ``scripts/compat.py`` passed (the README's version table).
``import mdkernels`` refuses older ones at once, naming the floor, instead of failing deep inside a kernel."""

from __future__ import annotations

import importlib.util

TORCH_FLOOR = (2, 9)  # torch 2.8 pins Triton 3.4, below the Triton floor
# Triton 3.3 and 3.4 failed scripts/compat.py: their interpreters have no fp64 dot (3.3 also lacks builder ops the
# kernels use), and their compilers spill registers in kernels that compile clean from 3.5 on
TRITON_FLOOR = (3, 5)
TESTED = "torch 2.9 to 2.15 and Triton 3.5 to 3.9"  # the passing rows of bench/results/compat.md (a test checks)


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check(torch_version: str, triton_version: str | None) -> None:
    """Raise ImportError when torch or (an installed) Triton is below its floor."""
    if _version(torch_version) < TORCH_FLOOR:
        raise ImportError(f"mdkernels needs torch >= {'.'.join(map(str, TORCH_FLOOR))} (tested: {TESTED}); this is "
                          f"torch {torch_version}: pip install 'torch>={'.'.join(map(str, TORCH_FLOOR))}'")  # fmt: skip
    if triton_version is not None and _version(triton_version) < TRITON_FLOOR:
        raise ImportError(f"mdkernels needs Triton >= {'.'.join(map(str, TRITON_FLOOR))} (tested: {TESTED}); this "
                          f"is triton {triton_version}: upgrade torch (each torch pins its Triton), or uninstall "
                          "triton to run the torch backend only")  # fmt: skip


def installed_triton() -> str | None:
    """Triton's version without importing it (None when absent)."""
    if importlib.util.find_spec("triton") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return None
