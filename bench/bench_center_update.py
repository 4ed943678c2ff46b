"""The fused center update (mdkernels.fuse_center_update) against the same step with optimizer.step().

    python -m bench.bench_center_update                      # CPU: B=256, D=512, C=100k fp32, SGD and AdamW
    python -m bench.bench_center_update --device cuda --dtype bfloat16 --B 1024 --C 2000000   # gpu_check.sh call 2

One training step of an ArcFace head on embeddings that need a gradient (a backbone's output), per optimizer
(``sgd``: momentum 0.9, weight decay 5e-4; ``adamw``: weight decay 0.05), three providers timed in one run:

* ``then_step``: the fused margin CE's forward and backward (writing the centers' ``C x D`` gradient), then
  ``optimizer.step()`` with ``foreach=True``: what a user runs without the fusion;
* ``fused_update``: the same forward and backward with the centers' update inside (``fuse_center_update``),
  then ``optimizer.step()`` (which skips the centers);
* ``gemm_bound``: the three bare GEMMs of the shape (``x W^T``, ``P W``, ``G^T x``): the floor.

Memory: the rise of the peak during the step's backward and ``optimizer.step()`` over their start (the forward done,
the optimizer's state already created by a warm-up step): on a CPU the peak RSS of a fresh child process (its
high-water mark reset after the forward), on a GPU ``torch.cuda.max_memory_allocated``. Reported as a fraction of
the centers' own size.

Rows go to bench/results/<device>.csv (op ``margin_ce``, variant ``center_update_<optimizer>``, mode ``step``) and
one summary line per optimizer, with the ratios, to bench/results/<device>_center_update.jsonl.

``--profile`` instead writes torch.profiler's table of one fused step per optimizer (after a warm-up step) to
bench/results/center_update_profile_<device>.txt: where the fused step's time goes.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench import harness

OPS: list[str] = []  # no op of its own: its rows are margin_ce's (variant center_update_<optimizer>)
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05, foreach=True),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def setup(spec: dict):
    """``(step, centers bytes)``: a closure running one training step of ``spec``'s provider."""
    import mdkernels

    dtype, device = DTYPES[spec["dtype"]], spec["device"]
    B, D, C = spec["B"], spec["D"], spec["C"]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, D, generator=g, device=device, dtype=dtype).requires_grad_()
    y = torch.randint(0, C, (B,), generator=g, device=device)
    if spec["provider"] == "gemm_bound":
        w = torch.randn(C, D, generator=g, device=device, dtype=dtype)
        go = torch.randn(B, C, generator=g, device=device, dtype=dtype)

        def step():
            logits = x.detach() @ w.T
            return logits, go @ w, go.T @ x.detach()

        return step, w.numel() * w.element_size()
    head = mdkernels.nn.ArcFace(D, C, backend=spec.get("backend", "auto")).to(device=device, dtype=dtype)
    opt = OPTIMIZERS[spec["optimizer"]](head.parameters())
    if spec["provider"] == "fused_update":
        mdkernels.fuse_center_update(head, opt)

    def forward():
        opt.zero_grad(set_to_none=True)
        x.grad = None
        return head(x, y)

    def backward(loss):
        loss.backward()
        opt.step()

    def step():
        backward(forward())

    step.forward, step.backward = forward, backward  # the child measures the backward's peak alone
    return step, head.weight.numel() * head.weight.element_size()


def child(spec: dict) -> None:
    """The peak RSS rise of one step's backward and optimizer step over their start (after a warm-up step, so
    the optimizer's state exists), in this fresh process."""
    step, _ = setup(spec)
    step()
    loss = step.forward()
    base = harness.current_rss_bytes()
    harness.reset_peak_rss()
    step.backward(loss)
    print(max(0, harness.maxrss_bytes() - base))


def peak(spec: dict) -> int:
    if spec["device"] == "cuda":
        step, _ = setup(spec)
        step()
        loss = step.forward()
        return harness.peak_gpu(lambda: step.backward(loss))
    return harness.peak_cpu_subprocess("bench_center_update", spec)


