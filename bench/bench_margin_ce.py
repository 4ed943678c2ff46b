"""Fused margin cross-entropy against what users run instead: time and peak memory.

    python -m bench.bench_margin_ce                                  # CPU: B=256, D=512, C=100k fp32
    python -m bench.bench_margin_ce --suite gpu                      # the issue's GPU grid, bf16 + fp32
    python -m bench.bench_margin_ce --B 1024 --C 85742 --dtype bfloat16 --modes fwd bwd fwd+bwd --frozen

Providers: every mdkernels backend (``mdk_triton`` and ``mdk_cuda`` on GPU, ``mdk_torch``); the eager ``reference``;
``compile_reference`` (torch.compile of it); ``insightface_eager`` (normalised F.linear, margin on the
target, F.cross_entropy: what users run today); ``pml_arcface`` (pytorch-metric-learning, where
installed); ``torch_linear_ce`` (F.linear_cross_entropy, no margin and no normalisation: the fused CE
floor); ``liger_flce`` (Liger-Kernel's fused linear CE, GPU, where installed); ``cce`` (cut-cross-entropy's
``linear_cross_entropy``, GPU, where installed); and ``gemm_bound``, the
bare matmuls of the same shapes and dtype (forward ``x@W^T``, backward ``G@W`` and ``G^T@x``): the
floor the fused op is measured against.

``--amp``: fp32 inputs, every provider under ``torch.autocast`` (bf16), the variant ``amp``. On a CPU under
``TRITON_INTERPRET=1`` the Triton provider runs interpreted, and with ``MDK_FAKE_DEVICE`` set the CUDA provider
runs on the emulator: bench/gpu_check.sh's dry run, tiny shapes only.

Rows go to bench/results/<device>.csv; ``--plot`` writes bench/results/<device>_margin_ce_*.png.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os

import torch
import torch.nn.functional as F

from bench import harness

OPS = ["margin_ce"]  # this module's bench keys (the registry's names, mdkernels.ops.OPS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUITES = {
    "cpu": dict(B=[256], C=[10_000, 100_000], dtypes=["float32"], device="cpu"),
    "quick": dict(B=[64], C=[20_000], dtypes=["float32"], device="cpu"),
    "gpu": dict(
        B=[128, 512, 1024], C=[10_000, 85_742, 360_232, 2_000_000], dtypes=["bfloat16", "float32"], device="cuda"
    ),  # fmt: skip
}


def insightface_head(x, w, y, s=64.0, m=0.5):
    """arcface_torch style: normalised F.linear, margin on the target (straight-through), CE."""
    cos = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    idx = torch.arange(len(y), device=y.device)
    target = cos[idx, y]
    with torch.no_grad():
        delta = torch.cos(torch.acos(target) + m) - target
    logits = cos.index_put((idx, y), target + delta) * s
    return F.cross_entropy(logits, y)


def providers(device: str) -> dict:
    """name -> loss(x, w, y); ``None`` for gemm_bound (timed separately)."""
    import mdkernels

    ref = lambda x, w, y: mdkernels.reference.margin_cross_entropy(x, w, y)
    out = {
        "mdk_torch": lambda x, w, y: mdkernels.margin_cross_entropy(x, w, y, backend="torch"),
        "reference": ref,
        "compile_reference": torch.compile(ref, dynamic=False),
        "insightface_eager": insightface_head,
        "compile_insightface": torch.compile(insightface_head, dynamic=False),  # no label check: one graph
        "torch_linear_ce": lambda x, w, y: F.linear_cross_entropy(x, w, y),
        "gemm_bound": None,
    }
    info = mdkernels.info()
    if device == "cuda" or (info["triton_available"] and info["triton_interpret"]):
        out = {"mdk_triton": lambda x, w, y: mdkernels.margin_cross_entropy(x, w, y, backend="triton"), **out}
    if device == "cuda" and info["cuda_extension"]:
        out = {"mdk_cuda": lambda x, w, y: mdkernels.margin_cross_entropy(x, w, y, backend="cuda"), **out}
    elif device == "cpu" and os.environ.get("MDK_FAKE_DEVICE") and info["cuda_emulator"]:  # run() emulates
        out = {"mdk_cuda": lambda x, w, y: mdkernels.margin_cross_entropy(x, w, y, backend="cuda"), **out}
    if device == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            out["liger_flce"] = lambda x, w, y: liger_fused_linear_cross_entropy(x, w, y)
        except ImportError:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy

            out["cce"] = lambda x, w, y: linear_cross_entropy(x, w, y)
        except ImportError:
            pass
    try:
        from pytorch_metric_learning.losses import ArcFaceLoss

        cache: dict = {}

        def pml(x, w, y):
            key = (w.shape, w.dtype, w.device)
            if key not in cache:
                cache[key] = ArcFaceLoss(w.shape[0], w.shape[1], margin=28.6, scale=64).to(w.device, w.dtype)
            loss_fn = cache[key]
            loss_fn.W = torch.nn.Parameter(w.T, requires_grad=w.requires_grad)  # same centers, PML's layout
            return loss_fn(x, y)

        out["pml_arcface"] = pml
    except ImportError:
        pass
    return out


def make_inputs(B, D, C, dtype, device, frozen=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (0.01 * torch.randn(C, D, generator=g)).to(device=device, dtype=dtype).requires_grad_(not frozen)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    return x, w, y


def _zero(x, w):
    x.grad = None
    if w.requires_grad:
        w.grad = None


def callables(fn, mode, x, w, y):
    """The thing to time for ``mode``; for "bwd" the forward runs once, outside the timing."""
    if fn is None:  # gemm_bound
        g = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
        xd, wd = x.detach(), w.detach()
        frozen = not w.requires_grad
        if mode == "fwd":
            return lambda: xd @ wd.T
        bwd = (lambda: g @ wd) if frozen else (lambda: (g @ wd, g.T @ xd))
        if mode == "bwd":
            return bwd
        return lambda: (xd @ wd.T, bwd())
    if mode == "fwd":
        return lambda: fn(x, w, y)
    if mode == "bwd":
        loss = fn(x, w, y)

        def run():
            _zero(x, w)
            loss.backward(retain_graph=True)

        return run

    def step():
        _zero(x, w)
        fn(x, w, y).backward()

    return step


def gemm_count(mode: str, frozen: bool) -> int:
    return {"fwd": 1, "bwd": 1 if frozen else 2, "fwd+bwd": 2 if frozen else 3}[mode]


def child(spec: dict) -> None:
    """Subprocess body: peak RSS rise of one call (the gradient buffers it returns included)."""
    import mdkernels

    emulate = spec["provider"] == "mdk_cuda" and os.environ.get("MDK_FAKE_DEVICE")
    with mdkernels._cuda_ext.emulated() if emulate else contextlib.nullcontext():
        _child(spec)


def _child(spec: dict) -> None:
    dtype = DTYPES[spec["dtype"]]
    fn = providers("cpu")[spec["provider"]]
    x, w, y = make_inputs(spec["B"], spec["D"], spec["C"], dtype, "cpu", spec.get("frozen", False))
    call = callables(fn, spec["mode"], x, w, y)
    call()  # warm-up at full size (pages in code, compiles); the second call is measured
    _zero(x, w)  # the gradients the second call returns are part of its peak
    if not harness.reset_peak_rss():
        raise SystemExit("cannot reset the peak RSS on this OS: CPU peak memory needs Linux")
    base = harness.current_rss_bytes()
    call()
    print(harness.maxrss_bytes() - base)


def under_autocast(fn, device):
    """``fn`` with every call inside ``torch.autocast(device, bfloat16)`` (``--amp``)."""

    def amp(x, w, y):
        with torch.autocast(device, dtype=torch.bfloat16):
            return fn(x, w, y)

    return amp


def run(B, D, C, dtype, device, frozen, reps, only, modes, amp=False):
    """Every provider (and mode) at one shape. With ``MDK_FAKE_DEVICE`` on a CPU, the whole run is inside the
    CUDA emulator (mdk_cuda's backward runs after its forward has returned)."""
    emulate = device == "cpu" and os.environ.get("MDK_FAKE_DEVICE") and (not only or "mdk_cuda" in only)
    import mdkernels

    with mdkernels._cuda_ext.emulated() if emulate and mdkernels.info()["cuda_emulator"] else contextlib.nullcontext():
        return _run(B, D, C, dtype, device, frozen, reps, only, modes, amp)


def _run(B, D, C, dtype, device, frozen, reps, only, modes, amp):
    rows = []
    x, w, y = make_inputs(B, D, C, DTYPES[dtype], device, frozen)
    calls = {}
    for name, fn in providers(device).items():
        if not only or name in only:
            if amp and fn is not None:
                fn = under_autocast(fn, device)
            for mode in modes:
                calls[(name, mode)] = callables(fn, mode, x, w, y)
    measured = {}
    if device == "cpu":  # every provider's repetitions interleaved: the ratios hold within one run
        try:
            measured = harness.time_cpu_interleaved(calls, reps=reps)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            print(f"interleaved timing failed ({type(err).__name__}: {str(err)[:200]}); timing one by one")
    for (name, mode), call in calls.items():
        try:
            spec = dict(provider=name, mode=mode, B=B, D=D, C=C, dtype=dtype, frozen=frozen)
            med, p20, p80, peak = harness.measure(call, device, "bench_margin_ce", spec, measured.get((name, mode)),
                                                  reps=reps)  # fmt: skip
        except (torch.OutOfMemoryError, RuntimeError) as err:  # e.g. eager at C = 2M
            print(f"{name} {mode}: {type(err).__name__}: {str(err)[:200]}")
            med = p20 = p80 = math.nan
            peak = ""
            if device == "cuda":
                torch.cuda.empty_cache()
        row = harness.base_row("margin_ce", device, "_".join(v for v, on in (("frozen", frozen), ("amp", amp)) if on))
        flops = gemm_count(mode, frozen) * 2 * B * C * D
        tflops = round(flops / (med * 1e-3) / 1e12, 3) if med == med else ""
        row.update(provider=name, mode=mode, B=B, D=D, C=C, dtype=dtype, ms_median=med, ms_p20=p20, ms_p80=p80,
                   peak_mem_bytes=peak, tflops=tflops)  # fmt: skip
        rows.append(row)
        x.grad = None
        w.grad = None
    return rows


def main(argv=None) -> None:
    if harness.ran_as_child(argv, child):
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=list(SUITES), help="a shape grid (overrides --B/--C/--dtype/--device)")
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--C", type=int, default=100_000)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", nargs="*", default=["fwd+bwd"], choices=["fwd", "bwd", "fwd+bwd"])
    p.add_argument("--frozen", action="store_true", help="centers without gradient (MarginDistillation)")
    p.add_argument("--amp", action="store_true", help="fp32 inputs under torch.autocast(bfloat16): variant 'amp'")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--only", nargs="*", help="providers to run")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--plot", action="store_true", help="write PNG plots from the device's CSV afterwards")
    args = p.parse_args(argv)
    grid = [(args.B, args.C, args.dtype)]
    device = args.device
    if args.suite:
        suite = SUITES[args.suite]
        device = suite["device"]
        grid = [(b, c, dt) for dt in suite["dtypes"] for b in suite["B"] for c in suite["C"]]
    rows = []
    for B, C, dtype in grid:
        part = run(B, args.D, C, dtype, device, args.frozen, args.reps, args.only, args.modes, args.amp)
        harness.print_table(part)
        rows += part
        if not args.no_save:
            harness.append_rows(part, device)
    if args.plot:
        from bench import plot

        for path in plot.plot_op(harness.RESULTS / f"{harness.slug(harness.device_name(device))}.csv", "margin_ce"):
            print("plot:", path)


if __name__ == "__main__":
    main()
