"""Distillation losses, fused vs the eager reference: fwd+bwd time and peak memory at natural shapes.

    python -m bench.bench_distill                      # CPU set
    python -m bench.bench_distill --ops margin_kd --device cuda

Ops (the registry's names, :data:`mdkernels.ops.OPS`): margin_distillation, proxyless_kd, margin_kd,
adadistill (B=256, D=512, C=100k), angular_distill (embeddings B=256, D=512, and variant "maps": feature maps
64x64x28x28), triplet_distill (variant "all": B=256 and 512, D=512). Rows go to
bench/results/<device>.csv.
"""

from __future__ import annotations

import argparse

import torch

from bench import harness

# (op, variant, shape): op names are the registry's; a variant is a case of the op
CASES = [
    ("margin_distillation", "", dict(B=256, D=512, C=100_000)),
    ("proxyless_kd", "", dict(B=256, D=512, C=100_000)),
    ("margin_kd", "", dict(B=256, D=512, C=100_000)),
    ("adadistill", "", dict(B=256, D=512, C=100_000)),
    ("angular_distill", "", dict(B=256, D=512, C=0)),
    ("angular_distill", "maps", dict(B=64, D=64 * 28 * 28, C=0)),
    ("triplet_distill", "all", dict(B=256, D=512, C=0)),
    ("triplet_distill", "all", dict(B=512, D=512, C=0)),
]
OPS = sorted({op for op, _, _ in CASES})  # this module's bench keys


def make(op: str, variant: str, sh: dict, device: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    B, D, C = sh["B"], sh["D"], sh["C"]
    if variant == "maps":
        s = torch.randn(B, 64, 28, 28, generator=g).to(device, dtype).requires_grad_()
        return (s, torch.randn(B, 64, 28, 28, generator=g).to(device, dtype)), {}
    x = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_()
    if C == 0:
        t = torch.randn(B, D, generator=g).to(device, dtype)
        y = torch.randint(0, B // 8, (B,), generator=g).to(device)
        return (x, t), ({"labels": y} if op == "triplet_distill" else {})
    w = torch.randn(C, D, generator=g).to(device, dtype)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    t = (torch.nn.functional.normalize(w[y].float(), dim=1) + 0.5 * torch.randn(B, D, generator=g).to(device)).to(dtype)
    return (x, w, y, t), {}


def call(op: str, impl, inputs, kw):
    if op in ("margin_distillation",):
        x, w, y, t = inputs
        return impl.margin_distillation_loss(x, w, y, teacher_embeddings=t, **kw)
    if op == "proxyless_kd":
        x, w, y, _ = inputs
        return impl.proxyless_kd_loss(x, w, y, **kw)
    if op == "margin_kd":
        x, w, y, t = inputs
        return impl.margin_kd_loss(x, t, w, y, **kw)
    if op == "adadistill":  # the fused op moves w in place; the reference returns (loss, new centers)
        x, w, y, t = inputs
        out = impl.adadistill_loss(x, t, w, y, **kw)
        return out[0] if isinstance(out, tuple) else out
    if op == "angular_distill":
        return impl.angular_distillation_loss(*inputs, **kw)
    return impl.triplet_distillation_loss(*inputs, **kw)


def providers(device: str, op: str = "") -> dict:
    import mdkernels

    out = {"reference": (mdkernels.reference, {}), "mdk_torch": (mdkernels, {"backend": "torch"})}
    if device == "cuda":
        out["mdk_triton"] = (mdkernels, {"backend": "triton"})
        if "cuda" in mdkernels.ops.OPS[op].backends and mdkernels.info()["cuda_extension"]:
            out["mdk_cuda"] = (mdkernels, {"backend": "cuda"})
    return out


def step(op, impl, inputs, kw, extra):
    loss = call(op, impl, inputs, {**kw, **extra})
    loss.backward()
    inputs[0].grad = None


def child(spec: dict) -> None:
    op, name = spec["op"], spec["provider"]
    impl, kw = providers("cpu")[name]
    inputs, extra = make(op, spec["variant"], spec["shape"], "cpu")
    step(op, impl, inputs, kw, extra)  # warm-up: page in code, then measure a second call
    if not harness.reset_peak_rss():
        raise SystemExit("cannot reset the peak RSS on this OS: CPU peak memory needs Linux")
    base = harness.current_rss_bytes()
    step(op, impl, inputs, kw, extra)
    print(harness.maxrss_bytes() - base)


TINY = dict(B=16, D=32, C=300)  # --tiny: the dry run of bench/gpu_check.sh


def run(ops, device, reps, tiny=False):
    rows = []
    for op, variant, shape in CASES:
        if op not in ops:
            continue
        if tiny:
            shape = {k: (TINY[k] if v else 0) for k, v in shape.items()}
        inputs, extra = make(op, variant, shape, device)
        for name, (impl, kw) in providers(device, op).items():
            fn = lambda impl=impl, kw=kw, op=op, inputs=inputs, extra=extra: step(op, impl, inputs, kw, extra)
            spec = {"op": op, "variant": variant, "shape": shape, "provider": name}
            med, p20, p80, peak = harness.measure(fn, device, "bench_distill", spec, reps=reps)
            row = harness.base_row(op, device, variant)
            row.update(provider=name, mode="fwd+bwd", dtype="float32", ms_median=med, ms_p20=p20, ms_p80=p80,
                       peak_mem_bytes=peak, tflops="", **shape)  # fmt: skip
            rows.append(row)
    return rows


def main(argv=None) -> None:
    if harness.ran_as_child(argv, child):
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="*", default=OPS, choices=OPS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a dry run of the plumbing)")
    args = p.parse_args(argv)
    rows = run(args.ops, args.device, args.reps, args.tiny)
    for r in rows:
        mib = r["peak_mem_bytes"] / 2**20
        case = f"{r['op']:>20} {r['variant']:>5} B={r['B']:<4}"
        print(f"{case} {r['provider']:>10}  {r['ms_median']:9.1f} ms  {mib:8.1f} MiB")
    if not args.no_save:
        print("appended to", harness.append_rows(rows, args.device))


if __name__ == "__main__":
    main()
