"""Every registered op on every backend that runs here, forward and backward, against the eager reference: one small
case each (the cases of :mod:`mdkernels.tools.selfcheck`), so that the quick tier (``-m "not slow"``) exercises all
of them; the per-op files cover every option, dtype and shape. An op added to the registry without a case fails."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import FUSED_BACKENDS

from mdkernels import _cuda_ext
from mdkernels.ops import OPS
from mdkernels.tools import selfcheck

BACKENDS = [*FUSED_BACKENDS] + (["cuda"] if _cuda_ext.emu is not None else [])
# fp64 on torch and Triton (the interpreter); the emulated CUDA kernels run fp32 (selfcheck's tolerances)
DTYPE = {"torch": torch.float64, "triton": torch.float64, "cuda": torch.float32}


def _runs(backend: str, name: str, op: str) -> bool:
    return backend in OPS[op].backends and not (backend == "cuda" and ("subcenters" in name or "curricular" in name))


def test_every_op_of_the_registry_has_a_case():
    covered = {op for _, _, op, _ in selfcheck._cases("torch").values()}
    assert covered >= set(OPS) - {"l2norm", "cosine_topk"}, sorted(set(OPS) - covered)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_forward_and_backward_against_the_reference(backend):
    dtype = DTYPE[backend]
    ctx = _cuda_ext.emulated() if backend == "cuda" else contextlib.nullcontext()
    x, w, y, t = selfcheck._inputs(13, 40, 70, dtype, "cpu")
    g = torch.Generator().manual_seed(1)
    w3 = w.repeat_interleave(3, 0) + 0.5 * torch.randn(3 * 70, 40, generator=g, dtype=torch.float64).to(w)
    ran = []
    with ctx:
        for name, (fast, ref, op, grad_of) in selfcheck._cases(backend).items():
            if not _runs(backend, name, op):
                continue
            err = selfcheck._compare(fast, ref, (x, w3 if "subcenters" in name else w, y, t), grad_of, dtype)
            assert err <= selfcheck._TOL[dtype], f"{backend} {name}: relative error {err:.2e}"
            ran.append(op)
    assert set(ran) == {op for op in OPS if backend in OPS[op].backends} - {"l2norm", "cosine_topk"}
