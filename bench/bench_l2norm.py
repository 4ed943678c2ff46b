"""Row normalisation, mdkernels.l2_normalize (CUDA C++ on GPU) against F.normalize: fwd+bwd time.

    python -m bench.bench_l2norm                       # CPU: the (C, D) = (100k, 512) center matrix
    python -m bench.bench_l2norm --device cuda --dtype bfloat16

Rows go to bench/results/<device>.csv (op ``l2norm``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench import harness

OPS = ["l2norm"]  # this module's bench keys (the registry's names, mdkernels.ops.OPS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def providers() -> dict:
    import mdkernels

    return {"mdk": mdkernels.l2_normalize, "torch_normalize": lambda x: F.normalize(x, dim=1)}


def run(R: int, D: int, dtype: str, device: str, reps: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(R, D, generator=g).to(device, DTYPES[dtype]).requires_grad_()
    dy = torch.randn(R, D, generator=g).to(device, DTYPES[dtype])
    rows = []
    for name, fn in providers().items():
        step = lambda fn=fn: torch.autograd.grad(fn(x), x, dy)
        med, p20, p80 = harness.time_gpu(step) if device == "cuda" else harness.time_cpu(step, reps=reps)
        row = harness.base_row("l2norm", device)
        row.update(provider=name, mode="fwd+bwd", B=R, D=D, C=0, dtype=dtype, ms_median=med, ms_p20=p20, ms_p80=p80)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    rows = run(args.rows, args.D, args.dtype, args.device, args.reps)
    for r in rows:
        print(f"{r['provider']:>16}  {r['ms_median']:8.2f} ms")
    if not args.no_save:
        print("appended to", harness.append_rows(rows, args.device))


if __name__ == "__main__":
    main()
