"""The margin family, fused (mdkernels.nn) against eager heads written the way the official code computes
them (the full ``B x C`` cosine matrix, their order of operations): fwd+bwd time and extra peak memory.

    python -m bench.bench_margin_family                      # CPU: B=256, D=512, C=100k fp32 (sub-center K=3, C=30k)
    python -m bench.bench_margin_family --device cuda --dtype bfloat16

Providers per loss: ``mdk`` (the module on the default backend: torch on the CPU, Triton or CUDA C++ on a
GPU) and ``official_eager``. Rows are op ``margin_ce`` (the family runs on the margin CE) with the loss as
``variant``, in bench/results/<device>.csv.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from bench import harness

OPS: list[str] = []  # no op of its own: rows are "margin_ce", variant <loss> (mdkernels.ops.OPS)
LOSSES = ["adaface", "curricularface", "magface", "elastic_arcface", "elastic_cosface", "subcenter"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- eager heads, as the official code computes (B x C tensors, several of them) ----------------------------
def _hot(y, C):
    return F.one_hot(y, C).to(torch.bool)


def adaface_eager(x, w, y, state, m=0.4, h=0.333, s=64.0, t_alpha=0.01, eps=1e-3):
    norms = x.norm(dim=1, keepdim=True)
    cos = F.linear(x / norms, F.normalize(w)).clamp(-1 + eps, 1 - eps)
    safe = norms.clip(0.001, 100).clone().detach()
    with torch.no_grad():
        state["mean"] = safe.mean() * t_alpha + (1 - t_alpha) * state["mean"]
        state["std"] = safe.std() * t_alpha + (1 - t_alpha) * state["std"]
    z = ((safe - state["mean"]) / (state["std"] + eps) * h).clip(-1, 1)
    hot = torch.zeros_like(cos).scatter_(1, y[:, None], 1.0)
    theta = cos.acos()
    theta_m = torch.clip(theta + hot * (-m * z), min=eps, max=math.pi - eps)
    cos = theta_m.cos() - hot * (m + m * z)
    return F.cross_entropy(cos * s, y)


def curricularface_eager(x, w, y, state, m=0.5, s=64.0):
    cos = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    with torch.no_grad():
        origin = cos.clone()  # noqa: F841  (the official head keeps it for its accuracy)
    target = cos[torch.arange(len(y)), y].view(-1, 1)
    sin_t = torch.sqrt(1.0 - target.pow(2))
    cos_m = target * math.cos(m) - sin_t * math.sin(m)
    mask = cos > cos_m
    final = torch.where(target > math.cos(math.pi - m), cos_m, target - math.sin(math.pi - m) * m)
    with torch.no_grad():
        state["t"] = target.mean() * 0.01 + 0.99 * state["t"]
    hard = cos[mask]
    cos = cos.clone()
    cos[mask] = hard * (state["t"] + hard)
    cos = cos.scatter(1, y.view(-1, 1), final)
    return F.cross_entropy(cos * s, y)


def magface_eager(x, w, y, state, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0):
    a = x.norm(dim=1, keepdim=True).clamp(l_a, u_a)
    margin = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
    cos = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    sin = torch.sqrt(1.0 - cos.pow(2))
    cos_m = torch.where(cos > 0, cos * torch.cos(margin) - sin * torch.sin(margin), cos)  # easy margin
    hot = _hot(y, w.shape[0])
    logits = torch.where(hot, cos_m * s, cos * s)
    return F.cross_entropy(logits, y) + lambda_g * (a / u_a**2 + 1 / a).mean()


def elastic_eager(x, w, y, state, kind="arc", s=64.0, m=0.5, std=0.05):
    cos = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    margins = torch.normal(mean=m, std=std, size=(len(y), 1), device=x.device)
    m_hot = torch.zeros_like(cos).scatter_(1, y[:, None], margins.to(cos.dtype))
    if kind == "arc":
        return F.cross_entropy((cos.acos() + m_hot).cos() * s, y)
    return F.cross_entropy((cos - m_hot) * s, y)


def subcenter_eager(x, w, y, state, K=3, s=64.0, m=0.5):
    cos = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    cos = cos.view(len(y), -1, K).max(2).values
    target = cos[torch.arange(len(y)), y]
    sin = torch.sqrt(1.0 - target.pow(2))
    phi = target * math.cos(m) - sin * math.sin(m)
    phi = torch.where(target > math.cos(math.pi - m), phi, target - math.sin(math.pi - m) * m)
    logits = torch.where(_hot(y, cos.shape[1]), phi[:, None], cos) * s
    return F.cross_entropy(logits, y)


EAGER = {
    "adaface": adaface_eager,
    "curricularface": curricularface_eager,
    "magface": magface_eager,
    "elastic_arcface": lambda *a: elastic_eager(*a, kind="arc"),
    "elastic_cosface": lambda *a: elastic_eager(*a, kind="cos", m=0.35),
    "subcenter": subcenter_eager,
}


def fused_head(loss: str, D: int, C: int):
    from mdkernels import nn as mnn

    return {
        "adaface": lambda: mnn.AdaFace(D, C),
        "curricularface": lambda: mnn.CurricularFace(D, C),
        "magface": lambda: mnn.MagFace(D, C),
        "elastic_arcface": lambda: mnn.ElasticArcFace(D, C),
        "elastic_cosface": lambda: mnn.ElasticCosFace(D, C),
        "subcenter": lambda: mnn.SubCenterArcFace(D, C, K=3),
    }[loss]()


def shape_of(loss: str, C: int) -> tuple[int, int]:
    """(classes, weight rows): sub-center runs K = 3 at 30k classes (the issue's shape), the rest at C."""
    return (30_000, 90_000) if loss == "subcenter" else (C, C)


def step_of(loss, provider, B, D, C, dtype, device, seed=0):
    """A fwd+bwd step of one provider, its inputs bound (the weight's gradient is returned each step)."""
    classes, rows = shape_of(loss, C)
    g = torch.Generator().manual_seed(seed)
    x = (20 * F.normalize(torch.randn(B, D, generator=g)) * (1 + torch.rand(B, 1, generator=g)))
    x = x.to(device, dtype).requires_grad_()
    y = torch.randint(0, classes, (B,), generator=g).to(device)
    if provider == "mdk":
        head = fused_head(loss, D, classes).to(device, dtype)
        w = head.weight
        fn = lambda: head(x, y)  # noqa: E731
    else:
        w = (0.01 * torch.randn(rows, D, generator=g)).to(device, dtype).requires_grad_()
        state = {"mean": torch.tensor(20.0, device=device), "std": torch.tensor(100.0, device=device),
                 "t": torch.tensor(0.0, device=device)}  # fmt: skip
        fn = lambda: EAGER[loss](x, w, y, state)  # noqa: E731

    def zero():
        x.grad = None
        w.grad = None

    def step():
        zero()
        fn().backward()

    step.zero = zero
    return step


def child(spec: dict) -> None:
    """Subprocess body: the peak RSS rise of one step (its returned gradients included)."""
    step = step_of(spec["loss"], spec["provider"], spec["B"], spec["D"], spec["C"], DTYPES[spec["dtype"]], "cpu")
    step()  # warm-up at full size; the second step is measured with the gradients it returns
    step.zero()
    if not harness.reset_peak_rss():
        raise SystemExit("cannot reset the peak RSS on this OS: CPU peak memory needs Linux")
    base = harness.current_rss_bytes()
    step()
    print(harness.maxrss_bytes() - base)


def run(B, D, C, dtype, device, reps, losses):
    rows = []
    for loss in losses:
        calls = {p: step_of(loss, p, B, D, C, DTYPES[dtype], device) for p in ("mdk", "official_eager")}
        measured = harness.time_cpu_interleaved(calls, reps=reps) if device == "cpu" else {}
        for provider, call in calls.items():
            spec = dict(loss=loss, provider=provider, B=B, D=D, C=C, dtype=dtype)
            med, p20, p80, peak = harness.measure(call, device, "bench_margin_family", spec, measured.get(provider))
            row = harness.base_row("margin_ce", device, loss)
            row.update(provider=provider, mode="fwd+bwd", B=B, D=D, C=shape_of(loss, C)[1], dtype=dtype,
                       ms_median=med, ms_p20=p20, ms_p80=p80, peak_mem_bytes=peak)  # fmt: skip
            rows.append(row)
        del calls
    return rows


def print_ratios(rows: list[dict]) -> None:
    print(f"{'loss':>16} | {'fused ms':>9} | {'eager ms':>9} | {'speed-up':>8} | {'fused MiB':>9} | {'eager MiB':>9}")
    for loss in dict.fromkeys(r["variant"] for r in rows):
        f, e = (next(r for r in rows if r["variant"] == loss and r["provider"] == p) for p in ("mdk", "official_eager"))
        mib = lambda r: r["peak_mem_bytes"] / 2**20 if r["peak_mem_bytes"] != "" else math.nan  # noqa: E731
        print(f"{loss:>16} | {f['ms_median']:9.0f} | {e['ms_median']:9.0f} | {e['ms_median'] / f['ms_median']:7.2f}x "
              f"| {mib(f):9.0f} | {mib(e):9.0f}")  # fmt: skip


def main(argv=None) -> None:
    if harness.ran_as_child(argv, child):
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--C", type=int, default=100_000, help="classes (sub-center: 30k classes, K = 3)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--losses", nargs="*", default=LOSSES, choices=LOSSES)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    rows = run(args.B, args.D, args.C, args.dtype, args.device, args.reps, args.losses)
    harness.print_table(rows)
    print_ratios(rows)
    if not args.no_save:
        harness.append_rows(rows, args.device)


if __name__ == "__main__":
    main()
