"""A one-minute check that this install computes what the eager reference computes.

Runs every registered op that has Triton kernels (and, on a GPU, its CUDA C++ kernels) once on small odd
shapes, and compares the loss and every gradient with :mod:`mdkernels.reference` in float64. With
``--torch-checks`` it also runs ``torch.library.opcheck`` on the custom ops and traces a training step with
``torch.compile(fullgraph=True)``. One line per check; the exit code is the number of failures (0: all ok).

    TRITON_INTERPRET=1 python -m mdkernels.tools.selfcheck            # the CPU, Triton's interpreter
    python -m mdkernels.tools.selfcheck --device cuda --torch-checks  # a GPU

``scripts/compat.py`` runs it in one fresh virtual environment per supported torch/Triton pair. It is a
smoke test of an install, not the test suite (``python_tests/``), which covers every option and dtype.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

import mdkernels
from mdkernels import reference as R

# fp32 against the fp64 reference: the relative error of a 2-norm over the result (loss or gradient)
_TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 3e-2}


def _inputs(B: int, D: int, C: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) + 2.0 * w[y] * torch.rand(B, 1, generator=g,
                                                                                       dtype=torch.float64)
    t = w[y] / w[y].norm(dim=1, keepdim=True) + 0.4 * torch.randn(B, D, generator=g, dtype=torch.float64)
    if B > 2:
        y[B // 2] = -1
    return x.to(device, dtype), w.to(device, dtype), y.to(device), t.to(device, dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _compare(fast: Callable, ref: Callable, inputs: tuple, grad_of: tuple[int, ...], dtype: torch.dtype) -> float:
    """The largest relative error over the loss and the gradients of ``inputs[i]`` for ``i in grad_of``."""
    leaves = [t.detach().clone().requires_grad_(i in grad_of) if t.is_floating_point() else t
              for i, t in enumerate(inputs)]  # fmt: skip
    truth = [t.detach().double().requires_grad_(i in grad_of) if t.is_floating_point() else t
             for i, t in enumerate(inputs)]  # fmt: skip
    got, want = fast(*leaves), ref(*truth)
    g_got = torch.autograd.grad(got, [leaves[i] for i in grad_of]) if grad_of else ()
    g_want = torch.autograd.grad(want, [truth[i] for i in grad_of]) if grad_of else ()
    return max([_rel(got, want)] + [_rel(a, b) for a, b in zip(g_got, g_want, strict=True)])


def _cases(backend: str) -> dict[str, tuple[Callable, Callable, str, tuple[int, ...]]]:
    """name -> (fast(x, w, y, t), reference(x, w, y, t), the op it checks, gradient inputs)."""
    F, kw = mdkernels, dict(backend=backend)
    return {
        "margin_ce arcface": (lambda x, w, y, t: F.margin_cross_entropy(x, w, y, **kw),
                              lambda x, w, y, t: R.margin_cross_entropy(x, w, y), "margin_ce", (0, 1)),
        "margin_ce cosface+filter": (lambda x, w, y, t: F.margin_cross_entropy(x, w, y, m2=0.0, m3=0.35,
                                                                               interclass_filter=0.2, **kw),
                                     lambda x, w, y, t: R.margin_cross_entropy(x, w, y, m2=0.0, m3=0.35,
                                                                               interclass_filter=0.2),
                                     "margin_ce", (0, 1)),
        "margin_ce curricular": (lambda x, w, y, t: F.margin_cross_entropy(x, w, y, curricular_t=0.3, **kw),
                                 lambda x, w, y, t: R.margin_cross_entropy(x, w, y, curricular_t=0.3),
                                 "margin_ce", (0, 1)),
        "margin_ce subcenters=3": (lambda x, w, y, t: F.margin_cross_entropy(x, w, y, subcenters=3, **kw),
                                   lambda x, w, y, t: R.margin_cross_entropy(x, w, y, subcenters=3),
                                   "margin_ce", (0, 1)),
        "margin_distillation": (lambda x, w, y, t: F.margin_distillation_loss(x, w, y, teacher_embeddings=t, **kw),
                                lambda x, w, y, t: R.margin_distillation_loss(x, w, y, teacher_embeddings=t),
                                "margin_distillation", (0,)),
        "proxyless_kd": (lambda x, w, y, t: F.proxyless_kd_loss(x, w, y, **kw),
                         lambda x, w, y, t: R.proxyless_kd_loss(x, w, y), "proxyless_kd", (0,)),
        "adadistill": (lambda x, w, y, t: F.adadistill_loss(x, t, w.detach().clone(), y, **kw),
                       lambda x, w, y, t: R.adadistill_loss(x, t, w.detach(), y)[0], "adadistill", (0,)),
        "margin_kd": (lambda x, w, y, t: F.margin_kd_loss(x, t, w, y, **kw),
                      lambda x, w, y, t: R.margin_kd_loss(x, t, w, y), "margin_kd", (0, 1)),
        "angular_distill": (lambda x, w, y, t: F.angular_distillation_loss(x, t, **kw),
                            lambda x, w, y, t: R.angular_distillation_loss(x, t), "angular_distill", (0,)),
        "triplet_distill all": (lambda x, w, y, t: F.triplet_distillation_loss(x, t, labels=y % 5, **kw),
                                lambda x, w, y, t: R.triplet_distillation_loss(x, t, labels=y % 5),
                                "triplet_distill", (0,)),
    }  # fmt: skip


def run_ops(device: str, backends: list[str], dtypes: list[torch.dtype], shape=(37, 96, 300)) -> list[tuple]:
    """``(ok, line)`` for every case of :func:`_cases` on every backend and dtype that has it."""
    from mdkernels.ops import OPS

    B, D, C = shape
    results = []
    for backend in backends:
        for dtype in dtypes:
            x, w, y, t = _inputs(B, D, C, dtype, device)
            g = torch.Generator().manual_seed(1)  # K = 3 sub-centers around each center, (C K, D)
            w3 = w.repeat_interleave(3, 0) + 0.5 * torch.randn(3 * C, D, generator=g, dtype=torch.float64).to(w)
            for name, (fast, ref, op, grad_of) in _cases(backend).items():
                if backend not in OPS[op].backends or (backend == "cuda" and ("subcenters" in name
                                                                               or "curricular" in name)):
                    continue
                centers = w3 if "subcenters" in name else w
                t0 = time.perf_counter()
                try:
                    err = _compare(fast, ref, (x, centers, y, t), grad_of, dtype)
                    ok, detail = err <= _TOL[dtype], f"max rel err {err:.2e} (tol {_TOL[dtype]:.0e})"
                except Exception as exc:  # report every case, then fail
                    ok, detail = False, f"{type(exc).__name__}: {str(exc)[:300]}"
                dt = str(dtype).removeprefix("torch.")
                results.append((ok, f"{'ok  ' if ok else 'FAIL'} {backend:6s} {dt:8s} {name}: {detail}, "
                                    f"{time.perf_counter() - t0:.1f}s"))  # fmt: skip
    return results


def run_torch_checks(device: str) -> list[tuple]:
    """``torch.library.opcheck`` on the custom ops and a ``torch.compile(fullgraph=True)`` training step."""
    from mdkernels.ops import margin_ce as mce
    from mdkernels.ops import margin_kd as mkd

    results = []
    x, w, y, t = _inputs(9, 40, 70, torch.float32, device)
    m2 = torch.full((9,), 0.5, device=device)
    m3 = torch.zeros(9, device=device)

    def check(name, fn):
        t0 = time.perf_counter()
        try:
            fn()
            results.append((True, f"ok   {name}, {time.perf_counter() - t0:.1f}s"))
        except Exception as exc:
            results.append((False, f"FAIL {name}: {type(exc).__name__}: {str(exc)[:400]}"))

    args = (x.requires_grad_(), w.requires_grad_(), y, m2, m3, None, 64.0, 1.0, True, "exact", False, None, 1.0, None,
            1, -1, True, "torch", "")  # fmt: skip
    check("opcheck mdkernels::margin_ce_forward", lambda: torch.library.opcheck(mce.margin_ce_forward, args))
    kd = (x, t, w, y, 4.0, 0.95, 64.0, 1.0, 0.5, 0.0, True, -1, True, "torch", "")
    check("opcheck mdkernels::margin_kd_forward", lambda: torch.library.opcheck(mkd.margin_kd_forward, kd))
    check("opcheck mdkernels::l2_normalize",
          lambda: torch.library.opcheck(torch.ops.mdkernels.l2_normalize, (x.detach(), 1e-12)))  # fmt: skip

    def compiled_step():
        torch.manual_seed(0)
        head = mdkernels.nn.ArcFace(40, 70).to(device)
        net = torch.nn.Linear(40, 40).to(device)
        params = [*net.parameters(), head.weight]
        step = lambda inp, labels: head(net(inp), labels) + mdkernels.margin_kd_loss(net(inp), inp, head.weight, labels)
        eager = step(x.detach(), y)
        traced = torch.compile(step, fullgraph=True)(x.detach(), y)  # backward through the registered autograd
        assert _rel(traced, eager) < 1e-5, f"compiled loss {traced.item()} != eager {eager.item()}"
        for a, b in zip(torch.autograd.grad(traced, params), torch.autograd.grad(eager, params), strict=True):
            assert _rel(a, b) < 1e-5, "compiled gradients differ from eager"

    check("torch.compile(fullgraph=True) ArcFace + margin KD step (inductor)", compiled_step)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdkernels.tools.selfcheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="where the tensors live (default: cuda when a GPU is visible)")
    p.add_argument("--torch-checks", action="store_true", help="also opcheck the custom ops and torch.compile a step")
    args = p.parse_args(argv)
    from mdkernels.ops._common.env import HAS_TRITON, interpreting

    backends = ["torch"] if args.device == "cpu" else []
    if HAS_TRITON and (args.device == "cuda" or interpreting()):
        backends.append("triton")
    from mdkernels import _cuda_ext

    if args.device == "cuda" and _cuda_ext.built():
        backends.append("cuda")
    dtypes = [torch.float64, torch.float32] if args.device == "cpu" else [torch.float32, torch.bfloat16]
    if args.device == "cpu" and "triton" not in backends:
        print("note: Triton does not run here (set TRITON_INTERPRET=1 before the import to use its interpreter)")
    results = run_ops(args.device, backends, dtypes)
    if args.torch_checks:
        results += run_torch_checks(args.device)
    for _, line in results:
        print(line, flush=True)
    failed = sum(not ok for ok, _ in results)
    print(f"{len(results) - failed} ok, {failed} failed ({', '.join(backends)}; torch {torch.__version__}, "
          f"triton {mdkernels.info()['triton']})")  # fmt: skip
    return min(failed, 100)


if __name__ == "__main__":
    sys.exit(main())
