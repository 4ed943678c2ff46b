"""Fused margin cross-entropy vs the eager reference and an insightface-style head: time and memory.

    python -m bench.bench_margin_ce                      # CPU goal shape: B=256, D=512, C=100k fp32
    python -m bench.bench_margin_ce --B 1024 --C 85742 --dtype bfloat16 --device cuda

Rows go to bench/results/<device>.csv (see bench/harness.py).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from bench import harness

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def insightface_head(x, w, y, s=64.0, m=0.5):
    """What users run today (arcface_torch style): normalised F.linear, margin on the target, CE."""
    cos = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    idx = torch.arange(len(y), device=y.device)
    target = cos[idx, y]
    with torch.no_grad():
        delta = torch.cos(torch.acos(target) + m) - target
    logits = cos.index_put((idx, y), target + delta) * s
    return F.cross_entropy(logits, y)


def providers(device: str) -> dict:
    import mdkernels

    out = {
        "reference": lambda x, w, y: mdkernels.reference.margin_cross_entropy(x, w, y),
        "insightface_eager": insightface_head,
        "mdk_torch": lambda x, w, y: mdkernels.margin_cross_entropy(x, w, y, backend="torch"),
    }
    if device == "cuda":
        out["mdk_triton"] = lambda x, w, y: mdkernels.margin_cross_entropy(x, w, y, backend="triton")
        out["gemm_bound"] = None  # filled in run(): the three bare matmuls of the same shapes
    return out


def make_inputs(B, D, C, dtype, device, frozen=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (0.01 * torch.randn(C, D, generator=g)).to(device=device, dtype=dtype).requires_grad_(not frozen)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    return x, w, y


def step(fn, x, w, y):
    loss = fn(x, w, y)
    loss.backward()
    x.grad = None
    if w.requires_grad:
        w.grad = None


def child(spec: dict) -> None:
    """Subprocess body: peak RSS rise of one fwd+bwd (the gradient buffers it returns included)."""
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    x, w, y = make_inputs(spec["B"], spec["D"], spec["C"], DTYPES[spec["dtype"]], "cpu", spec.get("frozen", False))
    fn = providers("cpu")[spec["provider"]]
    # one tiny call first: page in the libraries' code and thread pools, which are not this call's memory
    xs, ws, ys = make_inputs(8, spec["D"], 64, DTYPES[spec["dtype"]], "cpu", spec.get("frozen", False))
    fn(xs, ws, ys).backward()
    del xs, ws, ys
    if not harness.reset_peak_rss():
        raise SystemExit("cannot reset the peak RSS on this OS: CPU peak memory needs Linux")
    base = harness.current_rss_bytes()
    loss = fn(x, w, y)
    loss.backward()
    print(harness.maxrss_bytes() - base)


def run(B: int, D: int, C: int, dtype: str, device: str, frozen: bool, reps: int, only: list[str] | None):
    rows = []
    x, w, y = make_inputs(B, D, C, DTYPES[dtype], device, frozen)
    for name, fn in providers(device).items():
        if only and name not in only:
            continue
        if name == "gemm_bound":
            g = torch.randn(B, C, device=device, dtype=x.dtype)
            xd, wd = x.detach(), w.detach()
            call = lambda xd=xd, wd=wd, g=g: (xd @ wd.T, g @ wd, g.T @ xd)
        else:
            call = lambda fn=fn: step(fn, x, w, y)
        if device == "cuda":
            med, p20, p80 = harness.time_gpu(call)
            peak = harness.peak_gpu(call)
        else:
            med, p20, p80 = harness.time_cpu(call, reps=reps)
            peak = harness.peak_cpu_subprocess(
                "bench_margin_ce", dict(provider=name, B=B, D=D, C=C, dtype=dtype, frozen=frozen)
            )
        gemms = 3 if not frozen else 2
        row = harness.base_row("margin_ce" + ("_frozen" if frozen else ""), device)
        row.update(
            provider=name,
            mode="fwd+bwd",
            B=B,
            D=D,
            C=C,
            dtype=dtype,
            ms_median=med,
            ms_p20=p20,
            ms_p80=p80,
            peak_mem_bytes=peak,
            tflops=round(gemms * 2 * B * C * D / (med * 1e-3) / 1e12, 3),
        )
        rows.append(row)
    return rows


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--C", type=int, default=100_000)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frozen", action="store_true", help="centers without gradient (MarginDistillation)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--only", nargs="*", help="providers to run")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    rows = run(args.B, args.D, args.C, args.dtype, args.device, args.frozen, args.reps, args.only)
    harness.print_table(rows)
    if not args.no_save:
        print("appended to", harness.append_rows(rows, args.device))


if __name__ == "__main__":
    main()