def profile(B: int, D: int, C: int, dtype: str, device: str, optimizers: list[str], backend: str) -> str:
    """torch.profiler's table (self time, top 12 rows) of one fused step per optimizer, after a warm-up step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    row = harness.base_row("margin_ce", device)
    out = [f"# one fused step (mdkernels.fuse_center_update), ArcFace, {dtype}, B={B} D={D} C={C}, torch.profiler",
           f"# commit: {row['commit']}; device: {row['device']}; torch {row['torch']}; {row['date']}",
           "# the update's own operations: the aten::add_/mul_/lerp_/addcmul_/addcdiv_/sqrt/div_ rows (a few of",
           "# them the forward's); the GEMMs: aten::mm and aten::addmm_; the Generated...Backward rows' self time:",
           "# the loss's C++ row sweeps and its Python"]  # fmt: skip
    for name in optimizers:
        step, _ = setup(dict(provider="fused_update", optimizer=name, B=B, D=D, C=C, dtype=dtype, device=device,
                             backend=backend))  # fmt: skip
        step()
        with run_profiler(activities=activities) as prof:
            step()
            if device == "cuda":
                torch.cuda.synchronize()
        out += [f"## {name}", prof.key_averages().table(sort_by=sort, row_limit=12)]
    return "\n".join(out) + "\n"


def run(B: int, D: int, C: int, dtype: str, device: str, optimizers: list[str], reps: int, backend: str) -> list:
    rows, summaries = [], []
    for name in optimizers:
        specs = {p: dict(provider=p, optimizer=name, B=B, D=D, C=C, dtype=dtype, device=device, backend=backend)
                 for p in ("then_step", "fused_update", "gemm_bound")}  # fmt: skip
        steps = {p: setup(s)[0] for p, s in specs.items()}
        centers_bytes = B and C * D * torch.empty((), dtype=DTYPES[dtype]).element_size()
        if device == "cuda":
            times = {p: harness.time_gpu(fn) for p, fn in steps.items()}
        else:
            times = harness.time_cpu_interleaved(steps, reps=reps, warmup=1)
        del steps
        mems = {p: peak(s) for p, s in specs.items() if p != "gemm_bound"}
        for p in specs:
            med, p20, p80 = times[p]
            rows.append({**harness.base_row("margin_ce", device, f"center_update_{name}"), "provider": p,
                         "mode": "step", "B": B, "D": D, "C": C, "dtype": dtype, "ms_median": med, "ms_p20": p20,
                         "ms_p80": p80, "peak_mem_bytes": mems.get(p, "")})  # fmt: skip
        summary = {
            "bench": "center_update", "optimizer": name, "B": B, "D": D, "C": C, "dtype": dtype,
            "ms": {p: round(times[p][0], 2) for p in specs},
            "fused_over_then_step": round(times["fused_update"][0] / times["then_step"][0], 3),
            "fused_over_gemm_bound": round(times["fused_update"][0] / times["gemm_bound"][0], 3),
            "extra_peak_over_centers": {p: round(m / centers_bytes, 4) for p, m in mems.items()},
        }  # fmt: skip
        summaries.append(summary)
        print(json.dumps(summary))
    return rows, summaries


def main(argv=None) -> None:
    if harness.ran_as_child(argv, child):
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--C", type=int, default=100_000)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument("--reps", type=int, default=5, help="CPU: timed repetitions per provider (interleaved)")
    p.add_argument("--no-record", action="store_true", help="print only: write nothing to bench/results/")
    p.add_argument("--profile", action="store_true", help="profile one fused step per optimizer instead of timing")
    a = p.parse_args(argv)
    if a.profile:
        text = profile(a.B, a.D, a.C, a.dtype, a.device, a.optimizers, a.backend)
        print(text)
        if not a.no_record:
            path = harness.RESULTS / f"center_update_profile_{harness.slug(harness.device_name(a.device))}.txt"
            path.write_text(text)
        return
    rows, summaries = run(a.B, a.D, a.C, a.dtype, a.device, a.optimizers, a.reps, a.backend)
    if not a.no_record:
        harness.append_rows(rows, a.device)
        for s in summaries:
            harness.append_record(s, a.device, "center_update")


if __name__ == "__main__":
    main()
